"""Revocation of a format-2 repository (docs/FORMAT-2.md 7.3, issue 13): what the
segment log adds to tests/security/test_revocation.py.

* A format-1 repository is read-only: its revocation is refused before any write.
* The revoked user's log entries written after the revocation are refused by every
  member's verification, and the owner never covers one with a checkpoint, also when the
  revocation was interrupted right after its ``membership`` entry.
* A member searches complete answers before (old key version), during (the old version's
  live segments are untouched while the new ones are added) and after (the new version).
* An import committed under the old key version while the revocation runs (a client that
  had not seen the rotation) is re-sealed under the new version before the old objects
  are removed; nothing is lost.
"""

from __future__ import annotations

from pathlib import Path

import pytest

try:
    import access_support as sup
except ImportError:  # pragma: no cover
    from tests.security import access_support as sup

from app.core import access, logstate
from app.core.access import revoke_access
from app.core.errors import IntegrityError, RadcryptError
from app.core.packs import ImageReader
from app.core.progress import ProgressEvent
from app.core.repository import Repository
from app.core.settings import Settings
from cloud import layout, seglog
from cloud.store import ObjectStore
from crypto.identity import Identity, PublicCard


def _bob_appends(store: ObjectStore, owner: sup.Client, bob: sup.Client, repo: Repository
                 ) -> int:
    """Bob, no longer a member, signs an import entry at the head of the log as if he still
    were one (he can read the bucket and the manifest): returns its sequence."""
    manifest = sup.manifest_of(store, repo)
    as_member = seglog.StaticTrust(owner.user_id, owner.identity.sign_public,
                                   manifest.sequence, manifest.key_version,
                                   {bob.user_id: bob.identity.sign_public})
    state = seglog.verify_log(store, repo.repo_id, as_member)
    added = [seglog.Added(kind, layout.new_id(), bytes(32), 1)
             for kind in (seglog.TYPE_SEGMENT, seglog.TYPE_PACK)]
    state = seglog.append(store, repo.repo_id, bob.identity, bob.user_id, as_member, state,
                          kind=seglog.KIND_ADD, reason=seglog.REASON_IMPORT,
                          key_version=manifest.key_version, added=added)
    return state.head.sequence


def test_format1_repository_is_read_only_for_revocation(moto_store: ObjectStore) -> None:
    store = moto_store
    owner, _, bob, repo = sup.owner_and_two_members(store, "format-one", storage_format=1)
    before = sup.snapshot(store)
    with pytest.raises(RadcryptError) as caught:
        revoke_access(owner.session, owner.identity, repo, bob.user_id)
    assert str(caught.value) == (
        "repository format-one is in storage format 1 (read-only); run radcrypt repo "
        "migrate --format 2 first")
    assert sup.snapshot(store) == before  # nothing written
    assert bob.open(repo.repo_id).manifest.is_member(bob.user_id)


def test_revoked_users_later_log_entries_are_refused(moto_store: ObjectStore) -> None:
    store = moto_store
    owner, alice, bob, repo = sup.owner_and_two_members(store, "late-entry", files=2)
    sup.importer(bob, bob.open(repo.repo_id)).run(sup.sample_files(3)[2:])
    final = revoke_access(owner.session, owner.identity, repo, bob.user_id)
    features = sup.features_by_id(store, final)
    assert len(features) == 3  # bob's import, committed while he was a member, is kept
    state = sup.log_of(store, final)  # the two old packs became one new pack and segment
    assert [o.count for o in state.packs()] == [o.count for o in state.segments()] == [3]
    sup.assert_member_reads_and_finds_everything(store, alice.open(repo.repo_id), features)
    sequence = _bob_appends(store, owner, bob, final)
    with pytest.raises(IntegrityError, match=rf"log entry {sequence}: writer {bob.user_id} "
                       r"is neither the owner nor a current member"):
        sup.log_of(store, alice.open(repo.repo_id))
    # the owner running the revocation again does not cover the entry with a checkpoint
    with pytest.raises(IntegrityError, match="neither the owner nor a current member"):
        revoke_access(owner.session, owner.identity, repo, bob.user_id)
    assert not store.exists(layout.checkpoint_key(repo.repo_id, sequence))


def test_revoked_users_entry_after_an_interrupted_membership_entry_is_refused(
        moto_store: ObjectStore) -> None:
    """The failure leaves the membership entry without its checkpoint: the log verifies
    only with bob still trusted, which the owner's re-run allows for his entries from
    before his removal (test_revocation.py) but not for one he wrote after it."""
    store = moto_store
    owner, _, bob, repo = sup.owner_and_two_members(store, "window", files=2)
    sup.importer(bob, bob.open(repo.repo_id)).run(sup.sample_files(3)[2:])
    faulty = sup.FaultyStore(store, fail_after=3)  # owner's grant, manifest, membership
    with pytest.raises(sup.InjectedFailure):
        revoke_access(sup.StoreSession(faulty, owner.session.settings), owner.identity, repo,
                      bob.user_id)
    assert faulty.writes[-1].startswith(layout.log_prefix(repo.repo_id))
    sequence = _bob_appends(store, owner, bob, repo)
    manifest = sup.manifest_of(store, repo)
    with pytest.raises(IntegrityError, match=rf"entry {sequence} by {bob.user_id}, written "
                       "after their removal"):
        revoke_access(owner.session, owner.identity, repo, bob.user_id)
    assert sup.manifest_of(store, repo) == manifest  # nothing published on top of it
    assert list(store.list_keys(layout.checkpoints_prefix(repo.repo_id))) == []


def test_checkpoint_lands_on_the_membership_entry_when_entries_followed_it(
        moto_store: ObjectStore) -> None:
    """Interrupted after its membership entry, the revocation is resumed after Alice (a
    member) appended an import: the checkpoint is written at the membership entry (its
    live set, not the head's), and the import is re-sealed like every other image."""
    store = moto_store
    owner, alice, bob, repo = sup.owner_and_two_members(store, "cp-below-head", files=2)
    faulty = sup.FaultyStore(store, fail_after=3)  # owner's grant, manifest, membership
    with pytest.raises(sup.InjectedFailure):
        revoke_access(sup.StoreSession(faulty, owner.session.settings), owner.identity, repo,
                      bob.user_id)
    membership = sup.log_of(store, repo).head.sequence
    sup.importer(alice, alice.open(repo.repo_id)).run(sup.sample_files(3)[2:])
    final = revoke_access(owner.session, owner.identity, repo, bob.user_id)
    checkpoints = sorted(layout.parse_checkpoint_key(k)[1]
                         for k in store.list_keys(layout.checkpoints_prefix(repo.repo_id)))
    assert checkpoints[0] == membership and len(checkpoints) == 2
    state = seglog.verify_log(store, repo.repo_id, logstate.repository_trust(store, final),
                              from_genesis=True)  # each checkpoint matches the log replayed
    assert state.head.checkpoint == checkpoints[1]
    at_two = alice.open(repo.repo_id)
    features = sup.features_by_id(store, at_two)
    assert len(features) == 3
    sup.assert_member_reads_and_finds_everything(store, at_two, features)


def test_member_searches_complete_answers_before_during_and_after(
        moto_store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(access, "RESEAL_IMAGES", 3)  # two new packs: checked between them
    store = moto_store
    owner, alice, bob, repo = sup.owner_and_two_members(store, "complete", files=5, batch=3)
    at_one = alice.open(repo.repo_id)
    features = sup.features_by_id(store, at_one)
    old_segments = {o.id for o in sup.log_of(store, at_one).segments(1)}
    assert len(old_segments) == 2

    def complete_at_version_one() -> None:
        state = logstate.verified_log(store, alice.session.settings, at_one)
        # what a service loading the live version-1 segments answers with is complete
        verdict = seglog.judge_answer(state, 1, state.head.sequence, state.head.hash,
                                      state.set_digest(1), len(old_segments), None)
        assert verdict is not None and verdict.complete
        assert {o.id for o in state.segments(1)} == old_segments
        sup.search_finds_each_image(store, at_one, features, 1)
        reader = ImageReader(store, at_one, state)  # what shows her results: version 1
        assert reader.image_ids() == set(features)
        for image_id in features:
            assert reader.meta(image_id)[1] == 1

    complete_at_version_one()
    during: list[int] = []

    def progress(event: ProgressEvent) -> None:
        assert event.stage == "revoke"
        complete_at_version_one()  # alice still holds version 1 only
        during.append(len(sup.log_of(store, at_one).segments(2)))

    final = revoke_access(owner.session, owner.identity, repo, bob.user_id, progress)
    # one event per image re-sealed, after its new pack and segment were committed: five
    # images, in two new segments, checked after each
    assert len(during) == 5 and during == sorted(during) and set(during) == {1, 2}
    at_two = alice.open(repo.repo_id)
    assert at_two.keys.version == final.keys.version == 2
    state = sup.log_of(store, at_two)
    assert state.segments(1) == [] and len(state.segments(2)) == 2
    verdict = seglog.judge_answer(state, 2, state.head.sequence, state.head.hash,
                                  state.set_digest(2), 2, None)
    assert verdict is not None and verdict.complete
    sup.assert_member_reads_and_finds_everything(store, at_two, features)
    # a finished revocation run again writes nothing
    counting = sup.FaultyStore(store)
    revoke_access(sup.StoreSession(counting, owner.session.settings), owner.identity, repo,
                  bob.user_id)
    assert counting.writes == []


def test_import_committed_under_the_old_version_during_the_revocation_is_kept(
        moto_store: ObjectStore) -> None:
    store = moto_store
    owner, alice, bob, repo = sup.owner_and_two_members(store, "catch-up", files=2)
    stale = sup.importer(alice, alice.open(repo.repo_id))  # opened at key version 1
    late = sup.sample_files(3)[2]
    added: dict[str, object] = {}

    def progress(event: ProgressEvent) -> None:
        if event.done == event.total and not added:  # the last old pack re-sealed
            report = stale.run([late])
            (_, image_id), = report.imported
            added[image_id] = sup.features_by_id(store, stale.repo)[image_id]

    revoke_access(owner.session, owner.identity, repo, bob.user_id, progress)
    assert len(added) == 1
    at_two = alice.open(repo.repo_id)
    features = sup.features_by_id(store, at_two)
    assert len(features) == 3 and set(added) <= set(features)
    for image_id, vector in added.items():
        assert (features[image_id] == vector).all()
    sup.assert_member_reads_and_finds_everything(store, at_two, features)
    assert sup.stored_versions(store, repo.repo_id) == {2}


def test_member_searching_through_the_service_gets_complete_answers_throughout(
        tmp_path: Path) -> None:
    """The same through the facade and the real search service: Alice, a member on her
    own workstation (same bucket), searches while the owner revokes Bob."""
    from app.core import client as facade

    try:
        import e2e_support as support
        import owned_repos
    except ImportError:  # pragma: no cover
        from tests import e2e_support as support
        from tests import owned_repos

    password = owned_repos.STRONG_PASSWORD

    def workstation(name: str) -> tuple[Settings, Identity]:
        settings = Settings(store="directory", data_dir=str(tmp_path / name), workers=1)
        if name != "owner":  # one bucket: every workstation's objects are the owner's
            settings.data_path.mkdir(parents=True)
            settings.objects_dir.symlink_to(tmp_path / "owner" / "objects",
                                             target_is_directory=True)
        return settings, facade.create_identity(settings, name.title(), password)

    owner_settings, owner_id = workstation("owner")
    alice_settings, alice_id = workstation("alice")
    files = support.copy_images(support.sample_images(4), tmp_path / "images")
    with facade.Client(owner_settings, owner_id) as owner:
        repo = owner.create_repository("served", storage_format=2)
        assert len(owner.import_files(repo, files, batch_size=2).imported) == 4
        bob_card = Identity.generate("Bob").card().to_json()
        for card in (alice_id.card().to_json(), bob_card):
            owner.grant(repo, owner.register_user(card).user_id)
        bob_id = PublicCard.from_json(bob_card).user_id
        with facade.Client(alice_settings, alice_id) as alice:
            at_one = alice.open_repository("served")

            def complete(opened: Repository, version: int) -> None:
                results = alice.search_files(opened, files[::3], k=1)
                for result, source in zip(results, files[::3], strict=True):
                    assert result.complete is True, result.completeness
                    assert result.hits[0].name == source.name
                    assert result.hits[0].distance == 0.0
                assert opened.keys.version == version

            complete(at_one, 1)
            during: list[int] = []

            def progress(event: ProgressEvent) -> None:
                complete(at_one, 1)  # the version-1 segments are all still live
                during.append(event.done)

            repo = owner.revoke(repo, bob_id, progress=progress)
            assert during and repo.keys.version == 2
            complete(alice.open_repository("served"), 2)
