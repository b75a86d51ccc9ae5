"""Blackout regions in the desktop client (issue 16, H14).

A research repository refuses an image that may carry burned-in patient text (here a real
ultrasound file from pydicom-data, US1_UNCR.dcm: modality US, no BurnedInAnnotation). The
Import page says why in plain words and offers "Mark text to black out…": a dialog shows
the image (decoded on the workstation, off the UI thread), rectangles are dragged with the
mouse (one removed again with a right-click), and "Import with these regions" imports the
file. The stored de-identified copy, downloaded and decrypted again, has the regions painted
with the image's minimum and every other pixel as it was.
Screenshots: /tmp/radcrypt-blackout.png (the dialog), /tmp/radcrypt-blackout-refused.png
(the Import page after the refusal).
"""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
from guitools import WAIT_MS, import_files, pass_gate, wait_connected, wait_idle
from PyQt6.QtCore import Qt

from app.core.deid import Blackout
from app.gui.blackout_dialog import (
    BlackoutCanvas,
    is_burned_in_refusal,
    refusal_words,
    region_text,
)
from app.gui.import_page import IMPORTED, NEEDS_BLACKOUT


def test_refusal_is_recognised_and_said_in_plain_words():
    core = ("US1.dcm: the image may carry burned-in patient text (BurnedInAnnotation absent, "
            "modality US); a research repository takes it only with blackout regions")
    assert is_burned_in_refusal(core)
    assert not is_burned_in_refusal("x.png: research repositories take DICOM files only")
    words = refusal_words()
    assert "written into the picture" in words and "Mark text to black out" in words
    assert region_text(Blackout(3, 4, 50, 20)) == "x 3, y 4: 50 × 20 pixels"


def _drag(qtbot, canvas: BlackoutCanvas, x0: int, y0: int, x1: int, y1: int) -> None:
    """A left-button drag between two image pixel positions, as the mouse does it."""
    a, b = canvas.to_widget(x0, y0).toPoint(), canvas.to_widget(x1, y1).toPoint()
    qtbot.mousePress(canvas, Qt.MouseButton.LeftButton, pos=a)
    qtbot.mouseMove(canvas, pos=(a + b) / 2)
    qtbot.mouseMove(canvas, pos=b)
    qtbot.mouseRelease(canvas, Qt.MouseButton.LeftButton, pos=b)


def _near(region: Blackout, x: int, y: int, w: int, h: int, slack: int = 2) -> bool:
    return all(abs(a - b) <= slack for a, b in
               zip((region.x, region.y, region.width, region.height), (x, y, w, h),
                   strict=True))


def test_refused_ultrasound_is_imported_with_drawn_regions(qtbot, make_window, tmp_path):
    from pydicom.data import get_testdata_file

    source = tmp_path / "US1_UNCR.dcm"
    shutil.copyfile(get_testdata_file("US1_UNCR.dcm"), source)
    original = pydicom.dcmread(source).pixel_array  # 480 x 640 RGB
    assert original.shape == (480, 640, 3)

    window = make_window()
    pass_gate(qtbot, window)
    wait_connected(qtbot, window)
    repo = window.backend.client.create_repository("research-us", policy="research")
    window.open_repository("research-us")
    qtbot.waitUntil(lambda: window.ctx.repo is not None, timeout=WAIT_MS)
    page = window.import_page
    assert window.backend.policy(window.ctx.repo) == "research"
    assert "refused at first" in page.policy_note.text()

    # refused first, in plain words; nothing imported
    import_files(qtbot, window, [source])
    assert not page.blackout_button.isVisibleTo(page)
    page.start_button.click()
    qtbot.waitUntil(lambda: page.last_report is not None and not page.running,
                    timeout=WAIT_MS)
    assert page.last_report.imported == [] and len(page.last_report.failed) == 1
    row = page.model.rows[0]
    assert row.status == NEEDS_BLACKOUT and row.detail == refusal_words()
    assert page.blackout_button.isVisibleTo(page) and page.blackout_button.isEnabled()
    assert not page.start_button.isEnabled()  # a plain retry would be refused again
    assert "0 failed, 1 needs text blacked out" in page.summary.text()
    assert page.grab().save("/tmp/radcrypt-blackout-refused.png")

    # the dialog: the image decoded off the UI thread, regions dragged, one removed
    page.table.selectRow(0)
    page.blackout_button.click()
    dialog = page.blackout_dialog
    assert dialog is not None
    qtbot.waitExposed(dialog)
    qtbot.waitUntil(lambda: dialog.loaded, timeout=WAIT_MS)
    canvas = dialog.canvas
    assert (canvas.image.width(), canvas.image.height()) == (640, 480)
    assert not dialog.import_button.isEnabled()  # no region yet
    # the file's burned-in text: hospital and ids top left, probe and ids top right, the
    # clock, and the index line at the bottom
    _drag(qtbot, canvas, 10, 15, 180, 110)
    _drag(qtbot, canvas, 300, 200, 360, 260)  # a mistake, removed below
    _drag(qtbot, canvas, 635, 110, 490, 15)  # dragged up and left: still a rectangle
    _drag(qtbot, canvas, 270, 30, 370, 60)
    _drag(qtbot, canvas, 395, 452, 635, 478)
    _drag(qtbot, canvas, 100, 100, 100, 100)  # a click is no region
    assert len(dialog.regions()) == 5 and dialog.list.count() == 5
    qtbot.mousePress(canvas, Qt.MouseButton.RightButton,
                     pos=canvas.to_widget(330, 230).toPoint())
    regions = dialog.regions()
    assert len(regions) == 4 and dialog.list.count() == 4
    for region, expected in zip(regions, [(10, 15, 170, 95), (490, 15, 145, 95),
                                          (270, 30, 100, 30), (395, 452, 240, 26)],
                                strict=True):
        assert _near(region, *expected), regions
    assert "4 regions marked" in dialog.status.text()
    assert dialog.import_button.isEnabled()
    assert dialog.grab().save("/tmp/radcrypt-blackout.png")

    # imported with those regions
    page.last_report = None
    dialog.import_button.click()
    qtbot.waitUntil(lambda: page.last_report is not None and not page.running,
                    timeout=WAIT_MS)
    wait_idle(qtbot, window)
    report = page.last_report
    assert report.failed == [] and len(report.imported) == 1, report.failed
    assert page.model.rows[0].status == IMPORTED
    assert not page.blackout_button.isVisibleTo(page)

    # the stored copy: the regions painted with the image's minimum, the rest unchanged
    image_id = report.imported[0][1]
    dest = tmp_path / "copy.dcm"
    window.backend.get_original(repo, image_id, str(dest))
    copy = pydicom.dcmread(dest)
    assert copy.PatientIdentityRemoved == "YES" and copy.BurnedInAnnotation == "NO"
    pixels = copy.pixel_array
    assert pixels.shape == original.shape
    low = original.min()
    painted = np.zeros(original.shape[:2], dtype=bool)
    for r in regions:
        painted[r.y:r.y + r.height, r.x:r.x + r.width] = True
    assert (pixels[painted] == low).all()
    assert not (original[painted] == low).all()  # the text area was not black before
    assert np.array_equal(pixels[~painted], original[~painted])
