"""Seed files and mutators for the file fuzzing of issue 14 (tests/fuzz/test_file_fuzz.py).

Why a module of its own: the seeds are *real* files, made by the product's own writers
(encode_segment, build_pack, the segment log, sign_json, seal_identity) or taken from the
pydicom sample data, one per transfer syntax, so a mutation starts from what a reader meets
in the field; other fuzzers (API, kill tests) can reuse the mutators.

A mutation is a short list of :class:`Mutation` operations drawn by hypothesis
(:func:`mutations`), so a failing example shrinks to the fewest, smallest edits and is
printed in full: it reproduces without a seed. :func:`random_mutations` draws the same
operations from a seeded ``random.Random`` for callers outside hypothesis.

Formats that authenticate their bytes (checksummed segments, MACs, AEAD, signatures) stop
a blind mutation at the first check. The ``reseal_*`` helpers therefore rebuild the
checksum, MAC, envelope or signature around mutated content, with the keys the test holds:
that is what a member with the keys (or a buggy writer) could store, and it drives the
mutation past authentication into the parsers behind it.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from crypto.identity import Identity
from crypto.tokens import EncryptedVectors

# --- mutations ----------------------------------------------------------------------------

OPERATIONS = (
    "flip",        # flip one bit
    "byte",        # set one byte to an interesting value
    "u16",         # write an interesting 16-bit integer (either byte order)
    "u32",         # write an interesting 32-bit integer (either byte order)
    "u64",         # write an interesting 64-bit integer (either byte order)
    "insert",      # insert a few bytes
    "delete",      # delete a run of bytes
    "truncate",    # cut the file here
    "duplicate",   # repeat a run of bytes in place
    "fill",        # overwrite a run with 00 or FF
    "swap",        # swap two runs of bytes
)
INTERESTING_8 = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x10, 0x20, 0x40)
INTERESTING_32 = (
    0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
    0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF,
)
INTERESTING_64 = (*INTERESTING_32, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)


@dataclass(frozen=True)
class Mutation:
    """One edit: ``kind`` (one of OPERATIONS) at ``position`` (taken modulo the length),
    with ``value`` choosing the value, run length or byte order."""

    kind: str
    position: int
    value: int

    def apply(self, data: bytes) -> bytes:
        if not data:
            return bytes([self.value & 0xFF]) if self.kind == "insert" else data
        n = len(data)
        at = self.position % n
        v = self.value
        run = 1 + (v >> 3) % 64
        if self.kind == "flip":
            return data[:at] + bytes([data[at] ^ (1 << (v % 8))]) + data[at + 1:]
        if self.kind == "byte":
            return data[:at] + bytes([INTERESTING_8[v % len(INTERESTING_8)]]) + data[at + 1:]
        if self.kind in ("u16", "u32", "u64"):
            size = {"u16": 2, "u32": 4, "u64": 8}[self.kind]
            pool = INTERESTING_64 if size == 8 else INTERESTING_32
            choices = (*pool, n, n - 1, n + 1, n * 2)
            number = choices[(v >> 1) % len(choices)] % (1 << (8 * size))
            raw = number.to_bytes(size, "big" if v & 1 else "little")
            return data[:at] + raw + data[at + size:]
        if self.kind == "insert":
            filler = bytes([(v >> 8) & 0xFF]) * run if v & 1 else random.Random(v).randbytes(run)
            return data[:at] + filler + data[at:]
        if self.kind == "delete":
            return data[:at] + data[at + run:]
        if self.kind == "truncate":
            return data[:at]
        if self.kind == "duplicate":
            return data[:at] + data[at:at + run] * (1 + v % 3) + data[at:]
        if self.kind == "fill":
            return data[:at] + (b"\xff" if v & 1 else b"\0") * run + data[at + run:]
        if self.kind == "swap":
            other = (at + 1 + (v >> 9)) % n
            a, b = sorted((at, other))
            if b - a < run:
                return data
            return data[:a] + data[b:b + run] + data[a + run:b] + data[a:a + run] + data[b + run:]
        raise ValueError(f"unknown mutation kind {self.kind!r}")


def apply_all(data: bytes, ops: Sequence[Mutation]) -> bytes:
    """``data`` with every operation applied in order."""
    for op in ops:
        data = op.apply(data)
    return data


def mutations(size: int, max_ops: int = 6, head: int = 256, start: int = 0
              ) -> st.SearchStrategy[list[Mutation]]:
    """A hypothesis strategy of 1..max_ops operations on data of about ``size`` bytes.

    Half the positions fall in the ``head`` bytes from ``start``: headers, where lengths,
    counts and offsets live, are where a reader's checks are most often wrong. ``start``
    skips what only sniffing reads (a DICOM file's preamble and "DICM": a mutation there
    only makes it "not an image", and the fuzzer's time is better spent behind it).
    """
    last = max(0, size - 1)
    start = min(start, last)
    position = st.one_of(st.integers(start, min(last, start + head - 1)),
                         st.integers(start, last))
    one = st.builds(Mutation, st.sampled_from(OPERATIONS), position, st.integers(0, 2**32 - 1))
    return st.lists(one, min_size=1, max_size=max_ops)


def random_mutations(rng: random.Random, size: int, max_ops: int = 6, start: int = 0
                     ) -> list[Mutation]:
    """The same kind of operations as :func:`mutations`, from a seeded generator."""
    last = max(0, size - 1)
    start = min(start, last)
    out = []
    for _ in range(rng.randint(1, max_ops)):
        position = (rng.randint(start, min(last, start + 255)) if rng.random() < 0.5
                    else rng.randint(start, last))
        out.append(Mutation(rng.choice(OPERATIONS), position, rng.getrandbits(32)))
    return out


# --- image seeds ----------------------------------------------------------------------------


def sniffed_prefix(data: bytes) -> int:
    """How many leading bytes only identify the format (kept by image mutations): the
    128-byte preamble and "DICM" of a DICOM file, else the PNG/JPEG/TIFF signature."""
    if data[128:132] == b"DICM":
        return 132
    if data.startswith(b"\x89PNG"):
        return 8
    if data.startswith(b"\xff\xd8\xff"):
        return 3
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return 4
    return 0


def dicom_seeds() -> dict[str, Path]:
    """The smallest decodable pydicom sample of every transfer syntax in the sample data
    (and of files without a meta header), by a short label."""
    import warnings

    import pydicom

    from resources.samples import decodable_dicom_files

    best: dict[str, Path] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in decodable_dicom_files():
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            meta = getattr(ds, "file_meta", None)
            uid = meta.get("TransferSyntaxUID") if meta is not None else None
            label = _TS_LABELS.get(str(uid), str(uid)) if uid else "no-meta"
            if label not in best or path.stat().st_size < best[label].stat().st_size:
                best[label] = path
    return dict(sorted(best.items()))


_TS_LABELS = {
    "1.2.840.10008.1.2": "implicit-le",
    "1.2.840.10008.1.2.1": "explicit-le",
    "1.2.840.10008.1.2.1.99": "deflated",
    "1.2.840.10008.1.2.2": "explicit-be",
    "1.2.840.10008.1.2.4.50": "jpeg-baseline",
    "1.2.840.10008.1.2.4.51": "jpeg-extended",
    "1.2.840.10008.1.2.4.57": "jpeg-lossless",
    "1.2.840.10008.1.2.4.70": "jpeg-lossless-sv1",
    "1.2.840.10008.1.2.4.80": "jpeg-ls-lossless",
    "1.2.840.10008.1.2.4.81": "jpeg-ls",
    "1.2.840.10008.1.2.4.90": "j2k-lossless",
    "1.2.840.10008.1.2.4.91": "j2k",
    "1.2.840.10008.1.2.5": "rle",
}


def raster_seeds(dest: Path) -> dict[str, Path]:
    """PNG (8-bit grey and RGB), JPEG (grey, RGB), TIFF (16-bit, RGB) files, 64 x 48, made
    from a real CT slice, written into ``dest``."""
    from PIL import Image
    from pydicom.data import get_testdata_file

    from app.imaging.decode import decode_image

    dest.mkdir(parents=True, exist_ok=True)
    image = decode_image(get_testdata_file("CT_small.dcm"))
    grey = image.display()[:48, :64]
    raw16 = np.clip(image.pixels[:48, :64] + 1024, 0, 65535).astype(np.uint16)
    rgb = np.stack([grey, grey[::-1], 255 - grey], axis=-1).astype(np.uint8)
    made = {
        "png-grey": (Image.fromarray(grey, "L"), "PNG", {}),
        "png-rgb": (Image.fromarray(rgb, "RGB"), "PNG", {}),
        "jpeg-grey": (Image.fromarray(grey, "L"), "JPEG", {"quality": 90}),
        "jpeg-rgb": (Image.fromarray(rgb, "RGB"), "JPEG", {"quality": 90}),
        "tiff-16": (Image.fromarray(raw16), "TIFF", {}),
        "tiff-rgb-deflate": (Image.fromarray(rgb, "RGB"), "TIFF",
                             {"compression": "tiff_adobe_deflate"}),
    }
    out = {}
    for label, (picture, fmt, options) in made.items():
        buffer = io.BytesIO()
        picture.save(buffer, fmt, **options)
        path = dest / f"{label}.{fmt.lower()}"
        path.write_bytes(buffer.getvalue())
        out[label] = path
    return out


# --- segments -------------------------------------------------------------------------------

REPO_ID = "fuzzrepo"
WRITER = "fuzz-writer"
SEG_ID = "5e" * 16
MAC_KEY = bytes(range(32))


def segment_parts(count: int = 3, widths: tuple[int, ...] = (4, 6), seed: int = 1
                  ) -> tuple[list[str], EncryptedVectors]:
    """Image ids and encrypted vectors of a small segment (values from a fixed seed)."""
    rng = np.random.default_rng(seed)
    ids = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)).hex() for _ in range(count)]
    arrays = [rng.normal(size=(count, w)) for w in widths]
    return ids, EncryptedVectors(full=arrays[-1], levels=tuple(arrays[:-1]))


def segment_v1() -> bytes:
    from cloud.segments import encode_segment

    ids, vectors = segment_parts()
    return encode_segment(ids, vectors, key_version=1)


def segment_v2() -> bytes:
    from cloud.segments import encode_segment_v2

    ids, vectors = segment_parts()
    return encode_segment_v2(ids, vectors, 1, seg_id=SEG_ID, writer=WRITER,
                             base_sequence=7, repo_id=REPO_ID, mac_key=MAC_KEY)


def reseal_segment(data: bytes) -> bytes:
    """``data`` with its trailer recomputed as a writer would: for a version-2 header the
    MAC (under MAC_KEY) and the SHA-256, else the SHA-256 alone; the declared size is
    taken from the (possibly mutated) header when it parses, else the data's own length."""
    from cloud.segments import DIGEST_SIZE, MAC_SIZE, SegmentError, parse_header
    from crypto.segment_mac import segment_mac

    try:
        header = parse_header(data, "<fuzz>")
        size = header.size
        v2 = header.format_version == 2
    except SegmentError:
        size, v2 = len(data), data[4:6] == b"\x02\x00"
    if size > 1 << 24:
        return data  # a mutated count or width: leave it for the length check to refuse
    body = data[:size].ljust(size, b"\0")
    if v2 and size >= DIGEST_SIZE + MAC_SIZE:
        end = size - DIGEST_SIZE - MAC_SIZE
        signed = body[:end] + segment_mac(MAC_KEY, REPO_ID, body[:end])
        return signed + hashlib.sha256(signed).digest()
    if size < DIGEST_SIZE:
        return data
    return body[:size - DIGEST_SIZE] + hashlib.sha256(body[:size - DIGEST_SIZE]).digest()


# --- packs ------------------------------------------------------------------------------------

DATA_KEY = bytes(range(100, 132))
PACK_ID = "9a" * 16


def pack_images(count: int = 2) -> tuple[list[tuple[str, bytes, bytes]], np.ndarray]:
    ids, _ = segment_parts(count)
    images = [(i, b'{"Modality":"CT","Rows":"48"}', b"\x89PNG\r\n\x1a\n" + bytes(40))
              for i in ids]
    return images, np.random.default_rng(3).normal(size=(count, 8))


def pack() -> bytes:
    from crypto.pack import build_pack

    images, features = pack_images()
    return build_pack(DATA_KEY, REPO_ID, PACK_ID, 1, images, features)


def reseal_pack_toc(blob: bytes, ops: Sequence[Mutation]) -> bytes:
    """The pack with its TOC plaintext mutated by ``ops`` and sealed again (trailer
    updated to the new TOC length): the structure checks behind the AEAD are reached."""
    from crypto import aead
    from crypto.pack import (
        CHUNK_LOG2,
        TOC_KIND,
        TRAILER_SIZE,
        associated_data_v2,
        open_toc,
    )

    toc = open_toc(DATA_KEY, REPO_ID, PACK_ID, len(blob), blob)
    _length, count, key_version, magic = struct.unpack(">III4s", blob[-TRAILER_SIZE:])
    ad = associated_data_v2(REPO_ID, TOC_KIND, PACK_ID, key_version, PACK_ID)
    plain = aead.open_sealed(DATA_KEY, blob[toc.toc_offset:len(blob) - TRAILER_SIZE], ad)
    sealed = aead.seal(DATA_KEY, apply_all(plain, ops), ad, CHUNK_LOG2)
    return (blob[:toc.toc_offset] + sealed
            + struct.pack(">III4s", len(sealed), count, key_version, magic))


def reseal_pack_features(blob: bytes, ops: Sequence[Mutation]) -> bytes:
    """The pack with its feature array's plaintext mutated and every envelope after it,
    the TOC and the trailer rebuilt (offsets and lengths follow the new size)."""
    from crypto import aead
    from crypto.pack import (
        _TOC_ENTRY,
        _TOC_HEAD,
        CHUNK_LOG2,
        HEADER_SIZE,
        KIND_WORDS,
        TOC_KIND,
        TOC_MAGIC,
        VERSION,
        associated_data_v2,
        open_pack,
    )

    toc, plains = open_pack(DATA_KEY, REPO_ID, PACK_ID, blob)
    parts, rows, offset = [blob[:HEADER_SIZE]], [], HEADER_SIZE
    for e in toc.entries:
        body = plains[(e.kind, e.object_id)]
        if e.kind == 3:
            body = apply_all(body, ops)
        ad = associated_data_v2(REPO_ID, KIND_WORDS[e.kind], e.object_id, toc.key_version,
                                PACK_ID)
        envelope = aead.seal(DATA_KEY, body, ad, CHUNK_LOG2)
        rows.append(_TOC_ENTRY.pack(e.kind, b"\0\0\0", bytes.fromhex(e.object_id), offset,
                                    len(envelope), len(body), b"\0" * 8))
        parts.append(envelope)
        offset += len(envelope)
    toc_plain = _TOC_HEAD.pack(TOC_MAGIC, VERSION, b"\0\0\0", bytes.fromhex(PACK_ID),
                               toc.key_version, len(rows)) + b"".join(rows)
    ad = associated_data_v2(REPO_ID, TOC_KIND, PACK_ID, toc.key_version, PACK_ID)
    sealed = aead.seal(DATA_KEY, toc_plain, ad, CHUNK_LOG2)
    return (b"".join(parts) + sealed
            + struct.pack(">III4s", len(sealed), len(rows), toc.key_version, b"RCPE"))


# --- identities, signed records, the segment log ---------------------------------------------


@dataclass(frozen=True)
class People:
    """An owner and a member with fixed keys (seeds), so every run signs the same bytes."""

    owner: Identity
    member: Identity


def people() -> People:
    owner = Identity("fuzz-owner", "Fuzz Owner", bytes(range(1, 33)), bytes(range(33, 65)))
    member = Identity(WRITER, "Fuzz Writer", bytes(range(65, 97)), bytes(range(97, 129)))
    return People(owner, member)


def log_payload(sequence: int = 3) -> bytes:
    """An import entry's payload: one segment and one pack of three images."""
    from cloud.seglog_format import (
        KIND_ADD,
        REASON_IMPORT,
        TYPE_PACK,
        TYPE_SEGMENT,
        Added,
        LogEntry,
        encode_payload,
    )

    added = (Added(TYPE_SEGMENT, SEG_ID, hashlib.sha256(b"s").digest(), 3),
             Added(TYPE_PACK, PACK_ID, hashlib.sha256(b"p").digest(), 3))
    entry = LogEntry(sequence, KIND_ADD, REASON_IMPORT, hashlib.sha256(b"prev").digest(), 2, 1,
                     1_790_000_000_000, WRITER, added, ())
    return encode_payload(entry)


def sign_log_record(writer: Identity, sequence: int, payload: bytes) -> bytes:
    from cloud import layout
    from crypto.signed import sign_record

    name = layout.log_entry_key(REPO_ID, sequence)
    return sign_record(writer, "log", name, payload)


def checkpoint_payload() -> dict[str, object]:
    """A checkpoint at sequence 3 whose live set is the segment and pack of log_payload."""
    from cloud import seglog

    live = {}
    for type_, obj_id, name in ((seglog.TYPE_SEGMENT, SEG_ID, b"s"),
                                (seglog.TYPE_PACK, PACK_ID, b"p")):
        live[(type_, obj_id)] = seglog.LiveObject(type_, obj_id, hashlib.sha256(name).digest(),
                                                  3, 1, 3)
    head = seglog.LogHead(3, hashlib.sha256(b"head").digest(), None)
    state = seglog.LogState(REPO_ID, head, live, {})
    return seglog.checkpoint_payload(state, 2)


def manifest_payload() -> dict[str, object]:
    """A format-2 manifest of REPO_ID owned by the fuzz owner, the writer a member."""
    from app.core.repository import MANIFEST_FORMAT_V2, Manifest, Member

    manifest = Manifest(REPO_ID, "radcrypt-v1", 8, [2, 4], 1, "2026-11-27T00:00:00Z",
                        format=MANIFEST_FORMAT_V2, sequence=2, owner="fuzz-owner",
                        members=(Member("fuzz-owner", 1), Member(WRITER, 1)))
    return json.loads(manifest.to_json())  # type: ignore[no-any-return]


def key_ring_bytes() -> bytes:
    """A real key ring of REPO_ID (one version, an 8-dimensional index key)."""
    from crypto.index import IndexKey
    from crypto.keys import KeyRing, VersionKeys

    index = IndexKey.generate(8, levels=(2, 4))
    ring = KeyRing(REPO_ID, (VersionKeys(1, DATA_KEY, bytes(32), index),))
    return ring.to_bytes()



# --- DICOM attribute edits ------------------------------------------------------------------
# Byte mutations of a DICOM file mostly break its element lengths, and pydicom then reads the
# rest of the file as one value: the pixel attributes behind them are rarely reached. These
# edits set the attributes a decoder trusts (sizes, bit depths, colour model, frames, value
# transforms) to hostile values and write the file again, keeping its transfer syntax.

DELETE = None
DICOM_EDITS: dict[str, tuple[object, ...]] = {
    "Rows": (0, 1, 2, 3, 7, 255, 256, 4097, 65535),
    "Columns": (0, 1, 2, 3, 7, 255, 256, 4097, 65535),
    "BitsAllocated": (0, 1, 8, 12, 16, 24, 32, 64),
    "BitsStored": (0, 1, 7, 8, 12, 15, 16, 17, 32, 64),
    "HighBit": (0, 1, 7, 11, 15, 16, 31, 63),
    "PixelRepresentation": (0, 1, 2),
    "SamplesPerPixel": (0, 1, 2, 3, 4),
    "PlanarConfiguration": (0, 1, 2),
    "PhotometricInterpretation": ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL",
                                  "YBR_FULL_422", "PALETTE COLOR", "YBR_RCT", "", "XYZ"),
    "NumberOfFrames": ("0", "1", "2", "3", "-1", "1000000"),
    "RescaleSlope": ("0", "-1", "1e308", "-1e308", "1e-300", "2"),
    "RescaleIntercept": ("0", "-1024", "1e308", "-1e308"),
    "WindowCenter": ("0", "-1e308", "1e308", "40"),
    "WindowWidth": ("0", "-1", "1", "1e308", "400"),
    "VOILUTFunction": ("LINEAR", "LINEAR_EXACT", "SIGMOID", "BOGUS"),
}
EDITABLE = (*DICOM_EDITS, "PixelData")


def dicom_edits() -> st.SearchStrategy[list[tuple[str, object]]]:
    """1..4 edits: (keyword, value) with value DELETE for "remove the attribute"; for
    PixelData the value is a new length as a fraction code (cut, doubled, emptied)."""
    def edit(keyword: str) -> st.SearchStrategy[tuple[str, object]]:
        if keyword == "PixelData":
            return st.tuples(st.just(keyword), st.sampled_from(("half", "double", "empty",
                                                                "odd", DELETE)))
        return st.tuples(st.just(keyword), st.sampled_from((*DICOM_EDITS[keyword], DELETE)))
    return st.lists(st.sampled_from(EDITABLE).flatmap(edit), min_size=1, max_size=4)


def edit_dicom(data: bytes, edits: Sequence[tuple[str, object]]) -> bytes | None:
    """The file with ``edits`` applied and written again in its own transfer syntax, or
    None when pydicom cannot write the result (then there is no file to read)."""
    import warnings

    import pydicom
    from pydicom import config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = config.settings.writing_validation_mode
        config.settings.writing_validation_mode = config.IGNORE
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            for keyword, value in edits:
                if keyword == "PixelData":
                    if "PixelData" not in ds:
                        continue
                    pixels = ds.PixelData
                    if value is DELETE:
                        del ds.PixelData
                    else:
                        ds.PixelData = {"half": pixels[:len(pixels) // 2],
                                        "double": pixels + pixels, "empty": b"",
                                        "odd": pixels[:-1]}[str(value)]
                elif value is DELETE:
                    if keyword in ds:
                        delattr(ds, keyword)
                else:
                    setattr(ds, keyword, value)
            out = io.BytesIO()
            meta = getattr(ds, "file_meta", None)
            if meta is not None and "TransferSyntaxUID" in meta:
                ds.save_as(out, enforce_file_format=False)
            else:
                ds.save_as(out, implicit_vr=True, little_endian=True, enforce_file_format=False)
            return out.getvalue()
        except Exception:
            return None
        finally:
            config.settings.writing_validation_mode = old
