"""Byte scans for the file readers: where each record of a run of length-prefixed records starts.

A GGUF vocabulary is 150,000 strings in a row, each a u64 length and then its bytes; finding
where each starts is a loop with one step per string, which in Python took 0.15 s of every
load. It knows nothing of the format beyond that: the reader bounds and interprets the result."""
import numpy as np
from numba import njit

from . import compiler  # noqa: F401  (numba's settings before any kernel is defined)


@njit(cache=True)
def length_prefixed_starts(data, pos, starts):
    """Where each of len(starts) records (a little-endian u64 length, then that many bytes)
    starts, reading the uint8 array data from offset pos: starts[i] is the offset of record i's
    first byte after its length. Returns how many records lie wholly inside data, and the offset
    after the last of them (where the first one that does not fit begins)."""
    size = data.shape[0]
    for i in range(starts.shape[0]):
        if pos + 8 > size:
            return i, pos
        length = np.uint64(0)
        for b in range(7, -1, -1):
            length = (length << np.uint64(8)) | np.uint64(data[pos + b])
        if length > np.uint64(size - pos - 8):
            return i, pos
        starts[i] = pos + 8
        pos += 8 + np.int64(length)
    return starts.shape[0], pos
