"""The one Qt-free facade of the client: every use case both front ends offer.

The CLI (app/cli.py) and the GUI (app/gui/backend.py) call this module and the core types
(app.core.errors, app.core.progress, app.core.settings, app.core.meta, dataclasses);
neither reaches into app.core.access, importer, searcher or objects itself, so each use
case (which identity opens what, how a search resolves its hits, how an original is
verified) is written once, here.

Usage::

    identity = unlock_identity(settings, password)          # WrongPassword if it is wrong
    with Client(settings, identity) as client:              # owns one Session
        repo = client.open_repository("ct-2024")            # RepositoryNotFound
        report = client.import_files(repo, ["scans/"], progress=..., cancel=token)
        results = client.search_files(repo, ["query.dcm"], k=5)
        client.get_original(repo, results[0].hits[0].image_id, Path("out.dcm"))

The types these calls return (Repository, Manifest, QueryResult, Hit, ImportReport,
DecodedImage, ...) and the error classes of the layers below are re-exported by
app/core/types.py, the one module besides this one, errors, progress, settings and meta
that a front end may import.

Every method may be slow (scrypt, decoding, crypto, network): a GUI calls it from a worker
thread. Long ones take a ``progress`` callback (app.core.progress.ProgressEvent, called
from worker threads) and, where they can stop between units of work, a ``CancelToken``.
Untrusted files are decoded only in the memory-limited decoder children
(app/imaging/worker.py DecoderPool), never in this process, which holds the keys.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from app.core.errors import RadcryptError
from app.core.meta import ImageMeta
from app.core.progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from app.core.settings import DIRECTORY, EMBEDDED, MEMORY, Settings
from cloud.limits import MAX_K

if TYPE_CHECKING:  # heavy modules load on first use, so `radcrypt --help` stays quick
    import numpy as np

    from app.core.access import AccessList, UserRecord
    from app.core.access_log import AccessReport
    from app.core.compaction import CompactionReport
    from app.core.deid import Blackout
    from app.core.demo import DemoReport
    from app.core.erasure import ErasurePlan, ErasureReport
    from app.core.gc import GcReport
    from app.core.importer import ImportReport
    from app.core.keyword_search import KeywordSearch
    from app.core.locks import LockInfo
    from app.core.migration import MigrationReport
    from app.core.repo_check import DataSubset, RepoCheckReport
    from app.core.repository import Manifest, Repository
    from app.core.searcher import Hit, QueryResult
    from app.core.session import Session
    from app.core.studies import Series, Study
    from app.imaging.decode import DecodedImage
    from app.imaging.worker import DecoderPool
    from app.integration.facade import Pacs
    from crypto.identity import Identity, PublicCard

__all__ = [
    "MAX_K",
    "NO_IDENTITY",
    "CheckResult",
    "Client",
    "ImageMeta",
    "StoreStatus",
    "add_service_arguments",
    "change_identity_password",
    "check_connection",
    "check_new_password",
    "create_identity",
    "demo_identity",
    "expand_paths",
    "expected_errors",
    "export_identity_backup",
    "identity_exists",
    "identity_file",
    "list_repositories",
    "local_features",
    "make_demo_queries",
    "manifest_dict",
    "password_strength",
    "public_card",
    "restore_identity_backup",
    "robust_range",
    "run_demo",
    "scan_paths",
    "serve",
    "stop_store",
    "store_status",
    "unlock_identity",
]

NO_IDENTITY = ("no identity on this workstation: run 'radcrypt identity create' first "
               "(repositories belong to identities; password-only repositories are no longer "
               "created or opened, 'radcrypt repo migrate' converts an old one)")
DEFAULT_EXTRACTOR = "radcrypt-v1"


# --- identity (no session needed) ---------------------------------------------------------


def _identity_store(settings: Settings) -> Any:
    from app.core.identity import IdentityStore

    return IdentityStore(settings.data_path)


def identity_exists(settings: Settings) -> bool:
    """Whether this workstation (the settings' data directory) has an identity."""
    return bool(_identity_store(settings).exists())


def identity_file(settings: Settings) -> Path:
    """Where the (password-encrypted) identity file lives."""
    return Path(_identity_store(settings).path)


def password_strength(password: str, name: str = "") -> tuple[int, str]:
    """zxcvbn's 0..4 score and plain words (app.core.identity.password_strength)."""
    from app.core.identity import password_strength as strength

    score, words = strength(password, [name] if name else None)
    return int(score), str(words)


def parse_read_data_subset(text: str, seed: int | None = None) -> DataSubset:
    """``check --read-data-subset``: "10%" (seeded random, a random seed when None) or
    "n/m" (the n-th of m parts); ValueError naming the text otherwise."""
    from app.core.repo_check import parse_subset

    return parse_subset(text, seed)


def parse_duration(text: str) -> float:
    """Seconds of "24h", "30m", "90s", "2d" or plain seconds (``gc --grace``)."""
    from app.core.gc import parse_duration as parse

    return parse(text)


def check_new_password(password: str, name: str = "") -> str:
    """The strength in words if ``password`` may protect an identity, else RadcryptError
    saying why (score below 3 of 4, or shorter than 12 characters)."""
    from app.core.identity import check_new_password as check

    return str(check(password, name))


def create_identity(settings: Settings, name: str, password: str) -> Identity:
    """A new identity, written encrypted under ``password`` (the zxcvbn rule applies);
    RadcryptError if one exists already or the password is too weak."""
    name = name.strip()
    if not name:
        raise RadcryptError("a new identity needs a name (your name)")
    identity: Identity = _identity_store(settings).create(name, password)
    return identity


def unlock_identity(settings: Settings, password: str) -> Identity:
    """The identity of this workstation; RadcryptError (NO_IDENTITY) when there is none,
    WrongPassword (an AccessDenied) when ``password`` does not open it."""
    store = _identity_store(settings)
    if not store.exists():
        raise RadcryptError(NO_IDENTITY)
    identity: Identity = store.unlock(password)
    return identity


def change_identity_password(settings: Settings, old: str, new: str) -> Identity:
    """Re-encrypt the identity under ``new``; WrongPassword when ``old`` is wrong,
    RadcryptError when ``new`` is too easy to guess. The file is replaced atomically."""
    store = _identity_store(settings)
    if not store.exists():
        raise RadcryptError(NO_IDENTITY)
    if old == new:
        raise RadcryptError("the new password is the same as the old one")
    identity: Identity = store.change_password(old, new)
    return identity


def export_identity_backup(settings: Settings, password: str, passphrase: str,
                           out: str | Path) -> Identity:
    """Write this workstation's identity (private keys) to ``out`` encrypted under a
    separate backup ``passphrase`` (app.core.identity.export_backup): WrongPassword when
    ``password`` does not unlock it, RadcryptError for a weak passphrase, one equal to the
    password, or an existing ``out``."""
    from app.core.identity import export_backup

    store = _identity_store(settings)
    if not store.exists():
        raise RadcryptError(NO_IDENTITY)
    identity: Identity = export_backup(store, password, passphrase, Path(out))
    return identity


def restore_identity_backup(settings: Settings, path: str | Path, passphrase: str,
                            new_password: str) -> Identity:
    """Restore an identity backup into this (new) data directory, under ``new_password``;
    WrongPassword for a wrong passphrase, RadcryptError for a changed or foreign file or
    a data directory that already has an identity."""
    from app.core.identity import restore_backup

    identity: Identity = restore_backup(_identity_store(settings), Path(path), passphrase,
                                        new_password)
    return identity


def demo_identity() -> Identity:
    """A throw-away identity, never written to disk: the owner of a demo session's
    repository (app.core.demo.demo_owner), and of nothing else."""
    from app.core.demo import demo_owner

    return demo_owner()


def public_card(settings: Settings) -> PublicCard:
    """This workstation's public card (readable without the password)."""
    card: PublicCard = _identity_store(settings).card()
    return card


# --- diagnostics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """One line of "Test connection": what was checked, whether it passed, in words."""

    part: str  # "storage", "bucket", "service"
    ok: bool | None  # None: not checked
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {"part": self.part, "ok": self.ok, "text": self.text}


def check_connection(settings: Settings, session: Session | None = None,
                     start_service: Callable[[], Any] | None = None) -> list[CheckResult]:
    """Storage reachable, bucket present, service healthy: each in plain words; read-only
    (never creates the bucket). ``session``: an open session, used when ``settings`` name
    its storage; ``start_service``: returns its service client (starting it if needed).
    ``Client.check_connection`` passes both."""
    from app.core.service_client import ServiceClient
    from cloud.backend import DirectoryConfig
    from cloud.local import find_running
    from cloud.store import BucketNotFound, ObjectStore, StoreConfig, StoreError
    from cloud.stores import open_store

    results: list[CheckResult] = []
    same = session is not None and session.store_config is not None and _same_storage(
        settings, session.settings)
    config: Any
    if same:
        assert session is not None
        config = session.store_config
    elif settings.store == MEMORY:
        config = None
        results.append(CheckResult(
            "storage", False, "The in-memory store exists only while Radcrypt runs with it; "
            "it keeps nothing."))
    elif settings.store == DIRECTORY:
        config = DirectoryConfig(settings.objects_dir)
    elif settings.store == EMBEDDED:
        handle = find_running(settings.store_dir)
        config = handle.config() if handle is not None else None
        if config is None:
            results.append(CheckResult(
                "storage", False, "The embedded store of this workstation is not running; "
                "it starts when Radcrypt connects."))
    else:
        try:
            config = StoreConfig(endpoint_url=settings.endpoint_url or None,
                                 bucket=settings.bucket, region=settings.region,
                                 profile=settings.profile or None)
        except ValueError as exc:
            config = None
            results.append(CheckResult("storage", False, f"The storage settings are "
                                                         f"incomplete: {exc}."))
    store_ok = False
    if config is not None:
        where = config.endpoint_url or "AWS S3"
        try:
            (ObjectStore(config, max_attempts=1, connect_timeout=3.0, read_timeout=5.0)
             if isinstance(config, StoreConfig) else open_store(config)).ping()
        except BucketNotFound:
            results.append(CheckResult("storage", True, f"Storage at {where} is reachable."))
            results.append(CheckResult("bucket", False, f"Bucket “{config.bucket}” does not "
                                                        "exist there (yet)."))
        except StoreError as exc:
            results.append(CheckResult("storage", False,
                                       f"Storage at {where} is not reachable: {exc}."))
        else:
            store_ok = True
            results.append(CheckResult("storage", True, f"Storage at {where} is reachable."))
            results.append(CheckResult("bucket", True, f"Bucket “{config.bucket}” is present "
                                                       "and accepts our credentials."))
    if not any(r.part == "bucket" for r in results):
        results.append(CheckResult("bucket", None, "Bucket not checked: the storage must "
                                                   "be reachable first."))
    url = settings.service_url
    if url:
        client = ServiceClient(url, timeout=5.0)
        try:
            client.health()
            results.append(CheckResult("service", True, f"Search service at {url} is healthy."))
        except RadcryptError as exc:
            results.append(CheckResult("service", False, _sentence(str(exc))))
        finally:
            client.close()
    elif same and store_ok and start_service is not None:
        try:
            start_service().health()
            results.append(CheckResult("service", True, "The search service on this "
                                                        "workstation is healthy."))
        except RadcryptError as exc:
            results.append(CheckResult("service", False, _sentence(str(exc))))
    elif not store_ok:
        results.append(CheckResult("service", None, "Search service not checked: the "
                                                    "storage must work first."))
    else:
        results.append(CheckResult("service", None, "The search service starts on this "
                                                    "workstation when a search needs it."))
    return results


def _same_storage(a: Settings, b: Settings) -> bool:
    keys = ("store", "endpoint_url", "bucket", "region", "profile", "data_dir")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


# --- use cases without an identity ----------------------------------------------------------


def local_features(paths: list[str | Path], extractor: str = DEFAULT_EXTRACTOR
                   ) -> list[np.ndarray]:
    """Plaintext feature vectors of local files, decoded in a memory-limited child; an
    unknown extractor fails before any child starts."""
    from app.imaging.features import get_extractor
    from app.imaging.worker import DecoderPool

    get_extractor(extractor)
    with DecoderPool(1) as pool:
        return [pool.features(p, extractor) for p in paths]


def make_demo_workdir() -> Path:
    """A demo run's temporary folder (app.core.demo): marked with this process, so that
    a later demo removes it if this one is killed outright; folders that earlier killed
    demos left are removed now."""
    from app.core.demo import make_demo_workdir as make

    return make()


def exit_on_termination_signals() -> list[int]:
    """For a command's main thread: SIGTERM and SIGHUP (shutdown, logout) unwind it like
    an exception, so that its session stops the store and the service it started
    (cloud.processes)."""
    from cloud.processes import exit_on_termination_signals as arm

    return arm()


def run_demo(settings: Settings, workdir: Path, count: int = 300, queries: int = 20,
             progress: ProgressCallback = no_progress) -> DemoReport:
    """The end-to-end demonstration (app.core.demo.run_demo): a throw-away owner, a fresh
    repository of ``count`` sample images, ``queries`` perturbed queries, and agreement
    with plaintext search."""
    from app.core.demo import run_demo as demo

    return demo(settings, workdir, count=count, queries=queries, progress=progress)


def make_demo_queries(files: list[Path], dest: Path, count: int = 6) -> list[Path]:
    """Perturbed copies of a few archived sample images, to try Search by image with."""
    from resources.samples import PERTURBATIONS, perturb_file

    if not files:
        return []
    step = max(1, len(files) // count)
    picks = files[::step][:count]
    return [perturb_file(p, dest, PERTURBATIONS[i % len(PERTURBATIONS)], seed=i)
            for i, p in enumerate(picks)]


# --- the client -----------------------------------------------------------------------------


class Client:
    """One user's connection: settings, the unlocked identity, one Session (storage and
    search service), the repositories opened so far, and the decoder children.

    Use as a context manager (or call ``open``/``close``); ``close`` stops whatever the
    session started (embedded store, search service) and the decoder children. Methods
    are safe to call from several worker threads at once.
    """

    def __init__(self, settings: Settings, identity: Identity) -> None:
        self.settings = settings
        self.identity = identity
        self._session: Session | None = None
        self._repos: dict[str, Repository] = {}
        self._decoder: DecoderPool | None = None
        self._lock = threading.RLock()
        # Why this user decrypts what they open (optional, free text): recorded with
        # every original and preview in the access log (app/core/access_log.py).
        self.access_purpose = ""
        self._studies: dict[str, tuple[Any, list[Study]]] = {}  # repo id -> (signature, studies)

    # --- facets: use cases grouped by domain, each in its own module ----------------------
    # A facet takes this client and calls its public methods; it never imports this module
    # (the import graph stays acyclic), so the front ends still see one facade.

    @functools.cached_property
    def pacs(self) -> Pacs:
        """Hospital integration (issue 18): DICOM nodes, receive, query/retrieve, send, FHIR."""
        from app.integration.facade import Pacs
        return Pacs(self)

    @functools.cached_property
    def keywords(self) -> KeywordSearch:
        """Encrypted keyword search and labels (issue 17)."""
        from app.core.keyword_search import KeywordSearch
        return KeywordSearch(self)

    # --- lifetime -----------------------------------------------------------------------

    @classmethod
    def unlock(cls, settings: Settings, password: str) -> Client:
        """A client for this workstation's identity (not yet open); WrongPassword when the
        password does not unlock it."""
        return cls(settings, unlock_identity(settings, password))

    def __enter__(self) -> Client:
        return self.open()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> Client:
        """Open the session (find or start the embedded store, or reach S3); idempotent.
        The search service starts on the first search, after a repository was opened."""
        with self._lock:
            if self._session is None:
                from app.core.access import session_for

                session = session_for(self.settings, self.identity)
                session.open()
                self._session = session
        return self

    def close(self) -> None:
        """Stop the decoder children and what the session started."""
        with self._lock:
            decoder, self._decoder = self._decoder, None
            session, self._session = self._session, None
            self._repos.clear()
        if decoder is not None:
            decoder.close()
        if session is not None:
            session.close()

    @property
    def session(self) -> Session:
        """The open session (RadcryptError before ``open``)."""
        session = self._session
        if session is None:
            raise RadcryptError("not connected to the storage yet")
        return session

    @property
    def connected(self) -> bool:
        return self._session is not None

    @property
    def memory_store(self) -> bool:
        """Whether the store keeps nothing (everything is lost on close)."""
        session = self._session
        if session is not None and session.store_config is not None:
            return not session.kept
        return self.settings.store == MEMORY

    def where(self) -> str:
        """Where the data goes, in words (for a status bar)."""
        session = self._session
        if session is None or session.store_config is None:
            return "not connected"
        endpoint = session.store_config.endpoint_url or "AWS S3"
        endpoint = endpoint.removeprefix("http://").removeprefix("https://")
        if session.store_kind == MEMORY:
            return f"in-memory store at {endpoint} (nothing is kept)"
        if session.store_kind == EMBEDDED:
            return f"embedded store at {endpoint}"
        if session.store_kind == DIRECTORY:  # endpoint_url is the directory's file:// URL
            return f"directory store at {endpoint.removeprefix('file://')}"
        return f"{endpoint}, bucket {session.store_config.bucket}"

    def warm_up(self) -> None:
        """Start the decoder children before they are needed (the service is started by
        the first search, once the repository's owner is pinned)."""
        self.decoder()

    def decoder(self) -> DecoderPool:
        """The memory-limited decoder children shared by this client's decodes."""
        with self._lock:
            if self._decoder is None:
                from app.imaging.worker import DecoderPool, DecoderUnavailable

                try:
                    self._decoder = DecoderPool(2)
                except DecoderUnavailable as exc:
                    raise RadcryptError(f"cannot decode images here: {exc}") from exc
            return self._decoder

    def service(self) -> Any:
        """The session's search-service client, started once even if two threads ask."""
        with self._lock:
            return self.session.service

    # --- identity -------------------------------------------------------------------------

    @property
    def user_id(self) -> str:
        return str(self.identity.user_id)

    @property
    def user_name(self) -> str:
        return str(self.identity.name)

    @property
    def fingerprint(self) -> str:
        return str(self.identity.card().fingerprint)

    def card_json(self) -> str:
        """This user's public card, to give to a data owner."""
        return str(self.identity.card().to_json())

    # --- repositories -----------------------------------------------------------------------

    def list_repositories(self) -> list[Manifest]:
        """Manifests of every repository in the store (whether or not this user may open
        them)."""
        from app.core.repository import list_repositories

        return list_repositories(self.session.store)

    def create_repository(self, name: str, extractor: str = DEFAULT_EXTRACTOR,
                          bound_levels: str = "auto", storage_format: int = 2,
                          policy: str = "clinical", search: str = "sknn") -> Repository:
        """A new repository owned by this identity (new keys); RepositoryExists if taken.
        ``bound_levels``: "auto" or "off" (see SECURITY.md). ``storage_format``: 2, the
        only one a new repository may have (packs, authenticated segments and the segment
        log, whose search answers are checked for completeness: docs/FORMAT-2.md);
        format 1 is read-only (FORMAT-2 9.1), so a new format-1 repository is refused.
        ``policy``: "clinical" (originals stored, encrypted) or "research" (de-identified
        copies: app/core/deid.py), fixed in the signed manifest. ``search``: "sknn" (the
        service ranks secure-kNN ciphertexts) or "workstation" (searched here from a local
        encrypted copy of the feature arrays: app/core/workstation.py) or "ckks" (the
        service computes encrypted scores under homomorphic encryption, decrypted and
        re-scored exactly here: app/core/ckks_search.py)."""
        from app.core.access import create_repository_as
        from app.core.deid import check_policy

        if storage_format != 2:
            raise RadcryptError(f"new repositories are in storage format 2 (format 1 is "
                                f"read-only), not {storage_format!r}")
        extra = {} if check_policy(policy) == "clinical" else {"policy": policy}
        if search != "sknn":
            extra["search"] = search
        repo = create_repository_as(self.session, self.identity, name, extractor,
                                    bound_levels=bound_levels, storage_format=storage_format,
                                    **extra)
        return self.remember(repo)

    @staticmethod
    def search_mode(repo: Repository | Manifest) -> str:
        """"sknn", "workstation" or "ckks": where the repository is searched (issue 19)."""
        from app.core.repository import Repository as Unlocked

        manifest = repo.manifest if isinstance(repo, Unlocked) else repo
        return str(manifest.search)

    @staticmethod
    def policy(repo: Repository | Manifest) -> str:
        """"clinical" or "research": what the repository stores of an imported file."""
        from app.core.repository import Repository as Unlocked

        manifest = repo.manifest if isinstance(repo, Unlocked) else repo
        return manifest.policy

    def open_repository(self, name: str) -> Repository:
        """Open through this identity's owner-signed grant; RepositoryNotFound when there
        is no such repository, AccessDenied when this user is not a member."""
        from app.core.access import open_repository_as
        from app.core.logstate import repair_genesis

        repo = open_repository_as(self.session, self.identity, name)
        # format 2 whose creation stopped before its log's genesis: the owner writes it
        repair_genesis(self.session.store, self.settings, self.identity, repo)
        return self.remember(repo)

    @staticmethod
    def storage_format(repo: Repository | Manifest) -> int:
        """1 (read-only: search, show, export, list; ``migrate_to_format2`` upgrades it)
        or 2."""
        from app.core.repository import Repository as Unlocked
        from app.core.repository import storage_format

        return storage_format(repo.manifest if isinstance(repo, Unlocked) else repo)

    def is_owner(self, repo: Repository) -> bool:
        """Whether this identity owns ``repo`` or is a co-owner (may sign its manifest)."""
        return bool(repo.manifest.is_owner(self.identity.user_id))

    def repository(self, name: str) -> Repository:
        """The repository opened before under ``name``, else opened now."""
        with self._lock:
            repo = self._repos.get(name)
        return repo if repo is not None else self.open_repository(name)

    def unlocked(self, repo_id: str) -> Repository | None:
        """The repository opened before, if any (no store access)."""
        with self._lock:
            return self._repos.get(repo_id)

    def remember(self, repo: Repository) -> Repository:
        with self._lock:
            self._repos[repo.repo_id] = repo
        return repo

    def migrate_repository(self, name: str, old_password: str | None = None) -> Repository:
        """Give an old repository (password-locked, or signed without members) an
        owner-signed membership list owned by this identity."""
        from app.core.access import migrate_password_repository

        return self.remember(migrate_password_repository(self.session, self.identity, name,
                                                         old_password or None))

    def migrate_to_format2(self, name: str, progress: ProgressCallback = no_progress
                           ) -> MigrationReport:
        """Move a format-1 repository this identity owns to storage format 2 (packs and
        segment log, docs/FORMAT-2.md 9); resumable: after a failure, running it
        again finishes it. Progress: "migrate" events (groups), then "cleanup"."""
        from app.core.migration import migrate_to_format2

        repo = self.open_repository(name)
        report = migrate_to_format2(self.session.store, self.settings, self.identity, repo,
                                    progress)
        if report.repo is not None:
            self.remember(report.repo)
        self._tell_service(repo.repo_id)
        return report

    def compact_repository(self, repo: Repository, progress: ProgressCallback = no_progress,
                           cancel: CancelToken | None = None) -> CompactionReport:
        """Merge the small segments and packs of a format-2 repository (any member); the
        objects they replace are deleted once their log entry is 15 minutes old, by this
        run or a later one. Cancelling keeps the groups already committed. Holds the
        repository's exclusive lock (locks.LockConflict while an import or gc runs).
        Progress: one "compact" event per group, then "delete"."""
        from app.core.compaction import compact
        from app.core.locks import exclusive

        store = self.session.store
        with exclusive(store, repo, self.identity):  # no import or gc meanwhile
            report = compact(store, self.settings, repo, self.identity,
                             progress=progress, cancel=cancel)
        if report.entries:
            self._tell_service(repo.repo_id)
        return report

    def check_repository(self, repo: Repository, progress: ProgressCallback = no_progress,
                         *, read_data: bool = False, subset: DataSubset | None = None
                         ) -> RepoCheckReport:
        """Check a repository this user opened (any member; nothing in the bucket is
        written): format 2, the manifest, the segment log from genesis, every live segment
        (SHA-256, MAC, header against its log entry) and pack (table of contents), each
        image once per key version with its original, and the objects no log entry keeps
        (strays); format 1, every segment and each indexed image's objects. The report's
        ``problems`` name each object (``ok`` when there is none). ``read_data``: also
        read every pack whole and decrypt every original; ``subset`` (repo_check.
        parse_subset): only a part of them. Reading the data decrypts previews and
        originals: ONE access-log entry (action "check", purpose "integrity check") names
        every image it will decrypt, written before the first (RadcryptError and nothing
        decrypted when it cannot be). Progress: "log", then "segments", "packs", "labels",
        "pack data" and "originals" (read_data), "strays" events."""
        from app.core.access_log import record_check
        from app.core.repo_check import check_repository

        def before_decrypting(image_ids: list[str]) -> None:
            record_check(self.session, repo, self.identity, image_ids)

        return check_repository(self.session.store, self.settings, repo, progress=progress,
                                read_data=read_data, subset=subset,
                                before_decrypting=before_decrypting)

    def gc(self, repo: Repository, *, grace_seconds: float | None = None,
           dry_run: bool = False, progress: ProgressCallback = no_progress) -> GcReport:
        """Delete the orphans of dead imports older than ``grace_seconds`` (default 24 h)
        under the repository's exclusive lock (owner only; app/core/gc.py says why it
        never deletes what the log keeps). LockConflict while an import runs."""
        from app.core.gc import DEFAULT_GRACE_SECONDS, collect_garbage

        return collect_garbage(self.session.store, self.settings, repo, self.identity,
                               grace_seconds=DEFAULT_GRACE_SECONDS if grace_seconds is None
                               else grace_seconds, dry_run=dry_run, progress=progress)

    # --- erasure and legal hold (issue 16; app/core/erasure.py) -----------------------------

    def erasure_plan(self, repo: Repository, *, image: str | None = None,
                     series: str | None = None, study: str | None = None,
                     patient: str | None = None, progress: ProgressCallback = no_progress
                     ) -> ErasurePlan:
        """What erasing one image (every frame of its file), series, study or patient
        (PatientID, else PatientName) deletes: the list the user confirms (``lines()``).
        Any member may ask; nothing is written."""
        from app.core.erasure import plan_erasure

        return plan_erasure(self.session.store, self.settings, repo,
                            _erasure_target(image, series, study, patient), progress)

    def erase(self, repo: Repository, plan: ErasurePlan,
              progress: ProgressCallback = no_progress) -> ErasureReport:
        """Erase the images of ``plan`` (the one the user confirmed), owner or co-owner
        only, under the exclusive lock: packs and segments rewritten without them, one
        log entry (reason erasure), originals and old objects deleted at once; the same
        file can be imported again. erasure.LegalHold while the repository is under legal
        hold; locks.LockConflict while an import, compaction or gc runs."""
        from app.core.erasure import erase

        report = erase(self.session.store, self.settings, repo, self.identity, plan,
                       progress=progress)
        self._tell_service(repo.repo_id)
        return report

    def set_legal_hold(self, repo: Repository, on: bool) -> Repository:
        """Set or lift the legal hold (owner or co-owner): a signed manifest setting
        that refuses every erasure while on. Returns the repository as now opened."""
        from app.core.erasure import set_legal_hold

        return self.remember(set_legal_hold(self.session.store, self.settings, repo,
                                            self.identity, on))

    def legal_hold(self, repo: Repository) -> bool:
        """Whether the repository is under legal hold (the signed manifest as stored now)."""
        from app.core.erasure import legal_hold

        return legal_hold(self.session.store, self.settings, repo)

    def list_locks(self, repo: Repository) -> list[LockInfo]:
        """The repository's lock objects (app/core/locks.py), each marked stale or not and
        its signature checked against the member it names."""
        from app.core.locks import list_locks
        from app.core.logstate import repository_trust

        store = self.session.store
        return list_locks(store, repo, repository_trust(store, repo))

    def remove_locks(self, repo: Repository, *, remove_all: bool = False
                     ) -> list[LockInfo]:
        """Remove the stale locks (all locks with ``remove_all``: only when their
        processes are known to be gone); returns those removed."""
        from app.core.locks import remove_locks

        return remove_locks(self.session.store, repo, remove_all=remove_all)

    # --- import ---------------------------------------------------------------------------

    def import_files(self, repo: Repository, paths: Iterable[str | Path],
                     progress: ProgressCallback = no_progress,
                     cancel: CancelToken | None = None, batch_size: int | None = None,
                     blackouts: Sequence[Blackout] = ()) -> ImportReport:
        """Import files and folders (recursive); safe to re-run (resumes). A research
        repository stores de-identified copies (app/core/deid.py): ``blackouts`` are
        painted over every image first, and images with burned-in text are refused without
        them. Cancelling keeps
        what was finished (report.cancelled). The search service, when running or
        configured, is told to re-read the repository. A format-2 import holds the
        repository's shared lock (app/core/locks.py) while it runs, so that gc never
        deletes what it has uploaded and not yet committed; locks.LockConflict while gc
        or compaction holds the exclusive one."""
        from app.core.importer import DEFAULT_BATCH, Importer
        from app.core.locks import shared

        importer = Importer(self.session.store, repo, workers=self.settings.workers,
                            batch_size=batch_size or DEFAULT_BATCH, progress=progress,
                            cancel=cancel, writer=self.identity, settings=self.settings,
                            blackouts=tuple(blackouts))
        if importer.format2:  # gc must not delete what this import has yet to commit
            with shared(self.session.store, repo, self.identity):
                report = importer.run(list(paths))
        else:
            report = importer.run(list(paths))
        if report.imported:
            self._tell_service(repo.repo_id)
        return report

    # --- search ---------------------------------------------------------------------------

    def features(self, paths: list[str | Path], extractor: str,
                 progress: ProgressCallback = no_progress,
                 cancel: CancelToken | None = None) -> np.ndarray:
        """Feature vectors (one row per file) of local query files, decoded in the
        decoder children; ImageDecodeError names a file that cannot be read."""
        import numpy as np

        pool = self.decoder()
        cancel = cancel or CancelToken()
        rows: list[Any] = [None] * len(paths)
        done = 0

        def one(index: int) -> None:
            cancel.check()
            rows[index] = pool.features(paths[index], extractor)

        with ThreadPoolExecutor(max(1, min(len(paths), pool.size)),
                                thread_name_prefix="radcrypt-query") as threads:
            for index, _ in zip(range(len(paths)), threads.map(one, range(len(paths))),
                                strict=True):
                done += 1
                progress(ProgressEvent("features", done, len(paths), item=str(paths[index])))
        if not rows:
            return np.zeros((0, 0), dtype=np.float64)
        return np.stack(rows)

    def search_files(self, repo: Repository, paths: list[str | Path], k: int = 1,
                     progress: ProgressCallback = no_progress,
                     cancel: CancelToken | None = None, *, allow_incomplete: bool = False,
                     group: bool = True, where: Any = None) -> list[QueryResult]:
        """Nearest archived images of each query file (features here, the match on the
        service, names and true distances decrypted here). Progress: one "features" event
        per file, then "search". Format 2: IncompleteAnswer when the service left live
        segments out, unless ``allow_incomplete`` (then the results are marked:
        ``QueryResult.complete`` False). ``group``: also the k nearest series
        (``QueryResult.groups``, hits of one series collapsed); ``hits`` stays the
        ungrouped top-k either way. ``where``: a keyword filter (issue 17; terms as for
        ``client.keywords.find``, e.g. "modality=MR bodypart=KNEE"): the nearest among
        the matching images only, exactly (app/core/searcher.py)."""
        if repo.manifest.search != "workstation":  # workstation mode (issue 19): no service
            self.service()  # the service starts now, trusting the owners pinned so far
        start = time.perf_counter()
        features = self.features(paths, repo.manifest.extractor, progress, cancel)
        features_ms = (time.perf_counter() - start) * 1000 / max(1, len(paths))
        if cancel is not None:
            cancel.check()
        progress(ProgressEvent("search", 0, 1, message="searching"))
        results = self.search_features(repo, features, [str(p) for p in paths], k,
                                       allow_incomplete=allow_incomplete, group=group,
                                       where=where)
        progress(ProgressEvent("search", 1, 1, message="searched"))
        for result in results:
            result.timings_ms["features"] = features_ms
        return results

    def search_features(self, repo: Repository, features: np.ndarray, labels: list[str],
                        k: int = 1, *, allow_incomplete: bool = False, group: bool = True,
                        where: Any = None) -> list[QueryResult]:
        """Nearest archived images of each feature vector (rows); k between 1 and MAX_K;
        ``allow_incomplete``, ``group`` and ``where`` as in ``search_files``."""
        if repo.manifest.search == "workstation":  # issue 19: searched on this workstation
            from app.core import workstation

            return workstation.search_features(self.session, repo, features, labels, k,
                                               allow_incomplete=allow_incomplete, group=group,
                                               where=where, identity=self.identity)
        from app.core.searcher import search_features

        return search_features(self.session, repo, features, labels, k=k,
                               allow_incomplete=allow_incomplete, group=group, where=where)

    def search_by_image_id(self, repo: Repository, image_id: str, k: int = 1, *,
                           allow_incomplete: bool = False, group: bool = True,
                           exclude_self: bool = True, where: Any = None) -> QueryResult:
        """"Find similar" on an archived image, no local file needed: its stored features
        (decrypted from its pack's feature array) are the query. The image itself is left
        out of the answer unless ``exclude_self`` is False; other images of its series
        stay (grouped as one series with ``group``)."""
        if repo.manifest.search == "workstation":  # issue 19: searched on this workstation
            from app.core import workstation

            return workstation.search_image(self.session, repo, self._image_id(image_id), k,
                                            allow_incomplete=allow_incomplete, group=group,
                                            exclude_self=exclude_self, where=where,
                                            identity=self.identity)
        from app.core.searcher import search_image

        self.service()  # the service starts now, trusting the owners pinned so far
        return search_image(self.session, repo, self._image_id(image_id), k,
                            allow_incomplete=allow_incomplete, group=group,
                            exclude_self=exclude_self, where=where)

    # --- studies and series (grouped here, after decryption: DESIGN.md section 9) --------

    def studies(self, repo: Repository, progress: ProgressCallback = no_progress,
                cancel: CancelToken | None = None) -> list[Study]:
        """The repository's studies, newest first, each with its series and their images in
        stack order (app/core/studies.py). The grouping is remembered until the set of
        images or the key version changes, so ``series_of`` and ``images_of`` after it cost
        one listing. Images whose metadata is damaged are left out: ``list_images`` names
        them."""
        from app.core.studies import group_studies

        reader = self._reader(repo)
        ids = frozenset(reader.image_ids())
        signature = (repo.keys.version, ids)
        with self._lock:
            cached = self._studies.get(repo.repo_id)
        if cached is not None and cached[0] == signature:
            return list(cached[1])
        studies = group_studies(self.list_images(repo, sorted(ids), progress, cancel))
        with self._lock:
            self._studies[repo.repo_id] = (signature, studies)
        return list(studies)

    def series_of(self, repo: Repository, study_key: str) -> list[Series]:
        """The series of one study (its key from ``studies``: the StudyInstanceUID, or
        ``image:<id>`` for an image without one), in series-number order."""
        for study in self.studies(repo):
            if study.key == study_key:
                return list(study.series)
        raise RadcryptError(f"repository {repo.repo_id} has no study {study_key}")

    def images_of(self, repo: Repository, series_key: str) -> list[ImageMeta]:
        """The images of one series (its key from ``series_of``), in stack order: instance
        number, slice position, frame."""
        for study in self.studies(repo):
            for series in study.series:
                if series.key == series_key:
                    return list(series.images)
        raise RadcryptError(f"repository {repo.repo_id} has no series {series_key}")

    def hit_meta(self, hit: Hit) -> ImageMeta:
        """The decrypted metadata a search hit carries, typed."""
        return ImageMeta.from_record(hit.image_id, hit.meta, hit.key_version)

    def thumbnails(self, repo: Repository, hits: list[Hit]) -> dict[str, bytes]:
        """Decrypted PNG previews of search hits (image id -> PNG), fetched in parallel."""
        if not hits:
            return {}

        reader = self._reader(repo)
        self._record_access(repo, "preview", [h.image_id for h in hits],
                            {h.image_id: h.meta for h in hits})

        def one(hit: Hit) -> tuple[str, bytes]:
            return hit.image_id, reader.thumb(hit.image_id)

        with ThreadPoolExecutor(min(8, len(hits))) as pool:
            return dict(pool.map(one, hits))

    def previews(self, repo: Repository, images: Sequence[str | ImageMeta], *,
                 arrived: Callable[[str, bytes], None] | None = None,
                 cancel: CancelToken | None = None) -> dict[str, bytes]:
        """Decrypted PNG previews (image id -> PNG) of ``images`` (ids, or the metadata
        the caller holds: its key version and study then need no second read), with ONE
        access-log entry naming every image, written before the first is decrypted (an
        archive view of 200 tiles is one recording, not 200). ``arrived(image_id, png)``:
        called from a worker thread as each is ready; ``cancel``: the rest are skipped
        (the entry names them all already)."""
        metas = {m.image_id: m for m in images if isinstance(m, ImageMeta)}
        ids = list(dict.fromkeys(self._image_id(m if isinstance(m, str) else m.image_id)
                                 for m in images))
        if not ids:
            return {}
        self._record_access(repo, "preview", ids,
                            {i: {"clinical": m.clinical} for i, m in metas.items()})
        cancel = cancel or CancelToken()
        reader = self._reader(repo) if self._format2(repo) else None

        def one(image_id: str) -> tuple[str, bytes | None]:
            if cancel.cancelled:
                return image_id, None
            if reader is not None:
                png = bytes(reader.thumb(image_id))
            else:
                from app.core.objects import get_decrypted

                meta = metas.get(image_id)
                png, _ = get_decrypted(self.session.store, repo.ring, repo.repo_id, "thumbs",
                                       image_id, (meta.key_version or None) if meta else None)
            if arrived is not None:
                arrived(image_id, png)
            return image_id, png

        with ThreadPoolExecutor(min(8, len(ids)), thread_name_prefix="radcrypt-previews") as pool:
            return {i: png for i, png in pool.map(one, ids) if png is not None}

    # --- images ---------------------------------------------------------------------------

    def _reader(self, repo: Repository) -> Any:
        """An app.core.packs.ImageReader of ``repo``: per-image objects in format 1; in
        format 2 the live packs of the segment log, verified now (one listing when
        nothing changed since this session last verified it)."""
        from app.core.searcher import image_reader

        return image_reader(self.session, repo)

    @staticmethod
    def _format2(repo: Repository) -> bool:
        from app.core.repository import is_format2

        return bool(is_format2(repo.manifest))

    def image_ids(self, repo: Repository) -> list[str]:
        """Ids of every committed image (named by a segment in format 1, by a live pack
        in format 2), sorted."""
        return sorted(self._reader(repo).image_ids())

    def image_meta(self, repo: Repository, image_id: str, version: int | None = None
                   ) -> ImageMeta:
        """Decrypted metadata of one image; IntegrityError when it does not verify,
        RadcryptError when the id is not valid."""
        image_id = self._image_id(image_id)
        if self._format2(repo):  # the pack names the key version
            record, used = self._reader(repo).meta(image_id)
        else:
            from app.core.searcher import read_meta

            record, used = read_meta(self.session.store, repo, image_id, version)
        return ImageMeta.from_record(image_id, record, used)

    def list_images(self, repo: Repository, ids: list[str] | None = None,
                    progress: ProgressCallback = no_progress,
                    cancel: CancelToken | None = None) -> list[ImageMeta]:
        """Metadata of ``ids`` (default: every committed image), decrypted in parallel, in
        the order of ``ids``; a damaged one comes back with ``error`` set."""
        reader = self._reader(repo)
        ids = sorted(reader.image_ids()) if ids is None else list(ids)
        cancel = cancel or CancelToken()

        def one(image_id: str) -> ImageMeta:
            cancel.check()
            try:
                record, version = reader.meta(image_id)
            except RadcryptError as exc:
                return ImageMeta.damaged(image_id, str(exc))
            return ImageMeta.from_record(image_id, record, version)

        out: list[ImageMeta] = []
        with ThreadPoolExecutor(8, thread_name_prefix="radcrypt-meta") as pool:
            for meta in pool.map(one, ids):
                out.append(meta)
                if len(out) % 10 == 0 or len(out) == len(ids):
                    progress(ProgressEvent("index", len(out), len(ids)))
        return out

    def thumbnail_png(self, repo: Repository, image_id: str, version: int | None = None
                      ) -> bytes:
        """The decrypted PNG preview of an image."""
        image_id = self._image_id(image_id)
        self._record_access(repo, "preview", [image_id])
        if self._format2(repo):
            return bytes(self._reader(repo).thumb(image_id))
        from app.core.objects import get_decrypted

        plain, _ = get_decrypted(self.session.store, repo.ring, repo.repo_id, "thumbs",
                                 image_id, version)
        return plain

    def get_original(self, repo: Repository, image_id: str, dest: str | Path,
                     version: int | None = None, progress: ProgressCallback = no_progress
                     ) -> int:
        """Download, verify and decrypt an original into ``dest`` (written beside it under
        a temporary name and renamed only once verified); returns its size. Progress:
        "download" events in bytes of the stored object. A frame of a multi-frame instance
        gives the instance's file (stored once, under its frame 0's id)."""
        from app.core.objects import fetch_original

        image_id = self._image_id(image_id)
        self._record_access(repo, "original", [image_id])  # the frame the user opens
        object_id, _ = self._original_of(repo, image_id)
        return fetch_original(self.session.store, repo.ring, repo.repo_id, object_id,
                              Path(dest), version, progress=progress)

    def _original_of(self, repo: Repository, image_id: str) -> tuple[str, int | None]:
        """(image id whose object holds the original file, frame to show or None).

        Every frame of a multi-frame instance is an image of its own, but the file is
        stored once, under frame 0's id, which the frame's metadata names (``original``).
        Format 1 and metadata that cannot be read: the image's own object (whose fetch
        then says what is wrong)."""
        if not self._format2(repo):
            return image_id, None
        try:
            meta = self.image_meta(repo, image_id)
        except RadcryptError:
            return image_id, None
        return meta.original_image_id, (meta.frame if meta.frames > 1 else None)

    def write_original(self, repo: Repository, image_id: str, stream: IO[bytes],
                       version: int | None = None, progress: ProgressCallback = no_progress
                       ) -> int:
        """Like ``get_original`` into a stream (e.g. stdout): the whole original is
        verified in a private temporary folder first, so nothing unverified is written."""
        with tempfile.TemporaryDirectory(prefix="radcrypt-get-") as tmp:
            path = Path(tmp) / "original"
            size = self.get_original(repo, image_id, path, version, progress)
            with path.open("rb") as source:
                shutil.copyfileobj(source, stream, 1 << 20)
            stream.flush()
        return size

    def fetch_image(self, repo: Repository, image_id: str, name: str = "",
                    version: int | None = None) -> DecodedImage:
        """Download, verify, decrypt and decode an original (in a decoder child); the
        plaintext file lives only in a private temporary folder, deleted before this
        returns."""
        suffix = Path(name).suffix if name else ""
        with tempfile.TemporaryDirectory(prefix="radcrypt-view-") as tmp:
            dest = Path(tmp) / f"original{suffix}"
            self.get_original(repo, image_id, dest, version)  # the instance's file
            _, frame = self._original_of(repo, self._image_id(image_id))
            image: DecodedImage = self.decoder().decode(dest, frame)  # the image's own frame
            return image

    def decode(self, path: str | Path, frame: int | None = None) -> DecodedImage:
        """Decode a local file in a decoder child: frame ``frame`` of a multi-frame file
        (the middle one when None)."""
        image: DecodedImage = self.decoder().decode(path, frame)
        return image

    def display(self, path: str | Path) -> Any:
        """The 8-bit display image (numpy array) of a local file, decoded in a child."""
        return self.decoder().display(path)

    def _record_access(self, repo: Repository, action: str, image_ids: list[str],
                       records: dict[str, dict[str, Any]] | None = None) -> None:
        """Write the access-log entry before decrypting (app/core/access_log.py): when it
        cannot be written, RadcryptError and nothing is decrypted."""
        from app.core.access_log import record_access

        def meta_of(image_id: str) -> dict[str, Any]:
            return {"clinical": self.image_meta(repo, image_id).clinical}

        record_access(self.session, repo, self.identity, action, image_ids,
                      purpose=self.access_purpose, records=records, meta_of=meta_of)

    def access_log(self, repo: Repository) -> AccessReport:
        """Who decrypted which original or preview of ``repo``, every user's chain
        verified (owners only: the log is encrypted to them); ``problems`` name entries
        forged, reordered, deleted or withheld."""
        from app.core.access_log import read_access_log

        return read_access_log(self.session.store, repo, self.identity, self.settings)

    def lock(self) -> None:
        """Workstation lock: forget the identity's private keys, every unlocked
        repository and the decrypted study lists (app/core/session.py LockedIdentity,
        Session.forget_secrets); ``resume`` with the identity unlocked again by its
        password. Work already running keeps what it holds until it ends."""
        from app.core.session import LockedIdentity, wipe_rings

        with self._lock:
            rings = [repo.ring for repo in self._repos.values()]
            self._repos.clear()
            self._studies.clear()
            from app.core.workstation import forget_all

            forget_all()  # plaintext local indexes of workstation-mode repositories
            from app.core.ckks_blocks import forget

            forget()  # CKKS secret keys (SEAL objects) of ckks-mode repositories
            if not isinstance(self.identity, LockedIdentity):
                self.identity = LockedIdentity(self.identity.user_id, self.identity.name)
            session = self._session
        if session is not None:
            session.forget_secrets(signer=True, rings=rings)
        else:
            wipe_rings(rings)

    def resume(self, identity: Identity) -> None:
        """Take the identity back after ``lock``; AccessDenied for another user's."""
        from app.core.errors import AccessDenied

        with self._lock:
            if identity.user_id != self.identity.user_id:
                raise AccessDenied("this workstation was locked by another user: only "
                                   f"{self.identity.name} can unlock it")
            self.identity = identity
            session = self._session
        if session is not None:
            session.resume(identity)

    @staticmethod
    def _image_id(image_id: str) -> str:
        from cloud import layout

        try:
            return str(layout.validate_image_id(image_id))
        except ValueError as exc:
            raise RadcryptError(str(exc)) from None

    # --- access ---------------------------------------------------------------------------

    def register_user(self, card_json: str) -> UserRecord:
        """Record a user's public card, signed by this identity (as data owner)."""
        from app.core.access import register_user

        return register_user(self.session, self.identity, card_json)

    def grant(self, repo: Repository, user_id: str) -> None:
        """Give a registered user access to ``repo`` (this identity must own it)."""
        from app.core.access import grant_access

        grant_access(self.session, self.identity, repo, user_id)

    def add_owner(self, repo: Repository, user_id: str) -> Repository:
        """Make a member of ``repo`` a co-owner (this identity must be its owner): any
        co-owner can then grant, revoke and sign like the owner (docs/FORMAT-2.md 2.4)."""
        from dataclasses import replace

        from app.core.access import add_owner

        manifest = add_owner(self.session, self.identity, repo, user_id)
        return self.remember(replace(repo, manifest=manifest))

    def revoke(self, repo: Repository, user_id: str,
               progress: ProgressCallback = no_progress) -> Repository:
        """Remove a user and rotate to a new key version: every pack and segment is sealed
        again under the new version (docs/FORMAT-2.md 7.3), the old ones deleted; resumable:
        running it again after a failure finishes the work. Progress: "revoke" events
        (images re-sealed of the total)."""
        from app.core.access import revoke_access

        repo = revoke_access(self.session, self.identity, repo, user_id, progress=progress)
        self._tell_service(repo.repo_id)  # its segments are new: no empty search meanwhile
        return self.remember(repo)

    def _tell_service(self, repo_id: str) -> None:
        """Ask the search service, when running or configured, to re-read ``repo_id``
        now (it also re-lists on its own, but only every few seconds)."""
        session = self.session
        if session.service_started or self.settings.service_url:
            with contextlib.suppress(RadcryptError):
                self.service().refresh(repo_id)

    def access_list(self, repo: Repository) -> AccessList:
        """The members of ``repo`` (``.ignored``: names under grants/ not used)."""
        from app.core.access import list_access

        return list_access(self.session, repo.repo_id)

    def audit(self, repo: Repository) -> list[dict[str, Any]]:
        """The search service's audit trail of ``repo`` (time, user, action, results)."""
        from cloud.audit import read_audit

        entries: list[dict[str, Any]] = read_audit(self.session.store, repo.repo_id)
        return entries

    # --- diagnostics and demo ---------------------------------------------------------------

    def check_connection(self, settings: Settings | None = None) -> list[CheckResult]:
        """"Test connection" for ``settings`` (default: this client's), using this
        client's session when they name the same storage."""
        return check_connection(settings or self.settings, self._session, self.service)

    def prepare_demo(self, workdir: Path, count: int,
                     progress: ProgressCallback = no_progress,
                     cancel: CancelToken | None = None, queries: int = 6
                     ) -> tuple[Repository, list[Path]]:
        """A demo repository owned by this identity with ``count`` sample images, and
        ``queries`` perturbed query images under ``workdir/queries``; returns the
        repository and the query files."""
        from app.core.demo import prepare_demo_repository

        if cancel is not None:
            cancel.check()
        progress(ProgressEvent("samples", 0, 0, message="Preparing sample images"))
        repo, files, _report, _owner = prepare_demo_repository(
            self.session, workdir, count, progress, owner=self.identity, cancel=cancel)
        progress(ProgressEvent("queries", 0, 0, message="Making query images"))
        made = make_demo_queries(files, workdir / "queries", queries)
        return self.remember(repo), made


def parse_blackout(text: str) -> Blackout:
    """A blackout region of a research import (``x,y,w,h`` in pixels); RadcryptError
    naming the text when it is not four non-negative integers with an area."""
    from app.core.deid import Blackout

    return Blackout.parse(text)


def manifest_dict(manifest: Manifest) -> dict[str, Any]:
    """A manifest as JSON-ready data (public: it is stored in clear)."""
    data: dict[str, Any] = json.loads(manifest.to_json())
    data["policy"] = manifest.policy  # stored only when "research": said here either way
    data["search"] = manifest.search  # stored only when not "sknn": said here either way
    return data


# --- the embedded store and the service, as commands -----------------------------------------


@dataclass(frozen=True)
class StoreStatus:
    """The embedded store of a data directory. ``secret_key`` is filled only when asked
    (``store_status(..., credentials=True)``) and never logged."""

    running: bool
    kind: str = ""  # "seaweedfs"; "memory" for the in-memory store (never running)
    pid: int = 0
    endpoint: str = ""
    bucket: str = ""
    access_key: str = ""
    data_dir: str = ""
    credentials_file: str = ""
    secret_key: str = field(default="", repr=False)

    def as_dict(self) -> dict[str, Any]:
        if not self.running:
            out: dict[str, Any] = {"running": False}
            if self.kind:
                out.update(kind=self.kind, kept=self.kind != MEMORY)
            if self.data_dir:
                out["data_dir"] = self.data_dir
            return out
        out = {"running": True, "kind": self.kind, "pid": self.pid, "endpoint": self.endpoint,
               "bucket": self.bucket, "access_key": self.access_key,
               "data_dir": self.data_dir, "credentials_file": self.credentials_file}
        if self.secret_key:
            out["secret_key"] = self.secret_key
        return out


def store_status(settings: Settings, start: bool = False, credentials: bool = False
                 ) -> StoreStatus:
    """The embedded store of ``settings.store_dir``: found running, or (``start``) started
    in the background. RadcryptError when it cannot start, or for the in-memory store
    with ``start`` (it lives inside one command and keeps nothing)."""
    from cloud.local import CREDENTIALS_FILE, EmbeddedStoreError, find_running
    from cloud.local import start_embedded_store as start_store

    if settings.store == MEMORY:
        if start:
            raise RadcryptError("the in-memory store cannot be started in the background: it "
                                "lives inside the command that uses it and keeps nothing; "
                                "use --store embedded (SeaweedFS) or --store s3")
        return StoreStatus(running=False, kind=MEMORY)
    if settings.store == DIRECTORY:
        if start:
            raise RadcryptError("the directory store needs no server: each command uses its "
                                "files directly")
        return StoreStatus(running=False, kind=DIRECTORY, data_dir=str(settings.objects_dir))
    data_dir = settings.store_dir
    try:
        handle = find_running(data_dir)
        if handle is None and start:
            handle = start_store(data_dir, background=True)
    except EmbeddedStoreError as exc:  # e.g. SeaweedFS cannot run here: one clear line
        raise RadcryptError(str(exc)) from None
    if handle is None:
        return StoreStatus(running=False, data_dir=str(data_dir))
    return StoreStatus(
        running=True, kind=handle.kind, pid=handle.pid, endpoint=handle.endpoint_url or "",
        bucket=handle.bucket, access_key=handle.access_key, data_dir=str(handle.data_dir),
        credentials_file=str(Path(handle.data_dir) / CREDENTIALS_FILE),
        secret_key=handle.secret_key if credentials else "")


def stop_store(settings: Settings) -> bool:
    """Stop the background embedded store of ``settings.store_dir``; False if none ran."""
    from cloud.local import EmbeddedStoreError, stop_background

    if settings.store == MEMORY:
        return False
    try:
        return bool(stop_background(settings.store_dir))
    except EmbeddedStoreError as exc:
        raise RadcryptError(str(exc)) from None


def add_service_arguments(parser: Any) -> None:
    """The search service's options (cloud/service_options.py), for `radcrypt serve`."""
    from cloud.service_options import add_service_arguments as add

    add(parser)


def serve(args: Any, settings: Settings) -> int:
    """`radcrypt serve`: cloud.service.run_service (the same as `python -m cloud.service`)
    with the store of ``settings`` instead of RADCRYPT_S3_*."""
    import sys
    from collections.abc import Iterator
    from contextlib import contextmanager

    from app.core.session import Session
    from cloud.service import run_service

    @contextmanager
    def open_store() -> Iterator[Any]:
        with Session(settings) as session:
            endpoint = session.store_config.endpoint_url if session.store_config else ""
            print(f"store {endpoint or ''}", file=sys.stderr)
            yield session.store

    return run_service(args, open_store)


def _erasure_target(image: str | None, series: str | None, study: str | None,
                    patient: str | None) -> Any:
    """The one erasure target given (app.core.erasure.Target)."""
    from app.core.erasure import Target

    given = [(kind, value) for kind, value in (("image", image), ("series", series),
                                               ("study", study), ("patient", patient))
             if value is not None]
    if len(given) != 1:
        raise RadcryptError("erasure needs exactly one of an image, a series, a study or a "
                            f"patient (given: {', '.join(k for k, _ in given) or 'none'})")
    return Target(*given[0])


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a front end reports in one plain line (no traceback): the client's own
    errors, the store's, the embedded store's, bad values and files (ImageDecodeError is a
    ValueError)."""
    from cloud.local import EmbeddedStoreError
    from cloud.store import StoreError

    return (RadcryptError, StoreError, EmbeddedStoreError, ValueError, OSError)


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """The files an import of ``paths`` would read: files named, and files under folders
    named (recursive, sorted, hidden ones skipped); RadcryptError for a missing path."""
    from app.core.importer import expand_paths as expand

    return expand(paths)


def scan_paths(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files an import of ``paths`` would read, and (path, reason) of the files it
    skips as not images (a CD export's DICOMDIR, viewer program, autorun.inf)."""
    from app.core.importer import scan_paths as scan

    return scan(paths)


def robust_range(pixels: np.ndarray) -> tuple[float, float]:
    """A display window for ``pixels``: their 1st and 99th percentiles (min/max if those
    coincide), deterministic and fast on large images."""
    from app.imaging.decode import robust_range as window

    return window(pixels)


def list_repositories(settings: Settings) -> list[Manifest]:
    """Manifests of every repository in the store of ``settings``; needs no identity
    (manifests are public), opens and closes a session of its own."""
    from app.core.repository import list_repositories as listed
    from app.core.session import Session

    with Session(settings) as session:
        return listed(session.store)
