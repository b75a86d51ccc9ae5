"""The client's side of a CKKS search (issue 19, search mode "ckks").

Why this shape: the service holds the repository's CKKS blocks and the public evaluation
keys, never a secret key; it returns one encrypted score per stored image. Here the query
is encrypted under the key version's CKKS key (app/core/ckks_blocks.py), the scores
decrypted, every image whose decrypted score is within twice the error bound of the k-th
(crypto.ckks.candidates) re-scored exactly from its AES-GCM features in the packs, and the
exact top-k returned as in the other modes (app/core/searcher.py's QueryResult).

The evaluation keys the service scores with are anchored only by the key version's MAC
key, which every member holding the version has: before a key version's keys are first
used in this process they are tested with this client's secret key
(app/core/ckks_blocks.trusted_eval_digest; keys a member forged are refused, naming the
object, and the service is not asked).

Decrypted scores never leave this process: the Li-Micciancio attack on CKKS needs
decryptions, and nothing decrypted is ever sent to the service. The answer names the
segments it covered and the log head it read; the completeness check of FORMAT-2 6.3 is
the same as for secure-kNN answers (a live segment without a block, or one the service
left out, makes the answer incomplete).

A keyword filter (``where=``, ``radcrypt search --where``, the GUI's filter row) is exact
and simple: the client asks the service for the keyword-only answer (the matching image
ids: the same signed keyword request as in the other modes, docs/FORMAT-2.md 8.2), then
keeps, among the decrypted CKKS scores, only those ids before choosing and re-scoring the
candidates (every score is decrypted anyway). Both answers are judged for completeness
(6.3); every hit is checked against the filter in plaintext after decryption, as in the
secure-kNN mode. The service learns the keyword tokens (as in every mode) and, as before,
nothing of the image query.

QueryResult and hit resolution (app/core/search_results.py), log verification
(app/core/search_log.py), the completeness judgement (app/core/search_answers.py) and the
keyword filter (app/core/search_filter.py) are the same for every mode the service answers:
this module and app/core/searcher.py, which calls ``search_chunk``, both import them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core import ckks_blocks
from app.core.errors import IntegrityError, RadcryptError, ServiceError
from app.core.repository import CKKS, Repository
from app.core.search_answers import ask_service, completeness_fields, judge, refuse_incomplete
from app.core.search_filter import check_matches, keyword_tokens
from app.core.search_log import image_reader, log_state
from app.core.search_results import QueryResult, resolve_hits
from app.core.session import Session
from cloud import ckks_store
from cloud.backend import ObjectNotFound
from crypto import ckks
from crypto.errors import FormatError

MODE = CKKS


def _ask(session: Session, repo: Repository, query: bytes, digest: bytes, state: Any
         ) -> tuple[ckks_store.CkksAnswer, Any, Any, int]:
    """(answer, verdict, state, bytes downloaded); the log verified once more when the
    service answered for a newer head than this client verified."""
    from cloud.seglog import LogAhead

    version = repo.keys.version
    path = f"/v2/repos/{repo.repo_id}/{ckks_store.ROUTE}"
    for attempt in range(2):
        body = ckks_store.encode_request(version, state.head.sequence, digest, query)
        # ServiceClient's signed POST (the same signature and refusals as every request)
        response = session.service._exchange(path, body, protocol=2)
        try:
            answer = ckks_store.decode_answer(response.content)
        except FormatError as exc:
            raise ServiceError(f"the search service's CKKS answer is malformed: {exc}"
                               ) from None
        try:
            verdict = judge(state, version, answer)
        except LogAhead:
            if attempt:
                raise IntegrityError(
                    f"the search service answered for log entry {answer.head_sequence} of "
                    f"repository {repo.repo_id}, which this client cannot read") from None
            state = log_state(session, repo)
            continue
        if verdict is None:
            raise ServiceError("the search service's CKKS answer names segments that do not "
                               "hash to its segment-set digest (malformed answer)")
        return answer, verdict, state, len(response.content)
    raise AssertionError("unreachable")


def search_chunk(session: Session, repo: Repository, queries: np.ndarray, labels: list[str],
                 k: int, allow_incomplete: bool, where: Any = None) -> list[QueryResult]:
    """app.core.searcher._search_chunk for a CKKS repository (one request per query)."""
    version, store = repo.keys.version, session.store
    period = ckks.period_of(repo.manifest.dim)
    allowed: Allowed | None = None
    keywords_timed = False
    out = []
    for label, query in zip(labels, queries, strict=True):
        t0 = time.perf_counter()
        state = log_state(session, repo)
        t1 = time.perf_counter()
        log_ms = (t1 - t0) * 1000
        if not state.segments(version):  # nothing stored under this key version yet
            out.append(QueryResult(label, [], {"mode": MODE, "vectors": 0}, {}, True,
                                   complete=True, segments_expected=0, segments_searched=0,
                                   asked=k))
            continue
        if where is not None and allowed is None:  # once per chunk: the same filter
            allowed = keyword_ids(session, repo, where, state, allow_incomplete)
            t1 = time.perf_counter()  # timed apart: "keywords"
        try:
            # tested with this client's secret key once per process and digest: keys forged
            # by a holder of the version's key are refused here, never sent to be used
            digest = ckks_blocks.trusted_eval_digest(store, repo, version)
        except ObjectNotFound:
            raise IntegrityError(f"repository {repo.repo_id!r} has segments of key version "
                                 f"{version} but no CKKS evaluation keys "
                                 f"({ckks_store.eval_keys_key(repo.repo_id, version)}): "
                                 "deleted from the store; it cannot be searched") from None
        key = ckks_blocks.key_of(repo, version)
        try:
            encrypted = key.encrypt_query(np.asarray(query, dtype=np.float64), period)
        except FormatError as exc:
            raise RadcryptError(f"the query cannot be encrypted for {repo.repo_id!r}: {exc}"
                                ) from None
        t2 = time.perf_counter()
        answer, verdict, state, down = _ask(session, repo, encrypted, digest, state)
        t3 = time.perf_counter()
        refuse_incomplete(version, verdict, allow_incomplete)
        try:
            scores = key.decrypt_scores(answer.scores, answer.counts)
        except FormatError as exc:
            raise IntegrityError(f"the CKKS scores of repository {repo.repo_id!r} are not "
                                 f"usable ({exc}): a block or the evaluation keys were "
                                 "altered, or belong to another repository or key version; "
                                 "nothing was ranked") from None
        ids = [image_id for seg in answer.image_ids for image_id in seg]
        if len(set(ids)) != len(ids) or len(ids) != len(scores):
            raise ServiceError("the search service's CKKS answer names an image twice "
                               "(malformed answer)")
        if allowed is None:
            rows = ckks.candidates(scores, k)
        else:  # only the images the filter matched compete (exact: all scores decrypted)
            kept = np.flatnonzero(np.fromiter((i in allowed.ids for i in ids), dtype=bool,
                                              count=len(ids)))
            rows = kept[ckks.candidates(scores[kept], k)]
        reader = image_reader(session, repo, state)
        exact = np.stack([np.asarray(reader.meta(ids[r])[0]["features"], dtype=np.float64)
                          for r in rows]) if len(rows) else np.zeros((0, len(query)))
        diff = exact - np.asarray(query, dtype=np.float64)
        d2 = np.einsum("ij,ij->i", diff, diff)  # exact, float64; ties by image id
        order = np.lexsort((np.array([ids[int(r)] for r in rows], dtype=object), d2))[:k]
        raw = [(ids[int(rows[i])], float(scores[int(rows[i])])) for i in order]
        hits = resolve_hits(reader, np.asarray(query, dtype=np.float64), raw)
        if where is not None:  # a hit outside the filter: a hostile keyword answer
            check_matches(where, [h.image for h in hits], session, repo)
        t4 = time.perf_counter()
        timings = {"log": log_ms, "encrypt": (t2 - t1) * 1000,
                   "server": (t3 - t2) * 1000, "decrypt_rescore": (t4 - t3) * 1000}
        stats = {"mode": MODE, "vectors": len(ids), "milliseconds": answer.engine_us / 1000,
                 "candidates": len(rows), "upload_bytes": len(encrypted),
                 "download_bytes": down}
        completeness = completeness_fields(answer, verdict)
        if allowed is not None:
            stats["matched"] = allowed.matched
            stats["download_bytes"] = down + allowed.download_bytes
            if not keywords_timed:  # the keyword request, made once per chunk
                timings["keywords"], keywords_timed = allowed.milliseconds, True
            completeness = _both(completeness, allowed.completeness)
        out.append(QueryResult(label, hits, stats, timings, True, **completeness))
    return out


@dataclass(frozen=True)
class Allowed:
    """The keyword-only answer a filtered CKKS search is restricted to."""

    ids: frozenset[str]
    matched: int
    completeness: dict[str, Any]
    download_bytes: int
    milliseconds: float


def keyword_ids(session: Session, repo: Repository, where: Any, state: Any,
                allow_incomplete: bool) -> Allowed:
    """The ids of every image the filter matches (one signed keyword-only request, judged
    for completeness like any answer). Refused when more match than one keyword answer
    carries (cloud.wire.MAX_KEYWORD_HITS): a partial id list would make the top-k wrong."""
    from cloud.wire import MAX_KEYWORD_HITS

    started = time.perf_counter()
    tokens = keyword_tokens(repo, where)
    answer, verdict, _state = ask_service(session, repo, None, MAX_KEYWORD_HITS, state, tokens)
    refuse_incomplete(repo.keys.version, verdict, allow_incomplete)
    ids = [image_id for image_id, _ in answer.hits[0]]
    matched = int(answer.matched or 0)
    if matched > len(ids):
        raise RadcryptError(f"the keyword filter matches {matched:,} images of "
                            f"{repo.repo_id!r}, more than the {MAX_KEYWORD_HITS:,} one keyword "
                            "answer lists: a homomorphic (ckks) search cannot be restricted "
                            "to them exactly; narrow the filter")
    if len(set(ids)) != len(ids):
        raise ServiceError("the search service's keyword answer names an image twice "
                           "(malformed answer)")
    return Allowed(frozenset(ids), matched, completeness_fields(answer, verdict),
                   16 * len(ids) + 8 * len(ids),  # ids and (zero) scores of the answer
                   (time.perf_counter() - started) * 1000)


def _both(scores: dict[str, Any], keywords: dict[str, Any]) -> dict[str, Any]:
    """One completeness verdict for the two answers a filtered search is made of: complete
    only when both are; the missing segments of either are named."""
    missing = sorted(set(scores["segments_missing"]) | set(keywords["segments_missing"]))
    expected = max(scores["segments_expected"] or 0, keywords["segments_expected"] or 0)
    return {"complete": bool(scores["complete"]) and bool(keywords["complete"]),
            "segments_expected": expected, "segments_searched": expected - len(missing),
            "segments_missing": missing}
