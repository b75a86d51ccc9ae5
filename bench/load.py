"""Load: concurrent signed clients against the search service, each a distinct member.

    python -m bench.load --n 100000 --clients 32 --seconds 60

A format-2 repository of ``n`` realistic vectors (encrypted segments and packs committed
by owner-signed log entries, as bench.e2e builds it) on the embedded SeaweedFS store; 32
users registered by the owner and granted access; the search service as its own process
(the product's EmbeddedService) with its rate limits set above the load. Each client is
a thread with its own user, identity signer and kept-alive connection, sending
protocol-2 searches (one query, k = 10, real tokens) back to back for ``seconds``.

Reported (printed, and JSON in bench/results/load.json): requests, errors by kind,
throughput, p50/p90/p99 latency after the warm-up, the service's resident memory (its
growth: the mean of its last 5 s against that of its first 5 s after the warm-up; the
peak beside it, and the curve every 5 s), and whether the
audit trail is complete: every search answered counted once, per user, in the audit
batches the service wrote. A benchmark reports; tests/test_load.py asserts.

Python threads share one interpreter: on a small machine the clients' own CPU (signing,
encoding, decoding) competes with the service's, so the throughput is a floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import datasets
from bench.realistic import realistic
from bench.report import write_json

RESULTS = Path(__file__).parent / "results" / "load.json"
TOKENS = 64  # distinct query tokens the clients cycle through
K = 10
UNLIMITED = ("--user-rate", "100000", "--user-burst", "100000",
             "--address-rate", "100000", "--address-burst", "100000")


@dataclass
class Target:
    """What the clients search: the service, the repository, its members and tokens."""

    url: str
    service_id: str
    service_pid: int
    repo_id: str
    key_version: int
    users: list[Any]  # crypto.identity.Identity, one per client
    tokens: list[Any]  # crypto.tokens.QueryToken
    store: Any  # cloud.backend.Store, to read the audit batches
    images: int = 0


@dataclass
class ClientResult:
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)
    errors: Counter[str] = field(default_factory=Counter)


def build_repository(session: Any, owner: Any, n: int, rng: np.random.Generator
                     ) -> tuple[Any, np.ndarray]:
    """A format-2 repository of ``n`` encrypted realistic vectors, committed as the
    importer commits (segment + pack per log entry, signed by the owner); fast because
    it skips decoding images. Returns the repository and the plaintext vectors."""
    from app.core.access import create_repository_as

    data = realistic(rng, n, 128)
    repo = create_repository_as(session, owner, "load-bench", storage_format=2)
    datasets.commit_vectors(session.store, session.settings, owner, repo, data)
    return repo, data


def add_members(session: Any, owner: Any, repo: Any, count: int) -> list[Any]:
    """``count`` new users, registered by the owner and granted access to ``repo``."""
    from app.core.access import grant_access, register_user
    from crypto.identity import Identity

    users = [Identity.generate(f"Load user {i}") for i in range(count)]
    for user in users:
        register_user(session, owner, user.card().to_json())
        grant_access(session, owner, repo, user.user_id)
    return users


@dataclass
class LoadRepository:
    """The store session, the owner, the repository, its members and query tokens."""

    session: Any  # app.core.session.Session
    owner: Any
    repo: Any
    users: list[Any]
    tokens: list[Any]


@contextmanager
def load_repository(work: Path, n: int, clients: int, seed: int = 0
                    ) -> Iterator[LoadRepository]:
    """An embedded store (stopped on exit) holding the repository and its ``clients``
    members."""
    from app.core.access import session_for
    from app.core.settings import Settings
    from crypto.identity import Identity

    rng = np.random.default_rng(seed)
    owner = Identity.generate("Load owner")
    settings = Settings(store="embedded", data_dir=str(work / "data"))
    with session_for(settings, owner) as session:
        repo, data = build_repository(session, owner, n, rng)
        users = add_members(session, owner, repo, clients)
        queries = datasets.perturbed_queries(rng, data, TOKENS, noise=0.05)
        tokens = [repo.keys.index_key.query(queries[i : i + 1]) for i in range(TOKENS)]
        yield LoadRepository(session, owner, repo, users, tokens)


@contextmanager
def running_service(loaded: LoadRepository, options: Sequence[str] = UNLIMITED
                    ) -> Iterator[Target]:
    """The search service over ``loaded``'s store with ``options`` (its rate limits),
    the repository loaded before it is handed out; stopped on exit."""
    from app.core.identity import RequestSigner
    from app.core.service_client import EmbeddedService, ServiceClient

    session, repo = loaded.session, loaded.repo
    assert session.store_config is not None
    service = EmbeddedService(session.store_config, session.settings.data_path,
                              [loaded.owner.sign_public], options=options)
    try:
        loader = ServiceClient(service.url, RequestSigner(loaded.owner),
                               service_id=service.service_id)
        try:
            refreshed = loader.refresh_v2(repo.repo_id)  # loaded before the clock runs
        finally:
            loader.close()
        yield Target(service.url, service.service_id, service.process.pid, repo.repo_id,
                     repo.keys.version, loaded.users, loaded.tokens, session.store,
                     int(refreshed.get("images", 0)))
    finally:
        service.stop()


def _client(target: Target, user: Any, offset: int, clock: dict[str, float],
            result: ClientResult, barrier: threading.Barrier) -> None:
    from app.core.errors import ServiceError
    from app.core.identity import RequestSigner
    from app.core.service_client import ServiceClient

    client = ServiceClient(target.url, RequestSigner(user), service_id=target.service_id)
    try:
        barrier.wait()  # every client connected and signing: the clock starts
        until, i = clock["until"], offset
        while time.monotonic() < until:
            token = target.tokens[i % len(target.tokens)]
            i += 1
            start = time.perf_counter()
            try:
                answer = client.search_v2(target.repo_id, token, K, target.key_version,
                                          stats=False)
                if len(answer.hits) != 1 or len(answer.hits[0]) != K:
                    result.errors["short answer"] += 1
                    continue
            except ServiceError as exc:
                result.errors[str(exc)[:120]] += 1
                continue
            except Exception as exc:  # counted, never hidden: a load test reports all
                result.errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                continue
            result.latencies.append((start, time.perf_counter() - start))
    finally:
        client.close()


def _sample_rss(pid: int, stop: threading.Event, samples: list[tuple[float, int]]) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        try:
            samples.append((time.perf_counter(), int(process.memory_info().rss)))
        except psutil.Error:
            return
        stop.wait(0.25)


def _every(samples: list[tuple[float, int]], begin: float, step: float) -> list[float]:
    """The memory curve: the last sample of each ``step`` seconds from ``begin``, MiB."""
    curve: dict[int, float] = {}
    for t, rss in samples:
        curve[max(0, int((t - begin) // step))] = round(rss / 2**20, 1)
    return [curve[k] for k in sorted(curve)]


def audit_counts(store: Any, repo_id: str) -> Counter[str]:
    """Search entries per user in the repository's audit batches."""
    from cloud import layout

    counts: Counter[str] = Counter()
    for key in store.list_keys(layout.audit_prefix(repo_id)):
        for line in store.get(key).decode().splitlines():
            if line.strip():
                entry = json.loads(line)
                if entry.get("action") == "search":
                    counts[str(entry.get("user"))] += 1
    return counts


def run_load(target: Target, seconds: float, warmup: float) -> dict[str, Any]:
    """``len(target.users)`` clients for ``seconds``; statistics after ``warmup`` s."""
    results = [ClientResult() for _ in target.users]
    barrier = threading.Barrier(len(target.users) + 1)
    stop, rss = threading.Event(), list[tuple[float, int]]()
    sampler = threading.Thread(target=_sample_rss, args=(target.service_pid, stop, rss),
                               daemon=True)
    clock = {"until": 0.0}
    threads = [threading.Thread(target=_client, args=(target, user, n * 7, clock, result,
                                                      barrier), name=f"load-{n}", daemon=True)
               for n, (user, result) in enumerate(zip(target.users, results, strict=True))]
    for thread in threads:
        thread.start()
    sampler.start()
    clock["until"] = time.monotonic() + seconds
    begin = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join(seconds + 120)
    end = time.perf_counter()
    stop.set()
    sampler.join(5)
    steady_from = begin + warmup
    latencies = np.array([s for r in results for t, s in r.latencies if t >= steady_from])
    answered = Counter({u.user_id: len(r.latencies) for u, r in zip(target.users, results,
                                                                    strict=True)})
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    warm_rss = [b for t, b in rss if t <= steady_from] or [b for _, b in rss[:1]]
    after = [b for t, b in rss if t > steady_from] or warm_rss
    base = warm_rss[-1]
    # Growth: the last few seconds against the first few after the warm-up (means, so
    # that one search's temporary arrays are not taken for growth; windows of 5 s, or a
    # third of a short run); the peak is reported beside it.
    window = min(5.0, (end - steady_from) / 3)
    first = [b for t, b in rss if steady_from < t <= steady_from + window] or after[:1]
    last = [b for t, b in rss if t > end - window] or after[-1:]
    steady_seconds = max(end - steady_from, 1e-9)
    report: dict[str, Any] = {
        "clients": len(target.users), "seconds": seconds, "warmup_seconds": warmup,
        "requests": int(sum(answered.values())), "errors": int(sum(errors.values())),
        "error_kinds": dict(errors.most_common(10)),
        "throughput_per_s": float(len(latencies) / steady_seconds),
        "latency_ms": {name: float(np.percentile(latencies, q) * 1000) if latencies.size
                       else float("nan")
                       for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "service_rss_mb": {"after_warmup": base / 2**20, "end": after[-1] / 2**20,
                           "peak": max(after) / 2**20},
        "rss_growth_percent": 100.0 * (np.mean(last) - np.mean(first)) / np.mean(first),
        "rss_peak_percent": 100.0 * (max(after) - base) / base,
        "service_rss_mb_every_5_s": _every(rss, begin, 5.0),
        "answered_per_user": answered,
    }
    return report


def check_audit(target: Target, answered: Counter[str], timeout: float = 15.0,
                before: Counter[str] | None = None) -> dict[str, Any]:
    """Wait for the service's periodic flush, then compare the audit trail (less
    ``before``, what it held before the run) with what the clients were answered, per
    user."""
    deadline = time.monotonic() + timeout
    while True:
        counted = audit_counts(target.store, target.repo_id) - (before or Counter())
        if all(counted[u] >= a for u, a in answered.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    missing = {u: a - counted[u] for u, a in answered.items() if counted[u] < a}
    extra = {u: counted[u] - a for u, a in answered.items() if counted[u] > a}
    return {"audited": int(sum(counted[u] for u in answered)), "missing": missing,
            "extra": extra, "complete": not missing and not extra}


def run(n: int, clients: int, seconds: float, warmup: float, work: Path) -> dict[str, Any]:
    load_before = os.getloadavg()
    start = time.perf_counter()
    with load_repository(work, n, clients) as loaded, running_service(loaded) as target:
        setup = time.perf_counter() - start
        report = run_load(target, seconds, warmup)
        report["audit"] = check_audit(target, report["answered_per_user"])
    report.update({"n": n, "images_served": target.images, "setup_seconds": setup,
                   "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                               "load_average_before": load_before,
                               "load_average_after": os.getloadavg()}})
    report["answered_per_user"] = {"min": min(report["answered_per_user"].values()),
                                   "max": max(report["answered_per_user"].values())}
    return report


def summary(report: dict[str, Any]) -> str:
    lat = report["latency_ms"]
    rss = report["service_rss_mb"]
    return (f"{report['clients']} clients, {report['seconds']:.0f} s at "
            f"{report['images_served']} images: {report['requests']} searches, "
            f"{report['errors']} errors, {report['throughput_per_s']:.1f}/s after warm-up; "
            f"p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms; service RSS "
            f"{rss['after_warmup']:.0f} -> {rss['end']:.0f} MiB, growth "
            f"{report['rss_growth_percent']:+.1f}% (peak {rss['peak']:.0f}, "
            f"{report['rss_peak_percent']:+.1f}%); audit complete: "
            f"{report['audit']['complete']} ({report['audit']['audited']} entries); "
            f"load average {report['machine']['load_average_before'][0]:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100000, help="images in the repository")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds excluded from latency and memory growth")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="radcrypt-load-") as tmp:
        report = run(args.n, args.clients, args.seconds, args.warmup, Path(tmp))
    print(summary(report))
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
