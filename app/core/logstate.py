"""The segment log of a format-2 repository, as this workstation trusts it.

The log (cloud/seglog.py, docs/FORMAT-2.md section 5) is hash-chained and signed
by its writers; whom to trust as a writer is decided here, from what this client already
trusts: the owner's key pinned when the repository was first opened, the members listed in
the owner-signed manifest, and each member's owner-signed user record (its Ed25519 key).

Rollback memory (FORMAT-2 5.5 step 4). A cloud can hide the newest log entries or serve
another history. Each workstation remembers, per repository, the highest head it has
verified (sequence, SHA-256 of that entry, checkpoint) in ``log-heads.json`` beside
``manifest-sequences.json`` (same rules: a JSON object, replaced atomically, mode 0600).
A later verification that ends below the remembered sequence is a rollback, one whose
entry at the remembered sequence has another hash is a fork: both raise IntegrityError
naming the repository, and nothing is written on top of such a log.

Missing genesis (repair_genesis). The owner creates a format-2 repository by writing its
manifest, then the log's genesis entry; a crash between the two leaves a repository whose
log is empty. The owner's next open writes the genesis (only when the log has no entry and
no checkpoint at all); anyone else is told that the owner must open it once.
"""

from __future__ import annotations

import hmac
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from app.core.errors import IntegrityError, RadcryptError
from app.core.repository import Manifest, Repository, is_format2, read_signed_manifest
from app.core.settings import Settings
from cloud import layout, seglog
from cloud.backend import ObjectNotFound, Store
from crypto.errors import FormatError
from crypto.identity import Identity, PublicCard
from crypto.signed import open_json

HEADS_FILE = "log-heads.json"

_heads_lock = threading.Lock()  # two importers of one process share the file


@dataclass
class RepositoryTrust:
    """Whom the log of one repository may be signed by (cloud.seglog.LogTrust).

    The owner (pinned key) and the users listed in the signed manifest; a member's key
    comes from their user record, which the owner signed. Records are read on first use
    and kept: a trust object lives for one verification or one import.
    """

    store: Store
    manifest: Manifest
    owner_key: bytes
    _keys: dict[str, bytes | None] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def owner_id(self) -> str:
        return self.manifest.owner

    @property
    def manifest_sequence(self) -> int:
        return self.manifest.sequence

    @property
    def key_version(self) -> int:
        return self.manifest.key_version

    @property
    def owner_keys(self) -> list[bytes]:
        """The owner's and the co-owners' keys (docs/FORMAT-2.md 2.4): any may sign
        checkpoints, user records and owner-only entries."""
        return list(self.manifest.owner_keys(self.owner_key).values()) or [self.owner_key]

    def is_owner(self, user_id: str) -> bool:
        return self.manifest.is_owner(user_id)

    def signer_key(self, user_id: str) -> bytes | None:
        """The Ed25519 key of an owner or of a member of the manifest; None otherwise."""
        owners = self.manifest.owner_keys(self.owner_key)
        if user_id in owners:
            return owners[user_id]
        if self.manifest.member_version(user_id) is None:
            return None
        with self._lock:
            if user_id not in self._keys:
                self._keys[user_id] = member_key(self.store, user_id, self.owner_keys)
            return self._keys[user_id]


def member_key(store: Store, user_id: str, owner_key: bytes | list[bytes]) -> bytes | None:
    """The signing key of a user record an owner signed; None when there is none."""
    trusted = owner_key if isinstance(owner_key, list) else [owner_key]
    try:
        name = layout.user_key(user_id)
        payload = open_json(store.get(name), "user", name, trusted)
        card = PublicCard.from_json(str(payload["card"]))
    except (ObjectNotFound, FormatError, KeyError, ValueError):
        return None  # an entry signed by this user then fails verification, named
    return card.sign_public if card.user_id == user_id else None


def repository_trust(store: Store, repo: Repository) -> RepositoryTrust:
    """The trust of ``repo``'s log: the manifest as signed now by the pinned owner key.

    ``repo.owner_key`` is the key this workstation pinned when it opened the repository
    (app/core/access.py); a format-2 repository always has one.
    """
    if repo.owner_key is None:
        raise RadcryptError(f"repository {repo.repo_id!r} has no owner key: its segment log "
                            "cannot be verified (a legacy repository has no log)")
    manifest, _ = read_signed_manifest(store, repo.repo_id, repo.owner_key)
    if manifest.sequence < repo.manifest.sequence:
        raise IntegrityError(
            f"the manifest of repository {repo.repo_id!r} went back to sequence "
            f"{manifest.sequence} (this session opened sequence {repo.manifest.sequence})")
    if not is_format2(manifest):
        raise RadcryptError(f"repository {repo.repo_id!r} is not in storage format 2: it "
                            "has no segment log")
    return RepositoryTrust(store, manifest, repo.owner_key)


# --- rollback memory -----------------------------------------------------------------------


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically by a file only this user can read (0600): the
    rollback memories here and in app/core/access.py, and its pinned owner keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def heads_path(settings: Settings) -> Path:
    return settings.data_path / HEADS_FILE


def remembered_heads(settings: Settings) -> dict[str, seglog.LogHead]:
    """The highest verified log head per repository on this workstation."""
    path = heads_path(settings)
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        heads = {}
        for repo_id, item in raw.items():
            sequence, digest = item["sequence"], bytes.fromhex(item["hash"])
            checkpoint = item.get("checkpoint")
            if (not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0
                    or len(digest) != 32
                    or not (checkpoint is None or isinstance(checkpoint, int))):
                raise ValueError(f"bad entry for {repo_id!r}")
            heads[str(repo_id)] = seglog.LogHead(sequence, digest, checkpoint)
        return heads
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise RadcryptError(f"the log heads file {path} is damaged") from None


def remember_head(settings: Settings, repo_id: str, head: seglog.LogHead) -> None:
    """Keep ``head`` if it is beyond the one remembered (never lower it)."""
    with _heads_lock:
        heads = remembered_heads(settings)
        known = heads.get(repo_id)
        if known is not None:
            checkpoints = [c for c in (known.checkpoint, head.checkpoint) if c is not None]
            highest = known if known.sequence >= head.sequence else head
            head = seglog.LogHead(highest.sequence, highest.hash,
                                  max(checkpoints) if checkpoints else None)
            if head == known:
                return
        heads[repo_id] = head
        raw = {r: {"sequence": h.sequence, "hash": h.hash.hex(), "checkpoint": h.checkpoint}
               for r, h in sorted(heads.items())}
        write_private(heads_path(settings), json.dumps(raw, indent=2).encode())


def _check_against(repo_id: str, state: seglog.LogState, known: seglog.LogHead | None,
                   settings: Settings) -> None:
    """Rollback and fork against the remembered head (also checked by seglog itself)."""
    if known is None:
        return
    if state.head.sequence < known.sequence:
        raise IntegrityError(
            f"the segment log of repository {repo_id!r} ends at entry {state.head.sequence}, "
            f"below entry {known.sequence} verified before on this workstation: refusing "
            "(a rollback: the store may be hiding or serving an old copy of the log; only if "
            f"the repository was deleted and created anew, remove its entry from "
            f"{heads_path(settings)})")
    seen = state.hashes.get(known.sequence)
    if state.head.sequence == known.sequence:
        seen = state.head.hash
    if seen is not None and not hmac.compare_digest(seen, known.hash):
        raise IntegrityError(
            f"the segment log of repository {repo_id!r} has another entry {known.sequence} "
            "than the one verified before on this workstation: refusing (a fork)")


def verified_log(store: Store, settings: Settings | None, repo: Repository,
                 since: seglog.LogState | None = None, *,
                 trust: RepositoryTrust | None = None) -> seglog.LogState:
    """The repository's log verified up to its head (FORMAT-2 5.5), remembered.

    ``since``: an earlier verified state of the same repository, extended (only the new
    entries are read). ``settings`` None: no rollback memory (a caller without a
    workstation, e.g. a test of the store alone). ``trust``: one the caller just read
    (repository_trust), to save a second read of the manifest. IntegrityError for a log
    that does not verify, a rollback or a fork.
    """
    trust = trust or repository_trust(store, repo)
    known = remembered_heads(settings).get(repo.repo_id) if settings is not None else None
    try:
        state = seglog.verify_log(store, repo.repo_id, trust, remembered=known, since=since)
    except seglog.LogError as exc:
        if exc.reason == "no genesis" and since is None and log_is_empty(store, repo.repo_id):
            raise IntegrityError(_no_genesis(repo.repo_id, trust.owner_id)) from None
        raise IntegrityError(f"the segment log of repository {repo.repo_id!r} does not "
                             f"verify: {exc}") from None
    except FormatError as exc:  # SignatureError is a FormatError
        raise IntegrityError(f"the segment log of repository {repo.repo_id!r} does not "
                             f"verify: {exc}") from None
    if settings is not None:
        _check_against(repo.repo_id, state, known, settings)
        remember_head(settings, repo.repo_id, state.head)
    return state


# --- a missing genesis ------------------------------------------------------------------------


def log_is_empty(store: Store, repo_id: str) -> bool:
    """Whether the repository's log has no entry and no checkpoint at all (not even a
    foreign name is counted: any object under log/ or checkpoints/ blocks a repair)."""
    return not (any(True for _ in store.list_keys(layout.log_prefix(repo_id)))
                or any(True for _ in store.list_keys(layout.checkpoints_prefix(repo_id))))


def _no_genesis(repo_id: str, owner_id: str) -> str:
    return (f"the segment log of repository {repo_id!r} is empty: its creation did not "
            f"finish (no genesis entry); its owner ({owner_id}) must open it once to repair "
            "it, nothing can be searched or imported until then")


def repair_genesis(store: Store, settings: Settings | None, identity: Identity,
                   repo: Repository) -> bool:
    """Write the genesis entry of a format-2 repository whose log is empty (a crash
    between its manifest and its genesis); True if it was written. Only the owner writes
    it (as create_repository_as would have, at the manifest's current sequence and key
    version); anyone else gets IntegrityError saying the owner must open it. A log with
    any entry or checkpoint is left alone (its verification reports what is wrong)."""
    if not is_format2(repo.manifest) or not log_is_empty(store, repo.repo_id):
        return False
    trust = repository_trust(store, repo)
    if identity.user_id != trust.owner_id or repo.owner_key is None or not hmac.compare_digest(
            identity.sign_public, repo.owner_key):
        raise IntegrityError(_no_genesis(repo.repo_id, trust.owner_id))
    try:
        state = seglog.write_genesis(store, repo.repo_id, identity, identity.user_id,
                                     trust.manifest_sequence, trust.key_version)
    except seglog.LogError as exc:
        if exc.reason != "genesis exists":
            raise
        return False  # another open of the owner's repaired it meanwhile
    if settings is not None:
        remember_head(settings, repo.repo_id, state.head)
    return True
