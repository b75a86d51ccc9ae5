"""``python main.py`` (and the ``radcrypt-gui`` launcher): the desktop application.

``run(demo=True)`` opens it against a throw-away embedded store in a temporary folder,
with a demo repository of sample images imported in the background (progress in the
status bar), and removes the folder on exit.

SIGTERM and SIGHUP (shutdown, logout, ``kill``) close the window the way the user would,
without the "work is still running" question: workers cancelled, the store, the search
service and the decoder children stopped, the demo folder removed. Python runs signal
handlers only between bytecodes, never inside Qt's event loop, so the signal wakes the
loop through a socket (signal.set_wakeup_fd and a QSocketNotifier).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from PyQt6.QtCore import QCoreApplication, QEvent, QSocketNotifier, Qt, QTimer
from PyQt6.QtGui import QGuiApplication
from PyQt6.QtWidgets import QApplication, QMessageBox

from app.core.errors import RadcryptError
from app.core.settings import LOCAL, Settings, load_settings
from app.gui import logs, theme
from app.gui.backend import Backend

DEMO_IMAGES = 150
FORCE_QUIT_MS = 30_000  # after a termination signal: quit even if the shutdown hangs
TERMINATION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP")
                            if hasattr(signal, name))
_WAKEUP: list[object] = []  # quit_on_signals' socket pair and notifier


def quiet_libraries() -> None:
    """pydicom narrates every quirk of a file it still decodes; keep that out of sight."""
    import warnings

    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pydicom")
__all__ = ["demo_settings", "make_application", "quiet_libraries", "quit_on_signals", "run"]


def make_application(argv: list[str] | None = None) -> QApplication:
    """The QApplication, high-DPI aware, with the palette following the system."""
    app = QApplication.instance()
    if isinstance(app, QApplication):
        return app
    QGuiApplication.setHighDpiScaleFactorRoundingPolicy(
        Qt.HighDpiScaleFactorRoundingPolicy.PassThrough)
    QCoreApplication.setOrganizationName("Radcrypt")
    QCoreApplication.setApplicationName("radcrypt")
    app = QApplication(argv if argv is not None else sys.argv[:1])
    app.setApplicationDisplayName("Radcrypt")
    app.setDesktopFileName("radcrypt")
    theme.apply_theme(app)
    theme.ThemeFollower(app)
    return app


def demo_settings(workdir: Path) -> Settings:
    try:
        base = load_settings()
    except RadcryptError:
        base = Settings()
    return base.with_overrides(data_dir=str(workdir / "data"), store=LOCAL, service_url="")


def quit_on_signals(app: QApplication, window: Any) -> list[int]:
    """On SIGTERM or SIGHUP, ``window.begin_shutdown()`` (then the application quits when
    the window has closed; after FORCE_QUIT_MS regardless). Main thread only; returns the
    signals now handled."""
    reader, writer = socket.socketpair()
    for sock in (reader, writer):
        sock.setblocking(False)
    try:
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not the main thread: leave the signals alone
        reader.close()
        writer.close()
        return []
    notifier = QSocketNotifier(reader.fileno(), QSocketNotifier.Type.Read,  # type: ignore[call-overload]
                               app)

    def drain() -> None:  # Python's own handler has run by the time this slot does
        with contextlib.suppress(OSError):
            reader.recv(64)

    notifier.activated.connect(drain)

    def shut_down() -> None:
        logging.getLogger(__name__).warning("termination signal: stopping")
        if not getattr(window, "closing", False):
            window.begin_shutdown()
        QTimer.singleShot(FORCE_QUIT_MS, app.quit)

    def handler(signum: int, _frame: object) -> None:
        for other in TERMINATION_SIGNALS:
            signal.signal(other, signal.SIG_IGN)  # one shutdown is enough
        QTimer.singleShot(0, shut_down)

    for signum in TERMINATION_SIGNALS:
        signal.signal(signum, handler)
    _WAKEUP[:] = [reader, writer, notifier]  # kept alive as long as the process
    return list(TERMINATION_SIGNALS)


def run(demo: bool = False) -> int:
    from app.gui.main_window import DemoOptions, MainWindow

    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)  # the terminal: warnings; the log file: more
    try:
        logs.start_logging()
    except OSError as exc:  # a read-only home: run without the file, and say so
        logging.getLogger(__name__).warning("no log file in %s: %s", logs.log_dir(), exc)
    app = make_application()
    settings_problem = ""
    workdir: Path | None = None
    if demo:
        from app.core import client as facade

        workdir = facade.make_demo_workdir()
        backend = Backend(demo_settings(workdir), identity_mode=False)
        window = MainWindow(backend, demo=DemoOptions(workdir, DEMO_IMAGES))
    else:
        try:
            settings = load_settings()
        except RadcryptError as exc:
            settings, settings_problem = Settings(), str(exc)
        backend = Backend(settings)
        window = MainWindow(backend)
    quit_on_signals(app, window)
    try:
        window.show()
        if settings_problem:
            QMessageBox.warning(window, "Settings not used",
                                f"The saved settings could not be used, so the defaults "
                                f"apply for now:\n\n{settings_problem}")
        window.start()
        return int(app.exec())
    finally:  # what the window's own shutdown did not get to (a forced quit)
        backend.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        # The window and its children go now, while the application lives: left to the
        # interpreter's exit, Python frees them in no particular order, and with the
        # settings page's DICOM nodes box the xcb exit crashed (SIGSEGV) about one time
        # in two after a clean shutdown (tests/gui/test_xcb.py).
        window.deleteLater()
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete.value)
