"""Completeness of search answers (docs/FORMAT-2.md 6.3), through the facade and
the CLI, with the real search service (the process a session starts, on the directory
store of a private data directory) and a format-2 repository of several import batches.

What the cloud does is done to the bucket itself: a live segment deleted, a live segment
altered (the service rejects it: withheld), a segment added that the log does not name.
The client must fail the first two (exit status 1, the message naming how many segments
are missing), show them marked with --allow-incomplete (text and JSON), and never return
an image of the third. A format-1 repository says completeness is not verifiable.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.core import basis
from app.core import client as facade
from app.core.access import create_repository_as
from app.core.errors import IncompleteAnswer, RadcryptError
from app.core.settings import Settings
from cloud import layout
from cloud.backend import Store
from cloud.directory_store import DirectoryStore
from cloud.segments import decode_segment, encode_segment_v2
from crypto.identity import Identity
from crypto.segment_mac import index_mac_key

try:
    import e2e_support as support
    import owned_repos
    from fixtures import cli_support
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos
    from tests.fixtures import cli_support
    from tests.fixtures import format2_support as fx

PASSWORD = owned_repos.STRONG_PASSWORD
REPO2, REPO1 = "complete-v2", "complete-v1"
BATCH, IMAGES = 2, 6  # three batches: three live segments


@dataclass
class World:
    root: Path
    settings: Settings
    identity: Identity
    store: Store
    files: list[Path]
    segments: list[str]  # live segment ids of REPO2, sorted
    members: dict[str, set[str]]  # segment id -> names of the files in it

    def inside(self, seg_id: str) -> Path:
        return next(f for f in self.files if f.name in self.members[seg_id])

    def outside(self, seg_id: str) -> Path:
        return next(f for f in self.files[:IMAGES] if f.name not in self.members[seg_id])

    def client(self) -> facade.Client:
        """A fresh client: its own session, so its own search service, which reads the
        bucket as it is now."""
        return facade.Client(self.settings, self.identity).open()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli_support.run_cli(self.root, self.settings.data_path, PASSWORD, *args)

    def segment_path(self, seg_id: str) -> Path:
        return self.store.root / layout.segment_key(REPO2, seg_id)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("completeness")
    settings = Settings(store="directory", data_dir=str(root / "data"), workers=1)
    identity = facade.create_identity(settings, "Dr. Complete", PASSWORD)
    files = support.copy_images(support.sample_images(IMAGES + 1), root / "images")
    with facade.Client(settings, identity) as client:
        repo = client.create_repository(REPO2, storage_format=2)
        report = client.import_files(repo, files[:IMAGES], batch_size=BATCH)
        assert len(report.imported) == IMAGES and not report.failed
        # format 1 is read-only for the product: made and filled as format-1 code did
        store = client.session.store
        old = create_repository_as(client.session, identity, REPO1, storage_format=1)
        fx.format1_importer(store, old, 2).run(files[:2])
        names = {image_id: Path(path).name for path, image_id in report.imported}
        members = {}
        for key in store.list_keys(layout.segments_prefix(REPO2)):
            segment = decode_segment(store.get(key), key)
            members[layout.parse_segment_key(key)[1]] = {names[i] for i in segment.id_strings()}
    assert len(members) == IMAGES // BATCH
    yield World(root, settings, identity, DirectoryStore(settings.objects_dir), files,
                sorted(members), members)


@pytest.fixture
def removed_segment(world: World) -> Iterator[str]:
    """A live segment of REPO2 deleted from the bucket (put back after the test)."""
    seg_id = world.segments[1]
    path = world.segment_path(seg_id)
    data = path.read_bytes()
    path.unlink()
    yield seg_id
    path.write_bytes(data)


def _search(world: World, name: str, files: list[Path], **kwargs: Any) -> list[Any]:
    with world.client() as client:
        repo = client.open_repository(name)
        return client.search_files(repo, files, k=2, **kwargs)


def test_a_complete_answer_says_so(world: World) -> None:
    with world.client() as client:
        results = client.search_files(client.open_repository(REPO2), world.files[:IMAGES:2],
                                      k=2)
        old = client.search_files(client.open_repository(REPO1), world.files[:1], k=1)[0]
    for result, source in zip(results, world.files[:IMAGES:2], strict=True):
        assert result.hits[0].name == source.name and result.hits[0].distance == 0.0
        assert result.complete is True
        assert result.segments_expected == result.segments_searched == len(world.segments)
        assert result.segments_missing == []
        assert result.as_dict()["complete"] is True
        assert result.completeness == "complete: all 3 segments were searched"
    # format 1: nothing to compare with, and the search does not fail
    assert old.complete is None and old.segments_expected is None
    assert old.completeness == "completeness not verifiable (format 1)"
    assert old.hits[0].name == world.files[0].name


def test_a_deleted_segment_fails_the_search(world: World, removed_segment: str) -> None:
    kept, gone = world.outside(removed_segment), world.inside(removed_segment)
    with world.client() as client:
        repo = client.open_repository(REPO2)
        with pytest.raises(IncompleteAnswer) as caught:
            client.search_files(repo, [kept], k=2)
        # allowed: the hits of the other segments, marked
        results = client.search_files(repo, [kept, gone], k=2, allow_incomplete=True)
    error = caught.value
    assert (error.expected, error.searched, error.missing) == (3, 2, [removed_segment])
    text = str(error)
    assert "searched 2 of the 3 segments of key version 1" in text
    assert "(1 missing, first: " + removed_segment in text
    assert "--allow-incomplete" in text
    for result in results:
        assert result.complete is False
        assert result.segments_missing == [removed_segment]
        assert (result.segments_expected, result.segments_searched) == (3, 2)
    assert results[0].hits[0].name == kept.name and results[0].hits[0].distance == 0.0
    # the image of the missing segment is not found: the nearest shown is another one
    assert all(h.name not in world.members[removed_segment] for h in results[1].hits)


def test_the_cli_exits_1_or_marks_the_hits(world: World, removed_segment: str) -> None:
    kept = world.outside(removed_segment)
    query = str(kept)
    with ThreadPoolExecutor(3) as pool:  # three independent processes: at once
        failed, marked, as_json = pool.map(
            lambda extra: world.cli("search", "--repo", REPO2, query, *extra),
            [(), ("--allow-incomplete",), ("--allow-incomplete", "--json")])
    done = failed
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("radcrypt: search incomplete: "), lines
    assert "1 missing" in lines[0] and removed_segment in lines[0]
    assert done.stdout == ""

    done = marked
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == "INCOMPLETE ANSWER: 1 of 3 segments were not searched"
    assert out[1] == f"{query}:  [INCOMPLETE]"
    assert kept.name in out[2]

    done = as_json
    assert done.returncode == 0, done.stderr
    item = json.loads(done.stdout)["queries"][0]
    assert item["complete"] is False
    assert item["segments_expected"] == 3 and item["segments_searched"] == 2
    assert item["segments_missing"] == [removed_segment]
    assert item["results"][0]["name"] == kept.name


def test_a_withheld_segment_is_missing_too(world: World) -> None:
    """A live segment the service cannot use (altered in the bucket: its SHA-256 no longer
    matches the log, so the service does not search it) is missing from the answer."""
    seg_id = world.segments[2]
    path = world.segment_path(seg_id)
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    try:
        with pytest.raises(IncompleteAnswer) as caught:
            _search(world, REPO2, [world.outside(seg_id)])
        assert caught.value.missing == [seg_id]
        assert "1 missing" in str(caught.value)
    finally:
        path.write_bytes(data)


def test_a_segment_not_in_the_log_is_never_searched(world: World) -> None:
    """A segment written to the bucket without a log entry (a valid one: encrypted under
    the repository's keys, MAC and all, as a writer that skipped the log would make it)
    holding a new image: a search for exactly that image never returns it."""
    newcomer = world.files[IMAGES]
    seg_id = layout.new_id()
    fake_id = layout.new_id()
    with world.client() as client:
        repo = client.open_repository(REPO2)
        features = client.features([newcomer], repo.manifest.extractor)
        loaded = basis.load(client.session.store, repo)
        vectors = loaded.keys.index_key.encrypt(features, basis.norm_bound(loaded.manifest))
        data = encode_segment_v2([fake_id], vectors, loaded.keys.version, seg_id=seg_id,
                                 writer=client.user_id, base_sequence=3, repo_id=REPO2,
                                 mac_key=index_mac_key(loaded.keys.data_key))
        world.store.put(layout.segment_key(REPO2, seg_id), data)
        try:  # the service starts now, and finds the segment in the bucket
            result = client.search_features(repo, features, ["newcomer"], k=IMAGES)[0]
        finally:
            world.store.delete(layout.segment_key(REPO2, seg_id))
        assert result.complete is True
        assert result.segments_searched == result.segments_expected == len(world.segments)
        assert fake_id not in {h.image_id for h in result.hits}
        assert len(result.hits) == IMAGES
        assert np.isfinite([h.distance for h in result.hits]).all()


def test_format_1_says_completeness_is_not_verifiable(world: World) -> None:
    done = world.cli("search", "--repo", REPO1, str(world.files[0]), "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "radcrypt: note: completeness not verifiable (format 1)"
    item = json.loads(done.stdout)["queries"][0]
    assert item["complete"] is None and item["segments_missing"] == []
    assert item["segments_expected"] is None and item["segments_searched"] == 1
    assert item["results"][0]["name"] == world.files[0].name


def test_repo_create_format_flag(world: World) -> None:
    done = world.cli("repo", "create", "made-by-cli", "--format", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["format"] == "radcrypt-manifest-v2"
    done = world.cli("repo", "create", "made-by-default", "--json")  # 2 is the default
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["format"] == "radcrypt-manifest-v2"
    for bad in ("3", "1"):  # format 1 is read-only: no new repository in it
        assert world.cli("repo", "create", "bad", "--format", bad).returncode == 2
    with world.client() as client, pytest.raises(RadcryptError, match="format 2"):
        client.create_repository("bad-facade", storage_format=1)
    assert "bad" not in {m.repo_id for m in facade.list_repositories(world.settings)}


def test_format_1_is_read_only(world: World) -> None:
    """An import into a format-1 repository is refused before any write, naming the
    migration; searching it still works (test above), so do showing and listing."""
    def stored() -> dict[str, bytes]:  # the repository's objects (audit and access log aside)
        return {k: v for k, v in fx.snapshot(world.store).items()
                if f"/repos/{REPO1}/" in k and "/audit/" not in k and "/access/" not in k}

    def access_entries() -> int:  # the access log records a decryption in any format
        return sum(f"/repos/{REPO1}/access/" in k for k in fx.snapshot(world.store))

    before, logged = stored(), access_entries()
    done = world.cli("import", "--repo", REPO1, str(world.files[IMAGES]))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip() == (
        f"radcrypt: repository {REPO1} is in storage format 1 (read-only); run radcrypt "
        "repo migrate --format 2")
    with world.client() as client:
        repo = client.open_repository(REPO1)
        assert client.storage_format(repo) == 1
        with pytest.raises(RadcryptError, match=r"storage format 1 \(read-only\)"):
            client.import_files(repo, [world.files[IMAGES]])
        ids = client.image_ids(repo)
        assert len(ids) == 2
        assert {m.name for m in client.list_images(repo)} == {f.name for f in world.files[:2]}
        assert client.thumbnail_png(repo, ids[0]).startswith(b"\x89PNG")
    assert stored() == before  # not one object of the repository written or changed
    assert access_entries() == logged + 1  # the preview's decryption, recorded (issue 16)
    listed = world.cli("repo", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    formats = {r["repo_id"]: r["format"] for r in json.loads(listed.stdout)["repositories"]}
    assert formats[REPO1] == "radcrypt-manifest-v1"


def test_an_answer_from_a_newer_head_is_verified_again(world: World) -> None:
    """Another member commits a batch between this client's log verification and the
    service's answer: the answer names a head beyond the verified one (LogAhead), the
    client verifies the log again, once, and then judges the answer complete. (Runs last:
    the repository has four segments afterwards.)"""
    from app.core import search_answers, search_log

    newcomer = world.files[IMAGES]
    with world.client() as client:
        repo = client.open_repository(REPO2)
        before = search_log.log_state(client.session, repo)
        with world.client() as other:
            report = other.import_files(other.open_repository(REPO2), [newcomer])
            assert len(report.imported) == 1
        loaded = basis.load(client.session.store, repo)
        token = loaded.keys.index_key.query(client.features([newcomer],
                                                            repo.manifest.extractor))
        answer, verdict, state = search_answers.ask_service(client.session, loaded, token, 1,
                                                           before)
        assert answer.head_sequence == before.head.sequence + 1 == state.head.sequence
        assert verdict is not None and verdict.complete
        assert verdict.expected == verdict.searched == len(world.segments) + 1
        assert answer.hits[0][0][0] == report.imported[0][1]
        assert client.session.log_states[REPO2].head == state.head  # kept for next time
