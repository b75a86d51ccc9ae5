"""The front of a cluster: the shard actors, the fan-out with a deadline, the merge.

cloud/service.py keeps doing what it does for one machine (the Gate: rate limits,
protocol, authentication; audit; metrics) and hands the repository routes (search, CKKS
search, refresh; protocols 1 and 2), /readyz
and the shards' part of /metrics (health.py) to a ClusterFront when it runs with
``--ray-address`` (its ``cluster`` hook). For a search, image or keyword, the front asks
one replica of every shard, waits at most ``deadline`` seconds, and:

* a shard that did not answer in time, or whose actor died, is a 503 naming the shard
  (``Retry-After``), never an answer without its rows; a dead replica is replaced (Ray
  restarts it, the replacement reloads its segments); with replicas the request is hedged
  (_ask_slot), so one replica failing or restarting costs no answer;
* the shards must agree on the log head: a shard behind the highest head is asked again
  with that head as its ``min_head`` (it re-reads the log), once; then a 503;
* the answer is the exact top k of the union (merge.py), names the head and the digest
  of the union of the segment sets the shards searched (docs/FORMAT-2.md 6.1), and so
  passes or fails the client's completeness check exactly as one service's would.

Actors are named (``radcrypt-<service id>-shard-<slot>-r<replica>`` and
``radcrypt-<service id>-guard``), detached and restartable, so that every front replica of
one deployment (the same service id) finds the same shards and the same guard.

The shards a request goes to are one immutable ``Layout`` (a generation, the shard count,
the actors), read once per request: a resize (cloud/cluster/resize.py) stages the next
layout on the shards while this one serves, then replaces ``self.layout`` in one
assignment, so a request is answered wholly by one layout or the other. Every request
names its layout to the shards; one a shard no longer serves is refused and the front
re-reads the current layout from the guard (another replica resized) and asks again once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import count
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse

from cloud import wire
from cloud.backend import DirectoryConfig, Store
from cloud.ckks_store import CkksRequest
from cloud.ckks_store import encode_answer as ckks_encode_answer
from cloud.cluster.ckks import MergeError, merge_answers
from cloud.cluster.guard import Guard, SharedLimiter, SharedNonces
from cloud.cluster.health import STATUS_SECONDS, Probe, metrics_lines, not_ready
from cloud.cluster.merge import ShardAnswer, covered, merge_hits, merge_keywords, merge_stats
from cloud.cluster.shard import Shard
from cloud.keyword_index import TokenQuery
from cloud.metrics import Histogram
from cloud.store import StoreConfig
from crypto.errors import FormatError
from crypto.tokens import QueryToken

log = logging.getLogger("radcrypt.cluster")

DEADLINE_SECONDS = 10.0
LAYOUT_CHECK_SECONDS = 2.0  # how often a front asks the guard whether another resized
STALE = "not serving that layout"  # a shard's refusal of a layout it no longer holds
SHARD_CPUS = 1.0
SHARD_CONCURRENCY = 4  # searches one shard replica runs at once (threads)


@dataclass(frozen=True)
class ClusterOptions:
    """How the cluster is laid out; every front replica of a deployment passes the same."""

    service_id: str
    shards: int = 1
    replicas: int = 1
    deadline: float = DEADLINE_SECONDS
    shard_cpus: float = SHARD_CPUS
    device: str = "cpu"
    refresh_interval: float = 5.0
    max_nonces: int = 200_000
    rates: dict[str, tuple[float, float]] = field(default_factory=dict)
    cache_root: str | None = None  # on each node; None: rows in memory

    @property
    def prefix(self) -> str:
        return f"radcrypt-{self.service_id}"

    def shard_name(self, slot: int, replica: int) -> str:
        return f"{self.prefix}-shard-{slot}-r{replica}"


@dataclass(frozen=True)
class Layout:
    """The shards requests go to: ``handles[slot][replica]`` of ``shards`` slots, the
    layout ``generation`` (0 until the first resize). Replaced whole, never changed but
    for a dead replica's handle."""

    generation: int
    shards: int
    handles: list[list[Any]]

    @property
    def key(self) -> tuple[int, int]:
        return self.generation, self.shards


class ShardUnavailable(Exception):
    def __init__(self, slot: int, name: str, why: str) -> None:
        super().__init__(f"shard {slot} ({name}) {why}")
        self.slot, self.name, self.why = slot, name, why


def store_spec(store: Store) -> StoreConfig | DirectoryConfig:
    """What the shards open: the front's store without its credentials (each node has its
    own, from its environment). Only S3 and directory stores can be shared."""
    root = getattr(store, "root", None)
    if root is not None and type(store).__name__ == "DirectoryStore":
        return DirectoryConfig(root)
    config = getattr(store, "config", None)
    if isinstance(config, StoreConfig):
        return replace(config, access_key=None, secret_key=None)
    raise ValueError(f"a cluster needs an S3 or a directory store, not {type(store).__name__}")


class ClusterFront:
    """The shards of one deployment, and the fan-out and merge of every request."""

    def __init__(self, options: ClusterOptions, store: StoreConfig | DirectoryConfig,
                 owner_keys: Sequence[bytes], preload: Sequence[str] = ()) -> None:
        import ray

        self.ray = ray
        self.options = options
        self.store = store
        self.owner_keys = list(owner_keys)
        self._served: set[str] = set()
        self._turn = count()
        self.latency: dict[int, Histogram] = {}  # slot -> its search answers' latency
        self._inflight: dict[int, int] = {}  # layout generation -> requests running
        self.attempted = 0  # the last layout generation a resize staged (resize.py)
        self.resizing = threading.Lock()  # one resize at a time in this front (resize.py)
        self.holder = uuid.uuid4().hex  # names this front's resize claim in the guard
        self._guard_started: float | None = None  # to see that the guard restarted
        self._checked = time.monotonic()
        guard_class: Any = ray.remote(Guard)
        self.guard: Any = guard_class.options(
            name=f"{options.prefix}-guard", lifetime="detached", get_if_exists=True,
            num_cpus=0, max_restarts=-1, max_concurrency=16).remote(
                options.max_nonces, options.rates)
        for repo_id in preload:  # before the shards start: they load these at once
            ray.get(self.guard.note_repo.remote(repo_id), timeout=60)
        self._served.update(preload)
        # a deployment resized since: its layout, not --shards (cloud/cluster/resize.py)
        try:
            generation, shards = ray.get(self.guard.layout.remote(), timeout=60) or (
                0, options.shards)
        except Exception as exc:  # a guard of an older version: never resized
            log.warning("layout not read from the guard (%s): %d shards", exc,
                        options.shards)
            generation, shards = 0, options.shards
        self.layout = self._open(generation, shards)

    @property
    def handles(self) -> list[list[Any]]:
        """The current layout's actors, ``[slot][replica]``."""
        return self.layout.handles

    def _open(self, generation: int, shards: int) -> Layout:
        """Find (or start) the actors of a layout."""
        return Layout(generation, shards,
                      [[self._shard(slot, r, shards, generation)
                        for r in range(self.options.replicas)] for slot in range(shards)])

    def switch(self, layout: Layout) -> None:
        """Serve ``layout`` from the next request on (one assignment: a request reads
        ``self.layout`` once)."""
        self.layout = layout

    def inflight(self, generation: int) -> int:
        """Requests of this front still running under layout ``generation``."""
        return self._inflight.get(generation, 0)

    def resize(self, shards: int, timeout: float | None = None) -> dict[str, Any]:
        """Resize the deployment to ``shards`` shards while it serves (blocking: call it
        from a thread); ResizeError, the old layout still serving, when it fails.
        cloud/cluster/resize.py says how."""
        from cloud.cluster import resize

        report = resize.run(self, shards, resize.RESIZE_SECONDS if timeout is None
                            else timeout)
        return report.as_dict()

    async def _sync_layout(self, force: bool = False, ask_shards: bool = False) -> bool:
        """Adopt the layout the guard names when it is newer than this front's (another
        replica resized); True when it changed. At most every LAYOUT_CHECK_SECONDS
        unless ``force``. ``ask_shards`` (a shard refused this front's layout): when the
        guard knows nothing newer, the layout the first shard committed."""
        now = time.monotonic()
        if not force and now - self._checked < LAYOUT_CHECK_SECONDS:
            return False
        self._checked = now
        try:
            found, started = await asyncio.wait_for(asyncio.gather(
                asyncio.wrap_future(self.guard.layout.remote().future()),
                asyncio.wrap_future(self.guard.started_at.remote().future())), STATUS_SECONDS)
        except Exception:  # the guard restarting: keep serving what we have
            found = started = None
        if started is not None and started != self._guard_started:
            if self._guard_started is not None:  # restarted: it forgot what it was told
                log.warning("the guard restarted: telling it the repositories and layout")
                for repo_id in sorted(self._served):
                    self.guard.note_repo.remote(repo_id)
            self._guard_started = started
        if started is not None and found is None and self.layout.generation > 0:
            # a restarted guard forgot the layout: this front's (set_layout keeps the
            # newest any front tells it), and shard 0's, which may be newer still
            self.guard.set_layout.remote(*self.layout.key)
            found = await self._committed_layout()
        if ask_shards and (found is None or int(found[0]) <= self.layout.generation):
            found = await self._committed_layout()
        if found is None or int(found[0]) <= self.layout.generation:
            return False
        loop = asyncio.get_running_loop()  # get_if_exists: a blocking Ray call
        layout = await loop.run_in_executor(None, self._open, int(found[0]), int(found[1]))
        if layout.generation > self.layout.generation:
            log.info("adopting layout %d (%d shards) from the guard", *layout.key)
            self.switch(layout)
            return True
        return False

    async def _committed_layout(self) -> tuple[int, int] | None:
        """The layout the first shard committed, told back to the guard: a guard that
        restarted has forgotten the layout, while the shards refuse older ones."""
        try:
            status = await asyncio.wait_for(asyncio.wrap_future(
                self.layout.handles[0][0].status.remote().future()), STATUS_SECONDS)
            found = status.get("layout")
        except Exception:  # restarting: the next refused request asks again
            return None
        if not found:
            return None
        self.guard.set_layout.remote(int(found[0]), int(found[1]))
        return int(found[0]), int(found[1])

    def _shard(self, slot: int, replica: int, shards: int, generation: int) -> Any:
        opts = self.options
        threads = max(1, int(opts.shard_cpus)) if opts.shard_cpus >= 1 else 1
        shard_class: Any = self.ray.remote(Shard)
        actor = shard_class.options(
            name=opts.shard_name(slot, replica), lifetime="detached", get_if_exists=True,
            num_cpus=opts.shard_cpus, max_restarts=-1, max_task_retries=0,
            max_concurrency=SHARD_CONCURRENCY)
        return actor.remote(opts.shard_name(slot, replica), slot, shards, self.store,
                            self.owner_keys, opts.refresh_interval, opts.device, threads,
                            self.guard, opts.cache_root, generation)

    # --- shared replay state ---------------------------------------------------------------

    def nonces(self) -> SharedNonces:
        return SharedNonces(self.guard)

    def limiter(self, kind: str) -> SharedLimiter:
        rate, _ = self.options.rates.get(kind, (50.0, 100.0))
        return SharedLimiter(self.guard, kind, rate)

    def share_replay_state(self, verifier: Any) -> None:
        """Point a SignatureVerifier's nonce cache and user limits at the guard."""
        if hasattr(verifier, "nonces"):
            verifier.nonces = self.nonces()
        if hasattr(verifier, "limiter"):
            verifier.limiter = self.limiter("user")

    # --- fan-out -------------------------------------------------------------------------

    async def _note(self, repo_id: str) -> None:
        if repo_id not in self._served:
            try:
                await asyncio.wait_for(asyncio.wrap_future(
                    self.guard.note_repo.remote(repo_id).future()), 2.0)
                self._served.add(repo_id)
            except Exception:  # only the reload after a restart needs it: next time
                pass

    async def _ask_slot(self, layout: Layout, slot: int, method: str, args: tuple[Any, ...],
                        until: float, dead: list[tuple[int, int]]) -> ShardAnswer:
        """One answer from a replica of ``slot`` before ``until`` (monotonic);
        ShardUnavailable otherwise. With replicas the request is hedged: a replica that
        fails is replaced by the next at once, and one that is silent for its share of
        the deadline (a replica being restarted queues the call) gets the next replica
        asked beside it; the first answer wins. A replica gone for good is added to
        ``dead`` (fan_out replaces it once it knows the layout is still current)."""
        replicas = layout.handles[slot]
        first = next(self._turn) % len(replicas)
        order = [(first + i) % len(replicas) for i in range(len(replicas))]
        share = self.options.deadline / len(replicas)
        pending: dict[asyncio.Future[Any], int] = {}
        why = f"did not answer within {self.options.deadline:g} s"
        refs: list[Any] = []
        sent = time.monotonic()
        try:
            while order or pending:
                left = until - time.monotonic()
                if left <= 0:
                    break
                if order:
                    replica = order.pop(0)
                    ref = getattr(replicas[replica], method).remote(*args,
                                                                    layout=layout.key)
                    refs.append(ref)
                    pending[asyncio.wrap_future(ref.future())] = replica
                wait = left if not order else min(left, share)
                done, _ = await asyncio.wait(pending, timeout=wait,
                                             return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    replica = pending.pop(future)
                    try:
                        answer: ShardAnswer = future.result()
                        if method in ("search", "keywords", "ckks"):
                            self.latency.setdefault(slot, Histogram()).observe(
                                time.monotonic() - sent)
                        return answer
                    except Exception as exc:  # RayActorError, ActorUnavailableError, ...
                        why = f"failed ({type(exc).__name__})"
                        log.warning("shard %s failed: %s",
                                    self.options.shard_name(slot, replica), exc)
                        if type(exc).__name__ == "ActorDiedError":
                            dead.append((slot, replica))
        finally:
            for future in pending:
                future.cancel()
        names = ", ".join(self.options.shard_name(slot, r) for r in range(len(replicas)))
        raise ShardUnavailable(slot, names, why)

    def _replace(self, layout: Layout, slot: int, replica: int) -> None:
        """Ray restarts a replica whose process died; one that is gone for good (its name
        free again) is created anew, and reloads its segments. Only in the current layout:
        a surplus shard a resize stopped is not brought back."""
        if layout is not self.layout:
            return
        try:
            layout.handles[slot][replica] = self._shard(slot, replica, layout.shards,
                                                        layout.generation)
        except Exception as again:  # the next request tries again
            log.error("replacing shard %s failed: %s",
                      self.options.shard_name(slot, replica), again)

    async def fan_out(self, method: str, args: tuple[Any, ...],
                      min_head: int = 0) -> list[ShardAnswer]:
        """Every shard's answer, at one log head, all of one layout; ShardUnavailable or
        HTTPException. A refusal of the layout (another front replica resized) or a dead
        shard makes the front re-read the layout from the guard; when it changed, the
        request is asked again once, of the new layout."""
        await self._sync_layout()
        for again in (False, True):
            layout = self.layout
            dead: list[tuple[int, int]] = []
            self._inflight[layout.generation] = self.inflight(layout.generation) + 1
            try:
                return await self._fan_out(layout, method, args, min_head, dead)
            except (ShardUnavailable, HTTPException) as exc:
                refused = isinstance(exc, HTTPException) and STALE in str(exc.detail)
                if again or not (refused or isinstance(exc, ShardUnavailable)) or \
                        not await self._sync_layout(force=True, ask_shards=refused):
                    raise
            finally:
                self._inflight[layout.generation] -= 1
                for slot, replica in dead:  # nothing when the layout was replaced
                    self._replace(layout, slot, replica)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fan_out(self, layout: Layout, method: str, args: tuple[Any, ...],
                       min_head: int, dead: list[tuple[int, int]]) -> list[ShardAnswer]:
        until = time.monotonic() + self.options.deadline
        answers = await asyncio.gather(
            *(self._ask_slot(layout, s, method, (*args, min_head), until, dead)
              for s in range(layout.shards)))
        for answer in answers:
            if answer.error is not None:
                status, detail = answer.error
                raise HTTPException(status_code=status, detail=detail,
                                    headers={"Retry-After": "5"} if status == 503 else None)
            if answer.layout != (answer.layout[0], layout.shards):
                raise ShardUnavailable(answer.layout[0], answer.shard,
                                       "is laid out for another shard count")
        head = max(a.head for a in answers)
        behind = [i for i, a in enumerate(answers) if a.head < head]
        if behind:  # ask the late ones to re-read the log up to the head the others saw
            again = await asyncio.gather(
                *(self._ask_slot(layout, i, method, (*args, head), until, dead)
                  for i in behind))
            for i, answer in zip(behind, again, strict=True):
                if answer.error is not None or answer.head != head:
                    raise ShardUnavailable(i, answer.shard, f"is behind the log head {head}")
                answers[i] = answer
        hashes = {a.head_hash for a in answers}
        if len(hashes) != 1:
            raise HTTPException(status_code=503, detail="shards disagree on the segment log "
                                "(two different entries at one head)",
                                headers={"Retry-After": "5"})
        return list(answers)

    # --- the routes ------------------------------------------------------------------------

    async def search(self, repo_id: str, key_version: int, token: QueryToken, k: int,
                     min_head: int = 0) -> tuple[list[ShardAnswer], list[list[tuple[str, float]]]]:
        """The shards' answers and the merged hits (raises ShardUnavailable, HTTPException)."""
        await self._note(repo_id)
        answers = await self.fan_out("search", (repo_id, key_version, token, k), min_head)
        _same_widths(answers)
        return answers, merge_hits([a.hits for a in answers], len(token), k)

    async def search_v2(self, repo_id: str, req: wire.SearchRequestV2, who: str,
                        request: Request, trail: Any) -> Response:
        """POST /v2/repos/<repo>/search on the cluster (docs/FORMAT-2.md 8.3); with a
        keyword query (issue 17), every shard evaluates it on its own segments with the
        single service's code and the front merges (keyword_search)."""
        started = time.perf_counter()
        queries = req.queries
        matched = None
        try:
            if req.flags & wire.FLAG_KEYWORDS:
                answers, hits, matched = await self.keyword_search(repo_id, req)
            else:
                assert req.token is not None  # wire.decode_request: no keywords, a token
                answers, hits = await self.search(repo_id, req.key_version, req.token,
                                                  req.k, req.min_head)
        except ShardUnavailable as exc:
            raise _unavailable(exc) from None
        seg_ids = covered(answers)
        answer = wire.SearchAnswerV2(
            key_version=req.key_version, k=req.k, segments=len(seg_ids),
            images=sum(a.images for a in answers), head_sequence=answers[0].head,
            head_hash=answers[0].head_hash,
            set_digest=wire.segment_set_digest(repo_id, req.key_version, seg_ids),
            engine_us=round(max(a.engine_seconds for a in answers) * 1e6), hits=hits,
            stats=merge_stats([a.stats for a in answers], queries)
            if req.flags & wire.FLAG_STATS else None,
            segment_ids=seg_ids if req.flags & wire.FLAG_LIST_SEGMENTS else None,
            matched=matched)
        elapsed = (time.perf_counter() - started) * 1000
        trail.record(who, repo_id, "search", sum(len(h) for h in hits), elapsed)
        log.info("search v2 (cluster, %d shards) repo=%s user=%s queries=%d k=%d head=%d",
                 len(answers), repo_id, who, queries, req.k, answer.head_sequence)
        request.scope.setdefault("state", {})["radcrypt_queries"] = queries
        return Response(wire.encode_answer(answer), media_type=wire.ANSWER_MEDIA_TYPE)

    async def keyword_search(self, repo_id: str, req: wire.SearchRequestV2
                             ) -> tuple[list[ShardAnswer], list[list[tuple[str, float]]], int]:
        """A keyword-only or combined query on every shard (cloud/cluster/shard.py
        ``keywords``): the shards' answers, the merged hits and the matched count. The
        segment set is the union of the segments each shard searched by keyword, so a
        segment without a dictionary leaves the answer incomplete as on one service."""
        try:
            query = TokenQuery.from_bytes(req.keywords)
        except FormatError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        await self._note(repo_id)
        answers = await self.fan_out(
            "keywords", (repo_id, req.key_version, query, req.token, req.k), req.min_head)
        _same_widths(answers)
        try:
            hits, matched = merge_keywords(answers, None if req.token is None
                                           else len(req.token), req.k)
        except ValueError as exc:  # a shard's counts that do not add up
            raise HTTPException(status_code=503, detail=str(exc),
                                headers={"Retry-After": "5"}) from None
        return answers, hits, matched

    async def ckks_v2(self, repo_id: str, req: CkksRequest, who: str, request: Request,
                      trail: Any) -> Response:
        """POST /v2/repos/<repo>/ckks on the cluster (issue 19, docs/FORMAT-2.md 8.4):
        every shard scores the CKKS blocks of its own segments with the single service's
        scorer, the front merges the parts in segment order (cloud/cluster/ckks.py) and
        names the segments scored, so the client cannot tell the answer from one
        service's. A late shard is a 503 naming it, as for every route; a segment a shard
        could not score is left out of the covered set, and the client names it."""
        started = time.perf_counter()
        await self._note(repo_id)
        try:
            answers = await self.fan_out("ckks", (repo_id, req), req.min_head)
        except ShardUnavailable as exc:
            raise _unavailable(exc) from None
        try:
            answer = merge_answers(repo_id, req.key_version, answers)
        except MergeError as exc:  # a shard's part that does not add up: never merged
            raise HTTPException(status_code=503, detail=str(exc),
                                headers={"Retry-After": "5"}) from None
        elapsed = (time.perf_counter() - started) * 1000
        trail.record(who, repo_id, "search", 0, elapsed)
        log.info("search ckks (cluster, %d shards) repo=%s user=%s segments=%d head=%d",
                 len(answers), repo_id, who, answer.segments, answer.head_sequence)
        request.scope.setdefault("state", {})["radcrypt_queries"] = 1
        return Response(ckks_encode_answer(answer), media_type="application/octet-stream")

    async def search_v1(self, repo_id: str, token: QueryToken, k: int, key_version: int,
                        who: str, request: Request, trail: Any) -> dict[str, Any]:
        """POST /v1/repos/<repo>/search on the cluster (protocol 1's JSON shape)."""
        started = time.perf_counter()
        try:
            answers, hits = await self.search(repo_id, key_version, token, k)
        except ShardUnavailable as exc:
            raise _unavailable(exc) from None
        stats = merge_stats([a.stats for a in answers], len(token))
        results = [{"hits": [{"image_id": i, "score": s, "rank": r + 1}
                             for r, (i, s) in enumerate(query)], "stats": stats[q]}
                   for q, query in enumerate(hits)]
        trail.record(who, repo_id, "search", sum(len(h) for h in hits),
                     (time.perf_counter() - started) * 1000)
        request.scope.setdefault("state", {})["radcrypt_queries"] = len(token)
        return {"results": results, "images": sum(a.images for a in answers),
                "segments": len(covered(answers))}

    async def refresh(self, repo_id: str) -> dict[str, Any]:
        """POST /v2/repos/<repo>/refresh on the cluster: every shard re-reads the log."""
        await self._note(repo_id)
        try:
            answers = await self.fan_out("refresh", (repo_id,))
        except ShardUnavailable as exc:
            raise _unavailable(exc) from None
        versions: set[int] = set()
        rejected: dict[str, str] = {}
        for a in answers:
            rejected.update(a.rejected)
            versions.update(a.key_versions)
        seg_ids = covered(answers)
        errors = [a.log_error for a in answers if a.log_error]
        return {"head": answers[0].head, "head_hash": answers[0].head_hash.hex(),
                "images": sum(a.images for a in answers), "segments": len(seg_ids),
                "key_versions": sorted(versions), "rejected": rejected,
                "log_error": errors[0] if errors else None}

    async def refresh_v1(self, repo_id: str) -> dict[str, Any]:
        answer = await self.refresh(repo_id)
        return {"images": answer["images"], "segments": answer["segments"],
                "key_versions": answer["key_versions"], "rejected_segments": answer["rejected"]}

    # --- readiness and metrics (cloud/cluster/health.py) ------------------------------------

    def probe(self, layout: Layout | None = None) -> list[Probe]:
        """Every replica's status, for ``layout`` (default: the current one), within
        STATUS_SECONDS (blocking: /readyz and /metrics run in a worker thread). A replica
        gone for good is replaced, as a search would."""
        layout = layout or self.layout
        asked = [(slot, r, handle.status.remote(layout.key))
                 for slot, replicas in enumerate(layout.handles)
                 for r, handle in enumerate(replicas)]
        done, _ = self.ray.wait([ref for _, _, ref in asked], num_returns=len(asked),
                                timeout=STATUS_SECONDS)
        answered = set(done)
        probes = []
        for slot, replica, ref in asked:
            name = self.options.shard_name(slot, replica)
            if ref not in answered:
                probes.append(Probe(slot, replica, name, None,
                                    f"no status within {STATUS_SECONDS:g} s"))
                continue
            try:
                probes.append(Probe(slot, replica, name, self.ray.get(ref, timeout=0)))
            except Exception as exc:  # RayActorError, ActorUnavailableError, ...
                probes.append(Probe(slot, replica, name, None, type(exc).__name__))
                if type(exc).__name__ == "ActorDiedError":
                    self._replace(layout, slot, replica)
        return probes

    def _repos(self) -> list[str] | None:
        """The repositories the deployment serves (the guard's list); None: no guard."""
        try:
            repos: list[str] = self.ray.get(self.guard.repos.remote(), timeout=STATUS_SECONDS)
        except Exception:  # the guard restarting: no request can be checked meanwhile
            return None
        return sorted(set(repos) | self._served)

    def readiness(self) -> tuple[list[Probe], list[str], int]:
        """(the probes, why the cluster is not ready, how many repositories it serves)."""
        layout = self.layout
        probes = self.probe(layout)
        repos = self._repos()
        if repos is None:
            return probes, ["replay guard unavailable"], 0
        return probes, not_ready(probes, repos, layout.shards), len(repos)

    def readyz(self) -> JSONResponse:
        """GET /readyz of a cluster front: 200 when every live segment is owned by a
        ready shard, else 503 naming the shards (unreachable, or loading)."""
        _, reasons, repos = self.readiness()
        unreachable = any("unreachable" in r or "guard" in r for r in reasons)
        body = {"status": "ready" if not reasons else
                "unavailable" if unreachable else "warming",
                "repositories": repos, "loading": len(reasons),
                "shards": len(self.handles), "detail": "; ".join(reasons) or None}
        return JSONResponse(body, status_code=503 if reasons else 200,
                            headers={"Retry-After": "2"} if reasons else None)

    def metrics_text(self) -> str:
        """The shards' series for GET /metrics (appended to the front's own)."""
        probes, reasons, _ = self.readiness()
        return "\n".join(metrics_lines(probes, dict(self.latency), reasons)) + "\n"

    # --- lifecycle -------------------------------------------------------------------------

    def pids(self) -> list[list[tuple[str, int, float]]]:
        """(name, pid, started) of every replica of every shard (tests, operators)."""
        return [self.ray.get([h.ping.remote() for h in replicas], timeout=60)
                for replicas in self.handles]

    def kill(self) -> None:
        """End the deployment's actors (the last front of a deployment, tests)."""
        for replicas in self.handles:
            for handle in replicas:
                self.ray.kill(handle, no_restart=True)
        self.ray.kill(self.guard, no_restart=True)


def _same_widths(answers: Sequence[ShardAnswer]) -> None:
    widths = {a.widths for a in answers if a.widths is not None}
    if len(widths) > 1:
        raise HTTPException(status_code=503, detail="shards serve different vector widths "
                            "for this key version", headers={"Retry-After": "5"})


def _unavailable(exc: ShardUnavailable) -> HTTPException:
    return HTTPException(status_code=503, detail=f"cluster incomplete: {exc}; no partial "
                         "answer is given, try again", headers={"Retry-After": "2"})


def connect(config: Any, store: Store, verifier: Any) -> tuple[ClusterFront, SharedLimiter]:
    """`radcrypt serve --ray-address`: join the Ray cluster, find or start the shards and
    the guard of this service id, share the verifier's replay state; the front and the
    per-address limiter the Gate is to use."""
    import ray

    if not ray.is_initialized():
        ray.init(address=config.ray_address, namespace="radcrypt", logging_level=logging.WARNING,
                 log_to_driver=False)
    options = ClusterOptions(
        config.service_id, config.shards, config.replicas, config.shard_deadline,
        shard_cpus=getattr(config, "shard_cpus", SHARD_CPUS),
        device=config.device, refresh_interval=config.refresh_interval,
        max_nonces=config.max_nonces,
        rates={"user": (config.user_rate, config.user_burst),
               "address": (config.address_rate, config.address_burst)})
    front = ClusterFront(options, store_spec(store), config.owner_keys, config.preload)
    front.share_replay_state(verifier)
    if getattr(config, "resize", False) and front.layout.shards != config.shards:
        from cloud.cluster.resize import ResizeError

        try:  # --resize: the deployment is to have --shards shards; it serves meanwhile
            report = front.resize(config.shards)
            log.warning("resized to %d shards (was %d): %d of %d segments moved, %.1f s",
                        report["shards"], report["previous"], report["moved"],
                        report["segments"], report["seconds"])
        except ResizeError as exc:  # the deployment serves on with its layout, and so do we
            log.error("%s", exc)
    return front, front.limiter("address")
