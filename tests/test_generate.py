"""The generation loop and the public Python interface on the tiny models."""
import pytest

import engine
from engine.errors import EngineError
from engine.generation import Request, Stats, StopStrings, generate_text
from engine.sampler import Sampler, SamplerSettings


def test_defaults_come_from_generation_config_then_ollamas(loaded):
    s = loaded("qwen2-f32").sampler_defaults
    assert (s.temperature, s.top_p) == (0.6, 0.95)                        # generation_config.json
    assert (s.top_k, s.repeat_penalty, s.repeat_last_n, s.min_p) == (40, 1.1, 64, 0.0)   # Ollama's, then neutral


def test_stream_and_text_agree_and_seed_reproduces(loaded):
    llm = loaded("qwen2-f32")
    text = llm.generate("Tell me a story", max_tokens=24, seed=5, temperature=1.5)
    pieces = list(llm.generate("Tell me a story", max_tokens=24, seed=5, temperature=1.5, stream=True))
    assert "".join(pieces) == text and len(pieces) > 1
    assert llm.last_stats.generated_tokens == 24 and llm.last_stats.stop_reason == "max_tokens"
    others = {llm.generate("Tell me a story", max_tokens=24, seed=s, temperature=1.5) for s in range(6, 10)}
    assert len(others | {text}) > 1   # other seeds give other texts


def test_cached_prefix_is_reused_with_identical_results(loaded):
    llm = loaded("llama-f32")
    first = llm.generate("Why is the sky blue?", temperature=0, max_tokens=10)
    prompt_tokens = llm.last_stats.prompt_tokens
    second = llm.generate("Why is the sky blue?", temperature=0, max_tokens=10)
    assert second == first
    assert llm.last_stats.prompt_tokens == 1 < prompt_tokens   # only the last prompt token was rerun
    llm.logits([1, 2, 3])                                     # a fresh context in between
    assert llm.generate("Why is the sky blue?", temperature=0, max_tokens=10) == first


def test_eos_stops_generation(loaded):
    llm = loaded("qwen2-f32")
    ids = llm.tokenize("Hello world")
    llm.generate("Hello world", raw=True, temperature=0, max_tokens=12)
    greedy = llm.last_stats.generated_ids
    cut = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])   # a token not seen before
    stats = Stats()
    request = Request(ids, Sampler(SamplerSettings(temperature=0)), 12, [], stats)
    text = "".join(generate_text(llm.model, llm.tokenizer, request, eos_ids=[greedy[cut]]))
    assert stats.stop_reason == "eos" and stats.generated_ids == greedy[:cut]
    assert text == llm.detokenize(greedy[:cut])


def test_context_full_stops_generation(model_dirs):
    llm = engine.load(str(model_dirs("qwen2-f32")), context_length=24)
    prompt = llm.prompt_ids("Hello world")
    llm.generate("Hello world", temperature=0, max_tokens=100)
    assert llm.last_stats.stop_reason == "context full"
    assert len(prompt) + llm.last_stats.generated_tokens == 24


def test_prompt_longer_than_context_is_a_clear_error(model_dirs):
    llm = engine.load(str(model_dirs("qwen2-f32")), context_length=16)
    with pytest.raises(EngineError, match=r"the prompt has \d+ tokens, but the context holds 16"):
        llm.generate("word " * 40, stream=True)   # raised at the call, not at the first piece
    with pytest.raises(EngineError, match="do not fit in the context of 16"):
        llm.logits(list(range(20)))


def test_bad_requests(loaded, model_dirs):
    llm = loaded("qwen2-f32")
    with pytest.raises(EngineError, match="token ids must be a non-empty list"):
        llm.logits([])
    with pytest.raises(EngineError, match="max_tokens must be a non-negative integer"):
        llm.generate("hi", max_tokens=-1)
    with pytest.raises(EngineError, match=r"top_p must be in \(0.0, 1.0\]"):
        llm.generate("hi", top_p=0)
    with pytest.raises(EngineError, match="token id 100000 is outside the vocabulary"):
        llm.logits([1, 100000])
    with pytest.raises(EngineError, match="must be an integer of at least 2"):
        engine.load(str(model_dirs("qwen2-f32")), context_length=1)
    with pytest.raises(EngineError, match="threads must be an integer from 1 to"):
        engine.load(str(model_dirs("qwen2-f32")), threads=0)


def test_stop_strings_cut_across_pieces():
    stops = StopStrings(["</answer>", "STOP"])
    out = [stops.feed(p) for p in ["The ans", "wer is 4", "2.</ans", "wer> more"]]
    assert "".join(out) == "The answer is 42." and stops.stopped
    stops = StopStrings(["STOP"])
    assert stops.feed("ST") == "" and stops.feed("ART") == "START" and not stops.stopped
    assert stops.feed("S") == "" and stops.flush() == "S"


def test_stop_string_in_generation(loaded):
    llm = loaded("qwen2-f32")
    full = llm.generate("Once upon", raw=True, temperature=0, max_tokens=30)
    stop = full[10:14]
    cut = llm.generate("Once upon", raw=True, temperature=0, max_tokens=30, stop=[stop])
    assert cut == full[:full.index(stop)] and llm.last_stats.stop_reason == "stop string"


def test_float_path_speed_is_reported(loaded, capsys):
    llm = loaded("qwen2-bf16")
    llm.generate("Once upon a time", raw=True, temperature=0, max_tokens=2)   # compile (or load) the kernels
    llm.logits([1, 2])
    llm.generate("Once upon a time", raw=True, temperature=0, max_tokens=64)
    s = llm.last_stats
    assert s.generated_tokens == 64 and s.generate_seconds > 0
    with capsys.disabled():
        print(f"\ntiny qwen2 bf16: {s.generated_tokens / s.generate_seconds:.0f} tokens/s decode, "
              f"{s.prompt_tokens / s.prompt_seconds:.0f} tokens/s prompt")
