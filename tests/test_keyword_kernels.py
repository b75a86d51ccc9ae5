"""The service's compiled keyword loops (cloud/keyword_kernels.py) against the reference:
crypto.sse.decode_packed_many decides, for every input, which rows a segment's entries
hold and whether the segment broke the format; the compiled decoder must say the same,
on entries a writer made and on entries broken in every way the format refuses."""

from __future__ import annotations

import numpy as np
import pytest

from cloud import keyword_kernels
from crypto import sse

PACK = sse.PACK


def _entries(rng: np.random.Generator, segments: int) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray, np.ndarray]:
    """Plain words of well-formed entries of several segments (as a writer packs them),
    hidden under random pads: (values, pads, owners, row counts)."""
    words, owners, counts = [], [], []
    for seg in range(segments):
        row_count = int(rng.integers(60, 400))
        rows = np.sort(rng.choice(row_count, int(rng.integers(1, 60)), replace=False))
        entries = -(-rows.size // PACK)
        packed = np.full((entries, PACK + 1), sse.FILLER, dtype=np.uint64)
        packed[:, 0] = 0
        packed[0, 0] = entries
        flat = np.full(entries * PACK, sse.FILLER, dtype=np.uint64)
        flat[: rows.size] = rows
        packed[:, 1:] = flat.reshape(entries, PACK)
        words.append(packed)
        owners += [seg] * entries
        counts.append(row_count)
    plain = np.concatenate(words).astype(">u4").view(np.uint8).reshape(-1, 4 * (PACK + 1))
    pads = rng.integers(0, 256, plain.shape, dtype=np.uint8)
    return (plain ^ pads, pads, np.asarray(owners, dtype=np.int64),
            np.asarray(counts, dtype=np.int64))


def _same(values: np.ndarray, pads: np.ndarray, owners: np.ndarray, counts: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    want = sse.decode_packed_many(values, pads, owners, counts)
    got = keyword_kernels.decode_packed_many(values, pads, owners, counts)
    for a, b in zip(want, got, strict=True):
        assert a.dtype.kind == b.dtype.kind
        assert np.array_equal(a, b)
    return got


def test_the_compiled_decoder_reads_written_entries_as_the_reference() -> None:
    rng = np.random.default_rng(3)
    values, pads, owners, counts = _entries(rng, 12)
    rows, per_segment, bad = _same(values, pads, owners, counts)
    assert not bad.any() and per_segment.sum() == rows.size > 12
    _same(values[:0], pads[:0], owners[:0], counts)


@pytest.mark.parametrize("damage", ["count", "check word", "filler first", "row after filler",
                                    "row too high", "decreasing in entry",
                                    "decreasing across entries", "filler at end not last",
                                    "flipped byte"])
def test_the_compiled_decoder_refuses_what_the_reference_refuses(damage: str) -> None:
    """Each damage performed on one segment's entries (the plain words rewritten, the pad
    kept): both decoders flag that segment, and only it."""
    rng = np.random.default_rng(11)
    values, pads, owners, counts = _entries(rng, 6)
    multi = [s for s in range(6) if np.count_nonzero(owners == s) >= 2]
    seg = multi[0]
    at = int(np.flatnonzero(owners == seg)[0])
    words = (values ^ pads).view(">u4").astype(np.uint64)
    if damage == "count":
        words[at, 0] += 1
    elif damage == "check word":
        words[at + 1, 0] = 1
    elif damage == "filler first":
        words[at, 1] = sse.FILLER
    elif damage == "row after filler":
        words[at + 1, PACK] = words[at + 1, 1] + 1
        words[at + 1, 2] = sse.FILLER
    elif damage == "row too high":
        words[at, 3] = counts[seg] + 5
    elif damage == "decreasing in entry":
        words[at, 2], words[at, 3] = words[at, 3], words[at, 2]
    elif damage == "decreasing across entries":
        words[at + 1, 1] = words[at, PACK]
    elif damage == "filler at end not last":
        words[at, PACK] = sse.FILLER
    else:
        broken = (values ^ pads).copy()
        broken[at, 9] ^= 0x40
        words = broken.view(">u4").astype(np.uint64)
    plain = words.astype(">u4").view(np.uint8).reshape(values.shape)
    _, _, bad = _same(plain ^ pads, pads, owners, counts)
    assert bad[seg] and bad.sum() == 1


def test_the_compiled_search_finds_each_label_in_its_owners_entry_only() -> None:
    """Labels found through the bucket table, absent ones and those owned by another
    segment at -1, as the numpy walk of the buckets found them."""
    rng = np.random.default_rng(5)
    n = 5000
    hi = np.sort(rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2))
    lo = rng.integers(0, 2**63, n, dtype=np.uint64)
    owner = rng.integers(0, 7, n).astype(np.int32)
    bits = n.bit_length()
    shift = 64 - bits
    starts = np.searchsorted((hi >> np.uint64(shift)).astype(np.int64),
                             np.arange((1 << bits) + 1)).astype(np.int32)
    pick = rng.choice(n, 300, replace=False)
    needles = np.stack([hi[pick], lo[pick]], axis=1)
    owners = owner[pick].copy()
    expected = pick.astype(np.int64)
    needles[:50, 1] ^= np.uint64(1)  # another label with the same first half
    owners[50:100] = (owners[50:100] + 1) % 7  # another segment's entry
    needles[100:150, 0] += np.uint64(1)  # absent (odd: no table label is)
    expected[:150] = -1
    found = keyword_kernels.find_labels(hi, lo, owner, starts, shift, needles, owners)
    assert np.array_equal(found, expected)
