"""Sixteen-bit codes of the full ciphertexts, for the scans the bounds cannot prune.

When a query is far from everything (a fresh query, i.i.d. data) the bounds prune little
and every full ciphertext must be scored. The scan is bound by memory bandwidth, so it
reads two bytes per column instead of the four of float32 (or eight of float64). Each
row x is stored as codes c (uint16) with its own offset a and step b:

    x_j = a + b c_j + e_j,    |e| known exactly per row (computed when the codes are made),

so that for a token t,  t.x = a sum(t) + b (t.c) + t.e,  with  |t.e| <= |e| |t|.  The
arithmetic of the estimate a sum(t) + b (t.c) adds a rounding error bounded by
rho (|a| sqrt(width) + b |c|) |t|, rho depending on the precision the scan computes in
(_rounding). So the exact score lies within (slack + rho size) |t| of the estimate, with
the per-row slack = |e| (+ the engine's float64 margin) and size = |a| sqrt(width) + b |c|
stored with the codes. The scan keeps, per query, a lower bound L on the k-th best exact
score (the k-th best of the lower bounds) and returns the rows whose upper bound reaches
L: a superset of the exact top k, rescored in float64 by the caller. Exactness never
depends on how good the codes are; coarse codes only return more candidates.

Why sixteen bits: a ciphertext's entries are dominated by its random shares, which
cancel only in the product with a token, so the scores of near-identical images differ
by about 1e-3 |x| |t|. Eight-bit codes (|e| about 7e-3 |x|) let 5-30% of a million
realistic vectors through; sixteen-bit ones about 3e-5 |x|.

The offset, step, slack and size are computed from ciphertexts alone: like the row
norms, they tell the server nothing it could not compute itself.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cloud.compiled import jit
from cloud.numerics import FLOAT32_UNIT, FLOAT64_UNIT, SAFETY_EPS

F64 = NDArray[np.float64]
F32 = NDArray[np.float32]
I64 = NDArray[np.int64]
Codes = NDArray[np.uint16]
CODE_MAX = 65535
SCALE_COLUMNS = 4  # offset, step, slack, size
# Converted to float32 a chunk at a time; the chunk (rows x width x 4 bytes) stays in the
# 2 MiB second-level cache of this machine's cores for widths up to about 500.
SCAN_BYTES = 1 << 20


@dataclass(frozen=True)
class RowCodes:
    """Codes (n, width) and per-row offset, step, slack and size of full ciphertexts.

    The arrays may be views of larger arrays rows are appended to (cloud/repo_index.py);
    the per-row numbers are (n, 1) columns, each contiguous, so the scan reads them
    as vectors.
    """

    codes: Codes
    offset: F32
    step: F32
    slack: F32
    size: F32

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @classmethod
    def of(cls, rows: F64) -> RowCodes:
        n = rows.shape[0]
        coded = cls(np.empty(rows.shape, dtype=np.uint16), *(
            np.empty((n, 1), dtype=np.float32) for _ in range(SCALE_COLUMNS)))
        quantize_rows(rows, coded)
        return coded


def quantize_rows(rows: F64, into: RowCodes, safety: float = SAFETY_EPS) -> None:
    """Fill ``into`` (as many rows as ``rows``) with the codes of float64 ``rows``.

    The slack is the coding residual |e| plus ``safety`` |x|, the margin the search
    engine keeps for float64 rounding, so that the candidates include every row whose
    float64 score could be among the top k (|x| <= size + |e|, by the triangle
    inequality). Slack and size are rounded up into float32. One compiled pass per row
    (the service quantizes while it loads, in several threads).
    """
    x = np.ascontiguousarray(rows, dtype=np.float64)
    _quantizer()(x, into.codes, into.offset, into.step, into.slack, into.size, safety,
                 math.sqrt(x.shape[1]))


def _up32(values: F64) -> F32:
    """The smallest float32 values >= ``values``."""
    rounded = values.astype(np.float32)
    below = rounded.astype(np.float64) < values
    rounded[below] = np.nextafter(rounded[below], np.float32(np.inf))
    return rounded


def _rounding(width: int, unit: float) -> float:
    """Rounding of the scan's arithmetic, per unit of size |t|, at precision ``unit``.

    Rounding t (u), a dot product of ``width`` exact integer codes in any order
    ((width + 1) u), sum(t) and the estimate a sum(t) + b (t.c) (4 u), then adding and
    subtracting the margin (2 u), all to first order (size + |e| bounds every
    intermediate); the factor 4 absorbs the second-order terms and the rounding of the
    margin itself, as for the engine's own float32 bound.
    """
    return 4.0 * (width + 8) * unit


def chunk_rows(width: int) -> int:
    """Rows converted to float32 at a time by the scan of several queries."""
    return max(64, SCAN_BYTES // (4 * max(1, width)))


@dataclass
class Candidates:
    """Per query, rows that may be in its top k, and a lower bound on its k-th best score."""

    rows: list[I64]
    kth_lower: F64


Span = tuple[int, int]
Found = list[tuple[I64, I64, F32, F32]]  # rows, queries, lower and upper bounds
Part = tuple[F32, Found]
Mapper = Callable[[Callable[[Span], Part], list[Span]], list[Part]]


def _in_order(fn: Callable[[Span], Part], spans: list[Span]) -> list[Part]:
    return [fn(span) for span in spans]


def scan(coded: RowCodes, tokens: F64, k: int, floors: F64,
         spans: list[Span] | None = None, mapper: Mapper = _in_order,
         rows: I64 | None = None) -> Candidates:
    """Rows whose exact score may reach each query's k-th best.

    ``floors`` are known lower bounds on the k-th best exact score (-inf when none):
    rows that cannot reach them are dropped at once. The rows are scanned in ``spans``
    (all of them by default), which ``mapper`` may hand to threads. With ``rows`` (one
    query only), only those rows are scanned, read where they are (a keyword filter's
    rows: copying a quarter of a million rows' codes first cost more than scanning
    them), and ``spans`` share the list of rows, not the index.
    """
    t = np.atleast_2d(np.asarray(tokens, dtype=np.float64))
    queries = t.shape[0]
    if rows is not None and queries != 1:
        raise ValueError("a scan of chosen rows takes one query")
    chosen = rows
    n = len(coded) if chosen is None else int(chosen.size)
    # Lower bounds are compared with float32 estimates: one step down keeps them valid.
    start_floor = _down32(np.asarray(floors, dtype=np.float64))
    prepared = _prepared(t)

    def part(span: Span) -> Part:
        if queries == 1:
            return _part_one(coded, span, k, t[0], start_floor, chosen)
        return _part_many(coded, span, k, prepared, start_floor)

    parts = mapper(part, spans if spans is not None else [(0, n)])
    floor = start_floor.copy()
    for part_floor, _ in parts:
        np.maximum(floor, part_floor, out=floor)
    flat = [item for _, found in parts for item in found]
    if not flat:
        return Candidates([np.empty(0, dtype=np.int64) for _ in range(queries)],
                          floor.astype(np.float64))
    rows = np.concatenate([f[0] for f in flat])
    which = np.concatenate([f[1] for f in flat])
    lower = np.concatenate([f[2] for f in flat])
    upper = np.concatenate([f[3] for f in flat])
    # The k-th best lower bound over all rows is among the candidates: every row dropped
    # had an upper bound below a floor that never exceeds it.
    order = np.argsort(which, kind="stable")
    rows, which, lower, upper = rows[order], which[order], lower[order], upper[order]
    bounds = np.searchsorted(which, np.arange(queries + 1))
    result = []
    for q in range(queries):
        lo, hi = bounds[q], bounds[q + 1]
        q_lower, q_upper = lower[lo:hi], upper[lo:hi]
        if q_lower.size >= k:
            kth = np.partition(q_lower, q_lower.size - k)[q_lower.size - k]
            floor[q] = max(floor[q], kth)
        result.append(rows[lo:hi][q_upper >= floor[q]].astype(np.int64))
    return Candidates(result, floor.astype(np.float64))


def _part_one(coded: RowCodes, span: Span, k: int, token: F64, start_floor: F32,
              rows: I64 | None = None) -> Part:
    """One query: a compiled loop reads each row's codes once, in float64 (memory-bound:
    the arithmetic is free, and its rounding negligible), then the candidates are
    picked in one pass. ``rows``: the span is of this list of rows, not of the index."""
    begin, end = span
    if rows is None:
        lower, upper = _bounds_one(coded, begin, end, token)
    else:
        lower, upper = _bounds_rows(coded, rows[begin:end], token)
    floor = start_floor.copy()
    if upper.size >= k:
        np.maximum(floor, _down32(np.asarray(_kth_lower(lower[:, None], k), np.float64)),
                   out=floor)
    hits = np.flatnonzero(upper >= floor[0])
    found: Found = [(hits + begin if rows is None else rows[begin:end][hits],
                     np.zeros(hits.size, dtype=np.int64),
                     _down32(lower[hits]), _up32(upper[hits]))]
    return floor, found


def _bounds_one(coded: RowCodes, begin: int, end: int, token: F64) -> tuple[F64, F64]:
    return _bounds(coded, _NO_ROWS, begin, end - begin, token)


def _bounds_rows(coded: RowCodes, rows: I64, token: F64) -> tuple[F64, F64]:
    """As _bounds_one, of the chosen rows (each read in place)."""
    return _bounds(coded, np.ascontiguousarray(rows, dtype=np.int64), 0, int(rows.size), token)


_NO_ROWS = np.zeros(0, dtype=np.int64)


def _bounds(coded: RowCodes, rows: I64, first: int, count: int, token: F64
            ) -> tuple[F64, F64]:
    lower = np.empty(count)
    upper = np.empty(count)
    if count:
        _kernel()(coded.codes, rows, first, token, coded.offset, coded.step, coded.slack,
                  coded.size, float(token.sum()), float(np.linalg.norm(token)) * (1.0 + 1e-12),
                  _rounding(coded.codes.shape[1], FLOAT64_UNIT), upper, lower)
    return lower, upper


Prepared = tuple[F32, F32, F32, float]  # tokens (width, Q), sums, norms, rounding


def _part_many(coded: RowCodes, span: Span, k: int, prepared: Prepared,
               start_floor: F32) -> Part:
    """Several queries: a chunk of codes at a time is converted to float32 (in cache)
    and scored for all of them by one matrix product, which is compute-bound: the
    conversion is shared by the queries."""
    begin, end = span
    chunk = chunk_rows(coded.codes.shape[1])
    floor = start_floor.copy()
    buffer = np.empty((chunk, coded.codes.shape[1]), dtype=np.float32)
    found: Found = []
    for first in range(begin, end, chunk):
        count = min(chunk, end - first)
        lower, upper = _chunk_bounds(coded, first, buffer[:count], prepared)
        if count >= k:
            np.maximum(floor, _kth_lower(lower, k), out=floor)
        hit_rows, hit_queries = np.nonzero(upper >= floor)
        if hit_rows.size:
            found.append((hit_rows + first, hit_queries, lower[hit_rows, hit_queries],
                          upper[hit_rows, hit_queries]))
    return floor, found


def _chunk_bounds(coded: RowCodes, first: int, buffer: F32, prepared: Prepared
                  ) -> tuple[F32, F32]:
    """(rows, Q) lower and upper bounds on the exact scores of the rows from ``first``."""
    scaled, sums, norms, rounding = prepared
    rows = slice(first, first + buffer.shape[0])
    np.copyto(buffer, coded.codes[rows])  # sixteen-bit integers: exact in float32
    upper: F32 = buffer @ scaled  # t.c
    upper *= coded.step[rows]
    upper += coded.offset[rows] * sums  # the estimate
    margin = (coded.slack[rows] + np.float32(rounding) * coded.size[rows]) * norms
    upper += margin
    lower: F32 = upper - 2 * margin
    return lower, upper


def bounds(coded: RowCodes, tokens: F64) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    """(n, Q) lower and upper bounds on every exact score, as the scan computes them
    (one query: the compiled loop; several: the matrix products). For tests."""
    t = np.atleast_2d(np.asarray(tokens, dtype=np.float64))
    n = len(coded)
    if t.shape[0] == 1:
        lower, upper = _bounds_one(coded, 0, n, t[0])
        return lower[:, None], upper[:, None]
    prepared = _prepared(t)
    chunk = chunk_rows(coded.codes.shape[1])
    buffer = np.empty((chunk, coded.codes.shape[1]), dtype=np.float32)
    parts = [_chunk_bounds(coded, first, buffer[: min(chunk, n - first)], prepared)
             for first in range(0, n, chunk)]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _prepared(t: F64) -> Prepared:
    """The tokens as the float32 scan uses them: (width, Q), their sums and norms (rounded
    up, with room for the float32 rounding of margin x norm), and its rounding factor."""
    scaled = np.ascontiguousarray(t.T.astype(np.float32))
    sums = t.sum(axis=1).astype(np.float32)
    norms = (np.linalg.norm(t, axis=1) * (1.0 + 2.0**-20)).astype(np.float32)
    return scaled, sums, norms, _rounding(t.shape[1], FLOAT32_UNIT)


@functools.cache
def warm_up() -> threading.Thread:
    """Compile (about 0.5 s) or load from numba's cache the one-query scan, the float64
    rescoring (cloud/rescore.py) and the keyword lookup's loops (cloud/keyword_kernels.py),
    in the background, so that neither a load nor the first query after it waits for
    them."""

    def compile_now() -> None:
        from cloud import keyword_kernels, rescore  # on first use, as the engine does

        tiny = RowCodes.of(np.zeros((1, 2)))  # the quantizer
        _bounds_one(tiny, 0, 1, np.zeros(2))  # and the scan
        rescore.row_scores(np.zeros((1, 2)), np.zeros(1, dtype=np.int64), np.zeros(2))
        keyword_kernels.compile_now()

    thread = threading.Thread(target=compile_now, name="radcrypt-compile", daemon=True)
    thread.start()
    return thread


@functools.cache
def _kernel() -> Callable[..., None]:
    """Made on first use, not on import: the client never scans. One loop for both
    scans: ``rows`` empty, the rows from ``first`` on, as many as ``upper`` holds
    (contiguous reads); otherwise those rows, each read where it is."""

    def bounds(codes: Codes, rows: I64, first: int, token: F64, offset: F32, step: F32,
               slack: F32, size: F32, token_sum: float, token_norm: float, rounding: float,
               upper: F64, lower: F64) -> None:  # pragma: no cover - compiled
        width = codes.shape[1]
        chosen = rows.shape[0] > 0
        for i in range(upper.shape[0]):
            r = rows[i] if chosen else first + i
            acc = 0.0
            for j in range(width):
                acc += np.float64(codes[r, j]) * token[j]
            estimate = np.float64(offset[r, 0]) * token_sum + np.float64(step[r, 0]) * acc
            margin = (np.float64(slack[r, 0]) + rounding * np.float64(size[r, 0])) * token_norm
            upper[i] = estimate + margin
            lower[i] = estimate - margin

    # reassoc and contract let the compiler vectorise the sum (any order, fused
    # multiply-adds): the rounding bound of _rounding holds for every order.
    return jit(bounds, {"reassoc", "contract"})


@functools.cache
def _quantizer() -> Callable[..., None]:
    """The codes of rows, in strict IEEE arithmetic (no fastmath)."""
    code_max = float(CODE_MAX)
    up = 1.0 + 2.0**-22  # float32(v * up) >= v: a float32 conversion errs by 2^-24 at most

    def quantize(x: F64, codes: Codes, offset: F32, step: F32, slack: F32, size: F32,
                 safety: float, sqrt_width: float) -> None:  # pragma: no cover - compiled
        rows, width = x.shape
        for i in range(rows):
            low = x[i, 0]
            high = x[i, 0]
            for j in range(width):
                low = min(low, x[i, j])
                high = max(high, x[i, j])
            a32 = np.float32(low)
            b32 = np.float32((high - low) / code_max)
            if not b32 > 0:
                b32 = np.float32(1.0)  # constant rows: every code 0, the residual is exact
            a, b = np.float64(a32), np.float64(b32)
            residual_sq = 0.0
            code_sq = 0.0
            for j in range(width):
                c = min(max(np.rint((x[i, j] - a) / b), 0.0), code_max)
                codes[i, j] = np.uint16(c)
                e = x[i, j] - (a + b * c)
                residual_sq += e * e
                code_sq += c * c
            residual = np.sqrt(residual_sq)
            # |sum(t)| <= sqrt(width) |t| and |t.c| <= |c| |t|: the estimate's magnitude.
            magnitude = abs(a) * sqrt_width + b * np.sqrt(code_sq)
            offset[i, 0] = a32
            step[i, 0] = b32
            slack[i, 0] = np.float32((residual + safety * (magnitude + residual)) * up)
            size[i, 0] = np.float32(magnitude * up)

    return jit(quantize)


def _kth_lower(lower: NDArray[np.floating], k: int) -> NDArray[np.floating]:
    """Per column, a value that at least k rows reach: the maximum for k = 1; for
    larger k the least of the maxima of k disjoint groups of rows (a full selection
    per chunk would cost more than the scan)."""
    if k == 1:
        return lower.max(axis=0)  # type: ignore[no-any-return]
    groups = lower.shape[0] // k
    maxima = lower[: groups * k].reshape(groups, k, -1).max(axis=0)
    return maxima.min(axis=0)  # type: ignore[no-any-return]


def _down32(values: F64) -> F32:
    """The largest float32 values <= ``values`` (-inf stays -inf)."""
    rounded = values.astype(np.float32)
    above = rounded.astype(np.float64) > values
    rounded[above] = np.nextafter(rounded[above], np.float32(-np.inf))
    return rounded
