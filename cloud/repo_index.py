"""The search service's view of one repository: its segments, loaded once, appended to.

Segments are immutable once written (the commit point of an import batch), so the view
only ever appends the rows of segments it has not seen; when a segment disappears
(garbage collection, a key rotation) the view is rebuilt from the bucket. A segment that
fails validation, or whose vector widths differ from those of its key version (those
most of the version's images have when it is first loaded), is reported and skipped; the
others keep serving. Rows are grouped by key version, because a query token only matches
ciphertexts made with the same keys, and an image already present (imported twice, by two
workstations at once) is kept once.

The rows themselves (memory, cache files) are cloud/index_rows.py; the streaming of
segments from the store, cloud/segment_download.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cloud import layout
from cloud.backend import Store
from cloud.index_rows import FileRows, ImageIds, VersionRows, warm_later
from cloud.search import EncryptedIndex
from cloud.segment_download import Appends, Header, load_segments, read_headers
from cloud.segments import Segment, SegmentError

__all__ = ["ImageIds", "RepoIndex", "Snapshot", "VersionIndex"]

log = logging.getLogger(__name__)


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


@dataclass
class RepoIndex:
    """Loads and caches the segments of one repository from the store."""

    store: Store
    repo_id: str
    cache_dir: Path | None = None
    _known: dict[str, int] = field(default_factory=dict)  # segment key -> key version
    _rejected: dict[str, str] = field(default_factory=dict)
    _versions: dict[int, VersionRows] = field(default_factory=dict)
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
            headers = read_headers(self.store, new)
            widths = self._widths_to_serve(headers)
            announced = _announced(headers)
            for version, rows in self._versions.items():
                rows.reserve(announced.get((version, rows.widths), 0))
            appends = Appends()
            try:
                listed = [(k, sizes[k]) for k in new]
                for key, segment, release in load_segments(self.store, listed):
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
                versions = {v: VersionIndex(v, *rows.build())
                            for v, rows in self._versions.items() if rows.rows}
                images = sum(len(v.image_ids) for v in versions.values())
                self.snapshot = Snapshot(versions, len(self._known), images,
                                         dict(self._rejected), time.time())
                # the first level last: the engine scans it in float32, from RAM
                warm_later([f for rows in self._versions.values()
                             for f in (*rows.arrays[1:], rows.arrays[0])
                             if isinstance(f, FileRows)])
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
             appends: Appends, release: Callable[[], None]) -> bool:
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
            rows = VersionRows(segment.key_version,
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


def _is_segment(key: str) -> bool:
    try:
        layout.parse_segment_key(key)
    except ValueError:
        return False
    return True


def _announced(headers: list[Header | None]) -> dict[tuple[int, tuple[int, ...]], int]:
    """How many rows the headers announce per key version and widths: room to reserve
    (an upper bound: duplicates and rejected segments add fewer)."""
    counts: dict[tuple[int, tuple[int, ...]], int] = {}
    for header in headers:
        if header is not None:
            version, count, widths = header
            counts[version, widths] = counts.get((version, widths), 0) + count
    return counts

