"""A small, defensive GGUF reader (versions 2 and 3), memory-mapped.

Why not the `gguf` package's GGUFReader: it builds one numpy view per array element (about
300,000 for a DeepSeek vocabulary, seconds per load) and trusts every count and offset in the
file, so a hostile count loops for hours and a bad offset surfaces as an obscure numpy error.
This reader bounds every read by the file size before it happens, reads numeric arrays as one
view, and reports any inconsistency as an EngineError that says what is wrong.

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x (key: string, type: u32, value)
    tensor_count x (name: string, n_dims: u32, dims: u64[n_dims], ggml_type: u32, offset: u64)
    padding to `general.alignment` (default 32), then the tensor data
"""
import mmap
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .kernels.formats import FORMATS
from .kernels.scan import length_prefixed_starts

from .config import ModelConfig, config_from_dict
from .errors import EngineError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4
MAX_ELEMENTS = 2**48

# metadata value types: id -> (name, numpy dtype or None)
VALUE_TYPES = {
    0: ("u8", np.uint8), 1: ("i8", np.int8), 2: ("u16", np.uint16), 3: ("i16", np.int16),
    4: ("u32", np.uint32), 5: ("i32", np.int32), 6: ("f32", np.float32), 7: ("bool", np.bool_),
    8: ("string", None), 9: ("array", None), 10: ("u64", np.uint64), 11: ("i64", np.int64), 12: ("f64", np.float64),
}
STRING, ARRAY = 8, 9

# general.file_type (llama.cpp's llama_ftype): what a file is called, e.g. Q4_K_M, a mix of
# tensor types (Q4_K, Q6_K, and fallbacks for rows whose length is not a multiple of 256)
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}


def file_type_name(value) -> str | None:
    """The name of a general.file_type value, or None (absent, unknown, or not an integer)."""
    return FILE_TYPES.get(int(value)) if isinstance(value, (int, np.integer)) else None

# ggml tensor types, as in the GGUF specification: id -> (name, elements per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str         # ggml type, e.g. "Q4_K"
    shape: tuple           # numpy order: (rows, cols) for a matrix; GGUF stores dims innermost first
    offset: int            # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """Metadata and tensor table of a GGUF file; tensor data as views into the mapped file."""

    def __init__(self, path, require_data: bool = True):
        """require_data=False reads the header of a file whose tensor data is cut off."""
        self.path = Path(path)
        self.require_data = require_data
        self.size = self.path.stat().st_size
        if self.size < 24:
            raise self._error(f"not a GGUF file (only {self.size} bytes)")
        with open(self.path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.data = np.frombuffer(self.mm, dtype=np.uint8)
        self.pos = 0
        if self._bytes(4) != GGUF_MAGIC:
            raise self._error("not a GGUF file (bad magic)")
        self.version = self._scalar("<I")
        if self.version not in SUPPORTED_VERSIONS:
            raise self._error(f"GGUF version {self.version} is not supported; supported: 2, 3")
        tensor_count, kv_count = self._scalar("<Q"), self._scalar("<Q")
        # each entry takes at least 13 (kv) or 24 (tensor) bytes: counts beyond that are lies
        if kv_count > self.remaining // 13 or tensor_count > self.remaining // 24:
            raise self._error(f"absurd counts ({kv_count} metadata entries, {tensor_count} tensors) "
                              f"for a file of {self.size} bytes")
        self.metadata = {}
        for _ in range(kv_count):
            key = self._string()
            if key in self.metadata:
                raise self._error(f"duplicate metadata key {key!r}")
            self.metadata[key] = self._value(self._scalar("<I"), key)
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 2**20:
            raise self._error(f"general.alignment must be a power of two, got {alignment!r}")
        data_start = -(-self.pos // alignment) * alignment
        self.tensors = {}
        for name, type_id, shape, offset in infos:
            self._add_tensor(name, type_id, shape, offset, data_start, alignment)
        self._check_layout(data_start, alignment)

    # --- bounded primitive reads ------------------------------------------------------------
    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def _error(self, message: str) -> EngineError:
        return EngineError(f"{self.path.name}: {message}")

    def _bytes(self, n: int) -> bytes:
        if n < 0 or n > self.remaining:
            raise self._error(f"truncated: needs {n} bytes at offset {self.pos}, the file has {self.remaining} left")
        out = self.mm[self.pos:self.pos + n]
        self.pos += n
        return out

    def _scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        if n > self.remaining:
            raise self._error(f"truncated: needs {n} bytes at offset {self.pos}, the file has {self.remaining} left")
        value = struct.unpack_from(fmt, self.mm, self.pos)[0]
        self.pos += n
        return value

    def _string(self) -> str:
        return self._bytes(self._scalar("<Q")).decode("utf-8", errors="replace")

    def _string_array(self, count: int, key: str) -> list:
        """`count` strings in a row (a vocabulary and its merges: 300,000 strings). Python code per
        string is what costs here, so there is none: a compiled loop (kernels/scan.py) finds where
        each string starts, bounded by the file size; numpy then drops the 8-byte lengths,
        leaving a NUL between strings, and the whole run is decoded and split at once (0.35 ->
        0.1 s for a DeepSeek vocabulary and its merges). A string holding a NUL is decoded alone."""
        if count > self.remaining // 8:
            raise self._error(f"metadata array {key!r} claims {count} strings, more than the file holds")
        starts = np.empty(count, np.int64)
        found, pos = length_prefixed_starts(self.data, self.pos, starts)
        self.pos = pos
        if found < count:
            raise self._error(f"truncated: string {found} of metadata array {key!r} at offset {pos} runs past "
                              f"the end of the file")
        if count == 0:
            return []
        first = starts[0]
        run = self.data[first:pos].copy()
        later = starts[1:] - first
        run[later - 1] = 0                                   # the last byte of each length: a NUL
        keep = np.ones(len(run), dtype=bool)
        keep[(later[:, None] - np.arange(8, 1, -1)).ravel()] = False   # and its other 7 bytes go
        strings = run[keep].tobytes().decode("utf-8", errors="replace").split("\0")
        if len(strings) == count:
            return strings
        ends = starts[1:].tolist() + [pos + 8]   # some string holds a NUL: one at a time
        return [self.mm[start:end - 8].decode("utf-8", errors="replace") for start, end in zip(starts.tolist(), ends)]

    def _value(self, type_id: int, key: str):
        if type_id not in VALUE_TYPES:
            raise self._error(f"metadata {key!r} has unknown value type {type_id}")
        if type_id == STRING:
            return self._string()
        if type_id == ARRAY:
            item_type, count = self._scalar("<I"), self._scalar("<Q")
            if item_type not in VALUE_TYPES or item_type == ARRAY:
                raise self._error(f"metadata array {key!r} has unsupported item type {item_type}")
            if item_type == STRING:
                return self._string_array(count, key)
            dtype = np.dtype(VALUE_TYPES[item_type][1]).newbyteorder("<")
            if count > self.remaining // dtype.itemsize:
                raise self._error(f"metadata array {key!r} claims {count} items, more than the file holds")
            return np.frombuffer(self._bytes(count * dtype.itemsize), dtype=dtype).copy()
        dtype = np.dtype(VALUE_TYPES[type_id][1]).newbyteorder("<")
        value = np.frombuffer(self._bytes(dtype.itemsize), dtype=dtype)[0]
        return bool(value) if type_id == 7 else value.item()

    def _tensor_info(self):
        name = self._string()
        n_dims = self._scalar("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._error(f"tensor {name!r} has {n_dims} dimensions; at most {MAX_DIMS} are allowed")
        dims = [self._scalar("<Q") for _ in range(n_dims)]
        type_id, offset = self._scalar("<I"), self._scalar("<Q")
        if any(d == 0 or d > MAX_ELEMENTS for d in dims) or int(np.prod(dims, dtype=object)) > MAX_ELEMENTS:
            raise self._error(f"tensor {name!r} has absurd dimensions {dims}")
        return name, type_id, tuple(reversed(dims)), offset

    def _add_tensor(self, name, type_id, shape, offset, data_start, alignment):
        if name in self.tensors:
            raise self._error(f"duplicate tensor {name!r}")
        if type_id not in GGML_TYPES:
            raise self._error(f"tensor {name!r} has unknown ggml type {type_id}")
        type_name, block, block_bytes = GGML_TYPES[type_id]
        if shape[-1] % block:
            raise self._error(f"tensor {name!r}: row length {shape[-1]} is not a multiple of the "
                              f"{type_name} block size {block}")
        nbytes = int(np.prod(shape, dtype=object)) // block * block_bytes
        start = data_start + offset
        if offset % alignment or (self.require_data and start + nbytes > self.size):
            raise self._error(f"tensor {name!r} at offset {offset} ({nbytes} bytes) lies outside the file "
                              f"or is misaligned")
        self.tensors[name] = TensorInfo(name, type_name, shape, start, nbytes)

    def _check_layout(self, data_start: int, alignment: int):
        """Writers (llama.cpp, gguf-py, Ollama) place the tensors one after the other, each
        padded to the alignment. So besides overlaps, a gap of a whole alignment or more means a
        tensor's type or shape is mislabelled: a Q4_1 tensor labelled Q4_0 still fits the file,
        and would be read as garbage."""
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        previous_end, previous = data_start, "the start of the tensor data"
        for start, end, name in spans:
            if start < previous_end:
                raise self._error(f"tensors {previous!r} and {name!r} overlap")
            if start - previous_end >= alignment:
                raise self._error(f"{start - previous_end} bytes lie unused between {previous} and tensor {name!r} "
                                  f"(more than padding): a tensor's type or shape is mislabelled")
            previous_end, previous = end, f"tensor {name!r}"
        if spans and self.require_data and self.size - previous_end >= alignment:
            raise self._error(f"{self.size - previous_end} bytes lie unused after the last tensor, {previous} "
                              f"(more than padding): a tensor's type or shape is mislabelled")

    # --- access -----------------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 view, shape (rows, bytes per row) (1-D tensors: (1, bytes))."""
        t = self.tensors[name]
        if t.offset + t.nbytes > self.size:
            raise self._error(f"tensor {name!r} lies beyond the end of the file")
        rows = int(np.prod(t.shape[:-1], dtype=object)) if len(t.shape) > 1 else 1
        return self.data[t.offset:t.offset + t.nbytes].reshape(rows, t.nbytes // rows)


# --- GGUF as a model: config and weights under Hugging Face names -------------------------------

def hf_tensor_name(name: str) -> str | None:
    """GGUF tensor name -> the Hugging Face name the forward pass uses (None: not ours)."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}.get(parts[2])
    return f"model.layers.{parts[1]}.{layer}.{parts[3]}" if layer else None


def hf_config(g: GGUFFile) -> dict:
    """The metadata of a llama or qwen2 GGUF as a Hugging Face config.json dict."""
    arch = g.metadata.get("general.architecture")

    def get(key, default=None):
        return g.metadata.get(f"{arch}.{key}", default)

    embedding = g.tensors.get("token_embd.weight")
    if embedding is None:
        raise g._error("has no token_embd.weight tensor")
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise EngineError(f"{g.path.name}: rope scaling {scaling!r} is not supported; supported: none, "
                          f"llama3 (as a rope_freqs tensor)")
    config = {
        "model_type": arch, "hidden_size": hidden, "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": get("attention.head_count_kv", heads),
        "intermediate_size": get("feed_forward_length"), "vocab_size": embedding.shape[0],
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6), "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "attention_bias": "blk.0.attn_q.bias" in g.tensors,
        "bos_token_id": g.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": g.metadata.get("tokenizer.ggml.eos_token_id"),
    }
    key_length = get("attention.key_length")
    if key_length is not None:
        config["head_dim"] = key_length
    return config


def gguf_config(g: GGUFFile) -> ModelConfig:
    """The checked ModelConfig of a GGUF file, with what GGUF stores differently from Hugging
    Face applied: llama's q/k rows permuted for interleaved rotary pairs, Llama 3 rope scaling as
    per-frequency divisors, and the sampling defaults the file (or its model card) asks for."""
    config = config_from_dict(hf_config(g), where=f"{g.path.name} (GGUF metadata)")
    factors = rope_freq_factors(g)
    sampling, sampling_source = generation_defaults(g)
    return replace(config, rope_interleaved=config.architecture == "llama",
                   rope_freq_factors=None if factors is None else tuple(factors.tolist()),
                   generation_defaults=sampling, generation_source=sampling_source)


# llama.cpp's sampling keys (general.sampling.*) -> our sampler settings
SAMPLING_KEYS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "penalty_repeat": "repeat_penalty", "penalty_last_n": "repeat_last_n"}
# The DeepSeek-R1 distills' model card: "temperature within 0.5-0.7 (0.6 is recommended)" and
# top-p 0.95, which their Hugging Face repos' generation_config.json holds and their GGUF files lack.
DEEPSEEK_R1_SAMPLING = {"temperature": 0.6, "top_p": 0.95}


def generation_defaults(g: GGUFFile) -> tuple[dict, str]:
    """The sampler settings a GGUF file asks for, and where they come from: its general.sampling.*
    keys, or for a DeepSeek-R1 distill (recognised by its name) the model card's."""
    found = {ours: g.metadata[f"general.sampling.{key}"] for key, ours in SAMPLING_KEYS.items()
             if f"general.sampling.{key}" in g.metadata}
    if found:
        return found, "GGUF metadata (general.sampling)"
    names = f"{g.metadata.get('general.basename', '')} {g.metadata.get('general.name', '')}".lower()
    if "deepseek-r1-distill" in names.replace(" ", "-"):
        return dict(DEEPSEEK_R1_SAMPLING), "DeepSeek-R1 model card (recognised from the GGUF's name)"
    return {}, "GGUF metadata"


# the ggml types this engine computes with: GGUF's type name -> our format (the format table's ids)
GGUF_FORMATS = {GGML_TYPES[f.ggml_type][0]: f for f in FORMATS.values() if f.ggml_type is not None}


def gguf_tensors(g: GGUFFile) -> tuple[dict, dict]:
    """({hf name: (safetensors-style dtype, array view)}, {hf name: our format}) for load_weights."""
    tensors, formats = {}, {}
    for name, info in g.tensors.items():
        hf = hf_tensor_name(name)
        if hf is None:
            continue
        if info.type_name not in GGUF_FORMATS:
            raise EngineError(f"{g.path.name}: tensor {name!r} has type {info.type_name}, which this engine "
                              f"cannot read; supported: {', '.join(GGUF_FORMATS)}")
        fmt, raw = GGUF_FORMATS[info.type_name], g.raw(name)
        if len(info.shape) == 1:
            if fmt.packed:
                raise EngineError(f"{g.path.name}: vector {name!r} must be F32, F16 or BF16, not {info.type_name}")
            tensors[hf] = (info.type_name, raw.reshape(-1).view(fmt.storage_dtype))
            continue
        tensors[hf] = (info.type_name, raw.view(fmt.storage_dtype))
        formats[hf] = fmt.name
    return tensors, formats


def rope_freq_factors(g: GGUFFile) -> np.ndarray | None:
    """Llama 3 rope scaling as GGUF stores it: one divisor per rotary frequency."""
    if "rope_freqs.weight" not in g.tensors:
        return None
    info = g.tensors["rope_freqs.weight"]
    if info.type_name != "F32" or len(info.shape) != 1:
        raise EngineError(f"{g.path.name}: rope_freqs.weight must be a F32 vector")
    return g.raw("rope_freqs.weight").reshape(-1).view(np.float32).copy()
