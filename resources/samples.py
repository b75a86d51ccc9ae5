"""Real sample images for demos, tests and benchmarks, from offline data only.

The images are pydicom's and pydicom-data's test files (installed with the ``samples`` or
``dev`` extra; nothing is downloaded). ``sample_files.json`` beside this module lists the
test files that our decoder reads, so tests do not rescan 260 files each run; regenerate it
with ``python -m resources.samples --refresh`` after upgrading pydicom, pydicom-data or the
decoder.

pydicom 3.0.2 with pydicom-data 1.0.0 give 248 images distinct by the export's rule (feature
distance at least 1e-6): 79 of the 145 decodable files (the rest are the same pixels in
another transfer syntax) and 169 further frames of the multi-frame files. That is short of
300, so :func:`export_sample_images` goes on with crops (quadrants and centre) of the larger
single-frame pictures, which show other parts of the anatomy (342 images in all). Many of
these are still near-duplicates to the eye (lossy copies of one picture, neighbouring cine
frames): only about 250 differ by more than 2% RMS (:func:`same_picture`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from app.imaging.decode import DecodedImage, decode_image, luminance, robust_range
from app.imaging.errors import ImageDecodeError
from app.imaging.features import extract_features

SAMPLE_LIST = Path(__file__).with_name("sample_files.json")
PERTURBATIONS = ("noise", "window", "shift", "jpeg", "rotate")
DUPLICATE_DISTANCE = 1e-6
"""Two exported images whose feature vectors are closer than this count as one."""

_CROP_MIN_SIDE = 256


# ----------------------------------------------------------------------------- source files


def _testdata_index() -> dict[str, Path]:
    """Every pydicom test file under a stable name: its path below pydicom's ``test_files``
    folder, or its file name in pydicom-data's (flat) store."""
    from pydicom.data import get_testdata_files
    from pydicom.data.data_manager import DATA_ROOT

    root = Path(DATA_ROOT) / "test_files"
    index: dict[str, Path] = {}
    for name in get_testdata_files():
        path = Path(name)
        key = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        if key in index:
            raise RuntimeError(f"two pydicom test files are both named {key!r}")
        index[key] = path
    return index


def _scan_decodable() -> list[str]:
    """Names of the test files that decode_image reads, sorted: the slow full scan."""
    names = []
    for key, path in sorted(_testdata_index().items()):
        if not path.is_file():
            continue
        try:
            decode_image(path)
        except ImageDecodeError:
            continue
        names.append(key)
    return names


def refresh_sample_list() -> list[str]:
    """Rescan the test files and rewrite ``sample_files.json``; returns the names."""
    import pydicom

    names = _scan_decodable()
    doc = {
        "about": "pydicom test files that app.imaging decodes; "
        "regenerate with: python -m resources.samples --refresh",
        "pydicom": pydicom.__version__,
        "files": names,
    }
    SAMPLE_LIST.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return names


def decodable_dicom_files() -> list[Path]:
    """Paths of the pydicom test files in ``sample_files.json``, in its (sorted) order.

    Raises FileNotFoundError if any is missing here (pydicom-data not installed, or a
    version with other files), rather than silently testing on fewer images.
    """
    names: list[str] = json.loads(SAMPLE_LIST.read_text(encoding="utf-8"))["files"]
    index = _testdata_index()
    missing = [n for n in names if n not in index or not index[n].is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(names)} sample files listed in {SAMPLE_LIST.name} "
            f"are missing (first: {missing[0]}); install pydicom-data (pip install -e "
            "'.[samples]') or run: python -m resources.samples --refresh"
        )
    return [index[n] for n in names]


# ----------------------------------------------------------------------------- export


def same_picture(a: DecodedImage, b: DecodedImage, tolerance: float = 0.02) -> bool:
    """True if two images show one picture: the same aspect ratio and display luminance
    within ``tolerance`` RMS (of the 0..1 range) once both are box-averaged to the smaller
    size; e.g. a file, its lossy JPEG 2000 copy and a half-size copy.

    Works on pixels, not on features, so tests can use it to build a fair test set for the
    feature extractor without judging the extractor by itself.
    """
    (ha, wa), (hb, wb) = a.pixels.shape[:2], b.pixels.shape[:2]
    if abs(ha * wb - hb * wa) > 0.02 * max(ha * wb, hb * wa):
        return False
    size = (min(wa, wb), min(ha, hb))
    la, lb = (
        np.asarray(
            Image.fromarray(luminance(img.normalised())).resize(size, Image.Resampling.BOX),
            dtype=np.float64,
        )
        for img in (a, b)
    )
    return float(np.sqrt(np.mean(np.square(la - lb)))) < tolerance


def distinct_sample_files(count: int) -> list[Path]:
    """The first ``count`` sample files (sample_files.json order) that show distinct
    pictures: a file showing the same picture as an earlier one (:func:`same_picture`) is
    skipped. The fixed test set of the extractor's robustness test and of the similarity
    bench; fewer than ``count`` when the samples run out."""
    chosen: list[Path] = []
    pictures: list[DecodedImage] = []
    for path in decodable_dicom_files():
        img = decode_image(path)
        if any(same_picture(img, other) for other in pictures):
            continue
        chosen.append(path)
        pictures.append(img)
        if len(chosen) == count:
            break
    return chosen


@dataclass(frozen=True)
class _Candidate:
    """One image to export: a file to copy (``frame`` and ``crop`` None) or a rendering."""

    label: str
    source: Path
    image: DecodedImage
    frame: int | None = None
    crop: tuple[int, int, int, int] | None = None  # top, left, height, width


def _crop(img: DecodedImage, box: tuple[int, int, int, int]) -> DecodedImage:
    top, left, h, w = box
    voi = img.voi_lut_image
    return replace(
        img,
        pixels=np.ascontiguousarray(img.pixels[top : top + h, left : left + w]),
        voi_lut_image=None if voi is None else voi[top : top + h, left : left + w],
    )


def _candidates(files: list[Path]) -> Iterator[_Candidate]:
    """Copies first, then the other frames of multi-frame files, then crops (quadrants and
    centre) of the larger single-frame pictures; lazily, so small exports stay fast."""
    names = {p: k for k, p in _testdata_index().items()}

    def label(path: Path) -> str:
        return names[path].rsplit(".", 1)[0].replace("/", "-") if path in names else path.stem

    decoded: list[tuple[Path, DecodedImage]] = []
    for path in files:
        img = decode_image(path)
        decoded.append((path, img))
        yield _Candidate(label(path), path, img)
    for path, img in decoded:
        for frame in range(img.n_frames):
            if frame != img.n_frames // 2:
                frame_img = decode_image(path, frame=frame)
                yield _Candidate(f"{label(path)}-f{frame:03d}", path, frame_img, frame)
    pictures: list[DecodedImage] = []
    for path, img in decoded:
        h, w = img.pixels.shape[:2]
        if img.n_frames > 1 or min(h, w) < _CROP_MIN_SIDE:
            continue
        if any(same_picture(img, other) for other in pictures):
            continue  # crops of a lossy copy would repeat the crops of its original
        pictures.append(img)
        ch, cw = h // 2, w // 2
        corners = [
            (0, 0),
            (0, w - cw),
            (h - ch, 0),
            (h - ch, w - cw),
            ((h - ch) // 2, (w - cw) // 2),
        ]
        for i, (top, left) in enumerate(corners):
            box = (top, left, ch, cw)
            yield _Candidate(f"{label(path)}-crop{i}", path, _crop(img, box), None, box)


_RENDER_FORMATS = ("png", "tiff", "jpeg")
_EXT = {"png": ".png", "tiff": ".tif", "jpeg": ".jpg"}


def _write_rendering(img: DecodedImage, fmt: str, dest: Path) -> None:
    """The display image (default window) as 8-bit PNG/JPEG or 16-bit TIFF (grey only:
    Pillow cannot write 16-bit RGB)."""
    y = img.normalised()
    if fmt == "tiff" and y.ndim == 2:
        pil = Image.fromarray(np.rint(y * 65535).astype(np.uint16))
        pil.save(dest, format="TIFF", compression="tiff_deflate")
        return
    pil = Image.fromarray(np.rint(y * 255).astype(np.uint8))
    if fmt == "jpeg":
        pil.save(dest, format="JPEG", quality=92)
    else:
        pil.save(dest, format="TIFF" if fmt == "tiff" else "PNG")


def _is_duplicate(vec: np.ndarray, others: list[np.ndarray]) -> bool:
    if not others:
        return False
    return bool(np.min(np.sum((np.asarray(others) - vec) ** 2, axis=1)) < DUPLICATE_DISTANCE**2)


def export_sample_images(dest: Path, count: int = 300) -> list[Path]:
    """Write ``count`` distinct real images into ``dest`` and return their paths in order.

    Order and names are deterministic (``000_<name>.dcm``, ...): copies of the decodable DICOM
    files, then PNG / 16-bit TIFF / JPEG renderings (in turn) of the other frames of the
    multi-frame files, then renderings of crops. An image is skipped if its features, or
    those of the file written, are within ``DUPLICATE_DISTANCE`` of an earlier one (the same
    image stored with another transfer syntax, or a blank crop). Raises RuntimeError if the
    sources cannot supply ``count`` images.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    kept: list[Path] = []
    source_features: list[np.ndarray] = []
    file_features: list[np.ndarray] = []
    renders = 0
    for cand in _candidates(decodable_dicom_files()):
        if len(kept) >= count:
            break
        vec = extract_features(cand.image)
        if _is_duplicate(vec, source_features):
            continue
        prefix = f"{len(kept):03d}_{cand.label}"
        if cand.frame is None and cand.crop is None:
            out = dest / f"{prefix}.dcm"
            shutil.copyfile(cand.source, out)
        else:
            fmt = _RENDER_FORMATS[renders % len(_RENDER_FORMATS)]
            out = dest / f"{prefix}{_EXT[fmt]}"
            _write_rendering(cand.image, fmt, out)
        written = extract_features(decode_image(out))
        if _is_duplicate(written, file_features):
            out.unlink()
            continue
        renders += cand.frame is not None or cand.crop is not None
        kept.append(out)
        source_features.append(vec)
        file_features.append(written)
    if len(kept) < count:
        raise RuntimeError(f"only {len(kept)} distinct sample images are available, not {count}")
    return kept


# ----------------------------------------------------------------------------- perturbations


def _implied_window(img: DecodedImage) -> tuple[float, float]:
    """The (centre, width) that the default display amounts to."""
    if img.window is not None:
        return img.window
    lo, hi = img.display_range or robust_range(img.pixels)
    if hi <= lo:
        hi = lo + 1.0
    return ((lo + hi) / 2, hi - lo)


def _shift(y: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate by (dy, dx) pixels, filling the uncovered border with black."""
    out = np.zeros_like(y)
    h, w = y.shape[:2]
    src = y[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def perturb_file(src: Path, dest_dir: Path, kind: str, seed: int) -> Path:
    """Write a perturbed copy of ``src`` into ``dest_dir`` and return its path.

    Kinds (each from the default display image, a new file a user might query with):
    "noise" Gaussian noise with sigma 2% of the display range; "window" another window/level
    (centre moved by 3-10% of the width, width scaled by 0.78-0.90 or 1.11-1.28);
    "shift" 3% of the width and height in random directions; "rotate" 3 degrees either way;
    these four as 8-bit PNG; "jpeg" re-encoded at quality 75.
    """
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r} (known: {', '.join(PERTURBATIONS)})")
    src = Path(src)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    img = decode_image(src)
    rng = np.random.default_rng(seed)
    sign = float(rng.choice([-1.0, 1.0]))
    y = img.normalised()
    if kind == "noise":
        y = np.clip(y + rng.normal(0.0, 0.02, y.shape), 0.0, 1.0)
    elif kind == "window":
        centre, width = _implied_window(img)
        new_centre = centre + sign * rng.uniform(0.03, 0.10) * width
        new_width = width * float(np.exp(float(rng.choice([-1.0, 1.0])) * rng.uniform(0.10, 0.25)))
        y = img.normalised(window=(new_centre, new_width))
    elif kind == "shift":
        h, w = y.shape[:2]
        dy = round(0.03 * h) * int(rng.choice([-1, 1]))
        dx = round(0.03 * w) * int(sign)
        y = _shift(y, dy, dx)
    pixels = np.rint(y * 255).astype(np.uint8)
    pil = Image.fromarray(pixels)
    if kind == "rotate":
        black = 0 if pixels.ndim == 2 else (0, 0, 0)
        pil = pil.rotate(3.0 * sign, resample=Image.Resampling.BILINEAR, fillcolor=black)
    suffix = ".jpg" if kind == "jpeg" else ".png"
    out = dest_dir / f"{src.stem}-{kind}-{seed}{suffix}"
    if kind == "jpeg":
        pil.save(out, format="JPEG", quality=75)
    else:
        pil.save(out, format="PNG")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resources.samples", description=__doc__)
    parser.add_argument(
        "--refresh", action="store_true", help="rescan and rewrite sample_files.json"
    )
    parser.add_argument("--export", type=Path, metavar="DIR", help="export sample images to DIR")
    parser.add_argument("--count", type=int, default=300, help="how many images to export")
    args = parser.parse_args(argv)
    if args.refresh:
        names = refresh_sample_list()
        print(f"{len(names)} decodable files listed in {SAMPLE_LIST}")
    if args.export:
        paths = export_sample_images(args.export, args.count)
        print(f"{len(paths)} images written to {args.export}")
    if not (args.refresh or args.export):
        parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
