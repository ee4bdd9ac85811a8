"""The table of weight formats: how each one is stored and which kernels read it.

A weight matrix is a `Weight`: a format, a logical shape (rows, cols) and a 2-D numpy array
that holds the raw storage row by row (float32 for F32; uint16 bit patterns for F16 and BF16,
because numba has no half types). Nothing is converted at load time: every kernel decodes
a row into float32 on the fly, so a memory-mapped bf16 checkpoint is used in place.

Adding a format means writing its `decode_row` (and later faster integer kernels) and adding
one row to `FORMATS`; the forward pass only ever calls `matmul` and `embedding_rows`.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numba import njit, prange

ROWS_PER_TASK = 16  # output rows per parallel work item: few enough tasks to keep overhead low


# --- row decoders: raw storage of one row -> float32 ------------------------------------

@njit(cache=True)
def decode_f32_row(src, dst):
    for j in range(src.shape[0]):
        dst[j] = src[j]


@njit(cache=True)
def decode_bf16_row(src, dst):
    # bf16 is the top half of a float32: shift the bits into place.
    bits = dst.view(np.uint32)
    for j in range(src.shape[0]):
        bits[j] = np.uint32(src[j]) << np.uint32(16)


@njit(cache=True)
def decode_f16_row(src, dst):
    # IEEE half -> single without branches per element: move exponent+mantissa into the
    # float32 position and multiply by 2**112 to rebias the exponent (this is exact for
    # normals and subnormals); inf/nan get the all-ones exponent; then apply the sign.
    bits = dst.view(np.uint32)
    for j in range(src.shape[0]):
        magnitude = np.uint32(src[j]) & np.uint32(0x7FFF)
        b = magnitude << np.uint32(13)
        if magnitude >= np.uint32(0x7C00):
            b |= np.uint32(0x7F800000)
        bits[j] = b
    for j in range(src.shape[0]):
        dst[j] *= np.float32(2.0**112)
    for j in range(src.shape[0]):
        if src[j] & np.uint16(0x8000):
            dst[j] = -dst[j]


# --- generic kernels built on a row decoder ----------------------------------------------

@njit(parallel=True, fastmath=True, cache=True)
def matmul_decoded(decode_row, w, x, out):
    """out[t, n] = dot(x[t], W[n]) for a weight stored row-wise in any format with a row decoder.

    Each weight row is decoded once into an L1-resident float32 buffer and used for every
    activation row, so the weight is read from memory exactly once per call.
    """
    n_rows = out.shape[1]
    n_cols = x.shape[1]
    n_tokens = x.shape[0]
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        row = np.empty(n_cols, np.float32)
        for n in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            decode_row(w[n], row)
            for t in range(n_tokens):
                acc = np.float32(0.0)
                for j in range(n_cols):
                    acc += row[j] * x[t, j]
                out[t, n] = acc


@njit(cache=True)
def gather_decoded(decode_row, w, ids, out):
    """out[i] = W[ids[i]] as float32: the embedding lookup."""
    for i in range(ids.shape[0]):
        decode_row(w[ids[i]], out[i])


# --- the table -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    name: str
    storage_dtype: type      # numpy dtype of the raw row storage
    block_size: int          # elements per block (1 for plain floats)
    block_bytes: int         # bytes per block
    decode_row: Callable     # njit (raw row, float32 out) -> None

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.block_bytes


FORMATS = {
    "f32": Format("f32", np.float32, 1, 4, decode_f32_row),
    "f16": Format("f16", np.uint16, 1, 2, decode_f16_row),
    "bf16": Format("bf16", np.uint16, 1, 2, decode_bf16_row),
}


@dataclass(frozen=True)
class Weight:
    """A 2-D weight matrix in some format: `data` holds the raw storage, one row per output."""
    format: Format
    shape: tuple
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def dequantize(self) -> np.ndarray:
        out = np.empty(self.shape, np.float32)
        gather_decoded(self.format.decode_row, self.data, np.arange(self.shape[0]), out)
        return out


def matmul(weight: Weight, x: np.ndarray, out: np.ndarray) -> None:
    """out = x @ W.T with x (tokens, cols) float32 and out (tokens, rows) float32."""
    matmul_decoded(weight.format.decode_row, weight.data, x, out)


def embedding_rows(weight: Weight, ids: np.ndarray, out: np.ndarray) -> None:
    """out[i] = row ids[i] of the weight, as float32 (ids must already be validated)."""
    gather_decoded(weight.format.decode_row, weight.data, ids, out)
