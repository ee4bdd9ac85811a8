"""GGML's blocks of 32 weights: Q8_0 (int8), Q4_0, Q4_1, Q5_0, Q5_1, byte-compatible with GGUF.

    Q8_0 block, 32 weights in 34 bytes: fp16 scale d, int8 q[32];          w = d * q
    Q4_0 block, 32 weights in 18 bytes: fp16 scale d, 16 bytes of nibbles; w = d * (q - 8)
            byte j holds weight j in its low nibble and weight j + 16 in its high nibble
    Q4_1 block, 32 weights in 20 bytes: fp16 d, fp16 minimum m, 16 bytes of nibbles; w = d * q + m
    Q5_0 block, 32 weights in 22 bytes: fp16 d, 4 bytes qh, 16 bytes of nibbles; w = d * (q - 16)
    Q5_1 block, 32 weights in 24 bytes: fp16 d, fp16 m, 4 bytes qh, 16 bytes of nibbles; w = d * q + m
            bit j of qh (a little-endian 32-bit word) is bit 4 of weight j

Files (GGUF, our quantized directories) hold these blocks row by row, as ggml does; weight
quantizers (Q8_0, Q4_0: Q4_1 is only read) round exactly as ggml's reference code (and the gguf
package) do.

The kernels read the blocks repacked at load into the interleaved layout of kernels/layout.py
(64 rows side by side: the scale bytes in planes, the quants in quads of 4 bytes per row).

Matrix products quantize the activations per block of 32 with a float32 scale, to int8 (as
llama.cpp and llama2.c's runq.c do). Integer products are wrapped in np.int16/np.int32 so that
LLVM keeps them in 16/32-bit SIMD lanes instead of numba's default int64.
"""
import numpy as np
from numba import njit, prange

from . import compiler  # noqa: F401  (numba's settings before any kernel is defined)
from .bits import (DOT4_LANES, dot4_int8, dot4_nibbles_fifth_bit, dot4_partial, f32_to_f16, f16_at_bytes, fma,
                   scaled_sums, stack_array)
from .layout import QUADS, ROW_GROUP, TOKEN_TILE, f16_at, prefetch_ahead, store_group, store_tile

QK = 32            # weights per block
SUM_BLOCK = 16     # activations per block sum (quantize_for_matmul): Q6_K's scales cover 16
Q8_0_BYTES = 34
Q4_0_BYTES = 18
Q4_1_BYTES = 20
Q5_0_BYTES = 22
Q5_1_BYTES = 24


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


# --- row decoders (dequantize one GGML row to float32) -----------------------------------------

@njit(cache=True)
def decode_q8_0_row(row, dst):
    for b in range(dst.shape[0] // QK):
        o = b * Q8_0_BYTES
        d = f16_at_bytes(row, o)
        for j in range(QK):
            dst[b * QK + j] = d * np.float32(np.int8(row[o + 2 + j]))


@njit(cache=True)
def decode_q4_0_row(row, dst):
    for b in range(dst.shape[0] // QK):
        o = b * Q4_0_BYTES
        d = f16_at_bytes(row, o)
        for j in range(QK // 2):
            q = row[o + 2 + j]
            dst[b * QK + j] = d * np.float32(np.int32(q & np.uint8(15)) - 8)
            dst[b * QK + j + 16] = d * np.float32(np.int32(q >> np.uint8(4)) - 8)


@njit(cache=True)
def decode_q4_1_row(row, dst):
    for b in range(dst.shape[0] // QK):
        o = b * Q4_1_BYTES
        d = f16_at_bytes(row, o)
        m = f16_at_bytes(row, o + 2)
        for j in range(16):
            q = row[o + 4 + j]
            dst[b * QK + j] = np.float32(np.int32(q & np.uint8(15))) * d + m
            dst[b * QK + j + 16] = np.float32(np.int32(q >> np.uint8(4))) * d + m


@njit(inline="always")
def _fifth_bits(row, offset):
    """Q5's qh: the little-endian 32-bit word at row[offset:offset + 4]."""
    return (np.uint32(row[offset]) | (np.uint32(row[offset + 1]) << np.uint32(8))
            | (np.uint32(row[offset + 2]) << np.uint32(16)) | (np.uint32(row[offset + 3]) << np.uint32(24)))


@njit(inline="always")
def _q5_pair(row, qs, qh, j):
    """Weights j and j + 16 of a Q5 block (0..31): nibbles of byte qs + j, bits j and j + 16 of qh."""
    q = np.int32(row[qs + j])
    low = (q & 15) | np.int32(((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
    high = (q >> 4) | np.int32(((qh >> np.uint32(j + 16)) & np.uint32(1)) << np.uint32(4))
    return low, high


@njit(cache=True)
def decode_q5_0_row(row, dst):
    for b in range(dst.shape[0] // QK):
        o = b * Q5_0_BYTES
        d = f16_at_bytes(row, o)
        qh = _fifth_bits(row, o + 2)
        for j in range(QK // 2):
            low, high = _q5_pair(row, o + 6, qh, j)
            dst[b * QK + j] = d * np.float32(low - 16)
            dst[b * QK + j + 16] = d * np.float32(high - 16)


@njit(cache=True)
def decode_q5_1_row(row, dst):
    for b in range(dst.shape[0] // QK):
        o = b * Q5_1_BYTES
        d = f16_at_bytes(row, o)
        m = f16_at_bytes(row, o + 2)
        qh = _fifth_bits(row, o + 4)
        for j in range(QK // 2):
            low, high = _q5_pair(row, o + 8, qh, j)
            dst[b * QK + j] = d * np.float32(low) + m
            dst[b * QK + j + 16] = d * np.float32(high) + m


# --- activations ----------------------------------------------------------------------------

@njit(inline="always")
def quantize_row(x, t, xq, xd):
    """Row t of x as blocks of 32: xq[t] int8, xd[t] their float32 scales (max |x| / 127)."""
    for b in range(x.shape[1] // QK):
        amax = np.float32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[t, b * QK + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        xd[t, b] = d
        for j in range(QK):
            xq[t, b * QK + j] = _round_half_away(x[t, b * QK + j] * inv)


@njit(cache=True)
def quantize_activations(x, xq, xd):
    """x (tokens, cols) float32 -> xq int8 and xd (tokens, cols/32) float32 scales.

    Like Q8_0, but the scale stays float32: activations are quantized per call, never
    stored, so there is no reason to lose precision to fp16.
    """
    for t in range(x.shape[0]):   # not parallel: in decode it runs once per matmul on one row
        quantize_row(x, t, xq, xd)


@njit(cache=True)
def quantize_for_matmul(x, xq, xd, xs):
    """quantize_activations, and xs[t, s] = sum of the integer activations s * 16 .. s * 16 + 15
    of token t. Kernels whose weights are offset (Q4_0's q - 8, Q4_K's minimum, Q6_K's q - 32)
    need sum x per block (of 32; of 16 for Q6_K's scales): computed once per activation row
    here, not again in every group of 64 weight rows, and in the same call (every matmul input
    of a decode step passes here)."""
    for t in range(x.shape[0]):
        quantize_row(x, t, xq, xd)
        for s in range(xs.shape[1]):
            total = np.int32(0)
            for j in range(SUM_BLOCK):
                total += np.int32(xq[t, s * SUM_BLOCK + j])
            xs[t, s] = total


# --- matrix products (packed weights) -----------------------------------------------------------
# out[t, n] = sum over blocks b of d_w[n, b] * d_x[t, b] * (integer dot product of the block of
# row n with x[t]); parallel over groups of 64 rows; for each group, every token (prefill reads
# the group from cache after the first token). xq is int8.

@njit(inline="always")
def _q8_0_block(sums, w, quads, xq, x0):
    """sums[lane] = the integer dot product of one Q8_0 block (its 32 int8 quants in 8 quads at
    `quads`) with xq.flat[x0:x0 + 32], for the 64 lanes."""
    sums[:] = 0
    for j in range(QK // QUADS):
        for lanes in range(0, ROW_GROUP, DOT4_LANES):
            dot4_int8(sums, lanes, w, quads + QUADS * (j * ROW_GROUP + lanes), xq, x0 + QUADS * j)


@njit(fastmath=True, forceinline=True)
def scaled_blocks_group(block_sums, w, xq, xd, out, g, always_prefetch):
    """Group g of a format whose blocks of 32 are an fp16 d (planes 0-1) times integers, the
    quants after it in quads: block_sums(sums, w, quads, xq, x0) gives a block's integer dot
    products for the 64 lanes (_q8_0_block, iquants' codebook block), and each adds d * x's scale
    * that sum. always_prefetch: whether it prefetches where compiler.SOFTWARE_PREFETCH does not."""
    n_groups, n_blocks, group_bytes = w.shape
    cols = xq.shape[1]
    block = stack_array(np.int32, 1, ROW_GROUP)
    acc = stack_array(np.float32, 1, ROW_GROUP)
    for t in range(xq.shape[0]):
        acc[:] = 0.0
        for b in range(n_blocks):
            prefetch_ahead(w, g, b, 0, 1, always_prefetch)
            block_sums(block, w, (g * n_blocks + b) * group_bytes + 2 * ROW_GROUP, xq, t * cols + b * QK)
            x_scale = xd[t, b]
            for lane in range(ROW_GROUP):
                acc[lane] += np.float32(block[lane]) * (f16_at(w, g, b, 0, lane) * x_scale)
        store_group(out, t, g, acc)


@njit(parallel=True, cache=True)
def matmul_q8_0(w, xq, xd, xs, out):
    """Q8_0 weights, integer activations. The quants are in quads (layout.py): 4 weights of a row
    per 32-bit word, so bits.dot4_int8 sums 4 products per lane with x86's pairwise byte
    multiplies; int32 block sums per lane (xs, the activations' sums, is not needed)."""
    for g in prange(w.shape[0]):
        scaled_blocks_group(_q8_0_block, w, xq, xd, out, np.int64(g), False)


@njit(forceinline=True)
def _nibbles_token(w, xq, xd, xs, out, g, t, scale_planes, with_min, fifth_bit):
    """Token t of group g in the 4- and 5-bit kernels with integer activations: Q4_0 (w = d (q - 8)),
    Q4_1 (w = d q + m), Q5_0 (w = d (q - 16)), Q5_1 (w = d q + m). The nibble bytes follow the
    block's fp16 planes (d, and m with a min) in quads, as in matmul_q8_0: quad j of a lane holds
    weights 4j..4j+3 (low nibbles) and 16+4j.. (high); Q5's qh comes first, as one more quad (a
    lane's 32-bit word). Q4: the 8 products of a block add up as partial sums
    (bits.dot4_partial: int16 pairs with AVX2), widened to int32 once per block (bits.scaled_sums,
    scales of 1); Q5 (values to 31, whose pairs would overflow int16 within a block): int32 sums
    (bits.dot4_nibbles_fifth_bit). Then sum (q - offset) x = sum q x - offset sum x, or
    d sum q x + m sum x (xs: quantize_for_matmul's sums of 16). The last three arguments are
    constants of each format's group function below, into which LLVM inlines this (forceinline):
    it then folds them and drops the other formats' branches."""
    n_groups, n_blocks, group_bytes = w.shape
    cols = xq.shape[1]
    partial = stack_array(np.int32, 1, ROW_GROUP)
    block = stack_array(np.int32, 1, ROW_GROUP)
    acc = stack_array(np.float32, 1, ROW_GROUP)
    acc[:] = 0.0
    for b in range(n_blocks):
        prefetch_ahead(w, g, b, 0, 1, always=True)   # faster with the hints on AMD too (README)
        quads = (g * n_blocks + b) * group_bytes + scale_planes * ROW_GROUP   # after the fp16 planes
        x0 = t * cols + b * QK
        if fifth_bit:
            block[:] = 0
            for j in range(QK // 2 // QUADS):
                for lanes in range(0, ROW_GROUP, DOT4_LANES):
                    high = quads + QUADS * lanes
                    at = quads + QUADS * ((j + 1) * ROW_GROUP + lanes)
                    dot4_nibbles_fifth_bit(block, lanes, w, at, 0, high, QUADS * j, xq, x0 + QUADS * j)
                    dot4_nibbles_fifth_bit(block, lanes, w, at, 4, high, QK // 2 + QUADS * j, xq,
                                           x0 + QK // 2 + QUADS * j)
        else:
            partial[:] = 0
            for j in range(QK // 2 // QUADS):
                for lanes in range(0, ROW_GROUP, DOT4_LANES):
                    at = quads + QUADS * (j * ROW_GROUP + lanes)
                    dot4_partial(partial, lanes, w, at, xq, x0 + QUADS * j, 0, 4)
                    dot4_partial(partial, lanes, w, at, xq, x0 + QK // 2 + QUADS * j, 4, 4)
            for lanes in range(0, ROW_GROUP, DOT4_LANES):
                scaled_sums(block, lanes, partial, lanes, None, 0)   # widened, scales of 1
        _nibbles_scaled(w, g, b, block, xd, xs, t, acc, 0, with_min, fifth_bit)
    store_group(out, t, g, acc)


@njit(inline="always")
def _nibbles_scaled(w, g, b, block, xd, xs, t, acc, k, with_min, fifth_bit):
    """acc[64 k + lane] += the float value of block b from its integer sums block[64 k + lane]
    (token t): d * x's scale * (sum q x - offset * sum x), or with a minimum
    d * x's scale * sum q x + m * x's scale * sum x."""
    x_sum = xs[t, 2 * b] + xs[t, 2 * b + 1]
    x_scale = xd[t, b]
    if with_min:
        x_min = np.float32(x_sum) * x_scale
        for lane in range(ROW_GROUP):
            acc[k * ROW_GROUP + lane] += fma(np.float32(block[k * ROW_GROUP + lane]),
                                             f16_at(w, g, b, 0, lane) * x_scale, f16_at(w, g, b, 2, lane) * x_min)
    else:
        x_offset = np.int32((16 if fifth_bit else 8) * x_sum)
        for lane in range(ROW_GROUP):   # int32 until converted: numba would widen to int64
            acc[k * ROW_GROUP + lane] = fma(np.float32(np.int32(block[k * ROW_GROUP + lane] - x_offset)),
                                            f16_at(w, g, b, 0, lane) * x_scale, acc[k * ROW_GROUP + lane])


@njit(forceinline=True)
def _q4_0_tile(w, xq, xd, xs, out, g, t0):
    """_nibbles_token for Q4_0 and the TOKEN_TILE tokens from t0 at once (matmul_q4_0_tiles; Q4_1
    has no tile kernel, layout.py says why): each quad of weights is loaded and unpacked once
    and multiplied by the activations of every token of the tile. So the lanes go in runs of 8
    (one register of sums per token) through the whole block, instead of the block's quads
    through the 64 lanes."""
    n_groups, n_blocks, group_bytes = w.shape
    cols = xq.shape[1]
    partial = stack_array(np.int32, TOKEN_TILE, DOT4_LANES)
    block = stack_array(np.int32, TOKEN_TILE, ROW_GROUP)
    acc = stack_array(np.float32, TOKEN_TILE, ROW_GROUP)
    acc[:] = 0.0
    for b in range(n_blocks):
        prefetch_ahead(w, g, b, 0, 1, always=True)
        quads = (g * n_blocks + b) * group_bytes + 2 * ROW_GROUP   # after d's two planes
        for lanes in range(0, ROW_GROUP, DOT4_LANES):
            partial[:] = 0
            for j in range(QK // 2 // QUADS):
                at = quads + QUADS * (j * ROW_GROUP + lanes)
                for k in range(TOKEN_TILE):
                    x0 = (t0 + k) * cols + b * QK + QUADS * j
                    dot4_partial(partial, k * DOT4_LANES, w, at, xq, x0, 0, 4)
                    dot4_partial(partial, k * DOT4_LANES, w, at, xq, x0 + QK // 2, 4, 4)
            for k in range(TOKEN_TILE):
                scaled_sums(block, k * ROW_GROUP + lanes, partial, k * DOT4_LANES, None, 0)
        for k in range(TOKEN_TILE):
            _nibbles_scaled(w, g, b, block, xd, xs, t0 + k, acc, k, False, False)
    store_tile(out, t0, g, acc)


@njit(forceinline=True)
def _q4_0_group(w, xq, xd, xs, out, g):
    for t in range(xq.shape[0]):
        _nibbles_token(w, xq, xd, xs, out, g, t, 2, False, False)


@njit(forceinline=True)
def _q4_1_group(w, xq, xd, xs, out, g):
    for t in range(xq.shape[0]):
        _nibbles_token(w, xq, xd, xs, out, g, t, 4, True, False)


@njit(forceinline=True)
def _q4_0_tiles(w, xq, xd, xs, out, g):
    for i in range(xq.shape[0] // TOKEN_TILE):
        _q4_0_tile(w, xq, xd, xs, out, g, i * TOKEN_TILE)


@njit(forceinline=True)
def _q5_0_group(w, xq, xd, xs, out, g):
    for t in range(xq.shape[0]):
        _nibbles_token(w, xq, xd, xs, out, g, t, 2, False, True)


@njit(forceinline=True)
def _q5_1_group(w, xq, xd, xs, out, g):
    for t in range(xq.shape[0]):
        _nibbles_token(w, xq, xd, xs, out, g, t, 4, True, True)


@njit(parallel=True, cache=True)
def matmul_q4_0(w, xq, xd, xs, out):
    """Q4_0 weights (fp16 d in planes 0-1), integer activations, one token at a time: see
    _nibbles_token."""
    for g in prange(w.shape[0]):
        _q4_0_group(w, xq, xd, xs, out, np.int64(g))


@njit(parallel=True, cache=True)
def matmul_q4_0_tiles(w, xq, xd, xs, out):
    """matmul_q4_0 for a multiple of TOKEN_TILE tokens, a tile at a time: see _q4_0_tile."""
    for g in prange(w.shape[0]):
        _q4_0_tiles(w, xq, xd, xs, out, np.int64(g))


@njit(parallel=True, cache=True)
def matmul_q4_1(w, xq, xd, xs, out):
    """Q4_1 weights (fp16 d and m in planes 0-3), integer activations, one token at a time: see
    _nibbles_token."""
    for g in prange(w.shape[0]):
        _q4_1_group(w, xq, xd, xs, out, np.int64(g))


@njit(parallel=True, cache=True)
def matmul_q5_0(w, xq, xd, xs, out):
    """Q5_0 weights (fp16 d in planes 0-1, then qh and the nibbles in quads): see _nibbles_token."""
    for g in prange(w.shape[0]):
        _q5_0_group(w, xq, xd, xs, out, np.int64(g))


@njit(parallel=True, cache=True)
def matmul_q5_1(w, xq, xd, xs, out):
    """Q5_1 weights (fp16 d and m in planes 0-3, then qh and the nibbles): see _nibbles_token."""
    for g in prange(w.shape[0]):
        _q5_1_group(w, xq, xd, xs, out, np.int64(g))
