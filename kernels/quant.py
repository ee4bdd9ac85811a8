"""GGML block quantization: Q8_0 (int8) and Q4_0 (int4), byte-compatible with GGUF.

    Q8_0 block, 32 weights in 34 bytes: fp16 scale d, int8 q[32];          w = d * q
    Q4_0 block, 32 weights in 18 bytes: fp16 scale d, 16 bytes of nibbles; w = d * (q - 8)
            byte j holds weight j in its low nibble and weight j + 16 in its high nibble

Files (GGUF, our quantized directories) hold these blocks row by row, as ggml does; weight
quantizers round exactly as ggml's reference code (and the gguf package) do.

At load time the blocks are repacked, without changing any byte, into the layout the kernels
read: ROW_GROUP (64) rows interleaved. Packed shape (groups, blocks_per_row, 64 * block_bytes);
for each group of 64 rows and each column block: the 64 fp16 scales, then byte k of all 64
rows' blocks, for each k. One SIMD lane is one output row, so a GEMV needs no horizontal sum
per block: lanes accumulate a whole block in int16/int32 and apply the 64 scales with one
vector multiply. Measured on the 1.5B down_proj shape, 2 threads: the row-by-row kernel with
a horizontal sum per block ran at 4.9 GB/s, the interleaved one at 10 GB/s, 17-18 GB/s with
prefetching (kernels/bits.py).

Products with int8 activations quantize them per block of 32 with a float32 scale (as llama.cpp
and llama2.c's runq.c do). Integer products are wrapped in np.int16/np.int32 so that LLVM keeps
them in 16/32-bit SIMD lanes instead of numba's default int64.
"""
import numpy as np
from numba import njit, prange

from .bits import f16_to_f32, f32_to_f16, prefetch

QK = 32            # weights per block
Q8_0_BYTES = 34
Q4_0_BYTES = 18
ROW_GROUP = 64     # rows interleaved in the packed layout: one SIMD lane per row
PREFETCH_BLOCKS = 4  # how far ahead (in packed blocks) the GEMVs prefetch


@njit(inline="always")
def _block_scale(w, n, offset):
    """The fp16 scale at byte `offset` of row n, as float32.

    The kernels index w[n, ...] directly rather than slicing row = w[n]: with the slice (and
    a separate array of decoded scales) LLVM stopped vectorizing the int4 unpacking loop.
    """
    return f16_to_f32(np.uint16(np.uint16(w[n, offset]) | (np.uint16(w[n, offset + 1]) << np.uint16(8))))


@njit(inline="always")
def _store_scale(out, n, offset, d):
    bits = f32_to_f16(np.float32(d))
    out[n, offset] = np.uint8(bits & np.uint16(0xFF))
    out[n, offset + 1] = np.uint8(bits >> np.uint16(8))


@njit(inline="always")
def _round_half_away(v):
    """C's roundf, which ggml uses (numpy's round is half-to-even)."""
    return np.floor(v + np.float32(0.5)) if v >= 0 else -np.floor(-v + np.float32(0.5))


# --- weight quantizers --------------------------------------------------------------------

def quantize_q8_0(x, out):
    """x (rows, cols) float32 -> out (rows, cols/32*34) uint8 Q8_0 blocks.

    The same rounding as the activations (below); only the scale is stored as fp16."""
    rows, cols = x.shape
    xq = np.empty((rows, cols), np.int8)
    xd = np.empty((rows, cols // QK), np.float32)
    quantize_activations(x, xq, xd)
    blocks = out.reshape(rows, cols // QK, Q8_0_BYTES)
    blocks[:, :, :2] = xd.astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    blocks[:, :, 2:] = xq.view(np.uint8).reshape(rows, -1, QK)


@njit(parallel=True, cache=True)
def quantize_q4_0(x, out):
    """x (rows, cols) float32 -> out (rows, cols/32*18) uint8 Q4_0 blocks."""
    n_rows, n_cols = x.shape
    for n in prange(n_rows):
        for b in range(n_cols // QK):
            # the value of largest magnitude, with its sign, maps to -8
            extreme = np.float32(0.0)
            for j in range(QK):
                v = x[n, b * QK + j]
                if abs(v) > abs(extreme):
                    extreme = v
            d = extreme / np.float32(-8.0)
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            o = b * Q4_0_BYTES
            _store_scale(out, n, o, d)
            for j in range(QK // 2):
                lo = min(np.int32(np.float32(x[n, b * QK + j] * inv) + np.float32(8.5)), 15)
                hi = min(np.int32(np.float32(x[n, b * QK + j + 16] * inv) + np.float32(8.5)), 15)
                out[n, o + 2 + j] = np.uint8(lo | (hi << 4))


# --- packed layout ---------------------------------------------------------------------------

def packed_shape(rows, cols, block_bytes):
    return (-(-rows // ROW_GROUP), cols // QK, ROW_GROUP * block_bytes)


@njit(parallel=True, cache=True)
def pack_rows(rows, packed):
    """GGML rows (n, blocks * block_bytes) -> packed (see above). Missing rows of the last group
    get zero scales and zero quants, so they contribute nothing and are never stored."""
    n_rows = rows.shape[0]
    n_groups, n_blocks, group_bytes = packed.shape
    block_bytes = group_bytes // ROW_GROUP
    for g in prange(n_groups):
        for b in range(n_blocks):
            for lane in range(ROW_GROUP):
                n = g * ROW_GROUP + lane
                for k in range(block_bytes):
                    v = rows[n, b * block_bytes + k] if n < n_rows else np.uint8(0)
                    if k < 2:
                        packed[g, b, 2 * lane + k] = v
                    else:
                        packed[g, b, ROW_GROUP * k + lane] = v


@njit(parallel=True, cache=True)
def unpack_rows(packed, rows):
    """The inverse of pack_rows: packed -> GGML rows (for writing files)."""
    n_rows = rows.shape[0]
    n_groups, n_blocks, group_bytes = packed.shape
    block_bytes = group_bytes // ROW_GROUP
    for n in prange(n_rows):
        g, lane = n // ROW_GROUP, n % ROW_GROUP
        for b in range(n_blocks):
            for k in range(block_bytes):
                rows[n, b * block_bytes + k] = packed[g, b, 2 * lane + k if k < 2 else ROW_GROUP * k + lane]


@njit(inline="always")
def _packed_scale(w, g, b, lane):
    return f16_to_f32(np.uint16(np.uint16(w[g, b, 2 * lane]) | (np.uint16(w[g, b, 2 * lane + 1]) << np.uint16(8))))


@njit(inline="always")
def _prefetch_ahead(w, g, b):
    """Prefetch packed block (g, b + PREFETCH_BLOCKS), one hint per 64-byte cache line."""
    n_groups, n_blocks, group_bytes = w.shape
    ahead = g * n_blocks + b + PREFETCH_BLOCKS
    if ahead < n_groups * n_blocks:
        for c in range(0, group_bytes, 64):
            prefetch(w, ahead * group_bytes + c)


# --- row decoders (dequantize rows of a packed matrix to float32) ----------------------------

@njit(cache=True)
def decode_q8_0_rows(w, ids, dst):
    for i in range(ids.shape[0]):
        g, lane = ids[i] // ROW_GROUP, ids[i] % ROW_GROUP
        for b in range(w.shape[1]):
            d = _packed_scale(w, g, b, lane)
            for k in range(QK):
                dst[i, b * QK + k] = d * np.float32(np.int8(w[g, b, ROW_GROUP * (2 + k) + lane]))


@njit(cache=True)
def decode_q4_0_rows(w, ids, dst):
    for i in range(ids.shape[0]):
        g, lane = ids[i] // ROW_GROUP, ids[i] % ROW_GROUP
        for b in range(w.shape[1]):
            d = _packed_scale(w, g, b, lane)
            for k in range(QK // 2):
                q = w[g, b, ROW_GROUP * (2 + k) + lane]
                dst[i, b * QK + k] = d * np.float32(np.int32(q & np.uint8(15)) - 8)
                dst[i, b * QK + k + 16] = d * np.float32(np.int32(q >> np.uint8(4)) - 8)


# --- activations ----------------------------------------------------------------------------

@njit(cache=True)
def quantize_activations(x, xq, xd):
    """x (tokens, cols) float32 -> xq int8 and xd (tokens, cols/32) float32 scales.

    Like Q8_0, but the scale stays float32: activations are quantized per call, never
    stored, so there is no reason to lose precision to fp16.
    """
    n_tokens, n_cols = x.shape
    for t in range(n_tokens):   # not parallel: in decode it runs once per matmul on one row
        for b in range(n_cols // QK):
            amax = np.float32(0.0)
            for j in range(QK):
                amax = max(amax, abs(x[t, b * QK + j]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            xd[t, b] = d
            for j in range(QK):
                xq[t, b * QK + j] = np.int8(_round_half_away(x[t, b * QK + j] * inv))


# --- matrix products (packed weights) -----------------------------------------------------------
# out[t, n] = sum over blocks b of d_w[n, b] * (block dot product of row n with x[t]); parallel
# over groups of 64 rows; for each group, every token (prefill reads the group from cache after
# the first token).

@njit(inline="always")
def _store_group(out, t, g, acc):
    for lane in range(ROW_GROUP):
        n = g * ROW_GROUP + lane
        if n < out.shape[1]:
            out[t, n] = acc[lane]


@njit(parallel=True, fastmath=True, cache=True)
def matmul_q8_0(w, xq, xd, out):
    """Q8_0 weights, int8 activations: int16 products summed in pairs (2 * 128 * 127 fits),
    int32 block sums per lane."""
    n_groups, n_blocks, _ = w.shape
    for g in prange(n_groups):
        block = np.empty(ROW_GROUP, np.int32)
        acc = np.empty(ROW_GROUP, np.float32)
        for t in range(xq.shape[0]):
            acc[:] = 0.0
            for b in range(n_blocks):
                _prefetch_ahead(w, g, b)
                block[:] = 0
                for k in range(0, QK, 2):
                    x0 = np.int16(xq[t, b * QK + k])
                    x1 = np.int16(xq[t, b * QK + k + 1])
                    for lane in range(ROW_GROUP):
                        w0 = np.int16(np.int8(w[g, b, ROW_GROUP * (2 + k) + lane]))
                        w1 = np.int16(np.int8(w[g, b, ROW_GROUP * (3 + k) + lane]))
                        block[lane] = np.int32(block[lane] + np.int32(np.int16(np.int16(w0 * x0) + np.int16(w1 * x1))))
                xs = xd[t, b]
                for lane in range(ROW_GROUP):
                    acc[lane] += np.float32(block[lane]) * (_packed_scale(w, g, b, lane) * xs)
            _store_group(out, t, g, acc)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_q4_0(w, xq, xd, out):
    """Q4_0 weights, int8 activations: int16 block sums per lane; |(q - 8) * x| <= 8 * 127 and
    32 of them fit in int16 (32512)."""
    n_groups, n_blocks, _ = w.shape
    for g in prange(n_groups):
        block = np.empty(ROW_GROUP, np.int16)
        acc = np.empty(ROW_GROUP, np.float32)
        for t in range(xq.shape[0]):
            acc[:] = 0.0
            for b in range(n_blocks):
                _prefetch_ahead(w, g, b)
                block[:] = 0
                for k in range(QK // 2):
                    x_lo = np.int16(xq[t, b * QK + k])
                    x_hi = np.int16(xq[t, b * QK + k + 16])
                    for lane in range(ROW_GROUP):
                        q = w[g, b, ROW_GROUP * (2 + k) + lane]
                        lo = np.int16(np.int16(q & np.uint8(15)) - np.int16(8))
                        hi = np.int16(np.int16(q >> np.uint8(4)) - np.int16(8))
                        block[lane] = np.int16(block[lane] + np.int16(lo * x_lo) + np.int16(hi * x_hi))
                xs = xd[t, b]
                for lane in range(ROW_GROUP):
                    acc[lane] += np.float32(block[lane]) * (_packed_scale(w, g, b, lane) * xs)
            _store_group(out, t, g, acc)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_q8_0_float(w, x, out):
    """Q8_0 weights times float32 activations (no activation rounding: the LM head)."""
    n_groups, n_blocks, _ = w.shape
    for g in prange(n_groups):
        block = np.empty(ROW_GROUP, np.float32)
        acc = np.empty(ROW_GROUP, np.float32)
        for t in range(x.shape[0]):
            acc[:] = 0.0
            for b in range(n_blocks):
                _prefetch_ahead(w, g, b)
                block[:] = 0.0
                for k in range(QK):
                    xk = x[t, b * QK + k]
                    for lane in range(ROW_GROUP):
                        block[lane] += np.float32(np.int8(w[g, b, ROW_GROUP * (2 + k) + lane])) * xk
                for lane in range(ROW_GROUP):
                    acc[lane] += block[lane] * _packed_scale(w, g, b, lane)
            _store_group(out, t, g, acc)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_q4_0_float(w, x, out):
    """Q4_0 weights times float32 activations."""
    n_groups, n_blocks, _ = w.shape
    for g in prange(n_groups):
        block = np.empty(ROW_GROUP, np.float32)
        acc = np.empty(ROW_GROUP, np.float32)
        for t in range(x.shape[0]):
            acc[:] = 0.0
            for b in range(n_blocks):
                _prefetch_ahead(w, g, b)
                block[:] = 0.0
                for k in range(QK // 2):
                    x_lo = x[t, b * QK + k]
                    x_hi = x[t, b * QK + k + 16]
                    for lane in range(ROW_GROUP):
                        q = w[g, b, ROW_GROUP * (2 + k) + lane]
                        block[lane] += ((np.float32(np.int32(q & np.uint8(15))) - np.float32(8.0)) * x_lo
                                        + (np.float32(np.int32(q >> np.uint8(4))) - np.float32(8.0)) * x_hi)
                for lane in range(ROW_GROUP):
                    acc[lane] += block[lane] * _packed_scale(w, g, b, lane)
            _store_group(out, t, g, acc)
