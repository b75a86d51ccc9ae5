"""Static searchable symmetric encryption per segment: Pi_pack (version 2, written) and
Pi_bas (version 1, still read), Cash et al., NDSS 2014.

Why: radiologists search by keyword ("every CT of the chest", "this accession") as well as
by image, and the service must answer without learning the keywords. Each index segment
carries a dictionary written once, by the client that wrote the segment; a query token for a
keyword lets the keyless service find exactly the rows of that segment holding the keyword
and nothing else (docs/KEYWORDS.md states what it does learn).

Construction (all HMACs are HMAC-SHA256; LP(x) = u32 length || x; integers big-endian)::

    token(w)  = (K1, K2)
    K1        = HMAC(kw, LP("radcrypt/sse/k1/v1") || LP(repo) || u64 version || LP(w))
    K2        = HMAC(kw, LP("radcrypt/sse/k2/v1") || LP(repo) || u64 version || LP(w))
    K1_s      = HMAC(K1, LP("radcrypt/sse/label/v1") || LP(repo) || LP(segment) || u64 version)
    K2_s      = HMAC(K2, LP("radcrypt/sse/value/v1") || LP(repo) || LP(segment) || u64 version)
    label_c   = AES-256(K1_s, block(c))                     16 bytes
    value_c   = (u32 row || u32 0) XOR AES-256(K2_s, block(c))[:8]

where ``kw`` is the keyword key of the key version, ``block(c)`` is 8 zero bytes then the
counter c as u64, and c runs 0, 1, ... over the rows holding w in increasing row order.
AES is the PRF (PRP/PRF switching: at most 2^32 counters per key, a negligible bias),
chosen over HMAC so that the service computes thousands of labels in one call of
OpenSSL's AES-ECB. The repository, segment id and key version are bound in K1_s and K2_s
(the "associated data"): a dictionary copied to another segment, repository or key version
has no label a token finds there, and its values decrypt to non-zero check words.

Version 2, Pi_pack (written since the lookup goal of issue 17: Pi_bas costs one label and
one probe per matching row, about 0.4 us, so a keyword on an eighth of a million images took
96 ms; packing fifteen rows per entry divides both by fifteen)::

    K_s       = HMAC(K1, LP("radcrypt/sse/pack/v2") || LP(repo) || LP(segment) || u64 version)
    label_c   = AES-256(K_s, block(0, c))                    16 bytes
    value_c   = (u32 w_c || u32 row_15c || ... || u32 row_15c+14)
                XOR AES-256(K_s, block(1, c)) || ... || AES-256(K_s, block(4, c))

where block(j, c) is u64 j then u64 c, c runs over the entries of w, each holding the next
fifteen of its rows in increasing order, the last entry's unused places hold 0xFFFFFFFF
(so a row is below 2^32 - 1), and w_0 is the number of entries of the keyword, w_c = 0
after. One key serves labels and pads (distinct PRF inputs), so that an entry's label and
pad come from one AES call; the count in the first entry lets the service compute exactly
the labels it needs after one probe per segment (K2 serves version-1 segments only). A
version-2 parser refuses a count that does not match, a non-zero check word after the
first entry, a row not below the segment's count, rows not increasing, or a filler
anywhere but at the end of the last entry.

The zero check word is redundancy, not an authenticator: it catches a misplaced dictionary
or a wrong token; the dictionary's integrity comes from the segment MAC that covers it
(crypto/segment_mac.py) and, for a hostile service, from the client decrypting the
metadata of every row it is sent.

Serialisation (``RCSD``): header then ``count`` entries sorted by label, ``label (16) ||
value`` (8 bytes in version 1, 64 in version 2). ``count`` is the number of real entries
(one per row and keyword in version 1, one per fifteen in version 2) rounded up to a bucket
(``padded_size``); dummy entries are random strings of the entry's size, indistinguishable
from real ones without a token (PRF outputs against random).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from numpy.typing import NDArray

from crypto.csprng import random_bytes
from crypto.errors import FormatError

MAGIC = b"RCSD"
BASIC = 1
"""Pi_bas: one row per entry (read, no longer written)."""
PACKED = 2
"""Pi_pack: fifteen rows per entry (written)."""
VERSION = PACKED
LABEL_SIZE = 16
VALUE_SIZE = 8
ENTRY_SIZE = LABEL_SIZE + VALUE_SIZE
PACK = 15
"""Rows per version-2 entry: with the check word, sixteen u32, four AES blocks."""
PACKED_VALUE_SIZE = 4 * (PACK + 1)
FILLER = 0xFFFFFFFF
VALUE_SIZES = {BASIC: VALUE_SIZE, PACKED: PACKED_VALUE_SIZE}
KEY_SIZE = 32
TOKEN_SIZE = 2 * KEY_SIZE
MIN_ENTRIES = 16
"""The smallest dictionary: a segment with one image and few keywords still writes 16."""
BUCKET_STEPS = 4
"""Bucket sizes per doubling: m * 2^k for m in 4..7 (so 16, 20, 24, 28, 32, 40, ...): at
most 25 % dummies where powers of two waste up to 50 %, at the price of two bits more of
the real count leaking (docs/KEYWORDS.md)."""
MAX_ROWS = (1 << 32) - 1
MAX_ENTRIES = 1 << 31
FIRST_BATCH = 16
SECOND_BATCH = 1024
"""Labels computed per AES call: 16 first (most keywords of a segment are rare, and an
absent one is settled by its first label), then 1024, then fourfold while every label is
found. AES of 1024 blocks costs microseconds; each batch costs ~0.1 ms of numpy calls."""
_HEAD = struct.Struct(">4sBBBBQ")  # magic, version, label size, value size, reserved, count
_U64 = struct.Struct(">Q")

U32 = NDArray[np.uint32]


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _hmac(key: bytes, *parts: bytes) -> bytes:
    return hmac.digest(key, b"".join(parts), hashlib.sha256)


@dataclass(frozen=True, eq=False)
class KeywordToken:
    """What the service needs to find one keyword's rows in every segment of one key
    version of one repository: (K1, K2). It reveals nothing about other keywords."""

    k1: bytes
    k2: bytes

    def __post_init__(self) -> None:
        if len(self.k1) != KEY_SIZE or len(self.k2) != KEY_SIZE:
            raise ValueError(f"a keyword token is two {KEY_SIZE}-byte keys")

    def __repr__(self) -> str:
        return "KeywordToken(<secret>)"

    def to_bytes(self) -> bytes:
        return self.k1 + self.k2

    @classmethod
    def from_bytes(cls, data: bytes) -> KeywordToken:
        if len(data) != TOKEN_SIZE:
            raise FormatError(f"keyword token: {len(data)} bytes, expected {TOKEN_SIZE}")
        return cls(bytes(data[:KEY_SIZE]), bytes(data[KEY_SIZE:]))


def keyword_token(keyword_key: bytes, repo_id: str, key_version: int, keyword: str
                  ) -> KeywordToken:
    """The token of ``keyword`` under the keyword key of one key version."""
    if len(keyword_key) != KEY_SIZE:
        raise ValueError(f"a keyword key is {KEY_SIZE} bytes, not {len(keyword_key)}")
    if not keyword:
        raise ValueError("an empty keyword has no token")
    tail = _lp(repo_id.encode("utf-8")) + _U64.pack(key_version) + _lp(keyword.encode("utf-8"))
    return KeywordToken(_hmac(keyword_key, _lp(b"radcrypt/sse/k1/v1"), tail),
                        _hmac(keyword_key, _lp(b"radcrypt/sse/k2/v1"), tail))


def _segment_keys(token: KeywordToken, repo_id: str, segment_id: str, key_version: int,
                  version: int = BASIC) -> tuple[bytes, bytes]:
    """The segment's keys for dictionary ``version``: (K1_s, K2_s) in version 1, (K_s,
    K_s) in version 2 (each version its own derivation: a token's labels of one layout
    never meet entries of the other)."""
    place = _lp(repo_id.encode("utf-8")) + _lp(segment_id.encode("utf-8")) + _U64.pack(
        key_version)
    if version == PACKED:
        key = _hmac(token.k1, _lp(b"radcrypt/sse/pack/v2"), place)
        return key, key
    return (_hmac(token.k1, _lp(b"radcrypt/sse/label/v1"), place),
            _hmac(token.k2, _lp(b"radcrypt/sse/value/v1"), place))


_STREAM_BLOCKS = 5  # per version-2 entry: its label, then four blocks of pad
_counters = b""  # block(j, c) for c = 0, 1, ..., j = 0..4: grown on demand, then sliced
_counters_lock = threading.Lock()


def _counter_bytes(start: int, count: int) -> bytes:
    """block(j, c) for c in start .. start+count-1, j = 0..4, as one byte string: sliced
    from a table grown by doubling, since building it per call (numpy) cost three times
    the AES call it feeds for the one-entry lookups of a query."""
    global _counters
    end = (start + count) * _STREAM_BLOCKS * 16
    table = _counters
    if len(table) < end:
        with _counters_lock:
            entries = max(1024, 2 * (start + count))
            grid = np.zeros((entries, _STREAM_BLOCKS, 2), dtype=">u8")
            grid[:, :, 0] = np.arange(_STREAM_BLOCKS, dtype=np.uint64)[None, :]
            grid[:, :, 1] = np.arange(entries, dtype=np.uint64)[:, None]
            table = _counters = grid.tobytes()
    return table[start * _STREAM_BLOCKS * 16 : end]


class EntryStream:
    """The version-2 entries of one segment key, computed in as many calls as needed
    under one AES context: the service asks for a keyword's first entry, then, knowing
    the count, for the rest (one key schedule a segment, not two; at a hundred segments
    the contexts' set-up was a tenth of a lookup)."""

    def __init__(self, key: bytes) -> None:
        self._encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()

    def entries(self, start: int, count: int) -> NDArray[np.uint8]:
        """(count, 80): label (16) then pad (64) of entries start .. start+count-1,
        AES-256(K_s, block(j, c)) for j = 0..4, in one call (whole blocks: ECB keeps
        nothing back between calls)."""
        out = self._encryptor.update(_counter_bytes(start, count))
        return np.frombuffer(out, np.uint8).reshape(count, LABEL_SIZE + PACKED_VALUE_SIZE)


def _entry_stream(key: bytes, start: int, count: int) -> NDArray[np.uint8]:
    """Entries start .. start+count-1 of a segment key, in one call (EntryStream)."""
    return EntryStream(key).entries(start, count)


def _prf_blocks(key: bytes, start: int, count: int) -> bytes:
    """AES-256 of block(start) .. block(start + count - 1), 16 bytes each, in one call."""
    counters = np.zeros((count, 2), dtype=">u8")
    counters[:, 1] = np.arange(start, start + count, dtype=np.uint64)
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return encryptor.update(counters.tobytes()) + encryptor.finalize()


def padded_size(real: int, steps: int = BUCKET_STEPS, minimum: int = MIN_ENTRIES) -> int:
    """The bucket a dictionary of ``real`` entries is padded to: the smallest
    m * 2^k >= real with steps <= m < 2 * steps, and at least ``minimum``."""
    if real < 0 or steps < 1:
        raise ValueError("a dictionary size is a non-negative count")
    size = max(real, minimum, 1)
    k = max(0, (size - 1).bit_length() - steps.bit_length())
    while True:
        for m in range(steps, 2 * steps):
            if m << k >= size:
                return m << k
        k += 1


def _value_pads(key: bytes, start: int, count: int) -> NDArray[np.uint8]:
    """(count, 8) version-1 pads of entries start .. start + count - 1: the first 8 bytes
    of AES(K2_s, block(c))."""
    return np.frombuffer(_prf_blocks(key, start, count), np.uint8).reshape(
        count, 16)[:, :VALUE_SIZE]


def _plain_values(ordered: list[int], version: int) -> NDArray[np.uint8]:
    """The values of one keyword before encryption: (row, 0) per row in version 1; the
    check word (the entry count in the first entry, 0 after) and fifteen rows per entry,
    the last filled with FILLER, in version 2."""
    rows = np.asarray(ordered, dtype=np.uint64).astype(np.uint32)
    if version == BASIC:
        plain = np.zeros((rows.size, 2), dtype=">u4")
        plain[:, 0] = rows
        return plain.view(np.uint8).reshape(rows.size, VALUE_SIZE)
    entries = -(-rows.size // PACK)
    packed = np.full(entries * PACK, FILLER, dtype=">u4")
    packed[: rows.size] = rows
    plain = np.zeros((entries, PACK + 1), dtype=">u4")
    plain[0, 0] = entries
    plain[:, 1:] = packed.reshape(entries, PACK)
    return plain.view(np.uint8).reshape(entries, PACKED_VALUE_SIZE)


def build_dictionary(keyword_key: bytes, repo_id: str, key_version: int, segment_id: str,
                     rows_by_keyword: Mapping[str, Iterable[int]], *,
                     steps: int = BUCKET_STEPS, minimum: int = MIN_ENTRIES,
                     version: int = VERSION) -> bytes:
    """The padded, serialised dictionary of one segment.

    ``rows_by_keyword`` maps each keyword to the segment rows (0-based positions) holding
    it; duplicates are ignored and rows are stored in increasing order. ``version``:
    PACKED (written) or BASIC (kept so that the reader of old segments stays tested).
    """
    if version not in VALUE_SIZES:
        raise ValueError(f"keyword dictionary version {version} is not known")
    value_size = VALUE_SIZES[version]
    entry_size = LABEL_SIZE + value_size
    labels: list[bytes] = []
    values: list[bytes] = []
    for keyword, rows in rows_by_keyword.items():
        ordered = sorted(set(int(r) for r in rows))
        if not ordered:
            continue
        if ordered[0] < 0 or ordered[-1] >= MAX_ROWS:
            raise ValueError(f"a row of keyword dictionary segment {segment_id} is out of range")
        token = keyword_token(keyword_key, repo_id, key_version, keyword)
        k1s, k2s = _segment_keys(token, repo_id, segment_id, key_version, version)
        plain = _plain_values(ordered, version)
        n = plain.shape[0]
        if version == BASIC:
            labels.append(_prf_blocks(k1s, 0, n))
            values.append(np.bitwise_xor(plain, _value_pads(k2s, 0, n)).tobytes())
        else:
            stream = _entry_stream(k1s, 0, n)
            labels.append(stream[:, :LABEL_SIZE].tobytes())
            values.append(np.bitwise_xor(plain, stream[:, LABEL_SIZE:]).tobytes())
    real = sum(len(x) // LABEL_SIZE for x in labels)
    total = padded_size(real, steps, minimum)
    if total > MAX_ENTRIES:
        raise ValueError(f"keyword dictionary of segment {segment_id} is too large")
    dummies = total - real
    entries = np.empty((total, entry_size), dtype=np.uint8)
    if real:
        entries[:real, :LABEL_SIZE] = np.frombuffer(b"".join(labels), np.uint8).reshape(real, 16)
        entries[:real, LABEL_SIZE:] = np.frombuffer(b"".join(values), np.uint8).reshape(
            real, value_size)
    for _attempt in range(4):
        if dummies:
            entries[real:] = np.frombuffer(random_bytes(dummies * entry_size),
                                           np.uint8).reshape(dummies, entry_size)
        keys = _label_keys(entries[:, :LABEL_SIZE])
        order = np.lexsort((keys[:, 1], keys[:, 0]))
        if total < 2 or np.all(keys[order[1:], 0] > keys[order[:-1], 0]):
            break
        # Two labels share their first 8 bytes (probability ~ total^2 / 2^65): draw the
        # dummies again rather than write a dictionary the parser would refuse.
    else:
        raise ValueError(f"keyword dictionary of segment {segment_id}: two labels collide "
                         "in their first 8 bytes (astronomically unlikely; retry the import)")
    entries = entries[order]
    return _HEAD.pack(MAGIC, version, LABEL_SIZE, value_size, 0, total) + entries.tobytes()


def _label_keys(labels: NDArray[np.uint8]) -> NDArray[np.uint64]:
    """Each 16-byte label as two big-endian u64 (so numeric order is byte order)."""
    return np.ascontiguousarray(labels).view(">u8").reshape(-1, 2).astype(np.uint64)


@dataclass(frozen=True)
class Dictionary:
    """A parsed segment dictionary: labels (as two u64 each, strictly increasing in the
    first) and the encrypted values. Holds no key; the service keeps one per segment."""

    hi: NDArray[np.uint64]
    lo: NDArray[np.uint64]
    values: NDArray[np.uint8]
    version: int = BASIC

    def __len__(self) -> int:
        return int(self.hi.shape[0])

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, name: str = "<dictionary>") -> Dictionary:
        """Parse and validate; a FormatError names ``name`` and the field at fault."""
        if len(data) < _HEAD.size:
            raise FormatError(f"keyword dictionary {name} is truncated (header)")
        magic, version, label_size, value_size, reserved, count = _HEAD.unpack_from(data)
        if magic != MAGIC:
            raise FormatError(f"keyword dictionary {name}: bad magic bytes")
        if version not in VALUE_SIZES:
            raise FormatError(f"keyword dictionary {name}: unsupported version {version}")
        if (label_size, value_size, reserved) != (LABEL_SIZE, VALUE_SIZES[version], 0):
            raise FormatError(f"keyword dictionary {name}: unexpected entry layout")
        entry_size = LABEL_SIZE + value_size
        if count > MAX_ENTRIES or len(data) != _HEAD.size + count * entry_size:
            raise FormatError(f"keyword dictionary {name}: length {len(data)} does not match "
                              f"its count of {count} entries")
        entries = np.frombuffer(data, np.uint8, count * entry_size, _HEAD.size).reshape(
            count, entry_size)
        keys = _label_keys(entries[:, :LABEL_SIZE])
        if count > 1 and not np.all(keys[1:, 0] > keys[:-1, 0]):
            raise FormatError(f"keyword dictionary {name}: labels are not sorted and unique")
        return cls(keys[:, 0].copy(), keys[:, 1].copy(),
                   np.ascontiguousarray(entries[:, LABEL_SIZE:]), version)

    def _find(self, labels: bytes) -> NDArray[np.int64]:
        """Index of each 16-byte label in this dictionary, -1 where absent."""
        keys = _label_keys(np.frombuffer(labels, np.uint8).reshape(-1, LABEL_SIZE))
        if len(self) == 0:
            return np.full(keys.shape[0], -1, dtype=np.int64)
        # Searching sorted labels walks the table in order (cache-friendly): twice as fast
        # as random order for 500,000 labels in 2^20 entries.
        order = np.argsort(keys[:, 0])
        pos = np.empty(keys.shape[0], dtype=np.intp)
        pos[order] = np.searchsorted(self.hi, keys[order, 0])
        clipped = np.minimum(pos, len(self) - 1)
        hit = (self.hi[clipped] == keys[:, 0]) & (self.lo[clipped] == keys[:, 1])
        return np.where(hit, clipped, -1).astype(np.int64)

    def keys(self, token: KeywordToken, repo_id: str, segment_id: str, key_version: int
             ) -> tuple[bytes, bytes]:
        """K1_s, K2_s of the token for this dictionary's segment and layout."""
        return _segment_keys(token, repo_id, segment_id, key_version, self.version)

    def search(self, token: KeywordToken, repo_id: str, segment_id: str, key_version: int,
               row_count: int = MAX_ROWS) -> U32:
        """The rows holding the token's keyword, in increasing order.

        Version 1: labels in batches (16, 1024, then growing fourfold) until the first
        counter without a label. Version 2: the first entry's label, then exactly the
        labels its count names. A found entry that breaks the format (check word, a row
        not below ``row_count``, ...) means the dictionary does not belong here:
        FormatError.
        """
        k1s, k2s = self.keys(token, repo_id, segment_id, key_version)
        if self.version == PACKED:
            return self._search_packed(k1s, segment_id, row_count)
        found: list[NDArray[np.int64]] = []
        start, batch = 0, FIRST_BATCH
        while start < len(self):
            batch = min(batch, len(self) - start)
            where = self._find(_prf_blocks(k1s, start, batch))
            missing = np.flatnonzero(where < 0)
            n = int(missing[0]) if missing.size else batch
            if n:
                found.append(where[:n])
            if n < batch:
                break
            start += batch
            batch = SECOND_BATCH if batch < SECOND_BATCH else 4 * batch
        entries = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
        n = int(entries.size)
        if not n:
            return np.zeros(0, dtype=np.uint32)
        plain = np.bitwise_xor(self.values[entries], _value_pads(k2s, 0, n))
        words = np.ascontiguousarray(plain).view(">u4").reshape(n, 2)
        if np.any(words[:, 1] != 0) or np.any(words[:, 0] >= row_count):
            raise _not_here(segment_id)
        return words[:, 0].astype(np.uint32)

    def _search_packed(self, key: bytes, segment_id: str, row_count: int) -> U32:
        first = _entry_stream(key, 0, 1)
        where = self._find(first[:, :LABEL_SIZE].tobytes())
        if where[0] < 0:
            return np.zeros(0, dtype=np.uint32)
        count = first_count(self.values[where[0]], first[0, LABEL_SIZE:], len(self))
        if count is None:
            raise _not_here(segment_id)
        pads = first[:, LABEL_SIZE:]
        if count > 1:
            rest = _entry_stream(key, 1, count - 1)
            more = self._find(rest[:, :LABEL_SIZE].tobytes())
            if np.any(more < 0):
                raise _not_here(segment_id)  # the count names entries that are not there
            where = np.concatenate([where, more])
            pads = np.concatenate([pads, rest[:, LABEL_SIZE:]])
        rows, _, bad = decode_packed_many(self.values[where], pads,
                                          np.zeros(count, dtype=np.int64),
                                          np.asarray([row_count], dtype=np.int64))
        if bad[0]:
            raise _not_here(segment_id)
        return rows


def _not_here(segment_id: str) -> FormatError:
    return FormatError(f"keyword dictionary of segment {segment_id} does not belong to this "
                       "segment, repository or key version")


def first_count(value: NDArray[np.uint8], pad: NDArray[np.uint8], limit: int) -> int | None:
    """The entry count a keyword's first version-2 entry holds, None unless 1..limit."""
    word = int.from_bytes(np.bitwise_xor(value[:4], pad[:4]).tobytes(), "big")
    return word if 1 <= word <= limit else None


def decode_packed_many(values: NDArray[np.uint8], pads: NDArray[np.uint8],
                       owners: NDArray[np.int64], row_counts: NDArray[np.int64]
                       ) -> tuple[U32, NDArray[np.int64], NDArray[np.bool_]]:
    """Version-2 entries of one or many segments decoded and checked at once (the
    service's merged lookup: a dozen numpy calls whatever the number of segments, where
    one decode per segment cost about 0.1 ms each).

    ``values``/``pads``: (M, 64), every segment's entries of one keyword, all of them,
    grouped by segment (``owners``, non-decreasing) and in counter order within each;
    ``row_counts``: rows of each segment. Returns the rows of every segment concatenated,
    how many each segment has, and which segments broke the format (their rows must not
    be used): a first entry whose count is not the number of entries, a later one whose
    check word is not zero, a row not below the segment's count, rows not increasing, a
    filler anywhere but at the end of the last entry, an entry of fillers only."""
    segments = row_counts.shape[0]
    counts = np.zeros(segments, dtype=np.int64)
    bad = np.zeros(segments, dtype=bool)
    m = values.shape[0]
    if not m:
        return np.zeros(0, dtype=np.uint32), counts, bad
    words = np.ascontiguousarray(np.bitwise_xor(values, pads)).view(">u4").reshape(
        m, PACK + 1).astype(np.uint32)
    rows = words[:, 1:]
    filler = rows == FILLER
    last = np.ones(m, dtype=bool)
    last[:-1] = owners[1:] != owners[:-1]
    first = np.ones(m, dtype=bool)
    first[1:] = last[:-1]
    entries = np.bincount(owners, minlength=segments)
    expected = np.where(first, entries[owners], 0)
    # Fillers only as a suffix of a segment's last entry; so every entry but the last is
    # full, and rows increase inside each entry and from one entry to the next.
    entry_bad = ((words[:, 0] != expected) | filler[:, 0]
                 | (filler[:, -1] & ~last)
                 | np.any(filler[:, :-1] & ~filler[:, 1:], axis=1)
                 | np.any(~filler & (rows >= row_counts[owners][:, None]), axis=1)
                 | np.any((rows[:, 1:] <= rows[:, :-1]) & ~filler[:, 1:], axis=1))
    entry_bad[:-1] |= ~last[:-1] & (rows[1:, 0] <= rows[:-1, -1])
    bad |= np.bincount(owners, weights=entry_bad, minlength=segments) > 0
    counts[:] = np.bincount(owners, weights=PACK - filler.sum(axis=1), minlength=segments)
    return rows[~filler], counts, bad
