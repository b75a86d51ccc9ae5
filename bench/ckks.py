"""The private search modes' trade-off, measured on the same vectors in one run (issue 19).

    python -m bench.ckks --n 10000,100000 --queries 1000 --timed 20
    python -m bench.engine --search ckks ...   (the same, through the engine bench)
    python -m bench.ckks --product 10000 --queries 200   (through the product: ``run_product``)

For each size: plaintext numpy float32 brute force (the floor), the secure-kNN engine
(exact, fast, known-plaintext leakage) and the CKKS mode (crypto/ckks.py, cloud/ckks_engine.py):
client query encryption, the service's encrypted scoring on every worker process, the client's
decryption, candidate selection within the error bound and exact re-scoring. Reported: per
query latency split by side, upload and download bytes per query, index size and encryption
time, the largest CKKS score error seen, and top-1 agreement with plaintext over ``--queries``
queries (the error bound and re-scoring make it exact; a disagreement is printed).

``--product N`` measures the product instead of the scheme: a ckks repository of N realistic
images committed as the importer and compaction leave them (a pack with each image's
metadata and AES-GCM feature row, a segment of 4,096 rows with its CKKS block, an
owner-signed log entry each), in a directory store on this machine, searched through the
client's own search path (app/core/searcher.search_features -> app/core/ckks_search.py) and
the embedded search service (a local process over HTTP, the product's default): per query
p50/p95 of the whole call (log check, query encryption, service scoring, decryption,
candidate choice, exact re-scoring from the packs' features, the hit's metadata) and of each
part, bytes up and down the service link (counted at the signed request), bytes read from
the store, and top-1 agreement with plaintext. The same vectors in an sknn repository
through the same path for comparison. JSON to bench/results/ckks-product.json.

A benchmark, not a test: it never fails on a time. Realistic vectors as bench.engine makes
them (bench/realistic.py), near queries (perturbed copies of stored vectors).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import datasets
from bench.realistic import realistic
from bench.report import write_json
from cloud import cpus
from cloud.ckks_engine import CkksScorer
from cloud.search import EncryptedIndex, search
from crypto import ckks
from crypto.index import IndexKey


def _ms(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values) * 1000.0
    return {"median_ms": float(np.median(arr)), "p95_ms": float(np.percentile(arr, 95)),
            "count": len(values)}


def run_size(n: int, d: int, queries: int, timed: int, workers: int, seed: int,
             block: int = 4096) -> dict[str, Any]:
    """``block``: vectors per CKKS block: 4,096 as compaction writes them (diagonal), or
    an import batch's 64 (rows) for an uncompacted repository."""
    rng = np.random.default_rng(seed)
    data = realistic(rng, n, d)
    qs = datasets.perturbed_queries(rng, data, queries, noise=0.05)
    truth, truth_dist = datasets.plaintext_topk(data, qs, 1)
    row: dict[str, Any] = {"n": n, "d": d, "queries": queries, "workers": workers}

    data32, qs32 = data.astype(np.float32), qs.astype(np.float32)
    half32 = 0.5 * np.einsum("ij,ij->i", data32, data32)
    times = []
    for i in range(min(queries, 200)):
        t = time.perf_counter()
        int(np.argmax(data32 @ qs32[i] - half32))
        times.append(time.perf_counter() - t)
    row["plain_f32"] = _ms(times)

    key = IndexKey.generate(d, sample=data[: min(n, 5000)])
    index = EncryptedIndex(key.encrypt(data))
    token = key.query(qs)
    times = []
    for i in range(min(queries, 200)):
        single = token.select(i)
        t = time.perf_counter()
        search(index, single, 1)
        times.append(time.perf_counter() - t)
    row["sknn"] = _ms(times)
    row["sknn_upload_bytes"] = len(token.select(0).to_bytes())

    seed_bytes = ckks.seed_from_data_key(os.urandom(32), "bench", 1)
    client = ckks.CkksKey(seed_bytes)
    evaluation = client.evaluation_keys(ckks.period_of(d))
    t = time.perf_counter()
    blocks = [client.encrypt_block(data[i : i + block]) for i in range(0, n, block)]
    row["ckks_block"] = block
    row["ckks_layouts"] = sorted({"rows" if ckks.header(b.data, "block")[0] == ckks.KIND_ROWS
                                  else "diagonal" for b in blocks})
    row["ckks_encrypt_s"] = time.perf_counter() - t
    row["ckks_index_mb"] = sum(len(b.data) for b in blocks) / 2**20
    row["ckks_evaluation_keys_mb"] = len(evaluation) / 2**20
    row["plaintext_f32_mb"] = data32.nbytes / 2**20
    counts = [b.count for b in blocks]
    t = time.perf_counter()
    scorer = CkksScorer(evaluation, [b.data for b in blocks], workers=workers)
    row["ckks_load_s"] = time.perf_counter() - t
    row["scorer_workers"] = scorer.workers  # what the scorer's rule made of ``workers``
    enc_t, svc_t, dec_t, total_t, errors, wrong = [], [], [], [], [], []
    upload = download = candidates = 0
    try:
        for i in range(queries):
            t0 = time.perf_counter()
            query = client.encrypt_query(qs[i], blocks[0].period)
            t1 = time.perf_counter()
            answer = scorer.scores(query)
            t2 = time.perf_counter()
            scores = client.decrypt_scores(answer, counts)
            rows = ckks.candidates(scores, 1)
            best = ckks.exact_top_k(data, qs[i], rows, 1)
            t3 = time.perf_counter()
            enc_t.append(t1 - t0)
            svc_t.append(t2 - t1)
            dec_t.append(t3 - t2)
            total_t.append(t3 - t0)
            upload, download = len(query), len(answer)
            candidates += len(rows)
            if i < 20:
                exact = data @ qs[i] - 0.5 * np.einsum("ij,ij->i", data, data)
                errors.append(float(np.abs(scores - exact).max()))
            if not datasets.agrees(np.asarray([best[0][0]]), data, qs[i], truth_dist[i]):
                wrong.append(i)
            if i + 1 >= timed and i + 1 < queries and i % 50 == 0:
                print(f"  n={n}: {i + 1}/{queries} queries checked", flush=True)
    finally:
        scorer.close()
    row["ckks_client_encrypt"] = _ms(enc_t)
    row["ckks_service"] = _ms(svc_t)
    row["ckks_client_decrypt_rescore"] = _ms(dec_t)
    row["ckks_total"] = _ms(total_t)
    row["ckks_upload_bytes"] = upload
    row["ckks_download_bytes"] = download
    row["ckks_mean_candidates"] = candidates / max(queries, 1)
    row["ckks_max_score_error"] = max(errors) if errors else None
    row["ckks_error_bound"] = ckks.ERROR_BOUND
    row["ckks_top1_agreement"] = 1.0 - len(wrong) / max(queries, 1)
    row["ckks_disagreements"] = wrong[:20]
    row["truth_example"] = int(truth[0][0]) if len(truth) else None
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base = row["plain_f32"]["median_ms"]
    row["ratio_sknn_vs_f32"] = row["sknn"]["median_ms"] / base
    row["ratio_ckks_vs_f32"] = row["ckks_total"]["median_ms"] / base
    return row


# --- through the product (--product N) -------------------------------------------------


class _CountingStore:
    """The session's store, counting the bytes its reads return (the client's downloads
    from the bucket: metadata and feature arrays of the packs)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.read = 0

    def get(self, key: str, *args: Any, **kwargs: Any) -> bytes:
        data: bytes = self.inner.get(key, *args, **kwargs)
        self.read += len(data)
        return data

    def get_range(self, key: str, *args: Any, **kwargs: Any) -> bytes:
        data: bytes = self.inner.get_range(key, *args, **kwargs)
        self.read += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _commit_ckks(store: Any, settings: Any, owner: Any, repo: Any, data: np.ndarray,
                 rows: int) -> list[str]:
    """Commit ``data`` as a ckks repository's importer and compaction leave it: per
    ``rows`` images one pack (metadata, preview, AES-GCM features) and one segment (ids,
    the zero column, the CKKS block of its rows), one owner-signed log entry each."""
    from app.core import ckks_blocks
    from bench.workstation import commit_batches
    from cloud.segments import encode_segment_v2
    from crypto.segment_mac import index_mac_key
    from crypto.tokens import EncryptedVectors

    keys = repo.keys
    ckks_blocks.ensure_eval_keys(store, repo, keys.version)

    def segment(seg_id: str, batch_ids: list[str], batch: np.ndarray, state: Any) -> bytes:
        block = ckks_blocks.block_for(repo, keys.version, batch)
        return encode_segment_v2(batch_ids, EncryptedVectors(full=np.zeros((len(batch), 1)),
                                                             levels=()),
                                 keys.version, seg_id=seg_id, writer=owner.user_id,
                                 base_sequence=state.head.sequence, repo_id=repo.repo_id,
                                 mac_key=index_mac_key(keys.data_key), ckks=block)

    return commit_batches(store, settings, owner, repo, data, rows, segment, b"\x89PNG")


def _pcts(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values)
    return {"p50": round(float(np.median(arr)), 2),
            "p95": round(float(np.percentile(arr, 95)), 2), "count": len(values)}


def _through_product(session: Any, repo: Any, ids: list[str], data: np.ndarray,
                     qs: np.ndarray, truth_dist: np.ndarray, counted: _CountingStore
                     ) -> dict[str, Any]:
    """Q single-query searches through app/core/searcher.search_features (either mode)."""
    from app.core.searcher import search_features

    service = session.service
    exchange = service._exchange
    link = {"up": 0, "down": 0}

    def counting(path: str, body: bytes, protocol: int = 1) -> Any:
        answer = exchange(path, body, protocol=protocol)
        link["up"] += len(body)
        link["down"] += len(answer.content)
        return answer

    service._exchange = counting
    position = {image_id: n for n, image_id in enumerate(ids)}
    walls: list[float] = []
    parts: dict[str, list[float]] = {}
    ups, downs, reads, candidates, wrong = [], [], [], [], []
    t = time.perf_counter()
    search_features(session, repo, qs[:1], ["warm-up"], 1)  # loads the service's index
    first_s = time.perf_counter() - t
    first_read = counted.read
    try:
        for i in range(len(qs)):
            link["up"] = link["down"] = 0
            counted.read = 0
            t = time.perf_counter()
            result = search_features(session, repo, qs[i : i + 1], [f"q{i}"], 1)[0]
            walls.append((time.perf_counter() - t) * 1000)
            assert result.complete is True, "the service left live segments out"
            for part, ms in result.timings_ms.items():
                parts.setdefault(part, []).append(ms)
            ups.append(link["up"])
            downs.append(link["down"])
            reads.append(counted.read)
            candidates.append(int(result.stats.get("candidates", 1)))
            found = np.asarray([position[result.hits[0].image_id]])
            if not datasets.agrees(found, data, qs[i], truth_dist[i]):
                wrong.append(i)
    finally:
        service._exchange = exchange
    return {"query_ms": _pcts(walls), "parts_ms": {k: _pcts(v) for k, v in parts.items()},
            "first_query_s": round(first_s, 2), "first_query_store_read_mb":
            round(first_read / 2**20, 2),
            "upload_bytes_p50": int(np.median(ups)), "download_bytes_p50": int(np.median(downs)),
            "store_read_bytes_p50": int(np.median(reads)),
            "mean_candidates": round(float(np.mean(candidates)), 2),
            "top1_agreement": f"{len(qs) - len(wrong)}/{len(qs)}", "disagreements": wrong[:20]}


def run_product(n: int, d: int, queries: int, seed: int, work: Path) -> dict[str, Any]:
    """``--product N`` (module docstring): a ckks and an sknn repository of the same N
    vectors, each searched Q times through the client and the embedded service."""
    from app.core import ckks_blocks
    from app.core.access import create_repository_as, session_for
    from app.core.settings import Settings
    from crypto.identity import Identity

    rng = np.random.default_rng(seed)
    data = realistic(rng, n, d)
    qs = datasets.perturbed_queries(rng, data, queries, noise=0.05)
    _, truth_dist = datasets.plaintext_topk(data, qs, 1)
    owner = Identity.generate("Bench Owner")
    settings = Settings(store="directory", data_dir=str(work / f"data-{n}"))
    row: dict[str, Any] = {"n": n, "d": d, "queries": queries, "load_average_start":
                           [round(x, 2) for x in os.getloadavg()]}
    with session_for(settings, owner) as session:
        store = session.store
        t = time.perf_counter()
        repo = create_repository_as(session, owner, f"ckks-{n}", search="ckks")
        ids = _commit_ckks(store, settings, owner, repo, data, ckks_blocks.BLOCK_IMAGES)
        row["ckks_commit_s"] = round(time.perf_counter() - t, 1)
        row["ckks_segments"] = -(-n // ckks_blocks.BLOCK_IMAGES)
        counted = _CountingStore(store)
        session._store = counted
        print(f"  n={n}: ckks repository committed in {row['ckks_commit_s']} s", flush=True)
        row["ckks"] = _through_product(session, repo, ids, data, qs, truth_dist, counted)
        print(f"  n={n}: ckks {row['ckks']['query_ms']}", flush=True)
        session._store = store
        t = time.perf_counter()
        plain = create_repository_as(session, owner, f"sknn-{n}")
        plain_ids, _ = datasets.commit_vectors(store, settings, owner, plain, data)
        row["sknn_commit_s"] = round(time.perf_counter() - t, 1)
        session._store = counted
        row["sknn"] = _through_product(session, plain, plain_ids, data, qs, truth_dist,
                                       counted)
        print(f"  n={n}: sknn {row['sknn']['query_ms']}", flush=True)
        session._store = store
    ckks_blocks.forget()
    row["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    row["peak_rss_mb_bench_process"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def client_ms(r: dict[str, Any]) -> float:
    return float(r["ckks_client_encrypt"]["median_ms"]
                 + r["ckks_client_decrypt_rescore"]["median_ms"])


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'n':>8} {'plain ms':>9} {'sknn ms':>8} {'ckks ms':>9} {'(svc':>7} {'client)':>8} "
          f"{'up KB':>7} {'down KB':>8} {'index MB':>9} {'top-1':>6}")
    for r in rows:
        print(f"{r['n']:>8} {r['plain_f32']['median_ms']:>9.2f} {r['sknn']['median_ms']:>8.2f} "
              f"{r['ckks_total']['median_ms']:>9.1f} {r['ckks_service']['median_ms']:>7.1f} "
              f"{client_ms(r):>8.1f} "
              f"{r['ckks_upload_bytes'] / 1024:>7.0f} {r['ckks_download_bytes'] / 1024:>8.0f} "
              f"{r['ckks_index_mb']:>9.0f} {r['ckks_top1_agreement']:>6.3f}")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=_ints, default=[10000, 100000])
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000,
                        help="queries checked for top-1 agreement (each also timed)")
    parser.add_argument("--timed", type=int, default=20, help="(progress lines after this)")
    parser.add_argument("--workers", type=int, default=None,
                        help="service worker processes (default: the CPUs this process may use)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block", type=int, default=4096,
                        help="vectors per CKKS block (4096: compacted; 64: import batches)")
    parser.add_argument("--json", type=Path, default=None,
                        help="default bench/results/ckks.json (ckks-product.json with "
                             "--product)")
    parser.add_argument("--product", type=_ints, default=None, metavar="N[,N]",
                        help="measure through the client and the embedded service instead "
                             "(repositories of N images; --queries per size)")
    args = parser.parse_args(argv)
    if args.product:
        return product_main(args)
    args.json = args.json or Path("bench/results/ckks.json")
    workers = args.workers or cpus.engine_threads()
    print(f"CKKS service workers: {workers} (CPUs available {cpus.available_cpus()}, "
          f"machine {os.cpu_count()})", flush=True)
    rows = []
    for n in args.n:
        rows.append(run_size(n, args.d, args.queries, args.timed, workers, args.seed,
                             args.block))
        print_table(rows[-1:])
    print_table(rows)
    write_json(args.json, {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "parameters": {"poly_degree": ckks.POLY_DEGREE, "coeff_bits": list(ckks.COEFF_BITS),
                       "scale_bits": 40, "security": "128-bit classical (HE standard, SEAL "
                       "TC128)", "error_bound": ckks.ERROR_BOUND},
        "rows": rows,
    })
    return 0


def product_main(args: argparse.Namespace) -> int:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="radcrypt-ckks-product-") as work:
        for n in args.product:
            rows.append(run_product(n, args.d, args.queries, args.seed, Path(work)))
            print(f"{'n':>8} {'mode':>5} {'p50 ms':>8} {'p95 ms':>8} {'up KB':>7} "
                  f"{'down KB':>8} {'store KB':>9} {'top-1':>9}")
            for mode in ("ckks", "sknn"):
                r = rows[-1][mode]
                print(f"{n:>8} {mode:>5} {r['query_ms']['p50']:>8.1f} "
                      f"{r['query_ms']['p95']:>8.1f} {r['upload_bytes_p50'] / 1024:>7.0f} "
                      f"{r['download_bytes_p50'] / 1024:>8.0f} "
                      f"{r['store_read_bytes_p50'] / 1024:>9.0f} {r['top1_agreement']:>9}",
                      flush=True)
            write_json(args.json or Path("bench/results/ckks-product.json"), {
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                            "python": platform.python_version()},
                "what": "through the product: app/core/searcher.search_features and the "
                        "embedded search service (local process, HTTP on 127.0.0.1), "
                        "directory store on local disk; ckks segments of 4,096 images "
                        "(diagonal blocks, as compaction leaves them)",
                "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
