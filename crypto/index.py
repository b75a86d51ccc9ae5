"""The repository's search key: one secure-kNN space per bound level plus the full one.

Encrypting a vector produces its full ciphertext and one ciphertext per level of the
bound cascade (DESIGN.md §4); a query produces one token per level, all with the same
random scale r, so that on the server a level's score is always >= the full score.

A key may have no levels: a repository that switched them off (its searches scan every
full vector, and a known-plaintext attacker needs d + 1 pairs), or one whose basis is not
fitted yet. The basis B is fitted on the repository's own features only (never on public
data): app/core/basis.py keeps the levels of a key version, B with its level keys
(:class:`BoundLevels`), in an encrypted object written by the version's first import batch.
"""

from __future__ import annotations

import struct
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from crypto import memlock
from crypto.bounds import bound_vectors, fit_basis
from crypto.errors import FormatError
from crypto.sknn import MIN_EXTRA, SknnKey, query_scales
from crypto.tokens import EncryptedVectors, QueryToken

F64 = NDArray[np.float64]
# Measured on features of real images (bench/engine.py, n = 100k, d = 128): a first
# level of m = 8 principal directions lets ~0.2% of vectors through where the
# mean/std bound (m = 1) lets ~12% through, and costs only 14 more float32 columns.
DEFAULT_LEVELS = (8, 32)
_MAGIC = b"RCIK"
_VERSION = 1
_HEAD = struct.Struct(">4sBIB")
_LEVELS_MAGIC = b"RCBL"
_LEVELS_VERSION = 1


class WipedKey(RuntimeError):
    """The index key was wiped (workstation lock): open the repository again."""


def _zero(arrays: tuple[Any, ...]) -> None:
    """Zero in place every array we own that numpy lets us write (a read-only view of
    someone else's buffer is left alone: it is not ours to change), then let its pages
    out of RAM (crypto/memlock.py: locked while the key lived)."""
    for array in arrays:
        if isinstance(array, np.ndarray) and array.flags.writeable:
            array.fill(0)
            memlock.unlock(array)


def _sknn_arrays(key: SknnKey) -> tuple[Any, ...]:
    """The secret arrays of a secure-kNN key, the inverses it caches included."""
    return (key.split, key.m1, key.m2, key._m1_inv_t, key._m2_inv_t)


def default_levels(dim: int) -> tuple[int, ...]:
    """The bound levels that make sense for a dimension: each strictly below it."""
    return tuple(m for m in DEFAULT_LEVELS if m < dim) or (max(1, dim // 2),)


@dataclass(frozen=True, eq=False)
class IndexKey:
    """Secret key material that encrypts feature vectors and makes query tokens."""

    dim: int
    levels: tuple[int, ...]
    basis: F64
    full: SknnKey
    level_keys: tuple[SknnKey, ...]
    _wiped: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if list(self.levels) != sorted(set(self.levels)):
            raise ValueError("bound levels must be increasing")
        if self.basis.shape != (max(self.levels, default=0), self.dim):
            raise ValueError("bound basis has the wrong shape")
        if len(self.level_keys) != len(self.levels) or self.full.dim != self.dim:
            raise ValueError("index key parts are inconsistent")
        for m, key in zip(self.levels, self.level_keys, strict=True):
            if key.dim != m + 1:
                raise ValueError("a level key does not match its level")
        # Best effort: its pages are kept out of swap while it lives (crypto/memlock.py);
        # a refusal (RLIMIT_MEMLOCK) is counted and logged once, never raised.
        memlock.lock_all(self.basis, *(a for key in (self.full, *self.level_keys)
                                       for a in _sknn_arrays(key)))

    def __repr__(self) -> str:
        return f"IndexKey(dim={self.dim}, levels={self.levels}, <secret>)"

    @property
    def wiped(self) -> bool:
        return self._wiped

    def wipe(self) -> None:
        """Zero the basis and every secure-kNN matrix of this key in place, now, and refuse
        any later encrypt or query (WipedKey) instead of computing with zeros. Only for a
        key nobody else still uses: the secure-kNN keys may be shared with another
        IndexKey (with_levels keeps ``full``); the lock path uses wipe_on_release."""
        object.__setattr__(self, "_wiped", True)
        _zero((self.basis,))
        for key in (self.full, *self.level_keys):
            _zero(_sknn_arrays(key))

    def wipe_on_release(self) -> None:
        """Zero this key's arrays as soon as nothing references their holder any more
        (weakref.finalize on the IndexKey for the basis, on each SknnKey for its
        matrices): work still running with the key (an import during a workstation lock)
        keeps it intact until it lets go, and a secure-kNN key shared with a live
        IndexKey is zeroed only once that one is gone too."""
        weakref.finalize(self, _zero, (self.basis,))
        for key in (self.full, *self.level_keys):
            weakref.finalize(key, _zero, _sknn_arrays(key))

    def _check(self) -> None:
        if self._wiped:
            raise WipedKey("this repository's index key was wiped when the workstation "
                           "was locked: open the repository again")

    @classmethod
    def generate(
        cls,
        dim: int,
        sample: F64 | None = None,
        levels: tuple[int, ...] | None = None,
        extra: int = MIN_EXTRA,
    ) -> IndexKey:
        """Fresh secrets; ``sample`` (plaintext features) lets the basis follow the data.

        ``levels=()``: a key without bound levels (no basis).
        """
        chosen = default_levels(dim) if levels is None else tuple(levels)
        full = SknnKey.generate(dim, extra)
        if not chosen:
            return cls(dim=dim, levels=(), basis=np.empty((0, dim)), full=full, level_keys=())
        return cls._with(dim, full, BoundLevels.generate(dim, sample, chosen, extra))

    @classmethod
    def _with(cls, dim: int, full: SknnKey, bound: BoundLevels) -> IndexKey:
        return cls(dim=dim, levels=bound.levels, basis=bound.basis, full=full,
                   level_keys=bound.level_keys)

    def with_levels(self, bound: BoundLevels) -> IndexKey:
        """The same full-vector key with these bound levels (basis and level keys)."""
        if bound.dim != self.dim:
            raise ValueError("bound levels of another dimension")
        return IndexKey._with(self.dim, self.full, bound)

    def bound_levels(self) -> BoundLevels | None:
        """The key's levels (basis and level keys), None when it has none."""
        if not self.levels:
            return None
        return BoundLevels(self.dim, self.levels, self.basis, self.level_keys)

    def encrypt(self, vectors: F64, norm_bound: float = 0.0) -> EncryptedVectors:
        """Ciphertexts of the full vectors and of every level. ``norm_bound``: the norm the
        vectors do not usually exceed (the extractor's), so that ciphertext norms say
        nothing about the plaintexts even for a batch of one (SknnKey.encrypt)."""
        self._check()
        x = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
        if x.shape[1] != self.dim:
            raise ValueError(f"expected vectors of dimension {self.dim}, got {x.shape[1]}")
        sq_norms = np.einsum("ij,ij->i", x, x)
        levels = tuple(
            key.encrypt(bound_vectors(x, self.basis[:m]), sq_norms, norm_bound)
            for m, key in zip(self.levels, self.level_keys, strict=True)
        )
        return EncryptedVectors(full=self.full.encrypt(x, sq_norms, norm_bound), levels=levels)

    def query(self, queries: F64) -> QueryToken:
        self._check()
        q = np.atleast_2d(np.asarray(queries, dtype=np.float64))
        if q.shape[1] != self.dim:
            raise ValueError(f"expected queries of dimension {self.dim}, got {q.shape[1]}")
        scales = query_scales(q.shape[0])
        levels = tuple(
            key.token(bound_vectors(q, self.basis[:m]), scales)
            for m, key in zip(self.levels, self.level_keys, strict=True)
        )
        return QueryToken(full=self.full.token(q, scales), levels=levels)

    def to_bytes(self) -> bytes:
        return _serialise(_MAGIC, _VERSION, self.dim, self.levels, self.basis,
                          (self.full, *self.level_keys))

    @classmethod
    def from_bytes(cls, data: bytes) -> IndexKey:
        try:
            dim, levels, basis, keys = _parse(data, _MAGIC, _VERSION, "index key", 1)
            return cls(dim=dim, levels=levels, basis=basis, full=keys[0],
                       level_keys=tuple(keys[1:]))
        except (struct.error, ValueError):
            raise FormatError("index key is malformed") from None


@dataclass(frozen=True, eq=False)
class BoundLevels:
    """The bound levels of a key version: the basis B and one secure-kNN key per level.

    Serialised (app/core/basis.py stores it encrypted, docs/FORMAT.md)::

        "RCBL" | version u8 = 1 | dim u32 | n u8 (>= 1) | n x u32 levels (increasing)
        | B: m_n x dim f64 little-endian | n x (u32 len | SknnKey of level j)
    """

    dim: int
    levels: tuple[int, ...]
    basis: F64
    level_keys: tuple[SknnKey, ...]

    def __post_init__(self) -> None:
        if not self.levels or list(self.levels) != sorted(set(self.levels)):
            raise ValueError("bound levels must be increasing and non-empty")
        if not 1 <= self.levels[0] or self.levels[-1] > self.dim:
            raise ValueError(f"bound levels must lie in 1..{self.dim}")
        if self.basis.shape != (self.levels[-1], self.dim):
            raise ValueError("bound basis has the wrong shape")
        if not np.all(np.isfinite(self.basis)):
            raise ValueError("bound basis contains non-finite numbers")
        if len(self.level_keys) != len(self.levels):
            raise ValueError("bound levels and their keys are inconsistent")
        for m, key in zip(self.levels, self.level_keys, strict=True):
            if key.dim != m + 1:
                raise ValueError("a level key does not match its level")

    def __repr__(self) -> str:
        return f"BoundLevels(dim={self.dim}, levels={self.levels}, <secret>)"

    @classmethod
    def generate(cls, dim: int, sample: F64 | None, levels: tuple[int, ...],
                 extra: int = MIN_EXTRA) -> BoundLevels:
        """Fresh level keys and a basis fitted on ``sample`` (the repository's features)."""
        chosen = tuple(levels)
        if not chosen or max(chosen) > dim or min(chosen) < 1:
            raise ValueError(f"bound levels must lie in 1..{dim}")
        return cls(dim, chosen, fit_basis(sample, dim, max(chosen)),
                   tuple(SknnKey.generate(m + 1, extra) for m in chosen))

    def to_bytes(self) -> bytes:
        return _serialise(_LEVELS_MAGIC, _LEVELS_VERSION, self.dim, self.levels, self.basis,
                          self.level_keys)

    @classmethod
    def from_bytes(cls, data: bytes) -> BoundLevels:
        try:
            dim, levels, basis, keys = _parse(data, _LEVELS_MAGIC, _LEVELS_VERSION,
                                              "bound levels", 0)
            if not levels:
                raise FormatError("bound levels: at least one level is needed")
            return cls(dim, levels, basis, tuple(keys))
        except (struct.error, ValueError):
            raise FormatError("bound levels are malformed") from None


def _serialise(magic: bytes, version: int, dim: int, levels: tuple[int, ...], basis: F64,
               keys: tuple[SknnKey, ...]) -> bytes:
    """The layout IndexKey and BoundLevels share: head, levels, basis, length-prefixed keys."""
    parts = [_HEAD.pack(magic, version, dim, len(levels)),
             struct.pack(f">{len(levels)}I", *levels),
             np.ascontiguousarray(basis, dtype="<f8").tobytes()]
    for key in keys:
        blob = key.to_bytes()
        parts.append(struct.pack(">I", len(blob)) + blob)
    return b"".join(parts)


def _parse(data: bytes, magic: bytes, version: int, what: str, extra_keys: int,
           ) -> tuple[int, tuple[int, ...], F64, list[SknnKey]]:
    """(dim, levels, basis, keys) of what _serialise wrote; ``extra_keys`` keys come before
    the one per level. Every size is checked against the bytes left before any allocation."""
    found_magic, found_version, dim, n_levels = _HEAD.unpack_from(data)
    if found_magic != magic or found_version != version:
        raise FormatError(f"{what}: not a supported magic or version")
    if not 1 <= dim <= 65536:
        raise FormatError(f"{what}: implausible dimension {dim}")
    offset = _HEAD.size
    levels = tuple(int(m) for m in struct.unpack_from(f">{n_levels}I", data, offset))
    offset += 4 * n_levels
    rows = max(levels) if levels else 0
    if rows > dim or offset + 8 * rows * dim > len(data):
        raise FormatError(f"{what}: truncated, or a level larger than the dimension")
    basis = np.frombuffer(data, "<f8", rows * dim, offset).reshape(rows, dim)
    offset += 8 * rows * dim
    keys = []
    for _ in range(n_levels + extra_keys):
        (size,) = struct.unpack_from(">I", data, offset)
        offset += 4
        if offset + size > len(data):
            raise FormatError(f"{what}: truncated")
        keys.append(SknnKey.from_bytes(data[offset : offset + size]))
        offset += size
    if offset != len(data):
        raise FormatError(f"{what}: trailing bytes")
    return dim, levels, basis.astype(np.float64), keys
