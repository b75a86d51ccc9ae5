"""Packs of storage format 2 (crypto/pack.py) and their vectors.

Three parts: the API on real packs (round trip, the range-read path through trailer_info /
open_toc / open_entry, the builder's input checks); the checked-in vectors
tests/vectors/{pack,associated_data_v2,features}.json against the code (every broken
variant raises the class it names, through the whole-object reader and, where recorded,
the range reader); and an independent reader (the ``spec_*`` functions: hashlib, hmac,
struct and the ``cryptography`` package, no Radcrypt module) that follows
docs/FORMAT-2.md section 3 to decrypt the same vectors,
rebuild the valid packs byte for byte from their recorded salts and nonces, and reject
every broken one. That is the check that the text, not only the code, is exact.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import struct
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crypto import aead, pack
from crypto.errors import DecryptionError, FormatError

VECTORS = Path(__file__).resolve().parent / "vectors"
FILES = ("pack", "associated_data_v2", "features")
MAX_FILE_BYTES = 200_000
try:  # tests/ is on sys.path (its conftest)
    from spec_envelope import SpecError, spec_hkdf, spec_open, spec_seal
except ImportError:  # pragma: no cover  (if tests/ becomes a package)
    from tests.spec_envelope import SpecError, spec_hkdf, spec_open, spec_seal


REPO = "radiology-demo"
KEY = hashlib.sha256(b"test_pack data key").digest()


def new_id() -> str:
    return os.urandom(16).hex()


def sample(count: int, dim: int = 8, thumb_size: int = 300,
           ) -> tuple[list[tuple[str, bytes, bytes]], np.ndarray]:
    images = [(new_id(), json.dumps({"format": "radcrypt-meta-v2", "n": i}).encode(),
               os.urandom(thumb_size + i)) for i in range(count)]
    rng = np.random.default_rng(count)
    return images, rng.standard_normal((count, dim))


# --- the API on real packs ---------------------------------------------------------------


def test_round_trip_whole_object() -> None:
    images, features = sample(5, thumb_size=70_000)  # thumbs of two chunks each
    pack_id = new_id()
    blob = pack.build_pack(KEY, REPO, pack_id, 3, images, features)
    assert len(blob) == pack.pack_size(images, features.shape[1])
    toc, plains = pack.open_pack(KEY, REPO, pack_id, blob)
    assert toc.pack_id == pack_id and toc.key_version == 3 and toc.size == len(blob)
    assert toc.image_ids() == [i for i, _m, _t in images]
    assert len(toc.entries) == 2 * len(images) + 1
    for image_id, meta, thumb in images:
        assert plains[(pack.KIND_META, image_id)] == meta
        assert plains[(pack.KIND_THUMBS, image_id)] == thumb
    array = pack.decode_features(plains[(pack.KIND_FEATURES, pack_id)], toc.image_ids())
    assert array.dtype == np.float64 and np.array_equal(array, features)
    assert blob[:4] == b"RCPK" and blob[-4:] == b"RCPE"
    assert struct.unpack(">I", blob[-8:-4])[0] == 3 == struct.unpack(">I", blob[24:28])[0]


def test_range_read_path() -> None:
    """What a client does on S3: one tail read, then one range read per entry."""
    images, features = sample(4)
    pack_id = new_id()
    blob = pack.build_pack(KEY, REPO, pack_id, 1, images, features)
    tail = blob[-pack.TAIL_READ:]
    toc_start, key_version = pack.trailer_info(tail, len(blob), pack_id)
    assert key_version == 1
    toc = pack.open_toc(KEY, REPO, pack_id, len(blob), tail)
    assert toc.toc_offset == toc_start
    assert toc == pack.open_toc(KEY, REPO, pack_id, len(blob), blob[toc_start:])
    entry = toc.entry(pack.KIND_THUMBS, images[2][0])
    envelope = blob[entry.offset:entry.offset + entry.length]
    assert pack.open_entry(KEY, REPO, toc, entry, envelope) == images[2][2]
    features_entry = toc.entry(pack.KIND_FEATURES, pack_id)
    plain = pack.open_entry(KEY, REPO, toc, features_entry, blob[
        features_entry.offset:features_entry.offset + features_entry.length])
    assert np.array_equal(pack.decode_features(plain, toc.image_ids()), features)
    with pytest.raises(KeyError):
        toc.entry(pack.KIND_META, pack_id)
    with pytest.raises(FormatError, match="envelope is"):
        pack.open_entry(KEY, REPO, toc, entry, envelope[:-1])
    other = toc.entry(pack.KIND_THUMBS, images[3][0])  # right length, wrong slot
    with pytest.raises(DecryptionError):
        pack.open_entry(KEY, REPO, toc, other, blob[other.offset - other.length:other.offset])


def test_toc_larger_than_the_first_tail_read() -> None:
    """A compacted pack's TOC outgrows 64 KiB: trailer_info says where it starts."""
    count = 700  # 1401 rows of 48 bytes: a 67 KB TOC
    images = [(f"{i:032x}", b"{}", b"p") for i in range(count)]
    pack_id = new_id()
    blob = pack.build_pack(KEY, REPO, pack_id, 1, images, np.zeros((count, 1)))
    tail = blob[-pack.TAIL_READ:]
    toc_start, _version = pack.trailer_info(tail, len(blob), pack_id)
    assert len(blob) - toc_start > len(tail)
    with pytest.raises(ValueError, match="tail bytes are needed"):
        pack.open_toc(KEY, REPO, pack_id, len(blob), tail)
    toc = pack.open_toc(KEY, REPO, pack_id, len(blob), blob[toc_start:])
    assert toc.image_ids() == [i for i, _m, _t in images]


def test_small_pack_is_read_whole() -> None:
    images, features = sample(1)
    pack_id = new_id()
    blob = pack.build_pack(KEY, REPO, pack_id, 1, images, features)
    assert pack.toc_range(len(blob)) == len(blob) < pack.TAIL_READ
    assert pack.toc_range(10 * pack.TAIL_READ) == pack.TAIL_READ


def test_errors_name_the_pack_and_the_field_and_no_secret() -> None:
    images, features = sample(2)
    pack_id = new_id()
    blob = pack.build_pack(KEY, REPO, pack_id, 1, images, features)
    bad = blob[:-4] + b"RCPX"
    with pytest.raises(FormatError) as info:
        pack.open_pack(KEY, REPO, pack_id, bad)
    assert pack_id in str(info.value) and "trailer" in str(info.value)
    with pytest.raises(DecryptionError) as wrong:
        pack.open_pack(bytes(32), REPO, pack_id, blob)
    message = str(wrong.value)
    assert KEY.hex() not in message and images[0][1].decode() not in message


@pytest.mark.parametrize(("change", "message"), [
    ({"pack_id": "ABC"}, "pack id"),
    ({"pack_id": "0" * 31 + "G"}, "pack id"),
    ({"key_version": 0}, "key version"),
    ({"key_version": 2**32}, "key version"),
    ({"key_version": True}, "key version"),
    ({"images": []}, "at least one image"),
    ({"duplicate": True}, "twice"),
    ({"bad_image_id": True}, "image id"),
    ({"features": np.zeros((3, 8))}, "one row per id"),
    ({"features": np.zeros((2, 0))}, "dim"),
    ({"features": np.full((2, 8), np.nan)}, "finite"),
])
def test_build_pack_refuses_bad_input(change: dict[str, Any], message: str) -> None:
    images, features = sample(2)
    if change.pop("duplicate", False):
        images[1] = (images[0][0], images[1][1], images[1][2])
    if change.pop("bad_image_id", False):
        images[0] = ("not-an-id", images[0][1], images[0][2])
    args: dict[str, Any] = {"pack_id": new_id(), "key_version": 1, "images": images,
                            "features": features, **change}
    with pytest.raises(ValueError, match=message):
        pack.build_pack(KEY, REPO, args["pack_id"], args["key_version"], args["images"],
                        args["features"])


def test_feature_array_round_trip_and_shape() -> None:
    ids = [new_id() for _ in range(3)]
    features = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    plain = pack.encode_features(ids, features)
    assert len(plain) == 16 + 3 * 16 + 3 * 4 * 8
    assert struct.unpack("<4sHBBII", plain[:16]) == (b"RCFA", 1, 1, 0, 3, 4)
    decoded = pack.decode_features(plain, ids)
    assert decoded.flags.writeable and np.array_equal(decoded, features)
    with pytest.raises(FormatError, match="count"):
        pack.decode_features(plain, ids[:2])


def test_entry_order_meta_thumbs_features() -> None:
    images, features = sample(3)
    pack_id = new_id()
    toc, _plains = pack.open_pack(KEY, REPO, pack_id,
                                  pack.build_pack(KEY, REPO, pack_id, 1, images, features))
    assert [e.kind for e in toc.entries] == [1, 1, 1, 2, 2, 2, 3]
    assert toc.features_entry().object_id == pack_id
    assert toc.entries[0].offset == 32
    assert all(a.offset + a.length == b.offset
               for a, b in zip(toc.entries, toc.entries[1:], strict=False))


def test_every_bit_flip_and_truncation_is_rejected() -> None:
    """Header, trailer, entries and TOC: no byte of a pack is unchecked (FORMAT-2 3.1)."""
    images, features = sample(2, dim=2, thumb_size=20)
    pack_id = new_id()
    blob = pack.build_pack(KEY, REPO, pack_id, 1, images, features)
    rng = np.random.default_rng(7)
    for offset in range(len(blob)):
        bad = bytearray(blob)
        bad[offset] ^= 1 << int(rng.integers(8))
        with pytest.raises((FormatError, DecryptionError)):
            pack.open_pack(KEY, REPO, pack_id, bytes(bad))
    for size in range(0, len(blob), 7):
        with pytest.raises((FormatError, DecryptionError)):
            pack.open_pack(KEY, REPO, pack_id, blob[:size])


def test_reader_refuses_caller_mistakes() -> None:
    images, features = sample(2)
    pack_id = new_id()
    blob = pack.build_pack(KEY, REPO, pack_id, 1, images, features)
    toc = pack.open_toc(KEY, REPO, pack_id, len(blob), blob)
    entry = toc.entries[0]
    forged = pack.PackEntry(entry.kind, entry.object_id, entry.offset, entry.length + 28,
                            entry.plain_length)
    with pytest.raises(ValueError, match="not an entry of this TOC"):
        pack.open_entry(KEY, REPO, toc, forged, blob[32:32 + forged.length])
    with pytest.raises(ValueError, match="pack id"):
        pack.trailer_info(blob, len(blob), pack_id.upper())
    plain = pack.open_entry(KEY, REPO, toc, toc.features_entry(), blob[
        toc.features_entry().offset:toc.toc_offset])
    assert pack.decode_features(plain, toc.image_ids(), dim=8).shape == (2, 8)
    with pytest.raises(FormatError, match="dim 8 differs from the expected 9"):
        pack.decode_features(plain, toc.image_ids(), dim=9)


def test_ad2_differs_from_ad1() -> None:
    ad1 = aead.associated_data(REPO, "meta", "a" * 32, 1)
    ad2 = pack.associated_data_v2(REPO, "meta", "a" * 32, 1, "b" * 32)
    assert ad2.startswith(struct.pack(">I", 14) + b"radcrypt/ad/v2") and ad1 != ad2[:len(ad1)]
    assert ad2.endswith(struct.pack(">I", 32) + b"b" * 32)


# --- vectors against the code --------------------------------------------------------------


@cache
def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text(encoding="utf-8"))
    return data


def raw(entry: dict[str, Any], field: str) -> bytes:
    value = entry[field]
    if field.endswith("_hex"):
        return bytes.fromhex(value)
    if field.endswith("_b64"):
        return base64.b64decode(value, validate=True)
    raise KeyError(f"{field} is not a binary field")


def cases(name: str, part: str) -> list[Any]:
    return [pytest.param(entry, id=entry["name"]) for entry in load(name)[part]]


def expect(entry: dict[str, Any], error: str, call: Any) -> None:
    if error == "no error":
        call()
        return
    with pytest.raises(Exception) as info:
        call()
    actual = type(info.value).__name__
    assert actual == error, f"{entry['name']}: raised {actual}: {info.value}"


def range_read(key: bytes, repo_id: str, pack_id: str,
               blob: bytes) -> tuple[pack.PackToc, dict[tuple[int, str], bytes]]:
    tail = blob[-pack.TAIL_READ:]
    toc_start, _version = pack.trailer_info(tail, len(blob), pack_id)
    toc = pack.open_toc(key, repo_id, pack_id, len(blob), blob[toc_start:])
    plains = {(e.kind, e.object_id): pack.open_entry(key, repo_id, toc, e,
                                                     blob[e.offset:e.offset + e.length])
              for e in toc.entries}
    pack.decode_features(plains[(pack.KIND_FEATURES, pack_id)], toc.image_ids())
    return toc, plains


@pytest.mark.parametrize("name", FILES)
def test_file_is_small_and_well_formed(name: str) -> None:
    assert (VECTORS / f"{name}.json").stat().st_size < MAX_FILE_BYTES
    doc = load(name)
    assert doc["format"] == name and doc["vectors"] and doc["broken"]
    names = [e["name"] for e in doc["vectors"]] + [e["name"] for e in doc["broken"]]
    assert len(names) == len(set(names))
    assert all(e["error"] in ("FormatError", "DecryptionError") for e in doc["broken"])


@pytest.mark.parametrize("entry", cases("pack", "vectors"))
def test_pack_vector(entry: dict[str, Any]) -> None:
    key, blob = raw(entry, "data_key_hex"), raw(entry, "pack_b64")
    toc, plains = pack.open_pack(key, entry["repo_id"], entry["pack_id"], blob)
    assert (toc, plains) == range_read(key, entry["repo_id"], entry["pack_id"], blob)
    assert len(blob) == entry["size"] and toc.toc_offset == entry["toc"]["offset"]
    assert toc.key_version == entry["key_version"] and toc.image_ids() == entry["image_ids"]
    for row, e in zip(entry["entries"], toc.entries, strict=True):
        assert (row["kind_code"], row["object_id"], row["offset"], row["length"],
                row["plain_length"]) == (e.kind, e.object_id, e.offset, e.length,
                                         e.plain_length)
        assert plains[(e.kind, e.object_id)] == raw(row, "plaintext_b64")
        assert pack.associated_data_v2(entry["repo_id"], row["kind"], e.object_id,
                                       toc.key_version, toc.pack_id) == raw(row, "ad_hex")
    features = pack.decode_features(plains[(pack.KIND_FEATURES, entry["pack_id"])],
                                    toc.image_ids())
    assert features.tolist() == entry["features"]
    assert entry["object_name"].endswith(f"/{entry['repo_id']}/packs/{entry['pack_id']}")


@pytest.mark.parametrize("entry", cases("pack", "broken"))
def test_pack_broken(entry: dict[str, Any]) -> None:
    key, blob = raw(entry, "data_key_hex"), raw(entry, "pack_b64")
    expect(entry, entry["error"],
           lambda: pack.open_pack(key, entry["repo_id"], entry["pack_id"], blob))
    expect(entry, entry["range_error"],
           lambda: range_read(key, entry["repo_id"], entry["pack_id"], blob))


def test_pack_broken_covers_the_format_2_checklist() -> None:
    """Draft section 10's list for pack.json, by variant name."""
    names = {e["name"] for e in load("pack")["broken"]}
    assert names >= {
        "bad-magic", "version-2", "header-reserved-nonzero", "header-pack-id-differs-from-name",
        "trailer-bad-magic", "toc-length-too-large", "toc-length-too-small",
        "trailer-count-differs-from-toc", "entries-overlap", "gap-between-entries",
        "entry-past-toc", "length-inconsistent", "duplicate-kind-id", "two-features-entries",
        "zero-features-entries", "meta-without-thumbs", "trailing-byte",
        "trailing-byte-before-toc", "toc-bit-flipped", "entry-bit-flipped",
        "entry-from-another-pack", "entries-swapped-between-images", "wrong-key-version",
        "wrong-repository"}


@pytest.mark.parametrize("entry", cases("associated_data_v2", "vectors"))
def test_associated_data_v2_vector(entry: dict[str, Any]) -> None:
    ad = pack.associated_data_v2(entry["repo_id"], entry["kind"], entry["object_id"],
                                 entry["key_version"], entry["pack_id"])
    assert ad == raw(entry, "ad_hex")
    if entry["type"] == "entry":
        assert aead.open_sealed(raw(entry, "data_key_hex"), raw(entry, "envelope_b64"),
                                ad) == raw(entry, "plaintext_b64")


@pytest.mark.parametrize("entry", cases("associated_data_v2", "broken"))
def test_associated_data_v2_broken(entry: dict[str, Any]) -> None:
    if entry["pack_id"] is None:  # read as a format-1 object
        ad = aead.associated_data(entry["repo_id"], entry["kind"], entry["object_id"],
                                  entry["key_version"])
    else:
        ad = pack.associated_data_v2(entry["repo_id"], entry["kind"], entry["object_id"],
                                     entry["key_version"], entry["pack_id"])
    assert ad == raw(entry, "ad_hex")
    expect(entry, entry["error"], lambda: aead.open_sealed(
        raw(entry, "data_key_hex"), raw(entry, "envelope_b64"), ad))


@pytest.mark.parametrize("entry", cases("features", "vectors"))
def test_features_vector(entry: dict[str, Any]) -> None:
    plain = raw(entry, "plaintext_hex")
    assert pack.decode_features(plain, entry["ids"]).tolist() == entry["features"]
    assert pack.encode_features(entry["ids"], np.array(entry["features"])) == plain


@pytest.mark.parametrize("entry", cases("features", "broken"))
def test_features_broken(entry: dict[str, Any]) -> None:
    expect(entry, entry["error"],
           lambda: pack.decode_features(raw(entry, "plaintext_hex"), entry["expected_ids"]))


# --- the independent reading of FORMAT-2.md --------------------------------------------------


def spec_lp(*fields: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def spec_ad2(repo_id: str, kind: str, object_id: str, key_version: int, pack_id: str) -> bytes:
    """Draft 3.3: LP("radcrypt/ad/v2") || LP(repo) || LP(kind) || LP(id) || LP(u64) || LP(pack)."""
    return spec_lp(b"radcrypt/ad/v2", repo_id.encode(), kind.encode(), object_id.encode(),
                   struct.pack(">Q", key_version), pack_id.encode())


def spec_open_entry(key: bytes, envelope: bytes, ad: bytes) -> bytes:
    """A pack entry or TOC: an F5 envelope (tests/spec_envelope.py) that must have
    chunk_log2 16, as every pack entry and TOC is written (3.1)."""
    if len(envelope) >= 8 and envelope[5] != 16:
        raise SpecError("not an envelope with 64 KiB chunks")
    return spec_open(key, envelope, ad)


def spec_features(plain: bytes, expected_ids: list[str]) -> list[list[float]]:
    """Draft 3.4, little-endian."""
    if len(plain) < 16:
        raise SpecError("feature array header cut")
    magic, version, dtype, reserved, count, dim = struct.unpack("<4sHBBII", plain[:16])
    if (magic, version, dtype, reserved) != (b"RCFA", 1, 1, 0) or not 1 <= dim <= 65536:
        raise SpecError("bad feature array header")
    if len(plain) != 16 + 16 * count + 8 * count * dim:
        raise SpecError("feature array length")
    ids = [plain[16 + 16 * i:32 + 16 * i].hex() for i in range(count)]
    if ids != expected_ids:
        raise SpecError("feature ids differ from the meta entries")
    values = struct.unpack(f"<{count * dim}d", plain[16 + 16 * count:])
    if not all(math.isfinite(v) for v in values):
        raise SpecError("non-finite feature")
    return [list(values[i * dim:(i + 1) * dim]) for i in range(count)]


KINDS = {1: "meta", 2: "thumbs", 3: "features"}


Row = tuple[int, str, int, int, int]


def spec_read_pack(key: bytes, repo_id: str, pack_id: str, blob: bytes,
                   ) -> tuple[list[Row], dict[tuple[int, str], bytes], list[list[float]]]:
    """Draft 3.1-3.4, trailer T | n | key_version | "RCPE": rows, plaintexts, features."""
    size = len(blob)
    if size < 48:
        raise SpecError("shorter than header and trailer")
    toc_len, count, key_version, end = struct.unpack(">III4s", blob[-16:])
    if end != b"RCPE" or toc_len < 60 or 32 + toc_len + 16 > size or key_version < 1:
        raise SpecError("bad trailer")
    magic, version, reserved, raw_id, head_version, reserved2 = struct.unpack(
        ">4sB3s16sII", blob[:32])
    if (magic, version, reserved, reserved2) != (b"RCPK", 1, bytes(3), 0):
        raise SpecError("bad header")
    if raw_id.hex() != pack_id or head_version != key_version:
        raise SpecError("header differs from the name or the trailer")
    toc_at = size - 16 - toc_len
    toc = spec_open_entry(key, blob[toc_at:size - 16],
                    spec_ad2(repo_id, "pack-toc", pack_id, key_version, pack_id))
    if len(toc) < 32:
        raise SpecError("TOC header cut")
    magic, version, reserved, raw_id, toc_version, toc_count = struct.unpack(
        ">4sB3s16sII", toc[:32])
    if (magic, version, reserved) != (b"RCPT", 1, bytes(3)):
        raise SpecError("bad TOC header")
    if raw_id.hex() != pack_id or toc_version != key_version or toc_count != count:
        raise SpecError("TOC differs from the name or the trailer")
    if not 1 <= count <= 1 << 20 or len(toc) != 32 + 48 * count:
        raise SpecError("TOC count")
    rows = []
    position = 32
    for i in range(count):
        kind, res, raw_obj, offset, length, plain_len, res2 = struct.unpack(
            ">B3s16sQQI8s", toc[32 + 48 * i:80 + 48 * i])
        if kind not in KINDS or res != bytes(3) or res2 != bytes(8):
            raise SpecError("bad TOC row")
        if offset != position:
            raise SpecError("gap, overlap or disorder")
        if length != 32 + plain_len + 28 * max(1, math.ceil(plain_len / 65536)):
            raise SpecError("envelope length inconsistent")
        position += length
        rows.append((kind, raw_obj.hex(), offset, length, plain_len))
    if position != toc_at:
        raise SpecError("entries do not end at the TOC")
    keys = [(kind, obj) for kind, obj, *_rest in rows]
    if len(set(keys)) != len(keys):
        raise SpecError("duplicate (kind, id)")
    if [k for k in keys if k[0] == 3] != [(3, pack_id)]:
        raise SpecError("not exactly one features entry carrying the pack id")
    metas = [obj for kind, obj in keys if kind == 1]
    if set(metas) != {obj for kind, obj in keys if kind == 2} or not metas:
        raise SpecError("meta and thumbs entries differ")
    plains: dict[tuple[int, str], bytes] = {}
    for kind, obj, offset, length, plain_len in rows:
        text = spec_open_entry(key, blob[offset:offset + length],
                         spec_ad2(repo_id, KINDS[kind], obj, key_version, pack_id))
        if len(text) != plain_len:
            raise SpecError("plaintext length")
        plains[(kind, obj)] = text
    return rows, plains, spec_features(plains[(3, pack_id)], metas)


@pytest.mark.parametrize("entry", cases("pack", "vectors"))
def test_pack_vector_spec(entry: dict[str, Any]) -> None:
    key, blob = raw(entry, "data_key_hex"), raw(entry, "pack_b64")
    rows, plains, features = spec_read_pack(key, entry["repo_id"], entry["pack_id"], blob)
    assert features == entry["features"]
    # rebuild the pack byte for byte from its plaintexts and recorded salts and nonces
    version, pack_id = entry["key_version"], entry["pack_id"]
    out = [b"RCPK\x01" + bytes(3) + bytes.fromhex(pack_id) + struct.pack(">II", version, 0)]
    toc_rows = []
    for row, (kind, obj, offset, length, plain_len) in zip(entry["entries"], rows, strict=True):
        ad = spec_ad2(entry["repo_id"], KINDS[kind], obj, version, pack_id)
        assert ad == raw(row, "ad_hex")
        plaintext = plains[(kind, obj)]
        assert plaintext == raw(row, "plaintext_b64")
        assert spec_hkdf(key, raw(row, "salt_hex"), b"radcrypt/aead/v1") == raw(
            row, "object_key_hex")
        out.append(spec_seal(key, plaintext, ad, 16, raw(row, "salt_hex"),
                             [bytes.fromhex(n) for n in row["nonces_hex"]]))
        toc_rows.append(struct.pack(">B3s16sQQI8s", kind, bytes(3), bytes.fromhex(obj), offset,
                                    length, plain_len, bytes(8)))
    toc_plain = (b"RCPT\x01" + bytes(3) + bytes.fromhex(pack_id)
                 + struct.pack(">II", version, len(rows)) + b"".join(toc_rows))
    toc = entry["toc"]
    assert toc_plain == raw(toc, "plaintext_hex")
    toc_ad = spec_ad2(entry["repo_id"], "pack-toc", pack_id, version, pack_id)
    assert toc_ad == raw(toc, "ad_hex")
    sealed = spec_seal(key, toc_plain, toc_ad, 16, raw(toc, "salt_hex"),
                       [bytes.fromhex(n) for n in toc["nonces_hex"]])
    out.append(sealed)
    out.append(struct.pack(">III4s", len(sealed), len(rows), version, b"RCPE"))
    assert b"".join(out) == blob
    assert blob[:32] == raw(entry, "header_hex") and blob[-16:] == raw(entry, "trailer_hex")


@pytest.mark.parametrize("entry", cases("pack", "broken"))
def test_pack_broken_spec(entry: dict[str, Any]) -> None:
    with pytest.raises(SpecError):
        spec_read_pack(raw(entry, "data_key_hex"), entry["repo_id"], entry["pack_id"],
                       raw(entry, "pack_b64"))


@pytest.mark.parametrize("entry", cases("associated_data_v2", "vectors"))
def test_associated_data_v2_spec(entry: dict[str, Any]) -> None:
    ad = spec_ad2(entry["repo_id"], entry["kind"], entry["object_id"], entry["key_version"],
                  entry["pack_id"])
    assert ad == raw(entry, "ad_hex")
    if entry["type"] == "entry":
        key, envelope = raw(entry, "data_key_hex"), raw(entry, "envelope_b64")
        assert spec_open_entry(key, envelope, ad) == raw(entry, "plaintext_b64")
        assert spec_seal(key, raw(entry, "plaintext_b64"), ad, 16, raw(entry, "salt_hex"),
                         [bytes.fromhex(n) for n in entry["nonces_hex"]]) == envelope


@pytest.mark.parametrize("entry", cases("associated_data_v2", "broken"))
def test_associated_data_v2_broken_spec(entry: dict[str, Any]) -> None:
    with pytest.raises(SpecError):
        spec_open_entry(raw(entry, "data_key_hex"), raw(entry, "envelope_b64"),
                        raw(entry, "ad_hex"))


@pytest.mark.parametrize("entry", cases("features", "vectors"))
def test_features_vector_spec(entry: dict[str, Any]) -> None:
    assert spec_features(raw(entry, "plaintext_hex"), entry["ids"]) == entry["features"]


@pytest.mark.parametrize("entry", cases("features", "broken"))
def test_features_broken_spec(entry: dict[str, Any]) -> None:
    with pytest.raises(SpecError):
        spec_features(raw(entry, "plaintext_hex"), entry["expected_ids"])
