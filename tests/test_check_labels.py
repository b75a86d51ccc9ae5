"""`radcrypt check` verifies label objects (issue 17 labels, log type 4;
app/core/label_check.py): each tampering is named with the label object's id, never
shown as fine.

One real repository (four sample images, two import batches: two segments of two rows)
with one label on two images of the first segment, copied into a fresh store per test.
The cloud deletes, alters, swaps and renames label objects; a broken or hostile member
commits, with a correct SHA-256 in a signed log entry, a label object of another
repository, one naming rows of another segment, one with a wrong row count and one
naming a segment the log never held.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

try:
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests.fixtures import format2_support as fx

from app.core import labels, logstate
from app.core.repo_check import RepoCheckReport, check_repository
from app.core.repository import Repository
from cloud import layout, seglog
from cloud.directory_store import DirectoryStore
from crypto import labels as label_format
from crypto.csprng import random_bytes
from crypto.segment_mac import index_mac_key

FILES = 4
BATCH = 2
TYPE_LABEL = 4


class Built(fx.PristineBucket):
    def build(self, store: DirectoryStore) -> None:
        self.owner, _, self.repo = fx.repository(store, "check-labels", FILES, BATCH, 2)
        state = _state(store, self.repo)
        self.segments = [labels.segment_ids(store, self.repo.repo_id, s.id)
                         for s in state.segments()]
        self.segment_ids = [s.id for s in state.segments()]
        self.labelled = self.segments[0][:2]
        labels.label_add(store, None, self.repo, self.owner.identity, self.labelled,
                         "teaching")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("check-labels"))


def _state(store: DirectoryStore, repo: Repository) -> seglog.LogState:
    return seglog.verify_log(store, repo.repo_id, logstate.repository_trust(store, repo))


def _check(store: DirectoryStore, repo: Repository) -> RepoCheckReport:
    return check_repository(store, None, repo)


def _named(report: RepoCheckReport) -> set[tuple[str, str, str]]:
    return {(p.kind, p.type, p.id) for p in report.problems}


def _live_label(store: DirectoryStore, repo: Repository) -> seglog.LiveObject:
    (live,) = _state(store, repo).labels()
    return live


def _commit(store: DirectoryStore, built: Built, label_id: str, blob: bytes,
            count: int) -> int:
    """What a member's label change does (app/core/labels.py _commit), with any bytes:
    the object, then a signed log entry naming its SHA-256."""
    repo = built.repo
    store.put(layout.label_key(repo.repo_id, label_id), blob)
    state = seglog.append(store, repo.repo_id, built.owner.identity, built.owner.user_id,
                          logstate.repository_trust(store, repo), _state(store, repo),
                          kind=seglog.KIND_ADD, reason=seglog.REASON_LABEL, key_version=1,
                          added=[seglog.Added(TYPE_LABEL, label_id,
                                              hashlib.sha256(blob).digest(), count)])
    return state.head.sequence


def _member_label(built: Built, *, segment_id: str, rows: list[str], named: list[str],
                  repo_id: str | None = None, data_key: bytes | None = None,
                  keyword_key: bytes | None = None) -> tuple[str, bytes]:
    keys = built.repo.ring.version(1)
    data_key = data_key or keys.data_key
    label_id = layout.new_id()
    blob = label_format.build_label(
        data_key=data_key, keyword_key=keyword_key or keys.keyword_key,
        mac_key=index_mac_key(data_key), repo_id=repo_id or built.repo.repo_id,
        key_version=1, label_id=label_id, segment_id=segment_id, segment_ids=rows,
        op=label_format.OP_ADD, labels={"followup": named}, base_sequence=3)
    return label_id, blob


def test_a_repository_with_labels_checks_clean(built: Built, tmp_path: Path) -> None:
    store = built.fresh(tmp_path)
    events: list[str] = []
    report = check_repository(store, None, built.repo,
                              progress=lambda e: events.append(e.stage))
    assert report.ok, report.lines()
    assert report.counts["labels"] == 1 and report.strays == [] and report.notes == []
    assert events.count("labels") == 1
    assert check_repository(store, None, built.repo, read_data=True).ok


def test_a_deleted_label_object_is_named(built: Built, tmp_path: Path) -> None:
    store = built.fresh(tmp_path)
    live = _live_label(store, built.repo)
    store.delete(layout.label_key(built.repo.repo_id, live.id))
    report = _check(store, built.repo)
    assert _named(report) == {("missing", "label", live.id)}
    (problem,) = report.problems
    assert problem.sequence == live.added_at
    assert problem.line().startswith(f"label {live.id} (log entry {live.added_at}): "
                                     "missing: live in the segment log but not in the bucket")


def test_altered_bytes_of_a_label_object_are_named(built: Built, tmp_path: Path) -> None:
    store = built.fresh(tmp_path)
    live = _live_label(store, built.repo)
    key = layout.label_key(built.repo.repo_id, live.id)
    for offset in (5, 70, -40, -1):  # op, dictionary, sealed labels, MAC
        good = store.get(key)
        altered = bytearray(good)
        altered[offset] ^= 0x01
        store.put(key, bytes(altered))
        assert _named(_check(store, built.repo)) == {("altered", "label", live.id)}, offset
        store.put(key, good)
    assert _check(store, built.repo).ok


def test_label_objects_swapped_between_segments_by_the_cloud_are_both_named(
        built: Built, tmp_path: Path) -> None:
    store = built.fresh(tmp_path)
    repo = built.repo
    labels.label_add(store, None, repo, built.owner.identity, built.segments[1][:1],
                     "teaching")
    first, second = _state(store, repo).labels()
    a, b = (layout.label_key(repo.repo_id, x.id) for x in (first, second))
    blob_a, blob_b = store.get(a), store.get(b)
    store.put(a, blob_b)
    store.put(b, blob_a)
    assert _named(_check(store, repo)) == {("altered", "label", first.id),
                                           ("altered", "label", second.id)}


def test_a_label_object_renamed_by_the_cloud_is_missing_and_a_forged_stray(
        built: Built, tmp_path: Path) -> None:
    store = built.fresh(tmp_path)
    repo = built.repo
    live = _live_label(store, repo)
    key = layout.label_key(repo.repo_id, live.id)
    other = layout.new_id()
    store.put(layout.label_key(repo.repo_id, other), store.get(key))
    store.delete(key)
    report = _check(store, repo)
    assert _named(report) == {("missing", "label", live.id),
                              ("unauthenticated stray", "label", other)}
    (stray,) = report.strays
    assert (stray.type, stray.id, stray.authentic) == ("label", other, False)
    assert "differs from its name" in stray.detail


def test_a_label_of_another_repository_committed_by_a_member_is_not_authenticated(
        built: Built, tmp_path: Path) -> None:
    """Copied with its SHA-256 into a signed entry: the log accepts it, the keys do not."""
    store = built.fresh(tmp_path)
    rows = built.segments[0]
    label_id, blob = _member_label(built, segment_id=built.segment_ids[0], rows=rows,
                                   named=rows[:1], repo_id="another-repo",
                                   data_key=random_bytes(32), keyword_key=random_bytes(32))
    sequence = _commit(store, built, label_id, blob, 1)
    report = _check(store, built.repo)
    assert _named(report) == {("not authenticated", "label", label_id)}
    assert report.problems[0].sequence == sequence
    assert "not authenticated" in report.problems[0].detail  # the MAC, named


def test_a_label_naming_rows_of_another_segment_is_a_mismatch(built: Built,
                                                              tmp_path: Path) -> None:
    """A label moved to another segment: its header names segment 2, its rows and its
    sealed images are segment 1's (same row count)."""
    store = built.fresh(tmp_path)
    rows = built.segments[0]
    label_id, blob = _member_label(built, segment_id=built.segment_ids[1], rows=rows,
                                   named=rows)
    _commit(store, built, label_id, blob, len(rows))
    report = _check(store, built.repo)
    assert _named(report) == {("mismatch", "label", label_id)}
    assert f"not a row of segment {built.segment_ids[1]}" in report.problems[0].detail


def test_a_label_with_a_wrong_row_count_or_a_segment_never_live_is_a_mismatch(
        built: Built, tmp_path: Path) -> None:
    store = built.fresh(tmp_path)
    rows = built.segments[0]
    longer, blob = _member_label(built, segment_id=built.segment_ids[0],
                                 rows=[*rows, layout.new_id()], named=rows[:1])
    _commit(store, built, longer, blob, 1)
    nowhere = layout.new_id()
    elsewhere, blob = _member_label(built, segment_id=nowhere, rows=rows, named=rows[:1])
    _commit(store, built, elsewhere, blob, 1)
    report = _check(store, built.repo)
    assert _named(report) == {("mismatch", "label", longer), ("mismatch", "label", elsewhere)}
    details = {p.id: p.detail for p in report.problems}
    assert f"has {len(rows) + 1} rows, the log says {len(rows)}" in details[longer]
    assert f"names segment {nowhere}, which is not a live segment" in details[elsewhere]
    # the other label objects still check clean: only the bad ones are named
    assert report.counts["labels"] == 3


def test_a_label_committed_after_its_segment_was_compacted_is_a_note_not_a_problem(
        built: Built, tmp_path: Path) -> None:
    """The race labels.py handles (a compaction between the writer's read of the log and
    its commit): the late label names a segment replaced after its base sequence, applies
    to no row, and is said as a note. The same label claiming a base sequence after the
    replacement is a problem (its writer saw the segment gone)."""
    from app.core.compaction import compact

    store = built.fresh(tmp_path)
    repo = built.repo
    head = _state(store, repo).head.sequence
    rows = built.segments[0]
    keys = repo.ring.version(1)

    def late(base: int) -> tuple[str, bytes]:
        label_id = layout.new_id()
        return label_id, label_format.build_label(
            data_key=keys.data_key, keyword_key=keys.keyword_key,
            mac_key=index_mac_key(keys.data_key), repo_id=repo.repo_id, key_version=1,
            label_id=label_id, segment_id=built.segment_ids[0], segment_ids=rows,
            op=label_format.OP_ADD, labels={"late": rows[:1]}, base_sequence=base)

    raced, raced_blob = late(head)  # written before the compaction
    compact(store, fx.fresh_settings(), repo, built.owner.identity, grace_seconds=3600)
    replaced_at = _state(store, repo).history[(seglog.TYPE_SEGMENT,
                                               built.segment_ids[0])][1]
    _commit(store, built, raced, raced_blob, 1)
    report = _check(store, repo)
    assert report.ok, report.lines()
    (note,) = [n for n in report.notes if raced in n]
    assert f"replaced by log entry {replaced_at}" in note and "applies to no row" in note
    stale, stale_blob = late(replaced_at)  # claims to have seen the compaction
    _commit(store, built, stale, stale_blob, 1)
    assert _named(_check(store, repo)) == {("mismatch", "label", stale)}
