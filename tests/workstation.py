"""One user's workstation over a shared bucket, for the tests that play several users.

A ``Workstation`` is an identity and its own data directory (pinned owner keys, remembered
manifest sequences and log heads) over the shared store; what the access functions need of
a session is ``.store`` and ``.settings``. Used by tests/security/access_support.py (as
``Client``) and tests/fixtures/format2_support.py.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.access import open_repository_as
from app.core.importer import Importer
from app.core.repository import Repository
from app.core.settings import Settings
from cloud.backend import Store
from crypto.identity import Identity


@dataclass
class StoreSession:
    store: Any
    settings: Settings


def fresh_settings() -> Settings:
    return Settings(data_dir=tempfile.mkdtemp(prefix="radcrypt-test-"))


@dataclass
class Workstation:
    identity: Identity
    session: StoreSession

    @classmethod
    def make(cls, store: Store, name: str) -> Workstation:
        return cls(Identity.generate(name), StoreSession(store, fresh_settings()))

    @property
    def store(self) -> Any:
        return self.session.store

    @property
    def settings(self) -> Settings:
        return self.session.settings

    @property
    def user_id(self) -> str:
        return self.identity.user_id

    def open(self, repo_id: str) -> Repository:
        return open_repository_as(self.session, self.identity, repo_id)

    def importer(self, repo: Repository, batch: int, store: Any = None) -> Importer:
        return Importer(store or self.store, repo, batch_size=batch, processes=False,
                        writer=self.identity, settings=self.settings)


def sample_files(count: int, skip: int = 0) -> list[Path]:
    from resources.samples import decodable_dicom_files

    files = decodable_dicom_files()
    assert len(files) >= skip + count
    return files[skip : skip + count]


CliRun = Callable[..., tuple[int, str, str]]


def cli_runner(data_dir: Path, password: str, monkeypatch: Any, capsys: Any) -> CliRun:
    """``run(*args)`` -> (exit code, stdout, stderr) of `radcrypt --store directory
    --data-dir DATA_DIR ARGS` in this process, the identity's password from the
    environment (as a script would give it)."""
    from app.cli import main

    monkeypatch.setenv("RADCRYPT_PASSWORD", password)
    base = ["--store", "directory", "--data-dir", str(data_dir)]

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([*base, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@dataclass
class ModeArchive:
    """A repository of one search mode, with its owner's client, for a test module."""

    client: Any
    repo: Any
    root: Path
    store: Any  # the DirectoryStore under the client's objects


@contextmanager
def mode_archive(root: Path, name: str, owner: str, files: int, batch: int,
                 search: str = "ckks") -> Iterator[ModeArchive]:
    """A client on a directory store under ``root`` whose owner (an identity on disk)
    created repository ``name`` in ``search`` mode and imported ``files`` sample images in
    batches of ``batch``: the module fixture the CKKS tests share."""
    from app.core import client as facade
    from cloud.directory_store import DirectoryStore

    try:
        import owned_repos
    except ImportError:  # pragma: no cover
        from tests import owned_repos
    settings = Settings(store="directory", data_dir=str(root / "owner"), workers=1)
    identity = owned_repos.identity_on_disk(settings.data_path, owner)
    with facade.Client(settings, identity) as client:
        repo = client.create_repository(name, search=search)
        report = client.import_files(repo, sample_files(files), batch_size=batch)
        assert report.imported and not report.failed
        yield ModeArchive(client, client.repository(name), root,
                          DirectoryStore(settings.objects_dir))
