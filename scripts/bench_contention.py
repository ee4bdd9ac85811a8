"""Decode speed when other processes keep the cores busy: ours and llama.cpp, quiet and under load.

Users run the engine beside other work. Every parallel region of a token waits for its slowest
thread, so a thread that the scheduler takes off its core stalls the whole token. This prints
decode tokens/s (greedy, --tg tokens after a --pp-token prompt, as scripts/bench_generate.py
measures them, each run a fresh process) on each model, with 0, 1 and 2 busy-loop processes
running beside it: ours at the default thread count and at --threads 1, and llama.cpp
(llama-cpp-python) at its default thread count (half the cores: `n_threads or cpu_count // 2`).
Runs alternate between the three; medians.

    python scripts/bench_contention.py SmolLM2-135M-Instruct.Q4_1.gguf /tmp/r1-1.5b-q4_0.gguf [--repeats 3]
"""
import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.bench_generate import cpu_description, run_engine  # noqa: E402

ENGINES = {"ours (default threads)": ("ours", None), "ours --threads 1": ("ours", 1),
           "llama.cpp (default)": ("llama.cpp", None)}


def busy_loops(count: int) -> list:
    """Processes that keep a core busy until killed (pure Python spin: no memory traffic)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="busy processes per condition")
    parser.add_argument("--pp", type=int, default=16)
    parser.add_argument("--tg", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{cpu_description()}; decode tokens/s, tg{args.tg} after pp{args.pp}, median of {args.repeats} "
          f"alternating runs; ratio = against our own quiet decode at the default thread count\n")
    header = f"{'model':<30} {'busy':>4} " + " ".join(f"{name:>22}" for name in ENGINES) + f" {'ours/quiet':>10}" \
             f" {'ours/llama.cpp':>14}"
    print(header)
    print("-" * len(header))
    for model in args.models:
        run_engine("ours", model, None, 8, 2)   # fills numba's cache and the weight cache: not timed
        quiet = None
        for busy in args.busy:
            runs = {name: [] for name in ENGINES}
            loops = busy_loops(busy)
            try:
                for _ in range(args.repeats):
                    for name, (engine, threads) in ENGINES.items():
                        runs[name].append(run_engine(engine, model, threads, args.pp, args.tg)["tg_tps"])
            finally:
                for loop in loops:
                    loop.kill()
                    loop.wait()
            tps = {name: statistics.median(values) for name, values in runs.items()}
            ours = tps["ours (default threads)"]
            quiet = quiet or ours
            print(f"{Path(model).name[:30]:<30} {busy:>4} " + " ".join(f"{tps[name]:>22.2f}" for name in ENGINES)
                  + f" {ours / quiet:>10.2f} {ours / tps['llama.cpp (default)']:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
