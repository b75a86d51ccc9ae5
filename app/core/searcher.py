"""Search by image: features and token here, the match on the server, names here again.

The server answers with image ids only. The client then fetches each hit's encrypted
metadata, decrypts it, and recomputes the true distance from the stored features, so
what the radiologist sees (name, distance) never came from the server in clear, and a
server that returned hits out of order would be noticed (``order_verified``).
"""

from __future__ import annotations

import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.core import basis, objects
from app.core.errors import IntegrityError, RadcryptError
from app.core.repository import Repository
from app.core.session import Session
from app.imaging.worker import DecoderPool, DecoderUnavailable
from cloud.backend import ObjectNotFound, Store
from cloud.limits import MAX_K, MAX_QUERIES

ORDER_RTOL = 1e-9


@dataclass
class Hit:
    rank: int
    image_id: str
    name: str
    distance: float
    score: float
    key_version: int
    meta: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass
class QueryResult:
    query: str
    hits: list[Hit]
    stats: dict[str, Any]
    timings_ms: dict[str, float]
    order_verified: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "results": [{"image_id": h.image_id, "name": h.name, "distance": h.distance,
                         "rank": h.rank} for h in self.hits],
            "stats": {**self.stats, "timings_ms": self.timings_ms,
                      "order_verified": self.order_verified},
        }


def read_meta(store: Store, repo: Repository, image_id: str,
              version: int | None = None) -> tuple[dict[str, Any], int]:
    """Decrypted metadata of one image and the key version that opened it."""
    try:
        plain, used = objects.get_decrypted(store, repo.ring, repo.repo_id, "meta", image_id,
                                            version)
    except ObjectNotFound:
        raise IntegrityError(f"image {image_id} is in the index but its metadata is missing"
                             ) from None
    try:
        meta = json.loads(plain)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IntegrityError(f"metadata of image {image_id} is not valid JSON") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("features"), list):
        raise IntegrityError(f"metadata of image {image_id} lacks its features")
    return meta, used


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


def search_files(session: Session, repo: Repository, paths: list[str | Path], k: int = 1
                 ) -> list[QueryResult]:
    """Nearest archived images of each query file."""
    start = time.perf_counter()
    files = [Path(p) for p in paths]
    features = features_of_files(repo, files)
    features_ms = (time.perf_counter() - start) * 1000 / max(1, len(files))
    results = search_features(session, repo, features, [str(p) for p in files], k)
    for result in results:
        result.timings_ms["features"] = features_ms
    return results


def search_features(session: Session, repo: Repository, features: np.ndarray,
                    labels: list[str], k: int = 1) -> list[QueryResult]:
    """Nearest archived images of each feature vector (one encrypted request for all)."""
    if not 1 <= k <= MAX_K:
        raise RadcryptError(f"k must be between 1 and {MAX_K}")
    queries = np.atleast_2d(np.asarray(features, dtype=np.float64))
    results: list[QueryResult] = []
    for start in range(0, len(queries), MAX_QUERIES):  # the most the service takes at once
        chunk = queries[start : start + MAX_QUERIES]
        results += _search_chunk(session, repo, chunk, labels[start : start + MAX_QUERIES], k)
    return results


def _search_chunk(session: Session, repo: Repository, queries: np.ndarray, labels: list[str],
                  k: int) -> list[QueryResult]:
    t0 = time.perf_counter()
    repo = basis.load(session.store, repo)  # levels fitted since the repository was opened
    token = repo.keys.index_key.query(queries)
    t1 = time.perf_counter()
    answer = session.service.search(repo.repo_id, token, k, repo.keys.version)
    t2 = time.perf_counter()
    n = len(queries)
    out = []
    for qi, (label, result) in enumerate(zip(labels, answer["results"], strict=True)):
        f0 = time.perf_counter()
        hits = _resolve(session.store, repo, queries[qi], result["hits"])
        f1 = time.perf_counter()
        distances = [h.distance for h in hits]
        verified = all(b >= a - ORDER_RTOL * (abs(a) + float(queries[qi] @ queries[qi]))
                       for a, b in itertools.pairwise(distances))
        timings = {"token": (t1 - t0) * 1000 / n, "server": (t2 - t1) * 1000 / n,
                   "fetch_decrypt": (f1 - f0) * 1000}
        out.append(QueryResult(label, hits, dict(result["stats"]), timings, verified))
    return out


def _resolve(store: Store, repo: Repository, query: np.ndarray,
             raw_hits: list[dict[str, Any]]) -> list[Hit]:
    """Fetch and decrypt each hit's metadata (in parallel) and compute its true distance."""

    def one(raw: dict[str, Any]) -> Hit:
        meta, version = read_meta(store, repo, str(raw["image_id"]))
        vector = np.asarray(meta["features"], dtype=np.float64)
        if vector.shape != query.shape:
            raise IntegrityError(f"metadata of image {raw['image_id']} has features of the "
                                 "wrong dimension")
        diff = vector - query
        return Hit(rank=int(raw["rank"]), image_id=str(raw["image_id"]),
                   name=str(meta.get("name", "")), distance=float(diff @ diff),
                   score=float(raw["score"]), key_version=version, meta=meta)

    if not raw_hits:
        return []
    with ThreadPoolExecutor(min(8, len(raw_hits))) as pool:
        return list(pool.map(one, raw_hits))
