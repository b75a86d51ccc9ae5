"""Settings: where the storage and the search service are, and a "Test connection" that
says, part by part and in plain words, what works."""

from __future__ import annotations

import dataclasses

from PyQt6.QtCore import Qt, pyqtSignal
from PyQt6.QtWidgets import (
    QButtonGroup,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.core.errors import RadcryptError
from app.core.settings import LOCAL, MEMORY, Settings, save_settings
from app.gui import theme
from app.gui.backend import CheckResult
from app.gui.context import AppContext
from app.gui.tasks import TaskError
from app.gui.widgets import PageHeader, muted_label, primary

PARTS = (("storage", "Storage"), ("bucket", "Bucket"), ("service", "Search service"))


class SettingsPage(QWidget):
    saved = pyqtSignal(object)  # Settings

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.results: list[CheckResult] = []
        self.testing = False

        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        body = QWidget()
        scroll.setWidget(body)
        outer.addWidget(scroll)
        layout = QVBoxLayout(body)
        layout.setContentsMargins(20, 16, 20, 16)
        layout.setSpacing(12)
        layout.addWidget(PageHeader(
            "Settings", "Where the encrypted archive is kept and where searches are answered. "
            "No secret is stored here: S3 credentials come from your AWS profile."))

        columns = QHBoxLayout()
        columns.setSpacing(14)
        left = QVBoxLayout()
        left.setSpacing(12)
        right = QVBoxLayout()
        right.setSpacing(12)
        columns.addLayout(left, 3)
        columns.addLayout(right, 2)
        layout.addLayout(columns)

        storage = QGroupBox("Storage")
        form = QFormLayout(storage)
        form.setVerticalSpacing(8)
        self.local_radio = QRadioButton("Embedded store on this workstation (default)")
        self.s3_radio = QRadioButton("S3-compatible cloud storage")
        # Shown only when chosen (--store memory, RADCRYPT_STORE=memory): never offered.
        self.memory_radio = QRadioButton("In memory: nothing is kept when Radcrypt closes")
        group = QButtonGroup(self)
        group.addButton(self.local_radio)
        group.addButton(self.s3_radio)
        group.addButton(self.memory_radio)
        self.local_radio.toggled.connect(self._kind_changed)
        self.s3_radio.toggled.connect(self._kind_changed)
        form.addRow(self.local_radio)
        form.addRow(self.s3_radio)
        form.addRow(self.memory_radio)
        self.endpoint = QLineEdit()
        self.endpoint.setPlaceholderText("https://s3.example.org (empty: AWS S3)")
        self.bucket = QLineEdit()
        self.region = QLineEdit()
        self.profile = QLineEdit()
        self.profile.setPlaceholderText("default credentials (environment, ~/.aws)")
        form.addRow("Endpoint URL:", self.endpoint)
        form.addRow("Bucket:", self.bucket)
        form.addRow("Region:", self.region)
        form.addRow("Credentials profile:", self.profile)
        left.addWidget(storage)

        service = QGroupBox("Search service")
        sform = QFormLayout(service)
        self.service_url = QLineEdit()
        self.service_url.setPlaceholderText("empty: started on this workstation when needed")
        sform.addRow("Service URL:", self.service_url)
        left.addWidget(service)

        local = QGroupBox("This workstation")
        lform = QFormLayout(local)
        self.workers = QSpinBox()
        self.workers.setRange(1, 64)
        self.workers.setMaximumWidth(90)
        self.workers.setToolTip("How many images are decoded and encrypted at once")
        lform.addRow("Import workers:", self.workers)
        self.data_dir = QLabel("")
        self.data_dir.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.data_dir.setWordWrap(True)
        lform.addRow("Data folder:", self.data_dir)
        left.addWidget(local)
        left.addStretch(1)

        check = QGroupBox("Connection")
        cl = QVBoxLayout(check)
        cl.setSpacing(10)
        cl.addWidget(muted_label("Checks the settings on the left, each part in turn."))
        self.result_grid = QGridLayout()
        self.result_grid.setHorizontalSpacing(8)
        self.result_grid.setVerticalSpacing(10)
        self.result_icons: dict[str, QLabel] = {}
        self.result_texts: dict[str, QLabel] = {}
        for row, (part, label) in enumerate(PARTS):
            icon = QLabel()
            icon.setFixedSize(20, 20)
            text = QLabel(f"<b>{label}:</b> not tested yet.")
            text.setWordWrap(True)
            text.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.result_icons[part] = icon
            self.result_texts[part] = text
            self.result_grid.addWidget(icon, row, 0, Qt.AlignmentFlag.AlignTop)
            self.result_grid.addWidget(text, row, 1)
        self.result_grid.setColumnStretch(1, 1)
        cl.addLayout(self.result_grid)
        test_row = QHBoxLayout()
        test_row.addStretch(1)
        self.test_button = theme.themed(QPushButton("Test connection"), "connect")
        self.test_button.clicked.connect(self.test_connection)
        test_row.addWidget(self.test_button)
        cl.addLayout(test_row)
        right.addWidget(check)

        save_box = QGroupBox("Save")
        sl = QVBoxLayout(save_box)
        self.note = muted_label("Saved settings apply at once: a change of storage or "
                                "service reconnects. RADCRYPT_* environment variables "
                                "override them at the next start.")
        sl.addWidget(self.note)
        save_row = QHBoxLayout()
        save_row.addStretch(1)
        self.save_button = primary(QPushButton(theme.icon("save", "#ffffff"), "Save settings"))
        self.save_button.clicked.connect(self.save)
        if ctx.demo:
            self.save_button.setEnabled(False)
            self.note.setText("Demo mode uses a throw-away store; its settings are not saved.")
        save_row.addWidget(self.save_button)
        sl.addLayout(save_row)
        right.addWidget(save_box)
        right.addStretch(1)
        layout.addStretch(1)
        self.load(ctx.backend.settings)

    # --- form <-> settings --------------------------------------------------------------------

    def load(self, settings: Settings) -> None:
        self.local_radio.setChecked(settings.store == LOCAL)
        self.memory_radio.setChecked(settings.store == MEMORY)
        self.memory_radio.setVisible(settings.store == MEMORY)
        self.s3_radio.setChecked(settings.store not in (LOCAL, MEMORY))
        self.endpoint.setText(settings.endpoint_url or "")
        self.bucket.setText(settings.bucket)
        self.region.setText(settings.region)
        self.profile.setText(settings.profile or "")
        self.service_url.setText(settings.service_url or "")
        self.workers.setValue(settings.workers)
        self.data_dir.setText(str(settings.data_path))
        self._kind_changed()

    def form_settings(self) -> Settings:
        base = self.ctx.backend.settings
        return dataclasses.replace(
            base, store=(LOCAL if self.local_radio.isChecked() else
                         MEMORY if self.memory_radio.isChecked() else "s3"),
            endpoint_url=self.endpoint.text().strip() or None,
            bucket=self.bucket.text().strip() or "radcrypt",
            region=self.region.text().strip() or "us-east-1",
            profile=self.profile.text().strip() or None,
            service_url=self.service_url.text().strip() or None,
            workers=self.workers.value())

    def _kind_changed(self, *_: object) -> None:
        s3 = self.s3_radio.isChecked()
        for widget in (self.endpoint, self.bucket, self.region, self.profile):
            widget.setEnabled(s3)

    # --- actions ---------------------------------------------------------------------------------

    def test_connection(self) -> None:
        if self.testing:
            return
        settings = self.form_settings()
        backend = self.ctx.backend
        self.testing = True
        self.test_button.setEnabled(False)
        self.test_button.setText("Testing…")
        for part, _ in PARTS:
            self._show(CheckResult(part, None, "Checking…"))

        def done(results: list[CheckResult]) -> None:
            self.results = results
            for result in results:
                self._show(result)
            ok = all(r.ok for r in results if r.ok is not None)
            words = "; ".join(r.text for r in results)
            self.ctx.activity.record("settings" if ok else "error",
                                     f"Connection test: {'all good' if ok else 'problems'}",
                                     words)

        def failed(error: TaskError) -> None:
            self._show(CheckResult("storage", False, error.message))
            self.ctx.error(error)

        def finish() -> None:
            self.testing = False
            self.test_button.setEnabled(True)
            self.test_button.setText("Test connection")

        self.ctx.runner.run("Testing the connection",
                            lambda _: backend.check_connection(settings),
                            on_done=done, on_error=failed, on_finish=finish)

    def _show(self, result: CheckResult) -> None:
        if result.part not in self.result_texts:
            return
        c = theme.current_colors()
        name, colour = {True: ("ok", c.success), False: ("fail", c.danger)}.get(
            result.ok, ("info", c.muted))
        if result.text == "Checking…":
            name, colour = "pending", c.muted
        self.result_icons[result.part].setPixmap(theme.render_svg(name, 20, colour))
        self.result_texts[result.part].setText(f"<b>{dict(PARTS)[result.part]}:</b> "
                                               f"{_escape(result.text)}")
        self.result_texts[result.part].setProperty("plain", result.text)

    def save(self) -> None:
        settings = self.form_settings()
        try:
            path = save_settings(settings)
        except (OSError, RadcryptError) as exc:
            self.ctx.error(TaskError(f"The settings could not be saved: {exc}.", str(exc)))
            return
        self.ctx.activity.record("settings", f"Settings saved to {path}")
        self.ctx.info("Settings saved; they apply from the next operation on.", "success")
        self.saved.emit(settings)  # the main window applies them (no restart)

    def result_text(self, part: str) -> str:
        return str(self.result_texts[part].property("plain") or "")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
