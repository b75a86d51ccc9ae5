"""The rows the search service holds for a repository: per key version, the float64
arrays of every bound level and of the full ciphertexts, a float32 copy of the first level,
sixteen-bit codes of the full vectors and the image ids, appended segment by segment.

Memory. With a cache directory, each key version's float64 arrays are appended to files
there (unlinked as soon as they are open, so that nothing outlives the process) and
memory-mapped read-only: in RAM live only a float32 copy of the first bound level (the
one level every query scans) and sixteen-bit codes of the full vectors (scanned when the
bounds cannot prune, cloud/codes.py); the float64 arrays are paged in for the few
candidates that reach them. Without one (tests, small repositories) the arrays live in
memory.

Every array has room reserved for all the rows the segments' headers announce (untouched
room costs no resident memory; nothing is concatenated afterwards); a segment's rows are
converted once to float32 (and codes) into that room, and written once to the cache files
with O_DIRECT, which bypasses the page cache and its dirty-page throttling (see FileRows).
Which segments arrive, and in which order, is decided by cloud/repo_index.py; how they
are downloaded, by cloud/segment_download.py.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
from numpy.typing import NDArray

from cloud import codes
from cloud.codes import SCALE_COLUMNS, RowCodes, quantize_rows
from cloud.search import EncryptedIndex, max_row_norm
from cloud.segment_download import Appends
from cloud.segments import Segment
from crypto.tokens import EncryptedVectors

DIRECT_IO = True  # cache files written with O_DIRECT where available
DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, length and file offset multiples of this
STAGE_BYTES = 8 << 20  # per cache file, while loading
WARM_BYTES = 1 << 20  # readahead asked at a time, after a load


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


def raw_ids(image_ids: Sequence[str]) -> NDArray[np.void]:
    """The 16-byte ids of a key version's rows as one contiguous array, in row order:
    ImageIds' own array, or made from a sequence of 32-hex-character strings."""
    raw: NDArray[np.void] | None = getattr(image_ids, "_raw", None)
    if raw is not None:
        return np.ascontiguousarray(raw)
    return np.frombuffer(b"".join(bytes.fromhex(i) for i in image_ids), dtype="V16")


class Rows:
    """A 2-D array in memory that rows are appended to. A view of its first rows stays
    valid and unchanged while rows are appended, so a snapshot can hold one while the
    next refresh appends; growing allocates a new array with room to spare (pages never
    written are never resident) and leaves the old one to the snapshots that hold it."""

    def __init__(self, width: int, dtype: np.dtype | type) -> None:
        self.array: NDArray[Any] = np.empty((0, width), dtype)
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

    def claim(self, count: int) -> NDArray[Any]:
        """The next ``count`` rows (within the room reserved), to be filled by the caller."""
        assert count <= self.room()
        self.rows += count
        return self.array[self.rows - count : self.rows]

    def append(self, data: NDArray[Any]) -> None:
        self.reserve(len(data))
        np.copyto(self.claim(len(data)), data, casting="same_kind")

    def view(self) -> NDArray[Any]:
        return self.array[: self.rows]


class FileRows:
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
        view = np.ascontiguousarray(data, dtype="<f8").data.cast("B")
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
        from a background thread (see warm_later)."""
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


class SeenIds:
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


class VersionRows:
    """The rows of one key version, appended segment by segment."""

    def __init__(self, version: int, widths: tuple[int, ...], directory: Path | None) -> None:
        codes.warm_up()  # compiles while the segments download
        self.version = version
        self.widths = widths
        self.rows = 0
        self.norms = [0.0] * len(widths)  # per level, then full
        self._norms_lock = threading.Lock()
        self.ids = Rows(1, np.dtype("V16"))
        self.seen = SeenIds()
        self.first32 = Rows(widths[0], np.float32) if len(widths) > 1 else None
        # The full vectors' codes and their per-row offset, step, slack and size.
        self.codes = [Rows(widths[-1], np.uint16),
                      *(Rows(1, np.float32) for _ in range(SCALE_COLUMNS))]
        self.arrays: list[Rows | FileRows]
        if directory is None:
            self.arrays = [Rows(width, np.float64) for width in widths]
        else:
            directory.mkdir(parents=True, exist_ok=True)
            names = [f"level{i}.f64" for i in range(len(widths) - 1)] + ["full.f64"]
            self.arrays = [FileRows(directory / name, width)
                           for name, width in zip(names, widths, strict=True)]
            directory.rmdir()  # empty: the files are unlinked once open

    def reserve(self, more: int) -> None:
        """Room for ``more`` rows (announced by segment headers) before they arrive."""
        for rows in (self.ids, self.first32, *self.codes, *self.arrays):
            if rows is not None:
                rows.reserve(more)

    def add(self, segment: Segment, appends: Appends, release: Callable[[], None]) -> int:
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
                     if isinstance(r, Rows)]
        if any(r.room() < count for r in in_memory):
            appends.wait()  # no job may still be filling the arrays that growing replaces
            self.reserve(count)
        self.ids.append(ids.reshape(-1, 1))
        self.seen.add(ids, self.rows)
        self.rows += count
        fills = [(r.claim(count), a) for r, a in zip(self.arrays, arrays, strict=True)
                 if isinstance(r, Rows)]
        if self.first32 is not None:
            fills.append((self.first32.claim(count), arrays[0]))
        coded = RowCodes(*(rows.claim(count) for rows in self.codes))
        files = [(r, a) for r, a in zip(self.arrays, arrays, strict=True)
                 if isinstance(r, FileRows)]

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

    def build(self) -> tuple[EncryptedIndex, ImageIds]:
        """The rows so far as a searchable index and its image ids (views: later appends
        leave them unchanged)."""
        mapped = [rows.view() for rows in self.arrays]
        vectors = EncryptedVectors(full=mapped[-1], levels=tuple(mapped[:-1]))
        index = EncryptedIndex(vectors, full_norm=self.norms[-1], level_norms=self.norms[:-1],
                               first32=None if self.first32 is None else self.first32.view(),
                               full_codes=RowCodes(*(rows.view() for rows in self.codes)))
        return index, ImageIds(self.ids.view()[:, 0])


_warming = threading.Lock()  # one readahead at a time: they compete for the same disk


def warm_later(files: list[FileRows]) -> None:
    """Warm the cache files in a background thread: the refresh answers at once."""
    if files:
        def warm() -> None:
            with _warming:
                for rows in files:
                    rows.warm()

        threading.Thread(target=warm, name="radcrypt-warm-cache", daemon=True).start()

