"""Workstation search mode (issue 19): sync cost, local query latency, memory.

Builds a workstation-mode repository of N synthetic feature vectors (d = 128, the
product's extractor's dimension) the way the importer commits them (a pack with meta,
preview and feature array, an ids-only segment and an owner-signed log entry per batch,
app/core/workstation_index.segment_vectors), in a directory store on this machine, then
measures with the product's own code (app/core/workstation.py):

* first sync: seconds, MB read from the bucket, MB of the encrypted local cache;
* incremental sync after one more import batch (64 images): seconds and bytes;
* a new process's sync with nothing new (the cache opened from disk, nothing fetched);
* local query latency (the exact top-k over the whole matrix, warm), p50 and p99, and a
  whole search_features call (sync check, top-k, metadata of the k hits read by range
  and decrypted);
* memory: the plaintext matrix and the process's peak RSS;
* exactness: the top-k equal to a plaintext brute force (ids and distances) on every query.

The store is a local directory: bytes are what an S3 bucket would serve, seconds are
local-disk seconds (a WAN link adds bytes / bandwidth). JSON to
bench/results/workstation.json (``--out``); ``--sizes 100000,1000000``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.core import logstate, workstation
from app.core.access import create_repository_as, open_repository_as
from app.core.settings import Settings
from app.core.workstation_index import segment_vectors
from cloud import layout, seglog
from cloud.directory_store import DirectoryStore
from cloud.segments import encode_segment_v2
from crypto import pack
from crypto.identity import Identity
from crypto.segment_mac import index_mac_key

DIM = 128


@dataclass
class Session:
    """What app/core/workstation.py needs of a session."""

    store: Any
    settings: Settings
    log_states: dict[str, Any] = field(default_factory=dict)


def commit(store: Any, settings: Settings, owner: Identity, repo: Any, data: np.ndarray,
           rows_per_pack: int) -> list[str]:
    """Commit ``data`` as the importer does in workstation mode; returns the image ids."""
    keys = repo.keys

    def segment(seg_id: str, batch_ids: list[str], batch: np.ndarray, state: Any) -> bytes:
        vectors = segment_vectors(repo.manifest, keys, batch, 0.0)
        return encode_segment_v2(batch_ids, vectors, keys.version, seg_id=seg_id,
                                 writer=owner.user_id, base_sequence=state.head.sequence,
                                 repo_id=repo.repo_id, mac_key=index_mac_key(keys.data_key))

    return commit_batches(store, settings, owner, repo, data, rows_per_pack, segment,
                          b"\x89PNG\r\n\x1a\n")


def commit_batches(store: Any, settings: Settings, owner: Identity, repo: Any,
                   data: np.ndarray, rows: int,
                   segment: Callable[[str, list[str], np.ndarray, Any], bytes],
                   preview: bytes) -> list[str]:
    """Commit ``data`` as import batches of ``rows`` images: per batch one pack (metadata,
    ``preview``, AES-GCM features) and the segment ``segment(seg_id, ids, rows, log
    state)`` encodes, one owner-signed log entry each (the benches of the workstation and
    CKKS modes build repositories of 100,000 images this way, without decoding images)."""
    keys, repo_id = repo.keys, repo.repo_id
    ids = [layout.new_id() for _ in range(len(data))]
    state = logstate.verified_log(store, settings, repo)
    for begin in range(0, len(data), rows):
        batch_ids, batch = ids[begin : begin + rows], data[begin : begin + rows]
        seg_id, pack_id = layout.new_id(), layout.new_id()
        blob = segment(seg_id, batch_ids, batch, state)
        metas = [(i, json.dumps({"format": "radcrypt-meta-v2",
                                 "name": f"image-{begin + j}.dcm"}).encode(), preview)
                 for j, i in enumerate(batch_ids)]
        packed = pack.build_pack(keys.data_key, repo_id, pack_id, keys.version, metas, batch)
        store.put(layout.pack_key(repo_id, pack_id), packed)
        store.put(layout.segment_key(repo_id, seg_id), blob)
        added = sorted([seglog.Added(seglog.TYPE_SEGMENT, seg_id,
                                     hashlib.sha256(blob).digest(), len(batch_ids)),
                        seglog.Added(seglog.TYPE_PACK, pack_id,
                                     hashlib.sha256(packed).digest(), len(batch_ids))],
                       key=lambda a: (a.type, a.id))
        state = seglog.append(store, repo_id, owner, owner.user_id,
                              logstate.repository_trust(store, repo), state,
                              kind=seglog.KIND_ADD, reason=seglog.REASON_IMPORT,
                              key_version=keys.version, added=added)
    logstate.remember_head(settings, repo_id, state.head)
    return ids


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_now_mb() -> float:
    """The resident set size now (Linux), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run_size(n: int, rows_per_pack: int, queries: int, k: int, seed: int,
             work: Path) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    store = DirectoryStore(work / f"bucket-{n}")
    store.ensure_bucket()
    settings = Settings(store="directory", data_dir=str(work / f"data-{n}"))
    owner = Identity.generate("Bench Owner")
    session = Session(store, settings)
    created = create_repository_as(session, owner, f"ws-{n}", search="workstation")
    repo = open_repository_as(session, owner, created.repo_id)
    data = rng.normal(0.0, 1.0, (n, DIM))
    t = time.perf_counter()
    ids = commit(store, settings, owner, repo, data, rows_per_pack)
    commit_s = time.perf_counter() - t
    bucket_mb = sum(size for _, size in store.list_objects(
        layout.packs_prefix(repo.repo_id))) / 1e6

    workstation.forget_all()
    index, first = workstation.sync(session, repo, identity=owner)
    more = rng.normal(0.0, 1.0, (64, DIM))
    ids += commit(store, settings, owner, repo, more, rows_per_pack)
    data = np.concatenate([data, more])
    _, grown = workstation.sync(session, repo, identity=owner)
    del index
    workstation.forget_all()  # a new process: the cache from disk, nothing new to fetch
    gc.collect()
    rss_before = _rss_now_mb()
    index, reopened = workstation.sync(session, repo, identity=owner)
    index_rss = _rss_now_mb() - rss_before

    qs = np.concatenate([data[rng.integers(0, len(data), queries // 2)]
                         + rng.normal(0, 0.01, (queries // 2, DIM)),
                         rng.normal(0, 1, (queries - queries // 2, DIM))])
    index.nearest(qs[:1], k)  # warm
    local_ms, exact = [], 0
    order = np.array(ids, dtype=object)
    for q in qs:
        t = time.perf_counter()
        got = index.nearest(q[None, :], k)[0]
        local_ms.append((time.perf_counter() - t) * 1000)
        diff = data - q
        dist = np.einsum("ij,ij->i", diff, diff)
        want = np.lexsort((order, dist))[:k]
        exact += got == [(ids[i], float(dist[i])) for i in want]
    full_ms = []
    for q in qs[: min(20, queries)]:
        t = time.perf_counter()
        workstation.search_features(session, repo, q, ["q"], k, identity=owner)
        full_ms.append((time.perf_counter() - t) * 1000)
    return {
        "n": n, "dim": DIM, "rows_per_pack": rows_per_pack, "packs": first.packs,
        "commit_seconds": round(commit_s, 2), "bucket_pack_mb": round(bucket_mb, 1),
        "first_sync": {"seconds": round(first.seconds, 2),
                       "mb_downloaded": round(first.bytes_downloaded / 1e6, 1),
                       "cache_mb_on_disk": round(first.cache_bytes / 1e6, 1)},
        "incremental_sync_64_images": {"seconds": round(grown.seconds, 3),
                                       "kb_downloaded": round(grown.bytes_downloaded / 1e3, 1),
                                       "packs_fetched": grown.packs_fetched},
        "new_process_sync_nothing_new": {"seconds": round(reopened.seconds, 2),
                                         "bytes_downloaded": reopened.bytes_downloaded},
        "local_topk_ms": {"k": k, "queries": queries, "p50": round(_pct(local_ms, 50), 2),
                          "p99": round(_pct(local_ms, 99), 2)},
        "search_features_ms": {"p50": round(_pct(full_ms, 50), 2),
                               "p99": round(_pct(full_ms, 99), 2),
                               "what": "sync check (manifest, log listing) + top-k + k "
                                       "metadata entries read by range and decrypted"},
        "memory": {"matrix_mb": round(index.features.nbytes / 1e6, 1),
                   "index_rss_growth_mb": round(index_rss, 1),
                   "bench_peak_rss_mb": round(_rss_mb(), 1),
                   "note": "bench peak includes the bench's own data and brute-force "
                           "temporaries"},
        "exact_queries": f"{exact}/{queries}",
        "bytes_per_query_to_server": 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000", help="comma-separated N")
    parser.add_argument("--rows-per-pack", type=int, default=4096,
                        help="images per pack (4096: compacted; 64: fresh imports)")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--out", default="bench/results/workstation.json")
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="radcrypt-bench-ws-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            result = run_size(n, args.rows_per_pack, args.queries, args.k, args.seed,
                              Path(tmp))
            print(json.dumps(result, indent=2), flush=True)
            runs.append(result)
    out = {"bench": "workstation", "machine": {"platform": platform.platform(),
                                               "cpus": os.cpu_count(),
                                               "load_average": list(os.getloadavg()),
                                               "python": sys.version.split()[0]},
           "store": "directory store on local disk (bytes as S3 would serve them)",
           "seed": args.seed, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
