"""HTTP client of the search service, and the embedded service a command can start.

Requests are signed by the user's identity (app/core/identity.py RequestSigner) for the
service's id, learnt from its unauthenticated GET /v1/info (or given): a signed request
names the deployment it is for. Without a signer, requests go unsigned, which only a
service started with --insecure-no-auth on loopback answers.

Searches use wire protocol 2 (cloud/wire.py, docs/FORMAT-2.md 8): a binary body
and answer, signed as "radcrypt-request-v3". Requests go over connections kept alive
between them (app/core/http_keepalive.py for POSTs, one httpx.Client for the rest), so
a search costs one round trip, not a TCP setup.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import http.client
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.core.errors import ServiceError
from app.core.http_keepalive import KeepAlivePoster, PostResponse, StaleConnection, usable_for
from cloud import wire
from cloud.backend import DirectoryConfig
from cloud.keyword_index import TokenQuery
from cloud.processes import start_watched, stop_process
from cloud.store import StoreConfig
from crypto.tokens import QueryToken

START_TIMEOUT = 60.0

Answer = httpx.Response | PostResponse  # what a POST to the service gives back


class RequestSigner(Protocol):
    """Signs a request for one service and one protocol version (app.core.identity)."""

    def headers(self, method: str, path: str, body: bytes, service_id: str,
                protocol: int = 1) -> dict[str, str]: ...


class _Signs(Protocol):
    """What signs a request: crypto.identity.Identity."""

    @property
    def user_id(self) -> str: ...

    @property
    def sign_private(self) -> bytes: ...


def signed_headers(identity: _Signs, method: str, path: str, body: bytes, service_id: str,
                   protocol: int = 1) -> dict[str, str]:
    """The four x-radcrypt-* authentication headers of one request, signed with the
    message of ``protocol`` (cloud.auth.request_message: v2 for protocol 1, v3 for 2).

    Ed25519 through `cryptography` (OpenSSL, about 0.05 ms) rather than Identity.sign
    (pure Python, about 2 ms): the same deterministic signature (RFC 8032), made on every
    search."""
    from cloud.auth import request_message

    stamp = str(int(time.time()))
    nonce = secrets.token_hex(16)
    message = request_message(method, path, hashlib.sha256(body).hexdigest(), stamp, nonce,
                              identity.user_id, service_id, protocol)
    signature = Ed25519PrivateKey.from_private_bytes(identity.sign_private).sign(message)
    return {"x-radcrypt-user": identity.user_id, "x-radcrypt-time": stamp,
            "x-radcrypt-nonce": nonce,
            "x-radcrypt-signature": base64.b64encode(signature).decode()}


class ServiceClient:
    """Talks to one search service over HTTP; errors become ServiceError in plain words.

    ``service_id``: the deployment the requests are signed for; None asks the service
    (GET /v1/info) on the first signed request, and again once if a request is refused
    (the service restarted with another id)."""

    def __init__(self, base_url: str, signer: RequestSigner | None = None,
                 timeout: float = 60.0, service_id: str | None = None,
                 verify: bool | str | ssl.SSLContext = True,
                 http: httpx.Client | None = None) -> None:
        """``verify``: TLS certificate checks (a str: a CA bundle file to trust).
        ``http``: the HTTP client to send through (a test's ASGI client); by default one
        httpx.Client whose connections are kept alive between searches."""
        self.base_url = base_url.rstrip("/")
        self.signer = signer
        self._pinned = service_id is not None
        self.service_id = service_id
        if isinstance(verify, str):
            verify = ssl.create_default_context(cafile=verify)
        self._http = http or httpx.Client(base_url=self.base_url, timeout=timeout,
                                          verify=verify)
        self._poster = (KeepAlivePoster(self.base_url, timeout, verify)
                        if http is None and usable_for(self.base_url) else None)

    def close(self) -> None:
        self._http.close()
        if self._poster is not None:
            self._poster.close()

    def info(self) -> dict[str, Any]:
        """The service's id and protocol (unauthenticated)."""
        try:
            response = self._http.get("/v1/info", timeout=10.0)
        except httpx.HTTPError as exc:
            raise ServiceError(f"search service at {self.base_url} is not reachable: "
                               f"{type(exc).__name__}") from None
        if response.status_code != 200:
            raise ServiceError(f"search service at {self.base_url} does not say who it is "
                               f"(GET /v1/info answered {response.status_code}): it may be "
                               "too old for this client")
        try:
            result: dict[str, Any] = response.json()
            from cloud.service_options import validate_service_id

            validate_service_id(result.get("service_id"))
        except (ValueError, AttributeError):
            raise ServiceError(f"search service at {self.base_url} gave a malformed "
                               "/v1/info answer") from None
        return result

    def _audience(self, refetch: bool = False) -> str:
        if self.service_id is None or (refetch and not self._pinned):
            self.service_id = str(self.info()["service_id"])
        return self.service_id

    def _sign(self, path: str, body: bytes, audience: str, protocol: int) -> dict[str, str]:
        assert self.signer is not None
        return self.signer.headers("POST", path, body, audience, protocol)

    def _send(self, path: str, body: bytes, refetch: bool = False,
              protocol: int = 1) -> Answer:
        headers = {"content-type": "application/json"}
        if protocol != 1:
            headers[wire.PROTOCOL_HEADER] = str(protocol)
            if path.endswith("/search"):
                headers["content-type"] = wire.REQUEST_MEDIA_TYPE
        if self.signer is not None:
            headers.update(self._sign(path, body, self._audience(refetch), protocol))
        if self._poster is not None:
            return self._post_kept_alive(path, body, headers)
        try:
            return self._http.post(path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ServiceError(f"search service at {self.base_url} is not reachable: "
                               f"{type(exc).__name__}") from None

    def _post_kept_alive(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        """The POST over this thread's kept-alive connection; once more, signed afresh,
        when the service had closed that connection while it was idle."""
        assert self._poster is not None
        try:
            try:
                return self._poster.post(path, body, headers)
            except StaleConnection:
                if self.signer is not None:
                    headers.update(self._sign(path, body, self._audience(), int(
                        headers.get(wire.PROTOCOL_HEADER, "1"))))
                return self._poster.post(path, body, headers)
        except (OSError, http.client.HTTPException, StaleConnection) as exc:
            raise ServiceError(f"search service at {self.base_url} is not reachable: "
                               f"{type(exc).__name__}") from None

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(payload, separators=(",", ":")).encode()
        response = self._exchange(path, body)
        result: dict[str, Any] = response.json()
        return result

    def _exchange(self, path: str, body: bytes, protocol: int = 1) -> Answer:
        """POST a body; the 200 response, or ServiceError in plain words."""
        response = self._send(path, body, protocol=protocol)
        if response.status_code == 401 and self.signer is not None and not self._pinned:
            known = self.service_id
            if self._audience(refetch=True) != known:  # the service restarted: a new id
                response = self._send(path, body, protocol=protocol)
        if response.status_code == 400 and protocol != 1:
            supported = _supported(response)
            if supported is not None and protocol not in supported:
                raise ServiceError(f"the search service at {self.base_url} does not speak "
                                   f"protocol {protocol} (it supports {supported}): it is "
                                   "older than this client; upgrade it")
        if response.status_code == 401 and _detail(response).startswith(
                "the request's time is"):  # the one 401 with a reason (cloud/auth.py)
            raise ServiceError(f"the search service refused the request: "
                               f"{_detail(response)[:300]}")
        if response.status_code in (401, 403):
            raise ServiceError("the search service refused this user (not registered, "
                               "not a member of this repository, or access revoked)")
        if response.status_code == 503 and _detail(response).startswith("warming"):
            wait = response.headers.get("retry-after", "a few")
            raise ServiceError("the search service is still loading this repository's "
                               f"index; try again in {wait} seconds")
        if response.status_code in (429, 503):
            wait = response.headers.get("retry-after", "a few")
            raise ServiceError(f"the search service is busy ({response.status_code}); try "
                               f"again in {wait} seconds")
        if response.status_code != 200:
            detail = _detail(response)
            raise ServiceError(f"search service error {response.status_code}: {detail}")
        return response

    def health(self) -> dict[str, Any]:
        try:
            response = self._http.get("/healthz", timeout=5.0)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise ServiceError(f"search service at {self.base_url} is not healthy: "
                               f"{type(exc).__name__}") from None
        result: dict[str, Any] = response.json()
        return result

    def search(self, repo_id: str, token: QueryToken, k: int, key_version: int
               ) -> dict[str, Any]:
        payload = {"token": base64.b64encode(token.to_bytes()).decode(), "k": k,
                   "key_version": key_version}
        return self._post(f"/v1/repos/{repo_id}/search", payload)

    def search_v2(self, repo_id: str, token: QueryToken | None, k: int, key_version: int, *,
                  min_head: int = 0, list_segments: bool = False,
                  stats: bool = True, keywords: TokenQuery | None = None
                  ) -> wire.SearchAnswerV2:
        """One protocol-2 search of ``len(token)`` queries (at most cloud.limits
        MAX_QUERIES): the hits, the service's log head and the digest of the segments it
        searched (with their ids when ``list_segments``), and per-query engine statistics
        when ``stats``. A malformed answer is a ServiceError, never a partial result.

        ``keywords`` (issue 17): the keyword query's tokens travel in the same signed
        request; with a token the engine ranks only the matching images (a combined
        query), with ``token`` None the answer is the matching image ids themselves (at
        most ``k``, up to cloud.wire.MAX_KEYWORD_HITS) and how many matched."""
        if token is None and keywords is None:
            raise ValueError("a search needs a query token, keywords, or both")
        flags = (wire.FLAG_LIST_SEGMENTS if list_segments else 0) | (
            wire.FLAG_STATS if stats else 0)
        raw_keywords = b""
        if keywords is not None:
            flags |= wire.FLAG_KEYWORDS | (wire.FLAG_KEYWORDS_ONLY if token is None else 0)
            raw_keywords = keywords.to_bytes()
        body = wire.encode_request(wire.SearchRequestV2(key_version, k, min_head, flags,
                                                        token, raw_keywords))
        response = self._exchange(f"/v2/repos/{repo_id}/search", body, protocol=wire.PROTOCOL)
        queries = 1 if token is None else len(token)
        try:
            answer = wire.decode_answer(response.content, queries=queries, k=k,
                                        key_version=key_version, repo_id=repo_id,
                                        keywords=keywords is not None)
        except wire.WireError as exc:
            raise ServiceError(f"the search service at {self.base_url} sent a "
                               f"{exc.detail}") from None
        if list_segments and answer.segment_ids is None:
            raise ServiceError(f"the search service at {self.base_url} sent a malformed "
                               "answer: the segment list asked for is missing")
        if stats and answer.stats is None:
            raise ServiceError(f"the search service at {self.base_url} sent a malformed "
                               "answer: the statistics asked for are missing")
        return answer

    def refresh(self, repo_id: str) -> dict[str, Any]:
        return self._post(f"/v1/repos/{repo_id}/refresh", {})

    def refresh_v2(self, repo_id: str) -> dict[str, Any]:
        """Re-read the repository now; its log head, images, segments (FORMAT-2 8.1)."""
        response = self._exchange(f"/v2/repos/{repo_id}/refresh", b"{}",
                                  protocol=wire.PROTOCOL)
        result: dict[str, Any] = response.json()
        return result


def _supported(response: Answer) -> list[int] | None:
    """The protocol versions a 400 answer says the service supports."""
    try:
        supported = response.json().get("supported")
    except (ValueError, AttributeError):
        return None
    if isinstance(supported, list) and all(type(v) is int for v in supported):
        return supported
    return None


def _detail(response: Answer) -> str:
    try:
        detail = response.json().get("detail", "")
    except ValueError:
        detail = response.text[:200]
    return str(detail)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedService:
    """The search service as a child process on 127.0.0.1, stopped by PID.

    A separate process, not a thread: the service must never share memory with the
    client that holds the keys, even on one workstation. Store credentials reach it
    through its environment, never its command line. It never outlives this process:
    ``stop`` (called by Session.close and, as a last resort, at exit) stops it, and a
    client killed outright closes the pipe the service watches.
    """

    def __init__(self, store: StoreConfig | DirectoryConfig, log_dir: Path,
                 owner_keys: list[bytes] | None = None,
                 options: Sequence[str] = ()) -> None:
        """``options``: more command-line options of the service (bench/load.py sets its
        rate limits above the load)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.service_id = "embedded-" + secrets.token_hex(8)
        self.owner_keys = list(owner_keys or [])
        env = dict(os.environ)
        if isinstance(store, DirectoryConfig):  # cloud.service.store_from_env reads these
            env.update({"RADCRYPT_STORE": "directory", "RADCRYPT_STORE_ROOT": str(store.root)})
        else:
            env.update({
                "RADCRYPT_STORE": "s3",
                "RADCRYPT_S3_ENDPOINT": store.endpoint_url or "",
                "RADCRYPT_S3_BUCKET": store.bucket,
                "RADCRYPT_S3_REGION": store.region,
                "RADCRYPT_S3_ACCESS_KEY": store.access_key or "",
                "RADCRYPT_S3_SECRET_KEY": store.secret_key or "",
                "RADCRYPT_S3_PROFILE": store.profile or "",
            })
        env.update({
            "RADCRYPT_OWNER_KEYS": ",".join(base64.b64encode(k).decode()
                                            for k in owner_keys or []),
        })
        # The BLAS's threads are limited by the service itself while searches overlap
        # (cloud/search.py ConcurrentSearches); a variable here would cap a lone search too.
        # glibc gives each thread that allocates its own arena (8 per core); two keep the
        # service's memory flat under concurrent searches (bench/load.py at 100k images:
        # about 500 MiB instead of 600, no slower).
        env.setdefault("MALLOC_ARENA_MAX", "2")
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(log_dir / "service.log", "ab")  # closed in stop()
        root = Path(__file__).resolve().parents[2]
        # It trusts the owner keys it is given (the identity's own and the owners this
        # workstation pinned). With none (no identity: a password-locked repository of
        # before identities), it answers only this machine, and says so in its log.
        command = [sys.executable, "-m", "cloud.service", "--host", "127.0.0.1",
                   "--port", str(self.port), "--service-id", self.service_id]
        if not owner_keys:
            command.append("--insecure-no-auth")
        command.extend(options)
        # Its stdin is a pipe only we hold: it exits when we are gone, even after a
        # SIGKILL that runs none of our cleanup (cloud.processes.watch_parent_pipe).
        self.process = start_watched(command, env=env, cwd=root, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        _RUNNING.add(self)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise ServiceError("the embedded search service exited at start-up; "
                                   "see service.log in the data directory")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise ServiceError("the embedded search service did not start within "
                           f"{START_TIMEOUT:.0f} s")

    def trusts(self, owner_keys: list[bytes]) -> bool:
        """Whether it was started trusting every one of these owner keys."""
        return all(key in self.owner_keys for key in owner_keys)

    def stop(self) -> None:
        _RUNNING.discard(self)
        stop_process(self.process, "the search service")
        self._log.close()


_RUNNING: set[EmbeddedService] = set()  # started here and not stopped yet


@atexit.register
def _stop_all_at_exit() -> None:
    """A command that ends without closing its session (an uncaught error, SIGTERM turned
    into SystemExit) still stops the services it started."""
    for service in list(_RUNNING):
        with contextlib.suppress(Exception):
            service.stop()
