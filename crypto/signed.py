"""Signed records: an object the owner vouches for, bound to its name in the bucket.

The signature covers a domain string, the record kind, the object name and the payload,
so a signed grant or user record copied to another name, or used as another kind of
record, no longer verifies. Layout (docs/FORMAT.md)::

    "RCSR" | version u8 (1) | signer Ed25519 public key (32) | signature (64) | payload
"""

from __future__ import annotations

import base64
import hmac
import json
import struct

from crypto.errors import FormatError
from crypto.identity import Identity, SignatureError, verify

_MAGIC = b"RCSR"
_VERSION = 1
_HEAD = 4 + 1 + 32 + 64


def _message(kind: str, name: str, payload: bytes) -> bytes:
    parts = [b"radcrypt/signed/v1", kind.encode(), name.encode(), payload]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def sign_record(signer: Identity, kind: str, name: str, payload: bytes) -> bytes:
    signature = signer.sign(_message(kind, name, payload))
    return _MAGIC + bytes([_VERSION]) + signer.sign_public + signature + payload


def signer_of(blob: bytes) -> bytes:
    """The public key a record claims to be signed by (not yet verified)."""
    if len(blob) < _HEAD or blob[:4] != _MAGIC or blob[4] != _VERSION:
        raise FormatError("not a signed Radcrypt record of a known version")
    return blob[5:37]


def open_record(blob: bytes, kind: str, name: str, trusted: list[bytes]) -> bytes:
    """The payload, if signed for this kind and name by one of the ``trusted`` keys."""
    public = signer_of(blob)
    if not any(hmac.compare_digest(public, key) for key in trusted):
        raise SignatureError(f"{kind} {name} is signed by a key that is not trusted")
    signature, payload = blob[37:101], blob[101:]
    verify(public, _message(kind, name, payload), signature)
    return payload


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_json(signer: Identity, kind: str, name: str, obj: dict[str, object]) -> bytes:
    """A readable signed JSON document: the payload, the signer's key, the signature."""
    signature = signer.sign(_message(kind, name, _canonical(obj)))
    doc = {"payload": obj, "signer": base64.b64encode(signer.sign_public).decode(),
           "signature": base64.b64encode(signature).decode()}
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def _load(blob: bytes, what: str) -> object:
    """Parse a stored JSON document; every way it can be malformed is a FormatError.

    Why not just json.loads: the bytes come from the bucket, and besides invalid JSON or
    UTF-8 (ValueError) a hostile document can nest arrays deeper than Python's recursion
    limit (RecursionError) or hold an integer too long to convert (ValueError): found by
    the file fuzzer (tests/fuzz/test_file_fuzz.py)."""
    try:
        return json.loads(blob)
    except (ValueError, RecursionError):
        raise FormatError(f"{what} is not valid JSON") from None


def json_signer(blob: bytes) -> bytes | None:
    """The key a signed JSON document claims, or None for an unsigned document."""
    doc = _load(blob, "signed document")
    if not isinstance(doc, dict) or "signature" not in doc:
        return None
    try:
        key = base64.b64decode(doc["signer"], validate=True)
    except (ValueError, KeyError, TypeError):
        raise FormatError("signed document is malformed") from None
    if len(key) != 32:
        raise FormatError("signed document names a malformed key")
    return key


def open_json(blob: bytes, kind: str, name: str, trusted: list[bytes]) -> dict[str, object]:
    """The payload of a signed JSON document if one of ``trusted`` signed it for this name."""
    public = json_signer(blob)
    if public is None:
        raise SignatureError(f"{kind} {name} is not signed")
    if not any(hmac.compare_digest(public, key) for key in trusted):
        raise SignatureError(f"{kind} {name} is signed by a key that is not trusted")
    doc = _load(blob, f"{kind} {name}")
    if not isinstance(doc, dict):  # json_signer read the same bytes as an object
        raise FormatError(f"{kind} {name}: not a signed document")
    payload = doc.get("payload")
    if not isinstance(payload, dict):
        raise FormatError(f"{kind} {name}: payload must be a JSON object")
    try:
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, TypeError):
        raise FormatError(f"{kind} {name}: signature is not base64") from None
    try:
        message = _message(kind, name, _canonical(payload))
    except (ValueError, RecursionError):  # nested too deep to write back
        raise FormatError(f"{kind} {name}: payload is nested too deeply") from None
    verify(public, message, signature)
    return payload
