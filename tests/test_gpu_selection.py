"""The GPU backend's selection logic, run on the CPU with numpy as the array module.

cloud/gpu is written once for numpy and cupy; here every mode of the engine, the error
bars it relies on and the segment loader run with numpy, against float64 plaintext brute
force (bench.datasets.agrees: the same images, or a tie within 1e-9) and against the CPU
engine. The same code runs with cupy on the GPU machine (bench/gpu.py checks it there).
"""

from __future__ import annotations

import hashlib
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bench import datasets
from cloud.gpu import engine, select
from cloud.gpu.device import array_module, parse_device
from cloud.gpu.loader import load_segments
from cloud.search import EncryptedIndex
from cloud.search import search as cpu_search
from cloud.segments import SegmentError, encode_segment, encode_segment_v2
from crypto.index import IndexKey
from crypto.tokens import EncryptedVectors, QueryToken

N = 12000  # above engine.SMALL, so that the levels and scans run as on a large index


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, IndexKey, EncryptedVectors, engine.DeviceIndex, np.ndarray]:
    """Image-like vectors (offset and spread vary), near and fresh queries."""
    rng = np.random.default_rng(20)
    data = datasets.low_rank_varying(rng, N, 64)
    key = IndexKey.generate(64, sample=data[:3000])
    vectors = key.encrypt(data)
    index = engine.DeviceIndex.from_vectors(np, [vectors])
    queries = np.concatenate([datasets.perturbed_queries(rng, data, 12, noise=0.05),
                              datasets.low_rank_varying(np.random.default_rng(21), 12, 64)])
    return data, key, vectors, index, queries


def _assert_exact(results: list, data: np.ndarray, queries: np.ndarray, k: int, seed: object
                  ) -> None:
    _, dists = datasets.plaintext_topk(data, queries, k)
    for qi, result in enumerate(results):
        assert result.positions.shape == (min(k, len(data)),), f"seed {seed}, query {qi}"
        assert datasets.agrees(result.positions, data, queries[qi], dists[qi]), (
            f"seed {seed}, query {qi}: got {result.positions}")


@pytest.mark.parametrize("mode", engine.MODES)
@pytest.mark.parametrize("k", [1, 4, 40])
def test_every_mode_is_exact_on_near_and_fresh_queries(case, mode: str, k: int) -> None:
    data, key, _, index, queries = case
    token = key.query(queries)
    results = [engine.search(index, token.select(i), k, mode) for i in range(len(queries))]
    _assert_exact(results, data, queries, k, ("realistic", mode, k))


def test_levels_mode_prunes_near_queries_and_matches_the_cpu_engine(case) -> None:
    _, key, vectors, index, queries = case
    token = key.query(queries[:12])  # near queries
    cpu_index = EncryptedIndex(vectors)
    for i in range(12):
        got = engine.search(index, token.select(i), 3, "levels")
        want = cpu_search(cpu_index, token.select(i), 3)
        assert got.positions.tolist() == want.positions.tolist(), f"query {i}"
        # Two float64 summation orders (the device's product, the CPU's fixed order)
        # differ by rounding relative to |x| |t|, not to the score: the ciphertexts'
        # random shares cancel in the product (1 in about 80 runs failed rtol=1e-12).
        scale = cpu_index.full_norm * float(np.linalg.norm(token.full[i]))
        assert np.allclose(got.scores, want.scores, rtol=0, atol=1e-13 * scale)
        # A near query's nearest image: the first level leaves almost nothing to the
        # finer levels (its 2nd and 3rd nearest are not near, so k = 3 prunes less).
        nearest = engine.search(index, token.select(i), 1, "levels")
        assert nearest.stats.level_scored[1] < 0.01 * N, nearest.stats.level_scored


def test_levels_fall_back_to_the_float32_scan_and_stay_exact(case, monkeypatch) -> None:
    data, key, _, index, queries = case
    token = key.query(queries)
    monkeypatch.setattr(engine, "SCAN_FRACTION", 0.0)  # every query takes the scan
    results = [engine.search(index, token.select(i), 5, "levels") for i in range(len(queries))]
    assert all(r.stats.level_scored[1:] == [0] for r in results)
    _assert_exact(results, data, queries, 5, "fallback")


@pytest.mark.parametrize("mode", engine.BATCH_MODES)
@pytest.mark.parametrize("k", [1, 7])
def test_batches_equal_single_queries(case, monkeypatch, mode: str, k: int) -> None:
    data, key, _, index, queries = case
    token = key.query(queries)
    monkeypatch.setattr(engine, "BATCH_CHUNK_BYTES", 4096 * 8 * len(queries))  # several chunks
    batch = engine.search_batch(index, token, k, mode)
    singles = [engine.search(index, token.select(i), k, "f64") for i in range(len(queries))]
    for qi, (b, s) in enumerate(zip(batch, singles, strict=True)):
        assert b.positions.tolist() == s.positions.tolist(), f"query {qi}"
        assert b.stats.batch == len(queries)
    _assert_exact(batch, data, queries, k, (mode, k))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_gaussian_data_where_no_bound_prunes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = datasets.gaussian(rng, 6000, 32)
    key = IndexKey.generate(32, sample=data[:2000])
    index = engine.DeviceIndex.from_vectors(np, [key.encrypt(data)])
    queries = datasets.gaussian(rng, 8, 32)
    token = key.query(queries)
    for mode in engine.MODES:
        _assert_exact([engine.search(index, token.select(i), 3, mode) for i in range(8)],
                      data, queries, 3, (seed, mode))
    _assert_exact(engine.search_batch(index, token, 3, "f32"), data, queries, 3, seed)


def test_duplicates_and_small_indexes() -> None:
    rng = np.random.default_rng(9)
    base = datasets.low_rank_varying(rng, 3000, 16)
    data = np.concatenate([base, base[:2000]])  # exact plaintext ties
    key = IndexKey.generate(16, sample=data)
    index = engine.DeviceIndex.from_vectors(np, [key.encrypt(data)])
    queries = data[[5, 17, 2500]] + 1e-3
    token = key.query(queries)
    for mode in engine.MODES:
        _assert_exact([engine.search(index, token.select(i), 2, mode) for i in range(3)],
                      data, queries, 2, mode)
    tiny = engine.DeviceIndex.from_vectors(np, [key.encrypt(data[:3])])
    result = engine.search(tiny, key.query(queries[:1]), 10, "levels")
    assert sorted(result.positions.tolist()) == [0, 1, 2]  # k above n: every row, ranked


def test_float32_error_bars_hold_for_ciphertext_rows() -> None:
    """The bars the f32 scan relies on, against a float64 product of the same rows, on
    rows as varied as ciphertexts (mixed scales, cancelling entries)."""
    rng = np.random.default_rng(4)
    for width in (8, 36, 274, 1030):
        rows = rng.standard_normal((4000, width)) * rng.uniform(0.01, 100.0, (4000, 1))
        rows[::7] *= np.linspace(-1, 1, width)  # cancelling rows
        token = rng.standard_normal(width) * 37.0
        exact = rows @ token  # float64: its error is far inside SAFETY_EPS
        approx = rows.astype(np.float32) @ token.astype(np.float32)
        norms32 = select.norms_up32(np, rows)
        per_norm = select.float32_ceil(select.float32_dot_error(width) * np.linalg.norm(token))
        bars = norms32 * per_norm
        assert np.all(np.abs(approx.astype(np.float64) - exact) <= bars), width
        # ... and the bars are not vacuous: within 100x of the worst error seen.
        assert np.max(bars / np.maximum(np.abs(approx - exact), 1e-300)) > 1.0


def test_kth_lower_is_reached_by_k_rows_and_never_above_the_kth_best() -> None:
    rng = np.random.default_rng(7)
    for k in (1, 2, 5, 33):
        values = rng.standard_normal((1000, 6)).astype(np.float32)
        bound = select.kth_lower(np, values, k)
        kth = np.sort(values, axis=0)[-k]
        assert np.all((values >= bound).sum(axis=0) >= k)
        assert np.all(bound <= kth)
    assert select.kth_lower(np, np.zeros(3), 4) == -np.inf


def test_candidates_keep_the_true_top_k_whatever_the_errors() -> None:
    """Approximations anywhere inside their bars (here next to the adversarial ends: the
    engine's bars leave room for the rounding of approx +- bar, which this test's bars,
    exact to the last bit, would not) never lose a row of the exact top k."""
    rng = np.random.default_rng(8)
    for trial in range(50):
        exact = rng.standard_normal(2000)
        exact[rng.integers(0, 2000, 20)] = exact.max()  # ties at the top
        bars = rng.uniform(0.0, 0.3, 2000)
        approx = exact + 0.9999 * bars * rng.choice([-1.0, 1.0], 2000)
        k = int(rng.integers(1, 30))
        kept = select.candidates(np, approx, bars, k, np.float64(-np.inf))
        top = np.argsort(-exact, kind="stable")[:k]
        kth = exact[top[-1]]
        assert set(np.flatnonzero(exact >= kth)) <= set(kept.tolist()), f"trial {trial}"


def test_float32_floor_and_ceil_bracket_the_value() -> None:
    for value in (1.0, 1.0 + 1e-9, -3.3333333333, 1e30, -1e-30, 0.0):
        assert float(select.float32_floor(value)) <= value <= float(select.float32_ceil(value))
    assert select.float32_floor(1.0 + 1e-9) == np.float32(1.0)
    assert select.float32_ceil(1.0 + 1e-9) > np.float32(1.0)


def test_top_k_ranks_ties_by_position_and_drops_repeats() -> None:
    positions, scores = select.top_k(np.array([9, 3, 3, 5, 1]),
                                     np.array([2.0, 5.0, 5.0, 5.0, 1.0]), 3)
    assert positions.tolist() == [3, 5, 9]
    assert scores.tolist() == [5.0, 5.0, 2.0]


def test_segments_load_into_the_index_and_errors_name_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    key = IndexKey.generate(24, sample=rng.standard_normal((500, 24)))
    parts, paths = [], []
    for i, count in enumerate((700, 1300, 1)):
        vectors = key.encrypt(rng.standard_normal((count, 24)))
        ids = [secrets.token_hex(16) for _ in range(count)]
        if i == 1:
            data = encode_segment_v2(ids, vectors, 1, seg_id=secrets.token_hex(16),
                                     writer="alice", base_sequence=3,
                                     repo_id="r" * 32, mac_key=bytes(32))
        else:
            data = encode_segment(ids, vectors, 1)
        path = tmp_path / f"segment-{i}"
        path.write_bytes(data)
        parts.append(vectors)
        paths.append(path)
    loaded = load_segments(np, paths, threads=2)
    expected = engine.DeviceIndex.from_vectors(np, parts)
    assert len(loaded.index) == 2001 and loaded.ids.shape == (2001,)
    assert np.array_equal(loaded.index.full, expected.full)
    assert np.array_equal(loaded.index.first32, expected.first32)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.index.levels, expected.levels,
                                                    strict=True))
    assert loaded.bytes_read == sum(p.stat().st_size for p in paths)
    damaged = bytearray(paths[1].read_bytes())
    damaged[300] ^= 1
    paths[1].write_bytes(bytes(damaged))
    with pytest.raises(SegmentError, match="segment-1"):
        load_segments(np, paths, threads=1)


def test_device_names() -> None:
    assert str(parse_device("cpu")) == "cpu"
    assert str(parse_device("CUDA")) == "cuda:0"
    assert parse_device("cuda:3").ordinal == 3
    for bad in ("gpu", "cuda:", "cpu:1", "cuda:x", ""):
        with pytest.raises(ValueError, match="unknown device"):
            parse_device(bad)
    assert array_module("cpu") is np


def test_a_missing_cupy_is_a_plain_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(RuntimeError, match=r"radcrypt\[gpu\]"):
        array_module("cuda:0")


def test_widths_must_match(case) -> None:
    _, _, _, index, _ = case
    other = IndexKey.generate(8).query(np.ones((1, 8)))
    with pytest.raises(ValueError, match="do not match"):
        engine.search(index, other, 1)
    with pytest.raises(ValueError, match="unknown search mode"):
        engine.search(index, QueryToken(full=np.zeros((1, index.widths[-1])),
                                        levels=tuple(np.zeros((1, w))
                                                     for w in index.widths[:-1])), 1, "fast")


def test_segment_loader_checks_as_decode_segment_does(tmp_path: Path) -> None:
    """Truncated, trailing, duplicate-id and non-finite segments are refused by name,
    also when the file spans several staging chunks."""
    rng = np.random.default_rng(12)
    key = IndexKey.generate(8, sample=rng.standard_normal((100, 8)))
    vectors = key.encrypt(rng.standard_normal((300, 8)))
    ids = [secrets.token_hex(16) for _ in range(300)]
    good = encode_segment(ids, vectors, 1)
    path = tmp_path / "segment-a"
    path.write_bytes(good)
    loaded = load_segments(np, [path], threads=1, chunk_bytes=4096)  # many chunks
    assert np.array_equal(loaded.index.full, vectors.full)
    assert [bytes(i).hex() for i in loaded.ids] == ids
    cases = {
        "truncated": good[:-1],
        "trailing bytes": good + b"\0",
        "duplicate image ids": _resealed(good, lambda b: b.__setitem__(
            slice(64 + 16, 64 + 32), b[64:80])),  # id 1 := id 0 (version 1: ids at 64)
    }
    bad_full = vectors.full.copy()
    bad_full[7, 3] = np.inf
    cases["non-finite"] = encode_segment(
        ids, EncryptedVectors(full=bad_full, levels=vectors.levels), 1)
    cases["checksum mismatch"] = good[:100] + bytes([good[100] ^ 1]) + good[101:]
    for words, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(SegmentError, match=words) as caught:
            load_segments(np, [path], threads=1, chunk_bytes=4096)
        assert "segment-a" in str(caught.value)


def _resealed(data: bytes, change: Callable[[bytearray], None]) -> bytes:
    """A version-1 segment changed, with its SHA-256 trailer made valid again (what a
    buggy or hostile writer could produce)."""
    body = bytearray(data[:-32])
    change(body)
    return bytes(body) + hashlib.sha256(body).digest()


def test_kth_lower_along_rows_matches_down_columns() -> None:
    rng = np.random.default_rng(13)
    values = rng.standard_normal((5, 999))
    for k in (1, 3, 10):
        assert np.array_equal(select.kth_lower(np, values, k, axis=1),
                              select.kth_lower(np, np.ascontiguousarray(values.T), k))


@pytest.mark.parametrize("direct", [0.0, 1.0])
def test_survivors_rescored_directly_or_through_the_finer_levels(case, monkeypatch,
                                                                 direct: float) -> None:
    data, key, _, index, queries = case
    monkeypatch.setattr(engine, "DIRECT_FRACTION", direct)
    token = key.query(queries)
    results = [engine.search(index, token.select(i), 6, "levels") for i in range(len(queries))]
    _assert_exact(results, data, queries, 6, ("direct", direct))
    through_levels = [r.stats.level_scored[1] for r in results]
    assert (max(through_levels) == 0) == (direct == 1.0)


def test_the_service_searcher_answers_as_the_cpu_engine(case) -> None:
    """backend.DeviceSearcher (what `radcrypt serve --device cuda` would run), here with
    numpy as its array module: one copy per index, same answers as cloud.search."""
    from cloud.gpu.backend import DeviceSearcher, searcher
    from cloud.search import search_batch as cpu_batch

    _, key, vectors, _, queries = case
    index = EncryptedIndex(vectors)
    device = DeviceSearcher(np)
    token = key.query(queries)
    batched = device(index, token, 3)
    single = device(index, token.select(0), 3)
    assert device.device_index(index) is device.device_index(index)  # copied once
    for qi, (got, want) in enumerate(zip(batched, cpu_batch(index, token, 3), strict=True)):
        assert got.positions.tolist() == want.positions.tolist(), f"query {qi}"
    assert single[0].positions.tolist() == batched[0].positions.tolist()
    assert searcher("cpu") is cpu_batch
