"""The access log's purpose field (app/gui/purpose_field.py) in a real window (pytest-qt,
offscreen): what the radiologist types in the status bar's "Purpose of access (optional)"
goes with the next original opened in the viewer, and the repository's owner reads it in
the access log (Client.access_log); cleared, the next opening records no purpose.
Screenshot: /tmp/radcrypt-access-purpose.png (the status bar with the field filled).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from guitools import create_repository, import_files, pass_gate, wait_idle
from PyQt6.QtWidgets import QApplication

from app.gui import theme
from app.gui.purpose_field import PLACEHOLDER, PurposeField, install_purpose_field
from app.gui.viewer import open_archived

SCREENSHOT = "/tmp/radcrypt-access-purpose.png"


def _field_of(window: Any) -> PurposeField:
    """The window's own field (main_window.py installs it), else installed here the same
    way (before /work/p16-H11-main_window.patch is applied)."""
    field = getattr(window, "purpose_field", None)
    return field if field is not None else install_purpose_field(window)


def _open_original(qtbot: Any, window: Any, image_id: str) -> None:
    """Open the archived image in the viewer, as the archive and the result cards do."""
    viewer = open_archived(window.ctx, window, window.ctx.repo, image_id, "", None)
    wait_idle(qtbot, window)
    qtbot.waitUntil(lambda: viewer.canvas.stack is not None, timeout=30_000)
    viewer.close()


def _originals(window: Any) -> list[tuple[str, str]]:
    report = window.backend.client.access_log(window.ctx.repo)  # the owner reads it
    assert report.ok, report.problems
    return [(e.image_id, e.purpose) for e in report.events if e.action == "original"]


def test_the_purpose_typed_goes_into_the_access_log(
        qtbot: Any, make_window: Any, dialogs: Any, sample_images: list[Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADCRYPT_STORE", "directory")  # files in the data dir: quick
    theme.apply_theme(QApplication.instance())
    window = make_window()
    pass_gate(qtbot, window)
    create_repository(qtbot, window, "purpose-test")
    dicom = [p for p in sample_images if p.suffix == ".dcm"][:1]
    import_files(qtbot, window, dicom)
    window.import_page.start_button.click()
    qtbot.waitUntil(lambda: window.import_page.task is None, timeout=60_000)
    wait_idle(qtbot, window)
    (image_id,) = window.backend.archive_ids(window.ctx.repo)

    field = _field_of(window)
    assert field.placeholderText() == PLACEHOLDER and field.isVisible()
    qtbot.keyClicks(field, "  tumour board  ")
    assert window.backend.client.access_purpose == "tumour board"
    window.show_page("archive")
    qtbot.wait(50)
    window.grab().save(SCREENSHOT)
    _open_original(qtbot, window, image_id)
    assert _originals(window) == [(image_id, "tumour board")]

    field.clear()  # no purpose: the next opening records none
    _open_original(qtbot, window, image_id)
    assert _originals(window) == [(image_id, "tumour board"), (image_id, "")]
