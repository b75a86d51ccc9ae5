"""The DICOM network from the command line against a real PACS (Orthanc): `radcrypt pacs
node add/ls/rm`, `pacs echo`, `pacs find --json`, `import --from-pacs NODE --study UID`
(C-GET) and `send --to NODE --study` (issue 18). Each command that opens the repository
unlocks the identity (seconds on a loaded machine), so there are two of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

try:
    import dimse_support as ds
    from servers import Orthanc
except ImportError:  # pragma: no cover
    from tests.integration import dimse_support as ds
    from tests.integration.servers import Orthanc

STUDY_CLI = "1.2.826.0.1.3680043.8.498.7719.1"


@pytest.fixture(scope="module")
def world(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[ds.Workstation, dict[str, list[Path]]]]:
    root = tmp_path_factory.mktemp("pacs-cli")
    files = {STUDY_CLI: ds.write_series(root / "cli", 2, study_uid=STUDY_CLI,
                                        series_uid=f"{STUDY_CLI}.1", source="MR_small.dcm")}
    orthanc.upload_many(files[STUDY_CLI])
    with ds.workstation(root) as station:
        yield station, files


def test_cli_nodes_echo_find_import_and_send(world: Any, orthanc: Orthanc,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ws, files = world
    run = ds.run_cli(monkeypatch, capsys, Path(ws.settings.data_dir))
    code, out, err = run("pacs", "node", "add", "pacs1", "--aet", "ORTHANC", "--host",
                         "127.0.0.1", "--port", str(orthanc.dicom_port))
    assert code == 0, err
    code, out, err = run("pacs", "node", "add", "bad", "--aet", "X" * 17, "--host", "h",
                         "--port", "104")
    assert code == 1 and "node bad: the AE title must have 1 to 16 characters" in err
    code, out, _ = run("pacs", "node", "ls", "--json")
    assert [n["name"] for n in json.loads(out)["nodes"]] == ["pacs1"]
    code, out, err = run("pacs", "echo", "pacs1")
    assert code == 0 and "pacs1: ok" in out, err
    code, out, err = run("pacs", "find", "pacs1", "--modality", "MR", "--json")
    assert code == 0, err
    assert STUDY_CLI in {s["study_uid"] for s in json.loads(out)["studies"]}
    code, out, err = run("import", "--repo", "pacs", "--from-pacs", "pacs1", "--study",
                         STUDY_CLI, "--json")
    assert code == 0, err
    imported = json.loads(out)["imported"]
    assert len(imported) == 2
    assert {ds.sop_uid(p) for p in files[STUDY_CLI]} <= ws.sop_uids()
    # the PACS lost the study: send it back from the archive, whole
    requests.delete(f"{orthanc.url}/studies/{orthanc.study_id(STUDY_CLI)}", timeout=30)
    code, out, err = run("send", "--repo", "pacs", "--to", "pacs1", "--study",
                         imported[0]["image_id"])
    assert code == 0 and "sent 2 to pacs1, failed 0" in out, err
    assert len(orthanc.study_instances(STUDY_CLI)) == 2
    code, out, err = run("pacs", "node", "rm", "pacs1")
    assert code == 0, err
    code, _, err = run("pacs", "echo", "pacs1")
    assert code == 1 and "no DICOM node named 'pacs1'" in err
