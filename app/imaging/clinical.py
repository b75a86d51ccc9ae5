"""The clinical attributes of one DICOM instance that the archive keeps (DESIGN.md section 9).

Radiologists find images by patient, study and series, so each instance's *encrypted*
metadata carries the attributes that group and describe it. The cloud never sees them: the
importer encrypts the metadata, and the client groups images after decryption
(app/core/studies.py). A research repository (the privacy issue) de-identifies these values
before they are stored; a clinical repository keeps them, encrypted.

Values are strings, as DICOM writes them (multi-valued attributes joined by a backslash), so
the metadata stays plain JSON and a value reads the same in the CLI, the GUI and a test.
"""

from __future__ import annotations

from typing import Any

CLINICAL_KEYS: tuple[str, ...] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "Modality",
    "BodyPartExamined",
    "Laterality",
    "StudyDescription",
    "SeriesDescription",
    "SeriesNumber",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "LossyImageCompression",
    "NumberOfFrames",
)
"""What the archive keeps of a DICOM header, encrypted: identity of study, series and
instance, the patient, dates, descriptions and the geometry a stack needs."""

MAX_VALUE_LENGTH = 1024
"""A longer value (a hostile or broken file) is cut: the metadata stays small."""


def _text(value: Any) -> str:
    """DICOM's string form: a MultiValue joined by a backslash, a number without noise."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(_text(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


def clinical_attributes(dataset: Any) -> dict[str, str]:
    """The ``CLINICAL_KEYS`` a pydicom ``Dataset`` has, non-empty, as strings.

    A value pydicom cannot convert (a malformed element) is left out rather than failing
    the import: the image stays searchable, it just groups less well.
    """
    out: dict[str, str] = {}
    for keyword in CLINICAL_KEYS:
        try:
            value = dataset.get(keyword, None)
        except Exception:  # a malformed element of an untrusted file
            continue
        if value is None:
            continue
        text = _text(value).strip().replace("\x00", "")
        if text:
            out[keyword] = text[:MAX_VALUE_LENGTH]
    return out
