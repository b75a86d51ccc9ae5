"""Static SSE per segment (crypto/sse.py: Pi_pack, written, and Pi_bas, still read):
exactness, padding, bindings, parsing, in both layouts.

Randomness is seeded; the seed is in every assertion message so a failure can be replayed.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from crypto import sse
from crypto.errors import FormatError
from crypto.sse import Dictionary, KeywordToken, build_dictionary, keyword_token, padded_size

REPO = "repo-a"
SEG = "0f" * 16
SEED = 20261127
LAYOUTS = [sse.BASIC, sse.PACKED]


def _entry(layout: int) -> int:
    return sse.LABEL_SIZE + sse.VALUE_SIZES[layout]


def _key(rng: random.Random) -> bytes:
    return rng.randbytes(32)


def _random_index(rng: random.Random, rows: int, vocabulary: int) -> dict[str, list[int]]:
    index: dict[str, list[int]] = {}
    for row in range(rows):
        for word in rng.sample(range(vocabulary), rng.randint(0, 6)):
            index.setdefault(f"w={word}", []).append(row)
    return index


def _search(data: bytes, key: bytes, keyword: str, repo: str = REPO, seg: str = SEG,
            version: int = 1, token_version: int | None = None) -> list[int]:
    token = keyword_token(key, repo, version if token_version is None else token_version,
                          keyword)
    return Dictionary.from_bytes(data).search(token, repo, seg, version).tolist()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", [SEED, SEED + 1, SEED + 2])
def test_every_keyword_finds_exactly_its_rows_as_a_plaintext_inverted_index(seed: int,
                                                                            layout: int) -> None:
    rng = random.Random(seed)
    key = _key(rng)
    index = _random_index(rng, rows=rng.randint(1, 400), vocabulary=60)
    for word in range(3):  # keywords on exactly 14, 15 and 16 rows: a packed entry's edges
        index[f"edge={word}"] = sorted(rng.sample(range(400), 14 + word))
    data = build_dictionary(key, REPO, 1, SEG, index, version=layout)
    assert data[4] == layout
    for word in range(60):
        keyword = f"w={word}"
        assert _search(data, key, keyword) == sorted(index.get(keyword, [])), \
            f"seed {seed}, {keyword}"
    for word in range(3):
        assert _search(data, key, f"edge={word}") == index[f"edge={word}"], f"seed {seed}"
    assert _search(data, key, "w=absent") == [], f"seed {seed}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_keyword_on_many_rows_crosses_several_label_batches(layout: int) -> None:
    rng = random.Random(SEED)
    key = _key(rng)
    rows = sorted(rng.sample(range(100_000), 30_000))  # 2,000 packed entries: 3 batches
    data = build_dictionary(key, REPO, 3, SEG, {"modality=CT": rows, "modality=MR": [7]},
                            version=layout)
    assert _search(data, key, "modality=CT", version=3) == rows
    assert _search(data, key, "modality=MR", version=3) == [7]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_padding_rounds_the_entry_count_up_to_a_bucket_of_four_steps_per_doubling(
        layout: int) -> None:
    assert [padded_size(n) for n in (0, 1, 16, 17, 20, 21, 29, 33, 100, 1000, 1025)] == \
        [16, 16, 16, 20, 20, 24, 32, 40, 112, 1024, 1280]
    for n in range(1, 5000):
        size = padded_size(n)
        assert n <= size <= max(16, n + n // 4 + 1), n  # at most 25 % dummies
    assert padded_size(100, steps=1) == 128  # powers of two when asked
    rng = random.Random(SEED)
    key = _key(rng)
    per_entry = 1 if layout == sse.BASIC else sse.PACK
    for real in (0, 1, 15, 16, 17, 40, 41, 300):
        data = build_dictionary(key, REPO, 1, SEG, {"w=x": list(range(real))}, version=layout)
        entries = -(-real // per_entry)
        assert len(data) == 16 + padded_size(entries) * _entry(layout), real


def test_dictionaries_of_different_content_in_one_bucket_have_the_same_size() -> None:
    rng = random.Random(SEED)
    key = _key(rng)
    # 21 packed entries (one keyword on 301 rows) and 24 (24 keywords on one row each)
    # share the bucket of 24 entries
    a = build_dictionary(key, REPO, 1, SEG, {"w=a": list(range(301))})
    b = build_dictionary(key, REPO, 1, SEG, {f"w={i}": [i] for i in range(24)})
    assert len(a) == len(b) == 16 + 24 * _entry(sse.PACKED)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dummy_and_real_entries_look_alike_and_no_keyword_is_in_clear(layout: int) -> None:
    rng = random.Random(SEED)
    key = _key(rng)
    index = {"modality=CT": list(range(0, 3000, 2)),
             "bodypart=CHEST": list(range(0, 3000, 3))}
    data = build_dictionary(key, REPO, 1, SEG, index, version=layout)
    for needle in (b"modality", b"modality=CT", b"CHEST", b"bodypart"):
        assert needle not in data
    entries = np.frombuffer(data[16:], np.uint8).reshape(-1, _entry(layout))
    bits = np.unpackbits(entries, axis=1).mean(axis=0)
    # Real values are row ids XOR a PRF pad: no column of bits is biased (a plain row id or
    # zero check word would give columns of constant bits).
    assert bits.min() > 0.35 and bits.max() < 0.65, (bits.min(), bits.max())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_wrong_key_segment_repository_or_version_finds_nothing(layout: int) -> None:
    rng = random.Random(SEED)
    key, other = _key(rng), _key(rng)
    index = {"modality=CT": [0, 1, 2, 3]}
    data = build_dictionary(key, REPO, 2, SEG, index, version=layout)
    assert _search(data, key, "modality=CT", version=2) == [0, 1, 2, 3]
    assert _search(data, other, "modality=CT", version=2) == []
    assert _search(data, key, "modality=CT", seg="1e" * 16, version=2) == []
    assert _search(data, key, "modality=CT", repo="repo-b", version=2) == []
    assert _search(data, key, "modality=CT", version=1) == []  # bound as version 1
    assert _search(data, key, "modality=CT", version=2, token_version=1) == []


def test_tokens_of_one_key_version_are_useless_for_segments_of_the_next() -> None:
    rng = random.Random(SEED)
    old_key, new_key = _key(rng), _key(rng)  # a rotation draws a fresh keyword key
    data = build_dictionary(new_key, REPO, 2, SEG, {"modality=CT": [0, 5]})
    assert _search(data, new_key, "modality=CT", version=2) == [0, 5]
    dictionary = Dictionary.from_bytes(data)
    for version in (1, 2):
        stale = keyword_token(old_key, REPO, version, "modality=CT")
        assert dictionary.search(stale, REPO, SEG, 2).tolist() == []
    assert keyword_token(old_key, REPO, 1, "modality=CT").to_bytes() != \
        keyword_token(old_key, REPO, 2, "modality=CT").to_bytes()


def test_the_same_keyword_in_two_repositories_gives_unrelated_tokens() -> None:
    key = bytes(range(32))
    a = keyword_token(key, "repo-a", 1, "modality=CT").to_bytes()
    b = keyword_token(key, "repo-b", 1, "modality=CT").to_bytes()
    assert a != b and a[:32] != b[:32] and a[32:] != b[32:]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_tampered_value_is_refused_not_turned_into_a_wrong_row(layout: int) -> None:
    rng = random.Random(SEED)
    key = _key(rng)
    data = bytearray(build_dictionary(key, REPO, 1, SEG, {"w=x": [4], "w=y": [9]}, steps=1,
                                      minimum=2, version=layout))
    size = _entry(layout)
    assert len(data) == 16 + 2 * size  # both entries real, no dummies
    check = 20 if layout == sse.BASIC else 16  # the check word's place in the entry
    for entry in range(2):
        broken = bytearray(data)
        broken[16 + entry * size + check] ^= 1  # a bit of the check word
        results = []
        for word in ("w=x", "w=y"):
            try:
                results.append(_search(bytes(broken), key, word))
            except FormatError:
                results.append(None)
        assert None in results and ([4] in results or [9] in results), results


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_row_beyond_the_segment_is_refused(layout: int) -> None:
    key = bytes(32)
    data = build_dictionary(key, REPO, 1, SEG, {"w=x": [10]}, version=layout)
    token = keyword_token(key, REPO, 1, "w=x")
    with pytest.raises(FormatError, match="does not belong"):
        Dictionary.from_bytes(data).search(token, REPO, SEG, 1, row_count=10)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("damage", ["truncated", "magic", "version", "layout", "count",
                                    "unsorted"])
def test_malformed_dictionaries_are_refused_naming_the_field(damage: str, layout: int) -> None:
    data = bytearray(build_dictionary(bytes(32), REPO, 1, SEG, {"w=x": [1, 2, 3]},
                                      version=layout))
    size = _entry(layout)
    if damage == "truncated":
        data = data[:10]
    elif damage == "magic":
        data[0] ^= 1
    elif damage == "version":
        data[4] = 9
    elif damage == "layout":
        data[5] = 8
    elif damage == "count":
        data[15] += 1
    else:
        first, second = bytes(data[16 : 16 + size]), bytes(data[16 + size : 16 + 2 * size])
        data[16 : 16 + size], data[16 + size : 16 + 2 * size] = second, first
    with pytest.raises(FormatError, match="keyword dictionary seg"):
        Dictionary.from_bytes(bytes(data), "seg")


def test_tokens_round_trip_and_never_print_their_keys() -> None:
    token = keyword_token(bytes(range(32)), REPO, 1, "modality=CT")
    assert KeywordToken.from_bytes(token.to_bytes()).to_bytes() == token.to_bytes()
    assert token.k1.hex() not in repr(token)
    with pytest.raises(FormatError):
        KeywordToken.from_bytes(b"short")
    with pytest.raises(ValueError):
        keyword_token(bytes(31), REPO, 1, "modality=CT")


def test_one_keyword_over_a_million_rows_in_one_segment(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    """Figure for docs/KEYWORDS.md: 1M rows, 12 keywords each (12M entries is too big for
    a test; here 1M rows and a keyword on 1 % of them, in a dictionary of 2M entries)."""
    rng = np.random.default_rng(SEED)
    key = bytes(range(32))
    rows = np.flatnonzero(rng.random(1_000_000) < 0.01).tolist()
    index = {"accession=A1": rows, "modality=CT": list(range(0, 1_000_000, 2)),
             "modality=MR": list(range(1, 1_000_000, 2))}
    start = time.perf_counter()
    data = build_dictionary(key, REPO, 1, SEG, index)
    built = time.perf_counter() - start
    dictionary = Dictionary.from_bytes(data)
    token = keyword_token(key, REPO, 1, "accession=A1")
    start = time.perf_counter()
    found = dictionary.search(token, REPO, SEG, 1, 1_000_000)
    rare = time.perf_counter() - start
    start = time.perf_counter()
    half = dictionary.search(keyword_token(key, REPO, 1, "modality=CT"), REPO, SEG, 1,
                             1_000_000)
    common = time.perf_counter() - start
    assert found.tolist() == rows and half.size == 500_000
    with capsys.disabled():
        print(f"\n[sse] {len(dictionary)} entries built in {built:.2f} s; lookup "
              f"{len(rows)} rows {rare * 1e3:.1f} ms, 500000 rows {common * 1e3:.0f} ms")


def test_colliding_dummies_are_drawn_again_and_a_lasting_collision_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from crypto import csprng
    calls: list[int] = []

    def zeros_once(n: int) -> bytes:
        calls.append(n)
        return bytes(n) if len(calls) == 1 else csprng.random_bytes(n)

    monkeypatch.setattr(sse, "random_bytes", zeros_once)
    data = build_dictionary(bytes(32), REPO, 1, SEG, {"w=x": [1]})  # 15 equal dummies first
    assert len(calls) == 2 and _search(data, bytes(32), "w=x") == [1]
    Dictionary.from_bytes(data)  # unique labels
    monkeypatch.setattr(sse, "random_bytes", bytes)
    with pytest.raises(ValueError, match="two labels collide"):
        build_dictionary(bytes(32), REPO, 1, SEG, {"w=x": [1]})


@pytest.mark.parametrize("plain", ["filler inside", "decreasing", "all fillers",
                                   "count too high", "second check word"])
def test_a_packed_entry_out_of_order_is_refused(plain: str, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    """Pi_pack's redundancy: a writer (or a forger holding a token) whose entries have a
    filler before a row, rows out of order, nothing but fillers, a first entry counting
    more entries than there are, or a non-zero check word after the first is refused,
    never read as some rows. (A count too low reads as a keyword on fewer rows: the
    writer's word, as the rows are; the segment MAC keeps anyone else from writing it.)
    The keyword has 20 rows: two entries."""
    real = sse._plain_values

    def broken(ordered: list[int], version: int) -> np.ndarray:
        values = real(ordered, version).copy()
        words = values.view(">u4")
        if plain == "filler inside":
            words[1, 1] = sse.FILLER  # the last entry's fillers are at its end only
        elif plain == "decreasing":
            words[0, 1], words[0, 2] = words[0, 2], words[0, 1]
        elif plain == "all fillers":
            words[1, 1:] = sse.FILLER
        elif plain == "count too high":
            words[0, 0] = 3
        else:
            words[1, 0] = 1
        return values

    rows = list(range(1, 21))
    for monkeyed in (False, True):
        if monkeyed:
            monkeypatch.setattr(sse, "_plain_values", broken)
        data = build_dictionary(bytes(32), REPO, 1, SEG, {"w=x": rows})
        if not monkeyed:
            assert _search(data, bytes(32), "w=x") == rows
            continue
        with pytest.raises(FormatError, match="does not belong"):
            _search(data, bytes(32), "w=x")


def test_a_pi_bas_token_layout_never_meets_a_packed_entry() -> None:
    """The two layouts derive different segment keys from the same token: a version-1
    dictionary read as if packed (or the reverse) finds no label."""
    key = bytes(range(32))
    token = keyword_token(key, REPO, 1, "w=x")
    basic = Dictionary.from_bytes(build_dictionary(key, REPO, 1, SEG, {"w=x": [1]},
                                                   version=sse.BASIC))
    packed = Dictionary.from_bytes(build_dictionary(key, REPO, 1, SEG, {"w=x": [1]}))
    assert basic.keys(token, REPO, SEG, 1) != packed.keys(token, REPO, SEG, 1)
    assert basic.search(token, REPO, SEG, 1).tolist() == [1]
    assert packed.search(token, REPO, SEG, 1).tolist() == [1]
