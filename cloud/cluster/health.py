"""What a cluster front's /readyz and /metrics say of its shards (docs/SCALING.md 2).

The front probes every shard replica (``Shard.status``, a few fields per repository, within
STATUS_SECONDS) and decides from the answers alone, here, without Ray (so that the rule is
tested on many cases, tests/cluster/test_cluster_parts.py):

* ready when every segment of the live set of every repository the deployment serves is
  owned by a slot with a replica that answered and has loaded what it owns (no owned live
  segment neither loaded nor rejected): exactly when a search can get a whole answer;
* a slot owns live segments when any replica that verified the log says so (each reports
  the slots owning live segments at its head); when no replica has verified a repository's
  log yet, every slot is taken to own some, and with no repository known yet every slot
  must answer: a front is never ready on a guess;
* the reasons name the shard (slot and actor names) and say unreachable or loading; no
  repository id and nothing of a query (/readyz is not authenticated).

/metrics adds, per shard replica, whether it answered, and per repository the segments
and rows it loaded, the segments still pending, when it last loaded and its log head; per
slot the latency of the searches the front sent it (Prometheus text, the single service's
format and cloud/metrics.py Histogram).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cloud.metrics import Histogram

STATUS_SECONDS = 2.0  # the longest /readyz and /metrics wait for the shards' status


@dataclass(frozen=True)
class Probe:
    """One replica's status answer (``status`` None: it did not answer; ``why`` says how)."""

    slot: int
    replica: int
    name: str
    status: Mapping[str, Any] | None
    why: str = ""


def _report(probe: Probe, repo_id: str) -> Mapping[str, Any] | None:
    if probe.status is None:
        return None
    report: Mapping[str, Any] | None = probe.status.get("repos", {}).get(repo_id)
    return report


def _loaded(probe: Probe, repo_id: str) -> bool:
    report = _report(probe, repo_id)
    return bool(report is not None and report["loaded_at"] and report["pending"] == 0)


def owners(probes: Sequence[Probe], repo_id: str, shards: int) -> set[int]:
    """The slots owning live segments of ``repo_id`` by the replicas that verified its
    log; every slot when none has."""
    found: set[int] = set()
    known = False
    for probe in probes:
        report = _report(probe, repo_id)
        if report is not None and report.get("owners") is not None:
            known = True
            found.update(int(s) for s in report["owners"])
    return found if known else set(range(shards))


def not_ready(probes: Sequence[Probe], repos: Sequence[str], shards: int) -> list[str]:
    """Why the cluster cannot give a whole answer now, one line per slot (empty: ready)."""
    reasons: list[str] = []
    for slot in range(shards):
        mine = [p for p in probes if p.slot == slot]
        names = ", ".join(p.name for p in mine)
        reachable = [p for p in mine if p.status is not None]
        if not reachable:
            why = "; ".join(sorted({p.why for p in mine if p.why})) or "no replica"
            if not repos or any(slot in owners(probes, r, shards) for r in repos):
                reasons.append(f"shard {slot} ({names}) unreachable: {why}")
            continue
        loading = [r for r in repos if slot in owners(probes, r, shards)
                   and not any(_loaded(p, r) for p in reachable)]
        if loading:
            reasons.append(f"shard {slot} ({names}) has not loaded its segments of "
                           f"{len(loading)} repositor{'y' if len(loading) == 1 else 'ies'}")
    return reasons


_SERIES = (
    ("segments", "radcrypt_shard_segments", "Segments the shard replica loaded."),
    ("images", "radcrypt_shard_images", "Rows (images) the shard replica searches."),
    ("pending", "radcrypt_shard_pending_segments",
     "Live segments the replica owns that are neither loaded nor rejected."),
    ("rejected", "radcrypt_shard_rejected_segments", "Segments the replica does not serve."),
    ("loaded_at", "radcrypt_shard_last_load_timestamp_seconds",
     "Unix time of the replica's last load of the repository."),
    ("head", "radcrypt_shard_log_head", "Segment-log head the replica verified."),
)


def metrics_lines(probes: Sequence[Probe], latency: Mapping[int, Histogram],
                  reasons: Sequence[str]) -> list[str]:
    """The shards' series in Prometheus text (appended to the front's own /metrics)."""
    lines = ["# HELP radcrypt_cluster_ready 1 when every live segment is owned by a ready "
             "shard.", "# TYPE radcrypt_cluster_ready gauge",
             f"radcrypt_cluster_ready {0 if reasons else 1}",
             "# HELP radcrypt_shard_up 1 when the shard replica answered the front's probe.",
             "# TYPE radcrypt_shard_up gauge"]
    lines += [f'radcrypt_shard_up{{shard="{p.slot}",replica="{p.replica}"}} '
              f"{0 if p.status is None else 1}" for p in probes]
    for field, name, text in _SERIES:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
        for probe in probes:
            repos = probe.status.get("repos", {}) if probe.status is not None else {}
            for repo_id, report in sorted(repos.items()):
                value = report.get(field)
                if value is None:
                    continue
                shown = f"{value:.3f}" if isinstance(value, float) else str(int(value))
                lines.append(f'{name}{{shard="{probe.slot}",replica="{probe.replica}",'
                             f'repo="{repo_id}"}} {shown}')
    lines += ["# HELP radcrypt_shard_query_duration_seconds Time from the front's request "
              "to a shard's search answer.",
              "# TYPE radcrypt_shard_query_duration_seconds histogram"]
    for slot, histogram in sorted(latency.items()):
        lines += histogram.lines("radcrypt_shard_query_duration_seconds", f'shard="{slot}"')
    return lines
