"""Compaction of a format-2 repository (docs/FORMAT-2.md 7.1, 7.4).

What must hold: every image stays in the index exactly once with the very same scores
(the service's engine answers identically before and after), metadata, previews and
features read the same, and fewer segments and packs are live; a concurrent import is
never lost and a concurrent compaction makes the loser abandon; replaced objects are
deleted only after the grace period, by this or a later run; a segment that does not
match the log or whose MAC does not verify stops the compaction, naming it; a format-1
repository is refused.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

try:
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests.fixtures import format2_support as fx

from app.core.compaction import compact
from app.core.errors import AccessDenied, IntegrityError
from app.core.logstate import repository_trust, verified_log
from app.core.progress import CancelToken, ProgressEvent
from app.core.repository import Repository
from cloud import layout, seglog
from cloud.directory_store import DirectoryStore
from cloud.segments import decode_segment, encode_segment_v2, verify_segment_mac
from crypto import pack
from crypto.segment_mac import index_mac_key
from crypto.tokens import QueryToken

FILES = 12
BATCH = 2


store = fx.store  # the fixture: an empty directory store per test


def _snapshot(store: DirectoryStore, owner: fx.Workstation, repo: Repository
              ) -> tuple[QueryToken, list[dict[str, float]], dict[str, object]]:
    """A token of every image's features, the engine's answers to it, and every image's
    metadata and preview."""
    token = fx.query_token(repo, fx.all_features(store, owner.settings, repo))
    answers = fx.engine_answers(store, owner.settings, repo, token)
    return token, answers, dict(fx.contents(store, owner.settings, repo))


def _assert_unchanged(store: DirectoryStore, who: fx.Workstation, repo: Repository,
                      token: QueryToken, answers: list[dict[str, float]],
                      contents: dict[str, object]) -> None:
    counts = fx.image_counts(store, who.settings, repo)
    assert set(counts.values()) == {1}, "an image is indexed twice"
    assert set(counts) == set(contents)
    assert fx.contents(store, who.settings, repo) == contents
    fx.assert_same_answers(answers, fx.engine_answers(store, who.settings, repo, token))


def test_compaction_keeps_every_image_once_with_identical_answers(store: DirectoryStore
                                                                  ) -> None:
    owner, (alice,), repo = fx.repository(store, "compact-many", FILES, BATCH, 2, members=1)
    state = verified_log(store, owner.settings, repo)
    assert len(state.segments()) == len(state.packs()) == FILES // BATCH
    token, answers, contents = _snapshot(store, owner, repo)
    events: list[ProgressEvent] = []

    # any member compacts: Alice, who imported nothing
    opened = alice.open(repo.repo_id)
    report = compact(store, alice.settings, opened, alice.identity, target_images=8,
                     pack_images=8, progress=events.append)
    # counts 2 each, smallest first: 2+2+2+2 = 8, then 2+2 -> 2 segments and 2 packs
    assert (report.segments_before, report.segments_after) == (6, 2)
    assert (report.packs_before, report.packs_after) == (6, 2)
    assert len(report.entries) == 4 and report.abandoned == 0
    assert (report.deleted, report.deferred) == (0, 12)  # all within the grace period
    assert [e.stage for e in events] == ["compact"] * 4 + ["delete"]
    assert [e.status for e in events[:4]] == ["compacted"] * 4
    _assert_unchanged(store, owner, owner.open(repo.repo_id), token, answers, contents)

    # the entries: replace, reason compaction, by Alice; the new segments authenticated,
    # written by Alice on the head she had verified
    state = verified_log(store, owner.settings, repo)
    mac_key = index_mac_key(repo.keys.data_key)
    for live in state.segments():
        blob = store.get(layout.segment_key(repo.repo_id, live.id))
        verify_segment_mac(blob, live.id, repo.repo_id, mac_key)
        segment = decode_segment(blob, live.id)
        assert segment.writer == alice.user_id
        assert segment.base_sequence is not None and segment.base_sequence < live.added_at
    entries = [seglog.decode_payload(store.get(layout.log_entry_key(repo.repo_id, n))[101:],
                                     "entry") for n in report.entries]
    assert {(e.kind, e.reason, e.writer) for e in entries} == {
        (seglog.KIND_REPLACE, seglog.REASON_COMPACTION, alice.user_id)}

    # the replaced objects stay until the grace period has passed, then a later run
    # deletes them (nothing left to merge: 8 and 4 images, only one below the target)
    replaced = [key for key in _object_keys(store, repo.repo_id)
                if (_type_of(key), key.rsplit("/", 1)[-1]) not in state.live]
    assert len(replaced) == 12
    again = compact(store, owner.settings, owner.open(repo.repo_id), owner.identity,
                    target_images=8, pack_images=8, now=time.time() + 600)
    assert again.entries == [] and (again.deleted, again.deferred) == (0, 12)
    later = compact(store, owner.settings, owner.open(repo.repo_id), owner.identity,
                    target_images=8, pack_images=8, now=time.time() + 901)
    assert later.entries == [] and (later.deleted, later.deferred) == (12, 0)
    assert not any(store.exists(key) for key in replaced)
    assert len(_object_keys(store, repo.repo_id)) == 4
    _assert_unchanged(store, owner, owner.open(repo.repo_id), token, answers, contents)

    # with the default targets everything ends in one segment and one pack
    final = compact(store, owner.settings, owner.open(repo.repo_id), owner.identity,
                    grace_seconds=0)
    assert (final.segments_after, final.packs_after) == (1, 1)
    assert final.deleted == 4  # its own replaced objects: no grace asked
    _assert_unchanged(store, alice, alice.open(repo.repo_id), token, answers, contents)


def _object_keys(store: DirectoryStore, repo_id: str) -> list[str]:
    return sorted([*store.list_keys(layout.segments_prefix(repo_id)),
                   *store.list_keys(layout.packs_prefix(repo_id))])


def _type_of(key: str) -> int:
    return seglog.TYPE_PACK if "/packs/" in key else seglog.TYPE_SEGMENT


def test_an_import_during_compaction_is_not_lost(store: DirectoryStore) -> None:
    owner, (alice,), repo = fx.repository(store, "compact-race", 8, BATCH, 2, members=1)
    new_files = fx.sample_files(4, skip=8)
    imported = []

    def alice_imports(key: str) -> None:  # right after the compactor's new segment
        report = alice.importer(alice.open(repo.repo_id), BATCH).run(new_files)
        imported.extend(i for _, i in report.imported)

    racing = fx.HookStore(store, lambda key: "/segments/" in key, alice_imports)
    report = compact(racing, owner.settings, owner.open(repo.repo_id), owner.identity)
    assert racing.fired and len(imported) == 4
    assert report.abandoned == 0 and len(report.entries) == 2
    fresh = owner.open(repo.repo_id)
    counts = fx.image_counts(store, owner.settings, fresh)
    assert len(counts) == 12 and set(counts.values()) == {1}
    assert set(imported) <= set(counts)
    state = verified_log(store, owner.settings, fresh)
    # one compacted segment of 8, plus the two segments of Alice's batches
    assert sorted(o.count for o in state.segments()) == [2, 2, 8]
    token = fx.query_token(fresh, fx.all_features(store, owner.settings, fresh))
    answers = fx.engine_answers(store, owner.settings, fresh, token)
    assert all(len(a) == 12 for a in answers)


def test_a_concurrent_compaction_makes_the_loser_abandon(store: DirectoryStore) -> None:
    owner, (alice,), repo = fx.repository(store, "compact-twice", 8, BATCH, 2, members=1)
    token, answers, contents = _snapshot(store, owner, repo)
    theirs = []

    def alice_compacts(key: str) -> None:  # she wins: her entries come first
        theirs.append(compact(store, alice.settings, alice.open(repo.repo_id),
                              alice.identity))

    racing = fx.HookStore(store, lambda key: "/segments/" in key, alice_compacts)
    mine = compact(racing, owner.settings, owner.open(repo.repo_id), owner.identity)
    assert theirs and len(theirs[0].entries) == 2
    assert mine.abandoned == 2 and mine.entries == []  # the segment group lost, and the
    # pack group found its sources replaced before it started
    state = verified_log(store, owner.settings, repo)
    assert (len(state.segments()), len(state.packs())) == (1, 1)
    listed = {key.rsplit("/", 1)[-1] for key in _object_keys(store, repo.repo_id)}
    live = {o.id for o in state.live.values()}
    assert len(listed - live) == 8  # the replaced ones (grace period); the loser's own
    # new segment, which no entry names, was deleted
    _assert_unchanged(store, owner, owner.open(repo.repo_id), token, answers, contents)


def test_a_segment_that_does_not_match_the_log_stops_the_compaction(store: DirectoryStore
                                                                    ) -> None:
    owner, _, repo = fx.repository(store, "compact-altered", 6, BATCH, 2)
    state = verified_log(store, owner.settings, repo)
    victim = state.segments()[0]
    key = layout.segment_key(repo.repo_id, victim.id)
    blob = bytearray(store.get(key))
    blob[-100] ^= 1  # a changed row, checksum recomputed: a well-formed segment
    body = bytes(blob[:-32])
    store.put(key, body + hashlib.sha256(body).digest())
    with pytest.raises(IntegrityError, match=victim.id) as caught:
        compact(store, owner.settings, repo, owner.identity)
    assert "does not match the segment log" in str(caught.value)
    assert verified_log(store, owner.settings, repo).head == state.head  # nothing written


def test_a_forged_segment_named_by_the_log_stops_the_compaction(store: DirectoryStore
                                                                ) -> None:
    """A segment whose MAC does not verify (written without the version's data key) but
    which an entry names: the compaction must not launder it into an authenticated one."""
    owner, _, repo = fx.repository(store, "compact-forged", 4, BATCH, 2)
    repo = owner.open(repo.repo_id)
    state = verified_log(store, owner.settings, repo)
    rng = np.random.default_rng(7)
    ids = [layout.new_id() for _ in range(2)]
    features = rng.normal(size=(2, repo.manifest.dim)) * 0.1
    vectors = repo.keys.index_key.encrypt(features)
    seg_id, pack_id = layout.new_id(), layout.new_id()
    forged = encode_segment_v2(ids, vectors, 1, seg_id=seg_id, writer=owner.user_id,
                               base_sequence=state.head.sequence, repo_id=repo.repo_id,
                               mac_key=index_mac_key(b"\x01" * 32))
    blob = pack.build_pack(repo.keys.data_key, repo.repo_id, pack_id, 1,
                           [(i, b"{}", b"png") for i in ids], features)
    store.put(layout.segment_key(repo.repo_id, seg_id), forged)
    store.put(layout.pack_key(repo.repo_id, pack_id), blob)
    seglog.append(store, repo.repo_id, owner.identity, owner.user_id,
                  repository_trust(store, repo), state, kind=seglog.KIND_ADD,
                  reason=seglog.REASON_IMPORT, key_version=1,
                  added=[seglog.Added(seglog.TYPE_SEGMENT, seg_id,
                                      hashlib.sha256(forged).digest(), 2),
                         seglog.Added(seglog.TYPE_PACK, pack_id,
                                      hashlib.sha256(blob).digest(), 2)])
    head = verified_log(store, owner.settings, repo).head
    with pytest.raises(IntegrityError, match=seg_id) as caught:
        compact(store, owner.settings, repo, owner.identity)
    assert "not authenticated" in str(caught.value)
    assert verified_log(store, owner.settings, repo).head == head


def test_a_format1_repository_is_refused(store: DirectoryStore) -> None:
    owner, _, repo = fx.repository(store, "compact-v1", 2, 1, 1)
    before = fx.snapshot(store)
    with pytest.raises(IntegrityError, match="storage format 1"):
        compact(store, owner.settings, repo, owner.identity)
    assert fx.snapshot(store) == before


def test_cancel_keeps_committed_groups_and_strangers_are_refused(store: DirectoryStore
                                                                 ) -> None:
    owner, _, repo = fx.repository(store, "compact-cancel", 6, BATCH, 2)
    stranger = fx.Workstation.make(store, "Stranger")
    with pytest.raises(AccessDenied, match="not a member"):
        compact(store, stranger.settings, repo, stranger.identity)
    token = CancelToken()

    def cancel_after_first(event: ProgressEvent) -> None:
        token.cancel()

    # targets of 4 images: one segment group (2 + 2) and one pack group
    report = compact(store, owner.settings, repo, owner.identity, target_images=4,
                     pack_images=4, progress=cancel_after_first, cancel=token)
    assert report.cancelled and len(report.entries) == 1
    assert (report.segments_after, report.packs_after) == (2, 3)
    counts = fx.image_counts(store, owner.settings, repo)
    assert len(counts) == 6 and set(counts.values()) == {1}
