"""A fault-injecting HTTP proxy on 127.0.0.1, between a client and an S3 server.

Why: the store's retries (botocore, standard mode, 8 attempts), the importer's commit
order and the search service's refresh are only proved by failures of the real kind: a
connection closed without an answer, a reset, a 500 or 503, a slow answer, and the worst
one, a request the server carried out whose answer never came back (a retried
conditional create then finds its own object). Mocking botocore would prove nothing of
that, so the tests put this proxy in front of SeaweedFS's S3 port.

It is HTTP-aware only as far as it must be to act per request: it reads each request's
head and body (Content-Length or chunked) from the client, decides whether that request
is faulted with a seeded random generator (which fault by the plan's shares), and
otherwise relays bytes both ways (so 100-continue works). Each client connection gets
its own upstream connection. Counters say what was injected, so a test can prove the
faults happened. Threads, not asyncio: the tests that use it are synchronous and the
proxy must run beside them.

Fault kinds (FaultPlan): ``drop`` closes the connection without forwarding or answering;
``lose`` forwards the request and swallows the server's answer, then closes; ``reset``
closes with an RST (SO_LINGER 0) without forwarding; ``error500``/``error503`` answer an
S3-style XML error without forwarding; ``delay`` waits ``delay_s`` and then forwards.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields
from urllib.parse import urlsplit

KINDS = ("drop", "lose", "reset", "error500", "error503", "delay")
MAX_HEAD = 64 * 1024
_ERRORS = {
    "error500": (500, "Internal Server Error", "InternalError"),
    "error503": (503, "Service Unavailable", "SlowDown"),
}


@dataclass(frozen=True)
class FaultPlan:
    """Fraction of requests given each fault (their sum at most 1)."""

    drop: float = 0.0
    lose: float = 0.0
    reset: float = 0.0
    error500: float = 0.0
    error503: float = 0.0
    delay: float = 0.0
    delay_s: float = 0.2

    def __post_init__(self) -> None:
        total = sum(getattr(self, kind) for kind in KINDS)
        if any(getattr(self, kind) < 0 for kind in KINDS) or total > 1.0 + 1e-9:
            raise ValueError(f"fault fractions must be >= 0 and sum to at most 1 ({self})")

    @classmethod
    def spread(cls, fraction: float, delay_s: float = 0.05,
               kinds: tuple[str, ...] = KINDS) -> FaultPlan:
        """``fraction`` of the requests faulted, evenly over ``kinds``."""
        share = fraction / len(kinds)
        return cls(**{kind: share for kind in kinds}, delay_s=delay_s)

    def total(self) -> float:
        return sum(getattr(self, kind) for kind in KINDS)

    def describe(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name):g}" for f in fields(self)
                 if getattr(self, f.name)]
        return ", ".join(parts) or "no faults"


class FaultProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``upstream`` (http://host:port).

    ``counts``: "requests" (every request head read), "forwarded" (relayed to the
    server, ``lose`` included), and one per fault kind injected. ``set_plan`` changes the
    plan for the requests that follow (a burst of 100 % faults, then none). ``match``:
    which requests may be faulted, by method and target (e.g. only PUTs of packs); the
    others are forwarded untouched (and draw no random number).
    """

    def __init__(self, upstream: str, plan: FaultPlan | None = None, seed: int = 0,
                 match: Callable[[str, str], bool] | None = None) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self.seed = seed
        self._plan = plan or FaultPlan()
        self.match = match
        self._rng = random.Random(seed)
        self._under_plan: Counter[str] = Counter()  # faults of each kind since set_plan
        self._eligible = 0  # requests that could be faulted since set_plan
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # accept() wakes up to see close()
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._closing = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy-accept",
                                        daemon=True)
        self._thread.start()

    # --- control ------------------------------------------------------------------------

    @property
    def plan(self) -> FaultPlan:
        with self._lock:
            return self._plan

    def set_plan(self, plan: FaultPlan) -> None:
        with self._lock:
            self._plan = plan
            self._under_plan = Counter()
            self._eligible = 0

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def injected(self) -> int:
        """How many requests were given a fault of any kind."""
        with self._lock:
            return sum(self.counts[kind] for kind in KINDS)

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            _close(sock)
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def _choose(self, method: str, target: str) -> tuple[str | None, float]:
        with self._lock:
            plan = self._plan
            self.counts["requests"] += 1
            if self.match is not None and not self.match(method, target):
                return None, plan.delay_s
            total = plan.total()
            self._eligible += 1
            faulted = sum(self._under_plan.values())
            # Whether a request is faulted is random, except that the faults never fall
            # below 60 % of the plan's share of the requests so far (a request is then
            # faulted to catch up): a binomial draw gave 12 faults in 251 requests at
            # 10 % (seed 701923, about 3 runs in 1,000), under the half a test asserts
            # to prove the faults were there.
            behind = faulted + 1 < 0.6 * total * self._eligible
            if not behind and self._rng.random() >= total:
                return None, plan.delay_s
            # Which fault: the kind furthest below its share of the faults so far (ties
            # in KINDS order): every kind of the plan comes early whatever the seed. A
            # random kind left one out in about 1 % of 270-request imports (five kinds
            # of 1.7 % each).
            faults = faulted + 1
            kind = max((k for k in KINDS if getattr(plan, k) > 0),
                       key=lambda k: getattr(plan, k) / total * faults - self._under_plan[k])
            self._under_plan[kind] += 1
            self.counts[kind] += 1
            return kind, plan.delay_s

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        _close(sock)

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            self._track(client)
            threading.Thread(target=self._serve, args=(client,), name="faultproxy-conn",
                             daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        """One client connection: request by request, each forwarded or faulted."""
        conn = _Connection(self, client)
        try:
            conn.run()
        except OSError:
            pass
        finally:
            conn.close()


class _Connection:
    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.reader = client.makefile("rb")
        self.upstream: socket.socket | None = None
        self.swallow = threading.Event()  # "lose": the next final answer is not passed back
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            head = self._read_head()
            if head is None:
                return
            method, target = _request_line(head)
            kind, delay_s = self.proxy._choose(method, target)
            if kind == "reset":  # close at once with linger 0: the kernel sends an RST
                with contextlib.suppress(OSError):
                    self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                    self.reader.close()
                    self.client.close()
                return
            if kind == "drop":
                return
            if kind in _ERRORS:
                self._answer_error(head, *_ERRORS[kind])
                return
            if kind == "delay":
                time.sleep(delay_s)
            if kind == "lose":
                self.swallow.set()
            self._forward(head)
            self.proxy._count("forwarded")
            if kind == "lose":
                self.done.wait(timeout=120)  # the pump closes once the answer began
                return

    def _read_head(self) -> bytes | None:
        lines: list[bytes] = []
        size = 0
        while True:
            line = self.reader.readline(MAX_HEAD)
            if not line:
                return None  # the client closed between requests
            lines.append(line)
            size += len(line)
            if line in (b"\r\n", b"\n"):
                break
            if size >= MAX_HEAD:
                return None
        if len(lines) == 1:  # a stray empty line between requests
            return self._read_head()
        return b"".join(lines)

    def _ensure_upstream(self) -> socket.socket:
        if self.upstream is None:
            self.upstream = socket.create_connection(self.proxy.upstream, timeout=30)
            self.upstream.settimeout(None)
            self.proxy._track(self.upstream)
            threading.Thread(target=self._pump, name="faultproxy-pump", daemon=True).start()
        return self.upstream

    def _forward(self, head: bytes) -> None:
        upstream = self._ensure_upstream()
        upstream.sendall(head)
        headers = _headers(head)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            self._relay_chunked(upstream)
        else:
            self._relay_exact(upstream, int(headers.get("content-length", "0") or 0))

    def _relay_exact(self, upstream: socket.socket, length: int) -> None:
        while length > 0:
            piece = self.reader.read1(min(length, 1 << 16))
            if not piece:
                raise ConnectionError("the client closed in the middle of a body")
            upstream.sendall(piece)
            length -= len(piece)

    def _relay_chunked(self, upstream: socket.socket) -> None:
        while True:
            size_line = self.reader.readline(MAX_HEAD)
            if not size_line:
                raise ConnectionError("the client closed in the middle of a chunked body")
            upstream.sendall(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = self.reader.readline(MAX_HEAD)
                    upstream.sendall(trailer)
                    if trailer in (b"\r\n", b"\n", b""):
                        return
            self._relay_exact(upstream, size + 2)  # the chunk and its CRLF

    def _answer_error(self, head: bytes, status: int, reason: str, code: str) -> None:
        """An S3-style error answer; the body is read first unless the client waits for
        100-continue (otherwise closing with unread bytes would turn into a reset)."""
        headers = _headers(head)
        if headers.get("expect", "").lower() != "100-continue":
            if headers.get("transfer-encoding", "").lower() == "chunked":
                self._relay_chunked(_Sink())  # type: ignore[arg-type]
            else:
                self._relay_exact(_Sink(), int(headers.get("content-length", "0") or 0))  # type: ignore[arg-type]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>injected by the test proxy</Message></Error>").encode()
        answer = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        self.client.sendall(answer)
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_WR)
            self.client.settimeout(2.0)
            while self.client.recv(1 << 16):
                pass

    def _pump(self) -> None:
        """Server -> client bytes; under ``swallow`` the interim 1xx answers pass and the
        final answer is dropped with the connection."""
        upstream = self.upstream
        assert upstream is not None
        pending = b""
        try:
            while True:
                data = upstream.recv(1 << 16)
                if not data:
                    return
                if not self.swallow.is_set():
                    self.client.sendall(data)
                    continue
                pending += data
                while pending.startswith(b"HTTP/1.1 1") and b"\r\n\r\n" in pending:
                    interim, _, pending = pending.partition(b"\r\n\r\n")
                    self.client.sendall(interim + b"\r\n\r\n")
                if pending and not pending.startswith(b"HTTP/1.1 1"[: len(pending)]):
                    return  # the final answer began: lose it
        except OSError:
            return
        finally:
            self.done.set()
            _close(self.client)

    def close(self) -> None:
        self.done.set()
        with contextlib.suppress(OSError):
            self.reader.close()
        self.proxy._untrack(self.client)
        if self.upstream is not None:
            self.proxy._untrack(self.upstream)


class _Sink:
    """Where the body of a request answered with an injected error goes."""

    def sendall(self, data: bytes) -> None:
        pass


def _request_line(head: bytes) -> tuple[str, str]:
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    return (parts[0], parts[1]) if len(parts) >= 2 else ("", "")


def _headers(head: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
