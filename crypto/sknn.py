"""Secure-kNN encryption (ASPE, Wong et al. 2009) with random splitting.

A stored vector p in R^d is lifted to p^ = (p, -||p||^2/2, v) with ``extra`` random
artificial dimensions v, a query q to q^ = r (q, 1, 0) with a fresh random r > 0, so that
p^ . q^ = -(r/2)(||p - q||^2 - ||q||^2): the larger the score, the nearer the vector.
A secret bit vector S splits, on the positions where it is 1, the stored vector into two
random shares (the query is copied), and on the positions where it is 0 the query (the
stored vector is copied); two secret invertible matrices then hide each half:

    E(p) = (M1^T p_a, M2^T p_b),   T(q) = (M1^-1 q_a, M2^-1 q_b),   E(p) . T(q) = p^ . q^.

The server ranks by one inner product per vector and never sees p, q or a distance.
This scheme leaks to a known-plaintext attacker (see SECURITY.md): it protects features
against an honest-but-curious server that has no plaintext/ciphertext pairs.

Conditioning: each matrix is U diag(s) V^T with Haar-random orthogonal U, V and singular
values s in [1, COND_BOUND], so cond_2(M) <= COND_BOUND. That bound is what keeps
float64 scores within about 1e-12 (relative to |E(p)| |T(q)|) of the exact ones, which
the search engine's pruning margin relies on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from crypto import csprng
from crypto.errors import FormatError

COND_BOUND = 4.0
MIN_EXTRA = 8
QUERY_SCALE_RANGE = (1.0, 64.0)
NOISE_RATIO = 1.1  # ciphertext norms >= 1.1 x the largest noise-free norm expected
NORM_SPREAD = 0.05  # ... drawn uniformly over [1, 1.05) x a quarter octave above that
_MAGIC = b"RCSK"
_VERSION = 1
_HEAD = struct.Struct(">4sBII")

F64 = NDArray[np.float64]


def _random_orthogonal(n: int) -> F64:
    """Haar-distributed orthogonal matrix from CSPRNG Gaussians (QR with sign fix)."""
    q, r = np.linalg.qr(csprng.normal((n, n)))
    return q * np.sign(np.diag(r))


def random_invertible(n: int, cond_bound: float = COND_BOUND) -> F64:
    """A random n x n matrix whose 2-norm condition number is at most ``cond_bound``."""
    singular = np.exp(csprng.uniform(n) * np.log(cond_bound))
    matrix: F64 = (_random_orthogonal(n) * singular) @ _random_orthogonal(n).T
    return matrix


@dataclass(frozen=True, eq=False)
class SknnKey:
    """Secret key of one secure-kNN space: split vector and two invertible matrices."""

    dim: int
    extra: int
    split: NDArray[np.bool_]
    m1: F64
    m2: F64
    _m1_inv_t: F64 = field(init=False, repr=False)
    _m2_inv_t: F64 = field(init=False, repr=False)
    _gain: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        lifted = self.dim + 1 + self.extra
        if self.dim < 1 or self.extra < MIN_EXTRA:
            raise ValueError(f"secure-kNN needs dim >= 1 and at least {MIN_EXTRA} extra dims")
        if self.split.shape != (lifted,) or self.m1.shape != (lifted, lifted):
            raise ValueError("secure-kNN key parts have inconsistent shapes")
        if self.m2.shape != (lifted, lifted):
            raise ValueError("secure-kNN key parts have inconsistent shapes")
        object.__setattr__(self, "_m1_inv_t", np.linalg.inv(self.m1).T.copy())
        object.__setattr__(self, "_m2_inv_t", np.linalg.inv(self.m2).T.copy())
        # The largest noise-free ciphertext norm per unit of lifted norm: the 2-norm of
        # l -> (share_a M1, share_b M2) with the split positions halved.
        half = np.where(self.split, 0.5, 1.0)[:, None]
        gain = float(np.linalg.norm(np.hstack([half * self.m1, half * self.m2]), 2))
        object.__setattr__(self, "_gain", gain)

    def __repr__(self) -> str:
        return f"SknnKey(dim={self.dim}, extra={self.extra}, <secret>)"

    @property
    def lifted_dim(self) -> int:
        return self.dim + 1 + self.extra

    @property
    def encrypted_dim(self) -> int:
        """Width of a ciphertext or token: two shares of the lifted dimension."""
        return 2 * self.lifted_dim

    @classmethod
    def generate(cls, dim: int, extra: int = MIN_EXTRA) -> SknnKey:
        lifted = dim + 1 + extra
        return cls(
            dim=dim,
            extra=extra,
            split=csprng.bits(lifted),
            m1=random_invertible(lifted),
            m2=random_invertible(lifted),
        )

    def encrypt(self, vectors: F64, sq_norms: F64 | None = None,
                norm_bound: float = 0.0) -> F64:
        """Encrypt stored vectors (n, dim) into (n, 2 * lifted_dim) ciphertexts.

        ``sq_norms`` overrides ||p||^2 in the lifted vector: a bound level passes the
        full vector's norm (equal in exact arithmetic) so that its score differs from
        the full score only by the dot products, which keeps the bound provable.
        ``norm_bound``: the norm ||p|| that the caller's vectors do not usually exceed (0:
        unknown). The ciphertext norms are then the same whatever the batch holds, even a
        single vector, as long as no vector exceeds it (see _target_norms).
        """
        x = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
        if x.shape[1] != self.dim or not np.all(np.isfinite(x)):
            raise ValueError(f"expected finite vectors of dimension {self.dim}")
        n = x.shape[0]
        norms = np.einsum("ij,ij->i", x, x) if sq_norms is None else np.asarray(sq_norms)
        if n == 0:
            return np.empty((0, self.encrypted_dim))
        # The ciphertext is signal + t * noise: the signal is the lifted vector without
        # noise, the noise the artificial dimensions and the split shares' randomness (its
        # inner product with every token is exactly 0, so scores do not depend on it).
        # Each row's t is chosen so that its ciphertext norm is a random target drawn
        # independently of the plaintext (see _target_norms): the norm says nothing of
        # ||p||, which the noise scale of earlier versions did (Spearman 0.57-0.69).
        lifted = np.zeros((n, self.lifted_dim))
        lifted[:, : self.dim] = x
        lifted[:, self.dim] = -0.5 * norms
        signal = self._shares(lifted, np.zeros((n, self.lifted_dim)))
        hidden = np.zeros((n, self.lifted_dim))
        hidden[:, self.dim + 1 :] = csprng.normal((n, self.extra))
        noise = self._shares(hidden, csprng.normal((n, self.lifted_dim)))
        a = np.einsum("ij,ij->i", noise, noise)
        b = np.einsum("ij,ij->i", signal, noise)
        s2 = np.einsum("ij,ij->i", signal, signal)
        bound = norm_bound * np.sqrt(1.0 + 0.25 * norm_bound * norm_bound)  # ||lifted||
        target = _target_norms(np.sqrt(s2), self._gain * bound)
        t = (np.sqrt(b * b + a * (target * target - s2)) - b) / a  # ||signal + t noise|| = target
        result: F64 = signal + t[:, None] * noise
        return result

    def _shares(self, lifted: F64, noise: F64) -> F64:
        share_a = np.where(self.split, 0.5 * lifted + noise, lifted)
        share_b = np.where(self.split, 0.5 * lifted - noise, lifted)
        return np.hstack([share_a @ self.m1, share_b @ self.m2])

    def token(self, queries: F64, scales: F64) -> F64:
        """Query tokens (Q, 2 * lifted_dim) for queries (Q, dim) with scales r (Q,)."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float64))
        r = np.asarray(scales, dtype=np.float64).reshape(-1, 1)
        if q.shape[1] != self.dim or not np.all(np.isfinite(q)):
            raise ValueError(f"expected finite query vectors of dimension {self.dim}")
        if r.shape[0] != q.shape[0] or not np.all(r > 0):
            raise ValueError("every query needs one positive scale")
        n = q.shape[0]
        lifted = np.zeros((n, self.lifted_dim))
        lifted[:, : self.dim] = q
        lifted[:, self.dim] = 1.0
        lifted *= r
        spread = np.sqrt(np.mean(lifted * lifted, axis=1, keepdims=True))
        noise = csprng.normal((n, self.lifted_dim)) * spread
        share_a = np.where(self.split, lifted, 0.5 * lifted + noise)
        share_b = np.where(self.split, lifted, 0.5 * lifted - noise)
        return np.hstack([share_a @ self._m1_inv_t, share_b @ self._m2_inv_t])

    def to_bytes(self) -> bytes:
        head = _HEAD.pack(_MAGIC, _VERSION, self.dim, self.extra)
        bits = np.packbits(self.split).tobytes()
        return head + bits + self.m1.astype("<f8").tobytes() + self.m2.astype("<f8").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> SknnKey:
        if len(data) < _HEAD.size:
            raise FormatError("secure-kNN key is truncated")
        magic, version, dim, extra = _HEAD.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise FormatError("not a secure-kNN key of a supported version")
        if not 1 <= dim <= 65536 or not MIN_EXTRA <= extra <= 4096:
            raise FormatError("secure-kNN key has implausible dimensions")
        lifted = dim + 1 + extra
        nbits = (lifted + 7) // 8
        expected = _HEAD.size + nbits + 2 * 8 * lifted * lifted
        if len(data) != expected:
            raise FormatError("secure-kNN key has the wrong length")
        offset = _HEAD.size
        split = np.unpackbits(np.frombuffer(data, np.uint8, nbits, offset))[:lifted].astype(bool)
        offset += nbits
        m1 = np.frombuffer(data, "<f8", lifted * lifted, offset).reshape(lifted, lifted)
        m2 = np.frombuffer(data, "<f8", lifted * lifted, offset + 8 * lifted * lifted)
        m2 = m2.reshape(lifted, lifted)
        if not (np.all(np.isfinite(m1)) and np.all(np.isfinite(m2))):
            raise FormatError("secure-kNN key contains non-finite numbers")
        try:
            return cls(dim=dim, extra=extra, split=split, m1=m1.astype(np.float64),
                       m2=m2.astype(np.float64))
        except np.linalg.LinAlgError:
            raise FormatError("secure-kNN key matrices are singular") from None


def _target_norms(signal_norms: F64, expected: float) -> F64:
    """Ciphertext norms drawn independently of the plaintexts: uniform in [c, (1 +
    NORM_SPREAD) c), with c the power of 2^(1/4) at or above NOISE_RATIO times the larger
    of ``expected`` (the caller's bound on noise-free norms) and the largest noise-free
    norm of the batch. What the norms can reveal is that quarter octave, one per
    encryption call, and only when a vector of the batch exceeds the caller's bound.

    Cost: every row's norm is about that of the batch's largest, which widens the
    sixteen-bit codes' score bounds (cloud/codes.py) by the ratio of the largest to the
    typical noise-free norm."""
    largest = max(float(signal_norms.max()), expected)
    floor = max(largest * NOISE_RATIO, np.finfo(np.float64).tiny)
    scale = 2.0 ** (np.ceil(4.0 * np.log2(floor)) / 4.0)
    targets: F64 = scale * (1.0 + NORM_SPREAD * csprng.uniform(signal_norms.shape[0]))
    return targets


def query_scales(count: int) -> F64:
    """Fresh random positive scales r, one per query (log-uniform over QUERY_SCALE_RANGE)."""
    low, high = QUERY_SCALE_RANGE
    scales: F64 = np.exp(np.log(low) + csprng.uniform(count) * (np.log(high) - np.log(low)))
    return scales
