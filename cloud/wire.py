"""Wire protocol 2: the binary search request and answer (docs/FORMAT-2.md 8).

Protocol 1 sends a base64 token inside JSON and answers JSON floats; at 100k images that
costs more than the search. Protocol 2 sends the query token (format version 2) behind a
32-byte request header and answers fixed-width little-endian arrays, together with what the
client needs to judge completeness (the service's log head, the SHA-256 of its head entry
and the digest of the segment set it searched, FORMAT-2 6). Everything here is pure bytes:
the service decodes requests and encodes answers, the client the reverse, and each side
refuses what the other must not be trusted with (sizes, counts, non-finite numbers,
padding) before allocating anything from it.

Layouts (little-endian throughout, every array at a multiple of 8 from the body's start):

request   magic "RCSQ" | protocol u16 = 2 | flags u16 | key_version u32 | k u32 |
          min_head u64 | reserved u64 = 0 | query token v2
token v2  magic "RCQT" | version u16 = 2 | levels u16 | queries u32 | reserved u32 = 0 |
          widths u32 x (levels + 1) | zero pad to 8 | f64 arrays, cheapest level first, full last
answer    magic "RCSA" | protocol u16 = 2 | flags u16 | queries u32 | k u32 | key_version u32 |
          segments u32 | images u64 | head_sequence u64 | head_hash 32 | set_digest 32 |
          engine_us u32 | reserved u32 = 0 | hit counts u32 x Q | zero pad to 8 |
          image ids 16 x H | scores f64 x H | [segment ids 16 x S] | [stats, per query:
          vectors u64 | full_scored u64 | milliseconds f64 | batch u32 | levels u32 |
          level_scored u64 x levels] | [keywords: matched u64 | reserved u64 = 0]

Keyword search (issue 17, docs/KEYWORDS.md): the request flag KEYWORDS puts a keyword
section right behind the 32-byte header, ``length u32 | reserved u32 = 0 | RCKQ query
(cloud/keyword_index.py TokenQuery) | zero pad to 8``, then the query token as before:
the engine ranks only the rows the keyword query matches (a combined query). With
KEYWORDS_ONLY as well there is no query token at all: one query, and ``k`` (1..
MAX_KEYWORD_HITS) bounds the image ids answered, every score 0.0, in the order of the
segments (ascending id) and their rows. Either way the answer carries the KEYWORDS
section: how many images the keyword query matched in the segments searched (more than
the hits when a keyword-only answer was cut at k).
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from cloud.limits import MAX_K, MAX_QUERIES
from cloud.seglog import set_digest
from crypto.errors import FormatError
from crypto.tokens import MAX_LEVELS, MAX_TOKEN_WIDTH, QueryToken

PROTOCOL = 2
SUPPORTED = (1, 2)
FLAG_LIST_SEGMENTS = 1  # request: list the searched segment ids; answer: the list is present
FLAG_STATS = 2  # request: per-query engine statistics; answer: the section is present
FLAG_KEYWORDS = 4  # request: a keyword query section; answer: the matched count
FLAG_KEYWORDS_ONLY = 8  # request: no query token, the keyword query alone (with KEYWORDS)
KNOWN_FLAGS = FLAG_LIST_SEGMENTS | FLAG_STATS | FLAG_KEYWORDS | FLAG_KEYWORDS_ONLY
ANSWER_FLAGS = FLAG_LIST_SEGMENTS | FLAG_STATS | FLAG_KEYWORDS
MAX_KEYWORD_HITS = 100_000
"""Image ids a keyword-only answer may carry (2.4 MB): a query matching more says so
(``matched``) and the client asks for a narrower one."""
PROTOCOL_HEADER = "x-radcrypt-protocol"
REQUEST_MEDIA_TYPE = "application/x-radcrypt-search"
ANSWER_MEDIA_TYPE = "application/x-radcrypt-answer"

REQUEST_MAGIC = b"RCSQ"
ANSWER_MAGIC = b"RCSA"
TOKEN_MAGIC = b"RCQT"
TOKEN_VERSION = 2
HASH_SIZE = 32
ID_SIZE = 16
MAX_ENGINE_US = 0xFFFFFFFF

_REQUEST = struct.Struct("<4sHHIIQQ")  # 32 bytes
_TOKEN = struct.Struct("<4sHHII")  # 16 bytes
_ANSWER = struct.Struct("<4sHHIIIIQQ32s32sII")  # 112 bytes
_STATS = struct.Struct("<QQdII")  # 32 bytes, then level_scored u64 x levels
_KEYWORDS = struct.Struct("<II")  # keyword section of a request: length, reserved
_MATCHED = struct.Struct("<QQ")  # keyword section of an answer: matched, reserved


class WireError(ValueError):
    """A protocol-2 body that must be refused: ``status`` is the HTTP status the service
    answers (400 version, 422 content); on the client side, a malformed answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _pad8(n: int) -> int:
    return -n % 8


# --- query token, format version 2 ------------------------------------------------------


def encode_token_v2(token: QueryToken) -> bytes:
    """The token's bytes (format version 2, little-endian)."""
    widths = token.widths
    head = _TOKEN.pack(TOKEN_MAGIC, TOKEN_VERSION, len(token.levels), len(token), 0)
    dims = struct.pack(f"<{len(widths)}I", *widths)
    pad = bytes(_pad8(len(head) + len(dims)))
    arrays = [np.ascontiguousarray(a, dtype="<f8").tobytes() for a in (*token.levels, token.full)]
    return head + dims + pad + b"".join(arrays)


def decode_token_v2(data: bytes | memoryview, max_queries: int = MAX_QUERIES) -> QueryToken:
    """Parse and validate a token; every inconsistency is a FormatError naming the field."""
    if len(data) < _TOKEN.size:
        raise FormatError("query token v2 is truncated (header)")
    magic, version, n_levels, n_queries, reserved = _TOKEN.unpack_from(data)
    if magic != TOKEN_MAGIC:
        raise FormatError("query token v2: bad magic bytes")
    if version != TOKEN_VERSION:
        raise FormatError(f"query token v2: unsupported version {version}")
    if reserved != 0:
        raise FormatError("query token v2: reserved field must be zero")
    if n_levels > MAX_LEVELS:
        raise FormatError(f"query token v2: too many levels ({n_levels} > {MAX_LEVELS})")
    if not 1 <= n_queries <= max_queries:
        raise FormatError(f"query token v2: query count {n_queries} not in 1..{max_queries}")
    offset = _TOKEN.size
    dims_end = offset + 4 * (n_levels + 1)
    arrays_at = dims_end + _pad8(dims_end)
    if len(data) < arrays_at:
        raise FormatError("query token v2 is truncated (widths)")
    widths = struct.unpack_from(f"<{n_levels + 1}I", data, offset)
    for i, width in enumerate(widths):
        if not 1 <= width <= MAX_TOKEN_WIDTH:
            raise FormatError(f"query token v2: width {i} ({width}) not in 1..{MAX_TOKEN_WIDTH}")
    if any(bytes(data[dims_end:arrays_at])):
        raise FormatError("query token v2: padding after the widths must be zero")
    expected = arrays_at + 8 * n_queries * sum(widths)
    if len(data) != expected:
        raise FormatError(f"query token v2: length {len(data)} != expected {expected}")
    arrays = []
    offset = arrays_at
    for width in widths:
        count = n_queries * width
        array = np.frombuffer(data, "<f8", count, offset).reshape(n_queries, width)
        if not np.isfinite(array).all():
            raise FormatError("query token v2: contains non-finite numbers")
        arrays.append(array.astype(np.float64))
        offset += 8 * count
    return QueryToken(full=arrays[-1], levels=tuple(arrays[:-1]))


# --- search request --------------------------------------------------------------------


@dataclass(frozen=True)
class SearchRequestV2:
    """One protocol-2 search: a token of Q queries, k nearest each, for one key version.

    ``keywords``: the RCKQ bytes of a keyword query (flag KEYWORDS), b"" without; with
    the flag KEYWORDS_ONLY ``token`` is None and ``k`` bounds the ids answered."""

    key_version: int
    k: int
    min_head: int
    flags: int
    token: QueryToken | None
    keywords: bytes = b""

    @property
    def queries(self) -> int:
        return 1 if self.token is None else len(self.token)


def encode_request(req: SearchRequestV2) -> bytes:
    head = _REQUEST.pack(REQUEST_MAGIC, PROTOCOL, req.flags, req.key_version, req.k,
                         req.min_head, 0)
    if not req.flags & FLAG_KEYWORDS:
        assert req.token is not None, "a search without keywords needs a query token"
        return head + encode_token_v2(req.token)
    section = _KEYWORDS.pack(len(req.keywords), 0) + req.keywords
    section += bytes(_pad8(len(section)))
    if req.flags & FLAG_KEYWORDS_ONLY:
        return head + section
    assert req.token is not None, "a combined search needs a query token"
    return head + section + encode_token_v2(req.token)


def body_protocol(body: bytes) -> int | None:
    """The protocol a request body claims (bytes 4..5 behind the magic), or None when it
    does not start like a protocol-2 request: the Gate compares it with the header before
    authentication."""
    if len(body) < 6 or body[:4] != REQUEST_MAGIC:
        return None
    return int(struct.unpack_from("<H", body, 4)[0])


def unsupported(version: object) -> WireError:
    return WireError(400, f"unsupported protocol version {version}")


def decode_request(body: bytes) -> SearchRequestV2:
    """The request, or WireError: 400 for the wrong magic or version, 422 for the rest."""
    claimed = body_protocol(body)
    if claimed is None:
        raise WireError(400, "search request: bad magic bytes (not a protocol 2 request)")
    if claimed != PROTOCOL:
        raise unsupported(claimed)
    if len(body) < _REQUEST.size:
        raise WireError(422, "search request is truncated (header)")
    _, _, flags, key_version, k, min_head, reserved = _REQUEST.unpack_from(body)
    if flags & ~KNOWN_FLAGS:
        raise WireError(422, f"search request: unknown flag bits {flags & ~KNOWN_FLAGS:#x}")
    if key_version < 1:
        raise WireError(422, "search request: key_version must be >= 1")
    if k < 1 or (k > MAX_K and not flags & FLAG_KEYWORDS_ONLY):
        raise WireError(422, f"search request: k {k} not in 1..{MAX_K}")
    if min_head >= 1 << 63:
        raise WireError(422, "search request: min_head out of range")
    if reserved != 0:
        raise WireError(422, "search request: reserved field must be zero")
    offset, keywords = _REQUEST.size, b""
    if flags & FLAG_KEYWORDS_ONLY and not flags & FLAG_KEYWORDS:
        raise WireError(422, "search request: flag KEYWORDS_ONLY without KEYWORDS")
    if flags & FLAG_KEYWORDS:
        if len(body) < offset + _KEYWORDS.size:
            raise WireError(422, "search request is truncated (keyword section)")
        length, kw_reserved = _KEYWORDS.unpack_from(body, offset)
        end = offset + _KEYWORDS.size + length
        padded = end + _pad8(end)
        if kw_reserved != 0:
            raise WireError(422, "search request: keyword section's reserved field must be zero")
        if len(body) < padded:
            raise WireError(422, "search request is truncated (keyword query)")
        if any(body[end:padded]):
            raise WireError(422, "search request: padding after the keyword query must be zero")
        keywords = bytes(body[offset + _KEYWORDS.size:end])
        offset = padded
    if flags & FLAG_KEYWORDS_ONLY:
        if k > MAX_KEYWORD_HITS:
            raise WireError(422, f"search request: k {k} not in 1..{MAX_KEYWORD_HITS}")
        if len(body) != offset:
            raise WireError(422, "search request: a keyword-only request has trailing bytes")
        return SearchRequestV2(key_version, k, min_head, flags, None, keywords)
    if not 1 <= k <= MAX_K:
        raise WireError(422, f"search request: k {k} not in 1..{MAX_K}")
    try:
        token = decode_token_v2(memoryview(body)[offset:], MAX_QUERIES)
    except FormatError as exc:
        raise WireError(422, str(exc)) from None
    return SearchRequestV2(key_version, k, min_head, flags, token, keywords)


# --- search answer ---------------------------------------------------------------------


@dataclass(frozen=True)
class SearchAnswerV2:
    """What the service searched and found: hits[q] = [(image_id, score), ...] best first;
    stats (per query, as protocol 1's dicts) and segment_ids only when the request asked."""

    key_version: int
    k: int
    segments: int
    images: int
    head_sequence: int
    head_hash: bytes
    set_digest: bytes
    engine_us: int
    hits: list[list[tuple[str, float]]]
    stats: list[dict[str, object]] | None
    segment_ids: list[str] | None
    matched: int | None = None  # images the keyword query matched (keyword requests only)


def _number(stats: dict[str, object], key: str, default: float) -> float:
    value = stats.get(key, default)
    if not isinstance(value, int | float):
        raise ValueError(f"statistics field {key!r} must be a number, not {value!r}")
    return value


def _stats_bytes(stats: dict[str, object]) -> bytes:
    scored = stats.get("level_scored", [])
    if not isinstance(scored, list | tuple):
        raise ValueError("statistics field 'level_scored' must be a list")
    levels = [int(x) for x in scored]
    head = _STATS.pack(int(_number(stats, "vectors", 0)), int(_number(stats, "full_scored", 0)),
                       float(_number(stats, "milliseconds", 0.0)),
                       int(_number(stats, "batch", 1)), len(levels))
    return head + struct.pack(f"<{len(levels)}Q", *levels)


def encode_answer(answer: SearchAnswerV2) -> bytes:
    flags = (FLAG_LIST_SEGMENTS if answer.segment_ids is not None else 0) | (
        FLAG_STATS if answer.stats is not None else 0) | (
        FLAG_KEYWORDS if answer.matched is not None else 0)
    counts = [len(h) for h in answer.hits]
    if answer.segment_ids is not None and len(answer.segment_ids) != answer.segments:
        raise ValueError(f"answer lists {len(answer.segment_ids)} segments but says "
                         f"{answer.segments} were searched")
    head = _ANSWER.pack(ANSWER_MAGIC, PROTOCOL, flags, len(answer.hits), answer.k,
                        answer.key_version, answer.segments, answer.images,
                        answer.head_sequence, answer.head_hash, answer.set_digest,
                        min(max(answer.engine_us, 0), MAX_ENGINE_US), 0)
    parts = [head, struct.pack(f"<{len(counts)}I", *counts)]
    parts.append(bytes(_pad8(4 * len(counts))))
    parts.append(b"".join(bytes.fromhex(image_id) for query in answer.hits
                          for image_id, _ in query))
    scores = [score for query in answer.hits for _, score in query]
    parts.append(np.asarray(scores, dtype="<f8").tobytes())
    if answer.segment_ids is not None:
        parts.append(b"".join(bytes.fromhex(s) for s in sorted(answer.segment_ids)))
    if answer.stats is not None:
        parts.extend(_stats_bytes(s) for s in answer.stats)
    if answer.matched is not None:
        parts.append(_MATCHED.pack(answer.matched, 0))
    return b"".join(parts)


def segment_set_digest(repo_id: str, key_version: int, seg_ids: Iterable[str]) -> bytes:
    """Draft 6.1: the digest of a set of segment ids (cloud.seglog.set_digest, the one
    definition; sorted there)."""
    return set_digest(repo_id, key_version, seg_ids)


def _malformed(what: str) -> WireError:
    return WireError(502, f"malformed answer: {what}")


def decode_answer(body: bytes, *, queries: int, k: int, key_version: int,
                  repo_id: str | None = None, keywords: bool = False) -> SearchAnswerV2:
    """The answer to a request of ``queries`` queries, or WireError("malformed answer: ...").
    ``keywords``: the request carried a keyword query, so the answer must say how many
    images it matched (and must not otherwise).

    With ``repo_id``, a segment list must hash to the answer's own set_digest (FORMAT-2 6.3
    step 4): a service that lists other segments than it digested is refused here."""
    view = memoryview(body)
    if len(body) < _ANSWER.size:
        raise _malformed("truncated (header)")
    (magic, protocol, flags, n_queries, got_k, got_version, segments, images, head_sequence,
     head_hash, set_digest, engine_us, reserved) = _ANSWER.unpack_from(body)
    if magic != ANSWER_MAGIC:
        raise _malformed("bad magic bytes")
    if protocol != PROTOCOL:
        raise _malformed(f"protocol {protocol}, expected {PROTOCOL}")
    if flags & ~ANSWER_FLAGS:
        raise _malformed(f"unknown flag bits {flags & ~ANSWER_FLAGS:#x}")
    if bool(flags & FLAG_KEYWORDS) != keywords:
        raise _malformed("the keyword section is missing" if keywords
                         else "a keyword section was not asked for")
    if reserved != 0:
        raise _malformed("reserved field must be zero")
    if n_queries != queries:
        raise _malformed(f"{n_queries} queries answered, {queries} asked")
    if got_k != k:
        raise _malformed(f"k {got_k}, {k} asked")
    if got_version != key_version:
        raise _malformed(f"key version {got_version}, {key_version} asked")
    if head_sequence >= 1 << 63:
        raise _malformed("head_sequence out of range")
    offset = _ANSWER.size
    counts_end = offset + 4 * queries
    if len(body) < counts_end + _pad8(counts_end):
        raise _malformed("truncated (hit counts)")
    counts = struct.unpack_from(f"<{queries}I", body, offset)
    for q, count in enumerate(counts):
        if count > k:
            raise _malformed(f"query {q} has {count} hits, more than k = {k}")
    offset = counts_end + _pad8(counts_end)
    if any(view[counts_end:offset]):
        raise _malformed("padding after the hit counts must be zero")
    total = sum(counts)
    ids_end = offset + ID_SIZE * total
    scores_end = ids_end + 8 * total
    listed = segments if flags & FLAG_LIST_SEGMENTS else 0
    list_end = scores_end + ID_SIZE * listed
    if len(body) < list_end:
        raise _malformed("truncated (hits or segment list)")
    raw_ids = bytes(view[offset:ids_end])
    scores = np.frombuffer(body, "<f8", total, ids_end)
    if not np.isfinite(scores).all():
        raise _malformed("a score is not finite")
    hits: list[list[tuple[str, float]]] = []
    position = 0
    for q, count in enumerate(counts):
        ids = [raw_ids[ID_SIZE * i:ID_SIZE * (i + 1)].hex()
               for i in range(position, position + count)]
        if len(set(ids)) != len(ids):
            raise _malformed(f"query {q} names an image twice")
        hits.append([(image_id, float(scores[position + r])) for r, image_id in enumerate(ids)])
        position += count
    segment_ids: list[str] | None = None
    if flags & FLAG_LIST_SEGMENTS:
        raw_list = [bytes(view[scores_end + ID_SIZE * i:scores_end + ID_SIZE * (i + 1)])
                    for i in range(listed)]
        if any(a >= b for a, b in itertools.pairwise(raw_list)):
            raise _malformed("segment list is not strictly ascending")
        segment_ids = [r.hex() for r in raw_list]
        if repo_id is not None and segment_set_digest(repo_id, key_version,
                                                      segment_ids) != set_digest:
            raise _malformed("the segment list does not match the answer's set digest")
    offset = list_end
    stats: list[dict[str, object]] | None = None
    if flags & FLAG_STATS:
        stats = []
        for q in range(queries):
            if len(body) < offset + _STATS.size:
                raise _malformed(f"truncated (statistics of query {q})")
            vectors, full_scored, millis, batch, levels = _STATS.unpack_from(body, offset)
            offset += _STATS.size
            if levels > MAX_LEVELS or len(body) < offset + 8 * levels:
                raise _malformed(f"statistics of query {q}: bad level count {levels}")
            level_scored = list(struct.unpack_from(f"<{levels}Q", body, offset))
            offset += 8 * levels
            if not math.isfinite(millis):
                raise _malformed(f"statistics of query {q}: milliseconds not finite")
            stats.append({"vectors": vectors, "level_scored": level_scored,
                          "full_scored": full_scored,
                          "fraction_fully_scored": full_scored / vectors if vectors else 0.0,
                          "milliseconds": millis, "batch": batch})
    matched: int | None = None
    if flags & FLAG_KEYWORDS:
        if len(body) < offset + _MATCHED.size:
            raise _malformed("truncated (keyword section)")
        matched, kw_reserved = _MATCHED.unpack_from(body, offset)
        offset += _MATCHED.size
        if kw_reserved != 0:
            raise _malformed("keyword section's reserved field must be zero")
        if any(c > matched for c in counts) or matched > images:
            raise _malformed(f"keyword section: {matched} images matched, inconsistent with "
                             f"the hits or the {images} images searched")
    if len(body) != offset:
        raise _malformed(f"{len(body) - offset} trailing bytes")
    return SearchAnswerV2(got_version, got_k, segments, images, head_sequence, head_hash,
                          set_digest, engine_us, hits, stats, segment_ids, matched)


def empty_stats(queries: int) -> list[dict[str, object]]:
    """Statistics of a key version with nothing to search."""
    return [{"vectors": 0, "level_scored": [], "full_scored": 0, "milliseconds": 0.0,
             "batch": queries} for _ in range(queries)]


def hits_of(image_ids: Sequence[str], positions: Iterable[int],
            scores: Iterable[float]) -> list[tuple[str, float]]:
    """One query's (image_id, score) list from the engine's positions."""
    return [(image_ids[int(p)], float(s)) for p, s in zip(positions, scores, strict=True)]
