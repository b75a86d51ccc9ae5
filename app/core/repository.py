"""Repositories: create, list, open (unlock) — the keys never leave this machine in clear.

A repository is a manifest (public parameters, plain JSON) and a key ring wrapped for
each user allowed in. Until identities exist (the identity issue), the owner's copy of
the ring is wrapped under the owner's password with scrypt and stored as the grant of
the pseudo-user ``password-owner``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from app.core.errors import AccessDenied, RadcryptError, RepositoryExists, RepositoryNotFound
from app.imaging.features import FEATURE_DIM, get_extractor
from cloud import layout
from cloud.store import ObjectExists, ObjectNotFound, ObjectStore
from crypto.errors import FormatError
from crypto.index import IndexKey
from crypto.keys import (
    DEFAULT_SCRYPT_LOG2_N,
    KeyRing,
    VersionKeys,
    WrongPassword,
    unwrap_with_password,
    wrap_with_password,
)
from resources.reference import reference_features

MANIFEST_FORMAT = "radcrypt-manifest-v1"
SCHEME = "aspe-split-v1+aes-256-gcm-stream-v1"
PASSWORD_OWNER = "password-owner"


@dataclass(frozen=True)
class Manifest:
    """Public parameters of a repository; nothing in it is secret."""

    repo_id: str
    extractor: str
    dim: int
    levels: list[int]
    key_version: int
    created: str
    scheme: str = SCHEME
    format: str = MANIFEST_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RadcryptError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise RadcryptError(f"{where}: expected a JSON object")
        if raw.get("format") != MANIFEST_FORMAT:
            raise RadcryptError(f"{where}: field 'format' must be {MANIFEST_FORMAT!r}")
        expected: dict[str, Any] = {"repo_id": str, "extractor": str, "dim": int,
                                    "levels": list, "key_version": int, "created": str,
                                    "scheme": str}
        for name, kind in expected.items():
            if not isinstance(raw.get(name), kind):
                raise RadcryptError(f"{where}: field {name!r} is missing or not a {kind.__name__}")
        return cls(**{k: raw[k] for k in (*expected, "format")})


@dataclass(frozen=True, eq=False)
class Repository:
    """An unlocked repository: its manifest and its key ring (in memory only)."""

    manifest: Manifest
    ring: KeyRing

    @property
    def repo_id(self) -> str:
        return self.manifest.repo_id

    @property
    def keys(self) -> VersionKeys:
        return self.ring.current


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_repository(store: ObjectStore, name: str, extractor: str,
                   basis_sample: np.ndarray | None) -> Repository:
    """Fresh keys and the manifest of a repository not yet in the store (nothing written).

    The bound basis follows ``basis_sample`` (the department's own features) or, without
    one, the extractor's shipped reference features.
    """
    try:
        repo_id = layout.validate_repo_id(name)
        get_extractor(extractor)
    except ValueError as exc:
        raise RadcryptError(str(exc)) from None
    if store.exists(layout.manifest_key(repo_id)):
        raise RepositoryExists(f"a repository named {repo_id!r} already exists")
    sample = basis_sample if basis_sample is not None else reference_features(extractor)
    index_key = IndexKey.generate(FEATURE_DIM, sample=sample)
    ring = KeyRing(repo_id, (VersionKeys.generate(1, index_key),))
    manifest = Manifest(repo_id=repo_id, extractor=extractor, dim=FEATURE_DIM,
                        levels=list(index_key.levels), key_version=1, created=_now())
    return Repository(manifest, ring)


def create_repository(
    store: ObjectStore,
    name: str,
    password: str,
    extractor: str = "radcrypt-v1",
    basis_sample: np.ndarray | None = None,
    scrypt_log2_n: int = DEFAULT_SCRYPT_LOG2_N,
) -> Repository:
    """A new repository: fresh keys, the manifest, the owner's password-wrapped grant."""
    repo = new_repository(store, name, extractor, basis_sample)
    repo_id, ring, manifest = repo.repo_id, repo.ring, repo.manifest
    grant = wrap_with_password(ring.to_bytes(), password, log2_n=scrypt_log2_n)
    store.put(layout.grant_key(repo_id, PASSWORD_OWNER), grant)
    try:
        store.put(layout.manifest_key(repo_id), manifest.to_json(), if_absent=True)
    except ObjectExists:
        raise RepositoryExists(f"a repository named {repo_id!r} already exists") from None
    return repo


def read_manifest(store: ObjectStore, name: str) -> Manifest:
    try:
        repo_id = layout.validate_repo_id(name)
    except ValueError as exc:
        raise RadcryptError(str(exc)) from None
    key = layout.manifest_key(repo_id)
    try:
        data = store.get(key)
    except ObjectNotFound:
        raise RepositoryNotFound(f"no repository named {repo_id!r} in this store") from None
    manifest = Manifest.from_json(manifest_payload(data), f"manifest of repository {repo_id!r}")
    if manifest.repo_id != repo_id:
        raise RadcryptError(f"manifest of repository {repo_id!r} names another repository")
    return manifest


def manifest_payload(data: bytes) -> bytes:
    """The manifest's own JSON, whether stored plain or inside an owner's signed document.

    Reading parameters needs no trust; opening a repository checks the signature
    (app/core/access.py) before any key is used with it.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return data  # Manifest.from_json reports the error with the repository's name
    if isinstance(doc, dict) and "signature" in doc and isinstance(doc.get("payload"), dict):
        return json.dumps(doc["payload"]).encode()
    return data


def list_repositories(store: ObjectStore) -> list[Manifest]:
    """Every repository in the bucket, by name."""
    manifests = []
    for key in store.list_keys(layout.repos_prefix()):
        try:
            repo_id = layout.parse_manifest_key(key)
        except ValueError:
            continue
        manifests.append(read_manifest(store, repo_id))
    return sorted(manifests, key=lambda m: m.repo_id)


def open_repository(store: ObjectStore, name: str, password: str) -> Repository:
    """Unlock a repository with the owner's password."""
    manifest = read_manifest(store, name)
    try:
        blob = store.get(layout.grant_key(manifest.repo_id, PASSWORD_OWNER))
    except ObjectNotFound:
        raise AccessDenied(f"repository {manifest.repo_id!r} has no password grant") from None
    try:
        ring = KeyRing.from_bytes(unwrap_with_password(blob, password))
    except WrongPassword:
        raise AccessDenied("wrong password: the repository stays locked") from None
    except FormatError as exc:
        raise RadcryptError(f"the key grant of {manifest.repo_id!r} is damaged: {exc}") from None
    if ring.repo_id != manifest.repo_id:
        raise AccessDenied("this key grant belongs to another repository")
    return Repository(manifest, ring)
