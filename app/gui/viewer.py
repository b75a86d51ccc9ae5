"""The full image viewer: zoom, pan, rotate, flip, invert, and window/level for DICOM.

Mouse: left-drag pans, right- or middle-drag changes window/level (horizontal = width,
vertical = centre, as in Weasis and OHIF), the wheel zooms about the cursor. Keys (OHIF's):
+ / - zoom, = fit, r / l rotate, h / v flip, i invert, Space reset, 1-5 presets.

Re-windowing recomputes the 8-bit display image from the modality values with
``DecodedImage.display(window)`` (modality LUT first, then the window, then MONOCHROME1
inversion, as pydicom orders them); during a drag it is coalesced to one update per
frame so the UI stays fluid on large images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PyQt6.QtCore import QPointF, QRectF, QSize, Qt, QTimer, pyqtSignal
from PyQt6.QtGui import (
    QAction,
    QColor,
    QImage,
    QKeyEvent,
    QKeySequence,
    QMouseEvent,
    QPainter,
    QPaintEvent,
    QTransform,
    QWheelEvent,
)
from PyQt6.QtWidgets import (
    QComboBox,
    QDialog,
    QHBoxLayout,
    QLabel,
    QSizePolicy,
    QToolBar,
    QVBoxLayout,
    QWidget,
)

from app.core.client import robust_range
from app.core.types import DecodedImage, Repository
from app.gui import theme
from app.gui.context import AppContext
from app.gui.tasks import TaskContext, TaskError
from app.gui.widgets import qimage_from_array

# (name, width, centre): CONVENTIONS.md "Radiology habits"
PRESETS = (
    ("Soft tissue", 400.0, 40.0),
    ("Lung", 1500.0, -600.0),
    ("Liver", 150.0, 90.0),
    ("Bone", 2500.0, 480.0),
    ("Brain", 80.0, 40.0),
)
ZOOM_STEP = 1.25
MIN_ZOOM, MAX_ZOOM = 0.02, 40.0


def default_window(img: DecodedImage) -> tuple[float, float]:
    """(centre, width) that the default display amounts to."""
    if img.window is not None:
        return img.window
    lo, hi = img.display_range or robust_range(img.pixels)
    if hi <= lo:
        hi = lo + 1.0
    return ((lo + hi) / 2.0, hi - lo)


def supports_presets(img: DecodedImage) -> bool:
    """CT-style presets make sense for grey DICOM in modality units."""
    return img.source_format == "dicom" and not img.is_rgb


class ImageCanvas(QWidget):
    """Paints one DecodedImage with the view transform; emits state changes."""

    viewChanged = pyqtSignal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumSize(320, 320)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.decoded: DecodedImage | None = None
        self._default: tuple[float, float] = (0.5, 1.0)
        self.window: tuple[float, float] | None = None  # (centre, width)
        self.zoom = 1.0
        self.pan = QPointF(0, 0)
        self.rotation = 0
        self.flip_h = False
        self.flip_v = False
        self.inverted = False
        self.fitted = True
        self._qimage: QImage | None = None
        self._drag_start: QPointF | None = None
        self._drag_button = Qt.MouseButton.NoButton
        self._drag_origin: tuple[QPointF, tuple[float, float] | None] | None = None
        self._pending_window: tuple[float, float] | None = None
        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(16)
        self._render_timer.timeout.connect(self._render_pending)
        self.busy_text = ""

    # --- state -----------------------------------------------------------------------------

    def set_image(self, img: DecodedImage) -> None:
        self.decoded = img
        self._default = default_window(img)
        self.window = self._default if not img.is_rgb else None
        self.inverted = False
        self.busy_text = ""
        self._render(None)
        self.reset_view()

    @property
    def windowable(self) -> bool:
        return self.decoded is not None and not self.decoded.is_rgb

    def set_window(self, centre: float, width: float, immediate: bool = True) -> None:
        if not self.windowable:
            return
        self.window = (float(centre), max(1e-3, float(width)))
        if immediate:
            self._render(self.window)
        else:
            self._pending_window = self.window
            if not self._render_timer.isActive():
                self._render_timer.start()
        self.viewChanged.emit()

    def _render_pending(self) -> None:
        if self._pending_window is not None:
            window, self._pending_window = self._pending_window, None
            self._render(window)

    def _render(self, window: tuple[float, float] | None) -> None:
        img = self.decoded
        if img is None:
            return
        explicit = window if window is not None and window != self._default else None
        pixels = img.display(explicit)
        if self.inverted:
            pixels = np.subtract(255, pixels, dtype=np.uint8)
        self._qimage = qimage_from_array(pixels)
        self.update()

    def set_inverted(self, on: bool) -> None:
        self.inverted = on
        self._render(self.window)
        self.viewChanged.emit()

    def reset_view(self) -> None:
        self.rotation = 0
        self.flip_h = self.flip_v = False
        self.fit()

    def reset_all(self) -> None:
        if self.decoded is not None:
            self.window = self._default if self.windowable else None
            self.inverted = False
            self._render(None)
        self.reset_view()

    def fit(self) -> None:
        self.fitted = True
        self.pan = QPointF(0, 0)
        self.zoom = self._fit_zoom()
        self.update()
        self.viewChanged.emit()

    def _fit_zoom(self) -> float:
        if self._qimage is None:
            return 1.0
        w, h = self._qimage.width(), self._qimage.height()
        if self.rotation % 180:
            w, h = h, w
        area = self.contentsRect()
        return max(MIN_ZOOM, min(area.width() / max(1, w), area.height() / max(1, h)))

    def zoom_by(self, factor: float, anchor: QPointF | None = None) -> None:
        new = max(MIN_ZOOM, min(MAX_ZOOM, self.zoom * factor))
        if anchor is not None:
            centre = QPointF(self.width() / 2, self.height() / 2)
            offset = anchor - centre - self.pan
            self.pan -= offset * (new / self.zoom - 1)
        self.zoom = new
        self.fitted = False
        self.update()
        self.viewChanged.emit()

    def rotate(self, degrees: int) -> None:
        self.rotation = (self.rotation + degrees) % 360
        if self.fitted:
            self.zoom = self._fit_zoom()
        self.update()
        self.viewChanged.emit()

    def flip(self, horizontal: bool) -> None:
        if horizontal:
            self.flip_h = not self.flip_h
        else:
            self.flip_v = not self.flip_v
        self.update()
        self.viewChanged.emit()

    # --- painting ----------------------------------------------------------------------------

    def transform(self) -> QTransform:
        t = QTransform()
        t.translate(self.width() / 2 + self.pan.x(), self.height() / 2 + self.pan.y())
        t.rotate(self.rotation)
        t.scale(self.zoom * (-1 if self.flip_h else 1), self.zoom * (-1 if self.flip_v else 1))
        if self._qimage is not None:
            t.translate(-self._qimage.width() / 2, -self._qimage.height() / 2)
        return t

    def paintEvent(self, event: QPaintEvent | None) -> None:
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor("#000000"))
        if self._qimage is not None:
            painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, self.zoom < 2.0)
            painter.setTransform(self.transform())
            painter.drawImage(QPointF(0, 0), self._qimage)
            painter.resetTransform()
        text = self.busy_text
        if text:
            painter.setPen(QColor("#c9d1d9"))
            painter.drawText(QRectF(self.rect()).adjusted(20, 20, -20, -20),
                             int(Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap), text)
        painter.end()

    def resizeEvent(self, event: object) -> None:
        if self.fitted:
            self.zoom = self._fit_zoom()
            self.viewChanged.emit()

    # --- mouse and keys ------------------------------------------------------------------------

    def mousePressEvent(self, event: QMouseEvent | None) -> None:
        if event is None:
            return
        self._drag_button = event.button()
        self._drag_start = event.position()
        self._drag_origin = (QPointF(self.pan), self.window)
        if event.button() in (Qt.MouseButton.RightButton, Qt.MouseButton.MiddleButton):
            self.setCursor(Qt.CursorShape.SizeAllCursor)
        elif event.button() == Qt.MouseButton.LeftButton:
            self.setCursor(Qt.CursorShape.ClosedHandCursor)

    def mouseMoveEvent(self, event: QMouseEvent | None) -> None:
        if event is None or self._drag_start is None or self._drag_origin is None:
            return
        delta = event.position() - self._drag_start
        pan, window = self._drag_origin
        if self._drag_button == Qt.MouseButton.LeftButton:
            self.pan = pan + delta
            self.fitted = False
            self.update()
        elif self._drag_button in (Qt.MouseButton.RightButton, Qt.MouseButton.MiddleButton):
            if window is not None and self.windowable:
                centre, width = window
                step = max(width, 1.0) / 256.0
                self.set_window(centre + delta.y() * step,
                                max(1.0, width + delta.x() * step * 2), immediate=False)

    def mouseReleaseEvent(self, event: QMouseEvent | None) -> None:
        self._drag_start = None
        self._drag_origin = None
        self.unsetCursor()
        self._render_pending()

    def wheelEvent(self, event: QWheelEvent | None) -> None:
        if event is None:
            return
        steps = event.angleDelta().y() / 120.0
        if steps:
            self.zoom_by(ZOOM_STEP ** steps, event.position())

    def contextMenuEvent(self, event: object) -> None:
        pass  # right-drag is window/level, not a menu


class ImageViewer(QDialog):
    """A window around ImageCanvas with a toolbar and the W/L readout."""

    def __init__(self, title: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(f"{title} — Radcrypt")
        self.setWindowFlag(Qt.WindowType.WindowMaximizeButtonHint, True)
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
        self.resize(900, 760)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        self.toolbar = QToolBar()
        self.toolbar.setIconSize(QSize(20, 20))
        self.canvas = ImageCanvas()
        layout.addWidget(self.toolbar)
        layout.addWidget(self.canvas, 1)
        info = QHBoxLayout()
        info.setContentsMargins(10, 4, 10, 6)
        self.caption = QLabel(title)
        self.caption.setObjectName("ImageCaption")
        self.readout = QLabel("")
        self.readout.setObjectName("Muted")
        info.addWidget(self.caption, 1)
        info.addWidget(self.readout)
        layout.addLayout(info)

        def act(icon: str, text: str, keys: list[str], slot: object) -> QAction:
            action = theme.themed(QAction(text, self), icon)
            action.setShortcuts([QKeySequence(k) for k in keys])
            action.setToolTip(f"{text} ({', '.join(keys)})" if keys else text)
            action.triggered.connect(slot)
            self.toolbar.addAction(action)
            return action

        act("fit", "Fit", ["="], self.canvas.fit)
        act("zoom_in", "Zoom in", ["+", "z"], lambda: self.canvas.zoom_by(ZOOM_STEP))
        act("zoom_out", "Zoom out", ["-"], lambda: self.canvas.zoom_by(1 / ZOOM_STEP))
        self.toolbar.addSeparator()
        act("rotate", "Rotate right", ["r"], lambda: self.canvas.rotate(90))
        act("flip", "Flip horizontally", ["h"], lambda: self.canvas.flip(True))
        flip_v = QAction("Flip vertically", self)
        flip_v.setShortcut(QKeySequence("v"))
        flip_v.triggered.connect(lambda: self.canvas.flip(False))
        self.addAction(flip_v)
        rotate_l = QAction("Rotate left", self)
        rotate_l.setShortcut(QKeySequence("l"))
        rotate_l.triggered.connect(lambda: self.canvas.rotate(-90))
        self.addAction(rotate_l)
        self.invert_action = act("invert", "Invert", ["i"],
                                 lambda: self.canvas.set_inverted(not self.canvas.inverted))
        act("reset", "Reset", ["Space"], self.canvas.reset_all)
        self.toolbar.addSeparator()
        self.preset_label = QLabel("  Window preset: ")
        self.presets = QComboBox()
        self.presets.addItem("Default (from the file)")
        for i, (name, width, centre) in enumerate(PRESETS, start=1):
            self.presets.addItem(f"{i}  {name} (W {width:g} / L {centre:g})")
        self.presets.activated.connect(self._preset_chosen)
        self.preset_label_action = self.toolbar.addWidget(self.preset_label)
        self.presets_action = self.toolbar.addWidget(self.presets)
        for i in range(len(PRESETS)):
            shortcut = QAction(self)
            shortcut.setShortcut(QKeySequence(str(i + 1)))
            shortcut.triggered.connect(lambda _=False, n=i + 1: self.apply_preset(n))
            self.addAction(shortcut)
        self.canvas.viewChanged.connect(self._update_readout)
        self._update_readout()

    def set_busy(self, text: str) -> None:
        self.canvas.busy_text = text
        self.canvas.update()

    def set_image(self, img: DecodedImage) -> None:
        self.canvas.set_image(img)
        show = supports_presets(img)
        self.presets_action.setVisible(show)
        self.preset_label_action.setVisible(show)
        self._update_readout()

    def apply_preset(self, number: int) -> None:
        img = self.canvas.decoded
        if img is None or not supports_presets(img):
            return
        if number == 0:
            centre, width = default_window(img)
        else:
            _, width, centre = PRESETS[number - 1]
        self.presets.setCurrentIndex(number)
        self.canvas.set_window(centre, width)

    def _preset_chosen(self, index: int) -> None:
        self.apply_preset(index)

    def _update_readout(self) -> None:
        c = self.canvas
        parts = []
        if c.decoded is not None:
            h, w = c.decoded.pixels.shape[:2]
            parts.append(f"{w} × {h}")
        if c.window is not None and c.windowable:
            parts.append(f"W {c.window[1]:.0f} / L {c.window[0]:.0f}")
        parts.append(f"zoom {c.zoom * 100:.0f}%")
        if c.rotation:
            parts.append(f"rotated {c.rotation}°")
        if c.inverted:
            parts.append("inverted")
        self.readout.setText(" · ".join(parts))

    def keyPressEvent(self, event: QKeyEvent | None) -> None:
        if event is not None and event.key() == Qt.Key.Key_Escape:
            self.close()
            return
        super().keyPressEvent(event)


def open_archived(ctx: AppContext, parent: QWidget, repo: Repository, image_id: str,
                  name: str, version: int | None) -> ImageViewer:
    """Open the viewer now and fill it once the original is fetched and decrypted."""
    viewer = ImageViewer(name or image_id[:12], parent.window())
    viewer.set_busy("Downloading, verifying and decrypting the original…")
    viewer.show()
    backend = ctx.backend

    def work(_: TaskContext) -> DecodedImage:
        return backend.fetch_image(repo, image_id, name, version)

    def failed(error: TaskError) -> None:
        viewer.set_busy(error.message)
        ctx.error(error)

    ctx.runner.run(f"Opening {name or image_id}", work,
                   on_done=lambda img: _fill(viewer, img), on_error=failed)
    return viewer


def open_local(ctx: AppContext, parent: QWidget, path: str) -> ImageViewer:
    viewer = ImageViewer(Path(path).name, parent.window())
    viewer.set_busy("Decoding…")
    viewer.show()

    def failed(error: TaskError) -> None:
        viewer.set_busy(error.message)

    backend = ctx.backend
    ctx.runner.run(f"Opening {Path(path).name}", lambda _: backend.decode(path),
                   on_done=lambda img: _fill(viewer, img), on_error=failed)
    return viewer


def _fill(viewer: ImageViewer, img: DecodedImage) -> None:
    try:
        viewer.set_image(img)
    except RuntimeError:
        pass  # the viewer was closed before the image arrived
