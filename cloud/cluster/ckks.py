"""The CKKS search mode (issue 19) on the cluster: the front's merge of the shards' parts.

Each shard scores the CKKS blocks of the segments it owns with the single service's code
(cloud/ckks_store.py CkksScorers, cloud/cluster/shard.py ``ckks``) and answers a
CkksAnswer of its own: its segments in id order, each with its row count, its image ids
and one part of encrypted scores. One service lists every segment the same way, in id
order (cloud/ckks_store.py), and the client decrypts part i as count i rows of segment i.
Image ids travel as raw bytes (16 an id, per segment: CkksAnswer.id_bytes) from the
shard's held segment to the HTTP answer: the merge checks their length and joins them,
never making a string per id. So the merge sorts every shard's segments by id, carries
each one's part with it, and names the union in the segment-set digest: the answer is
the one a single service gives for the same segments, byte for byte but for the engine
time, and the client's completeness check (docs/FORMAT-2.md 6.3,
app/core/ckks_search.py) holds unchanged.

Coverage is what the shards scored, never what they own: a segment a shard could not
read (gone, altered, without a block) is absent from its answer, so absent from the
merged set, and the client reports the answer incomplete, naming it. The front only
moves ciphertext bytes; it holds no key and decrypts nothing.

A shard that starts (or reloads after a restart) learns from the repository's manifest,
which it verifies with the owner keys as the service does (cloud/auth.py), whether the
repository is searched in mode ckks and its current key version (``ckks_version``), and
then loads that version's blocks in the background (cloud/ckks_store.py
``CkksScorers.warm``), so that its first CKKS request does not load them all and pass
the front's deadline.
"""

from __future__ import annotations

from collections.abc import Sequence

from cloud import layout
from cloud.auth import open_manifest
from cloud.backend import ObjectNotFound, Store
from cloud.ckks_store import CkksAnswer
from cloud.cluster.merge import ShardAnswer
from cloud.segments import ID_SIZE
from cloud.wire import segment_set_digest
from crypto import ckks
from crypto.errors import FormatError


class MergeError(ValueError):
    """A shard's CKKS part that does not add up (a 503 naming the shard, never merged)."""


def merge_answers(repo_id: str, key_version: int,
                  answers: Sequence[ShardAnswer]) -> CkksAnswer:
    """One CkksAnswer out of the shards' (all at one log head, fan_out checked). A segment
    two shards scored (during a re-assignment) is taken once, from the first shard: the
    same segment object, the same block, the same scores. MergeError when a shard's
    scores, counts and ids disagree, or two shards used blocks of different periods."""
    parts: dict[str, tuple[int, bytes, bytes]] = {}
    periods: set[int] = set()
    engine_us = 0
    for answer in answers:
        part = answer.ckks
        if not isinstance(part, CkksAnswer):
            raise MergeError(f"shard {answer.shard} sent no CKKS scores")
        what = f"the CKKS scores of shard {answer.shard}"
        try:
            period, count, scored = ckks.unpack_parts(part.scores, ckks.KIND_SCORES, what)
        except FormatError as exc:
            raise MergeError(str(exc)) from None
        sizes = {count, len(scored), len(part.segment_ids), len(part.counts),
                 len(part.id_bytes)}
        if len(sizes) != 1 or part.segment_ids != list(answer.segment_ids):
            raise MergeError(f"{what} do not match its segment list")
        if scored:
            periods.add(period)
        for seg_id, rows, ids, blob in zip(part.segment_ids, part.counts, part.id_bytes,
                                           scored, strict=True):
            try:
                block_rows = ckks.header(blob, what)[2]
            except FormatError as exc:
                raise MergeError(str(exc)) from None
            if not isinstance(ids, bytes) or len(ids) != ID_SIZE * rows \
                    or block_rows != rows:
                sent = (f"{len(ids)} bytes of image ids" if isinstance(ids, bytes)
                        else "image ids not as bytes")
                raise MergeError(f"{what}: segment {seg_id} has {rows} rows "
                                 f"({ID_SIZE * rows} bytes of image ids), {sent} and "
                                 f"scores of {block_rows}")
            parts.setdefault(seg_id, (rows, ids, blob))
        engine_us = max(engine_us, int(part.engine_us))
    if len(periods) > 1:
        raise MergeError(f"the shards scored CKKS blocks of different periods "
                         f"({sorted(periods)})")
    seg_ids = sorted(parts)
    blobs = [parts[s][2] for s in seg_ids]
    first = answers[0]
    return CkksAnswer(key_version, first.head, first.head_hash,
                      segment_set_digest(repo_id, key_version, seg_ids), seg_ids,
                      [parts[s][0] for s in seg_ids], [parts[s][1] for s in seg_ids],
                      engine_us, ckks.pack_parts(ckks.KIND_SCORES, periods.pop() if periods
                                                 else 0, len(blobs), blobs))


def ckks_version(store: Store, repo_id: str, owner_keys: Sequence[bytes]) -> int | None:
    """The current key version of ``repo_id`` when its manifest, signed by one of
    ``owner_keys`` or a co-owner one of them endorsed (the check of cloud/auth.py), says
    search mode "ckks"; None otherwise (another mode, no manifest, one not signed so):
    only a hint of what to load early, never what a request is answered with."""
    name = layout.manifest_key(repo_id)
    try:
        opened = open_manifest(store.get(name), name, owner_keys)
    except (ObjectNotFound, FormatError, ValueError):
        return None
    if opened is None:
        return None
    payload = opened[1]
    version = payload.get("key_version")
    if payload.get("search") != "ckks" or not isinstance(version, int) or version < 1:
        return None
    return version
