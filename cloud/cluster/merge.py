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

Hits = list[tuple[str, float]]


@dataclass(frozen=True)
class ShardAnswer:
    """What one shard searched and found for one request (picklable: it crosses Ray).

    ``segment_ids``: the segments of the requested key version the shard searched;
    ``layout``: (slot, shards) the shard assigned its segments by; ``error``: an HTTP
    status and one line when the shard refuses (422 widths, 503 store)."""

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
