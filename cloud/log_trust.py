"""Whom the search service believes when it verifies a repository's segment log.

The service holds no repository key; what it can check is signatures. It trusts only the
owner keys it was configured with (docs/FORMAT-2.md 5.5, 6.2): the manifest must
be signed by one of them, and a log entry must be signed by that same owner or by a
member listed in that manifest at its current key version, whose user record
(``users/<id>.json``) that same owner signed. This is the rule cloud/auth.py applies to
requests, applied to log writers, so the service searches what the people it serves
wrote and nothing a stranger appended to the log.

A repository whose manifest is not of format 2 (an unsigned legacy manifest, a format-1
manifest, or none at all) has no log: ``service_trust`` returns None and the service
loads its segments as before. A format-2 manifest the configured keys do not vouch for
is an error (LogTrustError), never a fallback to format 1: the cloud must not be able to
turn the log off by rewriting the manifest.

Co-owners (docs/FORMAT-2.md 2.4): a manifest may list co-owners, each endorsed by the
owner's key (crypto.identity.manifest_owners). The configured key is then the owner's
(``owner_key`` in the manifest), the manifest may be signed by any co-owner, and a
co-owner counts as the owner for the log's owner-only entries, checkpoints and user
records. Nothing needs configuring when a co-owner is added.
"""

from __future__ import annotations

import hmac
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from cloud import layout
from cloud.auth import manifest_membership
from cloud.backend import ObjectNotFound, Store
from crypto.errors import FormatError
from crypto.identity import ManifestOwners, PublicCard, manifest_owners
from crypto.signed import json_signer, open_json

__all__ = ["MANIFEST_FORMAT_V2", "LogTrustError", "ServiceTrust", "service_trust"]

MANIFEST_FORMAT_V2 = "radcrypt-manifest-v2"  # app/core/repository.py, compared as a string


class LogTrustError(ValueError):
    """The manifest of a format-2 repository cannot be believed (message names it)."""


@dataclass
class ServiceTrust:
    """A LogTrust (cloud/seglog.py) built from a manifest one of the configured owner keys
    signed. User records are read when a writer is first asked about, and remembered for
    the life of this object (one refresh of the service's view)."""

    store: Store
    repo_id: str
    owner_id: str
    owner_key: bytes
    manifest_sequence: int
    key_version: int
    members: dict[str, int]  # user id -> key version listed in the manifest
    co_owners: dict[str, bytes] = field(default_factory=dict)  # user id -> endorsed key
    _keys: dict[str, bytes | None] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def owner_keys(self) -> list[bytes]:
        """The owner's key and the co-owners' (checkpoints, user records)."""
        return [self.owner_key, *self.co_owners.values()]

    def is_owner(self, user_id: str) -> bool:
        return user_id == self.owner_id or user_id in self.co_owners

    def signer_key(self, user_id: str) -> bytes | None:
        """The Ed25519 public key of the owner, a co-owner or a member at the current key
        version (from a user record an owner signed); None for anyone else."""
        if user_id == self.owner_id:
            return self.owner_key
        if user_id in self.co_owners:
            return self.co_owners[user_id]
        if self.members.get(user_id) != self.key_version:
            return None  # never a member, or revoked (listed at an older key version)
        with self._lock:
            if user_id in self._keys:
                return self._keys[user_id]
        key = _user_key(self.store, user_id, self.owner_keys)
        with self._lock:
            self._keys[user_id] = key
        return key


def service_trust(store: Store, repo_id: str, owner_keys: Sequence[bytes]
                  ) -> ServiceTrust | None:
    """The trust to verify ``repo_id``'s log with, or None for a repository without a log
    (format 1, a legacy unsigned manifest, no manifest). LogTrustError when the manifest
    says format 2 but none of ``owner_keys`` signed it, or its fields are malformed."""
    name = layout.manifest_key(layout.validate_repo_id(repo_id))
    try:
        blob = store.get(name)
    except ObjectNotFound:
        return None
    try:
        signer = json_signer(blob)
    except FormatError as exc:
        raise LogTrustError(f"manifest of repository {repo_id!r}: {exc}") from None
    if signer is None:
        claimed = _unsigned_format(blob)
        if claimed == MANIFEST_FORMAT_V2:
            raise LogTrustError(f"manifest of repository {repo_id!r}: field 'format' says "
                                "format 2 but the manifest is not signed")
        return None
    try:
        payload = open_json(blob, "manifest", name, [signer])
        owners: ManifestOwners | None = manifest_owners(payload, repo_id, signer)
    except FormatError as exc:
        if (not any(hmac.compare_digest(signer, key) for key in owner_keys)
                and _unsigned_format(blob, signed=True) != MANIFEST_FORMAT_V2):
            return None  # someone else's format-1 repository, as below
        raise LogTrustError(f"manifest of repository {repo_id!r}: {exc}") from None
    assert owners is not None
    if not any(hmac.compare_digest(owners.root, key) for key in owner_keys):
        if _unsigned_format(blob, signed=True) == MANIFEST_FORMAT_V2:
            raise LogTrustError(f"manifest of repository {repo_id!r} is signed by a key that "
                                "is not one of the service's owner keys (nor a co-owner "
                                "endorsed by one)")
        return None  # someone else's format-1 repository: loaded as before (cloud/auth.py
        #              refuses its requests anyway)
    if payload.get("format") != MANIFEST_FORMAT_V2:
        return None
    membership = manifest_membership(payload)
    owner_id = payload.get("owner")
    if membership is None or not isinstance(owner_id, str) or not owner_id:
        raise LogTrustError(f"manifest of repository {repo_id!r}: fields 'sequence', "
                            "'key_version', 'owner' or 'members' are missing or malformed")
    sequence, key_version, members = membership
    if owner_id != owners.owner_id:
        raise LogTrustError(f"manifest of repository {repo_id!r}: field 'owner' is malformed")
    co_owners = {u: k for u, k in owners.keys.items() if u != owner_id}
    return ServiceTrust(store, repo_id, owner_id, owners.root, sequence, key_version, members,
                        co_owners)


def _unsigned_format(blob: bytes, signed: bool = False) -> object:
    """The ``format`` a manifest document claims, unverified (None if unreadable): only
    used to decide whether an untrusted document is to be refused or ignored."""
    try:
        doc = json.loads(blob)
        if signed:
            doc = doc["payload"]
        return doc.get("format") if isinstance(doc, dict) else None
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nested too
        return None  # deep for json.loads (found by tests/fuzz/test_file_fuzz.py)


def _user_key(store: Store, user_id: str, owner_keys: list[bytes]) -> bytes | None:
    """The signing key in ``user_id``'s record if one of ``owner_keys`` signed it."""
    try:
        name = layout.user_key(user_id)
        payload = open_json(store.get(name), "user", name, owner_keys)
        card = PublicCard.from_json(str(payload.get("card", "")))
    except (ObjectNotFound, FormatError, ValueError):
        return None
    return card.sign_public if card.user_id == user_id else None
