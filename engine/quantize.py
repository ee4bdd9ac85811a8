"""Quantization of a float checkpoint to Q8_0 or Q4_0: at load time, or once, to a directory.

What stays in higher precision, and why (measured on the tiny test models, see README):
- norm weights and biases stay float32: a few kilobytes, and every activation passes through them;
- with q4_0, the LM head (and the token embedding, which is the same matrix when tied) is q8_0:
  it decides the next token directly, and int4 there costs the most agreement with the float model.

A quantized directory is an ordinary model directory (config.json, tokenizer files,
generation_config.json) whose model.safetensors holds uint8 GGML blocks; the safetensors
metadata names the format of each tensor and a format version, checked at load.
"""
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from .kernels.formats import FORMATS, Weight

from .errors import EngineError
from .files import SIDE_FILES
from .resolve import resolve
from .source import DirectorySource, open_source
from .weights import QUANTIZED_FORMAT, QUANTIZED_FORMAT_VERSION, load_weights, release_pages

QUANT_TYPES = ("q8_0", "q4_0")
# tensors kept at a higher precision than the requested type
OVERRIDES = {
    "q4_0": {"lm_head.weight": "q8_0", "model.embed_tokens.weight": "q8_0"},
    "q8_0": {},
}
ROWS_PER_CHUNK = 4096   # quantize big matrices in slices, never holding a whole float32 copy


def check_quant(quant: str) -> None:
    if quant not in QUANT_TYPES:
        raise EngineError(f"unknown quantization {quant!r}; supported: {', '.join(QUANT_TYPES)}")


def target_format(name: str, quant: str) -> str:
    return OVERRIDES[quant].get(name, quant)


def quantize_weight(weight: Weight, fmt: str, rows_only: bool) -> Weight:
    target = FORMATS[fmt]
    rows, cols = weight.shape
    data = np.empty((rows, target.row_items(cols)), target.storage_dtype)
    for start in range(0, rows, ROWS_PER_CHUNK):
        stop = min(rows, start + ROWS_PER_CHUNK)
        data[start:stop] = target.quantize(weight.dequantize(start, stop))
    return Weight(target, weight.shape, data, rows_only)


def quantize_weights(weights: dict, quant: str, progress: bool = True, to_file: bool = False) -> dict:
    """A copy of `weights` with every float matrix quantized (vectors stay float32).
    to_file: only to be written to a file, so kept in the file layout (Weight.rows_only)."""
    check_quant(quant)
    already = {w.format.name for w in weights.values() if isinstance(w, Weight) and w.format.block_size > 1}
    if already - {quant, *OVERRIDES[quant].values()}:
        raise EngineError(f"the model is already quantized ({', '.join(sorted(already))}); "
                          f"load it without a quantization option")
    todo = [name for name, w in weights.items() if isinstance(w, Weight) and w.format.block_size == 1]
    out = dict(weights)
    total = sum(weights[name].shape[0] * weights[name].shape[1] for name in todo)
    with tqdm(total=total, desc=f"quantizing to {quant}", unit="w", unit_scale=True, leave=False,
              disable=not progress or None) as bar:
        for name in todo:
            out[name] = quantize_weight(weights[name], target_format(name, quant),
                                        to_file or weights[name].rows_only)
            release_pages(weights[name].data)   # the float copy is no longer needed in memory
            bar.update(weights[name].shape[0] * weights[name].shape[1])
    return out


def save_quantized(model: str, output: str, quant: str) -> Path:
    """Quantize the checkpoint `model` (a directory, repo id or alias) and write it to `output`."""
    check_quant(quant)
    source = open_source(resolve(model).path)
    if not isinstance(source, DirectorySource):
        raise EngineError("quantize reads Hugging Face checkpoints (a directory); a GGUF file is already quantized")
    out = Path(output)
    if out.resolve() == source.path.resolve():
        raise EngineError("the output directory must differ from the model's own directory")
    config = source.config
    weights = quantize_weights(load_weights(config, *source.tensors(), source.weight_cache()), quant, to_file=True)
    tensors = {name: (w.file_rows() if isinstance(w, Weight) else w) for name, w in weights.items()}
    formats = {name: w.format.name for name, w in weights.items() if isinstance(w, Weight)}
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors*"):
        stale.unlink()
    save_file(tensors, str(out / "model.safetensors"), metadata={
        "format": QUANTIZED_FORMAT, "format_version": str(QUANTIZED_FORMAT_VERSION), "quant": quant,
        "tensor_formats": json.dumps(formats), "source": str(model)})
    for name in SIDE_FILES:
        if (source.path / name).is_file():
            shutil.copyfile(source.path / name, out / name)
    return out
