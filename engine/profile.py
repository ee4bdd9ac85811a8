"""Where a token's time goes: per-kernel timings of the forward pass (`generate --profile`).

With profiling on, each entry of the forward pass's kernel table (model.Kernels) is wrapped by
`Profile.timed` to time its calls (the numba kernels are synchronous, so wall time per call is
the kernel's time) and to count the weight bytes it read. Rows are kept apart for prompt
processing and for generation, because the first is compute-bound and the second memory-bound.
"""
import time
from collections import defaultdict


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
