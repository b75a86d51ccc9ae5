"""Real CT and MR series for the study-list, grouped-results and stack tests.

pydicom-data ships single slices of different patients plus one 10-frame MR (emri_small):
its frames are written here as ten single-frame instances of one series (consistent Study,
Series and SOP Instance UIDs, InstanceNumber, ImagePositionPatient), so the archive holds a
real MR series whose slices differ. The CT study holds pydicom's real CT slices (CT_small
and the 512 x 512 693 slice, uncompressed: not lossy JPEG 2000). The MNI152 T1 brain study
of the demo (resources/series.py, nilearn's template) is added where it is installed.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_SERIES_SLICES = 10


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=["radcrypt-h3-tests", *parts]))


def write_mr_series(dest: Path) -> list[Path]:
    """emri_small.dcm's ten real MR frames as one series of ten instances."""
    source = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    frames = source.pixel_array
    study, series = _uid("mr-study"), _uid("mr-series")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(frames.shape[0]):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))  # a real MR header
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = _uid("mr", str(i))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PatientName, ds.PatientID = "Mouse^Minnie", "H3-MR-1"
        ds.StudyDate, ds.StudyTime = "20240611", "101500"
        ds.StudyDescription, ds.SeriesDescription = "MR head", "T1 multi-slice"
        ds.SeriesNumber, ds.InstanceNumber = 3, i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i) * 5.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.Rows, ds.Columns = frames.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = frames[i].astype("<u2").tobytes()
        for keyword in ("WindowCenter", "WindowWidth"):
            if keyword in ds:
                delattr(ds, keyword)
        path = dest / f"mr-{i + 1:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def write_ct_study(dest: Path) -> list[Path]:
    """Two real CT slices as two series of one CT study (dated a year before the MR)."""
    study = _uid("ct-study")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for n, name in enumerate(("CT_small.dcm", "693_UNCR.dcm"), start=1):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = _uid("ct-series", name)
        ds.PatientName, ds.PatientID = "Duck^Donald", "H3-CT-7"
        ds.StudyDate, ds.StudyTime = "20230302", "084500"
        ds.StudyDescription = "CT chest"
        ds.SeriesDescription = f"Axial {n}"
        ds.SeriesNumber, ds.InstanceNumber = n, 1
        path = dest / f"ct-{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def write_brain_study(dest: Path, slices: int = 12) -> list[Path]:
    """The demo's MNI152 T1 MR study (three series), or [] where it is not installed."""
    try:
        from resources.series import write_mr_brain_study
    except ImportError:
        return []
    try:
        return list(write_mr_brain_study(dest, slices))
    except Exception:  # nilearn's template missing: the other studies still test
        return []
