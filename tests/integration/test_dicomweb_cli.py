"""The command line's DICOMweb and FHIR, end to end against a real Orthanc: `pacs echo|find
--dicomweb URL`, `import --dicomweb URL --study UID` (QIDO-RS, WADO-RS, then the normal
import path), `get ... --fhir out.json` and `radcrypt fhir`, in a directory-store
repository.

Needs the wiring patches /work/p16-H1-cli.patch, /work/p16-H2-cli.patch,
/work/p16-H2-cli_pacs.patch and /work/p16-H2-facade.patch (issue 18).
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle

from app.cli import main
from app.core import client as facade
from app.core.settings import Settings

try:
    from servers import Orthanc
    from test_dicomweb import AXIAL, STUDY, make_study
except ImportError:  # pragma: no cover
    from tests.integration.servers import Orthanc
    from tests.integration.test_dicomweb import AXIAL, STUDY, make_study

PASSWORD = "cli dicomweb passphrase: amber harbour 73"


def test_find_import_get_fhir_through_the_cli(orthanc: Orthanc, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    files = make_study(tmp_path / "files")
    for path in files["study"]:
        orthanc.upload(path)
    data = tmp_path / "data"
    facade.create_identity(Settings(store="directory", data_dir=str(data), workers=1),
                           "Dr. Web", PASSWORD)
    monkeypatch.setenv("RADCRYPT_PASSWORD", PASSWORD)
    url = orthanc.dicomweb_url

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--store", "directory", "--data-dir", str(data), *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run("pacs", "echo", "--dicomweb", url)
    assert code == 0 and "ok" in out, err
    code, out, err = run("pacs", "find", "--dicomweb", url, "--patient-name", "DOE*", "--json")
    assert code == 0, err
    found = json.loads(out)["studies"]
    assert [(s["study_uid"], s["instance_count"]) for s in found] == [(STUDY, 7)]
    with pytest.raises(SystemExit):  # neither a node nor a URL: a usage error
        run("pacs", "find")

    assert run("repo", "create", "web")[0] == 0
    code, out, err = run("import", "--repo", "web", "--dicomweb", url, "--study", STUDY)
    assert code == 0 and "imported 7" in out, err
    code, out, err = run("ls", "--repo", "web", "--json")
    images = {i["name"]: i["image_id"] for i in json.loads(out)["images"]}
    assert len(images) == 7, images

    # get --fhir: the original, byte for byte, and a Bundle that parses back as R4
    image_id = sorted(images.values())[0]
    out_file, fhir_file = tmp_path / "out.dcm", tmp_path / "out.json"
    code, out, err = run("get", "--repo", "web", image_id, "-o", str(out_file),
                         "--fhir", str(fhir_file))
    assert code == 0 and "wrote FHIR R4 Bundle" in err, err
    sop = str(pydicom.dcmread(out_file, stop_before_pixels=True).SOPInstanceUID)
    source = next(p for p in files["study"]
                  if str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) == sop)
    assert out_file.read_bytes() == source.read_bytes()
    bundle = json.loads(fhir_file.read_text())
    Bundle.model_validate(bundle)
    study, doc = (e["resource"] for e in bundle["entry"])
    assert study["numberOfInstances"] == 7 and study["numberOfSeries"] == 2
    assert AXIAL in {s["uid"] for s in study["series"]}
    assert doc["content"][0]["attachment"]["size"] == out_file.stat().st_size
    assert doc["masterIdentifier"]["value"] == f"urn:oid:{sop}"

    code, out, err = run("fhir", "--repo", "web", image_id, "-o", str(tmp_path / "one.json"),
                         "--instance-only", "--json")
    assert code == 0 and json.loads(out)["fhir"] == str(tmp_path / "one.json"), err
    one = json.loads((tmp_path / "one.json").read_text())
    assert [e["resource"]["numberOfInstances"] for e in one["entry"]] == [1]
