"""Generate tests/vectors/segment_v2.json: authenticated segments, format version 2
(docs/FORMAT-2.md section 4; run once, the JSON is checked in).

    .venv/bin/python tests/vectors/gen_segment_v2.py

Same conventions as tests/vectors/generate.py (whose helpers this script imports): fixed
keys (SHA-256-like labels written into the JSON anyway), ``valid`` vectors and
self-contained ``broken`` variants, each with the error the real code raises, checked
here before the file is written. Nothing is random: the ciphertexts are those of
segment.json's batch-3 (read from that file, so that tokens made for it score against
these segments too, and no BLAS difference can creep in).

Broken variants name their ``reader``: "service" variants fail ``decode_segment`` (what
the keyless service checks); "member" variants pass it and fail only
``decode_authenticated`` (the MAC under the ring's index MAC keys), SegmentAuthError.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
from typing import Any

from generate import (  # type: ignore[import-not-found]  # run from tests/vectors
    ENCODING,
    ERRORS_NOTE,
    OTHER_REPO,
    OUT,
    OWNER_ID,
    REPO,
    ZOE_ID,
    b64,
    broken,
    fixed,
    flip,
    hx,
    put,
    write,
)

from cloud import layout
from cloud.segments import decode_authenticated, decode_segment, encode_segment_v2
from crypto.segment_mac import index_mac_key, segment_mac
from crypto.tokens import EncryptedVectors

HEADER = 192
TRAILER = 64
DATA_KEYS = {1: fixed("ring/v1/data"), 2: fixed("ring/v2/data")}  # keyring.json's ring-v2
LONG_WRITER = "w" + "-0123456789abcdef" * 3 + "-0123456789"  # 63 characters


def _source() -> tuple[list[str], EncryptedVectors]:
    """Ids and ciphertexts of segment.json's batch-3."""
    doc = json.loads((OUT / "segment.json").read_text(encoding="utf-8"))
    entry = doc["vectors"][0]
    seg = decode_segment(base64.b64decode(entry["segment_b64"]), entry["object_name"])
    vectors = EncryptedVectors(full=seg.vectors.full.copy(),
                               levels=tuple(a.copy() for a in seg.vectors.levels))
    return seg.id_strings(), vectors


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _valid(name: str, ids: list[str], vectors: EncryptedVectors, key_version: int,
           seg_id: str, writer: str, base_sequence: int) -> tuple[dict[str, Any], bytes]:
    k_mac = index_mac_key(DATA_KEYS[key_version])
    seg = encode_segment_v2(ids, vectors, key_version, seg_id=seg_id, writer=writer,
                            base_sequence=base_sequence, repo_id=REPO, mac_key=k_mac)
    body_end = len(seg) - TRAILER
    count, widths = len(ids), vectors.widths
    offsets = [HEADER + 16 * count + (-16 * count) % 64]
    for w in widths:
        raw = 8 * count * w
        offsets.append(offsets[-1] + raw + (-raw) % 64)
    assert offsets[-1] == body_end
    m_seg = _lp(b"radcrypt/segment/v2") + _lp(REPO.encode()) + seg[:body_end]
    entry = {
        "name": name, "object_name": layout.segment_key(REPO, seg_id), "repo_id": REPO,
        "key_version": key_version, "count": count, "widths": list(widths),
        "seg_id": seg_id, "base_sequence": base_sequence, "writer": writer,
        "w64_hex": hx(seg[44:108]), "image_ids": ids,
        "data_key_hex": hx(DATA_KEYS[key_version]), "k_mac_hex": hx(k_mac),
        "section_offsets": {"ids": HEADER, "levels": offsets[:-2], "full": offsets[-2],
                            "mac": body_end, "checksum": body_end + 32},
        "m_seg_prefix_hex": hx(m_seg[: len(m_seg) - body_end]),
        "m_seg_sha256_hex": hx(hashlib.sha256(m_seg).digest()),
        "mac_hex": hx(seg[body_end : body_end + 32]), "checksum_hex": hx(seg[-32:]),
        "object_sha256_hex": hx(hashlib.sha256(seg).digest()),
        "size": len(seg), "segment_b64": b64(seg)}
    return entry, seg


def _resum(data: bytes) -> bytes:
    return data[:-32] + hashlib.sha256(data[:-32]).digest()


def _remac(data: bytes, repo_id: str, data_key: bytes) -> bytes:
    """The MAC recomputed (under another key or repository), then the SHA-256."""
    body_end = len(data) - TRAILER
    mac = segment_mac(index_mac_key(data_key), repo_id, data[:body_end])
    return _resum(data[:body_end] + mac + data[-32:])


def _w64(raw_len: int, text: bytes, pad: bytes = b"") -> bytes:
    out = bytes([raw_len]) + text
    out += pad
    return out + b"\0" * (64 - len(out))


def make_segment_v2() -> None:
    ids, vectors = _source()
    seg_id = fixed("segment-v2/id", 16).hex()
    first, seg = _valid("batch-3-v2", ids, vectors, 1, seg_id, ZOE_ID, 41)
    second, _ = _valid("batch-3-v2-key-version-2-long-writer", ids, vectors, 2,
                       fixed("segment-v2/id-2", 16).hex(), LONG_WRITER, (1 << 64) - 1)
    name = first["object_name"]
    mac_keys = {v: index_mac_key(k) for v, k in DATA_KEYS.items()}
    offsets = first["section_offsets"]
    level0, full, mac_at = offsets["levels"][0], offsets["full"], offsets["mac"]

    service = [
        ("truncated-header", "only 10 bytes", seg[:10]),
        ("truncated-in-header", "only 191 bytes: the 192-byte header is cut", seg[:191]),
        ("bad-magic", "magic 'RCSX'", put(seg, 0, b"RCSX")),
        ("version-3", "format version 3", put(seg, 4, struct.pack("<H", 3))),
        ("version-1", "format version 1 on a version-2 segment (widths read at offset 20 "
                      "fall in seg_id)", put(seg, 4, struct.pack("<H", 1))),
        ("flags-set", "flags = 1", put(seg, 6, struct.pack("<H", 1))),
        ("reserved-set", "reserved byte = 1", put(seg, 19, b"\x01")),
        ("dtype-2", "dtype code 2", put(seg, 18, b"\x02")),
        ("count-0", "image count 0", put(seg, 12, struct.pack("<I", 0))),
        ("count-4", "image count 4: the declared size no longer matches",
         put(seg, 12, struct.pack("<I", 4))),
        ("count-too-large", "image count 10000001", put(seg, 12, struct.pack("<I", 10_000_001))),
        ("levels-9", "9 levels (maximum 8)", put(seg, 16, struct.pack("<H", 9))),
        ("width-0", "first width 0", put(seg, 108, struct.pack("<I", 0))),
        ("width-65537", "first width 65537", put(seg, 108, struct.pack("<I", 65537))),
        ("truncated-one-byte", "the last byte removed", seg[:-1]),
        ("trailing-byte", "one zero byte appended", seg + b"\0"),
        ("id-bit-flipped", "one bit of an image id flipped", flip(seg, HEADER + 3, 0)),
        ("vector-bit-flipped", "one bit of a level ciphertext flipped",
         flip(seg, level0 + 9, 4)),
        ("checksum-bit-flipped", "one bit of the checksum flipped (checksum mismatch)",
         flip(seg, len(seg) - 1, 7)),
        ("mac-flipped-no-resum", "one bit of the MAC flipped, SHA-256 not recomputed: the "
                                 "checksum catches it", flip(seg, mac_at, 0)),
        ("duplicate-ids", "image 1's id replaced by image 0's, checksum recomputed",
         _resum(put(seg, HEADER + 16, seg[HEADER : HEADER + 16]))),
        ("nan", "a NaN in the full ciphertexts, checksum recomputed",
         _resum(put(seg, full, struct.pack("<d", float("nan"))))),
        ("infinity", "-inf in a level ciphertext, checksum recomputed",
         _resum(put(seg, level0, struct.pack("<d", float("-inf"))))),
        ("seg-id-differs", "seg_id (offset 20) differs from the object name, MAC and "
                           "checksum recomputed",
         _remac(put(seg, 20, fixed("segment-v2/other", 16)), REPO, DATA_KEYS[1])),
        ("writer-length-0", "writer length byte 0, checksum recomputed",
         _resum(put(seg, 44, _w64(0, b"")))),
        ("writer-length-64", "writer length byte 64, checksum recomputed",
         _resum(put(seg, 44, _w64(64, b"")))),
        ("writer-padding-nonzero", "a non-zero byte after the writer's user id, checksum "
                                   "recomputed",
         _resum(put(seg, 44, _w64(len(ZOE_ID), ZOE_ID.encode(), b"\x01")))),
        ("writer-not-a-user-id", "writer 'Zoe-Muller' (upper case), checksum recomputed",
         _resum(put(seg, 44, _w64(10, b"Zoe-Muller")))),
        ("writer-starts-with-dash", "writer '-zoe', checksum recomputed",
         _resum(put(seg, 44, _w64(4, b"-zoe")))),
        ("header-padding-nonzero", "a non-zero byte at offset 150 (header padding), "
                                   "checksum recomputed", _resum(put(seg, 150, b"\x01"))),
    ]
    member = [
        ("mac-flipped", "one bit of the MAC flipped, SHA-256 recomputed",
         _resum(flip(seg, mac_at + 5, 2))),
        ("mac-other-repository", f"MAC computed for repository {OTHER_REPO!r}, SHA-256 "
                                 "recomputed", _remac(seg, OTHER_REPO, DATA_KEYS[1])),
        ("mac-other-key-version", "MAC under the index MAC key of key version 2 while the "
                                  "header says 1, SHA-256 recomputed",
         _remac(seg, REPO, DATA_KEYS[2])),
        ("key-version-missing", "header key version 3 (the ring holds 1 and 2), MAC "
                                "recomputed under version 1's key, SHA-256 recomputed",
         _remac(put(seg, 8, struct.pack("<I", 3)), REPO, DATA_KEYS[1])),
        ("body-changed", "one level ciphertext changed, SHA-256 recomputed: the service "
                         "accepts it, a member does not",
         _resum(put(seg, level0, struct.pack("<d", 0.5)))),
        ("writer-changed", f"writer {OWNER_ID!r} instead of {ZOE_ID!r}, SHA-256 recomputed",
         _resum(put(seg, 44, _w64(len(OWNER_ID), OWNER_ID.encode())))),
        ("base-sequence-changed", "base_sequence 40 instead of 41, SHA-256 recomputed",
         _resum(put(seg, 36, struct.pack("<Q", 40)))),
    ]
    entries = [broken(n, text, "SegmentError", lambda d=d: decode_segment(d, name),
                      reader="service", object_name=name, segment_b64=b64(d))
               for n, text, d in service]
    for n, text, d in member:
        decode_segment(d, name)  # the service accepts every one of these
        entries.append(broken(
            n, text, "SegmentAuthError",
            lambda d=d: decode_authenticated(d, name, REPO, mac_keys),
            reader="member", object_name=name, segment_b64=b64(d)))
    doc = {
        "format": "segment_v2", "title": "Authenticated index segment, format version 2 "
        "(cloud/segments.py, crypto/segment_mac.py)",
        "spec": "docs/FORMAT-2.md, section '4. Authenticated segments'",
        "generated_by": "tests/vectors/gen_segment_v2.py", "encoding": ENCODING,
        "notes": [
            "decode: cloud.segments.decode_segment(segment, object_name) gives key_version, "
            "ids, arrays, seg_id, writer, base_sequence (no MAC check); "
            "encode_segment_v2(ids, vectors, key_version, seg_id=, writer=, base_sequence=, "
            "repo_id=, mac_key=k_mac) == segment",
            "k_mac = HKDF-SHA256(IKM = data key, salt = 32 zero bytes, info = "
            "'radcrypt/index-mac-key/v2', 32 bytes); mac = HMAC-SHA256(k_mac, M_seg), "
            "M_seg = m_seg_prefix || bytes 0..mac-1 of the segment; m_seg_prefix = "
            "LP('radcrypt/segment/v2') || LP(repo_id), LP = u32 big-endian length || bytes",
            "checksum = SHA-256 of bytes 0..size-33 (header, sections and MAC); "
            "object_sha256 = SHA-256 of the whole object (what the segment log records)",
            "the data keys are keyring.json's ring-v2 (versions 1 and 2); the ciphertexts are "
            "segment.json's batch-3 (index key of key version 1)",
            "broken, reader 'service': decode_segment(segment, object_name) raises "
            "SegmentError; reader 'member': decode_segment accepts it and "
            "decode_authenticated(segment, object_name, repo_id, {1: k_mac(v1), 2: k_mac(v2)}) "
            "raises SegmentAuthError (a SegmentError, reason 'not authenticated')",
            ERRORS_NOTE],
        "vectors": [first, second], "broken": entries}
    write("segment_v2.json", doc)


def main() -> int:
    make_segment_v2()
    return 0


if __name__ == "__main__":
    sys.exit(main())
