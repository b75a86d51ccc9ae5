"""Key-free value types exchanged with the server: encrypted vectors and query tokens.

These carry no secret (ciphertexts and tokens only), so the untrusted side may import
them. Each has a compact binary form with validation, because tokens arrive over HTTP
from clients the server must not trust with its memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from crypto.errors import FormatError

F64 = NDArray[np.float64]
_TOKEN_MAGIC = b"RCQT"
_TOKEN_VERSION = 1
_TOKEN_HEAD = struct.Struct(">4sBBIH")  # magic, version, levels, queries, reserved
MAX_TOKEN_WIDTH = 1 << 16
MAX_LEVELS = 8


@dataclass(frozen=True)
class _LevelStack:
    """Rows of a full array and of one array per bound level, cheapest level first."""

    full: F64
    levels: tuple[F64, ...]

    def __post_init__(self) -> None:
        if self.full.ndim != 2:
            raise ValueError("full part must be a 2-D array")
        for level in self.levels:
            if level.ndim != 2 or level.shape[0] != self.full.shape[0]:
                raise ValueError("every level must have one row per full row")

    def __len__(self) -> int:
        return int(self.full.shape[0])

    @property
    def widths(self) -> tuple[int, ...]:
        """Widths of the level arrays, then of the full array."""
        return (*tuple(int(level.shape[1]) for level in self.levels), int(self.full.shape[1]))


@dataclass(frozen=True)
class EncryptedVectors(_LevelStack):
    """Ciphertexts of n stored vectors: the full vectors and one array per bound level."""


@dataclass(frozen=True)
class QueryToken(_LevelStack):
    """Tokens of Q queries: one row per query for each level and for the full vectors.

    All rows of one query share its random scale r, which is what makes a level's
    score comparable with (and never below) the full score.
    """

    def select(self, index: int) -> QueryToken:
        """The token of query ``index`` alone."""
        return QueryToken(
            full=self.full[index : index + 1],
            levels=tuple(level[index : index + 1] for level in self.levels),
        )

    def to_bytes(self) -> bytes:
        widths = self.widths
        head = _TOKEN_HEAD.pack(_TOKEN_MAGIC, _TOKEN_VERSION, len(self.levels), len(self), 0)
        dims = struct.pack(f">{len(widths)}I", *widths)
        parts = [np.ascontiguousarray(a, dtype="<f8").tobytes() for a in (*self.levels, self.full)]
        return head + dims + b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes, max_queries: int = 1024) -> QueryToken:
        """Parse and validate a token; every inconsistency is a FormatError naming the field."""
        if len(data) < _TOKEN_HEAD.size:
            raise FormatError("query token is truncated (header)")
        magic, version, n_levels, n_queries, reserved = _TOKEN_HEAD.unpack_from(data)
        if magic != _TOKEN_MAGIC:
            raise FormatError("query token: bad magic bytes")
        if version != _TOKEN_VERSION:
            raise FormatError(f"query token: unsupported version {version}")
        if reserved != 0:
            raise FormatError("query token: reserved field must be zero")
        if n_levels > MAX_LEVELS:
            raise FormatError(f"query token: too many levels ({n_levels} > {MAX_LEVELS})")
        if not 1 <= n_queries <= max_queries:
            raise FormatError(f"query token: query count {n_queries} not in 1..{max_queries}")
        offset = _TOKEN_HEAD.size
        dims_size = 4 * (n_levels + 1)
        if len(data) < offset + dims_size:
            raise FormatError("query token is truncated (widths)")
        widths = struct.unpack_from(f">{n_levels + 1}I", data, offset)
        offset += dims_size
        if any(not 1 <= w <= MAX_TOKEN_WIDTH for w in widths):
            raise FormatError("query token: a width is out of range")
        expected = offset + 8 * n_queries * sum(widths)
        if len(data) != expected:
            raise FormatError(f"query token: length {len(data)} != expected {expected}")
        arrays = []
        for width in widths:
            count = n_queries * width
            arrays.append(np.frombuffer(data, "<f8", count, offset).reshape(n_queries, width))
            offset += 8 * count
        stacked = [a.astype(np.float64) for a in arrays]
        if not all(np.all(np.isfinite(a)) for a in stacked):
            raise FormatError("query token: contains non-finite numbers")
        return cls(full=stacked[-1], levels=tuple(stacked[:-1]))
