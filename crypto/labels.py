"""Label objects: a user's labels on images of one segment, as a small keyword dictionary.

Why a separate object: a segment is immutable (docs/FORMAT-2.md 4), but a radiologist adds
and removes labels ("teaching", "follow-up") long after the import. Each change is a small
object listed in the segment log (type 4, ``labels/<label_id>``) that names rows of ONE
live segment. The service finds the rows with the same Pi_bas token as for the segment's
own dictionary (crypto/sse.py); members read the labels in clear from the sealed part.

Layout (big-endian)::

    0    4   magic "RCLB"
    4    1   version = 1
    5    1   op: 1 add, 2 remove (a tombstone: the named rows lose the label)
    6    2   reserved = 0
    8    4   key_version u32 >= 1
    12   16  label_id (ID16, equal to the object's name)
    28   16  segment_id (ID16): the segment whose rows the dictionary names
    44   4   row_count u32 >= 1: that segment's image count (rows are below it)
    48   8   base_sequence u64: the log head the writer had verified (the order, below)
    56   8   D u64: dictionary length
    64   D   keyword dictionary (RCSD, crypto/sse.py) of the keywords ``label=<word>``,
             SSE-bound to (repo_id, label_id, key_version): rows are positions in the segment
    ..   4   E u32: envelope length
    ..   E   AEAD envelope (crypto/aead.py) under the data key of key_version, associated
             data AD2(repo_id, "label", label_id, key_version, segment_id), of the JSON
             {"format": "radcrypt-labels-v1", "labels": {word: [image ids]}}
    end  32  HMAC-SHA256(K_mac, LP("radcrypt/label/v1") || LP(repo_id) || every byte before)

K_mac is the index MAC key of the key version (crypto/segment_mac.py): a member rejects a
label object nobody holding that version's data key wrote; the log's SHA-256 and signature
bind it to its writer. The service (no key) checks the structure and the SHA-256 only.

Order: for one token in one segment, the segment's rows, then each live label object naming
that segment in the order (``base_sequence``, label_id): an add joins its rows, a remove
takes them out (``apply_labels``). Not the log sequence of the adding entry: a verifier
that starts from a checkpoint sees every object of it as added at the checkpoint. A
change written after another was committed has a larger base sequence (the writer
verified the log first); two concurrent changes are ordered by id, the same way for all.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from crypto.aead import open_sealed, seal
from crypto.errors import FormatError
from crypto.pack import associated_data_v2
from crypto.sse import Dictionary, build_dictionary

MAGIC = b"RCLB"
VERSION = 1
OP_ADD, OP_REMOVE = 1, 2
OP_WORDS = {OP_ADD: "add", OP_REMOVE: "remove"}
LABEL_FORMAT = "radcrypt-labels-v1"
MAC_DOMAIN = b"radcrypt/label/v1"
MAC_SIZE = 32
MAX_ROWS = 10_000_000  # a segment's largest count (cloud/segments.py MAX_COUNT)
MAX_SIZE = 64 << 20  # a label object names at most one segment's rows: far below this
_HEAD = struct.Struct(">4sBBHI16s16sIQQ")  # 64 bytes
_U32 = struct.Struct(">I")
_HEX = re.compile(r"[0-9a-f]{32}")

U32 = NDArray[np.uint32]


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _mac(mac_key: bytes, repo_id: str, body: bytes | memoryview) -> bytes:
    digest = hmac.new(mac_key, _lp(MAC_DOMAIN), hashlib.sha256)
    digest.update(_lp(repo_id.encode("utf-8")))
    digest.update(body)
    return digest.digest()


def _ad(repo_id: str, label_id: str, key_version: int, segment_id: str) -> bytes:
    return associated_data_v2(repo_id, "label", label_id, key_version, segment_id)


@dataclass(frozen=True)
class LabelObject:
    """A parsed label object (structure only: no key involved)."""

    label_id: str
    key_version: int
    segment_id: str
    row_count: int
    op: int
    base_sequence: int
    dictionary: bytes
    envelope: bytes
    body_end: int  # where the MAC starts

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<label>") -> LabelObject:
        """Parse and validate; FormatError names ``name`` and the field at fault. The
        dictionary is parsed too (a malformed one is refused here, not at search time)."""
        if len(data) > MAX_SIZE:
            raise FormatError(f"label object {name}: {len(data)} bytes is above the limit")
        if len(data) < _HEAD.size + _U32.size + MAC_SIZE:
            raise FormatError(f"label object {name} is truncated (header)")
        (magic, version, op, reserved, key_version, raw_label, raw_segment, row_count,
         base_sequence, size) = _HEAD.unpack_from(data)
        if magic != MAGIC:
            raise FormatError(f"label object {name}: bad magic bytes")
        if version != VERSION:
            raise FormatError(f"label object {name}: unsupported version {version}")
        if op not in OP_WORDS or reserved:
            raise FormatError(f"label object {name}: unknown op {op} or reserved bits set")
        if key_version < 1:
            raise FormatError(f"label object {name}: key version 0")
        if not 1 <= row_count <= MAX_ROWS:
            raise FormatError(f"label object {name}: row count {row_count} out of range")
        label_id = raw_label.hex()
        last = name.rsplit("/", 1)[-1]
        if _HEX.fullmatch(last) and last != label_id:
            raise FormatError(f"label object {name}: label_id {label_id} differs from its name")
        start = _HEAD.size
        if len(data) < start + size + _U32.size + MAC_SIZE:
            raise FormatError(f"label object {name}: dictionary length {size} does not fit")
        dictionary = bytes(data[start : start + size])
        (length,) = _U32.unpack_from(data, start + size)
        envelope_at = start + size + _U32.size
        if len(data) != envelope_at + length + MAC_SIZE:
            raise FormatError(f"label object {name}: length {len(data)} does not match its "
                              "dictionary and envelope lengths")
        Dictionary.from_bytes(dictionary, f"of label {label_id}")
        return cls(label_id, int(key_version), raw_segment.hex(), int(row_count), int(op),
                   int(base_sequence), dictionary, bytes(data[envelope_at : envelope_at + length]),
                   envelope_at + length)


def build_label(*, data_key: bytes, keyword_key: bytes, mac_key: bytes, repo_id: str,
                key_version: int, label_id: str, segment_id: str, segment_ids: Sequence[str],
                op: int, labels: Mapping[str, Iterable[str]], base_sequence: int) -> bytes:
    """The bytes of a label object.

    ``segment_ids``: the target segment's image ids in row order; ``labels``: word ->
    image ids of that segment (each must be in it). Each word becomes the keyword
    ``label=<word>`` (the caller normalises words, app/core/keywords.py)."""
    if op not in OP_WORDS:
        raise ValueError(f"unknown label op {op}")
    if not 0 <= base_sequence < 1 << 64:
        raise ValueError(f"base_sequence {base_sequence} is not a u64")
    for value, what in ((label_id, "label_id"), (segment_id, "segment_id")):
        if not _HEX.fullmatch(value):
            raise ValueError(f"{what} must be 32 lowercase hexadecimal characters")
    if not 1 <= len(segment_ids) <= MAX_ROWS:
        raise ValueError("a label names rows of a segment of 1 to 10,000,000 images")
    position = {image_id: row for row, image_id in enumerate(segment_ids)}
    rows: dict[str, list[int]] = {}
    listed: dict[str, list[str]] = {}
    for word, ids in sorted(labels.items()):
        chosen = sorted(set(ids))
        missing = [i for i in chosen if i not in position]
        if missing:
            raise ValueError(f"image {missing[0]} is not in segment {segment_id}")
        if chosen:
            rows[f"label={word}"] = [position[i] for i in chosen]
            listed[word] = chosen
    if not listed:
        raise ValueError("a label object names at least one image")
    dictionary = build_dictionary(keyword_key, repo_id, key_version, label_id, rows)
    plain = json.dumps({"format": LABEL_FORMAT, "labels": listed}, sort_keys=True,
                       separators=(",", ":")).encode("utf-8")
    envelope = seal(data_key, plain, _ad(repo_id, label_id, key_version, segment_id))
    head = _HEAD.pack(MAGIC, VERSION, op, 0, key_version, bytes.fromhex(label_id),
                      bytes.fromhex(segment_id), len(segment_ids), base_sequence,
                      len(dictionary))
    body = head + dictionary + _U32.pack(len(envelope)) + envelope
    return body + _mac(mac_key, repo_id, body)


def open_label(data: bytes, name: str, *, repo_id: str, data_key: bytes, mac_key: bytes
               ) -> tuple[LabelObject, dict[str, list[str]]]:
    """What a member reads: the parsed object and its labels (word -> image ids), after
    the MAC (FormatError "not authenticated") and the envelope (DecryptionError)."""
    label = LabelObject.from_bytes(data, name)
    stored = bytes(data[label.body_end :])
    if not hmac.compare_digest(stored, _mac(mac_key, repo_id, memoryview(data)[: label.body_end])):
        raise FormatError(f"label object {name}: not authenticated (its MAC does not verify "
                          f"under key version {label.key_version} of repository {repo_id})")
    plain = open_sealed(data_key, label.envelope,
                        _ad(repo_id, label.label_id, label.key_version, label.segment_id))
    try:
        record = json.loads(plain)
    except ValueError:
        raise FormatError(f"label object {name}: its sealed labels are not JSON") from None
    words = record.get("labels") if isinstance(record, dict) else None
    if (not isinstance(record, dict) or record.get("format") != LABEL_FORMAT
            or not isinstance(words, dict)
            or not all(isinstance(w, str) and isinstance(ids, list)
                       and all(isinstance(i, str) and _HEX.fullmatch(i) for i in ids)
                       for w, ids in words.items())):
        raise FormatError(f"label object {name}: its sealed labels are malformed")
    return label, {str(w): [str(i) for i in ids] for w, ids in words.items()}


def order_key(label: LabelObject) -> tuple[int, str]:
    """The order label changes apply in (module docstring)."""
    return label.base_sequence, label.label_id


def apply_labels(base: U32, changes: Iterable[tuple[int, U32]]) -> U32:
    """The rows holding a label keyword after the changes, in log order: (op, rows) each;
    an add joins, a remove takes out. ``base``: the segment dictionary's rows."""
    rows = np.asarray(base, dtype=np.uint32)
    for op, found in changes:
        if op == OP_ADD:
            rows = np.union1d(rows, found).astype(np.uint32)
        elif op == OP_REMOVE:
            rows = np.setdiff1d(rows, found, assume_unique=False).astype(np.uint32)
        else:
            raise ValueError(f"unknown label op {op}")
    return rows
