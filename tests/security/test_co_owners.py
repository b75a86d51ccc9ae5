"""Co-owners (issue 14, "nothing lost when a workstation is"; docs/FORMAT-2.md 2.4).

The owner endorses a member as co-owner in the signed manifest; any owner may then sign
the manifest, user records and grants, revoke, and write membership entries and
checkpoints. Each test runs the real access code over a real S3 server (moto), one data
directory per user (pinned owner keys, rollback memory), and checks both what the
co-owner can do and what nobody else can: a member who lists themselves as co-owner with
a forged or copied endorsement is refused by clients and by the service's log trust, and
manifests without co-owners keep exactly their bytes.
"""

from __future__ import annotations

import base64
import json

import pytest

try:
    import access_support as sup
except ImportError:  # pragma: no cover
    from tests.security import access_support as sup

from app.core.access import (
    add_owner,
    create_repository_as,
    grant_access,
    list_access,
    register_user,
    revoke_access,
)
from app.core.errors import AccessDenied, RadcryptError
from app.core.logstate import RepositoryTrust
from app.core.repository import Manifest, Repository, read_signed_manifest
from cloud import layout, seglog
from cloud.log_trust import LogTrustError, service_trust
from cloud.store import ObjectStore
from crypto.identity import endorse_co_owner
from crypto.signed import sign_json


def _payload(store: ObjectStore, repo_id: str) -> dict[str, object]:
    doc = json.loads(store.get(layout.manifest_key(repo_id)))
    return dict(doc["payload"])


def _with_co_owner(store: ObjectStore, name: str, files: int = 0
                   ) -> tuple[sup.Client, sup.Client, sup.Client, sup.Client, Repository]:
    """Owner, Alice, Bob (members) and Carol, granted then made co-owner by the owner."""
    owner, alice, bob, repo = sup.owner_and_two_members(store, name, files=files)
    carol = sup.Client.make(store, "Carol")
    sup.register(owner, carol)
    grant_access(owner.session, owner.identity, repo, carol.user_id)
    add_owner(owner.session, owner.identity, repo, carol.user_id)
    return owner, alice, bob, carol, carol.open(repo.repo_id)


def test_manifests_without_co_owners_keep_their_bytes(moto_store: ObjectStore) -> None:
    owner, _, _, repo = sup.owner_and_two_members(moto_store, "plain-owners")
    payload = _payload(moto_store, repo.repo_id)
    assert "co_owners" not in payload and "owner_key" not in payload
    manifest = sup.manifest_of(moto_store, repo)
    assert json.loads(manifest.to_json()) == payload  # the same fields, nothing added
    assert manifest.owner_keys(owner.identity.sign_public) == {
        owner.user_id: owner.identity.sign_public}


def test_co_owner_registers_grants_and_revokes(moto_store: ObjectStore) -> None:
    store = moto_store
    owner, alice, bob, carol, at_carol = _with_co_owner(store, "co-owned", files=3)
    root = owner.identity.sign_public
    payload = _payload(store, at_carol.repo_id)
    assert payload["owner_key"] == base64.b64encode(root).decode()
    assert [c["user_id"] for c in payload["co_owners"]] == [carol.user_id]  # type: ignore[union-attr]
    assert at_carol.owner_key == root  # carol pinned the owner's key, not her own
    features = sup.features_by_id(store, at_carol)
    # Carol registers and grants Dave (his record is signed by Carol, not the owner).
    dave = sup.Client.make(store, "Dave")
    register_user(carol.session, carol.identity, dave.identity.card().to_json())
    grant_access(carol.session, carol.identity, at_carol, dave.user_id)
    assert json.loads(store.get(layout.manifest_key(at_carol.repo_id)))["signer"] == \
        base64.b64encode(carol.identity.sign_public).decode()
    at_dave = dave.open(at_carol.repo_id)  # a new workstation: pins the owner's key
    assert at_dave.owner_key == root
    sup.assert_member_reads_and_finds_everything(store, at_dave, features)
    # Carol revokes Bob: membership entries and checkpoints signed by her.
    old_ring = bob.open(at_carol.repo_id).ring
    at_carol = revoke_access(carol.session, carol.identity, at_carol, bob.user_id)
    assert at_carol.manifest.key_version == 2
    with pytest.raises(AccessDenied, match="not a member"):
        bob.open(at_carol.repo_id)
    sup.assert_old_ring_reads_nothing(store, at_carol.repo_id, old_ring)
    for member in (alice, dave, owner):
        opened = member.open(at_carol.repo_id)
        assert opened.keys.version == 2
        sup.assert_member_reads_and_finds_everything(store, opened, features)
    assert {e.user_id for e in list_access(owner.session, at_carol.repo_id)} == {
        owner.user_id, alice.user_id, carol.user_id, dave.user_id}
    # The whole log, replayed from genesis: Carol's membership entries pass the owner rule.
    manifest, _ = read_signed_manifest(store, at_carol.repo_id, root)
    trust = RepositoryTrust(store, manifest, root)
    state = seglog.verify_log(store, at_carol.repo_id, trust, from_genesis=True)
    writers = [seglog.decode_payload(
        seglog.open_signed(store.get(layout.log_entry_key(at_carol.repo_id, n)), "log",
                           layout.log_entry_key(at_carol.repo_id, n))[1],
        layout.log_entry_key(at_carol.repo_id, n), n)
        for n in range(state.head.sequence + 1)]
    assert any(e.kind == seglog.KIND_MEMBERSHIP and e.writer == carol.user_id
               for e in writers)
    # The service, configured with the owner's key only, believes the same log.
    served = service_trust(store, at_carol.repo_id, [root])
    assert served is not None and served.is_owner(carol.user_id)
    assert seglog.verify_log(store, at_carol.repo_id, served, from_genesis=True).head == \
        state.head
    with pytest.raises(LogTrustError, match="not one of the service's owner keys"):
        service_trust(store, at_carol.repo_id, [carol.identity.sign_public])


def _forge(store: ObjectStore, signer: sup.Client, repo: Repository,
           entry: dict[str, str]) -> None:
    """``signer`` writes a manifest (sequence + 1) listing ``entry`` as a co-owner."""
    name = layout.manifest_key(repo.repo_id)
    payload = _payload(store, repo.repo_id)
    payload["sequence"] = int(payload["sequence"]) + 1  # type: ignore[call-overload]
    payload["owner_key"] = base64.b64encode(repo.owner_key or b"").decode()
    payload["co_owners"] = sorted([*payload.get("co_owners", []), entry],  # type: ignore[list-item]
                                  key=lambda c: c["user_id"])
    store.put(name, sign_json(signer.identity, "manifest", name, payload))


def test_a_member_cannot_make_themselves_co_owner(moto_store: ObjectStore) -> None:
    store = moto_store
    owner, alice, bob, _, repo = _with_co_owner(store, "forged-owners")
    other = sup.Client.make(store, "Other")
    elsewhere = create_repository_as(owner.session, owner.identity, "elsewhere")
    sup.register(owner, alice)
    grant_access(owner.session, owner.identity, elsewhere, alice.user_id)
    add_owner(owner.session, owner.identity, elsewhere, alice.user_id)
    copied = next(c for c in _payload(store, "elsewhere")["co_owners"]  # type: ignore[attr-defined]
                  if c["user_id"] == alice.user_id)
    alice_key = base64.b64encode(alice.identity.sign_public).decode()
    self_made = base64.b64encode(endorse_co_owner(
        alice.identity, repo.repo_id, alice.user_id, alice.identity.sign_public)).decode()
    carols = next(c for c in _payload(store, repo.repo_id)["co_owners"])  # type: ignore[attr-defined]
    cases = {
        "self-endorsed": {"user_id": alice.user_id, "ed25519": alice_key,
                          "endorsement": self_made},
        "copied from another repository": copied,
        "carol's endorsement, alice's name": {**carols, "user_id": alice.user_id},
    }
    original = store.get(layout.manifest_key(repo.repo_id))
    for case, entry in cases.items():
        _forge(store, alice, repo, entry)
        for reader in (bob, other):
            with pytest.raises(AccessDenied):
                reader.open(repo.repo_id)
        with pytest.raises(LogTrustError):
            service_trust(store, repo.repo_id, [owner.identity.sign_public])
        store.put(layout.manifest_key(repo.repo_id), original)
        assert bob.open(repo.repo_id).manifest.is_member(bob.user_id), case
    # A co-owner's real endorsement does not let Alice sign in Carol's place either.
    _forge(store, alice, repo, {**carols, "user_id": "zz-" + alice.user_id[:20]})
    with pytest.raises(AccessDenied):
        bob.open(repo.repo_id)


def test_only_the_owner_adds_co_owners_and_they_cannot_be_revoked(
        moto_store: ObjectStore) -> None:
    store = moto_store
    owner, alice, bob, carol, repo = _with_co_owner(store, "owner-rules")
    with pytest.raises(AccessDenied, match="only the owner"):
        add_owner(carol.session, carol.identity, repo, alice.user_id)
    with pytest.raises(AccessDenied, match="only the owner"):
        add_owner(alice.session, alice.identity, repo, bob.user_id)
    stranger = sup.Client.make(store, "Stranger")
    sup.register(owner, stranger)
    with pytest.raises(RadcryptError, match="grant access first"):
        add_owner(owner.session, owner.identity, repo, stranger.user_id)
    before = sup.manifest_of(store, repo).sequence
    again = add_owner(owner.session, owner.identity, repo, carol.user_id)
    assert again.sequence == before  # already a co-owner: nothing written
    with pytest.raises(RadcryptError, match="co-owner"):
        revoke_access(owner.session, owner.identity, repo, carol.user_id)
    with pytest.raises(AccessDenied, match="owner or a co-owner"):
        grant_access(alice.session, alice.identity, alice.open(repo.repo_id),
                     stranger.user_id)


def test_plain_member_still_cannot_write_owner_entries(moto_store: ObjectStore) -> None:
    """The log's owner rule knows co-owners, and only them: a member's membership entry
    is refused, a co-owner's accepted."""
    store = moto_store
    owner, alice, _, carol, repo = _with_co_owner(store, "owner-entries")
    manifest: Manifest = sup.manifest_of(store, repo)
    trust = RepositoryTrust(store, manifest, owner.identity.sign_public)
    state = sup.log_of(store, repo)
    with pytest.raises(seglog.LogError, match="owner"):
        seglog.append(store, repo.repo_id, alice.identity, alice.user_id, trust, state,
                      kind=seglog.KIND_MEMBERSHIP, reason=seglog.REASON_REVOCATION,
                      key_version=1, added=[], removed=[])
    state = seglog.append(store, repo.repo_id, carol.identity, carol.user_id, trust, state,
                          kind=seglog.KIND_MEMBERSHIP, reason=seglog.REASON_REVOCATION,
                          key_version=1, added=[], removed=[])
    seglog.write_checkpoint(store, repo.repo_id, carol.identity, state, manifest.sequence)
    fresh = sup.log_of(store, repo)
    assert fresh.head.sequence == state.head.sequence
    assert fresh.head.checkpoint == state.head.sequence  # Carol's checkpoint is used


def test_co_owner_finishes_a_revocation_the_lost_owner_started(
        moto_store: ObjectStore) -> None:
    """The owner removed Bob from the manifest (FORMAT-2 7.3 steps 1 and 2), its new key
    version waiting in its own grant, and then its workstation was lost. Carol cannot
    open that grant: her revocation of Bob rotates once more, so Bob's keys open nothing
    left in the bucket."""
    from app.core import access
    from app.core.repository import with_members

    store = moto_store
    owner, alice, bob, carol, repo = _with_co_owner(store, "lost-mid-revocation", files=3)
    features = sup.features_by_id(store, repo)
    bob_ring = bob.open(repo.repo_id).ring
    at_owner = owner.open(repo.repo_id)
    manifest, root = read_signed_manifest(store, repo.repo_id, owner.identity.sign_public)
    state = sup.log_of(store, at_owner)
    access._start_rotation(owner.session, owner.identity, root, manifest, at_owner.ring,
                           state)
    access._publish(owner.session, owner.identity, with_members(
        manifest, [m for m in manifest.members if m.user_id != bob.user_id]))
    del owner  # lost here

    at_carol = revoke_access(carol.session, carol.identity, carol.open(repo.repo_id),
                             bob.user_id)
    assert at_carol.keys.version == 2
    assert not store.exists(layout.grant_key(repo.repo_id, bob.user_id))
    sup.assert_old_ring_reads_nothing(store, repo.repo_id, bob_ring)
    for member in (alice, carol):
        sup.assert_member_reads_and_finds_everything(store, member.open(repo.repo_id),
                                                     features)
