"""Search by image: features and token here, the match on the server, names here again.

The server answers with image ids only (wire protocol 2, for every repository). The
client then fetches each hit's encrypted metadata (per-image objects in format 1, pack
entries in format 2: app.core.packs.ImageReader), decrypts it, and recomputes the true
distance from the stored features, so what the radiologist sees (name, distance) never
came from the server in clear, and a server that returned hits out of order would be
noticed (``order_verified``).

Format 2 adds completeness (docs/FORMAT-2.md 6.3): the answer names the log head
and the digest of the segments the service searched; the client compares them with the
log it verified itself and fails an answer that left segments out (IncompleteAnswer), or,
when the caller allows it, returns it marked (``QueryResult.complete`` False). A format-1
repository has no log: ``complete`` is None, "completeness not verifiable (format 1)".

Grouping (issue 15): neighbouring slices of one series are near-identical, so an ungrouped
top-k is often k slices of one series. With ``group`` the hits of one series collapse into
a ``HitGroup`` (the best slice, the others attached) and the engine is asked for more hits
(up to MAX_K) until the answer names k different series or the archive has no more; the
ungrouped top-k stays in ``QueryResult.hits``, exact as before. The service answers at most
MAX_K hits per query, so a series of more than MAX_K near-identical slices can still hide
the next series: the answer then has fewer than k groups (``QueryResult.asked`` says how
many hits were looked at).
"""

from __future__ import annotations

import itertools
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.core import basis
from app.core.errors import IncompleteAnswer, IntegrityError, RadcryptError, ServiceError
from app.core.meta import ImageMeta
from app.core.repository import Repository, is_format2
from app.core.session import Session
from app.core.studies import instance_label, series_key
from app.imaging.worker import DecoderPool, DecoderUnavailable
from cloud.backend import Store
from cloud.limits import MAX_K, MAX_QUERIES

if TYPE_CHECKING:
    from app.core.keywords import Query
    from app.core.packs import ImageReader
    from cloud.seglog import LogState, Verdict

Where = Any
"""A keyword filter: app.core.keywords.Query, or terms it parses (str or list of str)."""

ORDER_RTOL = 1e-9
NOT_VERIFIABLE = "completeness not verifiable (format 1)"


@dataclass
class Hit:
    rank: int
    image_id: str
    name: str
    distance: float
    score: float
    key_version: int
    meta: dict[str, Any] = field(repr=False, default_factory=dict)
    series_key: str = ""  # app/core/studies.py series_key of the hit's image
    group: int = 0  # rank of the hit's series among the grouped results; 0: not grouped

    @property
    def image(self) -> ImageMeta:
        """The decrypted metadata the hit carries, typed (instance, frame, clinical)."""
        return ImageMeta.from_record(self.image_id, self.meta, self.key_version)

    def as_dict(self) -> dict[str, Any]:
        image = self.image
        return {"image_id": self.image_id, "name": self.name, "distance": self.distance,
                "rank": self.rank, "series": self.series_key, "group": self.group,
                "instance": image.attribute("InstanceNumber"), "frame": image.frame,
                "frames": image.frames, "original_id": image.original_image_id}


@dataclass
class HitGroup:
    """The hits of one series in one answer: the best one is shown, the others are
    attached to it ("3 more from this series")."""

    rank: int  # 1 = the series of the nearest hit
    series_key: str
    best: Hit
    others: list[Hit] = field(default_factory=list)

    @property
    def more(self) -> int:
        return len(self.others)

    @property
    def hits(self) -> list[Hit]:
        return [self.best, *self.others]

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "series": self.series_key, "best": self.best.as_dict(),
                "more": self.more, "others": [h.image_id for h in self.others]}


@dataclass
class QueryResult:
    query: str
    hits: list[Hit]
    stats: dict[str, Any]
    timings_ms: dict[str, float]
    order_verified: bool
    # Completeness (FORMAT-2 6.3): True, False (only when the caller allowed an incomplete
    # answer), None for a format-1 repository (no log to compare with).
    complete: bool | None = None
    segments_expected: int | None = None  # live segments of the key version (format 2)
    segments_searched: int | None = None  # segments the service says it searched
    segments_missing: list[str] = field(default_factory=list)  # live ids not searched
    # Grouped by series (``group=True``): at most k groups, nearest series first; ``hits``
    # stays the ungrouped top-k. ``asked``: how many hits the engine was asked for.
    grouped: bool = False
    groups: list[HitGroup] = field(default_factory=list)
    asked: int = 0

    @property
    def completeness(self) -> str:
        """The verdict in words, for a status line."""
        if self.complete is None:
            return NOT_VERIFIABLE
        if self.complete:
            return f"complete: all {self.segments_expected:,} segments were searched"
        return (f"INCOMPLETE ANSWER: {len(self.segments_missing):,} of "
                f"{self.segments_expected:,} segments were not searched")

    def as_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "results": [h.as_dict() for h in self.hits],
            "grouped": self.grouped,
            "groups": [g.as_dict() for g in self.groups],
            "stats": {**self.stats, "timings_ms": self.timings_ms,
                      "order_verified": self.order_verified},
            "complete": self.complete,
            "segments_expected": self.segments_expected,
            "segments_searched": self.segments_searched,
            "segments_missing": list(self.segments_missing),
        }


def read_meta(store: Store, repo: Repository, image_id: str,
              version: int | None = None) -> tuple[dict[str, Any], int]:
    """Decrypted metadata of one image of a format-1 repository (its own ``meta``
    object, features inside) and the key version that opened it."""
    from app.core.packs import ImageReader

    return ImageReader(store, repo, None).meta(image_id, version)


def features_of_files(repo: Repository, paths: list[Path], *,
                      memory_limit: int | None = None) -> np.ndarray:
    """Feature vectors of query files, decoded in memory-limited child processes (never in
    this process, which holds the keys: app/imaging/worker.py). A file that cannot be read
    raises ImageDecodeError naming it."""
    if not paths:
        return np.zeros((0, 0), dtype=np.float64)
    extractor = repo.manifest.extractor
    try:
        pool = DecoderPool(min(len(paths), 2), memory_limit=memory_limit)
    except DecoderUnavailable as exc:
        raise RadcryptError(f"cannot decode images here: {exc}") from exc
    with pool:
        if len(paths) == 1:
            return pool.features(paths[0], extractor)[None, :]
        with ThreadPoolExecutor(pool.size, thread_name_prefix="radcrypt-query") as threads:
            return np.stack(list(threads.map(lambda p: pool.features(p, extractor), paths)))


def search_files(session: Session, repo: Repository, paths: list[str | Path], k: int = 1,
                 *, allow_incomplete: bool = False, where: Where = None) -> list[QueryResult]:
    """Nearest archived images of each query file (among those matching ``where``)."""
    start = time.perf_counter()
    files = [Path(p) for p in paths]
    features = features_of_files(repo, files)
    features_ms = (time.perf_counter() - start) * 1000 / max(1, len(files))
    results = search_features(session, repo, features, [str(p) for p in files], k,
                              allow_incomplete=allow_incomplete, where=where)
    for result in results:
        result.timings_ms["features"] = features_ms
    return results


def search_features(session: Session, repo: Repository, features: np.ndarray,
                    labels: list[str], k: int = 1, *, allow_incomplete: bool = False,
                    group: bool = False, where: Where = None) -> list[QueryResult]:
    """Nearest archived images of each feature vector (one encrypted request for all).

    Format 2: an answer that left out live segments raises IncompleteAnswer, unless
    ``allow_incomplete``: then its results come back marked (``complete`` False).
    ``group``: also the k nearest series (``QueryResult.groups``), see the module's
    docstring. ``where``: a keyword filter (issue 17): the engine ranks only the images
    it matches, exactly (their tokens travel in the same request); every hit is checked
    against it here after decryption."""
    ckks_mode = repo.manifest.search == "ckks"  # issue 19: app/core/ckks_search.py
    if repo.manifest.search != "sknn" and not ckks_mode:  # issue 19: not the service's to search
        raise RadcryptError(f"repository {repo.repo_id!r} is in search mode "
                            f"{repo.manifest.search!r}: it is searched on the workstation "
                            "(Client.search_features runs app/core/workstation.py), not by "
                            "the search service")
    if not 1 <= k <= MAX_K:
        raise RadcryptError(f"k must be between 1 and {MAX_K}")
    query = as_query(where)
    queries = np.atleast_2d(np.asarray(features, dtype=np.float64))
    results: list[QueryResult] = []
    for start in range(0, len(queries), MAX_QUERIES):  # the most the service takes at once
        chunk = queries[start : start + MAX_QUERIES]
        if ckks_mode:
            from app.core.ckks_search import search_chunk

            results += search_chunk(sys.modules[__name__], session, repo, chunk,
                                    labels[start : start + MAX_QUERIES], k, allow_incomplete,
                                    query)
            continue
        results += _search_chunk(session, repo, chunk, labels[start : start + MAX_QUERIES], k,
                                 allow_incomplete, query)
    for result in results:
        result.asked = k
    if group:
        _group(session, repo, queries, labels, k, allow_incomplete, results, query)
    return results


def as_query(where: Where) -> Query | None:
    """A keyword filter as a parsed query (QueryError names a bad term), None for none."""
    if where is None or (not isinstance(where, str) and hasattr(where, "clauses")):
        return where
    if isinstance(where, str) and not where.strip():
        return None
    if not isinstance(where, str) and not list(where):
        return None
    from app.core.keywords import parse_query

    return parse_query(where)


GROW = 4
"""Factor by which a grouped search asks the engine for more hits when the answer names
fewer than k series: k, 4k, 16k, ... up to MAX_K, so a few rounds at most."""


def _series_count(hits: list[Hit]) -> int:
    return len({h.series_key for h in hits})


def _group(session: Session, repo: Repository, queries: np.ndarray, labels: list[str],
           k: int, allow_incomplete: bool, results: list[QueryResult],
           where: Query | None = None) -> None:
    """Group ``results`` (in place) into at most k series each, asking the engine again
    for more hits for the queries whose answer names fewer than k series while it was full
    (the archive may hold more) and MAX_K allows. Why this is exact: the engine's answer is
    the exact top-n, so any series it leaves out is no nearer than its n-th hit, hence no
    nearer than the best hit of any series the answer names."""
    asked = k
    need = list(range(len(results)))
    while asked < MAX_K:
        need = [i for i in need if _series_count(results[i].hits) < k
                and len(results[i].hits) >= asked]
        if not need:
            break
        asked = min(MAX_K, asked * GROW)
        again = search_features(session, repo, queries[need], [labels[i] for i in need],
                                asked, allow_incomplete=allow_incomplete, where=where)
        for i, result in zip(need, again, strict=True):
            for stage, ms in results[i].timings_ms.items():  # the rounds before count too
                result.timings_ms[stage] = result.timings_ms.get(stage, 0.0) + ms
            results[i] = result
    for result in results:
        result.groups = group_hits(result.hits, k)
        result.hits = result.hits[:k]
        result.grouped = True


def group_hits(hits: list[Hit], k: int) -> list[HitGroup]:
    """The first ``k`` series of ``hits`` (in answer order, nearest first), each with its
    best hit and the others of that series; sets ``Hit.group`` on the hits it groups."""
    groups: dict[str, HitGroup] = {}
    for hit in hits:
        found = groups.get(hit.series_key)
        if found is not None:
            found.others.append(hit)
            hit.group = found.rank
        elif len(groups) < k:
            groups[hit.series_key] = HitGroup(len(groups) + 1, hit.series_key, hit)
            hit.group = len(groups)
        else:
            hit.group = 0
    return list(groups.values())


def search_image(session: Session, repo: Repository, image_id: str, k: int = 1, *,
                 allow_incomplete: bool = False, group: bool = True,
                 exclude_self: bool = True, where: Where = None) -> QueryResult:
    """"Find similar" without a local file: the stored features of an archived image
    (from its pack's feature array in format 2) as the query. ``exclude_self`` leaves the
    image itself out (it is always its own nearest hit); its series' other images stay."""
    if not 1 <= k <= MAX_K:
        raise RadcryptError(f"k must be between 1 and {MAX_K}")
    record, version = image_reader(session, repo).meta(image_id)
    meta = ImageMeta.from_record(image_id, record, version)
    if not meta.features:
        raise IntegrityError(f"metadata of image {image_id} lacks its features")
    label = f"{meta.name} ({place})" if (place := instance_label(meta)) else meta.name
    ask = min(MAX_K, k + 1) if exclude_self else k
    result = search_features(session, repo, np.asarray(meta.features, dtype=np.float64),
                             [label], ask, allow_incomplete=allow_incomplete,
                             group=group, where=where)[0]
    if exclude_self:
        drop_image(result, image_id, k)
    return result


def drop_image(result: QueryResult, image_id: str, k: int) -> None:
    """Remove one image from ``result`` (hits and groups), keep k of each, number again:
    "Find similar" leaves out the image it starts from (here and in app/core/workstation.py)."""
    seen: dict[str, Hit] = {h.image_id: h for h in result.hits}
    for g in result.groups:
        seen.update((h.image_id, h) for h in g.hits)
    ordered = sorted((h for h in seen.values() if h.image_id != image_id),
                     key=lambda h: h.rank)
    for rank, hit in enumerate(ordered, 1):
        hit.rank = rank
    result.hits = [h for h in result.hits if h.image_id != image_id][:k]
    if result.grouped:
        result.groups = group_hits(ordered, k)


def _search_chunk(session: Session, repo: Repository, queries: np.ndarray, labels: list[str],
                  k: int, allow_incomplete: bool, where: Query | None = None
                  ) -> list[QueryResult]:
    t_log = time.perf_counter()
    state = log_state(session, repo) if is_format2(repo.manifest) else None
    t0 = time.perf_counter()
    repo = basis.load(session.store, repo)  # levels fitted since the repository was opened
    token = repo.keys.index_key.query(queries)
    keywords = None if where is None else keyword_tokens(repo, where)
    t1 = time.perf_counter()
    answer, verdict, state = _ask(session, repo, token, k, state, keywords)
    t2 = time.perf_counter()
    if verdict is not None and not verdict.complete and not allow_incomplete:
        raise IncompleteAnswer(repo.keys.version, verdict.expected, verdict.searched,
                               verdict.missing)
    reader = image_reader(session, repo, state)
    n = len(queries)
    out = []
    for qi, (label, raw) in enumerate(zip(labels, answer.hits, strict=True)):
        ids = [image_id for image_id, _ in raw]
        if len(set(ids)) != len(ids):  # FORMAT-2 6.3 step 5
            raise ServiceError(f"the search service answered query {qi + 1} with an image "
                               "twice (malformed answer)")
        f0 = time.perf_counter()
        hits = _resolve(reader, queries[qi], raw)
        if where is not None:
            check_matches(where, [h.image for h in hits], session, repo)
        f1 = time.perf_counter()
        distances = [h.distance for h in hits]
        verified = all(b >= a - ORDER_RTOL * (abs(a) + float(queries[qi] @ queries[qi]))
                       for a, b in itertools.pairwise(distances))
        timings = {"token": (t1 - t0) * 1000 / n, "server": (t2 - t1) * 1000 / n,
                   "fetch_decrypt": (f1 - f0) * 1000}
        if state is not None:  # verifying the segment log (format 2)
            timings["log"] = (t0 - t_log) * 1000 / n
        out.append(QueryResult(label, hits, _stats(answer, qi), timings, verified,
                               **_completeness(answer, verdict)))
    return out


# --- completeness (docs/FORMAT-2.md 6.3) ---------------------------------------------


def log_state(session: Session, repo: Repository) -> LogState:
    """The repository's segment log verified up to its head now, extending the state this
    session verified before (one listing when nothing changed); rollback and fork are
    refused (IntegrityError) by app.core.logstate against the remembered head."""
    from app.core.logstate import verified_log

    with session.log_lock:
        since = session.log_states.get(repo.repo_id)
    state = verified_log(session.store, session.settings, repo, since=since)
    with session.log_lock:
        session.log_states[repo.repo_id] = state
    return state


def image_reader(session: Session, repo: Repository, state: LogState | None = None
                 ) -> ImageReader:
    """Metadata and previews of ``repo``'s images: per-image objects in format 1, the live
    packs of ``state`` (verified now when not given) in format 2."""
    from app.core.packs import ImageReader

    if not is_format2(repo.manifest):
        return ImageReader(session.store, repo, None)
    if state is None:
        state = log_state(session, repo)
    # One reader per verified head: its index of the live packs is built once.
    key = (repo.repo_id, repo.keys.version, state.head.sequence, state.head.hash)
    with session.log_lock:
        cached = session.readers.get(repo.repo_id)
    if cached is not None and cached[0] == key:
        known: ImageReader = cached[1]
        return known
    reader = ImageReader(session.store, repo, state)
    with session.log_lock:
        session.readers[repo.repo_id] = (key, reader)
    return reader


def _ask(session: Session, repo: Repository, token: Any, k: int, state: LogState | None,
         keywords: Any = None) -> tuple[Any, Verdict | None, LogState | None]:
    """The service's answer and, in format 2, its verdict: asked once, again with the
    searched segments listed when the digests differ, the log verified again once when
    the service names a newer head than this client verified. ``keywords``: a
    cloud.keyword_index.TokenQuery travelling in the same request (``token`` None: a
    keyword-only search, ``k`` bounding the ids answered)."""
    service = session.service
    version = repo.keys.version
    extra = {} if keywords is None else {"keywords": keywords}
    if state is None:
        return service.search_v2(repo.repo_id, token, k, version, **extra), None, None
    from cloud.seglog import LogAhead

    listed = False
    verified_again = False
    while True:
        answer = service.search_v2(repo.repo_id, token, k, version,
                                   min_head=state.head.sequence, list_segments=listed,
                                   **extra)
        try:
            verdict = _judge(state, version, answer)
        except LogAhead:
            if verified_again:
                raise IntegrityError(
                    f"the search service answered for log entry {answer.head_sequence} of "
                    f"repository {repo.repo_id}, which this client cannot read (its verified "
                    f"head is {state.head.sequence})") from None
            verified_again = True
            state = log_state(session, repo)
            verdict = _judge(state, version, answer)
        if verdict is not None:
            return answer, verdict, state
        if listed:
            raise ServiceError("the search service did not list the segments it searched "
                               "although asked to (malformed answer)")
        listed = True


def _judge(state: LogState, version: int, answer: Any) -> Verdict | None:
    """seglog.judge_answer, its errors in the client's words: LogAhead passes (the caller
    verifies again), a fork is an IntegrityError, an answer that searched what the log
    does not hold a ServiceError."""
    from cloud.seglog import AnswerError, LogAhead, LogError, judge_answer

    try:
        return judge_answer(state, version, answer.head_sequence, answer.head_hash,
                            answer.set_digest, answer.segments, answer.segment_ids)
    except LogAhead:
        raise
    except LogError as exc:
        raise IntegrityError(f"segment log of repository {state.repo_id}: {exc}") from None
    except AnswerError as exc:
        raise ServiceError(f"the search service's answer does not match the segment log "
                           f"of repository {state.repo_id}: {exc}") from None


def _completeness(answer: Any, verdict: Verdict | None) -> dict[str, Any]:
    if verdict is None:
        return {"complete": None, "segments_expected": None,
                "segments_searched": int(answer.segments), "segments_missing": []}
    return {"complete": bool(verdict.complete), "segments_expected": int(verdict.expected),
            "segments_searched": int(verdict.searched),
            "segments_missing": list(verdict.missing)}


def _stats(answer: Any, qi: int) -> dict[str, Any]:
    """The engine's statistics of one query (the answer's optional STATS section), else
    what the answer's header says for all of them."""
    stats = answer.stats[qi] if answer.stats else None
    if stats:
        return dict(stats)
    return {"vectors": int(answer.images), "milliseconds": answer.engine_us / 1000.0}


def _resolve(reader: ImageReader, query: np.ndarray,
             raw_hits: list[tuple[str, float]]) -> list[Hit]:
    """Fetch and decrypt each hit's metadata (in parallel) and compute its true distance."""

    def one(rank: int, raw: tuple[str, float]) -> Hit:
        image_id, score = str(raw[0]), float(raw[1])
        meta, version = reader.meta(image_id)
        vector = np.asarray(meta["features"], dtype=np.float64)
        if vector.shape != query.shape:
            raise IntegrityError(f"metadata of image {image_id} has features of the "
                                 "wrong dimension")
        diff = vector - query
        return Hit(rank=rank, image_id=image_id, name=str(meta.get("name", "")),
                   distance=float(diff @ diff), score=score, key_version=version, meta=meta,
                   series_key=series_key(ImageMeta.from_record(image_id, meta, version)))

    if not raw_hits:
        return []
    with ThreadPoolExecutor(min(8, len(raw_hits))) as pool:
        return list(pool.map(one, range(1, len(raw_hits) + 1), raw_hits))


# --- keyword search (issue 17; docs/KEYWORDS.md) ----------------------------------------


def keyword_tokens(repo: Repository, query: Query) -> Any:
    """The query's tokens under the keyword key of the repository's current key version:
    the version image searches ask for too (older versions' segments are rewritten under
    the new one at revocation, FORMAT-2 7.3)."""
    return query.tokens(repo.keys.keyword_key, repo.repo_id, repo.keys.version)


def check_matches(query: Query, images: list[ImageMeta], session: Session,
                  repo: Repository, labels: Any = None) -> None:
    """Every image the service named must match the query in plaintext (its decrypted
    metadata, and its labels when the query asks for labels): a service that names
    other images is caught here (ServiceError), its answer never shown."""
    from app.core.keywords import keywords_of

    wants_labels = any(c.field == "label" for c in query.clauses)
    by_image: dict[str, set[str]] = {}
    if wants_labels and images:
        by_image = labels() if labels is not None else labels_by_image(session, repo)
    for meta in images:
        if meta.error:
            raise ServiceError(f"the search service named image {meta.image_id}, whose "
                               f"metadata does not verify: {meta.error}")
        words = keywords_of(meta) | {f"label={w}" for w in by_image.get(meta.image_id, ())}
        if not query.matches(words):
            raise ServiceError(f"the search service named image {meta.image_id}, which "
                               "does not match the keyword query (malformed or hostile "
                               "answer)")


def labels_by_image(session: Session, repo: Repository) -> dict[str, set[str]]:
    """Image id -> its label words now, for every labelled image of the current key
    version (decrypted here from the live label objects, app/core/labels.py); {} for a
    format-1 repository, which has no labels."""
    if not is_format2(repo.manifest):
        return {}
    from app.core import labels as label_module

    state = log_state(session, repo)
    version = repo.keys.version
    if not label_module.live_labels(state, version):
        return {}
    segments = [o.id for o in state.segments(version)]
    _, net = label_module.net_labels(session.store, repo, state, segments, version)
    return {image_id: set(words) for image_id, words in net.items()}


@dataclass
class KeywordFound:
    """What a keyword-only search found: the images (decrypted, checked), how many the
    service matched, and the completeness verdict as for an image search."""

    images: list[ImageMeta]
    matched: int
    truncated: bool
    complete: bool | None
    segments_expected: int | None
    segments_searched: int | None
    segments_missing: list[str]
    timings_ms: dict[str, float]


def keyword_find(session: Session, repo: Repository, query: Query, *,
                 allow_incomplete: bool = False, limit: int | None = None,
                 labels: Any = None) -> KeywordFound:
    """The images matching a keyword query: tokens here, the evaluation on the service
    (one signed protocol-2 request, keyword-only), each named image's metadata fetched,
    decrypted and checked against the query here. Completeness as for an image search
    (IncompleteAnswer unless ``allow_incomplete``). ``limit``: image ids asked for
    (default and most: cloud.wire.MAX_KEYWORD_HITS); ``truncated`` when more matched.
    ``labels``: a callable giving image id -> labels, for queries on labels."""
    from cloud.wire import MAX_KEYWORD_HITS

    limit = MAX_KEYWORD_HITS if limit is None else limit
    if not is_format2(repo.manifest):
        raise RadcryptError(f"repository {repo.repo_id} is in storage format 1, which has no "
                            "keyword dictionaries: migrate it (radcrypt repo migrate "
                            "--format 2)")
    if not 1 <= limit <= MAX_KEYWORD_HITS:
        raise RadcryptError(f"a keyword search answers 1 to {MAX_KEYWORD_HITS} images")
    t_log = time.perf_counter()
    state = log_state(session, repo) if is_format2(repo.manifest) else None
    t0 = time.perf_counter()
    tokens = keyword_tokens(repo, query)
    t1 = time.perf_counter()
    answer, verdict, state = _ask(session, repo, None, limit, state, tokens)
    t2 = time.perf_counter()
    if verdict is not None and not verdict.complete and not allow_incomplete:
        raise IncompleteAnswer(repo.keys.version, verdict.expected, verdict.searched,
                               verdict.missing)
    ids = [image_id for image_id, _ in answer.hits[0]]
    reader = image_reader(session, repo, state)

    def one(image_id: str) -> ImageMeta:
        try:
            record, version = reader.meta(image_id)
        except RadcryptError as exc:
            return ImageMeta.damaged(image_id, str(exc))
        return ImageMeta.from_record(image_id, record, version)

    images: list[ImageMeta] = []
    if ids:
        with ThreadPoolExecutor(min(8, len(ids)), thread_name_prefix="radcrypt-meta") as pool:
            images = list(pool.map(one, ids))
    check_matches(query, images, session, repo, labels)
    t3 = time.perf_counter()
    matched = int(answer.matched or 0)
    timings = {"token": (t1 - t0) * 1000, "server": (t2 - t1) * 1000,
               "fetch_decrypt": (t3 - t2) * 1000}
    if state is not None:
        timings["log"] = (t0 - t_log) * 1000
    return KeywordFound(images, matched, matched > len(ids), **_completeness(answer, verdict),
                        timings_ms=timings)
