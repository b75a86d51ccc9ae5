"""Binary format of an encrypted index segment: the commit point of an import batch.

A segment carries, for each image of one batch, its random id and the secure-kNN
ciphertexts of its bound vectors and full vector; nothing else. It is written last,
after every object it names, so a reader never sees a segment whose objects are
missing. Layout (little-endian, every section 64-byte aligned so that a reader can map
arrays straight from the bytes without copies; specified in docs/FORMAT.md)::

    0   magic "RCSG"
    4   u16 format version (1)          6   u16 flags (0)
    8   u32 key version                 12  u32 count (number of images)
    16  u16 levels                      18  u8 dtype code (1 = float64)   19 u8 reserved
    20  u32 widths[levels + 1]          (bound levels, then full)
    ..  zero padding to 64
        ids:    count x 16 bytes
        level i: count x widths[i] x 8 bytes, each padded to 64
        full:   count x widths[-1] x 8 bytes, padded to 64
    end-32  SHA-256 of everything before it

The checksum lets the key-less server reject a corrupted segment (disk, transfer,
truncation); it is not a signature. The reader validates every field before it
allocates anything, so a hostile or damaged segment cannot make it use unbounded memory.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from crypto.tokens import EncryptedVectors

MAGIC = b"RCSG"
VERSION = 1
DTYPE_FLOAT64 = 1
ALIGN = 64
ID_SIZE = 16
DIGEST_SIZE = 32
MAX_COUNT = 10_000_000
MAX_LEVELS = 8
MAX_WIDTH = 1 << 16
MAX_SEGMENT_BYTES = 8 << 30
_FIXED = struct.Struct("<4sHHIIHBB")


class SegmentError(ValueError):
    """A segment is truncated, oversized, inconsistent or corrupted."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"segment {name}: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class Segment:
    """Decoded segment: image ids (count, 16 bytes each) and their ciphertexts."""

    key_version: int
    ids: NDArray[np.void]
    vectors: EncryptedVectors

    def __len__(self) -> int:
        return len(self.vectors)

    def id_strings(self) -> list[str]:
        return [bytes(i).hex() for i in self.ids]


def _pad(size: int) -> int:
    return (-size) % ALIGN


def _header(key_version: int, count: int, widths: tuple[int, ...]) -> bytes:
    head = _FIXED.pack(MAGIC, VERSION, 0, key_version, count, len(widths) - 1, DTYPE_FLOAT64, 0)
    head += struct.pack(f"<{len(widths)}I", *widths)
    return head + b"\0" * _pad(len(head))


def encode_segment(image_ids: list[str], vectors: EncryptedVectors, key_version: int) -> bytes:
    """Serialize one batch; ``image_ids`` are 32-hex-character ids, one per vector row."""
    if len(image_ids) != len(vectors):
        raise ValueError("one image id per encrypted vector is required")
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("image ids in a segment must be unique")
    ids = b"".join(bytes.fromhex(i) for i in image_ids)
    if len(ids) != ID_SIZE * len(image_ids):
        raise ValueError("image ids must be 128-bit hex strings")
    parts = [_header(key_version, len(image_ids), vectors.widths), ids, b"\0" * _pad(len(ids))]
    for array in (*vectors.levels, vectors.full):
        raw = np.ascontiguousarray(array, dtype="<f8").tobytes()
        parts += [raw, b"\0" * _pad(len(raw))]
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def expected_size(count: int, widths: tuple[int, ...]) -> int:
    size = len(_header(0, count, widths))
    size += ID_SIZE * count + _pad(ID_SIZE * count)
    for width in widths:
        raw = 8 * count * width
        size += raw + _pad(raw)
    return size + DIGEST_SIZE


def read_header(data: bytes, name: str) -> tuple[int, int, tuple[int, ...]]:
    """(key version, count, widths) from the first bytes; validates every field."""
    if len(data) < _FIXED.size:
        raise SegmentError(name, f"truncated: {len(data)} bytes is shorter than the header")
    magic, version, flags, key_version, count, levels, dtype, reserved = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise SegmentError(name, "not a Radcrypt index segment (bad magic bytes)")
    if version != VERSION:
        raise SegmentError(name, f"unsupported format version {version}")
    if flags != 0 or reserved != 0:
        raise SegmentError(name, "unknown flags set")
    if dtype != DTYPE_FLOAT64:
        raise SegmentError(name, f"unsupported dtype code {dtype}")
    if not 1 <= count <= MAX_COUNT:
        raise SegmentError(name, f"image count {count} out of range 1..{MAX_COUNT}")
    if levels > MAX_LEVELS:
        raise SegmentError(name, f"{levels} levels is more than {MAX_LEVELS}")
    end = _FIXED.size + 4 * (levels + 1)
    if len(data) < end:
        raise SegmentError(name, "truncated in the widths field")
    widths = struct.unpack_from(f"<{levels + 1}I", data, _FIXED.size)
    if any(not 1 <= w <= MAX_WIDTH for w in widths):
        raise SegmentError(name, f"a vector width is out of range 1..{MAX_WIDTH}")
    return int(key_version), int(count), tuple(int(w) for w in widths)


def decode_segment(data: bytes, name: str = "<segment>") -> Segment:
    """Parse and validate a segment; the arrays are views into ``data`` (no copy)."""
    key_version, count, widths = read_header(data, name)
    size = expected_size(count, widths)
    if size > MAX_SEGMENT_BYTES:
        raise SegmentError(name, f"declared size {size} bytes exceeds the limit")
    if len(data) != size:
        what = "truncated" if len(data) < size else "has trailing bytes"
        raise SegmentError(name, f"{what}: {len(data)} bytes, expected {size}")
    body = memoryview(data)[: size - DIGEST_SIZE]
    if hashlib.sha256(body).digest() != bytes(data[size - DIGEST_SIZE :]):
        raise SegmentError(name, "checksum mismatch: the segment is corrupted")
    offset = len(_header(key_version, count, widths))
    ids = np.frombuffer(data, dtype="V16", count=count, offset=offset)
    if len({bytes(i) for i in ids}) != count:
        raise SegmentError(name, "duplicate image ids")
    offset += ID_SIZE * count + _pad(ID_SIZE * count)
    arrays = []
    for width in widths:
        array = np.frombuffer(data, dtype="<f8", count=count * width, offset=offset)
        if not np.all(np.isfinite(array)):
            raise SegmentError(name, "contains non-finite numbers")
        arrays.append(array.reshape(count, width))
        offset += 8 * count * width + _pad(8 * count * width)
    vectors = EncryptedVectors(full=arrays[-1], levels=tuple(arrays[:-1]))
    return Segment(key_version=key_version, ids=ids, vectors=vectors)
