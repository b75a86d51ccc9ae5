"""Labels (issue 17): small authenticated, encrypted dictionary objects in the segment log.

What must hold: a label added to images is found by the token of ``label=<word>`` in
exactly those images; a removal (tombstone) takes it off, a later add puts it back (log
order); members read the words; the bucket holds no label word in clear; an altered label
object is refused; compaction carries the labels to the new segment (same answers, old
label objects retired) and erasure drops the erased images' labels and deletes the label
objects that named them; only members label.
"""

from __future__ import annotations

from pathlib import Path

import pytest

try:
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests.fixtures import format2_support as fx

from app.core import compaction, labels
from app.core.access import revoke_access
from app.core.erasure import Target, erase, plan_erasure
from app.core.errors import AccessDenied, IntegrityError
from app.core.logstate import verified_log
from app.core.repository import Repository
from app.core.settings import Settings
from cloud import layout, seglog
from cloud.directory_store import DirectoryStore
from cloud.segment_keywords import segment_dictionaries
from crypto.labels import LabelObject
from crypto.sse import keyword_token

store = fx.store


def found(store: DirectoryStore, settings: Settings, repo: Repository, word: str
          ) -> list[str]:
    """Image ids the live dictionaries and labels give for ``label=<word>``."""
    state = verified_log(store, settings, repo)
    token = keyword_token(repo.keys.keyword_key, repo.repo_id, repo.keys.version,
                          f"label={word}")
    return sorted(i for view in segment_dictionaries(store, state, repo.keys.version)
                  for i in view.image_ids(token))


def segments_of(store: DirectoryStore, settings: Settings, repo: Repository
                ) -> list[list[str]]:
    state = verified_log(store, settings, repo)
    return [labels.segment_ids(store, repo.repo_id, s.id) for s in state.segments()]


def test_add_remove_and_add_again_in_log_order(store: DirectoryStore) -> None:
    owner, (alice,), repo = fx.repository(store, "lab-basic", 10, 4, 2, members=1)
    parts = segments_of(store, owner.settings, repo)
    chosen = sorted([parts[0][0], parts[0][1], parts[1][0]])  # two segments
    report = labels.label_add(store, owner.settings, repo, owner.identity, chosen,
                              "Teaching")
    assert report.words == ["teaching"] and len(report.objects) == 2
    assert found(store, owner.settings, repo, "teaching") == chosen
    assert found(store, owner.settings, repo, "other") == []
    assert labels.labels(store, owner.settings, repo, chosen[0]) == ["teaching"]

    state = verified_log(store, owner.settings, repo)
    assert len(state.labels()) == 2
    entry = seglog.decode_payload(store.get(layout.log_entry_key(
        repo.repo_id, report.entries[0]))[101:], "entry")
    assert (entry.kind, entry.reason) == (seglog.KIND_ADD, seglog.REASON_LABEL)

    # any member removes (a tombstone) and adds again; the last change wins
    opened = alice.open(repo.repo_id)
    labels.label_remove(store, alice.settings, opened, alice.identity, [chosen[0]],
                        "teaching")
    assert found(store, owner.settings, repo, "teaching") == chosen[1:]
    assert labels.labels(store, owner.settings, repo, chosen[0]) == []
    labels.label_add(store, alice.settings, opened, alice.identity, [chosen[0]], "TEACHING")
    assert found(store, owner.settings, repo, "teaching") == chosen
    assert labels.labels_of(store, owner.settings, repo, chosen[:2]) == {
        chosen[0]: ["teaching"], chosen[1]: ["teaching"]}

    with pytest.raises(ValueError, match="nothing searchable"):
        labels.label_add(store, owner.settings, repo, owner.identity, [chosen[0]], " - ")
    with pytest.raises(IntegrityError, match="not in any live segment"):
        labels.label_add(store, owner.settings, repo, owner.identity, ["0" * 32], "x1")
    stranger = fx.Workstation.make(store, "Stranger")
    with pytest.raises(AccessDenied):
        labels.label_add(store, owner.settings, repo, stranger.identity, chosen, "teaching")


def test_label_objects_are_encrypted_and_authenticated(store: DirectoryStore,
                                                       tmp_path: Path) -> None:
    owner, _, repo = fx.repository(store, "lab-auth", 4, 4, 2)
    parts = segments_of(store, owner.settings, repo)
    labels.label_add(store, owner.settings, repo, owner.identity, parts[0][:2],
                     "pneumothorax")
    blobs = [p.read_bytes() for p in (tmp_path / "bucket").rglob("*") if p.is_file()]
    assert not any(b"pneumothorax" in blob for blob in blobs)
    assert not any(parts[0][0].encode() in blob or bytes.fromhex(parts[0][0]) in blob
                   for blob in blobs if blob.startswith(b"RCLB"))

    (live,) = verified_log(store, owner.settings, repo).labels()
    key = layout.label_key(repo.repo_id, live.id)
    good = store.get(key)
    parsed = LabelObject.from_bytes(good, key)
    assert (parsed.segment_id, parsed.key_version, parsed.op) == (
        verified_log(store, owner.settings, repo).segments()[0].id, 1, 1)
    altered = bytearray(good)
    altered[-40] ^= 1  # in the sealed envelope
    store.put(key, bytes(altered))
    with pytest.raises(IntegrityError, match="does not match the segment log"):
        labels.labels(store, owner.settings, repo, parts[0][0])
    store.put(key, good)
    assert labels.labels(store, owner.settings, repo, parts[0][0]) == ["pneumothorax"]


def test_compaction_carries_labels_to_the_new_segment(store: DirectoryStore) -> None:
    owner, _, repo = fx.repository(store, "lab-compact", 10, 2, 2)
    parts = segments_of(store, owner.settings, repo)
    first = sorted([parts[0][0], parts[2][1], parts[4][0]])
    labels.label_add(store, owner.settings, repo, owner.identity, first, "followup")
    labels.label_add(store, owner.settings, repo, owner.identity, [parts[1][0]], "teaching")
    labels.label_remove(store, owner.settings, repo, owner.identity, [parts[2][1]],
                        "followup")
    expected = {"followup": sorted([parts[0][0], parts[4][0]]), "teaching": [parts[1][0]]}
    assert {w: found(store, owner.settings, repo, w) for w in expected} == expected
    before = verified_log(store, owner.settings, repo).labels()
    assert len(before) == 5

    report = compaction.compact(store, owner.settings, repo, owner.identity,
                                target_images=8, pack_images=8)
    assert report.segments_after < report.segments_before
    assert {w: found(store, owner.settings, repo, w) for w in expected} == expected
    # the label objects of the merged segments are retired, one "add" object per new
    # segment replaces them; those of the segment left alone stay as they were
    state = verified_log(store, owner.settings, repo)
    live_segments = {s.id for s in state.segments()}
    kept = {o.id for o in before} & {o.id for o in state.labels()}
    assert len(kept) < len(before)
    for live in state.labels():
        obj = LabelObject.from_bytes(store.get(layout.label_key(repo.repo_id, live.id)))
        assert obj.segment_id in live_segments
        assert live.id in kept or obj.op == 1
    # and labels still change after the move
    labels.label_remove(store, owner.settings, repo, owner.identity, [parts[0][0]],
                        "followup")
    assert found(store, owner.settings, repo, "followup") == [parts[4][0]]


def test_erasure_drops_the_labels_of_erased_images(store: DirectoryStore) -> None:
    owner, _, repo = fx.repository(store, "lab-erase", 8, 4, 2)
    parts = segments_of(store, owner.settings, repo)
    victim, other = parts[0][0], parts[0][1]
    labels.label_add(store, owner.settings, repo, owner.identity, [victim, other], "keep")
    old = {o.id for o in verified_log(store, owner.settings, repo).labels()}
    plan = plan_erasure(store, owner.settings, repo, Target("image", victim))
    erase(store, owner.settings, repo, owner.identity, plan)
    assert found(store, owner.settings, repo, "keep") == sorted(
        {victim, other} - plan.image_ids)
    assert victim not in found(store, owner.settings, repo, "keep")
    # the label objects that named the erased image are gone from the bucket at once
    assert not any(store.exists(layout.label_key(repo.repo_id, i)) for i in old)


def test_revocation_carries_labels_to_the_new_key_version(store: DirectoryStore) -> None:
    owner, (alice,), repo = fx.repository(store, "lab-revoke", 6, 3, 2, members=1)
    parts = segments_of(store, owner.settings, repo)
    chosen = sorted([parts[0][0], parts[1][2]])
    labels.label_add(store, owner.settings, repo, owner.identity, chosen, "teaching")
    labels.label_remove(store, owner.settings, repo, owner.identity, [parts[1][2]],
                        "teaching")
    old = {o.id for o in verified_log(store, owner.settings, repo).labels()}
    revoke_access(owner.session, owner.identity, repo, alice.user_id)
    rotated = owner.open(repo.repo_id)
    assert rotated.keys.version == 2
    assert found(store, owner.settings, rotated, "teaching") == [parts[0][0]]
    assert labels.labels(store, owner.settings, rotated, parts[0][0]) == ["teaching"]
    state = verified_log(store, owner.settings, rotated)
    assert {o.key_version for o in state.labels()} == {2}
    assert not any(store.exists(layout.label_key(repo.repo_id, i)) for i in old)


def test_compaction_folds_the_many_labels_of_one_segment(store: DirectoryStore,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    owner, _, repo = fx.repository(store, "lab-fold", 4, 4, 2)
    monkeypatch.setattr(compaction, "LABEL_FOLD", 3)
    (ids,) = segments_of(store, owner.settings, repo)
    labels.label_add(store, owner.settings, repo, owner.identity, ids[:3], "a1")
    labels.label_add(store, owner.settings, repo, owner.identity, ids[1:], "b2")
    labels.label_remove(store, owner.settings, repo, owner.identity, ids[:2], "a1")
    want = {"a1": sorted(ids[2:3]), "b2": sorted(ids[1:])}
    assert {w: found(store, owner.settings, repo, w) for w in want} == want
    report = compaction.compact(store, owner.settings, repo, owner.identity, grace_seconds=0)
    assert report.labels_folded == 3 and len(report.entries) == 1
    state = verified_log(store, owner.settings, repo)
    (live,) = state.labels()
    assert LabelObject.from_bytes(store.get(layout.label_key(repo.repo_id, live.id))).op == 1
    assert {w: found(store, owner.settings, repo, w) for w in want} == want
    assert len(list(store.list_keys(layout.labels_prefix(repo.repo_id)))) == 1  # deleted
    again = compaction.compact(store, owner.settings, repo, owner.identity)
    assert again.entries == [] and again.labels_folded == 0
