"""Revocation is resumable and stale clients cannot write (issue 11, items 4 and 6).

Item 6: a revocation that fails after any one of its writes (a failure injected into the
store after the Nth put or delete, for every N up to the last) is finished by running
``revoke_access`` again: the revoked user is refused, every remaining member opens the
repository, reads every image's metadata under the new key version and finds every image
by encrypted search, and the revoked user's old keys open none of it.

Item 4: an importer opened before a revocation refuses to commit under the superseded key
version, whether the revocation came before its run or between two of its batches.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

try:
    import access_support as sup
except ImportError:  # pragma: no cover
    from tests.security import access_support as sup

from app.core.access import revoke_access
from app.core.errors import AccessDenied, RadcryptError
from app.core.importer import Importer, committed_ids, image_id_for
from app.core.progress import ProgressEvent
from cloud import layout
from cloud.store import ObjectStore


def _world(store: ObjectStore, name: str, files: int = 5, batch: int = 3
           ) -> tuple[sup.Client, sup.Client, sup.Client, object]:
    return sup.owner_and_two_members(store, name, files, batch)


def test_revocation_failing_after_any_write_is_finished_by_running_it_again(
        moto_store: ObjectStore) -> None:
    store = moto_store
    owner, alice, bob, repo = _world(store, "kill-every-step")
    features = sup.features_by_id(store, owner.open(repo.repo_id))
    assert len(features) == 5
    bob_ring = bob.open(repo.repo_id).ring
    before = sup.manifest_of(store, repo)
    saved = sup.snapshot(store)

    counting = sup.FaultyStore(store)
    revoke_access(sup.StoreSession(counting, sup.fresh_settings()), owner.identity, repo,
                  bob.user_id)
    steps = len(counting.writes)
    # the owner's grant, the manifest without bob, alice's grant, 5 metadata, a segment,
    # the manifest at version 2, bob's grant deleted, 2 old segments deleted
    assert steps == 13, counting.writes

    for n in range(1, steps + 1):
        sup.restore(store, saved)
        settings = sup.fresh_settings()  # the owner's workstation, the same for both runs
        faulty = sup.StoreSession(sup.FaultyStore(store, fail_after=n), settings)
        with pytest.raises(sup.InjectedFailure):
            revoke_access(faulty, owner.identity, repo, bob.user_id)
        # the same call again, with the Repository the owner had before the failure
        final = revoke_access(sup.StoreSession(store, settings), owner.identity, repo,
                              bob.user_id)
        manifest = sup.manifest_of(store, repo)
        where = f"failure after write {n} ({counting.writes[n - 1]})"
        assert manifest == final.manifest, where
        assert manifest.key_version > before.key_version, where
        assert manifest.sequence > before.sequence, where
        assert {(m.user_id, m.key_version) for m in manifest.members} == {
            (owner.user_id, manifest.key_version), (alice.user_id, manifest.key_version)}, where
        assert not store.exists(layout.grant_key(repo.repo_id, bob.user_id)), where
        with pytest.raises(AccessDenied, match="no access"):
            sup.Client(bob.identity, sup.StoreSession(store, sup.fresh_settings())).open(
                repo.repo_id)
        for member in (alice, owner):
            opened = sup.Client(member.identity,
                                sup.StoreSession(store, sup.fresh_settings())).open(repo.repo_id)
            assert opened.manifest.key_version == manifest.key_version, where
            sup.assert_member_reads_and_finds_everything(store, opened, features)
        sup.assert_old_ring_reads_nothing(store, repo.repo_id, bob_ring, list(features))


def test_garbage_under_grants_does_not_stop_a_revocation(moto_store: ObjectStore) -> None:
    """The old revocation re-wrapped to every name under grants/ and stopped half-way (grant
    deleted, manifest old) on one it could not read."""
    store = moto_store
    owner, alice, bob, repo = _world(store, "junk-grants", files=3)
    features = sup.features_by_id(store, owner.open(repo.repo_id))
    junk = {layout.grant_key(repo.repo_id, "mallory-0badf0"): b"\x00\xffnot a grant" * 7,
            layout.grants_prefix(repo.repo_id) + "NOT A USER": b"RCSR\x01" + bytes(200)}
    for key, data in junk.items():
        store.put(key, data)
    final = revoke_access(owner.session, owner.identity, repo, bob.user_id)
    assert final.manifest.key_version == 2
    assert {m.user_id for m in final.manifest.members} == {owner.user_id, alice.user_id}
    for key, data in junk.items():
        assert store.get(key) == data  # never re-wrapped, never read as a grant
    sup.assert_member_reads_and_finds_everything(store, alice.open(repo.repo_id), features)
    with pytest.raises(AccessDenied):
        bob.open(repo.repo_id)


def test_importer_opened_before_a_revocation_refuses_to_commit(
        moto_store: ObjectStore) -> None:
    store = moto_store
    owner, alice, bob, repo = _world(store, "stale-importer", files=3)
    stale = Importer(store, alice.open(repo.repo_id), processes=False)
    assert stale.repo.keys.version == 1
    revoke_access(owner.session, owner.identity, repo, bob.user_id)
    before = committed_ids(store, repo.repo_id)
    new_file = sup.sample_files(6)[5]
    with pytest.raises(RadcryptError) as caught:
        stale.run([new_file])
    message = str(caught.value)
    assert repo.repo_id in message and "key version 2" in message and "key version 1" in message
    assert committed_ids(store, repo.repo_id) == before
    _, versions = sup.segment_ids(store, repo.repo_id)
    assert versions == {2}
    old_id = image_id_for(stale.repo, hashlib.sha256(new_file.read_bytes()).digest())
    for kind in ("objects", "thumbs", "meta"):  # nothing uploaded under the old version
        assert not store.exists(layout.image_key(kind, repo.repo_id, old_id))
    # reopened, the same client imports under the new version
    report = Importer(store, alice.open(repo.repo_id), processes=False).run([new_file])
    assert len(report.imported) == 1


def test_revocation_between_two_batches_stops_the_import(moto_store: ObjectStore) -> None:
    """The GUI keeps a repository open; a revocation during its import must not let the
    next batch be written under the superseded key version."""
    store = moto_store
    owner, alice, bob, repo = _world(store, "mid-import", files=2)
    files = sup.sample_files(8)[4:8]
    revoked = []

    def progress(event: ProgressEvent) -> None:
        if event.stage == "commit" and not revoked:
            revoked.append(revoke_access(owner.session, owner.identity, repo, bob.user_id))

    importer = Importer(store, alice.open(repo.repo_id), batch_size=2, progress=progress,
                        processes=False)
    with pytest.raises(RadcryptError, match=r"key version 2.*key version 1"):
        importer.run(files)
    assert revoked and revoked[0].manifest.key_version == 2
    ids, versions = sup.segment_ids(store, repo.repo_id)
    assert versions == {2}  # the first batch was committed before, then re-encrypted
    assert len(ids) == 2 + 2
    first_batch = {image_id_for(importer.repo, hashlib.sha256(p.read_bytes()).digest())
                   for p in files[:2]}
    assert first_batch <= set(ids)
    assert np.all([max(ids.values()) == 1])
