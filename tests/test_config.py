"""config.json in both layouts, generation defaults, and clear errors for what is not supported."""
import json
import re

import pytest

from engine.config import RopeScaling, config_from_dict, load_config
from engine.errors import EngineError

# DeepSeek-R1-Distill-Llama-8B's config.json (legacy layout), abridged to the keys we read
LLAMA_8B_LEGACY = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072, "rope_theta": 500000.0, "attention_bias": False, "hidden_act": "silu",
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
}
# DeepSeek-R1-Distill-Qwen-1.5B's config.json (legacy layout), abridged
QWEN_1_5B_LEGACY = {
    "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131072, "rope_theta": 10000, "rope_scaling": None, "hidden_act": "silu",
    "tie_word_embeddings": False, "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151643,
}


def to_v5(raw):
    """The same config in transformers 5's layout."""
    raw = dict(raw)
    params = dict(raw.pop("rope_scaling") or {"rope_type": "default"})
    params["rope_theta"] = raw.pop("rope_theta")
    raw["rope_parameters"] = params
    return raw


def test_llama_legacy_and_v5_layouts_agree():
    legacy, v5 = config_from_dict(LLAMA_8B_LEGACY), config_from_dict(to_v5(LLAMA_8B_LEGACY))
    assert legacy == v5
    assert legacy.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert legacy.rope_theta == 500000.0
    assert (legacy.head_dim, legacy.num_kv_heads, legacy.qkv_bias, legacy.o_bias) == (128, 8, False, False)


def test_qwen_legacy_and_v5_layouts_agree():
    legacy, v5 = config_from_dict(QWEN_1_5B_LEGACY), config_from_dict(to_v5(QWEN_1_5B_LEGACY))
    assert legacy == v5
    assert legacy.rope_scaling is None and legacy.qkv_bias and not legacy.o_bias
    assert (legacy.head_dim, legacy.eos_token_ids, legacy.bos_token_id) == (128, (151643,), 151643)


def test_generation_config_gives_sampling_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN_1_5B_LEGACY))
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "eos_token_id": [151643, 151645]}))
    config = load_config(tmp_path)
    assert config.generation_defaults == {"temperature": 0.6, "top_p": 0.95}
    assert config.eos_token_ids == (151643, 151645)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported; supported: qwen2, llama"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported; supported: default, llama3"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 rope scaling lacks low_freq_factor"),
    ({"num_key_value_heads": 5}, "num_attention_heads 12 is not a multiple of num_key_value_heads 5"),
    ({"hidden_size": "big"}, "'hidden_size' must be an integer"),
    ({"num_hidden_layers": 0}, "'num_hidden_layers' must be at least 1"),
    ({"rms_norm_eps": -1}, "'rms_norm_eps' must be a positive number"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
    ({"eos_token_id": "x"}, "'eos_token_id' must be a token id"),
    # wrong types that used to be read as something else, or end in a traceback
    ({"rope_scaling": [1]}, "'rope_scaling' must be an object, got [1]"),
    ({"rope_parameters": "x"}, "'rope_parameters' must be an object"),
    ({"tie_word_embeddings": "no"}, "'tie_word_embeddings' must be true or false, got 'no'"),
    ({"attention_bias": 1}, "'attention_bias' must be true or false"),
    ({"rms_norm_eps": 10**400}, "'rms_norm_eps' must be a positive number, got 1000000"),
    ({"rope_theta": float("inf")}, "'rope_theta' must be a positive number"),
    ({"num_hidden_layers": True}, "'num_hidden_layers' must be an integer"),
])
def test_bad_configs_are_clear_errors(change, message):
    with pytest.raises(EngineError, match=re.escape(message)):
        config_from_dict({**QWEN_1_5B_LEGACY, **change})


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(EngineError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EngineError, match="config.json is not valid JSON"):
        load_config(tmp_path)
