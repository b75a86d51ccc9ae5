"""End to end through HTTP: token, signed request, search, fetch and decrypt of 512 KB.

    python -m bench.e2e --n 100000 --queries 30

A repository in storage format 2 (the default) of n images on the embedded SeaweedFS
store: n realistic feature vectors (matching real image features) encrypted into
authenticated segments, committed with their packs (metadata, a placeholder preview and
the feature array) by owner-signed log entries; ``queries`` images also have a real
512 KB original. Every answer is checked complete against the log. The search service
runs as its own process with signed requests checked against the owner's key. For each
perturbed query it measures token, signed search over HTTP, metadata fetch and decrypt,
and the original's fetch and decrypt; and, in the same run, plaintext numpy brute force
over the same vectors and a plain (unencrypted) download of the same number of bytes.
Also: segment load rate and the service's resident memory. A benchmark: it never fails
on a time.

Protocols: with the same tokens, in the same run, alternating, one signed search per
query with wire protocol 1 (JSON, base64 token) and with protocol 2 (binary,
cloud/wire.py), each timed from the client's call to its decoded answer (token made
before), and split into the engine's time inside the service (protocol 1: the query's
stats milliseconds; protocol 2: the answer's engine_us) and the service overhead, the
rest (signing, HTTP, verification, encoding and decoding). Then the same for one batch
of all the queries with k = 10.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench import datasets
from bench.realistic import realistic
from bench.report import write_json
from cloud import wire
from crypto.tokens import QueryToken

if TYPE_CHECKING:
    from app.core.service_client import ServiceClient

OBJECT_BYTES = 512 * 1024


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory (VmRSS), or its peak so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(n: int, queries: int, work: Path) -> dict[str, object]:
    from app.core import objects
    from app.core.access import create_repository_as, session_for
    from app.core.searcher import search_features
    from app.core.settings import Settings
    from crypto.identity import Identity

    rng = np.random.default_rng(0)
    data = realistic(rng, n, 128)
    owner = Identity.generate("Bench Owner")
    settings = Settings(store="local", data_dir=str(work / "data"))
    report: dict[str, object] = {"n": n, "queries": queries, "storage_format": 2}
    with session_for(settings, owner) as session:
        store = session.store
        repo = create_repository_as(session, owner, "e2e-bench", storage_format=2)
        start = time.perf_counter()
        ids, segment_bytes = datasets.commit_vectors(store, settings, owner, repo, data)
        report["encrypt_upload_s"] = time.perf_counter() - start
        picks = rng.choice(n, queries, replace=False)
        for i in picks:
            original = os.urandom(OBJECT_BYTES)
            objects.put_encrypted(store, repo.keys, repo.repo_id, "objects", ids[i], original)
        store.put("bench/plain-512k", os.urandom(OBJECT_BYTES))
        service = session.service
        start = time.perf_counter()
        refreshed = service.refresh(repo.repo_id)
        load_s = time.perf_counter() - start
        assert session._embedded_service is not None
        report["segments_mb"] = segment_bytes / 2**20
        report["segment_load_s"] = load_s
        report["segment_load_mb_s"] = segment_bytes / 2**20 / load_s
        report["service_rss_mb"] = _rss_mb(session._embedded_service.process.pid)
        report["service_peak_rss_mb"] = _rss_mb(session._embedded_service.process.pid, "VmHWM")
        report["images_served"] = refreshed["images"]
        qs = datasets.perturbed_queries(rng, data[picks], queries, noise=0.05)
        data32 = data.astype(np.float32)
        half = 0.5 * np.einsum("ij,ij->i", data32, data32)
        rows: list[dict[str, float]] = []
        agree = 0
        for qi in range(queries):
            t0 = time.perf_counter()
            result = search_features(session, repo, qs[qi : qi + 1], [f"q{qi}"], k=1)[0]
            t1 = time.perf_counter()
            hit = result.hits[0]
            assert result.complete is True, "the service left live segments out"
            objects.fetch_original(store, repo.ring, repo.repo_id, hit.image_id,
                                   work / "fetched.bin")
            t2 = time.perf_counter()
            plain_best = int(np.argmax(data32 @ qs[qi].astype(np.float32) - half))
            t3 = time.perf_counter()
            store.get("bench/plain-512k")
            t4 = time.perf_counter()
            agree += hit.image_id == ids[plain_best] or abs(
                hit.distance - float(((data[plain_best] - qs[qi]) ** 2).sum())) < 1e-9
            timings = result.timings_ms
            rows.append({"total_ms": (t2 - t0) * 1000, "search_ms": (t1 - t0) * 1000,
                         "token_ms": timings.get("token", float("nan")),
                         "server_ms": timings.get("server", float("nan")),
                         "engine_ms": float(result.stats.get("milliseconds", float("nan"))),
                         "meta_ms": timings.get("fetch_decrypt", float("nan")),
                         "fetch_decrypt_ms": (t2 - t1) * 1000,
                         "plain_search_ms": (t3 - t2) * 1000, "plain_get_ms": (t4 - t3) * 1000})
        report["rss_after_queries_mb"] = _rss_mb(session._embedded_service.process.pid)
        key_version = repo.keys.version
        tokens = [repo.keys.index_key.query(qs[qi : qi + 1]) for qi in range(queries)]
        report["protocols"] = _compare_protocols(service, repo.repo_id, key_version, tokens,
                                                 repo.keys.index_key.query(qs))
    report["agreement"] = agree / queries
    report["median"] = {key: float(np.median([r[key] for r in rows])) for key in rows[0]}
    report["p95"] = {key: float(np.percentile([r[key] for r in rows], 95)) for key in rows[0]}
    report["in_order"] = [{key: round(value, 2) for key, value in r.items()} for r in rows]
    return report


def _compare_protocols(service: ServiceClient, repo_id: str, key_version: int,
                       tokens: list[QueryToken], batch: QueryToken) -> dict[str, object]:
    """Round trip, engine and overhead (round trip minus engine) of protocols 1 and 2,
    alternating which goes first, over the same signed connection; the first call of
    each is a warm-up."""
    def one(protocol: int, token: QueryToken, k: int) -> tuple[float, float, list[str]]:
        started = time.perf_counter()
        if protocol == 1:
            results = service.search(repo_id, token, k, key_version)["results"]
            round_trip = time.perf_counter() - started
            engine = sum(float(r["stats"]["milliseconds"]) for r in results)
            return round_trip * 1000, engine, [r["hits"][0]["image_id"] for r in results]
        answer = service.search_v2(repo_id, token, k, key_version)
        round_trip = time.perf_counter() - started
        return round_trip * 1000, answer.engine_us / 1000, [h[0][0] for h in answer.hits]

    one(1, tokens[0], 1)
    one(2, tokens[0], 1)
    rows: list[dict[str, float]] = []
    for i, token in enumerate(tokens):
        order = (1, 2) if i % 2 == 0 else (2, 1)
        got = {p: one(p, token, 1) for p in order}
        assert got[1][2] == got[2][2], "protocols 1 and 2 disagree"
        rows.append({f"p{p}_{what}": value for p, (rt, engine, _) in got.items()
                     for what, value in (("round_trip_ms", rt), ("engine_ms", engine),
                                         ("overhead_ms", rt - engine))})
    out: dict[str, object] = {
        "single_query_median": {k: float(np.median([r[k] for r in rows])) for k in rows[0]},
        "single_query_p95": {k: float(np.percentile([r[k] for r in rows], 95))
                             for k in rows[0]}}
    batch_rows = []
    for i in range(5):
        got = {p: one(p, batch, 10) for p in ((1, 2) if i % 2 == 0 else (2, 1))}
        batch_rows.append({f"p{p}_{what}": value for p, (rt, engine, _) in got.items()
                           for what, value in (("round_trip_ms", rt), ("engine_ms", engine),
                                               ("overhead_ms", rt - engine))})
    out["batch_queries"] = len(batch)
    out["batch_k"] = 10
    out["batch_median"] = {k: float(np.median([r[k] for r in batch_rows]))
                           for k in batch_rows[0]}
    p1_body = len(json.dumps({"token": base64.b64encode(batch.to_bytes()).decode(), "k": 10,
                              "key_version": key_version}, separators=(",", ":")))
    p2_body = len(wire.encode_request(wire.SearchRequestV2(key_version, 10, 0, 0, batch)))
    out["batch_request_bytes"] = {"p1": p1_body, "p2": p2_body}
    return out


def _print_protocols(report: dict[str, object]) -> None:
    proto = report["protocols"]
    assert isinstance(proto, dict)
    print(f"{'protocol comparison (ms)':<34}{'round trip':>11}{'engine':>9}{'overhead':>10}")
    for label, key in (("1 query, k=1, median", "single_query_median"),
                       ("1 query, k=1, p95", "single_query_p95"),
                       (f"{proto['batch_queries']} queries, k=10, median", "batch_median")):
        row = proto[key]
        for p in (1, 2):
            print(f"  protocol {p}: {label:<23}{row[f'p{p}_round_trip_ms']:11.2f}"
                  f"{row[f'p{p}_engine_ms']:9.2f}{row[f'p{p}_overhead_ms']:10.2f}")
    sizes = proto["batch_request_bytes"]
    print(f"  batch request body: protocol 1 {sizes['p1']:,} bytes, protocol 2 "
          f"{sizes['p2']:,} bytes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100000)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--json", type=Path, default=Path("bench/results/e2e.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="radcrypt-e2e-") as tmp:
        report = run(args.n, args.queries, Path(tmp))
    med, p95 = report["median"], report["p95"]
    assert isinstance(med, dict) and isinstance(p95, dict)
    print(f"n = {args.n}, {args.queries} queries, agreement with plaintext "
          f"{report['agreement']:.3f}")
    print(f"{'stage':<34}{'median ms':>10}{'p95 ms':>10}")
    labels = [("total (token .. decrypted original)", "total_ms"), ("  token", "token_ms"),
              ("  signed search over HTTP", "server_ms"), ("    engine inside the service",
                                                           "engine_ms"),
              ("  hit metadata fetch + decrypt", "meta_ms"),
              ("  512 KB original fetch + decrypt", "fetch_decrypt_ms"),
              ("baseline: plaintext numpy search", "plain_search_ms"),
              ("baseline: plain 512 KB download", "plain_get_ms")]
    for label, key in labels:
        print(f"{label:<34}{med[key]:10.2f}{p95[key]:10.2f}")
    print(f"segments {report['segments_mb']:.0f} MB loaded in {report['segment_load_s']:.2f} s "
          f"({report['segment_load_mb_s']:.0f} MB/s); service RSS "
          f"{report['service_rss_mb']:.0f} MB after load (peak "
          f"{report['service_peak_rss_mb']:.0f} MB), "
          f"{report['rss_after_queries_mb']:.0f} MB after the queries")
    _print_protocols(report)
    report["machine"] = f"{platform.platform()}, {os.cpu_count()} cores, load average " \
                        f"{os.getloadavg()[0]:.1f} at the end"
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
