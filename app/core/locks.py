"""Lock objects in the bucket (restic's model): gc never deletes what a live import may
still commit.

An import uploads originals, a pack and a segment first and commits them with a log
entry last (app/core/importer.py); until that entry exists they look exactly like the
orphans of a dead import. ``radcrypt gc`` removes such orphans, so it must know whether
an import is still running somewhere. Object stores have no locks, so, like restic, each
process that writes announces itself with a small object under the repository's
``locks/`` prefix:

* an import takes a **shared** lock (several imports run side by side);
* gc and compaction take an **exclusive** lock: refused while any other fresh lock
  exists, and while it is held every new lock is refused.

The lock object is a signed JSON document (crypto/signed.sign_json, kind "lock", bound
to its key) naming the user id, host name, process id, the time it was (re)written and
the exclusive flag, encrypted under the repository's current data key (as restic
encrypts its locks): only members, who are the only ones that take locks or run gc,
read them, and the cloud learns no host name or process id, only that a lock exists
(``"RCLK" | key version u32 | AES-GCM envelope``, associated data: repository, "locks",
lock id, key version). It is rewritten with a new time every ``REFRESH_SECONDS`` by a
thread while it is held, and deleted on release. A lock is **stale** when its time is
older than ``STALE_SECONDS`` (restic: 30 minutes; a refresh every 5 minutes can miss a
few and still be fresh), or when it was written on this host by a process that no
longer exists. Stale locks block nothing. Taking a lock deletes the stale locks of dead
processes of this host (a killed import's: certainly gone, as restic does); the others
stay until ``radcrypt unlock`` removes them (``--remove-all`` also removes fresh ones:
for a lock whose process is known dead on another host).

The race of two processes taking conflicting locks at once is settled as restic does:
each writes its own lock first and then lists the others; a conflict found after
writing withdraws the own lock and raises LockConflict, so at worst both back off.

What a lock does not protect against: a client that takes no lock (an older Radcrypt)
or a clock far off. gc therefore also keeps a grace period (objects younger than it
are never orphans) and checks that the log did not move while it worked.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from app.core.errors import RadcryptError
from app.core.repository import Repository
from cloud import layout
from cloud.backend import ObjectNotFound, Store, StoreError, list_with_times
from crypto import aead, signed
from crypto.errors import DecryptionError, FormatError
from crypto.identity import Identity, SignatureError

STALE_SECONDS = 30 * 60   # restic's staleTimeout
REFRESH_SECONDS = 5 * 60  # restic's refreshInterval
LOCKS_DIR = "locks/"
_KIND = "lock"
_MAGIC = b"RCLK"
_FIELDS = ("user_id", "host", "pid", "time", "exclusive")

log = logging.getLogger(__name__)


class LockConflict(RadcryptError):
    """Another process holds a lock that conflicts with the one asked for; ``locks``
    names them."""

    def __init__(self, message: str, locks: list[LockInfo]) -> None:
        super().__init__(message)
        self.locks = locks


# --- names -------------------------------------------------------------------------------------


def locks_prefix(repo_id: str) -> str:
    """radcrypt/v1/repos/<repo_id>/locks/ (see /work/p14-h1-layout.patch for layout.py)."""
    return layout.repo_prefix(repo_id) + LOCKS_DIR


def lock_key(repo_id: str, lock_id: str) -> str:
    """The key of one lock object; ``lock_id`` a 32-hex id from layout.new_id()."""
    return locks_prefix(repo_id) + layout.validate_segment_id(lock_id)


def _parse_lock_key(repo_id: str, key: str) -> str:
    """The lock id of a key under locks/ (ValueError for a foreign name)."""
    return layout.validate_segment_id(key[len(locks_prefix(repo_id)):])


# --- what a lock says --------------------------------------------------------------------------


@dataclass(frozen=True)
class LockInfo:
    """One lock object as read from the bucket.

    ``authentic``: True when its signature verifies under the key of the repository
    member it names (``trust`` given to list_locks), False when it does not (forged or
    damaged: still honoured until stale, since a lock only ever stops gc), None when not
    checked. ``stale_reason``: why it is stale, "" when fresh."""

    lock_id: str
    key: str
    user_id: str
    host: str
    pid: int
    time: float
    exclusive: bool
    authentic: bool | None
    stale_reason: str
    detail: str = ""

    @property
    def stale(self) -> bool:
        return bool(self.stale_reason)

    def line(self, now: float | None = None) -> str:
        age = max(0.0, (time.time() if now is None else now) - self.time)
        kind = "exclusive" if self.exclusive else "shared"
        text = (f"{kind} lock {self.lock_id} of user {self.user_id or '?'} on host "
                f"{self.host or '?'} (pid {self.pid}), refreshed {age:.0f} s ago")
        if self.stale:
            text += f": STALE ({self.stale_reason})"
        if self.authentic is False:
            text += ": NOT authentic"
        return text + (f" ({self.detail})" if self.detail else "")

    def as_dict(self) -> dict[str, Any]:
        return {"lock_id": self.lock_id, "user_id": self.user_id, "host": self.host,
                "pid": self.pid, "time": round(self.time, 3), "exclusive": self.exclusive,
                "authentic": self.authentic, "stale": self.stale,
                "stale_reason": self.stale_reason, "detail": self.detail}


def this_host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (signal 0 probes it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    except OSError:
        return False
    return True


def stale_reason(user_host: str, pid: int, when: float, now: float,
                 stale_seconds: float = STALE_SECONDS) -> str:
    """Why a lock with these fields is stale ("" when it is fresh)."""
    if now - when > stale_seconds:
        return f"not refreshed for {now - when:.0f} s (more than {stale_seconds:.0f} s)"
    if user_host == this_host() and not pid_alive(pid):
        return f"process {pid} no longer exists on this host"
    return ""


def _payload(identity: Identity, exclusive: bool, when: float) -> dict[str, object]:
    return {"user_id": identity.user_id, "host": this_host(), "pid": os.getpid(),
            "time": when, "exclusive": exclusive}


def _seal(repo: Repository, lock_id: str, document: bytes) -> bytes:
    keys = repo.keys
    ad = aead.associated_data(repo.repo_id, "locks", lock_id, keys.version)
    return _MAGIC + struct.pack(">I", keys.version) + aead.seal(keys.data_key, document, ad)


def _open(repo: Repository, lock_id: str, blob: bytes) -> bytes:
    """The signed document inside a lock object (FormatError, DecryptionError or
    KeyError for one that is not a lock of this repository or not readable here)."""
    if len(blob) < 8 or blob[:4] != _MAGIC:
        raise FormatError("not a Radcrypt lock object")
    (version,) = struct.unpack(">I", blob[4:8])
    keys = repo.ring.version(version)
    ad = aead.associated_data(repo.repo_id, "locks", lock_id, version)
    return aead.open_sealed(keys.data_key, blob[8:], ad)


def _read(store: Store, repo: Repository, key: str, modified: float | None, trust: Any,
          now: float, stale_seconds: float) -> LockInfo | None:
    """The lock at ``key``; None when it is gone. A lock that does not open or parse is
    kept as an exclusive lock of unknown owner, aged by the store's time (so it blocks
    until it is stale, and unlock can remove it)."""
    lock_id = _parse_lock_key(repo.repo_id, key)
    try:
        sealed = store.get(key)
    except ObjectNotFound:
        return None
    try:
        blob = _open(repo, lock_id, sealed)
        doc = json.loads(blob)
        payload = doc["payload"]
        fields = {name: payload[name] for name in _FIELDS}
        user_id, host = str(fields["user_id"]), str(fields["host"])
        pid, when = int(fields["pid"]), float(fields["time"])
        exclusive = fields["exclusive"] is True
    except (ValueError, KeyError, TypeError, RecursionError, FormatError,
            DecryptionError) as exc:  # RecursionError: JSON nested too deep
        when = modified if modified is not None else now
        return LockInfo(lock_id, key, "", "", 0, when, True, False,
                        stale_reason("", 0, when, now, stale_seconds),
                        f"does not parse: {type(exc).__name__}")
    authentic: bool | None = None
    detail = ""
    if trust is not None:
        public = trust.signer_key(user_id)
        try:
            if public is None:
                raise SignatureError(f"user {user_id!r} is not a member of the repository")
            signed.open_json(blob, _KIND, key, [public])
            authentic = True
        except (SignatureError, FormatError) as exc:
            authentic, detail = False, str(exc)
    return LockInfo(lock_id, key, user_id, host, pid, when, exclusive, authentic,
                     stale_reason(host, pid, when, now, stale_seconds), detail)


def list_locks(store: Store, repo: Repository, trust: Any = None, *,
               now: float | None = None, stale_seconds: float = STALE_SECONDS
               ) -> list[LockInfo]:
    """Every lock of the repository, oldest first. ``trust``: a
    logstate.RepositoryTrust, to check each lock's signature (None: not checked)."""
    now = time.time() if now is None else now
    found = []
    for key, _size, modified in list_with_times(store, locks_prefix(repo.repo_id)):
        try:
            info = _read(store, repo, key, modified, trust, now, stale_seconds)
        except ValueError:
            continue  # a foreign name under locks/
        if info is not None:
            found.append(info)
    return sorted(found, key=lambda i: (i.time, i.lock_id))


def remove_locks(store: Store, repo: Repository, *, remove_all: bool = False,
                 now: float | None = None, stale_seconds: float = STALE_SECONDS
                 ) -> list[LockInfo]:
    """Delete the stale locks (every lock with ``remove_all``); return those deleted."""
    removed = []
    for info in list_locks(store, repo, now=now, stale_seconds=stale_seconds):
        if info.stale or remove_all:
            store.delete(info.key)
            removed.append(info)
    return removed


# --- holding a lock ----------------------------------------------------------------------------


class RepositoryLock:
    """A lock held by this process: ``with RepositoryLock(...):`` or acquire()/release().

    Refreshed by a daemon thread every ``refresh_seconds``; a refresh that fails (store
    unreachable) is logged and tried again at the next interval: the holder keeps
    working, and the lock only becomes stale if refreshes fail for ``STALE_SECONDS``."""

    def __init__(self, store: Store, repo: Repository, identity: Identity, *,
                 exclusive: bool, refresh_seconds: float = REFRESH_SECONDS,
                 stale_seconds: float = STALE_SECONDS, trust: Any = None) -> None:
        self.store = store
        self.repo = repo
        self.repo_id = repo.repo_id
        self.identity = identity
        self.exclusive = exclusive
        self.refresh_seconds = refresh_seconds
        self.stale_seconds = stale_seconds
        self.trust = trust
        self.lock_id = layout.new_id()
        self.key = lock_key(repo.repo_id, self.lock_id)
        self.stale_seen: list[LockInfo] = []  # stale locks seen (ignored) when acquiring
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refreshes = 0

    def _write(self) -> None:
        doc = signed.sign_json(self.identity, _KIND, self.key,
                               _payload(self.identity, self.exclusive, time.time()))
        self.store.put(self.key, _seal(self.repo, self.lock_id, doc))

    def acquire(self) -> RepositoryLock:
        """Write the lock, then look for conflicting fresh locks (LockConflict, after
        withdrawing this one, when there is one)."""
        self._write()
        try:
            others = [i for i in list_locks(self.store, self.repo, self.trust,
                                            stale_seconds=self.stale_seconds)
                      if i.lock_id != self.lock_id]
        except BaseException:
            self._delete_quietly()
            raise
        self.stale_seen = [i for i in others if i.stale]
        for info in self.stale_seen:
            if info.host == this_host() and info.pid > 0 and not pid_alive(info.pid):
                self._delete_other(info)  # certainly dead: a killed run of this host
        blocking = [i for i in others if not i.stale and (self.exclusive or i.exclusive)]
        if blocking:
            self._delete_quietly()
            kind = "an exclusive" if self.exclusive else "a shared"
            names = "; ".join(i.line() for i in blocking)
            raise LockConflict(f"repository {self.repo_id!r} is locked, cannot take {kind} "
                               f"lock: {names}. Wait for it to finish; if its process is "
                               "gone, `radcrypt unlock` removes stale locks", blocking)
        self._thread = threading.Thread(target=self._refresh_loop, daemon=True,
                                        name=f"radcrypt-lock-{self.lock_id[:8]}")
        self._thread.start()
        return self

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            try:
                self._write()
                self.refreshes += 1
            except StoreError as exc:
                log.warning("could not refresh lock %s of repository %s: %s", self.lock_id,
                            self.repo_id, exc)

    def _delete_other(self, info: LockInfo) -> None:
        try:
            self.store.delete(info.key)
            log.info("removed the stale lock %s of process %d on this host (gone)",
                     info.lock_id, info.pid)
        except StoreError as exc:
            log.warning("could not remove the stale lock %s: %s", info.lock_id, exc)

    def _delete_quietly(self) -> None:
        try:
            self.store.delete(self.key)
        except StoreError as exc:
            log.warning("could not delete lock %s of repository %s: %s (it goes stale "
                        "by itself)", self.lock_id, self.repo_id, exc)

    def release(self) -> None:
        """Stop refreshing and delete the lock object."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._delete_quietly()

    def __enter__(self) -> RepositoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def shared(store: Store, repo: Repository, identity: Identity, **kwargs: Any
           ) -> RepositoryLock:
    """A shared lock (imports), not yet acquired: use it in a ``with``."""
    return RepositoryLock(store, repo, identity, exclusive=False, **kwargs)


def exclusive(store: Store, repo: Repository, identity: Identity, **kwargs: Any
              ) -> RepositoryLock:
    """An exclusive lock (gc, compaction), not yet acquired: use it in a ``with``."""
    return RepositoryLock(store, repo, identity, exclusive=True, **kwargs)


def iter_lock_lines(locks: list[LockInfo], now: float | None = None) -> Iterator[str]:
    """The text the CLI prints for a list of locks."""
    for info in locks:
        yield info.line(now)
