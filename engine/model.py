"""The forward pass: one implementation for every supported architecture, driven by ModelConfig.

Differences between Qwen2 and Llama are config, not code: q/k/v (and o) biases, rope scaling,
tied embeddings. All buffers and the KV cache are allocated once, in `Transformer.__init__`;
`forward` only fills them. Every matrix product goes through `kernels.formats.matmul`, so a
new weight format never touches this file.
"""
import time
from dataclasses import dataclass

import numpy as np

from .kernels.attention import KVCache
from .kernels.compiler import CompileAhead, recorded_calls
from .kernels.formats import Activations, IntegerScratch, Weight, embedding_rows, matmul
from .kernels.layout import TOKEN_TILE
from .kernels.ops import rmsnorm, rope, swiglu

from .config import ModelConfig
from .errors import EngineError
from .profile import Profile
from .weights import stand_in_weights


@dataclass
class Layer:
    attn_norm: np.ndarray
    q: Weight
    k: Weight
    v: Weight
    o: Weight
    q_bias: np.ndarray | None
    k_bias: np.ndarray | None
    v_bias: np.ndarray | None
    o_bias: np.ndarray | None
    mlp_norm: np.ndarray
    gate: Weight
    up: Weight
    down: Weight


class NonFinite(Exception):
    """A kernel's output holds NaN or infinity; the message says which kernel and weight."""


class Kernels:
    """The kernels the forward pass calls, by role (matmuls are also told which weight they read).

    Plain, it holds the kernels themselves. With a profile, each is wrapped to time its calls
    (engine/profile.py). With check (only to diagnose NaN or infinite values), each checks its
    output and raises NonFinite naming the first kernel and weight whose output is not finite.
    weight_names: {id(array or Weight): name}."""

    def __init__(self, cache: KVCache, weight_names: dict | None = None, profile: Profile | None = None,
                 check: bool = False):
        self.embedding_rows, self.rmsnorm, self.rope, self.swiglu = embedding_rows, rmsnorm, rope, swiglu
        self.matmul, self.store, self.attend = matmul, cache.store, cache.attend
        self.checking = check
        names = weight_names or {}
        if profile is not None:
            self._time(profile, names, cache)
        if check:
            self._check(names)

    def _time(self, profile: Profile, names: dict, cache: KVCache) -> None:
        def weight_label(weight: Weight, *_, **__):
            return f"matmul {names.get(id(weight), 'other')} ({weight.format.name})", weight.nbytes
        self.matmul = profile.timed(matmul, weight_label)
        self.embedding_rows = profile.timed(embedding_rows, lambda *a: ("embedding lookup", 0))
        self.rmsnorm = profile.timed(rmsnorm, lambda *a: ("rmsnorm", 0))
        self.rope = profile.timed(rope, lambda *a: ("rope", 0))
        self.swiglu = profile.timed(swiglu, lambda *a: ("swiglu", 0))
        self.store = profile.timed(cache.store, lambda *a: (f"kv cache store ({cache.kind})", 0))
        self.attend = profile.timed(cache.attend, lambda *a: (f"attention ({cache.kind})", 0))

    def _check(self, names: dict) -> None:
        def checked(kernel, output: int, label):
            def call(*args, **kwargs):
                kernel(*args, **kwargs)
                if not np.isfinite(args[output]).all():
                    raise NonFinite(label(*args))
            return call

        def weight(array):
            return names.get(id(array), "a weight")
        self.embedding_rows = checked(embedding_rows, 2, lambda w, *_: f"the embedding rows of {weight(w)}")
        self.rmsnorm = checked(rmsnorm, 3, lambda x, w, *_: f"the RMSNorm with {weight(w)}")
        self.matmul = checked(matmul, 2, lambda w, *_: f"the product with {weight(w)}")
        self.rope = checked(rope, 0, lambda *_: "the rotary embedding")
        self.swiglu = checked(swiglu, 2, lambda *_: "SwiGLU")
        self.attend = checked(self.attend, 4, lambda layer, *_: f"the attention of layer {layer}")


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies per rotary pair, with Llama 3 scaling if the config asks for it.

    Computed in float32 like the reference, so that positions far into the context agree.
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
    if config.rope_freq_factors is not None:   # Llama 3 scaling as stored in GGUF
        return (inv_freq / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3: keep high frequencies, divide low frequencies by `factor`, blend in between.
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, blended, scaled).astype(np.float32)


def rope_tables(config: ModelConfig, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of shape (positions, head_dim/2)."""
    angles = np.arange(positions, dtype=np.float32)[:, None] * rope_frequencies(config)[None, :]
    angles = angles.astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class Transformer:
    """A decoder-only transformer with its KV cache and activation buffers.

    `forward(ids, start_pos)` runs one sequence's tokens at positions start_pos... (in slot 0 of
    the KV cache) and returns logits; the caller (generation loop) owns the position bookkeeping.
    `step(ids, slots, positions)` is the same pass over rows of several sequences, each row
    naming its cache slot and position: the server's batched decoding (engine/batching.py). Every
    kernel treats rows independently, so a sequence's logits do not depend on what else is in
    the batch.
    """

    def __init__(self, config: ModelConfig, weights: dict, context_length: int, batch_size: int = 128,
                 kv_cache: str = "f16", slots: int = 1):
        c = config
        self.config = c
        self.context_length = context_length
        self.batch_size = batch_size
        self.embed = weights["model.embed_tokens.weight"]
        self.final_norm = weights["model.norm.weight"]
        self.lm_head = self.embed if c.tie_word_embeddings else weights["lm_head.weight"]
        self.layers = []
        for i in range(c.num_layers):
            w = {name.removeprefix(f"model.layers.{i}."): value for name, value in weights.items()
                 if name.startswith(f"model.layers.{i}.")}
            self.layers.append(Layer(
                attn_norm=w["input_layernorm.weight"],
                q=w["self_attn.q_proj.weight"], k=w["self_attn.k_proj.weight"],
                v=w["self_attn.v_proj.weight"], o=w["self_attn.o_proj.weight"],
                q_bias=w.get("self_attn.q_proj.bias"), k_bias=w.get("self_attn.k_proj.bias"),
                v_bias=w.get("self_attn.v_proj.bias"), o_bias=w.get("self_attn.o_proj.bias"),
                mlp_norm=w["post_attention_layernorm.weight"],
                gate=w["mlp.gate_proj.weight"], up=w["mlp.up_proj.weight"], down=w["mlp.down_proj.weight"],
            ))
        self.cos, self.sin = rope_tables(c, context_length)

        self.cache = KVCache(kv_cache, c.num_layers, c.num_kv_heads, context_length, c.head_dim, slots)

        def buffer(width):
            return np.zeros((batch_size, width), np.float32)
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.x, self.h, self.tmp = buffer(c.hidden_size), buffer(c.hidden_size), buffer(c.hidden_size)
        self.q, self.att = buffer(q_dim), buffer(q_dim)
        self.k, self.v = buffer(kv_dim), buffer(kv_dim)
        self.gate, self.up, self.act = (buffer(c.intermediate_size) for _ in range(3))
        # a row of logits per slot: a prompt's worth (128 x 151936 floats, 78 MB) only when asked for
        self.logits = np.zeros((slots, c.vocab_size), np.float32)
        self.scratch = IntegerScratch(batch_size)   # the matmuls' integer activations
        self.slot_ids = [[] for _ in range(slots)]   # per slot, the tokens whose keys and values it holds
        self.profile = None
        self.kernels = Kernels(self.cache)
        self.tensor_names = {id(value): name for name, value in weights.items()}

    def kernel_calls(self) -> list:
        """(kernel, argument types) of every kernel the forward pass calls, from a pass over a tile
        of tokens (kernels.layout.TOKEN_TILE) and then one token, in which every kernel not yet
        compiled does nothing (milliseconds)."""
        cached_ids = [list(ids) for ids in self.slot_ids]
        positions = min(TOKEN_TILE + 1, self.context_length)
        with recorded_calls() as calls:
            for start, n in ((0, positions - 1), (positions - 1, 1)):
                if n:
                    self.step(np.zeros(n, np.int64), np.zeros(n, np.int64), np.arange(start, start + n),
                              np.array([n - 1]))
        self.slot_ids = cached_ids   # (the cache's values at these positions are rewritten before use)
        return list(calls)

    def compile_kernels(self) -> None:
        """Compile every kernel the forward pass calls (or load it from numba's cache) now, not
        one by one as the first prompt meets them: in two processes on a first run
        (kernels.compiler.CompileAhead). `load` starts that earlier, from a stand-in model of the
        same formats; this then finds nothing left to do."""
        CompileAhead(self.kernel_calls()).finish()

    def start_profile(self) -> Profile:
        """Time every kernel call from now on (see engine/profile.py); returns the profile."""
        names = {id(self.lm_head): "lm_head"}
        for layer in self.layers:
            names.update({id(layer.q): "q_proj", id(layer.k): "k_proj", id(layer.v): "v_proj",
                          id(layer.o): "o_proj", id(layer.gate): "gate_proj", id(layer.up): "up_proj",
                          id(layer.down): "down_proj"})
        self.profile = Profile()
        self.kernels = Kernels(self.cache, names, self.profile)
        return self.profile

    @property
    def slots(self) -> int:
        """Sequences the KV cache holds at once."""
        return len(self.slot_ids)

    @property
    def cached_ids(self) -> list:
        """The tokens in slot 0, the one `forward` uses, in order."""
        return self.slot_ids[0]

    def forward(self, ids: np.ndarray, start_pos: int, all_logits: bool = False) -> np.ndarray:
        """Run one sequence's ids (at most batch_size) at positions start_pos... of slot 0.

        Returns the last token's logits (vocab,), a view of an internal buffer valid until the
        next call, or, with all_logits, every token's (n, vocab) in a new array.
        """
        n = len(ids)
        slots, positions = KVCache.rows(start_pos, n)
        logits = self.step(ids, slots, positions, np.arange(n) if all_logits else np.array([n - 1]))
        return logits if all_logits else logits[0]

    def step(self, ids: np.ndarray, slots: np.ndarray, positions: np.ndarray, logit_rows: np.ndarray) -> np.ndarray:
        """Run token rows ids[t] at positions[t] of KV cache slots[t] (int64 arrays, at most
        batch_size rows; a slot's rows in order of position); return the logits of the rows
        listed in logit_rows, shape (len(logit_rows), vocab): a view of an internal buffer valid
        until the next call when they fit it (one row per slot), else a new array."""
        c = self.config
        n = len(ids)
        if not 0 < n <= self.batch_size or len(logit_rows) > n:
            raise ValueError(f"a forward pass takes 1 to {self.batch_size} tokens and some of their rows' logits")
        self.cache.check_rows(n, slots, positions)   # before rope reads its tables at the positions
        x, h, tmp = self.x[:n], self.h[:n], self.tmp[:n]
        q, k, v, att = self.q[:n], self.k[:n], self.v[:n], self.att[:n]
        gate, up, act = self.gate[:n], self.up[:n], self.act[:n]
        # the same buffers seen per head (views: rope, the cache and the attention read them so)
        q_heads, att_heads = q.reshape(n, c.num_heads, c.head_dim), att.reshape(n, c.num_heads, c.head_dim)
        k_heads, v_heads = k.reshape(n, c.num_kv_heads, c.head_dim), v.reshape(n, c.num_kv_heads, c.head_dim)

        for token, slot, position in zip(ids.tolist(), slots.tolist(), positions.tolist()):
            cached = self.slot_ids[slot]
            del cached[position:]
            cached.append(token)
        started = time.perf_counter()
        if self.profile:
            self.profile.phase = "prompt" if n > 1 else "generation"
        run = self.kernels
        embedding_rows, rmsnorm, rope, swiglu, matmul = (run.embedding_rows, run.rmsnorm, run.rope,
                                                         run.swiglu, run.matmul)
        embedding_rows(self.embed, ids, x)
        for i, layer in enumerate(self.layers):
            # attention block
            rmsnorm(x, layer.attn_norm, c.rms_norm_eps, h)
            shared = Activations(h, self.scratch)   # quantized once for q, k and v
            matmul(layer.q, shared, q)
            matmul(layer.k, shared, k)
            matmul(layer.v, shared, v)
            if c.qkv_bias:
                q += layer.q_bias
                k += layer.k_bias
                v += layer.v_bias
            rope(q_heads, self.cos, self.sin, positions, c.rope_interleaved)
            rope(k_heads, self.cos, self.sin, positions, c.rope_interleaved)
            run.store(i, k_heads, v_heads, slots, positions)
            run.attend(i, q_heads, slots, positions, att_heads)
            matmul(layer.o, Activations(att, self.scratch), tmp)
            if c.o_bias:
                tmp += layer.o_bias
            x += tmp
            # feed-forward block: down(silu(gate(h)) * up(h))
            rmsnorm(x, layer.mlp_norm, c.rms_norm_eps, h)
            shared = Activations(h, self.scratch)   # quantized once for gate and up
            matmul(layer.gate, shared, gate)
            matmul(layer.up, shared, up)
            swiglu(gate, up, act)
            matmul(layer.down, Activations(act, self.scratch), tmp)
            x += tmp

        m = len(logit_rows)
        logits = self.logits[:m] if m <= len(self.logits) else np.empty((m, c.vocab_size), np.float32)
        if m:   # (a prompt chunk before the last one needs none)
            rmsnorm(np.take(x, logit_rows, axis=0, out=tmp[:m]), self.final_norm, c.rms_norm_eps, h[:m])
            matmul(self.lm_head, Activations(h[:m], self.scratch), logits)
        if self.profile:
            self.profile.forward_done(n, time.perf_counter() - started)
        # NaN or infinity stays in the residual stream (numpy's adds), where the fast-math
        # kernels after it could turn it into finite garbage: checked there, and in the logits
        # (by their sums, which are NaN or infinite if any value is, and need no new array)
        if not (np.isfinite(x.sum()) and np.isfinite(logits.sum())):
            raise self._non_finite(ids, slots, positions, logit_rows)
        return logits

    def _non_finite(self, ids, slots, positions, logit_rows) -> EngineError:
        """Logits with NaN or infinity come from damaged weights (or a mislabelled tensor type):
        an error that says where they first appear, found by running the same step again with
        every kernel's output checked, instead of an answer sampled from garbage."""
        if self.kernels.checking:
            raise NonFinite("the residual stream (every kernel's output was finite)")
        saved, self.kernels = self.kernels, Kernels(self.cache, self.tensor_names, check=True)
        try:
            self.step(ids, slots, positions, logit_rows)
            where = "the logits"
        except NonFinite as e:
            where = str(e)
        finally:
            self.kernels = saved
        return EngineError(f"the model computed NaN or infinite values, first in {where}: its weights are damaged "
                           f"or a tensor's type is mislabelled in the file")

    def prefill(self, ids: np.ndarray, start_pos: int = 0, progress=None, all_logits: bool = False) -> np.ndarray:
        """Run any number of tokens in chunks of batch_size; returns the last (or all) logits."""
        outputs = []
        for begin in range(0, len(ids), self.batch_size):
            chunk = ids[begin:begin + self.batch_size]
            logits = self.forward(chunk, start_pos + begin, all_logits)
            outputs.append(logits)
            if progress is not None:
                progress(len(chunk))
        return np.concatenate(outputs) if all_logits else outputs[-1]


def stand_in_calls(config: ModelConfig, tensors: dict, formats: dict, kv_cache: str) -> list | None:
    """The kernel calls (Transformer.kernel_calls) of the model whose tensors these are, from a
    stand-in of the same formats (weights.stand_in_weights), before its weights are read; None
    when the tensors do not name every weight (load_weights then says what is wrong)."""
    try:
        small, weights = stand_in_weights(config, tensors, formats)
    except (KeyError, ValueError):
        return None
    return Transformer(small, weights, context_length=TOKEN_TILE + 1, kv_cache=kv_cache).kernel_calls()
