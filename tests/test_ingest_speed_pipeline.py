"""The faster import keeps the import's promises.

Decoding in child processes gives the same stored objects as decoding on threads; the
workers run ahead while a batch commits; the same content is uploaded once even when its
copies fall in different batches; cancel keeps what is done; children that cannot start
stop the import before anything is written (decoding never falls back to the key-holding
process), a child that dies fails its file and not the import, and no child outlives its
parent. Stores resolve credentials afresh while sharing the parsed
service models. Behaviour only: nothing here asserts a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from app.core import importer as importer_module
from app.core import objects
from app.core.errors import RadcryptError
from app.core.importer import Importer, committed_ids
from app.core.progress import CancelToken, ProgressEvent
from app.core.repository import Repository
from app.imaging import worker as worker_module
from cloud import layout
from cloud import store as store_module
from cloud.segments import decode_segment
from cloud.store import ObjectStore, StoreConfig, StoreUnavailable

try:
    import e2e_support as support
    import owned_repos
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos


def _repo(store: ObjectStore, name: str) -> Repository:
    return owned_repos.create_owned_repository(store, name)


def _segment_counts(store: ObjectStore, repo_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in store.list_keys(layout.segments_prefix(repo_id)):
        for image_id in decode_segment(store.get(key), key).id_strings():
            counts[image_id] = counts.get(image_id, 0) + 1
    return counts


def _our_children() -> list[int]:
    """Live (not zombie) child processes of this process running the importer's program."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == os.getpid() and stat[0] != "Z" and b"app.imaging" in cmdline:
            found.append(int(entry.name))
    return found


def test_children_and_threads_store_the_same_objects(moto_store: ObjectStore) -> None:
    """Every stored field but the import time, and the preview byte for byte, are the same
    whether the image was decoded in a child or on a thread (DICOM files of several
    kinds, JPEG 2000 among them)."""
    files = support.sample_images(12)
    stored = {}
    for processes in (True, False):
        repo = _repo(moto_store, f"same-{str(processes).lower()}")
        report = Importer(moto_store, repo, workers=2, batch_size=5,
                          processes=processes).run(files)
        assert report.failed == [] and len(report.imported) == len(files)
        per_file = {}
        for path, image_id in report.imported:
            meta, _ = objects.get_decrypted(moto_store, repo.ring, repo.repo_id, "meta",
                                            image_id)
            thumb, _ = objects.get_decrypted(moto_store, repo.ring, repo.repo_id, "thumbs",
                                             image_id)
            record = json.loads(meta)
            record.pop("imported_at")
            per_file[path] = (record, thumb)
        stored[processes] = per_file
    assert stored[True] == stored[False]


@pytest.mark.parametrize("processes", [False, True])
def test_workers_run_ahead_while_a_batch_commits(moto_store: ObjectStore,
                                                 processes: bool) -> None:
    """While the first segment is being written, the next batch's images get uploaded (the
    commit holds the main thread only): the segment waits here until they are."""
    files = support.sample_images(16)
    batch = 4
    repo = _repo(moto_store, "ahead")
    put = moto_store.put
    metas: list[str] = []
    ahead: list[bool] = []
    lock = threading.Lock()

    def watching_put(key: str, data: bytes, *, if_absent: bool = False) -> None:
        if key.startswith(layout.segments_prefix(repo.repo_id)) and not ahead:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with lock:
                    if len(metas) > batch:
                        break
                time.sleep(0.01)
            with lock:
                ahead.append(len(metas) > batch)
        put(key, data, if_absent=if_absent)
        if key.startswith(layout.image_prefix("meta", repo.repo_id)):
            with lock:
                metas.append(key)

    moto_store.put = watching_put  # type: ignore[method-assign]
    try:
        report = Importer(moto_store, repo, workers=2, batch_size=batch,
                          processes=processes).run(files)
    finally:
        del moto_store.put
    assert ahead == [True]
    assert report.failed == [] and len(report.imported) == len(files)
    assert len(report.segments) == len(files) // batch
    assert set(_segment_counts(moto_store, repo.repo_id).values()) == {1}


def test_copies_in_different_batches_are_uploaded_once(moto_store: ObjectStore,
                                                      tmp_path: Path) -> None:
    """The window spans batches, so a copy can be prepared before its original commits:
    its objects are still uploaded once, and both paths are reported."""
    originals = support.sample_images(6)
    folder = tmp_path / "copies"
    files = support.copy_images(originals, folder)
    copies = []
    for i, source in enumerate(originals[:3]):
        copy = folder / f"zz-copy-{i}-{source.name}"  # sorts last: a later batch
        copy.write_bytes(source.read_bytes())
        copies.append(copy)
    repo = _repo(moto_store, "copies")
    put = moto_store.put
    originals_put: list[str] = []

    def counting_put(key: str, data: bytes, *, if_absent: bool = False) -> None:
        if key.startswith(layout.objects_prefix(repo.repo_id)):
            originals_put.append(key)
        put(key, data, if_absent=if_absent)

    moto_store.put = counting_put  # type: ignore[method-assign]
    try:
        report = Importer(moto_store, repo, workers=2, batch_size=3,
                          processes=False).run([folder])
    finally:
        del moto_store.put
    assert report.failed == []
    paths = sorted([p for p, _ in report.imported] + [p for p, _ in report.already_present])
    assert paths == sorted(map(str, files + copies))
    assert len(report.imported) == 6 and len(report.already_present) == 3
    assert len(originals_put) == len(set(originals_put)) == 6
    assert set(_segment_counts(moto_store, repo.repo_id).values()) == {1}


def test_cancel_with_children_keeps_the_finished_files(moto_store: ObjectStore) -> None:
    files = support.sample_images(20)
    repo = _repo(moto_store, "cancel-children")
    cancel = CancelToken()

    def progress(event: ProgressEvent) -> None:
        if event.stage == "import" and event.done == 6:
            cancel.cancel()

    report = Importer(moto_store, repo, workers=2, batch_size=4, progress=progress,
                      cancel=cancel, processes=True).run(files)
    assert report.cancelled and report.failed == []
    kept = {i for _, i in report.imported}
    assert 6 <= len(kept) < 20
    assert committed_ids(moto_store, repo.repo_id) == kept
    assert _our_children() == []  # stopped with the import
    rest = Importer(moto_store, repo, workers=2, batch_size=4, processes=True).run(files)
    assert not rest.cancelled and {i for _, i in rest.already_present} == kept
    assert set(_segment_counts(moto_store, repo.repo_id).values()) == {1}
    assert len(_segment_counts(moto_store, repo.repo_id)) == 20


def test_children_that_cannot_start_stop_the_import(
    moto_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Untrusted files are never decoded in the key-holding process: without decoder
    children the import refuses to start and writes nothing."""
    monkeypatch.setattr(worker_module, "child_command",
                        lambda *_: [sys.executable, "-c", "import sys; sys.exit(3)"])
    files = support.sample_images(6)
    repo = _repo(moto_store, "no-children")
    with pytest.raises(RadcryptError, match="cannot decode images here"):
        Importer(moto_store, repo, workers=2, batch_size=4).run(files)
    assert committed_ids(moto_store, repo.repo_id) == set()
    assert _our_children() == []


_DYING_CHILD = """
import os, sys
from app.imaging.worker import read_frame, write_frame
requests, answers = sys.stdin.buffer, sys.stdout.buffer
read_frame(requests)
write_frame(answers, {"ok": True, "ready": True})
read_frame(requests)
os._exit(9)
"""


def test_a_child_that_dies_fails_its_file_not_the_import(
    moto_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file is tried in a second child; when that one dies too, the file is reported
    as failed, nothing of it is committed, and the import goes on to the end."""
    monkeypatch.setattr(worker_module, "child_command",
                        lambda *_: [sys.executable, "-c", _DYING_CHILD])
    files = support.sample_images(3)
    repo = _repo(moto_store, "dying")
    report = Importer(moto_store, repo, workers=2, processes=True).run(files)
    assert report.imported == [] and report.segments == []
    assert sorted(p for p, _ in report.failed) == sorted(map(str, files))
    assert all("process died" in reason for _, reason in report.failed)
    assert _our_children() == []


def test_processes_by_default_for_every_import(moto_store: ObjectStore) -> None:
    repo = _repo(moto_store, "threshold")
    assert Importer(moto_store, repo).uses_processes(1)
    assert Importer(moto_store, repo).uses_processes(1000)
    assert not Importer(moto_store, repo, processes=False).uses_processes(1000)
    assert not Importer(moto_store, repo).uses_processes(0)


def test_the_connection_pool_serves_every_upload_thread(
    moto_store: ObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    """No connection is opened only to be thrown away (urllib3 says so when its pool is
    smaller than the threads sharing a client)."""
    assert store_module.POOL_CONNECTIONS >= importer_module.UPLOAD_THREADS + 2
    repo = _repo(moto_store, "pool")
    with caplog.at_level(logging.WARNING, logger="urllib3"):
        report = Importer(moto_store, repo, workers=2, processes=False).run(
            support.sample_images(24))
    assert report.failed == []
    assert "Connection pool is full" not in caplog.text


def test_each_store_takes_the_credentials_of_its_time(
    seaweed_store_config: StoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions are per store (the parsed service models are shared): a store made after
    the environment's credentials changed uses the new ones."""
    config = dataclasses.replace(seaweed_store_config, access_key=None, secret_key=None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", str(seaweed_store_config.access_key))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not the secret")
    with pytest.raises(StoreUnavailable):
        ObjectStore(config, max_attempts=1).ping()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", str(seaweed_store_config.secret_key))
    ObjectStore(config, max_attempts=1).ping()


def test_many_stores_share_one_loader_without_growing_it(moto_store_config: StoreConfig
                                                         ) -> None:
    ObjectStore(moto_store_config)._s3()
    loaders = dict(store_module._LOADERS)
    paths = [list(loader.search_paths) for loader in loaders.values()]
    for _ in range(5):
        ObjectStore(moto_store_config)._s3()
    assert store_module._LOADERS == loaders
    assert [list(loader.search_paths) for loader in loaders.values()] == paths
