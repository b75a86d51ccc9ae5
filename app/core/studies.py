"""Patients, studies and series, grouped on the workstation after decryption (DESIGN.md §9).

The cloud stores one encrypted metadata entry per image and never learns which images
belong together; the client decrypts the metadata it is allowed to read and groups it here,
so the CLI's ``ls --studies`` and the GUI's study list show the same grouping.

An image without DICOM study and series UIDs (a PNG, JPEG or TIFF, or a DICOM file missing
them) forms a study and a series of its own, keyed by its image id: it stays visible and
findable instead of being merged with unrelated images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from app.core.errors import RadcryptError
from app.core.meta import ImageMeta

LONE_PREFIX = "image:"
"""Key prefix of the study and series of an image without DICOM UIDs."""


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")


def slice_position(meta: ImageMeta) -> float:
    """Distance along the slice normal (ImagePositionPatient . normal of the orientation):
    orders a series as the scanner acquired it when InstanceNumber is missing or wrong."""
    try:
        position = [float(v) for v in meta.attribute("ImagePositionPatient").split("\\")]
        o = [float(v) for v in meta.attribute("ImageOrientationPatient").split("\\")]
    except ValueError:
        return float("inf")
    if len(position) != 3 or len(o) != 6:
        return float("inf")
    normal = (o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3])
    return sum(p * n for p, n in zip(position, normal, strict=True))


def image_order(meta: ImageMeta) -> tuple[float, float, int, str]:
    """Stack order inside a series: instance number, slice position, frame, then id."""
    return (_number(meta.attribute("InstanceNumber")), slice_position(meta), meta.frame,
            meta.image_id)


def study_key(meta: ImageMeta) -> str:
    return meta.study_uid or LONE_PREFIX + meta.original_image_id


def series_key(meta: ImageMeta) -> str:
    return meta.series_uid or LONE_PREFIX + meta.original_image_id


@dataclass(frozen=True)
class Series:
    """One series: its images in stack order (every frame of a multi-frame instance)."""

    key: str  # SeriesInstanceUID, or LONE_PREFIX + image id
    study_key: str
    modality: str
    description: str
    number: str  # SeriesNumber as written ("" when absent)
    body_part: str
    images: tuple[ImageMeta, ...]

    @property
    def image_ids(self) -> tuple[str, ...]:
        return tuple(m.image_id for m in self.images)

    @property
    def thumbnail(self) -> ImageMeta:
        """The image shown for the series: the middle of the stack."""
        return self.images[len(self.images) // 2]


@dataclass(frozen=True)
class Study:
    """One study: the patient, the date and its series (sorted by series number)."""

    key: str  # StudyInstanceUID, or LONE_PREFIX + image id
    patient_name: str
    patient_id: str
    study_date: str  # DICOM DA, YYYYMMDD ("" when absent)
    study_time: str
    accession: str
    description: str
    modalities: tuple[str, ...]  # distinct, in series order
    series: tuple[Series, ...]

    @property
    def image_count(self) -> int:
        return sum(len(s.images) for s in self.series)

    @property
    def images(self) -> tuple[ImageMeta, ...]:
        return tuple(m for s in self.series for m in s.images)


def _first(metas: Iterable[ImageMeta], keyword: str) -> str:
    return next((v for m in metas if (v := m.attribute(keyword))), "")


def group_series(metas: Iterable[ImageMeta]) -> list[Series]:
    """Series of the given images (damaged metadata is left out), in series-number order."""
    buckets: dict[str, list[ImageMeta]] = {}
    for meta in metas:
        if not meta.error:
            buckets.setdefault(series_key(meta), []).append(meta)
    out = []
    for key, members in buckets.items():
        members.sort(key=image_order)
        out.append(Series(
            key=key, study_key=study_key(members[0]), modality=_first(members, "Modality"),
            description=_first(members, "SeriesDescription") or (
                members[0].name if key.startswith(LONE_PREFIX) else ""),
            number=_first(members, "SeriesNumber"),
            body_part=_first(members, "BodyPartExamined"), images=tuple(members)))
    out.sort(key=lambda s: (_number(s.number), s.description, s.key))
    return out


def group_studies(metas: Iterable[ImageMeta]) -> list[Study]:
    """Studies of the given images, newest study date first (undated last)."""
    by_study: dict[str, list[Series]] = {}
    for series in group_series(metas):
        by_study.setdefault(series.study_key, []).append(series)
    studies = []
    for key, series_list in by_study.items():
        members = [m for s in series_list for m in s.images]
        modalities = tuple(dict.fromkeys(s.modality for s in series_list if s.modality))
        studies.append(Study(
            key=key, patient_name=_first(members, "PatientName"),
            patient_id=_first(members, "PatientID"), study_date=_first(members, "StudyDate"),
            study_time=_first(members, "StudyTime"),
            accession=_first(members, "AccessionNumber"),
            description=_first(members, "StudyDescription") or (
                members[0].name if key.startswith(LONE_PREFIX) else ""),
            modalities=modalities, series=tuple(series_list)))
    studies.sort(key=lambda s: (s.study_date == "", _negated(s.study_date + s.study_time),
                                s.patient_name, s.key))
    return studies


def _negated(text: str) -> tuple[int, ...]:
    """Sort key putting later dates first while the rest of the key sorts ascending."""
    return tuple(-ord(c) for c in text)


# --- words for people: patient names, dates, instance and frame --------------------------


def patient_display(name: str) -> str:
    """A DICOM person name (PN, ``Family^Given^Middle^Prefix^Suffix``) as a list shows it:
    ``DOE, JOHN``; what is not a PN is shown as written."""
    parts = [p.strip() for p in name.split("=")[0].split("^")]
    while parts and not parts[-1]:
        parts.pop()
    if len(parts) <= 1:
        return parts[0] if parts else ""
    return f"{parts[0]}, {' '.join(p for p in parts[1:] if p)}".rstrip(", ")


def date_display(da: str) -> str:
    """A DICOM date (DA, ``YYYYMMDD``) as ISO 8601 (``YYYY-MM-DD``); other text as is."""
    text = da.strip()
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text


def instance_label(meta: ImageMeta) -> str:
    """Which instance and frame an image is, e.g. ``instance 12, frame 3/10`` (frames are
    counted from 1 here, as a viewer's overlay does; ``meta.frame`` is 0-based)."""
    parts = []
    if number := meta.attribute("InstanceNumber"):
        parts.append(f"instance {number}")
    if meta.frames > 1:
        parts.append(f"frame {meta.frame + 1}/{meta.frames}")
    return ", ".join(parts)


def series_label(series: Series) -> str:
    """One line naming a series: modality, number, description, image count."""
    parts = [series.modality] if series.modality else []
    if series.number:
        parts.append(f"series {series.number}")
    if series.description:
        parts.append(series.description)
    count = len(series.images)
    parts.append(f"{count} image{'s' if count != 1 else ''}")
    return " · ".join(parts)


# --- finding a study or series from what a person typed -----------------------------------


def series_rows(studies: list[Study]) -> list[tuple[str, Series]]:
    """Every series with the row label a list shows for it: ``S.N``, the study's row number
    in ``studies`` and the series' row inside the study (both from 1)."""
    return [(f"{si}.{ni}", series) for si, study in enumerate(studies, 1)
            for ni, series in enumerate(study.series, 1)]


def _by_text(what: str, text: str, keyed: list[tuple[str, str, object]]) -> object:
    """The one item of ``keyed`` (row label, key, item) that ``text`` names: its key, its
    row label, or a prefix of its key (also without the lone-image prefix) that only it
    has. Why this order: a row label such as ``1.2`` is also a prefix of many UIDs."""
    text = text.strip()
    if not text:
        raise RadcryptError(f"no {what} given")
    for _, key, item in keyed:
        if key == text:
            return item
    for row, _, item in keyed:
        if row == text:
            return item
    matches = [(key, item) for _, key, item in keyed
               if key.startswith(text) or key.removeprefix(LONE_PREFIX).startswith(text)]
    if len(matches) == 1:
        return matches[0][1]
    if not matches:
        raise RadcryptError(f"no {what} matches {text!r} (give its UID, a unique prefix of "
                            f"it, or the row number 'ls' shows)")
    shown = ", ".join(key for key, _ in matches[:3])
    plural = {"study": "studies"}.get(what, what)
    raise RadcryptError(f"{len(matches)} {plural} match {text!r} ({shown}"
                        f"{', ...' if len(matches) > 3 else ''}): give more of the UID")


def find_study(studies: list[Study], text: str) -> Study:
    """The study ``text`` names: its StudyInstanceUID (or lone-image key), its row number
    in ``studies`` (from 1), or a unique prefix of its UID; RadcryptError otherwise."""
    keyed: list[tuple[str, str, object]] = [
        (str(row), study.key, study) for row, study in enumerate(studies, 1)]
    found = _by_text("study", text, keyed)
    assert isinstance(found, Study)
    return found


def find_series(studies: list[Study], text: str) -> Series:
    """The series ``text`` names: its SeriesInstanceUID (or lone-image key), its row label
    ``S.N`` (``series_rows``), its position in the archive-wide list of series as a plain
    number, or a unique prefix of its UID; RadcryptError otherwise."""
    rows = series_rows(studies)
    keyed: list[tuple[str, str, object]] = [(label, s.key, s) for label, s in rows]
    text = text.strip()
    if text.isdigit() and not any(s.key == text for _, s in rows):
        index = int(text)
        if not 1 <= index <= len(rows):
            raise RadcryptError(f"no series number {index}: the archive lists {len(rows)} "
                                "series (use the S.N row labels of 'ls --series')")
        return rows[index - 1][1]
    found = _by_text("series", text, keyed)
    assert isinstance(found, Series)
    return found
