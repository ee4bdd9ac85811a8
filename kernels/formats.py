"""The table of weight formats: how each one is stored and which kernels read it.

A weight matrix is a `Weight`: a format, a logical shape (rows, cols) and a 2-D numpy array
holding the raw storage row by row: float32 for F32; uint16 bit patterns for F16 and BF16
(numba has no half types); uint8 GGML blocks for the quantized formats. Nothing is converted
at load time: kernels read the storage in place.

Each row of FORMATS says, for one format: its block geometry, how to decode a row to float32
(embedding lookups, dequantization, tests), how to multiply it by activations, and how to
make it from float32. The forward pass only calls `matmul` and `embedding_rows`; adding a
format is adding a row here.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numba import njit, prange

from . import kquants, quant
from .bits import bf16_to_f32, f16_to_f32

ROWS_PER_TASK = 16  # output rows per parallel work item: few enough tasks to keep overhead low


# --- float formats: row decoders ------------------------------------------------------------

@njit(cache=True)
def decode_f32_row(src, dst):
    for j in range(dst.shape[0]):
        dst[j] = src[j]


@njit(cache=True)
def decode_f16_row(src, dst):
    for j in range(dst.shape[0]):
        dst[j] = f16_to_f32(src[j])


@njit(cache=True)
def decode_bf16_row(src, dst):
    for j in range(dst.shape[0]):
        dst[j] = bf16_to_f32(src[j])


@njit(parallel=True, fastmath=True, cache=True)
def matmul_decoded(decode_row, w, x, out):
    """out[t, n] = dot(x[t], W[n]) for any format with a row decoder (float32 arithmetic).

    Each weight row is decoded once into an L1-resident float32 buffer and used for every
    activation row, so the weight is read from memory exactly once per call.
    """
    n_rows = out.shape[1]
    n_tokens, n_cols = x.shape
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


# --- how each kind of format multiplies -------------------------------------------------------

def float_matmul(decode_row):
    def matmul(data, x, out):
        matmul_decoded(decode_row, data, x, out)
    return matmul


def int8_activation_matmul(kernel):
    """Quantize the activations to int8 blocks once, then run the integer kernel."""
    def matmul(data, x, out):
        xq = np.empty(x.shape, np.int8)
        xd = np.empty((x.shape[0], x.shape[1] // quant.QK), np.float32)
        quant.quantize_activations(x, xq, xd)
        kernel(data, xq, xd, out)
    return matmul


def blocks_quantizer(kernel, block_bytes):
    def quantize(x):
        out = np.empty((x.shape[0], x.shape[1] // quant.QK * block_bytes), np.uint8)
        kernel(np.ascontiguousarray(x, dtype=np.float32), out)
        return out
    return quantize


def to_bf16(x):
    """float32 -> bf16 bits, rounding to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)


@dataclass(frozen=True)
class Format:
    name: str
    storage_dtype: type      # numpy dtype of the raw row storage
    block_size: int          # weights per block (1 for plain floats)
    block_bytes: int         # bytes per block (in units of storage_dtype items for floats: see row_items)
    decode_row: Callable     # njit (raw row, float32 out) -> None
    matmul: Callable         # (raw weight, x (tokens, cols) f32, out (tokens, rows) f32) -> None
    quantize: Callable | None  # float32 (rows, cols) -> raw storage (None: read from files only)

    def row_items(self, cols: int) -> int:
        """Items of storage_dtype per row of `cols` weights."""
        return cols // self.block_size * self.block_bytes // np.dtype(self.storage_dtype).itemsize

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.block_bytes


FORMATS = {f.name: f for f in [
    Format("f32", np.float32, 1, 4, decode_f32_row, float_matmul(decode_f32_row),
           lambda x: np.ascontiguousarray(x, dtype=np.float32)),
    Format("f16", np.uint16, 1, 2, decode_f16_row, float_matmul(decode_f16_row),
           lambda x: np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)),
    Format("bf16", np.uint16, 1, 2, decode_bf16_row, float_matmul(decode_bf16_row), to_bf16),
    Format("q8_0", np.uint8, quant.QK, quant.Q8_0_BYTES, quant.decode_q8_0_row,
           int8_activation_matmul(quant.matmul_q8_0), blocks_quantizer(quant.quantize_q8_0, quant.Q8_0_BYTES)),
    Format("q4_0", np.uint8, quant.QK, quant.Q4_0_BYTES, quant.decode_q4_0_row,
           int8_activation_matmul(quant.matmul_q4_0), blocks_quantizer(quant.quantize_q4_0, quant.Q4_0_BYTES)),
    # formats read from GGUF files: no quantizer of ours, float kernels for now
    Format("q4_1", np.uint8, 32, kquants.Q4_1_BYTES, kquants.decode_q4_1_row,
           float_matmul(kquants.decode_q4_1_row), None),
    Format("q4_k", np.uint8, kquants.QK_K, kquants.Q4_K_BYTES, kquants.decode_q4_k_row,
           float_matmul(kquants.decode_q4_k_row), None),
    Format("q6_k", np.uint8, kquants.QK_K, kquants.Q6_K_BYTES, kquants.decode_q6_k_row,
           float_matmul(kquants.decode_q6_k_row), None),
]}


@dataclass(frozen=True)
class Weight:
    """A 2-D weight matrix in some format: `data` holds the raw storage, one row per output.

    The constructor checks the storage against the format and shape, because the kernels
    index it without bounds checks.
    """
    format: Format
    shape: tuple
    data: np.ndarray

    def __post_init__(self):
        rows, cols = self.shape
        f = self.format
        if cols % f.block_size:
            raise ValueError(f"{f.name} needs a multiple of {f.block_size} columns, got {cols}")
        expected = (rows, f.row_items(cols))
        if self.data.dtype != f.storage_dtype or self.data.shape != expected:
            raise ValueError(f"{f.name} storage for shape {self.shape} must be {np.dtype(f.storage_dtype)} "
                             f"{expected}, got {self.data.dtype} {self.data.shape}")
        if not self.data.flags.c_contiguous:
            raise ValueError("weight storage must be C-contiguous")

    @classmethod
    def quantize(cls, values: np.ndarray, format_name: str) -> "Weight":
        f = FORMATS[format_name]
        return cls(f, values.shape, f.quantize(values))

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def dequantize(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop (default: all) as float32."""
        stop = self.shape[0] if stop is None else stop
        out = np.empty((stop - start, self.shape[1]), np.float32)
        gather_decoded(self.format.decode_row, self.data, np.arange(start, stop), out)
        return out


def matmul(weight: Weight, x: np.ndarray, out: np.ndarray) -> None:
    """out = x @ W.T with x (tokens, cols) float32 and out (tokens, rows) float32."""
    weight.format.matmul(weight.data, x, out)


def embedding_rows(weight: Weight, ids: np.ndarray, out: np.ndarray) -> None:
    """out[i] = row ids[i] of the weight, as float32 (ids must already be validated)."""
    gather_decoded(weight.format.decode_row, weight.data, ids, out)
