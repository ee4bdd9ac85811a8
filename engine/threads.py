"""How many threads a decode step uses: all cores on a quiet machine, fewer while other processes
keep cores busy.

Every parallel region of a decode step (a few hundred per token) ends when its slowest thread
does, and a thread the scheduler takes off its core waits a whole time slice to come back: with
one busy-loop process beside it on a 2-core machine, SmolLM2 decode at 2 threads fell to 0.4x
of its quiet speed, while 1 thread kept 0.6-0.7x (scripts/bench_contention.py). Which count is
best depends on what else runs, and that changes while the user waits.

So `ThreadTuner` watches two things. Before a generation's first decode step it looks at how much
CPU other processes used since it last looked (the load, or the last generation, and the prompt;
/proc/stat's busy time less this process's own): if half a core or more, it starts on the cores
they leave. Then it times every
decode step, in windows of a few steps, and tries other counts for a few steps each, keeping
the fastest: fewer threads when a window is markedly slower than the best seen at its count
(another process took a core), more when it runs on fewer cores and the others are gone, and
every other count now and then (at intervals that double while the answer stays the same) while
others run or it runs on fewer cores. (Trying more threads because steps got slower would only
meet the stalls again: on a machine with more busy threads than cores, 1-thread steps swing
between 12 and 24 ms as the scheduler shares the cores out.) On a quiet machine nothing is ever tried: it costs nothing there. It compares mean step
times, not medians: on a machine with more busy threads than cores, most 2-thread steps of
SmolLM2 took 16 ms (1 thread: 12-24), but a few took 1-2 s, a scheduler's stall that a median
hides and the user waits through; and a trial step that takes more than twice the current mean
ends that count's trial at once. Prompt processing uses the count in force: its parallel regions
are long, so a late thread costs it proportionally less.
"""
import os
import statistics
import time

from .kernels.compiler import available_threads, set_thread_count

SLOWER = 1.3          # a window this much slower than the best seen at its count means contention
HOPELESS = 2.0        # a trial step this much slower than the current count's mean ends the trial
OTHERS_BUSY = 0.5     # cores used by other processes that make it worth trying other counts
WINDOW = 8            # steps judged together
TRIAL = 4             # steps per count when trying the others
RECHECK = 64          # steps until the next look, doubling while the answer stays the same ...
RECHECK_MOST = 1024   # ... up to this many


class OtherProcesses:
    """The CPU time other processes used since the last look, in cores: the busy time of all
    CPUs in /proc/stat (steal included: other virtual machines on the host) less this process's
    own. Both count in clock ticks (10 ms), so a look less than SHORTEST after the last one
    gives the last answer again (None before the first). 0 where /proc/stat cannot be read."""

    SHORTEST = 0.25   # seconds: 2 cores x 25 ticks, so that a tick more or less is 0.04 cores

    def __init__(self):
        self.last = self._read()
        self.answer = None

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as stat:
                ticks = [int(field) for field in stat.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")   # less idle and iowait
        own = sum(os.times()[:2])
        return time.monotonic(), busy - own

    def cores(self) -> float | None:
        now, last = self._read(), self.last
        if now is None or last is None:
            return 0.0
        if now[0] - last[0] >= self.SHORTEST:
            self.last, self.answer = now, max(0.0, (now[1] - last[1]) / (now[0] - last[0]))
        return self.answer


class ThreadTuner:
    def __init__(self, threads: int | None = None, clock=time.perf_counter, others=None):
        """threads: a fixed count (the user's choice: never changed), or None to tune.
        clock and others (a callable giving other processes' cores) are for tests."""
        self.clock = clock
        self.others = others or OtherProcesses().cores
        self.fixed = threads is not None
        self.most = available_threads()
        self.current = threads or self.most
        self.counts = sorted({self.most, self.most - 1, self.most // 2, 1} - {0}, reverse=True)
        self.best = {}             # count -> the best mean step time of a window seen at it
        self.recent = []           # this count's latest step times
        self.trials = []           # counts still to try ...
        self.results = {}          # ... and the mean step times of those tried
        self.before_trials = self.current
        self.since_check = 0
        self.interval = RECHECK
        self.first_step = True
        self.chosen_beside_others = False   # the count in use was chosen while others were busy
        set_thread_count(self.current)      # what runs before the first decode step (logits()) uses it too

    def begin(self) -> None:
        """A generation starts: its prompt runs at the count in force, and its first decode steps
        look at the others first."""
        set_thread_count(self.current)
        self.first_step = True

    def step(self, run, *args):
        """run(*args) at the current thread count, timed; returns what it returns. The count is set
        at every step: numba keeps it per calling thread, and a server may decode from several."""
        if self.first_step and not self.fixed:   # until the others' use is known (SHORTEST)
            others = self.others()
            self.first_step = others is None
            if others is not None and others >= OTHERS_BUSY:
                self.current = max(1, self.most - round(others))
                self.chosen_beside_others = True
        set_thread_count(self.current)
        started = self.clock()
        result = run(*args)
        if not self.fixed and self.most > 1:
            self._record(self.clock() - started)
        return result

    def run(self, run, *args):
        """run(*args) at the current thread count, untimed (a step unlike a decode step: a batch
        that also prefills a prompt)."""
        set_thread_count(self.current)
        return run(*args)

    def _record(self, seconds: float) -> None:
        self.recent.append(seconds)
        if self.trials:
            hopeless = seconds > HOPELESS * self.results[self.before_trials]
            if len(self.recent) >= TRIAL or hopeless:   # this count's trial is done: the next one
                self.results[self.current] = statistics.fmean(self.recent)
                self.trials.pop(0)
                self._next_trial()
            return
        if len(self.recent) < WINDOW:
            return
        mean = statistics.fmean(self.recent)
        self.recent = []
        best = self.best.get(self.current)
        self.best[self.current] = mean if best is None else min(best, mean)
        self.since_check += WINDOW
        others_busy = (self.others() or 0.0) >= OTHERS_BUSY
        fewer = [c for c in self.counts if c < self.current]
        more = [c for c in self.counts if c > self.current]
        if self.since_check >= self.interval and (others_busy or more):
            self._start_trials(mean, fewer + more)          # now and then, every other count
        elif more and self.chosen_beside_others and not others_busy:
            self._start_trials(mean, more)                  # the others are gone
        elif fewer and best is not None and mean > SLOWER * best:
            self._start_trials(mean, fewer)                 # slower: someone took a core

    def _start_trials(self, current_mean: float, counts: list) -> None:
        self.before_trials, self.results = self.current, {self.current: current_mean}
        self.trials = counts
        self._next_trial()

    def _next_trial(self) -> None:
        self.recent = []
        if self.trials:
            self.current = self.trials[0]
            return
        # done: keep the fastest count; its timings so far become its new reference
        fastest = min(self.results, key=self.results.get)
        unchanged = fastest == self.before_trials
        self.interval = min(2 * self.interval, RECHECK_MOST) if unchanged else RECHECK
        self.best[fastest] = self.results[fastest]
        self.current, self.since_check = fastest, 0
        self.chosen_beside_others = (self.others() or 0.0) >= OTHERS_BUSY
