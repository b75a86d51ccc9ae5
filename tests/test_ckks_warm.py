"""A cluster shard loads the CKKS blocks of a ckks-mode repository before any request
(cloud/ckks_store.py CkksScorers.warm, cloud/cluster/ckks.py ckks_version,
cloud/cluster/shard.py _warm_ckks), without Ray: the scorer and the manifest check alone.

Warming takes the evaluation keys the store holds, before any client named the SHA-256
it authenticated. The attack: the store's keys were replaced (another key's, with a
consistent head) before the shard warmed; a request naming the authentic keys must be
refused as without warming, never scored with the replaced keys.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud import ckks_store, layout
from cloud.cluster.ckks import ckks_version
from cloud.directory_store import DirectoryStore
from cloud.segments import encode_segment_v2
from crypto import ckks
from crypto.errors import FormatError
from crypto.identity import Identity
from crypto.signed import sign_json
from crypto.tokens import EncryptedVectors

REPO, SEG = "warm-repo", "ab" * 16
MAC_KEY = b"\x05" * 32
DIM = 8
ROWS = np.eye(3, DIM)


@dataclass(frozen=True)
class _Entry:
    id: str
    sha256: bytes


@dataclass(frozen=True)
class _Log:
    """The verified log's answer the scorer asks for: each live segment's SHA-256."""

    entries: tuple[_Entry, ...]

    def segments(self, version: int | None = None) -> list[_Entry]:
        return list(self.entries)


@dataclass(frozen=True)
class _World:
    store: DirectoryStore
    key: ckks.CkksKey
    body: bytes  # the evaluation keys the client authenticated
    replaced: bytes  # another key's, as a hostile store would hold them
    log: _Log
    ids: list[str]


@pytest.fixture(scope="module")
def keys() -> tuple[ckks.CkksKey, bytes, bytes]:
    key = ckks.CkksKey(os.urandom(64))
    period = ckks.period_of(DIM)
    return key, key.evaluation_keys(period), \
        ckks.CkksKey(os.urandom(64)).evaluation_keys(period)


@pytest.fixture
def world(tmp_path: Path, keys: tuple[ckks.CkksKey, bytes, bytes]) -> _World:
    key, body, replaced = keys
    store = DirectoryStore(tmp_path)
    ids = [os.urandom(16).hex() for _ in range(len(ROWS))]
    blob = encode_segment_v2(ids, EncryptedVectors(full=np.zeros((len(ROWS), 1)), levels=()),
                             1, seg_id=SEG, writer="owner", base_sequence=1, repo_id=REPO,
                             mac_key=MAC_KEY, ckks=key.encrypt_block(ROWS).data)
    store.put(layout.segment_key(REPO, SEG), blob)
    return _World(store, key, body, replaced,
                  _Log((_Entry(SEG, hashlib.sha256(blob).digest()),)), ids)


def _put_keys(world: _World, body: bytes) -> None:
    world.store.put(ckks_store.eval_keys_key(REPO, 1),
                    ckks_store.build_eval_object(MAC_KEY, REPO, 1, body))


def _request(world: _World) -> ckks_store.CkksRequest:
    return ckks_store.CkksRequest(1, 0, hashlib.sha256(world.body).digest(),
                                  world.key.encrypt_query(ROWS[1], ckks.period_of(DIM)))


def _answer(scorers: ckks_store.CkksScorers, world: _World) -> Any:
    return scorers.answer(REPO, world.log, [SEG], 1, b"h" * 32, _request(world))


def test_warmed_blocks_serve_the_first_request(world: _World) -> None:
    _put_keys(world, world.body)
    with ckks_store.CkksScorers(world.store, workers=1) as scorers:
        assert scorers.warm(REPO, world.log, [SEG], 1) == 1
        world.store.delete(layout.segment_key(REPO, SEG))  # no second read is possible
        answer = _answer(scorers, world)
        assert answer.segment_ids == [SEG] and answer.image_ids == [world.ids]
        scores = world.key.decrypt_scores(answer.scores, answer.counts)
        assert int(np.argmax(scores)) == 1  # the query is row 1
        assert scorers.warmed == {(REPO, 1): 1}


def test_keys_replaced_in_the_store_before_warming_are_never_used(world: _World) -> None:
    _put_keys(world, world.replaced)
    with ckks_store.CkksScorers(world.store, workers=1) as scorers:
        assert scorers.warm(REPO, world.log, [SEG], 1) == 1  # loaded with them, unasked
        with pytest.raises(FormatError, match="does not match the digest"):
            _answer(scorers, world)  # the client named other keys: refused (422)
        _put_keys(world, world.body)  # the owner restores them: answered with those
        answer = _answer(scorers, world)
        scores = world.key.decrypt_scores(answer.scores, answer.counts)
        assert int(np.argmax(scores)) == 1
    closed = ckks_store.CkksScorers(world.store, workers=1)
    closed.close()
    assert closed.warm(REPO, world.log, [SEG], 1) == 0  # a dropped layout loads nothing


def test_only_a_ckks_manifest_signed_by_an_owner_key_is_warmed(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    owner, stranger = Identity.generate("Owner", "owner"), Identity.generate("X", "x")
    name = layout.manifest_key(REPO)
    payload: dict[str, object] = {"repo_id": REPO, "owner": owner.user_id, "key_version": 3}
    assert ckks_version(store, REPO, [owner.sign_public]) is None  # no manifest
    for signer, extra, found in ((owner, {"search": "ckks"}, 3), (owner, {}, None),
                                 (owner, {"search": "workstation"}, None),
                                 (stranger, {"search": "ckks"}, None)):
        store.put(name, sign_json(signer, "manifest", name, {**payload, **extra}))
        assert ckks_version(store, REPO, [owner.sign_public]) == found, (signer, extra)
    store.put(name, b"not a manifest")
    assert ckks_version(store, REPO, [owner.sign_public]) is None
