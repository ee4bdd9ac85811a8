"""The generation loop: a generator of text pieces, with stop conditions and statistics.

Prefill runs the prompt through the model in chunks (with a progress bar for long prompts),
then each step samples a token, streams its text and decodes it through the KV cache. It stops
at an end-of-sequence token, a stop string, max_tokens, or when the context is full.
"""
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .errors import EngineError
from .kernels.compiler import COMPILE_LOG
from .sampler import Sampler
from .threads import ThreadTuner
from .tokenizer import Tokenizer


@dataclass
class Stats:
    """Timings of one generation, reported like Ollama's --verbose. Compiling kernels (a first
    run on a machine) is counted on its own, not in the load, prompt or eval time it interrupted."""
    load_seconds: float = 0.0
    compile_seconds: float = 0.0
    compiled_kernels: int = 0
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_ids: list = field(default_factory=list)
    generate_seconds: float = 0.0
    stop_reason: str = ""
    sampling: list = field(default_factory=list)   # each setting, its value and its source

    @property
    def generated_tokens(self) -> int:
        return len(self.generated_ids)

    def report(self) -> str:
        def rate(n, s):
            return f"{n / s:.2f} tokens/s" if s > 0 else "n/a"
        total = self.load_seconds + self.compile_seconds + self.prompt_seconds + self.generate_seconds
        compiled = f" ({self.compiled_kernels} kernels, once for this CPU: cached for later runs)" \
            if self.compiled_kernels else ""
        return "\n".join([
            f"total duration:       {total:.3f}s",
            f"load duration:        {self.load_seconds:.3f}s",
            f"compile duration:     {self.compile_seconds:.3f}s{compiled}",
            f"prompt eval count:    {self.prompt_tokens} token(s)",
            f"prompt eval duration: {self.prompt_seconds:.3f}s",
            f"prompt eval rate:     {rate(self.prompt_tokens, self.prompt_seconds)}",
            f"eval count:           {self.generated_tokens} token(s)",
            f"eval duration:        {self.generate_seconds:.3f}s",
            f"eval rate:            {rate(self.generated_tokens, self.generate_seconds)}",
            f"stop reason:          {self.stop_reason}",
            *(["sampling:"] + [f"  {line}" for line in self.sampling] if self.sampling else []),
        ])


class StopStrings:
    """Holds back text that might be the start of a stop string, and cuts at the first match."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        # keep the longest tail that is a prefix of some stop string
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def check_request(prompt_tokens: int, context: int, max_tokens: int) -> None:
    if prompt_tokens == 0:
        raise EngineError("the prompt is empty")
    if prompt_tokens >= context:
        raise EngineError(f"the prompt has {prompt_tokens} tokens, but the context holds {context}: "
                          f"shorten it or load the model with a larger context (--ctx on the command line, "
                          f"context_length= in engine.load)")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise EngineError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")


def common_prefix(a: list, b: list) -> int:
    """How many leading tokens a and b share (a cache's and a new prompt's)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Request:
    """One generation, checked (LLM.request makes them) and ready to run: prompt ids, sampler,
    limits; its stats fill in."""
    prompt_ids: list
    sampler: Sampler
    max_tokens: int
    stop: list
    stats: Stats


class Sequence:
    """A generation after its prompt: `add` takes each sampled token and returns the text it
    completes, until an end-of-sequence token, a stop string, max_tokens or a full context ends
    it (`done`, and the reason in stats.stop_reason); `finish` returns the text held back till then."""

    def __init__(self, tokenizer: Tokenizer, request: Request, eos_ids, context: int):
        self.history = list(request.prompt_ids)
        self.stats = request.stats
        self.max_tokens, self.context = request.max_tokens, context
        self.decoder = tokenizer.stream_decoder()
        self.stops = StopStrings(list(request.stop))
        self.eos = set(eos_ids)
        self.done = request.max_tokens == 0
        self.stats.stop_reason = "max_tokens"

    def add(self, token: int) -> str:
        if token in self.eos:
            self.stats.stop_reason, self.done = "eos", True
            return ""
        self.history.append(token)
        self.stats.generated_ids.append(token)
        piece = self.stops.feed(self.decoder.add(token))
        if self.stops.stopped:
            self.stats.stop_reason, self.done = "stop string", True
        elif len(self.history) >= self.context:
            self.stats.stop_reason, self.done = "context full", True
        elif len(self.stats.generated_ids) >= self.max_tokens:
            self.done = True
        return piece

    def finish(self) -> str:
        if self.stops.stopped:
            return ""
        return self.stops.feed(self.decoder.flush()) + self.stops.flush()


def generate_text(model, tokenizer: Tokenizer, request: Request, *, eos_ids, start_pos: int = 0,
                  threads: ThreadTuner | None = None):
    """Yield text pieces as tokens arrive. `model` is a Transformer whose KV cache (slot 0)
    already holds the prompt's first start_pos ids (the caller may reuse a cached prefix); the
    rest is prefilled here. Each decode step runs through `threads` (the thread count that suits
    the machine's load)."""
    stats = request.stats
    threads = threads or ThreadTuner()
    threads.begin()

    started, compiling = time.perf_counter(), CompileWatch(stats)
    todo = np.asarray(request.prompt_ids[start_pos:], dtype=np.int64)
    with tqdm(total=len(todo), desc="prompt", unit="tok", leave=False,
              disable=len(todo) <= 4 * model.batch_size or None) as bar:
        logits = model.prefill(todo, start_pos, progress=bar.update)
    stats.prompt_tokens = len(todo)
    stats.prompt_seconds = time.perf_counter() - started - compiling.count()

    started = time.perf_counter()
    sequence = Sequence(tokenizer, request, eos_ids, model.context_length)
    while not sequence.done:
        piece = sequence.add(request.sampler(logits, sequence.history))
        if piece:
            yield piece
        if not sequence.done:
            token = np.asarray(sequence.history[-1:], dtype=np.int64)
            logits = threads.step(model.forward, token, len(sequence.history) - 1)
    tail = sequence.finish()
    if tail:
        yield tail
    stats.generate_seconds = time.perf_counter() - started - compiling.count()


class CompileWatch:
    """Moves the time spent compiling kernels since the last count into stats.compile_seconds."""

    def __init__(self, stats: Stats):
        self.stats = stats
        self.seconds, self.kernels = COMPILE_LOG.seconds, len(COMPILE_LOG.compiled)

    def count(self) -> float:
        seconds = COMPILE_LOG.seconds - self.seconds
        self.stats.compile_seconds += seconds
        self.stats.compiled_kernels += len(COMPILE_LOG.compiled) - self.kernels
        self.seconds, self.kernels = COMPILE_LOG.seconds, len(COMPILE_LOG.compiled)
        return seconds
