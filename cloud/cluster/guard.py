"""Replay protection and rate limits shared by every front replica: one Ray actor.

With one front process the nonce cache and the token buckets live in its memory
(cloud/auth.py). With several behind a load balancer, a request captured on its way to one
replica could be replayed to another, and a user could multiply their rate by the number
of replicas; so the fronts ask one guard actor instead (SharedNonces and SharedLimiter
below stand in for NonceCache and RateLimiter in SignatureVerifier and the Gate).

A guard that restarts (its process died) has forgotten the nonces it had seen, so it
refuses every request signed before it started (a 401: the client signs again with a
fresh time), until those leave the window; a request that cannot reach the guard in time
is a 503 "replay guard unavailable", never a request let through unchecked. It has also
forgotten the layout and the repositories served: the fronts tell it again (front.py
``_sync_layout``). It also holds the one resize claim of the deployment (resize.py).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from fastapi import HTTPException

from cloud.auth import WINDOW_SECONDS, NonceCache, NonceCacheFull, RateLimiter

GUARD_SECONDS = 2.0  # the longest a request waits for the guard
CLOCK_SLACK = 1.0  # seconds: a request stamped just before the guard started is accepted


class Guard:
    """The shared state: nonces seen, token buckets by kind ("user", "address"), the
    repositories served (so that a restarted shard knows what to reload) and the current
    layout (generation, shard count) a resize switched to, so that every front replica
    and a restarted shard find it (cloud/cluster/resize.py)."""

    def __init__(self, max_nonces: int, rates: dict[str, tuple[float, float]],
                 window: int = WINDOW_SECONDS) -> None:
        self.started = time.time()
        self.window = window
        self.nonces = NonceCache(max_nonces)
        self.limiters = {kind: RateLimiter(rate, burst) for kind, (rate, burst) in
                         rates.items()}
        self._repos: list[str] = []
        self._layout: tuple[int, int] | None = None
        # the resize running: (front, generation, shards, lapses at, began), monotonic
        self._claim: tuple[str, int, int, float, float] | None = None
        self._lock = threading.Lock()  # the actor runs up to 16 calls at once (threads)

    def add_nonce(self, key: str, expires: float) -> int:
        """1: new; 0: seen (a replay) or signed before this guard started; -n: the cache
        is full, retry after n seconds."""
        issued = expires - self.window - 1
        if issued < self.started - CLOCK_SLACK:
            return 0
        try:
            return 1 if self.nonces.add(key, expires) else 0
        except NonceCacheFull as full:
            return -max(1, full.retry_after)

    def allow(self, kind: str, key: str) -> bool:
        limiter = self.limiters.get(kind)
        return True if limiter is None else limiter.allow(key)

    def note_repo(self, repo_id: str) -> None:
        with self._lock:
            if repo_id not in self._repos:
                self._repos.append(repo_id)

    def repos(self) -> list[str]:
        return list(self._repos)

    def started_at(self) -> float:
        return self.started

    def set_layout(self, generation: int, shards: int) -> bool:
        """Record the layout a front switched to; False (nothing changed) when a layout
        of that generation or a later one is recorded already (two resizes at once)."""
        with self._lock:
            if self._layout is not None and generation <= self._layout[0]:
                return False
            self._layout = (generation, shards)
            return True

    def claim_resize(self, front: str, generation: int, shards: int, seconds: float) -> str:
        """Reserve the deployment's next resize (layout ``generation``) for ``front``
        before it starts anything: "" when granted, else why not. Two fronts resizing at
        once would stage the same generation on the same actors, and the loser's undo
        would abort the winner's staged layout and stop the shard actor it started (the
        actors are found by name). A claim lapses after ``seconds`` (its front died)."""
        now = time.monotonic()
        with self._lock:
            if self._layout is not None and generation <= self._layout[0]:
                return (f"another front resized the deployment meanwhile (now layout "
                        f"{self._layout[0]}, {self._layout[1]} shards)")
            claim = self._claim
            if claim is not None and claim[0] != front and claim[3] > now:
                return (f"another front is resizing the deployment (to {claim[2]} shards, "
                        f"for {now - claim[4]:.0f} s)")
            self._claim = (front, generation, shards, now + seconds, now)
            return ""

    def release_resize(self, front: str) -> None:
        """The resize of ``front`` ended (done or undone)."""
        with self._lock:
            if self._claim is not None and self._claim[0] == front:
                self._claim = None

    def layout(self) -> tuple[int, int] | None:
        """The current (generation, shards); None: never resized (every front's
        --shards holds)."""
        return self._layout


def _unavailable() -> HTTPException:
    return HTTPException(status_code=503, detail="replay guard unavailable, try again",
                         headers={"Retry-After": "1"})


def _ask(ref: Any) -> Any:
    import ray

    try:
        return ray.get(ref, timeout=GUARD_SECONDS)
    except Exception:  # GetTimeoutError, RayActorError: never let a request through
        raise _unavailable() from None


class SharedNonces:
    """NonceCache's interface over the guard actor (SignatureVerifier.nonces)."""

    def __init__(self, guard: Any) -> None:
        self.guard = guard

    def add(self, key: str, expires: float) -> bool:
        verdict = int(_ask(self.guard.add_nonce.remote(key, expires)))
        if verdict < 0:
            raise NonceCacheFull(-verdict)
        return verdict == 1


class SharedLimiter:
    """RateLimiter's interface over the guard actor, for one kind of key."""

    def __init__(self, guard: Any, kind: str, rate: float) -> None:
        self.guard, self.kind, self.rate = guard, kind, rate

    def allow(self, key: str) -> bool:
        return bool(_ask(self.guard.allow.remote(self.kind, key)))

    def retry_after(self) -> int:
        return max(1, math.ceil(1.0 / self.rate)) if self.rate > 0 else 60
