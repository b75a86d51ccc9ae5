"""Synthetic vector sets shared by the benchmarks and the exactness tests.

"realistic" vectors are drawn from a Gaussian with the mean and covariance of real
image features (radcrypt-v1 on the offline sample images) when those are available,
which reproduces the per-vector offset and spread variation that makes pruning work.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]


def gaussian(rng: np.random.Generator, n: int, d: int) -> F64:
    """i.i.d. standard normal entries: the worst case for every lower bound."""
    return rng.standard_normal((n, d))


def clustered(rng: np.random.Generator, n: int, d: int, clusters: int = 50) -> F64:
    """Points around random centres with per-cluster offset and scale."""
    centres = rng.standard_normal((clusters, d)) * 3.0
    offsets = rng.normal(0.0, 2.0, (clusters, 1))
    scales = rng.uniform(0.2, 1.5, (clusters, 1))
    labels = rng.integers(0, clusters, n)
    return centres[labels] + offsets[labels] + scales[labels] * rng.standard_normal((n, d))


def matching_moments(rng: np.random.Generator, n: int, sample: F64) -> F64:
    """Vectors drawn to match the mean and covariance of ``sample`` (real features)."""
    mean = sample.mean(axis=0)
    cov = np.cov(sample, rowvar=False) + 1e-9 * np.eye(sample.shape[1])
    factor = np.linalg.cholesky(cov)
    return mean + rng.standard_normal((n, sample.shape[1])) @ factor.T


def low_rank_varying(rng: np.random.Generator, n: int, d: int, rank: int = 16) -> F64:
    """Stand-in for image features when no real sample is at hand: low-rank structure
    plus per-vector offset and spread, as intensity-based features have."""
    mixing = rng.standard_normal((rank, d))
    base = rng.standard_normal((n, rank)) @ mixing / np.sqrt(rank)
    return base * rng.uniform(0.5, 2.0, (n, 1)) + rng.normal(0.0, 2.0, (n, 1)) + 0.2 * (
        rng.standard_normal((n, d))
    )


def perturbed_queries(rng: np.random.Generator, data: F64, count: int, noise: float) -> F64:
    """Queries near stored vectors (a radiologist's query resembles an archived image)."""
    picks = rng.choice(data.shape[0], count, replace=count > data.shape[0])
    spread = data.std()
    return data[picks] + noise * spread * rng.standard_normal((count, data.shape[1]))


def plaintext_topk(data: F64, queries: F64, k: int, shortlist: int = 32
                   ) -> tuple[NDArray[np.int64], F64]:
    """Exact top-k by squared Euclidean distance in float64 (ground truth).

    The BLAS expansion ||p||^2 - 2 p.q + ||q||^2 picks a shortlist of k + 32; those
    distances are then recomputed directly as ||p - q||^2, which has no cancellation.
    """
    sq = np.einsum("ij,ij->i", data, data)
    approx = sq[None, :] - 2.0 * (queries @ data.T)
    width = min(data.shape[0], k + shortlist)
    short = np.argpartition(approx, width - 1, axis=1)[:, :width]
    diff = data[short] - queries[:, None, :]
    exact = np.einsum("qkd,qkd->qk", diff, diff)
    order = np.argsort(exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(short, order, axis=1), np.take_along_axis(exact, order, axis=1)


def agrees(found: NDArray[np.int64], data: F64, query: F64, truth_dist: F64,
           rtol: float = 1e-9) -> bool:
    """The same result as plaintext, or a tie within ``rtol``.

    The true distances ||p - q||^2 of the returned positions, sorted, must equal the
    plaintext top-k distances rank by rank within rtol * (distance + ||q||^2): relative
    to the magnitudes that float64 scores of either kind are computed from.
    """
    if found.shape[0] != truth_dist.shape[0]:
        return False
    diff = data[found] - query
    got = np.sort(np.einsum("ij,ij->i", diff, diff))
    scale = truth_dist + float(query @ query)
    return bool(np.all(np.abs(got - truth_dist) <= rtol * scale))


SEGMENT_ROWS = 20000  # vectors per committed segment and pack


def commit_vectors(store: Any, settings: Any, owner: Any, repo: Any,
                   data: NDArray[np.float64]) -> tuple[list[str], int]:
    """Commit plaintext vectors to a format-2 repository as the importer does (a segment
    and a pack per owner-signed log entry, SEGMENT_ROWS at a time), without decoding any
    image: how the end-to-end and load benchmarks build large repositories fast. Returns
    the image ids, in the rows' order, and the segments' bytes."""
    import hashlib
    import json

    from app.core import logstate
    from cloud import layout, seglog
    from cloud.segments import encode_segment_v2
    from crypto import pack
    from crypto.segment_mac import index_mac_key

    keys, repo_id = repo.keys, repo.repo_id
    ids = [layout.new_id() for _ in range(len(data))]
    preview = b"\x89PNG\r\n\x1a\n"  # the previews are not what the benchmarks measure
    segment_bytes = 0
    state = logstate.verified_log(store, settings, repo)
    for begin in range(0, len(data), SEGMENT_ROWS):
        rows = slice(begin, begin + SEGMENT_ROWS)
        batch_ids = ids[rows]
        seg_id, pack_id = layout.new_id(), layout.new_id()
        blob = encode_segment_v2(batch_ids, keys.index_key.encrypt(data[rows]), keys.version,
                                 seg_id=seg_id, writer=owner.user_id,
                                 base_sequence=state.head.sequence, repo_id=repo_id,
                                 mac_key=index_mac_key(keys.data_key))
        metas = [(image_id, json.dumps({"format": "radcrypt-meta-v2",
                                        "name": f"image-{begin + j}.dcm"}).encode(), preview)
                 for j, image_id in enumerate(batch_ids)]
        packed = pack.build_pack(keys.data_key, repo_id, pack_id, keys.version, metas,
                                 data[rows])
        store.put(layout.pack_key(repo_id, pack_id), packed)
        store.put(layout.segment_key(repo_id, seg_id), blob)
        added = [seglog.Added(seglog.TYPE_SEGMENT, seg_id, hashlib.sha256(blob).digest(),
                              len(batch_ids)),
                 seglog.Added(seglog.TYPE_PACK, pack_id, hashlib.sha256(packed).digest(),
                              len(batch_ids))]
        state = seglog.append(store, repo_id, owner, owner.user_id,
                              logstate.repository_trust(store, repo), state,
                              kind=seglog.KIND_ADD, reason=seglog.REASON_IMPORT,
                              key_version=keys.version, added=added)
        segment_bytes += len(blob)
    logstate.remember_head(settings, repo_id, state.head)
    return ids, segment_bytes
