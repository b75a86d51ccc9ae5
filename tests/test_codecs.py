"""Every DICOM transfer syntax pydicom knows decodes, through the decoder child (issue 15).

Why: JPEG Lossless and JPEG-LS files are common in PACS exports and failed to import before
python-gdcm and pyjpegls were installed. The corpus is every file with pixel data in
pydicom's own test files and in pydicom-data; the table per transfer syntax is what
docs/CODECS.md shows (``python -m tests.test_codecs --write-docs`` rewrites it, and the
test fails when the documented table no longer matches what decodes here).

A CD export also holds a DICOMDIR, a viewer program, autorun.inf and HTML pages: an import
of such a folder skips them and lists them as skipped, not failed.
"""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.core.importer import scan_paths, skip_reason  # noqa: E402
from app.imaging.decode import decode_image, sniff_format  # noqa: E402
from app.imaging.errors import ImageDecodeError  # noqa: E402
from app.imaging.worker import DecoderPool  # noqa: E402

DOCS = ROOT / "docs" / "CODECS.md"
EXTRACTOR = "radcrypt-v1"

KNOWN_BAD = {
    "JPEG2000-embedded-sequence-delimiter.dcm": "compressed pixel data is corrupt",
    "MR_truncated.dcm": "pixel data is truncated",
    "badVR.dcm": "DICOM data is invalid",
    "nested_priv_SQ.dcm": "no Rows or Columns",
    "meta_missing_tsyntax.dcm": "no Rows or Columns",
}
"""Files of the corpus that are broken on purpose: they must fail with these plain reasons
(an ImageDecodeError from the child), never crash it."""


def corpus_roots() -> list[Path]:
    import pydicom.data

    base = Path(pydicom.data.__file__).parent
    roots = [base / "test_files", base / "charset_files"]
    try:
        import data_store  # pydicom-data

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    return [r for r in roots if r.is_dir()]


@dataclass(frozen=True)
class Sample:
    path: Path
    syntax: str  # the transfer syntax UID, or "" without a meta header
    label: str


def pixel_samples() -> list[Sample]:
    """Every DICOM file of the corpus (sniffed by content, DICOMDIRs left out) that has
    pixel data, with its transfer syntax."""
    import pydicom

    out = []
    for root in corpus_roots():
        for path in sorted(root.rglob("*")):
            if not path.is_file():
                continue
            head = path.read_bytes()[:4096]
            if sniff_format(head) != "dicom" or skip_reason(path, named=True):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(path, force=True, defer_size=256)
            except Exception:
                ds = None
            if ds is None or not any(k in ds for k in ("PixelData", "FloatPixelData",
                                                       "DoubleFloatPixelData")):
                if path.name in KNOWN_BAD:
                    out.append(Sample(path, "", "(unreadable header)"))
                continue
            meta = getattr(ds, "file_meta", None)
            uid = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
            out.append(Sample(path, uid, _label(uid)))
    return out


def _label(uid: str) -> str:
    from pydicom.uid import UID

    if not uid:
        return "(no meta header: inferred)"
    return f"{UID(uid).name} ({uid})"


def which_plugin(sample: Sample) -> str:
    """The first plugin that decodes the file in decode.py's order (pydicom's, GDCM last)
    and the others that also do, or GDCM called directly (12-bit JPEG Extended)."""
    import pydicom
    from pydicom.pixels import get_decoder, pixel_array
    from pydicom.uid import UID, JPEGExtended12Bit

    uid = UID(sample.syntax) if sample.syntax else None
    if uid is None or not uid.is_compressed:
        deflated = uid == "1.2.840.10008.1.2.1.99"
        return "pydicom (deflate, bounded)" if deflated else "pydicom (native)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(sample.path)
        if uid == JPEGExtended12Bit and int(ds.get("BitsStored", 8)) > 8:
            return "gdcm (direct)"
        working = []
        available = get_decoder(uid).available_plugins
        for plugin in [p for p in available if p != "gdcm"] + [p for p in available
                                                                if p == "gdcm"]:
            try:
                pixel_array(ds, index=0, decoding_plugin=plugin)
            except Exception:
                continue
            working.append(plugin)
    if not working:
        return "-"
    return working[0] + (f" (also {', '.join(working[1:])})" if working[1:] else "")


@dataclass
class Row:
    label: str
    files: int = 0
    decoded: int = 0
    plugins: str = ""


def measure(pool: DecoderPool, samples: list[Sample]
            ) -> tuple[dict[str, Row], dict[str, str]]:
    """Per transfer syntax: files, decoded through the child, plugins; and the failures."""
    rows: dict[str, Row] = {}
    failures: dict[str, str] = {}
    plugins: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for sample in samples:
        row = rows.setdefault(sample.label, Row(sample.label))
        row.files += 1
        try:
            result = pool.analyse(sample.path, extractor=EXTRACTOR)
        except ImageDecodeError as exc:
            failures[sample.path.name] = exc.reason
            continue
        assert result.features.shape == (128,) and np.isfinite(result.features).all()
        row.decoded += 1
        plugins[sample.label][which_plugin(sample)] += 1
    for label, row in rows.items():
        used = plugins[label]
        row.plugins = "; ".join(f"{name} x{n}" if len(used) > 1 else name
                                for name, n in sorted(used.items())) or "-"
    return rows, failures


def table(rows: dict[str, Row]) -> str:
    lines = ["| Transfer syntax | Files | Decoded | Plugin |", "|---|---:|---:|---|"]
    for label in sorted(rows):
        r = rows[label]
        lines.append(f"| {r.label} | {r.files} | {r.decoded} | {r.plugins} |")
    return "\n".join(lines)


TABLE_START = "<!-- codec table: python -m tests.test_codecs --write-docs -->"
TABLE_END = "<!-- end of codec table -->"


def documented_table() -> str:
    text = DOCS.read_text()
    start = text.index(TABLE_START) + len(TABLE_START)
    return text[start:text.index(TABLE_END)].strip()


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def pool():
    with DecoderPool(1) as p:
        yield p


def test_every_sample_with_pixel_data_decodes_in_the_child(pool: DecoderPool) -> None:
    start = time.perf_counter()
    samples = pixel_samples()
    assert len(samples) >= 150, f"only {len(samples)} corpus files with pixel data"
    rows, failures = measure(pool, samples)
    print(table(rows))
    print(f"{len(samples)} files in {time.perf_counter() - start:.1f} s")
    unexpected = {n: r for n, r in failures.items() if n not in KNOWN_BAD}
    assert not unexpected, f"files that should decode and did not: {unexpected}"
    for name, fragment in KNOWN_BAD.items():
        if any(s.path.name == name for s in samples):
            assert name in failures and fragment in failures[name], (name, failures.get(name))
    wanted = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.70",
              "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
              "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99",
              "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
    decoded = {s.syntax for s in samples if s.path.name not in failures}
    assert wanted <= decoded, f"transfer syntaxes with nothing decoded: {wanted - decoded}"
    assert documented_table() == table(rows), (
        "docs/CODECS.md's table is out of date: run python -m tests.test_codecs --write-docs")


def _file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert path, name
    return Path(path)


@pytest.mark.parametrize("compressed", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
                                        "MR_small_jp2klossless.dcm"])
def test_lossless_codecs_give_back_the_uncompressed_pixels(compressed: str) -> None:
    original = decode_image(_file("MR_small.dcm")).pixels
    assert np.array_equal(decode_image(_file(compressed)).pixels, original)


def test_12_bit_jpeg_extended_decodes_to_pydicoms_reference_values(pool: DecoderPool) -> None:
    # pydicom's pixels_reference JPGE_16_12_1_0_1F_M2 (and JPEG-lossy.dcm, the same image)
    for name in ("JPGExtended.dcm", "JPEG-lossy.dcm"):
        image = pool.decode(_file(name))
        assert image.pixels.shape == (1024, 256)
        assert (image.pixels[420, 140], image.pixels[230, 120]) == (244, 95), name


def test_jpeg_lossless_process_14_decodes(tmp_path: Path) -> None:
    """No corpus file uses 1.2.840.10008.1.2.4.57; an SV1 stream is a valid Process 14
    stream (selection value 1), so the SV1 file relabelled must decode the same."""
    import pydicom
    from pydicom.uid import JPEGLossless

    ds = pydicom.dcmread(_file("JPEG-LL.dcm"))
    ds.file_meta.TransferSyntaxUID = JPEGLossless
    relabelled = tmp_path / "p14.dcm"
    ds.save_as(relabelled, enforce_file_format=True)
    want = decode_image(_file("JPEG-LL.dcm")).pixels
    assert np.array_equal(decode_image(relabelled).pixels, want)


def test_a_gdcm_abort_fails_the_file_and_the_child_lives_on(pool: DecoderPool,
                                                            tmp_path: Path) -> None:
    """GDCM throws a C++ exception it does not catch for JPEG Lossless with Bits Stored 1
    (found by the file fuzzer): it aborts a forked process, not the decoder child."""
    import pydicom

    name = "JPGLosslessP14SV1_1s_1f_8b.dcm"
    ds = pydicom.dcmread(_file(name))
    ds.BitsStored = 1
    hostile = tmp_path / f"bits1-{name}"
    ds.save_as(hostile, enforce_file_format=True)
    pids = pool.pids
    with pytest.raises(ImageDecodeError) as info:
        pool.analyse(hostile, extractor=EXTRACTOR)
    assert info.value.reason == ("compressed pixel data is corrupt or cannot be decoded "
                                 "(the GDCM codec failed on it: signal 6)"), info.value
    assert pool.pids == pids  # the same child, alive
    assert pool.analyse(_file(name), extractor=EXTRACTOR).rows > 0


def _cd_export(tmp_path: Path) -> tuple[Path, list[Path], list[str], Path]:
    """A folder like a hospital CD: images of several syntaxes, the DICOMDIR, a viewer."""
    cd = tmp_path / "CD"
    (cd / "DICOM" / "ST1").mkdir(parents=True)
    (cd / "VIEWER").mkdir()
    images = []
    for name in ("CT_small.dcm", "JPEG-LL.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "JPGExtended.dcm", "MR_small_RLE.dcm", "image_dfl.dcm", "SC_rgb_jpeg_gdcm.dcm",
                 "MR_small_jp2klossless.dcm"):
        target = cd / "DICOM" / "ST1" / name.upper().replace(".DCM", "")  # no extension
        shutil.copyfile(_file(name), target)
        images.append(target)
    shutil.copyfile(_file("dicomdirtests/DICOMDIR"), cd / "DICOMDIR")
    (cd / "AUTORUN.INF").write_text("[autorun]\r\nopen=VIEWER\\viewer.exe\r\n")
    (cd / "VIEWER" / "viewer.exe").write_bytes(b"MZ\x90\x00" + bytes(range(256)) * 8)
    (cd / "VIEWER" / "viewer.dll").write_bytes(b"MZ\x90\x00" + b"\x00\xff" * 500)
    (cd / "INDEX.HTM").write_text("<html><body>Open the viewer</body></html>")
    (cd / "README.TXT").write_text("Patient images. Do not copy.\n")
    skipped = ["AUTORUN.INF", "DICOMDIR", "INDEX.HTM", "README.TXT", "viewer.dll",
               "viewer.exe"]
    broken = cd / "DICOM" / "ST1" / "BROKEN.dcm"  # an image's extension: tried, and fails
    broken.write_bytes(hashlib.sha256(b"not dicom").digest() * 200)
    return cd, images, skipped, broken


def test_a_cd_export_skips_dicomdir_and_viewer_files(tmp_path: Path) -> None:
    cd, images, skipped, broken = _cd_export(tmp_path)
    files, skips = scan_paths([cd])
    assert sorted(files) == sorted([*images, broken])
    assert sorted(Path(p).name for p, _ in skips) == sorted(skipped)
    reasons = dict((Path(p).name, r) for p, r in skips)
    assert "DICOMDIR" in reasons["DICOMDIR"] and "text file" in reasons["AUTORUN.INF"]
    # a DICOMDIR named on its own is skipped as well; any other named file is tried
    assert scan_paths([cd / "DICOMDIR"]) == ([], [(str(cd / "DICOMDIR"), reasons["DICOMDIR"])])
    assert scan_paths([cd / "README.TXT"]) == ([cd / "README.TXT"], [])


def test_importing_a_cd_export_counts_skipped_files_apart(tmp_path: Path) -> None:
    from app.core.access import create_repository_as
    from app.core.importer import Importer
    from app.core.settings import Settings
    from cloud.directory_store import DirectoryStore
    from crypto.identity import Identity

    try:
        import owned_repos
    except ImportError:  # pragma: no cover
        from tests import owned_repos

    cd, images, skipped, broken = _cd_export(tmp_path)
    store = DirectoryStore(tmp_path / "bucket")
    store.ensure_bucket()
    session = owned_repos.StoreSession(store, Settings(data_dir=str(tmp_path / "data")))
    owner = Identity.generate("Codec Owner")
    repo = create_repository_as(session, owner, "codecs", storage_format=2)
    report = Importer(store, repo, workers=2, batch_size=4, writer=owner,
                      settings=session.settings).run([cd])
    assert sorted(p for p, _ in report.imported) == sorted(str(p) for p in images)
    assert [p for p, _ in report.failed] == [str(broken)]
    assert sorted(Path(p).name for p, _ in report.skipped) == sorted(skipped)
    assert report.as_dict()["skipped"][0].keys() == {"path", "reason"}


# --------------------------------------------------------------------------- docs


def write_docs() -> None:
    with DecoderPool(2) as p:
        rows, failures = measure(p, pixel_samples())
    text = DOCS.read_text()
    start = text.index(TABLE_START) + len(TABLE_START)
    end = text.index(TABLE_END)
    DOCS.write_text(text[:start] + "\n" + table(rows) + "\n" + text[end:])
    print(table(rows))
    for name, reason in sorted(failures.items()):
        print(f"failed: {name}: {reason}")


if __name__ == "__main__":
    if "--write-docs" in sys.argv:
        os.chdir(ROOT)
        write_docs()
