"""The on-disk cache of repacked weights (engine/weight_cache.py): a second load maps the same
bytes and computes the same logits; damaged, stale or disabled caches never change a result.
Also: an untied embedding stays in the file's row layout (only its rows are ever read)."""
import dataclasses
import json
import os
import shutil
import threading

import numpy as np
import pytest

import engine
from engine.cli import main as cli_main
from engine.kernels.formats import Weight, matmul

TEXT = "The quick brown fox jumps over the lazy dog, and then some more words follow."


@pytest.fixture(scope="module")
def quantized_dir(model_dirs, tmp_path_factory):
    """A tiny untied Qwen2 quantized to q4_0 by `python -m engine quantize` (lm_head q8_0)."""
    out = tmp_path_factory.mktemp("cache") / "tiny-qwen2-q4_0"
    assert cli_main(["quantize", "--model", str(model_dirs("qwen2-f32")), "--type", "q4_0",
                     "--output", str(out)]) == 0
    return out


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "weights"
    monkeypatch.setenv("ENGINE_WEIGHT_CACHE", str(path))
    return path


def finish_writes():
    for thread in threading.enumerate():
        if thread.name == "weight-cache-writer":
            thread.join()


def load(path):
    llm = engine.load(str(path), kv_cache="f32")
    finish_writes()
    return llm


def packed_weights(llm) -> dict:
    out = {}
    for i, layer in enumerate(llm.model.layers):
        for attr, value in vars(layer).items():
            if isinstance(value, Weight) and value.packed:
                out[f"{i}.{attr}"] = value
    out["lm_head"] = llm.model.lm_head
    return out


def is_mapped(array) -> bool:
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = getattr(array, "base", None)
    return False


def entries(cache_dir):
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def test_second_load_maps_the_cached_entry(quantized_dir, cache_dir):
    first = load(quantized_dir)
    names = entries(cache_dir)
    assert len(names) == 2 and names[0].endswith(".bin") and names[1].endswith(".json")
    second = load(quantized_dir)
    assert entries(cache_dir) == names   # read, not written again
    a, b = packed_weights(first), packed_weights(second)
    assert len(a) == 1 + 7 * len(first.model.layers)
    for name in a:
        assert not is_mapped(a[name].data) and is_mapped(b[name].data), name
        assert np.array_equal(a[name].data, b[name].data), name
    ids = first.tokenize(TEXT)
    assert np.array_equal(first.logits(ids), second.logits(ids))


def test_untied_embedding_stays_in_file_layout(quantized_dir, cache_dir):
    llm = load(quantized_dir)
    embed = llm.model.embed
    assert embed.format.name == "q8_0" and embed.rows_only and not embed.packed
    assert embed.data.shape == (embed.shape[0], embed.shape[1] // 32 * 34)
    assert llm.model.lm_head is not embed and llm.model.lm_head.packed
    with pytest.raises(ValueError, match="row lookups only"):
        matmul(embed, np.zeros((1, embed.shape[1]), np.float32), np.zeros((1, embed.shape[0]), np.float32))


def damage_data(bin_path, index_path):
    with open(bin_path, "r+b") as f:
        f.truncate(bin_path.stat().st_size - 4096)


def damage_flip_middle(bin_path, index_path):
    """64 KiB of flipped bits in the middle: same size, same index (used to give wrong answers)."""
    size = bin_path.stat().st_size
    with open(bin_path, "r+b") as f:
        f.seek(size // 2)
        chunk = np.frombuffer(f.read(65536), np.uint8)
        f.seek(size // 2)
        f.write((chunk ^ 0xFF).tobytes())


def damage_zero_all(bin_path, index_path):
    """All zeros at the same size."""
    size = bin_path.stat().st_size
    with open(bin_path, "r+b") as f:
        f.write(bytes(size))


def damage_one_bit(bin_path, index_path):
    with open(bin_path, "r+b") as f:
        f.seek(4096 + 7)
        byte = f.read(1)
        f.seek(4096 + 7)
        f.write(bytes([byte[0] ^ 0x10]))


def damage_shapes(bin_path, index_path):
    index = json.loads(index_path.read_text())
    for entry in index["tensors"].values():
        entry[1] = [entry[1][0], entry[1][2], entry[1][1]]   # same bytes, other shape
    index_path.write_text(json.dumps(index))


def damage_offsets(bin_path, index_path):
    index = json.loads(index_path.read_text())
    for entry in index["tensors"].values():
        entry[0] = index["bytes"]                           # past the end of the data
    index_path.write_text(json.dumps(index))


def damage_json(bin_path, index_path):
    index_path.write_text('{"bytes": ')


@pytest.mark.parametrize("damage", [damage_data, damage_flip_middle, damage_zero_all, damage_one_bit, damage_shapes,
                                    damage_offsets, damage_json])
def test_damaged_entry_is_ignored_and_rewritten(damage, quantized_dir, cache_dir, capfd):
    reference = load(quantized_dir)
    bin_path, index_path = (cache_dir / name for name in entries(cache_dir))
    damage(bin_path, index_path)
    capfd.readouterr()
    again = load(quantized_dir)
    note = capfd.readouterr().err.strip().splitlines()
    assert len(note) == 1 and note[0].startswith(f"note: the cached repacked weights {bin_path} are damaged (")
    for name, weight in packed_weights(again).items():
        assert not is_mapped(weight.data), name   # repacked from the file
    ids = reference.tokenize(TEXT)
    assert np.array_equal(reference.logits(ids), again.logits(ids))
    index = json.loads(index_path.read_text())
    assert index["bytes"] == bin_path.stat().st_size      # a whole entry again
    assert all(is_mapped(w.data) for w in packed_weights(load(quantized_dir)).values())
    assert capfd.readouterr().err == ""                   # and a sound one: no note


def test_changed_file_gets_a_new_entry_that_replaces_the_old(quantized_dir, cache_dir, tmp_path):
    copy = shutil.copytree(quantized_dir, tmp_path / "copy")
    load(copy)
    load(quantized_dir)                      # another model's entry stays
    before = set(entries(cache_dir))
    assert len(before) == 4
    weights = copy / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    load(copy)
    after = set(entries(cache_dir))
    assert len(after) == 4 and len(after - before) == 2   # the copy's old entry is gone
    assert all(is_mapped(w.data) for w in packed_weights(load(copy)).values())


def test_entries_of_older_layouts_are_removed_and_other_files_kept(quantized_dir, cache_dir):
    cache_dir.mkdir(parents=True)
    old = cache_dir / ("0" * 32)   # as an older version wrote it: no "layout", another file
    old.with_suffix(".bin").write_bytes(b"x" * 4096)
    old.with_suffix(".json").write_text(json.dumps({"bytes": 4096, "tensors": {}, "source": ["/elsewhere"]}))
    mine = cache_dir / "notes.json"   # not an entry: never touched
    mine.write_text("{}")
    load(quantized_dir)
    assert not old.with_suffix(".bin").exists() and not old.with_suffix(".json").exists()
    assert mine.exists() and len(entries(cache_dir)) == 3


def test_a_changed_packing_names_new_entries(quantized_dir, cache_dir, monkeypatch):
    """Bytes packed by another layout are never read as this one's: an entry's name follows where
    each format's packing puts every byte, not only a version number that someone must bump."""
    from engine.kernels import formats
    from engine.weight_cache import WeightCache
    files = sorted(quantized_dir.glob("*.safetensors"))
    before = WeightCache(cache_dir, files).data_path
    assert WeightCache(cache_dir, files).data_path == before
    q4_0 = formats.FORMATS["q4_0"]
    every_byte_in_planes = ((0, q4_0.block_bytes, formats.layout.PLANES),)
    monkeypatch.setitem(formats.FORMATS, "q4_0", dataclasses.replace(q4_0, runs=every_byte_in_planes))
    assert WeightCache(cache_dir, files).data_path != before


def test_cache_off_reads_and_writes_nothing(quantized_dir, cache_dir, monkeypatch):
    monkeypatch.setenv("ENGINE_WEIGHT_CACHE", "off")
    llm = load(quantized_dir)
    assert not cache_dir.exists()
    assert not any(is_mapped(w.data) for w in packed_weights(llm).values())


def test_unwritable_cache_is_a_note_not_an_error(quantized_dir, tmp_path, monkeypatch, capfd):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ENGINE_WEIGHT_CACHE", str(blocker / "weights"))
    llm = load(quantized_dir)
    assert "could not cache the repacked weights" in capfd.readouterr().err
    assert len(llm.generate("Hi", max_tokens=3, temperature=0)) > 0
    assert list(tmp_path.iterdir()) == [blocker]


def test_an_interrupted_process_abandons_the_entry_it_writes(quantized_dir, cache_dir):
    """Ctrl-C or SIGTERM (engine/cli.py) must not wait for an entry to be written."""
    from engine import weight_cache
    weight_cache.abandon_writes()
    try:
        load(quantized_dir)
        assert entries(cache_dir) == []   # nothing written, no temporary file left
    finally:
        weight_cache.STOP_WRITING.clear()
    load(quantized_dir)
    assert len(entries(cache_dir)) == 2
