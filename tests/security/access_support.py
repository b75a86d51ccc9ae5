"""Helpers of the membership and revocation tests (issue 11, items 2, 4, 5, 6), on
format-2 repositories (issue 13): what a member reads and searches is what the verified
segment log names (live packs and segments), never a listing of the bucket.

A ``Client`` is one workstation: an identity and its own data directory (pinned owner keys,
remembered manifest sequences), over the shared bucket; what the access functions need of a
session is ``.store`` and ``.settings``. ``FaultyStore`` is the real store with a failure
injected after the Nth write (put or delete): the code under test stays the real one.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

try:  # tests/ is on sys.path (its conftest); re-exported for the tests that use them
    from faults import FaultyStore as FaultyStore
    from faults import InjectedFailure as InjectedFailure
    from faults import restore as restore
    from faults import snapshot as snapshot
    from workstation import StoreSession as StoreSession
    from workstation import Workstation as Workstation
    from workstation import fresh_settings as fresh_settings
    from workstation import sample_files as sample_files
except ImportError:  # pragma: no cover  (if tests/ becomes a package)
    from tests.faults import FaultyStore as FaultyStore
    from tests.faults import InjectedFailure as InjectedFailure
    from tests.faults import restore as restore
    from tests.faults import snapshot as snapshot
    from tests.workstation import StoreSession as StoreSession
    from tests.workstation import Workstation as Workstation
    from tests.workstation import fresh_settings as fresh_settings
    from tests.workstation import sample_files as sample_files

from app.core.access import (
    create_repository_as,
    grant_access,
    register_user,
)
from app.core.importer import Importer
from app.core.logstate import verified_log
from app.core.packs import ImageReader
from app.core.repository import Manifest, Repository, read_signed_manifest
from cloud import layout, seglog
from cloud.search import EncryptedIndex, search
from cloud.segments import decode_segment
from cloud.store import ObjectStore
from crypto import pack
from crypto.keys import KeyRing

Client = Workstation  # one workstation of one user


def register(owner: Client, *users: Client) -> None:
    for user in users:
        register_user(owner.session, owner.identity, user.identity.card().to_json())


def importer(client: Client, repo: Repository, batch: int = 3, store: Any = None
             ) -> Importer:
    """A format-2 importer run by ``client`` (its identity signs the log entries)."""
    return client.importer(repo, batch, store)


def owner_and_two_members(store: ObjectStore, name: str, files: int = 0, batch: int = 3,
                          storage_format: int = 2,
                          ) -> tuple[Client, Client, Client, Repository]:
    """Owner, Alice and Bob, and a repository (format 2 unless told) of ``files`` sample
    images (imported by the owner in batches of ``batch`` before anyone is granted) to
    which Alice and Bob are granted."""
    owner, alice, bob = (Client.make(store, n) for n in ("Owner", "Alice", "Bob"))
    repo = create_repository_as(owner.session, owner.identity, name,
                                storage_format=storage_format)
    if files:
        importer(owner, repo, batch).run(sample_files(files))
    register(owner, alice, bob)
    grant_access(owner.session, owner.identity, repo, alice.user_id)
    grant_access(owner.session, owner.identity, repo, bob.user_id)
    return owner, alice, bob, repo




def manifest_of(store: ObjectStore, repo: Repository) -> Manifest:
    assert repo.owner_key is not None
    return read_signed_manifest(store, repo.repo_id, repo.owner_key)[0]


def log_of(store: ObjectStore, repo: Repository) -> seglog.LogState:
    """The repository's segment log as a fresh workstation verifies it (under the manifest
    signed now by the owner ``repo`` was opened with)."""
    return verified_log(store, fresh_settings(), repo)


def segment_ids(store: ObjectStore, repo: Repository, key_version: int | None = None
                ) -> tuple[Counter[str], set[int]]:
    """How often each image id is named by a live segment (of ``key_version``, or any),
    and the live segments' key versions; each segment checked against the log."""
    ids: Counter[str] = Counter()
    versions = set()
    for live in log_of(store, repo).segments(key_version):
        key = layout.segment_key(repo.repo_id, live.id)
        segment = decode_segment(store.get(key), live.id, expected_sha256=live.sha256)
        assert segment.key_version == live.key_version
        ids.update(segment.id_strings())
        versions.add(segment.key_version)
    return ids, versions


def search_finds_each_image(store: ObjectStore, repo: Repository,
                            features: dict[str, np.ndarray], key_version: int) -> None:
    """An encrypted nearest-neighbour search over the live segments of ``key_version``
    (what a complete answer covers) finds each image itself, with ``repo``'s keys."""
    parts, order = [], []
    for live in log_of(store, repo).segments(key_version):
        key = layout.segment_key(repo.repo_id, live.id)
        segment = decode_segment(store.get(key), live.id, expected_sha256=live.sha256)
        parts.append(segment.vectors)
        order += segment.id_strings()
    assert sorted(order) == sorted(features), "the live segments do not hold every image once"
    index = EncryptedIndex.concat(parts)
    for image_id, vector in features.items():
        token = repo.ring.version(key_version).index_key.query(vector[None, :])
        nearest = order[int(search(index, token, 1).positions[0])]
        # itself, or another image with the very same features (the samples hold copies)
        assert np.allclose(features[nearest], vector, rtol=0, atol=1e-12), image_id


def assert_member_reads_and_finds_everything(store: ObjectStore, repo: Repository,
                                             features: dict[str, np.ndarray]) -> None:
    """Every live object is of the current key version; every image's metadata, preview
    and features open from its pack under that version with ``repo``'s keys; an encrypted
    search over the live segments finds each image itself."""
    version = repo.manifest.key_version
    state = log_of(store, repo)
    assert {o.key_version for o in state.live.values()} == {version}, state.live
    ids, versions = segment_ids(store, repo)
    assert versions == {version}, f"segments of versions {versions}, manifest at {version}"
    assert set(ids) == set(features) and max(ids.values()) == 1, ids
    reader = ImageReader(store, repo, state)
    assert reader.image_ids() == set(features)
    for image_id, vector in features.items():
        meta, used = reader.meta(image_id)
        assert used == version
        assert np.array_equal(np.asarray(meta["features"]), vector)
        assert reader.thumb(image_id).startswith(b"\x89PNG")
    search_finds_each_image(store, repo, features, version)


def stored_versions(store: ObjectStore, repo_id: str) -> set[int]:
    """Key versions of every pack and segment object in the bucket, live or not."""
    versions = set()
    for key in store.list_keys(layout.segments_prefix(repo_id)):
        versions.add(decode_segment(store.get(key), key.rsplit("/", 1)[-1]).key_version)
    for key, size in store.list_objects(layout.packs_prefix(repo_id)):
        blob = store.get(key)
        versions.add(pack.trailer_info(blob, size, key.rsplit("/", 1)[-1])[1])
    return versions


def assert_old_ring_reads_nothing(store: ObjectStore, repo_id: str, old: KeyRing) -> None:
    """No pack or segment left in the bucket is of a key version the old ring holds (so
    none of its metadata, previews, features or index rows opens with it)."""
    held = {keys.version for keys in old.versions}
    left = stored_versions(store, repo_id) & held
    assert not left, f"objects of key versions {left} the revoked user holds are still stored"


def features_by_id(store: ObjectStore, repo: Repository) -> dict[str, np.ndarray]:
    """Plaintext features of every committed image, from the feature arrays of the live
    packs (of the newest key version holding each image) that ``repo``'s keys open."""
    state = log_of(store, repo)
    held = {keys.version for keys in repo.ring.versions}
    state.live = {k: o for k, o in state.live.items() if o.key_version in held}
    reader = ImageReader(store, repo, state)
    out: dict[str, np.ndarray] = {}
    for live in sorted(state.packs(), key=lambda o: -o.key_version):
        ids, rows = reader.features_of_pack(live.id)
        for image_id, row in zip(ids, rows, strict=True):
            out.setdefault(image_id, np.asarray(row, dtype=np.float64))
    return out
