"""Batched access-log entries (issue 16 access log, issue 17 maintenance):

* ``radcrypt check --read-data`` decrypts every preview (pack entries) and original: it
  writes ONE entry per run, action "check", purpose "integrity check", naming every image,
  before the first decryption; the owner's ``radcrypt audit --access`` shows it; when the
  entry cannot be written the check decrypts nothing; a check that reads no data records
  nothing.
* ``Client.previews`` (the archive's tiles) writes ONE entry naming every image it
  decrypts, with each image's study, instead of one entry per preview.

Through the facade (app/core/client.py) and the CLI, on a real import of two DICOM files
(pydicom's CT_small and MR_small) in a directory store.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

try:
    import owned_repos
except ImportError:  # pragma: no cover
    from tests import owned_repos

from app.core import access_log
from app.core.errors import RadcryptError
from app.core.settings import Settings
from cloud import layout
from crypto.identity import Identity

Imported = tuple[Settings, Identity, list[Path]]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    from pydicom.data import get_testdata_file

    from app.core.client import Client

    root = tmp_path_factory.mktemp("access-batch")
    settings = Settings(store="directory", data_dir=str(root / "data"), workers=1)
    owner = owned_repos.identity_on_disk(settings.data_path, "Dr. Owner")
    files = [Path(str(get_testdata_file(n))) for n in ("CT_small.dcm", "MR_small.dcm")]
    with Client(settings, owner) as client:
        repo = client.create_repository("batch")
        assert len(client.import_files(repo, files).imported) == 2
    return settings, owner, files


def _entries(client: Any, repo: Any, owner: Identity) -> list[str]:
    return sorted(client.session.store.list_keys(
        access_log.access_prefix(repo.repo_id, owner.user_id)))


def test_check_read_data_records_one_entry_naming_every_image(
        imported: Imported, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from app import cli
    from app.core.client import Client

    settings, owner, _ = imported
    with Client(settings, owner) as client:
        repo = client.open_repository("batch")
        ids = client.image_ids(repo)
        before = _entries(client, repo, owner)
        assert client.check_repository(repo).ok  # no data read: nothing recorded
        assert _entries(client, repo, owner) == before
        report = client.check_repository(repo, read_data=True)
        assert report.ok and report.counts["originals read"] == 2, report.lines()
        after = _entries(client, repo, owner)
        assert len(after) == len(before) + 1  # ONE entry for the run
        events = [e for e in client.access_log(repo).events if e.entry == after[-1]]
        assert sorted(e.image_id for e in events) == sorted(ids)
        assert {(e.action, e.purpose, e.user_id) for e in events} == {
            ("check", "integrity check", owner.user_id)}

    monkeypatch.setenv("RADCRYPT_PASSWORD", owned_repos.STRONG_PASSWORD)
    where = ["--store", "directory", "--data-dir", settings.data_dir]
    capsys.readouterr()
    assert cli.main(["check", *where, "--repo", "batch", "--read-data", "--json"]) == 0
    capsys.readouterr()
    assert cli.main(["audit", *where, "--repo", "batch", "--access", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    last = data["events"][-1]["entry"]
    run = [e for e in data["events"] if e["entry"] == last]
    assert sorted(e["image_id"] for e in run) == sorted(ids)
    assert {(e["action"], e["purpose"]) for e in run} == {("check", "integrity check")}
    assert cli.main(["audit", *where, "--repo", "batch", "--access"]) == 0
    table = capsys.readouterr().out
    assert all(f"check     {i}" in table for i in ids) and "integrity check" in table


def test_a_check_whose_entry_cannot_be_written_decrypts_nothing(
        imported: Imported, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.core import repo_check
    from app.core.client import Client

    opened: list[str] = []
    real_stream, real_pack = repo_check.aead.decrypt_stream, repo_check.packs.open_pack

    def stream(*args: Any, **kwargs: Any) -> Any:
        opened.append("original")
        return real_stream(*args, **kwargs)

    def pack(*args: Any, **kwargs: Any) -> Any:
        opened.append("pack")
        return real_pack(*args, **kwargs)

    monkeypatch.setattr(repo_check.aead, "decrypt_stream", stream)
    monkeypatch.setattr(repo_check.packs, "open_pack", pack)
    settings, owner, _ = imported
    with Client(settings, owner) as client:
        repo = client.open_repository("batch")
        store = client.session.store
        record = layout.user_key(owner.user_id)
        kept = store.get(record)
        store.delete(record)  # the owner's card is gone: no entry can be addressed
        try:
            with pytest.raises(RadcryptError, match="user record"):
                client.check_repository(repo, read_data=True)
            assert opened == []
        finally:
            store.put(record, kept)
        assert client.check_repository(repo, read_data=True).ok
        assert sorted(opened) == ["original", "original", "pack"]  # the spies do see reads


def test_previews_of_an_archive_view_are_one_entry_naming_every_image(
        imported: Imported) -> None:
    from pydicom import dcmread

    from app.core.client import Client

    settings, owner, files = imported
    with Client(settings, owner) as client:
        repo = client.open_repository("batch")
        metas = client.list_images(repo)
        studies = {m.image_id: str(dcmread(files[[f.name for f in files].index(m.name)])
                                   .StudyInstanceUID) for m in metas}
        before = _entries(client, repo, owner)
        arrived: dict[str, bytes] = {}
        client.access_purpose = "archive"
        previews = client.previews(repo, metas, arrived=arrived.__setitem__)
        after = _entries(client, repo, owner)
        assert len(after) == len(before) + 1
        assert previews == arrived and set(previews) == set(studies)
        assert all(png.startswith(b"\x89PNG") for png in previews.values())
        events = [e for e in client.access_log(repo).events if e.entry == after[-1]]
        assert {(e.action, e.image_id, e.study_uid, e.purpose) for e in events} == {
            ("preview", i, s, "archive") for i, s in studies.items()}
        # ids alone: the same previews; the study read from the metadata
        assert client.previews(repo, sorted(studies)) == previews
        last = _entries(client, repo, owner)[-1]
        again = [e for e in client.access_log(repo).events if e.entry == last]
        assert {(e.image_id, e.study_uid) for e in again} == set(studies.items())
        assert client.previews(repo, []) == {}
        assert len(_entries(client, repo, owner)) == len(after) + 1  # nothing for nothing


def test_the_largest_check_entry_is_written_and_read_back_whole(tmp_path: Path) -> None:
    """MAX_CHECK_EVENTS images fit one entry below the reader's size limit."""
    from cloud.directory_store import DirectoryStore

    store = DirectoryStore(tmp_path / "bucket")
    store.ensure_bucket()
    owner = Identity.generate("Dr. Owner")
    made = owned_repos.StoreSession(store, Settings(store="directory",
                                                    data_dir=str(tmp_path / "d")))
    repo = owned_repos.create_owned_repository(made, "big-check", owner)
    # what record_check needs of a session (app/core/session.py Session)
    session = SimpleNamespace(store=store, access_logs={}, log_lock=threading.Lock())
    ids = [f"{n:032x}" for n in range(access_log.MAX_CHECK_EVENTS + 1)]
    written = access_log.record_check(session, repo, owner, ids)
    assert written == 2  # the one past the limit goes to a second entry
    (first, _) = sorted(store.list_keys(access_log.access_prefix(repo.repo_id)))
    assert len(store.get(first)) < access_log.MAX_ENTRY_BYTES
    report = access_log.read_access_log(store, repo, owner)
    assert report.ok and [e.image_id for e in report.events] == ids
    assert {e.action for e in report.events} == {"check"}
