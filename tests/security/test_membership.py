"""Membership lives in the owner-signed manifest (issue 11, items 2 and 5), client side.

Before: who had access was whatever object names lay under grants/, so anyone able to write
there could restore a revoked user's old grant (it opened the repository again and was
re-wrapped to the next key version), junk stopped a revocation half-way, an older manifest
was accepted, and image ids were keyed by the first key version forever. Each test below
performs one of these attacks against the real code and asserts the refusal. (The service's
side, 403 for a non-member, is tests/security/test_service_auth.py.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import stat

import pytest

try:
    import access_support as sup
except ImportError:  # pragma: no cover
    from tests.security import access_support as sup

from app.core import access
from app.core.access import (
    grant_access,
    list_access,
    migrate_password_repository,
    revoke_access,
)
from app.core.errors import AccessDenied, RadcryptError
from app.core.importer import image_id_for
from app.core.repository import Member, Repository, check_still_current, with_members
from cloud import layout
from cloud.store import ObjectStore
from crypto.signed import sign_json


def _three(store: ObjectStore, name: str) -> tuple[sup.Client, sup.Client, sup.Client,
                                                   Repository]:
    """A format-2 repository (sup.owner_and_two_members) of its owner, Alice and Bob."""
    return sup.owner_and_two_members(store, name)


def test_manifest_lists_owner_and_members_with_a_growing_sequence(
        moto_store: ObjectStore) -> None:
    owner, alice, bob, repo = _three(moto_store, "members")
    assert repo.manifest.sequence == 1 and repo.manifest.owner == owner.user_id
    manifest = sup.manifest_of(moto_store, repo)
    assert manifest.sequence == 3  # created, alice granted, bob granted
    assert [(m.user_id, m.key_version) for m in manifest.members] == sorted(
        (u.user_id, 1) for u in (owner, alice, bob))
    payload = json.loads(moto_store.get(layout.manifest_key(repo.repo_id)))["payload"]
    assert payload["members"] == sorted(payload["members"], key=lambda m: m["user_id"])
    assert payload["owner"] == owner.user_id and payload["sequence"] == 3
    assert {e.user_id for e in list_access(owner.session, repo.repo_id)} == {
        owner.user_id, alice.user_id, bob.user_id}


def test_restored_grant_of_a_revoked_user_opens_nothing_and_is_not_rewrapped(
        moto_store: ObjectStore) -> None:
    store = moto_store
    owner, alice, bob, repo = _three(store, "restored-grant")
    bob_grant = layout.grant_key(repo.repo_id, bob.user_id)
    old_grant = store.get(bob_grant)
    repo = revoke_access(owner.session, owner.identity, repo, bob.user_id)
    assert not store.exists(bob_grant)
    store.put(bob_grant, old_grant)  # whoever can write to the bucket puts it back
    with pytest.raises(AccessDenied, match="not a member"):
        bob.open(repo.repo_id)
    entries = list_access(owner.session, repo.repo_id)
    assert bob.user_id not in {e.user_id for e in entries}
    assert bob.user_id in entries.ignored
    # The next revocation wraps the new keys to members only: bob's restored object stays
    # exactly what it was (a re-wrap would write new bytes), and opens nothing.
    repo = revoke_access(owner.session, owner.identity, repo, alice.user_id)
    assert repo.manifest.key_version == 3
    assert store.get(bob_grant) == old_grant
    with pytest.raises(AccessDenied, match="not a member"):
        bob.open(repo.repo_id)
    assert [m.user_id for m in repo.manifest.members] == [owner.user_id]


def test_non_member_with_a_valid_owner_signed_grant_is_refused(
        moto_store: ObjectStore) -> None:
    """A genuine grant (owner-signed, the current keys, wrapped to carol) whose user is not
    in the manifest: what a grant left by an interrupted grant_access or restored from a
    backup looks like. The grant itself opens with carol's keys: the membership refuses."""
    store = moto_store
    owner, _, _, repo = _three(store, "valid-grant")
    carol = sup.Client.make(store, "Carol")
    sup.register(owner, carol)
    card = access._user_card(store, carol.user_id, [owner.identity.sign_public])
    access._write_grant(store, owner.identity, repo.ring, card)
    ring = access._open_grant(store, carol.identity, repo.repo_id, owner.identity.sign_public)
    assert ring.current.version == repo.manifest.key_version  # a valid-looking grant ...
    with pytest.raises(AccessDenied, match="not a member at its current key version 1"):
        carol.open(repo.repo_id)  # ... refused all the same
    grant_access(owner.session, owner.identity, repo, carol.user_id)
    assert carol.open(repo.repo_id).manifest.is_member(carol.user_id)


def test_member_listed_at_an_older_key_version_is_refused(moto_store: ObjectStore) -> None:
    store = moto_store
    owner, alice, bob, repo = _three(store, "old-version-member")
    repo = revoke_access(owner.session, owner.identity, repo, bob.user_id)
    manifest = sup.manifest_of(store, repo)
    members = [m if m.user_id != alice.user_id else Member(alice.user_id, 1)
               for m in manifest.members]
    access._publish(owner.session, owner.identity, with_members(manifest, members))
    with pytest.raises(AccessDenied, match="not a member at its current key version 2"):
        alice.open(repo.repo_id)  # her grant holds version 2, the manifest lists her at 1


def test_garbage_under_grants_is_ignored_with_a_warning(
        moto_store: ObjectStore, caplog: pytest.LogCaptureFixture) -> None:
    store = moto_store
    owner, alice, bob, repo = _three(store, "garbage")
    prefix = layout.grants_prefix(repo.repo_id)
    store.put(prefix + "mallory-abcdef", b"\x00\x01\x02 garbage \xff" * 10)
    store.put(prefix + "..%2F..", b"")
    store.put(layout.grant_key(repo.repo_id, alice.user_id), b"RCSR\x01" + b"\xee" * 150)
    caplog.set_level(logging.WARNING, logger="app.core.access")
    entries = list_access(owner.session, repo.repo_id)
    assert [e.user_id for e in entries] == sorted([owner.user_id, alice.user_id, bob.user_id])
    assert sorted(entries.ignored) == sorted(["mallory-abcdef", "..%2F..", alice.user_id])
    status = {e.user_id: e.status for e in entries}
    assert status[owner.user_id] == status[bob.user_id] == "ok"
    assert "not signed by the owner" in status[alice.user_id]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("mallory-abcdef" in w for w in warned) and any(alice.user_id in w for w in warned)
    with pytest.raises(AccessDenied, match="does not open"):
        alice.open(repo.repo_id)
    # A revocation completes over the junk, and re-wraps to the member whose grant was junk.
    repo = revoke_access(owner.session, owner.identity, repo, bob.user_id)
    assert repo.manifest.key_version == 2
    assert alice.open(repo.repo_id).keys.version == 2
    assert store.get(prefix + "mallory-abcdef").startswith(b"\x00\x01\x02")


def test_manifest_rollback_is_refused(moto_store: ObjectStore) -> None:
    store = moto_store
    owner, alice, bob, repo = _three(store, "rollback")
    name = layout.manifest_key(repo.repo_id)
    alice.open(repo.repo_id)  # alice's workstation has seen sequence 3
    old = store.get(name)
    repo = revoke_access(owner.session, owner.identity, repo, bob.user_id)
    opened = alice.open(repo.repo_id)  # and now sequence 5, at key version 2
    remembered = access.seen_sequences(alice.session.settings)
    assert remembered == {repo.repo_id: 5}
    path = alice.session.settings.data_path / access.SEQUENCES_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store.put(name, old)  # the cloud serves the manifest from before the revocation
    with pytest.raises(AccessDenied, match="older than sequence 5"):
        alice.open(repo.repo_id)
    with pytest.raises(RadcryptError, match="went back to sequence 3"):
        check_still_current(store, opened)  # what the importer checks before each batch
    # An owner-signed legacy manifest (no sequence) is older than anything seen, too.
    legacy = json.loads(old)["payload"]
    for field in ("sequence", "members", "owner"):
        del legacy[field]
    store.put(name, sign_json(owner.identity, "manifest", name, legacy))
    with pytest.raises(AccessDenied, match="sequence 0, older than sequence 5"):
        alice.open(repo.repo_id)


def test_image_ids_belong_to_the_key_version(moto_store: ObjectStore) -> None:
    store = moto_store
    owner, _, bob, repo = _three(store, "image-ids")
    first, later = sup.sample_files(5)[0], sup.sample_files(5)[4]
    sup.importer(owner, repo).run([first])
    bob_repo = bob.open(repo.repo_id)
    repo = revoke_access(owner.session, owner.identity, repo, bob.user_id)
    report = sup.importer(owner, repo).run([later])
    (_, new_id), = report.imported
    ids, versions = sup.segment_ids(store, repo)
    assert new_id in ids and versions == {2}
    digest = hashlib.sha256(later.read_bytes()).digest()
    assert image_id_for(repo, digest) == new_id  # stable within the version (resume)
    # bob kept every key he ever had: none of them computes the id of the later import
    guesses = {image_id_for(Repository(bob_repo.manifest, type(bob_repo.ring)(
        bob_repo.ring.repo_id, bob_repo.ring.versions[: i + 1])), digest)
        for i in range(len(bob_repo.ring.versions))}
    assert new_id not in guesses
    # the same file has another id under each key version
    digest_first = hashlib.sha256(first.read_bytes()).digest()
    assert image_id_for(bob_repo, digest_first) != image_id_for(repo, digest_first)


def test_legacy_signed_manifest_is_upgraded_by_its_owner_without_a_password(
        moto_store: ObjectStore) -> None:
    """Manifests without members predate storage format 2: this one is format 1."""
    store = moto_store
    owner, alice, _, repo = sup.owner_and_two_members(store, "legacy-signed",
                                                      storage_format=1)
    name = layout.manifest_key(repo.repo_id)
    legacy = json.loads(store.get(name))["payload"]
    for field in ("sequence", "members", "owner"):
        del legacy[field]
    store.put(name, sign_json(owner.identity, "manifest", name, legacy))  # as before issue 11
    fresh = sup.Client(alice.identity, sup.StoreSession(store, sup.fresh_settings()))
    with pytest.raises(AccessDenied, match="no membership list"):
        fresh.open(repo.repo_id)
    with pytest.raises(AccessDenied, match="only the owner"):
        migrate_password_repository(fresh.session, alice.identity, repo.repo_id)
    owner_here = sup.Client(owner.identity, sup.StoreSession(store, sup.fresh_settings()))
    upgraded = migrate_password_repository(owner_here.session, owner.identity, repo.repo_id)
    assert upgraded.manifest.sequence == 1
    assert [m.user_id for m in upgraded.manifest.members] == [owner.user_id]
    with pytest.raises(AccessDenied, match="not a member"):
        fresh.open(repo.repo_id)  # not carried over: the names under grants/ prove nothing
    grant_access(owner_here.session, owner.identity, upgraded, alice.user_id)
    assert fresh.open(repo.repo_id).manifest.sequence == 2
