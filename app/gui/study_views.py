"""The study list, the image tile grid, the date range and the preview loading that the
archive and the keyword page both show: one build, so the two pages look and behave alike."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PyQt6.QtCore import QAbstractItemModel, QDate, QRectF, QSize, Qt
from PyQt6.QtGui import QColor, QImage, QPainter
from PyQt6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDateEdit,
    QHeaderView,
    QListView,
    QTableView,
)

from app.core.types import Repository
from app.gui.tasks import Task, TaskContext, TaskError
from app.gui.widgets import TileDelegate, qimage_from_png

STUDY_WIDTHS = (190, 110, 100, 80, 0, 60, 70)
"""Column widths of the study list (0: the stretched description)."""


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


def study_table(model: QAbstractItemModel, *, sort_column: int, stretch_column: int,
                tooltip: str, min_height: int) -> QTableView:
    """A read-only, sortable, one-row-selection study table, newest first."""
    table = QTableView()
    table.setModel(model)
    table.setSortingEnabled(True)
    table.sortByColumn(sort_column, Qt.SortOrder.DescendingOrder)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setAlternatingRowColors(True)
    table.setWordWrap(False)
    table.setMinimumHeight(min_height)
    table.setToolTip(tooltip)
    vertical = table.verticalHeader()
    if vertical is not None:
        vertical.hide()
        vertical.setDefaultSectionSize(26)
    header = table.horizontalHeader()
    if header is not None:
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(False)
        header.setSectionResizeMode(stretch_column, QHeaderView.ResizeMode.Stretch)
        for column, width in enumerate(STUDY_WIDTHS):
            if width:
                table.setColumnWidth(column, width)
    return table


def tile_view(model: QAbstractItemModel, tile: int,
              selection: QAbstractItemView.SelectionMode) -> QListView:
    """An icon grid of framed square previews (``TileDelegate``), names elided mid-way."""
    view = QListView()
    view.setViewMode(QListView.ViewMode.IconMode)
    view.setResizeMode(QListView.ResizeMode.Adjust)
    view.setMovement(QListView.Movement.Static)
    view.setUniformItemSizes(True)
    view.setIconSize(QSize(tile, tile))
    view.setGridSize(QSize(tile + 28, tile + 34))
    view.setSpacing(4)
    view.setWordWrap(False)
    view.setTextElideMode(Qt.TextElideMode.ElideMiddle)
    view.setSelectionMode(selection)
    view.setModel(model)
    view.setItemDelegate(TileDelegate(view))  # framed, never tinted
    return view


def date_range(tooltip: str, changed: Callable[..., Any]
               ) -> tuple[QCheckBox, QDateEdit, QDateEdit]:
    """"Study date from [..] to [..]": the switch and the two days (the last year by
    default); ``changed`` runs on any change of the three."""
    check = QCheckBox("Study date from")
    check.setToolTip(tooltip)
    check.toggled.connect(changed)
    today = QDate.currentDate()
    date_from = QDateEdit(today.addYears(-1))
    date_to = QDateEdit(today)
    for edit in (date_from, date_to):
        edit.setCalendarPopup(True)
        edit.setDisplayFormat("yyyy-MM-dd")
        edit.dateChanged.connect(changed)
    return check, date_from, date_to


def fetch_tiles(ctx: Any, repo: Repository | None, wanted: Sequence[Any], side: int, *,
                thread_prefix: str, arrived: Callable[[tuple[str, QImage]], None],
                failed: Callable[[TaskError], None]) -> Task | None:
    """Decrypt the previews of ``wanted`` (archive entries: ``image_id``, ``key_version``,
    ``clinical``) in a light, cancellable, untracked task, recorded as ONE access-log entry
    naming them all (Backend.archive_previews); each ``(image_id, tile)`` goes to ``arrived`` as it
    is ready. ``ctx`` is the page's AppContext (backend and runner); None when nothing is
    wanted. ``thread_prefix``: kept for the callers; the facade's pool decrypts now."""
    if repo is None or not wanted:
        return None
    backend = ctx.backend

    def work(task: TaskContext) -> int:
        def one(image_id: str, png: bytes) -> None:
            if not task.cancel.cancelled:
                task.progress((image_id, square_tile(png, side)))

        return len(backend.archive_previews(repo, list(wanted), arrived=one,
                                            cancel=task.cancel))

    task: Task = ctx.runner.run(
        "Loading previews", work, cancellable=True, tracked=False, light=True,
        on_progress=arrived, on_error=failed)
    return task
