"""The fault proxy itself (tests/faultproxy.py): each fault kind is what a plain client sees.

An upstream HTTP server on 127.0.0.1 counts the requests that reach it; a plain
http.client talks through the proxy. Then the same against SeaweedFS through boto3: the
store's retries carry an object through 30 % faults, and the proxy's counters prove the
faults happened.
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from cloud.backend import ObjectExists
from cloud.store import ObjectStore, StoreConfig

try:
    import s3servers
    from faultproxy import KINDS, FaultPlan, FaultProxy
except ImportError:  # pragma: no cover
    from tests import s3servers
    from tests.faultproxy import KINDS, FaultPlan, FaultProxy


class _Upstream(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Upstream

    def _chunked_body(self) -> bytes:
        """The whole chunked body. Left unread, it made the close after the answer a TCP
        reset that could discard the answer on its way (IncompleteRead, 1 run in ~10)."""
        body = b""
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            body += self.rfile.read(size)
            self.rfile.readline()  # the CRLF after the chunk
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return body

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = self._chunked_body()
        else:
            body = self.rfile.read(length) if length else b""
        with self.server.lock:
            self.server.seen.append((self.command, self.path, body))
        reply = b"echo:" + body
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_PUT = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[_Upstream]:
    server = _Upstream()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _proxy(upstream: _Upstream, plan: FaultPlan, seed: int = 1) -> FaultProxy:
    host, port = upstream.server_address[:2]
    return FaultProxy(f"http://{host}:{port}", plan, seed=seed)


def _request(proxy: FaultProxy, method: str = "PUT", body: bytes = b"hello",
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request(method, "/k", body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_no_faults_forwards_every_request_on_one_connection(upstream: _Upstream) -> None:
    with _proxy(upstream, FaultPlan()) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        for i in range(5):  # keep-alive: each request is counted on its own
            conn.request("PUT", f"/k{i}", body=b"x" * (i * 40000))
            response = conn.getresponse()
            assert response.status == 200
            assert response.read() == b"echo:" + b"x" * (i * 40000)
        conn.close()
        assert proxy.snapshot() == {"requests": 5, "forwarded": 5}
    assert [path for _, path, _ in upstream.seen] == [f"/k{i}" for i in range(5)]


def test_chunked_and_100_continue_bodies_are_relayed(upstream: _Upstream) -> None:
    with _proxy(upstream, FaultPlan()) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("POST", "/chunked", body=iter([b"ab", b"cd"]),
                     encode_chunked=True)
        assert conn.getresponse().read() == b"echo:abcd"  # relayed chunk by chunk, whole
        conn.close()
        status, body = _request(proxy, body=b"z" * 1000, headers={"Expect": "100-continue"})
        assert (status, body) == (200, b"echo:" + b"z" * 1000)


def test_drop_closes_without_answer_and_forwards_nothing(upstream: _Upstream) -> None:
    with _proxy(upstream, FaultPlan(drop=1.0)) as proxy:
        with pytest.raises(http.client.RemoteDisconnected):
            _request(proxy)
        assert proxy.snapshot() == {"requests": 1, "drop": 1}
    assert upstream.seen == []


def test_lose_forwards_then_swallows_the_answer(upstream: _Upstream) -> None:
    with _proxy(upstream, FaultPlan(lose=1.0)) as proxy:
        with pytest.raises(http.client.RemoteDisconnected):
            _request(proxy, body=b"payload")
        assert proxy.snapshot() == {"requests": 1, "lose": 1, "forwarded": 1}
    assert upstream.seen == [("PUT", "/k", b"payload")]  # the server did act on it


def test_reset_is_a_connection_reset(upstream: _Upstream) -> None:
    with _proxy(upstream, FaultPlan(reset=1.0)) as proxy:
        with pytest.raises(ConnectionResetError):
            _request(proxy, method="GET", body=b"")
        assert proxy.snapshot() == {"requests": 1, "reset": 1}
    assert upstream.seen == []


@pytest.mark.parametrize(("kind", "status", "code"),
                         [("error500", 500, b"InternalError"), ("error503", 503, b"SlowDown")])
def test_error_answers_are_s3_errors(upstream: _Upstream, kind: str, status: int,
                                     code: bytes) -> None:
    with _proxy(upstream, FaultPlan(**{kind: 1.0})) as proxy:
        got, body = _request(proxy, body=b"q" * 100000)
        assert got == status and b"<Code>" + code + b"</Code>" in body
        got, body = _request(proxy, body=b"q" * 10, headers={"Expect": "100-continue"})
        assert got == status
        assert proxy.snapshot() == {"requests": 2, kind: 2}
    assert upstream.seen == []


def test_delay_forwards_late(upstream: _Upstream) -> None:
    with _proxy(upstream, FaultPlan(delay=1.0, delay_s=0.3)) as proxy:
        start = time.perf_counter()
        assert _request(proxy) == (200, b"echo:hello")
        assert time.perf_counter() - start >= 0.3
        assert proxy.snapshot() == {"requests": 1, "delay": 1, "forwarded": 1}


def test_the_seed_decides_which_requests_are_faulted(upstream: _Upstream) -> None:
    plan = FaultPlan(error500=0.5)

    def outcomes(seed: int) -> list[int]:
        with _proxy(upstream, plan, seed=seed) as proxy:
            return [_request(proxy)[0] for _ in range(40)]

    first = outcomes(7)
    assert first == outcomes(7)
    assert first != outcomes(8)
    assert 5 < first.count(500) < 35


def test_plan_changes_apply_to_the_next_requests(upstream: _Upstream) -> None:
    with _proxy(upstream, FaultPlan(error503=1.0)) as proxy:
        assert _request(proxy)[0] == 503
        proxy.set_plan(FaultPlan())
        assert _request(proxy)[0] == 200


def test_match_limits_the_faults_to_some_requests(upstream: _Upstream) -> None:
    with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}", FaultPlan(error500=1.0),
                    match=lambda method, target: method == "PUT" and "/packs/" in target
                    ) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("PUT", "/r/segments/1", body=b"s")
        assert conn.getresponse().read() == b"echo:s"
        conn.request("GET", "/r/packs/1")
        assert conn.getresponse().status == 200
        conn.close()
        assert _request_path(proxy, "/r/packs/1") == 500
        assert proxy.snapshot() == {"requests": 3, "forwarded": 2, "error500": 1}


def _request_path(proxy: FaultProxy, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("PUT", path, body=b"p")
        return conn.getresponse().status
    finally:
        conn.close()


def test_plans_are_checked() -> None:
    with pytest.raises(ValueError):
        FaultPlan(drop=0.7, reset=0.7)
    spread = FaultPlan.spread(0.12)
    assert abs(spread.total() - 0.12) < 1e-12
    assert all(abs(getattr(spread, kind) - 0.02) < 1e-12 for kind in KINDS)


def test_the_store_retries_through_faults_against_seaweedfs(
    seaweed_store_config: StoreConfig,
) -> None:
    """boto3's retries carry puts, gets and lists through 30 % faults of every kind; a
    conditional create whose answer was lost is found to be our own write."""
    config = dataclasses.replace(seaweed_store_config, bucket=s3servers.unique_bucket("proxy"))
    ObjectStore(config).ensure_bucket()
    seed = 4  # every kind within the first 100 requests (seed 20261127 gave no 503)
    try:
        with FaultProxy(str(config.endpoint_url), FaultPlan.spread(0.3, delay_s=0.02),
                        seed=seed) as proxy:
            store = ObjectStore(dataclasses.replace(config, endpoint_url=proxy.url),
                                conditional_writes=True)
            for i in range(40):
                store.put(f"radcrypt/t/{i:03d}", bytes([i]) * (1000 + i))
            assert [store.get(f"radcrypt/t/{i:03d}") for i in range(40)] == [
                bytes([i]) * (1000 + i) for i in range(40)]
            assert len(list(store.list_keys("radcrypt/t/"))) == 40
            own_writes = 0
            for i in range(20):  # created once each, whatever answers were lost
                try:
                    store.put(f"radcrypt/c/{i:03d}", b"once %d" % i, if_absent=True)
                except ObjectExists:  # documented (cloud/store.py): the retry found ours
                    assert store.get(f"radcrypt/c/{i:03d}") == b"once %d" % i
                    own_writes += 1
            counts = proxy.snapshot()
        print(f"\nseed {seed}: {counts}; conditional creates whose answer was lost: "
              f"{own_writes}")
        assert all(counts.get(kind, 0) > 0 for kind in KINDS), (seed, counts)
    finally:
        s3servers.drop_bucket(config)
