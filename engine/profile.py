"""Where a token's time goes: per-kernel timings of the forward pass (`generate --profile`),
and where non-finite values first appear.

The forward pass calls its kernels through a `Kernels` table. Normally the table holds the
kernels themselves; with profiling on, each entry is wrapped to time its calls (the numba
kernels are synchronous, so wall time per call is the kernel's time) and to count the weight
bytes it read. Rows are kept apart for prompt processing and for generation, because the
first is compute-bound and the second memory-bound. With checking on (only to diagnose logits
that are NaN or infinite), each entry checks its output and names the first that is not finite.
"""
import time
from collections import defaultdict

import numpy as np

from .kernels.formats import Weight, embedding_rows, matmul
from .kernels.ops import rmsnorm, rope, swiglu


class NonFinite(Exception):
    """A kernel's output holds NaN or infinity; the message says which kernel and weight."""


class Kernels:
    """The kernels the forward pass calls, by role (matmuls are also told which weight they read)."""

    def __init__(self, cache, weight_names: dict | None = None, profile: "Profile | None" = None,
                 check: bool = False):
        self.embedding_rows, self.rmsnorm, self.rope, self.swiglu = embedding_rows, rmsnorm, rope, swiglu
        self.matmul, self.store, self.attend = matmul, cache.store, cache.attend
        self.checking = check
        if check:
            self._check_outputs(weight_names or {})
        if profile is None:
            return
        names = weight_names or {}

        def weight_label(weight: Weight, *_, **__):
            return f"matmul {names.get(id(weight), 'other')} ({weight.format.name})", weight.nbytes
        self.matmul = profile.timed(matmul, weight_label)
        self.embedding_rows = profile.timed(embedding_rows, lambda *a: ("embedding lookup", 0))
        self.rmsnorm = profile.timed(rmsnorm, lambda *a: ("rmsnorm", 0))
        self.rope = profile.timed(rope, lambda *a: ("rope", 0))
        self.swiglu = profile.timed(swiglu, lambda *a: ("swiglu", 0))
        self.store = profile.timed(cache.store, lambda *a: (f"kv cache store ({cache.kind})", 0))
        self.attend = profile.timed(cache.attend, lambda *a: (f"attention ({cache.kind})", 0))


    def _check_outputs(self, names: dict) -> None:
        def checked(kernel, output: int, label):
            def call(*args, **kwargs):
                kernel(*args, **kwargs)
                if not np.isfinite(args[output]).all():
                    raise NonFinite(label(*args))
            return call

        def weight(array):
            return names.get(id(array), "a weight")
        self.embedding_rows = checked(embedding_rows, 2, lambda w, *_: f"the embedding rows of {weight(w)}")
        self.rmsnorm = checked(rmsnorm, 3, lambda x, w, *_: f"the RMSNorm with {weight(w)}")
        self.matmul = checked(matmul, 2, lambda w, *_: f"the product with {weight(w)}")
        self.rope = checked(rope, 0, lambda *_: "the rotary embedding")
        self.swiglu = checked(swiglu, 2, lambda *_: "SwiGLU")
        self.attend = checked(self.attend, 3, lambda layer, *_: f"the attention of layer {layer}")


class Profile:
    """Seconds, calls and bytes per (phase, kernel label), and the wall time of each phase."""

    def __init__(self):
        self.phase = "generation"
        self.rows = defaultdict(lambda: [0.0, 0, 0])
        self.wall = defaultdict(float)
        self.tokens = defaultdict(int)

    def timed(self, kernel, label):
        def call(*args, **kwargs):
            started = time.perf_counter()
            result = kernel(*args, **kwargs)
            seconds = time.perf_counter() - started
            name, nbytes = label(*args, **kwargs)
            row = self.rows[self.phase, name]
            row[0] += seconds
            row[1] += 1
            row[2] += nbytes
            return result
        return call

    def forward_done(self, tokens: int, seconds: float) -> None:
        self.wall[self.phase] += seconds
        self.tokens[self.phase] += tokens

    def report(self) -> str:
        lines = []
        for phase in ("prompt", "generation"):
            wall, tokens = self.wall[phase], self.tokens[phase]
            if not tokens:
                continue
            lines.append(f"{phase}: {tokens} tokens in {wall:.3f} s ({tokens / wall:.1f} tokens/s)")
            lines.append(f"  {'kernel':<34} {'share':>6} {'ms/token':>9} {'calls':>7} {'GB/s':>7}")
            rows = sorted(((name, r) for (p, name), r in self.rows.items() if p == phase), key=lambda x: -x[1][0])
            accounted = 0.0
            for name, (seconds, calls, nbytes) in rows:
                accounted += seconds
                rate = f"{nbytes / seconds / 1e9:7.2f}" if nbytes else f"{'':>7}"
                lines.append(f"  {name:<34} {seconds / wall:>6.1%} {seconds / tokens * 1e3:>9.3f} {calls:>7} {rate}")
            rest = wall - accounted
            lines.append(f"  {'(python, biases, residual adds)':<34} {rest / wall:>6.1%} {rest / tokens * 1e3:>9.3f}")
        return "\n".join(lines)
