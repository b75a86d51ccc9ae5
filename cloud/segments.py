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
import itertools
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from crypto.tokens import EncryptedVectors

Buffer = bytes | bytearray | memoryview

MAGIC = b"RCSG"
VERSION = 1
DTYPE_FLOAT64 = 1
ALIGN = 64
ID_SIZE = 16
DIGEST_SIZE = 32
HEADER_SIZE = 64  # 20 fixed bytes, at most 4 (8 + 1) of widths, zero padding
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
    size = _checked_size(name, count, widths)
    if len(data) != size:
        raise _length_error(name, len(data), size)
    body = memoryview(data)[: size - DIGEST_SIZE]
    return _decode_checked(data, name, key_version, count, widths,
                           hashlib.sha256(body).digest())


def read_segment(chunks: Iterable[bytes], name: str,
                 buffer: Callable[[int], memoryview], length: int | None = None) -> Segment:
    """Parse and validate a segment arriving as a stream of chunks (a download).

    The same checks, in the same order and with the same errors, as ``decode_segment``;
    the checksum is computed while the chunks arrive, so every byte is read once, while
    it is still in the processor's cache. ``buffer(size)`` is called once the header is
    valid and must return a writable memoryview of ``size`` bytes (the caller may reuse
    its memory from one segment to the next); the arrays of the result are views into
    it. ``length``, the object's size if known (from a listing), is checked against the
    declared size before anything is allocated; without it, the buffer (of the declared
    size, at most MAX_SEGMENT_BYTES) is asked for before the exact length is known.
    """
    stream = iter(chunks)
    try:
        head, got = bytearray(), []
        for chunk in stream:
            got.append(chunk)
            head += chunk[: HEADER_SIZE - len(head)]
            if len(head) >= HEADER_SIZE:
                break
        key_version, count, widths = read_header(bytes(head), name)
        size = _checked_size(name, count, widths)
        if length is not None and length != size:
            raise _length_error(name, length, size)
        out = buffer(size)
        digest, position, body_end = hashlib.sha256(), 0, size - DIGEST_SIZE
        for chunk in itertools.chain(got, stream):
            end = position + len(chunk)
            if end > size:
                raise _length_error(name, end, size, exact=False)
            out[position:end] = chunk
            if position < body_end:
                digest.update(out[position:min(end, body_end)])
            position = end
        if position != size:
            raise _length_error(name, position, size)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # a download not read to its end must not keep its connection busy
    return _decode_checked(out, name, key_version, count, widths, digest.digest())


def _checked_size(name: str, count: int, widths: tuple[int, ...]) -> int:
    size = expected_size(count, widths)
    if size > MAX_SEGMENT_BYTES:
        raise SegmentError(name, f"declared size {size} bytes exceeds the limit")
    return size


def _length_error(name: str, length: int, size: int, exact: bool = True) -> SegmentError:
    if length < size:
        return SegmentError(name, f"truncated: {length} bytes, expected {size}")
    at_least = "" if exact else "at least "
    return SegmentError(name, f"has trailing bytes: {at_least}{length} bytes, expected {size}")


def _decode_checked(data: Buffer, name: str, key_version: int, count: int,
                    widths: tuple[int, ...], digest: bytes) -> Segment:
    """The checks after the length: checksum (``digest`` is that of the body), ids, numbers."""
    size = expected_size(count, widths)
    if digest != bytes(data[size - DIGEST_SIZE : size]):
        raise SegmentError(name, "checksum mismatch: the segment is corrupted")
    offset = HEADER_SIZE
    ids = np.frombuffer(data, dtype="V16", count=count, offset=offset)
    if _has_duplicates(ids):
        raise SegmentError(name, "duplicate image ids")
    offset += ID_SIZE * count + _pad(ID_SIZE * count)
    arrays = []
    for width in widths:
        array = np.frombuffer(data, dtype="<f8", count=count * width, offset=offset)
        if not np.isfinite(array).all():
            raise SegmentError(name, "contains non-finite numbers")
        arrays.append(array.reshape(count, width))
        offset += 8 * count * width + _pad(8 * count * width)
    vectors = EncryptedVectors(full=arrays[-1], levels=tuple(arrays[:-1]))
    return Segment(key_version=key_version, ids=ids, vectors=vectors)


def _has_duplicates(ids: NDArray[np.void]) -> bool:
    """Whether two ids are equal. Sorting their first 8 bytes settles it for random ids;
    only when two of those agree are the whole ids compared."""
    first = np.sort(ids.view("<u8")[0::2])
    if not (first[1:] == first[:-1]).any():
        return False
    return len({bytes(i) for i in ids}) != len(ids)
