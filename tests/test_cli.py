"""`python -m engine` end to end, and model resolution from an offline Hugging Face cache."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest


def run(*args, env=None):
    if args[0] == "generate":   # the in-process references use an f32 KV cache
        args = (*args, "--kv-cache", "f32")
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_generate_streams_only_the_text(model_dirs, loaded):
    model = str(model_dirs("qwen2-f32"))
    result = run("generate", "--model", model, "--prompt", "Why is the sky blue?", "--temperature", "0",
                 "--max-tokens", "12", "--verbose", "--threads", "1")
    assert result.returncode == 0, result.stderr
    expected = loaded("qwen2-f32").generate("Why is the sky blue?", temperature=0, max_tokens=12)
    assert result.stdout == expected + "\n"
    for field in ("load duration:", "prompt eval count:", "prompt eval rate:", "eval count:    ", "eval rate:"):
        assert field in result.stderr


def test_profile_accounts_for_the_generation(model_dirs, loaded):
    """--profile: the same text, and a per-kernel table whose shares add up to the whole."""
    import re
    model = str(model_dirs("qwen2-f32"))
    result = run("generate", "--model", model, "--prompt", "Why is the sky blue?", "--temperature", "0",
                 "--max-tokens", "12", "--profile", "--quant", "q4_0")
    assert result.returncode == 0, result.stderr
    generation = result.stderr.split("generation: ")[1]
    tokens = int(generation.split()[0])
    rows = {m[0].strip(): (float(m[1]), int(m[2])) for m in
            re.findall(r"^  (\S.{33}) +([\d.]+)% +[\d.]+ +(\d+)", generation, re.M)}
    # 2 layers: every projection once per layer and token, the LM head once per token
    assert rows["matmul gate_proj (q4_0)"][1] == 2 * tokens
    assert rows["matmul lm_head (q8_0)"][1] == tokens
    assert rows["attention (f32)"][1] == 2 * tokens
    rest = float(re.search(r"\(python, biases, residual adds\) +(-?[\d.]+)%", generation)[1])
    assert abs(sum(share for share, _ in rows.values()) + rest - 100) < 0.5


def test_raw_and_seeded_sampling(model_dirs, loaded):
    model = str(model_dirs("llama-f32"))
    args = ["generate", "--model", model, "--prompt", "Once upon", "--raw", "--max-tokens", "10", "--seed", "3",
            "--top-k", "20", "--top-p", "0.9", "--min-p", "0.01", "--repeat-penalty", "1.1", "--temperature", "0.8"]
    result = run(*args)
    assert result.returncode == 0, result.stderr
    expected = loaded("llama-f32").generate("Once upon", raw=True, max_tokens=10, seed=3, top_k=20, top_p=0.9,
                                            min_p=0.01, repeat_penalty=1.1, temperature=0.8)
    assert result.stdout == expected + "\n"


def test_tokenize_prints_json_ids(model_dirs, loaded):
    result = run("tokenize", "--model", str(model_dirs("qwen2-f32")), "Hello world, 你好")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == loaded("qwen2-f32").tokenize("Hello world, 你好")


def test_system_message(model_dirs, loaded):
    result = run("generate", "--model", str(model_dirs("qwen2-f32")), "--prompt", "Hi", "--system", "Be brief.",
                 "--temperature", "0", "--max-tokens", "6")
    assert result.returncode == 0, result.stderr
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert result.stdout == loaded("qwen2-f32").generate(messages, temperature=0, max_tokens=6) + "\n"


@pytest.mark.parametrize("args, message", [
    (["--raw", "--system", "x"], "error: --system needs the chat template"),
    (["--top-p", "2"], r"error: top_p must be in (0.0, 1.0]"),
    (["--temperature", "-1"], "error: temperature must be in"),
    (["--ctx", "8"], "error: the prompt has"),
])
def test_bad_options_are_clear_errors(model_dirs, args, message):
    result = run("generate", "--model", str(model_dirs("qwen2-f32")), "--prompt", "Why is the sky blue?", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_unknown_model_name():
    result = run("tokenize", "--model", "not a model", "hi")
    assert result.returncode == 2
    assert "is not a directory, a .gguf file, a model in Ollama's store" in result.stderr


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory, model_dirs):
    """A Hugging Face hub cache laid out as huggingface_hub leaves it: the tiny Qwen2 as the GGUF
    file of deepseek-r1:1.5b and as the safetensors repo of deepseek-r1:1.5b-safetensors."""
    import tiny_models
    from test_library import add_to_cache
    cache = tmp_path_factory.mktemp("hf") / "hub"
    gguf = tiny_models.hf_to_gguf(model_dirs("qwen2-f32"), tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    add_to_cache(cache, "bartowski/DeepSeek-R1-Distill-Qwen-1.5B-GGUF",
                 {"DeepSeek-R1-Distill-Qwen-1.5B-Q4_K_M.gguf": gguf})
    add_to_cache(cache, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
                 {p.name: p for p in model_dirs("qwen2-f32").iterdir() if p.is_file()})
    return cache


def test_alias_resolves_from_offline_cache(hf_cache, loaded, tmp_path):
    env = {"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "OLLAMA_MODELS": str(tmp_path / "no-ollama")}
    for name, source in (("deepseek-r1:1.5b", "bartowski/DeepSeek-R1-Distill-Qwen-1.5B-GGUF/"
                                               "DeepSeek-R1-Distill-Qwen-1.5B-Q4_K_M.gguf"),
                         ("deepseek-r1:1.5b-safetensors", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")):
        result = run("generate", "--model", name, "--prompt", "Hi", "--temperature", "0", "--max-tokens", "5", env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout == loaded("qwen2-f32").generate("Hi", temperature=0, max_tokens=5) + "\n"
        assert f"model: Hugging Face {source} ({name} is not in Ollama's store" in result.stderr
    result = run("tokenize", "--model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "Hello", env=env)
    assert json.loads(result.stdout) == loaded("qwen2-f32").tokenize("Hello")
    result = run("tokenize", "--model", "deepseek-r1:1.5b", "Hello", env=env)   # the tokenizer, not the GGUF
    assert json.loads(result.stdout) == loaded("qwen2-f32").tokenize("Hello")
    result = run("tokenize", "--model", "deepseek-r1:7b", "Hello", env=env)
    assert result.returncode == 2
    assert "'deepseek-ai/DeepSeek-R1-Distill-Qwen-7B' is not in the Hugging Face cache" in result.stderr


def test_aliases_cover_every_distill_as_ollama_ships_it():
    from engine.resolve import ALIASES
    assert ALIASES["deepseek-r1:7b"].repo == "bartowski/DeepSeek-R1-Distill-Qwen-7B-GGUF"
    assert ALIASES["deepseek-r1:7b"].filename == "DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf"
    assert ALIASES["deepseek-r1:8b-q8_0"].filename == "DeepSeek-R1-Distill-Llama-8B-Q8_0.gguf"
    assert ALIASES["deepseek-r1:14b-fp16"].filename == "DeepSeek-R1-Distill-Qwen-14B-f16.gguf"
    assert ALIASES["deepseek-r1:70b-safetensors"].repo == "deepseek-ai/DeepSeek-R1-Distill-Llama-70B"
    assert {k.split(":")[1] for k in ALIASES if k.startswith("deepseek-r1:") and "-" not in k.split(":")[1]} == {
        "1.5b", "7b", "8b", "14b", "32b", "70b"}


def test_compilation_is_shown_and_counted_apart(capsys):
    """A first run compiles kernels for seconds: the command line says so (once, and what it
    compiled), --verbose reports the time on its own line; kernels loaded from numba's cache
    (or compiled before) show nothing."""
    import numba
    from engine.cli import CompileProgress
    progress = CompileProgress()
    numba.njit(lambda a: a + 1)(1)     # two fresh compilations
    numba.njit(lambda a: a * 2)(1)
    progress.finish()
    numba.njit(lambda a: a * 3)(1)     # after the answer began: counted, not shown
    err = capsys.readouterr().err
    assert err.count("compiling kernels for this CPU") == 1
    assert re.search(r"^compiled 2 kernels in \d+\.\ds$", err, re.M), err
    from engine.kernels.ops import rmsnorm
    args = np.ones((1, 8), np.float32), np.ones(8, np.float32), 1e-6, np.empty((1, 8), np.float32)
    rmsnorm(*args)   # compiled or loaded from the cache before
    capsys.readouterr()
    progress = CompileProgress()
    rmsnorm(*args)
    progress.finish()
    assert capsys.readouterr().err == ""


def test_compile_time_is_not_prompt_time(loaded):
    """Time spent compiling during a generation is its own line, not part of prompt eval."""
    import numba
    from engine.kernels.compiler import COMPILE_LOG
    llm = loaded("llama-f32")
    llm.generate("Hi", max_tokens=1)       # the load's own times go with the first generation
    slow = numba.njit(lambda a: a + 1)

    def compiling_prefill(*args, original=llm.model.prefill, **kwargs):
        slow(1.5)                          # a real compilation, inside the prompt's time
        return original(*args, **kwargs)
    before = COMPILE_LOG.seconds
    llm.model.prefill = compiling_prefill
    try:
        llm.generate("Hi", max_tokens=2, temperature=0)
    finally:
        del llm.model.prefill
    stats = llm.last_stats
    assert stats.compiled_kernels == 1 and stats.compile_seconds == pytest.approx(COMPILE_LOG.seconds - before)
    assert stats.prompt_seconds < stats.compile_seconds   # a tiny model's prompt takes far less than a compilation
    assert "compile duration:" in stats.report()
