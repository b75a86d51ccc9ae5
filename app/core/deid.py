"""De-identification of a DICOM file for a research repository (issue 16).

A repository's policy (its signed manifest's ``policy``) is ``clinical`` (the original file
is stored, encrypted, with every patient tag) or ``research`` (a de-identified copy is
stored instead, made here, before anything leaves the workstation).

The copy follows DICOM PS3.15 Annex E, the Basic Application Level Confidentiality
Profile with two options: Retain Longitudinal Temporal Information with Modified Dates and
Clean Descriptors. The profile's action table (Table E.1-1: D, Z, X, U and their
combinations for about 650 attributes) is not written here: it comes from
dicom-anonymizer's ``dicomfields_2026c`` (KitwareMedical, BSD-3), generated from the
standard's own tables. Its actions are random (a new UID per run); ours are keyed, so the
copy is deterministic: the same file gives the same bytes (a re-run import finds it
committed), the same study keeps one new Study Instance UID, the same patient one
pseudonym and one date offset, within a repository, and different ones in another.

Keys: one pseudonym key per repository, HKDF-SHA256 of the key ring's first data key
(version 1, which stays in the ring after every rotation) with its own info string, the
way app/core/importer.py derives the image id key; so it is wrapped with the ring, and
only the repository's members can re-link a pseudonym to a patient (by re-computing it).

Burned-in text: an image that says BurnedInAnnotation YES, or an US/SC/OT image without
the attribute, is refused unless blackout rectangles are given; they are painted (the
pixel minimum) into every frame before the copy is written, uncompressed.
"""

from __future__ import annotations

import hmac
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache

from app.core.errors import RadcryptError

POLICIES = ("clinical", "research")
DEFAULT_POLICY = "clinical"
ACTION_TABLE = "dicomfields_2026c"  # dicom-anonymizer's PS3.15 Table E.1-1, 2026c edition
NEUTRAL_NAME = "de-identified image"  # the metadata "name" in a research repository

_PSEUDONYM_INFO = b"radcrypt/pseudonym-key/v1"
MAX_SHIFT_DAYS = 3650  # a keyed offset of 1..3650 days back, one per patient

# (0012,0064) De-identification Method Code Sequence: CID 7050 codes (scheme DCM)
CODES = {"basic": ("113100", "Basic Application Confidentiality Profile"),
         "dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
         "descriptors": ("113105", "Clean Descriptors Option"),
         "pixels": ("113101", "Clean Pixel Data Option")}

# The Clean Descriptors option's "C" rows (PS3.15 Table E.1-1, column Clean Desc. Opt.) that
# Radcrypt keeps (cleaned) because its clinical metadata and search use them; the other C
# rows keep the basic profile's action. Cleaning removes every identifying value of the
# source (names, ids, dates, numbers it had in identifying attributes) from the text.
CLEAN_DESCRIPTORS = ("StudyDescription", "SeriesDescription", "ProtocolName",
                     "PerformedProcedureStepDescription", "RequestedProcedureDescription",
                     "AcquisitionComments", "ImageComments", "DerivationDescription",
                     "ContrastBolusAgent")
_BURNED_IN_MODALITIES = ("US", "SC", "OT")


class DeidentificationRefused(RadcryptError):
    """A file the research policy does not import as it is (burned-in text, not DICOM)."""


@dataclass(frozen=True)
class Blackout:
    """A rectangle painted over in every frame: x, y (columns, rows from the top left),
    width and height, in pixels."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> Blackout:
        """``x,y,w,h`` (the CLI's ``--blackout``), four non-negative integers."""
        parts = text.split(",")
        if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
            raise RadcryptError(f"blackout region {text!r} is not x,y,width,height "
                                "(four non-negative integers)")
        x, y, w, h = (int(p) for p in parts)
        if w == 0 or h == 0:
            raise RadcryptError(f"blackout region {text!r} has no area")
        return cls(x, y, w, h)


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise RadcryptError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    return policy


def pseudonym_key(first_data_key: bytes) -> bytes:
    """HKDF-SHA256(first data key, no salt, info "radcrypt/pseudonym-key/v1", 32 bytes)."""
    prk = hmac.digest(bytes(32), first_data_key, "sha256")
    return hmac.digest(prk, _PSEUDONYM_INFO + b"\x01", "sha256")


@lru_cache(maxsize=1)
def action_table() -> dict[str, frozenset[tuple[int, ...]]]:
    """Category ("D", "Z", "X", "U", "X_Z", ...) -> tags of PS3.15 Table E.1-1, from the
    library (a tag is (group, element) or (group, element, group mask, element mask))."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    table = dicom_anonymization_database_selector(ACTION_TABLE)
    return {name[:-5]: frozenset(tuple(t) for t in tags)
            for name, tags in table.items() if name != "ALL_TAGS"}


def _action(tag: int) -> str | None:
    group, element = tag >> 16, tag & 0xFFFF
    table = action_table()
    for category, tags in table.items():
        if (group, element) in tags:
            return category
    for category, tags in table.items():
        for t in tags:
            if len(t) == 4 and group & t[2] == t[0] & t[2] and element & t[3] == t[1] & t[3]:
                return category
    return None


def needs_blackout(ds: object) -> bool:
    """BurnedInAnnotation YES, or an US/SC/OT image without the attribute."""
    burned = str(getattr(ds, "BurnedInAnnotation", "") or "").strip().upper()
    if burned:
        return burned == "YES"
    return str(getattr(ds, "Modality", "") or "").strip().upper() in _BURNED_IN_MODALITIES


class _Keyed:
    """The keyed replacements of one repository."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def _mac(self, context: str, value: str) -> bytes:
        return hmac.digest(self.key, context.encode() + b"\x00" + value.encode(), "sha256")

    def uid(self, old: str) -> str:
        # 2.25 + a 128-bit integer (PS3.5 B.2): at most 44 characters, within 64
        return "2.25." + str(int.from_bytes(self._mac("uid", old.strip())[:16], "big"))

    def patient_id(self, patient: str) -> str:
        return "RC-" + self._mac("patient-id", patient).hex()[:16].upper()

    def patient_name(self, patient: str) -> str:
        return "PSEUDONYM^" + self._mac("patient-name", patient).hex()[:12].upper()

    def shift_days(self, patient: str) -> int:
        value = int.from_bytes(self._mac("date-offset", patient)[:8], "big")
        return 1 + value % MAX_SHIFT_DAYS


def _shift_date(text: str, days: int) -> str:
    text = text.strip()
    if len(text) < 8 or not text[:8].isdigit():
        return ""  # a date we cannot read is removed, not kept
    try:
        moved = datetime.strptime(text[:8], "%Y%m%d").date() - timedelta(days=days)
    except ValueError:
        return ""
    return moved.strftime("%Y%m%d") + text[8:]


def _dummy(vr: str) -> object:
    """A D (dummy) value of the right VR that says nothing."""
    if vr in ("PN",):
        return "ANONYMOUS"
    if vr in ("LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE"):
        return "ANONYMIZED"
    if vr in ("DS", "IS"):
        return "0"
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"):
        return 0
    if vr == "AS":
        return "000Y"
    if vr in ("DA",):
        return "19000101"
    if vr == "TM":
        return "000000"
    if vr == "DT":
        return "19000101000000"
    return None


def _identifying_texts(ds: object) -> list[str]:
    """Values of the source's attributes that the profile does not keep, as text, for
    cleaning descriptors: longest first, so a name is removed before its parts."""
    found: set[str] = set()

    def visit(dataset: object) -> None:
        for elem in dataset:  # type: ignore[attr-defined]
            if elem.VR == "SQ":
                for item in elem.value or ():
                    visit(item)
                continue
            if elem.tag.is_private or _action(int(elem.tag)) is None:
                continue
            if elem.keyword in CLEAN_DESCRIPTORS or elem.VR in ("OB", "OW", "UN", "OF"):
                continue
            values = elem.value if elem.VM > 1 else [elem.value]
            for value in values:
                text = str(value or "").strip()
                if len(text) >= 3:
                    found.add(text)
                    found.update(p for p in re.split(r"[\^ ,]+", text) if len(p) >= 3)

    visit(ds)
    return sorted(found, key=len, reverse=True)


def _clean(text: str, identifying: Sequence[str]) -> str:
    for value in identifying:
        text = re.sub(re.escape(value), "", text, flags=re.IGNORECASE)
    return re.sub(r"\s{2,}", " ", text).strip()


def _apply(dataset: object, keyed: _Keyed, days: int, identifying: Sequence[str]) -> None:
    """The table's actions on one dataset level, then on every sequence item."""
    for elem in list(dataset):  # type: ignore[call-overload]
        tag, vr = int(elem.tag), elem.VR
        if elem.tag.is_private:
            continue  # removed at the end (the profile's X for private attributes)
        action = _action(tag)
        if vr == "SQ":
            if action in ("X", "X_Z", "X_D", "X_Z_D"):
                del dataset[tag]  # type: ignore[attr-defined]
                continue
            if action in ("Z", "D", "Z_D"):
                elem.value = []
                continue
            for item in elem.value or ():
                _apply(item, keyed, days, identifying)
            continue
        if elem.keyword in CLEAN_DESCRIPTORS:
            if isinstance(elem.value, str) and elem.value:
                elem.value = _clean(elem.value, identifying)
            continue
        if vr in ("DA", "DT"):
            # Retain Longitudinal Temporal Information with Modified Dates: every date kept,
            # in the table or not, moved by the patient's one offset, so that intervals
            # stay true (times are kept as they are)
            values = elem.value if elem.VM > 1 else [elem.value]
            moved = [_shift_date(str(v or ""), days) for v in values if str(v or "")]
            elem.value = moved if elem.VM > 1 else (moved[0] if moved else "")
            continue
        if vr == "TM" and action is not None:
            continue
        if action is None:
            continue
        if action in ("U", "X_Z_U_STAR") and vr == "UI":
            values = elem.value if elem.VM > 1 else [elem.value]
            new = [keyed.uid(str(v)) for v in values if str(v or "")]
            elem.value = new if elem.VM > 1 else (new[0] if new else "")
        elif action in ("X", "X_Z", "X_Z_U_STAR"):
            del dataset[tag]  # type: ignore[attr-defined]
        elif action == "Z":
            elem.value = "" if vr not in ("US", "SS", "UL", "SL", "FL", "FD") else None
        else:  # D, Z_D, X_D, X_Z_D: a dummy value
            elem.value = _dummy(vr)


def _blackout(ds: object, regions: Iterable[Blackout]) -> None:
    """Paint the regions with the pixel minimum in every frame; the copy is stored
    uncompressed (pixel_array gives RGB for YBR, which the header then says)."""
    import numpy as np

    # pydicom's decompress() raises on a dataset that is not compressed (US1_UNCR.dcm)
    if ds.file_meta.TransferSyntaxUID.is_compressed:  # type: ignore[attr-defined]
        ds.decompress()  # type: ignore[attr-defined]
    pixels = np.array(ds.pixel_array)  # type: ignore[attr-defined]
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    view = pixels if frames > 1 else pixels[np.newaxis]
    if samples == 1 and view.ndim == 4:
        view = view[..., 0]
    low = view.min()
    rows, cols = view.shape[1], view.shape[2]
    for r in regions:
        if r.x >= cols or r.y >= rows:
            raise RadcryptError(f"blackout region {r.x},{r.y},{r.width},{r.height} lies "
                                f"outside the {cols}x{rows} image")
        view[:, r.y:r.y + r.height, r.x:r.x + r.width] = low
    ds.PixelData = pixels.tobytes()  # type: ignore[attr-defined]
    if samples == 3:
        ds.PhotometricInterpretation = "RGB"  # type: ignore[attr-defined]
        ds.PlanarConfiguration = 0  # type: ignore[attr-defined]


def _code_items(names: Sequence[str]) -> list[object]:
    from pydicom.dataset import Dataset

    items: list[object] = []
    for name in names:
        value, meaning = CODES[name]
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    return items


def deidentify(data: bytes, key: bytes, blackouts: Sequence[Blackout] = (),
               where: str = "file") -> bytes:
    """The de-identified copy of DICOM file ``data`` (bytes of a Part 10 file).

    ``key``: the repository's pseudonym key. DeidentificationRefused for a file that is
    not DICOM or has burned-in text and no ``blackouts``."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import UID, ExplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError) as exc:
        raise DeidentificationRefused(
            f"{where}: research repositories take DICOM files only (their tags are "
            f"de-identified); this one cannot be read as DICOM ({type(exc).__name__})"
        ) from None
    cleaned_pixels = False
    if needs_blackout(ds):
        if not blackouts:
            raise DeidentificationRefused(
                f"{where}: the image may carry burned-in patient text (BurnedInAnnotation "
                f"{getattr(ds, 'BurnedInAnnotation', 'absent')}, modality "
                f"{getattr(ds, 'Modality', '?')}); a research repository takes it only with "
                "blackout regions (--blackout x,y,w,h) over the text")
        _blackout(ds, blackouts)
        cleaned_pixels = True
    elif blackouts and "PixelData" in ds:
        _blackout(ds, blackouts)
        cleaned_pixels = True
    keyed = _Keyed(key)
    patient = "|".join(str(ds.get(k, "") or "").strip()
                       for k in ("PatientID", "IssuerOfPatientID", "PatientName"))
    days = keyed.shift_days(patient)
    identifying = _identifying_texts(ds)
    _apply(ds, keyed, days, identifying)
    ds.remove_private_tags()
    ds.PatientName = keyed.patient_name(patient)
    ds.PatientID = keyed.patient_id(patient)
    if cleaned_pixels:
        ds.BurnedInAnnotation = "NO"
    ds.PatientIdentityRemoved = "YES"
    codes = ["basic", "dates", "descriptors"] + (["pixels"] if cleaned_pixels else [])
    # LO: at most 64 characters; the codes below say it in full
    ds.DeidentificationMethod = ("PS3.15 E.1 Basic, Modified Dates, Clean Desc." +
                                 (", Clean Pixels" if cleaned_pixels else ""))
    ds.DeidentificationMethodCodeSequence = _code_items(codes)
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    meta = ds.file_meta
    syntax = ExplicitVRLittleEndian if cleaned_pixels else meta.TransferSyntaxUID
    sop_class = meta.get("MediaStorageSOPClassUID", ds.get("SOPClassUID", ""))
    for elem in list(meta):  # only what Part 10 requires: no source AE title, no names
        del meta[elem.tag]
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(ds.get("SOPInstanceUID", "") or keyed.uid("instance"))
    meta.TransferSyntaxUID = syntax
    ds.preamble = bytes(128)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()

