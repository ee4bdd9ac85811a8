"""Session fixtures: the tiny models are built once per test session in a temporary directory."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEEPSEEK_TOKENIZER = SHARED / "data" / "deepseek-r1-distill-qwen-tokenizer"

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
def deepseek_tokenizer_dir():
    assert DEEPSEEK_TOKENIZER.is_dir(), f"the shared DeepSeek tokenizer is missing: {DEEPSEEK_TOKENIZER}"
    return DEEPSEEK_TOKENIZER


LONG_TEXT = " ".join(tiny_models.CORPUS) * 2
