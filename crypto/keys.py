"""Repository key bundles and their wrapping under a password (scrypt).

A repository's secrets form a key ring: one set of keys per key version (a version is
added when access is revoked), each with an AES-256 data key, a keyword PRF key and
the secure-kNN index key. Old versions stay in the ring because objects written under
them stay readable to those who are granted the repository.

Password wrapping follows age's scrypt stanza and Cryptomator's masterkey file: a
random salt and the work factor are stored beside the ciphertext, the scrypt output
keys the AEAD envelope (which derives its per-object GCM key from it), and the header
is associated data so that lowering the work factor or swapping the salt makes
unwrapping fail. Layout (docs/FORMAT.md)::

    "RCPW" | version u8 (1) | log2 N u8 | r u8 | p u8 | salt (16) | AEAD envelope
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from Cryptodome.Protocol.KDF import scrypt

from crypto import aead
from crypto.csprng import random_bytes
from crypto.errors import DecryptionError, FormatError
from crypto.index import IndexKey

_RING_MAGIC = b"RCKR"
_RING_VERSION = 1
_PW_MAGIC = b"RCPW"
_PW_VERSION = 1
_PW_HEAD = struct.Struct(">4sBBBB16s")
DEFAULT_SCRYPT_LOG2_N = 17
MIN_SCRYPT_LOG2_N = 10  # tests only; files written by the product use the default
# The parameters come from the file, that is from the bucket or the disk: a hostile file
# could ask for gigabytes of memory and minutes of work before the password is checked.
# Only the product's own parameters (and one step above, for a future default) are
# accepted: N * r * 128 <= 2^18 * 8 * 128 = 256 MiB.
MAX_SCRYPT_LOG2_N = 18
SCRYPT_R = 8
SCRYPT_P = 1
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024


def check_scrypt_parameters(log2_n: int, r: int, p: int) -> str | None:
    """Why these scrypt parameters are refused, or None when they are acceptable."""
    if not MIN_SCRYPT_LOG2_N <= log2_n <= MAX_SCRYPT_LOG2_N:
        return f"scrypt log2 N {log2_n} is outside {MIN_SCRYPT_LOG2_N}..{MAX_SCRYPT_LOG2_N}"
    if r != SCRYPT_R or p != SCRYPT_P:
        return f"scrypt r {r} and p {p} must be {SCRYPT_R} and {SCRYPT_P}"
    if (1 << log2_n) * r * 128 > MAX_SCRYPT_MEMORY:  # implied by the above; kept explicit
        return "scrypt parameters need more than 256 MiB of memory"
    return None


class WrongPassword(DecryptionError):
    """The password does not open this file (or the file was altered)."""


@dataclass(frozen=True, eq=False)
class VersionKeys:
    """The keys of one key version of a repository."""

    version: int
    data_key: bytes
    keyword_key: bytes
    index_key: IndexKey

    def __repr__(self) -> str:
        return f"VersionKeys(version={self.version}, <secret>)"

    @classmethod
    def generate(cls, version: int, index_key: IndexKey) -> VersionKeys:
        return cls(version, random_bytes(32), random_bytes(32), index_key)


@dataclass(frozen=True, eq=False)
class KeyRing:
    """All key versions of one repository; the highest is the one new data uses."""

    repo_id: str
    versions: tuple[VersionKeys, ...]

    def __post_init__(self) -> None:
        numbers = [v.version for v in self.versions]
        if not numbers or numbers != sorted(set(numbers)):
            raise ValueError("a key ring needs increasing, unique key versions")

    def __repr__(self) -> str:
        return f"KeyRing(repo_id={self.repo_id!r}, versions={[v.version for v in self.versions]})"

    @property
    def current(self) -> VersionKeys:
        return self.versions[-1]

    def wipe(self) -> None:
        """Zero now what Python lets us zero: every version's index key (numpy arrays,
        IndexKey.wipe; searching or encrypting with them then fails). The data and keyword
        keys are immutable ``bytes``: Python offers no way to overwrite them, so they are
        only dropped with the ring and their memory is reused whenever the allocator
        decides (docs/PRIVACY.md). Only for a ring nobody else still uses."""
        for keys in self.versions:
            keys.index_key.wipe()

    def wipe_on_release(self) -> None:
        """The workstation lock's wipe: each version's index key is zeroed as soon as no
        ring, repository or running task references it any more (IndexKey.wipe_on_release),
        so work still running keeps working keys until it ends. The ``bytes`` keys: see
        ``wipe``."""
        for keys in self.versions:
            keys.index_key.wipe_on_release()

    def version(self, number: int) -> VersionKeys:
        for keys in self.versions:
            if keys.version == number:
                return keys
        raise KeyError(f"key version {number} is not in this key ring")

    def rotated(self, index_key: IndexKey) -> KeyRing:
        """A ring with one more version of fresh keys (after a revocation)."""
        new = VersionKeys.generate(self.current.version + 1, index_key)
        return KeyRing(self.repo_id, (*self.versions, new))

    def to_bytes(self) -> bytes:
        repo = self.repo_id.encode()
        parts = [_RING_MAGIC, struct.pack(">BH", _RING_VERSION, len(repo)), repo,
                 struct.pack(">H", len(self.versions))]
        for keys in self.versions:
            index = keys.index_key.to_bytes()
            parts += [struct.pack(">I", keys.version), keys.data_key, keys.keyword_key,
                      struct.pack(">I", len(index)), index]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyRing:
        try:
            if data[:4] != _RING_MAGIC:
                raise FormatError("not a Radcrypt key ring")
            version, repo_len = struct.unpack_from(">BH", data, 4)
            if version != _RING_VERSION:
                raise FormatError(f"unsupported key ring version {version}")
            offset = 7
            repo_id = data[offset : offset + repo_len].decode()
            offset += repo_len
            (count,) = struct.unpack_from(">H", data, offset)
            offset += 2
            versions = []
            for _ in range(count):
                (number,) = struct.unpack_from(">I", data, offset)
                data_key = data[offset + 4 : offset + 36]
                keyword_key = data[offset + 36 : offset + 68]
                (index_len,) = struct.unpack_from(">I", data, offset + 68)
                offset += 72
                if len(data_key) != 32 or len(keyword_key) != 32:
                    raise FormatError("key ring is truncated")
                index_key = IndexKey.from_bytes(data[offset : offset + index_len])
                offset += index_len
                versions.append(VersionKeys(number, data_key, keyword_key, index_key))
            if offset != len(data):
                raise FormatError("key ring has trailing bytes")
            return cls(repo_id, tuple(versions))
        except (struct.error, UnicodeDecodeError, ValueError):
            raise FormatError("key ring is malformed") from None


def _derive(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    # pycryptodome's stub says str, the function takes bytes (and we want UTF-8 exactly).
    key = scrypt(password.encode("utf-8"), salt, 32, N=1 << log2_n, r=r, p=p)  # type: ignore[arg-type]
    assert isinstance(key, bytes)
    return key


def wrap_with_password(
    secret: bytes, password: str, *, log2_n: int = DEFAULT_SCRYPT_LOG2_N, r: int = SCRYPT_R,
    p: int = SCRYPT_P
) -> bytes:
    """Encrypt ``secret`` under a key derived from ``password`` with scrypt."""
    if not password:
        raise ValueError("an empty password cannot protect keys")
    refused = check_scrypt_parameters(log2_n, r, p)
    if refused is not None:  # never write what unwrapping would refuse
        raise ValueError(refused)
    header = _PW_HEAD.pack(_PW_MAGIC, _PW_VERSION, log2_n, r, p, random_bytes(16))
    key = _derive(password, header[-16:], log2_n, r, p)
    return header + aead.seal(key, secret, header)


def unwrap_with_password(blob: bytes, password: str) -> bytes:
    """Decrypt a password-wrapped secret; WrongPassword when it does not open."""
    if len(blob) < _PW_HEAD.size:
        raise FormatError("password-protected file is truncated")
    magic, version, log2_n, r, p, salt = _PW_HEAD.unpack_from(blob)
    if magic != _PW_MAGIC or version != _PW_VERSION:
        raise FormatError("not a password-protected Radcrypt file of a known version")
    refused = check_scrypt_parameters(log2_n, r, p)
    if refused is not None:  # checked before any scrypt work
        raise FormatError(f"password-protected file refused: {refused}")
    key = _derive(password, salt, log2_n, r, p)
    try:
        return aead.open_sealed(key, blob[_PW_HEAD.size :], blob[: _PW_HEAD.size])
    except DecryptionError:
        raise WrongPassword("wrong password, or the file was altered") from None
