"""The interleaved layout the block-format kernels read: 64 rows side by side, one SIMD lane each.

Files (GGUF, our quantized directories) hold GGML blocks row by row. At load time every block
format is repacked, without changing any byte, into byte planes across a group of ROW_GROUP
rows. Packed shape (groups, blocks_per_row, block_bytes * 64), where for group g and column
block b, packed[g, b, k * 64 + lane] = byte k of block b of row g * 64 + lane.

So byte k of 64 rows is one contiguous 64-byte vector: a GEMV kernel lets each SIMD lane
accumulate one output row across a whole block and applies the 64 rows' scales with one vector
multiply, with no horizontal sum per block (what bounded row-by-row kernels; the README has
the measurements).
Quads: a format may lay out some bytes of each block (its quants) 4 bytes per lane instead: for
4 bytes k..k+3 of a block in quads, 256 packed bytes hold those 4 bytes of lane 0, then of lane
1, ... Four consecutive weights of a row are then one 32-bit word, which is what x86's pairwise
byte products (pmaddubsw, bits.dot4_*) consume. A format's `runs` say where each byte goes: runs
of block bytes (start, end, in_quads), placed one after the other in the packed block, so that
a kernel reads its block front to back: a stream the hardware prefetchers follow.

A group of 64 rows is also one parallel work item; its bytes are contiguous, so each thread
streams through memory. Rows missing from the last group are zero bytes (zero scales): they
compute zeros and are never stored.

Every parallel kernel of the package has the same shape: a `prange` loop whose body is one call
of a plain function for one work item (`_q6_k_group(..., np.int64(g))`), marked forceinline so
that LLVM inlines it into the loop. numba compiles a prange loop's body a second time as a
function of its own and runs its parallel passes over all of it: with the body a single call it
compiles about a third faster (Q6_K 7.3 -> 4.8 s, Q4_1 2.2 -> 1.7 s), and runs as fast (Q4_1
10 % faster). The index is converted to int64 because prange hands the body a uint64, which
would compile the function a second time for that type.
"""
import functools

import numpy as np
from numba import njit, prange

from .compiler import SOFTWARE_PREFETCH
from .bits import f16_to_f32, prefetch

ROW_GROUP = 64         # rows interleaved: 64 byte lanes = one 512-bit vector
QUADS = 4              # bytes per lane in the quad layout of the quants
PREFETCH_BYTES = 2048  # how far ahead of the bytes being read the kernels prefetch


def packed_shape(rows: int, blocks_per_row: int, block_bytes: int) -> tuple:
    return (-(-rows // ROW_GROUP), blocks_per_row, block_bytes * ROW_GROUP)


@functools.cache
def byte_positions(runs: tuple, block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(position, step) per byte k of a block: lane l's copy of byte k is at packed offset
    position[k] + step[k] * l within its packed block (step 1 in planes, QUADS in quads)."""
    position, step = np.full(block_bytes, -1, np.int64), np.zeros(block_bytes, np.int64)
    at = 0
    for start, end, in_quads in runs:
        k = np.arange(start, end)
        if in_quads:
            assert (end - start) % QUADS == 0, "a run of quads holds whole quads"
            position[k] = at + (k - start) // QUADS * QUADS * ROW_GROUP + (k - start) % QUADS
            step[k] = QUADS
        else:
            position[k] = at + (k - start) * ROW_GROUP
            step[k] = 1
        at += (end - start) * ROW_GROUP
    assert at == block_bytes * ROW_GROUP and (position >= 0).all(), "runs must cover each byte once"
    position.flags.writeable = step.flags.writeable = False
    return position, step


@njit(forceinline=True)
def _pack_group(rows, packed, position, step, g):
    n_rows = rows.shape[0]
    n_groups, n_blocks, group_bytes = packed.shape
    block_bytes = group_bytes // ROW_GROUP
    for b in range(n_blocks):
        for k in range(block_bytes):
            for lane in range(ROW_GROUP):
                n = g * ROW_GROUP + lane
                packed[g, b, position[k] + step[k] * lane] = rows[n, b * block_bytes + k] if n < n_rows else 0


@njit(parallel=True, cache=True)
def _pack_bytes(rows, packed, position, step):
    """The packed layout byte by byte (see pack and byte_positions). Rows missing from the last
    group are zeros."""
    for g in prange(packed.shape[0]):
        _pack_group(rows, packed, position, step, np.int64(g))


def pack(rows: np.ndarray, block_bytes: int, runs: tuple) -> np.ndarray:
    """GGML rows (n, blocks * block_bytes) uint8 -> the packed layout, bytes placed as `runs`
    say (byte_positions)."""
    n_rows, row_bytes = rows.shape
    packed = np.empty(packed_shape(n_rows, row_bytes // block_bytes, block_bytes), np.uint8)
    # Fault in the (usually memory-mapped) rows first, one byte per page, in one thread: page
    # faults taken by both kernel threads at once contend (1.9 GB of Q8_0: 1.4 s -> 0.6 s).
    if rows.size:
        rows.reshape(-1)[::4096].max()
    _pack_bytes(rows, packed, *byte_positions(runs, block_bytes))
    return packed


def unpack(packed: np.ndarray, block_bytes: int, rows: np.ndarray, runs: tuple) -> np.ndarray:
    """The rows with indices `rows` of a packed matrix, as GGML rows."""
    n_groups, n_blocks, _ = packed.shape
    position, step = byte_positions(runs, block_bytes)
    rows = np.asarray(rows)
    columns = position[None, :] + step[None, :] * (rows % ROW_GROUP)[:, None]   # (rows, block_bytes)
    blocks = packed[(rows // ROW_GROUP)[:, None, None], np.arange(n_blocks)[None, :, None], columns[:, None, :]]
    return blocks.reshape(len(rows), n_blocks * block_bytes)


# --- helpers inlined into the kernels ----------------------------------------------------------

@njit(inline="always")
def f16_at(w, g, b, k, lane):
    """The fp16 value at bytes k, k + 1 of a lane's block, as float32."""
    return f16_to_f32(np.uint16(np.uint16(w[g, b, ROW_GROUP * k + lane])
                                | (np.uint16(w[g, b, ROW_GROUP * (k + 1) + lane]) << np.uint16(8))))


@njit(inline="always")
def prefetch_ahead(w, g, b, part, parts, always=False):
    """Before reading part `part` of `parts` equal slices of packed block (g, b), prefetch the
    bytes PREFETCH_BYTES further on, one hint per 64-byte cache line: the hardware prefetchers
    stop at every 4 KiB page. Small steady slices beat whole blocks far ahead (Q4_K GEMV:
    14.4 GB/s with 2 KiB slices, 11.2 GB/s with whole 9 KiB blocks 4 blocks ahead). Nothing on
    CPUs where the hints measured slower (compiler.SOFTWARE_PREFETCH: AMD Zen), unless `always`
    (a constant: the kernel's own measured choice). A kernel may pass b + 1 to prefetch a slice
    of the next block instead (Q6_K)."""
    if not (always or SOFTWARE_PREFETCH):   # constants: nothing is emitted
        return
    n_groups, n_blocks, group_bytes = w.shape
    size = group_bytes // parts
    ahead = (g * n_blocks + b) * group_bytes + part * size + PREFETCH_BYTES
    end = min(ahead + size, n_groups * n_blocks * group_bytes)
    for c in range(ahead, end, 64):
        prefetch(w, c)


@njit(inline="always")
def store_group(out, t, g, acc):
    """out[t, rows of group g] = acc, leaving out the padding rows of the last group."""
    for lane in range(ROW_GROUP):
        n = g * ROW_GROUP + lane
        if n < out.shape[1]:
            out[t, n] = acc[lane]
