"""A shard: the segments of each repository that its slot owns, and exact top-k over them.

A shard is the single-machine service's state (cloud/repo_index.py RepoIndex, refreshed
by cloud/service.py's rules) with one difference: of the live segments of the verified
log it loads only those its slot owns (assignment.py). It verifies the segment log itself
with the owner keys (it trusts the bucket no more than the single service does), loads its
segments from the store itself (credentials from its own node's environment: they never
travel through Ray), and answers with its head, its searched segment ids and its images,
so that the front can check that the shards agree and name the union it covered.
Keyword and combined queries run the single service's code (cloud/keyword_views.py) on
the shard's segments' dictionaries and the label objects naming them; ``status`` tells
the front's /readyz and /metrics what the shard has loaded (health.py).

``Shard`` is a plain class; front.py makes it a Ray actor (restarted by Ray when its
process dies: __init__ then runs again and reloads, in the background, the repositories
the guard remembers having been served).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cloud import cpus, layout
from cloud.backend import DirectoryConfig, Store, StoreError
from cloud.cluster.assignment import owner, owns_key
from cloud.cluster.merge import ShardAnswer
from cloud.keyword_index import TokenQuery
from cloud.keyword_store import default_keyword_source
from cloud.keyword_views import KeywordViews
from cloud.repo_index import RepoIndex, Snapshot
from cloud.store import StoreConfig
from cloud.stores import open_store
from crypto.errors import FormatError
from crypto.tokens import QueryToken

log = logging.getLogger("radcrypt.cluster.shard")
HEAD_RETRY_SECONDS = 1.0  # as cloud/service.py


@dataclass
class ShardIndex(RepoIndex):
    """A RepoIndex that serves only the live segments ``owns`` accepts (by object key)."""

    owns: Callable[[str], bool] = field(default=lambda key: True)

    def _target(self) -> Any:
        target = super()._target()
        mine = self.owns
        return replace(
            target,
            sizes={k: v for k, v in target.sizes.items() if mine(k)},
            expected=None if target.expected is None
            else {k: v for k, v in target.expected.items() if mine(k)},
            missing={k: v for k, v in target.missing.items() if mine(k)},
            versions={k: v for k, v in target.versions.items() if mine(k)})


class ShardState:
    """The repositories of one shard, each a ShardIndex loaded on first use, and when a
    snapshot is to be re-read: the single service's rules (cloud/service.py ServiceState,
    not imported: the service imports this package), older than the refresh interval, a
    key version not seen yet (at most once a second), or a ``min_head`` beyond the
    snapshot (a head that cannot be reached is tried again at most once a second)."""

    def __init__(self, owns: Callable[[str], bool], store: Store, refresh_interval: float,
                 cache_dir: Path | None, owner_keys: Sequence[bytes],
                 segment_hook: Callable[[str, str, Any], None] | None = None) -> None:
        self.owns, self.store, self.refresh_interval = owns, store, refresh_interval
        self.cache_dir, self.owner_keys = cache_dir, tuple(owner_keys)
        self.segment_hook = segment_hook  # the keyword side keeps each segment's dictionary
        self._repos: dict[str, ShardIndex] = {}
        self._unreached: dict[str, float] = {}
        self._lock = threading.Lock()

    def repo(self, repo_id: str) -> ShardIndex:
        with self._lock:
            if repo_id not in self._repos:
                index = ShardIndex(self.store, repo_id, self.cache_dir,
                                   owner_keys=self.owner_keys, owns=self.owns)
                hook = self.segment_hook
                if hook is not None:
                    index.on_segment = lambda key, segment: hook(repo_id, key, segment)
                self._repos[repo_id] = index
            return self._repos[repo_id]

    def indexes(self) -> list[tuple[str, ShardIndex]]:
        with self._lock:
            return sorted(self._repos.items())

    def current(self, repo_id: str, key_version: int, min_head: int = 0) -> Snapshot:
        index = self.repo(repo_id)
        snap = index.snapshot
        if min_head > snap.head:
            with self._lock:
                tried = self._unreached.get(repo_id)
            if tried is None or time.monotonic() - tried > HEAD_RETRY_SECONDS:
                snap = index.refresh(min_head=min_head)
                if snap.head < min_head:
                    with self._lock:
                        self._unreached[repo_id] = time.monotonic()
                return snap
        age = time.time() - snap.loaded_at
        if (not snap.loaded_at or age > self.refresh_interval
                or (key_version not in snap.versions and age > 1.0)):
            return index.refresh()
        return snap


def worker_store_config(config: StoreConfig | DirectoryConfig) -> StoreConfig | DirectoryConfig:
    """The store as the front described it (no secret), with the credentials of this
    node's environment (RADCRYPT_S3_ACCESS_KEY / RADCRYPT_S3_SECRET_KEY, else boto3's
    chain: AWS_* variables, instance or pod roles)."""
    if isinstance(config, DirectoryConfig):
        return config
    env = os.environ
    return replace(config, access_key=env.get("RADCRYPT_S3_ACCESS_KEY") or None,
                   secret_key=env.get("RADCRYPT_S3_SECRET_KEY") or None)


class Shard:
    """One shard replica: ``slot`` of ``shards``; ``name`` is how errors name it."""

    def __init__(self, name: str, slot: int, shards: int,
                 store: StoreConfig | DirectoryConfig, owner_keys: Sequence[bytes],
                 refresh_interval: float, device: str = "cpu", threads: int | None = None,
                 guard: Any = None, cache_root: str | None = None) -> None:
        from cloud.gpu.backend import searcher
        from cloud.search import ConcurrentSearches

        if threads is not None:
            cpus.set_threads(threads)
        self.name, self.slot, self.shards = name, slot, shards
        self.started = time.time()
        cache = Path(cache_root) / f"{name}-{os.getpid()}" if cache_root else None
        opened = open_store(worker_store_config(store))
        source = default_keyword_source(opened)
        self.state = ShardState(self._owns, opened, refresh_interval, cache, owner_keys,
                                getattr(source, "capture", None))
        self.keyword_views = KeywordViews(source)
        self._owned: dict[str, tuple[bytes, list[str], list[int]]] = {}
        self.engine = searcher(device)
        self.threads = ConcurrentSearches()
        self._loading = threading.Thread(target=self._reload, args=(guard,), daemon=True,
                                         name="radcrypt-shard-reload")
        self._loading.start()

    def _owns(self, key: str) -> bool:
        return owns_key(key, self.slot, self.shards)

    def _reload(self, guard: Any) -> None:
        """After a (re)start: load the repositories the cluster has served so far, so that
        the next query finds this shard whole rather than waiting for the load."""
        if guard is None:
            return
        try:
            import ray

            repos = ray.get(guard.repos.remote(), timeout=30)
        except Exception as exc:  # the guard may be restarting: the first query loads
            log.warning("shard %s: repository list not read (%s)", self.name, exc)
            return
        for repo_id in repos:
            try:
                self.state.repo(repo_id).refresh()
            except Exception as exc:  # a query will try again and report it
                log.error("shard %s: loading %s failed: %s", self.name, repo_id, exc)

    # --- what the front calls ------------------------------------------------------------

    def ping(self) -> tuple[str, int, float]:
        """(name, process id, start time): the front's liveness probe, the tests' target."""
        return self.name, os.getpid(), self.started

    def refresh(self, repo_id: str, min_head: int = 0) -> ShardAnswer:
        try:
            snap = self.state.repo(repo_id).refresh(min_head=min_head)
        except StoreError as exc:
            return self._error(503, f"object store unavailable: {exc}")
        return self._answer(snap, None, [], [], 0.0)

    def search(self, repo_id: str, key_version: int, token: QueryToken, k: int,
               min_head: int = 0) -> ShardAnswer:
        """Exact top-k of this shard's rows of ``key_version`` for every query of the token."""
        try:
            snap = self.state.current(repo_id, key_version, min_head)
        except StoreError as exc:
            return self._error(503, f"object store unavailable: {exc}")
        version = snap.versions.get(key_version)
        queries = len(token)
        if version is None:
            empty = [{"vectors": 0, "level_scored": [], "full_scored": 0,
                      "milliseconds": 0.0, "batch": queries} for _ in range(queries)]
            return self._answer(snap, key_version, [[] for _ in range(queries)], empty, 0.0)
        if token.widths != version.index.widths:
            return self._error(422, "token does not match this repository's key version")
        started = time.perf_counter()
        with self.threads.running():
            results = self.engine(version.index, token, k)
        elapsed = time.perf_counter() - started
        ids = version.image_ids
        hits = [[(ids[int(p)], float(s)) for p, s in zip(r.positions, r.scores, strict=True)]
                for r in results]
        return self._answer(snap, key_version, hits, [r.stats.as_dict() for r in results],
                            elapsed, version.index.widths)

    def keywords(self, repo_id: str, key_version: int, query: TokenQuery,
                 token: QueryToken | None, k: int, min_head: int = 0) -> ShardAnswer:
        """A keyword-only (``token`` None) or combined query over this shard's segments,
        with the single service's code (cloud/keyword_views.py): the tokens evaluated on
        each segment's dictionary and the labels naming it, then, combined, the exact
        top-k among the matching rows only."""
        try:
            snap = self.state.current(repo_id, key_version, min_head)
        except StoreError as exc:
            return self._error(503, f"object store unavailable: {exc}")
        version = snap.versions.get(key_version)
        widths = version.index.widths if version is not None else None
        if token is not None and widths is not None and token.widths != widths:
            return self._error(422, "token does not match this repository's key version")
        try:
            # keyword-only: no hits here (k 0), the front takes the first k of the merge
            found = self.keyword_views.match(self.state.repo(repo_id), snap, key_version,
                                             query, token, 0 if token is None else k,
                                             self.threads)
        except StoreError as exc:
            return self._error(503, f"object store unavailable: {exc}")
        except FormatError as exc:  # a label object that does not fit its segment
            return self._error(503, f"keyword dictionaries unreadable: {exc}")
        seg_ids = list(found.found.segment_ids)
        if token is None:  # every segment's run, so that the front can interleave shards
            runs = {seg_id: ids_of[rows] for seg_id, ids_of, rows in found.found.parts}
            counts = tuple(len(runs[s]) if s in runs else 0 for s in seg_ids)
            ids = np.concatenate([runs[s] for s in seg_ids if s in runs]
                                 or [found.found.ids[:0]])
        else:
            counts, ids = (), found.matched_ids()
        return ShardAnswer(self.name, (self.slot, self.shards), snap.head, snap.head_hash,
                           seg_ids, found.images, found.hits, found.stats, found.seconds,
                           snap.log_error, widths if token is not None else None,
                           rejected=dict(snap.rejected),
                           key_versions=tuple(sorted(snap.versions)), keywords=True,
                           found=ids, counts=counts)

    def status(self) -> dict[str, Any]:
        """What the front's /readyz and /metrics report of this replica: per repository
        it holds, the segments and rows loaded, when, the log head, the live segments it
        owns that are neither loaded nor rejected (``pending``), and which slots own live
        segments at its head (``owners``; None before its log is verified)."""
        repos: dict[str, dict[str, Any]] = {}
        for repo_id, index in self.state.indexes():
            snap = index.snapshot
            loaded = {s for ids in snap.segment_ids.values() for s in ids}
            owners, owned = self._ownership(repo_id, index)
            done = loaded | {_segment_id(key) for key in snap.rejected}
            repos[repo_id] = {
                "loaded_at": snap.loaded_at, "head": snap.head, "segments": len(loaded),
                "images": snap.images, "rejected": len(snap.rejected),
                "owned": None if owned is None else len(owned),
                "pending": None if owned is None else len(set(owned) - done),
                "owners": owners}
        return {"name": self.name, "pid": os.getpid(), "started": self.started,
                "repos": repos}

    def _ownership(self, repo_id: str, index: ShardIndex
                   ) -> tuple[list[int] | None, list[str] | None]:
        """(slots owning live segments, the live segments this slot owns) of the log the
        index verified last; (None, None) before one is (or for a format-1 repository).
        Kept per log head: a status probe costs no hashing while the log stands still."""
        state = getattr(index, "_log", None)
        if state is None:
            return None, None
        head = state.head.hash
        known = self._owned.get(repo_id)
        if known is None or known[0] != head:
            live = [obj.id for obj in state.segments()]
            slots = [owner(seg_id, self.shards) for seg_id in live]
            known = (head, [s for s, slot in zip(live, slots, strict=True) if slot == self.slot],
                     sorted(set(slots)))
            self._owned[repo_id] = known
        return known[2], known[1]

    def _answer(self, snap: Snapshot, key_version: int | None, hits: list[Any],
                stats: list[dict[str, object]], elapsed: float,
                widths: tuple[int, ...] | None = None) -> ShardAnswer:
        if key_version is None:
            seg_ids = sorted({s for ids in snap.segment_ids.values() for s in ids})
            images = snap.images
        else:
            seg_ids = list(snap.segment_ids.get(key_version, []))
            version = snap.versions.get(key_version)
            images = len(version.image_ids) if version is not None else 0
        return ShardAnswer(self.name, (self.slot, self.shards), snap.head, snap.head_hash,
                           seg_ids, images, hits, stats, elapsed, snap.log_error, widths,
                           rejected=dict(snap.rejected), key_versions=tuple(sorted(snap.versions)))

    def _error(self, status: int, detail: str) -> ShardAnswer:
        return ShardAnswer(self.name, (self.slot, self.shards), 0, b"\0" * 32, [], 0, [], [],
                           0.0, error=(status, detail))


def _segment_id(key: str) -> str:
    """The segment id of a rejected object's key (the key itself when it is not one)."""
    try:
        return layout.parse_segment_key(key)[1]
    except ValueError:
        return key
