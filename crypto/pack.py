"""Pack objects of storage format 2: one import batch's small objects in one object.

Why packs: format 1 stores three objects per image (original, meta, thumbs); a million
images then cost three million objects and a million GETs for any pass over the
features. A pack holds one batch's ``meta`` entries, previews and ONE feature array, each
an AEAD envelope (crypto/aead.py) under associated data v2, which binds the pack id so an
entry moved to another pack, image, kind, repository or key version fails to open. An
encrypted table of contents (TOC) at the end, found through a fixed 16-byte trailer, lets
a reader fetch the TOC with one tail range read and then any entry with one range read.

Layout (docs/FORMAT-2.md section 3, big-endian except the feature array)::

    header  = "RCPK" | version u8 = 1 | reserved 3 | pack_id ID16 | key_version u32 | reserved u32
    entries = envelope 0 | ... | envelope n-1          (from offset 32, back to back)
    TOC     = envelope of "RCPT" | version u8 | reserved 3 | pack_id ID16 | key_version u32
              | count u32 | count x (kind u8 | reserved 3 | object id ID16 | offset u64
              | length u64 | plaintext length u32 | reserved 8)
    trailer = T u32 (TOC envelope length) | n u32 (entries) | key_version u32 | "RCPE"

The header and trailer are not authenticated by themselves: every field in them is
repeated in the TOC's associated data or plaintext, and the reader compares.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from crypto import aead
from crypto.errors import DecryptionError, FormatError

KIND_META, KIND_THUMBS, KIND_FEATURES = 1, 2, 3
KIND_WORDS: dict[int, str] = {KIND_META: "meta", KIND_THUMBS: "thumbs", KIND_FEATURES: "features"}
TOC_KIND = "pack-toc"
TAIL_READ: int = 65536

MAGIC = b"RCPK"
TOC_MAGIC = b"RCPT"
END_MAGIC = b"RCPE"
FEATURES_MAGIC = b"RCFA"
VERSION = 1
FEATURES_VERSION = 1
DTYPE_FLOAT64 = 1
CHUNK_LOG2 = aead.DEFAULT_CHUNK_LOG2
HEADER_SIZE = 32
TRAILER_SIZE = 16
TOC_HEAD_SIZE = 32
TOC_ENTRY_SIZE = 48
FEATURES_HEAD_SIZE = 16
MIN_ENVELOPE = aead.HEADER_SIZE + aead.CHUNK_OVERHEAD  # 60: an empty plaintext
MAX_ENTRIES = 1 << 20
MAX_DIM = 65536
MAX_PACK_SIZE = 256 << 20  # what the importer aims for; a reader does not enforce it
_U32_MAX = (1 << 32) - 1

_HEADER = struct.Struct(">4sB3s16sII")
_TRAILER = struct.Struct(">III4s")
_TOC_HEAD = struct.Struct(">4sB3s16sII")
_TOC_ENTRY = struct.Struct(">B3s16sQQI8s")
_FEATURES_HEAD = struct.Struct("<4sHBBII")
_ID_RE = re.compile(r"[0-9a-f]{32}")


def associated_data_v2(
    repo_id: str, kind: str, object_id: str, key_version: int, pack_id: str
) -> bytes:
    """AD2: the associated data of a pack entry or TOC (FORMAT-2 3.3).

    Differs from AD1 (crypto.aead.associated_data) in its label and its field count, so no
    format-1 object opens as a pack entry or the reverse; the pack id makes an entry
    copied into another pack fail to open.
    """
    parts = [b"radcrypt/ad/v2"]
    parts += [s.encode("utf-8") for s in (repo_id, kind, object_id)]
    parts.append(struct.pack(">Q", key_version))
    parts.append(pack_id.encode("utf-8"))
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def envelope_size(plain_length: int) -> int:
    """Exact size of an entry's envelope (chunk_log2 = 16) for a plaintext of that length."""
    return aead.ciphertext_size(plain_length, CHUNK_LOG2)


@dataclass(frozen=True)
class PackEntry:
    """One TOC row: where an entry's envelope lies and how long its plaintext is."""

    kind: int
    object_id: str
    offset: int
    length: int
    plain_length: int


@dataclass(frozen=True)
class PackToc:
    """A verified table of contents (every structural check of FORMAT-2 3.2 passed)."""

    pack_id: str
    key_version: int
    entries: tuple[PackEntry, ...]
    toc_offset: int
    size: int
    _by_key: dict[tuple[int, str], PackEntry] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {(e.kind, e.object_id): e for e in self.entries})

    def image_ids(self) -> list[str]:
        """Image ids in the order of the meta entries (= the feature array's row order)."""
        return [e.object_id for e in self.entries if e.kind == KIND_META]

    def entry(self, kind: int, object_id: str) -> PackEntry:
        """The entry of (kind, object id); KeyError if the pack has none."""
        return self._by_key[(kind, object_id)]

    def features_entry(self) -> PackEntry:
        """The pack's one feature-array entry."""
        return self._by_key[(KIND_FEATURES, self.pack_id)]


# --- feature array (little-endian) ---------------------------------------------------------


def _check_id(value: str, what: str) -> None:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(f"{what} must be 32 lowercase hex digits")


def encode_features(ids: Sequence[str], features: NDArray[np.float64]) -> bytes:
    """The feature array plaintext (FORMAT-2 3.4): row i of ``features`` belongs to ids[i]."""
    matrix = np.asarray(features)
    if matrix.ndim != 2 or matrix.shape[0] != len(ids):
        raise ValueError("features must be a matrix with one row per id")
    count, dim = int(matrix.shape[0]), int(matrix.shape[1])
    if not 1 <= dim <= MAX_DIM:
        raise ValueError(f"feature dim must be in 1..{MAX_DIM}")
    if count > MAX_ENTRIES:
        raise ValueError("too many feature rows")
    matrix = matrix.astype("<f8", copy=False)
    if not np.all(np.isfinite(matrix)):
        raise ValueError("features must be finite")
    for image_id in ids:
        _check_id(image_id, "image id")
    head = _FEATURES_HEAD.pack(FEATURES_MAGIC, FEATURES_VERSION, DTYPE_FLOAT64, 0, count, dim)
    raw_ids = b"".join(bytes.fromhex(i) for i in ids)
    return head + raw_ids + np.ascontiguousarray(matrix, dtype="<f8").tobytes()


def decode_features(plain: bytes, expected_ids: Sequence[str], *,
                    dim: int | None = None) -> NDArray[np.float64]:
    """Parse and check a feature array; its ids must equal ``expected_ids`` in order.

    ``dim``, when given (the manifest's), must be the array's: a pack of another
    extractor's features is refused rather than scored against the wrong basis.
    """
    if len(plain) < FEATURES_HEAD_SIZE:
        raise FormatError("feature array: truncated header")
    magic, version, dtype, reserved, count, array_dim = _FEATURES_HEAD.unpack_from(plain, 0)
    if magic != FEATURES_MAGIC:
        raise FormatError("feature array: bad magic")
    if version != FEATURES_VERSION:
        raise FormatError(f"feature array: unsupported version {version}")
    if dtype != DTYPE_FLOAT64:
        raise FormatError(f"feature array: unknown dtype {dtype}")
    if reserved != 0:
        raise FormatError("feature array: reserved byte not zero")
    if not 1 <= array_dim <= MAX_DIM:
        raise FormatError(f"feature array: dim {array_dim} outside 1..{MAX_DIM}")
    if dim is not None and array_dim != dim:
        raise FormatError(f"feature array: dim {array_dim} differs from the expected {dim}")
    if count != len(expected_ids):
        raise FormatError(
            f"feature array: count {count} differs from the pack's {len(expected_ids)} images"
        )
    expected_size = FEATURES_HEAD_SIZE + 16 * count + 8 * count * array_dim
    if len(plain) != expected_size:
        raise FormatError(
            f"feature array: length {len(plain)} differs from the expected {expected_size}"
        )
    ids_end = FEATURES_HEAD_SIZE + 16 * count
    ids = [plain[o:o + 16].hex() for o in range(FEATURES_HEAD_SIZE, ids_end, 16)]
    if ids != list(expected_ids):
        raise FormatError("feature array: ids differ from the pack's meta entries")
    matrix = np.frombuffer(plain, dtype="<f8", offset=ids_end).reshape(count, array_dim)
    if not np.all(np.isfinite(matrix)):
        raise FormatError("feature array: a feature is not finite")
    return matrix.astype(np.float64)


# --- writing -------------------------------------------------------------------------------


def _check_key_version(key_version: int) -> None:
    if isinstance(key_version, bool) or not isinstance(key_version, int):
        raise ValueError("key version must be an integer")
    if not 1 <= key_version <= _U32_MAX:
        raise ValueError("key version must be in 1..2^32-1")


def build_pack(
    data_key: bytes,
    repo_id: str,
    pack_id: str,
    key_version: int,
    images: Sequence[tuple[str, bytes, bytes]],
    features: NDArray[np.float64],
) -> bytes:
    """Seal one batch into a pack: meta entries, then previews, then the feature array.

    ``images`` holds (image_id, meta JSON bytes, preview PNG bytes); row i of ``features``
    belongs to images[i]. Every image has a meta and a preview entry (contract 13).
    """
    _check_id(pack_id, "pack id")
    _check_key_version(key_version)
    if not images:
        raise ValueError("a pack holds at least one image")
    ids = [image_id for image_id, _meta, _thumb in images]
    for image_id in ids:
        _check_id(image_id, "image id")
    if len(set(ids)) != len(ids):
        raise ValueError("an image appears twice in the pack")
    if 2 * len(ids) + 1 > MAX_ENTRIES:
        raise ValueError("too many images for one pack")
    plain: list[tuple[int, str, bytes]] = [(KIND_META, i, m) for i, m, _t in images]
    plain += [(KIND_THUMBS, i, t) for i, _m, t in images]
    plain.append((KIND_FEATURES, pack_id, encode_features(ids, features)))

    parts = [_HEADER.pack(MAGIC, VERSION, b"\0\0\0", bytes.fromhex(pack_id), key_version, 0)]
    rows = []
    offset = HEADER_SIZE
    for kind, object_id, body in plain:
        if len(body) > _U32_MAX:
            raise ValueError(f"pack {pack_id}: {KIND_WORDS[kind]} {object_id} is too large")
        ad = associated_data_v2(repo_id, KIND_WORDS[kind], object_id, key_version, pack_id)
        envelope = aead.seal(data_key, body, ad, CHUNK_LOG2)
        rows.append(_TOC_ENTRY.pack(kind, b"\0\0\0", bytes.fromhex(object_id), offset,
                                    len(envelope), len(body), b"\0" * 8))
        parts.append(envelope)
        offset += len(envelope)
    toc_plain = _TOC_HEAD.pack(TOC_MAGIC, VERSION, b"\0\0\0", bytes.fromhex(pack_id),
                               key_version, len(rows)) + b"".join(rows)
    toc_ad = associated_data_v2(repo_id, TOC_KIND, pack_id, key_version, pack_id)
    toc = aead.seal(data_key, toc_plain, toc_ad, CHUNK_LOG2)
    parts.append(toc)
    parts.append(_TRAILER.pack(len(toc), len(rows), key_version, END_MAGIC))
    return b"".join(parts)


def pack_size(images: Sequence[tuple[str, bytes, bytes]], dim: int) -> int:
    """Exact size of the pack build_pack makes of ``images`` with ``dim`` features each.

    Lets an importer cut a batch before its pack would exceed MAX_PACK_SIZE.
    """
    count = len(images)
    lengths = [len(m) for _i, m, _t in images] + [len(t) for _i, _m, t in images]
    lengths.append(FEATURES_HEAD_SIZE + 16 * count + 8 * count * dim)
    toc = envelope_size(TOC_HEAD_SIZE + TOC_ENTRY_SIZE * len(lengths))
    return HEADER_SIZE + sum(envelope_size(n) for n in lengths) + toc + TRAILER_SIZE


# --- reading -------------------------------------------------------------------------------


def trailer_info(tail: bytes, size: int, pack_id: str) -> tuple[int, int]:
    """(toc_start, key_version) from the last bytes of pack ``pack_id`` of ``size`` bytes.

    ``tail`` is any suffix of the object at least 16 bytes long. FormatError when the
    trailer's magic, TOC length or key version cannot be right for an object of that size.
    """
    _check_id(pack_id, "pack id")
    if len(tail) < TRAILER_SIZE or size < len(tail):
        raise FormatError(f"pack {pack_id}: trailer: fewer than 16 bytes or more than the object")
    toc_len, _count, key_version, magic = _TRAILER.unpack(tail[-TRAILER_SIZE:])
    if magic != END_MAGIC:
        raise FormatError(f"pack {pack_id}: trailer: bad end magic")
    if toc_len < MIN_ENVELOPE:
        raise FormatError(f"pack {pack_id}: trailer: TOC length {toc_len} below {MIN_ENVELOPE}")
    if HEADER_SIZE + toc_len + TRAILER_SIZE > size:
        raise FormatError(f"pack {pack_id}: trailer: TOC length {toc_len} exceeds the object")
    if key_version < 1:
        raise FormatError(f"pack {pack_id}: trailer: key version 0")
    return size - TRAILER_SIZE - toc_len, key_version


def _check_envelope_head(envelope: bytes, pack_id: str, what: str) -> None:
    """Entries and TOCs are written with 64 KiB chunks; their lengths are checked for it."""
    if len(envelope) >= 6 and envelope[:4] == aead.MAGIC and envelope[5] != CHUNK_LOG2:
        raise FormatError(f"pack {pack_id}: {what}: chunk size is not 64 KiB")


def _parse_rows(body: bytes, pack_id: str, count: int) -> tuple[PackEntry, ...]:
    entries = []
    for index in range(count):
        kind, reserved, raw_id, offset, length, plain_length, reserved2 = (
            _TOC_ENTRY.unpack_from(body, TOC_HEAD_SIZE + index * TOC_ENTRY_SIZE))
        where = f"pack {pack_id}: TOC entry {index}"
        if kind not in KIND_WORDS:
            raise FormatError(f"{where}: unknown kind code {kind}")
        if reserved != b"\0\0\0" or reserved2 != b"\0" * 8:
            raise FormatError(f"{where}: reserved bytes not zero")
        entries.append(PackEntry(kind, raw_id.hex(), offset, length, plain_length))
    return tuple(entries)


def _check_rows(entries: tuple[PackEntry, ...], pack_id: str, toc_start: int) -> None:
    """Draft 3.2: contiguous from 32 to the TOC, consistent lengths, a complete set."""
    position = HEADER_SIZE
    seen: set[tuple[int, str]] = set()
    for index, e in enumerate(entries):
        where = f"pack {pack_id}: TOC entry {index} ({KIND_WORDS[e.kind]} {e.object_id})"
        if e.offset < position:
            raise FormatError(f"{where}: overlaps the previous entry or is out of order")
        if e.offset > position:
            raise FormatError(f"{where}: gap of {e.offset - position} bytes before it")
        if e.length != envelope_size(e.plain_length):
            raise FormatError(f"{where}: envelope length inconsistent with plaintext length")
        position = e.offset + e.length
        if position > toc_start:
            raise FormatError(f"{where}: runs past the TOC's offset {toc_start}")
        if (e.kind, e.object_id) in seen:
            raise FormatError(f"{where}: appears twice")
        seen.add((e.kind, e.object_id))
        if e.kind == KIND_FEATURES and e.object_id != pack_id:
            raise FormatError(f"{where}: a features entry must carry the pack id")
    if position != toc_start:
        raise FormatError(
            f"pack {pack_id}: {toc_start - position} bytes between the last entry and the TOC")
    features = sum(1 for e in entries if e.kind == KIND_FEATURES)
    if features != 1:
        raise FormatError(f"pack {pack_id}: {features} features entries, expected exactly 1")
    metas = {e.object_id for e in entries if e.kind == KIND_META}
    thumbs = {e.object_id for e in entries if e.kind == KIND_THUMBS}
    if metas != thumbs:
        raise FormatError(f"pack {pack_id}: an image has a meta entry without a thumbs entry "
                          "or the reverse")
    if not metas:
        raise FormatError(f"pack {pack_id}: no image")


def open_toc(data_key: bytes, repo_id: str, pack_id: str, size: int, tail: bytes) -> PackToc:
    """Open and check the TOC of pack ``pack_id`` (``size`` bytes) from its last bytes.

    ``tail`` must hold at least the TOC and trailer (``size - toc_start`` bytes; the last
    TAIL_READ bytes usually do); a longer suffix, even the whole object, is fine.
    DecryptionError when the TOC does not open (wrong key, repository, key version or
    pack, or altered bytes); FormatError for every structural fault of FORMAT-2 3.2.
    """
    toc_start, key_version = trailer_info(tail, size, pack_id)
    needed = size - toc_start
    if len(tail) < needed:
        raise ValueError(
            f"pack {pack_id}: {needed} tail bytes are needed to read the TOC, got {len(tail)}")
    toc_count = _TRAILER.unpack(tail[-TRAILER_SIZE:])[1]
    envelope = bytes(tail[len(tail) - needed:len(tail) - TRAILER_SIZE])
    _check_envelope_head(envelope, pack_id, "TOC")
    ad = associated_data_v2(repo_id, TOC_KIND, pack_id, key_version, pack_id)
    body = aead.open_sealed(data_key, envelope, ad)
    if len(body) < TOC_HEAD_SIZE:
        raise FormatError(f"pack {pack_id}: TOC: truncated header")
    magic, version, reserved, raw_id, toc_version, count = _TOC_HEAD.unpack_from(body, 0)
    _check_head(pack_id, "TOC", magic == TOC_MAGIC, version, reserved == b"\0\0\0", raw_id,
                toc_version, key_version)
    if count != toc_count:
        raise FormatError(f"pack {pack_id}: TOC: count {count} differs from the trailer's "
                          f"{toc_count}")
    if not 1 <= count <= MAX_ENTRIES:
        raise FormatError(f"pack {pack_id}: TOC: count {count} outside 1..{MAX_ENTRIES}")
    if len(body) != TOC_HEAD_SIZE + count * TOC_ENTRY_SIZE:
        raise FormatError(f"pack {pack_id}: TOC: length does not match its count")
    entries = _parse_rows(body, pack_id, count)
    _check_rows(entries, pack_id, toc_start)
    return PackToc(pack_id, key_version, entries, toc_start, size)


def open_entry(data_key: bytes, repo_id: str, toc: PackToc, entry: PackEntry,
               envelope: bytes) -> bytes:
    """Open one entry's envelope (bytes offset..offset+length-1 of the pack) with AD2."""
    what = f"{KIND_WORDS.get(entry.kind, str(entry.kind))} {entry.object_id}"
    if toc._by_key.get((entry.kind, entry.object_id)) != entry:
        raise ValueError(f"pack {toc.pack_id}: {what} is not an entry of this TOC")
    if len(envelope) != entry.length:
        raise FormatError(f"pack {toc.pack_id}: {what}: envelope is {len(envelope)} bytes, "
                          f"the TOC says {entry.length}")
    _check_envelope_head(envelope, toc.pack_id, what)
    ad = associated_data_v2(repo_id, KIND_WORDS[entry.kind], entry.object_id,
                            toc.key_version, toc.pack_id)
    plain = aead.open_sealed(data_key, bytes(envelope), ad)
    if len(plain) != entry.plain_length:
        raise DecryptionError(f"pack {toc.pack_id}: {what}: plaintext length differs from "
                              "the TOC's")
    return plain


def check_header(blob: bytes, pack_id: str, key_version: int) -> None:
    """The 32-byte header must repeat the name's pack id and the trailer's key version."""
    if len(blob) < HEADER_SIZE:
        raise FormatError(f"pack {pack_id}: header: truncated")
    magic, version, reserved, raw_id, header_version, reserved2 = _HEADER.unpack_from(blob, 0)
    _check_head(pack_id, "header", magic == MAGIC, version,
                reserved == b"\0\0\0" and reserved2 == 0, raw_id, header_version, key_version)


def _check_head(pack_id: str, part: str, magic_ok: bool, version: int, reserved_zero: bool,
                raw_id: bytes, stated_version: int, key_version: int) -> None:
    """The fields the header and the TOC both repeat (FORMAT-2 3.1, 3.2), checked in the
    same order with the same messages: magic, version, reserved bytes, pack id (against
    the object's name) and key version (against the trailer's)."""
    if not magic_ok:
        raise FormatError(f"pack {pack_id}: {part}: bad magic")
    if version != VERSION:
        raise FormatError(f"pack {pack_id}: {part}: unsupported version {version}")
    if not reserved_zero:
        raise FormatError(f"pack {pack_id}: {part}: reserved bytes not zero")
    if raw_id.hex() != pack_id:
        raise FormatError(f"pack {pack_id}: {part}: pack id differs from the object's name")
    if stated_version != key_version:
        raise FormatError(f"pack {pack_id}: {part}: key version differs from the trailer's")


def open_pack(data_key: bytes, repo_id: str, pack_id: str,
              blob: bytes) -> tuple[PackToc, dict[tuple[int, str], bytes]]:
    """Open a whole pack: header, TOC, every entry, and the feature array's ids.

    Returns the TOC and every plaintext keyed by (kind code, object id).
    """
    _toc_start, key_version = trailer_info(blob, len(blob), pack_id)
    check_header(blob, pack_id, key_version)
    toc = open_toc(data_key, repo_id, pack_id, len(blob), blob)
    view = memoryview(blob)
    plains: dict[tuple[int, str], bytes] = {}
    for e in toc.entries:
        plains[(e.kind, e.object_id)] = open_entry(
            data_key, repo_id, toc, e, bytes(view[e.offset:e.offset + e.length]))
    decode_features(plains[(KIND_FEATURES, pack_id)], toc.image_ids())
    return toc, plains


def toc_range(size: int) -> int:
    """How many tail bytes to fetch first: TAIL_READ, or the whole object when smaller."""
    return min(size, TAIL_READ)

