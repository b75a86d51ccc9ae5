"""The segment log (cloud/seglog.py, cloud/seglog_format.py; docs/FORMAT-2.md 5, 6).

Every attack of issue 13 on the log is performed on a real DirectoryStore bucket: delete,
withhold, duplicate and reorder an entry, a forged entry by a non-member, a rollback to an
older head, a fork. Two appenders racing in threads lose nothing. The vector files of
tests/vectors/gen_log.py are replayed, and their layouts are re-derived here with hashlib
and struct only (no project code), from FORMAT-2.md's text.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import shutil
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from cloud import layout
from cloud import seglog as sl
from cloud.backend import ObjectNotFound
from cloud.directory_store import DirectoryStore
from cloud.seglog_format import LogEntry, decode_payload, encode_payload
from crypto import signed
from crypto.errors import FormatError
from crypto.identity import Identity, SignatureError

VECTORS = Path(__file__).resolve().parent / "vectors"
REPO = "seglog-test"
ERRORS: dict[str, type[BaseException]] = {
    "FormatError": FormatError, "SignatureError": SignatureError, "LogError": sl.LogError,
    "LogAhead": sl.LogAhead, "AnswerError": sl.AnswerError, "ValueError": ValueError}

OWNER = Identity("owner-1", "Owner", b"\x01" * 32, b"\x02" * 32)
ZOE = Identity("zoe-1", "Zoe", b"\x03" * 32, b"\x04" * 32)
MALLORY = Identity("mallory-1", "Mallory", b"\x05" * 32, b"\x06" * 32)


def trust(members: tuple[Identity, ...] = (ZOE,), manifest_sequence: int = 1,
          key_version: int = 1) -> sl.StaticTrust:
    return sl.StaticTrust(OWNER.user_id, OWNER.sign_public, manifest_sequence, key_version,
                          {m.user_id: m.sign_public for m in members})


def batch(label: str, count: int = 8) -> list[sl.Added]:
    """One import batch: a segment and a pack with fresh ids."""
    return [sl.Added(sl.TYPE_SEGMENT, layout.new_id(), hashlib.sha256(label.encode()).digest(),
                     count),
            sl.Added(sl.TYPE_PACK, layout.new_id(), hashlib.sha256(b"p" + label.encode())
                     .digest(), count)]


def add(store: DirectoryStore, state: sl.LogState, who: Identity = ZOE,
        t: sl.StaticTrust | None = None, label: str = "x") -> sl.LogState:
    return sl.append(store, REPO, who, who.user_id, t or trust(), state, kind=sl.KIND_ADD,
                     reason=sl.REASON_IMPORT, key_version=1, added=batch(label))


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    s = DirectoryStore(tmp_path / "bucket")
    s.ensure_bucket()
    return s


@pytest.fixture
def logged(store: DirectoryStore) -> tuple[DirectoryStore, sl.LogState]:
    """A bucket with genesis and four imports (entries 0..4)."""
    state = sl.write_genesis(store, REPO, OWNER, OWNER.user_id, 1, 1)
    for i in range(4):
        state = add(store, state, ZOE if i % 2 else OWNER, label=str(i))
    return store, state


def entry_key(n: int) -> str:
    return layout.log_entry_key(REPO, n)


# --- layout ------------------------------------------------------------------------------------


def test_layout_names_parse_back() -> None:
    pid = layout.new_id()
    assert layout.pack_key(REPO, pid) == f"radcrypt/v1/repos/{REPO}/packs/{pid}"
    assert layout.parse_pack_key(layout.pack_key(REPO, pid)) == (REPO, pid)
    assert layout.log_entry_key(REPO, 42).endswith("/log/00000000000000000042")
    assert layout.parse_log_entry_key(layout.log_entry_key(REPO, 2**64 - 1)) == (REPO, 2**64 - 1)
    assert layout.parse_checkpoint_key(layout.checkpoint_key(REPO, 7)) == (REPO, 7)
    assert layout.log_prefix(REPO).endswith("/log/")
    assert layout.checkpoints_prefix(REPO).endswith("/checkpoints/")
    assert layout.packs_prefix(REPO).endswith("/packs/")
    for bad in ("42", "1" * 21, "0000000000000000004x", ""):
        with pytest.raises(ValueError, match="log"):
            layout.parse_log_entry_key(layout.log_prefix(REPO) + bad)
    with pytest.raises(ValueError, match="sequence"):
        layout.log_entry_key(REPO, -1)
    with pytest.raises(ValueError, match="pack_id"):
        layout.pack_key(REPO, "ABC")
    keys = [layout.pack_key(REPO, pid), layout.log_entry_key(REPO, 1),
            layout.checkpoint_key(REPO, 1), layout.manifest_key(REPO)]
    assert not any(b.startswith(a + "/") for a in keys for b in keys)


def test_foreign_names_under_log_are_ignored(logged: tuple[DirectoryStore, sl.LogState]
                                             ) -> None:
    store, state = logged
    store.put(layout.log_prefix(REPO) + "99", b"junk")
    store.put(layout.checkpoints_prefix(REPO) + "README", b"junk")
    assert sl.verify_log(store, REPO, trust()).head == state.head


# --- entries -------------------------------------------------------------------------------------


def test_payload_round_trip_and_canonical_order() -> None:
    a, b = batch("a"), batch("b")
    entry = LogEntry(3, sl.KIND_REPLACE, sl.REASON_COMPACTION, b"\x07" * 32, 5, 2, 1234,
                     "zoe-1", tuple(sorted(a + b, key=lambda x: (x.type, x.id))),
                     (sl.Removed(sl.TYPE_SEGMENT, "0" * 32),))
    payload = encode_payload(entry)
    assert len(payload) == 132 + 4 + 4 * 56 + 4 + 20
    assert decode_payload(payload, entry_key(3)) == entry
    with pytest.raises(FormatError, match="sorted"):
        encode_payload(LogEntry(3, 1, 0, b"\0" * 32, 0, 1, 0, "zoe-1",
                                tuple(reversed(entry.added)), ()))
    with pytest.raises(FormatError, match="sequence"):
        decode_payload(payload, entry_key(4))


def test_append_refuses_a_bad_entry_before_writing(logged: tuple[DirectoryStore, sl.LogState]
                                                   ) -> None:
    store, state = logged
    before = list(store.list_keys(layout.log_prefix(REPO)))
    with pytest.raises(sl.LogError) as info:
        sl.append(store, REPO, OWNER, OWNER.user_id, trust(), state, kind=sl.KIND_REMOVE,
                  reason=sl.REASON_ERASURE, key_version=1, added=[],
                  removed=[sl.Removed(sl.TYPE_SEGMENT, layout.new_id())])
    assert info.value.reason == "not live"
    with pytest.raises(sl.LogError, match="neither the owner nor a current member"):
        add(store, state, MALLORY)
    with pytest.raises(sl.LogError, match="registered key"):
        sl.append(store, REPO, MALLORY, ZOE.user_id, trust(), state, kind=sl.KIND_ADD,
                  reason=sl.REASON_IMPORT, key_version=1, added=batch("m"))
    assert list(store.list_keys(layout.log_prefix(REPO))) == before


def test_live_set_replace_and_remove(logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    segs, packs = state.segments(1), state.packs(1)
    assert len(segs) == 4 and state.images(1) == 32
    merged = [sl.Added(sl.TYPE_SEGMENT, layout.new_id(), b"\x11" * 32, 16),
              sl.Added(sl.TYPE_PACK, layout.new_id(), b"\x12" * 32, 16)]
    gone = [sl.Removed(o.type, o.id) for o in (segs[0], segs[1], *packs[:0])]
    with pytest.raises(sl.LogError) as info:   # packs: 16 added, 0 removed
        sl.append(store, REPO, ZOE, ZOE.user_id, trust(), state, kind=sl.KIND_REPLACE,
                  reason=sl.REASON_COMPACTION, key_version=1, added=merged, removed=gone)
    assert info.value.reason == "counts"
    gone += [sl.Removed(o.type, o.id) for o in packs[:2]]
    s2 = sl.append(store, REPO, ZOE, ZOE.user_id, trust(), state, kind=sl.KIND_REPLACE,
                   reason=sl.REASON_COMPACTION, key_version=1, added=merged, removed=gone)
    assert len(s2.segments(1)) == 3 and s2.images(1) == 32
    assert s2.live_at(4, 1) == {o.id for o in segs}
    s3 = sl.append(store, REPO, OWNER, OWNER.user_id, trust(), s2, kind=sl.KIND_REMOVE,
                   reason=sl.REASON_REVOCATION, key_version=1, added=[],
                   removed=[sl.Removed(sl.TYPE_SEGMENT, merged[0].id)])
    verified = sl.verify_log(store, REPO, trust())
    assert verified.head == s3.head and verified.live == s3.live
    assert verified.set_digest(1) == sl.set_digest(REPO, 1, [o.id for o in segs[2:]])
    assert state.head.sequence == 4 and len(state.live) == 8   # inputs are never changed


# --- attacks on the bucket -----------------------------------------------------------------------


def test_deleted_entry_is_a_gap(logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, _ = logged
    store.delete(entry_key(2))
    with pytest.raises(sl.LogError) as info:
        sl.verify_log(store, REPO, trust())
    assert (info.value.reason, info.value.sequence) == ("gap", 2)
    assert "entry 2" in str(info.value)


class Withholding:
    """The cloud hides some log entries from one reader (listing and reading)."""

    def __init__(self, inner: DirectoryStore, hidden: set[str]) -> None:
        self.inner, self.hidden = inner, hidden

    def list_keys(self, prefix: str) -> Iterator[str]:
        return (k for k in self.inner.list_keys(prefix) if k not in self.hidden)

    def get(self, key: str) -> bytes:
        if key in self.hidden:
            raise ObjectNotFound(key)
        return self.inner.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_withheld_entries(logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    # the newest entry hidden from a reader that saw it: rollback
    newest = Withholding(store, {entry_key(4)})
    with pytest.raises(sl.LogError, match="rollback") as info:
        sl.verify_log(newest, REPO, trust(), remembered=state.head)
    assert info.value.reason == "rollback"
    # ... from a reader that never saw it: a shorter, valid log, but an honest service's
    # answer names the hidden head, and the client cannot verify it
    short = sl.verify_log(newest, REPO, trust())
    assert short.head.sequence == 3
    with pytest.raises(sl.LogAhead):
        sl.judge_answer(short, 1, 4, state.head.hash, state.set_digest(1), 4, None)
    # a middle entry hidden: a gap
    with pytest.raises(sl.LogError, match="gap"):
        sl.verify_log(Withholding(store, {entry_key(1)}), REPO, trust())
    # entries hidden behind a checkpoint: the checkpoint names a missing entry
    sl.write_checkpoint(store, REPO, OWNER, state, 1)
    with pytest.raises(sl.LogError) as info:
        sl.verify_log(Withholding(store, {entry_key(4)}), REPO, trust())
    assert info.value.reason == "gap"


def test_duplicated_entry(logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    # the cloud copies entry 2 as entry 5: the signature binds the name
    store.put(entry_key(5), store.get(entry_key(2)))
    with pytest.raises(SignatureError):
        sl.verify_log(store, REPO, trust())
    store.delete(entry_key(5))
    # a member replays entry 2's additions, correctly signed and chained: re-added
    e2 = decode_payload(signed.open_record(store.get(entry_key(2)), "log", entry_key(2),
                                           [OWNER.sign_public, ZOE.sign_public]), entry_key(2))
    who = ZOE if e2.writer == ZOE.user_id else OWNER
    replay = LogEntry(5, e2.kind, e2.reason, state.head.hash, 1, 1, e2.time_ms, e2.writer,
                      e2.added, ())
    store.put(entry_key(5), signed.sign_record(who, "log", entry_key(5), encode_payload(replay)))
    with pytest.raises(sl.LogError) as info:
        sl.verify_log(store, REPO, trust())
    assert (info.value.reason, info.value.sequence) == ("re-added", 5)


def test_reordered_entries(logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, _ = logged
    two, three = store.get(entry_key(2)), store.get(entry_key(3))
    store.put(entry_key(2), three)
    store.put(entry_key(3), two)
    with pytest.raises(SignatureError):
        sl.verify_log(store, REPO, trust())


def test_reordered_entries_resigned_break_the_chain(
        logged: tuple[DirectoryStore, sl.LogState]) -> None:
    """Even the writers themselves cannot reorder: each entry names its predecessor."""
    store, _ = logged
    keys = [OWNER.sign_public, ZOE.sign_public]
    entries = {n: decode_payload(signed.open_record(store.get(entry_key(n)), "log",
                                                    entry_key(n), keys), entry_key(n))
               for n in (3, 4)}
    for new, old in ((3, 4), (4, 3)):
        e = entries[old]
        moved = LogEntry(new, e.kind, e.reason, e.prev, e.manifest_sequence, e.key_version,
                         e.time_ms, e.writer, e.added, e.removed)
        who = ZOE if e.writer == ZOE.user_id else OWNER
        store.put(entry_key(new), signed.sign_record(who, "log", entry_key(new),
                                                     encode_payload(moved)))
    with pytest.raises(sl.LogError) as info:
        sl.verify_log(store, REPO, trust())
    assert (info.value.reason, info.value.sequence) == ("prev mismatch", 3)


def test_forged_entry_by_a_non_member(logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    forged = LogEntry(5, sl.KIND_ADD, sl.REASON_IMPORT, state.head.hash, 1, 1, 0,
                      MALLORY.user_id, tuple(batch("evil")), ())
    store.put(entry_key(5), signed.sign_record(MALLORY, "log", entry_key(5),
                                               encode_payload(forged)))
    with pytest.raises(sl.LogError) as info:
        sl.verify_log(store, REPO, trust())
    assert (info.value.reason, info.value.sequence) == ("not a member", 5)
    # Mallory naming Zoe as the writer: her key is nobody's
    as_zoe = LogEntry(5, sl.KIND_ADD, sl.REASON_IMPORT, state.head.hash, 1, 1, 0,
                      ZOE.user_id, tuple(batch("evil")), ())
    store.put(entry_key(5), signed.sign_record(MALLORY, "log", entry_key(5),
                                               encode_payload(as_zoe)))
    with pytest.raises(SignatureError, match="not zoe-1's"):
        sl.verify_log(store, REPO, trust())
    # a forged segment object with no entry is simply not live
    store.delete(entry_key(5))
    store.put(layout.segment_key(REPO, layout.new_id()), b"forged")
    assert sl.verify_log(store, REPO, trust()).live == state.live


def test_revoked_member_entry_after_membership(
        logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    after = trust(members=(), manifest_sequence=2)
    state = sl.append(store, REPO, OWNER, OWNER.user_id, after, state,
                      kind=sl.KIND_MEMBERSHIP, reason=sl.REASON_REVOCATION, key_version=1,
                      added=[])
    sl.write_checkpoint(store, REPO, OWNER, state, 2)
    assert sl.verify_log(store, REPO, after).head == state.head  # Zoe's old entries: below
    # Zoe still believes in manifest 1 and appends behind the revocation
    stale = add(store, state, ZOE, trust(manifest_sequence=2))
    assert stale.head.sequence == 6
    with pytest.raises(sl.LogError) as info:
        sl.verify_log(store, REPO, after)
    assert (info.value.reason, info.value.sequence) == ("not a member", 6)


def test_since_across_a_revocation(logged: tuple[DirectoryStore, sl.LogState]) -> None:
    """A reader last verified before Zoe's final import and her removal: her entry is pinned
    by the owner's checkpoint at the membership entry, so the reader accepts it; an entry
    she writes afterwards is refused."""
    store, before = logged
    counting = Counting(store.root)
    counting.gets = []
    state = add(store, before, ZOE, label="last")
    after = trust(members=(), manifest_sequence=2)
    state = sl.append(store, REPO, OWNER, OWNER.user_id, after, state,
                      kind=sl.KIND_MEMBERSHIP, reason=sl.REASON_REVOCATION, key_version=1,
                      added=[])
    sl.write_checkpoint(store, REPO, OWNER, state, 2)
    seen = sl.verify_log(counting, REPO, after, since=before)
    assert seen.head == state.head and seen.live == state.live
    assert counting.gets == [layout.checkpoint_key(REPO, 6), entry_key(5), entry_key(6)]
    with pytest.raises(sl.LogError, match="not a member"):   # without the checkpoint
        sl.verify_log(Withholding(store, {layout.checkpoint_key(REPO, 6)}), REPO, after,
                      since=before)
    add(store, state, ZOE, trust(manifest_sequence=2), label="stale")
    with pytest.raises(sl.LogError) as info:
        sl.verify_log(store, REPO, after, since=seen)
    assert (info.value.reason, info.value.sequence) == ("not a member", 7)


def test_rollback_to_an_older_head(tmp_path: Path,
                                   logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    shutil.copytree(store.root, tmp_path / "old")
    newer = add(store, state, label="new")
    seen = sl.verify_log(store, REPO, trust())
    assert seen.head == newer.head
    old = DirectoryStore(tmp_path / "old")       # the cloud serves yesterday's bucket
    with pytest.raises(sl.LogError) as info:
        sl.verify_log(old, REPO, trust(), remembered=seen.head)
    assert info.value.reason == "rollback"
    with pytest.raises(sl.LogError, match="rollback"):
        sl.verify_log(old, REPO, trust(), since=seen)


def test_fork(tmp_path: Path, logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    shutil.copytree(store.root, tmp_path / "other")
    mine = add(store, state, label="mine")
    other = DirectoryStore(tmp_path / "other")
    theirs = add(other, state, OWNER, label="theirs")
    theirs = add(other, theirs, label="more")       # the other branch is even longer
    with pytest.raises(sl.LogError) as info:
        sl.verify_log(other, REPO, trust(), remembered=mine.head)
    assert (info.value.reason, info.value.sequence) == ("fork", 5)
    with pytest.raises(sl.LogError, match="prev"):
        sl.verify_log(other, REPO, trust(), since=mine)
    # a service on the other branch: judge_answer sees the fork
    with pytest.raises(sl.LogError, match="fork"):
        sl.judge_answer(mine, 1, 5, theirs.hashes[5], theirs.set_digest(1), 5, None)


def test_checkpoint_rollback_and_forged_checkpoint(
        logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    sl.write_checkpoint(store, REPO, OWNER, state, 1)
    sl.write_checkpoint(store, REPO, OWNER, state, 1)    # idempotent
    seen = sl.verify_log(store, REPO, trust())
    assert (seen.start, seen.head.checkpoint) == (4, 4)
    # a checkpoint by a member is ignored (not the owner's key)
    later = add(store, state, label="later")
    fake = signed.sign_json(ZOE, "checkpoint", layout.checkpoint_key(REPO, 5),
                            sl.checkpoint_payload(later, 1))
    store.put(layout.checkpoint_key(REPO, 5), fake)
    assert sl.verify_log(store, REPO, trust()).head.checkpoint == 4
    store.delete(layout.checkpoint_key(REPO, 4))
    with pytest.raises(sl.LogError) as info:
        sl.verify_log(store, REPO, trust(), remembered=seen.head)
    assert info.value.reason == "checkpoint rollback"


def test_start_from_checkpoint_after_truncation(
        logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    sl.write_checkpoint(store, REPO, OWNER, state, 1)
    state = add(store, state, label="after")
    for n in range(4):
        store.delete(entry_key(n))
    verified = sl.verify_log(store, REPO, trust())
    assert verified.head == state.head and verified.live.keys() == state.live.keys()
    assert verified.set_digest(1) == state.set_digest(1)
    with pytest.raises(sl.LogError, match="genesis"):
        sl.verify_log(store, REPO, trust(), from_genesis=True)


def test_checkpoint_lying_about_the_live_set(
        logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    payload = sl.checkpoint_payload(state, 1)
    lie = json.loads(json.dumps(payload))
    lie["live"] = [o for o in lie["live"] if o["id"] != state.segments(1)[0].id]
    lie["set_digests"] = {"1": sl.set_digest(REPO, 1, [o.id for o in
                                                       state.segments(1)[1:]]).hex()}
    lie["images"] -= state.segments(1)[0].count
    store.put(layout.checkpoint_key(REPO, 4), signed.sign_json(
        OWNER, "checkpoint", layout.checkpoint_key(REPO, 4), lie))
    with pytest.raises(sl.LogError) as info:
        sl.verify_log(store, REPO, trust(), from_genesis=True)
    assert info.value.reason == "checkpoint live set"
    with pytest.raises(sl.LogError, match="live set"):
        sl.verify_log(store, REPO, trust(), since=sl.verify_log(
            Withholding(store, {entry_key(4), layout.checkpoint_key(REPO, 4)}),
            REPO, trust()))


# --- incremental verification and concurrency ----------------------------------------------------


class Counting(DirectoryStore):
    gets: list[str]

    def get(self, key: str) -> bytes:
        self.gets.append(key)
        return super().get(key)


def test_since_reads_only_new_entries(logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    counting = Counting(store.root)
    counting.gets = []
    seen = sl.verify_log(counting, REPO, trust())
    assert len(counting.gets) == 5
    state = add(store, add(store, state, label="a"), label="b")
    counting.gets = []
    newer = sl.verify_log(counting, REPO, trust(), since=seen)
    assert counting.gets == [entry_key(5), entry_key(6)]
    assert newer.head == state.head and newer.live == state.live
    assert seen.head.sequence == 4


def test_two_concurrent_appenders_lose_nothing(store: DirectoryStore) -> None:
    genesis = sl.write_genesis(store, REPO, OWNER, OWNER.user_id, 1, 1)
    committed: dict[str, list[sl.Added]] = {"owner-1": [], "zoe-1": []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def writer(who: Identity) -> None:
        try:
            state = genesis
            barrier.wait()
            for i in range(50):
                added = batch(f"{who.user_id}-{i}", 1 + i)
                state = sl.append(store, REPO, who, who.user_id, trust(), state,
                                  kind=sl.KIND_ADD, reason=sl.REASON_IMPORT, key_version=1,
                                  added=added)
                committed[who.user_id] += added
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in (OWNER, ZOE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = sl.verify_log(store, REPO, trust())
    assert final.head.sequence == 100
    want = {(a.type, a.id) for added in committed.values() for a in added}
    assert len(want) == 200 and set(final.live) == want
    assert final.images(1) == 2 * sum(1 + i for i in range(50))


def test_lost_race_abandons_a_replace_of_removed_objects(
        logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    target = state.segments(1)[0]
    pack = state.packs(1)[0]
    removed = [sl.Removed(target.type, target.id), sl.Removed(pack.type, pack.id)]
    first = sl.append(store, REPO, OWNER, OWNER.user_id, trust(), state, kind=sl.KIND_REMOVE,
                      reason=sl.REASON_ERASURE, key_version=1, added=[], removed=removed)
    with pytest.raises(sl.AppendAbandoned) as info:   # compaction still at the old head
        sl.append(store, REPO, OWNER, OWNER.user_id, trust(), state, kind=sl.KIND_REPLACE,
                  reason=sl.REASON_COMPACTION, key_version=1,
                  added=[sl.Added(1, layout.new_id(), b"\0" * 32, target.count),
                         sl.Added(2, layout.new_id(), b"\0" * 32, pack.count)],
                  removed=removed)
    assert info.value.reason == "abandoned"
    assert sl.verify_log(store, REPO, trust()).head == first.head


class RetriedPut(DirectoryStore):
    """The first conditional PUT lands but its answer is lost: the client retries it and
    the store says the object exists (a retried request on S3)."""

    lost = False

    def put(self, key: str, data: bytes | bytearray | memoryview, *,
            if_absent: bool = False) -> None:
        super().put(key, data, if_absent=if_absent)
        if if_absent and "/log/" in key and not self.lost:
            self.lost = True
            super().put(key, data, if_absent=True)     # the retry: ObjectExists


def test_a_retried_put_of_our_own_entry_is_not_a_lost_race(
        logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    target = state.segments(1)[0]
    retried = RetriedPut(store.root)
    after = sl.append(retried, REPO, OWNER, OWNER.user_id, trust(), state, kind=sl.KIND_REMOVE,
                      reason=sl.REASON_ERASURE, key_version=1, added=[],
                      removed=[sl.Removed(target.type, target.id)])
    assert retried.lost and after.head.sequence == 5
    assert sl.verify_log(store, REPO, trust()).head.hash == after.head.hash


def _raw_append(store: DirectoryStore, state: sl.LogState, who: Identity, kind: int,
                reason: int, added: Sequence[sl.Added], removed: Sequence[sl.Removed] = (),
                key_version: int = 1, manifest_sequence: int = 1) -> None:
    """Write an entry the way a buggy or malicious member could: no rule checked."""
    n = state.head.sequence + 1
    entry = LogEntry(n, kind, reason, state.head.hash, manifest_sequence, key_version, 0,
                     who.user_id, tuple(sorted(added, key=lambda a: (a.type, a.id))),
                     tuple(sorted(removed, key=lambda r: (r.type, r.id))))
    store.put(entry_key(n), signed.sign_record(who, "log", entry_key(n), encode_payload(entry)))


@pytest.mark.parametrize(("who", "kind", "reason", "shape", "key_version", "why"), [
    (ZOE, sl.KIND_MEMBERSHIP, sl.REASON_REVOCATION, "none", 1, "not owner"),
    (ZOE, sl.KIND_ADD, sl.REASON_REVOCATION, "batch", 1, "not owner"),
    (ZOE, sl.KIND_ADD, sl.REASON_IMPORT, "batch", 2, "key version"),
    (OWNER, sl.KIND_ADD, sl.REASON_IMPORT, "batch", 2, "key version"),
    (ZOE, sl.KIND_ADD, sl.REASON_IMPORT, "segment only", 1, "kind rule"),
    (ZOE, sl.KIND_ADD, sl.REASON_COMPACTION, "batch", 1, "kind rule"),
    (ZOE, sl.KIND_GENESIS, sl.REASON_IMPORT, "none", 1, "genesis"),
    (ZOE, sl.KIND_REPLACE, sl.REASON_MIGRATION, "v1", 1, "not owner"),
    (OWNER, sl.KIND_REMOVE, sl.REASON_ERASURE, "v1", 1, "kind rule"),
    (ZOE, sl.KIND_REMOVE, sl.REASON_ERASURE, "batch", 1, "not owner"),
])
def test_kind_rules(logged: tuple[DirectoryStore, sl.LogState], who: Identity, kind: int,
                    reason: int, shape: str, key_version: int, why: str) -> None:
    store, state = logged
    added = {"none": [], "batch": batch("k"), "segment only": batch("k")[:1],
             "v1": []}[shape]
    removed = [sl.Removed(sl.TYPE_V1_SEGMENT, layout.new_id())] if shape == "v1" else []
    _raw_append(store, state, who, kind, reason, added, removed, key_version)
    with pytest.raises(sl.LogError) as info:
        sl.verify_log(store, REPO, trust())
    assert (info.value.reason, info.value.sequence) == (why, 5)


def test_manifest_sequence_rules(logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    _raw_append(store, state, ZOE, sl.KIND_ADD, sl.REASON_IMPORT, batch("m"),
                manifest_sequence=2)
    with pytest.raises(sl.LogError) as info:    # names a manifest the verifier has not seen
        sl.verify_log(store, REPO, trust(manifest_sequence=1))
    assert (info.value.reason, info.value.sequence) == ("manifest sequence ahead", 5)
    newer = sl.verify_log(store, REPO, trust(manifest_sequence=2))
    with pytest.raises(sl.LogError) as info:    # a writer still at manifest 1 after it
        add(store, newer, ZOE, trust(manifest_sequence=1))
    assert info.value.reason == "manifest sequence decreasing"


def test_full_verification_reads_only_the_newest_checkpoint(
        logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    three = sl.verify_log(store, REPO, trust())
    sl.write_checkpoint(store, REPO, OWNER, three, 1)
    state = add(store, three, label="5")
    sl.write_checkpoint(store, REPO, OWNER, state, 1)
    counting = Counting(store.root)
    counting.gets = []
    assert sl.verify_log(counting, REPO, trust()).head == state.head
    assert counting.gets == [layout.checkpoint_key(REPO, 5), entry_key(5)]


def test_owner_rotation_and_migration_entries(logged: tuple[DirectoryStore, sl.LogState]
                                              ) -> None:
    store, state = logged
    # revocation step 5: the owner adds copies under key version 2 while the manifest is at 1
    state = sl.append(store, REPO, OWNER, OWNER.user_id, trust(), state, kind=sl.KIND_ADD,
                      reason=sl.REASON_REVOCATION, key_version=2, added=batch("v2"))
    assert [o.key_version for o in state.segments()].count(2) == 1
    assert state.set_digest(2) != state.set_digest(1)
    v1 = layout.new_id()
    state = sl.append(store, REPO, OWNER, OWNER.user_id, trust(), state,
                      kind=sl.KIND_REPLACE, reason=sl.REASON_MIGRATION, key_version=1,
                      added=batch("mig"), removed=[sl.Removed(sl.TYPE_V1_SEGMENT, v1)])
    assert v1 in state.v1_removed
    with pytest.raises(sl.LogError) as info:   # the same format-1 segment migrated twice
        sl.append(store, REPO, OWNER, OWNER.user_id, trust(), state,
                  kind=sl.KIND_REPLACE, reason=sl.REASON_MIGRATION, key_version=1,
                  added=batch("again"), removed=[sl.Removed(sl.TYPE_V1_SEGMENT, v1)])
    assert info.value.reason == "not live"
    assert sl.verify_log(store, REPO, trust()).live == state.live
    # an erasure rewrite may not grow, nor move objects to another key version
    seg = state.segments(1)[0]
    grown = [sl.Added(sl.TYPE_SEGMENT, layout.new_id(), b"\0" * 32, seg.count + 1)]
    moved = [sl.Added(sl.TYPE_SEGMENT, layout.new_id(), b"\0" * 32, seg.count - 1)]
    for added, kv, why in ((grown, 1, "counts"), (moved, 2, "key version")):
        with pytest.raises(sl.LogError) as info:
            sl.append(store, REPO, OWNER, OWNER.user_id, trust(key_version=2), state,
                      kind=sl.KIND_REPLACE, reason=sl.REASON_ERASURE, key_version=kv,
                      added=added, removed=[sl.Removed(seg.type, seg.id)])
        assert info.value.reason == why


def test_checkpoint_conflict_and_judging_below_the_checkpoint(
        logged: tuple[DirectoryStore, sl.LogState]) -> None:
    store, state = logged
    sl.write_checkpoint(store, REPO, OWNER, state, 1)
    other = state.copy()
    other.head = sl.LogHead(4, b"\x09" * 32, None)
    with pytest.raises(sl.LogError, match="other content"):
        sl.write_checkpoint(store, REPO, OWNER, other, 1)
    state = add(store, state, label="5")
    for n in range(4):
        store.delete(entry_key(n))
    verified = sl.verify_log(store, REPO, trust())
    assert verified.start == 4
    # a service still at entry 2 (below the checkpoint): its hash cannot be compared, and
    # the segments it may list are those live at the checkpoint and not added later
    at_cp = sorted(verified.live_at(4, 1))
    assert verified.live_at(2, 1) == set(at_cp)
    verdict = sl.judge_answer(verified, 1, 2, b"\0" * 32,
                              sl.set_digest(REPO, 1, at_cp), len(at_cp), at_cp)
    newest = [o.id for o in state.segments(1) if o.added_at == 5]
    assert verdict == sl.Verdict(False, 5, 4, newest)
    with pytest.raises(sl.AnswerError, match="twice"):
        sl.check_hits([[("a" * 32, 1.0)], [("b" * 32, 1.0), ("b" * 32, 0.5)]])
    sl.check_hits([[("a" * 32, 1.0)], [("a" * 32, 1.0)]])   # per query


def test_genesis_only_once(store: DirectoryStore) -> None:
    sl.write_genesis(store, REPO, OWNER, OWNER.user_id, 1, 1)
    with pytest.raises(sl.LogError, match="genesis"):
        sl.write_genesis(store, REPO, OWNER, OWNER.user_id, 1, 1)
    with pytest.raises(sl.LogError, match="no genesis"):
        sl.verify_log(store, "empty-repo", trust())


# --- vectors: replayed with the code -------------------------------------------------------------


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return doc


def vtrust(doc: dict[str, Any]) -> sl.StaticTrust:
    return sl.StaticTrust(doc["owner_id"], bytes.fromhex(doc["owner_key_hex"]),
                          doc["manifest_sequence"], doc["key_version"],
                          {k: bytes.fromhex(v) for k, v in doc["members"].items()})


def vhead(doc: dict[str, Any] | None) -> sl.LogHead | None:
    return None if doc is None else sl.LogHead(doc["sequence"], bytes.fromhex(doc["hash_hex"]),
                                               doc["checkpoint"])


def fill(root: Path, objects: dict[str, str]) -> DirectoryStore:
    s = DirectoryStore(root)
    s.ensure_bucket()
    for name, blob in objects.items():
        s.put(name, base64.b64decode(blob))
    return s


def test_vectors_log_entry_valid() -> None:
    for v in load("log_entry.json")["vectors"]:
        payload = bytes.fromhex(v["payload_hex"])
        entry = decode_payload(payload, v["object_name"])
        assert (entry.sequence, entry.kind, entry.reason, entry.writer, entry.time_ms) == (
            v["sequence"], v["kind"], v["reason"], v["writer"], v["time_ms"])
        assert encode_payload(entry) == payload
        record = base64.b64decode(v["record_b64"])
        assert signed.open_record(record, "log", v["object_name"],
                                  [bytes.fromhex(v["signer_public_hex"])]) == payload


@pytest.mark.parametrize("name", ["log_entry.json", "log_chain.json", "checkpoint.json"])
def test_vectors_broken_buckets(tmp_path: Path, name: str) -> None:
    cases = [b for b in load(name)["broken"] if "objects" in b]
    assert cases
    for i, case in enumerate(cases):
        store = fill(tmp_path / str(i), case["objects"])
        with pytest.raises(ERRORS[case["error"]]) as info:
            sl.verify_log(store, "radiology-demo", vtrust(case["trust"]),
                          vhead(case["remembered"]), from_genesis=case["from_genesis"])
        assert type(info.value).__name__ == case["error"], case["name"]
        if case["error"] == "LogError":
            assert info.value.reason == case["reason"], case["name"]  # type: ignore[attr-defined]


def test_vectors_checkpoint_documents() -> None:
    doc = load("checkpoint.json")
    v = doc["vectors"][0]
    owner_key = bytes.fromhex(v["owner_key_hex"])
    cp = sl.open_checkpoint(base64.b64decode(v["blob_b64"]), "radiology-demo", v["sequence"],
                            owner_key)
    assert cp.sequence == 5
    for case in (b for b in doc["broken"] if b.get("check") == "open_checkpoint"):
        with pytest.raises(ERRORS[case["error"]]) as info:
            sl.open_checkpoint(base64.b64decode(case["blob_b64"]), "radiology-demo",
                               case["sequence"], owner_key)
        assert type(info.value).__name__ == case["error"], case["name"]


def test_vectors_log_chain_heads(tmp_path: Path) -> None:
    doc = load("log_chain.json")
    cp = doc["checkpoint"]
    for v in doc["vectors"]:
        objects = {e["object_name"]: e["record_b64"] for e in doc["entries"][:v["head"] + 1]}
        if v["head"] >= 5:
            objects[cp["object_name"]] = cp["blob_b64"]
        state = sl.verify_log(fill(tmp_path / str(v["head"]), objects), "radiology-demo",
                              vtrust(doc["trust"]))
        assert state.head.sequence == v["head"] and state.head.hash.hex() == v["hash_hex"]
        assert state.head.checkpoint == v["checkpoint"]
        assert state.set_digest(1).hex() == v["set_digest_v1_hex"]
        assert state.images() == v["images"]
        assert [(o.id, o.added_at) for o in sorted(state.live.values(),
                                                   key=lambda o: (o.type, o.id))] == [
            (o["id"], o["added_at"]) for o in v["live"]]


def test_vectors_completeness(tmp_path: Path) -> None:
    doc = load("completeness.json")
    objects = doc["log"]["objects"]
    for i, case in enumerate(doc["vectors"]):
        h = case["client_head"]
        subset = {k: b for k, b in objects.items()
                  if ("/log/" in k and layout.parse_log_entry_key(k)[1] <= h)
                  or ("/checkpoints/" in k and h >= layout.parse_checkpoint_key(k)[1])}
        state = sl.verify_log(fill(tmp_path / str(i), subset), "radiology-demo",
                              vtrust(doc["log"]["trust"]))
        a = case["answer"]

        def judge(a: dict[str, Any] = a, state: sl.LogState = state) -> sl.Verdict | None:
            if "hits" in a:
                sl.check_hits([[(x, s) for x, s in row] for row in a["hits"]])
            return sl.judge_answer(state, a["key_version"], a["head_sequence"],
                                   bytes.fromhex(a["head_hash_hex"]),
                                   bytes.fromhex(a["set_digest_hex"]), a["searched"],
                                   a["listed"])
        if "error" in case:
            with pytest.raises(ERRORS[case["error"]]) as info:
                judge()
            assert type(info.value).__name__ == case["error"], case["name"]
            if "reason" in case:
                assert getattr(info.value, "reason", None) == case["reason"]
        elif case.get("needs_list"):
            assert judge() is None, case["name"]
        else:
            assert judge() == sl.Verdict(**case["verdict"]), case["name"]


# --- vectors: an independent reader (hashlib and struct only, from FORMAT-2.md's text) -----------


def _spec_decode(payload: bytes) -> dict[str, Any]:
    """Draft 5.2, read field by field."""
    assert payload[:4] == b"RCLE" and payload[4] == 1 and payload[7] == 0
    seq, = struct.unpack(">Q", payload[8:16])
    ms, kv, t = struct.unpack(">QIQ", payload[48:68])
    wlen = payload[68]
    assert 1 <= wlen <= 63 and not any(payload[69 + wlen:132])
    a, = struct.unpack(">I", payload[132:136])
    added, off = [], 136
    for _ in range(a):
        typ, pad, raw, digest, count = struct.unpack(">B3s16s32sI", payload[off:off + 56])
        assert pad == b"\0\0\0"
        added.append({"type": typ, "id": raw.hex(), "sha256_hex": digest.hex(), "count": count})
        off += 56
    r, = struct.unpack(">I", payload[off:off + 4])
    off += 4
    removed = []
    for _ in range(r):
        typ, pad, raw = struct.unpack(">B3s16s", payload[off:off + 20])
        assert pad == b"\0\0\0"
        removed.append({"type": typ, "id": raw.hex()})
        off += 20
    assert off == len(payload)
    for items in (added, removed):
        keys = [(x["type"], bytes.fromhex(x["id"])) for x in items]
        assert keys == sorted(set(keys))
    return {"sequence": seq, "kind": payload[5], "reason": payload[6],
            "prev_hex": payload[16:48].hex(), "manifest_sequence": ms, "key_version": kv,
            "time_ms": t, "writer": payload[69:69 + wlen].decode("ascii"), "added": added,
            "removed": removed}


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def test_independent_entry_layout() -> None:
    for doc_name in ("log_entry.json", "log_chain.json"):
        doc = load(doc_name)
        entries = doc["vectors"] if doc_name == "log_entry.json" else doc["entries"]
        for v in entries:
            payload = bytes.fromhex(v["payload_hex"])
            fields = _spec_decode(payload)
            for key, value in fields.items():
                assert v[key] == value, (v["object_name"], key)
            assert v["object_name"].endswith(f"/log/{fields['sequence']:020d}")
            record = base64.b64decode(v["record_b64"])
            assert record[:5] == b"RCSR\x01" and record[101:] == payload
            assert record[5:37].hex() == v["signer_public_hex"]
            assert hashlib.sha256(record).hexdigest() == v["sha256_hex"]
    chain = load("log_chain.json")["entries"]
    assert chain[0]["prev_hex"] == "00" * 32
    for before, after in itertools.pairwise(chain):
        assert after["prev_hex"] == before["sha256_hex"]


def test_independent_set_digest() -> None:
    for v in load("segment_set.json")["vectors"]:
        ids = sorted(bytes.fromhex(i) for i in v["seg_ids"])
        message = (_lp(b"radcrypt/segment-set/v2") + _lp(v["repo_id"].encode())
                   + struct.pack(">IQ", v["key_version"], len(ids)) + b"".join(ids))
        assert message.hex() == v["message_hex"]
        assert hashlib.sha256(message).hexdigest() == v["digest_hex"]
    for v in load("log_chain.json")["vectors"]:
        ids = sorted(bytes.fromhex(o["id"]) for o in v["live"] if o["type"] == "segment")
        message = (_lp(b"radcrypt/segment-set/v2") + _lp(b"radiology-demo")
                   + struct.pack(">IQ", 1, len(ids)) + b"".join(ids))
        assert hashlib.sha256(message).hexdigest() == v["set_digest_v1_hex"]


def test_independent_checkpoint_document() -> None:
    v = load("checkpoint.json")["vectors"][0]
    doc = json.loads(base64.b64decode(v["blob_b64"]))
    payload = doc["payload"]
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert canonical == v["canonical_payload_utf8"]
    chain = load("log_chain.json")
    assert payload["head"] == chain["entries"][5]["sha256_hex"]
    assert payload["sequence"] == 5 and v["object_name"].endswith("/checkpoints/" + "0" * 19 + "5")
    order = [({"segment": 1, "pack": 2}[o["type"]], o["id"]) for o in payload["live"]]
    assert order == sorted(order)
    assert payload["set_digests"]["1"] == chain["vectors"][5]["set_digest_v1_hex"]
