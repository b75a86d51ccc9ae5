"""Every way an AES-GCM envelope can be damaged raises DecryptionError, never garbage."""

from __future__ import annotations

import os

import pytest

from crypto import aead
from crypto.errors import DecryptionError

KEY = bytes(range(32))
AD = aead.associated_data("repo-a", "objects", "0" * 32, 1)
SMALL_LOG2 = 10  # 1 KiB chunks keep multi-chunk cases fast
CHUNK = 1 << SMALL_LOG2
FULL = CHUNK + aead.CHUNK_OVERHEAD


def _seal(data: bytes) -> bytes:
    return aead.seal(KEY, data, AD, chunk_log2=SMALL_LOG2)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 7])
def test_round_trip_and_size(size: int) -> None:
    data = os.urandom(size)
    env = _seal(data)
    assert len(env) == aead.ciphertext_size(size, SMALL_LOG2)
    assert aead.open_sealed(KEY, env, AD) == data
    pieces = [env[i : i + 333] for i in range(0, len(env), 333)]
    assert b"".join(aead.decrypt_stream(KEY, pieces, AD)) == data


def test_streaming_encryption_of_many_small_blocks() -> None:
    data = os.urandom(10 * CHUNK + 5)
    blocks = [data[i : i + 100] for i in range(0, len(data), 100)]
    env = b"".join(aead.encrypt_stream(KEY, blocks, AD, SMALL_LOG2))
    assert aead.open_sealed(KEY, env, AD) == data


def test_nonces_and_salts_are_fresh() -> None:
    a, b = _seal(b"same"), _seal(b"same")
    assert a != b
    assert a[8:32] != b[8:32]


def _tamper_cases() -> dict[str, bytes]:
    data = os.urandom(4 * CHUNK + 10)
    env = _seal(data)
    head, body = env[: aead.HEADER_SIZE], env[aead.HEADER_SIZE :]
    chunks = [body[i : i + FULL] for i in range(0, len(body), FULL)]
    flipped = bytearray(env)
    flipped[len(env) // 2] ^= 1
    header_flip = bytearray(env)
    header_flip[10] ^= 0x80
    tag_flip = bytearray(env)
    tag_flip[-1] ^= 1
    nonce_flip = bytearray(env)
    nonce_flip[aead.HEADER_SIZE] ^= 1
    return {
        "bit flip in body": bytes(flipped),
        "bit flip in salt": bytes(header_flip),
        "bit flip in tag": bytes(tag_flip),
        "bit flip in nonce": bytes(nonce_flip),
        "truncated at chunk boundary": head + b"".join(chunks[:2]),
        "truncated mid chunk": env[: len(env) - 5],
        "last chunk dropped": head + b"".join(chunks[:-1]),
        "chunks reordered": head + chunks[1] + chunks[0] + b"".join(chunks[2:]),
        "chunk duplicated": head + chunks[0] + b"".join(chunks),
        "data appended": env + os.urandom(40),
        "chunk appended": env + chunks[0],
        "header only": head,
        "empty": b"",
        "shorter than header": env[:10],
        "bad magic": b"XXXX" + env[4:],
        "bad version": env[:4] + b"\x09" + env[5:],
        "bad chunk size": env[:5] + b"\x30" + env[6:],
        "other envelope's header": _seal(data)[: aead.HEADER_SIZE] + body,
    }


@pytest.mark.parametrize("case", sorted(_tamper_cases()))
def test_tampering_is_detected(case: str) -> None:
    env = _tamper_cases()[case]
    with pytest.raises(DecryptionError):
        aead.open_sealed(KEY, env, AD)


def test_wrong_key_and_moved_object_fail() -> None:
    env = _seal(b"pixel data")
    with pytest.raises(DecryptionError):
        aead.open_sealed(bytes(32), env, AD)
    for moved in [
        aead.associated_data("repo-b", "objects", "0" * 32, 1),
        aead.associated_data("repo-a", "thumbs", "0" * 32, 1),
        aead.associated_data("repo-a", "objects", "1" * 32, 1),
        aead.associated_data("repo-a", "objects", "0" * 32, 2),
    ]:
        with pytest.raises(DecryptionError):
            aead.open_sealed(KEY, env, moved)


def test_error_message_reveals_no_secret() -> None:
    env = bytearray(_seal(b"secret pixels"))
    env[-1] ^= 1
    with pytest.raises(DecryptionError) as info:
        aead.open_sealed(KEY, bytes(env), AD)
    text = str(info.value)
    assert "secret pixels" not in text and KEY.hex() not in text and "authentication" in text


def test_associated_data_is_unambiguous() -> None:
    assert aead.associated_data("ab", "c", "d", 1) != aead.associated_data("a", "bc", "d", 1)


def test_bad_key_length_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="32-byte"):
        aead.seal(b"short", b"x", AD)


def test_large_stream_is_not_held_in_memory() -> None:
    """Streaming 96 MiB through encryption and decryption keeps only chunks in flight."""
    import tracemalloc

    block = os.urandom(1 << 20)
    tracemalloc.start()
    total = 0
    ciphertext = aead.encrypt_stream(KEY, (block for _ in range(96)), AD)
    for piece in aead.decrypt_stream(KEY, ciphertext, AD):
        total += len(piece)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == 96 << 20
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_object_key_is_rfc5869_hkdf_sha256() -> None:
    """The per-object key (standard-library HMAC) is HKDF-SHA256 as pycryptodome and
    cryptography compute it: envelopes written before and after open alike."""
    from Cryptodome.Hash import SHA256
    from Cryptodome.Protocol.KDF import HKDF
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF as CryptographyHKDF

    for _ in range(20):
        key, salt = os.urandom(32), os.urandom(aead.SALT_SIZE)
        ours = aead._object_key(key, salt)
        assert ours == HKDF(key, 32, salt, SHA256, context=b"radcrypt/aead/v1")
        assert ours == CryptographyHKDF(hashes.SHA256(), 32, salt,
                                        b"radcrypt/aead/v1").derive(key)


@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK, 5 * CHUNK + 7])
def test_whole_and_streamed_envelopes_are_the_same_bytes(
        monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """seal (no chunk copies) writes byte for byte what encrypt_stream writes for the same
    randomness, and an independent AES-GCM (pycryptodome) opens every chunk of it."""
    import hashlib
    import itertools
    import struct

    from Cryptodome.Cipher import AES

    def fixed_randomness() -> None:
        counter = itertools.count()
        monkeypatch.setattr(aead, "random_bytes",
                            lambda n: bytes((next(counter) + i) % 256 for i in range(n)))

    data = os.urandom(size)
    fixed_randomness()
    whole = _seal(data)
    fixed_randomness()
    blocks = [data[i:i + 100] for i in range(0, len(data), 100)] or [b""]
    streamed = b"".join(aead.encrypt_stream(KEY, blocks, AD, SMALL_LOG2))
    assert whole == streamed
    header, body = whole[:aead.HEADER_SIZE], whole[aead.HEADER_SIZE:]
    key = aead._object_key(KEY, header[8:])
    prefix = header + hashlib.sha256(AD).digest()
    chunks = [body[i:i + FULL] for i in range(0, len(body), FULL)]
    plain = b""
    for index, chunk in enumerate(chunks):
        cipher = AES.new(key, AES.MODE_GCM, nonce=chunk[:12], mac_len=16)
        cipher.update(prefix + struct.pack(">QB", index, index == len(chunks) - 1))
        plain += cipher.decrypt_and_verify(chunk[12:-16], chunk[-16:])
    assert plain == data
    assert aead.open_sealed(KEY, memoryview(whole), AD) == data
