"""Helpers of the end-to-end tests (issue 3): sample images, a search service process,
processes looked up and stopped by pid, byte-window scans. Plain functions, no fixtures, so
any test module can import them without touching conftest.py.

Everything here is independent of the code under test where that matters: process checks
read /proc, the service is started the way a deployment would start it (its own process,
store from the environment) and stopped by its pid.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from cloud.processes import stop_process
from cloud.store import StoreConfig

PROJECT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# --- sample images ------------------------------------------------------------------------

_EXPORTS: dict[int, list[Path]] = {}
_EXPORT_ROOT: Path | None = None


def _export_root() -> Path:
    global _EXPORT_ROOT
    if _EXPORT_ROOT is None:
        _EXPORT_ROOT = Path(tempfile.mkdtemp(prefix="radcrypt-e2e-samples-"))
        atexit.register(shutil.rmtree, _EXPORT_ROOT, True)
    return _EXPORT_ROOT


def sample_images(count: int) -> list[Path]:
    """The first ``count`` images of resources.samples.export_sample_images, exported once
    per test process. The export is deterministic and prefix-stable (the first n of an
    export of m >= n are the export of n), so a larger earlier export is reused.
    Callers must not modify the files."""
    from resources.samples import export_sample_images

    for size, files in sorted(_EXPORTS.items()):
        if size >= count:
            return files[:count]
    files = export_sample_images(_export_root() / f"n{count}", count)
    _EXPORTS[count] = files
    return list(files)


def frame_count(path: Path) -> int:
    """Frames the importer indexes of a file: NumberOfFrames of a DICOM file (up to the
    importer's MAX_FRAMES), 1 for anything else."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from app.core.importer import MAX_FRAMES

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (InvalidDicomError, TypeError, ValueError, OSError):
        return 1
    return max(1, min(frames, MAX_FRAMES))


def image_ids(repo: Any, files: Iterable[Path]) -> dict[str, Path]:
    """Every image id an import gives these files -> its file: one per frame of a
    multi-frame DICOM file (issue 15), frame 0's being the file's own id."""
    import hashlib

    from app.core.importer import frame_image_id

    out: dict[str, Path] = {}
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).digest()
        for frame in range(frame_count(path)):
            out[frame_image_id(repo, digest, frame)] = path
    return out


def copy_images(files: Iterable[Path], dest: Path) -> list[Path]:
    """Copies in a folder of their own (for commands that import a whole folder)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for path in files:
        target = dest / path.name
        shutil.copyfile(path, target)
        out.append(target)
    return out


# --- processes ---------------------------------------------------------------------------


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in {"Z", "X"}


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pid_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_pid(pid: int) -> None:
    """SIGTERM, then SIGKILL, one pid we started (never by name)."""
    if pid_gone(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid, 10.0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10.0)


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of our user's processes whose environment has ``name=value`` (Linux /proc).

    Identifies the children a test's commands started (the search service gets the store
    endpoint in its environment) without matching other people's processes by name."""
    wanted = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if wanted in env.split(b"\0") and not pid_gone(int(entry.name)):
            found.append(int(entry.name))
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def store_env(config: StoreConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment in which boto3 (and the search service) reach ``config``."""
    env = dict(os.environ if base is None else base)
    env.update({
        "AWS_ACCESS_KEY_ID": config.access_key or "testing",
        "AWS_SECRET_ACCESS_KEY": config.secret_key or "testing",
        "AWS_DEFAULT_REGION": config.region,
        "RADCRYPT_S3_ENDPOINT": config.endpoint_url or "",
        "RADCRYPT_S3_BUCKET": config.bucket,
        "RADCRYPT_S3_REGION": config.region,
        "RADCRYPT_S3_ACCESS_KEY": config.access_key or "",
        "RADCRYPT_S3_SECRET_KEY": config.secret_key or "",
    })
    return env


# --- the search service as a process -------------------------------------------------------

# The product's entry point is `python -m cloud.service`; this launcher differs only in the
# refresh interval, so that a test decides when new segments become visible.
_LAUNCHER = """
import os, uvicorn
from cloud.service import AllowAnyone, create_app, store_config_from_env
from cloud.store import ObjectStore
app = create_app(ObjectStore(store_config_from_env()), AllowAnyone(),
                 refresh_interval=float(os.environ["RADCRYPT_TEST_REFRESH"]))
uvicorn.run(app, host="127.0.0.1", port=int(os.environ["RADCRYPT_TEST_PORT"]),
            log_level="warning", access_log=False)
"""


class ServiceProcess:
    """The FastAPI search service in its own process on 127.0.0.1, stopped by pid."""

    def __init__(self, config: StoreConfig, log_path: Path, *,
                 refresh_interval: float | None = 3600.0,
                 service_args: Sequence[str] = ("--insecure-no-auth",),
                 extra_env: Mapping[str, str] | None = None,
                 command: Sequence[str] = (PYTHON, "-m", "cloud.service"),
                 scheme: str = "http") -> None:
        """``refresh_interval`` None runs the product's own ``command`` (`python -m
        cloud.service`, or `radcrypt serve ...`) with ``service_args`` (default: no
        authentication, on loopback); otherwise a launcher of the engine without
        authentication (AllowAnyone), whose refresh the test decides."""
        last_error = ""
        for _attempt in range(3):  # a free port can be taken before the server binds it
            self.port = free_port()
            self.url = f"{scheme}://127.0.0.1:{self.port}"
            env = store_env(config)
            env.update(extra_env or {})
            if refresh_interval is None:
                args = [*command, "--host", "127.0.0.1", "--port", str(self.port),
                        *service_args]
            else:
                env["RADCRYPT_TEST_REFRESH"] = str(refresh_interval)
                env["RADCRYPT_TEST_PORT"] = str(self.port)
                args = [PYTHON, "-c", _LAUNCHER]
            self._log = open(log_path, "ab")  # closed in stop()
            self.process = subprocess.Popen(args, cwd=PROJECT, env=env, stdin=subprocess.DEVNULL,
                                            stdout=self._log, stderr=subprocess.STDOUT)
            self.pid = self.process.pid
            if self._wait_ready():
                return
            self.stop()
            last_error = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the search service did not start; log tail:\n{last_error}")

    def _wait_ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0,
                             verify=False).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        stop_process(self.process, "the search service")
        self._log.close()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- byte windows --------------------------------------------------------------------------

_BASE = 0x100000001B3
_BASE_INV = pow(_BASE, -1, 1 << 64)
_TABLE_BITS = 24
_TABLE_MASK = (1 << _TABLE_BITS) - 1


def _window_hashes(data: np.ndarray, width: int) -> np.ndarray:
    """A 64-bit hash of every ``width``-byte window of ``data`` (uint8): the window's
    polynomial sum(b[t] B^-t), from prefix sums (integer arithmetic wraps modulo 2^64)."""
    n = data.shape[0] - width + 1
    if n <= 0:
        return np.empty(0, dtype=np.uint64)
    powers_inv = np.full(data.shape[0], _BASE_INV, dtype=np.uint64)
    powers_inv[0] = 1
    powers_inv = np.cumprod(powers_inv, dtype=np.uint64)
    powers = np.full(n, _BASE, dtype=np.uint64)
    powers[0] = 1
    powers = np.cumprod(powers, dtype=np.uint64)
    prefix = np.zeros(data.shape[0] + 1, dtype=np.uint64)
    np.cumsum((data.astype(np.uint64) + np.uint64(1)) * powers_inv, dtype=np.uint64,
              out=prefix[1:])
    return (prefix[width : width + n] - prefix[:n]) * powers


class WindowIndex:
    """Finds every place where some ``window``-byte run of a needle occurs in a haystack;
    exact (hashes only select candidates). Build once, scan many haystacks.

    Any run of ``window`` bytes of a needle contains a block of ``window // 2`` bytes that
    starts at a multiple of ``window // 2`` of the needle, so hashing those blocks of the
    needles and every block-sized run of the haystack finds all candidates; each candidate
    is then extended byte by byte both ways and kept when the common run is >= ``window``.
    Runs of one repeated byte carry no information and are skipped when ``skip_constant``;
    ``min_distinct`` > 2 also skips needle blocks with fewer distinct byte values (a block
    of zeros and one 0x01 is both a dark patch of an image and a zero-padded header field).
    """

    def __init__(self, needles: Mapping[str, bytes], window: int,
                 skip_constant: bool = True, min_distinct: int = 2) -> None:
        self.needles = dict(needles)
        self.window = window
        self.half = half = window // 2
        self.blocks: dict[int, list[tuple[str, int]]] = {}
        for name, needle in self.needles.items():
            arr = np.frombuffer(needle, dtype=np.uint8)
            starts = np.arange(0, len(needle) - half + 1, half)
            if starts.size == 0:
                continue
            if skip_constant:
                view = arr[: starts[-1] + half].reshape(-1, half)
                starts = starts[(view != view[:, :1]).any(axis=1)]
            if min_distinct > 2:
                starts = np.array([st for st in starts.tolist()
                                   if len(set(needle[st : st + half])) >= min_distinct],
                                  dtype=np.int64)
                if starts.size == 0:
                    continue
            hashes = _window_hashes(arr, half)[starts]
            for start, value in zip(starts.tolist(), hashes.tolist(), strict=True):
                self.blocks.setdefault(value, []).append((name, start))
        keys = np.fromiter(self.blocks.keys(), dtype=np.uint64, count=len(self.blocks))
        self.table = np.zeros(1 << _TABLE_BITS, dtype=bool)  # a one-hash Bloom filter
        self.table[keys & np.uint64(_TABLE_MASK)] = True

    def find(self, haystack: bytes) -> list[tuple[str, int, int]]:
        """(needle name, needle offset, haystack offset) of every common run."""
        half = self.half
        if len(haystack) < self.window or not self.blocks:
            return []
        hay_hashes = _window_hashes(np.frombuffer(haystack, dtype=np.uint8), half)
        maybe = np.flatnonzero(self.table[hay_hashes & np.uint64(_TABLE_MASK)])
        found: list[tuple[str, int, int]] = []
        for offset, value in zip(maybe.tolist(), hay_hashes[maybe].tolist(), strict=True):
            for name, start in self.blocks.get(value, ()):
                needle = self.needles[name]
                if needle[start : start + half] != haystack[offset : offset + half]:
                    continue
                left = 0
                while (start - left > 0 and offset - left > 0
                       and needle[start - left - 1] == haystack[offset - left - 1]):
                    left += 1
                right = half
                while (start + right < len(needle) and offset + right < len(haystack)
                       and needle[start + right] == haystack[offset + right]):
                    right += 1
                hit = (name, start - left, offset - left)
                if left + right >= self.window and hit not in found:
                    found.append(hit)
        return found


class StringIndex:
    """Finds every occurrence of any of many byte strings (each >= ``prefix`` bytes long)
    in a haystack: the ``prefix``-byte heads of the strings are hashed, every ``prefix``-byte
    run of the haystack is hashed and looked up, and candidates are compared in full."""

    def __init__(self, strings: Iterable[bytes], prefix: int = 6) -> None:
        self.prefix = prefix
        self.heads: dict[int, list[bytes]] = {}
        for string in set(strings):
            if len(string) < prefix:
                raise ValueError(f"{string!r} is shorter than {prefix} bytes")
            head = np.frombuffer(string[:prefix], dtype=np.uint8)
            value = int(_window_hashes(head, prefix)[0])
            self.heads.setdefault(value, []).append(string)
        keys = np.fromiter(self.heads.keys(), dtype=np.uint64, count=len(self.heads))
        self.table = np.zeros(1 << _TABLE_BITS, dtype=bool)
        self.table[keys & np.uint64(_TABLE_MASK)] = True

    def find(self, haystack: bytes) -> list[tuple[bytes, int]]:
        if len(haystack) < self.prefix or not self.heads:
            return []
        hashes = _window_hashes(np.frombuffer(haystack, dtype=np.uint8), self.prefix)
        maybe = np.flatnonzero(self.table[hashes & np.uint64(_TABLE_MASK)])
        found = []
        for offset, value in zip(maybe.tolist(), hashes[maybe].tolist(), strict=True):
            for string in self.heads.get(value, ()):
                if haystack.startswith(string, offset):
                    found.append((string, offset))
        return found
