"""Perplexity of GGUF files on English prose: ours and llama.cpp's, side by side, same tokens.

The text is cut into windows of --ctx tokens (8 by default); each window is evaluated in a
fresh context and, as llama.cpp's `llama-perplexity` does, only its second half is scored (every
scored token sees at least ctx / 2 tokens before it). Both engines read the same token ids (ours;
llama.cpp's own tokenization of the text is compared and any difference reported), so the ratio
says how close our arithmetic is to llama.cpp's on the same file.

The default text is the prose of Python's own reference documentation (pydoc_data, shipped with
every Python: paragraphs of sentences, without code or grammar rules); --text takes any file.

    python scripts/perplexity.py /tmp/smollm2-*.gguf --threads 2
    python scripts/perplexity.py model.gguf --text book.txt --windows 16 --ctx 1024
"""
import argparse
import math
import os
import re
import sys
import time

from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def python_docs_prose() -> str:
    """Paragraphs of running English from Python's reference documentation: unindented, not
    headings, at least 200 characters, nearly all letters and punctuation."""
    import pydoc_data.topics
    paragraphs = []
    for key in sorted(pydoc_data.topics.topics):
        for paragraph in re.split(r"\n\s*\n", pydoc_data.topics.topics[key]):
            if paragraph[:1].isspace() or len(paragraph) < 200 or re.search(r"[*=]{3}", paragraph):
                continue
            plain = sum(c.isalpha() or c in " ,.;:'\n()-" for c in paragraph) / len(paragraph)
            if plain > 0.95:
                paragraphs.append(" ".join(paragraph.split()))
    return "\n\n".join(paragraphs)


def negative_log_likelihoods(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] per row, in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_total = np.log(np.exp(z).sum(axis=1))
    return log_total - z[np.arange(len(targets)), targets]


def windows_of(ids: list, ctx: int, count: int) -> list:
    if len(ids) < ctx * count:
        sys.exit(f"the text has {len(ids)} tokens, fewer than {count} windows of {ctx}: give a longer --text "
                 f"or fewer --windows")
    return [np.array(ids[i * ctx:(i + 1) * ctx], np.int64) for i in range(count)]


def score(logits_of, windows: list, ctx: int) -> tuple[float, float]:
    """(perplexity, seconds): logits_of(window) -> (ctx, vocab) logits."""
    first = ctx // 2
    losses, started = [], time.perf_counter()
    for window in windows:
        logits = logits_of(window)
        losses.append(negative_log_likelihoods(logits[first:-1], window[first + 1:]))
    return math.exp(float(np.concatenate(losses).mean())), time.perf_counter() - started


def ours(path: str, windows: list, ctx: int, threads: int | None):
    import engine
    llm = engine.load(path, context_length=ctx, threads=threads)
    return score(llm.logits, windows, ctx)


def exact(path: str, windows: list, ctx: int, threads: int | None):
    """The file's weights decoded to float32 and multiplied by float activations: the file's own
    perplexity, without either engine's rounding of the activations (both round them per block
    to int8; we with a float32 scale per 32, llama.cpp with an fp16
    scale per 32 for 32-blocks and a float scale per 256 for k-quants and IQ4_XS)."""
    import engine
    from engine.kernels.formats import Weight
    from engine.model import Transformer
    config, tokenizer, weights = engine.read_model(Path(path))
    floats = {name: Weight.quantize(w.dequantize(), "f32", w.rows_only)
              if isinstance(w, Weight) and w.format.packed else w for name, w in weights.items()}
    llm = engine.LLM(config, tokenizer, Transformer(config, floats, ctx, kv_cache="f32"),
                     threads=engine.ThreadTuner(threads))
    return score(llm.logits, windows, ctx)


def llama_cpp(path: str, text: str, windows: list, ctx: int, threads: int):
    from llama_cpp import Llama   # pip install --find-links ../shared/wheels llama-cpp-python==0.3.36
    llm = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)
    theirs = llm.tokenize(text.encode(), add_bos=False, special=False)
    ours_ids = np.concatenate(windows)
    same = int(np.sum(np.array(theirs[:len(ours_ids)]) == ours_ids)) if len(theirs) >= len(ours_ids) else 0

    def logits_of(window):
        llm.reset()
        llm.eval(window.tolist())
        return np.array(llm.scores[:len(window)], np.float32)
    perplexity, seconds = score(logits_of, windows, ctx)
    return perplexity, seconds, same


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="GGUF files")
    parser.add_argument("--text", help="a UTF-8 text file (default: the prose of Python's reference documentation)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-llama-cpp", action="store_true", help="ours only")
    parser.add_argument("--exact", action="store_true",
                        help="also the file's weights in float32 with float activations (slow): who is nearer")
    args = parser.parse_args()
    text = open(args.text, encoding="utf-8").read() if args.text else python_docs_prose()
    from scripts.bench_generate import cpu_description
    print(f"# {cpu_description()}, {args.threads} threads, {args.windows} windows of "
          f"{args.ctx} tokens, the second half of each scored; text: {args.text or 'Python reference prose'}")
    columns = ["file", "tensor types", "ours", "llama.cpp", "ours / llama.cpp", "ours s", "llama.cpp s"]
    columns += ["float32", "ours / float32", "llama.cpp / float32"] if args.exact else []
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    import engine
    from engine.source import open_source
    for path in args.models:
        details = open_source(Path(path)).details()
        types = ", ".join(f"{name} x{n}" for name, n in details.tensor_types.most_common() if name != "F32")
        windows = windows_of(engine.load_tokenizer(path).encode(text), args.ctx, args.windows)
        ppl, seconds = ours(path, windows, args.ctx, args.threads)
        row = [os.path.basename(path), types, f"{ppl:.3f}"]
        if args.no_llama_cpp:
            row += ["-", "-", f"{seconds:.1f}", "-"]
        else:
            reference, their_seconds, same = llama_cpp(path, text, windows, args.ctx, args.threads)
            row += [f"{reference:.3f}", f"{ppl / reference:.4f}", f"{seconds:.1f}", f"{their_seconds:.1f}"]
            total = args.ctx * args.windows
            if same != total:
                row[1] += f" (llama.cpp tokenizes {total - same} of {total} tokens differently)"
        if args.exact:
            truth, _ = exact(path, windows, args.ctx, args.threads)
            row += [f"{truth:.3f}", f"{ppl / truth:.4f}", "-" if args.no_llama_cpp else f"{reference / truth:.4f}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
