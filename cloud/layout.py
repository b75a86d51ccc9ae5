"""Object names in the bucket (DESIGN.md section 3), in one place.

Every key Radcrypt reads or writes is built and parsed here, so the storage layout can be
audited (and changed) in a single file, and so no caller ever glues an unchecked id into a
key: ids are validated on the way in and on the way out. A key that does not parse is
treated as foreign (another tool, a newer format version) rather than guessed at.

Layout::

    radcrypt/v1/users/<user_id>.json
    radcrypt/v1/repos/<repo_id>/manifest.json
    radcrypt/v1/repos/<repo_id>/grants/<user_id>
    radcrypt/v1/repos/<repo_id>/objects/<image_id>
    radcrypt/v1/repos/<repo_id>/thumbs/<image_id>
    radcrypt/v1/repos/<repo_id>/meta/<image_id>
    radcrypt/v1/repos/<repo_id>/segments/<seg_id>
    radcrypt/v1/repos/<repo_id>/tombstones/<image_id>
    radcrypt/v1/repos/<repo_id>/audit/<batch_id>
    radcrypt/v1/repos/<repo_id>/basis/<key_version>   (bound levels of a key version, encrypted)
    radcrypt/v1/repos/<repo_id>/packs/<pack_id>       (format 2: a batch's meta, previews, features)
    radcrypt/v1/repos/<repo_id>/log/<SEQ20>           (format 2: one signed segment-log entry)
    radcrypt/v1/repos/<repo_id>/checkpoints/<SEQ20>   (format 2: owner-signed live set)
    radcrypt/v1/repos/<repo_id>/labels/<label_id>     (format 2: a label's keyword dictionary)
    radcrypt/v1/repos/<repo_id>/locks/<lock_id>       (restic-style locks: app/core/locks.py)
    radcrypt/v1/repos/<repo_id>/access/<user_id>/<SEQ20>  (access log, owners only:
                                                       app/core/access_log.py)
    radcrypt/v1/probes/<probe_id>          (scratch objects of cloud.store's capability probe)
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

PREFIX = "radcrypt/v1/"
USERS = PREFIX + "users/"
REPOS = PREFIX + "repos/"
PROBES = PREFIX + "probes/"

# Per-image object kinds; the same words appear in the AES-GCM associated data, so an
# object copied under another kind's name fails to decrypt.
IMAGE_KINDS = ("objects", "thumbs", "meta", "tombstones")

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_HEX_ID_RE = re.compile(r"[0-9a-f]{32}")
_SEQ20_RE = re.compile(r"[0-9]{20}")
_NAME_RULE = "1 to 63 characters from a-z, 0-9 and '-', not starting with '-'"
_HEX_RULE = "32 lowercase hexadecimal characters (a 128-bit id from new_id())"
_SEQ20_RULE = "exactly 20 decimal digits (SEQ20, docs/FORMAT-2.md 2.1)"
MAX_SEQUENCE = 2**64 - 1


def new_id() -> str:
    """A fresh random 128-bit id as 32 lowercase hex characters.

    Segment and batch ids are random rather than counters so that concurrent importers
    never collide and an id reveals nothing about order or volume. Image ids have the
    same form but are derived from the content under the repository key
    (app/core/importer.py: image_id_for), so that an interrupted import resumes.
    """
    return secrets.token_hex(16)


def _check(field: str, value: object, pattern: re.Pattern[str], rule: str) -> str:
    """Return `value` when it fully matches `pattern`; otherwise name the field and rule."""
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ValueError(f"invalid {field} {shown}: must be {rule}")
    return value


def validate_repo_id(repo_id: object) -> str:
    """Check a repository id ([a-z0-9][a-z0-9-]{0,62}) and return it."""
    return _check("repo_id", repo_id, _NAME_RE, _NAME_RULE)


def validate_user_id(user_id: object) -> str:
    """Check a user id ([a-z0-9][a-z0-9-]{0,62}) and return it."""
    return _check("user_id", user_id, _NAME_RE, _NAME_RULE)


def validate_image_id(image_id: object) -> str:
    """Check an image id (32 lowercase hex characters) and return it."""
    return _check("image_id", image_id, _HEX_ID_RE, _HEX_RULE)


def validate_segment_id(seg_id: object) -> str:
    """Check a segment id (32 lowercase hex characters) and return it."""
    return _check("seg_id", seg_id, _HEX_ID_RE, _HEX_RULE)


def validate_pack_id(pack_id: object) -> str:
    """Check a pack id (32 lowercase hex characters, random like a segment id) and return it."""
    return _check("pack_id", pack_id, _HEX_ID_RE, _HEX_RULE)


def validate_sequence(sequence: object) -> int:
    """A log sequence: an int from 0 to 2**64 - 1 (SEQ20 in names, u64 in log entries)."""
    if (isinstance(sequence, bool) or not isinstance(sequence, int)
            or not 0 <= sequence <= MAX_SEQUENCE):
        raise ValueError(f"invalid log sequence {sequence!r}: must be an integer 0..2**64-1")
    return sequence


def seq20(sequence: int) -> str:
    """SEQ20(n): n as exactly 20 zero-padded decimal digits, so names sort numerically."""
    return f"{validate_sequence(sequence):020d}"


def validate_batch_id(batch_id: object) -> str:
    """Check an audit batch id (32 lowercase hex characters) and return it."""
    return _check("batch_id", batch_id, _HEX_ID_RE, _HEX_RULE)


# --- prefixes ------------------------------------------------------------------------


def repos_prefix() -> str:
    """Prefix under which every repository lives (list it to enumerate repositories)."""
    return REPOS


def users_prefix() -> str:
    """Prefix of all registered users' public key records."""
    return USERS


def repo_prefix(repo_id: str) -> str:
    """Prefix of everything belonging to one repository (ends with '/')."""
    return f"{REPOS}{validate_repo_id(repo_id)}/"


def grants_prefix(repo_id: str) -> str:
    """Prefix of the wrapped key bundles granted on one repository."""
    return repo_prefix(repo_id) + "grants/"


def segments_prefix(repo_id: str) -> str:
    """Prefix of one repository's index segments (the commit points of import batches)."""
    return repo_prefix(repo_id) + "segments/"


def image_prefix(kind: str, repo_id: str) -> str:
    """Prefix of one per-image kind ('objects', 'thumbs', 'meta', 'tombstones')."""
    if kind not in IMAGE_KINDS:
        raise ValueError(f"invalid kind {kind!r}: must be one of {', '.join(IMAGE_KINDS)}")
    return repo_prefix(repo_id) + kind + "/"


def objects_prefix(repo_id: str) -> str:
    """Prefix of one repository's encrypted original files."""
    return image_prefix("objects", repo_id)


def tombstones_prefix(repo_id: str) -> str:
    """Prefix of one repository's tombstones (deleted image ids)."""
    return image_prefix("tombstones", repo_id)


def basis_prefix(repo_id: str) -> str:
    """Prefix of one repository's encrypted bound bases (one per key version)."""
    return repo_prefix(repo_id) + "basis/"


def validate_key_version(version: object) -> int:
    """A key version: an int from 1 to 2**32 - 1 (written in decimal in object names)."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**32:
        raise ValueError(f"invalid key version {version!r}: must be an integer 1..2**32-1")
    return version


def packs_prefix(repo_id: str) -> str:
    """Prefix of one repository's packs (format 2)."""
    return repo_prefix(repo_id) + "packs/"


def log_prefix(repo_id: str) -> str:
    """Prefix of one repository's segment-log entries (format 2); they list in sequence order."""
    return repo_prefix(repo_id) + "log/"


def checkpoints_prefix(repo_id: str) -> str:
    """Prefix of one repository's owner-signed checkpoints (format 2)."""
    return repo_prefix(repo_id) + "checkpoints/"


def audit_prefix(repo_id: str) -> str:
    """Prefix of one repository's audit batches."""
    return repo_prefix(repo_id) + "audit/"


# --- keys ----------------------------------------------------------------------------


def user_key(user_id: str) -> str:
    """Public keys of a registered user, signed by the admin."""
    return f"{USERS}{validate_user_id(user_id)}.json"


def manifest_key(repo_id: str) -> str:
    """Public parameters of a repository (scheme, dimensions, key version)."""
    return repo_prefix(repo_id) + "manifest.json"


def grant_key(repo_id: str, user_id: str) -> str:
    """Repository key bundle wrapped to one user."""
    return grants_prefix(repo_id) + validate_user_id(user_id)


def image_key(kind: str, repo_id: str, image_id: str) -> str:
    """Key of one per-image object of the given kind."""
    return image_prefix(kind, repo_id) + validate_image_id(image_id)


def object_key(repo_id: str, image_id: str) -> str:
    """AES-GCM ciphertext of the original file."""
    return image_key("objects", repo_id, image_id)


def thumb_key(repo_id: str, image_id: str) -> str:
    """AES-GCM ciphertext of a preview PNG."""
    return image_key("thumbs", repo_id, image_id)


def meta_key(repo_id: str, image_id: str) -> str:
    """AES-GCM ciphertext of de-identified JSON metadata."""
    return image_key("meta", repo_id, image_id)


def tombstone_key(repo_id: str, image_id: str) -> str:
    """Marker that an image was deleted (kept so stale segments can be filtered)."""
    return image_key("tombstones", repo_id, image_id)


def segment_key(repo_id: str, seg_id: str) -> str:
    """Encrypted index segment: written last, it commits an import batch."""
    return segments_prefix(repo_id) + validate_segment_id(seg_id)


def basis_key(repo_id: str, key_version: int) -> str:
    """Encrypted bound basis and level keys of one key version (app/core/basis.py)."""
    return basis_prefix(repo_id) + str(validate_key_version(key_version))


def pack_key(repo_id: str, pack_id: str) -> str:
    """A pack: one import batch's meta, previews and feature array (format 2)."""
    return packs_prefix(repo_id) + validate_pack_id(pack_id)


def labels_prefix(repo_id: str) -> str:
    """Label objects (format 2, issue 17: crypto/labels.py)."""
    return repo_prefix(repo_id) + "labels/"


def label_key(repo_id: str, label_id: str) -> str:
    """A label object: a small keyword dictionary naming rows of one segment (format 2)."""
    return labels_prefix(repo_id) + _check("label_id", label_id, _HEX_ID_RE, _HEX_RULE)


def parse_label_key(key: str) -> tuple[str, str]:
    """(repo id, label id) of a label object's key."""
    return _repo_item(key, "label")


def log_entry_key(repo_id: str, sequence: int) -> str:
    """Log entry ``sequence``: created if absent, never replaced (format 2)."""
    return log_prefix(repo_id) + seq20(sequence)


def checkpoint_key(repo_id: str, sequence: int) -> str:
    """The owner's checkpoint of the live set after log entry ``sequence`` (format 2)."""
    return checkpoints_prefix(repo_id) + seq20(sequence)


def audit_key(repo_id: str, batch_id: str) -> str:
    """One batch of the search service's audit records for a repository."""
    return audit_prefix(repo_id) + validate_batch_id(batch_id)


def probe_key(probe_id: str) -> str:
    """Scratch object used by cloud.store to test a server's conditional writes."""
    return PROBES + _check("probe_id", probe_id, _HEX_ID_RE, _HEX_RULE)


# --- parsers -------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedKey:
    """What a key names: its kind plus whichever ids that kind carries."""

    # 'user', 'manifest', 'grant', 'segment', 'audit', 'basis', 'pack', 'log', 'checkpoint',
    # or an IMAGE_KINDS entry
    kind: str
    repo_id: str | None = None
    user_id: str | None = None
    # image id, segment id, pack id, audit batch id, key version, or SEQ20 log sequence
    item_id: str | None = None


def _foreign(key: object, expected: str) -> ValueError:
    shown = repr(key) if len(repr(key)) <= 120 else repr(key)[:117] + "..."
    return ValueError(f"not a Radcrypt {expected} key: {shown}")


def parse_key(key: str) -> ParsedKey:
    """Parse any Radcrypt key; raise ValueError for keys outside the layout."""
    if not isinstance(key, str):
        raise _foreign(key, "object")
    if key.startswith(USERS):
        name = key[len(USERS):]
        if not name.endswith(".json"):
            raise _foreign(key, "user")
        return ParsedKey("user", user_id=_as_field(key, "user", validate_user_id, name[:-5]))
    if not key.startswith(REPOS):
        raise _foreign(key, "object")
    parts = key[len(REPOS):].split("/")
    repo_id = _as_field(key, "repository", validate_repo_id, parts[0])
    if parts[1:] == ["manifest.json"]:
        return ParsedKey("manifest", repo_id=repo_id)
    if len(parts) != 3:
        raise _foreign(key, "repository")
    return _parse_repo_item(key, repo_id, parts[1], parts[2])


def _parse_repo_item(key: str, repo_id: str, folder: str, name: str) -> ParsedKey:
    """Parse the '<folder>/<name>' tail of a key inside one repository."""
    if folder == "grants":
        user_id = _as_field(key, "grant", validate_user_id, name)
        return ParsedKey("grant", repo_id=repo_id, user_id=user_id)
    if folder == "segments":
        seg_id = _as_field(key, "segment", validate_segment_id, name)
        return ParsedKey("segment", repo_id, item_id=seg_id)
    if folder == "packs":
        pack_id = _as_field(key, "pack", validate_pack_id, name)
        return ParsedKey("pack", repo_id, item_id=pack_id)
    if folder == "labels":
        label_id = _as_field(key, "label", validate_pack_id, name)
        return ParsedKey("label", repo_id, item_id=label_id)
    if folder in ("log", "checkpoints"):
        kind = "log" if folder == "log" else "checkpoint"
        seq = _as_field(key, kind, lambda v: _check("sequence", v, _SEQ20_RE, _SEQ20_RULE), name)
        return ParsedKey(kind, repo_id, item_id=seq)
    if folder == "basis":
        if not name.isascii() or not name.isdigit() or name != str(int(name)):
            raise _foreign(key, "basis")
        version = _as_field(key, "basis", lambda v: str(validate_key_version(int(str(v)))),
                            name)
        return ParsedKey("basis", repo_id, item_id=version)
    if folder == "audit":
        batch_id = _as_field(key, "audit", validate_batch_id, name)
        return ParsedKey("audit", repo_id, item_id=batch_id)
    if folder in IMAGE_KINDS:
        image_id = _as_field(key, folder, validate_image_id, name)
        return ParsedKey(folder, repo_id, item_id=image_id)
    raise _foreign(key, "repository")


def _as_field(key: str, expected: str, validator: Callable[[object], str], value: str) -> str:
    """Validate one id taken from a key, reporting the whole key when it is wrong."""
    try:
        return validator(value)
    except ValueError as exc:
        raise ValueError(f"not a Radcrypt {expected} key: {key!r} ({exc})") from None


def _expect(key: str, kind: str) -> ParsedKey:
    parsed = parse_key(key)
    if parsed.kind != kind:
        raise _foreign(key, kind)
    return parsed


def parse_user_key(key: str) -> str:
    """user_key(user_id) -> user_id."""
    return _expect(key, "user").user_id or ""


def parse_manifest_key(key: str) -> str:
    """manifest_key(repo_id) -> repo_id."""
    return _expect(key, "manifest").repo_id or ""


def parse_grant_key(key: str) -> tuple[str, str]:
    """grant_key(repo_id, user_id) -> (repo_id, user_id)."""
    parsed = _expect(key, "grant")
    return parsed.repo_id or "", parsed.user_id or ""


def _repo_item(key: str, kind: str) -> tuple[str, str]:
    parsed = _expect(key, kind)
    return parsed.repo_id or "", parsed.item_id or ""


def parse_object_key(key: str) -> tuple[str, str]:
    """object_key(repo_id, image_id) -> (repo_id, image_id)."""
    return _repo_item(key, "objects")


def parse_thumb_key(key: str) -> tuple[str, str]:
    """thumb_key(repo_id, image_id) -> (repo_id, image_id)."""
    return _repo_item(key, "thumbs")


def parse_meta_key(key: str) -> tuple[str, str]:
    """meta_key(repo_id, image_id) -> (repo_id, image_id)."""
    return _repo_item(key, "meta")


def parse_tombstone_key(key: str) -> tuple[str, str]:
    """tombstone_key(repo_id, image_id) -> (repo_id, image_id)."""
    return _repo_item(key, "tombstones")


def parse_segment_key(key: str) -> tuple[str, str]:
    """segment_key(repo_id, seg_id) -> (repo_id, seg_id)."""
    return _repo_item(key, "segment")


def parse_audit_key(key: str) -> tuple[str, str]:
    """audit_key(repo_id, batch_id) -> (repo_id, batch_id)."""
    return _repo_item(key, "audit")


def parse_basis_key(key: str) -> tuple[str, int]:
    """basis_key(repo_id, key_version) -> (repo_id, key_version)."""
    repo_id, version = _repo_item(key, "basis")
    return repo_id, int(version)


def parse_pack_key(key: str) -> tuple[str, str]:
    """pack_key(repo_id, pack_id) -> (repo_id, pack_id)."""
    return _repo_item(key, "pack")


def parse_log_entry_key(key: str) -> tuple[str, int]:
    """log_entry_key(repo_id, sequence) -> (repo_id, sequence); a last part that is not
    exactly 20 digits is foreign (ValueError)."""
    repo_id, seq = _repo_item(key, "log")
    return repo_id, int(seq)


def parse_checkpoint_key(key: str) -> tuple[str, int]:
    """checkpoint_key(repo_id, sequence) -> (repo_id, sequence)."""
    repo_id, seq = _repo_item(key, "checkpoint")
    return repo_id, int(seq)
