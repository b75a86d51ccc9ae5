"""Keywords of images, query parsing, and the encrypted evaluation against a plaintext index.

The end-to-end checks build real dictionaries per segment (crypto/sse.py), evaluate token
queries the way the service does (cloud/keyword_index.py) and compare with an inverted
index evaluated in plaintext here, on random metadata (seeded: the seed is in the message)
and on the real headers of pydicom's test files.
"""

from __future__ import annotations

import calendar
import datetime as dt
import random
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from app.core.keywords import (
    Query,
    QueryError,
    date_range,
    keywords_of,
    parse_query,
    rows_by_keyword,
    words,
)
from app.core.meta import ImageMeta
from app.imaging.clinical import clinical_attributes
from cloud.keyword_index import SegmentKeywords, TokenQuery
from crypto.sse import build_dictionary

REPO = "repo-k"
SEED = 1727


def _meta(image_id: str, **clinical: str) -> ImageMeta:
    return ImageMeta(image_id=image_id, clinical=clinical)


def test_keywords_of_an_image_cover_every_field_normalised() -> None:
    meta = _meta("a", Modality="mr", BodyPartExamined="Knee ", Laterality="L",
                 StudyDescription="IRM genou (Gauche) w/o", SeriesDescription="T1 SE sag",
                 PatientID="PSEUDO-7", AccessionNumber=" ACC 12 ", StudyDate="20240115")
    assert keywords_of(meta) == {
        "modality=MR", "bodypart=KNEE", "laterality=L", "study=irm", "study=genou",
        "study=gauche", "series=t1", "series=se", "series=sag", "patient=PSEUDO-7",
        "accession=ACC 12", "date=2024", "date=2024-01", "date=2024-01-15"}
    assert keywords_of(_meta("b")) == set()
    assert keywords_of(_meta("c", StudyDate="2024")) == set()  # not a full DICOM date
    assert words("Épaule DROITE, 3D-T2") == ["epaule", "droite", "3d", "t2"]


def test_older_metadata_tags_are_read_when_clinical_is_missing() -> None:
    meta = ImageMeta(image_id="x", tags={"Modality": "CT"})
    assert keywords_of(meta) == {"modality=CT"}


def test_terms_of_one_field_are_ored_of_different_fields_anded() -> None:
    query = parse_query(["modality=CT", "modality=mr", "bodypart=chest"])
    assert {c.field: c.keywords for c in query.clauses} == {
        "modality": frozenset({"modality=CT", "modality=MR"}),
        "bodypart": frozenset({"bodypart=CHEST"})}
    assert parse_query("modality=CT,MR").clauses == parse_query("modality=CT modality=MR").clauses


@pytest.mark.parametrize("text", ["NOT modality=US", "modality!=US", "-modality=US"])
def test_three_spellings_of_not(text: str) -> None:
    (clause,) = parse_query(text).clauses
    assert clause.negated and clause.keywords == {"modality=US"}


def test_a_multi_word_description_needs_every_word() -> None:
    query = parse_query('study="knee MRI"')
    assert sorted(sorted(c.keywords) for c in query.clauses) == [["study=knee"], ["study=mri"]]
    assert query.matches({"study=knee", "study=mri"})
    assert not query.matches({"study=knee"})


@pytest.mark.parametrize("text, why", [
    ("modality", "field=value"), ("colour=red", "unknown field"), ("modality=", "no value"),
    ("NOT", "ends with NOT"), ("date=2024-13", "not a valid date"), ("date=24", "not a date"),
    ("date=2024-06..2024-01", "ends before"), ('study!="knee mri"', "one word"),
    ('study="knee,left hip"', "one word per value"), ("", "empty"), ("study=-", "nothing"),
    ("date=1000..9000", "more than"),
])
def test_bad_queries_are_refused_naming_the_term(text: str, why: str) -> None:
    with pytest.raises(QueryError, match=why):
        parse_query(text)


def _days(tokens: list[str]) -> set[dt.date]:
    out: set[dt.date] = set()
    for token in tokens:
        value = token.removeprefix("date=")
        parts = [int(p) for p in value.split("-")]
        first = dt.date(parts[0], parts[1] if len(parts) > 1 else 1,
                        parts[2] if len(parts) > 2 else 1)
        day = first
        while True:
            out.add(day)
            day += dt.timedelta(days=1)
            if (len(parts) == 1 and day.year != first.year) or (
                    len(parts) == 2 and day.month != first.month) or len(parts) == 3:
                break
    return out


def test_date_ranges_expand_to_the_fewest_tokens_covering_exactly_the_range() -> None:
    rng = random.Random(SEED)
    for _ in range(200):
        first = dt.date(2019, 1, 1) + dt.timedelta(days=rng.randrange(2000))
        last = first + dt.timedelta(days=rng.randrange(900))
        tokens = date_range(first, last)
        expected = {first + dt.timedelta(days=i) for i in range((last - first).days + 1)}
        assert _days(tokens) == expected, f"seed {SEED}: {first}..{last}"
        assert len(tokens) == len(set(tokens))
        # Fewest: no run of day tokens fills a whole month, no months fill a whole year.
        months = {t[5:12] for t in tokens if len(t) == 15}
        for m in months:
            length = calendar.monthrange(int(m[:4]), int(m[5:]))[1]
            assert len([t for t in tokens if t.startswith(f"date={m}-")]) < length, m
        years = {t[5:9] for t in tokens if len(t) == 12}
        assert all(len([t for t in tokens if t.startswith(f"date={y}-") and len(t) == 12])
                   < 12 for y in years)
    assert parse_query("date=2024-01..2024-06").clauses[0].keywords == {
        f"date=2024-0{m}" for m in range(1, 7)}
    assert parse_query("date=2023..2024").clauses[0].keywords == {"date=2023", "date=2024"}
    assert parse_query("date=2024-02").clauses[0].keywords == {"date=2024-02"}
    assert parse_query("date=20240115").clauses[0].keywords == {"date=2024-01-15"}


def _plaintext(query_terms: list[tuple[str, list[str], bool]], index: dict[str, set[int]],
               rows: int) -> list[int]:
    """Independent plaintext evaluation: AND of (OR of keywords), minus the negated ones."""
    result = set(range(rows))
    for _field, keys, negated in query_terms:
        hit: set[int] = set().union(*(index.get(k, set()) for k in keys))
        result = result - hit if negated else result & hit
    return sorted(result)


def _segments(metas: list[ImageMeta], key: bytes, version: int, size: int
              ) -> list[tuple[int, SegmentKeywords]]:
    out = []
    for start in range(0, len(metas), size):
        part = metas[start : start + size]
        seg_id = f"{start:032x}"
        data = build_dictionary(key, REPO, version, seg_id, rows_by_keyword(part))
        out.append((start, SegmentKeywords.load(data, REPO, seg_id, version, len(part))))
    return out


def _encrypted(query: Query, segments: list[tuple[int, SegmentKeywords]], key: bytes,
               version: int) -> list[int]:
    wire = TokenQuery.from_bytes(query.tokens(key, REPO, version).to_bytes())
    return [start + int(r) for start, seg in segments for r in seg.evaluate(wire)]


def _terms(query: Query) -> list[tuple[str, list[str], bool]]:
    return [(c.field, sorted(c.keywords), c.negated) for c in query.clauses]


def _random_metas(rng: random.Random, n: int) -> list[ImageMeta]:
    metas = []
    for i in range(n):
        day = dt.date(2023, 1, 1) + dt.timedelta(days=rng.randrange(700))
        clinical = {"Modality": rng.choice(["CT", "MR", "US", "CR"]),
                    "BodyPartExamined": rng.choice(["CHEST", "KNEE", "HEAD", "ABDOMEN"]),
                    "StudyDescription": " ".join(rng.sample(
                        ["thorax", "knee", "contrast", "mri", "follow", "up", "brain"], 2)),
                    "PatientID": f"P{rng.randrange(30)}", "StudyDate": f"{day:%Y%m%d}"}
        if rng.random() < 0.5:
            clinical["Laterality"] = rng.choice("RL")
        if rng.random() < 0.3:
            clinical["AccessionNumber"] = f"A{rng.randrange(50)}"
        metas.append(_meta(f"img{i}", **clinical))
    return metas


def _random_query(rng: random.Random) -> str:
    terms = []
    if rng.random() < 0.7:
        terms.append("modality=" + ",".join(rng.sample(["CT", "MR", "US", "CR", "PT"],
                                                       rng.randint(1, 2))))
    if rng.random() < 0.5:
        terms.append(f"bodypart={rng.choice(['chest', 'knee', 'head', 'abdomen'])}")
    if rng.random() < 0.4:
        terms.append(f"NOT laterality={rng.choice('RL')}")
    if rng.random() < 0.4:
        start = dt.date(2023, 1, 1) + dt.timedelta(days=rng.randrange(700))
        end = start + dt.timedelta(days=rng.randrange(200))
        terms.append(f"date={start:%Y-%m-%d}..{end:%Y-%m-%d}")
    if rng.random() < 0.3:
        terms.append(f"study={rng.choice(['knee', 'mri', 'brain'])}")
    if rng.random() < 0.2:
        terms.append(f"patient=P{rng.randrange(30)}")
    if rng.random() < 0.2:
        terms.append(f"-accession=A{rng.randrange(50)}")
    return " ".join(terms) or "NOT modality=US"


@pytest.mark.parametrize("seed", [SEED, SEED + 1])
def test_encrypted_queries_equal_the_plaintext_index_on_random_metadata(seed: int) -> None:
    rng = random.Random(seed)
    key = rng.randbytes(32)
    metas = _random_metas(rng, 700)
    index: dict[str, set[int]] = {}
    for row, meta in enumerate(metas):
        for keyword in keywords_of(meta):
            index.setdefault(keyword, set()).add(row)
    segments = _segments(metas, key, 4, size=256)
    for _ in range(60):
        text = _random_query(rng)
        query = parse_query(text)
        expected = _plaintext(_terms(query), index, len(metas))
        assert _encrypted(query, segments, key, 4) == expected, f"seed {seed}: {text}"
        assert [i for i, m in enumerate(metas) if query.matches(keywords_of(m))] == expected


def _real_metas() -> list[ImageMeta]:
    folders = {Path(get_testdata_file("CT_small.dcm")).parent,
               Path(get_testdata_file("emri_small.dcm")).parent}
    metas = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for folder in sorted(folders):
            for path in sorted(folder.glob("*.dcm")):
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True)
                except Exception:  # some test files are deliberately broken
                    continue
                metas.append(_meta(path.name, **clinical_attributes(ds)))
    return metas


def test_encrypted_queries_equal_the_plaintext_index_on_real_dicom_headers() -> None:
    metas = _real_metas()
    assert len(metas) > 100
    key = bytes(range(32))
    index: dict[str, set[int]] = {}
    for row, meta in enumerate(metas):
        for keyword in keywords_of(meta):
            index.setdefault(keyword, set()).add(row)
    assert {"modality=CT", "modality=MR", "date=2004"} <= set(index), sorted(index)[:20]
    segments = _segments(metas, key, 1, size=50)
    for keyword in sorted(index):  # every keyword present, alone and negated
        field, _, value = keyword.partition("=")
        if "," in value:
            continue  # a comma separates alternatives: such a value is not writable
        for text in ([f"{field}={value}"], ["NOT", f"{field}={value}"]):
            query = parse_query(text)
            assert query.clauses[0].keywords == {keyword}, text
            expected = _plaintext(_terms(query), index, len(metas))
            assert _encrypted(query, segments, key, 1) == expected, text
    query = parse_query("modality=CT,MR date=1990..2010 NOT bodypart=HEAD")
    expected = _plaintext(_terms(query), index, len(metas))
    assert expected and _encrypted(query, segments, key, 1) == expected


def test_a_query_under_another_key_or_version_finds_nothing() -> None:
    metas = [_meta(f"i{i}", Modality="CT") for i in range(10)]
    key = bytes(range(32))
    segments = _segments(metas, key, 2, size=10)
    query = parse_query("modality=CT")
    assert _encrypted(query, segments, key, 2) == list(range(10))
    assert _encrypted(query, segments, key, 1) == []
    assert _encrypted(query, segments, bytes(32), 2) == []


@pytest.mark.parametrize("damage", [b"", b"RCKQ", b"XXXX\x01\x00\x00", b"RCKQ\x01\x00\x01",
                                    b"RCKQ\x01\x00\x01\x02\x00\x00", b"RCKQ\x01\x00\x00!"])
def test_malformed_token_queries_are_refused(damage: bytes) -> None:
    from crypto.errors import FormatError
    with pytest.raises(FormatError, match="keyword query"):
        TokenQuery.from_bytes(damage)


def test_a_clause_without_tokens_matches_nothing_and_not_alone_starts_from_every_row() -> None:
    from cloud.keyword_index import TokenClause
    metas = [_meta(f"i{i}", Modality="CT" if i % 2 else "MR") for i in range(6)]
    key = bytes(range(32))
    ((_, segment),) = _segments(metas, key, 1, size=6)
    assert segment.evaluate(TokenQuery((TokenClause(()),))).tolist() == []
    not_ct = parse_query("NOT modality=CT").tokens(key, REPO, 1)
    assert segment.evaluate(not_ct).tolist() == [0, 2, 4]
