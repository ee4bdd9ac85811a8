"""The command line, `python -m engine run | generate | serve | pull | list | rm | show | info |
quantize | tokenize` (also the console script `engine`); the chat of `run` is surfaces/repl.py,
the HTTP server of `serve` surfaces/server.py.

generate streams only the generated text to stdout; statistics and errors go to stderr.
"""
import argparse
import json
import signal
import sys
import threading
import time

from .kernels.attention import KV_KINDS
from .kernels.compiler import COMPILE_LOG

from .errors import EngineError
from .quantize import QUANT_TYPES
from .resolve import SHORT_NAMES
from .weight_cache import abandon_writes


MODEL_HELP = ("a local directory (config.json, *.safetensors, tokenizer.json); a .gguf file; an Ollama NAME:TAG "
              "already pulled (its store: $OLLAMA_MODELS or ~/.ollama/models); a short name: "
              f"{SHORT_NAMES}; or a Hugging Face repo id (organization/name), downloaded once")


def _add_model(p):
    p.add_argument("--model", "-m", required=True, metavar="MODEL", help=MODEL_HELP)


def _add_load_options(p):
    p.add_argument("--ctx", type=int, help="context length (default: the model's, at most 4096)")
    p.add_argument("--threads", "-t", type=int, help="worker threads (default: all cores)")
    p.add_argument("--quant", choices=QUANT_TYPES, help="quantize a float checkpoint while loading")
    p.add_argument("--kv-cache", choices=KV_KINDS, default="f16", help="KV cache storage (default f16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Run LLMs locally on the CPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="chat with a model, as `ollama run`: answer PROMPT (or stdin) once, or talk")
    r.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    r.add_argument("prompt", nargs="*", help="answer this and exit (text piped on stdin is added to it)")
    r.add_argument("--think", nargs="?", const="true", choices=["true", "false"],
                   help="let a reasoning model think first (default: yes when it can); --think=false answers at once")
    r.add_argument("--hidethinking", action="store_true", help="do not show the model's reasoning")
    r.add_argument("--verbose", action="store_true", help="print Ollama's statistics after each answer")
    r.add_argument("--ctx", type=int, help="context length (default: the model's, at most 4096)")
    r.add_argument("--threads", "-t", type=int, help="worker threads (default: all cores)")

    sub.add_parser("pull", help="download a model (into the Hugging Face cache)").add_argument("model", metavar="MODEL")
    sub.add_parser("list", aliases=["ls"], help="the models on this machine")
    sub.add_parser("rm", help="delete a downloaded model (never Ollama's)").add_argument("model", metavar="MODEL")
    sub.add_parser("show", help="describe a model, as `info`").add_argument("model", metavar="MODEL")

    g = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    _add_model(g)
    g.add_argument("--prompt", "-p", required=True, help="the prompt ('-' reads it from stdin)")
    g.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    g.add_argument("--system", help="a system message before the prompt (chat template only)")
    g.add_argument("--max-tokens", "-n", type=int, default=512, help="at most this many new tokens (default 512)")
    g.add_argument("--temperature", type=float, help="0 is greedy; default: the model's, else Ollama's 0.8")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, help="keep the smallest set with this much probability (1: off)")
    g.add_argument("--min-p", type=float, help="drop tokens less likely than min-p times the best (0: off)")
    g.add_argument("--repeat-penalty", type=float, help="penalise tokens of the last --repeat-last-n (1: off)")
    g.add_argument("--repeat-last-n", type=int, help="window of the repeat penalty (default 64)")
    g.add_argument("--presence-penalty", type=float, help="subtracted from seen tokens' logits")
    g.add_argument("--frequency-penalty", type=float, help="subtracted once per occurrence")
    g.add_argument("--seed", type=int, help="random seed: the same seed gives the same text")
    g.add_argument("--stop", action="append", help="stop when this text is generated (repeatable)")
    _add_load_options(g)
    g.add_argument("--verbose", "-v", action="store_true", help="print timings and tokens/s to stderr")
    g.add_argument("--profile", action="store_true",
                   help="print where the time went, kernel by kernel (share, ms/token, calls, GB/s) to stderr")

    q = sub.add_parser("quantize", help="write a quantized copy of a float checkpoint to a directory")
    _add_model(q)
    q.add_argument("--type", required=True, choices=QUANT_TYPES, help="weight format")
    q.add_argument("--output", "-o", required=True, help="the directory to write")

    i = sub.add_parser("info", help="describe a model: architecture, size, tensor types, tokenizer, template")
    _add_model(i)

    s = sub.add_parser("serve", help="serve Ollama's and OpenAI's HTTP APIs (pip install \"engine[serve]\")")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=11434, help="port (default 11434, Ollama's)")
    s.add_argument("--model", "-m", action="append", default=[], metavar="MODEL",
                   help="load this model at start (repeatable); others load on first use. " + MODEL_HELP)
    s.add_argument("--parallel", type=int, default=4, help="sequences decoded together per model (default 4)")
    s.add_argument("--max-queue", type=int, default=512, help="requests that may wait for a slot (default 512)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health "
                                     "(default: $ENGINE_API_KEY, else none)")
    s.add_argument("--ctx", type=int, help="context length per sequence (default: the model's, at most 4096)")
    s.add_argument("--threads", "-t", type=int, help="worker threads (default: all cores)")

    t = sub.add_parser("tokenize", help="print the token ids of a text as JSON (loads only the tokenizer)")
    _add_model(t)
    t.add_argument("text")
    return parser


def cmd_generate(args) -> int:
    from . import load
    prompt = read_stdin() if args.prompt == "-" else args.prompt
    if args.system is not None:
        if args.raw:
            raise EngineError("--system needs the chat template; it cannot be combined with --raw")
        prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}]
    llm = load(args.model, context_length=args.ctx, threads=args.threads, quant=args.quant, kv_cache=args.kv_cache)
    if llm.source != args.model:
        args.progress.say(f"model: {llm.source}")
    profile = llm.model.start_profile() if args.profile else None
    pieces = llm.generate(
        prompt, raw=args.raw, max_tokens=args.max_tokens, stop=args.stop, stream=True,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, seed=args.seed)
    try:
        for piece in pieces:
            args.progress.finish()   # the answer has the terminal now
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:   # also when interrupted: the shell's prompt starts on a line of its own
        sys.stdout.write("\n")
        sys.stdout.flush()
    if args.verbose or args.profile:
        print(llm.last_stats.report(), file=sys.stderr)
    if profile:
        print(profile.report(), file=sys.stderr)
    return 0


def read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EngineError(f"the prompt on stdin is not valid UTF-8 (byte {e.start})") from None


def cmd_run(args) -> int:
    from .surfaces.repl import Session, interactive
    options = {name: value for name, value in (("num_ctx", args.ctx), ("num_thread", args.threads)) if value is not None}
    think = None if args.think is None else args.think == "true"
    session = Session(args.model, think=think, hide_thinking=args.hidethinking, verbose=args.verbose,
                      options=options, before_output=args.progress.finish)
    prompt = " ".join(args.prompt)
    if not sys.stdin.isatty():
        piped = read_stdin()
        prompt = f"{prompt}\n\n{piped}" if prompt and piped.strip() else prompt or piped
    if prompt.strip():
        session.ask(prompt)
        return 0
    return interactive(session)


def cmd_serve(args) -> int:
    from .surfaces.server import serve
    if not 1 <= args.max_queue <= 1_000_000 or not 0 < args.port < 65536:
        raise EngineError("--max-queue must be 1 to 1000000 and --port 1 to 65535")
    from . import MAX_PARALLEL   # checked now: the models load later, on first use
    if not 1 <= args.parallel <= MAX_PARALLEL:
        raise EngineError(f"--parallel must be 1 to {MAX_PARALLEL}, got {args.parallel}")
    load_options = {k: v for k, v in (("context_length", args.ctx), ("threads", args.threads)) if v is not None}
    try:
        serve(args.host, args.port, args.model, args.parallel, args.api_key, args.max_queue, load_options)
    except (KeyboardInterrupt, Terminated):   # uvicorn raises the signal again once it has shut down
        pass
    return 0


def cmd_pull(args) -> int:
    from .library import pull
    resolved = pull(args.model)
    print(f"{args.model}: {resolved.path}")
    return 0


def cmd_list(args) -> int:
    from .library import human_size, local_models, modified_ago
    header = ("NAME", "SIZE", "FORMAT", "QUANTIZATION", "WHERE", "MODIFIED")
    rows = []
    for m in local_models():
        details = m.details()
        rows.append((m.name, human_size(m.size), m.file_format, details.quantization if details else "?", m.where,
                     modified_ago(m.modified)))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("   ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_rm(args) -> int:
    from .library import remove
    remove(args.model)
    print(f"deleted '{args.model}'")
    return 0


def cmd_quantize(args) -> int:
    from .quantize import save_quantized
    started = time.perf_counter()
    out = save_quantized(args.model, args.output, args.type)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 1e6:.1f} MB of {args.type} weights) in {time.perf_counter() - started:.1f}s",
          file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from .info import model_info
    for label, value in model_info(args.model):
        print(f"{label + ':':<16}{value}")
    return 0


def cmd_tokenize(args) -> int:
    from . import load_tokenizer
    print(json.dumps(load_tokenizer(args.model).encode(args.text)))
    return 0


class CompileProgress:
    """Shows on stderr what numba compiles while it compiles: a machine's first run (or the first
    after an upgrade) spends seconds on it before anything else shows, which would look like a
    hang. On a terminal one line follows along (kernels done, seconds, the kernels in progress,
    here and in the helper process: kernels.compiler.CompileAhead); elsewhere a line when
    compiling starts. `finish` (before the answer streams) ends it with a summary; later
    compilations are only counted (--verbose). Kernels loaded from numba's cache are not
    compilations: a later run shows nothing."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.first = None          # COMPILE_LOG.compiled[first:] are this run's
        self.shown = False         # the live line is on the screen
        COMPILE_LOG.watchers.append(self)

    def __call__(self, log):
        if self.first is None:
            self.first, self.helped, self.started = len(log.compiled), log.by_helper, time.perf_counter()
            self.say("compiling kernels for this CPU, once (cached for later runs)" + ("" if self.live else "..."))
        if self.live:
            done, queued = len(log.compiled) - self.first, log.queued()
            now = f", now {' and '.join(log.current)}" if log.current else ""
            print(f"\r\033[K  {done} done{f', {queued} queued' if queued else ''} in "
                  f"{time.perf_counter() - self.started:.1f}s{now}", end="", file=self.stream, flush=True)
            self.shown = True

    def say(self, text: str) -> None:
        """A line of its own, without breaking the live line."""
        if self.shown:
            print("\r\033[K", end="", file=self.stream)
            self.shown = False
        print(text, file=self.stream, flush=True)

    def finish(self) -> None:
        if self in COMPILE_LOG.watchers:
            COMPILE_LOG.watchers.remove(self)
        if self.first is not None:
            done, helped = len(COMPILE_LOG.compiled) - self.first, COMPILE_LOG.by_helper - self.helped
            self.say(f"compiled {done} kernels in {time.perf_counter() - self.started:.1f}s"
                     + (f" ({helped} of them in a second process)" if helped else ""))
            self.first = None


class Terminated(Exception):
    """SIGTERM, turned into an exception so that the answer ends as cleanly as on Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        commands = {"run": cmd_run, "generate": cmd_generate, "info": cmd_info, "show": cmd_info, "pull": cmd_pull,
                    "list": cmd_list, "ls": cmd_list, "rm": cmd_rm, "quantize": cmd_quantize, "tokenize": cmd_tokenize,
                    "serve": cmd_serve}
        args.progress = CompileProgress()
        try:
            return commands[args.command](args)
        finally:
            args.progress.finish()
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        abandon_writes()
        return 130
    except Terminated:
        abandon_writes()
        return 128 + signal.SIGTERM
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
