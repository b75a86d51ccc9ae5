"""Eight-bit codes of the full ciphertexts, for the scans the bounds cannot prune.

When a query is far from everything (a fresh query, i.i.d. data) the bounds prune little
and every full ciphertext must be scored. Reading them in float32 costs 4 bytes per
column; the scan is bound by memory bandwidth, so reading one byte instead is what makes
it fast. Each row x is stored as codes c (uint8) with its own offset a and step b:

    x_j = a + b c_j + e_j,    |e| known exactly per row (computed when the codes are made),

so that for a token t,  t.x = a sum(t) + b (t.c) + t.e,  with  |t.e| <= |e| |t|.  The
float32 product t.c and the float32 arithmetic around it add a rounding error that is
bounded the same way (see _ROUNDING), and every bound is folded into one number per row,
its slack s: the exact score lies within s |t| of the estimate. The scan keeps, per
query, a lower bound L on the k-th best exact score (the k-th best of estimate - s|t|),
and returns the rows whose estimate + s|t| reaches L: a superset of the exact top k,
rescored in float64 by the caller. Nothing about exactness depends on how good the codes
are; coarse codes only return more candidates.

The offset, step and slack are computed from ciphertexts alone: like the row norms, they
tell the server nothing it could not compute itself.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]
F32 = NDArray[np.float32]
I64 = NDArray[np.int64]
U8 = NDArray[np.uint8]
CODE_MAX = 255
FLOAT32_UNIT = 2.0**-24
SCALE_COLUMNS = 3  # offset, step, slack
QUANTIZE_ROWS = 2048  # rows quantized at a time: the float64 temporaries stay in cache
# Converted to float32 a chunk at a time; the chunk (rows x width x 4 bytes) stays in the
# 2 MiB second-level cache of this machine's cores for widths up to about 500.
SCAN_BYTES = 1 << 20


@dataclass(frozen=True)
class RowCodes:
    """Codes (n, width) and per-row offset, step and slack of a set of full ciphertexts.

    The arrays may be views of larger arrays rows are appended to (cloud/repo_index.py);
    the per-row numbers are (n, 1) columns, each contiguous, so the scan reads them
    as vectors.
    """

    codes: U8
    offset: F32
    step: F32
    slack: F32

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @classmethod
    def of(cls, rows: F64) -> RowCodes:
        n = rows.shape[0]
        coded = cls(np.empty(rows.shape, dtype=np.uint8), *(
            np.empty((n, 1), dtype=np.float32) for _ in range(SCALE_COLUMNS)))
        quantize_rows(rows, coded)
        return coded


def quantize_rows(rows: F64, into: RowCodes, safety: float = 1e-10) -> None:
    """Fill ``into`` (as many rows as ``rows``) with the codes of float64 ``rows``.

    The slack bounds, per row and per unit of token norm: the coding residual |e|; the
    float32 rounding of the token, of t.c and of a sum(t) + b (t.c) (_ROUNDING); and
    ``safety`` |x|, the margin the search engine keeps for float64 rounding, so that the
    candidates include every row whose float64 score could be among the top k.
    """
    width = rows.shape[1]
    rounding = _ROUNDING(width)
    for start in range(0, rows.shape[0], QUANTIZE_ROWS):
        x = np.asarray(rows[start : start + QUANTIZE_ROWS], dtype=np.float64)
        low, high = x.min(axis=1), x.max(axis=1)
        offset = low.astype(np.float32)
        step = ((high - low) / CODE_MAX).astype(np.float32)
        step[~(step > 0)] = 1.0  # constant rows: every code 0, the residual is exact
        a, b = offset.astype(np.float64)[:, None], step.astype(np.float64)[:, None]
        c = np.rint((x - a) / b)
        np.clip(c, 0, CODE_MAX, out=c)
        residual = x - (a + b * c)
        residual_norm = np.sqrt(np.einsum("ij,ij->i", residual, residual))
        row_norm = np.sqrt(np.einsum("ij,ij->i", x, x))
        # |sum(t)| <= sqrt(width) |t|, and |t.c| <= |c| |t|.
        code_norm = np.sqrt(np.einsum("ij,ij->i", c, c))
        terms = np.abs(a[:, 0]) * math.sqrt(width) + b[:, 0] * code_norm
        slack = residual_norm + rounding * terms + safety * row_norm
        # Rounded up into float32 so that the stored slack is never below the bound.
        stored = slack.astype(np.float32)
        low_side = stored.astype(np.float64) < slack
        stored[low_side] = np.nextafter(stored[low_side], np.float32(np.inf))
        end = start + x.shape[0]
        into.codes[start:end] = c
        into.offset[start:end, 0], into.step[start:end, 0] = offset, step
        into.slack[start:end, 0] = stored


def _ROUNDING(width: int) -> float:
    """Relative rounding of the scan, per unit of |a| sqrt(width) + b |c|, times |t|.

    Rounding t to float32 (u), a float32 dot product of ``width`` exact integer codes in
    any order ((width + 1) u), sum(t) rounded to float32 and the estimate
    a sum(t) + b (t.c) in float32 (4 u), then adding and subtracting the slack (2 u), all
    to first order (|x| <= |a| sqrt(width) + b |c| + |e| bounds every intermediate); the
    factor 4 absorbs the second-order terms, as for the engine's own float32 bound.
    """
    return 4.0 * (width + 8) * FLOAT32_UNIT


def chunk_rows(width: int) -> int:
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
         spans: list[Span] | None = None, mapper: Mapper = _in_order) -> Candidates:
    """Rows whose exact score may reach each query's k-th best.

    ``floors`` are known lower bounds on the k-th best exact score (-inf when none):
    rows that cannot reach them are dropped at once. The rows are scanned in ``spans``
    (all of them by default), which ``mapper`` may hand to threads.
    """
    n = len(coded)
    scaled, sums, norms = _prepared(tokens)
    queries = scaled.shape[1]
    # Lower bounds are compared with float32 estimates: one step down keeps them valid.
    start_floor = _down32(np.asarray(floors, dtype=np.float64))

    def part(span: Span) -> Part:
        if queries == 1:
            return _part_one(coded, span, k, scaled[:, 0], sums[0], norms[0], start_floor)
        return _part_many(coded, span, k, scaled, sums, norms, start_floor)

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


def _part_one(coded: RowCodes, span: Span, k: int, token: F32, token_sum: np.float32,
              token_norm: np.float32, start_floor: F32) -> Part:
    """One query: a compiled loop reads each row's codes once (memory-bound, a quarter
    of the bytes of a float32 scan), then the candidates are picked in one pass."""
    begin, end = span
    upper = np.empty(end - begin, dtype=np.float32)
    lower = np.empty(end - begin, dtype=np.float32)
    _kernel()(coded.codes[begin:end], token, coded.offset[begin:end], coded.step[begin:end],
              coded.slack[begin:end], token_sum, token_norm, upper, lower)
    floor = start_floor.copy()
    if upper.size >= k:
        np.maximum(floor, _kth_lower(lower[:, None], k), out=floor)
    hits = np.flatnonzero(upper >= floor[0])
    found: Found = [(hits + begin, np.zeros(hits.size, dtype=np.int64), lower[hits], upper[hits])]
    return floor, found


def _part_many(coded: RowCodes, span: Span, k: int, scaled: F32, sums: F32, norms: F32,
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
        lower, upper = _chunk_bounds(coded, first, buffer[:count], scaled, sums, norms)
        if count >= k:
            np.maximum(floor, _kth_lower(lower, k), out=floor)
        hit_rows, hit_queries = np.nonzero(upper >= floor)
        if hit_rows.size:
            found.append((hit_rows + first, hit_queries, lower[hit_rows, hit_queries],
                          upper[hit_rows, hit_queries]))
    return floor, found


def _chunk_bounds(coded: RowCodes, first: int, buffer: F32, scaled: F32, sums: F32,
                  norms: F32) -> tuple[F32, F32]:
    """(rows, Q) lower and upper bounds on the exact scores of the rows from ``first``."""
    rows = slice(first, first + buffer.shape[0])
    np.copyto(buffer, coded.codes[rows])
    upper: F32 = buffer @ scaled  # t.c
    upper *= coded.step[rows]
    upper += coded.offset[rows] * sums  # the estimate
    slack = coded.slack[rows] * norms
    upper += slack
    lower: F32 = upper - 2 * slack  # rounding of both: in _ROUNDING
    return lower, upper


def bounds(coded: RowCodes, tokens: F64) -> tuple[F32, F32]:
    """(n, Q) lower and upper bounds on every exact score, as the scan computes them
    (one query: the compiled loop; several: the matrix products). For tests."""
    scaled, sums, norms = _prepared(tokens)
    n, queries = len(coded), scaled.shape[1]
    if queries == 1:
        upper = np.empty(n, dtype=np.float32)
        lower = np.empty(n, dtype=np.float32)
        _kernel()(coded.codes, scaled[:, 0], coded.offset, coded.step, coded.slack,
                  sums[0], norms[0], upper, lower)
        return lower[:, None], upper[:, None]
    chunk = chunk_rows(coded.codes.shape[1])
    buffer = np.empty((chunk, coded.codes.shape[1]), dtype=np.float32)
    parts = [_chunk_bounds(coded, first, buffer[: min(chunk, n - first)], scaled, sums, norms)
             for first in range(0, n, chunk)]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _prepared(tokens: F64) -> tuple[F32, F32, F32]:
    """The tokens as the scan uses them: (width, Q) float32, their sums and norms."""
    t = np.atleast_2d(np.asarray(tokens, dtype=np.float64))
    scaled = np.ascontiguousarray(t.T.astype(np.float32))
    sums = t.sum(axis=1).astype(np.float32)
    # Rounded up, with room for the rounding of slack x norm in float32.
    norms = (np.linalg.norm(t, axis=1) * (1.0 + 2.0**-20)).astype(np.float32)
    return scaled, sums, norms


@functools.cache
def _kernel() -> Callable[..., None]:
    """Compiled on first use (about 0.3 s), not on import: the client never scans."""
    import numba

    # reassoc and contract let the compiler vectorise the sum (any order, fused
    # multiply-adds): the rounding bound in _ROUNDING holds for every order.
    @numba.njit(nogil=True, fastmath={"reassoc", "contract"}, boundscheck=False)
    def bounds_one(codes: U8, token: F32, offset: F32, step: F32, slack: F32,
                   token_sum: np.float32, token_norm: np.float32, upper: F32,
                   lower: F32) -> None:  # pragma: no cover - compiled
        rows, width = codes.shape
        for i in range(rows):
            acc = np.float32(0.0)
            for j in range(width):
                acc += np.float32(codes[i, j]) * token[j]
            estimate = offset[i, 0] * token_sum + step[i, 0] * acc
            margin = slack[i, 0] * token_norm
            upper[i] = estimate + margin
            lower[i] = estimate - margin

    return bounds_one


def _kth_lower(lower: F32, k: int) -> F32:
    """Per column, a value that at least k rows reach: the maximum for k = 1; for
    larger k the least of the maxima of k disjoint groups of rows (a full selection
    per chunk would cost more than the scan)."""
    if k == 1:
        result: F32 = lower.max(axis=0)
        return result
    groups = lower.shape[0] // k
    result = lower[: groups * k].reshape(groups, k, -1).max(axis=0).min(axis=0)
    return result


def _down32(values: F64) -> F32:
    """The largest float32 values <= ``values`` (-inf stays -inf)."""
    rounded = values.astype(np.float32)
    above = rounded.astype(np.float64) > values
    rounded[above] = np.nextafter(rounded[above], np.float32(-np.inf))
    return rounded
