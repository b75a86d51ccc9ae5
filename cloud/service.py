"""The HTTP search service: encrypted nearest-neighbour queries over a repository's segments.

It holds no key. It reads index segments from the bucket, keeps them in memory, and
answers a query token with image ids and encrypted-domain scores; it never sees an
image, a feature, a distance or a name.

    python -m cloud.service --owner-key <base64> [--owner-key ...] [--host 127.0.0.1]
    radcrypt serve ...          (the same options, the same function: run_service)

Authentication (cloud/auth.py) runs in the Gate middleware, before any body is parsed:
every /v1/repos/ and /v2/repos/ request must be signed by a member of the repository's
current signed manifest, for this deployment's service id (GET /v1/info). Without an owner
key the service refuses to start, unless --insecure-no-auth is given and it listens on
loopback.

Two wire protocols are served (GET /v1/info lists them): protocol 1, JSON under /v1/, and
protocol 2 (docs/FORMAT-2.md 8, cloud/wire.py), binary under /v2/ with the header
x-radcrypt-protocol: 2, whose answers name the repository's verified log head and the
digest of the segments searched, so that a client can tell a complete answer from one
that left segments out. The owner keys that authenticate requests also verify the
segment logs of format-2 repositories (cloud/repo_index.py).

Operations (issue 14): GET /healthz (alive), GET /readyz (503 "warming" with Retry-After
until the repositories named by --preload / RADCRYPT_SERVICE_REPOS are loaded and their
cache files read into memory; their searches answer the same 503 meanwhile), GET /metrics
(Prometheus text, cloud/metrics.py: no user id, nothing of a query). SIGTERM and SIGINT
stop the service cleanly: open requests finish (up to SHUTDOWN_SECONDS), the buffered
audit entries are written, the cache directory removed, a line logged, exit status 0.
Every refusal is declared in the OpenAPI schema with its body ({"detail": one line}).

The store is configured from the environment (RADCRYPT_S3_ENDPOINT, RADCRYPT_S3_BUCKET,
RADCRYPT_S3_REGION, and the usual AWS credential variables or RADCRYPT_S3_ACCESS_KEY /
RADCRYPT_S3_SECRET_KEY), never from the command line, so credentials do not show in
process listings. RADCRYPT_STORE=directory reads a local directory store instead
(RADCRYPT_STORE_ROOT, else RADCRYPT_DATA_DIR/objects); every store is read through
cloud.backend.Store.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    MutableMapping,
    Sequence,
)
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers

from cloud import codes, cpus, layout, wire
from cloud.audit import AuditLog
from cloud.auth import RateLimiter, SignatureVerifier
from cloud.backend import DirectoryConfig, Store, StoreError
from cloud.ckks_store import CkksScorers
from cloud.ckks_store import decode_request as ckks_decode_request
from cloud.ckks_store import encode_answer as ckks_encode_answer
from cloud.gpu.backend import service_searcher
from cloud.keyword_index import KeywordSource, TokenQuery
from cloud.keyword_store import default_keyword_source
from cloud.keyword_views import KeywordViews
from cloud.limits import MAX_BODY_BYTES, MAX_K, MAX_QUERIES
from cloud.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cloud.metrics import Metrics, RepoFigures
from cloud.repo_index import RepoIndex, Snapshot
from cloud.search import ConcurrentSearches
from cloud.service_options import (
    REFRESH_INTERVAL,
    ServiceConfig,
    add_service_arguments,
    new_service_id,
    service_config,
    validate_service_id,
)
from cloud.store import StoreConfig
from cloud.stores import open_store
from crypto.errors import FormatError
from crypto.tokens import QueryToken

log = logging.getLogger("radcrypt.service")

REPOS_PREFIX = "/v1/repos/"
REPOS_PREFIX_V2 = "/v2/repos/"
PROTOCOL = 1  # the protocol of the /v1/ paths
HEAD_RETRY_SECONDS = 1.0  # see ServiceState._wants_head

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestVerifier(Protocol):
    """Decides who sent a request; raises HTTPException (401, 403, 422, 429, 503) to refuse.

    Called by the Gate middleware with the raw request, before any body parsing."""

    def verify(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
               repo: str | None) -> str: ...


class AllowAnyone:
    """No authentication. Only ever built explicitly: by ``--insecure-no-auth`` on a
    loopback address, or by a test of the search engine itself."""

    def verify(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
               repo: str | None) -> str:
        return "anonymous"


def _repo_of(path: str) -> tuple[bool, str | None]:
    """(is a repository request, the raw repository segment of /v1/repos/<repo>/<action>
    or /v2/repos/<repo>/<action>)."""
    for prefix in (REPOS_PREFIX, REPOS_PREFIX_V2):
        if path.startswith(prefix):
            parts = path[len(prefix):].split("/")
            return True, (parts[0] if len(parts) == 2 and parts[0] else None)
    return False, None


def _protocol_refusal(path: str, header: str | None, body: bytes) -> str | None:
    """Why a request's protocol is not served (the 400's detail), or None. Protocol 1 is
    any /v1/ request without the header (or with "1"); protocol 2 needs the header "2" on
    a /v2/ path, and a search body whose magic and version say 2 (FORMAT-2 8.1)."""
    if header is not None and header not in ("1", "2"):
        shown = header if header.isascii() and header.isdigit() and len(header) <= 9 \
            else repr(header[:20])
        return f"unsupported protocol version {shown}"
    v2_path = path.startswith("/v2/")
    if v2_path and header != "2":
        return ("protocol 2 requests need the header x-radcrypt-protocol: 2"
                if header is None else "unsupported protocol version 1 on a /v2/ path")
    if path.startswith(REPOS_PREFIX) and header == "2":
        return "unsupported protocol version 2 on a /v1/ path"
    if v2_path and path.endswith("/search"):
        claimed = wire.body_protocol(body)
        if claimed is None:
            return "search body is not a protocol 2 request (bad magic bytes)"
        if claimed != wire.PROTOCOL:
            return f"unsupported protocol version {claimed} (header says 2)"
    return None


class Gate:
    """Everything that happens before the application sees a request, in this order:

    1. a token bucket per client address (429), before any authentication;
    2. the body size limit (413), read here so that an oversized chunked body is refused
       before any parser sees it;
    3. the protocol version (400 naming the supported ones, FORMAT-2 8.1): the
       x-radcrypt-protocol header against the path, and a protocol-2 search body's magic
       and version against the header (six public bytes, nothing else of the body);
    4. for every /v1/repos/... and /v2/repos/... request, authentication and authorisation
       by the verifier on the raw body (a bare 401/403: nothing about the body is parsed
       or reported to someone not authenticated);
    5. a JSON body must be UTF-8 (400), then it is replayed to the application, whose
       body models run only now (the binary search body of protocol 2 is decoded by its
       route, cloud/wire.py).

    It also counts for /metrics (cloud/metrics.py): each refusal by stage and status, and
    each search answered with its time from arrival (a search route leaves its number of
    queries in the scope's state); a few microseconds a request, on the event loop.
    """

    def __init__(self, app: ASGIApp, limit: int, verifier: RequestVerifier,
                 address_limiter: RateLimiter | None, metrics: Metrics | None = None) -> None:
        self.app = app
        self.limit = limit
        self.verifier = verifier
        self.address_limiter = address_limiter
        self.metrics = metrics or Metrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        if self.address_limiter is not None:
            client = scope.get("client")
            address = str(client[0]) if client else "unknown"
            if not self.address_limiter.allow(address):
                retry = str(self.address_limiter.retry_after())
                await self._refuse(send, 429, "too many requests", [("retry-after", retry)])
                return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or len(declared) > 12
                                     or int(declared) > self.limit):
            await self._refuse(send, 413, "request body too large")
            return
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.limit:
                await self._refuse(send, 413, "request body too large")
                return
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        path: str = scope.get("path", "")
        headers = Headers(scope=scope)
        refusal = _protocol_refusal(path, headers.get(wire.PROTOCOL_HEADER), body)
        if refusal is not None:
            self.metrics.refuse(400, "gate")
            await _json_error(send, 400, {"detail": refusal, "supported": list(wire.SUPPORTED)})
            return
        guarded, repo = _repo_of(path)
        if guarded:
            method = scope.get("method", "")
            offline = getattr(self.verifier, "verify_offline", None)
            try:
                user = offline(method, path, headers, body, repo) if offline else None
                if user is None:  # the store must be read: not on the event loop
                    user = await run_in_threadpool(self.verifier.verify, method, path,
                                                   headers, body, repo)
            except HTTPException as exc:
                extra = list((exc.headers or {}).items())
                await self._refuse(send, exc.status_code, str(exc.detail), extra, "auth")
                return
            scope.setdefault("state", {})["radcrypt_user"] = user
        try:
            if not path.startswith("/v2/") or not path.endswith(("/search", "/ckks")):
                body.decode("utf-8")
        except UnicodeDecodeError:  # FastAPI would fail on it with a 500 while parsing JSON
            await self._refuse(send, 400, "request body is not UTF-8 JSON")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        status = 0

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, replay, counted)
        if status == 200:
            queries = scope.get("state", {}).get("radcrypt_queries")
            if queries is not None:  # a search route answered
                self.metrics.search(2 if path.startswith("/v2/") else 1, queries,
                                    time.perf_counter() - started)
        elif status >= 400:
            self.metrics.refuse(status)

    async def _refuse(self, send: Send, status: int, text: str,
                      headers: list[tuple[str, str]] | None = None,
                      stage: str = "gate") -> None:
        self.metrics.refuse(status, stage)
        await _plain_error(send, status, text, headers)


async def _plain_error(send: Send, status: int, text: str,
                       headers: list[tuple[str, str]] | None = None) -> None:
    await _json_error(send, status, {"detail": text}, headers)


async def _json_error(send: Send, status: int, content: dict[str, Any],
                      headers: list[tuple[str, str]] | None = None) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            *((k.lower().encode(), v.encode()) for k, v in headers or [])]})
    await send({"type": "http.response.body", "body": body})


TOKEN_PATTERN = r"^[A-Za-z0-9+/]*={0,2}$"


class SearchRequest(BaseModel):
    token: str = Field(
        min_length=4, pattern=TOKEN_PATTERN,  # its length: the body limit (413)
        description="Standard base64 (RFC 4648 section 4, padded) of a QueryToken "
                    "(docs/FORMAT.md 15): 'RCQT', version u8 = 1, levels u8 (0..8), "
                    f"queries u32 (1..{MAX_QUERIES}), reserved u16, the widths u32 of each "
                    "level then of the full vectors (big-endian header), then per level "
                    "and for the full vectors queries x width little-endian float64, every "
                    "number finite. Only a member holding the repository's keys can make "
                    "one whose widths match the segments of its key version.")
    k: int = Field(default=1, ge=1, le=MAX_K, description="nearest images per query")
    key_version: int = Field(ge=1, le=2**31 - 1,
                             description="key version the token was made with")


class ErrorBody(BaseModel):
    """Every refusal's body: one line in plain words (a 401/403 says no more than that)."""

    detail: str


class ProtocolErrorBody(BaseModel):
    """A 400: the request's protocol, header or body encoding is not served."""

    detail: str
    supported: list[int] | None = Field(default=None,
                                        description="protocol versions this service speaks")


_REFUSALS: dict[int, tuple[type[BaseModel], str]] = {
    400: (ProtocolErrorBody, "protocol version not served, or a body that is not UTF-8 JSON"),
    401: (ErrorBody, "not authenticated: missing, malformed, replayed or unverifiable "
                     "signature (the one reason given is a clock skew)"),
    403: (ErrorBody, "authenticated but not a member of this repository"),
    404: (ErrorBody, "no such path"),
    413: (ErrorBody, f"request body over {MAX_BODY_BYTES} bytes"),
    422: (ErrorBody, "the body or a path parameter is invalid (the field is named)"),
    429: (ErrorBody, "rate limit exceeded (per client address or per user); see Retry-After"),
    503: (ErrorBody, "warming up, object store unavailable or replay cache full; see "
                     "Retry-After when present"),
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again",
                                "schema": {"type": "string"}}}


def _refusals(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of the refusals a route can answer."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        model, text = _REFUSALS[code]
        out[code] = {"model": model, "description": text}
        if code in (429, 503):
            out[code]["headers"] = _RETRY_AFTER
    return out


_GATE = (400, 413, 429)  # any path: the Gate answers these before the application
_GUARDED = (*_GATE, 401, 403, 404, 422, 503)
_SIGNATURE_HEADERS = [
    {"name": "x-radcrypt-user", "in": "header", "required": True,
     "description": "the user id ([a-z0-9][a-z0-9-]{0,62}) of an owner-signed user record",
     "schema": {"type": "string"}},
    {"name": "x-radcrypt-time", "in": "header", "required": True,
     "description": "Unix seconds (decimal, at most 12 digits), within 300 s of the "
                    "service's clock", "schema": {"type": "string"}},
    {"name": "x-radcrypt-nonce", "in": "header", "required": True,
     "description": "16..64 ASCII characters, never reused within the window",
     "schema": {"type": "string"}},
    {"name": "x-radcrypt-signature", "in": "header", "required": True,
     "description": "base64 Ed25519 signature over the request (docs/FORMAT.md 16.2; "
                    "cloud/auth.py request_message)", "schema": {"type": "string"}},
]
_PROTOCOL_2_HEADER = {"name": wire.PROTOCOL_HEADER, "in": "header", "required": True,
                      "description": "protocol 2 (docs/FORMAT-2.md 8)",
                      "schema": {"type": "string", "enum": ["2"]}}


def _validation_detail(exc: RequestValidationError) -> str:
    """A body model's refusal in one line naming the fields (never the values sent: a
    token is a function of the query image)."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()))[:80]
        text = str(error.get("msg", "invalid"))[:200]
        if error.get("type") == "string_pattern_mismatch" and where.endswith("token"):
            text = "not valid base64 (standard alphabet, padded)"
        parts.append(f"{where}: {text}")
    return "; ".join(parts) or "invalid request"


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


class RefreshResponseV2(BaseModel):
    head: int
    head_hash: str = Field(description="hex SHA-256 of the verified log head")
    images: int
    segments: int
    key_versions: list[int]
    rejected: dict[str, str]
    log_error: str | None


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description='"ready" or "warming"')
    repositories: int = Field(description="repositories to preload")
    loading: int = Field(description="of those, not loaded and warm yet")


class Info(BaseModel):
    service_id: str
    protocol: int
    protocols: list[int]


class ServiceState:
    """The repositories this process serves, each loaded on first use.

    ``owner_keys`` (the deployment's trusted owner keys) let each repository verify its
    segment log (format 2); without them every repository is served as format 1."""

    def __init__(self, store: Store, refresh_interval: float = REFRESH_INTERVAL,
                 cache_dir: Path | None = None, owner_keys: Sequence[bytes] = (),
                 preload: Sequence[str] = ()) -> None:
        self.store = store
        self.refresh_interval = refresh_interval
        self.cache_dir = cache_dir
        self.owner_keys = tuple(owner_keys)
        self._repos: dict[str, RepoIndex] = {}
        self._unreached: dict[str, float] = {}  # repo -> when a min_head re-read fell short
        self._lock = threading.Lock()
        self.preload = tuple(dict.fromkeys(layout.validate_repo_id(r) for r in preload))
        # The preloaded repositories not loaded and warm yet: their searches answer 503
        # "warming" rather than wait behind the load (a set read on the event loop).
        self.warming: frozenset[str] = frozenset(self.preload)
        self._stop = threading.Event()
        # Given every segment the index accepts (the keyword side keeps its dictionary).
        self.segment_hook: Callable[[str, str, Any], None] | None = None

    def start_preload(self, retry_seconds: float = 2.0) -> threading.Thread | None:
        """Load (and warm, cloud/repo_index.py) every repository of ``preload`` in a
        background thread, one after the other; a repository whose load fails (the store
        unreachable) is tried again every ``retry_seconds`` until it loads or the service
        stops. /readyz answers 200 once ``warming`` is empty."""
        if not self.preload:
            return None

        def load_all() -> None:
            for repo_id in self.preload:
                while not self._stop.is_set():
                    started = time.monotonic()
                    try:
                        snap = self.repo(repo_id).refresh()
                    except Exception as exc:  # the thread must go on
                        log.error("preloading repository %s failed (%s: %s); retrying in "
                                  "%.0f s", repo_id, type(exc).__name__, exc, retry_seconds)
                        self._stop.wait(retry_seconds)
                        continue
                    log.info("repository %s loaded and warm: %d images in %d segments "
                             "(%.1f s)", repo_id, snap.images, snap.segments,
                             time.monotonic() - started)
                    with self._lock:
                        self.warming = self.warming - {repo_id}
                    break

        thread = threading.Thread(target=load_all, name="radcrypt-preload", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def figures(self) -> list[RepoFigures]:
        """The loaded repositories' sizes, for /metrics."""
        with self._lock:
            repos = list(self._repos.items())
        return [RepoFigures(repo_id, index.snapshot.segments, index.snapshot.images,
                            len(index.snapshot.rejected), index.snapshot.head)
                for repo_id, index in repos]

    def repo(self, repo_id: str) -> RepoIndex:
        with self._lock:
            if repo_id not in self._repos:
                index = RepoIndex(self.store, repo_id, self.cache_dir,
                                  owner_keys=self.owner_keys)
                if self.segment_hook is not None and hasattr(index, "on_segment"):
                    hook = self.segment_hook
                    index.on_segment = lambda key, segment: hook(repo_id, key, segment)
                self._repos[repo_id] = index
            return self._repos[repo_id]

    def current(self, repo_id: str, key_version: int | None = None,
                min_head: int = 0) -> Snapshot:
        """The repository's snapshot, re-listed when older than the refresh interval, or
        (at most once a second) when a client asks for a key version it has not seen:
        a key rotation must not leave searches empty until the next interval; and at
        once when a client has verified a log head beyond the snapshot's (FORMAT-2 6.2)."""
        index = self.repo(repo_id)
        if self._wants_head(repo_id, min_head):
            snap = index.refresh(min_head=min_head)
            if snap.head < min_head:  # the log does not (yet) reach it for this service
                with self._lock:
                    self._unreached[repo_id] = time.monotonic()
            return snap
        if self.stale(repo_id, key_version):
            return index.refresh()
        return index.snapshot

    def _wants_head(self, repo_id: str, min_head: int) -> bool:
        """A client verified a head beyond the snapshot's: re-read the log, unless a
        re-read for this repository fell short less than HEAD_RETRY_SECONDS ago (a head
        claimed but not readable must not make every request re-list the log)."""
        if min_head <= self.repo(repo_id).snapshot.head:
            return False
        with self._lock:
            tried = self._unreached.get(repo_id)
        return tried is None or time.monotonic() - tried > HEAD_RETRY_SECONDS

    def fresh(self, repo_id: str, key_version: int | None = None,
              min_head: int = 0) -> Snapshot | None:
        """The snapshot ``current`` would return when it needs no refresh (no store
        read, so the event loop may call it), else None."""
        with self._lock:
            index = self._repos.get(repo_id)
        if index is None or self._wants_head(repo_id, min_head) or self.stale(repo_id,
                                                                              key_version):
            return None
        return index.snapshot

    def stale(self, repo_id: str, key_version: int | None) -> bool:
        snap = self.repo(repo_id).snapshot
        age = time.time() - snap.loaded_at
        unseen = key_version is not None and key_version not in snap.versions
        return age > self.refresh_interval or (unseen and age > 1.0)


def _store_down(exc: StoreError) -> HTTPException:
    return HTTPException(status_code=503, detail=f"object store unavailable: {exc}",
                         headers={"Retry-After": "5"})


def _repo_id(repo: str) -> str:
    try:
        return layout.validate_repo_id(repo)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None


def create_app(
    store: Store,
    verifier: RequestVerifier,
    refresh_interval: float = REFRESH_INTERVAL,
    audit: AuditLog | None = None,
    cache_dir: Path | None = None,
    *,
    service_id: str = "",
    docs: bool = False,
    address_limiter: RateLimiter | None = None,
    owner_keys: Sequence[bytes] | None = None,
    preload: Sequence[str] = (),
    device: str = "cpu",
    keywords: KeywordSource | None = None,
    cluster: Any = None,
) -> FastAPI:
    """The ASGI application; ``verifier`` authenticates every repository request (there
    is no default: a service that answers anyone must say so, with AllowAnyone).
    ``preload``: repositories loaded and warmed at start-up, in the background; /readyz
    answers 503 until they are, and their searches 503 "warming" with Retry-After.
    ``keywords``: where the segments' keyword dictionaries are read (issue 17); by
    default from the store, as the importer writes them (cloud.keyword_store)."""
    # cluster: a cloud.cluster.front.ClusterFront (--ray-address); the repository routes
    # then search and refresh on its shards (docs/SCALING.md)
    trail = audit or AuditLog(store)
    keyword_source = keywords if keywords is not None else default_keyword_source(store)
    keyword_views = KeywordViews(keyword_source)
    service_id = validate_service_id(service_id or new_service_id())
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The scan's compiled loops load (numba: about 0.4 s, much of it holding the
        # GIL) now, in the background, rather than during the first segment load.
        codes.warm_up()
        state.start_preload()
        try:
            yield
        finally:
            state.stop()
            ckks_scorers.close()  # the CKKS worker processes, if any were started
            trail.close()  # the audit entries still buffered are written now

    engine_threads = ConcurrentSearches()  # BLAS threads by searches in flight
    app = FastAPI(title="Radcrypt search service", version="1", lifespan=lifespan,
                  description="Encrypted exact nearest-neighbour search. Holds no key.",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    if owner_keys is None:  # the keys the verifier trusts are those the log is checked with
        owner_keys = list(getattr(verifier, "owner_keys", ()))
    state = ServiceState(store, refresh_interval, cache_dir, owner_keys, preload)
    # cloud.search.search_batch, or on a GPU (cloud/gpu) with the segment files of a
    # directory store loaded straight into device memory; the hook keeps the keyword
    # side's dictionaries (and, on a GPU, notes each accepted segment's SHA-256)
    engine_search, state.segment_hook = service_searcher(
        device, store, state.repo, getattr(keyword_source, "capture", None))
    app.state.radcrypt = state
    app.state.audit = trail
    app.state.service_id = service_id
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 with the declared shape ({"detail": one line}), like every other refusal."""
        return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)

    def not_warming(repo_id: str) -> None:
        if repo_id in state.warming:
            raise HTTPException(status_code=503, detail="warming: the repository's index is "
                                "loading; try again shortly", headers={"Retry-After": "1"})

    def principal(request: Request) -> str:
        """Who the Gate authenticated (it ran before the body was parsed)."""
        user = request.scope.get("state", {}).get("radcrypt_user")
        if not isinstance(user, str):  # never: the Gate guards every /v1/repos/ path
            raise HTTPException(status_code=401, detail="unauthorized")
        return user

    @app.get("/healthz", response_model=Health, responses=_refusals(*_GATE))
    def healthz() -> dict[str, Any]:
        """Alive: the process answers (says nothing of the repositories)."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, responses={
        **_refusals(*_GATE),
        503: {"model": Readiness, "headers": _RETRY_AFTER,
              "description": "the repositories to preload are not all loaded and warm"}})
    def readyz() -> JSONResponse:
        """Ready: every repository the service was asked to preload (--preload) is loaded
        and its cache files warm. Counts only, no repository id. On a cluster front: every
        segment of the live set owned by a ready shard (cloud/cluster/health.py)."""
        if cluster is not None:
            answer: JSONResponse = cluster.readyz()
            return answer
        pending = len(state.warming)
        body = Readiness(status="warming" if pending else "ready",
                         repositories=len(state.preload), loading=pending)
        return JSONResponse(body.model_dump(), status_code=503 if pending else 200,
                            headers={"Retry-After": "1"} if pending else None)

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}},
              "description": "Prometheus text format 0.0.4"},
        **_refusals(*_GATE)})
    def metrics_text() -> PlainTextResponse:
        """Prometheus text (cloud/metrics.py): counters, a latency histogram, sizes per
        repository, memory. No user id, no token, nothing of a query."""
        text = metrics.render(state.figures(), not state.warming if state.preload else None)
        if cluster is not None:  # per shard: segments, rows, last load, query latency
            text += cluster.metrics_text()
        return PlainTextResponse(text, media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/info", response_model=Info, responses=_refusals(*_GATE))
    def info() -> dict[str, Any]:
        """Unauthenticated: the audience a client must name in its signed requests."""
        return {"service_id": service_id, "protocol": PROTOCOL,
                "protocols": list(wire.SUPPORTED)}

    @app.post("/v1/repos/{repo}/refresh", response_model=RefreshResponse,
              responses=_refusals(*_GUARDED),
              openapi_extra={"parameters": _SIGNATURE_HEADERS})
    async def refresh(repo: str, who: str = Depends(principal)) -> RefreshResponse:
        repo_id = _repo_id(repo)
        not_warming(repo_id)
        if cluster is not None:
            return RefreshResponse(**await cluster.refresh_v1(repo_id))
        try:
            snap = await run_in_threadpool(state.repo(repo_id).refresh)
        except StoreError as exc:
            raise _store_down(exc) from None
        return RefreshResponse(images=snap.images, segments=snap.segments,
                               key_versions=sorted(snap.versions),
                               rejected_segments=snap.rejected)

    @app.post("/v1/repos/{repo}/search", response_model=SearchResponse,
              responses=_refusals(*_GUARDED),
              openapi_extra={"parameters": _SIGNATURE_HEADERS})
    async def search_route(repo: str, body: SearchRequest, request: Request,
                           who: str = Depends(principal)) -> SearchResponse:
        repo_id = _repo_id(repo)
        not_warming(repo_id)
        try:
            raw = base64.b64decode(body.token, validate=True)
            token = QueryToken.from_bytes(raw, max_queries=MAX_QUERIES)
        except (binascii.Error, ValueError):
            raise HTTPException(status_code=422, detail="token: not valid base64") from None
        except FormatError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        if cluster is not None:
            return SearchResponse(**await cluster.search_v1(
                repo_id, token, body.k, body.key_version, who, request, trail))
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
            # Every query of the token in one engine call: the first level, which reads
            # every vector, is one pass for the whole batch.
            answers = []
            with engine_threads.running():
                results = engine_search(version.index, token, body.k)
            for result in results:
                hits = [Hit(image_id=version.image_ids[int(p)], score=float(s), rank=r + 1)
                        for r, (p, s) in enumerate(zip(result.positions, result.scores,
                                                       strict=True))]
                answers.append(QueryAnswer(hits=hits, stats=result.stats.as_dict()))
            return answers

        started = time.perf_counter()
        answers = await run_in_threadpool(run)
        elapsed = (time.perf_counter() - started) * 1000
        trail.record(who, repo_id, "search", sum(len(a.hits) for a in answers), elapsed)
        request.scope.setdefault("state", {})["radcrypt_queries"] = len(token)
        log.info("search repo=%s user=%s queries=%d k=%d", repo_id, who, len(token), body.k)
        return SearchResponse(results=answers, images=snap.images, segments=snap.segments)

    @app.post("/v2/repos/{repo}/refresh", response_model=RefreshResponseV2,
              responses=_refusals(*_GUARDED),
              openapi_extra={"parameters": [*_SIGNATURE_HEADERS, _PROTOCOL_2_HEADER]})
    async def refresh_v2(repo: str, who: str = Depends(principal)) -> dict[str, Any]:
        repo_id = _repo_id(repo)
        not_warming(repo_id)
        if cluster is not None:
            return await cluster.refresh(repo_id)
        try:
            snap = await run_in_threadpool(state.repo(repo_id).refresh)
        except StoreError as exc:
            raise _store_down(exc) from None
        return {"head": snap.head, "head_hash": snap.head_hash.hex(), "images": snap.images,
                "segments": snap.segments, "key_versions": sorted(snap.versions),
                "rejected": snap.rejected, "log_error": snap.log_error}

    def vector_answer(repo_id: str, snap: Snapshot, version: Any, req: wire.SearchRequestV2
                      ) -> tuple[wire.SearchAnswerV2, float]:
        """An image search's answer and the engine's seconds (timed in the worker
        thread: engine_us excludes the wait for a thread)."""
        assert req.token is not None
        started = time.perf_counter()
        queries = len(req.token)
        if version is None:
            hits: list[list[tuple[str, float]]] = [[] for _ in range(queries)]
            stats = wire.empty_stats(queries)
        else:
            with engine_threads.running():
                results = engine_search(version.index, req.token, req.k)
            hits = [wire.hits_of(version.image_ids, r.positions, r.scores) for r in results]
            stats = [r.stats.as_dict() for r in results]
        elapsed = time.perf_counter() - started
        seg_ids = snap.segment_ids.get(req.key_version, [])
        digest = snap.set_digests.get(req.key_version) or wire.segment_set_digest(
            repo_id, req.key_version, seg_ids)
        return wire.SearchAnswerV2(
            key_version=req.key_version, k=req.k, segments=len(seg_ids),
            images=len(version.image_ids) if version is not None else 0,
            head_sequence=snap.head, head_hash=snap.head_hash, set_digest=digest,
            engine_us=round(elapsed * 1e6), hits=hits,
            stats=stats if req.flags & wire.FLAG_STATS else None,
            segment_ids=list(seg_ids) if req.flags & wire.FLAG_LIST_SEGMENTS else None
        ), elapsed

    @app.post("/v2/repos/{repo}/search", response_class=Response,
              responses={200: {"content": {wire.ANSWER_MEDIA_TYPE: {"schema": {
                  "type": "string", "format": "binary"}}},
                  "description": "the answer (docs/FORMAT-2.md 8.3)"},
                  **_refusals(*_GUARDED)},
              openapi_extra={"parameters": [*_SIGNATURE_HEADERS, _PROTOCOL_2_HEADER],
                             "requestBody": {"required": True, "content": {
                                 wire.REQUEST_MEDIA_TYPE: {"schema": {
                                     "type": "string", "format": "binary"}}},
                                 "description": "the request (docs/FORMAT-2.md 8.2): magic, "
                                                "version 2, flags, k, key version, min head, "
                                                "[a keyword query section (flag 4)], then a "
                                                "QueryToken (absent with flag 8, keyword-"
                                                "only)"}})
    async def search_v2(repo: str, request: Request,
                        who: str = Depends(principal)) -> Response:
        """Protocol 2 (docs/FORMAT-2.md 8.2, 8.3): binary request and answer, the
        answer naming the log head and the digest of the segments searched. With a
        keyword query (issue 17) the segments' encrypted dictionaries are evaluated on
        its tokens: the image ids themselves (keyword-only), or the exact nearest among
        the matching images (KeywordViews)."""
        repo_id = _repo_id(repo)
        not_warming(repo_id)
        try:
            req = wire.decode_request(await request.body())
        except wire.WireError as exc:
            content: dict[str, Any] = {"detail": exc.detail}
            if exc.status == 400:
                content["supported"] = list(wire.SUPPORTED)
            return JSONResponse(content, status_code=exc.status)
        if cluster is not None:
            return await cluster.search_v2(repo_id, req, who, request, trail)
        snap = state.fresh(repo_id, req.key_version, req.min_head)
        if snap is None:
            try:
                snap = await run_in_threadpool(state.current, repo_id, req.key_version,
                                               req.min_head)
            except StoreError as exc:
                raise _store_down(exc) from None
        version = snap.versions.get(req.key_version)
        queries = req.queries
        if (version is not None and req.token is not None
                and req.token.widths != version.index.widths):
            raise HTTPException(status_code=422,
                                detail="token does not match this repository's key version")
        if req.flags & wire.FLAG_KEYWORDS:
            try:
                keyword_query = TokenQuery.from_bytes(req.keywords)
            except FormatError as exc:
                raise HTTPException(status_code=422, detail=str(exc)) from None
            answer, elapsed = await run_in_threadpool(
                keyword_views.answer, state.repo(repo_id), snap, req, keyword_query,
                engine_threads)
        else:
            answer, elapsed = await run_in_threadpool(vector_answer, repo_id, snap, version, req)
        hits = answer.hits
        trail.record(who, repo_id, "search", sum(len(h) for h in hits), elapsed * 1000)
        log.info("search v2 repo=%s user=%s queries=%d k=%d head=%d", repo_id, who,
                 queries, req.k, snap.head)
        request.scope.setdefault("state", {})["radcrypt_queries"] = queries
        return Response(wire.encode_answer(answer), media_type=wire.ANSWER_MEDIA_TYPE)

    ckks_scorers = CkksScorers(store)

    @app.post("/v2/repos/{repo}/ckks", response_class=Response,
              responses={200: {"content": {"application/octet-stream": {"schema": {
                  "type": "string", "format": "binary"}}},
                  "description": "encrypted scores of every live segment (cloud/ckks_store.py)"},
                  **_refusals(*_GUARDED)},
              openapi_extra={"parameters": [*_SIGNATURE_HEADERS, _PROTOCOL_2_HEADER]})
    async def ckks_v2(repo: str, request: Request, who: str = Depends(principal)) -> Response:
        """Issue 19, search mode ckks: the encrypted scores of every live segment of the
        request's key version that carries a CKKS block, under the public evaluation keys
        whose SHA-256 the client authenticated; the covered segments listed, so the
        client's completeness check holds. Nothing here can decrypt a score. On a
        cluster front the shards score their own segments and the front merges
        (cloud/cluster/ckks.py)."""
        repo_id = _repo_id(repo)
        not_warming(repo_id)
        try:
            req = ckks_decode_request(await request.body())
        except FormatError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        if cluster is not None:  # every shard scores its own segments' blocks
            return await cluster.ckks_v2(repo_id, req, who, request, trail)
        try:
            snap = await run_in_threadpool(state.current, repo_id, req.key_version,
                                           req.min_head)
        except StoreError as exc:
            raise _store_down(exc) from None
        index = state.repo(repo_id)
        seg_ids = list(snap.segment_ids.get(req.key_version, []))

        def run() -> bytes:
            answer = ckks_scorers.answer(repo_id, getattr(index, "_log", None), seg_ids,
                                         snap.head, snap.head_hash, req)
            return ckks_encode_answer(answer)

        started = time.perf_counter()
        try:
            body = await run_in_threadpool(run)
        except FormatError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        except StoreError as exc:
            raise _store_down(exc) from None
        elapsed = time.perf_counter() - started
        trail.record(who, repo_id, "search", 0, elapsed * 1000)
        log.info("search ckks repo=%s user=%s segments=%d head=%d", repo_id, who,
                 len(seg_ids), snap.head)
        request.scope.setdefault("state", {})["radcrypt_queries"] = 1
        return Response(body, media_type="application/octet-stream")

    app.add_middleware(Gate, limit=MAX_BODY_BYTES, verifier=verifier,
                       address_limiter=address_limiter, metrics=metrics)
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


def store_from_env() -> Store:
    """The store this service reads: RADCRYPT_STORE=directory reads a local directory
    store (RADCRYPT_STORE_ROOT, else RADCRYPT_DATA_DIR/objects, else the user data
    dir's radcrypt/objects: where the client's ``--store directory`` writes); anything
    else an S3 store from RADCRYPT_S3_* (store_config_from_env)."""
    env = os.environ
    if env.get("RADCRYPT_STORE") == "directory":
        return open_store(directory_config_from_env())
    return open_store(store_config_from_env())


def directory_config_from_env() -> DirectoryConfig:
    env = os.environ
    if env.get("RADCRYPT_STORE_ROOT"):
        return DirectoryConfig(Path(env["RADCRYPT_STORE_ROOT"]))
    import platformdirs

    data = env.get("RADCRYPT_DATA_DIR") or platformdirs.user_data_dir("radcrypt")
    return DirectoryConfig(Path(data) / "objects")


# --- the one entry point: `python -m cloud.service` and `radcrypt serve` -----------------


def serve(config: ServiceConfig, store: Store) -> None:
    """Run the service until SIGTERM or SIGINT (blocking), then clean up and return.

    uvicorn catches both signals, drains the connections and runs the application's
    shutdown (the audit entries still buffered are written), then raises the signal again
    to itself, which with the default handler would end the process before this
    function's cleanup: so the handlers uvicorn restores and re-raises to are ours, which
    only note the signal. Index arrays are memory-mapped from a private directory under
    the cache root, removed here.
    """
    import uvicorn

    if config.threads is not None:  # the engine's, and the segment conversions'
        cpus.set_threads(config.threads)
    if config.owner_keys:
        verifier: RequestVerifier = SignatureVerifier(
            store, config.owner_keys, config.service_id,
            limiter=RateLimiter(config.user_rate, config.user_burst),
            max_nonces=config.max_nonces)
    else:  # service_config allows this only with --insecure-no-auth on loopback
        log.warning("--insecure-no-auth: the service answers anyone who can reach "
                    "%s:%d without a signature", config.host, config.port)
        verifier = AllowAnyone()
    received: list[int] = []
    previous = _note_signals(received)
    config.cache_root.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=f"index-{os.getpid()}-", dir=config.cache_root))
    cluster, limiter = None, RateLimiter(config.address_rate, config.address_burst)
    if config.ray_address:  # the shards search; nonces and limits shared (docs/SCALING.md)
        from cloud.cluster.front import connect

        cluster, limiter = connect(config, store, verifier)
    try:
        app = create_app(store, verifier, config.refresh_interval, cache_dir=private,
                         service_id=config.service_id, docs=config.docs,
                         address_limiter=limiter, cluster=cluster,
                         preload=() if cluster else config.preload, device=config.device)
        server = uvicorn.Config(
            app, host=config.host, port=config.port, log_level="warning", access_log=False,
            timeout_graceful_shutdown=SHUTDOWN_SECONDS,
            ssl_certfile=str(config.tls_cert) if config.tls_cert else None,
            ssl_keyfile=str(config.tls_key) if config.tls_key else None)
        print(f"search service {config.service_id} on {config.scheme}://{config.host}:"
              f"{config.port}, " + (f"{len(config.owner_keys)} owner key(s)"
                                    if config.owner_keys else "NO AUTHENTICATION")
              + f", {cpus.engine_threads()} engine thread(s), device {config.device}"
              + (f", Ray cluster {config.ray_address}: {config.shards} shard(s) x "
                 f"{config.replicas}" if cluster else ""),
              file=sys.stderr, flush=True)
        if not received:  # a signal before the server listened: stop now
            uvicorn.Server(server).run()
    finally:
        shutil.rmtree(private, ignore_errors=True)
        for number, handler in previous.items():
            signal.signal(number, handler)
    why = f"on {signal.Signals(received[0]).name}" if received else "at its end"
    print(f"search service {config.service_id} stopped {why}: audit flushed, cache files "
          "removed", file=sys.stderr, flush=True)


SHUTDOWN_SECONDS = 10  # open requests get this long to finish after SIGTERM


def _note_signals(received: list[int]) -> dict[int, Any]:
    """Handlers for SIGTERM and SIGINT that only append the signal to ``received`` (see
    serve); the previous handlers, to restore. Only the main thread may set handlers:
    elsewhere (a test running serve in a thread) nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def note(number: int, frame: object) -> None:
        received.append(number)

    return {number: signal.signal(number, note)
            for number in (signal.SIGTERM, signal.SIGINT)}


def run_service(args: argparse.Namespace,
                open_store: Callable[[], AbstractContextManager[Store]] | None = None
                ) -> int:
    """The service as a command: options checked first (exit 2 with one line when it must
    not start), then the store opened (``open_store``, else store_from_env: RADCRYPT_STORE
    and RADCRYPT_S3_*), then served until interrupted."""
    try:
        config = service_config(args)
    except ValueError as exc:
        print(f"radcrypt serve: {exc}", file=sys.stderr)
        return 2
    if open_store is None:
        with nullcontext(store_from_env()) as store:
            serve(config, store)
    else:
        with open_store() as store:
            serve(config, store)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Radcrypt search service (holds no key)")
    add_service_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from cloud.processes import watch_parent_pipe

    watch_parent_pipe()  # started by a client (EmbeddedService): end when it is gone
    return run_service(args)


if __name__ == "__main__":
    raise SystemExit(main())
