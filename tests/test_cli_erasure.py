"""`radcrypt rm` and `radcrypt repo hold` (issue 16; app/core/erasure.py through the facade).

The dry run lists what goes (by image id, naming its study), nothing is erased without
--yes when there is no terminal, a legal hold refuses the erasure until lifted, and the
erased image is no longer listed. The core behaviour (no ciphertext left, never found
again, re-import) is tested in tests/test_erasure.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

try:
    from fixtures import format2_support as fx
    from workstation import cli_runner
except ImportError:  # pragma: no cover
    from tests.fixtures import format2_support as fx
    from tests.workstation import cli_runner


PASSWORD = "erasure test password 1"


def test_the_rm_and_hold_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = cli_runner(tmp_path / "data", PASSWORD, monkeypatch, capsys)
    assert run("identity", "create", "--name", "Archivist")[0] == 0
    assert run("repo", "create", "cli-rm")[0] == 0
    files = [str(f) for f in fx.sample_files(2, skip=4)]  # CT_small.dcm, ExplVR_BigEnd.dcm
    code, out, _ = run("import", "--repo", "cli-rm", "--batch-size", "2", "--json", *files)
    assert code == 0
    victim = next(i["image_id"] for i in json.loads(out)["imported"]
                  if i["path"].endswith("CT_small.dcm"))

    # the dry run by image id names its study (its StudyInstanceUID); erase that study
    code, out, _ = run("rm", "--repo", "cli-rm", victim[:10], "--dry-run", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["dry_run"] is True
    assert [i["image_id"] for i in plan["images"]] == [victim]
    study = plan["images"][0]["study"]
    code, _, err = run("rm", "--repo", "cli-rm", "--study", study)  # no terminal, no --yes
    assert code == 1 and "--yes" in err
    with pytest.raises(SystemExit) as usage:
        run("rm", "--repo", "cli-rm", victim, "--study", study)
    assert usage.value.code == 2

    code, out, _ = run("repo", "hold", "--repo", "cli-rm", "on")
    assert code == 0 and "legal hold on" in out
    code, _, err = run("rm", "--repo", "cli-rm", "--study", study, "--yes")
    assert code != 0 and "legal hold" in err
    assert run("repo", "hold", "--repo", "cli-rm", "off")[0] == 0

    code, out, _ = run("rm", "--repo", "cli-rm", "--study", study, "--yes", "--json")
    done = json.loads(out)
    assert code == 0 and len(done["entries"]) == 1 and done["originals_deleted"] == 1
    code, out, _ = run("ls", "--repo", "cli-rm", "--json")
    assert code == 0 and victim not in out and "ExplVR_BigEnd.dcm" in out
