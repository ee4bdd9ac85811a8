"""Model names to local files: a directory or .gguf file, Ollama's local store, an alias, a Hugging Face repo.

Order: an existing path; then a NAME:TAG already pulled into Ollama's store ($OLLAMA_MODELS or
~/.ollama/models), whose `params` layer supplies defaults (stop strings, temperature, ...);
then Ollama-style aliases of the DeepSeek distills and plain repo ids, fetched with
`huggingface_hub.snapshot_download` (its cache, its progress bars, HF_HUB_OFFLINE honoured).
"""
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EngineError

# Ollama's names for the DeepSeek-R1 distills, mapped to their Hugging Face repos.
ALIASES = {
    "deepseek-r1:1.5b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "deepseek-r1:7b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "deepseek-r1:8b": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    "deepseek-r1:14b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
    "deepseek-r1:32b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
    "deepseek-r1:70b": "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
}

# What a model needs from a repo: configs, weights, tokenizer; not the .bin/.pth duplicates.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
TOKENIZER_PATTERNS = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                      "config.json", "generation_config.json"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
OLLAMA_NAME = re.compile(r"^(?:(?P<namespace>[\w.-]+)/)?(?P<name>[\w.-]+)(?::(?P<tag>[\w.-]+))?$")
OLLAMA_MODEL = "application/vnd.ollama.image.model"
OLLAMA_PARAMS = "application/vnd.ollama.image.params"
# Ollama parameter names -> ours (sampler options; num_ctx is the context length)
OLLAMA_OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                  "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
                  "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                  "seed": "seed", "stop": "stop", "num_ctx": "context_length"}


@dataclass
class Resolved:
    path: Path              # a model directory or a .gguf file
    source: str             # where it came from, for the user
    options: dict = field(default_factory=dict)   # defaults from Ollama's params layer


def ollama_store() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def find_in_ollama(name: str) -> Resolved | None:
    """An already-pulled Ollama model: manifest -> model layer -> blobs/sha256-<hex>."""
    match = OLLAMA_NAME.match(name)
    if not match:
        return None
    store = ollama_store()
    manifest = (store / "manifests" / "registry.ollama.ai" / (match["namespace"] or "library")
                / match["name"] / (match["tag"] or "latest"))
    if not manifest.is_file():
        return None
    try:
        layers = {layer["mediaType"]: layer["digest"] for layer in json.loads(manifest.read_text())["layers"]}
    except (ValueError, KeyError, TypeError):
        raise EngineError(f"Ollama manifest {manifest} is not a valid image manifest") from None

    def blob(digest: str) -> Path:
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", str(digest)):
            raise EngineError(f"Ollama manifest {manifest} has an invalid digest {digest!r}")
        path = store / "blobs" / digest.replace(":", "-")
        if not path.is_file():
            raise EngineError(f"Ollama blob {path} named by {manifest} is missing")
        return path

    if OLLAMA_MODEL not in layers:
        raise EngineError(f"Ollama manifest {manifest} has no model layer")
    options = {}
    if OLLAMA_PARAMS in layers:
        try:
            params = json.loads(blob(layers[OLLAMA_PARAMS]).read_text())
        except ValueError:
            raise EngineError(f"the params layer of Ollama's {name} is not JSON") from None
        options = {OLLAMA_OPTIONS[k]: v for k, v in params.items() if k in OLLAMA_OPTIONS}
    return Resolved(blob(layers[OLLAMA_MODEL]), f"Ollama's {name} ({store})", options)


def resolve(name: str, tokenizer_only: bool = False) -> Resolved:
    """Where the model called `name` is, downloading it if need be."""
    path = Path(name).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return Resolved(path, str(path))
    if path.exists():
        raise EngineError(f"{name} is a file but not a .gguf; a model is a GGUF file or a directory "
                          f"with config.json and *.safetensors")
    if ":" in name:
        found = find_in_ollama(name)
        if found:
            return found
    repo_id = ALIASES.get(name.lower(), name)
    if not REPO_ID.match(repo_id):
        raise EngineError(f"model {name!r} is not a directory, a .gguf file, a model in Ollama's store "
                          f"({ollama_store()}), a known alias ({', '.join(ALIASES)}) or a Hugging Face repo id")
    source = f"Hugging Face {repo_id}"
    if repo_id != name:
        source += f" ({name} is not in Ollama's store {ollama_store()})"
    return Resolved(download(repo_id, TOKENIZER_PATTERNS if tokenizer_only else MODEL_PATTERNS), source)


def download(repo_id: str, allow_patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except RepositoryNotFoundError:
        raise EngineError(f"Hugging Face repo {repo_id!r} does not exist (or needs a token)") from None
    except LocalEntryNotFoundError:
        raise EngineError(f"{repo_id!r} is not in the Hugging Face cache and could not be downloaded "
                          f"(offline, or the hub is unreachable)") from None
    except (HfHubHTTPError, OSError) as e:
        raise EngineError(f"downloading {repo_id!r} failed: {e}") from None
