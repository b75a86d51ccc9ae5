"""A full disk, a file-size limit and a read-only data directory under an import.

The workstation's data directory (the client's settings and log head, and with the
directory store the objects too) lies on a small tmpfs the test mounts (root only:
without it those two tests skip, saying so; the importer runs in this process), or,
anywhere, a real `radcrypt import` command runs under RLIMIT_FSIZE. Each time: the
import stops (the command exits non-zero) with an error naming the directory and the
cause, nothing is half-written (no temporary file left, ``check`` finds no
problem, every committed image once), and the next run, once there is room (or the
directory is writable again), imports everything.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.core.access import open_repository_as
from app.core.errors import RadcryptError
from app.core.importer import Importer
from app.core.repo_check import check_repository
from app.core.repository import Repository
from app.core.settings import Settings
from cloud.backend import StoreError
from cloud.directory_store import DirectoryStore
from cloud.store import ObjectStore, StoreConfig
from crypto.identity import Identity

try:
    import e2e_support as support
    import owned_repos
    import s3servers
    from faults import synthetic_dicoms
    from fixtures import format2_support as fx
    from workstation import StoreSession
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos, s3servers
    from tests.faults import synthetic_dicoms
    from tests.fixtures import format2_support as fx
    from tests.workstation import StoreSession

COUNT = 32
BATCH = 16
FULL_COUNT = 96  # the full-disk test: the first batches fit, the later ones do not
LEFT_FREE = 700_000  # bytes its ballast leaves


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of its own, unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _remount(mount: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], check=True)


def _fill(mount: Path, leave: int) -> Path:
    """A ballast file that leaves ``leave`` bytes free; deleting it frees the space."""
    ballast = mount / "ballast"
    stat = os.statvfs(mount)
    free = stat.f_bavail * stat.f_frsize
    with ballast.open("wb") as handle:
        handle.write(bytes(max(0, free - leave)))
    return ballast


def _leftovers(directory: Path) -> list[str]:
    """Temporary files a write would leave behind if it were torn."""
    return sorted(str(p) for p in directory.rglob(".*")
                  if p.is_file() and (p.name.startswith((".tmp-", ".radcrypt-"))
                                      or ".json." in p.name))


class _Import:
    def __init__(self, tmp: Path, data_dir: Path, images: Path, repo: str,
                 s3: StoreConfig | None = None) -> None:
        password = tmp / "password.txt"
        password.write_text(owned_repos.STRONG_PASSWORD + "\n")
        self.args = [support.PYTHON, "main.py", "import", "--repo", repo, str(images),
                     "--password-file", str(password), "--data-dir", str(data_dir),
                     "--batch-size", str(BATCH), "--workers", "2"]
        if s3 is None:
            self.args += ["--store", "directory"]
            self.env = dict(os.environ)
        else:
            self.args += ["--store", "s3", "--endpoint", str(s3.endpoint_url),
                          "--bucket", s3.bucket]
            self.env = support.store_env(s3)
        self.env.pop("RADCRYPT_PASSWORD", None)
        for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME"):
            self.env[var] = str(tmp / var.lower())

    def run(self, file_size_limit: int | None = None) -> subprocess.CompletedProcess[str]:
        def limit() -> None:
            if file_size_limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

        return subprocess.run(self.args, cwd=support.PROJECT, env=self.env,
                              capture_output=True, text=True, timeout=300, preexec_fn=limit)


def _setup(data_dir: Path, store: Any, name: str) -> Identity:
    owner = owned_repos.identity_on_disk(data_dir, "Disk Owner")
    owned_repos.create_owned_repository(store, name, owner, data_dir=data_dir)
    return owner


def _committed_once(store: Any, repo: Repository, observer: Path) -> int:
    counts = fx.image_counts(store, Settings(data_dir=str(observer)), repo)
    assert set(counts.values()) <= {1}, "an image is indexed twice"
    return len(counts)


def _check_clean(store: Any, repo: Repository, observer: Path) -> list[tuple[str, str]]:
    report = check_repository(store, Settings(data_dir=str(observer)), repo, read_data=True)
    assert report.problems == [], report.lines()[:5]
    return [(s.type, s.state) for s in report.strays]


def _reopened(store: Any, owner: Identity, name: str, observer: Path) -> Repository:
    """The repository as it is now, opened from another data directory (the import's
    may be full or read-only)."""
    return owned_repos.open_owned_repository(store, owner, name, data_dir=observer)


def _importer(store: Any, owner: Identity, name: str, data_dir: Path) -> Importer:
    """The importer as the CLI builds it, in this process (faster than a command; the
    command's own message is checked under RLIMIT_FSIZE below)."""
    settings = Settings(data_dir=str(data_dir))
    repo = open_repository_as(StoreSession(store, settings), owner, name)
    return Importer(store, repo, batch_size=BATCH, processes=False, writer=owner,
                    settings=settings)


def test_a_full_disk_stops_the_import_and_the_next_run_completes(
    small_fs: Path, tmp_path: Path
) -> None:
    """The directory store and the data directory on a nearly full file system."""
    data_dir = small_fs / "data"
    store = DirectoryStore(data_dir / "objects")
    store.ensure_bucket()
    owner = _setup(data_dir, store, "full")
    files = synthetic_dicoms(tmp_path / "images", FULL_COUNT, seed=11)
    importer = _importer(store, owner, "full", data_dir)
    ballast = _fill(small_fs, LEFT_FREE)

    # Whichever write meets the full disk first stops the import: an object's (the store's
    # StoreError) or the log head's after a commit (the importer's RadcryptError).
    with pytest.raises((StoreError, RadcryptError)) as stopped:
        importer.run(files)
    message = str(stopped.value)
    print(f"\nfull disk: {message}")
    assert getattr(stopped.value, "code", "ENOSPC") == "ENOSPC" and str(data_dir) in message
    assert "No space left on device" in message and "run the import again" in message
    assert _leftovers(data_dir) == []
    repo = _reopened(store, owner, "full", tmp_path / "o1")
    committed = _committed_once(store, repo, tmp_path / "o1")
    print(f"{committed} of {FULL_COUNT} images committed before the disk was full")
    assert committed < FULL_COUNT
    strays = _check_clean(store, repo, tmp_path / "o1")
    assert set(strays) <= {("original", "unreferenced"), ("pack", "unreferenced"),
                           ("segment", "unreferenced")}

    ballast.unlink()
    report = _importer(store, owner, "full", data_dir).run(files)
    assert report.failed == []
    repo = _reopened(store, owner, "full", tmp_path / "o2")
    assert _committed_once(store, repo, tmp_path / "o2") == FULL_COUNT
    strays = _check_clean(store, repo, tmp_path / "o2")
    assert set(strays) <= {("pack", "unreferenced"), ("segment", "unreferenced")}
    assert _leftovers(data_dir) == []


def test_a_file_size_limit_stops_the_import_and_the_next_run_completes(tmp_path: Path
                                                                       ) -> None:
    """RLIMIT_FSIZE on the import child (no root needed): originals fit, a batch's pack
    does not (EFBIG); the command stops with the error, the next run reuses the
    originals and commits everything."""
    data_dir = tmp_path / "data"
    store = DirectoryStore(data_dir / "objects")
    store.ensure_bucket()
    owner = _setup(data_dir, store, "limited")
    synthetic_dicoms(tmp_path / "images", COUNT, seed=12)
    command = _Import(tmp_path, data_dir, tmp_path / "images", "limited")

    first = command.run(file_size_limit=32 * 1024)
    print(f"\nfile size limit: exit {first.returncode}; {first.stderr.strip()[-400:]}")
    assert first.returncode != 0
    assert "File too large" in first.stderr and str(data_dir) in first.stderr
    assert "Traceback" not in first.stderr
    assert _leftovers(data_dir) == []
    repo = _reopened(store, owner, "limited", tmp_path / "o1")
    assert _committed_once(store, repo, tmp_path / "o1") == 0
    _check_clean(store, repo, tmp_path / "o1")

    second = command.run()
    assert second.returncode == 0, second.stderr[-2000:]
    repo = _reopened(store, owner, "limited", tmp_path / "o2")
    assert _committed_once(store, repo, tmp_path / "o2") == COUNT
    assert set(_check_clean(store, repo, tmp_path / "o2")) <= {("pack", "unreferenced"),
                                                               ("segment", "unreferenced")}


@pytest.fixture
def bucket(seaweed_store_config: StoreConfig) -> Iterator[StoreConfig]:
    config = dataclasses.replace(seaweed_store_config, bucket=s3servers.unique_bucket("disk"))
    ObjectStore(config).ensure_bucket()
    yield config
    s3servers.drop_bucket(config)


def test_an_unwritable_data_directory_stops_before_any_upload(
    small_fs: Path, tmp_path: Path, bucket: StoreConfig
) -> None:
    """The objects go to S3; the data directory, where each commit's log head is
    remembered, is read-only, then full: the import stops before uploading anything."""
    data_dir = small_fs / "data"
    store = ObjectStore(bucket)
    owner = _setup(data_dir, store, "ro")
    files = synthetic_dicoms(tmp_path / "images", COUNT, seed=13)
    importer = _importer(store, owner, "ro", data_dir)
    before = set(store.list_keys("radcrypt/"))

    for trouble, cause in [("read-only", "Read-only file system"),
                           ("full", "No space left on device")]:
        if trouble == "read-only":
            _remount(small_fs, "ro")
        else:
            _remount(small_fs, "rw")
            ballast = _fill(small_fs, 0)
        with pytest.raises(RadcryptError) as stopped:
            importer.run(files)
        message = str(stopped.value)
        print(f"\n{trouble}: {message}")
        assert f"cannot write in the data directory {data_dir}" in message
        assert cause in message and "nothing was imported" in message
        assert set(store.list_keys("radcrypt/")) == before

    ballast.unlink()
    assert _leftovers(data_dir) == []
    report = _importer(store, owner, "ro", data_dir).run(files)
    assert report.failed == [] and len(report.imported) == COUNT
    repo = _reopened(store, owner, "ro", tmp_path / "o")
    assert _committed_once(store, repo, tmp_path / "o") == COUNT
    assert _check_clean(store, repo, tmp_path / "o") == []
