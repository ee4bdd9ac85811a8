"""Batched decoding: several generations of one model share each forward pass.

A `Batcher` owns a loaded model (an `LLM` whose KV cache has several slots) and one thread that
runs it. Each step is one forward pass over one token of every generation that is decoding,
each in its own KV cache slot at its own position, so the weights are read once per step for
all of them; it also carries the next chunk of at most one prompt that is still being
prefilled (the oldest), so a new request joins without stalling the others for more than one
chunk. Every kernel treats rows independently: a generation's tokens are the same alone or in
a batch (tests/test_server.py checks it at temperature 0).

Requests wait in a bounded queue and get slots in arrival order; a full queue is refused at
once (`QueueFull`). A free slot is chosen by the longest prefix its cache shares with the new
prompt, so a chat's next turn prefills only what is new. `Job.cancel()` (a client that went
away) ends a generation at the next step and frees its slot.
"""
import collections
import threading
import time
from dataclasses import dataclass

import numpy as np

from .errors import EngineError
from .generation import Request, Sequence, common_prefix

RATE_WINDOW = 10.0        # seconds over which tokens_per_second counts
PREFILL_CHUNK = 32       # prompt tokens per step beside the decoding rows: a step's length bounds their wait
DEFAULT_MAX_QUEUE = 512  # requests waiting for a slot (Ollama's OLLAMA_MAX_QUEUE)


class QueueFull(EngineError):
    """Every slot is busy and the queue holds as many requests as it may."""


class Job:
    """A request inside a Batcher. Its events go to `deliver` (default: an internal queue that
    iterating the job reads): ("piece", text) per piece of text, then ("done", stats) or
    ("error", EngineError)."""

    def __init__(self, request: Request, deliver=None):
        self.request = request
        self.cancelled = False
        self._events = collections.deque()
        self._ready = threading.Semaphore(0)
        self.deliver = deliver or self._put

    def _put(self, event: tuple) -> None:
        self._events.append(event)
        self._ready.release()

    def cancel(self) -> None:
        """End the generation at the next step (or drop it from the queue); nothing more is delivered."""
        self.cancelled = True

    def __iter__(self):
        """The text pieces, blocking between them; an error is raised. Leaving early cancels."""
        try:
            while True:
                self._ready.acquire()
                kind, value = self._events.popleft()
                if kind == "piece":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            self.cancel()


@dataclass
class Running:
    """A job in a slot: the prompt tokens it still has to prefill, then its decoding sequence."""
    job: Job
    slot: int
    sequence: Sequence
    todo: np.ndarray          # the prompt's last ids, not yet in the cache
    started: float
    prompt_done: float = 0.0


class Batcher:
    """Runs the jobs submitted for one model, up to one per KV cache slot at a time."""

    def __init__(self, llm, max_queue: int = DEFAULT_MAX_QUEUE):
        self.llm = llm
        self.model = llm.model
        self.max_queue = max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[int, Running] = {}   # by slot
        self.changed = threading.Condition()
        self.closing = False
        self.recent = collections.deque()   # (time, tokens sampled) of the steps in the last RATE_WINDOW s
        self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self.thread.start()

    # --- the callers' side ---------------------------------------------------------------------
    def submit(self, request: Request, deliver=None) -> Job:
        """Queue a request (checked by LLM.request); raises QueueFull when the queue is full."""
        job = Job(request, deliver)
        with self.changed:
            if self.closing:
                raise EngineError("the model is being unloaded")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"server busy: {len(self.running)} generations running and {len(self.waiting)} "
                                f"waiting; try again later")
            self.waiting.append(job)
            self.changed.notify()
        return job

    def busy(self) -> tuple[int, int]:
        """(generations running, requests waiting)."""
        with self.changed:
            return len(self.running), len(self.waiting)

    def tokens_per_second(self) -> float:
        """Tokens generated per second over the last RATE_WINDOW seconds."""
        cutoff = time.monotonic() - RATE_WINDOW
        with self.changed:
            return sum(n for t, n in self.recent if t >= cutoff) / RATE_WINDOW

    def close(self, wait: bool = True) -> None:
        """Finish what is running and waiting, then stop the thread."""
        with self.changed:
            self.closing = True
            self.changed.notify()
        if wait:
            self.thread.join()

    # --- the batcher's thread ------------------------------------------------------------------
    def _loop(self) -> None:
        self.llm.threads.begin()   # numba's thread count is per calling thread
        while True:
            with self.changed:
                self._drop_cancelled()
                self._admit()
                if not self.running:
                    if self.closing and not self.waiting:
                        return
                    self.changed.wait()
                    continue
            self._step()

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.waiting if j.cancelled]:
            self.waiting.remove(job)
        for slot in [s for s, r in self.running.items() if r.job.cancelled]:
            del self.running[slot]

    def _admit(self) -> None:
        """Give free slots to waiting jobs, oldest first, each to the free slot whose cache holds
        the longest prefix of its prompt (the last prompt token is always run again: its logits)."""
        free = [s for s in range(self.model.slots) if s not in self.running]
        while free and self.waiting:
            job = self.waiting.popleft()
            ids = job.request.prompt_ids
            shared = {s: common_prefix(self.model.slot_ids[s], ids[:-1]) for s in free}
            slot = max(free, key=lambda s: (shared[s], -s))
            free.remove(slot)
            sequence = Sequence(self.llm.tokenizer, job.request, self.llm.eos_ids, self.model.context_length)
            todo = np.asarray(ids[shared[slot]:], dtype=np.int64)
            job.request.stats.prompt_tokens = len(todo)
            self.running[slot] = Running(job, slot, sequence, todo, time.perf_counter())

    def _step(self) -> None:
        """One forward pass: a token of every decoding sequence, and the next chunk of the oldest
        prompt still being prefilled; then a token sampled for each sequence that has logits."""
        rows_ids, rows_slots, rows_positions, with_logits = [], [], [], []
        decoding = [r for r in self.running.values() if not len(r.todo)]
        for r in decoding:
            rows_ids.append(r.sequence.history[-1])
            rows_slots.append(r.slot)
            rows_positions.append(len(r.sequence.history) - 1)
            with_logits.append(r)
        prefilling = min((r for r in self.running.values() if len(r.todo)), key=lambda r: r.started, default=None)
        if prefilling is not None:
            chunk = prefilling.todo[:min(PREFILL_CHUNK, self.model.batch_size - len(decoding))]
            first = len(prefilling.sequence.history) - len(prefilling.todo)   # (history: the prompt, still)
            rows_ids.extend(chunk.tolist())
            rows_slots.extend([prefilling.slot] * len(chunk))
            rows_positions.extend(range(first, first + len(chunk)))
            prefilling.todo = prefilling.todo[len(chunk):]
            if not len(prefilling.todo):
                with_logits.append(prefilling)
        logit_rows = list(range(len(decoding))) + ([len(rows_ids) - 1] if len(with_logits) > len(decoding) else [])
        step = (np.asarray(rows_ids, np.int64), np.asarray(rows_slots, np.int64),
                np.asarray(rows_positions, np.int64), np.asarray(logit_rows, np.int64))
        participants = decoding + ([prefilling] if prefilling is not None else [])
        try:
            if prefilling is None:
                logits = self.llm.threads.step(self.model.step, *step)   # decode steps tune the thread count
            else:
                logits = self.llm.threads.run(self.model.step, *step)
        except Exception as error:   # a damaged model: every generation in the pass ends with the error
            error = error if isinstance(error, EngineError) else EngineError(f"the forward pass failed: {error}")
            with self.changed:
                for r in participants:
                    self.model.slot_ids[r.slot].clear()
                    self.running.pop(r.slot, None)
                    r.job.deliver(("error", error))
            return
        now = time.perf_counter()
        with self.changed:
            self.recent.append((time.monotonic(), len(with_logits)))
            while self.recent[0][0] < self.recent[-1][0] - RATE_WINDOW:
                self.recent.popleft()
        if prefilling is not None and not len(prefilling.todo):
            prefilling.prompt_done = now
            prefilling.sequence.stats.prompt_seconds = now - prefilling.started
        for row, r in enumerate(with_logits):
            sequence = r.sequence
            if r.job.cancelled:
                continue
            if not sequence.done:   # (a request for no tokens at all is done before its first)
                piece = sequence.add(r.job.request.sampler(logits[row], sequence.history))
                if piece:
                    r.job.deliver(("piece", piece))
            if sequence.done:
                tail = sequence.finish()
                if tail:
                    r.job.deliver(("piece", tail))
                sequence.stats.generate_seconds = time.perf_counter() - r.prompt_done
                with self.changed:
                    self.running.pop(r.slot, None)
                self.llm.last_stats = sequence.stats   # (the last one to finish, as LLM.generate's)
                r.job.deliver(("done", sequence.stats))
