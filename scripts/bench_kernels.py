"""Time every kernel on the real shapes of DeepSeek-R1-Distill-Qwen-1.5B and -7B; print one table.

Decode GEMVs are memory-bound, so each is reported as GB/s of weight bytes read and as a
percentage of this machine's read bandwidth, measured by scripts/bandwidth.py in the same run.
The weights rotate through a pool of copies larger than the last-level cache, as in a real
forward pass, so that no matrix is timed from cache. Prefill GEMMs (512 tokens) are reported
in GOP/s (2 operations per multiply-add). Values do not matter for speed: the pools hold
arbitrary bytes with valid fp16 scales.

    python scripts/bench_kernels.py [--threads 1 2] [--models 1.5b 7b] [--pool-gib 1]
"""
import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.kernels import quant  # noqa: E402
from engine.kernels.attention import KVCache  # noqa: E402
from engine.kernels.formats import FORMATS, Weight, matmul  # noqa: E402
from scripts.bandwidth import measure_read_bandwidth  # noqa: E402

SHAPES = {   # hidden, intermediate, heads, kv_heads, head_dim, vocab, layers
    "1.5b": dict(hidden=1536, intermediate=8960, heads=12, kv_heads=2, head_dim=128, vocab=151936, layers=28),
    "7b": dict(hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128, vocab=152064, layers=28),
}



def matrices(s):
    """(name, rows, cols, uses per token) of every matrix in one forward pass."""
    d, kv = s["hidden"], s["kv_heads"] * s["head_dim"]
    return [("q/o proj", d, d, 2 * s["layers"]), ("k/v proj", kv, d, 2 * s["layers"]),
            ("gate/up", s["intermediate"], d, 2 * s["layers"]), ("down", d, s["intermediate"], s["layers"]),
            ("lm_head", s["vocab"], d, 1)]


def weight_pool(fmt_name, rows, cols, pool_bytes):
    """A (copies * rows, row_items) array of arbitrary weights in the format, >= pool_bytes."""
    fmt = FORMATS[fmt_name]
    items = fmt.row_items(cols)
    matrix_bytes = rows * fmt.row_bytes(cols)
    copies = max(2, -(-pool_bytes // matrix_bytes))
    raw = (np.arange(copies * rows * fmt.row_bytes(cols), dtype=np.uint32) * 2654435761 >> 24).astype(np.uint8)
    if fmt.block_size > 1:   # valid fp16 scales (0.0625) where each format keeps them
        blocks = raw.reshape(-1, fmt.block_bytes)
        for offset in fmt.f16_fields:
            blocks[:, offset], blocks[:, offset + 1] = 0x00, 0x2C
    elif fmt_name in ("f16", "bf16"):
        raw.view(np.uint16)[:] = 0x3C00 if fmt_name == "f16" else 0x3F80
    else:
        raw.view(np.float32)[:] = 1.0
    return raw.view(fmt.storage_dtype).reshape(copies * rows, items), copies, matrix_bytes


def time_calls(fn, calls, repeats=3):
    """Median seconds per call over `repeats` passes of `calls` calls (after one warm-up call)."""
    fn(0)
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            fn(i)
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call)


def bench_matmul(fmt_name, rows, cols, tokens, pool_bytes):
    pool, copies, matrix_bytes = weight_pool(fmt_name, rows, cols, pool_bytes)
    fmt = FORMATS[fmt_name]
    weights = [Weight(fmt, (rows, cols), pool[j * rows:(j + 1) * rows]) for j in range(copies)]
    x = np.random.default_rng(0).standard_normal((tokens, cols)).astype(np.float32)
    out = np.empty((tokens, rows), np.float32)

    def call(i):
        matmul(weights[i % copies], x, out)
    calls = copies if tokens == 1 else 2
    return time_calls(call, calls, repeats=3 if tokens == 1 else 2), matrix_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--formats", nargs="+", default=["q4_0", "q8_0", "bf16"])
    parser.add_argument("--pool-gib", type=float, default=1.0, help="weights rotated per GEMV (default 1 GiB)")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    args = parser.parse_args()
    pool_bytes = int(args.pool_gib * 2**30)

    bandwidth = {t: measure_read_bandwidth(t) for t in args.threads}
    print("read bandwidth (scripts/bandwidth.py): " +
          ", ".join(f"{bandwidth[t]:.1f} GB/s at {t} thread(s)" for t in args.threads))
    print(f"numba {numba.__version__}, threading layer: {numba.config.THREADING_LAYER}\n")

    header = f"{'model':<5} {'kernel':<10} {'format':<6} {'shape (rows x cols)':<20} {'thr':>3} " \
             f"{'ms':>9} {'GB/s':>7} {'% bw':>6}  {'GOP/s':>7}"
    print(header)
    print("-" * len(header))
    for model in args.models:
        shape = SHAPES[model]
        for fmt_name in args.formats:
            for threads in args.threads:
                numba.set_num_threads(threads)
                per_token = 0.0
                weight_bytes = 0
                for name, rows, cols, uses in matrices(shape):
                    seconds, nbytes = bench_matmul(fmt_name, rows, cols, 1, pool_bytes)
                    per_token += seconds * uses
                    weight_bytes += nbytes * uses
                    gbs = nbytes / seconds / 1e9
                    print(f"{model:<5} {'gemv ' + name:<10.10} {fmt_name:<6} {f'{rows} x {cols}':<20} {threads:>3} "
                          f"{seconds * 1e3:>9.3f} {gbs:>7.2f} {gbs / bandwidth[threads]:>6.0%}")
                gbs = weight_bytes / per_token / 1e9
                print(f"{model:<5} {'all GEMVs':<10} {fmt_name:<6} {'one token':<20} {threads:>3} "
                      f"{per_token * 1e3:>9.3f} {gbs:>7.2f} {gbs / bandwidth[threads]:>6.0%}  "
                      f"-> {1 / per_token:.1f} tokens/s ceiling from matmuls")
        # prefill: only the 1.5b MLP shapes, to keep the run short
        if model == "1.5b":
            for fmt_name in args.formats:
                for threads in args.threads:
                    numba.set_num_threads(threads)
                    for name, rows, cols, _ in matrices(shape)[2:4]:
                        seconds, _ = bench_matmul(fmt_name, rows, cols, args.prefill_tokens, pool_bytes // 8)
                        gops = 2 * rows * cols * args.prefill_tokens / seconds / 1e9
                        print(f"{model:<5} {'gemm ' + name:<10.10} {fmt_name:<6} "
                              f"{f'{rows} x {cols} x{args.prefill_tokens}':<20} {threads:>3} "
                              f"{seconds * 1e3:>9.1f} {'':>7} {'':>6}  {gops:>7.1f}")
        # attention over the KV cache: decode at 1024 and 4096 positions, per layer
        for kind, ctx in itertools.product(("f16", "q8_0"), (1024, 4096)):
            for threads in args.threads:
                numba.set_num_threads(threads)
                cache = KVCache(kind, 1, shape["kv_heads"], ctx, shape["head_dim"])
                q = np.random.default_rng(1).standard_normal((1, shape["heads"], shape["head_dim"])).astype(np.float32)
                out = np.empty_like(q)
                rows = KVCache.rows(ctx - 1, 1)
                seconds = time_calls(lambda i: cache.attend(0, q, *rows, out), 50)
                gbs = cache.nbytes / seconds / 1e9
                print(f"{model:<5} {'attention':<10} {'kv ' + kind:<6} {f'1 query, {ctx} keys':<20} {threads:>3} "
                      f"{seconds * 1e3:>9.3f} {gbs:>7.2f} {gbs / bandwidth[threads]:>6.0%}")
        for threads in args.threads:
            numba.set_num_threads(threads)
            x = np.random.default_rng(2).standard_normal((1, shape["intermediate"])).astype(np.float32)
            xq = np.empty(x.shape, np.int8)
            xd = np.empty((1, x.shape[1] // 32), np.float32)
            xs = np.empty((1, x.shape[1] // quant.SUM_BLOCK), np.int32)
            seconds = time_calls(lambda i: quant.quantize_for_matmul(x, xq, xd, xs), 200)
            print(f"{model:<5} {'quantize x':<10} {'q8':<6} {f'1 x {x.shape[1]}':<20} {threads:>3} {seconds * 1e3:>9.3f}")
        print()


if __name__ == "__main__":
    main()
