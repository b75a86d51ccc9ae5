"""Settings: where the storage and the search service are, a "Test connection" that
says, part by part and in plain words, what works, and "Check repository" (issue 14:
``radcrypt check --repo`` for the repository open now, run off the UI thread with its
progress, the result in plain words), and the hospital integration (issue 18): the DICOM
nodes (app/gui/nodes_settings.py) and "Receive from PACS" (app/gui/receive_panel.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from PyQt6.QtCore import Qt, pyqtSignal
from PyQt6.QtWidgets import (
    QButtonGroup,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.core.errors import RadcryptError
from app.core.progress import ProgressEvent
from app.core.settings import (
    DIRECTORY,
    LOCAL,
    MAX_LOCK_MINUTES,
    MEMORY,
    Settings,
    save_settings,
)
from app.gui import theme
from app.gui.backend import CheckResult
from app.gui.context import AppContext
from app.gui.nodes_settings import NodesBox
from app.gui.receive_panel import ReceivePanel
from app.gui.tasks import TaskContext, TaskError
from app.gui.widgets import PageHeader, muted_label, primary

# A check's report (app.core.repo_check.RepoCheckReport) comes from the facade; the front
# ends do not import the core module that defines it (.importlinter), hence Any here.
RepoCheckReport = Any
PARTS = (("storage", "Storage"), ("bucket", "Bucket"), ("service", "Search service"))
CHECK_STAGES = {"log": "the segment log", "segments": "index segments", "packs": "packs",
                "originals": "originals", "strays": "objects no log entry keeps"}
SHOWN_PROBLEMS = 6  # the rest: `radcrypt check --repo NAME` lists every one


class SettingsPage(QWidget):
    saved = pyqtSignal(object)  # Settings

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.results: list[CheckResult] = []
        self.testing = False
        self.check_report: RepoCheckReport | None = None
        self.check_task: object | None = None

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
        # --store directory: without it a directory store loaded here was saved back as
        # "s3" (e.g. when only the idle-lock minutes were changed).
        self.directory_radio = QRadioButton("Files in the data folder (no server)")
        # Shown only when chosen (--store memory, RADCRYPT_STORE=memory): never offered.
        self.memory_radio = QRadioButton("In memory: nothing is kept when Radcrypt closes")
        group = QButtonGroup(self)
        group.addButton(self.local_radio)
        group.addButton(self.s3_radio)
        group.addButton(self.directory_radio)
        group.addButton(self.memory_radio)
        self.local_radio.toggled.connect(self._kind_changed)
        self.s3_radio.toggled.connect(self._kind_changed)
        form.addRow(self.local_radio)
        form.addRow(self.s3_radio)
        form.addRow(self.directory_radio)
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
        self.lock_minutes = QSpinBox()
        self.lock_minutes.setRange(1, MAX_LOCK_MINUTES)
        self.lock_minutes.setSuffix(" min")
        self.lock_minutes.setMaximumWidth(90)
        self.lock_minutes.setToolTip("After this long without keyboard or mouse use, "
                                     "Radcrypt locks itself and forgets your keys until "
                                     "you enter your password again (Ctrl+L locks at once)")
        lform.addRow("Lock when idle for:", self.lock_minutes)
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
        right.addWidget(self._repository_check_box())

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
        self.nodes_box = NodesBox(ctx)  # issue 18: hospital integration, full width
        self.receive_panel = ReceivePanel(ctx)
        layout.addWidget(self.nodes_box)
        layout.addWidget(self.receive_panel)
        layout.addStretch(1)
        self.load(ctx.backend.settings)
        ctx.repositoryChanged.connect(self._repository_changed)
        self._repository_changed(ctx.repo)

    def _repository_check_box(self) -> QGroupBox:
        box = QGroupBox("Repository")
        bl = QVBoxLayout(box)
        bl.setSpacing(8)
        self.check_intro = muted_label("")
        bl.addWidget(self.check_intro)
        self.check_progress = QProgressBar()
        self.check_progress.setTextVisible(True)
        self.check_progress.setVisible(False)
        bl.addWidget(self.check_progress)
        self.check_result = QLabel("")
        self.check_result.setWordWrap(True)
        self.check_result.setTextInteractionFlags(
            Qt.TextInteractionFlag.TextSelectableByMouse)
        self.check_result.setVisible(False)
        bl.addWidget(self.check_result)
        row = QHBoxLayout()
        row.addStretch(1)
        self.check_button = theme.themed(QPushButton("Check repository"), "ok")
        self.check_button.clicked.connect(self.check_repository)
        row.addWidget(self.check_button)
        bl.addLayout(row)
        return box

    # --- form <-> settings --------------------------------------------------------------------

    def load(self, settings: Settings) -> None:
        self.local_radio.setChecked(settings.store == LOCAL)
        self.memory_radio.setChecked(settings.store == MEMORY)
        self.memory_radio.setVisible(settings.store == MEMORY)
        self.directory_radio.setChecked(settings.store == DIRECTORY)
        self.s3_radio.setChecked(settings.store not in (LOCAL, MEMORY, DIRECTORY))
        self.endpoint.setText(settings.endpoint_url or "")
        self.bucket.setText(settings.bucket)
        self.region.setText(settings.region)
        self.profile.setText(settings.profile or "")
        self.service_url.setText(settings.service_url or "")
        self.workers.setValue(settings.workers)
        self.lock_minutes.setValue(settings.lock_minutes)
        self.data_dir.setText(str(settings.data_path))
        self._kind_changed()

    def form_settings(self) -> Settings:
        base = self.ctx.backend.settings
        return dataclasses.replace(
            base, store=(LOCAL if self.local_radio.isChecked() else
                         MEMORY if self.memory_radio.isChecked() else
                         DIRECTORY if self.directory_radio.isChecked() else "s3"),
            endpoint_url=self.endpoint.text().strip() or None,
            bucket=self.bucket.text().strip() or "radcrypt",
            region=self.region.text().strip() or "us-east-1",
            profile=self.profile.text().strip() or None,
            service_url=self.service_url.text().strip() or None,
            workers=self.workers.value(), lock_minutes=self.lock_minutes.value())

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

    def _repository_changed(self, repo: object | None) -> None:
        name = getattr(repo, "repo_id", "")
        self.check_button.setEnabled(bool(name) and self.check_task is None)
        self.check_intro.setText(
            f"Reads repository “{name}” and tells whether it is whole: its log, every "
            "index segment and pack, every image's objects, and what dead imports left "
            "behind. Nothing is changed." if name else
            "Open a repository to check that the cloud kept it whole.")

    def check_repository(self) -> None:
        """Run the check of the open repository in the background (the task runner),
        showing its progress; the result comes back in plain words."""
        repo = self.ctx.repo
        if repo is None or self.check_task is not None:
            return
        backend = self.ctx.backend
        self.check_button.setEnabled(False)
        self.check_button.setText("Checking…")
        self.check_progress.setVisible(True)
        self.check_progress.setRange(0, 0)
        self.check_progress.setFormat("starting…")
        self.check_result.setVisible(False)

        def work(task: TaskContext) -> RepoCheckReport:
            client = backend.client
            if client is None:
                raise RadcryptError("not connected to the storage yet")
            return client.check_repository(repo, progress=task.progress)

        def progressed(event: object) -> None:
            if not isinstance(event, ProgressEvent):
                return
            self.check_progress.setRange(0, max(event.total, 1))
            self.check_progress.setValue(min(event.done, max(event.total, 1)))
            self.check_progress.setFormat(
                f"{CHECK_STAGES.get(event.stage, event.stage)}: %v of %m")

        def done(report: RepoCheckReport) -> None:
            self.check_report = report
            self._show_check(report)
            ok = report.ok
            self.ctx.activity.record("settings" if ok else "error",
                                     f"Repository check of {repo.repo_id}: "
                                     f"{'no problems' if ok else 'problems found'}",
                                     self.check_result.property("plain") or "")

        def failed(error: TaskError) -> None:
            self._set_check_text(f"The check could not finish: {error.message}", False)
            self.ctx.error(error)

        def finish() -> None:
            self.check_task = None
            self.check_progress.setVisible(False)
            self.check_button.setText("Check repository")
            self._repository_changed(self.ctx.repo)

        self.check_task = self.ctx.runner.run(f"Checking repository {repo.repo_id}", work,
                                              on_done=done, on_error=failed,
                                              on_progress=progressed, on_finish=finish)

    def _show_check(self, report: RepoCheckReport) -> None:
        """The report in plain words: the verdict, what was checked, the first problems,
        the leftovers of dead imports."""
        problems, strays, counts = report.problems, report.strays, report.counts
        checked = (f"{_count(counts.get('images', 0), 'image')}, "
                   f"{_count(counts.get('segments', 0), 'index segment')} and "
                   f"{_count(counts.get('packs', 0), 'pack')} checked in "
                   f"{report.seconds:.1f} s")
        if not problems:
            lines = [f"No problems: the repository is whole. {checked}."]
        else:
            lines = [f"{_count(len(problems), 'problem')} found ({checked}). Searches may "
                     "miss or refuse images until they are repaired:"]
            lines += [f"• {p.line()}" for p in problems[:SHOWN_PROBLEMS]]
            if len(problems) > SHOWN_PROBLEMS:
                lines.append(f"… and {len(problems) - SHOWN_PROBLEMS} more (radcrypt check "
                             f"--repo {report.repo_id} lists them all).")
        orphans = [s for s in strays if s.state == "unreferenced"]
        if orphans:
            lines.append(f"{_count(len(orphans), 'object')} left by imports that did not finish; "
                         "the owner's `radcrypt gc` removes them after a day.")
        self._set_check_text("\n".join(lines), not problems)

    def _set_check_text(self, text: str, ok: bool) -> None:
        c = theme.current_colors()
        colour = c.success if ok else c.danger
        first, _, rest = text.partition("\n")
        html = f"<b style='color:{colour}'>{_escape(first)}</b>"
        if rest:
            html += "<br>" + _escape(rest).replace("\n", "<br>")
        self.check_result.setText(html)
        self.check_result.setProperty("plain", text)
        self.check_result.setVisible(True)

    def check_text(self) -> str:
        """The last check's result as shown, in plain text (tests)."""
        return str(self.check_result.property("plain") or "")

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


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
