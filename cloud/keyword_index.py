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

import functools
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from cloud.keyword_kernels import decode_packed_many as compiled_decode
from cloud.keyword_kernels import find_labels
from crypto.errors import FormatError
from crypto.sse import (
    LABEL_SIZE,
    PACKED,
    PACKED_VALUE_SIZE,
    TOKEN_SIZE,
    Dictionary,
    EntryStream,
    KeywordToken,
)

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
                rows = rows[self._holds(other, rows)]
        else:
            rows = np.arange(self.row_count, dtype=np.uint32)
        for i, clause in negative:
            if not rows.size:
                break
            rows = rows[~self._holds(rows_of(i, clause), rows)]
        return rows.astype(np.uint32)

    def _holds(self, members: U32, rows: U32) -> NDArray[np.bool_]:
        """Which of ``rows`` are among ``members`` (both rows of this segment): one mask
        of the segment's rows, linear, where np.intersect1d sorts both (an AND of two
        keywords on a quarter and an eighth of a segment cost twice as much)."""
        mask = np.zeros(self.row_count, dtype=bool)
        mask[members] = True
        return mask[rows]


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
    """The labels of many segments' version-2 dictionaries (Pi_pack) as one sorted table,
    so that a token is looked up in every segment at once, in two binary searches in all,
    instead of a few per segment: at 100 segments the per-segment calls, not the rows,
    were the cost of a keyword (about 0.15 ms a segment).

    Per token: every segment's key (crypto/sse.py) and its first entry's label and pad
    (one AES call each); one search of all the first labels; each found first entry's
    count says how many entries follow, whose labels and pads are computed exactly (one
    AES call per segment holding more than fifteen rows) and searched in one go; then
    every entry is decoded and checked together (cloud/keyword_kernels.py). An entry
    counts only in the segment it belongs to. The table keeps labels and where each entry
    lives, not the values (those stay in the segments' dictionaries, once in memory).
    Segments of the older layout (Pi_bas) are not in the table: searched one by one."""

    def __init__(self, segments: Sequence[SegmentKeywords]) -> None:
        self.seen = {s.segment_id for s in segments}  # those of the older layout too
        self.segments = [s for s in segments if s.dictionary.version == PACKED]
        self.index = {s.segment_id: i for i, s in enumerate(self.segments)}
        sizes = [len(s.dictionary) for s in self.segments]
        empty = np.zeros(0, dtype=np.uint64)
        hi = np.concatenate([empty, *(s.dictionary.hi for s in self.segments)])
        lo = np.concatenate([empty, *(s.dictionary.lo for s in self.segments)])
        owner = np.repeat(np.arange(len(self.segments), dtype=np.int32), sizes)
        order = np.lexsort((lo, hi))
        self.hi, self.lo = hi[order], lo[order]
        self.owner = owner[order]
        # The values too, in table order (64 bytes an entry, 75 MB at a million images):
        # a query's entries are then gathered in one call, not one per segment.
        self.values = np.concatenate([np.zeros((0, PACKED_VALUE_SIZE), dtype=np.uint8),
                                      *(s.dictionary.values for s in self.segments)])[order]
        # Two segments' labels sharing their first 8 bytes (probability ~ n^2 / 2^65):
        # the single search would find one of them only; such a table is not used.
        self.usable = hi.size < 2 or bool(np.all(self.hi[1:] > self.hi[:-1]))
        # Labels are PRF outputs, uniform over 64 bits: their top bits index a bucket of
        # about one entry each (a direct-address table, one int32 per bucket), so a label
        # is found with two gathers instead of a sort of the labels and a binary search.
        bits = max(1, int(self.hi.size).bit_length())
        self.shift = np.uint64(64 - bits)
        buckets = (self.hi >> self.shift).astype(np.int64)
        self.starts = np.searchsorted(buckets, np.arange((1 << bits) + 1)).astype(np.int32)

    def _find(self, labels: NDArray[np.uint8], owners: NDArray[np.int32]) -> NDArray[np.int64]:
        """Each label's place in the table (its owner's entry), -1 where absent: one
        compiled walk of each label's bucket (cloud/keyword_kernels.py)."""
        needles = np.ascontiguousarray(labels).view(">u8").astype(np.uint64)
        return find_labels(self.hi, self.lo, self.owner, self.starts, int(self.shift),
                           needles, owners)

    def rows(self, token: KeywordToken, wanted: Sequence[str]) -> dict[str, U32]:
        """Rows of the token's keyword in each segment of ``wanted`` (all in this table)."""
        chosen = [self.index[s] for s in wanted]
        segments = [self.segments[i] for i in chosen]
        out: dict[str, U32] = {s.segment_id: _NO_ROWS for s in segments}
        if not segments:
            return out
        keys = [EntryStream(s.dictionary.keys(token, s.repo_id, s.segment_id,
                                              s.key_version)[0]) for s in segments]
        firsts = np.concatenate([key.entries(0, 1) for key in keys])
        owners = np.asarray(chosen, dtype=np.int32)
        where = self._find(firsts[:, :LABEL_SIZE], owners)
        present = np.flatnonzero(where >= 0)
        if not present.size:
            return out
        # Each found first entry's count of entries (its check word), checked at once.
        words = np.bitwise_xor(self.values[where[present], :4],
                               firsts[present, LABEL_SIZE : LABEL_SIZE + 4])
        counts = np.ascontiguousarray(words).view(">u4").reshape(-1).astype(np.int64)
        sizes = np.asarray([len(segments[j].dictionary) for j in present.tolist()])
        wrong = (counts < 1) | (counts > sizes)
        if wrong.any():
            raise _not_here(segments[int(present[np.argmax(wrong)])].segment_id)
        places: list[NDArray[np.int64]] = [where[present]]
        pads: list[NDArray[np.uint8]] = [firsts[present, LABEL_SIZE:]]
        owner_of = [np.arange(present.size, dtype=np.int64)]
        more = np.flatnonzero(counts > 1)
        if more.size:
            streams = [keys[int(present[m])].entries(1, int(counts[m]) - 1)
                       for m in more.tolist()]
            stream = np.concatenate(streams)
            extra = counts[more] - 1
            found = self._find(stream[:, :LABEL_SIZE], np.repeat(owners[present[more]], extra))
            if np.any(found < 0):  # a count names entries that are not there
                missing = np.repeat(more, extra)[np.flatnonzero(found < 0)[0]]
                raise _not_here(segments[int(present[missing])].segment_id)
            places.append(found)
            pads.append(stream[:, LABEL_SIZE:])
            owner_of.append(np.repeat(more, extra))
        # Group every entry by its segment, in counter order (the first entries, then the
        # rest in the order they were computed: a stable sort by segment keeps it).
        owner_all = np.concatenate(owner_of)
        order = np.argsort(owner_all, kind="stable")
        row_counts = np.asarray([segments[j].row_count for j in present.tolist()],
                                dtype=np.int64)
        rows, per_segment, bad = compiled_decode(
            self.values[np.concatenate(places)[order]], np.concatenate(pads)[order],
            owner_all[order], row_counts)
        if bad.any():
            raise _not_here(segments[int(present[np.argmax(bad)])].segment_id)
        split = np.split(rows, np.cumsum(per_segment)[:-1])
        for j, part in zip(present.tolist(), split, strict=True):
            out[segments[j].segment_id] = part
        return out


_NO_ROWS = np.zeros(0, dtype=np.uint32)


def _not_here(segment_id: str) -> FormatError:
    return FormatError(f"keyword dictionary of segment {segment_id} does not belong to this "
                       "segment, repository or key version")


@dataclass(frozen=True)
class KeywordAnswer:
    """The images a keyword query matched in the segments searched, and which segments
    those were (sorted). ``parts``: per segment with a match, its ids and the matching
    rows (what IdLookup.answer_positions maps to the engine's rows without looking every
    id up); ``distinct``: no id is in two segments. ``ids`` (unique, in segment then row
    order) is made when asked: a combined query never needs it, a keyword-only answer
    only its first k (``first``) and how many (``matched``)."""

    segment_ids: list[str]
    images: int  # rows of the segments searched
    parts: tuple[tuple[str, NDArray[np.void], U32], ...] = ()
    distinct: bool = False

    @functools.cached_property
    def ids(self) -> NDArray[np.void]:
        if not self.parts:
            return np.zeros(0, dtype=ID16)
        found = np.concatenate([ids[rows] for _, ids, rows in self.parts])
        return found if self.distinct else _first_of_each(found)

    @property
    def matched(self) -> int:
        """How many images matched (each once)."""
        if self.distinct:
            return sum(int(rows.size) for _, _, rows in self.parts)
        return int(self.ids.size)

    def first(self, k: int) -> NDArray[np.void]:
        """The first ``k`` of ``ids``, without making the others when ids are distinct."""
        if not self.distinct:
            return self.ids[:k]
        taken: list[NDArray[np.void]] = []
        left = k
        for _, ids, rows in self.parts:
            if left <= 0:
                break
            taken.append(ids[rows[:left]])
            left -= min(left, int(rows.size))
        return np.concatenate(taken) if taken else np.zeros(0, dtype=ID16)


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
        self._distinct: bool | None = None  # no id in two live segments (None: not known)

    def update(self, source: KeywordSource, segment_ids: Sequence[str],
               context: object = None) -> None:
        """Follow the segments the vector index searches now: load the new ones'
        dictionaries, forget the ones no longer live, read the live labels again."""
        with self._lock:
            self._answers.clear()
            self._distinct = None
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
        # One keyword, no label objects: a segment's rows are the merged lookup's as they
        # are (no per-segment evaluation: about 20 us a segment).
        single = (len(query.clauses) == 1 and len(query.clauses[0].tokens) == 1
                  and not query.clauses[0].negated)
        token_bytes = query.clauses[0].tokens[0].to_bytes() if single else b""
        together = (merged is not None and not single and len(found) == len(loaded_now)
                    and not any(loaded.labels for _, loaded in loaded_now))
        if together:
            answer = _evaluate_together(query, loaded_now, found,
                                        self._ids_distinct(loaded_now))
        else:
            segments: list[tuple[str, SegmentKeywords | U32, NDArray[np.void]]] = []
            for seg_id, loaded in loaded_now:
                view: SegmentKeywords | U32 = loaded.keywords
                if single and not loaded.labels and seg_id in found:
                    view = found[seg_id][token_bytes]
                elif seg_id in found:
                    view = _Prepared(loaded, found[seg_id])
                elif loaded.labels:
                    view = _Labelled(loaded)
                segments.append((seg_id, view, loaded.ids))
            answer = self._evaluate(query, segments, self._ids_distinct(loaded_now))
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
                missing = sum(1 for s in live if s not in merged.seen)
                stale = len(merged.seen) - (len(live) - missing)
                if missing <= UNMERGED_MAX and 4 * stale <= len(merged.seen):
                    return merged if merged.usable else None
            with self._lock:
                chosen = [self.segments[s].keywords for s in live if s in self.segments]
            merged = _Merged(chosen)
            self._merged = merged
            return merged if merged.usable else None

    def _ids_distinct(self, loaded: Sequence[tuple[str, _Loaded]]) -> bool:
        """Whether no image id is in two of the live segments (an image imported twice):
        then an answer needs no de-duplication (a sort of every matching id, 10 ms for an
        eighth of a million). Known once per change of the live set: one sort of the
        first 8 bytes of every id (about 0.1 s at 1M), ids sharing them compared whole."""
        known = self._distinct
        if known is not None:
            return known
        every = [x.ids for _, x in loaded]
        distinct = True
        if every:
            all_ids = np.concatenate(every)
            distinct = _first_of_each(all_ids).size == all_ids.size
        with self._lock:
            self._distinct = distinct
        return distinct

    def forget_answers(self) -> None:
        """Drop the remembered answers (a benchmark times the evaluation itself)."""
        with self._lock:
            self._answers.clear()

    @staticmethod
    def _evaluate(query: TokenQuery,
                  segments: list[tuple[str, SegmentKeywords | U32, NDArray[np.void]]],
                  distinct: bool) -> KeywordAnswer:
        """Each segment's rows (found already, or evaluated on its keywords)."""
        matched: list[tuple[str, NDArray[np.void], U32]] = []
        images = 0
        for seg_id, keywords, ids in segments:
            images += len(ids)
            rows = keywords if isinstance(keywords, np.ndarray) else keywords.evaluate(query)
            if rows.size:
                matched.append((seg_id, ids, rows))
        seg_ids = [s for s, _, _ in segments]
        return KeywordAnswer(seg_ids, images, tuple(matched), distinct)


def _evaluate_together(query: TokenQuery, loaded: Sequence[tuple[str, _Loaded]],
                       found: dict[str, dict[bytes, U32]], distinct: bool) -> KeywordAnswer:
    """A query of several clauses (or a negation) over every segment at once, from the
    merged lookup's rows of each token (``found``, every segment, no label objects): each
    segment's rows numbered after those of the segments before it, then the same boolean
    evaluation as SegmentKeywords.evaluate (the smallest positive clause first, each other
    clause a mask of all the rows) in a few array operations, not a hundred segments'
    Python calls (an AND of two keywords at 100 segments: about 2 ms of 10)."""
    counts = np.asarray([x.keywords.row_count for _, x in loaded], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    total = int(starts[-1])

    def clause_rows(clause: TokenClause) -> NDArray[np.int64]:
        parts = [np.asarray(found[seg_id][t.to_bytes()], dtype=np.int64) + starts[i]
                 for t in clause.tokens for i, (seg_id, _) in enumerate(loaded)]
        every = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return every if len(clause.tokens) <= 1 else np.unique(every)

    def mask_of(rows: NDArray[np.int64]) -> NDArray[np.bool_]:
        mask = np.zeros(total, dtype=bool)
        mask[rows] = True
        return mask

    positive = sorted((clause_rows(c) for c in query.clauses if not c.negated), key=len)
    rows = positive[0] if positive else np.arange(total, dtype=np.int64)
    for other in positive[1:]:
        if not rows.size:
            break
        rows = rows[mask_of(other)[rows]]
    for clause in (c for c in query.clauses if c.negated):
        if not rows.size:
            break
        rows = rows[~mask_of(clause_rows(clause))[rows]]
    bounds = np.searchsorted(rows, starts)
    matched: list[tuple[str, NDArray[np.void], U32]] = []
    for i, (seg_id, x) in enumerate(loaded):
        if bounds[i + 1] > bounds[i]:
            matched.append((seg_id, x.ids,
                            (rows[bounds[i]:bounds[i + 1]] - starts[i]).astype(np.uint32)))
    images = sum(len(x.ids) for _, x in loaded)
    return KeywordAnswer([s for s, _ in loaded], images, tuple(matched), distinct)


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
    engine ranks in a combined query.

    A keyword answer's rows are mapped through each segment's positions, looked up once
    per segment and index (``answer_positions``): looking up an eighth of a million ids
    per query took 37 ms at 1M rows, a gather through the cached positions about 1."""

    def __init__(self, all_ids: NDArray[np.void]) -> None:
        keys = np.ascontiguousarray(all_ids).view(">u8").reshape(-1, 2).astype(np.uint64)
        self.order = np.lexsort((keys[:, 1], keys[:, 0]))
        self.hi = keys[self.order, 0]
        self.lo = keys[self.order, 1]
        self._segments: dict[str, NDArray[np.int64]] = {}
        self._lock = threading.Lock()

    def each(self, wanted: NDArray[np.void]) -> NDArray[np.int64]:
        """The position of every ``wanted`` id, -1 where absent (aligned with ``wanted``)."""
        n = self.hi.shape[0]
        out = np.full(wanted.size, -1, dtype=np.int64)
        if not wanted.size or not n:
            return out
        needles = np.ascontiguousarray(wanted).view(">u8").reshape(-1, 2).astype(np.uint64)
        at = np.searchsorted(self.hi, needles[:, 0])
        clipped = np.minimum(at, n - 1)
        hit = (self.hi[clipped] == needles[:, 0]) & (self.lo[clipped] == needles[:, 1])
        out[hit] = self.order[clipped[hit]]
        # Ids sharing their first 8 bytes with another (never seen with random ids): walk.
        near = np.flatnonzero(~hit & (self.hi[clipped] == needles[:, 0]))
        for j in near.tolist():
            i = int(at[j])
            while i < n and self.hi[i] == needles[j, 0]:
                if self.lo[i] == needles[j, 1]:
                    out[j] = self.order[i]
                    break
                i += 1
        return out

    def positions(self, wanted: NDArray[np.void]) -> NDArray[np.int64]:
        """Positions of the ``wanted`` ids that are present, increasing."""
        found = self.each(wanted)
        return np.unique(found[found >= 0]).astype(np.int64)

    def answer_positions(self, answer: KeywordAnswer) -> NDArray[np.int64]:
        """The engine's rows of a keyword answer's images, increasing, each once: per
        segment its rows' positions (cached), segments in the order of their first
        position (each segment's rows are appended together, so the concatenation is
        already increasing unless an image is in two segments: then sorted)."""
        parts: list[tuple[int, NDArray[np.int64]]] = []
        for seg_id, ids, rows in answer.parts:
            with self._lock:
                known = self._segments.get(seg_id)
            if known is None or known.size != ids.size:
                known = self.each(ids)
                with self._lock:
                    self._segments[seg_id] = known
            found = known[rows]
            found = found[found >= 0]
            if found.size:
                parts.append((int(found[0]), found))
        if not parts:
            return np.zeros(0, dtype=np.int64)
        parts.sort(key=lambda part: part[0])
        out = np.concatenate([p for _, p in parts])
        if out.size > 1 and not bool(np.all(out[1:] > out[:-1])):
            out = np.unique(out)
        return out.astype(np.int64)

