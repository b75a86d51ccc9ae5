"""The one store interface (restic's backend idea): what every object store offers.

Two implementations: ``cloud.store.ObjectStore`` (S3: AWS, SeaweedFS, MinIO, moto) and
``cloud.directory_store.DirectoryStore`` (files under a local directory). Everything above
the stores (importer, searcher, access, the service's segment loader) is written against
``Store`` and sees bytes, keys and the exceptions below; nothing above sees botocore or
OSError. ``tests/test_store.py`` is the behaviour every backend must show.

Semantics shared by both (S3's):

* keys are strings with '/' separators; a prefix is a plain string prefix ("a/b" lists
  "a/b/c", "a/b-x" and "a/bc");
* ``put`` replaces atomically: a reader sees the old object or the new one, never a part;
  ``put(..., if_absent=True)`` raises ObjectExists instead of replacing (atomic on the
  directory store and on servers that honour If-None-Match);
* listing is in key order (byte order of the UTF-8 keys);
* ``get_range`` past the end returns fewer bytes (or b""), never an error;
* deleting a missing key is not an error.

``cloud.stores.open_store(config)`` makes the store a configuration describes: a
``StoreConfig`` (S3) or a ``DirectoryConfig`` (a directory); both pickle, so a child
process can reopen the store its parent uses. This module imports no backend, so the
backends import it without a cycle.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

# --- errors (one family for every backend) ------------------------------------------------


class StoreError(Exception):
    """Any failure of the object store; ``code`` is the S3 error code when there was one
    (for the directory store: the errno name, e.g. "ENOSPC")."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class ObjectNotFound(StoreError):
    """The key does not exist."""


class ObjectExists(StoreError):
    """A conditional create found the key already present."""


class StoreUnavailable(StoreError):
    """The store cannot be used at all: unreachable, timed out, credentials refused,
    directory not readable."""


class BucketNotFound(StoreUnavailable):
    """The endpoint answers but the bucket (directory store: the root directory) does not
    exist (ensure_bucket creates it)."""


# --- the interface ------------------------------------------------------------------------


@runtime_checkable
class Store(Protocol):
    """Bytes in, bytes out, under keys; see the module docstring for the semantics."""

    def ping(self) -> None:
        """Check quickly that the store can be used; StoreUnavailable (BucketNotFound when
        only the bucket or root directory is missing) if not."""
        ...

    def ensure_bucket(self) -> None:
        """Create the bucket (root directory) when it is missing."""
        ...

    def put(self, key: str, data: bytes | bytearray | memoryview, *,
            if_absent: bool = False) -> None:
        """Store ``data`` under ``key``; with ``if_absent`` raise ObjectExists instead of
        replacing."""
        ...

    def put_file(self, key: str, path: str | Path) -> None:
        """Store a file's content, read piece by piece (never whole in memory)."""
        ...

    def put_stream(self, key: str, fileobj: IO[bytes]) -> None:
        """Store what a readable binary stream yields until it ends."""
        ...

    def get(self, key: str) -> bytes:
        """The whole object (ObjectNotFound if missing)."""
        ...

    def iter_chunks(self, key: str, chunk_size: int = ...) -> Iterator[bytes]:
        """The object in chunks of at most ``chunk_size`` bytes; ObjectNotFound is raised
        by this call, not by the first ``next()``."""
        ...

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from offset ``start``; fewer (or b"") past the end."""
        ...

    def size(self, key: str) -> int | None:
        """Size in bytes, or None when the key does not exist."""
        ...

    def exists(self, key: str) -> bool:
        """Whether the key exists."""
        ...

    def list_objects(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object whose key starts with ``prefix``, in key order."""
        ...

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Every key that starts with ``prefix``, in key order."""
        ...

    def delete(self, key: str) -> None:
        """Delete one object; a missing key is not an error."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under a non-empty ``prefix``; return how many."""
        ...


@runtime_checkable
class TimedStore(Protocol):
    """What both stores also offer (issue 14): objects' last-modified times, for the ages
    of orphans (``radcrypt check``) and gc's grace period. Kept out of ``Store`` so that
    wrappers and test doubles written against ``Store`` keep working; callers go through
    ``list_with_times`` and ``modified_time``, which fall back to "age unknown"."""

    def list_objects_with_times(self, prefix: str
                                ) -> Iterator[tuple[str, int, float | None]]:
        """(key, size, last-modified Unix time or None) under ``prefix``, in key order."""
        ...

    def modified(self, key: str) -> float | None:
        """The object's last-modified Unix time; None when it does not exist."""
        ...


def stored_after_conflict(store: Store, key: str, attempts: int = 8,
                          wait: float = 0.25) -> bytes | None:
    """The bytes under ``key`` after a conditional create answered "exists"; None when
    nothing appears there.

    A lost answer makes the store's retry of a create meet the first attempt (412). The
    first attempt may still be in flight on the server then (SeaweedFS answers 412 for a
    key being written and 404 to a read until the write completes: seen through the
    fault proxy, tests/test_fault_import.py), so a read that finds nothing is repeated
    for about two seconds before the object counts as absent."""
    for attempt in range(attempts):
        try:
            return store.get(key)
        except ObjectNotFound:
            if attempt + 1 < attempts:
                time.sleep(wait)
    return None


def list_with_times(store: object, prefix: str) -> Iterator[tuple[str, int, float | None]]:
    """(key, size, last-modified time) of the objects under ``prefix``; the time is None
    for a store that cannot tell (an unknown age: gc must treat the object as young)."""
    timed = getattr(store, "list_objects_with_times", None)
    if timed is not None:
        yield from timed(prefix)
        return
    for key, size in store.list_objects(prefix):  # type: ignore[attr-defined]
        yield key, size, None


def modified_time(store: object, key: str) -> float | None:
    """The object's last-modified time, None when unknown or missing."""
    modified = getattr(store, "modified", None)
    if modified is None:
        return None
    when: float | None = modified(key)
    return when


# --- configurations -----------------------------------------------------------------------


@dataclass(frozen=True)
class DirectoryConfig:
    """Where a DirectoryStore keeps its objects: one file per object under ``root``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().absolute())

    def describe(self) -> str:
        return f"directory store at {self.root}"

    # Read-only, for code that shows where a session stores (GUI status line, CLI
    # diagnostics) and was written for StoreConfig: a file URL and no bucket.
    @property
    def endpoint_url(self) -> str:
        return self.root.as_uri()

    @property
    def bucket(self) -> str:
        return ""
