"""The workstation lock (app/gui/idle_lock.py) in a real window (pytest-qt, offscreen):
the Lock button covers the window, disables its actions and makes the client forget the
identity and every unlocked repository (no Identity, Repository or KeyRing object left
in the process); a wrong password keeps it locked; the right one brings back the page
and reopens the repository; and the idle lock fires after the set time without input,
not while someone is using the window. Screenshots: /tmp/radcrypt-idle-lock.png (the lock
screen), /tmp/radcrypt-idle-lock-button.png (unlocked again, the Lock button top right),
/tmp/radcrypt-gate-intended-use.png (the first screen with the intended-use notice),
/tmp/radcrypt-access-log-export.png (the Repository key page after "Export access log"),
/tmp/radcrypt-lock-setting.png (Settings, "Lock when idle for").
"""

from __future__ import annotations

import csv
import gc
import io
import resource
import time
from pathlib import Path
from typing import Any

import pytest
from guitools import TEST_PASSWORD, create_repository, import_files, pass_gate, wait_idle
from PyQt6.QtCore import QEvent, Qt
from PyQt6.QtWidgets import QApplication

from app.gui import theme
from app.gui.idle_lock import WRONG_PASSWORD, WorkstationLock, install_lock

SCREENSHOT = "/tmp/radcrypt-idle-lock.png"
BUTTON_SCREENSHOT = "/tmp/radcrypt-idle-lock-button.png"
GATE_SCREENSHOT = "/tmp/radcrypt-gate-intended-use.png"
EXPORT_SCREENSHOT = "/tmp/radcrypt-access-log-export.png"
SETTINGS_SCREENSHOT = "/tmp/radcrypt-lock-setting.png"


def _lock_of(window: Any) -> WorkstationLock:
    """The window's own lock (main_window.py installs it), else installed here the same
    way (before /work/p15-h6-main_window.patch is applied)."""
    lock = getattr(window, "workstation_lock", None)
    return lock if lock is not None else install_lock(window)


def _key_holders(user_id: str) -> list[str]:
    """Objects that hold the identity's private keys or a repository's keys."""
    from app.core.repository import Repository
    from crypto.identity import Identity
    from crypto.keys import KeyRing

    # finished tasks are deleted by the event loop (deleteLater); a running application
    # does that at once, a test's short waits may not
    QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    gc.collect()
    found = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, Identity) and obj.user_id == user_id:
                found.append(f"Identity {obj.user_id}")
            elif isinstance(obj, (Repository, KeyRing)):
                found.append(type(obj).__name__)
        except ReferenceError:
            # a library's weakref.proxy whose object is gone (isinstance asks it for its
            # class): it holds nothing, and which libraries left one depends on the order
            # the suite ran in
            continue
    return found


def _decrypt_previews(window: Any) -> None:
    """Decrypt every image's preview in a task, as the archive's series strip does (no
    local variable of the test keeps the repository: the lock must be able to drop it)."""
    backend, repo = window.backend, window.ctx.repo
    window.runner.run("Previews", lambda _: [backend.thumbnail_png(repo, i)
                                             for i in backend.archive_ids(repo)])


def test_lock_button_idle_lock_and_unlock(qtbot: Any, make_window: Any, dialogs: Any,
                                          sample_images: list[Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADCRYPT_STORE", "directory")  # files in the data dir: quick
    theme.apply_theme(QApplication.instance())  # the product's look for the screenshots
    window = make_window()
    qtbot.waitUntil(lambda: window.gate.submit_button.text() != "" and window.runner.idle,
                    timeout=60_000)
    assert "not a diagnostic device" in window.gate.intended_use.text()
    window.grab().save(GATE_SCREENSHOT)
    pass_gate(qtbot, window)
    create_repository(qtbot, window, "lock-test")
    import_files(qtbot, window, sample_images[:3])
    window.import_page.start_button.click()
    qtbot.waitUntil(lambda: window.import_page.task is None, timeout=60_000)
    wait_idle(qtbot, window)
    ids = set(window.backend.archive_ids(window.ctx.repo))
    assert len(ids) == 3
    window.show_page("archive")
    wait_idle(qtbot, window)
    _decrypt_previews(window)
    wait_idle(qtbot, window)
    lock = _lock_of(window)
    user_id = window.backend.user_id
    assert lock.button.isVisible() and lock.watcher.running  # armed after the gate
    assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)  # no core file of the keys

    qtbot.mouseClick(lock.button, Qt.MouseButton.LeftButton)
    assert lock.locked and window.stack.currentWidget() is lock.screen
    assert not window.menuBar().isVisible() and not window.statusBar().isVisible()
    assert not window.open_query_action.isEnabled()  # no shortcut works behind the lock
    assert window.backend.identity is None and window.ctx.repo is None
    assert type(window.backend.client.identity).__name__ == "LockedIdentity"
    wait_idle(qtbot, window)  # a preview task that was running lets go when it ends
    qtbot.waitUntil(lambda: _key_holders(user_id) == [], timeout=5_000)
    assert "Dr. Test" in lock.screen.heading.text()
    qtbot.wait(50)
    window.grab().save(SCREENSHOT)

    lock.screen.password.setText("not my password at all")
    lock.screen.submit()
    qtbot.waitUntil(lambda: lock.screen.error.text() == WRONG_PASSWORD, timeout=60_000)
    assert lock.locked and window.backend.identity is None

    lock.screen.password.setText(TEST_PASSWORD)
    lock.screen.submit()
    qtbot.waitUntil(lambda: not lock.locked, timeout=60_000)
    assert window.stack.currentWidget() is window.workspace
    assert window.open_query_action.isEnabled() and window.menuBar().isVisible()
    qtbot.waitUntil(lambda: window.ctx.repo is not None
                    and window.ctx.repo.repo_id == "lock-test", timeout=60_000)
    wait_idle(qtbot, window)
    qtbot.wait(200)
    window.grab().save(BUTTON_SCREENSHOT)  # the archive back, the Lock button top right

    # the previews decrypted before the lock are in the access log, which the owner
    # exports from the Repository key page
    dialogs.save_path = str(tmp_path / "access.csv")
    window.show_page("keys")
    qtbot.waitUntil(lambda: window.keys_page.access_log_button.isEnabled(), timeout=60_000)
    window.keys_page.access_log_button.click()
    qtbot.waitUntil(lambda: (tmp_path / "access.csv").exists(), timeout=60_000)
    wait_idle(qtbot, window)
    qtbot.wait(100)
    window.grab().save(EXPORT_SCREENSHOT)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "access.csv").read_text())))
    previews = [r for r in rows if r["action"] == "preview"]
    assert {r["image_id"] for r in previews} == ids, rows
    assert {r["user_id"] for r in rows} == {user_id}

    window.show_page("settings")  # where the idle minutes are set (default 10)
    assert window.settings_page.lock_minutes.value() == 10
    form = window.settings_page.form_settings()
    assert form.lock_minutes == 10 and form.store == "directory"  # saved back unchanged
    qtbot.wait(100)
    window.grab().save(SETTINGS_SCREENSHOT)

    # idle lock: one second here; input keeps it open, silence locks it
    lock.set_minutes(1 / 60)
    lock.arm()
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        qtbot.keyClick(window.archive_page, Qt.Key.Key_Shift)
        qtbot.wait(300)
    assert not lock.locked
    qtbot.waitUntil(lambda: lock.locked, timeout=5_000)
    assert "without use" in lock.screen.explain.text()
    assert window.backend.identity is None
    lock.screen.password.setText(TEST_PASSWORD)
    lock.screen.submit()
    qtbot.waitUntil(lambda: not lock.locked, timeout=60_000)
    lock.set_minutes(10)
    wait_idle(qtbot, window)
