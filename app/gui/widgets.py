"""Small widgets shared by the pages: header, message bar, drop area, image panel."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PyQt6.QtCore import (
    QModelIndex,
    QPersistentModelIndex,
    QRect,
    QRectF,
    QSize,
    Qt,
    QUrl,
    pyqtSignal,
)
from PyQt6.QtGui import (
    QColor,
    QDragEnterEvent,
    QDropEvent,
    QIcon,
    QImage,
    QPainter,
    QPaintEvent,
    QPixmap,
)
from PyQt6.QtWidgets import (
    QAbstractItemView,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListView,
    QListWidget,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QTableWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.gui import theme

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", "")


# --- images -------------------------------------------------------------------------------


def qimage_from_array(pixels: np.ndarray) -> QImage:
    """uint8 (H, W) grey or (H, W, 3) RGB to a QImage that owns its memory."""
    data = np.ascontiguousarray(pixels)
    h, w = data.shape[:2]
    if data.ndim == 2:
        image = QImage(data.data, w, h, data.strides[0], QImage.Format.Format_Grayscale8)
    else:
        image = QImage(data.data, w, h, data.strides[0], QImage.Format.Format_RGB888)
    return image.copy()  # detach from the numpy buffer


def qimage_from_png(data: bytes) -> QImage:
    """Decode PNG bytes (safe in a worker thread: QImage, not QPixmap)."""
    image = QImage()
    image.loadFromData(data, "PNG")
    return image


SUBTITLE_ROLE = Qt.ItemDataRole.UserRole + 7
"""A tile's muted line under its caption ("3 more from this series"), kept apart from the
caption (DisplayRole) so the caption stays the word a test or a screen reader reads."""


class TileDelegate(QStyledItemDelegate):
    """Image tiles in a list view (archive grid, nearest-images strip): each preview in a
    frame, drawn exactly as decrypted. Qt's own icon drawing tints a selected icon with
    the highlight colour, which would colour a grey-scale image; here the selection is
    shown by the frame (thicker, in the primary colour) and the tile's pixels are left
    alone."""

    FRAME = 1
    SELECTED_FRAME = 3

    def paint(self, painter: QPainter | None, option: QStyleOptionViewItem,
              index: QModelIndex | QPersistentModelIndex) -> None:
        if painter is None:
            return
        c = theme.current_colors()
        selected = bool(option.state & QStyle.StateFlag.State_Selected)
        hovered = bool(option.state & QStyle.StateFlag.State_MouseOver)
        side = option.decorationSize
        cell = option.rect
        painter.save()
        if selected or hovered:
            painter.fillRect(cell, QColor(c.accent_soft if selected else c.hover))
        tile = QRect(cell.left() + (cell.width() - side.width()) // 2, cell.top() + 6,
                     side.width(), side.height())
        width = self.SELECTED_FRAME if selected else self.FRAME
        # the frame lies around the tile, never on its pixels
        painter.fillRect(tile.adjusted(-width, -width, width, width),
                         QColor(c.primary if selected else c.border_strong))
        painter.fillRect(tile, QColor("#000000"))
        pixmap = _tile_pixmap(index.data(Qt.ItemDataRole.DecorationRole), side)
        if pixmap is not None:
            painter.drawPixmap(tile, pixmap)
        metrics = option.fontMetrics
        # Line one in the text colour; further lines (a series' image count, "3 more from
        # this series") muted, each elided on its own.
        for n, line in enumerate(_tile_lines(index)):
            painter.setPen(QColor(c.text if n == 0 else c.muted))
            area = QRect(cell.left() + 2, tile.bottom() + 7 + n * metrics.height(),
                         cell.width() - 4, metrics.height())
            painter.drawText(area, Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop,
                             metrics.elidedText(line, Qt.TextElideMode.ElideMiddle,
                                                area.width()))
        painter.restore()

    def sizeHint(self, option: QStyleOptionViewItem,
                 index: QModelIndex | QPersistentModelIndex) -> QSize:
        side = option.decorationSize
        lines = max(1, len(_tile_lines(index)))
        width = side.width() + 16
        view = option.widget
        if isinstance(view, QListView) and view.gridSize().isValid():
            width = max(width, view.gridSize().width() - 8)  # captions use the grid's width
        return QSize(width,
                     side.height() + lines * option.fontMetrics.height() + 16)


def _tile_lines(index: QModelIndex | QPersistentModelIndex) -> list[str]:
    text = str(index.data(Qt.ItemDataRole.DisplayRole) or "")
    subtitle = str(index.data(SUBTITLE_ROLE) or "")
    return (text.split("\n") if text else []) + (subtitle.split("\n") if subtitle else [])


def _tile_pixmap(value: object, side: QSize) -> QPixmap | None:
    if isinstance(value, QPixmap):
        return value
    if isinstance(value, QIcon) and not value.isNull():
        return value.pixmap(side, QIcon.Mode.Normal)
    if isinstance(value, QImage):
        return QPixmap.fromImage(value)
    return None


def set_prop(widget: QWidget, name: str, value: object) -> None:
    """Set a dynamic property used by the style sheet and re-polish the widget."""
    widget.setProperty(name, value)
    style = widget.style()
    if style is not None:
        style.unpolish(widget)
        style.polish(widget)


def primary(button: QPushButton) -> QPushButton:
    set_prop(button, "primary", True)
    return button


def left_headers(view: Any) -> None:
    """Column titles aligned with the (left-aligned) text under them."""
    header = view.horizontalHeader()
    if header is not None:
        header.setDefaultAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)


def muted_label(text: str = "", wrap: bool = True) -> QLabel:
    label = QLabel(text)
    label.setObjectName("Muted")
    label.setWordWrap(wrap)
    return label


def card(parent: QWidget | None = None) -> QFrame:
    frame = QFrame(parent)
    frame.setObjectName("Card")
    frame.setFrameShape(QFrame.Shape.NoFrame)
    return frame


def gate_card(page: QWidget) -> tuple[QFrame, QVBoxLayout]:
    """The centred card of a full-window gate (sign-in, the lock screen): one look for
    both, since the locked window is the sign-in page's sibling. Returns the card and its
    layout, for the caller's rows."""
    outer = QVBoxLayout(page)
    outer.addStretch(1)
    row = QHBoxLayout()
    row.addStretch(1)
    frame = QFrame()
    frame.setObjectName("GateCard")
    frame.setFixedWidth(460)
    row.addWidget(frame)
    row.addStretch(1)
    outer.addLayout(row)
    outer.addStretch(2)
    layout = QVBoxLayout(frame)
    layout.setContentsMargins(32, 28, 32, 28)
    layout.setSpacing(12)
    return frame, layout


def gate_titles(layout: QVBoxLayout, title: str) -> tuple[QLabel, QLabel]:
    """The title, heading and explanation rows of a gate card, centred, added to
    ``layout`` (the caller's logo or icon goes above). Returns (heading, explanation) for
    the caller to fill: the sign-in page and the lock screen word them differently."""
    title_label = QLabel(title)
    title_label.setObjectName("PageTitle")
    title_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
    layout.addWidget(title_label)
    heading = QLabel("")
    heading.setObjectName("CardTitle")
    heading.setWordWrap(True)
    heading.setAlignment(Qt.AlignmentFlag.AlignCenter)
    layout.addWidget(heading)
    explain = muted_label("")
    explain.setAlignment(Qt.AlignmentFlag.AlignCenter)
    layout.addWidget(explain)
    return heading, explain


def password_edit(placeholder: str = "Password") -> QLineEdit:
    """A password field: what is typed is never shown."""
    edit = QLineEdit()
    edit.setEchoMode(QLineEdit.EchoMode.Password)
    edit.setPlaceholderText(placeholder)
    return edit


def gate_status_rows(layout: QVBoxLayout) -> tuple[QLabel, QProgressBar]:
    """The error line and the busy bar under a gate card's password, added to ``layout``.
    The error line says in plain words why nothing was unlocked; the thin, hidden,
    indeterminate bar is shown while the password is stretched (scrypt takes seconds,
    in a worker), so the card does not look frozen."""
    error = QLabel("")
    error.setObjectName("ErrorText")
    error.setWordWrap(True)
    error.setAlignment(Qt.AlignmentFlag.AlignCenter)
    layout.addWidget(error)
    bar = QProgressBar()
    bar.setRange(0, 0)
    bar.setFixedHeight(6)
    bar.setTextVisible(False)
    bar.hide()
    layout.addWidget(bar)
    return error, bar


def tile_strip(tile: int, grid: QSize, height: int) -> QListWidget:
    """A one-row, left-to-right strip of preview tiles (the archive's series strip, the
    search page's results): static icons of ``tile`` pixels, selection drawn as a frame."""
    strip = QListWidget()
    strip.setViewMode(QListView.ViewMode.IconMode)
    strip.setFlow(QListView.Flow.LeftToRight)
    strip.setWrapping(False)
    strip.setMovement(QListView.Movement.Static)
    strip.setIconSize(QSize(tile, tile))
    strip.setGridSize(grid)
    strip.setFixedHeight(height)
    strip.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
    strip.setItemDelegate(TileDelegate(strip))
    return strip


def tool_button(icon_name: str, tip: str, on_click: Callable[[], None] | None = None,
                checkable: bool = False) -> QToolButton:
    button = QToolButton()
    theme.themed(button, icon_name)
    button.setIconSize(QSize(20, 20))
    button.setToolTip(tip)
    button.setAutoRaise(True)
    button.setCheckable(checkable)
    if on_click is not None:
        button.clicked.connect(on_click)
    return button


# --- page header ----------------------------------------------------------------------------


class PageHeader(QWidget):
    def __init__(self, title: str, subtitle: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 4)
        layout.setSpacing(2)
        self.title = QLabel(title)
        self.title.setObjectName("PageTitle")
        self.subtitle = QLabel(subtitle)
        self.subtitle.setObjectName("PageSubtitle")
        self.subtitle.setWordWrap(True)
        layout.addWidget(self.title)
        layout.addWidget(self.subtitle)


# --- message bar ----------------------------------------------------------------------------


class MessageBar(QFrame):
    """A plain sentence (error, warning or information) with details on demand."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("MessageBar")
        self.setFrameShape(QFrame.Shape.NoFrame)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(10, 8, 8, 8)
        outer.setSpacing(6)
        row = QHBoxLayout()
        row.setSpacing(8)
        self.icon = QLabel()
        self.icon.setFixedSize(20, 20)
        self.text = QLabel()
        self.text.setObjectName("MessageText")
        self.text.setWordWrap(True)
        self.text.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.text.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.details_button = QPushButton("Details")
        self.details_button.setCheckable(True)
        self.details_button.toggled.connect(self._toggle_details)
        self.close_button = tool_button("cancel", "Dismiss", self.dismiss)
        row.addWidget(self.icon, 0, Qt.AlignmentFlag.AlignTop)
        row.addWidget(self.text, 1)
        row.addWidget(self.details_button, 0, Qt.AlignmentFlag.AlignTop)
        row.addWidget(self.close_button, 0, Qt.AlignmentFlag.AlignTop)
        outer.addLayout(row)
        self.details = QPlainTextEdit()
        self.details.setObjectName("MessageDetails")
        self.details.setReadOnly(True)
        self.details.setMaximumHeight(160)
        self.details.hide()
        outer.addWidget(self.details)
        self.level = ""
        self.hide()

    def show_message(self, level: str, text: str, details: str = "") -> None:
        self.level = level
        set_prop(self, "level", level)
        names = {"error": "fail", "warning": "warning", "info": "info", "success": "ok"}
        colours = theme.current_colors()
        tint = {"error": colours.danger, "warning": colours.warning,
                "success": colours.success}.get(level, colours.accent)
        self.icon.setPixmap(theme.render_svg(names.get(level, "info"), 20, tint))
        self.text.setText(text)
        self.details.setPlainText(details)
        self.details_button.setVisible(bool(details))
        self.details_button.setChecked(False)
        self.details.hide()
        self.show()

    def dismiss(self) -> None:
        self.hide()
        self.level = ""

    def _toggle_details(self, on: bool) -> None:
        self.details.setVisible(on)
        self.details_button.setText("Hide details" if on else "Details")


# --- drop area --------------------------------------------------------------------------------


class DropArea(QFrame):
    """Accepts dropped files and folders (local URLs only) and reports their paths."""

    dropped = pyqtSignal(list)

    def __init__(self, text: str, hint: str = "", icon_name: str = "import",
                 parent: QWidget | None = None, compact: bool = False) -> None:
        super().__init__(parent)
        self.setObjectName("DropArea")
        self.setAcceptDrops(True)
        self.icon = QLabel()
        self.icon.setAlignment(Qt.AlignmentFlag.AlignCenter)
        size = 24 if compact else 32
        self._icon_name, self._icon_size = icon_name, size
        self.retheme()
        theme.on_change(self.retheme)
        self.label = QLabel(text)
        self.label.setWordWrap(True)
        self.label.setProperty("cardTitle", True)
        self.hint = muted_label(hint)
        self.buttons = QHBoxLayout()
        self.buttons.setSpacing(8)
        self.buttons_end = False
        if compact:
            layout: QHBoxLayout | QVBoxLayout = QHBoxLayout(self)
            layout.setContentsMargins(14, 10, 14, 10)
            layout.setSpacing(10)
            layout.addWidget(self.icon)
            texts = QVBoxLayout()
            texts.setSpacing(0)
            texts.addWidget(self.label)
            if hint:
                texts.addWidget(self.hint)
            layout.addLayout(texts, 1)
            layout.addLayout(self.buttons)
            self.buttons_end = True
        else:
            layout = QVBoxLayout(self)
            layout.setContentsMargins(16, 14, 16, 14)
            layout.setSpacing(6)
            self.label.setAlignment(Qt.AlignmentFlag.AlignCenter)
            self.hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
            self.buttons.addStretch(1)
            layout.addWidget(self.icon)
            layout.addWidget(self.label)
            if hint:
                layout.addWidget(self.hint)
            layout.addLayout(self.buttons)

    def retheme(self) -> None:
        self.icon.setPixmap(theme.render_svg(self._icon_name, self._icon_size,
                                             theme.current_colors().muted))

    def add_button(self, button: QPushButton) -> None:
        self.buttons.addWidget(button)

    def finish_buttons(self) -> None:
        if not self.buttons_end:
            self.buttons.addStretch(1)
            self.buttons_end = True

    @staticmethod
    def _paths(event: QDragEnterEvent | QDropEvent) -> list[str]:
        mime = event.mimeData()
        if mime is None or not mime.hasUrls():
            return []
        return [url.toLocalFile() for url in mime.urls() if isinstance(url, QUrl)
                and url.isLocalFile()]

    def dragEnterEvent(self, event: QDragEnterEvent | None) -> None:
        if event is not None and self._paths(event):
            event.acceptProposedAction()
            set_prop(self, "dragging", True)

    def dragLeaveEvent(self, event: object) -> None:
        set_prop(self, "dragging", False)

    def dropEvent(self, event: QDropEvent | None) -> None:
        set_prop(self, "dragging", False)
        if event is None:
            return
        paths = self._paths(event)
        if paths:
            event.acceptProposedAction()
            self.dropped.emit(paths)


# --- image panel -------------------------------------------------------------------------------


class ImagePanel(QFrame):
    """Shows one image scaled to fit (aspect kept) on black, with a caption; emits
    ``doubleClicked`` so the page can open the full viewer."""

    doubleClicked = pyqtSignal()

    def __init__(self, placeholder: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("ImageFrame")
        self.setMinimumSize(200, 200)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self._image: QImage | None = None
        self.placeholder = placeholder
        self.busy_text = ""

    def set_image(self, image: QImage | None) -> None:
        self._image = image if image is not None and not image.isNull() else None
        self.busy_text = ""
        self.update()

    def set_busy(self, text: str) -> None:
        self.busy_text = text
        self.update()

    def image(self) -> QImage | None:
        return self._image

    def sizeHint(self) -> QSize:
        return QSize(360, 360)

    def mouseDoubleClickEvent(self, event: object) -> None:
        if self._image is not None:
            self.doubleClicked.emit()

    def paintEvent(self, event: QPaintEvent | None) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
        rect = self.contentsRect().adjusted(1, 1, -1, -1)
        painter.fillRect(rect, QColor("#000000"))
        if self._image is not None:
            size = self._image.size().scaled(rect.size(), Qt.AspectRatioMode.KeepAspectRatio)
            x = rect.x() + (rect.width() - size.width()) / 2
            y = rect.y() + (rect.height() - size.height()) / 2
            painter.drawImage(QRectF(x, y, size.width(), size.height()), self._image)
        text = self.busy_text or ("" if self._image is not None else self.placeholder)
        if text:
            painter.setPen(QColor("#c9d1d9"))
            painter.drawText(rect.adjusted(16, 16, -16, -16),
                             int(Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap), text)
        painter.end()


# --- strength meter -------------------------------------------------------------------------------


class StrengthMeter(QWidget):
    """Password strength: a bar of four steps and the words that go with it."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(3)
        self.bar = QProgressBar()
        self.bar.setObjectName("StrengthBar")
        self.bar.setRange(0, 4)
        self.bar.setTextVisible(False)
        self.bar.setFixedHeight(8)
        self.words = muted_label("")
        layout.addWidget(self.bar)
        layout.addWidget(self.words)
        self.score = 0

    def set_strength(self, score: int, words: str) -> None:
        self.score = score
        self.bar.setValue(max(0, min(4, score)) if words != "empty" else 0)
        c = theme.current_colors()
        colour = [c.danger, c.danger, c.warning, c.success, c.success][max(0, min(4, score))]
        self.bar.setStyleSheet(f"QProgressBar::chunk {{ background: {colour}; }}")
        self.words.setText(f"Strength: {words}" if words != "empty" else "")


def elide_path(path: str, limit: int = 60) -> str:
    if len(path) <= limit:
        return path
    p = Path(path)
    return f"…/{p.parent.name}/{p.name}" if p.parent.name else p.name


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"


class ElidedLabel(QLabel):
    """A one-line label that elides its text to the width it gets (full text in the
    tooltip), so long file names and ids never push a layout apart."""

    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._full = ""
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setMinimumWidth(40)
        self.setText(text)

    def setText(self, text: str | None) -> None:
        self._full = text or ""
        self._elide()

    def full_text(self) -> str:
        return self._full

    def resizeEvent(self, event: object) -> None:
        self._elide()

    def _elide(self) -> None:
        metrics = self.fontMetrics()
        shown = metrics.elidedText(self._full, Qt.TextElideMode.ElideMiddle, max(10, self.width()))
        super().setText(shown)
        if shown != self._full:
            self.setToolTip(self._full)


class ResultLabel(QLabel):
    """The outcome line of a dialog: green when it went well, red when not, muted when
    neither; selectable, and its plain words kept for the tests (``plain_text``)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("", parent)
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

    def say(self, text: str, ok: bool | None = None) -> None:
        c = theme.current_colors()
        colour = c.muted if ok is None else c.success if ok else c.danger
        self.setText(f"<span style='color:{colour}'>{html.escape(text, quote=False)}</span>"
                     if text else "")
        self.setProperty("plain", text)

    def plain_text(self) -> str:
        return str(self.property("plain") or "")


def hidden_progress() -> QProgressBar:
    """A progress bar with its text, hidden until work starts."""
    bar = QProgressBar()
    bar.setTextVisible(True)
    bar.hide()
    return bar


def list_table(columns: tuple[str, ...] | list[str], stretch: int,
               selection: QAbstractItemView.SelectionMode) -> QTableWidget:
    """A read-only row-selection table (nodes, remote studies): columns sized to their
    contents but ``stretch``, headers left-aligned, no row numbers."""
    table = QTableWidget(0, len(columns))
    table.setHorizontalHeaderLabels(list(columns))
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(selection)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setAlternatingRowColors(True)
    left_headers(table)
    vertical = table.verticalHeader()
    if vertical is not None:
        vertical.hide()
    header = table.horizontalHeader()
    if header is not None:
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(stretch, QHeaderView.ResizeMode.Stretch)
    return table
