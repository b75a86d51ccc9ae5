"""The engine on any number of threads (cloud/search.py with cloud/cpus.py): the same
exact answers and the same score bits on 1, 2, 3 or 7 threads, single and batched; every
row in exactly one thread's share; float64 rescoring that does not depend on which rows
share the call (cloud/rescore.py, the cause of a flaky service test)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from bench import datasets
from cloud import cpus, rescore
from cloud import search as engine
from cloud.numerics import FLOAT64_UNIT
from cloud.search import EncryptedIndex, linear_scan, search, search_batch
from crypto.index import IndexKey


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    yield
    cpus.set_threads(None)


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray, IndexKey, EncryptedIndex]:
    rng = np.random.default_rng(2026)
    data = datasets.low_rank_varying(rng, 4000, 32)
    queries = np.vstack([datasets.perturbed_queries(rng, data, 12, noise=0.1),  # near
                         datasets.low_rank_varying(rng, 6, 32),  # fresh
                         datasets.gaussian(rng, 6, 32) * 3.0])  # far from everything
    key = IndexKey.generate(32, sample=data[:400])
    return data, queries, key, EncryptedIndex(key.encrypt(data))


def _small_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage threaded, with shares small enough for 4000 rows to need many."""
    monkeypatch.setattr(engine, "OWN_THREADS_ROWS", 0)
    monkeypatch.setattr(engine, "SCAN_ROWS_STEP", 64)
    monkeypatch.setattr(engine, "BLOCKED_BATCH_ROWS", 0)
    monkeypatch.setattr(engine, "BATCH_CHUNK", 256)
    monkeypatch.setattr(engine, "BATCH_BLOCK", 64)
    monkeypatch.setattr(engine, "THREADED_RESCORE_ROWS", 100)


@pytest.mark.parametrize("k", [1, 9])
def test_any_thread_count_gives_the_same_exact_answers_and_score_bits(
        monkeypatch: pytest.MonkeyPatch, case: tuple[np.ndarray, np.ndarray, IndexKey,
                                                     EncryptedIndex], k: int) -> None:
    data, queries, key, index = case
    _small_shares(monkeypatch)
    token = key.query(queries)
    _, truth = datasets.plaintext_topk(data, queries, k)
    seen: dict[int, list[tuple[list[int], list[float]]]] = {}
    for threads in (1, 2, 3, 7):
        cpus.set_threads(threads)
        batched = search_batch(index, token, k)
        singles = [search(index, token.select(i), k) for i in range(len(queries))]
        answers = []
        for qi in range(len(queries)):
            for result in (batched[qi], singles[qi]):
                assert datasets.agrees(result.positions, data, queries[qi], truth[qi]), \
                    (threads, qi)
            # a batch and a single query name the same rows with the same score bits
            assert batched[qi].positions.tolist() == singles[qi].positions.tolist()
            assert batched[qi].scores.tolist() == singles[qi].scores.tolist(), (threads, qi)
            answers.append((singles[qi].positions.tolist(), singles[qi].scores.tolist()))
        seen[threads] = answers
        assert sum(r.stats.full_scored == len(data) for r in singles) >= 3  # codes scans ran
    assert seen[1] == seen[2] == seen[3] == seen[7]


def test_linear_scan_on_threads_matches_float64(monkeypatch: pytest.MonkeyPatch,
                                                case: tuple[np.ndarray, np.ndarray,
                                                            IndexKey, EncryptedIndex]) -> None:
    _, queries, key, index = case
    _small_shares(monkeypatch)
    token = key.query(queries[:1])
    cpus.set_threads(3)
    threaded = linear_scan(index, token, 5)
    cpus.set_threads(1)
    alone = linear_scan(index, token, 5)
    assert threaded.positions.tolist() == alone.positions.tolist()
    assert threaded.scores.tolist() == alone.scores.tolist()


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 16, 64])
def test_every_row_is_in_exactly_one_share(parts: int) -> None:
    for n in (1, 63, 64, 65, 1000, 32768 * 3 + 5):
        for step in (1, 64, 32768):
            spans = engine._split_rows(n, step, parts)
            assert len(spans) <= parts
            covered = np.concatenate([np.arange(b, e) for b, e in spans])
            assert covered.tolist() == list(range(n)), (n, step, parts)
            assert all(b % step == 0 for b, _ in spans)


def test_the_pool_has_the_configured_threads_and_nested_work_runs_inline() -> None:
    """Spans run in engine_threads() threads, the caller's one of them; a span that
    itself asks for threaded work gets it inline (a worker waiting on its own pool
    could hang)."""
    cpus.set_threads(3)
    names: set[str] = set()
    lock = threading.Lock()
    barrier = threading.Barrier(3, timeout=20)

    def span(bounds: tuple[int, int]) -> int:
        with lock:
            names.add(threading.current_thread().name)
        if bounds[0] < 3:
            barrier.wait()  # three spans at once: three threads
        inner = engine._threaded(lambda b: b[1] - b[0], [(0, 2), (2, 5)])
        return sum(inner)

    results = engine._threaded(span, [(i, i + 1) for i in range(9)])
    assert results == [5] * 9
    assert len(names) == 3
    assert threading.current_thread().name in names
    assert sum(n.startswith("radcrypt-search") for n in names) == 2


def test_rescored_rows_do_not_depend_on_their_companions() -> None:
    """The BLAS product's bits depended on the rows sharing the call (up to 1e-12 of the
    score, measured); the fixed-order kernel's do not, and stay within float64's bound."""
    rng = np.random.default_rng(5)
    for width in (1, 7, 8, 146, 274):
        matrix = rng.standard_normal((3000, width)) * rng.uniform(0.1, 100, (3000, 1))
        token = rng.standard_normal(width)
        every = rescore.row_scores(matrix, np.arange(3000), token)
        bound = 2 * width * FLOAT64_UNIT * np.linalg.norm(matrix, axis=1) * np.linalg.norm(token)
        assert np.all(np.abs(every - matrix @ token) <= bound), width
        for size in (1, 2, 3, 5, 17, 300):
            rows = rng.choice(3000, size=size, replace=False)
            assert rescore.row_scores(matrix, rows, token).tolist() == every[rows].tolist()
            assert rescore.row_scores(matrix, rows[::-1], token).tolist() == \
                every[rows[::-1]].tolist()
    assert rescore.row_scores(np.ones((2, 3)), np.empty(0, dtype=np.int64), np.ones(3)).size == 0
