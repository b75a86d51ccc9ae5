"""The service's search call on a chosen device: ``searcher(device)`` returns a function
with cloud.search.search_batch's signature, so the service swaps engines in one place.

For ``cpu`` it is cloud.search.search_batch itself. For ``cuda[:N]`` it copies each
index the service hands it (the arrays of cloud/repo_index.py's snapshot) into device
memory once, on first use, keeps the copy while the index lives (a new snapshot is a new
index: the old copy is freed with it), and answers one query with the ``levels`` mode
and several with one batched scan (cloud/gpu/engine.py): the same exact results.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType

from cloud.gpu import engine
from cloud.gpu.device import array_module, parse_device
from cloud.search import EncryptedIndex, SearchResult
from crypto.tokens import EncryptedVectors, QueryToken

Searcher = Callable[[EncryptedIndex, QueryToken, int], list[SearchResult]]


class DeviceSearcher:
    """search_batch on a device; thread-safe (one copy per index, made under a lock)."""

    def __init__(self, xp: ModuleType, ordinal: int = 0) -> None:
        self.xp = xp
        self.ordinal = ordinal
        self._copies: weakref.WeakKeyDictionary[EncryptedIndex, engine.DeviceIndex] = (
            weakref.WeakKeyDictionary())
        self._lock = threading.Lock()

    def device_index(self, index: EncryptedIndex) -> engine.DeviceIndex:
        with self._lock:
            copy = self._copies.get(index)
            if copy is None:
                vectors = EncryptedVectors(full=index.full, levels=tuple(index.levels))
                copy = engine.DeviceIndex.from_vectors(self.xp, [vectors])
                self._copies[index] = copy
            return copy

    def __call__(self, index: EncryptedIndex, token: QueryToken, k: int = 1
                 ) -> list[SearchResult]:
        with self._current_device():
            copy = self.device_index(index)
            if len(token) == 1:
                result = engine.search(copy, token, k, "levels")
                result.stats.batch = 1
                return [result]
            return engine.search_batch(copy, token, k, "f32")

    def _current_device(self) -> AbstractContextManager[object]:
        """CuPy's current device is per thread: each search names it."""
        if self.xp.__name__ == "cupy":
            return self.xp.cuda.Device(self.ordinal)  # type: ignore[no-any-return]
        return nullcontext()


def searcher(device: str = "cpu") -> Searcher:
    """The search function for ``device`` (cpu, cuda, cuda:N); errors in plain words when
    the device cannot be used (cloud/gpu/device.py)."""
    parsed = parse_device(device)
    if not parsed.is_gpu:
        from cloud.search import search_batch

        return search_batch
    return DeviceSearcher(array_module(device), parsed.ordinal)
