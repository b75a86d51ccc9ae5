"""Lower bounds on squared Euclidean distance that the server can evaluate encrypted.

For any m x d matrix B with orthonormal rows,

    ||p - q||^2 >= ||Bp - Bq||^2 + (rho_p - rho_q)^2,   rho_x = ||x - B^T B x||,

because the residuals' difference is at least the difference of their norms (reverse
triangle inequality) and the two parts are orthogonal. The bound vector
b(x) = (Bx, rho_x) has ||b(x)||^2 = ||x||^2, so the bound is itself a squared distance
with the same norms and can be scored by the same secure-kNN query trick (DESIGN.md §4).

With B = the constant direction 1/sqrt(d) alone (m = 1) this is the mean/std bound of
Hwang and Ahn ("MS-distance", used by FNNS): d((mu_p-mu_q)^2 + (sigma_p-sigma_q)^2).
Further rows are principal components of the repository's own features, which is what
makes the bound tight on real data; exactness never depends on B, only pruning does.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]


def constant_direction(dim: int) -> F64:
    return np.full(dim, 1.0 / np.sqrt(dim))


def fit_basis(sample: F64 | None, dim: int, rows: int) -> F64:
    """Orthonormal (rows x dim) basis: the constant direction, then principal components.

    ``sample`` is a set of the repository's plaintext features (on the owner's machine);
    without one, or when it has too little variance, the remaining rows are filled with
    an orthonormal completion so the basis is always valid.
    """
    if not 1 <= rows <= dim:
        raise ValueError(f"a bound basis needs 1..{dim} rows, got {rows}")
    u = constant_direction(dim)
    columns = [u[:, None]]
    if sample is not None and rows > 1:
        x = np.atleast_2d(np.asarray(sample, dtype=np.float64))
        if x.shape[1] != dim:
            raise ValueError(f"sample has dimension {x.shape[1]}, expected {dim}")
        centred = x - x.mean(axis=0)
        centred -= np.outer(centred @ u, u)
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        useful = vt[singular > 1e-9 * max(float(singular[0]), 1e-300)] if singular.size else vt
        columns.append(useful[: rows - 1].T)
    stacked = np.hstack([*columns, np.eye(dim)])
    basis = _orthonormal_prefix(stacked, rows)
    basis[0] = u  # exactly the constant direction, as the first candidate it is kept as is
    return basis


def _orthonormal_prefix(candidates: F64, rows: int) -> F64:
    """First ``rows`` orthonormal directions of the columns, skipping dependent ones."""
    dim = candidates.shape[0]
    chosen: list[F64] = []
    for column in candidates.T:
        v = column.copy()
        for _ in range(2):  # twice is enough for Gram-Schmidt to be orthogonal to rounding
            for w in chosen:
                v -= (w @ v) * w
        norm = float(np.linalg.norm(v))
        if norm > 1e-8 * max(1.0, float(np.linalg.norm(column))):
            chosen.append(v / norm)
        if len(chosen) == rows:
            break
    if len(chosen) < rows:
        raise ValueError(f"could not complete a {rows} x {dim} orthonormal basis")
    return np.array(chosen)


def bound_vectors(vectors: F64, basis: F64) -> F64:
    """b(x) = (Bx, ||x - B^T B x||) for each row x; shape (n, rows + 1)."""
    x = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    projected = x @ basis.T
    residual_sq = np.einsum("ij,ij->i", x, x) - np.einsum("ij,ij->i", projected, projected)
    rho = np.sqrt(np.maximum(residual_sq, 0.0))
    return np.hstack([projected, rho[:, None]])


def bound_sq_distance(p: F64, q: F64, basis: F64) -> F64:
    """Plaintext lower bound of ||p - q||^2 (for tests and for measuring tightness)."""
    bp, bq = bound_vectors(p, basis), bound_vectors(q, basis)
    diff = bp - bq
    result: F64 = np.einsum("ij,ij->i", diff, diff)
    return result


def ms_distance_bound(p: F64, q: F64) -> F64:
    """Hwang and Ahn's bound d((mu_p - mu_q)^2 + (sigma_p - sigma_q)^2), per row."""
    p2, q2 = np.atleast_2d(p), np.atleast_2d(q)
    dim = p2.shape[1]
    spread = (p2.mean(axis=1) - q2.mean(axis=1)) ** 2 + (p2.std(axis=1) - q2.std(axis=1)) ** 2
    result: F64 = dim * spread
    return result
