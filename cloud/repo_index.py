"""The search service's view of one repository: its segments, loaded once, appended to.

Segments are immutable once written (the commit point of an import batch), so the view
only ever appends the rows of segments it has not seen; when a segment disappears
(garbage collection, a key rotation) the view is rebuilt from the bucket. A segment that
fails validation, or whose vector widths differ from those of its key version (those
most of the version's images have when it is first loaded), is reported and skipped; the
others keep serving. Rows are grouped by key version, because a query token only matches
ciphertexts made with the same keys, and an image already present (imported twice, by two
workstations at once) is kept once.

Memory. With a cache directory, each key version's float64 arrays are appended to files
there (unlinked as soon as they are open, so that nothing outlives the process) and
memory-mapped read-only: in RAM live only a float32 copy of the first bound level (the
one level every query scans) and sixteen-bit codes of the full vectors (scanned when the
bounds cannot prune, cloud/codes.py); the float64 arrays are paged in for the few
candidates that reach them. Without one (tests, small repositories) the arrays live in
memory.

Loading speed (the goal: a repository of a million images, 3 GB of segments, loaded at
200 MB/s or more on two cores). Every byte is touched as few times as possible: it
arrives in 1 MiB chunks that are hashed while still in the processor's cache and copied
into a download buffer reused from one segment to the next (fresh memory costs a page
fault per 4 KiB, more than the copy). The arrays are then views of that buffer:
converted once to float32 (and codes) straight into arrays with room for all the rows the segments'
headers announce (untouched room costs no resident memory; nothing is concatenated
afterwards), and written once to the cache files with O_DIRECT, which bypasses the page
cache and its dirty-page throttling (see _FileRows). Downloads run in threads, a bounded
number of bytes ahead; the segments are then ordered and de-duplicated in key order, and
copied by other threads (_Appends).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np
from numpy.typing import NDArray

from cloud import codes, layout
from cloud.codes import SCALE_COLUMNS, RowCodes, quantize_rows
from cloud.search import EncryptedIndex, max_row_norm
from cloud.segments import HEADER_SIZE, Segment, SegmentError, read_header, read_segment
from cloud.store import ObjectNotFound, ObjectStore
from crypto.tokens import EncryptedVectors

log = logging.getLogger(__name__)
HEADER_THREADS = 8  # 64-byte range requests: latency, not bandwidth
LOAD_THREADS = 8  # small segments: request latency; large ones: AHEAD_BYTES bounds them
CHUNK_BYTES = 1 << 20  # hashed while in cache, then copied into the download buffer
AHEAD_BYTES = 128 << 20  # downloading, or downloaded and not yet appended, at most
AHEAD_SEGMENTS = 4 * LOAD_THREADS  # segments downloading or ready, at most
APPEND_THREADS = 2  # conversions of segments at once (they release the GIL)
DIRECT_IO = True  # cache files written with O_DIRECT where available
DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, length and file offset multiples of this
STAGE_BYTES = 8 << 20  # per cache file, while loading
WARM_BYTES = 1 << 20  # readahead asked at a time, after a load
Header = tuple[int, int, tuple[int, ...]]  # key version, count, widths


@dataclass(frozen=True)
class VersionIndex:
    """Everything searchable under one key version: the index and its image ids."""

    key_version: int
    index: EncryptedIndex
    image_ids: Sequence[str]


@dataclass(frozen=True)
class Snapshot:
    """An immutable state a search reads while a refresh may build the next one."""

    versions: dict[int, VersionIndex]
    segments: int
    images: int
    rejected: dict[str, str]
    loaded_at: float


class ImageIds(Sequence[str]):
    """Image ids as 32-hex-character strings, made when asked for: a list of a million
    Python strings would cost about 90 MB and half a second at every rebuild."""

    def __init__(self, raw: NDArray[np.void]) -> None:
        self._raw = raw

    def __len__(self) -> int:
        return len(self._raw)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [bytes(i).hex() for i in self._raw[index]]
        return bytes(self._raw[index]).hex()


class _Rows:
    """A 2-D array in memory that rows are appended to. A view of its first rows stays
    valid and unchanged while rows are appended, so a snapshot can hold one while the
    next refresh appends; growing allocates a new array with room to spare (pages never
    written are never resident) and leaves the old one to the snapshots that hold it."""

    def __init__(self, width: int, dtype: np.dtype | type) -> None:
        self.array: NDArray = np.empty((0, width), dtype)
        self.rows = 0

    def reserve(self, more: int) -> None:
        need = self.rows + more
        if need > len(self.array):
            grown = np.empty((max(need + need // 4, 2 * len(self.array)), self.array.shape[1]),
                             self.array.dtype)
            grown[: self.rows] = self.array[: self.rows]
            self.array = grown

    def room(self) -> int:
        return len(self.array) - self.rows

    def claim(self, count: int) -> NDArray:
        """The next ``count`` rows (within the room reserved), to be filled by the caller."""
        assert count <= self.room()
        self.rows += count
        return self.array[self.rows - count : self.rows]

    def append(self, data: NDArray) -> None:
        self.reserve(len(data))
        np.copyto(self.claim(len(data)), data, casting="same_kind")

    def view(self) -> NDArray:
        return self.array[: self.rows]


class _FileRows:
    """A 2-D float64 array in a file that rows are appended to, memory-mapped to read.

    The file is unlinked as soon as it is created: the open descriptor and the memory
    maps of the snapshots keep its data, which the system frees when the last of them
    goes, however the service ends (a killed service leaves no gigabytes behind).

    Written with O_DIRECT where the system allows it: the bytes go from a page-aligned
    staging buffer to the disk without passing through the page cache, so a load neither
    fills the cache with gigabytes of dirty pages (and waits for their writeback once the
    dirty limit is reached) nor pays for the copy and the fresh cache pages, which cost
    more processor time than everything else a load does. Queries read rows back through
    the memory map; after a load a background thread has the system read the files into
    the page cache (warm), so that the first queries do not wait for the disk row by row.
    Elsewhere (no O_DIRECT, or a file system that refuses it) the rows are written
    through the page cache.
    """

    def __init__(self, path: Path, width: int) -> None:
        self.width = width
        self.rows = 0
        self._written = 0  # bytes at their final place in the file
        self._stage: mmap.mmap | None = None  # direct mode: the bytes after _written
        self._fill = 0
        self._tail = b""  # the staged bytes while the stage is released between loads
        self._warmed = 0  # bytes asked into the page cache (direct mode)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        self._direct = bool(DIRECT_IO and getattr(os, "O_DIRECT", 0))
        fd = -1
        if self._direct:
            try:
                fd = os.open(path, flags | os.O_DIRECT, 0o600)
            except OSError:
                self._direct = False
        if fd < 0:
            fd = os.open(path, flags, 0o600)
        self._fd = fd
        weakref.finalize(self, os.close, fd)
        path.unlink()

    def reserve(self, more: int) -> None:
        pass

    def append(self, data: NDArray[np.float64]) -> None:
        # A view of the download buffer when every row is kept: no intermediate copy.
        view = memoryview(np.ascontiguousarray(data, dtype="<f8")).cast("B")
        self.rows += len(data)
        while view:
            if not self._direct:
                self._write(view, self._written)
                self._written += len(view)
                return
            stage = self._staging()
            count = min(len(view), len(stage) - self._fill)
            stage[self._fill : self._fill + count] = view[:count]
            self._fill += count
            view = view[count:]
            if self._fill == len(stage):
                self._spill()

    def view(self) -> NDArray[np.float64]:
        """The rows so far, memory-mapped read-only (at least one row)."""
        if self._stage is not None:
            if self._fill:
                self._spill()
            if self._stage is not None:  # keep the unfinished block, not the whole stage
                self._tail = self._stage[: self._fill]
                self._stage.close()
                self._stage = None
        mapped = mmap.mmap(self._fd, 8 * self.width * self.rows, access=mmap.ACCESS_READ)
        return np.frombuffer(mapped, dtype="<f8").reshape(self.rows, self.width)

    def warm(self) -> None:
        """Ask the system to read the rows written with O_DIRECT into the page cache, so
        that a query's first candidates do not each wait for the disk (about 1 ms a row
        on a virtual disk). Only bytes that will never be rewritten: not the staged tail,
        which the next direct write replaces. Asynchronous readahead; slow, so called
        from a background thread (see _warm_later)."""
        end = self._written if self._direct else self._warmed
        if end > self._warmed and hasattr(os, "posix_fadvise"):
            start, self._warmed = self._warmed, end
            # Linux reads at most a readahead window per call: ask a window at a time.
            with contextlib.suppress(OSError):  # only a hint
                for offset in range(start, end, WARM_BYTES):
                    os.posix_fadvise(self._fd, offset, min(WARM_BYTES, end - offset),
                                     os.POSIX_FADV_WILLNEED)

    def _staging(self) -> mmap.mmap:
        if self._stage is None:
            self._stage = mmap.mmap(-1, STAGE_BYTES)  # page-aligned, as O_DIRECT requires
            self._stage[: len(self._tail)] = self._tail
            self._fill, self._tail = len(self._tail), b""
        return self._stage

    def _spill(self) -> None:
        """Write the stage at _written: a full stage moves _written on; a partial one is
        written padded to the alignment (past the rows, so no reader sees the padding)
        and stays staged, to be written again over itself with the rows that follow."""
        assert self._stage is not None
        full = self._fill == len(self._stage)
        size = self._fill if full else -(-self._fill // DIRECT_ALIGN) * DIRECT_ALIGN
        try:
            self._write(memoryview(self._stage)[:size], self._written)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            refused = True  # by this file system or device (handled once the traceback,
        else:  # which holds views of the stage, is gone)
            refused = False
        if refused:
            self._buffered()
            return
        if full:
            self._written += size
            self._fill = 0

    def _buffered(self) -> None:
        import fcntl  # only where O_DIRECT exists: Linux

        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self._direct = False
        staged = self._tail if self._stage is None else self._stage[: self._fill]
        self._write(staged, self._written)
        self._written += len(staged)
        if self._stage is not None:
            self._stage.close()
        self._stage, self._fill, self._tail = None, 0, b""

    def _write(self, data: memoryview | bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done


class _SeenIds:
    """The ids of a key version's rows, to keep each image once, without a Python object
    per id: sorted runs of the ids' first 8 bytes with their row numbers, merged as in a
    log-structured tree (a run is merged into the one before it while that one is at most
    twice as long, so there are O(log n) runs and each id takes part in O(log n) merges).
    Ids whose first 8 bytes match are then compared whole."""

    def __init__(self) -> None:
        self._runs: list[tuple[NDArray[np.uint64], NDArray[np.int64]]] = []

    def unseen(self, ids: NDArray[np.void], rows: NDArray[np.void]) -> NDArray[np.bool_]:
        """Which of ``ids`` are not among ``rows``, the ids added so far in row order."""
        keep = np.ones(len(ids), dtype=bool)
        firsts = _first_halves(ids)
        order = np.argsort(firsts)
        needles = firsts[order]  # looked up in increasing order: cache-friendly
        for keys, positions in self._runs:
            starts = np.searchsorted(keys, needles)
            found = keys[np.minimum(starts, len(keys) - 1)] == needles
            for j in np.flatnonzero(found).tolist():
                mine, at = bytes(ids[order[j]]), int(starts[j])
                while at < len(keys) and keys[at] == needles[j]:
                    if bytes(rows[positions[at]]) == mine:
                        keep[order[j]] = False
                        break
                    at += 1
        return keep

    def add(self, ids: NDArray[np.void], first_row: int) -> None:
        if not len(ids):
            return
        firsts = _first_halves(ids)
        order = np.argsort(firsts, kind="stable")
        self._runs.append((firsts[order], first_row + order))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (keys_a, rows_a), (keys_b, rows_b) = self._runs[-2:]
            keys = np.concatenate([keys_a, keys_b])
            order = np.argsort(keys, kind="stable")  # two sorted runs: a linear merge
            self._runs[-2:] = [(keys[order], np.concatenate([rows_a, rows_b])[order])]


def _first_halves(ids: NDArray[np.void]) -> NDArray[np.uint64]:
    return np.ascontiguousarray(ids).view("<u8")[0::2]


class _VersionRows:
    """The rows of one key version, appended segment by segment."""

    def __init__(self, version: int, widths: tuple[int, ...], directory: Path | None) -> None:
        codes.warm_up()  # compiles while the segments download
        self.version = version
        self.widths = widths
        self.rows = 0
        self.norms = [0.0] * len(widths)  # per level, then full
        self._norms_lock = threading.Lock()
        self.ids = _Rows(1, np.dtype("V16"))
        self.seen = _SeenIds()
        self.first32 = _Rows(widths[0], np.float32) if len(widths) > 1 else None
        # The full vectors' codes and their per-row offset, step, slack and size.
        self.codes = [_Rows(widths[-1], np.uint16),
                      *(_Rows(1, np.float32) for _ in range(SCALE_COLUMNS))]
        self.arrays: list[_Rows | _FileRows]
        if directory is None:
            self.arrays = [_Rows(width, np.float64) for width in widths]
        else:
            directory.mkdir(parents=True, exist_ok=True)
            names = [f"level{i}.f64" for i in range(len(widths) - 1)] + ["full.f64"]
            self.arrays = [_FileRows(directory / name, width)
                           for name, width in zip(names, widths, strict=True)]
            directory.rmdir()  # empty: the files are unlinked once open

    def reserve(self, more: int) -> None:
        """Room for ``more`` rows (announced by segment headers) before they arrive."""
        for rows in (self.ids, self.first32, *self.codes, *self.arrays):
            if rows is not None:
                rows.reserve(more)

    def add(self, segment: Segment, appends: _Appends, release: Callable[[], None]) -> int:
        """Append the segment's images not seen before; returns how many. The ids are
        taken now; the arrays are copied by a job of ``appends`` (into rows reserved now),
        which calls ``release`` when it no longer needs the segment's buffer."""
        ids = segment.ids
        arrays = [*segment.vectors.levels, segment.vectors.full]
        keep = self.seen.unseen(ids, self.ids.view()[:, 0])
        if not keep.all():
            if not keep.any():
                release()
                return 0
            ids, arrays = ids[keep], [a[keep] for a in arrays]
        count = len(ids)
        in_memory = [r for r in (self.first32, *self.codes, *self.arrays)
                     if isinstance(r, _Rows)]
        if any(r.room() < count for r in in_memory):
            appends.wait()  # no job may still be filling the arrays that growing replaces
            self.reserve(count)
        self.ids.append(ids.reshape(-1, 1))
        self.seen.add(ids, self.rows)
        self.rows += count
        fills = [(r.claim(count), a) for r, a in zip(self.arrays, arrays, strict=True)
                 if isinstance(r, _Rows)]
        if self.first32 is not None:
            fills.append((self.first32.claim(count), arrays[0]))
        coded = RowCodes(*(rows.claim(count) for rows in self.codes))
        files = [(r, a) for r, a in zip(self.arrays, arrays, strict=True)
                 if isinstance(r, _FileRows)]

        def fill() -> None:
            norms = [max_row_norm(a) for a in arrays]
            for target, array in fills:
                np.copyto(target, array, casting="same_kind")
            quantize_rows(arrays[-1], coded)
            with self._norms_lock:
                self.norms = [max(a, b) for a, b in zip(self.norms, norms, strict=True)]

        def write() -> None:
            for rows, array in files:
                rows.append(array)

        appends.submit(fill, write, release)
        return count

    def build(self) -> VersionIndex:
        mapped = [rows.view() for rows in self.arrays]
        vectors = EncryptedVectors(full=mapped[-1], levels=tuple(mapped[:-1]))
        index = EncryptedIndex(vectors, full_norm=self.norms[-1], level_norms=self.norms[:-1],
                               first32=None if self.first32 is None else self.first32.view(),
                               full_codes=RowCodes(*(rows.view() for rows in self.codes)))
        return VersionIndex(self.version, index, ImageIds(self.ids.view()[:, 0]))


class _Appends:
    """The copying of segments into the version arrays, in threads, off the path that
    downloads and orders them: the conversions of several segments run at once
    (each fills rows reserved for it beforehand), the cache-file writes one segment
    after the other, in key order."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(APPEND_THREADS)
        self._jobs: list[Future[None]] = []
        self._written = threading.Event()  # that of the last job submitted
        self._written.set()
        self.failure: BaseException | None = None

    def submit(self, fill: Callable[[], None], write: Callable[[], None],
               release: Callable[[], None]) -> None:
        before, written = self._written, threading.Event()
        self._written = written

        def job() -> None:
            try:
                fill()
                before.wait()  # the jobs start in order: the one before is running or done
                if self.failure is None:
                    write()
            except BaseException as exc:
                self.failure = self.failure or exc
                raise
            finally:
                written.set()
                release()

        self._jobs.append(self._pool.submit(job))

    def wait(self) -> None:
        """Until every job submitted is done; raises the first failure."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.exception()
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass
class RepoIndex:
    """Loads and caches the segments of one repository from the store."""

    store: ObjectStore
    repo_id: str
    cache_dir: Path | None = None
    _known: dict[str, int] = field(default_factory=dict)  # segment key -> key version
    _rejected: dict[str, str] = field(default_factory=dict)
    _versions: dict[int, _VersionRows] = field(default_factory=dict)
    _generation: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    snapshot: Snapshot = field(default_factory=lambda: Snapshot({}, 0, 0, {}, 0.0))

    def refresh(self) -> Snapshot:
        """List the segments, load the new ones, rebuild if any vanished."""
        with self._lock:
            prefix = layout.segments_prefix(self.repo_id)
            sizes = {k: size for k, size in self.store.list_objects(prefix) if _is_segment(k)}
            keys = sorted(sizes)
            changed = False
            if set(self._known) - set(keys):
                self._reset()
                changed = True
            self._rejected = {k: v for k, v in self._rejected.items() if k in keys}
            new = [k for k in keys if k not in self._known and k not in self._rejected]
            headers = _headers(self.store, new)
            widths = self._widths_to_serve(headers)
            announced = _announced(headers)
            for version, rows in self._versions.items():
                rows.reserve(announced.get((version, rows.widths), 0))
            appends = _Appends()
            try:
                for key, segment, release in _load(self.store, [(k, sizes[k]) for k in new]):
                    if segment is None:
                        release()
                    else:
                        changed |= self._add(key, segment, widths, announced, appends, release)
                appends.wait()
            finally:
                appends.close()  # every job done, even when the loading failed
                if appends.failure is not None:
                    self._reset()  # rows were counted that were never written: start over
            if changed or not self.snapshot.loaded_at:
                versions = {v: rows.build() for v, rows in self._versions.items() if rows.rows}
                images = sum(len(v.image_ids) for v in versions.values())
                self.snapshot = Snapshot(versions, len(self._known), images,
                                         dict(self._rejected), time.time())
                # the first level last: the engine scans it in float32, from RAM
                _warm_later([f for rows in self._versions.values()
                             for f in (*rows.arrays[1:], rows.arrays[0])
                             if isinstance(f, _FileRows)])
            else:
                self.snapshot = Snapshot(self.snapshot.versions, self.snapshot.segments,
                                         self.snapshot.images, dict(self._rejected), time.time())
            return self.snapshot

    def _widths_to_serve(self, headers: list[Header | None]) -> dict[int, tuple[int, ...]]:
        """For each key version not served yet, the vector widths most of its new images
        have (on a tie, those of the first segment in key order): one odd segment, from a
        broken writer or another key, must not decide by the luck of its random name.
        Read from the segments' headers (64 bytes each), so the segments themselves can
        still be streamed one after the other."""
        images: dict[int, dict[tuple[int, ...], int]] = {}
        for header in headers:
            if header is not None and header[0] not in self._versions:
                version, count, widths = header
                by_widths = images.setdefault(version, {})
                by_widths[widths] = by_widths.get(widths, 0) + count
        return {version: max(by_widths, key=lambda w: by_widths[w])
                for version, by_widths in images.items()}

    def _add(self, key: str, segment: Segment | SegmentError,
             widths: dict[int, tuple[int, ...]],
             announced: dict[tuple[int, tuple[int, ...]], int],
             appends: _Appends, release: Callable[[], None]) -> bool:
        if isinstance(segment, SegmentError):
            release()
            self._rejected[key] = segment.reason
            log.error("rejected %s", segment)
            return True
        rows = self._versions.get(segment.key_version)
        if rows is None:
            directory = None
            if self.cache_dir is not None:
                directory = (self.cache_dir / self.repo_id /
                             f"g{self._generation}-v{segment.key_version}")
            rows = _VersionRows(segment.key_version,
                                widths.get(segment.key_version, segment.vectors.widths),
                                directory)
            rows.reserve(announced.get((rows.version, rows.widths), 0))
            self._versions[segment.key_version] = rows
        if segment.vectors.widths != rows.widths:
            self._rejected[key] = (f"vector widths {list(segment.vectors.widths)} differ from "
                                   f"{list(rows.widths)}, those of the other segments of key "
                                   f"version {segment.key_version}")
            log.error("rejected segment %s: %s", key, self._rejected[key])
            release()
            return True
        rows.add(segment, appends, release)
        self._known[key] = segment.key_version
        return True

    def _reset(self) -> None:
        """Forget everything (a segment vanished): the next load starts from the bucket.
        The old cache files are freed when the last snapshot that maps them is gone."""
        self._known.clear()
        self._versions.clear()
        self._generation += 1


_warming = threading.Lock()  # one readahead at a time: they compete for the same disk


def _warm_later(files: list[_FileRows]) -> None:
    """Warm the cache files in a background thread: the refresh answers at once."""
    if files:
        def warm() -> None:
            with _warming:
                for rows in files:
                    rows.warm()

        threading.Thread(target=warm, name="radcrypt-warm-cache", daemon=True).start()


def _is_segment(key: str) -> bool:
    try:
        layout.parse_segment_key(key)
    except ValueError:
        return False
    return True


def _headers(store: ObjectStore, keys: list[str]) -> list[Header | None]:
    """(key version, count, widths) of each segment, None where unreadable."""

    def one(key: str) -> Header | None:
        try:
            return read_header(store.get_range(key, 0, HEADER_SIZE), key)
        except (SegmentError, ObjectNotFound):
            return None

    if not keys:
        return []
    with ThreadPoolExecutor(min(HEADER_THREADS, len(keys))) as pool:
        return list(pool.map(one, keys))


def _announced(headers: list[Header | None]) -> dict[tuple[int, tuple[int, ...]], int]:
    """How many rows the headers announce per key version and widths: room to reserve
    (an upper bound: duplicates and rejected segments add fewer)."""
    counts: dict[tuple[int, tuple[int, ...]], int] = {}
    for header in headers:
        if header is not None:
            version, count, widths = header
            counts[version, widths] = counts.get((version, widths), 0) + count
    return counts


class _Buffers:
    """Download buffers, reused from one segment to the next."""

    def __init__(self) -> None:
        self._free: list[NDArray[np.uint8]] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> NDArray[np.uint8]:
        with self._lock:
            sizes = [b.size for b in self._free]
            fitting = [i for i, free in enumerate(sizes) if free >= size]
            if fitting:
                return self._free.pop(min(fitting, key=sizes.__getitem__))
            if self._free:  # all too small for this segment: a bigger one replaces one
                self._free.pop(sizes.index(max(sizes)))
        return np.empty(size, dtype=np.uint8)

    def give(self, buffer: NDArray[np.uint8]) -> None:
        with self._lock:
            self._free.append(buffer)


_Loaded = tuple[Segment, NDArray[np.uint8]] | SegmentError | None


def _load(store: ObjectStore, keys: list[tuple[str, int]]
          ) -> Iterator[tuple[str, Segment | SegmentError | None, Callable[[], None]]]:
    """Download and validate segments (key, listed size) in parallel, yielded in key
    order (None: vanished) as soon as each is ready, so that appending one overlaps
    downloading the next ones. A segment yielded is a view of a download buffer that is
    reused once its ``release`` is called (from any thread); at most AHEAD_BYTES (or one
    segment) are downloading or held."""
    buffers = _Buffers()
    held = [0]  # bytes downloading or downloaded and not released
    released = threading.Condition()

    def one(key: str, length: int) -> _Loaded:
        taken: list[NDArray[np.uint8]] = []

        def buffer(size: int) -> memoryview:
            taken.append(buffers.take(size))
            return memoryview(taken[-1])[:size]

        try:
            segment = read_segment(store.iter_chunks(key, CHUNK_BYTES), key, buffer, length)
        except BaseException as exc:
            for unused in taken:
                buffers.give(unused)
            if isinstance(exc, SegmentError):
                return exc
            if isinstance(exc, ObjectNotFound):
                return None
            raise
        return segment, taken[0]

    def releaser(size: int, buffer: NDArray[np.uint8] | None) -> Callable[[], None]:
        done = [False]

        def release() -> None:
            with released:
                if done[0]:
                    return
                done[0] = True
            if buffer is not None:
                buffers.give(buffer)
            with released:
                held[0] -= size
                released.notify_all()

        return release

    if not keys:
        return
    todo = deque(keys)
    pending: deque[tuple[str, int, Future[_Loaded]]] = deque()
    with ThreadPoolExecutor(min(LOAD_THREADS, len(keys))) as pool:
        try:
            while todo or pending:
                while todo and len(pending) < AHEAD_SEGMENTS:
                    size = todo[0][1]
                    with released:
                        if held[0] and held[0] + size > AHEAD_BYTES:
                            if pending:
                                break  # the next segment in order first
                            # everything held is being appended: wait for some of it
                            while held[0] and held[0] + size > AHEAD_BYTES:
                                released.wait()
                        held[0] += size
                    key, size = todo.popleft()
                    pending.append((key, size, pool.submit(one, key, size)))
                key, size, future = pending.popleft()
                loaded = future.result()
                if isinstance(loaded, tuple):
                    yield key, loaded[0], releaser(size, loaded[1])
                else:
                    yield key, loaded, releaser(size, None)
        finally:
            for _, _, future in pending:
                future.cancel()
