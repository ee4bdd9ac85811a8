"""Formats that arrive in GGUF files: Q4_1, and the k-quants Q4_K and Q6_K of Ollama's Q4_K_M.

Row decoders only, bit-exact with ggml's reference dequantization (and the gguf package):
the same float32 operations in the same order, without fast-math, so no fused multiply-adds.
The matrix products use the generic decode-then-FMA kernel of kernels/formats.py for now.

    Q4_1, 32 weights in 20 bytes: fp16 d, fp16 m, 16 bytes of nibbles;  w = d * q + m
    Q4_K, 256 weights in 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) for 8
          sub-blocks of 32, 128 bytes of nibbles;                      w = d * sc * q - dmin * m
    Q6_K, 256 weights in 210 bytes: 128 bytes low nibbles, 64 bytes of high 2 bits,
          16 int8 scales (one per 16 weights), fp16 d;                  w = d * sc * (q - 32)
"""
import numpy as np
from numba import njit

from .bits import f16_to_f32

Q4_1_BYTES = 20
QK_K = 256
Q4_K_BYTES = 144
Q6_K_BYTES = 210


@njit(inline="always")
def _half(row, offset):
    return f16_to_f32(np.uint16(np.uint16(row[offset]) | (np.uint16(row[offset + 1]) << np.uint16(8))))


@njit(cache=True)
def decode_q4_1_row(row, dst):
    for b in range(dst.shape[0] // 32):
        o = b * Q4_1_BYTES
        d = _half(row, o)
        m = _half(row, o + 2)
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
        d = _half(row, o)
        dmin = _half(row, o + 2)
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
        d = _half(row, o + 208)
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
