"""Our engine against llama.cpp on the same GGUF file and thread count: one table.

Runs alternate between the engines (each run a fresh process, so peak RSS is its own), several
repetitions, medians. pp = prompt processing tokens/s for a prompt of --pp tokens; tg =
generation tokens/s for --tg tokens (greedy, end-of-sequence ignored). GB/s = bytes of weights
read per generated token (every matrix except the embedding, of which one row is read) x tg;
% bw = GB/s over the higher of two read-bandwidth measurements (scripts/bandwidth.py), just
before and just after that model's runs: on a shared host the bandwidth drifts (15.8 to 22.6
GB/s within an hour here), and the higher one keeps the percentage on the conservative side.
RSS = peak resident memory (VmHWM); budget = weight bytes + KV cache + 300 MB. first token =
seconds from process start until it prints its first generated token, for a 1-token prompt
(not counting its exit afterwards, for either engine): warm with numba's cache, the
repacked-weight cache (engine/weight_cache.py) and Python's bytecode cache filled, cold with all
three empty, as on a first run (llama.cpp compiles and caches nothing: one column). Python's
bytecode cache is used even where the environment sets PYTHONDONTWRITEBYTECODE (this machine
does): without it every start compiles our modules from source again, about 0.1 s.

    pip install --find-links ../shared/wheels llama-cpp-python==0.3.36
    python scripts/make_synthetic_gguf.py --type q4_0 --out /tmp/r1-1.5b-q4_0.gguf
    python scripts/bench_generate.py /tmp/r1-1.5b-q4_0.gguf SmolLM2-135M-Instruct.Q4_1.gguf --threads 2
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
    for i in range(tg):   # through the thread tuner, as generation runs each decode step
        token = int(np.argmax(logits))
        logits = llm.threads.step(model.forward, np.asarray([token], dtype=np.int64), pp + i)
    tg_seconds = time.perf_counter() - started
    return {"load_s": load, "pp_tps": pp / pp_seconds, "tg_tps": tg / tg_seconds}


def last_logits(llm):
    """The last evaluated token's logits (llama-cpp-python fills `scores` only with logits_all)."""
    import numpy as np
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


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
        token = int(np.argmax(last_logits(llm)))
        llm.eval([token])
    tg_seconds = time.perf_counter() - started
    return {"load_s": load, "pp_tps": pp / pp_seconds, "tg_tps": tg / tg_seconds}


def first_token(path: str, threads: int) -> None:
    """Child for the time-to-first-token measurement: load, one token in, one token out."""
    import numpy as np
    import engine
    llm = engine.load(path, threads=threads, context_length=64)
    logits = llm.model.forward(np.asarray([1000]), 0)
    print(int(np.argmax(logits)), flush=True)


def first_token_llama_cpp(path: str, threads: int) -> None:
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=64, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval([1000])
    print(int(last_logits(llm).argmax()), flush=True)


def time_to_first_token(engine_name: str, model: str, threads: int, env: dict | None = None) -> float:
    """Seconds from starting a process to its first generated token (the child's first line of
    output; its exit, freeing everything, comes after and is not counted). Its stderr goes to a
    file, not a pipe: a pipe left unread while waiting for stdout could fill and stall the child."""
    child_env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.TemporaryFile("w+") as errors:
        started = time.perf_counter()
        child_process = subprocess.Popen([sys.executable, __file__, "--engine", engine_name + "-ttft", "--model", model,
                                          "--threads", str(threads)], stdout=subprocess.PIPE, stderr=errors,
                                         text=True, env={**child_env, **(env or {})})
        token = child_process.stdout.readline()
        seconds = time.perf_counter() - started
        child_process.communicate()
        if child_process.returncode != 0 or not token.strip():
            errors.seek(0)
            raise SystemExit(f"{engine_name} failed on {model}:\n{errors.read()[-2000:]}")
    return seconds


def kv_cache_bytes(path: str, positions: int) -> int:
    """Our f16 KV cache for `positions` positions."""
    from engine.gguf import GGUFFile, hf_config
    c = hf_config(GGUFFile(path))
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * positions * 2


def file_weight_bytes(path: str) -> int:
    from engine.gguf import GGUFFile
    return sum(t.nbytes for t in GGUFFile(path).tensors.values())


def weight_bytes_per_token(path: str) -> int:
    from engine.gguf import GGUFFile
    g = GGUFFile(path)
    return sum(t.nbytes for name, t in g.tensors.items() if len(t.shape) == 2 and name != "token_embd.weight") + \
        (g.tensors["token_embd.weight"].nbytes if "output.weight" not in g.tensors else 0)


def run_engine(name: str, model: str, threads: int | None, pp: int, tg: int) -> dict:
    """One timed run of an engine in a fresh process (so that its peak RSS is its own); threads
    None: the engine's default thread count."""
    out = subprocess.run([sys.executable, __file__, "--engine", name, "--model", model, "--threads", str(threads or 0),
                          "--pp", str(pp), "--tg", str(tg)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed on {model}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(args) -> None:
    if args.engine.endswith("-ttft"):
        (first_token if args.engine == "ours-ttft" else first_token_llama_cpp)(args.model, args.threads)
        return
    runner = run_ours if args.engine == "ours" else run_llama_cpp
    result = runner(args.model, args.threads or None, args.pp, args.tg)   # 0: the engine's default
    # VmHWM, not ru_maxrss: the latter survives exec and would include the parent's peak
    status = Path("/proc/self/status").read_text()
    result["rss_mb"] = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024
    print(json.dumps(result))


def cpu_description() -> str:
    """The CPU model and its widest SIMD, since the ratios differ between machine types."""
    import llvmlite.binding as llvm
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown CPU")
    features = llvm.get_host_cpu_features()
    simd = "AVX-512" + (" VNNI" if features.get("avx512vnni") else "") if features.get("avx512f") else \
        "AVX2" if features.get("avx2") else "no AVX2"
    return f"{name}, {simd}, {os.cpu_count()} cores"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pp", type=int, default=512)
    parser.add_argument("--tg", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine", choices=["ours", "llama.cpp", "ours-ttft", "llama.cpp-ttft"],
                        help=argparse.SUPPRESS)   # child mode
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return child(args)

    from scripts.bandwidth import measure_read_bandwidth
    # the machine's bandwidth drifts over minutes (shared hosts): it is measured before and after
    # each model's runs, and % bw is taken against the higher of the two (the conservative side)
    bandwidth_before = measure_read_bandwidth(args.threads)
    print(f"{cpu_description()}; pp{args.pp}, tg{args.tg}, median of {args.repeats} alternating runs; "
          f"% bw against the higher of the read bandwidths ({args.threads} thread(s)) measured before and after "
          f"each model's runs (bw GB/s)\n")
    header = (f"{'model':<30} {'engine':<9} {'pp t/s':>7} {'ratio':>5} {'tg t/s':>7} {'ratio':>5} {'GB/s':>6} "
              f"{'% bw':>5} {'bw GB/s':>11} {'RSS MB':>7} {'budget':>7} {'1st tok warm/cold s':>19}")
    print(header)
    print("-" * len(header))
    for model in args.models:
        results = {"ours": [], "llama.cpp": []}
        first = {"ours": [], "ours cold": [], "llama.cpp": []}
        # an untimed first run fills numba's cache and the weight cache: on a machine that never
        # ran the model, the first run also compiles and repacks (more time, and ~180 MB more peak
        # RSS for LLVM), which the cold first-token column measures on its own
        run_engine("ours", model, args.threads, 8, 2)
        time_to_first_token("ours", model, args.threads)   # and Python's bytecode cache
        for _ in range(args.repeats):
            for name in results:
                results[name].append(run_engine(name, model, args.threads, args.pp, args.tg))
                first[name].append(time_to_first_token(name, model, args.threads))   # numba cache warm now
            with tempfile.TemporaryDirectory() as empty:   # a first run ever: nothing compiled, nothing repacked
                first["ours cold"].append(time_to_first_token("ours", model, args.threads, {
                    "NUMBA_CACHE_DIR": f"{empty}/numba", "ENGINE_WEIGHT_CACHE": f"{empty}/weights",
                    "PYTHONPYCACHEPREFIX": f"{empty}/python"}))
        per_token = weight_bytes_per_token(model)
        budget = (file_weight_bytes(model) + kv_cache_bytes(model, args.pp + args.tg + 8)) / 2**20 + 300
        medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
        first = {name: statistics.median(times) for name, times in first.items()}
        bandwidth_after = measure_read_bandwidth(args.threads)
        bandwidth = max(bandwidth_before, bandwidth_after)
        measured = f"{bandwidth_before:.1f}/{bandwidth_after:.1f}"
        bandwidth_before = bandwidth_after
        for name, m in medians.items():
            gbs = per_token * m["tg_tps"] / 1e9
            pp_ratio = m["pp_tps"] / medians["llama.cpp"]["pp_tps"]
            tg_ratio = m["tg_tps"] / medians["llama.cpp"]["tg_tps"]
            ttft = f"{first['ours']:.2f} / {first['ours cold']:.2f}" if name == "ours" else f"{first[name]:.2f}"
            print(f"{Path(model).name[:30]:<30} {name:<9} {m['pp_tps']:>7.1f} {pp_ratio:>5.2f} {m['tg_tps']:>7.2f} "
                  f"{tg_ratio:>5.2f} {gbs:>6.2f} {gbs / bandwidth:>5.0%} {measured:>11} {m['rss_mb']:>7.0f} {budget:>7.0f} {ttft:>19}")


if __name__ == "__main__":
    main()
