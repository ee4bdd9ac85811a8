"""Model names to local files: a directory, an Ollama-style alias, or a Hugging Face repo id.

Hub downloads go through `huggingface_hub.snapshot_download`: its cache, its progress bars,
its offline mode (HF_HUB_OFFLINE=1 resolves from the cache without touching the network).
"""
import re
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


def resolve_model(name: str, tokenizer_only: bool = False) -> Path:
    """The local directory (or GGUF file) that holds the model called `name`, downloading it if need be."""
    path = Path(name).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if path.exists():
        raise EngineError(f"{name} is a file but not a .gguf; a model is a GGUF file or a directory "
                          f"with config.json and *.safetensors")
    repo_id = ALIASES.get(name.lower(), name)
    if not REPO_ID.match(repo_id):
        raise EngineError(f"model {name!r} is not a directory, a known alias ({', '.join(ALIASES)}) "
                          f"or a Hugging Face repo id (owner/name)")
    return download(repo_id, TOKENIZER_PATTERNS if tokenizer_only else MODEL_PATTERNS)


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
