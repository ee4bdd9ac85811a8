"""ModelConfig: everything the forward pass needs to know about a model, read from its own files.

Hugging Face `config.json` comes in two layouts: the legacy one (`rope_theta`, `rope_scaling`),
used by the DeepSeek-R1-Distill repos, and transformers 5's (`rope_parameters`). Both give the
same ModelConfig. Sampling defaults come from `generation_config.json`.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EngineError

SUPPORTED_ARCHITECTURES = ("qwen2", "llama")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent rope scaling (the only scaling the distills use)."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    qkv_bias: bool             # Qwen2: always; Llama: `attention_bias`
    o_bias: bool               # Llama with `attention_bias` also has a bias on o_proj
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    generation_defaults: dict = field(default_factory=dict)   # sampler settings the model asks for
    generation_source: str = "generation_config.json"          # where they come from, for --verbose
    # GGUF files: llama's q/k rows are permuted for rotary pairs (2i, 2i+1) instead of HF's
    # rotate-half, and Llama 3 scaling arrives as one divisor per frequency
    rope_interleaved: bool = False
    rope_freq_factors: tuple | None = None


def _int_field(raw: dict, key: str, *, minimum: int = 1) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise EngineError(f"config.json: '{key}' must be an integer, got {value!r}")
    if value < minimum:
        raise EngineError(f"config.json: '{key}' must be at least {minimum}, got {value}")
    return value


def _float_field(raw: dict, key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise EngineError(f"config.json: '{key}' must be a positive number, got {value!r}")
    return float(value)


def _token_ids(value, key: str) -> tuple:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise EngineError(f"'{key}' must be a token id or a list of token ids, got {value!r}")
    return tuple(values)


def _rope(raw: dict) -> tuple[float, RopeScaling | None]:
    """Rope theta and scaling from either layout: `rope_parameters` (transformers 5) or legacy keys."""
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(params, dict):
        raise EngineError(f"config.json: rope parameters must be an object, got {params!r}")
    theta = _float_field(params, "rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise EngineError(
            f"config.json: rope scaling '{rope_type}' is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
               if k not in params]
    if missing:
        raise EngineError(f"config.json: llama3 rope scaling lacks {', '.join(missing)}")
    scaling = RopeScaling(
        factor=_float_field(params, "factor", 1.0),
        low_freq_factor=_float_field(params, "low_freq_factor", 1.0),
        high_freq_factor=_float_field(params, "high_freq_factor", 1.0),
        original_max_position_embeddings=_int_field(params, "original_max_position_embeddings"),
    )
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise EngineError("config.json: llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return theta, scaling


def config_from_dict(raw: dict, generation: dict | None = None) -> ModelConfig:
    """Build and validate a ModelConfig from the dict of a Hugging Face config.json."""
    if not isinstance(raw, dict):
        raise EngineError("config.json must hold a JSON object")
    arch = raw.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise EngineError(
            f"config.json: model_type {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise EngineError(f"config.json: hidden_act {act!r} is not supported; supported: silu")
    if raw.get("use_sliding_window"):
        raise EngineError("config.json: use_sliding_window=true is not supported")
    if raw.get("mlp_bias"):
        raise EngineError("config.json: mlp_bias=true is not supported")

    hidden = _int_field(raw, "hidden_size")
    heads = _int_field(raw, "num_attention_heads")
    kv_heads = _int_field(raw, "num_key_value_heads") if "num_key_value_heads" in raw else heads
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise EngineError(f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
    else:
        head_dim = _int_field(raw, "head_dim")
    if head_dim % 2:
        raise EngineError(f"config.json: head_dim must be even for rotary embeddings, got {head_dim}")
    if heads % kv_heads:
        raise EngineError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")

    theta, scaling = _rope(raw)
    attention_bias = bool(raw.get("attention_bias", False))
    generation = generation or {}
    eos = _token_ids(generation.get("eos_token_id", raw.get("eos_token_id")), "eos_token_id")
    bos = _token_ids(generation.get("bos_token_id", raw.get("bos_token_id")), "bos_token_id")
    return ModelConfig(
        architecture=arch,
        hidden_size=hidden,
        num_layers=_int_field(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=_int_field(raw, "intermediate_size"),
        vocab_size=_int_field(raw, "vocab_size"),
        rms_norm_eps=_float_field(raw, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=arch == "qwen2" or attention_bias,
        o_bias=arch == "llama" and attention_bias,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=_int_field(raw, "max_position_embeddings") if "max_position_embeddings" in raw else 4096,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=eos,
        generation_defaults=sampling_defaults(generation),
    )


def sampling_defaults(generation: dict) -> dict:
    """The sampler settings a generation_config.json asks for (greedy if do_sample is false)."""
    keys = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
            "repetition_penalty": "repeat_penalty"}
    defaults = {ours: generation[theirs] for theirs, ours in keys.items() if generation.get(theirs) is not None}
    if generation.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise EngineError(f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise EngineError(f"{path.name} must hold a JSON object")
    return data


def load_config(model_dir: Path) -> ModelConfig:
    """Read config.json (and generation_config.json if present) from a model directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise EngineError(f"no config.json in {model_dir}")
    generation_path = Path(model_dir) / "generation_config.json"
    generation = _read_json(generation_path) if generation_path.is_file() else {}
    return config_from_dict(_read_json(path), generation)
