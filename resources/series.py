"""Real image series for the demo: an MR brain study written as DICOM, from offline data.

The demo archive should look like a radiologist's: studies made of series made of slices,
not a heap of unrelated single pictures. No real CT or MR *volume* ships with pydicom-data
(its CT and MR files are single slices of different patients, one 10-frame MR and one
2-frame CT, all kept in the flat samples), so the series come from the one real 3-D MR
that installs offline: nilearn's MNI152 T1 template (ICBM 2009a, 197 x 233 x 189 voxels of
1 mm; an average of 152 brains, so no one's identity). It is written as one MR study with
three series (axial, coronal, sagittal), each slice an MR Image Storage instance with
consistent Study/Series/SOP/Frame of Reference UIDs, InstanceNumber, ImagePositionPatient,
ImageOrientationPatient, PixelSpacing, SliceThickness and SpacingBetweenSlices, so the
client groups them and the viewer can stack them exactly as it would a scanner's export.

Geometry: NIfTI stores world coordinates as RAS+, DICOM as LPS+ (x and y negated). Each
pixel's voxel is mapped through the template's affine, so positions and orientation are
derived, not assumed. UIDs are derived from fixed text (``pydicom.uid.generate_uid`` with
entropy sources): the same files every run, so re-importing the demo is a no-op.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

MNI_T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MAX_SLICES_PER_SERIES = 24
"""A series of 24 slices already scrolls like a real one; more only lengthens the import."""
MIN_SLICES_PER_SERIES = 3
COVERAGE = (0.18, 0.82)
"""The part of each axis the slices are spread over: inside it every slice shows brain
(outside, the template is mostly background and neighbouring slices look alike)."""
SAGITTAL_COVERAGE = (0.18, 0.5)
"""The template is left-right symmetric (``_sym_``): a sagittal slice and its mirror across
the midline hold the same pixels, two identical images. The sagittal series covers one
hemisphere, up to the midline."""
VALUE_SCALE = 4
"""The template's 8-bit intensities are stored x4 as 16-bit values, as an MR scanner's
would be (window presets and the feature extractor then see a realistic range)."""

PATIENT_NAME = "DEMO^MNI152 TEMPLATE"
PATIENT_ID = "DEMO-MNI152"
STUDY_DATE = "20240315"
STUDY_TIME = "093000"
STUDY_DESCRIPTION = "MRI BRAIN T1 (MNI152 template)"


class SeriesUnavailable(RuntimeError):
    """The data a series is made from is not installed (the ``samples`` extra)."""


@dataclass(frozen=True)
class Plane:
    """One series' slicing: ``axis`` of the volume held fixed, and how a pixel (row r,
    column c) of slice s maps to a voxel (i, j, k), the DICOM display convention
    (patient left on the image's right, anterior or superior up)."""

    name: str
    number: int
    axis: int
    voxel: Callable[[int, int, int, tuple[int, int, int]], tuple[int, int, int]]


def _axial(s: int, r: int, c: int, n: tuple[int, int, int]) -> tuple[int, int, int]:
    return (n[0] - 1 - c, n[1] - 1 - r, s)


def _coronal(s: int, r: int, c: int, n: tuple[int, int, int]) -> tuple[int, int, int]:
    return (n[0] - 1 - c, s, n[2] - 1 - r)


def _sagittal(s: int, r: int, c: int, n: tuple[int, int, int]) -> tuple[int, int, int]:
    return (s, n[1] - 1 - c, n[2] - 1 - r)


PLANES = (Plane("axial", 1, 2, _axial), Plane("coronal", 2, 1, _coronal),
          Plane("sagittal", 3, 0, _sagittal))


def mni_t1_path() -> Path:
    """The template file inside the installed nilearn package, found without importing
    nilearn (whose import pulls in scikit-learn and pandas: seconds, for one file)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise SeriesUnavailable("the demo's MR series need nilearn's MNI152 template: "
                                "pip install 'radcrypt[samples]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / MNI_T1_FILE
    if not path.is_file():
        raise SeriesUnavailable(f"nilearn is installed but its template {MNI_T1_FILE} is "
                                f"missing (looked in {path.parent})")
    return path


def load_mni_t1() -> tuple[np.ndarray, np.ndarray]:
    """(voxels as uint16, 4x4 RAS affine) of the MNI152 T1 template."""
    import nibabel

    image = nibabel.load(str(mni_t1_path()))
    data = np.asarray(image.dataobj, dtype=np.float64)  # type: ignore[attr-defined]
    if data.ndim != 3:
        raise SeriesUnavailable(f"{MNI_T1_FILE} is not a 3-D volume (shape {data.shape})")
    voxels = np.rint(np.clip(data, 0, None) * VALUE_SCALE).astype(np.uint16)
    return voxels, np.asarray(image.affine, dtype=np.float64)  # type: ignore[attr-defined]


def slices_per_series(budget: int) -> int:
    """How many slices each of the three series gets from a budget of images (0 when the
    budget cannot give every series ``MIN_SLICES_PER_SERIES``)."""
    per = min(MAX_SLICES_PER_SERIES, budget // len(PLANES))
    return per if per >= MIN_SLICES_PER_SERIES else 0


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["radcrypt-demo-series", *map(str, parts)]))


def _lps(affine: np.ndarray, voxel: tuple[int, int, int]) -> np.ndarray:
    ras = affine @ np.array([*voxel, 1.0])
    return np.array([-ras[0], -ras[1], ras[2]])


def _slice(volume: np.ndarray, plane: Plane, s: int) -> np.ndarray:
    """The 2-D image of slice ``s`` in display orientation (rows, columns)."""
    index: list[slice | int] = [slice(None)] * 3
    index[plane.axis] = s
    plain = volume[tuple(index)]  # the two remaining axes, in volume order
    # Every plane keeps the lower volume axis for the columns and the higher for the rows,
    # both reversed: patient left on the right, anterior or superior at the top (PLANES).
    return np.ascontiguousarray(plain[::-1, ::-1].T)


def _geometry(affine: np.ndarray, plane: Plane, s: int, shape: tuple[int, int, int]
              ) -> tuple[list[float], list[float], list[float]]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of one slice."""
    origin = _lps(affine, plane.voxel(s, 0, 0, shape))
    along_row = _lps(affine, plane.voxel(s, 0, 1, shape)) - origin  # next column
    along_col = _lps(affine, plane.voxel(s, 1, 0, shape)) - origin  # next row
    col_spacing, row_spacing = float(np.linalg.norm(along_row)), float(np.linalg.norm(along_col))
    orientation = [*(along_row / col_spacing), *(along_col / row_spacing)]
    return ([round(float(v), 4) for v in origin], [round(float(v), 6) for v in orientation],
            [round(row_spacing, 4), round(col_spacing, 4)])


def _along_normal(affine: np.ndarray, plane: Plane, s: int, shape: tuple[int, int, int]
                  ) -> float:
    position, orientation, _ = _geometry(affine, plane, s, shape)
    normal = np.cross(orientation[:3], orientation[3:])
    return float(np.dot(position, normal))


def _dataset(pixels: np.ndarray, plane: Plane, instance: int, position: list[float],
             orientation: list[float], spacing: list[float], step: float,
             window: tuple[float, float]) -> object:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    sop_uid = UID(_uid("mni152", plane.name, instance))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MR_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid("mni152", "study")
    ds.SeriesInstanceUID = _uid("mni152", plane.name, "series")
    ds.FrameOfReferenceUID = _uid("mni152", "frame-of-reference")
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = STUDY_TIME
    ds.StudyID = "1"
    ds.AccessionNumber = "DEMO0001"
    ds.Modality = "MR"
    ds.Manufacturer = "Radcrypt demo (nilearn MNI152 ICBM 2009a template)"
    ds.BodyPartExamined = "HEAD"
    ds.StudyDescription = STUDY_DESCRIPTION
    ds.SeriesDescription = f"T1 {plane.name} 1 mm"
    ds.SeriesNumber = plane.number
    ds.InstanceNumber = instance
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ImagePositionPatient = position
    ds.ImageOrientationPatient = orientation
    ds.PixelSpacing = spacing
    ds.SliceThickness = 1.0
    ds.SpacingBetweenSlices = round(step, 4)
    ds.SliceLocation = round(float(np.dot(position, np.cross(orientation[:3],
                                                                orientation[3:]))), 4)
    ds.WindowCenter, ds.WindowWidth = round(window[0], 1), round(window[1], 1)
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def write_mr_brain_study(dest: Path, budget: int) -> list[Path]:
    """Write the MNI152 T1 study (axial, coronal and sagittal series) into ``dest`` with at
    most ``budget`` slices in all, evenly spread over the brain; returns the files in
    series then instance order. Raises SeriesUnavailable without nilearn."""
    per = slices_per_series(budget)
    if per == 0:
        return []
    volume, affine = load_mni_t1()
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))):
        raise SeriesUnavailable(f"{MNI_T1_FILE} is not axis-aligned: its slices would not be "
                                "axial, coronal and sagittal")
    shape = (int(volume.shape[0]), int(volume.shape[1]), int(volume.shape[2]))
    brain = volume[volume > 0]
    lo, hi = np.percentile(brain, [1.0, 99.5])
    window = ((float(lo) + float(hi)) / 2, float(hi) - float(lo))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for plane in PLANES:
        n = shape[plane.axis]
        low, high = SAGITTAL_COVERAGE if plane.name == "sagittal" else COVERAGE
        positions = np.unique(np.linspace(low * n, high * n, per).astype(int))
        step = float(abs(affine[plane.axis, plane.axis])) * (
            float(np.mean(np.diff(positions))) if len(positions) > 1 else 1.0)
        # InstanceNumber follows the position along the slice normal (row direction x
        # column direction: foot to head, anterior to posterior, left to right), as a
        # scanner numbers a stack and as app.core.studies.slice_position orders one.
        ordered = sorted((int(s) for s in positions),
                         key=partial(_along_normal, affine, plane, shape=shape))
        for instance, s in enumerate(ordered, start=1):
            pixels = _slice(volume, plane, s)
            position, orientation, spacing = _geometry(affine, plane, s, shape)
            ds = _dataset(pixels, plane, instance, position, orientation, spacing, step,
                          window)
            out = dest / f"mni152-t1-{plane.name}-{instance:02d}.dcm"
            ds.save_as(out, enforce_file_format=True)  # type: ignore[attr-defined]
            written.append(out)
    return written


# ----------------------------------------------------------------------------- the demo

DEMO_SERIES_SHARE = 2
"""At most 1/DEMO_SERIES_SHARE of the demo's files are series slices; the rest are the
flat samples (other modalities, compressed transfer syntaxes, multi-frame files)."""
DEMO_QUERY_KINDS = ("noise", "window", "shift", "jpeg")
"""resources.samples.perturb_file's kinds that the demo queries with, in turn."""
SAMPLE_FRACTIONS = (0.6, 0.8, 0.4, 0.95, 0.25)
"""Where in a series the sample queries' slices lie, in turn (0 first slice, 1 last): the
middle of the brain first (ventricles, basal ganglia), then above, below, the edges."""


def demo_series_folder(workdir: Path) -> Path:
    """Where a demo folder holds the MR study (beside the flat samples, in archive/)."""
    return Path(workdir) / "archive" / "mr-brain"


def demo_files(workdir: Path, count: int) -> list[Path]:
    """The demo's ``count`` files, written under ``workdir/archive``: the MR brain study
    first (none when ``count`` is too small to give each series a few slices), then the
    offline sample set (resources.samples). Raises SeriesUnavailable without nilearn."""
    from resources.samples import export_sample_images

    series = write_mr_brain_study(demo_series_folder(workdir), count // DEMO_SERIES_SHARE)
    return series + export_sample_images(Path(workdir) / "archive", count - len(series))


def sample_query(workdir: Path, number: int) -> tuple[Path, Path] | None:
    """The ``number``-th "Try a sample query" of a demo folder: (query, original), the
    original a slice of the demo's MR study (the three series in turn, SAMPLE_FRACTIONS
    along each) and the query a perturbed copy of it (DEMO_QUERY_KINDS in turn) written
    under ``workdir/queries``; None when the demo holds no series (too few files)."""
    from resources.samples import perturb_file

    folder = demo_series_folder(workdir)
    stacks: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.dcm")) if folder.is_dir() else []:
        stacks.setdefault(path.stem.rsplit("-", 1)[0], []).append(path)  # by plane
    if not stacks:
        return None
    stack = list(stacks.values())[number % len(stacks)]
    fraction = SAMPLE_FRACTIONS[(number // len(stacks)) % len(SAMPLE_FRACTIONS)]
    original = stack[min(len(stack) - 1, round(fraction * (len(stack) - 1)))]
    kind = DEMO_QUERY_KINDS[number % len(DEMO_QUERY_KINDS)]
    return perturb_file(original, Path(workdir) / "queries", kind, seed=number), original
