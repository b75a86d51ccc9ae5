"""The backend suite every object store must pass (after restic's backend tests).

The behaviour of cloud.backend.Store runs on every backend (``any_store``: S3 on moto over
HTTP, S3 on SeaweedFS, and the local DirectoryStore), so what the application relies on
is checked on each implementation. S3-only behaviour (multipart, the If-None-Match probe,
endpoints and credentials) runs on both S3 servers (``s3_store`` / ``s3_config``). Tests
compare key *sets* where SeaweedFS lists directory-first, not in S3's byte order; the
directory store's order is checked in tests/test_directory_store.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloud import layout
from cloud.backend import Store
from cloud.directory_store import DirectoryStore
from cloud.store import (
    MULTIPART_THRESHOLD,
    BucketNotFound,
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    StoreConfig,
    StoreError,
    StoreUnavailable,
)

try:
    import s3servers
except ImportError:  # pragma: no cover
    from tests import s3servers

MiB = 1024 * 1024


# --- round trips -----------------------------------------------------------------------


def test_put_get_round_trip(any_store: Store) -> None:
    data = os.urandom(4096)
    any_store.put("radcrypt/v1/a", data)
    assert any_store.get("radcrypt/v1/a") == data
    assert any_store.size("radcrypt/v1/a") == 4096
    assert any_store.exists("radcrypt/v1/a")


def test_overwrite_replaces(any_store: Store) -> None:
    any_store.put("k", b"first")
    any_store.put("k", bytearray(b"second, longer"))
    assert any_store.get("k") == b"second, longer"


def test_empty_object(any_store: Store) -> None:
    any_store.put("empty", b"")
    assert any_store.get("empty") == b""
    assert any_store.size("empty") == 0
    assert list(any_store.iter_chunks("empty")) == []
    assert any_store.get_range("empty", 0, 10) == b""
    assert list(any_store.list_objects("empty")) == [("empty", 0)]


def test_layout_keys_round_trip(any_store: Store) -> None:
    repo, seg = "ward-7", layout.new_id()
    any_store.put(layout.manifest_key(repo), b"{}")
    any_store.put(layout.segment_key(repo, seg), b"segment")
    listed = list(any_store.list_keys(layout.segments_prefix(repo)))
    assert [layout.parse_segment_key(k) for k in listed] == [(repo, seg)]


def _write_random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            block = os.urandom(MiB)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def _etag(config: StoreConfig, key: str) -> str:
    head = s3servers.raw_client(config).head_object(Bucket=config.bucket, Key=key)
    return str(head["ETag"]).strip('"')


def test_multipart_file_round_trip_20mib(s3_store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    expected = _write_random_file(source, 20 * MiB)
    s3_store.put_file("big", source)

    assert s3_store.size("big") == 20 * MiB
    assert "-" in _etag(s3_store.config, "big"), "20 MiB should have gone multipart"
    digest, sizes = hashlib.sha256(), []
    for chunk in s3_store.iter_chunks("big"):
        digest.update(chunk)
        sizes.append(len(chunk))
    assert digest.hexdigest() == expected
    assert max(sizes) <= MiB and sum(sizes) == 20 * MiB


class _OneWayStream(io.RawIOBase):
    """A non-seekable stream that produces data on demand, like a pipe or an encryptor."""

    def __init__(self, size: int) -> None:
        self.remaining = size
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.remaining, 256 * 1024)
        block = os.urandom(n)
        buffer[:n] = block
        self.digest.update(block)
        self.remaining -= n
        return n


def test_put_stream_non_seekable_multipart(s3_store: ObjectStore) -> None:
    stream = _OneWayStream(MULTIPART_THRESHOLD + 3 * MiB)
    s3_store.put_stream("streamed", stream)  # type: ignore[arg-type]
    assert "-" in _etag(s3_store.config, "streamed")
    got = hashlib.sha256()
    for chunk in s3_store.iter_chunks("streamed", chunk_size=3 * MiB):
        got.update(chunk)
    assert got.hexdigest() == stream.digest.hexdigest()


def test_get_range(any_store: Store) -> None:
    data = bytes(range(256)) * 4  # 1024 bytes
    any_store.put("r", data)
    assert any_store.get_range("r", 0, 10) == data[:10]
    assert any_store.get_range("r", 500, 24) == data[500:524]
    assert any_store.get_range("r", 1000, 100) == data[1000:]  # short read at the end
    assert any_store.get_range("r", 1024, 5) == b""  # starts at the end
    assert any_store.get_range("r", 5, 0) == b""
    with pytest.raises(ValueError):
        any_store.get_range("r", -1, 5)
    with pytest.raises(ObjectNotFound):
        any_store.get_range("missing", 0, 5)


def test_iter_chunks_sizes(any_store: Store) -> None:
    any_store.put("c", b"x" * 2500)
    assert [len(c) for c in any_store.iter_chunks("c", chunk_size=1000)] == [1000, 1000, 500]


# --- listing -------------------------------------------------------------------------


def _put_many(store: Store, keys: list[str]) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda k: store.put(k, k.encode()), keys))


def test_list_more_than_one_page(s3_store: ObjectStore) -> None:
    """1200 objects: beyond S3's 1000-key page, in a tree whose order differs by server;
    S3 lets an object's key be a prefix of others' ("radcrypt/v1/repos/r")."""
    prefix = "radcrypt/v1/repos/r/"
    inside = [f"{prefix}{d}/{i:05d}" for i, d in
              zip(range(1200), ["objects", "objects-x", "meta"] * 400, strict=True)]
    outside = ["radcrypt/v1/repos/r-2/objects/1", "radcrypt/v1/repos/r", "radcrypt/v1/other"]
    _put_many(s3_store, inside + outside)

    listed = list(s3_store.list_objects(prefix))
    keys = [k for k, _ in listed]
    assert len(keys) == len(set(keys)) == 1200
    assert set(keys) == set(inside)
    assert all(size == len(k) for k, size in listed)

    small_pages = ObjectStore(s3_store.config, page_size=7)
    assert sorted(small_pages.list_keys(prefix + "meta/")) == sorted(inside[2::3])


def test_list_many_objects_in_a_tree(any_store: Store) -> None:
    """1200 objects in a tree whose order differs by backend; listing is complete, each
    key once, with its size, and nothing outside the prefix."""
    prefix = "radcrypt/v1/repos/r/"
    inside = [f"{prefix}{d}/{i:05d}" for i, d in
              zip(range(1200), ["objects", "objects-x", "meta"] * 400, strict=True)]
    outside = ["radcrypt/v1/repos/r-2/objects/1", "radcrypt/v1/repos/r.json",
               "radcrypt/v1/other"]
    _put_many(any_store, inside + outside)
    listed = list(any_store.list_objects(prefix))
    keys = [k for k, _ in listed]
    assert len(keys) == len(set(keys)) == 1200
    assert set(keys) == set(inside)
    assert all(size == len(k) for k, size in listed)
    assert sorted(any_store.list_keys(prefix + "meta/")) == sorted(inside[2::3])
    assert sorted(any_store.list_keys("radcrypt/v1/repos/r")) == sorted(inside + outside[:2])


def test_put_file_and_put_stream_round_trip(any_store: Store, tmp_path: Path) -> None:
    source = tmp_path / "file.bin"
    expected = _write_random_file(source, 3 * MiB)
    any_store.put_file("f", source)
    assert hashlib.sha256(any_store.get("f")).hexdigest() == expected
    stream = _OneWayStream(2 * MiB + 123)
    any_store.put_stream("s", stream)  # type: ignore[arg-type]
    assert any_store.size("s") == 2 * MiB + 123
    assert hashlib.sha256(any_store.get("s")).hexdigest() == stream.digest.hexdigest()
    with pytest.raises(FileNotFoundError):
        any_store.put_file("nothing", tmp_path / "absent")


def test_create_if_absent_has_one_winner(any_store: Store) -> None:
    """8 writers race to create one key: exactly one wins, the others get ObjectExists,
    and the stored object is the winner's."""
    for round_ in range(3):
        key = f"radcrypt/v1/contended-{round_}"
        winners: list[int] = []
        barrier = threading.Barrier(8)

        def race(i: int, key: str = key, winners: list[int] = winners,
                 barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                any_store.put(key, str(i).encode() * 1000, if_absent=True)
                winners.append(i)
            except ObjectExists:
                pass

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(race, range(8)))
        assert len(winners) == 1
        assert any_store.get(key) == str(winners[0]).encode() * 1000
    with pytest.raises(ObjectExists):
        any_store.put("radcrypt/v1/contended-0", b"late", if_absent=True)


def test_readers_see_whole_objects_while_writers_replace(any_store: Store) -> None:
    """Concurrent overwrites: every read returns one writer's complete object."""
    versions = [bytes([i]) * (256 * 1024) for i in range(6)]
    any_store.put("hot", versions[0])
    stop = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(any_store.get("hot"))
            except BaseException as exc:  # reported below, not lost in the thread
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(lambda v: any_store.put("hot", v), versions * 3))
    finally:
        stop.set()
        reader.join()
    assert not errors, errors
    assert seen and all(data in versions for data in seen)
    assert any_store.get("hot") in versions


def test_list_prefix_is_a_string_prefix(any_store: Store) -> None:
    for key in ["a/b/c", "a/b-x", "a/bc", "ab", "b"]:
        any_store.put(key, b"1")
    assert sorted(any_store.list_keys("a/b")) == ["a/b-x", "a/b/c", "a/bc"]
    assert sorted(any_store.list_keys("a/b/")) == ["a/b/c"]
    assert list(any_store.list_keys("nothing/")) == []


# --- missing keys, conditional writes --------------------------------------------------


def test_missing_key(any_store: Store) -> None:
    with pytest.raises(ObjectNotFound) as excinfo:
        any_store.get("radcrypt/v1/missing")
    assert "radcrypt/v1/missing" in str(excinfo.value)
    with pytest.raises(ObjectNotFound):
        any_store.iter_chunks("radcrypt/v1/missing")  # raised at call time, not on next()
    assert any_store.size("radcrypt/v1/missing") is None
    assert not any_store.exists("radcrypt/v1/missing")


@pytest.mark.parametrize("conditional", [None, False], ids=["server-side", "head-then-put"])
def test_if_absent_refuses_overwrite(s3_config: StoreConfig, conditional: bool | None) -> None:
    store = ObjectStore(s3_config, conditional_writes=conditional)
    store.ensure_bucket()
    store.put("seg", b"original", if_absent=True)
    with pytest.raises(ObjectExists):
        store.put("seg", b"intruder", if_absent=True)
    assert store.get("seg") == b"original"
    assert list(store.list_keys(layout.PROBES)) == []  # the probe cleaned up after itself


def test_server_honours_if_none_match(s3_store: ObjectStore) -> None:
    """Both servers implement S3 conditional writes, atomically under contention."""
    assert s3_store.supports_conditional_writes()
    winners: list[int] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        try:
            s3_store.put("contended", str(i).encode(), if_absent=True)
            winners.append(i)
        except ObjectExists:
            pass

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(race, range(8)))
    assert len(winners) == 1
    assert s3_store.get("contended") == str(winners[0]).encode()


# --- deletes, bucket --------------------------------------------------------------------


def test_delete(any_store: Store) -> None:
    any_store.put("d", b"1")
    any_store.delete("d")
    assert not any_store.exists("d")
    any_store.delete("d")  # deleting a missing key is fine


def test_delete_prefix(any_store: Store) -> None:
    doomed = [f"radcrypt/v1/repos/old/objects/{i:04d}" for i in range(30)]
    kept = ["radcrypt/v1/repos/old-2/objects/0001", "radcrypt/v1/repos/keep/manifest.json"]
    _put_many(any_store, doomed + kept)
    assert any_store.delete_prefix("radcrypt/v1/repos/old/") == 30
    assert sorted(any_store.list_keys("radcrypt/")) == sorted(kept)
    assert any_store.delete_prefix("radcrypt/v1/repos/old/") == 0
    with pytest.raises(ValueError):
        any_store.delete_prefix("")


def test_ensure_bucket_idempotent(s3_config: StoreConfig) -> None:
    store = ObjectStore(s3_config)
    with pytest.raises(BucketNotFound):
        store.ping()
    store.ensure_bucket()
    store.ensure_bucket()
    store.ping()
    store.put("k", b"v")
    store.ensure_bucket()
    assert store.get("k") == b"v"


# --- failures --------------------------------------------------------------------------

SECRET = "s3cr3t-VALUE-that-must-never-show"


@pytest.fixture
def dead_config() -> StoreConfig:
    """A config for a port nobody listens on."""
    return StoreConfig(
        endpoint_url=f"http://127.0.0.1:{s3servers.free_port()}", bucket="nowhere",
        access_key="AKIDEXAMPLE", secret_key=SECRET,
    )


def test_closed_port_is_unavailable_quickly(dead_config: StoreConfig) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as excinfo:
        ObjectStore(dead_config).ping()
    assert time.monotonic() - started < 5
    message = str(excinfo.value)
    assert dead_config.endpoint_url in message and "nowhere" in message
    assert "refused" in message
    assert SECRET not in message


def test_closed_port_other_operations(dead_config: StoreConfig) -> None:
    store = ObjectStore(dead_config, max_attempts=1)
    for operation in (lambda: store.get("k"), lambda: store.put("k", b"v"),
                      lambda: list(store.list_keys("p/")), store.ensure_bucket):
        with pytest.raises(StoreUnavailable) as excinfo:
            operation()
        assert SECRET not in str(excinfo.value)
        assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__


def test_secret_absent_from_repr(dead_config: StoreConfig) -> None:
    for text in (repr(dead_config), str(dead_config), repr(ObjectStore(dead_config))):
        assert SECRET not in text
        assert "AKIDEXAMPLE" in text
    assert "secret_key=None" in repr(dataclasses.replace(dead_config, access_key=None,
                                                         secret_key=None))


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        StoreConfig(endpoint_url=None, bucket="")
    with pytest.raises(ValueError):
        StoreConfig(endpoint_url=None, bucket="b", access_key="only-half")


def test_wrong_secret_is_unavailable(seaweed_store_config: StoreConfig) -> None:
    """SeaweedFS checks signatures (moto does not): a bad key is StoreUnavailable."""
    wrong = dataclasses.replace(seaweed_store_config, secret_key=SECRET)
    store = ObjectStore(wrong, max_attempts=1)
    with pytest.raises(StoreUnavailable) as ping_error:
        store.ping()
    with pytest.raises(StoreUnavailable) as get_error:
        store.get("anything")
    for error in (ping_error.value, get_error.value):
        assert SECRET not in str(error)
        assert str(seaweed_store_config.endpoint_url) in str(error)
        assert "credentials" in str(error)


def test_errors_are_store_errors(any_store: Store) -> None:
    """Callers can catch StoreError for everything; nothing botocore leaks out."""
    for operation in (lambda: any_store.get("nope"), lambda: any_store.get_range("nope", 0, 1)):
        with pytest.raises(StoreError) as excinfo:
            operation()
        assert type(excinfo.value).__module__ == "cloud.backend"
        assert isinstance(excinfo.value, ObjectNotFound)
    with pytest.raises(ValueError):
        any_store.get_range("nope", -1, 1)


def test_client_created_lazily(s3_config: StoreConfig) -> None:
    """No client exists until the first call (tests and the GUI rely on it)."""
    store = ObjectStore(s3_config)
    assert store._client is None
    store.ensure_bucket()
    assert store._client is not None


def test_every_backend_implements_the_protocol(any_store: Store,
                                              dead_config: StoreConfig) -> None:
    assert isinstance(any_store, Store)
    assert isinstance(ObjectStore(dead_config), Store)
    assert isinstance(DirectoryStore("/nonexistent/radcrypt-objects"), Store)
    assert not isinstance(object(), Store)
