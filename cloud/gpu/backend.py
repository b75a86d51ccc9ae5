"""The service's search call on a chosen device: ``searcher(device)`` returns a function
with cloud.search.search_batch's signature, so the service swaps engines in one place.

For ``cpu`` it is cloud.search.search_batch itself. For ``cuda[:N]`` it puts each
index the service hands it (an index of cloud/repo_index.py's snapshot) into device
memory once, on first use, keeps the copy while the index lives (a new snapshot is a new
index: the old copy is freed with it), and answers one query with the ``f32`` mode below
two million rows and the ``levels`` mode from there (single_query_mode), and several
with one batched scan (cloud/gpu/engine.py): the same exact results.

Where the index's segments are files on local disk (a directory store; the service's
``service_searcher`` wires cloud/gpu/segment_files.py in), they are read from disk
straight into device memory through small pinned buffers (cloud/gpu/loader.py), each
checked as decode_segment checks it and against the SHA-256 the service verified when it
loaded it, and the rows' ids compared with the snapshot's. A file refused (SegmentError,
naming it) or rows that differ are logged, and the device copies the host's rows
instead: those the CPU path answers from, validated when the segment was downloaded.
Which segments are searched, rejected or missing stays the snapshot's, on either device.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from types import ModuleType

from cloud import cpus
from cloud.gpu import engine, loader
from cloud.gpu.device import array_module, parse_device
from cloud.gpu.segment_files import SegmentFiles, SegmentHook, Source
from cloud.search import EncryptedIndex, SearchResult
from cloud.segments import SegmentError
from crypto.tokens import EncryptedVectors, QueryToken

Searcher = Callable[[EncryptedIndex, QueryToken, int], list[SearchResult]]
MIN_LOAD_THREADS = 4  # the loader's SHA-256 bounds a thread at 1-2 GB/s (docs/BENCHMARKS.md)
# A single query on fewer rows than this is answered by the float32 scan of every full
# ciphertext (mode f32), on more by the levels (float32 first level, float64 survivors):
# measured at 1M, f32 1.14-1.22 ms against levels 1.35-1.68 on an H100 and 0.96-1.09
# against 1.01-1.72 on an H200; at 4M, levels 1.02-1.62 against f32 2.26-2.30 (H100) and
# 1.33-1.37 against 1.93-1.97 (H200) (docs/BENCHMARKS.md). Both are exact.
F32_SINGLE_ROWS = 2_000_000
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceLoad:
    """How one index reached device memory: ``files`` (the segment files, through the
    loader; ``bytes_read``: the files' bytes) or ``host`` (a copy of the host's rows;
    the float64 bytes copied), and why not from files when a file was refused (file
    name -> reason)."""

    origin: str
    rows: int
    segments: int
    bytes_read: int
    seconds: float
    refused: dict[str, str] = field(default_factory=dict)


class DeviceSearcher:
    """search_batch on a device; thread-safe (one copy per index, made under a lock).

    ``files``: where to find the segment files of the service's indexes (None: every
    index is copied from the host's rows). ``loads``: the last copies made, newest last.
    """

    def __init__(self, xp: ModuleType, ordinal: int = 0,
                 files: SegmentFiles | None = None) -> None:
        self.xp = xp
        self.ordinal = ordinal
        self.files = files
        self.loads: deque[DeviceLoad] = deque(maxlen=64)
        self._copies: weakref.WeakKeyDictionary[EncryptedIndex, engine.DeviceIndex] = (
            weakref.WeakKeyDictionary())
        self._lock = threading.Lock()

    def device_index(self, index: EncryptedIndex) -> engine.DeviceIndex:
        with self._lock:
            copy = self._copies.get(index)
            if copy is None:
                with self._current_device():
                    copy = self._load(index)
                self._copies[index] = copy
            return copy

    def _load(self, index: EncryptedIndex) -> engine.DeviceIndex:
        """From the segment files when they are known and pass every check, else from
        the host's rows."""
        started = time.perf_counter()
        source = self.files.source(index) if self.files is not None else None
        refused: dict[str, str] = {}
        if source is not None:
            copy = self._from_files(source, refused)
            if copy is not None:
                return copy
        vectors = EncryptedVectors(full=index.full, levels=tuple(index.levels))
        copy = engine.DeviceIndex.from_vectors(self.xp, [vectors])
        copied = sum(int(a.nbytes) for a in (vectors.full, *vectors.levels))
        self.loads.append(DeviceLoad("host", len(copy), 0, copied,
                                     time.perf_counter() - started, refused))
        return copy

    def _from_files(self, source: Source, refused: dict[str, str]
                    ) -> engine.DeviceIndex | None:
        where = f"repository {source.repo_id} key version {source.key_version}"
        try:
            loaded = loader.load_segments(
                self.xp, source.paths, expected_sha256=source.sha256, unique_ids=True,
                threads=max(MIN_LOAD_THREADS, cpus.engine_threads()))
        except SegmentError as exc:  # nothing of it reached the index
            refused[exc.name] = exc.reason
            log.error("%s: %s; the device copies the service's rows instead", where, exc)
            return None
        except OSError as exc:  # gone since the snapshot (a rebuild, a deletion)
            refused[str(exc.filename)] = exc.strerror or str(exc)
            log.error("%s: segment file %s unreadable (%s); the device copies the "
                      "service's rows instead", where, exc.filename, exc.strerror or exc)
            return None
        if loaded.ids.tobytes() != source.ids.tobytes():
            log.error("%s: the rows of the segment files are not the service's (%d rows, "
                      "%d expected); the device copies the service's rows instead", where,
                      len(loaded.ids), len(source.ids))
            return None
        self.loads.append(DeviceLoad("files", len(loaded.index), len(source.paths),
                                     loaded.bytes_read, loaded.seconds))
        log.info("%s: %d segment files into device memory, %.2f GB/s", where,
                 len(source.paths), loaded.gigabytes_per_second)
        return loaded.index

    def __call__(self, index: EncryptedIndex, token: QueryToken, k: int = 1
                 ) -> list[SearchResult]:
        with self._current_device():
            copy = self.device_index(index)
            if len(token) == 1:
                result = engine.search(copy, token, k, single_query_mode(len(copy)))
                result.stats.batch = 1
                return [result]
            return engine.search_batch(copy, token, k, "f32")

    def _current_device(self) -> AbstractContextManager[object]:
        """CuPy's current device is per thread: each search names it."""
        if self.xp.__name__ == "cupy":
            return self.xp.cuda.Device(self.ordinal)  # type: ignore[no-any-return]
        return nullcontext()


def single_query_mode(rows: int) -> str:
    """The device engine's mode for one query on ``rows`` rows (F32_SINGLE_ROWS)."""
    return "f32" if rows < F32_SINGLE_ROWS else "levels"


def service_searcher(device: str, store: object, repo: Callable[[str], object],
                     hook: SegmentHook | None = None
                     ) -> tuple[Searcher, SegmentHook | None]:
    """The search service's engine call on ``device`` and the segment hook to give its
    repository views (ServiceState.segment_hook): ``hook`` itself on the CPU; on a GPU,
    one that first notes each accepted segment (cloud/gpu/segment_files.py), so that
    the indexes load from the segment files where the store keeps them on local disk.
    ``repo``: ServiceState.repo."""
    parsed = parse_device(device)
    if not parsed.is_gpu:
        return searcher(device), hook
    files = SegmentFiles(store, repo)  # type: ignore[arg-type]
    return DeviceSearcher(array_module(device), parsed.ordinal, files), files.hook_then(hook)


def searcher(device: str = "cpu") -> Searcher:
    """The search function for ``device`` (cpu, cuda, cuda:N); errors in plain words when
    the device cannot be used (cloud/gpu/device.py)."""
    parsed = parse_device(device)
    if not parsed.is_gpu:
        from cloud.search import search_batch

        return search_batch
    return DeviceSearcher(array_module(device), parsed.ordinal)
