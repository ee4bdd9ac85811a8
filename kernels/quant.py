"""GGML block quantization: Q8_0 (int8) and Q4_0 (int4), byte-compatible with GGUF.

    Q8_0 block, 32 weights in 34 bytes: fp16 scale d, int8 q[32];          w = d * q
    Q4_0 block, 32 weights in 18 bytes: fp16 scale d, 16 bytes of nibbles; w = d * (q - 8)
            byte j holds weight j in its low nibble and weight j + 16 in its high nibble

A quantized matrix is a uint8 array of shape (rows, blocks_per_row * block_bytes): GGUF's own
layout, used in place. Weight quantizers round exactly as ggml's reference code (and the gguf
package) do. Matrix products quantize the activations to int8 per block of 32 with a float32
scale (as llama.cpp and llama2.c's runq.c do), take integer dot products per block, and apply
both scales once per block. The integer products are wrapped in np.int32 so that LLVM keeps
them in 16/32-bit SIMD lanes (vpmaddwd) instead of numba's default int64.
"""
import numpy as np
from numba import njit, prange

from .bits import f16_to_f32, f32_to_f16

QK = 32            # weights per block
Q8_0_BYTES = 34
Q4_0_BYTES = 18
ROWS_PER_TASK = 16


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


# --- row decoders (dequantize one row to float32) ------------------------------------------

@njit(cache=True)
def decode_q8_0_row(row, dst):
    for b in range(dst.shape[0] // QK):
        o = b * Q8_0_BYTES
        d = _block_scale(row.reshape(1, -1), 0, o)
        for j in range(QK):
            dst[b * QK + j] = d * np.float32(np.int8(row[o + 2 + j]))


@njit(cache=True)
def decode_q4_0_row(row, dst):
    for b in range(dst.shape[0] // QK):
        o = b * Q4_0_BYTES
        d = _block_scale(row.reshape(1, -1), 0, o)
        for j in range(QK // 2):
            q = row[o + 2 + j]
            dst[b * QK + j] = d * np.float32(np.int32(q & np.uint8(15)) - 8)
            dst[b * QK + j + 16] = d * np.float32(np.int32(q >> np.uint8(4)) - 8)


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


# --- matrix products -----------------------------------------------------------------------

@njit(parallel=True, fastmath=True, cache=True)
def matmul_q8_0(w, xq, xd, out):
    """out[t, n] = sum over blocks of d_w * d_x * (int dot of the block) for Q8_0 weights."""
    n_rows = out.shape[1]
    n_tokens, n_blocks = xd.shape
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for n in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            for t in range(n_tokens):
                acc = np.float32(0.0)
                for b in range(n_blocks):
                    o = b * Q8_0_BYTES
                    x0 = b * QK
                    isum = np.int32(0)
                    for j in range(QK):
                        isum = np.int32(isum + np.int32(np.int8(w[n, o + 2 + j])) * np.int32(xq[t, x0 + j]))
                    acc += np.float32(isum) * (_block_scale(w, n, o) * xd[t, b])
                out[t, n] = acc


@njit(parallel=True, fastmath=True, cache=True)
def matmul_q4_0(w, xq, xd, out):
    """Q4_0 weights: each row is first unpacked to int8 (q - 8) in an L1-resident scratch
    buffer, because multiplying nibbles in place does not vectorize; then as Q8_0."""
    n_rows = out.shape[1]
    n_tokens, n_blocks = xd.shape
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        unpacked = np.empty(n_blocks * QK, np.int8)
        for n in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            for b in range(n_blocks):
                o = b * Q4_0_BYTES + 2
                for j in range(QK // 2):
                    q = w[n, o + j]
                    unpacked[b * QK + j] = np.int8(q & 15) - np.int8(8)
                    unpacked[b * QK + j + 16] = np.int8(q >> 4) - np.int8(8)
            for t in range(n_tokens):
                acc = np.float32(0.0)
                for b in range(n_blocks):
                    x0 = b * QK
                    isum = np.int32(0)
                    for j in range(QK):
                        isum = np.int32(isum + np.int32(unpacked[x0 + j]) * np.int32(xq[t, x0 + j]))
                    acc += np.float32(isum) * (_block_scale(w, n, b * Q4_0_BYTES) * xd[t, b])
                out[t, n] = acc


@njit(parallel=True, fastmath=True, cache=True)
def matmul_q8_0_float(w, x, out):
    """Q8_0 weights times float32 activations (no activation rounding): for the LM head.

    32 float lanes accumulate d * w * x across blocks: one horizontal sum per row, not per block.
    About 25 % slower than the int8 kernel (measured on the 1.5B LM head)."""
    n_rows = out.shape[1]
    n_tokens = x.shape[0]
    n_blocks = x.shape[1] // QK
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        lanes = np.empty(QK, np.float32)
        for n in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            for t in range(n_tokens):
                lanes[:] = 0.0
                for b in range(n_blocks):
                    o = b * Q8_0_BYTES + 2
                    x0 = b * QK
                    d = _block_scale(w, n, o - 2)
                    for i in range(QK):
                        lanes[i] += d * (np.float32(np.int32(np.int8(w[n, o + i]))) * x[t, x0 + i])
                out[t, n] = lanes.sum()
