"""Repacked weights kept on disk, so that later loads map them instead of repacking.

Block-format matrices are repacked at load into the interleaved layout the kernels read
(kernels/layout.py). Filling that much fresh memory is what a load costs: on this 2-core VM,
1.5-2.5 s for the 1.7 GB of a 1.5B Q8_0 model, nearly all of it first-touch page faults. So the
first load of a model file also writes the packed bytes here, and later loads map them
(copy-on-write: numba sees ordinary writable arrays, and no page is copied): about 0.1 s, and
the pages are shared with the page cache rather than duplicated.

An entry is named by a hash of the model files' paths, sizes and modification times, of the
entry format's version and of where each block format's packing puts every byte, so a changed
file or a changed layout makes a new entry. It is a data file (each
tensor at a 4 KiB-aligned offset) and an index, each written under a temporary name and renamed
into place, index last: a reader sees a whole entry or none. The index holds an xxh3 checksum of
every tensor, verified each time the entry is mapped, in parallel at memory speed (the pages it
reads are the ones the first forward pass would fault in anyway; the cost on a warm start is in
the README): a disk error or a stray write would otherwise give wrong answers silently and for
good. An entry that does not match what the loader expects (damaged, torn, edited, other shapes)
is reported in one line, ignored, and written again. Writing an entry
removes the entries it supersedes: the same files before a change, and every entry of another
layout version (which no load of this version reads), so the cache holds one entry per model.

ENGINE_WEIGHT_CACHE: a directory (default ~/.cache/engine/weights, or under XDG_CACHE_HOME), or
"off" to never read or write one. Entries take about as much disk as the model file; delete the
directory to reclaim it.
"""
import contextlib
import hashlib
import json
import os
import re
import sys
import threading
from pathlib import Path

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash

from .kernels.compiler import available_threads
from .kernels.formats import packed_layout_digest
from .kernels.layout import ROW_GROUP

LAYOUT_VERSION = 6   # bump when the entry's index changes (a change of any format's packing changes the
                     # entries' names by itself: formats.packed_layout_digest); old entries are then never read
ALIGN = 4096
CACHE_ENV = "ENGINE_WEIGHT_CACHE"


# set when the process is interrupted (Ctrl-C, SIGTERM): a writer abandons its entry at the next
# tensor and removes its temporary files, so that the process ends at once; the next load writes it
STOP_WRITING = threading.Event()


class _Abandoned(Exception):
    pass


def abandon_writes() -> None:
    STOP_WRITING.set()


def checksum_of(array: np.ndarray) -> str:
    return xxhash.xxh3_64_hexdigest(memoryview(np.ascontiguousarray(array)).cast("B"))


def cache_root() -> Path | None:
    setting = os.environ.get(CACHE_ENV, "")
    if setting.lower() in ("off", "0", "no", "false"):
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "engine" / "weights"


class WeightCache:
    """The cache entry of one model, identified by its files."""

    def __init__(self, root: Path, files: list[Path]):
        identity = [f"layout {LAYOUT_VERSION} {packed_layout_digest()} x {ROW_GROUP}"]
        self.source = [str(path) for path in sorted(Path(f).resolve() for f in files)]
        for path in self.source:
            stat = os.stat(path)
            identity.append(f"{path}|{stat.st_size}|{stat.st_mtime_ns}")
        key = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:32]
        self.data_path = root / f"{key}.bin"
        self.index_path = root / f"{key}.json"

    @classmethod
    def for_files(cls, files: list[Path]) -> "WeightCache | None":
        root = cache_root()
        return None if root is None else cls(root, files)

    def load(self) -> dict[str, np.ndarray]:
        """{tensor name: packed array mapped from the entry}, or {} when there is no usable entry
        (a damaged one is reported). The caller still checks every shape against the config."""
        if not self.index_path.exists():
            return {}
        try:
            arrays = self._map()
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
            self.report(f"its index is unreadable ({type(e).__name__})")
            return {}
        if isinstance(arrays, str):
            self.report(arrays)
            return {}
        return arrays

    def _map(self) -> dict[str, np.ndarray] | str:
        """The entry's arrays, or what is wrong with it."""
        index = json.loads(self.index_path.read_text())
        size = self.data_path.stat().st_size
        if index.get("bytes") != size or not isinstance(index.get("tensors"), dict) or size == 0:
            return f"its data file has {size} bytes where the index says {index.get('bytes')}"
        mapped = np.memmap(self.data_path, dtype=np.uint8, mode="c")
        arrays, checksums = {}, {}
        for name, (offset, shape, checksum) in index["tensors"].items():
            nbytes = int(np.prod(shape))
            if not (isinstance(offset, int) and offset % ALIGN == 0 and 0 <= offset
                    and offset + nbytes <= size and len(shape) == 3 and min(shape) > 0):
                return f"tensor {name} lies outside its data"
            arrays[name] = mapped[offset:offset + nbytes].reshape(shape)
            checksums[name] = checksum
        with ThreadPoolExecutor(available_threads()) as pool:   # xxhash releases the GIL
            found = dict(zip(arrays, pool.map(checksum_of, arrays.values())))
        damaged = [name for name in arrays if found[name] != checksums[name]]
        if damaged:
            more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
            return f"tensor {damaged[0]}{more} does not match its checksum"
        return arrays

    def report(self, problem: str) -> None:
        print(f"note: the cached repacked weights {self.data_path} are damaged ({problem}); repacking them "
              f"from the model file and writing the entry again", file=sys.stderr)

    def save(self, packed: dict[str, np.ndarray]) -> threading.Thread:
        """Write an entry for {tensor name: packed array} (the arrays are only read), in a
        background thread: writing costs about as long as repacking did, and the model can
        generate meanwhile (the thread is not a daemon, so the process finishes the entry before
        it exits, unless it was interrupted: abandon_writes). A failure (disk full, read-only
        home) only costs the next load its speed: it is reported, not raised."""
        thread = threading.Thread(target=self._write, args=(packed,), name="weight-cache-writer")
        thread.start()
        return thread

    def _write(self, packed: dict[str, np.ndarray]) -> None:
        suffix = f".{os.getpid()}-{threading.get_ident()}.tmp"   # unique to this writer
        data_tmp = self.data_path.with_name(self.data_path.name + suffix)
        index_tmp = self.index_path.with_name(self.index_path.name + suffix)
        try:
            tensors, offset = {}, 0
            for name, array in packed.items():
                if STOP_WRITING.is_set():
                    raise _Abandoned
                tensors[name] = (offset, list(array.shape), checksum_of(array))
                offset = -(-(offset + array.nbytes) // ALIGN) * ALIGN
            self.data_path.parent.mkdir(parents=True, exist_ok=True)
            with open(data_tmp, "wb") as f:
                for (name, array), (start, _, _) in zip(packed.items(), tensors.values()):
                    if STOP_WRITING.is_set():
                        raise _Abandoned
                    f.seek(start)
                    f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
                f.truncate(offset)
            os.replace(data_tmp, self.data_path)
            index_tmp.write_text(json.dumps({"bytes": offset, "tensors": tensors, "source": self.source,
                                              "layout": LAYOUT_VERSION}))
            os.replace(index_tmp, self.index_path)
            self._remove_superseded()
        except _Abandoned:
            with contextlib.suppress(OSError):
                data_tmp.unlink()
        except OSError as e:
            for tmp in (data_tmp, index_tmp):
                with contextlib.suppress(OSError):
                    tmp.unlink()
            print(f"note: could not cache the repacked weights in {self.data_path.parent} ({e}); "
                  f"set {CACHE_ENV}=off to stop trying", file=sys.stderr)

    def _remove_superseded(self) -> None:
        """Delete the other entries made from the same files (before they changed) and those of
        other layout versions (older entries have no "layout"). A process still mapping one keeps
        its pages until it unmaps them. Only files named and shaped as entries are touched: the
        directory may be one the user chose."""
        for index_path in self.index_path.parent.glob("*.json"):
            if index_path == self.index_path or not re.fullmatch(r"[0-9a-f]{32}\.json", index_path.name):
                continue
            with contextlib.suppress(OSError, ValueError):
                other = json.loads(index_path.read_text())
                is_entry = isinstance(other, dict) and "tensors" in other and "bytes" in other
                if is_entry and (other.get("source") == self.source or other.get("layout") != LAYOUT_VERSION):
                    index_path.unlink()
                    index_path.with_suffix(".bin").unlink()
