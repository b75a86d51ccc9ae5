"""Repositories: create, list, open (unlock) — the keys never leave this machine in clear.

A repository is a manifest (public parameters, plain JSON) and a key ring wrapped for
each member's identity (app/core/access.py). Repositories made before identities existed
kept the owner's copy of the ring wrapped under the owner's password with scrypt, as the
grant of the pseudo-user ``password-owner``; ``open_repository`` reads that grant only so
that ``radcrypt repo migrate`` can move such a repository to its owner's identity.

The manifest of a repository with an owner is signed by the owner (app/core/access.py)
and carries who may open it: ``members`` (user id and key version), the ``owner``'s user
id and a ``sequence`` number the owner raises by one at every write, so a client can
refuse an older manifest (rollback). A manifest without these fields is a legacy one: it
has no members, and only the owner's ``radcrypt repo migrate`` upgrades it.

Co-owners (docs/FORMAT-2.md 2.4). So that losing the owner's workstation loses nothing,
the owner can make members co-owners: ``owner_key`` (the owner's Ed25519 key) and
``co_owners`` (user id, Ed25519 key and the owner's endorsement of both, per co-owner)
are then in the manifest, and any of these keys may sign the manifest, grants, user
records, checkpoints and owner-only log entries. Clients keep pinning the owner's key:
a co-owner's signature counts because the owner's endorsement of it is in the manifest
(crypto.identity.manifest_owners). A manifest without co-owners has neither field and
its bytes are unchanged.

Search mode (issue 19, docs/WORKSTATION.md). The manifest's ``search`` field says where a
repository is searched: "sknn" (the default: secure-kNN ciphertexts in segments, searched
by the keyless service), "workstation" (segments carry image ids only; each member's
client syncs the packs' AES-encrypted feature arrays into a local cache and searches in
plaintext on the workstation, app/core/workstation.py) or "ckks" (segments carry image ids
and a CKKS block each, app/core/ckks_blocks.py; the service computes encrypted scores, the
client decrypts and re-scores exactly, app/core/ckks_search.py). Written
only when not "sknn", so that every older manifest keeps its bytes and reads as sknn; it
is inside the owner-signed payload like every other field, so the cloud cannot switch a
repository's mode.
"""

from __future__ import annotations

import base64
import hmac
import json
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np

from app.core.errors import AccessDenied, RadcryptError, RepositoryExists, RepositoryNotFound
from app.imaging.features import FEATURE_DIM, get_extractor
from cloud import layout
from cloud.backend import ObjectNotFound, Store
from crypto.errors import FormatError
from crypto.identity import manifest_owners
from crypto.index import IndexKey, default_levels
from crypto.keys import (
    KeyRing,
    VersionKeys,
    WrongPassword,
    unwrap_with_password,
)
from crypto.signed import json_signer, open_json

MANIFEST_FORMAT = "radcrypt-manifest-v1"
# Storage format 2 (docs/FORMAT-2.md): packs, authenticated segments, segment log.
# The default of every new repository; format 1 is read-only (import, compaction and
# revocation refuse: format1_read_only), only `radcrypt repo migrate --format 2` writes it.
MANIFEST_FORMAT_V2 = "radcrypt-manifest-v2"
MANIFEST_FORMATS = (MANIFEST_FORMAT, MANIFEST_FORMAT_V2)
STORAGE_FORMATS = {1: MANIFEST_FORMAT, 2: MANIFEST_FORMAT_V2}
SCHEME = "aspe-split-v1+aes-256-gcm-stream-v1"
PASSWORD_OWNER = "password-owner"
BOUND_LEVELS = ("auto", "off")  # the repository option (radcrypt repo create --bound-levels)
# Search modes (issue 19): the manifest's ``search`` field; every one is built.
SKNN, WORKSTATION, CKKS = "sknn", "workstation", "ckks"
SEARCH_MODES = (SKNN, WORKSTATION, CKKS)
SEARCH_BUILT = (SKNN, WORKSTATION, CKKS)


@dataclass(frozen=True)
class Member:
    """A user who may open the repository, and the key version their grant holds."""

    user_id: str
    key_version: int


@dataclass(frozen=True)
class CoOwner:
    """A member who may sign for the repository like its owner (the owner endorsed it)."""

    user_id: str
    sign_public: bytes
    endorsement: bytes


@dataclass(frozen=True)
class Manifest:
    """Public parameters of a repository and its membership; nothing in it is secret.

    ``sequence`` 0 marks a legacy manifest (written before memberships): it has no owner
    and no members, and its JSON has none of the three fields.
    """

    repo_id: str
    extractor: str
    dim: int
    levels: list[int]
    key_version: int
    created: str
    scheme: str = SCHEME
    format: str = MANIFEST_FORMAT
    sequence: int = 0
    owner: str = ""
    members: tuple[Member, ...] = ()
    owner_key: bytes = b""  # the owner's key, written only with co-owners
    co_owners: tuple[CoOwner, ...] = ()
    # Issue 16: while True, erasure is refused (app/core/erasure.py); only an owner signs
    # the manifest, so only an owner sets or lifts it. Written only when True, so that a
    # manifest without a hold keeps the bytes of docs/FORMAT-2.md 2.3.
    legal_hold: bool = False
    # Issue 16: "clinical" (the original is stored, encrypted) or "research" (a copy
    # de-identified by app/core/deid.py). Written only when "research", so that a clinical
    # manifest keeps its bytes and an older manifest reads as clinical.
    policy: str = "clinical"
    # Issue 19: where the repository is searched (SEARCH_MODES). Written only when not
    # "sknn", so that an sknn manifest keeps its bytes and an older manifest reads as sknn.
    search: str = SKNN

    @property
    def legacy(self) -> bool:
        return self.sequence == 0

    def is_owner(self, user_id: str) -> bool:
        """The owner or a co-owner: may sign what only owners sign."""
        return user_id == self.owner or any(c.user_id == user_id for c in self.co_owners)

    def owner_keys(self, root: bytes) -> dict[str, bytes]:
        """User id -> signing key of the owner (``root``, the pinned key) and co-owners."""
        keys = {self.owner: root} if self.owner else {}
        keys.update((c.user_id, c.sign_public) for c in self.co_owners)
        return keys

    def member_version(self, user_id: str) -> int | None:
        """The key version ``user_id`` is listed with, or None for a non-member."""
        for member in self.members:
            if member.user_id == user_id:
                return member.key_version
        return None

    def is_member(self, user_id: str) -> bool:
        """Listed, at the current key version: the only users who may open it."""
        return self.member_version(user_id) == self.key_version

    def to_json(self) -> bytes:
        raw = asdict(self)
        del raw["owner_key"], raw["co_owners"], raw["legal_hold"], raw["policy"]
        del raw["search"]
        if self.search != SKNN:
            raw["search"] = self.search
        if self.legal_hold:
            raw["legal_hold"] = True
        if self.policy != "clinical":
            raw["policy"] = self.policy
        if self.co_owners:
            raw["owner_key"] = base64.b64encode(self.owner_key).decode()
            raw["co_owners"] = [{"user_id": c.user_id,
                                 "ed25519": base64.b64encode(c.sign_public).decode(),
                                 "endorsement": base64.b64encode(c.endorsement).decode()}
                                for c in self.co_owners]
        if self.legacy:
            for name in ("sequence", "owner", "members"):
                del raw[name]
        else:
            raw["members"] = [{"user_id": m.user_id, "key_version": m.key_version}
                              for m in self.members]
        return json.dumps(raw, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RadcryptError(f"{where}: not valid JSON ({exc})") from None
        except (ValueError, RecursionError):  # found by tests/fuzz/test_file_fuzz.py
            raise RadcryptError(f"{where}: not valid JSON (a number too long or nesting "
                                "too deep)") from None
        if not isinstance(raw, dict):
            raise RadcryptError(f"{where}: expected a JSON object")
        if raw.get("format") not in MANIFEST_FORMATS:
            raise RadcryptError(f"{where}: field 'format' must be {MANIFEST_FORMAT!r} or "
                                f"{MANIFEST_FORMAT_V2!r}")
        expected: dict[str, Any] = {"repo_id": str, "extractor": str, "dim": int,
                                    "levels": list, "key_version": int, "created": str,
                                    "scheme": str}
        for name, kind in expected.items():
            if not isinstance(raw.get(name), kind):
                raise RadcryptError(f"{where}: field {name!r} is missing or not a {kind.__name__}")
        fields = {k: raw[k] for k in (*expected, "format")}
        if any(name in raw for name in ("sequence", "owner", "members")):
            fields.update(_membership(raw, where))
        if "legal_hold" in raw:
            if not isinstance(raw["legal_hold"], bool) or "sequence" not in fields:
                raise RadcryptError(f"{where}: field 'legal_hold' must be true or false, in a "
                                    "manifest with a membership list")
            fields["legal_hold"] = raw["legal_hold"]
        if "policy" in raw:
            if raw["policy"] not in ("clinical", "research") or "sequence" not in fields:
                raise RadcryptError(f"{where}: field 'policy' must be 'clinical' or "
                                    "'research', in a manifest with a membership list")
            fields["policy"] = raw["policy"]
        if "search" in raw:
            if raw["search"] not in SEARCH_MODES or "sequence" not in fields:
                raise RadcryptError(f"{where}: field 'search' must be one of "
                                    f"{', '.join(repr(m) for m in SEARCH_MODES)}, in a "
                                    "manifest with a membership list")
            fields["search"] = raw["search"]
        return cls(**fields)


def _membership(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The checked ``sequence``, ``owner`` and ``members`` fields of a manifest."""
    sequence, owner, members = raw.get("sequence"), raw.get("owner"), raw.get("members")
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 1:
        raise RadcryptError(f"{where}: field 'sequence' must be an integer >= 1")
    if not isinstance(owner, str) or not owner:
        raise RadcryptError(f"{where}: field 'owner' must be a user id")
    if not isinstance(members, list):
        raise RadcryptError(f"{where}: field 'members' must be a list")
    listed: list[Member] = []
    for entry in members:
        if (not isinstance(entry, dict) or set(entry) != {"user_id", "key_version"}
                or not isinstance(entry["user_id"], str) or not entry["user_id"]
                or not _is_int(entry["key_version"]) or entry["key_version"] < 1):
            raise RadcryptError(f"{where}: field 'members' must hold objects "
                                "{\"user_id\": text, \"key_version\": integer >= 1}")
        listed.append(Member(entry["user_id"], entry["key_version"]))
    ids = [m.user_id for m in listed]
    if ids != sorted(set(ids)):
        raise RadcryptError(f"{where}: field 'members' must be sorted by user_id, without "
                            "duplicates")
    if owner not in ids:
        raise RadcryptError(f"{where}: the owner {owner!r} is not in field 'members'")
    fields: dict[str, Any] = {"sequence": sequence, "owner": owner, "members": tuple(listed)}
    if "co_owners" in raw or "owner_key" in raw:
        fields.update(_co_owners(raw, where, set(ids)))
    return fields


def _co_owners(raw: dict[str, Any], where: str, members: set[str]) -> dict[str, Any]:
    """The ``owner_key`` and ``co_owners`` fields, their shape checked (the endorsements
    are checked with the signature, in read_signed_manifest)."""
    try:
        owner_key = base64.b64decode(str(raw.get("owner_key")), validate=True)
        listed = raw["co_owners"]
        co = tuple(CoOwner(str(e["user_id"]),
                           base64.b64decode(str(e["ed25519"]), validate=True),
                           base64.b64decode(str(e["endorsement"]), validate=True))
                   for e in listed)
    except (KeyError, TypeError, ValueError):
        raise RadcryptError(f"{where}: fields 'owner_key' and 'co_owners' must be base64 "
                            "and a list of {\"user_id\", \"ed25519\", \"endorsement\"}"
                            ) from None
    if len(owner_key) != 32 or not co or any(len(c.sign_public) != 32
                                             or len(c.endorsement) != 64 for c in co):
        raise RadcryptError(f"{where}: field 'owner_key' or 'co_owners' holds a key or "
                            "endorsement of the wrong length, or 'co_owners' is empty")
    missing = [c.user_id for c in co if c.user_id not in members]
    if missing:
        raise RadcryptError(f"{where}: co-owner(s) {missing} are not in field 'members'")
    return {"owner_key": owner_key, "co_owners": co}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_format2(manifest: Manifest) -> bool:
    """Whether the repository is in storage format 2 (packs, segment log)."""
    return manifest.format == MANIFEST_FORMAT_V2


def storage_format(manifest: Manifest) -> int:
    """The storage format number (1 or 2) of a manifest."""
    return 2 if is_format2(manifest) else 1


def format1_read_only(repo_id: str) -> str:
    """The refusal of every write to a format-1 repository but its migration (FORMAT-2 9.1)."""
    return (f"repository {repo_id} is in storage format 1 (read-only); run radcrypt repo "
            "migrate --format 2")


def storage_format_name(storage_format: int) -> str:
    """The manifest ``format`` value of a storage format number (1 or 2)."""
    try:
        return STORAGE_FORMATS[storage_format]
    except KeyError:
        raise RadcryptError(f"storage format must be 1 or 2, not {storage_format!r}") from None


def _ckks_ready() -> bool:
    """Whether cloud/segments.py writes CKKS block sections (FLAG_CKKS, issue 19): until
    it does, the ckks mode is refused as not built (the tree stays consistent)."""
    import inspect

    from cloud.segments import encode_segment_v2

    return "ckks" in inspect.signature(encode_segment_v2).parameters


def built_modes() -> tuple[str, ...]:
    """The search modes a new repository may be created in."""
    return SEARCH_BUILT if _ckks_ready() else (SKNN, WORKSTATION)


def search_not_built(mode: str) -> str:
    """The plain refusal of a search mode this version does not build (issue 19), or, for
    a built mode, of a search asked of the wrong side (the workstation's local search for a
    repository the service searches)."""
    if mode in built_modes():
        return (f"the repository is in search mode {mode!r}, which is not searched here: "
                "'sknn' and 'ckks' repositories are searched by the search service, "
                "'workstation' ones on this workstation")
    return (f"search mode {mode!r} is not built yet: choose 'sknn' (the default, searched "
            "by the service on secure-kNN ciphertexts), 'workstation' (searched on this "
            "workstation from a local encrypted copy of the feature arrays) or 'ckks' "
            "(encrypted scores computed by the service under homomorphic encryption)")


def check_search_mode(mode: str) -> str:
    """``mode`` if a new repository may be created in it, else RadcryptError in words."""
    if mode not in SEARCH_MODES:
        raise RadcryptError(f"search mode must be one of {', '.join(built_modes())}, not "
                            f"{mode!r}")
    if mode not in built_modes():
        raise RadcryptError(search_not_built(mode))
    return mode


def search_mode(manifest: Manifest) -> str:
    """Where the repository is searched: "sknn", "workstation" or "ckks" (issue 19)."""
    return manifest.search


def with_members(manifest: Manifest, members: list[Member], **changes: Any) -> Manifest:
    """The next manifest: ``sequence`` + 1, the members sorted by user id."""
    ordered = tuple(sorted(members, key=lambda m: m.user_id))
    return replace(manifest, sequence=manifest.sequence + 1, members=ordered, **changes)


@dataclass(frozen=True, eq=False)
class Repository:
    """An unlocked repository: its manifest and its key ring (in memory only)."""

    manifest: Manifest
    ring: KeyRing
    owner_key: bytes | None = field(default=None, repr=False)  # who signed the manifest

    @property
    def repo_id(self) -> str:
        return self.manifest.repo_id

    @property
    def keys(self) -> VersionKeys:
        return self.ring.current

    @property
    def pseudonym_key(self) -> bytes:
        """The research policy's pseudonym key (app/core/deid.py): derived from the ring's
        first data key, which every rotation keeps, so pseudonyms stay stable."""
        from app.core.deid import pseudonym_key

        return pseudonym_key(self.ring.versions[0].data_key)


def manifest_levels(dim: int, bound_levels: str = "auto") -> list[int]:
    """The levels a new repository's manifest announces: [] when switched off."""
    if bound_levels not in BOUND_LEVELS:
        raise RadcryptError(f"bound levels must be one of {', '.join(BOUND_LEVELS)}, "
                            f"not {bound_levels!r}")
    return [] if bound_levels == "off" else list(default_levels(dim))


def initial_index_key(dim: int, bound_levels: str = "auto",
                      own_sample: np.ndarray | None = None) -> IndexKey:
    """The index key of a new repository.

    Without ``own_sample`` (features of the department's own images) it has no levels yet:
    the first import batch fits them (app/core/basis.py, ensure). Public samples are never
    used.
    """
    levels = tuple(manifest_levels(dim, bound_levels))
    if levels and own_sample is not None and len(own_sample):
        return IndexKey.generate(dim, sample=np.asarray(own_sample, dtype=np.float64),
                                 levels=levels)
    return IndexKey.generate(dim, levels=())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_repository(store: Store, name: str, extractor: str,
                   basis_sample: np.ndarray | None, *, bound_levels: str = "auto",
                   policy: str = "clinical", search: str = SKNN) -> Repository:
    """Fresh keys and the manifest of a repository not yet in the store (nothing written).

    The bound basis is fitted on ``basis_sample`` (the department's own features) or,
    without one, on the first import batch (app/core/basis.py), never on public data;
    ``bound_levels="off"``: no levels at all. ``policy``: "clinical" or "research"
    (app/core/deid.py), kept in the manifest. ``search``: "sknn", "workstation" or
    "ckks"; a workstation or CKKS repository has no bound levels (its segments hold no
    secure-kNN ciphertexts to bound).
    """
    check_search_mode(search)
    if search in (WORKSTATION, CKKS):
        bound_levels = "off"
    if policy not in ("clinical", "research"):
        raise RadcryptError(f"policy must be 'clinical' or 'research', not {policy!r}")
    try:
        repo_id = layout.validate_repo_id(name)
        get_extractor(extractor)
    except ValueError as exc:
        raise RadcryptError(str(exc)) from None
    if store.exists(layout.manifest_key(repo_id)):
        raise RepositoryExists(f"a repository named {repo_id!r} already exists")
    index_key = initial_index_key(FEATURE_DIM, bound_levels, basis_sample)
    ring = KeyRing(repo_id, (VersionKeys.generate(1, index_key),))
    manifest = Manifest(repo_id=repo_id, extractor=extractor, dim=FEATURE_DIM,
                        levels=manifest_levels(FEATURE_DIM, bound_levels), key_version=1,
                        created=_now(), policy=policy, search=search)
    return Repository(manifest, ring)


def _manifest_blob(store: Store, name: str) -> tuple[str, str, bytes]:
    """(repository id, object name, stored bytes) of a repository's manifest."""
    try:
        repo_id = layout.validate_repo_id(name)
    except ValueError as exc:
        raise RadcryptError(str(exc)) from None
    key = layout.manifest_key(repo_id)
    try:
        return repo_id, key, store.get(key)
    except ObjectNotFound:
        raise RepositoryNotFound(f"no repository named {repo_id!r} in this store") from None


def read_manifest(store: Store, name: str) -> Manifest:
    repo_id, _, data = _manifest_blob(store, name)
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
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError too
        return data  # Manifest.from_json reports the error with the repository's name
    if isinstance(doc, dict) and "signature" in doc and isinstance(doc.get("payload"), dict):
        return json.dumps(doc["payload"]).encode()
    return data


def read_signed_manifest(store: Store, name: str, owner_key: bytes | None = None,
                         ) -> tuple[Manifest, bytes]:
    """(manifest, signer key) of an owner-signed manifest, read once and checked.

    The signer key returned is the owner's (the root of trust: ``owner_key`` in the
    manifest when it lists co-owners, else the signer); a co-owner's signature is
    accepted when the owner's endorsement of that co-owner verifies. With ``owner_key``
    that owner key is required; without, the caller pins the one found. An unsigned
    manifest or a bad signature: AccessDenied.
    """
    repo_id, key, blob = _manifest_blob(store, name)
    try:
        signer = json_signer(blob)
    except FormatError:
        raise AccessDenied(f"the manifest of {repo_id!r} is not a valid signed document"
                           ) from None
    if signer is None:
        raise AccessDenied(f"repository {repo_id!r} has an unsigned manifest: its owner must "
                           "migrate it (radcrypt repo migrate)")
    try:
        payload = open_json(blob, "manifest", key, [signer])
        owners = manifest_owners(payload, repo_id, signer)
    except FormatError as exc:
        raise AccessDenied(f"the manifest of {repo_id!r} has a bad signature or another "
                           f"signer than the repository's owners ({exc})") from None
    if owner_key is not None and not hmac.compare_digest(owners.root, owner_key):
        raise AccessDenied(f"the manifest of {repo_id!r} has a bad signature or another "
                           "signer than the repository's owner")
    signer = owners.root
    manifest = Manifest.from_json(json.dumps(payload).encode(),
                                  f"manifest of repository {repo_id!r}")
    if manifest.repo_id != repo_id:
        raise RadcryptError(f"manifest of repository {repo_id!r} names another repository")
    return manifest, signer


def check_still_current(store: Store, repo: Repository) -> Manifest:
    """Re-read the manifest before writing: RadcryptError if ``repo`` was opened under a
    key version that is no longer current (a revocation happened since), if the store
    now shows an older manifest than the one ``repo`` was opened with (a rollback), or if
    the manifest's storage format changed since ``repo`` was opened (a migration: a writer
    opened before it must not commit format-1 data into a format-2 repository).

    The key version alone decides: every change of membership that removes someone rotates
    the keys, so a client of a removed user holds a superseded version. Repositories
    opened with the owner's key (identities) have their signature checked with it.
    """
    if repo.owner_key is not None:
        manifest, _ = read_signed_manifest(store, repo.repo_id, repo.owner_key)
    else:  # a legacy password repository: unsigned, nothing to check a signature with
        manifest = read_manifest(store, repo.repo_id)
    if manifest.sequence < repo.manifest.sequence:
        raise RadcryptError(
            f"the manifest of repository {repo.repo_id!r} went back to sequence "
            f"{manifest.sequence} (this session opened sequence {repo.manifest.sequence}): "
            "refusing to write (someone may have replaced it with an old copy)")
    if manifest.key_version != repo.keys.version:
        raise RadcryptError(
            f"repository {repo.repo_id!r} is now at key version {manifest.key_version}, and "
            f"this session holds key version {repo.keys.version}: nothing was written "
            "under the superseded version; open the repository again")
    if manifest.format != repo.manifest.format:
        raise RadcryptError(
            f"repository {repo.repo_id!r} is now in storage format {storage_format(manifest)}"
            f" and this session opened it in storage format {storage_format(repo.manifest)} "
            "(it was migrated since): nothing was written; open the repository again")
    return manifest


def list_repositories(store: Store) -> list[Manifest]:
    """Every repository in the bucket, by name."""
    manifests = []
    for key in store.list_keys(layout.repos_prefix()):
        try:
            repo_id = layout.parse_manifest_key(key)
        except ValueError:
            continue
        manifests.append(read_manifest(store, repo_id))
    return sorted(manifests, key=lambda m: m.repo_id)


def open_repository(store: Store, name: str, password: str) -> Repository:
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
