"""Quantized models against the float model, saved quantized directories, KV cache kinds,
and clear errors for broken quantized directories."""
import json
import shutil

import numpy as np
import pytest
from conftest import VARIANTS

import engine
import tiny_models
from engine.cli import main as cli_main
from engine.errors import EngineError
from engine.weights import read_safetensors

TEXT = " ".join(tiny_models.CORPUS) * 4
# minimum top-1 agreement with the float model over 256 positions
MIN_AGREEMENT = {"q8_0": 0.99, "q4_0": 0.90}


@pytest.fixture(scope="module")
def float_logits(loaded):
    cache = {}

    def get(name):
        if name not in cache:
            llm = loaded(name)
            ids = llm.tokenize(TEXT)[:256]
            cache[name] = ids, llm.logits(ids).copy()
        return cache[name]
    return get


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
@pytest.mark.parametrize("name", VARIANTS)
def test_quantized_logits_agree_with_float(name, quant, model_dirs, float_logits):
    ids, ref = float_logits(name)
    assert len(ids) == 256
    out = engine.load(str(model_dirs(name)), quant=quant, kv_cache="f32").logits(ids)
    agreement = (out.argmax(-1) == ref.argmax(-1)).mean()
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    print(f"{name} {quant}: top-1 agreement {agreement:.1%}, max |error| {np.abs(out - ref).max():.2f} "
          f"({rel:.1%} of the logit range)")
    assert agreement >= MIN_AGREEMENT[quant]
    assert rel <= {"q8_0": 0.1, "q4_0": 0.3}[quant]


@pytest.mark.parametrize("kind, max_rel", [("f16", 0.002), ("q8_0", 0.03)])
def test_kv_cache_kinds_agree_with_f32(kind, max_rel, model_dirs, float_logits):
    ids, ref = float_logits("llama-f32")
    out = engine.load(str(model_dirs("llama-f32")), kv_cache=kind).logits(ids)
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    print(f"KV cache {kind}: max |error| {rel:.2%} of the logit range vs f32")
    assert rel <= max_rel
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.99


def test_kv_q8_0_against_f16_through_decoding(model_dirs):
    """Token-by-token decoding with an int8 cache stays within a stated bound of the f16 cache."""
    path = str(model_dirs("qwen2-f32"))
    f16, q8 = engine.load(path, kv_cache="f16"), engine.load(path, kv_cache="q8_0")
    ids = np.asarray(f16.tokenize(TEXT)[:64])
    a = np.stack([f16.model.forward(ids[i:i + 1], i).copy() for i in range(len(ids))])
    b = np.stack([q8.model.forward(ids[i:i + 1], i).copy() for i in range(len(ids))])
    assert np.abs(a - b).max() <= 0.03 * np.abs(a).max()


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_saved_directory_equals_quantizing_at_load(quant, model_dirs, tmp_path, capsys):
    out = tmp_path / f"tiny-{quant}"
    assert cli_main(["quantize", "--model", str(model_dirs("qwen2-bf16")), "--type", quant, "--output", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json",
                                                "tokenizer_config.json", "generation_config.json"}
    saved = engine.load(str(out), kv_cache="f32")
    at_load = engine.load(str(model_dirs("qwen2-bf16")), quant=quant, kv_cache="f32")
    ids = saved.tokenize(TEXT)[:100]
    assert np.array_equal(saved.logits(ids), at_load.logits(ids))
    assert saved.model.layers[0].q.format.name == quant
    assert saved.model.lm_head.format.name == "q8_0"     # kept at higher precision, as documented
    size = (out / "model.safetensors").stat().st_size
    float_size = (model_dirs("qwen2-bf16") / "model.safetensors").stat().st_size
    assert size < float_size * {"q8_0": 0.6, "q4_0": 0.45}[quant]


@pytest.fixture(scope="module")
def quantized_dir(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny-q4_0"
    cli_main(["quantize", "--model", str(model_dirs("llama-f32")), "--type", "q4_0", "--output", str(out)])
    return out


def edited_copy(src, dst, edit_tensors=None, edit_metadata=None):
    from safetensors.numpy import save_file
    shutil.copytree(src, dst)
    tensors, metadata = read_safetensors(dst / "model.safetensors")
    tensors = {name: np.array(array) for name, (_, array) in tensors.items()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    save_file(tensors, str(dst / "model.safetensors"), metadata=metadata)
    return dst


def test_unknown_format_version(quantized_dir, tmp_path):
    bad = edited_copy(quantized_dir, tmp_path / "m", edit_metadata=lambda m: m.update(format_version="99"))
    with pytest.raises(EngineError, match="quantized model format version '99' is not supported"):
        engine.load(str(bad))


def test_wrong_block_count(quantized_dir, tmp_path):
    def drop_a_block(t):
        name = "model.layers.1.mlp.up_proj.weight"
        t[name] = t[name][:, :-18].copy()
    bad = edited_copy(quantized_dir, tmp_path / "m", edit_tensors=drop_a_block)
    with pytest.raises(EngineError, match=r"'model.layers.1.mlp.up_proj.weight' does not match the config: "
                                          r"q4_0 storage for shape \(160, 64\) must be uint8 \(160, 36\)"):
        engine.load(str(bad))


def test_shape_that_does_not_match_config(quantized_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(quantized_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 192
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineError, match="mlp.gate_proj.weight' does not match the config"):
        engine.load(str(bad))


def test_unknown_tensor_format(quantized_dir, tmp_path):
    def rename(m):
        formats = json.loads(m["tensor_formats"])
        formats["lm_head.weight" if "lm_head.weight" in formats else "model.embed_tokens.weight"] = "q3_x"
        m["tensor_formats"] = json.dumps(formats)
    bad = edited_copy(quantized_dir, tmp_path / "m", edit_metadata=rename)
    with pytest.raises(EngineError, match="unknown format.*q3_x"):
        engine.load(str(bad))


def test_bad_quant_options(model_dirs, quantized_dir):
    with pytest.raises(EngineError, match="unknown quantization 'q2'; supported: q8_0, q4_0"):
        engine.load(str(model_dirs("qwen2-f32")), quant="q2")
    with pytest.raises(EngineError, match="unknown KV cache type 'int4'"):
        engine.load(str(model_dirs("qwen2-f32")), kv_cache="int4")
    with pytest.raises(EngineError, match=r"already quantized \(q4_0, q8_0\)"):
        engine.load(str(quantized_dir), quant="q8_0")
    same = engine.load(str(quantized_dir), quant="q4_0")   # asking for what it already is: a no-op
    assert same.model.layers[0].up.format.name == "q4_0"
