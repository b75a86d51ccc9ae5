"""How many threads the search engine runs: the CPUs this process may actually use.

A server's core count is not what a process may use: a container or a systemd unit
limits it by CPU affinity (taskset, cpuset) or by a CPU quota (cgroup v2 ``cpu.max``,
cgroup v1 ``cpu.cfs_quota_us``). Threads beyond that share the allowed time and spin
against each other at every hand-over, so the engine asks for
min(affinity, ceil(quota / period)) threads, at least one. The quota is rounded up: 1.5
CPUs of quota run two threads, each busy three quarters of the time, better than one.

Overrides, strongest first: ``set_threads(n)`` (``radcrypt serve --threads N``), then the
environment variable RADCRYPT_THREADS. Reads only small files under /proc and
/sys/fs/cgroup, once per process (``engine_threads`` caches what it found).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from pathlib import Path

ENV_THREADS = "RADCRYPT_THREADS"
MAX_THREADS = 512  # a typo (RADCRYPT_THREADS=1600) must not start a thousand threads
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")

_lock = threading.Lock()
_override: int | None = None
_resolved: int | None = None


def affinity_cpus() -> int:
    """The CPUs the scheduler may run this process on (all of the machine's where the
    platform cannot say)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _v2_limit(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` ("quota period" or "max period")."""
    parts = text.split()
    if len(parts) < 1 or parts[0] == "max":
        return None
    period = float(parts[1]) if len(parts) > 1 else 100000.0
    quota = float(parts[0])
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(directory: Path) -> float | None:
    """CPUs allowed by a cgroup v1 directory's CFS quota (-1: none)."""
    try:
        quota = float((directory / "cpu.cfs_quota_us").read_text().strip())
        period = float((directory / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _ancestors(root: Path, relative: str) -> list[Path]:
    """``root/relative`` and every directory above it up to ``root`` (a quota on any of
    them limits the process); just ``root`` where the process's own path is not visible
    (a container that mounts only its own cgroup at the root)."""
    parts = [p for p in relative.strip().split("/") if p]
    if ".." in parts:  # a cgroup outside this namespace: not below the mount
        return [root]
    dirs = [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    existing = [d for d in dirs if d.is_dir()]
    return existing or [root]


def cgroup_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroups in CPUs (1.5 = one and a half), the
    tightest over the process's cgroup and its ancestors, v2 or v1; None when unlimited
    or unknown."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # cgroup v2: "0::/path"
            for directory in _ancestors(root, path):
                try:
                    limit = _v2_limit((directory / "cpu.max").read_text())
                except (OSError, ValueError):
                    continue
                if limit is not None:
                    limits.append(limit)
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            for mount in V1_CPU_MOUNTS:
                if (root / mount).is_dir():
                    for directory in _ancestors(root / mount, path):
                        limit = _v1_limit(directory)
                        if limit is not None:
                            limits.append(limit)
                    break
    return min(limits) if limits else None


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """min(affinity, quota rounded up), at least 1."""
    cpus = affinity_cpus()
    quota = cgroup_cpus(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota - 1e-9)))
    return max(1, cpus)


def parse_threads(value: object, source: str) -> int:
    """A thread count from an option or the environment; ValueError in plain words
    naming ``source`` (e.g. "--threads" or "RADCRYPT_THREADS")."""
    text = str(value).strip()
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"{source} {text!r}: not a whole number of threads") from None
    if not 1 <= count <= MAX_THREADS:
        raise ValueError(f"{source} {count}: must be 1..{MAX_THREADS}")
    return count


def configured_threads(environ: Mapping[str, str] | None = None) -> int:
    """RADCRYPT_THREADS when set (and valid), else the CPUs this process may use."""
    env = os.environ if environ is None else environ
    text = env.get(ENV_THREADS, "").strip()
    if text:
        return parse_threads(text, ENV_THREADS)
    return available_cpus()


def engine_threads() -> int:
    """The engine's thread count now: set_threads's, else found once (configured_threads).
    An invalid RADCRYPT_THREADS raises here, at the first search, naming the variable;
    the service checks it at start-up (cloud/service_options.py)."""
    global _resolved
    with _lock:
        if _override is not None:
            return _override
        if _resolved is None:
            _resolved = configured_threads()
        return _resolved


def set_threads(count: int | None) -> None:
    """Fix the engine's thread count (``radcrypt serve --threads``, benchmarks, tests);
    None: back to the environment and the CPUs, looked up again."""
    global _override, _resolved
    if count is not None:
        count = parse_threads(count, "thread count")
    with _lock:
        _override = count
        _resolved = None
