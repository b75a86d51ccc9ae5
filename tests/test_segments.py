"""Index segments: round trip, and a clear SegmentError for every kind of damage."""

from __future__ import annotations

import secrets
import struct

import numpy as np
import pytest

from cloud.segments import ALIGN, SegmentError, decode_segment, encode_segment, expected_size
from crypto.index import IndexKey


@pytest.fixture(scope="module")
def encoded() -> tuple[bytes, list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((37, 64))
    key = IndexKey.generate(64, sample=data)
    ids = [secrets.token_hex(16) for _ in range(37)]
    vectors = key.encrypt(data)
    return encode_segment(ids, vectors, key_version=3), ids, vectors.full


def test_round_trip(encoded: tuple[bytes, list[str], np.ndarray]) -> None:
    blob, ids, full = encoded
    seg = decode_segment(blob, "s1")
    assert seg.key_version == 3 and len(seg) == 37
    assert seg.id_strings() == ids
    assert np.array_equal(seg.vectors.full, full)
    assert len(blob) == expected_size(37, seg.vectors.widths)


def test_arrays_are_aligned_views(encoded: tuple[bytes, list[str], np.ndarray]) -> None:
    blob, _, _ = encoded
    seg = decode_segment(blob, "s1")
    base = np.frombuffer(blob, np.uint8).ctypes.data
    for array in (*seg.vectors.levels, seg.vectors.full):
        assert (array.ctypes.data - base) % ALIGN == 0
        assert not array.flags.owndata


def _damaged(blob: bytes) -> dict[str, tuple[bytes, str]]:
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1
    huge = bytearray(blob)
    struct.pack_into("<I", huge, 12, 9_999_999)
    zero = bytearray(blob)
    struct.pack_into("<I", zero, 12, 0)
    wide = bytearray(blob)
    struct.pack_into("<I", wide, 20, 1 << 20)
    levels = bytearray(blob)
    struct.pack_into("<H", levels, 16, 200)
    return {
        "empty": (b"", "truncated"),
        "header only": (blob[:20], "truncated"),
        "truncated": (blob[:-100], "truncated"),
        "trailing": (blob + b"\0", "trailing"),
        "bit flip": (bytes(flipped), "checksum"),
        "bad magic": (b"JUNK" + blob[4:], "magic"),
        "bad version": (blob[:4] + b"\x07\x00" + blob[6:], "version"),
        "huge count": (bytes(huge), "truncated|exceeds"),
        "zero count": (bytes(zero), "count"),
        "huge width": (bytes(wide), "width"),
        "too many levels": (bytes(levels), "levels"),
        "text": (b"hello world, not a segment at all", "magic"),
    }


def test_every_damage_is_reported(encoded: tuple[bytes, list[str], np.ndarray]) -> None:
    blob, _, _ = encoded
    for case, (bad, reason) in _damaged(blob).items():
        with pytest.raises(SegmentError, match=reason) as info:
            decode_segment(bad, "segments/abc")
        assert "segments/abc" in str(info.value), case


def test_encoder_rejects_inconsistent_input() -> None:
    key = IndexKey.generate(16)
    vectors = key.encrypt(np.zeros((2, 16)) + 1.0)
    with pytest.raises(ValueError, match="one image id"):
        encode_segment(["00" * 16], vectors, 1)
    with pytest.raises(ValueError, match="unique"):
        encode_segment(["00" * 16, "00" * 16], vectors, 1)
