"""CKKS search mode end to end (issue 19): the facade, the importer writing each segment's
CKKS block and the key version's evaluation keys, the embedded search service scoring
encrypted blocks, the client decrypting, re-scoring exactly and fetching the hits.

Truth is plaintext brute force over every stored feature vector (decrypted metadata).
One module-scoped repository of real sample DICOM files (TenSEAL key generation is slow);
the tests run in file order and the last one rotates the key version. Needs H5's patches
(p17-H5-segments, -workstation_index, -access, -client): without them import fails.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

try:
    import owned_repos
    from workstation import sample_files
except ImportError:  # pragma: no cover
    from tests import owned_repos
    from tests.workstation import sample_files

from app.core import ckks_blocks
from app.core.errors import AccessDenied, IncompleteAnswer, IntegrityError, ServiceError
from app.core.logstate import verified_log
from cloud import ckks_store, layout
from cloud.directory_store import DirectoryStore
from cloud.segments import decode_segment, parse_header
from crypto import ckks
from crypto.errors import FormatError

FILES = 24
BATCH = 8
SEED = 1927


@dataclass
class Archive:
    client: Any
    repo: Any
    root: Path
    files: list[Path]


def _restart_service(client: Any) -> None:
    """A new service process: nothing it loaded before is kept (what an attacker who
    alters the bucket between two loads faces)."""
    session = client.session
    if session._service is not None:
        session._service.close()
        session._service = None
    if session._embedded_service is not None:
        session._embedded_service.stop()
        session._embedded_service = None


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    from app.core import client as facade
    from app.core.settings import Settings

    root = tmp_path_factory.mktemp("ckks-e2e")
    settings = Settings(store="directory", data_dir=str(root / "owner"), workers=1)
    identity = facade.create_identity(settings, "Dr. Ckks", owned_repos.STRONG_PASSWORD)
    files = sample_files(FILES)
    with facade.Client(settings, identity) as client:
        repo = client.create_repository("he", search="ckks")
        report = client.import_files(repo, files, batch_size=BATCH)
        assert report.imported and not report.failed
        yield Archive(client, client.repository("he"), root, files)
    ckks_blocks.forget()


def _truth(archive: Archive) -> tuple[list[str], np.ndarray]:
    metas = archive.client.list_images(archive.repo)
    return [m.image_id for m in metas], np.array([m.features for m in metas])


def _brute(ids: list[str], x: np.ndarray, q: np.ndarray, k: int) -> list[tuple[str, float]]:
    d = np.einsum("ij,ij->i", x - q, x - q)
    order = np.lexsort((np.array(ids, dtype=object), d))[:k]
    return [(ids[i], float(d[i])) for i in order]


def _queries(x: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    near = x[rng.choice(len(x), 5, replace=False)] + rng.normal(0, 0.01, (5, x.shape[1]))
    far = rng.normal(0, 0.3, (3, x.shape[1]))
    return np.concatenate([near, far, x[:2]])


def _store(archive: Archive) -> DirectoryStore:
    return DirectoryStore(archive.client.settings.objects_dir)


def _answers(archive: Archive, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    results = archive.client.search_features(archive.repo, queries,
                                             [f"q{i}" for i in range(len(queries))], k,
                                             group=False)
    for result in results:
        assert result.stats["mode"] == "ckks" and result.complete is True
    return [[(h.image_id, h.distance) for h in r.hits] for r in results]


def test_segments_carry_blocks_and_no_secure_knn_ciphertext(archive: Archive) -> None:
    client, repo = archive.client, archive.repo
    assert client.search_mode(repo) == "ckks" and repo.manifest.levels == []
    store = _store(archive)
    state = verified_log(store, client.settings, repo)
    ids, x = _truth(archive)
    assert len(state.segments(1)) >= FILES // BATCH
    seen: list[str] = []
    for live in state.segments(1):
        blob = store.get(layout.segment_key(repo.repo_id, live.id))
        segment = decode_segment(blob, live.id)
        assert segment.vectors.widths == (1,) and not np.any(segment.vectors.full)
        assert segment.ckks is not None
        kind, period, count = ckks.header(bytes(segment.ckks), live.id)
        assert (kind, period, count) == (ckks.KIND_ROWS, 128, len(segment))
        seen += segment.id_strings()
        for row in x:  # no feature row in clear anywhere in the segment
            assert row.astype("<f8").tobytes()[:64] not in blob
    assert sorted(seen) == sorted(ids)
    head = store.get_range(ckks_store.eval_keys_key(repo.repo_id, 1), 0, 76)
    assert ckks_store.parse_eval_head(head, "eval").key_version == 1
    check = client.check_repository(repo, read_data=True)  # blocks in segments pass
    assert check.ok, list(check.problems)


def test_search_equals_plaintext_brute_force(archive: Archive) -> None:
    ids, x = _truth(archive)
    queries = _queries(x)
    k = 3
    for q, got in zip(queries, _answers(archive, queries, k), strict=True):
        want = _brute(ids, x, q, k)
        assert [i for i, _ in got] == [i for i, _ in want], f"seed {SEED}"
        assert np.allclose([d for _, d in got], [d for _, d in want], rtol=1e-12, atol=0)
    result = archive.client.search_features(archive.repo, x[3], ["one"], 1)[0]
    assert result.stats["candidates"] >= 1 and result.stats["upload_bytes"] < 2 << 20
    assert result.hits[0].distance == 0.0
    similar = archive.client.search_by_image_id(archive.repo, ids[3], 2, group=False)
    assert ids[3] not in [h.image_id for h in similar.hits] and len(similar.hits) == 2


def test_get_original_of_a_hit(archive: Archive, tmp_path: Path) -> None:
    _ids, x = _truth(archive)
    hit = archive.client.search_features(archive.repo, x[5], ["q"], 1, group=False)[0].hits[0]
    dest = tmp_path / "original.dcm"
    archive.client.get_original(archive.repo, hit.image_id, dest)
    assert dest.read_bytes() in [f.read_bytes() for f in archive.files]


def test_altered_or_moved_evaluation_keys_are_refused(archive: Archive) -> None:
    client, repo = archive.client, archive.repo
    store = _store(archive)
    name = ckks_store.eval_keys_key(repo.repo_id, 1)
    original = store.get(name)
    digest = ckks_blocks.eval_digest(store, repo, 1)
    assert digest == hashlib.sha256(original[76:]).digest()
    state = verified_log(store, client.settings, repo)
    seg_ids = [o.id for o in state.segments(1)]
    key = ckks_blocks.key_of(repo, 1)
    query = key.encrypt_query(np.zeros(128), 128)
    request = ckks_store.CkksRequest(1, 0, digest, query)
    try:
        # the body altered: the keyless service refuses it before loading anything
        body = bytearray(original)
        body[5000] ^= 0x01
        store.put(name, bytes(body))
        with pytest.raises(FormatError, match="does not match the digest"):
            ckks_store.CkksScorers(store).answer(repo.repo_id, state, seg_ids, 0, b"", request)
        # the body altered and the head's digest with it: the client's MAC check refuses
        head = bytearray(original[:76])
        head[12:44] = hashlib.sha256(bytes(body[76:])).digest()
        store.put(name, bytes(head) + bytes(body[76:]))
        with pytest.raises(IntegrityError, match="failed their integrity check"):
            ckks_blocks.eval_digest(store, repo, 1)
        # another repository's (valid) object moved here: its MAC binds its repository
        other = ckks_store.build_eval_object(os.urandom(32), "other", 1, original[76:])
        store.put(name, other)
        with pytest.raises(IntegrityError, match="failed their integrity check"):
            ckks_blocks.eval_digest(store, repo, 1)
    finally:
        store.put(name, original)
    answer = ckks_store.CkksScorers(store).answer(repo.repo_id, state, seg_ids, 0, b"", request)
    assert sorted(answer.segment_ids) == sorted(seg_ids)


def test_compaction_keeps_answers_identical(archive: Archive) -> None:
    ids, x = _truth(archive)
    queries = _queries(x)
    before = _answers(archive, queries, 4)
    report = archive.client.compact_repository(archive.repo)
    assert report.entries
    store = _store(archive)
    state = verified_log(store, archive.client.settings, archive.repo)
    assert len(state.segments(1)) == 1
    after = _answers(archive, queries, 4)
    assert after == before
    assert sorted(ids) == sorted(_truth(archive)[0])


def test_erasure_rewrites_the_block_without_the_image(archive: Archive) -> None:
    """An erased image's row leaves the segment and its CKKS block (rebuilt from the kept
    rows' features); its own features no longer find it, the answer stays exact."""
    client, repo = archive.client, archive.repo
    ids, x = _truth(archive)
    target = ids[4]
    report = client.erase(repo, client.erasure_plan(repo, image=target))
    assert report is not None
    left, y = _truth(archive)
    assert target not in left and len(left) < len(ids)
    store = _store(archive)
    state = verified_log(store, client.settings, repo)
    for live in state.segments(1):
        segment = decode_segment(store.get(layout.segment_key(repo.repo_id, live.id)))
        assert segment.ckks is not None and target not in segment.id_strings()
        assert ckks.header(bytes(segment.ckks), live.id)[2] == len(segment)
    query = x[ids.index(target)]
    got = _answers(archive, query[None, :], 3)[0]
    assert [i for i, _ in got] == [i for i, _ in _brute(left, y, query, 3)]


def test_revocation_re_encrypts_under_a_new_ckks_key(archive: Archive) -> None:
    """Bob is granted, then revoked: every segment is rewritten under key version 2 with
    blocks of the new CKKS key; the owner's answers stay exact; a query under the old
    version's key cannot be ranked against the new blocks (it decrypts to noise, refused);
    Bob's own search is refused by the service."""
    from app.core import client as facade
    from app.core.settings import Settings

    client = archive.client
    before, _ = _truth(archive)
    bob_settings = Settings(store="directory", data_dir=str(archive.root / "bob"), workers=1)
    bob_identity = facade.create_identity(bob_settings, "Bob", owned_repos.OTHER_STRONG_PASSWORD)
    bob_settings.objects_dir.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(client.settings.objects_dir, bob_settings.objects_dir)  # the same bucket
    client.register_user(bob_identity.card().to_json())
    client.grant(archive.repo, bob_identity.user_id)
    old = client.repository("he")
    repo = client.revoke(old, bob_identity.user_id)
    assert repo.keys.version == 2
    store = _store(archive)
    state = verified_log(store, client.settings, repo)
    assert not state.segments(1) and state.segments(2)
    archive.repo = repo
    ids, x = _truth(archive)
    assert sorted(ids) == sorted(before)  # every image re-sealed under version 2
    queries = _queries(x)[:4]
    for q, got in zip(queries, _answers(archive, queries, 2), strict=True):
        assert [i for i, _ in got] == [i for i, _ in _brute(ids, x, q, 2)]
    seg_ids = [o.id for o in state.segments(2)]
    digest = ckks_blocks.eval_digest(store, repo, 2)
    stale = ckks_blocks.key_of(old, 1).encrypt_query(x[0], 128)
    answer = ckks_store.CkksScorers(store).answer(
        repo.repo_id, state, seg_ids, 0, b"", ckks_store.CkksRequest(2, 0, digest, stale))
    for key in (ckks_blocks.key_of(old, 1), ckks_blocks.key_of(repo, 2)):
        with pytest.raises(FormatError, match="another repository or key version"):
            key.decrypt_scores(answer.scores, answer.counts)
    with facade.Client(bob_settings, bob_identity) as bob:
        with pytest.raises(AccessDenied):
            bob.open_repository("he")
        # his stale key version has nothing left to search; the current one he cannot ask
        assert bob.search_features(old, x[0], ["q"], 1, group=False)[0].hits == []
        request = ckks_store.encode_request(2, 0, digest, stale)
        with pytest.raises(ServiceError, match="refused this user"):
            bob.session.service._exchange(f"/v2/repos/{repo.repo_id}/ckks", request,
                                          protocol=2)


def test_an_altered_block_is_reported_never_used(archive: Archive) -> None:
    """A byte of one segment's CKKS block changed in the bucket: the service (a fresh
    process) refuses the segment (its SHA-256 is not the log's), the client reports the
    answer incomplete, naming it; the block's scores are never ranked. Runs after the
    revocation (on a segment of key version 2), last on the shared repository."""
    client, repo = archive.client, archive.repo
    store = _store(archive)
    live = verified_log(store, client.settings, repo).segments(repo.keys.version)[0]
    key = layout.segment_key(repo.repo_id, live.id)
    original = store.get(key)
    header = parse_header(original, live.id)
    altered = bytearray(original)
    altered[header.ckks_offset + 200] ^= 0x01
    store.put(key, bytes(altered))
    _restart_service(client)
    try:
        _ids, x = _truth(archive)
        with pytest.raises(IncompleteAnswer) as caught:
            client.search_features(repo, x[0], ["q"], 1, group=False)
        assert live.id in caught.value.missing
    finally:
        store.put(key, original)  # the last test of the shared repository: no search after


def test_cli_repo_create_search_ckks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`radcrypt repo create --search ckks` is accepted, signed into the manifest, and the
    owner writes the key version's evaluation keys at once."""
    import json

    try:
        from workstation import cli_runner
    except ImportError:  # pragma: no cover
        from tests.workstation import cli_runner

    run = cli_runner(tmp_path / "data", "ckks cli password 19", monkeypatch, capsys)
    assert run("identity", "create", "--name", "Dr. Cli")[0] == 0
    code, out, err = run("repo", "create", "he", "--search", "ckks", "--json")
    assert code == 0, err
    assert json.loads(out)["search"] == "ckks"
    store = DirectoryStore(tmp_path / "data" / "objects")
    head = store.get_range(ckks_store.eval_keys_key("he", 1), 0, ckks_store.EVAL_HEAD_SIZE)
    assert ckks_store.parse_eval_head(head, "eval").key_version == 1
