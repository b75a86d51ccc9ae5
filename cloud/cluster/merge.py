"""One answer out of the shards' answers: exact top-k by score, the covered segment set.

Scores of one query token are comparable across shards (the same token, the same
encryption basis, the same scale), so the global top k is among the union of each shard's
top k: an image with fewer than k better images overall has fewer than k better ones in
its own shard. An image present in two shards (imported twice, its segments owned by two
shards) is kept once, with its best score, as the single service keeps it once.

Ties are broken by image id, ascending; the single-machine engine breaks them by row
position, so two images with exactly the same score may come in another order (never
a different set of scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud import keyword_index
from cloud.keyword_views import id_hits

Hits = list[tuple[str, float]]


@dataclass(frozen=True)
class ShardAnswer:
    """What one shard searched and found for one request (picklable: it crosses Ray).

    ``segment_ids``: the segments of the requested key version the shard searched;
    ``layout``: (slot, shards) the shard assigned its segments by; ``error``: an HTTP
    status and one line when the shard refuses (422 widths, 503 store).

    A keyword answer (``keywords`` True; cloud/keyword_views.py KeywordMatch) also has
    ``segment_ids`` the segments searched by keyword (those with a dictionary), ``found``
    the 16-byte ids of the images counted as matched (numpy V16: keyword-only, each
    segment's matching rows' ids, segment after segment, ``counts[i]`` of them from
    ``segment_ids[i]``, not yet de-duplicated; combined, those the engine ranked among)
    and ``images`` as the single service counts them.

    A CKKS answer (issue 19, cloud/cluster/ckks.py) has ``ckks``: the shard's
    cloud.ckks_store.CkksAnswer for the segments it scored (``segment_ids`` lists the
    same), encrypted scores with one part per segment, merged by the front in segment
    order."""

    shard: str
    layout: tuple[int, int]
    head: int
    head_hash: bytes
    segment_ids: list[str]
    images: int
    hits: list[Hits]
    stats: list[dict[str, object]]
    engine_seconds: float
    log_error: str | None = None
    widths: tuple[int, ...] | None = None
    error: tuple[int, str] | None = None
    rejected: dict[str, str] = field(default_factory=dict)
    key_versions: tuple[int, ...] = ()
    keywords: bool = False
    found: Any = None
    counts: tuple[int, ...] = ()
    ckks: Any = None


def merge_hits(per_shard: Sequence[Sequence[Hits]], queries: int, k: int) -> list[Hits]:
    """Per query, the k best (image_id, score) of all shards, best first, each image once."""
    merged: list[Hits] = []
    for q in range(queries):
        best: dict[str, float] = {}
        for hits in per_shard:
            for image_id, score in hits[q]:
                if image_id not in best or score > best[image_id]:
                    best[image_id] = score
        ranked = sorted(best.items(), key=lambda item: (-item[1], item[0]))
        merged.append(ranked[:k])
    return merged


def merge_stats(per_shard: Sequence[Sequence[dict[str, object]]],
                queries: int) -> list[dict[str, object]]:
    """Per query: vectors and scored counts summed over the shards, the milliseconds of
    the slowest shard (they run side by side), the batch size as the request's."""
    out: list[dict[str, object]] = []
    for q in range(queries):
        vectors = full = 0
        millis = 0.0
        levels: list[int] = []
        for stats in per_shard:
            one = stats[q]
            vectors += int(_num(one.get("vectors", 0)))
            full += int(_num(one.get("full_scored", 0)))
            millis = max(millis, float(_num(one.get("milliseconds", 0.0))))
            scored = one.get("level_scored") or []
            assert isinstance(scored, list | tuple)
            for i, value in enumerate(scored):
                if i < len(levels):
                    levels[i] += int(value)
                else:
                    levels.append(int(value))
        out.append({"vectors": vectors, "level_scored": levels, "full_scored": full,
                    "fraction_fully_scored": full / vectors if vectors else 0.0,
                    "milliseconds": millis, "batch": queries})
    return out


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def covered(answers: Sequence[ShardAnswer]) -> list[str]:
    """The segment ids searched by all shards together, sorted (a segment two shards
    report, during a re-assignment, counts once: its rows are deduplicated by image)."""
    return sorted({seg for answer in answers for seg in answer.segment_ids})


def merge_found(answers: Sequence[ShardAnswer]) -> Any:
    """A keyword-only query's images over all shards, as one service orders them: the
    runs of every segment in segment id order, each image once at its first place (an
    image two segments hold, imported twice, is answered once, from the first segment;
    a segment two shards report during a re-assignment gives the same run twice)."""
    runs: list[tuple[str, int, Any]] = []
    for n, answer in enumerate(answers):
        ids = answer.found if answer.found is not None else np.zeros(0, keyword_index.ID16)
        if len(answer.counts) != len(answer.segment_ids) or sum(answer.counts) != len(ids):
            raise ValueError(f"shard {answer.shard}: keyword counts do not match its ids")
        ends = np.cumsum(answer.counts, dtype=np.int64)
        for seg_id, end, count in zip(answer.segment_ids, ends.tolist(), answer.counts,
                                      strict=True):
            runs.append((seg_id, n, ids[end - count:end]))
    runs.sort(key=lambda run: (run[0], run[1]))
    if not runs:
        return np.zeros(0, keyword_index.ID16)
    return keyword_index._first_of_each(np.concatenate([run[2] for run in runs]))


def count_found(answers: Sequence[ShardAnswer]) -> int:
    """How many distinct images the shards' keyword matches name together."""
    parts = [a.found for a in answers if a.found is not None and len(a.found)]
    if not parts:
        return 0
    return int(keyword_index._first_of_each(np.concatenate(parts)).size)


def merge_keywords(answers: Sequence[ShardAnswer], queries: int | None, k: int
                   ) -> tuple[list[Hits], int]:
    """The hits and matched count of a keyword query over all shards: keyword-only
    (``queries`` None), the first k images in segment order; combined, the exact top k of
    each query among every shard's matching rows. The count names each image once."""
    if queries is None:
        found = merge_found(answers)
        return id_hits(found, k), int(found.size)
    return merge_hits([a.hits for a in answers], queries, k), count_found(answers)
