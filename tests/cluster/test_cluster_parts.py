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

from cloud import layout, wire
from cloud.auth import WINDOW_SECONDS
from cloud.backend import DirectoryConfig
from cloud.cluster import assignment
from cloud.cluster.front import store_spec
from cloud.cluster.guard import Guard
from cloud.cluster.health import Probe, metrics_lines, not_ready
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
    assert not config.resize
    assert service_config(_options("--ray-address", "h:1", "--shards", "3", "--resize"),
                          environ={}).resize
    with pytest.raises(ValueError, match="--resize only with --ray-address"):
        service_config(_options("--resize"), environ={})


WORDS = ("modality=CT", "modality=MR", "modality=US", "part=KNEE", "part=CHEST")


def _keyword_repo(root: Path, rng: np.random.Generator) -> BucketRepo:
    """Twelve segments with dictionaries but one, images imported twice into other
    segments, labels added and taken away: what a shard's split must not change."""
    repo = BucketRepo.create(root, "kw", SEED)
    for n in range(12):
        size = int(rng.integers(5, 25))
        data, ids = rng.normal(size=(size, DIM)), None
        if n in (7, 9, 11):  # a second workstation imported some images again
            earlier = repo.segments[list(repo.segments)[n - 6]]
            again = [str(i) for i in rng.choice(earlier, size=4, replace=False)]
            ids = again + [layout.new_id() for _ in range(size - 4)]
            data[:4] = np.stack([repo.rows[i] for i in again])
        keywords = {w: [r for r in range(size) if rng.random() < 0.4] for w in WORDS}
        repo.add(data, None if n == 3 else keywords, ids)
    labelled = [s for s in repo.segments if s in repo.keywords][:3]
    for seg_id in labelled:
        repo.label(seg_id, repo.segments[seg_id][:4], "urgent")
    repo.label(labelled[0], repo.segments[labelled[0]][:2], "urgent", remove=True)
    return repo


def test_shards_keyword_answers_merge_to_the_single_services(tmp_path: Path) -> None:
    """Every shard runs the single service's keyword code on its own segments
    (cloud/keyword_views.py); merged, keyword-only and combined answers are the single
    service's: the same images in the same order, scores, matched count, segment set."""
    from cloud.cluster.merge import merge_keywords
    from cloud.cluster.shard import Shard
    from cloud.keyword_index import TokenQuery
    from cloud.keyword_store import StoreKeywords
    from cloud.keyword_views import KeywordViews
    from cloud.search import ConcurrentSearches

    rng = np.random.default_rng(SEED)
    repo = _keyword_repo(tmp_path / "bucket", rng)
    whole = RepoIndex(repo.store, "kw", owner_keys=[repo.owner.sign_public])
    snap = whole.refresh()
    views = KeywordViews(StoreKeywords(repo.store))
    shards = [Shard(f"s{slot}", slot, 3, DirectoryConfig(tmp_path / "bucket"),
                    [repo.owner.sign_public], 60.0) for slot in range(3)]
    queries = [[(["modality=CT"], False)], [(["modality=MR", "modality=US"], False)],
               [(["part=KNEE"], False), (["modality=CT"], True)],
               [(["label=urgent"], False)], [(["part=CHEST"], True)],
               [(["modality=CT"], False), (["modality=MR"], False), (["part=KNEE"], False)]]
    twice = 0
    for clauses in queries:
        raw = repo.keyword_query(*clauses)
        for token in (None, repo.token(rng.normal(size=(3, DIM)))):
            k = 1000 if token is None else 7
            flags = wire.FLAG_KEYWORDS | wire.FLAG_LIST_SEGMENTS | (
                wire.FLAG_KEYWORDS_ONLY if token is None else 0)
            req = wire.SearchRequestV2(1, k, 0, flags, token, raw)
            single, _ = views.answer(whole, snap, req, TokenQuery.from_bytes(raw),
                                     ConcurrentSearches())
            answers = [s.keywords("kw", 1, TokenQuery.from_bytes(raw), token, k)
                       for s in shards]
            assert all(a.error is None for a in answers), [a.error for a in answers]
            hits, matched = merge_keywords(answers, None if token is None else len(token), k)
            where = f"query {clauses}, {'combined' if token else 'keyword-only'}, seed {SEED}"
            assert (matched, covered(answers)) == (single.matched, single.segment_ids), where
            for mine, theirs in zip(hits, single.hits, strict=True):
                assert [i for i, _ in mine] == [i for i, _ in theirs], where
                np.testing.assert_allclose([s for _, s in mine], [s for _, s in theirs],
                                           rtol=1e-12, atol=0)
            if token is None:
                assert sum(a.images for a in answers) == single.images, where
                twice += sum(a.found.size for a in answers) - matched
    assert twice > 0, "no image matched in two shards' segments: the dedupe went untested"
    no_dictionary = [s for s in repo.segments if s not in repo.keywords]
    assert single.segment_ids is not None and no_dictionary[0] not in single.segment_ids


def _probe(slot: int, replica: int = 0, repos: dict[str, dict[str, object]] | None = None,
           up: bool = True) -> Probe:
    return Probe(slot, replica, f"shard-{slot}-r{replica}",
                 {"repos": repos or {}} if up else None, "" if up else "ActorDiedError")


def _loaded(owners: list[int] | None, pending: int | None = 0,
            loaded_at: float = 1.0) -> dict[str, object]:
    return {"loaded_at": loaded_at, "pending": pending, "owners": owners, "segments": 2,
            "images": 9, "rejected": 0, "head": 3, "owned": 2}


def test_readiness_names_the_shard_that_owns_live_segments_and_is_not_ready() -> None:
    ready = [_probe(0, repos={"r": _loaded([0, 1])}), _probe(1, repos={"r": _loaded([0, 1])})]
    assert not_ready(ready, ["r"], 2) == []
    down = [ready[0], _probe(1, up=False)]
    assert not_ready(down, ["r"], 2) == [
        "shard 1 (shard-1-r0) unreachable: ActorDiedError"]
    restarted = [ready[0], _probe(1)]  # alive again, its repository not loaded yet
    assert not_ready(restarted, ["r"], 2) == [
        "shard 1 (shard-1-r0) has not loaded its segments of 1 repository"]
    loading = [ready[0], _probe(1, repos={"r": _loaded([0, 1], pending=1)})]
    assert not_ready(loading, ["r"], 2) == not_ready(restarted, ["r"], 2)
    # a shard that owns no live segment may be down: every segment has a ready owner
    assert not_ready([_probe(0, repos={"r": _loaded([0])}), _probe(1, up=False)], ["r"],
                     2) == []
    # nobody has verified the log yet: every slot is taken to own segments
    assert len(not_ready([_probe(0), _probe(1)], ["r"], 2)) == 2
    # no repository known yet: every shard must answer
    assert not_ready([_probe(0), _probe(1)], [], 2) == []
    assert not_ready([_probe(0), _probe(1, up=False)], [], 2) != []
    # one ready replica of a slot is enough
    replicas = [ready[0], _probe(1, 0, up=False), _probe(1, 1, repos={"r": _loaded([0, 1])})]
    assert not_ready(replicas, ["r"], 2) == []


def test_shard_metrics_lines_are_prometheus_text_per_shard() -> None:
    from cloud.metrics import Histogram

    histogram = Histogram()
    histogram.observe(0.004)
    probes = [_probe(0, repos={"r": _loaded([0, 1])}), _probe(1, up=False)]
    lines = metrics_lines(probes, {0: histogram}, ["shard 1 down"])
    assert "radcrypt_cluster_ready 0" in lines
    assert 'radcrypt_shard_up{shard="0",replica="0"} 1' in lines
    assert 'radcrypt_shard_up{shard="1",replica="0"} 0' in lines
    assert 'radcrypt_shard_segments{shard="0",replica="0",repo="r"} 2' in lines
    assert 'radcrypt_shard_images{shard="0",replica="0",repo="r"} 9' in lines
    assert 'radcrypt_shard_last_load_timestamp_seconds{shard="0",replica="0",repo="r"} ' \
           '1.000' in lines
    assert 'radcrypt_shard_query_duration_seconds_count{shard="0"} 1' in lines
    typed = {line.split()[2] for line in lines if line.startswith("# TYPE ")}
    for line in lines:  # every sample: "name{labels} number", its family TYPEd
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value)
            family = name.split("{")[0]
            assert family in typed or any(family.removesuffix(suffix) in typed for suffix
                                          in ("_bucket", "_sum", "_count")), line


def _staged(shard: object, layout: tuple[int, int], repo_id: str) -> dict[str, object]:
    """The staged layout's report of ``repo_id`` once loaded (the load is a thread)."""
    import time

    deadline = time.monotonic() + 30
    while True:
        report = shard.status(layout)["repos"].get(repo_id)  # type: ignore[attr-defined]
        if report is not None and report["loaded_at"] and report["pending"] == 0:
            return dict(report)
        assert time.monotonic() < deadline, f"layout {layout} not loaded: {report}"
        time.sleep(0.02)


def test_a_shard_stages_a_new_layout_beside_the_one_it_serves(tmp_path: Path) -> None:
    """Resizing, a shard's side (cloud/cluster/resize.py): while the next layout loads,
    requests naming the old one are answered from it, whole; requests naming the staged
    one from it, whole too; only the moved segments count as moved in; a commit drops the
    old layout (refused after, never answered from the wrong split); an abort drops a
    staged one; a slot outside a layout refuses it."""
    from cloud.cluster.shard import Shard

    rng = np.random.default_rng(SEED)
    repo = BucketRepo.create(tmp_path / "bucket", "grow", SEED)
    for _ in range(15):
        repo.add(rng.normal(size=(int(rng.integers(3, 9)), DIM)))
    live = repo.live_segments()
    spec, keys, k = DirectoryConfig(tmp_path / "bucket"), [repo.owner.sign_public], 6
    token = repo.token(np.vstack([np.stack(list(repo.rows.values())[:2]),
                                  rng.normal(size=(2, DIM))]))
    whole = RepoIndex(repo.store, "grow", owner_keys=keys).refresh()
    expected = [[(whole.versions[1].image_ids[int(p)], float(s))
                 for p, s in zip(r.positions, r.scores, strict=True)]
                for r in search_batch(whole.versions[1].index, token, k)]

    def answer(shards: list[Shard], layout: tuple[int, int]) -> tuple[list[str], object]:
        found = [s.search("grow", 1, token, k, layout=layout) for s in shards]
        assert all(a.error is None and a.layout == (n, layout[1])
                   for n, a in enumerate(found)), [a.error for a in found]
        return covered(found), merge_hits([a.hits for a in found], len(token), k)

    two = [Shard(f"s{slot}", slot, 2, spec, keys, 60.0) for slot in (0, 1)]
    assert answer(two, (0, 2)) == (live, expected)
    third = Shard("s2", 2, 3, spec, keys, 60.0, generation=1)
    three = [*two, third]
    assert all(s.prepare(1, 3, ["grow"], previous=2) for s in three)
    reports = [_staged(s, (1, 3), "grow") for s in three]
    moved = assignment.split(live, 3)[2]
    assert [r["moved_in"] for r in reports] == [0, 0, len(moved)], f"seed {SEED}"
    assert sum(int(r["owned"]) for r in reports) == len(live)  # type: ignore[call-overload]
    assert answer(two, (0, 2)) == (live, expected)  # the old layout serves, whole
    assert answer(three, (1, 3)) == (live, expected)
    for shard in three:
        shard.commit(1, 3)
    stale = two[0].search("grow", 1, token, k, layout=(0, 2))
    assert stale.error is not None and stale.error[0] == 503
    assert "not serving that layout" in stale.error[1] and "older" in stale.error[1]
    assert two[0].status()["layout"] == [1, 3]
    # leaving: the two kept shards take the third's segments back; an abort drops them
    assert not third.prepare(2, 2, ["grow"], previous=3), "slot 2 is not in 2 shards"
    assert all(s.prepare(2, 2, ["grow"], previous=3) for s in two)
    back = [_staged(s, (2, 2), "grow") for s in two]
    assert sum(int(r["moved_in"]) for r in back) == len(moved)  # type: ignore[call-overload]
    assert answer(two, (2, 2)) == (live, expected)
    assert answer(three, (1, 3)) == (live, expected)
    two[0].abort(2)
    assert two[0].status((2, 2))["layout"] is None
    assert two[1].status((2, 2))["layout"] == [2, 2]
    mismatch = two[1].search("grow", 1, token, k, layout=(2, 3))
    assert mismatch.error is not None and "has 2 shards here" in mismatch.error[1]


def test_the_guard_records_one_layout_per_generation() -> None:
    guard = Guard(max_nonces=10, rates={})
    assert guard.layout() is None
    assert guard.set_layout(1, 3) and guard.layout() == (1, 3)
    assert not guard.set_layout(1, 4), "a second resize to the same generation"
    assert not guard.set_layout(0, 2) and guard.layout() == (1, 3)
    assert guard.set_layout(2, 2) and guard.layout() == (2, 2)
