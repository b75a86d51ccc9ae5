"""An independent reader of the AEAD envelope of docs/FORMAT.md section 5.

Written from the document alone (hashlib, hmac, struct and the `cryptography` package, no
Radcrypt module), and shared by the independent readers of tests/test_vectors.py
(format 1) and tests/test_pack.py (the pack entries of docs/FORMAT-2.md, which are F5
envelopes), so that both check the document through one reading of it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class SpecError(Exception):
    """The spec reader rejects its input."""


def spec_hkdf(ikm: bytes, salt: bytes, info: bytes, size: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869)."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < size:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:size]


def spec_chunk_ad(header: bytes, ad: bytes, index: int, final: bool) -> bytes:
    return header + hashlib.sha256(ad).digest() + struct.pack(">QB", index, int(final))


def spec_open(key: bytes, envelope: bytes, ad: bytes) -> bytes:
    """Open an AEAD envelope following docs/FORMAT.md alone."""
    if len(envelope) < 32:
        raise SpecError("shorter than the header")
    header = envelope[:32]
    magic, version, chunk_log2, reserved = struct.unpack(">4sBBH", header[:8])
    if magic != b"RCAE" or version != 1 or reserved != 0 or not 10 <= chunk_log2 <= 24:
        raise SpecError("bad header")
    object_key = spec_hkdf(key, header[8:], b"radcrypt/aead/v1")
    full = (1 << chunk_log2) + 28
    body, out, index = envelope[32:], [], 0
    while True:
        final = len(body) <= full
        chunk, body = body[:full], body[full:]
        if len(chunk) < 28:
            raise SpecError("chunk shorter than nonce and tag")
        try:
            text = AESGCM(object_key).decrypt(chunk[:12], chunk[12:],
                                              spec_chunk_ad(header, ad, index, final))
        except InvalidTag:
            raise SpecError("authentication failed") from None
        if final and not text and index > 0:
            raise SpecError("empty final chunk after other chunks")
        out.append(text)
        index += 1
        if final:
            return b"".join(out)


def spec_seal(key: bytes, plaintext: bytes, ad: bytes, chunk_log2: int, salt: bytes,
              nonces: list[bytes]) -> bytes:
    """Seal with the given salt and nonces: reproduces an envelope exactly."""
    header = b"RCAE" + struct.pack(">BBH", 1, chunk_log2, 0) + salt
    object_key = spec_hkdf(key, salt, b"radcrypt/aead/v1")
    size = 1 << chunk_log2
    pieces = [plaintext[i : i + size] for i in range(0, len(plaintext), size)] or [b""]
    out = [header]
    for index, (piece, nonce) in enumerate(zip(pieces, nonces, strict=True)):
        final = index == len(pieces) - 1
        out.append(nonce + AESGCM(object_key).encrypt(
            nonce, piece, spec_chunk_ad(header, ad, index, final)))
    return b"".join(out)
