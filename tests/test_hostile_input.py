"""Hostile and careless input: every malformed file, template, size or prompt is a clear
EngineError (exit status 2 and one `error:` line on the command line), or the right answer;
never a traceback, a crash, a hang or a silently wrong answer.

One test per case found by hand (side files, sizes, templates, non-finite weights, prompts,
signals), and a fuzz test over whole safetensors directories: header bytes, header JSON values,
side files, each mutated at random and loaded end to end."""
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from engine import EngineError
from engine.gguf import GGUFFile
from engine.kernels.formats import FORMATS, Weight
from engine.template import MAX_CHARS, ChatTemplate


def run_cli(*args, stdin: bytes = b"", env=None, timeout=120):
    """The command line in a fresh process: (exit status, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "engine", *args], input=stdin, capture_output=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    return done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")


def assert_clean_error(status, stderr, message):
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and lines[-1].startswith("error: "), stderr
    assert re.search(message, lines[-1]), lines[-1]


@pytest.fixture
def model_copy(model_dirs, tmp_path):
    """A writable copy of the tiny float Qwen2 directory."""
    return Path(shutil.copytree(model_dirs("qwen2-f32"), tmp_path / "model"))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# --- side files: every kind of bad value an EngineError ---------------------------------------

INVALID_UTF8 = b'{"model_type": "qwen2\xff"}'


@pytest.mark.parametrize("file, content, message", [
    ("config.json", INVALID_UTF8, r"config.json is not valid UTF-8 \(byte 21\)"),
    ("generation_config.json", INVALID_UTF8, "generation_config.json is not valid UTF-8"),
    ("tokenizer_config.json", INVALID_UTF8, "tokenizer_config.json is not valid UTF-8"),
    ("chat_template.jinja", b"{{ messages \xff }}", "chat_template.jinja is not valid UTF-8"),
    ("config.json", b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    ("config.json", b'{"rms_norm_eps": ' + b"9" * 400 + b"}", "an integer of 400 digits"),
    ("config.json", b'{"a": 1, "a": 2}', "the key 'a' appears twice"),
    ("tokenizer_config.json", b"[1, 2]", "tokenizer_config.json must hold a JSON object, not list"),
    ("tokenizer_config.json", b'"a string"', "tokenizer_config.json must hold a JSON object, not str"),
    ("tokenizer_config.json", b'{"chat_template": [1, 2]}', "'chat_template' must be a string or a list"),
    ("tokenizer_config.json", b'{"chat_template": 5}', "'chat_template' must be a string or a list"),
    ("generation_config.json", b"5", "generation_config.json must hold a JSON object"),
])
def test_bad_side_files(model_copy, file, content, message):
    (model_copy / file).write_bytes(content)
    with pytest.raises(EngineError, match=message):
        engine.load(str(model_copy))


@pytest.mark.parametrize("change, message", [
    (lambda c: (c.pop("rope_parameters", None), c.update(rope_scaling=[1])), "'rope_scaling' must be an object"),
    (lambda c: c.update(rope_parameters=[1]), "'rope_parameters' must be an object"),
    (lambda c: c.update(rms_norm_eps=10**25), None),                       # large but finite: loads
    (lambda c: c.update(tie_word_embeddings="no"), "'tie_word_embeddings' must be true or false"),
    (lambda c: c.update(num_hidden_layers=10**9), "the config says 1000000000 layers, but the checkpoint holds "
                                                  "tensors of 2"),
    (lambda c: c.update(num_hidden_layers=1), "the config says 1 layers, but the checkpoint holds tensors of 2"),
])
def test_config_values(model_copy, change, message):
    edit_json(model_copy / "config.json", change)
    if message is None:
        engine.load(str(model_copy))
    else:
        with pytest.raises(EngineError, match=message):
            engine.load(str(model_copy))


def test_weight_map_and_tensor_formats_of_the_wrong_type(model_copy, tmp_path):
    index = model_copy / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": ["model.safetensors"]}}))
    with pytest.raises(EngineError, match="needs a 'weight_map' object from tensor names to file names"):
        engine.load(str(model_copy))
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "../model.safetensors"}}))
    with pytest.raises(EngineError, match="lists '../model.safetensors', which is not a file in"):
        engine.load(str(model_copy))
    index.unlink()
    from engine.weights import stored_formats
    for table in ("[1, 2]", '{"w": {"q4_0": 1}}', '{"w": ["q4_0"]}', "{oops"):
        with pytest.raises(EngineError, match="tensor_formats"):
            stored_formats({"format": "engine-quantized", "format_version": "1", "tensor_formats": table})


def test_a_vocabulary_id_beyond_the_embedding(model_copy):
    """tokenizers accepts any u32 id; the added tokens then get other ids than the file says."""
    edit_json(model_copy / "tokenizer.json", lambda t: t["model"]["vocab"].update({"zzz-extra": 2**31}))
    with pytest.raises(EngineError, match=r"tokenizer.json: its \d+ tokens do not have the ids 0..\d+"):
        engine.load(str(model_copy))


# --- sizes are checked before anything is allocated ------------------------------------------

def test_a_huge_block_count_in_a_gguf(smollm2, tmp_path):
    data = bytearray(Path(smollm2).read_bytes())
    key = b"llama.block_count"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4   # value type u32
    struct.pack_into("<I", data, at + 4, 2**32 - 1)
    (tmp_path / "big.gguf").write_bytes(bytes(data))
    with pytest.raises(EngineError, match="the config says 4294967295 layers, but the checkpoint holds tensors of 30"):
        engine.load(str(tmp_path / "big.gguf"))


def test_a_context_larger_than_memory_says_what_it_needs(smollm2):
    status, _, stderr = run_cli("generate", "-m", str(smollm2), "-p", "hi", "--ctx", "100000000")
    assert_clean_error(status, stderr, r"a context of 100000000 positions needs 2355.2 GB for its f16 KV cache, "
                                       r"and this machine has [\d.]+ GB available: use a smaller context \(--ctx")


# --- chat templates are untrusted code ---------------------------------------------------------

@pytest.mark.parametrize("source, message", [
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "steps of work"),
    ("{{ 'x' * 2000000000 }}", "a repetition would make 2000000000 items"),
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{% import 'os' as os %}", "no loader"),
    ("{{ ''.__class__.__mro__ }}", "__class__"),
    ("{{ messages.append(1) }}", "unsafe"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "a concatenation would make"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "a concatenation would make"),
    ("{{ 'x'|center(2000000000) }}", "center would make"),
    ("{{ 'x'|indent(2000000000) }}", "indent would make"),
    ("{{ '%2000000000d' % 1 }}", "a format width of 2000000000"),
    ("{{ '%*d'|format(2000000000, 1) }}", r"a format width of \*"),
    ("{{ 'x'|replace('', 'y' * 100000) * 1 }}{{ ('y' * 100000)|replace('y', 'zzzzzzzzzz' * 10) }}", "replace would make"),
    ("{{ (['x' * 7000000] * 1000)|join }}", "join would make"),
    ("{{ ([[1] * 7000000] * 1000)|sum(start=[]) }}", "sum would make"),
    ("{{ 2 ** 100000000 }}", "too large a number"),
    ("{{ {'a': 1}|tojson(indent=1000000000) }}", "indent is limited"),
    ("{% set x = 'x' * 1000000 %}{% for i in range(100) %}{{ x }}{% endfor %}", "the rendered prompt would make"),
])
def test_hostile_templates_are_stopped(source, message):
    with pytest.raises(EngineError, match=message):
        ChatTemplate(source).render(messages=[{"role": "user", "content": "hi"}])


def test_a_template_that_never_ends_is_a_clear_error_on_the_command_line(smollm2, tmp_path):
    """Through a GGUF's tokenizer.chat_template, end to end."""
    from gguf import GGUFReader
    reader = GGUFReader(str(smollm2))
    field = reader.fields["tokenizer.chat_template"]
    start, length = int(field.parts[-1].ctypes.data - reader.data.ctypes.data), len(field.parts[-1])
    hostile = b"{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    data = bytearray(Path(smollm2).read_bytes())
    data[start:start + length] = hostile.ljust(length, b" ")   # same length: the file stays valid
    (tmp_path / "hostile.gguf").write_bytes(bytes(data))
    status, stdout, stderr = run_cli("generate", "-m", str(tmp_path / "hostile.gguf"), "-p", "hi")
    assert_clean_error(status, stderr, "the chat template was stopped: it did more than 5000000 steps of work")


def test_templates_still_render_what_transformers_renders(deepseek_tokenizer_dir):
    """The bounds change nothing for a real template and a long chat (compared with plain jinja2)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    source = (deepseek_tokenizer_dir / "chat_template.jinja").read_text()
    chat = [{"role": "user", "content": "hello " * 500}, {"role": "assistant", "content": "<think>a</think>b"}] * 100
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    expected = plain.render(messages=chat, add_generation_prompt=True, bos_token="<s>")
    assert ChatTemplate(source).render(messages=chat, add_generation_prompt=True, bos_token="<s>") == expected
    assert len(expected) < MAX_CHARS


def test_a_damaged_weight_cache_is_rewritten_and_the_answer_stays_right(smollm2, tmp_path):
    """The issue's case: 64 KiB flipped in the middle of SmolLM2's entry, then `generate`."""
    env = {"ENGINE_WEIGHT_CACHE": str(tmp_path / "cache")}
    question = ["generate", "-m", str(smollm2), "-p", "What is the capital of France?", "--system",
                "You are a helpful assistant.", "--temperature", "0", "--repeat-penalty", "1", "-n", "12"]
    status, answer, _ = run_cli(*question, env=env)
    assert status == 0 and "Paris" in answer
    entry = next((tmp_path / "cache").glob("*.bin"))
    data = bytearray(entry.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 65536] = bytes(b ^ 0xFF for b in data[middle:middle + 65536])
    entry.write_bytes(bytes(data))
    for expect_note in (True, False):   # damaged: said once and rewritten; then a sound entry again
        status, again, stderr = run_cli(*question, env=env)
        assert status == 0 and again == answer
        notes = [line for line in stderr.splitlines() if line.startswith("note: the cached repacked weights")]
        assert len(notes) == (1 if expect_note else 0), stderr
        assert not expect_note or "does not match its checksum" in notes[0]


# --- weights that are not finite ------------------------------------------------------------------

def poke(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(src.read_bytes())
    raw[offset:offset + len(data)] = data
    dst.write_bytes(bytes(raw))
    return dst


def test_an_infinite_block_scale_is_named_at_load(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_WEIGHT_CACHE", "off")
    offset = GGUFFile(smollm2).tensors["blk.5.ffn_down.weight"].offset + 20 * 7   # block 7's d
    bad = poke(Path(smollm2), tmp_path / "inf.gguf", offset, b"\x00\x7c")
    with pytest.raises(EngineError, match="tensor 'model.layers.5.mlp.down_proj.weight' has 1 q4_1 blocks whose "
                                          "scale is infinite or NaN"):
        engine.load(str(bad))


def relabel(src: Path, dst: Path, tensor: str, type_id: int) -> Path:
    """A copy of a GGUF file with one tensor's ggml type changed in its tensor table."""
    data = bytearray(src.read_bytes())
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_id)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("tensor", ["blk.3.ffn_up.weight", "blk.29.attn_v.weight"])
def test_a_mislabelled_tensor_type(smollm2, tmp_path, tensor):
    """Q4_1 read as Q4_0 still fits the file (18 of its 20 bytes per block): garbage, not NaN."""
    last = max(GGUFFile(smollm2).tensors.values(), key=lambda t: t.offset).name
    bad = relabel(Path(smollm2), tmp_path / "relabelled.gguf", tensor, 2)   # Q4_0
    where = "after the last tensor" if tensor == last else f"between tensor '{tensor}' and tensor"
    with pytest.raises(EngineError, match=f"bytes lie unused {where}.*a tensor's type or shape is mislabelled"):
        engine.load(str(bad))


def test_a_nan_norm_weight_is_named_at_load(smollm2, tmp_path):
    offset = GGUFFile(smollm2).tensors["blk.2.attn_norm.weight"].offset + 8
    bad = poke(Path(smollm2), tmp_path / "nan.gguf", offset, struct.pack("<f", float("nan")))
    with pytest.raises(EngineError, match="tensor 'model.layers.2.input_layernorm.weight' holds NaN"):
        engine.load(str(bad))


def test_non_finite_activations_name_the_weight_that_made_them(model_copy):
    """A float matrix is not scanned at load (that would read the whole model): an infinity in it
    is found when the forward pass meets it, and the error names the product and its weight."""
    from engine.weights import read_safetensors
    tensors, _ = read_safetensors(model_copy / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    header_len = struct.unpack("<Q", (model_copy / "model.safetensors").read_bytes()[:8])[0]
    header = json.loads((model_copy / "model.safetensors").read_bytes()[8:8 + header_len])
    begin = header[name]["data_offsets"][0]
    poke(model_copy / "model.safetensors", model_copy / "model.safetensors", 8 + header_len + begin,
         np.full(160 * 4, np.inf, np.float32).tobytes())
    llm = engine.load(str(model_copy), kv_cache="f32")
    with pytest.raises(EngineError, match=f"NaN or infinite values, first in the product with {re.escape(name)}"):
        llm.generate("Hello", max_tokens=3)


@pytest.mark.parametrize("format_name", [f.name for f in FORMATS.values() if f.packed])
@pytest.mark.parametrize("rows_only", [False, True])
def test_non_finite_scales_are_counted_in_every_format(format_name, rows_only):
    """Each fp16 field of each format, packed and in file rows: one infinity, one NaN."""
    f = FORMATS[format_name]
    rows, cols = 70, 2 * f.block_size   # a partial second group of 64 rows
    raw = np.random.default_rng(0).integers(0, 256, (rows, f.row_bytes(cols)), dtype=np.uint8)
    for field in f.f16_fields:
        raw.reshape(-1, f.block_bytes)[:, field:field + 2] = (0x00, 0x3C)         # 1.0
    assert Weight(f, (rows, cols), raw, rows_only).non_finite_scales() == 0
    for field in f.f16_fields:
        damaged = raw.copy()
        damaged.reshape(-1, f.block_bytes)[5, field:field + 2] = (0x00, 0x7C)      # +inf
        damaged.reshape(-1, f.block_bytes)[-1, field:field + 2] = (0x01, 0xFE)     # NaN
        assert Weight(f, (rows, cols), damaged, rows_only).non_finite_scales() == 2, field


# --- prompts -----------------------------------------------------------------------------------------

def test_invalid_utf8_on_stdin(smollm2):
    status, _, stderr = run_cli("generate", "-m", str(smollm2), "-p", "-", stdin=b"caf\xe9 au lait")
    assert_clean_error(status, stderr, r"the prompt on stdin is not valid UTF-8 \(byte 3\)")


def test_lone_surrogates_in_a_prompt(smollm2_llm):
    for prompt, raw in (("caf\udce9", False), ("caf\udce9", True), ([{"role": "user", "content": "\ud800"}], False)):
        with pytest.raises(EngineError, match="is not valid Unicode: character 3|character 0 is a lone surrogate"):
            smollm2_llm.generate(prompt, raw=raw, max_tokens=1)
    with pytest.raises(EngineError, match="message 0 has role None; supported: system, user"):
        smollm2_llm.generate([{"content": "no role"}], max_tokens=1)
    with pytest.raises(EngineError, match="the content of message 1 must be a string"):
        smollm2_llm.generate([{"role": "user", "content": "a"}, {"role": "user", "content": 5}], max_tokens=1)


def default_sigint():
    """A process started in the background by a shell without job control (as CI may run the
    tests) inherits SIGINT ignored, and Python then leaves it ignored: give the child the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_at_once_and_ends_the_line(smollm2, sig, status):
    process = subprocess.Popen([sys.executable, "-m", "engine", "generate", "-m", str(smollm2), "-p",
                                "Tell me a very long story about a dragon.", "-n", "2000", "--temperature", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    first = process.stdout.read(20)   # the answer is streaming
    process.send_signal(sig)
    rest, stderr = process.communicate(timeout=60)   # a watchdog: it ends at once, not after 2000 tokens
    assert process.returncode == status
    assert (first + rest).endswith(b"\n") and len(first + rest) < 4000
    assert b"Traceback" not in stderr


# --- fuzz: whole safetensors directories ----------------------------------------------------------

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.sampled_from([0, 1, -1, 2, 7, 2**31, 2**32 - 1, 2**63, 10**20, 10**29]),
    st.integers(-10, 10**6), st.floats(allow_nan=False), st.sampled_from(["", "F32", "qwen2", "llama", "x" * 50]),
    st.lists(st.integers(-2, 2**33), max_size=4), st.dictionaries(st.sampled_from(["a", "type", "factor"]),
                                                                  st.integers(-1, 9), max_size=2))


@pytest.fixture(scope="module")
def fuzz_base(model_dirs, tmp_path_factory):
    """The tiny Qwen2's files in memory, and the directory each example is written to."""
    source = model_dirs("qwen2-f32")
    files = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    return files, tmp_path_factory.mktemp("fuzz") / "model"


def _json_or_none(content: bytes):
    try:
        value = json.loads(content)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _mutate_value(data, draw, target):
    """Replace (or delete) one value somewhere inside a JSON object."""
    path, node = [], target
    while isinstance(node, dict) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node)))
        path.append(key)
        node = node[key]
    parent = target
    for key in path[:-1]:
        parent = parent[key]
    if not path:
        parent[draw(st.sampled_from(["model_type", "vocab_size", "num_hidden_layers", "chat_template", "x"]))] = \
            draw(JSON_VALUES)
    elif draw(st.integers(0, 4)) == 0:
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON_VALUES)


def mutate(files: dict, data) -> dict:
    """1 to 3 mutations of a model directory's files ({name: bytes})."""
    files = dict(files)
    draw = data.draw
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["header bytes", "header value", "header length", "side value", "side bytes"]))
        weights = bytearray(files["model.safetensors"])
        header_len = struct.unpack_from("<Q", weights)[0]
        if target == "header bytes":
            at = draw(st.integers(0, min(8 + header_len, len(weights)) - 1))
            weights[at] = draw(st.sampled_from([weights[at] ^ (1 << draw(st.integers(0, 7))), 0, 0xFF, ord('"'),
                                                 ord("9"), ord("-"), ord("}")]))
        elif target == "header length":
            change = draw(st.sampled_from([-2, -1, 1, 8, 2**40, -header_len]))
            struct.pack_into("<Q", weights, 0, max(header_len + change, 0) % 2**64)
        elif target == "header value":
            header = _json_or_none(bytes(weights[8:8 + header_len]))
            if header is None:
                continue   # already garbled by an earlier mutation
            _mutate_value(data, draw, header)
            encoded = json.dumps(header).encode()
            weights = bytearray(struct.pack("<Q", len(encoded)) + encoded + weights[8 + header_len:])
        else:
            name = draw(st.sampled_from(["config.json", "generation_config.json", "tokenizer_config.json",
                                         "tokenizer.json"]))
            content = files[name]
            side = _json_or_none(content) if target == "side value" and name != "tokenizer.json" else None
            if side is not None:
                _mutate_value(data, draw, side)
                content = json.dumps(side).encode()
            elif content:
                raw = bytearray(content)
                at = draw(st.integers(0, len(raw) - 1))
                action = draw(st.sampled_from(["flip", "truncate", "invalid utf-8"]))
                if action == "flip":
                    raw[at] ^= 1 << draw(st.integers(0, 7))
                elif action == "truncate":
                    del raw[at:]
                else:
                    raw[at] = 0xFF
                content = bytes(raw)
            files[name] = content
        if target.startswith("header"):
            files["model.safetensors"] = bytes(weights)
    return files


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")   # the drawn bytes' repr is long
def test_fuzz_safetensors_directories_load_or_fail_cleanly(fuzz_base):
    """Mutated header bytes and length, header JSON values, and side files (values, bytes,
    truncation), 1,000 directories: loading and running the model either works (finite logits)
    or raises EngineError; never another exception, a hang or a huge allocation."""
    files, directory = fuzz_base
    outcomes = Counter()

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def load_mutated(data):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        for name, content in mutate(files, data).items():
            (directory / name).write_bytes(content)
        try:
            llm = engine.load(str(directory), kv_cache="f32", context_length=64)
            logits = llm.logits(llm.tokenize("Hello there"))
            assert np.isfinite(logits).all()
            outcomes["loaded and ran"] += 1
        except EngineError as e:
            outcomes[f"EngineError: {re.sub(r'[0-9]+', 'N', str(e))[:60]}"] += 1

    load_mutated()
    print("\n".join(f"{count:5d}  {outcome}" for outcome, count in outcomes.most_common()))
    assert sum(outcomes.values()) >= 1000
    assert 20 <= outcomes["loaded and ran"] <= 980   # the mutations reach both sides (about 7 % load)
