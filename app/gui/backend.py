"""What the desktop client needs from the core: the facade (app/core/client.py), held for
one window, plus the little state only a window has (which identity is unlocked, the
settings the Settings page last applied).

Every method here may be slow (scrypt, decoding, crypto, network) and is called from a
background task of app/gui/tasks.py, never from the UI thread; none touches a widget.
The use cases themselves live in the facade: this module only picks the identity, keeps
one ``Client`` per connection, and shapes results for the pages.

Identity: the user registers or unlocks a personal identity and the client works as that
identity. Without one (``identity_mode=False``: the demo), the client works as a
throw-away identity that owns the demo repository and nothing else; nothing is opened
with a password alone.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core import client as facade
from app.core.client import CheckResult, Client
from app.core.errors import AccessDenied, RadcryptError
from app.core.meta import ImageMeta
from app.core.progress import CancelToken, ProgressCallback, no_progress
from app.core.settings import MEMORY, Settings
from app.core.studies import Study, group_studies

if TYPE_CHECKING:
    from app.core.types import (
        Blackout,
        DecodedImage,
        ImportReport,
        Manifest,
        QueryResult,
        Repository,
        Session,
    )

__all__ = ["AccessRow", "ArchiveEntry", "Backend", "CheckResult", "SearchOutcome",
           "check_connection", "password_problem", "password_strength"]

ArchiveEntry = ImageMeta  # one archived image as the Archive page lists it
check_connection = facade.check_connection
# Settings a running client can take over as they are; any other change reconnects.
LIVE_SETTINGS = frozenset({"workers", "lock_minutes"})  # lock_minutes: app/gui/idle_lock.py


def password_strength(password: str, name: str = "") -> tuple[int, str]:
    """Score 0..4 and plain words (zxcvbn, through the facade)."""
    return facade.password_strength(password, name)


def password_problem(password: str, name: str = "") -> str:
    """Why ``password`` may not protect a new identity, or "" when it may (the one rule,
    app.core.identity.check_new_password, through the facade)."""
    try:
        facade.check_new_password(password, name)
    except RadcryptError as exc:
        return str(exc)
    return ""


@dataclass(frozen=True)
class AccessRow:
    user_id: str
    name: str
    key_version: int


@dataclass
class SearchOutcome:
    result: QueryResult
    thumbnails: dict[str, bytes]
    thumbnails_ms: float


class Backend:
    """The window's client state outside Qt: settings, identity, the facade's Client."""

    def __init__(self, settings: Settings, *, identity_mode: bool = True) -> None:
        """``identity_mode`` False: no user identity (the demo): no gate, and the client
        works as a throw-away identity."""
        self.settings = settings
        self.identity_mode = identity_mode
        self.identity: Any = None  # the user's unlocked identity (crypto.identity)
        self.client: Client | None = None
        self._lock = threading.RLock()
        self._purpose = ""  # the access log's purpose field (app/gui/purpose_field.py)

    # --- identity ---------------------------------------------------------------------

    def identity_exists(self) -> bool:
        return self.identity_mode and facade.identity_exists(self.settings)

    def register(self, name: str, password: str) -> Any:
        name = name.strip()
        if not name:
            raise RadcryptError("please enter your name")
        self.identity = facade.create_identity(self.settings, name, password)
        return self.identity

    def unlock(self, password: str) -> Any:
        self.identity = facade.unlock_identity(self.settings, password)
        return self.identity

    @property
    def user_name(self) -> str:
        return str(self.identity.name) if self.identity is not None else ""

    @property
    def user_id(self) -> str:
        return str(self.identity.user_id) if self.identity is not None else ""

    def card_json(self) -> str:
        if self.identity is None:
            raise RadcryptError("no identity is unlocked")
        return str(self.identity.card().to_json())

    @property
    def fingerprint(self) -> str:
        return str(self.identity.card().fingerprint) if self.identity is not None else ""

    # --- connection -------------------------------------------------------------------

    def connect(self) -> str:
        """Open the client's session (embedded store or S3); returns where, in words."""
        with self._lock:
            if self.client is None:
                identity = self.identity if self.identity is not None else (
                    facade.demo_identity())
                self.client = Client(self.settings, identity).open()
                self.client.access_purpose = self._purpose
            return self.client.where()

    @property
    def access_purpose(self) -> str:
        """Why the user opens images now (optional): written with every decryption of an
        original or a preview into the repository's access log (Client.access_purpose);
        kept across reconnections."""
        return self._purpose

    @access_purpose.setter
    def access_purpose(self, purpose: str) -> None:
        with self._lock:
            self._purpose = purpose.strip()
            if self.client is not None:
                self.client.access_purpose = self._purpose

    def _client(self) -> Client:
        client = self.client
        if client is None:
            raise RadcryptError("not connected to the storage yet")
        return client

    def apply_settings(self, settings: Settings) -> bool:
        """Use ``settings`` from the next operation on, without a restart. Returns True
        when the connection must be made again (storage or service changed): the caller
        then runs ``reconnect`` in a background task."""
        with self._lock:
            old, self.settings = self.settings, settings
            client = self.client
            if client is None:
                return False
            changed = {f.name for f in dataclasses.fields(Settings)
                       if getattr(old, f.name) != getattr(settings, f.name)}
            if changed <= LIVE_SETTINGS:
                client.settings = settings  # read by each import (workers)
                return False
            return True

    def reconnect(self) -> str:
        """Close the client and open a new one with the current settings; repositories
        must be opened again."""
        with self._lock:
            client, self.client = self.client, None
        if client is not None:
            client.close()
        return self.connect()

    def warm_up(self) -> None:
        """Start the decoder children before they are needed (the search service starts
        with the first search, once the repository's owner is pinned)."""
        self._client().warm_up()

    def where(self) -> str:
        return self.client.where() if self.client is not None else "not connected"

    @property
    def memory_store(self) -> bool:
        """Whether the store (or, before connecting, the chosen one) keeps nothing."""
        if self.client is not None:
            return self.client.memory_store
        return self.settings.store == MEMORY

    @property
    def connected(self) -> bool:
        return self.client is not None

    @property
    def session(self) -> Session | None:
        """The open session (its store and kind), or None before connecting."""
        client = self.client
        return client.session if client is not None and client.connected else None

    def service_client(self) -> Any:
        """The search service, started once even if two tasks ask at the same time."""
        return self._client().service()

    def close(self) -> None:
        """Stop what the client started (decoder children, embedded store, service)."""
        with self._lock:
            client, self.client = self.client, None
        if client is not None:
            client.close()

    def check_connection(self, settings: Settings) -> list[CheckResult]:
        """"Test connection" for ``settings`` (those of the form, maybe not saved)."""
        client = self.client
        if client is not None:
            return client.check_connection(settings)
        return facade.check_connection(settings)

    # --- repositories -----------------------------------------------------------------

    def list_repositories(self) -> list[Manifest]:
        return self._client().list_repositories()

    def unlocked(self, repo_id: str) -> Repository | None:
        client = self.client
        return client.unlocked(repo_id) if client is not None else None

    def _identity(self) -> Any:
        if self.identity is None:
            raise AccessDenied("no identity is unlocked: register or unlock yours first")
        return self.identity

    def create_repository(self, name: str, storage_format: int = 2,
                          search: str = "sknn") -> Repository:
        """A new repository owned by the user's identity (none is locked by a password
        alone, and the demo's throw-away identity creates none here), in storage format 2
        (format 1 is read-only: the facade refuses a new one)."""
        if not self.identity_mode or self.identity is None:
            raise RadcryptError("a new repository belongs to an identity: register or unlock "
                                "your identity first")
        return self._client().create_repository(name, storage_format=storage_format,
                                                search=search)

    def open_repository(self, name: str) -> Repository:
        self._identity()
        return self._client().open_repository(name)

    @staticmethod
    def storage_format(repo: Repository) -> int:
        """1 (read-only: search, view, export; its owner may upgrade it) or 2."""
        return Client.storage_format(repo)

    def is_owner(self, repo: Repository) -> bool:
        """Whether the unlocked identity owns ``repo``."""
        client = self.client
        return client is not None and self.identity is not None and client.is_owner(repo)

    def upgrade_storage_format(self, repo: Repository,
                               progress: ProgressCallback = no_progress) -> Repository:
        """Move a format-1 repository this identity owns to storage format 2 (resumable:
        after a failure, running it again finishes it); the repository as now opened."""
        self._identity()
        client = self._client()
        report = client.migrate_to_format2(repo.repo_id, progress)
        return report.repo if report.repo is not None else client.open_repository(repo.repo_id)

    def migrate_repository(self, name: str, password: str) -> Repository:
        """Move a repository made before identities (locked by its password) to this
        identity: its password is needed once, and opens it no more afterwards."""
        self._identity()
        return self._client().migrate_repository(name, password)

    # --- archive ------------------------------------------------------------------------

    def archive_ids(self, repo: Repository) -> list[str]:
        """Ids of every committed image, sorted."""
        return self._client().image_ids(repo)

    def archive_entries(self, repo: Repository, ids: list[str],
                        progress: ProgressCallback = no_progress,
                        cancel: CancelToken | None = None) -> list[ArchiveEntry]:
        """Decrypted metadata of ``ids``; a damaged one has ``error`` set."""
        return self._client().list_images(repo, ids, progress, cancel)

    def thumbnail_png(self, repo: Repository, image_id: str, version: int | None = None
                      ) -> bytes:
        return self._client().thumbnail_png(repo, image_id, version)

    def archive_previews(self, repo: Repository, entries: Sequence[ArchiveEntry], *,
                         arrived: Callable[[str, bytes], None] | None = None,
                         cancel: CancelToken | None = None) -> dict[str, bytes]:
        """The previews of a view's tiles with ONE access-log entry for all of them
        (Client.previews); ``arrived`` runs in a worker thread as each is ready."""
        return self._client().previews(repo, entries, arrived=arrived, cancel=cancel)

    def fetch_image(self, repo: Repository, image_id: str, name: str = "",
                    version: int | None = None) -> DecodedImage:
        """Download, verify, decrypt and decode an original (decoded in a child)."""
        return self._client().fetch_image(repo, image_id, name, version)

    def decode(self, path: str, frame: int | None = None) -> DecodedImage:
        """Decode a local file (in a decoder child); ``frame`` of a multi-frame file (the
        middle one when None), so the viewer can show every frame as a stack."""
        return self._client().decode(path, frame)

    def get_original(self, repo: Repository, image_id: str, dest: str,
                     version: int | None = None) -> int:
        """Download, verify and decrypt an original to ``dest`` (the viewer's "Export
        original…"); nothing unverified is written there."""
        return self._client().get_original(repo, image_id, dest, version)

    def display(self, path: str) -> Any:
        """The 8-bit display image of a local file, decoded in a child."""
        return self._client().display(path)

    def fetch_frames(self, repo: Repository, original_id: str, frames: Sequence[int | None],
                     name: str = "", version: int | None = None,
                     on_image: Callable[[int, DecodedImage], None] | None = None,
                     cancel: CancelToken | None = None) -> list[DecodedImage]:
        """Frames of one archived original (None: a single-frame file), downloading and
        decrypting it once; each decoded frame goes to ``on_image(position, image)`` as it
        comes, so a viewer shows the first before the last decodes. The plaintext lives
        only in a private temporary folder, deleted before this returns."""
        client = self._client()
        suffix = Path(name).suffix if name else ""
        out: list[DecodedImage] = []
        with tempfile.TemporaryDirectory(prefix="radcrypt-view-") as tmp:
            dest = Path(tmp) / f"original{suffix}"
            client.get_original(repo, original_id, dest, version)
            for position, frame in enumerate(frames):
                if cancel is not None:
                    cancel.check()
                image = client.decode(dest, frame)
                out.append(image)
                if on_image is not None:
                    on_image(position, image)
        return out

    def studies(self, entries: Sequence[ArchiveEntry]) -> list[Study]:
        """Studies and series of already decrypted entries (grouped here, on the
        workstation: app/core/studies.py; the cloud never sees the grouping)."""
        return group_studies(entries)

    def series_images(self, repo: Repository, series_key: str) -> list[ArchiveEntry]:
        """The images of one series in stack order (the facade's ``images_of``), for a
        viewer opened from a search hit; [] when the facade cannot list them."""
        images_of = getattr(self._client(), "images_of", None)
        if images_of is None:
            return []
        return list(images_of(repo, series_key))

    # --- import and search ---------------------------------------------------------------

    def import_files(self, repo: Repository, paths: list[str],
                     progress: ProgressCallback = no_progress,
                     cancel: CancelToken | None = None, batch_size: int | None = None,
                     blackouts: Sequence[Blackout] = ()) -> ImportReport:
        """``blackouts``: regions painted over every image of a research repository's
        import (app/core/deid.py), given for a file refused for burned-in text."""
        return self._client().import_files(repo, list(paths), progress, cancel, batch_size,
                                           blackouts=tuple(blackouts))

    @staticmethod
    def policy(repo: Repository) -> str:
        """"clinical" or "research" (de-identified copies only: app/core/deid.py)."""
        return Client.policy(repo)

    def search(self, repo: Repository, path: str, k: int,
               where: Sequence[str] = ()) -> SearchOutcome:
        """Nearest archived images of one query file, with the hits' decrypted previews.
        An answer that left segments out (format 2) comes back marked, not as an error:
        the search page shows it under a red banner (``result.complete`` False).
        ``where``: keyword terms (issue 17); only the images they match are ranked."""
        client = self._client()
        keyword = {"where": list(where)} if where else {}
        result = client.search_files(repo, [path], k=k, allow_incomplete=True, **keyword)[0]
        return self._with_previews(repo, result)

    def _with_previews(self, repo: Repository, result: QueryResult) -> SearchOutcome:
        """The previews of the ungrouped top-k and of each series' best hit (the others of
        a series are fetched when the user expands it: ``previews``)."""
        hits = {h.image_id: h for h in result.hits}
        for group in getattr(result, "groups", None) or []:
            hits.setdefault(group.best.image_id, group.best)
        start = time.perf_counter()
        thumbs = self._client().thumbnails(repo, list(hits.values()))
        return SearchOutcome(result, thumbs, (time.perf_counter() - start) * 1000)

    def previews(self, repo: Repository, hits: list[Any]) -> dict[str, bytes]:
        """Decrypted PNG previews of search hits (image id -> PNG)."""
        return self._client().thumbnails(repo, hits)

    def search_by_image_id(self, repo: Repository, image_id: str, k: int,
                           where: Sequence[str] = ()) -> SearchOutcome:
        """"Find similar": the archived image's own stored features as the query (no local
        file), through the facade's ``search_by_image_id``, with the hits' previews;
        ``where`` as in ``search``."""
        keyword = {"where": list(where)} if where else {}
        result = self._client().search_by_image_id(repo, image_id, k, allow_incomplete=True,
                                                   **keyword)
        if isinstance(result, list):
            result = result[0]
        return self._with_previews(repo, result)

    # --- access -------------------------------------------------------------------------

    def access_list(self, repo: Repository) -> list[AccessRow]:
        return [AccessRow(str(e.user_id), str(e.name), int(e.key_version))
                for e in self._client().access_list(repo)]

    def register_user(self, card_json: str) -> Any:
        self._identity()
        return self._client().register_user(card_json)

    def grant(self, repo: Repository, user_id: str) -> None:
        self._identity()
        self._client().grant(repo, user_id)

    def revoke(self, repo: Repository, user_id: str,
               progress: ProgressCallback = no_progress) -> Repository:
        """Rotates the key version and re-encrypts the index."""
        self._identity()
        return self._client().revoke(repo, user_id, progress)

    # --- demo ---------------------------------------------------------------------------

    def prepare_demo(self, workdir: Path, count: int, progress: ProgressCallback = no_progress,
                     cancel: CancelToken | None = None, queries: int = 6
                     ) -> tuple[Repository, list[Path]]:
        """A demo repository with ``count`` sample images, owned by the client's identity
        (the user's, or the demo's throw-away one), and query images under
        ``workdir/queries``."""
        return self._client().prepare_demo(workdir, count, progress, cancel, queries)
