"""SIGKILL a real `radcrypt import` at seeded random steps, rerun it: nothing lost or doubled.

`python main.py import --store s3` runs against SeaweedFS with the importer's test hook
RADCRYPT_TEST_KILL_AT=<step>:<n> (app/core/importer.py, _KillSwitch): the process kills
itself the n-th time it passes a step: a file analysed ("file"), an original stored
("original"), a batch's pack and segment stored before its log entry ("stored"), a log
entry appended ("entry"). Each run resumes what the one before it left; after every kill
the verified log names no image twice and only files of the import; a last run without
the hook finishes, and then the repository holds every file once (the same names as the
files, one original each, each image in one live segment and pack), its images are found
first by their own features, and ``check`` finds no problem: only the orphans the killed
runs left (packs and segments no log entry names, listed as strays). The seed is printed;
RADCRYPT_TEST_SEED=<seed> replays the same kill points. ``make test``: 3 kill points;
``make soak``: 20.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.core.importer import KILL_ENV, image_id_for
from app.core.repo_check import check_repository
from app.core.settings import Settings
from cloud import layout
from cloud.store import ObjectStore, StoreConfig

try:
    import e2e_support as support
    import owned_repos
    import s3servers
    from faults import synthetic_dicoms
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos, s3servers
    from tests.faults import synthetic_dicoms
    from tests.fixtures import format2_support as fx

BATCH = 8


@pytest.fixture
def bucket(seaweed_store_config: StoreConfig) -> Iterator[StoreConfig]:
    config = dataclasses.replace(seaweed_store_config, bucket=s3servers.unique_bucket("kill"))
    ObjectStore(config).ensure_bucket()
    yield config
    s3servers.drop_bucket(config)


class _Import:
    """`python main.py import` of one folder into one repository, as a user runs it."""

    def __init__(self, config: StoreConfig, repo_id: str, folder: Path, tmp: Path,
                 data_dir: Path) -> None:
        password_file = tmp / "password.txt"
        password_file.write_text(owned_repos.STRONG_PASSWORD + "\n")
        self.args = [support.PYTHON, "main.py", "import", "--repo", repo_id, str(folder),
                     "--password-file", str(password_file), "--data-dir", str(data_dir),
                     "--store", "s3", "--endpoint", str(config.endpoint_url),
                     "--bucket", config.bucket, "--batch-size", str(BATCH),
                     "--workers", "2", "--json"]
        self.env = support.store_env(config)
        self.env.pop("RADCRYPT_PASSWORD", None)
        self.env.pop(KILL_ENV, None)
        for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME"):
            self.env[var] = str(tmp / var.lower())

    def run(self, kill_at: str | None) -> subprocess.CompletedProcess[bytes]:
        env = dict(self.env)
        if kill_at is not None:
            env[KILL_ENV] = kill_at
        return subprocess.run(self.args, cwd=support.PROJECT, env=env, capture_output=True,
                              timeout=300)


def _kill_point(rng: random.Random, remaining: int) -> str:
    """A step and how many times to pass it, within about two batches of what is left."""
    step = rng.choice(["file", "original", "stored", "entry"])
    if step in ("file", "original"):
        return f"{step}:{rng.randint(1, max(1, min(remaining, 2 * BATCH)))}"
    return f"{step}:{rng.randint(1, 2)}"


def _kill_and_resume(bucket: StoreConfig, tmp_path: Path, points: int, count: int) -> None:
    seed = int(os.environ.get("RADCRYPT_TEST_SEED") or time.time_ns() % 1_000_000)
    print(f"\nkill seed {seed} (RADCRYPT_TEST_SEED={seed} replays these kill points)")
    rng = random.Random(seed)
    store = ObjectStore(bucket)
    files = synthetic_dicoms(tmp_path / "images", count, seed=count)
    data_dir = tmp_path / "data"
    owner = owned_repos.identity_on_disk(data_dir, "Kill Owner")
    repo = owned_repos.create_owned_repository(store, "killed", owner, data_dir=data_dir)
    expected = {image_id_for(repo, hashlib.sha256(p.read_bytes()).digest()) for p in files}
    command = _Import(bucket, repo.repo_id, tmp_path / "images", tmp_path, data_dir)
    settings = Settings(data_dir=str(tmp_path / "observer"))

    committed: set[str] = set()
    outcomes: list[str] = []
    started = time.perf_counter()
    for _ in range(points):
        point = _kill_point(rng, count - len(committed))
        done = command.run(point)
        counts = fx.image_counts(store, settings, repo)
        assert set(counts.values()) <= {1}, (seed, point, "an image is indexed twice")
        assert set(counts) <= expected, (seed, point)
        assert set(counts) >= committed, (seed, point, "a committed image was lost")
        if done.returncode == -9:
            outcome = "killed"
        else:  # the step was not reached n times: the run must have finished cleanly
            assert done.returncode == 0, (seed, point, done.stderr.decode()[-2000:])
            outcome = "finished"
        outcomes.append(f"{point} {outcome} ({len(counts)} committed)")
        committed = set(counts)
    deadline = time.monotonic() + 10  # the killed runs' decoder children see stdin close
    while support.processes_with_env("RADCRYPT_S3_BUCKET", bucket.bucket):
        assert time.monotonic() < deadline, "a killed import left processes running"
        time.sleep(0.1)
    print("\n".join(outcomes))

    final = command.run(None)
    assert final.returncode == 0, (seed, final.stderr.decode()[-2000:])
    report: dict[str, Any] = json.loads(final.stdout)
    assert report["failed"] == [], seed
    assert {i["image_id"] for i in report["already_present"]} == committed
    print(f"{points} kill points and a last run of {count} images in "
          f"{time.perf_counter() - started:.1f} s (load {os.getloadavg()[0]:.1f})")

    # -- the same as a clean run: every file once, found by its own features
    repo = owned_repos.open_owned_repository(store, owner, "killed", data_dir=data_dir)
    counts = fx.image_counts(store, settings, repo)
    assert set(counts) == expected and set(counts.values()) == {1}, seed
    reader = fx.reader(store, settings, repo)
    assert sorted(reader.meta(i)[0]["name"] for i in counts) == sorted(p.name for p in files)
    assert len(list(store.list_keys(layout.objects_prefix(repo.repo_id)))) == count
    probes = sorted(counts)[:10]
    features = np.array([reader.meta(i)[0]["features"] for i in probes])
    answers = fx.engine_answers(store, settings, repo, fx.query_token(repo, features))
    for image_id, scores in zip(probes, answers, strict=True):
        assert max(scores, key=lambda i: scores[i]) == image_id, seed

    check = check_repository(store, settings, repo)
    assert check.problems == [], (seed, check.lines()[:5])
    orphans = [(s.type, s.state) for s in check.strays]
    assert set(orphans) <= {("pack", "unreferenced"), ("segment", "unreferenced")}, orphans
    print(f"check: no problem, {len(orphans)} orphans listed "
          f"({sum(t == 'pack' for t, _ in orphans)} packs)")


def test_import_killed_at_seeded_steps_resumes(bucket: StoreConfig, tmp_path: Path) -> None:
    _kill_and_resume(bucket, tmp_path, points=3, count=40)


@pytest.mark.soak
def test_import_killed_at_20_seeded_steps_resumes(bucket: StoreConfig, tmp_path: Path
                                                  ) -> None:
    _kill_and_resume(bucket, tmp_path, points=20, count=200)
