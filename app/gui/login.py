"""The first screen: register an identity on first run, unlock it on later runs.

The password is stretched with scrypt (app/core/identity.py) in a worker; a wrong
password is refused in plain words and nothing is unlocked.
"""

from __future__ import annotations

from PyQt6.QtCore import Qt, pyqtSignal
from PyQt6.QtWidgets import (
    QFormLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QWidget,
)

from app.core.errors import AccessDenied
from app.gui import theme
from app.gui.backend import password_problem, password_strength
from app.gui.context import AppContext
from app.gui.tasks import TaskError
from app.gui.widgets import (
    StrengthMeter,
    gate_card,
    gate_status_rows,
    gate_titles,
    muted_label,
    password_edit,
    primary,
)

REGISTER = "register"
UNLOCK = "unlock"
WRONG_PASSWORD = "Wrong password. Nothing was unlocked; please try again."
# The intended-use notice, seen before anything else (docs/PRIVACY.md section 1).
INTENDED_USE = ("Radcrypt is a retrieval aid, not a diagnostic device: it finds similar "
                "archived images; diagnosis stays with the clinician.")


class GatePage(QWidget):
    """Emits ``unlocked`` once an identity is created or unlocked."""

    unlocked = pyqtSignal()

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.mode = UNLOCK
        self.busy = False
        self.attempts = 0

        self.card, layout = gate_card(self)
        logo = QLabel()
        logo.setPixmap(theme.logo_pixmap(56))
        logo.setAlignment(Qt.AlignmentFlag.AlignCenter)
        layout.addWidget(logo)
        self.heading, self.explain = gate_titles(layout, "Radcrypt")

        form = QFormLayout()
        form.setVerticalSpacing(8)
        self.name = QLineEdit()
        self.name.setPlaceholderText("e.g. Dr. Ana Silva, Radiology")
        self.name.setMaxLength(80)
        self.password = password_edit()
        self.again = password_edit("The same password again")
        self.strength = StrengthMeter()
        self.name_label = QLabel("Your name:")
        self.password_label = QLabel("Password:")
        self.again_label = QLabel("Again:")
        form.addRow(self.name_label, self.name)
        form.addRow(self.password_label, self.password)
        form.addRow(self.again_label, self.again)
        form.addRow("", self.strength)
        layout.addLayout(form)
        for edit in (self.name, self.password, self.again):
            edit.textChanged.connect(self._validate)
            edit.returnPressed.connect(self.submit)

        self.error, self.busy_bar = gate_status_rows(layout)
        self.submit_button = primary(QPushButton(""))
        self.submit_button.setDefault(True)
        self.submit_button.clicked.connect(self.submit)
        layout.addWidget(self.submit_button)
        self.note = muted_label("")
        self.note.setAlignment(Qt.AlignmentFlag.AlignCenter)
        layout.addWidget(self.note)
        self.intended_use = muted_label(INTENDED_USE)
        self.intended_use.setAlignment(Qt.AlignmentFlag.AlignCenter)
        layout.addWidget(self.intended_use)
        self.set_mode(UNLOCK)

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        register = mode == REGISTER
        for widget in (self.name_label, self.name, self.again_label, self.again,
                       self.strength):
            widget.setVisible(register)
        if register:
            self.heading.setText("Welcome. Create your identity on this workstation.")
            self.explain.setText("Your identity is a pair of keys that lets you open the "
                                 "repositories you are granted. It is kept here, locked by "
                                 "your password.")
            self.submit_button.setText("Create identity")
            self.submit_button.setIcon(theme.icon("user", "#ffffff"))
            self.note.setText("Your password never leaves this computer and cannot be "
                              "recovered. Choose one you will remember.")
        else:
            self.heading.setText("Unlock your identity")
            self.explain.setText("Enter the password you chose when you registered on this "
                                 "workstation.")
            self.submit_button.setText("Unlock")
            self.submit_button.setIcon(theme.icon("unlock", "#ffffff"))
            self.note.setText("")
        self.note.setVisible(register)
        self.error.setText("")
        self._validate()

    def focus(self) -> None:
        (self.name if self.mode == REGISTER else self.password).setFocus()

    # --- validation ---------------------------------------------------------------------------

    def problem(self) -> str:
        if self.mode != REGISTER:
            return ""
        password = self.password.text()
        if password:
            name = self.name.text().strip()
            if password_problem(password, name):  # zxcvbn's feedback, in its words
                advice = password_strength(password, name)[1].partition(": ")[2]
                return ("Choose a stronger password: this one would be easy to guess. "
                        + advice).strip()
        if self.again.text() and self.again.text() != password:
            return "The two passwords differ."
        return ""

    def ready(self) -> bool:
        if self.busy or not self.password.text():
            return False
        if self.mode == REGISTER:
            return (bool(self.name.text().strip()) and not self.problem()
                    and self.again.text() == self.password.text())
        return True

    def _validate(self) -> None:
        if self.mode == REGISTER:
            text = self.password.text()
            self.strength.set_strength(*(password_strength(text) if text else (0, "empty")))
            self.error.setText(self.problem())
        self.submit_button.setEnabled(self.ready())

    # --- submit ------------------------------------------------------------------------------

    def submit(self) -> None:
        if not self.ready():
            return
        password = self.password.text()
        backend = self.ctx.backend
        self._set_busy(True)
        if self.mode == REGISTER:
            name = self.name.text().strip()
            self.ctx.runner.run("Creating your identity",
                                lambda _: backend.register(name, password),
                                on_done=lambda _: self._done(f"Identity created for {name}"),
                                on_error=self._failed)
        else:
            self.ctx.runner.run("Unlocking your identity", lambda _: backend.unlock(password),
                                on_done=lambda _: self._done(
                                    f"Identity of {backend.user_name} unlocked"),
                                on_error=self._failed)

    def _done(self, text: str) -> None:
        self._set_busy(False)
        self.password.clear()
        self.again.clear()
        self.ctx.activity.record("connect", text)
        self.unlocked.emit()

    def _failed(self, error: TaskError) -> None:
        self._set_busy(False)
        if isinstance(error.exception, AccessDenied):
            self.attempts += 1
            self.error.setText(WRONG_PASSWORD)
            self.ctx.activity.record("error", "Unlock refused: wrong password")
        else:
            self.error.setText(error.message)
            self.ctx.activity.record("error", error.message, error.details)
        self.password.selectAll()
        self.password.setFocus()

    def _set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.busy_bar.setVisible(busy)
        for edit in (self.name, self.password, self.again):
            edit.setEnabled(not busy)
        if busy:
            self.submit_button.setText("Creating…" if self.mode == REGISTER else "Unlocking…")
        else:
            self.submit_button.setText("Create identity" if self.mode == REGISTER else "Unlock")
        self._validate()
