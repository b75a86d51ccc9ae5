"""The access log (app/core/access_log.py): every decryption of an original or a preview
is recorded, only the owners can read it, and the owner's reader rejects an entry that
is forged, reordered, moved, deleted or withheld (each attack performed on the bucket
below, the way a cloud or a member would).

Most tests work on the module with a directory store (fast, no service); the last two go
through the facade (app/core/client.py) with a real import of DICOM files: each
``thumbnail_png`` and ``get_original`` leaves one entry naming the image and its study,
and nothing is decrypted when the entry cannot be written (the owner's user record is
gone, or the workstation is locked).
"""

from __future__ import annotations

import copy as copy_module
import csv
import io
import json
import shutil
from pathlib import Path

import pytest

try:
    import owned_repos
except ImportError:  # pragma: no cover
    from tests import owned_repos

from app.core import access_log
from app.core.access import grant_access, register_user
from app.core.errors import RadcryptError
from app.core.repository import Repository
from app.core.settings import Settings
from cloud import layout
from cloud.directory_store import DirectoryStore
from crypto.identity import Identity
from crypto.signed import sign_json

STUDY = "1.2.826.0.1.3680043.8.498.11111"
SERIES = "1.2.826.0.1.3680043.8.498.22222"


def _image(n: int) -> str:
    return f"{n:032x}"


class World:
    """A directory store, a repository owned by ``owner`` with ``reader`` a member."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = DirectoryStore(tmp_path / "bucket")
        self.store.ensure_bucket()
        self.owner_settings = Settings(store="directory", data_dir=str(tmp_path / "owner"))
        self.owner = Identity.generate("Dr. Owner")
        self.reader = Identity.generate("Dr. Reader")
        session = owned_repos.StoreSession(self.store, self.owner_settings)
        self.repo: Repository = owned_repos.create_owned_repository(
            session, "ct-access", self.owner)
        register_user(session, self.owner, self.reader.card().to_json())
        grant_access(session, self.owner, self.repo, self.reader.user_id)
        self.reader_repo = owned_repos.open_owned_repository(
            self.store, self.reader, "ct-access", data_dir=tmp_path / "reader")

    def writer(self, who: Identity | None = None) -> access_log.AccessLogWriter:
        who = who or self.reader
        repo = self.reader_repo if who is self.reader else self.repo
        return access_log.AccessLogWriter(self.store, repo, who)

    def read(self, settings: Settings | None = None) -> access_log.AccessReport:
        return access_log.read_access_log(self.store, self.repo, self.owner, settings)

    def chain(self, who: Identity) -> list[str]:
        return sorted(self.store.list_keys(access_log.access_prefix(self.repo.repo_id,
                                                                    who.user_id)))


@pytest.fixture(scope="module")
def made_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Made once (a repository's keys take seconds); each test gets a copy."""
    return World(tmp_path_factory.mktemp("access-world"))


@pytest.fixture
def world(made_world: World, tmp_path: Path) -> World:
    """A copy of ``made_world``: its bucket and the owner's data directory copied."""
    copy = copy_module.copy(made_world)
    bucket = tmp_path / "bucket"
    shutil.copytree(made_world.store.root, bucket)
    shutil.copytree(made_world.owner_settings.data_path, tmp_path / "owner")
    copy.store = DirectoryStore(bucket)
    copy.owner_settings = Settings(store="directory", data_dir=str(tmp_path / "owner"))
    return copy


def _record(world: World, count: int, purpose: str = "tumour board") -> None:
    writer = world.writer()
    for n in range(count):
        action = "original" if n % 2 else "preview"
        writer.record(action, [_image(n)], {_image(n): {
            "clinical": {"StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES}}}, purpose)


def test_each_decryption_is_recorded_and_read_back_by_the_owner(world: World) -> None:
    _record(world, 3)
    world.writer().record("preview", [_image(10), _image(11)])  # one entry, two events
    report = world.read()
    assert report.ok, report.problems
    assert [(e.action, e.image_id) for e in report.events] == [
        ("preview", _image(0)), ("original", _image(1)), ("preview", _image(2)),
        ("preview", _image(10)), ("preview", _image(11))]
    first = report.events[0]
    assert (first.user_id, first.user_name, first.study_uid, first.series_uid,
            first.purpose) == (world.reader.user_id, "Dr. Reader", STUDY, SERIES,
                               "tumour board")
    assert report.events[-1].study_uid == "" and report.events[-1].purpose == ""
    assert report.chains == {world.reader.user_id: 4}
    assert len(world.chain(world.reader)) == 4
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [r["image_id"] for r in rows] == [e.image_id for e in report.events]
    assert rows[1]["action"] == "original" and rows[1]["study_uid"] == STUDY
    assert json.loads(report.to_json())["events"][2]["image_id"] == _image(2)


def test_the_cloud_and_members_cannot_read_it(world: World) -> None:
    _record(world, 2, purpose="second opinion")
    for key in world.chain(world.reader):
        blob = world.store.get(key)
        for secret in (_image(0), _image(1), STUDY, "second opinion", "Dr. Reader"):
            assert secret.encode() not in blob, (key, secret)
    with pytest.raises(RadcryptError, match="only an owner"):
        access_log.read_access_log(world.store, world.reader_repo, world.reader)


def test_a_forged_entry_is_rejected_and_the_entries_before_it_kept(world: World) -> None:
    _record(world, 2)
    stranger = Identity.generate("Mallory")  # or the cloud: no member's signing key
    name = access_log.entry_key(world.repo.repo_id, world.reader.user_id, 2)
    previous = access_log.hashlib.sha256(world.store.get(world.chain(world.reader)[-1]))
    payload: dict[str, object] = {
        "repo": world.repo.repo_id, "user": world.reader.user_id, "user_name": "Dr. Reader",
        "host": "h", "sequence": 2, "previous": previous.hexdigest(),
        "time": "2999-01-01T00:00:00+00:00",
        "events": [{"action": "original", "image": _image(99), "study": "", "series": "",
                    "purpose": ""}]}
    world.store.put(name, access_log.seal_entry(
        name, sign_json(stranger, "access", name, payload), [world.owner.card()]))
    report = world.read()
    assert [e.image_id for e in report.events] == [_image(0), _image(1)]
    assert len(report.problems) == 1 and name in report.problems[0]
    assert "not trusted" in report.problems[0]


def test_a_member_cannot_write_into_another_users_chain(world: World) -> None:
    owner_writer = world.writer(world.owner)
    owner_writer.record("original", [_image(1)])
    # the reader appends, signed by themselves, under the owner's name
    name = access_log.entry_key(world.repo.repo_id, world.owner.user_id, 1)
    payload: dict[str, object] = {
        "repo": world.repo.repo_id, "user": world.owner.user_id, "user_name": "Dr. Owner",
        "host": "h", "sequence": 1,
        "previous": access_log.hashlib.sha256(world.store.get(world.chain(world.owner)[0])
                                              ).hexdigest(),
        "time": "2999-01-01T00:00:00+00:00", "events": []}
    world.store.put(name, access_log.seal_entry(
        name, sign_json(world.reader, "access", name, payload), [world.owner.card()]))
    report = world.read()
    assert [e.image_id for e in report.events] == [_image(1)]
    assert len(report.problems) == 1 and name in report.problems[0]


def test_reordered_entries_are_rejected(world: World) -> None:
    _record(world, 4)
    keys = world.chain(world.reader)
    second, third = world.store.get(keys[1]), world.store.get(keys[2])
    world.store.put(keys[1], third)
    world.store.put(keys[2], second)
    report = world.read()
    assert [e.image_id for e in report.events] == [_image(0)]
    assert len(report.problems) == 1 and keys[1] in report.problems[0]


def test_a_replaced_entry_breaks_the_link_of_the_next(world: World) -> None:
    """A member rewriting their own entry 1 (validly signed, linked to entry 0) cannot
    hide it: entry 2 still names the hash of the entry 1 it followed."""
    _record(world, 3)
    keys = world.chain(world.reader)
    name = keys[1]
    payload: dict[str, object] = {
        "repo": world.repo.repo_id, "user": world.reader.user_id, "user_name": "Dr. Reader",
        "host": "h", "sequence": 1,
        "previous": access_log.hashlib.sha256(world.store.get(keys[0])).hexdigest(),
        "time": "2999-01-01T00:00:00+00:00",
        "events": [{"action": "preview", "image": _image(50), "study": "", "series": "",
                    "purpose": ""}]}
    world.store.put(name, access_log.seal_entry(
        name, sign_json(world.reader, "access", name, payload), [world.owner.card()]))
    report = world.read()
    assert [e.image_id for e in report.events] == [_image(0), _image(50)]
    assert len(report.problems) == 1 and keys[2] in report.problems[0]
    assert "link" in report.problems[0]


def test_deleted_and_withheld_entries_are_named(world: World, tmp_path: Path) -> None:
    _record(world, 4)
    settings = world.owner_settings
    assert world.read(settings).ok  # heads remembered: 4 entries of the reader
    keys = world.chain(world.reader)
    middle = world.store.get(keys[1])
    world.store.delete(keys[1])  # a gap
    report = world.read(settings)
    assert [e.image_id for e in report.events] == [_image(0)]
    assert any("entry 1 is missing" in p for p in report.problems)
    world.store.put(keys[1], middle)
    world.store.delete(keys[3])  # the newest withheld: only the remembered head tells
    report = world.read(settings)
    assert [e.image_id for e in report.events] == [_image(0), _image(1), _image(2)]
    assert any("verified before" in p and "up to 2" in p for p in report.problems)
    fresh = Settings(store="directory", data_dir=str(tmp_path / "another-workstation"))
    assert world.read(fresh).ok  # a workstation that never saw entry 3 cannot tell


def test_an_entry_moved_to_another_repository_or_user_does_not_open(world: World) -> None:
    _record(world, 1)
    blob = world.store.get(world.chain(world.reader)[0])
    owner_chain = access_log.entry_key(world.repo.repo_id, world.owner.user_id, 0)
    world.store.put(owner_chain, blob)
    report = world.read()
    assert [e.user_id for e in report.events] == [world.reader.user_id]
    assert len(report.problems) == 1 and owner_chain in report.problems[0]


def test_an_entry_not_addressed_to_the_owner_is_rejected(world: World) -> None:
    """Every writer addresses the owner: an entry the owner cannot open (here a valid
    member's, sealed only to themselves) is not quietly counted as unreadable."""
    _record(world, 1)
    name = access_log.entry_key(world.repo.repo_id, world.reader.user_id, 1)
    payload: dict[str, object] = {
        "repo": world.repo.repo_id, "user": world.reader.user_id, "user_name": "Dr. Reader",
        "host": "h", "sequence": 1,
        "previous": access_log.hashlib.sha256(
            world.store.get(world.chain(world.reader)[0])).hexdigest(),
        "time": "2999-01-01T00:00:00+00:00", "events": []}
    world.store.put(name, access_log.seal_entry(
        name, sign_json(world.reader, "access", name, payload), [world.reader.card()]))
    report = world.read()
    assert [e.image_id for e in report.events] == [_image(0)]
    assert len(report.problems) == 1 and name in report.problems[0]
    assert "not addressed" in report.problems[0] and report.unreadable == {}


def test_concurrent_writers_of_one_user_lose_nothing(world: World) -> None:
    one, two = world.writer(), world.writer()  # two processes of the same user
    for n in range(6):
        (one if n % 2 else two).record("preview", [_image(n)])
    report = world.read()
    assert report.ok, report.problems
    assert sorted(e.image_id for e in report.events) == [_image(n) for n in range(6)]
    assert [e.sequence for e in report.events] == list(range(6))


def test_a_bad_action_or_image_id_is_refused_before_anything_is_written(world: World
                                                                        ) -> None:
    with pytest.raises(ValueError, match="action"):
        world.writer().record("download", [_image(1)])
    with pytest.raises(ValueError, match="image_id"):
        world.writer().record("preview", ["../../manifest.json"])
    assert world.chain(world.reader) == []
    assert layout.repo_prefix(world.repo.repo_id) in access_log.access_prefix(
        world.repo.repo_id)


# --- through the facade (app/core/client.py) -------------------------------------------------


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Identity, list[Path]]:
    """An owner on disk and a directory-store repository "ct-facade" holding two real
    DICOM files (pydicom's CT_small and MR_small)."""
    from pydicom.data import get_testdata_file

    from app.core.client import Client

    root = tmp_path_factory.mktemp("access-facade")
    settings = Settings(store="directory", data_dir=str(root / "data"), workers=1)
    owner = owned_repos.identity_on_disk(settings.data_path, "Dr. Owner")
    files = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        files.append(Path(str(get_testdata_file(name))))
    with Client(settings, owner) as client:
        repo = client.create_repository("ct-facade")
        report = client.import_files(repo, files)
        assert len(report.imported) == 2
    return settings, owner, files


def test_the_facade_records_each_preview_and_original(
        imported: tuple[Settings, Identity, list[Path]], tmp_path: Path) -> None:
    from pydicom import dcmread

    from app.core.client import Client
    from app.core.errors import AccessDenied

    settings, owner, files = imported
    with Client(settings, owner) as client:
        repo = client.open_repository("ct-facade")
        metas = {m.name: m for m in client.list_images(repo)}
        ct, mr = metas["CT_small.dcm"], metas["MR_small.dcm"]
        before = len(client.access_log(repo).events)
        client.access_purpose = "audit test"
        assert client.thumbnail_png(repo, ct.image_id).startswith(b"\x89PNG")
        size = client.get_original(repo, mr.image_id, tmp_path / "mr.dcm")
        assert size == files[1].stat().st_size
        events = client.access_log(repo).events[before:]
        assert [(e.action, e.image_id, e.purpose) for e in events] == [
            ("preview", ct.image_id, "audit test"), ("original", mr.image_id, "audit test")]
        assert events[0].study_uid == str(dcmread(files[0]).StudyInstanceUID)
        assert events[1].study_uid == str(dcmread(files[1]).StudyInstanceUID)
        assert events[0].user_id == owner.user_id

        client.lock()  # the keys are forgotten: nothing more is decrypted or recorded
        with pytest.raises(RadcryptError, match="locked"):
            client.thumbnail_png(repo, ct.image_id)
        other = Identity.generate("Somebody Else")
        with pytest.raises(AccessDenied):
            client.resume(other)
        client.resume(owner)
        assert len(client.access_log(repo).events) == before + 2


def test_nothing_is_decrypted_when_the_entry_cannot_be_written(
        imported: tuple[Settings, Identity, list[Path]], tmp_path: Path) -> None:
    from app.core.client import Client

    settings, owner, _ = imported
    with Client(settings, owner) as client:
        repo = client.open_repository("ct-facade")
        image_id = client.image_ids(repo)[0]
        store = client.session.store
        record = layout.user_key(owner.user_id)
        kept = store.get(record)
        store.delete(record)  # the owner's card is gone: no entry can be addressed
        try:
            with pytest.raises(RadcryptError, match="user record"):
                client.get_original(repo, image_id, tmp_path / "out.dcm")
            assert not (tmp_path / "out.dcm").exists()
            assert not list(tmp_path.iterdir())  # not even a temporary file
        finally:
            store.put(record, kept)


def test_radcrypt_audit_access_exports_csv_and_json(
        imported: tuple[Settings, Identity, list[Path]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from app import cli
    from app.core.client import Client

    settings, owner, _ = imported
    with Client(settings, owner) as client:
        repo = client.open_repository("ct-facade")
        image_id = client.image_ids(repo)[0]
    monkeypatch.setenv("RADCRYPT_PASSWORD", owned_repos.STRONG_PASSWORD)
    where = ["--store", "directory", "--data-dir", settings.data_dir]
    assert cli.main(["get", *where, "--repo", "ct-facade", image_id, "-o",
                     str(tmp_path / "x.dcm"), "--purpose", "CLI check"]) == 0
    out = tmp_path / "access.csv"
    capsys.readouterr()
    assert cli.main(["audit", *where, "--repo", "ct-facade", "--access", "--csv",
                     "-o", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert rows[-1]["image_id"] == image_id and rows[-1]["purpose"] == "CLI check"
    assert rows[-1]["action"] == "original" and rows[-1]["user_id"] == owner.user_id
    assert cli.main(["audit", *where, "--repo", "ct-facade", "--access", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["events"][-1]["image_id"] == image_id
    # entry 0 replaced by a copy of entry 1 (the cloud reordering): named on stderr,
    # exit status 1, and nothing after the break exported (this test runs last: it
    # damages the module's repository)
    store = DirectoryStore(settings.objects_dir)
    store.put(access_log.entry_key("ct-facade", owner.user_id, 0),
              store.get(access_log.entry_key("ct-facade", owner.user_id, 1)))
    assert cli.main(["audit", *where, "--repo", "ct-facade", "--access", "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["events"] == []
    assert access_log.entry_key("ct-facade", owner.user_id, 0) in captured.err
    assert "rejected" in captured.err
