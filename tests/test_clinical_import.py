"""The clinical attributes of each DICOM instance travel, encrypted, with its metadata.

The decoder child reads them (app/imaging/clinical.py ``clinical_attributes``), the
importer writes them into the encrypted metadata record as ``clinical``; the client reads
them back (app/core/meta.py) to group studies and series. Real files from pydicom-data:
``CT_small.dcm`` and ``MR_small.dcm``; a PNG has no clinical attributes. Nothing of them
may reach the bucket in clear.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from app.core import logstate
from app.core.access import create_repository_as
from app.core.importer import Importer, image_id_for
from app.core.meta import ImageMeta
from app.core.packs import ImageReader
from app.core.settings import Settings
from app.imaging.clinical import CLINICAL_KEYS
from app.imaging.errors import ImageDecodeError
from app.imaging.worker import DecoderPool
from cloud.directory_store import DirectoryStore
from crypto.identity import Identity

try:
    import owned_repos
except ImportError:  # pragma: no cover
    from tests import owned_repos

DICOM_FILES = ("CT_small.dcm", "MR_small.dcm")


def _expected(path: Path) -> dict[str, str]:
    """What pydicom itself says of the kept attributes (multi-values joined by "\\")."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    out = {}
    for keyword in CLINICAL_KEYS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        if isinstance(value, pydicom.multival.MultiValue):
            out[keyword] = "\\".join(str(v) for v in value)
        else:
            out[keyword] = str(value)
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[DirectoryStore, ImageReader, dict[str, str], list[Path]]:
    root = tmp_path_factory.mktemp("clinical")
    folder = root / "in"
    folder.mkdir()
    files = []
    for name in DICOM_FILES:
        target = folder / name
        shutil.copyfile(get_testdata_file(name), target)
        files.append(target)
    png = folder / "photo.png"
    Image.radial_gradient("L").save(png)
    files.append(png)
    store = DirectoryStore(root / "bucket")
    store.ensure_bucket()
    settings = Settings(data_dir=str(root / "data"))
    owner = Identity.generate("Clinical Owner")
    repo = create_repository_as(owned_repos.StoreSession(store, settings), owner, "clinical",
                                storage_format=2)
    report = Importer(store, repo, workers=2, batch_size=8, writer=owner,
                      settings=settings).run(files)
    assert report.failed == [] and len(report.imported) == 3 and report.frames == []
    reader = ImageReader(store, repo, logstate.verified_log(store, settings, repo))
    ids = {p.name: image_id_for(repo, hashlib.sha256(p.read_bytes()).digest()) for p in files}
    return store, reader, ids, files


def test_dicom_clinical_attributes_are_in_the_decrypted_metadata(
        imported: tuple[DirectoryStore, ImageReader, dict[str, str], list[Path]]) -> None:
    _, reader, ids, files = imported
    for path in files[:2]:
        record, version = reader.meta(ids[path.name])
        expected = _expected(path)
        assert record["clinical"] == expected
        meta = ImageMeta.from_record(ids[path.name], record, version)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                        "PatientName", "PatientID", "StudyDate", "Modality"):
            assert meta.attribute(keyword) == expected[keyword] != ""
        assert meta.study_uid == expected["StudyInstanceUID"]
        assert meta.series_uid == expected["SeriesInstanceUID"]
        assert meta.sop_uid == expected["SOPInstanceUID"]
        assert (meta.frame, meta.frames, meta.original_image_id) == (0, 1, ids[path.name])
    ct, _ = reader.meta(ids["CT_small.dcm"])
    assert ct["clinical"]["Modality"] == "CT"
    assert ct["clinical"]["ImagePositionPatient"].count("\\") == 2  # x\y\z, as DICOM writes
    assert ct["clinical"]["PixelSpacing"].count("\\") == 1


def test_non_dicom_images_have_no_clinical_attributes(
        imported: tuple[DirectoryStore, ImageReader, dict[str, str], list[Path]]) -> None:
    _, reader, ids, _ = imported
    record, version = reader.meta(ids["photo.png"])
    assert "clinical" not in record and record["source_format"] == "png"
    meta = ImageMeta.from_record(ids["photo.png"], record, version)
    assert meta.clinical == {} and meta.study_uid == "" and meta.frames == 1


def test_no_clinical_value_reaches_the_bucket_in_clear(
        imported: tuple[DirectoryStore, ImageReader, dict[str, str], list[Path]]) -> None:
    store, _, _, files = imported
    secrets = set()
    for path in files[:2]:
        expected = _expected(path)
        secrets |= {expected[k].encode() for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                    "SOPInstanceUID", "PatientID")}
        secrets.add(str(expected["PatientName"]).encode())
    secrets = {s for s in secrets if len(s) >= 6}  # "1CT1" could occur by chance
    assert len(secrets) >= 6  # the UIDs at least
    blobs = [store.get(key) for key in store.list_keys("")]
    assert blobs
    for secret in secrets:
        assert not any(secret in blob for blob in blobs), secret


def test_the_decoder_child_sends_clinical_attributes_only_as_text(tmp_path: Path) -> None:
    """The parent checks the child's answer: clinical values that are not text are a
    malformed answer (a lying child cannot put objects into the metadata)."""
    from app.imaging import worker

    path = Path(get_testdata_file("MR_small.dcm"))
    with DecoderPool(1) as pool:
        result = pool.analyse_frames(path, extractor="radcrypt-v1", max_frames=4)
        assert result.total == 1 and result.frames[0].clinical == _expected(path)
        decoded = pool.decode(path)
        assert decoded.clinical == _expected(path)

        original = pool._request

        def lying(name, request, max_body):  # type: ignore[no-untyped-def]
            header, parts = original(name, request, max_body)
            header["clinical"] = {"PatientName": ["not", "text"]}
            return header, parts

        pool._request = lying  # type: ignore[method-assign]
        with pytest.raises(ImageDecodeError, match=worker.DIED + ": it sent a malformed"):
            pool.analyse_frames(path, extractor="radcrypt-v1", max_frames=4)
