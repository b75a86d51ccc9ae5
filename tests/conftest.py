"""Shared pytest fixtures. Add new fixtures under a section heading with a docstring.

Sections: environment isolation (autouse), S3 servers and stores.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import signal
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.backend import Store
from cloud.directory_store import DirectoryStore
from cloud.store import ObjectStore, StoreConfig

try:  # tests/ is a rootdir-less folder today; keep working if it becomes a package
    import s3servers
except ImportError:  # pragma: no cover
    from tests import s3servers

# --- environment isolation (autouse) --------------------------------------------------

_AWS_VARS_TO_CLEAR = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@pytest.fixture(autouse=True)
def isolated_env(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Fake AWS credentials and private XDG dirs for every test.

    Why: a test must never reach a real AWS account (boto3 would find ~/.aws or an
    instance role) nor read or write the developer's real Radcrypt config and data
    (platformdirs follows XDG_*). Returns the root of the private dirs.
    """
    root = tmp_path_factory.mktemp("env")
    for name in _AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(root / "aws-config-absent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(root / "aws-credentials-absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"),
                     ("XDG_CACHE_HOME", "cache"), ("XDG_STATE_HOME", "state")):
        (root / sub).mkdir()
        monkeypatch.setenv(var, str(root / sub))
    return root


_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
_DEFAULTS = {signal.SIGINT: signal.default_int_handler}


def _restore_ignored_signals() -> list[str]:
    """Put back the default of SIGINT, SIGTERM and SIGHUP where they are ignored; the names
    of those restored. Main thread only (elsewhere nothing can be changed)."""
    if threading.current_thread() is not threading.main_thread():
        return []
    restored = []
    for signum in _SIGNALS:
        if signal.getsignal(signum) is signal.SIG_IGN:
            signal.signal(signum, _DEFAULTS.get(signum, signal.SIG_DFL))
            restored.append(signal.Signals(signum).name)
    return restored


@pytest.fixture(scope="session", autouse=True)
def signals_handled_from_the_start() -> None:
    """The suite's Ctrl+C and SIGTERM tests need those signals to reach the children they
    start. A run launched in the background by a non-interactive shell (`make test &`,
    `nohup make test`) starts with SIGINT and SIGHUP ignored, and an ignored signal is
    inherited by every child: such tests then hang until their timeouts. The defaults are
    put back once, at the start."""
    _restore_ignored_signals()


@pytest.fixture(autouse=True)
def signal_dispositions(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test leaves Ctrl+C, SIGTERM and SIGHUP handled, not ignored (a shutdown
    handler of ours run in-process ignores further signals while it unwinds); a test that
    does not is named in a warning and the defaults are put back, so that it cannot make
    later tests of signals hang."""
    yield
    restored = _restore_ignored_signals()
    if restored:
        warnings.warn(f"{request.node.nodeid} left {', '.join(restored)} ignored in the test "
                      "process; the defaults are restored", stacklevel=1)


# --- S3 servers and stores --------------------------------------------------------------
#
# One moto server and one SeaweedFS per test session, started on first use. moto runs in
# this process and shares moto's global state: a test using moto's mock_aws() resets it,
# so such tests must not rely on these servers' buckets surviving.


@pytest.fixture(scope="session")
def moto_store_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreConfig]:
    """A moto server over HTTP (bucket 'radcrypt' exists); in memory, any key accepted."""
    handle = s3servers.start_moto(tmp_path_factory.mktemp("moto"))
    yield handle.config()
    handle.stop()


@pytest.fixture(scope="session")
def seaweed_store_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreConfig]:
    """A SeaweedFS `weed mini` (bucket 'radcrypt' exists), with real credential checks."""
    handle = s3servers.start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield handle.config()
    handle.stop()


@pytest.fixture(params=["moto", "seaweed"])
def s3_config(request: pytest.FixtureRequest) -> Iterator[StoreConfig]:
    """Config of each server in turn, with a fresh bucket name NOT yet created.

    Call ObjectStore(config).ensure_bucket() (or use ``s3_store``). The bucket is deleted
    after the test: SeaweedFS allots one volume per bucket and runs out after ~78.
    """
    base: StoreConfig = request.getfixturevalue(f"{request.param}_store_config")
    config = dataclasses.replace(base, bucket=s3servers.unique_bucket())
    yield config
    s3servers.drop_bucket(config)


@pytest.fixture
def moto_store(moto_store_config: StoreConfig) -> Iterator[ObjectStore]:
    """An ObjectStore on the shared moto server, its own fresh bucket, dropped after."""
    config = dataclasses.replace(moto_store_config, bucket=s3servers.unique_bucket("moto"))
    store = ObjectStore(config)
    store.ensure_bucket()
    yield store
    s3servers.drop_bucket(config)


@pytest.fixture
def s3_store(s3_config: StoreConfig) -> ObjectStore:
    """An ObjectStore on each server in turn, its fresh bucket created."""
    store = ObjectStore(s3_config)
    store.ensure_bucket()
    return store


@pytest.fixture(params=["moto", "seaweed", "directory"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Every backend of cloud.backend.Store in turn, empty and ready: S3 on moto, S3 on
    SeaweedFS (each a fresh bucket, dropped after) and a DirectoryStore in tmp_path."""
    if request.param == "directory":
        directory = DirectoryStore(tmp_path / "objects")
        directory.ensure_bucket()
        yield directory
        return
    base: StoreConfig = request.getfixturevalue(f"{request.param}_store_config")
    config = dataclasses.replace(base, bucket=s3servers.unique_bucket())
    store = ObjectStore(config)
    store.ensure_bucket()
    yield store
    s3servers.drop_bucket(config)


# --- secrets never logged (whole suite) ----------------------------------------------------
#
# Every key and password the suite creates is remembered (by wrapping the functions that
# create or use them), every log record of the suite is kept, and at the end no secret
# may appear in any record in hex, base64 or raw form. A leak fails the run at teardown.


class _LogKeeper(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a broken record must not break the suite
            self.lines.append(repr(record.msg))


def _secret_forms(secret: bytes | str) -> list[str]:
    if isinstance(secret, str):
        return [secret] if len(secret) >= 6 else []
    return [secret.hex(), base64.b64encode(secret).decode()[:40],
            secret.decode("latin-1")] if len(secret) >= 16 else []


@pytest.fixture(scope="session", autouse=True)
def secrets_never_logged() -> Iterator[list[bytes | str]]:
    from crypto import identity as identity_module
    from crypto import keys as keys_module

    remembered: list[bytes | str] = []
    patch = pytest.MonkeyPatch()
    original_generate = keys_module.VersionKeys.generate.__func__  # type: ignore[attr-defined]
    original_derive = keys_module._derive
    original_identity = identity_module.Identity.generate.__func__  # type: ignore[attr-defined]

    def generate_keys(cls: type, version: int, index_key: object) -> object:
        keys = original_generate(cls, version, index_key)
        remembered.extend([keys.data_key, keys.keyword_key])
        return keys

    def derive(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
        remembered.append(password)  # every password that wraps or unwraps a key
        key = original_derive(password, salt, log2_n, r, p)
        remembered.append(key)
        return key

    def generate_identity(cls: type, name: str, user_id: str | None = None) -> object:
        made = original_identity(cls, name, user_id)
        remembered.extend([made.enc_private, made.sign_private])
        return made

    patch.setattr(keys_module.VersionKeys, "generate", classmethod(generate_keys))
    patch.setattr(keys_module, "_derive", derive)
    patch.setattr(identity_module.Identity, "generate", classmethod(generate_identity))
    keeper = _LogKeeper()
    keeper.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(keeper)
    ours = [logging.getLogger(n) for n in ("app", "cloud", "crypto", "radcrypt")]
    for logger in ours:
        logger.setLevel(logging.DEBUG)
    yield remembered
    root.removeHandler(keeper)
    patch.undo()
    text = "\n".join(keeper.lines)
    leaks = [form[:12] + "..." for secret in remembered for form in _secret_forms(secret)
             if form and form in text]
    assert not leaks, f"secrets found in the suite's logs: {leaks[:5]}"
