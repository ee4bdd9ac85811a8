"""The server under concurrent clients: aggregate and per-client decode tokens/s, time to first token.

Starts `python -m engine serve` on each model (a process of its own, --parallel slots), then for
each client count runs that many streaming clients at once (raw prompts of about --pp tokens,
--tg tokens each, temperature 0) against /api/generate, and prints one table row per count:

- aggregate tokens/s: all clients' generated tokens over the time from the first request to the
  last token (prompts included);
- decoding t/s: the pieces all clients received while every one of them was decoding (from the
  last client's first token to the first client's last), over that time: the batched decode
  speed, which the ratio column compares with one client's;
- per-client tokens/s: each client's tokens after its first, over the time from its first token to
  its last (min and median over clients);
- time to first token, p50 and p95 over clients, from each client's request.

Median of --repeats rounds.

    python scripts/bench_serve.py SmolLM2-135M-Instruct.Q4_1.gguf /tmp/r1-1.5b-q4_0.gguf --clients 1 2 4 8
"""
import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.bench_generate import cpu_description  # noqa: E402

TOPICS = ["the sea", "a mountain", "the city at night", "a small garden", "winter", "an old library", "the desert",
          "a train journey", "the moon", "a forest"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, parallel: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", str(port), "-m", model,
                                "--parallel", str(parallel)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server for {model} did not start")
        time.sleep(0.2)


async def one_client(http: httpx.AsyncClient, model: str, prompt: str, tg: int) -> dict:
    started = time.perf_counter()
    stamps = []
    async with http.stream("POST", "/api/generate", json={
            "model": model, "prompt": prompt, "raw": True,
            "options": {"temperature": 0, "num_predict": tg, "repeat_penalty": 1}}) as r:
        async for line in r.aiter_lines():
            chunk = json.loads(line)
            if "error" in chunk:
                raise SystemExit(f"error from the server: {chunk['error']}")
            if not chunk["done"]:
                stamps.append(time.perf_counter())
            else:
                tokens = chunk["eval_count"]
    now = time.perf_counter()
    return {"started": started, "first": stamps[0] if stamps else now, "last": stamps[-1] if stamps else now,
            "stamps": stamps, "tokens": tokens}


async def round_of(url: str, model: str, clients: int, pp: int, tg: int) -> dict:
    prompts = [(f"Write a long and detailed description of {TOPICS[i % len(TOPICS)]}. " * pp)[:pp * 4]
               for i in range(clients)]
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        results = await asyncio.gather(*(one_client(http, model, p, tg) for p in prompts))
    begin, end = min(r["started"] for r in results), max(r["last"] for r in results)
    per_client = [(r["tokens"] - 1) / (r["last"] - r["first"]) for r in results if r["last"] > r["first"]]
    ttft = sorted(r["first"] - r["started"] for r in results)
    # while every client decodes: from the last client's first token to the first client's last
    window = (max(r["first"] for r in results), min(r["last"] for r in results))
    in_window = sum(sum(window[0] < t <= window[1] for t in r["stamps"]) for r in results)
    return {"aggregate": sum(r["tokens"] for r in results) / (end - begin),
            "decoding": in_window / (window[1] - window[0]) if window[1] > window[0] else float("nan"),
            "client_min": min(per_client), "client_median": statistics.median(per_client),
            "ttft_p50": ttft[len(ttft) // 2], "ttft_p95": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--pp", type=int, default=32, help="prompt length, roughly, in tokens")
    parser.add_argument("--tg", type=int, default=64, help="tokens generated per client")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{cpu_description()}; --parallel {args.parallel}, raw prompts of about {args.pp} tokens, "
          f"{args.tg} tokens per client, median of {args.repeats} rounds\n")
    print("| model | clients | aggregate t/s | decoding t/s | vs 1 client | per-client t/s min / median "
          "| TTFT p50 / p95 s |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        process, url = start_server(model, args.parallel)
        try:
            asyncio.run(round_of(url, model, 1, args.pp, 8))   # warm up: kernels, pages
            single = None
            for clients in args.clients:
                rounds = [asyncio.run(round_of(url, model, clients, args.pp, args.tg)) for _ in range(args.repeats)]
                m = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
                single = single or (m["decoding"] if clients == 1 else None)
                decoding = "-" if m["decoding"] != m["decoding"] else f"{m['decoding']:.1f}"   # NaN: more clients than slots
                ratio = f"{m['decoding'] / single:.2f}x" if single and decoding != "-" else "-"
                print(f"| {os.path.basename(model)} | {clients} | {m['aggregate']:.1f} | {decoding} | {ratio} | "
                      f"{m['client_min']:.1f} / {m['client_median']:.1f} | {m['ttft_p50']:.2f} / {m['ttft_p95']:.2f} |",
                      flush=True)
        finally:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
