"""A native LLM inference engine: DeepSeek-R1 distills (Qwen2 and Llama) on the CPU.

    import engine
    llm = engine.load("deepseek-r1:1.5b")          # or a directory, or a Hugging Face repo id
    print(llm.generate("Why is the sky blue?", max_tokens=200))
    for piece in llm.generate("Tell me a story", stream=True):
        print(piece, end="", flush=True)

`load` resolves the name to files, reads the config and the memory-mapped weights, checks them,
and builds the Transformer with its KV cache. `LLM` ties model, tokenizer and sampler together.
"""
import os
import time
from dataclasses import replace

import numpy as np

# The kernels are the repository's top-level kernels/ folder, imported as engine.kernels: an
# installed wheel holds them at engine/kernels (pyproject.toml maps the folder there); a source
# checkout, editable install included, finds them beside this package. Never as a top-level
# `kernels`: that is Hugging Face's package, which transformers imports.
if not os.path.isdir(os.path.join(__path__[0], "kernels")):
    __path__.append(os.path.dirname(__path__[0]))

from .kernels.attention import KV_KINDS
from .kernels.compiler import CompileAhead, available_threads, start_helper

from .config import ModelConfig
from .errors import EngineError
from .generation import CompileWatch, Request, Stats, check_request, common_prefix, generate_text
from .model import Transformer, stand_in_calls
from .quantize import check_quant, quantize_weights
from .resolve import resolve
from .sampler import OLLAMA_DEFAULTS, Sampler, SamplerSettings, describe, layered_settings
from .source import open_source
from .tokenizer import Tokenizer
from .threads import ThreadTuner
from .weights import load_weights

# the ollama-shaped API, over load and LLM (`list` is engine.list, through __getattr__ below, so
# that this module's own code keeps the builtin)
from .surfaces.api import chat, delete, generate, ps, pull, show   # noqa: E402

__all__ = ["load", "load_tokenizer", "LLM", "EngineError", "ModelConfig", "SamplerSettings", "chat", "generate",
           "list", "show", "ps", "pull", "delete"]


def __getattr__(name: str):
    if name == "list":
        from .surfaces.api import list_models
        return list_models
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

DEFAULT_CONTEXT = 4096
MAX_PARALLEL = 64   # sequences decoded together (a batch step's rows stay well within batch_size)


def check_threads(threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= available_threads()):
        raise EngineError(f"threads must be an integer from 1 to {available_threads()}, got {threads!r}")


def check_context_length(context_length) -> None:
    if context_length is not None and (isinstance(context_length, bool) or not isinstance(context_length, int)
                                       or context_length < 2):
        raise EngineError(f"the context length (--ctx, context_length=) must be an integer of at least 2, "
                          f"got {context_length!r}")


def available_memory() -> int:
    """Bytes of memory the system can give without swapping (Linux's MemAvailable)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_context_memory(config: ModelConfig, context_length: int, kv_cache: str, parallel: int = 1) -> None:
    """The KV cache and rope tables of a context are allocated at load, before they are used
    (untouched pages cost nothing until then, so an oversized one would fail only halfway
    through a long answer): check now that the machine has the memory."""
    per_position = (config.num_layers * KV_KINDS[kv_cache].bytes_per_position(config.num_kv_heads, config.head_dim)
                    + config.head_dim * 8)   # cos and sin tables, float64 while computed
    needed, available = per_position * context_length * parallel, available_memory()
    if needed > available:
        fits = max(available // (per_position * parallel), 0)
        times = f" x {parallel} parallel sequences" if parallel > 1 else ""
        raise EngineError(f"a context of {context_length} positions{times} needs {needed / 1e9:.1f} GB for its "
                          f"{kv_cache} KV cache, and this machine has {available / 1e9:.1f} GB available: use a "
                          f"smaller context (--ctx on the command line, context_length= in engine.load; at most "
                          f"about {fits} here){' or fewer parallel sequences' if parallel > 1 else ''}")


def load_tokenizer(model: str) -> Tokenizer:
    """Only the tokenizer (and chat template) of a model: no weights are read or downloaded."""
    return open_source(resolve(str(model), tokenizer_only=True).path, tokenizer_only=True).tokenizer


def read_model(path) -> tuple[ModelConfig, Tokenizer, dict]:
    """Config, tokenizer and checked weights of a model directory or GGUF file."""
    source = open_source(path)
    config = source.config
    tokenizer = checked_tokenizer(source.tokenizer, config)
    return config, tokenizer, load_weights(config, *source.tensors(), source.weight_cache())


def checked_tokenizer(tokenizer: Tokenizer, config: ModelConfig) -> Tokenizer:
    """Every id the tokenizer can produce must have a row in the model's embedding."""
    if tokenizer.vocab_size > config.vocab_size:
        raise EngineError(f"the tokenizer has {tokenizer.vocab_size} tokens, but the model's embedding only "
                          f"{config.vocab_size} rows: they do not belong together")
    return tokenizer


def load(model: str, *, context_length: int | None = None, threads: int | None = None, quant: str | None = None,
         kv_cache: str = "f16", parallel: int = 1) -> "LLM":
    """Load a model: a directory, a .gguf file, an Ollama NAME:TAG, an alias (deepseek-r1:7b) or a repo id.

    context_length: positions in the KV cache (default: the model's maximum, capped at 4096).
    threads: worker threads for the kernels (default: all cores, fewer while other processes keep
        cores busy; see engine/threads.py).
    quant: "q8_0" or "q4_0" to quantize a float checkpoint while loading.
    kv_cache: "f16" (default), "q8_0" or "f32" storage for the KV cache.
    parallel: sequences the KV cache holds at once, each with its own context_length (for
        batched decoding: engine/batching.py; `generate` uses the first).
    """
    started, load_stats = time.perf_counter(), Stats()
    compiling = CompileWatch(load_stats)
    check_threads(threads)
    tuner = ThreadTuner(threads)   # from now on it sees what other processes use
    if quant is not None:
        check_quant(quant)
    if kv_cache not in KV_KINDS:
        raise EngineError(f"unknown KV cache type {kv_cache!r}; supported: {', '.join(KV_KINDS)}")
    check_context_length(context_length)
    if isinstance(parallel, bool) or not isinstance(parallel, int) or not 1 <= parallel <= MAX_PARALLEL:
        raise EngineError(f"parallel must be an integer from 1 to {MAX_PARALLEL}, got {parallel!r}")
    resolved = resolve(str(model))
    start_helper()   # on a first run, a second process that compiles kernels meanwhile (see below)
    source = open_source(resolved.path)
    config = source.config
    if kv_cache == "q8_0" and config.head_dim % 32:
        raise EngineError(f"a q8_0 KV cache needs head_dim to be a multiple of 32; this model's is {config.head_dim}")
    tensors, formats = source.tensors()
    # the kernels start compiling now, listed by a stand-in of the same formats, while the real
    # weights are read and repacked (quantizing while loading changes the formats: listed after)
    calls = stand_in_calls(config, tensors, formats, kv_cache) if quant is None else None
    ahead = CompileAhead(calls) if calls is not None else None
    try:
        tokenizer = checked_tokenizer(source.tokenizer, config)
        weights = load_weights(config, tensors, formats, source.weight_cache())
        if quant is not None:
            weights = quantize_weights(weights, quant)
        options = dict(resolved.options)
        default_stop = options.pop("stop", [])
        default_stop = [default_stop] if isinstance(default_stop, str) else list(default_stop)
        model_context = options.pop("context_length", None)   # Ollama's num_ctx
        if context_length is None:
            context_length = model_context or min(config.max_position_embeddings, DEFAULT_CONTEXT)
            check_context_length(context_length)
        check_context_memory(config, context_length, kv_cache, parallel)
        transformer = Transformer(config, weights, context_length, kv_cache=kv_cache, slots=parallel)
    except BaseException:
        if ahead is not None:
            ahead.abandon()
        raise
    if ahead is not None:
        ahead.finish()
    else:
        transformer.compile_kernels()
    load_stats.load_seconds = time.perf_counter() - started - compiling.count()
    return LLM(config, tokenizer, transformer, sampler_options=options, stop=default_stop, source=resolved.source,
               threads=tuner, load_stats=load_stats)


class LLM:
    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, model: Transformer,
                 sampler_options: dict | None = None, stop: list | None = None, source: str = "",
                 threads: ThreadTuner | None = None, load_stats: Stats | None = None):
        self.config = config
        self.threads = threads or ThreadTuner()
        self.tokenizer = tokenizer
        self.model = model
        self.load_stats = load_stats or Stats()   # the load's times, reported with the first generation
        self.source = source   # where the model came from, for the user
        self.default_stop = list(stop or [])
        self.sampler_layers = [("Ollama's default", OLLAMA_DEFAULTS),
                               (config.generation_source, config.generation_defaults),
                               ("Ollama's params layer", sampler_options)]
        self.sampler_defaults, _ = layered_settings(self.sampler_layers)
        eos = set(config.eos_token_ids)
        eos_token = tokenizer.token_id(tokenizer.special_tokens.get("eos_token"))
        if eos_token is not None:
            eos.add(eos_token)
        self.eos_ids = sorted(eos)
        self.last_stats = Stats()

    # --- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of plain text, with the special tokens the tokenizer adds (e.g. BOS)."""
        return self.tokenizer.encode(text)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise EngineError("token ids must be a non-empty list of integers")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if len(bad):
            raise EngineError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if len(ids) > self.model.context_length:
            raise EngineError(f"{len(ids)} tokens do not fit in the context of {self.model.context_length}: load the "
                              f"model with a larger context (--ctx on the command line, context_length= in "
                              f"engine.load)")
        return ids

    def logits(self, ids) -> np.ndarray:
        """Logits of every position, shape (len(ids), vocab), computed in a fresh context."""
        ids = self._check_ids(ids)
        return self.model.prefill(ids, 0, all_logits=True)

    # --- text -----------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | list, raw: bool = False) -> list[int]:
        """Ids for a prompt: plain text (raw), one user message, or a list of chat messages."""
        if raw:
            if not isinstance(prompt, str):
                raise EngineError("a raw prompt must be a string")
            return self.tokenizer.encode(prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.tokenizer.encode_chat(messages)

    def generate(self, prompt: str | list, *, max_tokens: int = 512, stop: list[str] | None = None, raw: bool = False,
                 stream: bool = False, **sampler_options):
        """Generate a reply to a prompt (text as one user message, or a list of chat messages).

        sampler_options: temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
        presence_penalty, frequency_penalty, seed (None values keep the defaults: Ollama's params
        layer, then the model's own, then Ollama's defaults; `last_stats.sampling` says which).
        Returns the text, or with stream=True an iterator of text pieces.
        """
        return self.generate_ids(self.prompt_ids(prompt, raw), max_tokens=max_tokens, stop=stop, stream=stream,
                                 **sampler_options)

    def generate_ids(self, ids, *, max_tokens: int = 512, stop: list[str] | None = None, stream: bool = False,
                     **sampler_options):
        """Generate from prompt token ids (a chat already rendered and tokenized, for example);
        the options are generate's. Everything is checked now, not at the first piece."""
        request = self.request(ids, max_tokens=max_tokens, stop=stop, **sampler_options)
        # Reuse the cached prefix (a chat's earlier turns); the last prompt token is always rerun.
        common = common_prefix(self.model.cached_ids, request.prompt_ids[:-1])
        request.stats = self.last_stats = replace(self.load_stats, sampling=request.stats.sampling)
        self.load_stats = Stats()   # reported once, with the first generation
        pieces = generate_text(self.model, self.tokenizer, request, eos_ids=self.eos_ids, start_pos=common,
                               threads=self.threads)
        return pieces if stream else "".join(pieces)

    def request(self, ids, *, max_tokens: int = 512, stop: list[str] | None = None, **sampler_options) -> Request:
        """A checked generation request from prompt ids and generate's options (for generate_ids,
        or for the batched decoding of engine/batching.py)."""
        settings, sources = layered_settings([*self.sampler_layers, ("this request", sampler_options)])
        sampler = Sampler(settings)
        check_request(len(ids), self.model.context_length, max_tokens)
        ids = [int(i) for i in self._check_ids(ids)]
        return Request(ids, sampler, max_tokens, list(self.default_stop if stop is None else stop),
                       Stats(sampling=describe(settings, sources)))
