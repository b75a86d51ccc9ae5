"""Operating the search service (issue 14): stop on SIGTERM, warm-up and /readyz,
/metrics, the clock-skew 401, and the declared error shapes.

The service runs as its own process (`python -m cloud.service`, the product's entry point)
on 127.0.0.1 against a moto S3 server, with an owner key, and is stopped by pid. The
bucket is written as an owner would: an owner-signed user record for each member, a
signed manifest listing them (the shared contract, DESIGN §3) and format-1 index segments
(cloud/segments.py), so that signed requests reach the handlers and searches answer.
The warm-up test runs the application in this process instead, on a store whose reads
wait until the test lets them go, so that "still warming" is a state the test holds.

tests/fuzz/test_api_fuzz.py reuses the bucket helpers of this file (``Deployment``).
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import datetime
import hashlib
import json
import mmap
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.core.identity import RequestSigner
from bench import datasets
from cloud import layout
from cloud.audit import read_audit
from cloud.auth import request_message
from cloud.backend import DirectoryConfig, Store
from cloud.repo_index import RepoIndex
from cloud.segments import encode_segment
from cloud.service import AllowAnyone, create_app
from cloud.service_options import add_service_arguments, service_config
from cloud.store import ObjectStore, StoreConfig
from cloud.stores import open_store
from crypto.identity import Identity
from crypto.index import IndexKey
from crypto.signed import sign_json

try:
    import e2e_support as support
    import s3servers
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import s3servers

SERVICE_ID = "svc-ops-test"
DIM = 32
IMAGES = 60
JSON = {"content-type": "application/json"}

# --- a deployment written as an owner would (reused by tests/fuzz/test_api_fuzz.py) ---------


def write_user(store: Store, owner: Identity, user: Identity) -> None:
    """The owner-signed user record the service reads a member's signing key from."""
    name = layout.user_key(user.user_id)
    card = user.card()
    store.put(name, sign_json(owner, "user", name, {
        "card": card.to_json(), "fingerprint": card.fingerprint,
        "registered": datetime.datetime.now(datetime.timezone.utc).isoformat()}))


def write_manifest(store: Store, owner: Identity, repo: str, members: list[Identity]) -> None:
    """A format-1 manifest (sequence 1, key version 1) listing ``members``."""
    name = layout.manifest_key(repo)
    ids = sorted(m.user_id for m in members)
    store.put(name, sign_json(owner, "manifest", name, {
        "repo_id": repo, "name": repo, "dim": DIM, "extractor": "radcrypt-v1",
        "key_version": 1, "sequence": 1, "owner": owner.user_id,
        "members": [{"user_id": u, "key_version": 1} for u in ids]}))


@dataclasses.dataclass
class Deployment:
    """An owner, a member (alice), one repository with ``images`` images in segments of
    20, and the index key that makes its tokens."""

    store: ObjectStore
    config: StoreConfig
    owner: Identity
    alice: Identity
    repo: str
    key: IndexKey
    vectors: np.ndarray
    image_ids: list[str]

    @classmethod
    def create(cls, moto: StoreConfig, images: int = IMAGES, prefix: str = "ops"
               ) -> Deployment:
        config = dataclasses.replace(moto, bucket=s3servers.unique_bucket(prefix))
        store = ObjectStore(config)
        store.ensure_bucket()
        owner, alice = Identity.generate("Dr Owner"), Identity.generate("Alice")
        for user in (owner, alice):
            write_user(store, owner, user)
        repo = f"{prefix}-{os.urandom(4).hex()}"
        write_manifest(store, owner, repo, [owner, alice])
        rng = np.random.default_rng(14)
        vectors = datasets.low_rank_varying(rng, images, DIM)
        key = IndexKey.generate(DIM, sample=vectors)
        ids = [layout.new_id() for _ in range(images)]
        for start in range(0, images, 20):
            blob = encode_segment(ids[start:start + 20], key.encrypt(vectors[start:start + 20]),
                                  1)
            store.put(layout.segment_key(repo, layout.new_id()), blob)
        return cls(store, config, owner, alice, repo, key, vectors, ids)

    def token(self, rows: np.ndarray) -> str:
        return base64.b64encode(self.key.query(rows).to_bytes()).decode()

    def search_body(self, row: int = 0, k: int = 3) -> bytes:
        return json.dumps({"token": self.token(self.vectors[row:row + 1]), "k": k,
                           "key_version": 1}).encode()

    def owner_key_b64(self) -> str:
        return base64.b64encode(self.owner.sign_public).decode()

    def drop(self) -> None:
        s3servers.drop_bucket(self.config)


def signed_post(url: str, who: Identity, path: str, body: bytes,
                stamp: int | None = None) -> httpx.Response:
    """POST signed by ``who`` for SERVICE_ID; ``stamp`` signs another time than now."""
    return httpx.post(url + path, content=body, timeout=30,
                      headers={"content-type": "application/json",
                               **sign(who, "POST", path, body, stamp=stamp)})


def sign(who: Identity, method: str, path: str, body: bytes, *, protocol: int = 1,
         stamp: int | None = None, service_id: str = SERVICE_ID) -> dict[str, str]:
    """The four x-radcrypt-* headers (docs/FORMAT.md 16.2), at ``stamp`` (default now)."""
    when = str(int(time.time()) if stamp is None else stamp)
    nonce = secrets.token_hex(16)
    message = request_message(method, path, hashlib.sha256(body).hexdigest(), when, nonce,
                              who.user_id, service_id, protocol)
    signature = Ed25519PrivateKey.from_private_bytes(who.sign_private).sign(message)
    return {"x-radcrypt-user": who.user_id, "x-radcrypt-time": when,
            "x-radcrypt-nonce": nonce,
            "x-radcrypt-signature": base64.b64encode(signature).decode()}


def start_service(deployment: Deployment, log: Path, *extra: str) -> support.ServiceProcess:
    """`python -m cloud.service` with the owner's key, SERVICE_ID, and ``extra`` options."""
    return support.ServiceProcess(
        deployment.config, log, refresh_interval=None,
        service_args=("--owner-key", deployment.owner_key_b64(), "--service-id", SERVICE_ID,
                      "--cache-dir", str(log.parent / "cache"), *extra))


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(moto_store_config: StoreConfig) -> Iterator[Deployment]:
    made = Deployment.create(moto_store_config)
    yield made
    made.drop()


@pytest.fixture(scope="module")
def service(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[support.ServiceProcess]:
    log = tmp_path_factory.mktemp("ops-service") / "service.log"
    with start_service(deployment, log, "--docs") as svc:
        yield svc
    assert support.pid_gone(svc.pid)


# --- SIGTERM --------------------------------------------------------------------------------


def test_sigterm_flushes_the_audit_removes_the_cache_and_exits_0(
        deployment: Deployment, tmp_path: Path) -> None:
    """uvicorn re-raised SIGTERM after its shutdown, which killed the process before
    serve()'s cleanup: now the buffered audit entries are written, the private cache
    directory removed, a line logged, and the exit status is 0, within seconds."""
    log = tmp_path / "service.log"
    svc = start_service(deployment, log, "--preload", deployment.repo)
    try:
        assert _ready(svc.url), log.read_text()
        before = len(read_audit(deployment.store, deployment.repo))
        path = f"/v1/repos/{deployment.repo}/search"
        for row in range(3):
            answer = signed_post(svc.url, deployment.alice, path, deployment.search_body(row))
            assert answer.status_code == 200, answer.text
        cache = tmp_path / "cache"
        assert [p.name for p in cache.iterdir() if p.name.startswith("index-")]
        sent = time.monotonic()
        svc.process.send_signal(signal.SIGTERM)
        status = svc.process.wait(timeout=15)
        took = time.monotonic() - sent
    finally:
        svc.stop()
    text = log.read_text(errors="replace")
    assert status == 0, text[-2000:]
    print(f"\nthe service stopped {took:.2f} s after SIGTERM")
    assert took < 10, f"the service took {took:.1f} s to stop"
    entries = read_audit(deployment.store, deployment.repo)
    searches = [e for e in entries[before:] if e["action"] == "search"]
    assert len(searches) == 3 and {e["user"] for e in searches} == {deployment.alice.user_id}
    assert not [p for p in cache.iterdir() if p.name.startswith("index-")]
    assert "stopped on SIGTERM: audit flushed" in text


# --- warm-up and /readyz --------------------------------------------------------------------


class HeldStore:
    """A real directory store whose reads under ``prefix`` wait until ``release()``: the
    repository's load is then in progress for as long as the test wants."""

    def __init__(self, store: Store, prefix: str) -> None:
        self._store = store
        self._prefix = prefix
        self._open = threading.Event()

    def release(self) -> None:
        self._open.set()

    def _hold(self, key: str) -> None:
        if key.startswith(self._prefix):
            assert self._open.wait(60), "the test never released the store"

    def get(self, key: str, *args: Any, **kwargs: Any) -> bytes:
        self._hold(key)
        return self._store.get(key, *args, **kwargs)

    def get_range(self, key: str, *args: Any, **kwargs: Any) -> bytes:
        self._hold(key)  # a segment's header (cloud/segment_download.py)
        return self._store.get_range(key, *args, **kwargs)

    def iter_chunks(self, key: str, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        self._hold(key)  # a segment's body, streamed
        return self._store.iter_chunks(key, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_preloaded_repository_answers_503_warming_until_loaded(
        moto_store_config: StoreConfig, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    store = open_store(DirectoryConfig(tmp_path / "objects"))
    store.ensure_bucket()
    made = _directory_repo(store)
    held = HeldStore(store, layout.segments_prefix(made.repo))
    app = create_app(held, AllowAnyone(), cache_dir=tmp_path / "cache",  # type: ignore[arg-type]
                     preload=[made.repo], service_id=SERVICE_ID)
    with TestClient(app) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json() == {"status": "warming", "repositories": 1, "loading": 1}
        assert ready.headers["retry-after"] == "1"
        assert http.get("/healthz").status_code == 200  # alive, not ready
        search = http.post(f"/v1/repos/{made.repo}/search", content=made.search_body(),
                           headers=JSON)
        assert search.status_code == 503 and "warming" in search.json()["detail"]
        assert search.headers["retry-after"] == "1"
        assert "radcrypt_ready 0" in http.get("/metrics").text
        held.release()
        deadline = time.monotonic() + 30
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        assert http.get("/readyz").json() == {"status": "ready", "repositories": 1,
                                              "loading": 0}
        search = http.post(f"/v1/repos/{made.repo}/search", content=made.search_body(5, 1),
                           headers=JSON)
        assert search.status_code == 200, search.text
        assert search.json()["results"][0]["hits"][0]["image_id"] == made.image_ids[5]
        text = http.get("/metrics").text
        assert "radcrypt_ready 1" in text
        assert f'radcrypt_repository_images{{repo="{made.repo}"}} {IMAGES}' in text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore(2) is Linux's")
def test_a_load_reads_its_cache_files_into_memory_before_serving(tmp_path: Path) -> None:
    """The cache files are written with O_DIRECT (not through the page cache); the first
    queries after a load used to read their candidates' rows from the disk one by one.
    Now every page of the snapshot's memory-mapped arrays is resident when the refresh
    returns (mincore(2) on the mapping)."""
    store = open_store(DirectoryConfig(tmp_path / "objects"))
    store.ensure_bucket()
    made = _directory_repo(store, images=3000)
    cold = RepoIndex(store, made.repo, tmp_path / "cold")
    cold.warm_before_serving = False
    cold_share = _resident_share(cold.refresh())
    snapshot = RepoIndex(store, made.repo, tmp_path / "warm").refresh()
    share = _resident_share(snapshot)
    print(f"\nresident after a load: {share:.0%} (without warm-up: {cold_share:.0%})")
    assert share == 1.0


def _resident_share(snapshot: Any) -> float:
    """The share of the pages of the snapshot's file-backed arrays that are in memory."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = resident = 0
    for version in snapshot.versions.values():
        for array in (version.index.full, *version.index.levels):
            start = array.ctypes.data - array.ctypes.data % mmap.PAGESIZE
            length = array.ctypes.data + array.nbytes - start
            count = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * count)()
            assert libc.mincore(start, length, vec) == 0, os.strerror(ctypes.get_errno())
            pages += count
            resident += sum(v & 1 for v in vec)
    assert pages > 50, "the test's arrays are too small to tell"
    return resident / pages


def test_preload_option_is_checked() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_service_arguments(parser)
    args = parser.parse_args(["--insecure-no-auth", "--preload", "Not A Repo"])
    with pytest.raises(ValueError, match="--preload: invalid repo_id"):
        service_config(args, environ={})
    args = parser.parse_args(["--insecure-no-auth", "--preload", "abc"])
    config = service_config(args, environ={"RADCRYPT_SERVICE_REPOS": "def, abc"})
    assert config.preload == ("abc", "def")


def test_readyz_after_a_real_preload(service: support.ServiceProcess) -> None:
    """Without --preload the service is ready at once (it loads on first use)."""
    response = httpx.get(service.url + "/readyz", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "repositories": 0, "loading": 0}


# --- /metrics -------------------------------------------------------------------------------


def test_metrics_count_searches_refusals_sizes_and_memory(
        service: support.ServiceProcess, deployment: Deployment) -> None:
    path = f"/v1/repos/{deployment.repo}/search"
    before = _metrics(service.url)
    for row in (1, 2):
        answer = signed_post(service.url, deployment.alice, path, deployment.search_body(row))
        assert answer.status_code == 200, answer.text
    assert httpx.post(service.url + path, content=b"{}", timeout=10).status_code == 401
    stranger = Identity.generate("Mallory")
    assert signed_post(service.url, stranger, path, b"{}").status_code == 401
    after = _metrics(service.url)
    assert _delta(before, after, 'radcrypt_search_requests_total{protocol="1"}') == 2
    assert _delta(before, after, 'radcrypt_search_queries_total{protocol="1"}') == 2
    assert _delta(before, after, 'radcrypt_search_duration_seconds_count{protocol="1"}') == 2
    assert _delta(before, after,
                  'radcrypt_rejected_requests_total{reason="auth_unauthenticated"}') == 2
    assert after[f'radcrypt_repository_images{{repo="{deployment.repo}"}}'] == IMAGES
    assert after[f'radcrypt_repository_segments{{repo="{deployment.repo}"}}'] == IMAGES // 20
    assert after["process_resident_memory_bytes"] > 10 << 20
    text = httpx.get(service.url + "/metrics", timeout=10).text
    for secret in (deployment.alice.user_id, deployment.owner.user_id, stranger.user_id,
                   *deployment.image_ids):
        assert secret not in text


def test_metrics_histogram_buckets_are_cumulative(service: support.ServiceProcess,
                                                  deployment: Deployment) -> None:
    path = f"/v1/repos/{deployment.repo}/search"
    assert signed_post(service.url, deployment.alice, path,
                       deployment.search_body()).status_code == 200
    values = _metrics(service.url)
    buckets = [(name, v) for name, v in values.items()
               if name.startswith('radcrypt_search_duration_seconds_bucket{protocol="1"')]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1][0].endswith('le="+Inf"}')
    assert counts[-1] == values['radcrypt_search_duration_seconds_count{protocol="1"}']


# --- the clock-skew 401 ---------------------------------------------------------------------


def test_clock_skew_is_named_to_a_signed_member_only(service: support.ServiceProcess,
                                                     deployment: Deployment) -> None:
    path = f"/v1/repos/{deployment.repo}/refresh"
    late = int(time.time()) - 1000
    response = signed_post(service.url, deployment.alice, path, b"{}", stamp=late)
    assert response.status_code == 401
    detail = response.json()["detail"]
    found = re.fullmatch(r"the request's time is (\d+) s off the service's clock .*", detail)
    assert found and 1000 <= int(found.group(1)) <= 1060, detail
    assert "behind" in detail
    early = signed_post(service.url, deployment.alice, path, b"{}",
                        stamp=int(time.time()) + 700)
    assert early.status_code == 401 and "ahead" in early.json()["detail"]
    # Not signed by a registered user, or not signed at all: the bare 401.
    stranger = signed_post(service.url, Identity.generate("Mallory"), path, b"{}", stamp=late)
    assert stranger.status_code == 401 and stranger.json() == {"detail": "unauthorized"}
    headers = RequestSigner(deployment.alice).headers("POST", path, b"{}", SERVICE_ID)
    headers["x-radcrypt-time"] = str(late)  # the signature no longer matches
    forged = httpx.post(service.url + path, content=b"{}", headers=headers, timeout=10)
    assert forged.status_code == 401 and forged.json() == {"detail": "unauthorized"}
    # In the window, the same member is served.
    assert signed_post(service.url, deployment.alice, path, b"{}").status_code == 200


# --- the declared error shapes --------------------------------------------------------------


def test_422_is_the_declared_shape(service: support.ServiceProcess,
                                   deployment: Deployment) -> None:
    schema = httpx.get(service.url + "/openapi.json", timeout=10).json()
    operation = schema["paths"]["/v1/repos/{repo}/search"]["post"]
    for code in ("400", "401", "403", "404", "413", "422", "429", "503"):
        assert code in operation["responses"], code
    declared = operation["responses"]["422"]["content"]["application/json"]["schema"]
    error = schema["components"]["schemas"][declared["$ref"].rsplit("/", 1)[1]]
    assert error["properties"]["detail"]["type"] == "string"
    token = schema["components"]["schemas"]["SearchRequest"]["properties"]["token"]
    assert token["pattern"] and "RCQT" in token["description"]
    path = f"/v1/repos/{deployment.repo}/search"
    for body in (b'{"token": "AAAA", "k": 0}', b"[1, 2", b'{"token": "AAAA", "k": 1, '
                 b'"key_version": 1}'):
        response = signed_post(service.url, deployment.alice, path, body)
        assert response.status_code == 422, response.text
        assert isinstance(response.json()["detail"], str)
        assert "AAAA" not in response.json()["detail"]  # never the token sent


# --- helpers --------------------------------------------------------------------------------


@dataclasses.dataclass
class _DirectoryRepo:
    repo: str
    key: IndexKey
    vectors: np.ndarray
    image_ids: list[str]

    def search_body(self, row: int = 0, k: int = 3) -> bytes:
        token = base64.b64encode(self.key.query(self.vectors[row:row + 1]).to_bytes()).decode()
        return json.dumps({"token": token, "k": k, "key_version": 1}).encode()


def _directory_repo(store: Store, images: int = IMAGES) -> _DirectoryRepo:
    """A format-1 repository (segments only: the application runs without owner keys)."""
    rng = np.random.default_rng(7)
    vectors = datasets.low_rank_varying(rng, images, DIM)
    key = IndexKey.generate(DIM, sample=vectors)
    ids = [layout.new_id() for _ in range(images)]
    repo = "warm-" + os.urandom(3).hex()
    step = 20 if images <= 200 else 500
    for start in range(0, images, step):
        store.put(layout.segment_key(repo, layout.new_id()),
                  encode_segment(ids[start:start + step],
                                 key.encrypt(vectors[start:start + step]), 1))
    return _DirectoryRepo(repo, key, vectors, ids)


def _ready(url: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(url + "/readyz", timeout=5).status_code == 200:
            return True
        time.sleep(0.1)
    return False


def _metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics by its name and labels."""
    response = httpx.get(url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)
