"""The search service on a real local Ray cluster (issue 21, docs/SCALING.md).

One cluster, shared with the other modules of tests/cluster that use it (conftest.py
``ray_cluster``): ``ray start --head`` and one ``ray start --address`` worker on
127.0.0.1 (one CPU and a 100 MB object store each, tests/cluster/raycluster.py), stopped
by PID after the last of them. A format-2 repository is written at the bucket level
(tests/cluster/repo_builder.py); two shards split its segments. What is proved:

* the cluster's answers equal the single service's on the same bucket (hits, scores, head,
  segment-set digest), and the shards really split the segments (disjoint, both used);
* a request captured at one front replica and replayed to a second one is refused (the
  nonce cache is the shared guard actor, not the process's);
* a segment committed while the cluster runs is searchable after the next refresh, and the
  answer's digest is that of the new live set;
* a shard process killed while queries run gives 503s naming the shard, never an answer
  without its rows, and whole answers again within 30 s (Ray restarts the actor, which
  reloads its segments);
* shards join and leave (resize 2 -> 3 -> 2) while clients query both fronts: every
  answer whole and the single service's; a resize that fails leaves the old layout serving.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud import wire
from cloud.auth import SignatureVerifier
from cloud.backend import DirectoryConfig
from cloud.cluster import assignment
from cloud.cluster.front import ClusterFront, ClusterOptions
from cloud.cluster.health import not_ready
from cloud.service import create_app

try:
    from raycluster import MISSING, RAY, LocalCluster
    from repo_builder import DIM, BucketRepo
except ImportError:  # pragma: no cover
    from tests.cluster.raycluster import MISSING, RAY, LocalCluster
    from tests.cluster.repo_builder import DIM, BucketRepo

from app.core.service_client import signed_headers

pytestmark = pytest.mark.skipif(not RAY.exists(), reason=MISSING)

REPO = "cluster-test"
SERVICE_ID = "svc-cluster-test"
SEED = int(os.environ.get("RADCRYPT_TEST_SEED", "2111"))
K = 8
DEADLINE = 4.0
WORDS = ("modality=CT", "modality=MR", "modality=US", "part=KNEE", "part=CHEST")


@dataclass
class World:
    repo: BucketRepo
    single: Any  # TestClient of the one-process service on the same bucket
    front_a: Any  # TestClient of a cluster front
    front_b: Any  # TestClient of a second front replica of the same deployment
    cluster_front: ClusterFront
    rng: np.random.Generator
    address: str


def _body(repo: BucketRepo, queries: np.ndarray, min_head: int = 0, flags: int = 0) -> bytes:
    """A search body. Tokens are randomised (a fresh scale each): scores are comparable
    within one token only, so answers are compared for the same body."""
    return wire.encode_request(wire.SearchRequestV2(1, K, min_head, flags,
                                                    repo.token(queries)))


def _request(repo: BucketRepo, queries: np.ndarray, min_head: int = 0,
             flags: int = 0, body: bytes | None = None) -> tuple[str, bytes, dict[str, str]]:
    body = body if body is not None else _body(repo, queries, min_head, flags)
    path = f"/v2/repos/{REPO}/search"
    headers = {**signed_headers(repo.member, "POST", path, body, SERVICE_ID, 2),
               wire.PROTOCOL_HEADER: "2", "content-type": wire.REQUEST_MEDIA_TYPE}
    return path, body, headers


def _search(http: Any, repo: BucketRepo, queries: np.ndarray, min_head: int = 0,
            flags: int = 0, body: bytes | None = None) -> Any:
    path, body, headers = _request(repo, queries, min_head, flags, body)
    return http.post(path, content=body, headers=headers)


def _answer(response: Any, queries: int) -> wire.SearchAnswerV2:
    assert response.status_code == 200, response.text
    return wire.decode_answer(response.content, queries=queries, k=K, key_version=1,
                              repo_id=REPO)


def _refresh(http: Any, repo: BucketRepo) -> dict[str, Any]:
    path, body = f"/v2/repos/{REPO}/refresh", b"{}"
    headers = {**signed_headers(repo.member, "POST", path, body, SERVICE_ID, 2),
               wire.PROTOCOL_HEADER: "2", "content-type": "application/json"}
    response = http.post(path, content=body, headers=headers)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def _assert_same(cluster: wire.SearchAnswerV2, single: wire.SearchAnswerV2) -> None:
    assert (cluster.head_sequence, cluster.head_hash, cluster.set_digest, cluster.segments,
            cluster.images) == (single.head_sequence, single.head_hash, single.set_digest,
                                single.segments, single.images), f"seed {SEED}"
    for q, (mine, theirs) in enumerate(zip(cluster.hits, single.hits, strict=True)):
        assert [i for i, _ in mine] == [i for i, _ in theirs], f"query {q}, seed {SEED}"
        np.testing.assert_allclose([s for _, s in mine], [s for _, s in theirs],
                                   rtol=1e-12, atol=0)


def _app(repo: BucketRepo, root: Path, front: ClusterFront | None) -> Any:
    verifier = SignatureVerifier(repo.store, [repo.owner.sign_public], SERVICE_ID)
    if front is not None:
        front.share_replay_state(verifier)
    return create_app(repo.store, verifier, refresh_interval=1.0, cache_dir=root,
                      service_id=SERVICE_ID, cluster=front)


def _keywords(rng: np.random.Generator, size: int) -> dict[str, list[int]]:
    """A segment's dictionary content: each keyword on about 40% of the rows."""
    return {w: [r for r in range(size) if rng.random() < 0.4] for w in WORDS}


@pytest.fixture(scope="module")
def world(ray_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[World]:
    from fastapi.testclient import TestClient

    root = tmp_path_factory.mktemp("cluster")
    rng = np.random.default_rng(SEED)
    repo = BucketRepo.create(root / "bucket", REPO, SEED)
    for n, size in enumerate((30, 25, 40, 35, 20, 30)):  # the third: no dictionary
        repo.add(rng.normal(size=(size, DIM)), None if n == 2 else _keywords(rng, size))
    while not all(assignment.split(repo.live_segments(), 2)):  # segment ids are random
        repo.add(rng.normal(size=(20, DIM)), _keywords(rng, 20))
    for seg_id in list(repo.keywords)[:2]:  # labels, and a tombstone, on two segments
        repo.label(seg_id, repo.segments[seg_id][:6], "urgent")
    repo.label(seg_id, repo.segments[seg_id][:2], "urgent", remove=True)
    with ExitStack() as stack:  # the cluster is shared (tests/cluster/conftest.py)
        options = ClusterOptions(SERVICE_ID, shards=2, replicas=1, deadline=DEADLINE,
                                 shard_cpus=0.5, refresh_interval=1.0,
                                 rates={"user": (1000.0, 1000.0)})
        spec = DirectoryConfig(root / "bucket")
        front_a = ClusterFront(options, spec, [repo.owner.sign_public], preload=[REPO])
        stack.callback(front_a.kill)
        front_b = ClusterFront(options, spec, [repo.owner.sign_public])  # same actors
        front_a.pids()  # the actors are up
        clients = [stack.enter_context(TestClient(_app(repo, root / f"cache-{n}", front)))
                   for n, front in enumerate((None, front_a, front_b))]
        yield World(repo, *clients, front_a, rng, ray_cluster.address)


def test_answers_equal_the_single_service_and_the_shards_split_the_segments(
        world: World) -> None:
    import asyncio

    repo = world.repo
    shards = asyncio.run(world.cluster_front.fan_out("refresh", (REPO,)))
    parts = [set(a.segment_ids) for a in shards]
    live = set(repo.live_segments())
    assert len(parts) == 2 and all(parts), f"both shards hold segments (seed {SEED})"
    assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == live
    ids = list(repo.rows)
    picked = [ids[3], ids[70], ids[150]]
    queries = np.vstack([np.stack([repo.rows[i] for i in picked]),
                         world.rng.normal(size=(3, DIM))])
    body = _body(repo, queries, flags=wire.FLAG_STATS)
    cluster = _answer(_search(world.front_a, repo, queries, body=body), 6)
    single = _answer(_search(world.single, repo, queries, body=body), 6)
    _assert_same(cluster, single)
    assert cluster.set_digest == repo.state.set_digest(1)
    assert cluster.images == len(ids) and cluster.segments == len(live)
    for q, image_id in enumerate(picked):  # a stored row finds itself first
        assert cluster.hits[q][0][0] == image_id
    assert cluster.stats is not None and all(s["vectors"] == len(ids) for s in cluster.stats)
    listed = _answer(_search(world.front_b, repo, queries[:1],
                             flags=wire.FLAG_LIST_SEGMENTS), 1)
    assert listed.segment_ids == sorted(live)


def test_a_request_replayed_to_another_front_replica_is_refused(world: World) -> None:
    repo = world.repo
    path, body, headers = _request(repo, world.rng.normal(size=(1, DIM)))
    first = world.front_a.post(path, content=body, headers=headers)
    assert first.status_code == 200, first.text
    replayed = world.front_b.post(path, content=body, headers=headers)
    assert replayed.status_code == 401
    assert world.front_a.post(path, content=body, headers=headers).status_code == 401
    # the second replica serves a fresh request: the refusal was the replay's
    assert _search(world.front_b, repo, world.rng.normal(size=(1, DIM))).status_code == 200


def test_radcrypt_serve_with_a_ray_address_is_another_front_of_the_same_deployment(
        world: World, tmp_path: Path) -> None:
    """`python -m cloud.service --ray-address` (what `radcrypt serve` runs) as its own
    process: it joins the same shards and guard, answers the same, and refuses a request
    first answered by the in-process front."""
    import base64
    import subprocess
    import sys

    import httpx

    try:
        from raycluster import PROJECT, free_ports
    except ImportError:  # pragma: no cover
        from tests.cluster.raycluster import PROJECT, free_ports

    repo, port = world.repo, free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADCRYPT_")}
    env.update(RADCRYPT_STORE="directory", RADCRYPT_STORE_ROOT=str(repo.store.root),
               PYTHONPATH=str(PROJECT))
    command = [sys.executable, "-m", "cloud.service", "--ray-address", world.address,
               "--shards", "2", "--shard-deadline", str(DEADLINE), "--port", str(port),
               "--service-id", SERVICE_ID, "--cache-dir", str(tmp_path / "cache"),
               "--owner-key", base64.b64encode(repo.owner.sign_public).decode()]
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the cluster front did not start"
                time.sleep(0.5)
            queries = world.rng.normal(size=(2, DIM))
            body = _body(repo, queries)
            path, _, headers = _request(repo, queries, body=body)
            assert world.front_a.post(path, content=body, headers=headers).status_code == 200
            assert http.post(path, content=body, headers=headers).status_code == 401
            theirs = _answer(_search(http, repo, queries, body=body), 2)
            _assert_same(theirs, _answer(_search(world.single, repo, queries, body=body), 2))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert "Ray cluster" in (tmp_path / "serve.log").read_text()


def test_a_segment_committed_while_running_is_searchable_after_refresh(world: World) -> None:
    repo = world.repo
    new_rows = world.rng.normal(size=(12, DIM)) * 3.0
    _, new_ids = repo.add(new_rows)
    refreshed = _refresh(world.front_a, repo)
    assert refreshed["head"] == repo.state.head.sequence
    assert refreshed["segments"] == len(repo.live_segments())
    cluster = _answer(_search(world.front_a, repo, new_rows[:4]), 4)
    assert [h[0][0] for h in cluster.hits] == new_ids[:4]
    assert cluster.set_digest == repo.state.set_digest(1)
    # a client that verified the new head gets it from any replica (min_head re-reads)
    body = _body(repo, new_rows[:4], min_head=repo.state.head.sequence)
    single = _answer(_search(world.single, repo, new_rows[:4], body=body), 4)
    _assert_same(_answer(_search(world.front_b, repo, new_rows[:4], body=body), 4), single)


def test_a_killed_shard_is_a_503_naming_it_then_whole_again(world: World) -> None:
    repo = world.repo
    queries = np.stack([repo.rows[i] for i in list(repo.rows)[:2]])
    expected = _answer(_search(world.single, repo, queries), 2)
    statuses: list[tuple[float, int, str]] = []
    wrong: list[str] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            response = _search(world.front_a, repo, queries)
            statuses.append((time.monotonic(), response.status_code,
                             response.text if response.status_code != 200 else ""))
            if response.status_code == 200:
                got = _answer(response, 2)
                if (got.set_digest, [[i for i, _ in h] for h in got.hits]) != (
                        expected.set_digest, [[i for i, _ in h] for h in expected.hits]):
                    wrong.append(f"a 200 that differs from the whole answer: {got}")

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while sum(s == 200 for _, s, _ in statuses) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        (name, pid, _), = world.cluster_front.pids()[1]
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        whole_again = None
        while time.monotonic() < killed_at + 45:
            failures = [t for t, s, _ in statuses if t > killed_at and s != 200]
            later = [t for t, s, _ in statuses
                     if s == 200 and failures and t > max(failures)]
            if later:
                whole_again = min(later) - killed_at
                break
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(60)
    refusals = [text for t, s, text in statuses if t > killed_at and s != 200]
    assert not wrong, wrong[0]
    assert refusals, f"no query failed after the kill (seed {SEED})"
    assert {s for t, s, _ in statuses if t > killed_at} <= {200, 503}
    assert all(f"shard 1 ({name})" in text for text in refusals), refusals[0]
    assert whole_again is not None and whole_again < 30, whole_again
    (_, new_pid, _), = world.cluster_front.pids()[1]
    assert new_pid != pid


def test_with_two_replicas_a_killed_replica_costs_no_answer(world: World) -> None:
    """--replicas 2: the front asks the other replica when one fails or is silent for
    half the deadline, so killing one replica's process loses no query."""
    import asyncio

    repo = world.repo
    options = ClusterOptions("svc-cluster-replicas", shards=1, replicas=2, deadline=8.0,
                             shard_cpus=0.5, refresh_interval=1.0)
    front = ClusterFront(options, DirectoryConfig(repo.store.root), [repo.owner.sign_public],
                         preload=[REPO])
    try:
        (name, pid, _), _ = front.pids()[0]
        token = repo.token(np.stack([repo.rows[i] for i in list(repo.rows)[5:7]]))
        _, expected = asyncio.run(front.search(REPO, 1, token, K))
        outcomes: list[str] = []
        stop = threading.Event()

        def ask() -> None:
            while not stop.is_set():
                try:
                    _, hits = asyncio.run(front.search(REPO, 1, token, K))
                except Exception as exc:  # recorded: the assertion names it
                    outcomes.append(f"{type(exc).__name__}: {exc}")
                else:
                    outcomes.append("ok" if hits == expected else f"differs: {hits}")

        thread = threading.Thread(target=ask, daemon=True)
        thread.start()
        try:
            while outcomes.count("ok") < 2:
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            killed, done = len(outcomes), time.monotonic() + 60
            while time.monotonic() < done:  # until the killed replica is back
                try:
                    if front.pids()[0][0][1] != pid and len(outcomes) > killed + 5:
                        break
                except Exception:  # ping to a replica being restarted
                    pass
                time.sleep(0.5)
        finally:
            stop.set()
            thread.join(60)
        assert len(outcomes) > killed, "no query ran after the kill"
        assert set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]
        assert front.pids()[0][0][1] != pid, f"{name} was not restarted"
    finally:
        front.kill()


def _keyword_search(http: Any, repo: BucketRepo, raw: bytes, queries: np.ndarray | None,
                    k: int) -> Any:
    """A signed keyword-only (``queries`` None) or combined request, segments listed."""
    token = None if queries is None else repo.token(queries)
    flags = wire.FLAG_KEYWORDS | wire.FLAG_LIST_SEGMENTS | (
        wire.FLAG_KEYWORDS_ONLY if token is None else 0)
    body = wire.encode_request(wire.SearchRequestV2(1, k, 0, flags, token, raw))
    return body, _search(http, repo, np.zeros((1, DIM)), body=body)


def _keyword_answer(response: Any, queries: int, k: int) -> wire.SearchAnswerV2:
    assert response.status_code == 200, response.text
    return wire.decode_answer(response.content, queries=queries, k=k, key_version=1,
                              repo_id=REPO, keywords=True)


def _whole(answer: wire.SearchAnswerV2) -> tuple[Any, ...]:
    return (answer.hits, answer.matched, answer.segment_ids, answer.set_digest,
            answer.head_sequence)


def _assert_same_keywords(cluster: wire.SearchAnswerV2, single: wire.SearchAnswerV2) -> None:
    _assert_same(cluster, single)
    assert (cluster.matched, cluster.segment_ids) == (single.matched, single.segment_ids)


def test_keyword_and_combined_answers_equal_the_single_service(world: World) -> None:
    """Each shard evaluates the tokens on its own segments' dictionaries and labels; the
    front's merge is the single service's answer: ids in segment order and the match
    count (keyword-only), exact top k among the matches (combined), the same segment set,
    incomplete alike (one segment has no dictionary). Then /metrics has every shard."""
    repo = world.repo
    queries = [[(["modality=CT"], False)], [(["modality=MR", "modality=US"], False)],
               [(["part=KNEE"], False), (["modality=CT"], True)],
               [(["label=urgent"], False)], [(["part=CHEST"], True)],
               [(["modality=CT"], False), (["modality=MR"], False), (["part=KNEE"], False)]]
    with_dictionary = sorted(s for s in repo.live_segments() if s in repo.keywords)
    for clauses in queries:
        raw = repo.keyword_query(*clauses)
        for k in (1000, 5):  # keyword-only: every image, then the first five
            body, response = _keyword_search(world.front_a, repo, raw, None, k)
            cluster = _keyword_answer(response, 1, k)
            single = _keyword_answer(_search(world.single, repo, np.zeros((1, DIM)),
                                             body=body), 1, k)
            _assert_same_keywords(cluster, single)
        assert cluster.segment_ids == with_dictionary, "not incomplete as the single's"
        assert cluster.set_digest != repo.state.set_digest(1)
        near = np.vstack([np.stack([repo.rows[repo.segments[with_dictionary[0]][3]]]),
                          world.rng.normal(size=(2, DIM))])
        body, response = _keyword_search(world.front_b, repo, raw, near, K)
        cluster = _keyword_answer(response, 3, K)
        single = _keyword_answer(_search(world.single, repo, near, body=body), 3, K)
        _assert_same_keywords(cluster, single)
    # the plaintext truth of one keyword: every segment's rows holding it, segment order
    body, response = _keyword_search(world.front_a, repo, repo.keyword_query(
        (["modality=CT"], False)), None, 1000)
    truth = [repo.segments[s][r] for s in with_dictionary
             for r in repo.keywords[s]["modality=CT"]]
    got = _keyword_answer(response, 1, 1000)
    assert [i for i, _ in got.hits[0]] == truth and got.matched == len(truth)
    text = world.front_a.get("/metrics").text
    parts = assignment.split(repo.live_segments(), 2)
    for slot in (0, 1):
        labels = f'shard="{slot}",replica="0",repo="{REPO}"'
        assert f"radcrypt_shard_segments{{{labels}}} {len(parts[slot])}" in text, text
        assert f"radcrypt_shard_last_load_timestamp_seconds{{{labels}}}" in text
        assert f'radcrypt_shard_up{{shard="{slot}",replica="0"}} 1' in text
        count = [line for line in text.splitlines() if line.startswith(
            f'radcrypt_shard_query_duration_seconds_count{{shard="{slot}"}}')]
        assert count and int(count[0].rsplit(" ", 1)[1]) > 0, text
    images = sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("radcrypt_shard_images{"))
    assert images == len(repo.rows)
    assert "radcrypt_cluster_ready 1" in text


def test_a_killed_shard_is_a_keyword_503_and_not_ready_then_whole_and_ready(
        world: World) -> None:
    """SIGKILL shard 1's process: a keyword query is a 503 naming it (never a partial
    answer), /readyz a 503 naming it; once Ray restarted it and it reloaded its segments,
    the answer is whole and /readyz 200 again."""
    repo = world.repo
    raw = repo.keyword_query((["part=KNEE"], False))
    body, _ = _keyword_search(world.single, repo, raw, None, 1000)
    expected = _keyword_answer(_search(world.single, repo, np.zeros((1, DIM)), body=body),
                               1, 1000)
    deadline = time.monotonic() + 30  # the previous test's kill may still be reloading
    while world.front_a.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, world.front_a.get("/readyz").text
        time.sleep(0.2)
    (name, pid, _), = world.cluster_front.pids()[1]
    os.kill(pid, signal.SIGKILL)
    refused, not_ready, wrong = [], [], []
    whole = ready = False
    killed_at = time.monotonic()
    while not (whole and ready) and time.monotonic() < killed_at + 45:
        if not whole:
            response = _search(world.front_a, repo, np.zeros((1, DIM)), body=body)
            if response.status_code != 200:
                refused.append((response.status_code, response.text))
            elif _whole(_keyword_answer(response, 1, 1000)) != _whole(expected):
                wrong.append(response.content)
            else:
                whole = bool(refused)
        if not ready:
            readyz = world.front_a.get("/readyz")
            if readyz.status_code != 200:
                not_ready.append((readyz.status_code, readyz.json()["detail"]))
            else:
                ready = bool(not_ready)
        time.sleep(0.05)
    assert not wrong, "a 200 that is not the whole answer"
    assert refused and all(status == 503 and f"shard 1 ({name})" in text
                           for status, text in refused), refused[:2]
    assert not_ready and all(status == 503 and f"shard 1 ({name})" in detail
                             for status, detail in not_ready), not_ready[:2]
    assert whole and ready, f"not whole and ready {time.monotonic() - killed_at:.0f} s " \
                            f"after the kill: {refused[-1:]}, {not_ready[-1:]}"


def test_a_shard_past_the_deadline_is_a_keyword_503_naming_it(world: World) -> None:
    """A shard that is alive but silent (its process stopped): the combined query waits
    the deadline and is a 503 naming the shard, /readyz a 503 naming it; resumed, both
    are whole again at once (nothing to reload)."""
    repo = world.repo
    raw = repo.keyword_query((["modality=MR", "modality=US"], False), (["part=CHEST"], True))
    near = world.rng.normal(size=(2, DIM))
    (name, pid, _), = world.cluster_front.pids()[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        _, response = _keyword_search(world.front_a, repo, raw, near, K)
        waited = time.monotonic() - started
        readyz = world.front_a.get("/readyz")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert response.status_code == 503, response.text
    assert f"shard 0 ({name}) did not answer within {DEADLINE:g} s" in response.text
    assert waited >= DEADLINE * 0.9, waited
    assert readyz.status_code == 503 and f"shard 0 ({name}) unreachable" in \
        readyz.json()["detail"], readyz.text
    body, response = _keyword_search(world.front_a, repo, raw, near, K)
    single = _keyword_answer(_search(world.single, repo, near, body=body), 2, K)
    _assert_same_keywords(_keyword_answer(response, 2, K), single)
    assert world.front_a.get("/readyz").status_code == 200


def _differs(got: wire.SearchAnswerV2, single: wire.SearchAnswerV2) -> str | None:
    """Why a cluster answer is not the single service's (None: the same, scores within
    1e-12 relative): head, segment set (ids and digest), images, hits."""
    if (got.head_sequence, got.head_hash, got.set_digest, got.segments, got.images,
            got.segment_ids) != (single.head_sequence, single.head_hash, single.set_digest,
                                 single.segments, single.images, single.segment_ids):
        return f"head/segment set differ: {got.segments} segments, {got.images} images"
    for q, (mine, theirs) in enumerate(zip(got.hits, single.hits, strict=True)):
        if [i for i, _ in mine] != [i for i, _ in theirs]:
            return f"query {q}: other images"
        if not np.allclose([s for _, s in mine], [s for _, s in theirs], rtol=1e-12, atol=0):
            return f"query {q}: other scores"
    return None


def test_a_failed_resize_leaves_the_old_layout_serving_and_says_why(world: World) -> None:
    """A resize whose new layout cannot load in time (here: no time at all) raises
    ResizeError saying so; the actor it started is stopped, the old layout answers whole."""
    from cloud.cluster.resize import ResizeError

    front = world.cluster_front
    before = front.layout
    with pytest.raises(ResizeError, match=r"from 2 to 3 shards failed, the 2 shards serve "
                                          r"on: the new layout was not loaded in time"):
        front.resize(3, timeout=0.05)
    assert front.layout is before
    queries = world.rng.normal(size=(2, DIM))
    body = _body(world.repo, queries)
    _assert_same(_answer(_search(world.front_a, world.repo, queries, body=body), 2),
                 _answer(_search(world.single, world.repo, queries, body=body), 2))
    _gone(front.options.shard_name(2, 0))


def _gone(name: str) -> None:
    """Wait until the actor ``name`` is gone (ray.kill is asynchronous: the name is freed
    once the actor has ended); fail after 10 s."""
    import ray

    deadline = time.monotonic() + 10
    while True:
        try:
            ray.get_actor(name)
        except ValueError:
            return
        assert time.monotonic() < deadline, f"{name} still runs"
        time.sleep(0.2)


def test_shards_join_and_leave_while_a_client_queries(world: World) -> None:
    """Resize 2 -> 3 -> 2 while two clients query back to back, one through the
    resizing front, one through the other front replica (which learns the layout from
    the guard): every answer, during and after, is 200 and the single service's (ids,
    scores within 1e-12, head, segment set and its digest); the segments that moved are
    those whose rendezvous owner changed (about a third), all to or from the third shard;
    /readyz and /metrics show the third shard while it serves, not after it left."""
    repo = world.repo
    for _ in range(30):  # enough segments for "about a third" to mean something
        repo.add(world.rng.normal(size=(4, DIM)), _keywords(world.rng, 4))
    live = repo.live_segments()
    stored = list(repo.rows)
    queries = np.vstack([np.stack([repo.rows[stored[7]], repo.rows[stored[-3]]]),
                         world.rng.normal(size=(1, DIM))])
    body = _body(repo, queries, min_head=repo.state.head.sequence,
                 flags=wire.FLAG_LIST_SEGMENTS)
    single = _answer(_search(world.single, repo, queries, body=body), 3)
    assert single.segments == len(live)
    outcomes: dict[str, list[str]] = {"front_a": [], "front_b": []}
    stop = threading.Event()

    def ask(which: str, http: Any) -> None:
        while not stop.is_set():
            response = _search(http, repo, queries, body=body)
            if response.status_code != 200:
                outcomes[which].append(f"{response.status_code}: {response.text}")
            else:
                outcomes[which].append(_differs(_answer(response, 3), single) or "ok")

    threads = [threading.Thread(target=ask, args=(name, http), daemon=True)
               for name, http in (("front_a", world.front_a), ("front_b", world.front_b))]
    for thread in threads:
        thread.start()
    front = world.cluster_front
    at_switch: list[list[str]] = []  # what the shards of the new layout said at the switch

    def switch(layout: Any) -> None:
        at_switch.append(not_ready(front.probe(layout), [REPO], layout.shards))
        ClusterFront.switch(front, layout)

    front.switch = switch  # type: ignore[method-assign]
    try:
        while min(len(o) for o in outcomes.values()) < 2:
            time.sleep(0.05)
        grown = front.resize(3, timeout=60)
        readyz = world.front_a.get("/readyz")
        metrics = world.front_a.get("/metrics").text
        during = {name: len(o) for name, o in outcomes.items()}
        shrunk = front.resize(2, timeout=60)
        time.sleep(1.0)  # a few answers after
    finally:
        del front.switch
        stop.set()
        for thread in threads:
            thread.join(60)
    assert at_switch == [[], []], "switched before the new layout had loaded"
    for name, seen in outcomes.items():
        assert seen and set(seen) == {"ok"}, (name, [o for o in seen if o != "ok"][:3])
        assert len(seen) > during[name], f"{name}: no answer after the second resize"
    moved = assignment.split(live, 3)[2]
    assert (grown["shards"], grown["previous"], grown["moved"], grown["segments"]) == (
        3, 2, len(moved), len(live)), grown
    assert 0.1 < len(moved) / len(live) < 0.6, f"{len(moved)} of {len(live)}"
    assert (shrunk["shards"], shrunk["moved"], shrunk["segments"]) == (2, len(moved),
                                                                        len(live)), shrunk
    assert grown["started"] == shrunk["stopped"] == [front.options.shard_name(2, 0)]
    assert readyz.status_code == 200 and readyz.json()["shards"] == 3, readyz.text
    assert 'radcrypt_shard_up{shard="2",replica="0"} 1' in metrics
    assert (f'radcrypt_shard_segments{{shard="2",replica="0",repo="{REPO}"}} '
            f"{len(moved)}") in metrics, metrics
    after = world.front_a.get("/metrics").text
    assert 'shard="2"' not in after.split("radcrypt_shard_query_duration")[0]
    assert world.front_a.get("/readyz").json()["shards"] == 2
    assert front.layout.shards == 2 and len(front.pids()) == 2
    _gone(front.options.shard_name(2, 0))


def test_a_front_started_with_resize_brings_the_deployment_to_its_shards(
        world: World) -> None:
    """`radcrypt serve --ray-address ... --shards 3 --resize` (cloud/cluster/front.py
    connect): the new front resizes the running deployment to 3 shards; the other fronts
    learn the layout from the guard and answer whole; a front started later without
    --resize joins the 3 shards whatever its --shards says. Then back to 2."""
    from types import SimpleNamespace

    from cloud.cluster.front import connect

    repo = world.repo

    def config(shards: int, resize: bool) -> Any:
        return SimpleNamespace(
            ray_address=world.address, service_id=SERVICE_ID, shards=shards, replicas=1,
            shard_deadline=DEADLINE, device="cpu", refresh_interval=1.0, max_nonces=1000,
            user_rate=1000.0, user_burst=1000.0, address_rate=1000.0, address_burst=1000.0,
            owner_keys=[repo.owner.sign_public], preload=(), resize=resize,
            shard_cpus=0.5)  # two nodes of one CPU: a whole CPU would not fit beside

    def verifier() -> SignatureVerifier:
        return SignatureVerifier(repo.store, [repo.owner.sign_public], SERVICE_ID)

    resizer, _ = connect(config(3, True), repo.store, verifier())
    assert resizer.layout.shards == 3
    queries = world.rng.normal(size=(2, DIM))
    body = _body(repo, queries, min_head=repo.state.head.sequence,
                 flags=wire.FLAG_LIST_SEGMENTS)
    single = _answer(_search(world.single, repo, queries, body=body), 2)
    for http in (world.front_a, world.front_b):
        assert _differs(_answer(_search(http, repo, queries, body=body), 2), single) is None
    assert world.cluster_front.layout.shards == 3, "front_a did not learn the layout"
    joiner, _ = connect(config(2, False), repo.store, verifier())
    assert joiner.layout.key == resizer.layout.key
    assert world.cluster_front.resize(2, timeout=60)["stopped"] == [
        world.cluster_front.options.shard_name(2, 0)]
    for http in (world.front_a, world.front_b):
        assert _differs(_answer(_search(http, repo, queries, body=body), 2), single) is None
    _gone(world.cluster_front.options.shard_name(2, 0))
