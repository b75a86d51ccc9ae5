"""Migration of a format-1 repository to storage format 2 (docs/FORMAT-2.md 9.2).

Owner only, in place, resumable at every step; the segment log itself records progress:

1. the genesis entry (owner, the format-1 manifest's sequence S), or, on a re-run, the log
   verified;
2. the format-1 segments not yet named as removed (type 3) by a migration entry, grouped by
   key version (highest first, then in name order) up to 4,096 images: for each group one
   pack (each image's ``meta`` rewritten as ``radcrypt-meta-v2`` without its features,
   which go into the pack's feature array, and its preview), one format-2 segment holding
   the same rows byte for byte (the owner its writer), then one ``replace`` entry, reason
   migration, naming the format-1 segments as removed: that group is done;
3. a checkpoint at the head, then the manifest with format ``radcrypt-manifest-v2`` and
   sequence S + 1: **the commit point** (readers switch to the log, format-1 code refuses
   the manifest);
4. cleanup: format-1 segments that appeared meanwhile (an old client committed after
   step 2's listing) are migrated as in step 2, then the ``meta/`` and ``thumbs/`` objects
   of migrated images and the migrated format-1 segments are deleted.

A re-run after step 3 does only step 4. Originals (``objects/``) are never touched: same
names, same envelopes, same image ids; key versions are kept. An image named by two
format-1 segments is migrated once, from the segment of the higher key version (older
duplicates are what an interrupted format-1 revocation leaves). Because segment rows are
copied, every image stays searchable exactly once with identical scores.

Before the commit only the owner writes to the log (format-1 code knows no log, and format-2
code refuses to write to a format-1 repository), so the log is verified with the owner as
its only trusted writer; after it, with the repository's members (app/core/logstate.py).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from app.core import basis, keyword_dicts, logstate, objects
from app.core.compaction import (
    PACK_IMAGES,
    added,
    build_pack,
    build_segment,
    commit_replace,
    log_history,
)
from app.core.errors import AccessDenied, IntegrityError, RadcryptError
from app.core.importer import META_FORMAT_V2
from app.core.progress import ProgressCallback, ProgressEvent, no_progress
from app.core.repository import (
    MANIFEST_FORMAT_V2,
    Repository,
    is_format2,
    read_signed_manifest,
)
from app.core.settings import Settings
from cloud import layout, seglog
from cloud.backend import ObjectNotFound, Store
from cloud.segments import (
    HEADER_SIZE_V2,
    SegmentError,
    decode_segment,
    ids_range,
    parse_header,
)
from crypto.identity import Identity
from crypto.signed import sign_json
from crypto.tokens import EncryptedVectors

_Rows = tuple[list[str], EncryptedVectors]  # a segment's image ids and ciphertext rows
FETCH_THREADS = 8  # metadata and previews are small objects: the wait is the network

log = logging.getLogger(__name__)


@dataclass
class MigrationReport:
    """What a migration run did. ``repo``: the repository as it stands after the run (its
    manifest format 2 once ``committed``)."""

    repo: Repository | None = None
    committed: bool = False  # the format-2 manifest is published (by this run or before)
    entries: list[int] = field(default_factory=list)  # migration entries written by this run
    segments_migrated: int = 0  # format-1 segments this run's entries removed
    images: int = 0  # images this run moved into packs and format-2 segments
    duplicates: int = 0  # rows left out: the image was migrated from another segment
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image id, why)
    deleted: int = 0  # cleanup: meta/, thumbs/ and format-1 segment objects deleted
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {"repo_id": self.repo.repo_id if self.repo else None,
                "committed": self.committed, "entries": list(self.entries),
                "segments_migrated": self.segments_migrated, "images": self.images,
                "duplicates": self.duplicates,
                "skipped": [{"image_id": i, "reason": r} for i, r in self.skipped],
                "deleted": self.deleted, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class _OwnerTrust:
    """The log's trust before the commit: the owner is its only writer
    (cloud.seglog.LogTrust)."""

    owner_id: str
    owner_key: bytes
    manifest_sequence: int
    key_version: int

    def signer_key(self, user_id: str) -> bytes | None:
        return self.owner_key if user_id == self.owner_id else None


@dataclass(frozen=True)
class _V1Segment:
    seg_id: str
    key_version: int
    count: int


def migrate_to_format2(store: Store, settings: Settings, owner: Identity, repo: Repository,
                       progress: ProgressCallback = no_progress, *,
                       pack_images: int = PACK_IMAGES) -> MigrationReport:
    """Move ``repo`` to storage format 2 (module docstring); safe to run again after a
    failure at any point. ``pack_images``: images per group (pack and segment).
    Progress: "migrate" events (groups done of groups to do), then "cleanup"."""
    start = time.perf_counter()
    report = MigrationReport()
    manifest, owner_key = read_signed_manifest(store, repo.repo_id, repo.owner_key)
    if not hmac.compare_digest(owner.sign_public, owner_key) or manifest.owner != owner.user_id:
        raise AccessDenied(f"only the owner of {repo.repo_id!r} can migrate it")
    if manifest.legacy:
        raise RadcryptError(f"repository {repo.repo_id!r} has no membership list yet: run "
                            "radcrypt repo migrate (without --format) first")
    if manifest.key_version != repo.keys.version:
        raise RadcryptError(f"repository {repo.repo_id!r} is at key version "
                            f"{manifest.key_version} and this session holds "
                            f"{repo.keys.version}: open it again")
    repo = Repository(manifest, repo.ring, owner_key)
    if not is_format2(manifest):
        trust = _OwnerTrust(owner.user_id, owner_key, manifest.sequence, manifest.key_version)
        state = _start_log(store, owner, trust, repo.repo_id)
        state = _migrate_pending(store, settings, owner, repo, trust, state,
                                 lambda since: _verify(store, repo.repo_id, trust, since),
                                 report, progress, pack_images)
        repo = _commit(store, settings, owner, repo, state)
    report.committed = True
    state = logstate.verified_log(store, settings, repo)
    state = _migrate_pending(
        store, settings, owner, repo, logstate.repository_trust(store, repo), state,
        lambda since: logstate.verified_log(store, settings, repo, since=since), report,
        progress, pack_images)
    report.deleted = _cleanup(store, repo, state, progress)
    report.repo = basis.load(store, repo)
    report.seconds = time.perf_counter() - start
    return report


# --- step 1: the genesis entry -------------------------------------------------------------------


def _verify(store: Store, repo_id: str, trust: _OwnerTrust,
            since: seglog.LogState | None = None) -> seglog.LogState:
    try:
        return seglog.verify_log(store, repo_id, trust, since=since)
    except seglog.LogError as exc:
        raise IntegrityError(f"the segment log of repository {repo_id!r} does not verify: "
                             f"{exc}") from None


def _start_log(store: Store, owner: Identity, trust: _OwnerTrust, repo_id: str
               ) -> seglog.LogState:
    """The genesis entry, or the log a previous run started, verified."""
    if not store.exists(layout.log_entry_key(repo_id, 0)):
        try:
            return seglog.write_genesis(store, repo_id, owner, owner.user_id,
                                        trust.manifest_sequence, trust.key_version)
        except seglog.LogError as exc:
            if exc.reason != "genesis exists":
                raise
            # a concurrent run of the owner wrote it: read it
    return _verify(store, repo_id, trust)


# --- step 2: format-1 segments into packs and format-2 segments -----------------------------


def _v1_segments(store: Store, repo_id: str) -> list[_V1Segment]:
    """Every format-1 segment under segments/, in name order (a format-2 segment, or a
    damaged object, is not one: the latter is logged and left alone)."""
    found = []
    for key in sorted(store.list_keys(layout.segments_prefix(repo_id))):
        try:
            _, seg_id = layout.parse_segment_key(key)
            head = store.get_range(key, 0, HEADER_SIZE_V2)
        except (ValueError, ObjectNotFound):
            continue
        try:
            header = parse_header(head, seg_id)
        except SegmentError as exc:
            log.warning("repository %s: %s is not migrated: %s", repo_id, key, exc.reason)
            continue
        if header.format_version == 1:
            found.append(_V1Segment(seg_id, header.key_version, header.count))
    return found


def _migrated(store: Store, state: seglog.LogState) -> set[str]:
    """Format-1 segments named as removed by a migration entry: done (the whole history:
    a state verified from a checkpoint does not know those removed before it)."""
    return state.v1_removed | {r.id for entry in log_history(store, state)
            if entry.reason == seglog.REASON_MIGRATION
            for r in entry.removed if r.type == seglog.TYPE_V1_SEGMENT}


def _plan(pending: list[_V1Segment], limit: int) -> list[list[_V1Segment]]:
    """Groups of one key version, highest version first, in name order, up to ``limit``
    images (a bigger segment is a group of its own)."""
    groups: list[list[_V1Segment]] = []
    for version in sorted({s.key_version for s in pending}, reverse=True):
        current: list[_V1Segment] = []
        images = 0
        for segment in (s for s in pending if s.key_version == version):
            if current and images + segment.count > limit:
                groups.append(current)
                current, images = [], 0
            current.append(segment)
            images += segment.count
        if current:
            groups.append(current)
    return groups


def _migrate_pending(store: Store, settings: Settings, owner: Identity, repo: Repository,
                     trust: Any, state: seglog.LogState,
                     verify: Callable[[seglog.LogState], seglog.LogState],
                     report: MigrationReport, progress: ProgressCallback, pack_images: int,
                     ) -> seglog.LogState:
    """Migrate every format-1 segment no migration entry names yet."""
    done = _migrated(store, state)
    pending = [s for s in _v1_segments(store, repo.repo_id) if s.seg_id not in done]
    if not pending:
        return state
    groups = _plan(pending, max(1, pack_images))
    migrated = _live_image_ids(store, repo, state)
    for number, group in enumerate(groups, 1):
        loaded = {s.seg_id: _read_v1(store, repo.repo_id, s) for s in group}
        state = _migrate_group(store, settings, owner, repo, trust, state, verify, group,
                               loaded, migrated, report)
        progress(ProgressEvent("migrate", number, len(groups), item=group[0].seg_id,
                               message=f"{len(group)} format-1 segments"))
    return state


def _read_v1(store: Store, repo_id: str, segment: _V1Segment) -> _Rows:
    name = layout.segment_key(repo_id, segment.seg_id)
    try:
        decoded = decode_segment(store.get(name), segment.seg_id)
    except SegmentError as exc:
        raise IntegrityError(f"format-1 segment {segment.seg_id} of repository {repo_id!r} "
                             f"is damaged ({exc.reason}): the migration stopped before it; "
                             "remove or repair it, then run the migration again") from None
    if decoded.key_version != segment.key_version:
        raise IntegrityError(f"format-1 segment {segment.seg_id} changed while it was read")
    return decoded.id_strings(), decoded.vectors


def _live_image_ids(store: Store, repo: Repository, state: seglog.LogState) -> set[str]:
    """Images already in a live format-2 segment: never migrated twice."""
    found: set[str] = set()
    for live in state.segments():
        name = layout.segment_key(repo.repo_id, live.id)
        try:
            offset, length = ids_range(store.get_range(name, 0, HEADER_SIZE_V2), live.id)
            raw = store.get_range(name, offset, length)
            found.update(raw[i : i + 16].hex() for i in range(0, len(raw) - 15, 16))
        except (ObjectNotFound, SegmentError) as exc:
            raise IntegrityError(f"segment {live.id} of repository {repo.repo_id!r}, live in "
                                 f"its log, cannot be read ({exc}): the migration stopped"
                                 ) from None
    return found


def _migrate_group(store: Store, settings: Settings, owner: Identity, repo: Repository,
                   trust: Any, state: seglog.LogState,
                   verify: Callable[[seglog.LogState], seglog.LogState],
                   group: list[_V1Segment], loaded: dict[str, _Rows], migrated: set[str],
                   report: MigrationReport) -> seglog.LogState:
    version = group[0].key_version
    try:
        repo.ring.version(version)
    except KeyError:
        raise IntegrityError(f"the format-1 segments {', '.join(s.seg_id for s in group)} of "
                             f"{repo.repo_id!r} are of key version {version}, which the "
                             "owner's key ring does not hold: the migration stopped") from None
    rows: dict[str, tuple[int, int]] = {}  # image id -> (part, row): its first row here
    for part, segment in enumerate(group):
        for row, image_id in enumerate(loaded[segment.seg_id][0]):
            if image_id in migrated or image_id in rows:
                report.duplicates += 1
            else:
                rows[image_id] = (part, row)
    contents = _contents(store, repo, list(rows), version, report)
    keep = [(i, *rows[i]) for i in rows if i in contents]
    migrated.update(i for i, _, _ in keep)  # a skipped image may still come from another
    new_objects = []
    if keep:
        ids = [i for i, _, _ in keep]
        vectors = _select(group, loaded, keep)
        images = [(i, contents[i][0], contents[i][1]) for i in ids]
        seg_id, segment_blob = build_segment(repo, owner, version, state.head.sequence, ids,
                                             vectors, keywords=keyword_dicts.keywords_by_id(images))
        features = np.stack([contents[i][2] for i in ids])
        pack_id, pack_blob = build_pack(repo, version, images, features)
        new_objects = [(added(seglog.TYPE_PACK, pack_id, pack_blob, len(ids)), pack_blob),
                       (added(seglog.TYPE_SEGMENT, seg_id, segment_blob, len(ids)),
                        segment_blob)]
    removed = [seglog.Removed(seglog.TYPE_V1_SEGMENT, s.seg_id) for s in group]
    done = commit_replace(store, settings, repo, owner, trust, state,
                          reason=seglog.REASON_MIGRATION, key_version=version,
                          new_objects=new_objects, removed=removed,
                          verify=verify)
    if done.sequence is not None:
        report.entries.append(done.sequence)
        report.segments_migrated += len(group)
        report.images += len(keep)
    return done.state


def _select(group: list[_V1Segment], loaded: dict[str, _Rows],
            keep: list[tuple[str, int, int]]) -> EncryptedVectors:
    """The kept rows of the group's segments, in order, bytes unchanged."""
    parts = [loaded[s.seg_id][1] for s in group]
    if len({v.widths for v in parts}) != 1:
        raise IntegrityError(f"the format-1 segments {', '.join(s.seg_id for s in group)} "
                             "have different vector widths: they cannot be merged")

    def rows(arrays: list[np.ndarray]) -> np.ndarray:
        return np.stack([arrays[part][row] for _, part, row in keep])

    full = rows([np.asarray(v.full) for v in parts])
    levels = tuple(rows([np.asarray(v.levels[i]) for v in parts])
                   for i in range(len(parts[0].levels)))
    return EncryptedVectors(full=full, levels=levels)


def _contents(store: Store, repo: Repository, image_ids: list[str], version: int,
              report: MigrationReport) -> dict[str, tuple[bytes, bytes, np.ndarray]]:
    """image id -> (meta v2, preview, features) from the format-1 objects, read in
    parallel. An image whose metadata or preview is missing or does not open is left out
    (logged, named in the report), as a format-1 revocation leaves it out."""

    def one(image_id: str) -> tuple[str, tuple[bytes, bytes, np.ndarray] | str]:
        try:
            plain, _ = objects.get_decrypted(store, repo.ring, repo.repo_id, "meta",
                                             image_id, version)
            thumb, _ = objects.get_decrypted(store, repo.ring, repo.repo_id, "thumbs",
                                             image_id, version)
        except ObjectNotFound:
            return image_id, "its metadata or preview is missing"
        except IntegrityError:
            return image_id, "its metadata or preview does not open"
        try:
            meta, features = _meta_v2(plain)
        except (ValueError, KeyError, TypeError):
            return image_id, "its metadata is malformed"
        return image_id, (meta, thumb, features)

    out: dict[str, tuple[bytes, bytes, np.ndarray]] = {}
    if not image_ids:
        return out
    with ThreadPoolExecutor(min(FETCH_THREADS, len(image_ids)),
                            thread_name_prefix="radcrypt-migrate") as pool:
        for image_id, got in pool.map(one, image_ids):
            if isinstance(got, str):
                log.warning("image %s of %r is left out of the migration: %s", image_id,
                            repo.repo_id, got)
                report.skipped.append((image_id, got))
            else:
                out[image_id] = got
    return out


def _meta_v2(plain: bytes) -> tuple[bytes, np.ndarray]:
    """(meta v2 JSON, features) of a format-1 metadata object: the same record, compact,
    format ``radcrypt-meta-v2``, features moved out (FORMAT-2 3.4)."""
    record = json.loads(plain)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    features = np.asarray(record.pop("features"), dtype=np.float64)
    if features.ndim != 1 or not np.isfinite(features).all():
        raise ValueError("features are not a finite vector")
    record["format"] = META_FORMAT_V2
    return json.dumps(record, separators=(",", ":")).encode(), features


# --- step 3: the commit point ---------------------------------------------------------------


def _commit(store: Store, settings: Settings, owner: Identity, repo: Repository,
            state: seglog.LogState) -> Repository:
    """A checkpoint at the head, then the format-2 manifest (sequence + 1), unless the
    manifest changed meanwhile (another of the owner's workstations granted someone):
    publishing ours would undo that change, so the run stops and a re-run starts from the
    new manifest (the entries written so far stay valid)."""
    manifest = repo.manifest
    try:  # a previous run's checkpoint at this very head is accepted as is
        seglog.write_checkpoint(store, repo.repo_id, owner, state, manifest.sequence)
    except seglog.LogError as exc:
        raise IntegrityError(f"repository {repo.repo_id!r}: {exc}") from None
    now, _ = read_signed_manifest(store, repo.repo_id, repo.owner_key)
    if now != manifest:
        raise RadcryptError(f"the manifest of {repo.repo_id!r} changed during the migration "
                            f"(sequence {manifest.sequence} -> {now.sequence}): nothing was "
                            "committed; run the migration again")
    upgraded = replace(manifest, format=MANIFEST_FORMAT_V2, sequence=manifest.sequence + 1)
    name = layout.manifest_key(repo.repo_id)
    store.put(name, sign_json(owner, "manifest", name, json.loads(upgraded.to_json())))
    from app.core.access import _remember  # the one keeper of manifest-sequences.json

    _remember(settings, upgraded)
    return Repository(upgraded, repo.ring, repo.owner_key)


# --- step 4: cleanup ------------------------------------------------------------------------


def _cleanup(store: Store, repo: Repository, state: seglog.LogState,
             progress: ProgressCallback) -> int:
    """Delete the format-1 objects the live format-2 objects replace: ``meta/`` and
    ``thumbs/`` of images in live packs, and the migrated format-1 segments."""
    from app.core.packs import ImageReader

    live_images = ImageReader(store, repo, state).image_ids()
    doomed: list[str] = []
    for kind in ("meta", "thumbs"):
        prefix = layout.image_prefix(kind, repo.repo_id)
        doomed += [key for key in store.list_keys(prefix) if key[len(prefix):] in live_images]
    v1 = {s.seg_id for s in _v1_segments(store, repo.repo_id)}
    doomed += [layout.segment_key(repo.repo_id, seg_id)
               for seg_id in sorted(_migrated(store, state) & v1)]
    for number, key in enumerate(doomed, 1):
        store.delete(key)
        progress(ProgressEvent("cleanup", number, len(doomed), item=key.rsplit("/", 1)[-1]))
    return len(doomed)
