"""Users and access: registration, grants, revocation, and opening a repository as a user.

Trust is rooted in the data owner's Ed25519 key: the owner signs the repository
manifest, each user record (``users/<id>.json``, carrying the user's public card) and
each grant (the key ring wrapped to the user's X25519 key). A client pins the owner key
of a repository the first time it opens it and refuses a changed one afterwards, so a
cloud that swaps manifests or grants is noticed. Revocation deletes the user's grant,
adds a key version with fresh keys, re-encrypts the index segments and the metadata
under it, re-wraps the ring for everyone still granted, then deletes the old segments:
what is written after revocation cannot be opened with an old grant.
"""

from __future__ import annotations

import base64
import hmac
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from app.core import objects
from app.core.errors import AccessDenied, RadcryptError, RepositoryExists
from app.core.identity import RequestSigner
from app.core.repository import (
    PASSWORD_OWNER,
    Manifest,
    Repository,
    new_repository,
    open_repository,
    read_manifest,
)
from app.core.searcher import read_meta
from app.core.session import Session
from app.core.settings import Settings
from cloud import layout
from cloud.segments import decode_segment, encode_segment
from cloud.store import ObjectExists, ObjectNotFound, ObjectStore
from crypto.errors import DecryptionError, FormatError
from crypto.identity import Identity, PublicCard
from crypto.index import IndexKey
from crypto.keys import KeyRing
from crypto.recipient import unwrap_for_recipient, wrap_to_recipient
from crypto.signed import json_signer, open_json, open_record, sign_json, sign_record
from resources.reference import reference_features

PINS_FILE = "pinned-owners.json"
SEGMENT_ROWS = 4096
BASIS_SAMPLE = 5000


@dataclass(frozen=True)
class UserRecord:
    user_id: str
    name: str
    fingerprint: str


@dataclass(frozen=True)
class AccessEntry:
    user_id: str
    name: str
    key_version: int


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _context(repo_id: str, user_id: str) -> bytes:
    return repo_id.encode() + b"\0" + user_id.encode()


# --- pins (trust on first use) ------------------------------------------------------------


def _pins_path(settings: Settings) -> Path:
    return settings.data_path / PINS_FILE


def pinned_owner_keys(settings: Settings) -> dict[str, bytes]:
    path = _pins_path(settings)
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {repo: base64.b64decode(key) for repo, key in raw.items()}
    except (ValueError, AttributeError):
        raise RadcryptError(f"the pinned owner keys file {path} is damaged") from None


def _pin(settings: Settings, repo_id: str, owner_key: bytes) -> None:
    pins = pinned_owner_keys(settings)
    known = pins.get(repo_id)
    if known is not None and not hmac.compare_digest(known, owner_key):
        raise AccessDenied(
            f"the owner key of repository {repo_id!r} changed since this workstation first "
            "opened it: refusing (someone may have replaced the manifest)")
    if known is None:
        pins[repo_id] = owner_key
        path = _pins_path(settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        encoded = {r: base64.b64encode(k).decode() for r, k in sorted(pins.items())}
        path.write_text(json.dumps(encoded, indent=2), encoding="utf-8")


def session_for(settings: Settings, identity: Identity) -> Session:
    """A session whose requests are signed by ``identity``; an embedded service trusts the
    identity's own key and the owners this workstation pinned."""
    owners = [identity.sign_public, *pinned_owner_keys(settings).values()]
    return Session(settings, signer=RequestSigner(identity), owner_keys=owners)


# --- manifest, users, grants ---------------------------------------------------------------


def _signed_manifest(store: ObjectStore, repo_id: str) -> tuple[Manifest, bytes]:
    manifest = read_manifest(store, repo_id)
    name = layout.manifest_key(repo_id)
    blob = store.get(name)
    owner = json_signer(blob)
    if owner is None:
        raise AccessDenied(f"repository {repo_id!r} has an unsigned manifest: its owner must "
                           "migrate it (radcrypt repo migrate)")
    try:
        open_json(blob, "manifest", name, [owner])
    except FormatError:
        raise AccessDenied(f"the manifest of {repo_id!r} has a bad signature") from None
    return manifest, owner


def _write_manifest(store: ObjectStore, owner: Identity, manifest: Manifest,
                    create: bool = False) -> None:
    name = layout.manifest_key(manifest.repo_id)
    payload = json.loads(manifest.to_json())
    store.put(name, sign_json(owner, "manifest", name, payload), if_absent=create)


def register_user(session: Session, owner: Identity, card_json: str) -> UserRecord:
    """Record a user's public card, signed by the owner, so the service can check them."""
    try:
        card = PublicCard.from_json(card_json)
    except FormatError as exc:
        raise RadcryptError(f"cannot register this card: {exc}") from None
    name = layout.user_key(card.user_id)
    payload: dict[str, object] = {"card": card.to_json(), "fingerprint": card.fingerprint,
                                  "registered": _now()}
    session.store.put(name, sign_json(owner, "user", name, payload))
    return UserRecord(card.user_id, card.name, card.fingerprint)


def _user_card(store: ObjectStore, user_id: str, trusted: list[bytes]) -> PublicCard:
    name = layout.user_key(user_id)
    try:
        payload = open_json(store.get(name), "user", name, trusted)
        return PublicCard.from_json(str(payload["card"]))
    except ObjectNotFound:
        raise RadcryptError(f"user {user_id!r} is not registered") from None
    except (FormatError, KeyError):
        raise RadcryptError(f"the record of user {user_id!r} is not signed by this owner"
                            ) from None


def _write_grant(store: ObjectStore, owner: Identity, ring: KeyRing, card: PublicCard) -> None:
    name = layout.grant_key(ring.repo_id, card.user_id)
    wrapped = wrap_to_recipient(ring.to_bytes(), card.enc_public,
                                _context(ring.repo_id, card.user_id))
    store.put(name, sign_record(owner, "grant", name, wrapped))


def _check_owner(owner: Identity, owner_key: bytes, repo_id: str) -> None:
    if not hmac.compare_digest(owner.sign_public, owner_key):
        raise AccessDenied(f"only the owner of {repo_id!r} can change who has access")


# --- use cases -----------------------------------------------------------------------------


def create_repository_as(session: Session, owner: Identity, name: str,
                         extractor: str = "radcrypt-v1",
                         basis_sample: np.ndarray | None = None) -> Repository:
    """A new repository owned by ``owner``: signed manifest, owner registered and granted."""
    store = session.store
    repo = new_repository(store, name, extractor, basis_sample)
    repo_id, ring, manifest = repo.repo_id, repo.ring, repo.manifest
    register_user(session, owner, owner.card().to_json())
    _write_grant(store, owner, ring, owner.card())
    try:
        _write_manifest(store, owner, manifest, create=True)
    except ObjectExists:
        raise RepositoryExists(f"a repository named {repo_id!r} already exists") from None
    _pin(session.settings, repo_id, owner.sign_public)
    return repo


def open_repository_as(session: Session, identity: Identity, name: str) -> Repository:
    """Unlock a repository with the user's grant, after checking the owner's signatures."""
    manifest, owner_key = _signed_manifest(session.store, name)
    _pin(session.settings, manifest.repo_id, owner_key)
    grant_name = layout.grant_key(manifest.repo_id, identity.user_id)
    try:
        wrapped = open_record(session.store.get(grant_name), "grant", grant_name, [owner_key])
        ring = KeyRing.from_bytes(unwrap_for_recipient(
            wrapped, identity.enc_private, _context(manifest.repo_id, identity.user_id)))
    except ObjectNotFound:
        raise AccessDenied(f"you have no access to repository {manifest.repo_id!r} (never "
                           "granted, or revoked)") from None
    except (FormatError, DecryptionError):
        raise AccessDenied(f"your grant for {manifest.repo_id!r} does not open with your "
                           "keys or is not signed by the owner") from None
    if ring.repo_id != manifest.repo_id or ring.current.version < manifest.key_version:
        raise AccessDenied(f"your grant for {manifest.repo_id!r} is outdated (key version "
                           f"{ring.current.version}, repository at {manifest.key_version})")
    return Repository(manifest, ring)


def grant_access(session: Session, owner: Identity, repo: Repository, user_id: str) -> None:
    _, owner_key = _signed_manifest(session.store, repo.repo_id)
    _check_owner(owner, owner_key, repo.repo_id)
    card = _user_card(session.store, user_id, [owner_key])
    _write_grant(session.store, owner, repo.ring, card)


def list_access(session: Session, repo_id: str) -> list[AccessEntry]:
    """Who holds a grant (names from the owner-signed user records)."""
    manifest, owner_key = _signed_manifest(session.store, repo_id)
    prefix = layout.grants_prefix(repo_id)
    entries = []
    for key in session.store.list_keys(prefix):
        user_id = key[len(prefix):]
        if user_id == PASSWORD_OWNER:
            continue
        try:
            name = _user_card(session.store, user_id, [owner_key]).name
        except RadcryptError:
            name = "(unregistered)"
        entries.append(AccessEntry(user_id, name, manifest.key_version))
    return sorted(entries, key=lambda e: e.user_id)


def revoke_access(session: Session, owner: Identity, repo: Repository, user_id: str,
                  ) -> Repository:
    """Remove a user and rotate to a new key version (see the module docstring)."""
    store = session.store
    manifest, owner_key = _signed_manifest(store, repo.repo_id)
    _check_owner(owner, owner_key, repo.repo_id)
    if user_id == owner.user_id:
        raise RadcryptError("the owner cannot revoke their own access")
    try:
        store.delete(layout.grant_key(repo.repo_id, user_id))
    except ObjectNotFound:
        raise RadcryptError(f"user {user_id!r} has no access to {repo.repo_id!r}") from None
    old_segments = list(store.list_keys(layout.segments_prefix(repo.repo_id)))
    ids, metas = _all_metadata(store, repo, old_segments)
    rows = [np.asarray(meta["features"], dtype=np.float64) for meta in metas]
    features = np.array(rows) if rows else np.empty((0, manifest.dim))
    sample = features[:BASIS_SAMPLE] if len(features) >= 32 else reference_features(
        manifest.extractor)
    ring = repo.ring.rotated(IndexKey.generate(manifest.dim, sample=sample))
    new_repo = Repository(
        Manifest(**{**manifest.__dict__, "key_version": ring.current.version}), ring)
    # Order matters for a crash half-way: the new keys are stored (grants) before any
    # object depends on them; readers accept a ring newer than the manifest.
    for start in range(0, len(ids), SEGMENT_ROWS):
        chunk = ids[start : start + SEGMENT_ROWS]
        vectors = ring.current.index_key.encrypt(features[start : start + SEGMENT_ROWS])
        store.put(layout.segment_key(repo.repo_id, layout.new_id()),
                  encode_segment(chunk, vectors, ring.current.version), if_absent=True)
    for entry in list_access(session, repo.repo_id):
        _write_grant(store, owner, ring, _user_card(store, entry.user_id, [owner_key]))
    _write_manifest(store, owner, new_repo.manifest)
    for image_id, meta in zip(ids, metas, strict=True):
        objects.put_encrypted(store, ring.current, repo.repo_id, "meta", image_id,
                              json.dumps(meta, separators=(",", ":")).encode())
    for key in old_segments:
        store.delete(key)
    return new_repo


def _all_metadata(store: ObjectStore, repo: Repository, segment_keys: list[str]
                  ) -> tuple[list[str], list[dict[str, Any]]]:
    """Ids and decrypted metadata (features included) of every committed image: read
    once, used both to refit the basis and to re-encrypt the metadata."""
    ids: list[str] = []
    for key in segment_keys:
        try:
            ids += decode_segment(store.get(key), key).id_strings()
        except ValueError:
            continue
    ids = list(dict.fromkeys(ids))
    return ids, [read_meta(store, repo, i)[0] for i in ids]


def migrate_password_repository(session: Session, owner: Identity, name: str,
                                password: str) -> Repository:
    """Turn a password-locked repository (before identities) into an owner-signed one."""
    repo = open_repository(session.store, name, password)
    register_user(session, owner, owner.card().to_json())
    _write_grant(session.store, owner, repo.ring, owner.card())
    _write_manifest(session.store, owner, repo.manifest)
    session.store.delete(layout.grant_key(repo.repo_id, PASSWORD_OWNER))
    _pin(session.settings, repo.repo_id, owner.sign_public)
    return repo
