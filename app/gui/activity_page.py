"""Activity: what this workstation did (imports, searches, key changes, errors), newest
first, with the details of the selected line below."""

from __future__ import annotations

from typing import Any

from PyQt6.QtCore import QAbstractTableModel, QModelIndex, QObject, Qt, pyqtSignal
from PyQt6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPlainTextEdit,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.gui import theme
from app.gui.activity import ActivityEntry
from app.gui.context import AppContext
from app.gui.widgets import PageHeader, left_headers

FILTERS = {"Everything": None, "Imports": ("import",), "Searches": ("search",),
           "Keys and access": ("repository", "access"), "Connections": ("connect", "settings"),
           "Errors": ("error",)}
_ICONS = {"import": "import", "search": "search", "repository": "key", "access": "user",
          "connect": "connect", "settings": "settings", "error": "warning"}
_WORDS = {"import": "Import", "search": "Search", "repository": "Repository",
          "access": "Access", "connect": "Connection", "settings": "Settings",
          "error": "Error"}


class _Bridge(QObject):
    added = pyqtSignal(object)


class ActivityModel(QAbstractTableModel):
    HEADERS = ("Time", "What", "Description")

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.entries: list[ActivityEntry] = []

    def set_entries(self, entries: list[ActivityEntry]) -> None:
        self.beginResetModel()
        self.entries = entries
        self.endResetModel()

    def prepend(self, entry: ActivityEntry) -> None:
        self.beginInsertRows(QModelIndex(), 0, 0)
        self.entries.insert(0, entry)
        self.endInsertRows()

    def rowCount(self, parent: QModelIndex | None = None) -> int:
        return 0 if parent is not None and parent.isValid() else len(self.entries)

    def columnCount(self, parent: QModelIndex | None = None) -> int:
        return 3

    def headerData(self, section: int, orientation: Qt.Orientation,
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return self.HEADERS[section]
        return None

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        entry = self.entries[index.row()]
        col = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            if col == 0:
                return entry.time.replace("T", " ")[:19]
            if col == 1:
                return _WORDS.get(entry.kind, entry.kind.title())
            return entry.text
        if role == Qt.ItemDataRole.DecorationRole and col == 1:
            c = theme.current_colors()
            return theme.icon(_ICONS.get(entry.kind, "info"),
                              c.danger if entry.is_error else None)
        if role == Qt.ItemDataRole.ToolTipRole and col == 2:
            return entry.text
        if role == Qt.ItemDataRole.UserRole:
            return entry
        return None


class ActivityPage(QWidget):
    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        layout = QVBoxLayout(self)
        layout.setContentsMargins(20, 16, 20, 16)
        layout.setSpacing(10)
        layout.addWidget(PageHeader(
            "Activity", "What this workstation did, newest first. Kept in the data folder; "
            "it names files and repositories, never image content or keys."))
        row = QHBoxLayout()
        row.addWidget(QLabel("Show:"))
        self.filter = QComboBox()
        self.filter.addItems(list(FILTERS))
        self.filter.currentTextChanged.connect(self.refresh)
        row.addWidget(self.filter)
        row.addStretch(1)
        self.count = QLabel("")
        self.count.setObjectName("Muted")
        row.addWidget(self.count)
        layout.addLayout(row)

        self.model = ActivityModel(self)
        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.setAlternatingRowColors(True)
        self.table.setShowGrid(False)
        self.table.setWordWrap(False)
        self.table.setSelectionBehavior(QTableView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        left_headers(self.table)
        self.table.verticalHeader().setDefaultSectionSize(26)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.table.selectionModel().currentRowChanged.connect(self._show_details)
        self.details = QPlainTextEdit()
        self.details.setReadOnly(True)
        self.details.setObjectName("MessageDetails")
        self.details.setPlaceholderText("Select a line to see its details.")
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.table)
        splitter.addWidget(self.details)
        splitter.setStretchFactor(0, 4)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([420, 110])
        layout.addWidget(splitter, 1)

        self._bridge = _Bridge(self)
        self._bridge.added.connect(self._added)
        ctx.activity.add_listener(self._bridge.added.emit)  # any thread -> UI thread
        self.refresh()

    def _kinds(self) -> tuple[str, ...] | None:
        return FILTERS.get(self.filter.currentText())

    def refresh(self, *_: object) -> None:
        kinds = self._kinds()
        entries = [e for e in self.ctx.activity.entries() if kinds is None or e.kind in kinds]
        self.model.set_entries(entries)
        self._count()

    def _added(self, entry: ActivityEntry) -> None:
        kinds = self._kinds()
        if kinds is None or entry.kind in kinds:
            self.model.prepend(entry)
            self._count()

    def _count(self) -> None:
        n = len(self.model.entries)
        self.count.setText("1 event" if n == 1 else f"{n} events")

    def _show_details(self, current: QModelIndex, _previous: QModelIndex) -> None:
        entry = current.data(Qt.ItemDataRole.UserRole) if current.isValid() else None
        if isinstance(entry, ActivityEntry):
            lines = [entry.text]
            if entry.repository:
                lines.append(f"Repository: {entry.repository}")
            lines.append(f"Time: {entry.time}")
            if entry.details:
                lines += ["", entry.details]
            self.details.setPlainText("\n".join(lines))
        else:
            self.details.clear()
