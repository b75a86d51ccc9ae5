"""Wrapping a secret to a recipient's X25519 public key (a grant), as age's X25519 stanza.

An ephemeral X25519 key agrees a shared secret with the recipient's static key; HKDF-
SHA256 turns it into an AES-256 key, salted with both public keys and bound by its info
string to the context (the repository id and the recipient's user id), and AES-256-GCM
encrypts the secret with the header followed by the context as associated data.
Layout (docs/FORMAT.md)::

    "RCGR" | version u8 (1) | ephemeral X25519 public key (32) | AEAD envelope
"""

from __future__ import annotations

from Cryptodome.Hash import SHA256
from Cryptodome.Protocol import DH
from Cryptodome.Protocol.KDF import HKDF
from Cryptodome.PublicKey import ECC

from crypto import aead
from crypto.errors import DecryptionError, FormatError

_MAGIC = b"RCGR"
_VERSION = 1
_HEAD = 4 + 1 + 32
_INFO = b"radcrypt/grant/v1"


def _key(shared: bytes, eph_public: bytes, recipient_public: bytes, context: bytes) -> bytes:
    key = HKDF(shared, 32, eph_public + recipient_public, SHA256, context=_INFO + context)
    assert isinstance(key, bytes)
    return key


def _agree(private: ECC.EccKey, public: ECC.EccKey) -> bytes:
    try:
        shared = DH.key_agreement(static_priv=private, static_pub=public, kdf=lambda x: x)
    except ValueError:
        raise DecryptionError("key agreement failed (invalid public key)") from None
    assert isinstance(shared, bytes)
    return shared


def wrap_to_recipient(secret: bytes, recipient_public: bytes, context: bytes) -> bytes:
    if len(recipient_public) != 32:
        raise ValueError("an X25519 public key is 32 bytes")
    ephemeral = ECC.generate(curve="Curve25519")
    eph_public = bytes(ephemeral.public_key().export_key(format="raw"))
    shared = _agree(ephemeral, DH.import_x25519_public_key(recipient_public))
    header = _MAGIC + bytes([_VERSION]) + eph_public
    key = _key(shared, eph_public, recipient_public, context)
    return header + aead.seal(key, secret, header + context)


def unwrap_for_recipient(blob: bytes, recipient_private: bytes, context: bytes) -> bytes:
    """The secret; DecryptionError if this key or this context does not open it."""
    if len(blob) < _HEAD or blob[:4] != _MAGIC:
        raise FormatError("not a Radcrypt grant")
    if blob[4] != _VERSION:
        raise FormatError(f"unsupported grant version {blob[4]}")
    eph_public = blob[5:37]
    private = DH.import_x25519_private_key(recipient_private)
    recipient_public = bytes(private.public_key().export_key(format="raw"))
    try:
        ephemeral = DH.import_x25519_public_key(eph_public)
    except ValueError:  # all-zero or low-order point: not a grant anyone could have made
        raise DecryptionError("grant carries an invalid ephemeral key") from None
    shared = _agree(private, ephemeral)
    key = _key(shared, eph_public, recipient_public, context)
    return aead.open_sealed(key, blob[_HEAD:], blob[:_HEAD] + context)
