"""The guard actor restarting, and two fronts resizing at once, on a real Ray cluster.

The shared local cluster (conftest.py ``ray_cluster``), a deployment of its own (service
id ``svc-cluster-guard``), two front replicas of it and the single service on the same
bucket. What is proved (docs/SCALING.md, failure behaviour):

* the guard actor killed (``ray.kill``, Ray restarts it) while a front serves: queries go
  on, the requests answered are whole and the single service's (a request in flight may be
  a 503 "replay guard unavailable" or, signed before the restart, a 401: never an unchecked
  one), and the restarted guard knows the layout and the repositories served again;
* two fronts resizing at once (two threads): exactly one resize happens, the other raises
  ResizeError saying another front is resizing; afterwards every shard of the winner's
  layout is alive, the loser's extra actor is gone, both fronts serve the winner's layout
  and answer whole.
"""

from __future__ import annotations

import os
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
from cloud.cluster.front import ClusterFront, ClusterOptions
from cloud.service import create_app

try:
    from raycluster import MISSING, RAY, LocalCluster
    from repo_builder import DIM, BucketRepo
except ImportError:  # pragma: no cover
    from tests.cluster.raycluster import MISSING, RAY, LocalCluster
    from tests.cluster.repo_builder import DIM, BucketRepo

from app.core.service_client import signed_headers

on_ray = pytest.mark.skipif(not RAY.exists(), reason=MISSING)

REPO = "guard-test"
SERVICE_ID = "svc-cluster-guard"
SEED = int(os.environ.get("RADCRYPT_TEST_SEED", "2117"))
K = 6
DEADLINE = 6.0


@dataclass
class World:
    repo: BucketRepo
    single: Any  # TestClient of the one-process service on the same bucket
    http_a: Any
    http_b: Any
    front_a: ClusterFront
    front_b: ClusterFront
    rng: np.random.Generator


def _search(http: Any, repo: BucketRepo, body: bytes) -> Any:
    path = f"/v2/repos/{REPO}/search"
    headers = {**signed_headers(repo.member, "POST", path, body, SERVICE_ID, 2),
               wire.PROTOCOL_HEADER: "2", "content-type": wire.REQUEST_MEDIA_TYPE}
    return http.post(path, content=body, headers=headers)


def _answer(response: Any, queries: int) -> wire.SearchAnswerV2:
    assert response.status_code == 200, response.text
    return wire.decode_answer(response.content, queries=queries, k=K, key_version=1,
                              repo_id=REPO)


def _whole(answer: wire.SearchAnswerV2) -> tuple[Any, ...]:
    return (answer.head_sequence, answer.head_hash, answer.set_digest, answer.segments,
            answer.images, [[i for i, _ in h] for h in answer.hits])


def _app(repo: BucketRepo, root: Path, front: ClusterFront | None) -> Any:
    verifier = SignatureVerifier(repo.store, [repo.owner.sign_public], SERVICE_ID)
    if front is not None:
        front.share_replay_state(verifier)
    return create_app(repo.store, verifier, refresh_interval=1.0, cache_dir=root,
                      service_id=SERVICE_ID, cluster=front)


@pytest.fixture(scope="module")
def world(ray_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[World]:
    from fastapi.testclient import TestClient

    root = tmp_path_factory.mktemp("guard")
    rng = np.random.default_rng(SEED)
    repo = BucketRepo.create(root / "bucket", REPO, SEED)
    for size in (20, 25, 15, 30, 20, 25, 10, 20):
        repo.add(rng.normal(size=(size, DIM)))
    with ExitStack() as stack:
        options = ClusterOptions(SERVICE_ID, shards=1, replicas=1, deadline=DEADLINE,
                                 shard_cpus=0.25, refresh_interval=1.0,
                                 rates={"user": (1000.0, 1000.0)})
        spec = DirectoryConfig(root / "bucket")
        front_a = ClusterFront(options, spec, [repo.owner.sign_public], preload=[REPO])
        stack.callback(_kill_all, front_a)
        front_b = ClusterFront(options, spec, [repo.owner.sign_public])  # same actors
        front_a.pids()
        clients = [stack.enter_context(TestClient(_app(repo, root / f"cache-{n}", front)))
                   for n, front in enumerate((None, front_a, front_b))]
        yield World(repo, *clients, front_a, front_b, rng)


def _kill_all(front: ClusterFront) -> None:
    """Every actor of the deployment, whatever layout the tests left (up to 3 shards)."""
    import ray

    for slot in range(3):
        try:
            ray.kill(ray.get_actor(front.options.shard_name(slot, 0)), no_restart=True)
        except ValueError:
            pass
    ray.kill(front.guard, no_restart=True)


def _expected(world: World, queries: np.ndarray) -> tuple[bytes, tuple[Any, ...]]:
    body = wire.encode_request(wire.SearchRequestV2(1, K, world.repo.state.head.sequence, 0,
                                                    world.repo.token(queries)))
    return body, _whole(_answer(_search(world.single, world.repo, body), len(queries)))


def _alive(front: ClusterFront) -> list[int]:
    """The pids of the current layout's shards (fails when one is dead)."""
    return [pid for replicas in front.pids() for _, pid, _ in replicas]


def _gone(name: str) -> bool:
    import ray

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name)
        except ValueError:
            return True
        time.sleep(0.2)
    return False


def test_the_guard_grants_one_resize_claim_at_a_time() -> None:
    """Guard.claim_resize, no Ray: a second front is refused while a claim holds, saying
    why; a stale generation is refused; a released or lapsed claim frees the next."""
    from cloud.cluster.guard import Guard

    guard = Guard(max_nonces=10, rates={})
    assert guard.claim_resize("a", 1, 2, 60.0) == ""
    assert "another front is resizing the deployment (to 2 shards" in guard.claim_resize(
        "b", 1, 3, 60.0)
    assert guard.set_layout(1, 2)
    guard.release_resize("b")  # not b's claim: nothing changes
    assert "another front is resizing" in guard.claim_resize("b", 2, 3, 60.0)
    guard.release_resize("a")
    assert "resized the deployment meanwhile (now layout 1, 2 shards)" in \
        guard.claim_resize("b", 1, 3, 60.0)
    assert guard.claim_resize("b", 2, 3, 0.0) == ""  # lapses at once
    assert guard.claim_resize("a", 2, 1, 60.0) == ""


@on_ray
@pytest.mark.soak
def test_two_fronts_resizing_at_once_one_wins_the_other_says_why(world: World) -> None:
    """Front A asks for 2 shards and front B for 3 at the same moment (the deployment has
    1). One resize happens; the other raises ResizeError, nothing of it left running."""
    import ray

    from cloud.cluster.resize import ResizeError

    queries = np.stack([world.repo.rows[i] for i in list(world.repo.rows)[10:12]])
    body, expected = _expected(world, queries)
    assert _whole(_answer(_search(world.http_a, world.repo, body), 2)) == expected
    outcome: dict[str, Any] = {}
    start = threading.Barrier(2)

    def resize(name: str, front: ClusterFront, shards: int) -> None:
        start.wait()
        try:
            outcome[name] = front.resize(shards, timeout=30)
        except ResizeError as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=resize, args=args, daemon=True)
               for args in (("a", world.front_a, 2), ("b", world.front_b, 3))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert set(outcome) == {"a", "b"}, outcome
    won = [n for n, o in outcome.items() if isinstance(o, dict)]
    lost = [n for n, o in outcome.items() if isinstance(o, ResizeError)]
    assert len(won) == 1 and len(lost) == 1, outcome
    winner, loser = won[0], lost[0]
    shards = outcome[winner]["shards"]
    assert "another front" in str(outcome[loser]), outcome[loser]
    assert ray.get(world.front_a.guard.layout.remote(), timeout=10) == (1, shards)
    for http in (world.http_a, world.http_b):  # the loser's front learns the layout
        assert _whole(_answer(_search(http, world.repo, body), 2)) == expected
    for front in (world.front_a, world.front_b):
        assert front.layout.key == (1, shards), front.layout.key
        assert len(_alive(front)) == shards  # no shard of the serving layout was stopped
    if shards == 2:  # the loser's third shard is not left running
        assert _gone(world.front_a.options.shard_name(2, 0))
    time.sleep(1.0)  # a late stop of the loser would show here
    for http in (world.http_a, world.http_b):
        assert _whole(_answer(_search(http, world.repo, body), 2)) == expected
    assert len(_alive(world.front_a)) == shards


@on_ray
@pytest.mark.soak
def test_a_restarted_guard_learns_the_layout_again_while_the_front_serves(
        world: World) -> None:
    """ray.kill the guard (Ray restarts it, empty) while a client queries front A: every
    200 is the single service's answer, refusals are the guard's 503 or a 401 for a
    request signed before the restart, then the next queries of both fronts are whole and
    the guard holds the layout and the repository again."""
    import ray

    repo, front = world.repo, world.front_a
    if front.layout.generation == 0:  # a resized deployment: the layout is the guard's
        front.resize(2, timeout=30)
    key = front.layout.key
    queries = np.stack([repo.rows[i] for i in list(repo.rows)[40:43]])
    body, expected = _expected(world, queries)
    seen: list[tuple[float, int, str]] = []  # (when sent, status, verdict or why)
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            response = _search(world.http_a, repo, body)
            verdict = "" if response.status_code != 200 else (
                "ok" if _whole(_answer(response, 3)) == expected else "differs")
            seen.append((sent, response.status_code, verdict or response.text))

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    try:
        while sum(s == 200 for _, s, _ in seen) < 2:
            time.sleep(0.05)
        before = ray.get(front.guard.started_at.remote(), timeout=10)
        ray.kill(front.guard, no_restart=False)
        killed = time.monotonic()
        while True:  # until the restarted guard answers
            try:
                if ray.get(front.guard.started_at.remote(), timeout=5) != before:
                    break
            except Exception:  # restarting
                pass
            assert time.monotonic() < killed + 30, "the guard was not restarted"
            time.sleep(0.2)
        back = time.monotonic()
        while time.monotonic() < back + 5:  # the front's layout check runs every 2 s
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(60)
    after = [(t, s, v) for t, s, v in seen if t > killed]
    assert after, "no query was sent after the kill"
    assert all(v == "ok" for _, s, v in seen if s == 200), "a 200 that is not whole"
    assert all(s == 401 or (s == 503 and "replay guard unavailable" in v)
               for _, s, v in after if s != 200), [x for x in after if x[1] != 200][:2]
    assert [s for t, s, _ in after if t > back] and all(  # sent once the guard is back
        s == 200 for t, s, _ in after if t > back), [
            (round(t - back, 2), s, v) for t, s, v in after if s != 200]
    assert ray.get(front.guard.layout.remote(), timeout=10) == key
    assert REPO in ray.get(front.guard.repos.remote(), timeout=10)
    for http in (world.http_a, world.http_b):
        assert _whole(_answer(_search(http, repo, body), 3)) == expected
    # a front joining now (its --shards stale) takes the layout from the guard at once
    joiner = ClusterFront(front.options, front.store, front.owner_keys)
    assert joiner.layout.key == key
