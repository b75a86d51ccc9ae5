"""What the cloud stores reveals nothing of the images: after a real import (storage format
2, the default: originals, packs, segments, the segment log), EVERY object in the bucket is
scanned for pixel data, DICOM tag values, file names, feature vectors, and the plaintext of
every pack entry (previews, metadata, the feature array). The manifest is public by design
(plain JSON), so it gets the same scan and a check of its fields.

Scans are exact: hashing only selects candidates, which are then compared byte for byte
(tests/e2e_support.py: WindowIndex, StringIndex).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from app.core.importer import Importer, image_id_for
from app.core.repository import Repository, manifest_payload
from app.core.searcher import features_of_files
from app.imaging.decode import decode_image
from app.imaging.thumbnail import make_thumbnail_png
from cloud import layout
from cloud.store import ObjectStore, StoreConfig
from crypto import pack
from crypto.segment_mac import index_mac_key

try:
    import e2e_support as support
    import owned_repos
    import s3servers
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos, s3servers
    from tests.fixtures import format2_support as fx

STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
              "UC", "UI", "UR", "UT"}
MIN_STRING = 6
PIXEL_WINDOW = 64
FEATURE_WINDOW = 16


@dataclasses.dataclass
class Bucket:
    store: ObjectStore
    config: StoreConfig
    repo: Repository
    files: list[Path]
    ids: list[str]
    contents: dict[str, bytes]  # every object of the bucket, by key
    owner_id: str

    def pack_plaintexts(self) -> dict[tuple[str, str], bytes]:
        """(kind word, object id) -> plaintext of every entry of every pack, opened."""
        out = {}
        for key, blob in self.contents.items():
            parsed = layout.parse_key(key)
            if parsed.kind == "pack":
                _, plains = pack.open_pack(self.repo.keys.data_key, self.repo.repo_id,
                                           parsed.item_id, blob)
                out.update({(pack.KIND_WORDS[k], i): p for (k, i), p in plains.items()})
        return out


@pytest.fixture(scope="module")
def bucket(moto_store_config: StoreConfig) -> Iterator[Bucket]:
    config = dataclasses.replace(moto_store_config, bucket=s3servers.unique_bucket("leak"))
    store = ObjectStore(config)
    store.ensure_bucket()
    pool = support.sample_images(120)  # the first 120 hold at least 15 PNG/TIFF/JPEG renders
    dicoms = [p for p in pool if p.suffix == ".dcm"][:25]
    renders = [p for p in pool if p.suffix in (".png", ".tif", ".jpg")][:15]
    files = dicoms + renders
    owner = owned_repos.owner_identity("Leak Owner")
    repo = owned_repos.create_owned_repository(store, "leak", owner)
    report = Importer(store, repo, workers=2, batch_size=16, writer=owner,
                      settings=fx.fresh_settings()).run(files)
    assert len(report.imported) == len(files) and not report.failed
    ids = [image_id_for(repo, hashlib.sha256(p.read_bytes()).digest()) for p in files]
    contents = {key: store.get(key) for key, _ in store.list_objects("")}
    yield Bucket(store, config, repo, files, ids, contents, owner.user_id)
    s3servers.drop_bucket(config)


def test_the_import_is_what_we_think(bucket: Bucket) -> None:
    """~40 images of each format, patient data present in the DICOM originals, and the
    bucket holds exactly the expected objects (so the scans below scan everything)."""
    suffixes = {p.suffix for p in bucket.files}
    assert suffixes == {".dcm", ".png", ".tif", ".jpg"} and len(bucket.files) == 40
    names = [str(pydicom.dcmread(p, stop_before_pixels=True, force=True).get("PatientName", ""))
             for p in bucket.files if p.suffix == ".dcm"]
    assert sum(len(n) >= MIN_STRING for n in names) >= 15
    kinds = [layout.parse_key(key).kind for key in bucket.contents]
    assert kinds.count("objects") == 40  # format 2: one object per image, the original
    assert kinds.count("thumbs") == kinds.count("meta") == 0
    assert kinds.count("manifest") == 1 and kinds.count("grant") == 1
    assert kinds.count("user") == 1  # the owner's record (public card), signed by the owner
    assert kinds.count("segment") == kinds.count("pack") == 3  # one per batch of 16
    assert kinds.count("log") == 1 + 3  # genesis, one entry per batch
    assert len(kinds) == 40 + 1 + 1 + 1 + 3 + 3 + 4 + kinds.count("basis")
    plains = bucket.pack_plaintexts()
    # every frame of a multi-frame file is an image of its own (issue 15): a metadata entry
    # and a preview each, the original stored once
    extra_frames = sum(int(pydicom.dcmread(p, stop_before_pixels=True, force=True)
                           .get("NumberOfFrames") or 1) - 1
                       for p in bucket.files if p.suffix == ".dcm")
    assert extra_frames == 2  # two 2-frame ultrasound files among the 25 DICOM files
    assert sorted(k for k, _ in plains).count("meta") == 40 + extra_frames
    assert sorted(k for k, _ in plains).count("thumbs") == 40 + extra_frames
    assert sorted(k for k, _ in plains).count("features") == 3
    assert sum(map(len, bucket.contents.values())) > sum(p.stat().st_size
                                                         for p in bucket.files)


def _pixel_needles(files: list[Path]) -> dict[str, bytes]:
    """Each original file whole, its stored pixel data and its decoded pixels."""
    needles: dict[str, bytes] = {}
    for path in files:
        needles[f"{path.name} (file)"] = path.read_bytes()
        if path.suffix == ".dcm":
            ds = pydicom.dcmread(path, force=True)
            needles[f"{path.name} (PixelData)"] = bytes(ds.PixelData)
            try:
                array = ds.pixel_array
            except Exception:  # a pixel format pydicom alone cannot decode: file is enough
                continue
        else:
            with Image.open(path) as pil:
                array = np.asarray(pil)
        raw = np.ascontiguousarray(array).tobytes()
        needles[f"{path.name} (pixels)"] = raw[: 8 << 20]
    return needles


def _dicom_strings(path: Path) -> set[str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    values: set[str] = set()
    for element in [*ds.file_meta.iterall(), *ds.iterall()]:
        if element.VR not in STRING_VRS or element.value is None:
            continue
        items = element.value if isinstance(element.value, (list, tuple,
                                                            pydicom.multival.MultiValue)) \
            else [element.value]
        for item in items:
            text = str(item).strip()
            if len(text) >= MIN_STRING:
                values.add(text)
    return values


def _assert_no_hits(bucket: Bucket, hits: dict[str, list[object]], what: str) -> None:
    found = {key: found for key, found in hits.items() if found}
    assert not found, f"{what} found in the bucket: " + "; ".join(
        f"{key}: {items[:3]}" for key, items in list(found.items())[:5])


def test_no_pixel_data_and_no_plaintext_objects(bucket: Bucket) -> None:
    needles = _pixel_needles(bucket.files)
    plains = bucket.pack_plaintexts()
    for image_id, path in zip(bucket.ids, bucket.files, strict=True):
        # the previews and metadata as the client sealed them into a pack
        for kind in ("thumbs", "meta"):
            needles[f"{path.name} ({kind} plaintext)"] = plains[(kind, image_id)]
        needles[f"{path.name} (preview made again)"] = make_thumbnail_png(decode_image(path))
    for (kind, object_id), plain in plains.items():  # and each pack's feature array
        if kind == "features":  # its floats: the image ids before them are public names
            count = struct.unpack_from("<I", plain, 8)[0]
            needles[f"pack {object_id} (feature array plaintext)"] = plain[16 + 16 * count:]
    # blocks of fewer than 3 distinct byte values are no evidence: the zero-padded
    # header fields of a format-2 segment (0x01 then zeros) match dark patches of pixels
    index = support.WindowIndex(needles, PIXEL_WINDOW, min_distinct=3)
    hits = {key: index.find(blob) for key, blob in bucket.contents.items()}
    _assert_no_hits(bucket, hits, f"{PIXEL_WINDOW}-byte runs of originals or plaintexts")
    # the scan does find what is there: a stored copy of a file would have been caught
    probe = needles[f"{bucket.files[3].name} (file)"]
    assert index.find(b"header" + probe[1000:1100] + b"tail")


def test_no_tag_values_and_no_file_names(bucket: Bucket) -> None:
    strings: set[str] = set()
    for path in bucket.files:
        strings.add(path.name)
        strings.add(path.stem)
        if path.suffix == ".dcm":
            strings |= _dicom_strings(path)
    strings = {s for s in strings if len(s.encode()) >= MIN_STRING}
    patient_data = {"CompressedSamples^CT1", "JFK IMAGING CENTER", "Lestrade^G",
                    "Non-ossifying fibroma of distal tibia", "Sssssss^Jsssss", "021234567"}
    assert len(patient_data & strings) >= 4  # the originals do carry names, ids and descriptions
    encoded = {s.encode("utf-8") for s in strings} | {s.encode("utf-16-le") for s in strings}
    index = support.StringIndex(encoded, MIN_STRING)
    hits = {key: index.find(blob) for key, blob in bucket.contents.items()}
    _assert_no_hits(bucket, hits, "DICOM tag values or file names")
    for key in bucket.contents:  # object names carry ids only
        assert re.fullmatch(r"radcrypt/v1/(users/[a-z0-9-]+\.json|repos/leak/(manifest\.json|"
                            r"grants/[a-z0-9-]+|basis/[0-9]+|log/[0-9]{20}|"
                            r"(objects|packs|segments)/[0-9a-f]{32}))", key), key


def test_no_feature_vectors(bucket: Bucket) -> None:
    reader = fx.reader(bucket.store, fx.fresh_settings(), bucket.repo)
    features = np.array([reader.meta(i)[0]["features"] for i in bucket.ids])
    assert np.array_equal(features[:3], features_of_files(bucket.repo, bucket.files[:3]))
    needles: dict[str, bytes] = {}
    for path, vector in zip(bucket.files, features, strict=True):
        for dtype in ("<f8", ">f8", "<f4", ">f4"):
            needles[f"{path.name} {dtype}"] = vector.astype(dtype).tobytes()
    index = support.WindowIndex(needles, FEATURE_WINDOW)
    hits = {key: index.find(blob) for key, blob in bucket.contents.items()}
    _assert_no_hits(bucket, hits, f"{FEATURE_WINDOW}-byte runs of feature vectors")
    # ... nor as decimal text (as the metadata JSON writes them before encryption)
    texts = {repr(float(x)).encode() for x in features.ravel() if len(repr(float(x))) >= 8}
    text_index = support.StringIndex(texts, 8)
    text_hits = {key: text_index.find(blob) for key, blob in bucket.contents.items()}
    _assert_no_hits(bucket, text_hits, "feature values as text")
    # the scan does find a stored vector
    assert index.find(b"x" * 10 + features[5].astype("<f8").tobytes()[40:80])


def test_manifest_is_public_parameters_only(bucket: Bucket) -> None:
    raw = bucket.contents[layout.manifest_key("leak")]
    manifest = json.loads(manifest_payload(raw))  # inside the owner's signed document
    public = {"repo_id", "extractor", "dim", "levels", "key_version", "created", "scheme",
              "format"}
    assert public <= set(manifest) <= public | {"sequence", "members", "owner"}
    assert manifest["repo_id"] == "leak" and manifest["dim"] == 128
    assert all(isinstance(v, (str, int, list)) for v in manifest.values())
    assert len(raw) < 4096


def test_no_secret_in_object_metadata_or_grant(bucket: Bucket) -> None:
    client = s3servers.raw_client(bucket.config)
    for key in bucket.contents:
        head = client.head_object(Bucket=bucket.config.bucket, Key=key)
        assert head.get("Metadata", {}) == {}, key  # no x-amz-meta-* with names or tags
    assert layout.grant_key("leak", "password-owner") not in bucket.contents
    assert layout.grant_key("leak", bucket.owner_id) in bucket.contents
    keys = bucket.repo.keys
    for secret in (keys.data_key, keys.keyword_key, keys.index_key.to_bytes()[:64],
                   index_mac_key(keys.data_key)):
        for blob in bucket.contents.values():
            assert secret not in blob
    # nothing in the bucket is wrapped under a password (identities wrap to X25519 keys)
    assert not [k for k, blob in bucket.contents.items()
                if struct.unpack_from(">4s", blob.ljust(4, b"\0"))[0] == b"RCPW"]
