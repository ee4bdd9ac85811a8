"""The 4-bit codebook formats: IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256).

Their nibbles are not levels on a line but indices into 16 fixed int8 values, denser near zero
(bits.IQ4_VALUES, ggml's kvalues_iq4nl), which is where most weights are:

    IQ4_NL, 32 weights in 18 bytes: fp16 d, 16 bytes of nibbles;        w = d * value[q]
    IQ4_XS, 256 weights in 136 bytes: fp16 d, 2 bytes of high scale bits, 4 bytes of low
            scale bits, 128 bytes of nibbles;                            w = d * (ls - 32) * value[q]
            with ls the 6-bit scale of each sub-block of 32
In a block of 32 (IQ4_NL's, each of IQ4_XS's sub-blocks), byte j holds weight j in its low
nibble and weight j + 16 in its high one, as Q4_0.

The kernels look the values up 32 at a time with one byte shuffle (bits.dot4_codebook), then
multiply them as signed int8 weights: integer sums per block of 32, as Q8_0's.
"""
import numpy as np
from numba import njit, prange

from . import compiler  # noqa: F401  (numba's settings before any kernel is defined)
from .bits import DOT4_LANES, IQ4_VALUES, dot4_codebook, f16_at_bytes, fma, stack_array
from .layout import QUADS, ROW_GROUP, TOKEN_TILE, add_scaled_block, prefetch_ahead, store_group, store_tile
from .quant import scaled_blocks_group

QK = 32
QK_K = 256
IQ4_NL_BYTES = 18
IQ4_XS_BYTES = 136
SUB_BLOCKS = QK_K // QK   # IQ4_XS's, of 32 weights each
VALUES = np.array(IQ4_VALUES, np.float32)


@njit(cache=True)
def decode_iq4_nl_row(row, dst):
    for b in range(dst.shape[0] // QK):
        o = b * IQ4_NL_BYTES
        d = f16_at_bytes(row, o)
        for j in range(QK // 2):
            q = row[o + 2 + j]
            dst[b * QK + j] = d * VALUES[q & np.uint8(15)]
            dst[b * QK + j + 16] = d * VALUES[q >> np.uint8(4)]


@njit(inline="always")
def _xs_scale(low_byte, high_bits, i):
    """The 6-bit scale of IQ4_XS's sub-block i, minus 32: 4 bits of the byte of scales_l that
    holds it, 2 of the 16-bit word scales_h."""
    low = (np.int32(low_byte) >> (4 * (i % 2))) & 15
    high = (np.int32(high_bits) >> (2 * i)) & 3
    return (low | (high << 4)) - 32


@njit(cache=True)
def decode_iq4_xs_row(row, dst):
    for b in range(dst.shape[0] // QK_K):
        o = b * IQ4_XS_BYTES
        d = f16_at_bytes(row, o)
        high_bits = np.int32(row[o + 2]) | (np.int32(row[o + 3]) << 8)
        for i in range(QK_K // QK):
            scale = d * np.float32(_xs_scale(row[o + 4 + i // 2], high_bits, i))
            for j in range(QK // 2):
                q = row[o + 8 + 16 * i + j]
                dst[b * QK_K + QK * i + j] = scale * VALUES[q & np.uint8(15)]
                dst[b * QK_K + QK * i + j + 16] = scale * VALUES[q >> np.uint8(4)]


@njit(inline="always")
def _codebook_block(sums, w, quads, xq, x0):
    """sums[lane] = the integer dot product of one block of 32 (16 nibble bytes in 4 quads at
    `quads`) with xq.flat[x0:x0 + 32], for the 64 lanes."""
    sums[:] = 0
    for j in range(QK // 2 // QUADS):
        for lanes in range(0, ROW_GROUP, DOT4_LANES):
            at = quads + QUADS * (j * ROW_GROUP + lanes)
            dot4_codebook(sums, lanes, w, at, 0, xq, x0 + QUADS * j)
            dot4_codebook(sums, lanes, w, at, 4, xq, x0 + QK // 2 + QUADS * j)


@njit(parallel=True, cache=True)
def matmul_iq4_nl(w, xq, xd, xs, out):
    """IQ4_NL weights (fp16 d in planes 0-1, the nibbles in quads), integer activations: per
    block, d * x's scale * the integer sum (xs, the activations' sums, is not needed)."""
    for g in prange(w.shape[0]):
        scaled_blocks_group(_codebook_block, w, xq, xd, out, np.int64(g), True)


@njit(inline="always")
def _xs_scales(w, g, b, scales):
    """scales[i * 64 + lane] = the scale of sub-block i of the lane's block, minus 32, as float32."""
    for i in range(SUB_BLOCKS):
        for lane in range(ROW_GROUP):
            high_bits = np.int32(w[g, b, ROW_GROUP * 2 + lane]) | (np.int32(w[g, b, ROW_GROUP * 3 + lane]) << 8)
            scales[i * ROW_GROUP + lane] = np.float32(_xs_scale(w[g, b, ROW_GROUP * (4 + i // 2) + lane], high_bits, i))


@njit(inline="always")
def _xs_scaled(block, at, sums, sums_at, scales, i, x_scale, lanes, n):
    """block[at + l] += x's scale * the sub-block's scale * sums[sums_at + l], lanes l from `lanes`, n of them."""
    for lane in range(n):
        block[at + lanes + lane] = fma(x_scale * scales[i * ROW_GROUP + lanes + lane], np.float32(sums[sums_at + lane]),
                                       block[at + lanes + lane])


@njit(forceinline=True)
def _iq4_xs_group(w, xq, xd, xs, out, g):
    """Group g of matmul_iq4_xs (layout.py: one group per work item). No fast-math: its float
    operations are spelled out (bits.fma) and happen in the order of _iq4_xs_tiles', so a token
    gets the same bits from either kernel."""
    n_groups, n_blocks, group_bytes = w.shape
    cols = xq.shape[1]
    sums = stack_array(np.int32, 1, ROW_GROUP)
    scales = stack_array(np.float32, SUB_BLOCKS, ROW_GROUP)
    block = stack_array(np.float32, 1, ROW_GROUP)
    acc = stack_array(np.float32, 1, ROW_GROUP)
    for t in range(xq.shape[0]):
        acc[:] = 0.0
        for b in range(n_blocks):
            _xs_scales(w, g, b, scales)
            block[:] = 0.0
            quads = (g * n_blocks + b) * group_bytes + 8 * ROW_GROUP
            for i in range(QK_K // QK):
                prefetch_ahead(w, g, b, i, QK_K // QK)
                _codebook_block(sums, w, quads + i * (QK // 2) * ROW_GROUP, xq, t * cols + b * QK_K + i * QK)
                _xs_scaled(block, 0, sums, 0, scales, i, xd[t, b * (QK_K // QK) + i], 0, ROW_GROUP)
            add_scaled_block(w, g, b, 0, block, acc, 0)   # d in planes 0-1
        store_group(out, t, g, acc)


@njit(forceinline=True)
def _iq4_xs_tiles(w, xq, xd, xs, out, g):
    """Group g of matmul_iq4_xs_tiles: _iq4_xs_group for TOKEN_TILE tokens at a time. Each quad
    of nibbles is looked up once for all of them, and each block's scales decoded once (the
    lanes in runs of 8, as quant._q4_0_tile)."""
    n_groups, n_blocks, group_bytes = w.shape
    cols = xq.shape[1]
    sums = stack_array(np.int32, TOKEN_TILE, DOT4_LANES)
    scales = stack_array(np.float32, SUB_BLOCKS, ROW_GROUP)
    block = stack_array(np.float32, TOKEN_TILE, ROW_GROUP)
    acc = stack_array(np.float32, TOKEN_TILE, ROW_GROUP)
    for t0 in range(0, xq.shape[0] - TOKEN_TILE + 1, TOKEN_TILE):
        acc[:] = 0.0
        for b in range(n_blocks):
            _xs_scales(w, g, b, scales)
            block[:] = 0.0
            quads = (g * n_blocks + b) * group_bytes + 8 * ROW_GROUP
            for i in range(QK_K // QK):
                prefetch_ahead(w, g, b, i, QK_K // QK)
                sub_block = quads + i * (QK // 2) * ROW_GROUP
                for lanes in range(0, ROW_GROUP, DOT4_LANES):
                    sums[:] = 0
                    for j in range(QK // 2 // QUADS):
                        at = sub_block + QUADS * (j * ROW_GROUP + lanes)
                        for k in range(TOKEN_TILE):
                            x0 = (t0 + k) * cols + b * QK_K + i * QK
                            dot4_codebook(sums, k * DOT4_LANES, w, at, 0, xq, x0 + QUADS * j)
                            dot4_codebook(sums, k * DOT4_LANES, w, at, 4, xq, x0 + QK // 2 + QUADS * j)
                    for k in range(TOKEN_TILE):
                        _xs_scaled(block, k * ROW_GROUP, sums, k * DOT4_LANES, scales, i,
                                   xd[t0 + k, b * (QK_K // QK) + i], lanes, DOT4_LANES)
            for k in range(TOKEN_TILE):
                add_scaled_block(w, g, b, 0, block, acc, k * ROW_GROUP)
        store_tile(out, t0, g, acc)


@njit(parallel=True, cache=True)
def matmul_iq4_xs(w, xq, xd, xs, out):
    """IQ4_XS weights (d, scales_h, scales_l in planes 0-7, the nibbles in quads), integer
    activations: per sub-block of 32, x's scale * (ls - 32) * the integer sum; per block, d."""
    for g in prange(w.shape[0]):
        _iq4_xs_group(w, xq, xd, xs, out, np.int64(g))


@njit(parallel=True, cache=True)
def matmul_iq4_xs_tiles(w, xq, xd, xs, out):
    """matmul_iq4_xs for a multiple of TOKEN_TILE tokens, a tile at a time (_iq4_xs_tiles)."""
    for g in prange(w.shape[0]):
        _iq4_xs_tiles(w, xq, xd, xs, out, np.int64(g))
