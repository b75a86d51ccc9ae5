"""The access log: who decrypted which image's original or preview, when, and why.

Why a log of its own: the search service's audit trail (cloud/audit.py) sees queries,
not what a radiologist then opened, and a hospital must be able to answer "who looked
at this patient's images" (issue 16, docs/PRIVACY.md). Decryption happens only on the
workstation, so only the workstation can record it; the record must not tell the cloud
what it hides (which patient was looked at), and neither the cloud nor a member may
rewrite it unnoticed.

Layout. Each user appends to a chain of their own under the repository::

    radcrypt/v1/repos/<repo_id>/access/<user_id>/<SEQ20>

one object per recording (one call of ``record``: one original, the previews of one
result page or archive view, or every image a ``radcrypt check --read-data`` run
decrypts), created only if absent, never replaced. A recording of more than MAX_EVENTS
images (MAX_CHECK_EVENTS for a check) is split into consecutive entries, all written
before anything is decrypted: an entry stays below MAX_ENTRY_BYTES, which the owner's
reader refuses unread. The object::

    "RCAL" | version u8 (1) | recipients u8 (n)
           | n x ( id length u8 | recipient user id | wrapped length u16 | wrapped key )
           | AES-GCM envelope (crypto/aead.py) of a signed JSON document

A fresh 32-byte entry key seals the document (associated data: every byte before the
envelope, then the object name); it is wrapped (crypto/recipient.py, as a grant) to the
X25519 key of the repository's owner and of each co-owner, read from their user records
that an owner signed. Members other than owners cannot read the log, not even their own
entries: the cloud learns only that user X recorded something, when, and its size.

The document is signed by the user who recorded it (crypto/signed.sign_json, kind
"access", bound to the object name) and holds ``repo``, ``user``, ``user_name``,
``host``, ``sequence`` (equal to the name's), ``previous`` (SHA-256, hex, of the stored
bytes of the entry before it; "" for entry 0), ``time`` and ``events`` (``action``
"original", "preview" or "check" (an integrity check that read the image's original and
preview, purpose "integrity check"), ``image``, ``study``, ``series``, ``purpose``). The
owner's reader verifies each chain from entry 0: a gap (a deleted entry), an entry moved
to another name or user (signature, associated data), one not signed by the user it
names (forged: the cloud, or another member), or a ``previous`` that does not match
(reordered, replaced) stops that user's chain there: the entries before it are reported,
the rest are not, and the problem names the object. Every writer addresses the owner, so
an entry the owner cannot open is rejected too; a co-owner counts the entries written
before they became one as unreadable. A cloud that hides the newest entries of a chain
is noticed by a workstation that read them before (``access-heads.json`` in the data
directory, remembered per repository and user, like log-heads.json).

Fail closed: the facade records before it decrypts (app/core/client.py), so an original
or a preview is never shown when its record could not be written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from app.core.errors import IntegrityError, RadcryptError
from app.core.logstate import member_key, write_private
from app.core.repository import Repository
from app.core.settings import Settings
from cloud import layout
from cloud.backend import (
    ObjectExists,
    ObjectNotFound,
    Store,
    StoreError,
    stored_after_conflict,
)
from crypto import aead
from crypto.csprng import random_bytes
from crypto.errors import DecryptionError, FormatError
from crypto.identity import Identity, PublicCard
from crypto.recipient import unwrap_for_recipient, wrap_to_recipient
from crypto.signed import open_json, sign_json

ACCESS_DIR = "access/"
HEADS_FILE = "access-heads.json"
ACTIONS = ("original", "preview", "check")
MAX_EVENTS = 1000  # per entry: a page of previews; larger calls are split
# A check run's events carry no study or series (the check does not read metadata to
# record): about 170 bytes each as signed JSON, so 20,000 stay below MAX_ENTRY_BYTES
# (tests/test_access_batch.py writes and reads back an entry of this many).
MAX_CHECK_EVENTS = 20_000
CHECK_PURPOSE = "integrity check"
MAX_ENTRY_BYTES = 4 << 20  # a hostile object larger than this is refused unread
MAX_PURPOSE = 200  # characters of the optional purpose kept
APPEND_ATTEMPTS = 20  # another process of the same user appending at the same time
READ_THREADS = 8  # entries fetched and opened at once by the owner's reader
READ_WINDOW = 256  # entries of one chain in flight (bounds the reader's memory)
_MAGIC = b"RCAL"
_VERSION = 1
_KIND = "access"
CSV_FIELDS = ("time", "user_id", "user_name", "host", "action", "image_id", "study_uid",
              "series_uid", "purpose", "sequence", "entry")

log = logging.getLogger(__name__)
_heads_lock = threading.Lock()


class NotAddressed(Exception):
    """An entry whose key is not wrapped to this owner (a co-owner added after it was
    written; for the repository's owner, who every entry names, a rejected entry)."""


# --- names ---------------------------------------------------------------------------------


def access_prefix(repo_id: str, user_id: str | None = None) -> str:
    """radcrypt/v1/repos/<repo_id>/access/ (and <user_id>/): see /work/p15-h6-layout.patch."""
    base = layout.repo_prefix(repo_id) + ACCESS_DIR
    return base if user_id is None else base + layout.validate_user_id(user_id) + "/"


def entry_key(repo_id: str, user_id: str, sequence: int) -> str:
    """The name of entry ``sequence`` of ``user_id``'s chain."""
    return access_prefix(repo_id, user_id) + layout.seq20(sequence)


def _parse_entry(repo_id: str, key: str) -> tuple[str, int] | None:
    """(user id, sequence) of a key under access/; None for a foreign name."""
    tail = key[len(access_prefix(repo_id)):].split("/")
    if len(tail) != 2 or len(tail[1]) != 20 or not tail[1].isdigit():
        return None
    try:
        return layout.validate_user_id(tail[0]), int(tail[1])
    except ValueError:
        return None


# --- what is recorded ------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessEvent:
    """One decryption, as the owner reads it back."""

    time: str
    user_id: str
    user_name: str
    host: str
    action: str
    image_id: str
    study_uid: str
    series_uid: str
    purpose: str
    sequence: int
    entry: str  # the object name of the entry that holds it

    def as_dict(self) -> dict[str, Any]:
        return {"time": self.time, "user_id": self.user_id, "user_name": self.user_name,
                "host": self.host, "action": self.action, "image_id": self.image_id,
                "study_uid": self.study_uid, "series_uid": self.series_uid,
                "purpose": self.purpose, "sequence": self.sequence, "entry": self.entry}


@dataclass
class AccessReport:
    """The verified events of every chain, oldest first per chain and sorted by time
    overall; ``problems``: one line per chain that stopped early (naming the object and
    why); ``unreadable``: entries not addressed to this owner (written before they
    became a co-owner), counted per user."""

    repo_id: str
    events: list[AccessEvent] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unreadable: dict[str, int] = field(default_factory=dict)
    chains: dict[str, int] = field(default_factory=dict)  # user id -> entries verified

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"repo": self.repo_id, "ok": self.ok, "problems": list(self.problems),
                "unreadable": dict(self.unreadable), "chains": dict(self.chains),
                "events": [e.as_dict() for e in self.events]}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def to_csv(self) -> str:
        """One row per event, the columns of CSV_FIELDS (for a hospital's SIEM)."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for event in self.events:
            writer.writerow(event.as_dict())
        return out.getvalue()


def _event(action: str, image_id: str, record: dict[str, Any] | None, purpose: str
           ) -> dict[str, str]:
    if action not in ACTIONS:
        raise ValueError(f"access log: action must be one of {', '.join(ACTIONS)}, "
                         f"not {action!r}")
    clinical = (record or {}).get("clinical")
    clinical = clinical if isinstance(clinical, dict) else {}
    return {"action": action, "image": layout.validate_image_id(image_id),
            "study": str(clinical.get("StudyInstanceUID", "")),
            "series": str(clinical.get("SeriesInstanceUID", "")),
            "purpose": purpose[:MAX_PURPOSE]}


# --- writing -------------------------------------------------------------------------------


def _card(store: Store, user_id: str, owner_keys: list[bytes]) -> PublicCard:
    name = layout.user_key(user_id)
    try:
        payload = open_json(store.get(name), "user", name, owner_keys)
        card = PublicCard.from_json(str(payload["card"]))
    except ObjectNotFound:
        raise RadcryptError(f"access log: the user record of owner {user_id!r} is missing "
                            f"({name}): nothing can be recorded for them, so nothing is "
                            "decrypted") from None
    except (FormatError, KeyError, ValueError):
        raise IntegrityError(f"access log: the user record {name} is not signed by an owner "
                             "of this repository") from None
    if card.user_id != user_id:
        raise IntegrityError(f"access log: the user record {name} holds another user's card")
    return card


def _owner_keys(repo: Repository) -> dict[str, bytes]:
    if repo.owner_key is None:
        raise RadcryptError(f"repository {repo.repo_id!r} has no owner key (a legacy "
                            "repository): it has no access log until its owner upgrades it")
    return repo.manifest.owner_keys(repo.owner_key)


def _context(name: str) -> bytes:
    return b"radcrypt/access/v1\x00" + name.encode()


def seal_entry(name: str, document: bytes, recipients: list[PublicCard]) -> bytes:
    """The stored bytes of one entry: ``document`` sealed under a fresh key wrapped to
    each recipient (the format in the module docstring)."""
    if not 1 <= len(recipients) <= 255:
        raise RadcryptError("access log: an entry needs 1 to 255 owners to address")
    entry_key_ = random_bytes(32)
    head = bytearray(_MAGIC + bytes([_VERSION, len(recipients)]))
    for card in recipients:
        uid = card.user_id.encode()
        wrapped = wrap_to_recipient(entry_key_, card.enc_public, _context(name))
        head += bytes([len(uid)]) + uid + struct.pack(">H", len(wrapped)) + wrapped
    return bytes(head) + aead.seal(entry_key_, document, bytes(head) + _context(name))


def open_entry(name: str, blob: bytes, reader: Identity) -> bytes:
    """The signed document of an entry addressed to ``reader``; NotAddressed when it is
    not addressed to them, FormatError or DecryptionError when it is damaged or moved."""
    if len(blob) > MAX_ENTRY_BYTES:
        raise FormatError(f"larger than {MAX_ENTRY_BYTES} bytes")
    if len(blob) < 6 or blob[:4] != _MAGIC:
        raise FormatError("not an access log entry")
    if blob[4] != _VERSION:
        raise FormatError(f"unsupported access log entry version {blob[4]}")
    count, offset, mine = blob[5], 6, None
    try:
        for _ in range(count):
            size = blob[offset]
            uid = blob[offset + 1: offset + 1 + size].decode("ascii")
            offset += 1 + size
            (wrapped_size,) = struct.unpack_from(">H", blob, offset)
            wrapped = blob[offset + 2: offset + 2 + wrapped_size]
            if len(wrapped) != wrapped_size:
                raise FormatError("truncated recipient")
            offset += 2 + wrapped_size
            if uid == reader.user_id:
                mine = wrapped
    except (IndexError, struct.error, UnicodeDecodeError):
        raise FormatError("malformed recipient list") from None
    if mine is None:
        raise NotAddressed("not addressed to this owner")
    key = unwrap_for_recipient(mine, reader.enc_private, _context(name))
    return aead.open_sealed(key, blob[offset:], blob[:offset] + _context(name))


@dataclass
class _Head:
    sequence: int  # the next sequence to write
    previous: str  # SHA-256 hex of the last entry's bytes, "" before entry 0


class AccessLogWriter:
    """Appends ``identity``'s entries to one repository's access log; one per session
    and repository (Session.access_logs), safe for several threads."""

    def __init__(self, store: Store, repo: Repository, identity: Identity) -> None:
        self.store = store
        self.repo = repo
        self.identity = identity
        self._head: _Head | None = None
        self._recipients: list[PublicCard] | None = None
        self._lock = threading.Lock()

    def _cards(self) -> list[PublicCard]:
        if self._recipients is None:
            owners = _owner_keys(self.repo)
            trusted = list(owners.values())
            self._recipients = [_card(self.store, uid, trusted) for uid in sorted(owners)]
        return self._recipients

    def _find_head(self) -> _Head:
        """The next free sequence of this user's chain and the hash of the last entry
        (the listing is the writer's only view: it cannot decrypt its own entries)."""
        keys = [k for k in self.store.list_keys(access_prefix(self.repo.repo_id,
                                                              self.identity.user_id))
                if _parse_entry(self.repo.repo_id, k) is not None]
        if not keys:
            return _Head(0, "")
        last = max(keys)
        _, sequence = _parse_entry(self.repo.repo_id, last) or ("", 0)
        return _Head(sequence + 1, hashlib.sha256(self.store.get(last)).hexdigest())

    def record(self, action: str, image_ids: Iterable[str],
               records: dict[str, dict[str, Any]] | None = None, purpose: str = "", *,
               per_entry: int = MAX_EVENTS) -> int:
        """Write one entry (several when there are more than ``per_entry`` ids) naming
        each image; returns the number of entries written. RadcryptError (nothing may be
        decrypted then) when it cannot be written."""
        events = [_event(action, i, (records or {}).get(i), purpose) for i in image_ids]
        written = 0
        for start in range(0, len(events), per_entry):
            self._append(events[start:start + per_entry])
            written += 1
        return written

    def _append(self, events: list[dict[str, str]]) -> None:
        repo_id, user = self.repo.repo_id, self.identity
        with self._lock:
            cards = self._cards()
            for _ in range(APPEND_ATTEMPTS):
                head = self._head or self._find_head()
                name = entry_key(repo_id, user.user_id, head.sequence)
                payload: dict[str, object] = {
                    "repo": repo_id, "user": user.user_id, "user_name": user.name,
                    "host": socket.gethostname(), "sequence": head.sequence,
                    "previous": head.previous,
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    "events": events}
                blob = seal_entry(name, sign_json(user, _KIND, name, payload), cards)
                try:
                    self.store.put(name, blob, if_absent=True)
                except ObjectExists:
                    if stored_after_conflict(self.store, name) != blob:
                        self._head = None  # another process of this user took it
                        continue
                    # else the store retried our own create after a lost answer: written
                except StoreError as exc:
                    self._head = None
                    raise RadcryptError(f"access log: cannot write {name}: {exc}; nothing "
                                        "was decrypted") from None
                self._head = _Head(head.sequence + 1, hashlib.sha256(blob).hexdigest())
                return
        raise RadcryptError(f"access log: {APPEND_ATTEMPTS} attempts to append to "
                            f"{access_prefix(repo_id, user.user_id)} met other writers; "
                            "nothing was decrypted")


def writer_for(session: Any, repo: Repository, identity: Identity) -> AccessLogWriter:
    """The session's writer for ``repo`` (Session.access_logs), made on first use and
    made again when the repository was reopened (a new key version, new owners)."""
    with session.log_lock:
        writer: AccessLogWriter | None = session.access_logs.get(repo.repo_id)
        if (writer is None or writer.identity is not identity
                or writer.repo.manifest.sequence != repo.manifest.sequence):
            writer = AccessLogWriter(session.store, repo, identity)
            session.access_logs[repo.repo_id] = writer
        return writer


def record_access(session: Any, repo: Repository, identity: Identity, action: str,
                  image_ids: Iterable[str], *, purpose: str = "",
                  records: dict[str, dict[str, Any]] | None = None,
                  meta_of: Callable[[str], dict[str, Any]] | None = None) -> None:
    """Record that ``identity`` is about to decrypt ``action`` ("original", "preview")
    of ``image_ids``; the facade calls it before decrypting. ``records``: metadata the
    caller already holds (a hit's), else ``meta_of(image_id)`` gives it (for the study
    and series UIDs; a record that cannot be read leaves them empty)."""
    ids = list(image_ids)
    known = dict(records or {})
    if meta_of is not None:
        for image_id in ids:
            if image_id not in known:
                try:
                    known[image_id] = meta_of(image_id)
                except (RadcryptError, StoreError, FormatError, DecryptionError, ValueError):
                    known[image_id] = {}
    writer_for(session, repo, identity).record(action, ids, known, purpose)


def record_check(session: Any, repo: Repository, identity: Identity,
                 image_ids: Iterable[str]) -> int:
    """Record that an integrity check (``radcrypt check --read-data``, repo_check's
    ``before_decrypting``) is about to decrypt the previews and originals of
    ``image_ids``: ONE entry for the run (action "check", purpose "integrity check"; more
    only past MAX_CHECK_EVENTS images), before the first decryption. Returns the number
    of entries written; RadcryptError when it cannot be written (the check then stops,
    nothing decrypted)."""
    return writer_for(session, repo, identity).record(
        "check", image_ids, None, CHECK_PURPOSE, per_entry=MAX_CHECK_EVENTS)


# --- reading (owners) ------------------------------------------------------------------------


def _heads_file(settings: Settings) -> Path:
    return settings.data_path / HEADS_FILE


def remembered_heads(settings: Settings, repo_id: str) -> dict[str, tuple[int, str]]:
    """user id -> (sequence, SHA-256 hex) of the last entry this workstation verified."""
    path = _heads_file(settings)
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8")).get(repo_id, {})
        return {str(u): (int(v["sequence"]), str(v["hash"])) for u, v in raw.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise RadcryptError(f"the access log heads file {path} is damaged") from None


def _remember(settings: Settings, repo_id: str, heads: dict[str, tuple[int, str]]) -> None:
    path = _heads_file(settings)
    with _heads_lock:
        try:
            raw = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except (ValueError, UnicodeDecodeError):
            raise RadcryptError(f"the access log heads file {path} is damaged") from None
        mine = raw.setdefault(repo_id, {})
        for user_id, (sequence, digest) in heads.items():
            known = mine.get(user_id)
            if known is None or int(known["sequence"]) < sequence:
                mine[user_id] = {"sequence": sequence, "hash": digest}
        write_private(path, json.dumps(raw, indent=2, sort_keys=True).encode())


def _open_one(store: Store, owner: Identity, signer: bytes | None, name: str
              ) -> tuple[bytes, dict[str, Any] | BaseException]:
    """The stored bytes of an entry and its verified signed payload, or the reason it
    does not open (NotAddressed: not addressed to ``owner``); run in READ_THREADS."""
    try:
        blob = store.get(name)
    except (ObjectNotFound, StoreError) as exc:
        return b"", exc
    try:
        document = open_entry(name, blob, owner)
        if signer is None:
            raise IntegrityError("the user has no user record an owner signed")
        return blob, open_json(document, _KIND, name, [signer])
    except (NotAddressed, FormatError, DecryptionError, IntegrityError, ValueError,
            KeyError, TypeError) as exc:
        return blob, exc


def _opened(store: Store, owner: Identity, signer: bytes | None, keys: dict[int, str],
            pool: ThreadPoolExecutor) -> Iterator[tuple[int, str | None, bytes,
                                                        dict[str, Any] | BaseException]]:
    """(sequence, name or None for a gap, bytes, payload or reason) in sequence order,
    read and opened READ_WINDOW at a time by the pool (a GET each: on S3 the latency,
    not the crypto, is what a long log costs)."""
    end = max(keys) + 1 if keys else 0
    for start in range(0, end, READ_WINDOW):
        window = range(start, min(end, start + READ_WINDOW))
        names = [keys.get(sequence) for sequence in window]
        futures = [pool.submit(_open_one, store, owner, signer, n) if n else None
                   for n in names]
        for sequence, name, future in zip(window, names, futures, strict=True):
            if future is None:
                yield sequence, None, b"", NotAddressed("missing")
            else:
                blob, payload = future.result()
                yield sequence, name, blob, payload


def _verify_chain(store: Store, repo: Repository, owner: Identity, user_id: str,
                  keys: dict[int, str], signer: bytes | None, report: AccessReport,
                  pool: ThreadPoolExecutor) -> tuple[int, str] | None:
    """Append ``user_id``'s verified events to ``report``; the (sequence, hash) of the
    last verified entry, or None when not even entry 0 verified."""
    previous, last = "", None
    every_entry_is_mine = owner.user_id == repo.manifest.owner  # writers address the owner
    for sequence, name, blob, opened in _opened(store, owner, signer, keys, pool):
        if name is None:
            report.problems.append(f"access log of {user_id}: entry {sequence} is missing "
                                   f"(deleted?): the {len(keys) - sequence} entries after "
                                   "it are not trusted")
            return last
        try:
            if isinstance(opened, NotAddressed) and not every_entry_is_mine:
                report.unreadable[user_id] = report.unreadable.get(user_id, 0) + 1
                previous = hashlib.sha256(blob).hexdigest()
                continue
            if isinstance(opened, BaseException):
                raise opened
            events = _check_payload(opened, repo.repo_id, user_id, sequence, previous)
        except (StoreError, NotAddressed, FormatError, DecryptionError, IntegrityError,
                ValueError, KeyError, TypeError) as exc:
            report.problems.append(f"access log entry {name} is rejected ({exc}): it and "
                                   f"the entries after it in {user_id}'s chain are not "
                                   "trusted")
            return last
        previous = hashlib.sha256(blob).hexdigest()
        last = (sequence, previous)
        report.chains[user_id] = report.chains.get(user_id, 0) + 1
        report.events.extend(AccessEvent(
            time=str(opened["time"]), user_id=user_id, user_name=str(opened["user_name"]),
            host=str(opened["host"]), action=e["action"], image_id=e["image"],
            study_uid=e["study"], series_uid=e["series"], purpose=e["purpose"],
            sequence=sequence, entry=name) for e in events)
    return last


def _check_payload(payload: dict[str, Any], repo_id: str, user_id: str, sequence: int,
                   previous: str) -> list[dict[str, str]]:
    """The events of a signed entry whose fields agree with where it is stored."""
    if payload.get("repo") != repo_id or payload.get("user") != user_id:
        raise IntegrityError("it names another repository or user than its place")
    if payload.get("sequence") != sequence:
        raise IntegrityError(f"it says sequence {payload.get('sequence')!r}")
    if payload.get("previous") != previous:
        raise IntegrityError("its link to the entry before does not match (reordered or "
                             "replaced)")
    events = payload.get("events")
    if not isinstance(events, list) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), str) for k in
                                        ("action", "image", "study", "series", "purpose"))
            for e in events):
        raise FormatError("its events are malformed")
    for name in ("time", "user_name", "host"):
        if not isinstance(payload.get(name), str):
            raise FormatError(f"field {name!r} must be a string")
    return events


def read_access_log(store: Store, repo: Repository, owner: Identity,
                    settings: Settings | None = None) -> AccessReport:
    """Every user's chain, verified (module docstring); owners only. With ``settings``
    the heads verified are remembered, and a chain now shorter than one verified before
    on this workstation, or different at that entry, is a problem."""
    owners = _owner_keys(repo)
    if owner.user_id not in owners:
        raise RadcryptError(f"only an owner of repository {repo.repo_id!r} can read its "
                            "access log (it is encrypted to the owners)")
    chains: dict[str, dict[int, str]] = {}
    for key in store.list_keys(access_prefix(repo.repo_id)):
        parsed = _parse_entry(repo.repo_id, key)
        if parsed is not None:
            chains.setdefault(parsed[0], {})[parsed[1]] = key
    known = remembered_heads(settings, repo.repo_id) if settings is not None else {}
    report = AccessReport(repo.repo_id)
    heads: dict[str, tuple[int, str]] = {}
    trusted = list(owners.values())
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="radcrypt-access") as pool:
        lasts = {user_id: _verify_chain(
            store, repo, owner, user_id, chains.get(user_id, {}),
            owners.get(user_id) or member_key(store, user_id, trusted), report, pool)
            for user_id in sorted(set(chains) | set(known))}
    for user_id, last in lasts.items():
        before = known.get(user_id)
        if before is not None and (last is None or last[0] < before[0]):
            report.problems.append(
                f"access log of {user_id}: entries up to {before[0]} were verified before on "
                f"this workstation, now {'none' if last is None else f'only up to {last[0]}'}"
                ": entries were deleted or are withheld")
        elif before is not None and last is not None and before[0] == last[0] \
                and before[1] != last[1]:
            report.problems.append(f"access log of {user_id}: entry {last[0]} differs from "
                                   "the one verified before on this workstation")
        if last is not None:
            heads[user_id] = last
    report.events.sort(key=lambda e: (e.time, e.user_id, e.sequence))
    if settings is not None and heads:
        _remember(settings, repo.repo_id, heads)
    return report
