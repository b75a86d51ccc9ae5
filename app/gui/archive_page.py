"""Archive: the study list a radiologist expects, then a series strip, then the images.

Three levels, as PACS viewers show them (DESIGN.md §9): a sortable, filterable table of
studies (patient, date, modality, description, series and image counts), the selected
study's series as a strip with one preview each, and below them a grid of previews: the
selected series' images in stack order, the study's images, or, with no study chosen, every
image (of the studies the filter leaves), paged and sorted by import date or name. Images
without DICOM study and series UIDs (PNG, JPEG, TIFF) are studies of their own.

The grouping happens here, on the workstation, after decryption (app/core/studies.py): the
cloud never sees which images belong together. Loading happens in background steps: the
list of images (ids, then each image's metadata, decrypted and grouped in the worker) and,
for what is visible only, the previews (decrypted and composed into square tiles in the
worker; the UI thread only wraps them in pixmaps).

Deletion (issue 16): "Delete…" (button, and the image, series and study context menus)
erases an image (its whole file), a series, a study or a patient through the facade
(``Client.erasure_plan``, then ``Client.erase``): the plan is listed off the UI thread and
confirmed in app/gui/erase_dialog.py. Owners and co-owners only; a legal hold (the signed
manifest's) shows as a banner and disables it, each with the reason in words.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from PyQt6.QtCore import (
    QAbstractListModel,
    QAbstractTableModel,
    QModelIndex,
    QPoint,
    QSize,
    QSortFilterProxyModel,
    Qt,
    pyqtSignal,
)
from PyQt6.QtGui import QColor, QIcon, QImage, QPainter, QPixmap
from PyQt6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListView,
    QListWidgetItem,
    QMenu,
    QProgressBar,
    QPushButton,
    QSplitter,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from app.core.errors import AccessDenied
from app.core.meta import ImageMeta
from app.core.progress import ProgressEvent
from app.core.studies import (
    LONE_PREFIX,
    Series,
    Study,
    instance_label,
    series_key,
    study_key,
)
from app.core.studies import date_display as dicom_date
from app.core.studies import patient_display as patient_text
from app.core.types import Repository
from app.gui import theme
from app.gui.backend import ArchiveEntry
from app.gui.context import AppContext
from app.gui.erase_dialog import EraseDialog, erase_block_reason
from app.gui.send_dialog import add_send_actions
from app.gui.study_views import date_range, fetch_tiles, study_table, tile_view
from app.gui.study_views import square_tile as square_tile  # where the other pages import it
from app.gui.tasks import TaskContext, TaskError
from app.gui.widgets import (
    PageHeader,
    muted_label,
    primary,
    set_prop,
    tile_strip,
)

PAGE_SIZE = 48
TILE = 128
SERIES_TILE = 96
CACHE_LIMIT = 600
SORTS = ("Newest first", "Oldest first", "Name")
ALL_MODALITIES = "All modalities"
STUDY_COLUMNS = ("Patient", "Patient ID", "Study date", "Modality", "Description", "Series",
                 "Images")
"""The study list's columns, in the order PACS worklists show them."""
SORT_ROLE = Qt.ItemDataRole.UserRole + 1
DATE_COLUMN = STUDY_COLUMNS.index("Study date")


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
            # A DICOM file's name is often a UID: the instance (and frame) says more.
            return image_caption(entry) or entry.name
        if role == Qt.ItemDataRole.DecorationRole:
            return self.tiles.get(entry.image_id) or self.placeholder()
        if role == Qt.ItemDataRole.ToolTipRole:
            caption = image_caption(entry)
            return entry.error or "\n".join(t for t in (caption, entry.describe()) if t)
        if role == Qt.ItemDataRole.UserRole:
            return entry
        return None


# --- the study list, Qt-free rules -----------------------------------------------------------


def study_matches(study: Study, text: str = "", modality: str = "", date_from: str = "",
                  date_to: str = "") -> bool:
    """Whether the study list's filter keeps ``study``: every word of ``text`` in the
    patient, id, accession, descriptions or modalities (case-insensitive); ``modality``
    among its series' modalities; the study date within [date_from, date_to] (YYYYMMDD,
    either may be ""; an undated study fails an active range)."""
    if modality and modality not in study.modalities:
        return False
    if date_from or date_to:
        date = study.study_date
        if not date or (date_from and date < date_from) or (date_to and date > date_to):
            return False
    words = text.lower().split()
    if words:
        haystack = " ".join([
            study.patient_name, patient_text(study.patient_name), study.patient_id,
            study.accession, study.description, *study.modalities,
            *(s.description for s in study.series)]).lower()
        return all(w in haystack for w in words)
    return True


def study_cells(study: Study) -> tuple[str, ...]:
    """The study list's row for ``study`` (STUDY_COLUMNS)."""
    return (patient_text(study.patient_name) or "—", study.patient_id,
            dicom_date(study.study_date), "/".join(study.modalities),
            study.description, str(len(study.series)), str(study.image_count))


def study_sort_key(study: Study, column: int) -> Any:
    """What a column sorts by: dates with their time, counts as numbers, text ignoring case."""
    if column == DATE_COLUMN:
        return study.study_date + study.study_time
    if column == STUDY_COLUMNS.index("Series"):
        return len(study.series)
    if column == STUDY_COLUMNS.index("Images"):
        return study.image_count
    return study_cells(study)[column].lower()


def series_caption(series: Series) -> str:
    """The strip's two lines: "#3 T1 axial" and "MR · 24 images" (the description may be
    elided; the count never is)."""
    first = " ".join(t for t in (f"#{series.number}" if series.number else "",
                                 series.description) if t)
    count = len(series.images)
    second = " · ".join(t for t in (series.modality,
                                    f"{count} image{'s' if count != 1 else ''}") if t)
    return f"{first or 'Series'}\n{second}"


def image_caption(meta: ImageMeta) -> str:
    """Which instance and frame an image is: "Instance 12, frame 3/10" ("" when unknown;
    the same words as the CLI, app/core/studies.py ``instance_label``)."""
    label = instance_label(meta)
    return label[:1].upper() + label[1:]


# --- the study list, Qt models ----------------------------------------------------------------


class StudyModel(QAbstractTableModel):
    """One row per study; ``SORT_ROLE`` gives each column's sort key."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.studies: list[Study] = []

    def set_studies(self, studies: list[Study]) -> None:
        self.beginResetModel()
        self.studies = list(studies)
        self.endResetModel()

    def rowCount(self, parent: QModelIndex | None = None) -> int:
        return 0 if parent is not None and parent.isValid() else len(self.studies)

    def columnCount(self, parent: QModelIndex | None = None) -> int:
        return 0 if parent is not None and parent.isValid() else len(STUDY_COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation,
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return STUDY_COLUMNS[section]
        return None

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= len(self.studies):
            return None
        study = self.studies[index.row()]
        column = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            return study_cells(study)[column]
        if role == SORT_ROLE:
            return study_sort_key(study, column)
        if role == Qt.ItemDataRole.UserRole:
            return study
        if role == Qt.ItemDataRole.ToolTipRole:
            lines = [patient_text(study.patient_name) or "No patient name",
                     f"Study date: {dicom_date(study.study_date) or 'unknown'}"]
            if study.accession:
                lines.append(f"Accession: {study.accession}")
            if study.key.startswith(LONE_PREFIX):
                lines.append("An image without DICOM study and series identifiers")
            return "\n".join(lines)
        if role == Qt.ItemDataRole.TextAlignmentRole and column >= STUDY_COLUMNS.index("Series"):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None


class StudyFilter(QSortFilterProxyModel):
    """The filter bar's text, modality and date range over the study list."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.text = ""
        self.modality = ""
        self.date_from = ""
        self.date_to = ""
        self.setSortRole(SORT_ROLE)

    def set_filter(self, text: str, modality: str, date_from: str, date_to: str) -> None:
        self.text, self.modality = text, modality
        self.date_from, self.date_to = date_from, date_to
        self.invalidateFilter()

    @property
    def active(self) -> bool:
        return bool(self.text.strip() or self.modality or self.date_from or self.date_to)

    def filterAcceptsRow(self, source_row: int, source_parent: QModelIndex) -> bool:
        model = self.sourceModel()
        if not isinstance(model, StudyModel) or source_row >= len(model.studies):
            return False
        return study_matches(model.studies[source_row], self.text, self.modality,
                             self.date_from, self.date_to)

    def lessThan(self, left: QModelIndex, right: QModelIndex) -> bool:
        a, b = left.data(SORT_ROLE), right.data(SORT_ROLE)
        if type(a) is not type(b):
            return str(a) < str(b)
        return bool(a < b)

    def visible_studies(self) -> list[Study]:
        return [self.index(row, 0).data(Qt.ItemDataRole.UserRole)
                for row in range(self.rowCount())]


class ArchivePage(QWidget):
    createRequested = pyqtSignal()  # "Create a repository" in the empty archive
    demoRequested = pyqtSignal()  # "Try the demo images"
    findSimilarRequested = pyqtSignal(object)  # ImageMeta: search with its stored features

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.repo: Repository | None = None
        self.all_entries: list[ArchiveEntry] = []
        self.studies: list[Study] = []
        self.series_by_key: dict[str, Series] = {}
        self.current_study: Study | None = None
        self.current_series: Series | None = None
        self.scope: list[ArchiveEntry] = []  # what the image grid pages through
        self.page = 0
        self._generation = 0
        self._index_task: Any = None
        self._thumb_task: Any = None
        self._series_task: Any = None
        self.loading = False
        self.legal_hold = False  # the signed manifest's, refreshed from the store
        self.erasing = False  # from the listing until the deletion ends (or is declined)
        self._erase_running = False
        self.erase_dialog: EraseDialog | None = None
        self.last_erasure: Any = None  # the ErasureReport of the last deletion

        layout = QVBoxLayout(self)
        layout.setContentsMargins(20, 16, 20, 16)
        layout.setSpacing(10)
        layout.addWidget(PageHeader(
            "Archive", "Studies, series and images of the repository, decrypted and grouped "
            "on this workstation. Double-click a series or an image to open it."))

        bar = QHBoxLayout()
        self.count_label = QLabel("")
        self.count_label.setObjectName("CardTitle")
        self.sort_label = QLabel("Sort:")
        self.sort_combo = QComboBox()
        self.sort_combo.addItems(SORTS)
        self.sort_combo.setToolTip("Order of the images when no study is chosen (by import "
                                   "date or by file name); a study's or series' images "
                                   "are in stack order")
        self.sort_combo.currentTextChanged.connect(self._resort)
        self.similar_button = theme.themed(QPushButton("Find similar"), "search")
        self.similar_button.setToolTip("Search the archive with the selected image's own "
                                       "encrypted features (no file needed)")
        self.similar_button.clicked.connect(self.find_similar_selected)
        self.send_button = theme.themed(QPushButton("Send to…"), "connect")
        self.send_button.setToolTip("Send the selected image or study to a PACS or viewer "
                                    "(decrypted); export its study as FHIR")
        self.send_menu = QMenu(self.send_button)
        self.send_menu.aboutToShow.connect(self._fill_send_menu)
        self.send_button.setMenu(self.send_menu)
        self.delete_button = theme.themed(QPushButton("Delete…"), "clear")
        set_prop(self.delete_button, "danger", True)
        self.delete_menu = QMenu(self.delete_button)
        self.delete_menu.setToolTipsVisible(True)
        self.delete_menu.aboutToShow.connect(self._fill_delete_menu)
        self.delete_button.setMenu(self.delete_menu)
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
        bar.addWidget(self.sort_label)
        bar.addWidget(self.sort_combo)
        bar.addStretch(1)
        bar.addWidget(self.similar_button)
        bar.addWidget(self.send_button)
        bar.addWidget(self.delete_button)
        bar.addWidget(self.refresh_button)
        bar.addSpacing(12)
        bar.addWidget(self.prev_button)
        bar.addWidget(self.page_label)
        bar.addWidget(self.next_button)
        layout.addLayout(bar)

        self.hold_banner = QLabel(
            "Legal hold: nothing in this repository can be deleted until an owner lifts the "
            "hold on the Repository key page.")
        self.hold_banner.setObjectName("HoldBanner")
        self.hold_banner.setWordWrap(True)
        self.hold_banner.hide()
        self._style_banner()
        theme.on_change(self._style_banner)
        layout.addWidget(self.hold_banner)

        self.progress = QProgressBar()
        self.progress.setFormat("Reading the archive index: %v of %m")
        self.progress.hide()
        layout.addWidget(self.progress)

        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.setChildrenCollapsible(False)
        self.splitter.addWidget(self._build_study_list())
        self.splitter.addWidget(self._build_series_strip())

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
        self.view = tile_view(self.model, TILE, QListView.SelectionMode.SingleSelection)
        self.view.doubleClicked.connect(self._open)
        self.view.activated.connect(self._open)
        self.view.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.view.customContextMenuRequested.connect(self._image_menu)
        selection = self.view.selectionModel()
        assert selection is not None
        selection.currentChanged.connect(lambda *_: self._update_controls())
        self.stack.addWidget(self.empty_panel)
        self.stack.addWidget(self.view)
        self.stack.currentChanged.connect(lambda *_: self._update_sections())
        self.splitter.addWidget(self.stack)
        self.splitter.setStretchFactor(0, 2)
        self.splitter.setStretchFactor(1, 0)
        self.splitter.setStretchFactor(2, 5)
        self.splitter.setSizes([200, SERIES_TILE + 96, 600])  # scaled to the page
        layout.addWidget(self.splitter, 1)

        self.repository_count: int | None = None  # listed in the store, once known
        ctx.repositoryChanged.connect(self.set_repository)
        ctx.archiveChanged.connect(self._archive_changed)
        ctx.repositoriesListed.connect(self._repositories_listed)
        ctx.connectionChanged.connect(lambda *_: self._show_no_repository())
        self._show_no_repository()
        self._update_sections()
        self._update_controls()

    # --- building -------------------------------------------------------------------------

    def _build_study_list(self) -> QWidget:
        self.study_section = QWidget()
        box = QVBoxLayout(self.study_section)
        box.setContentsMargins(0, 0, 0, 0)
        box.setSpacing(6)
        filters = QHBoxLayout()
        filters.setSpacing(8)
        self.studies_label = QLabel("Studies")
        self.studies_label.setObjectName("CardTitle")
        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText("Filter: patient, ID, accession, description…")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.setMinimumWidth(220)
        self.filter_edit.textChanged.connect(self._filter_changed)
        self.modality_combo = QComboBox()
        self.modality_combo.addItem(ALL_MODALITIES)
        self.modality_combo.setToolTip("Only studies with a series of this modality")
        self.modality_combo.currentTextChanged.connect(self._filter_changed)
        self.date_check, self.date_from, self.date_to = date_range(
            "Only studies dated within this range (undated ones are left out while it is "
            "on)", self._filter_changed)
        self.clear_filter_button = QPushButton("Clear filter")
        self.clear_filter_button.clicked.connect(self.clear_filter)
        filters.addWidget(self.studies_label)
        filters.addSpacing(8)
        filters.addWidget(self.filter_edit, 2)
        filters.addWidget(self.modality_combo)
        filters.addWidget(self.date_check)
        filters.addWidget(self.date_from)
        filters.addWidget(QLabel("to"))
        filters.addWidget(self.date_to)
        filters.addWidget(self.clear_filter_button)
        box.addLayout(filters)

        self.study_model = StudyModel(self)
        self.study_filter = StudyFilter(self)
        self.study_filter.setSourceModel(self.study_model)
        self.table = study_table(
            self.study_filter, sort_column=DATE_COLUMN,
            stretch_column=STUDY_COLUMNS.index("Description"), min_height=120,
            tooltip="Click a study for its series; double-click to open its largest series")
        table_selection = self.table.selectionModel()
        assert table_selection is not None
        table_selection.currentRowChanged.connect(lambda *_: self._study_chosen())
        self.table.doubleClicked.connect(lambda *_: self.open_study(self.current_study))
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.table.customContextMenuRequested.connect(self._study_menu)
        box.addWidget(self.table, 1)
        return self.study_section

    def _build_series_strip(self) -> QWidget:
        self.series_section = QWidget()
        box = QVBoxLayout(self.series_section)
        box.setContentsMargins(0, 0, 0, 0)
        box.setSpacing(4)
        row = QHBoxLayout()
        self.series_label = QLabel("Series")
        self.series_label.setObjectName("CardTitle")
        self.all_images_button = QPushButton("All images of the study")
        self.all_images_button.setToolTip("Show every image of the study below, not only "
                                          "the chosen series'")
        self.all_images_button.clicked.connect(lambda: self.choose_series(None))
        self.open_series_button = QPushButton("Open series")
        self.open_series_button.setToolTip("The series as a stack: the wheel and Up/Down "
                                           "scroll through its images")
        self.open_series_button.clicked.connect(lambda: self.open_series(self.current_series))
        row.addWidget(self.series_label, 1)
        row.addWidget(self.all_images_button)
        row.addWidget(self.open_series_button)
        box.addLayout(row)
        self.series_strip = tile_strip(SERIES_TILE, QSize(SERIES_TILE + 84, SERIES_TILE + 52),
                                       SERIES_TILE + 62)
        self.series_strip.currentRowChanged.connect(self._series_row_chosen)
        self.series_strip.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.series_strip.customContextMenuRequested.connect(self._series_menu)
        self.series_strip.itemDoubleClicked.connect(
            lambda item: self.open_series(item.data(Qt.ItemDataRole.UserRole)))
        box.addWidget(self.series_strip)
        return self.series_section

    # --- loading -----------------------------------------------------------------------

    def set_repository(self, repo: Repository | None) -> None:
        if repo is not None and self._same_archive(repo):
            self.repo = repo  # a new manifest (legal hold set or lifted): same images
            self._hold_known(repo, bool(repo.manifest.legal_hold))
            return
        self._generation += 1
        self._cancel_tasks()
        self.repo = repo
        self.all_entries = []
        self.page = 0
        self.model.set_entries([])
        self.model.clear_tiles()
        self.set_studies([])
        self.legal_hold = bool(repo is not None and repo.manifest.legal_hold)
        if repo is None:
            self._show_no_repository()
        else:
            self.reload()
            self.refresh_legal_hold()
        self._update_controls()

    def _same_archive(self, repo: Repository) -> bool:
        """Whether ``repo`` is the one shown with its manifest republished for a legal
        hold (set or lifted): the same repository, key version and storage format, so the
        same images; anything else (choosing the repository again included) reloads."""
        old = self.repo
        backend = self.ctx.backend
        return (old is not None and old.repo_id == repo.repo_id
                and old.keys.version == repo.keys.version
                and bool(old.manifest.legal_hold) != bool(repo.manifest.legal_hold)
                and backend.storage_format(old) == backend.storage_format(repo))

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

        def work(ctx: TaskContext) -> tuple[list[ArchiveEntry], list[Study]]:
            ids = backend.archive_ids(repo)
            ctx.progress(ProgressEvent("ids", 0, len(ids)))
            missing = [i for i in ids if i not in known]
            new = backend.archive_entries(repo, missing, ctx.progress, ctx.cancel)
            entries = [known[i] for i in ids if i in known] + new
            return entries, backend.studies(entries)

        self.loading = True
        if not incremental or not self.all_entries:
            self.progress.setRange(0, 0)
            self.progress.show()
            self._show_empty("Reading the archive…")
        self._index_task = self.ctx.runner.run(
            "Reading the archive", work, cancellable=True, tracked=False,
            on_progress=lambda e: self._index_progress(generation, e),
            on_done=lambda result: self._index_done(generation, *result),
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

    def _index_done(self, generation: int, entries: list[ArchiveEntry],
                    studies: list[Study] | None = None) -> None:
        if generation != self._generation:
            return
        self.all_entries = entries
        if studies is None:
            studies = self.ctx.backend.studies(entries)
        self.set_studies(studies)

    def set_studies(self, studies: list[Study]) -> None:
        """Show ``studies`` (grouped from ``all_entries``), keeping the chosen study and
        series where they still exist."""
        keep_study = self.current_study.key if self.current_study else ""
        keep_series = self.current_series.key if self.current_series else ""
        self.studies = list(studies)
        self.series_by_key = {s.key: s for study in studies for s in study.series}
        modalities = sorted({m for s in studies for m in s.modalities})
        chosen = self.modality_combo.currentText()
        self.modality_combo.blockSignals(True)
        self.modality_combo.clear()
        self.modality_combo.addItems([ALL_MODALITIES, *modalities])
        self.modality_combo.setCurrentText(chosen if chosen in modalities else ALL_MODALITIES)
        self.modality_combo.blockSignals(False)
        self.current_study = self.current_series = None
        self.study_model.set_studies(self.studies)
        self.study_filter.set_filter(*self._filter_values())
        if keep_study:
            self.choose_study(keep_study, keep_series)
        else:
            self._refresh_scope()
        self._update_sections()

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

    # --- studies, filter and series ----------------------------------------------------------

    def _filter_values(self) -> tuple[str, str, str, str]:
        modality = self.modality_combo.currentText()
        dated = self.date_check.isChecked()
        return (self.filter_edit.text(), "" if modality == ALL_MODALITIES else modality,
                self.date_from.date().toString("yyyyMMdd") if dated else "",
                self.date_to.date().toString("yyyyMMdd") if dated else "")

    def _filter_changed(self, *_: object) -> None:
        self.date_from.setEnabled(self.date_check.isChecked())
        self.date_to.setEnabled(self.date_check.isChecked())
        self.study_filter.set_filter(*self._filter_values())
        if self.current_study is not None and self.current_study not in self.visible_studies():
            self.choose_study(None)
        else:
            self._refresh_scope()

    def clear_filter(self) -> None:
        for widget in (self.filter_edit, self.modality_combo, self.date_check):
            widget.blockSignals(True)
        self.filter_edit.clear()
        self.modality_combo.setCurrentText(ALL_MODALITIES)
        self.date_check.setChecked(False)
        for widget in (self.filter_edit, self.modality_combo, self.date_check):
            widget.blockSignals(False)
        self._filter_changed()

    def visible_studies(self) -> list[Study]:
        """The study list's rows as shown: filtered and sorted."""
        return self.study_filter.visible_studies()

    def sort_studies(self, column: int, descending: bool = False) -> None:
        self.table.sortByColumn(column, Qt.SortOrder.DescendingOrder if descending
                                else Qt.SortOrder.AscendingOrder)

    def choose_study(self, key: str | None, series: str = "") -> None:
        """Select a study by key (None: no study, every image below)."""
        table_selection = self.table.selectionModel()
        assert table_selection is not None
        if key is not None:
            for row in range(self.study_filter.rowCount()):
                index = self.study_filter.index(row, 0)
                study = index.data(Qt.ItemDataRole.UserRole)
                if study is not None and study.key == key:
                    self.table.selectRow(row)
                    self.table.scrollTo(index)
                    if self.current_study is None or self.current_study.key != key:
                        self._study_chosen()
                    if series:
                        self.choose_series(series)
                    return
        table_selection.clearSelection()
        table_selection.setCurrentIndex(QModelIndex(),
                                        table_selection.SelectionFlag.NoUpdate)
        self._set_study(None)

    def _study_chosen(self) -> None:
        index = self.table.currentIndex()
        study = index.data(Qt.ItemDataRole.UserRole) if index.isValid() else None
        self._set_study(study if isinstance(study, Study) else None)

    def _set_study(self, study: Study | None) -> None:
        if study is self.current_study and study is not None:
            return
        self.current_study = study
        self.current_series = None
        self.series_strip.blockSignals(True)
        self.series_strip.clear()
        if study is not None:
            for series in study.series:
                item = QListWidgetItem(QIcon(self._tile_or_placeholder(series.thumbnail)),
                                       series_caption(series))
                item.setData(Qt.ItemDataRole.UserRole, series)
                item.setToolTip(f"{series.description or 'Series'}: "
                                f"{len(series.images)} images. Double-click to open the "
                                "series as a stack.")
                self.series_strip.addItem(item)
            who = patient_text(study.patient_name) or study.description or "this study"
            when = dicom_date(study.study_date)
            self.series_label.setText(f"Series of {who}" + (f" · {when}" if when else ""))
        self.series_strip.setCurrentRow(-1)
        self.series_strip.blockSignals(False)
        self._load_series_tiles()
        self._refresh_scope()
        self._update_sections()

    def _series_row_chosen(self, row: int) -> None:
        item = self.series_strip.item(row) if row >= 0 else None
        series = item.data(Qt.ItemDataRole.UserRole) if item is not None else None
        self.current_series = series if isinstance(series, Series) else None
        self._refresh_scope()

    def choose_series(self, key: str | None) -> None:
        """Narrow the images to one series of the chosen study (None: the whole study)."""
        for row in range(self.series_strip.count()):
            item = self.series_strip.item(row)
            if key is not None and item is not None \
                    and item.data(Qt.ItemDataRole.UserRole).key == key:
                self.series_strip.setCurrentRow(row)
                return
        self.series_strip.setCurrentRow(-1)
        self.series_strip.clearSelection()
        self.current_series = None
        self._refresh_scope()

    def _refresh_scope(self) -> None:
        """What the image grid shows: the series, the study, or every image (of the
        studies the filter leaves)."""
        if self.current_series is not None:
            self.scope = list(self.current_series.images)
        elif self.current_study is not None:
            self.scope = list(self.current_study.images)
        elif self.study_filter.active:
            self.scope = sort_entries([m for s in self.visible_studies() for m in s.images],
                                      self.sort_combo.currentText())
        else:
            self.scope = sort_entries(self.all_entries, self.sort_combo.currentText())
        self.page = 0
        self.show_page(0)

    # --- paging and sorting ---------------------------------------------------------------

    @property
    def pages(self) -> int:
        return max(1, math.ceil(len(self.scope) / PAGE_SIZE))

    def _resort(self, *_: object) -> None:
        if self.current_study is None:
            page = self.page
            self._refresh_scope()
            self.show_page(min(page, self.pages - 1))

    def show_page(self, page: int) -> None:
        self.page = max(0, min(page, self.pages - 1))
        start = self.page * PAGE_SIZE
        entries = self.scope[start : start + PAGE_SIZE]
        self.model.set_entries(entries)
        self.view.scrollToTop()
        self.count_label.setText(self._count_words())
        if self.repo is not None and not self.all_entries and not self.loading:
            self._show_empty("This repository has no images yet. Import some on the "
                             "Import page (Ctrl+I).")
        elif entries or self.all_entries:
            self.stack.setCurrentWidget(self.view)
        self._update_controls()
        self._load_tiles(entries)

    def _count_words(self) -> str:
        if self.current_series is not None:
            return f"{_count_text(len(self.scope))} in this series"
        if self.current_study is not None:
            return f"{_count_text(len(self.scope))} in this study"
        if self.study_filter.active:
            n = len(self.visible_studies())
            return f"{_count_text(len(self.scope))} in {n} stud{'y' if n == 1 else 'ies'}"
        return _count_text(len(self.all_entries))

    def _load_tiles(self, entries: list[ArchiveEntry]) -> None:
        if self._thumb_task is not None:
            self._thumb_task.cancel()
        wanted = [e for e in entries if e.image_id not in self.model.tiles and not e.error]
        self._thumb_task = self._fetch_tiles(wanted, TILE, self._tile)

    def _load_series_tiles(self) -> None:
        if self._series_task is not None:
            self._series_task.cancel()
        study = self.current_study
        wanted = [s.thumbnail for s in study.series] if study is not None else []
        wanted = [m for m in wanted if m.image_id not in self.model.tiles and not m.error]
        self._series_task = self._fetch_tiles(wanted, TILE, self._series_tile)

    def _fetch_tiles(self, wanted: Sequence[ArchiveEntry], tile: int, arrived: Any) -> Any:
        generation = self._generation
        return fetch_tiles(
            self.ctx, self.repo, wanted, round(tile * max(1.0, self.devicePixelRatioF())),
            thread_prefix="radcrypt-thumbs", arrived=lambda item: arrived(generation, item),
            failed=lambda err: self._tiles_failed(generation, err))

    def _tile(self, generation: int, item: tuple[str, QImage]) -> None:
        if generation == self._generation:
            self.model.set_tile(*item)

    def _series_tile(self, generation: int, item: tuple[str, QImage]) -> None:
        if generation != self._generation:
            return
        self.model.set_tile(*item)
        image_id = item[0]
        for row in range(self.series_strip.count()):
            strip_item = self.series_strip.item(row)
            series = strip_item.data(Qt.ItemDataRole.UserRole) if strip_item else None
            if isinstance(series, Series) and series.thumbnail.image_id == image_id:
                assert strip_item is not None
                strip_item.setIcon(QIcon(self.model.tiles[image_id]))

    def _tile_or_placeholder(self, meta: ImageMeta) -> QPixmap:
        return self.model.tiles.get(meta.image_id) or self.model.placeholder()

    def _tiles_failed(self, generation: int, error: TaskError) -> None:
        if generation == self._generation:
            self.ctx.error(error)

    def _cancel_tasks(self) -> None:
        for task in (self._index_task, self._thumb_task, self._series_task):
            if task is not None:
                task.cancel()
        self._index_task = self._thumb_task = self._series_task = None
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

    def _update_sections(self) -> None:
        """The study list and series strip show while the archive (not a message) does."""
        browsing = self.stack.currentWidget() is self.view and bool(self.studies)
        self.study_section.setVisible(browsing)
        self.series_section.setVisible(browsing and self.current_study is not None)
        n = len(self.studies)
        self.studies_label.setText(f"{n} stud{'y' if n == 1 else 'ies'}")

    def _update_controls(self) -> None:
        has = bool(self.scope)
        self.prev_button.setEnabled(has and self.page > 0)
        self.next_button.setEnabled(has and self.page < self.pages - 1)
        self.page_label.setText(f"Page {self.page + 1} of {self.pages}" if has else "")
        self.refresh_button.setEnabled(self.repo is not None and not self.loading)
        global_scope = self.current_study is None
        self.sort_combo.setEnabled(has and global_scope)
        self.sort_combo.setVisible(global_scope)
        self.sort_label.setVisible(global_scope)
        self.similar_button.setEnabled(self.selected_entry() is not None)
        self.send_button.setEnabled(self.repo is not None and (
            self.selected_entry() is not None or self.current_study is not None))
        reason = self.erase_block_reason()
        chosen = (self.selected_entry() is not None or self.current_series is not None
                  or self.current_study is not None)
        self.delete_button.setEnabled(not reason and chosen)
        self.delete_button.setToolTip(
            reason or ("Delete the selected image, its series, study or patient from the "
                       "repository (owners; asks first)" if chosen else
                       "Select an image, a series or a study to delete"))
        self.open_series_button.setEnabled(self.current_series is not None)
        self.all_images_button.setEnabled(self.current_series is not None)
        if self.repo is None:
            self.count_label.setText("")

    def selected_entry(self) -> ArchiveEntry | None:
        entry = self.view.currentIndex().data(Qt.ItemDataRole.UserRole)
        return entry if isinstance(entry, ImageMeta) and not entry.error else None

    def series_of(self, entry: ArchiveEntry) -> Series | None:
        return self.series_by_key.get(series_key(entry))

    def _open(self, index: QModelIndex) -> None:
        """An image of a series opens as the series' stack at that image; a lone image
        (or a frame of a multi-frame file) alone (as the stack of its frames)."""
        entry = index.data(Qt.ItemDataRole.UserRole)
        if not isinstance(entry, ImageMeta) or self.repo is None:
            return
        series = self.series_of(entry)
        if series is not None and len(series.images) > 1:
            self.open_series(series, series.image_ids.index(entry.image_id))
            return
        from app.gui.viewer import open_archived

        frames = [m for m in self.all_entries
                  if m.original_image_id == entry.original_image_id and not m.error]
        viewer = open_archived(self.ctx, self, self.repo, entry.image_id, entry.name,
                               entry.key_version or None, meta=entry, frames=frames)
        viewer.findSimilarRequested.connect(self.findSimilarRequested)

    def open_series(self, series: Series | None, index: int | None = None) -> Any:
        """The series as a stack (slices decrypted on demand), at ``index`` or the middle."""
        if series is None or self.repo is None:
            return None
        from app.gui.viewer import open_stack
        from app.gui.viewer_model import LazyStack

        title = series_caption(series).replace("\n", " · ")
        viewer = open_stack(self.ctx, self, self.repo, LazyStack.of_metas(series.images),
                            title, index, metas=series.images)
        viewer.findSimilarRequested.connect(self.findSimilarRequested)
        return viewer

    def open_study(self, study: Study | None) -> Any:
        """A worklist's double-click: the study's largest series as a stack (the first of
        equal ones, in series-number order)."""
        if study is None or not study.series:
            return None
        return self.open_series(max(study.series, key=lambda s: len(s.images)))

    def find_similar_selected(self) -> None:
        entry = self.selected_entry()
        if entry is not None:
            self.findSimilarRequested.emit(entry)

    def _image_menu(self, point: QPoint) -> None:
        index = self.view.indexAt(point)
        entry = index.data(Qt.ItemDataRole.UserRole) if index.isValid() else None
        if not isinstance(entry, ImageMeta) or entry.error:
            return
        self.view.setCurrentIndex(index)
        menu = QMenu(self)
        menu.addAction("Open", lambda: self._open(index))
        series = self.series_of(entry)
        if series is not None and len(series.images) > 1:
            menu.addAction(f"Open the series ({len(series.images)} images)",
                           lambda: self.open_series(series,
                                                    series.image_ids.index(entry.image_id)))
        menu.addAction("Find similar", lambda: self.findSimilarRequested.emit(entry))
        menu.addSeparator()
        add_send_actions(menu, self.ctx, self, self.repo, entry, self.study_of(entry))
        menu.addSeparator()
        self._add_delete_actions(menu, entry, self.study_of(entry))
        viewport = self.view.viewport()
        menu.popup(viewport.mapToGlobal(point) if viewport is not None else point)

    def visible_tiles(self) -> int:
        return sum(1 for e in self.model.entries if e.image_id in self.model.tiles)

    # --- erasure and legal hold (issue 16; app/core/erasure.py through the client) ------

    def study_of(self, entry: ArchiveEntry) -> Study | None:
        key = study_key(entry)
        return next((s for s in self.studies if s.key == key), None)

    def erase_block_reason(self) -> str:
        """Why nothing can be deleted now ("" when the user may): owners only, format 2,
        no legal hold, one deletion at a time."""
        repo, backend = self.repo, self.ctx.backend
        return erase_block_reason(
            repo_open=repo is not None and backend.client is not None,
            owner=repo is not None and backend.client is not None and backend.is_owner(repo),
            storage_format=backend.storage_format(repo) if repo is not None else 2,
            legal_hold=self.legal_hold, busy=self.erasing)

    @staticmethod
    def erase_targets(entry: ArchiveEntry | None, study: Study | None
                      ) -> list[tuple[str, str, str]]:
        """(kind, value, words) for the "Delete…" entries of an image and its study: the
        image (its whole file), its series, its study, its patient (by PatientID, else
        PatientName; none for images without either)."""
        targets = []
        if entry is not None and not entry.error:
            label = image_caption(entry)
            targets.append(("image", entry.image_id,
                            f"image {entry.name}" + (f" ({label})" if label else "")))
            if not series_key(entry).startswith(LONE_PREFIX):
                series = entry.attribute("SeriesDescription") or "without description"
                targets.append(("series", series_key(entry), f"series {series}"))
        if study is not None and not study.key.startswith(LONE_PREFIX):
            when = dicom_date(study.study_date)
            words = " ".join(t for t in (study.description or "without description",
                                         f"of {when}" if when else "") if t)
            targets.append(("study", study.key, f"study {words}"))
        if study is not None and (study.patient_id or study.patient_name):
            who = patient_text(study.patient_name) or study.patient_id
            ident = f" ({study.patient_id})" if study.patient_id and who != study.patient_id \
                else ""
            targets.append(("patient", study.patient_id or study.patient_name,
                            f"every image of patient {who}{ident}"))
        return targets

    def _add_delete_actions(self, menu: QMenu, entry: ArchiveEntry | None,
                            study: Study | None) -> None:
        reason = self.erase_block_reason()
        menu.setToolTipsVisible(True)
        for kind, value, words in self.erase_targets(entry, study):
            action = menu.addAction(f"Delete {words}…")
            assert action is not None
            action.setEnabled(not reason)
            action.setToolTip(reason or f"Delete {words} from the repository (asks first)")
            action.triggered.connect(
                lambda _=False, k=kind, v=value, w=words: self.request_erasure(k, v, w))

    def _fill_delete_menu(self) -> None:
        """The "Delete…" button's menu: the selected image, else the chosen series and
        study."""
        self.delete_menu.clear()
        entry = self.selected_entry()
        study = self.study_of(entry) if entry is not None else self.current_study
        if entry is None and self.current_series is not None and self.current_series.images:
            entry = None
            series = self.current_series
            reason = self.erase_block_reason()
            if not series.key.startswith(LONE_PREFIX):
                words = f"series {series.description or 'without description'}"
                action = self.delete_menu.addAction(f"Delete {words}…")
                assert action is not None
                action.setEnabled(not reason)
                action.setToolTip(reason)
                action.triggered.connect(
                    lambda _=False: self.request_erasure("series", series.key, words))
        self._add_delete_actions(self.delete_menu, entry, study)
        if self.delete_menu.isEmpty():
            action = self.delete_menu.addAction("Select an image, a series or a study first")
            assert action is not None
            action.setEnabled(False)

    def _fill_send_menu(self) -> None:
        """Issue 18: "Send to…" for the selected image, else the chosen study."""
        self.send_menu.clear()
        entry = self.selected_entry()
        study = self.study_of(entry) if entry is not None else self.current_study
        if not add_send_actions(self.send_menu, self.ctx, self, self.repo, entry, study):
            action = self.send_menu.addAction("Select an image or a study first")
            assert action is not None
            action.setEnabled(False)

    def _study_menu(self, point: QPoint) -> None:
        index = self.table.indexAt(point)
        study = index.data(Qt.ItemDataRole.UserRole) if index.isValid() else None
        if not isinstance(study, Study):
            return
        menu = QMenu(self)
        menu.addAction("Open the largest series", lambda: self.open_study(study))
        menu.addSeparator()
        add_send_actions(menu, self.ctx, self, self.repo, None, study)
        menu.addSeparator()
        self._add_delete_actions(menu, None, study)
        viewport = self.table.viewport()
        menu.popup(viewport.mapToGlobal(point) if viewport is not None else point)

    def _series_menu(self, point: QPoint) -> None:
        item = self.series_strip.itemAt(point)
        series = item.data(Qt.ItemDataRole.UserRole) if item is not None else None
        if not isinstance(series, Series) or not series.images:
            return
        menu = QMenu(self)
        menu.addAction("Open series", lambda: self.open_series(series))
        menu.addSeparator()
        first = series.images[0]
        targets = [t for t in self.erase_targets(first, None) if t[0] == "series"]
        reason = self.erase_block_reason()
        menu.setToolTipsVisible(True)
        for kind, value, words in targets:
            action = menu.addAction(f"Delete {words}…")
            assert action is not None
            action.setEnabled(not reason)
            action.setToolTip(reason)
            action.triggered.connect(
                lambda _=False, k=kind, v=value, w=words: self.request_erasure(k, v, w))
        viewport = self.series_strip.viewport()
        menu.popup(viewport.mapToGlobal(point) if viewport is not None else point)

    def refresh_legal_hold(self) -> None:
        """Read the legal hold from the manifest as stored now (another owner may have
        set it since this repository was opened), off the UI thread."""
        repo, client = self.repo, self.ctx.backend.client
        if repo is None or client is None or self.ctx.backend.storage_format(repo) < 2:
            return
        self.ctx.runner.run("Reading the legal hold", lambda _: client.legal_hold(repo),
                            tracked=False, light=True,
                            on_done=lambda on: self._hold_known(repo, bool(on)),
                            on_error=lambda _err: None)  # the manifest's value stays

    def _hold_known(self, repo: Repository, on: bool) -> None:
        if self.repo is None or repo.repo_id != self.repo.repo_id:
            return
        self.legal_hold = on
        self.hold_banner.setVisible(on)
        self._update_controls()

    def _style_banner(self) -> None:
        colour = theme.current_colors().warning
        self.hold_banner.setStyleSheet(
            f"QLabel#HoldBanner {{ border: 1px solid {colour}; border-radius: 4px; "
            f"padding: 6px 10px; color: {colour}; font-weight: 600; }}")

    def request_erasure(self, kind: str, value: str, words: str) -> None:
        """List what deleting ``kind`` ``value`` removes (whole files: every frame), off
        the UI thread with progress, then ask in an EraseDialog."""
        reason = self.erase_block_reason()
        repo, client = self.repo, self.ctx.backend.client
        if reason or repo is None or client is None:
            self.ctx.message.emit("warning", reason or "Open a repository first.", "")
            return
        self.erasing = True
        self._update_controls()
        self.progress.setFormat("Listing what will be deleted: %v of %m images read")
        self.progress.setRange(0, 0)
        self.progress.show()

        def work(task: TaskContext) -> Any:
            return client.erasure_plan(repo, progress=task.progress, **{kind: value})

        self.ctx.runner.run(f"Listing what deleting the {kind} removes", work,
                            on_progress=self._erase_progress,
                            on_done=lambda plan: self._plan_ready(repo, plan, words),
                            on_error=self._erase_failed,
                            on_finish=self._erase_step_finished)

    def _erase_progress(self, event: Any) -> None:
        if isinstance(event, ProgressEvent) and event.total:
            self.progress.setRange(0, event.total)
            self.progress.setValue(event.done)

    def _erase_step_finished(self) -> None:
        if self.erase_dialog is None:  # the dialog (when shown) ends the step
            self.erasing = False
        self.progress.hide()
        self.progress.setFormat("Reading the archive index: %v of %m")
        self._update_controls()

    def _plan_ready(self, repo: Repository, plan: Any, words: str) -> None:
        if self.repo is None or repo.repo_id != self.repo.repo_id:
            return
        if not plan.images:
            self.ctx.info(f"Nothing to delete: {words} has no image in {repo.repo_id}.")
            return
        dialog = EraseDialog(plan, words, self)
        self.erase_dialog = dialog
        dialog.accepted.connect(lambda: self._erase(repo, plan, words))
        dialog.finished.connect(self._dialog_closed)
        dialog.open()

    def _dialog_closed(self, _result: int) -> None:
        self.erase_dialog = None
        if not self._erase_running:
            self.erasing = False
            self._update_controls()

    def _erase(self, repo: Repository, plan: Any, words: str = "") -> None:
        """Delete the confirmed plan off the UI thread; the archive reloads after."""
        client = self.ctx.backend.client
        if client is None:
            return
        self._erase_running = True
        self.erasing = True
        count = len(plan.images)
        self.progress.setFormat(f"Deleting {_count_text(count)}: rewriting packs and index")
        self.progress.setRange(0, 0)
        self.progress.show()

        def done(report: Any) -> None:
            self.last_erasure = report
            text = (f"Deleted {_count_text(count)} ({words or plan.target.kind}) from "
                    f"{repo.repo_id}: no search finds them again.")
            self.ctx.activity.record("repository", text, "\n".join(report.lines()),
                                     repository=repo.repo_id)
            self.ctx.info(text, "success")
            self.ctx.archiveChanged.emit(repo.repo_id)

        def finish() -> None:
            self._erase_running = False
            self.erasing = False
            self.progress.hide()
            self.progress.setFormat("Reading the archive index: %v of %m")
            self._update_controls()

        def work(task: TaskContext) -> Any:
            try:
                return client.erase(repo, plan, task.progress)
            except AccessDenied:
                if client.legal_hold(repo):  # set after the plan was confirmed
                    raise HeldRepository(HOLD_REFUSAL) from None
                raise

        self.ctx.runner.run(f"Deleting {_count_text(count)} from {repo.repo_id}", work,
                            on_progress=self._erase_progress, on_done=done,
                            on_error=self._erase_failed, on_finish=finish)
        self._update_controls()

    def _erase_failed(self, error: TaskError) -> None:
        if isinstance(error.exception, HeldRepository):
            if self.repo is not None:
                self._hold_known(self.repo, True)
            error = TaskError(HOLD_REFUSAL, error.details, error.exception)
        self.ctx.error(error)


HOLD_REFUSAL = ("Nothing was deleted: this repository is under legal hold. An owner must lift "
                "the hold on the Repository key page first.")


class HeldRepository(AccessDenied):
    """The core refused an erasure and the repository is under legal hold now (the
    front ends may not import app.core.erasure's LegalHold: .importlinter)."""


def _count_text(n: int) -> str:
    return "1 image" if n == 1 else f"{n} images"
