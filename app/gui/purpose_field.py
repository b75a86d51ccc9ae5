"""The access log's optional purpose field, in the status bar (issue 16).

Why: the access log (app/core/access_log.py) records who decrypted which original or
preview, and may say why ("tumour board", "second opinion"), as ``radcrypt get
--purpose`` does on the command line. A radiologist opens images from several places
(search results, the archive, keyword results, the viewer's stack), so the field sits
once in the status bar, out of the way, instead of in each of them: what is typed there
goes with every image opened from then on, until it is changed or cleared. It is not a
secret (the owners read it in the log, encrypted to them) and is kept across a
workstation lock.
"""

from __future__ import annotations

from typing import Any

from PyQt6.QtWidgets import QLabel, QLineEdit

from app.core.types import MAX_PURPOSE

PLACEHOLDER = "Purpose of access (optional)"


class PurposeField(QLineEdit):
    """A line edit whose text is the backend's ``access_purpose`` as it is typed."""

    def __init__(self, backend: Any) -> None:
        super().__init__()
        self.backend = backend
        self.setObjectName("PurposeField")
        self.setPlaceholderText(PLACEHOLDER)
        self.setMaxLength(MAX_PURPOSE)
        self.setClearButtonEnabled(True)
        self.setFixedWidth(230)
        self.setToolTip("Why you open images now, e.g. \"tumour board\": recorded with "
                        "every original or preview you decrypt, in the repository's "
                        "access log that its owners read")
        self.setText(str(getattr(backend, "access_purpose", "") or ""))
        self.textChanged.connect(self._changed)

    def _changed(self, text: str) -> None:
        self.backend.access_purpose = text


def install_purpose_field(window: Any) -> PurposeField:
    """Put the field first in the window's permanent status-bar area (left of a running
    task's progress and the user's name) and return it."""
    field = PurposeField(window.backend)
    label = QLabel("Purpose:")  # the placeholder goes once something is typed
    label.setBuddy(field)
    status = window.statusBar()
    status.addPermanentWidget(label)  # installed before the others: first from the left
    status.addPermanentWidget(field)
    return field
