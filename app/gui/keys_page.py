"""Repository key: create a repository, see its key version and who has access; register
users from their public card, grant and revoke (which rotates the key version); back up
this workstation's identity under a separate passphrase ("Back up identity…"); set or lift
the legal hold (owners; issue 16), which refuses every deletion from the repository.

Every change asks first, in words that say what it does.
"""

from __future__ import annotations

import re
from typing import Any

from PyQt6.QtCore import Qt, pyqtSignal
from PyQt6.QtGui import QGuiApplication
from PyQt6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.core.types import Repository
from app.gui import theme
from app.gui.backend import AccessRow
from app.gui.context import AppContext
from app.gui.tasks import TaskContext, TaskError
from app.gui.widgets import (
    PageHeader,
    card,
    left_headers,
    muted_label,
    primary,
    set_prop,
)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class NewRepositoryDialog(QDialog):
    """The new repository's name; its key is wrapped to the user's identity (repositories
    locked by a password alone are no longer created)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("New repository")
        self.setMinimumWidth(460)
        layout = QVBoxLayout(self)
        layout.setSpacing(10)
        intro = QLabel(
            "A new repository gets a new repository key, made on this workstation. Images "
            "imported into it are encrypted with that key; the cloud never sees it. The key "
            "is wrapped to your identity.")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        form = QFormLayout()
        self.name = QLineEdit()
        self.name.setPlaceholderText("for example ct-chest-2024")
        self.name.setMaxLength(63)
        self.name.textChanged.connect(self._validate)
        form.addRow("Name:", self.name)
        self.storage_format = QComboBox()
        self.storage_format.addItem("Format 2 (searches checked for completeness)", 2)
        self.storage_format.setToolTip(
            "Format 2 packs each import batch into a few objects and keeps a signed log of "
            "the index, so that a search that left part of the archive out is detected. "
            "It is the only format for new repositories: format 1 is read-only.")
        form.addRow("Format:", self.storage_format)
        self.search = QComboBox()  # issue 19: where the repository is searched
        self.search.addItem("On the search service (fast)", "sknn")
        self.search.addItem("On each workstation (private queries)", "workstation")
        self.search.addItem("Encrypted scores on the service (private queries)", "ckks")
        self.search.setToolTip(
            "On the search service: the server ranks encrypted vectors, fast even for "
            "millions of images, but an attacker who knows some archived images and can "
            "read the index could learn about the others. On each workstation: the server "
            "stores no searchable index and learns nothing of your queries; every member's "
            "computer keeps an encrypted copy of the image features (about 1 GB per "
            "million images) and searches it itself. Encrypted scores: the server keeps "
            "the index and computes scores under homomorphic encryption (CKKS) that only "
            "members can decrypt; it learns nothing of your queries or their ranking, at "
            "about a third of a second per query for 10,000 images.")
        self.search.currentIndexChanged.connect(self._explain_search)
        form.addRow("Search:", self.search)
        layout.addLayout(form)
        self.search_note = QLabel("")
        self.search_note.setWordWrap(True)  # room for the longer of the two sentences
        self.search_note.setMinimumHeight(self.search_note.fontMetrics().lineSpacing() * 3 + 6)
        layout.addWidget(self.search_note)
        self._explain_search()
        self.problem = QLabel("")
        self.problem.setObjectName("ErrorText")
        self.problem.setWordWrap(True)
        layout.addWidget(self.problem)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.create_button = primary(self.buttons.addButton(
            "Create repository", QDialogButtonBox.ButtonRole.AcceptRole))
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout.addWidget(self.buttons)
        self._validate()

    def problems(self) -> str:
        name = self.name.text().strip()
        if not name:
            return ""
        if not NAME_RE.fullmatch(name):
            return ("Use 1 to 63 characters: lowercase letters a-z, digits and '-', not "
                    "starting with '-'.")
        return ""

    def complete(self) -> bool:
        return bool(self.name.text().strip()) and not self.problems()

    def _validate(self) -> None:
        problem = self.problems()
        self.problem.setText(problem)
        set_prop(self.name, "invalid", bool(problem) and "characters" in problem)
        self.create_button.setEnabled(self.complete())

    def values(self) -> tuple[str, int]:
        """(name, storage format: 2)."""
        return self.name.text().strip(), int(self.storage_format.currentData())

    def search_mode(self) -> str:
        """"sknn", "workstation" or "ckks" (issue 19)."""
        return str(self.search.currentData())

    def _explain_search(self) -> None:
        if self.search_mode() == "ckks":
            self.search_note.setText(
                "The trade-off: the server keeps the index and computes scores it cannot "
                "read, so it sees no query and no ranking; each search takes longer "
                "(about 0.3 s per 10,000 images) and nothing is downloaded beforehand.")
            return
        self.search_note.setText(
            "The trade-off: the server computes nothing and sees no query; each member's "
            "computer downloads the encrypted features once (then only what is new) and "
            "searches them itself." if self.search_mode() == "workstation" else
            "The trade-off: fastest, nothing to download; the server ranks encrypted "
            "vectors (see the security notes on known-plaintext attacks).")


class BackupIdentityDialog(QDialog):
    """The login password (to unlock the identity file once more) and a new backup
    passphrase typed twice. The passphrase protects the backup wherever it is kept, so
    it must be strong and must not be the login password (the core refuses both); its
    strength is shown as it is typed (zxcvbn, as for a new identity)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Back up identity")
        self.setMinimumWidth(480)
        layout = QVBoxLayout(self)
        layout.setSpacing(10)
        intro = QLabel(
            "The backup holds your private keys, encrypted under a passphrase used for "
            "nothing else. With it you can restore your identity on a new workstation "
            "(radcrypt identity restore). Keep the file and the passphrase in two "
            "different places, away from this workstation.")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        form = QFormLayout()
        self.password = QLineEdit()
        self.passphrase = QLineEdit()
        self.again = QLineEdit()
        for field in (self.password, self.passphrase, self.again):
            field.setEchoMode(QLineEdit.EchoMode.Password)
            field.textChanged.connect(self._validate)
        form.addRow("Login password:", self.password)
        form.addRow("Backup passphrase:", self.passphrase)
        form.addRow("Passphrase again:", self.again)
        layout.addLayout(form)
        self.strength = muted_label("")
        layout.addWidget(self.strength)
        self.problem = QLabel("")
        self.problem.setObjectName("ErrorText")
        self.problem.setWordWrap(True)
        layout.addWidget(self.problem)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.save_button = primary(QPushButton("Choose file and back up…"))
        self.buttons.addButton(self.save_button, QDialogButtonBox.ButtonRole.AcceptRole)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout.addWidget(self.buttons)
        self._validate()

    def problems(self) -> str:
        passphrase = self.passphrase.text()
        if not passphrase:
            return ""
        if passphrase == self.password.text():
            return "The passphrase must differ from your login password."
        if self.again.text() and self.again.text() != passphrase:
            return "The two passphrases differ."
        return ""

    def complete(self) -> bool:
        return (bool(self.password.text()) and bool(self.passphrase.text())
                and self.again.text() == self.passphrase.text() and not self.problems())

    def _validate(self) -> None:
        from app.core import client as facade

        passphrase = self.passphrase.text()
        self.strength.setText(
            f"Strength: {facade.password_strength(passphrase)[1]}" if passphrase else "")
        self.problem.setText(self.problems())
        self.save_button.setEnabled(self.complete())

    def values(self) -> tuple[str, str]:
        """(login password, backup passphrase)."""
        return self.password.text(), self.passphrase.text()


class KeysPage(QWidget):
    """Repository keys and access."""

    repositoryCreated = pyqtSignal(object)  # Repository

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.repo: Repository | None = None
        self.rows: list[AccessRow] = []
        self.known_users: dict[str, str] = {}
        self.dialog: NewRepositoryDialog | None = None
        self.backup_dialog: BackupIdentityDialog | None = None
        self.upgrading = False
        self.legal_hold = False  # as the stored manifest says (refreshed in the background)
        self.hold_busy = False

        layout = QVBoxLayout(self)
        layout.setContentsMargins(20, 16, 20, 16)
        layout.setSpacing(12)
        layout.addWidget(PageHeader(
            "Repository key", "Each repository has its own key, made on this workstation. "
            "The cloud stores it only wrapped for the people allowed in."))

        top = QHBoxLayout()
        top.setSpacing(12)
        info = card()
        info_layout = QVBoxLayout(info)
        info_layout.setContentsMargins(14, 12, 14, 12)
        head = QHBoxLayout()
        title = QLabel("Open repository")
        title.setObjectName("CardTitle")
        head.addWidget(title)
        head.addStretch(1)
        self.upgrade_button = theme.themed(QPushButton("Upgrade storage format…"), "resume")
        self.upgrade_button.setToolTip(
            "Move this repository to storage format 2 (owner only): afterwards images can "
            "be imported again and every search is checked for completeness")
        self.upgrade_button.clicked.connect(self.upgrade_storage_format)
        self.upgrade_button.setVisible(False)
        head.addWidget(self.upgrade_button)
        self.new_button = primary(QPushButton(theme.icon("plus", "#ffffff"), "New repository…"))
        self.new_button.clicked.connect(self.open_new_repository)
        head.addWidget(self.new_button)
        info_layout.addLayout(head)
        form = QFormLayout()
        form.setVerticalSpacing(6)
        self.fields: dict[str, QLabel] = {}
        for key, label in (("name", "Name"), ("version", "Key version"),
                           ("format", "Storage format"), ("created", "Created"),
                           ("scheme", "Encryption"), ("features", "Features"),
                           ("levels", "Index levels")):
            value = QLabel("—")
            value.setWordWrap(True)
            value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.fields[key] = value
            form.addRow(QLabel(label + ":"), value)
        info_layout.addLayout(form)
        info_layout.addStretch(1)
        top.addWidget(info, 3)

        self.identity_card = card()
        id_layout = QVBoxLayout(self.identity_card)
        id_layout.setContentsMargins(14, 12, 14, 12)
        id_title = QLabel("Your identity card")
        id_title.setObjectName("CardTitle")
        id_layout.addWidget(id_title)
        self.identity_text = muted_label(
            "Give this card to a repository's owner so they can grant you access. It holds "
            "only public keys.")
        id_layout.addWidget(self.identity_text)
        self.identity_fields = QLabel("")
        self.identity_fields.setWordWrap(True)
        self.identity_fields.setTextInteractionFlags(
            Qt.TextInteractionFlag.TextSelectableByMouse)
        id_layout.addWidget(self.identity_fields)
        id_layout.addStretch(1)
        id_buttons = QHBoxLayout()
        self.copy_card_button = theme.themed(QPushButton("Copy card"), "copy")
        self.copy_card_button.clicked.connect(self.copy_card)
        self.save_card_button = theme.themed(QPushButton("Save card…"), "save")
        self.save_card_button.clicked.connect(self.save_card)
        self.backup_button = theme.themed(QPushButton("Back up identity…"), "save")
        self.backup_button.setToolTip(
            "Save your private keys, encrypted under a separate passphrase, to restore "
            "your identity if this workstation is lost")
        self.backup_button.clicked.connect(self.open_backup_identity)
        id_buttons.addWidget(self.copy_card_button)
        id_buttons.addWidget(self.save_card_button)
        id_buttons.addWidget(self.backup_button)
        id_buttons.addStretch(1)
        id_layout.addLayout(id_buttons)
        top.addWidget(self.identity_card, 2)
        layout.addLayout(top)
        layout.addWidget(self._build_hold_card())

        access = card()
        access_layout = QVBoxLayout(access)
        access_layout.setContentsMargins(14, 12, 14, 12)
        access_head = QHBoxLayout()
        access_title = QLabel("Who has access")
        access_title.setObjectName("CardTitle")
        access_head.addWidget(access_title)
        access_head.addStretch(1)
        self.register_button = theme.themed(QPushButton("Register user…"), "user")
        self.register_button.setToolTip("Add a user from their public identity card")
        self.register_button.clicked.connect(self.register_user)
        self.grant_button = theme.themed(QPushButton("Grant access…"), "unlock")
        self.grant_button.clicked.connect(self.grant)
        self.revoke_button = theme.themed(QPushButton("Revoke access"), "lock")
        set_prop(self.revoke_button, "danger", True)
        self.revoke_button.clicked.connect(self.revoke)
        self.access_log_button = theme.themed(QPushButton("Export access log…"), "activity")
        self.access_log_button.setToolTip(
            "Owners: save who decrypted which original or preview of this repository, when "
            "and why, as CSV (the same as 'radcrypt audit --access --csv')")
        self.access_log_button.clicked.connect(self.export_access_log)
        for button in (self.register_button, self.grant_button, self.revoke_button,
                       self.access_log_button):
            access_head.addWidget(button)
        access_layout.addLayout(access_head)
        self.access_note = muted_label("")
        access_layout.addWidget(self.access_note)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["User", "Name", "Key version"])
        self.table.verticalHeader().setVisible(False)
        left_headers(self.table)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.setAlternatingRowColors(True)
        self.table.setShowGrid(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        self.table.itemSelectionChanged.connect(self._update)
        access_layout.addWidget(self.table, 1)
        layout.addWidget(access, 1)

        ctx.repositoryChanged.connect(self.set_repository)
        self.refresh_identity()
        self.set_repository(None)

    def _build_hold_card(self) -> QWidget:
        """The legal hold: its state in words and the owner's button to set or lift it."""
        self.hold_card = card()
        box = QVBoxLayout(self.hold_card)
        box.setContentsMargins(14, 12, 14, 12)
        head = QHBoxLayout()
        hold_title = QLabel("Legal hold")
        hold_title.setObjectName("CardTitle")
        head.addWidget(hold_title)
        self.hold_state = QLabel("—")
        self.hold_state.setObjectName("HoldState")
        head.addSpacing(8)
        head.addWidget(self.hold_state)
        head.addStretch(1)
        self.hold_button = theme.themed(QPushButton("Set legal hold…"), "lock")
        self.hold_button.clicked.connect(self.toggle_legal_hold)
        head.addWidget(self.hold_button)
        box.addLayout(head)
        self.hold_text = muted_label(
            "While a legal hold is on, nothing can be deleted from this repository, by anyone, "
            "until an owner lifts it. The hold is part of the owner-signed repository manifest: "
            "members' workstations see it and refuse deletions too.")
        box.addWidget(self.hold_text)
        return self.hold_card

    # --- display --------------------------------------------------------------------------

    def refresh_identity(self) -> None:
        backend = self.ctx.backend
        show = backend.identity_mode and backend.identity is not None
        self.identity_card.setVisible(show)
        if show:
            text = (f"<b>{_escape(backend.user_name)}</b><br>"
                    f"User id: <tt>{_escape(backend.user_id)}</tt>")
            if backend.fingerprint:
                text += f"<br>Fingerprint: <tt>{_escape(backend.fingerprint)}</tt>"
            self.identity_fields.setText(text)

    def set_repository(self, repo: Repository | None) -> None:
        self.repo = repo
        if repo is None:
            for label in self.fields.values():
                label.setText("—")
            self.fields["name"].setText("No repository open")
            self.rows = []
            self._fill_table()
        else:
            m = repo.manifest
            self.fields["name"].setText(m.repo_id)
            self.fields["version"].setText(str(repo.keys.version))
            self.fields["format"].setText(format_words(self.ctx.backend.storage_format(repo)))
            self.fields["created"].setText(m.created.replace("T", " ")[:19] + " UTC")
            self.fields["scheme"].setText(m.scheme)
            self.fields["features"].setText(f"{m.extractor}, {m.dim} dimensions")
            self.fields["levels"].setText(", ".join(str(v) for v in m.levels) or "—")
            self.load_access()
            self.legal_hold = bool(m.legal_hold)
            self.load_legal_hold()
        if self.ctx.backend.identity_mode:
            self.access_note.setText("Users registered by you can be granted this "
                                     "repository's key. Revoking rotates the key version.")
        else:
            self.access_note.setText("The demo repository belongs to a throw-away identity: "
                                     "per-user access (register, grant, revoke) needs your "
                                     "own identity.")
        self._update()

    def load_access(self) -> None:
        repo = self.repo
        if repo is None:
            return
        backend = self.ctx.backend
        self.ctx.runner.run("Reading who has access", lambda _: backend.access_list(repo),
                            tracked=False,
                            on_done=lambda rows: self._access_loaded(repo, rows),
                            on_error=self.ctx.error)

    def _access_loaded(self, repo: Repository, rows: list[AccessRow]) -> None:
        if repo is not self.repo:
            return
        self.rows = rows
        for row in rows:
            self.known_users.setdefault(row.user_id, row.name)
        self._fill_table()

    def _fill_table(self) -> None:
        self.table.setRowCount(len(self.rows))
        for i, row in enumerate(self.rows):
            name = row.name + (" (you)" if row.user_id == self.ctx.backend.user_id else "")
            for j, value in enumerate((row.user_id, name, str(row.key_version))):
                item = QTableWidgetItem(value)
                if j == 2:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                self.table.setItem(i, j, item)
        self._update()

    def _update(self) -> None:
        identity = self.ctx.backend.identity_mode
        connected = self.ctx.backend.connected
        self.new_button.setEnabled(identity and connected)  # repositories need an identity
        repo = self.repo
        old_format = (repo is not None and self.ctx.backend.storage_format(repo) == 1
                      and identity and self.ctx.backend.is_owner(repo))
        self.upgrade_button.setVisible(bool(old_format))
        self.upgrade_button.setEnabled(bool(old_format) and not self.upgrading)
        self.register_button.setEnabled(identity and connected)
        self.grant_button.setEnabled(identity and self.repo is not None)
        selected = self.selected_user()
        self.revoke_button.setEnabled(identity and self.repo is not None and bool(selected)
                                      and selected != self.ctx.backend.user_id)
        self.access_log_button.setEnabled(bool(identity and repo is not None
                                               and self.ctx.backend.is_owner(repo)))
        self._update_hold()

    def hold_block_reason(self) -> str:
        """Why the legal hold cannot be changed here ("" when it can)."""
        repo, backend = self.repo, self.ctx.backend
        if repo is None:
            return "Open a repository first."
        if backend.storage_format(repo) < 2:
            return ("A legal hold needs storage format 2: upgrade this repository first "
                    "(owner).")
        if not backend.is_owner(repo):
            return ("Only the repository's owner or a co-owner can set or lift a legal hold; "
                    "you are a member of this repository.")
        if self.hold_busy:
            return "The legal hold is being changed…"
        return ""

    def _update_hold(self) -> None:
        repo = self.repo
        on = self.legal_hold
        if repo is None:
            self.hold_state.setText("—")
        elif on:
            self.hold_state.setText("On — nothing can be deleted from this repository")
        else:
            self.hold_state.setText("Off — owners can delete images")
        colour = theme.current_colors().warning if on and repo is not None else ""
        self.hold_state.setStyleSheet(f"color: {colour}; font-weight: 600;" if colour else "")
        self.hold_button.setText("Lift legal hold…" if on else "Set legal hold…")
        reason = self.hold_block_reason()
        self.hold_button.setEnabled(not reason)
        self.hold_button.setToolTip(reason or (
            "Allow deletions from this repository again" if on else
            "Refuse every deletion from this repository until an owner lifts the hold"))

    def load_legal_hold(self) -> None:
        """The hold as the stored manifest says now (another owner may have changed it)."""
        repo, client = self.repo, self.ctx.backend.client
        if repo is None or client is None or self.ctx.backend.storage_format(repo) < 2:
            return

        def known(on: object) -> None:
            if self.repo is not None and self.repo.repo_id == repo.repo_id:
                self.legal_hold = bool(on)
                self._update_hold()

        self.ctx.runner.run("Reading the legal hold", lambda _: client.legal_hold(repo),
                            tracked=False, light=True, on_done=known,
                            on_error=lambda _err: None)  # the manifest's value stays

    def toggle_legal_hold(self) -> None:
        """Set or lift the legal hold (owner), after asking, off the UI thread."""
        repo, client = self.repo, self.ctx.backend.client
        if repo is None or client is None or self.hold_block_reason():
            return
        on = not self.legal_hold
        if on:
            asked = self.ctx.dialogs.confirm(
                self, "Set legal hold",
                f"Put {repo.repo_id} under legal hold? Nothing can then be deleted from it, "
                "by anyone, until an owner lifts the hold. Searching, viewing and importing "
                "go on as before.", "Set legal hold")
        else:
            asked = self.ctx.dialogs.confirm(
                self, "Lift legal hold",
                f"Lift the legal hold on {repo.repo_id}? Owners can then delete images, "
                "series, studies and patients from it again.", "Lift legal hold")
        if not asked:
            return
        self.hold_busy = True
        self._update_hold()

        def done(new: Repository) -> None:
            self.legal_hold = bool(new.manifest.legal_hold)
            words = "set" if self.legal_hold else "lifted"
            text = f"Legal hold {words} on {repo.repo_id}."
            self.ctx.activity.record("repository", text, repository=repo.repo_id)
            self.ctx.info(text + (" Nothing can be deleted from it now." if self.legal_hold
                                  else " Owners can delete images again."), "success")
            self.ctx.set_repository(new)

        def finish() -> None:
            self.hold_busy = False
            self._update_hold()

        self.ctx.runner.run(("Setting" if on else "Lifting") + " the legal hold on "
                            f"{repo.repo_id}", lambda _: client.set_legal_hold(repo, on),
                            on_done=done, on_error=self.ctx.error, on_finish=finish)

    def selected_user(self) -> str:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows:
            return ""
        item = self.table.item(rows[0].row(), 0)
        return item.text() if item is not None else ""

    # --- actions --------------------------------------------------------------------------

    def open_new_repository(self) -> NewRepositoryDialog:
        dialog = NewRepositoryDialog(self)
        dialog.accepted.connect(lambda: self.create_repository(
            *dialog.values(), search=dialog.search_mode()))
        dialog.finished.connect(lambda _: setattr(self, "dialog", None))
        self.dialog = dialog
        dialog.open()
        return dialog

    def upgrade_storage_format(self) -> None:
        """Run the migration to format 2 off the UI thread (owner only), with progress."""
        repo = self.repo
        if repo is None or self.upgrading:
            return
        if not self.ctx.dialogs.confirm(
                self, "Upgrade storage format",
                f"Move {repo.repo_id} to storage format 2? Its index and previews are "
                "rewritten into packs and a signed log; the originals stay as they are. "
                "Afterwards images can be imported again, and every search is checked for "
                "completeness. Members keep their access. If it is interrupted, run it "
                "again to finish.", "Upgrade"):
            return
        backend = self.ctx.backend
        self.upgrading = True
        self._update()

        def done(new: Repository) -> None:
            self.ctx.activity.record("repository", f"Upgraded {repo.repo_id} to storage "
                                     "format 2", repository=repo.repo_id)
            self.ctx.info(f"{repo.repo_id} is now in storage format 2: images can be "
                          "imported again.", "success")
            self.ctx.set_repository(new)

        def finish() -> None:
            self.upgrading = False
            self._update()

        self.ctx.runner.run(f"Upgrading the storage format of {repo.repo_id}",
                            lambda t: backend.upgrade_storage_format(repo, t.progress),
                            on_done=done, on_error=self.ctx.error, on_finish=finish)

    def create_repository(self, name: str, storage_format: int = 2,
                          search: str = "sknn") -> None:
        backend = self.ctx.backend

        def done(repo: Repository) -> None:
            self.ctx.activity.record("repository", f"Created repository {repo.repo_id} "
                                     f"(key version {repo.keys.version})",
                                     repository=repo.repo_id)
            self.ctx.info(f"Repository {repo.repo_id} created; it is now open.", "success")
            self.repositoryCreated.emit(repo)

        self.ctx.runner.run(f"Creating repository {name}",
                            lambda _: backend.create_repository(name, storage_format,
                                                                search),
                            on_done=done, on_error=self.ctx.error)

    def register_user(self) -> None:
        card_json = self.ctx.dialogs.card_text(self)
        if not card_json:
            return
        backend = self.ctx.backend

        def done(record: Any) -> None:
            user_id = str(getattr(record, "user_id", ""))
            name = str(getattr(record, "name", ""))
            fingerprint = str(getattr(record, "fingerprint", ""))
            self.known_users[user_id] = name
            self.ctx.activity.record("access", f"Registered user {name} ({user_id}), "
                                     f"key fingerprint {fingerprint}")
            self.ctx.info(f"{name} is registered (fingerprint {fingerprint}). You can now "
                          "grant them access to a repository.", "success")

        if not self.ctx.dialogs.confirm(
                self, "Register user",
                "Register the user on this card? Registration lets you grant them access "
                "later; it gives them no access by itself. Check the card's fingerprint with "
                "them by phone or in person.", "Register"):
            return
        self.ctx.runner.run("Registering a user", lambda _: backend.register_user(card_json),
                            on_done=done, on_error=self.ctx.error)

    def grant(self) -> None:
        repo = self.repo
        if repo is None:
            return
        granted = {r.user_id for r in self.rows}
        choices = [u for u in self.known_users if u not in granted]
        user_id = self.ctx.dialogs.choose(self, "Grant access", "User id to grant access "
                                          f"to {repo.repo_id}:", choices)
        if not user_id:
            return
        name = self.known_users.get(user_id, user_id)
        if not self.ctx.dialogs.confirm(
                self, "Grant access",
                f"Give {name} the key of repository {repo.repo_id} (key version "
                f"{repo.keys.version})? They will be able to search it and decrypt every "
                "image in it.", "Grant access"):
            return
        backend = self.ctx.backend

        def done(_: object) -> None:
            self.ctx.activity.record("access", f"Granted {name} access to {repo.repo_id}",
                                     repository=repo.repo_id)
            self.ctx.info(f"{name} now has access to {repo.repo_id}.", "success")
            self.load_access()

        self.ctx.runner.run(f"Granting access to {name}",
                            lambda _: backend.grant(repo, user_id),
                            on_done=done, on_error=self.ctx.error)

    def revoke(self) -> None:
        repo, user_id = self.repo, self.selected_user()
        if repo is None or not user_id:
            return
        name = self.known_users.get(user_id, user_id)
        new_version = repo.keys.version + 1
        if not self.ctx.dialogs.confirm(
                self, "Revoke access",
                f"Revoke {name}'s access to {repo.repo_id}? A new key version "
                f"({new_version}) is made: new images use it and the search service stops "
                f"answering {name}. What they already downloaded cannot be taken back.",
                "Revoke access"):
            return
        backend = self.ctx.backend

        def done(new: Repository) -> None:
            self.ctx.activity.record("access", f"Revoked {name}'s access to {repo.repo_id}; "
                                     f"key version is now {new.keys.version}",
                                     repository=repo.repo_id)
            self.ctx.info(f"{name} no longer has access to {repo.repo_id}; key version "
                          f"{new.keys.version}.", "success")
            self.ctx.set_repository(new)

        self.ctx.runner.run(f"Revoking access of {name}",
                            lambda t: backend.revoke(repo, user_id, t.progress),
                            on_done=done, on_error=self.ctx.error)

    def copy_card(self) -> None:
        clipboard = QGuiApplication.clipboard()
        if clipboard is not None:
            try:
                clipboard.setText(self.ctx.backend.card_json())
            except Exception as exc:
                self.ctx.error(TaskError(str(exc), ""))
                return
            self.ctx.info("Your identity card is on the clipboard.", "success")

    def export_access_log(self) -> None:
        """Save the repository's access log as CSV (owners only: it is encrypted to
        them); entries that do not verify are left out and named in the message."""
        repo, client = self.repo, self.ctx.backend.client
        if repo is None or client is None:
            return
        path = self.ctx.dialogs.save_file(self, "Export the access log",
                                          f"{repo.repo_id}-access-log.csv")
        if not path:
            return

        def work(_: TaskContext) -> Any:
            report = client.access_log(repo)
            with open(path, "w", encoding="utf-8", newline="") as handle:
                handle.write(report.to_csv())
            return report

        def done(report: Any) -> None:
            count = len(report.events)
            text = (f"Access log of {repo.repo_id}: {count} event{'s' * (count != 1)} "
                    f"saved to {path}.")
            if report.problems:
                self.ctx.message.emit("warning", text + f" {len(report.problems)} chain(s) "
                                      "did not verify: their later entries were left out.",
                                      "\n".join(report.problems))
            else:
                self.ctx.info(text, "success")
            self.ctx.activity.record("access", text, repository=repo.repo_id)

        self.ctx.runner.run("Exporting the access log", work, on_done=done,
                            on_error=self.ctx.error)

    def save_card(self) -> None:
        path = self.ctx.dialogs.save_file(self, "Save your identity card",
                                          f"{self.ctx.backend.user_id or 'identity'}.json")
        if not path:
            return
        card_json = self.ctx.backend.card_json()

        def work(_: TaskContext) -> str:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(card_json)
            return path

        self.ctx.runner.run("Saving your identity card", work,
                            on_done=lambda p: self.ctx.info(f"Identity card saved to {p}.",
                                                            "success"),
                            on_error=self.ctx.error)


    def open_backup_identity(self) -> BackupIdentityDialog:
        dialog = BackupIdentityDialog(self)
        dialog.accepted.connect(lambda: self.back_up_identity(*dialog.values()))
        dialog.finished.connect(lambda _: setattr(self, "backup_dialog", None))
        self.backup_dialog = dialog
        dialog.open()
        return dialog

    def back_up_identity(self, password: str, passphrase: str) -> None:
        """Ask where, then write the backup off the UI thread (scrypt takes about a
        second); a wrong login password, a weak passphrase or an existing file come back
        as the core's plain-words errors."""
        from app.core import client as facade

        path = self.ctx.dialogs.save_file(self, "Save the identity backup",
                                          f"{self.ctx.backend.user_id or 'identity'}.rcib")
        if not path:
            return
        settings = self.ctx.backend.settings

        def work(_: TaskContext) -> str:
            facade.export_identity_backup(settings, password, passphrase, path)
            return path

        self.ctx.runner.run(
            "Backing up your identity", work,
            on_done=lambda p: self.ctx.info(
                f"Identity backup saved to {p}. Keep it and its passphrase apart, away "
                "from this workstation.", "success"),
            on_error=self.ctx.error)


def format_words(storage_format: int) -> str:
    """A repository's storage format in plain words."""
    if storage_format == 1:
        return ("1 (old, read-only: search and view work; its owner can upgrade it to "
                "import again)")
    return "2 (searches checked for completeness)"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
