"""Our engine against llama.cpp on the same GGUF file and thread count: one table.

Runs alternate between the engines (each run a fresh process, so peak RSS is its own), several
repetitions, medians. pp = prompt processing tokens/s for a prompt of --pp tokens; tg =
generation tokens/s for --tg tokens (greedy, end-of-sequence ignored). GB/s = bytes of weights
read per generated token (every matrix except the embedding, of which one row is read) x tg.

    pip install --find-links ../shared/wheels llama-cpp-python==0.3.36
    python scripts/make_synthetic_gguf.py --type q4_0 --out /tmp/r1-1.5b-q4_0.gguf
    python scripts/bench_generate.py /tmp/r1-1.5b-q4_0.gguf SmolLM2-135M-Instruct.Q4_1.gguf --threads 2
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prompt_ids(n: int, vocab: int) -> list[int]:
    return [1000 + (i * 7919) % (vocab - 2000) for i in range(n)]   # ordinary tokens, no specials


def run_ours(path: str, threads: int, pp: int, tg: int) -> dict:
    import numpy as np
    import engine
    started = time.perf_counter()
    llm = engine.load(path, threads=threads, context_length=pp + tg + 8)
    load = time.perf_counter() - started
    model = llm.model
    ids = np.asarray(prompt_ids(pp, llm.config.vocab_size), dtype=np.int64)
    model.forward(ids[:1], 0)                       # compile or load the kernels before timing
    started = time.perf_counter()
    logits = model.prefill(ids, 0)
    pp_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(tg):
        token = int(np.argmax(logits))
        logits = model.forward(np.asarray([token], dtype=np.int64), pp + i)
    tg_seconds = time.perf_counter() - started
    return {"load_s": load, "pp_tps": pp / pp_seconds, "tg_tps": tg / tg_seconds}


def run_llama_cpp(path: str, threads: int, pp: int, tg: int) -> dict:
    import numpy as np
    from llama_cpp import Llama
    started = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=pp + tg + 8, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    load = time.perf_counter() - started
    ids = prompt_ids(pp, llm.n_vocab())
    llm.eval(ids[:1])
    llm.reset()
    started = time.perf_counter()
    llm.eval(ids)
    pp_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(tg):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    tg_seconds = time.perf_counter() - started
    return {"load_s": load, "pp_tps": pp / pp_seconds, "tg_tps": tg / tg_seconds}


def weight_bytes_per_token(path: str) -> int:
    from engine.gguf import GGUFFile
    g = GGUFFile(path)
    return sum(t.nbytes for name, t in g.tensors.items() if len(t.shape) == 2 and name != "token_embd.weight") + \
        (g.tensors["token_embd.weight"].nbytes if "output.weight" not in g.tensors else 0)


def child(args) -> None:
    runner = run_ours if args.engine == "ours" else run_llama_cpp
    result = runner(args.model, args.threads, args.pp, args.tg)
    # VmHWM, not ru_maxrss: the latter survives exec and would include the parent's peak
    status = Path("/proc/self/status").read_text()
    result["rss_mb"] = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pp", type=int, default=512)
    parser.add_argument("--tg", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine", choices=["ours", "llama.cpp"], help=argparse.SUPPRESS)   # child mode
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return child(args)

    from scripts.bandwidth import measure_read_bandwidth
    bandwidth = measure_read_bandwidth(args.threads)
    print(f"read bandwidth at {args.threads} thread(s): {bandwidth:.1f} GB/s; pp{args.pp}, tg{args.tg}, "
          f"median of {args.repeats} alternating runs\n")
    header = (f"{'model':<42} {'engine':<9} {'pp t/s':>8} {'tg t/s':>8} {'tg ratio':>8} {'GB/s':>6} {'% bw':>5} "
              f"{'RSS MB':>7} {'load s':>6}")
    print(header)
    print("-" * len(header))
    for model in args.models:
        results = {"ours": [], "llama.cpp": []}
        for _ in range(args.repeats):
            for name in results:
                out = subprocess.run([sys.executable, __file__, "--engine", name, "--model", model,
                                      "--threads", str(args.threads), "--pp", str(args.pp), "--tg", str(args.tg)],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"{name} failed on {model}:\n{out.stderr[-2000:]}")
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        per_token = weight_bytes_per_token(model)
        medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
        for name, m in medians.items():
            gbs = per_token * m["tg_tps"] / 1e9
            ratio = m["tg_tps"] / medians["llama.cpp"]["tg_tps"]
            print(f"{Path(model).name[:42]:<42} {name:<9} {m['pp_tps']:>8.1f} {m['tg_tps']:>8.2f} {ratio:>8.2f} "
                  f"{gbs:>6.2f} {gbs / bandwidth:>5.0%} {m['rss_mb']:>7.0f} {m['load_s']:>6.2f}")


if __name__ == "__main__":
    main()
