"""The CKKS search mode (issue 19) through a cluster front of two shards (issue 21).

On the shared local Ray cluster (tests/cluster/conftest.py ``ray_cluster``), a small CKKS
repository is written at the bucket level (tests/cluster/repo_builder.py, each segment
with the CKKS block of its rows, the key version's evaluation keys beside them). What is
proved:

* the cluster's CKKS answer is the single service's, field for field and byte for byte
  of the encrypted scores (only the engine time differs): the same covered segments, in
  the same order, the same set digest; the client's completeness check passes, and the
  decrypted, exactly re-scored top-k is the plaintext one; both shards scored segments;
* a segment the shard that owns it cannot read (its object altered in the bucket after
  the shard loaded its index) is left out of the covered set, and the client's check
  reports the answer incomplete, naming that segment: no coverage is invented.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from app.core.service_client import signed_headers
from cloud import ckks_store, layout, seglog, wire
from cloud.auth import SignatureVerifier
from cloud.backend import DirectoryConfig
from cloud.cluster import assignment
from cloud.cluster.front import ClusterFront, ClusterOptions
from cloud.segments import parse_header
from cloud.service import create_app
from crypto import ckks
from crypto.signed import open_json, sign_json

try:
    from raycluster import MISSING, RAY, LocalCluster
    from repo_builder import DATA_KEY, DIM, MAC_KEY, BucketRepo
except ImportError:  # pragma: no cover
    from tests.cluster.raycluster import MISSING, RAY, LocalCluster
    from tests.cluster.repo_builder import DATA_KEY, DIM, MAC_KEY, BucketRepo

pytestmark = pytest.mark.skipif(not RAY.exists(), reason=MISSING)

REPO = "cluster-ckks"
SERVICE_ID = "svc-cluster-ckks"
SEED = int(os.environ.get("RADCRYPT_TEST_SEED", "2819"))
K = 3
DEADLINE = 20.0  # a shard's first CKKS request loads its blocks and TenSEAL


@dataclass
class World:
    repo: BucketRepo
    key: ckks.CkksKey
    digest: bytes  # SHA-256 of the evaluation keys' body, as the client authenticates it
    single: Any  # TestClient of the one-process service on the same bucket
    front: Any  # TestClient of the cluster front
    cluster_front: ClusterFront
    rng: np.random.Generator


def _unit(rng: np.random.Generator, rows: int) -> np.ndarray:
    x = rng.normal(size=(rows, DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # within CKKS's norm bound


def _add(repo: BucketRepo, key: ckks.CkksKey, data: np.ndarray) -> str:
    """An import batch of a CKKS repository: BucketRepo.add with the segment's CKKS
    block of its rows inside the MAC'd body (app/core/ckks_blocks.py block_for)."""
    return repo.add(data, ckks=key.encrypt_block(data).data)[0]


@pytest.fixture(scope="module")
def world(ray_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[World]:
    from fastapi.testclient import TestClient

    root = tmp_path_factory.mktemp("cluster-ckks")
    rng = np.random.default_rng(SEED)
    repo = BucketRepo.create(root / "bucket", REPO, SEED)
    manifest = layout.manifest_key(REPO)  # search mode ckks: the shards load blocks early
    payload = open_json(repo.store.get(manifest), "manifest", manifest,
                        [repo.owner.sign_public])
    repo.store.put(manifest, sign_json(repo.owner, "manifest", manifest,
                                       {**payload, "search": "ckks"}))
    key = ckks.CkksKey(ckks.seed_from_data_key(DATA_KEY, REPO, 1))
    body = key.evaluation_keys(ckks.period_of(DIM))
    repo.store.put(ckks_store.eval_keys_key(REPO, 1),
                   ckks_store.build_eval_object(MAC_KEY, REPO, 1, body))
    for size in (7, 9, 6, 8):
        _add(repo, key, _unit(rng, size))
    while not all(assignment.split(repo.live_segments(), 2)):  # segment ids are random
        _add(repo, key, _unit(rng, 5))
    with ExitStack() as stack:
        options = ClusterOptions(SERVICE_ID, shards=2, replicas=1, deadline=DEADLINE,
                                 shard_cpus=0.5, refresh_interval=1.0,
                                 rates={"user": (1000.0, 1000.0)})
        front = ClusterFront(options, DirectoryConfig(root / "bucket"),
                             [repo.owner.sign_public], preload=[REPO])
        stack.callback(front.kill)
        apps = []
        for n, cluster in enumerate((None, front)):
            verifier = SignatureVerifier(repo.store, [repo.owner.sign_public], SERVICE_ID)
            if cluster is not None:
                cluster.share_replay_state(verifier)
            apps.append(stack.enter_context(TestClient(create_app(
                repo.store, verifier, refresh_interval=1.0, cache_dir=root / f"cache-{n}",
                service_id=SERVICE_ID, cluster=cluster))))
        yield World(repo, key, hashlib.sha256(body).digest(), *apps, front, rng)


def _post(http: Any, repo: BucketRepo, path: str, body: bytes, kind: str) -> Any:
    headers = {**signed_headers(repo.member, "POST", path, body, SERVICE_ID, 2),
               wire.PROTOCOL_HEADER: "2", "content-type": kind}
    return http.post(path, content=body, headers=headers)


def _ckks_bytes(http: Any, world: World, request: bytes) -> bytes:
    response = _post(http, world.repo, f"/v2/repos/{REPO}/{ckks_store.ROUTE}", request,
                     "application/octet-stream")
    assert response.status_code == 200, response.text
    return bytes(response.content)


def _ckks(http: Any, world: World, request: bytes) -> ckks_store.CkksAnswer:
    return ckks_store.decode_answer(_ckks_bytes(http, world, request))


def _request(world: World, query: np.ndarray, min_head: int = 0) -> bytes:
    encrypted = world.key.encrypt_query(query, ckks.period_of(DIM))
    return ckks_store.encode_request(1, min_head, world.digest, encrypted)


def _top_k(world: World, answer: ckks_store.CkksAnswer, query: np.ndarray
           ) -> list[tuple[str, float]]:
    """What app/core/ckks_search.py does with an answer: decrypt, keep the candidates
    within the error bound, re-score them exactly (here from the plaintext rows the
    test kept, there from the packs' features), ties by image id."""
    scores = world.key.decrypt_scores(answer.scores, answer.counts)
    ids = [i for seg in answer.image_ids for i in seg]
    rows = ckks.candidates(scores, K)
    x = np.stack([world.repo.rows[ids[int(r)]] for r in rows])
    d2 = np.einsum("ij,ij->i", x - query, x - query)
    order = np.lexsort((np.array([ids[int(r)] for r in rows], dtype=object), d2))[:K]
    return [(ids[int(rows[i])], float(d2[i])) for i in order]


def _judge(state: seglog.LogState, answer: ckks_store.CkksAnswer) -> Any:
    """The client's completeness check of an answer (docs/FORMAT-2.md 6.3; what
    app/core/ckks_search.py asks of every CKKS answer)."""
    return seglog.judge_answer(state, 1, answer.head_sequence, answer.head_hash,
                               answer.set_digest, answer.segments, answer.segment_ids)


def _brute(world: World, query: np.ndarray) -> list[str]:
    ids = list(world.repo.rows)
    x = np.stack([world.repo.rows[i] for i in ids])
    d2 = np.einsum("ij,ij->i", x - query, x - query)
    return [ids[i] for i in np.lexsort((np.array(ids, dtype=object), d2))[:K]]


def test_ckks_answers_through_two_shards_equal_the_single_services(world: World) -> None:
    repo = world.repo
    live = repo.live_segments()
    ids = list(repo.rows)
    queries = [repo.rows[ids[2]], repo.rows[ids[-3]], _unit(world.rng, 1)[0]]
    # before any CKKS request, each shard loaded its own segments' blocks (manifest: ckks)
    import ray

    owned = assignment.split(live, 2)
    until, warmed = time.monotonic() + DEADLINE, None
    while time.monotonic() < until:
        warmed = [ray.get(h[0].ckks_warmed.remote(), timeout=DEADLINE)
                  for h in world.cluster_front.handles]
        if all(warmed):
            break
        time.sleep(0.2)
    assert warmed == [{f"{REPO}/1": len(mine)} for mine in owned]
    for q, query in enumerate(queries):
        request = _request(world, query)
        sent = _ckks_bytes(world.front, world, request)
        cluster = ckks_store.decode_answer(sent)
        single = _ckks(world.single, world, request)
        where = f"query {q}, seed {SEED}"
        # the cluster's HTTP answer is the single service's, byte for byte, engine time aside
        assert sent == ckks_store.encode_answer(
            dataclasses.replace(single, engine_us=cluster.engine_us)), where
        assert cluster.segment_ids == single.segment_ids == live, where
        assert (cluster.key_version, cluster.head_sequence, cluster.head_hash,
                cluster.set_digest, cluster.counts, cluster.image_ids) == (
            single.key_version, single.head_sequence, single.head_hash, single.set_digest,
            single.counts, single.image_ids), where
        assert cluster.scores == single.scores, where  # the same ciphertexts, same order
        verdict = _judge(repo.state, cluster)  # the client's check, unchanged
        assert verdict is not None and verdict.complete and verdict.expected == len(live)
        top = _top_k(world, cluster, query)
        assert top == _top_k(world, single, query), where
        assert [i for i, _ in top] == _brute(world, query), where
        if q < 2:  # a stored row finds itself first
            assert top[0] == ([ids[2], ids[-3]][q], 0.0), where
    # both shards scored segments, disjoint ones, their union the live set
    shards = asyncio.run(world.cluster_front.fan_out("ckks", (REPO, ckks_store.decode_request(
        _request(world, queries[2]))), 0))
    parts = [set(a.segment_ids) for a in shards]
    assert len(parts) == 2 and all(parts) and parts[0].isdisjoint(parts[1])
    assert parts[0] | parts[1] == set(live)
    # evaluation keys other than those the client authenticated: refused as by one service
    forged = ckks_store.encode_request(1, 0, hashlib.sha256(b"other keys").digest(),
                                       world.key.encrypt_query(queries[2], ckks.period_of(DIM)))
    path = f"/v2/repos/{REPO}/{ckks_store.ROUTE}"
    refused = [_post(http, repo, path, forged, "application/octet-stream")
               for http in (world.front, world.single)]
    assert [r.status_code for r in refused] == [422, 422]
    assert refused[0].json() == refused[1].json()


def test_a_segment_its_shard_cannot_read_is_reported_missing(world: World) -> None:
    """A new segment is committed and every shard loads the log that names it; then its
    object is altered in the bucket (one byte of its CKKS block). The shard that owns it
    cannot score it (its SHA-256 is not the log's): the merged answer leaves it out,
    and the client's completeness check names it. The single service answers the same."""
    repo = world.repo
    seg_id = _add(repo, world.key, _unit(world.rng, 6))
    refreshed = _post(world.front, repo, f"/v2/repos/{REPO}/refresh", b"{}",
                      "application/json")
    assert refreshed.status_code == 200, refreshed.text
    assert refreshed.json()["segments"] == len(repo.live_segments())  # loaded, seg_id too
    name = layout.segment_key(REPO, seg_id)
    original = repo.store.get(name)
    altered = bytearray(original)
    altered[parse_header(original, seg_id).ckks_offset + 200] ^= 0x01
    repo.store.put(name, bytes(altered))
    try:
        held = asyncio.run(world.cluster_front.fan_out("refresh", (REPO,)))
        assert seg_id in {s for a in held for s in a.segment_ids}  # in the shard's index
        kept = [s for s in repo.live_segments() if s != seg_id]
        query = repo.rows[repo.segments[kept[0]][1]]  # a row of a segment still scored
        request = _request(world, query, repo.state.head.sequence)
        cluster = _ckks(world.front, world, request)
        verdict = _judge(repo.state, cluster)
        assert verdict is not None and not verdict.complete, f"seed {SEED}"
        assert verdict.missing == [seg_id] and seg_id not in cluster.segment_ids
        assert cluster.segment_ids == kept
        assert _top_k(world, cluster, query)[0][1] == 0.0  # the rest still scored
        single = _ckks(world.single, world, request)
        assert (single.segment_ids, single.set_digest, single.scores) == (
            cluster.segment_ids, cluster.set_digest, cluster.scores)
    finally:
        repo.store.put(name, original)


def _part(shard: str, segments: dict[str, int], period: int = 16) -> Any:
    """A shard's CKKS answer of ``segments`` (id -> rows) with placeholder ciphertexts:
    the merge reads only the parts' headers and moves their bytes."""
    from cloud.cluster.merge import ShardAnswer

    seg_ids = sorted(segments)
    blobs = [ckks.pack_parts(ckks.KIND_ROWS, period, segments[s], [s.encode()])
             for s in seg_ids]
    part = ckks_store.CkksAnswer(1, 7, b"h" * 32, b"", seg_ids, [segments[s] for s in seg_ids],
                                 ckks_store.ids_from_hex([[f"{s[:30]}{n:02x}"
                                                           for n in range(segments[s])]
                                                          for s in seg_ids]), 5,
                                 ckks.pack_parts(ckks.KIND_SCORES, period, len(blobs), blobs))
    return ShardAnswer(shard, (0, 2), 7, b"h" * 32, seg_ids, sum(segments.values()), [], [],
                       0.0, ckks=part)


def test_the_merge_orders_segments_takes_each_once_and_refuses_parts_that_do_not_add_up(
        ) -> None:
    """Without Ray: two shards' parts merge in segment-id order (the single service's),
    a segment both report (a re-assignment) counts once, and a part whose scores, counts
    or periods do not add up is refused (the front's 503), never merged."""
    from dataclasses import replace

    from cloud.cluster.ckks import MergeError, merge_answers

    a, b, c = "a" * 32, "b" * 32, "c" * 32
    merged = merge_answers(REPO, 1, [_part("s0", {c: 2, a: 3}), _part("s1", {b: 1, c: 2})])
    assert merged.segment_ids == [a, b, c] and merged.counts == [3, 1, 2]
    assert merged.image_ids == [[f"{s[:30]}{n:02x}" for n in range(rows)]
                                for s, rows in ((a, 3), (b, 1), (c, 2))]
    assert merged.set_digest == wire.segment_set_digest(REPO, 1, [a, b, c])
    _, count, parts = ckks.unpack_parts(merged.scores, ckks.KIND_SCORES, "merged")
    assert count == 3 and [ckks.unpack_parts(p, ckks.KIND_ROWS, "p")[2] for p in parts] == [
        [a.encode()], [b.encode()], [c.encode()]]
    empty = merge_answers(REPO, 1, [_part("s0", {}), _part("s1", {})])
    assert empty.scores == ckks.pack_parts(ckks.KIND_SCORES, 0, 0, [])
    good = _part("s1", {b: 1})
    short = replace(good, ckks=replace(good.ckks, counts=[2]))  # counts beyond the scores
    extra = replace(good, segment_ids=[b, c])  # claims a segment it sent no scores for
    other = _part("s1", {b: 1}, period=32)  # blocks of another period than s0's
    cut = replace(good, ckks=replace(good.ckks, id_bytes=[good.ckks.id_bytes[0][:-1]]))
    hexed = replace(good, ckks=replace(good.ckks, id_bytes=[good.ckks.image_ids[0]]))
    for bad in (short, extra, other, cut, hexed, replace(good, ckks=None)):
        with pytest.raises(MergeError):
            merge_answers(REPO, 1, [_part("s0", {a: 3}), bad])
