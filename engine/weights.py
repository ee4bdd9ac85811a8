"""Weights: tensors of a checkpoint as memory-mapped views, checked against the config.

Safetensors files are read with our own small header parser rather than `safetensors.numpy`,
because that loader copies every tensor into memory and cannot represent bf16. Here each file
is memory-mapped once and each tensor is a numpy view into it: bf16 and f16 stay as uint16
bit patterns and the kernels decode them on the fly, so no second full copy of the model exists.
"""
import math
import mmap
import re
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np

from .kernels import layout
from .kernels.formats import FORMATS, Weight

from .config import ModelConfig
from .errors import EngineError
from .files import parse_json, read_json
from .weight_cache import WeightCache

# safetensors dtype -> (numpy storage dtype, our format name for 2-D weights)
SAFETENSORS_DTYPES = {
    "F32": (np.float32, "f32"),
    "F16": (np.uint16, "f16"),
    "BF16": (np.uint16, "bf16"),
    "U8": (np.uint8, None),
    "I8": (np.int8, None),
    "I32": (np.int32, None),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
# what `python -m engine quantize` writes into the safetensors metadata
QUANTIZED_FORMAT = "engine-quantized"
QUANTIZED_FORMAT_VERSION = 1


def read_safetensors(path: Path) -> tuple[dict[str, tuple[str, np.ndarray]], dict]:
    """Map a .safetensors file; return ({name: (dtype name, array view)}, metadata) after checking
    every header value: as safetensors' own loader does, the tensors' byte ranges must tile the
    data exactly (in some order, from 0 to the end), so no two overlap and none is shifted."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise EngineError(f"{path.name}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise EngineError(f"{path.name}: header length {header_len} does not fit in a file of {size} bytes")
        header = parse_json(f.read(header_len), f"{path.name}: header")
    data_start = 8 + header_len
    data_size = size - data_start
    metadata = header.get("__metadata__") or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise EngineError(f"{path.name}: __metadata__ must map names to strings")
    entries = []
    for name, info in header.items():
        if name != "__metadata__":
            entries.append((name, *_header_entry(path.name, name, info)))
    at = 0
    for name, dtype_name, shape, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        nbytes = int(np.prod(shape, dtype=object)) * np.dtype(SAFETENSORS_DTYPES[dtype_name][0]).itemsize
        if begin != at or end - begin != nbytes:
            problem = "overlaps another tensor" if begin < at else "leaves a gap" if begin > at else \
                f"does not match its shape {shape} x {dtype_name} ({nbytes} bytes)"
            raise EngineError(f"{path.name}: tensor '{name}' at data offsets [{begin}, {end}] {problem}")
        at = end
    if at != data_size:
        raise EngineError(f"{path.name}: the tensors cover {at} bytes of data, but the file holds {data_size} "
                          f"after its header (a wrong header length, or a truncated or padded file)")
    mapped = np.memmap(path, dtype=np.uint8, mode="r") if data_size > 0 else None
    tensors = {}
    for name, dtype_name, shape, begin, end in entries:
        raw = mapped[data_start + begin:data_start + end] if end > begin else np.empty(0, np.uint8)
        tensors[name] = (dtype_name, raw.view(SAFETENSORS_DTYPES[dtype_name][0]).reshape(shape))
    return tensors, metadata


def _header_entry(file: str, name: str, info) -> tuple[str, list, int, int]:
    """(dtype name, shape, begin, end) of one header entry, each of the right type and range."""
    if not (isinstance(info, dict) and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2):
        raise EngineError(f"{file}: tensor '{name}' has a malformed header entry")
    dtype_name, shape, (begin, end) = info.get("dtype"), info.get("shape"), info["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
        raise EngineError(f"{file}: tensor '{name}' has unsupported dtype {dtype_name!r:.40}; "
                          f"supported: {', '.join(SAFETENSORS_DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise EngineError(f"{file}: tensor '{name}' has an invalid shape {shape!r:.60}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (begin, end)) or end < begin:
        raise EngineError(f"{file}: tensor '{name}' has invalid data offsets {info['data_offsets']!r:.60}")
    return dtype_name, shape, begin, end


def read_checkpoint(model_dir: Path) -> tuple[dict[str, tuple[str, np.ndarray]], dict]:
    """All tensors of a model directory (one file, or many listed by model.safetensors.index.json),
    and the files' metadata merged."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
            raise EngineError(f"{index.name} is not a valid safetensors index (needs a 'weight_map' object "
                              f"from tensor names to file names)")
        files = sorted(set(weight_map.values()))
        for name in files:
            if Path(name).name != name or not (model_dir / name).is_file():
                raise EngineError(f"{index.name} lists {name!r:.80}, which is not a file in {model_dir}")
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise EngineError(f"no *.safetensors files in {model_dir}")
    tensors, metadata = {}, {}
    for name in files:
        file_tensors, file_metadata = read_safetensors(model_dir / name)
        duplicate = next((t for t in file_tensors if t in tensors), None)
        if duplicate is not None:
            raise EngineError(f"tensor '{duplicate}' is in more than one file of {model_dir}")
        tensors.update(file_tensors)
        metadata.update(file_metadata)
    return tensors, metadata


def release_pages(array: np.ndarray) -> None:
    """Drop the resident pages of a memory-mapped tensor that has been copied (packed or
    quantized), so that they stop counting toward the process's memory. The file stays in the
    page cache; touching the view again would simply map it back. No-op for other arrays."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if not isinstance(base, mmap.mmap) or array.nbytes == 0:
        return
    start = array.ctypes.data - np.frombuffer(base, np.uint8, count=1).ctypes.data
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE            # whole pages inside the tensor only
    last = (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        base.madvise(mmap.MADV_DONTNEED, first, last - first)


def check_layer_count(config: ModelConfig, tensors: dict) -> None:
    """The config's layer count against the layers the checkpoint holds, before anything sized
    by it is built (a count of 10^9 would otherwise fill the memory with expected names)."""
    layers = {int(match[1]) for name in tensors if (match := re.match(r"model\.layers\.(\d+)\.", name))}
    present = max(layers) + 1 if layers else 0
    if config.num_layers != present:
        raise EngineError(f"the config says {config.num_layers} layers, but the checkpoint holds tensors of "
                          f"{present}: they do not belong together")


def expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Every tensor the forward pass reads, with the shape the config implies (HF names)."""
    d, hd = config.hidden_size, config.head_dim
    q_dim, kv_dim = config.num_heads * hd, config.num_kv_heads * hd
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q_dim, d),
            p + "self_attn.k_proj.weight": (kv_dim, d),
            p + "self_attn.v_proj.weight": (kv_dim, d),
            p + "self_attn.o_proj.weight": (d, q_dim),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (config.intermediate_size, d),
            p + "mlp.up_proj.weight": (config.intermediate_size, d),
            p + "mlp.down_proj.weight": (d, config.intermediate_size),
        })
        if config.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_dim,), p + "self_attn.k_proj.bias": (kv_dim,),
                           p + "self_attn.v_proj.bias": (kv_dim,)})
        if config.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
    return shapes


def _as_vector(name: str, dtype_name: str, array: np.ndarray) -> np.ndarray:
    """A 1-D tensor (norm weight, bias) as float32: small, so decoded once at load."""
    fmt = SAFETENSORS_DTYPES[dtype_name][1]
    if fmt is None:
        raise EngineError(f"a {dtype_name} vector cannot be used as float weights")
    vector = Weight(FORMATS[fmt], (1, array.shape[0]), array.reshape(1, -1)).dequantize()[0]
    if not np.isfinite(vector).all():
        raise EngineError(f"tensor '{name}' holds NaN or infinite values: the file is damaged")
    return vector


def stored_formats(metadata: dict) -> dict:
    """{tensor name: format} for a directory written by `python -m engine quantize`, else {}."""
    if metadata.get("format") != QUANTIZED_FORMAT:
        return {}
    version = metadata.get("format_version")
    if version != str(QUANTIZED_FORMAT_VERSION):
        raise EngineError(f"quantized model format version {version!r} is not supported "
                          f"(this engine reads version {QUANTIZED_FORMAT_VERSION}); quantize the model again")
    formats = parse_json(metadata.get("tensor_formats", ""), "the quantized model's 'tensor_formats' table")
    if not all(isinstance(f, str) for f in formats.values()):
        raise EngineError("the quantized model's 'tensor_formats' table must map tensor names to format names")
    unknown = {f for f in formats.values() if f not in FORMATS}
    if unknown:
        raise EngineError(f"quantized model uses unknown format(s) {', '.join(map(str, unknown))}; "
                          f"known: {', '.join(FORMATS)}")
    return formats


def read_by_rows(name: str, config: ModelConfig) -> bool:
    """An untied embedding: only rows of it are read (a tied one is also the LM head), so it
    stays in the file's row layout (Weight's rows_only)."""
    return name == "model.embed_tokens.weight" and not config.tie_word_embeddings


def load_weights(config: ModelConfig, tensors: dict, formats: dict | None = None,
                 cache: WeightCache | None = None) -> dict:
    """Check presence, format and shape of every tensor against the config before any kernel
    runs; return {name: Weight (matrices) or float32 vector}.

    tensors: {name: (dtype name, array)}; formats: {name: format} for tensors stored in a
    block format (their arrays are raw rows), the others are plain floats. cache: where the
    packed block matrices are read from, or written to when it does not have them all."""
    check_layer_count(config, tensors)
    shapes = expected_shapes(config)
    cached = cache.load() if cache else {}
    repacked = False
    formats = formats or {}
    missing = [name for name in shapes if name not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise EngineError(f"checkpoint lacks tensor(s) {', '.join(missing[:3])}{more}")
    weights = {}
    for name, shape in shapes.items():
        dtype_name, array = tensors[name]
        rows_only = read_by_rows(name, config)
        if name in formats:
            fmt = FORMATS[formats[name]]
            if name in cached:   # (only matrices that are repacked are cached)
                try:
                    weights[name] = Weight(fmt, shape, cached[name], rows_only)
                    continue
                except ValueError as e:   # the entry was made from these very files: damaged
                    cache.report(f"tensor {name}: {e}")
                    cached = {}
            try:
                weights[name] = Weight(fmt, shape, array, rows_only)
            except ValueError as e:
                raise EngineError(f"tensor '{name}' does not match the config: {e}") from None
            if weights[name].packed:   # repacked: the mapped file bytes are no longer read
                release_pages(array)
                repacked = True
                # checked as they are repacked (a rows-only embedding is not read whole: a non-finite
                # row is found by the forward pass's check when a prompt uses it)
                bad = weights[name].non_finite_scales()
                if bad:
                    raise EngineError(f"tensor '{name}' has {bad} {fmt.name} blocks whose scale is infinite or "
                                      f"NaN: the file is damaged, or the tensor's type is mislabelled")
            continue
        if tuple(array.shape) != shape:
            raise EngineError(f"tensor '{name}' has shape {tuple(array.shape)}, but the config implies {shape}")
        if len(shape) == 1:
            weights[name] = _as_vector(name, dtype_name, array)
            continue
        fmt = SAFETENSORS_DTYPES[dtype_name][1]
        if fmt is None:
            raise EngineError(f"tensor '{name}' has dtype {dtype_name}; float weights must be F32, F16 or BF16")
        weights[name] = Weight(FORMATS[fmt], shape, array, rows_only)
    if cache and repacked:
        cache.save({name: w.data for name, w in weights.items() if isinstance(w, Weight) and w.packed})
    return weights


def stand_in_weights(config: ModelConfig, tensors: dict, formats: dict | None = None) -> tuple[ModelConfig, dict]:
    """A model of the same architecture and the same weight format per tensor, with matrices a
    few hundred wide, all zeros: its forward pass calls the same kernels with the same argument
    types as the real one (kernels are compiled per type, never per size). It lists what to
    compile while the real weights are still being read (model.stand_in_calls, engine.load). 256 is a
    multiple of every block size, and so is the query width, a multiple of head_dim. Raises
    KeyError or ValueError where a tensor is missing or unreadable (load_weights then says which)."""
    check_layer_count(config, tensors)
    width = 256
    small = replace(config, hidden_size=width, intermediate_size=width, vocab_size=64, num_kv_heads=1,
                    num_heads=math.lcm(width, config.head_dim) // config.head_dim)
    formats = formats or {}
    weights = {}
    for name, shape in expected_shapes(small).items():
        if len(shape) == 1:
            weights[name] = np.zeros(shape, np.float32)
            continue
        fmt = FORMATS[formats[name] if name in formats else SAFETENSORS_DTYPES[tensors[name][0]][1]]
        rows_only = read_by_rows(name, config)
        rows, cols = shape
        packed = fmt.packed and not rows_only
        if packed:   # a copy, made at load or mapped from the weight cache: writable
            storage = np.zeros(layout.packed_shape(rows, cols // fmt.block_size, fmt.block_bytes), fmt.storage_dtype)
        else:        # the file's own rows: read-only where the file is mapped so (numba types differ)
            storage = np.zeros((rows, fmt.row_items(cols)), fmt.storage_dtype)
            storage.flags.writeable = tensors[name][1].flags.writeable
        weights[name] = Weight(fmt, shape, storage, rows_only)
    return small, weights
