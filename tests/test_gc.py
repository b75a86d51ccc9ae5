"""`radcrypt gc` (app/core/gc.py): the orphans of a dead import are listed by check and
removed after the grace period, under the exclusive lock; nothing the log keeps is ever
removed.

The dead import is real: the importer runs over a store that fails the moment it is
asked to write the batch's log entry (the commit point), so the originals, the pack and
the segment it uploaded before are left behind exactly as after a crash. Each test starts
from a copy of one pristine repository (two images, two import batches).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

try:
    from fixtures import format2_support as fx
    from workstation import cli_runner
except ImportError:  # pragma: no cover
    from tests.fixtures import format2_support as fx
    from tests.workstation import cli_runner

from app.core import gc, locks
from app.core.compaction import compact
from app.core.errors import AccessDenied, IntegrityError
from app.core.importer import Importer
from app.core.locks import LockConflict
from app.core.repo_check import check_repository
from app.core.repository import Repository
from cloud import layout
from cloud.backend import list_with_times, modified_time
from cloud.directory_store import DirectoryStore

FILES = 2
PASSWORD = "correct horse battery staple 14"


class Built(fx.PristineBucket):
    def build(self, store: DirectoryStore) -> None:
        self.owner, (self.member,), self.repo = fx.repository(store, "gc-repo", FILES, 1, 2,
                                                              members=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("gc"))


def _importer(who: fx.Workstation, repo: Repository, store: Any) -> Importer:
    """An importer without the workstation's rollback memory (each test's bucket is a
    copy of the pristine one, and the memory would see the copies as rollbacks)."""
    return Importer(store, repo, batch_size=2, processes=False, writer=who.identity)


def _dead_import(built: Built, store: DirectoryStore, skip: int = FILES, count: int = 2
                 ) -> None:
    importer = _importer(built.owner, built.repo, fx.DiesAtCommit(store))
    with pytest.raises(fx.Crash):
        importer.run(fx.sample_files(count, skip=skip))


def _orphans(store: DirectoryStore, repo: Repository) -> set[tuple[str, str]]:
    report = check_repository(store, None, repo)
    assert report.ok, report.lines()
    return {(s.type, s.id) for s in gc.orphans(report)}


def _bytes(store: DirectoryStore) -> dict[str, bytes]:
    return fx.snapshot(store)


def test_a_dead_import_leaves_orphans_that_check_lists_and_gc_removes(built: Built,
                                                                      tmp_path: Path) -> None:
    store = built.fresh(tmp_path)
    before = _bytes(store)
    _dead_import(built, store)
    report = check_repository(store, None, built.repo)
    assert report.ok, report.lines()  # orphans are not problems
    found = gc.orphans(report)
    assert sorted(s.type for s in found) == ["original", "original", "pack", "segment"]
    assert all(s.age_s is not None and 0 <= s.age_s < 600 for s in found)
    assert all(s.authentic is True for s in found if s.type != "original")
    assert all("written" in s.line() for s in found)
    assert report.counts["images"] == FILES

    owner = built.owner
    kept = gc.collect_garbage(store, None, built.repo, owner.identity)  # grace 24 h
    assert kept.removed == [] and len(kept.kept) == 4
    dry = gc.collect_garbage(store, None, built.repo, owner.identity, grace_seconds=0,
                             dry_run=True)
    assert len(dry.removed) == 4 and dry.lines()[0].startswith("would remove ")
    assert len(gc.orphans(check_repository(store, None, built.repo))) == 4
    events: list[str] = []
    done = gc.collect_garbage(store, None, built.repo, owner.identity, grace_seconds=0,
                              progress=lambda e: events.append(e.stage))
    assert {(s.type, s.id) for s in done.removed} == {(s.type, s.id) for s in found}
    assert done.bytes_removed == sum(s.size for s in found) > 0
    assert events.count("gc") == 4 and done.lines()[0].startswith("removed ")
    assert _bytes(store) == before  # exactly the orphans went; every kept byte is the same
    assert _orphans(store, built.repo) == set()
    assert locks.list_locks(store, built.repo) == []  # the exclusive lock released

    # the same files imported again (a resumed import) are committed whole
    _importer(built.owner, built.repo, store).run(
        fx.sample_files(2, skip=FILES))
    after = check_repository(store, None, built.repo, read_data=True)
    assert after.ok and after.counts["images"] == FILES + 2 and after.strays == []


def test_gc_keeps_orphans_younger_than_the_grace_period(built: Built, tmp_path: Path) -> None:
    store = built.fresh(tmp_path)
    _dead_import(built, store)
    now = time.time()
    young = gc.collect_garbage(store, None, built.repo, built.owner.identity,
                               grace_seconds=3600, now=now)
    assert young.removed == [] and len(young.kept) == 4
    later = gc.collect_garbage(store, None, built.repo, built.owner.identity,
                               grace_seconds=3600, now=now + 3601)
    assert len(later.removed) == 4 and later.kept == []


def test_gc_refuses_while_an_import_holds_a_shared_lock(built: Built, tmp_path: Path) -> None:
    """The race gc exists to lose: an import has uploaded originals, not yet committed."""
    store = built.fresh(tmp_path)
    refused: list[BaseException] = []

    def gc_now(key: str) -> None:
        try:
            gc.collect_garbage(store, None, built.repo, built.owner.identity,
                               grace_seconds=0)
        except LockConflict as exc:
            refused.append(exc)

    hooked = fx.HookStore(store, lambda key: "/objects/" in key, gc_now)
    importer = _importer(built.member, built.repo, hooked)
    with locks.shared(store, built.repo, built.member.identity):
        report = importer.run(fx.sample_files(2, skip=FILES))
    assert hooked.fired and len(refused) == 1
    assert built.member.user_id in str(refused[0]) and "shared" in str(refused[0])
    assert len(report.imported) == 2
    check = check_repository(store, None, built.repo, read_data=True)
    assert check.ok and check.counts["images"] == FILES + 2 and check.strays == []


def test_gc_is_for_the_owner_and_for_a_clean_repository_only(built: Built, tmp_path: Path
                                                             ) -> None:
    store = built.fresh(tmp_path)
    _dead_import(built, store)
    with pytest.raises(AccessDenied, match="only the owner"):
        gc.collect_garbage(store, None, built.repo, built.member.identity, grace_seconds=0)
    live = sorted(store.list_keys(layout.segments_prefix(built.repo.repo_id)))
    orphan_segments = {i for t, i in _orphans(store, built.repo) if t == "segment"}
    victim = next(k for k in live if k.rsplit("/", 1)[-1] not in orphan_segments)
    store.delete(victim)  # the cloud lost a live segment: "unreferenced" means nothing now
    keys = set(store.list_keys("radcrypt/"))
    with pytest.raises(IntegrityError, match="deletes nothing until"):
        gc.collect_garbage(store, None, built.repo, built.owner.identity, grace_seconds=0)
    assert set(store.list_keys("radcrypt/")) == keys


def test_gc_never_removes_objects_a_log_entry_names(built: Built, tmp_path: Path) -> None:
    """Compaction's replaced objects (removed by a log entry, within its grace period)
    are not orphans: gc with no grace at all leaves them to compaction."""
    store = built.fresh(tmp_path)
    owner = built.owner
    compact(store, fx.fresh_settings(), built.repo, owner.identity, grace_seconds=3600)
    replaced = [s for s in check_repository(store, None, built.repo).strays]
    assert replaced and all(s.state == "removed" for s in replaced)
    keys = set(store.list_keys("radcrypt/"))
    done = gc.collect_garbage(store, None, built.repo, owner.identity, grace_seconds=0)
    assert done.removed == [] and set(store.list_keys("radcrypt/")) == keys


def test_gc_stops_when_the_log_moves_under_it(built: Built, tmp_path: Path) -> None:
    """A writer that takes no lock (an older client) commits while gc checks: gc deletes
    nothing, and the now-committed originals survive."""
    store = built.fresh(tmp_path)
    _dead_import(built, store)

    class CommitsDuringCheck:
        fired = False

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def list_objects_with_times(self, prefix: str) -> Any:
            if prefix == layout.objects_prefix(built.repo.repo_id) and not self.fired:
                self.fired = True  # the dead import's files, resumed by a lock-less client
                _importer(built.member, built.repo, store).run(
                    fx.sample_files(2, FILES))
            return store.list_objects_with_times(prefix)

    keys_before = set(store.list_keys(layout.objects_prefix(built.repo.repo_id)))
    with pytest.raises(IntegrityError, match="moved during gc"):
        gc.collect_garbage(CommitsDuringCheck(), None, built.repo,  # type: ignore[arg-type]
                           built.owner.identity, grace_seconds=0)
    assert keys_before <= set(store.list_keys(layout.objects_prefix(built.repo.repo_id)))
    final = check_repository(store, None, built.repo, read_data=True)
    assert final.ok and final.counts["images"] == FILES + 2
    assert {s.type for s in gc.orphans(final)} == {"segment", "pack"}  # the dead batch's


def test_parse_duration() -> None:
    assert [gc.parse_duration(t) for t in ("24h", "30m", "90s", "2d", "0", "1.5h")] == [
        86400, 1800, 90, 172800, 0, 5400]
    for bad in ("", "h", "-1h", "soon"):
        with pytest.raises(ValueError, match="invalid duration"):
            gc.parse_duration(bad)


def test_stores_tell_last_modified_times(s3_store: Any, tmp_path: Path) -> None:
    """S3 (moto and SeaweedFS) and the directory store: the listing carries each object's
    time, and ``modified`` tells one object's; both near the time it was written."""
    directory = DirectoryStore(tmp_path / "d")
    directory.ensure_bucket()
    for store in (s3_store, directory):
        start = time.time()
        store.put("radcrypt/t/a", b"1")
        store.put("radcrypt/t/b", b"22")
        listed = list(list_with_times(store, "radcrypt/t/"))
        assert [(k, s) for k, s, _ in listed] == [("radcrypt/t/a", 1), ("radcrypt/t/b", 2)]
        for _, _, when in listed:
            assert when is not None and abs(when - start) < 120, (store, when, start)
        when_a = modified_time(store, "radcrypt/t/a")
        assert when_a is not None and abs(when_a - start) < 120
        assert modified_time(store, "radcrypt/t/missing") is None
        assert list(store.list_objects("radcrypt/t/")) == [("radcrypt/t/a", 1),
                                                            ("radcrypt/t/b", 2)]


def test_the_gc_and_unlock_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from app.core.client import Client
    from app.core.settings import load_settings

    run = cli_runner(tmp_path / "data", PASSWORD, monkeypatch, capsys)

    assert run("identity", "create", "--name", "Collector")[0] == 0
    assert run("repo", "create", "cli-gc", "--format", "2")[0] == 0
    files = [str(f) for f in fx.sample_files(2)]
    assert run("import", "--repo", "cli-gc", "--batch-size", "1", files[0])[0] == 0
    settings = load_settings(store="directory", data_dir=str(tmp_path / "data"))
    store = DirectoryStore(settings.objects_dir)
    with Client.unlock(settings, PASSWORD) as client:
        identity = client.identity
        repo = client.open_repository("cli-gc")
    assert locks.list_locks(store, repo) == []  # the import's shared lock is gone
    # an orphan original: the upload of a second image whose batch never committed
    orphan = "0123456789abcdef0123456789abcdef"
    store.put(layout.object_key("cli-gc", orphan), b"x" * 100)

    code, out, _ = run("gc", "--repo", "cli-gc")
    assert code == 0 and "removed 0 orphan(s)" in out.splitlines()[-1]
    assert "kept (within the grace period) original " + orphan in out
    code, out, _ = run("gc", "--repo", "cli-gc", "--grace", "0", "--dry-run", "--json")
    data = json.loads(out)
    assert code == 0 and data["dry_run"] is True and data["grace_seconds"] == 0
    assert [(s["type"], s["id"], s["state"]) for s in data["removed"]] == [
        ("original", orphan, "unreferenced")]
    assert store.exists(layout.object_key("cli-gc", orphan))
    code, out, _ = run("gc", "--repo", "cli-gc", "--grace", "0s")
    assert code == 0 and out.splitlines()[0].startswith(f"removed original {orphan}")
    assert not store.exists(layout.object_key("cli-gc", orphan))
    with pytest.raises(SystemExit) as usage:
        run("gc", "--repo", "cli-gc", "--grace", "soon")
    assert usage.value.code == 2

    # a lock of a dead process: reported, removed by unlock; a fresh one makes gc refuse
    from test_locks import _dead_pid, _write_lock  # one way of writing foreign locks

    fresh = _write_lock(store, repo, identity, host="other-host", pid=1,
                        when=time.time())
    code, _, err = run("gc", "--repo", "cli-gc", "--grace", "0")
    assert code == 1 and "is locked" in err and "other-host" in err
    code, _, err = run("repo", "compact", "cli-gc")  # compaction is exclusive too
    assert code == 1 and "is locked" in err and "other-host" in err
    stale = _write_lock(store, repo, identity, host=locks.this_host(), pid=_dead_pid(),
                        when=time.time())
    code, out, _ = run("unlock", "--repo", "cli-gc", "--json")
    data = json.loads(out)
    assert code == 0 and data["removed"] == [stale] and len(data["locks"]) == 2
    code, out, _ = run("unlock", "--repo", "cli-gc", "--remove-all")
    assert code == 0 and f"removed shared lock {fresh}" in out
    assert locks.list_locks(store, repo) == []
    assert run("repo", "compact", "cli-gc")[0] == 0


@pytest.mark.soak
def test_soak_check_read_data_and_gc_at_1000_images(tmp_path: Path) -> None:
    """Figures for docs/RELIABILITY.md: 1,000 small synthetic DICOMs in batches of 64, a
    dead import of 200 more; check, check --read-data and gc (grace 0) timed; nothing
    the log keeps is lost."""
    try:
        from faults import synthetic_dicoms
    except ImportError:  # pragma: no cover
        from tests.faults import synthetic_dicoms

    store = DirectoryStore(tmp_path / "bucket")
    store.ensure_bucket()
    owner, _, repo = fx.repository(store, "gc-soak", 0, 1, 2)
    files = synthetic_dicoms(tmp_path / "files", 1200, seed=14)
    start = time.perf_counter()
    Importer(store, repo, batch_size=64, processes=False, writer=owner.identity
             ).run(files[:1000])
    imported_s = time.perf_counter() - start
    crashed = Importer(fx.DiesAtCommit(store), repo, batch_size=200, processes=False,  # type: ignore[arg-type]
                       writer=owner.identity)
    with pytest.raises(fx.Crash):
        crashed.run(files[1000:])
    live_before = {k: v for k, v in fx.snapshot(store).items()}
    timings = {}
    start = time.perf_counter()
    plain = check_repository(store, None, repo)
    timings["check"] = time.perf_counter() - start
    start = time.perf_counter()
    full = check_repository(store, None, repo, read_data=True)
    timings["check --read-data"] = time.perf_counter() - start
    assert plain.ok and full.ok, full.lines()[:5]
    assert full.counts["images"] == 1000 and full.counts["originals read"] == 1000
    found = gc.orphans(full)
    assert sum(s.type == "original" for s in found) == 200
    assert sum(s.type in ("pack", "segment") for s in found) == 2
    start = time.perf_counter()
    done = gc.collect_garbage(store, None, repo, owner.identity, grace_seconds=0)
    timings["gc"] = time.perf_counter() - start
    assert len(done.removed) == len(found)
    after = fx.snapshot(store)
    assert {k: live_before[k] for k in after} == after  # nothing kept was changed
    removed = set(live_before) - set(after)
    assert removed == {s.key for s in found}
    final = check_repository(store, None, repo, read_data=True)
    assert final.ok and final.strays == [] and final.counts["images"] == 1000
    print(f"\ngc soak: import of 1000 images {imported_s:.1f} s; "
          + "; ".join(f"{k} {v:.2f} s" for k, v in timings.items())
          + f"; gc removed {len(done.removed)} orphans ({done.bytes_removed} bytes)")
