"""Issue 11, item 8 and the identity-file item: passwords and identities.

Each test performs the attack or the misuse and asserts the refusal:
- no repository is created without an identity, and no product path writes a
  password-only repository (ring under scrypt as the grant of ``password-owner``, unsigned
  manifest); old ones still migrate;
- scrypt parameters read from the bucket or the disk are capped near the defaults, and
  refused before any scrypt work;
- a new identity's password must score 3 of 4 with zxcvbn (its feedback is shown);
- the identity file is created with O_EXCL|O_NOFOLLOW and mode 0600: a link planted at its
  temporary name or at its own name is not followed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.errors import RadcryptError
from app.core.identity import CARD_FILE, IDENTITY_FILE, IdentityStore, password_strength
from app.core.repository import open_repository
from cloud import layout
from cloud.store import ObjectStore, StoreConfig
from crypto.errors import FormatError
from crypto.keys import (
    MIN_SCRYPT_LOG2_N,
    WrongPassword,
    unwrap_with_password,
    wrap_with_password,
)
from crypto.signed import json_signer

try:
    import e2e_support as support
    import owned_repos
    import s3servers
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos, s3servers

PASSWORD = owned_repos.STRONG_PASSWORD
FAST = MIN_SCRYPT_LOG2_N


# --- the CLI against a private bucket -----------------------------------------------------


@dataclasses.dataclass
class Cli:
    config: StoreConfig
    root: Path

    @property
    def store(self) -> ObjectStore:
        return ObjectStore(self.config)

    def run(self, *args: str, password: str = PASSWORD, **env: str
            ) -> subprocess.CompletedProcess[str]:
        environ = support.store_env(self.config)
        for key in list(environ):
            if key.startswith("RADCRYPT_") and not key.startswith("RADCRYPT_S3_"):
                environ.pop(key)
        for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
            environ[var] = str(self.root / var.lower())
        environ.update({"RADCRYPT_PASSWORD": password, **env})
        return subprocess.run(
            [support.PYTHON, "main.py", *args, "--store", "s3", "--endpoint",
             str(self.config.endpoint_url), "--bucket", self.config.bucket],
            cwd=support.PROJECT, env=environ, capture_output=True, text=True, timeout=300)

    def keys(self) -> list[str]:
        return sorted(self.store.list_keys(""))


@pytest.fixture
def cli(moto_store_config: StoreConfig, tmp_path: Path) -> Iterator[Cli]:
    config = dataclasses.replace(moto_store_config, bucket=s3servers.unique_bucket("idpw"))
    ObjectStore(config).ensure_bucket()
    yield Cli(config, tmp_path / "cli")
    s3servers.drop_bucket(config)


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("radcrypt: "), done.stderr
    return lines[0]


def _password_objects(store: ObjectStore) -> list[str]:
    """Objects a password-only repository consists of: the ``password-owner`` grant, any
    blob wrapped under a password (magic RCPW), any unsigned manifest."""
    found = []
    for key in store.list_keys(""):
        blob = store.get(key)
        if key.endswith("/grants/password-owner") or blob[:4] == b"RCPW":
            found.append(key)
        elif key.endswith("/manifest.json") and json_signer(blob) is None:
            found.append(key)
    return found


def test_repo_create_without_identity_fails_and_writes_nothing(cli: Cli) -> None:
    line = _one_error_line(cli.run("repo", "create", "no-owner"))
    assert "radcrypt identity create" in line and "first" in line
    assert cli.keys() == []  # not a manifest, not a grant, nothing


def test_no_product_path_writes_a_password_repository(cli: Cli, tmp_path: Path) -> None:
    """The CLI's identity/create/import flow and the demo's repository: every repository
    is owner-signed and wrapped to an identity; nothing is wrapped under a password."""
    from app.core.demo import prepare_demo_repository

    done = cli.run("identity", "create", "--name", "Dr. Owner")
    assert done.returncode == 0, done.stderr
    done = cli.run("repo", "create", "ct-owned", "--json")
    assert done.returncode == 0, done.stderr
    files = support.copy_images(support.sample_images(4), tmp_path / "images")
    done = cli.run("import", "--repo", "ct-owned", *map(str, files), "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["imported"]) == 4

    session = owned_repos.store_session(cli.store, tmp_path / "demo-data")
    demo, _, report, owner = prepare_demo_repository(session, tmp_path / "demo", count=3)
    assert len(report.imported) == 3
    keys = cli.keys()
    assert layout.manifest_key("ct-owned") in keys
    assert layout.manifest_key(demo.repo_id) in keys
    assert layout.grant_key(demo.repo_id, owner.user_id) in keys
    assert _password_objects(cli.store) == []


def test_old_password_repository_still_migrates_but_is_not_opened_as_such(
        cli: Cli) -> None:
    owned_repos.create_legacy_password_repository(cli.store, "legacy", "old repo password 1")
    assert _password_objects(cli.store)  # what a repository made before identities holds
    assert cli.run("identity", "create", "--name", "Dr. Owner").returncode == 0
    # the commands that open repositories no longer open a password-locked one
    line = _one_error_line(cli.run("import", "--repo", "legacy", str(support.PROJECT)))
    assert "migrate" in line
    done = cli.run("repo", "migrate", "legacy", RADCRYPT_OLD_PASSWORD="old repo password 1")
    assert done.returncode == 0, done.stderr
    assert _password_objects(cli.store) == []
    assert json_signer(cli.store.get(layout.manifest_key("legacy"))) is not None


# --- scrypt parameters from the bucket or the disk --------------------------------------


def _with_params(blob: bytes, log2_n: int, r: int, p: int) -> bytes:
    return blob[:5] + bytes([log2_n, r, p]) + blob[8:]


HOSTILE = [(22, 8, 1), (19, 8, 1), (17, 32, 1), (10, 32, 1), (17, 8, 16), (17, 8, 2)]


@pytest.mark.parametrize(("log2_n", "r", "p"), HOSTILE)
def test_hostile_scrypt_parameters_are_refused_before_any_work(log2_n: int, r: int,
                                                               p: int) -> None:
    """Old limits (log2 N 22, r 32, p 16) let a file demand up to 16 GiB and minutes of
    work before the password was even checked. Refused at once now."""
    blob = _with_params(wrap_with_password(b"k" * 32, PASSWORD, log2_n=FAST), log2_n, r, p)
    started = time.perf_counter()
    with pytest.raises(FormatError, match="scrypt"):
        unwrap_with_password(blob, PASSWORD)
    assert time.perf_counter() - started < 1.0
    with pytest.raises(ValueError, match="scrypt"):  # and never written either
        wrap_with_password(b"k", PASSWORD, log2_n=log2_n, r=r, p=p)


def test_parameters_near_the_defaults_are_still_accepted() -> None:
    for log2_n in (FAST, 17):
        assert unwrap_with_password(wrap_with_password(b"s", PASSWORD, log2_n=log2_n),
                                    PASSWORD) == b"s"
    # log2 N = 18 is accepted (scrypt runs): the altered header then fails authentication
    blob = _with_params(wrap_with_password(b"s", PASSWORD, log2_n=FAST), 18, 8, 1)
    with pytest.raises(WrongPassword):
        unwrap_with_password(blob, PASSWORD)


def test_hostile_identity_file_and_legacy_grant_are_refused_quickly(
        tmp_path: Path, moto_store: ObjectStore) -> None:
    """Through the product's readers: the identity file on disk, a legacy grant in the
    bucket (a cloud that rewrites it to demand 4 GiB)."""
    identities = IdentityStore(tmp_path, FAST)
    identities.create("Dr. Owner", PASSWORD)
    identities.path.write_bytes(_with_params(identities.path.read_bytes(), 22, 8, 1))
    started = time.perf_counter()
    with pytest.raises(RadcryptError, match=r"damaged.*scrypt"):
        identities.unlock(PASSWORD)
    assert time.perf_counter() - started < 1.0

    owned_repos.create_legacy_password_repository(moto_store, "hostile-grant", PASSWORD)
    name = layout.grant_key("hostile-grant", owned_repos.LEGACY_PASSWORD_OWNER)
    moto_store.put(name, _with_params(moto_store.get(name), 17, 32, 16))
    started = time.perf_counter()
    with pytest.raises(RadcryptError, match=r"damaged.*scrypt"):
        open_repository(moto_store, "hostile-grant", PASSWORD)
    assert time.perf_counter() - started < 1.0


# --- password rule for new identities --------------------------------------------------


@pytest.mark.parametrize("weak", ["password123", "Tr0ub4dor", "P@ssw0rd2024",
                                  "qwertyuiop1234"])
def test_weak_password_is_refused_for_a_new_identity(tmp_path: Path, weak: str) -> None:
    store = IdentityStore(tmp_path, FAST)
    with pytest.raises(RadcryptError, match="too easy to guess") as caught:
        store.create("Dr. Owner", weak)
    message = str(caught.value)
    assert weak not in message  # the feedback, never the password
    assert "3 needed" in message
    assert not store.path.exists() and not store.card_path.exists()
    assert password_strength(weak)[0] < 3


def test_zxcvbn_feedback_is_shown_in_plain_words(tmp_path: Path) -> None:
    with pytest.raises(RadcryptError, match="This is a very common password"):
        IdentityStore(tmp_path, FAST).create("Dr. Owner", "password123")
    score, words = password_strength("Tr0ub4dor")
    assert score < 3 and "at least 12 characters" in words


def test_strong_passphrase_is_accepted(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path, FAST)
    made = store.create("Dr. Owner", "correct horse battery staple")
    assert password_strength("correct horse battery staple") == (4, "strong")
    assert store.unlock("correct horse battery staple").user_id == made.user_id


def test_cli_identity_create_refuses_a_weak_password(cli: Cli) -> None:
    line = _one_error_line(cli.run("identity", "create", "--name", "Dr. Owner",
                                   password="password123"))
    assert "too easy to guess" in line and "very common password" in line
    assert "password123" not in line
    assert not list((cli.root / "xdg_data_home").rglob(IDENTITY_FILE))


# --- the identity file on disk -------------------------------------------------------------


def _plant(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)


def test_link_planted_at_the_temporary_name_is_not_followed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    victim = tmp_path / "elsewhere" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("do not touch")
    victim.chmod(0o644)
    for name in (IDENTITY_FILE, CARD_FILE):
        _plant(data / (name + ".tmp"), victim)
    store = IdentityStore(data, FAST)
    made = store.create("Dr. Owner", PASSWORD)
    assert victim.read_text() == "do not touch"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    for path in (store.path, store.card_path):
        info = path.lstat()
        assert stat.S_ISREG(info.st_mode), path  # a file of its own, not a link
    assert stat.S_IMODE(store.path.lstat().st_mode) == 0o600
    assert not (data / (IDENTITY_FILE + ".tmp")).exists()
    assert store.unlock(PASSWORD).user_id == made.user_id


def test_link_planted_at_the_identity_name_is_not_written_through(tmp_path: Path) -> None:
    data = tmp_path / "data"
    outside = tmp_path / "outside" / "stolen.rcid"
    outside.parent.mkdir()
    _plant(data / IDENTITY_FILE, outside)  # dangling: would create a file outside
    store = IdentityStore(data, FAST)
    store.create("Dr. Owner", PASSWORD)
    assert not outside.exists()
    assert stat.S_ISREG(store.path.lstat().st_mode)
    assert stat.S_IMODE(store.path.lstat().st_mode) == 0o600


def test_identity_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = IdentityStore(tmp_path / "data", FAST)
        store.create("Dr. Owner", PASSWORD)
    finally:
        os.umask(old)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
