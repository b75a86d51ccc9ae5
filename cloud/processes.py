"""Starting, watching and stopping the servers the project runs as child processes
(the embedded SeaweedFS store, the search service), in one place.

Pid checks go through psutil, never ``os.kill(pid, 0)``: on Windows ``os.kill`` with any
signal number terminates the process (TerminateProcess) instead of probing it. A pid
recorded in a file (``store.json``) may be reused by an unrelated process after ours has
died, so a record also keeps the process's creation time (``create_time``), and a pid
whose process was created at another time is treated as gone and never signalled.

Stopping is the same everywhere: SIGTERM (TerminateProcess on Windows), wait up to
``STOP_GRACE`` seconds, then SIGKILL, and reap our own children so that no zombie stays.

No orphans (issue 14): a child server must not outlive the client that started it, even
when the client is killed with SIGKILL and runs no cleanup. PR_SET_PDEATHSIG alone cannot
promise that here: it fires when the *thread* that forked exits, and the GUI and the
facade start servers from worker threads. So every child server watches a pipe instead:
its stdin is a pipe whose only write end the client holds, and the kernel closes that end
however the client dies. A Python child (the search service) watches it itself
(``watch_parent_pipe``, armed by ``PARENT_PIPE_ENV``); a program we cannot change (the Go
SeaweedFS binary) runs under ``guarded_command``: a small Python guard that watches the
pipe, stops the program, and, being single-threaded, arms PR_SET_PDEATHSIG correctly so
that the program also dies if the guard itself is killed. The other half: a client that
receives SIGTERM or SIGHUP (shutdown, logout) unwinds normally
(``exit_on_termination_signals``) so that its context managers and atexit hooks stop what
it started.
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
from typing import Any

import psutil

log = logging.getLogger(__name__)

STOP_GRACE = 10.0
KILL_GRACE = 5.0
# After the parent's pipe closes: how long a child may spend on its own cleanup (SIGTERM
# handlers, the service's audit flush) before it is ended anyway; the whole stays under
# the 5 s issue 14 allows.
ORPHAN_GRACE = 3.0
GUARD_CANNOT_EXECUTE = 126  # the guard's exit code when the program cannot be started
PARENT_PIPE_ENV = "RADCRYPT_PARENT_PIPE"  # "stdin": exit when stdin reaches end of file
TERMINATION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP")
                            if hasattr(signal, name))
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
    try:
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
    finally:
        if proc.stdin is not None:  # a watched child's parent pipe: no longer needed
            with contextlib.suppress(OSError):
                proc.stdin.close()


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


# --- no orphans: the parent pipe, the guard, termination signals ---------------------------


def start_watched(command: list[str], *, env: dict[str, str] | None = None,
                  cwd: str | os.PathLike[str] | None = None, stdout: Any = None,
                  stderr: Any = None) -> subprocess.Popen[bytes]:
    """Start a Python child that exits when we die: its stdin is a pipe whose write end
    only this process holds (``proc.stdin``, closed by ``stop_process``), and
    ``PARENT_PIPE_ENV`` in its environment tells it to call ``watch_parent_pipe``."""
    child_env = dict(os.environ if env is None else env)
    child_env[PARENT_PIPE_ENV] = "stdin"
    return subprocess.Popen(command, stdin=subprocess.PIPE, env=child_env, cwd=cwd,
                            stdout=stdout, stderr=stderr)


def watch_parent_pipe() -> bool:
    """In a child started by ``start_watched``: when stdin reaches end of file (the parent
    is gone, however it died), SIGTERM ourselves so the usual cleanup runs, and end the
    process after ``ORPHAN_GRACE`` seconds if that cleanup hangs. Does nothing (False)
    unless ``PARENT_PIPE_ENV`` asks for it: a service run by an administrator has a
    terminal or /dev/null as stdin and must keep running. The variable is removed so
    that our own children do not inherit the request."""
    if os.environ.pop(PARENT_PIPE_ENV, "") != "stdin":
        return False
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        log.warning("%s asks to watch stdin, but there is none", PARENT_PIPE_ENV)
        return False
    main_ident = threading.main_thread().ident
    threading.Thread(target=_exit_at_end_of_file, args=(fd, main_ident),
                     name="parent-pipe", daemon=True).start()
    return True


def _exit_at_end_of_file(fd: int, main_ident: int | None) -> None:
    with contextlib.suppress(OSError):
        while os.read(fd, 4096):
            pass  # nothing is ever sent; only the end of file matters
    log.warning("the process that started this one is gone (its pipe closed); stopping")
    if main_ident is not None and hasattr(signal, "pthread_kill"):
        with contextlib.suppress(OSError, ValueError):
            signal.pthread_kill(main_ident, signal.SIGTERM)
    time.sleep(ORPHAN_GRACE)
    os._exit(1)  # the cleanup did not finish in time: end without it


def guarded_command(command: list[str]) -> list[str]:
    """``command`` run under the guard (this file as a script): start it with
    stdin=subprocess.PIPE and keep ``proc.stdin`` open while it should run. The guard
    passes our inherited descriptors (stdout, a lock file) on, forwards SIGTERM and SIGHUP,
    exits with the program's code, and stops the program when the pipe closes."""
    return [sys.executable, "-c", _GUARD_BOOT, os.path.abspath(__file__), "--guard", "--",
            *command]


# Run this file as __main__ by its path: as a plain script its folder (cloud/) would come
# first on sys.path and its modules could shadow the standard library's.
_GUARD_BOOT = ("import runpy, sys; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")


def _guard(command: list[str]) -> int:
    """The guard's main (single-threaded when it forks, so PR_SET_PDEATHSIG is tied to
    the guard's whole life)."""
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, close_fds=False,
                                 preexec_fn=parent_death_signal())
    except OSError as exc:
        # the last line of the output: the caller quotes it when it sees the exit code
        print(f"{command[0]} cannot be executed: {exc.strerror or exc}", file=sys.stderr,
              flush=True)
        return GUARD_CANNOT_EXECUTE
    stopping = threading.Event()

    def stop(grace: float) -> None:
        if stopping.is_set():
            return
        stopping.set()
        with contextlib.suppress(OSError):
            child.terminate()
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                child.kill()

    def on_signal(signum: int, _frame: object) -> None:
        threading.Thread(target=stop, args=(STOP_GRACE - 1.0,), daemon=True).start()

    for signum in TERMINATION_SIGNALS:
        signal.signal(signum, on_signal)
    if hasattr(signal, "SIGINT"):  # Ctrl+C reaches the program itself, and our parent
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        stop(ORPHAN_GRACE)

    threading.Thread(target=watch, name="parent-pipe", daemon=True).start()
    code = child.wait()
    return code if code >= 0 else 128 - code


class TerminationRequested(SystemExit):
    """SIGTERM or SIGHUP arrived: unwind like ``sys.exit`` so that ``finally`` blocks,
    context managers and atexit hooks stop the children and remove temporary files."""


def exit_on_termination_signals() -> list[int]:
    """Main thread only: turn SIGTERM and SIGHUP (shutdown, logout) into
    TerminationRequested (exit code 128 + the signal) where they would otherwise end the
    process on the spot, without cleanup. A handler someone else installed is left alone.
    Returns the signals now handled."""
    if threading.current_thread() is not threading.main_thread():
        return []
    handled = []
    for signum in TERMINATION_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _raise_termination)
            handled.append(signum)
    return handled


def _raise_termination(signum: int, _frame: object) -> None:
    for other in TERMINATION_SIGNALS:  # a second signal must not interrupt the cleanup
        signal.signal(other, signal.SIG_IGN)
    raise TerminationRequested(128 + signum)


if __name__ == "__main__":
    if sys.argv[1:3] == ["--guard", "--"] and len(sys.argv) > 3:
        raise SystemExit(_guard(sys.argv[3:]))
    print("usage: processes.py --guard -- PROGRAM [ARGS...]", file=sys.stderr)
    raise SystemExit(2)
