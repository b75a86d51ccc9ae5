"""What every page is given instead of reading globals: backend, task runner, activity
log, dialogs, and signals about the current repository (Spyder's habit: widgets never
reach for the configuration themselves, so each can be built and tested alone)."""

from __future__ import annotations

from pathlib import Path

from PyQt6.QtCore import QObject, pyqtSignal
from PyQt6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.core.types import Repository
from app.gui import theme
from app.gui.activity import ActivityLog
from app.gui.backend import Backend
from app.gui.tasks import TaskError, TaskRunner
from app.gui.widgets import primary

IMAGE_FILTER = ("Images (*.dcm *.dicom *.png *.jpg *.jpeg *.tif *.tiff);;"
                "DICOM (*.dcm *.dicom);;All files (*)")


class Dialogs:
    """Every question the GUI asks the user goes through here (tests replace it)."""

    def confirm(self, parent: QWidget | None, title: str, text: str, ok: str) -> bool:
        box = QMessageBox(parent)
        box.setIcon(QMessageBox.Icon.Question)
        box.setWindowTitle(title)
        box.setText(text)
        yes = box.addButton(ok, QMessageBox.ButtonRole.AcceptRole)
        box.addButton("Cancel", QMessageBox.ButtonRole.RejectRole)
        box.setDefaultButton(yes)
        box.exec()
        return box.clickedButton() is yes

    def password(self, parent: QWidget | None, title: str, text: str) -> str | None:
        value, ok = QInputDialog.getText(parent, title, text, QLineEdit.EchoMode.Password)
        return value if ok else None

    def open_files(self, parent: QWidget | None, title: str, start: str = "") -> list[str]:
        files, _ = QFileDialog.getOpenFileNames(parent, title, start, IMAGE_FILTER)
        return files

    def open_folder(self, parent: QWidget | None, title: str, start: str = "") -> str:
        return QFileDialog.getExistingDirectory(parent, title, start)

    def open_image(self, parent: QWidget | None, title: str, start: str = "") -> str:
        path, _ = QFileDialog.getOpenFileName(parent, title, start, IMAGE_FILTER)
        return path

    def open_text_file(self, parent: QWidget | None, title: str) -> str:
        path, _ = QFileDialog.getOpenFileName(parent, title, "",
                                              "Identity cards (*.json);;All files (*)")
        return path

    def choose(self, parent: QWidget | None, title: str, label: str, items: list[str]
               ) -> str | None:
        value, ok = QInputDialog.getItem(parent, title, label, items, 0, True)
        return value.strip() if ok and value.strip() else None

    def card_text(self, parent: QWidget | None) -> str | None:
        """A user's public identity card: pasted, or loaded from a file."""
        dialog = CardDialog(self, parent)
        return dialog.card() if dialog.exec() else None

    def save_file(self, parent: QWidget | None, title: str, name: str) -> str:
        path, _ = QFileDialog.getSaveFileName(parent, title, name,
                                              "Identity cards (*.json);;All files (*)")
        return path


class CardDialog(QDialog):
    """Paste a user's public identity card, or load it from the file they sent."""

    def __init__(self, dialogs: Dialogs, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.dialogs = dialogs
        self.setWindowTitle("Register a user")
        self.setMinimumSize(520, 340)
        layout = QVBoxLayout(self)
        text = QLabel("Paste the identity card the user gave you (it contains only public "
                      "keys), or load the file they sent.")
        text.setWordWrap(True)
        layout.addWidget(text)
        self.edit = QPlainTextEdit()
        self.edit.setPlaceholderText('{"user_id": "…", "name": "…", …}')
        layout.addWidget(self.edit, 1)
        row = QHBoxLayout()
        load = theme.themed(QPushButton("Load from file…"), "folder")
        load.clicked.connect(self._load)
        row.addWidget(load)
        row.addStretch(1)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        primary(buttons.addButton("Register", QDialogButtonBox.ButtonRole.AcceptRole))
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        row.addWidget(buttons)
        layout.addLayout(row)

    def _load(self) -> None:
        path = self.dialogs.open_text_file(self, "Load an identity card")
        if path:
            try:
                with open(path, encoding="utf-8") as handle:
                    self.edit.setPlainText(handle.read(256 * 1024))
            except (OSError, UnicodeDecodeError) as exc:
                self.edit.setPlainText(f"(could not read {path}: {exc})")

    def card(self) -> str:
        return self.edit.toPlainText().strip()


class AppContext(QObject):
    """Shared by the main window and its pages."""

    repositoryChanged = pyqtSignal(object)  # Repository | None
    repositoriesListed = pyqtSignal(list)  # list[Manifest]
    connectionChanged = pyqtSignal(bool, str)  # connected, where in words
    archiveChanged = pyqtSignal(str)  # repo_id whose images changed
    message = pyqtSignal(str, str, str)  # level, text, details

    def __init__(self, backend: Backend, runner: TaskRunner, activity: ActivityLog,
                 dialogs: Dialogs | None = None, demo_queries: Path | None = None,
                 demo: bool = False, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.backend = backend
        self.runner = runner
        self.activity = activity
        self.dialogs = dialogs or Dialogs()
        self.repo: Repository | None = None
        self.demo_queries = demo_queries
        self.demo = demo

    def set_repository(self, repo: Repository | None) -> None:
        self.repo = repo
        self.repositoryChanged.emit(repo)

    def error(self, error: TaskError, record: bool = True) -> None:
        """Show a failure in plain words (details on demand) and log it."""
        self.message.emit("error", error.message, error.details)
        if record:
            self.activity.record("error", error.message, error.details,
                                 self.repo.repo_id if self.repo else "")

    def info(self, text: str, level: str = "info") -> None:
        self.message.emit(level, text, "")
