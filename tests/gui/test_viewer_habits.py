"""The viewer behaves as radiologists expect from OHIF v3 (../shared/CONVENTIONS.md): real
mouse and key events (QTest) on real pydicom sample files, plus the Qt-free rules behind them
(default window per modality, CT-only presets, orientation letters, value under the cursor).

Screenshots go to /tmp/radcrypt-viewer-*.png for a person to look at.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from guitools import WAIT_MS
from pydicom.data import get_testdata_file
from PyQt6.QtCore import QPoint, QPointF, Qt
from PyQt6.QtGui import QWheelEvent
from PyQt6.QtTest import QTest
from PyQt6.QtWidgets import QApplication, QWidget

from app.gui.activity import ActivityLog
from app.gui.context import AppContext
from app.gui.tasks import TaskRunner
from app.gui.viewer import ImageViewer, load_frames, open_local
from app.gui.viewer_canvas import ImageCanvas
from app.gui.viewer_link import CompareViewer
from app.gui.viewer_model import (
    PRESETS,
    ImageStack,
    StackInfo,
    default_window,
    has_presets,
    orientation_markers,
    value_text,
)
from app.imaging.decode import DecodedImage, decode_image, robust_range

NO_MOD = Qt.KeyboardModifier.NoModifier


def sample(name: str) -> Path:
    return Path(get_testdata_file(name))


def stack_of(name: str) -> ImageStack:
    """Every frame of a sample file, decoded for real, with its header's metadata."""
    path = sample(name)
    first = decode_image(path)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    frames = load_frames(lambda i: decode_image(path, i), first)
    return ImageStack.of_images([frames.image(i) for i in range(len(frames))],
                                StackInfo.from_metadata(header, first.source_format))


def shown(qtbot, stack: ImageStack, size: tuple[int, int] = (700, 600)) -> ImageViewer:
    viewer = ImageViewer("test")
    qtbot.addWidget(viewer)
    viewer.resize(*size)
    viewer.show()
    qtbot.waitExposed(viewer)
    viewer.set_stack(stack)
    viewer.activateWindow()
    qtbot.waitUntil(viewer.isActiveWindow)  # shortcuts reach the active window only
    viewer.canvas.setFocus()
    qtbot.waitUntil(viewer.canvas.hasFocus)
    return viewer


def drag(widget: QWidget, button: Qt.MouseButton, start: QPoint, end: QPoint) -> None:
    QTest.mousePress(widget, button, NO_MOD, start)
    QTest.mouseMove(widget, QPoint((start.x() + end.x()) // 2, (start.y() + end.y()) // 2))
    QTest.mouseMove(widget, end)
    QTest.mouseRelease(widget, button, NO_MOD, end)


def wheel(widget: QWidget, clicks: int, modifiers=NO_MOD) -> None:
    pos = QPointF(widget.width() / 2, widget.height() / 2)
    event = QWheelEvent(pos, widget.mapToGlobal(pos), QPoint(0, 0), QPoint(0, 120 * clicks),
                        Qt.MouseButton.NoButton, modifiers, Qt.ScrollPhase.NoScrollPhase,
                        False)
    QApplication.sendEvent(widget, event)


def screenshot(widget: QWidget, name: str) -> Path:
    path = Path(f"/tmp/radcrypt-viewer-{name}.png")
    QApplication.processEvents()  # let the layout take the latest texts
    assert widget.grab().save(str(path)), f"could not save {path}"
    return path


# --- rules (no Qt) -------------------------------------------------------------------------

def test_default_window_per_modality_and_presets_only_for_ct():
    ct = decode_image(sample("CT_small.dcm"))  # no window in the file
    assert default_window(ct, "CT") == (PRESETS[0][2], PRESETS[0][1])  # soft tissue 400/40
    assert has_presets(ct, "CT")

    mr = decode_image(sample("MR-SIEMENS-DICOM-WithOverlays.dcm"))  # the file's own window
    assert mr.window is not None
    assert default_window(mr, "MR") == mr.window
    assert not has_presets(mr, "MR")

    emri = decode_image(sample("emri_small.dcm"))  # MR without a window: percentiles
    lo, hi = robust_range(emri.pixels)
    assert default_window(emri, "MR") == pytest.approx(((lo + hi) / 2, hi - lo))

    us = decode_image(sample("US1_J2KR.dcm"))  # colour ultrasound: not windowed
    assert us.is_rgb and default_window(us, "US") is None and not has_presets(us, "US")
    grey_us = DecodedImage(pixels=us.grey, source_format="dicom")
    full = float(grey_us.pixels.min()), float(grey_us.pixels.max())
    assert default_window(grey_us, "US") == pytest.approx(((full[0] + full[1]) / 2,
                                                            full[1] - full[0]))


def test_orientation_letters_follow_rotation_and_flips():
    axial = (1, 0, 0, 0, 1, 0)  # rows go to the patient's left, columns to posterior
    assert orientation_markers(axial) == {"right": "L", "left": "R", "top": "A",
                                          "bottom": "P"}
    assert orientation_markers(axial, rotation=90) == {"right": "A", "left": "P", "top": "R",
                                                       "bottom": "L"}
    assert orientation_markers(axial, flip_h=True)["right"] == "R"
    assert orientation_markers(axial, flip_v=True)["top"] == "P"
    coronal = (1, 0, 0, 0, 0, -1)
    assert orientation_markers(coronal)["top"] == "H"
    oblique = (0.8, 0.6, 0, 0, 0, -1)
    assert orientation_markers(oblique)["right"] == "LP"
    assert orientation_markers(None) == {}


def test_stack_info_reads_the_header_and_value_text_speaks_hounsfield():
    header = pydicom.dcmread(sample("CT_small.dcm"), stop_before_pixels=True)
    info = StackInfo.from_metadata(header)
    assert info.modality == "CT" and info.patient_name == "CompressedSamples CT1"
    assert info.study_date == "2004-01-19" and info.orientation == (1, 0, 0, 0, 1, 0)
    assert not info.lossy
    lossy = pydicom.dcmread(sample("JPEG2000.dcm"), stop_before_pixels=True)
    assert StackInfo.from_metadata(lossy).lossy
    assert StackInfo.from_metadata({"ImageOrientationPatient": "junk"}).orientation is None

    ct = decode_image(sample("CT_small.dcm"))
    value = float(ct.pixels[10, 20])
    assert value_text(ct, "CT", 20, 10) == f"(20, 10) {value:.0f} HU"
    assert value_text(ct, "MR", 20, 10).startswith("(20, 10) value ")
    assert value_text(ct, "CT", 128, 0) == ""  # outside


def test_a_stack_of_plain_arrays_shares_the_template_display():
    """The data model's entry point: frames as arrays plus per-stack metadata."""
    ct = decode_image(sample("CT_small.dcm"))
    frames = [ct.pixels + np.float32(10 * i) for i in range(4)]
    stack = ImageStack(frames, StackInfo(modality="CT", series_description="axial"), ct)
    assert len(stack) == 4 and stack.image(3).pixels[0, 0] == ct.pixels[0, 0] + 30
    assert stack.image(3).monochrome1 == ct.monochrome1 and stack.image(3) is stack.image(3)
    bare = ImageStack(frames, StackInfo(modality="CT"))
    assert default_window(bare.image(0), "CT") == (40.0, 400.0)
    with pytest.raises(IndexError, match="frame 4 is not in a stack of 4"):
        stack.image(4)
    with pytest.raises(ValueError, match="at least one frame"):
        ImageStack([])
    assert StackInfo.from_metadata({}, "jpeg").lossy  # a baseline JPEG picture is lossy
    assert not StackInfo.from_metadata({}, "png").lossy


# --- mouse, keys, overlays -----------------------------------------------------------------

def test_mouse_bindings_are_ohif_v3(qtbot):
    viewer = shown(qtbot, stack_of("CT_small.dcm"))
    canvas = viewer.canvas
    centre, width = canvas.window_level
    before = canvas._qimage.copy()

    drag(canvas, Qt.MouseButton.LeftButton, QPoint(200, 200), QPoint(260, 240))
    new_centre, new_width = canvas.window_level
    assert new_width > width and new_centre > centre  # right = wider, down = higher level
    assert canvas._qimage != before  # re-windowed from the Hounsfield values
    assert canvas.pan == QPointF(0, 0)  # left-drag no longer pans

    drag(canvas, Qt.MouseButton.MiddleButton, QPoint(200, 200), QPoint(230, 180))
    assert (canvas.pan.x(), canvas.pan.y()) == pytest.approx((30, -20))
    assert canvas.window_level == (new_centre, new_width)  # middle-drag does not window

    zoom = canvas.zoom
    drag(canvas, Qt.MouseButton.RightButton, QPoint(300, 300), QPoint(300, 200))
    assert canvas.zoom == pytest.approx(zoom * 2)  # 100 px up doubles
    drag(canvas, Qt.MouseButton.RightButton, QPoint(300, 300), QPoint(300, 400))
    assert canvas.zoom == pytest.approx(zoom)

    wheel(canvas, -1)  # a single image: the wheel does nothing
    assert canvas.zoom == pytest.approx(zoom) and canvas.index == 0
    wheel(canvas, 1, Qt.KeyboardModifier.ControlModifier)  # Ctrl+wheel zooms
    assert canvas.zoom == pytest.approx(zoom * 1.25)


def test_wheel_and_keys_scroll_a_multi_frame_stack(qtbot):
    stack = stack_of("emri_small.dcm")  # 10 MR frames
    assert len(stack) == 10
    viewer = shown(qtbot, stack)
    canvas = viewer.canvas
    assert canvas.index == 5 and "Image 6/10" in canvas.overlay_texts()["bottom_right"]
    zoom, window = canvas.zoom, canvas.window_level

    wheel(canvas, -1)  # towards the user: next slice
    assert canvas.index == 6
    wheel(canvas, 2)  # two notches in one event: two slices back
    assert canvas.index == 4
    assert np.array_equal(canvas.decoded.pixels, decode_image(sample("emri_small.dcm"),
                                                              4).pixels)
    QTest.keyClick(canvas, Qt.Key.Key_Down)
    QTest.keyClick(canvas, Qt.Key.Key_Down)
    assert canvas.index == 6
    QTest.keyClick(canvas, Qt.Key.Key_Up)
    QTest.keyClick(canvas, Qt.Key.Key_Up)
    assert canvas.index == 4
    QTest.keyClick(canvas, Qt.Key.Key_End)
    assert canvas.index == 9
    wheel(canvas, -3)  # stops at the last slice
    assert canvas.index == 9
    QTest.keyClick(canvas, Qt.Key.Key_Home)
    assert canvas.index == 0 and "Image 1/10" in canvas.overlay_texts()["bottom_right"]
    assert canvas.zoom == zoom and canvas.window_level == window  # scrolling keeps the view
    assert "image 1/10" in viewer.readout.text()

    QTest.keyClick(canvas, Qt.Key.Key_2)  # presets are CT windows: nothing for MR
    assert canvas.window_level == window and not viewer.presets_action.isVisible()
    screenshot(viewer, "mr-stack")


def test_ct_presets_keys_and_reset(qtbot):
    viewer = shown(qtbot, stack_of("CT_small.dcm"))
    canvas = viewer.canvas
    assert viewer.presets_action.isVisible()
    default = canvas.window_level
    for n, (_, width, centre) in enumerate(PRESETS, start=1):
        QTest.keyClick(canvas, getattr(Qt.Key, f"Key_{n}"))
        assert canvas.window_level == (centre, width)
        assert f"W {width:.0f} / L {centre:.0f}" in canvas.overlay_texts()["bottom_left"]
    QTest.keyClick(canvas, Qt.Key.Key_I)
    QTest.keyClick(canvas, Qt.Key.Key_R)
    QTest.keyClick(canvas, Qt.Key.Key_H)
    assert canvas.inverted and canvas.rotation == 90 and canvas.flip_h
    # painted as: mirror in image space, then rotate: the patient's left (rows) points up
    assert canvas.markers() == {"top": "L", "bottom": "R", "right": "A", "left": "P"}
    QTest.keyClick(canvas, Qt.Key.Key_Space)
    assert canvas.window_level == default and not canvas.inverted
    assert canvas.rotation == 0 and not canvas.flip_h and canvas.fitted


def test_overlays_value_under_cursor_and_lossy_flag(qtbot):
    viewer = shown(qtbot, stack_of("CT_small.dcm"))
    canvas = viewer.canvas
    texts = canvas.overlay_texts()
    assert texts["top_left"][:2] == ["CompressedSamples CT1", "ID 1CT1"]
    assert "2004-01-19" in texts["top_left"]
    assert "CT" in " ".join(texts["top_right"])
    assert texts["bottom_left"][0] == "W 400 / L 40"
    assert texts["bottom_left"][1] == f"Zoom {canvas.zoom * 100:.0f}%"
    assert texts["bottom_right"][:2] == ["Image 1/1", "128 × 128"]
    assert "LOSSY" not in texts["bottom_right"]
    assert canvas.markers() == {"right": "L", "left": "R", "top": "A", "bottom": "P"}

    col, row = 40, 70
    at = canvas.widget_point(col, row).toPoint()
    QTest.mouseMove(canvas, at)
    assert canvas.image_point(QPointF(at)) == (col, row)
    hu = float(canvas.decoded.pixels[row, col])
    assert canvas.cursor_text == f"({col}, {row}) {hu:.0f} HU"
    assert canvas.cursor_text in canvas.overlay_texts()["bottom_left"]
    assert canvas.cursor_text in viewer.readout.text()
    QTest.keyClick(canvas, Qt.Key.Key_4)  # bone, so the screenshot shows the window text
    screenshot(viewer, "ct")

    lossy = shown(qtbot, stack_of("JPEG2000.dcm"))
    assert "LOSSY" in lossy.canvas.overlay_texts()["bottom_right"]
    assert not lossy.presets_action.isVisible()  # NM: no CT presets
    screenshot(lossy, "lossy")


def test_linked_compare_synchronises_zoom_pan_and_window(qtbot):
    ct = decode_image(sample("CT_small.dcm"))
    half = DecodedImage(pixels=np.ascontiguousarray(ct.pixels[::2, ::2]),
                        source_format="dicom", metadata=dict(ct.metadata))
    compare = CompareViewer("query.dcm", "result.dcm")
    qtbot.addWidget(compare)
    compare.resize(1000, 560)
    compare.show()
    qtbot.waitExposed(compare)
    compare.set_left(half)
    compare.set_right(ct)
    left, right = compare.left, compare.right
    assert right.zoom == pytest.approx(left.zoom / 2, rel=0.02)  # both fitted

    drag(left, Qt.MouseButton.RightButton, QPoint(200, 300), QPoint(200, 200))
    assert left.zoom / left.fit_zoom() == pytest.approx(right.zoom / right.fit_zoom())
    drag(right, Qt.MouseButton.MiddleButton, QPoint(200, 200), QPoint(240, 200))
    scale = left.fit_zoom() / right.fit_zoom()
    assert left.pan.x() == pytest.approx(right.pan.x() * scale)
    drag(left, Qt.MouseButton.LeftButton, QPoint(200, 200), QPoint(300, 250))
    assert right.window_level == left.window_level and left.window_level != (40.0, 400.0)
    screenshot(compare, "compare")

    png = DecodedImage(pixels=np.full((64, 64), 100, dtype=np.float32), source_format="png",
                       display_range=(0.0, 255.0))
    compare.set_left(png)  # an 8-bit query beside a CT: geometry linked, windows not
    right_window = right.window_level
    drag(right, Qt.MouseButton.LeftButton, QPoint(200, 200), QPoint(260, 200))
    assert right.window_level != right_window and left.window_level == (127.5, 255.0)
    drag(right, Qt.MouseButton.RightButton, QPoint(200, 300), QPoint(200, 250))
    assert left.zoom / left.fit_zoom() == pytest.approx(right.zoom / right.fit_zoom())

    compare.linked.setChecked(False)
    before = right.zoom
    drag(left, Qt.MouseButton.RightButton, QPoint(200, 300), QPoint(200, 250))
    assert right.zoom == before and left.zoom != before * scale


class _LocalDecoder:
    """The part of the GUI backend open_local uses, decoding for real in this process."""

    def decode(self, path: str, frame: int | None = None) -> DecodedImage:
        return decode_image(path, frame)


def test_open_local_shows_every_frame_of_a_multi_frame_file(qtbot, tmp_path):
    runner = TaskRunner()
    ctx = AppContext(_LocalDecoder(), runner, ActivityLog(tmp_path / "a.jsonl"))  # type: ignore[arg-type]
    parent = QWidget()
    qtbot.addWidget(parent)
    viewer = open_local(ctx, parent, str(sample("emri_small.dcm")))  # deletes itself on close
    qtbot.waitUntil(lambda: viewer.canvas.decoded is not None, timeout=WAIT_MS)
    assert viewer.canvas.slice_count == 10 and viewer.canvas.index == 5
    assert not viewer.export_action.isVisible()  # a local file has no original to export
    if hasattr(viewer.canvas.decoded, "display_tags"):  # /work/p15-h8-decode.patch
        assert viewer.canvas.info.study_date == "2000-01-01"
    assert runner.wait_for_done(5_000)
    viewer.close()


def test_canvas_without_image_ignores_input(qtbot):
    canvas = ImageCanvas()
    qtbot.addWidget(canvas)
    canvas.show()
    wheel(canvas, 1)
    drag(canvas, Qt.MouseButton.LeftButton, QPoint(10, 10), QPoint(50, 50))
    QTest.mouseMove(canvas, QPoint(20, 20))
    assert canvas.decoded is None and canvas.cursor_text == ""


# --- from the search page, through the real store and service ---------------------------------

def test_compare_a_result_with_the_query_and_export_its_original(qtbot, make_window, dialogs,
                                                                 sample_images, query_image,
                                                                 tmp_path):
    """Search, "Compare with the query" (linked panes), then "Export original…" writes the
    decrypted original byte for byte."""
    from guitools import create_repository, import_files, pass_gate

    window = make_window()
    pass_gate(qtbot, window)
    create_repository(qtbot, window, "compare")
    originals = sample_images[:6]
    import_files(qtbot, window, originals)
    window.import_page.start_button.click()
    qtbot.waitUntil(lambda: window.import_page.task is None, timeout=WAIT_MS)

    query, expected = query_image
    dialogs.image = str(query)
    window.open_query_action.trigger()
    page = window.search_page
    qtbot.waitUntil(lambda: page.outcome is not None and page.task is None, timeout=WAIT_MS)
    assert page.result_names()[0] == expected and page.compare_button.isEnabled()
    page.compare_button.click()
    compare = next(w for w in QApplication.topLevelWidgets()
                   if isinstance(w, CompareViewer) and w.isVisible())
    qtbot.waitUntil(lambda: compare.left.decoded is not None
                    and compare.right.decoded is not None, timeout=WAIT_MS)
    drag(compare.left, Qt.MouseButton.RightButton, QPoint(200, 300), QPoint(200, 200))
    assert compare.right.zoom / compare.right.fit_zoom() == pytest.approx(2.0)
    screenshot(compare, "compare-search")

    dialogs.save_path = str(tmp_path / "exported.dcm")
    compare.export_action.trigger()
    source = next(p for p in originals if p.name == expected)
    qtbot.waitUntil(lambda: Path(dialogs.save_path).exists(), timeout=WAIT_MS)
    qtbot.waitUntil(lambda: window.runner.idle, timeout=WAIT_MS)
    assert Path(dialogs.save_path).read_bytes() == source.read_bytes()
    compare.close()
