""""Send to…" and "Export FHIR…" for an archived image (a search result, or an image or
study in the archive).

Send: the decrypted original of the image — or every image of its study — goes to a
configured PACS or viewer by C-STORE (STOW-RS for a DICOMweb-only node) through
``client.pacs.send``, so the radiologist opens it in the viewer they use every day.
Export FHIR: an HL7 FHIR R4 ImagingStudy of the image's study written to a JSON file
(``client.pacs.export_fhir``). Both run off the UI thread and are logged as accesses.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from PyQt6.QtGui import QAction
from PyQt6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QMenu,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.core.meta import ImageMeta
from app.core.progress import ProgressEvent
from app.core.studies import LONE_PREFIX, Study, date_display
from app.core.types import Repository
from app.gui import theme
from app.gui.context import AppContext
from app.gui.nodes_settings import pacs_of, run_asking_password
from app.gui.tasks import Task, TaskContext, TaskError
from app.gui.widgets import ResultLabel, hidden_progress, muted_label, primary
from app.integration.model import DicomNode, SendReport


def report_words(report: SendReport) -> str:
    """A send's outcome in one or two sentences."""
    sent = len(report.sent)
    text = f"Sent {sent} image{'s' if sent != 1 else ''} to {report.node}."
    if report.failed:
        image, reason = report.failed[0]
        text += (f" {len(report.failed)} could not be sent; the first ({image[:12]}…): "
                 f"{reason}")
    return text


class SendDialog(QDialog):
    """Choose the node (and whether the whole study goes); Send; the outcome."""

    def __init__(self, ctx: AppContext, repo: Repository, image_ids: list[str], name: str,
                 *, whole_study: bool = False, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.repo = repo
        self.image_ids = list(image_ids)
        self.name = name
        self.nodes: list[DicomNode] = []
        self.task: Task | None = None
        self.report: SendReport | None = None
        self.setWindowTitle("Send to a PACS or viewer")
        self.setMinimumWidth(520)

        layout = QVBoxLayout(self)
        layout.setSpacing(10)
        shown = elide_middle(name, 56)  # a retrieved file is named by its long SOP UID
        what = (shown if len(self.image_ids) == 1
                else f"{len(self.image_ids)} images ({shown})")
        self.intro = QLabel(f"Send the decrypted original of <b>{_escape(what)}</b>.")
        self.intro.setToolTip(name)
        self.intro.setWordWrap(True)
        layout.addWidget(self.intro)
        layout.addWidget(muted_label(
            "The receiving node gets the images in clear, as any modality would send them; "
            "the sending is recorded in the repository's access log."))
        form = QFormLayout()
        self.node_combo = QComboBox()
        self.node_combo.setMinimumWidth(240)
        form.addRow("To:", self.node_combo)
        self.whole_study = QCheckBox("The whole study of this image")
        self.whole_study.setChecked(whole_study)
        form.addRow("", self.whole_study)
        layout.addLayout(form)
        self.progress = hidden_progress()
        layout.addWidget(self.progress)
        self.result_label = ResultLabel()
        layout.addWidget(self.result_label)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        self.send_button = primary(QPushButton(theme.icon("connect", "#ffffff"), "Send"))
        self.send_button.clicked.connect(lambda: self.send())
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.reject)
        buttons.addWidget(self.send_button)
        buttons.addWidget(self.close_button)
        layout.addLayout(buttons)
        self.load_nodes()
        self._update()

    def load_nodes(self) -> None:
        ctx = self.ctx
        ctx.runner.run("Reading the DICOM nodes", lambda _: list(pacs_of(ctx).nodes()),
                       on_done=self.set_nodes, on_error=ctx.error)

    def set_nodes(self, nodes: list[DicomNode]) -> None:
        self.nodes = [n for n in nodes if n.dimse or n.web]
        self.node_combo.clear()
        for node in self.nodes:
            how = (f"{node.aet} at {node.host}:{node.port}" if node.dimse
                   else node.dicomweb_url)
            self.node_combo.addItem(f"{node.name} — {how}", node.name)
        if not self.nodes:
            self._result("No DICOM node yet: add one in Settings › DICOM nodes.", False)
        self._update()

    def node_name(self) -> str:
        return str(self.node_combo.currentData() or "")

    def send(self, retried: bool = False) -> None:
        name, repo, ids = self.node_name(), self.repo, list(self.image_ids)
        if not name or self.task is not None:
            return
        whole = self.whole_study.isChecked()
        ctx = self.ctx
        self.report = None
        self.result_label.setText("")
        self.progress.setRange(0, 0)
        self.progress.setFormat(f"Sending to {name}…")
        self.progress.show()

        def work(task: TaskContext) -> SendReport:
            report: SendReport = pacs_of(ctx).send(repo, ids, name, whole_study=whole,
                                                   progress=task.progress)
            return report

        def progressed(event: object) -> None:
            if isinstance(event, ProgressEvent) and event.total:
                self.progress.setRange(0, event.total)
                self.progress.setValue(min(event.done, event.total))
                what = "Decrypting" if event.stage == "decrypt" else f"Sending to {name}"
                self.progress.setFormat(f"{what}: %v of %m")

        def done(report: SendReport) -> None:
            self.report = report
            text = report_words(report)
            self._result(text, not report.failed and bool(report.sent))
            ctx.activity.record("access" if report.sent else "error",
                                f"Sent {len(report.sent)} decrypted image"
                                f"{'s' if len(report.sent) != 1 else ''} to {name}", text,
                                repo.repo_id)

        def failed(error: TaskError) -> None:
            self._result(f"Nothing was sent to {name}: {error.message}", False)
            ctx.error(error)

        run_asking_password(
            ctx, self, "task", name, f"Sending to {name}", work,
            retry=None if retried else (lambda: self.send(retried=True)),
            on_error=failed, on_idle=self.progress.hide, on_finish=self._update,
            on_done=done, on_progress=progressed)
        self._update()

    def _result(self, text: str, ok: bool) -> None:
        self.result_label.say(text, ok)

    def result_text(self) -> str:
        return self.result_label.plain_text()

    def _update(self) -> None:
        busy = self.task is not None
        self.send_button.setEnabled(bool(self.nodes) and not busy)
        self.send_button.setText("Sending…" if busy else "Send")
        self.node_combo.setEnabled(not busy)
        self.whole_study.setEnabled(not busy)


def send_to(ctx: AppContext, parent: QWidget | None, repo: Repository | None,
            image_ids: list[str], name: str, *, whole_study: bool = False
            ) -> SendDialog | None:
    """"Send to…" on a search result or in the archive: the dialog, non-modal."""
    if repo is None or not image_ids:
        return None
    dialog = SendDialog(ctx, repo, image_ids, name, whole_study=whole_study, parent=parent)
    dialog.show()
    return dialog


def fhir_file_name(name: str) -> str:
    """``<image name>.fhir.json`` with only safe characters (the name may come from a
    DICOM file name or a pseudonym)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem or "study").strip("._") or "study"
    return f"{stem}.fhir.json"


def export_fhir(ctx: AppContext, parent: QWidget | None, repo: Repository | None,
                image_id: str, name: str, *, whole_study: bool = True,
                on_done: Any = None) -> Task | None:
    """"Export FHIR…": asks for a folder (ctx.dialogs), then writes the ImagingStudy of
    the image's study there in the background; the path written comes back in the
    message bar (and to ``on_done``)."""
    if repo is None or not image_id:
        return None
    folder = ctx.dialogs.open_folder(parent, "Export FHIR: choose a folder")
    if not folder:
        return None
    dest = Path(folder) / fhir_file_name(name)

    def work(_: TaskContext) -> Path:
        return Path(pacs_of(ctx).export_fhir(repo, image_id, dest, whole_study=whole_study))

    def done(path: Path) -> None:
        ctx.activity.record("access", f"FHIR ImagingStudy of {name} exported",
                            str(path), repo.repo_id)
        ctx.info(f"FHIR ImagingStudy written to {path}.", "success")
        if on_done is not None:
            on_done(path)

    return ctx.runner.run(f"Exporting FHIR for {name}", work, on_done=done,
                          on_error=ctx.error)


def add_send_actions(menu: QMenu, ctx: AppContext, parent: QWidget | None,
                     repo: Repository | None, entry: ImageMeta | None,
                     study: Study | None) -> list[QAction]:
    """The archive's "Send to…" entries (a context menu, the "Send…" button's menu): the
    image, its whole study, and the study's FHIR ImagingStudy. Returns the actions added
    (none without a repository or a choice)."""
    if repo is None:
        return []
    added: list[QAction | None] = []
    if entry is not None and not entry.error:
        added.append(menu.addAction(
            f"Send image {entry.name} to…",
            lambda: send_to(ctx, parent, repo, [entry.image_id], entry.name)))
    first = entry if entry is not None and not entry.error else (
        study.images[0] if study is not None and study.images else None)
    if first is not None and (study is None or not study.key.startswith(LONE_PREFIX)):
        words = _study_words(study) if study is not None else "the study of this image"
        added.append(menu.addAction(
            f"Send {words} to…",
            lambda: send_to(ctx, parent, repo, [first.image_id], words, whole_study=True)))
    if first is not None and first.study_uid:  # an ImagingStudy needs a DICOM study
        added.append(menu.addAction(
            "Export FHIR ImagingStudy…",
            lambda: export_fhir(ctx, parent, repo, first.image_id, first.name)))
    return [a for a in added if a is not None]


def _study_words(study: Study) -> str:
    when = date_display(study.study_date)
    return "study " + " ".join(t for t in (study.description or "without description",
                                          f"of {when}" if when else "") if t)


def elide_middle(text: str, limit: int) -> str:
    """``text`` cut in the middle to ``limit`` characters (a label cannot wrap a UID)."""
    if len(text) <= limit:
        return text
    keep = limit - 1
    return text[: keep - keep // 2] + "…" + text[-(keep // 2):]


def _escape(text: str) -> str:
    return html.escape(text, quote=False)
