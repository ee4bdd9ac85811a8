"""The sampler: penalties, then temperature, top-k, top-p and min-p, then a draw from its own RNG.

The order follows transformers' logits processors: penalties on the raw logits, temperature,
then the three filters on the tempered distribution. Temperature 0 is greedy (argmax). The
sampler owns a seeded numpy Generator, so the same seed gives the same tokens.
"""
import math
from dataclasses import dataclass, fields, replace

import numpy as np

from .errors import EngineError

# Candidates examined before falling back to a full sort for top-p: the nucleus of a trained
# model's distribution is almost always far smaller.
TOP_P_CANDIDATES = 1024


# Ollama's documented defaults (its Modelfile reference, "Valid Parameters and Values"): what a
# setting is when neither the model (generation_config.json, GGUF metadata), nor Ollama's params
# layer, nor the user sets it. Plain sampling at temperature 1 drifts into gibberish on small models.
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 64}


@dataclass(frozen=True)
class SamplerSettings:
    """Neutral values (plain sampling at temperature 1, no filter, no penalty); what a generation
    uses is layered over them (`layered_settings`)."""
    temperature: float = 1.0
    top_k: int = 0                 # 0: off
    top_p: float = 1.0             # 1: off
    min_p: float = 0.0             # 0: off
    repeat_penalty: float = 1.0    # 1: off; >1 discourages tokens seen in the last repeat_last_n
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def updated(self, **options) -> "SamplerSettings":
        """A copy with the options that are not None, validated."""
        known = {f.name for f in fields(self)}
        unknown = set(options) - known
        if unknown:
            raise EngineError(f"unknown sampler option(s): {', '.join(sorted(unknown))}")
        settings = replace(self, **{k: v for k, v in options.items() if v is not None})
        settings.validate()
        return settings

    def validate(self) -> None:
        def number(name, low, high, low_open=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise EngineError(f"{name} must be a finite number, got {value!r}")
            if value < low or value > high or (low_open and value == low):
                bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
                raise EngineError(f"{name} must be in {bound}, got {value}")

        def integer(name, allow_none=False):
            value = getattr(self, name)
            if allow_none and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise EngineError(f"{name} must be a non-negative integer, got {value!r}")

        number("temperature", 0.0, math.inf)
        number("top_p", 0.0, 1.0, low_open=True)
        number("min_p", 0.0, 1.0)
        number("repeat_penalty", 0.0, math.inf, low_open=True)
        number("presence_penalty", -math.inf, math.inf)
        number("frequency_penalty", -math.inf, math.inf)
        integer("top_k")
        integer("repeat_last_n")
        integer("seed", allow_none=True)


def layered_settings(layers) -> tuple[SamplerSettings, dict]:
    """Settings from (source, options) layers, each overriding the ones before it (None values
    are skipped), and the source of every setting's value ("neutral" where no layer set it)."""
    settings, sources = SamplerSettings(), {f.name: "neutral" for f in fields(SamplerSettings)}
    for source, options in layers:
        given = {k: v for k, v in (options or {}).items() if v is not None}
        try:
            settings = settings.updated(**given)
        except EngineError as e:   # say which layer: a model file's bad value is not the user's
            raise EngineError(f"{e} (from {source})") from None
        sources.update(dict.fromkeys(given, source))
    return settings, sources


def describe(settings: SamplerSettings, sources: dict) -> list[str]:
    """One line per setting: its value and where it came from (for --verbose)."""
    return [f"{f.name:<18}{'random' if getattr(settings, f.name) is None else getattr(settings, f.name)!s:<8}"
            f"{sources[f.name]}" for f in fields(settings)]


def apply_penalties(logits: np.ndarray, recent: np.ndarray, s: SamplerSettings) -> np.ndarray:
    """Repeat (multiplicative, as in llama.cpp and transformers), presence and frequency penalties."""
    if len(recent) == 0 or (s.repeat_penalty == 1.0 and s.presence_penalty == 0 and s.frequency_penalty == 0):
        return logits
    logits = logits.copy()
    tokens, counts = np.unique(recent, return_counts=True)
    seen = logits[tokens]
    if s.repeat_penalty != 1.0:
        seen = np.where(seen > 0, seen / s.repeat_penalty, seen * s.repeat_penalty)
    logits[tokens] = seen - s.presence_penalty - s.frequency_penalty * counts
    return logits


def softmax_weights(logits: np.ndarray, temperature: float) -> np.ndarray:
    """exp((logits - max) / temperature) in float32: the softmax before its division by the sum
    (the best token's weight is 1). One pass of each kind over the vocabulary, in place."""
    weights = np.asarray(logits, dtype=np.float32) - np.max(logits)
    weights *= np.float32(1.0 / temperature)
    return np.exp(weights, out=weights)


def filter_candidates(logits: np.ndarray, s: SamplerSettings) -> tuple[np.ndarray, np.ndarray]:
    """Token ids kept by top-k, top-p and min-p (temperature applied), and their probabilities.

    This runs for every generated token over 150k logits, so it makes few passes over the
    whole vocabulary, in float32: the exponentials, their sum (accumulated in float64: top-p
    and min-p see true probabilities), and for top-k or top-p a partial sort that picks a
    shortlist (the top-k, or for top-p alone the best TOP_P_CANDIDATES, widened 16-fold, up to
    the whole vocabulary, while their mass does not reach top_p). Only the shortlist is sorted.
    """
    x = np.asarray(logits, dtype=np.float32)
    vocab = len(x)
    weights = softmax_weights(x, s.temperature)
    total = weights.sum(dtype=np.float64)

    def best(n):   # ids of the n largest logits, in no order
        return np.argpartition(x, vocab - n)[vocab - n:] if n < vocab else np.arange(vocab)
    k = s.top_k if 0 < s.top_k < vocab else 0
    candidates = best(k or (TOP_P_CANDIDATES if s.top_p < 1.0 else vocab))
    probs = weights[candidates] / total
    if k:
        probs /= probs.sum()   # renormalised after top-k, as transformers does
    if s.top_p < 1.0:
        while not k and probs.sum() < s.top_p:   # the nucleus is wider than the shortlist: widen it
            candidates = best(min(vocab, 16 * len(candidates)))
            probs = weights[candidates] / total
        order = np.argsort(-probs)   # introsort: 3x faster than a stable sort at 152k
        candidates, probs = candidates[order], probs[order]
        # keep the smallest prefix whose mass reaches top_p
        keep = int(np.searchsorted(np.cumsum(probs), s.top_p)) + 1
        candidates, probs = candidates[:keep], probs[:keep]
    if s.min_p > 0.0:
        keep = probs >= s.min_p * probs.max()
        candidates, probs = candidates[keep], probs[keep]
    return candidates, probs / probs.sum()


class Sampler:
    def __init__(self, settings: SamplerSettings):
        settings.validate()
        self.settings = settings
        self.seed = settings.seed if settings.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        s = self.settings
        recent = np.asarray(history[-s.repeat_last_n:] if s.repeat_last_n else [], dtype=np.int64)
        logits = apply_penalties(logits, recent, s)
        if s.temperature == 0.0:
            return int(np.argmax(logits))
        if s.top_k == 0 and s.top_p == 1.0 and s.min_p == 0.0:   # plain sampling: every token
            candidates, weights = None, softmax_weights(logits, s.temperature)
        else:
            candidates, weights = filter_candidates(logits, s)
        # inverse transform sampling (numpy's choice(p=...) checks and copies p on every call)
        cumulative = np.cumsum(weights, dtype=np.float64)
        drawn = min(int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right")),
                    len(weights) - 1)
        return drawn if candidates is None else int(candidates[drawn])
