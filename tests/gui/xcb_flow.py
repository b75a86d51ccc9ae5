"""The child program of tests/gui/test_xcb.py: a short real session of the desktop client on
whatever X display DISPLAY names, with Qt's xcb platform (not offscreen).

Usage: python tests/gui/xcb_flow.py OUT_DIR. Starts the main window on the private data
directory the environment names, registers an identity through the gate page as a user
would, waits for the storage connection, then writes OUT_DIR/window.png (the window's own
rendering) and OUT_DIR/screen.png (the X server's framebuffer, read back through xcb) and
OUT_DIR/facts.txt (platform name, screen size, window geometry), and closes the window
through its own shutdown path. Exit status 0 only when all of that happened.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from guitools import TEST_PASSWORD, FakeDialogs, new_window
from PyQt6.QtCore import QCoreApplication, QEvent
from PyQt6.QtGui import QGuiApplication
from PyQt6.QtWidgets import QApplication

from app.gui.app import make_application

TIMEOUT_S = 120.0


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"xcb flow: timed out waiting for {what}")
        QApplication.processEvents()
        time.sleep(0.02)


def main(out: Path) -> int:
    app = make_application()  # held here: new_window does not keep a reference
    dialogs = FakeDialogs()
    window = new_window(None, dialogs)
    gate = window.gate
    wait_until(lambda: gate.submit_button.text() != "" and window.runner.idle, "the gate page")
    gate.name.setText("Dr. Xcb")
    gate.password.setText(TEST_PASSWORD)
    gate.again.setText(TEST_PASSWORD)
    if not gate.submit_button.isEnabled():
        raise SystemExit(f"xcb flow: the gate refused the identity: {gate.error.text()}")
    gate.submit_button.click()
    wait_until(lambda: window.stack.currentWidget() is window.workspace, "the workspace")
    wait_until(lambda: window.backend.connected and window.connect_task is None,
               "the storage connection")
    wait_until(window.isVisible, "the window to be shown")
    for _ in range(20):  # let the X server receive the paints
        QApplication.processEvents()
        time.sleep(0.05)
    screen = QGuiApplication.primaryScreen()
    assert screen is not None
    window.grab().save(str(out / "window.png"))
    screen.grabWindow(0).save(str(out / "screen.png"))
    geometry = window.frameGeometry()
    (out / "facts.txt").write_text(
        f"platform {QGuiApplication.platformName()}\n"
        f"screen {screen.geometry().width()}x{screen.geometry().height()}\n"
        f"window {geometry.x()} {geometry.y()} {geometry.width()} {geometry.height()}\n"
        f"user {window.backend.user_name}\n")
    dialogs.confirm_answer = True
    window.close()
    wait_until(lambda: bool(window.shutdown_done), "the window's shutdown")
    app.processEvents()
    window.deleteLater()  # as app.gui.app.run does: widgets go while the application lives
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete.value)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
