"""What the viewer shows, without Qt: a stack of frames, its metadata, default windows per
modality, CT presets, orientation markers and the value under the cursor.

Why Qt-free: the clinical data model (studies, series, multi-frame instances; DESIGN §9)
will build stacks in app/core, and the rules here (which window a modality starts with, which
letter sits on which edge) are tested without a display. Radiology habits follow
../shared/CONVENTIONS.md: CT presets only for CT (they are Hounsfield windows), otherwise the
file's own window first, then a modality default; the order pydicom uses (modality LUT, then
window, then MONOCHROME1) stays in :class:`DecodedImage`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from app.core.client import robust_range
from app.core.meta import ImageMeta
from app.core.types import DecodedImage

# (name, width, centre): CONVENTIONS.md "Radiology habits", Hounsfield units, CT only
PRESETS = (
    ("Soft tissue", 400.0, 40.0),
    ("Lung", 1500.0, -600.0),
    ("Liver", 150.0, 90.0),
    ("Bone", 2500.0, 480.0),
    ("Brain", 80.0, 40.0),
)

FULL_RANGE_MODALITIES = frozenset({"US", "CR", "DX", "MG", "XA", "RF", "IO", "PX", "OT"})
"""Projection and ultrasound images are made to be seen whole: min..max, no percentile cut
(a percentile window would burn out a mammogram's skin line or an ultrasound's gain bar)."""

LOSSY_FORMATS = frozenset({"jpeg"})
"""Source formats that are lossy by construction (a baseline JPEG picture)."""


@dataclass(frozen=True)
class StackInfo:
    """Per-stack metadata for overlays and defaults; every field may be unknown ("" / None).

    ``orientation`` is ImageOrientationPatient (row then column direction cosines, 6 values);
    ``lossy`` is LossyImageCompression "01" (0028,2110) or a lossy source format.
    """

    modality: str = ""
    patient_name: str = ""
    patient_id: str = ""
    study_date: str = ""
    study_description: str = ""
    series_description: str = ""
    body_part: str = ""
    lossy: bool = False
    orientation: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, float] | None = None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source_format: str = "") -> StackInfo:
        """From DICOM keywords (a decoder's ``metadata`` dict or a pydicom Dataset): keys
        missing or malformed stay unknown rather than failing the viewer."""
        def text(key: str) -> str:
            value = meta.get(key, "")
            return "" if value is None else str(value).strip()

        return cls(
            modality=text("Modality").upper(),
            patient_name=text("PatientName").replace("^", " ").strip(),
            patient_id=text("PatientID"),
            study_date=_date(text("StudyDate")),
            study_description=text("StudyDescription"),
            series_description=text("SeriesDescription"),
            body_part=text("BodyPartExamined"),
            lossy=text("LossyImageCompression") == "01" or source_format in LOSSY_FORMATS,
            orientation=_floats(meta.get("ImageOrientationPatient"), 6),
            pixel_spacing=_pair(_floats(meta.get("PixelSpacing"), 2)),
        )

    @classmethod
    def of_image(cls, img: DecodedImage) -> StackInfo:
        """From a decoded image's tags; the patient, date, lossy and geometry tags come in
        ``display_tags`` where the decoder provides them (/work/p15-h8-decode.patch)."""
        tags = {**img.metadata, **getattr(img, "display_tags", {})}
        return cls.from_metadata(tags, img.source_format)


def _date(value: str) -> str:
    """DICOM DA (YYYYMMDD) as ISO 8601; anything else unchanged."""
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        parts: Sequence[Any] = value.strip("[]").replace(",", "\\").split("\\")
    elif isinstance(value, Sequence):
        parts = value
    else:
        return None
    try:
        numbers = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(np.isfinite(n) for n in numbers):
        return None
    return numbers


def _pair(values: tuple[float, ...] | None) -> tuple[float, float] | None:
    return None if values is None else (values[0], values[1])


@dataclass
class ImageStack:
    """Frames of one series or multi-frame instance, shown one at a time (slice n/N).

    ``frames`` are float32 arrays in modality units, (H, W) or (H, W, 3); ``template`` gives
    the display attributes they share (the file's window, MONOCHROME1, VOI function, display
    range). A stack made from decoded images keeps each one, VOI LUT included.
    """

    frames: Sequence[np.ndarray]
    info: StackInfo = field(default_factory=StackInfo)
    template: DecodedImage | None = None
    _images: dict[int, DecodedImage] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.frames) == 0:
            raise ValueError("a stack needs at least one frame")

    @classmethod
    def of_images(cls, images: Sequence[DecodedImage], info: StackInfo | None = None
                  ) -> ImageStack:
        """A stack of already decoded frames (the first one's metadata when ``info`` is
        not given)."""
        if not images:
            raise ValueError("a stack needs at least one frame")
        stack = cls([i.pixels for i in images], info or StackInfo.of_image(images[0]),
                    images[0])
        stack._images.update(enumerate(images))
        return stack

    def __len__(self) -> int:
        return len(self.frames)

    def has(self, index: int) -> bool:
        """Every frame of a decoded stack is at hand (see :class:`LazyStack`)."""
        return 0 <= index < len(self.frames)

    def image(self, index: int) -> DecodedImage:
        """Frame ``index`` as a DecodedImage (built once, then kept)."""
        if not 0 <= index < len(self.frames):
            raise IndexError(f"frame {index} is not in a stack of {len(self.frames)}")
        img = self._images.get(index)
        if img is None:
            pixels = np.asarray(self.frames[index], dtype=np.float32)
            t = self.template
            if t is None:
                img = DecodedImage(pixels=pixels, source_format="dicom",
                                   metadata={"Modality": self.info.modality})
            else:  # the VOI LUT image belongs to the template's own frame only
                img = replace(t, pixels=pixels, voi_lut_image=None)
            self._images[index] = img
        return img


SLICE_CACHE_BYTES = 384 * 1024**2
"""Most decoded slices (float32) a lazily loaded stack keeps: a 512 x 512 CT slice is 1 MiB,
so a few hundred slices; a longer series is decrypted again when scrolled back to."""


@dataclass(frozen=True)
class SliceRef:
    """Where one slice of an archived stack comes from: the stored object holding the
    original file (``original_id``) and the frame of it (None: a single-frame file)."""

    image_id: str
    original_id: str
    frame: int | None
    name: str = ""
    version: int | None = None

    @classmethod
    def of_meta(cls, meta: ImageMeta) -> SliceRef:
        """A frame of a multi-frame instance points at its instance's stored original."""
        return cls(meta.image_id, meta.original_image_id,
                   meta.frame if meta.frames > 1 else None, meta.name,
                   meta.key_version or None)


def stack_info(meta: ImageMeta) -> StackInfo:
    """Overlay data from an image's decrypted metadata (known before any slice decodes)."""
    return StackInfo.from_metadata({**meta.tags, **meta.clinical}, meta.source_format)


class LazyStack:
    """An archived series or multi-frame instance, shown as a stack whose slices are
    decrypted on demand (off the UI thread, by app/gui/viewer.py's ``SliceLoader``) and kept
    in a small LRU cache bounded by ``capacity_bytes``.

    Why not decrypt the whole series first: a CT series is hundreds of originals; the
    reader wants the slice under the cursor now and its neighbours next.
    """

    def __init__(self, refs: Sequence[SliceRef], info: StackInfo | None = None,
                 capacity_bytes: int = SLICE_CACHE_BYTES) -> None:
        if not refs:
            raise ValueError("a stack needs at least one slice")
        self.refs = tuple(refs)
        self.info = info or StackInfo()
        self.capacity_bytes = capacity_bytes
        self._cache: OrderedDict[int, DecodedImage] = OrderedDict()
        self._bytes = 0
        self.template: DecodedImage | None = None  # the first slice decoded

    @classmethod
    def of_metas(cls, metas: Sequence[ImageMeta],
                 capacity_bytes: int = SLICE_CACHE_BYTES) -> LazyStack:
        """The images of a series in stack order (app/core/studies.py ``image_order``)."""
        if not metas:
            raise ValueError("a stack needs at least one slice")
        return cls([SliceRef.of_meta(m) for m in metas], stack_info(metas[0]), capacity_bytes)

    @classmethod
    def of_frames(cls, meta: ImageMeta, capacity_bytes: int = SLICE_CACHE_BYTES
                  ) -> LazyStack:
        """Every frame of the multi-frame instance ``meta`` is a frame of."""
        original = meta.original_image_id
        refs = [SliceRef(meta.image_id if i == meta.frame else "", original, i, meta.name,
                         meta.key_version or None) for i in range(max(1, meta.frames))]
        return cls(refs, stack_info(meta), capacity_bytes)

    def __len__(self) -> int:
        return len(self.refs)

    def has(self, index: int) -> bool:
        return index in self._cache

    def image(self, index: int) -> DecodedImage:
        """Slice ``index`` if it is decoded (LookupError otherwise: ask the loader)."""
        img = self._cache.get(index)
        if img is None:
            raise LookupError(f"slice {index + 1} of {len(self.refs)} is not decrypted yet")
        self._cache.move_to_end(index)
        return img

    def put(self, index: int, img: DecodedImage, keep: int | None = None) -> None:
        """Cache slice ``index``; the least recently shown go first when over budget,
        never ``keep`` (the slice on screen) nor the one just added."""
        if not 0 <= index < len(self.refs):
            raise IndexError(f"slice {index} is not in a stack of {len(self.refs)}")
        old = self._cache.pop(index, None)
        if old is not None:
            self._bytes -= old.pixels.nbytes
        self._cache[index] = img
        self._bytes += img.pixels.nbytes
        if self.template is None:
            self.template = img
        for victim in list(self._cache):
            if self._bytes <= self.capacity_bytes:
                break
            if victim in (index, keep):
                continue
            self._bytes -= self._cache.pop(victim).pixels.nbytes

    @property
    def cached(self) -> list[int]:
        return sorted(self._cache)

    def missing(self, indices: Sequence[int]) -> list[int]:
        """The given slices (in range) not decoded yet, in the given order."""
        return [i for i in dict.fromkeys(indices)
                if 0 <= i < len(self.refs) and i not in self._cache]


Stack = ImageStack | LazyStack


def prefetch_order(index: int, count: int, direction: int, ahead: int = 4) -> list[int]:
    """Which slices to decrypt for a request of ``index``: it first, then ``ahead`` in the
    direction of scrolling, then one behind (a reader scrolls on, sometimes back)."""
    step = 1 if direction >= 0 else -1
    order = [index] + [index + step * n for n in range(1, ahead + 1)] + [index - step]
    return [i for i in order if 0 <= i < count]


def has_presets(img: DecodedImage, modality: str) -> bool:
    """CT presets are Hounsfield windows: for grey CT only."""
    return modality.upper() == "CT" and not img.is_rgb


def default_window(img: DecodedImage, modality: str = "") -> tuple[float, float] | None:
    """(centre, width) of the first display: the file's own window, else a modality default
    (CT soft tissue, US/CR/DX/MG full range, MR and the rest 1st..99th percentile); None for
    colour images, which are not windowed."""
    if img.is_rgb:
        return None
    if img.window is not None:
        return img.window
    modality = modality.upper() or str(img.metadata.get("Modality", "")).upper()
    if img.display_range is not None:
        lo, hi = img.display_range
    elif modality == "CT" and img.voi_lut_image is None:
        _, width, centre = PRESETS[0]
        return (centre, width)
    elif modality in FULL_RANGE_MODALITIES:
        lo, hi = float(np.min(img.pixels)), float(np.max(img.pixels))
    else:
        lo, hi = robust_range(img.pixels)
    if not hi > lo:
        hi = lo + 1.0
    return ((lo + hi) / 2.0, hi - lo)


def file_display(img: DecodedImage, window: tuple[float, float] | None) -> bool:
    """Whether ``window`` is what the file's own display shows (its VOI function, VOI LUT or
    display range), so that the renderer uses the file's pipeline rather than a plain linear
    window (which a modality default, e.g. an ultrasound's full range, is)."""
    if window is None:
        return True
    if img.window is not None:
        return window == img.window
    own = img.voi_lut_image is not None or img.display_range is not None
    return own and window == default_window(img)


# --- orientation markers ------------------------------------------------------------------

_AXES = (("L", "R"), ("P", "A"), ("H", "F"))  # patient +x, +y, +z (LPS) and their opposites


def direction_label(vector: Sequence[float] | np.ndarray, threshold: float = 0.3) -> str:
    """Letters for a patient-space direction, strongest axis first ("L", "LP", "FA"…)."""
    v = [float(x) for x in vector]
    order = sorted(range(3), key=lambda i: -abs(v[i]))
    letters = [
        _AXES[i][0 if v[i] > 0 else 1]
        for n, i in enumerate(order)
        if n == 0 or abs(v[i]) >= threshold
    ]
    return "".join(letters[:3])


def orientation_markers(orientation: Sequence[float] | None, rotation: int = 0,
                        flip_h: bool = False, flip_v: bool = False) -> dict[str, str]:
    """Edge letters {"left", "right", "top", "bottom"} for ImageOrientationPatient after the
    view's flips then clockwise rotation (the order ImageCanvas paints in); {} when unknown."""
    if orientation is None or len(orientation) != 6:
        return {}
    right = np.array(orientation[:3], dtype=float)  # direction of increasing column
    down = np.array(orientation[3:], dtype=float)  # direction of increasing row
    if not (np.linalg.norm(right) > 0.5 and np.linalg.norm(down) > 0.5):
        return {}
    if flip_h:
        right = -right
    if flip_v:
        down = -down
    for _ in range((rotation // 90) % 4):  # screen right becomes what was up, down what was right
        right, down = -down, right
    return {"right": direction_label(right), "left": direction_label(-right),
            "bottom": direction_label(down), "top": direction_label(-down)}


# --- value under the cursor -------------------------------------------------------------------

def value_text(img: DecodedImage, modality: str, column: int, row: int) -> str:
    """The pixel value at (column, row) in words: Hounsfield units for CT (the decoder applied
    the rescale), the modality value otherwise, R G B for colour; "" outside the image."""
    h, w = img.pixels.shape[:2]
    if not (0 <= column < w and 0 <= row < h):
        return ""
    value = img.pixels[row, column]
    where = f"({column}, {row})"
    if img.is_rgb:
        r, g, b = (round(float(v)) for v in value)
        return f"{where} RGB {r} {g} {b}"
    number = float(value)
    shown = f"{number:.0f}" if number.is_integer() or abs(number) >= 100 else f"{number:.2f}"
    if modality.upper() == "CT":
        return f"{where} {shown} HU"
    return f"{where} value {shown}"
