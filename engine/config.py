"""ModelConfig: everything the forward pass needs to know about a model, read from its own files.

Hugging Face `config.json` comes in two layouts: the legacy one (`rope_theta`, `rope_scaling`),
used by the DeepSeek-R1-Distill repos, and transformers 5's (`rope_parameters`). Both give the
same ModelConfig. Sampling defaults come from `generation_config.json`.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EngineError
from .files import read_json

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


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """Typed, range-checked reads of a config dict; errors name the source (`where`)."""

    def __init__(self, raw: dict, where: str):
        self.raw, self.where = raw, where

    def fail(self, message: str) -> EngineError:
        return EngineError(f"{self.where}: {message}")

    def integer(self, key: str, default: int | None = None, *, minimum: int = 1) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"'{key}' must be an integer, got {_short(value)}")
        if value < minimum:
            raise self.fail(f"'{key}' must be at least {minimum}, got {value}")
        return value

    def positive(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        try:
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        except OverflowError:   # an integer too large for a float
            number = math.inf
        if not math.isfinite(number) or number <= 0:
            raise self.fail(f"'{key}' must be a positive number, got {_short(value)}")
        return number

    def flag(self, key: str) -> bool:
        """true, false or absent (null). A string such as "no" is not read as true."""
        value = self.raw.get(key)
        if value is not None and not isinstance(value, bool):
            raise self.fail(f"'{key}' must be true or false, got {_short(value)}")
        return bool(value)

    def token_ids(self, value, key: str) -> tuple:
        if value is None:
            return ()
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise self.fail(f"'{key}' must be a token id or a list of token ids, got {_short(value)}")
        return tuple(values)


def _rope(fields: Fields) -> tuple[float, RopeScaling | None]:
    """Rope theta and scaling from either layout: `rope_parameters` (transformers 5) or legacy keys."""
    raw = fields.raw
    params = raw.get("rope_parameters")
    if params is None:
        params = raw.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise fields.fail(f"'rope_scaling' must be an object, got {_short(params)}")
        params = {"rope_theta": raw.get("rope_theta", 10000.0), **params}
    if not isinstance(params, dict):
        raise fields.fail(f"'rope_parameters' must be an object, got {_short(params)}")
    rope = Fields(params, fields.where)
    theta = rope.positive("rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise fields.fail(f"rope scaling {_short(rope_type)} is not supported; "
                          f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
               if k not in params]
    if missing:
        raise fields.fail(f"llama3 rope scaling lacks {', '.join(missing)}")
    scaling = RopeScaling(
        factor=rope.positive("factor", 1.0),
        low_freq_factor=rope.positive("low_freq_factor", 1.0),
        high_freq_factor=rope.positive("high_freq_factor", 1.0),
        original_max_position_embeddings=rope.integer("original_max_position_embeddings"),
    )
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise fields.fail("llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return theta, scaling


def config_from_dict(raw: dict, generation: dict | None = None, where: str = "config.json") -> ModelConfig:
    """Build and validate a ModelConfig from the dict of a Hugging Face config.json (`where`
    names its source in errors: a GGUF file's metadata arrives here in the same shape)."""
    if not isinstance(raw, dict):
        raise EngineError(f"{where} must hold a JSON object")
    fields = Fields(raw, where)
    arch = raw.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise fields.fail(f"model_type {_short(arch)} is not supported; "
                          f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise fields.fail(f"hidden_act {_short(act)} is not supported; supported: silu")
    if fields.flag("use_sliding_window"):
        raise fields.fail("use_sliding_window=true is not supported")
    if fields.flag("mlp_bias"):
        raise fields.fail("mlp_bias=true is not supported")

    hidden = fields.integer("hidden_size")
    heads = fields.integer("num_attention_heads")
    kv_heads = fields.integer("num_key_value_heads", heads)
    if raw.get("head_dim") is None:
        if hidden % heads:
            raise fields.fail(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
    else:
        head_dim = fields.integer("head_dim")
    if head_dim % 2:
        raise fields.fail(f"head_dim must be even for rotary embeddings, got {head_dim}")
    if heads % kv_heads:
        raise fields.fail(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")

    theta, scaling = _rope(fields)
    attention_bias = fields.flag("attention_bias")
    generation = generation or {}
    eos = fields.token_ids(generation.get("eos_token_id", raw.get("eos_token_id")), "eos_token_id")
    bos = fields.token_ids(generation.get("bos_token_id", raw.get("bos_token_id")), "bos_token_id")
    return ModelConfig(
        architecture=arch,
        hidden_size=hidden,
        num_layers=fields.integer("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=fields.integer("intermediate_size"),
        vocab_size=fields.integer("vocab_size"),
        rms_norm_eps=fields.positive("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=arch == "qwen2" or attention_bias,
        o_bias=arch == "llama" and attention_bias,
        tie_word_embeddings=fields.flag("tie_word_embeddings"),
        max_position_embeddings=fields.integer("max_position_embeddings", 4096),
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


def load_config(model_dir: Path) -> ModelConfig:
    """Read config.json (and generation_config.json if present) from a model directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise EngineError(f"no config.json in {model_dir}")
    generation_path = Path(model_dir) / "generation_config.json"
    generation = read_json(generation_path) if generation_path.is_file() else {}
    return config_from_dict(read_json(path), generation)
