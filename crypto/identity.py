"""User identities: an X25519 key pair to receive keys and an Ed25519 pair to sign.

The private halves live in one file on the user's machine, encrypted under the user's
password (crypto.keys.wrap_with_password: scrypt N = 2^17, r = 8, p = 1, fresh salt,
AES-256-GCM). The public halves travel as a "card" the data owner registers.

Identity serialization inside the password envelope (docs/FORMAT.md)::

    "RCID" | version u8 (1) | len u16 | user_id | len u16 | name (UTF-8)
           | X25519 private (32) | Ed25519 seed (32)

The identity backup file (docs/FORMAT-2.md 12) holds the same serialization under a
separate backup passphrase, so that losing the workstation loses nothing: scrypt (the
``cryptography`` package) derives 64 bytes from the passphrase and a fresh salt; the first
32 key AES-256-GCM, the last 32 give a check value that tells a wrong passphrase from a
damaged file (an offline guesser learns nothing from it that the GCM tag does not tell)::

    "RCIB" | version u8 (1) | kdf u8 (1: scrypt) | log2 N u8 | r u8 | p u8 | salt (16)
           | check (16) | nonce (12) | AES-256-GCM(identity serialization) with tag (16)

The associated data of the AEAD is every byte before the ciphertext (the header).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import struct
import unicodedata
from dataclasses import dataclass

from Cryptodome.Protocol import DH
from Cryptodome.PublicKey import ECC
from Cryptodome.Signature import eddsa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from crypto.csprng import random_bytes
from crypto.errors import FormatError
from crypto.keys import (
    DEFAULT_SCRYPT_LOG2_N,
    MAX_SCRYPT_LOG2_N,
    SCRYPT_P,
    SCRYPT_R,
    WrongPassword,
    check_scrypt_parameters,
    unwrap_with_password,
    wrap_with_password,
)

CARD_FORMAT = "radcrypt-card-v1"
_MAGIC = b"RCID"
_VERSION = 1
_USER_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class SignatureError(FormatError):
    """A signature does not verify, or was made by a key we do not trust."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, field: str, size: int, what: str = "card") -> bytes:
    if not isinstance(text, str):
        raise FormatError(f"{what} field {field!r} must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise FormatError(f"{what} field {field!r} is not valid base64") from None
    if len(raw) != size:
        raise FormatError(f"{what} field {field!r} must decode to {size} bytes")
    return raw


def fingerprint(sign_public: bytes, enc_public: bytes) -> str:
    """A short, comparable digest of a user's two public keys (read it aloud to check)."""
    digest = hashlib.sha256(b"radcrypt/fingerprint/v1" + sign_public + enc_public).hexdigest()
    return "-".join(digest[i : i + 4] for i in range(0, 24, 4))


def new_user_id(name: str) -> str:
    """A readable, unique user id: a slug of the name plus 24 random bits."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:40] or "user"
    return f"{slug}-{random_bytes(3).hex()}"


@dataclass(frozen=True)
class PublicCard:
    """What a user gives the owner to be registered: id, name and two public keys."""

    user_id: str
    name: str
    enc_public: bytes
    sign_public: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.sign_public, self.enc_public)

    def to_json(self) -> str:
        return json.dumps({"format": CARD_FORMAT, "user_id": self.user_id, "name": self.name,
                           "x25519": _b64(self.enc_public), "ed25519": _b64(self.sign_public)},
                          indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> PublicCard:
        try:
            raw = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"card is not valid JSON: {exc.msg if hasattr(exc, 'msg') else exc}"
                              ) from None
        except (ValueError, RecursionError):  # a 5000-digit number, arrays nested too deep
            raise FormatError("card is not valid JSON: a number too long or nesting too "
                              "deep") from None
        if not isinstance(raw, dict) or raw.get("format") != CARD_FORMAT:
            raise FormatError(f"card field 'format' must be {CARD_FORMAT!r}")
        user_id, name = raw.get("user_id"), raw.get("name")
        if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id):
            raise FormatError("card field 'user_id' is missing or not a valid user id")
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise FormatError("card field 'name' must be 1 to 200 characters")
        return cls(user_id, name, _unb64(raw.get("x25519"), "x25519", 32),
                   _unb64(raw.get("ed25519"), "ed25519", 32))


@dataclass(frozen=True, eq=False)
class Identity:
    """A user's private keys; never written anywhere except password-wrapped."""

    user_id: str
    name: str
    enc_private: bytes
    sign_private: bytes

    def __repr__(self) -> str:
        return f"Identity(user_id={self.user_id!r}, name={self.name!r}, <secret>)"

    @classmethod
    def generate(cls, name: str, user_id: str | None = None) -> Identity:
        if not name.strip():
            raise ValueError("a name is needed")
        uid = user_id or new_user_id(name)
        if not _USER_ID.fullmatch(uid):
            raise ValueError(f"invalid user id {uid!r}")
        enc = ECC.generate(curve="Curve25519")
        sign = ECC.generate(curve="Ed25519")
        assert enc.seed is not None and sign.seed is not None
        return cls(uid, name.strip(), bytes(enc.seed), bytes(sign.seed))

    @property
    def enc_public(self) -> bytes:
        key = DH.import_x25519_private_key(self.enc_private)
        return bytes(key.public_key().export_key(format="raw"))

    @property
    def sign_public(self) -> bytes:
        key = eddsa.import_private_key(self.sign_private)
        return bytes(key.public_key().export_key(format="raw"))

    def card(self) -> PublicCard:
        return PublicCard(self.user_id, self.name, self.enc_public, self.sign_public)

    def sign(self, message: bytes) -> bytes:
        signer = eddsa.new(eddsa.import_private_key(self.sign_private), "rfc8032")
        return bytes(signer.sign(message))

    def to_bytes(self) -> bytes:
        uid, name = self.user_id.encode(), self.name.encode("utf-8")
        return (_MAGIC + struct.pack(">BH", _VERSION, len(uid)) + uid
                + struct.pack(">H", len(name)) + name + self.enc_private + self.sign_private)

    @classmethod
    def from_bytes(cls, data: bytes) -> Identity:
        try:
            if data[:4] != _MAGIC:
                raise FormatError("not a Radcrypt identity")
            version, uid_len = struct.unpack_from(">BH", data, 4)
            if version != _VERSION:
                raise FormatError(f"unsupported identity version {version}")
            offset = 7
            uid = data[offset : offset + uid_len].decode()
            offset += uid_len
            (name_len,) = struct.unpack_from(">H", data, offset)
            offset += 2
            name = data[offset : offset + name_len].decode("utf-8")
            offset += name_len
            enc, sign = data[offset : offset + 32], data[offset + 32 : offset + 64]
            if len(sign) != 32 or offset + 64 != len(data):
                raise FormatError("identity has the wrong length")
            return cls(uid, name, enc, sign)
        except (struct.error, UnicodeDecodeError):
            raise FormatError("identity is malformed") from None


def seal_identity(identity: Identity, password: str,
                  log2_n: int = DEFAULT_SCRYPT_LOG2_N) -> bytes:
    """The identity file's bytes: the private keys under the user's password."""
    return wrap_with_password(identity.to_bytes(), password, log2_n=log2_n)


def open_identity(blob: bytes, password: str) -> Identity:
    """Unlock an identity file; WrongPassword when the password does not open it."""
    return Identity.from_bytes(unwrap_with_password(blob, password))


def verify(sign_public: bytes, message: bytes, signature: bytes) -> None:
    """Raise SignatureError unless ``signature`` is ``sign_public``'s over ``message``."""
    try:
        verifier = eddsa.new(eddsa.import_public_key(sign_public), "rfc8032")
        verifier.verify(message, signature)
    except ValueError:
        raise SignatureError("signature does not verify") from None


# --- identity backup (docs/FORMAT-2.md 12) ----------------------------------------------------

BACKUP_MAGIC = b"RCIB"
BACKUP_VERSION = 1
BACKUP_KDF_SCRYPT = 1
BACKUP_LOG2_N = MAX_SCRYPT_LOG2_N  # 256 MiB, about 1 s: a backup lives on removable media
_BACKUP_HEAD = struct.Struct(">4sBBBBB16s16s12s")
_BACKUP_CHECK_INFO = b"radcrypt/identity-backup/check/v1"


class WrongBackupPassphrase(WrongPassword):
    """The passphrase does not open this identity backup (or its salt or work factor
    were changed)."""


def _backup_keys(passphrase: str, salt: bytes, log2_n: int) -> tuple[bytes, bytes]:
    derived = Scrypt(salt=salt, length=64, n=1 << log2_n, r=SCRYPT_R,
                     p=SCRYPT_P).derive(passphrase.encode("utf-8"))
    check = hashlib.sha256(_BACKUP_CHECK_INFO + derived[32:]).digest()[:16]
    return derived[:32], check


def seal_backup(identity: Identity, passphrase: str, log2_n: int = BACKUP_LOG2_N) -> bytes:
    """The bytes of an identity backup file: the private keys under ``passphrase``."""
    if not passphrase:
        raise ValueError("a backup passphrase is needed")
    problem = check_scrypt_parameters(log2_n, SCRYPT_R, SCRYPT_P)
    if problem:
        raise ValueError(problem)
    salt, nonce = random_bytes(16), random_bytes(12)
    key, check = _backup_keys(passphrase, salt, log2_n)
    header = _BACKUP_HEAD.pack(BACKUP_MAGIC, BACKUP_VERSION, BACKUP_KDF_SCRYPT, log2_n,
                               SCRYPT_R, SCRYPT_P, salt, check, nonce)
    return header + AESGCM(key).encrypt(nonce, identity.to_bytes(), header)


def open_backup(blob: bytes, passphrase: str) -> Identity:
    """The identity in a backup file. FormatError: not a backup, an unknown version or
    refused parameters, or a file changed after it was written; WrongBackupPassphrase:
    the passphrase does not open it."""
    if len(blob) < _BACKUP_HEAD.size + 16 or blob[:4] != BACKUP_MAGIC:
        raise FormatError("not a Radcrypt identity backup (magic 'RCIB' missing or file "
                          "too short)")
    _magic, version, kdf, log2_n, r, p, salt, check, nonce = _BACKUP_HEAD.unpack_from(blob)
    if version != BACKUP_VERSION:
        raise FormatError(f"identity backup version {version} is not supported "
                          f"(this program reads version {BACKUP_VERSION})")
    if kdf != BACKUP_KDF_SCRYPT:
        raise FormatError(f"identity backup field 'kdf' is {kdf}, not 1 (scrypt)")
    problem = check_scrypt_parameters(log2_n, r, p)
    if problem:
        raise FormatError(f"identity backup field 'scrypt parameters': {problem}")
    key, expected = _backup_keys(passphrase, salt, log2_n)
    if not hmac.compare_digest(check, expected):
        raise WrongBackupPassphrase("wrong passphrase: the identity backup stays locked")
    header = blob[:_BACKUP_HEAD.size]
    try:
        plain = AESGCM(key).decrypt(nonce, blob[_BACKUP_HEAD.size:], header)
    except InvalidTag:
        raise FormatError("the identity backup was changed or damaged after it was written "
                          "(its authentication tag does not verify)") from None
    return Identity.from_bytes(plain)


# --- co-owners of a repository (docs/FORMAT-2.md 2.4) -----------------------------------------

_ENDORSEMENT_DOMAIN = b"radcrypt/co-owner/v1"


@dataclass(frozen=True)
class ManifestOwners:
    """Who may sign a repository's manifest, grants, user records, checkpoints and
    owner-only log entries: the owner (``root``, the key clients pin and the service is
    configured with) and the co-owners it endorsed; ``keys`` maps user id to key."""

    owner_id: str
    root: bytes
    keys: dict[str, bytes]

    def is_owner(self, user_id: str) -> bool:
        return user_id in self.keys

    def has_key(self, key: bytes) -> bool:
        return any(hmac.compare_digest(key, k) for k in self.keys.values())


def _endorsement_message(repo_id: str, user_id: str, sign_public: bytes) -> bytes:
    parts = [_ENDORSEMENT_DOMAIN, repo_id.encode(), user_id.encode(), sign_public]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def endorse_co_owner(owner: Identity, repo_id: str, user_id: str, sign_public: bytes) -> bytes:
    """The owner's signature making ``user_id`` (key ``sign_public``) a co-owner of
    ``repo_id``: bound to the repository, the user id and the key."""
    if len(sign_public) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return owner.sign(_endorsement_message(repo_id, user_id, sign_public))


def manifest_owners(payload: object, repo_id: str, signer: bytes) -> ManifestOwners:
    """The owners of a manifest whose JSON signature ``signer`` made (already verified by
    the caller). Without ``co_owners`` (every manifest before co-owners): the signer is
    the owner. With them: ``owner_key`` is the owner's key, each co-owner's endorsement
    must verify under it, and the signer must be the owner or one of them. FormatError
    (SignatureError for a signature) names the field; the caller still compares ``root``
    with the key it pinned or was configured with."""
    if not isinstance(payload, dict):
        raise FormatError("manifest payload must be a JSON object")
    owner_id = payload.get("owner")
    owner_id = owner_id if isinstance(owner_id, str) else ""
    if "co_owners" not in payload and "owner_key" not in payload:
        return ManifestOwners(owner_id, signer, {owner_id: signer} if owner_id else {})
    if not owner_id:
        raise FormatError("manifest field 'owner' is missing but 'co_owners' is present")
    root = _unb64(payload.get("owner_key"), "owner_key", 32, "manifest")
    listed = payload.get("co_owners")
    if not isinstance(listed, list) or not listed:
        raise FormatError("manifest field 'co_owners' must be a non-empty list")
    keys = {owner_id: root}
    ids: list[str] = []
    for entry in listed:
        if not isinstance(entry, dict) or set(entry) != {"user_id", "ed25519", "endorsement"}:
            raise FormatError("manifest field 'co_owners' must hold objects {\"user_id\", "
                              "\"ed25519\", \"endorsement\"}")
        user_id = entry["user_id"]
        if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id) \
                or user_id == owner_id:
            raise FormatError("manifest field 'co_owners' names an invalid user id or the "
                              "owner")
        key = _unb64(entry["ed25519"], "co_owners.ed25519", 32, "manifest")
        endorsement = _unb64(entry["endorsement"], "co_owners.endorsement", 64, "manifest")
        try:
            verify(root, _endorsement_message(repo_id, user_id, key), endorsement)
        except SignatureError:
            raise SignatureError(f"manifest field 'co_owners': the endorsement of {user_id!r} "
                                 "is not the owner's signature") from None
        ids.append(user_id)
        keys[user_id] = key
    if ids != sorted(set(ids)):
        raise FormatError("manifest field 'co_owners' must be sorted by user_id, without "
                          "duplicates")
    owners = ManifestOwners(owner_id, root, keys)
    if not owners.has_key(signer):
        raise SignatureError("the manifest is signed by a key that is neither its owner's "
                             "nor a co-owner's")
    return owners
