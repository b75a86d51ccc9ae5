"""Workstation search mode (issue 19): import, search, get, revoke, tamper, exactness.

A repository created with search "workstation" must store no secure-kNN ciphertext (its
segments carry ids only), answer exactly what a plaintext brute force over the stored
feature arrays answers, keep its local copy encrypted at rest and synced incrementally,
stop syncing (and wipe the copy) for a revoked user, and fail cleanly on a pack or a
cache file that was altered or moved. Real sample DICOM files, a directory store, the
real importer and revocation; the seeds of the random queries are in the test names.
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

try:
    from workstation import Workstation, sample_files
except ImportError:  # pragma: no cover
    from tests.workstation import Workstation, sample_files

from app.core import searcher, workstation
from app.core.access import create_repository_as, grant_access, register_user, revoke_access
from app.core.errors import AccessDenied, IntegrityError, RadcryptError
from app.core.logstate import verified_log
from app.core.objects import fetch_original
from app.core.packs import ImageReader, forget_tocs
from app.core.repository import Manifest, Member, new_repository, read_signed_manifest
from app.core.settings import Settings
from app.core.workstation_index import CacheError, LocalCache
from cloud import layout
from cloud.directory_store import DirectoryStore
from cloud.segments import decode_segment

FILES = 9
BATCH = 3


@dataclass
class Sess:
    """What the workstation mode needs of a session: store, settings, the identity."""

    store: Any
    settings: Settings
    identity: Any
    log_states: dict[str, Any] = field(default_factory=dict)
    readers: dict[str, Any] = field(default_factory=dict)
    log_lock: Any = field(default_factory=threading.Lock)


def sess(user: Workstation) -> Sess:
    return Sess(user.store, user.settings, user.identity)


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    found = DirectoryStore(tmp_path / "bucket")
    found.ensure_bucket()
    return found


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[DirectoryStore, Workstation, Any]:
    """One repository of FILES sample images for the tests that only read it."""
    found = DirectoryStore(tmp_path_factory.mktemp("shared") / "bucket")
    found.ensure_bucket()
    owner, repo = _repo(found)
    return found, owner, repo


@pytest.fixture(autouse=True)
def _fresh_process_state() -> Any:
    """Each test starts like a new process: no plaintext index, no TOC cached."""
    workstation.forget_all()
    forget_tocs()
    yield
    workstation.forget_all()


def _repo(store: DirectoryStore, name: str = "ws", files: int = FILES
          ) -> tuple[Workstation, Any]:
    owner = Workstation.make(store, "Owner")
    repo = create_repository_as(owner.session, owner.identity, name, search="workstation")
    if files:
        owner.importer(repo, BATCH).run(sample_files(files))
    return owner, owner.open(repo.repo_id)


def _plain(user: Workstation, repo: Any) -> tuple[list[str], np.ndarray]:
    """Every committed image's stored features, read through the product's own pack
    reader (not the local cache): the plaintext side of the exactness checks."""
    state = verified_log(user.store, user.settings, repo)
    reader = ImageReader(user.store, repo, state)
    ids, rows = [], []
    for obj in state.packs():
        pack_ids, features = reader.features_of_pack(obj.id)
        ids += pack_ids
        rows.append(features)
    return ids, np.concatenate(rows)


def _brute(ids: list[str], x: np.ndarray, q: np.ndarray, k: int) -> list[tuple[str, float]]:
    diff = x - q
    d = np.einsum("ij,ij->i", diff, diff)
    order = np.lexsort((np.array(ids, dtype=object), d))[:k]
    return [(ids[i], float(d[i])) for i in order]


# --- manifest ------------------------------------------------------------------------------


def test_manifest_search_field_defaults_and_refusals(store: DirectoryStore) -> None:
    plain = new_repository(store, "plain", "radcrypt-v1", None).manifest
    assert plain.search == "sknn" and b'"search"' not in plain.to_json()  # old bytes kept
    ws = new_repository(store, "ws", "radcrypt-v1", None, search="workstation").manifest
    assert ws.levels == []  # nothing to bound: its segments hold no ciphertext
    signed = replace(ws, sequence=1, owner="o", members=(Member("o", 1),))
    raw = json.loads(signed.to_json())
    assert raw["search"] == "workstation"
    assert Manifest.from_json(signed.to_json(), "m").search == "workstation"
    he = new_repository(store, "he", "radcrypt-v1", None, search="ckks").manifest
    assert he.search == "ckks" and he.levels == []  # built (issue 19, tests/test_ckks_mode.py)
    with pytest.raises(RadcryptError, match="search mode must be one of"):
        new_repository(store, "qu", "radcrypt-v1", None, search="quantum")
    raw["search"] = "quantum"
    with pytest.raises(RadcryptError, match="field 'search'"):
        Manifest.from_json(json.dumps(raw).encode(), "m")
    raw["search"] = "ckks"  # searched by the service, never by the workstation's index
    ckks = Manifest.from_json(json.dumps(raw).encode(), "m")
    with pytest.raises(RadcryptError, match="not searched here"):
        workstation.search_features(None, replace_manifest(ckks), np.zeros(128), ["q"], 1)


def replace_manifest(manifest: Manifest) -> Any:
    @dataclass
    class R:
        manifest: Manifest
    return R(manifest)


def test_search_mode_is_signed(store: DirectoryStore) -> None:
    _owner, repo = _repo(store, files=0)
    name = layout.manifest_key(repo.repo_id)
    doc = json.loads(store.get(name))
    assert doc["payload"]["search"] == "workstation"
    doc["payload"]["search"] = "sknn"  # the cloud switches the mode
    store.put(name, json.dumps(doc).encode())
    with pytest.raises(AccessDenied, match="signature"):
        read_signed_manifest(store, repo.repo_id, repo.owner_key)


# --- import, search, get ---------------------------------------------------------------------


def test_import_stores_no_secure_knn_ciphertext(shared: Any) -> None:
    store, owner, repo = shared
    state = verified_log(owner.store, owner.settings, repo)
    ids, x = _plain(owner, repo)
    assert len(ids) == FILES and len(state.segments()) == len(state.packs()) >= 3
    seg_ids: list[str] = []
    for obj in state.segments():
        blob = store.get(layout.segment_key(repo.repo_id, obj.id))
        segment = decode_segment(blob, obj.id)
        assert segment.vectors.widths == (1,) and not np.any(segment.vectors.full)  # ids
        seg_ids += [bytes(i).hex() for i in segment.ids]
        for row in x:  # no feature row in any byte order
            assert row.astype("<f8").tobytes()[:64] not in blob
    assert sorted(seg_ids) == sorted(ids)  # the commit rule: every packed image named


@pytest.mark.parametrize("seed", [19])
def test_search_is_exact_against_plaintext(shared: Any, seed: int) -> None:
    _store, owner, repo = shared
    ids, x = _plain(owner, repo)
    rng = np.random.default_rng(seed)
    queries = np.concatenate([x[:4] + rng.normal(0, 1e-3, (4, x.shape[1])),
                              rng.normal(0, 1, (4, x.shape[1])), x[5:6]])
    k = 5
    results = workstation.search_features(sess(owner), repo, queries,
                                       [f"q{i}" for i in range(len(queries))], k)
    for q, result in zip(queries, results, strict=True):
        want = _brute(ids, x, q, k)
        got = [(h.image_id, h.distance) for h in result.hits]
        assert got == want, f"seed {seed}"
        assert result.stats["mode"] == "workstation" and result.complete is True
        assert [h.rank for h in result.hits] == list(range(1, k + 1))
        assert all(h.name and h.meta["features"] for h in result.hits)
    with pytest.raises(RadcryptError, match="searched on the workstation"):
        searcher.search_features(sess(owner), repo, x[0], ["q"], 1)  # never the service
    # grouped by series: the k nearest series, each led by its nearest image
    grouped = workstation.search_features(sess(owner), repo, x[0], ["g"], 3, group=True)[0]
    assert grouped.grouped and 1 <= len(grouped.groups) <= 3
    assert grouped.groups[0].best.image_id == _brute(ids, x, x[0], 1)[0][0]
    seen = [g.series_key for g in grouped.groups]
    assert len(seen) == len(set(seen))


def test_get_original_of_a_hit(shared: Any, tmp_path: Path) -> None:
    store, owner, repo = shared
    files = sample_files(FILES)
    _ids, x = _plain(owner, repo)
    hit = workstation.search_features(sess(owner), repo, x[2], ["q"], 1)[0].hits[0]
    assert hit.distance == 0.0
    dest = tmp_path / "original.dcm"
    fetch_original(store, repo.ring, repo.repo_id, hit.meta.get("original") or hit.image_id,
                   dest)
    assert dest.read_bytes() in [f.read_bytes() for f in files]


def test_sync_is_incremental_and_encrypted_at_rest(store: DirectoryStore) -> None:
    owner, repo = _repo(store, files=3)
    _index, first = workstation.sync(sess(owner), repo)
    assert first.packs_fetched == first.packs == 1 and first.bytes_downloaded > 0
    again = workstation.sync(sess(owner), repo)[1]
    assert again.packs_fetched == 0 and again.bytes_downloaded == 0
    workstation.forget_all()  # a new process: the encrypted cache on disk, no download
    reopened = workstation.sync(sess(owner), repo)[1]
    assert reopened.packs_fetched == 0 and reopened.images == 3
    owner.importer(repo, BATCH).run(sample_files(3, skip=3))
    grown = workstation.sync(sess(owner), repo)[1]
    assert grown.packs_fetched == 1 and grown.images == 6
    cache = LocalCache(owner.settings.data_path, owner.identity, repo.repo_id)
    _, x = _plain(owner, repo)
    blobs = [p.read_bytes() for p in cache.files()]
    assert len(blobs) == 3  # two packs and the state
    for row in x:
        assert not any(row.astype("<f8").tobytes()[:32] in b for b in blobs)
    assert all(p.stat().st_mode & 0o077 == 0 for p in cache.files())


# --- revocation ----------------------------------------------------------------------------


def test_revoked_user_stops_syncing_and_the_cache_is_wiped(store: DirectoryStore) -> None:
    owner, repo = _repo(store, files=4)
    bob = Workstation.make(store, "Bob")
    register_user(owner.session, owner.identity, bob.identity.card().to_json())
    grant_access(owner.session, owner.identity, repo, bob.user_id)
    at_bob = bob.open(repo.repo_id)
    assert workstation.sync(sess(bob), at_bob)[1].images == 4
    bob_cache = LocalCache(bob.settings.data_path, bob.identity, repo.repo_id)
    assert bob_cache.files()
    repo = revoke_access(owner.session, owner.identity, owner.open(repo.repo_id), bob.user_id)
    with pytest.raises(AccessDenied, match="revoked"):
        workstation.search_features(sess(bob), at_bob, np.zeros(128), ["q"], 1)
    assert not bob_cache.path.exists()
    with pytest.raises(AccessDenied):
        workstation.sync(sess(bob), at_bob)  # and it stays so
    # the owner's index moves to the new key version, exactly, still without ciphertexts
    index, report = workstation.sync(sess(owner), repo)
    state = verified_log(owner.store, owner.settings, repo)
    assert {o.key_version for o in state.packs()} == {2} and report.images == 4
    assert all(b.live.key_version == 2 for b in index.blocks.values())
    for obj in state.segments():
        assert decode_segment(store.get(layout.segment_key(repo.repo_id, obj.id)),
                              obj.id).vectors.widths == (1,)
    ids, x = _plain(owner, repo)
    got = workstation.search_features(sess(owner), repo, x[1], ["q"], 3)[0].hits
    assert [(h.image_id, h.distance) for h in got] == _brute(ids, x, x[1], 3)


# --- tamper and moved ciphertexts ---------------------------------------------------------------


def test_altered_pack_fails_cleanly(store: DirectoryStore) -> None:
    owner, repo = _repo(store, files=3)
    state = verified_log(owner.store, owner.settings, repo)
    victim = state.packs()[0]
    name = layout.pack_key(repo.repo_id, victim.id)
    blob = bytearray(store.get(name))
    reader = ImageReader(store, repo, state)
    toc = reader._live_tocs()[victim.id]
    entry = toc.features_entry()
    blob[entry.offset + entry.length // 2] ^= 1
    store.put(name, bytes(blob))
    forget_tocs()
    with pytest.raises(IntegrityError, match=victim.id):
        workstation.sync(sess(owner), repo)
    cache = LocalCache(owner.settings.data_path, owner.identity, repo.repo_id)
    assert cache.load_state() is None  # nothing half-synced was recorded


def test_moved_cache_files_fail_cleanly(store: DirectoryStore) -> None:
    owner, repo_a = _repo(store, "ws-a", files=3)
    repo_b = create_repository_as(owner.session, owner.identity, "ws-b", search="workstation")
    owner.importer(repo_b, BATCH).run(sample_files(3, skip=3))
    repo_b = owner.open(repo_b.repo_id)
    workstation.sync(sess(owner), repo_a)
    workstation.sync(sess(owner), repo_b)
    cache_a = LocalCache(owner.settings.data_path, owner.identity, repo_a.repo_id)
    cache_b = LocalCache(owner.settings.data_path, owner.identity, repo_b.repo_id)
    pack_a = verified_log(store, owner.settings, repo_a).packs()[0]
    pack_b = verified_log(store, owner.settings, repo_b).packs()[0]
    key = repo_b.ring.version(1).data_key
    # a file of repository A put in B's place of B's pack: does not open
    shutil.copy(cache_a.pack_file(pack_a.id), cache_b.pack_file(pack_b.id))
    with pytest.raises(CacheError, match="does not open"):
        cache_b.get_pack(1, key, pack_b.id, pack_b.sha256)
    # the right file asked as another key version, or by another user: does not open
    workstation.forget_all()
    workstation.sync(sess(owner), repo_b)  # discards the moved file, fetches again
    with pytest.raises(CacheError):
        cache_b.get_pack(2, key, pack_b.id, pack_b.sha256)
    eve = LocalCache(owner.settings.data_path, Workstation.make(store, "Eve").identity,
                     repo_b.repo_id)
    eve.path.mkdir(parents=True)
    shutil.copy(cache_b.pack_file(pack_b.id), eve.pack_file(pack_b.id))
    with pytest.raises(CacheError, match="does not open"):
        eve.get_pack(1, key, pack_b.id, pack_b.sha256)
    # the state file of A copied over B's: B's index is rebuilt from the bucket, exact
    shutil.copy(cache_a.path / "state.bin", cache_b.path / "state.bin")
    workstation.forget_all()
    index, report = workstation.sync(sess(owner), repo_b)
    assert report.discarded == ["state"] and report.images == 3
    ids, _x = _plain(owner, repo_b)
    assert sorted(index.ids) == sorted(ids)


def test_moved_pack_file_is_discarded_and_fetched_again(store: DirectoryStore) -> None:
    owner, repo = _repo(store, files=4)
    workstation.sync(sess(owner), repo)
    cache = LocalCache(owner.settings.data_path, owner.identity, repo.repo_id)
    first, second = [o.id for o in verified_log(store, owner.settings, repo).packs()][:2]
    shutil.copy(cache.pack_file(first), cache.pack_file(second))  # swapped slots
    workstation.forget_all()
    _index, report = workstation.sync(sess(owner), repo)
    assert report.discarded == [second] and report.packs_fetched == 1
    ids, x = _plain(owner, repo)
    got = workstation.search_features(sess(owner), repo, x[3], ["q"], 4)[0].hits
    assert [(h.image_id, h.distance) for h in got] == _brute(ids, x, x[3], 4)


def test_keyword_filter_is_exact(shared: Any) -> None:
    from collections import Counter

    from app.core.keywords import keywords_of
    from app.core.meta import ImageMeta

    store, owner, repo = shared
    ids, x = _plain(owner, repo)
    reader = ImageReader(store, repo, verified_log(store, owner.settings, repo))
    words = {i: keywords_of(ImageMeta.from_record(i, *reader.meta(i))) for i in ids}
    counts = Counter(w for ws in words.values() for w in ws if w.startswith("modality="))
    term = min(counts, key=lambda w: (abs(counts[w] - len(ids) // 2), w))  # a real subset
    allowed = [n for n, i in enumerate(ids) if term in words[i]]
    assert 0 < len(allowed) < len(ids), counts
    sub_ids, sub_x = [ids[n] for n in allowed], x[allowed]
    outside = next(n for n in range(len(ids)) if n not in allowed)
    for q in (x[outside], x[allowed[0]]):
        got = workstation.search_features(sess(owner), repo, q, ["q"], 3, where=term)[0]
        assert [(h.image_id, h.distance) for h in got.hits] == _brute(sub_ids, sub_x, q, 3)


def test_compaction_keeps_the_answers(store: DirectoryStore) -> None:
    from app.core.compaction import compact

    owner, repo = _repo(store, files=6)
    ids, x = _plain(owner, repo)
    before = workstation.search_features(sess(owner), repo, x[1], ["q"], 4)[0].hits
    compact(store, owner.settings, repo, owner.identity)
    index, report = workstation.sync(sess(owner), repo)
    assert report.packs_dropped == 2 and report.packs_fetched == 1 and len(index) == 6
    after = workstation.search_features(sess(owner), repo, x[1], ["q"], 4)[0].hits
    assert [(h.image_id, h.distance) for h in after] == [(h.image_id, h.distance)
                                                         for h in before]
    assert [(h.image_id, h.distance) for h in after] == _brute(ids, x, x[1], 4)
    for obj in verified_log(store, owner.settings, repo).segments():
        assert decode_segment(store.get(layout.segment_key(repo.repo_id, obj.id)),
                              obj.id).vectors.widths == (1,)
