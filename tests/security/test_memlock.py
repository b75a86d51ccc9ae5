"""Key pages locked in RAM (crypto/memlock.py; issue 16 "never written to swap files of
ours"): the secure-kNN index keys' arrays are mlock'ed while they live, the kernel says
so (VmLck in /proc/self/status grows by their size), wiping still zeroes them and lets
the pages go; a refused lock (RLIMIT_MEMLOCK) stops nothing, is counted and logged once
at debug level without key material. Linux only: elsewhere locking is a no-op.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from crypto import memlock
from crypto.index import IndexKey
from crypto.keys import KeyRing, VersionKeys

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="mlock is used on Linux only (a no-op elsewhere)")


def _vmlck_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError("no VmLck line in /proc/self/status")


@pytest.fixture
def room() -> Iterator[None]:
    """RLIMIT_MEMLOCK raised to its hard limit for this test (CI may have a low soft one;
    root ignores it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    wanted = 16 << 20
    if os.geteuid() != 0 and hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_MEMLOCK hard limit {hard} bytes is below the 16 MiB the test "
                    "locks")
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))


def test_a_locked_array_shows_in_vmlck_and_is_released_after_wiping(room: None) -> None:
    array = np.random.default_rng(1).normal(size=(512, 512))  # 2 MiB
    before = _vmlck_kib()
    assert memlock.lock(array) and memlock.lock(array)  # twice: one lock
    assert _vmlck_kib() - before >= array.nbytes // 1024
    array.fill(0)
    memlock.unlock(array)
    assert _vmlck_kib() - before <= 8  # its pages released (8 KiB: pages it shares)
    assert not np.any(array)

    freed = np.ones(1 << 18)  # 2 MiB freed without unlock: the finalizer releases it
    assert memlock.lock(freed)
    assert _vmlck_kib() - before >= freed.nbytes // 1024
    del freed
    assert _vmlck_kib() - before <= 8


def test_shared_pages_stay_locked_until_the_last_buffer_lets_go(room: None) -> None:
    block = np.zeros(3 * memlock.PAGE // 8)  # one buffer, two views sharing a page
    first, second = block[: len(block) // 2], block[len(block) // 2 :]
    before = _vmlck_kib()
    assert memlock.lock(first) and memlock.lock(second)
    locked = _vmlck_kib() - before
    assert locked >= 3 * memlock.PAGE // 1024
    memlock.unlock(first)
    assert _vmlck_kib() - before >= 2 * memlock.PAGE // 1024  # second's pages kept
    memlock.unlock(second)
    assert _vmlck_kib() - before <= 4
    buffer = bytearray(os.urandom(3 * memlock.PAGE))  # a bytearray key buffer
    assert memlock.lock(buffer) and _vmlck_kib() - before >= 3 * memlock.PAGE // 1024
    buffer[:] = bytes(len(buffer))
    memlock.unlock(buffer)
    assert _vmlck_kib() - before <= 4 and not any(buffer)


def test_index_keys_are_locked_while_they_live_and_wiping_still_zeroes_them(
        room: None) -> None:
    before = _vmlck_kib()
    held = memlock.status()["buffers"]
    sample = np.random.default_rng(2).normal(size=(64, 128))
    ring = KeyRing("r-lock", (VersionKeys.generate(1, IndexKey.generate(128, sample)),))
    key = ring.current.index_key
    arrays = [key.basis] + [a for k in (key.full, *key.level_keys)
                            for a in (k.split, k.m1, k.m2, k._m1_inv_t, k._m2_inv_t)]
    size = sum(a.nbytes for a in arrays)
    assert memlock.status()["buffers"] - held == len(arrays)
    assert (_vmlck_kib() - before) * 1024 >= size - len(arrays) * memlock.PAGE
    key.query(np.ones((1, 128)))
    ring.wipe()
    assert all(not np.any(a) for a in arrays)  # zeroed, as before locking existed
    assert memlock.status()["buffers"] == held
    assert _vmlck_kib() - before <= 4 * len(arrays)  # at most their shared edge pages


CHILD = r"""
import ctypes, io, json, logging, resource, sys
import numpy as np
# root ignores RLIMIT_MEMLOCK while it holds CAP_IPC_LOCK: drop it (capset, this child)
libc = ctypes.CDLL(None, use_errno=True)
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]
header, data = Header(0x20080522, 0), (Data * 2)()
if libc.capget(ctypes.byref(header), data) == 0:
    for part in data:
        part.effective &= ~(1 << 14); part.permitted &= ~(1 << 14)
    libc.capset(ctypes.byref(header), data)
resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]))
log = io.StringIO()
logging.basicConfig(level=logging.DEBUG, stream=log)
from crypto import memlock
from crypto.index import IndexKey
key = IndexKey.generate(32)          # locking refused: the key works all the same
key.query(np.ones((1, 32)))
extra = np.ones(1 << 16)
refused = memlock.lock(extra)
secret = key.full.m1.tobytes().hex()[:64]
key.wipe()
print(json.dumps({"status": memlock.status(), "refused_extra": not refused,
                  "zeroed": not np.any(key.full.m1), "log": log.getvalue(),
                  "secret": secret}))
"""


def test_a_refused_lock_is_silent_counted_and_logged_once_without_key_material() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # nothing shown to the user
    result = json.loads(done.stdout)
    status = result["status"]
    assert status["available"] is True and status["locked_bytes"] == 0
    assert status["failures"] >= 2 and result["refused_extra"] and result["zeroed"]
    lines = [line for line in result["log"].splitlines() if "crypto.memlock" in line]
    assert len(lines) == 1 and "refused" in lines[0] and "said once" in lines[0]
    assert result["secret"] not in result["log"] and "0x" not in lines[0]
