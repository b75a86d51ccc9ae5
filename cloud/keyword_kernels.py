"""Compiled loops of the service's merged keyword lookup (cloud/keyword_index.py _Merged).

Why: a keyword on a quarter of a million images is about 17,000 Pi_pack entries. Found
and decoded with numpy, each step is a dozen whole-array passes (a search that walks its
buckets in rounds, the XOR, the byte swap, six checks), about 5 ms of the 9 ms lookup on
the 2-core machine: with a combined query on such a keyword that made the filtered search
slower than the unfiltered one (issue 17). Each loop here reads its entries once.

The decoder is the service's copy of crypto.sse.decode_packed_many, which stays the
reference (the client and the single-segment search use it): the same rows, counts and
verdicts for every input, valid or not (tests/test_keyword_kernels.py compares them on
written dictionaries and on broken entries of every kind the format refuses).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from cloud.compiled import jit
from crypto.sse import FILLER, PACK, PACKED_VALUE_SIZE

U32 = NDArray[np.uint32]
I64 = NDArray[np.int64]


def find_labels(hi: NDArray[np.uint64], lo: NDArray[np.uint64], owner: NDArray[np.int32],
                starts: NDArray[np.int32], shift: int, needles: NDArray[np.uint64],
                owners: NDArray[np.int32]) -> I64:
    """Each needle's place in the table (sorted ``hi``, its bucket ``starts`` on the top
    bits), -1 where absent or owned by another segment. ``needles``: (m, 2) label halves."""
    at = np.full(needles.shape[0], -1, dtype=np.int64)
    if hi.size and needles.shape[0]:
        _finder()(hi, lo, owner, starts, shift, np.ascontiguousarray(needles),
                  np.ascontiguousarray(owners, dtype=np.int32), at)
    return at


def decode_packed_many(values: NDArray[np.uint8], pads: NDArray[np.uint8], owners: I64,
                       row_counts: I64) -> tuple[U32, I64, NDArray[np.bool_]]:
    """crypto.sse.decode_packed_many in one compiled pass (same arguments, same result)."""
    segments = row_counts.shape[0]
    m = values.shape[0]
    counts = np.zeros(segments, dtype=np.int64)
    bad = np.zeros(segments, dtype=bool)
    if not m:
        return np.zeros(0, dtype=np.uint32), counts, bad
    if values.shape[1] != PACKED_VALUE_SIZE or pads.shape != values.shape:
        raise ValueError("packed entries are 64 bytes, with a pad of the same shape")
    rows = np.empty(m * PACK, dtype=np.uint32)
    kept = _decoder()(np.ascontiguousarray(values), np.ascontiguousarray(pads),
                      np.ascontiguousarray(owners, dtype=np.int64),
                      np.ascontiguousarray(row_counts, dtype=np.int64), rows, counts, bad)
    return rows[:kept], counts, bad


def compile_now() -> None:
    """Both loops compiled (or loaded from numba's cache) on tiny inputs: called by the
    engine's warm-up (cloud.codes.warm_up), so a first keyword query does not wait."""
    one = np.ones(1, dtype=np.uint64)
    find_labels(one, one, np.zeros(1, np.int32), np.zeros(3, np.int32), 63,
                np.ones((1, 2), dtype=np.uint64), np.zeros(1, np.int32))
    entry = np.zeros((1, PACKED_VALUE_SIZE), dtype=np.uint8)
    decode_packed_many(entry, entry, np.zeros(1, np.int64), np.ones(1, np.int64))


@functools.cache
def _finder() -> Callable[..., None]:
    def find(hi: NDArray[np.uint64], lo: NDArray[np.uint64], owner: NDArray[np.int32],
             starts: NDArray[np.int32], shift: int, needles: NDArray[np.uint64],
             owners: NDArray[np.int32], at: I64) -> None:  # pragma: no cover - compiled
        for i in range(needles.shape[0]):
            wanted = needles[i, 0]
            bucket = wanted >> np.uint64(shift)
            for place in range(starts[bucket], starts[bucket + 1]):
                found = hi[place]
                if found == wanted:
                    if lo[place] == needles[i, 1] and owner[place] == owners[i]:
                        at[i] = place
                    break
                if found > wanted:  # a bucket's labels are increasing
                    break

    return jit(find)


@functools.cache
def _decoder() -> Callable[..., int]:
    words_per_entry = PACK + 1
    filler = np.uint32(FILLER)

    def decode(values: NDArray[np.uint8], pads: NDArray[np.uint8], owners: I64,
               row_counts: I64, rows: U32, counts: I64, bad: NDArray[np.bool_]
               ) -> int:  # pragma: no cover - compiled
        m = values.shape[0]
        entries = np.zeros(row_counts.shape[0], dtype=np.int64)
        for e in range(m):
            entries[owners[e]] += 1
        words = np.empty(words_per_entry, dtype=np.uint32)
        kept = 0
        previous_last = np.uint32(0)  # the last row of the entry before, same segment
        for e in range(m):
            seg = owners[e]
            first = e == 0 or owners[e - 1] != seg
            last = e == m - 1 or owners[e + 1] != seg
            for w in range(words_per_entry):  # big-endian words of value XOR pad
                b = 4 * w
                words[w] = ((np.uint32(values[e, b] ^ pads[e, b]) << np.uint32(24))
                            | (np.uint32(values[e, b + 1] ^ pads[e, b + 1]) << np.uint32(16))
                            | (np.uint32(values[e, b + 2] ^ pads[e, b + 2]) << np.uint32(8))
                            | np.uint32(values[e, b + 3] ^ pads[e, b + 3]))
            expected = entries[seg] if first else 0
            wrong = np.int64(words[0]) != expected or words[1] == filler
            if words[PACK] == filler and not last:
                wrong = True
            fillers = 0
            for j in range(1, words_per_entry):
                row = words[j]
                if row == filler:
                    fillers += 1
                    continue
                if j > 1 and words[j - 1] == filler:
                    wrong = True  # a row after a filler
                if np.int64(row) >= row_counts[seg]:
                    wrong = True
                if j > 1 and row <= words[j - 1]:
                    wrong = True
                rows[kept] = row
                kept += 1
            if not first and words[1] <= previous_last:
                wrong = True  # rows increase from one entry to the next
            previous_last = words[PACK]
            if wrong:
                bad[seg] = True
            counts[seg] += PACK - fillers
        return kept

    return jit(decode)  # type: ignore[return-value]
