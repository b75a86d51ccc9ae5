"""What a repository pays for --bound-levels off: search time with and without levels.

    python -m bench.levels_off [--n 100000] [--d 128] [--queries 100]

Same vectors, same ciphertexts of the full vectors, same queries, same run: the index with
the bound levels (8, 32; basis fitted on a first batch of 64 vectors, as a new repository
does) against the index of the full vectors alone, which the engine answers by scanning the
sixteen-bit codes of every full vector (cloud/search.py). Realistic vectors (mean and
covariance of real radcrypt-v1 features); "near" queries are perturbed copies of stored
vectors (a radiologist's query resembles an archived image), "fresh" ones independent
draws. Exactness is checked against plaintext brute force for both. A measurement, not a
test: it never fails on a time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import datasets
from bench.realistic import realistic
from bench.report import write_json
from cloud.search import EncryptedIndex, search, search_batch
from crypto.index import IndexKey
from crypto.tokens import EncryptedVectors, QueryToken


def _times(fn: Any, count: int) -> tuple[list[float], list[Any]]:
    times, out = [], []
    for i in range(count):
        start = time.perf_counter()
        out.append(fn(i))
        times.append((time.perf_counter() - start) * 1000.0)
    return times, out


def run(n: int, d: int, queries: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    data = realistic(rng, n, d)
    key = IndexKey.generate(d, sample=data[:64])
    start = time.perf_counter()
    enc = key.encrypt(data, norm_bound=4.0)
    encrypt_s = time.perf_counter() - start
    with_levels = EncryptedIndex(enc)
    full_only = EncryptedIndex(EncryptedVectors(full=enc.full, levels=()))
    rows: list[dict[str, Any]] = []
    for mode in ("near", "fresh"):
        if mode == "near":
            qs = datasets.perturbed_queries(rng, data, queries, noise=0.05)
        else:
            qs = realistic(np.random.default_rng(seed + 1), queries, d)
        _, truth = datasets.plaintext_topk(data, qs, 1)
        token = key.query(qs)
        off_token = QueryToken(full=token.full, levels=())
        row: dict[str, Any] = {"query_mode": mode}
        for label, index, tok in (("levels_on", with_levels, token),
                                  ("levels_off", full_only, off_token)):
            singles = [tok.select(i) for i in range(queries)]
            search(index, singles[0], 1)  # warm
            times, results = _times(lambda i, s=singles, x=index: search(x, s[i], 1), queries)
            agree = np.mean([datasets.agrees(r.positions, data, qs[i], truth[i])
                             for i, r in enumerate(results)])
            start = time.perf_counter()
            search_batch(index, tok, 1)
            batch_ms = (time.perf_counter() - start) * 1000.0 / queries
            row[label] = {"median_ms": float(np.median(times)),
                          "p95_ms": float(np.percentile(times, 95)),
                          "batch_ms_per_query": batch_ms, "agreement": float(agree),
                          "fraction_fully_scored": float(np.mean(
                              [r.stats.fraction_fully_scored for r in results]))}
        row["slowdown_median"] = row["levels_off"]["median_ms"] / row["levels_on"]["median_ms"]
        rows.append(row)
    return {"n": n, "d": d, "queries": queries, "encrypt_s": encrypt_s, "rows": rows,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "python": platform.python_version(), "numpy": np.__version__},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench/results/levels-off.json"))
    args = parser.parse_args(argv)
    report = run(args.n, args.d, args.queries, args.seed)
    print(f"n = {report['n']}, d = {report['d']}, {report['queries']} queries, "
          f"{report['machine']['cpus']} CPUs")
    print(f"{'queries':<8}{'levels':<8}{'median ms':>10}{'p95 ms':>9}{'batch ms/q':>11}"
          f"{'full %':>8}{'agree':>7}")
    for row in report["rows"]:
        for label in ("levels_on", "levels_off"):
            r = row[label]
            print(f"{row['query_mode']:<8}{label[7:]:<8}{r['median_ms']:10.2f}{r['p95_ms']:9.2f}"
                  f"{r['batch_ms_per_query']:11.2f}{100 * r['fraction_fully_scored']:8.2f}"
                  f"{r['agreement']:7.3f}")
        print(f"{'':<8}levels off is {row['slowdown_median']:.1f}x the median time")
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
