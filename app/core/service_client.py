"""HTTP client of the search service, and the embedded service a command can start.

A request signer plugs in here (the identity issue signs every request with the user's
Ed25519 key); without one, requests go unsigned to a service that allows anyone.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import httpx

from app.core.errors import ServiceError
from cloud.local import stop_process
from cloud.store import StoreConfig
from crypto.tokens import QueryToken

START_TIMEOUT = 60.0


class RequestSigner(Protocol):
    def headers(self, method: str, path: str, body: bytes) -> dict[str, str]: ...


class ServiceClient:
    """Talks to one search service over HTTP; errors become ServiceError in plain words."""

    def __init__(self, base_url: str, signer: RequestSigner | None = None,
                 timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.signer = signer
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        import json

        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"content-type": "application/json"}
        if self.signer is not None:
            headers.update(self.signer.headers("POST", path, body))
        try:
            response = self._http.post(path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ServiceError(f"search service at {self.base_url} is not reachable: "
                               f"{type(exc).__name__}") from None
        if response.status_code in (401, 403):
            raise ServiceError("the search service refused this user (not registered, "
                               "not granted, or access revoked)")
        if response.status_code != 200:
            detail = _detail(response)
            raise ServiceError(f"search service error {response.status_code}: {detail}")
        result: dict[str, Any] = response.json()
        return result

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

    def refresh(self, repo_id: str) -> dict[str, Any]:
        return self._post(f"/v1/repos/{repo_id}/refresh", {})


def _detail(response: httpx.Response) -> str:
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
    through its environment, never its command line.
    """

    def __init__(self, store: StoreConfig, log_dir: Path,
                 owner_keys: list[bytes] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update({
            "RADCRYPT_S3_ENDPOINT": store.endpoint_url or "",
            "RADCRYPT_S3_BUCKET": store.bucket,
            "RADCRYPT_S3_REGION": store.region,
            "RADCRYPT_S3_ACCESS_KEY": store.access_key or "",
            "RADCRYPT_S3_SECRET_KEY": store.secret_key or "",
            "RADCRYPT_S3_PROFILE": store.profile or "",
            "RADCRYPT_OWNER_KEYS": ",".join(base64.b64encode(k).decode()
                                            for k in owner_keys or []),
        })
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(log_dir / "service.log", "ab")  # closed in stop()
        root = Path(__file__).resolve().parents[2]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cloud.service", "--host", "127.0.0.1",
             "--port", str(self.port)],
            env=env, cwd=root, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT,
        )
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

    def stop(self) -> None:
        stop_process(self.process, "the search service")
        self._log.close()
