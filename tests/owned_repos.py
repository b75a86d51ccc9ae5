"""Repositories for tests: owned by an identity, as the product creates them.

Password-only repositories are no longer created by any product code path (issue 11,
item 8). ``create_owned_repository`` makes an owner ``Identity`` (``Identity.generate``)
and creates the repository with ``app.core.access.create_repository_as``; the session it
needs is anything with ``.store`` and ``.settings`` (``StoreSession`` below when a test has
only a store). ``create_legacy_password_repository`` writes the objects of a repository
made before identities (an unsigned manifest and the ring under scrypt as the grant of
``password-owner``), only so that migration (``radcrypt repo migrate``) stays tested.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.core.access import create_repository_as, open_repository_as
from app.core.errors import RepositoryExists
from app.core.identity import IdentityStore
from app.core.repository import Repository, new_repository
from app.core.settings import Settings
from cloud import layout
from cloud.backend import ObjectExists, Store
from crypto.identity import Identity
from crypto.keys import MIN_SCRYPT_LOG2_N, wrap_with_password

# zxcvbn scores these 4 of 4 (a new identity needs 3): use them wherever a test creates an
# identity with a password.
STRONG_PASSWORD = "quiet harbour lantern 47 violet"
OTHER_STRONG_PASSWORD = "marble orchard kettle 19 saffron"
LEGACY_PASSWORD_OWNER = "password-owner"  # the grant name of a pre-identity repository

_TEMP_DIRS: list[str] = []


@atexit.register
def _remove_temp_dirs() -> None:
    for path in _TEMP_DIRS:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class StoreSession:
    """What create_repository_as/open_repository_as use of a Session: store and settings."""

    store: Store
    settings: Settings


def private_data_dir() -> Path:
    """A fresh data directory (pinned owner keys land there), removed at exit."""
    path = tempfile.mkdtemp(prefix="radcrypt-test-owner-")
    _TEMP_DIRS.append(path)
    return Path(path)


def store_session(store: Store, data_dir: Path | None = None) -> StoreSession:
    return StoreSession(store, Settings(data_dir=str(data_dir or private_data_dir())))


def owner_identity(name: str = "Test Owner") -> Identity:
    return Identity.generate(name)


def _session(where: Any, data_dir: Path | None = None) -> Any:
    return store_session(where, data_dir) if isinstance(where, Store) else where


def create_owned_repository(where: Any, name: str, owner: Identity | None = None, *,
                            data_dir: Path | None = None, extractor: str = "radcrypt-v1",
                            basis_sample: np.ndarray | None = None,
                            storage_format: int = 2) -> Repository:
    """A new identity-owned repository, in storage format 2 as the product creates them
    (``storage_format=1`` only for tests of format 1 on purpose: it is read-only, see
    tests/fixtures/format2_support.Format1Importer). ``where`` is a session (``.store``
    and ``.settings``) or a Store (then the pins go to ``data_dir`` or a temporary
    directory). Without ``owner``, a fresh identity owns it."""
    owner = owner if owner is not None else owner_identity()
    return create_repository_as(_session(where, data_dir), owner, name, extractor=extractor,
                                basis_sample=basis_sample, storage_format=storage_format)


def open_owned_repository(where: Any, identity: Identity, name: str, *,
                          data_dir: Path | None = None) -> Repository:
    return open_repository_as(_session(where, data_dir), identity, name)


def identity_on_disk(data_dir: Path, name: str = "Test Owner",
                     password: str = STRONG_PASSWORD) -> Identity:
    """An identity file in ``data_dir`` (what ``radcrypt identity create`` writes), with the
    smallest scrypt work factor for speed."""
    return IdentityStore(data_dir, scrypt_log2_n=MIN_SCRYPT_LOG2_N).create(name, password)


def create_legacy_password_repository(store: Store, name: str, password: str, *,
                                      extractor: str = "radcrypt-v1",
                                      basis_sample: np.ndarray | None = None,
                                      scrypt_log2_n: int = MIN_SCRYPT_LOG2_N) -> Repository:
    """TEST ONLY: the objects a repository had before identities, so that migration is
    tested. The product no longer writes these (see the module docstring)."""
    repo = new_repository(store, name, extractor, basis_sample)
    repo_id = repo.repo_id
    grant = wrap_with_password(repo.ring.to_bytes(), password, log2_n=scrypt_log2_n)
    store.put(layout.grant_key(repo_id, LEGACY_PASSWORD_OWNER), grant)
    manifest = json.loads(repo.manifest.to_json())
    for field in ("sequence", "members", "owner"):  # legacy manifests had none of these
        manifest.pop(field, None)
    try:
        store.put(layout.manifest_key(repo_id),
                  json.dumps(manifest, indent=2, sort_keys=True).encode(), if_absent=True)
    except ObjectExists:
        raise RepositoryExists(f"a repository named {repo_id!r} already exists") from None
    return repo
