"""AES-256-GCM envelopes with associated data, in authenticated chunks (STREAM).

Why chunks: an original DICOM series can be hundreds of megabytes; encrypting it in
64 KiB chunks lets the client stream it to and from S3 without a whole-file copy in
memory, while the chunk index and a final-chunk flag in every chunk's associated data
make truncation, reordering and appending detectable (the STREAM construction of
Hoang, Reyhanitabar, Rogaway and Vizár, as used by age).

Layout (all integers big-endian), specified byte by byte in docs/FORMAT.md::

    header  = "RCAE" | version (u8 = 1) | chunk_log2 (u8) | reserved (u16 = 0) | salt (24 bytes)
    chunk_i = nonce (12 random bytes) | AES-256-GCM ciphertext | tag (16 bytes)

    object key = HKDF-SHA256(data key, salt, info = "radcrypt/aead/v1", 32 bytes)
    AD_i       = header | SHA-256(associated data) | i (u64) | final (u8: 1 on the last chunk)

Every chunk but the last holds exactly 2**chunk_log2 plaintext bytes; the last holds
1..2**chunk_log2 bytes, or 0 when the whole plaintext is empty. A per-object key derived
from a fresh 192-bit salt keeps the number of random 96-bit nonces per GCM key tiny,
far below the 2**32 limit, however many objects a repository key protects.

AES-GCM itself is the ``cryptography`` package's AESGCM (OpenSSL: AES-NI and carry-less
multiplication, several GB/s), the HKDF the standard library's HMAC. The envelope bytes
do not depend on the library: AESGCM's output is the ciphertext followed by the 16-byte tag, the
layout above (the vectors in tests/vectors/aead.json are checked against both).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto.csprng import random_bytes
from crypto.errors import DecryptionError

MAGIC = b"RCAE"
VERSION = 1
DEFAULT_CHUNK_LOG2 = 16
MIN_CHUNK_LOG2 = 10
MAX_CHUNK_LOG2 = 24
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
SALT_SIZE = 24
HEADER_SIZE = 4 + 1 + 1 + 2 + SALT_SIZE
CHUNK_OVERHEAD = NONCE_SIZE + TAG_SIZE
_HEADER = struct.Struct(">4sBBH24s")
_CHUNK_AD_TAIL = struct.Struct(">QB")
_HKDF_INFO = b"radcrypt/aead/v1"

_AUTH_FAILED = (
    "ciphertext failed authentication: wrong key, or the object was altered, "
    "truncated, reordered or moved"
)


def associated_data(repo_id: str, kind: str, object_id: str, key_version: int) -> bytes:
    """Canonical associated data binding a ciphertext to its place in a repository.

    Length-prefixed fields, so no two different tuples encode to the same bytes;
    a ciphertext copied to another repository, kind, id or key version fails to open.
    """
    parts = [b"radcrypt/ad/v1"]
    parts += [s.encode("utf-8") for s in (repo_id, kind, object_id)]
    parts.append(struct.pack(">Q", key_version))
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def ciphertext_size(plaintext_size: int, chunk_log2: int = DEFAULT_CHUNK_LOG2) -> int:
    """Exact size of the envelope of a plaintext of ``plaintext_size`` bytes."""
    chunk = 1 << chunk_log2
    chunks = max(1, -(-plaintext_size // chunk))
    return HEADER_SIZE + plaintext_size + chunks * CHUNK_OVERHEAD


def _check_key(key: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
        raise ValueError("AES-256-GCM needs a 32-byte key")


def _object_key(key: bytes, salt: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) of the data key: extract with the salt, then the one
    32-byte output block of expand, T(1) = HMAC(PRK, info | 0x01). Written out with the
    standard library's C HMAC: pycryptodome's HKDF cost more per object than AES-GCM."""
    prk = hmac.digest(salt, key, "sha256")
    return hmac.digest(prk, _HKDF_INFO + b"\x01", "sha256")


class _ChunkCipher:
    """Per-object state shared by the encryptor and the decryptor."""

    def __init__(self, key: bytes, header: bytes, ad: bytes) -> None:
        salt = header[8:]
        self._aes = AESGCM(_object_key(key, salt))  # 16-byte tags, AESGCM's only size
        self._ad_prefix = header + hashlib.sha256(ad).digest()

    def _ad(self, index: int, final: bool) -> bytes:
        return self._ad_prefix + _CHUNK_AD_TAIL.pack(index, 1 if final else 0)

    def seal(self, index: int, final: bool, plaintext: bytes | memoryview) -> bytes:
        nonce = random_bytes(NONCE_SIZE)
        return nonce + self._aes.encrypt(nonce, plaintext, self._ad(index, final))

    def open(self, index: int, final: bool, chunk: bytes | memoryview) -> bytes:
        if len(chunk) < CHUNK_OVERHEAD:
            raise DecryptionError(_AUTH_FAILED)
        view = memoryview(chunk)
        try:
            return self._aes.decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:],
                                     self._ad(index, final))
        except InvalidTag:
            raise DecryptionError(_AUTH_FAILED) from None


def _new_header(chunk_log2: int) -> bytes:
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise ValueError(f"chunk_log2 must be in [{MIN_CHUNK_LOG2}, {MAX_CHUNK_LOG2}]")
    return _HEADER.pack(MAGIC, VERSION, chunk_log2, 0, random_bytes(SALT_SIZE))


def _parse_header(header: bytes) -> int:
    """Return the chunk size exponent of a well-formed header, else raise."""
    if len(header) < HEADER_SIZE:
        raise DecryptionError("ciphertext is truncated: shorter than the envelope header")
    magic, version, chunk_log2, reserved, _salt = _HEADER.unpack(header[:HEADER_SIZE])
    if magic != MAGIC:
        raise DecryptionError("not a Radcrypt envelope (unknown magic bytes)")
    if version != VERSION:
        raise DecryptionError(f"unsupported envelope version {version}")
    if reserved != 0 or not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise DecryptionError("malformed envelope header")
    return int(chunk_log2)


def _rechunk(blocks: Iterable[bytes], size: int) -> Iterator[tuple[bytes, bool]]:
    """Cut a stream of arbitrary blocks into (chunk, is_last) of exactly ``size`` bytes.

    Holds at most one chunk plus one block back, so that the last chunk is known to be
    the last before it is emitted (the final flag must be set on it).
    """
    buffer = bytearray()
    pending: bytes | None = None
    for block in blocks:
        buffer += block
        while len(buffer) >= size:
            if pending is not None:
                yield pending, False
            pending = bytes(buffer[:size])
            del buffer[:size]
    if pending is not None:
        if buffer:
            yield pending, False
            yield bytes(buffer), True
        else:
            yield pending, True
    else:
        yield bytes(buffer), True


def encrypt_stream(
    key: bytes, blocks: Iterable[bytes], ad: bytes, chunk_log2: int = DEFAULT_CHUNK_LOG2
) -> Iterator[bytes]:
    """Encrypt an iterable of plaintext blocks; yields the header, then one piece per chunk."""
    _check_key(key)
    header = _new_header(chunk_log2)
    cipher = _ChunkCipher(bytes(key), header, ad)
    yield header
    for index, (chunk, last) in enumerate(_rechunk(blocks, 1 << chunk_log2)):
        yield cipher.seal(index, last, chunk)


def decrypt_stream(key: bytes, blocks: Iterable[bytes], ad: bytes) -> Iterator[bytes]:
    """Decrypt and verify an envelope given as an iterable of byte blocks of any size.

    Yields verified plaintext chunk by chunk. A truncated stream is only detected at its
    end, so a caller writing to a file must write to a temporary name and keep it only
    when the iterator finished without raising.
    """
    _check_key(key)
    iterator = iter(blocks)
    buffer = bytearray()
    for block in iterator:
        buffer += block
        if len(buffer) >= HEADER_SIZE:
            break
    chunk_log2 = _parse_header(bytes(buffer[:HEADER_SIZE]))
    cipher = _ChunkCipher(bytes(key), bytes(buffer[:HEADER_SIZE]), ad)
    del buffer[:HEADER_SIZE]
    full = (1 << chunk_log2) + CHUNK_OVERHEAD
    index = 0
    for block in iterator:
        buffer += block
        while len(buffer) > full:  # strictly more: this chunk cannot be the last
            yield cipher.open(index, False, bytes(buffer[:full]))
            del buffer[:full]
            index += 1
    while len(buffer) > full:
        yield cipher.open(index, False, bytes(buffer[:full]))
        del buffer[:full]
        index += 1
    plaintext = cipher.open(index, True, bytes(buffer))
    if not plaintext and index > 0:
        raise DecryptionError(_AUTH_FAILED)  # an empty final chunk only for empty input
    yield plaintext


def seal(key: bytes, plaintext: bytes, ad: bytes, chunk_log2: int = DEFAULT_CHUNK_LOG2) -> bytes:
    """Encrypt a whole in-memory plaintext into one envelope (the bytes encrypt_stream
    gives for it, without copying the plaintext into chunks first)."""
    _check_key(key)
    header = _new_header(chunk_log2)
    cipher = _ChunkCipher(bytes(key), header, ad)
    view = memoryview(plaintext).cast("B")
    size = 1 << chunk_log2
    count = max(1, -(-len(view) // size))
    pieces = [header]
    pieces += [cipher.seal(i, i == count - 1, view[i * size:(i + 1) * size])
               for i in range(count)]
    return b"".join(pieces)


def open_sealed(key: bytes, envelope: bytes, ad: bytes) -> bytes:
    """Decrypt and verify a whole in-memory envelope (as decrypt_stream, without copies)."""
    _check_key(key)
    view = memoryview(envelope).cast("B")
    chunk_log2 = _parse_header(bytes(view[:HEADER_SIZE]))
    cipher = _ChunkCipher(bytes(key), bytes(view[:HEADER_SIZE]), ad)
    full = (1 << chunk_log2) + CHUNK_OVERHEAD
    body = view[HEADER_SIZE:]
    count = max(1, -(-len(body) // full))  # the last chunk: what remains, 1..full bytes
    pieces = [cipher.open(i, i == count - 1, body[i * full:(i + 1) * full])
              for i in range(count)]
    if not pieces[-1] and count > 1:
        raise DecryptionError(_AUTH_FAILED)  # an empty final chunk only for empty input
    return b"".join(pieces)
