"""Erasure of an image, series, study or patient, and the legal hold that refuses it (issue 16).

Why: a wrong patient imported, or a GDPR erasure request, must be answerable with "gone
from the archive": no search finds it, no pack, segment or original in the bucket holds
its ciphertext, and a later import of the same file works as for a new file.

How (docs/FORMAT-2.md 7.2, the rewrite path shared with compaction):

1. ``plan_erasure`` decrypts every live image's metadata, selects the images of the
   target (keys of app/core/studies.py; a patient by PatientID, else PatientName) and
   widens the selection to whole instances: every frame of a multi-frame file shares one
   original object, so erasing one frame erases the file. The plan lists what will be
   deleted (patient, study, series, image, frame) for the user to confirm: ``--dry-run``.
2. ``erase`` (owner or co-owner, under the repository's exclusive lock so that no import
   or compaction runs) refuses while the signed manifest carries a legal hold, then
   rewrites every live pack and segment holding an erased image without its entries and
   rows (rows copied byte for byte, entries re-sealed: compaction's helpers; the holders
   are found by range reads of the packs' tables of contents and the segments' id
   sections, ``_holders`` says why a lying store gains nothing), and commits
   one log entry per key version, reason erasure (``replace``, or ``remove`` when every
   image of the objects goes). That entry is the commit point and the signed, hash-chained
   audit record of the rewrite: who, when, which objects.
3. Then, at once, it deletes the erased originals, the objects the entry removed, and
   every other segment or pack still in the bucket (replaced by an earlier compaction and
   within its grace period, or left by a dead import) that holds an erased image.
   FORMAT-2 7.4 keeps replaced objects for 15 minutes for concurrent readers; erasure does
   not wait, like revocation: a reader that verified the log just before fails one fetch
   and verifies again, which is the lesser harm than keeping a patient's data the request
   said to delete. A local receipt (``erasures.jsonl`` in the data directory: time, user,
   target kind, log entries, keyed image ids; no patient attribute) records each erasure.
   The access log (app/core/access_log.py) keeps who viewed the images before: it is the
   accountability record, encrypted to the owners, and not erased.

Why nothing comes back: the log's live set no longer names an object holding the images,
the search service loads only live segments, and a client remembers the highest log
head it verified (app/core/logstate.py), so a store that serves the log as it was before
the erasure is refused as a rollback. What erasure cannot do: make the cloud forget
copies it kept on its own (backups, versioned buckets), which stay readable to whoever
holds the repository's keys of the time (SECURITY.md, section 3).

Legal hold: a field of the owner-signed manifest (``legal_hold``), so that only an owner
sets or lifts it and a member's client cannot be shown a manifest without it: setting it
publishes the manifest at sequence + 1 and appends an owner-signed ``membership`` entry
naming that sequence, after which every client's log verification refuses an older
manifest (and a client that saw the newer one refuses the older one by itself). An
erasure racing a newly set hold fails: its entry would name an older manifest sequence
than the log's, which the kind rules refuse.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from app.core import ckks_blocks, compaction, keyword_dicts, labels, logstate
from app.core.errors import AccessDenied, IntegrityError, RadcryptError
from app.core.meta import ImageMeta
from app.core.packs import ImageReader, read_toc
from app.core.progress import ProgressCallback, ProgressEvent, no_progress
from app.core.repository import Manifest, Repository, check_still_current, with_members
from app.core.settings import Settings
from app.core.studies import group_studies, series_key, study_key
from cloud import layout, seglog
from cloud.backend import ObjectNotFound, Store
from cloud.segments import HEADER_SIZE_V2, SegmentError, decode_segment, ids_range
from crypto import pack as packs
from crypto.errors import DecryptionError, FormatError
from crypto.identity import Identity
from crypto.labels import LabelObject, open_label
from crypto.segment_mac import index_mac_key
from crypto.tokens import EncryptedVectors

KINDS = ("image", "series", "study", "patient")
JOURNAL_FILE = "erasures.jsonl"
_WORDS = {seglog.TYPE_PACK: "pack", seglog.TYPE_SEGMENT: "segment"}
READ_THREADS = 8  # metadata range reads in flight while planning
MAX_ATTEMPTS = 8  # rewrites abandoned to a concurrent writer before giving up


class LegalHold(AccessDenied):
    """The repository is under legal hold: nothing may be erased until an owner lifts it."""


@dataclass(frozen=True)
class Target:
    """What to erase: ``kind`` one of KINDS, ``value`` an image id (or a unique prefix),
    a series or study key (a UID or ``image:<id>``, or a unique prefix), or a patient's
    PatientID (PatientName when no image has that id)."""

    kind: str
    value: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RadcryptError(f"erasure target kind must be one of {', '.join(KINDS)}, "
                                f"not {self.kind!r}")
        if not self.value.strip():
            raise RadcryptError(f"erasure of a {self.kind}: the {self.kind} is empty")

    def describe(self) -> str:
        return f"{self.kind} {self.value}"


@dataclass
class ErasurePlan:
    """The images an erasure deletes (whole instances), listed for confirmation."""

    repo_id: str
    target: Target
    images: list[ImageMeta]

    @property
    def image_ids(self) -> set[str]:
        return {m.image_id for m in self.images}

    @property
    def originals(self) -> set[str]:
        """Image ids whose ``objects/`` hold the originals (frame 0 of a multi-frame file)."""
        return {m.original_image_id for m in self.images}

    def lines(self) -> list[str]:
        """Patient, study, series and image lines: what the user confirms."""
        out = [f"repository {self.repo_id}: erasing {self.target.describe()} deletes "
               f"{len(self.images)} image(s) of {len(self.originals)} file(s):"]
        for study in group_studies(self.images):
            patient = " ".join(p for p in (study.patient_name, study.patient_id and
                                           f"({study.patient_id})") if p) or "no patient"
            out.append(f"  study {study.key}  {patient}  {study.study_date or 'no date'}  "
                       f"{study.description}".rstrip())
            for series in study.series:
                out.append(f"    series {series.key}  {series.modality or '-'}  "
                           f"{series.description}  {len(series.images)} image(s)".rstrip())
                for meta in series.images:
                    frame = f"  frame {meta.frame + 1}/{meta.frames}" if meta.frames > 1 else ""
                    out.append(f"      {meta.image_id}  {meta.name}{frame}")
        out += [f"  image {m.image_id} (metadata damaged: {m.error})"
                for m in self.images if m.error]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "kind": self.target.kind, "value": self.target.value,
                "images": [{"image_id": m.image_id, "name": m.name, "study": study_key(m),
                            "series": series_key(m), "frame": m.frame, "frames": m.frames,
                            "original": m.original_image_id}
                           for m in self.images],
                "files": len(self.originals)}


@dataclass
class ErasureReport:
    """What an erasure did; ``entries``: the log sequences it wrote (one per key version)."""

    plan: ErasurePlan
    entries: list[int] = field(default_factory=list)
    packs_rewritten: int = 0  # live packs replaced by a smaller one
    packs_removed: int = 0  # live packs that held only erased images
    segments_rewritten: int = 0
    segments_removed: int = 0
    originals_deleted: int = 0
    objects_deleted: int = 0  # old packs and segments deleted (removed now or earlier)
    abandoned: int = 0  # attempts lost to a concurrent writer, then done again
    seconds: float = 0.0

    def lines(self) -> list[str]:
        return [f"repository {self.plan.repo_id}: erased {len(self.plan.images)} image(s) of "
                f"{len(self.plan.originals)} file(s) ({self.plan.target.describe()}) in log "
                f"entr{'y' if len(self.entries) == 1 else 'ies'} "
                f"{', '.join(map(str, self.entries))}; packs rewritten {self.packs_rewritten}, "
                f"removed {self.packs_removed}; segments rewritten {self.segments_rewritten}, "
                f"removed {self.segments_removed}; originals deleted "
                f"{self.originals_deleted}; old objects deleted {self.objects_deleted}"]

    def as_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.as_dict(), "entries": list(self.entries),
                "packs_rewritten": self.packs_rewritten, "packs_removed": self.packs_removed,
                "segments_rewritten": self.segments_rewritten,
                "segments_removed": self.segments_removed,
                "originals_deleted": self.originals_deleted,
                "objects_deleted": self.objects_deleted, "abandoned": self.abandoned,
                "seconds": round(self.seconds, 3)}


# --- selection ------------------------------------------------------------------------------


def _unique(kind: str, value: str, keys: Iterable[str]) -> str:
    """``value`` itself when it is a key, else the one key it prefixes."""
    keys = set(keys)
    if value in keys:
        return value
    found = sorted(k for k in keys if k.startswith(value))
    if not found:
        raise RadcryptError(f"no {kind} {value!r} in this repository: nothing to erase")
    if len(found) > 1:
        raise RadcryptError(f"{kind} {value!r} is ambiguous: it begins {len(found)} "
                            f"{kind} keys ({', '.join(found[:3])}, ...); give more of it")
    return found[0]


def select(metas: list[ImageMeta], target: Target) -> list[ImageMeta]:
    """The images ``target`` names, widened to every frame of each file they belong to.
    An image whose metadata is damaged can still be erased by its id (alone: which file
    it belongs to is in the metadata that does not open)."""
    value = target.value.strip()
    if target.kind == "image":
        key = _unique("image", value.lower(), (m.image_id for m in metas))
        chosen = [m for m in metas if m.image_id == key]
        metas = [m for m in metas if not m.error or m.image_id == key]
    else:
        metas = [m for m in metas if not m.error]
    if target.kind == "series":
        key = _unique("series", value, (series_key(m) for m in metas))
        chosen = [m for m in metas if series_key(m) == key]
    elif target.kind == "study":
        key = _unique("study", value, (study_key(m) for m in metas))
        chosen = [m for m in metas if study_key(m) == key]
    elif target.kind == "patient":
        chosen = [m for m in metas if m.attribute("PatientID") == value]
        chosen = chosen or [m for m in metas if m.attribute("PatientName") == value]
        if not chosen:
            raise RadcryptError(f"no image of patient {value!r} (PatientID or PatientName) "
                                "in this repository: nothing to erase")
    originals = {m.original_image_id for m in chosen}
    return [m for m in metas if m.original_image_id in originals]


def plan_erasure(store: Store, settings: Settings | None, repo: Repository, target: Target,
                 progress: ProgressCallback = no_progress) -> ErasurePlan:
    """What erasing ``target`` deletes, from the metadata of every live image (any member
    may ask; nothing is written)."""
    compaction.require_format2(repo, "erasure")
    state = logstate.verified_log(store, settings, repo)
    reader = ImageReader(store, repo, state)
    ids = sorted(reader.image_ids())

    def one(image_id: str) -> ImageMeta:
        try:
            record, version = reader.meta(image_id)
        except RadcryptError as exc:
            return ImageMeta.damaged(image_id, str(exc))
        return ImageMeta.from_record(image_id, record, version)

    metas = []
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="radcrypt-erase") as pool:
        for meta in pool.map(one, ids):  # range reads: the wait is the store
            metas.append(meta)
            if len(metas) % 50 == 0 or len(metas) == len(ids):
                progress(ProgressEvent("index", len(metas), len(ids)))
    return ErasurePlan(repo.repo_id, target, select(metas, target))


# --- the legal hold ---------------------------------------------------------------------------


@dataclass
class _Session:
    """What app.core.access needs of a session: the store and the workstation's settings."""

    store: Store
    settings: Settings


def _current_manifest(store: Store, settings: Settings | None, repo: Repository
                      ) -> tuple[Manifest, bytes]:
    """The signed manifest as the store shows it now, checked against the pinned owner key
    and (with ``settings``) against the highest sequence this workstation saw."""
    if settings is None:
        trust = logstate.repository_trust(store, repo)
        return trust.manifest, trust.owner_key
    from app.core import access

    session: Any = _Session(store, settings)
    return access._signed_manifest(session, repo.repo_id)


def _check_owner(manifest: Manifest, owner_key: bytes, who: Identity, what: str) -> None:
    listed = manifest.owner_keys(owner_key).get(who.user_id)
    if listed is None or not hmac.compare_digest(listed, who.sign_public):
        raise AccessDenied(f"only the owner or a co-owner of repository "
                           f"{manifest.repo_id!r} may {what}; {who.user_id} is not one")


def legal_hold(store: Store, settings: Settings | None, repo: Repository) -> bool:
    """Whether the repository is under legal hold now (the signed manifest says so)."""
    return bool(_current_manifest(store, settings, repo)[0].legal_hold)


def set_legal_hold(store: Store, settings: Settings, repo: Repository, owner: Identity,
                   on: bool) -> Repository:
    """Set or lift the legal hold (owner or co-owner): the manifest at sequence + 1 with
    ``legal_hold``, then an owner-signed ``membership`` entry naming it, so that no
    client verifying the log accepts the manifest from before. Returns the repository
    with the new manifest. Setting what is already set writes nothing, unless the log
    lacks the entry (a run that stopped between the two writes): then the entry."""
    from app.core import access

    compaction.require_format2(repo, "a legal hold")
    manifest, owner_key = _current_manifest(store, settings, repo)
    _check_owner(manifest, owner_key, owner, "set or lift a legal hold")
    if manifest.legal_hold != on:
        session: Any = _Session(store, settings)
        manifest = access._publish(session, owner, with_members(
            manifest, list(manifest.members), legal_hold=on))
    opened = Repository(manifest, repo.ring, owner_key)
    trust = logstate.repository_trust(store, opened)
    state = logstate.verified_log(store, settings, opened, trust=trust)
    if state.manifest_sequence >= manifest.sequence:
        return opened  # the log already names this manifest
    try:
        state = seglog.append(store, repo.repo_id, owner, owner.user_id, trust, state,
                              kind=seglog.KIND_MEMBERSHIP, reason=seglog.REASON_ERASURE,
                              key_version=manifest.key_version, added=[])
    except (seglog.LogError, FormatError) as exc:
        raise IntegrityError(f"repository {repo.repo_id!r}: the legal hold is published "
                             f"(manifest sequence {manifest.sequence}) but the segment log "
                             f"refused its entry: {exc}; run the command again") from None
    logstate.remember_head(settings, repo.repo_id, state.head)
    return opened


# --- the rewrite ------------------------------------------------------------------------------


@dataclass
class _Rewrite:
    """The new objects and removals of one key version."""

    version: int
    new: list[tuple[seglog.Added, bytes]] = field(default_factory=list)
    removed: list[seglog.Removed] = field(default_factory=list)


def erase(store: Store, settings: Settings, repo: Repository, writer: Identity,
          plan: ErasurePlan, *, progress: ProgressCallback = no_progress,
          lock: bool = True) -> ErasureReport:
    """Erase the plan's images (module docstring). LegalHold while the repository is
    under hold; AccessDenied for anyone but an owner; locks.LockConflict while an import,
    compaction or gc runs (``lock`` False: the caller holds the exclusive lock)."""
    start = time.perf_counter()
    compaction.require_format2(repo, "erasure")
    if plan.repo_id != repo.repo_id:
        raise RadcryptError(f"the erasure plan is of repository {plan.repo_id!r}, not "
                            f"{repo.repo_id!r}")
    if not plan.images:
        raise RadcryptError(f"erasing {plan.target.describe()}: no image to erase")
    _check_allowed(store, settings, repo, writer)
    if lock:
        from app.core.locks import exclusive

        with exclusive(store, repo, writer):
            report = _erase(store, settings, repo, writer, plan, progress)
    else:
        report = _erase(store, settings, repo, writer, plan, progress)
    report.seconds = time.perf_counter() - start
    _journal(settings, writer, report)
    return report


def _check_allowed(store: Store, settings: Settings | None, repo: Repository,
                   writer: Identity) -> Manifest:
    manifest, owner_key = _current_manifest(store, settings, repo)
    _check_owner(manifest, owner_key, writer, "erase images")
    if manifest.legal_hold:
        raise LegalHold(f"repository {repo.repo_id!r} is under legal hold: nothing was "
                        "erased; an owner lifts it with radcrypt repo hold --repo "
                        f"{repo.repo_id} off")
    return manifest


def _erase(store: Store, settings: Settings, repo: Repository, writer: Identity,
           plan: ErasurePlan, progress: ProgressCallback) -> ErasureReport:
    report = ErasureReport(plan)
    erased = plan.image_ids
    state = logstate.verified_log(store, settings, repo)
    for _attempt in range(MAX_ATTEMPTS):
        rewrites = _rewrites(store, repo, writer, state, erased, report)
        if not rewrites:
            break  # nothing live holds them (a rerun after a crash past the commit)
        state, abandoned = _commit(store, settings, repo, writer, state, rewrites, report)
        if not abandoned:
            break
        report.abandoned += 1
    else:
        raise IntegrityError(f"repository {repo.repo_id}: erasure lost {MAX_ATTEMPTS} races "
                             "to concurrent writers; nothing more was erased, run it again")
    progress(ProgressEvent("erase", len(report.entries), len(report.entries),
                           message=f"{len(report.entries)} log entries written"))
    for original in sorted(plan.originals | erased):
        key = layout.object_key(repo.repo_id, original)
        if store.exists(key):
            store.delete(key)
            report.originals_deleted += 1
    report.objects_deleted = _delete_holders(store, repo, state, erased)
    progress(ProgressEvent("delete", report.objects_deleted, report.objects_deleted,
                           message=f"{report.originals_deleted} originals and "
                                   f"{report.objects_deleted} old objects deleted"))
    return report


def _rewrites(store: Store, repo: Repository, writer: Identity, state: seglog.LogState,
              erased: set[str], report: ErasureReport) -> list[_Rewrite]:
    """Per key version, the live packs and segments holding erased images, rebuilt
    without them (an object left empty is only removed). Only those objects are read
    whole (``_holders``)."""
    held = {keys.version for keys in repo.ring.versions}
    by_version: dict[int, _Rewrite] = {}
    report.packs_rewritten = report.packs_removed = 0
    report.segments_rewritten = report.segments_removed = 0
    for live in _holders(store, repo, state, erased):
        if live.key_version not in held:
            raise IntegrityError(f"repository {repo.repo_id}: a live "
                                 f"{_WORDS[live.type]} {live.id} is of key version "
                                 f"{live.key_version}, which this key ring does not hold (a "
                                 "revocation in progress?): finish it, then erase")
        if live.type == seglog.TYPE_PACK:
            kept = _pack_without(store, repo, live, erased)
        else:
            kept = _segment_without(store, repo, writer, state, live, erased)
        if kept is None:
            continue
        rewrite = by_version.setdefault(live.key_version, _Rewrite(live.key_version))
        rewrite.removed.append(seglog.Removed(live.type, live.id))
        if kept:
            rewrite.new.append(kept)
        if live.type == seglog.TYPE_SEGMENT:
            # Issue 17: the segment's labels go with it; the kept images' labels are
            # carried to the new segment in the same entry (the erased ones' are not).
            carried, dropped = labels.carry(
                store, repo, state, live.key_version, [live.id],
                kept[0].id if kept else "", _kept_ids(kept))
            rewrite.new += carried
            rewrite.removed += dropped
        pack = live.type == seglog.TYPE_PACK
        if kept and pack:
            report.packs_rewritten += 1
        elif pack:
            report.packs_removed += 1
        elif kept:
            report.segments_rewritten += 1
        else:
            report.segments_removed += 1
    return [by_version[v] for v in sorted(by_version)]


def _kept_ids(kept: tuple[seglog.Added, bytes] | tuple[()]) -> list[str]:
    """The image ids of a rewritten segment, in row order ([] when it was removed)."""
    if not kept:
        return []
    return decode_segment(kept[1], kept[0].id).id_strings()


def _holders(store: Store, repo: Repository, state: seglog.LogState, erased: set[str]
             ) -> list[seglog.LiveObject]:
    """The live packs and segments that hold an erased image, found by range reads: a
    pack's table of contents (authenticated, so the store cannot hide an image in it)
    and a segment's id section (not authenticated on its own). A segment is trusted to
    be the only holder only when the segments found hold, per key version, as many
    erased rows as the packs hold erased images (each live image is once in each);
    otherwise every live segment of that version is read whole and checked against the
    log. Objects of a key version this ring lacks are returned as they are (refused)."""
    held = {keys.version for keys in repo.ring.versions}
    sizes = dict(store.list_objects(layout.packs_prefix(repo.repo_id)))
    found: list[seglog.LiveObject] = []
    in_packs: dict[int, int] = {}
    in_segments: dict[int, int] = {}
    for live in sorted(state.live.values(), key=lambda o: (o.key_version, o.type, o.id)):
        if live.type not in (seglog.TYPE_PACK, seglog.TYPE_SEGMENT):
            continue
        if live.key_version not in held:
            found.append(live)
            continue
        if live.type == seglog.TYPE_PACK:
            key = layout.pack_key(repo.repo_id, live.id)
            ids = read_toc(store, repo, live.id, sizes.get(key), live.sha256).image_ids()
            counts = in_packs
        else:
            ids = _segment_ids(store, repo.repo_id, live.id)
            counts = in_segments
        hits = len(erased.intersection(ids))
        if hits:
            found.append(live)
            counts[live.key_version] = counts.get(live.key_version, 0) + hits
    for version, expected in in_packs.items():
        if in_segments.get(version, 0) != expected:  # the store hid or invented ids
            compaction.log.warning("repository %s: the segments' id sections name %d erased "
                                   "rows of key version %d, the packs %d: reading every "
                                   "segment whole", repo.repo_id,
                                   in_segments.get(version, 0), version, expected)
            found = [o for o in found if o.type != seglog.TYPE_SEGMENT
                     or o.key_version != version] + state.segments(version)
    return found


def _segment_ids(store: Store, repo_id: str, seg_id: str) -> list[str]:
    """The image ids of a segment from two range reads (its header, its id section)."""
    name = layout.segment_key(repo_id, seg_id)
    try:
        offset, length = ids_range(store.get_range(name, 0, HEADER_SIZE_V2), seg_id)
        raw = store.get_range(name, offset, length)
    except (ObjectNotFound, SegmentError) as exc:
        raise IntegrityError(f"segment {seg_id} of repository {repo_id}, live in its log, "
                             f"cannot be read ({exc}): erasure stopped, nothing was erased"
                             ) from None
    return [raw[i:i + 16].hex() for i in range(0, len(raw) - 15, 16)]


def _pack_without(store: Store, repo: Repository, live: seglog.LiveObject, erased: set[str]
                  ) -> tuple[seglog.Added, bytes] | tuple[()] | None:
    """None: the pack holds no erased image; () : only erased ones; else its replacement."""
    data_key = repo.ring.version(live.key_version).data_key
    blob = compaction.fetch_checked(store, repo.repo_id, live)
    try:
        toc, entries = packs.open_pack(data_key, repo.repo_id, live.id, blob)
        ids = toc.image_ids()
        if not erased.intersection(ids):
            return None
        features = packs.decode_features(entries[(packs.KIND_FEATURES, live.id)], ids)
    except (FormatError, DecryptionError, KeyError) as exc:
        raise IntegrityError(f"pack {live.id} of repository {repo.repo_id} does not open "
                             f"({exc}): erasure stopped, nothing was erased") from None
    keep = [row for row, image_id in enumerate(ids) if image_id not in erased]
    if not keep:
        return ()
    images = [(ids[r], entries[(packs.KIND_META, ids[r])], entries[(packs.KIND_THUMBS, ids[r])])
              for r in keep]
    pack_id, new_blob = compaction.build_pack(repo, live.key_version, images,
                                              np.asarray(features)[keep])
    return compaction.added(seglog.TYPE_PACK, pack_id, new_blob, len(keep)), new_blob


def _segment_without(store: Store, repo: Repository, writer: Identity,
                     state: seglog.LogState, live: seglog.LiveObject, erased: set[str]
                     ) -> tuple[seglog.Added, bytes] | tuple[()] | None:
    """As _pack_without, for a segment: its other rows copied byte for byte."""
    segment = compaction.checked_segment(store, repo, live, live.key_version, "erasure")
    ids = segment.id_strings()
    if not erased.intersection(ids):
        return None
    keep = np.array([image_id not in erased for image_id in ids], dtype=bool)
    if not keep.any():
        return ()
    vectors = segment.vectors
    rows = EncryptedVectors(full=vectors.full[keep],
                            levels=tuple(level[keep] for level in vectors.levels))
    kept_ids = [i for i, k in zip(ids, keep, strict=True) if k]
    # Issue 17: the kept rows' keywords, from their metadata in the live packs.
    keywords = keyword_dicts.keywords_from_packs(store, repo, state, live.key_version,
                                                 kept_ids)
    features = (ckks_blocks.features_from_packs(store, repo, state, live.key_version,
                                                kept_ids)
                if ckks_blocks.is_ckks(repo.manifest) else None)  # issue 19
    seg_id, blob = compaction.build_segment(repo, writer, live.key_version,
                                            state.head.sequence, kept_ids, rows,
                                            keywords=keywords, features=features, store=store)
    return compaction.added(seglog.TYPE_SEGMENT, seg_id, blob, len(kept_ids)), blob


def _commit(store: Store, settings: Settings, repo: Repository, writer: Identity,
            state: seglog.LogState, rewrites: list[_Rewrite], report: ErasureReport
            ) -> tuple[seglog.LogState, bool]:
    """One entry per key version; (state, True) when one was abandoned to a concurrent
    writer (its objects are deleted by commit_replace; the caller starts again)."""
    for rewrite in rewrites:
        manifest = check_still_current(store, repo)  # never under a superseded manifest
        if manifest.legal_hold:
            raise LegalHold(f"repository {repo.repo_id!r} was put under legal hold during "
                            "the erasure: nothing more was erased")
        trust = logstate.repository_trust(store, repo)

        def verify(since: seglog.LogState) -> seglog.LogState:
            return logstate.verified_log(store, settings, repo, since=since)

        kind = seglog.KIND_REPLACE if rewrite.new else seglog.KIND_REMOVE
        done = compaction.commit_replace(
            store, settings, repo, writer, trust, state, reason=seglog.REASON_ERASURE,
            key_version=rewrite.version, new_objects=rewrite.new, removed=rewrite.removed,
            verify=verify, kind=kind)
        state = done.state
        if done.sequence is None:
            return state, True
        report.entries.append(done.sequence)
    return state, False


def _delete_holders(store: Store, repo: Repository, state: seglog.LogState,
                    erased: set[str]) -> int:
    """Delete every pack and segment in the bucket that is not live and holds an erased
    image: those this erasure removed, those an earlier compaction replaced (still
    within its grace period) and those of an import that died before committing. A pack
    whose table of contents does not open with this ring is left (named in the log
    message); the repository check lists it."""
    repo_id = repo.repo_id
    live = {compaction.object_key(repo_id, o.type, o.id) for o in state.live.values()}
    deleted = 0
    for key in sorted(store.list_keys(layout.segments_prefix(repo_id))):
        if key in live:
            continue
        try:
            ids = decode_segment(store.get(key), key.rsplit("/", 1)[-1]).id_strings()
        except (ObjectNotFound, SegmentError):
            continue
        if erased.intersection(ids):
            store.delete(key)
            deleted += 1
    for key in sorted(store.list_keys(layout.packs_prefix(repo_id))):
        if key in live:
            continue
        if _pack_holds(store, repo, key, erased):
            store.delete(key)
            deleted += 1
    if hasattr(layout, "labels_prefix"):  # issue 17: labels name erased images too
        for key in sorted(store.list_keys(layout.labels_prefix(repo_id))):
            if key not in live and _label_names(store, repo, key, erased):
                store.delete(key)
                deleted += 1
    return deleted


def _label_names(store: Store, repo: Repository, key: str, erased: set[str]) -> bool:
    """Whether the (not live) label object ``key`` names an erased image. One that does
    not open with this ring is left (the repository check lists strays)."""
    name = key.rsplit("/", 1)[-1]
    try:
        blob = store.get(key)
        version = LabelObject.from_bytes(blob, name).key_version
        keys = repo.ring.version(version)
        _, words = open_label(blob, name, repo_id=repo.repo_id, data_key=keys.data_key,
                              mac_key=index_mac_key(keys.data_key))
    except (ObjectNotFound, FormatError, DecryptionError, KeyError):
        return False
    return any(erased.intersection(ids) for ids in words.values())


def _pack_holds(store: Store, repo: Repository, key: str, erased: set[str]) -> bool:
    try:
        pack_id = layout.parse_pack_key(key)[1]
        blob = store.get(key)
        _start, version = packs.trailer_info(blob, len(blob), pack_id)
        toc = packs.open_toc(repo.ring.version(version).data_key, repo.repo_id, pack_id,
                             len(blob), blob)
    except (ValueError, ObjectNotFound, FormatError, DecryptionError, KeyError):
        compaction.log.warning("repository %s: pack %s does not open with this key ring; "
                               "not checked for erased images", repo.repo_id, key)
        return False
    return bool(erased.intersection(toc.image_ids()))


def _journal(settings: Settings, writer: Identity, report: ErasureReport) -> None:
    """Append the local receipt: no patient attribute (not even the target's value, a
    patient id being guessable from a hash of it), only keyed image ids."""
    plan = report.plan
    line = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "repo": plan.repo_id, "user": writer.user_id, "kind": plan.target.kind,
            "entries": report.entries, "image_ids": sorted(plan.image_ids)}
    path = settings.data_path / JOURNAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(line, sort_keys=True) + "\n")


def journal(settings: Settings) -> list[dict[str, Any]]:
    """The erasure receipts of this workstation, oldest first."""
    path = settings.data_path / JOURNAL_FILE
    if not path.exists():
        return []
    out = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            out.append(json.loads(text))
        except json.JSONDecodeError:
            raise RadcryptError(f"the erasure journal {path} is damaged at line {number}"
                                ) from None
    return out
