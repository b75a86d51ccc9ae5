"""Segments of format version 2 (docs/FORMAT-2.md section 4): round trip, the
streaming loader of the search service (v1 and v2 alike, whole-object SHA-256 from the
log), the MAC a member checks, every broken case of FORMAT-2.md section 10, and the
vectors of tests/vectors/segment_v2.json read a second time by an independent reader
(hashlib, hmac and struct only) that follows FORMAT-2.md's text, not the code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import struct
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud.directory_store import DirectoryStore
from cloud.index_rows import VersionRows
from cloud.segment_download import Appends, load_segments, read_headers
from cloud.segments import (
    ALIGN,
    HEADER_SIZE_V2,
    SegmentAuthError,
    SegmentError,
    decode_authenticated,
    decode_segment,
    encode_segment,
    encode_segment_v2,
    expected_size,
    ids_range,
    parse_header,
    read_header,
    read_segment,
    verify_segment_mac,
)
from crypto.index import IndexKey
from crypto.segment_mac import index_mac_key, mac_matches, segment_mac
from crypto.tokens import EncryptedVectors

VECTORS = Path(__file__).resolve().parent / "vectors" / "segment_v2.json"
REPO = "radiology-demo"
PREFIX = f"radcrypt/v1/repos/{REPO}/segments/"
DATA_KEY = bytes(range(32))
MAC_KEY = index_mac_key(DATA_KEY)


@pytest.fixture(scope="module")
def batch() -> tuple[list[str], EncryptedVectors]:
    rng = np.random.default_rng(7)
    data = rng.standard_normal((37, 32))
    key = IndexKey.generate(32, sample=data, levels=(4, 8))
    return [secrets.token_hex(16) for _ in range(37)], key.encrypt(data)


def _v2(ids: list[str], vectors: EncryptedVectors, seg_id: str, *, key_version: int = 3,
        writer: str = "zoe-muller-3f2a1c", base_sequence: int = 12,
        repo_id: str = REPO, mac_key: bytes = MAC_KEY) -> bytes:
    return encode_segment_v2(ids, vectors, key_version, seg_id=seg_id, writer=writer,
                             base_sequence=base_sequence, repo_id=repo_id, mac_key=mac_key)


# --- round trip ----------------------------------------------------------------------------


def test_round_trip(batch: tuple[list[str], EncryptedVectors]) -> None:
    ids, vectors = batch
    seg_id = secrets.token_hex(16)
    blob = _v2(ids, vectors, seg_id)
    seg = decode_segment(blob, PREFIX + seg_id)
    assert (seg.format_version, seg.key_version, len(seg)) == (2, 3, 37)
    assert (seg.seg_id, seg.writer, seg.base_sequence) == (seg_id, "zoe-muller-3f2a1c", 12)
    assert seg.id_strings() == ids
    assert seg.sha256 == hashlib.sha256(blob).digest()
    for got, want in zip((*seg.vectors.levels, seg.vectors.full),
                         (*vectors.levels, vectors.full), strict=True):
        assert np.array_equal(got, want)
    assert len(blob) == expected_size(37, vectors.widths, version=2)
    assert len(blob) == expected_size(37, vectors.widths) + HEADER_SIZE_V2 - 64 + 32
    base = np.frombuffer(blob, np.uint8).ctypes.data
    for array in (*seg.vectors.levels, seg.vectors.full):
        assert (array.ctypes.data - base) % ALIGN == 0 and not array.flags.owndata
    verify_segment_mac(blob, PREFIX + seg_id, REPO, MAC_KEY)
    assert decode_authenticated(blob, seg_id, REPO, {3: MAC_KEY}).id_strings() == ids


def test_version_1_is_unchanged(batch: tuple[list[str], EncryptedVectors]) -> None:
    ids, vectors = batch
    blob = encode_segment(ids, vectors, 3)
    seg = decode_segment(blob, PREFIX + secrets.token_hex(16))
    assert (seg.format_version, seg.seg_id, seg.writer, seg.base_sequence) == (1, None, None, None)
    assert seg.sha256 == hashlib.sha256(blob).digest()
    assert ids_range(blob[:HEADER_SIZE_V2], "s") == (64, 16 * 37)
    assert read_header(blob[:64], "s") == (3, 37, vectors.widths)
    with pytest.raises(SegmentAuthError, match="not authenticated") as info:
        verify_segment_mac(blob, "s", REPO, MAC_KEY)
    assert info.value.reason == "not authenticated"
    with pytest.raises(SegmentAuthError):
        decode_authenticated(blob, "s", REPO, {3: MAC_KEY})


def test_header_helpers(batch: tuple[list[str], EncryptedVectors]) -> None:
    ids, vectors = batch
    seg_id = secrets.token_hex(16)
    blob = _v2(ids, vectors, seg_id, base_sequence=(1 << 64) - 1, writer="a")
    head = blob[:HEADER_SIZE_V2]
    assert read_header(head, PREFIX + seg_id) == (3, 37, vectors.widths)
    offset, length = ids_range(head, PREFIX + seg_id)
    assert (offset, length) == (192, 16 * 37)
    assert blob[offset : offset + length] == b"".join(bytes.fromhex(i) for i in ids)
    header = parse_header(head, seg_id)
    assert (header.base_sequence, header.writer, header.size) == ((1 << 64) - 1, "a", len(blob))
    with pytest.raises(SegmentError, match="truncated"):
        read_header(blob[:64], seg_id)  # a v2 header needs its 192 bytes


def test_encoder_rejects_bad_fields(batch: tuple[list[str], EncryptedVectors]) -> None:
    ids, vectors = batch
    good = secrets.token_hex(16)
    for kwargs, match in [({"seg_id": "ABC"}, "seg_id"), ({"seg_id": good.upper()}, "seg_id"),
                          ({"writer": ""}, "writer"), ({"writer": "x" * 64}, "writer"),
                          ({"writer": "Zoe"}, "writer"), ({"base_sequence": -1}, "u64"),
                          ({"base_sequence": 1 << 64}, "u64"), ({"key_version": 1 << 32}, "u32"),
                          ({"mac_key": b"short"}, "MAC key")]:
        args: dict[str, Any] = {"seg_id": good, **kwargs}
        with pytest.raises(ValueError, match=match):
            _v2(ids, vectors, **args)
    with pytest.raises(ValueError, match="one image id"):
        _v2(ids[:-1], vectors, good)


# --- MAC -------------------------------------------------------------------------------------


def test_mac_primitives() -> None:
    key = index_mac_key(DATA_KEY)
    # HKDF-SHA256 with RFC 5869's extract and expand written out
    prk = hmac.new(bytes(32), DATA_KEY, hashlib.sha256).digest()
    assert key == hmac.new(prk, b"radcrypt/index-mac-key/v2\x01", hashlib.sha256).digest()
    body = b"header and sections"
    mac = segment_mac(key, REPO, body)
    message = (struct.pack(">I", 19) + b"radcrypt/segment/v2"
               + struct.pack(">I", len(REPO)) + REPO.encode() + body)
    assert mac == hmac.new(key, message, hashlib.sha256).digest()
    assert mac_matches(key, REPO, body, mac)
    assert not mac_matches(key, "other-repo", body, mac)
    assert not mac_matches(index_mac_key(bytes(32)), REPO, body, mac)
    assert not mac_matches(key, REPO, body + b"!", mac)
    with pytest.raises(ValueError, match="data key"):
        index_mac_key(b"short")


def test_mac_rejections(batch: tuple[list[str], EncryptedVectors]) -> None:
    ids, vectors = batch
    seg_id = secrets.token_hex(16)
    name = PREFIX + seg_id
    blob = _v2(ids, vectors, seg_id)
    other_repo = _v2(ids, vectors, seg_id, repo_id="cardiology-demo")
    other_key = _v2(ids, vectors, seg_id, mac_key=index_mac_key(bytes(32)))
    changed = bytearray(blob)
    changed[HEADER_SIZE_V2 + 16 * 37 + 40] ^= 0x10  # a level ciphertext (64-aligned ids)
    changed[-32:] = hashlib.sha256(changed[:-32]).digest()
    for bad in (other_repo, other_key, bytes(changed)):
        decode_segment(bad, name)  # the keyless service accepts all three
        with pytest.raises(SegmentAuthError) as info:
            verify_segment_mac(bad, name, REPO, MAC_KEY)
        assert info.value.reason == "not authenticated" and name in str(info.value)
        assert isinstance(info.value, SegmentError)
    with pytest.raises(SegmentAuthError, match="key version 3 is not in the key ring"):
        decode_authenticated(blob, name, REPO, {1: MAC_KEY, 2: MAC_KEY})
    with pytest.raises(SegmentError, match="truncated"):  # structure before the MAC
        verify_segment_mac(blob[:-1], name, REPO, MAC_KEY)


def test_damage_is_reported(batch: tuple[list[str], EncryptedVectors]) -> None:
    ids, vectors = batch
    seg_id = secrets.token_hex(16)
    blob = _v2(ids, vectors, seg_id)

    def resum(data: bytes) -> bytes:
        return data[:-32] + hashlib.sha256(data[:-32]).digest()

    def at(offset: int, new: bytes) -> bytes:
        return resum(blob[:offset] + new + blob[offset + len(new) :])

    cases = {
        "short header": (blob[:150], "truncated"),
        "widths": (at(108, struct.pack("<I", 0)), "width"),
        "seg_id": (at(20, bytes(16)), "seg_id .* differs from the object's name"),
        "writer length": (at(44, b"\x00"), "writer: length 0"),
        "writer padding": (at(44 + 20, b"\x07"), "writer: non-zero"),
        "writer syntax": (at(45, b"Z"), "writer: 'Zoe-muller-3f2a1c' is not a valid user id"),
        "padding": (at(191, b"\x01"), "header padding"),
        "checksum": (blob[:-1] + bytes([blob[-1] ^ 1]), "checksum"),
        "trailing": (blob + b"\0", "trailing"),
    }
    for case, (bad, reason) in cases.items():
        with pytest.raises(SegmentError, match=reason) as info:
            decode_segment(bad, PREFIX + seg_id)
        assert seg_id in str(info.value), case
    # a name that is not an object key is not compared with seg_id
    assert decode_segment(blob, "<segment>").seg_id == seg_id


# --- the service's streaming loader ----------------------------------------------------------


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _buffer(size: int) -> memoryview:
    return memoryview(bytearray(size))


def test_read_segment_streams_v2(batch: tuple[list[str], EncryptedVectors]) -> None:
    ids, vectors = batch
    seg_id = secrets.token_hex(16)
    blob = _v2(ids, vectors, seg_id)
    whole = hashlib.sha256(blob).digest()
    for size in (1, 7, 100, 191, 192, 193, 4096, len(blob)):
        seg = read_segment(_chunks(blob, size), PREFIX + seg_id, _buffer, len(blob),
                           expected_sha256=whole)
        assert seg.id_strings() == ids and seg.seg_id == seg_id and seg.sha256 == whole
        assert np.array_equal(seg.vectors.full, vectors.full)
    with pytest.raises(SegmentError, match="does not match the segment log"):
        read_segment(_chunks(blob, 100), PREFIX + seg_id, _buffer, None,
                     expected_sha256=bytes(32))
    with pytest.raises(SegmentError, match="does not match the segment log"):
        decode_segment(blob, PREFIX + seg_id, expected_sha256=bytes(32))
    with pytest.raises(SegmentError, match="truncated"):
        read_segment(_chunks(blob[:150], 7), PREFIX + seg_id, _buffer)


def test_load_segments_v1_and_v2(tmp_path: Path,
                                 batch: tuple[list[str], EncryptedVectors]) -> None:
    ids, vectors = batch
    store = DirectoryStore(tmp_path)
    blobs = {}
    for n in range(4):
        seg_id = secrets.token_hex(16)
        part = slice(9 * n, 9 * n + 9)
        sub = EncryptedVectors(full=vectors.full[part],
                               levels=tuple(a[part] for a in vectors.levels))
        blob = (_v2(ids[part], sub, seg_id) if n % 2 else encode_segment(ids[part], sub, 3))
        store.put(PREFIX + seg_id, blob)
        blobs[PREFIX + seg_id] = blob
    keys = sorted(blobs)
    assert read_headers(store, keys) == [(3, 9, vectors.widths)] * 4
    wrong = keys[1]
    expected = {k: hashlib.sha256(b).digest() for k, b in blobs.items()}
    expected[wrong] = hashlib.sha256(b"another segment").digest()
    listed = [(k, len(blobs[k])) for k in keys]
    seen: dict[str, Any] = {}
    for key, segment, release in load_segments(store, listed, expected):
        seen[key] = segment if isinstance(segment, SegmentError) else segment.id_strings()
        release()
    assert isinstance(seen[wrong], SegmentError)
    assert seen[wrong].reason == "does not match the segment log" and wrong in str(seen[wrong])
    for key in keys:
        if key != wrong:
            assert seen[key] == decode_segment(blobs[key], key).id_strings()
    # without the log's hashes every segment loads: the service cannot check a MAC
    unchecked = []
    for _, segment, release in load_segments(store, listed):
        unchecked.append(segment)
        release()
    assert len(unchecked) == 4 and all(not isinstance(s, SegmentError) for s in unchecked)
    assert {s.format_version for s in unchecked if s is not None} == {1, 2}


def test_rows_load_v2_like_v1(batch: tuple[list[str], EncryptedVectors]) -> None:
    ids, vectors = batch
    built = []
    for blob in (encode_segment(ids, vectors, 3), _v2(ids, vectors, secrets.token_hex(16))):
        rows = VersionRows(3, vectors.widths, None)
        appends = Appends()
        try:
            assert rows.add(decode_segment(blob), appends, lambda: None) == 37
            appends.wait()
        finally:
            appends.close()
        built.append(rows.build())
    (index1, ids1), (index2, ids2) = built
    assert list(ids1) == list(ids2) == ids
    assert np.array_equal(index1.full, index2.full)
    assert np.array_equal(index2.full, vectors.full)
    for a, b in zip(index1.levels, index2.levels, strict=True):
        assert np.array_equal(a, b)
    assert index1.full_norm == index2.full_norm


# --- vectors, and the independent reader of FORMAT-2.md ----------------------------------------


class SpecError(Exception):
    """FORMAT-2.md's reader rejects its input."""


_USER_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def spec_segment_v2(data: bytes, name: str, repo_id: str | None = None,
                    data_keys: dict[int, bytes] | None = None) -> dict[str, Any]:
    """Read a format-2 segment as docs/FORMAT-2.md 4.1/4.2 say; with ``data_keys``
    (key version -> data key) also check the MAC as a member does."""
    if len(data) < 20:
        raise SpecError("short fixed header")
    magic, version, flags, key_version, count, levels, dtype, reserved = struct.unpack(
        "<4sHHIIHBB", data[:20])
    if magic != b"RCSG" or version != 2 or len(data) < 192:
        raise SpecError("magic, version or short header")
    if flags or reserved or dtype != 1:
        raise SpecError("flags, reserved or dtype")
    if not 1 <= count <= 10_000_000 or levels > 8:
        raise SpecError("count or levels")
    widths = struct.unpack(f"<{levels + 1}I", data[108 : 108 + 4 * (levels + 1)])
    if not all(1 <= w <= 65536 for w in widths):
        raise SpecError("width")
    seg_id = data[20:36].hex()
    if seg_id != name.rsplit("/", 1)[-1]:
        raise SpecError("seg_id differs from the name")
    (base_sequence,) = struct.unpack("<Q", data[36:44])
    w64 = data[44:108]
    if not 1 <= w64[0] <= 63 or any(w64[1 + w64[0] :]):
        raise SpecError("writer length or padding")
    writer = w64[1 : 1 + w64[0]].decode("latin-1")
    if not _USER_ID.fullmatch(writer):
        raise SpecError("writer syntax")
    if any(data[108 + 4 * (levels + 1) : 192]):
        raise SpecError("header padding")

    def pad(n: int) -> int:
        return n + (-n) % 64

    body_end = 192 + pad(16 * count) + sum(pad(8 * count * w) for w in widths)
    if body_end + 64 > 8 << 30 or len(data) != body_end + 64:
        raise SpecError("size")
    if hashlib.sha256(data[: body_end + 32]).digest() != data[body_end + 32 :]:
        raise SpecError("SHA-256")
    ids = [data[192 + 16 * i : 208 + 16 * i].hex() for i in range(count)]
    if len(set(ids)) != count:
        raise SpecError("duplicate ids")
    offset, arrays = 192 + pad(16 * count), []
    for w in widths:
        array = np.frombuffer(data, "<f8", count * w, offset).reshape(count, w)
        if not np.isfinite(array).all():
            raise SpecError("non-finite")
        arrays.append(array)
        offset += pad(8 * count * w)
    mac = data[body_end : body_end + 32]
    if data_keys is not None:
        assert repo_id is not None
        if key_version not in data_keys:
            raise SpecError("key version not in the ring")
        prk = hmac.new(b"\0" * 32, data_keys[key_version], hashlib.sha256).digest()
        k_mac = hmac.new(prk, b"radcrypt/index-mac-key/v2" + b"\x01", hashlib.sha256).digest()
        m_seg = (struct.pack(">I", 19) + b"radcrypt/segment/v2" + struct.pack(
            ">I", len(repo_id.encode())) + repo_id.encode() + data[:body_end])
        if not hmac.compare_digest(hmac.new(k_mac, m_seg, hashlib.sha256).digest(), mac):
            raise SpecError("MAC")
    return {"key_version": key_version, "count": count, "widths": list(widths),
            "seg_id": seg_id, "base_sequence": base_sequence, "writer": writer, "ids": ids,
            "arrays": arrays, "mac": mac, "body_end": body_end}


@cache
def _doc() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text(encoding="utf-8"))
    return data


def _ring() -> dict[int, bytes]:
    return {v["key_version"]: bytes.fromhex(v["data_key_hex"]) for v in _doc()["vectors"]}


def _valid() -> list[Any]:
    return [pytest.param(e, id=e["name"]) for e in _doc()["vectors"]]


def _broken() -> list[Any]:
    return [pytest.param(e, id=e["name"]) for e in _doc()["broken"]]


@pytest.mark.parametrize("entry", _valid())
def test_vector(entry: dict[str, Any]) -> None:
    data = base64.b64decode(entry["segment_b64"], validate=True)
    name = entry["object_name"]
    seg = decode_segment(data, name)
    assert (seg.key_version, len(seg), list(seg.vectors.widths)) == (
        entry["key_version"], entry["count"], entry["widths"])
    assert (seg.seg_id, seg.writer, seg.base_sequence) == (
        entry["seg_id"], entry["writer"], entry["base_sequence"])
    assert seg.id_strings() == entry["image_ids"]
    assert seg.sha256 is not None and seg.sha256.hex() == entry["object_sha256_hex"]
    k_mac = bytes.fromhex(entry["k_mac_hex"])
    assert index_mac_key(bytes.fromhex(entry["data_key_hex"])) == k_mac
    vectors = EncryptedVectors(full=seg.vectors.full.copy(),
                               levels=tuple(a.copy() for a in seg.vectors.levels))
    assert encode_segment_v2(entry["image_ids"], vectors, entry["key_version"],
                             seg_id=entry["seg_id"], writer=entry["writer"],
                             base_sequence=entry["base_sequence"], repo_id=entry["repo_id"],
                             mac_key=k_mac) == data
    verify_segment_mac(data, name, entry["repo_id"], k_mac)

    spec = spec_segment_v2(data, name, entry["repo_id"], _ring())
    assert spec["ids"] == entry["image_ids"] and spec["widths"] == entry["widths"]
    assert (spec["seg_id"], spec["writer"], spec["base_sequence"]) == (
        entry["seg_id"], entry["writer"], entry["base_sequence"])
    assert spec["mac"].hex() == entry["mac_hex"] and data[-32:].hex() == entry["checksum_hex"]
    assert entry["section_offsets"]["mac"] == spec["body_end"] == len(data) - 64
    m_seg = bytes.fromhex(entry["m_seg_prefix_hex"]) + data[: spec["body_end"]]
    assert hashlib.sha256(m_seg).hexdigest() == entry["m_seg_sha256_hex"]
    assert hmac.new(k_mac, m_seg, hashlib.sha256).hexdigest() == entry["mac_hex"]
    w64 = bytes.fromhex(entry["w64_hex"])
    assert w64[0] == len(entry["writer"]) and len(w64) == 64
    for got, want in zip(spec["arrays"], (*seg.vectors.levels, seg.vectors.full), strict=True):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("entry", _broken())
def test_vector_broken(entry: dict[str, Any]) -> None:
    data = base64.b64decode(entry["segment_b64"], validate=True)
    name, ring = entry["object_name"], _ring()
    mac_keys = {v: index_mac_key(k) for v, k in ring.items()}
    if entry["reader"] == "service":
        with pytest.raises(SegmentError) as info:
            decode_segment(data, name)
        with pytest.raises(SpecError):
            spec_segment_v2(data, name)
    else:
        decode_segment(data, name)  # passes the service
        spec_segment_v2(data, name)  # FORMAT-2.md's keyless checks pass too
        with pytest.raises(SegmentError) as info:
            decode_authenticated(data, name, REPO, mac_keys)
        assert info.value.reason == "not authenticated"
        with pytest.raises(SpecError):
            spec_segment_v2(data, name, REPO, ring)
    assert type(info.value).__name__ == entry["error"], str(info.value)
    assert name in str(info.value)


def test_vector_file_is_small() -> None:
    assert VECTORS.stat().st_size < 200_000
