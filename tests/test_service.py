"""The search service (cloud/service.py) over real HTTP, against a real S3 server (moto).

The service runs in its own process on 127.0.0.1, reads segments that the test writes to
the bucket exactly as an importer would (crypto.index.IndexKey + cloud.segments), and is
stopped by pid. Answers are checked against plaintext brute force on the same vectors.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bench import datasets
from cloud import layout
from cloud.segments import encode_segment
from cloud.store import ObjectStore, StoreConfig
from crypto.index import IndexKey
from crypto.tokens import QueryToken

try:
    import e2e_support as support
    import s3servers
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import s3servers

DIM = 128
MiB = 1 << 20


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket_config(moto_store_config: StoreConfig) -> Iterator[StoreConfig]:
    config = dataclasses.replace(moto_store_config, bucket=s3servers.unique_bucket("svc"))
    ObjectStore(config).ensure_bucket()
    yield config
    s3servers.drop_bucket(config)


@pytest.fixture(scope="module")
def store(bucket_config: StoreConfig) -> ObjectStore:
    return ObjectStore(bucket_config)


@pytest.fixture(scope="module")
def service(bucket_config: StoreConfig, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[support.ServiceProcess]:
    """The service with a one-hour refresh interval: new segments appear on /refresh."""
    log = tmp_path_factory.mktemp("service") / "service.log"
    with support.ServiceProcess(bucket_config, log, refresh_interval=3600.0) as svc:
        yield svc
    assert support.pid_gone(svc.pid)


@pytest.fixture(scope="module")
def http(service: support.ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30.0) as client:
        yield client


@pytest.fixture(scope="module")
def key() -> IndexKey:
    rng = np.random.default_rng(1)
    return IndexKey.generate(DIM, sample=datasets.low_rank_varying(rng, 500, DIM))


# --- helpers ----------------------------------------------------------------------------


def _new_repo() -> str:
    return "svc-" + secrets.token_hex(4)


def _ids(n: int) -> list[str]:
    return [layout.new_id() for _ in range(n)]


def _put_segment(store: ObjectStore, key: IndexKey, repo: str, ids: list[str],
                 vectors: np.ndarray, key_version: int = 1, seg_id: str | None = None) -> str:
    seg_id = seg_id or layout.new_id()
    blob = encode_segment(ids, key.encrypt(vectors), key_version)
    store.put(layout.segment_key(repo, seg_id), blob)
    return layout.segment_key(repo, seg_id)


def _token_b64(key: IndexKey, queries: np.ndarray) -> str:
    return base64.b64encode(key.query(queries).to_bytes()).decode()


def _search(http: httpx.Client, repo: str, key: IndexKey, queries: np.ndarray, k: int,
            key_version: int = 1) -> dict[str, Any]:
    response = http.post(f"/v1/repos/{repo}/search",
                         json={"token": _token_b64(key, queries), "k": k,
                               "key_version": key_version})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _refresh(http: httpx.Client, repo: str) -> dict[str, Any]:
    response = http.post(f"/v1/repos/{repo}/refresh")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _hit_ids(answer: dict[str, Any]) -> list[str]:
    return [hit["image_id"] for hit in answer["hits"]]


# --- health and schema ----------------------------------------------------------------


def test_healthz_and_openapi_of_the_product_entry_point(
    bucket_config: StoreConfig, tmp_path: Path
) -> None:
    """`python -m cloud.service` itself (unauthenticated on loopback, schema asked for):
    health, and the schema lists both routes."""
    with support.ServiceProcess(bucket_config, tmp_path / "svc.log", refresh_interval=None,
                                service_args=["--insecure-no-auth", "--docs"]) as svc:
        health = httpx.get(svc.url + "/healthz", timeout=10)
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        schema = httpx.get(svc.url + "/openapi.json", timeout=10)
        assert schema.status_code == 200
        paths = schema.json()["paths"]
        assert "post" in paths["/v1/repos/{repo}/search"]
        assert "post" in paths["/v1/repos/{repo}/refresh"]
        assert "get" in paths["/healthz"]
        request_schema = json.dumps(schema.json()["components"]["schemas"]["SearchRequest"])
        assert "token" in request_schema and "key_version" in request_schema
    assert support.wait_gone(svc.pid)


# --- correct answers --------------------------------------------------------------------


def test_search_returns_plaintext_topk(store: ObjectStore, http: httpx.Client,
                                       key: IndexKey) -> None:
    repo = _new_repo()
    rng = np.random.default_rng(2)
    data = datasets.low_rank_varying(rng, 1500, DIM)
    ids = _ids(len(data))
    for start in range(0, len(data), 500):  # three segments
        _put_segment(store, key, repo, ids[start : start + 500], data[start : start + 500])
    queries = datasets.perturbed_queries(rng, data, 40, noise=0.2)
    k = 5
    truth, truth_dist = datasets.plaintext_topk(data, queries, k)
    position = {image_id: i for i, image_id in enumerate(ids)}

    # all 40 queries in one request, then one query per request
    batched = _search(http, repo, key, queries, k)
    assert batched["images"] == 1500 and batched["segments"] == 3
    assert len(batched["results"]) == len(queries)
    singles = [_search(http, repo, key, queries[i : i + 1], k)["results"][0] for i in range(5)]
    for qi, answer in enumerate(batched["results"]):
        got = np.array([position[i] for i in _hit_ids(answer)])
        assert [h["rank"] for h in answer["hits"]] == list(range(1, k + 1))
        scores = [h["score"] for h in answer["hits"]]
        assert scores == sorted(scores, reverse=True)
        assert datasets.agrees(got, data, queries[qi], truth_dist[qi]), (qi, got, truth[qi])
        assert set(got) == set(truth[qi])  # random data: no ties
        assert answer["stats"]["vectors"] == 1500
        if qi < len(singles):
            assert _hit_ids(singles[qi]) == _hit_ids(answer)


def test_a_token_of_16_queries_is_answered_by_one_batched_engine_call(
        store: ObjectStore, http: httpx.Client, key: IndexKey) -> None:
    """A 16-query token gets the answers of its 16 queries sent one per token (same ids
    and ranks, scores equal to float64 rounding), all the plaintext top k; the stats say
    one engine call answered the 16 (search_batch), and one call each the singles."""
    repo = _new_repo()
    rng = np.random.default_rng(7)
    data = datasets.low_rank_varying(rng, 2000, DIM)
    ids = _ids(len(data))
    _put_segment(store, key, repo, ids[:1200], data[:1200])
    _put_segment(store, key, repo, ids[1200:], data[1200:])
    # near queries (the bounds prune) and fresh ones (far from everything: the codes scan)
    queries = np.vstack([datasets.perturbed_queries(rng, data, 12, noise=0.2),
                         datasets.low_rank_varying(rng, 4, DIM)])
    k = 4
    truth, _ = datasets.plaintext_topk(data, queries, k)
    position = {image_id: i for i, image_id in enumerate(ids)}

    # one token, and each of its queries as a token of its own (a token's queries carry
    # random scales: tokens made separately would score differently)
    token = key.query(queries)

    def ask(one_or_many: QueryToken) -> list[dict[str, Any]]:
        response = http.post(f"/v1/repos/{repo}/search", json={
            "token": base64.b64encode(one_or_many.to_bytes()).decode(), "k": k,
            "key_version": 1})
        assert response.status_code == 200, response.text
        answers: list[dict[str, Any]] = response.json()["results"]
        return answers

    batched = ask(token)
    singles = [ask(token.select(i))[0] for i in range(len(queries))]
    assert len(batched) == len(queries) == 16
    for qi, (many, one) in enumerate(zip(batched, singles, strict=True)):
        assert [(h["image_id"], h["rank"]) for h in many["hits"]] == \
            [(h["image_id"], h["rank"]) for h in one["hits"]], qi
        # A row's float64 score is summed in one fixed order whichever rows share the
        # call (cloud/rescore.py; a BLAS product's order depended on them: up to 1.1e-12
        # relative, flaky here), so the batch and the single agree to the last bit.
        assert [h["score"] for h in many["hits"]] == [h["score"] for h in one["hits"]], qi
        assert {position[i] for i in _hit_ids(many)} == set(truth[qi]), qi
        assert many["stats"]["batch"] == 16 and one["stats"]["batch"] == 1
        assert many["stats"]["vectors"] == one["stats"]["vectors"] == 2000


def test_k_larger_than_the_repository(store: ObjectStore, http: httpx.Client,
                                      key: IndexKey) -> None:
    repo = _new_repo()
    data = datasets.low_rank_varying(np.random.default_rng(3), 7, DIM)
    ids = _ids(7)
    _put_segment(store, key, repo, ids, data)
    answer = _search(http, repo, key, data[:1], k=100)["results"][0]
    assert sorted(_hit_ids(answer)) == sorted(ids)
    assert _hit_ids(answer)[0] == ids[0]


def test_unknown_repository_and_key_version_answer_empty(store: ObjectStore,
                                                         http: httpx.Client,
                                                         key: IndexKey) -> None:
    query = np.zeros((2, DIM))
    empty = _search(http, _new_repo(), key, query, 3)
    assert [r["hits"] for r in empty["results"]] == [[], []]
    assert empty["images"] == 0
    repo = _new_repo()
    _put_segment(store, key, repo, _ids(3), np.random.default_rng(4).normal(size=(3, DIM)))
    assert _search(http, repo, key, query, 3, key_version=2)["results"][0]["hits"] == []


# --- refresh ----------------------------------------------------------------------------


def test_new_segments_are_served_after_refresh(store: ObjectStore, http: httpx.Client,
                                               key: IndexKey) -> None:
    repo = _new_repo()
    rng = np.random.default_rng(5)
    first = rng.normal(size=(50, DIM))
    first_ids = _ids(50)
    _put_segment(store, key, repo, first_ids, first)
    assert _refresh(http, repo)["images"] == 50

    late = rng.normal(size=(10, DIM)) + 10.0  # far from the first batch
    late_ids = _ids(10)
    _put_segment(store, key, repo, late_ids, late)
    stale = _search(http, repo, key, late[:1], 1)
    assert stale["images"] == 50  # the snapshot is cached until refreshed
    assert _hit_ids(stale["results"][0])[0] in first_ids

    refreshed = _refresh(http, repo)
    assert (refreshed["images"], refreshed["segments"]) == (60, 2)
    assert refreshed["key_versions"] == [1] and refreshed["rejected_segments"] == {}
    fresh = _search(http, repo, key, late[3:4], 1)
    assert _hit_ids(fresh["results"][0]) == [late_ids[3]]


def _corrupt(blob: bytes, how: str) -> bytes:
    data = bytearray(blob)
    if how == "flip magic":
        data[0] ^= 0x01
    elif how == "flip count":
        data[12] ^= 0x04
    elif how == "flip id":
        data[64 + 5] ^= 0x80
    elif how == "flip vector":
        data[len(data) // 2] ^= 0x10
    elif how == "flip checksum":
        data[-1] ^= 0x01
    elif how == "truncate 1":
        del data[-1:]
    elif how == "truncate half":
        del data[len(data) // 2 :]
    elif how == "append":
        data += b"\0"
    elif how == "empty":
        data = bytearray()
    return bytes(data)


CORRUPTIONS = ["flip magic", "flip count", "flip id", "flip vector", "flip checksum",
               "truncate 1", "truncate half", "append", "empty"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupted_segment_is_rejected_and_the_others_serve(
    store: ObjectStore, http: httpx.Client, key: IndexKey, how: str
) -> None:
    repo = _new_repo()
    rng = np.random.default_rng(6)
    good = rng.normal(size=(40, DIM))
    good_ids = _ids(40)
    _put_segment(store, key, repo, good_ids[:20], good[:20])
    assert _refresh(http, repo)["images"] == 20  # loaded before the damage arrives
    _put_segment(store, key, repo, good_ids[20:], good[20:])
    bad = rng.normal(size=(20, DIM)) + 5.0
    bad_ids = _ids(20)
    seg_id = layout.new_id()
    bad_key = layout.segment_key(repo, seg_id)
    store.put(bad_key, _corrupt(encode_segment(bad_ids, key.encrypt(bad), 1), how))

    state = _refresh(http, repo)
    assert list(state["rejected_segments"]) == [bad_key]
    assert state["rejected_segments"][bad_key]  # a reason is given
    assert (state["images"], state["segments"]) == (40, 2)
    answers = _search(http, repo, key, np.vstack([good[3], good[33], bad[0]]), 1)["results"]
    assert _hit_ids(answers[0]) == [good_ids[3]]
    assert _hit_ids(answers[1]) == [good_ids[33]]
    assert _hit_ids(answers[2])[0] in good_ids  # nothing of the damaged segment is served
    assert _refresh(http, repo)["rejected_segments"] == {bad_key: state["rejected_segments"]
                                                         [bad_key]}
    store.delete(bad_key)
    assert _refresh(http, repo)["rejected_segments"] == {}


@pytest.mark.parametrize("odd_name", ["0" * 32, "f" * 32], ids=["sorts first", "sorts last"])
def test_segment_of_another_key_shape_is_rejected_not_the_whole_version(
    store: ObjectStore, http: httpx.Client, key: IndexKey, odd_name: str
) -> None:
    """A well-formed segment whose widths differ from the rest of its key version (a
    broken writer, another key) must not take the other segments down, wherever its
    random name sorts."""
    repo = _new_repo()
    rng = np.random.default_rng(7)
    data = rng.normal(size=(30, DIM))
    ids = _ids(30)
    _put_segment(store, key, repo, ids[:15], data[:15])
    _put_segment(store, key, repo, ids[15:], data[15:])
    other = IndexKey.generate(DIM, levels=(4, 16))
    odd_key = _put_segment(store, other, repo, _ids(5), rng.normal(size=(5, DIM)),
                           seg_id=odd_name)
    state = _refresh(http, repo)
    assert list(state["rejected_segments"]) == [odd_key]
    assert "widths" in state["rejected_segments"][odd_key]
    assert state["images"] == 30
    assert _hit_ids(_search(http, repo, key, data[20:21], 1)["results"][0]) == [ids[20]]
    # once served, a version keeps its widths: a later odd segment is refused too
    late = _put_segment(store, other, repo, _ids(50), rng.normal(size=(50, DIM)),
                        seg_id="1" * 32)
    state = _refresh(http, repo)
    assert sorted(state["rejected_segments"]) == sorted([odd_key, late])
    assert state["images"] == 30


def test_image_in_two_segments_is_returned_once(store: ObjectStore, http: httpx.Client,
                                                key: IndexKey) -> None:
    repo = _new_repo()
    rng = np.random.default_rng(8)
    data = rng.normal(size=(6, DIM))
    ids = _ids(6)
    _put_segment(store, key, repo, ids[:4], data[:4])
    _put_segment(store, key, repo, [ids[0], ids[4], ids[5]], data[[0, 4, 5]])
    state = _refresh(http, repo)
    assert (state["images"], state["segments"]) == (6, 2)
    answer = _search(http, repo, key, data[:1], k=100)["results"][0]
    found = _hit_ids(answer)
    assert found[0] == ids[0]
    assert sorted(found) == sorted(ids)  # every image once, the duplicate included once


# --- refused requests -------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_repo(store: ObjectStore, key: IndexKey) -> str:
    repo = _new_repo()
    _put_segment(store, key, repo, _ids(5), np.random.default_rng(9).normal(size=(5, DIM)))
    return repo


def _detail_text(response: httpx.Response) -> str:
    detail = response.json()["detail"]
    if isinstance(detail, list):  # pydantic: name the field and the rule
        return " ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail)
    return str(detail)


def _payload(key: IndexKey, **changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"token": _token_b64(key, np.zeros((1, DIM))), "k": 1,
                               "key_version": 1}
    payload.update(changes)
    return payload


def _token_with(key: IndexKey, **fields: Any) -> str:
    token = key.query(np.zeros((1, DIM)))
    token = dataclasses.replace(token, **fields)
    return base64.b64encode(token.to_bytes()).decode()


def _bad_requests(key: IndexKey) -> dict[str, tuple[dict[str, Any], int, str]]:
    nan_token = key.query(np.zeros((1, DIM)))
    nan_full = nan_token.full.copy()
    nan_full[0, 0] = np.nan
    many = base64.b64encode(key.query(np.zeros((65, DIM))).to_bytes()).decode()
    return {
        "bad base64": (_payload(key, token="!!! not base64 !!!"), 422, "base64"),
        "token garbage": (_payload(key, token=base64.b64encode(b"garbage").decode()), 422,
                          "token"),
        "token bad magic": (_payload(key, token=base64.b64encode(b"XXXX" + b"\0" * 40)
                                     .decode()), 422, "magic"),
        "token truncated": (_payload(key, token=base64.b64encode(
            key.query(np.zeros((1, DIM))).to_bytes()[:-8]).decode()), 422, "length"),
        "token non-finite": (_payload(key, token=_token_with(key, full=nan_full)), 422,
                             "non-finite"),
        "65 queries": (_payload(key, token=many), 422, "query count"),
        "token of another key shape": (_payload(key, token=base64.b64encode(
            IndexKey.generate(DIM, levels=(4,)).query(np.zeros((1, DIM))).to_bytes())
            .decode()), 422, "key version"),
        "k=0": (_payload(key, k=0), 422, "k"),
        "k=1000": (_payload(key, k=1000), 422, "k"),
        "k not a number": (_payload(key, k="many"), 422, "k"),
        "key_version=0": (_payload(key, key_version=0), 422, "key_version"),
        "no token": ({"k": 1, "key_version": 1}, 422, "token"),
    }


@pytest.mark.parametrize("case", ["bad base64", "token garbage", "token bad magic",
                                  "token truncated", "token non-finite", "65 queries",
                                  "token of another key shape", "k=0", "k=1000",
                                  "k not a number", "key_version=0", "no token"])
def test_bad_search_request_gets_4xx_with_clear_detail(
    http: httpx.Client, key: IndexKey, served_repo: str, case: str
) -> None:
    payload, status, words = _bad_requests(key)[case]
    response = http.post(f"/v1/repos/{served_repo}/search", json=payload)
    assert response.status_code == status, response.text
    detail = _detail_text(response)
    assert words in detail, detail
    assert "Traceback" not in response.text


def test_body_that_is_not_json(http: httpx.Client, served_repo: str) -> None:
    response = http.post(f"/v1/repos/{served_repo}/search", content=b"{not json",
                         headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "JSON" in _detail_text(response)


@pytest.mark.parametrize("repo", ["Bad_Repo", "-leading-dash", "x" * 64, "a.b"])
@pytest.mark.parametrize("route", ["search", "refresh"])
def test_invalid_repository_name(http: httpx.Client, key: IndexKey, repo: str,
                                 route: str) -> None:
    response = http.post(f"/v1/repos/{repo}/{route}", json=_payload(key))
    assert response.status_code == 422, response.text
    assert "invalid repo_id" in _detail_text(response)


def test_body_over_one_mib_with_content_length(service: support.ServiceProcess,
                                              served_repo: str) -> None:
    big = json.dumps({"token": "A" * (MiB + 16), "k": 1, "key_version": 1}).encode()
    with httpx.Client(base_url=service.url, timeout=30.0) as http:
        response = http.post(f"/v1/repos/{served_repo}/search", content=big,
                             headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["detail"] == "request body too large"


def test_body_over_one_mib_chunked(service: support.ServiceProcess, served_repo: str) -> None:
    """No Content-Length (chunked transfer): the limit must still answer 413 clearly."""
    big = json.dumps({"token": "A" * (MiB + 16), "k": 1, "key_version": 1}).encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    with httpx.Client(base_url=service.url, timeout=30.0) as http:
        response = http.post(f"/v1/repos/{served_repo}/search", content=chunks(),
                             headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json()["detail"] == "request body too large"


def test_body_not_utf8_without_content_type(service: support.ServiceProcess,
                                            served_repo: str) -> None:
    """Binary garbage with no content type is a client error (4xx), not a server crash."""
    with httpx.Client(base_url=service.url, timeout=30.0) as http:
        response = http.post(f"/v1/repos/{served_repo}/search", content=b"\xff" * 100)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)


def test_service_still_serves_after_refused_requests(service: support.ServiceProcess,
                                                     key: IndexKey, served_repo: str) -> None:
    bad_bodies = [b"\xff" * 100, b"{not json", b"[]", b'{"token": 5}']
    for body in bad_bodies:
        with httpx.Client(base_url=service.url, timeout=30.0) as http:
            with contextlib.suppress(httpx.TransportError):
                http.post(f"/v1/repos/{served_repo}/search", content=body,
                          headers={"content-type": "application/json"})
            with contextlib.suppress(httpx.TransportError):
                http.post(f"/v1/repos/{served_repo}/search", content=body)
    with httpx.Client(base_url=service.url, timeout=30.0) as http:
        answer = _search(http, served_repo, key, np.zeros((1, DIM)), 2)
        assert len(answer["results"][0]["hits"]) == 2
        assert http.get("/healthz").json()["status"] == "ok"
    assert not support.pid_gone(service.pid)
