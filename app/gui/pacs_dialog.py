""""Import from PACS": search a node's studies (C-FIND or QIDO-RS through
``client.pacs.find_studies``), choose some, and import them into the open repository
(C-MOVE/C-GET or WADO-RS, then the normal import path: ``client.pacs.import_study``) with
progress and a Cancel that leaves nothing half-imported.

Every network call runs in app/gui/tasks.py's pool; the dialog only renders. A worklist's
habits: patient, ID, date, description, modalities, counts; double-click imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PyQt6.QtCore import Qt
from PyQt6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.core.progress import ProgressEvent
from app.core.studies import date_display, patient_display
from app.core.types import Repository
from app.gui import theme
from app.gui.context import AppContext
from app.gui.nodes_settings import pacs_of, run_asking_password
from app.gui.tasks import Task, TaskContext, TaskError
from app.gui.widgets import (
    ResultLabel,
    hidden_progress,
    list_table,
    muted_label,
    primary,
)
from app.integration.model import DicomNode, RemoteStudy

STUDY_COLUMNS = ("Patient", "Patient ID", "Study date", "Modalities", "Description",
                 "Accession", "Series", "Images")
FILTERS = (("patient_name", "Patient name", "DOE^JOHN or DOE*"),
           ("patient_id", "Patient ID", ""),
           ("study_date", "Study date", "20240131 or 20240101-20240630"),
           ("accession", "Accession", ""),
           ("modality", "Modality", "CT, MR…"))


def study_cells(study: RemoteStudy) -> tuple[str, ...]:
    return (patient_display(study.patient_name) or "—", study.patient_id or "—",
            date_display(study.study_date) or "—", ", ".join(study.modalities) or "—",
            study.description or "—", study.accession or "—",
            str(study.series_count) if study.series_count else "—",
            str(study.instance_count) if study.instance_count else "—")


@dataclass
class ImportSummary:
    """What "Import" did over the chosen studies (one ImportReport each)."""

    studies: int = 0
    imported: int = 0
    already_present: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    cancelled: bool = False

    def add(self, report: Any) -> None:
        self.studies += 1
        self.imported += len(getattr(report, "imported", ()))
        self.already_present += len(getattr(report, "already_present", ()))
        self.failed += list(getattr(report, "failed", ()))
        self.cancelled = self.cancelled or bool(getattr(report, "cancelled", False))

    def words(self) -> str:
        head = (f"Imported {self.imported} image{'s' if self.imported != 1 else ''} from "
                f"{self.studies} stud{'ies' if self.studies != 1 else 'y'}")
        extra = []
        if self.already_present:
            extra.append(f"{self.already_present} already in the repository")
        if self.failed:
            extra.append(f"{len(self.failed)} failed")
        text = head + (f" ({', '.join(extra)})" if extra else "") + "."
        if self.failed:
            path, reason = self.failed[0]
            text += f" First failure: {path}: {reason}"
        return text


def stage_words(event: ProgressEvent) -> str:
    """A progress event of import_study as the bar's text."""
    what = {"retrieve": "Retrieving", "scan": "Reading the files", "import": "Importing",
            "commit": "Committing", "segments": "Committing"}.get(
        event.stage, event.stage.capitalize() or "Working")
    if event.total:
        return f"{what}: {event.done} of {event.total}"
    return f"{what}: {event.done}" if event.done else f"{what}…"


class ImportFromPacsDialog(QDialog):
    """Node, filters, Search; the studies found; Import with progress and Cancel."""

    def __init__(self, ctx: AppContext, repo: Repository | None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.repo = repo
        self.nodes: list[DicomNode] = []
        self.studies: list[RemoteStudy] = []
        self.search_task: Task | None = None
        self.import_task: Task | None = None
        self.summary: ImportSummary | None = None
        self.searched = False
        self.setWindowTitle("Import from PACS")
        self.resize(920, 560)

        layout = QVBoxLayout(self)
        layout.setSpacing(10)
        where = (f"into repository {repo.repo_id}" if repo is not None
                 else "(open a repository first)")
        self.intro = muted_label(
            f"Find studies on a PACS and import them {where}: each image is encrypted on "
            "this workstation; nothing stays in clear on disk.")
        layout.addWidget(self.intro)

        grid = QGridLayout()
        grid.setHorizontalSpacing(10)
        grid.setVerticalSpacing(6)
        grid.addWidget(QLabel("From:"), 0, 0)
        self.node_combo = QComboBox()
        self.node_combo.setMinimumWidth(220)
        self.node_combo.setToolTip("The nodes set up in Settings › DICOM nodes")
        grid.addWidget(self.node_combo, 0, 1)
        self.filters: dict[str, QLineEdit] = {}
        for n, (key, label, hint) in enumerate(FILTERS):
            edit = QLineEdit()
            edit.setPlaceholderText(hint)
            edit.setClearButtonEnabled(True)
            edit.returnPressed.connect(lambda: self.search())
            self.filters[key] = edit
            row, column = divmod(n + 1, 3)
            grid.addWidget(QLabel(f"{label}:"), row, column * 2)
            grid.addWidget(edit, row, column * 2 + 1)
        layout.addLayout(grid)
        search_row = QHBoxLayout()
        self.found_label = QLabel("")
        self.found_label.setObjectName("CardTitle")
        search_row.addWidget(self.found_label)
        search_row.addStretch(1)
        self.search_button = theme.themed(QPushButton("Search"), "search")
        self.search_button.setDefault(False)
        self.search_button.setAutoDefault(False)
        self.search_button.clicked.connect(lambda: self.search())
        search_row.addWidget(self.search_button)
        layout.addLayout(search_row)

        self.table = list_table(STUDY_COLUMNS, STUDY_COLUMNS.index("Description"),
                                QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setWordWrap(False)
        self.table.itemSelectionChanged.connect(self._update)
        self.table.doubleClicked.connect(lambda *_: self.import_selected())
        layout.addWidget(self.table, 1)

        self.progress = hidden_progress()
        layout.addWidget(self.progress)
        self.result_label = ResultLabel()
        layout.addWidget(self.result_label)

        buttons = QHBoxLayout()
        buttons.addStretch(1)
        self.cancel_button = theme.themed(QPushButton("Cancel import"), "cancel")
        self.cancel_button.clicked.connect(self.cancel_import)
        self.cancel_button.hide()
        self.import_button = primary(QPushButton(theme.icon("import", "#ffffff"),
                                                 "Import selected"))
        self.import_button.setAutoDefault(False)
        self.import_button.clicked.connect(lambda: self.import_selected())
        self.close_button = QPushButton("Close")
        self.close_button.setAutoDefault(False)
        self.close_button.clicked.connect(self.reject)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.import_button)
        buttons.addWidget(self.close_button)
        layout.addLayout(buttons)
        self.found_label.setText("Choose the node, fill in what you know (or nothing, to "
                                 "list every study), then Search.")
        self.load_nodes()
        self._update()

    # --- nodes --------------------------------------------------------------------------

    def load_nodes(self) -> None:
        ctx = self.ctx

        def done(nodes: list[DicomNode]) -> None:
            self.set_nodes(nodes)

        ctx.runner.run("Reading the DICOM nodes", lambda _: list(pacs_of(ctx).nodes()),
                       on_done=done, on_error=self._failed)

    def set_nodes(self, nodes: list[DicomNode]) -> None:
        current = self.node_combo.currentText()
        self.nodes = [n for n in nodes if n.dimse or n.web]
        self.node_combo.clear()
        for node in self.nodes:
            how = "DICOM" if node.dimse else "DICOMweb"
            self.node_combo.addItem(f"{node.name}", node.name)
            self.node_combo.setItemData(self.node_combo.count() - 1,
                                        f"{node.name} ({how})",
                                        Qt.ItemDataRole.ToolTipRole)
        if current:
            self.node_combo.setCurrentText(current)
        if not self.nodes:
            self.found_label.setText("No DICOM node yet: add one in Settings › DICOM nodes.")
        self._update()

    def node_name(self) -> str:
        return str(self.node_combo.currentData() or "")

    # --- search ------------------------------------------------------------------------

    def filter_values(self) -> dict[str, str]:
        return {key: edit.text().strip() for key, edit in self.filters.items()}

    def search(self, retried: bool = False) -> None:
        name = self.node_name()
        if not name or self.search_task is not None:
            return
        filters = self.filter_values()
        ctx = self.ctx
        self.found_label.setText(f"Searching {name}…")
        self.result_label.setText("")

        def done(studies: list[RemoteStudy]) -> None:
            self.set_studies(studies)
            self.searched = True
            self.found_label.setText(
                f"{len(studies)} stud{'ies' if len(studies) != 1 else 'y'} on {name}"
                if studies else f"No study on {name} matches.")

        def failed(error: TaskError) -> None:
            self.found_label.setText(f"{name}: the search failed.")
            self._failed(error)

        run_asking_password(
            ctx, self, "search_task", name, f"Searching {name}",
            lambda _: list(pacs_of(ctx).find_studies(name, **filters)),
            retry=None if retried else (lambda: self.search(retried=True)),
            on_error=failed,
            on_retry=lambda: self.found_label.setText(f"Searching {name} with the password…"),
            on_finish=self._update, on_done=done)
        self._update()

    def set_studies(self, studies: list[RemoteStudy]) -> None:
        self.studies = sorted(studies, key=lambda s: (s.study_date, s.study_uid), reverse=True)
        self.table.setRowCount(len(self.studies))
        for row, study in enumerate(self.studies):
            for column, text in enumerate(study_cells(study)):
                item = QTableWidgetItem(text)
                item.setToolTip(f"Study {study.study_uid}")
                self.table.setItem(row, column, item)
        if len(self.studies) == 1:
            self.table.selectRow(0)
        self._update()

    def selected_studies(self) -> list[RemoteStudy]:
        rows = sorted({i.row() for i in self.table.selectedIndexes()})
        return [self.studies[r] for r in rows if r < len(self.studies)]

    # --- import ------------------------------------------------------------------------

    def import_selected(self, retried: bool = False) -> None:
        studies, repo, name = self.selected_studies(), self.repo, self.node_name()
        if not studies or repo is None or self.import_task is not None or not name:
            return
        ctx = self.ctx
        self.summary = None
        self.result_label.setText("")
        self.progress.setRange(0, 0)
        self.progress.setFormat(f"Retrieving {len(studies)} stud"
                                f"{'ies' if len(studies) != 1 else 'y'} from {name}…")
        self.progress.show()
        self.cancel_button.show()
        self.cancel_button.setEnabled(True)

        def work(task: TaskContext) -> ImportSummary:
            pacs = pacs_of(ctx)
            summary = ImportSummary()
            for n, study in enumerate(studies):
                task.check()
                prefix = f"Study {n + 1} of {len(studies)}: " if len(studies) > 1 else ""

                def progress(event: Any, prefix: str = prefix) -> None:
                    task.progress((prefix, event))

                report = pacs.import_study(repo, name, study.study_uid, progress=progress,
                                           cancel=task.cancel)
                summary.add(report)
                if summary.cancelled:
                    break
            return summary

        def progressed(item: object) -> None:
            prefix, event = item if isinstance(item, tuple) else ("", item)
            if not isinstance(event, ProgressEvent):
                return
            if event.total:
                self.progress.setRange(0, event.total)
                self.progress.setValue(min(event.done, event.total))
            else:
                self.progress.setRange(0, 0)
            self.progress.setFormat(prefix + stage_words(event))

        def done(summary: ImportSummary) -> None:
            self.summary = summary
            text = summary.words()
            if summary.cancelled:
                text = "Cancelled. " + text
            ok = not summary.failed and not summary.cancelled
            self._result(text, ok)
            ctx.activity.record("import" if ok else "error",
                                f"Import from PACS {name} into {repo.repo_id}", text,
                                repo.repo_id)
            if summary.imported:
                ctx.archiveChanged.emit(repo.repo_id)

        def cancelled() -> None:
            self.summary = ImportSummary(cancelled=True)
            self._result("Cancelled: nothing of the study being retrieved was imported; "
                         "studies finished before are kept.", False)
            ctx.activity.record("import", f"Import from PACS {name} cancelled", "",
                                repo.repo_id)
            ctx.archiveChanged.emit(repo.repo_id)

        def failed(error: TaskError) -> None:
            self._result(f"The import from {name} failed: {error.message}", False)
            self._failed(error)

        def idle() -> None:
            self.progress.hide()
            self.cancel_button.hide()

        run_asking_password(
            ctx, self, "import_task", name, f"Importing from PACS {name}", work,
            retry=None if retried else (lambda: self.import_selected(retried=True)),
            on_error=failed, on_idle=idle, on_finish=self._update, on_done=done,
            on_progress=progressed, on_cancel=cancelled, cancellable=True)
        self._update()

    def cancel_import(self) -> None:
        if self.import_task is not None:
            self.import_task.cancel()
            self.cancel_button.setEnabled(False)
            self.progress.setFormat("Cancelling…")

    # --- state --------------------------------------------------------------------------

    def _result(self, text: str, ok: bool) -> None:
        self.result_label.say(text, ok)

    def result_text(self) -> str:
        return self.result_label.plain_text()

    def _failed(self, error: TaskError) -> None:
        self.ctx.error(error)

    def _update(self) -> None:
        importing = self.import_task is not None
        self.search_button.setEnabled(bool(self.nodes) and self.search_task is None
                                      and not importing)
        self.search_button.setText("Searching…" if self.search_task is not None else "Search")
        self.node_combo.setEnabled(not importing)
        self.import_button.setEnabled(self.repo is not None and not importing
                                      and bool(self.selected_studies()))
        self.import_button.setText("Importing…" if importing else "Import selected")

    def reject(self) -> None:
        """Closing while an import runs cancels it (what finished is kept)."""
        if self.import_task is not None:
            self.import_task.cancel()
        super().reject()


def open_import_dialog(ctx: AppContext, parent: QWidget | None) -> ImportFromPacsDialog:
    """File › Import from PACS…: the dialog, non-modal (imports run in the background).
    One per window: the open one is brought forward while it imports or still works on
    the repository open now; otherwise a fresh one replaces it."""
    if parent is not None:
        for old in parent.findChildren(ImportFromPacsDialog):
            if old.isVisible() and (old.import_task is not None or old.repo is ctx.repo):
                old.raise_()
                old.activateWindow()
                return old
            if old.import_task is None:
                old.hide()
                old.deleteLater()
    dialog = ImportFromPacsDialog(ctx, ctx.repo, parent)
    dialog.show()
    return dialog
