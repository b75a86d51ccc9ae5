"""A shard: the segments of each repository that its slot owns, and exact top-k over them.

A shard is the single-machine service's state (cloud/repo_index.py RepoIndex, refreshed
by cloud/service.py's rules) with one difference: of the live segments of the verified
log it loads only those its slot owns (assignment.py). It verifies the segment log itself
with the owner keys (it trusts the bucket no more than the single service does), loads its
segments from the store itself (credentials from its own node's environment: they never
travel through Ray), and answers with its head, its searched segment ids and its images,
so that the front can check that the shards agree and name the union it covered.
Keyword and combined queries run the single service's code (cloud/keyword_views.py) on
the shard's segments' dictionaries and the label objects naming them, CKKS requests
(issue 19) the single service's scorer (cloud/ckks_store.py) on the CKKS blocks of the
shard's segments (the front merges: cloud/cluster/ckks.py), which it loads in the
background once its segments are (``_warm_ckks``, for a repository whose manifest says
mode ckks; readiness does not wait on it, as it waits on no keyword dictionary);
``status`` tells the front's /readyz and /metrics what the shard has loaded (health.py).

``Shard`` is a plain class; front.py makes it a Ray actor (restarted by Ray when its
process dies: __init__ then runs again and reloads, in the background, the repositories
the guard remembers having been served, in the layout the guard says is current).

Resizing (cloud/cluster/resize.py): a shard holds one *layout* (a generation and a shard
count) per ShardState, each with its own index of the segments its slot owns in that
layout. While a resize is staged a shard holds two: the one the front still queries and
the next one, loading (``prepare``); every request names the layout it was sent under, so
an answer is always that of one whole layout; ``commit`` then drops the old one. A
layout older than the one committed is refused (the front re-reads the current one from
the guard), never answered from the wrong split.
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
from cloud.ckks_store import CkksRequest, CkksScorers
from cloud.cluster.assignment import owner, owns_key
from cloud.cluster.ckks import ckks_version
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


@dataclass
class ShardLayout:
    """What a shard holds for one layout: its segments' index, keyword views and CKKS
    scorers (their blocks loaded once, per repository key version), and (while staged by
    a resize) the shard count it moves from (``previous``)."""

    generation: int
    shards: int
    state: ShardState
    keyword_views: KeywordViews
    ckks: CkksScorers
    previous: int | None = None
    loading: threading.Thread | None = None


class Shard:
    """One shard replica: ``slot`` of ``shards`` (layout ``generation``); ``name`` is how
    errors name it."""

    def __init__(self, name: str, slot: int, shards: int,
                 store: StoreConfig | DirectoryConfig, owner_keys: Sequence[bytes],
                 refresh_interval: float, device: str = "cpu", threads: int | None = None,
                 guard: Any = None, cache_root: str | None = None,
                 generation: int = 0) -> None:
        from cloud.gpu.backend import searcher
        from cloud.search import ConcurrentSearches

        if threads is not None:
            cpus.set_threads(threads)
        self.name, self.slot = name, slot
        self.started = time.time()
        self._cache = Path(cache_root) / f"{name}-{os.getpid()}" if cache_root else None
        self._opened = open_store(worker_store_config(store))
        self._refresh_interval, self._owner_keys = refresh_interval, tuple(owner_keys)
        self._layouts: dict[int, ShardLayout] = {}
        self._layouts_lock = threading.Lock()
        self.generation, self.shards = generation, shards  # the committed layout
        self._layout(generation, shards)
        self._owned: dict[tuple[int, str], tuple[bytes, list[str], list[int], int]] = {}
        self.engine = searcher(device)
        self.threads = ConcurrentSearches()
        self._loading = threading.Thread(target=self._reload, args=(guard,), daemon=True,
                                         name="radcrypt-shard-reload")
        self._loading.start()

    # --- layouts -----------------------------------------------------------------------------

    @property
    def state(self) -> ShardState:
        """The committed layout's repositories."""
        return self._layouts[self.generation].state

    @property
    def keyword_views(self) -> KeywordViews:
        return self._layouts[self.generation].keyword_views

    def _layout(self, generation: int, shards: int) -> ShardLayout:
        """The layout ``generation`` (``shards`` shards), made empty when new (its
        repositories load on first use or by ``prepare``). ValueError when this slot is
        not in it, or it is older than the committed one, or it names another count."""
        with self._layouts_lock:
            known = self._layouts.get(generation)
            if known is not None:
                if known.shards != shards:
                    raise ValueError(f"layout {generation} has {known.shards} shards here, "
                                     f"not {shards}")
                return known
            if generation < self.generation:
                raise ValueError(f"layout {generation} is older than the committed layout "
                                 f"{self.generation} ({self.shards} shards)")
            if not 0 <= self.slot < shards:
                raise ValueError(f"slot {self.slot} is not in a layout of {shards} shards")
            slot = self.slot
            source = default_keyword_source(self._opened)
            state = ShardState(lambda key: owns_key(key, slot, shards), self._opened,
                               self._refresh_interval, None if self._cache is None
                               else self._cache / f"g{generation}", self._owner_keys,
                               getattr(source, "capture", None))
            made = ShardLayout(generation, shards, state, KeywordViews(source),
                               CkksScorers(self._opened))
            self._layouts[generation] = made
            return made

    def _reload(self, guard: Any) -> None:
        """After a (re)start: adopt the layout the guard says is current (Ray restarts an
        actor with the arguments it was first made with: its shard count may be an old
        one), then load the repositories the cluster has served so far, so that the next
        query finds this shard whole rather than waiting for the load."""
        if guard is None:
            return
        import ray

        try:
            current = ray.get(guard.layout.remote(), timeout=30)
        except Exception as exc:  # restarting (or older): the front's next request says
            log.warning("shard %s: current layout not read (%s)", self.name, exc)
            current = None
        try:
            repos = ray.get(guard.repos.remote(), timeout=30)
        except Exception as exc:  # the guard may be restarting: the first query loads
            log.warning("shard %s: repository list not read (%s)", self.name, exc)
            return
        if current is not None and current[0] > self.generation and self.slot < current[1]:
            try:
                self._layout(*current)
                self.commit(*current)
            except ValueError as exc:  # a resize moved on meanwhile: its prepare loads
                log.warning("shard %s: layout %s not adopted: %s", self.name, current, exc)
        lay = self._layouts[self.generation]
        self._load_all(lay, repos)
        self._warm_ckks(lay, repos)

    def _warm_ckks(self, lay: ShardLayout, repos: Sequence[str]) -> None:
        """Load the CKKS blocks this shard owns of every repository in ``repos`` whose
        manifest (verified with the owner keys) says mode ckks, for its current key
        version, after their segments are loaded (so in a background thread: /readyz never
        waits on it). Without it a big shard's first CKKS request loads them all and can
        pass the front's deadline (one 503). Only for the committed layout (at a restart,
        at a resize's commit): warming a staged one would hold every block twice during
        the resize. A failure leaves the blocks to the first request, as before."""
        for repo_id in repos:
            try:
                version = ckks_version(self._opened, repo_id, self._owner_keys)
                if version is None:
                    continue
                index = lay.state.repo(repo_id)
                seg_ids = list(index.snapshot.segment_ids.get(version, []))
                if not seg_ids:
                    continue
                started = time.perf_counter()
                held = lay.ckks.warm(repo_id, getattr(index, "_log", None), seg_ids, version)
                log.info("shard %s: %d CKKS blocks of %s (key version %d) loaded in %.1f s",
                         self.name, held, repo_id, version, time.perf_counter() - started)
            except Exception as exc:  # the first CKKS request loads them and reports it
                log.warning("shard %s: CKKS blocks of %s not loaded early: %s", self.name,
                            repo_id, exc)

    def ckks_warmed(self) -> dict[str, int]:
        """Per "repository/key version", the blocks loaded before any request (tests)."""
        lay = self._layouts[self.generation]
        return {f"{r}/{v}": n for (r, v), n in lay.ckks.warmed.items()}

    def _load_all(self, lay: ShardLayout, repos: Sequence[str]) -> None:
        for repo_id in repos:
            try:
                lay.state.repo(repo_id).refresh()
            except Exception as exc:  # a query will try again and report it
                log.error("shard %s: loading %s failed: %s", self.name, repo_id, exc)

    def prepare(self, generation: int, shards: int, repos: Sequence[str],
                previous: int | None = None) -> bool:
        """Stage the layout ``generation`` of ``shards`` shards: load, in the background,
        the segments this slot owns in it of every repository in ``repos``. Idempotent
        (the front repeats it until ``status`` says loaded: a restarted actor lost what it
        staged). True when the layout is staged or committed here."""
        try:
            lay = self._layout(generation, shards)
        except ValueError as exc:
            log.warning("shard %s: %s", self.name, exc)
            return False
        if previous is not None and lay.previous is None:
            lay.previous = previous
            self._owned = {k: v for k, v in self._owned.items() if k[0] != generation}
        with self._layouts_lock:
            if lay.loading is None or not lay.loading.is_alive():
                lay.loading = threading.Thread(target=self._load_all, args=(lay, list(repos)),
                                               daemon=True, name="radcrypt-shard-stage")
                lay.loading.start()
        return True

    def commit(self, generation: int, shards: int) -> None:
        """Make layout ``generation`` the committed one and drop every older layout (and
        a newer one abandoned): the front switched to it and its requests under the old
        layout have ended."""
        lay = self._layout(generation, shards)
        with self._layouts_lock:
            self.generation, self.shards = lay.generation, lay.shards
            dropped = [self._layouts.pop(g) for g in list(self._layouts) if g != generation]
            self._owned = {k: v for k, v in self._owned.items() if k[0] == generation}
        for old in dropped:  # their CKKS worker processes, if any were started
            old.ckks.close()
        if dropped:  # the new layout's blocks, now that the old ones are freed
            threading.Thread(target=self._warm_ckks,
                             args=(lay, [r for r, _ in lay.state.indexes()]), daemon=True,
                             name="radcrypt-shard-ckks-warm").start()

    def abort(self, generation: int) -> None:
        """Drop the staged layout ``generation`` (a resize that failed); the committed one
        stays."""
        with self._layouts_lock:
            dropped = (self._layouts.pop(generation, None)
                       if generation != self.generation else None)
        if dropped is not None:
            dropped.ckks.close()

    def _serving(self, layout: tuple[int, int] | None) -> ShardLayout:
        return self._layouts[self.generation] if layout is None else self._layout(*layout)

    def _current(self, repo_id: str, key_version: int, min_head: int,
                 layout: tuple[int, int] | None) -> tuple[ShardLayout, Snapshot] | ShardAnswer:
        """The layout asked for and its snapshot of ``key_version`` (searches and keyword
        queries alike), or the 503 that says why there is none."""
        try:
            lay = self._serving(layout)
        except ValueError as exc:
            return self._error(503, f"not serving that layout: {exc}", layout)
        try:
            return lay, lay.state.current(repo_id, key_version, min_head)
        except StoreError as exc:
            return self._error(503, f"object store unavailable: {exc}", layout)

    # --- what the front calls ------------------------------------------------------------

    def ping(self) -> tuple[str, int, float]:
        """(name, process id, start time): the front's liveness probe, the tests' target."""
        return self.name, os.getpid(), self.started

    def refresh(self, repo_id: str, min_head: int = 0,
                layout: tuple[int, int] | None = None) -> ShardAnswer:
        try:
            lay = self._serving(layout)
        except ValueError as exc:
            return self._error(503, f"not serving that layout: {exc}", layout)
        try:
            snap = lay.state.repo(repo_id).refresh(min_head=min_head)
        except StoreError as exc:
            return self._error(503, f"object store unavailable: {exc}", layout)
        return self._answer(lay, snap, None, [], [], 0.0)

    def search(self, repo_id: str, key_version: int, token: QueryToken, k: int,
               min_head: int = 0, layout: tuple[int, int] | None = None) -> ShardAnswer:
        """Exact top-k of this shard's rows of ``key_version`` for every query of the
        token, among the segments it owns in ``layout`` (generation, shards; None: the
        committed one)."""
        current = self._current(repo_id, key_version, min_head, layout)
        if isinstance(current, ShardAnswer):
            return current
        lay, snap = current
        version = snap.versions.get(key_version)
        queries = len(token)
        if version is None:
            empty = [{"vectors": 0, "level_scored": [], "full_scored": 0,
                      "milliseconds": 0.0, "batch": queries} for _ in range(queries)]
            return self._answer(lay, snap, key_version, [[] for _ in range(queries)], empty,
                                0.0)
        if token.widths != version.index.widths:
            return self._error(422, "token does not match this repository's key version",
                               layout)
        started = time.perf_counter()
        with self.threads.running():
            results = self.engine(version.index, token, k)
        elapsed = time.perf_counter() - started
        ids = version.image_ids
        hits = [[(ids[int(p)], float(s)) for p, s in zip(r.positions, r.scores, strict=True)]
                for r in results]
        return self._answer(lay, snap, key_version, hits,
                            [r.stats.as_dict() for r in results], elapsed, version.index.widths)

    def keywords(self, repo_id: str, key_version: int, query: TokenQuery,
                 token: QueryToken | None, k: int, min_head: int = 0,
                 layout: tuple[int, int] | None = None) -> ShardAnswer:
        """A keyword-only (``token`` None) or combined query over this shard's segments,
        with the single service's code (cloud/keyword_views.py): the tokens evaluated on
        each segment's dictionary and the labels naming it, then, combined, the exact
        top-k among the matching rows only."""
        current = self._current(repo_id, key_version, min_head, layout)
        if isinstance(current, ShardAnswer):
            return current
        lay, snap = current
        version = snap.versions.get(key_version)
        widths = version.index.widths if version is not None else None
        if token is not None and widths is not None and token.widths != widths:
            return self._error(422, "token does not match this repository's key version",
                               layout)
        try:
            # keyword-only: no hits here (k 0), the front takes the first k of the merge
            found = lay.keyword_views.match(lay.state.repo(repo_id), snap, key_version,
                                            query, token, 0 if token is None else k,
                                            self.threads)
        except StoreError as exc:
            return self._error(503, f"object store unavailable: {exc}", layout)
        except FormatError as exc:  # a label object that does not fit its segment
            return self._error(503, f"keyword dictionaries unreadable: {exc}", layout)
        seg_ids = list(found.found.segment_ids)
        if token is None:  # every segment's run, so that the front can interleave shards
            runs = {seg_id: ids_of[rows] for seg_id, ids_of, rows in found.found.parts}
            counts = tuple(len(runs[s]) if s in runs else 0 for s in seg_ids)
            ids = np.concatenate([runs[s] for s in seg_ids if s in runs]
                                 or [found.found.ids[:0]])
        else:
            counts, ids = (), found.matched_ids()
        return ShardAnswer(self.name, (self.slot, lay.shards), snap.head, snap.head_hash,
                           seg_ids, found.images, found.hits, found.stats, found.seconds,
                           snap.log_error, widths if token is not None else None,
                           rejected=dict(snap.rejected),
                           key_versions=tuple(sorted(snap.versions)), keywords=True,
                           found=ids, counts=counts)

    def ckks(self, repo_id: str, req: CkksRequest, min_head: int = 0,
             layout: tuple[int, int] | None = None) -> ShardAnswer:
        """The encrypted scores of the CKKS blocks of this shard's segments of
        ``req.key_version`` (issue 19), by the single service's scorer: the segments it
        could not score (unreadable, altered, without a block) are not in its answer, so
        the merged answer leaves them uncovered and the client names them. 422 as the
        single service (evaluation keys missing or not those the client authenticated,
        a query that is no CKKS query), 503 when the store is down."""
        current = self._current(repo_id, req.key_version, min_head, layout)
        if isinstance(current, ShardAnswer):
            return current
        lay, snap = current
        seg_ids = list(snap.segment_ids.get(req.key_version, []))
        index = lay.state.repo(repo_id)
        started = time.perf_counter()
        try:
            part = lay.ckks.answer(repo_id, getattr(index, "_log", None), seg_ids,
                                   snap.head, snap.head_hash, req)
        except FormatError as exc:
            return self._error(422, str(exc), layout)
        except StoreError as exc:
            return self._error(503, f"object store unavailable: {exc}", layout)
        return ShardAnswer(self.name, (self.slot, lay.shards), snap.head, snap.head_hash,
                           list(part.segment_ids), sum(part.counts), [], [],
                           time.perf_counter() - started, snap.log_error,
                           rejected=dict(snap.rejected),
                           key_versions=tuple(sorted(snap.versions)), ckks=part)

    def status(self, layout: tuple[int, int] | None = None) -> dict[str, Any]:
        """What the front's /readyz and /metrics report of this replica (and what a
        resize waits on, for the staged ``layout``): per repository it holds, the segments
        and rows loaded, when, the log head, the live segments it owns that are neither
        loaded nor rejected (``pending``), which slots own live segments at its head
        (``owners``; None before its log is verified) and, in a staged layout, how many
        of its segments it did not own in the layout before (``moved_in``). A layout it
        does not hold (lost in a restart) reports no repository."""
        with self._layouts_lock:
            lay = self._layouts.get(self.generation if layout is None else layout[0])
        if lay is None or (layout is not None and lay.shards != layout[1]):
            return {"name": self.name, "pid": os.getpid(), "started": self.started,
                    "layout": None, "repos": {}}
        repos: dict[str, dict[str, Any]] = {}
        for repo_id, index in lay.state.indexes():
            snap = index.snapshot
            loaded = {s for ids in snap.segment_ids.values() for s in ids}
            owners, owned, moved_in = self._ownership(lay, repo_id, index)
            done = loaded | {_segment_id(key) for key in snap.rejected}
            repos[repo_id] = {
                "loaded_at": snap.loaded_at, "head": snap.head, "segments": len(loaded),
                "images": snap.images, "rejected": len(snap.rejected),
                "owned": None if owned is None else len(owned),
                "pending": None if owned is None else len(set(owned) - done),
                "owners": owners, "moved_in": moved_in}
        return {"name": self.name, "pid": os.getpid(), "started": self.started,
                "layout": [lay.generation, lay.shards], "repos": repos}

    def _ownership(self, lay: ShardLayout, repo_id: str, index: ShardIndex
                   ) -> tuple[list[int] | None, list[str] | None, int | None]:
        """(slots owning live segments, the live segments this slot owns, how many of
        those another slot owned in the layout before) of the log the index verified
        last; (None, None, None) before one is (or for a format-1 repository). Kept per
        log head: a status probe costs no hashing while the log stands still."""
        state = getattr(index, "_log", None)
        if state is None:
            return None, None, None
        head = state.head.hash
        known = self._owned.get((lay.generation, repo_id))
        if known is None or known[0] != head:
            live = [obj.id for obj in state.segments()]
            slots = [owner(seg_id, lay.shards) for seg_id in live]
            mine = [s for s, slot in zip(live, slots, strict=True) if slot == self.slot]
            before = lay.previous
            moved = 0 if before is None else sum(
                self.slot >= before or owner(s, before) != self.slot for s in mine)
            known = (head, mine, sorted(set(slots)), moved)
            self._owned[lay.generation, repo_id] = known
        return known[2], known[1], (known[3] if lay.previous is not None else None)

    def _answer(self, lay: ShardLayout, snap: Snapshot, key_version: int | None,
                hits: list[Any], stats: list[dict[str, object]], elapsed: float,
                widths: tuple[int, ...] | None = None) -> ShardAnswer:
        if key_version is None:
            seg_ids = sorted({s for ids in snap.segment_ids.values() for s in ids})
            images = snap.images
        else:
            seg_ids = list(snap.segment_ids.get(key_version, []))
            version = snap.versions.get(key_version)
            images = len(version.image_ids) if version is not None else 0
        return ShardAnswer(self.name, (self.slot, lay.shards), snap.head, snap.head_hash,
                           seg_ids, images, hits, stats, elapsed, snap.log_error, widths,
                           rejected=dict(snap.rejected), key_versions=tuple(sorted(snap.versions)))

    def _error(self, status: int, detail: str,
               layout: tuple[int, int] | None = None) -> ShardAnswer:
        shards = self.shards if layout is None else layout[1]
        return ShardAnswer(self.name, (self.slot, shards), 0, b"\0" * 32, [], 0, [], [],
                           0.0, error=(status, detail))


def _segment_id(key: str) -> str:
    """The segment id of a rejected object's key (the key itself when it is not one)."""
    try:
        return layout.parse_segment_key(key)[1]
    except ValueError:
        return key
