"""CKKS mode (issue 19): what the service keeps loaded, and when a key version's evaluation
keys may go.

The service (cloud/ckks_store.CkksScorers) must read only the segments it does not hold
when the live set grows, drop those that leave it, and read a segment again when the log
names another SHA-256 for it (never score a stale block); every answer is checked by
decrypting the scores and comparing them with the plaintext features. Store reads are
counted by a wrapper around the real store. gc (app/core/gc.py) must delete
``ckks/<v>`` once no live segment of version v is left, and never while one is: a
revocation is stopped after its commit (the old segments still live), then finished.

One module-scoped repository of real sample DICOM files (TenSEAL key generation is slow);
the tests run in file order (the last one revokes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

try:
    import owned_repos
    from workstation import ModeArchive, mode_archive, sample_files
except ImportError:  # pragma: no cover
    from tests import owned_repos
    from tests.workstation import ModeArchive, mode_archive, sample_files

from app.core import ckks_blocks
from app.core.logstate import verified_log
from cloud import ckks_store, layout, seglog
from cloud.backend import StoreError
from cloud.directory_store import DirectoryStore
from cloud.segments import decode_segment, encode_segment_v2
from crypto import ckks
from crypto.segment_mac import index_mac_key

BATCH = 2


Archive = ModeArchive


class CountingStore:
    """The real store, counting whole-object reads per kind of object."""

    def __init__(self, inner: DirectoryStore) -> None:
        self.inner = inner
        self.reads: Counter[str] = Counter()

    def get(self, key: str) -> bytes:
        self.reads["segment" if "/segments/" in key else
                   "eval" if "/ckks/" in key else "other"] += 1
        return self.inner.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def take(self) -> Counter[str]:
        out, self.reads = self.reads, Counter()
        return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    with mode_archive(tmp_path_factory.mktemp("ckks-keys"), "hk", "Dr. Keys", 2 * BATCH,
                      BATCH) as made:
        yield made
    ckks_blocks.forget()


def _features(archive: Archive) -> dict[str, np.ndarray]:
    return {m.image_id: np.asarray(m.features, dtype=np.float64)
            for m in archive.client.list_images(archive.repo)}


def _ask(archive: Archive, scorers: ckks_store.CkksScorers, state: Any, seg_ids: list[str],
         query: np.ndarray) -> tuple[ckks_store.CkksAnswer, np.ndarray]:
    repo, version = archive.repo, archive.repo.keys.version
    key = ckks_blocks.key_of(repo, version)
    request = ckks_store.CkksRequest(version, 0,
                                     ckks_blocks.eval_digest(archive.store, repo, version),
                                     key.encrypt_query(query, ckks.period_of(repo.manifest.dim)))
    answer = scorers.answer(repo.repo_id, state, seg_ids, state.head.sequence,
                            state.head.hash, request)
    return answer, key.decrypt_scores(answer.scores, answer.counts)


def _assert_exact(answer: ckks_store.CkksAnswer, scores: np.ndarray,
                  features: dict[str, np.ndarray], query: np.ndarray) -> None:
    ids = [i for seg in answer.image_ids for i in seg]
    x = np.stack([features[i] for i in ids])
    exact = x @ query - 0.5 * np.einsum("ij,ij->i", x, x)
    assert np.abs(scores - exact).max() < ckks.ERROR_BOUND
    # the best by the decrypted scores is a best by the features (sample files repeat)
    assert exact[int(np.argmax(scores))] >= exact.max() - 2 * ckks.ERROR_BOUND


def test_a_new_segment_costs_one_read_and_the_answer_stays_exact(archive: Archive) -> None:
    counting = CountingStore(archive.store)
    with ckks_store.CkksScorers(counting, workers=1) as scorers:  # type: ignore[arg-type]
        state = verified_log(archive.store, archive.client.settings, archive.repo)
        first = [o.id for o in state.segments(1)]
        assert len(first) == 2
        features = _features(archive)
        query = next(iter(features.values())) + 0.01
        answer, scores = _ask(archive, scorers, state, first, query)
        assert counting.take() == Counter(segment=2, eval=1)
        _assert_exact(answer, scores, features, query)
        report = archive.client.import_files(archive.repo, sample_files(BATCH, skip=2 * BATCH),
                                             batch_size=BATCH)
        assert report.imported and not report.failed
        state = verified_log(archive.store, archive.client.settings, archive.repo)
        every = [o.id for o in state.segments(1)]
        (new,) = set(every) - set(first)
        features = _features(archive)
        answer, scores = _ask(archive, scorers, state, every, query)
        assert counting.take() == Counter(segment=1)  # only the new one; keys kept
        assert answer.segment_ids == sorted(every) and len(scores) == 3 * BATCH
        _assert_exact(answer, scores, features, query)
        # the same set again: nothing read
        _ask(archive, scorers, state, every, query)
        assert counting.take() == Counter()
        # a segment leaves the set: nothing read, its block dropped from the scorer
        fewer = [s for s in every if s != first[0]]
        answer, scores = _ask(archive, scorers, state, fewer, query)
        assert counting.take() == Counter() and answer.segment_ids == sorted(fewer)
        assert scorers._versions[(archive.repo.repo_id, 1)].scorer.block_count == 2
        _assert_exact(answer, scores, features, query)
        # and comes back: read again (it was dropped, not kept)
        _ask(archive, scorers, state, every, query)
        assert counting.take() == Counter(segment=1)
        assert new in answer.segment_ids


def test_a_segment_whose_digest_changed_is_read_again(archive: Archive) -> None:
    """The log names another SHA-256 for a held segment (its object was replaced by one
    whose rows hold other features): the service reads it again and scores the new block;
    back to the first digest, the first block again. Never the held, stale one."""
    repo, store = archive.repo, archive.store
    counting = CountingStore(store)
    state = verified_log(store, archive.client.settings, repo)
    live = state.segments(1)[0]
    name = layout.segment_key(repo.repo_id, live.id)
    original = store.get(name)
    segment = decode_segment(original, live.id)
    features = _features(archive)
    rows = segment.id_strings()
    halved = np.stack([features[i] for i in rows]) * 0.5
    block = ckks_blocks.key_of(repo, 1).encrypt_block(halved).data
    mac_key = index_mac_key(repo.ring.version(1).data_key)
    replaced = encode_segment_v2(rows, segment.vectors, 1, seg_id=live.id,
                                 writer=segment.writer, base_sequence=segment.base_sequence,
                                 repo_id=repo.repo_id, mac_key=mac_key,
                                 dictionary=segment.dictionary, ckks=block)
    other = state.copy()
    other.live[(seglog.TYPE_SEGMENT, live.id)] = replace(
        live, sha256=decode_segment(replaced, live.id).sha256)
    assert other.live[(seglog.TYPE_SEGMENT, live.id)].sha256 != live.sha256
    seg_ids = [o.id for o in state.segments(1)]
    query = features[rows[0]]
    try:
        with ckks_store.CkksScorers(counting, workers=1) as scorers:  # type: ignore[arg-type]
            _ask(archive, scorers, state, seg_ids, query)
            counting.take()
            store.put(name, replaced)
            answer, scores = _ask(archive, scorers, other, seg_ids, query)
            assert counting.take() == Counter(segment=1)
            changed = dict(features) | {i: features[i] * 0.5 for i in rows}
            _assert_exact(answer, scores, changed, query)
            # the service holds the new block now; the first digest again: read again
            store.put(name, original)
            answer, scores = _ask(archive, scorers, state, seg_ids, query)
            assert counting.take() == Counter(segment=1)
            _assert_exact(answer, scores, features, query)
    finally:
        store.put(name, original)


def test_gc_deletes_evaluation_keys_only_when_no_segment_of_the_version_is_left(
        archive: Archive) -> None:
    from app.core.settings import Settings

    client, store = archive.client, archive.store
    keys_1 = ckks_store.eval_keys_key(archive.repo.repo_id, 1)
    keys_2 = ckks_store.eval_keys_key(archive.repo.repo_id, 2)
    bob_settings = Settings(store="directory", data_dir=str(archive.root / "bob"), workers=1)
    bob = owned_repos.identity_on_disk(bob_settings.data_path, "Bob")
    client.register_user(bob.card().to_json())
    client.grant(archive.repo, bob.user_id)
    old = client.repository("hk")
    # the revocation stops after its commit point (at the revoked user's grant delete):
    # version 2 is current, every version-1 segment still live
    session_store = client.session.store
    real_delete = session_store.delete

    def dies(key: str) -> None:
        raise StoreError(f"injected crash deleting {key}")

    session_store.delete = dies
    try:
        with pytest.raises(StoreError, match="injected crash"):
            client.revoke(old, bob.user_id)
    finally:
        del session_store.delete
    assert session_store.delete == real_delete
    repo = client.open_repository("hk")
    state = verified_log(store, client.settings, repo)
    assert repo.keys.version == 2 and state.segments(1) and state.segments(2)
    report = client.gc(repo, grace_seconds=0)
    assert store.exists(keys_1) and store.exists(keys_2)
    assert "ckks/1" not in [s.id for s in report.removed]
    # finished: no segment of version 1 left; within the grace period it is kept ...
    repo = client.revoke(old, bob.user_id)
    state = verified_log(store, client.settings, repo)
    assert not state.segments(1) and state.segments(2)
    report = client.gc(repo)  # its check is clean, or gc refuses
    assert [(s.type, s.id, s.state) for s in report.kept] == [
        ("evaluation keys", "ckks/1", "unused")] and store.exists(keys_1)
    # ... and deleted after it (0 here); the current version's keys stay
    report = client.gc(repo, grace_seconds=0)
    assert [s.id for s in report.removed] == ["ckks/1"]
    assert not store.exists(keys_1) and store.exists(keys_2)
    assert client.check_repository(repo).ok
    archive.repo = repo
    with ckks_store.CkksScorers(store, workers=1) as scorers:
        features = _features(archive)
        query = next(iter(features.values()))
        answer, scores = _ask(archive, scorers, state, [o.id for o in state.segments(2)],
                              query)
        _assert_exact(answer, scores, features, query)


def test_worker_processes_take_and_drop_blocks_without_a_restart() -> None:
    """The scorer's worker processes (two, as on a server with more blocks than cores)
    load a joining block and drop a leaving one in place: the same processes before and
    after, and the scores of exactly the asked blocks, in the asked order; a grown scorer
    puts the next block on its new, empty worker."""
    from cloud.ckks_engine import BLOCKS_PER_WORKER, CkksScorer

    rng = np.random.default_rng(1931)
    data = rng.random(((2 * BLOCKS_PER_WORKER + 2) * 16, 8))
    key = ckks.CkksKey(ckks.seed_from_data_key(b"\x07" * 32, "hk", 1))
    blocks = [key.encrypt_block(data[i : i + 16]).data for i in range(0, len(data), 16)]
    query = data[5]
    exact = data @ query - 0.5 * np.einsum("ij,ij->i", data, data)
    tags = [f"b{i}" for i in range(len(blocks))]
    first = 2 * BLOCKS_PER_WORKER
    with CkksScorer(key.evaluation_keys(8), blocks[:first], workers=2,
                    tags=tags[:first]) as scorer:
        assert scorer.workers == 2
        got = key.decrypt_scores(scorer.scores(key.encrypt_query(query, 8)), [16] * first)
        assert np.abs(got - exact[: 16 * first]).max() < 1e-3
        pids = [set(pool._processes) for pool in scorer._pools]  # started on first use
        assert all(len(p) == 1 for p in pids)
        scorer.add([(tags[first], blocks[first])])
        scorer.remove([tags[0]])
        order = tags[1 : first + 1][::-1]
        got = key.decrypt_scores(scorer.scores(key.encrypt_query(query, 8), order),
                                 [16] * len(order))
        rows = np.concatenate([np.arange(16 * int(t[1:]), 16 * int(t[1:]) + 16)
                               for t in order])
        assert np.abs(got - exact[rows]).max() < 1e-3
        assert [set(pool._processes) for pool in scorer._pools] == pids
        with pytest.raises(KeyError, match="holds no block 'b0'"):
            scorer.scores(key.encrypt_query(query, 8), [tags[0]])
        scorer.grow(3)
        scorer.add([(tags[first + 1], blocks[first + 1])])
        assert scorer._where[tags[first + 1]] == 2  # the new worker held nothing
        got = key.decrypt_scores(scorer.scores(key.encrypt_query(query, 8)),
                                 [16] * scorer.block_count)
        rows = np.concatenate([np.arange(16 * int(t[1:]), 16 * int(t[1:]) + 16)
                               for t in scorer.tags])
        assert np.abs(got - exact[rows]).max() < 1e-3
