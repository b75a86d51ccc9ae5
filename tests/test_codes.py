"""Eight-bit codes of the full ciphertexts (cloud/codes.py): the bounds must hold for
every row, and a scan must return every row that can be in the exact top k."""

from __future__ import annotations

import numpy as np
import pytest

from cloud import codes
from cloud.codes import RowCodes, quantize_rows, scan
from crypto.index import IndexKey


def _rows(kind: str, rng: np.random.Generator, n: int = 3000, width: int = 40) -> np.ndarray:
    if kind == "gaussian":
        return rng.standard_normal((n, width))
    if kind == "huge":
        return rng.standard_normal((n, width)) * 1e7 + 3e7
    if kind == "tiny":
        return rng.standard_normal((n, width)) * 1e-7
    if kind == "outliers":  # one huge entry per row: the step is coarse for the rest
        x = rng.standard_normal((n, width))
        x[np.arange(n), rng.integers(0, width, n)] = 1e4
        return x
    if kind == "constant":  # zero spread: a step of 0 would divide by zero
        return np.repeat(rng.standard_normal((n, 1)), width, axis=1)
    if kind == "mixed":  # rows of very different magnitudes
        return rng.standard_normal((n, width)) * np.exp(rng.uniform(-20, 20, (n, 1)))
    raise AssertionError(kind)


KINDS = ["gaussian", "huge", "tiny", "outliers", "constant", "mixed"]


@pytest.mark.parametrize("kind", KINDS)
def test_slack_bounds_the_coding_residual(kind: str) -> None:
    x = _rows(kind, np.random.default_rng(1))
    coded = RowCodes.of(x)
    decoded = (coded.offset.astype(np.float64)
               + coded.step.astype(np.float64) * coded.codes.astype(np.float64))
    residual = np.linalg.norm(x - decoded, axis=1)
    assert np.all(residual <= coded.slack[:, 0])
    assert coded.codes.dtype == np.uint16 and coded.slack.dtype == np.float32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("queries", [1, 5])
def test_every_score_lies_within_its_bounds(kind: str, queries: int) -> None:
    rng = np.random.default_rng(2)
    x = _rows(kind, rng)
    coded = RowCodes.of(x)
    tokens = rng.standard_normal((queries, x.shape[1])) * np.exp(rng.uniform(-5, 5, (queries, 1)))
    lower, upper = codes.bounds(coded, tokens)
    exact = x @ tokens.T
    assert lower.shape == upper.shape == exact.shape
    assert np.all(lower <= exact) and np.all(exact <= upper)


def test_bounds_are_tight_enough_to_prune_on_ciphertexts() -> None:
    """Coarse codes are never wrong, only slow: check they are not coarse."""
    rng = np.random.default_rng(3)
    data = rng.standard_normal((20000, 32))
    key = IndexKey.generate(32, data[:2000])
    full = key.encrypt(data).full
    token = key.query(rng.standard_normal((1, 32))).full
    coded = RowCodes.of(full)
    lower, upper = codes.bounds(coded, token)
    exact = (full @ token.T)[:, 0]
    width = (upper - lower)[:, 0]
    # 0.003: every ciphertext's norm is drawn near the batch's largest (crypto/sknn.py hides
    # plaintext norms since issue 11), which widens the bounds 2-3.5x on these vectors
    # (0.0004-0.0007 before); the scan below still keeps a single candidate.
    assert np.median(width) < 0.003 * (exact.max() - np.median(exact))
    found = scan(coded, token, 1, np.array([-np.inf]))
    assert found.rows[0].size < 0.001 * len(full)


def _check_scan(x: np.ndarray, tokens: np.ndarray, k: int, found: codes.Candidates) -> None:
    exact = x @ tokens.T
    for q in range(tokens.shape[0]):
        kth = np.sort(exact[:, q])[-min(k, len(x))]
        must = set(np.flatnonzero(exact[:, q] >= kth).tolist())  # ties included
        got = found.rows[q].tolist()
        assert len(got) == len(set(got)), "a row returned twice"
        assert must <= set(got)
        assert found.kth_lower[q] <= kth


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 7, 70])
@pytest.mark.parametrize("queries", [1, 3])
def test_scan_returns_every_row_of_the_top_k(kind: str, k: int, queries: int) -> None:
    rng = np.random.default_rng(4)
    x = _rows(kind, rng)
    tokens = rng.standard_normal((queries, x.shape[1]))
    found = scan(RowCodes.of(x), tokens, k, np.full(queries, -np.inf))
    _check_scan(x, tokens, k, found)


@pytest.mark.parametrize("queries", [1, 4])
def test_scan_in_spans_and_threads_matches_one_span(queries: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    x = rng.standard_normal((10000, 64))
    tokens = rng.standard_normal((queries, 64))
    coded = RowCodes.of(x)
    spans = [(0, 4096), (4096, 8192), (8192, 10000)]
    with ThreadPoolExecutor(3) as pool:
        found = scan(coded, tokens, 5, np.full(queries, -np.inf), spans,
                     lambda fn, s: list(pool.map(fn, s)))
    _check_scan(x, tokens, 5, found)
    alone = scan(coded, tokens, 5, np.full(queries, -np.inf))
    for q in range(queries):
        kth = np.sort(x @ tokens[q])[-5]
        assert set(found.rows[q][x[found.rows[q]] @ tokens[q] >= kth]) == set(
            alone.rows[q][x[alone.rows[q]] @ tokens[q] >= kth])


def test_a_known_floor_drops_rows_below_it() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5000, 30))
    token = rng.standard_normal((1, 30))
    exact = (x @ token.T)[:, 0]
    kth = np.sort(exact)[-3]
    found = scan(RowCodes.of(x), token, 3, np.array([kth]))
    _check_scan(x, token, 3, found)
    _, upper = codes.bounds(RowCodes.of(x), token)
    assert not np.any(upper[found.rows[0], 0] < kth)


def test_identical_rows_are_all_candidates() -> None:
    """Every row ties: nothing can be pruned, and nothing may be."""
    x = np.tile(np.linspace(-1, 1, 24), (500, 1))
    token = np.random.default_rng(7).standard_normal((1, 24))
    found = scan(RowCodes.of(x), token, 2, np.array([-np.inf]))
    assert sorted(found.rows[0].tolist()) == list(range(500))


def test_fewer_rows_than_k() -> None:
    x = np.random.default_rng(8).standard_normal((5, 10))
    found = scan(RowCodes.of(x), np.ones((2, 10)), 9, np.full(2, -np.inf))
    for rows in found.rows:
        assert sorted(rows.tolist()) == [0, 1, 2, 3, 4]


def test_quantize_into_views_of_larger_arrays() -> None:
    """The service fills rows reserved in larger arrays, segment by segment."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((300, 12))
    whole = RowCodes.of(x)
    big = RowCodes(np.zeros((500, 12), np.uint16), *(np.zeros((500, 1), np.float32)
                                                     for _ in range(4)))
    for start in (0, 100, 250):
        end = {0: 100, 100: 250, 250: 300}[start]
        part = RowCodes(big.codes[start:end], big.offset[start:end], big.step[start:end],
                        big.slack[start:end], big.size[start:end])
        quantize_rows(x[start:end], part)
    assert np.array_equal(big.codes[:300], whole.codes)
    assert np.array_equal(big.slack[:300], whole.slack)
    assert not big.codes[300:].any()
