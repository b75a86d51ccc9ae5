"""The search service on a GPU loads the segment files of a directory store straight into
device memory (cloud/gpu/loader.py, found through cloud/gpu/segment_files.py).

No GPU here: the service is started with ``--device cuda`` and numpy as its array module
(the code that runs with cupy on a GPU, cloud/gpu/backend.py), and compared with the same
service on the CPU over the same store: the same hits and scores, the same snapshot
(segments searched, rejected, segment-set digests). A segment file corrupted or replaced
on disk after the service loaded it is refused by name and the device answers from the
rows the service validated, as the CPU path does; a segment corrupted before the load is
rejected and not covered on both devices. The GPU machine measures the speed
(bench/gpu.py, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bench import datasets
from cloud import layout, wire
from cloud import service as service_module
from cloud.directory_store import DirectoryStore
from cloud.gpu import backend
from cloud.gpu.loader import load_segments
from cloud.gpu.segment_files import SegmentFiles
from cloud.segments import SegmentError, decode_segment, encode_segment
from cloud.service import AllowAnyone, create_app
from crypto.index import IndexKey
from crypto.tokens import QueryToken

DIM = 16
ROWS = 200  # per segment
K = 5


@dataclass
class Repo:
    store: DirectoryStore
    repo: str
    key: IndexKey
    data: np.ndarray  # the plaintext of every row ever written (queries are near these)
    keys: list[str]  # segment keys, in key order

    def path(self, key: str) -> Path:
        return self.store.root.joinpath(*key.split("/"))

    def put(self, key: str, ids: list[str], rows: np.ndarray) -> None:
        self.store.put(key, encode_segment(ids, self.key.encrypt(rows), 1))


@dataclass
class Service:
    http: TestClient
    app: Any
    engine: Any  # what the service searches with (a DeviceSearcher on the GPU)
    repo: str

    def refresh(self, repo: Repo) -> dict[str, Any]:
        answer = self.http.post(f"/v1/repos/{repo.repo}/refresh")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def search(self, token: QueryToken) -> list[list[tuple[str, float]]]:
        """Protocol 1 (JSON)."""
        text = base64.b64encode(token.to_bytes()).decode()
        answer = self.http.post(f"/v1/repos/{self.repo}/search",
                                json={"token": text, "k": K, "key_version": 1})
        assert answer.status_code == 200, answer.text
        return [[(h["image_id"], h["score"]) for h in r["hits"]]
                for r in answer.json()["results"]]

    def search_v2(self, token: QueryToken) -> wire.SearchAnswerV2:
        """Protocol 2: the answer names the segments searched and their set digest."""
        body = wire.encode_request(wire.SearchRequestV2(
            key_version=1, k=K, min_head=0, flags=wire.FLAG_LIST_SEGMENTS, token=token))
        answer = self.http.post(f"/v2/repos/{self.repo}/search", content=body, headers={
            "content-type": wire.REQUEST_MEDIA_TYPE, wire.PROTOCOL_HEADER: "2"})
        assert answer.status_code == 200, answer.text
        return wire.decode_answer(answer.content, queries=len(token), k=K, key_version=1,
                                  repo_id=self.repo)

    def snapshot(self, repo: Repo) -> Any:
        return self.app.state.radcrypt.repo(repo.repo).snapshot


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    """A format-1 repository of four segments in a directory store. Its segment keys are
    made in key order; the first load gets the last two, a second the first two, so the
    service's rows are not in key order. One image is in two segments (imported twice,
    with other numbers): the service keeps its first row."""
    store = DirectoryStore(tmp_path / "objects")
    store.ensure_bucket()
    rng = np.random.default_rng(28)
    data = datasets.low_rank_varying(rng, 4 * ROWS, DIM)
    key = IndexKey.generate(DIM, sample=data)
    name = "gpu-" + secrets.token_hex(3)
    keys = sorted(layout.segment_key(name, layout.new_id()) for _ in range(4))
    made = Repo(store, name, key, data, keys)
    ids = [layout.new_id() for _ in range(4 * ROWS)]
    for i in (2, 3):
        made.put(keys[i], ids[i * ROWS:(i + 1) * ROWS], data[i * ROWS:(i + 1) * ROWS])
    return made


def add_the_first_two(repo: Repo) -> None:
    """The segments whose keys sort first, written after the first load; the second
    repeats an image of the first load (the id of row 2 * ROWS) with other numbers, those
    of row ROWS, which a query is near: kept twice, it would be that query's first hit."""
    ids = [layout.new_id() for _ in range(2 * ROWS)]
    ids[ROWS] = _first_id(repo, repo.keys[2])  # its numbers: row ROWS's, a query's nearest
    for i in (0, 1):
        repo.put(repo.keys[i], ids[i * ROWS:(i + 1) * ROWS], repo.data[i * ROWS:(i + 1) * ROWS])


def _first_id(repo: Repo, key: str) -> str:
    raw = repo.path(key).read_bytes()
    return raw[64:80].hex()  # version 1: the ids start at 64


@pytest.fixture
def services(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Service, Service]]:
    """The service on the CPU and on ``cuda`` with numpy as the array module (the
    engine each one built is kept by wrapping the real service_searcher)."""
    monkeypatch.setattr(backend, "array_module", lambda device: np)
    engines: list[Any] = []
    real = service_module.service_searcher

    def kept(*args: Any, **kwargs: Any) -> Any:
        engine, hook = real(*args, **kwargs)
        engines.append(engine)
        return engine, hook

    monkeypatch.setattr(service_module, "service_searcher", kept)
    made = []
    for device in ("cpu", "cuda"):
        app = create_app(repo.store, AllowAnyone(), device=device)
        made.append(Service(TestClient(app), app, engines[-1], repo.repo))
    cpu, gpu = made
    assert isinstance(gpu.engine, backend.DeviceSearcher) and gpu.engine.xp is np
    with cpu.http, gpu.http:
        yield cpu, gpu


def _queries(repo: Repo) -> np.ndarray:
    rng = np.random.default_rng(5)
    rows = np.array([0, ROWS, ROWS + 1, 2 * ROWS, 3 * ROWS + 7, 4 * ROWS - 1])
    near = datasets.perturbed_queries(rng, repo.data[rows], len(rows), noise=0.01)
    return np.concatenate([near, datasets.low_rank_varying(rng, 4, DIM)])


def _same(mine: list[list[tuple[str, float]]], theirs: list[list[tuple[str, float]]]
          ) -> bool:
    """The same images in the same order; the scores equal but for the last bits (the
    engines add the products in different orders: a score near zero may differ by a
    few units of the largest one's last place)."""
    a = np.array([s for hits in mine for _, s in hits])
    b = np.array([s for hits in theirs for _, s in hits])
    return ([[i for i, _ in hits] for hits in mine] == [[i for i, _ in hits] for hits in theirs]
            and bool(np.all(np.abs(a - b) <= 1e-12 * np.abs(b).max())))


def _token(repo: Repo, queries: np.ndarray) -> QueryToken:
    """One token for both services (each token is scaled at random: scores compare only
    within one token)."""
    return repo.key.query(queries)


@pytest.mark.parametrize("single_mode_from_rows", [backend.F32_SINGLE_ROWS, 0],
                         ids=["one-query-f32", "one-query-levels"])
def test_the_gpu_service_loads_the_segment_files_and_answers_as_the_cpu(
        repo: Repo, services: tuple[Service, Service], single_mode_from_rows: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A single query takes the float32 scan on a small index and the levels from
    F32_SINGLE_ROWS rows on (moved to 0 here to reach the levels): both answer as the
    CPU does."""
    monkeypatch.setattr(backend, "F32_SINGLE_ROWS", single_mode_from_rows)
    cpu, gpu = services
    for service in services:
        service.refresh(repo)
    add_the_first_two(repo)
    for service in services:
        assert service.refresh(repo)["images"] == 4 * ROWS - 1  # the repeat kept once
    queries = _queries(repo)
    token, one = _token(repo, queries), _token(repo, queries[1:2])
    assert _same(gpu.search(token), cpu.search(token))
    assert _same(gpu.search(one), cpu.search(one))
    load = gpu.engine.loads[-1]
    assert (load.origin, load.segments, load.rows) == ("files", 4, 4 * ROWS - 1)
    assert load.bytes_read == sum(repo.path(k).stat().st_size for k in repo.keys)
    # the rows from the files are the host's, position for position
    version = gpu.snapshot(repo).versions[1]
    from_files = gpu.engine.device_index(version.index)
    from_host = backend.DeviceSearcher(np).device_index(version.index)
    for a, b in zip([from_files.full, from_files.first32, *from_files.levels],
                    [from_host.full, from_host.first32, *from_host.levels], strict=True):
        assert np.array_equal(a, b)
    mine, theirs = gpu.snapshot(repo), cpu.snapshot(repo)
    assert (mine.segment_ids, mine.set_digests, mine.rejected) == (
        theirs.segment_ids, theirs.set_digests, theirs.rejected)


@pytest.mark.parametrize("change", ["corrupted", "replaced"])
def test_a_segment_file_changed_after_the_load_is_refused_by_name(
        repo: Repo, services: tuple[Service, Service], change: str) -> None:
    """The attack: after the service verified a segment, its file on disk is changed,
    by a flipped bit or by another valid segment (same ids, a valid checksum) whose rows
    would rank first. The device load refuses the file by name, nothing of it is
    searched, and the answers are those of the rows the service verified."""
    cpu, gpu = services
    for service in services:
        service.refresh(repo)
    queries = _queries(repo)
    target = repo.keys[3]
    path = repo.path(target)
    if change == "corrupted":
        raw = bytearray(path.read_bytes())
        raw[-100] ^= 1  # a number of the full vectors
        path.write_bytes(bytes(raw))
    else:
        ids = [bytes(i).hex() for i in np.frombuffer(path.read_bytes(), "V16", ROWS, 64)]
        repo.put(target, ids, np.repeat(queries[3:4], ROWS, axis=0))  # every query's nearest
        assert load_segments(np, [path]).ids.shape == (ROWS,)  # a valid segment by itself
    token = _token(repo, queries)
    answers = gpu.search(token)
    load = gpu.engine.loads[-1]
    assert load.origin == "host"
    assert list(load.refused) == [str(path)]
    assert "does not match the segment the service verified" in load.refused[str(path)]
    assert _same(answers, cpu.search(token))
    assert gpu.snapshot(repo).rejected == cpu.snapshot(repo).rejected == {}


def test_a_segment_corrupted_before_the_load_is_not_covered_on_either_device(
        repo: Repo, services: tuple[Service, Service]) -> None:
    cpu, gpu = services
    path = repo.path(repo.keys[2])
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 1
    path.write_bytes(bytes(raw))
    refreshed = [service.refresh(repo) for service in services]
    assert refreshed[0] == refreshed[1]
    assert list(refreshed[1]["rejected_segments"]) == [repo.keys[2]]
    assert "checksum" in refreshed[1]["rejected_segments"][repo.keys[2]]
    token = _token(repo, _queries(repo))
    mine, theirs = gpu.search_v2(token), cpu.search_v2(token)
    assert _same(mine.hits, theirs.hits)
    load = gpu.engine.loads[-1]
    assert (load.origin, load.segments, load.rows) == ("files", 1, ROWS)
    kept = [layout.parse_segment_key(repo.keys[3])[1]]
    assert (mine.segments, mine.images, mine.segment_ids) == (1, ROWS, kept)
    assert (mine.set_digest, mine.segment_ids) == (theirs.set_digest, theirs.segment_ids)
    assert mine.set_digest == wire.segment_set_digest(repo.repo, 1, kept)  # not covered


def test_without_local_files_the_device_copies_the_host_rows(
        repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that is not a directory store (S3) has no files to read: the rows are
    copied from the host, with the same answers."""

    class Remote:  # the directory store behind another class, as a bucket would be
        def __init__(self, inner: DirectoryStore) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

    monkeypatch.setattr(backend, "array_module", lambda device: np)
    engine, _ = backend.service_searcher("cuda", Remote(repo.store), lambda r: None)
    assert isinstance(engine, backend.DeviceSearcher) and engine.files is not None
    assert engine.files.root is None
    app = create_app(Remote(repo.store), AllowAnyone())
    with TestClient(app) as http:
        assert http.post(f"/v1/repos/{repo.repo}/refresh").status_code == 200
    index = app.state.radcrypt.repo(repo.repo).snapshot.versions[1].index
    copy = engine.device_index(index)
    assert engine.loads[-1].origin == "host" and len(copy) == 2 * ROWS


def test_one_query_takes_the_float32_scan_below_two_million_rows() -> None:
    assert backend.single_query_mode(1_000_000) == "f32"
    assert backend.single_query_mode(backend.F32_SINGLE_ROWS) == "levels"
    assert backend.single_query_mode(4_000_000) == "levels"


def test_the_gpu_hook_notes_each_segment_then_calls_the_keyword_side() -> None:
    calls: list[tuple[str, str]] = []
    files = SegmentFiles(object(), lambda r: None)  # type: ignore[arg-type,return-value]
    hook = files.hook_then(lambda repo_id, key, segment: calls.append((repo_id, key)))
    for key in ("k2", "k1", "k2"):
        hook("r", key, SimpleNamespace(sha256=key.encode() * 16))
    assert calls == [("r", "k2"), ("r", "k1"), ("r", "k2")]
    seen = files._seen["r"]
    assert seen["k1"][0] < seen["k2"][0]  # appended again: the later order wins
    assert files.hook_then(None) == files.capture


def test_the_loader_checks_the_expected_sha256_and_keeps_the_first_of_a_repeated_id(
        tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    key = IndexKey.generate(8, sample=rng.standard_normal((50, 8)))
    ids = [secrets.token_hex(16) for _ in range(30)]
    rows = rng.standard_normal((30, 8))
    first, second = tmp_path / "seg-a", tmp_path / "seg-b"
    first.write_bytes(encode_segment(ids[:20], key.encrypt(rows[:20]), 1))
    second.write_bytes(encode_segment(ids[10:], key.encrypt(rows[10:] + 1.0), 1))
    digests = [hashlib.sha256(p.read_bytes()).digest() for p in (first, second)]
    loaded = load_segments(np, [first, second], expected_sha256=digests, unique_ids=True)
    assert [bytes(i).hex() for i in loaded.ids] == ids  # ids 10..19 once, from seg-a
    a, b = (decode_segment(p.read_bytes()).vectors.full for p in (first, second))
    assert np.array_equal(loaded.index.full, np.concatenate([a, b[10:]]))
    assert len(load_segments(np, [first, second]).ids) == 40  # without: kept twice
    with pytest.raises(SegmentError, match="seg-b: does not match the segment the service"):
        load_segments(np, [first, second], expected_sha256=[digests[0], digests[0]])
