"""Lock objects (app/core/locks.py): restic's model, so that gc never deletes what a live
import may still commit.

Each test works on a real format-2 repository (no images: locks do not need them) in a
directory store. Locks are taken by the code under test; the stale and forged locks a
crashed or hostile process would leave are written as such a process would (a signed
document naming a dead pid, an old time, a non-member's key, or bytes that do not parse).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests.fixtures import format2_support as fx

from app.core import locks, logstate
from app.core.locks import LockConflict
from app.core.repository import Repository
from cloud import layout
from cloud.directory_store import DirectoryStore
from crypto import signed
from crypto.identity import Identity


@pytest.fixture
def world(tmp_path: Path) -> tuple[DirectoryStore, fx.Workstation, fx.Workstation, object]:
    store = DirectoryStore(tmp_path / "bucket")
    store.ensure_bucket()
    owner, (member,), repo = fx.repository(store, "locked", 0, 1, 2, members=1)
    return store, owner, member, repo


def _write_lock(store: DirectoryStore, repo: Repository, identity: Identity, *, host: str,
                pid: int, when: float, exclusive: bool = False) -> str:
    """A lock object as another process writes it (signed by ``identity``, sealed under
    the repository's key)."""
    lock_id = layout.new_id()
    key = locks.lock_key(repo.repo_id, lock_id)
    doc = signed.sign_json(identity, "lock", key,
                           {"user_id": identity.user_id, "host": host, "pid": pid,
                            "time": when, "exclusive": exclusive})
    store.put(key, locks._seal(repo, lock_id, doc))
    return lock_id


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_shared_locks_coexist_and_exclusive_excludes(world: tuple) -> None:
    store, owner, member, repo = world
    with locks.shared(store, repo, owner.identity), locks.shared(store, repo, member.identity):
        assert len(locks.list_locks(store, repo)) == 2
        with pytest.raises(LockConflict) as refused:
            locks.exclusive(store, repo, owner.identity).acquire()
        text = str(refused.value)
        assert "is locked" in text and member.user_id in text and str(os.getpid()) in text
        assert len(refused.value.locks) == 2
        assert len(locks.list_locks(store, repo)) == 2  # the refused lock was withdrawn
    assert locks.list_locks(store, repo) == []  # released locks are deleted
    with locks.exclusive(store, repo, owner.identity):
        with pytest.raises(LockConflict, match="exclusive lock"):
            locks.shared(store, repo, member.identity).acquire()
    assert list(store.list_keys(locks.locks_prefix(repo.repo_id))) == []


def test_a_lock_names_its_owner_and_is_signed(world: tuple) -> None:
    store, _owner, member, repo = world
    trust = logstate.repository_trust(store, repo)
    with locks.shared(store, repo, member.identity):
        (info,) = locks.list_locks(store, repo, trust)
    assert (info.user_id, info.host, info.pid, info.exclusive) == (
        member.user_id, locks.this_host(), os.getpid(), False)
    assert info.authentic is True and not info.stale and abs(info.time - time.time()) < 60
    data = info.as_dict()
    assert set(data) >= {"lock_id", "user_id", "host", "pid", "time", "exclusive", "stale"}


def test_a_lock_of_a_dead_process_on_this_host_is_stale_and_ignored(world: tuple) -> None:
    store, owner, member, repo = world
    dead = _dead_pid()
    stale_id = _write_lock(store, repo, member.identity, host=locks.this_host(), pid=dead,
                           when=time.time())
    (info,) = locks.list_locks(store, repo)
    assert info.stale and f"process {dead} no longer exists" in info.stale_reason
    assert "STALE" in info.line()
    assert [i.lock_id for i in locks.remove_locks(store, repo)] == [stale_id]
    again = _write_lock(store, repo, member.identity, host=locks.this_host(), pid=dead,
                        when=time.time())
    with locks.exclusive(store, repo, owner.identity) as held:  # a stale lock blocks nothing
        assert [i.lock_id for i in held.stale_seen] == [again]
        # and taking a lock removed it: its process is certainly gone
        assert [i.lock_id for i in locks.list_locks(store, repo)] == [held.lock_id]
    assert locks.list_locks(store, repo) == []


def test_an_old_lock_is_stale_and_a_recent_one_of_another_host_is_not(world: tuple) -> None:
    store, owner, member, repo = world
    now = time.time()
    old = _write_lock(store, repo, member.identity, host="ward-pc-7", pid=1234,
                      when=now - locks.STALE_SECONDS - 60)
    fresh = _write_lock(store, repo, member.identity, host="ward-pc-7", pid=_dead_pid(),
                        when=now - 60)  # another host: its pid says nothing here
    by_id = {i.lock_id: i for i in locks.list_locks(store, repo, now=now)}
    assert by_id[old].stale and "not refreshed for" in by_id[old].stale_reason
    assert not by_id[fresh].stale
    with pytest.raises(LockConflict, match="ward-pc-7"):
        locks.exclusive(store, repo, owner.identity).acquire()
    assert [i.lock_id for i in locks.remove_locks(store, repo, now=now)] == [old]
    assert [i.lock_id for i in locks.remove_locks(store, repo, remove_all=True)] == [fresh]


def test_a_held_lock_is_refreshed(world: tuple) -> None:
    store, owner, _, repo = world
    held = locks.shared(store, repo, owner.identity, refresh_seconds=0.2).acquire()
    try:
        (first,) = locks.list_locks(store, repo)
        deadline = time.time() + 20
        while held.refreshes < 2 and time.time() < deadline:
            time.sleep(0.05)
        (later,) = locks.list_locks(store, repo)
        assert held.refreshes >= 2 and later.time > first.time
        assert later.lock_id == first.lock_id
    finally:
        held.release()
    assert locks.list_locks(store, repo) == []


def test_forged_and_unreadable_locks_are_named_and_still_block_until_stale(world: tuple
                                                                            ) -> None:
    store, owner, _, repo = world
    trust = logstate.repository_trust(store, repo)
    stranger = Identity.generate("Mallory")
    forged = _write_lock(store, repo, stranger, host="elsewhere", pid=1, when=time.time())
    junk_id = layout.new_id()
    store.put(locks.lock_key(repo.repo_id, junk_id), b"\x00not a lock")
    store.put(locks.locks_prefix(repo.repo_id) + "README", b"a foreign name is ignored")
    other = layout.new_id()  # a lock sealed for another repository, copied here
    key = locks.lock_key(repo.repo_id, other)
    store.put(key, store.get(locks.lock_key(repo.repo_id, forged)))
    by_id = {i.lock_id: i for i in locks.list_locks(store, repo, trust)}
    assert set(by_id) == {forged, junk_id, other}
    assert by_id[other].exclusive and "does not parse: DecryptionError" in by_id[other].detail
    assert by_id[forged].authentic is False and "not a member" in by_id[forged].detail
    assert by_id[junk_id].exclusive and "does not parse" in by_id[junk_id].detail
    raw = store.get(locks.lock_key(repo.repo_id, forged))
    assert b"elsewhere" not in raw and stranger.user_id.encode() not in raw  # sealed
    with pytest.raises(LockConflict):
        locks.shared(store, repo, owner.identity).acquire()  # the unreadable one: exclusive
    removed = locks.remove_locks(store, repo, remove_all=True)
    assert {i.lock_id for i in removed} == {forged, junk_id, other}
