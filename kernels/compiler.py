"""How every kernel is compiled: numba's settings, set before any kernel module defines a kernel.

The kernels (this folder, installed as `engine.kernels`) know nothing of models, files or
tokenizers:
- `formats`: the table of weight storage formats, each with the kernels that read it;
- `quant`: the blocks of 32 (Q8_0, Q4_0, Q4_1) and their integer kernels;
- `kquants`: the k-quants of GGUF files (Q4_K, Q6_K) and their kernels;
- `layout`: how block formats are repacked at load (64 rows side by side, planes and quads);
- `bits`: LLVM intrinsics numba lacks (half floats, prefetch, stack arrays, byte dot products);
- `ops`: RMSNorm, rotary embeddings, SwiGLU;
- `attention`: the KV cache and causal grouped-query attention;
- `scan`: where each of a run of length-prefixed records starts (the GGUF reader's strings).
Each of them imports this module first. The folder has no `__init__.py` on purpose: Hugging
Face's `kernels` package (a dependency of transformers) has the same top-level name, and a
regular package here would shadow it wherever the repository's root is on sys.path.

It also keeps the log of what numba compiles (COMPILE_LOG, which the command line shows) and
compiles a model's kernels ahead of its first forward pass, in two processes on a machine's first
run (recorded_calls, CompileAhead; the README's "First run" has the measurements).

Importing this module applies numba's settings (`configure`, below). That is done at import,
not later, because numba fixes a kernel's cache directory when the kernel is defined.

It turns on LLVM's SLP vectorizer (numba's NUMBA_SLP_VECTORIZE, off by default),
unless the user set that variable: it is what turns the block-wise integer dot products and
the int4 unpacking into SIMD code. numba reads the setting at every compilation, so it is set
on numba's config object directly and works whatever was imported first. All kernels must be
compiled with it (cache=True would otherwise keep a slow copy), hence here, not per kernel.

On CPUs with AVX-512 it also lets LLVM use 512-bit vectors: LLVM's tuning for Intel server
cores prefers 256-bit ones ("prefer-256-bit"), which halves the work per instruction of the
integer GEMVs. numba's cache key includes the CPU features, so cached kernels never mix the two
settings.

Cache: numba's cache=True checks only the file a kernel is written in, not the files it calls
into: after an edit of bits.py (the dot-product intrinsics) or of an inlined helper in another
module, numba would keep loading the kernels compiled from the old code. So the cache goes in a
directory named after a digest of every source file of this package (NUMBA_CACHE_DIR, or this
package's __pycache__, or ~/.cache/engine when that is not writable): any edit starts a fresh
one, and the in-tree default removes the stale ones. Hashing the sources takes well under 1 ms.

Threads: numba's OpenMP layer is preferred (then tbb, then workqueue), unless the user chose
one: workqueue cannot keep its workers hot between the many small parallel regions of a token.
OpenMP's default wait policy spins about 10 ms after a parallel region and then sleeps, so an
idle engine uses no CPU; OMP_WAIT_POLICY=active keeps a core spinning forever for nothing
measurable. (Measurements in the README's kernel notes.)
"""
import base64
import hashlib
import os
import pickle
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from numba.core import config as _numba_config
from numba.core import event as _numba_event


def _wide_vector_features():
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features()
    if not features.get("avx512f"):
        return None
    return features.flatten() + ",-prefer-256-bit"


def _software_prefetch_helps() -> bool:
    """Whether the GEMVs issue prefetch hints (kernels/layout.prefetch_ahead): on Intel they help
    (the hardware prefetchers stop at every 4 KiB page), on AMD Zen they cost 10-20 % (its
    prefetchers do better alone; measured in the README's kernel notes). Kernels that measured
    a gain everywhere prefetch regardless (`always`). Decided by the host CPU's name, which
    numba's cache key includes, so a cached kernel matches the machine."""
    import llvmlite.binding as llvm
    return not llvm.get_host_cpu_name().startswith("znver")


SOFTWARE_PREFETCH = _software_prefetch_helps()


_HERE = os.path.dirname(os.path.abspath(__file__))


def _sources_digest(here: str = _HERE) -> str:
    digest = hashlib.sha1()
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as source:
                digest.update(name.encode() + b"\0" + source.read())
    return digest.hexdigest()[:16]


def _use_cache_keyed_by_sources() -> None:
    import shutil
    base = os.environ.get("NUMBA_CACHE_DIR")
    in_tree = not base
    if in_tree:
        base = os.path.join(_HERE, "__pycache__")
        if not os.access(_HERE, os.W_OK):
            in_tree = False
            base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "engine")
    current = "numba-" + _sources_digest()
    if in_tree and os.path.isdir(base):
        for stale in os.listdir(base):
            if stale.startswith("numba-") and stale != current:
                shutil.rmtree(os.path.join(base, stale), ignore_errors=True)
    _numba_config.CACHE_DIR = os.path.join(base, current)


def configure() -> None:
    """numba's settings for every kernel of this package, each unless the user set it: the
    threading layer, the SLP vectorizer, wide vectors on AVX-512, the cache directory. Set on
    numba's config object as well as in the environment, so that they hold whatever was
    imported first."""
    if "NUMBA_THREADING_LAYER" not in os.environ and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
        os.environ["NUMBA_THREADING_LAYER_PRIORITY"] = "omp tbb workqueue"
        _numba_config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    if "NUMBA_SLP_VECTORIZE" not in os.environ:
        os.environ["NUMBA_SLP_VECTORIZE"] = "1"
        _numba_config.SLP_VECTORIZE = 1
    if "NUMBA_CPU_FEATURES" not in os.environ and "NUMBA_CPU_NAME" not in os.environ:
        features = _wide_vector_features()
        if features:
            os.environ["NUMBA_CPU_FEATURES"] = features
            _numba_config.CPU_FEATURES = features
    _use_cache_keyed_by_sources()


configure()


def available_threads() -> int:
    """The most threads a parallel kernel can use (numba's pool: the usable cores, or NUMBA_NUM_THREADS)."""
    return _numba_config.NUMBA_NUM_THREADS


def set_thread_count(threads: int) -> None:
    """Threads for the parallel kernels launched from the calling thread from now on."""
    import numba
    numba.set_num_threads(threads)


class CompileLog(_numba_event.Listener):
    """The kernels compiled for this process, as they compile (numba reports real compilations
    only, not kernels loaded from its cache): in this process, or in a helper process that
    CompileAhead started. `compiled`: (name, seconds) in order, each with the helpers it inlines
    or calls (which numba reports nested inside it); `seconds`: wall time this process spent
    compiling or waiting for its helper; `current`: the kernels being compiled now. Each callable
    in `watchers` is called with the log at every kernel's start and end (the command line's
    progress line is one), from this thread or the helper's reader."""

    def __init__(self):
        self.compiled = []        # (name, seconds), in order
        self.by_helper = 0        # how many of them the helper process compiled
        self.seconds = 0.0
        self.current = []         # the kernels being compiled, here or by the helper
        self.watchers = []
        self._depth = 0
        self._started = 0.0
        self._name = None
        self._lock = threading.RLock()
        self.first_compile = None   # called once at this process's next real compilation (CompileAhead)
        self.queued = lambda: 0     # kernels that CompileAhead has yet to start (some may be in the cache)

    def on_start(self, event):
        self._depth += 1
        if self._depth == 1:
            self._started = time.perf_counter()
            self._name = event.data["dispatcher"].py_func.__name__
            self.started(self._name)
            if self.first_compile is not None:
                first, self.first_compile = self.first_compile, None
                first()

    def on_end(self, event):
        self._depth -= 1
        if self._depth == 0:
            seconds = time.perf_counter() - self._started
            self.seconds += seconds
            self.finished(self._name, seconds)

    def started(self, name: str) -> None:
        with self._lock:
            self.current.append(name)
            self._notify()

    def finished(self, name: str, seconds: float | None, by_helper: bool = False) -> None:
        """name is compiled (seconds None: it came from the cache after all)."""
        with self._lock:
            if name in self.current:
                self.current.remove(name)
            if seconds is not None:
                self.compiled.append((name, seconds))
                self.by_helper += by_helper
            self._notify()

    def _notify(self):
        for watcher in list(self.watchers):
            watcher(self)


COMPILE_LOG = CompileLog()
_numba_event.register("numba:compile", COMPILE_LOG)


# --- compiling a model's kernels ahead, in two processes -------------------------------------
# A machine's first run is nearly all numba compiling, one kernel at a time (numba holds a lock
# per process), so a second process compiles half of them into numba's cache meanwhile.

def _kernels() -> list:
    """Every kernel of this package that Python code calls (not the helpers inlined into them)."""
    from numba.core.dispatcher import Dispatcher
    prefix = __name__.rpartition(".")[0] + "."
    found = {}
    for name, module in list(sys.modules.items()):
        if name.startswith(prefix) and module is not None:
            for value in vars(module).values():
                if (isinstance(value, Dispatcher) and value.py_func.__module__ == name
                        and value.targetoptions.get("inline", "never") == "never"):
                    found[id(value)] = value
    return list(found.values())


def _do_nothing(*args, **kwargs):
    return None


_recording = threading.Lock()


@contextmanager
def recorded_calls():
    """Within it, a kernel called from this thread with argument types it has no compiled
    version for does nothing (its outputs keep what they held) and the call is recorded in the
    dict it gives: (kernel, argument types) keys, in the order of first call. A forward pass run
    so lists what a model will compile, in milliseconds. Other threads compile and run as
    usual.

    numba's typeof of an array costs tens of microseconds of Python, and a model's pass makes
    about a thousand calls of five arguments: 0.06 s of every start. An array's type is looked
    up by its fingerprint instead (numba's own summary, in C, of the dtype, dimensions, layout
    and writability, which its dispatcher keys types on) and alignment, typed once per key."""
    import numpy as np
    from numba._dispatcher import compute_fingerprint
    from numba.core import types
    from numba.core.dispatcher import OmittedArg
    calls, array_types = {}, {}
    me = threading.get_ident()

    def argument_type(kernel, a):
        if isinstance(a, OmittedArg):
            return types.Omitted(a.value)
        if type(a) is not np.ndarray:
            return kernel.typeof_pyval(a)
        try:
            key = compute_fingerprint(a), a.flags.aligned
        except NotImplementedError:   # dtypes it has no code for (float16)
            return kernel.typeof_pyval(a)
        if key not in array_types:
            array_types[key] = kernel.typeof_pyval(a)
        return array_types[key]

    def recorder(kernel):
        def record(*args, **kwargs):
            if threading.get_ident() != me:
                return type(kernel)._compile_for_args(kernel, *args, **kwargs)
            calls.setdefault((kernel, tuple(argument_type(kernel, a) for a in args)), None)
            return _do_nothing
        return record
    with _recording:
        kernels = _kernels()
        for kernel in kernels:
            kernel._compile_for_args = recorder(kernel)   # numba calls it for argument types it has not compiled
        try:
            yield calls
        finally:
            for kernel in kernels:
                del kernel._compile_for_args


def _estimated_cost(kernel) -> int:
    """How long a kernel takes to compile, roughly: its bytecode and that of every jitted
    function it calls (per call: inlined ones are compiled into each caller), and more for a
    parallel one (numba compiles its loop body again as a function of its own). Only orders
    the work."""
    import dis
    from numba.core.dispatcher import Dispatcher

    def size(function, depth):
        total = 0
        for instruction in dis.get_instructions(function):
            total += 1
            callee = function.__globals__.get(instruction.argval) if instruction.opname == "LOAD_GLOBAL" else None
            if isinstance(callee, Dispatcher) and depth < 8:
                total += size(callee.py_func, depth + 1)
        return total
    return size(kernel.py_func, 0) + (500 if kernel.targetoptions.get("parallel") else 0)


class CompileAhead:
    """Compiles (or loads from numba's cache) every (kernel, argument types) of calls, costliest
    first, sharing the queue with a helper process (see _Helper) when there are two cores or
    more: the one start_helper started, which takes work from the moment this object exists,
    else one started at this process's first real compilation (cached kernels need none).
    `finish` compiles what is left here, waits for the helper and loads what it compiled from
    the cache. Without a helper (one core, or it fails to start or dies) this process compiles
    everything itself: the helper only ever saves time."""

    def __init__(self, calls):
        global _spare_helper
        self.helper, _spare_helper = _spare_helper, None
        pending = [call for call in dict.fromkeys(calls) if call[1] not in call[0].overloads]
        self.work = _WorkQueue(sorted(pending, key=lambda call: _estimated_cost(call[0]), reverse=True))
        if self.helper is not None:
            self.helper.serve(self.work)

    def finish(self) -> None:
        work = self.work

        def start_helper():
            if self.helper is None and available_cores() > 1 and work.left() > 1:
                self.helper = _Helper.start()
                if self.helper is not None:
                    self.helper.serve(work)
        COMPILE_LOG.first_compile, COMPILE_LOG.queued = start_helper, work.left
        try:
            while (i := work.take()) is not None:
                kernel, signature = work.calls[i]
                kernel.compile(signature)
        finally:
            COMPILE_LOG.first_compile, COMPILE_LOG.queued = None, lambda: 0
            if self.helper is not None:
                self.helper.finish()
        for i in work.given:
            kernel, signature = work.calls[i]
            kernel.compile(signature)   # from the cache the helper wrote (or compiled here if it did not)

    def abandon(self) -> None:
        """Stop the helper (the load failed): what it saved stays in the cache for next time."""
        if self.helper is not None:
            self.helper.stop()


_spare_helper = None


def start_helper() -> None:
    """On a machine's first run (numba's cache for these sources is empty), start the helper
    process now, so that it has imported numba by the time there is work for it."""
    global _spare_helper
    cold = not any(name.endswith(".nbi") for _, _, names in os.walk(_numba_config.CACHE_DIR) for name in names)
    if cold and _spare_helper is None and available_cores() > 1:
        _spare_helper = _Helper.start()


def available_cores() -> int:
    """The cores this process may run on (its affinity), whatever numba's thread count: with one,
    a helper process would only slow the compilation down."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


class _WorkQueue:
    """The calls left to compile, taken one at a time (as indexes) by this process or its
    helper; `given`: those the helper took, `busy`: how many of them it has not finished."""

    def __init__(self, calls):
        self.calls = calls
        self.given = []
        self.busy = 0
        self._next = 0
        self._lock = threading.Lock()

    def take(self, for_helper: bool = False):
        with self._lock:
            if self._next == len(self.calls):
                return None
            self._next += 1
            if for_helper:
                self.given.append(self._next - 1)
                self.busy += 1
            return self._next - 1

    def helper_done(self, gone: bool = False) -> None:
        with self._lock:
            self.busy = 0 if gone else self.busy - 1

    def left(self) -> int:
        with self._lock:
            return len(self.calls) - self._next


class _Helper:
    """A second Python process that compiles kernels into numba's cache. It asks for one call
    at a time on its stdout ("next") and gets an index into the calls (or "end") on its stdin,
    then reports "start i" and "done i seconds"; a thread here answers it and reports its
    kernels in COMPILE_LOG. Neither process compiles what the other took. Its stderr is
    dropped: whatever fails there, this process compiles the call itself afterwards."""

    command = [sys.executable, "-c", f"import {__name__} as compiler; compiler._helper_main()"]

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.work = self.reader = None

    @classmethod
    def start(cls):
        """A new helper, or None where no process can be started (this one compiles alone)."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path or os.getcwd() for path in sys.path))
        try:
            return cls(subprocess.Popen(cls.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, env=env, text=True))
        except OSError:
            return None

    def serve(self, work: _WorkQueue) -> None:
        """Send it the calls and answer its requests from now on."""
        self.work = work
        plan = [(kernel.py_func.__module__, kernel.py_func.__name__, signature) for kernel, signature in work.calls]
        try:
            self.process.stdin.write(base64.b64encode(pickle.dumps(plan)).decode() + "\n")
            self.process.stdin.flush()
        except OSError:
            return
        self.reader = threading.Thread(target=self._serve, daemon=True, name="compile helper")
        self.reader.start()

    def _serve(self):
        names = [kernel.py_func.__name__ for kernel, _ in self.work.calls]
        try:
            for line in self.process.stdout:
                word, *rest = line.split()
                if word == "next":
                    i = self.work.take(for_helper=True)
                    self.process.stdin.write(f"{'end' if i is None else i}\n")
                    self.process.stdin.flush()
                elif word == "start":
                    COMPILE_LOG.started(names[int(rest[0])])
                elif word == "done":
                    self.work.helper_done()
                    COMPILE_LOG.finished(names[int(rest[0])], float(rest[1]) if rest[1] != "cached" else None,
                                         by_helper=True)
        except (OSError, ValueError, IndexError):
            pass
        finally:
            self.work.helper_done(gone=True)

    def finish(self):
        """Wait for the calls it took (the wait counts as compiling), then end it: this
        process has taken the rest, so it would get no more."""
        started = time.perf_counter()
        while self.reader is not None and self.reader.is_alive() and self.work.busy > 0:
            self.reader.join(0.02)
        self.stop()
        COMPILE_LOG.seconds += time.perf_counter() - started

    def stop(self):
        """End it now (numba writes each cache file whole or not at all)."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait()


def _helper_main():
    """The helper process (see _Helper): compile what it is given into numba's cache."""
    import importlib
    from numba import njit
    njit(lambda x: x + 1)(1)   # numba sets its compiler up (tenths of a second) while the plan is on its way
    line = sys.stdin.readline()
    if not line.strip():
        return
    plan = pickle.loads(base64.b64decode(line))
    while True:
        print("next", flush=True)
        answer = sys.stdin.readline().strip()
        if not answer.isdigit():
            return
        i = int(answer)
        module, name, signature = plan[i]
        compiled = len(COMPILE_LOG.compiled)
        COMPILE_LOG.first_compile = lambda: print(f"start {i}", flush=True)   # not for a kernel in the cache
        getattr(importlib.import_module(module), name).compile(signature)
        COMPILE_LOG.first_compile = None
        seconds = sum(s for _, s in COMPILE_LOG.compiled[compiled:])
        print(f"done {i} {seconds:.3f}" if len(COMPILE_LOG.compiled) > compiled else f"done {i} cached", flush=True)
