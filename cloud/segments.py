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

Format version 2 (storage format 2, docs/FORMAT-2.md section 4) has the same
sections behind a 192-byte header and a 64-byte trailer::

    0   magic "RCSG"   4 u16 version (2)   6 u16 flags (0)   8 u32 key version
    12  u32 count      16 u16 levels       18 u8 dtype (1)   19 u8 reserved (0)
    20  seg_id (16 raw bytes, equal to the object's name)
    36  u64 base_sequence (the log head the writer had verified)
    44  writer W64: u8 length, the user id in ASCII, zero bytes to 64
    108 u32 widths[levels + 1]      ..  zero padding to 192
    192 ids, levels, full as in version 1
        [flags bit 0, FLAG_KEYWORDS: the segment's keyword dictionary (crypto/sse.py RCSD
        bytes, docs/KEYWORDS.md), its length D as u64 at header offset 184, zero-padded
        to 64; D >= 16, else the flag is not set and offset 184 is zero padding]
        [flags bit 1, FLAG_CKKS: the segment's CKKS block (crypto/ckks.py RCKK bytes,
        issue 19, a repository in search mode "ckks"), its length C as u64 at header offset
        176, zero-padded to 64, after the dictionary; C >= 12, else the flag is not set and
        offset 176 is zero padding]
        B = the end of the last section
    B   HMAC-SHA256 under the index MAC key (crypto/segment_mac.py): covers the dictionary
    B+32 SHA-256 of bytes 0..B+31

The reader here (decode_segment, read_segment) checks everything a keyless reader can:
a MAC is checked only by verify_segment_mac (members). Version 1 stays readable and is
written unchanged by encode_segment.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from crypto.segment_mac import MAC_SIZE, mac_matches, segment_mac
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
VERSION_2 = 2
HEADER_SIZE_V2 = 192  # 20 fixed bytes, seg_id, base_sequence, writer, widths, zero padding
TRAILER_SIZE_V2 = MAC_SIZE + DIGEST_SIZE
WRITER_SIZE = 64
_V2_FIELDS = struct.Struct("<16sQ64s")  # seg_id, base_sequence, writer; at offset 20
_V2_WIDTHS = _FIXED.size + _V2_FIELDS.size  # 108
_USER_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # F3, as cloud/layout.py
_HEX_ID = re.compile(r"[0-9a-f]{32}")
MAX_BASE_SEQUENCE = (1 << 64) - 1
FLAG_KEYWORDS = 0x0001
"""Version 2 only: a keyword dictionary section follows the full vectors (issue 17)."""
DICTIONARY_AT = HEADER_SIZE_V2 - 8  # u64 dictionary length, in the header's last 8 bytes
MIN_DICTIONARY = 16  # the RCSD header alone
FLAG_CKKS = 0x0002
"""Version 2 only: a CKKS block section follows the dictionary (issue 19, search mode ckks)."""
CKKS_AT = DICTIONARY_AT - 8  # u64 CKKS block length
MIN_CKKS = 12  # the RCKK header alone


class SegmentError(ValueError):
    """A segment is truncated, oversized, inconsistent or corrupted."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"segment {name}: {reason}")
        self.name = name
        self.reason = reason


class SegmentAuthError(SegmentError):
    """A format-2 segment whose MAC does not verify under the index MAC key of its key
    version (forged, altered with its SHA-256 recomputed, copied from another repository
    or version), or that cannot be authenticated at all (no MAC key for its version,
    format version 1). ``reason`` is always "not authenticated"; ``detail`` says why."""

    def __init__(self, name: str, detail: str) -> None:
        ValueError.__init__(self, f"segment {name}: not authenticated ({detail})")
        self.name = name
        self.reason = "not authenticated"
        self.detail = detail


@dataclass(frozen=True)
class SegmentHeader:
    """The validated header of a segment, version 1 or 2 (the v2-only fields are None
    for version 1)."""

    format_version: int
    key_version: int
    count: int
    widths: tuple[int, ...]
    seg_id: str | None = None
    base_sequence: int | None = None
    writer: str | None = None
    dictionary_size: int = 0
    ckks_size: int = 0

    @property
    def header_size(self) -> int:
        return HEADER_SIZE if self.format_version == VERSION else HEADER_SIZE_V2

    @property
    def size(self) -> int:
        """The whole object's size in bytes."""
        return _sized(self.format_version, self.count, self.widths, self.dictionary_size,
                      self.ckks_size)

    @property
    def body_end(self) -> int:
        """B: the end of the last section (version 2: where the MAC starts)."""
        trailer = DIGEST_SIZE if self.format_version == VERSION else TRAILER_SIZE_V2
        return self.size - trailer

    @property
    def dictionary_offset(self) -> int:
        """Where the keyword dictionary starts (meaningful when dictionary_size > 0)."""
        return (self.ckks_offset - self.dictionary_size - _pad(self.dictionary_size))

    @property
    def ckks_offset(self) -> int:
        """Where the CKKS block starts (meaningful when ckks_size > 0)."""
        return self.body_end - self.ckks_size - _pad(self.ckks_size)


@dataclass(frozen=True)
class Segment:
    """Decoded segment: image ids (count, 16 bytes each) and their ciphertexts; for
    version 2 also its id, writer and base sequence (not authenticated by decoding:
    see verify_segment_mac). ``sha256`` is that of the whole object (what the segment
    log records)."""

    key_version: int
    ids: NDArray[np.void]
    vectors: EncryptedVectors
    format_version: int = VERSION
    seg_id: str | None = None
    writer: str | None = None
    base_sequence: int | None = None
    sha256: bytes | None = None
    dictionary: memoryview | None = None
    """The keyword dictionary (RCSD bytes, a view into the segment), None without one."""
    ckks: memoryview | None = None
    """The CKKS block (RCKK bytes, a view into the segment), None without one."""

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


def _header_v2(key_version: int, count: int, widths: tuple[int, ...], seg_id: str,
               base_sequence: int, writer: str, dictionary_size: int = 0,
               ckks_size: int = 0) -> bytes:
    flags = (FLAG_KEYWORDS if dictionary_size else 0) | (FLAG_CKKS if ckks_size else 0)
    head = _FIXED.pack(MAGIC, VERSION_2, flags, key_version, count, len(widths) - 1,
                       DTYPE_FLOAT64, 0)
    head += _V2_FIELDS.pack(bytes.fromhex(seg_id), base_sequence, _w64(writer))
    head += struct.pack(f"<{len(widths)}I", *widths)
    head += b"\0" * (CKKS_AT - len(head))
    return head + struct.pack("<QQ", ckks_size, dictionary_size)


def _w64(user_id: str) -> bytes:
    """W64 of FORMAT-2 2.1: u8 length, the ASCII user id, zero bytes to 64."""
    raw = user_id.encode("ascii")
    return bytes([len(raw)]) + raw + b"\0" * (WRITER_SIZE - 1 - len(raw))


def _sections(image_ids: list[str], vectors: EncryptedVectors) -> list[bytes]:
    """The ids and ciphertext sections (the same in both versions), each padded to 64."""
    if len(image_ids) != len(vectors):
        raise ValueError("one image id per encrypted vector is required")
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("image ids in a segment must be unique")
    ids = b"".join(bytes.fromhex(i) for i in image_ids)
    if len(ids) != ID_SIZE * len(image_ids):
        raise ValueError("image ids must be 128-bit hex strings")
    parts = [ids, b"\0" * _pad(len(ids))]
    for array in (*vectors.levels, vectors.full):
        raw = np.ascontiguousarray(array, dtype="<f8").tobytes()
        parts += [raw, b"\0" * _pad(len(raw))]
    return parts


def encode_segment(image_ids: list[str], vectors: EncryptedVectors, key_version: int) -> bytes:
    """Serialize one batch (format version 1); ``image_ids`` are 32-hex-character ids, one
    per vector row."""
    sections = _sections(image_ids, vectors)
    body = b"".join([_header(key_version, len(image_ids), vectors.widths), *sections])
    return body + hashlib.sha256(body).digest()


def encode_segment_v2(image_ids: list[str], vectors: EncryptedVectors, key_version: int, *,
                      seg_id: str, writer: str, base_sequence: int, repo_id: str,
                      mac_key: bytes, dictionary: bytes | None = None,
                      ckks: bytes | None = None) -> bytes:
    """Serialize one batch as format version 2: the v1 sections behind a header that
    names the segment, its writer and the log head the writer had verified, then the
    MAC under ``mac_key`` (crypto.segment_mac.index_mac_key of the data key of
    ``key_version``) and the SHA-256 of everything before it. ``dictionary``: the
    segment's keyword dictionary (crypto.sse.build_dictionary), placed after the full
    vectors inside the MAC'd body. ``ckks``: the segment's CKKS block (issue 19), after
    the dictionary, inside the MAC'd body too."""
    if not isinstance(seg_id, str) or not _HEX_ID.fullmatch(seg_id):
        raise ValueError("seg_id must be 32 lowercase hexadecimal characters")
    if not isinstance(writer, str) or not _USER_ID.fullmatch(writer):
        raise ValueError("writer must be a user id: 1 to 63 characters from a-z, 0-9 and '-', "
                         "not starting with '-'")
    if not 0 <= base_sequence <= MAX_BASE_SEQUENCE:
        raise ValueError(f"base_sequence {base_sequence} is not a u64")
    if not 0 <= key_version < 1 << 32:
        raise ValueError(f"key_version {key_version} is not a u32")
    if dictionary is not None and len(dictionary) < MIN_DICTIONARY:
        raise ValueError(f"a keyword dictionary is at least {MIN_DICTIONARY} bytes")
    if ckks is not None and len(ckks) < MIN_CKKS:
        raise ValueError(f"a CKKS block is at least {MIN_CKKS} bytes")
    sections = _sections(image_ids, vectors)
    if dictionary is not None:
        sections += [bytes(dictionary), b"\0" * _pad(len(dictionary))]
    if ckks is not None:
        sections += [bytes(ckks), b"\0" * _pad(len(ckks))]
    head = _header_v2(key_version, len(image_ids), vectors.widths, seg_id, base_sequence, writer,
                      len(dictionary) if dictionary is not None else 0,
                      len(ckks) if ckks is not None else 0)
    body = b"".join([head, *sections])
    signed = body + segment_mac(mac_key, repo_id, body)
    return signed + hashlib.sha256(signed).digest()


def _sized(version: int, count: int, widths: tuple[int, ...], dictionary_size: int = 0,
           ckks_size: int = 0) -> int:
    if version == VERSION:
        size = len(_header(0, count, widths)) + DIGEST_SIZE
    else:
        size = (HEADER_SIZE_V2 + TRAILER_SIZE_V2 + dictionary_size + _pad(dictionary_size)
                + ckks_size + _pad(ckks_size))
    size += ID_SIZE * count + _pad(ID_SIZE * count)
    for width in widths:
        raw = 8 * count * width
        size += raw + _pad(raw)
    return size


def expected_size(count: int, widths: tuple[int, ...], version: int = VERSION,
                  dictionary_size: int = 0, ckks_size: int = 0) -> int:
    """The size in bytes of a segment of ``count`` images (format ``version``), with a
    keyword dictionary of ``dictionary_size`` bytes and a CKKS block of ``ckks_size``
    bytes (version 2)."""
    return _sized(version, count, widths, dictionary_size, ckks_size)


def parse_header(data: Buffer, name: str) -> SegmentHeader:
    """Validate the header (version 1: the first 64 bytes suffice; version 2: 192) in the
    order of docs/FORMAT.md F14 and the v2 FORMAT-2 4.2; every failure is a SegmentError.

    For version 2, ``seg_id`` must equal the object's name: the last part of ``name``
    when that is a 32-hex-digit id (an object key); a ``name`` that is not one (a label
    such as "<segment>") cannot be compared and is not."""
    data = bytes(data[:HEADER_SIZE_V2])
    if len(data) < _FIXED.size:
        raise SegmentError(name, f"truncated: {len(data)} bytes is shorter than the header")
    magic, version, flags, key_version, count, levels, dtype, reserved = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise SegmentError(name, "not a Radcrypt index segment (bad magic bytes)")
    if version not in (VERSION, VERSION_2):
        raise SegmentError(name, f"unsupported format version {version}")
    if version == VERSION_2 and len(data) < HEADER_SIZE_V2:
        raise SegmentError(name, f"truncated: {len(data)} bytes is shorter than the "
                                 f"{HEADER_SIZE_V2}-byte header of format version 2")
    allowed = FLAG_KEYWORDS | FLAG_CKKS if version == VERSION_2 else 0
    if flags & ~allowed or reserved != 0:
        raise SegmentError(name, "unknown flags set")
    if dtype != DTYPE_FLOAT64:
        raise SegmentError(name, f"unsupported dtype code {dtype}")
    if not 1 <= count <= MAX_COUNT:
        raise SegmentError(name, f"image count {count} out of range 1..{MAX_COUNT}")
    if levels > MAX_LEVELS:
        raise SegmentError(name, f"{levels} levels is more than {MAX_LEVELS}")
    at = _FIXED.size if version == VERSION else _V2_WIDTHS
    end = at + 4 * (levels + 1)
    if len(data) < end:
        raise SegmentError(name, "truncated in the widths field")
    widths = tuple(int(w) for w in struct.unpack_from(f"<{levels + 1}I", data, at))
    if any(not 1 <= w <= MAX_WIDTH for w in widths):
        raise SegmentError(name, f"a vector width is out of range 1..{MAX_WIDTH}")
    if version == VERSION:
        return SegmentHeader(VERSION, int(key_version), int(count), widths)
    raw_id, base_sequence, raw_writer = _V2_FIELDS.unpack_from(data, _FIXED.size)
    seg_id = raw_id.hex()
    named = _name_id(name)
    if named is not None and named != seg_id:
        raise SegmentError(name, f"seg_id {seg_id} differs from the object's name")
    writer = _read_w64(name, raw_writer)
    if any(data[end:CKKS_AT]):
        raise SegmentError(name, "non-zero bytes in the header padding")
    (ckks_size, dictionary_size) = struct.unpack_from("<QQ", data, CKKS_AT)
    if not flags & FLAG_CKKS and ckks_size:
        raise SegmentError(name, "non-zero bytes in the header padding")
    if flags & FLAG_CKKS and not MIN_CKKS <= ckks_size <= MAX_SEGMENT_BYTES:
        raise SegmentError(name, f"CKKS block length {ckks_size} out of range "
                                 f"{MIN_CKKS}..{MAX_SEGMENT_BYTES}")
    if not flags & FLAG_KEYWORDS and dictionary_size:
        raise SegmentError(name, "non-zero bytes in the header padding")
    if flags & FLAG_KEYWORDS and not MIN_DICTIONARY <= dictionary_size <= MAX_SEGMENT_BYTES:
        raise SegmentError(name, f"keyword dictionary length {dictionary_size} out of range "
                                 f"{MIN_DICTIONARY}..{MAX_SEGMENT_BYTES}")
    return SegmentHeader(VERSION_2, int(key_version), int(count), widths, seg_id,
                         int(base_sequence), writer, int(dictionary_size), int(ckks_size))


def _name_id(name: str) -> str | None:
    last = name.rsplit("/", 1)[-1]
    return last if _HEX_ID.fullmatch(last) else None


def _read_w64(name: str, raw: bytes) -> str:
    length = raw[0]
    if not 1 <= length <= WRITER_SIZE - 1:
        raise SegmentError(name, f"writer: length {length} out of range 1..{WRITER_SIZE - 1}")
    if any(raw[1 + length :]):
        raise SegmentError(name, "writer: non-zero bytes in its padding")
    text = raw[1 : 1 + length].decode("latin-1")
    if not _USER_ID.fullmatch(text):
        raise SegmentError(name, f"writer: {text!r} is not a valid user id")
    return text


def read_header(data: bytes, name: str) -> tuple[int, int, tuple[int, ...]]:
    """(key version, count, widths) from the first bytes (version 1 or 2); validates every
    field. A caller that range-reads a header reads HEADER_SIZE_V2 bytes (enough for both
    versions: any segment is longer)."""
    header = parse_header(data, name)
    return header.key_version, header.count, header.widths


def ids_range(header: bytes, name: str) -> tuple[int, int]:
    """(offset, length) of the ids section, from the first HEADER_SIZE_V2 bytes."""
    parsed = parse_header(header, name)
    return parsed.header_size, ID_SIZE * parsed.count


def dictionary_range(header: bytes, name: str) -> tuple[int, int] | None:
    """(offset, length) of the keyword dictionary, from the first HEADER_SIZE_V2 bytes;
    None for a segment without one. A range read of it is checked against nothing: use
    it only where the whole segment's SHA-256 is checked elsewhere (or re-read whole)."""
    parsed = parse_header(header, name)
    if not parsed.dictionary_size:
        return None
    return parsed.dictionary_offset, parsed.dictionary_size


def decode_segment(data: Buffer, name: str = "<segment>", *,
                   expected_sha256: bytes | None = None) -> Segment:
    """Parse and validate a segment of version 1 or 2; the arrays are views into ``data``
    (no copy). Checks the SHA-256 checksum, NOT the MAC of version 2 (verify_segment_mac).
    ``expected_sha256``, the whole object's SHA-256 from the segment log, is compared
    before the checksum: a mismatch is SegmentError "does not match the segment log"."""
    header = parse_header(data, name)
    size = _checked_size(name, header)
    if len(data) != size:
        raise _length_error(name, len(data), size)
    digest = hashlib.sha256(memoryview(data)[: size - DIGEST_SIZE])
    return _decode_checked(data, name, header, digest, expected_sha256)


def read_segment(chunks: Iterable[bytes], name: str,
                 buffer: Callable[[int], memoryview], length: int | None = None, *,
                 expected_sha256: bytes | None = None) -> Segment:
    """Parse and validate a segment arriving as a stream of chunks (a download).

    The same checks, in the same order and with the same errors, as ``decode_segment``;
    the checksum is computed while the chunks arrive, so every byte is read once, while
    it is still in the processor's cache. ``buffer(size)`` is called once the header is
    valid and must return a writable memoryview of ``size`` bytes (the caller may reuse
    its memory from one segment to the next); the arrays of the result are views into
    it. ``length``, the object's size if known (from a listing), is checked against the
    declared size before anything is allocated; without it, the buffer (of the declared
    size, at most MAX_SEGMENT_BYTES) is asked for before the exact length is known.
    The whole object's SHA-256 (compared with ``expected_sha256`` when given) extends a
    copy of the checksum's hash by the last 32 bytes: no second pass.
    """
    stream = iter(chunks)
    try:
        head, got = bytearray(), []
        for chunk in stream:
            got.append(chunk)
            head += chunk[: HEADER_SIZE_V2 - len(head)]
            if len(head) >= HEADER_SIZE_V2:
                break
        header = parse_header(bytes(head), name)
        size = _checked_size(name, header)
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
    return _decode_checked(out, name, header, digest, expected_sha256)


def verify_segment_mac(data: Buffer, name: str, repo_id: str, mac_key: bytes) -> None:
    """A member's check that a format-2 segment was written by someone holding the data
    key of its key version, for this repository: the MAC over bytes 0..B-1 under
    ``mac_key`` (index_mac_key of that version's data key). The header and the exact
    length are checked first (SegmentError); the checksum is not (decode_segment does
    it). A version-1 segment, or a MAC that does not verify: SegmentAuthError."""
    header = parse_header(data, name)
    if header.format_version != VERSION_2:
        raise SegmentAuthError(name, f"format version {header.format_version} carries no MAC")
    size = _checked_size(name, header)
    if len(data) != size:
        raise _length_error(name, len(data), size)
    view = memoryview(data)
    mac = bytes(view[header.body_end : header.body_end + MAC_SIZE])
    if not mac_matches(mac_key, repo_id, view[: header.body_end], mac):
        raise SegmentAuthError(name, f"the MAC does not verify under the index MAC key of key "
                                     f"version {header.key_version} of repository {repo_id}")


def decode_authenticated(data: Buffer, name: str, repo_id: str,
                         mac_keys: Mapping[int, bytes], *,
                         expected_sha256: bytes | None = None) -> Segment:
    """What a member reads: decode_segment, then the MAC under the index MAC key of the
    segment's key version taken from ``mac_keys`` (key version -> index MAC key; a
    version missing there is SegmentAuthError, as is a version-1 segment)."""
    segment = decode_segment(data, name, expected_sha256=expected_sha256)
    if segment.format_version != VERSION_2:
        raise SegmentAuthError(name, f"format version {segment.format_version} carries no MAC")
    mac_key = mac_keys.get(segment.key_version)
    if mac_key is None:
        raise SegmentAuthError(name, f"key version {segment.key_version} is not in the key ring")
    verify_segment_mac(data, name, repo_id, mac_key)
    return segment


def _checked_size(name: str, header: SegmentHeader) -> int:
    size = header.size
    if size > MAX_SEGMENT_BYTES:
        raise SegmentError(name, f"declared size {size} bytes exceeds the limit")
    return size


def _length_error(name: str, length: int, size: int, exact: bool = True) -> SegmentError:
    if length < size:
        return SegmentError(name, f"truncated: {length} bytes, expected {size}")
    at_least = "" if exact else "at least "
    return SegmentError(name, f"has trailing bytes: {at_least}{length} bytes, expected {size}")


def _decode_checked(data: Buffer, name: str, header: SegmentHeader, digest: hashlib._Hash,
                    expected_sha256: bytes | None) -> Segment:
    """The checks after the length: the log's hash, checksum (``digest`` is the hash of
    the bytes before it), ids, numbers."""
    size, count, widths = header.size, header.count, header.widths
    stored = bytes(data[size - DIGEST_SIZE : size])
    whole = digest.copy()
    whole.update(stored)
    sha256 = whole.digest()
    if expected_sha256 is not None and sha256 != bytes(expected_sha256):
        raise SegmentError(name, "does not match the segment log")
    if digest.digest() != stored:
        raise SegmentError(name, "checksum mismatch: the segment is corrupted")
    offset = header.header_size
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
    dictionary = None
    if header.dictionary_size:
        dictionary = memoryview(data)[offset : offset + header.dictionary_size]
    ckks = None
    if header.ckks_size:
        ckks = memoryview(data)[header.ckks_offset : header.ckks_offset + header.ckks_size]
    return Segment(key_version=header.key_version, ids=ids, vectors=vectors,
                   format_version=header.format_version, seg_id=header.seg_id,
                   writer=header.writer, base_sequence=header.base_sequence, sha256=sha256,
                   dictionary=dictionary, ckks=ckks)


def _has_duplicates(ids: NDArray[np.void]) -> bool:
    """Whether two ids are equal. Sorting their first 8 bytes settles it for random ids;
    only when two of those agree are the whole ids compared."""
    first = np.sort(ids.view("<u8")[0::2])
    if not (first[1:] == first[:-1]).any():
        return False
    return len({bytes(i) for i in ids}) != len(ids)
