"""The search service's view of one repository: its segments, loaded once, appended to.

Segments are immutable once written (the commit point of an import batch), so the view
only ever appends the rows of segments it has not seen; when a segment disappears
(garbage collection, a key rotation) the view is rebuilt from the bucket. A segment that
fails validation, or whose vector widths differ from those of its key version (those
most of the version's images have when it is first loaded), is reported and skipped; the
others keep serving. Rows are grouped by key version, because a query token only matches
ciphertexts made with the same keys, and an image already present (imported twice, by two
workstations at once) is kept once.

Memory. With a cache directory, each key version's arrays are appended to files there
and memory-mapped read-only: only float32 copies live in RAM, of the first bound level
(the one level every query scans) and of the full vectors (scanned when the bounds
cannot prune); the float64 arrays are paged in for the few candidates that reach them.
Without one (tests, small repositories) the arrays live in memory.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from cloud import layout
from cloud.search import EncryptedIndex
from cloud.segments import Segment, SegmentError, decode_segment, read_header
from cloud.store import ObjectNotFound, ObjectStore
from crypto.tokens import EncryptedVectors

log = logging.getLogger(__name__)
LOAD_THREADS = 8


@dataclass(frozen=True)
class VersionIndex:
    """Everything searchable under one key version: the index and its image ids."""

    key_version: int
    index: EncryptedIndex
    image_ids: list[str]


@dataclass(frozen=True)
class Snapshot:
    """An immutable state a search reads while a refresh may build the next one."""

    versions: dict[int, VersionIndex]
    segments: int
    images: int
    rejected: dict[str, str]
    loaded_at: float


def _max_norm(a: NDArray[np.float64]) -> float:
    return float(np.sqrt(np.max(np.einsum("ij,ij->i", a, a)))) if a.shape[0] else 0.0


@dataclass
class _VersionRows:
    """The rows of one key version, appended segment by segment."""

    version: int
    widths: tuple[int, ...]
    directory: Path | None
    rows: int = 0
    ids: list[NDArray[np.void]] = field(default_factory=list)
    seen: set[bytes] = field(default_factory=set)
    first32: list[NDArray[np.float32]] = field(default_factory=list)
    full32: list[NDArray[np.float32]] = field(default_factory=list)
    chunks: list[EncryptedVectors] = field(default_factory=list)  # memory mode only
    norms: list[float] = field(default_factory=list)  # per level, then full

    def __post_init__(self) -> None:
        self.norms = [0.0] * len(self.widths)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for path in self._files():
                path.write_bytes(b"")

    def _files(self) -> list[Path]:
        assert self.directory is not None
        count = len(self.widths) - 1
        return [self.directory / f"level{i}.f64" for i in range(count)] + [
            self.directory / "full.f64"]

    def add(self, segment: Segment) -> int:
        """Append the segment's images not seen before; returns how many."""
        raw_ids = [bytes(i) for i in segment.ids]
        keep = np.fromiter((i not in self.seen for i in raw_ids), dtype=bool, count=len(raw_ids))
        if not keep.any():
            return 0
        self.seen.update(i for i, k in zip(raw_ids, keep, strict=True) if k)
        vectors = segment.vectors
        arrays = [a[keep] if not keep.all() else a for a in (*vectors.levels, vectors.full)]
        self.ids.append(segment.ids[keep])
        self.norms = [max(old, _max_norm(a)) for old, a in zip(self.norms, arrays, strict=True)]
        if len(arrays) > 1:
            self.first32.append(arrays[0].astype(np.float32))
        self.full32.append(arrays[-1].astype(np.float32))
        if self.directory is None:
            self.chunks.append(EncryptedVectors(full=np.ascontiguousarray(arrays[-1]),
                                                levels=tuple(arrays[:-1])))
        else:
            for path, array in zip(self._files(), arrays, strict=True):
                with path.open("ab") as out:  # a view of the segment's bytes: no copy
                    out.write(memoryview(np.ascontiguousarray(array, dtype="<f8")))
        added = int(keep.sum())
        self.rows += added
        return added

    def build(self) -> VersionIndex:
        if self.directory is None:
            vectors = EncryptedVectors(
                full=np.concatenate([c.full for c in self.chunks]),
                levels=tuple(np.concatenate([c.levels[i] for c in self.chunks])
                             for i in range(len(self.widths) - 1)))
        else:
            mapped = [np.memmap(path, dtype="<f8", mode="r", shape=(self.rows, width))
                      for path, width in zip(self._files(), self.widths, strict=True)]
            vectors = EncryptedVectors(full=mapped[-1], levels=tuple(mapped[:-1]))
        # Concatenate once and keep only the result: holding the chunks too would double
        # the largest arrays of the service (the float32 copies).
        self.first32 = [np.concatenate(self.first32)] if self.first32 else []
        self.full32 = [np.concatenate(self.full32)]
        self.ids = [np.concatenate(self.ids)]
        index = EncryptedIndex(vectors, full_norm=self.norms[-1], level_norms=self.norms[:-1],
                               first32=self.first32[0] if self.first32 else None,
                               full32=self.full32[0])
        return VersionIndex(self.version, index, [bytes(i).hex() for i in self.ids[0]])


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
            keys = sorted(k for k in self.store.list_keys(prefix) if _is_segment(k))
            changed = False
            if set(self._known) - set(keys):
                self._reset()
                changed = True
            self._rejected = {k: v for k, v in self._rejected.items() if k in keys}
            new = [k for k in keys if k not in self._known and k not in self._rejected]
            widths = self._widths_to_serve(new)
            for key, segment in _load(self.store, new):
                if segment is not None:
                    changed |= self._add(key, segment, widths)
            if changed or not self.snapshot.loaded_at:
                versions = {v: rows.build() for v, rows in self._versions.items() if rows.rows}
                images = sum(len(v.image_ids) for v in versions.values())
                self.snapshot = Snapshot(versions, len(self._known), images,
                                         dict(self._rejected), time.time())
            else:
                self.snapshot = Snapshot(self.snapshot.versions, self.snapshot.segments,
                                         self.snapshot.images, dict(self._rejected), time.time())
            return self.snapshot

    def _widths_to_serve(self, new: list[str]) -> dict[int, tuple[int, ...]]:
        """For each key version not served yet, the vector widths most of its new images
        have (on a tie, those of the first segment in key order): one odd segment, from a
        broken writer or another key, must not decide by the luck of its random name.
        Read from the segments' headers (64 bytes each), so the segments themselves can
        still be streamed one after the other."""
        images: dict[int, dict[tuple[int, ...], int]] = {}
        for header in _headers(self.store, new):
            if header is not None and header[0] not in self._versions:
                version, count, widths = header
                by_widths = images.setdefault(version, {})
                by_widths[widths] = by_widths.get(widths, 0) + count
        return {version: max(by_widths, key=lambda w: by_widths[w])
                for version, by_widths in images.items()}

    def _add(self, key: str, segment: Segment | SegmentError,
             widths: dict[int, tuple[int, ...]]) -> bool:
        if isinstance(segment, SegmentError):
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
            self._versions[segment.key_version] = rows
        if segment.vectors.widths != rows.widths:
            self._rejected[key] = (f"vector widths {list(segment.vectors.widths)} differ from "
                                   f"{list(rows.widths)}, those of the other segments of key "
                                   f"version {segment.key_version}")
            log.error("rejected segment %s: %s", key, self._rejected[key])
            return True
        rows.add(segment)
        self._known[key] = segment.key_version
        return True

    def _reset(self) -> None:
        """Forget everything (a segment vanished): the next load starts from the bucket.
        Old cache files stay until the snapshot that maps them is gone; a new generation
        directory keeps the two apart."""
        self._known.clear()
        self._versions.clear()
        self._generation += 1
        if self.cache_dir is not None:
            for old in (self.cache_dir / self.repo_id).glob(f"g{self._generation - 2}-*"):
                shutil.rmtree(old, ignore_errors=True)


def _is_segment(key: str) -> bool:
    try:
        layout.parse_segment_key(key)
    except ValueError:
        return False
    return True


def _headers(store: ObjectStore, keys: list[str]
             ) -> list[tuple[int, int, tuple[int, ...]] | None]:
    """(key version, count, widths) of each segment, None where unreadable."""

    def one(key: str) -> tuple[int, int, tuple[int, ...]] | None:
        try:
            return read_header(store.get_range(key, 0, 64), key)
        except (SegmentError, ObjectNotFound):
            return None

    if not keys:
        return []
    with ThreadPoolExecutor(min(LOAD_THREADS, len(keys))) as pool:
        return list(pool.map(one, keys))


def _load(store: ObjectStore, keys: list[str]
          ) -> Iterator[tuple[str, Segment | SegmentError | None]]:
    """Download and validate segments in parallel, yielded in key order (None: vanished)
    as soon as each is ready, so that appending one overlaps downloading the next."""

    def one(key: str) -> Segment | SegmentError | None:
        try:
            return decode_segment(store.get(key), key)
        except SegmentError as exc:
            return exc
        except ObjectNotFound:
            return None

    if not keys:
        return
    with ThreadPoolExecutor(min(LOAD_THREADS, len(keys))) as pool:
        yield from zip(keys, pool.map(one, keys), strict=True)
