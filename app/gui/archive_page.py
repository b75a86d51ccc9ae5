"""Archive: a grid of decrypted previews, paged, sorted by import date, loaded lazily.

Loading happens in two background steps: the list of images (ids from the index
segments, then each image's metadata, decrypted here) and, for the visible page only,
the previews (decrypted and composed into square tiles in the worker; the UI thread
only wraps them in pixmaps).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from PyQt6.QtCore import QAbstractListModel, QModelIndex, QRectF, QSize, Qt, pyqtSignal
from PyQt6.QtGui import QColor, QImage, QPainter, QPixmap
from PyQt6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QListView,
    QProgressBar,
    QPushButton,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from app.core.progress import ProgressEvent
from app.core.types import Repository
from app.gui import theme
from app.gui.backend import ArchiveEntry
from app.gui.context import AppContext
from app.gui.tasks import TaskContext, TaskError
from app.gui.widgets import PageHeader, TileDelegate, muted_label, primary, qimage_from_png

PAGE_SIZE = 48
TILE = 128
CACHE_LIMIT = 600
SORTS = ("Newest first", "Oldest first", "Name")


def square_tile(png: bytes, side: int) -> QImage:
    """A preview centred on a black square (worker-safe: QImage and QPainter only)."""
    image = qimage_from_png(png)
    tile = QImage(side, side, QImage.Format.Format_RGB32)
    tile.fill(QColor("#000000"))
    if not image.isNull():
        size = image.size().scaled(side, side, Qt.AspectRatioMode.KeepAspectRatio)
        painter = QPainter(tile)
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
        x = (side - size.width()) / 2
        y = (side - size.height()) / 2
        painter.drawImage(QRectF(x, y, size.width(), size.height()), image)
        painter.end()
    return tile


def import_time(entry: ArchiveEntry) -> datetime:
    """The full import time (microseconds; older archives recorded whole seconds); an
    entry without a readable one sorts as the oldest."""
    try:
        when = datetime.fromisoformat(entry.imported_at)
    except ValueError:
        return _NEVER
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


_NEVER = datetime.min.replace(tzinfo=timezone.utc)


def sort_entries(entries: list[ArchiveEntry], how: str) -> list[ArchiveEntry]:
    by_name = sorted(entries, key=lambda e: (e.name.lower(), e.image_id))
    if how == "Name":
        return by_name
    return sorted(by_name, key=import_time, reverse=how == "Newest first")


class ThumbModel(QAbstractListModel):
    """The current page: entries, and their tiles once loaded."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.entries: list[ArchiveEntry] = []
        self.tiles: OrderedDict[str, QPixmap] = OrderedDict()
        self._placeholder = QPixmap()
        self._dpr = 1.0

    def set_dpr(self, dpr: float) -> None:
        self._dpr = dpr

    def placeholder(self) -> QPixmap:
        if self._placeholder.isNull():
            side = round(TILE * self._dpr)
            pix = QPixmap(side, side)
            pix.fill(QColor("#101316"))
            painter = QPainter(pix)
            icon = theme.render_svg("pending", 28, "#56606b", dpr=self._dpr)
            painter.drawPixmap(round((side - icon.width()) / 2),
                               round((side - icon.height()) / 2), icon)
            painter.end()
            pix.setDevicePixelRatio(self._dpr)
            self._placeholder = pix
        return self._placeholder

    def set_entries(self, entries: list[ArchiveEntry]) -> None:
        self.beginResetModel()
        self.entries = entries
        self.endResetModel()

    def set_tile(self, image_id: str, image: QImage) -> None:
        pix = QPixmap.fromImage(image)
        pix.setDevicePixelRatio(self._dpr)
        self.tiles[image_id] = pix
        self.tiles.move_to_end(image_id)
        while len(self.tiles) > CACHE_LIMIT:
            self.tiles.popitem(last=False)
        for row, entry in enumerate(self.entries):
            if entry.image_id == image_id:
                index = self.index(row)
                self.dataChanged.emit(index, index, [Qt.ItemDataRole.DecorationRole])

    def clear_tiles(self) -> None:
        self.tiles.clear()

    def rowCount(self, parent: QModelIndex | None = None) -> int:
        return 0 if parent is not None and parent.isValid() else len(self.entries)

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= len(self.entries):
            return None
        entry = self.entries[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return entry.name
        if role == Qt.ItemDataRole.DecorationRole:
            return self.tiles.get(entry.image_id) or self.placeholder()
        if role == Qt.ItemDataRole.ToolTipRole:
            return entry.error or entry.describe()
        if role == Qt.ItemDataRole.UserRole:
            return entry
        return None


class ArchivePage(QWidget):
    createRequested = pyqtSignal()  # "Create a repository" in the empty archive
    demoRequested = pyqtSignal()  # "Try the demo images"

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.repo: Repository | None = None
        self.all_entries: list[ArchiveEntry] = []
        self.page = 0
        self._generation = 0
        self._index_task: Any = None
        self._thumb_task: Any = None
        self.loading = False

        layout = QVBoxLayout(self)
        layout.setContentsMargins(20, 16, 20, 16)
        layout.setSpacing(10)
        layout.addWidget(PageHeader(
            "Archive", "Previews of every image in the repository, decrypted on this "
            "workstation. Double-click an image to open the original."))

        bar = QHBoxLayout()
        self.count_label = QLabel("")
        self.count_label.setObjectName("CardTitle")
        self.sort_combo = QComboBox()
        self.sort_combo.addItems(SORTS)
        self.sort_combo.setToolTip("Order of the images (by import date or by file name)")
        self.sort_combo.currentTextChanged.connect(self._resort)
        self.refresh_button = theme.themed(QPushButton("Refresh"), "reset")
        self.refresh_button.clicked.connect(self.reload)
        self.prev_button = QPushButton("‹ Previous")
        self.prev_button.clicked.connect(lambda: self.show_page(self.page - 1))
        self.next_button = QPushButton("Next ›")
        self.next_button.clicked.connect(lambda: self.show_page(self.page + 1))
        self.page_label = QLabel("")
        self.page_label.setMinimumWidth(96)
        self.page_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        bar.addWidget(self.count_label)
        bar.addSpacing(12)
        bar.addWidget(QLabel("Sort:"))
        bar.addWidget(self.sort_combo)
        bar.addStretch(1)
        bar.addWidget(self.refresh_button)
        bar.addSpacing(12)
        bar.addWidget(self.prev_button)
        bar.addWidget(self.page_label)
        bar.addWidget(self.next_button)
        layout.addLayout(bar)

        self.progress = QProgressBar()
        self.progress.setFormat("Reading the archive index: %v of %m")
        self.progress.hide()
        layout.addWidget(self.progress)

        self.stack = QStackedWidget()
        self.empty_panel = QWidget()
        empty_layout = QVBoxLayout(self.empty_panel)
        empty_layout.addStretch(1)
        self.empty = muted_label("")
        self.empty.setAlignment(Qt.AlignmentFlag.AlignCenter)
        empty_layout.addWidget(self.empty)
        self.start_buttons = QWidget()  # the first steps, while there is no repository
        start_row = QHBoxLayout(self.start_buttons)
        start_row.setContentsMargins(0, 8, 0, 0)
        start_row.addStretch(1)
        self.create_button = primary(QPushButton(theme.icon("plus", "#ffffff"),
                                                 "Create a repository"))
        self.create_button.setToolTip("A new, empty repository with its own key, owned by "
                                      "your identity")
        self.create_button.clicked.connect(self.createRequested)
        self.demo_button = theme.themed(QPushButton("Try the demo images"), "import")
        self.demo_button.setToolTip("A repository named demo-… with sample images (pydicom's "
                                    "test files), and query images to search with")
        self.demo_button.clicked.connect(self.demoRequested)
        start_row.addWidget(self.create_button)
        start_row.addWidget(self.demo_button)
        start_row.addStretch(1)
        empty_layout.addWidget(self.start_buttons)
        empty_layout.addStretch(2)
        self.start_buttons.hide()
        self.model = ThumbModel(self)
        self.model.set_dpr(max(1.0, self.devicePixelRatioF()))
        self.view = QListView()
        self.view.setViewMode(QListView.ViewMode.IconMode)
        self.view.setResizeMode(QListView.ResizeMode.Adjust)
        self.view.setMovement(QListView.Movement.Static)
        self.view.setUniformItemSizes(True)
        self.view.setIconSize(QSize(TILE, TILE))
        self.view.setGridSize(QSize(TILE + 28, TILE + 34))
        self.view.setSpacing(4)
        self.view.setWordWrap(False)
        self.view.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.view.setSelectionMode(QListView.SelectionMode.SingleSelection)
        self.view.setModel(self.model)
        self.view.setItemDelegate(TileDelegate(self.view))  # framed, never tinted
        self.view.doubleClicked.connect(self._open)
        self.view.activated.connect(self._open)
        self.stack.addWidget(self.empty_panel)
        self.stack.addWidget(self.view)
        layout.addWidget(self.stack, 1)

        self.repository_count: int | None = None  # listed in the store, once known
        ctx.repositoryChanged.connect(self.set_repository)
        ctx.archiveChanged.connect(self._archive_changed)
        ctx.repositoriesListed.connect(self._repositories_listed)
        ctx.connectionChanged.connect(lambda *_: self._show_no_repository())
        self._show_no_repository()
        self._update_controls()

    # --- loading -----------------------------------------------------------------------

    def set_repository(self, repo: Repository | None) -> None:
        self._generation += 1
        self._cancel_tasks()
        self.repo = repo
        self.all_entries = []
        self.page = 0
        self.model.set_entries([])
        self.model.clear_tiles()
        if repo is None:
            self._show_no_repository()
        else:
            self.reload()
        self._update_controls()

    def _repositories_listed(self, manifests: list[Any]) -> None:
        self.repository_count = len(manifests)
        self._show_no_repository()

    def _show_no_repository(self) -> None:
        """No repository open: after the first login (an empty store) the first steps are
        offered right here, a new repository or the demo images."""
        if self.repo is not None or (self._index_task is not None):
            return
        backend = self.ctx.backend
        can_create = (backend.identity_mode and backend.identity is not None
                      and backend.connected)
        if not backend.connected:
            text = "No repository is open yet: connecting to the storage…"
        elif not can_create:
            text = "No repository is open. Choose one at the top."
        elif self.repository_count == 0:
            text = ("Welcome. This storage holds no repository yet: create one for your "
                    "images, or try Radcrypt first with its demo images.")
        else:
            text = ("No repository is open. Choose one at the top, create one, or try the "
                    "demo images.")
        self.show_start(text, create=can_create, demo=can_create)

    def reload(self) -> None:
        if self.repo is None:
            return
        self._load(incremental=False)

    def _archive_changed(self, repo_id: str) -> None:
        if self.repo is not None and self.repo.repo_id == repo_id:
            self._load(incremental=True)

    def _load(self, incremental: bool) -> None:
        repo = self.repo
        assert repo is not None
        if self._index_task is not None:
            self._index_task.cancel()
        generation = self._generation
        known = {e.image_id: e for e in self.all_entries} if incremental else {}
        backend = self.ctx.backend

        def work(ctx: TaskContext) -> list[ArchiveEntry]:
            ids = backend.archive_ids(repo)
            ctx.progress(ProgressEvent("ids", 0, len(ids)))
            missing = [i for i in ids if i not in known]
            new = backend.archive_entries(repo, missing, ctx.progress, ctx.cancel)
            return [known[i] for i in ids if i in known] + new

        self.loading = True
        if not incremental or not self.all_entries:
            self.progress.setRange(0, 0)
            self.progress.show()
            self._show_empty("Reading the archive…")
        self._index_task = self.ctx.runner.run(
            "Reading the archive", work, cancellable=True, tracked=False,
            on_progress=lambda e: self._index_progress(generation, e),
            on_done=lambda entries: self._index_done(generation, entries),
            on_error=lambda err: self._index_failed(generation, err),
            on_finish=lambda: self._index_finished(generation))
        self._update_controls()

    def _index_progress(self, generation: int, event: ProgressEvent) -> None:
        if generation != self._generation or not isinstance(event, ProgressEvent):
            return
        if event.stage == "ids":
            self.count_label.setText(_count_text(event.total))
        if event.total:
            self.progress.setRange(0, event.total)
            self.progress.setValue(event.done)

    def _index_done(self, generation: int, entries: list[ArchiveEntry]) -> None:
        if generation != self._generation:
            return
        self.all_entries = entries
        self._resort()

    def _index_failed(self, generation: int, error: TaskError) -> None:
        if generation != self._generation:
            return
        self._show_empty("The archive could not be read. " + error.message)
        self.ctx.error(error)

    def _index_finished(self, generation: int) -> None:
        if generation != self._generation:
            return
        self.loading = False
        self._index_task = None
        self.progress.hide()
        self._update_controls()

    # --- paging and sorting ---------------------------------------------------------------

    @property
    def pages(self) -> int:
        return max(1, math.ceil(len(self.all_entries) / PAGE_SIZE))

    def _resort(self, *_: object) -> None:
        self.all_entries = sort_entries(self.all_entries, self.sort_combo.currentText())
        self.show_page(min(self.page, self.pages - 1))

    def show_page(self, page: int) -> None:
        self.page = max(0, min(page, self.pages - 1))
        start = self.page * PAGE_SIZE
        entries = self.all_entries[start : start + PAGE_SIZE]
        self.model.set_entries(entries)
        self.view.scrollToTop()
        self.count_label.setText(_count_text(len(self.all_entries)))
        if self.repo is not None and not self.all_entries and not self.loading:
            self._show_empty("This repository has no images yet. Import some on the "
                             "Import page (Ctrl+I).")
        elif entries:
            self.stack.setCurrentWidget(self.view)
        self._update_controls()
        self._load_tiles(entries)

    def _load_tiles(self, entries: list[ArchiveEntry]) -> None:
        if self._thumb_task is not None:
            self._thumb_task.cancel()
        repo = self.repo
        wanted = [e for e in entries if e.image_id not in self.model.tiles and not e.error]
        if repo is None or not wanted:
            return
        generation = self._generation
        side = round(TILE * max(1.0, self.devicePixelRatioF()))
        backend = self.ctx.backend

        def work(ctx: TaskContext) -> int:
            def one(entry: ArchiveEntry) -> None:
                if ctx.cancel.cancelled:
                    return
                png = backend.thumbnail_png(repo, entry.image_id, entry.key_version or None)
                ctx.progress((entry.image_id, square_tile(png, side)))

            with ThreadPoolExecutor(4, thread_name_prefix="radcrypt-thumbs") as pool:
                list(pool.map(one, wanted))
            return len(wanted)

        self._thumb_task = self.ctx.runner.run(
            "Loading previews", work, cancellable=True, tracked=False,
            light=True, on_progress=lambda item: self._tile(generation, item),
            on_error=lambda err: self._tiles_failed(generation, err))

    def _tile(self, generation: int, item: tuple[str, QImage]) -> None:
        if generation == self._generation:
            self.model.set_tile(*item)

    def _tiles_failed(self, generation: int, error: TaskError) -> None:
        if generation == self._generation:
            self.ctx.error(error)

    def _cancel_tasks(self) -> None:
        for task in (self._index_task, self._thumb_task):
            if task is not None:
                task.cancel()
        self._index_task = self._thumb_task = None
        self.loading = False
        self.progress.hide()

    # --- helpers -------------------------------------------------------------------------

    def _show_empty(self, text: str) -> None:
        self.empty.setText(text)
        self.start_buttons.hide()
        self.stack.setCurrentWidget(self.empty_panel)

    def show_start(self, text: str, create: bool, demo: bool) -> None:
        """The empty archive with first steps: create a repository, try the demo."""
        self._show_empty(text)
        self.create_button.setVisible(create)
        self.demo_button.setVisible(demo)
        self.start_buttons.setVisible(create or demo)

    def _update_controls(self) -> None:
        has = bool(self.all_entries)
        self.prev_button.setEnabled(has and self.page > 0)
        self.next_button.setEnabled(has and self.page < self.pages - 1)
        self.page_label.setText(f"Page {self.page + 1} of {self.pages}" if has else "")
        self.refresh_button.setEnabled(self.repo is not None and not self.loading)
        self.sort_combo.setEnabled(has)
        if self.repo is None:
            self.count_label.setText("")

    def _open(self, index: QModelIndex) -> None:
        entry = index.data(Qt.ItemDataRole.UserRole)
        if isinstance(entry, ArchiveEntry) and self.repo is not None:
            from app.gui.viewer import open_archived

            open_archived(self.ctx, self, self.repo, entry.image_id, entry.name,
                          entry.key_version or None)

    def visible_tiles(self) -> int:
        return sum(1 for e in self.model.entries if e.image_id in self.model.tiles)


def _count_text(n: int) -> str:
    return "1 image" if n == 1 else f"{n} images"
