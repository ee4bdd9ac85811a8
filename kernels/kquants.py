"""The k-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (super-blocks of 256 weights).

Row decoders, bit-exact with ggml's reference dequantization (and the gguf package): the same
float32 operations in the same order, without fast-math, so no fused multiply-adds. Matrix
products read the interleaved layout of kernels/layout.py, take int8 activations and keep
their quants in quads: integer sums of q * x per block or sub-block (bits.dot4_*), then per lane
    sum d * sc * q * x - dmin * m * x  =  d * sc * sum(q * x) - dmin * m * sum(x)

    Q4_K, 256 weights in 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) for 8
          sub-blocks of 32, 128 bytes of nibbles;                      w = d * sc * q - dmin * m
    Q5_K, 256 weights in 176 bytes: Q4_K's 16 bytes, 32 bytes of fifth bits qh, 128 bytes of
          nibbles;                                                      w = d * sc * q - dmin * m
    Q6_K, 256 weights in 210 bytes: 128 bytes low nibbles, 64 bytes of high 2 bits,
          16 int8 scales (one per 16 weights), fp16 d;                  w = d * sc * (q - 32)
    Q3_K, 256 weights in 110 bytes: 32 bytes of high bits hmask, 64 bytes of 2-bit quants,
          12 bytes of 6-bit scales (one per 16), fp16 d;                w = d * (sc - 32) * (q - 4)
    Q2_K, 256 weights in 84 bytes: 16 bytes of 4-bit (scale, min) pairs (one per 16), 64 bytes
          of 2-bit quants, fp16 d, fp16 dmin;                           w = d * sc * q - dmin * m
The 2-bit quants of Q2_K and Q3_K: weight 128 n + 32 j + l (l < 32) is bits 2j, 2j + 1 of byte
32 n + l; Q3_K's third bit is bit 4 n + j of hmask[l] (set: no offset, clear: -4); Q5_K's fifth
bit of weight 32 i + l is bit i of qh[l]; Q6_K's layout is at matmul_q6_k.
"""
import numpy as np
from numba import njit, prange

from . import compiler  # noqa: F401  (numba's settings before any kernel is defined)
from .bits import (DOT4_LANES, dot4_bits, dot4_bits_partial, dot4_partial, f16_at_bytes, fma, scaled_offset_sums,
                   scaled_sums, stack_array)
from .layout import (PLANES, QUADS, QUADS_IN_ROWS, ROW_GROUP, TOKEN_TILE, add_scaled_block, f16_at, prefetch_ahead,
                     quad_in_runs, store_group, store_tile)

QK_K = 256
Q2_K_BYTES = 84
Q3_K_BYTES = 110
Q4_K_BYTES = 144
Q5_K_BYTES = 176
Q6_K_BYTES = 210


@njit(inline="always")
def _scale_min_k4(row, scales_at, j):
    """The 6-bit scale and min of sub-block j, packed in 12 bytes as ggml's get_scale_min_k4."""
    if j < 4:
        sc = np.int32(row[scales_at + j]) & 63
        m = np.int32(row[scales_at + j + 4]) & 63
    else:
        sc = (np.int32(row[scales_at + j + 4]) & 0xF) | ((np.int32(row[scales_at + j - 4]) >> 6) << 4)
        m = (np.int32(row[scales_at + j + 4]) >> 4) | ((np.int32(row[scales_at + j]) >> 6) << 4)
    return sc, m


@njit(cache=True)
def decode_q4_k_row(row, dst):
    for b in range(dst.shape[0] // QK_K):
        o = b * Q4_K_BYTES
        d = f16_at_bytes(row, o)
        dmin = f16_at_bytes(row, o + 2)
        qs = o + 16
        y = b * QK_K
        for chunk in range(4):   # 64 weights: two sub-blocks sharing 32 bytes of nibbles
            sc1, m1 = _scale_min_k4(row, o + 4, 2 * chunk)
            sc2, m2 = _scale_min_k4(row, o + 4, 2 * chunk + 1)
            d1, min1 = d * np.float32(sc1), dmin * np.float32(m1)
            d2, min2 = d * np.float32(sc2), dmin * np.float32(m2)
            for l in range(32):
                q = row[qs + chunk * 32 + l]
                dst[y + chunk * 64 + l] = d1 * np.float32(np.int32(q & np.uint8(15))) - min1
                dst[y + chunk * 64 + 32 + l] = d2 * np.float32(np.int32(q >> np.uint8(4))) - min2


@njit(cache=True)
def decode_q6_k_row(row, dst):
    for b in range(dst.shape[0] // QK_K):
        o = b * Q6_K_BYTES
        d = f16_at_bytes(row, o + 208)
        for half in range(2):   # two halves of 128 weights
            ql = o + half * 64
            qh = o + 128 + half * 32
            sc = o + 192 + half * 8
            y = b * QK_K + half * 128
            for l in range(32):
                s = l // 16
                low_a = np.int32(row[ql + l])
                low_b = np.int32(row[ql + l + 32])
                high = np.int32(row[qh + l])
                q1 = ((low_a & 0xF) | (((high >> 0) & 3) << 4)) - 32
                q2 = ((low_b & 0xF) | (((high >> 2) & 3) << 4)) - 32
                q3 = ((low_a >> 4) | (((high >> 4) & 3) << 4)) - 32
                q4 = ((low_b >> 4) | (((high >> 6) & 3) << 4)) - 32
                dst[y + l] = d * np.float32(np.int8(row[sc + s])) * np.float32(q1)
                dst[y + l + 32] = d * np.float32(np.int8(row[sc + s + 2])) * np.float32(q2)
                dst[y + l + 64] = d * np.float32(np.int8(row[sc + s + 4])) * np.float32(q3)
                dst[y + l + 96] = d * np.float32(np.int8(row[sc + s + 6])) * np.float32(q4)


@njit(cache=True)
def decode_q5_k_row(row, dst):
    for b in range(dst.shape[0] // QK_K):
        o = b * Q5_K_BYTES
        d = f16_at_bytes(row, o)
        dmin = f16_at_bytes(row, o + 2)
        for i in range(8):   # sub-blocks of 32
            sc, m = _scale_min_k4(row, o + 4, i)
            scale, low = d * np.float32(sc), dmin * np.float32(m)
            for l in range(32):
                nibble = (np.int32(row[o + 48 + 32 * (i // 2) + l]) >> (4 * (i % 2))) & 15
                q = nibble | (((np.int32(row[o + 16 + l]) >> i) & 1) << 4)
                dst[b * QK_K + 32 * i + l] = scale * np.float32(q) - low


@njit(inline="always")
def _q3_k_scale(row, scales_at, k):
    """The 6-bit scale k (< 16) of a Q3_K block, minus 32: low 4 bits in bytes 0-7 (k, then
    k - 8 in the high nibbles), high 2 bits in bytes 8-11."""
    low = (np.int32(row[scales_at + k % 8]) >> (4 * (k // 8))) & 15
    high = (np.int32(row[scales_at + 8 + k % 4]) >> (2 * (k // 4))) & 3
    return (low | (high << 4)) - 32


@njit(cache=True)
def decode_q3_k_row(row, dst):
    for b in range(dst.shape[0] // QK_K):
        o = b * Q3_K_BYTES
        d = f16_at_bytes(row, o + 108)
        for n in range(2):
            for j in range(4):
                for l in range(32):
                    k = 8 * n + 2 * j + l // 16
                    q = (np.int32(row[o + 32 + 32 * n + l]) >> (2 * j)) & 3
                    if not (np.int32(row[o + l]) >> (4 * n + j)) & 1:
                        q -= 4
                    dst[b * QK_K + 128 * n + 32 * j + l] = (d * np.float32(_q3_k_scale(row, o + 96, k))) * np.float32(q)


@njit(cache=True)
def decode_q2_k_row(row, dst):
    for b in range(dst.shape[0] // QK_K):
        o = b * Q2_K_BYTES
        d = f16_at_bytes(row, o + 80)
        dmin = f16_at_bytes(row, o + 82)
        for n in range(2):
            for j in range(4):
                for l in range(32):
                    pair = np.int32(row[o + 8 * n + 2 * j + l // 16])
                    q = (np.int32(row[o + 16 + 32 * n + l]) >> (2 * j)) & 3
                    dst[b * QK_K + 128 * n + 32 * j + l] = ((d * np.float32(pair & 15)) * np.float32(q)
                                                             - dmin * np.float32(pair >> 4))


# --- matrix products (packed weights, integer activations) --------------------------------------

@njit(inline="always")
def _k4_scale_bytes(w, g, b, scales, mins):
    """scales[j * 64 + lane] and mins[j * 64 + lane]: the 6-bit scale and min of sub-block j, from
    the 12 bytes (planes 4-15) as ggml's get_scale_min_k4 unpacks them; branch-free loops over
    the lanes, which LLVM vectorizes."""
    for j in range(4):
        for lane in range(ROW_GROUP):
            scales[j * ROW_GROUP + lane] = w[g, b, ROW_GROUP * (4 + j) + lane] & np.uint8(63)
            mins[j * ROW_GROUP + lane] = w[g, b, ROW_GROUP * (8 + j) + lane] & np.uint8(63)
    for j in range(4, 8):
        for lane in range(ROW_GROUP):
            packed = w[g, b, ROW_GROUP * (8 + j) + lane]
            scales[j * ROW_GROUP + lane] = np.uint8(
                (packed & np.uint8(15)) | ((w[g, b, ROW_GROUP * j + lane] >> np.uint8(6)) << np.uint8(4)))
            mins[j * ROW_GROUP + lane] = np.uint8(
                (packed >> np.uint8(4)) | ((w[g, b, ROW_GROUP * (4 + j) + lane] >> np.uint8(6)) << np.uint8(4)))


@njit(inline="always")
def _k_minimums(block_min, at, mins, j, xd, xs, t, x0):
    """block_min[at + lane] += sum over sub-blocks j, j + 1 (of 32 weights, from column x0) of
    the lane's min times the sum of token t's activations (in units of x's scales): the part of
    sum (d sc q - dmin m) x that dmin multiplies (Q4_K, Q5_K)."""
    min_lo = xd[t, x0 // 32] * np.float32(xs[t, x0 // 16] + xs[t, x0 // 16 + 1])   # sums of 16
    min_hi = xd[t, x0 // 32 + 1] * np.float32(xs[t, x0 // 16 + 2] + xs[t, x0 // 16 + 3])
    for lane in range(ROW_GROUP):
        block_min[at + lane] = fma(min_hi, np.float32(np.int32(mins[(j + 1) * ROW_GROUP + lane])),
                                   fma(min_lo, np.float32(np.int32(mins[j * ROW_GROUP + lane])), block_min[at + lane]))


@njit(inline="always")
def _q4_k_chunk(w, g, b, chunk):
    """Chunk `chunk` of Q4_K block b in group g (64 weights: sub-blocks 2 chunk and 2 chunk + 1):
    prefetches its share of the stream ahead, and returns its first column and the flat offset
    of its 32 quads of nibbles (after the 16 planes of d, dmin and the scales)."""
    n_groups, n_blocks, group_bytes = w.shape
    prefetch_ahead(w, g, b, chunk, 4)
    return b * QK_K + chunk * 64, (g * n_blocks + b) * group_bytes + ROW_GROUP * (16 + 32 * chunk)


@njit(forceinline=True)
def _q4_k_group(w, xq, xd, xs, out, g):
    """Group g of matmul_q4_k (layout.py: one group per work item), a token at a time."""
    n_groups, n_blocks, group_bytes = w.shape
    cols = xq.shape[1]
    partial = stack_array(np.int32, 2, ROW_GROUP)
    part = stack_array(np.int32, 2, ROW_GROUP)
    scales = stack_array(np.uint8, 8, ROW_GROUP)
    mins = stack_array(np.uint8, 8, ROW_GROUP)
    block = stack_array(np.float32, 1, ROW_GROUP)
    block_min = stack_array(np.float32, 1, ROW_GROUP)
    acc = stack_array(np.float32, 1, ROW_GROUP)
    for t in range(xq.shape[0]):
        acc[:] = 0.0
        for b in range(n_blocks):
            _k4_scale_bytes(w, g, b, scales, mins)
            block[:] = 0.0
            block_min[:] = 0.0
            for chunk in range(4):
                x0, quads = _q4_k_chunk(w, g, b, chunk)
                partial[:] = 0
                for j in range(32 // QUADS):
                    for lanes in range(0, ROW_GROUP, DOT4_LANES):
                        at = quads + QUADS * (j * ROW_GROUP + lanes)
                        dot4_partial(partial, lanes, w, at, xq, t * cols + x0 + QUADS * j, 0, 4)
                        dot4_partial(partial, ROW_GROUP + lanes, w, at, xq, t * cols + x0 + 32 + QUADS * j, 4, 4)
                j = 2 * chunk
                for lanes in range(0, 2 * ROW_GROUP, DOT4_LANES):   # sub-blocks j and j + 1
                    scaled_sums(part, lanes, partial, lanes, scales, j * ROW_GROUP + lanes)
                d_lo, d_hi = xd[t, x0 // 32], xd[t, x0 // 32 + 1]
                _k_sub_blocks(block, 0, part, 0, d_lo, d_hi)
                _k_minimums(block_min, 0, mins, j, xd, xs, t, x0)
            _k_scaled(w, g, b, block, block_min, acc, 0)
        store_group(out, t, g, acc)


@njit(inline="always")
def _k_sub_blocks(block, at, part, part_at, d_lo, d_hi):
    """block[at + lane] += d_lo * part[part_at + lane] + d_hi * part[part_at + 64 + lane]: two
    sub-blocks' scaled integer sums times x's scales (Q4_K)."""
    for lane in range(ROW_GROUP):
        block[at + lane] = fma(d_hi, np.float32(part[part_at + ROW_GROUP + lane]),
                               fma(d_lo, np.float32(part[part_at + lane]), block[at + lane]))


@njit(inline="always")
def _k_scaled(w, g, b, block, block_min, acc, at):
    """acc[at + lane] += d * block - dmin * block_min (Q4_K, Q5_K: d and dmin in planes 0-3)."""
    for lane in range(ROW_GROUP):
        acc[at + lane] += fma(f16_at(w, g, b, 0, lane), block[at + lane],
                              -f16_at(w, g, b, 2, lane) * block_min[at + lane])


TILE_SUB_BLOCKS = 2 * TOKEN_TILE   # sums per run of 8 lanes in a tile: 2 sub-blocks per token
TILE_HALF_SUB_BLOCKS = 2 * TILE_SUB_BLOCKS   # Q5_K: each sub-block's two halves


@njit(forceinline=True)
def _q4_k_tiles(w, xq, xd, xs, out, g):
    """Group g of matmul_q4_k_tiles: _q4_k_group for TOKEN_TILE tokens at a time. Each quad
    of nibbles is loaded and unpacked once for all of them, and each block's scales and mins
    once (as quant._q4_0_tile: the lanes in runs of 8 through each chunk of the block)."""
    n_groups, n_blocks, group_bytes = w.shape
    cols = xq.shape[1]
    partial = stack_array(np.int32, TILE_SUB_BLOCKS, DOT4_LANES)   # [2 k + h]: token k, sub-block h
    part = stack_array(np.int32, TILE_SUB_BLOCKS, ROW_GROUP)
    scales = stack_array(np.uint8, 8, ROW_GROUP)
    mins = stack_array(np.uint8, 8, ROW_GROUP)
    block = stack_array(np.float32, TOKEN_TILE, ROW_GROUP)
    block_min = stack_array(np.float32, TOKEN_TILE, ROW_GROUP)
    acc = stack_array(np.float32, TOKEN_TILE, ROW_GROUP)
    for t0 in range(0, xq.shape[0] - TOKEN_TILE + 1, TOKEN_TILE):
        acc[:] = 0.0
        for b in range(n_blocks):
            _k4_scale_bytes(w, g, b, scales, mins)
            block[:] = 0.0
            block_min[:] = 0.0
            for chunk in range(4):
                x0, quads = _q4_k_chunk(w, g, b, chunk)
                j = 2 * chunk
                for lanes in range(0, ROW_GROUP, DOT4_LANES):
                    partial[:] = 0
                    for quad in range(32 // QUADS):
                        at = quads + QUADS * (quad * ROW_GROUP + lanes)
                        for k in range(TOKEN_TILE):
                            x = (t0 + k) * cols + x0 + QUADS * quad
                            dot4_partial(partial, 2 * k * DOT4_LANES, w, at, xq, x, 0, 4)
                            dot4_partial(partial, (2 * k + 1) * DOT4_LANES, w, at, xq, x + 32, 4, 4)
                    for h in range(TILE_SUB_BLOCKS):   # token h // 2, sub-block j + h % 2
                        scaled_sums(part, h * ROW_GROUP + lanes, partial, h * DOT4_LANES, scales,
                                    (j + h % 2) * ROW_GROUP + lanes)
                for k in range(TOKEN_TILE):
                    d_lo, d_hi = xd[t0 + k, x0 // 32], xd[t0 + k, x0 // 32 + 1]
                    _k_sub_blocks(block, k * ROW_GROUP, part, 2 * k * ROW_GROUP, d_lo, d_hi)
                    _k_minimums(block_min, k * ROW_GROUP, mins, j, xd, xs, t0 + k, x0)
            for k in range(TOKEN_TILE):
                _k_scaled(w, g, b, block, block_min, acc, k * ROW_GROUP)
        store_tile(out, t0, g, acc)


@njit(parallel=True, cache=True)
def matmul_q4_k(w, xq, xd, xs, out):
    """Q4_K with integer activations (blocks of 32 = one sub-block). The 128 nibble bytes are in
    quads (layout.py; planes 0-15 hold d, dmin and the scales): for chunk c, quad j of a lane
    holds weights 64c + 4j.. (low nibbles, sub-block 2c) and 64c + 32 + 4j.. (high, 2c + 1).
    Per block and lane, with x_j the activations' scale of sub-block j:
        d * sum_j x_j * (sc_j * sum q x)  -  dmin * sum_j m_j * (x_j * sum x)
    sc_j * sum q x is integer: partial sums per quad (bits.dot4_partial), multiplied by
    the 6-bit scales as they are widened (bits.scaled_sums); sum x comes from xs
    (quant.quantize_for_matmul). The scales and mins stay bytes until then: converting all
    of them to float32 in every block took about a third of the kernel's time."""
    for g in prange(w.shape[0]):
        _q4_k_group(w, xq, xd, xs, out, np.int64(g))


@njit(parallel=True, cache=True)
def matmul_q4_k_tiles(w, xq, xd, xs, out):
    """matmul_q4_k for a multiple of TOKEN_TILE tokens, a tile at a time (_q4_k_tiles)."""
    for g in prange(w.shape[0]):
        _q4_k_tiles(w, xq, xd, xs, out, np.int64(g))


def _q6_k_runs() -> tuple:
    """Q6_K's packed block (layout.byte_positions), in the order matmul_q6_k reads it."""
    runs = [(192, Q6_K_BYTES, PLANES)]   # the 16 int8 scales and d, in planes
    for half in range(2):               # 128 weights: ql[64 half:][:64], qh[128 + 32 half:][:32]
        ql, qh = 64 * half, 128 + 32 * half
        for j in range(8):              # quad j of ql[0:32] and quad j of qh, in turn
            runs += [(ql + 4 * j, ql + 4 * j + 4, QUADS_IN_ROWS), (qh + 4 * j, qh + 4 * j + 4, QUADS_IN_ROWS)]
        runs.append((ql + 32, ql + 64, QUADS_IN_ROWS))   # then ql[32:64]
    return tuple(runs)


Q6_K_RUNS = _q6_k_runs()
QUAD_BYTES = QUADS * ROW_GROUP      # one quad of 64 lanes
Q6_K_HALF = 18 * ROW_GROUP          # where the first half's quads start, after the scales and d
Q6_K_HALF_BYTES = 96 * ROW_GROUP


@njit(inline="always")
def _q6_quarter(w, g, b, half_start, half, i, low_shift, high_shift, xq, xd, xs, t, x0, part, block):
    """block += the products of quarter i (weights 32 i .. 32 i + 31) of a half-block of Q6_K, for
    the 64 lanes, before the block's d; the shifts are constants of each call (see matmul_q6_k).

    w, g, b: the packed weights, the group of 64 rows and the block; half_start: the flat offset
    of the half-block's quads; half, i: which half and quarter; low_shift, high_shift: where the
    quarter's 4 low bits sit in ql and its 2 high bits in qh; xq, xd, xs: the integer activations,
    their scales per 32 and sums per 16; t, x0: the token and the quarter's first column; part:
    scratch sums per 16 weights; block: the block's running sums, one per lane."""
    cols = xq.shape[1]
    for s in range(2):   # 16 weights share a scale: part[64 s + lane]
        part[s * ROW_GROUP:(s + 1) * ROW_GROUP] = 0
        for j in range(4 * s, 4 * s + 4):
            pair = half_start + 2 * QUAD_BYTES * j   # Q6_K_RUNS: quad j of ql[0:32], then of qh
            low = pair if i % 2 == 0 else half_start + 16 * QUAD_BYTES + QUAD_BYTES * j   # or of ql[32:64]
            high = pair + QUAD_BYTES
            for lanes in range(0, ROW_GROUP, DOT4_LANES):
                dot4_bits(part, s * ROW_GROUP + lanes, w, low + QUADS * lanes, low_shift, 4, high + QUADS * lanes,
                          high_shift, 2, xq, t * cols + x0 + QUADS * j)
    sc = 8 * half + 2 * i   # the int8 scales of the two halves are planes sc and sc + 1
    offset_0 = np.int32(32 * xs[t, x0 // 16])       # 32 * the sums of the 16 activations
    offset_1 = np.int32(32 * xs[t, x0 // 16 + 1])
    x_scale = xd[t, x0 // 32]
    for lane in range(ROW_GROUP):
        # sc * sum (q - 32) x in int32: exact (at most 128 * 16 * 32 * 127, below 2^23)
        first = np.int32(np.int32(np.int8(w[g, b, ROW_GROUP * sc + lane])) * np.int32(part[lane] - offset_0))
        second = np.int32(np.int32(np.int8(w[g, b, ROW_GROUP * (sc + 1) + lane]))
                          * np.int32(part[ROW_GROUP + lane] - offset_1))
        block[lane] += x_scale * (np.float32(first) + np.float32(second))


@njit(fastmath=True, forceinline=True)
def _q6_k_group(w, xq, xd, xs, out, g):
    """Group g of matmul_q6_k (layout.py: one group per work item)."""
    n_groups, n_blocks, group_bytes = w.shape
    part = stack_array(np.int32, 2, ROW_GROUP)
    block = stack_array(np.float32, 1, ROW_GROUP)
    acc = stack_array(np.float32, 1, ROW_GROUP)
    for t in range(xq.shape[0]):
        acc[:] = 0.0
        for b in range(n_blocks):
            block[:] = 0.0
            for half in range(2):
                at = (g * n_blocks + b) * group_bytes + Q6_K_HALF + half * Q6_K_HALF_BYTES
                x0 = b * QK_K + half * 128
                prefetch_ahead(w, g, b + 1, 4 * half, 8, always=True)
                _q6_quarter(w, g, b, at, half, 0, 0, 0, xq, xd, xs, t, x0, part, block)
                prefetch_ahead(w, g, b + 1, 4 * half + 1, 8, always=True)
                _q6_quarter(w, g, b, at, half, 1, 0, 2, xq, xd, xs, t, x0 + 32, part, block)
                prefetch_ahead(w, g, b + 1, 4 * half + 2, 8, always=True)
                _q6_quarter(w, g, b, at, half, 2, 4, 4, xq, xd, xs, t, x0 + 64, part, block)
                prefetch_ahead(w, g, b + 1, 4 * half + 3, 8, always=True)
                _q6_quarter(w, g, b, at, half, 3, 4, 6, xq, xd, xs, t, x0 + 96, part, block)
            for lane in range(ROW_GROUP):   # the int8 scales are planes 0-15, d is in 16-17
                acc[lane] += f16_at(w, g, b, 16, lane) * block[lane]
        store_group(out, t, g, acc)


@njit(parallel=True, cache=True)
def matmul_q6_k(w, xq, xd, xs, out):
    """Q6_K with integer activations (xs: their sums per 16), packed as Q6_K_RUNS.
    In each half of 128 weights, weight 32 i + l (l < 32) is the nibble at bit 4 (i // 2) of
    ql[32 (i % 2) + l] with the 2 bits at bit 2 i of qh[l] above it, minus 32; its scale is
    sc[8 half + 2 i + l // 16]. So quad j of ql and of qh gives 4 consecutive weights of each
    quarter i (bits.dot4_bits), summed for all 64 lanes per 16 weights; the -32 is applied
    then, as -32 * sum x, and the int8 scale as an integer (float scales per 16 weights cost a
    tenth of the kernel's time). Each quarter is its own call, so that its shifts are constants.
    Before each quarter it prefetches an eighth of the next block (layout.prefetch_ahead, on every
    CPU): the quarters read their bytes in bursts and then compute on them from L1, and in those
    gaps nothing asks memory for more; with the hints the next block streams in meanwhile. The
    block is read in order, front to back (see the README's kernel notes for what the
    alternatives measured)."""
    for g in prange(w.shape[0]):
        _q6_k_group(w, xq, xd, xs, out, np.int64(g))


@njit(forceinline=True)
def _q5_k_chunk(w, g, b, high, chunk, scales, mins, xq, xd, xs, t, partial, part, block, block_min):
    """block and block_min += the products of chunk `chunk` (64 weights, sub-blocks 2 chunk and
    2 chunk + 1) of a Q5_K block, for the 64 lanes; high: the flat offset of the block's qh
    quads. chunk is a constant of each call (see matmul_q5_k), so that the shifts are."""
    cols = xq.shape[1]
    prefetch_ahead(w, g, b, chunk, 4)
    partial[:] = 0
    x0 = b * QK_K + chunk * 64
    low = high + QUAD_BYTES * (8 + 8 * chunk)
    for lanes in range(0, ROW_GROUP, DOT4_LANES):   # in the order of the packed quads (matmul_q5_k)
        for half in range(2):
            for j in range(4 * half, 4 * half + 4):
                at, bits_at = low + quad_in_runs(lanes, j), high + quad_in_runs(lanes, j)
                dot4_bits_partial(partial, half * ROW_GROUP + lanes, w, at, 0, 4, bits_at, 2 * chunk, 1, xq,
                                  t * cols + x0 + QUADS * j)
                dot4_bits_partial(partial, (2 + half) * ROW_GROUP + lanes, w, at, 4, 4, bits_at, 2 * chunk + 1, 1,
                                  xq, t * cols + x0 + 32 + QUADS * j)
    j = 2 * chunk
    for lanes in range(0, 2 * ROW_GROUP, DOT4_LANES):   # sub-block j: both halves, then j + 1
        scaled_sums(part, lanes, partial, lanes, scales, j * ROW_GROUP + lanes % ROW_GROUP)
        scaled_sums(part, 2 * ROW_GROUP + lanes, partial, 2 * ROW_GROUP + lanes, scales,
                    (j + 1) * ROW_GROUP + lanes % ROW_GROUP)
    _k5_sub_blocks(block, 0, part, 0, xd[t, x0 // 32], xd[t, x0 // 32 + 1])
    _k_minimums(block_min, 0, mins, j, xd, xs, t, x0)


@njit(inline="always")
def _k5_sub_blocks(block, at, part, part_at, d_lo, d_hi):
    """block[at + lane] += d_lo * (both halves of sub-block j) + d_hi * (both of j + 1), from
    part[part_at + 64 p + lane], p = 2 * sub-block + half (Q5_K)."""
    for lane in range(ROW_GROUP):
        lo = np.float32(part[part_at + lane]) + np.float32(part[part_at + ROW_GROUP + lane])
        hi = np.float32(part[part_at + 2 * ROW_GROUP + lane]) + np.float32(part[part_at + 3 * ROW_GROUP + lane])
        block[at + lane] = fma(d_hi, hi, fma(d_lo, lo, block[at + lane]))


@njit(forceinline=True)
def _q5_k_group(w, xq, xd, xs, out, g):
    """Group g of matmul_q5_k (layout.py: one group per work item). No fast-math: its float
    operations are spelled out (bits.fma) and happen in the order of _q5_k_tiles', so a token
    gets the same bits from either kernel."""
    n_groups, n_blocks, group_bytes = w.shape
    partial = stack_array(np.int32, 4, ROW_GROUP)
    part = stack_array(np.int32, 4, ROW_GROUP)
    scales = stack_array(np.uint8, 8, ROW_GROUP)
    mins = stack_array(np.uint8, 8, ROW_GROUP)
    block = stack_array(np.float32, 1, ROW_GROUP)
    block_min = stack_array(np.float32, 1, ROW_GROUP)
    acc = stack_array(np.float32, 1, ROW_GROUP)
    for t in range(xq.shape[0]):
        acc[:] = 0.0
        for b in range(n_blocks):
            _k4_scale_bytes(w, g, b, scales, mins)
            block[:] = 0.0
            block_min[:] = 0.0
            high = (g * n_blocks + b) * group_bytes + 16 * ROW_GROUP
            _q5_k_chunk(w, g, b, high, 0, scales, mins, xq, xd, xs, t, partial, part, block, block_min)
            _q5_k_chunk(w, g, b, high, 1, scales, mins, xq, xd, xs, t, partial, part, block, block_min)
            _q5_k_chunk(w, g, b, high, 2, scales, mins, xq, xd, xs, t, partial, part, block, block_min)
            _q5_k_chunk(w, g, b, high, 3, scales, mins, xq, xd, xs, t, partial, part, block, block_min)
            _k_scaled(w, g, b, block, block_min, acc, 0)
        store_group(out, t, g, acc)


@njit(parallel=True, cache=True)
def matmul_q5_k(w, xq, xd, xs, out):
    """Q5_K with integer activations: Q4_K's arithmetic (planes 0-15 hold d, dmin and the
    scales), with a fifth bit per weight. The quads hold qh (8 quads), then the nibbles (32):
    for chunk c of 64 weights, quad j of its nibbles and quad j of qh give weights 64c + 4j..
    (low nibbles, fifth bit 2c) and 64c + 32 + 4j.. (high nibbles, bit 2c + 1). Values to 31 fill
    int16 pair sums (bits.dot4_bits_partial) in 4 quads, so each sub-block of 32 has two partial
    sums of 16 weights (partial[64 p + lane], p = 2 * sub-block + half), each multiplied by the
    sub-block's 6-bit scale as it is widened (bits.scaled_sums). Each chunk is its own call, so
    that its shifts are constants. The lanes go in runs of 8, each run through the chunk's
    quads, as the tiles do: a run's four partial sums stay in registers (with the 64 lanes
    through each quad in turn, the 32 sums went through the stack), and the quads are packed in
    that order (layout.QUADS_IN_RUNS), so the block is still read front to back (in the other
    layout this order ran 1.18x in cache but 0.86-0.91x from memory; now 1.08-1.10x and 1.01-1.07x)."""
    for g in prange(w.shape[0]):
        _q5_k_group(w, xq, xd, xs, out, np.int64(g))


@njit(forceinline=True)
def _q5_k_tiles(w, xq, xd, xs, out, g):
    """Group g of matmul_q5_k_tiles: _q5_k_group for TOKEN_TILE tokens at a time. Each quad of
    nibbles and of fifth bits is loaded and put together once for all of them (as _q4_k_tiles:
    the lanes in runs of 8), one half of each sub-block at a time (the int16 pair sums hold 4
    quads of 5-bit values)."""
    n_groups, n_blocks, group_bytes = w.shape
    cols = xq.shape[1]
    partial = stack_array(np.int32, TILE_SUB_BLOCKS, DOT4_LANES)   # [2 k + h]: token k, sub-block h
    part = stack_array(np.int32, TILE_HALF_SUB_BLOCKS, ROW_GROUP)   # [4 k + 2 h + half]
    scales = stack_array(np.uint8, 8, ROW_GROUP)
    mins = stack_array(np.uint8, 8, ROW_GROUP)
    block = stack_array(np.float32, TOKEN_TILE, ROW_GROUP)
    block_min = stack_array(np.float32, TOKEN_TILE, ROW_GROUP)
    acc = stack_array(np.float32, TOKEN_TILE, ROW_GROUP)
    for t0 in range(0, xq.shape[0] - TOKEN_TILE + 1, TOKEN_TILE):
        acc[:] = 0.0
        for b in range(n_blocks):
            _k4_scale_bytes(w, g, b, scales, mins)
            block[:] = 0.0
            block_min[:] = 0.0
            high = (g * n_blocks + b) * group_bytes + 16 * ROW_GROUP
            for chunk in range(4):
                prefetch_ahead(w, g, b, chunk, 4)
                x0 = b * QK_K + chunk * 64
                low = high + QUAD_BYTES * (8 + 8 * chunk)
                j = 2 * chunk
                for lanes in range(0, ROW_GROUP, DOT4_LANES):
                    for half in range(2):
                        partial[:] = 0
                        for quad in range(4 * half, 4 * half + 4):
                            at, bits_at = low + quad_in_runs(lanes, quad), high + quad_in_runs(lanes, quad)
                            for k in range(TOKEN_TILE):
                                x = (t0 + k) * cols + x0 + QUADS * quad
                                dot4_bits_partial(partial, 2 * k * DOT4_LANES, w, at, 0, 4, bits_at, j, 1, xq, x)
                                dot4_bits_partial(partial, (2 * k + 1) * DOT4_LANES, w, at, 4, 4, bits_at, j + 1, 1,
                                                  xq, x + 32)
                        for h in range(TILE_SUB_BLOCKS):   # token h // 2, sub-block j + h % 2
                            scaled_sums(part, (2 * h + half) * ROW_GROUP + lanes, partial, h * DOT4_LANES, scales,
                                        (j + h % 2) * ROW_GROUP + lanes)
                for k in range(TOKEN_TILE):
                    _k5_sub_blocks(block, k * ROW_GROUP, part, 4 * k * ROW_GROUP, xd[t0 + k, x0 // 32],
                                   xd[t0 + k, x0 // 32 + 1])
                    _k_minimums(block_min, k * ROW_GROUP, mins, j, xd, xs, t0 + k, x0)
            for k in range(TOKEN_TILE):
                _k_scaled(w, g, b, block, block_min, acc, k * ROW_GROUP)
        store_tile(out, t0, g, acc)


@njit(parallel=True, cache=True)
def matmul_q5_k_tiles(w, xq, xd, xs, out):
    """matmul_q5_k for a multiple of TOKEN_TILE tokens, a tile at a time (_q5_k_tiles)."""
    for g in prange(w.shape[0]):
        _q5_k_tiles(w, xq, xd, xs, out, np.int64(g))


@njit(inline="always")
def _q3_k_scale_bytes(w, g, b, scales):
    """scales[k * 64 + lane] = the 6-bit scale k of the lane's block minus 32 (int8), from the
    12 bytes in planes 0-11, as decode_q3_k_row reads them: scales q, q + 4, q + 8, q + 12 take
    their low 4 bits from the low and high nibbles of bytes q and q + 4, and their high 2 bits
    from the four bit pairs of byte 8 + q. Written out so that every shift is a constant (a
    byte shift by a variable count is slow on x86; this took a quarter of the kernel's time)."""
    for q in range(4):
        for lane in range(ROW_GROUP):
            a = w[g, b, ROW_GROUP * q + lane]
            c = w[g, b, ROW_GROUP * (q + 4) + lane]
            h = w[g, b, ROW_GROUP * (8 + q) + lane]
            scales[q * ROW_GROUP + lane] = np.int8(
                np.int32((a & np.uint8(15)) | ((h & np.uint8(3)) << np.uint8(4))) - 32)
            scales[(q + 4) * ROW_GROUP + lane] = np.int8(
                np.int32((c & np.uint8(15)) | (((h >> np.uint8(2)) & np.uint8(3)) << np.uint8(4))) - 32)
            scales[(q + 8) * ROW_GROUP + lane] = np.int8(
                np.int32((a >> np.uint8(4)) | (((h >> np.uint8(4)) & np.uint8(3)) << np.uint8(4))) - 32)
            scales[(q + 12) * ROW_GROUP + lane] = np.int8(
                np.int32((c >> np.uint8(4)) | ((h >> np.uint8(6)) << np.uint8(4))) - 32)


@njit(inline="always")
def _q3_k_eighth(w, low, high, n, j, scales, xq, xd, xs, t, x0, partial, part, block):
    """block += the products of weights 128 n + 32 j .. + 31 of a Q3_K block (x0: the first
    one's column), for the 64 lanes; low, high: the flat offsets of half n's quants and of
    hmask. j is a constant of each call (see matmul_q3_k), so that the shifts are."""
    cols = xq.shape[1]
    partial[:] = 0
    for quad in range(32 // QUADS):   # 16 weights per scale: partial[64 s + lane]
        s = quad // 4
        for lanes in range(0, ROW_GROUP, DOT4_LANES):
            dot4_bits_partial(partial, s * ROW_GROUP + lanes, w, low + QUAD_BYTES * quad + QUADS * lanes, 2 * j, 2,
                              high + QUAD_BYTES * quad + QUADS * lanes, 4 * n + j, 1, xq, t * cols + x0 + QUADS * quad)
    k = 8 * n + 2 * j
    for lanes in range(0, 2 * ROW_GROUP, DOT4_LANES):   # scales k and k + 1
        scaled_offset_sums(part, lanes, partial, lanes, scales, k * ROW_GROUP + lanes,
                           _q3_k_offset(xs, t, x0 // 16 + lanes // ROW_GROUP))
    _q3_k_scaled(block, 0, part, 0, xd, t, x0)


@njit(inline="always")
def _q3_k_offset(xs, t, sixteen):
    """The quants' offset of 4 times the sum of token t's 16 activations `sixteen`: what
    scaled_offset_sums takes off each partial sum (at most 4 * 16 * 127, and a partial sum's
    first int16 half at most 4 * 2 * 7 * 127: their difference fits in int16)."""
    return np.int32(4 * xs[t, sixteen])


@njit(inline="always")
def _q3_k_scaled(block, at, part, part_at, xd, t, x0):
    """block[at + lane] += x's scale * (the sums of scales k and k + 1, in part[part_at + lane]
    and part[part_at + 64 + lane], each already less its offset)."""
    x_scale = xd[t, x0 // 32]
    for lane in range(ROW_GROUP):
        sums = np.int32(part[part_at + lane] + part[part_at + ROW_GROUP + lane])
        block[at + lane] = fma(x_scale, np.float32(sums), block[at + lane])


@njit(inline="always")
def _q3_k_block(eighth, w, g, b, scales, xq, xd, xs, t, partial, part, block):
    """block = the products of Q3_K block b of group g before its d, by the eighths of weights:
    for token t (eighth = _q3_k_eighth) or the tile of tokens from t (_q3_k_eighth_tiles). Each
    eighth is its own call, so that its shifts are constants."""
    n_groups, n_blocks, group_bytes = w.shape
    _q3_k_scale_bytes(w, g, b, scales)
    block[:] = 0.0
    high = (g * n_blocks + b) * group_bytes + 14 * ROW_GROUP
    for n in range(2):
        prefetch_ahead(w, g, b, n, 2)
        low, x0 = high + QUAD_BYTES * (8 + 8 * n), b * QK_K + 128 * n
        eighth(w, low, high, n, 0, scales, xq, xd, xs, t, x0, partial, part, block)
        eighth(w, low, high, n, 1, scales, xq, xd, xs, t, x0 + 32, partial, part, block)
        eighth(w, low, high, n, 2, scales, xq, xd, xs, t, x0 + 64, partial, part, block)
        eighth(w, low, high, n, 3, scales, xq, xd, xs, t, x0 + 96, partial, part, block)


@njit(forceinline=True)
def _q3_k_group(w, xq, xd, xs, out, g):
    """Group g of matmul_q3_k (layout.py: one group per work item). No fast-math: its float
    operations are spelled out (bits.fma) and happen in the order of _q3_k_tiles', so a token
    gets the same bits from either kernel."""
    n_groups, n_blocks, group_bytes = w.shape
    partial = stack_array(np.int32, 2, ROW_GROUP)
    part = stack_array(np.int32, 2, ROW_GROUP)
    scales = stack_array(np.int8, 16, ROW_GROUP)
    block = stack_array(np.float32, 1, ROW_GROUP)
    acc = stack_array(np.float32, 1, ROW_GROUP)
    for t in range(xq.shape[0]):
        acc[:] = 0.0
        for b in range(n_blocks):
            _q3_k_block(_q3_k_eighth, w, g, b, scales, xq, xd, xs, t, partial, part, block)
            add_scaled_block(w, g, b, 12, block, acc, 0)   # d in planes 12-13
        store_group(out, t, g, acc)


@njit(parallel=True, cache=True)
def matmul_q3_k(w, xq, xd, xs, out):
    """Q3_K with integer activations. Planes 0-11 hold the scales, 12-13 d; the quads hold hmask
    (8 quads), then the 2-bit quants (16). For half n and shift j, quad l of the quants (of
    half n) and quad l of hmask give weights 128 n + 32 j + 4 l.. (2 bits at 2 j, the third at
    bit 4 n + j), 0..7: partial sums per 16 weights (bits.dot4_bits_partial), multiplied by
    their signed scales (-32..31) as they are widened, less the -4 times the sum of the 16
    activations first (bits.scaled_offset_sums: no multiply for it). Each j is its own call, so
    that its shifts are constants (in cache, 8960 x 1536: 0.41 -> 0.35 ms, AMD Zen 2)."""
    for g in prange(w.shape[0]):
        _q3_k_group(w, xq, xd, xs, out, np.int64(g))


@njit(inline="always")
def _q3_k_eighth_tiles(w, low, high, n, j, scales, xq, xd, xs, t0, x0, partial, part, block):
    """_q3_k_eighth for the TOKEN_TILE tokens from t0: each quad of quants and of hmask put
    together once for all of them, the lanes in runs of 8 (as _q4_k_tiles)."""
    cols = xq.shape[1]
    k = 8 * n + 2 * j
    for lanes in range(0, ROW_GROUP, DOT4_LANES):
        partial[:] = 0
        for s in range(2):   # 16 weights per scale: partial[(2 token + s) * 8 + lane]
            for quad in range(4 * s, 4 * s + 4):
                at, bits_at = low + QUAD_BYTES * quad + QUADS * lanes, high + QUAD_BYTES * quad + QUADS * lanes
                for token in range(TOKEN_TILE):
                    dot4_bits_partial(partial, (2 * token + s) * DOT4_LANES, w, at, 2 * j, 2, bits_at, 4 * n + j, 1,
                                      xq, (t0 + token) * cols + x0 + QUADS * quad)
        for h in range(TILE_SUB_BLOCKS):   # token h // 2, scale k + h % 2
            scaled_offset_sums(part, h * ROW_GROUP + lanes, partial, h * DOT4_LANES, scales,
                               (k + h % 2) * ROW_GROUP + lanes, _q3_k_offset(xs, t0 + h // 2, x0 // 16 + h % 2))
    for token in range(TOKEN_TILE):
        _q3_k_scaled(block, token * ROW_GROUP, part, 2 * token * ROW_GROUP, xd, t0 + token, x0)


@njit(forceinline=True)
def _q3_k_tiles(w, xq, xd, xs, out, g):
    """Group g of matmul_q3_k_tiles: _q3_k_group for TOKEN_TILE tokens at a time."""
    n_groups, n_blocks, group_bytes = w.shape
    partial = stack_array(np.int32, TILE_SUB_BLOCKS, DOT4_LANES)
    part = stack_array(np.int32, TILE_SUB_BLOCKS, ROW_GROUP)
    scales = stack_array(np.int8, 16, ROW_GROUP)
    block = stack_array(np.float32, TOKEN_TILE, ROW_GROUP)
    acc = stack_array(np.float32, TOKEN_TILE, ROW_GROUP)
    for t0 in range(0, xq.shape[0] - TOKEN_TILE + 1, TOKEN_TILE):
        acc[:] = 0.0
        for b in range(n_blocks):
            _q3_k_block(_q3_k_eighth_tiles, w, g, b, scales, xq, xd, xs, t0, partial, part, block)
            for token in range(TOKEN_TILE):
                add_scaled_block(w, g, b, 12, block, acc, token * ROW_GROUP)
        store_tile(out, t0, g, acc)


@njit(parallel=True, cache=True)
def matmul_q3_k_tiles(w, xq, xd, xs, out):
    """matmul_q3_k for a multiple of TOKEN_TILE tokens, a tile at a time (_q3_k_tiles)."""
    for g in prange(w.shape[0]):
        _q3_k_tiles(w, xq, xd, xs, out, np.int64(g))


@njit(fastmath=True, forceinline=True)
def _q2_k_group(w, xq, xd, xs, out, g):
    """Group g of matmul_q2_k (layout.py: one group per work item)."""
    n_groups, n_blocks, group_bytes = w.shape
    cols = xq.shape[1]
    partial = stack_array(np.int32, 2, ROW_GROUP)
    part = stack_array(np.int32, 2, ROW_GROUP)
    scales = stack_array(np.uint8, 16, ROW_GROUP)
    block = stack_array(np.float32, 1, ROW_GROUP)
    block_min = stack_array(np.float32, 1, ROW_GROUP)
    acc = stack_array(np.float32, 1, ROW_GROUP)
    for t in range(xq.shape[0]):
        acc[:] = 0.0
        for b in range(n_blocks):
            for k in range(16 * ROW_GROUP):
                scales[k] = w[g, b, k] & np.uint8(15)
            block[:] = 0.0
            block_min[:] = 0.0
            quants = (g * n_blocks + b) * group_bytes + 20 * ROW_GROUP
            for n in range(2):
                prefetch_ahead(w, g, b, n, 2)
                for j in range(4):
                    partial[:] = 0
                    x0 = b * QK_K + 128 * n + 32 * j
                    for s in range(2):   # 16 weights per scale
                        for quad in range(4 * s, 4 * s + 4):
                            for lanes in range(0, ROW_GROUP, DOT4_LANES):
                                dot4_partial(partial, s * ROW_GROUP + lanes, w,
                                             quants + QUAD_BYTES * (8 * n + quad) + QUADS * lanes, xq,
                                             t * cols + x0 + QUADS * quad, 2 * j, 2)
                    k = 8 * n + 2 * j
                    for lanes in range(0, 2 * ROW_GROUP, DOT4_LANES):   # scales k and k + 1
                        scaled_sums(part, lanes, partial, lanes, scales, k * ROW_GROUP + lanes)
                    x_scale = xd[t, x0 // 32]
                    sum_0, sum_1 = np.int32(xs[t, x0 // 16]), np.int32(xs[t, x0 // 16 + 1])
                    for lane in range(ROW_GROUP):
                        block[lane] += x_scale * np.float32(np.int32(part[lane] + part[ROW_GROUP + lane]))
                        mins = np.int32(np.int32(np.int32(w[g, b, k * ROW_GROUP + lane] >> np.uint8(4)) * sum_0)
                                        + np.int32(np.int32(w[g, b, (k + 1) * ROW_GROUP + lane] >> np.uint8(4))
                                                   * sum_1))
                        block_min[lane] += x_scale * np.float32(mins)
            for lane in range(ROW_GROUP):
                acc[lane] += f16_at(w, g, b, 16, lane) * block[lane] - f16_at(w, g, b, 18, lane) * block_min[lane]
        store_group(out, t, g, acc)


@njit(parallel=True, cache=True)
def matmul_q2_k(w, xq, xd, xs, out):
    """Q2_K with integer activations. Planes 0-15 hold the (scale, min) bytes, 16-17 d, 18-19
    dmin; the quads hold the 2-bit quants: for half n and shift j, quad l of half n gives
    weights 128 n + 32 j + 4 l.. (bits.dot4_partial with 2 bits: int16 pair sums with AVX2),
    widened and multiplied by the 4-bit scales at once (bits.scaled_sums), as in Q4_K."""
    for g in prange(w.shape[0]):
        _q2_k_group(w, xq, xd, xs, out, np.int64(g))