"""Blackout regions for an image a research repository refused (issue 16).

A research repository stores de-identified copies only (app/core/deid.py), and refuses an
image that may show patient text written into its pixels (BurnedInAnnotation YES, or an
ultrasound, screen capture or "other" image without the attribute): the tags can be
cleaned, the pixels cannot be read by a program. The user looks at the image, drags a
rectangle over every piece of text (and can remove one again), and the import of that file
then runs with those rectangles, which the core paints over in every frame before anything
is encrypted or uploaded.

The image is decoded on this workstation, in a decoder child, off the UI thread
(``Backend.display``); rectangles are kept in the image's own pixel coordinates (columns,
rows from the top left), whatever the dialog's size on screen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PyQt6.QtCore import QPointF, QRectF, Qt, pyqtSignal
from PyQt6.QtGui import QColor, QImage, QMouseEvent, QPainter, QPaintEvent, QPen
from PyQt6.QtWidgets import (
    QDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.core.types import Blackout
from app.gui.context import AppContext
from app.gui.tasks import TaskContext, TaskError
from app.gui.widgets import muted_label, primary, qimage_from_array

BURNED_IN_MARK = "burned-in"  # in the core's refusal (app/core/deid.py deidentify)
MIN_SIDE = 2  # a drag shorter than this (image pixels) is a click, not a region


def is_burned_in_refusal(reason: str) -> bool:
    """Whether an import failure is the research policy's refusal of possible burned-in
    text (then blackout regions let the file in); other failures need other remedies."""
    return BURNED_IN_MARK in reason


def refusal_words() -> str:
    """Why the file was refused, in plain words, and what the user can do."""
    return ("Not imported: this image may show patient details (a name, an ID, a date) "
            "written into the picture itself, as ultrasound images and screen captures "
            "often do. A research repository keeps only de-identified copies, so mark "
            "every piece of text with \"Mark text to black out…\" and import it again.")


def region_text(region: Blackout) -> str:
    return f"x {region.x}, y {region.y}: {region.width} × {region.height} pixels"


class BlackoutCanvas(QWidget):
    """The image, fitted into the widget; drag to add a rectangle, right-click one to
    remove it. ``regions`` are in image pixels."""

    regionsChanged = pyqtSignal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.image: QImage | None = None
        self.regions: list[Blackout] = []
        self._start: QPointF | None = None
        self._now: QPointF | None = None
        self.setMinimumSize(480, 360)
        self.setMouseTracking(False)
        self.setCursor(Qt.CursorShape.CrossCursor)

    # --- geometry ---------------------------------------------------------------------

    def set_image(self, image: QImage) -> None:
        self.image = image
        self.regions = []
        self.update()
        self.regionsChanged.emit()

    def image_rect(self) -> QRectF:
        """Where the image is drawn: fitted, aspect kept, centred."""
        if self.image is None or self.image.isNull():
            return QRectF()
        w, h = self.image.width(), self.image.height()
        scale = min(self.width() / w, self.height() / h)
        dw, dh = w * scale, h * scale
        return QRectF((self.width() - dw) / 2, (self.height() - dh) / 2, dw, dh)

    def to_image(self, point: QPointF) -> tuple[int, int]:
        """A widget point as image pixel coordinates, clamped to the image."""
        assert self.image is not None
        rect = self.image_rect()
        x = (point.x() - rect.x()) * self.image.width() / rect.width()
        y = (point.y() - rect.y()) * self.image.height() / rect.height()
        return (min(max(round(x), 0), self.image.width()),
                min(max(round(y), 0), self.image.height()))

    def to_widget(self, x: float, y: float) -> QPointF:
        """Image pixel coordinates as a widget point (for drawing and for tests)."""
        assert self.image is not None
        rect = self.image_rect()
        return QPointF(rect.x() + x * rect.width() / self.image.width(),
                       rect.y() + y * rect.height() / self.image.height())

    def _region(self, a: QPointF, b: QPointF) -> Blackout | None:
        (x0, y0), (x1, y1) = self.to_image(a), self.to_image(b)
        x, y = min(x0, x1), min(y0, y1)
        w, h = abs(x1 - x0), abs(y1 - y0)
        if w < MIN_SIDE or h < MIN_SIDE:
            return None
        return Blackout(x, y, w, h)

    def region_at(self, point: QPointF) -> int:
        """Index of the topmost region under a widget point, or -1."""
        if self.image is None:
            return -1
        x, y = self.to_image(point)
        for i in range(len(self.regions) - 1, -1, -1):
            r = self.regions[i]
            if r.x <= x <= r.x + r.width and r.y <= y <= r.y + r.height:
                return i
        return -1

    def remove(self, index: int) -> None:
        if 0 <= index < len(self.regions):
            del self.regions[index]
            self.update()
            self.regionsChanged.emit()

    # --- mouse ------------------------------------------------------------------------

    def mousePressEvent(self, event: QMouseEvent | None) -> None:
        if event is None or self.image is None:
            return
        if event.button() == Qt.MouseButton.RightButton:
            self.remove(self.region_at(event.position()))
            return
        if event.button() == Qt.MouseButton.LeftButton:
            self._start = self._now = event.position()
            self.update()

    def mouseMoveEvent(self, event: QMouseEvent | None) -> None:
        if event is not None and self._start is not None:
            self._now = event.position()
            self.update()

    def mouseReleaseEvent(self, event: QMouseEvent | None) -> None:
        if event is None or self._start is None or event.button() != Qt.MouseButton.LeftButton:
            return
        region = self._region(self._start, event.position())
        self._start = self._now = None
        if region is not None:
            self.regions.append(region)
            self.regionsChanged.emit()
        self.update()

    # --- drawing ----------------------------------------------------------------------

    def paintEvent(self, event: QPaintEvent | None) -> None:
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor("#101010"))
        if self.image is None:
            painter.setPen(QColor("#bbbbbb"))
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter,
                             "Decoding the image on this workstation…")
            painter.end()
            return
        painter.drawImage(self.image_rect(), self.image)
        pen = QPen(QColor("#ff5a4f"), 2)
        painter.setPen(pen)
        for r in self.regions:
            a, b = self.to_widget(r.x, r.y), self.to_widget(r.x + r.width, r.y + r.height)
            box = QRectF(a, b)
            painter.fillRect(box, QColor(0, 0, 0, 200))
            painter.drawRect(box)
        if self._start is not None and self._now is not None:
            painter.setPen(QPen(QColor("#ffd24a"), 1, Qt.PenStyle.DashLine))
            painter.drawRect(QRectF(self._start, self._now).normalized())
        painter.end()


class BlackoutDialog(QDialog):
    """Shows the refused image and collects the regions; ``accepted`` means "import it
    with ``regions()``"."""

    def __init__(self, ctx: AppContext, path: str, reason: str = "",
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.path = path
        self.loaded = False
        self.setWindowTitle(f"Black out text — {Path(path).name}")
        self.resize(860, 700)

        layout = QVBoxLayout(self)
        title = QLabel(f"<b>{Path(path).name}</b>")
        layout.addWidget(title)
        self.why = muted_label(
            "This image may show patient details written into the picture. Drag a "
            "rectangle over every piece of text (names, IDs, dates, hospital); right-click "
            "a rectangle, or select it below and press Remove, to take it away. The "
            "rectangles are painted black in every frame of the de-identified copy before "
            "it is encrypted; the original file is not changed and is not uploaded.")
        self.why.setWordWrap(True)
        layout.addWidget(self.why)

        self.canvas = BlackoutCanvas()
        self.canvas.regionsChanged.connect(self._regions_changed)
        layout.addWidget(self.canvas, 1)

        row = QHBoxLayout()
        self.list = QListWidget()
        self.list.setMaximumHeight(90)
        row.addWidget(self.list, 1)
        self.remove_button = QPushButton("Remove")
        self.remove_button.clicked.connect(self.remove_selected)
        row.addWidget(self.remove_button)
        layout.addLayout(row)

        self.status = muted_label("Decoding the image…")
        buttons = QHBoxLayout()
        buttons.addWidget(self.status, 1)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.reject)
        self.import_button = primary(QPushButton("Import with these regions"))
        self.import_button.clicked.connect(self.accept)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.import_button)
        layout.addLayout(buttons)
        self._regions_changed()
        self._load()

    def _load(self) -> None:
        """Decode off the UI thread (a decoder child): the file is never uploaded here."""
        backend, path = self.ctx.backend, self.path

        def work(_: TaskContext) -> Any:
            return backend.display(path)

        self.ctx.runner.run(f"Decoding {Path(path).name}", work, on_done=self._loaded,
                            on_error=self._failed)

    def _loaded(self, pixels: Any) -> None:
        self.canvas.set_image(qimage_from_array(pixels))
        self.loaded = True
        self._regions_changed()

    def _failed(self, error: TaskError) -> None:
        self.status.setText(f"{Path(self.path).name} cannot be shown: {error.message}")

    def regions(self) -> list[Blackout]:
        return list(self.canvas.regions)

    def remove_selected(self) -> None:
        self.canvas.remove(self.list.currentRow())

    def _regions_changed(self) -> None:
        regions = self.canvas.regions
        self.list.clear()
        for r in regions:
            self.list.addItem(region_text(r))
        self.remove_button.setEnabled(bool(regions))
        self.import_button.setEnabled(self.loaded and bool(regions))
        if self.loaded:
            n = len(regions)
            self.status.setText(
                f"{n} region{'s' if n != 1 else ''} marked." if n else
                "Drag over each piece of text in the image.")
