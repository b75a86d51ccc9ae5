"""A lean keep-alive HTTP/1.1 POST for the search service's hot path.

Why not httpx for searches: measured on the 2-core development machine at 100,000
images (bench/e2e.py), httpx spent about 1 ms more per keep-alive POST than the
standard library's http.client on the same signed request (median overhead 3.3 ms
against 2.2 ms); a search is one small binary body and one small binary answer, so
that millisecond was a third of the service's whole overhead. httpx stays for
everything else (info, health, a test's ASGI client, a configured proxy).

One connection per thread: http.client connections are not thread-safe, and the GUI
searches from worker threads while the CLI uses one. A connection the server closed
while idle is detected when it is reused and the request is sent again once on a new
connection (``StaleConnection``, so the caller can sign the retry afresh: a signed
request's nonce is used once).
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any


class StaleConnection(Exception):
    """A kept-alive connection turned out closed before any answer came back."""


class PostResponse:
    """The parts of an answer the service client reads (httpx.Response's names)."""

    def __init__(self, status_code: int, headers: Mapping[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = {name.lower(): value for name, value in headers.items()}
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


def usable_for(base_url: str) -> bool:
    """Whether requests to ``base_url`` may bypass httpx: http or https, and no proxy
    configured for that host in the environment (httpx honours HTTP(S)_PROXY; this
    transport does not, so it must not be used where one applies)."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    proxies = urllib.request.getproxies()
    if parts.scheme not in proxies and "all" not in proxies:
        return True
    return bool(urllib.request.proxy_bypass(parts.hostname))


class KeepAlivePoster:
    """POSTs to one base URL over one kept-alive connection per thread."""

    def __init__(self, base_url: str, timeout: float,
                 verify: bool | ssl.SSLContext = True) -> None:
        parts = urllib.parse.urlsplit(base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._timeout = timeout
        self._context: ssl.SSLContext | None = None
        if self._https:
            if isinstance(verify, ssl.SSLContext):
                self._context = verify
            elif verify:
                self._context = ssl.create_default_context()
            else:
                self._context = ssl._create_unverified_context()  # the caller asked for it
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it was used before."""
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                               context=self._context)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
        return conn, False

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)

    def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> PostResponse:
        """One POST. StaleConnection: a reused connection was found closed before an
        answer (send it again, signed afresh); OSError or http.client.HTTPException:
        the service could not be reached or broke the answer off."""
        conn, reused = self._connection()
        try:
            conn.request("POST", self._prefix + path, body=body, headers=dict(headers))
            answer = conn.getresponse()
            content = answer.read()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                http.client.CannotSendRequest) as exc:
            self._drop()
            if reused:
                raise StaleConnection() from exc
            raise
        except (OSError, http.client.HTTPException):
            self._drop()
            raise
        if answer.will_close:
            self._drop()
        return PostResponse(answer.status, dict(answer.getheaders()), content)

    def close(self) -> None:
        with self._lock:
            connections, self._all = self._all, []
        for conn in connections:
            conn.close()
