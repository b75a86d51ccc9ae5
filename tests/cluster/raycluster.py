"""A real local Ray cluster for the cluster tests and bench/cluster.py: one head and one
worker node on 127.0.0.1, each with one CPU and a 100 MB object store, started with
``ray start --block`` in a private temporary directory and stopped by PID.

Why not ``ray stop``: it ends every Ray process of the machine, including those of other
users. Here only the processes started by this harness go: the two ``ray start --block``
processes (which end their own children on SIGTERM) and then any process left whose
command line names this harness's temporary directory (GCS, raylets, workers), by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
START_SECONDS = 150.0
START_TRIES = 3
OBJECT_STORE_BYTES = 100_000_000
MISSING = "the ray command is missing: `make system-deps` (or pip install radcrypt[cluster]) " \
          "installs it"


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held open together, so all different)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class LocalCluster:
    """Two Ray nodes on this machine; ``address`` is what ray.init and --ray-address take."""

    temp: Path
    address: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        _kill_naming(str(self.temp))  # children that outlived their ray start
        shutil.rmtree(self.temp, ignore_errors=True)


def _kill_naming(text: str) -> None:
    """SIGKILL the processes whose command line names ``text`` (our temp dir), by PID."""
    for _ in range(3):
        left = _pids_naming(text)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _pids_naming(text: str) -> list[int]:
    """The processes whose command line contains ``text`` (this harness's temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def _node_args(temp: Path) -> list[str]:
    ports = free_ports(6)
    return ["--num-cpus", "1", "--object-store-memory", str(OBJECT_STORE_BYTES),
            "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
            "--dashboard-agent-grpc-port", str(ports[2]),
            "--dashboard-agent-listen-port", str(ports[3]),
            "--metrics-export-port", str(ports[4]), "--runtime-env-agent-port", str(ports[5]),
            "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--block",
            "--log-style", "record"]


def _env(temp: Path, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")]))
    env["RAY_DISABLE_IMPORT_WARNING"] = "1"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_memory_monitor_refresh_ms"] = "0"  # no OOM killer polling on a shared box
    return env


@contextmanager
def local_cluster(env: dict[str, str] | None = None, workers: int = 1) -> Iterator[LocalCluster]:
    """Start a head (and ``workers`` worker nodes), yield, stop them all by PID."""
    if not RAY.exists():
        raise FileNotFoundError(MISSING)
    temp = Path(tempfile.mkdtemp(prefix="rcray-", dir="/tmp"))
    worker_low = 20000 + (os.getpid() * 97) % 30000
    cluster = LocalCluster(temp, "")
    full_env = _env(temp, env or {})
    logs = temp / "start.log"
    try:
        for attempt in range(START_TRIES):
            try:
                _start(cluster, worker_low, workers, full_env, logs)
                break
            except RuntimeError:
                if attempt == START_TRIES - 1:
                    raise
                _stop_processes(cluster)  # a node gave up: start the whole cluster again
        yield cluster
    finally:
        cluster.stop()


def _start(cluster: LocalCluster, worker_low: int, workers: int, env: dict[str, str],
           logs: Path) -> None:
    """The head, then, as soon as its GCS port answers, the workers, all registering at
    once; RuntimeError when a node gives up (a raylet waits only 30 s to register with the
    GCS, hard-coded in ray._private.node: short on a loaded 2-core machine)."""
    cluster.address = f"127.0.0.1:{free_ports(1)[0]}"
    head = ["--head", "--port", cluster.address.rsplit(":", 1)[1], "--include-dashboard",
            "false", "--temp-dir", str(cluster.temp), "--min-worker-port", str(worker_low),
            "--max-worker-port", str(worker_low + 199)]
    _popen(cluster, head, env, logs)
    deadline = time.monotonic() + START_SECONDS
    while not _port_open(cluster.address):
        _alive(cluster, logs)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head did not open {cluster.address}")
        time.sleep(0.3)
    for n in range(workers):
        low = worker_low + 200 * (n + 1)
        _popen(cluster, ["--address", cluster.address, "--min-worker-port", str(low),
                         "--max-worker-port", str(low + 199)], env, logs)
    _wait_for_nodes(cluster, 1 + workers, logs)


def _popen(cluster: LocalCluster, args: list[str], env: dict[str, str], logs: Path) -> None:
    with logs.open("ab") as out:
        cluster.processes.append(subprocess.Popen(
            [str(RAY), "start", *args, *_node_args(cluster.temp)], env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True))


def _alive(cluster: LocalCluster, logs: Path) -> None:
    for proc in cluster.processes:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with status {proc.returncode}: "
                               f"{logs.read_text(errors='replace')[-2000:]}")


def _stop_processes(cluster: LocalCluster) -> None:
    for proc in cluster.processes:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    cluster.processes.clear()
    _kill_naming(str(cluster.temp))


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


PROBE = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[3])
while sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[2]):
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.5)
"""


def _wait_for_nodes(cluster: LocalCluster, count: int, logs: Path) -> None:
    """Until the GCS lists ``count`` live nodes: one probe
    process (the test process must not connect before the cluster is whole: ray.init
    caches the nodes it saw). Generous: on a loaded 2-core machine a node takes 20-60 s."""
    deadline = time.monotonic() + START_SECONDS
    left = max(5.0, deadline - time.monotonic())
    probe = subprocess.Popen([sys.executable, "-c", PROBE, cluster.address, str(count),
                              str(left)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=_env(cluster.temp, {}))
    try:
        while probe.poll() is None:
            _alive(cluster, logs)  # a node that gave up: do not wait for the probe
            if time.monotonic() > deadline + 30:
                break
            time.sleep(0.5)
    finally:
        if probe.poll() is None:
            probe.kill()
        probe.wait()
    _alive(cluster, logs)
    if probe.returncode != 0:
        raise RuntimeError(f"the Ray cluster at {cluster.address} did not reach {count} "
                           f"nodes in {START_SECONDS:.0f} s: "
                           f"{logs.read_text(errors='replace')[-2000:]}")
