"""HL7 FHIR R4 export of a retrieved study and file, built and validated with fhir.resources'
R4B models (R4B is wire-compatible with R4 for these two resources; fhir.resources' default
models are R5, which an R4 server refuses).

What goes out, and why:
- ``imaging_study(metas, policy=, repo_id=)``: an ImagingStudy of the images' study: series
  (uid, number, modality, body site, laterality, description, number of instances),
  instances (SOP instance UID, SOP class, number), study identifiers (Study Instance UID,
  accession), started (the study date: DICOM times carry no time zone, and a FHIR dateTime
  with a time must have one), the subject as a logical reference (no Patient resource: we
  are not the master patient index).
- ``document_reference(meta, path, ...)``: the decrypted file as an attachment (URL, size,
  SHA-1 as FHIR asks, content type), pointing at the study.
- Research repositories: the identifiers are the pseudonyms and new UIDs the importer's
  de-identification wrote (app/core/deid.py); the subject has no display name and its
  identifier system says it is a pseudonym of this repository. Nothing is re-identified.
- ``bundle(resources)`` (a collection), ``write(dest, data)`` and ``export(client, repo,
  image_id, dest, whole_study=True, document=None)``: the use case the facade's
  ``Pacs.export_fhir`` and ``radcrypt get --fhir`` run.

Every resource is passed through its fhir.resources model before it is returned, so what we
write is what the model accepts (a test parses it back).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from app.core.errors import RadcryptError
from app.core.meta import ImageMeta

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
URI = "urn:ietf:rfc:3986"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
NAMESPACE = uuid.UUID("6f1c3c52-8d0e-4f0b-9a52-7a0d2f3c9e11")  # for stable bundle entry ids

# BodyPartExamined (DICOM defined terms) -> SNOMED CT, from DICOM PS3.16 Annex L; a term not
# listed goes out as text only (a Coding with a display, no invented code).
BODY_PARTS = {
    "ABDOMEN": ("818981001", "Abdomen"), "ANKLE": ("70258002", "Ankle joint"),
    "BRAIN": ("12738006", "Brain"), "BREAST": ("76752008", "Breast"),
    "CHEST": ("51185008", "Thorax"), "CSPINE": ("122494005", "Cervical spine"),
    "ELBOW": ("127949000", "Elbow"), "EXTREMITY": ("66019005", "Limb"),
    "FOOT": ("56459004", "Foot"), "HAND": ("85562004", "Hand"),
    "HEAD": ("69536005", "Head"), "HEART": ("80891009", "Heart"),
    "HIP": ("24136001", "Hip joint"), "KNEE": ("72696002", "Knee"),
    "LSPINE": ("122496007", "Lumbar spine"), "LIVER": ("10200004", "Liver"),
    "NECK": ("45048000", "Neck"), "PELVIS": ("816092008", "Pelvis"),
    "SHOULDER": ("16982005", "Shoulder"), "SKULL": ("89546000", "Skull"),
    "SPINE": ("421060004", "Spine"), "TSPINE": ("122495006", "Thoracic spine"),
    "WRIST": ("74670003", "Wrist joint"),
}
LATERALITY = {"L": ("7771000", "Left"), "R": ("24028007", "Right")}
CONTENT_TYPES = {"dicom": "application/dicom", "png": "image/png", "jpeg": "image/jpeg",
                 "tiff": "image/tiff"}


class FhirError(RadcryptError):
    """A FHIR resource could not be built (the message names the image or field)."""


# --- resources ---------------------------------------------------------------------------


def imaging_study(metas: Sequence[ImageMeta], *, policy: str = "clinical",
                  repo_id: str = "") -> dict[str, Any]:
    """An ImagingStudy (FHIR R4) of the study these images belong to, as a JSON object.

    Frames of one multi-frame instance count once; images without a Study Instance UID, or
    of several studies, are refused (an ImagingStudy is one study)."""
    metas = [m for m in metas if not m.error]
    if not metas:
        raise FhirError("no readable image to describe in an ImagingStudy")
    study_uids = {m.attribute("StudyInstanceUID") for m in metas}
    if "" in study_uids:
        lone = next(m for m in metas if not m.attribute("StudyInstanceUID"))
        raise FhirError(f"image {lone.image_id} has no Study Instance UID: an ImagingStudy "
                        "needs one (export its DocumentReference alone)")
    if len(study_uids) > 1:
        raise FhirError(f"the images belong to {len(study_uids)} studies; an ImagingStudy "
                        "describes one")
    study_uid = study_uids.pop()
    first = metas[0]
    series_out: list[dict[str, Any]] = []
    by_series: dict[str, list[ImageMeta]] = {}
    for m in metas:
        by_series.setdefault(m.attribute("SeriesInstanceUID") or f"image:{m.image_id}",
                             []).append(m)
    total = 0
    for key, members in sorted(by_series.items(), key=lambda kv: _series_order(kv[1])):
        instances: dict[str, dict[str, Any]] = {}
        for m in sorted(members, key=lambda m: (_number(m.attribute("InstanceNumber")) or 0,
                                                m.frame)):
            sop = m.attribute("SOPInstanceUID")
            if not sop or sop in instances:
                continue  # a later frame of an instance already listed
            instance: dict[str, Any] = {"uid": sop, "sopClass": _sop_class(m)}
            if (number := _number(m.attribute("InstanceNumber"))) is not None:
                instance["number"] = number
            instances[sop] = instance
        head = members[0]
        series: dict[str, Any] = {
            "modality": {"system": DCM, "code": head.modality or "OT"},
            "numberOfInstances": len(instances)}
        if not key.startswith("image:"):
            series["uid"] = key
        if (number := _number(head.attribute("SeriesNumber"))) is not None:
            series["number"] = number
        if head.attribute("SeriesDescription"):
            series["description"] = head.attribute("SeriesDescription")
        if body := head.attribute("BodyPartExamined"):
            series["bodySite"] = _coding(BODY_PARTS, body)
        if side := head.attribute("Laterality"):
            series["laterality"] = _coding(LATERALITY, side)
        if instances:
            series["instance"] = list(instances.values())
        total += len(instances)
        series_out.append(series)
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": _resource_id(study_uid),
        "status": "available",
        "identifier": [{"system": URI, "value": f"urn:oid:{study_uid}"}],
        "subject": _subject(first, policy, repo_id),
        "numberOfSeries": len(series_out),
        "numberOfInstances": total,
        "series": series_out,
    }
    modalities = sorted({s["modality"]["code"] for s in series_out})
    resource["modality"] = [{"system": DCM, "code": code} for code in modalities]
    if accession := first.attribute("AccessionNumber"):
        resource["identifier"].append({
            "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": accession})
    if started := _date(first.attribute("StudyDate")):
        resource["started"] = started
    if first.attribute("StudyDescription"):
        resource["description"] = first.attribute("StudyDescription")
    return _validated("ImagingStudy", resource)


def document_reference(meta: ImageMeta, path: str | Path, *, policy: str = "clinical",
                       repo_id: str = "", study: dict[str, Any] | None = None,
                       study_ref: str = "") -> dict[str, Any]:
    """A DocumentReference (FHIR R4) for the decrypted file at ``path``: its URL, size,
    SHA-1 (FHIR's Attachment.hash) and content type; ``study``/``study_ref`` link it to its
    ImagingStudy (``study_ref``: the reference text, e.g. a bundle entry's urn:uuid)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        sha1 = hashlib.sha1(usedforsecurity=False)
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                sha1.update(chunk)
    except OSError as exc:
        raise FhirError(f"cannot read {path} for its DocumentReference: "
                        f"{exc.strerror}") from None
    attachment: dict[str, Any] = {
        "contentType": CONTENT_TYPES.get(meta.source_format, "application/octet-stream"),
        "url": path.resolve().as_uri(), "size": size,
        "hash": base64.b64encode(sha1.digest()).decode("ascii"),
        "title": meta.name or path.name}
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "status": "current",
        "identifier": [{"system": f"urn:radcrypt:image:{repo_id}" if repo_id
                        else "urn:radcrypt:image", "value": meta.image_id}],
        # LOINC 18748-4 "Diagnostic imaging study": the kind of document; the modality is
        # the ImagingStudy's to say
        "type": {"coding": [{"system": LOINC, "code": "18748-4",
                             "display": "Diagnostic imaging study"}],
                 "text": "DICOM instance" if meta.source_format == "dicom" else "image"},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "content": [{"attachment": attachment}],
    }
    if sop := meta.attribute("SOPInstanceUID"):
        resource["masterIdentifier"] = {"system": URI, "value": f"urn:oid:{sop}"}
    if meta.attribute("PatientID") or meta.attribute("PatientName"):
        resource["subject"] = _subject(meta, policy, repo_id)
    if study is not None or study_ref:
        ref = study_ref or f"ImagingStudy/{study['id']}"  # type: ignore[index]
        resource["context"] = {"related": [{"reference": ref, "type": "ImagingStudy"}]}
    return _validated("DocumentReference", resource)


def bundle(resources: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A collection Bundle of the resources, each entry with a stable urn:uuid fullUrl
    (from its type and id, so a re-export gives the same document)."""
    entries = []
    for resource in resources:
        name = resource.get("id") or json.dumps(resource.get("identifier"), sort_keys=True)
        key = f"{resource['resourceType']}/{name}"
        entries.append({"fullUrl": f"urn:uuid:{uuid.uuid5(NAMESPACE, key)}",
                        "resource": resource})
    return _validated("Bundle", {"resourceType": "Bundle", "type": "collection",
                                 "timestamp": datetime.now(timezone.utc).isoformat(
                                     timespec="seconds"),
                                 "entry": entries})


def study_bundle(metas: Sequence[ImageMeta], meta: ImageMeta | None = None,
                 path: str | Path | None = None, *, policy: str = "clinical",
                 repo_id: str = "") -> dict[str, Any]:
    """A Bundle with the ImagingStudy of ``metas`` and, when ``meta`` and ``path`` are given,
    the DocumentReference of that decrypted file, linked to the study by its entry's URL."""
    study = imaging_study(metas, policy=policy, repo_id=repo_id)
    resources: list[dict[str, Any]] = [study]
    if meta is not None and path is not None:
        study_url = f"urn:uuid:{uuid.uuid5(NAMESPACE, 'ImagingStudy/' + study['id'])}"
        resources.append(document_reference(meta, path, policy=policy, repo_id=repo_id,
                                            study_ref=study_url))
    return bundle(resources)


def write(dest: str | Path, data: dict[str, Any]) -> Path:
    """Write the JSON (UTF-8, indented) beside ``dest`` and rename it into place, 0600: a
    clinical export names a patient."""
    dest = Path(dest)
    folder = dest.parent if str(dest.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{dest.name}.", suffix=".part")
    except OSError as exc:
        raise FhirError(f"cannot write {dest}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        os.replace(tmp, dest)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise FhirError(f"cannot write {dest}: {exc.strerror}") from None
    return dest


def export(client: Any, repo: Any, image_id: str, dest: str | Path, *,
           whole_study: bool = True, document: str | Path | None = None) -> Path:
    """The use case behind ``Pacs.export_fhir`` and ``radcrypt get --fhir``: a Bundle with
    the ImagingStudy of the image's study (``whole_study``; else of that image's instance
    only) and, when ``document`` names the decrypted file, its DocumentReference; written
    to ``dest``. ``client`` is the facade (typed Any: a facet never imports it)."""
    meta = client.image_meta(repo, image_id)
    if meta.error:
        raise FhirError(f"image {image_id} is damaged: {meta.error}")
    study_uid = meta.attribute("StudyInstanceUID")
    metas: list[ImageMeta] = [meta]
    if whole_study and study_uid:
        for study in client.studies(repo):
            if study.key == study_uid:
                metas = [m for series in study.series for m in series.images]
                break
    policy = client.policy(repo)
    if not study_uid:  # a PNG/JPEG or a DICOM file without study: the document alone
        if document is None:
            raise FhirError(f"image {image_id} has no Study Instance UID: give the decrypted "
                            "file to export its DocumentReference")
        data = bundle([document_reference(meta, document, policy=policy,
                                          repo_id=repo.repo_id)])
    else:
        data = study_bundle(metas, meta if document is not None else None, document,
                            policy=policy, repo_id=repo.repo_id)
    return write(dest, data)


# --- helpers ------------------------------------------------------------------------------


def _validated(kind: str, resource: dict[str, Any]) -> dict[str, Any]:
    """Through the fhir.resources R4B model and back: what we return is what it accepts."""
    from importlib import import_module

    module = import_module(f"fhir.resources.R4B.{kind.lower()}")
    model = getattr(module, kind)
    try:
        parsed = model.model_validate(resource)
    except Exception as exc:  # pydantic's ValidationError names the field
        raise FhirError(f"the {kind} built for export is not valid FHIR R4: {exc}") from None
    out: dict[str, Any] = json.loads(parsed.model_dump_json(exclude_none=True))
    return out


def _subject(meta: ImageMeta, policy: str, repo_id: str) -> dict[str, Any]:
    """The patient as a logical reference. Research: the stored (pseudonymous) id under a
    system that says so, no name."""
    patient_id = meta.attribute("PatientID")
    if policy == "research":
        return {"type": "Patient", "identifier": {
            "system": f"urn:radcrypt:pseudonym:{repo_id}" if repo_id else "urn:radcrypt:pseudonym",
            "value": patient_id or "unknown"}}
    subject: dict[str, Any] = {"type": "Patient"}
    if patient_id:
        subject["identifier"] = {"value": patient_id}
    if name := meta.attribute("PatientName"):
        subject["display"] = " ".join(p for p in name.split("^") if p)
    if len(subject) == 1:
        subject["display"] = "unknown patient"
    return subject


def _sop_class(meta: ImageMeta) -> dict[str, Any]:
    uid = meta.attribute("SOPClassUID")
    if uid:
        return {"system": URI, "code": f"urn:oid:{uid}"}
    return {"system": URI, "code": "urn:oid:1.2.840.10008.5.1.4.1.1.7"}  # Secondary Capture


def _coding(table: dict[str, tuple[str, str]], value: str) -> dict[str, Any]:
    known = table.get(value.strip().upper())
    if known:
        return {"system": SNOMED, "code": known[0], "display": known[1]}
    return {"display": value.strip()}


def _date(value: str) -> str:
    """DICOM DA (YYYYMMDD) -> FHIR date (YYYY-MM-DD); "" when it is not a valid date."""
    value = value.strip()
    try:
        return datetime.strptime(value[:8], "%Y%m%d").date().isoformat()
    except ValueError:
        return ""


def _number(value: str) -> int | None:
    try:
        number = int(float(value.split("\\")[0]))
    except (ValueError, IndexError):
        return None
    return number if number >= 0 else None


def _series_order(members: list[ImageMeta]) -> tuple[int, str]:
    number = _number(members[0].attribute("SeriesNumber"))
    return (number if number is not None else 1 << 30, members[0].attribute("SeriesInstanceUID"))


def _resource_id(uid: str) -> str:
    """A FHIR id ([A-Za-z0-9.-], 64 at most): the UID itself when it fits, else a digest."""
    if uid and len(uid) <= 64 and all(c.isdigit() or c == "." for c in uid):
        return uid
    return hashlib.sha256(uid.encode()).hexdigest()[:64]
