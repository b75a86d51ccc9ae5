"""The segment log of a format-2 repository (docs/FORMAT-2.md 5 and 6).

Why it exists: in format 1 nothing lists a repository's segments authentically, so the
cloud can delete or withhold one and every search silently covers less. Here every commit
(import, rewrite) is one signed, hash-chained entry ``log/<SEQ20(n)>`` created if absent;
replaying the entries gives the **live set** (segments and packs holding the images now),
and a search answer's segment-set digest is compared with it (``judge_answer``).

What verification (``verify_log``) refuses, and how:

* a deleted entry in the middle -> LogError "gap" (a later entry is listed);
* an entry copied, moved or swapped under another name -> SignatureError (the name is signed);
* entries re-signed out of order -> LogError "prev mismatch"; a replayed or duplicated
  addition -> LogError "re-added";
* an entry by a non-member or a revoked member -> LogError "not a member" (or
  SignatureError when the key is nobody's);
* a head below the remembered one -> LogError "rollback"; the remembered entry with another
  hash -> LogError "fork"; a newer checkpoint hidden -> LogError "checkpoint rollback".

Kind rules as built (FORMAT-2 5.2's table, made precise): reasons per kind are add: import,
revocation, repair; replace: compaction, erasure, revocation, migration, repair; remove:
erasure, revocation, repair (revocation, migration and erasure: an owner only; genesis and
membership: the owner, any reason). An import adds exactly one segment and one pack of the
same image count. Compaction keeps the image count per type, erasure never grows it, and a
replace that adds objects removes only objects of its own key version. ``key_version`` is
at most the manifest's (one more for the owner's revocation entries); ``manifest_sequence``
never decreases and never exceeds the verified manifest's.

Checkpoints (owner-signed JSON, ``checkpoints/<SEQ20(c)>``) let a reader start at ``c``
instead of genesis; entries at or below a checkpoint are pinned by its head hash through
the chain, so a reader extending an older state accepts them even when their writer has
since been removed. The binary entry layout lives in cloud/seglog_format.py.

Co-owners (docs/FORMAT-2.md 2.4): wherever "the owner" writes or signs above, a co-owner
listed in the manifest may too (``is_owner`` and ``owner_keys`` ask the trust); a trust
that knows no co-owners (StaticTrust, the vectors) behaves exactly as before.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cloud import layout
from cloud.backend import ObjectExists, ObjectNotFound, Store, stored_after_conflict
from cloud.seglog_format import (
    KIND_ADD,
    KIND_GENESIS,
    KIND_MEMBERSHIP,
    KIND_REMOVE,
    KIND_REPLACE,
    KIND_WORDS,
    REASON_COMPACTION,
    REASON_ERASURE,
    REASON_IMPORT,
    REASON_LABEL,
    REASON_MIGRATION,
    REASON_REPAIR,
    REASON_REVOCATION,
    REASON_WORDS,
    TYPE_LABEL,
    TYPE_PACK,
    TYPE_SEGMENT,
    TYPE_V1_SEGMENT,
    TYPE_WORDS,
    ZERO_HASH,
    Added,
    LogEntry,
    Removed,
    decode_payload,
    encode_payload,
)
from crypto import signed
from crypto.errors import FormatError
from crypto.identity import Identity, SignatureError

__all__ = [
    "KIND_ADD", "KIND_GENESIS", "KIND_MEMBERSHIP", "KIND_REMOVE", "KIND_REPLACE",
    "REASON_COMPACTION", "REASON_ERASURE", "REASON_IMPORT", "REASON_LABEL", "REASON_MIGRATION",
    "REASON_REPAIR", "REASON_REVOCATION", "TYPE_LABEL", "TYPE_PACK", "TYPE_SEGMENT",
    "TYPE_V1_SEGMENT",
    "Added", "AnswerError", "AppendAbandoned", "Checkpoint", "LiveObject", "LogAhead",
    "LogEntry", "LogError", "LogHead", "LogState", "LogTrust", "Removed", "StaticTrust", "Verdict",
    "append", "check_hits", "checkpoint_payload", "decode_payload", "encode_payload",
    "is_owner", "judge_answer", "open_checkpoint", "open_entry", "open_signed", "owner_keys",
    "set_digest",
    "verify_log", "write_checkpoint", "write_genesis",
]

RECORD_KIND = "log"
CHECKPOINT_KIND = "checkpoint"
CHECKPOINT_FORMAT = "radcrypt-checkpoint-v1"
MAX_APPEND_ATTEMPTS = 256
_SET_DOMAIN = b"radcrypt/segment-set/v2"
_TYPE_BY_WORD = {"segment": TYPE_SEGMENT, "pack": TYPE_PACK, "label": TYPE_LABEL}
_WORD_BY_TYPE = {TYPE_SEGMENT: "segment", TYPE_PACK: "pack", TYPE_LABEL: "label"}


# --- errors --------------------------------------------------------------------------------


class LogError(ValueError):
    """The log breaks a chain or kind rule, or contradicts what this client saw before.

    ``reason`` is a short stable word ("gap", "prev mismatch", "re-added", "rollback",
    "fork", ...) for callers and tests; the message names the entry's sequence.
    """

    def __init__(self, message: str, reason: str = "invalid", sequence: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.sequence = sequence


class LogAhead(LogError):
    """An answer names a head beyond the one verified: re-verify the log, then judge again."""


class AppendAbandoned(LogError):
    """A replace/remove lost its race to an entry that took its objects out of the live set:
    the rewrite must start again (its new objects are unreferenced garbage, FORMAT-2 7.4)."""


class AnswerError(ValueError):
    """The service searched what the log does not hold, or its answer contradicts itself."""


def _log_error(sequence: int, reason: str, detail: str) -> LogError:
    return LogError(f"log entry {sequence}: {detail} ({reason})", reason, sequence)


# --- state ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveObject:
    """A live segment or pack: ``added_at`` is the sequence of the entry that added it (the
    checkpoint's sequence for objects taken from a checkpoint)."""

    type: int
    id: str
    sha256: bytes
    count: int
    key_version: int
    added_at: int


@dataclass(frozen=True)
class LogHead:
    """What rollback memory keeps: head sequence, SHA-256 of that entry object, and the
    highest valid checkpoint sequence seen (None: none)."""

    sequence: int
    hash: bytes
    checkpoint: int | None


class LogTrust(Protocol):
    """Who may write the log, as the verifier's verified manifest says."""

    # Read-only properties, so that a frozen dataclass or plain attributes both satisfy it.
    @property
    def owner_id(self) -> str: ...

    @property
    def owner_key(self) -> bytes: ...

    @property
    def manifest_sequence(self) -> int:
        """Sequence of the manifest the verifier verified (entries may not name a higher one)."""
        ...

    @property
    def key_version(self) -> int:
        """The manifest's current key version."""
        ...

    def signer_key(self, user_id: str) -> bytes | None:
        """Ed25519 public key of the owner or a CURRENT member; None otherwise."""
        ...


@dataclass(frozen=True)
class StaticTrust:
    """A LogTrust from values already verified elsewhere (tests, vectors, simple callers):
    ``members`` maps each current member's user id to its Ed25519 public key."""

    owner_id: str
    owner_key: bytes
    manifest_sequence: int
    key_version: int
    members: Mapping[str, bytes] = field(default_factory=dict)

    def signer_key(self, user_id: str) -> bytes | None:
        if user_id == self.owner_id:
            return self.owner_key
        return self.members.get(user_id)


@dataclass
class LogState:
    """A verified log up to ``head``: the live set and what is needed to extend it."""

    repo_id: str
    head: LogHead
    live: dict[tuple[int, str], LiveObject]
    hashes: dict[int, bytes]                 # entry sequence -> SHA-256 of the entry object
    # internals (defaults so that callers never need to build them)
    manifest_sequence: int = 0               # of the head entry: later entries must not go below
    start: int = 0                           # first sequence replayed (checkpoint or 0)
    seen: set[tuple[int, str]] = field(default_factory=set)      # every (type, id) ever added
    v1_removed: set[str] = field(default_factory=set)             # format-1 segments migrated
    history: dict[tuple[int, str], tuple[LiveObject, int]] = field(default_factory=dict)
    writer_keys: dict[bytes, str] = field(default_factory=dict)   # signer key -> user id seen

    def _objects(self, type_: int, key_version: int | None) -> list[LiveObject]:
        return sorted((o for o in self.live.values() if o.type == type_
                       and (key_version is None or o.key_version == key_version)),
                      key=lambda o: o.id)

    def segments(self, key_version: int | None = None) -> list[LiveObject]:
        """Live segments (of one key version, or all), sorted by id."""
        return self._objects(TYPE_SEGMENT, key_version)

    def packs(self, key_version: int | None = None) -> list[LiveObject]:
        """Live packs (of one key version, or all), sorted by id."""
        return self._objects(TYPE_PACK, key_version)

    def labels(self, key_version: int | None = None) -> list[LiveObject]:
        """Live label objects (issue 17; of one key version, or all), sorted by id."""
        return self._objects(TYPE_LABEL, key_version)

    def set_digest(self, key_version: int) -> bytes:
        """Segment-set digest (FORMAT-2 6.1) of the live segments of ``key_version`` at head."""
        return set_digest(self.repo_id, key_version, (o.id for o in self.segments(key_version)))

    def images(self, key_version: int | None = None) -> int:
        """Images in the live segments (of one key version, or all)."""
        return sum(o.count for o in self.segments(key_version))

    def objects_at(self, sequence: int) -> list[LiveObject]:
        """The live set after entry ``sequence`` (start <= sequence <= head), sorted by
        (type, id). Below ``start`` (entries not read) the set live at ``start`` minus what
        was added later is the best knowledge, and is what is returned."""
        sequence = max(sequence, self.start)
        out = [o for o in self.live.values() if o.added_at <= sequence]
        out += [o for o, removed_at in self.history.values()
                if o.added_at <= sequence < removed_at]
        return sorted(out, key=lambda o: (o.type, o.id))

    def live_at(self, sequence: int, key_version: int) -> set[str]:
        """Ids of the segments of ``key_version`` live after entry ``sequence``."""
        return {o.id for o in self.objects_at(sequence)
                if o.type == TYPE_SEGMENT and o.key_version == key_version}

    def copy(self) -> LogState:
        """An independent copy (verification and append never change their input)."""
        return LogState(self.repo_id, self.head, dict(self.live), dict(self.hashes),
                        self.manifest_sequence, self.start, set(self.seen),
                        set(self.v1_removed), dict(self.history), dict(self.writer_keys))


def set_digest(repo_id: str, key_version: int, seg_ids: Iterable[str]) -> bytes:
    """SHA-256(LP(domain) || LP(repo_id) || u32(v) || u64(S) || ID16 ... sorted bytewise).

    Duplicates are an error (a set has none; an answer listing a segment twice is caught
    by judge_answer before this)."""
    raw = sorted(bytes.fromhex(layout.validate_segment_id(s)) for s in seg_ids)
    if len(set(raw)) != len(raw):
        raise ValueError("set_digest: a segment id appears twice")
    repo = layout.validate_repo_id(repo_id).encode()
    digest = hashlib.sha256()
    for part in (_SET_DOMAIN, repo):
        digest.update(struct.pack(">I", len(part)) + part)
    digest.update(struct.pack(">IQ", layout.validate_key_version(key_version), len(raw)))
    for item in raw:
        digest.update(item)
    return digest.digest()


# --- reading one entry -----------------------------------------------------------------------


def _entry_name(repo_id: str, sequence: int) -> str:
    return layout.log_entry_key(repo_id, sequence)


def _owner_key_of(trust: LogTrust, user_id: str) -> bytes | None:
    if user_id == trust.owner_id:
        return trust.owner_key
    return trust.signer_key(user_id)


def is_owner(trust: LogTrust, user_id: str) -> bool:
    """The owner, or a co-owner (docs/FORMAT-2.md 2.4) when the trust knows co-owners
    (an optional ``is_owner(user_id)`` method; StaticTrust and older trusts have none)."""
    if user_id == trust.owner_id:
        return True
    check = getattr(trust, "is_owner", None)
    return bool(check(user_id)) if callable(check) else False


def owner_keys(trust: LogTrust) -> list[bytes]:
    """The keys that may sign checkpoints: the owner's and, when the trust lists them
    (an optional ``owner_keys`` attribute), the co-owners'."""
    keys = getattr(trust, "owner_keys", None)
    return [bytes(k) for k in keys] if keys else [trust.owner_key]


def _record_message(kind: str, name: str, payload: bytes) -> bytes:
    """F12's signed message: LP("radcrypt/signed/v1") || LP(kind) || LP(name) || LP(payload)."""
    parts = (b"radcrypt/signed/v1", kind.encode(), name.encode(), payload)
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def open_signed(blob: bytes, kind: str, name: str) -> tuple[bytes, bytes]:
    """(signer key, payload) of a signed record (F12) whose signature verifies under the key
    it names; whether that key is trusted is the caller's question.

    Same checks as crypto.signed.open_record, verified with OpenSSL's Ed25519 (the
    `cryptography` package, as cloud/auth.py): about 0.1 ms instead of 4 ms per entry, which
    is what makes verifying thousands of entries affordable. The vectors check both agree.
    """
    claimed = signed.signer_of(blob)
    signature, payload = blob[37:101], blob[101:]
    try:
        Ed25519PublicKey.from_public_bytes(claimed).verify(
            signature, _record_message(kind, name, payload))
    except (InvalidSignature, ValueError):
        raise SignatureError(f"{kind} {name}: signature does not verify") from None
    return claimed, payload


def open_entry(blob: bytes, repo_id: str, sequence: int, trust: LogTrust,
               known_keys: dict[bytes, str] | None = None, *, pinned: bool = False
               ) -> LogEntry:
    """Check one entry object's record (F12), payload and writer; not the chain rules.

    FormatError: not a record, or a malformed payload (including a sequence that is not the
    name's). SignatureError: the signature fails (e.g. the object was copied to another
    name) or the key belongs to nobody known. LogError "not a member": the writer is neither
    the owner nor a current member; "writer differs from signer": a known user signed an
    entry naming another writer.

    ``pinned``: the entry lies at or below an owner-signed checkpoint, whose head hash pins
    it through the chain; a writer who is no longer a member is then accepted (the
    signature is still checked, against the key in the record).
    """
    name = _entry_name(repo_id, sequence)
    claimed, payload = open_signed(blob, RECORD_KIND, name)
    entry = decode_payload(payload, name, sequence)
    expected = _owner_key_of(trust, entry.writer)
    if expected is None:
        if pinned and entry.writer != trust.owner_id:
            return entry
        raise _log_error(sequence, "not a member", f"writer {entry.writer} is neither the "
                         "owner nor a current member of the repository")
    if not hmac.compare_digest(expected, claimed):
        known = dict(known_keys or {})
        known[trust.owner_key] = trust.owner_id
        if claimed in known:
            raise _log_error(sequence, "writer differs from signer",
                             f"names writer {entry.writer} but is signed by {known[claimed]}")
        raise SignatureError(f"log entry {name} is signed by a key that is not "
                             f"{entry.writer}'s")
    return entry


# --- the kind rules ---------------------------------------------------------------------------


_REASONS = {
    KIND_ADD: {REASON_IMPORT, REASON_REVOCATION, REASON_REPAIR, REASON_LABEL},
    KIND_REPLACE: {REASON_COMPACTION, REASON_ERASURE, REASON_REVOCATION, REASON_MIGRATION,
                   REASON_REPAIR},
    KIND_REMOVE: {REASON_ERASURE, REASON_REVOCATION, REASON_REPAIR},
}
# Erasure removes images for good (issue 16): only an owner or co-owner may, as the client
# already enforces; a member (or anyone holding a member's key) writing an erasure entry
# would otherwise make images disappear from every search.
_OWNER_REASONS = {REASON_REVOCATION, REASON_MIGRATION, REASON_ERASURE}


def _check_header(state: LogState, entry: LogEntry, trust: LogTrust) -> None:
    n = entry.sequence
    by_owner = is_owner(trust, entry.writer)
    if n == 0:
        if entry.kind != KIND_GENESIS:
            raise _log_error(0, "no genesis", f"is a {KIND_WORDS[entry.kind]} entry, not the "
                             "genesis")
        if entry.prev != ZERO_HASH:
            raise _log_error(0, "prev mismatch", "genesis prev is not 32 zero bytes")
    else:
        if entry.kind == KIND_GENESIS:
            raise _log_error(n, "genesis", "a genesis entry after entry 0")
        if not hmac.compare_digest(entry.prev, state.head.hash):
            raise _log_error(n, "prev mismatch", f"prev is not the SHA-256 of entry {n - 1}")
    if entry.kind in (KIND_GENESIS, KIND_MEMBERSHIP) and not by_owner:
        raise _log_error(n, "not owner", f"a {KIND_WORDS[entry.kind]} entry must be written "
                         f"by the owner, not {entry.writer}")
    if entry.reason in _OWNER_REASONS and entry.kind != KIND_GENESIS and not by_owner:
        raise _log_error(n, "not owner", f"reason {REASON_WORDS[entry.reason]} is the "
                         f"owner's, not {entry.writer}'s")
    if entry.manifest_sequence < state.manifest_sequence:
        raise _log_error(n, "manifest sequence decreasing",
                         f"manifest_sequence {entry.manifest_sequence} is below the previous "
                         f"entry's {state.manifest_sequence}")
    if entry.manifest_sequence > trust.manifest_sequence:
        raise _log_error(n, "manifest sequence ahead",
                         f"manifest_sequence {entry.manifest_sequence} is above the verified "
                         f"manifest's {trust.manifest_sequence}")
    rotating = entry.reason == REASON_REVOCATION and by_owner
    ceiling = trust.key_version + (1 if rotating else 0)
    if not 1 <= entry.key_version <= ceiling:
        raise _log_error(n, "key version", f"key_version {entry.key_version} is not 1.."
                         f"{ceiling}")


def _check_objects(state: LogState, entry: LogEntry) -> None:
    n, kind = entry.sequence, entry.kind
    if kind in (KIND_GENESIS, KIND_MEMBERSHIP):
        if entry.added or entry.removed:
            raise _log_error(n, "kind rule", f"a {KIND_WORDS[kind]} entry names objects")
        return
    if entry.reason not in _REASONS[kind]:
        raise _log_error(n, "kind rule", f"reason {REASON_WORDS[entry.reason]} is not allowed "
                         f"for a {KIND_WORDS[kind]} entry")
    if kind == KIND_ADD and (not entry.added or entry.removed):
        raise _log_error(n, "kind rule", "an add entry must add at least one object and "
                         "remove none")
    if kind in (KIND_REPLACE, KIND_REMOVE) and not entry.removed:
        raise _log_error(n, "kind rule", f"a {KIND_WORDS[kind]} entry removes nothing")
    if kind == KIND_REMOVE and entry.added:
        raise _log_error(n, "kind rule", "a remove entry adds objects")
    for item in entry.added:
        if (item.type, item.id) in state.seen or (item.type, item.id) in state.live:
            raise _log_error(n, "re-added", f"{TYPE_WORDS[item.type]} {item.id} was already "
                             "added by an earlier entry")
    removed_live: list[LiveObject] = []
    for gone in entry.removed:
        if gone.type == TYPE_V1_SEGMENT:
            if kind != KIND_REPLACE or entry.reason != REASON_MIGRATION:
                raise _log_error(n, "kind rule", f"format-1 segment {gone.id} removed outside "
                                 "a migration")
            if gone.id in state.v1_removed:
                raise _log_error(n, "not live", f"format-1 segment {gone.id} was already "
                                 "migrated")
            continue
        obj = state.live.get((gone.type, gone.id))
        if obj is None:
            raise _log_error(n, "not live", f"removes {TYPE_WORDS[gone.type]} {gone.id}, "
                             "which is not live")
        removed_live.append(obj)
    if kind == KIND_REPLACE and entry.reason in (REASON_COMPACTION, REASON_ERASURE):
        _check_counts(entry, removed_live)
    if kind == KIND_ADD and entry.reason == REASON_IMPORT:
        _check_import(entry)
    if entry.reason == REASON_LABEL and not all(a.type == TYPE_LABEL for a in entry.added):
        raise _log_error(n, "kind rule", "a label entry adds label objects only")
    if entry.reason == REASON_IMPORT and any(a.type == TYPE_LABEL for a in entry.added):
        raise _log_error(n, "kind rule", "an import adds no label object")


def _check_import(entry: LogEntry) -> None:
    """An import commits one batch: one segment and one pack holding the same images."""
    types = sorted(a.type for a in entry.added)
    if types != [TYPE_SEGMENT, TYPE_PACK] or entry.added[0].count != entry.added[1].count:
        raise _log_error(entry.sequence, "kind rule", "an import must add exactly one segment "
                         "and one pack with the same image count")


def _check_counts(entry: LogEntry, removed: list[LiveObject]) -> None:
    """Compaction keeps every image (counts equal per type); erasure only drops images
    (added counts at most the removed ones). A rewrite stays within the entry's key version
    (its added objects get that version), so what it removes must be of that version too."""
    for type_ in (TYPE_SEGMENT, TYPE_PACK):
        before = sum(o.count for o in removed if o.type == type_)
        after = sum(a.count for a in entry.added if a.type == type_)
        word = TYPE_WORDS[type_]
        if entry.reason == REASON_COMPACTION and before != after:
            raise _log_error(entry.sequence, "counts", f"compaction adds {after} images in "
                             f"{word}s but removes {before}")
        if entry.reason == REASON_ERASURE and after > before:
            raise _log_error(entry.sequence, "counts", f"erasure adds {after} images in "
                             f"{word}s, more than the {before} it removes")
    if entry.reason == REASON_COMPACTION or entry.added:
        for obj in removed:
            if obj.key_version != entry.key_version:
                raise _log_error(entry.sequence, "key version", f"a rewrite into key version "
                                 f"{entry.key_version} removes {TYPE_WORDS[obj.type]} {obj.id} "
                                 f"of key version {obj.key_version}")


def _apply(state: LogState, entry: LogEntry, entry_hash: bytes, trust: LogTrust,
           signer: bytes | None = None) -> None:
    """Check ``entry`` against ``state`` (chain, manifest, kind rules) and apply it."""
    _check_header(state, entry, trust)
    _check_objects(state, entry)
    n = entry.sequence
    for gone in entry.removed:
        if gone.type == TYPE_V1_SEGMENT:
            state.v1_removed.add(gone.id)
        else:
            obj = state.live.pop((gone.type, gone.id))
            state.history[(gone.type, gone.id)] = (obj, n)
    for item in entry.added:
        state.live[(item.type, item.id)] = LiveObject(item.type, item.id, item.sha256,
                                                      item.count, entry.key_version, n)
        state.seen.add((item.type, item.id))
    state.manifest_sequence = entry.manifest_sequence
    state.hashes[n] = entry_hash
    state.head = LogHead(n, entry_hash, state.head.checkpoint)
    if signer is not None:
        state.writer_keys[signer] = entry.writer


# --- checkpoints -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: the live set after entry ``sequence`` as the owner saw it."""

    sequence: int
    head: bytes
    manifest_sequence: int
    live: tuple[LiveObject, ...]          # added_at = sequence
    set_digests: dict[int, bytes]
    images: int


def _digests_of(repo_id: str, live: Iterable[LiveObject]) -> dict[int, bytes]:
    versions: dict[int, list[str]] = {}
    for obj in live:
        ids = versions.setdefault(obj.key_version, [])
        if obj.type == TYPE_SEGMENT:
            ids.append(obj.id)
    return {v: set_digest(repo_id, v, ids) for v, ids in sorted(versions.items())}


def checkpoint_payload(state: LogState, manifest_sequence: int) -> dict[str, object]:
    """The JSON payload of a checkpoint at ``state.head`` (FORMAT-2 5.4). ``live`` is sorted by
    (type code, id): segments (1) before packs (2)."""
    objects = sorted(state.live.values(), key=lambda o: (o.type, o.id))
    return {
        "format": CHECKPOINT_FORMAT,
        "repo_id": state.repo_id,
        "sequence": state.head.sequence,
        "head": state.head.hash.hex(),
        "manifest_sequence": manifest_sequence,
        "live": [{"type": _WORD_BY_TYPE[o.type], "id": o.id, "sha256": o.sha256.hex(),
                  "count": o.count, "key_version": o.key_version} for o in objects],
        "set_digests": {str(v): d.hex() for v, d in _digests_of(state.repo_id,
                                                                objects).items()},
        "images": sum(o.count for o in objects if o.type == TYPE_SEGMENT),
    }


def _cp_fail(name: str, field_name: str, problem: str) -> FormatError:
    return FormatError(f"checkpoint {name}: {field_name} {problem}")


def _cp_int(name: str, payload: dict[str, object], key: str, low: int, high: int) -> int:
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _cp_fail(name, key, f"must be an integer {low}..{high}")
    return value


def _cp_hex(name: str, value: object, key: str, size: int) -> bytes:
    if (not isinstance(value, str) or len(value) != 2 * size
            or any(c not in "0123456789abcdef" for c in value)):
        raise _cp_fail(name, key, f"must be {2 * size} lowercase hexadecimal characters")
    return bytes.fromhex(value)


_CP_FIELDS = {"format", "repo_id", "sequence", "head", "manifest_sequence", "live",
              "set_digests", "images"}
_LIVE_FIELDS = {"type", "id", "sha256", "count", "key_version"}


def open_checkpoint(blob: bytes, repo_id: str, sequence: int,
                    owner_key: bytes | Sequence[bytes]) -> Checkpoint:
    """Verify a checkpoint object read from ``checkpoints/<SEQ20(sequence)>``.

    SignatureError: not signed by ``owner_key`` (or one of a list of owner keys: the
    owner's and the co-owners') for this name. FormatError: a field is
    missing, extra or malformed, the sequence or repository is not the name's, ``live`` is
    not strictly sorted by (type code, id), or ``set_digests``/``images`` do not match it.
    """
    name = layout.checkpoint_key(repo_id, sequence)
    trusted = [owner_key] if isinstance(owner_key, bytes) else list(owner_key)
    payload = signed.open_json(blob, CHECKPOINT_KIND, name, trusted)
    if set(payload) != _CP_FIELDS:
        raise _cp_fail(name, "fields", f"must be exactly {sorted(_CP_FIELDS)}")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise _cp_fail(name, "format", f"is not {CHECKPOINT_FORMAT!r}")
    if payload["repo_id"] != repo_id:
        raise _cp_fail(name, "repo_id", "differs from the name's repository")
    seq = _cp_int(name, payload, "sequence", 0, layout.MAX_SEQUENCE)
    if seq != sequence:
        raise _cp_fail(name, "sequence", f"{seq} differs from the name's {sequence}")
    head = _cp_hex(name, payload["head"], "head", 32)
    manifest_sequence = _cp_int(name, payload, "manifest_sequence", 0, layout.MAX_SEQUENCE)
    images = _cp_int(name, payload, "images", 0, layout.MAX_SEQUENCE)
    raw_live = payload["live"]
    if not isinstance(raw_live, list):
        raise _cp_fail(name, "live", "must be an array")
    live: list[LiveObject] = []
    for i, item in enumerate(raw_live):
        where = f"live[{i}]"
        if not isinstance(item, dict) or set(item) != _LIVE_FIELDS:
            raise _cp_fail(name, where, f"must be an object with exactly {sorted(_LIVE_FIELDS)}")
        type_ = _TYPE_BY_WORD.get(item["type"]) if isinstance(item["type"], str) else None
        if type_ is None:
            raise _cp_fail(name, where + ".type", "must be 'segment' or 'pack'")
        obj_id = _cp_hex(name, item["id"], where + ".id", 16).hex()
        digest = _cp_hex(name, item["sha256"], where + ".sha256", 32)
        count = _cp_int(name, item, "count", 0, 2**32 - 1)
        version = _cp_int(name, item, "key_version", 1, 2**32 - 1)
        live.append(LiveObject(type_, obj_id, digest, count, version, seq))
    order = [(o.type, o.id) for o in live]
    if any(not a < b for a, b in itertools.pairwise(order)):
        raise _cp_fail(name, "live", "is not strictly sorted by (type, id)")
    raw_digests = payload["set_digests"]
    if not isinstance(raw_digests, dict):
        raise _cp_fail(name, "set_digests", "must be an object")
    expected = {str(v): d.hex() for v, d in _digests_of(repo_id, live).items()}
    if raw_digests != expected:
        raise _cp_fail(name, "set_digests", "do not match the live segments")
    if images != sum(o.count for o in live if o.type == TYPE_SEGMENT):
        raise _cp_fail(name, "images", "is not the image count of the live segments")
    digests = {int(v): bytes.fromhex(d) for v, d in expected.items()}
    return Checkpoint(seq, head, manifest_sequence, tuple(live), digests, images)


def write_checkpoint(store: Store, repo_id: str, owner: Identity, state: LogState,
                     manifest_sequence: int) -> None:
    """Write the owner's checkpoint at ``state.head`` (create-if-absent). An existing
    checkpoint at that sequence is accepted when it verifies and names the same head entry;
    otherwise LogError "checkpoint exists". On success ``state.head.checkpoint`` becomes the
    head's sequence, as a later verify_log would report it."""
    if state.repo_id != repo_id:
        raise ValueError(f"write_checkpoint: state is of repository {state.repo_id}, "
                         f"not {repo_id}")
    seq = state.head.sequence
    name = layout.checkpoint_key(repo_id, seq)
    blob = signed.sign_json(owner, CHECKPOINT_KIND, name,
                            checkpoint_payload(state, manifest_sequence))
    try:
        store.put(name, blob, if_absent=True)
    except ObjectExists:
        try:
            other = open_checkpoint(store.get(name), repo_id, seq, owner.sign_public)
        except (FormatError, ObjectNotFound):
            other = None
        if other is None or other.head != state.head.hash:
            raise LogError(f"checkpoint {seq} of {repo_id} already exists with other content",
                           "checkpoint exists", seq) from None
    state.head = LogHead(seq, state.head.hash, seq)   # as a later verify_log reports it


def _check_checkpoint(state: LogState, cp: Checkpoint) -> None:
    """A checkpoint inside the replayed range must match the log replayed to it."""
    if cp.sequence in state.hashes and not hmac.compare_digest(state.hashes[cp.sequence],
                                                               cp.head):
        raise LogError(f"checkpoint {cp.sequence}: head is not the SHA-256 of log entry "
                       f"{cp.sequence}", "checkpoint head mismatch", cp.sequence)

    def key(o: LiveObject) -> tuple[int, str, bytes, int, int]:
        return (o.type, o.id, o.sha256, o.count, o.key_version)

    if sorted(map(key, state.objects_at(cp.sequence))) != sorted(map(key, cp.live)):
        raise LogError(f"checkpoint {cp.sequence}: its live set differs from the log "
                       "replayed to that entry", "checkpoint live set", cp.sequence)


# --- verification ------------------------------------------------------------------------------


def _sequences(store: Store, prefix: str, kind: str) -> set[int]:
    """Sequences under a log/ or checkpoints/ prefix; foreign names are ignored (2.2)."""
    out: set[int] = set()
    parse = layout.parse_log_entry_key if kind == "log" else layout.parse_checkpoint_key
    for key in store.list_keys(prefix):
        try:
            out.add(parse(key)[1])
        except ValueError:
            continue
    return out


def _valid_checkpoints(store: Store, repo_id: str, owner_key: list[bytes], sequences: set[int],
                       above: int = -1, first_only: bool = False) -> list[Checkpoint]:
    """Owner-signed checkpoints above ``above``, highest first (only the highest with
    ``first_only``: one GET when the newest is valid). A checkpoint whose signature is not
    the owner's is skipped (anyone with bucket access can plant one); a correctly signed
    but malformed one raises FormatError (the owner wrote it)."""
    out: list[Checkpoint] = []
    for seq in sorted((s for s in sequences if s > above), reverse=True):
        try:
            blob = store.get(layout.checkpoint_key(repo_id, seq))
        except ObjectNotFound:
            continue
        try:
            out.append(open_checkpoint(blob, repo_id, seq, owner_key))  # any owner key
            if first_only:
                break
        except SignatureError:
            continue
        except FormatError:
            try:
                claimed = signed.json_signer(blob)
            except FormatError:
                continue
            if claimed is None or not any(hmac.compare_digest(claimed, k) for k in owner_key):
                continue
            raise
    return out


def _read(store: Store, repo_id: str, sequence: int) -> bytes:
    try:
        return store.get(_entry_name(repo_id, sequence))
    except ObjectNotFound:
        raise _log_error(sequence, "gap", "was listed but is gone (deleted)") from None


def _replay(store: Store, state: LogState, trust: LogTrust, listed: set[int],
            pinned_upto: int = -1) -> None:
    """Read and apply entries head+1, head+2, ... while they are listed; then refuse any
    listed entry beyond the head (a gap: the cloud deleted one). Entries up to
    ``pinned_upto`` are covered by a checkpoint the caller checks afterwards."""
    n = state.head.sequence + 1
    while n in listed:
        blob = _read(store, state.repo_id, n)
        entry = open_entry(blob, state.repo_id, n, trust, state.writer_keys,
                           pinned=n <= pinned_upto)
        _apply(state, entry, hashlib.sha256(blob).digest(), trust, signed.signer_of(blob))
        n += 1
    later = sorted(s for s in listed if s > state.head.sequence)
    if later:
        missing = state.head.sequence + 1
        raise _log_error(missing, "gap", f"is missing but entry {later[0]} exists (an entry "
                         "was deleted or withheld)")


def _empty(repo_id: str) -> LogState:
    return LogState(repo_id, LogHead(-1, ZERO_HASH, None), {}, {})


def _from_checkpoint(store: Store, repo_id: str, cp: Checkpoint, listed: set[int]) -> LogState:
    if cp.sequence not in listed:
        raise LogError(f"checkpoint {cp.sequence} names log entry {cp.sequence}, which is "
                       "missing (withheld or deleted)", "gap", cp.sequence)
    blob = _read(store, repo_id, cp.sequence)
    digest = hashlib.sha256(blob).digest()
    if not hmac.compare_digest(digest, cp.head):
        raise LogError(f"checkpoint {cp.sequence}: head is not the SHA-256 of log entry "
                       f"{cp.sequence}", "checkpoint head mismatch", cp.sequence)
    # The owner vouched for this entry by its hash: its signer may have left since.
    name = _entry_name(repo_id, cp.sequence)
    entry = decode_payload(open_signed(blob, RECORD_KIND, name)[1], name, cp.sequence)
    live = {(o.type, o.id): o for o in cp.live}
    return LogState(repo_id, LogHead(cp.sequence, digest, cp.sequence), live,
                    {cp.sequence: digest}, entry.manifest_sequence, cp.sequence,
                    set(live))


def _verify_full(store: Store, repo_id: str, trust: LogTrust, listed: set[int],
                 checkpoints: list[Checkpoint], from_genesis: bool = False) -> LogState:
    if from_genesis:
        state = _empty(repo_id)
        if 0 not in listed:
            raise LogError(f"the log of {repo_id} has no genesis entry (deleted, or never "
                           "written)", "no genesis", 0)
        return _extend(store, state, trust, listed, checkpoints)
    if checkpoints:
        state = _from_checkpoint(store, repo_id, checkpoints[0], listed)
    else:
        if 0 not in listed:
            if listed:
                raise _log_error(0, "gap", f"the genesis is missing but entry {min(listed)} "
                                 "exists")
            raise LogError(f"the log of {repo_id} has no genesis entry (not a format-2 "
                           "repository, or its log was deleted)", "no genesis", 0)
        state = _empty(repo_id)
    _replay(store, state, trust, listed)
    return state


def _extend(store: Store, state: LogState, trust: LogTrust, listed: set[int],
            checkpoints: list[Checkpoint]) -> LogState:
    """Replay entries after ``state.head`` and check every checkpoint passed on the way
    against the replayed log; entries up to the newest such checkpoint are pinned by it."""
    h0 = state.head.sequence
    newer = sorted((cp for cp in checkpoints if cp.sequence > h0), key=lambda c: c.sequence)
    _replay(store, state, trust, listed, newer[-1].sequence if newer else -1)
    for cp in newer:
        if cp.sequence > state.head.sequence:
            raise LogError(f"checkpoint {cp.sequence} is beyond the log head "
                           f"{state.head.sequence} (entries withheld)", "gap",
                           state.head.sequence + 1)
        _check_checkpoint(state, cp)
    covered = [cp.sequence for cp in checkpoints if cp.sequence <= state.head.sequence]
    if state.head.checkpoint is not None:
        covered.append(state.head.checkpoint)
    state.head = LogHead(state.head.sequence, state.head.hash, max(covered, default=None))
    return state


def _verify_since(store: Store, since: LogState, trust: LogTrust, listed: set[int],
                  cp_sequences: set[int]) -> LogState:
    """Extend ``since`` with the entries after its head (checkpoints passed on the way must
    match). When the old head entry is gone (the log was truncated below a newer
    checkpoint), start again from the newest checkpoint; rollback and fork are then checked
    against ``since.head`` by the caller."""
    h0 = since.head.sequence
    if h0 not in listed:
        if not any(s > h0 for s in listed):
            raise _log_error(h0, "rollback", "the verified head entry is gone and nothing "
                             "newer exists")
        return _verify_full(store, since.repo_id, trust, listed, _valid_checkpoints(
            store, since.repo_id, owner_keys(trust), cp_sequences, first_only=True))
    newer = _valid_checkpoints(store, since.repo_id, owner_keys(trust), cp_sequences, above=h0)
    return _extend(store, since.copy(), trust, listed, newer)


def _check_remembered(state: LogState, remembered: LogHead) -> None:
    seen_cp = -1 if state.head.checkpoint is None else state.head.checkpoint
    if remembered.checkpoint is not None and seen_cp < remembered.checkpoint:
        raise LogError(f"the newest checkpoint is {state.head.checkpoint}, below the "
                       f"checkpoint {remembered.checkpoint} seen before (rollback)",
                       "checkpoint rollback", remembered.checkpoint)
    if state.head.sequence < remembered.sequence:
        raise LogError(f"the log head is {state.head.sequence}, below the head "
                       f"{remembered.sequence} verified before (rollback)", "rollback",
                       remembered.sequence)
    known = state.hashes.get(remembered.sequence)
    if known is not None and not hmac.compare_digest(known, remembered.hash):
        raise LogError(f"log entry {remembered.sequence} differs from the one verified "
                       "before (fork)", "fork", remembered.sequence)


def verify_log(store: Store, repo_id: str, trust: LogTrust, remembered: LogHead | None = None,
               since: LogState | None = None, *, from_genesis: bool = False) -> LogState:
    """Verify the log (FORMAT-2 5.5) and return its state at the head.

    Starts from the highest owner-signed checkpoint (or genesis), or, with ``since``, from
    an earlier verified state (only new entries are read). ``remembered`` is the rollback
    memory: a lower head, another hash at the remembered sequence or a lower checkpoint is a
    LogError. ``from_genesis`` (for ``check``) replays every entry from 0 and compares each
    owner-signed checkpoint with the replayed log (LogError "checkpoint live set").
    Raises FormatError, SignatureError or LogError (see the module docstring).
    """
    layout.validate_repo_id(repo_id)
    if since is not None and since.repo_id != repo_id:
        raise ValueError(f"verify_log: since is a state of {since.repo_id}, not {repo_id}")
    listed = _sequences(store, layout.log_prefix(repo_id), "log")
    cp_sequences = _sequences(store, layout.checkpoints_prefix(repo_id), "checkpoint")
    if since is not None and not from_genesis:
        state = _verify_since(store, since, trust, listed, cp_sequences)
        _check_remembered(state, since.head)
    else:
        checkpoints = _valid_checkpoints(store, repo_id, owner_keys(trust), cp_sequences,
                                         first_only=not from_genesis)
        state = _verify_full(store, repo_id, trust, listed, checkpoints, from_genesis)
    if remembered is not None:
        _check_remembered(state, remembered)
    return state


# --- writing ---------------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def write_genesis(store: Store, repo_id: str, owner: Identity, owner_id: str,
                  manifest_sequence: int, key_version: int, *,
                  reason: int = REASON_IMPORT) -> LogState:
    """Create entry 0 (create-if-absent; LogError "genesis exists" if the log has one).
    ``reason``: REASON_IMPORT for a new repository, REASON_MIGRATION for a migrated one."""
    trust = StaticTrust(owner_id, owner.sign_public, manifest_sequence, key_version)
    entry = LogEntry(0, KIND_GENESIS, reason, ZERO_HASH, manifest_sequence, key_version,
                     _now_ms(), owner_id, (), ())
    state = _empty(repo_id)
    name = _entry_name(repo_id, 0)
    blob = signed.sign_record(owner, RECORD_KIND, name, encode_payload(entry))
    _apply(state, entry, hashlib.sha256(blob).digest(), trust, owner.sign_public)
    try:
        store.put(name, blob, if_absent=True)
    except ObjectExists:
        if stored_after_conflict(store, name) == blob:
            return state          # an earlier, retried PUT of this very entry landed
        raise LogError(f"the log of {repo_id} already has a genesis entry", "genesis exists",
                       0) from None
    return state


def _sort_key(item: Added | Removed) -> tuple[int, str]:
    return (item.type, item.id)


def append(store: Store, repo_id: str, writer: Identity, writer_id: str, trust: LogTrust,
           state: LogState, *, kind: int, reason: int, key_version: int,
           added: Sequence[Added], removed: Sequence[Removed] = ()) -> LogState:
    """Append one entry (FORMAT-2 5.3 steps 4-5) and return the state with it applied.

    The entry is checked against the kind rules before anything is written. When another
    writer created the next sequence first, the new entries are verified (``since``) and the
    append is retried at the new head; a replace/remove whose objects are no longer live
    raises AppendAbandoned. ``state`` is not modified.
    """
    if state.repo_id != repo_id:
        raise ValueError(f"append: state is of repository {state.repo_id}, not {repo_id}")
    expected = _owner_key_of(trust, writer_id)
    if expected is None:
        raise LogError(f"{writer_id} is neither the owner nor a current member of {repo_id}",
                       "not a member", state.head.sequence + 1)
    if not hmac.compare_digest(expected, writer.sign_public):
        raise LogError(f"the identity given is not {writer_id}'s registered key",
                       "writer differs from signer", state.head.sequence + 1)
    added_t = tuple(sorted(added, key=_sort_key))
    removed_t = tuple(sorted(removed, key=_sort_key))
    current = state            # never modified: verify_log(since=) and copy() make new ones
    for _ in range(MAX_APPEND_ATTEMPTS):
        n = current.head.sequence + 1
        entry = LogEntry(n, kind, reason, current.head.hash,
                         trust.manifest_sequence, key_version, _now_ms(), writer_id,
                         added_t, removed_t)
        name = _entry_name(repo_id, n)
        blob = signed.sign_record(writer, RECORD_KIND, name, encode_payload(entry))
        trial = current.copy()
        _apply(trial, entry, hashlib.sha256(blob).digest(), trust, writer.sign_public)
        try:
            store.put(name, blob, if_absent=True)
        except ObjectExists:
            if stored_after_conflict(store, name) == blob:
                return trial          # an earlier, retried PUT of this very entry landed
            current = verify_log(store, repo_id, trust, since=current)
            gone = [r for r in removed_t if r.type != TYPE_V1_SEGMENT
                    and (r.type, r.id) not in current.live]
            if gone:
                raise AppendAbandoned(
                    f"log entry {current.head.sequence + 1}: {KIND_WORDS[kind]} abandoned: "
                    f"{TYPE_WORDS[gone[0].type]} {gone[0].id} is no longer live (another "
                    "writer removed it)", "abandoned", current.head.sequence + 1) from None
            continue
        return trial
    raise LogError(f"append to the log of {repo_id} lost {MAX_APPEND_ATTEMPTS} races in a "
                   "row", "contention", current.head.sequence + 1)


# --- completeness of answers (FORMAT-2 6.3) ---------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Whether an answer covered every live segment of its key version."""

    complete: bool
    expected: int          # live segments of the key version at the client's head
    searched: int          # segments the service says it searched
    missing: list[str]     # live segment ids the service did not search, sorted


def judge_answer(state: LogState, key_version: int, head_sequence: int, head_hash: bytes,
                 digest: bytes, searched: int, listed: Sequence[str] | None) -> Verdict | None:
    """Draft 6.3 steps 1-4 for one answer.

    LogAhead: the service's head is beyond ``state`` (re-verify, then judge again).
    LogError "fork": the service's head entry has another hash than ours. None: the digest
    differs and no list was given (ask again with LIST_SEGMENTS). AnswerError: the list
    repeats an id, does not hash to ``digest``, has not ``searched`` ids, or names a segment
    not live at the service's head.
    """
    if head_sequence > state.head.sequence:
        raise LogAhead(f"the service's log head {head_sequence} is beyond the verified head "
                       f"{state.head.sequence}", "ahead", head_sequence)
    ours = state.hashes.get(head_sequence)
    if ours is not None and not hmac.compare_digest(ours, head_hash):
        raise LogError(f"log entry {head_sequence}: the service's entry differs from the one "
                       "verified here (fork)", "fork", head_sequence)
    expected = [o.id for o in state.segments(key_version)]
    if hmac.compare_digest(set_digest(state.repo_id, key_version, expected), digest):
        return Verdict(True, len(expected), searched, [])
    if listed is None:
        return None
    ids = list(listed)
    if len(set(ids)) != len(ids):
        raise AnswerError("the answer lists a segment twice")
    if len(ids) != searched:
        raise AnswerError(f"the answer lists {len(ids)} segments but says it searched "
                          f"{searched}")
    try:
        listed_digest = set_digest(state.repo_id, key_version, ids)
    except ValueError as exc:
        raise AnswerError(f"the answer's segment list is malformed: {exc}") from None
    if not hmac.compare_digest(listed_digest, digest):
        raise AnswerError("the answer's segment list does not hash to its set digest")
    known = state.live_at(head_sequence, key_version)
    foreign = sorted(set(ids) - known)
    if foreign:
        raise AnswerError(f"the service searched {len(foreign)} segment(s) that are not live "
                          f"in the log at entry {head_sequence} (first: {foreign[0]})")
    missing = sorted(set(expected) - set(ids))
    return Verdict(not missing, len(expected), searched, missing)


def check_hits(hits: Sequence[Sequence[tuple[str, float]]]) -> None:
    """Draft 6.3 step 5: AnswerError when one query's hits name an image twice."""
    for q, row in enumerate(hits):
        ids = [image_id for image_id, _ in row]
        if len(set(ids)) != len(ids):
            raise AnswerError(f"query {q}: the answer names an image twice among its hits")
