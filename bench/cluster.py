"""The cluster against one service: 4 shards of N images against one index of 4N.

    python -m bench.cluster --n 50000 --shards 4 --clients 1,8,32 --seconds 10

One format-2 repository of shards x N realistic 128-d vectors (bound levels as the
product's keys), segments of ``--segment`` rows, in a private directory store. Then:

* one process: the repository's index (cloud/repo_index.py) and the engine
  (cloud.search.search_batch), searched by C client threads back to back;
* the cluster: a local Ray cluster (tests/cluster/raycluster.py: head + one worker node,
  one CPU each), ``--shards`` shard actors (cloud/cluster), searched through the front's
  fan-out and merge (ClusterFront.search) by C concurrent requests.

Both answer one query, k = 10, with real tokens; both are checked against each other
(same hits for the same token) before the clock runs. Neither side includes HTTP or
signature checks (the same for both: bench/load.py measures them). Reported per client
count: requests, p50/p99 latency, throughput; per shard: rows, resident memory, load time.
JSON in bench/results/cluster.json. On a 2-core machine the shards and the front share the
same two cores, so the cluster can only lose: what it measures is its overhead (fan-out,
Ray, merge) and the per-shard figures that size a real deployment (docs/SCALING.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.realistic import realistic
from bench.report import write_json

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "tests" / "cluster"))

RESULTS = PROJECT / "bench" / "results" / "cluster.json"
K = 10
TOKENS = 64
SERVICE_ID = "svc-bench-cluster"


def _percentiles(latencies: list[float], seconds: float) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "throughput_per_s": round(len(latencies) / seconds, 1)}


def single_run(index: Any, ids: Any, tokens: list[Any], clients: int,
               seconds: float) -> dict[str, float]:
    """C threads searching one index back to back (the single service's engine path)."""
    from cloud.search import ConcurrentSearches, search_batch

    concurrent = ConcurrentSearches()
    latencies: list[float] = []
    lock = threading.Lock()
    until = time.monotonic() + seconds

    def client(offset: int) -> None:
        i, mine = offset, []
        while time.monotonic() < until:
            started = time.perf_counter()
            with concurrent.running():
                search_batch(index, tokens[i % len(tokens)], K)
            mine.append(time.perf_counter() - started)
            i += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _percentiles(latencies, seconds)


def cluster_run(front: Any, repo_id: str, tokens: list[Any], clients: int,
                seconds: float) -> dict[str, float]:
    """C concurrent requests through the front's fan-out and merge."""
    latencies: list[float] = []
    errors: list[str] = []

    async def client(offset: int, until: float) -> None:
        i = offset
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                await front.search(repo_id, 1, tokens[i % len(tokens)], K)
            except Exception as exc:  # counted, never hidden
                errors.append(f"{type(exc).__name__}: {exc}"[:120])
            else:
                latencies.append(time.perf_counter() - started)
            i += 1

    async def main() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(client(c, until) for c in range(clients)))

    asyncio.run(main())
    result: dict[str, Any] = _percentiles(latencies, seconds) if latencies else {}
    result["errors"] = len(errors)
    if errors:
        result["first_error"] = errors[0]
    return result


def _rss_mib(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="images per shard")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--segment", type=int, default=25_000, help="rows per segment")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", action="store_true",
                        help="both sides keep their float64 rows in cache files (the "
                             "service's --cache-dir; resident: the float32 first level and "
                             "the codes), as a deployment of millions of images per node does")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]

    from raycluster import local_cluster
    from repo_builder import BucketRepo

    from cloud.backend import DirectoryConfig
    from cloud.cluster.front import ClusterFront, ClusterOptions
    from cloud.repo_index import RepoIndex
    from cloud.search import search_batch

    rng = np.random.default_rng(args.seed)
    total = args.n * args.shards
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_start": os.getloadavg()},
        "images_per_shard": args.n, "shards": args.shards, "images": total, "d": 128,
        "k": K, "seconds_per_point": args.seconds, "seed": args.seed,
        "cache_files": args.cache}
    with tempfile.TemporaryDirectory(prefix="radcrypt-bench-cluster-") as work:
        started = time.monotonic()
        data = realistic(rng, total, 128)
        repo = BucketRepo.create(Path(work) / "bucket", "bench-cluster", args.seed, dim=128,
                                 sample=data[:5000])
        for begin in range(0, total, args.segment):
            repo.add(data[begin:begin + args.segment])
        report["build_seconds"] = round(time.monotonic() - started, 1)
        picks = rng.choice(total, TOKENS, replace=False)
        queries = data[picks] + rng.normal(scale=0.05, size=(TOKENS, 128)) * data.std()
        tokens = [repo.token(queries[i:i + 1]) for i in range(TOKENS)]
        del data

        started, before = time.monotonic(), _rss_mib(os.getpid())
        whole = RepoIndex(repo.store, "bench-cluster", owner_keys=[repo.owner.sign_public],
                          cache_dir=Path(work) / "cache-single" if args.cache else None)
        snap = whole.refresh()
        version = snap.versions[1]
        report["single_load_seconds"] = round(time.monotonic() - started, 1)
        report["single_rss_mib"] = _rss_mib(os.getpid())
        report["single_index_mib"] = round(report["single_rss_mib"] - before, 1)
        report["index_bytes_per_image"] = round(report["single_index_mib"] * 2**20 / total)
        report["single"] = {str(c): single_run(version.index, version.image_ids, tokens, c,
                                               args.seconds) for c in clients}
        expected = [[version.image_ids[int(p)] for p in search_batch(version.index, t, K)[0]
                     .positions] for t in tokens[:8]]
        del whole, snap, version

        with local_cluster() as cluster:
            import ray

            ray.init(address=cluster.address, namespace="radcrypt", logging_level="ERROR",
                     log_to_driver=False)
            try:
                options = ClusterOptions(SERVICE_ID, shards=args.shards, deadline=120.0,
                                         shard_cpus=2 / args.shards, refresh_interval=3600,
                                         cache_root=(str(Path(work) / "cache-cluster")
                                                     if args.cache else None))
                started = time.monotonic()
                front = ClusterFront(options, DirectoryConfig(Path(work) / "bucket"),
                                     [repo.owner.sign_public], preload=["bench-cluster"])
                answers = asyncio.run(front.fan_out("refresh", ("bench-cluster",)))
                report["cluster_load_seconds"] = round(time.monotonic() - started, 1)
                for i, token in enumerate(tokens[:8]):
                    _, hits = asyncio.run(front.search("bench-cluster", 1, token, K))
                    if [h for h, _ in hits[0]] != expected[i]:
                        raise SystemExit(f"cluster answer {i} differs from the single index")
                pids = front.pids()
                report["per_shard"] = [
                    {"name": a.shard, "images": a.images, "segments": len(a.segment_ids),
                     "rss_mib": _rss_mib(p[0][1])} for a, p in zip(answers, pids, strict=True)]
                report["cluster"] = {str(c): cluster_run(front, "bench-cluster", tokens, c,
                                                         args.seconds) for c in clients}
                front.kill()
            finally:
                ray.shutdown()
    report["load_average_at_end"] = os.getloadavg()
    print(report)
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
