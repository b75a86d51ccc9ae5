"""Workstation safety: the Lock button, Ctrl+L, and the idle lock (issue 16).

Why: a reading-room workstation is left with a study open; whoever sits down next sees
the patient and holds the radiologist's keys. After ``Settings.lock_minutes`` minutes
(default 10) without keyboard, mouse, wheel or touch input anywhere in the application,
or at once with the Lock button (Ctrl+L), the window shows only the lock screen and the
client forgets its keys:

* the identity's private keys (backend and facade: ``Client.lock`` puts a key-less
  ``LockedIdentity`` in its place), every unlocked repository (the current one is closed:
  the pages drop its images, previews and results; it is opened again after unlocking),
  the session's readers and access-log writers (``Session.forget_secrets``);
* other windows (viewers) are hidden, a question that was open is answered Cancel, every
  action of the window is disabled (no shortcut works behind the lock screen).

Unlocking asks for the password again and unlocks the identity file from disk (scrypt,
in a worker). Work already running (an import) goes on with what it holds and lets go
of it when it ends. What Python cannot wipe (immutable ``bytes`` of the keys until the
garbage collector reuses their memory, the password's QString copies) is said plainly
in docs/PRIVACY.md. The demo (no identity, throw-away keys) has no lock.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from PyQt6.QtCore import QEvent, QObject, Qt, QTimer, pyqtSignal
from PyQt6.QtGui import QAction, QKeySequence
from PyQt6.QtWidgets import (
    QApplication,
    QDialog,
    QLabel,
    QMainWindow,
    QPushButton,
    QToolButton,
    QWidget,
)

from app.core.errors import AccessDenied
from app.core.settings import DEFAULT_LOCK_MINUTES, MAX_LOCK_MINUTES
from app.gui import theme
from app.gui.tasks import TaskError
from app.gui.widgets import (
    gate_card,
    gate_status_rows,
    gate_titles,
    password_edit,
    primary,
)

LOCK_SHORTCUT = "Ctrl+L"
WRONG_PASSWORD = "Wrong password. Radcrypt stays locked; please try again."
# What counts as someone using the workstation (a timer or a repaint does not).
INPUT_EVENTS = frozenset({
    QEvent.Type.KeyPress, QEvent.Type.MouseButtonPress, QEvent.Type.MouseMove,
    QEvent.Type.Wheel, QEvent.Type.TouchBegin, QEvent.Type.TabletPress,
})


class IdleWatcher(QObject):
    """Emits ``idle`` once after ``minutes`` without user input anywhere in the
    application (an event filter on the QApplication), while started."""

    idle = pyqtSignal()

    def __init__(self, minutes: float, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.timeout.connect(self.idle.emit)
        self._last_restart = 0.0
        self.set_minutes(minutes)
        app = QApplication.instance()
        if app is not None:
            app.installEventFilter(self)

    def set_minutes(self, minutes: float) -> None:
        """A new delay (clamped to 1 s .. MAX_LOCK_MINUTES); counts again from now."""
        self.minutes = minutes
        self.timer.setInterval(int(min(max(minutes * 60_000, 1_000),
                                       MAX_LOCK_MINUTES * 60_000)))
        if self.timer.isActive():
            self.timer.start()

    def start(self) -> None:
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    @property
    def running(self) -> bool:
        return self.timer.isActive()

    def eventFilter(self, watched: QObject | None, event: QEvent | None) -> bool:
        if event is not None and event.type() in INPUT_EVENTS and self.timer.isActive():
            now = time.monotonic()
            if now - self._last_restart > 0.25:  # mouse moves come by the hundred
                self._last_restart = now
                self.timer.start()
        return False


class LockScreen(QWidget):
    """The only thing a locked window shows: who locked it, and the password field."""

    unlockRequested = pyqtSignal(str)
    quitRequested = pyqtSignal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.card, layout = gate_card(self)
        icon = QLabel()
        icon.setPixmap(theme.render_svg("lock", 48, theme.current_colors().accent))
        icon.setAlignment(Qt.AlignmentFlag.AlignCenter)
        layout.addWidget(icon)
        self.heading, self.explain = gate_titles(layout, "Radcrypt is locked")
        self.password = password_edit()
        self.password.returnPressed.connect(self.submit)
        self.password.textChanged.connect(self._validate)
        layout.addWidget(self.password)
        self.error, self.busy_bar = gate_status_rows(layout)
        self.unlock_button = primary(QPushButton(theme.icon("unlock", "#ffffff"), "Unlock"))
        self.unlock_button.setDefault(True)
        self.unlock_button.clicked.connect(self.submit)
        layout.addWidget(self.unlock_button)
        self.quit_button = QPushButton("Close Radcrypt")
        self.quit_button.setFlat(True)
        self.quit_button.clicked.connect(self.quitRequested.emit)
        layout.addWidget(self.quit_button, 0, Qt.AlignmentFlag.AlignCenter)
        self.busy = False
        self._validate()

    def show_for(self, name: str, reason: str) -> None:
        self.heading.setText(f"Locked for {name}" if name else "Locked")
        self.explain.setText(f"{reason} Your keys were removed from this program's memory "
                             "and the open repository was closed. Enter your password to "
                             "continue where you were.")
        # a wrapped label in a fixed-width card is not given its wrapped height otherwise
        inner = self.card.width() - 64
        self.explain.setMinimumHeight(self.explain.heightForWidth(inner))
        self.error.setText("")
        self.password.clear()
        self.set_busy(False)
        self.password.setFocus()

    def submit(self) -> None:
        if not self.busy and self.password.text():
            password = self.password.text()
            self.password.clear()  # QString copies cannot be wiped (docs/PRIVACY.md)
            self.unlockRequested.emit(password)

    def set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.busy_bar.setVisible(busy)
        self.password.setEnabled(not busy)
        self.unlock_button.setText("Unlocking…" if busy else "Unlock")
        self._validate()

    def show_error(self, text: str) -> None:
        self.set_busy(False)
        self.error.setText(text)
        self.password.setFocus()

    def _validate(self) -> None:
        self.unlock_button.setEnabled(not self.busy and bool(self.password.text()))


class WorkstationLock(QObject):
    """Locks and unlocks one MainWindow (app/gui/main_window.py); made by install_lock."""

    lockedChanged = pyqtSignal(bool)

    def __init__(self, window: QMainWindow, minutes: float = DEFAULT_LOCK_MINUTES) -> None:
        super().__init__(window)
        self.window: Any = window
        self.ctx = self.window.ctx
        self.backend = self.ctx.backend
        self.available = bool(self.backend.identity_mode)  # the demo has no password
        self.locked = False
        self.attempts = 0
        self.locked_user = ("", "")  # user id, name
        self._covered: QWidget | None = None
        self._hidden: list[QWidget] = []
        self._disabled: list[QAction] = []
        self._repo_id = ""
        self.screen = LockScreen()
        self.screen.unlockRequested.connect(self.unlock)
        self.screen.quitRequested.connect(self.window.close)
        self.window.stack.addWidget(self.screen)
        self.watcher = IdleWatcher(minutes, self)
        self.watcher.idle.connect(lambda: self.lock(idle=True))
        self.action = QAction(theme.icon("lock"), "Lock", window)
        self.action.setShortcut(QKeySequence(LOCK_SHORTCUT))
        self.action.setShortcutContext(Qt.ShortcutContext.ApplicationShortcut)
        self.action.setToolTip(f"Lock Radcrypt now ({LOCK_SHORTCUT}): your keys are "
                               "forgotten until you enter your password again")
        self.action.triggered.connect(lambda: self.lock(idle=False))
        self.action.setVisible(self.available)
        window.addAction(self.action)
        self.button = QToolButton()
        self.button.setDefaultAction(self.action)
        self.button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.button.setAutoRaise(True)  # shown once placed in the top bar (install_lock)

    # --- arming -----------------------------------------------------------------------------

    def arm(self) -> None:
        """Count idle time from now (once an identity is unlocked)."""
        if self.available and not self.locked and self.backend.identity is not None:
            self.watcher.start()

    def set_minutes(self, minutes: float) -> None:
        self.watcher.set_minutes(minutes)

    # --- locking ----------------------------------------------------------------------------

    def lock(self, idle: bool = False) -> bool:
        """Cover the window and forget the keys; False when there is nothing to lock (no
        identity unlocked yet, the demo, already locked)."""
        identity = self.backend.identity
        if not self.available or self.locked or identity is None:
            return False
        self.locked = True
        self.watcher.stop()
        self.locked_user = (str(identity.user_id), str(identity.name))
        del identity
        self._cover()
        self._forget_keys()
        minutes = self.watcher.minutes
        reason = (f"Radcrypt locked itself after {minutes:g} minute"
                  f"{'' if minutes == 1 else 's'} without use." if idle
                  else f"Locked at {time.strftime('%H:%M')}.")
        self.screen.show_for(self.locked_user[1], reason)
        self.ctx.activity.record("access", "Workstation locked" + (" (idle)" if idle else ""))
        self.lockedChanged.emit(True)
        return True

    def _cover(self) -> None:
        window = self.window
        self._covered = window.stack.currentWidget()
        window.stack.setCurrentWidget(self.screen)
        window.menuBar().setVisible(False)
        window.statusBar().setVisible(False)
        self._disabled = [a for a in window.findChildren(QAction)
                          if a is not self.action and a.isEnabled()]
        for action in self._disabled:
            action.setEnabled(False)
        self._hidden = []
        for widget in QApplication.topLevelWidgets():
            if widget is window or not widget.isVisible():
                continue
            if isinstance(widget, QDialog) and widget.isModal():
                widget.reject()  # a question open at the lock is answered Cancel
                continue
            widget.hide()
            self._hidden.append(widget)

    def _forget_keys(self) -> None:
        repo = self.ctx.repo
        self._repo_id = repo.repo_id if repo is not None else ""
        del repo
        self.ctx.set_repository(None)  # the pages drop the repository and its images
        self.backend.identity = None
        client = self.backend.client
        if client is not None:
            client.lock()
        gc.collect()

    # --- unlocking --------------------------------------------------------------------------

    def unlock(self, password: str) -> None:
        """Unlock the identity file with ``password`` in a worker; on success give the
        client its keys back, uncover the window and open the repository again."""
        if not self.locked:
            return
        self.screen.set_busy(True)
        backend, user_id = self.backend, self.locked_user[0]

        def work(_: object) -> None:
            identity = backend.unlock(password)
            if identity.user_id != user_id:
                backend.identity = None
                raise AccessDenied("this workstation was locked by another identity")
            client = backend.client
            if client is not None:
                client.resume(identity)

        self.ctx.runner.run("Unlocking Radcrypt", work, on_done=lambda _: self._unlocked(),
                            on_error=self._failed, tracked=False)

    def _failed(self, error: TaskError) -> None:
        if isinstance(error.exception, AccessDenied):
            self.attempts += 1
            self.screen.show_error(WRONG_PASSWORD)
            self.ctx.activity.record("error", "Unlock refused: wrong password")
        else:
            self.screen.show_error(error.message)

    def _unlocked(self) -> None:
        window = self.window
        self.locked = False
        self.attempts = 0
        window.stack.setCurrentWidget(self._covered or window.workspace)
        window.menuBar().setVisible(True)
        window.statusBar().setVisible(True)
        for action in self._disabled:
            action.setEnabled(True)
        for widget in self._hidden:
            widget.show()
        self._disabled, self._hidden, self._covered = [], [], None
        self.ctx.activity.record("access", "Workstation unlocked")
        if self._repo_id:
            window.open_repository(self._repo_id)
        self.watcher.start()
        self.lockedChanged.emit(False)


def no_core_dumps() -> bool:
    """Ask the OS for no core file of this process (RLIMIT_CORE 0, as ssh-agent and
    gpg-agent do): a crash would otherwise write the keys in memory to disk. False
    where the platform has no such limit (Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return False
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):  # pragma: no cover - a hard limit we may not lower
        return False
    return True


def install_lock(window: QMainWindow) -> WorkstationLock:
    """The lock of ``window`` (a MainWindow): the Lock button beside the user's name in
    the top bar, Ctrl+L, and the idle lock from the settings' ``lock_minutes``; armed
    when the identity is unlocked, re-timed when the settings are saved. The process
    writes no core file from then on (no_core_dumps)."""
    main: Any = window
    no_core_dumps()
    lock = WorkstationLock(window, main.backend.settings.lock_minutes)
    bar = main.user_label.parentWidget().layout()
    bar.addWidget(lock.button)
    lock.button.setVisible(lock.available)
    main.gate.unlocked.connect(lock.arm)
    main.settings_page.saved.connect(lambda s: lock.set_minutes(s.lock_minutes))
    lock.arm()
    return lock
