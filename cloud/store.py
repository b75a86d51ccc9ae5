"""Object store over boto3: the client's only door to S3-compatible storage.

Everything above this module sees bytes, keys and four exceptions; nothing above it ever
sees botocore. Why the details matter:

* The boto3 client is created lazily inside each ObjectStore, never at import time, so
  tests (moto, an embedded SeaweedFS) and the GUI can choose endpoint and credentials
  before any connection exists.
* Each store gets its own botocore session, so credentials and settings are resolved from
  the environment and profile as they are when the store first connects (a session caches
  its credentials), but every session of the process shares one data loader: parsing
  botocore's JSON service models is what made a new client cost 65-130 ms of pure Python
  (holding the GIL); with the shared loader a store's client costs about 10 ms.
* One client serves every thread of a store (clients are thread-safe, sessions are not),
  with a connection pool large enough for the importer's upload threads.
* Path-style addressing, because local servers (SeaweedFS, MinIO, moto on 127.0.0.1) do
  not resolve virtual-host bucket names.
* ``request_checksum_calculation="when_required"``: boto3 >= 1.36 sends CRC checksums by
  default that SeaweedFS and MinIO reject.
* Standard retry mode with 8 attempts smooths over a flaky network, but against a dead
  endpoint it means tens of seconds before an error; ``ping()`` therefore uses a separate
  fail-fast client, and interactive code should ping before long operations.
* Large uploads go multipart through boto3's transfer manager so a file never sits whole in
  memory; downloads can be streamed with ``iter_chunks``.

Conditional create (``put(..., if_absent=True)``) uses S3's ``If-None-Match: *``. Measured
here (2026-11): moto 5.2.5 (ThreadedMotoServer) and SeaweedFS 4.48 both honour it on
PutObject and CompleteMultipartUpload and answer 412 PreconditionFailed, and both let
exactly one of 8 concurrent writers win in 30 rounds. Older SeaweedFS (< 3.97) ignored the
header silently, and some servers reject it. So by default the store probes the server once
(create a scratch object twice with the header; the second must fail) and, if the header is
not honoured, falls back to HEAD-then-PUT. That fallback has a race: two writers can both
see the key absent and both write it, the last one winning. Callers that need a real
commit point must therefore use names that are unique by construction (random ids) or a
server that honours the header.

A second caveat applies even to honouring servers: if the PUT succeeded but the response was
lost, botocore's retry sees 412 and we report ObjectExists for our own write. Callers that
retry a conditional create should compare the stored content before treating it as a
conflict.
"""

from __future__ import annotations

import io
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, TypeVar

import boto3.exceptions
import boto3.session
import botocore.exceptions as bexc
import botocore.session
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from cloud import layout
from cloud.backend import (
    BucketNotFound,
    ObjectExists,
    ObjectNotFound,
    StoreError,
    StoreUnavailable,
)

__all__ = [
    "BucketNotFound", "ObjectExists", "ObjectNotFound", "ObjectStore", "StoreConfig",
    "StoreError", "StoreUnavailable",
]

MiB = 1024 * 1024
MULTIPART_THRESHOLD = 16 * MiB
MULTIPART_CHUNKSIZE = 8 * MiB  # with 4 threads: a non-seekable stream buffers ~100 MiB at most
TRANSFER_THREADS = 4
POOL_CONNECTIONS = 32  # per client: >= the threads that share it (importer uploads, transfers)
DELETE_BATCH = 1000  # S3's DeleteObjects limit

T = TypeVar("T")


# --- configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class StoreConfig:
    """Where the objects live and how to authenticate.

    ``endpoint_url`` None means AWS S3 itself. Credentials: explicit keys here, else a named
    ``profile``, else boto3's usual chain (environment, shared files, instance roles).
    """

    endpoint_url: str | None
    bucket: str
    region: str = "us-east-1"
    access_key: str | None = None
    secret_key: str | None = None
    profile: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bucket, str) or not self.bucket:
            raise ValueError("bucket must be a non-empty string")
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("access_key and secret_key must be given together (or neither)")

    def __repr__(self) -> str:
        """Like the dataclass repr, but the secret key never appears (logs, tracebacks)."""
        secret = "'***'" if self.secret_key is not None else "None"
        return (
            f"StoreConfig(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r}, "
            f"region={self.region!r}, access_key={self.access_key!r}, "
            f"secret_key={secret}, profile={self.profile!r})"
        )

    __str__ = __repr__

    def describe(self) -> str:
        """Endpoint and bucket in plain words, for error messages."""
        where = self.endpoint_url or "AWS S3"
        return f"object store at {where} (bucket {self.bucket!r})"


# --- errors --------------------------------------------------------------------------


# StoreError, ObjectNotFound, ObjectExists, StoreUnavailable and BucketNotFound are defined
# in cloud.backend (one family for every backend) and imported above, so
# ``from cloud.store import ObjectNotFound`` keeps working.


_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_NO_BUCKET = {"NoSuchBucket"}
_EXISTS = {"PreconditionFailed", "412"}
_AUTH = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden",
    "InvalidToken", "ExpiredToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed",
    "InvalidSecurity", "AccountProblem", "AllAccessDisabled",
}
_SERVER_DOWN = {"InternalError", "ServiceUnavailable", "SlowDown", "500", "502", "503", "504"}
_NOT_SUPPORTED = {"NotImplemented", "501"}
CLOSED_RETRIES = 4
"""Extra tries of a replayable request whose connection the server closed (see _call)."""
CLOSED_BACKOFF_S = 0.2
"""First wait before such a try, doubled each time (with jitter), at most 2 s."""

_UNREACHABLE = (
    bexc.EndpointConnectionError,
    bexc.ConnectTimeoutError,
    bexc.ReadTimeoutError,
    bexc.ConnectionClosedError,
    bexc.ConnectionError,
)
_NO_CREDENTIALS = (
    bexc.NoCredentialsError,
    bexc.PartialCredentialsError,
    bexc.ProfileNotFound,
    bexc.CredentialRetrievalError,
)


def _client_error_code(exc: bexc.ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {}) or {}
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return str(error.get("Code", "") or status), status


def _root_cause(exc: BaseException) -> BaseException:
    """boto3's transfer layer wraps botocore errors; find the botocore one inside."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, (bexc.ClientError, bexc.BotoCoreError)):
            found: BaseException = current
            return found
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return exc


# --- botocore sessions ----------------------------------------------------------------

_SESSIONS_LOCK = threading.Lock()
_LOADERS: dict[Any, Any] = {}  # botocore data_path -> the process's shared data loader


def _new_session(config: StoreConfig) -> boto3.session.Session:
    """A fresh boto3 session (credentials resolved now, as boto3 would) on a botocore
    session whose data loader, with its cache of parsed service models, is shared by the
    process. Call with _SESSIONS_LOCK held."""
    core = botocore.session.get_session()
    data_path = core.get_config_variable("data_path")
    loader = _LOADERS.get(data_path)
    if loader is None:
        loader = _LOADERS[data_path] = core.get_component("data_loader")
    else:
        core.register_component("data_loader", loader)
    session = boto3.session.Session(
        aws_access_key_id=config.access_key,
        aws_secret_access_key=config.secret_key,
        region_name=config.region,
        profile_name=config.profile,
        botocore_session=core,
    )
    # boto3 appends its own data folder to the loader's search path on every session
    paths = loader.search_paths
    if len(paths) != len(set(paths)):
        paths[:] = list(dict.fromkeys(paths))
    return session


# --- the store -----------------------------------------------------------------------


class ObjectStore:
    """Bytes in, bytes out, under keys of one bucket; see the module docstring for why.
    Implements cloud.backend.Store.

    Thread-safe: one boto3 client per store, created on first use under a lock, shared by
    all threads that use the store (up to POOL_CONNECTIONS connections at once).
    """

    def __init__(
        self,
        config: StoreConfig,
        *,
        conditional_writes: bool | None = None,
        max_attempts: int = 8,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        page_size: int = 1000,
    ) -> None:
        """``conditional_writes``: True/False if known, None to probe the server once."""
        if not 1 <= page_size <= 1000:
            raise ValueError("page_size must be between 1 and 1000")
        self.config = config
        self._conditional = conditional_writes
        self._max_attempts = max_attempts
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._page_size = page_size
        self._lock = threading.Lock()
        self._client: Any = None
        self._ping_client: Any = None

    def __repr__(self) -> str:
        return f"ObjectStore({self.config!r})"

    # clients ---------------------------------------------------------------------------

    def _new_client(self, max_attempts: int, connect_timeout: float, read_timeout: float) -> Any:
        cfg = self.config
        botocore_config = Config(
            region_name=cfg.region,
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": max_attempts},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=POOL_CONNECTIONS,
            user_agent_extra="radcrypt",
        )
        try:
            with _SESSIONS_LOCK:
                session = _new_session(cfg)
                return session.client("s3", endpoint_url=cfg.endpoint_url,
                                      config=botocore_config)
        except (bexc.BotoCoreError, ValueError) as exc:
            raise self._translate(exc, "connect") from None

    def _s3(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._new_client(
                    self._max_attempts, self._connect_timeout, self._read_timeout
                )
            return self._client

    def _fast_s3(self) -> Any:
        """A client that gives up quickly: for ping(), where a fast 'no' is the point."""
        with self._lock:
            if self._ping_client is None:
                self._ping_client = self._new_client(2, min(self._connect_timeout, 3.0), 10.0)
            return self._ping_client

    # error mapping ---------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        secret = self.config.secret_key
        return text.replace(secret, "***") if secret else text

    def _translate(self, exc: BaseException, op: str, key: str | None = None) -> StoreError:
        """Turn any botocore/boto3 failure into one of our errors, in plain words."""
        root = _root_cause(exc)
        where = self.config.describe()
        what = f"{op} {key!r}" if key is not None else op
        if isinstance(root, bexc.ClientError):
            return self._translate_client_error(root, what, where, key)
        if isinstance(root, _UNREACHABLE):
            return StoreUnavailable(
                self._scrub(f"cannot reach the {where}: {_plain_network_error(root)} ({what})")
            )
        if isinstance(root, _NO_CREDENTIALS):
            return StoreUnavailable(
                self._scrub(f"no usable credentials for the {where}: {root} ({what})")
            )
        if isinstance(root, (bexc.IncompleteReadError, bexc.ResponseStreamingError,
                             urllib3.exceptions.HTTPError, OSError)):
            return StoreUnavailable(
                self._scrub(f"the {where} broke off while sending data ({what})")
            )
        return StoreError(self._scrub(f"{what} failed on the {where}: {root}"))

    def _translate_client_error(
        self, exc: bexc.ClientError, what: str, where: str, key: str | None
    ) -> StoreError:
        code, status = _client_error_code(exc)
        message = str(exc.response.get("Error", {}).get("Message", "") or "")
        detail = f"{code}: {message}" if message else code
        if code in _NO_BUCKET:
            return BucketNotFound(
                self._scrub(f"the bucket does not exist on the {where} ({what})"), code=code
            )
        if code in _NOT_FOUND and key is not None:
            return ObjectNotFound(self._scrub(f"no object {key!r} in the {where}"), code=code)
        if code in _NOT_FOUND:
            return BucketNotFound(
                self._scrub(f"the bucket does not exist on the {where} ({what})"), code=code
            )
        if code in _EXISTS:
            return ObjectExists(self._scrub(f"object {key!r} already exists in the {where}"),
                                code=code)
        if code in _AUTH or status == 403:
            return StoreUnavailable(
                self._scrub(f"the {where} refused the credentials or access ({detail}; {what})"),
                code=code,
            )
        if code in _SERVER_DOWN or status >= 500:
            return StoreUnavailable(
                self._scrub(f"the {where} is failing ({detail}; {what}), even after retries"),
                code=code,
            )
        return StoreError(self._scrub(f"{what} failed on the {where}: {detail}"), code=code)

    def _call(self, op: str, key: str | None, fn: Callable[[], T], *,
              replayable: bool = False) -> T:
        """``fn`` with botocore's errors translated. ``replayable`` (a whole request that
        may be sent again: put of bytes, get, head, delete): a connection the server closed
        is tried again, CLOSED_RETRIES more times with backoff, even after botocore stopped.

        Why: botocore's standard retry mode keeps a per-client retry quota (the AWS SDKs'
        circuit breaker: 500 tokens, 5 per retry, 1 back per success). Under a sustained
        loss of answers (tests/test_fault_import.py, 30 % of answers lost) the quota runs
        dry after about a hundred retries and botocore then gives up on the first closed
        connection. A closed connection means the server is there: one more try is right.
        A conditional create sent again may meet its own earlier write (412): callers
        compare the stored bytes (cloud/backend.stored_after_conflict)."""
        for attempt in range(CLOSED_RETRIES + 1):
            try:
                return fn()
            except (bexc.BotoCoreError, bexc.ClientError, boto3.exceptions.Boto3Error) as exc:
                closed = isinstance(_root_cause(exc), bexc.ConnectionClosedError)
                if not (replayable and closed and attempt < CLOSED_RETRIES):
                    raise self._translate(exc, op, key) from None
            time.sleep(min(CLOSED_BACKOFF_S * 2 ** attempt, 2.0) * (0.5 + random.random()))
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    # bucket ----------------------------------------------------------------------------

    def ping(self) -> None:
        """Check quickly that the endpoint answers, accepts us and has the bucket.

        Raises StoreUnavailable (BucketNotFound when only the bucket is missing).
        """
        s3 = self._fast_s3()
        try:
            s3.head_bucket(Bucket=self.config.bucket)
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            error = self._translate(exc, "ping")
            if isinstance(error, StoreUnavailable):
                raise error from None
            raise StoreUnavailable(str(error), code=error.code) from None

    def ensure_bucket(self) -> None:
        """Create the bucket when it is missing; a bucket we already own is fine.

        A credential scoped to one repository's prefix (docs/DEPLOYMENT.md) may not HEAD
        the bucket: AWS ties HeadBucket to s3:ListBucket on the whole bucket, and
        SeaweedFS 4.48 answers 403 to an identity with only prefix-scoped actions
        (tried). A bare 403 is then taken to mean "the bucket exists, we may not look at
        it"; wrong credentials, which HEAD cannot tell apart (no error body), fail at the
        first object request instead, with the same plain message.
        """
        bucket = self.config.bucket
        try:
            self._call("check bucket", None, lambda: self._s3().head_bucket(Bucket=bucket))
            return
        except BucketNotFound:
            pass
        except StoreUnavailable as exc:
            if exc.code not in ("403", "AccessDenied", "Forbidden"):
                raise
            return
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if self.config.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.config.region}
        try:
            self._s3().create_bucket(**kwargs)
        except bexc.ClientError as exc:
            code, _ = _client_error_code(exc)
            if code == "BucketAlreadyOwnedByYou":
                return
            if code == "BucketAlreadyExists":
                raise StoreError(
                    f"bucket name {bucket!r} is taken by another account "
                    f"({self.config.describe()}): choose another bucket name", code=code
                ) from None
            raise self._translate(exc, "create bucket") from None
        except bexc.BotoCoreError as exc:
            raise self._translate(exc, "create bucket") from None

    # writes ----------------------------------------------------------------------------

    def put(
        self, key: str, data: bytes | bytearray | memoryview, *, if_absent: bool = False
    ) -> None:
        """Store ``data`` under ``key``; with ``if_absent`` raise ObjectExists instead of
        overwriting (see the module docstring for which servers make that atomic)."""
        body = bytes(data) if not isinstance(data, bytes) else data
        if if_absent:
            self._put_if_absent(key, body)
        elif len(body) > MULTIPART_THRESHOLD:
            self.put_stream(key, io.BytesIO(body))
        else:
            self._put_object(key, body)

    def _put_object(self, key: str, body: bytes, **extra: str) -> None:
        bucket = self.config.bucket
        self._call("put", key, lambda: self._s3().put_object(Bucket=bucket, Key=key, Body=body,
                                                             **extra), replayable=True)

    def _put_if_absent(self, key: str, body: bytes) -> None:
        if self.supports_conditional_writes():
            try:
                self._put_object(key, body, IfNoneMatch="*")
                return
            except StoreError as exc:
                if exc.code not in _NOT_SUPPORTED:
                    raise
                self._conditional = False  # the server refuses the header: fall back
        # Fallback, racy by nature (documented above): check, then write.
        if self.exists(key):
            raise ObjectExists(f"object {key!r} already exists in the {self.config.describe()}")
        self._put_object(key, body)

    def supports_conditional_writes(self) -> bool:
        """Whether the server honours ``If-None-Match: *``; probed once, then remembered."""
        with self._lock:
            known = self._conditional
        if known is None:
            known = self._probe_conditional_writes()
            with self._lock:
                self._conditional = known
        return known

    def _probe_conditional_writes(self) -> bool:
        """Create a scratch object twice with If-None-Match; the second must be refused."""
        key = layout.probe_key(layout.new_id())
        try:
            self._put_object(key, b"probe", IfNoneMatch="*")
            try:
                self._put_object(key, b"probe again", IfNoneMatch="*")
            except ObjectExists:
                return True
            return False
        except StoreError as exc:
            if exc.code in _NOT_SUPPORTED or exc.code == "InvalidArgument":
                return False
            raise
        finally:
            self.delete(key)

    def _transfer_config(self) -> TransferConfig:
        return TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNKSIZE,
            max_concurrency=TRANSFER_THREADS,
            preferred_transfer_client="classic",
        )

    def put_file(self, key: str, path: str | Path) -> None:
        """Upload a file, multipart above 16 MiB, reading it part by part from disk."""
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"no such file to upload: {source}")
        bucket, config = self.config.bucket, self._transfer_config()
        self._call("upload", key,
                   lambda: self._s3().upload_file(str(source), bucket, key, Config=config))

    def put_stream(self, key: str, fileobj: IO[bytes]) -> None:
        """Upload from a readable binary stream (seekable or not), multipart above 16 MiB.

        A non-seekable stream is buffered one part at a time (a few parts in flight), never
        whole.
        """
        bucket, config = self.config.bucket, self._transfer_config()
        source = fileobj if _is_seekable(fileobj) else _FullReads(fileobj)
        self._call("upload", key,
                   lambda: self._s3().upload_fileobj(source, bucket, key, Config=config))

    # reads -----------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        """The whole object; use iter_chunks for anything large."""
        return b"".join(self.iter_chunks(key, chunk_size=4 * MiB))

    def iter_chunks(self, key: str, chunk_size: int = MiB) -> Iterator[bytes]:
        """Stream an object in chunks of at most ``chunk_size`` bytes.

        The request is made now, so ObjectNotFound is raised by this call, not by the first
        ``next()``; errors while streaming are translated too.
        """
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        bucket = self.config.bucket
        response = self._call("get", key, lambda: self._s3().get_object(Bucket=bucket, Key=key),
                              replayable=True)
        return self._stream(key, response["Body"], chunk_size)

    def _stream(self, key: str, body: Any, chunk_size: int) -> Iterator[bytes]:
        try:
            while True:
                try:
                    chunk = body.read(chunk_size)
                except (bexc.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
                    raise self._translate(exc, "read", key) from None
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from offset ``start``; fewer (or b"") past the end."""
        if start < 0 or length < 0:
            raise ValueError("start and length must be >= 0")
        if length == 0:
            if not self.exists(key):
                raise ObjectNotFound(f"no object {key!r} in the {self.config.describe()}")
            return b""
        bucket, byte_range = self.config.bucket, f"bytes={start}-{start + length - 1}"
        try:
            response = self._call(
                "get range", key,
                lambda: self._s3().get_object(Bucket=bucket, Key=key, Range=byte_range),
            )
        except StoreError as exc:
            if exc.code in {"InvalidRange", "416"}:
                return b""  # start is at or past the end of the object
            raise
        data = b"".join(self._stream(key, response["Body"], MiB))
        # A server that ignores Range sends the whole object; cut it ourselves.
        if response.get("ContentRange") is None and len(data) > length:
            data = data[start:start + length]
        return data

    def size(self, key: str) -> int | None:
        """Size in bytes, or None when the key does not exist."""
        bucket = self.config.bucket
        try:
            head = self._call("head", key, lambda: self._s3().head_object(Bucket=bucket, Key=key),
                              replayable=True)
        except ObjectNotFound:
            return None
        return int(head["ContentLength"])

    def exists(self, key: str) -> bool:
        """Whether the key exists (one HEAD request)."""
        return self.size(key) is not None

    # listing ---------------------------------------------------------------------------

    def list_objects(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object under ``prefix``, in key order, page by page.

        Lazy: requests are made as the iterator advances, so errors surface there.
        """
        for key, size, _ in self.list_objects_with_times(prefix):
            yield key, size

    def list_objects_with_times(self, prefix: str
                                ) -> Iterator[tuple[str, int, float | None]]:
        """(key, size, LastModified as a Unix time) of every object under ``prefix``, in
        key order: the same listing requests as list_objects (S3 sends the time anyway)."""
        bucket, page_size = self.config.bucket, self._page_size
        pages = self._s3().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
        )
        iterator = iter(pages)
        while True:
            page = self._call("list", prefix, lambda: next(iterator, None))
            if page is None:
                return
            for item in page.get("Contents", []) or []:
                yield str(item["Key"]), int(item["Size"]), _unix_time(item.get("LastModified"))

    def modified(self, key: str) -> float | None:
        """When the object was last written (its LastModified, one HEAD request); None
        when it does not exist."""
        bucket = self.config.bucket
        try:
            head = self._call("head", key, lambda: self._s3().head_object(Bucket=bucket, Key=key),
                              replayable=True)
        except ObjectNotFound:
            return None
        return _unix_time(head.get("LastModified"))

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix``, in key order."""
        for key, _ in self.list_objects(prefix):
            yield key

    # deletes ---------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing key is not an error (S3 semantics)."""
        bucket = self.config.bucket
        try:
            self._call("delete", key, lambda: self._s3().delete_object(Bucket=bucket, Key=key),
                       replayable=True)
        except ObjectNotFound:
            pass

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under a non-empty ``prefix``; return how many were deleted.

        An empty prefix is refused: wiping a whole bucket should never be one typo away.
        """
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix")
        deleted = 0
        for batch in _batches(self.list_keys(prefix), DELETE_BATCH):
            self._delete_batch(batch)
            deleted += len(batch)
        return deleted

    def _delete_batch(self, keys: list[str]) -> None:
        bucket = self.config.bucket
        request = {"Objects": [{"Key": k} for k in keys], "Quiet": True}
        response = self._call(
            "delete", keys[0], lambda: self._s3().delete_objects(Bucket=bucket, Delete=request)
        )
        errors = [e for e in response.get("Errors", []) or [] if e.get("Code") != "NoSuchKey"]
        if errors:
            first = errors[0]
            raise StoreError(
                f"could not delete {len(errors)} object(s) from the {self.config.describe()}, "
                f"e.g. {first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}",
                code=str(first.get("Code")),
            )


def _unix_time(value: Any) -> float | None:
    """S3's LastModified (a timezone-aware datetime from botocore) as a Unix time; None
    when a server leaves it out (an object of unknown age must never look old to gc)."""
    if isinstance(value, datetime):
        when: datetime = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return when.timestamp()
    return None


def _is_seekable(fileobj: IO[bytes]) -> bool:
    try:
        return bool(fileobj.seekable())
    except (AttributeError, OSError, ValueError):
        return False


class _FullReads:
    """Make ``read(n)`` return n bytes unless the stream has ended.

    boto3's transfer manager decides "small object, single PUT" from one short read of a
    non-seekable stream (then reads the whole rest into memory), and sizes each part from
    one read. Pipes, sockets and raw streams legitimately return short reads, so we loop.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, amount: int | None = -1) -> bytes:
        if amount is None or amount < 0:
            return self._raw.read()
        parts: list[bytes] = []
        wanted = amount
        while wanted > 0:
            block = self._raw.read(wanted)
            if not block:
                break
            parts.append(block)
            wanted -= len(block)
        return b"".join(parts)


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _plain_network_error(exc: BaseException) -> str:
    """Describe a connection failure the way a user would say it."""
    if isinstance(exc, bexc.ConnectTimeoutError):
        return "the connection timed out"
    if isinstance(exc, bexc.ReadTimeoutError):
        return "the server stopped answering (read timed out)"
    if isinstance(exc, bexc.ConnectionClosedError):
        return "the server closed the connection"
    text = str(getattr(exc, "kwargs", {}).get("error", "")) or str(exc)
    lowered = text.lower()
    if "refused" in lowered:
        return "connection refused (is the server running?)"
    if "name or service not known" in lowered or "nodename nor servname" in lowered \
            or "getaddrinfo" in lowered or "name resolution" in lowered:
        return "the host name could not be resolved"
    return "the connection failed"
