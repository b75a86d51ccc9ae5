"""The search client's keep-alive POST (app/core/http_keepalive.py) against a real HTTP
server on 127.0.0.1: the connection is reused, a connection the server closed while idle
is replaced and the request signed afresh, threads do not share a connection, and a
configured proxy sends requests back through httpx."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

from app.core.errors import ServiceError
from app.core.http_keepalive import KeepAlivePoster, StaleConnection, usable_for
from app.core.service_client import ServiceClient


class _Recorder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[int, str, bytes]]] = []  # (client port, nonce, body)
    sockets: ClassVar[list[socket.socket]] = []  # the server's side of each connection

    def do_POST(self) -> None:
        self.sockets.append(self.connection)
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        self.seen.append((self.client_address[1], self.headers.get("x-radcrypt-nonce", ""),
                          body))
        answer = b'{"ok": true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    _Recorder.seen = []
    _Recorder.sockets = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _close_idle_connections() -> None:
    """What a server's idle timeout does: its side of every connection goes away."""
    for sock in _Recorder.sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _url(httpd: http.server.ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def test_one_connection_carries_successive_posts(server: http.server.ThreadingHTTPServer
                                                 ) -> None:
    poster = KeepAlivePoster(_url(server), timeout=5.0)
    for i in range(3):
        answer = poster.post("/x", f"body {i}".encode(), {"content-type": "text/plain"})
        assert answer.status_code == 200 and answer.json() == {"ok": True}
        assert answer.headers["content-type"] == "application/json"
    ports = {port for port, _, _ in _Recorder.seen}
    assert len(_Recorder.seen) == 3 and len(ports) == 1
    poster.close()


def test_threads_do_not_share_a_connection(server: http.server.ThreadingHTTPServer) -> None:
    poster = KeepAlivePoster(_url(server), timeout=5.0)
    poster.post("/x", b"main", {})
    other = threading.Thread(target=lambda: poster.post("/x", b"thread", {}))
    other.start()
    other.join()
    assert len({port for port, _, _ in _Recorder.seen}) == 2
    poster.close()


def test_a_connection_closed_while_idle_is_reported_stale(
        server: http.server.ThreadingHTTPServer) -> None:
    poster = KeepAlivePoster(_url(server), timeout=5.0)
    poster.post("/x", b"first", {})
    _close_idle_connections()
    with pytest.raises(StaleConnection):
        poster.post("/x", b"second", {})
    assert poster.post("/x", b"third", {}).status_code == 200  # a new connection
    poster.close()


class _CountingSigner:
    def __init__(self) -> None:
        self.calls = 0

    def headers(self, method: str, path: str, body: bytes, service_id: str,
                protocol: int = 1) -> dict[str, str]:
        self.calls += 1
        return {"x-radcrypt-nonce": f"nonce-{self.calls}"}


def test_the_client_resends_a_stale_request_signed_afresh(
        server: http.server.ThreadingHTTPServer) -> None:
    signer = _CountingSigner()
    client = ServiceClient(_url(server), signer=signer, service_id="svc-test")
    assert client._poster is not None
    client._exchange("/v2/repos/r/refresh", b"{}", protocol=2)
    _close_idle_connections()
    client._exchange("/v2/repos/r/refresh", b"{}", protocol=2)
    nonces = [nonce for _, nonce, _ in _Recorder.seen]
    assert nonces == ["nonce-1", "nonce-3"]  # nonce-2 went to the closed connection
    client.close()


def test_an_unreachable_service_is_a_plain_error() -> None:
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder) as httpd:
        url = _url(httpd)  # closed again: nothing listens on the port now
    client = ServiceClient(url, service_id="svc-test")
    with pytest.raises(ServiceError, match="not reachable"):
        client._exchange("/v2/repos/r/refresh", b"{}", protocol=2)


def test_a_configured_proxy_keeps_requests_on_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert usable_for("http://search.hospital.example:8000")
    monkeypatch.setenv("http_proxy", "http://proxy.hospital.example:3128")
    assert not usable_for("http://search.hospital.example:8000")
    assert ServiceClient("http://search.hospital.example:8000")._poster is None
    monkeypatch.setenv("no_proxy", "search.hospital.example")
    assert usable_for("http://search.hospital.example:8000")
    assert not usable_for("ftp://search.hospital.example")
