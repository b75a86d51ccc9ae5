"""Searchable keywords of an image, their normalisation, and boolean keyword queries.

Why one module: the keywords written into a segment's encrypted dictionary (at import) and
the keywords a query asks for must normalise the same way, or a search silently misses.
A keyword is the string ``field=value``; crypto/sse.py turns it into a token and never sees
a field. Fields (docs/KEYWORDS.md):

    modality    Modality, upper case                       modality=CT
    bodypart    BodyPartExamined, upper case, A-Z0-9_       bodypart=CHEST
    laterality  Laterality (R, L, B; "left" reads as L)     laterality=R
    study       each word of StudyDescription               study=knee
    series      each word of SeriesDescription              series=t1
    patient     PatientID (the pseudonym in research repositories), exact
    accession   AccessionNumber, exact
    date        StudyDate as year, month and day            date=2024 date=2024-01 date=2024-01-15
    label       a label the user adds (issue 17's later part), one word

Query terms (CLI arguments or one string split like a shell): ``field=v1,v2`` (OR),
``field!=v`` / ``-field=v`` / ``NOT field=v`` (NOT), ``date=2024-01..2024-06`` (a range,
expanded to the fewest year/month/day tokens). Terms of different fields are ANDed; terms
of one field are ORed. A multi-word description value (``study="knee mri"``) means every
word (AND).
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
import shlex
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from app.core.meta import ImageMeta
from cloud.keyword_index import TokenClause, TokenQuery
from crypto.sse import keyword_token

FIELDS = ("modality", "bodypart", "laterality", "study", "series", "patient", "accession",
          "date", "label")
WORD_FIELDS = frozenset({"study", "series", "label"})
MAX_RANGE_TOKENS = 512
"""A date range expands to at most this many tokens (a decade of whole years is ten)."""
_LATERALITY = {"R": "R", "RIGHT": "R", "L": "L", "LEFT": "L", "B": "B", "BOTH": "B",
               "BILATERAL": "B", "U": "U", "UNPAIRED": "U"}
_DATE = re.compile(r"^(\d{4})(?:-?(\d{2})(?:-?(\d{2}))?)?$")


class QueryError(ValueError):
    """A keyword query the parser refuses; the message names the term and why."""


def _fold(text: str) -> str:
    """Accents removed, compatibility forms unified (NFKD), whitespace trimmed."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).strip()


def words(text: str) -> list[str]:
    """Description words: case-folded, accents removed, split at anything not a letter or
    digit; one-letter words dropped (DICOM descriptions abbreviate: "w/o", "T1 W")
    unless a digit."""
    out = []
    for word in re.split(r"[^0-9a-z]+", _fold(text).casefold()):
        if len(word) >= 2 or word.isdigit():
            out.append(word)
    return out


def _code(text: str) -> str:
    """A DICOM code string: upper case, runs of other characters as one underscore."""
    return re.sub(r"[^0-9A-Z]+", "_", _fold(text).upper()).strip("_")


def normalise(field: str, value: str) -> list[str]:
    """The keyword values ``value`` of ``field`` stands for ([] when nothing searchable).

    Dates are not handled here (see ``date_keywords`` and ``date_range``)."""
    if field == "modality" or field == "bodypart":
        code = _code(value)
        return [code] if code else []
    if field == "laterality":
        code = _LATERALITY.get(_code(value), _code(value))
        return [code] if code else []
    if field in WORD_FIELDS:
        return words(value)
    if field in ("patient", "accession"):
        text = value.strip()
        return [text] if text else []
    raise QueryError(f"unknown keyword field {field!r} (known: {', '.join(FIELDS)})")


def _parse_dicom_date(value: str) -> dt.date | None:
    match = _DATE.match(value.strip())
    if not match or match.group(3) is None:
        return None
    try:
        return dt.date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:
        return None


def date_keywords(day: dt.date) -> list[str]:
    """The year, month and day keywords of one study date."""
    return [f"date={day:%Y}", f"date={day:%Y-%m}", f"date={day:%Y-%m-%d}"]


def keywords_of(meta: ImageMeta) -> set[str]:
    """Every keyword of one image, from its decrypted clinical metadata."""
    out: set[str] = set()
    for field, attribute in (("modality", "Modality"), ("bodypart", "BodyPartExamined"),
                             ("laterality", "Laterality"), ("study", "StudyDescription"),
                             ("series", "SeriesDescription"), ("patient", "PatientID"),
                             ("accession", "AccessionNumber")):
        for value in normalise(field, meta.attribute(attribute)):
            out.add(f"{field}={value}")
    day = _parse_dicom_date(meta.attribute("StudyDate"))
    if day is not None:
        out.update(date_keywords(day))
    return out


def _date_bound(text: str, end: bool, term: str) -> dt.date:
    """A year, month or day as the first (or, with ``end``, the last) day it covers."""
    match = _DATE.match(text.strip())
    if not match:
        raise QueryError(f"{term!r}: {text!r} is not a date (YYYY, YYYY-MM or YYYY-MM-DD)")
    year, month, day = match.group(1), match.group(2), match.group(3)
    try:
        y = int(year)
        if month is None:
            return dt.date(y, 12, 31) if end else dt.date(y, 1, 1)
        m = int(month)
        if day is None:
            return dt.date(y, m, calendar.monthrange(y, m)[1]) if end else dt.date(y, m, 1)
        return dt.date(y, m, int(day))
    except ValueError:
        raise QueryError(f"{term!r}: {text!r} is not a valid date") from None


def date_range(first: dt.date, last: dt.date, term: str = "date") -> list[str]:
    """The fewest year/month/day keywords covering ``first``..``last`` inclusive."""
    if last < first:
        raise QueryError(f"{term!r}: the range ends before it starts")
    out: list[str] = []
    day = first
    while day <= last:
        if len(out) >= MAX_RANGE_TOKENS:
            raise QueryError(f"{term!r}: the range needs more than {MAX_RANGE_TOKENS} tokens")
        year_end = dt.date(day.year, 12, 31)
        month_end = dt.date(day.year, day.month, calendar.monthrange(day.year, day.month)[1])
        if day.month == 1 and day.day == 1 and year_end <= last:
            out.append(f"date={day:%Y}")
            day = year_end
        elif day.day == 1 and month_end <= last:
            out.append(f"date={day:%Y-%m}")
            day = month_end
        else:
            out.append(f"date={day:%Y-%m-%d}")
        if day == dt.date.max:
            break
        day += dt.timedelta(days=1)
    return out


def _date_values(value: str, term: str) -> list[str]:
    if ".." in value:
        start, _, stop = value.partition("..")
        return date_range(_date_bound(start, False, term), _date_bound(stop, True, term), term)
    first, last = _date_bound(value, False, term), _date_bound(value, True, term)
    return date_range(first, last, term)


@dataclass(frozen=True)
class Clause:
    """The OR of some keywords of one field, possibly negated."""

    field: str
    keywords: frozenset[str]
    negated: bool = False


@dataclass(frozen=True)
class Query:
    """AND of clauses (positive ones intersect, negated ones are removed)."""

    clauses: tuple[Clause, ...]

    def matches(self, keywords: set[str] | frozenset[str]) -> bool:
        """Whether an image with these keywords answers the query (the plaintext rule the
        service's evaluation over tokens reproduces)."""
        for clause in self.clauses:
            hit = not clause.keywords.isdisjoint(keywords)
            if hit == clause.negated:
                return False
        return True

    def tokens(self, keyword_key: bytes, repo_id: str, key_version: int) -> TokenQuery:
        """The query as the service receives it, for the segments of one key version."""
        return TokenQuery(tuple(
            TokenClause(tuple(keyword_token(keyword_key, repo_id, key_version, k)
                              for k in sorted(c.keywords)), c.negated)
            for c in self.clauses))


def _split(terms: str | Sequence[str]) -> list[str]:
    if isinstance(terms, str):
        try:
            return shlex.split(terms)
        except ValueError as exc:
            raise QueryError(f"keyword query {terms!r}: {exc}") from None
    return list(terms)


def parse_query(terms: str | Sequence[str]) -> Query:
    """A query from terms (see the module docstring); QueryError names the bad term."""
    items = _split(terms)
    positive: dict[str, set[str]] = {}
    clauses: list[Clause] = []
    negate_next = False
    for raw in items:
        if raw.upper() == "NOT":
            if negate_next:
                raise QueryError("keyword query: NOT NOT")
            negate_next = True
            continue
        term, negated = raw, negate_next
        negate_next = False
        if term.startswith("-"):
            term, negated = term[1:], not negated
        if "!=" in term:
            name, _, value = term.partition("!=")
            negated = not negated
        elif "=" in term:
            name, _, value = term.partition("=")
        else:
            raise QueryError(f"keyword term {raw!r}: write field=value "
                             f"(fields: {', '.join(FIELDS)})")
        name = name.strip().casefold()
        if name not in FIELDS:
            raise QueryError(f"keyword term {raw!r}: unknown field {name!r} "
                             f"(known: {', '.join(FIELDS)})")
        alternatives = [v for v in value.split(",") if v.strip()]
        if not alternatives:
            raise QueryError(f"keyword term {raw!r}: no value")
        if name == "date":
            keys = [k for v in alternatives for k in _date_values(v, raw)]
            _add(clauses, positive, name, keys, negated)
            continue
        normalised = [normalise(name, v) for v in alternatives]
        if any(not n for n in normalised):
            raise QueryError(f"keyword term {raw!r}: a value has nothing searchable")
        if len(alternatives) == 1 and len(normalised[0]) > 1:
            if negated:
                raise QueryError(f"keyword term {raw!r}: NOT takes one word per value")
            clauses.extend(Clause(name, frozenset({f"{name}={w}"})) for w in normalised[0])
            continue
        if any(len(n) > 1 for n in normalised):
            raise QueryError(f"keyword term {raw!r}: one word per value in a list")
        _add(clauses, positive, name, [f"{name}={n[0]}" for n in normalised], negated)
    if negate_next:
        raise QueryError("keyword query ends with NOT")
    for field_name, field_keys in positive.items():
        clauses.append(Clause(field_name, frozenset(field_keys)))
    if not clauses:
        raise QueryError("keyword query is empty")
    return Query(tuple(clauses))


def _add(clauses: list[Clause], positive: dict[str, set[str]], name: str,
         keys: Iterable[str], negated: bool) -> None:
    if negated:
        clauses.append(Clause(name, frozenset(keys), True))
    else:
        positive.setdefault(name, set()).update(keys)


def rows_by_keyword(metas: Sequence[ImageMeta]) -> dict[str, list[int]]:
    """The inverted index of one segment's rows (position in ``metas``), what
    crypto.sse.build_dictionary takes."""
    out: dict[str, list[int]] = {}
    for row, meta in enumerate(metas):
        for keyword in keywords_of(meta):
            out.setdefault(keyword, []).append(row)
    return out
