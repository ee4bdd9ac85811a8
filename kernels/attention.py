"""The KV cache and causal grouped-query attention over it.

Layout per layer: (slots, kv_heads, positions, head_dim). A slot is one sequence's cache (the
server decodes several sequences in one forward pass, each in its own slot); within it one
head's keys are contiguous and a query streams through them in order. Each query row names its
slot and position, so one kernel serves a prompt (one slot, consecutive positions) and a batched
decode step (one row per slot, each at its own position) alike. Query head h reads KV head h // (heads / kv_heads):
grouped-query heads share the cache without copies.

Three storage kinds, one attention algorithm: it is written once, with two small functions that
read a cached key (dot product with the query) and a cached value (accumulate with a weight),
and inlined into one kernel per kind.
- f32: exact; used to check the forward pass against the reference to float32 precision.
- f16: half the memory; the default (as in llama.cpp).
- q8_0: int8 per block of 32 with a float32 scale per block: a quarter of f32.
"""
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numba import config, get_thread_id, njit, prange

from . import compiler  # noqa: F401  (numba's settings before any kernel is defined)
from .bits import f16_to_f32, f32_to_f16
from .ops import exp_f32
from .quant import QK, quantize_row


# A position whose score is more than 60 below the best gets weight 0, not e^-60 (1e-26 of the
# best one's weight: nothing in float32). Weights near e^-87 times values are denormal floats,
# and x86 cores take a microcode assist for every operation on one: with peaked scores (as in
# random-weight models, or attention sinks) a 2048-position decode step took 2.2 ms instead of 0.3.
NEGLIGIBLE_SCORE = np.float32(-60.0)

# Threads that write to the same cache line take it from each other on every write ("false
# sharing"): with the per-thread scratch rows side by side, the attention's time varied 2x with
# where numpy happened to place them (README, kernel notes). 32 float32 = 128 bytes: two lines,
# since cores also fetch a line's neighbour.
SCRATCH_GAP = 32


# --- readers: one pair per storage kind --------------------------------------------------------

@njit(inline="always")
def key_dot_f32(k, k_scales, kv, p, q):
    s = np.float32(0.0)
    for i in range(q.shape[0]):
        s += q[i] * k[kv, p, i]
    return s


@njit(inline="always")
def value_add_f32(v, v_scales, kv, p, weight, acc):
    for i in range(acc.shape[0]):
        acc[i] += weight * v[kv, p, i]


@njit(inline="always")
def key_dot_f16(k, k_scales, kv, p, q):
    s = np.float32(0.0)
    for i in range(q.shape[0]):
        s += q[i] * f16_to_f32(k[kv, p, i])
    return s


@njit(inline="always")
def value_add_f16(v, v_scales, kv, p, weight, acc):
    for i in range(acc.shape[0]):
        acc[i] += weight * f16_to_f32(v[kv, p, i])


@njit(inline="always")
def key_dot_q8_0(k, k_scales, kv, p, q):
    s = np.float32(0.0)
    for b in range(q.shape[0] // QK):
        block = np.float32(0.0)
        for i in range(b * QK, (b + 1) * QK):
            block += q[i] * np.float32(k[kv, p, i])
        s += block * k_scales[kv, p, b]
    return s


@njit(inline="always")
def value_add_q8_0(v, v_scales, kv, p, weight, acc):
    for b in range(acc.shape[0] // QK):
        w = weight * v_scales[kv, p, b]
        for i in range(b * QK, (b + 1) * QK):
            acc[i] += w * np.float32(v[kv, p, i])


# --- attention -------------------------------------------------------------------------------------

@njit(fastmath=True, error_model="numpy", forceinline=True)
def _attend(key_dot, value_add, q, k_slots, k_scale_slots, v_slots, v_scale_slots, slots, positions, out,
            scores_scratch, acc_scratch, item):
    """Causal attention for query head h = item % heads of token t = item // heads, q (tokens,
    heads, head_dim), query t at position positions[t] of slot slots[t] (both checked by
    KVCache.attend: no bounds checks here); key_dot and value_add read the cache kind.

    Query t sees positions 0 .. positions[t] of its slot. The softmax subtracts the maximum
    score and runs in float32, like the reference implementation. Each worker thread keeps its
    scores and sums in its own row of the scratch arrays (threads, positions + SCRATCH_GAP) and
    (threads, head_dim + SCRATCH_GAP), made once with the cache: nothing is allocated per call.
    """
    n_tokens, n_heads, head_dim = q.shape
    group = n_heads // k_slots.shape[1]
    scale = np.float32(1.0 / math.sqrt(head_dim))
    t = item // n_heads
    h = item % n_heads
    kv = h // group
    slot = slots[t]
    k, k_scales, v, v_scales = k_slots[slot], k_scale_slots[slot], v_slots[slot], v_scale_slots[slot]
    n_keys = positions[t] + 1
    query = q[t, h]
    worker = get_thread_id()
    scores = scores_scratch[worker]
    best = np.float32(-np.inf)
    for p in range(n_keys):
        s = key_dot(k, k_scales, kv, p, query) * scale
        scores[p] = s
        best = max(best, s)
    total = np.float32(0.0)
    for p in range(n_keys):
        below = scores[p] - best
        e = exp_f32(below) if below > NEGLIGIBLE_SCORE else np.float32(0.0)
        scores[p] = e
        total += e
    acc = acc_scratch[worker, :head_dim]
    acc[:] = 0.0
    for p in range(n_keys):
        value_add(v, v_scales, kv, p, scores[p], acc)
    inv_total = np.float32(1.0) / total
    for i in range(head_dim):
        out[t, h, i] = acc[i] * inv_total


# one small kernel per cache kind, over (token, head) items (numba cannot cache kernels that
# take functions as arguments)
@njit(parallel=True, cache=True)
def attention_f32(q, k, k_scales, v, v_scales, slots, positions, out, scores, acc):
    for item in prange(q.shape[0] * q.shape[1]):
        _attend(key_dot_f32, value_add_f32, q, k, k_scales, v, v_scales, slots, positions, out, scores, acc,
                np.int64(item))


@njit(parallel=True, cache=True)
def attention_f16(q, k, k_scales, v, v_scales, slots, positions, out, scores, acc):
    for item in prange(q.shape[0] * q.shape[1]):
        _attend(key_dot_f16, value_add_f16, q, k, k_scales, v, v_scales, slots, positions, out, scores, acc,
                np.int64(item))


@njit(parallel=True, cache=True)
def attention_q8_0(q, k, k_scales, v, v_scales, slots, positions, out, scores, acc):
    for item in prange(q.shape[0] * q.shape[1]):
        _attend(key_dot_q8_0, value_add_q8_0, q, k, k_scales, v, v_scales, slots, positions, out, scores, acc,
                np.int64(item))


# --- storing: one kernel per kind, the same arguments, written in place -----------------------
# k_cache[slots[t], h, positions[t]] = k[t, h] in the kind's storage, and the same for v. A row
# at a time, each a loop of its own over contiguous values, which LLVM vectorizes: one loop over
# both caches' 4-d indices was converted a value at a time (README, kernel notes).

@njit(inline="always")
def _copy_row(source, destination):
    for i in range(source.shape[0]):
        destination[i] = source[i]


@njit(inline="always")
def _halves_row(source, destination):
    for i in range(source.shape[0]):
        destination[i] = f32_to_f16(source[i])


@njit(inline="always")
def _store_rows(write_row, k, v, k_cache, v_cache, slots, positions):
    for t in range(k.shape[0]):
        for h in range(k.shape[1]):
            write_row(k[t, h], k_cache[slots[t], h, positions[t]])
            write_row(v[t, h], v_cache[slots[t], h, positions[t]])


@njit(cache=True)
def _store_f32(k, v, k_cache, v_cache, k_scales, v_scales, slots, positions):
    _store_rows(_copy_row, k, v, k_cache, v_cache, slots, positions)


@njit(cache=True)
def _store_f16(k, v, k_cache, v_cache, k_scales, v_scales, slots, positions):
    _store_rows(_halves_row, k, v, k_cache, v_cache, slots, positions)


@njit(cache=True)
def _store_q8_0(k, v, k_cache, v_cache, k_scales, v_scales, slots, positions):
    """Each row in blocks of 32 as the activations are quantized (quant.quantize_row)."""
    for t in range(k.shape[0]):
        slot, position = slots[t], positions[t]
        for h in range(k.shape[1]):
            quantize_row(k[t], h, k_cache[slot, :, position], k_scales[slot, :, position])
            quantize_row(v[t], h, v_cache[slot, :, position], v_scales[slot, :, position])


@dataclass(frozen=True)
class KVKind:
    """One storage kind of the KV cache."""
    name: str
    dtype: type              # of the cached values
    scale_block: int | None  # values per float32 scale (None: no scales)
    attention: Callable      # the attention kernel that reads this kind
    store: Callable          # the kernel that writes it

    def bytes_per_position(self, kv_heads: int, head_dim: int) -> int:
        """Bytes of keys and values (and their scales) that one position of one layer takes."""
        scales = head_dim // self.scale_block * 4 if self.scale_block else 0
        return 2 * kv_heads * (head_dim * np.dtype(self.dtype).itemsize + scales)


KV_KINDS = {kind.name: kind for kind in [
    KVKind("f16", np.uint16, None, attention_f16, _store_f16),
    KVKind("q8_0", np.int8, QK, attention_q8_0, _store_q8_0),
    KVKind("f32", np.float32, None, attention_f32, _store_f32),
]}


class KVCache:
    """Keys and values of every layer, allocated once: (layers, slots, kv_heads, positions, head_dim).

    Every call names, per token row, the slot and the position it reads or writes (int64 arrays;
    `rows` makes them for one sequence). They are checked here: the kernels index without bounds
    checks."""

    def __init__(self, kind: str, layers: int, kv_heads: int, positions: int, head_dim: int, slots: int = 1):
        if kind not in KV_KINDS:
            raise ValueError(f"unknown KV cache type {kind!r}; supported: {', '.join(KV_KINDS)}")
        storage = KV_KINDS[kind]
        if storage.scale_block and head_dim % storage.scale_block:
            raise ValueError(f"a {kind} KV cache needs head_dim to be a multiple of {storage.scale_block}, "
                             f"got {head_dim}")
        self.kind = kind
        shape = (layers, slots, kv_heads, positions, head_dim)
        self.k, self.v = np.zeros(shape, storage.dtype), np.zeros(shape, storage.dtype)
        scale_shape = (layers, slots, kv_heads, positions, head_dim // storage.scale_block) if storage.scale_block \
            else (layers, slots, 1, 1, 1)
        self.k_scales, self.v_scales = np.zeros(scale_shape, np.float32), np.zeros(scale_shape, np.float32)
        self.storage = storage
        # the attention's scratch, one row per thread numba may run (get_thread_id's range), each
        # with SCRATCH_GAP unused items after it: two threads never write to one cache line
        self.scores = np.zeros((config.NUMBA_NUM_THREADS, positions + SCRATCH_GAP), np.float32)
        self.acc = np.zeros((config.NUMBA_NUM_THREADS, head_dim + SCRATCH_GAP), np.float32)
        self._checked = (None, None)   # the last (slots, positions) checked, read-only since

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.k_scales.nbytes + self.v_scales.nbytes

    @staticmethod
    def rows(start_pos: int, n_tokens: int, slot: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(slots, positions) of n_tokens consecutive tokens of one sequence from start_pos."""
        return np.full(n_tokens, slot, np.int64), np.arange(start_pos, start_pos + n_tokens, dtype=np.int64)

    def check_rows(self, n_tokens: int, slots: np.ndarray, positions: np.ndarray) -> None:
        """Every layer of a forward pass gets the same two arrays: they are checked once, made
        read-only (so that they cannot change after the check) and held."""
        _, n_slots, _, n_positions, _ = self.k.shape
        if self._checked[0] is slots and self._checked[1] is positions and len(slots) == n_tokens:
            return
        if not (isinstance(slots, np.ndarray) and isinstance(positions, np.ndarray)
                and slots.shape == positions.shape == (n_tokens,) and n_tokens > 0
                and slots.dtype == positions.dtype == np.int64
                and 0 <= slots.min() and slots.max() < n_slots and 0 <= positions.min()
                and positions.max() < n_positions):
            raise ValueError(f"KV cache access of {n_tokens} tokens at slots {slots}, positions {positions} "
                             f"does not fit the cache {self.k.shape}")
        slots.flags.writeable = positions.flags.writeable = False
        self._checked = (slots, positions)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < len(self.k):
            raise ValueError(f"layer {layer} is not in the cache {self.k.shape}")

    def store(self, layer: int, k: np.ndarray, v: np.ndarray, slots: np.ndarray, positions: np.ndarray) -> None:
        """Keys and values (tokens, kv_heads, head_dim) float32, token t at positions[t] of slots[t]."""
        shape = (len(k), self.k.shape[2], self.k.shape[4])
        if k.shape != shape or v.shape != shape:
            raise ValueError(f"KV cache store of k {k.shape}, v {v.shape} does not fit the cache {self.k.shape}")
        self._check_layer(layer)
        self.check_rows(len(k), slots, positions)
        self.storage.store(k, v, self.k[layer], self.v[layer], self.k_scales[layer], self.v_scales[layer], slots,
                           positions)

    def attend(self, layer: int, q: np.ndarray, slots: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
        """out (tokens, heads, head_dim) = causal attention of q[t] over positions 0..positions[t]
        of slot slots[t] (keys and values stored there before)."""
        heads, head_dim = q.shape[1], q.shape[2]
        if out.shape != q.shape or head_dim != self.k.shape[4] or heads % self.k.shape[2]:
            raise ValueError(f"attention of q {q.shape} into {out.shape} does not fit the cache {self.k.shape}")
        self._check_layer(layer)
        self.check_rows(len(q), slots, positions)
        self.storage.attention(q, self.k[layer], self.k_scales[layer], self.v[layer], self.v_scales[layer], slots,
                               positions, out, self.scores, self.acc)
