"""The lower bounds never exceed the true squared distance (property tests)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from crypto.bounds import bound_sq_distance, bound_vectors, fit_basis, ms_distance_bound
from crypto.index import IndexKey

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def vector_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    d = draw(st.integers(min_value=2, max_value=40))
    p = draw(arrays(np.float64, d, elements=finite))
    q = draw(arrays(np.float64, d, elements=finite))
    rows = draw(st.integers(min_value=1, max_value=d))
    return p, q, rows


@settings(max_examples=300, deadline=None)
@given(vector_pairs(), st.integers(min_value=0, max_value=2**32 - 1))
def test_bound_never_exceeds_distance(pair: tuple[np.ndarray, np.ndarray, int], seed: int) -> None:
    p, q, rows = pair
    d = p.shape[0]
    sample = np.random.default_rng(seed).standard_normal((rows + 3, d))
    basis = fit_basis(sample, d, rows)
    true = float(((p - q) ** 2).sum())
    bound = float(bound_sq_distance(p[None], q[None], basis)[0])
    # Relative tolerance, plus an absolute floor far below any real feature value:
    # subnormal inputs (hypothesis finds them) carry too few bits for a relative one.
    scale = float((p * p).sum() + (q * q).sum())
    slack = 1e-9 * scale + 1e-250
    assert bound <= true + slack
    ms = float(ms_distance_bound(p[None], q[None])[0])
    assert ms <= true + slack


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, (5, 24), elements=finite), st.integers(1, 24))
def test_bound_vector_keeps_the_norm(x: np.ndarray, rows: int) -> None:
    basis = fit_basis(x, 24, rows)
    b = bound_vectors(x, basis)
    np.testing.assert_allclose((b * b).sum(1), (x * x).sum(1), rtol=1e-9,
                               atol=1e-9 * float((x * x).sum(1).max()) + 1e-300)


def test_basis_is_orthonormal_and_starts_with_constant_direction() -> None:
    rng = np.random.default_rng(0)
    basis = fit_basis(rng.standard_normal((200, 128)), 128, 32)
    np.testing.assert_allclose(basis @ basis.T, np.eye(32), atol=1e-12)
    np.testing.assert_allclose(basis[0], np.full(128, 128 ** -0.5))
    assert np.allclose(fit_basis(None, 10, 4) @ fit_basis(None, 10, 4).T, np.eye(4))


def test_first_level_equals_ms_distance() -> None:
    rng = np.random.default_rng(1)
    p, q = rng.standard_normal((50, 64)) * 3 + 1, rng.standard_normal((50, 64))
    basis = fit_basis(None, 64, 1)
    np.testing.assert_allclose(bound_sq_distance(p, q, basis), ms_distance_bound(p, q), rtol=1e-9)


def test_encrypted_bound_score_never_below_full_score() -> None:
    """The server-side inequality the pruning relies on, through real encryption."""
    rng = np.random.default_rng(2)
    data = rng.standard_normal((2000, 48)) * rng.uniform(0.1, 3, (2000, 1))
    key = IndexKey.generate(48, sample=data[:100])
    enc = key.encrypt(data)
    token = key.query(rng.standard_normal((20, 48)))
    full = enc.full @ token.full.T
    scale = np.abs(full).max()
    for level, level_token in zip(enc.levels, token.levels, strict=True):
        assert np.all(level @ level_token.T >= full - 1e-9 * scale)
