"""Helpers of the membership and revocation tests (issue 11, items 2, 4, 5, 6).

A ``Client`` is one workstation: an identity and its own data directory (pinned owner keys,
remembered manifest sequences), over the shared bucket; what the access functions need of a
session is ``.store`` and ``.settings``. ``FaultyStore`` is the real store with a failure
injected after the Nth write (put or delete): the code under test stays the real one.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.core import objects
from app.core.access import (
    create_repository_as,
    grant_access,
    open_repository_as,
    register_user,
)
from app.core.errors import IntegrityError
from app.core.importer import Importer
from app.core.repository import Manifest, Repository, read_signed_manifest
from app.core.settings import Settings
from cloud import layout
from cloud.search import EncryptedIndex, search
from cloud.segments import decode_segment
from cloud.store import ObjectStore
from crypto.identity import Identity
from crypto.keys import KeyRing


@dataclass
class StoreSession:
    store: Any  # an ObjectStore, or a FaultyStore around one
    settings: Settings


def fresh_settings() -> Settings:
    return Settings(data_dir=tempfile.mkdtemp(prefix="radcrypt-membership-"))


@dataclass
class Client:
    """One workstation of one user."""

    identity: Identity
    session: StoreSession

    @classmethod
    def make(cls, store: ObjectStore, name: str) -> Client:
        return cls(Identity.generate(name), StoreSession(store, fresh_settings()))

    @property
    def user_id(self) -> str:
        return self.identity.user_id

    def open(self, repo_id: str) -> Repository:
        return open_repository_as(self.session, self.identity, repo_id)


def register(owner: Client, *users: Client) -> None:
    for user in users:
        register_user(owner.session, owner.identity, user.identity.card().to_json())


def owner_and_two_members(store: ObjectStore, name: str, files: int = 0, batch: int = 3,
                          ) -> tuple[Client, Client, Client, Repository]:
    """Owner, Alice and Bob, and a repository of ``files`` sample images (imported in
    batches of ``batch`` before anyone is granted) to which Alice and Bob are granted."""
    owner, alice, bob = (Client.make(store, n) for n in ("Owner", "Alice", "Bob"))
    repo = create_repository_as(owner.session, owner.identity, name)
    if files:
        Importer(store, repo, batch_size=batch, processes=False).run(sample_files(files))
    register(owner, alice, bob)
    grant_access(owner.session, owner.identity, repo, alice.user_id)
    grant_access(owner.session, owner.identity, repo, bob.user_id)
    return owner, alice, bob, repo


class InjectedFailure(Exception):
    """The failure FaultyStore injects (stands for a crash or a lost connection)."""


class FaultyStore:
    """The real store; after the ``fail_after``-th write (put, put_stream or delete) has
    been done, that call raises InjectedFailure. ``fail_after=None`` only counts."""

    def __init__(self, store: ObjectStore, fail_after: int | None = None) -> None:
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


def snapshot(store: ObjectStore) -> dict[str, bytes]:
    return {key: store.get(key) for key in store.list_keys("radcrypt/")}


def restore(store: ObjectStore, saved: dict[str, bytes]) -> None:
    for key in list(store.list_keys("radcrypt/")):
        if key not in saved:
            store.delete(key)
    for key, data in saved.items():
        store.put(key, data)


def manifest_of(store: ObjectStore, repo: Repository) -> Manifest:
    assert repo.owner_key is not None
    return read_signed_manifest(store, repo.repo_id, repo.owner_key)[0]


def segment_ids(store: ObjectStore, repo_id: str) -> tuple[Counter[str], set[int]]:
    """How often each image id is named by a segment, and the segments' key versions."""
    ids: Counter[str] = Counter()
    versions = set()
    for key in store.list_keys(layout.segments_prefix(repo_id)):
        segment = decode_segment(store.get(key), key)
        ids.update(segment.id_strings())
        versions.add(segment.key_version)
    return ids, versions


def assert_member_reads_and_finds_everything(store: ObjectStore, repo: Repository,
                                             features: dict[str, np.ndarray]) -> None:
    """Every image's metadata opens under the current version with ``repo``'s keys, and an
    encrypted nearest-neighbour search over the stored segments finds each image itself."""
    version = repo.manifest.key_version
    ids, versions = segment_ids(store, repo.repo_id)
    assert versions == {version}, f"segments of versions {versions}, manifest at {version}"
    assert set(ids) == set(features) and max(ids.values()) == 1, ids
    parts, order = [], []
    for key in store.list_keys(layout.segments_prefix(repo.repo_id)):
        segment = decode_segment(store.get(key), key)
        parts.append(segment.vectors)
        order += segment.id_strings()
    index = EncryptedIndex.concat(parts)
    for image_id, vector in features.items():
        plain, used = objects.get_decrypted(store, repo.ring, repo.repo_id, "meta", image_id)
        assert used == version
        assert b'"features"' in plain
        token = repo.keys.index_key.query(vector[None, :])
        nearest = order[int(search(index, token, 1).positions[0])]
        # itself, or another image with the very same features (the samples hold copies)
        assert np.allclose(features[nearest], vector, rtol=0, atol=1e-12), image_id


def assert_old_ring_reads_nothing(store: ObjectStore, repo_id: str, old: KeyRing,
                                  image_ids: list[str]) -> None:
    for image_id in image_ids:
        try:
            objects.get_decrypted(store, old, repo_id, "meta", image_id)
        except IntegrityError:
            continue
        raise AssertionError(f"the revoked user's old keys still open the metadata of {image_id}")


def features_by_id(store: ObjectStore, repo: Repository) -> dict[str, np.ndarray]:
    """Plaintext features of every committed image, from its metadata."""
    import json

    ids, _ = segment_ids(store, repo.repo_id)
    out = {}
    for image_id in ids:
        plain, _ = objects.get_decrypted(store, repo.ring, repo.repo_id, "meta", image_id)
        out[image_id] = np.asarray(json.loads(plain)["features"], dtype=np.float64)
    return out


def sample_files(count: int) -> list[Path]:
    from resources.samples import decodable_dicom_files

    files = decodable_dicom_files()
    assert len(files) >= count
    return files[:count]
