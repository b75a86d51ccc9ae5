"""The CKKS search scheme (crypto/ckks.py) and the service's scorer (cloud/ckks_engine.py).

Exactness is the claim that matters: the decrypted scores are approximate, so the client
re-scores every candidate within twice the error bound of the k-th score; the answer must
equal plaintext brute force. A query or block of another repository or key version must be
refused, never ranked.
"""

from __future__ import annotations

import numpy as np
import pytest

from cloud.ckks_engine import BLOCKS_PER_WORKER, CkksScorer
from crypto import ckks
from crypto.errors import FormatError

SEED = 20261127


def _key(repo: str = "repo-a", version: int = 1) -> ckks.CkksKey:
    return ckks.CkksKey(ckks.seed_from_data_key(b"\x07" * 32, repo, version))


def _brute(data: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    d2 = np.einsum("ij,ij->i", data - query, data - query)
    return [int(i) for i in np.lexsort((np.arange(len(data)), d2))[:k]]


@pytest.mark.parametrize("layout", [ckks.DIAGONAL, ckks.ROWS, None])
def test_exact_top_k_equals_plaintext_brute_force(layout: str | None) -> None:
    """Both layouts, and the automatic choice (a full block and one of 904 vectors, both
    diagonal; a block of at most four ciphertexts of vectors goes in rows)."""
    rng = np.random.default_rng(SEED)
    data = rng.random((5000, 24)) * 2.0  # two blocks, the second partly full
    key = _key()
    blocks = [key.encrypt_block(data[i : i + ckks.SLOTS], layout)
              for i in range(0, 5000, ckks.SLOTS)]
    assert [b.count for b in blocks] == [ckks.SLOTS, 5000 - ckks.SLOTS]
    kinds = [ckks.header(b.data, "block")[0] for b in blocks]
    assert kinds == {ckks.DIAGONAL: [ckks.KIND_BLOCK] * 2, ckks.ROWS: [ckks.KIND_ROWS] * 2,
                     None: [ckks.KIND_BLOCK, ckks.KIND_BLOCK]}[layout]
    assert ckks.layout_for(4 * 128, 32) == ckks.ROWS
    assert ckks.layout_for(4 * 128 + 1, 32) == ckks.DIAGONAL
    assert blocks[0].period == 32
    scorer = CkksScorer(key.evaluation_keys(32), [b.data for b in blocks], workers=1)
    worst = 0.0
    for i in range(12):
        query = data[rng.integers(5000)] + rng.normal(0, 0.05, 24) if i % 2 else rng.random(24)
        scores = key.decrypt_scores(scorer.scores(key.encrypt_query(query, 32)),
                                    [b.count for b in blocks])
        exact = data @ query - 0.5 * np.einsum("ij,ij->i", data, data)
        worst = max(worst, float(np.abs(scores - exact).max()))
        rows = ckks.candidates(scores, 5)
        found = [row for row, _ in ckks.exact_top_k(data, query, rows, 5)]
        assert found == _brute(data, query, 5), f"seed {SEED}, query {i}"
    assert worst < ckks.ERROR_BOUND / 100, f"largest score error {worst} (seed {SEED})"


def test_a_query_of_another_key_version_is_refused() -> None:
    rng = np.random.default_rng(SEED + 1)
    data = rng.random((300, 16))
    old, new = _key(version=1), _key(version=2)
    block = old.encrypt_block(data)
    scorer = CkksScorer(old.evaluation_keys(16), [block.data], workers=1)
    answer = scorer.scores(new.encrypt_query(data[0], block.period))
    with pytest.raises(FormatError, match="another repository or key version"):
        new.decrypt_scores(answer, [block.count])
    with pytest.raises(FormatError, match="another repository or key version"):
        old.decrypt_scores(answer, [block.count])


def test_a_block_of_another_repository_is_refused() -> None:
    rng = np.random.default_rng(SEED + 2)
    data = rng.random((200, 16))
    ours, theirs = _key("repo-a"), _key("repo-b")
    foreign = theirs.encrypt_block(data)
    scorer = CkksScorer(ours.evaluation_keys(16), [foreign.data], workers=1)
    answer = scorer.scores(ours.encrypt_query(data[0], foreign.period))
    with pytest.raises(FormatError, match="another repository or key version"):
        ours.decrypt_scores(answer, [foreign.count])


def test_seeds_are_bound_to_repository_and_version() -> None:
    key = b"\x01" * 32
    seeds = {ckks.seed_from_data_key(key, r, v) for r in ("a", "b") for v in (1, 2)}
    assert len(seeds) == 4
    assert ckks.seed_from_data_key(key, "a", 1) == ckks.seed_from_data_key(key, "a", 1)
    assert ckks.seed_from_data_key(b"\x02" * 32, "a", 1) != ckks.seed_from_data_key(key, "a", 1)
    assert "secret" in repr(_key()) and "\\x" not in repr(_key())


def test_malformed_objects_are_refused_with_their_name() -> None:
    key = _key()
    block = key.encrypt_block(np.ones((10, 8)))
    evaluator = ckks.CkksEvaluator(key.evaluation_keys(8))
    with pytest.raises(FormatError, match="a CKKS block is truncated"):
        evaluator.load_block(block.data[:-1000])
    with pytest.raises(FormatError, match="not a CKKS object of the expected kind"):
        evaluator.load_block(key.encrypt_query(np.ones(8), 8))
    with pytest.raises(FormatError, match="period 16, the repository 8"):
        evaluator.scores(key.encrypt_query(np.ones(8), 16), [evaluator.load_block(block.data)])
    with pytest.raises(FormatError, match="norm exceeds"):
        key.encrypt_block(np.full((2, 8), 1000.0))
    with pytest.raises(FormatError, match="expected 2"):
        key.decrypt_scores(evaluator.scores(key.encrypt_query(np.ones(8), 8),
                                            [evaluator.load_block(block.data)]), [10, 5])


def test_worker_processes_give_the_same_scores_as_one_process() -> None:
    rng = np.random.default_rng(SEED + 3)
    blocks_wanted = 2 * BLOCKS_PER_WORKER
    data = rng.random((blocks_wanted * 64, 8))
    key = _key()
    # small blocks (64 vectors each) so that two workers are worth starting
    blocks = [key.encrypt_block(data[i : i + 64]) for i in range(0, len(data), 64)]
    query = key.encrypt_query(data[3], 8)
    counts = [b.count for b in blocks]
    with CkksScorer(key.evaluation_keys(8), [b.data for b in blocks], workers=2) as parallel:
        assert parallel.workers == 2
        spread = key.decrypt_scores(parallel.scores(query), counts)
    single = key.decrypt_scores(
        CkksScorer(key.evaluation_keys(8), [b.data for b in blocks], workers=1).scores(query),
        counts)
    exact = data @ data[3] - 0.5 * np.einsum("ij,ij->i", data, data)
    assert np.abs(spread - exact).max() < 1e-3
    assert np.abs(single - exact).max() < 1e-3
    assert int(np.argmax(spread)) == int(np.argmax(single)) == 3
