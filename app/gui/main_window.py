"""The main window: repository selector, pages, status bar, shortcuts, and a clean close.

Start-up: identity (register or unlock) when identities are installed, then the session
is opened in a worker (it may start the embedded S3 server), then the repositories are
listed. Closing while work runs asks first, cancels the workers, waits for them, and
closes the session (which stops the embedded store and search service) in a worker too.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PyQt6.QtCore import QSettings, QSize, Qt, QTimer, pyqtSignal
from PyQt6.QtGui import QAction, QCloseEvent, QKeySequence
from PyQt6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QStackedWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.core.errors import AccessDenied
from app.core.progress import ProgressEvent
from app.core.types import Manifest, Repository
from app.gui import theme
from app.gui.activity import ActivityLog
from app.gui.activity_page import ActivityPage
from app.gui.archive_page import ArchivePage
from app.gui.backend import Backend
from app.gui.context import AppContext, Dialogs
from app.gui.idle_lock import install_lock
from app.gui.import_page import ImportPage
from app.gui.keys_page import KeysPage
from app.gui.keyword_page import KeywordPage
from app.gui.login import REGISTER, UNLOCK, GatePage
from app.gui.purpose_field import install_purpose_field
from app.gui.search_page import SearchPage
from app.gui.settings_page import SettingsPage
from app.gui.tasks import Task, TaskContext, TaskError, TaskRunner
from app.gui.widgets import MessageBar

PAGES = (("archive", "Archive", "archive"), ("import", "Import", "import"),
         ("search", "Search by image", "search"), ("keywords", "Search by keyword", "tag"),
         ("keys", "Repository key", "key"),
         ("activity", "Activity", "activity"), ("settings", "Settings", "settings"))
CHOOSE = "Choose a repository…"
NEW = "New repository…"
SHUTDOWN_WAIT_MS = 30_000
TRY_DEMO_IMAGES = 30  # "Try the demo images" in the empty archive
SAMPLE_QUERY = "Try a sample query"


@dataclass(frozen=True)
class DemoOptions:
    workdir: Path
    count: int = 150
    remove_workdir: bool = True


class MainWindow(QMainWindow):
    """The desktop client; ``start()`` begins the identity/connection sequence."""

    shutdownFinished = pyqtSignal()
    ready = pyqtSignal()  # connected and repositories listed

    def __init__(self, backend: Backend, *, activity: ActivityLog | None = None,
                 dialogs: Dialogs | None = None, demo: DemoOptions | None = None,
                 remember_state: bool = True) -> None:
        super().__init__()
        self.backend = backend
        self.demo = demo
        self.remember_state = remember_state and demo is None
        self.runner = TaskRunner(self)
        log = activity or ActivityLog(backend.settings.data_path / "activity.jsonl")
        self.ctx = AppContext(backend, self.runner, log, dialogs,
                              demo_queries=(demo.workdir / "queries") if demo else None,
                              demo=demo is not None, parent=self)
        self.manifests: list[Manifest] = []
        self.closing = False
        self.shutdown_done = False
        self.connect_task: Task | None = None
        self.demo_task: Task | None = None
        self.demo_repo_id = ""  # the repository the demo's query images were made for
        self.demo_workdir: Path | None = None  # its folder (archive/ and queries/)
        self.sample_queries_tried = 0
        self._shutdown_started = False

        self.setWindowTitle("Radcrypt" + (" — demo" if demo else ""))
        self.setWindowIcon(theme.icon("logo", "#000000"))
        self.resize(1280, 820)
        self.setMinimumSize(1024, 680)

        self.stack = QStackedWidget()
        central = QWidget()
        central_layout = QVBoxLayout(central)
        central_layout.setContentsMargins(0, 0, 0, 0)
        central_layout.setSpacing(0)
        self.memory_banner = _memory_banner()
        central_layout.addWidget(self.memory_banner)
        central_layout.addWidget(self.stack, 1)
        self.setCentralWidget(central)
        self._update_memory_banner()
        self.gate = GatePage(self.ctx)
        self.gate.unlocked.connect(self._unlocked)
        self.stack.addWidget(self.gate)
        self.workspace = self._build_workspace()
        self.stack.addWidget(self.workspace)
        self._build_status_bar()
        self.purpose_field = install_purpose_field(self)  # the access log's purpose
        self._build_actions()

        self.ctx.message.connect(self._message)
        self.ctx.repositoryChanged.connect(self._repository_changed)
        self.keys_page.repositoryCreated.connect(self._repository_created)
        self.archive_page.createRequested.connect(self._create_requested)
        self.archive_page.demoRequested.connect(self.try_demo_images)
        self.archive_page.findSimilarRequested.connect(self.find_similar)
        self.keyword_page.findSimilarRequested.connect(self.find_similar)
        self.keyword_page.imageSearchRequested.connect(self.search_with_filter)
        self.settings_page.saved.connect(self.apply_settings)
        self._pending_settings: Any = None
        self.runner.taskStarted.connect(self._task_started)
        self.runner.taskFinished.connect(self._task_finished)
        self._message_timer = QTimer(self)
        self._message_timer.setSingleShot(True)
        self._message_timer.timeout.connect(self._fade_message)
        theme.on_change(self.retheme)
        self.workstation_lock = install_lock(self)  # Lock button, Ctrl+L, idle lock

    # --- construction ---------------------------------------------------------------------

    def _build_workspace(self) -> QWidget:
        workspace = QWidget()
        outer = QVBoxLayout(workspace)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(0)

        top = QWidget()
        top.setObjectName("TopBar")
        bar = QHBoxLayout(top)
        bar.setContentsMargins(14, 8, 14, 8)
        bar.setSpacing(10)
        logo = QLabel()
        logo.setPixmap(theme.logo_pixmap(28))
        title = QLabel("Radcrypt")
        title.setObjectName("AppTitle")
        bar.addWidget(logo)
        bar.addWidget(title)
        bar.addSpacing(24)
        bar.addWidget(QLabel("Repository:"))
        self.repo_combo = QComboBox()
        self.repo_combo.setMinimumWidth(260)
        self.repo_combo.setToolTip("The repository every page works on")
        self.repo_combo.activated.connect(self._repo_chosen)
        bar.addWidget(self.repo_combo)
        self.lock_label = QLabel()
        self.lock_label.setToolTip("Whether the repository's key is unlocked on this "
                                   "workstation")
        bar.addWidget(self.lock_label)
        self.key_badge = QLabel("")
        self.key_badge.setObjectName("Muted")
        bar.addWidget(self.key_badge)
        bar.addStretch(1)
        self.sample_button = theme.themed(QPushButton(SAMPLE_QUERY), "search")
        self.sample_button.setToolTip("Search the demo repository with a perturbed copy "
                                      "(noise, window, shift or JPEG) of one of its images")
        self.sample_button.clicked.connect(self.try_sample_query)
        self.sample_button.setVisible(False)
        bar.addWidget(self.sample_button)
        self.user_label = QLabel("")
        self.user_label.setObjectName("Muted")
        bar.addWidget(self.user_label)
        outer.addWidget(top)

        body = QHBoxLayout()
        body.setContentsMargins(0, 0, 0, 0)
        body.setSpacing(0)
        self.sidebar = QListWidget()
        self.sidebar.setObjectName("Sidebar")
        self.sidebar.setFixedWidth(200)
        self.sidebar.setIconSize(QSize(20, 20))
        self.sidebar.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        body.addWidget(self.sidebar)

        content = QVBoxLayout()
        content.setContentsMargins(0, 0, 0, 0)
        content.setSpacing(0)
        self.message_bar = MessageBar()
        message_row = QHBoxLayout()
        message_row.setContentsMargins(20, 10, 20, 0)
        message_row.addWidget(self.message_bar)
        content.addLayout(message_row)
        self.pages = QStackedWidget()
        self.archive_page = ArchivePage(self.ctx)
        self.import_page = ImportPage(self.ctx)
        self.search_page = SearchPage(self.ctx)
        self.keyword_page = KeywordPage(self.ctx)
        self.keys_page = KeysPage(self.ctx)
        self.activity_page = ActivityPage(self.ctx)
        self.settings_page = SettingsPage(self.ctx)
        self.page_widgets: dict[str, QWidget] = {
            "archive": self.archive_page, "import": self.import_page,
            "search": self.search_page, "keywords": self.keyword_page, "keys": self.keys_page,
            "activity": self.activity_page, "settings": self.settings_page}
        for key, label, icon_name in PAGES:
            item = QListWidgetItem(theme.icon(icon_name), label)
            item.setData(Qt.ItemDataRole.UserRole, key)
            item.setSizeHint(QSize(180, 40))
            self.sidebar.addItem(item)
            self.pages.addWidget(self.page_widgets[key])
        self.sidebar.currentRowChanged.connect(self.pages.setCurrentIndex)
        self.sidebar.setCurrentRow(0)
        content.addWidget(self.pages, 1)
        body.addLayout(content, 1)
        outer.addLayout(body, 1)
        return workspace

    def _build_status_bar(self) -> None:
        status = self.statusBar()
        assert status is not None
        status.setSizeGripEnabled(False)
        self.conn_icon = QLabel()
        self.conn_label = QLabel("Not connected")
        self.repo_status = QLabel("No repository open")
        self.key_status = QLabel("")
        self.user_status = QLabel("")
        for widget in (self.conn_icon, self.conn_label, _separator(), self.repo_status,
                       _separator(), self.key_status):
            status.addWidget(widget)
        self.task_label = QLabel("")
        self.task_bar = QProgressBar()
        self.task_bar.setFixedWidth(170)
        self.task_bar.setFixedHeight(16)
        self.task_bar.setTextVisible(False)
        self.task_cancel = QToolButton()
        theme.themed(self.task_cancel, "cancel")
        self.task_cancel.setToolTip("Cancel this task")
        self.task_cancel.setAutoRaise(True)
        self.task_cancel.clicked.connect(self._cancel_current)
        for widget in (self.task_label, self.task_bar, self.task_cancel):
            status.addPermanentWidget(widget)
            widget.hide()
        status.addPermanentWidget(self.user_status)
        self._set_connection("off", "Not connected")

    def _build_actions(self) -> None:
        menu = self.menuBar()
        assert menu is not None
        file_menu = menu.addMenu("&File")
        view_menu = menu.addMenu("&View")
        help_menu = menu.addMenu("&Help")
        assert file_menu is not None and view_menu is not None and help_menu is not None

        def action(menu_: Any, text: str, keys: str | QKeySequence.StandardKey | None,
                   slot: Any, icon_name: str = "") -> QAction:
            act = QAction(text, self)
            if icon_name:
                theme.themed(act, icon_name)
            if keys is not None:
                act.setShortcut(QKeySequence(keys))
            act.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
            act.triggered.connect(slot)
            menu_.addAction(act)
            return act

        self.open_query_action = action(file_menu, "Open query image…", "Ctrl+O",
                                        self.open_query, "search")
        self.import_action = action(file_menu, "Import images…", "Ctrl+I",
                                    self.import_files, "import")
        self.pacs_import_action = action(file_menu, "Import from PACS…", "Ctrl+Shift+I",
                                         self.import_from_pacs, "import")
        self.sample_action = action(file_menu, SAMPLE_QUERY, "Ctrl+T", self.try_sample_query,
                                    "search")
        self.sample_action.setEnabled(False)
        file_menu.addSeparator()
        self.settings_action = action(file_menu, "Settings…", "Ctrl+,",
                                      lambda: self.show_page("settings"), "settings")
        file_menu.addSeparator()
        action(file_menu, "Quit", QKeySequence.StandardKey.Quit, self.close)
        for number, (key, label, icon_name) in enumerate(PAGES, start=1):
            page_action = action(view_menu, label, f"Ctrl+{number}",
                                 lambda _=False, k=key: self.show_page(k), icon_name)
            if key == "keywords":  # Ctrl+F, as find is everywhere; Ctrl+N still works
                page_action.setShortcuts([QKeySequence("Ctrl+F"),
                                          QKeySequence(f"Ctrl+{number}")])
                page_action.triggered.connect(self.keyword_page.focus_first)
        action(help_menu, "Keyboard shortcuts", "F1", self._show_shortcuts)
        action(help_menu, "About Radcrypt", None, self._about)
        for act in (self.open_query_action, self.import_action):
            act.setEnabled(False)

    # --- start-up sequence --------------------------------------------------------------------

    def start(self) -> None:
        """Show the gate (identity) or go straight to connecting."""
        if self.demo is None and self.backend.identity_mode:
            self.stack.setCurrentWidget(self.gate)
            self.menuBar().setVisible(False)
            self.statusBar().setVisible(False)

            def checked(exists: bool) -> None:
                self.gate.set_mode(UNLOCK if exists else REGISTER)
                self.gate.focus()

            self.runner.run("Looking for your identity", lambda _: self.backend.identity_exists(),
                            on_done=checked, on_error=self.ctx.error)
        else:
            self._unlocked()

    def _unlocked(self) -> None:
        self.stack.setCurrentWidget(self.workspace)
        self.menuBar().setVisible(True)
        self.statusBar().setVisible(True)
        self.keys_page.refresh_identity()
        if self.backend.identity is not None:
            self.user_label.setText(f"Signed in as {self.backend.user_name}")
            self.user_status.setText(f"User id {self.backend.user_id}")
        elif self.demo is not None:
            self.user_label.setText("Demo: throw-away store and repository")
        else:
            self.user_label.setText("No identity unlocked")
        self.connect()

    def connect(self) -> None:
        if self.connect_task is not None:
            return
        self._set_connection("busy", "Connecting to the storage…")

        def done(where: str) -> None:
            self._update_memory_banner()
            self._set_connection("on", f"Connected · {where}")
            self.ctx.connectionChanged.emit(True, where)
            self.ctx.activity.record("connect", f"Connected to the {where}")
            self.keys_page.set_repository(self.ctx.repo)
            self.runner.run("Starting worker processes", lambda _: self.backend.warm_up(),
                            tracked=False, light=True)
            if self.demo is not None:
                self._prepare_demo()
            else:
                self.refresh_repositories(select=self._last_repository())

        def failed(error: TaskError) -> None:
            self._set_connection("off", "Not connected")
            self.ctx.error(error)

        def finish() -> None:
            self.connect_task = None

        self.connect_task = self.runner.run("Connecting to the storage",
                                            lambda _: self.backend.connect(),
                                            on_done=done, on_error=failed, on_finish=finish)

    def refresh_repositories(self, select: str = "") -> None:
        def done(manifests: list[Manifest]) -> None:
            self.manifests = manifests
            self._fill_combo(select or (self.ctx.repo.repo_id if self.ctx.repo else ""))
            self.ctx.repositoriesListed.emit(manifests)
            if select and self.ctx.repo is None and self.backend.identity_mode:
                self.open_repository(select)
            self.ready.emit()

        self.runner.run("Listing repositories", lambda _: self.backend.list_repositories(),
                        on_done=done, on_error=self.ctx.error)

    def _prepare_demo(self) -> None:
        demo = self.demo
        assert demo is not None
        backend = self.backend

        def work(ctx: TaskContext) -> Repository:
            repo, _files = backend.prepare_demo(demo.workdir, demo.count, ctx.progress,
                                                ctx.cancel)
            return repo

        def done(repo: Repository) -> None:
            self.demo_repo_id, self.demo_workdir = repo.repo_id, demo.workdir
            self.ctx.activity.record("repository", f"Demo repository {repo.repo_id} ready "
                                     "with sample images", repository=repo.repo_id)
            self.ctx.info(f"Demo ready: repository {repo.repo_id} holds an MR brain study "
                          f"and other sample images ({demo.count} files). Press “"
                          f"{SAMPLE_QUERY}” (Ctrl+T), or Search by image (Ctrl+O) with a file "
                          "from the “queries” folder it opens.", "success")
            self.refresh_repositories(select=repo.repo_id)
            self.ctx.set_repository(repo)

        self.archive_page._show_empty("Preparing the demo repository: exporting sample "
                                      "images, then encrypting and importing them…")
        self.demo_task = self.runner.run(
            "Preparing the demo repository", work, on_done=done,
            on_error=self.ctx.error, on_finish=lambda: setattr(self, "demo_task", None))

    def _create_requested(self) -> None:
        self.show_page("keys")
        self.keys_page.open_new_repository()

    def try_demo_images(self) -> None:
        """A demo repository owned by the user, with sample images and query images to
        search with (under the data directory's demo-images folder)."""
        if self.demo_task is not None:
            return
        backend = self.backend
        workdir = backend.settings.data_path / "demo-images"

        def work(ctx: TaskContext) -> Repository:
            repo, _queries = backend.prepare_demo(workdir, TRY_DEMO_IMAGES, ctx.progress,
                                                  ctx.cancel)
            return repo

        def done(repo: Repository) -> None:
            self.ctx.demo_queries = workdir / "queries"
            self.demo_repo_id, self.demo_workdir = repo.repo_id, workdir
            self.ctx.activity.record("repository", f"Demo repository {repo.repo_id} made "
                                     f"with {TRY_DEMO_IMAGES} sample images",
                                     repository=repo.repo_id)
            self.ctx.info(f"Repository {repo.repo_id} holds {TRY_DEMO_IMAGES} sample images. "
                          f"Press “{SAMPLE_QUERY}” (Ctrl+T), or Search by image (Ctrl+O) "
                          "with a file from the “queries” folder it opens.", "success")
            self.refresh_repositories(select=repo.repo_id)
            self.ctx.set_repository(repo)

        def failed(error: TaskError) -> None:
            self.archive_page._show_no_repository()
            self.ctx.error(error)

        self.archive_page._show_empty("Preparing the demo images: exporting sample images, "
                                      "then encrypting and importing them…")
        self.demo_task = self.runner.run(
            "Preparing the demo images", work, on_done=done, on_error=failed,
            on_finish=lambda: setattr(self, "demo_task", None))

    # --- settings ---------------------------------------------------------------------------------

    def apply_settings(self, settings: Any) -> None:
        """Saved settings apply from the next operation on: worker counts at once, a new
        storage or service by reconnecting (after the running work, if any)."""
        if self.runner.running():
            self._pending_settings = settings
            self.ctx.info("Settings saved; they apply when the running work has finished.")
            return
        self._pending_settings = None
        if not self.backend.apply_settings(settings):
            self._update_memory_banner()
            return
        current = self.ctx.repo.repo_id if self.ctx.repo else ""
        self.ctx.set_repository(None)
        self.manifests = []
        self._fill_combo("")
        self._set_connection("busy", "Reconnecting with the new settings…")
        backend = self.backend

        def done(where: str) -> None:
            self._update_memory_banner()
            self._set_connection("on", f"Connected · {where}")
            self.ctx.connectionChanged.emit(True, where)
            self.ctx.activity.record("connect", f"Reconnected to the {where} (new settings)")
            self.refresh_repositories(select=current)

        def failed(error: TaskError) -> None:
            self._update_memory_banner()
            self._set_connection("off", "Not connected")
            self.ctx.connectionChanged.emit(False, "")
            self.ctx.error(error)

        self.runner.run("Reconnecting with the new settings", lambda _: backend.reconnect(),
                        on_done=done, on_error=failed)

    # --- repositories -----------------------------------------------------------------------------

    def _fill_combo(self, current: str) -> None:
        combo = self.repo_combo
        combo.blockSignals(True)
        combo.clear()
        combo.addItem(CHOOSE, "")
        c = theme.current_colors()
        for m in self.manifests:
            unlocked = self.backend.unlocked(m.repo_id) is not None
            combo.addItem(theme.icon("unlock" if unlocked else "lock",
                                     c.success if unlocked else c.muted), m.repo_id, m.repo_id)
        combo.insertSeparator(combo.count())
        combo.addItem(theme.icon("plus"), NEW, "__new__")
        index = combo.findData(current) if current else 0
        combo.setCurrentIndex(max(0, index))
        combo.blockSignals(False)

    def _repo_chosen(self, index: int) -> None:
        data = self.repo_combo.itemData(index)
        if data == "__new__":
            self._fill_combo(self.ctx.repo.repo_id if self.ctx.repo else "")
            self.show_page("keys")
            self.keys_page.open_new_repository()
            return
        if not data:
            return
        self.open_repository(str(data))

    def open_repository(self, repo_id: str) -> None:
        """Unlock (if needed) and make ``repo_id`` the current repository."""
        cached = self.backend.unlocked(repo_id)
        if cached is not None:
            self.ctx.set_repository(cached)
            return
        backend = self.backend

        def done(repo: Repository) -> None:
            self.ctx.activity.record("repository", f"Opened repository {repo.repo_id} (key "
                                     f"version {repo.keys.version})", repository=repo.repo_id)
            self.ctx.set_repository(repo)

        def failed(error: TaskError) -> None:
            self._fill_combo(self.ctx.repo.repo_id if self.ctx.repo else "")
            if (isinstance(error.exception, AccessDenied) and backend.identity is not None
                    and "unsigned manifest" in str(error.exception)):
                self.offer_migration(repo_id)
                return
            if isinstance(error.exception, AccessDenied):
                text = (f"You have no access to repository {repo_id}. Ask its owner to "
                        "grant it (give them your identity card from the Repository key "
                        "page).")
                self.ctx.error(TaskError(text, error.details, error.exception))
            else:
                self.ctx.error(error)

        self.runner.run(f"Opening repository {repo_id}",
                        lambda _: backend.open_repository(repo_id),
                        on_done=done, on_error=failed)

    def offer_migration(self, repo_id: str) -> None:
        """A repository from before identities: its owner can take it over with its
        password (the password grant is replaced by a grant to this identity)."""
        if not self.ctx.dialogs.confirm(
                self, "Repository locked by a password",
                f"Repository {repo_id} is still locked by a password, from before "
                "identities. If you are its owner, you can move it to your identity: you "
                "will need its password once, and afterwards the password no longer opens "
                "it.", "Move it to my identity"):
            return
        password = self.ctx.dialogs.password(self, "Repository password",
                                             f"Password of repository {repo_id}:")
        if not password:
            return
        backend = self.backend

        def done(repo: Repository) -> None:
            self.ctx.activity.record("repository", f"Moved repository {repo.repo_id} from its "
                                     "password to your identity", repository=repo.repo_id)
            self.ctx.set_repository(repo)

        def failed(error: TaskError) -> None:
            if isinstance(error.exception, AccessDenied):
                error = TaskError(f"Wrong password: repository {repo_id} stays as it was.",
                                  error.details, error.exception)
            self.ctx.error(error)

        self.runner.run(f"Moving repository {repo_id} to your identity",
                        lambda _: backend.migrate_repository(repo_id, password),
                        on_done=done, on_error=failed)

    def _repository_created(self, repo: Repository) -> None:
        self.ctx.set_repository(repo)
        self.refresh_repositories(select=repo.repo_id)

    def _repository_changed(self, repo: Repository | None) -> None:
        self._fill_combo(repo.repo_id if repo else "")
        c = theme.current_colors()
        if repo is None:
            self.repo_status.setText("No repository open")
            self.key_status.setText("")
            self.key_badge.setText("")
            self.lock_label.setPixmap(theme.render_svg("lock", 18, c.muted))
        else:
            self.repo_status.setText(f"Repository {repo.repo_id}")
            self.key_status.setText(f"Key version {repo.keys.version}")
            self.key_badge.setText(f"key version {repo.keys.version}")
            self.lock_label.setPixmap(theme.render_svg("unlock", 18, c.success))
            if self.remember_state:
                QSettings("Radcrypt", "radcrypt").setValue("last_repository", repo.repo_id)
        for act in (self.open_query_action, self.import_action):
            act.setEnabled(repo is not None)
        offer = self.sample_query_offered()
        self.sample_button.setVisible(offer)
        self.sample_action.setEnabled(offer)

    def _last_repository(self) -> str:
        if not self.remember_state:
            return ""
        value = QSettings("Radcrypt", "radcrypt").value("last_repository", "")
        return str(value or "")

    # --- pages and shortcuts --------------------------------------------------------------------

    def show_page(self, key: str) -> None:
        for row in range(self.sidebar.count()):
            item = self.sidebar.item(row)
            if item is not None and item.data(Qt.ItemDataRole.UserRole) == key:
                self.sidebar.setCurrentRow(row)
                return

    def current_page(self) -> str:
        item = self.sidebar.currentItem()
        return str(item.data(Qt.ItemDataRole.UserRole)) if item is not None else ""

    def sample_query_offered(self) -> bool:
        """Only while the demo's own repository is open: the sample queries are copies of
        that repository's images (another repository would answer with strangers)."""
        repo = self.ctx.repo
        return (repo is not None and self.demo_workdir is not None
                and repo.repo_id == self.demo_repo_id)

    def try_sample_query(self) -> None:
        """One click: a perturbed copy of one of the demo's MR slices (another slice and
        perturbation each click: resources.series.sample_query; the demo's query images
        when it holds no series) searches the demo repository, the result on the Search page."""
        workdir = self.demo_workdir
        if not self.sample_query_offered() or workdir is None:
            self.ctx.info("No sample query here: open the demo repository first.")
            return
        number = self.sample_queries_tried
        self.sample_queries_tried += 1
        queries = self.ctx.demo_queries

        def make(_: TaskContext) -> Path | None:
            # Decoded here, not in a decoder child: the demo's own slices, written by
            # resources.series, not a file from outside (as make_demo_queries does).
            from resources.series import sample_query

            made = sample_query(workdir, number)
            if made is not None:
                return made[0]
            files = sorted(queries.glob("*")) if queries is not None and queries.is_dir() else []
            return files[number % len(files)] if files else None

        def done(query: Path | None) -> None:
            if query is None:
                self.ctx.info("The demo holds no sample query images.")
                return
            stem, _, seed = query.stem.rpartition("-")
            original, _, kind = stem.rpartition("-")
            described = (f"a copy of archived image {original} with "
                         f"{PERTURBATION_WORDS[kind]}"
                         if seed.isdigit() and kind in PERTURBATION_WORDS else "a demo image")
            self.show_page("search")
            self.search_page.set_query(str(query))
            self.ctx.info(f"Sample query {query.name}: {described}. The encrypted search "
                          "looks for its nearest image.")

        self.runner.run("Making a sample query", make, on_done=done, on_error=self.ctx.error,
                        light=True)

    def find_similar(self, meta: Any) -> None:
        """"Find similar" on an archived image: the Search page searches with its stored
        features (no local file)."""
        self.show_page("search")
        self.search_page.find_similar(meta)

    def search_with_filter(self, terms: list[str]) -> None:
        """"Use as image-search filter" on the keyword page: Search by image with these
        keywords in its filter row (the next search ranks only the matching images)."""
        self.show_page("search")
        self.search_page.set_filter(terms)

    def open_query(self) -> None:
        self.show_page("search")
        self.search_page.choose_query()

    def import_files(self) -> None:
        self.show_page("import")
        self.import_page.choose_files()

    def import_from_pacs(self) -> Any:
        """File › Import from PACS… (issue 18): study search and import, in a dialog."""
        from app.gui.pacs_dialog import open_import_dialog

        self.pacs_dialog = open_import_dialog(self.ctx, self)
        return self.pacs_dialog

    def _show_shortcuts(self) -> None:
        QMessageBox.information(
            self, "Keyboard shortcuts",
            "Ctrl+O  open a query image (Search by image)\n"
            "Ctrl+I  import images · Ctrl+Shift+I  import from PACS\n"
            "Ctrl+,  settings\n"
            "Ctrl+T  try a sample query (the demo repository)\n"
            "Ctrl+1…7  go to a page\n\n"
            "In the image viewer:\n"
            "left-drag  window/level · middle-drag  pan · right-drag  zoom\n"
            "wheel or Up / Down  previous / next image · Ctrl+wheel  zoom\n"
            "z or + / -  zoom · =  fit · r / l  rotate · h / v  flip · i  invert\n"
            "Space  reset · 1-5  CT presets (soft tissue, lung, liver, bone, brain)\n\n"
            "Ctrl+F  search by keyword (fields, labels, study date range)")

    def _about(self) -> None:
        QMessageBox.about(
            self, "About Radcrypt",
            "Radcrypt finds the nearest neighbour of a medical image in an archive that is "
            "kept encrypted in someone else's cloud. Images, features and queries are "
            "encrypted on this workstation; the cloud sees only ciphertext.<br><br>"
            "<b>Intended use.</b> Radcrypt is a retrieval aid: it finds archived images "
            "that look alike. It is not a medical device and not a diagnostic tool; it "
            "makes no finding and no diagnosis, and its similarity words are not clinical "
            "judgements. Diagnosis stays with a qualified clinician using the original "
            "images in a medical-grade viewer.<br><br>"
            "Who decrypted which original or preview is recorded in each repository's "
            "access log, readable by its owners (<tt>radcrypt audit --access</tt>); "
            "the window locks itself when left unused (Settings).")

    # --- messages and status ------------------------------------------------------------------

    def _message(self, level: str, text: str, details: str) -> None:
        self.message_bar.show_message(level, text, details)
        if level in ("success", "info"):
            self._message_timer.start(12_000)
        else:
            self._message_timer.stop()

    def _fade_message(self) -> None:
        if self.message_bar.level in ("success", "info"):
            self.message_bar.dismiss()

    def retheme(self) -> None:
        """Re-tint what is drawn by hand after a light/dark switch."""
        for row, (_key, _label, icon_name) in enumerate(PAGES):
            item = self.sidebar.item(row)
            if item is not None:
                item.setIcon(theme.icon(icon_name))
        self._set_connection(self._conn_state, self.conn_label.text())
        self._repository_changed(self.ctx.repo)

    def _update_memory_banner(self) -> None:
        """The red banner is shown whenever the store keeps nothing, and cannot be closed."""
        self.memory_banner.setVisible(self.backend.memory_store)

    def _set_connection(self, state: str, text: str) -> None:
        self._conn_state = state
        c = theme.current_colors()
        colour = {"on": c.success, "busy": c.warning}.get(state, c.danger)
        self.conn_icon.setPixmap(theme.render_svg(
            {"on": "ok", "busy": "pending"}.get(state, "fail"), 16, colour))
        self.conn_label.setText(text)

    def _task_started(self, task: Task) -> None:
        if task.tracked:
            task.progressed.connect(lambda event, t=task: self._task_progress(t, event))
            self._show_task(task)

    def _task_finished(self, task: Task) -> None:
        running = self.runner.running()
        if running:
            self._show_task(running[-1])
        else:
            for widget in (self.task_label, self.task_bar, self.task_cancel):
                widget.hide()
        if self.closing and self.runner.idle:
            self._finish_shutdown()
        elif self._pending_settings is not None and not running and not self.closing:
            self.apply_settings(self._pending_settings)

    def _show_task(self, task: Task) -> None:
        self._current_task = task
        self.task_label.setText(task.title + "…")
        self.task_label.show()
        self.task_bar.show()
        event = task.last_progress
        if event is not None and event.total:
            self.task_bar.setRange(0, event.total)
            self.task_bar.setValue(event.done)
        else:
            self.task_bar.setRange(0, 0)
        self.task_cancel.setVisible(task.cancellable)

    def _task_progress(self, task: Task, event: object) -> None:
        if getattr(self, "_current_task", None) is not task or not isinstance(
                event, ProgressEvent):
            return
        if event.total:
            self.task_bar.setRange(0, event.total)
            self.task_bar.setValue(event.done)
            self.task_label.setText(f"{task.title}: {event.done} of {event.total}")
        elif event.message:
            self.task_label.setText(event.message + "…")

    def _cancel_current(self) -> None:
        task = getattr(self, "_current_task", None)
        if task is not None:
            task.cancel()

    # --- closing --------------------------------------------------------------------------------

    def closeEvent(self, event: QCloseEvent | None) -> None:
        if event is None:
            return
        if self.shutdown_done:
            event.accept()
            return
        event.ignore()
        if self.closing:
            return
        running = [t.title for t in self.runner.running()]
        if self.settings_page.receive_panel.running:
            running.append("Receiving from PACS")
        if running:
            names = "\n".join(f"• {title}" for title in running[:5])
            if not self.ctx.dialogs.confirm(
                    self, "Quit Radcrypt?",
                    f"Work is still running:\n{names}\n\nStop it and quit? Whatever is "
                    "finished is kept; an import can be resumed later.", "Stop and quit"):
                return
        self.begin_shutdown()

    def begin_shutdown(self) -> None:
        """Cancel every worker, wait for them (without blocking), close the session."""
        self.closing = True
        self.setEnabled(False)
        self.conn_label.setText("Stopping…")
        self.runner.cancel_all()
        QTimer.singleShot(SHUTDOWN_WAIT_MS, self._finish_shutdown)  # a hung worker
        if self.runner.idle:
            self._finish_shutdown()

    def _finish_shutdown(self) -> None:
        if self._shutdown_started:
            return
        self._shutdown_started = True
        demo = self.demo
        backend = self.backend
        receiver = self.settings_page.receive_panel.detach()  # issue 18's Storage SCP

        def work(_: TaskContext) -> None:
            if receiver is not None:
                receiver.stop()
            backend.close()
            if demo is not None and demo.remove_workdir:
                shutil.rmtree(demo.workdir, ignore_errors=True)

        self.conn_label.setText("Stopping the storage and search service…")
        self.runner.run("Closing", work, tracked=False,
                        on_finish=self._closed)

    def _closed(self) -> None:
        self.runner.wait_for_done(5_000)  # threads are only returning from their last signal
        self.shutdown_done = True
        self.shutdownFinished.emit()
        self.close()


PERTURBATION_WORDS = {"noise": "noise added", "window": "another window/level",
                      "shift": "the image shifted", "jpeg": "JPEG re-compression",
                      "rotate": "a 3° rotation"}
"""resources.samples.perturb_file's kinds, in words for the message bar."""


MEMORY_BANNER = ("Nothing is kept: this session uses an in-memory store; everything is lost "
                 "when Radcrypt closes")


def _memory_banner() -> QLabel:
    """A permanent red strip across the window (no close button)."""
    banner = QLabel(MEMORY_BANNER)
    banner.setObjectName("MemoryStoreBanner")
    banner.setWordWrap(True)
    banner.setAlignment(Qt.AlignmentFlag.AlignCenter)
    banner.setStyleSheet("QLabel#MemoryStoreBanner { background: #b3261e; color: #ffffff; "
                         "font-weight: 600; padding: 8px 14px; }")
    banner.setAccessibleName("Warning: " + MEMORY_BANNER)
    banner.setVisible(False)
    return banner


def _separator() -> QLabel:
    label = QLabel("·")
    label.setObjectName("Muted")
    return label
