"""Migration of a format-1 repository to storage format 2 (docs/FORMAT-2.md 9).

What must hold: every image is searchable exactly once afterwards, with the very same
scores (the service's engine answers one token identically before and after), the same
metadata and preview; originals are untouched; the manifest says format 2 at sequence
S + 1; no ``meta/``, ``thumbs/`` or format-1 segment is left. A migration that fails after
any one of its writes (a failure injected into the store after the Nth put or delete, for
every N) is finished by running it again, with the same result. Only the owner migrates.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

try:
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests.fixtures import format2_support as fx

from app.core import objects
from app.core.access import grant_access, register_user
from app.core.compaction import compact
from app.core.errors import AccessDenied, RadcryptError
from app.core.logstate import verified_log
from app.core.migration import migrate_to_format2
from app.core.repository import (
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_V2,
    Repository,
    is_format2,
    read_signed_manifest,
)
from app.core.settings import Settings
from cloud import layout, seglog
from cloud.directory_store import DirectoryStore
from cloud.segments import HEADER_SIZE_V2, parse_header
from crypto.identity import Identity
from crypto.tokens import QueryToken

FROZEN = Path(__file__).with_name("fixtures") / "format1_bucket.json"


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    found = DirectoryStore(tmp_path / "bucket")
    found.ensure_bucket()
    return found


class Before:
    """What a format-1 repository holds, to compare with after the migration."""

    def __init__(self, store: DirectoryStore, owner: fx.Workstation, repo: Repository) -> None:
        assert not is_format2(repo.manifest)
        self.sequence = repo.manifest.sequence
        self.token: QueryToken = fx.query_token(repo, fx.all_features(store, owner.settings,
                                                                      repo))
        self.answers = fx.engine_answers(store, owner.settings, repo, self.token)
        self.contents = fx.contents(store, owner.settings, repo)
        self.originals = fx.originals(store, repo.repo_id)
        self.count = len(self.contents)
        assert self.count and self.count == len(fx.v1_meta_ids(store, repo.repo_id))

    def assert_migrated(self, store: DirectoryStore, who: fx.Workstation, repo_id: str,
                        where: str = "", repo: Repository | None = None) -> Repository:
        """``repo``: as the migration returned it (else opened by ``who`` now)."""
        # a workstation that never saw this bucket (the test restores it between runs)
        who = fx.Workstation(who.identity, fx.StoreSession(store, fx.fresh_settings()))
        repo = repo or who.open(repo_id)
        manifest, _ = read_signed_manifest(store, repo_id, repo.owner_key)
        assert manifest.format == MANIFEST_FORMAT_V2, where
        assert manifest.sequence == self.sequence + 1, where
        assert is_format2(repo.manifest), where
        counts = fx.image_counts(store, who.settings, repo)
        assert len(counts) == self.count and set(counts.values()) == {1}, where
        assert fx.contents(store, who.settings, repo) == self.contents, where
        fx.assert_same_answers(self.answers,
                               fx.engine_answers(store, who.settings, repo, self.token))
        assert fx.originals(store, repo_id) == self.originals, where  # never touched
        assert not fx.v1_meta_ids(store, repo_id), where
        assert not list(store.list_keys(layout.image_prefix("thumbs", repo_id))), where
        assert _format1_segments(store, repo_id) == [], where
        return repo


def _format1_segments(store: DirectoryStore, repo_id: str) -> list[str]:
    found = []
    for key in store.list_keys(layout.segments_prefix(repo_id)):
        header = parse_header(store.get_range(key, 0, HEADER_SIZE_V2), key.rsplit("/", 1)[-1])
        if header.format_version == 1:
            found.append(key)
    return found


def _entries(store: DirectoryStore, repo_id: str) -> list[seglog.LogEntry]:
    keys = sorted(store.list_keys(layout.log_prefix(repo_id)))
    return [seglog.decode_payload(store.get(key)[101:], key) for key in keys]


def test_migration_keeps_every_image_once_with_identical_answers(store: DirectoryStore
                                                                 ) -> None:
    owner, (alice,), repo = fx.repository(store, "migrate-me", 7, 2, 1, members=1)
    before = Before(store, owner, repo)
    assert len(_format1_segments(store, repo.repo_id)) == 4  # 2 + 2 + 2 + 1 images
    events: list[Any] = []

    report = migrate_to_format2(store, owner.settings, owner.identity, repo, events.append)
    assert report.committed and report.repo is not None
    assert is_format2(report.repo.manifest)
    assert (report.segments_migrated, report.images, report.duplicates) == (4, 7, 0)
    assert report.skipped == [] and len(report.entries) == 1
    assert report.deleted == 7 + 7 + 4  # meta, thumbs, format-1 segments
    assert {e.stage for e in events} == {"migrate", "cleanup"}
    for who in (owner, alice):  # the member reads it too, through the log's trust
        before.assert_migrated(store, who, repo.repo_id)

    # the log: genesis at the old sequence, one replace (migration) by the owner naming
    # the four format-1 segments, a checkpoint at its head
    genesis, entry = _entries(store, repo.repo_id)
    assert genesis.kind == seglog.KIND_GENESIS
    assert genesis.manifest_sequence == before.sequence
    assert (entry.kind, entry.reason, entry.writer) == (
        seglog.KIND_REPLACE, seglog.REASON_MIGRATION, owner.user_id)
    assert {r.type for r in entry.removed} == {seglog.TYPE_V1_SEGMENT}
    assert len(entry.removed) == 4
    assert sorted(a.type for a in entry.added) == [seglog.TYPE_SEGMENT, seglog.TYPE_PACK]
    assert list(store.list_keys(layout.checkpoints_prefix(repo.repo_id))) == [
        layout.checkpoint_key(repo.repo_id, 1)]

    # running it again changes nothing; the repository now takes format-2 writes
    again = migrate_to_format2(store, owner.settings, owner.identity, repo)
    assert again.entries == [] and again.deleted == 0 and again.committed
    migrated = owner.open(repo.repo_id)
    imported = alice.importer(alice.open(repo.repo_id), 2).run(fx.sample_files(2, skip=7))
    assert len(imported.imported) == 2
    compacted = compact(store, owner.settings, migrated, owner.identity, grace_seconds=0)
    assert (compacted.segments_after, compacted.packs_after) == (1, 1)
    counts = fx.image_counts(store, owner.settings, migrated)
    assert len(counts) == 9 and set(counts.values()) == {1}


def test_migration_failing_after_any_write_is_finished_by_running_it_again(
        store: DirectoryStore) -> None:
    owner, (alice,), repo = fx.repository(store, "migrate-crash", 5, 2, 1, members=1)
    before = Before(store, owner, repo)
    saved = fx.snapshot(store)
    counting = fx.FaultyStore(store)
    migrate_to_format2(counting, fx.fresh_settings(), owner.identity, repo, pack_images=4)
    writes = list(counting.writes)
    # genesis; two groups of pack, segment, entry; checkpoint; manifest; then the
    # cleanup's 5 meta, 5 thumbs and 3 format-1 segments
    assert len(writes) == 1 + 2 * 3 + 2 + 13, writes
    assert sum("/log/" in w for w in writes) == 3

    for n in range(1, len(writes) + 1):
        fx.restore(store, saved)
        settings = fx.fresh_settings()  # the owner's workstation, the same for both runs
        with pytest.raises(fx.InjectedFailure):
            migrate_to_format2(fx.FaultyStore(store, fail_after=n), settings,
                               owner.identity, repo, pack_images=4)
        # the same call again, with the Repository the owner had before the failure
        report = migrate_to_format2(store, settings, owner.identity, repo, pack_images=4)
        where = f"failure after write {n} ({writes[n - 1]})"
        assert report.committed, where
        before.assert_migrated(store, owner, repo.repo_id, where, report.repo)
    for who in (owner, alice):  # both open the last one from scratch
        before.assert_migrated(store, who, repo.repo_id)


def test_an_image_in_two_format1_segments_is_migrated_once(store: DirectoryStore) -> None:
    owner, _, repo = fx.repository(store, "migrate-twice", 4, 2, 1)
    before = Before(store, owner, repo)
    first = sorted(store.list_keys(layout.segments_prefix(repo.repo_id)))[0]
    copy = layout.segment_key(repo.repo_id, layout.new_id())
    store.put(copy, store.get(first))  # e.g. what an interrupted rewrite left behind
    report = migrate_to_format2(store, owner.settings, owner.identity, repo)
    assert report.duplicates == 2 and report.images == 4
    assert report.segments_migrated == 3
    before.assert_migrated(store, owner, repo.repo_id)


def test_a_format1_commit_racing_the_migration_is_migrated_too(store: DirectoryStore
                                                               ) -> None:
    """Draft 9.2 step 4: an old client commits a format-1 segment after the migration
    listed them; the cleanup finds and migrates it."""
    owner, _, repo = fx.repository(store, "migrate-race", 4, 2, 1)
    late = fx.sample_files(2, skip=4)
    old_client = fx.format1_importer(store, repo, 2)  # format-1 code, as of before

    def old_client_commits(key: str) -> None:
        assert len(old_client.run(late).imported) == 2

    racing = fx.HookStore(store, lambda key: "/checkpoints/" in key, old_client_commits)
    report = migrate_to_format2(racing, owner.settings, owner.identity, repo)
    assert racing.fired and len(report.entries) == 2
    assert report.images == 6 and report.segments_migrated == 3
    migrated = owner.open(repo.repo_id)
    counts = fx.image_counts(store, owner.settings, migrated)
    assert len(counts) == 6 and set(counts.values()) == {1}
    assert not fx.v1_meta_ids(store, repo.repo_id)
    assert _format1_segments(store, repo.repo_id) == []
    assert verified_log(store, owner.settings, migrated).images() == 6


def test_only_the_owner_migrates(store: DirectoryStore) -> None:
    _, (alice,), repo = fx.repository(store, "migrate-owner", 2, 2, 1, members=1)
    saved = fx.snapshot(store)
    with pytest.raises(AccessDenied, match="owner"):
        migrate_to_format2(store, alice.settings, alice.identity, alice.open(repo.repo_id))
    assert fx.snapshot(store) == saved
    manifest, _ = read_signed_manifest(store, repo.repo_id, repo.owner_key)
    assert manifest.format == MANIFEST_FORMAT


def test_an_empty_repository_migrates(store: DirectoryStore) -> None:
    owner, _, repo = fx.repository(store, "migrate-empty", 0, 2, 1)
    report = migrate_to_format2(store, owner.settings, owner.identity, repo)
    assert report.committed and report.entries == [] and report.deleted == 0
    migrated = owner.open(repo.repo_id)
    assert migrated.manifest.format == MANIFEST_FORMAT_V2
    assert migrated.manifest.sequence == repo.manifest.sequence + 1
    assert len(owner.importer(migrated, 2).run(fx.sample_files(3)).imported) == 3
    counts = fx.image_counts(store, owner.settings, migrated)
    assert len(counts) == 3 and set(counts.values()) == {1}


def test_a_bucket_written_by_format1_code_migrates(store: DirectoryStore, tmp_path: Path
                                                   ) -> None:
    """tests/fixtures/format1_bucket.json: a format-1 bucket made once and kept (see
    tests/fixtures/gen_format1_bucket.py), so old buckets stay migratable."""
    frozen = json.loads(FROZEN.read_text(encoding="utf-8"))
    for key, data in frozen["objects"].items():
        store.put(key, base64.b64decode(data))
    owner = fx.Workstation(Identity.from_bytes(base64.b64decode(frozen["owner_identity"])),
                           fx.StoreSession(store, fx.fresh_settings()))
    repo = owner.open(frozen["repo_id"])
    before = Before(store, owner, repo)
    assert sorted(before.contents) == frozen["images"]
    assert len(_format1_segments(store, repo.repo_id)) == frozen["segments"]
    report = migrate_to_format2(store, owner.settings, owner.identity, repo)
    assert report.images == len(frozen["images"]) and report.skipped == []
    migrated = before.assert_migrated(store, owner, repo.repo_id)
    found = fx.reader(store, owner.settings, migrated)
    for image_id in frozen["images"]:  # originals open as before, and match their metadata
        meta, _ = found.meta(image_id)
        assert meta["format"] == "radcrypt-meta-v2"
        dest = tmp_path / image_id
        objects.fetch_original(store, migrated.ring, repo.repo_id, image_id, dest)
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == meta["sha256"]


def test_search_through_the_facade_finds_the_same_before_and_after(tmp_path: Path) -> None:
    """The whole path: the client, the search service a session starts, the service's
    reading of the log (format 2) or of every segment (format 1). Each image's features
    as a query, k = every image: the same images at the same true distances, in the same
    order; after the migration the answer is checked complete against the log."""
    from app.core import client as facade
    from app.core.access import create_repository_as

    settings = Settings(store="directory", data_dir=str(tmp_path / "data"), workers=1)
    identity = Identity.generate("Dr. Migrate")
    with facade.Client(settings, identity) as client:
        # format 1 is read-only for the product: made and filled as format-1 code did
        repo = client.remember(create_repository_as(client.session, identity,
                                                    "migrate-facade", storage_format=1))
        store = client.session.store
        fx.format1_importer(store, repo, 2).run(fx.sample_files(5))
        features = fx.all_features(store, settings, repo)
        before = client.search_features(repo, features, [str(i) for i in range(5)], k=5)
        report = migrate_to_format2(store, settings, identity, repo)
        assert report.committed and report.images == 5
    with facade.Client(settings, identity) as client:  # a new session: a new service
        migrated = client.open_repository("migrate-facade")
        assert is_format2(migrated.manifest)
        after = client.search_features(migrated, features, [str(i) for i in range(5)], k=5)
    for old, new in zip(before, after, strict=True):
        assert new.complete is True and new.segments_expected == new.segments_searched == 1
        assert {h.image_id: h.distance for h in old.hits} == {
            h.image_id: h.distance for h in new.hits}
        assert [h.distance for h in old.hits] == [h.distance for h in new.hits]


def test_a_manifest_change_during_the_migration_is_not_undone(store: DirectoryStore
                                                             ) -> None:
    """The owner grants someone from another workstation while the migration runs: the
    migration must not publish its format-2 manifest over that change; run again, it
    commits with the new member listed."""
    owner, _, repo = fx.repository(store, "migrate-grant", 2, 2, 1)
    bob = fx.Workstation.make(store, "Bob")
    elsewhere = fx.Workstation(owner.identity, fx.StoreSession(store, fx.fresh_settings()))

    def grant_bob(key: str) -> None:
        register_user(elsewhere.session, owner.identity, bob.identity.card().to_json())
        grant_access(elsewhere.session, owner.identity, elsewhere.open(repo.repo_id),
                     bob.user_id)

    racing = fx.HookStore(store, lambda key: "/checkpoints/" in key, grant_bob)
    with pytest.raises(RadcryptError, match="changed during the migration"):
        migrate_to_format2(racing, owner.settings, owner.identity, repo)
    manifest, _ = read_signed_manifest(store, repo.repo_id, repo.owner_key)
    assert manifest.format == MANIFEST_FORMAT and manifest.is_member(bob.user_id)
    report = migrate_to_format2(store, owner.settings, owner.identity, repo)
    assert report.committed and report.repo is not None
    assert report.repo.manifest.is_member(bob.user_id)
    assert report.repo.manifest.sequence == manifest.sequence + 1
    counts = fx.image_counts(store, bob.settings, bob.open(repo.repo_id))
    assert len(counts) == 2 and set(counts.values()) == {1}


def test_an_image_whose_metadata_is_gone_is_left_out_and_named(store: DirectoryStore
                                                              ) -> None:
    owner, _, repo = fx.repository(store, "migrate-damaged", 3, 3, 1)
    lost = sorted(fx.v1_meta_ids(store, repo.repo_id))[0]
    store.delete(layout.meta_key(repo.repo_id, lost))
    report = migrate_to_format2(store, owner.settings, owner.identity, repo)
    assert report.committed and report.images == 2
    assert report.skipped == [(lost, "its metadata or preview is missing")]
    counts = fx.image_counts(store, owner.settings, owner.open(repo.repo_id))
    assert len(counts) == 2 and lost not in counts
    assert _format1_segments(store, repo.repo_id) == []  # its segment was migrated
