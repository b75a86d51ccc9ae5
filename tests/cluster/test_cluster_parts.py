"""The cluster's parts without Ray (fast): segment assignment, the merge's exactness, the
shard index's split, the shared guard's rules, the store handed to shards, the options.

The same code runs inside the actors in tests/cluster/test_cluster.py; here each rule is
checked on many cases, with seeds printed on failure.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest

from cloud import layout
from cloud.auth import WINDOW_SECONDS
from cloud.backend import DirectoryConfig
from cloud.cluster import assignment
from cloud.cluster.front import store_spec
from cloud.cluster.guard import Guard
from cloud.cluster.merge import covered, merge_hits
from cloud.cluster.shard import ShardIndex
from cloud.directory_store import DirectoryStore
from cloud.repo_index import RepoIndex
from cloud.search import search_batch
from cloud.service_options import add_service_arguments, service_config
from cloud.store import ObjectStore, StoreConfig

try:
    from repo_builder import DIM, BucketRepo
except ImportError:  # pragma: no cover
    from tests.cluster.repo_builder import DIM, BucketRepo

SEED = int(os.environ.get("RADCRYPT_TEST_SEED", "2112"))


def test_every_segment_has_one_owner_and_a_new_shard_moves_only_its_share() -> None:
    ids = [layout.new_id() for _ in range(2000)]
    four = {s: assignment.owner(s, 4) for s in ids}
    assert set(four.values()) == {0, 1, 2, 3}
    for slot in range(4):  # owns_key agrees with owner, on bucket keys
        mine = [s for s in ids if assignment.owns_key(layout.segment_key("r", s), slot, 4)]
        assert mine == [s for s in ids if four[s] == slot]
    five = {s: assignment.owner(s, 5) for s in ids}
    moved = [s for s in ids if five[s] != four[s]]
    assert all(five[s] == 4 for s in moved), "a join moves segments only to the new shard"
    assert 0.12 < len(moved) / len(ids) < 0.28  # about 1/5
    three = {s: assignment.owner(s, 3) for s in ids}
    assert all(three[s] == four[s] for s in ids if four[s] != 3), \
        "a leave moves only the leaving shard's segments"
    assert not assignment.owns_key("radcrypt/v1/repos/r/manifest.json", 0, 1)


def test_the_merge_is_the_exact_top_k_with_each_image_once() -> None:
    rng = np.random.default_rng(SEED)
    for trial in range(200):
        k, queries, shards = int(rng.integers(1, 12)), int(rng.integers(1, 4)), \
            int(rng.integers(1, 5))
        pool = [f"{i:032x}" for i in range(int(rng.integers(1, 40)))]
        rows: list[list[tuple[str, float]]] = [[] for _ in range(shards)]
        for image in pool:  # an image in one shard, sometimes in two (imported twice)
            for shard in rng.choice(shards, size=min(shards, int(rng.integers(1, 3))),
                                    replace=False):
                rows[int(shard)].append((image, float(rng.integers(0, 50))))
        per_shard = []
        for shard_rows in rows:  # each shard: its exact top k, each image once
            best: dict[str, float] = {}
            for image, score in shard_rows:
                best[image] = max(score, best.get(image, -np.inf))
            top = sorted(best.items(), key=lambda t: (-t[1], t[0]))[:k]
            per_shard.append([top] * queries)
        merged = merge_hits(per_shard, queries, k)
        truth: dict[str, float] = {}
        for shard_rows in rows:
            for image, score in shard_rows:
                truth[image] = max(score, truth.get(image, -np.inf))
        expected = sorted(truth.items(), key=lambda t: (-t[1], t[0]))[:k]
        assert merged == [expected] * queries, f"trial {trial}, seed {SEED}"


def test_shard_indexes_split_the_live_segments_and_their_merge_equals_one_index(
        tmp_path: Path) -> None:
    rng = np.random.default_rng(SEED)
    repo = BucketRepo.create(tmp_path / "bucket", "parts", SEED)
    for size in rng.integers(5, 30, size=9):
        repo.add(rng.normal(size=(int(size), DIM)))
    whole = RepoIndex(repo.store, "parts", owner_keys=[repo.owner.sign_public]).refresh()
    shards = 3
    snaps = [ShardIndex(repo.store, "parts", owner_keys=[repo.owner.sign_public],
                        owns=lambda key, s=slot: assignment.owns_key(key, s, shards)).refresh()
             for slot in range(shards)]
    assert covered([_Ids(s.segment_ids.get(1, [])) for s in snaps]) == repo.live_segments()
    assert sum(len(s.segment_ids.get(1, [])) for s in snaps) == len(repo.live_segments())
    assert {s.head for s in snaps} == {whole.head} and {s.head_hash for s in snaps} == {
        whole.head_hash}
    queries = np.vstack([np.stack(list(repo.rows.values())[:3]), rng.normal(size=(4, DIM))])
    token, k = repo.token(queries), 10
    expected = search_batch(whole.versions[1].index, token, k)
    per_shard = []
    for snap in snaps:
        version = snap.versions.get(1)
        if version is None:
            continue
        results = search_batch(version.index, token, k)
        per_shard.append([[(version.image_ids[int(p)], float(s))
                           for p, s in zip(r.positions, r.scores, strict=True)]
                          for r in results])
    merged = merge_hits(per_shard, len(queries), k)
    ids = whole.versions[1].image_ids
    for q, result in enumerate(expected):
        assert [i for i, _ in merged[q]] == [ids[int(p)] for p in result.positions], \
            f"query {q}, seed {SEED}"
        np.testing.assert_allclose([s for _, s in merged[q]], result.scores, rtol=1e-12)


class _Ids:
    def __init__(self, segment_ids: list[str]) -> None:
        self.segment_ids = segment_ids


def test_the_guard_refuses_replays_requests_older_than_itself_and_a_full_cache() -> None:
    guard = Guard(max_nonces=2, rates={"user": (1.0, 2.0)})
    now = guard.started + 5

    def expires(issued: float) -> float:
        return issued + WINDOW_SECONDS + 1

    assert guard.add_nonce("u/a" * 6, expires(now)) == 1
    assert guard.add_nonce("u/a" * 6, expires(now)) == 0  # the replay
    # signed before the guard started: a restarted guard cannot know it was not seen
    assert guard.add_nonce("u/b" * 6, expires(guard.started - 30)) == 0
    assert guard.add_nonce("u/c" * 6, expires(now)) == 1
    assert guard.add_nonce("u/d" * 6, expires(now)) < 0  # full: retry after, never forget
    assert [guard.allow("user", "u") for _ in range(3)] == [True, True, False]
    assert guard.allow("other-kind", "x")
    guard.note_repo("r1")
    guard.note_repo("r1")
    assert guard.repos() == ["r1"]


def test_shards_get_the_store_without_its_credentials(tmp_path: Path) -> None:
    config = StoreConfig("http://127.0.0.1:9", "bucket", access_key="AKIDEXAMPLE",
                         secret_key="wJalrXUtnFEMI/K7MDENG")
    spec = store_spec(ObjectStore(config))
    assert isinstance(spec, StoreConfig)
    assert (spec.endpoint_url, spec.bucket, spec.access_key, spec.secret_key) == (
        "http://127.0.0.1:9", "bucket", None, None)
    (tmp_path / "b").mkdir()
    assert store_spec(DirectoryStore(tmp_path / "b")) == DirectoryConfig(tmp_path / "b")


def _options(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_service_arguments(parser)
    return parser.parse_args(["--insecure-no-auth", "--service-id", "svc-x", *argv])


def test_the_cluster_options_are_checked() -> None:
    plain = service_config(_options(), environ={})
    assert (plain.ray_address, plain.shards, plain.replicas) == (None, 1, 1)
    config = service_config(_options("--ray-address", "10.0.0.5:6379", "--shards", "4",
                                     "--replicas", "2", "--shard-deadline", "3"), environ={})
    assert (config.ray_address, config.shards, config.replicas, config.shard_deadline) == (
        "10.0.0.5:6379", 4, 2, 3.0)
    with pytest.raises(ValueError, match="--shards only with --ray-address"):
        service_config(_options("--shards", "4"), environ={})
    with pytest.raises(ValueError, match="--shards 0"):
        service_config(_options("--ray-address", "h:1", "--shards", "0"), environ={})
    with pytest.raises(ValueError, match="--replicas 99"):
        service_config(_options("--ray-address", "h:1", "--replicas", "99"), environ={})
