"""Settings: "Receive from PACS" — a Storage SCP (``client.pacs.receiver``) that imports
what the configured nodes send into the repository open now, started and stopped here,
with its live counts.

The receiver runs its own threads (app/integration/receiver.py); this panel only starts
and stops it in background tasks (binding a port, waiting for associations to end) and
polls ``status()`` with a QTimer — a copy of a few counters, cheap and safe from any
thread — so the UI thread never waits on the network.

The workstation lock (app/gui/idle_lock.py) does not stop a running receiver: like an
import that runs, it goes on with the repository it holds (a modality does not wait for
the radiologist to come back). Quitting stops it (the main window's closing task).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from PyQt6.QtCore import Qt, QTimer, pyqtSignal
from PyQt6.QtWidgets import (
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.core.types import Repository
from app.gui import theme
from app.gui.context import AppContext
from app.gui.nodes_settings import AET_MAX, pacs_of
from app.gui.tasks import TaskContext, TaskError
from app.gui.widgets import muted_label, primary
from app.integration.model import ReceiverStatus

POLL_MS = 500
ARCHIVE_REFRESH_S = 3.0  # the archive reloads at most this often while images arrive
DEFAULT_AET = "RADCRYPT"
DEFAULT_PORT = 11112


def status_words(status: ReceiverStatus | None, repo_id: str = "") -> str:
    """The panel's status line: what runs where, and the counts."""
    if status is None:
        return "Stopped."
    into = f" into repository {repo_id}" if repo_id else ""
    head = (f"Listening as {status.aet} on port {status.port}{into}" if status.running
            else f"Stopped (was {status.aet} on port {status.port}{into})")
    counts = (f"{status.received} received, {status.imported} imported, "
              f"{status.refused} refused, {status.failed} failed, "
              f"{status.associations} association{'s' if status.associations != 1 else ''}")
    return f"{head}: {counts}."


class ReceivePanel(QGroupBox):
    """AE title and port, Start/Stop, and the live status of the receiver."""

    statusChanged = pyqtSignal(object)  # ReceiverStatus | None

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__("Receive from PACS", parent)
        self.ctx = ctx
        self.receiver: Any = None  # the facade's Receiver while it runs
        self.repo: Repository | None = None  # the repository it imports into
        self.status: ReceiverStatus | None = None
        self.starting = False
        self.stopping = False
        self._last_imported = 0
        self._last_refresh = 0.0

        layout = QVBoxLayout(self)
        layout.setSpacing(8)
        self.intro = muted_label(
            "Modalities and the PACS send studies here by C-STORE; each image is encrypted "
            "and imported into the open repository straight away. Only the configured "
            "DICOM nodes may send.")
        layout.addWidget(self.intro)
        row = QHBoxLayout()
        row.setSpacing(8)
        self.aet = QLineEdit(DEFAULT_AET)
        self.aet.setMaxLength(AET_MAX)
        self.aet.setMaximumWidth(180)
        self.aet.setToolTip("Our AE title: the PACS must know it (and our host and port); "
                            "it is also where a PACS moves studies to on \"Import from PACS\"")
        self.port = QSpinBox()
        self.port.setRange(1, 65535)
        self.port.setValue(DEFAULT_PORT)
        self.port.setMaximumWidth(100)
        row.addWidget(QLabel("Our AE title:"))
        row.addWidget(self.aet)
        row.addSpacing(8)
        row.addWidget(QLabel("Port:"))
        row.addWidget(self.port)
        row.addStretch(1)
        self.start_button = primary(QPushButton(theme.icon("import", "#ffffff"),
                                                "Start receiving"))
        self.start_button.clicked.connect(self.toggle)
        row.addWidget(self.start_button)
        layout.addLayout(row)
        self.status_label = QLabel("Stopped.")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status_label.setObjectName("CardTitle")
        layout.addWidget(self.status_label)
        self.last_label = muted_label("")
        layout.addWidget(self.last_label)
        layout.addStretch(1)

        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)
        ctx.repositoryChanged.connect(lambda *_: self._update())
        ctx.connectionChanged.connect(self._connection_changed)
        if ctx.backend.client is not None:
            self.load_settings()
        self._update()

    def _connection_changed(self, connected: bool, _where: str = "") -> None:
        if connected:
            self.load_settings()
        self._update()

    def load_settings(self) -> None:
        """Our AE title and port as saved (the node file's receiver settings)."""
        ctx = self.ctx

        def done(mine: Any) -> None:
            if self.receiver is None and not self.starting:
                self.aet.setText(mine.aet)
                self.port.setValue(mine.port)

        ctx.runner.run("Reading the receiver settings",
                       lambda _: pacs_of(ctx).receiver_settings(), on_done=done,
                       on_error=lambda error: self.last_label.setText(error.message),
                       tracked=False)

    @property
    def running(self) -> bool:
        return self.receiver is not None and not self.stopping

    def toggle(self) -> None:
        if self.receiver is not None:
            self.stop()
        else:
            self.start()

    def start(self) -> None:
        repo, ctx = self.ctx.repo, self.ctx
        if repo is None or self.receiver is not None or self.starting:
            return
        aet, port = self.aet.text().strip() or DEFAULT_AET, self.port.value()
        self.starting = True
        self._update()

        def work(_: TaskContext) -> Any:
            pacs = pacs_of(ctx)
            # Remembered for the next start, and for C-MOVE: a PACS moves studies to the
            # AE title and port of these settings.
            mine = pacs.receiver_settings()
            if (mine.aet, mine.port) != (aet, port):
                pacs.save_receiver_settings(dataclasses.replace(mine, aet=aet, port=port))
            receiver = pacs.receiver(repo, aet=aet, port=port)
            receiver.start()
            return receiver

        def done(receiver: Any) -> None:
            self.receiver, self.repo = receiver, repo
            self._last_imported, self._last_refresh = 0, time.monotonic()
            ctx.activity.record("import", f"Receiving as {aet} on port {port} into "
                                f"{repo.repo_id}", "", repo.repo_id)
            self.timer.start()
            self.poll()

        def failed(error: TaskError) -> None:
            self.last_label.setText(f"Could not start: {error.message}")
            ctx.error(error)

        def finish() -> None:
            self.starting = False
            self._update()

        ctx.runner.run(f"Starting the receiver on port {port}", work, on_done=done,
                       on_error=failed, on_finish=finish, tracked=False)

    def stop(self) -> None:
        receiver = self.receiver
        if receiver is None or self.stopping:
            return
        self.stopping = True
        self._update()

        def finish() -> None:
            self.poll()  # the final counts
            self.timer.stop()
            self.receiver = None
            self.stopping = False
            self._refresh_archive(force=True)
            self._update()

        def failed(error: TaskError) -> None:
            self.ctx.error(error)

        self.ctx.runner.run("Stopping the receiver", lambda _: receiver.stop(),
                            on_error=failed, on_finish=finish)

    def detach(self) -> Any:
        """Hand the running receiver over (the window's shutdown stops it in its closing
        task) and forget it here."""
        receiver, self.receiver = self.receiver, None
        self.timer.stop()
        return receiver

    def poll(self) -> None:
        receiver = self.receiver
        if receiver is None:
            return
        try:
            status = receiver.status()
        except Exception as exc:  # a receiver that died: say so, keep the window alive
            self.last_label.setText(f"The receiver stopped answering: {exc}")
            return
        self.status = status
        repo_id = self.repo.repo_id if self.repo is not None else ""
        self.status_label.setText(status_words(status, repo_id))
        self.last_label.setText(status.last_message)
        if status.imported != self._last_imported:
            self._last_imported = status.imported
            self._refresh_archive()
        self.statusChanged.emit(status)

    def _refresh_archive(self, force: bool = False) -> None:
        """Let the archive show what arrived: at once when stopping, otherwise at most
        every few seconds (a study of hundreds of images would reload it hundreds of
        times)."""
        if self.repo is None or self._last_imported == 0:
            return
        now = time.monotonic()
        if force or now - self._last_refresh >= ARCHIVE_REFRESH_S:
            self._last_refresh = now
            self.ctx.archiveChanged.emit(self.repo.repo_id)

    def _update(self) -> None:
        repo = self.ctx.repo
        connected = self.ctx.backend.client is not None
        active = self.receiver is not None or self.starting
        self.aet.setEnabled(not active)
        self.port.setEnabled(not active)
        if self.starting:
            text = "Starting…"
        elif self.stopping:
            text = "Stopping…"
        elif self.receiver is not None:
            text = "Stop receiving"
        else:
            text = "Start receiving"
        self.start_button.setText(text)
        self.start_button.setEnabled(connected and not self.starting and not self.stopping
                                     and (self.receiver is not None or repo is not None))
        if self.receiver is None and not self.starting:
            self.status_label.setText(
                status_words(self.status, self.repo.repo_id if self.repo else "")
                if self.status is not None else
                "Stopped." if repo is not None else
                "Stopped. Open a repository to receive into it.")

    def status_text(self) -> str:
        return self.status_label.text()
