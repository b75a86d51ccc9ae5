"""The service's side of keyword search: look tokens up in a segment's dictionary and
evaluate a boolean query over the row positions found. No key: only query tokens.

Why here and not in crypto: the boolean algebra over positions (AND across fields, OR within
a field, NOT) is the service's work and uses nothing secret; crypto/sse.py keeps the
construction. The client builds the query (app/core/keywords.py) and sends one token per
keyword; the service never sees a keyword, only which rows each token finds (the leakage
stated in docs/KEYWORDS.md).

A query is a conjunction of clauses; a clause is the OR of its tokens, negated or not:

    rows = AND(positive clauses) minus OR(negative clauses)

With no positive clause the query starts from every row of the segment ("everything but
US"). An empty positive clause (no token) matches nothing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from crypto.errors import FormatError
from crypto.sse import TOKEN_SIZE, Dictionary, KeywordToken

U32 = NDArray[np.uint32]
MAX_CLAUSES = 64
MAX_TOKENS = 4096
"""A date range expands to at most a few hundred tokens; 4096 bounds a hostile request."""
_QUERY_MAGIC = b"RCKQ"
_QUERY_HEAD = struct.Struct(">4sBH")  # magic, version, clauses
_CLAUSE_HEAD = struct.Struct(">BH")  # negated, tokens


@dataclass(frozen=True)
class TokenClause:
    """The OR of some keyword tokens (one field), possibly negated."""

    tokens: tuple[KeywordToken, ...]
    negated: bool = False


@dataclass(frozen=True)
class TokenQuery:
    """AND of clauses, as the service receives it."""

    clauses: tuple[TokenClause, ...] = field(default=())

    def to_bytes(self) -> bytes:
        parts = [_QUERY_HEAD.pack(_QUERY_MAGIC, 1, len(self.clauses))]
        for clause in self.clauses:
            parts.append(_CLAUSE_HEAD.pack(1 if clause.negated else 0, len(clause.tokens)))
            parts.extend(t.to_bytes() for t in clause.tokens)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> TokenQuery:
        """Parse and bound a query from an untrusted client (FormatError names the field)."""
        if len(data) < _QUERY_HEAD.size:
            raise FormatError("keyword query is truncated (header)")
        magic, version, count = _QUERY_HEAD.unpack_from(data)
        if magic != _QUERY_MAGIC or version != 1:
            raise FormatError("keyword query: bad magic bytes or unknown version")
        if count > MAX_CLAUSES:
            raise FormatError(f"keyword query: {count} clauses, at most {MAX_CLAUSES}")
        offset, total, clauses = _QUERY_HEAD.size, 0, []
        for _ in range(count):
            if len(data) < offset + _CLAUSE_HEAD.size:
                raise FormatError("keyword query is truncated (clause)")
            negated, n = _CLAUSE_HEAD.unpack_from(data, offset)
            offset += _CLAUSE_HEAD.size
            total += n
            if negated > 1 or total > MAX_TOKENS:
                raise FormatError("keyword query: bad negation flag or too many tokens")
            end = offset + n * TOKEN_SIZE
            if len(data) < end:
                raise FormatError("keyword query is truncated (tokens)")
            tokens = tuple(KeywordToken.from_bytes(data[o : o + TOKEN_SIZE])
                           for o in range(offset, end, TOKEN_SIZE))
            clauses.append(TokenClause(tokens, bool(negated)))
            offset = end
        if offset != len(data):
            raise FormatError("keyword query has trailing bytes")
        return cls(tuple(clauses))


@dataclass(frozen=True)
class SegmentKeywords:
    """One segment's parsed dictionary and where it belongs (the binding the labels use)."""

    repo_id: str
    segment_id: str
    key_version: int
    row_count: int
    dictionary: Dictionary

    @classmethod
    def load(cls, data: bytes, repo_id: str, segment_id: str, key_version: int,
             row_count: int) -> SegmentKeywords:
        return cls(repo_id, segment_id, key_version, row_count,
                   Dictionary.from_bytes(data, f"of segment {segment_id}"))

    def rows(self, token: KeywordToken) -> U32:
        """Rows of this segment holding the token's keyword (increasing)."""
        return self.dictionary.search(token, self.repo_id, self.segment_id, self.key_version,
                                      self.row_count)

    def clause_rows(self, clause: TokenClause) -> U32:
        """Rows matching any token of the clause (before its negation)."""
        if not clause.tokens:
            return np.zeros(0, dtype=np.uint32)
        found = [self.rows(t) for t in clause.tokens]
        if len(found) == 1:
            return found[0]  # increasing and unique already
        return np.unique(np.concatenate(found)).astype(np.uint32)

    def evaluate(self, query: TokenQuery) -> U32:
        """Rows matching the whole query, increasing."""
        positive = [c for c in query.clauses if not c.negated]
        negative = [c for c in query.clauses if c.negated]
        if positive:
            # Smallest first: later intersections stay cheap.
            sets = sorted((self.clause_rows(c) for c in positive), key=len)
            rows = sets[0]
            for other in sets[1:]:
                if not rows.size:
                    break
                rows = np.intersect1d(rows, other, assume_unique=True)
        else:
            rows = np.arange(self.row_count, dtype=np.uint32)
        for clause in negative:
            if not rows.size:
                break
            rows = np.setdiff1d(rows, self.clause_rows(clause), assume_unique=True)
        return rows.astype(np.uint32)
