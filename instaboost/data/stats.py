"""`DataStats`: counters of what the data pipeline skipped, dropped or changed.

Silent data loss is a bug, so every place that skips an annotation or drops an instance counts
it here; the trainer logs `as_dict()` to the tracker. The counters must add up across the
`mindspore.dataset` worker processes, forked (MindSpore's default) or spawned, so they live in a
named shared-memory block (int64 per counter) created by the owning process. A copy made by
fork keeps the same mapping; a pickled copy (spawn) re-attaches by name. Increments hold an
exclusive `flock` on a small lock file, opened once per process, so concurrent workers never
lose an update. The owner unlinks both when it is garbage collected or exits.

Training samples count where they are trained, not where they are made: MindSpore's workers
prefetch, so counting at production would count samples a run cut short by max_steps never
trains on. `TrainSampleSource` makes each sample inside `capture()`, which keeps that sample's
counts apart, in an array that travels with it as a column; the training loop adds the arrays
of the batches it trains on (`add_counts`).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
import weakref
from multiprocessing import shared_memory
from typing import Iterable, Iterator, Mapping

import numpy as np

# Every counter of the data package, with its unit. Counters of one event per *load* grow with
# the number of epochs (training samples: as trained, see the module docstring); "once" counters
# are counted when the annotation file is read.
COUNTER_DOCS: Mapping[str, str] = {
    "annotations_skipped_small": "annotations with bbox width or height < 1 px (once, at load of the json)",
    "annotations_skipped_no_segmentation": "annotations without a segmentation, or only polygons of fewer than 3 points (once, at load of the json)",
    "annotations_skipped_empty_mask": "annotations whose decoded mask is empty (per image load)",
    "samples": "training samples trained on",
    "instaboost_applied": "samples the InstaBoost engine was applied to",
    "instaboost_no_instances": "samples that drew 'apply' but had no non-crowd instance",
    "instaboost_dropped_instances": "instances the engine removed (pushed out) or left empty/degenerate",
    "gts_dropped_over_limit": "instances beyond num_gts (the smallest are dropped)",
    "eval_samples": "evaluation samples produced by EvalTransform",
}
COUNTER_NAMES: tuple[str, ...] = tuple(COUNTER_DOCS)
COUNTER_BYTES = np.dtype(np.int64).itemsize


def _release(memory: shared_memory.SharedMemory, lock_path: str, owner_pid: int,
             lock_fds: dict[int, int]) -> None:
    """Finalizer: close this process's lock descriptor; the owner also unlinks block and file."""
    fd = lock_fds.pop(os.getpid(), None)
    if fd is not None:
        os.close(fd)
    if os.getpid() != owner_pid:
        return
    memory.close()
    memory.unlink()
    if os.path.exists(lock_path):
        os.remove(lock_path)


class DataStats:
    """Named integer counters shared between the main process and data worker processes.

    Args:
        names: counter names (default: every counter of the data package, `COUNTER_NAMES`).
    """

    def __init__(self, names: Iterable[str] = COUNTER_NAMES):
        self._names = tuple(names)
        if not self._names or len(set(self._names)) != len(self._names):
            raise ValueError(f"counter names must be unique and non-empty, got {self._names}")
        self._memory = shared_memory.SharedMemory(create=True, size=COUNTER_BYTES * len(self._names))
        self._values()[:] = 0
        handle, self._lock_path = tempfile.mkstemp(prefix="instaboost-datastats-", suffix=".lock")
        os.close(handle)
        self._index = {name: i for i, name in enumerate(self._names)}
        self._lock_fds: dict[int, int] = {}  # pid -> descriptor of the lock file
        self._captured = threading.local()
        weakref.finalize(self, _release, self._memory, self._lock_path, os.getpid(), self._lock_fds)

    def __getstate__(self) -> dict:
        return {"names": self._names, "memory_name": self._memory.name, "lock_path": self._lock_path}

    def __setstate__(self, state: dict) -> None:
        self._names = tuple(state["names"])
        # Attaching registers the name again with the resource tracker that multiprocessing
        # children share with their parent (a set: no effect); only the owner unlinks it.
        self._memory = shared_memory.SharedMemory(name=state["memory_name"])
        self._lock_path = state["lock_path"]
        self._index = {name: i for i, name in enumerate(self._names)}
        self._lock_fds = {}
        self._captured = threading.local()
        weakref.finalize(self, _release, self._memory, self._lock_path, -1, self._lock_fds)

    def _values(self) -> np.ndarray:
        return np.ndarray((len(self._names),), dtype=np.int64, buffer=self._memory.buf)

    def _lock(self) -> int:
        """This process's descriptor of the lock file (flock is per open file description)."""
        pid = os.getpid()
        if pid not in self._lock_fds:
            self._lock_fds[pid] = os.open(self._lock_path, os.O_RDWR)
        return self._lock_fds[pid]

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the counters' lock: no other process or worker updates them meanwhile."""
        fd = self._lock()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def _position(self, name: str) -> int:
        if name not in self._index:
            raise KeyError(f"unknown data counter {name!r}; known: {', '.join(self._names)}")
        return self._index[name]

    def add(self, name: str, count: int = 1) -> None:
        """Add `count` to the counter `name` (KeyError naming the known counters if unknown)."""
        position = self._position(name)
        if not count:
            return
        captured = getattr(self._captured, "counts", None)
        if captured is not None:
            captured[position] += int(count)
            return
        with self._exclusive():
            self._values()[position] += int(count)

    @contextlib.contextmanager
    def capture(self) -> Iterator[np.ndarray]:
        """Within the block, what this thread adds goes to the yielded int64 array (one entry per
        counter, in `names` order) instead of the shared counters."""
        counts = np.zeros(len(self._names), dtype=np.int64)
        outer = getattr(self._captured, "counts", None)
        self._captured.counts = counts
        try:
            yield counts
        finally:
            self._captured.counts = outer

    def add_counts(self, counts: np.ndarray) -> None:
        """Add captured counts (`names` order; a batch of them is summed over its leading axes)."""
        counts = np.asarray(counts, dtype=np.int64).reshape(-1, len(self._names)).sum(axis=0)
        with self._exclusive():
            self._values()[:] += counts

    def get(self, name: str) -> int:
        return int(self._values()[self._position(name)])

    def as_dict(self, prefix: str = "") -> dict[str, int]:
        """All counters as {prefix + name: value} (e.g. prefix "data/" for the tracker)."""
        values = self._values().tolist()
        return {prefix + name: int(value) for name, value in zip(self._names, values)}

    def reset(self) -> None:
        with self._exclusive():
            self._values()[:] = 0

    def __repr__(self) -> str:
        return f"DataStats({self.as_dict()})"
