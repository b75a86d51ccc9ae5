"""A store that fails after its n-th write: the crash of every resumability test.

Used by the revocation, migration and import tests (tests/security/access_support.py,
tests/fixtures/format2_support.py): each runs an operation against FaultyStore(store, n)
for n = 1, 2, ... until it completes, runs it again on the real store, and checks the end
state, so that a crash after any single write is proved recoverable. ``snapshot`` and
``restore`` put a whole bucket back as it was before such a run. ``synthetic_dicoms``
makes the small images the fault, kill and disk-full tests import by the hundred.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cloud.backend import Store


class InjectedFailure(Exception):
    """The failure FaultyStore injects (stands for a crash or a lost connection)."""


class FaultyStore:
    """The real store; after the ``fail_after``-th write (put, put_stream or delete) has
    been done, that call raises InjectedFailure. ``fail_after=None`` only counts."""

    def __init__(self, store: Store, fail_after: int | None = None) -> None:
        self._store = store
        self.fail_after = fail_after
        self.writes: list[str] = []

    def _wrote(self, key: str) -> None:
        self.writes.append(key)
        if self.fail_after is not None and len(self.writes) >= self.fail_after:
            raise InjectedFailure(f"injected failure after write {len(self.writes)} ({key})")

    def put(self, key: str, *args: Any, **kwargs: Any) -> Any:
        result = self._store.put(key, *args, **kwargs)
        self._wrote(key)
        return result

    def put_stream(self, key: str, *args: Any, **kwargs: Any) -> Any:
        result = self._store.put_stream(key, *args, **kwargs)
        self._wrote(key)
        return result

    def delete(self, key: str) -> None:
        self._store.delete(key)
        self._wrote(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def snapshot(store: Store) -> dict[str, bytes]:
    return {key: store.get(key) for key in store.list_keys("radcrypt/")}


def restore(store: Store, saved: dict[str, bytes]) -> None:
    for key in list(store.list_keys("radcrypt/")):
        if key not in saved:
            store.delete(key)
    for key, data in saved.items():
        store.put(key, data)


def synthetic_dicoms(directory: Path, count: int, seed: int = 0, size: int = 64
                     ) -> list[Path]:
    """``count`` small distinct CT-like DICOM files (``size`` x ``size`` uint16,
    explicit VR little endian): fast to decode, so the fault, kill and disk tests can
    import hundreds or thousands of them. Deterministic for a seed."""
    import numpy as np

    from bench.ingest import save_ct

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(count):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.35)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) * rng.uniform(400, 1500)
        image = disc + rng.normal(0, 30, (size, size)) + 1024 + 300 * xx * rng.uniform(-1, 1)
        pixels = np.clip(image, 0, 4095).astype(np.uint16)
        uid = f"1.2.826.0.1.3680043.9.7777.{seed}.{i + 1}"
        paths.append(save_ct(directory / f"syn-{seed}-{i:05d}.dcm", pixels, uid, window=None))
    return paths
