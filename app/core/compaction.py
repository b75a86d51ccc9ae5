"""Compaction of a format-2 repository: many small segments and packs become a few big ones.

Every import batch commits one segment and one pack (docs/FORMAT-2.md 3, 4), so a
repository of a million images imported 64 at a time holds 15,625 of each. Compaction
(FORMAT-2 7.1) merges the live objects of one key version that are below the targets,
smallest first, and commits each merge with one ``replace`` log entry (reason compaction).

What it never changes. Segment rows are copied byte for byte (same IndexKey, same basis),
so every score stays identical; pack entries are opened and re-sealed under the new pack's
id (its associated data binds the pack id, contract decision), feature arrays concatenated
in the new table of contents' meta order. Before each entry the image ids of the added
object are compared with those of the removed ones: each exactly once, none lost.

What it trusts. Only the verified log (app.core.logstate.verified_log): each source
segment and pack must have the SHA-256 the log names, and each source segment's MAC must
verify under its key version's index MAC key. A segment that fails either check stops the
whole compaction with an IntegrityError naming it: a forged or altered object is never
laundered into a new, validly authenticated one.

Crash safety (FORMAT-2 7.4). New objects are written first (fresh ids, create-if-absent),
then the entry, the commit point; a crash before it leaves unreferenced objects that no
reader looks at. A writer that loses the append race re-verifies the log: if the sources
are still live it appends after the winner, otherwise it abandons the group (and deletes
its own unreferenced objects). Replaced objects are deleted only once their removing
entry is older than the grace period, so a reader that listed them just before can still
fetch them; what one run had to leave, a later run deletes.

The same helpers (reading entries, merging and committing) serve the migration from
format 1 (app/core/migration.py).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.core import ckks_blocks, keyword_dicts, labels, logstate
from app.core.errors import AccessDenied, Cancelled, IntegrityError
from app.core.progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from app.core.repository import Repository, check_still_current, is_format2
from app.core.settings import Settings
from cloud import layout, seglog
from cloud.backend import ObjectNotFound, Store
from cloud.seglog_format import KIND_WORDS
from cloud.segments import (
    HEADER_SIZE_V2,
    Segment,
    SegmentAuthError,
    SegmentError,
    decode_segment,
    encode_segment_v2,
    parse_header,
    verify_segment_mac,
)
from crypto import pack as packs
from crypto.errors import DecryptionError, FormatError
from crypto.identity import Identity
from crypto.labels import LabelObject
from crypto.segment_mac import index_mac_key
from crypto.tokens import EncryptedVectors

TARGET_IMAGES = 65536  # images per compacted segment (FORMAT-2 7.1)
PACK_IMAGES = 4096  # images per compacted pack
PACK_BYTES = 256 << 20  # bytes per pack (FORMAT-2 3.5)
GRACE_SECONDS = 900  # FORMAT-2 7.4, contract: 15 minutes
LABEL_FOLD = 16
"""A segment named by this many live label objects gets them folded into one (issue 17):
the service evaluates every label object of a segment for every token."""
FETCH_THREADS = 8  # log entries are small objects: the wait is the network
_RECORD_HEAD = 4 + 1 + 32 + 64  # "RCSR" | version | signer key | signature (crypto/signed.py)

log = logging.getLogger(__name__)


@dataclass
class CompactionReport:
    """What a compaction did. ``deleted``: replaced objects deleted by this run (its own
    or an earlier run's, once past the grace period); ``deferred``: replaced objects still
    within the grace period, left for a later run."""

    segments_before: int = 0
    segments_after: int = 0
    packs_before: int = 0
    packs_after: int = 0
    entries: list[int] = field(default_factory=list)  # log sequences written
    abandoned: int = 0  # groups given up: a concurrent writer replaced their sources
    deleted: int = 0
    deferred: int = 0
    cancelled: bool = False
    seconds: float = 0.0
    labels_folded: int = 0  # label objects folded into one per segment (issue 17)

    def as_dict(self) -> dict[str, object]:
        return {"segments_before": self.segments_before, "segments_after": self.segments_after,
                "packs_before": self.packs_before, "packs_after": self.packs_after,
                "labels_folded": self.labels_folded,
                "entries": list(self.entries), "abandoned": self.abandoned,
                "deleted": self.deleted, "deferred": self.deferred,
                "cancelled": self.cancelled, "seconds": round(self.seconds, 3)}


# --- shared with the migration -----------------------------------------------------------------


def require_format2(repo: Repository, what: str) -> None:
    """Draft 9.1: a format-1 repository is read-only for format-2 operations."""
    if not is_format2(repo.manifest):
        raise IntegrityError(
            f"repository {repo.repo_id} is in storage format 1 (read-only for {what}); run "
            "radcrypt repo migrate --format 2")


def log_history(store: Store, state: seglog.LogState) -> list[seglog.LogEntry]:
    """Every entry of the log, genesis to head, as far as the store still holds them.

    The entries ``state`` verified are read again and checked against the hashes the
    verification recorded; the entries before them (below the checkpoint a verification
    starts from) are authenticated by the hash chain, each entry's ``prev`` naming the
    SHA-256 of the one before. The chain ends at genesis, or where old entries were
    deleted (FORMAT-2 5.6). Needed because a checkpoint does not say which objects earlier
    entries removed (the migrated format-1 segments, the replaced objects to delete).
    """
    repo_id = state.repo_id
    verified = sorted(state.hashes)
    if not verified:
        return []

    def read(sequence: int) -> tuple[int, bytes | None]:
        try:
            return sequence, store.get(layout.log_entry_key(repo_id, sequence))
        except ObjectNotFound:
            return sequence, None

    with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="radcrypt-log") as pool:
        blobs = dict(pool.map(read, range(verified[-1] + 1)))
    entries: dict[int, seglog.LogEntry] = {}
    for sequence in verified:
        blob = blobs.get(sequence)
        if blob is None or hashlib.sha256(blob).digest() != state.hashes[sequence]:
            raise IntegrityError(f"log entry {sequence} of repository {repo_id} changed or "
                                 "disappeared after it was verified")
        entries[sequence] = _payload(blob, repo_id, sequence)
    expected = entries[verified[0]].prev
    for sequence in range(verified[0] - 1, -1, -1):
        blob = blobs.get(sequence)
        if blob is None:
            break  # deleted below a checkpoint: the history starts after it
        if hashlib.sha256(blob).digest() != expected:
            raise IntegrityError(f"log entry {sequence} of repository {repo_id} is not the "
                                 f"one entry {sequence + 1} chains to (altered)")
        entries[sequence] = _payload(blob, repo_id, sequence)
        expected = entries[sequence].prev
    return [entries[n] for n in sorted(entries)]


def read_entry(store: Store, state: seglog.LogState, sequence: int) -> seglog.LogEntry:
    """Entry ``sequence`` of the verified log ``state`` (``state.start`` to its head), read
    again and refused unless its SHA-256 is the one the verification recorded."""
    blob = None
    try:
        blob = store.get(layout.log_entry_key(state.repo_id, sequence))
    except ObjectNotFound:
        pass
    known = state.hashes.get(sequence)
    if blob is None or known is None or hashlib.sha256(blob).digest() != known:
        raise IntegrityError(f"log entry {sequence} of repository {state.repo_id} changed "
                             "or disappeared after it was verified")
    return _payload(blob, state.repo_id, sequence)


def _payload(blob: bytes, repo_id: str, sequence: int) -> seglog.LogEntry:
    name = layout.log_entry_key(repo_id, sequence)
    try:
        return seglog.decode_payload(blob[_RECORD_HEAD:], name)
    except FormatError as exc:
        raise IntegrityError(f"log entry {sequence} of repository {repo_id} is malformed: "
                             f"{exc}") from None


def object_key(repo_id: str, kind: int, object_id: str) -> str:
    """The bucket name of a log object: segments (both formats), packs or labels."""
    if kind == seglog.TYPE_PACK:
        return layout.pack_key(repo_id, object_id)
    if kind == keyword_dicts.TYPE_LABEL:
        return layout.label_key(repo_id, object_id)
    return layout.segment_key(repo_id, object_id)


def fetch_checked(store: Store, repo_id: str, live: seglog.LiveObject) -> bytes:
    """A live object's bytes, refused unless their SHA-256 is the one the log names."""
    word = "pack" if live.type == seglog.TYPE_PACK else "segment"
    try:
        blob = store.get(object_key(repo_id, live.type, live.id))
    except ObjectNotFound:
        raise IntegrityError(f"{word} {live.id} of repository {repo_id} is live in the log but "
                             "missing from the store: nothing was replaced") from None
    if hashlib.sha256(blob).digest() != live.sha256:
        raise IntegrityError(f"{word} {live.id} of repository {repo_id} does not match the "
                             "segment log (altered or replaced in the store): nothing was "
                             "replaced")
    return blob


def merge_rows(parts: Sequence[tuple[list[str], EncryptedVectors]]
               ) -> tuple[list[str], EncryptedVectors]:
    """Rows of several segments (or selections of them) back to back, bytes unchanged."""
    widths = {vectors.widths for _, vectors in parts}
    if len(widths) != 1:
        raise IntegrityError("segments of one key version have different vector widths; "
                             "they cannot be merged")
    ids = [i for part_ids, _ in parts for i in part_ids]
    if len(set(ids)) != len(ids):
        raise IntegrityError("an image is named by two of the segments to merge: refusing "
                             "to write it twice (run radcrypt check)")
    full = np.concatenate([np.asarray(v.full) for _, v in parts])
    levels = tuple(np.concatenate([np.asarray(v.levels[i]) for _, v in parts])
                   for i in range(len(parts[0][1].levels)))
    return ids, EncryptedVectors(full=full, levels=levels)


def build_segment(repo: Repository, writer: Identity, key_version: int, base_sequence: int,
                  ids: list[str], vectors: EncryptedVectors, *,
                  keywords: Mapping[str, Iterable[str]] | None = None,
                  features: np.ndarray | None = None, store: Store | None = None
                  ) -> tuple[str, bytes]:
    """(seg_id, bytes) of a new authenticated segment holding exactly these rows, with
    the keyword dictionary of ``keywords`` (image id -> its keywords, every id; issue 17)
    in its MAC'd body. ``keywords`` None: no dictionary (the segment cannot be found by
    keyword until a compaction rewrites it). In a CKKS repository (issue 19) ``features``
    (the rows' plaintext features, row order) is required: the new segment's CKKS block is
    encrypted from them (a block cannot be cut or merged), and with ``store`` the key
    version's evaluation keys are written first when absent."""
    seg_id = layout.new_id()
    mac_key = index_mac_key(repo.ring.version(key_version).data_key)
    dictionary = (None if keywords is None else
                  keyword_dicts.dictionary_for(repo, key_version, seg_id, ids, keywords))
    block = ckks_blocks.rewrite_block(store, repo, key_version, ids, features)
    if block is None:
        blob = keyword_dicts.encode(ids, vectors, key_version, seg_id=seg_id,
                                    writer=writer.user_id, base_sequence=base_sequence,
                                    repo_id=repo.repo_id, mac_key=mac_key,
                                    dictionary=dictionary)
    else:
        blob = encode_segment_v2(ids, vectors, key_version, seg_id=seg_id,
                                 writer=writer.user_id, base_sequence=base_sequence,
                                 repo_id=repo.repo_id, mac_key=mac_key,
                                 dictionary=dictionary, ckks=block)
    written = decode_segment(blob, seg_id).id_strings()
    if sorted(written) != sorted(ids) or len(written) != len(ids):
        raise IntegrityError(f"new segment {seg_id} would not hold exactly the images of "
                             "the segments it replaces: nothing was written")
    return seg_id, blob


def build_pack(repo: Repository, key_version: int,
               images: Sequence[tuple[str, bytes, bytes]], features: np.ndarray
               ) -> tuple[str, bytes]:
    """(pack_id, bytes) of a new pack, re-opened to check it holds exactly ``images``."""
    pack_id = layout.new_id()
    data_key = repo.ring.version(key_version).data_key
    blob = packs.build_pack(data_key, repo.repo_id, pack_id, key_version, list(images),
                            np.asarray(features, dtype=np.float64))
    toc, _ = packs.open_pack(data_key, repo.repo_id, pack_id, blob)
    if toc.image_ids() != [image_id for image_id, _, _ in images]:
        raise IntegrityError(f"new pack {pack_id} would not hold exactly the images of the "
                             "packs it replaces: nothing was written")
    return pack_id, blob


def added(kind: int, object_id: str, blob: bytes, count: int) -> seglog.Added:
    return seglog.Added(kind, object_id, hashlib.sha256(blob).digest(), count)


@dataclass
class Commit:
    """The outcome of one replace entry: ``sequence`` None when the group was abandoned."""

    state: seglog.LogState
    sequence: int | None


def commit_replace(store: Store, settings: Settings | None, repo: Repository,
                   writer: Identity, trust: Any, state: seglog.LogState, *, reason: int,
                   key_version: int, new_objects: Sequence[tuple[seglog.Added, bytes]],
                   removed: Sequence[seglog.Removed],
                   verify: Callable[[seglog.LogState], seglog.LogState],
                   kind: int = seglog.KIND_REPLACE) -> Commit:
    """Write the new objects, then one ``replace`` entry (FORMAT-2 5.3, 7.4); ``kind``
    ``remove`` for an erasure that adds nothing (FORMAT-2 7.2).

    seglog.append retries after a concurrent writer's entry by itself; when that entry
    took objects of this group out of the live set, the group is abandoned: the new
    objects, which no entry names, are deleted, and ``verify(state)`` gives the log as it
    now stands. Any other refusal of the log is an IntegrityError.
    """
    for entry, blob in new_objects:
        store.put(object_key(repo.repo_id, entry.type, entry.id), blob, if_absent=True)
    adds = sorted((entry for entry, _ in new_objects), key=lambda a: (a.type, a.id))
    try:
        new_state = seglog.append(store, repo.repo_id, writer, writer.user_id, trust, state,
                                  kind=kind, reason=reason,
                                  key_version=key_version, added=adds, removed=removed)
    except seglog.AppendAbandoned as exc:
        log.info("repository %s: %s", repo.repo_id, exc)
        for entry in adds:
            store.delete(object_key(repo.repo_id, entry.type, entry.id))
        return Commit(verify(state), None)
    except seglog.LogError as exc:
        raise IntegrityError(f"repository {repo.repo_id}: the segment log refused the "
                             f"{KIND_WORDS[kind]} entry: {exc}") from None
    if settings is not None:
        logstate.remember_head(settings, repo.repo_id, new_state.head)
    return Commit(new_state, new_state.head.sequence)


def delete_replaced(store: Store, state: seglog.LogState, grace_seconds: float,
                    now: float | None = None, *, at_once: Collection[int] = ()
                    ) -> tuple[int, int]:
    """(deleted, deferred): objects removed by a verified entry are deleted once the
    entry is ``grace_seconds`` old (FORMAT-2 7.4); never an object live at the head.
    ``at_once``: reasons whose removed objects are deleted without waiting (revocation:
    the revoked user held their keys)."""
    now = time.time() if now is None else now
    repo_id = state.repo_id
    live = {object_key(repo_id, kind, object_id) for kind, object_id in state.live}
    present = {key for prefix in _object_prefixes(repo_id)
               for key in store.list_keys(prefix)} - live
    deleted = deferred = 0
    if not present:  # nothing but live objects: no need to read the log's history
        return deleted, deferred
    for entry in log_history(store, state):
        for gone in entry.removed:
            key = object_key(repo_id, gone.type, gone.id)
            if key not in present:
                continue
            if entry.reason not in at_once and now - entry.time_ms / 1000 < grace_seconds:
                deferred += 1
                continue
            store.delete(key)
            present.discard(key)
            deleted += 1
    return deleted, deferred


def _object_prefixes(repo_id: str) -> list[str]:
    prefixes = [layout.segments_prefix(repo_id), layout.packs_prefix(repo_id)]
    if hasattr(layout, "labels_prefix"):  # /work/p16-H4-layout.patch (issue 17)
        prefixes.append(layout.labels_prefix(repo_id))
    return prefixes


# --- compaction --------------------------------------------------------------------------------


def compact(store: Store, settings: Settings, repo: Repository, writer: Identity, *,
            target_images: int = TARGET_IMAGES, pack_images: int = PACK_IMAGES,
            grace_seconds: float = GRACE_SECONDS,
            progress: ProgressCallback = no_progress, cancel: CancelToken | None = None,
            now: float | None = None) -> CompactionReport:
    """Merge a format-2 repository's small segments and packs (module docstring); any
    member may run it. ``now``: the clock for the grace period (tests).

    Progress: one "compact" event per group (status "compacted" or "abandoned"), then one
    "delete" event. Cancelling stops between groups; committed groups stay committed.
    """
    start = time.perf_counter()
    require_format2(repo, "compaction")
    if repo.manifest.member_version(writer.user_id) is None:
        raise AccessDenied(f"user {writer.user_id!r} is not a member of repository "
                           f"{repo.repo_id!r}: only members compact it")
    cancel = cancel or CancelToken()
    report = CompactionReport()
    state = logstate.verified_log(store, settings, repo)
    report.segments_before, report.packs_before = len(state.segments()), len(state.packs())
    if ckks_blocks.is_ckks(repo.manifest):  # issue 19: one CKKS block per segment
        target_images = min(target_images, ckks_blocks.BLOCK_IMAGES)
    plan = _plan(store, repo, state, target_images, pack_images)
    try:
        for done, (kind, version, group) in enumerate(plan, 1):
            cancel.check()
            state, status, item = _compact_group(store, settings, repo, writer, state, kind,
                                                 version, group, report)
            progress(ProgressEvent("compact", done, len(plan), item=item, status=status,
                                   message=f"{len(group)} {_word(kind)}s"))
    except Cancelled:
        report.cancelled = True
    if not report.cancelled:
        report.deleted, report.deferred = delete_replaced(store, state, grace_seconds, now)
        progress(ProgressEvent("delete", report.deleted, report.deleted + report.deferred,
                               message=f"{report.deleted} replaced objects deleted, "
                                       f"{report.deferred} within the grace period"))
    report.segments_after, report.packs_after = len(state.segments()), len(state.packs())
    report.seconds = time.perf_counter() - start
    return report


def _word(kind: int) -> str:
    if kind == keyword_dicts.TYPE_LABEL:
        return "label set"
    return "pack" if kind == seglog.TYPE_PACK else "segment"


def _label_heavy(store: Store, repo_id: str, state: seglog.LogState, version: int,
                 skip: set[str]) -> list[seglog.LiveObject]:
    """The live segments of ``version`` outside ``skip`` named by LABEL_FOLD or more live
    label objects (planning only: the fold itself reads and checks everything)."""
    named: dict[str, int] = {}
    for live in labels.live_labels(state, version):
        try:
            blob = keyword_dicts.read_label_blob(store, repo_id, live)
            target = LabelObject.from_bytes(blob, live.id).segment_id
        except (IntegrityError, FormatError):
            continue  # the fold (or the repository check) reports it
        named[target] = named.get(target, 0) + 1
    return [o for o in state.segments(version)
            if o.id not in skip and named.get(o.id, 0) >= LABEL_FOLD]


def _plan(store: Store, repo: Repository, state: seglog.LogState, target_images: int,
          pack_images: int) -> list[tuple[int, int, list[seglog.LiveObject]]]:
    """(type, key version, live objects) of each merge: per key version the objects below
    the target, smallest first, cut before a group would pass it; a group of one is no
    merge. Only key versions this ring holds (an old version's objects are the
    revocation's to retire)."""
    sizes = dict(store.list_objects(layout.packs_prefix(repo.repo_id)))
    versions = sorted({o.key_version for o in state.live.values()})
    plan: list[tuple[int, int, list[seglog.LiveObject]]] = []
    for version in versions:
        try:
            repo.ring.version(version)
        except KeyError:
            continue
        groups = _groups(state.segments(version), target_images, lambda o: 0, 0)
        grouped = {o.id for group in groups for o in group}
        # Issue 17: a segment written before keyword search is rewritten alone to get
        # its dictionary (rows and scores unchanged, as in any merge).
        groups += [[o] for o in _without_dictionary(
            store, repo.repo_id, [o for o in state.segments(version) if o.id not in grouped])]
        for group in groups:
            plan.append((seglog.TYPE_SEGMENT, version, group))
        grouped |= {o.id for group in groups for o in group}  # their labels move anyway
        for heavy in _label_heavy(store, repo.repo_id, state, version, grouped):
            plan.append((keyword_dicts.TYPE_LABEL, version, [heavy]))
        for group in _groups(state.packs(version), pack_images,
                             lambda o: sizes.get(layout.pack_key(repo.repo_id, o.id), 0),
                             PACK_BYTES):
            plan.append((seglog.TYPE_PACK, version, group))
    return plan


def _without_dictionary(store: Store, repo_id: str, segments: list[seglog.LiveObject]
                        ) -> list[seglog.LiveObject]:
    """The segments whose header says they carry no keyword dictionary (one range read of
    192 bytes each; a header that does not parse is left to the group's full check)."""
    if not segments or not keyword_dicts.can_embed():
        return []

    def lacks(live: seglog.LiveObject) -> bool:
        try:
            head = store.get_range(layout.segment_key(repo_id, live.id), 0, HEADER_SIZE_V2)
            return not getattr(parse_header(head, live.id), "dictionary_size", 0)
        except (ObjectNotFound, SegmentError):
            return True

    with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="radcrypt-seghead") as pool:
        flags = list(pool.map(lacks, segments))
    return [o for o, lacking in zip(segments, flags, strict=True) if lacking]


def _groups(objects: list[seglog.LiveObject], limit: int,
            size_of: Callable[[seglog.LiveObject], int], max_bytes: int
            ) -> list[list[seglog.LiveObject]]:
    small = sorted((o for o in objects if o.count < limit), key=lambda o: (o.count, o.id))
    groups: list[list[seglog.LiveObject]] = []
    current: list[seglog.LiveObject] = []
    images = size = 0
    for obj in small:
        grows = size_of(obj)
        if current and (images + obj.count > limit or (max_bytes and size + grows > max_bytes)):
            groups.append(current)
            current, images, size = [], 0, 0
        current.append(obj)
        images += obj.count
        size += grows
    if current:
        groups.append(current)
    return [g for g in groups if len(g) > 1]


def _compact_group(store: Store, settings: Settings, repo: Repository, writer: Identity,
                   state: seglog.LogState, kind: int, version: int,
                   group: list[seglog.LiveObject], report: CompactionReport,
                   ) -> tuple[seglog.LogState, str, str]:
    if not all((o.type, o.id) in state.live for o in group):
        report.abandoned += 1  # an earlier group's race moved the log on
        return state, "abandoned", ""
    extra: list[tuple[seglog.Added, bytes]] = []
    gone: list[seglog.Removed] = []
    if kind == keyword_dicts.TYPE_LABEL:
        return _fold_labels(store, settings, repo, writer, state, version, group[0], report)
    if kind == seglog.TYPE_SEGMENT:
        new_id, blob, count, ids = _merge_segments(store, repo, writer, state, version, group)
        # Issue 17: the group's labels move to the new segment in the same entry.
        extra, gone = labels.carry(store, repo, state, version, [o.id for o in group],
                                   new_id, ids)
    else:
        new_id, blob, count = _merge_packs(store, repo, version, group)
    if count != sum(o.count for o in group):
        raise IntegrityError(f"the {_word(kind)}s {', '.join(o.id for o in group)} of "
                             f"repository {repo.repo_id} hold {count} images, the log says "
                             f"{sum(o.count for o in group)}: nothing was replaced")
    check_still_current(store, repo)  # FORMAT-2 5.3 step 3: never under a superseded manifest
    trust = logstate.repository_trust(store, repo)  # the manifest as it is now

    def verify(since: seglog.LogState) -> seglog.LogState:
        return logstate.verified_log(store, settings, repo, since=since)

    done = commit_replace(
        store, settings, repo, writer, trust, state, reason=seglog.REASON_COMPACTION,
        key_version=version, new_objects=[(added(kind, new_id, blob, count), blob), *extra],
        removed=sorted([seglog.Removed(o.type, o.id) for o in group] + gone,
                       key=lambda r: (r.type, r.id)), verify=verify)
    if done.sequence is None:
        report.abandoned += 1
        return done.state, "abandoned", new_id
    report.entries.append(done.sequence)
    return done.state, "compacted", new_id


def _fold_labels(store: Store, settings: Settings, repo: Repository, writer: Identity,
                 state: seglog.LogState, version: int, segment: seglog.LiveObject,
                 report: CompactionReport) -> tuple[seglog.LogState, str, str]:
    """One segment's live label objects become one ``add`` object (their net labels),
    in one ``replace`` entry (reason compaction) that removes them. The segment's ids
    come from the segment read whole and checked (its MAC): the rows must be right."""
    ids = checked_segment(store, repo, segment, version).id_strings()
    new, gone = labels.carry(store, repo, state, version, [segment.id], segment.id, ids)
    if not gone:
        return state, "abandoned", ""
    check_still_current(store, repo)
    trust = logstate.repository_trust(store, repo)

    def verify(since: seglog.LogState) -> seglog.LogState:
        return logstate.verified_log(store, settings, repo, since=since)

    done = commit_replace(store, settings, repo, writer, trust, state,
                          reason=seglog.REASON_COMPACTION, key_version=version,
                          new_objects=new, removed=gone, verify=verify)
    if done.sequence is None:
        report.abandoned += 1
        return done.state, "abandoned", segment.id
    report.entries.append(done.sequence)
    report.labels_folded += len(gone)
    return done.state, "compacted", segment.id


def _merge_segments(store: Store, repo: Repository, writer: Identity,
                    state: seglog.LogState, version: int, group: list[seglog.LiveObject],
                    ) -> tuple[str, bytes, int, list[str]]:
    parts = []
    for live in group:
        segment = checked_segment(store, repo, live, version)
        parts.append((segment.id_strings(), segment.vectors))
    ids, vectors = merge_rows(parts)
    # The dictionary is rebuilt from the images' metadata (a dictionary cannot be read
    # without the keywords): the rows keep exactly their keywords, under new positions.
    keywords = keyword_dicts.keywords_from_packs(store, repo, state, version, ids)
    features = (ckks_blocks.features_from_packs(store, repo, state, version, ids)
                if ckks_blocks.is_ckks(repo.manifest) else None)
    seg_id, blob = build_segment(repo, writer, version, state.head.sequence, ids, vectors,
                                 keywords=keywords, features=features, store=store)
    return seg_id, blob, len(ids), ids


def checked_segment(store: Store, repo: Repository, live: seglog.LiveObject, version: int,
                    what: str = "compaction") -> Segment:
    """A live segment read whole and checked before its rows are copied into a new one:
    the SHA-256 the log names, its MAC under the key version's index MAC key, its key
    version and a base sequence below the entry that added it. Any failure stops
    ``what`` with nothing replaced: a forged row is never laundered into an authenticated
    segment. Shared by compaction and erasure (app/core/erasure.py)."""
    mac_key = index_mac_key(repo.ring.version(version).data_key)
    blob = fetch_checked(store, repo.repo_id, live)
    try:
        verify_segment_mac(blob, live.id, repo.repo_id, mac_key)
        segment = decode_segment(blob, live.id)
    except SegmentAuthError:
        raise IntegrityError(f"segment {live.id} of repository {repo.repo_id} is not "
                             "authenticated (its MAC does not verify: forged or "
                             f"altered): {what} stopped, nothing was replaced") from None
    except SegmentError as exc:
        raise IntegrityError(f"segment {live.id} of repository {repo.repo_id} is "
                             f"damaged ({exc.reason}): {what} stopped") from None
    if segment.key_version != version:
        raise IntegrityError(f"segment {live.id} of repository {repo.repo_id} is of key "
                             f"version {segment.key_version}, the log says {version}")
    if segment.base_sequence is None or segment.base_sequence >= live.added_at:
        raise IntegrityError(f"segment {live.id} of repository {repo.repo_id} names base "
                             f"sequence {segment.base_sequence}, not below the entry "
                             f"{live.added_at} that added it: {what} stopped")
    return segment


def _merge_packs(store: Store, repo: Repository, version: int,
                 group: list[seglog.LiveObject]) -> tuple[str, bytes, int]:
    data_key = repo.ring.version(version).data_key
    images: list[tuple[str, bytes, bytes]] = []
    rows: list[np.ndarray] = []
    for live in group:
        blob = fetch_checked(store, repo.repo_id, live)
        try:
            toc, entries = packs.open_pack(data_key, repo.repo_id, live.id, blob)
            ids = toc.image_ids()
            rows.append(packs.decode_features(
                entries[(packs.KIND_FEATURES, live.id)], ids))
        except (FormatError, DecryptionError, KeyError) as exc:
            raise IntegrityError(f"pack {live.id} of repository {repo.repo_id} does not open "
                                 f"({exc}): compaction stopped, nothing was replaced"
                                 ) from None
        images += [(i, entries[(packs.KIND_META, i)], entries[(packs.KIND_THUMBS, i)])
                   for i in ids]
    image_ids = [i for i, _, _ in images]
    if len(set(image_ids)) != len(image_ids):
        raise IntegrityError(f"an image is in two of the packs {', '.join(o.id for o in group)}"
                             f" of repository {repo.repo_id}: refusing to write it twice")
    pack_id, blob = build_pack(repo, version, images, np.concatenate(rows))
    return pack_id, blob, len(images)
