"""The ollama-shaped Python API (engine/surfaces/api.py): responses the real `ollama` package's types
accept, thinking apart from the answer, options by Ollama's names, models kept for keep_alive."""
import time

import ollama
import pytest

import engine
from engine import EngineError
from engine.surfaces import api
from engine.tokenizer import chat_messages

PARIS = [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "repeat_penalty": 1, "num_predict": 12}


@pytest.fixture(autouse=True)
def fresh_registry():
    api.MODELS.clear()
    yield
    api.MODELS.clear()


def test_chat_answers_with_the_ollama_packages_fields(smollm2):
    r = engine.chat(model=str(smollm2), messages=PARIS, options=GREEDY)
    typed = ollama.ChatResponse.model_validate(r)
    assert typed.message.content.startswith("The capital of France is Paris") and typed.message.thinking is None
    assert r["message"]["content"] == r.message.content == typed.message.content
    assert r.done and r.done_reason in ("stop", "length") and r.model == str(smollm2)
    assert r.prompt_eval_count > 10 and 0 < r.eval_count <= 12
    assert r.total_duration >= r.load_duration + r.prompt_eval_duration + r.eval_duration > 0
    assert set(typed.model_dump(exclude_none=True)) == {
        "model", "created_at", "done", "done_reason", "total_duration", "load_duration", "prompt_eval_count",
        "prompt_eval_duration", "eval_count", "eval_duration", "message"}


def test_streamed_chunks_have_the_same_shape_and_add_up(smollm2):
    whole = engine.chat(model=str(smollm2), messages=PARIS, options=GREEDY)
    chunks = list(engine.chat(model=str(smollm2), messages=PARIS, options=GREEDY, stream=True))
    for chunk in chunks:
        ollama.ChatResponse.model_validate(chunk)
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c.message.content for c in chunks) == whole.message.content
    assert chunks[-1].eval_count == whole.eval_count and chunks[-1].load_duration == 0   # loaded already


def test_generate_with_system_and_raw(smollm2):
    r = engine.generate(model=str(smollm2), prompt="What is the capital of France?",
                        system="You are a helpful assistant.", options=GREEDY)
    assert ollama.GenerateResponse.model_validate(r).response.startswith("The capital of France is Paris")
    raw = engine.generate(model=str(smollm2), prompt="The capital of France is", raw=True,
                          options={**GREEDY, "num_predict": 3})
    assert ollama.GenerateResponse.model_validate(raw).response.strip().startswith("Paris")
    assert raw.done_reason == "length" and raw.eval_count == 3


@pytest.mark.parametrize("opens", [True, False])
def test_thinking_is_split_from_the_answer(model_dirs, opening_template_model, opens):
    """Random weights write whatever they write; the parser must split it as the rule says:
    with the block opened by the prompt, everything before the first closing tag is thinking;
    without, text that does not begin with the opening tag is all answer."""
    name = opening_template_model if opens else str(model_dirs("qwen2-f32"))
    r = engine.chat(model=name, messages=[{"role": "user", "content": "Hello"}],
                    options={"temperature": 0, "num_predict": 24})
    llm = api.MODELS.models[name].llm
    text, opened = api.render_chat(llm, [{"role": "user", "content": "Hello"}], None)
    assert opened == opens and text.endswith("<｜Assistant｜><think>\n" if opens else "<｜Assistant｜>")
    everything = llm.detokenize(llm.last_stats.generated_ids)
    if opens:
        thinking, _, answer = everything.partition("</think>")
        assert (r.message.thinking or "") == thinking.lstrip() and r.message.content == answer.lstrip()
    elif not everything.lstrip().startswith("<think>"):
        assert r.message.thinking is None and r.message.content == everything


@pytest.mark.parametrize("opens", [True, False])
def test_think_false_renders_an_empty_thinking_block(model_dirs, opening_template_model, opens):
    name = opening_template_model if opens else str(model_dirs("qwen2-f32"))
    engine.chat(model=name, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 1})
    llm = api.MODELS.models[name].llm
    text, opened = api.render_chat(llm, [{"role": "user", "content": "Hi"}], False)
    assert text.endswith("<｜Assistant｜><think>\n\n</think>\n\n") and not opened
    assert text.count("<think>") == 1
    r = engine.chat(model=name, messages=[{"role": "user", "content": "Hi"}], think=False,
                    options={"temperature": 0, "num_predict": 8})
    assert r.message.thinking is None


def test_think_on_a_model_that_cannot(smollm2):
    with pytest.raises(EngineError, match="does not support thinking"):
        engine.chat(model=str(smollm2), messages=PARIS, think=True)


def test_earlier_reasoning_is_never_sent_back():
    messages = chat_messages([{"role": "user", "content": "a"},
                               {"role": "assistant", "content": "<think>private</think>\n\nanswer", "thinking": "x"},
                               {"role": "user", "content": "b"}])
    assert messages[1] == {"role": "assistant", "content": "\n\nanswer"}   # as DeepSeek's template cuts it


def test_a_second_turn_prefills_only_what_is_new_and_answers_as_a_fresh_model(model_dirs):
    name = str(model_dirs("qwen2-f32"))
    options = {"temperature": 0, "num_predict": 6}
    first = engine.chat(model=name, messages=[{"role": "user", "content": "Hello there"}], options=options)
    chat = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first.message.content},
            {"role": "user", "content": "And then?"}]
    second = engine.chat(model=name, messages=chat, options=options)
    api.MODELS.clear()
    fresh = engine.chat(model=name, messages=chat, options=options)
    assert second.message.content == fresh.message.content
    assert second.prompt_eval_count < fresh.prompt_eval_count   # the shared prefix was not run again


@pytest.mark.parametrize("messages, message", [
    ([{"role": "robot", "content": "hi"}], "message 0 has role 'robot'"),
    ([{"role": "user"}], "message 0 has no 'content'"),
    ([{"role": "user", "content": 5}], "the content of message 0 must be a string"),
    ({"role": "user", "content": "hi"}, "messages must be a list"),
    (["hi"], "message 0 must be an object"),
])
def test_bad_messages(smollm2, messages, message):
    with pytest.raises(EngineError, match=message):
        engine.chat(model=str(smollm2), messages=messages)


def test_no_messages_or_prompt_only_loads_the_model(smollm2):
    r = engine.chat(model=str(smollm2), messages=[])
    assert r.done and r.done_reason == "load" and r.message.content == ""
    assert engine.generate(model=str(smollm2), prompt="").done_reason == "load"
    assert [m.model for m in engine.ps().models] == [str(smollm2)]


@pytest.mark.parametrize("options, message", [
    ({"temprature": 0.5}, "unknown option 'temprature'"),
    ({"temperature": -1}, "temperature"),
    ({"stop": "x"}, "'stop' must be a list of strings"),
    ({"num_predict": "many"}, "'num_predict' must be an integer"),
    ([1, 2], "options must be an object"),
])
def test_bad_options(smollm2, options, message):
    with pytest.raises(EngineError, match=message):
        engine.chat(model=str(smollm2), messages=PARIS, options=options)


def test_options_accept_the_ollama_packages_object(smollm2):
    r = engine.chat(model=str(smollm2), messages=PARIS, options=ollama.Options(temperature=0, num_predict=4,
                                                                               repeat_penalty=1))
    assert r.eval_count == 4 and r.message.content.startswith("The capital")


@pytest.mark.parametrize("value, seconds", [(None, 300), (0, 0), (-1, -1), ("5m", 300), ("1h30m", 5400),
                                            ("90s", 90), ("-1", -1), ("250ms", 0.25), (2.5, 2.5)])
def test_keep_alive_values(value, seconds):
    assert api.keep_alive_seconds(value) == seconds


def test_keep_alive_releases_the_model(smollm2):
    engine.chat(model=str(smollm2), messages=PARIS, options={"num_predict": 1}, keep_alive=0)
    assert engine.ps().models == []
    engine.chat(model=str(smollm2), messages=PARIS, options={"num_predict": 1}, keep_alive="1s")
    assert [m.model for m in engine.ps().models] == [str(smollm2)]
    time.sleep(1.2)
    assert engine.ps().models == []
    with pytest.raises(EngineError, match="keep_alive must be"):
        engine.chat(model=str(smollm2), messages=PARIS, keep_alive="soon")
