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
import hashlib
import os
import time

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
    """The kernels numba compiles in this process, as it compiles them (it reports real
    compilations only, not kernels loaded from its cache): their names, the seconds each took
    (with the helpers it inlines or calls, which numba reports nested inside it), the running
    total, and the one in progress. Each callable in `watchers` is called with the log at every
    kernel's start and end (the command line's progress line is one)."""

    def __init__(self):
        self.compiled = []        # (name, seconds), in order
        self.seconds = 0.0
        self.current = None       # the kernel being compiled
        self.watchers = []
        self._depth = 0
        self._started = 0.0

    def on_start(self, event):
        self._depth += 1
        if self._depth == 1:
            self._started = time.perf_counter()
            self.current = event.data["dispatcher"].py_func.__name__
            self._notify()

    def on_end(self, event):
        self._depth -= 1
        if self._depth == 0:
            seconds = time.perf_counter() - self._started
            self.compiled.append((self.current, seconds))
            self.seconds += seconds
            self.current = None
            self._notify()

    def _notify(self):
        for watcher in self.watchers:
            watcher(self)


COMPILE_LOG = CompileLog()
_numba_event.register("numba:compile", COMPILE_LOG)
