"""Which segment files on local disk hold the rows of an index the search service serves,
so that on a GPU they load straight into device memory (cloud/gpu/loader.py) rather than
through the host's copy of the rows.

The service builds every snapshot as on the CPU (cloud/repo_index.py: which segments,
rejections, segment set, completeness); nothing here changes it. This module only
remembers, through the repository views' segment hook, the SHA-256 of every segment the
service accepted and the order it appended them in, which is its rows' order. An index
of a snapshot then has a source: the files of the snapshot's segments of that key
version, in that order, each with the SHA-256 the service verified (format 2: the log's),
and the image ids the snapshot holds for those rows. The loader compares each file with
that SHA-256, so a file changed on disk since the service loaded it (corrupted, or
another valid segment put in its place) is refused by name, and the caller compares the
ids, so the device rows are the snapshot's rows, position for position.

Files are on local disk only when the store is a directory store
(cloud/directory_store.py, one file per object); as that store, a path with a symbolic
link on the way is not used. With S3 there is no source, and the device copies the
host's rows as before (cloud/gpu/backend.py).
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from cloud import layout
from cloud.directory_store import DirectoryStore
from cloud.index_rows import raw_ids

log = logging.getLogger(__name__)

SegmentHook = Callable[[str, str, Any], None]  # (repo id, segment key, Segment)


class _Snapshots(Protocol):
    """What this module reads of a repository view (cloud/repo_index.py RepoIndex)."""

    @property
    def snapshot(self) -> Any: ...


@dataclass(frozen=True)
class Source:
    """The files of one served index, in its row order, with what they must hold."""

    repo_id: str
    key_version: int
    keys: list[str]
    paths: list[Path]
    sha256: list[bytes]
    ids: NDArray[np.void]  # the snapshot's image ids, in row order (16 bytes each)


class SegmentFiles:
    """Remembers the segments the service accepted; finds the files of a served index.

    ``repo(repo_id)`` returns the service's view of a repository (ServiceState.repo).
    Thread-safe: the hook runs on the loading threads, ``source`` on a search thread.
    One small entry (order, SHA-256) is kept per segment key ever accepted.
    """

    def __init__(self, store: object, repo: Callable[[str], _Snapshots]) -> None:
        self.root = store.root if isinstance(store, DirectoryStore) else None
        self._repo = repo
        self._seen: dict[str, dict[str, tuple[int, bytes]]] = {}
        self._order = itertools.count()
        self._lock = threading.Lock()

    def capture(self, repo_id: str, key: str, segment: Any) -> None:
        """The segment hook: called for each accepted segment, in the order its rows are
        appended (a rebuild appends them again: the later order wins)."""
        digest = getattr(segment, "sha256", None)
        if digest is None:
            return
        with self._lock:
            self._seen.setdefault(repo_id, {})[key] = (next(self._order), bytes(digest))

    def hook_then(self, other: SegmentHook | None) -> SegmentHook:
        """``capture``, then ``other`` (the keyword side's hook) when there is one."""
        if other is None:
            return self.capture

        def both(repo_id: str, key: str, segment: Any) -> None:
            self.capture(repo_id, key, segment)
            other(repo_id, key, segment)

        return both

    def source(self, index: object) -> Source | None:
        """The files of ``index`` (an EncryptedIndex of a current snapshot), or None
        when it is not a current snapshot's, the store has no local files, or a
        segment's file or SHA-256 is unknown (the reason is logged)."""
        if self.root is None:
            return None
        with self._lock:
            repos = list(self._seen)
        for repo_id in repos:
            snap = self._repo(repo_id).snapshot
            for version in snap.versions.values():
                if version.index is index:
                    return self._source(repo_id, snap, version)
        return None

    def _source(self, repo_id: str, snap: Any, version: Any) -> Source | None:
        seg_ids = snap.segment_ids.get(version.key_version, [])
        keys = [layout.segment_key(repo_id, seg_id) for seg_id in seg_ids]
        with self._lock:
            seen = dict(self._seen.get(repo_id, {}))
        unknown = [k for k in keys if k not in seen]
        if not keys or unknown:
            log.warning("repository %s key version %d: segment %s was not seen loading; "
                        "the device copies the service's rows", repo_id,
                        version.key_version, unknown[0] if unknown else "(none)")
            return None
        keys.sort(key=lambda k: seen[k][0])
        assert self.root is not None
        paths = [self.root.joinpath(*key.split("/")) for key in keys]
        for path in paths:
            reason = _not_a_plain_file(self.root, path)
            if reason is not None:
                log.error("segment file %s %s; the device copies the service's rows",
                          path, reason)
                return None
        return Source(repo_id, version.key_version, keys, paths,
                      [seen[k][1] for k in keys], raw_ids(version.image_ids))


def _not_a_plain_file(root: Path, path: Path) -> str | None:
    """Why ``path`` is not to be read: a symbolic link on the way from the store's root
    (the directory store never follows one), or not a regular file; None when it is."""
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except OSError as exc:
            return f"cannot be read ({exc.strerror or exc})"
        if stat.S_ISLNK(mode):
            return f"has a symbolic link on its way ({current})"
    return None if stat.S_ISREG(mode) else "is not a regular file"
