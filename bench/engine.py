"""Encrypted exact search against plaintext brute force on the same vectors, same run.

    python -m bench.engine --n 100000 --d 128 --queries 200 --json out.json
    python -m bench.engine --n 1000000 --cases realistic/near,gaussian/fresh --threads 16

For each data kind, size and dimension it measures, per query: plaintext numpy brute
force (float32 and float64), faiss IndexFlatL2 when installed, the encrypted linear scan
and the encrypted filter-and-refine engine (median and p95), the fraction of vectors
fully scored, and agreement with plaintext (must be 1.0). Ratios are against plaintext
float32 measured in the same run (numpy's BLAS with its own thread count: all the cores
it finds). The engine runs ``--threads`` threads (default: RADCRYPT_THREADS, else the
CPUs this process may use, cloud/cpus.py); the JSON's "cores" says what the machine
offered and what each side used. Needs only numpy, numba and threadpoolctl (plus the
project's source): what a bare benchmark machine has. A benchmark, not a test: it never
fails on a time.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import datasets
from bench.realistic import real_feature_sample, realistic
from bench.report import write_json
from cloud import cpus
from cloud.search import ConcurrentSearches, EncryptedIndex, linear_scan, search, search_batch
from crypto.index import IndexKey

KINDS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "gaussian": datasets.gaussian,
    "clustered": datasets.clustered,
    "realistic": realistic,
}


def _timeit(fn: Callable[[int], Any], count: int) -> tuple[list[float], list[Any]]:
    times, outputs = [], []
    for i in range(count):
        start = time.perf_counter()
        outputs.append(fn(i))
        times.append((time.perf_counter() - start) * 1000.0)
    return times, outputs


def _summary(times: list[float]) -> dict[str, float]:
    return {"median_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95))}


def run_case(kind: str, n: int, d: int, queries: int, batch: int, seed: int,
             query_mode: str = "near", sweep: tuple[int, ...] = ()) -> dict[str, Any]:
    """``near``: queries are perturbed copies of stored vectors (a radiologist's query
    resembles an archived image); ``fresh``: queries drawn from the data's distribution
    independently of the stored vectors (the hard case for every bound). ``sweep``:
    other engine thread counts to time on the same index and queries (scaling, measured
    on one machine in one run)."""
    rng = np.random.default_rng(seed)
    data = KINDS[kind](rng, n, d)
    if query_mode == "near":
        qs = datasets.perturbed_queries(rng, data, queries, noise=0.05)
    else:
        qs = KINDS[kind](np.random.default_rng(seed + 1), queries, d)
    _, truth_dist = datasets.plaintext_topk(data, qs, 1)

    data32, qs32 = data.astype(np.float32), qs.astype(np.float32)
    half32 = 0.5 * np.einsum("ij,ij->i", data32, data32)
    half64 = 0.5 * np.einsum("ij,ij->i", data, data)
    plain32, _ = _timeit(lambda i: int(np.argmax(data32 @ qs32[i] - half32)), queries)
    plain64, _ = _timeit(lambda i: int(np.argmax(data @ qs[i] - half64)), queries)
    row: dict[str, Any] = {"kind": kind, "n": n, "d": d, "queries": queries,
                           "query_mode": query_mode, "engine_threads": cpus.engine_threads()}
    row["plain_f32"] = _summary(plain32)
    row["plain_blas_threads"] = _blas_threads()
    row["plain_f64"] = _summary(plain64)
    try:
        import faiss

        flat = faiss.IndexFlatL2(d)
        flat.add(data32)
        faiss_t, _ = _timeit(lambda i: flat.search(qs32[i : i + 1], 1), queries)
        row["faiss_flat_l2"] = _summary(faiss_t)
    except ImportError:
        row["faiss_flat_l2"] = None

    row["index_mb"] = None
    key = IndexKey.generate(d, sample=data[: min(n, 5000)])
    start = time.perf_counter()
    index = EncryptedIndex(key.encrypt(data))
    row["encrypt_s"] = time.perf_counter() - start
    coded = index.full_codes
    row["index_mb"] = (sum(a.nbytes for a in (*index.levels, index.full))
                       + (index.first32.nbytes if index.first32 is not None else 0)
                       + sum(a.nbytes for a in (coded.codes, coded.offset, coded.step,
                                                coded.slack, coded.size))) / 2**20
    row["plaintext_f32_mb"] = data32.nbytes / 2**20
    token = key.query(qs)
    singles = [token.select(i) for i in range(queries)]
    scan_count = min(queries, 30)
    scan_t, _ = _timeit(lambda i: linear_scan(index, singles[i], 1), scan_count)
    row["enc_linear"] = _summary(scan_t)
    fr_t, results = _timeit(lambda i: search(index, singles[i], 1), queries)
    row["enc_filter_refine"] = _summary(fr_t)
    row["fraction_fully_scored"] = float(np.mean([r.stats.fraction_fully_scored for r in results]))
    row["level_fraction"] = [
        float(np.mean([r.stats.level_scored[j] for r in results])) / n
        for j in range(len(key.levels))
    ]
    agree = [
        datasets.agrees(r.positions, data, qs[i], truth_dist[i]) for i, r in enumerate(results)
    ]
    row["agreement"] = float(np.mean(agree))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if batch > 1:
        row["batch"] = _batch_speedup(index, token, singles, min(batch, queries))
    base = row["plain_f32"]["median_ms"]
    row["sweep"] = [_with_threads(threads, index, token, singles, qs, data, truth_dist,
                                  min(batch, queries), base) for threads in sweep]
    row["ratio_filter_refine_vs_f32"] = row["enc_filter_refine"]["median_ms"] / base
    row["ratio_linear_vs_f32"] = row["enc_linear"]["median_ms"] / base
    if row["faiss_flat_l2"]:
        row["ratio_filter_refine_vs_faiss"] = (
            row["enc_filter_refine"]["median_ms"] / row["faiss_flat_l2"]["median_ms"]
        )
    return row


def _with_threads(threads: int, index: EncryptedIndex, token: Any, singles: list[Any],
                  qs: np.ndarray, data: np.ndarray, truth_dist: np.ndarray, batch: int,
                  plain_ms: float) -> dict[str, Any]:
    """The same searches on ``threads`` engine threads, then the count before restored."""
    before = cpus.engine_threads()
    cpus.set_threads(threads)
    try:
        times, results = _timeit(lambda i: search(index, singles[i], 1), len(singles))
        agree = [datasets.agrees(r.positions, data, qs[i], truth_dist[i])
                 for i, r in enumerate(results)]
        out: dict[str, Any] = {"threads": threads, "enc_filter_refine": _summary(times),
                               "ratio_filter_refine_vs_f32": float(np.median(times)) / plain_ms,
                               "agreement": float(np.mean(agree))}
        if batch > 1:
            out["batch"] = _batch_speedup(index, token, singles, batch)
        return out
    finally:
        cpus.set_threads(before)
        # The BLAS's thread count follows the engine's (cloud/search.py _BlasThreads) and
        # is re-applied when a search starts or ends: do it now, or the next case's
        # plaintext baseline would run on this sweep's count.
        with ConcurrentSearches().running():
            pass


def _batch_speedup(index: EncryptedIndex, token: Any, singles: list[Any], size: int,
                   repeats: int = 3) -> dict[str, Any]:
    """Throughput of ``size`` queries as one batch against the same queries one by one,
    alternated ``repeats`` times (medians), so a busy neighbour slows both alike."""
    sub = type(token)(full=token.full[:size], levels=tuple(a[:size] for a in token.levels))
    batch_s, singles_s, same = [], [], True
    for _ in range(repeats):
        start = time.perf_counter()
        batched = search_batch(index, sub, 1)
        batch_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        one_by_one = [search(index, singles[i], 1) for i in range(size)]
        singles_s.append(time.perf_counter() - start)
        same = same and all(a.positions.tolist() == b.positions.tolist()
                            for a, b in zip(batched, one_by_one, strict=True))
    batch_median, singles_median = float(np.median(batch_s)), float(np.median(singles_s))
    return {"size": size, "repeats": repeats, "batch_qps": size / batch_median,
            "single_qps": size / singles_median, "speedup": singles_median / batch_median,
            "same_results": same}


def estimated_gb(n: int, d: int) -> float:
    """Memory one case needs: plaintext copies (float64, float32, faiss) and the
    encrypted index (float64 levels and full vectors, a float32 copy of the first
    level, sixteen-bit codes of the full vectors), with the default levels (8, 32)
    and 8 artificial dimensions."""
    full = 2 * (d + 9)
    levels = sum(2 * (m + 2 + 8) for m in (8, 32))
    per_row = d * 16 + full * 10 + levels * 8 + 2 * (8 + 2 + 8) * 4 + 16
    return n * per_row * 1.6 / 2**30  # encryption temporaries: measured ~1.6x


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'kind':<16}{'n':>9}{'d':>5} {'plain f32':>10}{'plain f64':>10}{'faiss L2':>10}"
            f"{'enc scan':>10}{'enc F&R':>10}{'F&R p95':>10}{'ratio':>7}{'full%':>8}{'agree':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        faiss = r["faiss_flat_l2"]
        faiss_ms = f"{faiss['median_ms']:10.2f}" if faiss else f"{'-':>10}"
        label = f"{r['kind']}/{r['query_mode']}"
        print(f"{label:<16}{r['n']:>9}{r['d']:>5} {r['plain_f32']['median_ms']:10.2f}"
              f"{r['plain_f64']['median_ms']:10.2f}{faiss_ms}{r['enc_linear']['median_ms']:10.2f}"
              f"{r['enc_filter_refine']['median_ms']:10.2f}{r['enc_filter_refine']['p95_ms']:10.2f}"
              f"{r['ratio_filter_refine_vs_f32']:7.2f}{100 * r['fraction_fully_scored']:7.2f}%"
              f"{r['agreement']:7.3f}")
    print("times: median ms per single query; ratio = encrypted filter-and-refine / plaintext"
          " float32 brute force, same vectors, same run; full% = vectors fully scored")
    if any(r.get("batch") for r in rows):
        print(f"\n{'kind':<16}{'n':>9}{'d':>5} {'batch q/s':>10}{'single q/s':>11}{'speedup':>8}"
              f"{'same':>6}{'index MB':>10}{'plain MB':>10}")
        for r in rows:
            b = r.get("batch")
            if b:
                label = f"{r['kind']}/{r['query_mode']}"
                print(f"{label:<16}{r['n']:>9}{r['d']:>5} {b['batch_qps']:10.0f}"
                      f"{b['single_qps']:11.0f}{b['speedup']:8.1f}{b['same_results']!s:>6}"
                      f"{r['index_mb']:10.0f}{r['plaintext_f32_mb']:10.0f}")


def _one_line(r: dict[str, Any]) -> str:
    batch = r.get("batch") or {}
    return (f"{r['kind']}/{r['query_mode']} n={r['n']} d={r['d']}: plain f32 "
            f"{r['plain_f32']['median_ms']:.2f} ms, enc {r['enc_filter_refine']['median_ms']:.2f} "
            f"ms (ratio {r['ratio_filter_refine_vs_f32']:.2f}), "
            f"batch x{batch.get('speedup', 0):.1f}, agree {r['agreement']:.3f}, "
            f"{r['engine_threads']} engine threads"
            + "".join(f"; {w['threads']} threads: enc {w['enc_filter_refine']['median_ms']:.2f}"
                      f" ms (ratio {w['ratio_filter_refine_vs_f32']:.2f})"
                      for w in r.get("sweep", [])))


def _blas_threads() -> list[int]:
    """numpy's BLAS thread counts now (the plaintext side's)."""
    from threadpoolctl import threadpool_info

    return [int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"]


def cores() -> dict[str, Any]:
    """What the machine offers and what each side of the comparison uses."""
    from threadpoolctl import threadpool_info

    blas = [{"library": i.get("internal_api"), "version": i.get("version"),
             "threads": i.get("num_threads")}
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"os_cpu_count": os.cpu_count(), "affinity_cpus": cpus.affinity_cpus(),
            "cgroup_quota_cpus": cpus.cgroup_cpus(), "available_cpus": cpus.available_cpus(),
            "engine_threads": cpus.engine_threads(), "plaintext_blas": blas,
            "load_average": list(os.getloadavg())}


def _cases(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(kind, query mode) pairs: --cases, else every kind with every mode."""
    if args.cases:
        pairs = [tuple(item.split("/", 1)) for item in args.cases.split(",") if item]
        for pair in pairs:
            if len(pair) != 2 or pair[0] not in KINDS or pair[1] not in ("near", "fresh"):
                raise SystemExit(f"--cases {'/'.join(pair)}: expected KIND/MODE with KIND "
                                 f"one of {', '.join(KINDS)} and MODE near or fresh")
        return [(kind, mode) for kind, mode in pairs]
    return [(kind, mode) for mode in args.query_modes.split(",")
            for kind in args.kinds.split(",")]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if "--search" in args_in:  # the private modes' table (issue 19): bench/ckks.py
        at = args_in.index("--search")
        mode = args_in[at + 1] if at + 1 < len(args_in) else ""
        if mode != "ckks":
            raise SystemExit(f"bench.engine: --search takes ckks, not {mode!r} (the "
                             "workstation mode's figures: python -m bench.workstation)")
        from bench import ckks

        return ckks.main(args_in[:at] + args_in[at + 2 :])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=_ints, default=[100000], help="sizes, comma separated")
    parser.add_argument("--d", type=_ints, default=[128], help="dimensions, comma separated")
    parser.add_argument("--kinds", default="gaussian,realistic",
                        help="comma separated: gaussian, clustered, realistic")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--query-modes", default="near",
                        help="comma separated: near (perturbed copies), fresh (independent)")
    parser.add_argument("--cases", default="",
                        help="comma separated KIND/MODE pairs (e.g. realistic/near,"
                             "gaussian/fresh), instead of every kind with every mode")
    parser.add_argument("--threads", default=None, metavar="N",
                        help="the engine's threads (default: RADCRYPT_THREADS, else the "
                             "CPUs this process may use)")
    parser.add_argument("--sweep", type=_ints, default=[],
                        help="other engine thread counts to time on the same indexes "
                             "(comma separated)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench/results/engine.json"))
    parser.add_argument("--max-gb", type=float, default=14.0,
                        help="skip (and list) cases estimated to need more memory than this")
    args = parser.parse_args(argv)
    try:
        cpus.set_threads(None if args.threads is None
                         else cpus.parse_threads(args.threads, "--threads"))
    except ValueError as exc:
        raise SystemExit(f"bench.engine: {exc}") from None
    print(f"engine threads: {cpus.engine_threads()} (CPUs available: "
          f"{cpus.available_cpus()}, machine: {os.cpu_count()})", flush=True)
    rows, skipped = [], []
    for kind, mode in _cases(args):
        for n in args.n:
            for d in args.d:
                if estimated_gb(n, d) > args.max_gb:
                    skipped.append({"kind": kind, "query_mode": mode, "n": n, "d": d,
                                    "estimated_gb": round(estimated_gb(n, d), 1)})
                    continue
                rows.append(run_case(kind, n, d, args.queries, args.batch, args.seed, mode,
                                     tuple(args.sweep)))
                print(_one_line(rows[-1]), flush=True)
    print_table(rows)
    for case in skipped:
        print(f"skipped {case['kind']}/{case['query_mode']} n={case['n']} d={case['d']}: needs "
              f"~{case['estimated_gb']} GB (--max-gb {args.max_gb})")
    _, source = real_feature_sample()
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "numpy": np.__version__},
        "cores": cores(),
        "realistic_source": source,
        "rows": rows,
        "skipped": skipped,
    }
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
