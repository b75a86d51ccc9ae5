"""Importing into a storage-format-2 repository (docs/FORMAT-2.md 3, 5.3).

A format-2 import writes, per image, only its original; per batch one pack (metadata,
previews, feature array), one authenticated segment and one signed log entry, the commit
point. These tests run the real Importer (decoder children, real identities, a directory
store) and read everything back through app.core.packs.ImageReader and the verified log.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest

from app.core import importer, logstate
from app.core.access import grant_access, open_repository_as, register_user
from app.core.errors import IntegrityError, RadcryptError
from app.core.importer import Importer, image_id_for
from app.core.packs import ImageReader
from app.core.repository import MANIFEST_FORMAT_V2, Repository, is_format2, read_manifest
from app.core.settings import Settings
from app.imaging.decode import decode_image
from app.imaging.worker import analyse
from cloud import layout, seglog
from cloud.backend import ObjectExists, Store, StoreError
from cloud.directory_store import DirectoryStore
from cloud.search import EncryptedIndex, search
from cloud.segments import decode_segment, verify_segment_mac
from crypto import pack
from crypto.identity import Identity
from crypto.segment_mac import index_mac_key

try:
    import e2e_support as support
    import owned_repos
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos
    from tests.fixtures import format2_support as fx

BATCH = 4


def _store(tmp_path: Path) -> DirectoryStore:
    store = DirectoryStore(tmp_path / "bucket")
    store.ensure_bucket()
    return store


def _session(store: Store, tmp_path: Path, who: str) -> owned_repos.StoreSession:
    return owned_repos.StoreSession(store, Settings(data_dir=str(tmp_path / f"data-{who}")))


def _create(store: Store, tmp_path: Path, name: str = "f2"
            ) -> tuple[owned_repos.StoreSession, Identity, Repository]:
    session = _session(store, tmp_path, "owner")
    owner = Identity.generate("Format Two Owner")
    from app.core.access import create_repository_as

    repo = create_repository_as(session, owner, name, storage_format=2)
    return session, owner, repo


def _kinds(store: Store, repo_id: str) -> collections.Counter[str]:
    """How many objects of each kind (first path part under the repository)."""
    prefix = layout.repo_prefix(repo_id)
    return collections.Counter(key[len(prefix):].split("/")[0]
                               for key in store.list_keys(prefix))


def _ids(repo: Repository, files: list[Path]) -> dict[str, Path]:
    return {image_id_for(repo, hashlib.sha256(p.read_bytes()).digest()): p for p in files}


def test_import_writes_one_original_per_image_and_three_objects_per_batch(
        tmp_path: Path) -> None:
    store = _store(tmp_path)
    session, owner, repo = _create(store, tmp_path)
    assert is_format2(repo.manifest) and read_manifest(store, "f2").format == MANIFEST_FORMAT_V2
    files = support.sample_images(10)
    report = Importer(store, repo, workers=2, batch_size=BATCH, writer=owner,
                      settings=session.settings).run(files)
    assert report.failed == [] and len(report.imported) == 10
    batches = 3  # 4 + 4 + 2
    assert len(report.packs) == len(report.segments) == batches
    kinds = _kinds(store, repo.repo_id)
    # per image: its original; per batch: pack, segment, log entry; nothing else per image
    assert kinds["objects"] == 10
    assert (kinds["packs"], kinds["segments"], kinds["log"]) == (batches, batches, batches + 1)
    assert "meta" not in kinds and "thumbs" not in kinds
    assert set(kinds) <= {"objects", "packs", "segments", "log", "manifest.json", "grants",
                          "basis"}

    state = logstate.verified_log(store, session.settings, repo)
    assert state.head.sequence == batches and state.images() == 10
    assert {o.id for o in state.packs()} == set(report.packs)
    assert {o.id for o in state.segments()} == set(report.segments)
    for obj in [*state.packs(), *state.segments()]:  # the log names each object's bytes
        key = (layout.pack_key if obj.type == seglog.TYPE_PACK else layout.segment_key)(
            repo.repo_id, obj.id)
        assert hashlib.sha256(store.get(key)).digest() == obj.sha256
    mac_key = index_mac_key(repo.keys.data_key)
    for seg_id in report.segments:
        key = layout.segment_key(repo.repo_id, seg_id)
        blob = store.get(key)
        verify_segment_mac(blob, key, repo.repo_id, mac_key)
        segment = decode_segment(blob, key)
        assert segment.writer == owner.user_id and segment.format_version == 2

    expected = _ids(repo, files)
    reader = ImageReader(store, repo, state)
    assert reader.image_ids() == set(expected) == {i for _, i in report.imported}
    for image_id, path in expected.items():
        meta, version = reader.meta(image_id)
        assert version == repo.keys.version and meta["name"] == path.name
        assert meta["format"] == "radcrypt-meta-v2"
        wanted = analyse(decode_image(path), repo.manifest.extractor, False).features
        np.testing.assert_allclose(meta["features"], wanted, rtol=1e-12)
        assert reader.thumb(image_id).startswith(b"\x89PNG\r\n\x1a\n")
    pack_ids, features = reader.features_of_pack(report.packs[0])
    assert len(pack_ids) == BATCH and features.shape == (BATCH, repo.manifest.dim)


def test_a_batch_too_large_for_one_pack_is_cut(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path)
    session, owner, repo = _create(store, tmp_path)
    # room for no image at all: each pack then holds one (a pack never holds none)
    monkeypatch.setattr(pack, "MAX_PACK_SIZE", importer.PACK_OVERHEAD + 1)
    report = importer.Importer(store, repo, workers=1, batch_size=3, writer=owner,
                               settings=session.settings, processes=False
                               ).run(support.sample_images(3))
    assert len(report.imported) == 3 and len(report.packs) == len(report.segments) == 3
    state = logstate.verified_log(store, session.settings, repo)
    assert state.head.sequence == 3 and [o.count for o in state.packs()] == [1, 1, 1]


def test_import_without_writer_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _, _, repo = _create(store, tmp_path)
    with pytest.raises(RadcryptError, match=r"storage format 2.*writer"):
        Importer(store, repo, processes=False).run(support.sample_images(1))
    assert _kinds(store, repo.repo_id)["objects"] == 0


class _Interrupting(DirectoryStore):
    """A store whose log stops taking entries after ``allowed`` more (a crash before the
    commit point), and which records every key written."""

    def __init__(self, root: Path, allowed: int) -> None:
        super().__init__(root)
        self.allowed = allowed
        self.written: list[str] = []
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes | bytearray | memoryview, *,
            if_absent: bool = False) -> None:
        with self._lock:
            if "/log/" in key:
                if self.allowed <= 0:
                    raise StoreError(f"simulated crash before {key}")
                self.allowed -= 1
            self.written.append(key)
        super().put(key, data, if_absent=if_absent)


def test_interrupted_import_resumes_without_duplicates_or_uploading_again(
        tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    session, owner, repo = _create(_store(tmp_path), tmp_path)
    files = support.sample_images(12)
    crashing = _Interrupting(root, allowed=1)  # batch 1 commits, batch 2 dies at its entry
    with pytest.raises(StoreError, match="simulated crash"):
        Importer(crashing, repo, workers=2, batch_size=BATCH, writer=owner,
                 settings=session.settings).run(files)
    first = logstate.verified_log(crashing, session.settings, repo)
    committed = ImageReader(crashing, repo, first).image_ids()
    assert len(committed) == BATCH and first.head.sequence == 1
    stored = {k.rsplit("/", 1)[1] for k in crashing.written if "/objects/" in k}
    assert len(stored) >= 2 * BATCH  # batch 2's originals were uploaded before the crash

    again = _Interrupting(root, allowed=100)
    report = Importer(again, repo, workers=2, batch_size=BATCH, writer=owner,
                      settings=session.settings).run(files)
    assert report.failed == []
    assert {i for _, i in report.already_present} == committed
    assert {i for _, i in report.imported} == set(_ids(repo, files)) - committed
    reuploaded = {k.rsplit("/", 1)[1] for k in again.written if "/objects/" in k}
    assert not reuploaded & stored  # an original already stored is not uploaded again

    state = logstate.verified_log(again, session.settings, repo)
    assert state.images() == 12
    counts: collections.Counter[str] = collections.Counter()
    for obj in state.segments():
        key = layout.segment_key(repo.repo_id, obj.id)
        counts.update(decode_segment(again.get(key), key).id_strings())
    assert set(counts) == set(_ids(repo, files)) and set(counts.values()) == {1}
    assert ImageReader(again, repo, state).image_ids() == set(counts)
    # the dead batch's pack and segment stay unreferenced: one more of each than is live
    kinds = _kinds(again, repo.repo_id)
    assert kinds["packs"] == len(state.packs()) + 1
    assert kinds["segments"] == len(state.segments()) + 1


class _Racing(DirectoryStore):
    """Holds the first bound-basis write and the first log entry of each of two writers
    until both are ready to write it, so both try the same object: one wins, the other must
    recognise the loss (adopt the winner's basis; verify the log and retry its entry)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.barriers = {"basis": threading.Barrier(2, timeout=60),
                         "log": threading.Barrier(2, timeout=60)}
        self.held: collections.Counter[str] = collections.Counter()
        self.lost: list[str] = []
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes | bytearray | memoryview, *,
            if_absent: bool = False) -> None:
        race = ("basis" if "/basis/" in key
                else "log" if "/log/" in key and not key.endswith("/" + "0" * 20) else "")
        if race:
            with self._lock:
                self.held[race] += 1
                wait = self.held[race] <= 2
            if wait:
                self.barriers[race].wait()
        try:
            super().put(key, data, if_absent=if_absent)
        except ObjectExists:
            self.lost.append(key)
            raise


def test_two_concurrent_importers_commit_everything(tmp_path: Path) -> None:
    store = _Racing(tmp_path / "bucket")
    store.ensure_bucket()
    owner_session, owner, repo = _create(store, tmp_path)
    member = Identity.generate("Concurrent Member")
    register_user(owner_session, owner, member.card().to_json())
    grant_access(owner_session, owner, repo, member.user_id)
    member_session = _session(store, tmp_path, "member")
    member_repo = open_repository_as(member_session, member, "f2")
    files = support.sample_images(16)
    reports = {}
    errors: list[BaseException] = []

    def run(name: str, importer: Importer, chunk: list[Path]) -> None:
        try:
            reports[name] = importer.run(chunk)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=("owner", Importer(
            store, repo, workers=1, batch_size=2, writer=owner,
            settings=owner_session.settings), files[:8])),
        threading.Thread(target=run, args=("member", Importer(
            store, member_repo, workers=1, batch_size=2, writer=member,
            settings=member_session.settings), files[8:])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert all(not r.failed and len(r.imported) == 8 for r in reports.values())

    state = logstate.verified_log(store, owner_session.settings, repo)
    # Both races happened: one importer lost the bound basis (app/core/basis.py) and
    # adopted the winner's, one lost log entry 1 and redid it at a later sequence (a loser
    # may lose a later entry too). Which importer lost which varies from run to run.
    basis = layout.basis_key(repo.repo_id, repo.keys.version)
    assert store.lost.count(basis) == 1, store.lost
    assert store.lost.count(layout.log_entry_key(repo.repo_id, 1)) == 1, store.lost
    log_keys = {layout.log_entry_key(repo.repo_id, s) for s in range(1, 9)}
    assert set(store.lost) <= log_keys | {basis}, store.lost
    assert state.head.sequence == 8  # after genesis, 4 batches each
    assert state.images() == 16 and len(state.packs()) == 8
    writers = collections.Counter()
    for sequence in range(1, state.head.sequence + 1):
        blob = store.get(layout.log_entry_key(repo.repo_id, sequence))
        writers[seglog.decode_payload(blob[101:], "entry").writer] += 1
    assert writers == {owner.user_id: 4, member.user_id: 4}
    assert ImageReader(store, repo, state).image_ids() == set(_ids(repo, files))
    # Every image of both importers indexed exactly once, and found first by its own
    # features. Its level rows are encrypted with the one stored basis and level keys
    # (the basis loser adopted the winner's): a level vector is (B_m p, ||p - B_m^T B_m p||)
    # (crypto/bounds.py), so for the query p = the image's own features each level scores
    # exactly what the full vector scores, r ||p||^2 / 2; a row under other level keys
    # scores garbage (its noise does not cancel).
    assert fx.image_counts(store, owner_session.settings, repo) == dict.fromkeys(
        _ids(repo, files), 1)
    opened = open_repository_as(owner_session, owner, "f2")  # with the stored basis
    order, parts = fx.index_contents(store, owner_session.settings, opened)
    index = EncryptedIndex.concat(parts)
    reader = ImageReader(store, opened, state)
    for image_id in sorted(reader.image_ids()):
        token = fx.query_token(opened, np.array([reader.meta(image_id)[0]["features"]]))
        assert order[int(search(index, token, 1).positions[0])] == image_id
        row = order.index(image_id)
        full = float(index.full[row] @ token.full[0])
        assert full > 0, image_id
        for level, (rows, tokens) in enumerate(zip(index.levels, token.levels, strict=True)):
            score = float(rows[row] @ tokens[0])
            slack = 1e-9 * (float(np.linalg.norm(rows[row]) * np.linalg.norm(tokens[0]))
                            + full)
            assert abs(score - full) <= slack, (image_id, level, score, full)


def test_a_pack_entry_moved_from_another_pack_does_not_open(tmp_path: Path) -> None:
    store = _store(tmp_path)
    session, owner, repo = _create(store, tmp_path)
    files = support.sample_images(4)
    Importer(store, repo, workers=2, batch_size=BATCH, writer=owner,
             settings=session.settings).run(files)
    state = logstate.verified_log(store, session.settings, repo)
    pack_id = state.packs()[0].id
    name = layout.pack_key(repo.repo_id, pack_id)
    blob = store.get(name)
    toc, plains = pack.open_pack(repo.keys.data_key, repo.repo_id, pack_id, blob)
    victim = toc.image_ids()[0]
    # the same image's entries sealed in another pack: same lengths, another pack id
    other_id = layout.new_id()
    ids = toc.image_ids()
    images = [(i, plains[(pack.KIND_META, i)], plains[(pack.KIND_THUMBS, i)]) for i in ids]
    other = pack.build_pack(repo.keys.data_key, repo.repo_id, other_id, repo.keys.version,
                            images, pack.decode_features(
                                plains[(pack.KIND_FEATURES, pack_id)], ids))
    other_toc = pack.open_toc(repo.keys.data_key, repo.repo_id, other_id, len(other), other)
    moved = other_toc.entry(pack.KIND_META, victim)
    entry = toc.entry(pack.KIND_META, victim)
    assert moved.offset == entry.offset and moved.length == entry.length
    forged = (blob[:entry.offset] + other[moved.offset:moved.offset + moved.length]
              + blob[entry.offset + entry.length:])
    store.put(name, forged)

    reader = ImageReader(store, repo, state)
    with pytest.raises(IntegrityError, match=rf"metadata of {victim}.*integrity check"):
        reader.meta(victim)
    assert reader.thumb(victim).startswith(b"\x89PNG")  # the entries not moved still open
    assert reader.meta(ids[1])[0]["name"]


def test_log_rollback_is_refused_with_the_repository_named(tmp_path: Path) -> None:
    store = _store(tmp_path)
    session, owner, repo = _create(store, tmp_path, "rolled")
    Importer(store, repo, workers=1, batch_size=BATCH, writer=owner,
             settings=session.settings, processes=False).run(support.sample_images(2))
    head = logstate.verified_log(store, session.settings, repo).head
    assert head.sequence == 1
    assert logstate.heads_path(session.settings).stat().st_mode & 0o777 == 0o600
    store.delete(layout.log_entry_key(repo.repo_id, 1))
    with pytest.raises(IntegrityError, match=r"'rolled'.*rollback"):
        logstate.verified_log(store, session.settings, repo)
    # another entry 1, validly signed by the owner: the history forked
    trust = logstate.repository_trust(store, repo)
    genesis = seglog.verify_log(store, repo.repo_id, trust)
    seglog.append(store, repo.repo_id, owner, owner.user_id, trust, genesis,
                  kind=seglog.KIND_ADD, reason=seglog.REASON_IMPORT, key_version=1,
                  added=[seglog.Added(seglog.TYPE_SEGMENT, layout.new_id(), bytes(32), 1),
                         seglog.Added(seglog.TYPE_PACK, layout.new_id(), bytes(32), 1)])
    with pytest.raises(IntegrityError, match=r"'rolled'.*fork"):
        logstate.verified_log(store, session.settings, repo)
    assert logstate.remembered_heads(session.settings)["rolled"] == head  # never lowered


def test_format1_is_read_only_and_still_read(tmp_path: Path) -> None:
    """Format 1 (FORMAT-2 9.1): today's importer refuses it before any write, naming the
    migration; what format-1 code wrote is still read (metadata with features, previews)."""
    store = _store(tmp_path)
    old = owned_repos.create_owned_repository(store, "f1", storage_format=1)
    files = support.sample_images(2)
    before = {k: store.get(k) for k in store.list_keys("radcrypt/")}
    with pytest.raises(IntegrityError, match=r"^repository f1 is in storage format 1 "
                       r"\(read-only\); run radcrypt repo migrate --format 2$"):
        Importer(store, old, workers=1, processes=False).run(files)
    assert {k: store.get(k) for k in store.list_keys("radcrypt/")} == before
    report = fx.format1_importer(store, old, 64).run(files)  # format-1 code, as of before
    reader = ImageReader(store, old, None)
    assert reader.image_ids() == {i for _, i in report.imported}
    for _, image_id in report.imported:
        meta, version = reader.meta(image_id)
        assert len(meta["features"]) == old.manifest.dim and version == 1
        assert reader.thumb(image_id).startswith(b"\x89PNG")


def test_packs_read_back_by_range_over_s3(moto_store: Store, tmp_path: Path) -> None:
    """The same reads through S3 range requests (moto): TOC from the tail, entries by range."""
    session, owner, repo = _create(moto_store, tmp_path, "f2-s3")
    files = support.sample_images(3)
    report = Importer(moto_store, repo, workers=1, batch_size=2, writer=owner,
                      settings=session.settings, processes=False).run(files)
    state = logstate.verified_log(moto_store, session.settings, repo)
    reader = ImageReader(moto_store, repo, state)
    assert reader.image_ids() == {i for _, i in report.imported} and len(report.packs) == 2
    for image_id, path in _ids(repo, files).items():
        assert reader.meta(image_id)[0]["name"] == path.name
        assert reader.thumb(image_id).startswith(b"\x89PNG")


# --- format 1 read-only, a migration under an open writer, a missing genesis ---------------


def test_a_writer_opened_before_the_migration_commits_nothing(tmp_path: Path) -> None:
    """check_still_current refuses once the manifest's storage format changed since the
    repository was opened: a format-1 writer (format-1 code of the past) opened before
    the migration does not commit format-1 data into the format-2 repository."""
    from app.core.migration import migrate_to_format2
    from app.core.repository import check_still_current

    store = _store(tmp_path)
    owner, _, repo = fx.repository(store, "migrated-under-me", 2, 2, 1)
    stale = fx.format1_importer(store, repo, 2)  # opened now, in format 1
    assert migrate_to_format2(store, owner.settings, owner.identity, repo).committed
    with pytest.raises(RadcryptError, match=r"now in storage format 2 and this session "
                       r"opened it in storage format 1"):
        check_still_current(store, repo)
    before = fx.snapshot(store)
    with pytest.raises(RadcryptError, match="storage format 2"):
        stale.run(fx.sample_files(2, skip=2))
    assert fx.snapshot(store) == before  # not one object: no original, no segment
    migrated = owner.open(repo.repo_id)
    assert check_still_current(store, migrated).format == MANIFEST_FORMAT_V2


def test_a_missing_genesis_is_written_by_the_owners_open_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the manifest and the log's genesis (create_repository_as) leaves a
    format-2 repository with an empty log: a member's open says the owner must open it;
    the owner's open writes the genesis; then both work."""
    from app.core import client as facade

    def crash(*args: object, **kwargs: object) -> None:
        raise fx.InjectedFailure("the owner's machine stopped before the genesis")

    owner, member = Identity.generate("Genesis Owner"), Identity.generate("Genesis Member")
    # one directory store (its objects live under the data directory, so both users'
    # clients share it: the pinned owner key and the log memory are the same anyway)
    settings = Settings(store="directory", data_dir=str(tmp_path / "data"), workers=1)
    with facade.Client(settings, owner) as client:
        with monkeypatch.context() as patched:
            patched.setattr(seglog, "write_genesis", crash)
            with pytest.raises(fx.InjectedFailure):
                client.create_repository("half-made")
        store = client.session.store
        assert store.exists(layout.manifest_key("half-made"))
        assert not list(store.list_keys(layout.log_prefix("half-made")))
        client.register_user(member.card().to_json())
        # the owner grants a member before any open repaired it (the lower-level open)
        client.grant(open_repository_as(client.session, owner, "half-made"), member.user_id)
        with facade.Client(settings, member) as other:
            with pytest.raises(IntegrityError) as info:
                other.open_repository("half-made")
        assert "its owner" in str(info.value) and owner.user_id in str(info.value)
        assert "empty" in str(info.value)
        assert not list(store.list_keys(layout.log_prefix("half-made")))  # members write none

        repo = client.open_repository("half-made")  # the owner's open repairs it
        (genesis,) = store.list_keys(layout.log_prefix("half-made"))
        entry = seglog.decode_payload(store.get(genesis)[101:], genesis)
        assert entry.kind == seglog.KIND_GENESIS and entry.writer == owner.user_id
        assert entry.manifest_sequence == repo.manifest.sequence  # after the grant: 2
        report = client.import_files(repo, support.sample_images(2))
        assert len(report.imported) == 2
        assert client.open_repository("half-made").repo_id == "half-made"  # nothing twice
        assert len(list(store.list_keys(layout.log_prefix("half-made")))) == 2
    with facade.Client(settings, member) as other:
        assert len(other.image_ids(other.open_repository("half-made"))) == 2
