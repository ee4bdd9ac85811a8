"""Compare numba threading layers (and OpenMP wait policies) on decode speed and idle CPU use.

Each configuration runs in a fresh process: load the model, generate --tokens greedily, then
sleep one second and report the CPU time the process used while idle (a spinning worker shows
up as ~1 s per spinning core). tbb is tried too, if it loads.

    python scripts/bench_threading.py MODEL.gguf [--tokens 64] [--threads 2] [--repeats 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {   # name: environment
    "omp (default wait policy)": {"NUMBA_THREADING_LAYER": "omp"},
    "omp, OMP_WAIT_POLICY=passive": {"NUMBA_THREADING_LAYER": "omp", "OMP_WAIT_POLICY": "passive"},
    "omp, OMP_WAIT_POLICY=active": {"NUMBA_THREADING_LAYER": "omp", "OMP_WAIT_POLICY": "active"},
    "omp, GOMP_SPINCOUNT=3M": {"NUMBA_THREADING_LAYER": "omp", "GOMP_SPINCOUNT": "3000000"},
    "omp, GOMP_SPINCOUNT=30M": {"NUMBA_THREADING_LAYER": "omp", "GOMP_SPINCOUNT": "30000000"},
    "workqueue": {"NUMBA_THREADING_LAYER": "workqueue"},
    "tbb": {"NUMBA_THREADING_LAYER": "tbb"},
}


def child(model: str, tokens: int, threads: int) -> None:
    import numpy as np
    import engine
    llm = engine.load(model, threads=threads, context_length=tokens + 16)
    logits = llm.model.forward(np.asarray([1000]), 0)
    started = time.perf_counter()
    for i in range(tokens):
        logits = llm.model.forward(np.asarray([int(np.argmax(logits))]), i + 1)
    decode = tokens / (time.perf_counter() - started)
    cpu = time.process_time()
    time.sleep(1.0)
    import numba
    print(json.dumps({"tps": decode, "idle_cpu_s": time.process_time() - cpu, "layer": numba.threading_layer()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.model, args.tokens, args.threads)
    results = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):   # alternate configurations: the machine's noise hits all alike
        for name, env in CONFIGS.items():
            out = subprocess.run([sys.executable, __file__, args.model, "--child", "--tokens", str(args.tokens),
                                  "--threads", str(args.threads)], capture_output=True, text=True,
                                 env={**os.environ, **env})
            if out.returncode == 0:
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'threading layer':<30} {'decode t/s':>10} {'idle CPU s/s':>12}")
    for name, runs in results.items():
        if not runs:
            print(f"{name:<30} {'does not load':>10}")
            continue
        tps = statistics.median(r["tps"] for r in runs)
        idle = statistics.median(r["idle_cpu_s"] for r in runs)
        print(f"{name:<30} {tps:>10.2f} {idle:>12.3f}")


if __name__ == "__main__":
    main()
