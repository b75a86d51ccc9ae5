"""The GPU backend (cloud/gpu) against plaintext numpy on all CPU cores, same run.

    python -m bench.gpu --n 1000000,4000000 --queries 100 --json out.json

Runs on a machine with only numpy, threadpoolctl and cupy (the GPU machine): the
realistic vectors are drawn as bench.engine draws them (bench/datasets.matching_moments
on real features), from ``--features`` (a .npy file of real radcrypt-v1 features: the
cache bench/realistic.py writes) when given. The largest size is built once; smaller
sizes are its first rows. For each size and query kind (near: perturbed stored vectors,
fresh: independent draws) it measures, per query: numpy float32 brute force on every
core, and the GPU engine in each mode (median, p95, agreement with float64 plaintext
brute force, which must be 1.000); batches of ``--batch`` queries; the raw device scans;
and loading segment files into device memory (GB/s). A benchmark: it never fails on a
time, but it exits 1 when any answer disagrees.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from bench import datasets
from cloud.gpu import engine
from cloud.gpu.device import array_module
from crypto.index import IndexKey
from crypto.tokens import EncryptedVectors, QueryToken

CHUNK = 100_000


def _features(path: Path | None) -> tuple[np.ndarray, str]:
    """Real features (the file, else bench/realistic's cache), else a stand-in, said so."""
    candidates = [path] if path else []
    try:
        import platformdirs

        candidates.append(Path(platformdirs.user_cache_dir("radcrypt"))
                          / "bench-real-features-v1.npy")
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and candidate.exists():
            return np.load(candidate), f"radcrypt-v1 features of sample images ({candidate.name})"
    print("note: no real features; realistic vectors use a synthetic stand-in", file=sys.stderr)
    return datasets.low_rank_varying(np.random.default_rng(0), 2000, 128), "synthetic stand-in"


def _parallel(fn: Callable[[int], Any], count: int, threads: int) -> list[Any]:
    with threadpool_limits(1), ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, range(count)))


def build(n: int, sample: np.ndarray, seed: int, threads: int
          ) -> tuple[np.ndarray, IndexKey, EncryptedVectors, float]:
    """n realistic vectors (chunks drawn in threads, each from its own seed) and their
    ciphertexts (encrypted in threads); the seconds encryption took."""
    seeds = np.random.SeedSequence(seed).spawn(-(-n // CHUNK))
    parts = _parallel(lambda i: datasets.matching_moments(
        np.random.default_rng(seeds[i]), min(CHUNK, n - i * CHUNK), sample), len(seeds), threads)
    data = np.concatenate(parts)
    key = IndexKey.generate(data.shape[1], sample=data[:5000])
    start = time.perf_counter()
    encrypted = _parallel(lambda i: key.encrypt(data[i * CHUNK : (i + 1) * CHUNK]),
                          len(seeds), threads)
    seconds = time.perf_counter() - start
    vectors = EncryptedVectors(
        full=np.concatenate([e.full for e in encrypted]),
        levels=tuple(np.concatenate([e.levels[j] for e in encrypted])
                     for j in range(len(encrypted[0].levels))))
    return data, key, vectors, seconds


def _summary(times: list[float]) -> dict[str, float]:
    return {"median_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)),
            "min_ms": float(np.min(times))}


def truth(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    dists = [datasets.plaintext_topk(data, queries[i : i + 32], k)[1]
             for i in range(0, len(queries), 32)]
    return np.concatenate(dists)


def cpu_baseline(data32: np.ndarray, half32: np.ndarray, qs32: np.ndarray, batch: int
                 ) -> dict[str, Any]:
    """numpy float32 brute force with the BLAS's threads (every core)."""
    singles = []
    for q in qs32[:30]:
        start = time.perf_counter()
        int(np.argmax(data32 @ q - half32))
        singles.append((time.perf_counter() - start) * 1000.0)
    batches = []
    sub = np.ascontiguousarray(qs32[:batch])
    for _ in range(3):
        start = time.perf_counter()
        (sub @ data32.T - half32[None, :]).argmax(axis=1)
        batches.append((time.perf_counter() - start) * 1000.0)
    blas = [i.get("num_threads") for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"single": _summary(singles), "batch_ms": float(np.median(batches)),
            "batch": batch, "blas_threads": blas}


def gpu_singles(index: engine.DeviceIndex, token: QueryToken, data: np.ndarray,
                qs: np.ndarray, dists: np.ndarray, k: int, mode: str) -> dict[str, Any]:
    for i in range(min(3, len(token))):
        engine.search(index, token.select(i), k, mode)  # warm-up: kernels compiled
    times, agree, levels = [], [], []
    for i in range(len(token)):
        start = time.perf_counter()
        result = engine.search(index, token.select(i), k, mode)
        times.append((time.perf_counter() - start) * 1000.0)
        agree.append(datasets.agrees(result.positions, data, qs[i], dists[i]))
        levels.append(result.stats.level_scored[1:] if result.stats.level_scored else [])
    out = _summary(times)
    out["agreement"] = float(np.mean(agree))
    if index.xp is not np:  # where a query's time goes: the device's work, the host's
        from cupyx.profiler import benchmark

        one = token.select(0)
        timed = benchmark(lambda: engine.search(index, one, k, mode), n_repeat=30, n_warmup=3)
        out["device_ms"] = float(np.median(timed.gpu_times)) * 1000.0
        out["host_ms"] = float(np.median(timed.cpu_times)) * 1000.0
    out["finer_level_scored_mean"] = (np.mean(levels, axis=0).tolist()
                                      if levels and levels[0] else [])
    return out


def gpu_batch(index: engine.DeviceIndex, token: QueryToken, data: np.ndarray, qs: np.ndarray,
              dists: np.ndarray, k: int, size: int, mode: str) -> dict[str, Any]:
    sub = QueryToken(full=token.full[:size], levels=tuple(a[:size] for a in token.levels))
    engine.search_batch(index, sub, k, mode)  # warm-up
    times, agree = [], []
    for _ in range(5):
        start = time.perf_counter()
        results = engine.search_batch(index, sub, k, mode)
        times.append((time.perf_counter() - start) * 1000.0)
        agree.append(np.mean([datasets.agrees(r.positions, data, qs[i], dists[i])
                              for i, r in enumerate(results)]))
    return {"size": size, "median_ms": float(np.median(times)), "min_ms": float(np.min(times)),
            "agreement": float(np.min(agree))}


def raw_scans(xp: Any, index: engine.DeviceIndex, batch: int) -> dict[str, float]:
    """Device time of the bare products the modes are built from (CUDA events)."""
    from cupyx.profiler import benchmark

    out: dict[str, float] = {}
    rng = np.random.default_rng(0)
    t_full = xp.asarray(rng.standard_normal(index.widths[-1]))
    cases: dict[str, Callable[[], Any]] = {"full64_gemv": lambda: index.full @ t_full}
    if index.full32 is not None:
        t32 = t_full.astype(xp.float32)
        cases["full32_gemv"] = lambda: index.full32 @ t32
        tb32 = xp.asarray(rng.standard_normal((index.widths[-1], batch)), dtype=xp.float32)
        cases[f"full32_gemm_{batch}"] = lambda: index.full32 @ tb32
    tb64 = xp.asarray(rng.standard_normal((index.widths[-1], batch)))
    cases[f"full64_gemm_{batch}"] = lambda: index.full @ tb64
    if index.first32 is not None:
        t0 = xp.asarray(rng.standard_normal(index.widths[0]), dtype=xp.float32)
        cases["first32_gemv"] = lambda: index.first32 @ t0
    for name, fn in cases.items():
        result = benchmark(fn, n_repeat=20, n_warmup=3)
        out[name + "_ms"] = float(np.median(result.gpu_times)) * 1000.0
    full_bytes = index.full.nbytes
    out["full64_gemv_gb_per_s"] = full_bytes / (out["full64_gemv_ms"] / 1000.0) / 1e9
    return out


def segment_load(xp: Any, vectors: EncryptedVectors, rows: int, count: int,
                 threads_list: list[int]) -> dict[str, Any]:
    """Write ``count`` segments of ``rows`` rows to a temporary folder (page cache), then
    load them into device memory with each thread count; check the arrays arrived.

    Then the service's own path (issue 20): the search service's DeviceSearcher loads
    the same files as it loads a served index of a directory store, each file's SHA-256
    compared with the one the service verified, a repeated id kept once, the rows' ids
    compared with the snapshot's, on its own thread count; its DeviceLoad record gives
    the figure ("service" below). Only the snapshot lookup of cloud/gpu/segment_files.py
    (which files hold the index: a dictionary lookup per segment) is stood in for.
    """
    import hashlib
    import secrets

    from cloud.gpu.backend import DeviceSearcher
    from cloud.gpu.loader import load_segments
    from cloud.gpu.segment_files import Source
    from cloud.segments import encode_segment

    folder = Path(tempfile.mkdtemp(prefix="radcrypt-gpu-segments-"))
    ids = [[secrets.token_bytes(16) for _ in range(rows)] for _ in range(count)]

    def write(i: int) -> tuple[Path, bytes]:
        part = EncryptedVectors(full=vectors.full[i * rows : (i + 1) * rows],
                                levels=tuple(a[i * rows : (i + 1) * rows] for a in vectors.levels))
        path = folder / f"segment-{i}"
        body = encode_segment([b.hex() for b in ids[i]], part, 1)
        path.write_bytes(body)
        return path, hashlib.sha256(body).digest()

    with ThreadPoolExecutor(8) as pool:
        written = list(pool.map(write, range(count)))
    paths = [path for path, _ in written]
    out: dict[str, Any] = {"segments": count, "rows_each": rows,
                           "bytes_each": paths[0].stat().st_size, "runs": []}
    for threads in threads_list:
        loaded = load_segments(xp, paths, threads=threads)
        same = bool(xp.array_equal(loaded.index.full[:rows], xp.asarray(vectors.full[:rows])))
        out["runs"].append({"threads": threads, "seconds": loaded.seconds,
                            "gb_per_s": loaded.gigabytes_per_second, "arrived_intact": same})
        del loaded
    source = Source("bench", 1, [p.name for p in paths], paths, [d for _, d in written],
                    np.frombuffer(b"".join(b"".join(part) for part in ids), dtype="V16"))
    served = _ServedIndex()
    searcher = DeviceSearcher(xp, files=_KnownFiles(source))  # type: ignore[arg-type]
    copy = searcher.device_index(served)  # type: ignore[arg-type]
    record = searcher.loads[-1]
    out["service"] = {
        "origin": record.origin, "rows": record.rows, "segments": record.segments,
        "bytes_read": record.bytes_read, "seconds": record.seconds,
        "gb_per_s": record.bytes_read / record.seconds / 1e9, "refused": record.refused,
        "arrived_intact": bool(xp.array_equal(copy.full[:rows], xp.asarray(vectors.full[:rows])))}
    del copy, searcher
    for path in paths:
        path.unlink()
    folder.rmdir()
    return out


class _ServedIndex:
    """Stands for the service's EncryptedIndex: the searcher keys its device copies by it
    (a weak reference) and, when the files pass, never reads its rows."""


class _KnownFiles:
    """What cloud/gpu/segment_files.SegmentFiles answers for a served index of a
    directory store: its files, their verified SHA-256 and the snapshot's ids."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def source(self, index: object) -> Any:
        return self._source


def selfcheck(xp: Any, sample: np.ndarray) -> dict[str, Any]:
    """Small cases, every mode and several k, on the device and on numpy: same answers
    as float64 plaintext brute force, and the device agrees with numpy."""
    rows = []
    ok = True
    for kind in ("realistic", "gaussian"):
        rng = np.random.default_rng(5)
        data = (datasets.matching_moments(rng, 30000, sample) if kind == "realistic"
                else datasets.gaussian(rng, 30000, 128))
        key = IndexKey.generate(128, sample=data[:5000])
        vectors = key.encrypt(data)
        qs = np.concatenate([datasets.perturbed_queries(rng, data, 10, 0.05),
                             datasets.gaussian(rng, 10, 128) * data.std() + data.mean()])
        token = key.query(qs)
        dev = engine.DeviceIndex.from_vectors(xp, [vectors])
        host = engine.DeviceIndex.from_vectors(np, [vectors])
        for k in (1, 5, 20):
            _, dists = datasets.plaintext_topk(data, qs, k)
            for mode in engine.MODES:
                agree, same = [], []
                for i in range(len(qs)):
                    got = engine.search(dev, token.select(i), k, mode)
                    ref = engine.search(host, token.select(i), k, mode)
                    agree.append(datasets.agrees(got.positions, data, qs[i], dists[i]))
                    same.append(np.array_equal(got.positions, ref.positions))
                rows.append({"kind": kind, "k": k, "mode": mode, "agreement": float(np.mean(agree)),
                             "same_as_numpy": float(np.mean(same))})
                ok = ok and rows[-1]["agreement"] == 1.0
            for mode in engine.BATCH_MODES:
                got_b = engine.search_batch(dev, token, k, mode)
                agree_b = np.mean([datasets.agrees(r.positions, data, qs[i], dists[i])
                                   for i, r in enumerate(got_b)])
                rows.append({"kind": kind, "k": k, "mode": "batch-" + mode,
                             "agreement": float(agree_b)})
                ok = ok and agree_b == 1.0
    return {"ok": ok, "rows": rows}


def _device_info(xp: Any) -> dict[str, Any]:
    if xp is np:
        return {"name": "numpy (no GPU)"}
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    name = props["name"]
    return {"name": name.decode() if isinstance(name, bytes) else str(name),
            "memory_gib": props["totalGlobalMem"] / 2**30,
            "multiprocessors": props["multiProcessorCount"], "cupy": xp.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="1000000,4000000", help="sizes, comma separated")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (numpy)")
    parser.add_argument("--features", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads that build the data")
    parser.add_argument("--segments", type=int, default=8, help="segments in the load test")
    parser.add_argument("--json", type=Path, default=Path("bench/results/gpu.json"))
    parser.add_argument("--skip", default="", help="comma separated: selfcheck, load, raw, cpu")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    xp = array_module(args.device)
    sizes = sorted(int(x) for x in args.n.split(",") if x)
    sample, source = _features(args.features)
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "cpus": os.cpu_count(),
                    "device": _device_info(xp)},
        "realistic_source": source, "k": args.k, "rows": [], "errors": []}

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=_plain))

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # a benchmark reports what failed and goes on
            report["errors"].append({"stage": name, "error": repr(exc),
                                     "trace": traceback.format_exc()[-2000:]})
            print(f"[{name}] FAILED: {exc!r}", flush=True)
            value = None
        print(f"[{name}] {time.perf_counter() - start:.1f} s", flush=True)
        save()
        return value

    if "selfcheck" not in skip:
        report["selfcheck"] = stage("selfcheck", lambda: selfcheck(xp, sample))
    built = stage("build", lambda: build(sizes[-1], sample, args.seed, args.threads))
    if built is None:
        return 1
    data, key, vectors, encrypt_s = built
    report["build"] = {"n": sizes[-1], "encrypt_s": encrypt_s, "widths": list(vectors.widths)}
    data32 = data.astype(np.float32)
    half32 = 0.5 * np.einsum("ij,ij->i", data32, data32)
    full_index = stage("index", lambda: engine.DeviceIndex.from_vectors(xp, [vectors]))
    if full_index is None:
        return 1
    for n in sizes:
        if n == sizes[-1]:
            index = full_index
        else:
            index = engine.DeviceIndex.from_device(
                xp, full_index.full[:n], [xp.asarray(vectors.levels[0][:n]),
                                          *(a[:n] for a in full_index.levels)])
        sub = data[:n]
        rng = np.random.default_rng(args.seed + n)
        query_sets = {
            "near": datasets.perturbed_queries(rng, sub, args.queries, noise=0.05),
            "fresh": datasets.matching_moments(np.random.default_rng(args.seed + 1),
                                               args.queries, sample)}
        if "raw" not in skip and xp is not np:
            report.setdefault("raw", {})[str(n)] = stage(
                f"raw {n}", lambda index=index: raw_scans(xp, index, args.batch))
        for mode_name, qs in query_sets.items():
            dists = truth(sub, qs, args.k)
            token = key.query(qs)
            row: dict[str, Any] = {"n": n, "query_mode": mode_name, "queries": args.queries}
            if "cpu" not in skip:
                row["numpy_f32_all_cores"] = stage(
                    f"cpu {n} {mode_name}",
                    lambda qs=qs, n=n: cpu_baseline(data32[:n], half32[:n],
                                                    qs.astype(np.float32), args.batch))
            for mode in engine.MODES:
                row[f"gpu_{mode}"] = stage(
                    f"gpu {mode} {n} {mode_name}",
                    lambda mode=mode, token=token, qs=qs, dists=dists, index=index, sub=sub: (
                        gpu_singles(index, token, sub, qs, dists, args.k, mode)))
            for mode in engine.BATCH_MODES:
                row[f"gpu_batch_{mode}"] = stage(
                    f"gpu batch {mode} {n} {mode_name}",
                    lambda mode=mode, token=token, qs=qs, dists=dists, index=index, sub=sub: (
                        gpu_batch(index, token, sub, qs, dists, args.k,
                                  min(args.batch, args.queries), mode)))
            report["rows"].append(row)
            save()
            print(_line(row), flush=True)
        del index
    del full_index
    if "load" not in skip:
        rows = min(125_000, sizes[-1] // max(1, args.segments))
        report["segment_load"] = stage("load", lambda: segment_load(
            xp, vectors, rows, args.segments, sorted({1, 4, args.segments})))
    save()
    print_table(report)
    bad = [r for r in report["rows"] for key_, v in r.items()
           if key_.startswith("gpu") and v and v.get("agreement", 1.0) != 1.0]
    selfcheck_ok = (report.get("selfcheck") or {"ok": "selfcheck" in skip}).get("ok")
    return 0 if not bad and selfcheck_ok and not report["errors"] else 1


def _plain(value: Any) -> Any:
    """numpy scalars as JSON numbers."""
    return value.item() if hasattr(value, "item") else str(value)


def _ms(entry: dict[str, Any] | None, key: str = "median_ms") -> str:
    return f"{entry[key]:.3f}" if entry else "-"


def _line(row: dict[str, Any]) -> str:
    parts = [f"n={row['n']} {row['query_mode']}:"]
    cpu = row.get("numpy_f32_all_cores")
    if cpu:
        parts.append(f"numpy f32 {cpu['single']['median_ms']:.2f} ms")
    for mode in engine.MODES:
        entry = row.get(f"gpu_{mode}")
        if entry:
            parts.append(f"gpu {mode} {entry['median_ms']:.3f} ms (agree {entry['agreement']:.3f})")
    for mode in engine.BATCH_MODES:
        entry = row.get(f"gpu_batch_{mode}")
        if entry:
            parts.append(f"batch {mode} {entry['median_ms']:.2f} ms "
                         f"(agree {entry['agreement']:.3f})")
    return ", ".join(parts)


def print_table(report: dict[str, Any]) -> None:
    device = report["machine"]["device"]["name"]
    first = (report["rows"] or [{}])[0].get("gpu_batch_f32") or {}
    print(f"\ndevice {device}, {report['machine']['cpus']} CPUs; median ms per query "
          f"(batch: per batch of {first.get('size', '-')})")
    print(f"{'n':>8} {'queries':<6} {'np f32':>8} {'levels':>8} {'f32':>8} {'f64':>8} "
          f"{'np batch':>9} {'b f32':>8} {'b f64':>8}")
    for r in report["rows"]:
        cpu = r.get("numpy_f32_all_cores") or {}
        print(f"{r['n']:>8} {r['query_mode']:<6} "
              f"{cpu.get('single', {}).get('median_ms', float('nan')):8.2f} "
              f"{_ms(r.get('gpu_levels')):>8} {_ms(r.get('gpu_f32')):>8} "
              f"{_ms(r.get('gpu_f64')):>8} "
              f"{cpu.get('batch_ms', float('nan')):9.2f} {_ms(r.get('gpu_batch_f32')):>8} "
              f"{_ms(r.get('gpu_batch_f64')):>8}")
    load = report.get("segment_load")
    if load:
        for run in load["runs"]:
            print(f"segments -> device: {run['threads']} threads {run['gb_per_s']:.2f} GB/s "
                  f"(intact {run['arrived_intact']})")
        service = load.get("service")
        if service:
            print(f"segments -> device, the service's path: {service['segments']} files "
                  f"from {service['origin']}, {service['gb_per_s']:.2f} GB/s "
                  f"(intact {service['arrived_intact']}, refused {service['refused'] or 'none'})")
    if report.get("errors"):
        print(f"{len(report['errors'])} stage(s) failed: "
              + ", ".join(e["stage"] for e in report["errors"]))


if __name__ == "__main__":
    raise SystemExit(main())
