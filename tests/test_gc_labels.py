"""gc collects the label objects of a label change that died before its log entry
(issue 17 labels; app/core/gc.py), exactly as the packs and segments of a dead import:
listed by check as unreferenced strays, kept within the grace period, then deleted;
never a live label object, and the live labels still work afterwards.

The crash is real: label_add runs over a store that fails the moment it is asked to write
the log entry (the commit point), after it uploaded the label object.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

try:
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests.fixtures import format2_support as fx

from app.core import gc, labels, locks, logstate
from app.core.repo_check import check_repository
from app.core.repository import Repository
from cloud import layout, seglog
from cloud.directory_store import DirectoryStore
from cloud.segment_keywords import segment_dictionaries
from crypto.sse import keyword_token


class Built(fx.PristineBucket):
    def build(self, store: DirectoryStore) -> None:
        self.owner, _, self.repo = fx.repository(store, "gc-labels", 4, 2, 2)
        state = _state(store, self.repo)
        self.segments = [labels.segment_ids(store, self.repo.repo_id, s.id)
                         for s in state.segments()]
        self.kept = [self.segments[0][0], self.segments[1][0]]
        labels.label_add(store, None, self.repo, self.owner.identity, self.kept, "teaching")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("gc-labels"))


def _state(store: DirectoryStore, repo: Repository) -> seglog.LogState:
    return seglog.verify_log(store, repo.repo_id, logstate.repository_trust(store, repo))


def _found(store: DirectoryStore, repo: Repository, word: str) -> list[str]:
    """What a keyword search for ``label=<word>`` finds (the service's evaluation)."""
    state = _state(store, repo)
    token = keyword_token(repo.keys.keyword_key, repo.repo_id, repo.keys.version,
                          f"label={word}")
    return sorted(i for view in segment_dictionaries(store, state, repo.keys.version)
                  for i in view.image_ids(token))


def _label_keys(store: DirectoryStore, repo: Repository) -> set[str]:
    return set(store.list_keys(layout.labels_prefix(repo.repo_id)))


def test_gc_removes_the_label_objects_of_a_crashed_label_change(built: Built,
                                                                tmp_path: Path) -> None:
    store = built.fresh(tmp_path)
    repo, owner = built.repo, built.owner
    live_before = {layout.label_key(repo.repo_id, o.id) for o in _state(store, repo).labels()}
    assert _label_keys(store, repo) == live_before and len(live_before) == 2

    dying = [built.segments[0][1], built.segments[1][1]]  # two segments: two objects
    with pytest.raises(fx.Crash):
        labels.label_add(fx.DiesAtCommit(store), None, repo, owner.identity, dying,  # type: ignore[arg-type]
                         "followup")
    left = _label_keys(store, repo) - live_before
    assert len(left) == 2  # uploaded, never committed
    assert locks.list_locks(store, repo) == []  # the shared lock went with the change

    report = check_repository(store, None, repo)
    assert report.ok, report.lines()  # strays are not problems
    strays = [s for s in gc.orphans(report) if s.type == "label"]
    assert {s.key for s in strays} == left
    assert all(s.authentic is True and s.state == "unreferenced" for s in strays)
    assert all(s.age_s is not None and s.age_s < 600 for s in strays)
    assert all(s.base_sequence is not None for s in strays)

    kept = gc.collect_garbage(store, None, repo, owner.identity)  # 24 h grace
    assert kept.removed == [] and {s.key for s in kept.kept} == left
    now = time.time()
    young = gc.collect_garbage(store, None, repo, owner.identity, grace_seconds=3600,
                               now=now)
    assert young.removed == [] and _label_keys(store, repo) == live_before | left
    done = gc.collect_garbage(store, None, repo, owner.identity, grace_seconds=3600,
                              now=now + 3601)
    assert {s.key for s in done.removed} == left and done.kept == []
    assert _label_keys(store, repo) == live_before  # every live label object kept

    after = check_repository(store, None, repo, read_data=True)
    assert after.ok and after.strays == [] and after.counts["labels"] == 2
    assert _found(store, repo, "teaching") == sorted(built.kept)
    assert _found(store, repo, "followup") == []
    assert labels.labels_of(store, None, repo, built.kept + dying) == {
        **{i: ["teaching"] for i in built.kept}, **{i: [] for i in dying}}
    # and labelling works again: the crashed change, done now
    labels.label_add(store, None, repo, owner.identity, dying, "followup")
    assert _found(store, repo, "followup") == sorted(dying)


def test_gc_never_removes_a_live_or_a_removed_label_object(built: Built,
                                                           tmp_path: Path) -> None:
    """A tombstoned label is still live (it takes the label off); a compaction's replaced
    label objects are removed by its log entry: neither is an orphan."""
    from app.core.compaction import compact

    store = built.fresh(tmp_path)
    repo, owner = built.repo, built.owner
    labels.label_remove(store, None, repo, owner.identity, built.kept[:1], "teaching")
    keys = set(store.list_keys("radcrypt/"))
    done = gc.collect_garbage(store, None, repo, owner.identity, grace_seconds=0)
    assert done.removed == [] and set(store.list_keys("radcrypt/")) == keys
    compact(store, fx.fresh_settings(), repo, owner.identity, grace_seconds=3600)
    replaced = check_repository(store, None, repo).strays
    assert {s.type for s in replaced} >= {"label"}
    assert all(s.state == "removed" for s in replaced)
    keys = set(store.list_keys("radcrypt/"))
    done = gc.collect_garbage(store, None, repo, owner.identity, grace_seconds=0)
    assert done.removed == [] and set(store.list_keys("radcrypt/")) == keys
    assert _found(store, repo, "teaching") == sorted(built.kept[1:])
