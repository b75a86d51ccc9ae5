"""Where a single query's time goes in the CPU engine, per stage and thread count.

    python -m bench.stages --n 1000000 --threads 16,8,2 --queries 20 --json out.json

bench.engine says how fast a query is; this says which stage does not scale when the
cores grow (issue 20: from 2 to 16 engine threads a Gaussian fresh query gained only
3.3x while numpy's float32 brute force reached the machine's memory bandwidth). For each
kind of vectors, fresh queries (the hard case: every row scored through the codes), and
each engine thread count, the median milliseconds of:

- ``first``: the float32 first level of every row (_first_level_scores, with seeds);
- ``codes``: the sixteen-bit codes scan alone (cloud/codes.scan), and the candidates it
  leaves per query;
- ``scan``: the codes scan and the float64 rescoring of its candidates (_scan_codes);
- ``search``: the whole query (cloud.search.search);
- ``numpy``: plaintext float32 brute force on the same number of BLAS threads.

Runs on a bare machine with numpy, numba and threadpoolctl (the GPU machine). A
benchmark: it prints a table and writes JSON, it never fails on a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from bench import datasets
from cloud import codes, cpus
from cloud import search as engine
from cloud.search import EncryptedIndex
from crypto.index import IndexKey


def _median_ms(fn: Callable[[int], Any], count: int) -> float:
    fn(0)  # warm: compiled loops, pools, caches
    times = []
    for i in range(count):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def _vectors(kind: str, n: int, queries: int, features: Path | None
             ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(20)
    if kind == "gaussian":
        return datasets.gaussian(rng, n, 128), datasets.gaussian(rng, queries, 128)
    sample = np.load(features) if features else datasets.low_rank_varying(rng, 2000, 128)
    return (datasets.matching_moments(rng, n, sample),
            datasets.matching_moments(np.random.default_rng(21), queries, sample))


def stages(kind: str, n: int, threads: list[int], queries: int,
           features: Path | None) -> dict[str, Any]:
    data, qs = _vectors(kind, n, queries, features)
    key = IndexKey.generate(128, sample=data[:5000])
    start = time.perf_counter()
    index = EncryptedIndex(key.encrypt(data))
    built = time.perf_counter() - start
    token = key.query(qs)
    singles = [token.select(i) for i in range(queries)]
    data32 = data.astype(np.float32)
    half = 0.5 * np.einsum("ij,ij->i", data32, data32)
    q32 = qs.astype(np.float32)
    no_floor = np.array([-np.inf])
    out: dict[str, Any] = {"kind": kind, "n": n, "queries": queries, "build_s": built,
                           "runs": []}
    before = cpus.engine_threads()
    for count in threads:
        cpus.set_threads(count)
        candidates: list[int] = []

        def codes_only(i: int, candidates: list[int] = candidates) -> None:
            found = codes.scan(index.full_codes, token.full[i][None, :], 1, no_floor,
                               engine._row_spans(n), engine._threaded)
            candidates.append(int(found.rows[0].size))

        row = {
            "threads": count,
            "first_ms": _median_ms(lambda i: engine._first_level_scores(
                index, token.levels[0][i], seed_k=1), queries),
            "codes_ms": _median_ms(codes_only, queries),
            "scan_ms": _median_ms(lambda i: engine._scan_codes(
                index, token.full[i][None, :], 1), queries),
            "search_ms": _median_ms(lambda i: engine.search(index, singles[i], 1), queries),
        }
        row["codes_candidates_median"] = float(np.median(candidates))
        row["codes_gb_per_s"] = index.full_codes.codes.nbytes / row["codes_ms"] / 1e6
        with threadpool_limits(limits=count, user_api="blas"):
            row["numpy_ms"] = _median_ms(lambda i: int(np.argmax(data32 @ q32[i] - half)),
                                         queries)
        out["runs"].append(row)
        print(f"{kind} n={n} threads={count}: first {row['first_ms']:.2f}  codes "
              f"{row['codes_ms']:.2f} ({row['codes_gb_per_s']:.1f} GB/s, "
              f"{row['codes_candidates_median']:.0f} candidates)  scan {row['scan_ms']:.2f}  "
              f"search {row['search_ms']:.2f}  numpy f32 {row['numpy_ms']:.2f} ms", flush=True)
    cpus.set_threads(before)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--kinds", default="gaussian,realistic")
    parser.add_argument("--threads", default="16,8,2")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--features", type=Path, default=None,
                        help="real radcrypt-v1 features (.npy) for the realistic vectors")
    parser.add_argument("--json", type=Path, default=Path("bench/results/stages.json"))
    args = parser.parse_args()
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "engine_threads": cpus.engine_threads()},
        "cases": []}
    for kind in filter(None, args.kinds.split(",")):
        report["cases"].append(stages(kind, args.n, [int(t) for t in args.threads.split(",")],
                                      args.queries, args.features))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
