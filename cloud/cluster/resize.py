"""Shards joining and leaving a running cluster (issue 21), never a partial or wrong answer.

A resize from n to m shards is a new *layout* (generation g+1, m shards), staged beside
the one serving, then switched to in one step:

1. start the actors of the slots the new layout adds (named as every slot, made with the
   new layout), and ask every shard of the new layout to stage it (``Shard.prepare``):
   each loads, in the background, the segments its slot owns in it, of every repository
   the deployment serves, beside the layout it serves (rendezvous hashing,
   assignment.py: a join moves about 1/m of the segments, all to the new shard; a leave
   moves only the leaving shard's);
2. wait until every slot of the new layout has a replica that loaded every live segment
   it owns (health.not_ready, the rule of /readyz, on the staged layout's status),
   repeating the prepare to a replica that lost it (restarted); meanwhile the front keeps
   answering with the old layout, whole;
3. record the layout in the guard (every front replica and a restarted shard find it
   there; a front that sends an old layout's request after the shards dropped it is
   refused, re-reads it and asks again), then switch the front (one assignment);
4. once this front's requests of the old layout have ended (at most the deadline), the
   shards commit (drop the old layout's index) and the surplus actors are stopped.

Before step 1 the front claims the resize in the guard (Guard.claim_resize): a second
front resizing at once, or one whose layout is older than the guard's, is refused there
and raises ResizeError saying so before it starts or stages anything (both staging the
same generation on the same actors, found by name, the loser's undo would abort the
winner's layout and stop the shard actor the winner started). A failure before the switch
(a shard that cannot load in time, the guard unreachable) drops what was staged, stops
the actors started for it, and raises ResizeError saying why: the old layout never
stopped serving. After the switch
nothing can fail the request path: a commit that does not arrive leaves a shard holding
both layouts (memory, not answers) until it restarts.

Costs, said plainly: a shard stages its new share as a second index, read from the store
(the single-machine index is append-only: a segment cannot be taken out of it without a
rebuild), so for a while it holds both; a join costs the existing shards a re-read of
their kept segments, not only the moved ones' load on the new shard.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from cloud.cluster.health import STATUS_SECONDS, Probe, not_ready

log = logging.getLogger("radcrypt.cluster.resize")

RESIZE_SECONDS = 300.0  # the longest a resize waits for the new layout to load
POLL_SECONDS = 0.25
MAX_SHARDS = 256


class ResizeError(Exception):
    """The resize did not happen; the old layout serves on. The message says why."""


@dataclass(frozen=True)
class ResizeReport:
    """What a resize did: the layouts, the segments that changed owner (summed over the
    repositories served), the actors started and stopped, how long it took."""

    generation: int
    shards: int
    previous: int
    moved: int
    segments: int
    started: list[str]
    stopped: list[str]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(front: Any, shards: int, timeout: float) -> ResizeReport:
    """Resize ``front``'s deployment (a ClusterFront) to ``shards`` shards; blocking."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards {shards}: must be 1..{MAX_SHARDS}")
    if not front.resizing.acquire(blocking=False):
        raise ResizeError("another resize is running in this front; nothing changed")
    try:
        return _run(front, shards, timeout)
    finally:
        front.resizing.release()


def _run(front: Any, shards: int, timeout: float) -> ResizeReport:
    began = time.monotonic()
    old = front.layout
    if shards == old.shards:
        return ResizeReport(old.generation, shards, shards, 0, 0, [], [], 0.0)
    repos = front._repos()
    if repos is None:
        raise ResizeError(f"resize from {old.shards} to {shards} shards not started: the "
                          "replay guard did not answer (the repositories served are "
                          f"unknown); the {old.shards} shards serve on")
    # never a generation a failed attempt staged (a shard may still hold it)
    generation = max(old.generation, getattr(front, "attempted", 0)) + 1
    opts = front.options
    try:  # one resize at a time in the deployment, held until the old actors are stopped
        why = front.ray.get(front.guard.claim_resize.remote(
            front.holder, generation, shards, timeout + opts.deadline + STATUS_SECONDS * 5
            + 30), timeout=STATUS_SECONDS)
    except Exception as exc:  # the guard restarting
        why = f"the replay guard did not answer ({type(exc).__name__})"
    if why:
        raise ResizeError(f"resize from {old.shards} to {shards} shards not started: "
                          f"{why}; the {old.shards} shards serve on")
    try:
        return _claimed(front, old, shards, generation, repos, timeout, began)
    finally:
        front.guard.release_resize.remote(front.holder)


def _claimed(front: Any, old: Any, shards: int, generation: int, repos: list[str],
             timeout: float, began: float) -> ResizeReport:
    """The resize itself, once the guard granted this front the claim."""
    layout_type = type(old)  # cloud.cluster.front.Layout (importing it: a cycle)
    front.attempted = generation
    opts = front.options
    started: list[tuple[int, int]] = []
    handles: list[list[Any]] = []
    try:
        for slot in range(shards):
            if slot < old.shards:
                handles.append(list(old.handles[slot]))
                continue
            handles.append([])
            for replica in range(opts.replicas):
                handles[slot].append(front._shard(slot, replica, shards, generation))
                started.append((slot, replica))
        staged = layout_type(generation, shards, handles)
        probes = _stage(front, staged, old.shards, repos, began + timeout)
        if not front.ray.get(front.guard.set_layout.remote(generation, shards),
                             timeout=STATUS_SECONDS):
            raise ResizeError("another front resized the deployment meanwhile")
    except Exception as exc:
        _undo(front, handles, old.shards, generation)
        why = str(exc) if isinstance(exc, ResizeError) else f"{type(exc).__name__}: {exc}"
        raise ResizeError(f"resize from {old.shards} to {shards} shards failed, the "
                          f"{old.shards} shards serve on: {why}") from None
    front.switch(staged)  # from here on every new request is of the new layout
    log.info("layout %d: %d shards (was %d)", generation, shards, old.shards)
    drained = time.monotonic() + opts.deadline + 1.0
    while front.inflight(old.generation) and time.monotonic() < drained:
        time.sleep(0.05)
    refs = [h.commit.remote(generation, shards) for replicas in handles for h in replicas]
    _, late = front.ray.wait(refs, num_returns=len(refs), timeout=STATUS_SECONDS * 5)
    if late:
        log.warning("%d shard replicas did not confirm layout %d yet: they hold both "
                    "until they do or restart", len(late), generation)
    stopped = []
    for slot in range(shards, old.shards):
        for replica, handle in enumerate(old.handles[slot]):
            front.ray.kill(handle, no_restart=True)
            stopped.append(opts.shard_name(slot, replica))
    moved, segments = _moved(probes, repos)
    return ResizeReport(generation, shards, old.shards, moved, segments,
                        [opts.shard_name(s, r) for s, r in started], stopped,
                        round(time.monotonic() - began, 3))


def _stage(front: Any, staged: Any, previous: int, repos: list[str],
           until: float) -> list[Probe]:
    """Prepare the staged layout on every replica and wait until it is whole: the probes
    of its status; ResizeError naming the shards not ready when ``until`` passes."""
    opts = front.options
    asked: set[tuple[int, int]] = set()
    while True:
        refs = [(slot, r, h.status.remote(staged.key)) for slot, replicas
                in enumerate(staged.handles) for r, h in enumerate(replicas)]
        wait = max(0.1, min(STATUS_SECONDS, until - time.monotonic()))
        done, _ = front.ray.wait([ref for _, _, ref in refs], num_returns=len(refs),
                                 timeout=wait)
        answered = set(done)
        probes = []
        for slot, replica, ref in refs:
            name = opts.shard_name(slot, replica)
            status = None
            why = f"no status within {wait:.1f} s"
            if ref in answered:
                try:
                    status = front.ray.get(ref, timeout=0)
                except Exception as exc:  # restarting
                    why = type(exc).__name__
            probes.append(Probe(slot, replica, name, status, "" if status else why))
            lost = status is not None and status.get("layout") is None
            if (slot, replica) not in asked or lost:  # again after a restart
                staged.handles[slot][replica].prepare.remote(
                    staged.generation, staged.shards, repos, previous)
                asked.add((slot, replica))
        reasons = not_ready(probes, repos, staged.shards)
        if not reasons and all(p.status and p.status.get("layout") for p in probes
                               if p.status is not None):
            return probes
        if time.monotonic() >= until:
            raise ResizeError("the new layout was not loaded in time: " + "; ".join(
                reasons or ["a replica lost the staged layout"]))
        time.sleep(POLL_SECONDS)


def _undo(front: Any, handles: list[list[Any]], kept: int, generation: int) -> None:
    """Drop what a failed resize staged: the first ``kept`` slots' shards forget the
    layout, the actors started for the others are stopped (the old layout never stopped
    serving)."""
    for slot, replicas in enumerate(handles):
        for replica, handle in enumerate(replicas):
            try:
                if slot < kept:
                    handle.abort.remote(generation)
                else:
                    front.ray.kill(handle, no_restart=True)
            except Exception as exc:  # a dead actor: nothing staged survives it
                log.warning("undoing layout %d on %s: %s", generation,
                            front.options.shard_name(slot, replica), exc)


def _moved(probes: list[Probe], repos: list[str]) -> tuple[int, int]:
    """(segments that changed owner, live segments), over the repositories served, from
    one ready replica per slot of the staged layout."""
    moved = segments = 0
    seen: set[int] = set()
    for probe in probes:
        if probe.status is None or probe.slot in seen:
            continue
        reports = probe.status.get("repos", {})
        if not all(reports.get(r, {}).get("owned") is not None for r in repos):
            continue
        seen.add(probe.slot)
        for repo_id in repos:
            report = reports[repo_id]
            moved += int(report.get("moved_in") or 0)
            segments += int(report["owned"])
    return moved, segments
