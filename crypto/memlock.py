"""Best-effort locking of key pages in RAM (mlock), so that the kernel never writes them to
a swap file.

Why: issue 16 asks that keys are "never written to swap files of ours". The secure-kNN
index keys (crypto/index.py IndexKey: the bound basis and every secure-kNN matrix and
split vector, the cached inverses included) are numpy arrays that live as long as a
repository is open; under memory pressure the kernel may page them out, and a swap
partition outlives the process, the workstation lock and the wipe. ``mlock(2)`` pins
their pages; ``munlock`` lets them go after the wipe zeroed them.

Best effort, by design:

* Linux only (libc's mlock through ctypes); elsewhere every call is a no-op that
  returns False.
* mlock is refused past RLIMIT_MEMLOCK (8 MiB by default on current distributions, 64 KiB
  on older ones; a repository's index keys are a few hundred KiB). A refusal is never
  shown to the user and never stops anything: it is counted (``status()``) and logged
  ONCE per process at debug level, with the size and the errno only, never an address
  or a byte of key material.
* Locks do not nest in the kernel (one munlock unlocks a page whatever locked it), and
  small arrays share heap pages. So pages are reference-counted here: a page is
  unlocked when the last locked buffer on it is unlocked or freed (a weakref finalizer
  per numpy array).
* What is NOT locked: ``bytes`` keys (the data and keyword keys, the identity's secrets
  held by ``cryptography``'s OpenSSL objects), numpy temporaries made while encrypting a
  vector or a query, and copies the allocator made before the lock. PRIVACY.md says so.

A ``bytearray`` may be locked too (``lock``) if it is never resized (a resize moves it);
it cannot be weak-referenced, so its owner must ``unlock`` it. No bytearray key buffer
exists in the code today.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import sys
import threading
import weakref
from typing import Any

import numpy as np

PAGE = mmap.PAGESIZE
log = logging.getLogger(__name__)

_lock = threading.RLock()  # a finalizer may run (gc) while this thread holds it
_pages: dict[int, int] = {}  # page address -> locked buffers on it
_held: dict[int, tuple[int, int, weakref.finalize[Any, Any] | None]] = {}  # id -> pages
_failures = 0
_told = False
_libc: Any = None  # ctypes.CDLL once loaded; False where unavailable


def _load() -> Any:
    """libc with mlock/munlock, or False (not Linux, or no libc found)."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                                   use_errno=True)
                for name in ("mlock", "munlock"):
                    function = getattr(libc, name)
                    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
                    function.restype = ctypes.c_int
                _libc = libc
            except (OSError, AttributeError):
                _libc = False
    return _libc


def available() -> bool:
    """Whether this platform can lock pages (Linux with libc)."""
    return bool(_load())


def _span(buffer: np.ndarray[Any, Any] | bytearray) -> tuple[int, int] | None:
    """(first page, end of last page) of a buffer's memory; None when empty."""
    if isinstance(buffer, np.ndarray):
        address, size = int(buffer.ctypes.data), int(buffer.nbytes)
    else:
        size = len(buffer)
        if not size:
            return None
        address = ctypes.addressof((ctypes.c_char * size).from_buffer(buffer))
    if not size:
        return None
    start = address - address % PAGE
    end = address + size
    return start, end + (-end) % PAGE


def _failed(size: int) -> None:
    global _failures, _told
    errno = ctypes.get_errno()
    _failures += 1
    if not _told:
        _told = True
        log.debug("mlock of %d bytes of key memory refused (errno %d): key pages may be "
                  "swapped out (raise RLIMIT_MEMLOCK to lock them); said once", size, errno)


def lock(buffer: np.ndarray[Any, Any] | bytearray) -> bool:
    """Lock the pages of ``buffer`` in RAM; True when they are locked (now or before).
    False, silently (counted, logged once at debug level), where mlock is unavailable
    or refused. A numpy array's pages are released when it is freed; ``unlock`` after
    wiping releases them at once."""
    libc = _load()
    if not libc:
        return False
    span = _span(buffer)
    if span is None:
        return False
    with _lock:
        if id(buffer) in _held:
            return True
        start, end = span
        if libc.mlock(ctypes.c_void_p(start), ctypes.c_size_t(end - start)) != 0:
            _failed(end - start)
            return False
        for page in range(start, end, PAGE):
            _pages[page] = _pages.get(page, 0) + 1
        finalizer = None
        if isinstance(buffer, np.ndarray):
            finalizer = weakref.finalize(buffer, _forget, id(buffer))
            finalizer.atexit = False
        _held[id(buffer)] = (start, end, finalizer)
    return True


def lock_all(*buffers: Any) -> int:
    """Lock each numpy array or bytearray of ``buffers`` (others are skipped); the number
    locked."""
    return sum(lock(b) for b in buffers if isinstance(b, (np.ndarray, bytearray)))


def unlock(buffer: object) -> None:
    """Release ``buffer``'s pages (call it after zeroing the buffer); a page shared with
    another locked buffer stays locked. Nothing happens for a buffer not locked here."""
    with _lock:
        held = _held.pop(id(buffer), None)
    if held is not None:
        if held[2] is not None:
            held[2].detach()
        _release(held[0], held[1])


def _forget(key: int) -> None:
    """A locked array was freed without ``unlock``: its pages are released."""
    with _lock:
        held = _held.pop(key, None)
    if held is not None:
        _release(held[0], held[1])


def _release(start: int, end: int) -> None:
    libc = _load()
    with _lock:
        free = []
        for page in range(start, end, PAGE):
            count = _pages.get(page, 0) - 1
            if count > 0:
                _pages[page] = count
            else:
                _pages.pop(page, None)
                free.append(page)
    for page in free:  # the memory may be gone already: munlock then fails, harmlessly
        libc.munlock(ctypes.c_void_p(page), ctypes.c_size_t(PAGE))


def status() -> dict[str, int | bool]:
    """What is locked now and how often locking was refused (no addresses, no keys)."""
    with _lock:
        return {"available": available(), "locked_bytes": len(_pages) * PAGE,
                "buffers": len(_held), "failures": _failures}
