"""What the desktop client needs from app/core, in one Qt-free place.

Every method here may be slow (scrypt, decoding, crypto, network) and is called from a
worker thread, never from the UI thread; none touches a widget. The GUI gets its data
from here and only renders it.

Identity: when ``app.core.identity`` and ``app.core.access`` are installed, the user
registers or unlocks a personal identity and repositories are opened with it. Without
one (demo mode), repositories made before identities still open with their password, but
no repository is created that way any more: a new repository always belongs to an
identity (the demo's to a throw-away one, app/core/demo.py).
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core import objects
from app.core.errors import AccessDenied, RadcryptError
from app.core.importer import ImportReport, committed_ids
from app.core.progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from app.core.repository import (
    PASSWORD_OWNER,
    Manifest,
    Repository,
    list_repositories,
    open_repository,
)
from app.core.searcher import QueryResult, read_meta, search_features
from app.core.session import Session
from app.core.settings import LOCAL, MEMORY, Settings
from app.gui import processes
from app.gui.processes import ProcessJobs
from app.imaging.decode import DecodedImage
from app.imaging.worker import DecoderPool

try:  # the identity issue; until it lands, repositories are password-locked
    from app.core import access as _access
    from app.core import identity as _identity
except ModuleNotFoundError as _exc:  # pragma: no cover - depends on the checkout
    if _exc.name not in ("app.core.identity", "app.core.access"):
        raise
    _access = None  # type: ignore[assignment]
    _identity = None  # type: ignore[assignment]

IDENTITY_AVAILABLE = _identity is not None and _access is not None
MIN_PASSWORD_SCORE = 3  # app.core.identity.MIN_PASSWORD_SCORE (zxcvbn)
STRENGTH_WORDS = ("very weak", "weak", "fair", "good", "strong")


def password_strength(password: str) -> tuple[int, str]:
    """Score 0..4 and plain words; the identity module's estimate when installed."""
    if _identity is not None:
        score, words = _identity.password_strength(password)
        return int(score), str(words)
    return _fallback_strength(password)


def _fallback_strength(password: str) -> tuple[int, str]:
    """A deliberately simple estimate (length and character classes) for password mode."""
    n = len(password)
    if n == 0:
        return 0, "empty"
    if n < 8:
        return 0, "too short: use at least 12 characters"
    classes = sum(any(test(ch) for ch in password) for test in
                  (str.islower, str.isupper, str.isdigit, lambda ch: not ch.isalnum()))
    distinct = len(set(password))
    score = 1 + (n >= 12) + (n >= 16 or (n >= 12 and classes >= 3)) + (n >= 20 and distinct >= 8)
    if distinct < 4:
        score = min(score, 1)
    score = max(0, min(4, score))
    hint = "" if score >= 3 else ": longer is better, a few unrelated words work well"
    return score, STRENGTH_WORDS[score] + hint


@dataclass(frozen=True)
class ArchiveEntry:
    """One archived image as the Archive page lists it (from its decrypted metadata)."""

    image_id: str
    name: str
    imported_at: str
    size: int = 0
    rows: int = 0
    columns: int = 0
    source_format: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    key_version: int = 0
    error: str = ""

    def describe(self) -> str:
        parts = [self.name]
        if self.rows and self.columns:
            parts.append(f"{self.columns} × {self.rows} pixels")
        if self.source_format:
            parts.append(self.source_format.upper())
        modality = self.tags.get("Modality")
        if modality:
            parts.append(modality)
        if self.imported_at:
            parts.append(f"imported {self.imported_at.replace('T', ' ')[:19]}")
        return " · ".join(parts)


@dataclass(frozen=True)
class AccessRow:
    user_id: str
    name: str
    key_version: int


@dataclass(frozen=True)
class CheckResult:
    """One line of "Test connection": what was checked, whether it passed, in words."""

    part: str  # "storage", "bucket", "service"
    ok: bool | None  # None: not checked
    text: str


@dataclass
class SearchOutcome:
    result: QueryResult
    thumbnails: dict[str, bytes]
    thumbnails_ms: float


class Backend:
    """The client's state outside Qt: settings, identity, session, unlocked repositories."""

    def __init__(self, settings: Settings, *, identity_mode: bool | None = None) -> None:
        self.settings = settings
        self.identity_mode = IDENTITY_AVAILABLE if identity_mode is None else (
            identity_mode and IDENTITY_AVAILABLE)
        self.identity: Any = None
        self.session: Session | None = None
        self._repos: dict[str, Repository] = {}
        self._lock = threading.RLock()
        self.jobs = ProcessJobs(workers=2)
        self._decoder: DecoderPool | None = None  # untrusted files: decoded only there

    # --- identity ---------------------------------------------------------------------

    def _identity_store(self) -> Any:
        if _identity is None:
            raise RadcryptError("identities are not available in this installation")
        return _identity.IdentityStore(self.settings.data_path)

    def identity_exists(self) -> bool:
        return self.identity_mode and bool(self._identity_store().exists())

    def register(self, name: str, password: str) -> Any:
        name = name.strip()
        if not name:
            raise RadcryptError("please enter your name")
        self.identity = self._identity_store().create(name, password)
        return self.identity

    def unlock(self, password: str) -> Any:
        self.identity = self._identity_store().unlock(password)
        return self.identity

    @property
    def user_name(self) -> str:
        return str(getattr(self.identity, "name", "")) if self.identity is not None else ""

    @property
    def user_id(self) -> str:
        return str(getattr(self.identity, "user_id", "")) if self.identity is not None else ""

    def card_json(self) -> str:
        identity = self.identity
        if identity is None:
            raise RadcryptError("no identity is unlocked")
        if hasattr(identity, "card_json"):
            return str(identity.card_json())
        return str(identity.card().to_json())

    @property
    def fingerprint(self) -> str:
        identity = self.identity
        if identity is None or not hasattr(identity, "card"):
            return ""
        return str(getattr(identity.card(), "fingerprint", ""))

    # --- connection -------------------------------------------------------------------

    def connect(self) -> str:
        """Open the session (embedded store or S3); returns where, in words."""
        with self._lock:
            if self.session is None:
                session = self._new_session()
                session.open()
                self.session = session
        return self.where()

    def _new_session(self) -> Session:
        """A session whose service requests are signed by the unlocked identity (and whose
        embedded service trusts this user's and the pinned owners' keys)."""
        identity = self.identity
        if identity is None:
            return Session(self.settings)
        if _access is not None and hasattr(_access, "session_for"):
            session: Session = _access.session_for(self.settings, identity)
            return session
        return Session(self.settings, signer=identity.signer())

    def warm_up(self) -> None:
        """Start the decoding processes before they are needed.

        The search service is deliberately not started here: an embedded service trusts
        the owner keys pinned when it starts (app.core.access.session_for), so it is started
        by the first search, after the repository was opened (and its owner pinned)."""
        self.jobs.warm_up()
        self.decoder()

    def decoder(self) -> DecoderPool:
        """The memory-limited decoder children (app/imaging/worker.py): every file from
        elsewhere is decoded there, and its pixels come back as raw bytes, never pickled."""
        with self._lock:
            if self._decoder is None:
                self._decoder = DecoderPool(2)
            return self._decoder

    def where(self) -> str:
        session = self.session
        if session is None or session.store_config is None:
            return "not connected"
        endpoint = session.store_config.endpoint_url or "AWS S3"
        endpoint = endpoint.removeprefix("http://").removeprefix("https://")
        if session.store_kind == MEMORY:
            return f"in-memory store at {endpoint} (nothing is kept)"
        if session.store_kind == LOCAL:
            return f"embedded store at {endpoint}"
        return f"{endpoint}, bucket {session.store_config.bucket}"

    @property
    def memory_store(self) -> bool:
        """Whether this session's store (or, before connecting, the chosen one) keeps
        nothing: everything is lost when Radcrypt closes."""
        session = self.session
        if session is not None and session.store_config is not None:
            return not session.kept
        return self.settings.store == MEMORY

    @property
    def connected(self) -> bool:
        return self.session is not None

    def _session(self) -> Session:
        session = self.session
        if session is None:
            raise RadcryptError("not connected to the storage yet")
        return session

    def service_client(self) -> Any:
        """The search service, started once even if two workers ask at the same time."""
        with self._lock:
            return self._session().service

    def close(self) -> None:
        """Stop the worker processes and what the session started (embedded store, search
        service)."""
        self.jobs.shutdown()
        with self._lock:
            decoder, self._decoder = self._decoder, None
            session, self.session = self.session, None
        if decoder is not None:
            decoder.close()
        if session is not None:
            session.close()

    def _store_config(self) -> Any:
        config = self._session().store_config
        if config is None:
            raise RadcryptError("not connected to the storage yet")
        return config

    # --- repositories -----------------------------------------------------------------

    def list_repositories(self) -> list[Manifest]:
        return list_repositories(self._session().store)

    def unlocked(self, repo_id: str) -> Repository | None:
        return self._repos.get(repo_id)

    def remember(self, repo: Repository) -> Repository:
        self._repos[repo.repo_id] = repo
        return repo

    def _repository_job(self, action: str, *args: Any) -> Repository:
        repo: Repository = self.jobs.call(processes.repository_job, action,
                                          self._store_config(), self.settings, *args)
        return self.remember(repo)

    def create_repository(self, name: str) -> Repository:
        """New keys are generated in a child process (see processes.repository_job). Only
        an identity owns a new repository: none is locked by a password alone any more."""
        if not self.identity_mode or self.identity is None:
            raise RadcryptError("a new repository belongs to an identity: register or unlock "
                                "your identity first")
        return self._repository_job("create-as", self.identity, name)

    def open_repository(self, name: str, password: str | None = None) -> Repository:
        session = self._session()
        if self.identity_mode:
            assert _access is not None
            repo = _access.open_repository_as(session, self.identity, name)
        else:
            if password is None:
                raise AccessDenied(f"repository {name!r} is locked: its password is needed")
            repo = open_repository(session.store, name, password)
        return self.remember(repo)

    def needs_password(self) -> bool:
        return not self.identity_mode

    def can_migrate(self) -> bool:
        return self.identity_mode and hasattr(_access, "migrate_password_repository")

    def migrate_repository(self, name: str, password: str) -> Repository:
        """Turn a password-locked repository into one owned by this identity."""
        assert _access is not None
        repo = _access.migrate_password_repository(self._session(), self.identity, name,
                                                   password)
        return self.remember(repo)

    # --- archive ------------------------------------------------------------------------

    def archive_ids(self, repo: Repository) -> list[str]:
        """Ids of every committed image (named by a segment), in a stable order."""
        return sorted(committed_ids(self._session().store, repo.repo_id))

    def archive_entries(self, repo: Repository, ids: list[str],
                        progress: ProgressCallback = no_progress,
                        cancel: CancelToken | None = None) -> list[ArchiveEntry]:
        """Decrypt the metadata of ``ids`` (in parallel); a damaged one becomes an entry
        with ``error`` set rather than failing the whole list."""
        store = self._session().store
        cancel = cancel or CancelToken()

        def one(image_id: str) -> ArchiveEntry:
            cancel.check()
            try:
                meta, version = read_meta(store, repo, image_id)
            except RadcryptError as exc:
                return ArchiveEntry(image_id, image_id[:12], "", error=str(exc))
            tags = meta.get("tags") if isinstance(meta.get("tags"), dict) else {}
            return ArchiveEntry(
                image_id=image_id, name=str(meta.get("name", image_id[:12])),
                imported_at=str(meta.get("imported_at", "")), size=int(meta.get("size", 0)),
                rows=int(meta.get("rows", 0)), columns=int(meta.get("columns", 0)),
                source_format=str(meta.get("source_format", "")),
                tags={str(k): str(v) for k, v in (tags or {}).items()}, key_version=version)

        out: list[ArchiveEntry] = []
        total = len(ids)
        with ThreadPoolExecutor(8, thread_name_prefix="radcrypt-meta") as pool:
            for entry in pool.map(one, ids):
                out.append(entry)
                if len(out) % 10 == 0 or len(out) == total:
                    progress(ProgressEvent("index", len(out), total))
        return out

    def thumbnail_png(self, repo: Repository, image_id: str, version: int | None = None
                      ) -> bytes:
        plain, _ = objects.get_decrypted(self._session().store, repo.ring, repo.repo_id,
                                         "thumbs", image_id, version)
        return plain

    def fetch_image(self, repo: Repository, image_id: str, name: str = "",
                    version: int | None = None) -> DecodedImage:
        """Download, verify and decrypt an original, then decode it. The plaintext file
        lives only in a private temporary folder, deleted before this returns."""
        suffix = Path(name).suffix if name else ""
        with tempfile.TemporaryDirectory(prefix="radcrypt-view-") as tmp:
            dest = Path(tmp) / f"original{suffix}"
            objects.fetch_original(self._session().store, repo.ring, repo.repo_id, image_id,
                                   dest, version)
            image: DecodedImage = self.decoder().decode(dest)
            return image

    def decode(self, path: str) -> DecodedImage:
        """Decode a local file (in a child process: decoders may hold the GIL)."""
        image: DecodedImage = self.decoder().decode(path)
        return image

    def display(self, path: str) -> Any:
        """The 8-bit display image of a local file, decoded in a child process."""
        return self.decoder().display(path)

    # --- import and search ---------------------------------------------------------------

    def import_files(self, repo: Repository, paths: list[str],
                     progress: ProgressCallback = no_progress,
                     cancel: CancelToken | None = None, batch_size: int | None = None
                     ) -> ImportReport:
        """The core's Importer, run in a child process (see app/gui/processes.py)."""
        session = self._session()
        report: ImportReport = processes.run_job(
            processes.import_job, (self._store_config(), repo, list(paths),
                                   self.settings.workers, batch_size), progress, cancel)
        if report.imported and session.service_started:
            with contextlib.suppress(RadcryptError):  # the service re-lists on its own too
                self.service_client().refresh(repo.repo_id)
        return report

    def search(self, repo: Repository, path: str, k: int) -> SearchOutcome:
        """Nearest archived images of one query file, with the hits' decrypted previews."""
        import time

        session = self._session()
        self.service_client()
        start = time.perf_counter()
        features = self.decoder().features(path, repo.manifest.extractor)
        features_ms = (time.perf_counter() - start) * 1000
        result = search_features(session, repo, features[None, :], [path], k=k)[0]
        result.timings_ms["features"] = features_ms
        start = time.perf_counter()
        thumbs: dict[str, bytes] = {}
        if result.hits:
            def one(hit: Any) -> tuple[str, bytes]:
                return hit.image_id, self.thumbnail_png(repo, hit.image_id, hit.key_version)

            with ThreadPoolExecutor(min(8, len(result.hits))) as pool:
                thumbs = dict(pool.map(one, result.hits))
        return SearchOutcome(result, thumbs, (time.perf_counter() - start) * 1000)

    # --- access -------------------------------------------------------------------------

    def access_list(self, repo: Repository) -> list[AccessRow]:
        if not self.identity_mode:
            return [AccessRow(PASSWORD_OWNER, "anyone who knows the repository password",
                              repo.manifest.key_version)]
        assert _access is not None
        return [AccessRow(str(e.user_id), str(e.name), int(e.key_version))
                for e in _access.list_access(self._session(), repo.repo_id)]

    def register_user(self, card_json: str) -> Any:
        assert _access is not None
        return _access.register_user(self._session(), self.identity, card_json)

    def grant(self, repo: Repository, user_id: str) -> None:
        assert _access is not None
        _access.grant_access(self._session(), self.identity, repo, user_id)

    def revoke(self, repo: Repository, user_id: str) -> Repository:
        """Rotates the key version and re-encrypts the index, in a child process."""
        return self._repository_job("revoke", self.identity, repo, user_id)

    # --- demo ---------------------------------------------------------------------------

    def prepare_demo(self, workdir: Path, count: int, progress: ProgressCallback = no_progress,
                     cancel: CancelToken | None = None, queries: int = 6
                     ) -> tuple[Repository, list[Path]]:
        """The demo repository with ``count`` sample images, and query images beside it
        (app.core.demo.prepare_demo_repository, in a child process)."""
        repo, files = processes.run_job(
            processes.demo_job, (self._store_config(), self.settings, workdir, count, queries),
            progress, cancel)
        return self.remember(repo), files


def make_demo_queries(files: list[Path], dest: Path, count: int = 6) -> list[Path]:
    """Perturbed copies of a few archived sample images, to try Search by image with."""
    from resources.samples import PERTURBATIONS, perturb_file

    if not files:
        return []
    step = max(1, len(files) // count)
    picks = files[::step][:count]
    return [perturb_file(p, dest, PERTURBATIONS[i % len(PERTURBATIONS)], seed=i)
            for i, p in enumerate(picks)]


# --- "Test connection" ------------------------------------------------------------------
# app/core has no diagnostics use case yet; this adapter uses cloud's public store API
# read-only (it never creates the bucket) and should move to app/core/diagnostics.py.


def check_connection(settings: Settings, session: Session | None = None,
                     start_service: Callable[[], Any] | None = None) -> list[CheckResult]:
    """Storage reachable, bucket present, service healthy: each in plain words.

    ``session``: the open session, used when ``settings`` describe its storage (the
    embedded store of this workstation). ``start_service``: returns the session's service
    client, starting the embedded service when needed.
    """
    from app.core.service_client import ServiceClient
    from cloud.local import find_running
    from cloud.store import BucketNotFound, ObjectStore, StoreConfig, StoreError

    results: list[CheckResult] = []
    same = session is not None and session.store_config is not None and _same_storage(
        settings, session.settings)
    config: StoreConfig | None
    if same:
        assert session is not None
        config = session.store_config
    elif settings.store == MEMORY:
        config = None
        results.append(CheckResult(
            "storage", False, "The in-memory store exists only while Radcrypt runs with it; "
            "it keeps nothing."))
    elif settings.store == LOCAL:
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
            ObjectStore(config, max_attempts=1, connect_timeout=3.0, read_timeout=5.0).ping()
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
            results.append(CheckResult("service", False, f"{_sentence(str(exc))}"))
        finally:
            client.close()
    elif same and store_ok and start_service is not None:
        try:
            service = start_service()
            service.health()
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
