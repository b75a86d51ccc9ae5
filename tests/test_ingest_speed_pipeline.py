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
import logging
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from app.core import importer as importer_module
from app.core import logstate
from app.core.errors import RadcryptError
from app.core.importer import Importer
from app.core.packs import ImageReader
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


_OWNER = owned_repos.owner_identity("Ingest Owner")


def _repo(store: ObjectStore, name: str) -> Repository:
    """A format-2 repository (the product's default) that _OWNER imports into."""
    return owned_repos.create_owned_repository(store, name, owner=_OWNER)


def _importer(store: ObjectStore, repo: Repository, **options: object) -> Importer:
    return Importer(store, repo, writer=_OWNER, **options)  # type: ignore[arg-type]


def _committed(store: ObjectStore, repo: Repository) -> set[str]:
    """Ids in the repository's live packs (its verified segment log)."""
    return ImageReader(store, repo, logstate.verified_log(store, None, repo)).image_ids()


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
        report = _importer(moto_store, repo, workers=2, batch_size=5,
                           processes=processes).run(files)
        assert report.failed == [] and len(report.imported) == len(files)
        per_file = {}
        reader = ImageReader(moto_store, repo, logstate.verified_log(moto_store, None, repo))
        for path, image_id in report.imported:
            record, _ = reader.meta(image_id)  # with the features from the pack's array
            thumb = reader.thumb(image_id)
            record.pop("imported_at")
            per_file[path] = (record, thumb)
        stored[processes] = per_file
    assert stored[True] == stored[False]


@pytest.mark.parametrize("processes", [False, True])
def test_workers_run_ahead_while_a_batch_commits(moto_store: ObjectStore,
                                                 processes: bool) -> None:
    """While the first segment is being written, the next batch's images get uploaded (the
    commit holds the main thread only): the segment waits here until their originals
    are."""
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
        if key.startswith(layout.objects_prefix(repo.repo_id)):
            with lock:
                metas.append(key)

    moto_store.put = watching_put  # type: ignore[method-assign]
    try:
        report = _importer(moto_store, repo, workers=2, batch_size=batch,
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
        report = _importer(moto_store, repo, workers=2, batch_size=3,
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

    report = _importer(moto_store, repo, workers=2, batch_size=4, progress=progress,
                       cancel=cancel, processes=True).run(files)
    assert report.cancelled and report.failed == []
    kept = {i for _, i in report.imported}
    assert 6 <= len(kept) < 20
    assert _committed(moto_store, repo) == kept | {i for _, _, i in report.frames}
    assert _our_children() == []  # stopped with the import
    rest = _importer(moto_store, repo, workers=2, batch_size=4, processes=True).run(files)
    assert not rest.cancelled and {i for _, i in rest.already_present} == kept
    assert set(_segment_counts(moto_store, repo.repo_id).values()) == {1}
    # every frame of a multi-frame file is an image (two 2-frame files: 22 images)
    assert set(_segment_counts(moto_store, repo.repo_id)) == set(support.image_ids(repo, files))


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
        _importer(moto_store, repo, workers=2, batch_size=4).run(files)
    assert _committed(moto_store, repo) == set()
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
    report = _importer(moto_store, repo, workers=2, processes=True).run(files)
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
        report = _importer(moto_store, repo, workers=2, processes=False).run(
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


# --- the faster features and previews compute what they did ---------------------------------


def test_row_by_row_resampling_equals_the_running_sums_bit_for_bit() -> None:
    """features._area_resample_rows adds wide rows one after another instead of
    np.cumsum(axis=0): the same sums in the same order, so the same float64 bits."""
    import numpy as np

    from app.imaging import features

    def reference(x: np.ndarray, n_out: int) -> np.ndarray:
        whole, frac = features._area_plan(x.shape[0], n_out)
        running = np.zeros((x.shape[0] + 1, *x.shape[1:]), dtype=np.float64)
        np.cumsum(x, axis=0, dtype=np.float64, out=running[1:])
        at_edges = running[whole] + frac[:, None] * (running[whole + 1] - running[whole])
        return np.diff(at_edges, axis=0) * (n_out / x.shape[0])

    rng = np.random.default_rng(7)
    for shape in [(512, 512), (700, 300), (37, 2000), (2000, 16), (16, 16), (512, 70)]:
        x = (rng.random(shape, dtype=np.float32) * 1000).astype(np.float32)
        for source in (x, x.T.copy().T):  # contiguous and not
            assert np.array_equal(features._area_resample_rows(source, 70),
                                  reference(source, 70))


def test_previews_keep_their_size_and_look(tmp_path: Path) -> None:
    """A 512 x 512 CT slice previews at 256 x 256 (block means, exact halving) within a
    grey level of Lanczos on average; other sizes keep Lanczos and the aspect ratio."""
    import io

    import numpy as np
    from PIL import Image

    from app.imaging.decode import decode_image
    from app.imaging.thumbnail import make_thumbnail_png
    from bench.ingest import make_ct_files

    image = decode_image(make_ct_files(tmp_path, 1)[0])
    png = make_thumbnail_png(image)
    assert png.startswith(b"\x89PNG")
    preview = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float64)
    lanczos = Image.fromarray(image.display()).resize((256, 256), Image.Resampling.LANCZOS,
                                                      reducing_gap=2.0)
    assert preview.shape == (256, 256)
    assert np.abs(preview - np.asarray(lanczos, dtype=np.float64)).mean() < 1.0
    from app.imaging.decode import DecodedImage

    odd = DecodedImage(pixels=np.linspace(0, 1, 600 * 450, dtype=np.float32).reshape(600, 450),
                       source_format="png", display_range=(0.0, 1.0))
    assert Image.open(io.BytesIO(make_thumbnail_png(odd))).size == (192, 256)
