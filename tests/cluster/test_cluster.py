"""The search service on a real local Ray cluster (issue 21, docs/SCALING.md).

One module-scoped cluster: ``ray start --head`` and one ``ray start --address`` worker on
127.0.0.1 (one CPU and a 100 MB object store each, tests/cluster/raycluster.py), stopped
by PID at the end. A format-2 repository is written at the bucket level
(tests/cluster/repo_builder.py); two shards split its segments. What is proved:

* the cluster's answers equal the single service's on the same bucket (hits, scores, head,
  segment-set digest), and the shards really split the segments (disjoint, both used);
* a request captured at one front replica and replayed to a second one is refused (the
  nonce cache is the shared guard actor, not the process's);
* a segment committed while the cluster runs is searchable after the next refresh, and the
  answer's digest is that of the new live set;
* a shard process killed while queries run gives 503s naming the shard, never an answer
  without its rows, and whole answers again within 30 s (Ray restarts the actor, which
  reloads its segments).
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
from cloud.service import create_app

try:
    from raycluster import MISSING, RAY, local_cluster
    from repo_builder import DIM, BucketRepo
except ImportError:  # pragma: no cover
    from tests.cluster.raycluster import MISSING, RAY, local_cluster
    from tests.cluster.repo_builder import DIM, BucketRepo

from app.core.service_client import signed_headers

pytestmark = pytest.mark.skipif(not RAY.exists(), reason=MISSING)

REPO = "cluster-test"
SERVICE_ID = "svc-cluster-test"
SEED = int(os.environ.get("RADCRYPT_TEST_SEED", "2111"))
K = 8
DEADLINE = 4.0


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


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from fastapi.testclient import TestClient

    root = tmp_path_factory.mktemp("cluster")
    rng = np.random.default_rng(SEED)
    repo = BucketRepo.create(root / "bucket", REPO, SEED)
    for size in (30, 25, 40, 35, 20, 30):
        repo.add(rng.normal(size=(size, DIM)))
    while not all(assignment.split(repo.live_segments(), 2)):  # segment ids are random
        repo.add(rng.normal(size=(20, DIM)))
    with ExitStack() as stack:
        cluster = stack.enter_context(local_cluster())
        import ray

        ray.init(address=cluster.address, namespace="radcrypt", logging_level="ERROR",
                 log_to_driver=False)
        stack.callback(ray.shutdown)
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
        yield World(repo, *clients, front_a, rng, cluster.address)


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
