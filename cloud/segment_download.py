"""The segment download pipeline of the search service: segments streamed from the store,
hashed and validated (cloud/segments.py), handed over in key order, and copied into the
rows (cloud/index_rows.py) by other threads.

Loading speed (the goal: a repository of a million images, 3 GB of segments, loaded at
200 MB/s or more on two cores). Every byte is touched as few times as possible: it
arrives in 1 MiB chunks that are hashed while still in the processor's cache and copied
into a download buffer reused from one segment to the next (fresh memory costs a page
fault per 4 KiB, more than the copy). The arrays are then views of that buffer, which
the rows convert and write once. Downloads run in threads, a bounded number of bytes
ahead (load_segments); the segments are then ordered and de-duplicated in key order, and
copied by other threads (Appends).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from numpy.typing import NDArray

from cloud.backend import ObjectNotFound, Store
from cloud.cpus import engine_threads
from cloud.segments import HEADER_SIZE_V2, Segment, SegmentError, read_header, read_segment

HEADER_THREADS = 8  # 192-byte range requests: latency, not bandwidth
LOAD_THREADS = 8  # small segments: request latency; large ones: AHEAD_BYTES bounds them
CHUNK_BYTES = 1 << 20  # hashed while in cache, then copied into the download buffer
AHEAD_BYTES = 128 << 20  # downloading, or downloaded and not yet appended, at most
AHEAD_SEGMENTS = 4 * LOAD_THREADS  # segments downloading or ready, at most
MIN_APPEND_THREADS = 2  # conversions of segments at once (they release the GIL): the
# engine's thread count (cloud/cpus.py), at least two so that one overlaps the next
Header = tuple[int, int, tuple[int, ...]]  # key version, count, widths


def read_headers(store: Store, keys: list[str]) -> list[Header | None]:
    """(key version, count, widths) of each segment (format version 1 or 2), None where
    unreadable."""

    def one(key: str) -> Header | None:
        try:
            return read_header(store.get_range(key, 0, HEADER_SIZE_V2), key)
        except (SegmentError, ObjectNotFound):
            return None

    if not keys:
        return []
    with ThreadPoolExecutor(min(HEADER_THREADS, len(keys))) as pool:
        return list(pool.map(one, keys))


class Appends:
    """The copying of segments into the version arrays, in threads, off the path that
    downloads and orders them: the conversions of several segments run at once
    (each fills rows reserved for it beforehand), the cache-file writes one segment
    after the other, in key order."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max(MIN_APPEND_THREADS, engine_threads()))
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


def load_segments(store: Store, keys: list[tuple[str, int]],
                  expected_sha256: Mapping[str, bytes] | None = None
                  ) -> Iterator[tuple[str, Segment | SegmentError | None, Callable[[], None]]]:
    """Download and validate segments (key, listed size) in parallel, yielded in key
    order (None: vanished) as soon as each is ready, so that appending one overlaps
    downloading the next ones. A segment yielded is a view of a download buffer that is
    reused once its ``release`` is called (from any thread); at most AHEAD_BYTES (or one
    segment) are downloading or held. Format versions 1 and 2 load alike (the service
    cannot check a version-2 MAC). ``expected_sha256`` (key -> the whole object's
    SHA-256, from the verified segment log): a segment of a key listed there whose bytes
    differ is SegmentError "does not match the segment log"; keys not listed there are
    not compared."""
    expected = expected_sha256 or {}
    buffers = _Buffers()
    held = [0]  # bytes downloading or downloaded and not released
    released = threading.Condition()

    def one(key: str, length: int) -> _Loaded:
        taken: list[NDArray[np.uint8]] = []

        def buffer(size: int) -> memoryview:
            taken.append(buffers.take(size))
            return taken[-1].data[:size]

        try:
            segment = read_segment(store.iter_chunks(key, CHUNK_BYTES), key, buffer, length,
                                   expected_sha256=expected.get(key))
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
