"""A Python API shaped like the `ollama` package, running on this engine in-process: chat,
generate, list, show, ps, pull, delete.

    import engine as ollama
    r = ollama.chat(model="deepseek-r1:1.5b", messages=[{"role": "user", "content": "Why is the sky blue?"}])
    print(r["message"]["content"])          # or r.message.content; r.message.thinking holds the reasoning
    for chunk in ollama.chat(model=..., messages=..., stream=True):
        print(chunk.message.content, end="", flush=True)

Responses carry the fields of the `ollama` package's ChatResponse and GenerateResponse (durations
in nanoseconds, the statistics on the last chunk) and read both as dicts and as attributes.
Options use Ollama's names. A model stays loaded between calls for `keep_alive` (default five
minutes; 0 releases it after the call, a negative value keeps it), as Ollama's server does.
"""
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from .. import library
from ..batching import DEFAULT_MAX_QUEUE, Batcher, Job
from ..errors import EngineError
from ..resolve import OLLAMA_OPTIONS, resolve
from ..source import capabilities, open_source
from ..thinking import CLOSING, OPENING, ThinkingParser
from ..tokenizer import chat_messages

DEFAULT_KEEP_ALIVE = 300.0   # seconds, as Ollama
# Ollama's option names -> (where it goes, our name): the names a Modelfile's params layer may set
# (resolve.OLLAMA_OPTIONS), and two that only a request sets; each goes to the sampler unless
# it is the generation's or the load's
NOT_SAMPLER = {"stop": "generation", "max_tokens": "generation", "context_length": "load", "threads": "load"}
OPTIONS = {name: (NOT_SAMPLER.get(ours, "sampler"), ours)
           for name, ours in {**OLLAMA_OPTIONS, "num_predict": "max_tokens", "num_thread": "threads"}.items()}
DEFAULT_NUM_PREDICT = 512
EMPTY_THINKING = f"{OPENING}\n\n{CLOSING}\n\n"   # what the model is given instead of reasoning (think=False)


class Record(dict):
    """A dict whose keys also read as attributes: r["message"]["content"] is r.message.content."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# --- options and keep_alive ------------------------------------------------------------------

def split_options(options) -> dict[str, dict]:
    """Ollama's options by where they apply: {"sampler": ..., "generation": ..., "load": ...}."""
    if options is None:
        options = {}
    elif hasattr(options, "model_dump"):   # the ollama package's Options object
        options = options.model_dump(exclude_none=True)
    if not isinstance(options, dict):
        raise EngineError(f"options must be an object of Ollama's option names, not {type(options).__name__}")
    out = {"sampler": {}, "generation": {}, "load": {}}
    for name, value in options.items():
        if name not in OPTIONS:
            raise EngineError(f"unknown option {name!r}; supported: {', '.join(OPTIONS)}")
        where, ours = OPTIONS[name]
        if value is not None:
            out[where][ours] = value
    stop = out["generation"].get("stop")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise EngineError(f"option 'stop' must be a list of strings, got {stop!r}")
    predict = out["generation"].get("max_tokens")
    if predict is not None:
        if isinstance(predict, bool) or not isinstance(predict, int):
            raise EngineError(f"option 'num_predict' must be an integer, got {predict!r}")
        out["generation"]["max_tokens"] = 10**9 if predict < 0 else predict   # -1: until the context is full
    return out


DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(keep_alive) -> float:
    """Ollama's keep_alive: seconds as a number, or a duration such as "5m", "1h30m", "-1"."""
    if keep_alive is None:
        return DEFAULT_KEEP_ALIVE
    if isinstance(keep_alive, (int, float)) and not isinstance(keep_alive, bool):
        return float(keep_alive)
    if isinstance(keep_alive, str):
        text = keep_alive.strip()
        try:
            return float(text)
        except ValueError:
            pass
        parts = DURATION.findall(text)
        if parts and "".join(number + unit for number, unit in parts) == text.replace(" ", ""):
            return sum(float(number) * UNITS[unit] for number, unit in parts)
    raise EngineError(f"keep_alive must be a number of seconds or a duration such as '5m', got {keep_alive!r}")


# --- loaded models -----------------------------------------------------------------------------

@dataclass
class Loaded:
    llm: object
    load_options: dict
    batcher: Batcher
    expires: float = float("inf")
    active: int = 0   # generations (and interactive sessions) using it now: it stays loaded meanwhile


class ModelRegistry:
    """The models kept in memory between calls, each released when its keep_alive runs out and no
    generation uses it. Each has a Batcher (engine/batching.py) that runs its generations,
    `parallel` at a time (a server sets it; one for the in-process API). Loads happen one at a
    time: a second request for a model being loaded waits for that load instead of loading it
    again."""

    def __init__(self, parallel: int = 1, max_queue: int = DEFAULT_MAX_QUEUE):
        self.models: dict[str, Loaded] = {}
        self.lock = threading.Lock()
        self.loading = threading.Lock()
        self.parallel, self.max_queue = parallel, max_queue
        self.defaults = {}   # load options a request's options override (a server's --ctx, --threads)

    def acquire(self, name: str, load_options: dict) -> tuple[Loaded, float]:
        """The loaded model (loading it, or reloading it with other load options), and the seconds
        its loading took now (0 when it was already loaded). Pair with `done`."""
        from .. import load
        self.release_expired()
        loaded = self._use_loaded(name, load_options)
        if loaded is not None:
            return loaded, 0.0
        with self.loading:
            loaded = self._use_loaded(name, load_options)   # loaded while this one waited
            if loaded is not None:
                return loaded, 0.0
            started = time.perf_counter()
            llm = load(name, parallel=self.parallel, **{**self.defaults, **load_options})
            loaded = Loaded(llm, dict(load_options), Batcher(llm, self.max_queue), active=1)
            with self.lock:
                replaced = self.models.get(name)
                self.models[name] = loaded
            if replaced is not None:   # other load options: its generations finish, then it goes
                replaced.batcher.close(wait=False)
        return loaded, time.perf_counter() - started

    def _use_loaded(self, name: str, load_options: dict) -> Loaded | None:
        with self.lock:
            loaded = self.models.get(name)
            if loaded is not None and loaded.load_options == load_options:
                loaded.active += 1
                return loaded
        return None

    def keep(self, name: str, load_options: dict):
        """The model loaded and kept until released by hand (an interactive session's, which runs
        it directly, not through its batcher)."""
        loaded, _ = self.acquire(name, load_options)
        self.done(loaded, -1)
        return loaded.llm

    def done(self, loaded: Loaded, keep_alive: float) -> None:
        with self.lock:
            loaded.active -= 1
            loaded.expires = float("inf") if keep_alive < 0 else time.monotonic() + keep_alive
        if keep_alive == 0:
            self.release_expired()
        elif keep_alive > 0:
            timer = threading.Timer(keep_alive + 0.01, self.release_expired)
            timer.daemon = True
            timer.start()

    def release_expired(self) -> None:
        now = time.monotonic()
        with self.lock:
            for name, loaded in list(self.models.items()):
                if loaded.expires <= now and not loaded.active:
                    del self.models[name]
                    loaded.batcher.close(wait=False)

    def clear(self) -> None:
        """Release every model now (their batchers finish what they run)."""
        with self.lock:
            models, self.models = list(self.models.values()), {}
        for loaded in models:
            loaded.batcher.close(wait=False)

    def running(self) -> list[tuple[str, Loaded]]:
        self.release_expired()
        with self.lock:
            return list(self.models.items())


MODELS = ModelRegistry()


# --- prompts -----------------------------------------------------------------------------------

def render_chat(llm, messages: list[dict], think) -> tuple[str, bool]:
    """The chat's prompt text and whether it leaves the model inside a thinking block.
    think: None (the model's default: on when its template reasons), True or False."""
    capable = "thinking" in capabilities(llm.tokenizer)
    if think and not capable:
        raise EngineError(f"this model does not support thinking (its chat template has no {OPENING} block)")
    text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if capable and think is False:
        body = text.rstrip()
        if body.endswith(OPENING):   # the template opened the block itself: close it empty instead
            body = body[:-len(OPENING)]
        return body + EMPTY_THINKING, False
    return text, capable and text.rstrip().endswith(OPENING)


# --- chat and generate -------------------------------------------------------------------------

@dataclass
class Generation:
    """A generation submitted to its model's batcher: `job` delivers its text pieces, which
    `parser` splits into thinking and answer (`opened`: the prompt leaves the model inside a
    thinking block); `release` must follow."""
    job: Job | None            # None: an empty prompt, which only loads the model
    opened: bool
    loaded: Loaded
    keep_alive: float
    load_seconds: float
    started: float
    released: bool = False

    def __post_init__(self):
        self.parser = ThinkingParser(opened=self.opened)

    def release(self) -> None:
        """Cancel what is still running (a client that left early) and let the model expire."""
        if not self.released:
            self.released = True
            if self.job is not None:
                self.job.cancel()
            MODELS.done(self.loaded, self.keep_alive)

    def statistics(self) -> dict:
        """Ollama's fields of the last response (durations in nanoseconds)."""
        ns = 1e9
        times = {"total_duration": int((time.perf_counter() - self.started) * ns),
                 "load_duration": int(self.load_seconds * ns)}
        if self.job is None:
            return {"done_reason": "load", **times}
        stats = self.job.request.stats
        return {"done_reason": "length" if stats.stop_reason in ("max_tokens", "context full") else "stop", **times,
                "prompt_eval_count": stats.prompt_tokens, "prompt_eval_duration": int(stats.prompt_seconds * ns),
                "eval_count": stats.generated_tokens, "eval_duration": int(stats.generate_seconds * ns)}


def start(model: str, render, options, keep_alive, deliver=None) -> Generation:
    """Load the model (or find it loaded), render the prompt with `render(llm) -> (text, opened)`
    (None: an empty prompt, which only loads the model) and submit it to the model's batcher,
    whose events go to `deliver` (engine/batching.py's Job). Every check happens now. Blocks
    while the model loads."""
    if not isinstance(model, str) or not model:
        raise EngineError("model must be a model name")
    parts = split_options(options)
    keep = keep_alive_seconds(keep_alive)
    started = time.perf_counter()
    loaded, load_seconds = MODELS.acquire(model, parts["load"])
    try:
        llm = loaded.llm
        rendered = render(llm)
        job, opened = None, False
        if rendered is not None:
            text, opened = rendered
            ids = llm.tokenizer.encode(text, add_special_tokens=False)
            request = llm.request(ids, stop=parts["generation"].get("stop"),
                                  max_tokens=parts["generation"].get("max_tokens", DEFAULT_NUM_PREDICT),
                                  **parts["sampler"])
            job = loaded.batcher.submit(request, deliver)
    except BaseException:
        MODELS.done(loaded, keep)
        raise
    return Generation(job, opened, loaded, keep, load_seconds, started)


def _run(model: str, render, options, keep_alive, respond, stream: bool):
    """`start` a generation and make its responses with `respond(thinking, answer, done,
    statistics)`: a chunk per piece of text, then the last with the statistics (or, without
    streaming, one whole)."""
    generation = start(model, render, options, keep_alive)

    def split():
        """(thinking, answer) per piece of generated text, then what the parser held back."""
        try:
            if generation.job is not None:
                for piece in generation.job:
                    yield generation.parser.feed(piece)
                yield generation.parser.flush()
        finally:
            generation.release()

    if stream:
        def chunks():
            for thinking, answer in split():
                if thinking or answer:
                    yield respond(thinking, answer, False, {})
            yield respond("", "", True, generation.statistics())
        return chunks()
    whole = list(split())
    return respond("".join(t for t, _ in whole), "".join(a for _, a in whole), True, generation.statistics())


def chat_response(model: str):
    def respond(thinking, answer, done, statistics):
        return Record(model=model, created_at=_now(), done=done, **statistics,
                      message=Record(role="assistant", content=answer, thinking=thinking or None))
    return respond


def generate_response(model: str):
    def respond(thinking, answer, done, statistics):
        return Record(model=model, created_at=_now(), done=done, **statistics, response=answer,
                      thinking=thinking or None)
    return respond


def chat(model: str = "", messages=None, *, stream: bool = False, think=None, options=None, keep_alive=None,
         format=None, tools=None):
    """Ollama's chat: the assistant's next message (or, with stream=True, an iterator of chunks)."""
    if format not in (None, ""):
        raise EngineError("structured output (format) is not supported yet")
    if tools:
        raise EngineError("tools are not supported yet")
    checked = chat_messages(messages) if messages else []   # none: only load the model
    return _run(model, lambda llm: render_chat(llm, checked, think) if checked else None, options, keep_alive,
                chat_response(model), stream)


def generate(model: str = "", prompt: str = "", *, system: str | None = None, raw: bool = False,
             stream: bool = False, think=None, options=None, keep_alive=None, format=None):
    """Ollama's generate: a completion of `prompt` (as one user message, unless raw)."""
    if format not in (None, ""):
        raise EngineError("structured output (format) is not supported yet")
    return _run(model, generate_renderer(prompt, system, raw, think), options, keep_alive,
                generate_response(model), stream)


def generate_renderer(prompt: str, system: str | None, raw: bool, think):
    """generate's prompt as `start` renders it (checked now): the text itself when raw, else one
    user message after an optional system message; an empty prompt only loads the model."""
    if not isinstance(prompt, str):
        raise EngineError("prompt must be a string")
    if raw:
        if system is not None or think is not None:
            raise EngineError("raw prompts take no system message and no think setting")
        return lambda llm: (prompt, False) if prompt else None
    messages = chat_messages(([{"role": "system", "content": system}] if system is not None else [])
                             + [{"role": "user", "content": prompt}])
    return lambda llm: render_chat(llm, messages, think) if prompt else None


def ps() -> Record:
    """The models loaded now, as Ollama's `ps`."""
    models = []
    for name, loaded in MODELS.running():
        expires = None if loaded.expires == float("inf") else \
            datetime.fromtimestamp(time.time() + loaded.expires - time.monotonic(), timezone.utc).isoformat()
        models.append(Record(model=name, name=name, expires_at=expires,
                             context_length=loaded.llm.model.context_length))
    return Record(models=models)


# --- models by name ---------------------------------------------------------------------------

def list_models() -> Record:
    """The models on this machine, as Ollama's `list` (`engine.list`)."""
    return Record(models=[Record(model=m.name, name=m.name, modified_at=m.modified_at, size=m.size, digest=None,
                                 details=_details(m.details()))
                          for m in library.local_models()])


def show(model: str) -> Record:
    """What a model is, as Ollama's `show`: details, model_info, template, capabilities."""
    source = open_source(resolve(model).path)
    config, details = source.config, source.details()
    arch = config.architecture
    return Record(
        modelfile="", parameters="", license=None, modified_at=None,
        template=source.tokenizer.chat_template_source or "",
        details=_details(details),
        model_info={"general.architecture": arch, "general.parameter_count": details.parameters,
                    f"{arch}.context_length": config.max_position_embeddings,
                    f"{arch}.embedding_length": config.hidden_size, f"{arch}.block_count": config.num_layers,
                    f"{arch}.attention.head_count": config.num_heads,
                    f"{arch}.attention.head_count_kv": config.num_kv_heads},
        capabilities=list(capabilities(source.tokenizer)))


def _details(details) -> Record:
    """Ollama's ModelDetails from ours (None: the files could not tell)."""
    if details is None:
        return Record(parent_model="", format=None, family=None, families=None, parameter_size=None,
                      quantization_level=None)
    return Record(parent_model="", format=details.file_format.split()[0].lower(), family=details.family,
                  families=[details.family], parameter_size=details.parameter_size,
                  quantization_level=details.quantization)


def pull(model: str, *, stream: bool = False):
    """Download a model (Hugging Face's progress bars show on stderr), as Ollama's `pull`."""
    library.pull(model)
    done = Record(status="success")
    return iter([done]) if stream else done


def delete(model: str) -> Record:
    """Remove a downloaded model from the Hugging Face cache (never Ollama's), as Ollama's `delete`."""
    library.remove(model)
    return Record(status="success")
