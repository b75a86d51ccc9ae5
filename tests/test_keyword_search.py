"""Keyword search, query side (issue 17): the engine's exact row-subset search, the
service's evaluation of tokens per segment with labels and tombstones, the wire
protocol's keyword sections, and the real service answering a signed keyword request.

Truth is always plaintext: the keywords of each image's metadata (app.core.keywords
keywords_of) filtered by app.core.keywords.Query.matches, and brute-force squared
distances among the matching images (bench.datasets.plaintext_topk). Seeds are in the
test names or printed in the assertion messages.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.identity import RequestSigner
from app.core.keywords import keywords_of, parse_query, rows_by_keyword
from app.core.meta import ImageMeta
from app.core.service_client import ServiceClient
from bench import datasets
from cloud import keyword_index, layout, wire
from cloud import search as search_module
from cloud.auth import SignatureVerifier
from cloud.directory_store import DirectoryStore
from cloud.keyword_index import (
    IdLookup,
    KeywordView,
    SegmentDictionary,
    SegmentLabel,
    TokenQuery,
)
from cloud.search import EncryptedIndex, search_subset
from cloud.segments import encode_segment
from cloud.service import create_app
from crypto import sse
from crypto.csprng import random_bytes
from crypto.errors import FormatError
from crypto.identity import Identity
from crypto.index import IndexKey
from crypto.labels import OP_ADD, OP_REMOVE, LabelObject, build_label, order_key
from crypto.signed import sign_json
from crypto.sse import build_dictionary

DIM = 24
SERVICE_ID = "svc-keyword-test"
MODALITIES = ["CT", "MR", "US", "CR"]
PARTS = ["CHEST", "KNEE", "HEAD", "ABDOMEN", ""]
WORDS = ["knee", "mri", "contrast", "t1", "axial", "follow", "up"]


def synthetic_metas(rng: np.random.Generator, n: int) -> list[ImageMeta]:
    """Images with the clinical attributes keywords are made of, drawn at random."""
    out = []
    for _ in range(n):
        day = datetime.date(2023, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 730)))
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(0, 3)), replace=False))
        clinical = {"Modality": str(rng.choice(MODALITIES)),
                    "BodyPartExamined": str(rng.choice(PARTS)),
                    "Laterality": str(rng.choice(["R", "L", ""])),
                    "StudyDescription": words,
                    "PatientID": f"P{int(rng.integers(0, 20))}",
                    "AccessionNumber": f"A{int(rng.integers(0, 50))}",
                    "StudyDate": day.strftime("%Y%m%d")}
        out.append(ImageMeta(image_id=layout.new_id(), clinical=clinical))
    return out


QUERIES = [
    "modality=CT", "modality=CT,MR bodypart=KNEE", "-modality=US", "NOT bodypart=CHEST",
    "study=knee", "study='knee mri'", "date=2023-03..2023-09", "date=2024",
    "modality=MR date=2023-01-01..2023-01-31 laterality!=L", "patient=P3",
    "accession=A7,A8,A9", "modality=CT bodypart=HEAD,ABDOMEN -study=contrast",
    "label=teaching", "label=teaching modality=CT", "-label=teaching", "modality=XA",
]


# --- the engine: exact top-k among a row subset ----------------------------------------------


@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.1, 0.4, 0.95, 1.0])
@pytest.mark.parametrize("path", ["direct", "refine", "scan"])
def test_subset_search_equals_plaintext_brute_force(fraction: float, path: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of search_subset's three ways (full scores, filter and refine, codes scan)
    against plaintext brute force over the subset's rows."""
    seed = int(fraction * 10000) + len(path)
    direct = path == "direct"
    if path == "scan":
        monkeypatch.setattr(search_module, "SCAN_FRACTION", 0.0)
    rng = np.random.default_rng(seed)
    data = datasets.low_rank_varying(rng, 3000, DIM)
    key = IndexKey.generate(DIM, sample=data[:500])
    index = EncryptedIndex(key.encrypt(data))
    subset = np.flatnonzero(rng.random(len(data)) < fraction)
    if not subset.size:
        subset = np.array([17])
    queries = datasets.perturbed_queries(rng, data, 12, noise=0.3)
    monkeypatch.setattr(search_module, "SUBSET_DIRECT_ROWS", 10**9 if direct else 0)
    for k in (1, 10):
        results = search_subset(index, key.query(queries), k, subset)
        _, truth = datasets.plaintext_topk(data[subset], queries, min(k, subset.size))
        for qi, result in enumerate(results):
            assert set(result.positions.tolist()) <= set(subset.tolist()), f"seed {seed}"
            assert result.positions.size == min(k, subset.size), f"seed {seed}"
            assert datasets.agrees(result.positions, data, queries[qi], truth[qi]), (
                f"seed {seed}, k {k}, query {qi}: {result.positions}")


@pytest.mark.parametrize("fraction", [0.01, 0.4, 1.0])
@pytest.mark.parametrize("path", ["refine", "scan"])
def test_first_level_started_ahead_gives_the_same_answers(
        fraction: float, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A combined query's first level started before its subset was known (in chunks,
    shared between the engine's background thread and the caller's) answers exactly as
    the first level computed after it; a narrow subset stops it and gathers its rows."""
    monkeypatch.setattr(search_module, "AHEAD_CHUNK", 256)  # several chunks at 3,000 rows
    monkeypatch.setattr(search_module, "SUBSET_DIRECT_ROWS", 0)
    if path == "scan":
        monkeypatch.setattr(search_module, "SCAN_FRACTION", 0.0)
    rng = np.random.default_rng(int(fraction * 100) + len(path))
    data = datasets.low_rank_varying(rng, 3000, DIM)
    key = IndexKey.generate(DIM, sample=data[:500])
    index = EncryptedIndex(key.encrypt(data))
    subset = np.flatnonzero(rng.random(len(data)) < fraction)
    queries = datasets.perturbed_queries(rng, data, 8, noise=0.3)
    token = key.query(queries)
    for qi in range(len(queries)):
        one = token.select(qi)
        ahead = search_module.FirstLevelAhead(index, one.levels[0][0])
        got = search_subset(index, one, 10, subset, ahead)[0]
        want = search_subset(index, one, 10, subset)[0]
        assert got.positions.tolist() == want.positions.tolist(), (fraction, path, qi)
        assert got.scores.tolist() == want.scores.tolist()
        _, truth = datasets.plaintext_topk(data[subset], queries[qi:qi + 1], 10)
        assert datasets.agrees(got.positions, data, queries[qi], truth[0])
        if fraction * search_module.SUBSET_WIDE_SHARE >= 1:  # wide: every chunk scored
            assert ahead._next == len(ahead._chunks)


def test_first_level_ahead_only_for_one_query_on_a_large_index(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    data = datasets.low_rank_varying(rng, 600, DIM)
    key = IndexKey.generate(DIM, sample=data)
    index = EncryptedIndex(key.encrypt(data))
    token = key.query(data[:2])
    assert search_module.first_level_ahead(index, token.select(0)) is None  # small index
    monkeypatch.setattr(search_module, "AHEAD_ROWS", 0)
    monkeypatch.setattr(search_module, "engine_threads", lambda: 2)
    assert search_module.first_level_ahead(index, token) is None  # two queries
    ahead = search_module.first_level_ahead(index, token.select(0))
    assert ahead is not None
    with pytest.raises(ValueError, match="one query"):
        search_subset(index, token, 1, np.arange(600), ahead)
    ahead.cancel()


def test_subset_outside_the_index_is_refused() -> None:
    rng = np.random.default_rng(1)
    data = datasets.gaussian(rng, 50, DIM)
    key = IndexKey.generate(DIM, sample=data)
    with pytest.raises(ValueError, match="outside the index"):
        search_subset(EncryptedIndex(key.encrypt(data)), key.query(data[:1]), 1,
                      np.array([3, 50]))


def test_id_lookup_finds_positions() -> None:
    rng = np.random.default_rng(2)
    ids = np.frombuffer(random_bytes(16 * 1000), dtype="V16")
    lookup = IdLookup(ids)
    chosen = np.sort(rng.choice(1000, 100, replace=False))
    absent = np.frombuffer(random_bytes(16 * 5), dtype="V16")
    found = lookup.positions(np.concatenate([ids[chosen[::-1]], absent]))
    assert found.tolist() == chosen.tolist()


# --- the service's evaluation: segments, labels, tombstones ----------------------------------


class Keys:
    """One key version's keys (what a member holds)."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.keyword_key = random_bytes(32)
        self.data_key = random_bytes(32)
        self.mac_key = random_bytes(32)


class Source:
    """A KeywordSource over dictionaries built here directly (crypto/sse.py)."""

    def __init__(self) -> None:
        self.segments: dict[str, SegmentDictionary] = {}
        self.label_objects: list[SegmentLabel] = []

    def segment(self, repo_id: str, segment_id: str, key_version: int, context: object
                ) -> SegmentDictionary | None:
        return self.segments.get(segment_id)

    def labels(self, repo_id: str, key_version: int, context: object) -> list[SegmentLabel]:
        return list(self.label_objects)

    def add_segment(self, keys: Keys, repo_id: str, seg_id: str,
                    metas: list[ImageMeta], version: int = sse.VERSION) -> None:
        ids = np.frombuffer(b"".join(bytes.fromhex(m.image_id) for m in metas), dtype="V16")
        self.segments[seg_id] = SegmentDictionary(ids, build_dictionary(
            keys.keyword_key, repo_id, keys.version, seg_id, rows_by_keyword(metas),
            version=version))

    def add_label(self, keys: Keys, repo_id: str, seg_id: str, seg_metas: list[ImageMeta],
                  op: int, word: str, image_ids: list[str], order: int) -> None:
        label_id = layout.new_id()
        blob = build_label(data_key=keys.data_key, keyword_key=keys.keyword_key,
                           mac_key=keys.mac_key, repo_id=repo_id, key_version=keys.version,
                           label_id=label_id, segment_id=seg_id,
                           segment_ids=[m.image_id for m in seg_metas], op=op,
                           labels={word: image_ids}, base_sequence=order)
        parsed = LabelObject.from_bytes(blob, label_id)
        self.label_objects.append(SegmentLabel(
            parsed.label_id, parsed.key_version, parsed.segment_id, parsed.row_count,
            parsed.op == OP_REMOVE, order_key(parsed), parsed.dictionary))


def _plain(metas: list[ImageMeta], labels: dict[str, set[str]], terms: str) -> list[str]:
    query = parse_query(terms)
    return [m.image_id for m in metas
            if query.matches(keywords_of(m) | {f"label={w}" for w in labels.get(m.image_id,
                                                                                 ())})]


@pytest.mark.parametrize("merged", [False, True])
def test_view_equals_plaintext_filter_with_labels_and_tombstones(
        merged: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every query against the plaintext filter, the segments searched one by one or
    as one merged table (keyword_index._Merged), before and after a segment is added;
    one segment written in the older Pi_bas layout among the Pi_pack ones. The engine's
    rows of each answer (IdLookup.answer_positions) equal those of looking every id up."""
    monkeypatch.setattr(keyword_index, "MERGE_MIN", 1 if merged else 10**6)
    monkeypatch.setattr(keyword_index, "UNMERGED_MAX", 0)
    rng = np.random.default_rng(11)
    repo_id, keys = "kw-" + layout.new_id()[:8], Keys(1)
    segments = {layout.new_id(): synthetic_metas(rng, n) for n in (1, 57, 300, 143)}
    source = Source()
    for seg_id, metas in segments.items():
        source.add_segment(keys, repo_id, seg_id, metas,
                           version=sse.BASIC if len(metas) == 57 else sse.PACKED)
    ordered = [m for seg_id in sorted(segments) for m in segments[seg_id]]
    # labels: added, removed from some, added back to one, in log order
    labels: dict[str, set[str]] = {}
    order = 0
    for seg_id, metas in segments.items():
        chosen = [m.image_id for m in metas[::3]]
        order += 1
        source.add_label(keys, repo_id, seg_id, metas, OP_ADD, "teaching", chosen, order)
        labels.update({i: {"teaching"} for i in chosen})
        removed = chosen[::2]
        if removed:
            order += 1
            source.add_label(keys, repo_id, seg_id, metas, OP_REMOVE, "teaching", removed,
                             order)
            for i in removed:
                labels[i] = set()
            order += 1
            source.add_label(keys, repo_id, seg_id, metas, OP_ADD, "teaching", removed[:1],
                             order)
            labels[removed[0]] = {"teaching"}
    view = KeywordView(repo_id, 1)
    view.update(source, sorted(segments))
    for terms in QUERIES:
        query = parse_query(terms)
        found = view.evaluate(query.tokens(keys.keyword_key, repo_id, 1))
        got = [bytes(i).hex() for i in found.ids]
        assert got == _plain(ordered, labels, terms), terms
        assert found.segment_ids == sorted(segments)
        assert found.images == len(ordered)
        assert found.distinct and found.matched == found.ids.size
        for k in (1, 7, 500):
            assert found.first(k).tobytes() == found.ids[:k].tobytes(), (terms, k)
        lookup = IdLookup(np.concatenate([source.segments[s].ids for s in segments]))
        assert lookup.answer_positions(found).tolist() == \
            lookup.positions(found.ids).tolist(), terms
    late = layout.new_id()  # imported later: the merged table is built again
    segments[late] = synthetic_metas(rng, 90)
    source.add_segment(keys, repo_id, late, segments[late])
    view.update(source, sorted(segments))
    ordered = [m for seg_id in sorted(segments) for m in segments[seg_id]]
    for terms in QUERIES:
        found = view.evaluate(parse_query(terms).tokens(keys.keyword_key, repo_id, 1))
        assert [bytes(i).hex() for i in found.ids] == _plain(ordered, labels, terms), terms
    if merged:
        assert view._merged is not None and view._merged.usable and late in view._merged.index


def test_queries_of_several_clauses_evaluated_over_every_segment_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without label objects, a merged lookup's AND, OR and NOT are evaluated over every
    segment's rows at once (keyword_index._evaluate_together): the plaintext filter's
    answer, the same as segment by segment, the engine's rows those of looking every id
    up."""
    monkeypatch.setattr(keyword_index, "MERGE_MIN", 1)
    together = []
    real = keyword_index._evaluate_together

    def counted(*args: object, **kwargs: object) -> object:
        together.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(keyword_index, "_evaluate_together", counted)
    rng = np.random.default_rng(12)
    repo_id, keys = "kw-" + layout.new_id()[:8], Keys(1)
    segments = {layout.new_id(): synthetic_metas(rng, n) for n in (1, 64, 300, 143, 9)}
    source = Source()
    for seg_id, metas in segments.items():
        source.add_segment(keys, repo_id, seg_id, metas)
    ordered = [m for seg_id in sorted(segments) for m in segments[seg_id]]
    view = KeywordView(repo_id, 1)
    view.update(source, sorted(segments))
    lookup = IdLookup(np.concatenate([source.segments[s].ids for s in sorted(segments)]))
    several = 0
    for terms in QUERIES:
        query = parse_query(terms).tokens(keys.keyword_key, repo_id, 1)
        found = view.evaluate(query)
        assert [bytes(i).hex() for i in found.ids] == _plain(ordered, {}, terms), terms
        assert found.images == len(ordered) and found.segment_ids == sorted(segments)
        assert lookup.answer_positions(found).tolist() == \
            lookup.positions(found.ids).tolist(), terms
        several += len(query.clauses) > 1 or query.clauses[0].negated \
            or len(query.clauses[0].tokens) > 1
    assert several >= 5 and len(together) == several  # each such query took that path


def test_an_image_in_two_segments_is_answered_once() -> None:
    """The same image imported twice (two segments hold its id): the keyword answer and
    the engine's rows name it once, the row the index keeps."""
    rng = np.random.default_rng(12)
    repo_id, keys = "kw-" + layout.new_id()[:8], Keys(1)
    first, second = synthetic_metas(rng, 40), synthetic_metas(rng, 30)
    second[5] = first[3]  # imported again
    source = Source()
    seg_a, seg_b = sorted([layout.new_id(), layout.new_id()])
    source.add_segment(keys, repo_id, seg_a, first)
    source.add_segment(keys, repo_id, seg_b, second)
    view = KeywordView(repo_id, 1)
    view.update(source, [seg_a, seg_b])
    query = parse_query(f"accession={first[3].clinical['AccessionNumber']}")
    found = view.evaluate(query.tokens(keys.keyword_key, repo_id, 1))
    hex_ids = [bytes(i).hex() for i in found.ids]
    assert not found.distinct and hex_ids.count(first[3].image_id) == 1
    assert found.matched == len(hex_ids) and found.first(2).tobytes() == found.ids[:2].tobytes()
    assert hex_ids == _plain(first + [m for i, m in enumerate(second) if i != 5], {},
                             f"accession={first[3].clinical['AccessionNumber']}")
    index_ids = np.concatenate([source.segments[seg_a].ids,
                                np.delete(source.segments[seg_b].ids, 5)])
    lookup = IdLookup(index_ids)
    assert lookup.answer_positions(found).tolist() == lookup.positions(found.ids).tolist()


def test_a_damaged_packed_dictionary_is_named_in_the_merged_lookup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nine segments looked up together (one merged table, their entries decoded at
    once): the one whose values were altered is refused by name, not read as rows."""
    monkeypatch.setattr(keyword_index, "MERGE_MIN", 1)
    rng = np.random.default_rng(13)
    repo_id, keys = "kw-" + layout.new_id()[:8], Keys(1)
    source = Source()
    seg_ids = sorted(layout.new_id() for _ in range(9))
    for seg_id in seg_ids:
        source.add_segment(keys, repo_id, seg_id, synthetic_metas(rng, 60))
    victim = seg_ids[4]
    broken = bytearray(source.segments[victim].dictionary)
    entry = sse.LABEL_SIZE + sse.PACKED_VALUE_SIZE
    for offset in range(16 + sse.LABEL_SIZE, len(broken), entry):
        broken[offset] ^= 0x80  # the check word of every entry
    source.segments[victim] = SegmentDictionary(source.segments[victim].ids, bytes(broken))
    view = KeywordView(repo_id, 1)
    view.update(source, seg_ids)
    with pytest.raises(FormatError, match=f"segment {victim} does not belong"):
        view.evaluate(parse_query("modality=CT").tokens(keys.keyword_key, repo_id, 1))


def test_revoked_users_old_token_finds_nothing_in_new_segments() -> None:
    """Revocation draws a new keyword key with the new key version: a token made with
    the old key (version 1) finds nothing in a segment written under version 2, asked
    under either version number."""
    rng = np.random.default_rng(12)
    repo_id, old, new = "kw-" + layout.new_id()[:8], Keys(1), Keys(2)
    metas = synthetic_metas(rng, 200)
    source = Source()
    seg_old, seg_new = layout.new_id(), layout.new_id()
    source.add_segment(old, repo_id, seg_old, metas[:100])
    source.add_segment(new, repo_id, seg_new, metas[100:])
    views = {1: KeywordView(repo_id, 1), 2: KeywordView(repo_id, 2)}
    views[1].update(source, [seg_old])
    views[2].update(source, [seg_new])
    query = parse_query("-modality=XA")  # every image
    assert views[1].evaluate(query.tokens(old.keyword_key, repo_id, 1)).ids.size == 100
    assert views[2].evaluate(query.tokens(new.keyword_key, repo_id, 2)).ids.size == 100
    positive = parse_query("modality=CT,MR,US,CR")
    for version in (1, 2):
        stale = positive.tokens(old.keyword_key, repo_id, version)
        assert views[2].evaluate(stale).ids.size == 0
    assert views[1].evaluate(positive.tokens(old.keyword_key, repo_id, 1)).ids.size == 100


def test_the_same_keyword_in_two_repositories_finds_nothing_across() -> None:
    rng = np.random.default_rng(13)
    keys = Keys(1)
    metas = synthetic_metas(rng, 50)
    source, seg_id = Source(), layout.new_id()
    source.add_segment(keys, "kw-one", seg_id, metas)
    view = KeywordView("kw-two", 1)  # the dictionary served under another repository
    view.update(source, [seg_id])
    assert view.evaluate(parse_query("modality=CT,MR,US,CR").tokens(
        keys.keyword_key, "kw-one", 1)).ids.size == 0


# --- wire ------------------------------------------------------------------------------------


def test_keyword_requests_round_trip_and_refuse_malformed() -> None:
    rng = np.random.default_rng(3)
    data = datasets.gaussian(rng, 20, DIM)
    token = IndexKey.generate(DIM, sample=data).query(data[:2])
    query = parse_query("modality=CT -bodypart=KNEE").tokens(random_bytes(32), "r", 1)
    raw = query.to_bytes()
    only = wire.SearchRequestV2(1, 5000, 3, wire.FLAG_KEYWORDS | wire.FLAG_KEYWORDS_ONLY,
                                None, raw)
    combined = wire.SearchRequestV2(1, 7, 3, wire.FLAG_KEYWORDS | wire.FLAG_STATS, token, raw)
    for req in (only, combined):
        body = wire.encode_request(req)
        assert len(body) % 8 == 0 or req.token is not None
        back = wire.decode_request(body)
        assert back.keywords == raw and back.k == req.k and back.flags == req.flags
        assert TokenQuery.from_bytes(back.keywords).to_bytes() == raw
    assert wire.decode_request(wire.encode_request(combined)).token.widths == token.widths
    body = bytearray(wire.encode_request(only))
    refusals = {
        "KEYWORDS_ONLY without KEYWORDS": _with_flags(body, wire.FLAG_KEYWORDS_ONLY),
        "not in 1..100000": bytes(body[:12]) + (200_000).to_bytes(4, "little") + bytes(body[16:]),
        "trailing bytes": bytes(body) + bytes(8),
        "truncated (keyword query)": bytes(body[:40]),
        "reserved field must be zero": bytes(body[:36]) + b"\1" + bytes(body[37:]),
    }
    for expected, bad in refusals.items():
        with pytest.raises(wire.WireError, match=expected.replace("(", r"\(").replace(
                ")", r"\)")) as caught:
            wire.decode_request(bytes(bad))
        assert caught.value.status == 422
    # k above MAX_K is only for keyword-only requests
    with pytest.raises(wire.WireError, match=r"not in 1\.\.100"):
        wire.decode_request(wire.encode_request(wire.SearchRequestV2(
            1, 101, 0, wire.FLAG_KEYWORDS, token, raw)))


def _with_flags(body: bytearray, flags: int) -> bytes:
    out = bytearray(body)
    out[6:8] = flags.to_bytes(2, "little")
    return bytes(out)


def test_answer_keyword_section_is_checked() -> None:
    digest = wire.segment_set_digest("r", 1, [])
    answer = wire.SearchAnswerV2(1, 10, 0, 5, 0, bytes(32), digest, 0,
                                 [[(layout.new_id(), 0.0)]], None, None, matched=3)
    body = wire.encode_answer(answer)
    assert wire.decode_answer(body, queries=1, k=10, key_version=1, keywords=True).matched == 3
    with pytest.raises(wire.WireError, match="a keyword section was not asked for"):
        wire.decode_answer(body, queries=1, k=10, key_version=1)
    plain = wire.encode_answer(wire.SearchAnswerV2(1, 10, 0, 5, 0, bytes(32), digest, 0,
                                                   [[]], None, None))
    with pytest.raises(wire.WireError, match="keyword section is missing"):
        wire.decode_answer(plain, queries=1, k=10, key_version=1, keywords=True)
    lying = wire.encode_answer(wire.SearchAnswerV2(1, 10, 0, 5, 0, bytes(32), digest, 0,
                                                   [[(layout.new_id(), 0.0)]], None, None,
                                                   matched=0))
    with pytest.raises(wire.WireError, match="inconsistent"):
        wire.decode_answer(lying, queries=1, k=10, key_version=1, keywords=True)


# --- the real service app, signed requests ----------------------------------------------------


class World:
    """A repository of three segments whose dictionaries the service reads from a Source,
    and a fourth written before keyword search (no dictionary)."""

    def __init__(self, root: Path) -> None:
        self.store = DirectoryStore(root)
        self.owner = Identity.generate("Keyword Owner")
        self.alice = Identity.generate("Keyword Alice")
        for user in (self.owner, self.alice):
            self._register(user)
        self.repo = "kw-" + layout.new_id()[:8]
        self._manifest()
        rng = np.random.default_rng(21)
        self.keys = Keys(1)
        sizes = (120, 200, 80, 40)
        self.metas = synthetic_metas(rng, sum(sizes))
        self.features = datasets.low_rank_varying(rng, len(self.metas), DIM)
        self.key = IndexKey.generate(DIM, sample=self.features)
        self.source = Source()
        self.seg_ids = [layout.new_id() for _ in sizes]
        self.rows: dict[str, slice] = {}
        start = 0
        for seg_id, size in zip(self.seg_ids, sizes, strict=True):
            rows = slice(start, start + size)
            start += size
            self.rows[seg_id] = rows
            metas = self.metas[rows]
            blob = encode_segment([m.image_id for m in metas],
                                  self.key.encrypt(self.features[rows]), 1)
            self.store.put(layout.segment_key(self.repo, seg_id), blob)
        self.old = self.seg_ids[-1]  # written before issue 17: no dictionary
        for seg_id in self.seg_ids[:-1]:
            self.source.add_segment(self.keys, self.repo, seg_id, self.metas[self.rows[seg_id]])
        self.app = create_app(self.store, SignatureVerifier(self.store, [self.owner.sign_public],
                                                             SERVICE_ID),
                              refresh_interval=3600.0, service_id=SERVICE_ID,
                              keywords=self.source)
        self.http = TestClient(self.app)

    def _register(self, user: Identity) -> None:
        name = layout.user_key(user.user_id)
        card = user.card()
        payload: dict[str, object] = {
            "card": card.to_json(), "fingerprint": card.fingerprint,
            "registered": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        self.store.put(name, sign_json(self.owner, "user", name, payload))

    def _manifest(self) -> None:
        name = layout.manifest_key(self.repo)
        payload: dict[str, object] = {
            "repo_id": self.repo, "name": self.repo, "dim": DIM, "extractor": "radcrypt-v1",
            "format": "radcrypt-manifest-v1", "key_version": 1, "sequence": 1,
            "owner": self.owner.user_id,
            "members": [{"user_id": m.user_id, "key_version": 1}
                        for m in sorted([self.owner, self.alice], key=lambda m: m.user_id)]}
        self.store.put(name, sign_json(self.owner, "manifest", name, payload))

    def client(self) -> ServiceClient:
        return ServiceClient("http://testserver", RequestSigner(self.alice),
                             service_id=SERVICE_ID, http=self.http)

    def searched(self) -> list[ImageMeta]:
        """The images of the segments with a dictionary, in segment id order."""
        return [m for seg_id in sorted(self.seg_ids[:-1]) for m in self.metas[self.rows[seg_id]]]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("keywords"))
    with w.http:
        yield w


@pytest.mark.parametrize("terms", QUERIES[:12])
def test_service_keyword_only_answer_equals_plaintext(world: World, terms: str) -> None:
    tokens = parse_query(terms).tokens(world.keys.keyword_key, world.repo, 1)
    answer = world.client().search_v2(world.repo, None, 1000, 1, keywords=tokens,
                                      list_segments=True)
    expected = _plain(world.searched(), {}, terms)
    assert [i for i, _ in answer.hits[0]] == expected
    assert answer.matched == len(expected)
    assert sorted(answer.segment_ids or []) == sorted(world.seg_ids[:-1])
    assert world.old not in (answer.segment_ids or [])  # searched by keyword: never claimed
    assert answer.images == len(world.searched())


def test_service_keyword_only_answer_is_cut_at_k_and_says_how_many(world: World) -> None:
    tokens = parse_query("-modality=XA").tokens(world.keys.keyword_key, world.repo, 1)
    answer = world.client().search_v2(world.repo, None, 7, 1, keywords=tokens)
    assert len(answer.hits[0]) == 7 and answer.matched == len(world.searched())


@pytest.mark.parametrize("terms", ["modality=CT", "modality=MR bodypart=KNEE,HEAD",
                                   "date=2023", "modality=XA", "-modality=US"])
def test_service_combined_query_is_exact_among_the_matching_images(world: World,
                                                                   terms: str) -> None:
    rng = np.random.default_rng(len(terms))
    queries = datasets.perturbed_queries(rng, world.features, 5, noise=0.3)
    tokens = parse_query(terms).tokens(world.keys.keyword_key, world.repo, 1)
    k = 10
    answer = world.client().search_v2(world.repo, world.key.query(queries), k, 1,
                                      keywords=tokens)
    matching = set(_plain(world.searched(), {}, terms))
    rows = np.array([i for i, m in enumerate(world.metas) if m.image_id in matching],
                    dtype=np.int64)
    assert answer.matched == rows.size
    position = {m.image_id: i for i, m in enumerate(world.metas)}
    for qi, hits in enumerate(answer.hits):
        assert {i for i, _ in hits} <= matching, terms
        assert len(hits) == min(k, rows.size)
        if rows.size:
            _, truth = datasets.plaintext_topk(world.features[rows], queries[qi:qi + 1],
                                               min(k, rows.size))
            got = np.array([position[i] for i, _ in hits])
            assert datasets.agrees(got, world.features, queries[qi], truth[0]), terms


@pytest.mark.parametrize(("terms", "ahead"), [
    ("modality=CT", True), ("modality=XA", True), ("-modality=US", True),
    ("modality=CT,MR", True), ("modality=MR bodypart=KNEE,HEAD", False)])
def test_service_combined_query_with_the_first_level_started_ahead(
        world: World, terms: str, ahead: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service starts a combined query's first level before its keyword lookup on
    indexes of AHEAD_ROWS rows and more (moved to 0 here), except for an AND: the same
    exact answers either way."""
    monkeypatch.setattr(search_module, "AHEAD_ROWS", 0)
    monkeypatch.setattr(search_module, "AHEAD_CHUNK", 64)
    monkeypatch.setattr(search_module, "SUBSET_DIRECT_ROWS", 0)
    monkeypatch.setattr(search_module, "engine_threads", lambda: 2)
    started = []
    real = search_module.FirstLevelAhead

    class Counted(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object) -> None:
            started.append(self)
            super().__init__(*args)

    monkeypatch.setattr(search_module, "FirstLevelAhead", Counted)
    rng = np.random.default_rng(len(terms) + 1)
    queries = datasets.perturbed_queries(rng, world.features, 3, noise=0.3)
    tokens = parse_query(terms).tokens(world.keys.keyword_key, world.repo, 1)
    matching = set(_plain(world.searched(), {}, terms))
    rows = np.array([i for i, m in enumerate(world.metas) if m.image_id in matching],
                    dtype=np.int64)
    position = {m.image_id: i for i, m in enumerate(world.metas)}
    for qi in range(len(queries)):
        answer = world.client().search_v2(world.repo, world.key.query(queries[qi:qi + 1]),
                                          10, 1, keywords=tokens)
        assert answer.matched == rows.size
        hits = answer.hits[0]
        assert len(hits) == min(10, rows.size)
        if rows.size:
            _, truth = datasets.plaintext_topk(world.features[rows], queries[qi:qi + 1],
                                               min(10, rows.size))
            got = np.array([position[i] for i, _ in hits])
            assert datasets.agrees(got, world.features, queries[qi], truth[0]), terms
    assert len(started) == (len(queries) if ahead else 0)  # the service's own choice


def test_service_refuses_a_malformed_keyword_query(world: World) -> None:
    bad = wire.SearchRequestV2(1, 5, 0, wire.FLAG_KEYWORDS | wire.FLAG_KEYWORDS_ONLY, None,
                               b"RCKQ\x01\x00\x01\x00\x00\x01" + bytes(10))
    from app.core.service_client import signed_headers

    body = wire.encode_request(bad)
    path = f"/v2/repos/{world.repo}/search"
    headers = {"content-type": wire.REQUEST_MEDIA_TYPE, wire.PROTOCOL_HEADER: "2",
               **signed_headers(world.alice, "POST", path, body, SERVICE_ID, 2)}
    response = world.http.post(path, content=body, headers=headers)
    assert response.status_code == 422
    assert "keyword query" in response.json()["detail"]




def test_the_client_refuses_an_image_the_query_does_not_match() -> None:
    """A hostile service that names an image outside the query is caught after
    decryption (ServiceError), labels included; a damaged image is refused too."""
    from app.core.errors import ServiceError
    from app.core.searcher import check_matches

    rng = np.random.default_rng(5)
    metas = synthetic_metas(rng, 40)
    query = parse_query("modality=CT")
    good = [m for m in metas if m.attribute("Modality") == "CT"]
    bad = next(m for m in metas if m.attribute("Modality") != "CT")
    check_matches(query, good, None, None)  # type: ignore[arg-type]
    with pytest.raises(ServiceError, match=f"named image {bad.image_id}, which does not"):
        check_matches(query, [*good, bad], None, None)  # type: ignore[arg-type]
    labelled = parse_query("label=teaching")
    check_matches(labelled, [bad], None, None,  # type: ignore[arg-type]
                  labels=lambda: {bad.image_id: {"teaching"}})
    with pytest.raises(ServiceError, match="does not match"):
        check_matches(labelled, [bad], None, None,  # type: ignore[arg-type]
                      labels=lambda: {})
    with pytest.raises(ServiceError, match="does not verify"):
        check_matches(query, [ImageMeta.damaged(bad.image_id, "MAC mismatch")], None,
                      None)  # type: ignore[arg-type]
