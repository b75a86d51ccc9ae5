"""The search service's operational figures, served as Prometheus text on GET /metrics.

Written by hand (text exposition format 0.0.4): prometheus_client is not a dependency
of the service, and the few series below do not need it.

What is counted, and why nothing more: search requests and queries per protocol, a
histogram of the time a search takes inside the service, responses refused per reason
(status and stage, never the request), the segments and images loaded per repository,
whether the repositories it was asked to preload are ready, and the process's memory.
No user id, no token, no image id, no score: /metrics is unauthenticated like /healthz,
so it says only what an operator sizing or watching the service needs. Repository ids
appear as labels; they are the bucket's own prefixes, not repository content.

Updates are a dict increment and a bisect on the event loop's thread (the Gate and the
route handlers run there), so they need no lock and add nothing measurable to a search.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Seconds. A warm protocol-2 search at 100k images takes about 2 ms end to end.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# A refused response's reason, from its status (the Gate and the routes answer these).
REASONS = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
           405: "method_not_allowed", 413: "body_too_large", 422: "invalid_request",
           429: "rate_limited", 503: "unavailable"}


@dataclass(frozen=True)
class RepoFigures:
    """What one loaded repository contributes to /metrics."""

    repo_id: str
    segments: int
    images: int
    rejected_segments: int
    head: int


class Histogram:
    """Cumulative buckets, a sum and a count (a Prometheus histogram)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf only)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{suffix} {self.total:.6f}")
        out.append(f"{name}_count{suffix} {self.count}")
        return out


class Metrics:
    """Counters of one service process (see the module docstring for what and why)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.searches: dict[int, int] = {}  # protocol -> search requests answered 200
        self.queries: dict[int, int] = {}  # protocol -> queries in those requests
        self.latency: dict[int, Histogram] = {}
        self.rejected: dict[str, int] = {}

    def search(self, protocol: int, queries: int, seconds: float) -> None:
        """One search answered: ``seconds`` from the request's arrival at the Gate."""
        self.searches[protocol] = self.searches.get(protocol, 0) + 1
        self.queries[protocol] = self.queries.get(protocol, 0) + queries
        histogram = self.latency.get(protocol)
        if histogram is None:
            histogram = self.latency[protocol] = Histogram()
        histogram.observe(seconds)

    def refuse(self, status: int, stage: str = "app") -> None:
        """A response with a 4xx/5xx status; ``stage`` says who refused (gate: before
        the application, auth: the signature check, app: a route or its body model)."""
        reason = f"{stage}_{REASONS.get(status, f'status_{status}')}"
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def render(self, repos: Iterable[RepoFigures], ready: bool | None) -> str:
        """The text exposition of every series."""
        lines = ["# HELP radcrypt_search_requests_total Search requests answered, by "
                 "protocol.", "# TYPE radcrypt_search_requests_total counter"]
        lines += [f'radcrypt_search_requests_total{{protocol="{p}"}} {n}'
                  for p, n in sorted(self.searches.items())]
        lines += ["# HELP radcrypt_search_queries_total Queries (token rows) searched, by "
                  "protocol.", "# TYPE radcrypt_search_queries_total counter"]
        lines += [f'radcrypt_search_queries_total{{protocol="{p}"}} {n}'
                  for p, n in sorted(self.queries.items())]
        lines += ["# HELP radcrypt_search_duration_seconds Time from a search request's "
                  "arrival to its answer, inside the service.",
                  "# TYPE radcrypt_search_duration_seconds histogram"]
        for protocol, histogram in sorted(self.latency.items()):
            lines += histogram.lines("radcrypt_search_duration_seconds",
                                     f'protocol="{protocol}"')
        lines += ["# HELP radcrypt_rejected_requests_total Requests refused, by stage and "
                  "reason.", "# TYPE radcrypt_rejected_requests_total counter"]
        lines += [f'radcrypt_rejected_requests_total{{reason="{r}"}} {n}'
                  for r, n in sorted(self.rejected.items())]
        lines += _repo_lines(list(repos))
        if ready is not None:
            lines += ["# HELP radcrypt_ready 1 when the repositories to preload are loaded "
                      "and warm.", "# TYPE radcrypt_ready gauge", f"radcrypt_ready {int(ready)}"]
        lines += _process_lines(self.started)
        return "\n".join(lines) + "\n"


def _repo_lines(repos: list[RepoFigures]) -> list[str]:
    series: Mapping[str, tuple[str, str]] = {
        "segments": ("radcrypt_repository_segments", "Segments loaded."),
        "images": ("radcrypt_repository_images", "Images searchable."),
        "rejected_segments": ("radcrypt_repository_rejected_segments",
                              "Segments not served (invalid, missing or not the log's)."),
        "head": ("radcrypt_repository_log_head", "Verified segment-log head (format 2)."),
    }
    lines: list[str] = []
    for field, (name, text) in series.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
        lines += [f'{name}{{repo="{r.repo_id}"}} {getattr(r, field)}'
                  for r in sorted(repos, key=lambda r: r.repo_id)]
    return lines


def _process_lines(started: float) -> list[str]:
    import psutil

    process = psutil.Process(os.getpid())
    with process.oneshot():
        memory = process.memory_info()
        cpu = process.cpu_times()
        threads = process.num_threads()
    return ["# HELP process_resident_memory_bytes Resident memory size in bytes.",
            "# TYPE process_resident_memory_bytes gauge",
            f"process_resident_memory_bytes {memory.rss}",
            "# HELP process_virtual_memory_bytes Virtual memory size in bytes.",
            "# TYPE process_virtual_memory_bytes gauge",
            f"process_virtual_memory_bytes {memory.vms}",
            "# HELP process_cpu_seconds_total User and system CPU time spent in seconds.",
            "# TYPE process_cpu_seconds_total counter",
            f"process_cpu_seconds_total {cpu.user + cpu.system:.3f}",
            "# HELP process_threads Threads of the service process.",
            "# TYPE process_threads gauge", f"process_threads {threads}",
            "# HELP process_start_time_seconds Start time of the process since the epoch.",
            "# TYPE process_start_time_seconds gauge",
            f"process_start_time_seconds {started:.3f}"]
