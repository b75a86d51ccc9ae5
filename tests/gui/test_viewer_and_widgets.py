"""The image viewer, the demo window and small pieces, without a store where possible."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from guitools import WAIT_MS
from PyQt6.QtCore import QPoint, Qt
from PyQt6.QtTest import QTest

from app.gui.activity import ActivityLog
from app.gui.backend import password_problem, password_strength
from app.gui.main_window import DemoOptions
from app.gui.tasks import TaskRunner
from app.gui.viewer import PRESETS, ImageViewer, default_window
from app.imaging.decode import decode_image


@pytest.fixture
def ct_file() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


def test_viewer_presets_and_window_level_drag(qtbot, ct_file):
    img = decode_image(ct_file)
    viewer = ImageViewer("CT_small.dcm")
    qtbot.addWidget(viewer)
    viewer.show()
    viewer.set_image(img)
    canvas = viewer.canvas
    assert canvas.window_level == default_window(img, "CT") == (40.0, 400.0)  # soft tissue
    assert viewer.presets_action.isVisible()

    viewer.apply_preset(2)  # lung
    _, width, centre = PRESETS[1]
    assert canvas.window_level == (centre, width)
    assert "W 1500 / L -600" in viewer.readout.text()
    lung = canvas._qimage.copy()

    start = QPoint(100, 100)
    # left-drag is window/level (OHIF v3); tests/gui/test_viewer_habits.py has the rest
    QTest.mousePress(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, start)
    QTest.mouseMove(canvas, QPoint(160, 140))
    QTest.mouseRelease(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                       QPoint(160, 140))
    new_centre, new_width = canvas.window_level
    assert new_width > width and new_centre > centre
    assert canvas._qimage != lung  # re-windowed from the modality values

    zoom = canvas.zoom
    canvas.zoom_by(2.0)
    assert canvas.zoom == pytest.approx(zoom * 2)
    canvas.fit()
    assert canvas.zoom == pytest.approx(zoom)
    canvas.rotate(90)
    canvas.set_inverted(True)
    assert "inverted" in viewer.readout.text() and "rotated 90°" in viewer.readout.text()
    canvas.reset_all()
    assert canvas.window_level == default_window(img, "CT") and not canvas.inverted
    assert canvas.rotation == 0


def test_viewer_has_no_presets_for_colour_pictures(qtbot, tmp_path):
    from PIL import Image

    path = tmp_path / "colour.png"
    Image.fromarray(np.full((40, 60, 3), 128, dtype=np.uint8)).save(path)
    viewer = ImageViewer("colour.png")
    qtbot.addWidget(viewer)
    viewer.show()
    viewer.set_image(decode_image(path))
    assert not viewer.presets_action.isVisible()
    viewer.apply_preset(1)
    assert viewer.canvas.window_level is None


def test_task_runner_reports_errors_plainly_and_cancels(qtbot):
    from app.core.errors import RadcryptError

    runner = TaskRunner()
    errors = []

    def fail(_ctx):
        raise RadcryptError("the bucket does not exist")

    with qtbot.waitSignal(runner.taskFinished, timeout=WAIT_MS):
        runner.run("Failing", fail, on_error=errors.append)
    assert errors[0].message == "The bucket does not exist."
    assert "RadcryptError" in errors[0].details

    cancelled = []

    def loop(ctx):
        while True:
            ctx.check()
            time.sleep(0.001)

    task = runner.run("Looping", loop, cancellable=True, on_cancel=lambda: cancelled.append(1))
    assert runner.busy
    with qtbot.waitSignal(runner.taskFinished, timeout=WAIT_MS):
        task.cancel()
    assert cancelled == [1] and runner.idle
    assert runner.wait_for_done(5_000)  # before the runner (and its pools) is destroyed


def test_activity_log_survives_restarts_newest_first(tmp_path):
    path = tmp_path / "activity.jsonl"
    log = ActivityLog(path)
    log.record("import", "Imported 3 images")
    log.record("search", "Searched")
    with path.open("a") as handle:
        handle.write('{"torn":')  # a crash mid-line must not lose the rest
    again = ActivityLog(path)
    assert [e.text for e in again.entries()] == ["Searched", "Imported 3 images"]


def test_password_strength_is_the_identity_estimate():
    """One estimate (zxcvbn, app.core.identity): the GUI keeps no fallback of its own."""
    assert password_problem("abc") and password_strength("abc")[0] <= 2
    assert password_problem("aaaaaaaaaaaaaaaaaaaa")
    assert "too easy to guess" in password_problem("password123")
    assert password_problem("correct horse battery staple 42") == ""
    assert password_strength("correct horse battery staple 42")[0] >= 3


def test_demo_mode_opens_with_sample_images(qtbot, make_window, tmp_path):
    workdir = tmp_path / "demo"
    workdir.mkdir()
    window = make_window(demo=DemoOptions(workdir, count=20, remove_workdir=True))
    qtbot.waitUntil(lambda: window.ctx.repo is not None, timeout=WAIT_MS * 2)
    assert window.ctx.repo.repo_id.startswith("demo-")
    qtbot.waitUntil(lambda: len(window.archive_page.all_entries) == 20, timeout=WAIT_MS)
    assert any((workdir / "queries").iterdir())
    assert not window.settings_page.save_button.isEnabled()
    window.close()
    qtbot.waitUntil(lambda: window.shutdown_done, timeout=WAIT_MS)
    assert not workdir.exists()
