"""A series opens as a stack: the wheel and Up/Down scroll it, "Image n/N" in the overlay,
slices decrypted on demand off the UI thread with a small cache (app/gui/viewer.py
SliceLoader, app/gui/viewer_model.py LazyStack). Real MR slices (pydicom's emri_small
frames written as a series), imported, stored encrypted and decrypted back.

Screenshot: /tmp/radcrypt-series-stack.png.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from archive_flow import archive_with_studies
from guitools import WAIT_MS, Heartbeat
from PyQt6.QtCore import QPoint, QPointF, Qt
from PyQt6.QtGui import QWheelEvent
from PyQt6.QtTest import QTest
from PyQt6.QtWidgets import QApplication

from app.core.meta import ImageMeta
from app.gui.viewer_model import LazyStack, SliceRef, prefetch_order
from app.imaging.decode import DecodedImage

NO_MOD = Qt.KeyboardModifier.NoModifier


def wheel(widget, notches: int) -> None:
    centre = QPointF(widget.width() / 2, widget.height() / 2)
    event = QWheelEvent(centre, widget.mapToGlobal(centre), QPoint(0, 0),
                        QPoint(0, 120 * notches), Qt.MouseButton.NoButton, NO_MOD,
                        Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(widget, event)


def frame(value: float, side: int = 8) -> DecodedImage:
    return DecodedImage(np.full((side, side), value, np.float32), "dicom")


# --- Qt-free rules -----------------------------------------------------------------------


def test_lazy_stack_keeps_a_bounded_cache_and_never_drops_the_slice_on_screen():
    refs = [SliceRef(f"{i:032x}", f"{i:032x}", None) for i in range(10)]
    one = frame(0).pixels.nbytes
    stack = LazyStack(refs, capacity_bytes=3 * one)
    for i in range(6):
        stack.put(i, frame(i), keep=0)
    assert stack.cached == [0, 4, 5]  # the least recently used went, slice 0 stayed
    assert not stack.has(2)
    with pytest.raises(LookupError, match="slice 3 of 10 is not decrypted yet"):
        stack.image(2)
    assert stack.missing([5, 6, 4, 3, 11, -1]) == [6, 3]
    assert float(stack.image(4).pixels[0, 0]) == 4.0


def test_prefetch_goes_ahead_in_the_scroll_direction_then_one_back():
    assert prefetch_order(5, 10, +1) == [5, 6, 7, 8, 9, 4]
    assert prefetch_order(5, 10, -1) == [5, 4, 3, 2, 1, 6]
    assert prefetch_order(0, 3, -1) == [0, 1]


def test_frames_of_a_multi_frame_instance_point_at_its_one_stored_original():
    meta = ImageMeta("f" * 32, "cine.dcm", frame=3, frames=6, original_id="a" * 32)
    stack = LazyStack.of_frames(meta)
    assert len(stack) == 6
    assert {r.original_id for r in stack.refs} == {"a" * 32}
    assert [r.frame for r in stack.refs] == list(range(6))
    single = SliceRef.of_meta(ImageMeta("b" * 32, "one.dcm"))
    assert single.frame is None and single.original_id == "b" * 32


# --- the flow ---------------------------------------------------------------------------------


def test_series_opens_as_a_stack_that_the_wheel_and_keys_scroll(qtbot, make_window,
                                                                tmp_path):
    window, files = archive_with_studies(qtbot, make_window, tmp_path / "data", "stacks")
    archive = window.archive_page
    mr = next(s for s in archive.studies if s.patient_name == "Mouse^Minnie")
    assert [len(s.images) for s in mr.series] == [10]
    series = mr.series[0]
    numbers = [m.attribute("InstanceNumber") for m in series.images]
    assert numbers == [str(i) for i in range(1, 11)]  # stack order, not import order

    archive.choose_study(mr.key)
    assert archive.series_strip.count() == 1
    archive.series_strip.setCurrentRow(0)
    assert archive.current_series is not None and len(archive.scope) == 10
    viewer = archive.open_series(archive.current_series)
    viewer.resize(760, 640)
    canvas = viewer.canvas
    qtbot.waitUntil(lambda: canvas.stack is not None and not canvas.loading,
                    timeout=WAIT_MS)
    assert canvas.slice_count == 10 and canvas.index == 5  # opens on the middle slice
    assert "Image 6/10" in canvas.overlay_texts()["bottom_right"]
    loader = viewer.loader
    assert loader is not None
    qtbot.waitUntil(lambda: loader.idle, timeout=WAIT_MS)
    assert len(loader.stack.cached) < 10  # decrypted on demand, not the whole series

    truth = [pydicom.dcmread(f).pixel_array.astype(np.float32)
             for f in sorted(files) if f.parent.name == "mr"]
    np.testing.assert_array_equal(canvas.decoded.pixels, truth[5])

    canvas.setFocus()
    heartbeat = Heartbeat(20)
    heartbeat.start()
    wheel(canvas, -1)  # towards the user: the next slice
    qtbot.waitUntil(lambda: canvas.index == 6 and not canvas.loading, timeout=WAIT_MS)
    np.testing.assert_array_equal(canvas.decoded.pixels, truth[6])
    QTest.keyClick(canvas, Qt.Key.Key_Up)
    QTest.keyClick(canvas, Qt.Key.Key_Up)
    qtbot.waitUntil(lambda: canvas.index == 4 and not canvas.loading, timeout=WAIT_MS)
    np.testing.assert_array_equal(canvas.decoded.pixels, truth[4])
    QTest.keyClick(canvas, Qt.Key.Key_End)
    qtbot.waitUntil(lambda: canvas.index == 9 and not canvas.loading, timeout=WAIT_MS)
    np.testing.assert_array_equal(canvas.decoded.pixels, truth[9])
    assert "Image 10/10" in canvas.overlay_texts()["bottom_right"]
    window_level = canvas.window_level
    QTest.keyClick(canvas, Qt.Key.Key_Home)
    qtbot.waitUntil(lambda: canvas.index == 0 and not canvas.loading, timeout=WAIT_MS)
    np.testing.assert_array_equal(canvas.decoded.pixels, truth[0])
    assert canvas.window_level == window_level  # scrolling keeps the window
    for _ in range(4):
        wheel(canvas, -1)
    qtbot.waitUntil(lambda: canvas.index == 4 and not canvas.loading, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: loader.idle, timeout=WAIT_MS)
    longest = heartbeat.stop()
    print(f"longest UI-thread gap while scrolling: {longest:.0f} ms")
    assert longest < 500, f"the UI thread stalled for {longest:.0f} ms while scrolling"
    shot = viewer
    brain = [s for s in archive.studies if s.patient_id == "DEMO-MNI152"]
    if brain:  # the larger real MR series makes the better picture
        shot = archive.open_series(brain[0].series[0])
        shot.resize(760, 640)
        qtbot.waitUntil(lambda: shot.canvas.stack is not None and not shot.canvas.loading,
                        timeout=WAIT_MS)
        shot.canvas.setFocus()
        QTest.keyClick(shot.canvas, Qt.Key.Key_Up)
        qtbot.waitUntil(lambda: not shot.canvas.loading and shot.loader.idle,
                        timeout=WAIT_MS)
        n = len(brain[0].series[0].images)
        assert f"Image {max(1, n // 2)}/{n}" in shot.canvas.overlay_texts()["bottom_right"]
    shot.grab().save("/tmp/radcrypt-series-stack.png")
    viewer.close()
    shot.close()

    # double-click on an image of the series: the series opens at that image
    row = next(i for i, e in enumerate(archive.model.entries)
               if e.attribute("InstanceNumber") == "3")
    before = set(window.findChildren(type(viewer)))
    archive._open(archive.model.index(row))
    at = next(iter(set(window.findChildren(type(viewer))) - before))
    qtbot.waitUntil(lambda: at.canvas.stack is not None, timeout=WAIT_MS)
    assert at.canvas.index == 2 and at.canvas.slice_count == 10
    qtbot.waitUntil(lambda: at.loader.idle, timeout=WAIT_MS)
    at.close()


def test_a_multi_frame_file_opens_as_the_stack_of_its_frames(qtbot, make_window, tmp_path):
    """Every frame of pydicom's real 10-frame MR is an archived image (one stored
    original); opened, it is a stack of its frames, each decrypted from that one object."""
    from guitools import create_repository, import_files, pass_gate
    from pydicom.data import get_testdata_file

    from app.gui.viewer import open_archived

    source = get_testdata_file("emri_small.dcm")
    window = make_window()
    pass_gate(qtbot, window)
    create_repository(qtbot, window, "cine")
    import_files(qtbot, window, [source])
    window.import_page.start_button.click()
    qtbot.waitUntil(lambda: window.import_page.task is None, timeout=WAIT_MS)
    archive = window.archive_page
    qtbot.waitUntil(lambda: len(archive.all_entries) == 10 and not archive.loading,
                    timeout=WAIT_MS)
    frames = sorted(archive.all_entries, key=lambda m: m.frame)
    assert [m.frame for m in frames] == list(range(10)) and frames[0].frames == 10
    assert {m.original_image_id for m in frames} == {frames[0].image_id}
    truth = pydicom.dcmread(source).pixel_array.astype(np.float32)

    viewer = open_archived(window.ctx, archive, archive.repo, frames[7].image_id,
                           frames[7].name, None, meta=frames[7])
    canvas = viewer.canvas
    qtbot.waitUntil(lambda: canvas.stack is not None and not canvas.loading,
                    timeout=WAIT_MS)
    assert canvas.slice_count == 10 and canvas.index == 7
    np.testing.assert_array_equal(canvas.decoded.pixels, truth[7])
    qtbot.waitUntil(lambda: viewer.loader.idle, timeout=WAIT_MS)
    # the prefetch decrypted neighbours too, from the one download of the original
    assert {6, 7, 8, 9} <= set(viewer.loader.stack.cached)
    canvas.setFocus()
    QTest.keyClick(canvas, Qt.Key.Key_Down)
    qtbot.waitUntil(lambda: canvas.index == 8 and not canvas.loading, timeout=WAIT_MS)
    np.testing.assert_array_equal(canvas.decoded.pixels, truth[8])
    assert "Image 9/10" in canvas.overlay_texts()["bottom_right"]
    qtbot.waitUntil(lambda: viewer.loader.idle, timeout=WAIT_MS)
    viewer.close()

    # a slice whose original is not in the repository: said in plain words, no stack
    from app.gui.viewer import open_stack

    missing = "0" * 32
    bogus = open_stack(window.ctx, archive, archive.repo,
                       LazyStack([SliceRef(missing, missing, None, "missing.dcm")]), "gone")
    qtbot.waitUntil(lambda: bogus.loader.failed is not None and bogus.loader.idle,
                    timeout=WAIT_MS)
    assert bogus.canvas.stack is None
    assert bogus.canvas.busy_text == bogus.loader.failed.message
    assert missing in bogus.loader.failed.message  # names the image it could not find
    bogus.close()
