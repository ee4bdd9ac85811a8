"""Tokenizer, chat template (against transformers' apply_chat_template) and streaming decode."""
import pytest

from engine.errors import EngineError
from engine.tokenizer import Tokenizer

CONVERSATIONS = {
    "one user message": [{"role": "user", "content": "Why is the sky blue?"}],
    "system and user": [{"role": "system", "content": "You are terse."},
                        {"role": "user", "content": "2+2?"}],
    "multi-turn with thinking": [
        {"role": "user", "content": "What is 17 * 3?"},
        {"role": "assistant", "content": "<think>\n17 * 3 = 51.\n</think>\n\n51"},
        {"role": "user", "content": "And 51 / 3?"},
    ],
    "unicode": [{"role": "user", "content": "翻译：你好，世界 🌍 — naïve café"}],
}


@pytest.fixture(scope="module")
def deepseek(deepseek_tokenizer_dir):
    return Tokenizer.from_dir(deepseek_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_deepseek(deepseek_tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(deepseek_tokenizer_dir)


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(deepseek, hf_deepseek, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = deepseek.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ref = hf_deepseek.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == ref
    ref_ids = hf_deepseek.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(ref_ids, "keys"):   # transformers 5 returns a BatchEncoding
        ref_ids = ref_ids["input_ids"]
    assert deepseek.encode_chat(messages, add_generation_prompt) == list(ref_ids)


def test_chat_prompt_has_one_bos_and_drops_earlier_thinking(deepseek):
    ids = deepseek.encode_chat(CONVERSATIONS["multi-turn with thinking"])
    bos = deepseek.token_id("<｜begin▁of▁sentence｜>")
    assert ids[0] == bos and ids.count(bos) == 1
    text = deepseek.decode(ids)
    assert "<think>" not in text   # the template keeps only what follows </think>
    assert text.endswith("<｜User｜>And 51 / 3?<｜Assistant｜>")


def test_raw_encoding_adds_bos_like_transformers(deepseek, hf_deepseek):
    text = "Hello world, 12345 ...   spaces\n\ttabs"
    assert deepseek.encode(text) == hf_deepseek(text)["input_ids"]
    assert deepseek.encode(text)[0] == 151646


def test_special_tokens_keep_their_ids(deepseek):
    assert deepseek.encode("<｜User｜>hi<｜Assistant｜><think>\n</think>", add_special_tokens=False)[:1] == [151644]
    ids = deepseek.encode("<think>x</think>", add_special_tokens=False)
    assert ids[0] == 151648 and ids[-1] == 151649


STREAM_TEXTS = ["Plain ASCII text, nothing special.",
                "中文的文本：机器学习模型 and emoji 🚀🌍👩‍👩‍👧 mixed — done.",
                "🙂" * 5 + "日本語" + "🏳️‍🌈"]


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("which", ["deepseek", "tiny"])
def test_streaming_never_emits_broken_utf8(which, text, deepseek, model_dirs):
    tok = deepseek if which == "deepseek" else Tokenizer.from_dir(model_dirs("qwen2-f32"))
    ids = tok.encode(text, add_special_tokens=False)
    decoder = tok.stream_decoder()
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    if which == "tiny" and text != STREAM_TEXTS[0]:
        # the tiny byte-level vocabulary splits these characters: some steps must have held text back
        assert pieces.count("") > 0


def test_missing_chat_template_is_a_clear_error(tmp_path, model_dirs):
    import json
    import shutil
    shutil.copy(model_dirs("qwen2-f32") / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None}))
    tok = Tokenizer.from_dir(tmp_path)
    with pytest.raises(EngineError, match="no chat template; use raw mode"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_broken_tokenizer_files(tmp_path):
    with pytest.raises(EngineError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(EngineError, match="tokenizer.json could not be loaded"):
        Tokenizer.from_dir(tmp_path)
