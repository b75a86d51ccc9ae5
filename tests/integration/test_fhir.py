"""HL7 FHIR R4 export (app/integration/fhir.py), validated by parsing it back with
fhir.resources' R4B models.

From real files (a two-series CT study written from pydicom-data's CT_small, and
emri_small, a 10-frame MR instance): the ImagingStudy lists series, instances (a
multi-frame instance once), modality, body site (SNOMED), started, counts; the
DocumentReference names the decrypted file by URL, size and SHA-1. End to end through the
facade (directory store): a clinical repository's export names the patient; a research
repository's export carries only the pseudonyms and new UIDs its de-identification wrote,
none of the source's identifiers; the CLI (`radcrypt fhir`, `get --fhir` once wired) writes
the same Bundle.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.imagingstudy import ImagingStudy
from pydicom.data import get_testdata_file

from app.core import client as facade
from app.core.meta import ImageMeta
from app.core.settings import Settings
from app.imaging.clinical import clinical_attributes
from app.integration import fhir

try:
    from test_dicomweb import AXIAL, SCOUT, STUDY, make_study
except ImportError:  # pragma: no cover
    from tests.integration.test_dicomweb import AXIAL, SCOUT, STUDY, make_study

PASSWORD = "fhir passphrase: copper lantern 48 meadow"
MR_MULTI = "emri_small.dcm"


def _metas(path: Path, image_id: str) -> list[ImageMeta]:
    """The archive's view of a file: one ImageMeta per frame, as the importer keeps it."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return [ImageMeta(image_id=f"{image_id}-{f}", name=path.name, source_format="dicom",
                      clinical=clinical_attributes(ds), frame=f, frames=frames,
                      original_id=f"{image_id}-0" if f else "") for f in range(frames)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    found = make_study(tmp_path_factory.mktemp("fhir-files"))
    found["multi"] = [Path(get_testdata_file(MR_MULTI))]
    return found


def test_imaging_study_of_a_two_series_study(files: dict[str, list[Path]]) -> None:
    metas = [m for i, p in enumerate(files["study"]) for m in _metas(p, f"img{i}")]
    data = fhir.imaging_study(metas, policy="clinical", repo_id="r1")
    study = ImagingStudy.model_validate(data)  # what we wrote parses back as R4
    assert study.status == "available" and study.started.isoformat() == "2024-01-31"
    assert study.numberOfSeries == 2 and study.numberOfInstances == 7
    assert study.identifier[0].value == f"urn:oid:{STUDY}"
    assert study.identifier[1].value == "ACC-1" and study.identifier[1].type.coding[0].code \
        == "ACSN"
    assert [c.code for c in study.modality] == ["CT"]
    assert study.subject.identifier.value == "P-17" and study.subject.display == "DOE JANE"
    assert study.description == "CHEST W CONTRAST"
    scout, axial = study.series
    assert (scout.uid, scout.number, scout.numberOfInstances) == (SCOUT, 1, 2)
    assert (axial.uid, axial.number, axial.numberOfInstances) == (AXIAL, 2, 5)
    assert axial.modality.code == "CT" and axial.modality.system.endswith("/DCM")
    assert (axial.bodySite.system, axial.bodySite.code) == ("http://snomed.info/sct",
                                                            "51185008")
    assert [i.number for i in axial.instance] == [1, 2, 3, 4, 5]
    assert [i.uid for i in axial.instance] == [f"{AXIAL}.{n}" for n in range(1, 6)]
    assert axial.instance[0].sopClass.code == "urn:oid:1.2.840.10008.5.1.4.1.1.2"  # CT


def test_a_multi_frame_instance_counts_once(files: dict[str, list[Path]]) -> None:
    metas = _metas(files["multi"][0], "mf")
    assert len(metas) == 10
    study = ImagingStudy.model_validate(fhir.imaging_study(metas))
    assert study.numberOfInstances == 1 and study.series[0].numberOfInstances == 1
    assert study.series[0].bodySite.code == "69536005"  # HEAD
    assert study.series[0].modality.code == "MR"


def test_refusals_name_the_image(files: dict[str, list[Path]]) -> None:
    mixed = _metas(files["study"][0], "a") + _metas(files["other"][0], "b")
    with pytest.raises(fhir.FhirError, match="belong to 2 studies"):
        fhir.imaging_study(mixed)
    with pytest.raises(fhir.FhirError, match="image png1 has no Study Instance UID"):
        fhir.imaging_study([ImageMeta(image_id="png1", source_format="png")])
    with pytest.raises(fhir.FhirError, match="no readable image"):
        fhir.imaging_study([ImageMeta.damaged("x", "bad MAC")])


def test_document_reference_names_the_file_by_url_size_and_sha1(
        files: dict[str, list[Path]]) -> None:
    path = files["study"][0]
    meta = _metas(path, "img0")[0]
    data = fhir.document_reference(meta, path, repo_id="r1", study_ref="urn:uuid:x")
    doc = DocumentReference.model_validate(data)
    attachment = doc.content[0].attachment
    assert attachment.url == path.resolve().as_uri() and attachment.size == path.stat().st_size
    sha1 = hashlib.sha1(path.read_bytes()).digest()
    assert attachment.hash == sha1  # the model decodes FHIR's base64
    assert data["content"][0]["attachment"]["hash"] == base64.b64encode(sha1).decode()
    assert attachment.contentType == "application/dicom"
    assert (doc.type.coding[0].system, doc.type.coding[0].code) == ("http://loinc.org",
                                                                    "18748-4")
    assert doc.masterIdentifier.value == f"urn:oid:{AXIAL}.1"
    assert doc.identifier[0].system == "urn:radcrypt:image:r1"
    assert doc.context.related[0].reference == "urn:uuid:x"
    with pytest.raises(fhir.FhirError, match=r"cannot read .*missing\.dcm"):
        fhir.document_reference(meta, path.parent / "missing.dcm")


# --- end to end through the facade ------------------------------------------------------------


class World:
    def __init__(self, root: Path, files: dict[str, list[Path]]) -> None:
        self.root = root
        self.settings = Settings(store="directory", data_dir=str(root / "data"), workers=1)
        self.files = files
        self.client: facade.Client
        self.repos: dict[str, Any] = {}
        self.ids: dict[str, dict[str, str]] = {}  # policy -> file name -> image id (frame 0)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, files: dict[str, list[Path]]
          ) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("fhir-world"), files)
    identity = facade.create_identity(w.settings, "Dr. Fhir", PASSWORD)
    sources = files["study"] + files["multi"]
    with facade.Client(w.settings, identity) as client:
        for policy in ("clinical", "research"):
            repo = client.create_repository(f"fhir-{policy}", policy=policy)
            report = client.import_files(repo, sources)
            assert not report.failed, report
            metas = client.list_images(repo)
            assert len(metas) == 7 + 10
            if policy == "clinical":
                w.ids[policy] = {m.name: m.image_id for m in metas if m.frame == 0}
            else:  # research metadata has no file names: match by pixel-derived order
                w.ids[policy] = {m.attribute("SOPInstanceUID"): m.image_id for m in metas
                                 if m.frame == 0}
            w.repos[policy] = repo
        w.client = client
        yield w


def _bundle(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    Bundle.model_validate(data)  # the whole file parses back as an R4 Bundle
    return data


def test_export_of_a_clinical_study_with_its_decrypted_file(world: World, tmp_path: Path
                                                            ) -> None:
    client, repo = world.client, world.repos["clinical"]
    image_id = world.ids["clinical"]["ax3.dcm"]
    original = tmp_path / "ax3.dcm"
    client.get_original(repo, image_id, original)
    out = fhir.export(client, repo, image_id, tmp_path / "out.json", document=original)
    assert out.stat().st_mode & 0o777 == 0o600
    data = _bundle(out)
    assert data["type"] == "collection" and len(data["entry"]) == 2
    study, doc = (e["resource"] for e in data["entry"])
    assert study["resourceType"] == "ImagingStudy" and study["numberOfInstances"] == 7
    assert study["subject"]["display"] == "DOE JANE"
    assert {s["uid"] for s in study["series"]} == {AXIAL, SCOUT}
    assert doc["context"]["related"][0]["reference"] == data["entry"][0]["fullUrl"]
    assert doc["content"][0]["attachment"]["size"] == original.stat().st_size
    assert original.read_bytes() == (world.files["study"][2]).read_bytes()
    assert doc["identifier"][0] == {"system": f"urn:radcrypt:image:{repo.repo_id}",
                                    "value": image_id}
    # one instance only, and a multi-frame instance (any of its frames) counted once
    single = _bundle(fhir.export(client, repo, image_id, tmp_path / "one.json",
                                 whole_study=False))
    assert [e["resource"]["numberOfInstances"] for e in single["entry"]] == [1]
    frame = next(m for m in client.list_images(repo) if m.frame == 4)
    multi = _bundle(fhir.export(client, repo, frame.image_id, tmp_path / "mf.json"))
    assert multi["entry"][0]["resource"]["numberOfInstances"] == 1


def test_export_of_a_research_study_carries_pseudonyms_only(world: World, tmp_path: Path
                                                            ) -> None:
    client, repo = world.client, world.repos["research"]
    image_id = next(iter(world.ids["research"].values()))
    meta = client.image_meta(repo, image_id)
    original = tmp_path / "copy.dcm"
    client.get_original(repo, image_id, original)
    out = fhir.export(client, repo, image_id, tmp_path / "research.json", document=original)
    text = out.read_text()
    data = _bundle(out)
    study = data["entry"][0]["resource"]
    assert study["subject"] == {"type": "Patient", "identifier": {
        "system": f"urn:radcrypt:pseudonym:{repo.repo_id}",
        "value": meta.attribute("PatientID")}}
    # none of the source's identifiers: names, ids, accession, UIDs, file names
    source = pydicom.dcmread(world.files["study"][0], stop_before_pixels=True)
    for value in ("DOE", "JANE", "P-17", "ACC-1", STUDY, AXIAL, SCOUT, "ax1.dcm",
                  str(source.SOPInstanceUID)):
        assert value not in text, value
    assert meta.attribute("PatientID") and meta.attribute("PatientID") != "P-17"
    assert study["identifier"][0]["value"] == f"urn:oid:{meta.attribute('StudyInstanceUID')}"


def test_cli_fhir_command_writes_the_bundle(world: World, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`radcrypt fhir` through app/cli_fhir.py's register (the same wiring app/cli.py
    gets), on a parser of its own so it runs before the cli.py patch lands."""
    from app import cli, cli_fhir

    monkeypatch.setenv("RADCRYPT_PASSWORD", PASSWORD)
    parser = argparse.ArgumentParser(prog="radcrypt")
    cli._add_globals(parser, top=True)
    cli_fhir.register(parser.add_subparsers(dest="command"), cli._command)
    image_id = world.ids["clinical"]["sc1.dcm"]
    args = parser.parse_args(["fhir", "--store", "directory", "--data-dir",
                              str(world.root / "data"), "--repo", "fhir-clinical", image_id,
                              "-o", str(tmp_path / "cli.json")])
    assert args.func(args) == 0
    data = _bundle(tmp_path / "cli.json")
    assert [e["resource"]["resourceType"] for e in data["entry"]] == ["ImagingStudy"]
    assert data["entry"][0]["resource"]["numberOfSeries"] == 2
