"""The search engine's filter and refine on a GPU (or, for tests, on numpy).

The same exact search as cloud/search.py (DESIGN.md §4, §8), with the array module
swapped: every vector's arrays live in device memory, and each query is answered by a
few large array operations rather than the CPU engine's block-by-block loop (a GPU
reads all rows of a level faster than a CPU thread can decide which block is next).

Modes (``mode``), all exact:
- ``levels`` (default for one query): float32 first-level scores of every row; the
  full float64 scores of seeds (k = 1: the best first-level row; else the best of each
  of a few groups) give a threshold; rows whose first-level score misses it by more
  than the CPU engine's margin are pruned. Up to DIRECT_FRACTION of the rows survive
  (near queries: a handful) and are rescored in float64 at once; more go through the
  finer levels first; above SCAN_FRACTION the query is answered by the ``f32`` scan.
- ``f32``: float32 scores of every full ciphertext with a per-row error bar
  (cloud/gpu/select.py), then float64 on the rows the bars cannot decide: half the
  bytes of a float64 scan.
- ``f64``: float64 scores of every full ciphertext (the plain scan; the reference).
Batches (``search_batch``) scan the full ciphertexts as matrix products a chunk of rows
at a time, in float32 with error bars (default) or in float64, comparing only maxima
over blocks of BLOCK rows before looking at the few blocks that may hold a candidate.
Measured on an H200 (docs/BENCHMARKS.md): about 1 ms a query at 1M, 1.1-2.2 ms at 4M,
10.6-12.4 ms for a batch of 60 at 4M; exact in every case.

Margins are the CPU engine's: SAFETY_EPS (cloud/numerics.py) times the norms for the
float64 rounding, plus the float32 dot-product bound for float32 scores; they cost
pruning, never exactness.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from cloud.gpu import select
from cloud.gpu.select import F64, Array
from cloud.numerics import FLOAT32_UNIT, SAFETY_EPS
from cloud.search import SearchResult, SearchStats
from crypto.tokens import EncryptedVectors, QueryToken

MODES = ("levels", "f32", "f64")
BATCH_MODES = ("f32", "f64")
SCAN_FRACTION = 0.1  # above this share of first-level survivors, scan the full rows
DIRECT_FRACTION = 0.02  # up to this share, survivors are rescored in full at once
SEED_GROUPS = 32  # seeds: the best first-level row of each of this many groups
BATCH_CHUNK_BYTES = 256 << 20  # score matrix (rows x queries) of one chunk of a batch
SMALL = 4096  # below this many rows, scan in float64
HOST_ROWS = 4096  # more rescored rows than this are cut on the device before the copy
BLOCK = 256  # rows per block maximum in batches


@dataclass
class DeviceIndex:
    """One repository's ciphertexts in device memory, laid out for the scans.

    ``full`` (float64) is what every answer is finally scored with; ``full32`` and
    ``full_norms32`` (row norms rounded up) serve the float32 scan; ``first32`` the
    first level; ``levels`` the finer levels in float64 (level 0 stays on the host: it
    is only ever scored in float32). The norms are computed from ciphertexts alone.
    """

    xp: ModuleType
    full: Array
    full32: Array | None
    full_norms32: Array
    first32: Array | None
    levels: list[Array]  # levels 1.. (float64)
    widths: tuple[int, ...]
    full_norm: float
    level_norms: list[float]
    block_norms32: Array = None  # the largest row norm of each BLOCK rows (batches)

    def __post_init__(self) -> None:
        if self.block_norms32 is None:
            xp, n = self.xp, len(self)
            padded = xp.zeros(-(-n // BLOCK) * BLOCK, dtype=xp.float32)
            padded[:n] = self.full_norms32
            self.block_norms32 = padded.reshape(-1, BLOCK).max(axis=1)

    def __len__(self) -> int:
        return int(self.full.shape[0])

    @property
    def nbytes(self) -> int:
        arrays = [self.full, self.full32, self.full_norms32, self.first32, *self.levels]
        return sum(int(a.nbytes) for a in arrays if a is not None)

    @classmethod
    def from_vectors(cls, xp: ModuleType, parts: Sequence[EncryptedVectors], *,
                     full32: bool = True) -> DeviceIndex:
        """Copy host ciphertexts (one or more segments, same widths) into device memory.

        Host arrays in pinned memory (cloud/gpu/loader.py) copy at the bus's full speed.
        ``full32=False`` skips the float32 copy of the full ciphertexts (half the memory
        again): then only the ``levels`` and ``f64`` modes are available.
        """
        if not parts:
            raise ValueError("a device index needs at least one segment")
        widths = {p.widths for p in parts}
        if len(widths) != 1:
            raise ValueError("segments disagree on vector widths (different keys?)")
        n = sum(len(p) for p in parts)
        depth = len(parts[0].levels)
        full = _stacked(xp, [p.full for p in parts], n)
        levels = [_stacked(xp, [p.levels[i] for p in parts], n) for i in range(depth)]
        return cls.from_device(xp, full, levels, full32=full32)

    @classmethod
    def from_device(cls, xp: ModuleType, full: Array, levels: list[Array], *,
                    full32: bool = True) -> DeviceIndex:
        """From float64 arrays already in device memory (the full ciphertexts, then one
        per level, cheapest first): the float32 copies and norms are made there."""
        n = int(full.shape[0])
        widths = (*tuple(int(a.shape[1]) for a in levels), int(full.shape[1]))
        full_norms32 = select.norms_up32(xp, full)
        return cls(xp=xp, full=full, full32=full.astype(xp.float32) if full32 else None,
                   full_norms32=full_norms32,
                   first32=levels[0].astype(xp.float32) if levels else None,
                   levels=levels[1:], widths=widths,
                   full_norm=float(full_norms32.max()) if n else 0.0,
                   level_norms=[_max_norm(xp, a) for a in levels])


def _stacked(xp: ModuleType, arrays: Sequence[Any], n: int) -> Array:
    out = xp.empty((n, arrays[0].shape[1]), dtype=xp.float64)
    start = 0
    for a in arrays:
        _put(xp, out, start, np.ascontiguousarray(a, dtype=np.float64))
        start += a.shape[0]
    return out


def _put(xp: ModuleType, out: Array, start: int, host: np.ndarray) -> None:
    """Rows of a host array into a device array (one copy; from pinned memory it runs
    at the bus's speed)."""
    if xp is np:
        out[start : start + host.shape[0]] = host
    else:
        out[start : start + host.shape[0]].set(host)


def _max_norm(xp: ModuleType, a: Array) -> float:
    if a.shape[0] == 0:
        return 0.0
    return float(xp.sqrt(xp.max(xp.einsum("ij,ij->i", a, a))))


def _check(index: DeviceIndex, token: QueryToken, k: int) -> None:
    if k < 1:
        raise ValueError("k must be at least 1")
    if token.widths != index.widths:
        raise ValueError(
            f"query token widths {token.widths} do not match the index {index.widths}")


class _Query:
    """One query's tokens on the device (one upload: full, then each level, float64, plus
    the first level in float32) and its margins (the CPU engine's, cloud/search.py
    _Refiner: SAFETY_EPS for float64 rounding, plus the float32 bound at level 0)."""

    def __init__(self, index: DeviceIndex, token: QueryToken, qi: int) -> None:
        xp = index.xp
        full = np.asarray(token.full[qi], dtype=np.float64)
        levels = [np.asarray(t[qi], dtype=np.float64) for t in token.levels]
        self.full_norm = float(np.linalg.norm(full))
        self.full_err = SAFETY_EPS * index.full_norm * self.full_norm
        self.margins = [SAFETY_EPS * norm * float(np.linalg.norm(t)) + self.full_err
                        for norm, t in zip(index.level_norms, levels, strict=True)]
        first32 = np.empty(0)
        if levels:
            width = levels[0].shape[0]
            self.margins[0] += (4.0 * (width + 2) * FLOAT32_UNIT * index.level_norms[0]
                                * float(np.linalg.norm(levels[0])))
            # float32 values travel inside the float64 upload (exact) and are cast there.
            first32 = levels[0].astype(np.float32).astype(np.float64)
        packed = xp.asarray(np.concatenate([full, *levels[1:], first32]))
        edges = np.cumsum([0, full.size, *(t.size for t in levels[1:]), first32.size])
        self.full = packed[edges[0] : edges[1]]
        self.levels = [packed[edges[i] : edges[i + 1]] for i in range(1, len(edges) - 2)]
        self.first32 = packed[edges[-2] : edges[-1]].astype(xp.float32) if levels else None


def search(index: DeviceIndex, token: QueryToken, k: int = 1, mode: str = "levels"
           ) -> SearchResult:
    """Exact top-k of one query (positions best first, float64 scores)."""
    _check(index, token, k)
    if len(token) != 1:
        raise ValueError("search() takes one query; use search_batch() for several")
    if mode not in MODES:
        raise ValueError(f"unknown search mode {mode!r}: use one of {', '.join(MODES)}")
    start = time.perf_counter()
    query = _Query(index, token, 0)
    n = len(index)
    small = n <= max(SMALL, k)
    if mode == "f32" and index.full32 is not None and not small:
        result = _scan32(index, query, k, np.float32(-np.inf))
    elif mode == "levels" and index.first32 is not None and not small:
        result = _levels(index, query, k)
    else:
        result = _scan64(index, query, k)
    result.stats.milliseconds = (time.perf_counter() - start) * 1000.0
    return result


def _levels(index: DeviceIndex, query: _Query, k: int) -> SearchResult:
    xp, n = index.xp, len(index)
    assert index.first32 is not None
    first = index.first32 @ query.first32
    if k == 1:  # one launch: the best first-level row
        seeds = xp.argmax(first).reshape(1).astype(xp.int64)
    else:
        seeds = select.group_argmax(xp, first, max(SEED_GROUPS, k))
    seed_scores = select.to_host(xp, index.full[seeds] @ query.full)
    first[seeds] = -np.inf  # the seeds are scored: survivors are other rows
    threshold = float(np.partition(seed_scores, seed_scores.size - k)[seed_scores.size - k])
    survivors = xp.flatnonzero(first >= select.float32_floor(threshold - query.margins[0]))
    scored = [n] + [0] * len(index.levels)
    if survivors.size > SCAN_FRACTION * n and index.full32 is not None:
        # The seeds' k-th best float64 score is a valid floor for the scan (its rows'
        # float64 scores are among those the top k is chosen from).
        return _scan32(index, query, k, select.float32_floor(threshold), scored)
    if survivors.size > DIRECT_FRACTION * n:
        # Many survivors: the finer levels (fewer bytes a row) cut them down first.
        for level, (rows, token) in enumerate(zip(index.levels, query.levels, strict=True), 1):
            scored[level] = int(survivors.size)
            scores = rows[survivors] @ token
            survivors = survivors[scores >= threshold - query.margins[level]]
            if survivors.size == 0:
                break
    rows = xp.concatenate([seeds, survivors])  # distinct rows
    positions, scores = _scored_rows(index, query, rows, k)
    top, best = select.top_k(positions, scores, k)
    stats = SearchStats(n, scored, int(rows.size), 0.0)
    return SearchResult(top, best, stats)


def _scored_rows(index: DeviceIndex, query: _Query, rows: Array, k: int
                 ) -> tuple[np.ndarray, F64]:
    """Float64 scores of some distinct rows, brought to the host with their positions in
    one copy (positions below 2^53 are exact in float64). Many rows are first cut on the
    device to those reaching a value that k of them reach (the top k keeps all of them):
    sorting hundreds of thousands on the host cost milliseconds."""
    xp = index.xp
    scores = index.full[rows] @ query.full
    if rows.size > HOST_ROWS:
        keep = scores >= select.kth_lower(xp, scores, k)
        rows, scores = rows[keep], scores[keep]
    both = select.to_host(xp, xp.stack([rows.astype(xp.float64), scores]))
    return both[0].astype(np.int64), both[1]


def _scan32(index: DeviceIndex, query: _Query, k: int, floor: np.float32,
            scored: list[int] | None = None) -> SearchResult:
    """Every full ciphertext in float32 with its error bar, then float64 on the rows the
    bars cannot decide."""
    xp, n = index.xp, len(index)
    assert index.full32 is not None
    scores = index.full32 @ query.full.astype(xp.float32)
    per_norm = select.float32_ceil(select.float32_dot_error(index.widths[-1]) * query.full_norm)
    rows = select.candidates(xp, scores, index.full_norms32 * per_norm, k, xp.float32(floor))
    return _rescored(index, query, k, rows, scored or [n] + [0] * len(index.levels))


def _scan64(index: DeviceIndex, query: _Query, k: int) -> SearchResult:
    xp, n = index.xp, len(index)
    scores = index.full @ query.full
    bar = select.float64_dot_error(index.widths[-1]) * index.full_norm * query.full_norm
    rows = select.candidates(xp, scores, bar, k, xp.float64(-np.inf))
    return _rescored(index, query, k, rows, [n] + [0] * len(index.levels))


def _rescored(index: DeviceIndex, query: _Query, k: int, rows: Array,
              scored: list[int]) -> SearchResult:
    positions, scores = _scored_rows(index, query, rows, k)
    top, best = select.top_k(positions, scores, k)
    return SearchResult(top, best, SearchStats(len(index), scored, len(index), 0.0))


def search_batch(index: DeviceIndex, token: QueryToken, k: int = 1, mode: str = "f32"
                 ) -> list[SearchResult]:
    """Exact top-k of every query of a token: the full ciphertexts scanned as matrix
    products, a chunk of rows at a time, in float32 with error bars (``f32``) or in
    float64 (``f64``); then float64 on the (row, query) pairs the scan cannot decide.

    Scores come out (queries, rows), and only their maxima over blocks of BLOCK rows are
    reduced (along contiguous memory) and compared: a block's maximum minus the largest
    error bar in it is a value one of its rows reaches, its maximum plus that bar bounds
    all of them. Only the blocks that may hold a candidate are looked at row by row (as
    the CPU engine's batches do, cloud/search.py _block_maxima).
    """
    _check(index, token, k)
    if mode not in BATCH_MODES:
        raise ValueError(f"unknown batch mode {mode!r}: use one of {', '.join(BATCH_MODES)}")
    start = time.perf_counter()
    xp, n, queries = index.xp, len(index), len(token)
    if mode == "f32" and index.full32 is None:
        mode = "f64"
    tokens64 = xp.asarray(np.ascontiguousarray(token.full, dtype=np.float64))
    norms = np.linalg.norm(np.asarray(token.full, dtype=np.float64), axis=1)
    width = index.widths[-1]
    dtype: type[np.floating[Any]]
    if mode == "f32":
        assert index.full32 is not None
        rows_array, dtype = index.full32, np.float32
        per_norm = xp.asarray(np.array([select.float32_ceil(select.float32_dot_error(width) * t)
                                        for t in norms], dtype=np.float32))
    else:
        rows_array, dtype = index.full, np.float64
        per_norm = xp.asarray(select.float64_dot_error(width) * index.full_norm * norms)
    scan_tokens = tokens64.astype(dtype)  # (Q, width)
    floors = xp.full(queries, -np.inf, dtype=dtype)
    chunk = BATCH_CHUNK_BYTES // (np.dtype(dtype).itemsize * max(1, queries))
    chunk = max(BLOCK, chunk // BLOCK * BLOCK)
    offsets = xp.arange(BLOCK, dtype=xp.int64)
    found: list[tuple[Array, Array, Array]] = []
    for begin in range(0, n, chunk):
        end = min(n, begin + chunk)
        approx = scan_tokens @ rows_array[begin:end].T  # (Q, rows)
        maxima = _block_maxima(xp, approx)
        first_block = begin // BLOCK
        if mode == "f32":
            bars = per_norm[:, None] * index.block_norms32[None, first_block : first_block
                                                           + maxima.shape[1]]
        else:
            bars = per_norm[:, None]
        floors = xp.maximum(floors, select.kth_lower(xp, maxima - bars, k, axis=1))
        which, blocks = xp.nonzero(maxima + bars >= floors[:, None])
        if which.size == 0:
            continue
        local = blocks[:, None] * BLOCK + offsets[None, :]  # (pairs, BLOCK) rows of the chunk
        inside = local < (end - begin)
        local = xp.minimum(local, end - begin - 1)
        upper = approx[which[:, None], local]
        if mode == "f32":
            upper += per_norm[which][:, None] * index.full_norms32[begin + local]
        else:
            upper += per_norm[which][:, None]
        pair, column = xp.nonzero(inside & (upper >= floors[which][:, None]))
        found.append((begin + local[pair, column], which[pair], upper[pair, column]))
    if found:
        rows = xp.concatenate([f[0] for f in found])
        which = xp.concatenate([f[1] for f in found])
        upper = xp.concatenate([f[2] for f in found])
        keep = upper >= floors[which]
        rows, which = rows[keep], which[keep]
    else:  # pragma: no cover - the best row of every query always passes
        rows = which = xp.empty(0, dtype=xp.int64)
    exact = select.to_host(xp, xp.einsum("ij,ij->i", index.full[rows], tokens64[which]))
    rows_host, which_host = select.to_host(xp, rows), select.to_host(xp, which)
    shared_ms = (time.perf_counter() - start) * 1000.0 / max(1, queries)
    order = np.argsort(which_host, kind="stable")
    bounds = np.searchsorted(which_host[order], np.arange(queries + 1))
    results = []
    for qi in range(queries):
        mine = order[bounds[qi] : bounds[qi + 1]]
        top, best = select.top_k(rows_host[mine], exact[mine], k)
        stats = SearchStats(n, [n] + [0] * len(index.levels), n, shared_ms, batch=queries)
        results.append(SearchResult(top, best, stats))
    return results


def _block_maxima(xp: ModuleType, approx: Array) -> Array:
    """(Q, blocks) maxima of (Q, rows) scores over blocks of BLOCK rows (the last block
    may be partial)."""
    queries, rows = approx.shape
    whole = rows // BLOCK * BLOCK
    maxima = approx[:, :whole].reshape(queries, whole // BLOCK, BLOCK).max(axis=2)
    if whole < rows:
        maxima = xp.concatenate([maxima, approx[:, whole:].max(axis=1, keepdims=True)], axis=1)
    return maxima
