"""`radcrypt check --repo R` (app/core/repo_check.py): what the cloud, a broken writer or a
non-member does to a repository is found and named.

Each test starts from one of two real repositories (imported once per module from the
sample DICOM files, then copied into a fresh directory store): format 2 with two import
batches (log entries 0 genesis, 1 and 2 imports: two segments, two packs, four images),
and format 1 with the same files. The attacks are done to the bucket as the cloud could
(delete, withhold or alter bytes, duplicate, reorder, add objects) or as a non-member
could (a forged segment in the bucket, an entry spliced into the log), and each must come
back as a problem naming the object and its log entry, while a clean repository, a
compacted one and one whose replaced objects await deletion check clean.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

try:
    from fixtures import format2_support as fx
    from workstation import cli_runner
except ImportError:  # pragma: no cover
    from tests.fixtures import format2_support as fx
    from tests.workstation import cli_runner

from app.core import logstate
from app.core.compaction import build_pack, build_segment, compact
from app.core.repo_check import RepoCheckReport, check_repository
from app.core.repository import Repository
from cloud import layout, seglog
from cloud.directory_store import DirectoryStore
from cloud.segments import decode_segment, encode_segment_v2
from crypto import pack, signed
from crypto.identity import Identity
from crypto.segment_mac import index_mac_key

FILES = 4
BATCH = 2


class Built(fx.PristineBucket):
    """A pristine bucket, its repository and owner, copied into a fresh store per test."""

    def __init__(self, tmp: Path, storage_format: int) -> None:
        self.storage_format = storage_format
        super().__init__(tmp)

    def build(self, store: DirectoryStore) -> None:
        self.owner, _, self.repo = fx.repository(store, f"check-v{self.storage_format}",
                                                 FILES, BATCH, self.storage_format)


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("v2"), 2)


@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("v1"), 1)


def _check(store: DirectoryStore, repo: Repository, **kwargs: object) -> RepoCheckReport:
    """A check without this workstation's rollback memory (each test's bucket is a copy)."""
    return check_repository(store, None, repo, **kwargs)  # type: ignore[arg-type]


def _state(store: DirectoryStore, repo: Repository) -> seglog.LogState:
    return seglog.verify_log(store, repo.repo_id, logstate.repository_trust(store, repo))


def _kinds(report: RepoCheckReport) -> set[tuple[str, str, str]]:
    return {(p.kind, p.type, p.id) for p in report.problems}


def _entry_key(repo: Repository, sequence: int) -> str:
    return layout.log_entry_key(repo.repo_id, sequence)


# --- a clean repository ----------------------------------------------------------------------


def test_a_clean_repository_checks_clean_and_remembers_the_head(v2: Built, tmp_path: Path
                                                                ) -> None:
    store = v2.fresh(tmp_path)
    settings = fx.fresh_settings()
    events: list[str] = []
    report = check_repository(store, settings, v2.repo,
                              progress=lambda e: events.append(e.stage))
    assert report.ok, report.lines()
    assert report.counts == {"grants": 1, "log entries": 3, "segments": 2, "packs": 2,
                             "images": FILES, "strays": 0}
    assert report.strays == [] and report.notes == []
    assert report.log["head"] == 2 and report.log["complete"] is True
    assert events == ["log", "segments", "segments", "packs", "packs"]
    head = logstate.remembered_heads(settings)[v2.repo.repo_id]
    assert head.sequence == 2
    data = report.as_dict()
    assert data["ok"] is True and data["problems"] == [] and data["storage_format"] == 2
    assert report.lines()[-1].startswith(f"repository {v2.repo.repo_id} (storage format 2): "
                                         "no problems")
    # --read-data reads every pack whole: still clean
    assert _check(store, v2.repo, read_data=True).ok


# --- the cloud deletes, withholds, alters, duplicates, reorders -----------------------------------


def test_a_deleted_segment_and_a_deleted_pack_are_named(v2: Built, tmp_path: Path) -> None:
    store = v2.fresh(tmp_path)
    state = _state(store, v2.repo)
    segment, other = state.segments()
    # the pack of the other batch: each batch then has one half left
    (victim_pack,) = [p for p in state.packs() if p.added_at != segment.added_at]
    store.delete(layout.segment_key(v2.repo.repo_id, segment.id))
    store.delete(layout.pack_key(v2.repo.repo_id, victim_pack.id))
    report = _check(store, v2.repo)
    assert not report.ok
    problems = {(p.kind, p.type, p.id): p for p in report.problems}
    assert problems[("missing", "segment", segment.id)].sequence == segment.added_at
    assert problems[("missing", "pack", victim_pack.id)].sequence == victim_pack.added_at
    line = problems[("missing", "segment", segment.id)].line()
    assert segment.id in line and f"log entry {segment.added_at}" in line
    # the images of the lost objects are named too: each lacks its other half
    assert {p.kind for p in report.problems} == {"missing", "unpaired"}
    assert sum(p.kind == "unpaired" for p in report.problems) == FILES
    assert other.id not in {p.id for p in report.problems}


def test_altered_bytes_of_a_segment_and_of_a_pack_are_named(v2: Built, tmp_path: Path
                                                            ) -> None:
    store = v2.fresh(tmp_path)
    state = _state(store, v2.repo)
    seg, pk = state.segments()[0], state.packs()[1]
    seg_key = layout.segment_key(v2.repo.repo_id, seg.id)
    blob = bytearray(store.get(seg_key))
    blob[-100] ^= 1  # a changed row, its checksum recomputed: a well-formed segment
    body = bytes(blob[:-32])
    store.put(seg_key, body + hashlib.sha256(body).digest())
    pack_key = layout.pack_key(v2.repo.repo_id, pk.id)
    blob = bytearray(store.get(pack_key))
    blob[-40] ^= 1  # inside the table of contents' envelope
    store.put(pack_key, bytes(blob))
    report = _check(store, v2.repo)
    assert ("altered", "segment", seg.id) in _kinds(report)
    assert ("not authenticated", "pack", pk.id) in _kinds(report)
    # a pack entry altered outside its TOC is found by --read-data (the pack's SHA-256)
    store = v2.fresh(tmp_path / "again")
    blob = bytearray(store.get(pack_key))
    blob[40] ^= 1  # inside the first meta entry
    store.put(pack_key, bytes(blob))
    assert _check(store, v2.repo).ok
    assert ("altered", "pack", pk.id) in _kinds(_check(store, v2.repo, read_data=True))


def test_two_segments_swapped_by_the_cloud_are_both_named(v2: Built, tmp_path: Path) -> None:
    store = v2.fresh(tmp_path)
    one, two = _state(store, v2.repo).segments()
    key_one = layout.segment_key(v2.repo.repo_id, one.id)
    key_two = layout.segment_key(v2.repo.repo_id, two.id)
    blob_one, blob_two = store.get(key_one), store.get(key_two)
    store.put(key_one, blob_two)
    store.put(key_two, blob_one)
    report = _check(store, v2.repo)
    assert {("altered", "segment", one.id), ("altered", "segment", two.id)} <= _kinds(report)


def test_an_image_in_two_live_segments_is_named(v2: Built, tmp_path: Path) -> None:
    """A member's second commit of the same images (a duplicated batch): a search would
    find each twice."""
    store = v2.fresh(tmp_path)
    repo, owner = v2.repo, v2.owner
    state = _state(store, repo)
    first = state.segments()[0]
    segment = decode_segment(store.get(layout.segment_key(repo.repo_id, first.id)), first.id)
    ids = segment.id_strings()
    seg_id, seg_blob = build_segment(repo, owner.identity, 1, state.head.sequence, ids,
                                     segment.vectors)
    plains = _pack_plains(store, repo, state)
    images = [(i, plains[(pack.KIND_META, i)], plains[(pack.KIND_THUMBS, i)]) for i in ids]
    features = np.zeros((len(ids), repo.manifest.dim))
    pack_id, pack_blob = build_pack(repo, 1, images, features)
    _commit_batch(store, repo, owner, state, (seg_id, seg_blob), (pack_id, pack_blob),
                  len(ids))
    report = _check(store, repo)
    duplicates = [p for p in report.problems if p.kind == "duplicate"]
    assert {p.id for p in duplicates} == set(ids)
    assert all(first.id in p.detail and seg_id in p.detail for p in duplicates
               if "segments" in p.detail)
    assert len(duplicates) == 2 * len(ids)  # in two segments and in two packs


def _commit_batch(store: DirectoryStore, repo: Repository, owner: fx.Workstation,
                  state: seglog.LogState, segment: tuple[str, bytes],
                  pack_object: tuple[str, bytes], count: int) -> None:
    """Store a segment and a pack, and commit them with the owner's `add` entry, as an
    import does (the log is the only thing that makes them live)."""
    (seg_id, seg_blob), (pack_id, pack_blob) = segment, pack_object
    store.put(layout.segment_key(repo.repo_id, seg_id), seg_blob)
    store.put(layout.pack_key(repo.repo_id, pack_id), pack_blob)
    seglog.append(store, repo.repo_id, owner.identity, owner.user_id,
                  logstate.repository_trust(store, repo), state, kind=seglog.KIND_ADD,
                  reason=seglog.REASON_IMPORT, key_version=1,
                  added=[seglog.Added(seglog.TYPE_SEGMENT, seg_id,
                                      hashlib.sha256(seg_blob).digest(), count),
                         seglog.Added(seglog.TYPE_PACK, pack_id,
                                      hashlib.sha256(pack_blob).digest(), count)])


def _pack_plains(store: DirectoryStore, repo: Repository, state: seglog.LogState
                 ) -> dict[tuple[int, str], bytes]:
    out: dict[tuple[int, str], bytes] = {}
    for live in state.packs():
        blob = store.get(layout.pack_key(repo.repo_id, live.id))
        out.update(pack.open_pack(repo.keys.data_key, repo.repo_id, live.id, blob)[1])
    return out


def test_a_deleted_log_entry_is_named_and_the_rest_still_checked(v2: Built, tmp_path: Path
                                                                 ) -> None:
    store = v2.fresh(tmp_path)
    state = _state(store, v2.repo)
    store.delete(_entry_key(v2.repo, 1))
    report = _check(store, v2.repo)
    assert [(p.kind, p.type, p.id) for p in report.problems] == [("log", "log entry", "1")]
    assert "gap" in report.problems[0].detail
    assert report.log["head"] == 0 and report.log["complete"] is False
    # entry 1's objects: named by no entry left; entry 2's: named only after the break;
    # all of them authentic (a member wrote them), so no further problem
    by_id = {s.id: s for s in report.strays}
    assert {o.id for o in state.live.values()} == set(by_id)
    for obj in state.live.values():
        expected = "unreferenced" if obj.added_at == 1 else "unverified"
        assert by_id[obj.id].state == expected and by_id[obj.id].authentic is True
    assert any("entry 0" in n for n in report.notes)


def test_a_duplicated_and_a_reordered_log_entry_are_named(v2: Built, tmp_path: Path) -> None:
    store = v2.fresh(tmp_path)
    store.put(_entry_key(v2.repo, 3), store.get(_entry_key(v2.repo, 2)))  # replayed as 3
    report = _check(store, v2.repo)
    assert [(p.kind, p.type, p.id) for p in report.problems] == [("log", "log entry", "3")]
    assert report.log["head"] == 2  # everything before it checked as usual

    store = v2.fresh(tmp_path / "reordered")
    one, two = store.get(_entry_key(v2.repo, 1)), store.get(_entry_key(v2.repo, 2))
    store.put(_entry_key(v2.repo, 1), two)
    store.put(_entry_key(v2.repo, 2), one)
    report = _check(store, v2.repo)
    assert ("log", "log entry", "1") in _kinds(report)
    assert report.log["head"] == 0


def test_a_log_rolled_back_below_the_remembered_head_is_named(v2: Built, tmp_path: Path
                                                              ) -> None:
    store = v2.fresh(tmp_path)
    settings = fx.fresh_settings()
    assert check_repository(store, settings, v2.repo).ok  # remembers head 2
    state = _state(store, v2.repo)
    store.delete(_entry_key(v2.repo, 2))  # the newest entry withheld
    report = check_repository(store, settings, v2.repo)
    assert [(p.kind, p.type) for p in report.problems] == [("log", "log entry")]
    assert "rollback" in report.problems[0].detail and report.problems[0].sequence == 2
    withheld = {o.id for o in state.live.values() if o.added_at == 2}
    assert {s.id for s in report.strays if s.type != "original"} == withheld
    assert {s.state for s in report.strays} == {"unreferenced"}
    assert sum(s.type == "original" for s in report.strays) == BATCH  # its images
    assert logstate.remembered_heads(settings)[v2.repo.repo_id].sequence == 2  # not lowered


# --- a non-member ---------------------------------------------------------------------------


def _forged_objects(repo: Repository, writer: str, base: int) -> tuple[str, bytes, str, bytes]:
    """A segment and a pack made without the repository's keys (a non-member's)."""
    rng = np.random.default_rng(5)
    ids = [layout.new_id() for _ in range(2)]
    features = rng.normal(size=(2, repo.manifest.dim)) * 0.1
    vectors = repo.keys.index_key.encrypt(features)  # the rows may even be right
    seg_id, pack_id = layout.new_id(), layout.new_id()
    segment = encode_segment_v2(ids, vectors, 1, seg_id=seg_id, writer=writer,
                                base_sequence=base, repo_id=repo.repo_id,
                                mac_key=index_mac_key(b"\x07" * 32))
    blob = pack.build_pack(b"\x07" * 32, repo.repo_id, pack_id, 1,
                           [(i, b"{}", b"png") for i in ids], features)
    return seg_id, segment, pack_id, blob


def test_a_forged_segment_and_pack_added_to_the_bucket_are_named(v2: Built, tmp_path: Path
                                                                 ) -> None:
    store = v2.fresh(tmp_path)
    seg_id, segment, pack_id, blob = _forged_objects(v2.repo, "mallory", 2)
    store.put(layout.segment_key(v2.repo.repo_id, seg_id), segment)
    store.put(layout.pack_key(v2.repo.repo_id, pack_id), blob)
    report = _check(store, v2.repo)
    assert _kinds(report) == {("unauthenticated stray", "segment", seg_id),
                              ("unauthenticated stray", "pack", pack_id)}
    strays = {s.id: s for s in report.strays}
    assert strays[seg_id].state == strays[pack_id].state == "unreferenced"
    assert strays[seg_id].authentic is False and strays[pack_id].authentic is False
    assert strays[seg_id].written_after_s is not None  # its header names entry 2
    assert report.log["complete"] is True and report.counts["segments"] == 2


def test_an_entry_spliced_into_the_log_by_a_non_member_is_named(v2: Built, tmp_path: Path
                                                                ) -> None:
    store = v2.fresh(tmp_path)
    repo = v2.repo
    state = _state(store, repo)
    mallory = Identity.generate("Mallory")
    seg_id, segment, pack_id, blob = _forged_objects(repo, mallory.user_id, 2)
    store.put(layout.segment_key(repo.repo_id, seg_id), segment)
    store.put(layout.pack_key(repo.repo_id, pack_id), blob)
    entry = seglog.LogEntry(3, seglog.KIND_ADD, seglog.REASON_IMPORT, state.head.hash,
                            repo.manifest.sequence, 1, 0, mallory.user_id,
                            (seglog.Added(seglog.TYPE_SEGMENT, seg_id,
                                          hashlib.sha256(segment).digest(), 2),
                             seglog.Added(seglog.TYPE_PACK, pack_id,
                                          hashlib.sha256(blob).digest(), 2)), ())
    name = _entry_key(repo, 3)
    store.put(name, signed.sign_record(mallory, "log", name, seglog.encode_payload(entry)))
    report = _check(store, repo)
    kinds = _kinds(report)
    assert ("log", "log entry", "3") in kinds
    assert "not a member" in next(p.detail for p in report.problems if p.kind == "log")
    assert {("unauthenticated stray", "segment", seg_id),
            ("unauthenticated stray", "pack", pack_id)} <= kinds
    assert {s.state for s in report.strays} == {"unverified"}
    assert report.log["head"] == 2 and report.counts["segments"] == 2


def test_a_segment_whose_header_disagrees_with_its_entry_is_named(v2: Built, tmp_path: Path
                                                                  ) -> None:
    """A member's segment claiming another writer (the MAC holds: any member can make
    one), committed by the owner's entry: the writer field must agree with the signer."""
    store = v2.fresh(tmp_path)
    repo, owner = v2.repo, v2.owner
    state = _state(store, repo)
    ids = [layout.new_id() for _ in range(2)]
    features = np.random.default_rng(3).normal(size=(2, repo.manifest.dim)) * 0.1
    seg_id = layout.new_id()
    seg_blob = encode_segment_v2(ids, repo.keys.index_key.encrypt(features), 1, seg_id=seg_id,
                                 writer="somebody-else", base_sequence=state.head.sequence,
                                 repo_id=repo.repo_id,
                                 mac_key=index_mac_key(repo.keys.data_key))
    pack_id, pack_blob = build_pack(repo, 1, [(i, b"{}", b"png") for i in ids], features)
    _commit_batch(store, repo, owner, state, (seg_id, seg_blob), (pack_id, pack_blob), 2)
    report = _check(store, repo)
    mismatch = [p for p in report.problems if p.kind == "mismatch"]
    assert [(p.type, p.id, p.sequence) for p in mismatch] == [("segment", seg_id, 3)]
    assert "writer somebody-else" in mismatch[0].detail
    # the originals of these two images were never uploaded
    assert {p.id for p in report.problems if p.kind == "missing object"} == set(ids)


# --- rewrites and leftovers ---------------------------------------------------------------------


def test_a_compacted_repository_checks_clean_and_lists_the_replaced_objects(
        v2: Built, tmp_path: Path) -> None:
    store = v2.fresh(tmp_path)
    before = _state(store, v2.repo)
    owner = v2.owner
    settings = fx.fresh_settings()
    done = compact(store, settings, v2.repo, owner.identity)
    assert (done.segments_after, done.packs_after) == (1, 1) and done.deferred == 4
    report = _check(store, v2.repo)
    assert report.ok, report.lines()
    assert report.counts["segments"] == report.counts["packs"] == 1
    assert report.counts["images"] == FILES
    replaced = {o.id for o in before.live.values()}
    assert {s.id for s in report.strays} == replaced
    assert {s.state for s in report.strays} == {"removed"}
    assert all(s.removed_at in done.entries and s.removed_age_s is not None
               and s.removed_age_s < 600 for s in report.strays)


def test_a_missing_original_is_named_and_a_stray_original_listed(v2: Built, tmp_path: Path
                                                                 ) -> None:
    store = v2.fresh(tmp_path)
    originals = sorted(store.list_keys(layout.objects_prefix(v2.repo.repo_id)))
    assert len(originals) == FILES
    victim = originals[0].rsplit("/", 1)[-1]
    store.delete(originals[0])
    stray_id = layout.new_id()
    store.put(layout.object_key(v2.repo.repo_id, stray_id), b"an upload never committed")
    report = _check(store, v2.repo)
    assert _kinds(report) == {("missing object", "image", victim)}
    assert [(s.type, s.id, s.state) for s in report.strays] == [
        ("original", stray_id, "unreferenced")]


def test_ages_come_from_the_store_when_it_tells_them(v2: Built, tmp_path: Path) -> None:
    store = v2.fresh(tmp_path)
    seg_id, segment, _, _ = _forged_objects(v2.repo, "mallory", 2)
    key = layout.segment_key(v2.repo.repo_id, seg_id)
    store.put(key, segment)

    class Dated:
        def __init__(self, inner: DirectoryStore) -> None:
            self._inner = inner

        def list_objects_with_times(self, prefix: str
                                    ) -> Iterator[tuple[str, int, float | None]]:
            # the listing's time is used (no HEAD per stray): the forged segment's only
            for name, size in self._inner.list_objects(prefix):
                yield name, size, (1000.0 if name == key else None)

        def modified(self, name: str) -> float | None:
            raise AssertionError(f"{name}: the age must come from the listing")

        def __getattr__(self, name: str) -> object:
            return getattr(self._inner, name)

    report = check_repository(Dated(store), None, v2.repo, now=4600.0)  # type: ignore[arg-type]
    (stray,) = report.strays
    assert stray.age_s == 3600.0 and "60 min ago" in stray.line()


# --- format 1 ------------------------------------------------------------------------------------


def test_format1_segments_and_per_image_objects_are_checked(v1: Built, tmp_path: Path
                                                            ) -> None:
    store = v1.fresh(tmp_path)
    repo = v1.repo
    report = _check(store, repo)
    assert report.ok, report.lines()
    assert report.storage_format == 1
    assert report.counts == {"grants": 1, "segments": 2, "images": FILES}

    segments = sorted(store.list_keys(layout.segments_prefix(repo.repo_id)))
    blob = bytearray(store.get(segments[0]))
    blob[-100] ^= 1  # checksum no longer matches
    store.put(segments[0], bytes(blob))
    ids = decode_segment(store.get(segments[1]), segments[1]).id_strings()
    store.delete(layout.meta_key(repo.repo_id, ids[0]))
    report = _check(store, repo)
    assert _kinds(report) == {
        ("damaged", "segment", segments[0].rsplit("/", 1)[-1]),
        ("missing object", "image", ids[0])}
    assert "metadata" in next(p.detail for p in report.problems if p.type == "image")


def test_format1_an_image_in_two_segments_is_named(v1: Built, tmp_path: Path) -> None:
    store = v1.fresh(tmp_path)
    segments = sorted(store.list_keys(layout.segments_prefix(v1.repo.repo_id)))
    copy = layout.segment_key(v1.repo.repo_id, layout.new_id())
    store.put(copy, store.get(segments[0]))  # format 1 does not name a segment inside it
    report = _check(store, v1.repo)
    ids = decode_segment(store.get(segments[0]), "x").id_strings()
    assert {p.id for p in report.problems if p.kind == "duplicate"} == set(ids)


# --- the command line ------------------------------------------------------------------------

PASSWORD = "cli passphrase: amber meadow 62 lantern"  # zxcvbn 4, as tests/test_cli.py


def test_the_command_names_each_problem_and_exits_1(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    import json

    from app.core.settings import load_settings

    run = cli_runner(tmp_path / "data", PASSWORD, monkeypatch, capsys)

    assert run("identity", "create", "--name", "Checker")[0] == 0
    assert run("repo", "create", "cli-check", "--format", "2")[0] == 0
    files = [str(f) for f in fx.sample_files(2)]
    assert run("import", "--repo", "cli-check", "--batch-size", "1", *files)[0] == 0

    code, out, _ = run("check", "--repo", "cli-check")
    assert code == 0, out
    assert "no problems" in out.splitlines()[-1]
    code, out, _ = run("check", "--repo", "cli-check", "--json")
    data = json.loads(out)
    assert code == 0 and data["schema"] == 1 and data["ok"] is True
    assert data["counts"]["segments"] == 2 and data["problems"] == []

    store = DirectoryStore(load_settings(store="directory",
                                         data_dir=str(tmp_path / "data")).objects_dir)
    victim = sorted(store.list_keys(layout.segments_prefix("cli-check")))[0]
    store.delete(victim)
    seg_id = victim.rsplit("/", 1)[-1]
    code, out, _ = run("check", "--repo", "cli-check")
    assert code == 1
    first = out.splitlines()[0]
    assert first.startswith(f"segment {seg_id} (log entry ") and ": missing: " in first
    code, out, _ = run("check", "--repo", "cli-check", "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False
    assert {"kind": "missing", "type": "segment", "id": seg_id}.items() <= \
        data["problems"][0].items()


def test_checkpoints_are_compared_with_the_log_replayed_from_genesis(v2: Built, tmp_path: Path
                                                                     ) -> None:
    store = v2.fresh(tmp_path)
    repo, owner = v2.repo, v2.owner
    state = _state(store, repo)
    seglog.write_checkpoint(store, repo.repo_id, owner.identity, state, repo.manifest.sequence)
    report = _check(store, repo)
    assert report.ok and report.log["checkpoint"] == 2

    # entries below a checkpoint may be deleted (FORMAT-2 5.6): verified from the checkpoint
    store.delete(_entry_key(repo, 0))
    store.delete(_entry_key(repo, 1))
    report = _check(store, repo)
    assert report.ok, report.lines()
    assert report.log["start"] == 2 and any("checkpoint" in n for n in report.notes)

    # a checkpoint whose live set is not the log's (signed by the owner: a broken writer)
    store = v2.fresh(tmp_path / "wrong")
    wrong = state.copy()
    dropped = wrong.segments()[0]
    del wrong.live[(seglog.TYPE_SEGMENT, dropped.id)]
    name = layout.checkpoint_key(repo.repo_id, 2)
    store.put(name, signed.sign_json(owner.identity, "checkpoint", name,
                                     seglog.checkpoint_payload(wrong, repo.manifest.sequence)))
    report = _check(store, repo)
    assert _kinds(report) == {("log", "checkpoint", "2")}
    assert "checkpoint live set" in report.problems[0].detail
    assert report.log["head"] == 1  # checked against the log before the checkpoint


# --- reading the data (issue 14) -------------------------------------------------------------


def _flip(store: DirectoryStore, key: str, offset: int) -> None:
    blob = bytearray(store.get(key))
    blob[offset] ^= 0x01
    store.put(key, bytes(blob))


def test_read_data_finds_a_flipped_pack_entry_and_a_replaced_original(v2: Built,
                                                                      tmp_path: Path) -> None:
    store = v2.fresh(tmp_path)
    repo = v2.repo
    state = _state(store, repo)
    victim_pack = state.packs()[0]
    pack_key = layout.pack_key(repo.repo_id, victim_pack.id)
    _flip(store, pack_key, pack.HEADER_SIZE + 40)  # inside the first entry, not the TOC
    originals = sorted(store.list_keys(layout.objects_prefix(repo.repo_id)))
    replaced, donor = originals[0], originals[1]
    store.put(replaced, store.get(donor))  # another image's (valid) original
    flipped = originals[2]
    _flip(store, flipped, 200)
    # the structure is intact: a check that does not read the data sees nothing
    assert _check(store, repo).ok
    report = _check(store, repo, read_data=True)
    named = _kinds(report)
    assert ("altered", "pack", victim_pack.id) in named
    assert ("not authenticated", "original", replaced.rsplit("/", 1)[-1]) in named
    assert ("not authenticated", "original", flipped.rsplit("/", 1)[-1]) in named
    # and the images of the unreadable pack have no metadata or preview: named too
    others = [p for p in report.problems if p.kind != "unpaired"]
    assert len(others) == 3 and len(report.problems) == 3 + BATCH, report.lines()
    assert report.counts["originals read"] == FILES - 2
    assert report.counts["packs read"] == 1
    line = next(p.line() for p in report.problems if p.type == "original")
    assert "does not open under key version 1 as this image's original" in line


def test_read_data_subsets_are_seeded_or_parts_that_cover_everything(v2: Built,
                                                                     tmp_path: Path) -> None:
    from app.core.repo_check import parse_subset

    store = v2.fresh(tmp_path)
    parts = [_check(store, v2.repo, subset=parse_subset(f"{n}/3")) for n in (1, 2, 3)]
    assert all(r.ok and r.read_data for r in parts)
    assert sum(r.counts.get("originals read", 0) for r in parts) == FILES
    assert sum(r.counts.get("packs read", 0) for r in parts) == 2
    seeded = [_check(store, v2.repo, subset=parse_subset("50%", seed=s)) for s in range(6)]
    read = [(r.counts.get("originals read", 0), r.counts.get("packs read", 0))
            for r in seeded]
    assert len(set(read)) > 1  # another seed, another subset
    again = _check(store, v2.repo, subset=parse_subset("50%", seed=3))
    assert (again.counts.get("originals read", 0), again.counts.get("packs read", 0)) == \
        read[3]
    data = again.as_dict()
    assert data["read_data"] is True
    assert data["read_data_subset"] == {"spec": "50%", "fraction": 0.5, "part": None,
                                        "seed": 3}
    assert "read data of the subset 50%, seed 3" in again.lines()
    everything = _check(store, v2.repo, subset=parse_subset("100%"))
    assert everything.counts["originals read"] == FILES
    for bad in ("0%", "101%", "0/3", "4/3", "half", "1/0"):
        with pytest.raises(ValueError, match="invalid --read-data-subset"):
            parse_subset(bad)


def test_check_read_data_command_exit_codes_and_json(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    import json

    from app.core.settings import load_settings

    run = cli_runner(tmp_path / "data", PASSWORD, monkeypatch, capsys)

    assert run("identity", "create", "--name", "Reader")[0] == 0
    assert run("repo", "create", "cli-read", "--format", "2")[0] == 0
    files = [str(f) for f in fx.sample_files(2)]
    assert run("import", "--repo", "cli-read", *files)[0] == 0
    code, out, err = run("check", "--repo", "cli-read", "--read-data-subset", "50%",
                         "--seed", "11")
    assert code == 0 and "seed 11" in err and "read data of the subset 50%, seed 11" in out
    store = DirectoryStore(load_settings(store="directory",
                                         data_dir=str(tmp_path / "data")).objects_dir)
    first, second = sorted(store.list_keys(layout.objects_prefix("cli-read")))
    store.put(first, store.get(second))
    code, out, err = run("check", "--repo", "cli-read", "--read-data", "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False and data["read_data"] is True
    (problem,) = data["problems"]
    assert set(problem) == {"kind", "type", "id", "sequence", "detail"}
    assert (problem["kind"], problem["type"], problem["id"]) == (
        "not authenticated", "original", first.rsplit("/", 1)[-1])
    assert set(data) >= {"schema", "repo_id", "storage_format", "ok", "problems", "strays",
                         "notes", "log", "counts", "read_data", "read_data_subset",
                         "seconds"}
    assert "radcrypt: originals (2)" in err  # a stage line per stage, stderr not a terminal
    with pytest.raises(SystemExit) as usage:
        run("check", "--read-data")
    assert usage.value.code == 2


def test_a_missing_or_forged_grant_is_named(v2: Built, tmp_path: Path) -> None:
    store = v2.fresh(tmp_path)
    repo, owner = v2.repo, v2.owner
    name = layout.grant_key(repo.repo_id, owner.user_id)
    mallory = Identity.generate("Mallory")
    payload = store.get(name)[4 + 1 + 32 + 64:]
    store.put(name, signed.sign_record(mallory, "grant", name, payload))  # re-signed
    stray = layout.grant_key(repo.repo_id, "someone-else")
    store.put(stray, b"not a member's")
    report = _check(store, repo)
    assert _kinds(report) == {("grant", "grant", owner.user_id)}
    assert "is not signed by an owner" in report.problems[0].detail
    assert any("grants/someone-else belongs to no member" in n for n in report.notes)
    store.delete(name)
    report = _check(store, repo)
    assert _kinds(report) == {("grant", "grant", owner.user_id)}
    assert "is not in the bucket" in report.problems[0].detail
