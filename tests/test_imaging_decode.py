"""Decoding real DICOM samples and Pillow-written files, and refusing malformed input.

The DICOM files are pydicom's and pydicom-data's own test files (offline); PNG, JPEG and
TIFF files are written here with Pillow. Every malformed input must raise ImageDecodeError
naming the file, never a library exception, and within seconds.
"""

from __future__ import annotations

import io
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from app.imaging import (
    DecodedImage,
    ImageDecodeError,
    decode_bytes,
    decode_image,
    make_thumbnail_png,
    sniff_format,
)
from app.imaging.decode import METADATA_KEYS

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # pydicom on its broken test files
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]


def sample(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} missing (install pydicom-data)"
    return Path(path)


def raw_pixels(name: str) -> np.ndarray:
    return pydicom.dcmread(sample(name)).pixel_array


# ----------------------------------------------------------------------------- real DICOM


def test_ct_rescale_gives_hounsfield_units() -> None:
    img = decode_image(sample("CT_small.dcm"))
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    expected = apply_modality_lut(ds.pixel_array, ds)
    assert img.source_format == "dicom"
    assert img.pixels.dtype == np.float32 and img.pixels.shape == (128, 128)
    assert float(ds.RescaleIntercept) != 0  # the test means something
    np.testing.assert_allclose(img.pixels, expected, rtol=0, atol=1e-3)
    assert -1100 <= img.pixels.min() and img.pixels.max() <= 3100
    assert img.metadata["Modality"] == "CT"
    assert set(img.metadata) <= set(METADATA_KEYS)
    assert not img.monochrome1 and img.n_frames == 1


def test_ct_default_window_and_display() -> None:
    img = decode_image(sample("693_UNCR.dcm"))
    assert img.window == (40.0, 100.0)
    disp = img.display()
    assert disp.dtype == np.uint8 and disp.shape == (512, 512)
    # Soft-tissue window 40/100: air (-1000 HU) black, bone (> 90 HU) white.
    assert disp[img.pixels < -100].max() == 0
    assert disp[img.pixels > 100].min() == 255
    lung = img.display(window=(-600.0, 1500.0))
    assert lung[img.pixels < -1000].max() < 60
    assert not np.array_equal(lung, disp)


def test_mr_grey() -> None:
    img = decode_image(sample("MR_small.dcm"))
    assert img.pixels.shape == (64, 64) and img.window == (600.0, 1600.0)
    np.testing.assert_array_equal(img.pixels, raw_pixels("MR_small.dcm").astype(np.float32))
    assert img.metadata["Modality"] == "MR"


def test_metadata_has_no_identifying_tags() -> None:
    img = decode_image(sample("MR_small.dcm"))
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    assert str(ds.PatientName)  # the file does name a patient
    for value in img.metadata.values():
        assert str(ds.PatientName) not in value and str(ds.PatientID) not in value
    assert set(img.metadata) <= set(METADATA_KEYS)


@pytest.mark.parametrize(
    ("compressed", "reference"),
    [
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 lossless
        ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE lossless
        ("MR_small_bigendian.dcm", "MR_small.dcm"),  # explicit VR big endian
        ("MR_small_implicit.dcm", "MR_small.dcm"),  # implicit VR little endian
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),  # multi-frame JPEG 2000
        ("emri_small_RLE.dcm", "emri_small.dcm"),
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),  # 1024 x 1024 16-bit
        ("US1_J2KR.dcm", "US1_UNCR.dcm"),  # RGB (YBR_RCT) JPEG 2000 lossless
        ("SC_rgb_rle.dcm", "SC_rgb.dcm"),  # RGB RLE
    ],
)
def test_lossless_transfer_syntaxes_decode_identically(compressed: str, reference: str) -> None:
    a = decode_image(sample(compressed))
    b = decode_image(sample(reference))
    np.testing.assert_array_equal(a.pixels, b.pixels)


@pytest.mark.parametrize(
    ("lossy", "reference", "tolerance"),
    [
        ("MR2_J2KI.dcm", "MR2_UNCR.dcm", 0.02),  # JPEG 2000 lossy, 16 bit
        ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb.dcm", 0.05),  # JPEG baseline, YBR_FULL
        ("SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb.dcm", 0.05),  # JPEG baseline, YBR_FULL_422
        ("SC_ybr_full_uncompressed.dcm", "SC_rgb.dcm", 0.02),  # YBR converted to RGB
        ("RG1_J2KI.dcm", "RG1_UNCR.dcm", 0.02),  # MONOCHROME1 CR, JPEG 2000 lossy
    ],
)
def test_lossy_and_ybr_files_look_like_their_reference(
    lossy: str, reference: str, tolerance: float
) -> None:
    a = decode_image(sample(lossy)).normalised()
    b = decode_image(sample(reference)).normalised()
    assert a.shape == b.shape
    assert float(np.sqrt(np.mean((a - b) ** 2))) < tolerance


def test_rgb_ultrasound() -> None:
    img = decode_image(sample("US1_UNCR.dcm"))
    assert img.pixels.shape == (480, 640, 3) and img.is_rgb
    assert img.grey.shape == (480, 640) and img.grey.dtype == np.float32
    # Rec. 601 luma, as Pillow's "L" conversion
    r, g, b = (img.pixels[..., i] for i in range(3))
    np.testing.assert_allclose(img.grey, 0.299 * r + 0.587 * g + 0.114 * b, atol=1e-3)
    np.testing.assert_array_equal(img.display(), img.pixels.astype(np.uint8))


def test_palette_color_becomes_rgb() -> None:
    img = decode_image(sample("OBXXXX1A.dcm"))
    assert img.pixels.shape == (600, 800, 3)
    big_endian = decode_image(sample("OBXXXX1A_expb.dcm"))
    # The big-endian copy stores its 16-bit palette entries as 8-bit values: same picture.
    assert np.abs(img.display().astype(int) - big_endian.display().astype(int)).max() <= 1


def test_multiframe_middle_frame_by_default_and_frame_selection() -> None:
    frames = raw_pixels("emri_small.dcm")
    img = decode_image(sample("emri_small.dcm"))
    assert img.n_frames == 10
    np.testing.assert_array_equal(img.pixels, frames[5].astype(np.float32))
    first = decode_image(sample("emri_small.dcm"), frame=0)
    np.testing.assert_array_equal(first.pixels, frames[0].astype(np.float32))
    with pytest.raises(ImageDecodeError, match="frame 10 does not exist"):
        decode_image(sample("emri_small.dcm"), frame=10)


def test_multiframe_rgb_jpeg_baseline() -> None:
    img = decode_image(sample("color3d_jpeg_baseline.dcm"), frame=3)
    assert img.n_frames == 120 and img.pixels.shape == (480, 640, 3)
    assert img.pixels.std() > 5


def test_enhanced_ct_functional_groups() -> None:
    """Rescale and window live in the shared functional groups of enhanced objects."""
    img = decode_image(sample("eCT_Supplemental.dcm"))
    raw = raw_pixels("eCT_Supplemental.dcm")[1].astype(np.float32)
    np.testing.assert_allclose(img.pixels, raw - 1024.0)
    assert img.window == (49.0, 102.0)


def test_modality_lut_sequence_and_voi_lut() -> None:
    ds = pydicom.dcmread(sample("mlut_18.dcm"))
    img = decode_image(sample("mlut_18.dcm"))
    np.testing.assert_array_equal(img.pixels, apply_modality_lut(ds.pixel_array, ds))
    voi = decode_image(sample("vlut_04.dcm"))
    assert voi.window is None and voi.voi_lut_image is not None
    np.testing.assert_array_equal(voi.normalised(), voi.voi_lut_image)


def test_monochrome1_is_inverted_in_display() -> None:
    img = decode_image(sample("RG3_UNCR.dcm"))
    assert img.monochrome1
    window = (512.0, 1024.0)
    disp = img.display(window=window)
    low, high = img.pixels <= 0, img.pixels >= 1023
    assert low.any() and high.any()
    assert disp[low].min() == 255  # minimum value shows white
    assert disp[high].max() == 0
    as_mono2 = DecodedImage(pixels=img.pixels, source_format="dicom")
    np.testing.assert_array_equal(255 - as_mono2.display(window), disp)


def test_dicom_without_preamble_and_without_meta_header() -> None:
    data = sample("CT_small.dcm").read_bytes()
    assert data[128:132] == b"DICM"
    no_preamble = decode_bytes(data[128:], "no_preamble.dcm")
    np.testing.assert_array_equal(no_preamble.pixels, decode_image(sample("CT_small.dcm")).pixels)
    # An ACR-NEMA style data set without "DICM" and meta header at all.
    face = decode_image(sample("OT-PAL-8-face.dcm"))
    assert sample("OT-PAL-8-face.dcm").read_bytes()[128:132] != b"DICM"
    assert face.pixels.shape == (480, 640, 3)


def test_format_sniffed_from_content_not_extension(tmp_path: Path) -> None:
    # CT_small.dcm's preamble holds a TIFF header: it must still be read as DICOM.
    assert sample("CT_small.dcm").read_bytes()[:4] == b"II*\x00"
    disguised = tmp_path / "scan.png"
    shutil.copyfile(sample("CT_small.dcm"), disguised)
    assert decode_image(disguised).source_format == "dicom"
    png_as_dcm = tmp_path / "image.dcm"
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(png_as_dcm, format="PNG")
    assert decode_image(png_as_dcm).source_format == "png"
    assert sniff_format(b"not an image at all") is None


# ----------------------------------------------------------------------------- Pillow formats

RNG = np.random.default_rng(1234)
GREY8 = RNG.integers(0, 256, (40, 60), dtype=np.uint8)
GREY16 = RNG.integers(0, 65536, (40, 60), dtype=np.uint16)
RGB8 = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)


def write(tmp_path: Path, name: str, image: Image.Image, fmt: str, **kw: object) -> Path:
    path = tmp_path / name
    image.save(path, format=fmt, **kw)
    return path


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("PNG", "g8.png"), ("TIFF", "g8.tif")],
)
def test_lossless_8bit_grey(tmp_path: Path, fmt: str, name: str) -> None:
    img = decode_image(write(tmp_path, name, Image.fromarray(GREY8), fmt))
    assert img.source_format == {"PNG": "png", "TIFF": "tiff"}[fmt]
    np.testing.assert_array_equal(img.pixels, GREY8.astype(np.float32))
    np.testing.assert_array_equal(img.display(), GREY8)  # 8-bit files show as saved


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "g16.png"), ("TIFF", "g16.tif")])
def test_lossless_16bit_grey(tmp_path: Path, fmt: str, name: str) -> None:
    img = decode_image(write(tmp_path, name, Image.fromarray(GREY16), fmt))
    np.testing.assert_array_equal(img.pixels, GREY16.astype(np.float32))
    assert img.display().dtype == np.uint8 and img.display().std() > 40


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "rgb.png"), ("TIFF", "rgb.tif")])
def test_lossless_rgb(tmp_path: Path, fmt: str, name: str) -> None:
    img = decode_image(write(tmp_path, name, Image.fromarray(RGB8), fmt))
    np.testing.assert_array_equal(img.pixels, RGB8.astype(np.float32))


def test_alpha_is_dropped(tmp_path: Path) -> None:
    rgba = np.dstack([RGB8, np.full((40, 60), 10, np.uint8)])
    img = decode_image(write(tmp_path, "rgba.png", Image.fromarray(rgba), "PNG"))
    np.testing.assert_array_equal(img.pixels, RGB8.astype(np.float32))
    la = Image.fromarray(GREY8).convert("LA")
    grey = decode_image(write(tmp_path, "la.png", la, "PNG"))
    np.testing.assert_array_equal(grey.pixels, GREY8.astype(np.float32))


def test_palette_images(tmp_path: Path) -> None:
    grey_palette = Image.fromarray(GREY8).convert("P")
    assert grey_palette.mode == "P"
    img = decode_image(write(tmp_path, "greypal.png", grey_palette, "PNG"))
    assert img.pixels.ndim == 2  # a grey palette gives a grey image
    colour = Image.fromarray(RGB8).quantize(16)
    img = decode_image(write(tmp_path, "pal.png", colour, "PNG"))
    np.testing.assert_array_equal(img.pixels, np.asarray(colour.convert("RGB"), np.float32))


def test_one_bit_and_float(tmp_path: Path) -> None:
    bits = decode_image(write(tmp_path, "b.png", Image.fromarray(GREY8 > 128), "PNG"))
    assert set(np.unique(bits.pixels)) <= {0.0, 255.0}
    values = RNG.normal(size=(20, 30)).astype(np.float32)
    img = decode_image(write(tmp_path, "f.tif", Image.fromarray(values), "TIFF"))
    np.testing.assert_array_equal(img.pixels, values)


@pytest.mark.parametrize("colour", [False, True])
def test_jpeg_grey_and_rgb(tmp_path: Path, colour: bool) -> None:
    yy, xx = np.mgrid[0:64, 0:96]
    smooth = ((xx * 2 + yy) % 256).astype(np.uint8)
    array = np.dstack([smooth, 255 - smooth, smooth // 2]) if colour else smooth
    img = decode_image(write(tmp_path, "x.jpg", Image.fromarray(array), "JPEG", quality=95))
    assert img.source_format == "jpeg" and img.pixels.shape == array.shape
    assert np.abs(img.pixels - array).mean() < 3


def test_multipage_tiff(tmp_path: Path) -> None:
    pages = [Image.fromarray(np.full((10, 12), v, np.uint8)) for v in (10, 20, 30)]
    path = tmp_path / "pages.tif"
    pages[0].save(path, format="TIFF", save_all=True, append_images=pages[1:])
    assert decode_image(path).n_frames == 3
    assert decode_image(path).pixels.mean() == 10  # first page by default
    assert decode_image(path, frame=2).pixels.mean() == 30
    with pytest.raises(ImageDecodeError, match="frame 3 does not exist"):
        decode_image(path, frame=3)


def test_decode_bytes_matches_decode_image(tmp_path: Path) -> None:
    path = write(tmp_path, "g.png", Image.fromarray(GREY8), "PNG")
    a = decode_bytes(path.read_bytes(), "in-memory.png")
    np.testing.assert_array_equal(a.pixels, decode_image(path).pixels)


def test_thumbnail_keeps_aspect_and_display(tmp_path: Path) -> None:
    img = decode_image(sample("US1_UNCR.dcm"))  # 640 x 480
    thumb = Image.open(io.BytesIO(make_thumbnail_png(img, 256)))
    assert thumb.format == "PNG" and thumb.size == (256, 192) and thumb.mode == "RGB"
    small = decode_image(sample("MR_small.dcm"))  # 64 x 64 is not enlarged
    assert Image.open(io.BytesIO(make_thumbnail_png(small))).size == (64, 64)
    mono1 = decode_image(sample("dicomdirtests/77654033/CR1/6154"))
    shown = np.asarray(Image.open(io.BytesIO(make_thumbnail_png(mono1))))
    np.testing.assert_array_equal(shown, mono1.display())
    with pytest.raises(ValueError):
        make_thumbnail_png(img, 0)


# ----------------------------------------------------------------------------- malformed input


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def _png_claiming(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + _png_chunk(b"IEND", b"")
    )


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def _dicom_edited(edit: Callable[[pydicom.Dataset], None]) -> bytes:
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    edit(ds)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def _set(**attrs: object) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        for key, value in attrs.items():
            if key == "TransferSyntaxUID":
                ds.file_meta.TransferSyntaxUID = value
            else:
                setattr(ds, key, value)

    return edit


def _drop_pixels(ds: pydicom.Dataset) -> None:
    del ds.PixelData


def _truncate_pixels(ds: pydicom.Dataset) -> None:
    ds.PixelData = ds.PixelData[:1000]


def _zip_of_png() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("inside.png", _encoded(GREY8, "PNG"))
    return out.getvalue()


def _float_with_nan() -> bytes:
    values = np.ones((8, 8), np.float32)
    values[2, 3] = np.nan
    return _encoded(values, "TIFF")


_PNG = _encoded(GREY8, "PNG")
_JPEG = _encoded(GREY8, "JPEG")
_TIFF = _encoded(GREY8, "TIFF")
_CT = sample("CT_small.dcm").read_bytes() if get_testdata_file("CT_small.dcm") else b""

MALFORMED: list[tuple[str, Callable[[], bytes], str]] = [
    ("empty.png", lambda: b"", "file is empty"),
    ("one_byte.dcm", lambda: b"\x00", "too short"),
    ("truncated.png", lambda: _PNG[: len(_PNG) // 2], "png data is truncated"),
    ("truncated.jpg", lambda: _JPEG[: len(_JPEG) // 2], "jpeg data is truncated"),
    ("truncated.tif", lambda: _TIFF[: len(_TIFF) // 2], "tiff data is truncated"),
    ("header_only.tif", lambda: _TIFF[:8], "tiff header is corrupt or truncated"),
    ("bomb.png", lambda: _png_claiming(100_000, 100_000), "too large: 100000x100000"),
    ("just_over.png", lambda: _png_claiming(12_000, 9_000), "too large: 12000x9000"),
    ("zero_width.png", lambda: _png_claiming(0, 10), "png header is corrupt"),
    ("garbage_after_soi.jpg", lambda: b"\xff\xd8\xff" + RNG.bytes(2000), "jpeg"),
    ("notes.png", lambda: b"Findings: none.\nImpression: normal.\n" * 5, "a text file"),
    ("random.dcm", lambda: RNG.bytes(5000), "not a supported image"),
    ("archive.png", _zip_of_png, "zip archive"),
    ("scan.dcm.gz", lambda: sample("zipMR.gz").read_bytes(), "gzip"),
    ("anim.gif", lambda: _encoded(GREY8, "GIF"), "gif image"),
    ("nan.tif", _float_with_nan, "nan"),
    ("no_pixels.dcm", lambda: _dicom_edited(_drop_pixels), "no pixel data"),
    ("short_pixels.dcm", lambda: _dicom_edited(_truncate_pixels), "pixel data is truncated"),
    ("bits12.dcm", lambda: _dicom_edited(_set(BitsAllocated=12)), "bits allocated value 12"),
    ("bits32.dcm", lambda: _dicom_edited(_set(BitsAllocated=32)), "bits allocated require"),
    ("rows0.dcm", lambda: _dicom_edited(_set(Rows=0)), "no pixels"),
    ("huge.dcm", lambda: _dicom_edited(_set(Rows=65535, Columns=65535)), "too large"),
    ("spp4.dcm", lambda: _dicom_edited(_set(SamplesPerPixel=4)), "samples per pixel"),
    ("ts.dcm", lambda: _dicom_edited(_set(TransferSyntaxUID="1.2.3.4")), "transfer syntax"),
    ("frames.dcm", lambda: _dicom_edited(_set(NumberOfFrames=10**6)), "truncated"),
    ("cut_in_header.dcm", lambda: _CT[:600], "no pixel data"),
    ("cut_in_pixels.dcm", lambda: _CT[: len(_CT) // 2], "pixel data is truncated"),
    ("dicm_then_noise.dcm", lambda: bytes(128) + b"DICM" + RNG.bytes(300), "dicom"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "make", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_files_raise_named_errors(
    tmp_path: Path, name: str, make: Callable[[], bytes], reason: str
) -> None:
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(ImageDecodeError) as info:
        decode_image(path)
    err = info.value
    assert err.path == str(path) and str(path) in str(err)
    assert str(err) == f"cannot read {path}: {err.reason}"
    assert reason in err.reason.lower(), err.reason


PYDICOM_BROKEN = [
    ("MR_truncated.dcm", "pixel data is truncated"),
    ("JPEG2000-embedded-sequence-delimiter.dcm", "compressed pixel data is corrupt"),
    ("emri_small_jpeg_2k_lossless_too_short.dcm", "no pixel data"),
    ("badVR.dcm", "dicom data is invalid"),
    ("rtplan.dcm", "no pixel data"),
    ("meta_missing_tsyntax.dcm", "no rows or columns"),
    ("crayons.icc", "not a supported image"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "reason"), PYDICOM_BROKEN, ids=[b[0] for b in PYDICOM_BROKEN])
def test_pydicom_broken_files(name: str, reason: str) -> None:
    path = sample(name)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(path)
    assert str(path) in str(info.value)
    assert reason in info.value.reason.lower(), info.value.reason


NOW_DECODED = ["JPEG-lossy.dcm", "JPGExtended.dcm", "bad_sequence.dcm",
               "JPEGLSNearLossless_08.dcm"]
"""12-bit JPEG Extended and JPEG-LS: refused before python-gdcm and pyjpegls were
installed (issue 15, docs/CODECS.md); tests/test_codecs.py covers every transfer syntax."""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", NOW_DECODED)
def test_files_once_refused_for_their_codec_decode(name: str) -> None:
    image = decode_image(sample(name))
    assert image.source_format == "dicom" and image.pixels.size > 0


def test_directory_missing_path_and_bad_frame(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="is a folder"):
        decode_image(tmp_path)
    missing = tmp_path / "nothing-here.dcm"
    with pytest.raises(ImageDecodeError, match="does not exist") as info:
        decode_image(missing)
    assert info.value.path == str(missing)
    with pytest.raises(ImageDecodeError, match="non-negative"):
        decode_image(sample("CT_small.dcm"), frame=-1)


def test_error_is_a_value_error_and_pickles() -> None:
    import pickle

    err = ImageDecodeError("/x/y.png", "file is empty")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.reason, str(again)) == (err.path, err.reason, str(err))
