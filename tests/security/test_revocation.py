"""Revocation is resumable and stale clients cannot write (issue 11, items 4 and 6), on
format-2 repositories (docs/FORMAT-2.md 7.3; issue 13).

Item 6: a revocation that fails after any one of its writes (a failure injected into the
store after the Nth put or delete, for every N up to the last) is finished by running
``revoke_access`` again: the revoked user is refused, every remaining member opens the
repository, reads every image's metadata, preview and features from packs of the new key
version and finds every image by encrypted search over the live segments of the log, and
no pack or segment of a key version the revoked user holds is left in the bucket.

Item 4: an importer opened before a revocation refuses to commit under the superseded key
version, whether the revocation came before its run or between two of its batches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

try:
    import access_support as sup
except ImportError:  # pragma: no cover
    from tests.security import access_support as sup

from app.core import access, compaction, logstate
from app.core.access import revoke_access
from app.core.errors import AccessDenied, RadcryptError
from app.core.importer import Importer, image_id_for
from app.core.progress import ProgressEvent
from cloud import layout, seglog
from cloud.directory_store import DirectoryStore
from cloud.store import ObjectStore


def _world(store: ObjectStore, name: str, files: int = 5, batch: int = 3
           ) -> tuple[sup.Client, sup.Client, sup.Client, object]:
    return sup.owner_and_two_members(store, name, files, batch)


def test_revocation_failing_after_any_write_is_finished_by_running_it_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(access, "RESEAL_IMAGES", 3)  # two new packs: a failure between
    store = DirectoryStore(tmp_path / "bucket")  # the other tests use S3 (moto): same code
    store.ensure_bucket()
    owner, alice, bob, repo = _world(store, "kill-every-step", files=3, batch=3)
    # bob imports too: his entry follows the last checkpoint, so until the checkpoint at
    # the membership entry the log does not verify under the manifest without him
    bob_repo = bob.open(repo.repo_id)
    sup.importer(bob, bob_repo).run(sup.sample_files(4)[3:])
    features = sup.features_by_id(store, owner.open(repo.repo_id))
    assert len(features) == 4
    bob_ring = bob_repo.ring
    before = sup.manifest_of(store, repo)
    saved = sup.snapshot(store)

    counting = sup.FaultyStore(store)
    revoke_access(sup.StoreSession(counting, sup.fresh_settings()), owner.identity, repo,
                  bob.user_id)
    steps = len(counting.writes)
    kinds = [key.split("/")[4] for key in counting.writes]
    # the owner's grant, the manifest without bob, its membership entry and checkpoint,
    # alice's grant, per new pack (2: 3 images each at most) the pack, its segment and
    # their add entry, the manifest at version 2, its membership entry and checkpoint,
    # bob's grant deleted, one remove entry, the 2 old packs and 2 old segments deleted
    assert kinds[:-4] == ["grants", "manifest.json", "log", "checkpoints", "grants",
                          *["packs", "segments", "log"] * 2, "manifest.json", "log",
                          "checkpoints", "grants", "log"], counting.writes
    assert sorted(kinds[-4:]) == ["packs"] * 2 + ["segments"] * 2, counting.writes

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
        # (a failure right after the owner's grant leaves a rotation that may have reached
        # bob: it is finished, then the revocation rotates once more)
        assert manifest.key_version == before.key_version + (2 if n == 1 else 1), where
        assert manifest.sequence > before.sequence, where
        assert {(m.user_id, m.key_version) for m in manifest.members} == {
            (owner.user_id, manifest.key_version), (alice.user_id, manifest.key_version)}, where
        assert not store.exists(layout.grant_key(repo.repo_id, bob.user_id)), where
        with pytest.raises(AccessDenied, match="no access"):
            sup.Client(bob.identity, sup.StoreSession(store, sup.fresh_settings())).open(
                repo.repo_id)
        # alice on a fresh workstation (her grant), the owner with what the call returned
        opened = sup.Client(alice.identity,
                            sup.StoreSession(store, sup.fresh_settings())).open(repo.repo_id)
        for member in (opened, final):
            assert member.keys.version == manifest.key_version, where
            sup.assert_member_reads_and_finds_everything(store, member, features)
        sup.assert_old_ring_reads_nothing(store, repo.repo_id, bob_ring)
        # the whole log verifies from genesis under the manifest without bob (his entry is
        # below the checkpoint at the membership entry), and at most the one new pack and
        # segment a failure left before their entry are unreferenced
        state = seglog.verify_log(store, repo.repo_id, logstate.repository_trust(store, final),
                                  from_genesis=True)
        assert state.head.checkpoint is not None, where
        stored = set(store.list_keys(layout.segments_prefix(repo.repo_id))) | set(
            store.list_keys(layout.packs_prefix(repo.repo_id)))
        live = {compaction.object_key(repo.repo_id, t, i) for t, i in state.live}
        assert live <= stored and len(stored - live) <= 2, (where, stored - live)


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
    stale = sup.importer(alice, alice.open(repo.repo_id))
    assert stale.repo.keys.version == 1
    revoke_access(owner.session, owner.identity, repo, bob.user_id)
    before = sup.snapshot(store)
    new_file = sup.sample_files(6)[5]
    with pytest.raises(RadcryptError) as caught:
        stale.run([new_file])
    message = str(caught.value)
    assert repo.repo_id in message and "key version 2" in message and "key version 1" in message
    assert sup.snapshot(store) == before  # nothing written: no object, pack, segment, entry
    _, versions = sup.segment_ids(store, repo)
    assert versions == {2}
    old_id = image_id_for(stale.repo, hashlib.sha256(new_file.read_bytes()).digest())
    for kind in ("objects", "thumbs", "meta"):  # nothing uploaded under the old version
        assert not store.exists(layout.image_key(kind, repo.repo_id, old_id))
    # reopened, the same client imports under the new version
    report = sup.importer(alice, alice.open(repo.repo_id)).run([new_file])
    assert len(report.imported) == 1
    ids, versions = sup.segment_ids(store, repo)
    assert versions == {2} and len(ids) == 4 and max(ids.values()) == 1


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
                        processes=False, writer=alice.identity,
                        settings=alice.session.settings)
    with pytest.raises(RadcryptError, match=r"key version 2.*key version 1"):
        importer.run(files)
    assert revoked and revoked[0].manifest.key_version == 2
    ids, versions = sup.segment_ids(store, repo)
    assert versions == {2}  # the first batch was committed before, then re-sealed
    assert len(ids) == 2 + 2
    first_batch = {image_id_for(importer.repo, hashlib.sha256(p.read_bytes()).digest())
                   for p in files[:2]}
    assert first_batch <= set(ids)
    assert np.all([max(ids.values()) == 1])
