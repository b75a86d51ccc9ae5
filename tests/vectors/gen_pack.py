"""Generate the pack vectors of storage format 2 (run once; the JSON is checked in).

    .venv/bin/python tests/vectors/gen_pack.py

Writes pack.json, associated_data_v2.json and features.json (docs/FORMAT-2.md
sections 3 and 10, with the pack trailer of contract 13: ``T u32 | n u32 | key_version u32
| "RCPE"``). Same conventions as tests/vectors/generate.py, whose helpers it reuses: fixed
keys (the data keys are keyring.json's ``ring/v1/data`` and ``ring/v2/data``), AEAD salts
and nonces from a seeded SHAKE-256 stream patched in here only, and every broken variant
run against the real code, which must raise the class the variant names.

Each broken pack also records ``range_error``: what a reader that only range-reads
(trailer_info, open_toc, open_entry of every entry, decode_features) raises, or
``"no error"`` when the fault lies in the 32-byte header, which such a reader never reads.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
from generate import (
    FEATURES,
    IMPORTED,
    OTHER_REPO,
    REPO,
    aead_details,
    b64,
    broken,
    deterministic,
    fixed,
    flip,
    header,
    hx,
    image_id,
    originals,
    put,
    tiny_png,
    write,
)

from crypto import aead, pack

KEY_V1 = fixed("ring/v1/data")
KEY_V2 = fixed("ring/v2/data")
PACK_ID = fixed("pack/0", 16).hex()
OTHER_PACK_ID = fixed("pack/1", 16).hex()
SPEC = "docs/FORMAT-2.md, section '3. Packs'"
GENERATED_BY = "tests/vectors/gen_pack.py"
TOC_HEAD = 32
ROW = 48


def doc_header(fmt: str, title: str, notes: list[str]) -> dict[str, Any]:
    doc = header(fmt, title, "", notes)
    doc["spec"] = SPEC
    doc["generated_by"] = GENERATED_BY
    return doc


def object_name(repo_id: str, pack_id: str) -> str:
    return f"radcrypt/v1/repos/{repo_id}/packs/{pack_id}"


def meta_v2(name: str, content: bytes) -> bytes:
    """The meta entry plaintext: F6.3 with format radcrypt-meta-v2 and no features."""
    record = {
        "format": "radcrypt-meta-v2", "name": name, "size": len(content),
        "sha256": hashlib.sha256(content).hexdigest(), "source_format": "dicom",
        "tags": {"Modality": "CT", "BodyPartExamined": "CHEST", "Rows": "512",
                 "Columns": "512", "PhotometricInterpretation": "MONOCHROME2"},
        "rows": 512, "columns": 512, "imported_at": IMPORTED, "extractor": "radcrypt-v1",
    }
    return json.dumps(record, separators=(",", ":")).encode()


def batch(count: int = 2) -> tuple[list[tuple[str, bytes, bytes]], np.ndarray]:
    docs = originals()[:count]
    images = [(image_id(KEY_V1, c), meta_v2(f"ct-chest-{i + 1:04d}.dcm", c), tiny_png())
              for i, c in enumerate(docs)]
    return images, np.array(FEATURES[:count])


def build(label: str, key: bytes, repo_id: str, pack_id: str, key_version: int,
          images: list[tuple[str, bytes, bytes]], features: np.ndarray) -> bytes:
    with deterministic(f"pack/{label}"):
        return pack.build_pack(key, repo_id, pack_id, key_version, images, features)


# --- pack surgery (the generator holds the key, so it can re-seal a TOC) ---------------------


class Parts:
    """A pack cut into header, entry bytes, TOC plaintext and trailer fields."""

    def __init__(self, blob: bytes, key: bytes = KEY_V1, repo_id: str = REPO,
                 pack_id: str = PACK_ID) -> None:
        self.key, self.repo_id, self.pack_id = key, repo_id, pack_id
        toc_len, self.count, self.key_version, _magic = struct.unpack(">III4s", blob[-16:])
        toc_start = len(blob) - 16 - toc_len
        self.header = blob[:32]
        self.body = blob[32:toc_start]
        ad = pack.associated_data_v2(repo_id, "pack-toc", pack_id, self.key_version, pack_id)
        self.toc = bytearray(aead.open_sealed(key, blob[toc_start:-16], ad))

    def row(self, index: int) -> tuple[int, bytes, bytes, int, int, int, bytes]:
        kind, reserved, raw_id, offset, length, plain, reserved2 = struct.unpack_from(
            ">B3s16sQQI8s", self.toc, TOC_HEAD + ROW * index)
        return kind, reserved, raw_id, offset, length, plain, reserved2

    def set_row(self, index: int, **changes: Any) -> None:
        names = ("kind", "reserved", "raw_id", "offset", "length", "plain", "reserved2")
        values = dict(zip(names, self.row(index), strict=True))
        values.update(changes)
        struct.pack_into(">B3s16sQQI8s", self.toc, TOC_HEAD + ROW * index,
                         *(values[n] for n in names))

    def rows(self) -> int:
        return int(struct.unpack_from(">I", self.toc, 28)[0])

    def shift_from(self, index: int, delta: int) -> None:
        for i in range(index, self.rows()):
            self.set_row(i, offset=self.row(i)[3] + delta)

    def assemble(self, label: str, count: int | None = None, toc_len: int | None = None,
                 key_version: int | None = None) -> bytes:
        ad = pack.associated_data_v2(self.repo_id, "pack-toc", self.pack_id, self.key_version,
                                     self.pack_id)
        with deterministic(f"pack/broken/{label}"):
            toc = aead.seal(self.key, bytes(self.toc), ad)
        trailer = struct.pack(
            ">III4s", len(toc) if toc_len is None else toc_len,
            self.rows() if count is None else count,
            self.key_version if key_version is None else key_version, b"RCPE")
        return self.header + self.body + toc + trailer


def range_read(key: bytes, repo_id: str, pack_id: str, blob: bytes) -> None:
    """What a range reader does: tail, TOC, each entry by its range, the feature array."""
    tail = blob[-pack.TAIL_READ:]
    toc_start, _version = pack.trailer_info(tail, len(blob), pack_id)
    toc = pack.open_toc(key, repo_id, pack_id, len(blob), blob[toc_start:])
    plains = {}
    for e in toc.entries:
        plains[(e.kind, e.object_id)] = pack.open_entry(
            key, repo_id, toc, e, blob[e.offset:e.offset + e.length])
    pack.decode_features(plains[(pack.KIND_FEATURES, pack_id)], toc.image_ids())


def range_outcome(call: Callable[[], object]) -> str:
    try:
        call()
    except Exception as exc:
        return type(exc).__name__
    return "no error"


# --- pack.json -----------------------------------------------------------------------------


def envelope_fields(key: bytes, envelope: bytes, ad: bytes) -> dict[str, Any]:
    details = aead_details(key, envelope, ad)
    return {"salt_hex": details["salt_hex"], "object_key_hex": details["object_key_hex"],
            "nonces_hex": [c["nonce_hex"] for c in details["chunks"]]}


def describe(label: str, key: bytes, repo_id: str, pack_id: str, key_version: int,
             images: list[tuple[str, bytes, bytes]], features: np.ndarray,
             blob: bytes) -> dict[str, Any]:
    toc, plains = pack.open_pack(key, repo_id, pack_id, blob)
    entries = []
    for e in toc.entries:
        word = pack.KIND_WORDS[e.kind]
        ad = pack.associated_data_v2(repo_id, word, e.object_id, key_version, pack_id)
        envelope = blob[e.offset:e.offset + e.length]
        entries.append({"kind": word, "kind_code": e.kind, "object_id": e.object_id,
                        "offset": e.offset, "length": e.length, "plain_length": e.plain_length,
                        "ad_hex": hx(ad), **envelope_fields(key, envelope, ad),
                        "plaintext_b64": b64(plains[(e.kind, e.object_id)])})
    toc_env = blob[toc.toc_offset:-16]
    toc_ad = pack.associated_data_v2(repo_id, "pack-toc", pack_id, key_version, pack_id)
    toc_plain = aead.open_sealed(key, toc_env, toc_ad)
    return {
        "name": label, "object_name": object_name(repo_id, pack_id), "repo_id": repo_id,
        "pack_id": pack_id, "key_version": key_version, "data_key_hex": hx(key),
        "image_ids": [i for i, _m, _t in images], "features": features.tolist(),
        "size": len(blob), "header_hex": hx(blob[:32]), "trailer_hex": hx(blob[-16:]),
        "toc": {"offset": toc.toc_offset, "length": len(toc_env), "ad_hex": hx(toc_ad),
                **envelope_fields(key, toc_env, toc_ad), "plaintext_hex": hx(toc_plain)},
        "entries": entries, "pack_b64": b64(blob)}


def make_pack() -> None:
    images, features = batch()
    blob = build("valid-2", KEY_V1, REPO, PACK_ID, 1, images, features)
    one_images, one_features = batch(1)
    one = build("valid-1-v2", KEY_V2, OTHER_REPO, OTHER_PACK_ID, 2, one_images, one_features)
    doc = doc_header(
        "pack", "Pack objects of storage format 2 (crypto/pack.py)",
        ["open: crypto.pack.open_pack(data key of the trailer's key_version, repo_id, pack_id "
         "(the object's name), pack) gives the TOC and every entry's plaintext",
         "range path: trailer_info(last bytes, size, pack_id) -> (toc_start, key_version); "
         "open_toc(data key, repo_id, pack_id, size, bytes toc_start..size-1); open_entry for "
         "the bytes offset..offset+length-1 of an entry",
         "header = 'RCPK' | 01 | 000000 | ID16(pack_id) | u32 key_version | u32 0; "
         "trailer = u32 T | u32 n | u32 key_version | 'RCPE' (big-endian)",
         "entries and TOC are AEAD envelopes (aead.json) with chunk_log2 16 and associated "
         "data v2 (associated_data_v2.json); salts and nonces are given so that a pack can "
         "be rebuilt byte for byte",
         "order: meta entries in image order, thumbs in image order, then the feature "
         "array (features.json); row i of the array belongs to the i-th meta entry",
         "a whole-object reader checks the trailer, then the header, then opens the TOC; "
         "range_error is what a range reader (which never reads the header) raises"])
    doc["vectors"] = [
        describe("pack-2-images", KEY_V1, REPO, PACK_ID, 1, images, features, blob),
        describe("pack-1-image-key-version-2", KEY_V2, OTHER_REPO, OTHER_PACK_ID, 2,
                 one_images, one_features, one)]

    size = len(blob)
    toc_len = struct.unpack(">I", blob[-16:-12])[0]
    toc_start = size - 16 - toc_len
    first = Parts(blob)
    meta0 = first.row(0)
    meta0_len = meta0[4]
    thumb0_at, thumb_len = first.row(2)[3], first.row(2)[4]
    features_row = 4

    cases: list[tuple[str, str, str, bytes, dict[str, Any]]] = []

    def case(name: str, text: str, error: str, data: bytes, **fields: Any) -> None:
        cases.append((name, text, error, data, fields))

    # header and trailer (not authenticated by themselves: compared with the TOC)
    case("bad-magic", "header magic 'RCPX'", "FormatError", put(blob, 0, b"RCPX"))
    case("version-2", "header version 2", "FormatError", put(blob, 4, b"\x02"))
    case("header-reserved-nonzero", "header byte 5 (reserved) = 1", "FormatError",
         put(blob, 5, b"\x01"))
    case("header-reserved-u32-nonzero", "header bytes 28..31 (reserved) = 1", "FormatError",
         put(blob, 28, struct.pack(">I", 1)))
    case("header-pack-id-differs-from-name", "the header's pack id is another pack's",
         "FormatError", put(blob, 8, bytes.fromhex(OTHER_PACK_ID)))
    case("stored-under-another-name", "the valid pack read as packs/<another pack id>: the "
         "header check fails first (a range reader fails on the TOC's associated data)",
         "FormatError", blob, pack_id=OTHER_PACK_ID)
    case("header-key-version-differs", "header key version 2, trailer 1", "FormatError",
         put(blob, 24, struct.pack(">I", 2)))
    case("trailer-bad-magic", "trailer magic 'RCPX'", "FormatError",
         put(blob, size - 4, b"RCPX"))
    case("toc-length-too-large", "trailer T = size - 47: 32 + T + 16 exceeds the size",
         "FormatError", put(blob, size - 16, struct.pack(">I", size - 47)))
    case("toc-length-too-small", "trailer T = 59, below the smallest envelope (60)",
         "FormatError", put(blob, size - 16, struct.pack(">I", 59)))
    case("trailer-key-version-0", "trailer key version 0 (header 0 too)", "FormatError",
         put(put(blob, size - 8, bytes(4)), 24, bytes(4)))
    case("trailer-count-differs-from-toc", "trailer n = 6, the TOC holds 5 entries",
         "FormatError", put(blob, size - 12, struct.pack(">I", 6)))
    case("truncated", "the last byte removed", "FormatError", blob[:-1])
    case("trailing-byte", "one zero byte appended after the trailer", "FormatError",
         blob + b"\0")
    case("header-only", "only the 32-byte header", "FormatError", blob[:32])

    # TOC plaintext faults (TOC re-sealed with the right key and associated data)
    def toc_case(name: str, text: str, edit: Callable[[Parts], None], error: str = "FormatError",
                 count: int | None = None, body: Callable[[bytes], bytes] | None = None) -> None:
        parts = Parts(blob)
        edit(parts)
        if body is not None:
            parts.body = body(parts.body)
        case(name, text, error, parts.assemble(name, count=count))

    def toc_put(offset: int, value: bytes) -> Callable[[Parts], None]:
        def edit(p: Parts) -> None:
            p.toc[offset:offset + len(value)] = value
        return edit

    toc_case("toc-bad-magic", "TOC magic 'RCPX'", toc_put(0, b"RCPX"))
    toc_case("toc-version-2", "TOC version 2", toc_put(4, b"\x02"))
    toc_case("toc-reserved-nonzero", "TOC byte 7 (reserved) = 1", toc_put(7, b"\x01"))
    toc_case("toc-pack-id-differs", "the TOC names another pack id",
             toc_put(8, bytes.fromhex(OTHER_PACK_ID)))
    toc_case("toc-key-version-differs", "the TOC says key version 2 (trailer and header 1)",
             toc_put(24, struct.pack(">I", 2)))

    def drop_rows(p: Parts) -> None:
        del p.toc[TOC_HEAD:]
        p.toc[28:32] = struct.pack(">I", 0)
    toc_case("toc-count-0", "TOC and trailer count 0, no rows", drop_rows, count=0)

    def extra_row(p: Parts) -> None:
        p.toc += bytes(ROW)
    toc_case("toc-length-differs-from-count", "one all-zero row more than the count",
             extra_row)
    toc_case("toc-entry-reserved-nonzero", "reserved byte 1 of row 0 = 1",
             toc_put(TOC_HEAD + 1, b"\x01"))
    toc_case("toc-entry-reserved-tail-nonzero", "reserved byte 40 of row 0 = 1",
             toc_put(TOC_HEAD + 40, b"\x01"))
    toc_case("unknown-kind-code", "row 0 kind code 4", toc_put(TOC_HEAD, b"\x04"))
    toc_case("entries-overlap", "row 1 starts one byte before row 0 ends",
             lambda p: p.set_row(1, offset=32 + meta0_len - 1))
    toc_case("entries-unsorted", "rows 0 and 1 swapped (sorted by image, not by offset)",
             lambda p: p.toc.__setitem__(slice(TOC_HEAD, TOC_HEAD + 2 * ROW),
                                         p.toc[TOC_HEAD + ROW:TOC_HEAD + 2 * ROW]
                                         + p.toc[TOC_HEAD:TOC_HEAD + ROW]))
    toc_case("gap-between-entries", "one byte inserted after entry 0, later offsets shifted",
             lambda p: p.shift_from(1, 1), body=lambda b: b[:meta0_len] + b"\0" + b[meta0_len:])
    toc_case("gap-after-header", "one byte inserted before entry 0, every offset shifted",
             lambda p: p.shift_from(0, 1), body=lambda b: b"\0" + b)
    toc_case("entry-past-toc", "the features entry claims one more byte (length and "
             "plaintext length + 1): it runs into the TOC",
             lambda p: p.set_row(features_row, length=p.row(features_row)[4] + 1,
                                 plain=p.row(features_row)[5] + 1))
    toc_case("trailing-byte-before-toc", "one byte between the last entry and the TOC",
             lambda p: None, body=lambda b: b + b"\0")
    toc_case("length-inconsistent", "row 0 plaintext length one less than its envelope holds",
             lambda p: p.set_row(0, plain=p.row(0)[5] - 1))
    toc_case("duplicate-kind-id", "row 1 (meta of image 1) names image 0",
             lambda p: p.set_row(1, raw_id=p.row(0)[2]))
    toc_case("two-features-entries", "row 3 (thumbs of image 1) has kind code 3",
             lambda p: p.set_row(3, kind=3))
    toc_case("zero-features-entries", "the features row has kind code 2 (thumbs)",
             lambda p: p.set_row(features_row, kind=2))
    toc_case("features-entry-image-id", "the features row names image 0 instead of the pack",
             lambda p: p.set_row(features_row, raw_id=p.row(0)[2]))

    def drop_thumb(p: Parts) -> None:
        row3 = TOC_HEAD + 3 * ROW
        del p.toc[row3:row3 + ROW]
        p.toc[28:32] = struct.pack(">I", 4)
        p.shift_from(3, -thumb_len)
    toc_case("meta-without-thumbs", "image 1's thumbs entry removed (row and bytes)",
             drop_thumb, body=lambda b: b[:thumb0_at - 32 + thumb_len]
             + b[thumb0_at - 32 + 2 * thumb_len:])

    # entry faults
    images_rev_ids = [i for i, _m, _t in images][::-1]
    features_plain = pack.encode_features(images_rev_ids, features[::-1])
    f_ad = pack.associated_data_v2(REPO, "features", PACK_ID, 1, PACK_ID)
    with deterministic("pack/broken/features-order"):
        f_env = aead.seal(KEY_V1, features_plain, f_ad)
    f_at = first.row(features_row)[3]
    case("features-ids-differ-from-meta-order", "the feature array lists the images in the "
         "reverse order of the meta entries (re-sealed)", "FormatError",
         put(blob, f_at, f_env))
    m_ad = pack.associated_data_v2(REPO, "meta", images[0][0], 1, PACK_ID)
    with deterministic("pack/broken/chunk-10"):
        small = aead.seal(KEY_V1, images[0][1], m_ad, 10)
    case("entry-chunk-size-not-64k", "meta 0 sealed with chunk_log2 10 (same length, since "
         "its plaintext is shorter than 1024 bytes)", "FormatError", put(blob, 32, small))
    ad1 = aead.associated_data(REPO, "meta", images[0][0], 1)
    with deterministic("pack/broken/ad1"):
        v1_env = aead.seal(KEY_V1, images[0][1], ad1)
    case("entry-sealed-with-ad1", "meta 0 sealed with associated data v1 (a format-1 meta "
         "object copied into the pack)", "DecryptionError", put(blob, 32, v1_env))
    case("toc-bit-flipped", "one bit of the TOC ciphertext flipped", "DecryptionError",
         flip(blob, toc_start + 50, 3))
    case("toc-tag-flipped", "one bit of the TOC's tag flipped", "DecryptionError",
         flip(blob, size - 17, 0))
    case("entry-bit-flipped", "one bit of meta 0's ciphertext flipped", "DecryptionError",
         flip(blob, 32 + 32 + 12 + 5, 1))
    other = build("other-pack", KEY_V1, REPO, OTHER_PACK_ID, 1, images, features)
    case("entry-from-another-pack", "meta 0's envelope taken from another pack of the same "
         "images (same length)", "DecryptionError",
         put(blob, 32, other[32:32 + meta0_len]))
    other_toc = other[toc_start:]
    case("toc-from-another-pack", "TOC and trailer taken from another pack of the same images",
         "DecryptionError", blob[:toc_start] + other_toc)
    thumb0 = blob[thumb0_at:thumb0_at + thumb_len]
    thumb1 = blob[thumb0_at + thumb_len:thumb0_at + 2 * thumb_len]
    case("entries-swapped-between-images", "the two thumbs envelopes swapped (same length): "
         "each is in the other image's TOC slot", "DecryptionError",
         blob[:thumb0_at] + thumb1 + thumb0 + blob[thumb0_at + 2 * thumb_len:])
    v2 = put(put(blob, 24, struct.pack(">I", 2)), size - 8, struct.pack(">I", 2))
    case("wrong-key-version", "header and trailer say key version 2, read with version 2's "
         "data key: the TOC's associated data names version 2", "DecryptionError", v2,
         data_key_hex=hx(KEY_V2))
    case("wrong-key", "read with version 2's data key", "DecryptionError", blob,
         data_key_hex=hx(KEY_V2))
    case("wrong-repository", f"read as a pack of repository {OTHER_REPO!r}", "DecryptionError",
         blob, repo_id=OTHER_REPO)

    entries = []
    for name, text, error, data, fields in cases:
        key = bytes.fromhex(fields.get("data_key_hex", hx(KEY_V1)))
        repo_id = fields.get("repo_id", REPO)
        pid = fields.get("pack_id", PACK_ID)
        outcome = range_outcome(lambda k=key, r=repo_id, p=pid, d=data: range_read(k, r, p, d))
        entries.append(broken(
            name, text, error,
            lambda k=key, r=repo_id, p=pid, d=data: pack.open_pack(k, r, p, d),
            repo_id=repo_id, pack_id=pid, data_key_hex=hx(key), pack_b64=b64(data),
            range_error=outcome))
    doc["broken"] = entries
    write("pack.json", doc)


# --- associated_data_v2.json ---------------------------------------------------------------


def make_associated_data_v2() -> None:
    images, _features = batch(1)
    image = images[0][0]
    doc = doc_header(
        "associated_data_v2", "Associated data v2 of pack entries and TOCs",
        ["ad: crypto.pack.associated_data_v2(repo_id, kind, object_id, key_version, pack_id) "
         "= LP('radcrypt/ad/v2') || LP(repo_id) || LP(kind) || LP(object_id) || "
         "LP(u64(key_version)) || LP(pack_id), LP(x) = u32(len(x)) || x",
         "object_id is the image id for meta and thumbs, the pack id for features and "
         "pack-toc",
         "entry: aead.open_sealed(data key, envelope, ad) == plaintext; salt and nonces given"])
    vectors: list[dict[str, Any]] = []
    for kind, obj, version in [("meta", image, 1), ("thumbs", image, 1),
                               ("features", PACK_ID, 1), ("pack-toc", PACK_ID, 1),
                               ("meta", image, 2**32 - 1)]:
        ad = pack.associated_data_v2(REPO, kind, obj, version, PACK_ID)
        vectors.append({"name": f"ad2-{kind}-v{version}", "type": "associated_data_v2",
                        "repo_id": REPO, "kind": kind, "object_id": obj,
                        "key_version": version, "pack_id": PACK_ID, "ad_hex": hx(ad)})
    meta = images[0][1]
    ad = pack.associated_data_v2(REPO, "meta", image, 1, PACK_ID)
    with deterministic("ad2/entry-meta"):
        envelope = aead.seal(KEY_V1, meta, ad)
    vectors.append({"name": "entry-meta", "type": "entry", "repo_id": REPO, "kind": "meta",
                    "object_id": image, "key_version": 1, "pack_id": PACK_ID,
                    "data_key_hex": hx(KEY_V1), "ad_hex": hx(ad),
                    **envelope_fields(KEY_V1, envelope, ad), "plaintext_b64": b64(meta),
                    "envelope_b64": b64(envelope)})
    doc["vectors"] = vectors
    ad1 = aead.associated_data(REPO, "meta", image, 1)
    with deterministic("ad2/entry-ad1"):
        v1_envelope = aead.seal(KEY_V1, meta, ad1)
    cases = [
        ("ad1-object-opened-with-ad2", "a format-1 meta object (associated data v1) opened "
         "as a pack entry", v1_envelope, REPO, "meta", image, 1, PACK_ID),
        ("other-pack-id", "the entry opened as the same image's meta in another pack",
         envelope, REPO, "meta", image, 1, OTHER_PACK_ID),
        ("other-kind", "the meta entry opened as the image's thumbs", envelope, REPO,
         "thumbs", image, 1, PACK_ID),
        ("other-image", "the meta entry opened as another image's meta", envelope, REPO,
         "meta", PACK_ID, 1, PACK_ID),
        ("other-repository", f"the entry opened in repository {OTHER_REPO!r}", envelope,
         OTHER_REPO, "meta", image, 1, PACK_ID),
        ("other-key-version", "the entry opened with the associated data of key version 2",
         envelope, REPO, "meta", image, 2, PACK_ID),
    ]
    entries = []
    for name, text, env, repo_id, kind, obj, version, pid in cases:
        bad_ad = pack.associated_data_v2(repo_id, kind, obj, version, pid)
        entries.append(broken(
            name, text, "DecryptionError",
            lambda e=env, a=bad_ad: aead.open_sealed(KEY_V1, e, a),
            repo_id=repo_id, kind=kind, object_id=obj, key_version=version, pack_id=pid,
            data_key_hex=hx(KEY_V1), ad_hex=hx(bad_ad), envelope_b64=b64(env)))
    ad1_as_ad2 = aead.associated_data(REPO, "meta", image, 1)
    entries.append(broken(
        "ad2-entry-opened-with-ad1", "the pack entry opened as a format-1 meta object",
        "DecryptionError", lambda: aead.open_sealed(KEY_V1, envelope, ad1_as_ad2),
        repo_id=REPO, kind="meta", object_id=image, key_version=1, pack_id=None,
        data_key_hex=hx(KEY_V1), ad_hex=hx(ad1_as_ad2), envelope_b64=b64(envelope)))
    doc["broken"] = entries
    write("associated_data_v2.json", doc)


# --- features.json -------------------------------------------------------------------------


def make_features() -> None:
    images, features = batch(3)
    ids = [i for i, _m, _t in images]
    doc = doc_header(
        "features", "Feature array of a pack (little-endian)",
        ["decode: crypto.pack.decode_features(plaintext, expected_ids) == features, "
         "expected_ids = the image ids of the pack's meta entries in TOC order",
         "encode: crypto.pack.encode_features(ids, features) == plaintext",
         "'RCFA' | u16 version 1 | u8 dtype 1 (float64) | u8 0 | u32 count | u32 dim | "
         "count x ID16 | count x dim f64, all little-endian"])
    plain = pack.encode_features(ids, features)
    single = pack.encode_features(ids[:1], np.array([[0.5]]))
    doc["vectors"] = [
        {"name": "three-images-dim-4", "ids": ids, "dim": 4, "features": features.tolist(),
         "plaintext_hex": hx(plain)},
        {"name": "one-image-dim-1", "ids": ids[:1], "dim": 1, "features": [[0.5]],
         "plaintext_hex": hx(single)}]
    body = 16 + 16 * 3
    cases = [
        ("truncated", "the last byte removed", plain[:-1], ids),
        ("truncated-header", "only 12 bytes", plain[:12], ids),
        ("trailing-byte", "one zero byte appended", plain + b"\0", ids),
        ("bad-magic", "magic 'RCFX'", put(plain, 0, b"RCFX"), ids),
        ("version-2", "version 2", put(plain, 4, struct.pack("<H", 2)), ids),
        ("dtype-2", "dtype code 2", put(plain, 6, b"\x02"), ids),
        ("reserved-nonzero", "reserved byte = 1", put(plain, 7, b"\x01"), ids),
        ("dim-0", "dim 0", put(plain, 12, struct.pack("<I", 0)), ids),
        ("dim-65537", "dim 65537", put(plain, 12, struct.pack("<I", 65537)), ids),
        ("dim-big-endian", "dim written big-endian (4 << 24)",
         put(plain, 12, struct.pack(">I", 4)), ids),
        ("count-differs", "count 2 for a pack of 3 images (rows cut to match)",
         put(plain, 8, struct.pack("<I", 2))[:16 + 32] + plain[body:body + 64], ids),
        ("nan", "a NaN feature", put(plain, body + 8, struct.pack("<d", float("nan"))), ids),
        ("infinity", "+inf feature", put(plain, body, struct.pack("<d", float("inf"))), ids),
        ("ids-differ-from-meta-order", "the pack's meta entries list the images in another "
         "order", plain, [ids[1], ids[0], ids[2]]),
        ("ids-differ-from-meta", "an id that is not one of the pack's images",
         put(plain, 16, bytes(16)), ids),
    ]
    doc["broken"] = [broken(n, text, "FormatError",
                            lambda d=d, e=e: pack.decode_features(d, e),
                            expected_ids=e, plaintext_hex=hx(d))
                     for n, text, d, e in cases]
    write("features.json", doc)


def main() -> int:
    make_associated_data_v2()
    make_features()
    make_pack()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

