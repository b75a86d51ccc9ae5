"""Secure-kNN keys: correctness of scores, conditioning, serialization, CSPRNG use."""

from __future__ import annotations

import numpy as np
import pytest

from crypto import csprng
from crypto.errors import FormatError
from crypto.index import IndexKey
from crypto.sknn import COND_BOUND, MIN_EXTRA, SknnKey, query_scales, random_invertible
from crypto.tokens import QueryToken


def test_score_is_scaled_shifted_distance() -> None:
    rng = np.random.default_rng(0)
    key = SknnKey.generate(128)
    p, q = rng.standard_normal((100, 128)), rng.standard_normal((5, 128))
    r = query_scales(5)
    scores = key.encrypt(p) @ key.token(q, r).T
    dist = ((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)
    expected = -(r / 2) * (dist - (q * q).sum(1))
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())


def test_ciphertexts_are_randomised_and_hide_the_vector() -> None:
    key = SknnKey.generate(16)
    p = np.ones((1, 16))
    a, b = key.encrypt(p), key.encrypt(p)
    assert a.shape == (1, 2 * (16 + 1 + MIN_EXTRA))
    assert not np.allclose(a, b)


def test_matrices_are_well_conditioned() -> None:
    for n in (11, 137, 521):
        assert np.linalg.cond(random_invertible(n)) <= COND_BOUND * (1 + 1e-9)


def test_query_scales_fresh_and_positive() -> None:
    r = query_scales(1000)
    assert np.all(r > 0) and len(np.unique(r)) == 1000


def test_key_round_trip_and_corruption() -> None:
    key = SknnKey.generate(20)
    blob = key.to_bytes()
    back = SknnKey.from_bytes(blob)
    assert np.array_equal(back.m1, key.m1) and np.array_equal(back.split, key.split)
    for bad in (blob[:-1], b"XXXX" + blob[4:], blob[:10], blob + b"\0"):
        with pytest.raises(FormatError):
            SknnKey.from_bytes(bad)
    assert "m1" not in repr(key) and "secret" in repr(key)


def test_index_key_round_trip_gives_same_scores() -> None:
    rng = np.random.default_rng(1)
    data = rng.standard_normal((50, 64))
    key = IndexKey.generate(64, sample=data)
    back = IndexKey.from_bytes(key.to_bytes())
    enc = key.encrypt(data)
    token = back.query(data[:2])
    np.testing.assert_allclose(enc.full @ token.full.T, key.full.encrypt(data) @ token.full.T,
                               rtol=1e-8, atol=1e-6)
    with pytest.raises(FormatError):
        IndexKey.from_bytes(key.to_bytes()[:-3])


def test_token_serialization_validates_every_field() -> None:
    key = IndexKey.generate(32)
    token = key.query(np.random.default_rng(2).standard_normal((3, 32)))
    blob = token.to_bytes()
    back = QueryToken.from_bytes(blob)
    assert back.widths == token.widths and np.array_equal(back.full, token.full)
    nan = bytearray(blob)
    nan[-8:] = np.array([np.nan]).tobytes()
    for bad, field in [(blob[:-1], "length"), (b"XXXX" + blob[4:], "magic"),
                       (blob[:5], "truncated"), (bytes(nan), "non-finite")]:
        with pytest.raises(FormatError, match=field):
            QueryToken.from_bytes(bad)
    with pytest.raises(FormatError, match="query count"):
        QueryToken.from_bytes(blob, max_queries=2)


def test_csprng_helpers_look_uniform() -> None:
    u = csprng.uniform(100000)
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01
    z = csprng.normal(100001)
    assert z.shape == (100001,) and abs(z.std() - 1.0) < 0.02
    assert 0.45 < csprng.bits(10000).mean() < 0.55
