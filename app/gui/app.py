"""``python main.py`` (and the ``radcrypt-gui`` launcher): the desktop application.

``run(demo=True)`` opens it against a throw-away embedded store in a temporary folder,
with a demo repository of sample images imported in the background (progress in the
status bar), and removes the folder on exit.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

from PyQt6.QtCore import QCoreApplication, Qt
from PyQt6.QtGui import QGuiApplication
from PyQt6.QtWidgets import QApplication, QMessageBox

from app.core.errors import RadcryptError
from app.core.settings import LOCAL, Settings, load_settings
from app.gui import logs, theme
from app.gui.backend import Backend

DEMO_IMAGES = 150


def quiet_libraries() -> None:
    """pydicom narrates every quirk of a file it still decodes; keep that out of sight."""
    import warnings

    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pydicom")
__all__ = ["demo_settings", "make_application", "quiet_libraries", "run"]


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
    if demo:
        workdir = Path(tempfile.mkdtemp(prefix="radcrypt-demo-"))
        backend = Backend(demo_settings(workdir), identity_mode=False)
        window = MainWindow(backend, demo=DemoOptions(workdir, DEMO_IMAGES))
    else:
        try:
            settings = load_settings()
        except RadcryptError as exc:
            settings, settings_problem = Settings(), str(exc)
        window = MainWindow(Backend(settings))
    window.show()
    if settings_problem:
        QMessageBox.warning(window, "Settings not used",
                            f"The saved settings could not be used, so the defaults apply "
                            f"for now:\n\n{settings_problem}")
    window.start()
    return int(app.exec())
