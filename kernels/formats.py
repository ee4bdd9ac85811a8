"""The table of weight formats: how each one is stored and which kernels read it.

A weight matrix is a `Weight`: a format, a logical shape (rows, cols) and its storage. Files
hold it row by row: float32 for F32; uint16 bit patterns for F16 and BF16 (numba has no half
types); uint8 GGML blocks for the quantized formats. Float formats are read in place (memory-
mapped); block formats are repacked at load into the interleaved layout of kernels/layout.py
(the same bytes in a new order: twice as fast), and unpacked again only to write files.

Each row of FORMATS says, for one format, in named fields: its GGUF type id, its storage and
block geometry, where its fp16 scales are, how its blocks are packed, how to decode a row to
float32 (embedding lookups, dequantization, tests), which kernel multiplies it (by float32
activations, or by int8 ones with a float32 scale per 32), and how to make it from
float32. Everything else (GGUF's type names, tests, benchmarks, synthetic files) reads it from
here. The forward pass only calls `matmul` and `embedding_rows`; adding a format is adding a
row here (and, for a block format, its kernels for the layout).
"""
import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numba import njit, prange

from . import compiler  # noqa: F401  (numba's settings before any kernel is defined)
from . import iquants, kquants, layout, quant
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


@njit(fastmath=True, forceinline=True)
def _decoded_rows(decode_row, w, x, out, task):
    """Rows task * ROWS_PER_TASK ... of out[t, n] = dot(x[t], W[n]) for any format with a row
    decoder (float32 arithmetic).

    Each weight row is decoded once into an L1-resident float32 buffer and used for every
    activation row, so the weight is read from memory exactly once per call. One small kernel
    per format below calls it: numba cannot cache a kernel that takes a function argument (its
    cache key names the function's address, and concurrent processes then crash saving it).
    """
    n_rows = out.shape[1]
    n_tokens, n_cols = x.shape
    row = np.empty(n_cols, np.float32)
    for n in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
        decode_row(w[n], row)
        for t in range(n_tokens):
            acc = np.float32(0.0)
            for j in range(n_cols):
                acc += row[j] * x[t, j]
            out[t, n] = acc


@njit(parallel=True, cache=True)
def matmul_f32(w, x, out):
    for task in prange((out.shape[1] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _decoded_rows(decode_f32_row, w, x, out, np.int64(task))


@njit(parallel=True, cache=True)
def matmul_f16(w, x, out):
    for task in prange((out.shape[1] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _decoded_rows(decode_f16_row, w, x, out, np.int64(task))


@njit(parallel=True, cache=True)
def matmul_bf16(w, x, out):
    for task in prange((out.shape[1] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _decoded_rows(decode_bf16_row, w, x, out, np.int64(task))


def decode_rows(decode_row, rows, out):
    """out[i] = rows[i] decoded to float32 (file rows: embedding lookups, dequantization)."""
    if decode_row is decode_f32_row:   # a copy: no kernel to compile while a model loads
        out[:] = rows
        return
    for i in range(len(rows)):
        decode_row(rows[i], out[i])


# --- how each kind of format multiplies -------------------------------------------------------

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


@dataclass(frozen=True, kw_only=True)
class Format:
    """One weight format: its storage, its block geometry, and the kernels that read it."""
    name: str
    ggml_type: int | None         # its type id in GGUF files (ggml's enum), None if GGUF has none
    storage_dtype: type           # numpy dtype of the raw row storage
    block_size: int               # weights per block (1 for plain floats)
    block_bytes: int              # bytes per block
    f16_fields: tuple = ()        # byte offsets in a block of its fp16 scales (d, and m or dmin)
    runs: tuple = ()              # where a block's bytes go when packed (layout.byte_positions)
    decode_row: Callable          # njit (file row, float32 out) -> None
    # how it multiplies: exactly one of the two kernels
    float_matmul: Callable | None = None  # (data, x (tokens, cols) f32, out (tokens, rows) f32) -> None
    int_matmul: Callable | None = None    # (data, x int8, x scale per 32, x int32 sum per 16, out)
    tile_matmul: Callable | None = None   # int_matmul for a multiple of layout.TOKEN_TILE tokens, if faster
    quantize: Callable | None = None      # float32 (rows, cols) -> file rows (None: read from files only)

    def __post_init__(self):
        assert (self.float_matmul is None) != (self.int_matmul is None), f"{self.name}: one matmul kernel"
        assert not self.packed or self.runs, f"{self.name}: a block format says how its blocks are packed"

    @property
    def packed(self) -> bool:
        """Block formats are repacked at load (kernels/layout.py); floats are read as stored."""
        return self.block_size > 1

    def row_items(self, cols: int) -> int:
        """Items of storage_dtype per row of `cols` weights."""
        return cols // self.block_size * self.block_bytes // np.dtype(self.storage_dtype).itemsize

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.block_bytes


def scales_then_quads(scale_bytes: int, block_bytes: int) -> tuple:
    """The packing of a block whose fp16 scales come first: the scales in planes, the quants in
    quads (layout.py)."""
    return ((0, scale_bytes, layout.PLANES), (scale_bytes, block_bytes, layout.QUADS_IN_ROWS))


FORMATS = {f.name: f for f in [
    Format(name="f32", ggml_type=0, storage_dtype=np.float32, block_size=1, block_bytes=4,
           decode_row=decode_f32_row, float_matmul=matmul_f32,
           quantize=lambda x: np.ascontiguousarray(x, dtype=np.float32)),
    Format(name="f16", ggml_type=1, storage_dtype=np.uint16, block_size=1, block_bytes=2,
           decode_row=decode_f16_row, float_matmul=matmul_f16,
           quantize=lambda x: np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)),
    Format(name="bf16", ggml_type=30, storage_dtype=np.uint16, block_size=1, block_bytes=2,
           decode_row=decode_bf16_row, float_matmul=matmul_bf16, quantize=to_bf16),
    Format(name="q8_0", ggml_type=8, storage_dtype=np.uint8, block_size=quant.QK, block_bytes=quant.Q8_0_BYTES,
           f16_fields=(0,), runs=scales_then_quads(2, quant.Q8_0_BYTES),
           decode_row=quant.decode_q8_0_row, int_matmul=quant.matmul_q8_0,
           quantize=blocks_quantizer(quant.quantize_q8_0, quant.Q8_0_BYTES)),
    Format(name="q4_0", ggml_type=2, storage_dtype=np.uint8, block_size=quant.QK, block_bytes=quant.Q4_0_BYTES,
           f16_fields=(0,), runs=scales_then_quads(2, quant.Q4_0_BYTES),
           decode_row=quant.decode_q4_0_row, int_matmul=quant.matmul_q4_0,
           tile_matmul=quant.matmul_q4_0_tiles,
           quantize=blocks_quantizer(quant.quantize_q4_0, quant.Q4_0_BYTES)),
    Format(name="q4_1", ggml_type=3, storage_dtype=np.uint8, block_size=quant.QK, block_bytes=quant.Q4_1_BYTES,
           f16_fields=(0, 2), runs=scales_then_quads(4, quant.Q4_1_BYTES),
           decode_row=quant.decode_q4_1_row, int_matmul=quant.matmul_q4_1),
    Format(name="q5_0", ggml_type=6, storage_dtype=np.uint8, block_size=quant.QK, block_bytes=quant.Q5_0_BYTES,
           f16_fields=(0,), runs=scales_then_quads(2, quant.Q5_0_BYTES),
           decode_row=quant.decode_q5_0_row, int_matmul=quant.matmul_q5_0),
    Format(name="q5_1", ggml_type=7, storage_dtype=np.uint8, block_size=quant.QK, block_bytes=quant.Q5_1_BYTES,
           f16_fields=(0, 2), runs=scales_then_quads(4, quant.Q5_1_BYTES),
           decode_row=quant.decode_q5_1_row, int_matmul=quant.matmul_q5_1),
    Format(name="iq4_nl", ggml_type=20, storage_dtype=np.uint8, block_size=iquants.QK,
           block_bytes=iquants.IQ4_NL_BYTES, f16_fields=(0,), runs=scales_then_quads(2, iquants.IQ4_NL_BYTES),
           decode_row=iquants.decode_iq4_nl_row, int_matmul=iquants.matmul_iq4_nl),
    Format(name="q2_k", ggml_type=10, storage_dtype=np.uint8, block_size=kquants.QK_K,
           block_bytes=kquants.Q2_K_BYTES, f16_fields=(80, 82),
           # scales, d and dmin in planes; the quants in quads
           runs=((0, 16, layout.PLANES), (80, 84, layout.PLANES), (16, 80, layout.QUADS_IN_ROWS)),
           decode_row=kquants.decode_q2_k_row, int_matmul=kquants.matmul_q2_k),
    Format(name="q3_k", ggml_type=11, storage_dtype=np.uint8, block_size=kquants.QK_K,
           block_bytes=kquants.Q3_K_BYTES, f16_fields=(108,),
           # scales and d in planes; hmask, then the quants, in quads
           runs=((96, 110, layout.PLANES), (0, 96, layout.QUADS_IN_ROWS)),
           decode_row=kquants.decode_q3_k_row, int_matmul=kquants.matmul_q3_k,
           tile_matmul=kquants.matmul_q3_k_tiles),
    Format(name="q4_k", ggml_type=12, storage_dtype=np.uint8, block_size=kquants.QK_K,
           block_bytes=kquants.Q4_K_BYTES, f16_fields=(0, 2), runs=scales_then_quads(16, kquants.Q4_K_BYTES),
           decode_row=kquants.decode_q4_k_row, int_matmul=kquants.matmul_q4_k,
           tile_matmul=kquants.matmul_q4_k_tiles),
    Format(name="q5_k", ggml_type=13, storage_dtype=np.uint8, block_size=kquants.QK_K,
           block_bytes=kquants.Q5_K_BYTES, f16_fields=(0, 2),
           runs=((0, 16, layout.PLANES), (16, kquants.Q5_K_BYTES, layout.QUADS_IN_RUNS)),
           decode_row=kquants.decode_q5_k_row, int_matmul=kquants.matmul_q5_k,
           tile_matmul=kquants.matmul_q5_k_tiles),
    Format(name="q6_k", ggml_type=14, storage_dtype=np.uint8, block_size=kquants.QK_K,
           block_bytes=kquants.Q6_K_BYTES, f16_fields=(kquants.Q6_K_BYTES - 2,), runs=kquants.Q6_K_RUNS,
           decode_row=kquants.decode_q6_k_row, int_matmul=kquants.matmul_q6_k),
    Format(name="iq4_xs", ggml_type=23, storage_dtype=np.uint8, block_size=iquants.QK_K,
           block_bytes=iquants.IQ4_XS_BYTES, f16_fields=(0,), runs=scales_then_quads(8, iquants.IQ4_XS_BYTES),
           decode_row=iquants.decode_iq4_xs_row, int_matmul=iquants.matmul_iq4_xs,
           tile_matmul=iquants.matmul_iq4_xs_tiles),
]}


def packed_layout_digest() -> str:
    """A digest of where every block format's packed copy puts each byte (layout.byte_positions,
    from which packing and unpacking both derive). The weight cache names its entries with it, so
    bytes packed by another layout are never read as this one's, even if nobody remembered to
    change its version number. Under a millisecond (byte_positions keeps its answers)."""
    digest = hashlib.sha256(f"{layout.ROW_GROUP} {layout.QUADS}".encode())
    for f in FORMATS.values():
        if f.packed:
            digest.update(f"{f.name} {f.block_bytes}".encode() + layout.byte_positions(f.runs, f.block_bytes).tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Weight:
    """A 2-D weight matrix in some format.

    Made from the file's rows (one row per output), or for a block format from rows packed
    before (3-D); `data` is what the kernels read: the rows for float formats, their packed copy
    (kernels/layout.py) for block formats. The constructor checks the storage against the format
    and shape, because the kernels index it without bounds checks.

    rows_only: only rows are ever read (an untied embedding: 150,000 rows of which a prompt reads
    a few), or it is only written back to a file: kept in the file's row layout, never packed,
    never multiplied.
    """
    format: Format
    shape: tuple
    data: np.ndarray
    rows_only: bool = False

    def __post_init__(self):
        rows, cols = self.shape
        f = self.format
        if cols % f.block_size:
            raise ValueError(f"{f.name} needs a multiple of {f.block_size} columns, got {cols}")
        already_packed = self.packed and self.data.ndim == 3   # e.g. mapped from engine/weight_cache.py
        expected = (layout.packed_shape(rows, cols // f.block_size, f.block_bytes) if already_packed
                    else (rows, f.row_items(cols)))
        if self.data.dtype != f.storage_dtype or self.data.shape != expected:
            raise ValueError(f"{f.name} storage for shape {self.shape} must be {np.dtype(f.storage_dtype)} "
                             f"{expected}, got {self.data.dtype} {self.data.shape}")
        if not self.data.flags.c_contiguous:
            raise ValueError("weight storage must be C-contiguous")
        if self.packed and not already_packed:
            object.__setattr__(self, "data", layout.pack(self.data, f.block_bytes, f.runs))

    @property
    def packed(self) -> bool:
        """Whether `data` is in the interleaved layout of the block-format kernels."""
        return self.format.packed and not self.rows_only

    def file_rows(self, ids=slice(None)) -> np.ndarray:
        """Rows `ids` (an index array or a slice; default: all) as files hold them: row by row."""
        if not self.packed:
            return self.data[ids]
        rows = np.arange(*ids.indices(self.shape[0])) if isinstance(ids, slice) else np.asarray(ids)
        return layout.unpack(self.data, self.format.block_bytes, rows, self.format.runs)

    @classmethod
    def quantize(cls, values: np.ndarray, format_name: str, rows_only: bool = False) -> "Weight":
        f = FORMATS[format_name]
        return cls(f, values.shape, f.quantize(values), rows_only)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def non_finite_scales(self) -> int:
        """How many fp16 scales (d, m, dmin) are infinite or NaN. No quantizer writes one, so each
        is a damaged block, or bytes of another type read as this one. An fp16 value is not
        finite when its exponent bits are all ones, which its high byte shows; packed, the high
        bytes of 64 rows are one plane (or every 4th byte of a run of quads)."""
        f = self.format
        count = 0
        for offset in f.f16_fields:
            if self.packed:
                high = self.data[:, :, layout.byte_positions(f.runs, f.block_bytes)[offset + 1]]
            else:
                high = self.data.reshape(-1, f.block_bytes)[:, offset + 1]
            count += int(np.count_nonzero((high & 0x7C) == 0x7C))
        return count

    def dequantize(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop (default: all) as float32."""
        stop = self.shape[0] if stop is None else stop
        out = np.empty((stop - start, self.shape[1]), np.float32)
        decode_rows(self.format.decode_row, self.file_rows(slice(start, stop)), out)
        return out


class IntegerScratch:
    """Buffers for activations' integer blocks, one set per width for up to `rows` rows, made on
    first use and then reused: the forward pass quantizes about five inputs per layer and token,
    which would otherwise each be three new arrays. The blocks of an Activations stay valid until
    another Activations of the same width is quantized on the same scratch."""

    def __init__(self, rows: int):
        self.rows = rows
        self._buffers = {}   # width -> the three buffers
        self._views = {}     # (width, rows used) -> their first rows: one lookup per call

    def arrays(self, n: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        views = self._views.get((cols, n))
        if views is None:
            if cols not in self._buffers:
                self._buffers[cols] = (np.empty((self.rows, cols), np.int8),
                                       np.empty((self.rows, cols // quant.QK), np.float32),
                                       np.empty((self.rows, cols // quant.SUM_BLOCK), np.int32))
            views = self._views[cols, n] = tuple(a[:n] for a in self._buffers[cols])
        return views


class Activations:
    """Activations x (tokens, cols) float32, and their integer blocks, computed at most once:
    the q/k/v and gate/up products share an input, so it is quantized once for all.
    scratch: where the integer blocks go (an IntegerScratch; default: new arrays)."""

    def __init__(self, x: np.ndarray, scratch: IntegerScratch | None = None):
        self.x = x
        self.scratch = scratch
        self._integer = None

    def integer(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(int8 values, float32 scale per block of 32, int32 sum per 16 values)."""
        if self._integer is None:
            n, cols = self.x.shape
            xq, xd, xs = (self.scratch or IntegerScratch(n)).arrays(n, cols)
            quant.quantize_for_matmul(self.x, xq, xd, xs)
            self._integer = xq, xd, xs
        return self._integer


def matmul(weight: Weight, x, out: np.ndarray) -> None:
    """out = x @ W.T with x (tokens, cols) float32 (an array or Activations), out (tokens, rows).
    Formats with an integer kernel round the activations to int8 per block of 32 (as llama.cpp
    does); float formats multiply the float activations. Formats with a tile kernel take the
    tokens up to a multiple of layout.TOKEN_TILE with it."""
    f = weight.format
    if weight.rows_only:
        raise ValueError(f"this {f.name} weight was loaded for row lookups only, not for matmul")
    acts = x if isinstance(x, Activations) else Activations(x)
    if f.int_matmul is None:
        f.float_matmul(weight.data, acts.x, out)
        return
    xq, xd, xs = acts.integer()
    tiled = len(out) - len(out) % layout.TOKEN_TILE if f.tile_matmul is not None else 0
    if not tiled:   # (a decode step: no slices to make)
        f.int_matmul(weight.data, xq, xd, xs, out)
        return
    # the first tokens in tiles, the rest one by one (layout.py: the same values)
    f.tile_matmul(weight.data, xq[:tiled], xd[:tiled], xs[:tiled], out[:tiled])
    if tiled < len(out):
        f.int_matmul(weight.data, xq[tiled:], xd[tiled:], xs[tiled:], out[tiled:])


def embedding_rows(weight: Weight, ids: np.ndarray, out: np.ndarray) -> None:
    """out[i] = row ids[i] of the weight, as float32 (ids must already be validated)."""
    decode_rows(weight.format.decode_row, weight.file_rows(ids), out)
