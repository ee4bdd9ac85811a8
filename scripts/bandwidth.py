"""Measure this machine's memory read bandwidth: the roofline for memory-bound decode.

A compiled (numba) kernel streams through a buffer much larger than the last-level cache and
sums it as 64-bit integers with independent accumulators, so that neither the adds nor a
single dependency chain limit it: what remains is the memory system. It runs with and without
prefetch hints 2 KiB ahead and reports the faster, so the roofline is not lower than what the
GEMV kernels can reach whichever way they read (Intel: 15.4 GB/s without the hints, 16.1 GB/s with
them, 2 threads; AMD Zen 3 reads faster without). numpy's sum is shown for comparison; it
undercounts (one thread, float adds with a dependency chain).

    python scripts/bandwidth.py [--gib 2] [--threads 1 2]
"""
import argparse
import statistics
import time

import numba
import numpy as np
from numba import njit, prange

from engine.kernels import compiler  # noqa: F401  (the same compiler settings as the engine's kernels)
from engine.kernels.bits import prefetch

CHUNKS = 256
PREFETCH_WORDS = 256   # 2 KiB ahead


@njit(parallel=True)   # not cached: numba's cache names the module, and this one is run both as
def read_all(words, prefetch_words):   # a script and imported as scripts.bandwidth (by bench_*.py)
    """Sum of all 64-bit words, read once, in parallel chunks; prefetch_words ahead (0: no hints)."""
    step = words.shape[0] // CHUNKS
    partial = np.zeros(CHUNKS, np.uint64)
    for c in prange(CHUNKS):
        a0 = np.uint64(0)
        a1 = np.uint64(0)
        a2 = np.uint64(0)
        a3 = np.uint64(0)
        for i in range(c * step, (c + 1) * step, 8):   # one 64-byte cache line per step
            if prefetch_words:
                prefetch(words, i + prefetch_words)
            a0 += words[i] + words[i + 4]
            a1 += words[i + 1] + words[i + 5]
            a2 += words[i + 2] + words[i + 6]
            a3 += words[i + 3] + words[i + 7]
        partial[c] = a0 + a1 + a2 + a3
    return partial.sum()


def measure_read_bandwidth(threads: int, gib: float = 2.0, repeats: int = 7) -> float:
    """Median GB/s of read_all over a buffer of `gib` GiB with `threads` threads (the better of
    with and without prefetch hints)."""
    words = np.ones(int(gib * 2**30) // 8 // (CHUNKS * 8) * (CHUNKS * 8), np.uint64)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    best = 0.0
    try:
        for ahead in (PREFETCH_WORDS, 0):
            read_all(words, ahead)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                read_all(words, ahead)
                times.append(time.perf_counter() - start)
            best = max(best, words.nbytes / statistics.median(times) / 1e9)
    finally:
        numba.set_num_threads(previous)
    return best


def numpy_sum_bandwidth(gib: float = 2.0, repeats: int = 5) -> float:
    a = np.ones(int(gib * 2**30) // 4, np.float32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - start)
    return a.nbytes / statistics.median(times) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="buffer size in GiB (default 2)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, numba.config.NUMBA_NUM_THREADS])
    args = parser.parse_args()
    print(f"{'reader':<28} {'threads':>7} {'GB/s':>8}")
    for threads in args.threads:
        print(f"{'numba, 4 accumulators':<28} {threads:>7} {measure_read_bandwidth(threads, args.gib):>8.2f}")
    print(f"{'numpy float32 sum':<28} {1:>7} {numpy_sum_bandwidth(args.gib):>8.2f}")


if __name__ == "__main__":
    main()
