"""CKKS mode (issue 19, SECURITY.md 4.2 "Who can write the evaluation keys"): a member
forges the current key version's evaluation keys, and the client refuses them.

The evaluation keys ``repos/<repo>/ckks/<v>`` are MAC'd under the version's index MAC key,
which every holder of the version's data key has; the client sends their body's SHA-256
and an honest keyless service scores with them. Here a granted member (Bob, through his
own client and key ring) writes, over the real object, relinearisation keys made from the
version's real CKKS secret key plus a constant added to every key polynomial (word-level
edit of SEAL's serialisation), the real rotations, MAC'd with the right key: the object
passes every integrity check, and the scores the honest service returns decrypt *in range*
(the client's range check lets them through) but off by far more than the error bound the
exact re-scoring relies on, so the top-k may be silently wrong. The owner's client must
refuse the search with a plain-words error naming the object, before asking the service;
`radcrypt check` must report the object; the honest keys must pass, tested once per
process (counted), and the search stay exact.

One module-scoped repository of real sample DICOM files (TenSEAL key generation is slow).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

try:
    import owned_repos
    from workstation import ModeArchive, mode_archive
except ImportError:  # pragma: no cover
    from tests import owned_repos
    from tests.workstation import ModeArchive, mode_archive

from app.core import ckks_blocks, ckks_search
from app.core.errors import IntegrityError
from app.core.logstate import verified_log
from cloud import ckks_store
from crypto import ckks
from crypto.segment_mac import index_mac_key

FILES = 12
BATCH = 6
# Added to every relinearisation key polynomial (mod QP): scores come back off by about 4,
# within the client's range check (crypto.ckks.SCORE_LIMIT), 400 times the error bound.
FORGED_CONSTANT = 2**73


Archive = ModeArchive


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    with mode_archive(tmp_path_factory.mktemp("ckks-forgery"), "hf", "Dr. Forgery", FILES,
                      BATCH) as made:
        yield made
    ckks_blocks.forget()


def _truth(archive: Archive) -> tuple[list[str], np.ndarray]:
    metas = archive.client.list_images(archive.repo)
    return [m.image_id for m in metas], np.array([m.features for m in metas])


def _top(ids: list[str], x: np.ndarray, q: np.ndarray, k: int) -> list[str]:
    d = np.einsum("ij,ij->i", x - q, x - q)
    return [ids[i] for i in np.lexsort((np.array(ids, dtype=object), d))[:k]]


class _Spy:
    """Counts the calls of a real function (its result is returned unchanged)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_honest_keys_pass_once_and_the_search_is_exact(archive: Archive,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ckks_blocks.forget()  # a fresh process: nothing tested yet
    spy = _Spy(ckks.CkksKey.evaluation_keys_work)
    monkeypatch.setattr(ckks.CkksKey, "evaluation_keys_work",
                        lambda self, *a: spy(self, *a))
    ids, x = _truth(archive)
    queries = x[:3] + 0.01
    results = archive.client.search_features(archive.repo, queries, ["a", "b", "c"], 3,
                                             group=False)
    more = archive.client.search_features(archive.repo, x[4], ["d"], 2, group=False)
    for q, result in zip([*queries, x[4]], [*results, *more], strict=True):
        assert result.stats["mode"] == "ckks" and result.complete is True
        assert [h.image_id for h in result.hits] == _top(ids, x, q, len(result.hits))
    assert spy.calls == 1  # four searches, the keys tested once


def _forged_relin_keys(key: ckks.CkksKey, constant: int) -> bytes:
    """The relinearisation keys of ``key`` (the version's real secret key, which the forger
    derives from the data key like any member) with ``constant`` added to the first
    polynomial of every key-switching key, re-serialised by hand (SEAL's uncompressed
    layout: header, KSwitchKeys members, then each key's ciphertext) and loaded back
    through SEAL, so the object is as well-formed as the real one."""
    seal = ckks._seal()
    relin = seal.RelinKeys()
    key._keygen.create_relin_keys(relin)
    proto = ckks._save(relin)[:16]  # SEAL's header: magic, sizes, version, compression

    def header(total: int) -> bytes:  # the same header, uncompressed, of ``total`` bytes
        return proto[:5] + b"\x00\x00\x00" + struct.pack("<Q", total)

    primes = [m.value() for m in key.context.key_context_data().parms().coeff_modulus()]
    members = struct.pack("<4Q", *relin.parms_id()) + struct.pack("<Q", len(relin.data()))
    for row in relin.data():
        members += struct.pack("<Q", len(row))
        for public in row:
            ct = public.data()
            array = ct.dyn_array()
            words = np.array([array[i] for i in range(array.size())], dtype=np.uint64)
            n = ct.poly_modulus_degree()
            for i, q in enumerate(primes):  # the first polynomial, prime by prime (NTT form:
                part = words[i * n:(i + 1) * n]  # a constant is a constant in every slot)
                words[i * n:(i + 1) * n] = (part + np.uint64(constant % q)) % np.uint64(q)
            data = struct.pack("<Q", len(words)) + words.astype("<u8").tobytes()
            body = (struct.pack("<4Q", *ct.parms_id()) + bytes([int(ct.is_ntt_form())])
                    + struct.pack("<QQQdQ", ct.size(), n, ct.coeff_modulus_size(), ct.scale, 1)
                    + header(16 + len(data)) + data)
            members += header(16 + len(body)) + body
    forged = ckks._load(seal.RelinKeys, key.context, header(16 + len(members)) + members,
                        "forged relinearisation keys")
    return ckks._save(forged)


def test_forged_evaluation_keys_are_refused_never_used(archive: Archive,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    from app.core import client as facade
    from app.core.settings import Settings

    client, repo, store = archive.client, archive.repo, archive.store
    ids, x = _truth(archive)
    # Bob, a member: his own client, his own key ring, the same bucket
    bob_settings = Settings(store="directory", data_dir=str(archive.root / "bob"), workers=1)
    bob_identity = owned_repos.identity_on_disk(bob_settings.data_path, "Bob",
                                                owned_repos.OTHER_STRONG_PASSWORD)
    bob_settings.objects_dir.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(client.settings.objects_dir, bob_settings.objects_dir)
    client.register_user(bob_identity.card().to_json())
    client.grant(repo, bob_identity.user_id)
    version = repo.keys.version
    name = ckks_store.eval_keys_key(repo.repo_id, version)
    original = store.get(name)
    with facade.Client(bob_settings, bob_identity) as bob:
        data_key = bob.open_repository("hf").ring.version(version).data_key
    # the forgery: the version's real secret key (from the data key), relinearisation keys
    # with an error added, real rotations, MAC'd with the version's MAC key, over the object
    secret = ckks.CkksKey(ckks.seed_from_data_key(data_key, repo.repo_id, version))
    real = ckks.unpack_parts(secret.evaluation_keys(ckks.period_of(repo.manifest.dim)),
                             ckks.KIND_EVAL, "keys")[2]
    body = ckks.pack_parts(ckks.KIND_EVAL, 0, 0,
                           [_forged_relin_keys(secret, FORGED_CONSTANT), real[1]])
    store.put(name, ckks_store.build_eval_object(index_mac_key(data_key), repo.repo_id,
                                                 version, body))
    try:
        # Every integrity check passes: head, MAC, digest (what a client sent before).
        digest = ckks_blocks.eval_digest(store, repo, version)
        assert digest == hashlib.sha256(body).digest()
        # What an honest service returns with them: in range, so not refused as noise,
        # but off by far more than the bound the exact re-scoring relies on.
        state = verified_log(store, client.settings, repo)
        seg_ids = [o.id for o in state.segments(version)]
        key = ckks_blocks.key_of(repo, version)
        query = x[0] + 0.01
        answer = ckks_store.CkksScorers(store).answer(
            repo.repo_id, state, seg_ids, 0, b"",
            ckks_store.CkksRequest(version, 0, digest, key.encrypt_query(query, 128)))
        scores = key.decrypt_scores(answer.scores, answer.counts)
        rows = {image_id: i for i, image_id in enumerate(ids)}
        truth = np.array([x[rows[i]] @ query - 0.5 * x[rows[i]] @ x[rows[i]]
                          for seg in answer.image_ids for i in seg])
        assert np.abs(scores - truth).max() > 10 * ckks.ERROR_BOUND
        # The owner's search: refused, naming the object, before the service is asked.
        asked = _Spy(ckks_search._ask)
        monkeypatch.setattr(ckks_search, "_ask", asked)
        with pytest.raises(IntegrityError, match=re.escape(
                f"{name}: evaluation keys do not work with this repository's CKKS key")) \
                as caught:
            client.search_features(repo, query, ["q"], 3, group=False)
        assert "not by the service" in str(caught.value) and asked.calls == 0
        ckks_blocks.forget()  # a new process refuses them as well (tested afresh)
        with pytest.raises(IntegrityError, match="not by the service"):
            client.search_features(repo, query, ["q"], 3, group=False)
        assert asked.calls == 0
        # `radcrypt check` names the object
        check = client.check_repository(repo)
        found = [p for p in check.problems if p.type == "evaluation keys"]
        assert [(p.kind, p.id) for p in found] == [("wrong key", f"ckks/{version}")], found
        assert "not by the service" in found[0].detail
    finally:
        store.put(name, original)
    # the real object back: searches work again, exact
    result = client.search_features(repo, query, ["q"], 3, group=False)[0]
    assert [h.image_id for h in result.hits] == _top(ids, x, query, 3)
    assert client.check_repository(repo).ok
