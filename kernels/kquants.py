"""Formats that arrive in GGUF files: Q4_1, and the k-quants Q4_K and Q6_K of Ollama's Q4_K_M.

Row decoders, bit-exact with ggml's reference dequantization (and the gguf package): the same
float32 operations in the same order, without fast-math, so no fused multiply-adds. Matrix
products read the interleaved layout of kernels/layout.py with float32 activations: each lane
(an output row) sums q * x over a sub-block, then applies that sub-block's scale (and min):
    sum d * sc * q * x - dmin * m * x  =  d * sc * sum(q * x) - dmin * m * sum(x)
so the per-weight work is one conversion and one fused multiply-add.

    Q4_1, 32 weights in 20 bytes: fp16 d, fp16 m, 16 bytes of nibbles;  w = d * q + m
    Q4_K, 256 weights in 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) for 8
          sub-blocks of 32, 128 bytes of nibbles;                      w = d * sc * q - dmin * m
    Q6_K, 256 weights in 210 bytes: 128 bytes low nibbles, 64 bytes of high 2 bits,
          16 int8 scales (one per 16 weights), fp16 d;                  w = d * sc * (q - 32)
"""
import numpy as np
from numba import njit, prange

from .bits import DOT4_LANES, dot4_nibbles, half_at_bytes, stack_array
from .layout import QUADS, ROW_GROUP, half_at, prefetch_ahead, store_group

Q4_1_BYTES = 20
QK_K = 256
Q4_K_BYTES = 144
Q6_K_BYTES = 210


@njit(cache=True)
def decode_q4_1_row(row, dst):
    for b in range(dst.shape[0] // 32):
        o = b * Q4_1_BYTES
        d = half_at_bytes(row, o)
        m = half_at_bytes(row, o + 2)
        for j in range(16):
            q = row[o + 4 + j]
            dst[b * 32 + j] = np.float32(np.int32(q & np.uint8(15))) * d + m
            dst[b * 32 + j + 16] = np.float32(np.int32(q >> np.uint8(4))) * d + m


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
        d = half_at_bytes(row, o)
        dmin = half_at_bytes(row, o + 2)
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
        d = half_at_bytes(row, o + 208)
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


# --- matrix products (packed weights, float32 activations) --------------------------------------

LOW4 = np.uint8(15)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_q4_1(w, x, out):
    """Q4_1: planes 0-1 d, 2-3 m, 4 + j the nibbles of weights j and j + 16."""
    n_groups, n_blocks, _ = w.shape
    for g in prange(n_groups):
        block = stack_array(np.float32, 1, ROW_GROUP)
        acc = stack_array(np.float32, 1, ROW_GROUP)
        for t in range(x.shape[0]):
            acc[:] = 0.0
            for b in range(n_blocks):
                prefetch_ahead(w, g, b, 0, 1)
                block[:] = 0.0
                x_sum = np.float32(0.0)
                for k in range(16):
                    x_lo = x[t, b * 32 + k]
                    x_hi = x[t, b * 32 + k + 16]
                    x_sum += x_lo + x_hi
                    for lane in range(ROW_GROUP):
                        q = w[g, b, ROW_GROUP * (4 + k) + lane]
                        block[lane] += (np.float32(np.int32(q & np.uint8(15))) * x_lo
                                        + np.float32(np.int32(q >> np.uint8(4))) * x_hi)
                for lane in range(ROW_GROUP):
                    acc[lane] += half_at(w, g, b, 0, lane) * block[lane] + half_at(w, g, b, 2, lane) * x_sum
            store_group(out, t, g, acc)


@njit(inline="always")
def _k4_scales(w, g, b, scales, mins):
    """scales[j * 64 + lane] = d * sc_j and mins[j * 64 + lane] = dmin * m_j of the 8 sub-blocks, from the
    12 bytes of 6-bit values (planes 4-15) as ggml's get_scale_min_k4 unpacks them. Written as
    two branch-free loops so that LLVM vectorizes them across lanes."""
    for j in range(4):
        for lane in range(ROW_GROUP):
            sc = w[g, b, ROW_GROUP * (4 + j) + lane] & np.uint8(63)
            m = w[g, b, ROW_GROUP * (8 + j) + lane] & np.uint8(63)
            scales[j * ROW_GROUP + lane] = half_at(w, g, b, 0, lane) * np.float32(np.int32(sc))
            mins[j * ROW_GROUP + lane] = half_at(w, g, b, 2, lane) * np.float32(np.int32(m))
    for j in range(4, 8):
        for lane in range(ROW_GROUP):
            packed = w[g, b, ROW_GROUP * (8 + j) + lane]
            sc = np.uint8((packed & np.uint8(15)) | ((w[g, b, ROW_GROUP * j + lane] >> np.uint8(6)) << np.uint8(4)))
            m = np.uint8((packed >> np.uint8(4)) | ((w[g, b, ROW_GROUP * (4 + j) + lane] >> np.uint8(6)) << np.uint8(4)))
            scales[j * ROW_GROUP + lane] = half_at(w, g, b, 0, lane) * np.float32(np.int32(sc))
            mins[j * ROW_GROUP + lane] = half_at(w, g, b, 2, lane) * np.float32(np.int32(m))


@njit(parallel=True, fastmath=True, cache=True)
def matmul_q4_k(w, x, out):
    """Q4_K: planes 0-1 d, 2-3 dmin, 4-15 scales, 16 + 32 * chunk + l the nibbles of weights
    64 * chunk + l (sub-block 2 * chunk) and 64 * chunk + 32 + l (sub-block 2 * chunk + 1)."""
    n_groups, n_blocks, _ = w.shape
    for g in prange(n_groups):
        part = stack_array(np.float32, 2, ROW_GROUP)
        scales = stack_array(np.float32, 8, ROW_GROUP)
        mins = stack_array(np.float32, 8, ROW_GROUP)
        acc = stack_array(np.float32, 1, ROW_GROUP)
        for t in range(x.shape[0]):
            acc[:] = 0.0
            for b in range(n_blocks):
                _k4_scales(w, g, b, scales, mins)
                for chunk in range(4):
                    prefetch_ahead(w, g, b, chunk, 4)
                    part[:] = 0.0
                    x0 = b * QK_K + chunk * 64
                    sum_lo = np.float32(0.0)
                    sum_hi = np.float32(0.0)
                    for l in range(32):
                        x_lo = x[t, x0 + l]
                        x_hi = x[t, x0 + 32 + l]
                        sum_lo += x_lo
                        sum_hi += x_hi
                        for lane in range(ROW_GROUP):
                            q = w[g, b, ROW_GROUP * (16 + chunk * 32 + l) + lane]
                            part[lane] += np.float32(np.int32(q & LOW4)) * x_lo
                            part[ROW_GROUP + lane] += np.float32(np.int32(q >> np.uint8(4))) * x_hi
                    j = 2 * chunk
                    for lane in range(ROW_GROUP):
                        acc[lane] += (scales[j * ROW_GROUP + lane] * part[lane] + scales[(j + 1) * ROW_GROUP + lane] * part[ROW_GROUP + lane]
                                      - mins[j * ROW_GROUP + lane] * sum_lo - mins[(j + 1) * ROW_GROUP + lane] * sum_hi)
            store_group(out, t, g, acc)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_q4_k_int8(w, xq, xd, xs, out):
    """Q4_K with int8 activations (blocks of 32 = one sub-block). The 128 nibble bytes are in
    quads (layout.py; planes 0-15 hold d, dmin and the scales): for chunk c, quad j of a lane
    holds weights 64c + 4j.. (low nibbles, sub-block 2c) and 64c + 32 + 4j.. (high, 2c + 1).
    Per sub-block and lane an int32 sum of q * x (bits.dot4_nibbles); then
    d * sc * sum q x - dmin * m * sum x, sum x from xs (quant.activation_block_sums)."""
    n_groups, n_blocks, group_bytes = w.shape
    cols = xq.shape[1]
    for g in prange(n_groups):
        part = stack_array(np.int32, 2, ROW_GROUP)
        scales = stack_array(np.float32, 8, ROW_GROUP)
        mins = stack_array(np.float32, 8, ROW_GROUP)
        acc = stack_array(np.float32, 1, ROW_GROUP)
        for t in range(xq.shape[0]):
            acc[:] = 0.0
            for b in range(n_blocks):
                _k4_scales(w, g, b, scales, mins)
                for chunk in range(4):
                    prefetch_ahead(w, g, b, chunk, 4)
                    part[:] = 0
                    x0 = b * QK_K + chunk * 64
                    quads = (g * n_blocks + b) * group_bytes + ROW_GROUP * (16 + 32 * chunk)
                    for j in range(32 // QUADS):
                        for lanes in range(0, ROW_GROUP, DOT4_LANES):
                            at = quads + QUADS * (j * ROW_GROUP + lanes)
                            dot4_nibbles(part, lanes, w, at, xq, t * cols + x0 + QUADS * j, 0)
                            dot4_nibbles(part, ROW_GROUP + lanes, w, at, xq, t * cols + x0 + 32 + QUADS * j, 4)
                    sum_lo = xs[t, x0 // 32]
                    sum_hi = xs[t, x0 // 32 + 1]
                    j = 2 * chunk
                    d_lo = xd[t, x0 // 32]
                    d_hi = xd[t, x0 // 32 + 1]
                    for lane in range(ROW_GROUP):
                        acc[lane] += (d_lo * (scales[j * ROW_GROUP + lane] * np.float32(part[lane])
                                              - mins[j * ROW_GROUP + lane] * np.float32(sum_lo))
                                      + d_hi * (scales[(j + 1) * ROW_GROUP + lane] * np.float32(part[ROW_GROUP + lane])
                                                - mins[(j + 1) * ROW_GROUP + lane] * np.float32(sum_hi)))
            store_group(out, t, g, acc)


@njit(inline="always")
def _six_bits(low, high_at_4):
    """A Q6_K weight as float32: 4 low bits, and 2 high bits already shifted to bits 4-5
    (uint8 arithmetic throughout, so LLVM keeps 64 lanes per vector)."""
    q = np.uint8(np.uint8(low) | np.uint8(np.uint8(high_at_4) & np.uint8(0x30)))
    return np.float32(np.int32(q)) - np.float32(32.0)


@njit(inline="always")
def _six_bits_int(low, high_at_4):
    """A Q6_K weight minus 32 as int16 (see _six_bits)."""
    q = np.uint8(np.uint8(low) | np.uint8(np.uint8(high_at_4) & np.uint8(0x30)))
    return np.int16(np.int16(q) - np.int16(32))


@njit(parallel=True, fastmath=True, cache=True)
def matmul_q6_k(w, x, out):
    """Q6_K: planes 0-127 low nibbles, 128-191 high bits, 192-207 int8 scales, 208-209 d.
    In each half of 128 weights, byte l (l < 32) of the low nibbles and of the high bits holds
    weights l, l + 32, l + 64, l + 96; scales cover 16 weights each."""
    n_groups, n_blocks, _ = w.shape
    for g in prange(n_groups):
        part = np.empty(4 * ROW_GROUP, np.float32)   # on the heap: on the stack, 4 x 4 zmm accumulators
                                                      # plus temporaries spilled (9.4 -> 7.4 GB/s)
        acc = stack_array(np.float32, 1, ROW_GROUP)
        for t in range(x.shape[0]):
            acc[:] = 0.0
            for b in range(n_blocks):
                for half in range(2):
                    for s in range(2):   # 16 weights of each quarter share a scale
                        prefetch_ahead(w, g, b, 2 * half + s, 4)
                        part[:] = 0.0
                        x0 = b * QK_K + half * 128 + s * 16
                        for l in range(s * 16, s * 16 + 16):
                            x1 = x[t, x0 - s * 16 + l]
                            x2 = x[t, x0 - s * 16 + l + 32]
                            x3 = x[t, x0 - s * 16 + l + 64]
                            x4 = x[t, x0 - s * 16 + l + 96]
                            for lane in range(ROW_GROUP):
                                low_a = w[g, b, ROW_GROUP * (half * 64 + l) + lane]
                                low_b = w[g, b, ROW_GROUP * (half * 64 + l + 32) + lane]
                                high = w[g, b, ROW_GROUP * (128 + half * 32 + l) + lane]
                                part[lane] += _six_bits(low_a & LOW4, high << np.uint8(4)) * x1
                                part[ROW_GROUP + lane] += _six_bits(low_b & LOW4, high << np.uint8(2)) * x2
                                part[2 * ROW_GROUP + lane] += _six_bits(low_a >> np.uint8(4), high) * x3
                                part[3 * ROW_GROUP + lane] += _six_bits(low_b >> np.uint8(4), high >> np.uint8(2)) * x4
                        sc = 192 + half * 8 + s
                        for lane in range(ROW_GROUP):
                            acc[lane] += half_at(w, g, b, 208, lane) * (
                                np.float32(np.int8(w[g, b, ROW_GROUP * sc + lane])) * part[lane]
                                + np.float32(np.int8(w[g, b, ROW_GROUP * (sc + 2) + lane])) * part[ROW_GROUP + lane]
                                + np.float32(np.int8(w[g, b, ROW_GROUP * (sc + 4) + lane])) * part[2 * ROW_GROUP + lane]
                                + np.float32(np.int8(w[g, b, ROW_GROUP * (sc + 6) + lane])) * part[3 * ROW_GROUP + lane])
            store_group(out, t, g, acc)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_q6_k_int8(w, xq, xd, xs, out):
    """Q6_K with int8 activations (xs, their block sums, is not needed). |q - 32| <= 32 and |x| <= 127, so 8 products fit in int16
    (32512): each 16-weight scale group sums two runs of 8 in int16, then in int32."""
    n_groups, n_blocks, _ = w.shape
    for g in prange(n_groups):
        part = stack_array(np.int16, 4, ROW_GROUP)
        group = np.empty(4 * ROW_GROUP, np.int32)
        acc = stack_array(np.float32, 1, ROW_GROUP)
        for t in range(xq.shape[0]):
            acc[:] = 0.0
            for b in range(n_blocks):
                for half in range(2):
                    x0 = b * QK_K + half * 128
                    for s in range(2):   # 16 weights of each quarter share a scale
                        prefetch_ahead(w, g, b, 2 * half + s, 4)
                        group[:] = 0
                        for run in range(2):
                            part[:] = 0
                            for l in range(s * 16 + run * 8, s * 16 + run * 8 + 8):
                                x1 = np.int16(xq[t, x0 + l])
                                x2 = np.int16(xq[t, x0 + l + 32])
                                x3 = np.int16(xq[t, x0 + l + 64])
                                x4 = np.int16(xq[t, x0 + l + 96])
                                for lane in range(ROW_GROUP):
                                    low_a = w[g, b, ROW_GROUP * (half * 64 + l) + lane]
                                    low_b = w[g, b, ROW_GROUP * (half * 64 + l + 32) + lane]
                                    high = w[g, b, ROW_GROUP * (128 + half * 32 + l) + lane]
                                    part[lane] += np.int16(_six_bits_int(low_a & LOW4, high << np.uint8(4)) * x1)
                                    part[ROW_GROUP + lane] += np.int16(
                                        _six_bits_int(low_b & LOW4, high << np.uint8(2)) * x2)
                                    part[2 * ROW_GROUP + lane] += np.int16(
                                        _six_bits_int(low_a >> np.uint8(4), high) * x3)
                                    part[3 * ROW_GROUP + lane] += np.int16(
                                        _six_bits_int(low_b >> np.uint8(4), high >> np.uint8(2)) * x4)
                            for i in range(4 * ROW_GROUP):
                                group[i] += np.int32(part[i])
                        sc = 192 + half * 8 + s
                        blocks = x0 // 32
                        for lane in range(ROW_GROUP):
                            acc[lane] += half_at(w, g, b, 208, lane) * (
                                np.float32(np.int8(w[g, b, ROW_GROUP * sc + lane])) * xd[t, blocks]
                                * np.float32(group[lane])
                                + np.float32(np.int8(w[g, b, ROW_GROUP * (sc + 2) + lane])) * xd[t, blocks + 1]
                                * np.float32(group[ROW_GROUP + lane])
                                + np.float32(np.int8(w[g, b, ROW_GROUP * (sc + 4) + lane])) * xd[t, blocks + 2]
                                * np.float32(group[2 * ROW_GROUP + lane])
                                + np.float32(np.int8(w[g, b, ROW_GROUP * (sc + 6) + lane])) * xd[t, blocks + 3]
                                * np.float32(group[3 * ROW_GROUP + lane]))
            store_group(out, t, g, acc)
