"""Encrypted keyword search as a use case group: ``client.keywords`` (issue 17).

Why a facet: the GUI page (Ctrl+F), the CLI (``radcrypt find``, ``label add|rm``) and the
tests need the same few calls, and app/core/client.py must not grow a method per use case.
This module never imports app.core.client (the import graph stays acyclic,
tests/test_architecture.py): the client is typed as ``Any``.

What happens on ``find``: the terms are parsed and normalised here (app/core/keywords.py),
each keyword becomes a Pi_bas token under the keyword key of the repository's current key
version (crypto/sse.py), the tokens travel in the signed protocol-2 search request
(cloud/wire.py, flag KEYWORDS), the keyless service evaluates them per segment over the
segments' encrypted dictionaries and the label objects (cloud/keyword_index.py) and answers
image ids, with the same completeness proof as an image search (docs/FORMAT-2.md 6). Here
again, every image named is fetched, decrypted, and checked against the query in plaintext:
a service that names an image the query does not match is caught (ServiceError), never shown.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.core.meta import ImageMeta
from app.core.progress import ProgressCallback, ProgressEvent, no_progress
from app.core.studies import Study, group_studies

__all__ = ["KeywordResult", "KeywordSearch"]


@dataclass
class KeywordResult:
    """The images a keyword query found (decrypted and re-checked here), grouped as
    studies for the archive's study list.

    ``complete``: True when the service searched every live segment of the key version
    (FORMAT-2 6.3), None for a format-1 repository, False only when the caller allowed an
    incomplete answer. ``truncated``: the service matched more rows than it may answer at
    once (``matched`` of them); ``images`` then holds the first ones only."""

    query: str
    images: list[ImageMeta] = field(default_factory=list)
    studies: list[Study] = field(default_factory=list)
    matched: int = 0
    truncated: bool = False
    complete: bool | None = None
    segments_expected: int | None = None
    segments_searched: int | None = None
    segments_missing: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def image_ids(self) -> list[str]:
        return [m.image_id for m in self.images]

    def as_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "images": [{"image_id": m.image_id, "name": m.name,
                        "study": m.attribute("StudyInstanceUID"),
                        "series": m.attribute("SeriesInstanceUID"),
                        "modality": m.attribute("Modality"),
                        "body_part": m.attribute("BodyPartExamined"),
                        "study_date": m.attribute("StudyDate")} for m in self.images],
            "studies": [{"study": s.key, "patient_id": s.patient_id, "date": s.study_date,
                         "accession": s.accession, "description": s.description,
                         "modalities": list(s.modalities), "images": s.image_count,
                         "series": len(s.series)} for s in self.studies],
            "matched": self.matched,
            "truncated": self.truncated,
            "complete": self.complete,
            "segments_expected": self.segments_expected,
            "segments_searched": self.segments_searched,
            "segments_missing": list(self.segments_missing),
            "timings_ms": dict(self.timings_ms),
        }


class KeywordSearch:
    """``client.keywords``: keyword search, the values present, and user labels."""

    def __init__(self, client: Any) -> None:
        self.client = client

    # --- what the repository holds ----------------------------------------------------------

    def values(self, repo: Any) -> dict[str, list[str]]:
        """Field -> the keyword values present in the repository, sorted (decrypted here
        from the metadata and the labels; the service is not asked). Every field of
        app.core.keywords.FIELDS is a key, empty when no image has it; dates as days."""
        from app.core.keywords import FIELDS, keywords_of

        found: dict[str, set[str]] = {f: set() for f in FIELDS}
        for meta in self.client.list_images(repo):
            if meta.error:
                continue
            for keyword in keywords_of(meta):
                name, _, value = keyword.partition("=")
                if name == "date" and len(value) != 10:
                    continue  # the year and month keywords of each day
                found[name].add(value)
        for words in _labels_by_image(self.client, repo).values():
            found["label"].update(words)
        return {name: sorted(values) for name, values in found.items()}

    # --- search -----------------------------------------------------------------------------

    @staticmethod
    def check(terms: str | Sequence[str]) -> str:
        """The query in its normalised form (one clause per field, values sorted), or
        ValueError (app.core.keywords.QueryError) naming the term at fault: what a front
        end calls to refuse a query before asking for a password or starting a search."""
        from app.core.keywords import parse_query

        query = parse_query(terms)
        return " ".join(("-" if c.negated else "") + ",".join(sorted(c.keywords))
                        for c in query.clauses)

    def find(self, repo: Any, terms: str | Sequence[str], *,
             progress: ProgressCallback = no_progress,
             allow_incomplete: bool = False) -> KeywordResult:
        """Images matching the keyword query ``terms`` (app/core/keywords.py syntax:
        ``modality=CT bodypart=CHEST date=2024-01..2024-06 -laterality=L``).

        QueryError for terms the parser refuses (names the term); IncompleteAnswer when the
        service left live segments out (unless ``allow_incomplete``); ServiceError when it
        named an image the query does not match."""
        from app.core.keywords import parse_query
        from app.core.searcher import keyword_find

        query = parse_query(terms)
        text = terms if isinstance(terms, str) else " ".join(terms)
        self.client.service()  # the service starts now, trusting the owners pinned so far
        progress(ProgressEvent("search", 0, 1, message="searching"))
        found = keyword_find(self.client.session, repo, query,
                             allow_incomplete=allow_incomplete,
                             labels=lambda: _labels_by_image(self.client, repo))
        progress(ProgressEvent("search", 1, 1, message="searched"))
        images = sorted(found.images, key=_image_order)
        return KeywordResult(
            query=text, images=images, studies=group_studies(images), matched=found.matched,
            truncated=found.truncated, complete=found.complete,
            segments_expected=found.segments_expected,
            segments_searched=found.segments_searched,
            segments_missing=list(found.segments_missing), timings_ms=found.timings_ms)

    # --- labels (written by app/core/labels.py, issue 17's write side) ----------------------

    def label_add(self, repo: Any, image_ids: Iterable[str], word: str) -> Any:
        """Add the label ``word`` (normalised like a description word; a phrase gives one
        label per word) to each image: small encrypted dictionary objects listed in the
        segment log (app/core/labels.py). Returns its LabelReport."""
        from app.core import labels

        return labels.label_add(self.client.session.store, self.client.settings, repo,
                                self.client.identity, _ids(image_ids), word)

    def label_remove(self, repo: Any, image_ids: Iterable[str], word: str) -> Any:
        """Take the label off each image (a tombstone object: the service stops finding
        the images under it). Returns its LabelReport."""
        from app.core import labels

        return labels.label_remove(self.client.session.store, self.client.settings, repo,
                                   self.client.identity, _ids(image_ids), word)

    def labels(self, repo: Any, image_id: str) -> list[str]:
        """The labels of one image now, sorted (decrypted here)."""
        from app.core import labels

        found: list[str] = labels.labels(self.client.session.store, self.client.settings,
                                         repo, _ids([image_id])[0])
        return found


def _ids(image_ids: Iterable[str]) -> list[str]:
    """Image ids as the store names them (32 lowercase hex); ValueError names a bad one."""
    out = []
    for image_id in image_ids:
        text = str(image_id).strip().lower()
        if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
            raise ValueError(f"{image_id!r} is not an image id (32 hexadecimal characters)")
        out.append(text)
    return out


def _image_order(meta: ImageMeta) -> tuple[str, str, str, str]:
    return (meta.attribute("StudyDate"), meta.attribute("StudyInstanceUID"),
            meta.attribute("SeriesInstanceUID"), meta.image_id)


def _labels_by_image(client: Any, repo: Any) -> dict[str, set[str]]:
    """Image id -> its current labels (format 2; {} in format 1, which has none)."""
    from app.core.searcher import labels_by_image

    return labels_by_image(client.session, repo)
