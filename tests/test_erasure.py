"""Erasure and legal hold (issue 16; app/core/erasure.py, docs/FORMAT-2.md 7.2).

What must hold: after erasing an image (or a series, study or patient) no object in the
bucket holds its ciphertext (every object scanned for the bytes it had before, and every
pack and original decrypted with the keys of before: nothing of it); the search engine
never answers it again, also when the store serves the bucket as it was before (the
client refuses the older log); the same file imports again afterwards; the plan lists
whole files (every frame); a legal hold refuses erasure until an owner lifts it, and only
an owner sets or lifts it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

try:
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests.fixtures import format2_support as fx

from app.core import erasure
from app.core.compaction import compact
from app.core.errors import AccessDenied, IntegrityError, RadcryptError
from app.core.logstate import verified_log
from app.core.meta import ImageMeta
from app.core.objects import get_decrypted
from app.core.repository import Repository
from cloud import layout, seglog
from cloud.directory_store import DirectoryStore
from cloud.repo_index import RepoIndex, Snapshot
from cloud.search import search
from cloud.segments import decode_segment
from crypto import pack

FILES = 6
BATCH = 2


store = fx.store  # the fixture: an empty directory store per test


def _metas(store: DirectoryStore, who: fx.Workstation, repo: Repository) -> list[ImageMeta]:
    reader = fx.reader(store, who.settings, repo)
    return [ImageMeta.from_record(i, *reader.meta(i)) for i in sorted(reader.image_ids())]


def _fragments(store: DirectoryStore, repo: Repository, image_ids: set[str]
               ) -> dict[str, bytes]:
    """Ciphertext of the images as the bucket holds it now: each segment row's bytes,
    each pack entry's envelope, a slice of each original object."""
    out: dict[str, bytes] = {}
    for key in store.list_keys(layout.segments_prefix(repo.repo_id)):
        segment = decode_segment(store.get(key), key.rsplit("/", 1)[-1])
        for row, image_id in enumerate(segment.id_strings()):
            if image_id in image_ids:
                out[f"row {image_id} {key}"] = np.ascontiguousarray(
                    segment.vectors.full[row], dtype="<f8").tobytes()
    for key in store.list_keys(layout.packs_prefix(repo.repo_id)):
        blob = store.get(key)
        pack_id = key.rsplit("/", 1)[-1]
        toc, _ = pack.open_pack(repo.keys.data_key, repo.repo_id, pack_id, blob)
        for entry in toc.entries:
            if entry.object_id in image_ids:
                out[f"pack {entry.kind} {entry.object_id} {key}"] = \
                    blob[entry.offset:entry.offset + entry.length]
    for image_id in image_ids:
        key = layout.object_key(repo.repo_id, image_id)
        if store.exists(key):
            blob = store.get(key)
            out[f"original {image_id}"] = blob[len(blob) // 2:len(blob) // 2 + 64]
    return out


def _plaintexts(store: DirectoryStore, repo: Repository, image_ids: set[str]
                ) -> set[bytes]:
    """Decrypted metadata and previews (as the packs hold them) and originals."""
    out: set[bytes] = set()
    for key in store.list_keys(layout.packs_prefix(repo.repo_id)):
        _, plain = pack.open_pack(repo.keys.data_key, repo.repo_id, key.rsplit("/", 1)[-1],
                                  store.get(key))
        out.update(text for (kind, object_id), text in plain.items()
                   if object_id in image_ids and kind != pack.KIND_FEATURES)
    for image_id in image_ids:
        if store.exists(layout.object_key(repo.repo_id, image_id)):
            out.add(get_decrypted(store, repo.ring, repo.repo_id, "objects", image_id)[0])
    assert out
    return out


def _assert_no_trace(store: DirectoryStore, repo: Repository, erased: set[str],
                     fragments: dict[str, bytes], plaintexts: set[bytes]) -> None:
    """Every object of the bucket: none contains a fragment; every pack opened with the
    old key ring holds none of the images and no plaintext of theirs; no original
    decrypts to one of theirs."""
    blobs = {key: store.get(key) for key in store.list_keys("radcrypt/")}
    for name, fragment in fragments.items():
        holders = [key for key, blob in blobs.items() if fragment in blob]
        assert not holders, f"{name} is still in {holders}"
    for key, blob in blobs.items():
        if key.startswith(layout.packs_prefix(repo.repo_id)):
            toc, plain = pack.open_pack(repo.keys.data_key, repo.repo_id,
                                        key.rsplit("/", 1)[-1], blob)
            assert not erased.intersection(toc.image_ids()), key
            for text in plain.values():
                assert text not in plaintexts, key
        elif key.startswith(layout.segments_prefix(repo.repo_id)):
            ids = decode_segment(blob, key.rsplit("/", 1)[-1]).id_strings()
            assert not erased.intersection(ids), key
        elif key.startswith(layout.objects_prefix(repo.repo_id)):
            image_id = key.rsplit("/", 1)[-1]
            assert image_id not in erased
            plain = get_decrypted(store, repo.ring, repo.repo_id, "objects", image_id)[0]
            assert plain not in plaintexts, key


def _best(store: DirectoryStore, who: fx.Workstation, repo: Repository,
          features: np.ndarray) -> list[str]:
    """The engine's ranking of every indexed image for ``features``."""
    answer = fx.engine_answers(store, who.settings, repo, fx.query_token(repo, features))[0]
    return list(answer)  # best first


def _served(snap: Snapshot, repo: Repository, features: np.ndarray) -> tuple[set[str], str]:
    """(every image the search service serves, its nearest answer to ``features``)."""
    version = snap.versions[repo.keys.version]
    best = search(version.index, fx.query_token(repo, features), 1).positions[0]
    return set(version.image_ids), version.image_ids[int(best)]


def test_an_erased_image_leaves_no_ciphertext_is_never_found_and_imports_again(
        store: DirectoryStore) -> None:
    owner, (alice,), repo = fx.repository(store, "erase-one", FILES, BATCH, 2, members=1)
    metas = _metas(store, owner, repo)
    # one whose pixels no other sample shares (the 693_* files are one image, 4 codecs)
    victim = next(m for m in metas if m.name == "CT_small.dcm")
    metas = [victim] + [m for m in metas if m is not victim]
    features = np.array([victim.features])
    assert _best(store, owner, repo, features)[0] == victim.image_id  # found before
    fragments = _fragments(store, repo, {victim.image_id})
    plaintexts = _plaintexts(store, repo, {victim.image_id})
    assert any(k.startswith("row") for k in fragments) and any(
        k.startswith("original") for k in fragments)
    verified_log(store, alice.settings, alice.open(repo.repo_id))  # Alice saw the head
    service = RepoIndex(store, repo.repo_id, owner_keys=[owner.identity.sign_public])
    assert _served(service.refresh(), repo, features)[1] == victim.image_id
    before = fx.snapshot(store)

    # the dry run lists the file, its study and series, and writes nothing
    plan = erasure.plan_erasure(store, owner.settings, repo,
                                erasure.Target("image", victim.image_id[:12]))
    assert plan.image_ids == {victim.image_id}
    text = "\n".join(plan.lines())
    assert victim.image_id in text and victim.name in text and "study" in text
    assert fx.snapshot(store) == before

    report = erasure.erase(store, owner.settings, repo, owner.identity, plan)
    assert len(report.entries) == 1 and report.originals_deleted == 1
    assert report.packs_rewritten == report.segments_rewritten == 1
    entry = seglog.decode_payload(
        store.get(layout.log_entry_key(repo.repo_id, report.entries[0]))[101:], "entry")
    assert (entry.kind, entry.reason, entry.writer) == (
        seglog.KIND_REPLACE, seglog.REASON_ERASURE, owner.user_id)
    _assert_no_trace(store, repo, {victim.image_id}, fragments, plaintexts)

    # every other image is intact, the erased one is found by no one
    remaining = {m.image_id: m for m in _metas(store, owner, repo)}
    assert set(remaining) == {m.image_id for m in metas[1:]}
    assert all(remaining[m.image_id].features == m.features for m in metas[1:])
    assert victim.image_id not in _best(store, alice, alice.open(repo.repo_id), features)
    served, nearest = _served(service.refresh(), repo, features)  # the search service
    assert victim.image_id not in served and nearest != victim.image_id
    journal = erasure.journal(owner.settings)
    assert journal[-1]["image_ids"] == [victim.image_id]
    assert victim.name not in json.dumps(journal)

    # the store serves the bucket of before (objects and log): both clients refuse it
    after = fx.snapshot(store)
    fx.restore(store, before)
    for who in (owner, alice):
        with pytest.raises(IntegrityError, match=r"rollback|older|below"):
            verified_log(store, who.settings, repo)
    rolled = service.refresh()  # the service keeps its last verified state
    assert rolled.log_error and victim.image_id not in _served(rolled, repo, features)[0]
    fx.restore(store, after)

    # the same file imports again, with the same id, and is found again
    source = next(p for p in fx.sample_files(FILES) if p.name == victim.name)
    again = owner.importer(repo, BATCH).run([source])
    assert [image_id for _, image_id in again.imported] == [victim.image_id]
    assert _best(store, owner, repo, features)[0] == victim.image_id


def test_erasing_a_series_after_a_compaction_removes_the_replaced_objects_too(
        store: DirectoryStore) -> None:
    owner, _, repo = fx.repository(store, "erase-series", FILES, BATCH, 2)
    report = compact(store, owner.settings, repo, owner.identity, target_images=4,
                     pack_images=4)
    assert report.deferred > 0  # replaced objects wait for their grace period
    metas = _metas(store, owner, repo)
    series = next(s for s in {erasure.series_key(m) for m in metas}
                  if sum(erasure.series_key(m) == s for m in metas) > 1)
    victims = {m.image_id for m in metas if erasure.series_key(m) == series}
    fragments = _fragments(store, repo, victims)
    plaintexts = _plaintexts(store, repo, victims)

    plan = erasure.plan_erasure(store, owner.settings, repo, erasure.Target("series", series))
    assert plan.image_ids == victims
    done = erasure.erase(store, owner.settings, repo, owner.identity, plan)
    assert done.objects_deleted >= 2  # the compaction's replaced objects holding them
    _assert_no_trace(store, repo, victims, fragments, plaintexts)
    assert {m.image_id for m in _metas(store, owner, repo)} == \
        {m.image_id for m in metas} - victims
    assert not owner.open(repo.repo_id).manifest.legal_hold


def test_erasing_every_image_of_a_pack_removes_it_with_a_remove_entry(
        store: DirectoryStore) -> None:
    owner, _, repo = fx.repository(store, "erase-pack", 4, BATCH, 2)
    state = verified_log(store, owner.settings, repo)
    first = min(state.packs(), key=lambda o: o.added_at)
    ids = fx.reader(store, owner.settings, repo)._image_index()
    in_pack = sorted(i for i, (pack_id, _) in ids.items() if pack_id == first.id)
    metas = {m.image_id: m for m in _metas(store, owner, repo)}
    originals = {metas[i].original_image_id for i in in_pack}
    plan = erasure.ErasurePlan(repo.repo_id, erasure.Target("image", in_pack[0]),
                               [m for m in metas.values() if m.original_image_id in originals])
    report = erasure.erase(store, owner.settings, repo, owner.identity, plan)
    assert (report.packs_removed, report.segments_removed) == (1, 1)
    entry = seglog.decode_payload(
        store.get(layout.log_entry_key(repo.repo_id, report.entries[0]))[101:], "entry")
    assert entry.kind == seglog.KIND_REMOVE and not entry.added
    assert not store.exists(layout.pack_key(repo.repo_id, first.id))


def test_a_legal_hold_refuses_erasure_until_an_owner_lifts_it(store: DirectoryStore) -> None:
    owner, (alice,), repo = fx.repository(store, "erase-hold", 4, BATCH, 2, members=1)
    victim = _metas(store, owner, repo)[0].image_id
    target = erasure.Target("image", victim)
    plain_manifest = store.get(layout.manifest_key(repo.repo_id))

    with pytest.raises(AccessDenied, match="owner"):
        erasure.set_legal_hold(store, alice.settings, alice.open(repo.repo_id),
                               alice.identity, True)
    held = erasure.set_legal_hold(store, owner.settings, repo, owner.identity, True)
    assert held.manifest.legal_hold and erasure.legal_hold(store, alice.settings, repo)
    sequence = held.manifest.sequence
    assert erasure.set_legal_hold(store, owner.settings, repo, owner.identity,
                                  True).manifest.sequence == sequence  # no new write

    before = fx.snapshot(store)
    plan = erasure.plan_erasure(store, owner.settings, held, target)  # the list still works
    with pytest.raises(erasure.LegalHold, match="legal hold"):
        erasure.erase(store, owner.settings, held, owner.identity, plan)
    assert fx.snapshot(store) == before

    # a store that serves the manifest of before the hold: refused by the owner's
    # workstation (it saw the newer one) and, on a fresh workstation, by the log, whose
    # owner-signed entry names the newer manifest
    store.put(layout.manifest_key(repo.repo_id), plain_manifest)
    with pytest.raises(AccessDenied, match="older"):
        erasure.erase(store, owner.settings, repo, owner.identity, plan)
    fresh = fx.Workstation(owner.identity, fx.StoreSession(store, fx.fresh_settings()))
    with pytest.raises(IntegrityError, match=r"manifest_sequence|manifest sequence"):
        erasure.plan_erasure(store, fresh.settings, fresh.open(repo.repo_id), target)
    fx.restore(store, before)

    with pytest.raises(AccessDenied, match="owner"):  # a member never erases
        erasure.erase(store, alice.settings, alice.open(repo.repo_id), alice.identity, plan)
    lifted = erasure.set_legal_hold(store, owner.settings, held, owner.identity, False)
    assert not lifted.manifest.legal_hold and lifted.manifest.sequence == sequence + 1
    report = erasure.erase(store, owner.settings, lifted, owner.identity, plan)
    assert report.entries and victim not in fx.reader(store, owner.settings, lifted).image_ids()


def test_erasing_one_frame_erases_the_whole_multi_frame_file(store: DirectoryStore) -> None:
    from pydicom.data import get_testdata_file

    multi = Path(get_testdata_file("emri_small.dcm"))  # MR, 10 frames of 64 x 64
    owner, _, repo = fx.repository(store, "erase-frames", 0, BATCH, 2)
    first = owner.importer(repo, 4).run([multi, *fx.sample_files(1, skip=4)])
    assert not first.failed
    metas = _metas(store, owner, repo)
    frames = [m for m in metas if m.frames == 10]
    assert len(frames) == 10 and len(metas) == 11
    original = frames[0].original_image_id
    fragments = _fragments(store, repo, {m.image_id for m in frames})
    plaintexts = _plaintexts(store, repo, {m.image_id for m in frames})

    one = next(m for m in frames if m.frame == 3)
    plan = erasure.plan_erasure(store, owner.settings, repo,
                                erasure.Target("image", one.image_id))
    assert plan.image_ids == {m.image_id for m in frames} and plan.originals == {original}
    report = erasure.erase(store, owner.settings, repo, owner.identity, plan)
    assert report.originals_deleted == 1
    _assert_no_trace(store, repo, plan.image_ids, fragments, plaintexts)
    assert [m.name for m in _metas(store, owner, repo)] == ["CT_small.dcm"]

    again = owner.importer(repo, 4).run([multi])
    assert not again.failed
    assert {m.image_id for m in _metas(store, owner, repo)} == {m.image_id for m in metas}


class _LogRefused:
    """The store, refusing every write under log/ (a crash between the hold's manifest
    and its log entry)."""

    def __init__(self, store: DirectoryStore) -> None:
        self._store = store

    def put(self, key: str, *args: object, **kwargs: object) -> object:
        if "/log/" in key:
            raise OSError(f"injected: {key} not written")
        return self._store.put(key, *args, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_a_hold_interrupted_before_its_log_entry_is_finished_by_running_it_again(
        store: DirectoryStore) -> None:
    owner, _, repo = fx.repository(store, "hold-resume", 2, BATCH, 2)
    head = verified_log(store, owner.settings, repo).head.sequence
    with pytest.raises(OSError, match="injected"):
        erasure.set_legal_hold(_LogRefused(store), owner.settings, repo,  # type: ignore[arg-type]
                               owner.identity, True)
    assert erasure.legal_hold(store, owner.settings, repo)  # the manifest has it ...
    assert verified_log(store, owner.settings, repo).head.sequence == head  # ... not the log
    held = erasure.set_legal_hold(store, owner.settings, repo, owner.identity, True)
    state = verified_log(store, owner.settings, repo)
    entry = seglog.decode_payload(
        store.get(layout.log_entry_key(repo.repo_id, state.head.sequence))[101:], "entry")
    assert state.head.sequence == head + 1 and entry.kind == seglog.KIND_MEMBERSHIP
    assert entry.manifest_sequence == held.manifest.sequence and entry.writer == owner.user_id
    erasure.set_legal_hold(store, owner.settings, repo, owner.identity, True)
    assert verified_log(store, owner.settings, repo).head.sequence == head + 1  # no rewrite


def _meta(image_id: str, original: str = "", frame: int = 0, frames: int = 1,
          **clinical: str) -> ImageMeta:
    return ImageMeta(image_id=image_id, name=image_id, clinical=dict(clinical),
                     frame=frame, frames=frames, original_id=original)


def test_selection_takes_whole_files_and_names_ambiguous_keys() -> None:
    a0, b0 = "a0" + "0" * 30, "b0" + "0" * 30
    metas = [
        _meta(a0, frames=3, StudyInstanceUID="1.2.1", SeriesInstanceUID="1.2.1.1",
              PatientID="P1"),
        _meta("a1" + "0" * 30, a0, 1, 3, StudyInstanceUID="1.2.1",
              SeriesInstanceUID="1.2.1.1", PatientID="P1"),
        _meta("a2" + "0" * 30, a0, 2, 3, StudyInstanceUID="1.2.1",
              SeriesInstanceUID="1.2.1.1", PatientID="P1"),
        _meta(b0, StudyInstanceUID="1.2.2", SeriesInstanceUID="1.2.2.1",
              PatientID="P2", PatientName="DOE^JANE"),
        _meta("c0" + "0" * 30),
    ]
    frame = erasure.select(metas, erasure.Target("image", "a1"))  # one frame: the file
    assert [m.frame for m in frame] == [0, 1, 2]
    assert {m.image_id for m in erasure.select(metas, erasure.Target("patient", "P2"))} == {b0}
    assert {m.image_id for m in erasure.select(
        metas, erasure.Target("patient", "DOE^JANE"))} == {b0}
    assert len(erasure.select(metas, erasure.Target("study", "1.2.1"))) == 3
    assert len(erasure.select(metas, erasure.Target("series", "1.2.2.1"))) == 1
    assert len(erasure.select(metas, erasure.Target("study", "image:c0"))) == 1
    with pytest.raises(RadcryptError, match="ambiguous"):
        erasure.select(metas, erasure.Target("study", "1.2."))
    with pytest.raises(RadcryptError, match="no image of patient"):
        erasure.select(metas, erasure.Target("patient", "P3"))
    with pytest.raises(RadcryptError, match="must be one of"):
        erasure.Target("hospital", "x")
    damaged = ImageMeta.damaged("d0" + "0" * 30, "does not open")
    assert erasure.select([*metas, damaged], erasure.Target("image", "d0")) == [damaged]
    assert any("damaged" in line for line in erasure.ErasurePlan(
        "r", erasure.Target("image", "d0"), [damaged]).lines())
    assert len(erasure.select([*metas, damaged], erasure.Target("study", "1.2.1"))) == 3
    plan = erasure.ErasurePlan("r", erasure.Target("image", "a1"), frame)
    assert plan.originals == {a0}
    assert any("frame 3/3" in line for line in plan.lines())

