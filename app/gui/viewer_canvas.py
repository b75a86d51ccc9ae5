"""The viewer's drawing surface: one frame of an :class:`ImageStack` with the view transform,
corner overlays, orientation markers and the value under the cursor.

Mouse as in OHIF v3: left-drag window/level (horizontal = width, vertical = centre), middle-drag
pan, right-drag zoom (up = in), wheel scrolls the stack's slices; a single image does not
move on the wheel (there is nothing to scroll, and a zoom there would surprise a reader
used to OHIF), Ctrl+wheel zooms about the cursor in both cases.

Re-windowing recomputes the 8-bit image from the modality values (``DecodedImage.display``);
during a drag it is coalesced to one update per 16 ms so large images stay fluid.
"""

from __future__ import annotations

import numpy as np
from PyQt6.QtCore import QPointF, QRectF, Qt, QTimer, pyqtSignal
from PyQt6.QtGui import (
    QColor,
    QFont,
    QImage,
    QMouseEvent,
    QPainter,
    QPaintEvent,
    QTransform,
    QWheelEvent,
)
from PyQt6.QtWidgets import QSizePolicy, QWidget

from app.core.types import DecodedImage
from app.gui.viewer_model import (
    ImageStack,
    Stack,
    StackInfo,
    default_window,
    file_display,
    orientation_markers,
    value_text,
)
from app.gui.widgets import qimage_from_array

ZOOM_STEP = 1.25
MIN_ZOOM, MAX_ZOOM = 0.02, 40.0
DRAG_ZOOM_PIXELS = 100.0
"""Right-drag of this many pixels up doubles the zoom (down halves it)."""

OVERLAY_TEXT = QColor("#e6edf3")
OVERLAY_SHADOW = QColor(0, 0, 0, 200)
LOSSY_COLOUR = QColor("#ffa657")


class ImageCanvas(QWidget):
    """Paints the current frame; emits ``viewChanged`` (zoom, pan, window, rotation…),
    ``sliceChanged`` and ``cursorChanged`` (value under the cursor)."""

    viewChanged = pyqtSignal()
    sliceChanged = pyqtSignal(int)
    cursorChanged = pyqtSignal(str)
    sliceRequested = pyqtSignal(int, int)  # index, direction: a LazyStack slice to decrypt

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumSize(320, 320)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setMouseTracking(True)  # value under the cursor without a button held
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.stack: Stack | None = None
        self.info = StackInfo()
        self.index = 0
        self.shown_index = 0  # the slice whose pixels are on screen (index while loading)
        self.decoded: DecodedImage | None = None
        self._default: tuple[float, float] | None = None
        self.window_level: tuple[float, float] | None = None  # (centre, width)
        self.zoom = 1.0
        self.pan = QPointF(0, 0)
        self.rotation = 0
        self.flip_h = False
        self.flip_v = False
        self.inverted = False
        self.fitted = True
        self.show_overlays = True
        self.cursor_text = ""
        self._qimage: QImage | None = None
        self._drag_start: QPointF | None = None
        self._drag_button = Qt.MouseButton.NoButton
        self._drag_origin: tuple[QPointF, tuple[float, float] | None, float] | None = None
        self._pending = False
        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(16)
        self._render_timer.timeout.connect(self._render_pending)
        self.busy_text = ""
        self._wheel_rest = 0

    # --- content ------------------------------------------------------------------------------

    def set_image(self, img: DecodedImage) -> None:
        """A stack of one (today's entry points)."""
        self.set_stack(ImageStack.of_images([img]))

    def set_stack(self, stack: Stack, index: int | None = None) -> None:
        """Show ``stack`` from ``index`` (default: the middle slice, as PACS viewers open a
        series), with its default window and a fitted view. A LazyStack must hold slice
        ``index`` already (the viewer opens it once that slice is decrypted)."""
        self.stack = stack
        self.info = stack.info
        self.index = len(stack) // 2 if index is None else max(0, min(len(stack) - 1, index))
        self.shown_index = self.index
        self.decoded = stack.image(self.index)
        self._default = default_window(self.decoded, self.info.modality)
        self.window_level = self._default
        self.inverted = False
        self.busy_text = ""
        self._render()
        self.reset_view()
        self.sliceChanged.emit(self.index)

    @property
    def modality(self) -> str:
        return self.info.modality

    @property
    def slice_count(self) -> int:
        return len(self.stack) if self.stack is not None else 0

    @property
    def loading(self) -> bool:
        """Whether the current slice is still being decrypted (the previous one shows)."""
        return self.shown_index != self.index

    def set_slice(self, index: int) -> None:
        """Show frame ``index`` keeping the window and view (as scrolling a series does).
        A slice of a LazyStack not decrypted yet is asked for (``sliceRequested``); the
        slice on screen stays, marked as loading, until ``slice_loaded`` brings it."""
        if self.stack is None:
            return
        index = max(0, min(len(self.stack) - 1, index))
        if index == self.index:
            return
        direction = 1 if index > self.index else -1
        self.index = index
        if self.stack.has(index):
            self._show_slice(index)
        else:
            self._set_cursor_text("")  # the value under the cursor belongs to the old slice
            self.update()
            self.sliceRequested.emit(index, direction)
        self.sliceChanged.emit(index)
        self.viewChanged.emit()

    def slice_loaded(self, index: int) -> None:
        """A slice of the stack arrived: shown at once when it is the one wanted."""
        if self.stack is not None and index == self.index and self.loading \
                and self.stack.has(index):
            self._show_slice(index)
            self.viewChanged.emit()

    def _show_slice(self, index: int) -> None:
        assert self.stack is not None
        self.shown_index = index
        self.decoded = self.stack.image(index)
        self._render()

    def step_slice(self, delta: int) -> None:
        self.set_slice(self.index + delta)

    @property
    def windowable(self) -> bool:
        return self.decoded is not None and not self.decoded.is_rgb

    def set_window(self, centre: float, width: float, immediate: bool = True) -> None:
        if not self.windowable:
            return
        window = (float(centre), max(1.0, float(width)))
        if window == self.window_level:
            return
        self.window_level = window
        if immediate:
            self._render()
        else:
            self._pending = True
            if not self._render_timer.isActive():
                self._render_timer.start()
        self.viewChanged.emit()

    def _render_pending(self) -> None:
        if self._pending:
            self._pending = False
            self._render()

    def _render(self) -> None:
        img = self.decoded
        if img is None:
            return
        window = self.window_level
        explicit = None if file_display(img, window) else window
        pixels = img.display(explicit)
        if self.inverted:
            pixels = np.subtract(255, pixels, dtype=np.uint8)
        self._qimage = qimage_from_array(pixels)
        self.update()

    def set_inverted(self, on: bool) -> None:
        self.inverted = on
        self._render()
        self.viewChanged.emit()

    def reset_view(self) -> None:
        self.rotation = 0
        self.flip_h = self.flip_v = False
        self.fit()

    def reset_all(self) -> None:
        """Space: the default window, no inversion, no rotation or flip, fitted."""
        if self.decoded is not None:
            self._default = default_window(self.decoded, self.modality)
            self.window_level = self._default
            self.inverted = False
            self._render()
        self.reset_view()

    # --- geometry -------------------------------------------------------------------------------

    def fit(self) -> None:
        self.fitted = True
        self.pan = QPointF(0, 0)
        self.zoom = self.fit_zoom()
        self.update()
        self.viewChanged.emit()

    def fit_zoom(self) -> float:
        if self._qimage is None:
            return 1.0
        w, h = self._qimage.width(), self._qimage.height()
        if self.rotation % 180:
            w, h = h, w
        area = self.contentsRect()
        return max(MIN_ZOOM, min(area.width() / max(1, w), area.height() / max(1, h)))

    def set_zoom(self, zoom: float, anchor: QPointF | None = None) -> None:
        new = max(MIN_ZOOM, min(MAX_ZOOM, zoom))
        if anchor is not None and self.zoom > 0:
            centre = QPointF(self.width() / 2, self.height() / 2)
            offset = anchor - centre - self.pan
            self.pan -= offset * (new / self.zoom - 1)
        self.zoom = new
        self.fitted = False
        self.update()
        self.viewChanged.emit()

    def zoom_by(self, factor: float, anchor: QPointF | None = None) -> None:
        self.set_zoom(self.zoom * factor, anchor)

    def set_pan(self, pan: QPointF) -> None:
        self.pan = QPointF(pan)
        self.fitted = False
        self.update()
        self.viewChanged.emit()

    def rotate(self, degrees: int) -> None:
        self.rotation = (self.rotation + degrees) % 360
        if self.fitted:
            self.zoom = self.fit_zoom()
        self.update()
        self.viewChanged.emit()

    def flip(self, horizontal: bool) -> None:
        if horizontal:
            self.flip_h = not self.flip_h
        else:
            self.flip_v = not self.flip_v
        self.update()
        self.viewChanged.emit()

    def transform(self) -> QTransform:
        t = QTransform()
        t.translate(self.width() / 2 + self.pan.x(), self.height() / 2 + self.pan.y())
        t.rotate(self.rotation)
        t.scale(self.zoom * (-1 if self.flip_h else 1), self.zoom * (-1 if self.flip_v else 1))
        if self._qimage is not None:
            t.translate(-self._qimage.width() / 2, -self._qimage.height() / 2)
        return t

    def image_point(self, pos: QPointF) -> tuple[int, int] | None:
        """The (column, row) of the pixel under widget position ``pos``, None off the image."""
        if self._qimage is None:
            return None
        inverse, ok = self.transform().inverted()
        if not ok:
            return None
        p = inverse.map(pos)
        column, row = int(np.floor(p.x())), int(np.floor(p.y()))
        if 0 <= column < self._qimage.width() and 0 <= row < self._qimage.height():
            return column, row
        return None

    def widget_point(self, column: float, row: float) -> QPointF:
        """Where the centre of pixel (column, row) is drawn."""
        return self.transform().map(QPointF(column + 0.5, row + 0.5))

    # --- overlays ------------------------------------------------------------------------------

    def overlay_texts(self) -> dict[str, list[str]]:
        """The four corners' lines (OHIF's layout): patient top-left, study/series top-right,
        W/L and zoom bottom-left, image n/N, size and LOSSY bottom-right."""
        info = self.info
        corners: dict[str, list[str]] = {"top_left": [], "top_right": [],
                                         "bottom_left": [], "bottom_right": []}
        if self.decoded is None:
            return corners
        tl, tr = corners["top_left"], corners["top_right"]
        bl, br = corners["bottom_left"], corners["bottom_right"]
        tl += [t for t in (info.patient_name, info.patient_id and f"ID {info.patient_id}")
               if t]
        if info.study_date:
            tl.append(info.study_date)
        tr += [t for t in (info.study_description, info.series_description) if t]
        kind = " ".join(t for t in (info.modality, info.body_part) if t)
        if kind:
            tr.append(kind)
        if self.window_level is not None and self.windowable:
            bl.append(f"W {self.window_level[1]:.0f} / L {self.window_level[0]:.0f}")
        bl.append(f"Zoom {self.zoom * 100:.0f}%")
        if self.cursor_text:
            bl.append(self.cursor_text)
        br.append(f"Image {self.index + 1}/{self.slice_count}"
                  + (" · decrypting…" if self.loading else ""))
        h, w = self.decoded.pixels.shape[:2]
        br.append(f"{w} × {h}")
        if info.lossy:
            br.append("LOSSY")
        return corners

    def markers(self) -> dict[str, str]:
        return orientation_markers(self.info.orientation, self.rotation, self.flip_h,
                                   self.flip_v)

    def paintEvent(self, event: QPaintEvent | None) -> None:
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor("#000000"))
        if self._qimage is not None:
            painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, self.zoom < 2.0)
            painter.setTransform(self.transform())
            painter.drawImage(QPointF(0, 0), self._qimage)
            painter.resetTransform()
            if self.show_overlays:
                self._paint_overlays(painter)
        if self.busy_text:
            painter.setPen(OVERLAY_TEXT)
            painter.drawText(QRectF(self.rect()).adjusted(20, 20, -20, -20),
                             int(Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap),
                             self.busy_text)
        painter.end()

    def _paint_overlays(self, painter: QPainter) -> None:
        font = QFont(self.font())
        font.setPointSizeF(max(8.0, font.pointSizeF()))
        painter.setFont(font)
        line = painter.fontMetrics().height()
        area = QRectF(self.rect()).adjusted(8, 6, -8, -6)
        align = Qt.AlignmentFlag
        places = {
            "top_left": align.AlignLeft | align.AlignTop,
            "top_right": align.AlignRight | align.AlignTop,
            "bottom_left": align.AlignLeft | align.AlignBottom,
            "bottom_right": align.AlignRight | align.AlignBottom,
        }
        for corner, lines in self.overlay_texts().items():
            flags = places[corner]
            bottom = corner.startswith("bottom")
            for n, text in enumerate(reversed(lines) if bottom else lines):
                offset = -n * line if bottom else n * line
                rect = area.translated(0, offset)
                colour = LOSSY_COLOUR if text == "LOSSY" else OVERLAY_TEXT
                self._shadowed(painter, rect, int(flags), text, colour)
        bold = QFont(font)
        bold.setBold(True)
        bold.setPointSizeF(font.pointSizeF() * 1.2)
        painter.setFont(bold)
        edges = {
            "top": align.AlignHCenter | align.AlignTop,
            "bottom": align.AlignHCenter | align.AlignBottom,
            "left": align.AlignLeft | align.AlignVCenter,
            "right": align.AlignRight | align.AlignVCenter,
        }
        for edge, letters in self.markers().items():
            self._shadowed(painter, area, int(edges[edge]), letters, OVERLAY_TEXT)

    @staticmethod
    def _shadowed(painter: QPainter, rect: QRectF, flags: int, text: str,
                  colour: QColor) -> None:
        painter.setPen(OVERLAY_SHADOW)
        painter.drawText(rect.translated(1, 1), flags, text)
        painter.setPen(colour)
        painter.drawText(rect, flags, text)

    def resizeEvent(self, event: object) -> None:
        if self.fitted:
            self.zoom = self.fit_zoom()
            self.viewChanged.emit()

    # --- mouse ---------------------------------------------------------------------------------

    def mousePressEvent(self, event: QMouseEvent | None) -> None:
        if event is None:
            return
        self._drag_button = event.button()
        self._drag_start = event.position()
        self._drag_origin = (QPointF(self.pan), self.window_level, self.zoom)
        cursors = {Qt.MouseButton.LeftButton: Qt.CursorShape.SizeAllCursor,
                   Qt.MouseButton.MiddleButton: Qt.CursorShape.ClosedHandCursor,
                   Qt.MouseButton.RightButton: Qt.CursorShape.SizeVerCursor}
        if event.button() in cursors:
            self.setCursor(cursors[event.button()])

    def mouseMoveEvent(self, event: QMouseEvent | None) -> None:
        if event is None:
            return
        if self._drag_start is None or self._drag_origin is None:
            self._update_cursor_value(event.position())
            return
        delta = event.position() - self._drag_start
        pan, window, zoom = self._drag_origin
        button = self._drag_button
        if button == Qt.MouseButton.LeftButton:
            if window is not None and self.windowable:
                centre, width = window
                step = max(width, 1.0) / 256.0
                self.set_window(centre + delta.y() * step,
                                max(1.0, width + delta.x() * step * 2), immediate=False)
        elif button == Qt.MouseButton.MiddleButton:
            self.set_pan(pan + delta)
        elif button == Qt.MouseButton.RightButton:
            anchor = self._drag_start
            factor = 2.0 ** (-delta.y() / DRAG_ZOOM_PIXELS)
            target = max(MIN_ZOOM, min(MAX_ZOOM, zoom * factor))
            # zoom about where the drag started, from the state at the press
            middle = QPointF(self.width() / 2, self.height() / 2)
            self.pan = pan - (anchor - middle - pan) * (target / zoom - 1)
            self.zoom = zoom
            self.set_zoom(target)

    def mouseReleaseEvent(self, event: QMouseEvent | None) -> None:
        self._drag_start = None
        self._drag_origin = None
        self._drag_button = Qt.MouseButton.NoButton
        self.unsetCursor()
        self._render_pending()

    def leaveEvent(self, event: object) -> None:
        self._set_cursor_text("")

    def _update_cursor_value(self, pos: QPointF) -> None:
        point = self.image_point(pos)
        text = ""
        if point is not None and self.decoded is not None:
            text = value_text(self.decoded, self.modality, *point)
        self._set_cursor_text(text)

    def _set_cursor_text(self, text: str) -> None:
        if text != self.cursor_text:
            self.cursor_text = text
            self.update()
            self.cursorChanged.emit(text)

    def wheelEvent(self, event: QWheelEvent | None) -> None:
        if event is None:
            return
        delta = event.angleDelta().y()
        if not delta:
            return
        if event.modifiers() & Qt.KeyboardModifier.ControlModifier:
            self.zoom_by(ZOOM_STEP ** (delta / 120.0), event.position())
        elif self.slice_count > 1:
            # one slice per notch (120); touchpads send small deltas, which add up.
            # Towards the user (negative) is the next slice, as in OHIF.
            self._wheel_rest += delta
            notches = int(self._wheel_rest / 120)
            self._wheel_rest -= notches * 120
            if notches:
                self.step_slice(-notches)
        event.accept()

    def contextMenuEvent(self, event: object) -> None:
        pass  # right-drag is zoom, not a menu
