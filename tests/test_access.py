"""Users and access end to end: identities, grants, revocation, signed requests, audit."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.core import objects
from app.core.access import (
    create_repository_as,
    grant_access,
    list_access,
    open_repository_as,
    register_user,
    revoke_access,
    session_for,
)
from app.core.errors import AccessDenied, IntegrityError, RadcryptError, ServiceError
from app.core.identity import IdentityStore, password_strength
from app.core.importer import Importer
from app.core.repository import Repository
from app.core.searcher import search_files
from app.core.session import Session
from app.core.settings import Settings
from cloud import layout
from cloud.audit import read_audit
from crypto import pack
from crypto.errors import DecryptionError
from crypto.identity import Identity
from crypto.keys import KeyRing
from resources.samples import decodable_dicom_files

FAST_SCRYPT = 10  # identity files in tests; the product writes 2^17


@dataclass
class World:
    settings: Settings
    owner: Identity
    alice: Identity
    bob: Identity
    session: Session
    repo: Repository
    files: list[Path]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, seaweed_store_config) -> Iterator[World]:
    root = tmp_path_factory.mktemp("access")
    cfg = seaweed_store_config
    settings = Settings(store="s3", endpoint_url=cfg.endpoint_url, bucket=cfg.bucket,
                        data_dir=str(root / "owner-data"))
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", cfg.access_key or "")
    mp.setenv("AWS_SECRET_ACCESS_KEY", cfg.secret_key or "")
    owner = IdentityStore(root / "o", FAST_SCRYPT).create("Dr Owner", "velvet canyon 31 harp")
    alice = IdentityStore(root / "a", FAST_SCRYPT).create("Alice", "alice: copper tundra 58 fig")
    bob = IdentityStore(root / "b", FAST_SCRYPT).create("Bob", "bob: willow quartz 74 drum")
    files = decodable_dicom_files()[:12]
    with session_for(settings, owner) as session:
        repo = create_repository_as(session, owner, "access-" + owner.user_id[-6:],
                                    storage_format=2)
        Importer(session.store, repo, writer=owner, settings=settings).run(files)
        register_user(session, owner, alice.card().to_json())
        register_user(session, owner, bob.card().to_json())
        grant_access(session, owner, repo, alice.user_id)
        yield World(settings, owner, alice, bob, session, repo, files)
    mp.undo()


@pytest.fixture(autouse=True)
def seaweed_credentials(monkeypatch: pytest.MonkeyPatch, seaweed_store_config) -> None:
    """Sessions for S3 take credentials from boto3's usual chain: the environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed_store_config.access_key or "")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed_store_config.secret_key or "")


def _user_settings(world: World, name: str) -> Settings:
    return Settings(store="s3", endpoint_url=world.settings.endpoint_url,
                    bucket=world.settings.bucket,
                    data_dir=str(Path(world.settings.data_dir).parent / f"{name}-data"),
                    service_url=world.session.service.base_url)


def test_identity_password_and_tampering(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path, FAST_SCRYPT)
    made = store.create("Carol", "carol: saffron glacier 26 kite")
    assert store.unlock("carol: saffron glacier 26 kite").sign_public == made.sign_public
    with pytest.raises(AccessDenied, match="wrong password"):
        store.unlock("carol: saffron glacier 26 kitE")
    blob = bytearray(store.path.read_bytes())
    blob[-5] ^= 1
    store.path.write_bytes(bytes(blob))
    with pytest.raises(AccessDenied):
        store.unlock("carol: saffron glacier 26 kite")
    store.path.write_bytes(b"RCPW")
    with pytest.raises(RadcryptError, match="damaged"):
        store.unlock("carol: saffron glacier 26 kite")
    assert (store.path.stat().st_mode & 0o777) == 0o600
    assert "carol: saffron glacier 26 kite" not in store.card_path.read_text()


def test_password_strength_words() -> None:
    assert password_strength("")[0] == 0
    assert password_strength("short")[0] == 0
    assert password_strength("abcdefgh")[0] <= 1  # zxcvbn: a keyboard sequence
    assert password_strength("Tr0ub4dour&3-long-enough")[0] == 4


def test_granted_user_searches_and_decrypts(world: World) -> None:
    repo = open_repository_as(world.session, world.alice, world.repo.repo_id)
    with session_for(_user_settings(world, "alice"), world.alice) as session:
        results = search_files(session, repo, world.files[:3], k=1)
    assert [r.hits[0].distance for r in results] == pytest.approx([0, 0, 0], abs=1e-9)
    assert {e.user_id for e in list_access(world.session, world.repo.repo_id)} == {
        world.owner.user_id, world.alice.user_id}


def test_grant_copied_to_another_name_opens_nothing(world: World) -> None:
    store = world.session.store
    alice_grant = store.get(layout.grant_key(world.repo.repo_id, world.alice.user_id))
    bob_name = layout.grant_key(world.repo.repo_id, world.bob.user_id)
    store.put(bob_name, alice_grant)
    try:  # bob is no member: refused before his grant is even read
        with pytest.raises(AccessDenied, match="no access"):
            open_repository_as(world.session, world.bob, world.repo.repo_id)
    finally:
        store.delete(bob_name)
    owner_name = layout.grant_key(world.repo.repo_id, world.owner.user_id)
    owner_grant = store.get(owner_name)
    store.put(owner_name, alice_grant)  # a member's grant replaced by another's
    try:
        with pytest.raises(AccessDenied, match=r"does not open|not signed"):
            open_repository_as(world.session, world.owner, world.repo.repo_id)
    finally:
        store.put(owner_name, owner_grant)


def _audience(world: World) -> str:
    """The id of the service the requests are signed for (its GET /v1/info)."""
    return str(world.session.service.info()["service_id"])


def _signed_post(world: World, identity: Identity, path: str, body: bytes,
                 headers: dict[str, str] | None = None) -> httpx.Response:
    from app.core.identity import RequestSigner

    sent = headers or RequestSigner(identity).headers("POST", path, body, _audience(world))
    return httpx.post(world.session.service.base_url + path, content=body,
                      headers={"content-type": "application/json", **sent})


def test_service_refuses_strangers_replays_and_stale_requests(world: World) -> None:
    path = f"/v1/repos/{world.repo.repo_id}/refresh"
    stranger = Identity.generate("Mallory")
    assert _signed_post(world, stranger, path, b"{}").status_code == 401
    assert httpx.post(world.session.service.base_url + path, content=b"{}").status_code == 401
    assert _signed_post(world, world.bob, path, b"{}").status_code == 403  # registered only
    from app.core.identity import RequestSigner

    headers = RequestSigner(world.alice).headers("POST", path, b"{}", _audience(world))
    assert _signed_post(world, world.alice, path, b"{}", headers).status_code == 200
    assert _signed_post(world, world.alice, path, b"{}", headers).status_code == 401  # replay
    other_body = _signed_post(world, world.alice, path, b'{"x":1}', headers)
    assert other_body.status_code == 401  # signature covers the body hash
    stale = dict(RequestSigner(world.alice).headers("POST", path, b"{}", _audience(world)))
    stale["x-radcrypt-time"] = str(int(time.time()) - 3600)
    assert _signed_post(world, world.alice, path, b"{}", stale).status_code == 401
    for response in (_signed_post(world, stranger, path, b"{}"),):
        assert response.json() == {"detail": "unauthorized"}


def test_audit_has_every_query_and_no_token(world: World) -> None:
    # opened again: the first import fitted the bound basis after world.repo was created
    repo = open_repository_as(world.session, world.owner, world.repo.repo_id)
    before = len(read_audit(world.session.store, repo.repo_id))
    token = repo.keys.index_key.query(np.ones((1, 128)))
    for _ in range(3):
        world.session.service.search(repo.repo_id, token, 2, repo.keys.version)
    time.sleep(2.6)  # one flush interval
    entries = read_audit(world.session.store, repo.repo_id)
    assert len(entries) >= before + 3
    mine = [e for e in entries[before:] if e["user"] == world.owner.user_id]
    assert len(mine) >= 3 and all(e["action"] == "search" for e in mine)
    assert all(set(e) == {"time", "user", "repo", "action", "results", "duration_ms"}
               for e in entries)
    raw = b"".join(world.session.store.get(k) for k in
                   world.session.store.list_keys(layout.audit_prefix(repo.repo_id)))
    token_bytes = token.to_bytes()
    assert base64.b64encode(token_bytes)[:32] not in raw
    assert all(token_bytes[i : i + 16] not in raw for i in range(0, len(token_bytes) - 16, 64))


def test_revocation_rotates_keys_and_locks_the_revoked_user_out(world: World) -> None:
    store = world.session.store
    old_ring_bytes = open_repository_as(world.session, world.alice,
                                        world.repo.repo_id).ring.to_bytes()
    path = f"/v1/repos/{world.repo.repo_id}/refresh"
    assert _signed_post(world, world.alice, path, b"{}").status_code == 200
    repo = revoke_access(world.session, world.owner, world.repo, world.alice.user_id)
    time.sleep(2.1)  # the running service re-checks grants at least every 2 s
    assert _signed_post(world, world.alice, path, b"{}").status_code == 403
    world.repo = repo
    assert repo.manifest.key_version == 2
    with pytest.raises(AccessDenied, match="no access"):
        open_repository_as(world.session, world.alice, repo.repo_id)
    with session_for(_user_settings(world, "alice2"), world.alice) as session, \
            pytest.raises(ServiceError, match="refused"):
        # her client pinned the owner's key (it verifies the log before asking)
        old = Repository(repo.manifest, KeyRing.from_bytes(old_ring_bytes), repo.owner_key)
        search_files(session, old, world.files[:1])
    # Written after revocation: a new image, the re-sealed packs, the new segments.
    new_file = decodable_dicom_files()[20]
    report = Importer(store, repo, writer=world.owner, settings=world.settings).run([new_file])
    new_id = report.imported[0][1]
    old_ring = KeyRing.from_bytes(old_ring_bytes)
    with pytest.raises(KeyError):  # the revoked ring has no key of version 2 at all
        old_ring.version(2)
    for key in store.list_keys(layout.packs_prefix(repo.repo_id)):
        pack_id = key.rsplit("/", 1)[-1]
        blob = store.get(key)
        assert pack.trailer_info(blob, len(blob), pack_id)[1] == 2  # old packs are gone
        for version in old_ring.versions:  # no key the revoked user holds opens one
            with pytest.raises(DecryptionError):
                pack.open_pack(version.data_key, repo.repo_id, pack_id, blob)
    with pytest.raises(IntegrityError):
        objects.fetch_original(store, old_ring, repo.repo_id, new_id, Path("/tmp/never"))
    assert not Path("/tmp/never").exists()
    from cloud.segments import decode_segment

    for key in store.list_keys(layout.segments_prefix(repo.repo_id)):
        segment = decode_segment(store.get(key), key)
        assert segment.key_version == 2  # old-version segments are gone
        with pytest.raises(KeyError):
            old_ring.version(segment.key_version)
    # The owner still finds everything, old images and the new one, exactly.
    results = search_files(world.session, repo, [*world.files[:3], new_file], k=1)
    assert [r.hits[0].distance for r in results] == pytest.approx([0] * 4, abs=1e-9)


def test_only_the_owner_grants_and_revokes(world: World) -> None:
    with pytest.raises(AccessDenied, match="only the owner"):
        grant_access(world.session, world.bob, world.repo, world.bob.user_id)
    with pytest.raises(RadcryptError, match="not registered"):
        grant_access(world.session, world.owner, world.repo, "nobody-000000")


def test_changed_owner_key_is_refused(world: World) -> None:
    """A cloud that replaces the manifest with one signed by another key is noticed."""
    from crypto.signed import sign_json

    store = world.session.store
    name = layout.manifest_key(world.repo.repo_id)
    original = store.get(name)
    forger = Identity.generate("Forger")
    payload = json.loads(original)["payload"]
    store.put(name, sign_json(forger, "manifest", name, payload))
    try:
        with pytest.raises(AccessDenied, match=r"owner key .* changed"):
            open_repository_as(world.session, world.owner, world.repo.repo_id)
    finally:
        store.put(name, original)


def test_service_log_holds_no_secret(world: World) -> None:
    log_file = Path(world.settings.data_dir) / "service.log"
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    for secret in (world.repo.keys.data_key, world.owner.sign_private,
                   world.alice.enc_private):
        assert secret.hex() not in text
        assert base64.b64encode(secret).decode() not in text
    assert hashlib.sha256(b"").hexdigest()  # the log was read (possibly empty) without error
