"""Segments from disk straight into device memory, through small reused pinned buffers.

A segment's sections are 64-byte aligned arrays (cloud/segments.py). Each thread reads a
segment file a chunk at a time into its own page-locked ("pinned") host buffer, adds the
chunk to the SHA-256 and copies it to the device at the bus's speed; the host never
holds a whole segment. Once the last chunk is in, the checksum is compared, and the
rest of what decode_segment checks is checked where the bytes now are: finite numbers
on the device, distinct ids on the host (16 bytes a row). Only then are the segment's
rows copied (device to device) into the index's arrays, which were allocated once from
the headers. A segment that fails any check raises SegmentError naming its file, with
decode_segment's words, and nothing of it reaches the index.

The SHA-256 (about 1-2 GB/s on one core) bounds a thread; segments load in several
threads (file reads, hashlib and the copies release the interpreter lock).

For the search service (cloud/gpu/backend.py) two more checks, as its CPU path makes
them: ``expected_sha256``, the whole file's SHA-256 that the service verified when it
loaded the segment (format 2: the log's), is compared with no second pass (the checksum's
hash extended by its last 32 bytes), so a file changed on disk since (corrupted, or
another valid segment put in its place) is refused by name; and ``unique_ids`` keeps an
image present in several segments once, in its first segment's row, as
cloud/index_rows.py does, so that the rows are the service's rows in the same order.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from numpy.typing import NDArray

from cloud.gpu.engine import DeviceIndex
from cloud.gpu.select import Array
from cloud.segments import (
    ALIGN,
    DIGEST_SIZE,
    HEADER_SIZE_V2,
    ID_SIZE,
    SegmentError,
    SegmentHeader,
    parse_header,
)

CHUNK_BYTES = 32 << 20  # pinned staging buffer per thread


@dataclass
class Loaded:
    """A device index over the segments, their image ids (host, in row order) and what
    the load cost."""

    index: DeviceIndex
    ids: NDArray[np.void]
    bytes_read: int
    seconds: float

    @property
    def gigabytes_per_second(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0


def host_buffer(xp: ModuleType, size: int) -> NDArray[np.uint8]:
    """``size`` bytes of host memory: pinned when ``xp`` is cupy, ordinary with numpy."""
    if xp is np:
        return np.empty(size, dtype=np.uint8)
    import cupyx

    return cupyx.empty_pinned((size,), dtype=np.uint8)  # type: ignore[no-any-return]


def load_segments(xp: ModuleType, paths: Sequence[Path], *, threads: int = 4,
                  full32: bool = True, chunk_bytes: int = CHUNK_BYTES,
                  expected_sha256: Sequence[bytes | None] | None = None,
                  unique_ids: bool = False) -> Loaded:
    """Read, validate and copy segment files (same widths) into one device index.

    ``expected_sha256``: per path, the whole file's SHA-256 (None: not compared); a
    mismatch is SegmentError "does not match the segment the service verified".
    ``unique_ids``: an id already in an earlier segment (in ``paths`` order) is dropped
    with its row; without it, a repeated id across segments is kept twice.
    """
    if not paths:
        raise ValueError("no segment files to load")
    if expected_sha256 is not None and len(expected_sha256) != len(paths):
        raise ValueError("expected_sha256 needs one digest (or None) per segment file")
    start = time.perf_counter()
    headers = []
    for path in paths:
        with open(path, "rb") as f:
            headers.append(parse_header(f.read(HEADER_SIZE_V2), str(path)))
    widths = {h.widths for h in headers}
    if len(widths) != 1:
        raise SegmentError(str(paths[0]), "segments disagree on vector widths (different keys?)")
    offsets = np.concatenate([[0], np.cumsum([h.count for h in headers])]).astype(int)
    n = int(offsets[-1])
    arrays = [xp.empty((n, w), dtype=xp.float64) for w in next(iter(widths))]  # levels, full
    ids = np.empty(n, dtype="V16")
    local = threading.local()

    def staging() -> NDArray[np.uint8]:
        if getattr(local, "buffer", None) is None:
            local.buffer = host_buffer(xp, chunk_bytes)
        return local.buffer  # type: ignore[no-any-return]

    def load(i: int) -> int:
        expected = expected_sha256[i] if expected_sha256 is not None else None
        raw = _read_to_device(xp, paths[i], headers[i], staging(), expected)
        begin = int(offsets[i])
        ids[begin : begin + headers[i].count] = _sections(xp, raw, headers[i], str(paths[i]),
                                                          arrays, begin)
        return headers[i].size

    with ThreadPoolExecutor(max(1, min(threads, len(paths)))) as pool:
        total = sum(pool.map(load, range(len(paths))))
    if unique_ids and len(paths) > 1 and _has_duplicates(ids):
        ids, arrays = _first_of_each(xp, ids, arrays)
    index = DeviceIndex.from_device(xp, arrays[-1], arrays[:-1], full32=full32)
    _synchronize(xp)
    return Loaded(index, ids, total, time.perf_counter() - start)


def _read_to_device(xp: ModuleType, path: Path, header: SegmentHeader,
                    buffer: NDArray[np.uint8], expected_sha256: bytes | None = None) -> Array:
    """The whole file in device memory, its SHA-256 checked on the way (SegmentError):
    first the whole file's against ``expected_sha256`` (as decode_segment compares the
    log's before the checksum), then the checksum."""
    name, size = str(path), header.size
    actual = os.stat(path).st_size
    if actual != size:
        word = "truncated" if actual < size else "has trailing bytes"
        raise SegmentError(name, f"{word}: {actual} bytes, expected {size}")
    raw = xp.empty(size, dtype=xp.uint8)
    digest, body_end, stored = hashlib.sha256(), size - DIGEST_SIZE, b""
    view = memoryview(buffer)  # type: ignore[arg-type]
    with open(path, "rb", buffering=0) as f:
        position = 0
        while position < size:
            want = min(len(buffer), size - position)
            got = 0
            while got < want:
                read = f.readinto(view[got:want])
                if not read:
                    raise SegmentError(name, f"truncated while reading: {position + got} bytes")
                got += read
            if position < body_end:
                digest.update(view[: min(want, body_end - position)])
            if position + want > body_end:  # the stored checksum is in this chunk
                stored += bytes(view[max(0, body_end - position) : want])
            _copy(xp, raw[position : position + want], buffer[:want])
            position += want
    if expected_sha256 is not None:
        whole = digest.copy()
        whole.update(stored)
        if whole.digest() != bytes(expected_sha256):
            raise SegmentError(name, "does not match the segment the service verified "
                                     "(its SHA-256 differs: changed on disk since)")
    if digest.digest() != stored:
        raise SegmentError(name, "checksum mismatch: the segment is corrupted")
    return raw


def _sections(xp: ModuleType, raw: Array, header: SegmentHeader, name: str,
              arrays: list[Array], begin: int) -> NDArray[np.void]:
    """Check the ids and numbers of a verified segment in device memory, then copy its
    rows into ``arrays`` from row ``begin``; its ids (host)."""
    count, offset = header.count, header.header_size
    id_bytes = raw[offset : offset + ID_SIZE * count]
    ids = np.frombuffer(_host_bytes(xp, id_bytes), dtype="V16")
    if _has_duplicates(ids):
        raise SegmentError(name, "duplicate image ids")
    offset += ID_SIZE * count + (-ID_SIZE * count) % ALIGN
    views = []
    for width in header.widths:
        size = 8 * count * width
        values = raw[offset : offset + size].view(xp.float64).reshape(count, width)
        if not bool(xp.isfinite(values).all()):
            raise SegmentError(name, "contains non-finite numbers")
        views.append(values)
        offset += size + (-size) % ALIGN
    for target, values in zip(arrays, views, strict=True):
        target[begin : begin + count] = values
    _synchronize(xp)
    return ids


def _has_duplicates(ids: NDArray[np.void]) -> bool:
    """As cloud/segments.py: sorted first 8 bytes settle it for random ids; only when two
    of those agree are the whole ids compared."""
    first = np.sort(ids.view("<u8")[0::2])
    if not (first[1:] == first[:-1]).any():
        return False
    return len({bytes(i) for i in ids}) != len(ids)


def _first_of_each(xp: ModuleType, ids: NDArray[np.void], arrays: list[Array]
                   ) -> tuple[NDArray[np.void], list[Array]]:
    """The rows whose id is the first of its kind (ids are distinct within a segment,
    checked, so a repeat comes from a later segment): gathered on the device, once."""
    _, first = np.unique(ids, return_index=True)
    keep = np.sort(first)
    rows = xp.asarray(keep)
    return ids[keep], [a[rows] for a in arrays]


def _copy(xp: ModuleType, target: Array, chunk: NDArray[np.uint8]) -> None:
    """A chunk of the pinned buffer into device memory; returns when the buffer may be
    reused."""
    if xp is np:
        target[:] = chunk
    else:
        target.set(chunk)
        _synchronize(xp)


def _host_bytes(xp: ModuleType, array: Array) -> bytes:
    return bytes(np.asarray(array)) if xp is np else bytes(xp.asnumpy(array))


def _synchronize(xp: ModuleType) -> None:
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()
