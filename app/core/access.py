"""Users and access: registration, membership, grants, revocation, opening as a user.

Trust is rooted in the data owner's Ed25519 key: the owner signs the repository
manifest, each user record (``users/<id>.json``, carrying the user's public card) and
each grant (the key ring wrapped to the user's X25519 key). A client pins the owner key
of a repository the first time it opens it and refuses a changed one afterwards, so a
cloud that swaps manifests or grants is noticed.

Membership. Who may open a repository is the ``members`` list of its signed manifest
(user id and key version), never the objects under ``grants/``: a grant opens the
repository only for a member listed at the manifest's current key version, so a grant
restored or copied by whoever can write to the bucket opens nothing, and nothing is ever
wrapped to a name merely found there. The owner raises the manifest's ``sequence`` by one
at every write; each client remembers the highest sequence it has seen per repository
(``manifest-sequences.json`` beside the pinned owner keys) and refuses an older manifest.

Revocation (DESIGN.md §7; docs/FORMAT-2.md 7.3) needs storage format 2: a
format-1 repository is read-only (``radcrypt repo migrate --format 2`` first) and its
revocation is refused before anything is written. It writes, in this order, each step
safe to repeat:

1. a new key version N + 1 (fresh keys, the bound basis refitted on the feature arrays of
   the live packs), stored first in the owner's grant: a ring there newer than the
   manifest means "a rotation is in progress";
2. the manifest with the user removed (sequence S + 1, still key version N): from here the
   user is refused by clients and by the service;
3. an owner-signed ``membership`` log entry naming manifest S + 1, and a checkpoint at it:
   every entry the user wrote as a member lies at or below it, and any later entry of
   theirs fails every member's verification;
4. the new ring wrapped to every other member of that manifest;
5. per live pack below N + 1, a new pack (meta, previews, features re-sealed under
   N + 1) and a new segment encrypted from its feature array, committed by one
   owner-signed ``add`` entry (reason revocation); the old objects stay live, so members
   still at N search complete version-N sets meanwhile;
6. the manifest at key version N + 1, every member listed at N + 1: the commit point,
   then its own ``membership`` entry and checkpoint;
7. the revoked user's grant deleted;
8. images committed meanwhile under an old version re-sealed as in 5, then one ``remove``
   entry (reason revocation) naming every live object below N + 1, then those objects
   deleted at once (no grace period: the revoked user held their keys).

Between 2 and the checkpoint of 3, the user's own entries after the latest checkpoint no
longer verify under the manifest; a re-run reads the log with them trusted, but only
entries naming a manifest sequence from before their removal.

Co-owners (docs/FORMAT-2.md 2.4; ``add_owner``): the owner can endorse members as
co-owners in the manifest; each may then do what only the owner did above (sign the
manifest, user records and grants, revoke, write membership entries and checkpoints), so
a lost owner workstation loses nothing. The pinned key stays the owner's: a co-owner's
signature counts through the owner's endorsement of it.

Storage format 2: a new repository created with ``storage_format=2`` gets its manifest
(format ``radcrypt-manifest-v2``) and then the genesis entry of its segment log, signed by
the owner.

Running ``revoke_access`` again after a failure at any step finishes the work. A pending
rotation found for a user no longer listed is this revocation's: steps 3 to 8 are
completed. One found while the user is still listed may have reached that user (it can
be an earlier revocation's, whose step 4 wrapped it to them), so it is completed for the
members as listed and the revocation starts over with a fresh version.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from app.core import basis, compaction, keyword_dicts, labels, logstate
from app.core.errors import AccessDenied, IntegrityError, RadcryptError, RepositoryExists
from app.core.identity import RequestSigner
from app.core.logstate import remember_head, write_private
from app.core.packs import ImageReader, read_toc
from app.core.progress import ProgressCallback, ProgressEvent, no_progress
from app.core.repository import (
    PASSWORD_OWNER,
    CoOwner,
    Manifest,
    Member,
    Repository,
    is_format2,
    new_repository,
    open_repository,
    read_manifest,
    read_signed_manifest,
    storage_format_name,
    with_members,
)
from app.core.session import Session
from app.core.settings import Settings
from cloud import layout, seglog
from cloud.backend import ObjectExists, ObjectNotFound, Store, stored_after_conflict
from crypto import pack as pack_format
from crypto.errors import DecryptionError, FormatError
from crypto.identity import Identity, PublicCard, endorse_co_owner
from crypto.keys import KeyRing
from crypto.recipient import unwrap_for_recipient, wrap_to_recipient
from crypto.signed import json_signer, open_json, open_record, sign_json, sign_record

PINS_FILE = "pinned-owners.json"
SEQUENCES_FILE = "manifest-sequences.json"
BASIS_SAMPLE = 5000
RESEAL_IMAGES = compaction.PACK_IMAGES  # images per pack (and segment) a revocation writes

log = logging.getLogger(__name__)


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
    status: str = "ok"  # otherwise what is wrong with this member's record or grant


class AccessList(list[AccessEntry]):
    """The members of a repository; ``ignored``: names under grants/ that were not used
    (not a member, or a grant that does not verify), each already logged as a warning."""

    def __init__(self, entries: list[AccessEntry], ignored: list[str]) -> None:
        super().__init__(entries)
        self.ignored = ignored


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _context(repo_id: str, user_id: str) -> bytes:
    return repo_id.encode() + b"\0" + user_id.encode()


# --- pins and sequences (trust on first use, no rollback) ----------------------------------


def _pins_path(settings: Settings) -> Path:
    return settings.data_path / PINS_FILE


def _sequences_path(settings: Settings) -> Path:
    return settings.data_path / SEQUENCES_FILE


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
        encoded = {r: base64.b64encode(k).decode() for r, k in sorted(pins.items())}
        write_private(_pins_path(settings), json.dumps(encoded, indent=2).encode())


def seen_sequences(settings: Settings) -> dict[str, int]:
    """The highest manifest sequence this workstation has seen, per repository."""
    path = _sequences_path(settings)
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
            raise ValueError("not a map of integers")
        return {str(repo): int(seq) for repo, seq in raw.items()}
    except (ValueError, UnicodeDecodeError):
        raise RadcryptError(f"the manifest sequences file {path} is damaged") from None


def _remember(settings: Settings, manifest: Manifest) -> None:
    """Refuse a manifest older than one seen before; remember a newer one."""
    seen = seen_sequences(settings)
    known = seen.get(manifest.repo_id, 0)
    if manifest.sequence < known:
        raise AccessDenied(
            f"the manifest of repository {manifest.repo_id!r} has sequence "
            f"{manifest.sequence}, older than sequence {known} seen before on this "
            "workstation: refusing (the store may be serving an old copy, a rollback; only "
            "if the repository was deleted and created anew, remove its entry from "
            f"{_sequences_path(settings)})")
    if manifest.sequence > known:
        seen[manifest.repo_id] = manifest.sequence
        write_private(_sequences_path(settings),
                       json.dumps(dict(sorted(seen.items())), indent=2).encode())


def session_for(settings: Settings, identity: Identity) -> Session:
    """A session whose requests are signed by ``identity``; an embedded service trusts the
    identity's own key and the owners this workstation pinned."""
    owners = [identity.sign_public, *pinned_owner_keys(settings).values()]
    return Session(settings, signer=RequestSigner(identity), owner_keys=owners)


# --- manifest, users, grants ---------------------------------------------------------------


def _signed_manifest(session: Session, repo_id: str) -> tuple[Manifest, bytes]:
    """The verified manifest and its signer, pinned, and refused if older than one seen."""
    manifest, owner = read_signed_manifest(session.store, repo_id)
    _pin(session.settings, manifest.repo_id, owner)
    _remember(session.settings, manifest)
    trusted = getattr(session, "owner_keys", None)  # the embedded search service's owners
    if isinstance(trusted, list) and owner not in trusted:
        trusted.append(owner)  # (Session.service restarts one started without this key)
    return manifest, owner


def _write_manifest(store: Store, owner: Identity, manifest: Manifest,
                    create: bool = False) -> None:
    name = layout.manifest_key(manifest.repo_id)
    payload = json.loads(manifest.to_json())
    blob = sign_json(owner, "manifest", name, payload)
    for attempt in range(4):
        try:
            store.put(name, blob, if_absent=create)
            return
        except ObjectExists:
            stored = stored_after_conflict(store, name)
            if stored == blob:
                return  # a retried create found its own first write
            if stored is not None or attempt == 3:
                raise
            # "exists" but nothing readable: the first attempt was cut off mid-upload
            # (SeaweedFS answers 412 for it; tests/test_fault_import.py): create again.


def _publish(session: Session, owner: Identity, manifest: Manifest) -> Manifest:
    _write_manifest(session.store, owner, manifest)
    _remember(session.settings, manifest)
    return manifest


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


def _user_card(store: Store, user_id: str, trusted: list[bytes]) -> PublicCard:
    """The card of a user record signed by one of ``trusted`` (this repository's owner)."""
    try:
        name = layout.user_key(user_id)
        payload = open_json(store.get(name), "user", name, trusted)
        card = PublicCard.from_json(str(payload["card"]))
    except ObjectNotFound:
        raise RadcryptError(f"user {user_id!r} is not registered") from None
    except (FormatError, KeyError, ValueError):
        raise RadcryptError(f"the record of user {user_id!r} is not signed by this owner"
                            ) from None
    if card.user_id != user_id:
        raise RadcryptError(f"the record of user {user_id!r} holds another user's card")
    return card


def _write_grant(store: Store, owner: Identity, ring: KeyRing, card: PublicCard) -> None:
    name = layout.grant_key(ring.repo_id, card.user_id)
    wrapped = wrap_to_recipient(ring.to_bytes(), card.enc_public,
                                _context(ring.repo_id, card.user_id))
    store.put(name, sign_record(owner, "grant", name, wrapped))


def _open_grant(store: Store, identity: Identity, repo_id: str,
                trusted: bytes | list[bytes]) -> KeyRing:
    """The ring in ``identity``'s grant, if an owner (``trusted``: a key or the owner keys)
    signed it for this name."""
    grant_name = layout.grant_key(repo_id, identity.user_id)
    keys = [trusted] if isinstance(trusted, bytes) else trusted
    try:
        wrapped = open_record(store.get(grant_name), "grant", grant_name, keys)
        ring = KeyRing.from_bytes(unwrap_for_recipient(
            wrapped, identity.enc_private, _context(repo_id, identity.user_id)))
    except ObjectNotFound:
        raise AccessDenied(f"your grant for repository {repo_id!r} is missing from the "
                           "store: ask its owner to grant access again") from None
    except (FormatError, DecryptionError):
        raise AccessDenied(f"your grant for {repo_id!r} does not open with your "
                           "keys or is not signed by the owner") from None
    if ring.repo_id != repo_id:
        raise AccessDenied(f"your grant for {repo_id!r} holds another repository's keys")
    return ring


def _owner_keys(manifest: Manifest, owner_key: bytes) -> list[bytes]:
    """The keys that may sign for the repository: the owner's and its co-owners'."""
    return list(manifest.owner_keys(owner_key).values()) or [owner_key]


def _check_owner(owner: Identity, manifest: Manifest, owner_key: bytes) -> None:
    """``owner`` is the owner or a co-owner of the manifest, with the key listed there."""
    listed = manifest.owner_keys(owner_key).get(owner.user_id)
    if manifest.legacy:
        listed = owner_key
    if listed is None or not hmac.compare_digest(owner.sign_public, listed):
        raise AccessDenied(f"only the owner or a co-owner of {manifest.repo_id!r} can "
                           "change who has access")


def _check_upgraded(manifest: Manifest) -> None:
    if manifest.legacy:
        raise RadcryptError(
            f"repository {manifest.repo_id!r} has a manifest without a membership list: its "
            "owner must upgrade it first (radcrypt repo migrate)")


# --- use cases -----------------------------------------------------------------------------


def create_repository_as(session: Session, owner: Identity, name: str,
                         extractor: str = "radcrypt-v1",
                         basis_sample: np.ndarray | None = None, *,
                         bound_levels: str = "auto", storage_format: int = 2,
                         policy: str = "clinical", search: str = "sknn") -> Repository:
    """A new repository owned by ``owner``: signed manifest (sequence 1, the owner its only
    member), owner registered and granted. ``storage_format`` 2: packs and a segment log,
    whose genesis entry the owner writes right after the manifest. ``policy``: "clinical"
    or "research" (app/core/deid.py), in the signed manifest. ``search``: "sknn" or
    "workstation" (issue 19, app/core/workstation.py), in the signed manifest too."""
    store = session.store
    format_name = storage_format_name(storage_format)
    repo = new_repository(store, name, extractor, basis_sample, bound_levels=bound_levels,
                          policy=policy, search=search)
    repo_id, ring = repo.repo_id, repo.ring
    manifest = replace(repo.manifest, sequence=1, owner=owner.user_id, format=format_name,
                       members=(Member(owner.user_id, ring.current.version),))
    register_user(session, owner, owner.card().to_json())
    _write_grant(store, owner, ring, owner.card())
    try:
        _write_manifest(store, owner, manifest, create=True)
    except ObjectExists:
        raise RepositoryExists(f"a repository named {repo_id!r} already exists") from None
    _pin(session.settings, repo_id, owner.sign_public)
    _remember(session.settings, manifest)
    if is_format2(manifest):
        state = seglog.write_genesis(store, repo_id, owner, owner.user_id, manifest.sequence,
                                     manifest.key_version)
        remember_head(session.settings, repo_id, state.head)
    if manifest.search == "ckks":  # issue 19: the version's public evaluation keys, now
        from app.core.ckks_blocks import ensure_eval_keys

        ensure_eval_keys(store, Repository(manifest, ring, owner.sign_public),
                         ring.current.version)
    return Repository(manifest, ring, owner.sign_public)


def open_repository_as(session: Session, identity: Identity, name: str) -> Repository:
    """Unlock a repository with the user's grant: only for a member listed in the signed
    manifest at its current key version, after checking the owner's signatures."""
    manifest, owner_key = _signed_manifest(session, name)
    if manifest.legacy:
        raise AccessDenied(
            f"repository {manifest.repo_id!r} has no membership list yet: its owner must "
            "upgrade it (radcrypt repo migrate)")
    if not manifest.is_member(identity.user_id):
        raise AccessDenied(
            f"you have no access to repository {manifest.repo_id!r}: you are not a member "
            f"at its current key version {manifest.key_version} (never granted, or revoked)")
    ring = _open_grant(session.store, identity, manifest.repo_id,
                       _owner_keys(manifest, owner_key))
    if ring.current.version < manifest.key_version:
        raise AccessDenied(f"your grant for {manifest.repo_id!r} is outdated (key version "
                           f"{ring.current.version}, repository at {manifest.key_version})")
    return basis.load(session.store, Repository(manifest, ring, owner_key))


def grant_access(session: Session, owner: Identity, repo: Repository, user_id: str) -> None:
    """Wrap the ring to a registered user, then list them in the manifest (sequence + 1).

    The grant is written first: a failure in between leaves a grant that opens nothing
    (its user is not a member), and granting again finishes it.
    """
    manifest, owner_key = _signed_manifest(session, repo.repo_id)
    _check_owner(owner, manifest, owner_key)
    _check_upgraded(manifest)
    card = _user_card(session.store, user_id, _owner_keys(manifest, owner_key))
    if repo.ring.current.version < manifest.key_version:
        raise RadcryptError(
            f"repository {repo.repo_id!r} is now at key version {manifest.key_version} and "
            f"this session holds key version {repo.ring.current.version}: open it again")
    _write_grant(session.store, owner, repo.ring, card)
    if not manifest.is_member(user_id):
        others = [m for m in manifest.members if m.user_id != user_id]
        _publish(session, owner, with_members(
            manifest, [*others, Member(user_id, manifest.key_version)]))


def add_owner(session: Session, owner: Identity, repo: Repository, user_id: str) -> Manifest:
    """Make a member a co-owner (docs/FORMAT-2.md 2.4): the owner endorses the member's
    signing key (from the user record an owner signed) and publishes the manifest with
    ``owner_key`` and the co-owner listed (sequence + 1). Only the owner itself can, since
    the endorsement is the owner key's signature. The user must be a member at the current
    key version (grant access first). Adding a co-owner twice changes nothing.

    A co-owner may afterwards do what the owner does: sign the manifest, register users,
    grant, revoke, and write checkpoints and owner-only log entries, so that a lost owner
    workstation loses nothing. Removing a co-owner is not supported: its endorsement stays
    valid for as long as the owner key is the repository's root of trust.
    """
    manifest, owner_key = _signed_manifest(session, repo.repo_id)
    _check_upgraded(manifest)
    if owner.user_id != manifest.owner or not hmac.compare_digest(owner.sign_public,
                                                                  owner_key):
        raise AccessDenied(f"only the owner of {manifest.repo_id!r} ({manifest.owner}) can "
                           "add a co-owner")
    try:
        layout.validate_user_id(user_id)
    except ValueError as exc:
        raise RadcryptError(str(exc)) from None
    if user_id == owner.user_id:
        raise RadcryptError(f"{user_id} is already the owner of {manifest.repo_id!r}")
    if manifest.is_owner(user_id):
        return manifest
    if not manifest.is_member(user_id):
        raise RadcryptError(f"{user_id} is not a member of {manifest.repo_id!r} at its "
                            f"current key version {manifest.key_version}: grant access first "
                            "(radcrypt repo grant)")
    card = _user_card(session.store, user_id, _owner_keys(manifest, owner_key))
    endorsement = endorse_co_owner(owner, manifest.repo_id, user_id, card.sign_public)
    co_owners = sorted((*manifest.co_owners, CoOwner(user_id, card.sign_public, endorsement)),
                       key=lambda c: c.user_id)
    return _publish(session, owner, with_members(manifest, list(manifest.members),
                                                 owner_key=owner_key,
                                                 co_owners=tuple(co_owners)))


def list_access(session: Session, repo_id: str) -> AccessList:
    """The members of the signed manifest, each with its owner-signed user record and
    grant checked. Anything else under grants/ (not a member, or not signed by this owner)
    is ignored, logged as a warning and named in the result's ``ignored``."""
    manifest, owner_key = _signed_manifest(session, repo_id)
    store = session.store
    prefix = layout.grants_prefix(manifest.repo_id)
    members = {m.user_id for m in manifest.members}
    trusted = _owner_keys(manifest, owner_key)
    ignored: list[str] = []
    for key in store.list_keys(prefix):
        found = key[len(prefix):]
        if found not in members:
            ignored.append(found)
            log.warning("ignoring grants/%r of repository %r: not a member of its signed "
                        "manifest", found, manifest.repo_id)
    entries = []
    for member in manifest.members:
        status = "ok"
        try:
            name = _user_card(store, member.user_id, trusted).name
        except RadcryptError as exc:
            name, status = "(unregistered)", str(exc)
        try:
            grant_name = layout.grant_key(manifest.repo_id, member.user_id)
            open_record(store.get(grant_name), "grant", grant_name, trusted)
        except ObjectNotFound:
            status = "no grant in the store"
        except (FormatError, ValueError):
            status = "the grant is not signed by the owner"
            ignored.append(member.user_id)
            log.warning("ignoring grants/%r of repository %r: not signed by its owner",
                        member.user_id, manifest.repo_id)
        if member.key_version != manifest.key_version:
            status = f"listed at key version {member.key_version}, not the current one"
        entries.append(AccessEntry(member.user_id, name, member.key_version, status))
    return AccessList(sorted(entries, key=lambda e: e.user_id), ignored)


def revoke_access(session: Session, owner: Identity, repo: Repository, user_id: str,
                  progress: ProgressCallback = no_progress) -> Repository:
    """Remove a user and rotate to a new key version, resumably (module docstring).
    ``progress``: "revoke" events, images re-sealed of those to do. A format-1
    repository is read-only: it is refused before anything is written."""
    store = session.store
    manifest, owner_key = _signed_manifest(session, repo.repo_id)
    _check_owner(owner, manifest, owner_key)
    _check_upgraded(manifest)
    if not is_format2(manifest):
        raise RadcryptError(
            f"repository {manifest.repo_id} is in storage format 1 (read-only); run "
            "radcrypt repo migrate --format 2 first")
    if user_id == owner.user_id:
        raise RadcryptError("the owner cannot revoke their own access")
    if manifest.is_owner(user_id):
        raise RadcryptError(f"{user_id} is an owner or co-owner of {manifest.repo_id!r}: "
                            "removing a co-owner is not supported (docs/FORMAT-2.md 2.4)")
    try:
        layout.validate_user_id(user_id)
    except ValueError as exc:
        raise RadcryptError(str(exc)) from None
    ring = _owner_ring(store, owner, owner_key, manifest, repo)
    pending = ring.current.version > manifest.key_version
    grant_name = layout.grant_key(manifest.repo_id, user_id)
    listed = manifest.member_version(user_id) is not None
    if not listed and not store.exists(grant_name) and not store.exists(
            layout.user_key(user_id)):
        raise RadcryptError(f"user {user_id!r} is not registered and not a member of "
                            f"{manifest.repo_id!r}")
    # A user who is not (or no longer) a member: what is left of a revocation is finished.
    if pending:  # an earlier run's rotation: finish it for the members as listed now
        manifest = _finish_rotation(session, owner, owner_key, manifest, ring, user_id,
                                    progress)
    if manifest.member_version(user_id) is not None:
        state, _ = _owner_log(session, manifest, ring, owner_key, user_id, pending=False)
        ring = _start_rotation(session, owner, owner_key, manifest, ring, state)
        manifest = _publish(session, owner, with_members(
            manifest, [m for m in manifest.members if m.user_id != user_id]))
        manifest = _finish_rotation(session, owner, owner_key, manifest, ring, user_id,
                                    progress)
    elif manifest.co_owners and not pending and store.exists(grant_name):
        # Another owner's revocation of this user may have stopped between removing them
        # and committing the new key version: its pending ring is in that owner's grant,
        # which this owner cannot open. Rotate once more (at worst one rotation too many).
        state, _ = _owner_log(session, manifest, ring, owner_key, user_id, pending=True)
        ring = _start_rotation(session, owner, owner_key, manifest, ring, state)
        manifest = _finish_rotation(session, owner, owner_key, manifest, ring, user_id,
                                    progress)
    if store.exists(grant_name):
        store.delete(grant_name)
    _retire_old_versions(session, owner, owner_key, manifest, ring, user_id, progress)
    return basis.load(store, Repository(manifest, ring, owner_key))


def _owner_ring(store: Store, owner: Identity, owner_key: bytes, manifest: Manifest,
                repo: Repository) -> KeyRing:
    """The owner's ring: from the owner's grant (which holds a rotation in progress), or
    the session's when that grant is gone; it must hold the manifest's version."""
    try:
        ring = _open_grant(store, owner, manifest.repo_id, _owner_keys(manifest, owner_key))
    except AccessDenied:
        ring = repo.ring
    if ring.current.version < repo.ring.current.version:
        ring = repo.ring
    if not manifest.key_version <= ring.current.version <= manifest.key_version + 1:
        raise RadcryptError(
            f"the owner's keys of {manifest.repo_id!r} are at key version "
            f"{ring.current.version} and its manifest at {manifest.key_version}: open the "
            "repository again before changing who has access")
    return ring


# --- format 2: the segment log during a revocation (FORMAT-2 7.3) --------------------------------


@dataclass
class _RevocationTrust(logstate.RepositoryTrust):
    """The manifest's members, plus the user being revoked: only to read the log of a
    rotation interrupted before the checkpoint at its ``membership`` entry, whose entries
    by that user (written while still a member) no checkpoint covers yet. Which of them
    are acceptable is checked by _owner_log afterwards."""

    revoked: str = ""

    def signer_key(self, user_id: str) -> bytes | None:
        if user_id == self.revoked and self.manifest.member_version(user_id) is None:
            with self._lock:
                if user_id not in self._keys:
                    self._keys[user_id] = logstate.member_key(self.store, user_id,
                                                              self.owner_keys)
                return self._keys[user_id]
        return super().signer_key(user_id)


def _owner_log(session: Session, manifest: Manifest, ring: KeyRing, owner_key: bytes,
               revoked: str, *, pending: bool
               ) -> tuple[seglog.LogState, logstate.RepositoryTrust]:
    """The log verified by the owner under ``manifest``, and the trust that verified it.

    The manifest without the revoked user is published before the ``membership`` entry
    and its checkpoint (FORMAT-2 7.3): in between, the user's own entries after the latest
    checkpoint fail the membership rule. Only while the rotation is pending (the manifest
    still at the old key version) the log is then read with that user trusted too, and
    each of their entries after the latest checkpoint must name a manifest sequence below
    the first manifest without them (the first ``membership`` entry after that checkpoint,
    or the manifest now): an entry they wrote after their removal is refused.
    """
    store, settings = session.store, session.settings
    repo = Repository(manifest, ring, owner_key)
    trust = logstate.RepositoryTrust(store, manifest, owner_key)
    try:
        return logstate.verified_log(store, settings, repo, trust=trust), trust
    except IntegrityError:
        if not pending or manifest.member_version(revoked) is not None:
            raise
    trust = _RevocationTrust(store, manifest, owner_key, revoked=revoked)
    state = logstate.verified_log(store, settings, repo, trust=trust)
    entries = [_log_entry(store, state, n)
               for n in range(state.start + 1, state.head.sequence + 1)]
    first = next((e for e in entries if e.kind == seglog.KIND_MEMBERSHIP), None)
    limit = first.manifest_sequence if first is not None else manifest.sequence
    for entry in entries:
        if entry.writer == revoked and entry.manifest_sequence >= limit:
            raise IntegrityError(
                f"the segment log of repository {manifest.repo_id!r} has entry "
                f"{entry.sequence} by {revoked}, written after their removal (manifest "
                f"sequence {entry.manifest_sequence}): refusing to go on")
    return state, trust


def _log_entry(store: Store, state: seglog.LogState, sequence: int) -> seglog.LogEntry:
    """Entry ``sequence`` of a verified log, read again and checked against its hash."""
    return compaction.read_entry(store, state, sequence)


def _membership_checkpoint(session: Session, owner: Identity, owner_key: bytes,
                           manifest: Manifest, ring: KeyRing, revoked: str, *,
                           pending: bool) -> seglog.LogState:
    """Draft 7.3: the owner's ``membership`` entry naming ``manifest`` and a checkpoint at
    it, each written unless already there (a re-run). From the checkpoint on, the log is
    verified with the members of ``manifest`` only: the revoked user's entries all lie at
    or below it. Returns the log verified that way."""
    store, settings = session.store, session.settings
    repo_id = manifest.repo_id
    state, trust = _owner_log(session, manifest, ring, owner_key, revoked, pending=pending)
    found = None
    for n in range(state.head.sequence, state.start - 1, -1):
        entry = _log_entry(store, state, n)
        if entry.kind == seglog.KIND_MEMBERSHIP and entry.manifest_sequence == \
                manifest.sequence:
            found = n
            break
        if entry.manifest_sequence < manifest.sequence:
            break  # manifest sequences never decrease along the log
    if found is None:
        state = _append(session, owner, trust, state, kind=seglog.KIND_MEMBERSHIP,
                        key_version=manifest.key_version)
        found = state.head.sequence
    if state.head.checkpoint is not None and state.head.checkpoint >= found:
        return state
    at = state
    if found != state.head.sequence:  # entries followed the membership entry: its live set
        at = seglog.LogState(repo_id, seglog.LogHead(found, state.hashes[found], None),
                             {(o.type, o.id): o for o in state.objects_at(found)},
                             {found: state.hashes[found]})
    try:
        seglog.write_checkpoint(store, repo_id, owner, at, manifest.sequence)
    except seglog.LogError as exc:
        raise IntegrityError(f"repository {repo_id!r}: {exc}") from None
    repo = Repository(manifest, ring, owner_key)
    return logstate.verified_log(store, settings, repo)  # the members only, from here


def _append(session: Session, owner: Identity, trust: logstate.RepositoryTrust,
            state: seglog.LogState, *, kind: int, key_version: int,
            added: list[seglog.Added] | None = None,
            removed: list[seglog.Removed] | None = None) -> seglog.LogState:
    """One owner-signed entry, reason revocation (create-if-absent, FORMAT-2 5.3)."""
    try:
        state = seglog.append(session.store, state.repo_id, owner, owner.user_id, trust,
                              state, kind=kind, reason=seglog.REASON_REVOCATION,
                              key_version=key_version, added=added or [],
                              removed=removed or [])
    except (seglog.LogError, FormatError) as exc:
        raise IntegrityError(f"repository {state.repo_id!r}: the segment log refused the "
                             f"revocation's entry: {exc}") from None
    logstate.remember_head(session.settings, state.repo_id, state.head)
    return state


def _start_rotation(session: Session, owner: Identity, owner_key: bytes, manifest: Manifest,
                    ring: KeyRing, state: seglog.LogState) -> KeyRing:
    """A new key version, its basis refitted on the repository's own features (the
    feature arrays of live packs, newest key version first, one entry read per pack),
    stored in the owner's grant before anything depends on it."""
    reader = ImageReader(session.store, Repository(manifest, ring, owner_key), state)
    rows: list[np.ndarray] = []
    for obj in sorted(state.packs(), key=lambda o: (-o.key_version, o.id)):
        if len(rows) >= BASIS_SAMPLE:
            break
        if obj.key_version <= manifest.key_version:
            rows.extend(reader.features_of_pack(obj.id)[1])
    sample = np.array(rows[:BASIS_SAMPLE]) if rows else np.empty((0, manifest.dim))
    rotated = ring.rotated(basis.rotation_index_key(manifest, sample))
    _write_grant(session.store, owner, rotated, owner.card())
    return rotated


def _finish_rotation(session: Session, owner: Identity, owner_key: bytes, manifest: Manifest,
                     ring: KeyRing, revoked: str,
                     progress: ProgressCallback = no_progress) -> Manifest:
    """Membership entry and checkpoint, the pending version wrapped to the manifest's
    members, every image re-sealed under it, then the manifest at that version (the
    commit point) followed by its own membership entry and checkpoint."""
    store, version = session.store, ring.current.version
    state = _membership_checkpoint(session, owner, owner_key, manifest, ring, revoked,
                                   pending=True)
    for member in manifest.members:
        if member.user_id == owner.user_id:
            continue
        try:
            card = _user_card(store, member.user_id, _owner_keys(manifest, owner_key))
        except RadcryptError as exc:  # they can be granted again once the record is fixed
            log.warning("not wrapping key version %d of %r to member %r: %s", version,
                        manifest.repo_id, member.user_id, exc)
            continue
        _write_grant(store, owner, ring, card)
    _reseal(session, owner, owner_key, manifest, ring, state, version, progress)
    members = [Member(m.user_id, version) for m in manifest.members]
    manifest = _publish(session, owner, with_members(manifest, members, key_version=version))
    _membership_checkpoint(session, owner, owner_key, manifest, ring, revoked, pending=False)
    return manifest


def _reseal(session: Session, owner: Identity, owner_key: bytes, manifest: Manifest,
            ring: KeyRing, state: seglog.LogState, version: int,
            progress: ProgressCallback = no_progress) -> seglog.LogState:
    """Draft 7.3 step 5: every image in a live pack of a version below ``version`` and in
    no live pack of ``version`` gets a copy under ``version``. The old packs are read one
    GET each, newest version first; their images are gathered into new packs of at most
    RESEAL_IMAGES images and compaction.PACK_BYTES bytes (meta, preview and feature rows
    re-sealed), each with one new segment encrypted from the same feature rows, and each
    pair committed by one owner-signed ``add`` entry (reason revocation). The old objects
    stay live, so a member still at the old version searches complete sets meanwhile.
    A re-run finds the images already copied in the live packs of ``version``."""
    store, repo_id = session.store, manifest.repo_id
    repo = Repository(manifest, ring, owner_key)
    done: set[str] = set()
    for obj in state.packs(version):
        done.update(read_toc(store, repo, obj.id, None, obj.sha256).image_ids())
    old = sorted((o for o in state.packs() if o.key_version < version),
                 key=lambda o: (-o.key_version, o.id))
    todo = {image_id for obj in old
            for image_id in read_toc(store, repo, obj.id, None, obj.sha256).image_ids()}
    total, progressed = len(todo - done), 0  # "revoke" events: committed of those to do
    images: list[tuple[str, bytes, bytes]] = []
    rows: list[np.ndarray] = []
    size = 0

    def commit() -> seglog.LogState:
        nonlocal progressed
        committed = _commit_copies(session, owner, repo, state, version, images, rows)
        for image_id, _, _ in images:
            progressed += 1
            progress(ProgressEvent("revoke", progressed, total, item=image_id))
        return committed

    for obj in old:
        blob = compaction.fetch_checked(store, repo_id, obj)
        try:
            toc, entries = pack_format.open_pack(ring.version(obj.key_version).data_key,
                                                 repo_id, obj.id, blob)
            ids = toc.image_ids()
            features = pack_format.decode_features(
                entries[(pack_format.KIND_FEATURES, obj.id)], ids)
        except (FormatError, DecryptionError, KeyError) as exc:
            raise IntegrityError(f"pack {obj.id} of repository {repo_id!r} does not open "
                                 f"({exc}): the revocation stopped before the new key "
                                 "version was published") from None
        chosen = [k for k, image_id in enumerate(ids) if image_id not in done]
        grows = sum(len(entries[(pack_format.KIND_META, ids[k])])
                    + len(entries[(pack_format.KIND_THUMBS, ids[k])]) for k in chosen)
        if images and (len(images) + len(chosen) > RESEAL_IMAGES
                       or size + grows > compaction.PACK_BYTES):
            state = commit()
            images, rows, size = [], [], 0
        for k in chosen:
            image_id = ids[k]
            images.append((image_id, entries[(pack_format.KIND_META, image_id)],
                           entries[(pack_format.KIND_THUMBS, image_id)]))
            rows.append(features[k])
            done.add(image_id)
        size += grows
    if images:
        state = commit()
    return state


def _commit_copies(session: Session, owner: Identity, repo: Repository,
                   state: seglog.LogState, version: int,
                   images: list[tuple[str, bytes, bytes]], rows: list[np.ndarray]
                   ) -> seglog.LogState:
    """One new pack and one new segment of ``version`` holding ``images``, then their
    ``add`` entry (the objects first, create-if-absent: a failure before the entry leaves
    unreferenced objects, which a re-run does not reuse)."""
    store, manifest = session.store, repo.manifest
    ids = [image_id for image_id, _, _ in images]
    batch = np.asarray(rows, dtype=np.float64)
    keys = basis.ensure_version(store, repo.repo_id, manifest.levels, manifest.dim,
                                repo.ring.version(version), batch,
                                has_segments=functools.partial(_has_segments, state))
    from app.core.workstation_index import segment_vectors  # issue 19: by search mode

    vectors = segment_vectors(manifest, keys, batch, basis.norm_bound(manifest))
    pack_id, pack_blob = compaction.build_pack(repo, version, images, batch)
    seg_id, seg_blob = compaction.build_segment(repo, owner, version, state.head.sequence,
                                                ids, vectors,
                                                keywords=keyword_dicts.keywords_by_id(images),
                                                features=batch, store=store)  # issue 19: ckks
    # Issue 17: the images' labels under the old versions, as a label of the new one
    carried = labels.carry_to_version(store, repo, state, version, seg_id, ids)
    store.put(layout.pack_key(repo.repo_id, pack_id), pack_blob, if_absent=True)
    store.put(layout.segment_key(repo.repo_id, seg_id), seg_blob, if_absent=True)
    for item, blob in carried:
        store.put(layout.label_key(repo.repo_id, item.id), blob, if_absent=True)
    trust = logstate.repository_trust(store, repo)
    return _append(session, owner, trust, state, kind=seglog.KIND_ADD, key_version=version,
                   added=[compaction.added(seglog.TYPE_SEGMENT, seg_id, seg_blob, len(ids)),
                          compaction.added(seglog.TYPE_PACK, pack_id, pack_blob, len(ids)),
                          *(item for item, _ in carried)])


def _has_segments(state: seglog.LogState, version: int) -> bool:
    return bool(state.segments(version))


def _retire_old_versions(session: Session, owner: Identity, owner_key: bytes,
                         manifest: Manifest, ring: KeyRing, revoked: str,
                         progress: ProgressCallback = no_progress) -> None:
    """Draft 7.3 step 8: re-seal what was committed meanwhile under an old version (a
    client that had not seen the rotation), then one ``remove`` entry naming every live
    object below the current version, then delete them at once: the revoked user held
    their keys, so no grace period applies to them (FORMAT-2 7.4 keeps it for the others)."""
    version = manifest.key_version
    state = _membership_checkpoint(session, owner, owner_key, manifest, ring, revoked,
                                   pending=False)
    state = _reseal(session, owner, owner_key, manifest, ring, state, version, progress)
    old = sorted((o for o in state.live.values() if o.key_version < version),
                 key=lambda o: (o.type, o.id))
    if old:
        trust = logstate.repository_trust(session.store, Repository(manifest, ring, owner_key))
        state = _append(session, owner, trust, state, kind=seglog.KIND_REMOVE,
                        key_version=version,
                        removed=[seglog.Removed(o.type, o.id) for o in old])
    compaction.delete_replaced(session.store, state, compaction.GRACE_SECONDS,
                               at_once={seglog.REASON_REVOCATION})


def migrate_password_repository(session: Session, owner: Identity, name: str,
                                password: str | None = None) -> Repository:
    """Give a repository from before memberships an owner-signed manifest with a
    membership list (sequence 1, the owner its only member).

    A password-locked repository (before identities) needs its ``password``. A signed
    manifest without members needs none: only its signer can upgrade it, and nobody else
    is carried over (the names under grants/ prove nothing), so the owner grants the
    others again; their names are logged. A repository already upgraded is opened as is.
    """
    store = session.store
    read_manifest(store, name)  # a repository by that name, with a readable manifest
    try:
        signed = json_signer(store.get(layout.manifest_key(name)))
    except FormatError:
        raise RadcryptError(f"the signed manifest of {name!r} is damaged") from None
    if signed is not None:
        manifest, owner_key = _signed_manifest(session, name)
        _check_owner(owner, manifest, owner_key)
        ring = _open_grant(store, owner, manifest.repo_id, [owner_key])
        if not manifest.legacy:
            return basis.load(store, Repository(manifest, ring, owner_key))
        prefix = layout.grants_prefix(manifest.repo_id)
        others = [k[len(prefix):] for k in store.list_keys(prefix)
                  if k[len(prefix):] != owner.user_id]
        if others:
            log.warning("repository %r upgraded with its owner as the only member: grant "
                        "access again to %s", manifest.repo_id, ", ".join(map(repr, others)))
    else:
        if not password:
            raise RadcryptError(f"repository {name!r} is locked by a password: migrating it "
                                "needs that password")
        old = open_repository(store, name, password)
        manifest, ring = old.manifest, old.ring
        register_user(session, owner, owner.card().to_json())
        _write_grant(store, owner, ring, owner.card())
    upgraded = replace(manifest, sequence=1, owner=owner.user_id,
                       members=(Member(owner.user_id, manifest.key_version),))
    _write_manifest(store, owner, upgraded)
    store.delete(layout.grant_key(upgraded.repo_id, PASSWORD_OWNER))
    _pin(session.settings, upgraded.repo_id, owner.sign_public)
    _remember(session.settings, upgraded)
    return basis.load(store, Repository(upgraded, ring, owner.sign_public))
