"""How many threads a decode step uses: all cores on a quiet machine, fewer while other processes
keep cores busy.

Every parallel region of a decode step (a few hundred per token) ends when its slowest thread
does, and a thread the scheduler takes off its core waits a whole time slice to come back: with
one busy-loop process beside it on a 2-core machine, SmolLM2 decode at 2 threads fell to a third
of its quiet speed, while 1 thread kept three quarters (scripts/bench_contention.py). Which count
is best depends on what else runs, and that changes while the user waits.

So `ThreadTuner` times every decode step. While the steps at the current count stay near the
best it has seen at that count, it changes nothing: a quiet machine never pays for the tuning.
When they are markedly slower (another process took a core), it tries each other count for a
few steps and keeps the fastest; and while it runs below all cores, it tries all cores again
now and then, to come back when the load is gone. Prompt processing uses the count in force:
its parallel regions are long, so a late thread costs it proportionally less.
"""
import statistics
import time

from .kernels.compiler import available_threads, set_thread_count

SLOWER = 1.3          # steps this much slower than the best seen at this count mean contention
WINDOW = 8            # steps judged together (a median: one slow step is not a trend)
TRIAL = 4             # steps per count when trying the others
RECHECK = 64          # steps between tries of all cores while running on fewer


class ThreadTuner:
    def __init__(self, threads: int | None = None, clock=time.perf_counter):
        """threads: a fixed count (the user's choice: never changed), or None to tune."""
        self.clock = clock
        self.fixed = threads is not None
        self.most = available_threads()
        self.current = threads or self.most
        self.counts = sorted({self.most, self.most - 1, self.most // 2, 1} - {0}, reverse=True)
        self.best = {}             # count -> the best median of WINDOW steps seen at it
        self.recent = []           # this count's latest step times
        self.trials = []           # counts still to try, and their medians so far
        self.results = {}
        self.since_check = 0

    def step(self, run, *args):
        """run(*args) at the current thread count, timed; returns what it returns. The count is set
        at every step: numba keeps it per calling thread, and a server may decode from several."""
        set_thread_count(self.current)
        started = self.clock()
        result = run(*args)
        if not self.fixed and self.most > 1:
            self._record(self.clock() - started)
        return result

    def _use(self, count: int) -> None:
        self.current, self.recent = count, []

    def _record(self, seconds: float) -> None:
        self.recent.append(seconds)
        if self.trials:
            if len(self.recent) >= TRIAL:              # this count's trial is done: the next one
                self.results[self.current] = statistics.median(self.recent)
                self.trials.pop(0)
                if self.trials:
                    self._use(self.trials[0])
                else:
                    self._settle()
            return
        if len(self.recent) < WINDOW:
            return
        median = statistics.median(self.recent)
        self.recent = []
        best = self.best.get(self.current)
        self.best[self.current] = median if best is None else min(best, median)
        self.since_check += WINDOW
        if best is not None and median > SLOWER * best:
            self._try([c for c in self.counts if c != self.current], median)
        elif self.current < self.most and self.since_check >= RECHECK:
            self._try([self.most], median)

    def _try(self, counts: list, current_median: float) -> None:
        self.results = {self.current: current_median}
        self.trials = list(counts)
        self.since_check = 0
        self._use(self.trials[0])

    def _settle(self) -> None:
        """Keep the fastest count tried; its timings so far become its new reference."""
        fastest = min(self.results, key=self.results.get)
        self.best[fastest] = self.results[fastest]
        self._use(fastest)
