"""The bytes of one segment-log entry (docs/FORMAT-2.md 5.2), and nothing else.

Kept apart from cloud/seglog.py (which verifies chains, applies the kind rules and writes
to the store) so that the layout can be read, tested and reimplemented on its own. A decoded
entry is only well formed: whether it may follow the entries before it is seglog's job.

Payload, big-endian::

    "RCLE" | version u8 (1) | kind u8 | reason u8 | reserved u8 (0)
    | sequence u64 | prev (32) | manifest_sequence u64 | key_version u32 | time_ms u64
    | writer W64 | a u32 | a x (type u8 | 3 zero | ID16 | sha256 (32) | count u32)
    | r u32 | r x (type u8 | 3 zero | ID16)

Lists are strictly sorted by (type, id bytes): no duplicate, one canonical encoding.
"""

from __future__ import annotations

import itertools
import re
import struct
from dataclasses import dataclass

from cloud import layout
from crypto.errors import FormatError

MAGIC = b"RCLE"
VERSION = 1

TYPE_SEGMENT, TYPE_PACK, TYPE_V1_SEGMENT, TYPE_LABEL = 1, 2, 3, 4
TYPE_WORDS = {TYPE_SEGMENT: "segment", TYPE_PACK: "pack", TYPE_V1_SEGMENT: "format-1 segment",
              TYPE_LABEL: "label"}
ADDED_TYPES = (TYPE_SEGMENT, TYPE_PACK, TYPE_LABEL)
"""Types an entry may add. A label (issue 17, crypto/labels.py) is a small keyword
dictionary naming rows of one segment: added by its own entries (reason label), removed
with its segment by the rewrite that replaces that segment."""

KIND_GENESIS, KIND_ADD, KIND_REPLACE, KIND_REMOVE, KIND_MEMBERSHIP = 0, 1, 2, 3, 4
KIND_WORDS = {KIND_GENESIS: "genesis", KIND_ADD: "add", KIND_REPLACE: "replace",
              KIND_REMOVE: "remove", KIND_MEMBERSHIP: "membership"}

(REASON_IMPORT, REASON_COMPACTION, REASON_ERASURE, REASON_REVOCATION, REASON_MIGRATION,
 REASON_REPAIR) = range(6)
REASON_LABEL = 16  # issue 17; 6..15 stay free (the vectors' "unknown reason" case is 6)
REASON_WORDS = {REASON_IMPORT: "import", REASON_COMPACTION: "compaction",
                REASON_ERASURE: "erasure", REASON_REVOCATION: "revocation",
                REASON_MIGRATION: "migration", REASON_REPAIR: "repair", REASON_LABEL: "label"}

HEAD_SIZE = 132          # fixed part up to and including the writer
ADDED_SIZE = 56
REMOVED_SIZE = 20
ZERO_HASH = b"\0" * 32
MAX_ITEMS = 1 << 20      # per list: far above any batch or compaction group, bounds allocation

_HEAD = struct.Struct(">4sBBBBQ32sQIQ")   # up to time_ms: 68 bytes
_ADDED = struct.Struct(">B3s16s32sI")
_REMOVED = struct.Struct(">B3s16s")
_USER_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_HEX_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Added:
    """An object an entry makes live: type, 32-hex id, SHA-256 of the whole object, images."""

    type: int
    id: str
    sha256: bytes
    count: int


@dataclass(frozen=True)
class Removed:
    """An object an entry takes out of the live set (type 3: a format-1 segment, migration)."""

    type: int
    id: str


@dataclass(frozen=True)
class LogEntry:
    """One decoded entry; ``writer`` is the user id that must have signed it."""

    sequence: int
    kind: int
    reason: int
    prev: bytes
    manifest_sequence: int
    key_version: int
    time_ms: int
    writer: str
    added: tuple[Added, ...]
    removed: tuple[Removed, ...]


def _fail(name: str, field: str, problem: str) -> FormatError:
    return FormatError(f"log entry {name}: {field} {problem}")


def _id16(name: str, field: str, hex_id: str) -> bytes:
    if not isinstance(hex_id, str) or _HEX_ID.fullmatch(hex_id) is None:
        raise _fail(name, field, "must be 32 lowercase hexadecimal characters")
    return bytes.fromhex(hex_id)


def w64(user_id: str) -> bytes:
    """W64(user_id): length byte, ASCII id, zero padding to 64 bytes."""
    if not isinstance(user_id, str) or _USER_ID.fullmatch(user_id) is None:
        raise FormatError(f"writer {user_id!r} is not a valid user id")
    raw = user_id.encode("ascii")
    return bytes([len(raw)]) + raw + b"\0" * (63 - len(raw))


def read_w64(field: bytes, name: str) -> str:
    """Parse W64; reject length 0 or above 63, non-zero padding, or a malformed id."""
    length = field[0]
    if not 1 <= length <= 63:
        raise _fail(name, "writer length", f"{length} is not 1..63")
    if any(field[1 + length:]):
        raise _fail(name, "writer padding", "is not zero")
    text = field[1:1 + length].decode("ascii", errors="replace")
    if _USER_ID.fullmatch(text) is None:
        raise _fail(name, "writer", "is not a valid user id")
    return text


def _check_sorted(name: str, field: str, keys: list[tuple[int, bytes]]) -> None:
    for before, after in itertools.pairwise(keys):
        if not before < after:
            problem = "has a duplicate object" if before == after else "is not sorted by (type, id)"
            raise _fail(name, field, problem)


def _check_uint(name: str, field: str, value: object, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise _fail(name, field, f"must be an integer 0..2**{bits}-1")
    return value


def encode_payload(entry: LogEntry) -> bytes:
    """The canonical payload bytes; raises FormatError for a value the layout cannot hold,
    an unknown kind, reason or type, or lists that are unsorted or repeat an object."""
    name = f"sequence {entry.sequence}"
    if entry.kind not in KIND_WORDS:
        raise _fail(name, "kind", f"{entry.kind!r} is unknown")
    if entry.reason not in REASON_WORDS:
        raise _fail(name, "reason", f"{entry.reason!r} is unknown")
    if not isinstance(entry.prev, bytes) or len(entry.prev) != 32:
        raise _fail(name, "prev", "must be 32 bytes")
    for field, bits in (("sequence", 64), ("manifest_sequence", 64), ("key_version", 32),
                        ("time_ms", 64)):
        _check_uint(name, field, getattr(entry, field), bits)
    for field, items in (("added", entry.added), ("removed", entry.removed)):
        if len(items) > MAX_ITEMS:
            raise _fail(name, field, f"has more than {MAX_ITEMS} objects")
    out = bytearray(_HEAD.pack(MAGIC, VERSION, entry.kind, entry.reason, 0, entry.sequence,
                               entry.prev, entry.manifest_sequence, entry.key_version,
                               entry.time_ms))
    out += w64(entry.writer)
    out += struct.pack(">I", len(entry.added))
    keys: list[tuple[int, bytes]] = []
    for item in entry.added:
        if item.type not in ADDED_TYPES:
            raise _fail(name, "added type", f"{item.type!r} is not 1 (segment), 2 (pack) or "
                        "4 (label)")
        raw = _id16(name, "added id", item.id)
        if not isinstance(item.sha256, bytes) or len(item.sha256) != 32:
            raise _fail(name, "added sha256", "must be 32 bytes")
        out += _ADDED.pack(item.type, b"\0\0\0", raw, item.sha256,
                           _check_uint(name, "added count", item.count, 32))
        keys.append((item.type, raw))
    _check_sorted(name, "added", keys)
    out += struct.pack(">I", len(entry.removed))
    keys = []
    for gone in entry.removed:
        if gone.type not in TYPE_WORDS:
            raise _fail(name, "removed type", f"{gone.type!r} is unknown")
        raw = _id16(name, "removed id", gone.id)
        out += _REMOVED.pack(gone.type, b"\0\0\0", raw)
        keys.append((gone.type, raw))
    _check_sorted(name, "removed", keys)
    return bytes(out)


def decode_payload(payload: bytes, name: str, sequence: int | None = None) -> LogEntry:
    """Parse a payload; ``name`` is the object key (used in messages). The payload's
    sequence must equal ``sequence`` when given, else the number in ``name`` when ``name``
    is a log entry key (FormatError "sequence differs from the name")."""
    if sequence is None:
        try:
            sequence = layout.parse_log_entry_key(name)[1]
        except ValueError:
            sequence = None
    if len(payload) < HEAD_SIZE + 8:
        raise _fail(name, "payload", f"is {len(payload)} bytes, shorter than the minimum "
                    f"{HEAD_SIZE + 8}")
    (magic, version, kind, reason, reserved, seq, prev, manifest_sequence, key_version,
     time_ms) = _HEAD.unpack_from(payload, 0)
    if magic != MAGIC:
        raise _fail(name, "magic", f"{magic!r} is not {MAGIC!r}")
    if version != VERSION:
        raise _fail(name, "version", f"{version} is not supported (only {VERSION})")
    if kind not in KIND_WORDS:
        raise _fail(name, "kind", f"{kind} is unknown")
    if reason not in REASON_WORDS:
        raise _fail(name, "reason", f"{reason} is unknown")
    if reserved:
        raise _fail(name, "reserved byte", "is not zero")
    if sequence is not None and seq != sequence:
        raise _fail(name, "sequence", f"{seq} differs from the name's {sequence}")
    writer = read_w64(payload[68:HEAD_SIZE], name)
    offset = HEAD_SIZE
    (count,) = struct.unpack_from(">I", payload, offset)
    offset += 4
    if count > MAX_ITEMS or len(payload) < offset + count * ADDED_SIZE + 4:
        raise _fail(name, "added count", f"{count} does not fit the payload")
    added: list[Added] = []
    keys: list[tuple[int, bytes]] = []
    for _ in range(count):
        kind_a, pad, raw, digest, images = _ADDED.unpack_from(payload, offset)
        offset += ADDED_SIZE
        if kind_a not in ADDED_TYPES:
            raise _fail(name, "added type", f"{kind_a} is not 1 (segment), 2 (pack) or "
                        "4 (label)")
        if any(pad):
            raise _fail(name, "added reserved bytes", "are not zero")
        added.append(Added(kind_a, raw.hex(), digest, images))
        keys.append((kind_a, raw))
    _check_sorted(name, "added", keys)
    (count,) = struct.unpack_from(">I", payload, offset)
    offset += 4
    if count > MAX_ITEMS or len(payload) != offset + count * REMOVED_SIZE:
        raise _fail(name, "length", f"{len(payload)} bytes does not match {count} removed "
                    "objects (truncated or trailing bytes)")
    removed: list[Removed] = []
    keys = []
    for _ in range(count):
        kind_r, pad, raw = _REMOVED.unpack_from(payload, offset)
        offset += REMOVED_SIZE
        if kind_r not in TYPE_WORDS:
            raise _fail(name, "removed type", f"{kind_r} is unknown")
        if any(pad):
            raise _fail(name, "removed reserved bytes", "are not zero")
        removed.append(Removed(kind_r, raw.hex()))
        keys.append((kind_r, raw))
    _check_sorted(name, "removed", keys)
    return LogEntry(seq, kind, reason, prev, manifest_sequence, key_version, time_ms, writer,
                    tuple(added), tuple(removed))
