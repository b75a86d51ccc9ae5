"""User identities: an X25519 key pair to receive keys and an Ed25519 pair to sign.

The private halves live in one file on the user's machine, encrypted under the user's
password (crypto.keys.wrap_with_password: scrypt N = 2^17, r = 8, p = 1, fresh salt,
AES-256-GCM). The public halves travel as a "card" the data owner registers.

Identity serialization inside the password envelope (docs/FORMAT.md)::

    "RCID" | version u8 (1) | len u16 | user_id | len u16 | name (UTF-8)
           | X25519 private (32) | Ed25519 seed (32)
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import unicodedata
from dataclasses import dataclass

from Cryptodome.Protocol import DH
from Cryptodome.PublicKey import ECC
from Cryptodome.Signature import eddsa

from crypto.csprng import random_bytes
from crypto.errors import FormatError
from crypto.keys import DEFAULT_SCRYPT_LOG2_N, unwrap_with_password, wrap_with_password

CARD_FORMAT = "radcrypt-card-v1"
_MAGIC = b"RCID"
_VERSION = 1
_USER_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class SignatureError(FormatError):
    """A signature does not verify, or was made by a key we do not trust."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, field: str, size: int) -> bytes:
    if not isinstance(text, str):
        raise FormatError(f"card field {field!r} must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise FormatError(f"card field {field!r} is not valid base64") from None
    if len(raw) != size:
        raise FormatError(f"card field {field!r} must decode to {size} bytes")
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
