"""Claims of SECURITY.md that are about the mathematics, each checked by running it.

Including the bad news: the known-plaintext attack on secure-kNN works as published.
"""

from __future__ import annotations

import numpy as np

from cloud.search import EncryptedIndex, search
from crypto.index import IndexKey
from crypto.sknn import SknnKey, query_scales


def test_known_plaintext_attack_recovers_the_query() -> None:
    """An attacker who knows d + 1 stored plaintexts and sees their scores against one
    query solves a linear system for r*q and r, hence q, to about 1e-8 (DESIGN.md §1)."""
    rng = np.random.default_rng(0)
    d = 128
    key = SknnKey.generate(d)
    data = rng.standard_normal((d + 1, d))
    query = rng.standard_normal(d)
    scores = key.encrypt(data) @ key.token(query[None, :], query_scales(1))[0]
    # score_i = r p_i . q - (r/2) |p_i|^2 : linear in the unknowns (r q, r).
    system = np.hstack([data, -0.5 * np.einsum("ij,ij->i", data, data)[:, None]])
    solution = np.linalg.solve(system, scores)
    recovered = solution[:d] / solution[d]
    error = np.max(np.abs(recovered - query)) / np.max(np.abs(query))
    assert error < 1e-6, error


def test_server_learns_ratios_of_distance_differences() -> None:
    """The random scale r hides absolute distances but not their ratios: what the server
    sees of the scores is the distance order and (s_i - s_j)/(s_k - s_l)."""
    rng = np.random.default_rng(1)
    key = SknnKey.generate(16)
    data = rng.standard_normal((4, 16))
    query = rng.standard_normal(16)
    s = key.encrypt(data) @ key.token(query[None, :], query_scales(1))[0]
    dist = ((data - query) ** 2).sum(axis=1)
    assert np.isclose((s[0] - s[1]) / (s[2] - s[3]), (dist[0] - dist[1]) / (dist[2] - dist[3]))


def test_same_vector_encrypts_differently_and_tokens_differ() -> None:
    """Ciphertexts and tokens are randomised: equal plaintexts do not look equal."""
    key = IndexKey.generate(32)
    vector = np.ones((2, 32))
    enc = key.encrypt(vector)
    assert not np.allclose(enc.full[0], enc.full[1])
    t1, t2 = key.query(vector[:1]), key.query(vector[:1])
    assert not np.allclose(t1.full, t2.full)


def test_server_side_engine_needs_no_key() -> None:
    """The engine ranks from ciphertexts and a token alone (cloud/ imports no key type)."""
    import cloud.search as engine_module

    source = open(engine_module.__file__, encoding="utf-8").read()
    assert "crypto.keys" not in source and "IndexKey" not in source and "SknnKey" not in source
    rng = np.random.default_rng(2)
    key = IndexKey.generate(64, sample=rng.standard_normal((100, 64)))
    data = rng.standard_normal((500, 64))
    index = EncryptedIndex(key.encrypt(data))
    result = search(index, key.query(data[7:8] + 1e-3), 1)
    assert result.positions[0] == 7
