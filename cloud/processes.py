"""Starting, watching and stopping the servers the project runs as child processes
(the embedded SeaweedFS store, the search service), in one place.

Pid checks go through psutil, never ``os.kill(pid, 0)``: on Windows ``os.kill`` with any
signal number terminates the process (TerminateProcess) instead of probing it. A pid
recorded in a file (``store.json``) may be reused by an unrelated process after ours has
died, so a record also keeps the process's creation time (``create_time``), and a pid
whose process was created at another time is treated as gone and never signalled.

Stopping is the same everywhere: SIGTERM (TerminateProcess on Windows), wait up to
``STOP_GRACE`` seconds, then SIGKILL, and reap our own children so that no zombie stays.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import psutil

log = logging.getLogger(__name__)

STOP_GRACE = 10.0
KILL_GRACE = 5.0
CREATE_TIME_TOLERANCE = 1.0  # seconds; psutil's creation times are exact to a clock tick


class ProcessStopError(RuntimeError):
    """A process could not be stopped (it survived SIGKILL); the message names it."""


def create_time(pid: int) -> float | None:
    """When process ``pid`` was created (seconds since the epoch), None if it is gone."""
    if pid <= 0:
        return None
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # pragma: no cover - another user's process
        return None


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is a finished child of ours (else nothing happens)."""
    if hasattr(os, "WNOHANG"):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _process(pid: int, created: float | None) -> psutil.Process | None:
    """The live process ``pid``, and the same one that was created at ``created`` when
    that is given; None when it is gone, a zombie, or a later process with a reused pid."""
    if pid <= 0:
        return None
    _reap(pid)
    try:
        process = psutil.Process(pid)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # pragma: no cover - psutil asks nothing privileged here
        return None
    try:
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        if created is not None and abs(process.create_time() - created) > CREATE_TIME_TOLERANCE:
            return None  # the pid now belongs to another process
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # it exists, but belongs to someone else
        return None if created is not None else process
    return process


def pid_alive(pid: int, created: float | None = None) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as dead, and our own finished
    child is reaped); with ``created``, only if it is the process created at that time."""
    return _process(pid, created) is not None


def wait_pid_gone(pid: int, timeout: float, created: float | None = None) -> bool:
    """Wait until ``pid`` is gone; False if it still runs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid, created):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def terminate_pid(pid: int, name: str, created: float | None = None,
                  grace: float = STOP_GRACE) -> bool:
    """Stop a process we did not necessarily start (another command's): SIGTERM, then
    SIGKILL after ``grace`` seconds. With ``created``, a pid now used by another process
    is left alone. Returns whether a process was signalled; ProcessStopError if it
    survives SIGKILL."""
    process = _process(pid, created)
    if process is None:
        return False
    with contextlib.suppress(psutil.NoSuchProcess):
        process.terminate()
    if wait_pid_gone(pid, grace, created):
        return True
    log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, pid, grace)
    with contextlib.suppress(psutil.NoSuchProcess):
        process.kill()
    if not wait_pid_gone(pid, KILL_GRACE, created):
        raise ProcessStopError(f"{name} (pid {pid}) survived SIGKILL")
    return True


def stop_process(proc: subprocess.Popen[bytes], name: str = "SeaweedFS") -> None:
    """Stop a child we started: SIGTERM, wait up to STOP_GRACE seconds, then SIGKILL;
    always reaps. Every child server the project starts (the store, the search service)
    stops this way."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, proc.pid,
                    STOP_GRACE)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def parent_death_signal() -> Callable[[], None] | None:
    """Linux, main thread only: a ``preexec_fn`` that has the kernel SIGTERM the child if
    we die without running atexit (PR_SET_PDEATHSIG). Elsewhere None: from other threads
    the signal would fire when the creating *thread* ends."""
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def set_pdeathsig() -> None:  # runs in the child between fork and exec
        prctl(pr_set_pdeathsig, sigterm)

    return set_pdeathsig
