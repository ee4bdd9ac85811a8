"""The thread tuner on a simulated machine: step times that depend on the thread count and on
how many cores another process keeps busy (the clock is the simulation's, not the wall's)."""
import os
import sys

import pytest

from engine.threads import RECHECK, OtherProcesses, ThreadTuner


class Machine:
    """Two cores. A decode step takes 10 ms at 2 threads and 16 at 1 when quiet; with a busy
    process beside it, 2 threads take 30 ms (a thread waits for its descheduled partner) and 1
    thread 17. Each step advances the clock by its time, with a little jitter."""

    def __init__(self):
        self.now, self.busy, self.threads, self.used = 0.0, False, 2, []

    def step_seconds(self):
        quiet, loaded = {2: 0.010, 1: 0.016}, {2: 0.030, 1: 0.017}
        jitter = 1 + 0.05 * ((len(self.used) * 7) % 5 - 2) / 2   # +-5 %
        return (loaded if self.busy else quiet)[self.threads] * jitter

    def run(self):
        self.used.append(self.threads)
        self.now += self.step_seconds()


@pytest.fixture
def machine(monkeypatch):
    machine = Machine()
    threads = sys.modules["engine.threads"]
    monkeypatch.setattr(threads, "available_threads", lambda: 2)
    monkeypatch.setattr(threads, "set_thread_count", lambda n: setattr(machine, "threads", n))
    return machine


def tuner_for(machine, threads=None):
    return ThreadTuner(threads, clock=lambda: machine.now, others=lambda: 1.0 if machine.busy else 0.02)


def decode(tuner, machine, steps):
    for _ in range(steps):
        tuner.step(machine.run)
    return machine.used[-steps:]


def test_a_quiet_machine_keeps_all_cores_and_never_tries_fewer(machine):
    assert set(decode(tuner_for(machine), machine, 500)) == {2}


def test_a_core_taken_while_decoding_moves_it_to_one_thread_and_back(machine):
    tuner = tuner_for(machine)
    decode(tuner, machine, 40)
    machine.busy = True
    used = decode(tuner, machine, 400)
    assert used[-200:].count(1) >= 190         # settled on 1 thread, with a look at 2 now and then
    assert used[:40].count(2) <= 24            # found within a few windows
    machine.busy = False
    used = decode(tuner, machine, 2 * RECHECK + 40)
    assert set(used[-30:]) == {2}              # back to both cores once the load is gone


def test_a_machine_busy_from_the_start_decodes_on_one_thread(machine):
    """No change in step time to notice: the other process's CPU use says it is there."""
    machine.busy = True
    used = decode(tuner_for(machine), machine, 300)
    assert used[0] == 1 and used.count(1) >= 290


def test_fewer_threads_kept_on_merit_are_not_tried_again_at_every_window(machine):
    """Were 1 thread faster even on a quiet machine, the tuner, once there, would look at 2
    again only at its doubling intervals, not each time it sees the others gone."""
    machine.step_seconds = lambda: 0.010 if machine.threads == 1 else 0.014
    tuner = tuner_for(machine)
    tuner.current = 1
    used = decode(tuner, machine, 600)
    assert used.count(2) <= 16                 # 3 looks of 4 steps (after 64, 192 and 448 steps)


def test_a_fixed_thread_count_is_never_changed(machine):
    tuner = tuner_for(machine, 1)
    machine.busy = True
    assert set(decode(tuner, machine, 200)) == {1}


def test_other_processes_cpu_use_is_measured():
    """A busy-loop process beside this one shows as about one core of others' use."""
    import subprocess
    import time
    others = OtherProcesses()
    assert others.last is not None, "no /proc/stat: the tuner would never see other processes"
    time.sleep(0.3)
    quiet = others.cores()
    assert others.cores() == quiet             # a look sooner than SHORTEST gives the last answer
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        others.cores()
        time.sleep(0.5)
        busy = others.cores()
    finally:
        loop.kill()
        loop.wait()
    # (on a machine already saturated by others, the loop cannot add a whole core)
    assert min(quiet + 0.6, os.cpu_count() - 0.3) <= busy <= quiet + 1.3, (quiet, busy)


def test_a_fixed_count_holds_for_the_prompt_too(loaded):
    """--threads N applies to prompt processing and logits(), not only to decode steps."""
    import numba
    from engine.kernels.compiler import available_threads
    from engine.threads import ThreadTuner as Tuner
    llm = loaded("llama-f32")
    seen = []

    def prefill(*args, original=llm.model.prefill, **kwargs):
        seen.append(numba.get_num_threads())
        return original(*args, **kwargs)
    saved = llm.threads
    llm.model.prefill = prefill
    try:
        llm.threads = Tuner(1)
        assert numba.get_num_threads() == 1        # from the moment it is made (logits() runs now)
        numba.set_num_threads(available_threads())  # as if something else had changed it since
        llm.generate("Hi", max_tokens=2, temperature=0)
        assert seen == [1]
    finally:
        del llm.model.prefill
        llm.threads = saved
        numba.set_num_threads(available_threads())
