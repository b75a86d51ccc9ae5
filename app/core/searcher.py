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

What every mode the service answers shares lives in modules below this one, which
app/core/ckks_search.py (the CKKS mode, called from ``search_features``) imports as well:
the result types and how a hit is made (app/core/search_results.py), the verified log and
the image reader (app/core/search_log.py), asking the service and judging the answer's
completeness (app/core/search_answers.py), the keyword filter's tokens and plaintext check
(app/core/search_filter.py). The names other code imports from here stay importable here.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.core import basis
from app.core.errors import IntegrityError, RadcryptError, ServiceError
from app.core.meta import ImageMeta
from app.core.repository import Repository, is_format2
from app.core.search_answers import ask_service, completeness_fields, refuse_incomplete
from app.core.search_filter import check_matches, keyword_tokens
from app.core.search_filter import labels_by_image as labels_by_image  # keyword_search
from app.core.search_log import image_reader, log_state
from app.core.search_results import Hit, HitGroup, QueryResult, resolve_hits
from app.core.session import Session
from app.core.studies import instance_label
from app.imaging.worker import DecoderPool, DecoderUnavailable
from cloud.backend import Store
from cloud.limits import MAX_K, MAX_QUERIES

if TYPE_CHECKING:
    from app.core.keywords import Query

Where = Any
"""A keyword filter: app.core.keywords.Query, or terms it parses (str or list of str)."""

ORDER_RTOL = 1e-9


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
        if ckks_mode:  # imported here: the CKKS libraries load only for a CKKS search
            from app.core.ckks_search import search_chunk

            results += search_chunk(session, repo, chunk, labels[start : start + MAX_QUERIES],
                                    k, allow_incomplete, query)
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
    answer, verdict, state = ask_service(session, repo, token, k, state, keywords)
    t2 = time.perf_counter()
    refuse_incomplete(repo.keys.version, verdict, allow_incomplete)
    reader = image_reader(session, repo, state)
    n = len(queries)
    out = []
    for qi, (label, raw) in enumerate(zip(labels, answer.hits, strict=True)):
        ids = [image_id for image_id, _ in raw]
        if len(set(ids)) != len(ids):  # FORMAT-2 6.3 step 5
            raise ServiceError(f"the search service answered query {qi + 1} with an image "
                               "twice (malformed answer)")
        f0 = time.perf_counter()
        hits = resolve_hits(reader, queries[qi], raw)
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
                               **completeness_fields(answer, verdict)))
    return out


def _stats(answer: Any, qi: int) -> dict[str, Any]:
    """The engine's statistics of one query (the answer's optional STATS section), else
    what the answer's header says for all of them."""
    stats = answer.stats[qi] if answer.stats else None
    if stats:
        return dict(stats)
    return {"vectors": int(answer.images), "milliseconds": answer.engine_us / 1000.0}


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
    answer, verdict, state = ask_service(session, repo, None, limit, state, tokens)
    t2 = time.perf_counter()
    refuse_incomplete(repo.keys.version, verdict, allow_incomplete)
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
    return KeywordFound(images, matched, matched > len(ids), **completeness_fields(answer, verdict),
                        timings_ms=timings)
