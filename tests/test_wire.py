"""Wire protocol 2 (cloud/wire.py, docs/FORMAT-2.md 8): the binary token, request
and answer as bytes, and the route POST /v2/repos/<repo>/search of the real application
(cloud.service.create_app with the real SignatureVerifier over a directory store), driven
by the real client (app.core.service_client.ServiceClient) through FastAPI's TestClient;
one test runs the service as its own process and checks the connection is kept alive.

The vector files tests/vectors/{token_v2,wire_request,wire_answer}.json (written by
tests/vectors/gen_wire.py) are checked here too: every valid vector decodes to what it
says, every broken one fails with the error or HTTP status it names.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.errors import ServiceError
from app.core.identity import RequestSigner
from app.core.service_client import ServiceClient, signed_headers
from bench import datasets
from cloud import layout, wire
from cloud.auth import SignatureVerifier, request_message
from cloud.directory_store import DirectoryStore
from cloud.segments import encode_segment
from cloud.service import create_app
from crypto.errors import FormatError
from crypto.identity import Identity
from crypto.index import IndexKey
from crypto.signed import sign_json
from crypto.tokens import QueryToken

DIM = 32
SERVICE_ID = "svc-wire-test"
VECTORS = Path(__file__).resolve().parent / "vectors"


# --- the world: an owner, a member, a repository of two segments --------------------------


class World:
    def __init__(self, root: Path) -> None:
        self.store = DirectoryStore(root)
        self.owner = Identity.generate("Wire Owner")
        self.alice = Identity.generate("Wire Alice")
        self.outsider = Identity.generate("Wire Outsider")
        for user in (self.owner, self.alice, self.outsider):
            self._register(user)
        self.repo = "wire-" + layout.new_id()[:8]
        self._manifest(self.repo, members=[self.owner, self.alice])
        rng = np.random.default_rng(7)
        self.features = datasets.low_rank_varying(rng, 300, DIM)
        self.key = IndexKey.generate(DIM, sample=self.features)
        self.ids = [layout.new_id() for _ in range(len(self.features))]
        self.seg_ids = sorted(layout.new_id() for _ in range(2))
        for seg_id, rows in zip(self.seg_ids, (slice(0, 180), slice(180, 300)), strict=True):
            blob = encode_segment(self.ids[rows], self.key.encrypt(self.features[rows]), 1)
            self.store.put(layout.segment_key(self.repo, seg_id), blob)
        self.app = create_app(self.store, SignatureVerifier(self.store, [self.owner.sign_public],
                                                             SERVICE_ID),
                              refresh_interval=3600.0, service_id=SERVICE_ID)
        self.http = TestClient(self.app)

    def _register(self, user: Identity) -> None:
        name = layout.user_key(user.user_id)
        card = user.card()
        payload: dict[str, object] = {
            "card": card.to_json(), "fingerprint": card.fingerprint,
            "registered": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        self.store.put(name, sign_json(self.owner, "user", name, payload))

    def _manifest(self, repo: str, members: list[Identity], storage_format: int = 1) -> None:
        name = layout.manifest_key(repo)
        payload: dict[str, object] = {
            "repo_id": repo, "name": repo, "dim": DIM, "extractor": "radcrypt-v1",
            "format": f"radcrypt-manifest-v{storage_format}",
            "key_version": 1, "sequence": 1, "owner": self.owner.user_id,
            "members": [{"user_id": m.user_id, "key_version": 1}
                        for m in sorted(members, key=lambda m: m.user_id)]}
        self.store.put(name, sign_json(self.owner, "manifest", name, payload))

    def client(self, who: Identity | None = None) -> ServiceClient:
        return ServiceClient("http://testserver", RequestSigner(who or self.alice),
                             service_id=SERVICE_ID, http=self.http)

    def token(self, rows: list[int], noise: float = 0.01) -> QueryToken:
        rng = np.random.default_rng(len(rows))
        queries = self.features[rows] + noise * rng.standard_normal((len(rows), DIM))
        return self.key.query(queries)

    def post_v2(self, body: bytes, *, who: Identity | None = None, protocol: str | None = "2",
                sign_protocol: int = 2, repo: str | None = None) -> Any:
        path = f"/v2/repos/{repo or self.repo}/search"
        headers = {"content-type": wire.REQUEST_MEDIA_TYPE}
        if protocol is not None:
            headers[wire.PROTOCOL_HEADER] = protocol
        if who is not None:
            headers.update(signed_headers(who, "POST", path, body, SERVICE_ID, sign_protocol))
        return self.http.post(path, content=body, headers=headers)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("wire"))
    with w.http:
        yield w


def _request(world: World, token: QueryToken, **changes: Any) -> bytes:
    fields: dict[str, Any] = {"key_version": 1, "k": 3, "min_head": 0, "flags": 0,
                              "token": token}
    fields.update(changes)
    return wire.encode_request(wire.SearchRequestV2(**fields))


# --- bytes: round trips -------------------------------------------------------------------


@pytest.mark.parametrize(("levels", "queries"), [((), 1), ((3,), 2), ((5, 9, 17), 64)])
def test_token_v2_round_trip_and_alignment(levels: tuple[int, ...], queries: int) -> None:
    rng = np.random.default_rng(queries)
    token = QueryToken(full=rng.standard_normal((queries, 33)),
                       levels=tuple(rng.standard_normal((queries, w)) for w in levels))
    data = wire.encode_token_v2(token)
    widths_end = 16 + 4 * (len(levels) + 1)
    arrays_at = widths_end + (-widths_end % 8)
    assert arrays_at % 8 == 0 and not any(data[widths_end:arrays_at])
    assert len(data) == arrays_at + 8 * queries * sum((*levels, 33))
    assert data[:4] == b"RCQT" and struct.unpack_from("<HHII", data, 4) == (
        2, len(levels), queries, 0)
    back = wire.decode_token_v2(data, 64)
    assert back.widths == token.widths
    np.testing.assert_array_equal(back.full, token.full)
    for a, b in zip(back.levels, token.levels, strict=True):
        np.testing.assert_array_equal(a, b)


def test_request_round_trip_and_layout() -> None:
    token = QueryToken(full=np.arange(6.0).reshape(2, 3), levels=(np.ones((2, 1)),))
    req = wire.SearchRequestV2(key_version=7, k=100, min_head=2**40, flags=3, token=token)
    body = wire.encode_request(req)
    assert body[:32] == b"RCSQ" + struct.pack("<HHIIQQ", 2, 3, 7, 100, 2**40, 0)
    assert body[32:] == wire.encode_token_v2(token)
    back = wire.decode_request(body)
    assert (back.key_version, back.k, back.min_head, back.flags) == (7, 100, 2**40, 3)
    np.testing.assert_array_equal(back.token.full, token.full)


def _answer(**changes: Any) -> wire.SearchAnswerV2:
    seg_ids = sorted(["ab" * 16, "01" * 16, "ff" * 16])
    fields: dict[str, Any] = {
        "key_version": 2, "k": 2, "segments": 3, "images": 1000, "head_sequence": 41,
        "head_hash": hashlib.sha256(b"head").digest(),
        "set_digest": wire.segment_set_digest("repo-a", 2, seg_ids), "engine_us": 1234,
        "hits": [[("11" * 16, 3.5), ("22" * 16, -1.25)], [], [("33" * 16, 0.0)]],
        "stats": None, "segment_ids": None}
    fields.update(changes)
    return wire.SearchAnswerV2(**fields)


def test_answer_round_trips_with_and_without_sections() -> None:
    stats = [{"vectors": 1000, "level_scored": [1000, 40], "full_scored": 3,
              "fraction_fully_scored": 0.003, "milliseconds": 0.75, "batch": 3}] * 3
    seg_ids = sorted(["ab" * 16, "01" * 16, "ff" * 16])
    for extra in ({}, {"segment_ids": seg_ids}, {"stats": stats},
                  {"segment_ids": seg_ids, "stats": stats}):
        answer = _answer(**extra)
        body = wire.encode_answer(answer)
        flags = struct.unpack_from("<H", body, 6)[0]
        assert flags == ((wire.FLAG_LIST_SEGMENTS if "segment_ids" in extra else 0)
                         | (wire.FLAG_STATS if "stats" in extra else 0))
        back = wire.decode_answer(body, queries=3, k=2, key_version=2, repo_id="repo-a")
        assert back == answer
    plain = wire.encode_answer(_answer())
    # 112 header + 3 counts (12, padded to 16) + 3 ids + 3 scores
    assert len(plain) == 112 + 16 + 3 * 16 + 3 * 8
    assert struct.unpack_from("<3I", plain, 112) == (2, 0, 1)


def test_empty_answer_is_the_digest_of_the_empty_set() -> None:
    empty = wire.segment_set_digest("repo-a", 1, [])
    label = b"radcrypt/segment-set/v2"
    assert empty == hashlib.sha256(struct.pack(">I", len(label)) + label + struct.pack(">I", 6)
                                   + b"repo-a" + struct.pack(">IQ", 1, 0)).digest()
    assert wire.segment_set_digest("repo-a", 1, ["ff" * 16, "00" * 16]) == \
        wire.segment_set_digest("repo-a", 1, ["00" * 16, "ff" * 16])
    assert wire.segment_set_digest("repo-a", 2, []) != empty
    assert wire.segment_set_digest("repo-b", 1, []) != empty


# --- bytes: broken answers (FORMAT-2 10, wire_answer) ---------------------------------------


def _broken_answers() -> list[tuple[str, bytes, dict[str, Any]]]:
    seg_ids = sorted(["ab" * 16, "01" * 16, "ff" * 16])
    good = wire.encode_answer(_answer(segment_ids=seg_ids))
    plain = wire.encode_answer(_answer())
    ids_at = 112 + 16
    scores_at = ids_at + 3 * 16
    asked = {"queries": 3, "k": 2, "key_version": 2}
    return [
        ("truncated", plain[:-1], asked),
        ("truncated-header", plain[:100], asked),
        ("trailing-byte", plain + b"\0", asked),
        ("count-above-k", plain[:112] + struct.pack("<I", 3) + plain[116:], asked),
        ("nan-score", plain[:scores_at] + struct.pack("<d", float("nan"))
         + plain[scores_at + 8:], asked),
        ("queries-differ", plain, {**asked, "queries": 2}),
        ("k-differs", plain, {**asked, "k": 3}),
        ("key-version-differs", plain, {**asked, "key_version": 1}),
        ("bad-magic", b"RCSX" + plain[4:], asked),
        ("protocol-3", plain[:4] + struct.pack("<H", 3) + plain[6:], asked),
        ("unknown-flag", plain[:6] + struct.pack("<H", 4) + plain[8:], asked),
        ("reserved-set", plain[:108] + struct.pack("<I", 1) + plain[112:], asked),
        ("padding-set", plain[:124] + b"\1" + plain[125:], asked),
        ("duplicate-hit", plain[:ids_at + 16] + plain[ids_at:ids_at + 16] + plain[ids_at + 32:],
         asked),
        ("list-digest-differs", good[:72] + hashlib.sha256(b"other").digest() + good[104:],
         {**asked, "repo_id": "repo-a"}),
        ("list-unsorted", good[:-48] + good[-32:-16] + good[-48:-32] + good[-16:],
         {**asked, "repo_id": "repo-a"}),
    ]


@pytest.mark.parametrize(("name", "body", "asked"), _broken_answers(),
                         ids=[c[0] for c in _broken_answers()])
def test_broken_answers_are_refused(name: str, body: bytes, asked: dict[str, Any]) -> None:
    with pytest.raises(wire.WireError, match="malformed answer"):
        wire.decode_answer(body, **asked)


# --- the route, through the real application ------------------------------------------------


def test_info_lists_both_protocols(world: World) -> None:
    info = world.http.get("/v1/info").json()
    assert info == {"service_id": SERVICE_ID, "protocol": 1, "protocols": [1, 2]}
    # discovery answers whichever protocol the client speaks
    assert world.http.get("/v1/info", headers={wire.PROTOCOL_HEADER: "2"}).json() == info


def test_protocol_2_answers_like_protocol_1(world: World) -> None:
    client = world.client()
    token = world.token([5, 200, 299])
    answer = client.search_v2(world.repo, token, 3, 1)
    first = client.search(world.repo, token, 3, 1)["results"]
    assert [[i for i, _ in q] for q in answer.hits] == [
        [h["image_id"] for h in q["hits"]] for q in first]
    assert [[s for _, s in q] for q in answer.hits] == [
        [h["score"] for h in q["hits"]] for q in first]
    assert [q[0][0] for q in answer.hits] == [world.ids[5], world.ids[200], world.ids[299]]
    assert answer.stats is not None and [s["vectors"] for s in answer.stats] == [300] * 3
    assert set(answer.stats[0]) == set(first[0]["stats"])
    # format 1: no log, head 0; the digest names the two segments searched
    assert (answer.head_sequence, answer.head_hash) == (0, bytes(32))
    assert (answer.segments, answer.images, answer.segment_ids) == (2, 300, None)
    assert answer.set_digest == wire.segment_set_digest(world.repo, 1, world.seg_ids)
    assert answer.engine_us > 0


def test_segment_list_and_no_stats_when_asked(world: World) -> None:
    answer = world.client().search_v2(world.repo, world.token([1]), 1, 1, list_segments=True,
                                      stats=False)
    assert answer.segment_ids == world.seg_ids and answer.stats is None


def test_unknown_key_version_answers_nothing_searched(world: World) -> None:
    answer = world.client().search_v2(world.repo, world.token([1, 2]), 5, 9,
                                      list_segments=True)
    assert answer.hits == [[], []] and answer.segments == 0 and answer.images == 0
    assert answer.segment_ids == []
    assert answer.set_digest == wire.segment_set_digest(world.repo, 9, [])


def test_min_head_beyond_the_snapshot_refreshes_first(world: World) -> None:
    """A client that verified a head the service has not reached makes it re-read the
    bucket before answering (FORMAT-2 6.2): here a segment added after the first load is
    searched at once although the refresh interval is an hour."""
    client = world.client()
    repo = "wire-" + layout.new_id()[:8]
    world._manifest(repo, members=[world.owner, world.alice])
    first = layout.new_id()
    world.store.put(layout.segment_key(repo, first), encode_segment(
        world.ids[:10], world.key.encrypt(world.features[:10]), 1))
    assert client.search_v2(repo, world.token([50]), 1, 1).images == 10
    second = layout.new_id()
    world.store.put(layout.segment_key(repo, second), encode_segment(
        world.ids[10:100], world.key.encrypt(world.features[10:100]), 1))
    assert client.search_v2(repo, world.token([50]), 1, 1).images == 10  # cached snapshot
    answer = client.search_v2(repo, world.token([50]), 1, 1, min_head=1)
    assert answer.images == 100 and answer.hits[0][0][0] == world.ids[50]


def test_format2_answer_names_the_verified_head_and_digest(world: World) -> None:
    """A format-2 repository: the service verifies the log with its owner keys, searches
    exactly the live segments, and names the head, its hash and the set digest the
    client's own verified log gives; a min_head beyond its snapshot makes it re-read the
    log first. A segment in the bucket but not in the log is never searched."""
    from cloud import seglog
    from cloud.segments import encode_segment_v2
    from crypto.segment_mac import index_mac_key

    store, owner, client = world.store, world.owner, world.client()
    repo = "wire-" + layout.new_id()[:8]
    world._manifest(repo, members=[owner, world.alice], storage_format=2)
    state = seglog.write_genesis(store, repo, owner, owner.user_id, 1, 1)
    trust = seglog.StaticTrust(owner.user_id, owner.sign_public, 1, 1,
                               {world.alice.user_id: world.alice.sign_public})
    token = world.token([20])
    first = client.search_v2(repo, token, 1, 1, min_head=state.head.sequence,
                             list_segments=True)
    assert (first.head_sequence, first.head_hash) == (0, state.head.hash)
    assert first.segments == 0 and first.segment_ids == [] and first.hits == [[]]
    assert first.set_digest == state.set_digest(1)
    seg_id, pack_id = sorted(layout.new_id() for _ in range(2))
    blob = encode_segment_v2(world.ids[:50], world.key.encrypt(world.features[:50]), 1,
                             seg_id=seg_id, writer=owner.user_id, base_sequence=0,
                             repo_id=repo, mac_key=index_mac_key(bytes(32)))
    store.put(layout.segment_key(repo, seg_id), blob)
    state = seglog.append(store, repo, owner, owner.user_id, trust, state,
                          kind=seglog.KIND_ADD, reason=seglog.REASON_IMPORT, key_version=1,
                          added=[seglog.Added(seglog.TYPE_SEGMENT, seg_id,
                                              hashlib.sha256(blob).digest(), 50),
                                 seglog.Added(seglog.TYPE_PACK, pack_id,
                                              hashlib.sha256(b"pack").digest(), 50)])
    rogue = layout.new_id()
    store.put(layout.segment_key(repo, rogue), encode_segment(
        world.ids[50:100], world.key.encrypt(world.features[50:100]), 1))
    answer = client.search_v2(repo, token, 1, 1, min_head=state.head.sequence,
                              list_segments=True)
    assert (answer.head_sequence, answer.head_hash) == (1, state.head.hash)
    assert answer.segment_ids == [seg_id] and answer.images == 50
    assert answer.set_digest == state.set_digest(1)
    assert answer.hits[0][0][0] == world.ids[20]
    verdict = seglog.judge_answer(state, 1, answer.head_sequence, answer.head_hash,
                                  answer.set_digest, answer.segments, answer.segment_ids)
    assert verdict is not None and verdict.complete
    assert client.refresh_v2(repo)["head"] == 1


def test_an_unreachable_min_head_does_not_re_read_the_log_every_time(world: World) -> None:
    """A client claiming a head the service cannot reach gets the service's head; the
    log is then re-read at most once per HEAD_RETRY_SECONDS, not on every request."""
    client = world.client()
    index = world.app.state.radcrypt.repo(world.repo)
    calls: list[int] = []
    real = index.refresh

    def counted(min_head: int = 0) -> Any:
        calls.append(min_head)
        return real(min_head=min_head)

    index.refresh = counted  # type: ignore[method-assign]
    try:
        answers = [client.search_v2(world.repo, world.token([4]), 1, 1, min_head=10**6)
                   for _ in range(3)]
    finally:
        del index.refresh
    assert [a.head_sequence for a in answers] == [0, 0, 0]
    assert answers[2].hits[0][0][0] == world.ids[4]
    assert calls == [10**6]


def test_wrong_width_token_is_422(world: World) -> None:
    other = IndexKey.generate(DIM + 4)
    token = other.query(np.zeros((1, DIM + 4)))
    response = world.post_v2(_request(world, token), who=world.alice)
    assert response.status_code == 422


BAD_REQUESTS: list[tuple[str, dict[str, Any], int]] = [
    ("protocol-3-header", {"protocol": "3"}, 400),
    ("protocol-garbage-header", {"protocol": "two"}, 400),
    ("no-header-on-v2-path", {"protocol": None}, 400),
    ("header-1-on-v2-path", {"protocol": "1"}, 400),
    ("body-says-3", {"body": lambda b: b[:4] + struct.pack("<H", 3) + b[6:]}, 400),
    ("body-bad-magic", {"body": lambda b: b"RCSX" + b[4:]}, 400),
    ("body-empty", {"body": lambda b: b""}, 400),
    ("unknown-flag-bit", {"body": lambda b: b[:6] + struct.pack("<H", 4) + b[8:]}, 422),
    ("k-0", {"body": lambda b: b[:12] + struct.pack("<I", 0) + b[16:]}, 422),
    ("k-101", {"body": lambda b: b[:12] + struct.pack("<I", 101) + b[16:]}, 422),
    ("key-version-0", {"body": lambda b: b[:8] + struct.pack("<I", 0) + b[12:]}, 422),
    ("reserved-set", {"body": lambda b: b[:24] + struct.pack("<Q", 1) + b[32:]}, 422),
    ("header-only", {"body": lambda b: b[:32]}, 422),
    ("truncated-header", {"body": lambda b: b[:20]}, 422),
    ("token-v1", {"body": lambda b: b[:32] + b"RCQT\x01" + b[37:]}, 422),
    ("token-trailing-byte", {"body": lambda b: b + b"\0"}, 422),
    ("signed-as-protocol-1", {"sign_protocol": 1}, 401),
    ("unsigned", {"who": None}, 401),
]


@pytest.mark.parametrize(("name", "change", "status"), BAD_REQUESTS,
                         ids=[c[0] for c in BAD_REQUESTS])
def test_broken_requests_get_their_status(world: World, name: str, change: dict[str, Any],
                                          status: int) -> None:
    body = _request(world, world.token([3]))
    if "body" in change:
        body = change["body"](body)
    response = world.post_v2(body, who=change.get("who", world.alice),
                             protocol=change.get("protocol", "2"),
                             sign_protocol=change.get("sign_protocol", 2))
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["supported"] == [1, 2]
        assert "protocol" in response.json()["detail"]


def test_protocol_is_checked_before_authentication_after_the_body_limit(world: World) -> None:
    """No signature at all, protocol 3: 400 (a client learns what to speak before anyone
    knows who it is); but an oversized body is 413 whatever its protocol."""
    body = _request(world, world.token([3]))
    response = world.post_v2(body, protocol="3", who=None)
    assert response.status_code == 400
    assert response.json() == {"detail": "unsupported protocol version 3",
                               "supported": [1, 2]}
    big = world.post_v2(body + bytes(1 << 20), protocol="3", who=None)
    assert big.status_code == 413


def test_a_non_member_is_refused_and_protocol_1_is_unchanged(world: World) -> None:
    token = world.token([3])
    assert world.post_v2(_request(world, token), who=world.outsider).status_code == 403
    path = f"/v1/repos/{world.repo}/search"
    body = json.dumps({"token": base64.b64encode(token.to_bytes()).decode(), "k": 1,
                       "key_version": 1}).encode()
    ok = world.http.post(path, content=body, headers={
        "content-type": "application/json",
        **RequestSigner(world.alice).headers("POST", path, body, SERVICE_ID)})
    assert ok.status_code == 200 and ok.json()["results"][0]["hits"][0]["image_id"] == \
        world.ids[3]
    # the protocol-1 path with the protocol-2 header or message is refused
    v2_signed = signed_headers(world.alice, "POST", path, body, SERVICE_ID, 2)
    assert world.http.post(path, content=body, headers={
        "content-type": "application/json", **v2_signed}).status_code == 401
    assert world.http.post(path, content=body, headers={
        "content-type": "application/json", wire.PROTOCOL_HEADER: "2",
        **v2_signed}).status_code == 400


def test_replay_and_revocation_on_the_warm_path(world: World,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The Gate checks a warm request on the event loop (cloud.auth verify_offline): a
    replayed request is still refused, and a member removed from the manifest is refused
    once the membership cache expires, exactly as on the store-reading path."""
    import cloud.auth

    monkeypatch.setattr(cloud.auth, "MEMBER_CACHE_SECONDS", 0.3)
    repo = "wire-" + layout.new_id()[:8]
    world._manifest(repo, members=[world.owner, world.alice])
    body = _request(world, world.token([3]))
    path = f"/v2/repos/{repo}/search"
    assert world.post_v2(body, who=world.alice, repo=repo).status_code == 200  # now cached
    headers = {"content-type": wire.REQUEST_MEDIA_TYPE, wire.PROTOCOL_HEADER: "2",
               **signed_headers(world.alice, "POST", path, body, SERVICE_ID, 2)}
    assert world.http.post(path, content=body, headers=headers).status_code == 200
    assert world.http.post(path, content=body, headers=headers).status_code == 401
    name = layout.manifest_key(repo)
    world.store.put(name, sign_json(world.owner, "manifest", name, {
        "repo_id": repo, "name": repo, "dim": DIM, "extractor": "radcrypt-v1",
        "format": "radcrypt-manifest-v1", "key_version": 1, "sequence": 2,
        "owner": world.owner.user_id,
        "members": [{"user_id": world.owner.user_id, "key_version": 1}]}))
    time.sleep(0.4)
    assert world.post_v2(body, who=world.alice, repo=repo).status_code == 403
    assert world.post_v2(body, who=world.owner, repo=repo).status_code == 200


def test_a_refused_protocol_2_body_is_a_service_error_with_the_detail(world: World) -> None:
    """The client reports the service's 400 (body version 3) in its own words."""
    client = world.client()
    with pytest.raises(ServiceError, match="search service error 400"):
        client._exchange(f"/v2/repos/{world.repo}/search", b"RCSQ\x03\x00", protocol=2)


def test_v2_refresh_names_the_head(world: World) -> None:
    answer = world.client().refresh_v2(world.repo)
    assert answer["head"] == 0 and answer["head_hash"] == "00" * 32
    assert answer["segments"] == 2 and answer["images"] == 300


# --- the request signature (radcrypt-request-v3) -------------------------------------------


def test_request_message_v3_is_v2_plus_a_ninth_line() -> None:
    v2 = request_message("post", "/v2/repos/r/search", "ab" * 32, "1", "n" * 16, "u", "s")
    v3 = request_message("post", "/v2/repos/r/search", "ab" * 32, "1", "n" * 16, "u", "s", 2)
    assert v2.split(b"\n")[0] == b"radcrypt-request-v2" and len(v2.split(b"\n")) == 8
    assert v3.split(b"\n") == [b"radcrypt-request-v3", *v2.split(b"\n")[1:], b"2"]


# --- vector files ----------------------------------------------------------------------------


def _load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return doc


def test_token_v2_vectors() -> None:
    doc = _load("token_v2.json")
    v1 = _load("token.json")
    for vector in doc["vectors"]:
        raw = base64.b64decode(vector["token_b64"])
        token = wire.decode_token_v2(raw, 64)
        assert wire.encode_token_v2(token) == raw
        assert list(token.widths) == vector["widths"] and len(token) == vector["queries"]
        same = QueryToken.from_bytes(base64.b64decode(
            next(t for t in v1["vectors"] if t["name"] == vector["same_as_v1"])["token_b64"]))
        np.testing.assert_array_equal(token.full, same.full)
    for case in doc["broken"]:
        with pytest.raises(FormatError):
            wire.decode_token_v2(base64.b64decode(case["token_b64"]), case["max_queries"])


def test_wire_request_vectors(world: World) -> None:
    doc = _load("wire_request.json")
    for vector in doc["vectors"]:
        body = base64.b64decode(vector["body_b64"])
        req = wire.decode_request(body)
        assert (req.key_version, req.k, req.min_head, req.flags) == (
            vector["key_version"], vector["k"], vector["min_head"], vector["flags"])
        assert wire.encode_request(req) == body
        signed = vector["signed"]
        message = request_message("POST", vector["path"], hashlib.sha256(body).hexdigest(),
                                  signed["stamp"], signed["nonce"], signed["user_id"],
                                  signed["service_id"], 2)
        assert message.decode() == signed["message_utf8"]
    token = world.token([7])
    for case in doc["broken"]:
        if "body_b64" in case:
            body = base64.b64decode(case["body_b64"])
        else:  # this world's keys, the vector's surgery
            body = _request(world, token)
        sign_protocol = case.get("sign_protocol", 2)
        response = world.post_v2(body, who=world.alice, protocol=case.get("header", "2"),
                                 sign_protocol=sign_protocol)
        assert response.status_code == case["status"], (case["name"], response.text)
        if case["status"] == 400:
            assert response.json()["supported"] == [1, 2]


def test_wire_answer_vectors() -> None:
    doc = _load("wire_answer.json")
    for vector in doc["vectors"]:
        body = base64.b64decode(vector["answer_b64"])
        answer = wire.decode_answer(body, queries=vector["queries"], k=vector["k"],
                                    key_version=vector["key_version"],
                                    repo_id=vector["repo_id"])
        assert answer.head_sequence == vector["head_sequence"]
        assert answer.set_digest.hex() == vector["set_digest_hex"]
        assert [[[i, s] for i, s in q] for q in answer.hits] == vector["hits"]
        assert answer.segment_ids == vector["segment_ids"]
        assert wire.encode_answer(answer) == body
    for case in doc["broken"]:
        with pytest.raises(wire.WireError):
            wire.decode_answer(base64.b64decode(case["answer_b64"]), queries=case["queries"],
                               k=case["k"], key_version=case["key_version"],
                               repo_id=case["repo_id"])


# --- the real process: signed, kept alive ---------------------------------------------------


def test_embedded_service_keeps_one_connection(tmp_path: Path, world: World) -> None:
    from app.core.service_client import EmbeddedService
    from cloud.backend import DirectoryConfig

    service = EmbeddedService(DirectoryConfig(world.store.root), tmp_path / "log",
                              owner_keys=[world.owner.sign_public])
    try:
        client = ServiceClient(service.url, RequestSigner(world.alice))
        token = world.token([10, 20])
        first = client.search_v2(world.repo, token, 2, 1)
        started = time.perf_counter()
        for _ in range(5):
            again = client.search_v2(world.repo, token, 2, 1)
        assert again.hits == first.hits and first.hits[0][0][0] == world.ids[10]
        assert client.search(world.repo, token, 2, 1)["results"][1]["hits"][0]["image_id"] \
            == world.ids[20]
        pool = client._http._transport._pool  # type: ignore[attr-defined]
        assert len(pool.connections) == 1, "every search opened a new connection"
        assert time.perf_counter() - started < 30
        client.close()
    finally:
        service.stop()
