"""Model sources: a GGUF file or a Hugging Face directory, each read by one class that answers
the same questions, so that every caller branches once (`open_source`):

- config: the checked ModelConfig, with what the source stores differently already applied;
- tokenizer: the tokenizer and its chat template;
- tensors: {Hugging Face name: (dtype name, array view)} and {name: format} for block formats;
- weight_cache: where repacked block matrices are kept (engine/weight_cache.py), or None;
- details: what `info`, `show` and `list` print: family, parameters, quantization, tensor types,
  file format and size (read from headers alone); capabilities come from the tokenizer's template.

Reading is lazy: asking for the tokenizer reads no weights, and `tokenizer_only` opens a GGUF
file whose tensor data is cut off or a directory holding only tokenizer files.
"""
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .kernels.formats import FORMATS

from .config import ModelConfig, load_config
from .errors import EngineError
from .gguf import GGUFFile, file_type_name, gguf_config, gguf_tensors
from .thinking import CLOSING
from .tokenizer import Tokenizer, tokenizer_from_gguf
from .weight_cache import WeightCache
from .weights import check_layer_count, read_checkpoint, stored_formats



@dataclass(frozen=True)
class ModelDetails:
    file_format: str           # "GGUF v3", "safetensors", "quantized safetensors"
    family: str                # the architecture: "qwen2", "llama"
    parameters: int
    quantization: str          # the file's type (GGUF's general.file_type, e.g. "Q4_K_M"), else the
                               # most common type among the matrices, e.g. "Q4_K", "bf16"
    tensor_types: Counter      # type name -> tensors
    file_size: int
    tokenizer: str             # what the tokenizer is built from

    @property
    def parameter_size(self) -> str:
        """As Ollama writes it: 1.8B, 135M."""
        return f"{self.parameters / 1e9:.1f}B" if self.parameters >= 1e9 else f"{self.parameters / 1e6:.0f}M"


class GGUFSource:
    """A .gguf file: config, tokenizer and chat template from its metadata, tensors by HF name."""

    def __init__(self, path: Path, tokenizer_only: bool = False):
        self.path = Path(path)
        self.file = GGUFFile(self.path, require_data=not tokenizer_only)

    @cached_property
    def config(self) -> ModelConfig:
        return gguf_config(self.file)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_gguf(self.file.metadata)

    def tensors(self) -> tuple[dict, dict]:
        return gguf_tensors(self.file)

    def weight_cache(self) -> WeightCache | None:
        return WeightCache.for_files([self.path])

    def details(self) -> ModelDetails:
        infos = self.file.tensors.values()
        matrices = [t.type_name for t in infos if len(t.shape) > 1]
        metadata = self.file.metadata
        return ModelDetails(
            file_format=f"GGUF v{self.file.version}",
            family=str(metadata.get("general.architecture", "?")),
            parameters=sum(int(np.prod(t.shape)) for t in infos),
            quantization=file_type_name(metadata.get("general.file_type"))
            or (Counter(matrices).most_common(1)[0][0] if matrices else "none"),
            tensor_types=Counter(t.type_name for t in infos),
            file_size=self.path.stat().st_size,
            tokenizer=f"GGUF {metadata.get('tokenizer.ggml.model')} (pre-tokenizer "
                      f"{metadata.get('tokenizer.ggml.pre', 'default')})")


class DirectorySource:
    """A Hugging Face directory: config.json (+ generation_config.json), tokenizer.json (+ its
    config and template), *.safetensors, float or quantized by `python -m engine quantize`."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @cached_property
    def config(self) -> ModelConfig:
        return load_config(self.path)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_dir(self.path)

    @cached_property
    def _checkpoint(self) -> tuple[dict, dict]:
        tensors, metadata = read_checkpoint(self.path)
        return tensors, stored_formats(metadata)

    def tensors(self) -> tuple[dict, dict]:
        return self._checkpoint

    def weight_cache(self) -> WeightCache | None:
        """Only block formats are repacked: a float checkpoint is read in place."""
        return WeightCache.for_files(sorted(self.path.glob("*.safetensors"))) if self._checkpoint[1] else None

    def details(self) -> ModelDetails:
        tensors, formats = self._checkpoint
        check_layer_count(self.config, tensors)
        types = {name: formats.get(name, dtype) for name, (dtype, _) in tensors.items()}
        matrices = [types[name] for name, (_, array) in tensors.items() if array.ndim > 1]
        return ModelDetails(
            file_format="quantized safetensors" if formats else "safetensors",
            family=self.config.architecture,
            parameters=sum(weights_in(array, formats.get(name)) for name, (_, array) in tensors.items()),
            quantization=Counter(matrices).most_common(1)[0][0] if matrices else "none",
            tensor_types=Counter(types.values()),
            file_size=sum(p.stat().st_size for p in self.path.glob("*.safetensors")),
            tokenizer="tokenizer.json")


def weights_in(array: np.ndarray, format_name: str | None) -> int:
    """Weights in a tensor: its elements, or for a block format its rows times the weights per row."""
    if format_name is None:
        return int(np.prod(array.shape))
    f = FORMATS[format_name]
    rows, row_bytes = array.shape
    return rows * (row_bytes // f.block_bytes * f.block_size)


def capabilities(tokenizer: Tokenizer) -> tuple:
    """What Ollama's `show` lists: "completion", and "thinking" when the template reasons (a
    reasoning model's template mentions the closing tag: DeepSeek-R1's strips earlier turns'
    reasoning at it, and its later revision also opens the block at the end of the prompt)."""
    template = tokenizer.chat_template_source or ""
    return ("completion",) + (("thinking",) if CLOSING in template else ())


def open_source(path: Path, tokenizer_only: bool = False) -> GGUFSource | DirectorySource:
    """The reader for a resolved model path: a .gguf file or a directory."""
    path = Path(path)
    if path.is_file():
        return GGUFSource(path, tokenizer_only)
    if path.is_dir():
        return DirectorySource(path)
    raise EngineError(f"{path}: no such file or directory")
