"""Linked comparison: viewers that share zoom, pan and window, and the side-by-side dialog
that compares a query with a search result.

Why relative zoom: the query (a local file, perhaps a screenshot) and the archived result
rarely have the same size; linking the zoom *relative to each one's fit* and the pan in the
same proportion keeps the same anatomy under the same part of both panes. The window is
shared only between grey images of the same modality (a CT window means nothing to an
ultrasound); the link never copies slices, which belong to each stack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PyQt6.QtCore import QObject, QPointF, QSize, Qt
from PyQt6.QtGui import QAction, QKeyEvent, QKeySequence
from PyQt6.QtWidgets import (
    QCheckBox,
    QDialog,
    QGridLayout,
    QLabel,
    QToolBar,
    QWidget,
)

from app.core.meta import ImageMeta
from app.core.types import DecodedImage, Repository
from app.gui import theme
from app.gui.context import AppContext
from app.gui.tasks import TaskContext, TaskError
from app.gui.viewer import export_original
from app.gui.viewer_canvas import ZOOM_STEP, ImageCanvas
from app.gui.viewer_model import ImageStack


class ViewLink(QObject):
    """Keeps the zoom, pan and window of several canvases in step while enabled."""

    def __init__(self, canvases: list[ImageCanvas], parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.canvases = list(canvases)
        self.enabled = True
        self._syncing = False
        for canvas in self.canvases:
            canvas.viewChanged.connect(lambda c=canvas: self._changed(c))

    def set_enabled(self, on: bool) -> None:
        """Link (or unlink); linking aligns the geometry to the first canvas but leaves each
        window as it is until the user changes one."""
        self.enabled = on
        if on and self.canvases:
            self._changed(self.canvases[0], window=False)

    def _changed(self, source: ImageCanvas, window: bool = True) -> None:
        if self._syncing or not self.enabled or source.decoded is None:
            return
        self._syncing = True
        try:
            for other in self.canvases:
                if other is not source and other.decoded is not None:
                    self._copy(source, other, window)
        finally:
            self._syncing = False

    @staticmethod
    def _copy(source: ImageCanvas, other: ImageCanvas, window: bool) -> None:
        if source.fitted:
            if not other.fitted or abs(other.zoom - other.fit_zoom()) > 1e-9:
                other.fit()
        else:
            scale = other.fit_zoom() / max(1e-9, source.fit_zoom())
            other.zoom = source.zoom * scale
            other.pan = QPointF(source.pan.x() * scale, source.pan.y() * scale)
            other.fitted = False
            other.update()
            other.viewChanged.emit()
        if window and source.window_level is not None and other.windowable \
                and same_units(source, other) and source.window_level != other.window_level:
            other.set_window(*source.window_level, immediate=not source._render_timer.isActive())


def same_units(a: ImageCanvas, b: ImageCanvas) -> bool:
    """Whether a window on one means the same on the other: the same modality, or (neither
    has one) the same kind of file and display range. A CT's 400/40 on an 8-bit PNG query
    would wash it out white."""
    if a.decoded is None or b.decoded is None:
        return False
    if a.modality or b.modality:
        return a.modality == b.modality
    return (a.decoded.source_format == b.decoded.source_format
            and a.decoded.display_range == b.decoded.display_range)


class CompareViewer(QDialog):
    """Query and result side by side, linked (a checkbox unlinks them)."""

    def __init__(self, left_title: str, right_title: str, parent: QWidget | None = None
                 ) -> None:
        super().__init__(parent)
        self.setWindowTitle(f"Compare: {left_title} and {right_title} — Radcrypt")
        self.setWindowFlag(Qt.WindowType.WindowMaximizeButtonHint, True)
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
        self.resize(1200, 700)
        self.left = ImageCanvas()
        self.right = ImageCanvas()
        self.link = ViewLink([self.left, self.right], self)
        self.toolbar = QToolBar()
        self.toolbar.setIconSize(QSize(20, 20))
        self.linked = QCheckBox("Linked zoom, pan and window")
        self.linked.setChecked(True)
        self.linked.toggled.connect(self.link.set_enabled)
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setSpacing(2)
        grid.addWidget(self.toolbar, 0, 0, 1, 2)
        grid.addWidget(self.left, 1, 0)
        grid.addWidget(self.right, 1, 1)
        self.left_caption = QLabel(left_title)
        self.right_caption = QLabel(right_title)
        for col, label in enumerate((self.left_caption, self.right_caption)):
            label.setObjectName("ImageCaption")
            label.setContentsMargins(10, 4, 10, 6)
            grid.addWidget(label, 2, col)
        grid.setRowStretch(1, 1)

        def act(icon: str, text: str, keys: list[str], slot: Callable[[], Any]) -> QAction:
            action = theme.themed(QAction(text, self), icon) if icon else QAction(text, self)
            action.setShortcuts([QKeySequence(k) for k in keys])
            action.setToolTip(f"{text} ({', '.join(keys)})" if keys else text)
            action.triggered.connect(slot)
            self.toolbar.addAction(action)
            return action

        act("fit", "Fit", ["="], lambda: self.focused().fit())
        act("zoom_in", "Zoom in", ["+", "z"], lambda: self.focused().zoom_by(ZOOM_STEP))
        act("zoom_out", "Zoom out", ["-"], lambda: self.focused().zoom_by(1 / ZOOM_STEP))
        act("reset", "Reset", ["Space"], self._reset)
        self.toolbar.addWidget(self.linked)
        self.export_action = act("", "Export original…", [], lambda: None)
        self.export_action.setVisible(False)

    def focused(self) -> ImageCanvas:
        return self.right if self.right.hasFocus() else self.left

    def _reset(self) -> None:
        for canvas in (self.left, self.right):
            canvas.reset_all()

    def set_left(self, img: DecodedImage) -> None:
        self.left.set_stack(ImageStack.of_images([img]))
        self.link.set_enabled(self.linked.isChecked())

    def set_right(self, img: DecodedImage) -> None:
        self.right.set_stack(ImageStack.of_images([img]))
        self.link.set_enabled(self.linked.isChecked())

    def keyPressEvent(self, event: QKeyEvent | None) -> None:
        if event is not None and event.key() == Qt.Key.Key_Escape:
            self.close()
            return
        super().keyPressEvent(event)


def fetch_archived(backend: Any, repo: Repository, meta: ImageMeta) -> DecodedImage:
    """An archived image decrypted and decoded: a frame of a multi-frame instance from its
    instance's stored original (app/core/meta.py ``original_image_id``)."""
    frame = meta.frame if meta.frames > 1 else None
    images = backend.fetch_frames(repo, meta.original_image_id, [frame], meta.name,
                                  meta.key_version or None)
    image: DecodedImage = images[0]
    return image


def open_compare(ctx: AppContext, parent: QWidget, query_path: str, repo: Repository,
                 image_id: str, name: str, version: int | None, *,
                 query_image: ImageMeta | None = None, meta: ImageMeta | None = None
                 ) -> CompareViewer:
    """The query (decoded locally, or ``query_image`` decrypted from the archive: "Find
    similar") beside an archived result (fetched and decrypted), both off the UI thread;
    ``meta``, when known, names the result's frame of a multi-frame instance."""
    from pathlib import Path

    query_name = query_image.name if query_image is not None else Path(query_path).name
    viewer = CompareViewer(query_name, name or image_id[:12], parent.window())
    viewer.left.busy_text = "Decoding…"
    viewer.right.busy_text = "Downloading, verifying and decrypting the original…"
    viewer.show()
    backend = ctx.backend
    if hasattr(backend, "get_original"):
        viewer.export_action.triggered.connect(
            lambda: export_original(ctx, viewer, repo, image_id, name, version))
        viewer.export_action.setVisible(True)

    def fill(side: str, img: DecodedImage) -> None:
        try:
            (viewer.set_left if side == "left" else viewer.set_right)(img)
        except RuntimeError:
            pass  # closed before the image arrived

    def failed(canvas: ImageCanvas, error: TaskError) -> None:
        try:
            canvas.busy_text = error.message
            canvas.update()
        except RuntimeError:
            pass

    def fetch(_: TaskContext) -> DecodedImage:
        if meta is not None and hasattr(backend, "fetch_frames"):
            return fetch_archived(backend, repo, meta)
        return backend.fetch_image(repo, image_id, name, version)

    def query(_: TaskContext) -> DecodedImage:
        if query_image is not None:
            return fetch_archived(backend, repo, query_image)
        return backend.decode(query_path)

    ctx.runner.run(f"Opening {query_name}", query,
                   on_done=lambda img: fill("left", img),
                   on_error=lambda e: failed(viewer.left, e))
    ctx.runner.run(f"Opening {name or image_id}", fetch,
                   on_done=lambda img: fill("right", img),
                   on_error=lambda e: failed(viewer.right, e))
    return viewer
