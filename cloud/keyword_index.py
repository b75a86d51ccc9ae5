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

The service's view of a repository and key version (``KeywordView``, issue 17's query
side) keeps each live segment's dictionary and image ids (from a ``KeywordSource``:
cloud/keyword_store.py reads them checked against the segment log) and the label objects
naming each segment, applied per token in their order after the segment's own rows. It
answers a query with the matching image ids in segment order, each once; with eight
segments or more, their dictionaries are also merged into one sorted table so that a
token's first labels in every segment cost one binary search (``_Merged``). ``IdLookup``
turns the ids into the engine's row subset for a combined query
(cloud.search.search_subset).
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from crypto.errors import FormatError
from crypto.sse import FIRST_BATCH, TOKEN_SIZE, Dictionary, KeywordToken
from crypto.sse import _prf_blocks as prf_blocks
from crypto.sse import _segment_keys as segment_keys

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

    def evaluate(self, query: TokenQuery, extra: Sequence[U32] | None = None) -> U32:
        """Rows matching the whole query, increasing. ``extra[i]``: more rows matching
        clause i (the images holding one of its keywords as a label)."""

        def rows_of(i: int, clause: TokenClause) -> U32:
            found = self.clause_rows(clause)
            if extra is not None and extra[i].size:
                found = np.union1d(found, extra[i]).astype(np.uint32)
            return found

        positive = [(i, c) for i, c in enumerate(query.clauses) if not c.negated]
        negative = [(i, c) for i, c in enumerate(query.clauses) if c.negated]
        if positive:
            # Smallest first: later intersections stay cheap.
            sets = sorted((rows_of(i, c) for i, c in positive), key=len)
            rows = sets[0]
            for other in sets[1:]:
                if not rows.size:
                    break
                rows = np.intersect1d(rows, other, assume_unique=True)
        else:
            rows = np.arange(self.row_count, dtype=np.uint32)
        for i, clause in negative:
            if not rows.size:
                break
            rows = np.setdiff1d(rows, rows_of(i, clause), assume_unique=True)
        return rows.astype(np.uint32)


# --- the service's keyword view of a repository (issue 17, query side) ---------------------

ID16 = np.dtype("V16")
ANSWERS_KEPT = 32
"""Keyword answers a view keeps per repository and key version (most recent first)."""
MERGE_MIN = 8
"""From this many segments on, their dictionaries are searched as one table (_Merged)."""
UNMERGED_MAX = 16
"""Segments loaded since the table was built, searched one by one until this many; then
the table is built again (a rebuild at 1M images costs about a second, once)."""


@dataclass(frozen=True)
class SegmentDictionary:
    """What a segment contributes to keyword search: its image ids in row order (the rows
    its dictionary names) and the dictionary's bytes (RCSD, crypto/sse.py)."""

    ids: NDArray[np.void]
    dictionary: bytes


@dataclass(frozen=True)
class SegmentLabel:
    """A label addition (``removal`` False) or tombstone (True) naming rows of one
    segment (crypto/labels.py, written by app/core/labels.py): a small dictionary bound
    to the label object's own id. Applied in ``order`` (crypto.labels.order_key: the
    writer's base sequence, then the id) after the segment's own rows: an addition joins
    its rows, a removal takes them out."""

    label_id: str
    key_version: int
    segment_id: str
    row_count: int
    removal: bool
    order: tuple[int, str]
    dictionary: bytes


class KeywordSource(Protocol):
    """Where the service finds the dictionaries (written by the importer and the
    rewrites inside each segment; labels as objects listed in the segment log).
    ``segment`` returns None for a segment written without a dictionary (before issue
    17): it is then not searched by keyword, and the answer's segment set says so (an
    incomplete answer). ``context``: the service's cloud.repo_index.RepoIndex (its
    verified log names each object's SHA-256)."""

    def segment(self, repo_id: str, segment_id: str, key_version: int, context: object
                ) -> SegmentDictionary | None: ...

    def labels(self, repo_id: str, key_version: int, context: object
               ) -> Sequence[SegmentLabel]: ...


class NoKeywords:
    """A source with no dictionary at all: every keyword query is answered incomplete."""

    def segment(self, repo_id: str, segment_id: str, key_version: int, context: object
                ) -> SegmentDictionary | None:
        return None

    def labels(self, repo_id: str, key_version: int, context: object
               ) -> Sequence[SegmentLabel]:
        return ()


@dataclass
class _Loaded:
    keywords: SegmentKeywords
    ids: NDArray[np.void]
    labels: list[tuple[bool, SegmentKeywords]] = field(default_factory=list)


class _Labelled(SegmentKeywords):
    """A segment seen through its labels: the same boolean evaluation, each token's rows
    those of the segment's dictionary with the label objects applied in order."""

    def __init__(self, loaded: _Loaded) -> None:
        base = loaded.keywords
        super().__init__(base.repo_id, base.segment_id, base.key_version, base.row_count,
                         base.dictionary)
        object.__setattr__(self, "_labels", loaded.labels)

    def rows(self, token: KeywordToken) -> U32:
        return self._labelled(super().rows(token), token)

    def _labelled(self, rows: U32, token: KeywordToken) -> U32:
        """``rows`` of the segment's dictionary with the label objects applied in order."""
        labels: list[tuple[bool, SegmentKeywords]] = object.__getattribute__(self, "_labels")
        for removal, label in labels:
            found = label.rows(token)
            if not found.size:
                continue
            if removal:
                rows = np.setdiff1d(rows, found).astype(np.uint32)
            else:
                rows = np.union1d(rows, found).astype(np.uint32)
        return rows


class _Prepared(_Labelled):
    """A segment whose tokens' rows were found already (the merged lookup), labels then
    applied in order: the same boolean evaluation as any segment."""

    def __init__(self, loaded: _Loaded, found: dict[bytes, U32]) -> None:
        super().__init__(loaded)
        object.__setattr__(self, "_found", found)

    def rows(self, token: KeywordToken) -> U32:
        found: dict[bytes, U32] = object.__getattribute__(self, "_found")
        rows = found.get(token.to_bytes())
        if rows is None:
            rows = SegmentKeywords.rows(self, token)
        return self._labelled(rows, token)


class _Merged:
    """The dictionaries of many segments as one sorted table, so that the first labels of
    a token in every segment are looked up with one binary search instead of one per
    segment: most keywords are rare in most segments, and at 100 segments the per-segment
    calls, not the rows, were the cost of a rare keyword (about 0.15 ms a segment).

    Per token and segment: the segment's keys and its first FIRST_BATCH labels (one AES
    call each, crypto/sse.py), one search of all the labels, and the values of the found
    entries decrypted and checked as Dictionary.search does (check word zero, row below
    the segment's count). A segment whose first labels are all found holds more: its own
    Dictionary.search answers it. An entry counts only in the segment it belongs to."""

    def __init__(self, segments: Sequence[SegmentKeywords]) -> None:
        self.segments = list(segments)
        self.index = {s.segment_id: i for i, s in enumerate(self.segments)}
        sizes = [len(s.dictionary) for s in self.segments]
        hi = np.concatenate([s.dictionary.hi for s in self.segments])
        lo = np.concatenate([s.dictionary.lo for s in self.segments])
        owner = np.repeat(np.arange(len(self.segments), dtype=np.int32), sizes)
        order = np.lexsort((lo, hi))
        self.hi, self.lo, self.owner = hi[order], lo[order], owner[order]
        self.values = np.concatenate([s.dictionary.values for s in self.segments])[order]
        # Two segments' labels sharing their first 8 bytes (probability ~ n^2 / 2^65):
        # the single search would find one of them only; such a table is not used.
        self.usable = hi.size < 2 or bool(np.all(self.hi[1:] > self.hi[:-1]))

    def rows(self, token: KeywordToken, wanted: Sequence[str]) -> dict[str, U32]:
        """Rows of the token's keyword in each segment of ``wanted`` (all in this table)."""
        batch = FIRST_BATCH
        chosen = [self.segments[self.index[s]] for s in wanted]
        keys = [segment_keys(token, s.repo_id, s.segment_id, s.key_version) for s in chosen]
        raw = b"".join(prf_blocks(k1, 0, batch) for k1, _ in keys)
        labels = np.frombuffer(raw, np.uint8).reshape(-1, 16)
        needles = np.ascontiguousarray(labels).view(">u8").reshape(-1, 2).astype(np.uint64)
        at = np.minimum(np.searchsorted(self.hi, needles[:, 0]), self.hi.size - 1)
        owners = np.repeat(np.asarray([self.index[s] for s in wanted], dtype=np.int32), batch)
        hit = ((self.hi[at] == needles[:, 0]) & (self.lo[at] == needles[:, 1])
               & (self.owner[at] == owners)).reshape(len(chosen), batch)
        full = hit.all(axis=1)
        counts = np.where(full, batch, np.argmin(hit, axis=1))
        at = at.reshape(len(chosen), batch)
        out: dict[str, U32] = {}
        empty = np.zeros(0, dtype=np.uint32)
        for i, segment in enumerate(chosen):
            n = int(counts[i])
            if full[i]:
                out[segment.segment_id] = segment.rows(token)
            elif n == 0:
                out[segment.segment_id] = empty
            else:
                pads = np.frombuffer(prf_blocks(keys[i][1], 0, n), np.uint8).reshape(
                    n, 16)[:, :8]
                plain = np.bitwise_xor(self.values[at[i, :n]], pads)
                words = np.ascontiguousarray(plain).view(">u4").reshape(n, 2)
                if np.any(words[:, 1] != 0) or np.any(words[:, 0] >= segment.row_count):
                    raise FormatError(f"keyword dictionary of segment {segment.segment_id} "
                                      "does not belong to this segment, repository or key "
                                      "version")
                out[segment.segment_id] = words[:, 0].astype(np.uint32)
        return out


@dataclass(frozen=True)
class KeywordAnswer:
    """The images a keyword query matched in the segments searched (unique, in segment
    then row order), and which segments those were (sorted)."""

    ids: NDArray[np.void]
    segment_ids: list[str]
    images: int  # rows of the segments searched


class KeywordView:
    """The service's keyword side of one repository and key version: each searched
    segment's parsed dictionary and ids (loaded once: segments are immutable) and the
    live label objects. Holds no key."""

    def __init__(self, repo_id: str, key_version: int) -> None:
        self.repo_id = repo_id
        self.key_version = key_version
        self.segments: dict[str, _Loaded] = {}
        self.without: set[str] = set()  # segments with no dictionary
        self._lock = threading.Lock()
        # Answers by query bytes while nothing changed: tokens are deterministic, so a
        # repeated filter (one --where over several query images) is looked up once.
        # Nothing new leaks: the service sees the repetition anyway (docs/KEYWORDS.md 5).
        self._answers: OrderedDict[bytes, KeywordAnswer] = OrderedDict()
        self._merged: _Merged | None = None
        self._build = threading.Lock()

    def update(self, source: KeywordSource, segment_ids: Sequence[str],
               context: object = None) -> None:
        """Follow the segments the vector index searches now: load the new ones'
        dictionaries, forget the ones no longer live, read the live labels again."""
        with self._lock:
            self._answers.clear()
            live = set(segment_ids)
            for gone in set(self.segments) - live:
                del self.segments[gone]
            self.without &= live
            for seg_id in segment_ids:
                if seg_id in self.segments or seg_id in self.without:
                    continue
                found = source.segment(self.repo_id, seg_id, self.key_version, context)
                if found is None:
                    self.without.add(seg_id)
                    continue
                ids = np.ascontiguousarray(found.ids).view(ID16).reshape(-1)
                keywords = SegmentKeywords.load(found.dictionary, self.repo_id, seg_id,
                                                self.key_version, len(ids))
                self.segments[seg_id] = _Loaded(keywords, ids)
            attached: dict[str, list[tuple[tuple[int, str], bool, SegmentKeywords]]] = {}
            for label in source.labels(self.repo_id, self.key_version, context):
                target = self.segments.get(label.segment_id)
                if target is None or label.key_version != self.key_version:
                    continue  # its segment is not live (the rewrite removes it too)
                if label.row_count != len(target.ids):
                    raise FormatError(f"label object {label.label_id} names "
                                      f"{label.row_count} rows, its segment "
                                      f"{label.segment_id} has {len(target.ids)}")
                attached.setdefault(label.segment_id, []).append(
                    (label.order, label.removal,
                     SegmentKeywords.load(label.dictionary, self.repo_id, label.label_id,
                                          label.key_version, label.row_count)))
            for seg_id, loaded in self.segments.items():
                loaded.labels = [(removal, kw) for _, removal, kw
                                 in sorted(attached.get(seg_id, []), key=lambda x: x[0])]
            release = getattr(source, "release", None)
            if release is not None:
                release(self.repo_id, [*self.segments, *self.without])

    def evaluate(self, query: TokenQuery) -> KeywordAnswer:
        """The images matching ``query`` in every segment with a dictionary."""
        key = query.to_bytes()
        with self._lock:
            known = self._answers.get(key)
            if known is not None:
                self._answers.move_to_end(key)
                return known
            loaded_now = sorted(self.segments.items())
        merged = self._merged_table([s for s, _ in loaded_now])
        found: dict[str, dict[bytes, U32]] = {}
        if merged is not None:
            inside = [s for s, _ in loaded_now if s in merged.index]
            for token in {t.to_bytes(): t for c in query.clauses for t in c.tokens}.values():
                for seg_id, rows in merged.rows(token, inside).items():
                    found.setdefault(seg_id, {})[token.to_bytes()] = rows
        segments: list[tuple[str, SegmentKeywords, NDArray[np.void]]] = []
        for seg_id, loaded in loaded_now:
            view: SegmentKeywords = loaded.keywords
            if seg_id in found:
                view = _Prepared(loaded, found[seg_id])
            elif loaded.labels:
                view = _Labelled(loaded)
            segments.append((seg_id, view, loaded.ids))
        answer = self._evaluate(query, segments)
        with self._lock:
            if len(self._answers) >= ANSWERS_KEPT:
                self._answers.popitem(last=False)
            self._answers[key] = answer
        return answer

    def _merged_table(self, live: Sequence[str]) -> _Merged | None:
        """The merged table of the live segments' dictionaries, built again when too many
        segments were loaded since (or a quarter of it is no longer live); None below
        MERGE_MIN segments or when it is not usable."""
        if len(live) < MERGE_MIN:
            return None
        with self._build:
            merged = self._merged
            if merged is not None:
                missing = sum(1 for s in live if s not in merged.index)
                stale = len(merged.index) - (len(live) - missing)
                if missing <= UNMERGED_MAX and 4 * stale <= len(merged.index):
                    return merged if merged.usable else None
            with self._lock:
                chosen = [self.segments[s].keywords for s in live if s in self.segments]
            merged = _Merged(chosen)
            self._merged = merged
            return merged if merged.usable else None

    def forget_answers(self) -> None:
        """Drop the remembered answers (a benchmark times the evaluation itself)."""
        with self._lock:
            self._answers.clear()

    @staticmethod
    def _evaluate(query: TokenQuery,
                  segments: list[tuple[str, SegmentKeywords, NDArray[np.void]]]
                  ) -> KeywordAnswer:
        parts: list[NDArray[np.void]] = []
        images = 0
        for _, keywords, ids in segments:
            images += len(ids)
            rows = keywords.evaluate(query)
            if rows.size:
                parts.append(ids[rows])
        seg_ids = [s for s, _, _ in segments]
        if not parts:
            return KeywordAnswer(np.zeros(0, dtype=ID16), seg_ids, images)
        found = _first_of_each(np.concatenate(parts))
        return KeywordAnswer(found, seg_ids, images)


def _first_of_each(ids: NDArray[np.void]) -> NDArray[np.void]:
    """``ids`` with each id once, at its first place: the same image in two segments
    (imported twice) is answered once. Checked on the first 8 bytes (one sort), the whole
    ids compared only when two share them."""
    if ids.size < 2:
        return ids
    keys = np.ascontiguousarray(ids).view(">u8").reshape(-1, 2)
    order = np.argsort(keys[:, 0], kind="stable")
    same = keys[order[1:], 0] == keys[order[:-1], 0]
    if not same.any():
        return ids
    keep = np.ones(ids.size, dtype=bool)
    seen: set[bytes] = set()
    for i in np.sort(np.unique(np.concatenate([order[1:][same], order[:-1][same]]))).tolist():
        raw = bytes(ids[i])
        keep[i] = raw not in seen
        seen.add(raw)
    return ids[keep]


class IdLookup:
    """Positions of image ids among a key version's rows (each id once), sorted once per
    index (about 0.1 s at 1M rows), then looked up by binary search: the row subset the
    engine ranks in a combined query."""

    def __init__(self, all_ids: NDArray[np.void]) -> None:
        keys = np.ascontiguousarray(all_ids).view(">u8").reshape(-1, 2).astype(np.uint64)
        self.order = np.lexsort((keys[:, 1], keys[:, 0]))
        self.hi = keys[self.order, 0]
        self.lo = keys[self.order, 1]

    def positions(self, wanted: NDArray[np.void]) -> NDArray[np.int64]:
        """Positions of the ``wanted`` ids that are present, increasing."""
        n = self.hi.shape[0]
        if not wanted.size or not n:
            return np.zeros(0, dtype=np.int64)
        needles = np.ascontiguousarray(wanted).view(">u8").reshape(-1, 2).astype(np.uint64)
        at = np.searchsorted(self.hi, needles[:, 0])
        clipped = np.minimum(at, n - 1)
        hit = (self.hi[clipped] == needles[:, 0]) & (self.lo[clipped] == needles[:, 1])
        found = [self.order[clipped[hit]]]
        # Ids sharing their first 8 bytes with another (never seen with random ids): walk.
        near = np.flatnonzero(~hit & (self.hi[clipped] == needles[:, 0]))
        for j in near.tolist():
            i = int(at[j])
            while i < n and self.hi[i] == needles[j, 0]:
                if self.lo[i] == needles[j, 1]:
                    found.append(self.order[i : i + 1])
                    break
                i += 1
        return np.sort(np.concatenate(found)).astype(np.int64)

