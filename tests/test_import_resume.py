"""An import killed with SIGKILL resumes: nothing lost, nothing doubled, nothing re-uploaded.

`python main.py import ... --store s3` runs as a subprocess against SeaweedFS (real
credential checks; boto3 gets them from the environment, as in production), with small
batches, into a format-2 repository (the default). The test watches the bucket, kills the
command once the first log entry (the commit point of a batch) is there and originals of
the next batch are uploaded, runs it again to the end, and checks the live segments of the
verified log, the objects and the answers of the search service.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.core.access import session_for
from app.core.errors import IncompleteAnswer
from app.core.importer import Importer, image_id_for
from app.core.repository import Repository
from app.core.searcher import search_features, search_files
from app.core.settings import load_settings
from cloud import layout
from cloud.segments import decode_segment
from cloud.store import ObjectStore, StoreConfig

try:
    import e2e_support as support
    import owned_repos
    import s3servers
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos, s3servers
    from tests.fixtures import format2_support as fx

COUNT = 120
BATCH = 8


@pytest.fixture
def bucket(seaweed_store_config: StoreConfig) -> Iterator[StoreConfig]:
    config = dataclasses.replace(seaweed_store_config, bucket=s3servers.unique_bucket("resume"))
    ObjectStore(config).ensure_bucket()
    yield config
    s3servers.drop_bucket(config)


def _etags(config: StoreConfig, prefix: str) -> dict[str, str]:
    """key -> ETag of every object under prefix, read with a plain boto3 client."""
    client = s3servers.raw_client(config)
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=config.bucket,
                                                                  Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"]] = item["ETag"]
    return out


def _segment_ids(store: ObjectStore, repo: Repository) -> collections.Counter[str]:
    """How often each image id appears across the live segments of the verified log (each
    checked against the log's SHA-256); a segment or pack no log entry names is not
    committed (what a killed run leaves behind)."""
    return fx.image_counts(store, fx.fresh_settings(), repo)


def _committed(store: ObjectStore, repo: Repository) -> set[str]:
    """The images of the live packs of the verified log."""
    return set(fx.reader(store, fx.fresh_settings(), repo).image_ids())


def _batches(store: ObjectStore, repo: Repository) -> int:
    """Log entries after the genesis: one per committed batch."""
    return max(0, len(list(store.list_keys(layout.log_prefix(repo.repo_id)))) - 1)


class Command:
    def __init__(self, config: StoreConfig, repo: Repository, folder: Path, tmp: Path,
                 data_dir: Path) -> None:
        password_file = tmp / "password.txt"  # unlocks the owner's identity in data_dir
        password_file.write_text(owned_repos.STRONG_PASSWORD + "\n")
        self.args = [support.PYTHON, "main.py", "import", "--repo", repo.repo_id, str(folder),
                     "--password-file", str(password_file), "--data-dir", str(data_dir),
                     "--store", "s3",
                     "--endpoint", str(config.endpoint_url), "--bucket", config.bucket,
                     "--batch-size", str(BATCH), "--workers", "2", "--json"]
        self.env = support.store_env(config)
        self.env.pop("RADCRYPT_PASSWORD", None)
        for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME"):
            self.env[var] = str(tmp / var.lower())

    def start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.args, cwd=support.PROJECT, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def run(self) -> dict[str, Any]:
        done = subprocess.run(self.args, cwd=support.PROJECT, env=self.env,
                              capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode()
        report: dict[str, Any] = json.loads(done.stdout)
        return report


def test_killed_import_resumes_without_loss_or_duplicates(
    bucket: StoreConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ObjectStore(bucket)
    folder = tmp_path / "archive"
    files = support.copy_images(support.sample_images(COUNT), folder)
    data_dir = tmp_path / "data"
    owner = owned_repos.identity_on_disk(data_dir, "Resume Owner")
    repo = owned_repos.create_owned_repository(store, "resume", owner, data_dir=data_dir)
    expected = {image_id_for(repo, hashlib.sha256(p.read_bytes()).digest()): p for p in files}
    assert len(expected) == COUNT
    every = support.image_ids(repo, files)  # each frame of a multi-frame file is an image
    assert set(expected) <= set(every) and len(every) > COUNT
    command = Command(bucket, repo, folder, tmp_path, data_dir)
    originals_prefix = layout.objects_prefix(repo.repo_id)

    # -- run 1: SIGKILL once the first batch is committed (its log entry) and the next one
    # has begun uploading (so that the resumed run finds originals no log entry names yet)
    process = command.start()
    deadline = time.monotonic() + 120

    def mid_batch() -> bool:
        committed = _batches(store, repo)
        return committed > 0 and len(list(store.list_keys(originals_prefix))) > BATCH * committed

    try:
        while True:
            assert process.poll() is None, (
                f"the import ended before it could be killed: {process.communicate()}")
            assert time.monotonic() < deadline, "no log entry appeared within 120 s"
            if mid_batch():  # freeze the command, then look again without a race
                os.kill(process.pid, signal.SIGSTOP)
                time.sleep(0.2)  # requests already sent may still land
                if mid_batch():
                    break
                os.kill(process.pid, signal.SIGCONT)
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert support.processes_with_env("RADCRYPT_S3_BUCKET", bucket.bucket) == []
    after_kill_frames = _committed(store, repo)
    after_kill = after_kill_frames & set(expected)  # files: their frame 0, committed last
    assert 0 < len(after_kill) < COUNT and len(after_kill) % BATCH == 0
    assert after_kill_frames <= set(every)
    assert {every[i] for i in after_kill_frames} == {expected[i] for i in after_kill}
    objects_after_kill = _etags(bucket, originals_prefix)
    assert len(objects_after_kill) > len(after_kill)  # uploaded, not committed: invisible
    print(f"\nkilled after {len(after_kill)} committed images; {len(objects_after_kill)} "
          "originals were uploaded")

    # -- run 2: to the end
    report = command.run()
    assert report["failed"] == [] and not report["cancelled"]
    assert {i["image_id"] for i in report["already_present"]} == after_kill
    imported = {i["image_id"] for i in report["imported"]}
    assert imported == set(expected) - after_kill
    assert len(report["imported"]) + len(report["already_present"]) == COUNT
    counts = _segment_ids(store, repo)
    assert set(counts) == set(every)
    assert set(counts.values()) == {1}, [i for i, n in counts.items() if n > 1][:5]
    assert _committed(store, repo) == set(every)
    # originals the killed run had uploaded were not uploaded again
    originals = _etags(bucket, originals_prefix)
    assert {k: originals[k] for k in objects_after_kill} == objects_after_kill
    assert len(originals) == COUNT

    # -- every image searchable once: 10 originals find themselves at distance 0, and the
    # answers are complete against the log
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", str(bucket.access_key))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", str(bucket.secret_key))
    settings = load_settings(store="s3", endpoint_url=bucket.endpoint_url, bucket=bucket.bucket)
    probes = files[:: COUNT // 10][:10]
    with session_for(settings, owner) as session:
        results = search_files(session, repo, probes, k=2)
    for probe, result in zip(probes, results, strict=True):
        first = result.hits[0]
        assert first.distance <= 1e-12
        if first.name == probe.name:  # a multi-frame probe is its middle frame, found
            assert every[first.image_id] == probe
        else:  # the probe's pixels are also a frame of an indexed multi-frame file (a
            # frame the sample export rendered, rtdose_1frame's in rtdose): a tie at 0
            assert first.meta["frames"] > 1, (probe, first.name)
        assert result.hits[1].image_id != first.image_id
        assert result.stats["vectors"] == len(every)
        assert result.complete is True

    # -- run 3: nothing left to do, nothing uploaded
    before = _etags(bucket, layout.repo_prefix(repo.repo_id))
    again = command.run()
    assert again["imported"] == [] and again["segments"] == [] and again["failed"] == []
    assert len(again["already_present"]) == COUNT
    assert _etags(bucket, layout.repo_prefix(repo.repo_id)) == before


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_live_segment_is_withheld_and_named(
    moto_store_config: StoreConfig, damage: str
) -> None:
    """Format 2: a live segment the service must reject (wrong size, bad header) is named
    in the service's rejected segments and makes every search incomplete, naming it; the
    images stay committed in their pack (the log names them), so a re-run of the import
    commits nothing twice. (Format 1 had no log: its re-run committed the images again.)"""
    config = dataclasses.replace(moto_store_config, bucket=s3servers.unique_bucket("damage"))
    store = ObjectStore(config)
    store.ensure_bucket()
    try:
        files = support.sample_images(24)
        owner = owned_repos.owner_identity()
        settings = fx.fresh_settings()
        repo = owned_repos.create_owned_repository(store, "damaged", owner,
                                                   data_dir=settings.data_path)
        first = Importer(store, repo, workers=2, batch_size=8, writer=owner,
                         settings=settings).run(files)
        assert len(first.segments) == 3
        seg_id = first.segments[1]
        key = layout.segment_key(repo.repo_id, seg_id)
        blob = store.get(key)
        lost = set(decode_segment(blob, key).id_strings())
        features = fx.reader(store, settings, repo)
        lost_features = np.array([features.meta(i)[0]["features"] for i in sorted(lost)])
        store.put(key, {"truncated": blob[:-1], "header": b"XXXX" + blob[4:]}[damage])
        assert _committed(store, repo) == {i for _, i in first.imported} | {
            i for _, _, i in first.frames}  # the log says so

        again = Importer(store, repo, workers=2, batch_size=8, writer=owner,
                         settings=settings).run(files)
        assert again.imported == [] and again.segments == []
        assert len(again.already_present) == 24
        with session_for(load_settings(store="s3", endpoint_url=config.endpoint_url,
                                       bucket=config.bucket), owner) as session:
            state = session.service.refresh(repo.repo_id)
            assert list(state["rejected_segments"]) == [key]
            assert state["images"] == len(support.image_ids(repo, files)) - len(lost)
            with pytest.raises(IncompleteAnswer) as info:
                search_features(session, repo, lost_features, sorted(lost), k=3)
            assert seg_id in str(info.value)
            results = search_features(session, repo, lost_features, sorted(lost), k=3,
                                      allow_incomplete=True)
        for result in results:  # marked, and none of the withheld images is claimed found
            assert result.complete is False and result.segments_missing == [seg_id]
            assert not lost & {h.image_id for h in result.hits}
    finally:
        s3servers.drop_bucket(config)


def test_same_picture_twice_is_stored_once_and_every_path_reported(
    moto_store: ObjectStore, tmp_path: Path
) -> None:
    """Copies of one file under other names, in the same batch and in a later one: one
    image id, one segment entry, and every path accounted for in the report."""
    originals = support.sample_images(6)
    folder = tmp_path / "dups"
    files = support.copy_images(originals, folder)
    twin = folder / ("twin-" + originals[1].name)  # sorts after the originals: batch 2
    twin.write_bytes(originals[1].read_bytes())
    same_batch = folder / ("001b-" + originals[1].name)  # next to the original: batch 1
    same_batch.write_bytes(originals[1].read_bytes())
    owner = owned_repos.owner_identity()
    repo = owned_repos.create_owned_repository(moto_store, "dups", owner)
    report = Importer(moto_store, repo, workers=2, batch_size=4, writer=owner).run([folder])
    paths = [p for p, _ in report.imported] + [p for p, _ in report.already_present]
    assert sorted(paths) == sorted(map(str, [*files, twin, same_batch])), report.as_dict()
    assert report.failed == []
    assert len({i for _, i in report.imported}) == len(report.imported) == 6
    counts = _segment_ids(moto_store, repo)
    assert len(counts) == 6 and set(counts.values()) == {1}
    assert len(list(moto_store.list_keys(layout.objects_prefix(repo.repo_id)))) == 6


def test_cancel_keeps_the_finished_files_and_a_rerun_completes(
    moto_store: ObjectStore
) -> None:
    from app.core.progress import CancelToken, ProgressEvent

    files = support.sample_images(20)
    owner = owned_repos.owner_identity()
    repo = owned_repos.create_owned_repository(moto_store, "cancel", owner)
    cancel = CancelToken()

    def progress(event: ProgressEvent) -> None:
        if event.stage == "import" and event.done == 6:
            cancel.cancel()

    report = Importer(moto_store, repo, workers=2, batch_size=4, progress=progress,
                      cancel=cancel, writer=owner).run(files)
    assert report.cancelled and report.failed == []
    kept = {i for _, i in report.imported}
    assert 6 <= len(kept) < 20  # the finished files of the cancelled batch are committed
    assert _committed(moto_store, repo) == kept | {i for _, _, i in report.frames}
    rest = Importer(moto_store, repo, workers=2, batch_size=4, writer=owner).run(files)
    assert not rest.cancelled and {i for _, i in rest.already_present} == kept
    counts = _segment_ids(moto_store, repo)
    every = support.image_ids(repo, files)  # two 2-frame files among the 20: 22 images
    assert set(counts) == set(every) and set(counts.values()) == {1}
