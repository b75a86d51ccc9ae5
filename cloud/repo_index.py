"""The search service's in-memory view of one repository: its segments, loaded once.

Segments are immutable once written (the commit point of an import batch), so the view
only ever adds the segments it has not seen and drops those that disappeared (garbage
collection, re-keying). A segment that fails validation is reported and skipped; the
others keep serving. Segments are grouped by key version: a query token only matches
ciphertexts made with the same key version.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from cloud import layout
from cloud.search import EncryptedIndex
from cloud.segments import Segment, SegmentError, decode_segment
from cloud.store import ObjectNotFound, ObjectStore
from crypto.tokens import EncryptedVectors

log = logging.getLogger(__name__)


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


@dataclass
class RepoIndex:
    """Loads and caches the segments of one repository from the store."""

    store: ObjectStore
    repo_id: str
    _segments: dict[str, Segment] = field(default_factory=dict)
    _rejected: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    snapshot: Snapshot = field(
        default_factory=lambda: Snapshot({}, 0, 0, {}, 0.0)
    )

    def refresh(self) -> Snapshot:
        """List the segments, load new ones, forget vanished ones, rebuild if changed."""
        with self._lock:
            prefix = layout.segments_prefix(self.repo_id)
            keys = sorted(k for k in self.store.list_keys(prefix) if _is_segment(k))
            changed = False
            for gone in set(self._segments) - set(keys):
                del self._segments[gone]
                changed = True
            for key in keys:
                if key in self._segments or key in self._rejected:
                    continue
                try:
                    self._segments[key] = decode_segment(self.store.get(key), key)
                    changed = True
                except SegmentError as exc:
                    self._rejected[key] = exc.reason
                    log.error("rejected %s", exc)
                except ObjectNotFound:
                    continue  # deleted between listing and reading
            self._rejected = {k: v for k, v in self._rejected.items() if k in keys}
            if changed or not self.snapshot.loaded_at:
                self.snapshot = self._build()
            else:
                self.snapshot = Snapshot(self.snapshot.versions, self.snapshot.segments,
                                         self.snapshot.images, dict(self._rejected), time.time())
            return self.snapshot

    def _build(self) -> Snapshot:
        by_version: dict[int, list[Segment]] = {}
        for key in sorted(self._segments):
            segment = self._segments[key]
            by_version.setdefault(segment.key_version, []).append(segment)
        versions: dict[int, VersionIndex] = {}
        images = 0
        for version, segments in by_version.items():
            try:
                built = _build_version(version, segments)
            except ValueError as exc:  # widths differ inside one version: a broken writer
                log.error("key version %d of %s cannot be indexed: %s", version, self.repo_id, exc)
                continue
            versions[version] = built
            images += len(built.image_ids)
        return Snapshot(versions, len(self._segments), images, dict(self._rejected), time.time())


def _is_segment(key: str) -> bool:
    try:
        layout.parse_segment_key(key)
    except ValueError:
        return False
    return True


def _build_version(version: int, segments: list[Segment]) -> VersionIndex:
    """Concatenate segments, keeping the first copy of an image imported twice."""
    all_ids = np.concatenate([segment.ids for segment in segments])
    _, first = np.unique(all_ids, return_index=True)
    keep = np.zeros(all_ids.shape[0], dtype=bool)
    keep[first] = True
    parts, start = [], 0
    for segment in segments:
        mask = keep[start : start + len(segment)]
        start += len(segment)
        vectors = segment.vectors
        if not mask.all():
            vectors = EncryptedVectors(full=vectors.full[mask],
                                       levels=tuple(a[mask] for a in vectors.levels))
        parts.append(vectors)
    ids = [bytes(i).hex() for i in all_ids[keep]]
    return VersionIndex(version, EncryptedIndex.concat(parts), ids)
