"""Safetensors reading: memory-mapped views, sharded checkpoints, and clear errors for bad files."""
import json
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

import engine
from engine.errors import EngineError
from engine.weights import read_checkpoint, read_safetensors
from engine.kernels.formats import FORMATS, Weight


def test_tensors_are_views_of_the_mapped_file(model_dirs):
    tensors, _ = read_checkpoint(model_dirs("qwen2-bf16"))
    dtype, array = tensors["model.layers.0.mlp.up_proj.weight"]
    assert dtype == "BF16" and array.dtype == np.uint16
    assert isinstance(array.base, np.memmap) or isinstance(array.base.base, np.memmap)
    assert not array.flags.owndata


def test_float_decoders_are_exact():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 40)).astype(np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(Weight(FORMATS["bf16"], (3, 40), bf16).dequantize(),
                          (bf16.astype(np.uint32) << 16).view(np.float32))
    every_half = np.arange(65536, dtype=np.uint16).reshape(256, 256)   # all f16 values: normals, subnormals, inf, nan
    ours = Weight(FORMATS["f16"], (256, 256), every_half).dequantize()
    ref = every_half.view(np.float16).astype(np.float32)
    same = (ours.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ours) & np.isnan(ref))
    assert same.all()


def test_f16_checkpoint_matches_f32(model_dirs, tmp_path):
    """An f16 copy of the f32 model gives the f32 logits up to f16 weight rounding."""
    src = model_dirs("qwen2-f32")
    shutil.copytree(src, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = {name: array for name, (_, array) in read_safetensors(path)[0].items()}
    save_file({k: v.astype(np.float16) for k, v in tensors.items()}, str(path))
    f32, f16 = engine.load(str(src)), engine.load(str(tmp_path / "m"))
    ids = f32.tokenize("The quick brown fox")
    assert np.abs(f32.logits(ids) - f16.logits(ids)).max() < 0.05


def test_sharded_checkpoint_with_index(model_dirs, tmp_path):
    src = model_dirs("llama-f32")
    out = tmp_path / "sharded"
    shutil.copytree(src, out)
    tensors = {name: np.array(array) for name, (_, array) in read_safetensors(out / "model.safetensors")[0].items()}
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(out / file))
    weight_map = {n: f for f, part in halves.items() for n in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids = [1, 20, 30, 40]
    assert np.array_equal(engine.load(str(out)).logits(ids), engine.load(str(src)).logits(ids))
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(EngineError, match="lists .model-00002-of-00002.safetensors., which is not a file in"):
        engine.load(str(out))


def _rewrite(model_dir, tmp_path, edit):
    out = tmp_path / "edited"
    shutil.copytree(model_dir, out)
    path = out / "model.safetensors"
    tensors = {name: np.array(array) for name, (_, array) in read_safetensors(path)[0].items()}
    edit(tensors)
    save_file(tensors, str(path))
    return out


def test_missing_tensor_is_named(model_dirs, tmp_path):
    out = _rewrite(model_dirs("qwen2-f32"), tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(EngineError, match=r"checkpoint lacks tensor\(s\) model.layers.1.self_attn.k_proj.bias"):
        engine.load(str(out))


def test_misshaped_tensor_is_named(model_dirs, tmp_path):
    def shrink(t):
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :100].copy()
    out = _rewrite(model_dirs("qwen2-f32"), tmp_path, shrink)
    with pytest.raises(EngineError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \(128, 100\), "
                                          r"but the config implies \(128, 160\)"):
        engine.load(str(out))


def test_untied_model_without_lm_head(model_dirs, tmp_path):
    out = _rewrite(model_dirs("qwen2-f32"), tmp_path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(EngineError, match="lacks tensor.*lm_head.weight"):
        engine.load(str(out))


def _header_file(tmp_path, header: bytes, data: bytes = b"", length=None):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


@pytest.mark.parametrize("header, data, length, message", [
    (b"", b"", 10**12, "header length 1000000000000 does not fit"),
    (b"{oops", b"", None, "header is not valid JSON"),
    (b"[1, 2]", b"", None, "header must hold a JSON object"),
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', b"\0" * 8, None,
     "the tensors cover 16 bytes of data, but the file holds 8"),
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}', b"\0" * 16, None,
     r"data offsets \[0, 8\] does not match its shape \[4\] x F32 \(16 bytes\)"),
    (b'{"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}', b"\0" * 8, None, "unsupported dtype 'F64'"),
    (b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}', b"", None, "invalid shape"),
    (b'{"w": {"dtype": "F32"}}', b"", None, "malformed header entry"),
    # accepted before, wrong: the byte ranges of tensors must tile the data, as safetensors requires
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     b'"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', b"\0" * 12, None, "'b' .* overlaps another"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     b'"b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8, None, "overlaps another tensor"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', b"\0" * 12, None, "leaves a gap"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', b"\0" * 16, None, "'a' appears twice"),
    # the header length one byte short: the JSON still parses, and every tensor would be shifted
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}} ', b"\0" * 8, 61,
     "cover 8 bytes of data, but the file holds 9"),
    # values of the wrong type or size
    (b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, None, "unsupported dtype"),
    (b'{"a": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, None, "unsupported dtype"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"9" * 5000 + b']}}', b"", None,
     "an integer of 5000 digits"),
    (b'{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', b"\0" * 4, None, "invalid shape"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}', b"\0" * 4, None, "invalid data offsets"),
    (b"[" * 100000 + b"]" * 100000, b"", None, "nested too deeply"),
    (b'{"a\xff": 1}', b"", None, "not valid UTF-8"),
    (b'{"__metadata__": {"format": 5}}', b"", None, "__metadata__ must map names to strings"),
])
def test_malformed_safetensors_are_clear_errors(tmp_path, header, data, length, message):
    with pytest.raises(EngineError, match=message):
        read_safetensors(_header_file(tmp_path, header, data, length))


def test_truncated_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(EngineError, match="not a safetensors file"):
        read_safetensors(path)


def test_directory_without_weights(tmp_path, model_dirs):
    shutil.copy(model_dirs("qwen2-f32") / "config.json", tmp_path)
    shutil.copy(model_dirs("qwen2-f32") / "tokenizer.json", tmp_path)
    with pytest.raises(EngineError, match=r"no \*.safetensors files in"):
        engine.load(str(tmp_path))
