"""float64 scores of chosen rows, each a function of its row and the token alone.

Why not ``matrix[rows] @ token``: a BLAS matrix-vector product may sum a row in an order
that depends on the call (its kernels block rows and columns by the shapes they are
given, and may split a long product between threads), so the same row scored with
different companions differed in the last bits: measured here (OpenBLAS 0.3.31, 300
random subsets of 2,000 secure-kNN rows), up to 1.03e-12 of the score between two
calls. A secure-kNN score can be 1e6 times smaller than |row| |token| (the shares
cancel), so its relative error is that much larger than the product's. A batch and a
single query then named the same images with scores that differed (tests/test_service.py
saw 1.13e-12 relative, above its 1e-12 tolerance, once in about seven runs).

Here every row is summed in one fixed order: eight interleaved partial sums over the
columns (column j into partial j mod 8), added pairwise, then the columns beyond the
last multiple of eight in order. The kernel is compiled without fast-math, so the
compiler may not reorder or fuse these IEEE operations (vectorising the eight
independent partial sums across lanes keeps each one's order): the score of a row is
the same bits whichever rows share the call, whatever thread computes it. Its rounding
error is within the bound every order obeys (width u |row| |token|, to first order),
far inside the engine's margin (cloud/numerics.py). It also reads the chosen rows in
place instead of gathering a copy first (half the memory traffic), and releases the GIL,
so the engine's threads share long candidate lists.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from cloud.compiled import jit

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


def row_scores(matrix: F64, rows: I64, token: F64) -> F64:
    """``matrix[rows] @ token`` in float64, each row summed in the fixed order above."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out = np.empty(rows.size, dtype=np.float64)
    if rows.size:
        _kernel()(matrix, rows, np.ascontiguousarray(token, dtype=np.float64), out)
    return out


def into(matrix: F64, rows: I64, token: F64, out: F64) -> None:
    """row_scores written into ``out`` (a slice of a larger result, for threads)."""
    if rows.size:
        _kernel()(matrix, rows, token, out)


@functools.cache
def _kernel() -> Callable[..., None]:
    """Compiled on first use (numba caches it per machine), strict IEEE arithmetic."""

    def scores(matrix: F64, rows: I64, token: F64, out: F64) -> None:  # pragma: no cover
        width = matrix.shape[1]
        whole = width - width % 8
        for r in range(rows.shape[0]):
            i = rows[r]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
            for j in range(0, whole, 8):
                a0 += matrix[i, j] * token[j]
                a1 += matrix[i, j + 1] * token[j + 1]
                a2 += matrix[i, j + 2] * token[j + 2]
                a3 += matrix[i, j + 3] * token[j + 3]
                a4 += matrix[i, j + 4] * token[j + 4]
                a5 += matrix[i, j + 5] * token[j + 5]
                a6 += matrix[i, j + 6] * token[j + 6]
                a7 += matrix[i, j + 7] * token[j + 7]
            total = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
            for j in range(whole, width):
                total += matrix[i, j] * token[j]
            out[r] = total

    return jit(scores)
