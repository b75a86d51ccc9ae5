"""Workstation search mode (issue 19) through the facade and the CLI: the same calls as an
sknn repository (create with ``search``, import, search by file and by image id, get the
original, ``radcrypt repo create --search``, ``radcrypt search``), no search service
started (``ckks``: tests/test_ckks_mode.py). Real sample DICOM files, a directory store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

try:
    from workstation import cli_runner, sample_files
except ImportError:  # pragma: no cover
    from tests.workstation import cli_runner, sample_files

from app.core.errors import RadcryptError
from app.core.settings import Settings


def test_facade_create_import_search_get(tmp_path: Path) -> None:
    from app.core import client as facade
    from app.core.client import Client

    settings = Settings(store="directory", data_dir=str(tmp_path / "data"), workers=1)
    facade.create_identity(settings, "Dr. Owner", "correct horse battery staple 19")
    files = sample_files(3)
    with Client.unlock(settings, "correct horse battery staple 19") as client:
        with pytest.raises(RadcryptError, match="search mode must be one of"):
            client.create_repository("he", search="quantum")
        repo = client.create_repository("ws", search="workstation")
        assert client.search_mode(repo) == "workstation"
        assert facade.manifest_dict(repo.manifest)["search"] == "workstation"
        client.import_files(repo, files)
        results = client.search_files(repo, files[:2], k=2)
        assert [r.hits[0].distance for r in results] == [0.0, 0.0]
        assert all(r.stats["mode"] == "workstation" for r in results)
        top = results[0].hits[0]
        similar = client.search_by_image_id(repo, top.image_id, 2)
        assert top.image_id not in [h.image_id for h in similar.hits]
        got = tmp_path / "got.dcm"
        client.get_original(repo, top.image_id, got)
        assert got.read_bytes() == next(f for f in files if f.name == top.name).read_bytes()
        assert client.session._embedded_service is None  # no search service was started
        check = client.check_repository(repo, read_data=True)  # ids-only segments pass
        assert check.ok, [p for p in check.problems]


def test_cli_repo_create_search_and_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = cli_runner(tmp_path / "data", "workstation cli password 19", monkeypatch, capsys)
    assert run("identity", "create", "--name", "Dr. Local")[0] == 0
    code, out, _ = run("repo", "create", "local", "--search", "workstation", "--json")
    assert code == 0 and json.loads(out)["search"] == "workstation"
    files = [str(f) for f in sample_files(2)]
    assert run("import", "--repo", "local", *files)[0] == 0
    code, out, _ = run("search", "--repo", "local", "-k", "1", "--json", files[0])
    assert code == 0, out
    answer = json.loads(out)
    assert json.dumps(answer).count('"mode": "workstation"') >= 1
