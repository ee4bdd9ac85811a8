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
of block bytes (start, end, kind), placed one after the other in the packed block, so that
a kernel reads its block front to back: a stream the hardware prefetchers follow. A format
whose per-token kernel goes through the lanes in runs of 8 lays its quads out in that order
instead (QUADS_IN_RUNS, byte_positions: Q5_K).

A group of 64 rows is also one parallel work item; its bytes are contiguous, so each thread
streams through memory. Rows missing from the last group are zero bytes (zero scales): they
compute zeros and are never stored.

Every parallel kernel of the package has the same shape: a `prange` loop whose body is one call
of a plain function for one work item (`_q6_k_group(..., np.int64(g))`), marked forceinline so
that LLVM inlines it into the loop. numba compiles a prange loop's body a second time as a
function of its own and runs its parallel passes over all of it: with the body a single call it
compiles about a third faster (Q6_K 7.3 -> 4.8 s, Q4_1 2.2 -> 1.7 s), and runs as fast (both
versions loaded from numba's cache, alternated in one process: 0.97-1.02x for every format
tried, one token and sixteen; README, "First run"). The index is converted to int64 because
prange hands the body a uint64, which would compile the function a second time for that type.

Tiles of tokens: with several tokens (a prompt's chunk, or one token of each sequence decoded
together), Q4_0, Q4_K, Q5_K, Q3_K and IQ4_XS have a second kernel (their format's tile_matmul)
that takes them TOKEN_TILE at a time: each quad of weights is loaded and unpacked once (and a
block's scales decoded once) and multiplied by the activations of the tile's 4 tokens, the
lanes going in runs of 8 (one register of sums per token) through the block, instead of the
block's quads through the 64 lanes. The n % 4 tokens
left go through the per-token kernel, as a decode step's single token does (most formats'
stream memory faster in their own order; Q5_K's reads in the tiles' order, its quads packed
so). Both do the same integer sums and the same float operations in the same order (fused
multiply-adds spelled out, bits.fma, and no fast-math), so a token's row is bit for
bit the same in any company (tests/test_quant_kernels.py). Formats whose products widen to
int32 at every quad with AVX2 (Q8_0, Q5_0, Q5_1: a pmaddubsw and a pmaddwd each time, on the one
port that multiplies) have nothing to share but the loads: their tiles ran at 0.75-1.0x. Q4_1's
tiles (1.2x) and Q6_K's (1.2x) are left out for the first run's sake: every tile kernel is one
more kernel to compile on a machine's first run (2.5-3.5 s), and those two would have taken
SmolLM2's first run past 5 s and the 1.5B Q4_K_M file's past 12 (README, "First run"). The more
a format's quads cost to unpack, the more its tiles save: Q5_K (a fifth bit to put in place)
1.8x, Q3_K (a third bit) 1.5x, Q4_K 1.35x, IQ4_XS (a codebook lookup) 1.3x.
"""
import functools

import numpy as np
from numba import njit

from .compiler import SOFTWARE_PREFETCH
from .bits import DOT4_LANES, f16_to_f32, fma, prefetch

ROW_GROUP = 64         # rows interleaved: 64 byte lanes = one 512-bit vector
QUADS = 4              # bytes per lane in the quad layout of the quants
PREFETCH_BYTES = 2048  # how far ahead of the bytes being read the kernels prefetch
TOKEN_TILE = 4         # tokens per pass over a group's weights in the tile kernels (above)


def packed_shape(rows: int, blocks_per_row: int, block_bytes: int) -> tuple:
    return (-(-rows // ROW_GROUP), blocks_per_row, block_bytes * ROW_GROUP)


PLANES, QUADS_IN_ROWS, QUADS_IN_RUNS = "planes", "quads", "quads by runs of lanes"   # the kinds of run
RUN_LANES = DOT4_LANES   # QUADS_IN_RUNS: the lanes of one dot4 call...
RUN_QUADS = 8            # ...with 8 of their quads together (a span)


@functools.cache
def byte_positions(runs: tuple, block_bytes: int) -> np.ndarray:
    """positions[k, l]: where lane l's copy of byte k of a block is in its packed block. A run
    (start, end, kind) of block bytes is placed as
    - PLANES: byte k of the 64 lanes side by side (a plane of 64 bytes);
    - QUADS_IN_ROWS: quad j (bytes 4j..4j+3 of the run) of lane 0, then of lane 1, ... (256 bytes a quad);
    - QUADS_IN_RUNS: the run in spans of RUN_QUADS quads; in each span, lanes 0-7's quads (quad
      0 of lanes 0-7, then quad 1 of lanes 0-7, ...: 32 bytes each), then lanes 8-15's, ... (where
      quad j of a run of lanes starts: quad_in_runs): a
      kernel that goes through the lanes in runs of 8, each run through the span's quads, reads
      the span front to back."""
    positions = np.full((block_bytes, ROW_GROUP), -1, np.int64)
    lane = np.arange(ROW_GROUP)[None, :]
    at = 0
    for start, end, kind in runs:
        k = np.arange(start, end)[:, None] - start
        if kind == QUADS_IN_ROWS:
            assert (end - start) % QUADS == 0, "a run of quads holds whole quads"
            positions[start:end] = at + k // QUADS * QUADS * ROW_GROUP + QUADS * lane + k % QUADS
        elif kind == QUADS_IN_RUNS:
            span = RUN_QUADS * QUADS
            assert (end - start) % span == 0, "a run of quads by runs of lanes holds whole spans"
            positions[start:end] = (at + k // span * span * ROW_GROUP + lane // RUN_LANES * RUN_LANES * span
                                    + k % span // QUADS * RUN_LANES * QUADS + lane % RUN_LANES * QUADS + k % QUADS)
        else:
            assert kind == PLANES, f"unknown kind of run {kind!r}"
            positions[start:end] = at + k * ROW_GROUP + lane
        at += (end - start) * ROW_GROUP
    assert at == block_bytes * ROW_GROUP and (positions >= 0).all(), "runs must cover each byte once"
    positions.flags.writeable = False
    return positions


@njit(inline="always")
def quad_in_runs(lanes, j):
    """Where quad j of lanes lanes..lanes + RUN_LANES - 1 (lanes: a multiple of RUN_LANES) starts
    in a span of a QUADS_IN_RUNS run: byte_positions' placement, as a kernel indexes it."""
    return QUADS * (lanes * RUN_QUADS + j * RUN_LANES)


@functools.cache
def _packed_order(runs: tuple, block_bytes: int) -> np.ndarray:
    """For each byte of a packed block, which byte of its group's 64 block rows (laid side by
    side: lane * block_bytes + k) it is: byte_positions inverted."""
    positions = byte_positions(runs, block_bytes)
    k, lane = np.arange(block_bytes)[:, None], np.arange(ROW_GROUP)[None, :]
    order = np.empty(block_bytes * ROW_GROUP, np.int64)
    order[positions.ravel()] = (lane * block_bytes + k).ravel()
    order.flags.writeable = False
    return order


PACK_GROUPS = 64   # groups of rows repacked per step: bounds the temporary copy (4096 rows)


def pack(rows: np.ndarray, block_bytes: int, runs: tuple) -> np.ndarray:
    """GGML rows (n, blocks * block_bytes) uint8 -> the packed layout, bytes placed as `runs`
    say (byte_positions). In numpy, a step of 64 groups at a time: a gather per group of the
    block bytes of its 64 rows (1.7x a compiled loop's time, 0.1 s for SmolLM2's 98 MB, where
    compiling the loop took half a second of a first run). Rows missing from the last group are
    zeros."""
    n_rows, row_bytes = rows.shape
    n_blocks = row_bytes // block_bytes
    packed = np.empty(packed_shape(n_rows, n_blocks, block_bytes), np.uint8)
    order = _packed_order(runs, block_bytes)
    for first in range(0, packed.shape[0], PACK_GROUPS):
        groups = min(PACK_GROUPS, packed.shape[0] - first)
        part = rows[first * ROW_GROUP:(first + groups) * ROW_GROUP]
        if len(part) < groups * ROW_GROUP:
            part = np.concatenate([part, np.zeros((groups * ROW_GROUP - len(part), row_bytes), np.uint8)])
        side_by_side = part.reshape(groups, ROW_GROUP, n_blocks, block_bytes).transpose(0, 2, 1, 3)
        np.take(side_by_side.reshape(groups, n_blocks, ROW_GROUP * block_bytes), order, axis=2,
                out=packed[first:first + groups], mode="clip")
    return packed


def unpack(packed: np.ndarray, block_bytes: int, rows: np.ndarray, runs: tuple) -> np.ndarray:
    """The rows with indices `rows` of a packed matrix, as GGML rows."""
    n_groups, n_blocks, _ = packed.shape
    rows = np.asarray(rows)
    columns = byte_positions(runs, block_bytes)[:, rows % ROW_GROUP].T   # (rows, block_bytes)
    blocks = packed[(rows // ROW_GROUP)[:, None, None], np.arange(n_blocks)[None, :, None], columns[:, None, :]]
    return blocks.reshape(len(rows), n_blocks * block_bytes)


# --- helpers inlined into the kernels ----------------------------------------------------------

@njit(inline="always")
def f16_at(w, g, b, k, lane):
    """The fp16 value at bytes k, k + 1 of a lane's block, as float32."""
    return f16_to_f32(np.uint16(np.uint16(w[g, b, ROW_GROUP * k + lane])
                                | (np.uint16(w[g, b, ROW_GROUP * (k + 1) + lane]) << np.uint16(8))))


@njit(inline="always")
def add_scaled_block(w, g, b, plane, block, acc, at):
    """acc[at + lane] += d * block[at + lane], d the fp16 of each lane's block at planes plane,
    plane + 1, fused (bits.fma: the same bits in a format's per-token and tile kernels)."""
    for lane in range(ROW_GROUP):
        acc[at + lane] = fma(f16_at(w, g, b, plane, lane), block[at + lane], acc[at + lane])


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
def store_tile(out, t0, g, acc):
    """store_group for each token of a tile: acc[k * 64 + lane] is token t0 + k's."""
    for k in range(TOKEN_TILE):
        store_group(out, t0 + k, g, acc[k * ROW_GROUP:(k + 1) * ROW_GROUP])


@njit(inline="always")
def store_group(out, t, g, acc):
    """out[t, rows of group g] = acc, leaving out the padding rows of the last group."""
    for lane in range(ROW_GROUP):
        n = g * ROW_GROUP + lane
        if n < out.shape[1]:
            out[t, n] = acc[lane]
