"""What a search answers, in every mode, and how a hit is made.

The secure-kNN search (app/core/searcher.py), the CKKS search (app/core/ckks_search.py) and
the workstation's own index (app/core/workstation.py) all return QueryResult, so the CLI,
the GUI and the tests read one shape whatever the repository's search mode. The types live
here, below the modules that fill them, so that each mode imports them plainly instead of
reaching into another mode's module.

A hit is made only by ``resolve_hits``: the image's metadata fetched and decrypted here, its
distance recomputed from the decrypted features, so what the radiologist sees (name,
distance) never came from the service in clear.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from app.core.errors import IntegrityError
from app.core.meta import ImageMeta
from app.core.studies import series_key

if TYPE_CHECKING:
    from app.core.packs import ImageReader

NOT_VERIFIABLE = "completeness not verifiable (format 1)"


@dataclass
class Hit:
    rank: int
    image_id: str
    name: str
    distance: float
    score: float
    key_version: int
    meta: dict[str, Any] = field(repr=False, default_factory=dict)
    series_key: str = ""  # app/core/studies.py series_key of the hit's image
    group: int = 0  # rank of the hit's series among the grouped results; 0: not grouped

    @property
    def image(self) -> ImageMeta:
        """The decrypted metadata the hit carries, typed (instance, frame, clinical)."""
        return ImageMeta.from_record(self.image_id, self.meta, self.key_version)

    def as_dict(self) -> dict[str, Any]:
        image = self.image
        return {"image_id": self.image_id, "name": self.name, "distance": self.distance,
                "rank": self.rank, "series": self.series_key, "group": self.group,
                "instance": image.attribute("InstanceNumber"), "frame": image.frame,
                "frames": image.frames, "original_id": image.original_image_id}


@dataclass
class HitGroup:
    """The hits of one series in one answer: the best one is shown, the others are
    attached to it ("3 more from this series")."""

    rank: int  # 1 = the series of the nearest hit
    series_key: str
    best: Hit
    others: list[Hit] = field(default_factory=list)

    @property
    def more(self) -> int:
        return len(self.others)

    @property
    def hits(self) -> list[Hit]:
        return [self.best, *self.others]

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "series": self.series_key, "best": self.best.as_dict(),
                "more": self.more, "others": [h.image_id for h in self.others]}


@dataclass
class QueryResult:
    query: str
    hits: list[Hit]
    stats: dict[str, Any]
    timings_ms: dict[str, float]
    order_verified: bool
    # Completeness (FORMAT-2 6.3): True, False (only when the caller allowed an incomplete
    # answer), None for a format-1 repository (no log to compare with).
    complete: bool | None = None
    segments_expected: int | None = None  # live segments of the key version (format 2)
    segments_searched: int | None = None  # segments the service says it searched
    segments_missing: list[str] = field(default_factory=list)  # live ids not searched
    # Grouped by series (``group=True``): at most k groups, nearest series first; ``hits``
    # stays the ungrouped top-k. ``asked``: how many hits the engine was asked for.
    grouped: bool = False
    groups: list[HitGroup] = field(default_factory=list)
    asked: int = 0

    @property
    def completeness(self) -> str:
        """The verdict in words, for a status line."""
        if self.complete is None:
            return NOT_VERIFIABLE
        if self.complete:
            return f"complete: all {self.segments_expected:,} segments were searched"
        return (f"INCOMPLETE ANSWER: {len(self.segments_missing):,} of "
                f"{self.segments_expected:,} segments were not searched")

    def as_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "results": [h.as_dict() for h in self.hits],
            "grouped": self.grouped,
            "groups": [g.as_dict() for g in self.groups],
            "stats": {**self.stats, "timings_ms": self.timings_ms,
                      "order_verified": self.order_verified},
            "complete": self.complete,
            "segments_expected": self.segments_expected,
            "segments_searched": self.segments_searched,
            "segments_missing": list(self.segments_missing),
        }


def resolve_hits(reader: ImageReader, query: np.ndarray,
                 raw_hits: list[tuple[str, float]]) -> list[Hit]:
    """Fetch and decrypt each hit's metadata (in parallel) and compute its true distance."""

    def one(rank: int, raw: tuple[str, float]) -> Hit:
        image_id, score = str(raw[0]), float(raw[1])
        meta, version = reader.meta(image_id)
        vector = np.asarray(meta["features"], dtype=np.float64)
        if vector.shape != query.shape:
            raise IntegrityError(f"metadata of image {image_id} has features of the "
                                 "wrong dimension")
        diff = vector - query
        return Hit(rank=rank, image_id=image_id, name=str(meta.get("name", "")),
                   distance=float(diff @ diff), score=score, key_version=version, meta=meta,
                   series_key=series_key(ImageMeta.from_record(image_id, meta, version)))

    if not raw_hits:
        return []
    with ThreadPoolExecutor(min(8, len(raw_hits))) as pool:
        return list(pool.map(one, range(1, len(raw_hits) + 1), raw_hits))
