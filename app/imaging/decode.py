"""Decode DICOM, PNG, JPEG and TIFF files into one float image type, :class:`DecodedImage`.

Why one type: the feature extractor, the thumbnail writer and the viewer must not care where an
image came from. Why float32 in modality units: window/level is a display choice made later
(CT values stay in Hounsfield units, so a "soft tissue 400/40" preset means what a radiologist
expects), and the display pipeline follows pydicom's order: modality LUT (rescale) first, then
the VOI window or VOI LUT, then MONOCHROME1 inversion.

The format is sniffed from the content, never from the file name: hospital exports often have
no extension or a wrong one. Every failure becomes an :class:`ImageDecodeError` that names the
file; sizes are checked before pixels are decoded, so a decompression bomb is refused cheaply.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import struct
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from app.imaging.errors import ImageDecodeError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

MAX_PIXELS = 100_000_000
"""Largest frame accepted (rows x columns), so one bad file cannot exhaust memory."""

MAX_PIXEL_BYTES = 1024**3
"""Largest pixel data accepted (rows x columns x samples per pixel x bits allocated / 8 x
frames): a multi-frame file holds all its frames in memory, however few are shown."""

MAX_FILE_BYTES = 4 * 1024**3
"""Largest file read at all; decoding holds the whole file in memory."""

DEFLATED_HEADER_BYTES = 64 * 1024**2
"""Most a deflated DICOM data set may inflate to before its pixel data starts."""

DEFLATED_TRAILER_BYTES = 4 * 1024**2
"""Most a deflated DICOM data set may inflate to after its pixel data (padding, signatures)."""

DEFLATED_MAX_RATIO = 200
"""Most a deflated DICOM data set may grow when inflated, beyond DEFLATED_HEADER_BYTES.
Images deflate 2 to 20 times; zeros 1000 times: a file that declares a huge image and fills
it with nothing is refused even though its size agrees with its header."""

SUPPORTED = "not a supported image (PNG, JPEG, TIFF or DICOM)"
METADATA_KEYS = (
    "Modality",
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "Rows",
    "Columns",
    "PhotometricInterpretation",
)
"""The only tags copied out of a DICOM file: nothing that names or dates a patient."""

VIEWER_KEYS = (
    "PatientName",
    "PatientID",
    "StudyDate",
    "LossyImageCompression",
    "ImageOrientationPatient",
    "PixelSpacing",
)
"""Tags the viewer's overlays show (patient, date, LOSSY, orientation letters): kept apart
from ``metadata`` in ``display_tags``, which the importer never stores."""

_PERCENTILE_SAMPLES = 1 << 18

IN_DECODER_CHILD = False
"""Set by the decoder child (app/imaging/worker.py), which is single-threaded: GDCM then
decodes in a forked process of its own (a C++ exception it does not catch aborts the
process: found by tests/fuzz/test_file_fuzz.py with Bits Stored 1 on JPEG Lossless), and
its messages on file descriptor 2 are dropped. Off in-process, where forking or redirecting
stderr would disturb other threads."""

GDCM_LAST = "gdcm"
"""Plugins are tried in pydicom's order except GDCM, tried last: files that decoded before
python-gdcm was installed keep their exact pixels (same plugin), and GDCM, the least robust
against hostile input, only sees what nothing else decodes (JPEG Lossless, 12-bit JPEG)."""


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """One decoded frame, in modality units, with what is needed to display it.

    ``pixels`` is float32, (H, W) for grey or (H, W, 3) for RGB. ``window`` is the default
    (centre, width) from the DICOM VOI tags. ``display_range`` is the value range that maps
    to black..white when there is no window (e.g. (0, 255) for 8-bit PNG/JPEG, so a screenshot
    shows as it was saved); without either, display stretches the 1st..99th percentiles.
    ``voi_lut_image`` is the default VOI LUT already applied (values in [0, 1]), for the rare
    DICOM files that carry a VOI LUT instead of a window. ``eq=False``: arrays have no useful
    ``==``, so images compare by identity.
    """

    pixels: np.ndarray
    source_format: str
    window: tuple[float, float] | None = None
    monochrome1: bool = False
    n_frames: int = 1
    metadata: dict[str, str] = field(default_factory=dict)
    voi_function: str = "LINEAR"
    display_range: tuple[float, float] | None = None
    voi_lut_image: np.ndarray | None = field(default=None, repr=False)
    display_tags: dict[str, str] = field(default_factory=dict, repr=False)
    # The instance's clinical attributes (app/imaging/clinical.py), DICOM only; the frame's
    # own ImagePositionPatient for an enhanced multi-frame object that gives one per frame.
    clinical: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        p = self.pixels
        if p.dtype != np.float32 or not (p.ndim == 2 or (p.ndim == 3 and p.shape[2] == 3)):
            raise ValueError(f"pixels must be float32 (H, W) or (H, W, 3), got {p.dtype} {p.shape}")

    @property
    def is_rgb(self) -> bool:
        return self.pixels.ndim == 3

    @property
    def grey(self) -> np.ndarray:
        """Float32 (H, W): the pixels, or their luminance (Rec. 601, as Pillow's "L") for RGB."""
        return luminance(self.pixels)

    def normalised(self, window: tuple[float, float] | None = None) -> np.ndarray:
        """The display image as float32 in [0, 1] (white = 1), before quantisation to 8 bits.

        Order: the given window, else the default window, else the default VOI LUT, else the
        display range, else the 1st..99th percentiles; MONOCHROME1 is then inverted so that
        the minimum shows white. Features are computed from this, so a DICOM file and a PNG
        screenshot of its display look alike to the extractor.
        """
        x = self.pixels
        win = window if window is not None else self.window
        if win is not None:
            y = apply_window(x, win, self.voi_function if window is None else "LINEAR")
        elif self.voi_lut_image is not None:
            y = self.voi_lut_image.copy()  # callers may modify what they get
        else:
            lo, hi = self.display_range or robust_range(x)
            y = rescale_unit(x, lo, hi)
        if self.monochrome1:
            y = 1.0 - y
        return y.astype(np.float32, copy=False)

    def display(self, window: tuple[float, float] | None = None) -> np.ndarray:
        """uint8 (H, W) or (H, W, 3) ready to show; see :meth:`normalised` for the order."""
        return np.rint(self.normalised(window) * 255.0).astype(np.uint8)


def luminance(pixels: np.ndarray) -> np.ndarray:
    """Grey float32 image: unchanged for (H, W), Rec. 601 luma for (H, W, 3)."""
    if pixels.ndim == 2:
        return pixels.astype(np.float32, copy=False)
    p = pixels.astype(np.float32, copy=False)
    return (
        np.float32(0.299) * p[..., 0]
        + np.float32(0.587) * p[..., 1]
        + np.float32(0.114) * p[..., 2]
    )


def robust_range(x: np.ndarray) -> tuple[float, float]:
    """1st and 99th percentiles (min/max if those coincide), on at most 2^18 samples.

    Subsampling by a fixed stride keeps it deterministic and fast on 2000x2000 radiographs.
    """
    flat = x.reshape(-1)
    if flat.size > _PERCENTILE_SAMPLES:
        flat = flat[:: flat.size // _PERCENTILE_SAMPLES]
    lo, hi = np.percentile(flat, [1.0, 99.0])
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    return float(lo), float(hi)


_F32_SAFE = 1e37
"""Bounds beyond this (or a range whose reciprocal is below 1 / this) do not survive float32
arithmetic: a window of width 1e308 became an infinite bound, then 0 x inf = NaN pixels and a
feature extractor crash (found by tests/fuzz/test_file_fuzz.py). Such values are computed in
float64 instead; every real window stays on the (bit-identical) float32 path."""


def _f32_safe(*values: float) -> bool:
    return all(np.isfinite(v) and abs(v) < _F32_SAFE for v in values)


def rescale_unit(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map lo..hi linearly to 0..1 and clip; a constant image maps to 0."""
    if not hi > lo:
        return np.zeros(x.shape, dtype=np.float32)
    span = float(hi) - float(lo)
    if _f32_safe(lo, hi, span) and span > 1.0 / _F32_SAFE:
        y = (x.astype(np.float32, copy=False) - np.float32(lo)) * np.float32(1.0 / span)
    else:  # hostile bounds: float64, where they and their range stay finite
        scale = 1.0 / span if np.isfinite(span) else 0.0
        y = ((x.astype(np.float64) - float(lo)) * scale).astype(np.float32)
        y = np.nan_to_num(y, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(y, 0.0, 1.0, out=y)


def apply_window(
    x: np.ndarray, window: tuple[float, float], function: str = "LINEAR"
) -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) to [0, 1]: LINEAR, LINEAR_EXACT or SIGMOID."""
    centre, width = float(window[0]), float(window[1])
    if not (np.isfinite(centre) and np.isfinite(width)) or width <= 0:
        raise ValueError(f"invalid window centre {centre} / width {width}")
    xf = x.astype(np.float32, copy=False)
    if function == "SIGMOID":
        if not _f32_safe(centre, width):
            xf = x.astype(np.float64)
        with np.errstate(over="ignore"):  # exp overflows to inf: the sigmoid is then 0
            return (1.0 / (1.0 + np.exp(-4.0 * (xf - centre) / width))).astype(np.float32)
    if function == "LINEAR" and width > 1:
        lo = centre - 0.5 - (width - 1) / 2
        return rescale_unit(xf, lo, lo + width - 1)
    return rescale_unit(xf, centre - width / 2, centre + width / 2)


# ----------------------------------------------------------------------------- entry points


def decode_image(path: str | Path, frame: int | None = None) -> DecodedImage:
    """Decode the image file at ``path``; ``frame`` picks a frame of a multi-frame file.

    By default a multi-frame DICOM gives its middle frame (the most representative slice of
    a cine loop or volume); multi-page TIFF and animated PNG give their first page.
    """
    name = str(path)
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError as exc:
        raise ImageDecodeError(name, "file does not exist") from exc
    except OSError as exc:
        raise ImageDecodeError(name, f"cannot open the file ({exc.strerror or exc})") from exc
    if p.is_dir():
        raise ImageDecodeError(name, "it is a folder, not an image file")
    if not p.is_file():
        raise ImageDecodeError(name, "not a regular file")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageDecodeError(name, f"file too large: {st.st_size} bytes (limit 4 GiB)")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(name, f"cannot read the file ({exc.strerror or exc})") from exc
    return decode_bytes(data, name, frame)


def decode_bytes(data: bytes, name: str, frame: int | None = None) -> DecodedImage:
    """Decode in-memory file content; ``name`` is used in error messages only."""
    if not data:
        raise ImageDecodeError(name, "file is empty")
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or frame < 0):
        raise ImageDecodeError(name, f"frame must be a non-negative integer, not {frame!r}")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageDecodeError(name, unknown_content_reason(data))
    try:
        if fmt == "dicom":
            img = _decode_dicom(data, name, frame)
        else:
            img = _decode_pillow(data, name, fmt, frame)
    except ImageDecodeError:
        raise
    except MemoryError as exc:
        raise ImageDecodeError(name, "not enough memory to decode the image") from exc
    except Exception as exc:  # the last safety net: no library exception leaves this module
        raise ImageDecodeError(name, f"{fmt.upper()} data is corrupt ({short(exc)})") from exc
    if not np.isfinite(img.pixels).all():
        raise ImageDecodeError(name, "image contains NaN or infinite pixel values")
    return img


def decode_frames(data: bytes, name: str, limit: int) -> tuple[int, Iterator[DecodedImage]]:
    """(frames of the instance, an iterator over its first ``min(frames, limit)`` frames).

    Why: every frame of a multi-frame DICOM instance is a searchable image (DESIGN.md
    section 9), and parsing the file once per frame would cost a 120-frame cine loop 120
    parses. The data set is parsed once here and the frames are decoded one at a time as
    the iterator is advanced, so memory holds one decoded frame, not the whole volume.
    A single-frame file (and every PNG, JPEG or TIFF: their pages are not frames of an
    instance) gives exactly what ``decode_bytes(data, name)`` gives. A frame that fails
    raises ImageDecodeError from ``next()``: the caller decides what the frames already
    decoded are worth.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    if not data:
        raise ImageDecodeError(name, "file is empty")
    if sniff_format(data) != "dicom":
        return 1, iter((decode_bytes(data, name),))
    ds = _parse_dicom(data, name)
    try:
        n_frames = _pixel_attributes(ds, name)[4] if _has_pixels(ds) else 1
    except ImageDecodeError:
        n_frames = 1  # the decode below names what is wrong
    except Exception:
        n_frames = 1
    if n_frames == 1:
        return 1, iter((_checked(_guarded(lambda: _dicom_image(ds, name, None), name), name),))

    def frames() -> Iterator[DecodedImage]:
        for index in range(min(n_frames, limit)):
            yield _checked(_guarded(functools.partial(_dicom_image, ds, name, index), name),
                           name)

    return n_frames, frames()


def _has_pixels(ds: Dataset) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _guarded(decode: Callable[[], DecodedImage], name: str) -> DecodedImage:
    """``decode()`` with decode_bytes's error handling: only ImageDecodeError leaves."""
    try:
        return decode()
    except ImageDecodeError:
        raise
    except MemoryError as exc:
        raise ImageDecodeError(name, "not enough memory to decode the image") from exc
    except Exception as exc:
        raise ImageDecodeError(name, _dicom_reason(exc)) from exc


def _checked(img: DecodedImage, name: str) -> DecodedImage:
    if not np.isfinite(img.pixels).all():
        raise ImageDecodeError(name, "image contains NaN or infinite pixel values")
    return img


# ----------------------------------------------------------------------------- sniffing

_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN"
    b" UR US UT UV".split()
)


def sniff_format(data: bytes) -> str | None:
    """'dicom', 'png', 'jpeg', 'tiff' from the first bytes, or None.

    DICOM's marker is tested first: a DICOM preamble may itself hold a TIFF header (files
    that are both), and the file is then meant as DICOM.
    """
    if data[128:132] == b"DICM" or data.startswith(b"DICM"):
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    return "dicom" if _looks_like_raw_dicom(data) else None


def _looks_like_raw_dicom(data: bytes) -> bool:
    """A DICOM data set written without preamble and meta header (old ACR-NEMA style).

    It starts with a group 0002 or 0008 tag, followed by either a known VR (explicit VR) or
    a 4-byte length that fits in the file (implicit VR, little endian only).
    """
    if len(data) < 12:
        return False
    for endian in "<>":
        group, element = struct.unpack(endian + "HH", data[:4])
        if group not in (0x0002, 0x0008) or element > 0x00FF:
            continue
        if data[4:6] in _DICOM_VRS:
            return True
        (length,) = struct.unpack("<I", data[4:8])
        if endian == "<" and length < min(len(data), 1 << 16):
            return True
    return False


def unknown_content_reason(data: bytes) -> str:
    """Name what the content looks like, so the user knows what they dropped in."""
    if len(data) < 8:
        n = len(data)
        return f"file is too short to be an image ({n} byte{'s' if n != 1 else ''})"
    known = {
        b"PK\x03\x04": "a ZIP archive",
        b"\x1f\x8b": "a gzip-compressed file",
        b"%PDF": "a PDF document",
        b"GIF8": "a GIF image",
        b"\x00\x00\x00\x0cjP  ": "a JPEG 2000 file",
        b"\xffO\xffQ": "a JPEG 2000 codestream",
        b"RIFF": "a RIFF (WebP, AVI or WAV) file",
    }
    for magic, what in known.items():
        if data.startswith(magic):
            return f"{what}, {SUPPORTED}"
    head = data[:2048]
    if b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        if text and all(c.isprintable() or c in "\t\r\n\f" for c in text.rstrip("\ufffd")):
            return f"a text file, {SUPPORTED}"
    return SUPPORTED


def short(exc: BaseException, limit: int = 160) -> str:
    """First line of an exception message, cut to ``limit`` characters."""
    text = (str(exc).strip().splitlines() or [""])[0] or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def too_large(width: int, height: int) -> str:
    return f"image too large: {width}x{height} pixels (limit {MAX_PIXELS // 1_000_000} megapixels)"


def pixel_data_bytes(rows: int, cols: int, samples: int, bits: int, frames: int) -> int:
    """Bytes of native pixel data that these attributes declare (bits packed for 1-bit)."""
    return (rows * cols * samples * bits * frames + 7) // 8


def check_pixel_budget(name: str, rows: int, cols: int, samples: int, bits: int,
                       frames: int) -> int:
    """The declared pixel data size, or an ImageDecodeError if it is over the limits:
    a frame over MAX_PIXELS, or all frames together over MAX_PIXEL_BYTES."""
    if rows <= 0 or cols <= 0:
        raise ImageDecodeError(name, f"image has no pixels ({cols}x{rows})")
    if rows * cols > MAX_PIXELS:
        raise ImageDecodeError(name, too_large(cols, rows))
    if frames < 1 or frames > 1_000_000:
        raise ImageDecodeError(name, f"invalid Number of Frames value {frames}")
    size = pixel_data_bytes(rows, cols, samples, bits, frames)
    if size > MAX_PIXEL_BYTES:
        raise ImageDecodeError(
            name,
            f"image too large: {frames} frame(s) of {cols}x{rows} pixels, {samples} "
            f"sample(s) of {bits} bits, are {size // 1024**2} MiB of pixel data "
            f"(limit {MAX_PIXEL_BYTES // 1024**2} MiB)")
    return size


def _check_frame(name: str, frame: int, n_frames: int) -> None:
    if frame >= n_frames:
        raise ImageDecodeError(
            name, f"frame {frame} does not exist (the file has {n_frames} frame(s))"
        )


# ----------------------------------------------------------------------------- PNG, JPEG, TIFF

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}


def _decode_pillow(data: bytes, name: str, fmt: str, frame: int | None) -> DecodedImage:
    pil_format = _PIL_FORMATS[fmt]
    try:
        im = Image.open(io.BytesIO(data), formats=[pil_format])
    except Image.DecompressionBombError as exc:
        size = _declared_size(data, pil_format)
        reason = (
            too_large(*size)
            if size
            else f"image too large (limit {MAX_PIXELS // 10**6} megapixels)"
        )
        raise ImageDecodeError(name, reason) from exc
    except Exception as exc:
        raise ImageDecodeError(name, _pillow_reason(exc, fmt)) from exc
    with im:
        try:
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            index = 0 if frame is None else frame
            _check_frame(name, index, n_frames)
            if index:
                im.seek(index)
            width, height = im.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(name, f"image has no pixels ({width}x{height})")
            if width * height > MAX_PIXELS:
                raise ImageDecodeError(name, too_large(width, height))
            im.load()
            pixels, display_range = _pillow_pixels(_oriented(im))
        except ImageDecodeError:
            raise
        except MemoryError:
            raise
        except Exception as exc:
            raise ImageDecodeError(name, _pillow_reason(exc, fmt)) from exc
    h, w = pixels.shape[:2]
    return DecodedImage(
        pixels=pixels,
        source_format=fmt,
        n_frames=n_frames,
        display_range=display_range,
        metadata={
            "Rows": str(h),
            "Columns": str(w),
            "PhotometricInterpretation": "RGB" if pixels.ndim == 3 else "MONOCHROME2",
        },
    )


def _oriented(im: Image.Image) -> Image.Image:
    """The image turned upright as its EXIF orientation tag says (photos of screens, scans)."""
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception:  # a broken EXIF block must not hide a readable picture
        return im


def _declared_size(data: bytes, pil_format: str) -> tuple[int, int] | None:
    """Width and height from the header, without Pillow's bomb check (for the message)."""
    try:
        Image.init()  # make sure the format plugins are registered
        factory = Image.OPEN[pil_format][0]
        im = factory(io.BytesIO(data), "")
        width, height = im.size
        return int(width), int(height)
    except Exception:
        return None


def _pillow_pixels(im: Image.Image) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Float32 pixels and the natural display range of a loaded Pillow image; alpha dropped.

    8-bit images display as saved (range 0..255); 16-bit and float ones, whose useful range
    is unknown, get the percentile stretch.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return np.asarray(im).astype(np.float32), None
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(im.convert("L")).astype(np.float32), (0.0, 255.0)
    rgb = np.asarray(im.convert("RGB"))
    if (
        mode in ("P", "PA")
        and (rgb[..., 0] == rgb[..., 1]).all()
        and (rgb[..., 1] == rgb[..., 2]).all()
    ):
        return rgb[..., 0].astype(np.float32), (0.0, 255.0)  # a grey palette is a grey image
    return rgb.astype(np.float32), (0.0, 255.0)


def _pillow_reason(exc: BaseException, fmt: str) -> str:
    msg = str(exc).lower()
    what = fmt.upper()
    if "truncated" in msg or isinstance(exc, EOFError):
        return f"{what} data is truncated"
    if "cannot identify image file" in msg:
        return f"{what} header is corrupt or truncated"
    if "decoder" in msg and "not available" in msg:
        return f"unsupported {what} variant ({short(exc)})"
    return f"{what} data is corrupt ({short(exc)})"


# ----------------------------------------------------------------------------- DICOM

_TRUNCATED = re.compile(r"less than expected \((\d+) vs (\d+) bytes\)")


def _parse_dicom(data: bytes, name: str) -> Dataset:
    """The data set of a DICOM file (deflated ones inflated within their declared size)."""
    import pydicom  # imported lazily: 0.3 s that PNG users need not pay
    from pydicom.errors import InvalidDicomError

    if data.startswith(b"DICM"):
        data = bytes(128) + data  # meta header without the preamble: give pydicom one
    try:
        ds = _read_deflated(data, name) if data[128:132] == b"DICM" else None
        if ds is None:
            ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    except ImageDecodeError:
        raise
    except MemoryError:
        raise
    except InvalidDicomError as exc:
        raise ImageDecodeError(name, f"not a valid DICOM file ({short(exc)})") from exc
    except Exception as exc:
        raise ImageDecodeError(name, f"DICOM header is corrupt ({short(exc)})") from exc
    return ds


def _decode_dicom(data: bytes, name: str, frame: int | None) -> DecodedImage:
    ds = _parse_dicom(data, name)
    try:
        return _dicom_image(ds, name, frame)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageDecodeError(name, _dicom_reason(exc)) from exc


def _dicom_reason(exc: BaseException) -> str:
    msg = str(exc)
    m = _TRUNCATED.search(msg)
    if m:
        return (
            f"pixel data is truncated: {m.group(1)} of the {m.group(2)} bytes that its rows, "
            "columns, frames and bits allocated require"
        )
    if "all plugins are missing" in msg:
        return "unsupported compression (no decoder for it is installed)"
    if "exceptions were raised by all available plugins" in msg or "Unable to decode" in msg:
        return "compressed pixel data is corrupt or cannot be decoded"
    if "Missing required element" in msg:
        return f"a required image attribute is missing ({short(exc)})"
    return f"DICOM data is invalid ({short(exc)})"


def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    return int(value)


def _dicom_image(ds: Dataset, name: str, frame: int | None) -> DecodedImage:
    from pydicom.pixels import apply_color_lut

    pixel_keyword = next(
        (k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds),
        None,
    )
    if pixel_keyword is None:
        kind = _sop_class_name(ds)
        detail = f" (it is a {kind}" if kind else ""
        if "Image" in kind:
            detail += ": the file may be truncated"
        raise ImageDecodeError(
            name, "DICOM file has no pixel data" + (detail + ")" if detail else "")
        )
    rows, cols, spp, bits, n_frames = _pixel_attributes(ds, name)
    element = ds[pixel_keyword]
    if not element.is_undefined_length and rows * cols <= MAX_PIXELS:
        have = len(element.value or b"")
        need = pixel_data_bytes(rows, cols, spp, bits, n_frames)
        if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "YBR_FULL_422":
            need = need * 2 // 3  # two samples per pixel stored: chroma shared by pairs
        if have < need:  # native data: what the file lacks cannot be allocated
            raise ImageDecodeError(
                name, f"pixel data is truncated: {have} of the {need} bytes that its rows, "
                "columns, frames and bits allocated require")
    check_pixel_budget(name, rows, cols, spp, bits, n_frames)
    index = n_frames // 2 if frame is None else frame
    _check_frame(name, index, n_frames)
    _ensure_transfer_syntax(ds, name, pixel_keyword)

    arr = _frame_array(ds, name, index, n_frames, rows, cols, spp)
    expected = (rows, cols) if spp == 1 else (rows, cols, 3)
    if arr.shape != expected:  # e.g. a Number of Frames that the pixel data contradicts
        raise ImageDecodeError(
            name, f"pixel data decodes to an array of shape {arr.shape}, not the "
            f"{' x '.join(map(str, expected))} its rows, columns and samples declare")
    pi = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    window: tuple[float, float] | None = None
    voi_function = "LINEAR"
    voi_lut_image = None
    display_range: tuple[float, float] | None = None
    if arr.ndim == 2 and pi == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # RGB (pydicom already converted YBR), or a palette applied above
        max_value = _rgb_white(ds, arr, pi)
        pixels = np.ascontiguousarray(arr, dtype=np.float32)
        display_range = (0.0, max_value)
    else:
        pixels, window, voi_function, voi_lut_image = _grey_pipeline(ds, arr, index)
    h, w = pixels.shape[:2]
    metadata = {k: str(v) for k in METADATA_KEYS if (v := ds.get(k, None)) not in (None, "")}
    metadata.update({"Rows": str(h), "Columns": str(w)})
    display_tags = {k: str(v) for k in VIEWER_KEYS if (v := ds.get(k, None)) not in (None, "")}
    return DecodedImage(
        display_tags=display_tags,
        clinical=_frame_clinical(ds, index if n_frames > 1 else None),
        pixels=pixels,
        source_format="dicom",
        window=window,
        monochrome1=pi == "MONOCHROME1",
        n_frames=n_frames,
        metadata=metadata,
        voi_function=voi_function,
        display_range=display_range,
        voi_lut_image=voi_lut_image,
    )


_FRAME_GEOMETRY = (
    ("PlanePositionSequence", "ImagePositionPatient"),
    ("PlaneOrientationSequence", "ImageOrientationPatient"),
    ("PixelMeasuresSequence", "PixelSpacing"),
    ("PixelMeasuresSequence", "SliceThickness"),
)
"""Where an enhanced multi-frame object keeps the geometry a stack needs: per frame (or
shared) functional group macros instead of the top-level attributes."""


def _frame_clinical(ds: Dataset, index: int | None) -> dict[str, str]:
    """The clinical attributes of the instance, for frame ``index`` of a multi-frame one:
    its own position (and orientation, spacing, thickness where only the functional groups
    give them). A malformed functional group only loses the geometry, never the frame."""
    from app.imaging.clinical import clinical_attributes

    out = clinical_attributes(ds)
    if index is None:
        return out
    for macro, keyword in _FRAME_GEOMETRY:
        if keyword in out and keyword != "ImagePositionPatient":
            continue
        try:
            value = _functional_group_value(ds, index, macro, keyword)
        except Exception:  # an untrusted file's broken sequence
            continue
        if value is not None:  # as clinical_attributes writes a top-level value
            out.update(clinical_attributes({keyword: value}))
    return out


def _functional_group_value(ds: Dataset, index: int, macro: str, keyword: str) -> object:
    """``keyword`` of frame ``index``'s per-frame functional group macro, else the shared
    one's, else None."""
    for groups_keyword in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(groups_keyword)
        if not groups:
            continue
        if groups_keyword.startswith("PerFrame"):
            if index >= len(groups):
                continue
            item = groups[index]
        else:
            item = groups[0]
        seq = item.get(macro)
        if seq and keyword in seq[0]:
            return seq[0].get(keyword)
    return None


def _frame_array(ds: Dataset, name: str, index: int, n_frames: int, rows: int, cols: int,
                 spp: int) -> np.ndarray:
    """One frame's stored values, through pydicom's decoder plugins (docs/CODECS.md).

    The one exception is 12-bit JPEG Extended (Process 4), common in older CT and MR exports:
    pydicom's GDCM plugin refuses it outright and the only other plugin that can decode it,
    pylibjpeg-libjpeg, is GPL-3. GDCM itself decodes it (its IJG 12-bit codec), so such a
    frame goes straight to GDCM here, with the sizes already checked against the limits.
    Plugins are tried in pydicom's order, GDCM last (GDCM_LAST), GDCM isolated (_isolated)."""
    from pydicom.pixels import get_decoder, pixel_array
    from pydicom.uid import JPEGExtended12Bit

    ts = ds.file_meta.get("TransferSyntaxUID")
    bits_stored = _int_attr(ds, "BitsStored", None) or 0
    if ts == JPEGExtended12Bit and bits_stored > 8 and spp == 1 and _have_gdcm():
        return _isolated(name, lambda: _gdcm_jpeg12_frame(ds, name, index, n_frames, rows,
                                                         cols, bits_stored))
    frame = index if n_frames > 1 else None
    plugins = list(get_decoder(ts).available_plugins)
    if GDCM_LAST not in plugins:
        return pixel_array(ds, index=frame)
    plugins = [p for p in plugins if p != GDCM_LAST] + [GDCM_LAST]
    errors = []
    for plugin in plugins:
        try:
            if plugin == GDCM_LAST:
                return _isolated(name, lambda: pixel_array(ds, index=frame,
                                                           decoding_plugin=GDCM_LAST))
            return pixel_array(ds, index=frame, decoding_plugin=plugin)
        except (MemoryError, ImageDecodeError):
            raise
        except Exception as exc:
            errors.append(f"{plugin}: {short(exc)}")
    raise RuntimeError("Unable to decode as exceptions were raised by all available "
                       "plugins: " + "; ".join(errors))


def _isolated(name: str, decode: Callable[[], np.ndarray]) -> np.ndarray:
    """``decode()`` in a forked process when IN_DECODER_CHILD (see there), else here.

    The array comes back in .npy format (np.load without pickles); an exception comes back
    as its message; a crash (a signal) becomes an ImageDecodeError naming the codec's fault.
    """
    if not IN_DECODER_CHILD or not hasattr(os, "fork"):
        return decode()
    read_end, write_end = os.pipe()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the grandchild: decode, answer, exit without Python's cleanup
        os.close(read_end)
        code = 0
        try:
            with _codec_stderr_quiet():
                arr = decode()
            out = io.BytesIO()
            np.save(out, np.ascontiguousarray(arr), allow_pickle=False)
            payload = b"A" + out.getvalue()
        except ImageDecodeError as exc:
            payload = b"D" + exc.reason.encode("utf-8", "replace")
        except MemoryError:
            payload = b"M"
        except BaseException as exc:
            payload = b"E" + str(exc).encode("utf-8", "replace")
        try:
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) or not payload:
        how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exit status {os.WEXITSTATUS(status)}")
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9:
            raise MemoryError  # the kernel's OOM killer, as for the child itself
        raise ImageDecodeError(
            name, f"compressed pixel data is corrupt or cannot be decoded (the GDCM codec "
            f"failed on it: {how})")
    kind, body = payload[:1], payload[1:]
    if kind == b"A":
        return np.load(io.BytesIO(body), allow_pickle=False)
    if kind == b"D":
        raise ImageDecodeError(name, body.decode("utf-8", "replace"))
    if kind == b"M":
        raise MemoryError
    raise RuntimeError(body.decode("utf-8", "replace"))


def _have_gdcm() -> bool:
    try:
        import gdcm  # noqa: F401  (python-gdcm)
    except ImportError:
        return False
    return True


def _gdcm_jpeg12_frame(ds: Dataset, name: str, index: int, n_frames: int, rows: int,
                       cols: int, bits_stored: int) -> np.ndarray:
    """A grey 12-bit JPEG Extended frame decoded by GDCM: uint16, or int16 when signed."""
    import gdcm
    from pydicom.encaps import get_frame

    if bits_stored > 16 or _int_attr(ds, "BitsAllocated") != 16:
        raise ImageDecodeError(
            name, f"JPEG Extended with {bits_stored} bits stored in "
            f"{_int_attr(ds, 'BitsAllocated')} allocated is not a valid combination")
    if not ds["PixelData"].is_undefined_length:
        raise ImageDecodeError(name, "JPEG Extended pixel data is not encapsulated")
    src = get_frame(ds.PixelData, index, number_of_frames=n_frames)
    gdcm.Trace.WarningOff()  # GDCM tries its 8-bit codec first and says so on stderr
    gdcm.Trace.ErrorOff()
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((cols, rows, 1))
    image.SetDataElement(element)
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip()
    image.SetPhotometricInterpretation(
        gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.GetPIType(pi)))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(
        str(ds.file_meta.TransferSyntaxUID))))
    signed = _int_attr(ds, "PixelRepresentation", 0) == 1
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits_stored, bits_stored - 1, int(signed)))
    buffer = image.GetBuffer()
    if buffer is None:
        raise ImageDecodeError(name, "compressed pixel data is corrupt or cannot be decoded")
    raw = buffer.encode("utf-8", "surrogateescape")  # GDCM hands char* over as str
    if len(raw) != rows * cols * 2:
        raise ImageDecodeError(
            name, f"JPEG Extended frame decodes to {len(raw)} bytes, not the "
            f"{rows * cols * 2} its rows and columns require")
    arr = np.frombuffer(raw, dtype="<u2").reshape(rows, cols)
    if not signed:
        return arr & np.uint16((1 << bits_stored) - 1)
    shift = 16 - bits_stored  # sign-extend the stored bits (already so if GDCM did)
    return ((arr.astype(np.int16) << shift) >> shift).astype(np.int16)


@contextlib.contextmanager
def _codec_stderr_quiet() -> Iterator[None]:
    """File descriptor 2 points at /dev/null inside, when IN_DECODER_CHILD is set."""
    if not IN_DECODER_CHILD:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _pixel_attributes(ds: Dataset, name: str) -> tuple[int, int, int, int, int]:
    """Rows, columns, samples per pixel, bits allocated and frames, checked for sense."""
    rows, cols = _int_attr(ds, "Rows"), _int_attr(ds, "Columns")
    if rows is None or cols is None:
        raise ImageDecodeError(name, "DICOM image has no Rows or Columns attribute")
    if rows <= 0 or cols <= 0:
        raise ImageDecodeError(name, f"image has no pixels ({cols}x{rows})")
    if rows * cols > MAX_PIXELS:
        raise ImageDecodeError(name, too_large(cols, rows))
    bits = _int_attr(ds, "BitsAllocated")
    if bits not in (1, 8, 16, 32, 64):
        raise ImageDecodeError(name, f"unsupported Bits Allocated value {bits}")
    spp = _int_attr(ds, "SamplesPerPixel", 1)
    if spp not in (1, 3):
        raise ImageDecodeError(name, f"unsupported Samples per Pixel value {spp}")
    n_frames = max(1, _int_attr(ds, "NumberOfFrames", 1) or 1)
    return rows, cols, int(spp or 1), bits, n_frames


# Deflated Explicit VR Little Endian (PS3.5 A.5): the whole data set after the meta header is
# one raw deflate stream. pydicom inflates it whole, however large it says it is: 300 KB of
# zeros inflate to gigabytes. So it is inflated here, in steps, to no more than its header
# declares: the header is read from what has been inflated so far until the pixel data element
# is reached, and the rest may be only that element (as large as its rows, columns, samples,
# bits and frames require) and a small trailer.

_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)


def _read_deflated(data: bytes, name: str) -> Dataset | None:
    """The data set of a deflated file, inflated within its declared size; None if the file
    (with its 128-byte preamble and DICM marker) is not deflated."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_dataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    fp = DicomBytesIO(data)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.seek(132)
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return None
    inflated = _bounded_inflate(memoryview(data)[fp.tell():], name)
    body = DicomBytesIO(inflated)
    body.is_little_endian, body.is_implicit_VR = True, False
    ds = read_dataset(body, is_implicit_VR=False, is_little_endian=True)
    ds.file_meta = meta
    ds.set_original_encoding(False, True, ds._character_set)
    return ds


def _declared_end(prefix: bytes, name: str) -> int | None:
    """How far the whole data set may inflate, from the header found at the start of
    ``prefix``; None while the prefix ends before the top-level pixel data element."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    fp = DicomBytesIO(prefix)
    fp.is_little_endian, fp.is_implicit_VR = True, False

    def at_pixels(tag: int, vr: str | None, length: int) -> bool:
        return tag in _PIXEL_TAGS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a cut element warns before it fails
            header = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                                  stop_when=at_pixels)
    except Exception:
        return None  # cut inside an element: more is needed
    start = fp.tell()
    if len(prefix) < start + 12:
        return None
    tag = int.from_bytes(prefix[start : start + 2], "little") << 16 | int.from_bytes(
        prefix[start + 2 : start + 4], "little")
    if tag not in _PIXEL_TAGS:
        return None
    rows, cols, spp, bits, frames = _pixel_attributes(header, name)
    size = check_pixel_budget(name, rows, cols, spp, bits, frames)
    return start + 12 + size + 1 + DEFLATED_TRAILER_BYTES


def _bounded_inflate(compressed: memoryview, name: str) -> bytes:
    """Inflate a raw deflate stream, refusing it once it grows past what its DICOM header
    declares (or past DEFLATED_HEADER_BYTES before the pixel data element is reached)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending: bytes | memoryview = compressed
    limit: int | None = None  # unknown until the header is read
    ratio_cap = max(DEFLATED_HEADER_BYTES, DEFLATED_MAX_RATIO * len(compressed))
    next_look = 256 * 1024
    while True:
        cap = min(limit, ratio_cap + 1) if limit is not None else DEFLATED_HEADER_BYTES
        room = cap - len(out)
        try:
            chunk = inflater.decompress(pending, max(1, min(room + 1, 16 * 1024**2)))
        except zlib.error as exc:
            raise ImageDecodeError(name, f"deflated DICOM data is corrupt ({short(exc)})"
                                   ) from exc
        pending = inflater.unconsumed_tail
        out += chunk
        ended = inflater.eof or (not chunk and not pending)
        if limit is None and (len(out) >= next_look or ended):
            limit = _declared_end(bytes(out), name)
            next_look = len(out) * 4
        if limit is not None and len(out) > limit:
            raise ImageDecodeError(
                name, "deflated DICOM data inflates to more than its header declares "
                f"(over {limit // 1024**2 or 1} MiB): refused as a decompression bomb")
        if len(out) > ratio_cap:
            raise ImageDecodeError(
                name, f"deflated DICOM data inflates more than {DEFLATED_MAX_RATIO} times "
                f"its size ({len(compressed)} bytes to over {ratio_cap // 1024**2} MiB): "
                "refused as a decompression bomb")
        if limit is None and len(out) > DEFLATED_HEADER_BYTES:
            raise ImageDecodeError(
                name, "deflated DICOM header inflates to more than "
                f"{DEFLATED_HEADER_BYTES // 1024**2} MiB before its pixel data: refused as "
                "a decompression bomb")
        if ended:
            return bytes(out)


def _rgb_white(ds: Dataset, arr: np.ndarray, pi: str) -> float:
    """The value that displays as full intensity in an RGB frame.

    Palettes declare 16-bit entries but some files store 8-bit values in them: an 8-bit
    white is used when no entry exceeds 255.
    """
    if pi == "PALETTE COLOR" or arr.dtype.kind not in "ui":
        peak = float(arr.max())
        return 255.0 if peak <= 255 else (65535.0 if peak <= 65535 else peak)
    bits_stored = _int_attr(ds, "BitsStored", None) or arr.dtype.itemsize * 8
    return float(2 ** min(bits_stored, arr.dtype.itemsize * 8) - 1)


def _grey_pipeline(
    ds: Dataset, arr: np.ndarray, index: int
) -> tuple[np.ndarray, tuple[float, float] | None, str, np.ndarray | None]:
    """Modality LUT or rescale, then the default VOI (window, or VOI LUT applied)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, _module_source(ds, index, "PixelValueTransformationSequence"))
    pixels = np.ascontiguousarray(values, dtype=np.float32)
    voi = _module_source(ds, index, "FrameVOILUTSequence")
    window = _first_window(voi)
    function = str(voi.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    voi_lut_image = None
    if window is None and voi.get("VOILUTSequence"):
        try:
            out = np.asarray(
                apply_voi_lut(np.asarray(values), voi, prefer_lut=True), dtype=np.float32
            )
            voi_lut_image = rescale_unit(out, float(out.min()), float(out.max()))
        except Exception:  # a broken VOI LUT only loses the default display
            voi_lut_image = None
    return pixels, window, function, voi_lut_image


def _module_source(ds: Dataset, index: int, group_sequence: str) -> Dataset:
    """Where a module's attributes live: the data set itself, or (enhanced multi-frame
    objects) the per-frame or shared functional group item for this frame."""
    if group_sequence == "PixelValueTransformationSequence":
        own = "RescaleSlope" in ds or "ModalityLUTSequence" in ds
    else:
        own = "WindowCenter" in ds or "VOILUTSequence" in ds
    if own:
        return ds
    for groups_keyword in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(groups_keyword)
        if not groups:
            continue
        item = (
            groups[index]
            if groups_keyword.startswith("PerFrame") and index < len(groups)
            else groups[0]
        )
        seq = item.get(group_sequence)
        if seq:
            return seq[0]
    return ds


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    """The first (centre, width) pair, if present and usable."""
    try:
        centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if centre is None or width is None:
            return None
        c = float(centre[0] if _is_multi(centre) else centre)
        w = float(width[0] if _is_multi(width) else width)
    except (TypeError, ValueError, IndexError):
        return None
    if not (np.isfinite(c) and np.isfinite(w)) or w <= 0:
        return None
    return (c, w)


def _is_multi(value: object) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


def _sop_class_name(ds: Dataset) -> str:
    try:
        uid = ds.get("SOPClassUID")
        if uid is None:
            return ""
        name = str(getattr(uid, "name", "") or "")
        return "" if name == str(uid) else name
    except Exception:
        return ""


def _ensure_transfer_syntax(ds: Dataset, name: str, pixel_keyword: str) -> None:
    """Check that the pixel data can be decoded here; infer the transfer syntax of files
    without a meta header from how pydicom read them (only possible if uncompressed)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.pixels import get_decoder
    from pydicom.uid import (
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    ts = meta.get("TransferSyntaxUID")
    if not ts:
        if ds[pixel_keyword].is_undefined_length:
            raise ImageDecodeError(
                name, "compressed pixel data without a Transfer Syntax UID: the codec is unknown"
            )
        implicit, little = getattr(ds, "original_encoding", (None, None))
        if implicit is None or little is None:
            raise ImageDecodeError(name, "DICOM file does not say how its pixel data is encoded")
        ts = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
        meta.TransferSyntaxUID = ts
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        label = getattr(ts, "name", "") or str(ts)
        raise ImageDecodeError(name, f"unsupported transfer syntax {label}") from exc
    if not decoder.is_available:
        label = getattr(ts, "name", "") or str(ts)
        raise ImageDecodeError(
            name, f"unsupported compression: {label} (no decoder for it is installed)"
        )
