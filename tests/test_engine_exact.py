"""The encrypted engine returns exactly what plaintext brute force returns.

Equal means the same positions, or a tie: the distances of what we returned equal the
plaintext top-k distances rank by rank within 1e-9 relative (bench.datasets.agrees).
"""

from __future__ import annotations

import numpy as np
import pytest

from bench import datasets
from cloud import search as search_module
from cloud.search import EncryptedIndex, linear_scan, search, search_batch
from crypto.index import IndexKey

N_VECTORS = 2000
N_QUERIES = 300


def _check_exact(data: np.ndarray, queries: np.ndarray, key: IndexKey, k: int) -> list[float]:
    index = EncryptedIndex(key.encrypt(data))
    token = key.query(queries)
    truth_idx, truth_dist = datasets.plaintext_topk(data, queries, k)
    fractions = []
    for qi, result in enumerate(search_batch(index, token, k)):
        assert result.positions.shape == (k,)
        assert datasets.agrees(result.positions, data, queries[qi], truth_dist[qi]), (
            f"query {qi}: got {result.positions}, expected {truth_idx[qi]}"
        )
        fractions.append(result.stats.fraction_fully_scored)
    return fractions


@pytest.mark.parametrize("d", [16, 128, 512])
@pytest.mark.parametrize("kind", ["gaussian", "clustered"])
@pytest.mark.parametrize("k", [1, 10])
def test_topk_equals_plaintext(d: int, kind: str, k: int) -> None:
    rng = np.random.default_rng(d * 10 + k)
    make = datasets.gaussian if kind == "gaussian" else datasets.clustered
    data = make(rng, N_VECTORS, d)
    queries = datasets.perturbed_queries(rng, data, N_QUERIES, noise=0.3)
    key = IndexKey.generate(d, sample=data[:500])
    _check_exact(data, queries, key, k)


def test_queries_far_from_data_and_exact_duplicates() -> None:
    """Queries that equal stored vectors, and queries far outside the data cloud."""
    rng = np.random.default_rng(7)
    data = datasets.low_rank_varying(rng, N_VECTORS, 64)
    data[100] = data[101]  # an exact duplicate pair: a tie by construction
    queries = np.vstack([data[:50], 40.0 * rng.standard_normal((50, 64))])
    key = IndexKey.generate(64, sample=data)
    _check_exact(data, queries, key, 1)
    _check_exact(data, queries, key, 10)


def test_pruning_happens_on_structured_data() -> None:
    """On vectors whose offset and spread vary, the cascade must skip most full scores."""
    rng = np.random.default_rng(3)
    data = datasets.low_rank_varying(rng, 20000, 128)
    queries = datasets.perturbed_queries(rng, data, 50, noise=0.1)
    key = IndexKey.generate(128, sample=data[:2000])
    fractions = _check_exact(data, queries, key, 1)
    assert np.mean(fractions) < 0.05, f"mean fraction fully scored {np.mean(fractions):.3f}"


def test_exact_whatever_the_basis() -> None:
    """A basis fitted to unrelated data prunes less but must stay exact."""
    rng = np.random.default_rng(11)
    data = datasets.clustered(rng, N_VECTORS, 32)
    unrelated = rng.standard_normal((300, 32)) * np.arange(1, 33)
    key = IndexKey.generate(32, sample=unrelated)
    _check_exact(data, datasets.perturbed_queries(rng, data, 100, 0.5), key, 5)


def test_linear_scan_matches_filter_and_refine() -> None:
    rng = np.random.default_rng(5)
    data = datasets.clustered(rng, 3000, 128)
    key = IndexKey.generate(128, sample=data[:300])
    index = EncryptedIndex(key.encrypt(data))
    token = key.query(datasets.perturbed_queries(rng, data, 20, 0.2))
    for qi in range(20):
        one = token.select(qi)
        a, b = search(index, one, 3), linear_scan(index, one, 3)
        assert list(a.positions) == list(b.positions)
        assert b.stats.full_scored == 3000
        assert a.stats.full_scored <= 3000


def test_k_larger_than_n_and_concatenated_segments() -> None:
    rng = np.random.default_rng(9)
    data = datasets.gaussian(rng, 30, 16)
    key = IndexKey.generate(16)
    parts = [key.encrypt(data[:10]), key.encrypt(data[10:])]
    index = EncryptedIndex.concat(parts)
    result = search(index, key.query(data[3] + 0.01), k=50)
    assert sorted(result.positions.tolist()) == list(range(30))
    assert result.positions[0] == 3


def test_rejects_mismatched_token_and_bad_k() -> None:
    rng = np.random.default_rng(1)
    key_a, key_b = IndexKey.generate(16), IndexKey.generate(32)
    index = EncryptedIndex(key_a.encrypt(rng.standard_normal((10, 16))))
    with pytest.raises(ValueError, match="widths"):
        search(index, key_b.query(rng.standard_normal(32)), 1)
    with pytest.raises(ValueError, match="k must be"):
        search(index, key_a.query(rng.standard_normal(16)), 0)


@pytest.mark.parametrize("k", [1, 10])
@pytest.mark.parametrize("blocked_from", [0, 10**9])
@pytest.mark.parametrize("own_threads_from", [10**9, 0])
def test_unprunable_queries_fall_back_to_an_exact_scan_of_the_codes(
    monkeypatch: pytest.MonkeyPatch, k: int, blocked_from: int, own_threads_from: int
) -> None:
    """Fresh queries on i.i.d. Gaussian data defeat every bound: the engine must then scan
    the full vectors' codes and refine in float64, single and batched (with block
    maxima or full first-level scores), in one thread or two, exactly."""
    monkeypatch.setattr(search_module, "BLOCKED_BATCH_ROWS", blocked_from)
    monkeypatch.setattr(search_module, "OWN_THREADS_ROWS", own_threads_from)
    monkeypatch.setattr(search_module, "SCAN_ROWS_STEP", 64)
    rng = np.random.default_rng(21)
    data = datasets.gaussian(rng, 3000, 128)
    queries = datasets.gaussian(rng, 40, 128)
    key = IndexKey.generate(128, sample=data[:500])
    index = EncryptedIndex(key.encrypt(data))
    token = key.query(queries)
    _, truth = datasets.plaintext_topk(data, queries, k)
    batched = search_batch(index, token, k)
    singles = [search(index, token.select(i), k) for i in range(40)]
    assert sum(r.stats.full_scored == 3000 for r in singles) >= 30  # the scan path ran
    assert sum(r.stats.full_scored == 3000 for r in batched) >= 30  # batched scan too
    for qi in range(40):
        assert datasets.agrees(batched[qi].positions, data, queries[qi], truth[qi])
        assert datasets.agrees(singles[qi].positions, data, queries[qi], truth[qi])


@pytest.mark.parametrize(("block", "chunk"), [(1, 4), (2, 6), (8, 64), (64, 64), (512, 16384)])
@pytest.mark.parametrize("k", [1, 10, 70])
def test_batches_stay_exact_for_any_block_and_chunk_size(
    monkeypatch: pytest.MonkeyPatch, block: int, chunk: int, k: int
) -> None:
    """The batched first level keeps one maximum per block of rows; partial blocks and
    chunks, k larger than a block, near and far queries must all stay exact."""
    monkeypatch.setattr(search_module, "BLOCKED_BATCH_ROWS", 0)
    monkeypatch.setattr(search_module, "BATCH_BLOCK", block)
    monkeypatch.setattr(search_module, "BATCH_CHUNK", chunk)
    rng = np.random.default_rng(block * 100 + k)
    data = datasets.low_rank_varying(rng, 3001, 32)
    queries = np.vstack([datasets.perturbed_queries(rng, data, 20, 0.1),
                         datasets.perturbed_queries(rng, data, 20, 0.5),
                         datasets.low_rank_varying(rng, 20, 32),
                         datasets.gaussian(rng, 10, 32) * 3.0])
    key = IndexKey.generate(32, sample=data[:300])
    index = EncryptedIndex(key.encrypt(data))
    token = key.query(queries)
    _, truth = datasets.plaintext_topk(data, queries, k)
    batched = search_batch(index, token, k)
    assert len(batched) == len(queries)
    for qi, result in enumerate(batched):
        assert result.positions.shape == (k,)
        assert len(set(result.positions.tolist())) == k  # no vector counted twice
        assert datasets.agrees(result.positions, data, queries[qi], truth[qi]), qi
    assert any(r.stats.full_scored < len(data) for r in batched)  # blocks were refined


@pytest.mark.parametrize("block", [1, 2, 4, 512])
def test_block_maxima_equal_the_maxima_of_every_block(block: int) -> None:
    rng = np.random.default_rng(block)
    scores = rng.standard_normal((block * 7, 5)).astype(np.float32)
    expected = scores.reshape(7, block, 5).max(axis=1)
    out = np.empty((7, 5), dtype=np.float32)
    search_module._halving_max(scores.copy(), block, out)
    assert np.array_equal(out, expected)


def test_batch_of_near_queries_rescores_few_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Near queries must be answered from a handful of blocks, not by rescoring all."""
    monkeypatch.setattr(search_module, "BLOCKED_BATCH_ROWS", 0)
    rng = np.random.default_rng(4)
    data = datasets.low_rank_varying(rng, 20000, 64)
    queries = datasets.perturbed_queries(rng, data, 20, noise=0.05)
    key = IndexKey.generate(64, sample=data[:2000])
    index = EncryptedIndex(key.encrypt(data))
    results = search_batch(index, key.query(queries), 1)
    assert max(r.stats.full_scored for r in results) < 200
