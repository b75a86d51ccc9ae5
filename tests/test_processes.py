"""Process supervision (cloud/processes.py): pid checks through psutil, guarded against
pid reuse by the recorded creation time; real child processes, real signals."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cloud.processes import (
    create_time,
    pid_alive,
    stop_process,
    terminate_pid,
    wait_pid_gone,
)

PROJECT = Path(__file__).resolve().parents[1]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(SLEEPER)
    yield proc
    stop_process(proc, "the test's sleeper")


def test_a_live_child_is_alive_and_has_a_creation_time(child: subprocess.Popen[bytes]
                                                       ) -> None:
    created = create_time(child.pid)
    assert created is not None and abs(created - time.time()) < 60
    assert pid_alive(child.pid) and pid_alive(child.pid, created)


def test_a_reused_pid_is_not_ours_and_is_never_signalled(child: subprocess.Popen[bytes]
                                                        ) -> None:
    """A record whose creation time differs names another process: reported gone, and
    terminate_pid leaves the process that now has the pid alone."""
    created = create_time(child.pid)
    assert created is not None
    earlier = created - 3600  # what a store.json of an older server would hold
    assert not pid_alive(child.pid, earlier)
    assert terminate_pid(child.pid, "stale record", earlier, grace=1.0) is False
    assert child.poll() is None and pid_alive(child.pid, created)


def test_terminate_pid_stops_and_reaps(child: subprocess.Popen[bytes]) -> None:
    created = create_time(child.pid)
    assert terminate_pid(child.pid, "the sleeper", created, grace=5.0) is True
    assert wait_pid_gone(child.pid, 1.0)
    assert not pid_alive(child.pid) and create_time(child.pid) is None


def test_a_finished_child_is_dead_not_a_zombie() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while psutil.pid_exists(proc.pid) and pid_alive(proc.pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not pid_alive(proc.pid)
    assert not pid_alive(0) and not pid_alive(-1) and create_time(0) is None


def test_stop_process_kills_a_child_that_ignores_sigterm(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import cloud.processes as processes

    monkeypatch.setattr(processes, "STOP_GRACE", 0.5)  # the grace period, not the code
    stubborn = subprocess.Popen([sys.executable, "-c", (
        "import signal, time, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(600)")], stdout=subprocess.PIPE)
    assert stubborn.stdout is not None and stubborn.stdout.readline().strip() == b"ready"
    stubborn.stdout.close()
    stop_process(stubborn, "stubborn")
    assert stubborn.returncode is not None and stubborn.returncode < 0


def test_no_pid_probing_with_os_kill_in_cloud() -> None:
    """os.kill(pid, 0) terminates the process on Windows; cloud/ never calls os.kill."""
    offenders = []
    for path in sorted((PROJECT / "cloud").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "kill" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "os"):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
