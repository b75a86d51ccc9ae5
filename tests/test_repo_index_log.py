"""The search service reads the segment log (cloud/repo_index.py, cloud/log_trust.py).

Format-2 repositories are built here at the bucket level with the real modules: an owner
identity signs the manifest, the user records and the genesis entry (cloud/seglog.py),
a member whose record the owner signed writes version-2 segments (cloud/segments.py)
and appends their log entries. What is proved (docs/FORMAT-2.md 5.5, 6.2): the
service searches exactly the live segments of the verified log, never a segment that is
only in the bucket; a live segment missing or altered is not searched and changes the
digest; a compaction-like replace drops the old segment and serves the new one with the
same results; a forged entry leaves the last verified snapshot serving with log_error;
``min_head`` makes the service re-read the log.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cloud import layout, seglog
from cloud.directory_store import DirectoryStore
from cloud.log_trust import MANIFEST_FORMAT_V2, LogTrustError, service_trust
from cloud.repo_index import RepoIndex, Snapshot
from cloud.search import search
from cloud.segments import encode_segment, encode_segment_v2
from crypto.identity import Identity
from crypto.index import IndexKey
from crypto.segment_mac import index_mac_key
from crypto.signed import sign_json, sign_record

DIM = 16
REPO = "log-test"
MAC_KEY = index_mac_key(bytes(range(32)))


@pytest.fixture(scope="module")
def key() -> IndexKey:
    return IndexKey.generate(DIM, sample=np.random.default_rng(0).normal(size=(200, DIM)))


@pytest.fixture(scope="module")
def people() -> tuple[Identity, Identity, Identity]:
    return (Identity.generate("Owner", "owner"), Identity.generate("Member", "member"),
            Identity.generate("Stranger", "stranger"))


def _manifest(owner: Identity, members: dict[str, int], sequence: int = 1,
              key_version: int = 1, fmt: str = MANIFEST_FORMAT_V2) -> dict[str, object]:
    return {"repo_id": REPO, "extractor": "radcrypt-v1", "dim": DIM, "levels": [],
            "key_version": key_version, "created": "2026-11-27T00:00:00+00:00",
            "scheme": "test", "format": fmt, "sequence": sequence, "owner": owner.user_id,
            "members": [{"user_id": u, "key_version": v} for u, v in members.items()]}


def _put_manifest(store: DirectoryStore, signer: Identity, payload: dict[str, object]) -> None:
    name = layout.manifest_key(REPO)
    store.put(name, sign_json(signer, "manifest", name, payload))


def _register(store: DirectoryStore, owner: Identity, user: Identity) -> None:
    name = layout.user_key(user.user_id)
    store.put(name, sign_json(owner, "user", name, {"card": user.card().to_json()}))


@dataclass
class Repo:
    """A format-2 repository in a directory store, written as the client would."""

    store: DirectoryStore
    key: IndexKey
    owner: Identity
    member: Identity
    state: seglog.LogState
    packs: dict[str, str]  # seg_id -> the pack committed with it

    @classmethod
    def create(cls, root: Path, key: IndexKey, owner: Identity, member: Identity) -> Repo:
        store = DirectoryStore(root)
        _register(store, owner, owner)
        _register(store, owner, member)
        _put_manifest(store, owner, _manifest(owner, {owner.user_id: 1, member.user_id: 1}))
        state = seglog.write_genesis(store, REPO, owner, owner.user_id, 1, 1)
        return cls(store, key, owner, member, state, {})

    def trust(self) -> seglog.LogTrust:
        trust = service_trust(self.store, REPO, [self.owner.sign_public])
        assert trust is not None
        return trust

    def segment(self, data: np.ndarray, seg_id: str | None = None,
                ids: list[str] | None = None) -> tuple[str, list[str], bytes]:
        """A version-2 segment in the bucket (not yet in the log): (seg_id, ids, blob)."""
        seg_id = seg_id or layout.new_id()
        ids = ids or [layout.new_id() for _ in range(len(data))]
        blob = encode_segment_v2(ids, self.key.encrypt(data), 1, seg_id=seg_id,
                                 writer=self.member.user_id,
                                 base_sequence=self.state.head.sequence, repo_id=REPO,
                                 mac_key=MAC_KEY)
        self.store.put(layout.segment_key(REPO, seg_id), blob)
        return seg_id, ids, blob

    def commit(self, kind: int, reason: int, added: list[tuple[str, bytes, int]],
               removed: list[str] = ()) -> None:
        """A log entry by the member adding the segments (id, blob, count), each with a
        pack, and removing the segments ``removed`` and their packs."""
        entries = []
        gone = [seglog.Removed(seglog.TYPE_SEGMENT, s) for s in removed]
        gone += [seglog.Removed(seglog.TYPE_PACK, self.packs.pop(s)) for s in removed]
        for seg_id, blob, count in added:
            pack_id, pack = layout.new_id(), b"pack of " + seg_id.encode()
            self.store.put(layout.pack_key(REPO, pack_id), pack)
            self.packs[seg_id] = pack_id
            entries += [seglog.Added(seglog.TYPE_SEGMENT, seg_id, hashlib.sha256(blob).digest(),
                                     count),
                        seglog.Added(seglog.TYPE_PACK, pack_id, hashlib.sha256(pack).digest(),
                                     count)]
        self.state = seglog.append(
            self.store, REPO, self.member, self.member.user_id, self.trust(), self.state,
            kind=kind, reason=reason, key_version=1, added=entries,
            removed=gone)

    def add(self, data: np.ndarray) -> tuple[str, list[str], bytes]:
        """An import: a segment, its pack and the log entry that commits them."""
        seg_id, ids, blob = self.segment(data)
        self.commit(seglog.KIND_ADD, seglog.REASON_IMPORT, [(seg_id, blob, len(ids))])
        return seg_id, ids, blob

    def index(self) -> RepoIndex:
        return RepoIndex(self.store, REPO, owner_keys=[self.owner.sign_public])


def _rows(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM))


def _nearest(repo: Repo, snap: Snapshot, query: np.ndarray, k: int = 3) -> list[str]:
    version = snap.versions[1]
    result = search(version.index, repo.key.query(query[None, :]), k)
    return [version.image_ids[int(p)] for p in result.positions]


def _served_ids(snap: Snapshot) -> set[str]:
    return {i for v in snap.versions.values() for i in v.image_ids}


@pytest.fixture
def repo(tmp_path: Path, key: IndexKey, people: tuple[Identity, Identity, Identity]) -> Repo:
    owner, member, _ = people
    return Repo.create(tmp_path, key, owner, member)


def _check_digest(snap: Snapshot, seg_ids: list[str]) -> None:
    assert snap.segment_ids[1] == sorted(seg_ids)
    assert snap.set_digests[1] == seglog.set_digest(REPO, 1, seg_ids)


# --- what is searched ----------------------------------------------------------------------


def test_only_the_live_segments_of_the_log_are_searched(repo: Repo) -> None:
    data_a, data_b, stray_data = _rows(1, 20), _rows(2, 15), _rows(3, 10)
    seg_a, ids_a, _ = repo.add(data_a)
    seg_b, ids_b, _ = repo.add(data_b)
    _, stray_ids, _ = repo.segment(stray_data)  # in the bucket, never committed
    snap = repo.index().refresh()
    assert snap.log_error is None
    assert snap.head == repo.state.head.sequence == 2
    assert snap.head_hash == repo.state.head.hash
    assert snap.segments == 2 and snap.images == 35
    assert _served_ids(snap) == set(ids_a) | set(ids_b)
    assert snap.rejected == {}
    _check_digest(snap, [seg_a, seg_b])
    assert snap.set_digests[1] == repo.state.set_digest(1)
    # the stray rows are never an answer, even to a query equal to one of them
    assert not set(_nearest(repo, snap, stray_data[0], k=5)) & set(stray_ids)
    assert _nearest(repo, snap, data_b[4])[0] == ids_b[4]


def test_a_segment_added_to_the_bucket_later_is_ignored(repo: Repo) -> None:
    seg_a, ids_a, _ = repo.add(_rows(1, 12))
    index = repo.index()
    first = index.refresh()
    repo.segment(_rows(2, 8))
    again = index.refresh()
    assert again.segments == 1 and _served_ids(again) == set(ids_a)
    assert again.versions is first.versions  # nothing loaded, nothing rebuilt
    _check_digest(again, [seg_a])


def test_a_deleted_live_segment_is_not_searched_and_changes_the_digest(repo: Repo) -> None:
    seg_a, ids_a, _ = repo.add(_rows(1, 12))
    seg_b, _, _ = repo.add(_rows(2, 9))
    index = repo.index()
    assert index.refresh().set_digests[1] == repo.state.set_digest(1)
    repo.store.delete(layout.segment_key(REPO, seg_b))
    for snap in (index.refresh(), repo.index().refresh()):  # loaded before, and fresh
        assert _served_ids(snap) == set(ids_a)
        _check_digest(snap, [seg_a])
        assert snap.set_digests[1] != repo.state.set_digest(1)
        assert "missing" in snap.rejected[layout.segment_key(REPO, seg_b)]
        assert snap.head == repo.state.head.sequence and snap.log_error is None


def test_a_live_segment_whose_bytes_differ_from_the_log_is_not_searched(repo: Repo) -> None:
    seg_a, ids_a, _ = repo.add(_rows(1, 12))
    seg_b, ids_b, _ = repo.add(_rows(2, 9))
    # a valid segment of the same name and images, but not the one the log names
    repo.segment(_rows(5, 9), seg_id=seg_b, ids=ids_b)
    snap = repo.index().refresh()
    assert _served_ids(snap) == set(ids_a)
    _check_digest(snap, [seg_a])
    assert "segment log" in snap.rejected[layout.segment_key(REPO, seg_b)]


def test_a_replaced_segment_is_dropped_and_the_new_one_serves_the_same(repo: Repo) -> None:
    data_a, data_b = _rows(1, 14), _rows(2, 11)
    seg_a, ids_a, _ = repo.add(data_a)
    seg_b, ids_b, _ = repo.add(data_b)
    index = repo.index()
    before = index.refresh()
    queries = [data_a[3], data_b[7], _rows(9, 1)[0]]
    answers = [_nearest(repo, before, q, k=4) for q in queries]
    # compaction: one new segment with the images of both, re-encrypted, replaces them
    seg_c, _, blob_c = repo.segment(np.vstack([data_a, data_b]), ids=ids_a + ids_b)
    repo.commit(seglog.KIND_REPLACE, seglog.REASON_COMPACTION,
                [(seg_c, blob_c, len(ids_a) + len(ids_b))], removed=[seg_a, seg_b])
    after = index.refresh()  # the old segments are still in the bucket
    assert after.head == before.head + 1 == repo.state.head.sequence
    assert after.segments == 1 and after.images == 25
    _check_digest(after, [seg_c])
    assert after.set_digests[1] == repo.state.set_digest(1) != before.set_digests[1]
    assert [_nearest(repo, after, q, k=4) for q in queries] == answers


# --- a log that does not verify ------------------------------------------------------------


def _forge_entry(repo: Repo, signer: Identity) -> str:
    """Entry head+1, well formed and chained, adding a real segment, signed by ``signer``."""
    seg_id, ids, blob = repo.segment(_rows(7, 6))
    head = repo.state.head
    entry = seglog.LogEntry(
        sequence=head.sequence + 1, kind=seglog.KIND_ADD, reason=seglog.REASON_IMPORT,
        prev=head.hash, manifest_sequence=1, key_version=1, time_ms=int(time.time() * 1000),
        writer=signer.user_id,
        added=(seglog.Added(seglog.TYPE_SEGMENT, seg_id, hashlib.sha256(blob).digest(),
                            len(ids)),),
        removed=())
    name = layout.log_entry_key(REPO, head.sequence + 1)
    repo.store.put(name, sign_record(signer, "log", name, seglog.encode_payload(entry)))
    return name


def test_a_forged_entry_keeps_the_last_verified_snapshot(
        repo: Repo, people: tuple[Identity, Identity, Identity]) -> None:
    stranger = people[2]
    _register(repo.store, stranger, stranger)  # a record signed by someone else
    seg_a, ids_a, _ = repo.add(_rows(1, 10))
    index = repo.index()
    good = index.refresh()
    forged = _forge_entry(repo, stranger)
    bad = index.refresh()
    assert bad.log_error and str(good.head + 1) in bad.log_error
    assert bad.versions is good.versions and bad.head == good.head
    assert bad.head_hash == good.head_hash and bad.set_digests == good.set_digests
    assert _served_ids(bad) == set(ids_a)
    assert index.refresh(min_head=good.head).log_error  # still failing, not skipped
    fresh = repo.index().refresh()  # a service that never verified it serves nothing
    assert fresh.log_error and fresh.segments == 0 and fresh.head == 0
    repo.store.delete(forged)  # the cloud gives up: the log verifies again
    healed = index.refresh()
    assert healed.log_error is None and healed.head == good.head
    _check_digest(healed, [seg_a])


def test_an_entry_by_the_member_after_revocation_is_refused(repo: Repo) -> None:
    repo.add(_rows(1, 10))
    index = repo.index()
    good = index.refresh()
    # the owner lists the member at an older key version (revoked), then the member writes
    owner, member = repo.owner, repo.member
    _put_manifest(repo.store, owner, _manifest(owner, {owner.user_id: 2, member.user_id: 1},
                                               sequence=2, key_version=2))
    _forge_entry(repo, member)
    bad = index.refresh()
    assert bad.log_error and bad.versions is good.versions and bad.head == good.head


def test_a_manifest_rollback_or_downgrade_is_a_log_error(repo: Repo) -> None:
    repo.add(_rows(1, 10))
    owner, member = repo.owner, repo.member
    _put_manifest(repo.store, owner, _manifest(owner, {owner.user_id: 1, member.user_id: 1},
                                               sequence=2))
    index = repo.index()
    good = index.refresh()
    assert good.log_error is None
    _put_manifest(repo.store, owner, _manifest(owner, {owner.user_id: 1, member.user_id: 1}))
    assert "rollback" in (index.refresh().log_error or "")
    _put_manifest(repo.store, owner, _manifest(owner, {owner.user_id: 1}, sequence=3,
                                               fmt="radcrypt-manifest-v1"))
    down = index.refresh()
    assert "format 2" in (down.log_error or "") and down.versions is good.versions


# --- min_head ------------------------------------------------------------------------------


def test_min_head_makes_the_service_read_the_log_again(repo: Repo) -> None:
    seg_a, ids_a, _ = repo.add(_rows(1, 10))
    index = repo.index()
    first = index.refresh()
    seg_b, ids_b, _ = repo.add(_rows(2, 7))
    assert index.refresh(min_head=first.head) is first  # already there: no re-read
    later = index.refresh(min_head=first.head + 1)
    assert later.head == first.head + 1 == repo.state.head.sequence
    assert _served_ids(later) == set(ids_a) | set(ids_b)
    _check_digest(later, [seg_a, seg_b])


class _SlowLogStore(DirectoryStore):
    """Counts the listings of the log; the first one waits for ``go``."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.listings = 0
        self.go = threading.Event()

    def list_keys(self, prefix: str) -> Iterator[str]:
        if prefix == layout.log_prefix(REPO):
            self.listings += 1
            if self.listings == 1:
                self.go.wait(10)
        return super().list_keys(prefix)


def test_requests_waiting_for_one_re_read_do_not_each_start_another(
        tmp_path: Path, key: IndexKey, people: tuple[Identity, Identity, Identity]) -> None:
    repo = Repo.create(tmp_path, key, people[0], people[1])
    repo.add(_rows(1, 5))
    index = repo.index()
    assert index.refresh().head == 1
    slow = _SlowLogStore(tmp_path)  # the same bucket
    index.store = slow
    beyond = repo.state.head.sequence + 5  # a head the service cannot see (hidden from it)
    threads = [threading.Thread(target=index.refresh, args=(beyond,)) for _ in range(4)]
    threads[0].start()
    while slow.listings == 0:
        time.sleep(0.01)
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.3)  # all waiting for the first re-read
    slow.go.set()
    for thread in threads:
        thread.join(10)
    assert slow.listings == 2  # the first, then one for all those that waited
    assert index.snapshot.head == repo.state.head.sequence


def test_a_repository_migrated_to_format_2_serves_the_log_only(
        tmp_path: Path, key: IndexKey, people: tuple[Identity, Identity, Identity]) -> None:
    owner, member, _ = people
    repo = Repo.create(tmp_path, key, owner, member)
    store = repo.store
    members = {owner.user_id: 1, member.user_id: 1}
    _put_manifest(store, owner, _manifest(owner, members, fmt="radcrypt-manifest-v1"))
    data = _rows(1, 8)
    old_seg, ids = layout.new_id(), [layout.new_id() for _ in range(8)]
    store.put(layout.segment_key(REPO, old_seg), encode_segment(ids, key.encrypt(data), 1))
    index = repo.index()
    before = index.refresh()
    assert before.head == 0 and before.segment_ids == {1: [old_seg]}
    # the migration: the same images in a version-2 segment, committed by the log, then
    # the manifest of format 2 (the format-1 segment is still in the bucket)
    new_seg, _, blob = repo.segment(data, ids=ids)
    _put_manifest(store, owner, _manifest(owner, members, sequence=2))
    repo.commit(seglog.KIND_ADD, seglog.REASON_IMPORT, [(new_seg, blob, 8)])
    after = index.refresh()
    assert after.log_error is None and after.head == repo.state.head.sequence
    assert after.segment_ids == {1: [new_seg]} and after.images == 8
    assert _nearest(repo, after, data[2])[0] == ids[2]


# --- format 1 and the trust ----------------------------------------------------------------


def test_format_1_reports_the_digest_of_what_it_loaded(
        tmp_path: Path, key: IndexKey, people: tuple[Identity, Identity, Identity]) -> None:
    owner = people[0]
    store = DirectoryStore(tmp_path)
    _put_manifest(store, owner, _manifest(owner, {owner.user_id: 1},
                                          fmt="radcrypt-manifest-v1"))
    seg_ids = [layout.new_id() for _ in range(2)]
    for n, seg_id in enumerate(seg_ids):
        ids = [layout.new_id() for _ in range(5)]
        store.put(layout.segment_key(REPO, seg_id), encode_segment(ids, key.encrypt(
            _rows(n, 5)), 1))
    for keys in ([], [owner.sign_public]):
        snap = RepoIndex(store, REPO, owner_keys=keys).refresh()
        assert snap.head == 0 and snap.head_hash == bytes(32) and snap.log_error is None
        assert snap.segments == 2 and snap.images == 10
        _check_digest(snap, seg_ids)


def test_service_trust_believes_only_the_configured_owner(
        repo: Repo, people: tuple[Identity, Identity, Identity]) -> None:
    owner, member, stranger = people
    trust = repo.trust()
    assert (trust.owner_id, trust.owner_key) == (owner.user_id, owner.sign_public)
    assert (trust.manifest_sequence, trust.key_version) == (1, 1)
    assert trust.signer_key(member.user_id) == member.sign_public
    assert trust.signer_key(stranger.user_id) is None  # not a member
    _register(repo.store, stranger, member)  # the member's record, signed by a stranger
    assert service_trust(repo.store, REPO, [owner.sign_public]).signer_key(  # type: ignore
        member.user_id) is None
    with pytest.raises(LogTrustError, match="owner keys"):
        service_trust(repo.store, REPO, [stranger.sign_public])
    unsigned = json.dumps(_manifest(owner, {owner.user_id: 1})).encode()
    repo.store.put(layout.manifest_key(REPO), unsigned)
    with pytest.raises(LogTrustError, match="not signed"):
        service_trust(repo.store, REPO, [owner.sign_public])
    repo.store.delete(layout.manifest_key(REPO))
    assert service_trust(repo.store, REPO, [owner.sign_public]) is None
