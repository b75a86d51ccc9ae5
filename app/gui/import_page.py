"""Import: drop files or folders, watch each file, cancel at once, resume later.

The Importer (app/core) does the work in a worker: decode, features, encryption, upload,
and a commit segment per batch. Its progress events update one row each; "Cancel" sets
its CancelToken, so it stops between files and still commits what it finished; "Resume"
runs it again on the files not done yet (the core's content-derived ids make a re-run
skip what is already there, so nothing is lost or doubled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PyQt6.QtCore import QAbstractTableModel, QModelIndex, Qt
from PyQt6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QProgressBar,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.core.client import Client, scan_paths
from app.core.progress import ProgressEvent
from app.core.types import Blackout, ImportReport, Repository
from app.gui import theme
from app.gui.blackout_dialog import BlackoutDialog, is_burned_in_refusal, refusal_words
from app.gui.context import AppContext
from app.gui.tasks import Task, TaskContext, TaskError
from app.gui.widgets import DropArea, PageHeader, left_headers, muted_label, primary

WAITING = "waiting"
ENCRYPTED = "encrypted"
IMPORTED = "imported"
PRESENT = "already present"
FAILED = "failed"
NEEDS_BLACKOUT = "needs blackout"  # research repository: may show burned-in patient text
NOT_DONE = "not imported yet"
DONE_STATES = (IMPORTED, PRESENT)
FINISHED_STATES = (IMPORTED, PRESENT, FAILED, ENCRYPTED, NEEDS_BLACKOUT)
_ICONS = {WAITING: "pending", ENCRYPTED: "lock", IMPORTED: "ok", PRESENT: "ok",
          FAILED: "fail", NOT_DONE: "pending", NEEDS_BLACKOUT: "fail"}
_WORDS = {WAITING: "Waiting", ENCRYPTED: "Encrypted, uploading", IMPORTED: "Imported",
          PRESENT: "Already in the archive", FAILED: "Failed", NOT_DONE: "Not imported yet",
          NEEDS_BLACKOUT: "Needs text blacked out"}


CLINICAL_WORDS = (
    "Clinical repository: the original file is kept, encrypted, with every tag it has "
    "(patient name and id included), and its file name.")
RESEARCH_WORDS = (
    "Research repository: DICOM files only, of which only a de-identified copy is kept "
    "(DICOM PS3.15 Annex E basic profile; patient name and id replaced by this repository's "
    "pseudonyms, dates shifted, UIDs replaced, descriptions cleaned), never the original or "
    "its file name. Images that may carry burned-in text (ultrasound, screen captures) are "
    "refused at first; select one and press \"Mark text to black out…\" to paint over "
    "the text, then it is imported.")


def policy_words(repo: Repository | None) -> str:
    """What the repository keeps of an imported file (its policy), or a hint without one."""
    if repo is None:
        return "Open a repository: what is kept of each file depends on its policy."
    return RESEARCH_WORDS if Client.policy(repo) == "research" else CLINICAL_WORDS


@dataclass
class Row:
    path: str
    status: str = WAITING
    detail: str = ""


class ImportModel(QAbstractTableModel):
    HEADERS = ("File", "Status", "Details")

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.rows: list[Row] = []
        self._index: dict[str, int] = {}

    def add(self, paths: list[str]) -> int:
        new = [p for p in dict.fromkeys(paths) if p not in self._index]
        if not new:
            return 0
        start = len(self.rows)
        self.beginInsertRows(QModelIndex(), start, start + len(new) - 1)
        for offset, path in enumerate(new):
            self._index[path] = start + offset
            self.rows.append(Row(path))
        self.endInsertRows()
        return len(new)

    def clear(self) -> None:
        self.beginResetModel()
        self.rows = []
        self._index = {}
        self.endResetModel()

    def set_status(self, path: str, status: str, detail: str = "") -> None:
        row = self._index.get(path)
        if row is None:
            return
        self.rows[row].status = status
        self.rows[row].detail = detail
        self.dataChanged.emit(self.index(row, 1), self.index(row, 2))

    def mark_all(self, old: tuple[str, ...], new: str, detail: str | None = None) -> None:
        for row in self.rows:
            if row.status in old:
                row.status = new
                if detail is not None:
                    row.detail = detail
        if self.rows:
            self.dataChanged.emit(self.index(0, 1), self.index(len(self.rows) - 1, 2))

    def pending(self) -> list[str]:
        return [r.path for r in self.rows
                if r.status not in (*DONE_STATES, FAILED, NEEDS_BLACKOUT)]

    def status_of(self, path: str) -> str:
        row = self._index.get(path)
        return self.rows[row].status if row is not None else ""

    def count(self, *states: str) -> int:
        return sum(1 for r in self.rows if r.status in states)

    def rowCount(self, parent: QModelIndex | None = None) -> int:
        return 0 if parent is not None and parent.isValid() else len(self.rows)

    def columnCount(self, parent: QModelIndex | None = None) -> int:
        return 3

    def headerData(self, section: int, orientation: Qt.Orientation,
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return self.HEADERS[section]
        return None

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        row = self.rows[index.row()]
        col = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            if col == 0:
                return Path(row.path).name
            if col == 1:
                return _WORDS.get(row.status, row.status)
            return row.detail
        if role == Qt.ItemDataRole.ToolTipRole:
            return row.path if col == 0 else (row.detail or None)
        if role == Qt.ItemDataRole.DecorationRole and col == 1:
            c = theme.current_colors()
            colour = {IMPORTED: c.success, PRESENT: c.success, FAILED: c.danger,
                      NEEDS_BLACKOUT: c.danger, ENCRYPTED: c.accent}.get(row.status, c.muted)
            return theme.icon(_ICONS.get(row.status, "pending"), colour)
        return None


class ImportPage(QWidget):
    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.repo: Repository | None = None
        self.task: Task | None = None
        self.last_report: ImportReport | None = None
        self.was_cancelled = False

        layout = QVBoxLayout(self)
        layout.setContentsMargins(20, 16, 20, 16)
        layout.setSpacing(10)
        layout.addWidget(PageHeader(
            "Import", "Images are encrypted on this workstation before anything is uploaded; "
            "only members of the repository can decrypt them."))
        # Issue 16: what the open repository keeps of a file, in its policy's own words
        self.policy_note = muted_label(policy_words(None))
        self.policy_note.setWordWrap(True)
        layout.addWidget(self.policy_note)

        self.drop = DropArea("Drop DICOM, PNG, JPEG or TIFF files or whole folders here",
                             "Folders are searched recursively; hidden files are skipped.")
        self.add_files_button = theme.themed(QPushButton("Add files…"), "file")
        self.add_files_button.clicked.connect(self.choose_files)
        self.add_folder_button = theme.themed(QPushButton("Add folder…"), "folder")
        self.add_folder_button.clicked.connect(self.choose_folder)
        # Issue 18: studies from a PACS (the same dialog as File › Import from PACS…)
        self.pacs_button = theme.themed(QPushButton("From PACS…"), "connect")
        self.pacs_button.setToolTip("Find studies on a PACS and import them (Ctrl+Shift+I)")
        self.pacs_button.clicked.connect(self.import_from_pacs)
        self.drop.add_button(self.add_files_button)
        self.drop.add_button(self.add_folder_button)
        self.drop.add_button(self.pacs_button)
        self.drop.finish_buttons()
        self.drop.dropped.connect(self.add_paths)
        layout.addWidget(self.drop)

        self.model = ImportModel(self)
        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.setAlternatingRowColors(True)
        self.table.setShowGrid(False)
        self.table.setSelectionBehavior(QTableView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().setVisible(False)
        left_headers(self.table)
        self.table.verticalHeader().setDefaultSectionSize(26)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Interactive)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(True)
        self.table.setColumnWidth(0, 300)
        self.table.setColumnWidth(1, 200)
        selection = self.table.selectionModel()
        assert selection is not None  # the model was just set
        selection.selectionChanged.connect(lambda *_: self._update())
        layout.addWidget(self.table, 1)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%p%")
        layout.addWidget(self.progress)

        row = QHBoxLayout()
        self.summary = muted_label("Add images to import them into the open repository.")
        self.clear_button = theme.themed(QPushButton("Clear list"), "clear")
        self.clear_button.clicked.connect(self.clear)
        self.cancel_button = theme.themed(QPushButton("Cancel"), "cancel")
        self.cancel_button.setToolTip("Stop now; what is finished stays imported")
        self.cancel_button.clicked.connect(self.cancel)
        self.resume_button = theme.themed(QPushButton("Resume"), "resume")
        self.resume_button.setToolTip("Continue with the files not imported yet")
        self.resume_button.clicked.connect(self.start)
        self.start_button = primary(QPushButton(theme.icon("import", "#ffffff"), "Import"))
        self.start_button.clicked.connect(self.start)
        # Issue 16: an image a research repository refused for burned-in text
        self.blackout_button = QPushButton("Mark text to black out…")
        self.blackout_button.setToolTip("Drag rectangles over the text in the image; the "
                                        "file is then imported with them painted black")
        self.blackout_button.clicked.connect(self.mark_blackout)
        self.blackout_dialog: BlackoutDialog | None = None
        row.addWidget(self.summary, 1)
        row.addWidget(self.blackout_button)
        row.addWidget(self.clear_button)
        row.addWidget(self.cancel_button)
        row.addWidget(self.resume_button)
        row.addWidget(self.start_button)
        layout.addLayout(row)

        ctx.repositoryChanged.connect(self.set_repository)
        self._update()

    # --- the list ---------------------------------------------------------------------------

    def set_repository(self, repo: Repository | None) -> None:
        if self.running:
            return  # the running import keeps its repository; the list stays as it is
        self.repo = repo
        self.policy_note.setText(policy_words(repo))
        if self.model.rows and repo is not None:
            self.model.mark_all((*DONE_STATES, FAILED, ENCRYPTED, NOT_DONE, NEEDS_BLACKOUT),
                                WAITING, "")
            self.was_cancelled = False
            self.progress.setValue(0)
        if self.read_only and repo is not None:
            self.summary.setText(read_only_words(repo.repo_id))
        elif repo is not None and self.summary.text().startswith(READ_ONLY_START):
            self.summary.setText("Add images to import them into the open repository.")
        self._update()

    @property
    def read_only(self) -> bool:
        """Whether the open repository is in storage format 1 (read-only: no import)."""
        return self.repo is not None and self.ctx.backend.storage_format(self.repo) == 1

    @property
    def running(self) -> bool:
        return self.task is not None

    def import_from_pacs(self) -> Any:
        from app.gui.pacs_dialog import open_import_dialog

        return open_import_dialog(self.ctx, self.window())

    def choose_files(self) -> None:
        files = self.ctx.dialogs.open_files(self, "Add images to import")
        if files:
            self.add_paths(files)

    def choose_folder(self) -> None:
        folder = self.ctx.dialogs.open_folder(self, "Add a folder of images")
        if folder:
            self.add_paths([folder])

    def add_paths(self, paths: list[str]) -> None:
        """Expand folders in the background (they may be large), then list the files."""
        def work(_: TaskContext) -> tuple[list[str], int]:
            files, skipped = scan_paths(paths)
            return [str(p) for p in files], len(skipped)

        self.summary.setText("Looking for images…")
        self.ctx.runner.run("Listing files", work,
                            on_done=self._files_listed, on_error=self.ctx.error)

    def _files_listed(self, listed: tuple[list[str], int]) -> None:
        files, skipped = listed
        added = self.model.add(files)
        self.table.scrollToBottom()
        text = (f"{added} file{'s' if added != 1 else ''} added."
                if added else "Those files are already in the list.")
        if skipped:  # a CD export's DICOMDIR, viewer program, autorun.inf...
            text += (f" {skipped} file{'s' if skipped != 1 else ''} skipped: not images"
                     " (DICOMDIR, viewer programs, web pages).")
        self.summary.setText(text)
        self._update()

    def clear(self) -> None:
        if self.running:
            return
        self.model.clear()
        self.was_cancelled = False
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.summary.setText("Add images to import them into the open repository.")
        self._update()

    # --- running ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.running:
            return
        repo = self.repo
        if repo is None:
            self.ctx.info("Open or create a repository first: images are imported into the "
                          "repository chosen at the top.", "warning")
            return
        if self.read_only:
            self.summary.setText(read_only_words(repo.repo_id))
            self.ctx.info(read_only_words(repo.repo_id), "warning")
            return
        paths = self.model.pending()
        if not paths:
            self.summary.setText("Nothing left to import.")
            return
        self.model.mark_all((NOT_DONE, ENCRYPTED), WAITING, "")
        self._run(repo, paths)

    def _run(self, repo: Repository, paths: list[str],
             blackouts: Sequence[Blackout] = ()) -> None:
        """Import ``paths`` in a background task (with ``blackouts``: one refused file)."""
        for path in paths:
            self.model.set_status(path, WAITING, "")
        self.was_cancelled = False
        backend = self.ctx.backend
        regions = tuple(blackouts)

        def work(ctx: TaskContext) -> ImportReport:
            return backend.import_files(repo, paths, ctx.progress, ctx.cancel,
                                        blackouts=regions)

        self._refresh_progress()
        self.summary.setText(f"Importing {len(paths)} files into {repo.repo_id}" +
                             (f" with {len(regions)} blacked-out regions…" if regions
                              else "…"))
        self.task = self.ctx.runner.run(
            f"Importing {len(paths)} files", work, cancellable=True,
            on_progress=self._on_progress, on_done=self._on_done, on_error=self._on_error,
            on_cancel=self._on_cancelled, on_finish=self._on_finish)
        self._update()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.summary.setText("Cancelling: finishing the current files and keeping them…")
            self.cancel_button.setEnabled(False)

    def _on_progress(self, event: ProgressEvent) -> None:
        if not isinstance(event, ProgressEvent):
            return
        if event.stage == "import" and event.item:
            if event.status == "failed":
                if event.message == "cancelled" or not event.message:
                    self.model.set_status(event.item, NOT_DONE, "")
                elif is_burned_in_refusal(event.message):
                    self.model.set_status(event.item, NEEDS_BLACKOUT, refusal_words())
                else:
                    self.model.set_status(event.item, FAILED, event.message)
            elif event.status == "already present":
                self.model.set_status(event.item, PRESENT, "skipped: imported before")
            else:
                self.model.set_status(event.item, ENCRYPTED, "")
        elif event.stage == "commit":
            self.model.mark_all((ENCRYPTED,), IMPORTED, "committed to the index")
        self._refresh_progress()

    def _refresh_progress(self) -> None:
        total = len(self.model.rows)
        done = self.model.count(*FINISHED_STATES)
        self.progress.setRange(0, max(1, total))
        self.progress.setValue(done)
        self.progress.setFormat(f"{done} of {total} files · %p%")

    def _on_done(self, report: ImportReport) -> None:
        self.last_report = report
        repo_id = self.repo.repo_id if self.repo else ""
        self.was_cancelled = report.cancelled
        for path, _ in report.imported:
            self.model.set_status(path, IMPORTED, "committed to the index")
        refused = [p for p, reason in report.failed if is_burned_in_refusal(reason)]
        for path in refused:
            self.model.set_status(path, NEEDS_BLACKOUT, refusal_words())
        if report.cancelled:
            self.model.mark_all((WAITING, ENCRYPTED), NOT_DONE, "")
        failed = len(report.failed) - len(refused)
        text = (f"{len(report.imported)} imported, {len(report.already_present)} already "
                f"present, {failed} failed" +
                (f", {len(refused)} need{'s' if len(refused) == 1 else ''} text blacked out"
                 if refused else "") + f" in {report.seconds:.1f} s")
        if report.cancelled:
            left = len(self.model.pending())
            self.summary.setText(f"Cancelled: {text}. {left} not imported yet — press Resume "
                                 "to continue.")
        else:
            self.summary.setText(f"Done: {text}.")
        self._refresh_progress()
        self.ctx.activity.record(
            "import", f"{'Cancelled import' if report.cancelled else 'Imported'} into "
            f"{repo_id}: {text}",
            "\n".join(f"failed: {p}: {r}" for p, r in report.failed), repo_id)
        if refused:
            n = len(refused)
            were, which = ("were", "one") if n != 1 else ("was", "it")
            self.ctx.info(f"{n} image{'s' if n != 1 else ''} may show patient details "
                          f"written into the picture and {were} not imported. Select "
                          f"{which} and press \"Mark text to black out…\".", "warning")
        elif report.failed:
            first = report.failed[0]
            self.ctx.info(f"{len(report.failed)} file(s) could not be imported, for example "
                          f"{Path(first[0]).name}: {first[1]}", "warning")
        if report.imported:
            self.ctx.archiveChanged.emit(repo_id)

    def _on_error(self, error: TaskError) -> None:
        self.model.mark_all((WAITING,), NOT_DONE, "")
        if "storage format 1 (read-only)" in error.message and self.repo is not None:
            error = TaskError(read_only_words(self.repo.repo_id), error.details,
                              error.exception)  # the CLI's words, said for the desktop
        self.summary.setText("The import stopped: " + error.message)
        self.was_cancelled = True
        self.ctx.error(error)
        if self.repo is not None:
            self.ctx.archiveChanged.emit(self.repo.repo_id)

    def _on_cancelled(self) -> None:
        self.was_cancelled = True
        self.model.mark_all((WAITING,), NOT_DONE, "")

    def _on_finish(self) -> None:
        self.task = None
        self._update()

    # --- blackout regions (issue 16) ----------------------------------------------------

    def blackout_candidate(self) -> str:
        """The selected row when it was refused for burned-in text, else the first such
        row; "" when there is none."""
        selection = self.table.selectionModel()
        rows = selection.selectedRows() if selection is not None else []
        if rows:
            row = self.model.rows[rows[0].row()]
            if row.status == NEEDS_BLACKOUT:
                return row.path
        return next((r.path for r in self.model.rows if r.status == NEEDS_BLACKOUT), "")

    def mark_blackout(self) -> None:
        """Open the dialog for one refused file; on "Import", import it with the regions."""
        path = self.blackout_candidate()
        if not path or self.running or self.repo is None:
            return
        dialog = BlackoutDialog(self.ctx, path, parent=self)
        self.blackout_dialog = dialog
        repo = self.repo

        def accepted() -> None:
            regions = dialog.regions()
            self.blackout_dialog = None
            if regions and not self.running and self.repo is repo:
                self._run(repo, [path], regions)

        dialog.accepted.connect(accepted)
        dialog.rejected.connect(lambda: setattr(self, "blackout_dialog", None))
        dialog.setWindowModality(Qt.WindowModality.WindowModal)
        dialog.show()

    def _update(self) -> None:
        running = self.running
        pending = bool(self.model.pending())
        has_repo = self.repo is not None
        has_repo = has_repo and not self.read_only
        self.start_button.setEnabled(not running and pending and has_repo
                                     and not self.was_cancelled)
        self.start_button.setText(f"Import {len(self.model.pending())} files" if pending
                                  else "Import")
        self.resume_button.setVisible(self.was_cancelled)
        self.start_button.setVisible(not self.was_cancelled)
        self.resume_button.setEnabled(not running and pending and has_repo)
        self.cancel_button.setEnabled(running)
        self.clear_button.setEnabled(not running and bool(self.model.rows))
        self.add_files_button.setEnabled(True)
        self.add_folder_button.setEnabled(True)
        refused = self.model.count(NEEDS_BLACKOUT)
        self.blackout_button.setVisible(bool(refused))
        self.blackout_button.setEnabled(not running and has_repo and bool(refused))


READ_ONLY_START = "Read-only: this repository is in the old storage format 1"


def read_only_words(repo_id: str) -> str:
    """Why nothing can be imported into a format-1 repository, in plain words."""
    return (f"{READ_ONLY_START} (search and view work). Its owner can upgrade {repo_id} "
            "under Repository key → Upgrade storage format.")


def status_counts(model: ImportModel) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in model.rows:
        out[row.status] = out.get(row.status, 0) + 1
    return out

