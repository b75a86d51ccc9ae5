"""Which shard owns which segment: rendezvous (highest random weight) hashing.

Every front replica and every shard computes the owner of a segment from its id and the
number of shards alone, so they agree without talking to each other, and a change of the
shard count moves only the segments whose winner changed: about 1/(n+1) of them when a
shard joins, the leaving shard's share when one leaves (a modulo would move almost all).
Weights are SHA-256 based: the same on every machine and Python version (``hash`` is
salted per process).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from cloud import layout


def _weight(seg_id: str, slot: int) -> int:
    digest = hashlib.sha256(f"radcrypt/shard/{slot}/{seg_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def owner(seg_id: str, shards: int) -> int:
    """The slot (0..shards-1) that owns segment ``seg_id``."""
    if shards < 1:
        raise ValueError("a cluster needs at least one shard")
    return max(range(shards), key=lambda slot: _weight(seg_id, slot))


def owns_key(key: str, slot: int, shards: int) -> bool:
    """Whether the shard in ``slot`` owns the segment object ``key`` (a bucket key
    segments/<repo>/<id>...); a key that is not a segment's belongs to no shard."""
    try:
        seg_id = layout.parse_segment_key(key)[1]
    except ValueError:
        return False
    return owner(seg_id, shards) == slot


def split(seg_ids: Iterable[str], shards: int) -> list[list[str]]:
    """The segment ids each slot owns (for tests, the bench and the docs' figures)."""
    parts: list[list[str]] = [[] for _ in range(shards)]
    for seg_id in seg_ids:
        parts[owner(seg_id, shards)].append(seg_id)
    return parts
