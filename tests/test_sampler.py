"""The sampler chain: exact candidate sets, penalties, seeds, greedy, and invalid values."""
import numpy as np
import pytest

from engine.errors import EngineError
from engine.sampler import Sampler, SamplerSettings, apply_penalties, filter_candidates

# probabilities 0.4, 0.3, 0.15, 0.1, 0.05 at shuffled ids, so order cannot come from the ids
PROBS = {7: 0.4, 2: 0.3, 9: 0.15, 0: 0.1, 4: 0.05}


def logits_of(probs, vocab=10):
    logits = np.full(vocab, -np.inf, np.float32)
    for token, p in probs.items():
        logits[token] = np.log(p)
    return logits


def kept(**options):
    candidates, probs = filter_candidates(logits_of(PROBS), SamplerSettings().updated(**options))
    assert np.isclose(probs.sum(), 1.0)
    return set(candidates.tolist())


def test_top_k_keeps_the_k_best():
    assert kept(top_k=1) == {7}
    assert kept(top_k=3) == {7, 2, 9}
    assert kept(top_k=0) == set(PROBS) | {1, 3, 5, 6, 8}   # off: every token (zero-probability ones too)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # boundaries a little off the exact sums, which float32 logits cannot hit exactly
    assert kept(top_p=0.39) == {7}
    assert kept(top_p=0.41) == {7, 2}
    assert kept(top_p=0.69) == {7, 2}
    assert kept(top_p=0.71) == {7, 2, 9}
    assert kept(top_p=0.84) == {7, 2, 9}
    assert kept(top_p=0.86) == {7, 2, 9, 0}


def test_min_p_keeps_tokens_above_a_fraction_of_the_best():
    assert kept(min_p=0.5) == {7, 2}          # threshold 0.2
    assert kept(min_p=0.26) == {7, 2, 9}      # threshold 0.104
    assert kept(min_p=0.24) == {7, 2, 9, 0}   # threshold 0.096
    assert kept(min_p=0.1) == set(PROBS)


def test_filters_compose_after_temperature():
    # temperature 0.5 squares the odds: 0.4^2 : 0.3^2 : ... -> p(7) = 0.16 / 0.285 = 0.561
    assert kept(temperature=0.5, top_p=0.55) == {7}
    assert kept(temperature=0.5, top_p=0.57) == {7, 2}
    assert kept(top_k=3, top_p=0.9) == {7, 2, 9}       # renormalised after top-k: 0.47, 0.35, 0.18


def test_top_p_on_a_large_vocabulary_uses_the_exact_nucleus():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(150_000).astype(np.float32)   # a flat distribution: nucleus > shortlist
    candidates, _ = filter_candidates(logits, SamplerSettings().updated(top_p=0.5))
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    order = np.argsort(-p)
    expected = order[:np.searchsorted(np.cumsum(p[order]), 0.5) + 1]
    assert set(candidates.tolist()) == set(expected.tolist()) and len(candidates) > 1024


def test_temperature_zero_is_argmax():
    rng = np.random.default_rng(2)
    for _ in range(20):
        logits = rng.standard_normal(1000).astype(np.float32)
        assert Sampler(SamplerSettings(temperature=0.0))(logits, []) == int(np.argmax(logits))


def test_same_seed_same_tokens_and_distribution():
    logits = logits_of(PROBS)
    draws = [Sampler(SamplerSettings(seed=42))(logits, []) for _ in range(3)]
    assert len(set(draws)) == 1
    sampler = Sampler(SamplerSettings(seed=42))
    seq1 = [sampler(logits, []) for _ in range(50)]
    sampler = Sampler(SamplerSettings(seed=42))
    assert [sampler(logits, []) for _ in range(50)] == seq1
    sampler = Sampler(SamplerSettings(seed=7))
    counts = np.bincount([sampler(logits, []) for _ in range(20000)], minlength=10) / 20000
    for token, p in PROBS.items():
        assert abs(counts[token] - p) < 0.015


def test_penalties():
    logits = np.array([2.0, -2.0, 1.0, 0.5], np.float32)
    history = np.array([0, 1, 0], np.int64)
    out = apply_penalties(logits, history, SamplerSettings(repeat_penalty=2.0))
    assert np.allclose(out, [1.0, -4.0, 1.0, 0.5])              # divide positive, multiply negative
    out = apply_penalties(logits, history, SamplerSettings(presence_penalty=0.5, frequency_penalty=0.25))
    assert np.allclose(out, [2.0 - 0.5 - 0.5, -2.0 - 0.5 - 0.25, 1.0, 0.5])
    # the window: only the last repeat_last_n tokens count
    sampler = Sampler(SamplerSettings(temperature=0.0, repeat_penalty=100.0, repeat_last_n=1))
    assert sampler(logits, [0, 1]) == 0 and sampler(logits, [1, 0]) == 2


@pytest.mark.parametrize("option, value, message", [
    ("temperature", -0.1, r"temperature must be in \[0.0, inf\]"),
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("top_p", 0.0, r"top_p must be in \(0.0, 1.0\]"),
    ("top_p", 1.5, r"top_p must be in \(0.0, 1.0\]"),
    ("min_p", -0.1, r"min_p must be in \[0.0, 1.0\]"),
    ("top_k", -1, "top_k must be a non-negative integer"),
    ("top_k", 2.5, "top_k must be a non-negative integer"),
    ("repeat_penalty", 0.0, r"repeat_penalty must be in \(0.0, inf\]"),
    ("seed", -3, "seed must be a non-negative integer"),
    ("repeat_last_n", -1, "repeat_last_n must be a non-negative integer"),
])
def test_invalid_values_are_clear_errors(option, value, message):
    with pytest.raises(EngineError, match=message):
        SamplerSettings().updated(**{option: value})


def test_unknown_option():
    with pytest.raises(EngineError, match="unknown sampler option.*tempreature"):
        SamplerSettings().updated(tempreature=1.0)


def test_draws_follow_the_kept_distribution():
    """The draw (inverse transform over the candidates) matches their renormalised probabilities:
    top-k 3 of PROBS keeps 0.4, 0.3 and 0.15, drawn as 0.4 / 0.85 ...; plain sampling at
    temperature 2 over a 150k vocabulary (the path that skips the filters) draws two tokens with
    logits 0 and 2 ln 3 as 1 : 3, and the 149,998 others (logit -40) almost never."""
    sampler = Sampler(SamplerSettings(seed=3, top_k=3))
    counts = np.bincount([sampler(logits_of(PROBS), []) for _ in range(20000)], minlength=10) / 20000
    for token, p in {7: 0.4, 2: 0.3, 9: 0.15}.items():
        assert abs(counts[token] - p / 0.85) < 0.015
    assert counts[[0, 4]].sum() == 0
    logits = np.full(150_000, -40.0, np.float32)
    logits[[5, 149_999]] = [0.0, 2 * np.log(3.0)]
    sampler = Sampler(SamplerSettings(seed=4, temperature=2.0))
    draws = np.array([sampler(logits, []) for _ in range(1000)])
    assert np.isin(draws, [5, 149_999]).all() and abs((draws == 149_999).mean() - 0.75) < 0.05
