"""The confirmation of an erasure (issue 16): what will be deleted, in counts and rows.

Why a dialog of its own: deleting a patient's images from the archive cannot be undone, so
the user confirms the plan the core computed (app/core/erasure.py ``plan_erasure``: whole
files, every frame of a multi-frame instance), not what the click seemed to name. A study
or a patient, the larger and rarer deletions, also ask the user to type the patient ID (or
"DELETE" when the images carry none), as a PACS asks before it purges a study.

The rules (what blocks an erasure, the counts, the word to type) are Qt-free functions so
that they are tested on their own; the dialog only shows them.
"""

from __future__ import annotations

from typing import Any

from PyQt6.QtCore import Qt
from PyQt6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QDialogButtonBox,
    QHeaderView,
    QLabel,
    QLineEdit,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.core.studies import date_display, group_studies, patient_display
from app.gui.widgets import left_headers, muted_label, set_prop

TYPED_KINDS = ("study", "patient")
"""Erasures confirmed by typing: they delete many images at once."""
FALLBACK_WORD = "DELETE"
PLAN_COLUMNS = ("Patient", "Patient ID", "Study date", "Study", "Series", "Modality", "Images")


def erase_block_reason(*, repo_open: bool, owner: bool, storage_format: int,
                       legal_hold: bool, busy: bool = False) -> str:
    """Why the user cannot delete now, in plain words ("" when nothing blocks it). The core
    refuses the same cases (the owner check and the hold are in the signed manifest);
    saying it on the button spares a member a refusal after a long listing."""
    if not repo_open:
        return "Open a repository first."
    if storage_format < 2:
        return ("This repository is in storage format 1, which is read-only: upgrade it to "
                "format 2 on the Repository key page to delete images.")
    if not owner:
        return ("Only the repository's owner or a co-owner can delete images; you are a "
                "member of this repository.")
    if legal_hold:
        return ("This repository is under legal hold: nothing in it can be deleted until an "
                "owner lifts the hold on the Repository key page.")
    if busy:
        return "A deletion is running; wait for it to finish."
    return ""


def plan_counts(plan: Any) -> dict[str, int]:
    """Images, files, studies, series and patients an erasure plan deletes."""
    images = [m for m in plan.images if not m.error]
    studies = group_studies(images)
    patients = {m.attribute("PatientID") or m.attribute("PatientName") for m in images}
    return {"images": len(plan.images), "files": len(plan.originals),
            "studies": len(studies), "series": sum(len(s.series) for s in studies),
            "patients": len(patients - {""})}


def confirmation_word(plan: Any) -> str:
    """What the user types to confirm a study or patient erasure: the one patient ID of the
    plan, else FALLBACK_WORD (no ID, or several patients in one study)."""
    ids = {m.attribute("PatientID") for m in plan.images if not m.error}
    return ids.pop() if len(ids) == 1 and "" not in ids else FALLBACK_WORD


def _plural(n: int, word: str, many: str = "") -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def plan_summary(plan: Any) -> str:
    """One sentence: what goes, of whom, from which repository."""
    counts = plan_counts(plan)
    patients = sorted({patient_display(m.attribute("PatientName")) or m.attribute("PatientID")
                       for m in plan.images if not m.error} - {""})
    whose = ""
    if len(patients) == 1:
        whose = f" of patient {patients[0]}"
    elif patients:
        whose = f" of {_plural(len(patients), 'patient')}"
    return (f"{_plural(counts['images'], 'image')} ({_plural(counts['files'], 'file')}) in "
            f"{_plural(counts['studies'], 'study', 'studies')} and "
            f"{_plural(counts['series'], 'series', 'series')}{whose}, from repository "
            f"{plan.repo_id}")


def plan_rows(plan: Any) -> list[tuple[str, ...]]:
    """One row per series (PLAN_COLUMNS), in study then series order."""
    rows: list[tuple[str, ...]] = []
    for study in group_studies([m for m in plan.images if not m.error]):
        for series in study.series:
            label = " ".join(t for t in (f"#{series.number}" if series.number else "",
                                         series.description) if t)
            rows.append((patient_display(study.patient_name) or "—", study.patient_id,
                         date_display(study.study_date), study.description, label or "—",
                         series.modality, str(len(series.images))))
    damaged = sum(1 for m in plan.images if m.error)
    if damaged:
        rows.append(("—", "", "", "metadata damaged", "—", "", str(damaged)))
    return rows


class EraseDialog(QDialog):
    """The plan in counts and one row per series; "Delete" enabled once the user typed the
    confirmation word (study or patient) or at once (an image or a series)."""

    def __init__(self, plan: Any, what: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.plan = plan
        kind = plan.target.kind
        self.setWindowTitle(f"Delete {kind}")
        self.setMinimumWidth(640)
        layout = QVBoxLayout(self)
        layout.setSpacing(10)
        title = QLabel(f"Delete {what}?")
        title.setObjectName("CardTitle")
        title.setWordWrap(True)
        layout.addWidget(title)
        self.summary = QLabel(f"This permanently deletes {plan_summary(plan)}.")
        self.summary.setWordWrap(True)
        layout.addWidget(self.summary)
        rows = plan_rows(plan)
        self.table = QTableWidget(len(rows), len(PLAN_COLUMNS))
        self.table.setHorizontalHeaderLabels(list(PLAN_COLUMNS))
        left_headers(self.table)
        vertical = self.table.verticalHeader()
        if vertical is not None:
            vertical.setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.table.setShowGrid(False)
        self.table.setFocusPolicy(Qt.FocusPolicy.NoFocus)  # a list to read, not to edit
        for i, row in enumerate(rows):
            for j, value in enumerate(row):
                self.table.setItem(i, j, QTableWidgetItem(value))
        header = self.table.horizontalHeader()
        if header is not None:
            header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
            header.setSectionResizeMode(PLAN_COLUMNS.index("Study"),
                                        QHeaderView.ResizeMode.Stretch)
        self.table.setMaximumHeight(32 + 26 * min(8, max(1, len(rows))))
        layout.addWidget(self.table)
        layout.addWidget(muted_label(
            "Every pack and index segment holding these images is rewritten without them "
            "and their originals are deleted from the cloud bucket: no search finds them "
            "again. This cannot be undone. The access log keeps who viewed them before. "
            "Copies the cloud provider keeps on its own (backups, object versions) are out "
            "of Radcrypt's reach."))
        self.word = confirmation_word(plan) if kind in TYPED_KINDS else ""
        self.typed = QLineEdit()
        self.typed.setVisible(bool(self.word))
        if self.word:
            subject = "the patient ID" if self.word != FALLBACK_WORD else "the word"
            prompt = QLabel(f"To confirm, type {subject} <b>{self.word}</b>:")
            layout.addWidget(prompt)
            self.typed.setPlaceholderText(self.word)
            self.typed.textChanged.connect(self._validate)
            layout.addWidget(self.typed)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        count = plan_counts(plan)["images"]
        delete = self.buttons.addButton(f"Delete {_plural(count, 'image')}",
                                        QDialogButtonBox.ButtonRole.AcceptRole)
        assert delete is not None
        self.delete_button = delete
        set_prop(self.delete_button, "danger", True)
        cancel = self.buttons.button(QDialogButtonBox.StandardButton.Cancel)
        if cancel is not None:
            cancel.setDefault(True)  # Enter never deletes
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout.addWidget(self.buttons)
        self._validate()

    def confirmed(self) -> bool:
        return not self.word or self.typed.text().strip() == self.word

    def _validate(self) -> None:
        self.delete_button.setEnabled(self.confirmed())

    def accept(self) -> None:
        if self.confirmed():
            super().accept()
