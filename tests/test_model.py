"""The forward pass against transformers' float32 implementation on the same weights."""
import numpy as np
import pytest
from conftest import LONG_TEXT, VARIANTS

import tiny_models

LOGIT_TOLERANCE = 1e-3   # max |ours - transformers| over all positions and the whole vocabulary


@pytest.mark.parametrize("name", VARIANTS)
def test_prefill_logits_match_transformers(name, model_dirs, loaded):
    llm = loaded(name)
    ids = llm.tokenize(LONG_TEXT)
    # llama's original_max_position_embeddings is 32: the prompt must run well past it
    assert len(ids) > 4 * 32
    ours = llm.logits(ids)
    ref = tiny_models.reference_logits(model_dirs(name), ids)
    assert ours.shape == ref.shape == (len(ids), llm.config.vocab_size)
    assert ours.dtype == np.float32
    diff = np.abs(ours - ref).max()
    print(f"{name}: max |logit diff| = {diff:.2e} over {len(ids)} positions (logit range {np.abs(ref).max():.1f})")
    assert diff <= LOGIT_TOLERANCE
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("name", ["qwen2-bf16", "llama-f32"])
def test_decode_through_kv_cache_equals_prefill(name, loaded):
    llm = loaded(name)
    ids = np.asarray(llm.tokenize(LONG_TEXT)[:80])
    full = llm.logits(ids)
    model = llm.model
    model.prefill(ids[:20], 0)                     # a prompt, then token-by-token decoding
    steps = [model.forward(ids[i:i + 1], i).copy() for i in range(20, len(ids))]
    assert np.abs(np.stack(steps) - full[20:]).max() <= 1e-4


def test_chunked_prefill_equals_single_batch(model_dirs):
    import engine
    from engine.model import Transformer
    llm = engine.load(str(model_dirs("qwen2-f32")))
    ids = np.asarray(llm.tokenize(LONG_TEXT))
    whole = llm.logits(ids)
    small = Transformer(llm.config, _weights(model_dirs("qwen2-f32")), context_length=512, batch_size=7)
    assert np.abs(small.prefill(ids, 0, all_logits=True) - whole).max() <= 1e-4


def _weights(path):
    from engine import read_model
    return read_model(path)[2]


@pytest.mark.parametrize("name", ["qwen2-f32", "llama-bf16"])
def test_greedy_generation_matches_transformers(name, model_dirs, loaded):
    llm = loaded(name)
    prompt = llm.tokenize("Once upon a time")
    ref = tiny_models.reference_greedy(model_dirs(name), prompt, 40)
    text = llm.generate("Once upon a time", raw=True, temperature=0, max_tokens=40)
    assert llm.last_stats.generated_ids == ref
    assert text == llm.detokenize(ref)


def test_a_decode_step_makes_no_new_buffers(smollm2_llm, monkeypatch):
    """After the first steps, a decode step of a quantized model (integer activations, the f16
    KV cache) allocates no buffer through numpy: the matmuls' integer activations and the
    attention's scratch were made once. (A few one-item index arrays per token remain.)"""
    import numpy
    model = smollm2_llm.model
    ids = np.array(smollm2_llm.tokenize("The sky is blue because"), np.int64)
    model.forward(ids, 0)
    model.forward(np.array([5], np.int64), len(ids))   # the first decode step makes the one-row views
    made = []
    for name in ("empty", "zeros", "ones", "full", "empty_like", "zeros_like", "concatenate"):
        original = getattr(numpy, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            out = _original(*args, **kwargs)
            made.append((_name, out.shape))
            return out
        monkeypatch.setattr(numpy, name, counting)
    model.forward(np.array([7], np.int64), len(ids) + 1)
    assert [m for m in made if np.prod(m[1]) > 1] == []
