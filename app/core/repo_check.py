"""`radcrypt check --repo R`: is a repository whole, and did the cloud keep it as written?

A search answer is only as good as the repository behind it: a deleted, withheld, altered,
duplicated or forged object must be found by a user command, not by a patient whose prior
study is missing (restic's ``check`` is the model). This module reads the repository and
reports every problem it finds, each naming the object (segment or pack id, log entry
sequence, image id) and a stable kind word; it never writes to the bucket.

Storage format 2 (docs/FORMAT-2.md 4, 5, 7.4):

* the manifest, signed by the pinned owner key and not below the session's (app/core/logstate);
* every member's grant present and signed by an owner key (else that member is locked out);
* the segment log replayed from genesis (seglog.verify_log(from_genesis=True)), against this
  workstation's rollback memory; every owner checkpoint compared with the replayed log. A
  log that breaks at entry n is reported once, named, and the objects are then checked
  against the log up to n - 1 (the part that verified);
* every live segment: present, the SHA-256 its log entry names, parses, its MAC verifies
  under its key version's index MAC key, and its header's writer, key version, count and
  base sequence agree with the entry that added it;
* every live pack: present, header and table of contents open under its key version, key
  version and image count equal to the log's (``read_data``: the whole pack read, its
  SHA-256 compared with the log's and every entry opened);
* per key version: every image id in exactly one live segment and one live pack (an import
  batch's segment and pack, or the compacted objects holding them), same vector widths in
  every segment, and the original ``objects/<image_id>`` of every image present;
* every live label object (issue 17, log type 4; app/core/label_check.py): present, the
  SHA-256 its log entry names, parses, MAC and sealed labels open under its key version,
  and the segment it names live in that key version with the row count it says;
* in a CKKS repository (issue 19, docs/FORMAT-2.md 4.4, 4.5): every live segment's CKKS
  block parses, holds the ciphertexts its kind needs, has the segment's row count and the
  repository's period, and its first ciphertext decrypts under its key version's CKKS key
  (a block of another version or repository does not); the evaluation-keys object
  ``ckks/<v>`` of every key version with live segments (and of the current one) is present,
  its head's MAC verifies, its body's SHA-256 is the head's, the body parses and its keys
  work with the version's CKKS key (tested on fresh encryptions: "wrong key" otherwise,
  keys a holder of the version's key forged; SECURITY.md 4.2). Problems
  are named by segment id and by ``ckks/<v>`` (type "evaluation keys"). The object of a
  version below the current one with no live segment left is listed among the strays
  (state "unused", aged by the entry that removed the version's last segment): gc's;
* every other object under ``segments/``, ``packs/`` and ``labels/`` is listed (``strays``):
  removed by a log entry and not yet deleted (grace period, FORMAT-2 7.4), named only by
  log entries after a break, or unreferenced (no entry added it: an import or a label
  change that died before its commit, or a forgery). Strays are read: one that does not
  authenticate under the repository's keys is also a problem (a member's crashed import
  writes authentic objects; the cloud or a non-member cannot). Originals of no live image
  are listed too.

Storage format 1 (read-only since issue 13): every segment parses and its checksum verifies
(what the search service checks), one vector width per key version, no image in two
segments of one key version, and every indexed image has its ``meta``, ``thumbs`` and
original objects.

Reading the data (issue 14, restic's ``check --read-data``). ``read_data`` reads every
live pack whole (SHA-256 against the log, every entry opened: its associated data binds
the repository, the pack id and the key version) and every live image's original
(``objects/<image id>``) streamed through AES-GCM under the key version the image is
indexed with (its associated data binds repository, kind, image id and key version: an
original replaced by another image's, or altered, does not open). ``DataSubset`` reads
only a part: "10%" (a seeded random choice, the seed printed so that a run can be
repeated) or "n/m" (restic's: the n-th of m parts, by object id, so m runs read all).
Segments are always read whole (they are small next to the packs and originals).

Reading the data decrypts previews (in the packs) and originals, so it is recorded in the
access log like any other decryption (issue 16): ``before_decrypting`` (the facade passes
app/core/access_log.record_check) is called ONCE per run, with every image whose pack
entries or original the run will open, BEFORE the first of them is decrypted; it raising
stops the check there, nothing decrypted. For that the packs are checked in two passes:
the tables of contents of all (their image ids), then the chosen packs read whole.

Ages. Strays carry ``age_s`` from the store's last-modified time
(cloud.backend.list_with_times: S3 LastModified, the directory store's mtime), taken
from the listing itself; gc (app/core/gc.py) deletes the unreferenced ones past its
grace period.

Exit status of the command: 0 when ``problems`` is empty, 1 otherwise; strays alone are not
problems. The report (``RepoCheckReport.as_dict``) is built to grow (issue 14: --read-data
of originals, orphans' ages for ``gc``): problems, strays and counts are lists and maps of
small records with stable field names.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from app.core import logstate, objects
from app.core.errors import RadcryptError
from app.core.label_check import TYPE_LABEL, LabelChecker, check_live_labels
from app.core.packs import toc_tail
from app.core.progress import ProgressCallback, ProgressEvent, no_progress
from app.core.repository import Repository, is_format2
from app.core.settings import Settings
from cloud import layout, seglog
from cloud.backend import ObjectNotFound, Store, list_with_times
from cloud.seglog_format import TYPE_WORDS
from cloud.segments import (
    Segment,
    SegmentAuthError,
    SegmentError,
    decode_segment,
    verify_segment_mac,
)
from crypto import aead, signed
from crypto import pack as packs
from crypto.errors import DecryptionError, FormatError
from crypto.segment_mac import index_mac_key

READ_THREADS = 4  # whole segments in flight: bounded memory, and the wait is the network
_RECORD_HEAD = 4 + 1 + 32 + 64  # "RCSR" | version | signer key | signature (crypto/signed.py)
_LOG_NAME = re.compile(r"/log/(\d{20})\b")
_CHECKPOINT_NAME = re.compile(r"/checkpoints/(\d{20})\b")
_ROLLBACK_REASONS = {"rollback", "fork", "checkpoint rollback"}
_CHECKPOINT_REASONS = {"checkpoint live set", "checkpoint head mismatch"}
_COUNT_LOCK = threading.Lock()
MAX_LOG_BREAKS = 16  # log failures reported before giving up on the object checks

# Problem kinds (stable words for --json consumers and tests).
MANIFEST = "manifest"            # the manifest does not verify or went back
LOG = "log"                      # the log breaks a chain, kind or membership rule (reason)
MISSING = "missing"              # a live object is not in the bucket
ALTERED = "altered"              # its SHA-256 is not the one its log entry names
DAMAGED = "damaged"              # it does not parse (segment, pack structure)
NOT_AUTHENTICATED = "not authenticated"  # MAC or AEAD fails: forged, or altered and rehashed
MISMATCH = "mismatch"            # its header/TOC disagrees with its log entry
DUPLICATE = "duplicate"          # an image in two live segments (or packs) of one key version
UNPAIRED = "unpaired"            # an image in a segment but no pack, or the reverse
MISSING_OBJECT = "missing object"  # an indexed image without its original, meta or preview
WIDTHS = "widths"                # segments of one key version with different vector widths
FORGED_STRAY = "unauthenticated stray"  # an object outside the live set that is not authentic
GRANT = "grant"                  # a member's grant missing or not signed by an owner
WRONG_KEY = "wrong key"          # a CKKS block that does not decrypt under its key version,
#                                  or evaluation keys that do not work with its CKKS key
EVAL_KEYS = "evaluation keys"    # the type word of a ckks/<v> object (issue 19)
UNUSED = "unused"                # a stray state: evaluation keys of a version without segments


@dataclass(frozen=True)
class Problem:
    """One thing wrong, naming its object: ``type`` is "manifest", "log entry",
    "checkpoint", "segment", "pack", "label", "image", "evaluation keys" (``id`` "ckks/<v>",
    issue 19) or "original" (an image's original object,
    ``id`` its image id); ``id`` the object's id (a log sequence as
    decimal text for log entries and checkpoints); ``sequence`` the log entry concerned
    (the one that added the object), when there is one."""

    kind: str
    type: str
    id: str
    detail: str
    sequence: int | None = None

    def line(self) -> str:
        where = f"{self.type} {self.id}".strip()
        if self.sequence is not None and self.type not in ("log entry", "checkpoint"):
            where += f" (log entry {self.sequence})"
        return f"{where}: {self.kind}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "type": self.type, "id": self.id,
                "sequence": self.sequence, "detail": self.detail}


@dataclass(frozen=True)
class Stray:
    """An object under segments/, packs/, labels/ or objects/ that is not live.

    ``state``: "removed" (a log entry removed it at ``removed_at``, ``removed_age_s``
    seconds ago: deleted after the grace period), "unverified" (named only by log entries
    after a break in the log), "unreferenced" (no log entry added it). ``authentic``: True
    or False when it was read and opened with the repository's keys, None when not read
    (removed objects, originals) or no key of its version is at hand. ``age_s``: seconds
    since the store last wrote it, when the store tells (None otherwise);
    ``written_after_s``: for a segment, seconds since the log entry its header names as
    its base, ``base_sequence`` (it was written after that entry; the header is
    unauthenticated unless ``authentic``)."""

    type: str          # "segment", "pack", "label", "format-1 segment", "original",
    #                    "evaluation keys" (state "unused": no live segment of its version)
    id: str
    key: str
    size: int
    state: str
    removed_at: int | None = None
    removed_age_s: float | None = None
    authentic: bool | None = None
    age_s: float | None = None
    base_sequence: int | None = None
    written_after_s: float | None = None
    detail: str = ""

    def line(self) -> str:
        text = f"{self.type} {self.id}: {self.state}, {self.size} bytes"
        if self.removed_at is not None:
            text += f", removed by log entry {self.removed_at}"
        if self.removed_age_s is not None:
            text += f" {_ago(self.removed_age_s)}"
        if self.age_s is not None:
            text += f", written {_ago(self.age_s)}"
        if self.base_sequence is not None:
            text += f", written after log entry {self.base_sequence}"
            if self.written_after_s is not None:
                text += f" ({_ago(self.written_after_s)})"
        if self.authentic is False:
            text += ", NOT authentic"
        return text + (f" ({self.detail})" if self.detail else "")

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "id": self.id, "key": self.key, "size": self.size,
                "state": self.state, "removed_at": self.removed_at,
                "removed_age_s": _round(self.removed_age_s), "authentic": self.authentic,
                "age_s": _round(self.age_s), "base_sequence": self.base_sequence,
                "written_after_s": _round(self.written_after_s),
                "detail": self.detail}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


@dataclass(frozen=True)
class DataSubset:
    """Which packs and originals a check reads whole (``radcrypt check
    --read-data-subset``): ``fraction`` of them chosen by a seeded hash of their id, or
    ``part`` n of m (object ids whose first 32 bits are n - 1 modulo m). Built by
    ``parse_subset``."""

    spec: str
    fraction: float | None = None
    part: tuple[int, int] | None = None
    seed: int = 0

    def chooses(self, object_id: str) -> bool:
        if self.part is not None:
            n, m = self.part
            return _id_number(object_id, "") % m == n - 1
        fraction = 1.0 if self.fraction is None else self.fraction
        return _id_number(object_id, str(self.seed)) < fraction * 2**32

    def as_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "fraction": self.fraction,
                "part": None if self.part is None else list(self.part),
                "seed": self.seed if self.part is None else None}


def _id_number(object_id: str, seed: str) -> int:
    """32 bits of an object id (its first 8 hex digits without a seed; with one, a hash
    of seed and id, so that another seed chooses another subset)."""
    if not seed:
        try:
            return int(object_id[:8], 16)
        except ValueError:
            pass
    digest = hashlib.sha256(f"{seed}:{object_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def parse_subset(text: str, seed: int | None = None) -> DataSubset:
    """A DataSubset from "10%", "2.5%" or "n/m" (ValueError naming the text otherwise).
    ``seed``: for a percentage, the seed of the choice (None: a random one, reported)."""
    raw = text.strip()
    if raw.endswith("%"):
        try:
            percent = float(raw[:-1])
        except ValueError:
            percent = -1.0
        if not 0 < percent <= 100:
            raise ValueError(f"invalid --read-data-subset {text!r}: a percentage must be "
                             "above 0 and at most 100 (e.g. 10%)")
        return DataSubset(raw, fraction=percent / 100,
                          seed=secrets.randbelow(2**31) if seed is None else seed)
    n_text, slash, m_text = raw.partition("/")
    if slash and n_text.isdigit() and m_text.isdigit() and 1 <= int(n_text) <= int(m_text):
        return DataSubset(raw, part=(int(n_text), int(m_text)))
    raise ValueError(f"invalid --read-data-subset {text!r}: use a percentage (10%) or "
                     "n/m with 1 <= n <= m (2/5: the second of five parts)")


@dataclass
class RepoCheckReport:
    """What ``check_repository`` found. ``ok``: no problem (strays do not count)."""

    repo_id: str
    storage_format: int
    problems: list[Problem] = field(default_factory=list)
    strays: list[Stray] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log: dict[str, Any] = field(default_factory=dict)      # head, hash, checkpoint, complete
    counts: dict[str, int] = field(default_factory=dict)   # what was checked
    read_data: bool = False
    subset: DataSubset | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, type_: str, id_: str, detail: str,
            sequence: int | None = None) -> None:
        self.problems.append(Problem(kind, type_, id_, detail, sequence))

    def lines(self) -> list[str]:
        """The text the CLI prints: one line per problem, then strays and notes."""
        out = [p.line() for p in self.problems]
        out += [f"stray {s.line()}" for s in self.strays]
        out += [f"note: {n}" for n in self.notes]
        summary = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        verdict = "no problems" if self.ok else f"{len(self.problems)} problem(s)"
        if self.subset is not None:
            seed = f", seed {self.subset.seed}" if self.subset.part is None else ""
            out.append(f"read data of the subset {self.subset.spec}{seed}")
        out.append(f"repository {self.repo_id} (storage format {self.storage_format}): "
                   f"{verdict}; checked {summary or 'nothing'}; {len(self.strays)} stray "
                   "object(s)")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "storage_format": self.storage_format,
                "ok": self.ok, "problems": [p.as_dict() for p in self.problems],
                "strays": [s.as_dict() for s in self.strays], "notes": list(self.notes),
                "log": dict(self.log), "counts": dict(self.counts),
                "read_data": self.read_data,
                "read_data_subset": None if self.subset is None else self.subset.as_dict(),
                "seconds": round(self.seconds, 3)}


# --- entry point -----------------------------------------------------------------------------


def check_repository(store: Store, settings: Settings | None, repo: Repository, *,
                     progress: ProgressCallback = no_progress, read_data: bool = False,
                     subset: DataSubset | None = None, now: float | None = None,
                     before_decrypting: Callable[[list[str]], None] | None = None
                     ) -> RepoCheckReport:
    """Check ``repo`` (opened by a member: its key ring authenticates what is read) and
    return the report; nothing in the bucket is written. ``settings``: the workstation's,
    for the log's rollback memory (None: without it; a clean log's head is remembered).
    ``read_data``: also read every live pack whole (SHA-256, every entry opened) and
    every live image's original (decrypted under its key version). ``subset``: read
    only these packs and originals whole (implies ``read_data``). ``now``: the clock
    for ages (tests). ``before_decrypting``: called once with the ids of every image whose
    preview or original the data reading will decrypt, before the first (module
    docstring: the access log); what it raises is raised, nothing decrypted.

    Progress events: "log" (once), then "segments", "packs", "labels" (when there are
    live labels), "pack data" and "originals" (with read_data), "strays" (per object).
    Raises only for the store being unreachable (StoreError), ``before_decrypting``'s
    exceptions and programming errors.
    """
    start = time.perf_counter()
    checker = _Checker(store, settings, repo, progress, read_data or subset is not None,
                       time.time() if now is None else now, subset)
    checker.before_decrypting = before_decrypting
    if is_format2(repo.manifest):
        checker.format2()
    else:
        checker.format1()
    checker.report.seconds = time.perf_counter() - start
    return checker.report


# --- helpers for the store -------------------------------------------------------------------


class _Recording:
    """The store, keeping the bytes of every log entry read (the verification reads each
    once; the check then needs their writers and times without a second GET)."""

    def __init__(self, store: Store, repo_id: str) -> None:
        self._store = store
        self._log = layout.log_prefix(repo_id)
        self.entries: dict[str, bytes] = {}

    def get(self, key: str) -> bytes:
        blob = self._store.get(key)
        if key.startswith(self._log):
            self.entries[key] = blob
        return blob

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class _LogPrefix:
    """The store as if log entries and checkpoints from ``limit`` on did not exist: the
    log is then verified up to the entry before a break."""

    def __init__(self, store: Any, repo_id: str, limit: int) -> None:
        self._store = store
        self._limit = limit
        self._prefixes = {layout.log_prefix(repo_id): layout.parse_log_entry_key,
                          layout.checkpoints_prefix(repo_id): layout.parse_checkpoint_key}

    def _hidden(self, key: str) -> bool:
        for prefix, parse in self._prefixes.items():
            if key.startswith(prefix):
                try:
                    return parse(key)[1] >= self._limit
                except ValueError:
                    return False
        return False

    def list_keys(self, prefix: str) -> Iterator[str]:
        return (k for k in self._store.list_keys(prefix) if not self._hidden(k))

    def list_objects(self, prefix: str) -> Iterator[tuple[str, int]]:
        return (item for item in self._store.list_objects(prefix) if not self._hidden(item[0]))

    def get(self, key: str) -> bytes:
        if self._hidden(key):
            raise ObjectNotFound(key)
        blob: bytes = self._store.get(key)
        return blob

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _failing_sequence(exc: Exception) -> tuple[str, int | None]:
    """("log entry" or "checkpoint", sequence) of a verification failure."""
    reason = getattr(exc, "reason", "")
    sequence = getattr(exc, "sequence", None)
    text = str(exc)
    if reason in _CHECKPOINT_REASONS or (sequence is None and _CHECKPOINT_NAME.search(text)):
        if sequence is None:
            found = _CHECKPOINT_NAME.search(text)
            sequence = int(found.group(1)) if found else None
        return "checkpoint", sequence
    if sequence is None:
        found = _LOG_NAME.search(text)
        sequence = int(found.group(1)) if found else None
    return "log entry", sequence


# --- the checks ------------------------------------------------------------------------------


class _Checker:
    def __init__(self, store: Store, settings: Settings | None, repo: Repository,
                 progress: ProgressCallback, read_data: bool, now: float,
                 subset: DataSubset | None = None) -> None:
        self.store = store
        self.settings = settings
        self.repo = repo
        self.repo_id = repo.repo_id
        self.progress = progress
        self.read_data = read_data
        self.now = now
        self.subset = subset
        self.report = RepoCheckReport(repo.repo_id, 2 if is_format2(repo.manifest) else 1,
                                      read_data=read_data, subset=subset)
        self.times: dict[str, float] = {}  # key -> last-modified time, from the listings
        self.mac_keys = {v.version: index_mac_key(v.data_key) for v in repo.ring.versions}
        self.entries: dict[int, seglog.LogEntry] = {}
        self.modified: Callable[[str], float | None] | None = getattr(store, "modified", None)
        self.before_decrypting: Callable[[list[str]], None] | None = None
        self.labels: LabelChecker | None = None
        self._stored: dict[str, tuple[str, int]] | None = None  # originals, listed once
        self._pack_images: dict[str, list[str]] = {}  # pack id -> ids (read_data only)
        self.ckks = repo.manifest.search == "ckks"  # issue 19: blocks and evaluation keys

    # --- format 2 ------------------------------------------------------------------------------

    def format2(self) -> None:
        self._check_grants()
        state, unverified = self._verified_log()
        self.progress(ProgressEvent("log", 1, 1, message="segment log verified"
                                    if state is not None else "segment log not verified"))
        if state is None:
            self.report.notes.append("the segment log did not verify at all: live segments "
                                     "and packs were not checked")
            return
        segments = self._listing(layout.segments_prefix(self.repo_id), layout.parse_segment_key)
        pack_sizes = self._listing(layout.packs_prefix(self.repo_id), layout.parse_pack_key)
        label_sizes = self._listing(layout.labels_prefix(self.repo_id), layout.parse_label_key)
        self.labels = LabelChecker(self.store, self.repo, state)
        seg_ids = self._check_segments(state, segments)
        if self.ckks:
            self._check_eval_keys(state)
        pack_ids = self._check_packs(state, pack_sizes)
        self._check_labels(state, label_sizes)
        if self.read_data:
            self._read_pack_data(state, pack_sizes, seg_ids, pack_ids)
        self._check_images(state, seg_ids, pack_ids)
        self._strays(state, unverified, segments, pack_sizes, label_sizes)

    def _check_labels(self, state: seglog.LogState, listing: dict[str, tuple[str, int]]
                      ) -> None:
        """Every live label object (app/core/label_check.py); counted only when there is
        one (a repository without labels reports what it did before labels existed)."""
        assert self.labels is not None
        if not state.labels():
            return

        def each(done: int, total: int, label_id: str) -> None:
            self.progress(ProgressEvent("labels", done, total, item=label_id))

        for found in check_live_labels(self.labels, listing, each):
            if found.kind == "note":
                self.report.notes.append(f"label {found.label_id}: {found.detail}")
            else:
                self.report.add(found.kind, "label", found.label_id, found.detail,
                                found.sequence)
        self.report.counts["labels"] = len(state.labels())

    def _listing(self, prefix: str, parse: Callable[[str], tuple[str, str]]
                 ) -> dict[str, tuple[str, int]]:
        """object id -> (key, size) of the objects under ``prefix`` with a valid name."""
        out: dict[str, tuple[str, int]] = {}
        for key, size, modified in list_with_times(self.store, prefix):
            try:
                out[parse(key)[1]] = (key, size)
            except ValueError:
                continue  # a foreign name (FORMAT-2 2.2)
            if modified is not None:
                self.times[key] = modified
        return out

    def _reads(self, object_id: str) -> bool:
        """Whether this pack or original is read whole (read_data, or in the subset)."""
        if not self.read_data:
            return False
        return self.subset is None or self.subset.chooses(object_id)

    def _verified_log(self) -> tuple[seglog.LogState | None, dict[tuple[int, str], int]]:
        """The log verified from genesis (or up to its first break), and the objects named
        only by entries after a break (type, id) -> sequence."""
        report = self.report
        try:
            trust = logstate.repository_trust(self.store, self.repo)
        except (RadcryptError, FormatError, ValueError) as exc:
            report.add(MANIFEST, "manifest", self.repo_id, str(exc))
            return None, {}
        remembered = None
        if self.settings is not None:
            try:
                remembered = logstate.remembered_heads(self.settings).get(self.repo_id)
            except RadcryptError as exc:
                report.notes.append(f"rollback memory not used: {exc}")
        recorder = _Recording(self.store, self.repo_id)
        view: Any = recorder
        limit: int | None = None
        from_genesis = True
        state: seglog.LogState | None = None
        for _ in range(MAX_LOG_BREAKS):
            try:
                state = seglog.verify_log(view, self.repo_id, trust, remembered=remembered,
                                          from_genesis=from_genesis)
                break
            except (seglog.LogError, FormatError) as exc:  # SignatureError is a FormatError
                reason = getattr(exc, "reason", "")
                where, sequence = _failing_sequence(exc)
                if (reason == "no genesis" and from_genesis and limit is None
                        and self._has_checkpoint()):
                    from_genesis = False  # entries below a checkpoint deleted (FORMAT-2 5.6)
                    report.notes.append("the log has no genesis entry: verified from the "
                                        "newest owner checkpoint (entries below it deleted, "
                                        "FORMAT-2 5.6)")
                    continue
                detail = str(exc) if reason in str(exc) else f"{exc} ({reason})"
                detail = detail.removeprefix(f"{where} {sequence}: ")  # said by line()
                report.add(LOG, where, "" if sequence is None else str(sequence), detail,
                           sequence)
                if reason in _ROLLBACK_REASONS:
                    remembered = None  # reported; the log as it stands is still checked
                    continue
                if sequence is None or sequence <= 0 or (limit is not None
                                                         and sequence >= limit):
                    break
                limit = sequence
                remembered = None  # the shortened log is below it by construction
                view = _LogPrefix(recorder, self.repo_id, limit)
        if state is None:
            return None, {}
        self.entries = self._decode_entries(recorder, state)
        unverified: dict[tuple[int, str], int] = {}
        if limit is not None:
            unverified = self._after_break(recorder, limit)
            report.notes.append(f"objects were checked against the log up to entry "
                                f"{state.head.sequence}, before its first break")
        report.log = {"head": state.head.sequence, "hash": state.head.hash.hex(),
                      "checkpoint": state.head.checkpoint, "start": state.start,
                      "complete": limit is None,
                      "entries": len(state.hashes)}
        report.counts["log entries"] = len(state.hashes)
        if self.settings is not None and not report.problems:
            logstate.remember_head(self.settings, self.repo_id, state.head)
        return state, unverified

    def _check_grants(self) -> None:
        """Every member of the manifest has a grant signed by an owner key (or a member
        would be locked out with no warning); grants of non-members are noted."""
        manifest, owner_key = self.repo.manifest, self.repo.owner_key
        if manifest.legacy or owner_key is None:
            return
        owner_keys = getattr(manifest, "owner_keys", None)
        trusted = list(owner_keys(owner_key).values()) if owner_keys else [owner_key]
        trusted = trusted or [owner_key]
        members = {m.user_id for m in manifest.members}
        for member in sorted(members):
            name = layout.grant_key(self.repo_id, member)
            try:
                signed.open_record(self.store.get(name), "grant", name, trusted)
            except ObjectNotFound:
                self.report.add(GRANT, "grant", member, "the member's grant "
                                f"(grants/{member}) is not in the bucket: they cannot "
                                "open the repository")
            except (FormatError, ValueError) as exc:
                self.report.add(GRANT, "grant", member, f"grants/{member} is not signed by "
                                f"an owner of the repository ({exc})")
        prefix = layout.grants_prefix(self.repo_id)
        for key in self.store.list_keys(prefix):
            if key[len(prefix):] not in members:
                self.report.notes.append(f"grants/{key[len(prefix):]} belongs to no member "
                                         "of the manifest (ignored by readers)")
        self.report.counts["grants"] = len(members)

    def _has_checkpoint(self) -> bool:
        return any(True for _ in self.store.list_keys(layout.checkpoints_prefix(self.repo_id)))

    def _decode_entries(self, recorder: _Recording, state: seglog.LogState
                        ) -> dict[int, seglog.LogEntry]:
        """The verified entries, decoded from the bytes the verification read (their hash
        is compared with the one it recorded)."""
        out: dict[int, seglog.LogEntry] = {}
        for sequence, digest in state.hashes.items():
            key = layout.log_entry_key(self.repo_id, sequence)
            blob = recorder.entries.get(key)
            if blob is None or hashlib.sha256(blob).digest() != digest:
                continue
            out[sequence] = seglog.decode_payload(blob[_RECORD_HEAD:], key)
        return out

    def _after_break(self, recorder: _Recording, limit: int) -> dict[tuple[int, str], int]:
        """Objects added by listed entries at or after ``limit`` (not verified: decoded
        as far as they decode, to tell them apart from objects no entry names)."""
        named: dict[tuple[int, str], int] = {}
        for key in self.store.list_keys(layout.log_prefix(self.repo_id)):
            try:
                sequence = layout.parse_log_entry_key(key)[1]
            except ValueError:
                continue
            if sequence < limit:
                continue
            try:
                blob = recorder.entries.get(key) or self.store.get(key)
                signed.signer_of(blob)
                entry = seglog.decode_payload(blob[_RECORD_HEAD:], key)
            except (ObjectNotFound, FormatError, ValueError):
                continue
            for item in entry.added:
                named.setdefault((item.type, item.id), sequence)
        return named

    # segments

    def _check_segments(self, state: seglog.LogState, listing: dict[str, tuple[str, int]]
                        ) -> dict[int, dict[str, list[str]]]:
        """Check every live segment; return key version -> image id -> segment ids."""
        live = state.segments()
        images: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        widths: dict[int, dict[tuple[int, ...], list[str]]] = defaultdict(
            lambda: defaultdict(list))

        def one(obj: seglog.LiveObject) -> tuple[list[str], tuple[int, ...]] | None:
            segment = self._segment(obj, listing)  # its bytes are freed here: ids kept
            return None if segment is None else (segment.id_strings(), segment.vectors.widths)

        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="radcrypt-check") as pool:
            for done, (obj, found) in enumerate(zip(live, pool.map(one, live), strict=True),
                                                1):
                self.progress(ProgressEvent("segments", done, len(live), item=obj.id))
                if found is None:
                    continue
                for image_id in found[0]:
                    images[obj.key_version][image_id].append(obj.id)
                widths[obj.key_version][found[1]].append(obj.id)
        for version, by_widths in widths.items():
            if len(by_widths) > 1:
                common = max(by_widths, key=lambda w: len(by_widths[w]))
                for other, ids in by_widths.items():
                    if other != common:
                        for seg_id in ids:
                            self.report.add(WIDTHS, "segment", seg_id, f"vector widths "
                                            f"{list(other)} differ from {list(common)}, those "
                                            f"of the other segments of key version {version} "
                                            "(the service will not search it)",
                                            self._added_at(state, seglog.TYPE_SEGMENT, seg_id))
        self.report.counts["segments"] = len(live)
        return images

    def _added_at(self, state: seglog.LogState, type_: int, object_id: str) -> int | None:
        obj = state.live.get((type_, object_id))
        return None if obj is None else obj.added_at

    def _segment(self, obj: seglog.LiveObject, listing: dict[str, tuple[str, int]]
                 ) -> Segment | None:
        report, seq = self.report, obj.added_at
        if obj.id not in listing:
            report.add(MISSING, "segment", obj.id, "live in the segment log but not in the "
                       "bucket (deleted or withheld)", seq)
            return None
        key = listing[obj.id][0]
        try:
            blob = self.store.get(key)
        except ObjectNotFound:
            report.add(MISSING, "segment", obj.id, "listed but gone when read", seq)
            return None
        if hashlib.sha256(blob).digest() != obj.sha256:
            report.add(ALTERED, "segment", obj.id, "its SHA-256 is not the one its log "
                       "entry names (altered, truncated or replaced in the bucket)", seq)
            return None
        try:
            segment = decode_segment(blob, key)
        except SegmentError as exc:
            report.add(DAMAGED, "segment", obj.id, f"does not parse: {exc.reason}", seq)
            return None
        mac_key = self.mac_keys.get(segment.key_version)
        if segment.format_version != 2:
            report.add(MISMATCH, "segment", obj.id, f"format version "
                       f"{segment.format_version} in a format-2 log (no MAC)", seq)
        elif mac_key is None:
            report.notes.append(f"segment {obj.id}: key version {segment.key_version} is not "
                                "in this key ring, its MAC was not checked")
        else:
            try:
                verify_segment_mac(blob, key, self.repo_id, mac_key)
            except SegmentAuthError as exc:
                report.add(NOT_AUTHENTICATED, "segment", obj.id, exc.detail, seq)
        self._segment_vs_entry(obj, segment)
        if self.ckks:
            self._check_block(obj, segment)
        return segment

    def _check_block(self, obj: seglog.LiveObject, segment: Segment) -> None:
        """A live segment's CKKS block (issue 19): parses, has the segment's rows and the
        repository's period, and decrypts under its key version's CKKS key."""
        from app.core import ckks_blocks
        from crypto import ckks

        report, seq, what = self.report, obj.added_at, f"the CKKS block of segment {obj.id}"
        self._count("ckks blocks")
        if segment.ckks is None:
            report.add(MISMATCH, "segment", obj.id, "carries no CKKS block in a ckks "
                       "repository (the service leaves it out of every search)", seq)
            return
        block = bytes(segment.ckks)
        try:
            _, period, count, _ = ckks_blocks.block_shape(block, what)
        except FormatError as exc:
            report.add(DAMAGED, "segment", obj.id, f"its CKKS block does not parse: {exc}",
                       seq)
            return
        disagree = []
        if count != len(segment):
            disagree.append(f"its CKKS block holds {count} vectors, the segment {len(segment)}")
        if period != ckks.period_of(self.repo.manifest.dim):
            disagree.append(f"its CKKS block has period {period}, the repository's "
                            f"dimension {self.repo.manifest.dim} needs "
                            f"{ckks.period_of(self.repo.manifest.dim)}")
        if disagree:
            report.add(MISMATCH, "segment", obj.id, "; ".join(disagree), seq)
            return
        version = segment.key_version
        if version not in self.mac_keys:
            return  # noted with its MAC: no key of that version here
        try:
            decrypts = ckks_blocks.block_decrypts(self.repo, version, block, what)
        except FormatError as exc:
            report.add(DAMAGED, "segment", obj.id, f"its CKKS block does not load: {exc}", seq)
            return
        if not decrypts:
            report.add(WRONG_KEY, "segment", obj.id, "its CKKS block does not decrypt under "
                       f"the CKKS key of key version {version} (encrypted under another key "
                       "version's or repository's key): its scores would be refused at "
                       "every search", seq)

    def _check_eval_keys(self, state: seglog.LogState) -> None:
        """The evaluation-keys object of every key version with live segments, and of the
        current version (issue 19, docs/FORMAT-2.md 4.5)."""
        from app.core import ckks_blocks

        versions = {o.key_version for o in state.segments()} | {self.repo.keys.version}
        for version in sorted(versions):
            name = f"ckks/{version}"
            if version not in self.mac_keys:
                self.report.notes.append(f"evaluation keys {name}: key version {version} is "
                                         "not in this key ring, not checked")
                continue
            found = ckks_blocks.eval_keys_problem(self.store, self.repo, version)
            if found is not None:
                self.report.add(found[0], "evaluation keys", name, found[1])
        self.report.counts["evaluation keys"] = len(versions)
        self._unused_eval_keys(state, versions)

    def _unused_eval_keys(self, state: seglog.LogState, used: set[int]) -> None:
        """The evaluation-keys objects of key versions below the current one with no live
        segment left (a revocation re-encrypted and removed them all): strays of type
        "evaluation keys", state "unused", aged by the log entry that removed the
        version's last segment (None when the log kept no such entry: gc then keeps it
        unless its grace period is 0). gc deletes them; no reader needs them."""
        prefix = layout.repo_prefix(self.repo_id) + "ckks/"
        for key, size, _modified in list_with_times(self.store, prefix):
            tail = key[len(prefix):]
            if not tail.isdigit() or int(tail) in used \
                    or int(tail) >= self.repo.keys.version:
                continue
            version = int(tail)
            removed = [at for (type_, _), (obj, at) in state.history.items()
                       if type_ == seglog.TYPE_SEGMENT and obj.key_version == version]
            entry = self.entries.get(max(removed)) if removed else None
            age = None if entry is None else max(0.0, self.now - entry.time_ms / 1000)
            self.report.strays.append(Stray(
                EVAL_KEYS, f"ckks/{version}", key, size, UNUSED,
                removed_at=max(removed) if removed else None, removed_age_s=age,
                detail=f"no live segment of key version {version} is left"))

    def _segment_vs_entry(self, obj: seglog.LiveObject, segment: Segment) -> None:
        seq, disagree = obj.added_at, []
        if segment.key_version != obj.key_version:
            disagree.append(f"key version {segment.key_version}, the log says "
                            f"{obj.key_version}")
        if len(segment) != obj.count:
            disagree.append(f"{len(segment)} images, the log says {obj.count}")
        entry = self.entries.get(seq)
        if entry is not None:  # None: taken from a checkpoint, its writer is not known
            if segment.writer != entry.writer:
                disagree.append(f"writer {segment.writer}, the log entry's is {entry.writer}")
            if segment.base_sequence is None or segment.base_sequence >= seq:
                disagree.append(f"base sequence {segment.base_sequence} is not below the "
                                f"entry {seq} that added it")
        if disagree:
            self.report.add(MISMATCH, "segment", obj.id, "; ".join(disagree), seq)

    # packs

    def _check_packs(self, state: seglog.LogState, listing: dict[str, tuple[str, int]]
                     ) -> dict[int, dict[str, list[str]]]:
        live = state.packs()
        images: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))

        def one(obj: seglog.LiveObject) -> list[str] | None:
            return self._pack(obj, listing)

        with ThreadPoolExecutor(READ_THREADS * 2, thread_name_prefix="radcrypt-check") as pool:
            for done, (obj, ids) in enumerate(zip(live, pool.map(one, live), strict=True), 1):
                self.progress(ProgressEvent("packs", done, len(live), item=obj.id))
                if ids and self.read_data:
                    self._pack_images[obj.id] = ids
                for image_id in ids or ():
                    images[obj.key_version][image_id].append(obj.id)
        self.report.counts["packs"] = len(live)
        return images

    def _read_pack_data(self, state: seglog.LogState, listing: dict[str, tuple[str, int]],
                        seg_ids: dict[int, dict[str, list[str]]],
                        pack_ids: dict[int, dict[str, list[str]]]) -> None:
        """The data reading's first half: record what will be decrypted (the access
        log), then read each chosen pack whole; a pack that fails no longer counts as
        holding its images (they are then named as unpaired)."""
        chosen = [obj for obj in state.packs()
                  if obj.id in self._pack_images and self._reads(obj.id)]
        if self.before_decrypting is not None:
            previews = {i for obj in chosen for i in self._pack_images[obj.id]}
            images = {i for by_id in (*seg_ids.values(), *pack_ids.values()) for i in by_id}
            stored = self._stored_originals()
            originals = {i for i in images if i in stored and self._reads(i)}
            wanted = sorted(previews | originals)
            if wanted:
                self.before_decrypting(wanted)

        def one(obj: seglog.LiveObject) -> bool:
            return self._read_pack(obj, listing)

        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="radcrypt-check") as pool:
            for done, (obj, whole) in enumerate(zip(chosen, pool.map(one, chosen),
                                                    strict=True), 1):
                self.progress(ProgressEvent("pack data", done, len(chosen), item=obj.id))
                if whole:
                    continue
                by_id = pack_ids[obj.key_version]
                for image_id in self._pack_images[obj.id]:
                    holders = by_id.get(image_id, [])
                    if obj.id in holders:
                        holders.remove(obj.id)
                    if not holders:
                        by_id.pop(image_id, None)

    def _unreadable_pack(self, obj: seglog.LiveObject, exc: Exception) -> None:
        """Report a pack that could not be read or opened, as the exception says: gone,
        not authentic under its key version, or damaged (its table of contents, read
        first, and the whole pack, read with --read-data, alike)."""
        seq = obj.added_at
        if isinstance(exc, ObjectNotFound):
            self.report.add(MISSING, "pack", obj.id, "listed but gone when read", seq)
        elif isinstance(exc, DecryptionError):
            self.report.add(NOT_AUTHENTICATED, "pack", obj.id, f"does not open under key "
                            f"version {obj.key_version}: {exc or 'authentication failed'} "
                            "(altered, forged or moved)", seq)
        else:
            self.report.add(DAMAGED, "pack", obj.id, str(exc), seq)

    def _read_pack(self, obj: seglog.LiveObject, listing: dict[str, tuple[str, int]]
                   ) -> bool:
        """Read one pack whole (its table of contents opened already): SHA-256 against
        the log, every entry opened. False, the problem reported, when it fails."""
        report, seq = self.report, obj.added_at
        key = listing[obj.id][0]
        try:
            data_key = self.repo.ring.version(obj.key_version).data_key
            blob = self.store.get(key)
            if hashlib.sha256(blob).digest() != obj.sha256:
                report.add(ALTERED, "pack", obj.id, "its SHA-256 is not the one its log "
                           "entry names (altered, truncated or replaced in the bucket)", seq)
                return False
            packs.open_pack(data_key, self.repo_id, obj.id, blob)
        except (ObjectNotFound, DecryptionError, FormatError, ValueError, KeyError) as exc:
            self._unreadable_pack(obj, exc)
            return False
        self._count("packs read")
        return True

    def _pack(self, obj: seglog.LiveObject, listing: dict[str, tuple[str, int]]
              ) -> list[str] | None:
        report, seq = self.report, obj.added_at
        if obj.id not in listing:
            report.add(MISSING, "pack", obj.id, "live in the segment log but not in the "
                       "bucket (deleted or withheld)", seq)
            return None
        key, size = listing[obj.id]
        try:
            keys = self.repo.ring.version(obj.key_version)
        except KeyError:
            report.notes.append(f"pack {obj.id}: key version {obj.key_version} is not in "
                                "this key ring, it was not opened")
            return None
        try:
            toc = self._toc(key, size, obj.id, keys.data_key)  # read whole: _read_pack
        except (ObjectNotFound, DecryptionError, FormatError, ValueError) as exc:
            self._unreadable_pack(obj, exc)
            return None
        ids = toc.image_ids()
        disagree = []
        if toc.key_version != obj.key_version:
            disagree.append(f"key version {toc.key_version}, the log says {obj.key_version}")
        if len(ids) != obj.count:
            disagree.append(f"{len(ids)} images, the log says {obj.count}")
        if disagree:
            report.add(MISMATCH, "pack", obj.id, "; ".join(disagree), seq)
        return ids

    def _toc(self, key: str, size: int, pack_id: str, data_key: bytes | None = None
             ) -> packs.PackToc:
        """Header and TOC of one pack: two range reads (three for a TOC over TAIL_READ).
        ``data_key`` None: the key of the version the trailer names (KeyError when the
        ring lacks it)."""
        tail, key_version = toc_tail(self.store, key, pack_id, size)
        if data_key is None:
            data_key = self.repo.ring.version(key_version).data_key
        packs.check_header(self.store.get_range(key, 0, packs.HEADER_SIZE), pack_id,
                           key_version)
        return packs.open_toc(data_key, self.repo_id, pack_id, size, tail)

    # images

    def _check_images(self, state: seglog.LogState, seg_ids: dict[int, dict[str, list[str]]],
                      pack_ids: dict[int, dict[str, list[str]]]) -> None:
        """Per key version: each image in exactly one live segment and one live pack; the
        original of every image present."""
        report = self.report
        for version in sorted(set(seg_ids) | set(pack_ids)):
            in_segments, in_packs = seg_ids.get(version, {}), pack_ids.get(version, {})
            for image_id, holders in sorted(in_segments.items()):
                if len(holders) > 1:
                    report.add(DUPLICATE, "image", image_id, f"in {len(holders)} live segments "
                               f"of key version {version}: {', '.join(sorted(holders))} (a "
                               "search would find it twice)")
                if image_id not in in_packs:
                    report.add(UNPAIRED, "image", image_id, f"in segment {holders[0]} but in "
                               f"no live pack of key version {version} (no metadata or "
                               "preview)", self._added_at(state, seglog.TYPE_SEGMENT,
                                                          holders[0]))
            for image_id, holders in sorted(in_packs.items()):
                if len(holders) > 1:
                    report.add(DUPLICATE, "image", image_id, f"in {len(holders)} live packs "
                               f"of key version {version}: {', '.join(sorted(holders))}")
                if image_id not in in_segments:
                    report.add(UNPAIRED, "image", image_id, f"in pack {holders[0]} but in no "
                               f"live segment of key version {version} (never found by a "
                               "search)", self._added_at(state, seglog.TYPE_PACK, holders[0]))
        live_images = {i for by_id in (*seg_ids.values(), *pack_ids.values()) for i in by_id}
        # after a break in the log, the images of the entries beyond it are not known:
        # their originals are not listed as strays
        stored = self._originals(live_images, list_strays=bool(report.log.get("complete")),
                                 state=state)
        report.counts["images"] = len(live_images)
        if self.read_data:
            versions = {image_id: version for by_version in (pack_ids, seg_ids)
                        for version, by_id in by_version.items() for image_id in by_id}
            self._read_originals(versions, stored)

    def _count(self, name: str) -> None:
        with _COUNT_LOCK:
            self.report.counts[name] = self.report.counts.get(name, 0) + 1

    def _read_originals(self, versions: dict[str, int],
                        stored: dict[str, tuple[str, int]]) -> None:
        """Stream and decrypt each chosen original under its image's key version."""
        chosen = sorted(i for i in versions if i in stored and self._reads(i))

        def one(image_id: str) -> None:
            self._read_original(image_id, versions[image_id], stored[image_id][0])

        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="radcrypt-check") as pool:
            for done, (image_id, _) in enumerate(zip(chosen, pool.map(one, chosen),
                                                     strict=True), 1):
                self.progress(ProgressEvent("originals", done, len(chosen), item=image_id))
        self.report.counts.setdefault("originals read", 0)

    def _read_original(self, image_id: str, version: int, key: str) -> None:
        try:
            keys = self.repo.ring.version(version)
        except KeyError:
            self.report.notes.append(f"original {image_id}: key version {version} is not "
                                     "in this key ring, it was not read")
            return
        ad = aead.associated_data(self.repo_id, "objects", image_id, version)
        try:
            for _ in aead.decrypt_stream(keys.data_key, self.store.iter_chunks(key), ad):
                pass
        except ObjectNotFound:
            self.report.add(MISSING_OBJECT, "original", image_id, "listed but gone when "
                            "read")
            return
        except (DecryptionError, FormatError, ValueError) as exc:
            self.report.add(NOT_AUTHENTICATED, "original", image_id, f"does not open under "
                            f"key version {version} as this image's original "
                            f"({exc or 'authentication failed'})")
            return
        self._count("originals read")

    def _stored_originals(self) -> dict[str, tuple[str, int]]:
        """image id -> (key, size) of every original in the bucket (listed once)."""
        if self._stored is None:
            self._stored = self._listing(layout.objects_prefix(self.repo_id),
                                         layout.parse_object_key)
        return self._stored

    def _originals(self, live_images: set[str], list_strays: bool = True,
                   state: seglog.LogState | None = None) -> dict[str, tuple[str, int]]:
        stored = self._stored_originals()
        frames = self._frames_of_stored(live_images - set(stored), live_images, stored, state)
        for image_id in sorted(live_images - set(stored) - frames):
            self.report.add(MISSING_OBJECT, "image", image_id, "its original "
                            "(objects/<image id>) is not in the bucket")
        for image_id in sorted(set(stored) - live_images if list_strays else ()):
            key, size = stored[image_id]
            self.report.strays.append(Stray("original", image_id, key, size, "unreferenced",
                                            age_s=self._age(key),
                                            detail="an original of no live image"))
        return stored

    def _frames_of_stored(self, missing: set[str], live_images: set[str],
                          stored: dict[str, tuple[str, int]],
                          state: seglog.LogState | None) -> set[str]:
        """The images of ``missing`` that are frames of a multi-frame instance: they have
        no object of their own, their metadata names the live image whose object is the
        instance's file (``original``: app/core/importer.py). Read only for images that
        lack an object, so a repository without multi-frame files costs nothing more."""
        if state is None or not missing:
            return set()
        from app.core.packs import ImageReader

        reader = ImageReader(self.store, self.repo, state)
        frames = set()
        for image_id in missing:
            try:
                record, _ = reader.meta(image_id)
            except RadcryptError:
                continue  # reported as missing; its pack's own problems are reported above
            original = record.get("original")
            if (isinstance(original, str) and original != image_id
                    and original in stored and original in live_images):
                frames.add(image_id)
        return frames

    # strays

    def _age(self, key: str) -> float | None:
        if key in self.times:
            return max(0.0, self.now - self.times[key])
        if self.modified is None:
            return None
        try:
            when = self.modified(key)
        except (ObjectNotFound, OSError):
            return None
        return None if when is None else max(0.0, self.now - when)

    def _strays(self, state: seglog.LogState, unverified: dict[tuple[int, str], int],
                segments: dict[str, tuple[str, int]], pack_sizes: dict[str, tuple[str, int]],
                label_sizes: dict[str, tuple[str, int]] | None = None) -> None:
        removed_by: dict[tuple[int, str], int] = {
            key: removed_at for key, (_, removed_at) in state.history.items()}
        for entry in self.entries.values():  # format-1 segments a migration replaced
            for gone in entry.removed:
                if gone.type == seglog.TYPE_V1_SEGMENT:
                    removed_by.setdefault((seglog.TYPE_V1_SEGMENT, gone.id), entry.sequence)
        found = [(seglog.TYPE_SEGMENT, object_id, key, size)
                 for object_id, (key, size) in segments.items()
                 if (seglog.TYPE_SEGMENT, object_id) not in state.live]
        found += [(seglog.TYPE_PACK, object_id, key, size)
                  for object_id, (key, size) in pack_sizes.items()
                  if (seglog.TYPE_PACK, object_id) not in state.live]
        found += [(TYPE_LABEL, object_id, key, size)
                  for object_id, (key, size) in (label_sizes or {}).items()
                  if (TYPE_LABEL, object_id) not in state.live]
        for done, (type_, object_id, key, size) in enumerate(sorted(found), 1):
            self.progress(ProgressEvent("strays", done, len(found), item=object_id))
            stray = self._stray(type_, object_id, key, size, removed_by, unverified)
            self.report.strays.append(stray)
            if stray.authentic is False:
                self.report.add(FORGED_STRAY, TYPE_WORDS[type_], object_id,
                                f"{stray.state} and not authentic ({stray.detail}): "
                                "not written by a member of the repository (forged) or "
                                "damaged", unverified.get((type_, object_id)))
        self.report.counts["strays"] = len(found)

    def _stray(self, type_: int, object_id: str, key: str, size: int,
               removed_by: dict[tuple[int, str], int],
               unverified: dict[tuple[int, str], int]) -> Stray:
        word = TYPE_WORDS[type_]
        age = self._age(key)
        removed = (type_, object_id)
        if removed not in removed_by and type_ == seglog.TYPE_SEGMENT:
            removed = (seglog.TYPE_V1_SEGMENT, object_id)
        if removed in removed_by:
            sequence = removed_by[removed]
            entry = self.entries.get(sequence)
            removed_age = None if entry is None else max(0.0, self.now - entry.time_ms / 1000)
            word = TYPE_WORDS[removed[0]]
            return Stray(word, object_id, key, size, "removed", removed_at=sequence,
                         removed_age_s=removed_age, age_s=age)
        state = "unverified" if (type_, object_id) in unverified else "unreferenced"
        detail = (f"named by log entry {unverified[(type_, object_id)]}, after the break"
                  if state == "unverified" else "")
        base: int | None = None
        written_after: float | None = None
        if type_ in (seglog.TYPE_SEGMENT, TYPE_LABEL):
            if type_ == TYPE_LABEL and self.labels is not None:
                authentic, why, base = self.labels.stray_authentic(key, object_id)
            else:
                authentic, why, base = self._segment_authentic(key, object_id)
            entry = None if base is None else self.entries.get(base)
            if entry is not None:
                written_after = max(0.0, self.now - entry.time_ms / 1000)
        else:
            authentic, why = self._pack_authentic(key, object_id, size)
        detail = "; ".join(d for d in (detail, why) if d)
        return Stray(word, object_id, key, size, state, authentic=authentic, age_s=age,
                     base_sequence=base, written_after_s=written_after, detail=detail)

    def _segment_authentic(self, key: str, seg_id: str
                           ) -> tuple[bool | None, str, int | None]:
        """(authentic, why, base sequence of its header) of a stray segment."""
        try:
            blob = self.store.get(key)
            segment = decode_segment(blob, key)
        except ObjectNotFound:
            return None, "gone when read", None
        except SegmentError as exc:
            return False, f"does not parse: {exc.reason}", None
        written_after = segment.base_sequence
        if segment.format_version != 2:
            return None, "a format-1 segment", written_after
        mac_key = self.mac_keys.get(segment.key_version)
        if mac_key is None:
            return None, f"key version {segment.key_version} is not in this key ring", \
                written_after
        try:
            verify_segment_mac(blob, key, self.repo_id, mac_key)
        except SegmentAuthError as exc:
            return False, exc.detail, written_after
        return True, f"written by {segment.writer}", written_after

    def _pack_authentic(self, key: str, pack_id: str, size: int) -> tuple[bool | None, str]:
        try:
            self._toc(key, size, pack_id)
        except ObjectNotFound:
            return None, "gone when read"
        except KeyError:
            return None, "its key version is not in this key ring"
        except DecryptionError:
            return False, "its table of contents does not open under the repository's keys"
        except (FormatError, ValueError) as exc:
            return False, str(exc)
        return True, ""

    # --- format 1 ------------------------------------------------------------------------------

    def format1(self) -> None:
        """Segments parse and verify, one width per key version, no image twice in a key
        version, and every indexed image has its meta, thumbs and original."""
        report = self.report
        self._check_grants()
        listing = sorted(self.store.list_objects(layout.segments_prefix(self.repo_id)))
        images: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        widths: dict[int, dict[tuple[int, ...], list[str]]] = defaultdict(
            lambda: defaultdict(list))
        for done, (key, _size) in enumerate(listing, 1):
            self.progress(ProgressEvent("segments", done, len(listing), item=key))
            try:
                seg_id = layout.parse_segment_key(key)[1]
            except ValueError:
                continue
            try:
                segment = decode_segment(self.store.get(key), key)
            except ObjectNotFound:
                report.add(MISSING, "segment", seg_id, "listed but gone when read")
                continue
            except SegmentError as exc:
                report.add(DAMAGED, "segment", seg_id, f"does not parse or verify: "
                           f"{exc.reason}")
                continue
            if segment.key_version not in self.mac_keys:
                report.notes.append(f"segment {seg_id}: key version {segment.key_version} is "
                                    "not in this key ring")
            for image_id in segment.id_strings():
                images[segment.key_version][image_id].append(seg_id)
            widths[segment.key_version][segment.vectors.widths].append(seg_id)
        for version, by_widths in widths.items():
            common = max(by_widths, key=lambda w: len(by_widths[w]))
            for other, ids in by_widths.items():
                for seg_id in ids if other != common else ():
                    report.add(WIDTHS, "segment", seg_id, f"vector widths {list(other)} "
                               f"differ from {list(common)}, those of the other segments of "
                               f"key version {version} (the service will not search it)")
        for version, by_id in sorted(images.items()):
            for image_id, holders in sorted(by_id.items()):
                if len(holders) > 1:
                    report.add(DUPLICATE, "image", image_id, f"in {len(holders)} segments of "
                               f"key version {version}: {', '.join(sorted(holders))}")
        indexed = {i for by_id in images.values() for i in by_id}
        for kind, word in (("meta", "metadata"), ("thumbs", "preview")):
            present = objects.existing_image_ids(self.store, self.repo_id, kind)
            for image_id in sorted(indexed - present):
                report.add(MISSING_OBJECT, "image", image_id, f"its {word} object "
                           f"({kind}/<image id>) is not in the bucket")
        self._originals(indexed)
        report.counts["segments"] = len(listing)
        report.counts["images"] = len(indexed)

