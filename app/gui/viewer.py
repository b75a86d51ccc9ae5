"""The full image viewer: a stack of frames with OHIF v3 habits (../shared/CONVENTIONS.md).

Mouse: left-drag window/level, middle-drag pan, right-drag zoom, wheel scrolls slices
(Ctrl+wheel zooms). Keys: Up/Down (and Page Up/Down, Home/End) previous/next image, z or + / -
zoom, = fit, r / l rotate, h / v flip, i invert, Space reset, 1-5 CT presets (CT only: they are
Hounsfield windows; other modalities start from the file's own window or a modality default,
see app/gui/viewer_model.py). The canvas (app/gui/viewer_canvas.py) paints the overlays.

"Find similar" (Ctrl+F) searches the archive with the stored features of the image on
screen: the viewer emits ``findSimilarRequested`` with that image's metadata and whoever
opened it (the Archive page, the Search page) forwards it to the Search page. It shows for
archived images whose metadata the opener passed (``metas``/``frames``), not for local files.

Nothing slow runs on the UI thread: fetching, decrypting and decoding go through the task
runner; extra frames of a multi-frame local file are decoded there too, in the decoder child.
An archived series or multi-frame instance opens as a :class:`LazyStack`: the slice asked for
first, then its neighbours, are decrypted on demand by a :class:`SliceLoader` and cached.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PyQt6.QtCore import QObject, QSize, Qt, pyqtSignal
from PyQt6.QtGui import QAction, QKeyEvent, QKeySequence
from PyQt6.QtWidgets import (
    QComboBox,
    QDialog,
    QHBoxLayout,
    QLabel,
    QToolBar,
    QVBoxLayout,
    QWidget,
)

from app.core.meta import ImageMeta
from app.core.types import DecodedImage, Repository
from app.gui import theme
from app.gui.context import AppContext
from app.gui.tasks import Task, TaskContext, TaskError
from app.gui.viewer_canvas import ZOOM_STEP, ImageCanvas
from app.gui.viewer_model import (
    PRESETS,
    ImageStack,
    LazyStack,
    SliceRef,
    Stack,
    default_window,
    has_presets,
    prefetch_order,
)

__all__ = ["PRESETS", "ZOOM_STEP", "ImageCanvas", "ImageViewer", "SliceLoader",
           "default_window", "open_archived", "open_local", "open_stack", "supports_presets"]

MAX_STACK_BYTES = 768 * 1024**2
"""Most decoded frames (float32) a multi-frame local file may hold in the viewer; the rest
are left out and the title says so (a 2,000-frame cine would otherwise take gigabytes)."""


def supports_presets(img: DecodedImage) -> bool:
    """CT presets apply to grey CT images only (CONVENTIONS.md "Radiology habits")."""
    return has_presets(img, str(img.metadata.get("Modality", "")))


class ImageViewer(QDialog):
    """A window around ImageCanvas with a toolbar, the presets (CT) and a status line."""

    findSimilarRequested = pyqtSignal(object)  # ImageMeta of the image on screen

    def __init__(self, title: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(f"{title} — Radcrypt")
        self.setWindowFlag(Qt.WindowType.WindowMaximizeButtonHint, True)
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
        self.resize(900, 760)
        self.export_original: Callable[[], None] | None = None
        self.loader: SliceLoader | None = None  # an archived stack's (open_stack)
        self.similar_metas: list[ImageMeta | None] = []  # per slice, for "Find similar"
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

        def act(icon: str, text: str, keys: list[str], slot: Any) -> QAction:
            action = theme.themed(QAction(text, self), icon) if icon else QAction(text, self)
            action.setShortcuts([QKeySequence(k) for k in keys])
            action.setToolTip(f"{text} ({', '.join(keys)})" if keys else text)
            action.triggered.connect(slot)
            self.toolbar.addAction(action)
            return action

        def hidden(text: str, keys: list[str], slot: Any) -> QAction:
            action = QAction(text, self)
            action.setShortcuts([QKeySequence(k) for k in keys])
            action.triggered.connect(slot)
            self.addAction(action)
            return action

        act("fit", "Fit", ["="], self.canvas.fit)
        act("zoom_in", "Zoom in", ["+", "z"], lambda: self.canvas.zoom_by(ZOOM_STEP))
        act("zoom_out", "Zoom out", ["-"], lambda: self.canvas.zoom_by(1 / ZOOM_STEP))
        self.toolbar.addSeparator()
        act("rotate", "Rotate right", ["r"], lambda: self.canvas.rotate(90))
        act("flip", "Flip horizontally", ["h"], lambda: self.canvas.flip(True))
        hidden("Flip vertically", ["v"], lambda: self.canvas.flip(False))
        hidden("Rotate left", ["l"], lambda: self.canvas.rotate(-90))
        self.invert_action = act("invert", "Invert", ["i"],
                                 lambda: self.canvas.set_inverted(not self.canvas.inverted))
        act("reset", "Reset", ["Space"], self._reset)
        hidden("Previous image", ["Up", "PgUp"], lambda: self.canvas.step_slice(-1))
        hidden("Next image", ["Down", "PgDown"], lambda: self.canvas.step_slice(1))
        hidden("First image", ["Home"], lambda: self.canvas.set_slice(0))
        hidden("Last image", ["End"], lambda: self.canvas.set_slice(self.canvas.slice_count - 1))
        self.preset_separator = self._separator()
        self.preset_label = QLabel("  CT window: ")
        self.presets = QComboBox()
        self.presets.setFocusPolicy(Qt.FocusPolicy.NoFocus)  # Up/Down stay slice keys
        self.presets.addItem("Default (from the file)")
        for i, (name, width, centre) in enumerate(PRESETS, start=1):
            self.presets.addItem(f"{i}  {name} (W {width:g} / L {centre:g})")
        self.presets.activated.connect(self.apply_preset)
        self.preset_label_action = self.toolbar.addWidget(self.preset_label)
        self.presets_action = self.toolbar.addWidget(self.presets)
        for i in range(len(PRESETS)):
            hidden(f"Preset {i + 1}", [str(i + 1)], lambda _=False, n=i + 1: self.apply_preset(n))
        self.similar_separator = self._separator()
        self.similar_action = act("search", "Find similar", ["Ctrl+F"], self.find_similar)
        self.export_separator = self._separator()
        self.export_action = act("", "Export original…", [], self._export)
        self.export_action.setToolTip("Save the decrypted original file (verified before it "
                                      "is written)")
        self.set_export(None)
        self.set_similar([])
        self._show_presets(False)
        self.canvas.viewChanged.connect(self._update_readout)
        self.canvas.cursorChanged.connect(lambda _: self._update_readout())
        self._update_readout()

    def _separator(self) -> QAction:
        action = self.toolbar.addSeparator()
        assert action is not None  # Qt returns the separator it added
        return action

    def set_export(self, export: Callable[[], None] | None) -> None:
        """Offer "Export original…" (archived images) through ``export``."""
        self.export_original = export
        self.export_action.setVisible(export is not None)
        self.export_separator.setVisible(export is not None)

    def _export(self) -> None:
        if self.export_original is not None:
            self.export_original()

    def set_similar(self, metas: Sequence[ImageMeta | None]) -> None:
        """Offer "Find similar" for archived images: ``metas[i]`` is slice i's metadata
        (None where unknown: the action is then disabled on that slice)."""
        self.similar_metas = list(metas)
        self._update_similar()

    def current_meta(self) -> ImageMeta | None:
        """The metadata of the image on screen, when the opener gave it."""
        index = self.canvas.index if self.canvas.slice_count else 0
        meta = self.similar_metas[index] if 0 <= index < len(self.similar_metas) else None
        return meta if meta is not None and not meta.error else None

    def _update_similar(self) -> None:
        offered = any(m is not None for m in self.similar_metas)
        self.similar_action.setVisible(offered)
        self.similar_separator.setVisible(offered)
        meta = self.current_meta()
        self.similar_action.setEnabled(meta is not None)
        self.similar_action.setToolTip(
            "Find similar (Ctrl+F): search the archive with this image's stored encrypted "
            "features" if meta is not None else
            "Find similar: this image's archive entry is not known here")

    def find_similar(self) -> None:
        """Ask for a search with the image on screen; the main window comes forward with
        the Search page."""
        meta = self.current_meta()
        if meta is None:
            return
        self.findSimilarRequested.emit(meta)
        owner = self.parentWidget()
        window = owner.window() if owner is not None else None
        if window is not None:
            window.raise_()
            window.activateWindow()

    def set_busy(self, text: str) -> None:
        self.canvas.busy_text = text
        self.canvas.update()

    def set_image(self, img: DecodedImage) -> None:
        self.set_stack(ImageStack.of_images([img]))

    def set_stack(self, stack: Stack, index: int | None = None) -> None:
        self.canvas.set_stack(stack, index)
        self._show_presets(self.presets_available)
        self.presets.setCurrentIndex(0)
        self._update_readout()

    @property
    def presets_available(self) -> bool:
        img = self.canvas.decoded
        return img is not None and has_presets(img, self.canvas.modality)

    def _show_presets(self, show: bool) -> None:
        for action in (self.preset_separator, self.presets_action, self.preset_label_action):
            if action is not None:
                action.setVisible(show)

    def apply_preset(self, number: int) -> None:
        """0 = the default window, 1-5 = CONVENTIONS.md's CT presets; nothing for non-CT."""
        img = self.canvas.decoded
        if img is None or not self.presets_available or not 0 <= number <= len(PRESETS):
            return
        if number == 0:
            window = default_window(img, self.canvas.modality)
            if window is None:
                return
            centre, width = window
        else:
            _, width, centre = PRESETS[number - 1]
        self.presets.setCurrentIndex(number)
        self.canvas.set_window(centre, width)

    def _reset(self) -> None:
        self.canvas.reset_all()
        self.presets.setCurrentIndex(0)

    def _update_readout(self) -> None:
        c = self.canvas
        parts = []
        if c.cursor_text:
            parts.append(c.cursor_text)
        if c.slice_count > 1:
            parts.append(f"image {c.index + 1}/{c.slice_count}"
                         + (" (decrypting…)" if c.loading else ""))
        if c.window_level is not None and c.windowable:
            parts.append(f"W {c.window_level[1]:.0f} / L {c.window_level[0]:.0f}")
        parts.append(f"zoom {c.zoom * 100:.0f}%")
        if self.similar_metas:
            self._update_similar()
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


class SliceLoader(QObject):
    """Decrypts the slices of a LazyStack that its canvas asks for, off the UI thread.

    One task at a time: it decrypts the slice asked for, then a few ahead in the direction
    of scrolling (``prefetch_order``), handing each to the canvas as it decodes. A request
    for a slice outside the running task's list cancels what is left of it (checked
    between slices), so fast scrolling decrypts where the reader stops, not every slice
    passed on the way. Frames of one multi-frame original are decrypted with one download.
    """

    def __init__(self, ctx: AppContext, repo: Repository, stack: LazyStack,
                 canvas: ImageCanvas, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.repo = repo
        self.stack = stack
        self.canvas = canvas
        self.wanted: int | None = None
        self.direction = 1
        self.task: Task | None = None
        self._running: list[int] = []
        self.loaded = 0  # slices decrypted so far (tests, status)
        self.failed: TaskError | None = None
        # Called with the first slice wanted once it is decrypted, while the canvas shows
        # nothing yet (a LazyStack opens on a slice it holds).
        self.on_first: Callable[[int], None] | None = None
        canvas.sliceRequested.connect(self.request)

    def request(self, index: int, direction: int = 1) -> None:
        self.wanted, self.direction = index, direction
        if self.task is None:
            self._start()
        elif index not in self._running:
            self.task.cancel()  # the rest of its prefetch; restarted when it ends

    def _start(self) -> None:
        if self.wanted is None:
            return
        order = self.stack.missing(prefetch_order(self.wanted, len(self.stack),
                                                  self.direction))
        if not order:
            return
        # Slices of one original (frames of a multi-frame file) share a download; the
        # original holding the wanted slice comes first.
        by_original: dict[str, tuple[SliceRef, list[int]]] = {}
        for i in order:
            ref = self.stack.refs[i]
            by_original.setdefault(ref.original_id, (ref, []))[1].append(i)
        groups = list(by_original.values())
        backend = self.ctx.backend
        repo = self.repo
        refs = self.stack.refs

        def work(task: TaskContext) -> int:
            done = 0
            for first, indices in groups:
                task.check()

                def one(position: int, img: DecodedImage, indices: list[int] = indices) -> None:
                    task.progress((indices[position], img))

                backend.fetch_frames(repo, first.original_id, [refs[i].frame for i in indices],
                                     first.name, first.version, on_image=one,
                                     cancel=task.cancel)
                done += len(indices)
            return done

        self._running = order
        self.failed = None
        self.task = self.ctx.runner.run(
            f"Decrypting slice {self.wanted + 1} of {len(self.stack)}", work,
            cancellable=True, tracked=False, light=True, on_progress=self._arrived,
            on_error=self._failed, on_finish=self._finished)

    def _arrived(self, item: tuple[int, DecodedImage]) -> None:
        index, img = item
        self.stack.put(index, img, keep=self.canvas.shown_index)
        self.loaded += 1
        try:
            if self.canvas.busy_text and self.canvas.stack is self.stack:
                self.canvas.busy_text = ""  # an earlier slice's failure is past
            if self.canvas.stack is not self.stack:
                if index == self.wanted and self.on_first is not None:
                    self.on_first(index)
            else:
                self.canvas.slice_loaded(index)
        except RuntimeError:
            pass  # the viewer was closed

    def _failed(self, error: TaskError) -> None:
        self.failed = error
        try:
            self.canvas.busy_text = error.message
            self.canvas.update()
        except RuntimeError:
            pass

    def _finished(self) -> None:
        self.task = None
        self._running = []
        if self.failed is None and self.wanted is not None \
                and not self.stack.has(self.wanted):
            self._start()

    @property
    def idle(self) -> bool:
        return self.task is None


def open_stack(ctx: AppContext, parent: QWidget, repo: Repository, stack: LazyStack,
               title: str, index: int | None = None,
               metas: Sequence[ImageMeta | None] | None = None) -> ImageViewer:
    """Open an archived stack at slice ``index`` (default: the middle, as PACS viewers open
    a series): the viewer shows as soon as that slice is decrypted, its neighbours follow.
    ``metas`` (one per slice) offers "Find similar" (connect ``findSimilarRequested``)."""
    viewer = ImageViewer(title, parent.window())
    if metas is not None and len(metas) == len(stack):
        viewer.set_similar(metas)
    first = len(stack) // 2 if index is None else max(0, min(len(stack) - 1, index))
    viewer.set_busy(f"Downloading, verifying and decrypting image {first + 1} of "
                    f"{len(stack)}…")
    viewer.show()
    loader = SliceLoader(ctx, repo, stack, viewer.canvas, viewer)
    viewer.loader = loader

    def export_current() -> None:  # the original of the slice on screen
        ref = stack.refs[viewer.canvas.index]
        export_original(ctx, viewer, repo, ref.original_id, ref.name, ref.version)

    if hasattr(ctx.backend, "get_original"):
        viewer.set_export(export_current)

    loader.on_first = lambda index: viewer.set_stack(stack, index)
    loader.request(first, 1)
    return viewer


def open_archived(ctx: AppContext, parent: QWidget, repo: Repository, image_id: str,
                  name: str, version: int | None, meta: ImageMeta | None = None,
                  frames: Sequence[ImageMeta] = ()) -> ImageViewer:
    """Open the viewer now and fill it once the original is fetched and decrypted; a frame
    of a multi-frame instance (``meta`` known) opens as the stack of its frames. With
    ``meta`` the viewer offers "Find similar" (``frames``: the other frames' metadata,
    where known, so that it follows the frame on screen)."""
    if meta is not None and meta.frames > 1 and not meta.error:
        stack = LazyStack.of_frames(meta)
        by_frame = {m.frame: m for m in frames if m.original_image_id == meta.original_image_id}
        by_frame[meta.frame] = meta
        return open_stack(ctx, parent, repo, stack, name or meta.name, meta.frame,
                          metas=[by_frame.get(i) for i in range(len(stack))])
    viewer = ImageViewer(name or image_id[:12], parent.window())
    if meta is not None:
        viewer.set_similar([meta])
    viewer.set_busy("Downloading, verifying and decrypting the original…")
    viewer.show()
    backend = ctx.backend

    def work(_: TaskContext) -> DecodedImage:
        return backend.fetch_image(repo, image_id, name, version)

    def failed(error: TaskError) -> None:
        viewer.set_busy(error.message)
        ctx.error(error)

    if hasattr(backend, "get_original"):  # /work/p15-h8-backend.patch
        viewer.set_export(lambda: export_original(ctx, viewer, repo, image_id, name, version))
    ctx.runner.run(f"Opening {name or image_id}", work,
                   on_done=lambda img: _fill(viewer, img), on_error=failed)
    return viewer


def export_original(ctx: AppContext, parent: QWidget, repo: Repository, image_id: str,
                    name: str, version: int | None) -> None:
    """Ask where, then download, verify and decrypt the original there (off the UI thread);
    nothing unverified is written (the client writes beside the target and renames)."""
    dest = ctx.dialogs.save_file(parent, "Export the decrypted original", name or image_id)
    if not dest:
        return
    backend: Any = ctx.backend  # get_original: /work/p15-h8-backend.patch

    def work(_: TaskContext) -> int:
        size: int = backend.get_original(repo, image_id, dest, version)
        return size

    def done(size: int) -> None:
        ctx.info(f"Saved the decrypted original ({size:,} bytes) to {dest}", "success")

    ctx.runner.run(f"Exporting {name or image_id}", work, on_done=done, on_error=ctx.error)


def open_local(ctx: AppContext, parent: QWidget, path: str) -> ImageViewer:
    """Open a local file; a multi-frame file becomes a stack of its frames (when the
    backend can decode one frame at a time), within MAX_STACK_BYTES."""
    viewer = ImageViewer(Path(path).name, parent.window())
    viewer.set_busy("Decoding…")
    viewer.show()

    def failed(error: TaskError) -> None:
        viewer.set_busy(error.message)

    backend: Any = ctx.backend  # decode(path, frame): /work/p15-h8-backend.patch
    by_frame = "frame" in inspect.signature(backend.decode).parameters

    def work(task: TaskContext) -> ImageStack:
        first = backend.decode(path)
        if first.n_frames <= 1 or not by_frame:
            return ImageStack.of_images([first])
        return load_frames(lambda i: backend.decode(path, frame=i), first, task.check)

    ctx.runner.run(f"Opening {Path(path).name}", work,
                   on_done=lambda stack: _fill_stack(viewer, stack), on_error=failed)
    return viewer


def load_frames(decode_frame: Callable[[int], DecodedImage], first: DecodedImage,
                check: Callable[[], None] = lambda: None) -> ImageStack:
    """Every frame of a multi-frame file (``first`` is the one already decoded, the middle
    frame), up to MAX_STACK_BYTES; ``check`` raises to cancel between frames."""
    per_frame = max(1, first.pixels.nbytes)
    count = max(1, min(first.n_frames, MAX_STACK_BYTES // per_frame))
    middle = first.n_frames // 2
    images = []
    for i in range(count):
        check()
        images.append(first if i == middle else decode_frame(i))
    return ImageStack.of_images(images)


def _fill(viewer: ImageViewer, img: DecodedImage) -> None:
    _fill_stack(viewer, ImageStack.of_images([img]))


def _fill_stack(viewer: ImageViewer, stack: ImageStack) -> None:
    try:
        viewer.set_stack(stack)
        first = stack.image(0)
        if first.n_frames > len(stack):
            viewer.caption.setText(f"{viewer.caption.text()} — first {len(stack)} of "
                                   f"{first.n_frames} frames (memory limit)")
    except RuntimeError:
        pass  # the viewer was closed before the image arrived
