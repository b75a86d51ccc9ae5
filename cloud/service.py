"""The HTTP search service: encrypted nearest-neighbour queries over a repository's segments.

It holds no key. It reads index segments from the bucket, keeps them in memory, and
answers a query token with image ids and encrypted-domain scores; it never sees an
image, a feature, a distance or a name. Authentication is one pluggable verifier
(the identity issue plugs Ed25519 request signatures in there).

    python -m cloud.service --host 127.0.0.1 --port 8765

The store is configured from the environment (RADCRYPT_S3_ENDPOINT, RADCRYPT_S3_BUCKET,
RADCRYPT_S3_REGION, and the usual AWS credential variables or RADCRYPT_S3_ACCESS_KEY /
RADCRYPT_S3_SECRET_KEY), never from the command line, so credentials do not show in
process listings.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import platformdirs
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from cloud import codes, layout
from cloud.audit import AuditLog
from cloud.auth import SignatureVerifier, parse_owner_keys
from cloud.repo_index import RepoIndex, Snapshot
from cloud.search import search
from cloud.store import ObjectStore, StoreConfig, StoreError
from crypto.errors import FormatError
from crypto.tokens import QueryToken

log = logging.getLogger("radcrypt.service")

MAX_BODY_BYTES = 1 << 20
MAX_K = 100
MAX_QUERIES = 64
REFRESH_INTERVAL = 5.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestVerifier(Protocol):
    """Decides who sent a request; raises HTTPException(401/403) to refuse it."""

    def verify(self, request: Request, body: bytes, repo_id: str | None) -> str: ...


class AllowAnyone:
    """No authentication: for the single-workstation embedded service until identities."""

    def verify(self, request: Request, body: bytes, repo_id: str | None) -> str:
        return "anonymous"


class BodyLimit:
    """Refuses request bodies over a size (413) or not UTF-8 (400) before any parser."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _plain_error(send, 413, "request body too large")
            return
        # Read the body here, up to the limit, so that an oversized chunked body is
        # refused with 413 before any parser sees it; then replay it to the app.
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.limit:
                await _plain_error(send, 413, "request body too large")
                return
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:  # FastAPI would fail on it with a 500 while parsing JSON
            await _plain_error(send, 400, "request body is not UTF-8 JSON")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _plain_error(send: Send, status: int, text: str) -> None:
    body = ('{"detail":"' + text + '"}').encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class SearchRequest(BaseModel):
    token: str = Field(description="base64 of a QueryToken (crypto/tokens.py) of 1..64 queries")
    k: int = Field(default=1, ge=1, le=MAX_K)
    key_version: int = Field(ge=1, description="key version the token was made with")


class Hit(BaseModel):
    image_id: str
    score: float
    rank: int


class QueryAnswer(BaseModel):
    hits: list[Hit]
    stats: dict[str, Any]


class SearchResponse(BaseModel):
    results: list[QueryAnswer]
    images: int
    segments: int


class RefreshResponse(BaseModel):
    images: int
    segments: int
    key_versions: list[int]
    rejected_segments: dict[str, str]


class ServiceState:
    """The repositories this process serves, each loaded on first use."""

    def __init__(self, store: ObjectStore, refresh_interval: float = REFRESH_INTERVAL,
                 cache_dir: Path | None = None) -> None:
        self.store = store
        self.refresh_interval = refresh_interval
        self.cache_dir = cache_dir
        self._repos: dict[str, RepoIndex] = {}
        self._lock = threading.Lock()

    def repo(self, repo_id: str) -> RepoIndex:
        with self._lock:
            if repo_id not in self._repos:
                self._repos[repo_id] = RepoIndex(self.store, repo_id, self.cache_dir)
            return self._repos[repo_id]

    def current(self, repo_id: str, key_version: int | None = None) -> Snapshot:
        """The repository's snapshot, re-listed when older than the refresh interval, or
        (at most once a second) when a client asks for a key version it has not seen:
        a key rotation must not leave searches empty until the next interval."""
        index = self.repo(repo_id)
        age = time.time() - index.snapshot.loaded_at
        unseen = key_version is not None and key_version not in index.snapshot.versions
        if age > self.refresh_interval or (unseen and age > 1.0):
            return index.refresh()
        return index.snapshot


def _store_down(exc: StoreError) -> HTTPException:
    return HTTPException(status_code=503, detail=f"object store unavailable: {exc}")


def _repo_id(repo: str) -> str:
    try:
        return layout.validate_repo_id(repo)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None


def create_app(
    store: ObjectStore,
    verifier: RequestVerifier | None = None,
    refresh_interval: float = REFRESH_INTERVAL,
    audit: AuditLog | None = None,
    cache_dir: Path | None = None,
) -> FastAPI:
    """The ASGI application; ``verifier`` authenticates every repository request."""
    trail = audit or AuditLog(store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The scan's compiled loops load (numba: about 0.4 s, much of it holding the
        # GIL) now, in the background, rather than during the first segment load.
        codes.warm_up()
        yield
        trail.close()

    app = FastAPI(title="Radcrypt search service", version="1", lifespan=lifespan,
                  description="Encrypted exact nearest-neighbour search. Holds no key.")
    state = ServiceState(store, refresh_interval, cache_dir)
    checker: RequestVerifier = verifier or AllowAnyone()
    app.state.radcrypt = state
    app.state.audit = trail

    async def principal(request: Request, repo: str) -> str:
        body = await request.body()
        return checker.verify(request, body, _repo_id(repo))

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "repositories_loaded": len(state._repos)}

    @app.post("/v1/repos/{repo}/refresh", response_model=RefreshResponse)
    async def refresh(repo: str, who: str = Depends(principal)) -> RefreshResponse:
        try:
            snap = await run_in_threadpool(state.repo(_repo_id(repo)).refresh)
        except StoreError as exc:
            raise _store_down(exc) from None
        return RefreshResponse(images=snap.images, segments=snap.segments,
                               key_versions=sorted(snap.versions),
                               rejected_segments=snap.rejected)

    @app.post("/v1/repos/{repo}/search", response_model=SearchResponse)
    async def search_route(repo: str, body: SearchRequest,
                           who: str = Depends(principal)) -> SearchResponse:
        repo_id = _repo_id(repo)
        try:
            raw = base64.b64decode(body.token, validate=True)
            token = QueryToken.from_bytes(raw, max_queries=MAX_QUERIES)
        except (binascii.Error, ValueError):
            raise HTTPException(status_code=422, detail="token: not valid base64") from None
        except FormatError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        try:
            snap = await run_in_threadpool(state.current, repo_id, body.key_version)
        except StoreError as exc:
            raise _store_down(exc) from None
        version = snap.versions.get(body.key_version)
        if version is None:
            trail.record(who, repo_id, "search", 0, 0.0)
            return SearchResponse(results=[QueryAnswer(hits=[], stats={"vectors": 0})
                                           for _ in range(len(token))],
                                  images=snap.images, segments=snap.segments)
        if token.widths != version.index.widths:
            raise HTTPException(status_code=422,
                                detail="token does not match this repository's key version")

        def run() -> list[QueryAnswer]:
            answers = []
            for qi in range(len(token)):
                result = search(version.index, token.select(qi), body.k)
                hits = [Hit(image_id=version.image_ids[int(p)], score=float(s), rank=r + 1)
                        for r, (p, s) in enumerate(zip(result.positions, result.scores,
                                                       strict=True))]
                answers.append(QueryAnswer(hits=hits, stats=result.stats.as_dict()))
            return answers

        started = time.perf_counter()
        answers = await run_in_threadpool(run)
        elapsed = (time.perf_counter() - started) * 1000
        trail.record(who, repo_id, "search", sum(len(a.hits) for a in answers), elapsed)
        log.info("search repo=%s user=%s queries=%d k=%d", repo_id, who, len(token), body.k)
        return SearchResponse(results=answers, images=snap.images, segments=snap.segments)

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)  # type: ignore[arg-type]
    return app


def store_config_from_env() -> StoreConfig:
    """The store this service reads, from RADCRYPT_S3_* and the usual AWS variables."""
    env = os.environ
    return StoreConfig(
        endpoint_url=env.get("RADCRYPT_S3_ENDPOINT") or None,
        bucket=env.get("RADCRYPT_S3_BUCKET", "radcrypt"),
        region=env.get("RADCRYPT_S3_REGION", "us-east-1"),
        access_key=env.get("RADCRYPT_S3_ACCESS_KEY") or None,
        secret_key=env.get("RADCRYPT_S3_SECRET_KEY") or None,
        profile=env.get("RADCRYPT_S3_PROFILE") or None,
    )


def serve(host: str, port: int, store: ObjectStore,
          verifier: RequestVerifier | None = None, cache_dir: Path | None = None) -> None:
    """Run the service until interrupted (blocking).

    Index arrays are memory-mapped from a private directory under ``cache_dir`` (the
    user cache directory by default), removed when the service stops.
    """
    import uvicorn

    root = cache_dir or Path(platformdirs.user_cache_dir("radcrypt")) / "service"
    root.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=f"index-{os.getpid()}-", dir=root))
    try:
        config = uvicorn.Config(create_app(store, verifier, cache_dir=private), host=host,
                                port=port, log_level="warning", access_log=False)
        uvicorn.Server(config).run()
    finally:
        shutil.rmtree(private, ignore_errors=True)


def verifier_from_keys(store: ObjectStore, owner_keys: str) -> RequestVerifier:
    """Signed requests checked against these owner keys; none given: anyone (with a warning)."""
    keys = parse_owner_keys(owner_keys)
    if not keys:
        log.warning("no owner key configured: the service answers anyone who can reach it")
        return AllowAnyone()
    return SignatureVerifier(store, keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Radcrypt search service (holds no key)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where index arrays are memory-mapped (default: user cache dir)")
    parser.add_argument("--owner-key", action="append", default=[],
                        help="base64 Ed25519 public key of a data owner (repeatable); "
                             "also RADCRYPT_OWNER_KEYS, comma separated")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    store = ObjectStore(store_config_from_env())
    keys = ",".join([*args.owner_key, os.environ.get("RADCRYPT_OWNER_KEYS", "")])
    serve(args.host, args.port, store, verifier_from_keys(store, keys), args.cache_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
