"""Helpers for the GUI tests: scripted dialogs, window start-up and shutdown, and the
few steps many tests share (unlock, create a repository, import)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from PyQt6.QtCore import QTimer
from PyQt6.QtWidgets import QWidget

from app.core.settings import load_settings
from app.gui.backend import Backend
from app.gui.context import Dialogs
from app.gui.main_window import DemoOptions, MainWindow

TEST_PASSWORD = "correct horse battery staple 42"
WAIT_MS = 60_000


class FakeDialogs(Dialogs):
    """Answers every question the GUI asks, and remembers what was asked."""

    def __init__(self) -> None:
        self.confirm_answer = True
        self.confirmations: list[tuple[str, str]] = []
        self.passwords: list[str | None] = []
        self.files: list[str] = []
        self.folder = ""
        self.image = ""
        self.choice: str | None = None
        self.card: str | None = None
        self.save_path = ""

    def confirm(self, parent: QWidget | None, title: str, text: str, ok: str) -> bool:
        self.confirmations.append((title, text))
        return self.confirm_answer

    def password(self, parent: QWidget | None, title: str, text: str) -> str | None:
        return self.passwords.pop(0) if self.passwords else None

    def open_files(self, parent: QWidget | None, title: str, start: str = "") -> list[str]:
        return list(self.files)

    def open_folder(self, parent: QWidget | None, title: str, start: str = "") -> str:
        return self.folder

    def open_image(self, parent: QWidget | None, title: str, start: str = "") -> str:
        return self.image

    def choose(self, parent: QWidget | None, title: str, label: str, items: list[str]
               ) -> str | None:
        return self.choice

    def card_text(self, parent: QWidget | None) -> str | None:
        return self.card

    def save_file(self, parent: QWidget | None, title: str, name: str) -> str:
        return self.save_path


def new_window(qtbot: Any, dialogs: FakeDialogs, identity_mode: bool = True,
               demo: DemoOptions | None = None, start: bool = True) -> MainWindow:
    from app.gui.app import demo_settings, make_application

    make_application()
    settings = demo_settings(demo.workdir) if demo else load_settings()
    backend = Backend(settings, identity_mode=False if demo else identity_mode)
    window = MainWindow(backend, dialogs=dialogs, demo=demo, remember_state=False)
    window.show()
    if start:
        window.start()
    return window


def close_window(qtbot: Any, window: MainWindow, dialogs: FakeDialogs) -> None:
    """Close through the window's own path (cancel workers, close the session)."""
    if window.shutdown_done:
        return
    dialogs.confirm_answer = True
    window.close()
    qtbot.waitUntil(lambda: window.shutdown_done, timeout=WAIT_MS)


def wait_connected(qtbot: Any, window: MainWindow) -> None:
    qtbot.waitUntil(lambda: window.backend.connected and window.connect_task is None,
                    timeout=WAIT_MS)


def wait_idle(qtbot: Any, window: MainWindow) -> None:
    qtbot.waitUntil(lambda: window.runner.idle, timeout=WAIT_MS)


def pass_gate(qtbot: Any, window: MainWindow, name: str = "Dr. Test",
              password: str = TEST_PASSWORD) -> None:
    """Register (first run) or unlock, when identities are installed."""
    if not window.backend.identity_mode:
        return
    gate = window.gate
    qtbot.waitUntil(lambda: gate.submit_button.text() != "" and window.runner.idle,
                    timeout=WAIT_MS)
    if gate.mode == "register":
        gate.name.setText(name)
        gate.again.setText(password)
    gate.password.setText(password)
    if gate.mode == "register":
        gate.again.setText(password)
    gate.submit()
    qtbot.waitUntil(lambda: window.stack.currentWidget() is window.workspace, timeout=WAIT_MS)


def create_repository(qtbot: Any, window: MainWindow, name: str) -> None:
    """Through the Repository key page's dialog, as a user would (owned by the identity
    the window unlocked: no repository is locked by a password alone any more)."""
    wait_connected(qtbot, window)
    window.show_page("keys")
    dialog = window.keys_page.open_new_repository()
    dialog.name.setText(name)
    assert dialog.create_button.isEnabled(), dialog.problem.text()
    dialog.create_button.click()
    qtbot.waitUntil(lambda: window.ctx.repo is not None and window.ctx.repo.repo_id == name,
                    timeout=WAIT_MS)


def create_legacy_repository(qtbot: Any, window: MainWindow, name: str,
                             password: str = TEST_PASSWORD) -> None:
    """The objects of a repository made before identities (password-locked), written
    straight into the window's store: only to test opening and migrating old ones."""
    try:
        from owned_repos import create_legacy_password_repository
    except ImportError:  # pragma: no cover
        from tests.owned_repos import create_legacy_password_repository

    wait_connected(qtbot, window)
    session = window.backend.session
    assert session is not None
    create_legacy_password_repository(session.store, name, password)


def import_files(qtbot: Any, window: MainWindow, files: list[Path]) -> None:
    page = window.import_page
    window.show_page("import")
    page.add_paths([str(f) for f in files])
    qtbot.waitUntil(lambda: len(page.model.rows) >= len(files), timeout=WAIT_MS)


class Heartbeat:
    """A QTimer in the UI thread: the longest gap between its ticks is how long the UI
    thread was blocked (give or take one interval)."""

    def __init__(self, interval_ms: int = 20) -> None:
        self.interval_ms = interval_ms
        self.last = time.perf_counter()
        self.longest_ms = 0.0
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.longest_ms = max(self.longest_ms, (now - self.last) * 1000)
        self.last = now

    def start(self) -> None:
        self.last = time.perf_counter()
        self.timer.start()

    def stop(self) -> float:
        self.timer.stop()
        return self.longest_ms


def names(paths: list[Path]) -> list[str]:
    return [Path(p).name for p in paths]
