"""The search service's view of one repository: its segments, loaded once, appended to.

Segments are immutable once written (the commit point of an import batch), so the view
only ever appends the rows of segments it has not seen; when a segment it serves is no
longer to be served (gone from the bucket, removed or replaced in the log) the view is
rebuilt. A segment that fails validation, or whose vector widths differ from those of its
key version (those most of the version's images have when it is first loaded), is
reported and skipped; the others keep serving. Rows are grouped by key version, because a
query token only matches ciphertexts made with the same keys, and an image already
present (imported twice, by two workstations at once) is kept once.

Which segments: in format 1, every segment listed in the bucket. In format 2
(docs/FORMAT-2.md 5.5, 6.2) exactly the live segments of the segment log, verified
with the owner keys the service trusts (cloud/log_trust.py) and extended entry by entry
from the last verified state; a segment only in the bucket is never loaded, and a live one
that is missing or whose SHA-256 is not the log's is not searched and reported in
``rejected``. Each snapshot names its head and the digest of the segments it searched, so
that a client can tell a complete answer from an incomplete one. When the log does not
verify, the last verified snapshot keeps serving and says why in ``log_error``.

The rows themselves (memory, cache files) are cloud/index_rows.py; the streaming of
segments from the store, cloud/segment_download.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cloud import layout
from cloud.backend import Store
from cloud.index_rows import FileRows, ImageIds, VersionRows, warm_later
from cloud.log_trust import LogTrustError, service_trust
from cloud.search import EncryptedIndex
from cloud.seglog import LogState, set_digest, verify_log
from cloud.segment_download import Appends, Header, load_segments, read_headers
from cloud.segments import Segment, SegmentError
from crypto.errors import FormatError

__all__ = ["ImageIds", "RepoIndex", "Snapshot", "VersionIndex"]

log = logging.getLogger(__name__)
ZERO_HASH = b"\0" * 32


@dataclass(frozen=True)
class VersionIndex:
    """Everything searchable under one key version: the index and its image ids."""

    key_version: int
    index: EncryptedIndex
    image_ids: Sequence[str]


@dataclass(frozen=True)
class Snapshot:
    """An immutable state a search reads while a refresh may build the next one.

    ``head``/``head_hash`` are the verified log head of a format-2 repository (0 and zero
    bytes for format 1), ``segment_ids`` the ids of the segments searched per key version
    (sorted) and ``set_digests`` their segment-set digest (docs/FORMAT-2.md 6.1),
    which the client compares with the live set it verified. ``log_error`` says why the
    last refresh could not verify the log: the snapshot is then the last verified one."""

    versions: dict[int, VersionIndex]
    segments: int
    images: int
    rejected: dict[str, str]
    loaded_at: float
    head: int = 0
    head_hash: bytes = ZERO_HASH
    set_digests: dict[int, bytes] = field(default_factory=dict)
    segment_ids: dict[int, list[str]] = field(default_factory=dict)
    log_error: str | None = None


@dataclass(frozen=True)
class _Target:
    """What one refresh is to serve: segment key -> listed size, the SHA-256 the log
    names for each (None: format 1, no log), live segments absent from the bucket, the
    key version the log gives each, and the verified head."""

    sizes: dict[str, int]
    expected: dict[str, bytes] | None = None
    missing: dict[str, str] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    head: int = 0
    head_hash: bytes = ZERO_HASH


@dataclass
class RepoIndex:
    """Loads and caches the segments of one repository from the store.

    With ``owner_keys`` (the service's configured owner keys) a format-2 repository's
    segment log is verified at every refresh and exactly its live segments are loaded;
    without, every repository is read as format 1 (every segment listed)."""

    store: Store
    repo_id: str
    cache_dir: Path | None = None
    owner_keys: Sequence[bytes] = ()
    _known: dict[str, int] = field(default_factory=dict)  # segment key -> key version
    _rejected: dict[str, str] = field(default_factory=dict)
    _versions: dict[int, VersionRows] = field(default_factory=dict)
    _generation: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _log: LogState | None = None  # the last verified log (format 2)
    _manifest_sequence: int = 0  # the highest manifest sequence verified (format 2)
    _began: float = float("-inf")  # when the last refresh began (time.monotonic)
    # Read the new rows' cache files into memory before the snapshot that maps them is
    # served (warm_now): the first queries after a load then do not wait for the disk.
    warm_before_serving: bool = True
    # Called with (segment key, segment) for every segment accepted (its SHA-256 checked
    # against the log), before its buffer is released: the keyword side keeps its ids and
    # dictionary (cloud/keyword_store.py) without reading the segment a second time.
    on_segment: Callable[[str, Segment], None] | None = None
    snapshot: Snapshot = field(default_factory=lambda: Snapshot({}, 0, 0, {}, 0.0))

    def refresh(self, min_head: int = 0) -> Snapshot:
        """Verify the log (format 2) or list the segments (format 1), load the new ones,
        rebuild if any that were loaded are no longer to be served. With ``min_head``
        (a head a client verified) the snapshot is returned as is when it already reaches
        that head, or when a refresh began after this call did: the requests that waited
        for one re-read do not each start another."""
        arrived = time.monotonic()
        with self._lock:
            snap = self.snapshot
            if min_head > 0 and snap.loaded_at and (
                    (snap.log_error is None and snap.head >= min_head)
                    or self._began >= arrived):
                return snap
            self._began = time.monotonic()
            try:
                target = self._target()
            except (ValueError, FormatError) as exc:  # LogError, LogTrustError
                log.error("repository %s: log not verified, serving head %d: %s",
                          self.repo_id, snap.head, exc)
                self.snapshot = replace(snap, loaded_at=time.time(), log_error=str(exc))
                return self.snapshot
            return self._load(target)

    # --- what to serve ---------------------------------------------------------------------

    def _target(self) -> _Target:
        prefix = layout.segments_prefix(self.repo_id)
        sizes = {k: size for k, size in self.store.list_objects(prefix) if _is_segment(k)}
        trust = service_trust(self.store, self.repo_id, self.owner_keys) if self.owner_keys \
            else None
        if trust is None:
            if self._log is not None:
                raise LogTrustError(f"manifest of repository {self.repo_id!r} no longer says "
                                    "format 2 (a log was verified before)")
            return _Target(sizes)
        if trust.manifest_sequence < self._manifest_sequence:
            raise LogTrustError(f"manifest of repository {self.repo_id!r}: sequence "
                                f"{trust.manifest_sequence} is below {self._manifest_sequence}, "
                                "already verified (a rollback)")
        state = verify_log(self.store, self.repo_id, trust,
                           remembered=self._log.head if self._log is not None else None,
                           since=self._log)
        self._log, self._manifest_sequence = state, trust.manifest_sequence
        live = {layout.segment_key(self.repo_id, obj.id): obj for obj in state.segments()}
        return _Target(
            sizes={k: sizes[k] for k in live if k in sizes},
            expected={k: obj.sha256 for k, obj in live.items()},
            missing={k: "live in the segment log but missing from the bucket"
                     for k in live if k not in sizes},
            versions={k: obj.key_version for k, obj in live.items()},
            head=state.head.sequence, head_hash=state.head.hash)

    # --- loading ---------------------------------------------------------------------------

    def _load(self, target: _Target) -> Snapshot:
        keys = sorted(target.sizes)
        changed = False
        if set(self._known) - set(keys):
            self._reset()
            changed = True
        self._rejected = {k: v for k, v in self._rejected.items() if k in target.sizes}
        new = [k for k in keys if k not in self._known and k not in self._rejected]
        headers = read_headers(self.store, new)
        widths = self._widths_to_serve(headers)
        announced = _announced(headers)
        for version, rows in self._versions.items():
            rows.reserve(announced.get((version, rows.widths), 0))
        appends = Appends()
        try:
            listed = [(k, target.sizes[k]) for k in new]
            for key, segment, release in load_segments(self.store, listed,
                                                       expected_sha256=target.expected):
                if segment is None:
                    release()
                    continue
                logged = target.versions.get(key)
                if (logged is not None and not isinstance(segment, SegmentError)
                        and segment.key_version != logged):
                    segment = SegmentError(key, f"key version {segment.key_version} differs "
                                                f"from {logged}, that of the segment log")
                changed |= self._add(key, segment, widths, announced, appends, release)
            appends.wait()
        finally:
            appends.close()  # every job done, even when the loading failed
            if appends.failure is not None:
                self._reset()  # rows were counted that were never written: start over
        rejected = {**self._rejected, **target.missing}
        old = self.snapshot
        if changed or not old.loaded_at:
            versions = {v: VersionIndex(v, *rows.build())
                        for v, rows in self._versions.items() if rows.rows}
            images = sum(len(v.image_ids) for v in versions.values())
            # the first level last: the engine scans it in float32, from RAM
            files = [f for rows in self._versions.values()
                     for f in (*rows.arrays[1:], rows.arrays[0]) if isinstance(f, FileRows)]
            if self.warm_before_serving:
                warm_now(files, versions.values())
            else:
                warm_later(files)
        else:
            versions, images = old.versions, old.images
        searched = self._searched(target)
        self.snapshot = Snapshot(
            versions, len(self._known), images, rejected, time.time(),
            head=target.head, head_hash=target.head_hash,
            set_digests={v: set_digest(self.repo_id, v, ids) for v, ids in searched.items()},
            segment_ids=searched)
        return self.snapshot

    def _searched(self, target: _Target) -> dict[int, list[str]]:
        """The ids of the segments loaded, per key version, sorted; every key version the
        log names has an entry (empty when none of its segments could be loaded)."""
        ids: dict[int, list[str]] = {v: [] for v in target.versions.values()}
        for key, version in self._known.items():
            ids.setdefault(version, []).append(layout.parse_segment_key(key)[1])
        return {v: sorted(found) for v, found in sorted(ids.items())}

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
        if self.on_segment is not None:
            self.on_segment(key, segment)
        rows.add(segment, appends, release)
        self._known[key] = segment.key_version
        return True

    def _reset(self) -> None:
        """Forget everything (a segment vanished): the next load starts from the bucket.
        The old cache files are freed when the last snapshot that maps them is gone."""
        self._known.clear()
        self._versions.clear()
        self._generation += 1


PAGE_FLOATS = 512  # float64 values in a 4 KiB page


def warm_now(files: Sequence[FileRows], versions: Iterable[VersionIndex]) -> None:
    """Have the system read the cache files (written with O_DIRECT, so not in the page
    cache) now, and wait for them: readahead hints first (cloud/index_rows.py), then one
    value of every page of every memory-mapped array of the new snapshot is read. Without
    it the first queries after a (re)load each waited for the disk, row by row (about
    1 ms a row on a virtual disk). Pages already in memory cost a memory access each."""
    for rows in files:
        rows.warm()
    for version in versions:
        index = version.index
        for array in (index.full, *index.levels):
            flat = array.reshape(-1)
            if flat.size:
                float(np.add.reduce(flat[::PAGE_FLOATS]))


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

