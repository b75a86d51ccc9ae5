"""The keyword side of a search service: per repository and key version a
cloud.keyword_index.KeywordView kept up to the snapshot a search reads, and the one
evaluation of a keyword request (keyword-only or combined) that both the single service
(cloud/service.py) and each shard of a cluster (cloud/cluster/shard.py) run.

Why a module of its own: a shard must answer a keyword query with exactly the single
service's code, and cloud/service.py imports the cluster package (``--ray-address``), so
the shard cannot import the service without an import cycle (tests/test_architecture.py).
``KeywordViews.match`` is what a query found in one snapshot (the images, the engine's
hits among them, the counts); ``KeywordViews.answer`` turns it into the single service's
protocol-2 answer, and a shard hands it to the cluster front, which merges the shards'
matches (cloud/cluster/merge.py) into the same answer.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloud import wire
from cloud.index_rows import raw_ids
from cloud.keyword_index import (
    IdLookup,
    KeywordAnswer,
    KeywordSource,
    KeywordView,
    TokenQuery,
)
from cloud.repo_index import RepoIndex, Snapshot
from cloud.search import (
    ConcurrentSearches,
    FirstLevelAhead,
    first_level_ahead,
    search_subset,
)
from crypto.tokens import QueryToken

Hits = list[tuple[str, float]]


def id_hits(ids: NDArray[np.void], k: int) -> list[Hits]:
    """A keyword-only answer's one list of hits: the first ``k`` image ids, score 0."""
    return [[(bytes(i).hex(), 0.0) for i in ids[:k]]]


@dataclass(frozen=True)
class KeywordMatch:
    """What a keyword query found in one snapshot, before it becomes an answer.

    ``found``: the images the tokens matched in the segments with a dictionary (in
    segment then row order, each once; ``found.segment_ids`` the segments searched by
    keyword). ``rows``: combined, the key version's rows the engine ranked among (None
    keyword-only); ``matched`` counts them, or the images found. ``hits``, ``stats``: per
    query (keyword-only: one list, the first k images). ``images``: rows of the segments
    searched (keyword-only) or of the key version (combined)."""

    found: KeywordAnswer
    rows: NDArray[np.int64] | None
    version: Any
    hits: list[Hits]
    stats: list[dict[str, object]]
    matched: int
    images: int
    seconds: float

    def matched_ids(self) -> NDArray[np.void]:
        """The images ``matched`` counts (so that a cluster front can count an image two
        shards hold once); made when asked: one service never needs them."""
        if self.rows is None:
            return self.found.ids
        if self.version is None:
            return self.found.ids[:0]
        return raw_ids(self.version.image_ids)[self.rows]


def combined_first_level(index: Any, token: QueryToken, query: TokenQuery
                         ) -> FirstLevelAhead | None:
    """A combined query's first level, started before its keyword lookup: it needs no
    subset, and runs on another core while the lookup runs on this one
    (cloud.search.first_level_ahead). Not for an AND: its answer is narrower than each
    keyword's, most often too narrow for the first level of every row, and its lookup,
    the longest, would share the memory's bandwidth with work thrown away (measured:
    17.0 -> 23.9 ms). The service and bench.keywords both start it here."""
    return first_level_ahead(index, token) if len(query.clauses) == 1 else None


class KeywordViews:
    """The keyword side of every repository served (issue 17): per repository and key
    version a cloud.keyword_index.KeywordView, brought up to the snapshot a search reads
    (new segments' dictionaries loaded once, label objects read again when the log head
    moved), and per snapshot version the id lookup that turns matched images into the
    engine's row subset. Holds no key: only the tokens of each request."""

    def __init__(self, source: KeywordSource) -> None:
        self.source = source
        self._views: dict[tuple[str, int], tuple[object, KeywordView]] = {}
        self._lookups: dict[tuple[str, int], tuple[object, IdLookup]] = {}
        self._lock = threading.Lock()

    def view(self, index: RepoIndex, snap: Snapshot, key_version: int) -> KeywordView:
        key = (index.repo_id, key_version)
        with self._lock:
            known = self._views.get(key)
            if known is not None and known[0] is snap:
                return known[1]
            view = known[1] if known is not None else KeywordView(index.repo_id, key_version)
        view.update(self.source, snap.segment_ids.get(key_version, []), index)
        with self._lock:
            self._views[key] = (snap, view)
        return view

    def lookup(self, repo_id: str, key_version: int, version: Any) -> IdLookup:
        key = (repo_id, key_version)
        with self._lock:
            known = self._lookups.get(key)
        if known is not None and known[0] is version:
            return known[1]
        built = IdLookup(raw_ids(version.image_ids))
        with self._lock:
            self._lookups[key] = (version, built)
        return built

    def match(self, index: RepoIndex, snap: Snapshot, key_version: int, query: TokenQuery,
              token: QueryToken | None, k: int, engine_threads: ConcurrentSearches
              ) -> KeywordMatch:
        """Evaluate ``query`` on the snapshot's segments of ``key_version``; with a
        ``token`` (combined), the exact top ``k`` of each query among the matching rows
        only (cloud.search.search_subset). The caller has checked the token's widths."""
        started = time.perf_counter()
        version = snap.versions.get(key_version)
        ahead = (combined_first_level(version.index, token, query)
                 if token is not None and version is not None else None)
        try:
            return self._match(index, snap, key_version, query, token, k, engine_threads,
                               version, ahead, started)
        finally:
            if ahead is not None:
                ahead.cancel()  # after a search it has finished: nothing left to stop

    def _match(self, index: RepoIndex, snap: Snapshot, key_version: int, query: TokenQuery,
               token: QueryToken | None, k: int, engine_threads: ConcurrentSearches,
               version: Any, ahead: FirstLevelAhead | None, started: float) -> KeywordMatch:
        found = self.view(index, snap, key_version).evaluate(query)
        queries = 1 if token is None else len(token)
        stats: list[dict[str, object]] = wire.empty_stats(queries)
        rows: NDArray[np.int64] | None = None
        if token is None:  # keyword-only: the first k image ids
            hits, matched, images = id_hits(found.first(k), k), found.matched, found.images
        elif version is None:
            hits, matched, images = [[] for _ in range(queries)], 0, 0
            rows = np.zeros(0, dtype=np.int64)
        else:
            rows = self.lookup(index.repo_id, key_version, version).answer_positions(found)
            with engine_threads.running():
                results = search_subset(version.index, token, k, rows, ahead)
            hits = [wire.hits_of(version.image_ids, r.positions, r.scores) for r in results]
            stats = [r.stats.as_dict() for r in results]
            matched, images = int(rows.size), len(version.image_ids)
        return KeywordMatch(found, rows, version, hits, stats, matched, images,
                            time.perf_counter() - started)

    def answer(self, index: RepoIndex, snap: Snapshot, req: wire.SearchRequestV2,
               query: TokenQuery, engine_threads: ConcurrentSearches
               ) -> tuple[wire.SearchAnswerV2, float]:
        """A keyword-only or combined search's answer and the seconds it took. The
        segments it names are those searched by keyword (the ones with a dictionary):
        a segment without one makes the answer incomplete, never silently partial."""
        found = self.match(index, snap, req.key_version, query, req.token, req.k,
                           engine_threads)
        seg_ids = found.found.segment_ids
        return wire.SearchAnswerV2(
            key_version=req.key_version, k=req.k, segments=len(seg_ids), images=found.images,
            head_sequence=snap.head, head_hash=snap.head_hash,
            set_digest=wire.segment_set_digest(index.repo_id, req.key_version, seg_ids),
            engine_us=round(found.seconds * 1e6), hits=found.hits,
            stats=found.stats if req.flags & wire.FLAG_STATS else None,
            segment_ids=list(seg_ids) if req.flags & wire.FLAG_LIST_SEGMENTS else None,
            matched=found.matched), found.seconds
