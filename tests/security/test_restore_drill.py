"""Restore drill (issue 14, "nothing lost when a workstation is"): the owner's workstation
is wiped, and access is still managed, twice over.

One bucket (a directory store outside every workstation), one data directory per user,
each user's own embedded search service, everything through the facade and the real
service as in daily use:

1. The owner creates a repository, imports images, grants Alice, Bob and Carol, makes
   Carol a co-owner, and writes an identity backup under a separate passphrase.
2. The owner's data directory is deleted (identity file, pinned keys, rollback memory).
3. Carol, the co-owner, registers and grants Dave, and revokes Bob (key version 2).
4. The owner's identity is restored from the backup on a new workstation; it opens the
   repository (pinning the same owner key), registers and grants Erin, and revokes Dave
   (key version 3).
After each step members' searches through their own services are complete and find each
image itself: Alice's (one service, open throughout), Dave's (registered and granted by
the co-owner) and Erin's (by the restored owner); the revoked are refused; the log
verifies from genesis.

The drill through the facade and three search services takes 35 to 70 s on a loaded
2-core machine: it runs in `make soak`. `make test` runs the same drill on the core
(the access functions over a real S3 server, moto): members read every image and an
encrypted search over the live segments finds each one, the service's log trust
(configured with the owner's key only) verifies the same log.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

try:
    import e2e_support as support
    import owned_repos
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos

from app.core import client as facade
from app.core.access import add_owner, grant_access, register_user, revoke_access
from app.core.errors import AccessDenied
from app.core.identity import IdentityStore, export_backup, restore_backup
from app.core.logstate import RepositoryTrust
from app.core.repository import read_signed_manifest
from app.core.settings import Settings
from cloud import seglog
from cloud.log_trust import service_trust
from cloud.store import ObjectStore
from crypto.identity import Identity, seal_backup
from crypto.keys import MIN_SCRYPT_LOG2_N

try:
    import access_support as sup
except ImportError:  # pragma: no cover
    from tests.security import access_support as sup

PASSWORD = owned_repos.STRONG_PASSWORD
PASSPHRASE = "ledger under the stairs, copper kite 2031"
NEW_PASSWORD = owned_repos.OTHER_STRONG_PASSWORD
REPO = "drill"


def _settings(tmp_path: Path, name: str) -> Settings:
    """A workstation's settings: its own data directory, the shared bucket directory."""
    settings = Settings(store="directory", data_dir=str(tmp_path / name), workers=1)
    settings.data_path.mkdir(parents=True)
    (tmp_path / "bucket").mkdir(exist_ok=True)
    settings.objects_dir.symlink_to(tmp_path / "bucket", target_is_directory=True)
    return settings


def _workstation(tmp_path: Path, name: str) -> tuple[Settings, Identity]:
    settings = _settings(tmp_path, name)
    store = IdentityStore(settings.data_path, scrypt_log2_n=MIN_SCRYPT_LOG2_N)
    return settings, store.create(name.title(), PASSWORD)


def _complete(member: facade.Client, files: list[Path], version: int) -> None:
    """Every file searched by ``member`` through its service finds itself, completely."""
    repo = member.open_repository(REPO)
    assert repo.keys.version == version
    for result, source in zip(member.search_files(repo, files, k=1), files, strict=True):
        assert result.complete is True, result.completeness
        assert result.hits[0].name == source.name
        assert result.hits[0].distance == 0.0


def _refused(settings: Settings, identity: Identity) -> None:
    with facade.Client(settings, identity) as gone, pytest.raises(AccessDenied):
        gone.open_repository(REPO)


def _log_verifies_from_genesis(client: facade.Client, owner_key: bytes) -> seglog.LogState:
    store = client.session.store
    manifest, _ = read_signed_manifest(store, REPO, owner_key)
    return seglog.verify_log(store, REPO, RepositoryTrust(store, manifest, owner_key),
                             from_genesis=True)


def test_drill_on_the_core(moto_store: ObjectStore, tmp_path: Path) -> None:
    store = moto_store
    owner, alice, bob, repo = sup.owner_and_two_members(store, "drill-core", files=4)
    carol, dave, erin = (sup.Client.make(store, n) for n in ("Carol", "Dave", "Erin"))
    sup.register(owner, carol)
    grant_access(owner.session, owner.identity, repo, carol.user_id)
    add_owner(owner.session, owner.identity, repo, carol.user_id)
    root = owner.identity.sign_public
    features = sup.features_by_id(store, repo)
    backup = tmp_path / "owner.rcib"
    backup.write_bytes(seal_backup(owner.identity, PASSPHRASE, MIN_SCRYPT_LOG2_N))
    shutil.rmtree(owner.settings.data_path)  # wiped; only the backup and the bucket remain
    del owner

    at_carol = carol.open("drill-core")
    register_user(carol.session, carol.identity, dave.identity.card().to_json())
    grant_access(carol.session, carol.identity, at_carol, dave.user_id)
    at_carol = revoke_access(carol.session, carol.identity, carol.open("drill-core"),
                             bob.user_id)
    assert at_carol.keys.version == 2
    with pytest.raises(AccessDenied):
        bob.open("drill-core")
    for member in (alice, dave):
        sup.assert_member_reads_and_finds_everything(store, member.open("drill-core"),
                                                     features)

    restored_dir = tmp_path / "restored"
    identity = restore_backup(IdentityStore(restored_dir, MIN_SCRYPT_LOG2_N), backup,
                              PASSPHRASE, NEW_PASSWORD)
    restored = sup.Client(identity, sup.StoreSession(store, sup.fresh_settings()))
    repo = restored.open("drill-core")
    assert repo.owner_key == root and repo.keys.version == 2
    register_user(restored.session, restored.identity, erin.identity.card().to_json())
    grant_access(restored.session, restored.identity, repo, erin.user_id)
    repo = revoke_access(restored.session, restored.identity, restored.open("drill-core"),
                         dave.user_id)
    assert repo.keys.version == 3
    for gone in (bob, dave):
        with pytest.raises(AccessDenied):
            gone.open("drill-core")
    for member in (alice, erin, carol, restored):
        sup.assert_member_reads_and_finds_everything(store, member.open("drill-core"),
                                                     features)
    state = seglog.verify_log(store, "drill-core", service_trust(store, "drill-core", [root]),
                              from_genesis=True)  # the service's view: the owner key only
    assert state.images(3) == 4 and {o.key_version for o in state.live.values()} == {3}


@pytest.mark.soak
def test_owner_workstation_wiped_co_owner_and_restored_identity_manage_access(
        tmp_path: Path) -> None:
    files = support.copy_images(support.sample_images(4), tmp_path / "images")
    owner_settings, owner_id = _workstation(tmp_path, "owner")
    alice_settings, alice_id = _workstation(tmp_path, "alice")
    bob_settings, bob_id = _workstation(tmp_path, "bob")
    carol_settings, carol_id = _workstation(tmp_path, "carol")
    dave_settings, dave_id = _workstation(tmp_path, "dave")
    erin_settings, erin_id = _workstation(tmp_path, "erin")
    root = owner_id.sign_public
    backup = tmp_path / "safe" / "owner.rcib"

    # 1. the owner's workstation, before it is lost
    with facade.Client(owner_settings, owner_id) as owner:
        repo = owner.create_repository(REPO, storage_format=2)
        assert len(owner.import_files(repo, files, batch_size=2).imported) == 4
        for who in (alice_id, bob_id, carol_id):
            owner.grant(repo, owner.register_user(who.card().to_json()).user_id)
        add_owner(owner.session, owner_id, owner.open_repository(REPO), carol_id.user_id)
    export_backup(IdentityStore(owner_settings.data_path), PASSWORD, PASSPHRASE, backup,
                  log2_n=MIN_SCRYPT_LOG2_N)

    # 2. wiped: the bucket stays, the workstation's data directory is gone
    shutil.rmtree(owner_settings.data_path)
    assert (tmp_path / "bucket").is_dir() and not owner_settings.data_path.exists()

    with facade.Client(alice_settings, alice_id) as alice:  # one service all along
        _complete(alice, files, 1)

        # 3. the co-owner grants and revokes
        with facade.Client(carol_settings, carol_id) as carol:
            at_carol = carol.open_repository(REPO)
            carol.grant(at_carol, carol.register_user(dave_id.card().to_json()).user_id)
            at_carol = carol.revoke(carol.open_repository(REPO), bob_id.user_id)
            assert at_carol.keys.version == 2 and at_carol.owner_key == root
        _refused(bob_settings, bob_id)
        _complete(alice, files, 2)
        with facade.Client(dave_settings, dave_id) as dave:  # his record: Carol's signature
            _complete(dave, files, 2)

        # 4. the owner's identity restored on a new workstation grants and revokes
        restored_settings = _settings(tmp_path, "owner-restored")
        restored_id = restore_backup(IdentityStore(restored_settings.data_path), backup,
                                     PASSPHRASE, NEW_PASSWORD)
        assert restored_id.sign_public == root and restored_id.user_id == owner_id.user_id
        unlocked = facade.unlock_identity(restored_settings, NEW_PASSWORD)
        with facade.Client(restored_settings, unlocked) as owner:
            repo = owner.open_repository(REPO)
            assert repo.owner_key == root and repo.keys.version == 2
            owner.grant(repo, owner.register_user(erin_id.card().to_json()).user_id)
            repo = owner.revoke(owner.open_repository(REPO), dave_id.user_id)
            assert repo.keys.version == 3
            state = _log_verifies_from_genesis(owner, root)
            assert state.images(3) == 4
            assert {o.key_version for o in state.live.values()} == {3}
        _complete(alice, files, 3)
    _refused(dave_settings, dave_id)
    _refused(bob_settings, bob_id)
    with facade.Client(erin_settings, erin_id) as erin:
        _complete(erin, files, 3)
    with facade.Client(carol_settings, carol_id) as carol:
        assert carol.open_repository(REPO).keys.version == 3
