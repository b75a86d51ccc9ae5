"""Attacks on erasure and the legal hold (issue 16; app/core/erasure.py).

* A hold set while an erasure runs (before its new objects, or between them and its log
  entry) stops it: nothing is erased, the image stays found.
* A cloud that puts the erased objects back (it may keep copies: it is not trusted)
  gains nothing: the log no longer names them, so no member lists, previews or searches
  the image, and ``radcrypt check`` reports the restored objects as strays.
* A cloud that hides the hold by serving the manifest of before cannot make an owner's
  client erase (test_erasure.py covers the owner's and a fresh workstation).
"""

from __future__ import annotations

import numpy as np
import pytest

try:
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests.fixtures import format2_support as fx

from app.core import erasure
from app.core.errors import IntegrityError
from app.core.logstate import verified_log
from app.core.meta import ImageMeta
from app.core.repo_check import check_repository
from cloud import layout
from cloud.directory_store import DirectoryStore

FILES = 6
BATCH = 2


store = fx.store  # the fixture: an empty directory store per test


def _victim(store: DirectoryStore, owner: fx.Workstation, repo: object) -> ImageMeta:
    reader = fx.reader(store, owner.settings, repo)  # type: ignore[arg-type]
    metas = [ImageMeta.from_record(i, *reader.meta(i)) for i in sorted(reader.image_ids())]
    return next(m for m in metas if m.name == "CT_small.dcm")


def _found(store: DirectoryStore, who: fx.Workstation, repo: object, meta: ImageMeta) -> bool:
    token = fx.query_token(repo, np.array([meta.features]))  # type: ignore[arg-type]
    answer = fx.engine_answers(store, who.settings, repo, token)[0]  # type: ignore[arg-type]
    return meta.image_id in answer


@pytest.mark.parametrize("moment", ["locks/", "packs/"])
def test_a_hold_set_during_an_erasure_stops_it(store: DirectoryStore, moment: str) -> None:
    owner, _, repo = fx.repository(store, f"hold-race-{moment[:4]}", FILES, BATCH, 2)
    victim = _victim(store, owner, repo)
    plan = erasure.plan_erasure(store, owner.settings, repo,
                                erasure.Target("image", victim.image_id))
    # the owner's second workstation sets the hold the moment the erasure writes its lock
    # (before any rewrite) or its first new pack (before its log entry)
    laptop = fx.Workstation(owner.identity, fx.StoreSession(store, fx.fresh_settings()))
    racing = fx.HookStore(store, lambda key: f"/{moment}" in key, lambda key:
                          erasure.set_legal_hold(store, laptop.settings,
                                                 laptop.open(repo.repo_id), laptop.identity,
                                                 True))
    with pytest.raises((erasure.LegalHold, IntegrityError)) as refused:
        erasure.erase(racing, owner.settings, repo, owner.identity, plan)
    assert racing.fired
    assert "legal hold" in str(refused.value) or "manifest" in str(refused.value)
    assert victim.image_id in fx.reader(store, owner.settings, repo).image_ids()
    assert store.exists(layout.object_key(repo.repo_id, victim.image_id))
    assert _found(store, owner, repo, victim)
    assert erasure.legal_hold(store, owner.settings, repo)


def test_erased_objects_put_back_by_the_cloud_are_never_read(store: DirectoryStore) -> None:
    owner, (alice,), repo = fx.repository(store, "put-back", FILES, BATCH, 2, members=1)
    victim = _victim(store, owner, repo)
    before = fx.snapshot(store)
    plan = erasure.plan_erasure(store, owner.settings, repo,
                                erasure.Target("image", victim.image_id))
    erasure.erase(store, owner.settings, repo, owner.identity, plan)
    gone = [key for key in before if not store.exists(key)]
    assert gone and any("/packs/" in k for k in gone) and any("/objects/" in k for k in gone)
    for key in gone:  # the cloud kept copies and puts them back
        store.put(key, before[key])

    for who in (owner, alice):
        opened = who.open(repo.repo_id)
        assert victim.image_id not in fx.reader(store, who.settings, opened).image_ids()
        assert not _found(store, who, opened, victim)
    report = check_repository(store, owner.settings, repo)
    strays = {s.key: s.state for s in report.strays}
    assert all(strays.get(key) in ("removed", "unreferenced") for key in gone), strays
    verified_log(store, alice.settings, repo)  # the log itself is intact


class _HidingStore:
    """The store, answering range reads of segments with one image id zeroed: a cloud
    that hides which segment holds the image (range reads of a segment are not
    authenticated; whole reads are checked against the log's SHA-256)."""

    def __init__(self, store: DirectoryStore, hidden: str) -> None:
        self._store = store
        self._hidden = bytes.fromhex(hidden)
        self.lied = 0

    def get_range(self, key: str, start: int, length: int) -> bytes:
        data: bytes = self._store.get_range(key, start, length)
        if "/segments/" in key and self._hidden in data:
            self.lied += 1
            return data.replace(self._hidden, bytes(16))
        return data

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_a_store_hiding_the_segment_that_holds_the_image_is_read_whole(
        store: DirectoryStore) -> None:
    owner, _, repo = fx.repository(store, "hide-row", FILES, BATCH, 2)
    victim = _victim(store, owner, repo)
    plan = erasure.plan_erasure(store, owner.settings, repo,
                                erasure.Target("image", victim.image_id))
    hiding = _HidingStore(store, victim.image_id)
    report = erasure.erase(hiding, owner.settings, repo, owner.identity, plan)  # type: ignore[arg-type]
    assert hiding.lied and report.segments_rewritten == 1
    assert not _found(store, owner, repo, victim)
    for key in store.list_keys(layout.segments_prefix(repo.repo_id)):
        assert bytes.fromhex(victim.image_id) not in store.get(key), key
