"""Workstation safety (issue 16): the keys wiped from memory "where Python allows".

What Python lets us zero are the numpy arrays of the secure-kNN index keys (the basis and
every matrix of crypto/index.py IndexKey); the data and keyword keys are immutable
``bytes`` (crypto/keys.py KeyRing.wipe says so). ``Client.lock`` hands the rings of the
repositories it forgets to app/core/session.py ``wipe_rings``: each index key is zeroed
as soon as nothing references it any more, so a task still running keeps working keys
until it ends, and a ring nobody holds is zeroed during ``lock`` itself.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

try:
    import owned_repos
except ImportError:  # pragma: no cover
    from tests import owned_repos

from app.core.settings import Settings
from crypto.identity import Identity
from crypto.index import BoundLevels, IndexKey, WipedKey
from crypto.keys import KeyRing, VersionKeys

DIM = 16


def _arrays(key: IndexKey) -> list[np.ndarray]:
    """Every secret array of an index key (what wiping must zero)."""
    out: list[np.ndarray] = [key.basis]
    for sknn in (key.full, *key.level_keys):
        out += [sknn.split, sknn.m1, sknn.m2, sknn._m1_inv_t, sknn._m2_inv_t]
    return out


def _zeroed(arrays: list[np.ndarray]) -> bool:
    return bool(arrays) and all(not np.any(a) for a in arrays)


def _ring(seed: int) -> KeyRing:
    rng = np.random.default_rng(seed)
    sample = rng.normal(size=(64, DIM))
    ring = KeyRing("r-wipe", (VersionKeys.generate(1, IndexKey.generate(DIM, sample)),))
    return ring.rotated(IndexKey.generate(DIM, sample))


def test_ring_wipe_zeroes_every_index_matrix_and_refuses_use() -> None:
    ring = _ring(1)
    kept = [a for v in ring.versions for a in _arrays(v.index_key)]
    assert not _zeroed(kept)  # real keys before
    query = np.ones((1, DIM))
    ring.current.index_key.query(query)
    ring.wipe()
    assert _zeroed(kept), "a reference kept to an index matrix still reads key material"
    for keys in ring.versions:
        assert keys.index_key.wiped
        with pytest.raises(WipedKey, match="open the repository again"):
            keys.index_key.query(query)
        with pytest.raises(WipedKey):
            keys.index_key.encrypt(query)
    assert all(len(v.data_key) == 32 for v in ring.versions)  # bytes: dropped, not wiped


def test_wipe_on_release_waits_for_the_last_holder() -> None:
    """An import running during the lock holds its ring: its keys keep working until it
    lets go, then they are zeroed."""
    ring = _ring(2)
    held = ring.current.index_key  # what a running task still holds
    arrays = _arrays(held)
    ring.wipe_on_release()
    del ring
    gc.collect()
    assert not _zeroed(arrays)
    held.query(np.ones((1, DIM)))  # still usable by the task that holds it
    del held
    gc.collect()
    assert _zeroed(arrays)


def test_a_shared_secure_knn_key_survives_while_another_key_uses_it() -> None:
    """with_levels keeps the full-vector key: forgetting the old IndexKey must not zero
    the matrices the new one still uses."""
    rng = np.random.default_rng(3)
    old = IndexKey.generate(DIM, levels=())
    new = old.with_levels(BoundLevels.generate(DIM, rng.normal(size=(64, DIM)), (4, 8)))
    full = [old.full.m1, old.full.m2]
    old.wipe_on_release()
    del old
    gc.collect()
    assert not _zeroed(full)
    new.query(np.ones((1, DIM)))
    new.wipe_on_release()
    del new
    gc.collect()
    assert _zeroed(full)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Identity, Path]:
    """An owner on disk and a directory-store repository holding pydicom's CT_small."""
    from pydicom.data import get_testdata_file

    from app.core.client import Client

    root = tmp_path_factory.mktemp("wipe-facade")
    settings = Settings(store="directory", data_dir=str(root / "data"), workers=1)
    owner = owned_repos.identity_on_disk(settings.data_path, "Dr. Owner")
    ct = Path(str(get_testdata_file("CT_small.dcm")))
    with Client(settings, owner) as client:
        repo = client.create_repository("wipe-facade")
        assert len(client.import_files(repo, [ct]).imported) == 1
    return settings, owner, ct


def test_lock_wipes_the_forgotten_rings_and_resume_reopens(
        imported: tuple[Settings, Identity, Path]) -> None:
    from app.core.client import Client

    settings, owner, ct = imported
    with Client(settings, owner) as client:
        repo = client.open_repository("wipe-facade")
        assert client.search_files(repo, [ct], k=1)[0].hits[0].name == "CT_small.dcm"
        kept = _arrays(repo.ring.current.index_key)  # a reference to the matrices only
        assert not _zeroed(kept)
        del repo
        client.lock()
        assert _zeroed(kept), "Client.lock left an index key matrix readable"

        client.resume(owner)
        held = client.open_repository("wipe-facade")  # opened again: a fresh ring
        assert not _zeroed(_arrays(held.ring.current.index_key))
        assert client.search_files(held, [ct], k=1)[0].hits[0].name == "CT_small.dcm"

        client.lock()  # held across the lock, as a running task would hold it
        client.resume(owner)
        held.ring.wipe()  # what happens to it once released: no search with it
        with pytest.raises(WipedKey):
            client.search_files(held, [ct], k=1)
        again = client.open_repository("wipe-facade")
        assert client.search_files(again, [ct], k=1)[0].hits[0].name == "CT_small.dcm"
