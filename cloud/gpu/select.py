"""Exact top-k from approximate scores with proven error bars, for any array module.

Every scan of the GPU backend computes, for each row, an approximate score s~ and an
error bound e with |s~ - s| <= e, where s is the exact score and e also exceeds the
rounding of the float64 score that the final ranking computes (SAFETY_EPS, as the CPU
engine's margins). The exact score then lies in [s~ - e, s~ + e]. A value that at least
k rows' lower ends reach is a lower bound L on the k-th best score, so a row whose upper
end is below L cannot be in the top k. The rows that remain are rescored in float64 and
ranked; how good the approximation is decides only how many remain, never the answer.

The functions take the array module ``xp`` (numpy on the CPU, cupy on a GPU) and
never move data between host and device themselves, except where a name says so
(``to_host``): the same code runs in CI on numpy and on the GPU machine on cupy.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloud.numerics import FLOAT32_UNIT, SAFETY_EPS

I64 = NDArray[np.int64]
F64 = NDArray[np.float64]
Array = Any  # numpy.ndarray or cupy.ndarray


def float32_dot_error(width: int) -> float:
    """Per unit of |row| |token|: a bound on |float32 score - exact score|, plus SAFETY_EPS.

    Rounding the row and the token to float32 (2u), a float32 dot product of ``width``
    terms in any order, fused or not (width u), then adding or subtracting the error
    bar in float32 and rounding the bar itself (4u), all to first order; the factor 4
    absorbs the second-order terms (as cloud/codes.py's _rounding). SAFETY_EPS covers
    the float64 rescoring, as in the CPU engine.
    """
    return 4.0 * (width + 8) * FLOAT32_UNIT + SAFETY_EPS


def float64_dot_error(width: int) -> float:
    """Per unit of |row| |token|, for scans in float64: the engine's SAFETY_EPS, which is
    two orders of magnitude above the rounding of a float64 dot product of ``width``
    terms (width x 2^-53 is 3e-14 at width 274)."""
    assert width * 2.0**-53 * 100 <= SAFETY_EPS, "SAFETY_EPS too small for this width"
    return SAFETY_EPS


def float32_floor(value: float) -> np.float32:
    """The largest float32 <= value: float32 scores compared with it never drop a row
    that the float64 threshold keeps."""
    rounded = np.float32(value)
    if float(rounded) > value:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return rounded


def float32_ceil(value: float) -> np.float32:
    """The smallest float32 >= value (error bars rounded up stay bars)."""
    rounded = np.float32(value)
    if float(rounded) < value:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return rounded


def norms_up32(xp: ModuleType, rows: Array) -> Array:
    """Row norms of a float64 array, rounded up into float32 (one value per row).

    The float64 norm's own rounding (a few units of 2^-53) is far inside the factor 4
    of the error bars it multiplies.
    """
    norms = xp.sqrt(xp.einsum("ij,ij->i", rows, rows))
    rounded = norms.astype(xp.float32)
    below = rounded.astype(xp.float64) < norms
    return xp.where(below, xp.nextafter(rounded, xp.float32(np.inf)), rounded)


def kth_lower(xp: ModuleType, lower: Array, k: int, axis: int = 0) -> Array:
    """Along ``axis`` (0: rows down the columns of a (rows, Q) array or of a 1-D array;
    1: along the rows of a (Q, rows) array), a value that at least k entries reach.

    k = 1: the maximum. Larger k: the least of the maxima of k disjoint groups of
    entries (cheap, and never above the true k-th largest). -inf where there are fewer
    than k. Reducing along the contiguous axis (axis=1 of a (Q, rows) array) is what a
    GPU does fast: a reduction down strided columns took ~25 ms for 1M x 64 on an H200.
    """
    count = lower.shape[axis]
    if count < k:
        shape = lower.shape[1:] if axis == 0 else lower.shape[:1]
        return xp.full(shape, -np.inf, dtype=lower.dtype)
    if k == 1:
        return lower.max(axis=axis)
    groups = count // k
    if axis == 0:
        return lower[: groups * k].reshape(k, groups, *lower.shape[1:]).max(axis=1).min(axis=0)
    return lower[:, : groups * k].reshape(lower.shape[0], k, groups).max(axis=2).min(axis=1)


def group_argmax(xp: ModuleType, scores: Array, groups: int) -> Array:
    """One row per group of consecutive rows, the group's best (int64, distinct rows):
    seeds whose exact scores give the threshold a start. The overall best is among them;
    the rows that do not fill a whole group are all included."""
    n = scores.shape[0]
    size = n // groups
    if size == 0:
        return xp.arange(n, dtype=xp.int64)
    best = scores[: groups * size].reshape(groups, size).argmax(axis=1).astype(xp.int64)
    best += xp.arange(groups, dtype=xp.int64) * size
    tail = xp.arange(groups * size, n, dtype=xp.int64)
    return xp.concatenate([best, tail]) if tail.size else best


def candidates(xp: ModuleType, approx: Array, bars: Array, k: int, floor: Array) -> Array:
    """Rows (int64, ascending) of a 1-D scan that may be among the top k.

    ``bars``: each row's error bar (an array, or a scalar for all rows); ``floor``: a
    known lower bound on the k-th best exact score (a scalar of approx's dtype; -inf when
    none). Rows whose upper end is below max(floor, k-th best lower end) are dropped.
    """
    upper = approx + bars
    bound = xp.maximum(kth_lower(xp, approx - bars, k), floor)
    return xp.flatnonzero(upper >= bound).astype(xp.int64)


def chunk_pairs(xp: ModuleType, approx: Array, bars: Array, k: int, floors: Array
                ) -> tuple[Array, Array, Array, Array]:
    """One chunk of a batched scan: (rows, queries, upper ends) of the (query, row)
    pairs that may be in that query's top k, and the queries' raised floors.

    ``approx``: (Q, rows) scores, overwritten with their upper ends; ``bars``: (Q, rows)
    or broadcastable error bars; ``floors``: (Q,) lower bounds on each query's k-th best
    exact score, from the chunks before. A pair kept here may still fall below a floor
    that later chunks raise: the caller filters the pairs once more at the end.
    """
    lower = approx - bars
    raised = xp.maximum(floors, kth_lower(xp, lower, k, axis=1))
    del lower
    approx += bars
    queries, rows = xp.nonzero(approx >= raised[:, None])
    return rows.astype(xp.int64), queries.astype(xp.int64), approx[queries, rows], raised


def top_k(positions: I64, scores: F64, k: int) -> tuple[I64, F64]:
    """The k best (highest score, then lowest position) of host arrays, best first: the
    CPU engine's ranking, so both backends order ties alike."""
    positions = np.asarray(positions, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    unique, first = np.unique(positions, return_index=True)
    positions, scores = unique, scores[first]
    order = np.lexsort((positions, -scores))[:k]
    return positions[order], scores[order]


def to_host(xp: ModuleType, array: Array) -> np.ndarray:
    """A host (numpy) copy or view of ``array``."""
    if xp is np:
        return np.asarray(array)
    return xp.asnumpy(array)  # type: ignore[no-any-return]
