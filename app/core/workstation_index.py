"""The workstation mode's local feature cache, encrypted at rest (issue 19).

Why a local cache: in workstation mode (app/core/workstation.py) the client searches the
repository's feature vectors itself, in plaintext, so that the server learns nothing of the
queries. Fetching every pack's feature array for every search would cost the whole index
per query; the client therefore keeps a copy of the arrays it has synced, on this
workstation's disk, and fetches only what the segment log added since.

Why encrypted at rest: the copy is as sensitive as the repository's features. Each file is
one AES-256-GCM ciphertext under a key derived (HKDF-SHA256) from the user's identity (its
X25519 private key) **and** the data key of the pack's key version, with associated data
naming the repository, the user, the key version, the pack and the pack object's SHA-256
from the log. So the cache opens only on this user's unlocked identity with that version's
key; a file copied to another repository, user, key version or pack slot does not open
(CacheError), and the caller discards it and fetches the pack again from the bucket (whose
pack entries are authenticated by docs/FORMAT-2.md 3.3). Layout of every file, big-endian:

```
0   4   magic "RCWC"
4   1   version u8 = 1
5   1   kind u8: 1 pack features, 2 state
6   2   reserved = 0
8   4   key_version u32 (0 for the state file)
12  12  nonce (random)
24  ..  AES-256-GCM ciphertext, then its 16-byte tag
AD  =   bytes 0..23 || LP("radcrypt/workstation-cache/v1") || LP(repo_id) || LP(user_id)
        || LP(object: pack id, or "state") || LP(SHA-256 of the pack object, or empty)
key =   HKDF-SHA256(IKM = X25519 private key || data key of key_version (none for the
        state), salt = 32 zero bytes, info = "radcrypt/workstation-cache-key/v1"
        || LP(repo_id) || LP(user_id) || u32(key_version))
```

A pack file's plaintext: count u32 | dim u32 | count image ids (16 bytes each) | count x dim
float64 little-endian, row-major. The state file's plaintext: JSON ``{"format":
"radcrypt-workstation-cache-v1", "repo_id", "user_id", "head": {"sequence", "hash"},
"packs": {pack id: {"sha256", "key_version", "count"}}}``. Files are written atomically
(temporary file, fsync, rename), mode 0600, in ``<data dir>/workstation-index/<repo id>/
<user id>/`` (0700). ``segment_vectors`` is the segment content of a workstation
repository: ids only (the segment container needs one column: one zero per row).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.core.errors import RadcryptError
from app.core.repository import CKKS, WORKSTATION, Manifest
from crypto.csprng import random_bytes
from crypto.tokens import EncryptedVectors

CACHE_DIR = "workstation-index"
MAGIC = b"RCWC"
VERSION = 1
KIND_PACK, KIND_STATE = 1, 2
STATE_FILE = "state.bin"
STATE_FORMAT = "radcrypt-workstation-cache-v1"
_HEAD = struct.Struct(">4sBBHI12s")
_AD_LABEL = b"radcrypt/workstation-cache/v1"
_KEY_LABEL = b"radcrypt/workstation-cache-key/v1"
_BLOCK = struct.Struct("<II")


class CacheError(RadcryptError):
    """A cache file that does not open: altered, truncated, or moved from another
    repository, user, key version or pack. Never used; the caller fetches again."""


def segment_vectors(manifest: Manifest, keys: Any, batch: np.ndarray,
                    norm_bound: float) -> EncryptedVectors:
    """What a segment of this repository holds for ``batch``: secure-kNN ciphertexts
    (``keys.index_key.encrypt``) in an sknn repository; in a workstation repository no
    ciphertext at all, one zero per row (the segment container requires one column), so
    the segment carries the image ids, its writer and MAC and the commit rule, nothing of
    the features. A CKKS repository's segment holds the same zero column (its CKKS block
    is a separate section, app/core/ckks_blocks.py)."""
    if manifest.search in (WORKSTATION, CKKS):
        return EncryptedVectors(full=np.zeros((len(batch), 1), dtype=np.float64), levels=())
    vectors: EncryptedVectors = keys.index_key.encrypt(batch, norm_bound)
    return vectors


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@dataclass
class CachedPack:
    """One synced pack, as the state file lists it."""

    sha256: str
    key_version: int
    count: int


@dataclass
class CacheState:
    """What the cache holds: the verified log head it was synced to and its packs."""

    head_sequence: int = -1
    head_hash: str = ""
    packs: dict[str, CachedPack] = field(default_factory=dict)


class LocalCache:
    """One user's cache of one repository's feature arrays (module docstring)."""

    def __init__(self, data_dir: Path, identity: Any, repo_id: str) -> None:
        self.identity = identity
        self.user_id = str(identity.user_id)
        self.repo_id = repo_id
        self.path = Path(data_dir) / CACHE_DIR / repo_id / self.user_id

    # --- keys and envelopes ----------------------------------------------------------------

    def _key(self, key_version: int, data_key: bytes) -> bytes:
        info = (_KEY_LABEL + _lp(self.repo_id.encode()) + _lp(self.user_id.encode())
                + struct.pack(">I", key_version))
        ikm = bytes(self.identity.enc_private) + data_key
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes(32), info=info
                    ).derive(ikm)

    def _ad(self, head: bytes, obj: str, sha256: bytes) -> bytes:
        return (head + _lp(_AD_LABEL) + _lp(self.repo_id.encode()) + _lp(self.user_id.encode())
                + _lp(obj.encode()) + _lp(sha256))

    def _seal(self, kind: int, key_version: int, data_key: bytes, obj: str, sha256: bytes,
              plain: bytes) -> bytes:
        head = _HEAD.pack(MAGIC, VERSION, kind, 0, key_version, random_bytes(12))
        sealed = AESGCM(self._key(key_version, data_key)).encrypt(
            head[12:], plain, self._ad(head, obj, sha256))
        return head + sealed

    def _open(self, name: Path, kind: int, key_version: int, data_key: bytes, obj: str,
              sha256: bytes) -> bytes:
        try:
            blob = name.read_bytes()
        except FileNotFoundError:
            raise CacheError(f"local search cache file {name} is missing") from None
        if len(blob) < _HEAD.size + 16:
            raise CacheError(f"local search cache file {name} is truncated")
        magic, version, found_kind, reserved, found_version, _ = _HEAD.unpack_from(blob)
        if (magic != MAGIC or version != VERSION or found_kind != kind or reserved
                or found_version != key_version):
            raise CacheError(f"local search cache file {name} is not a cache file of this "
                             f"kind and key version {key_version}")
        head = blob[: _HEAD.size]
        try:
            return AESGCM(self._key(key_version, data_key)).decrypt(
                head[12:], blob[_HEAD.size :], self._ad(head, obj, sha256))
        except InvalidTag:
            raise CacheError(f"local search cache file {name} does not open: it was altered, "
                             "or moved from another repository, user, key version or "
                             "pack") from None

    def _write(self, name: Path, blob: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)
        tmp = name.with_name(name.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(blob)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, name)

    # --- packs ------------------------------------------------------------------------------

    def pack_file(self, pack_id: str) -> Path:
        return self.path / f"{pack_id}.bin"

    def put_pack(self, key_version: int, data_key: bytes, pack_id: str, sha256: bytes,
                 ids: list[str], features: np.ndarray) -> int:
        """Seal one pack's feature rows; returns the file's size."""
        rows = np.ascontiguousarray(features, dtype="<f8")
        plain = (_BLOCK.pack(len(ids), rows.shape[1] if rows.ndim == 2 else 0)
                 + b"".join(bytes.fromhex(i) for i in ids) + rows.tobytes())
        blob = self._seal(KIND_PACK, key_version, data_key, pack_id, sha256, plain)
        self._write(self.pack_file(pack_id), blob)
        return len(blob)

    def get_pack(self, key_version: int, data_key: bytes, pack_id: str, sha256: bytes
                 ) -> tuple[list[str], np.ndarray]:
        """(image ids, features) of one cached pack; CacheError if it does not open."""
        name = self.pack_file(pack_id)
        plain = self._open(name, KIND_PACK, key_version, data_key, pack_id, sha256)
        count, dim = _BLOCK.unpack_from(plain)
        if len(plain) != _BLOCK.size + 16 * count + 8 * count * dim:
            raise CacheError(f"local search cache file {name} has the wrong length")
        end = _BLOCK.size + 16 * count
        ids = [plain[o : o + 16].hex() for o in range(_BLOCK.size, end, 16)]
        rows = np.frombuffer(plain, dtype="<f8", offset=end).reshape(count, dim)
        return ids, rows  # read-only, over ``plain``: the index copies it once

    def drop_pack(self, pack_id: str) -> None:
        self.pack_file(pack_id).unlink(missing_ok=True)

    # --- state ------------------------------------------------------------------------------

    def load_state(self) -> CacheState | None:
        """The cache's state, None when there is none; CacheError if it does not open."""
        name = self.path / STATE_FILE
        if not name.exists():
            return None
        plain = self._open(name, KIND_STATE, 0, b"", "state", b"")
        try:
            raw = json.loads(plain)
            if (raw["format"] != STATE_FORMAT or raw["repo_id"] != self.repo_id
                    or raw["user_id"] != self.user_id):
                raise ValueError("names another repository or user")
            return CacheState(int(raw["head"]["sequence"]), str(raw["head"]["hash"]),
                              {str(k): CachedPack(str(v["sha256"]), int(v["key_version"]),
                                                  int(v["count"]))
                               for k, v in raw["packs"].items()})
        except (ValueError, KeyError, TypeError) as exc:
            raise CacheError(f"local search cache file {name} is malformed ({exc})") from None

    def save_state(self, state: CacheState) -> None:
        raw = {"format": STATE_FORMAT, "repo_id": self.repo_id, "user_id": self.user_id,
               "head": {"sequence": state.head_sequence, "hash": state.head_hash},
               "packs": {k: {"sha256": v.sha256, "key_version": v.key_version,
                             "count": v.count} for k, v in sorted(state.packs.items())}}
        plain = json.dumps(raw, sort_keys=True).encode()
        self._write(self.path / STATE_FILE, self._seal(KIND_STATE, 0, b"", "state", b"", plain))

    # --- whole cache ------------------------------------------------------------------------

    def files(self) -> list[Path]:
        return sorted(self.path.glob("*.bin")) if self.path.exists() else []

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def wipe(self) -> None:
        """Delete this user's cache of the repository (revocation, a cache that does not
        open as a whole)."""
        if self.path.exists():
            shutil.rmtree(self.path)
