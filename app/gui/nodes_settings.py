"""Settings: the DICOM nodes Radcrypt talks to (PACS, modalities, viewers) — AE title,
host, port, DICOMweb URL and user — with an "Echo"/"Test" button per node and the
DICOMweb password put in the OS keyring (never in the node file, never on screen).

The nodes live in the facade (``client.pacs``, app/integration/facade.py); this box only
edits them, and every call (the node file, C-ECHO, a QIDO probe, the keyring) runs off
the UI thread through app/gui/tasks.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PyQt6.QtCore import pyqtSignal
from PyQt6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.core.errors import RadcryptError
from app.gui import theme
from app.gui.context import AppContext
from app.gui.tasks import Task, TaskContext, TaskError
from app.gui.widgets import ResultLabel, list_table, muted_label, primary
from app.integration.model import DicomNode, EchoResult

NODE_COLUMNS = ("Name", "AE title", "Host", "Port", "DICOMweb URL", "Last test")
AET_MAX = 16  # PS3.5: an AE title is at most 16 characters


def pacs_of(ctx: AppContext) -> Any:
    """The facade's PACS facet (``client.pacs``); a plain error before the connection.
    Called in background tasks: the facet may read files and open sockets."""
    client = ctx.backend.client
    if client is None:
        raise RadcryptError("not connected to the storage yet")
    return client.pacs


def node_problem(node: DicomNode) -> str:
    """What is wrong with a node as typed, in plain words ("" when it can be saved). The
    facade checks again; this only answers before a round trip."""
    if not node.name.strip():
        return "Give the node a name (e.g. PACS or VIEWER)."
    if node.aet and (len(node.aet) > AET_MAX or not node.aet.isascii()
                     or "\\" in node.aet or not node.aet.strip()):
        return (f"Node {node.name}: the AE title must be 1 to {AET_MAX} plain characters "
                "without a backslash.")
    dimse_parts = [bool(node.aet), bool(node.host), bool(node.port)]
    if any(dimse_parts) and not all(dimse_parts):
        return (f"Node {node.name}: for the DICOM network give the AE title, the host and "
                "the port (or none of them, for a DICOMweb-only node).")
    if node.dicomweb_url and not node.dicomweb_url.startswith(("http://", "https://")):
        return f"Node {node.name}: the DICOMweb URL must start with http:// or https://."
    if not node.dimse and not node.web:
        return (f"Node {node.name}: give an AE title, host and port, or a DICOMweb URL "
                "(or both).")
    if node.username and not node.web:
        return f"Node {node.name}: a user name is for DICOMweb; give its URL too."
    return ""


def missing_password(error: TaskError) -> bool:
    """The failure is a DICOMweb node's password the keyring does not hold
    (app.integration.secrets.PasswordMissing, known by its class name: the front ends do
    not import the secrets module)."""
    exc = error.exception
    return exc is not None and any(c.__name__ == "PasswordMissing" for c in type(exc).__mro__)


def ask_password_then(ctx: AppContext, parent: QWidget | None, name: str,
                      then: Callable[[], None]) -> bool:
    """Ask for node ``name``'s DICOMweb password, keep it in the keyring, then call
    ``then`` (the search, import or send that needed it). False when the user declines."""
    password = ctx.dialogs.password(
        parent, "DICOMweb password",
        f"Node {name} asks for a DICOMweb password and none is kept on this computer. "
        "Enter it to keep it in this computer's keyring:")
    if not password:
        return False

    def done(_: object) -> None:
        ctx.activity.record("settings", f"DICOMweb password of {name} stored in the keyring")
        then()

    ctx.runner.run(f"Storing the password of {name}",
                   lambda _task: pacs_of(ctx).set_web_password(name, password),
                   on_done=done, on_error=ctx.error)
    return True


def run_asking_password(ctx: AppContext, owner: QWidget, slot: str, name: str, title: str,
                        work: Callable[[TaskContext], Any], *,
                        retry: Callable[[], None] | None,
                        on_error: Callable[[TaskError], None],
                        on_retry: Callable[[], None] | None = None,
                        on_idle: Callable[[], None] | None = None,
                        on_finish: Callable[[], None] | None = None,
                        **callbacks: Any) -> Task:
    """Run ``work`` on node ``name`` (a search, an import, a send) as ``owner.<slot>``, the
    attribute that says it is running. When it fails for want of the node's DICOMweb
    password, ask for it (ask_password_then), keep it, call ``on_retry`` and then ``retry``
    (which runs the task again, passing ``retry=None`` so that it is asked only once);
    any other failure, or a declined password, goes to ``on_error``.

    Why one helper: the race the three dialogs had (commit ce4eebd). The failed task stops
    counting as running before its retry (the retry may start before the failed task's
    "finished" arrives, and must not be refused as still running), and that late
    "finished" cannot clear a retry started since. ``on_idle`` runs at a finish that
    leaves nothing running (hide the progress bar); ``on_finish`` after every finish.
    ``callbacks`` (on_done, on_progress, ...) go to ctx.runner.run as they are."""

    def release() -> None:
        if getattr(owner, slot) is task:
            setattr(owner, slot, None)

    def failed(error: TaskError) -> None:
        release()
        if retry is not None and missing_password(error) and ask_password_then(
                ctx, owner, name, retry):
            if on_retry is not None:
                on_retry()
            return
        on_error(error)

    def finish() -> None:
        release()  # unless a retry started since
        if getattr(owner, slot) is None and on_idle is not None:
            on_idle()
        if on_finish is not None:
            on_finish()

    task = ctx.runner.run(title, work, on_error=failed, on_finish=finish, **callbacks)
    setattr(owner, slot, task)
    return task


def echo_words(result: EchoResult) -> str:
    """One line for the node's "Last test" cell and the message under the table."""
    if result.ok:
        return f"answered in {result.seconds * 1000:.0f} ms"
    return result.message or "no answer"


class NodesBox(QGroupBox):
    """The node table and the form that edits the chosen node."""

    nodesChanged = pyqtSignal(list)  # list[DicomNode], after a load or a change

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__("DICOM nodes (PACS, modalities, viewers)", parent)
        self.ctx = ctx
        self.nodes: list[DicomNode] = []
        self.echoes: dict[str, EchoResult] = {}
        self.busy = 0  # background calls running (tests wait for 0)
        self.loaded = False

        layout = QVBoxLayout(self)
        layout.setSpacing(8)
        layout.addWidget(muted_label(
            "Where studies come from and where results go. Passwords for DICOMweb are kept "
            "in this computer's keyring, never in the settings file."))
        self.table = list_table(NODE_COLUMNS, NODE_COLUMNS.index("Last test"),
                                QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setMinimumHeight(110)
        self.table.setMaximumHeight(210)
        self.table.itemSelectionChanged.connect(self._selected)
        layout.addWidget(self.table)

        form_row = QHBoxLayout()
        form_row.setSpacing(16)
        left = QFormLayout()
        right = QFormLayout()
        self.name = QLineEdit()
        self.name.setPlaceholderText("PACS")
        self.aet = QLineEdit()
        self.aet.setMaxLength(AET_MAX)
        self.aet.setPlaceholderText("ORTHANC")
        self.host = QLineEdit()
        self.host.setPlaceholderText("pacs.hospital.local")
        self.port = QSpinBox()
        self.port.setRange(0, 65535)
        self.port.setSpecialValueText("—")
        self.port.setMaximumWidth(100)
        self.url = QLineEdit()
        self.url.setPlaceholderText("https://pacs.hospital.local/dicom-web (optional)")
        self.user = QLineEdit()
        self.user.setPlaceholderText("DICOMweb user (optional)")
        self.tls = QCheckBox("DICOM TLS")
        self.tls.setToolTip("Encrypt the DICOM network connection (the certificates come "
                            "from the node file or the receiver's TLS settings)")
        left.addRow("Name:", self.name)
        left.addRow("AE title:", self.aet)
        left.addRow("Host:", self.host)
        port_row = QHBoxLayout()
        port_row.addWidget(self.port)
        port_row.addWidget(self.tls)
        port_row.addStretch(1)
        left.addRow("Port:", port_row)
        right.addRow("DICOMweb URL:", self.url)
        right.addRow("User:", self.user)
        form_row.addLayout(left, 1)
        form_row.addLayout(right, 1)
        layout.addLayout(form_row)

        self.message = ResultLabel()
        layout.addWidget(self.message)

        buttons = QHBoxLayout()
        self.new_button = theme.themed(QPushButton("New"), "plus")
        self.new_button.clicked.connect(self.clear_form)
        self.remove_button = theme.themed(QPushButton("Remove"), "clear")
        self.remove_button.clicked.connect(self.remove_selected)
        self.password_button = theme.themed(QPushButton("Password…"), "key")
        self.password_button.setToolTip("Store the DICOMweb password of this node in the "
                                        "keyring")
        self.password_button.clicked.connect(self.ask_password)
        self.echo_button = theme.themed(QPushButton("Echo"), "connect")
        self.echo_button.setToolTip("C-ECHO for a DICOM node, a QIDO-RS query for a "
                                    "DICOMweb-only node")
        self.echo_button.clicked.connect(self.echo_selected)
        self.save_button = primary(QPushButton(theme.icon("save", "#ffffff"), "Save node"))
        self.save_button.clicked.connect(self.save_form)
        buttons.addWidget(self.new_button)
        buttons.addWidget(self.remove_button)
        buttons.addStretch(1)
        buttons.addWidget(self.password_button)
        buttons.addWidget(self.echo_button)
        buttons.addWidget(self.save_button)
        layout.addLayout(buttons)

        for edit in (self.name, self.aet, self.host, self.url, self.user):
            edit.textChanged.connect(self._update)
        self.port.valueChanged.connect(self._update)
        ctx.connectionChanged.connect(self._connection_changed)
        if ctx.backend.client is not None:
            self.reload()
        self._update()

    # --- form <-> node ---------------------------------------------------------------------

    def form_node(self) -> DicomNode:
        """The node as typed; certificate paths of an existing node of that name are kept
        (they are set in the node file or by the CLI, not here)."""
        name = self.name.text().strip()
        old = self.node(name)
        return DicomNode(
            name=name, aet=self.aet.text().strip(), host=self.host.text().strip(),
            port=self.port.value(), dicomweb_url=self.url.text().strip().rstrip("/"),
            username=self.user.text().strip(), tls=self.tls.isChecked(),
            ca_file=old.ca_file if old else "", cert_file=old.cert_file if old else "",
            key_file=old.key_file if old else "")

    def fill_form(self, node: DicomNode | None) -> None:
        node = node or DicomNode(name="")
        self.name.setText(node.name)
        self.aet.setText(node.aet)
        self.host.setText(node.host)
        self.port.setValue(node.port)
        self.url.setText(node.dicomweb_url)
        self.user.setText(node.username)
        self.tls.setChecked(node.tls)
        self._update()

    def clear_form(self) -> None:
        self.table.clearSelection()
        self.fill_form(None)
        self.name.setFocus()

    def node(self, name: str) -> DicomNode | None:
        return next((n for n in self.nodes if n.name == name), None)

    def selected_node(self) -> DicomNode | None:
        rows = {i.row() for i in self.table.selectedIndexes()}
        return self.nodes[min(rows)] if rows and min(rows) < len(self.nodes) else None

    def _selected(self) -> None:
        node = self.selected_node()
        if node is not None:
            if node.name != self.name.text().strip():
                self._say("")  # the last message was about another node
            self.fill_form(node)
        self._update()

    def _update(self, *_: object) -> None:
        saved = self.node(self.name.text().strip())
        connected = self.ctx.backend.client is not None
        self.save_button.setEnabled(connected and bool(self.name.text().strip()))
        self.remove_button.setEnabled(connected and saved is not None)
        self.echo_button.setEnabled(connected and saved is not None)
        self.echo_button.setText("Echo" if saved is None or saved.dimse else "Test")
        self.password_button.setEnabled(connected and saved is not None and saved.web
                                        and bool(saved.username))

    def _fill_table(self) -> None:
        current = self.name.text().strip()
        self.table.blockSignals(True)
        self.table.setRowCount(len(self.nodes))
        for row, node in enumerate(self.nodes):
            echo = self.echoes.get(node.name)
            cells = (node.name, node.aet or "—", node.host or "—",
                     str(node.port) if node.port else "—", node.dicomweb_url or "—",
                     ("OK, " if echo.ok else "Failed: ") + echo_words(echo) if echo
                     else "not tested")
            for column, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                if column == len(cells) - 1 and echo is not None:
                    c = theme.current_colors()
                    item.setForeground(_brush(c.success if echo.ok else c.danger))
                self.table.setItem(row, column, item)
            if node.name == current:
                self.table.selectRow(row)
        self.table.blockSignals(False)
        self._update()

    def _say(self, text: str, ok: bool | None = None) -> None:
        self.message.say(text, ok)

    def message_text(self) -> str:
        """The line under the table as shown, in plain text (tests)."""
        return self.message.plain_text()

    # --- background calls ------------------------------------------------------------------

    def _run(self, title: str, work: Any, done: Any, tracked: bool = True) -> None:
        ctx = self.ctx
        self.busy += 1

        def failed(error: TaskError) -> None:
            self._say(error.message, False)
            ctx.error(error)

        def finish() -> None:
            self.busy -= 1
            self._update()

        ctx.runner.run(title, lambda _task: work(pacs_of(ctx)), on_done=done,
                       on_error=failed, on_finish=finish, tracked=tracked)

    def _connection_changed(self, connected: bool, _where: str = "") -> None:
        if connected:
            self.reload()
        self._update()

    def reload(self) -> None:
        def done(nodes: list[DicomNode]) -> None:
            self.nodes = sorted(nodes, key=lambda n: n.name.lower())
            self.loaded = True
            self._fill_table()
            self.nodesChanged.emit(list(self.nodes))

        self._run("Reading the DICOM nodes", lambda pacs: list(pacs.nodes()), done,
                  tracked=False)  # a small file: not "work running" in the status bar

    def save_form(self) -> None:
        node = self.form_node()
        problem = node_problem(node)
        if problem:
            self._say(problem, False)
            return

        def work(pacs: Any) -> list[DicomNode]:
            pacs.save_node(node)
            return list(pacs.nodes())

        def done(nodes: list[DicomNode]) -> None:
            self.echoes.pop(node.name, None)  # the old answer was for the old address
            self._say(f"Node {node.name} saved.", True)
            self.ctx.activity.record("settings", f"DICOM node {node.name} saved",
                                     _node_words(node))
            self._loaded(nodes)

        self._run(f"Saving DICOM node {node.name}", work, done)

    def remove_selected(self) -> None:
        name = self.name.text().strip()
        if self.node(name) is None:
            return
        if not self.ctx.dialogs.confirm(self, "Remove DICOM node",
                                        f"Remove node {name}? Its keyring password is "
                                        "kept until you remove it there.", "Remove"):
            return

        def work(pacs: Any) -> list[DicomNode]:
            pacs.remove_node(name)
            return list(pacs.nodes())

        def done(nodes: list[DicomNode]) -> None:
            self.echoes.pop(name, None)
            self._say(f"Node {name} removed.", True)
            self.ctx.activity.record("settings", f"DICOM node {name} removed")
            self.fill_form(None)
            self._loaded(nodes)

        self._run(f"Removing DICOM node {name}", work, done)

    def _loaded(self, nodes: list[DicomNode]) -> None:
        self.nodes = sorted(nodes, key=lambda n: n.name.lower())
        self._fill_table()
        self.nodesChanged.emit(list(self.nodes))

    def echo_selected(self) -> None:
        node = self.node(self.name.text().strip())
        if node is None:
            return
        name = node.name
        self._say(f"Testing {name}…")
        self.echo_button.setEnabled(False)

        def done(result: EchoResult) -> None:
            self.echoes[name] = result
            words = echo_words(result)
            self._say(f"{name}: {words}." if result.ok else f"{name} did not answer: {words}",
                      result.ok)
            self.ctx.activity.record("settings" if result.ok else "error",
                                     f"Echo {name}: {'OK' if result.ok else 'failed'}", words)
            self._fill_table()

        self._run(f"Testing DICOM node {name}", lambda pacs: pacs.echo(name), done)

    def ask_password(self) -> None:
        node = self.node(self.name.text().strip())
        if node is None or not node.web:
            return
        password = self.ctx.dialogs.password(
            self, "DICOMweb password",
            f"Password of user {node.username} on {node.dicomweb_url} (kept in this "
            "computer's keyring):")
        if not password:
            return
        name = node.name

        def done(_: object) -> None:
            self._say(f"The password of node {name} is in the keyring.", True)
            self.ctx.activity.record("settings", f"DICOMweb password of {name} stored in "
                                     "the keyring")

        self._run(f"Storing the password of {name}",
                  lambda pacs: pacs.set_web_password(name, password), done)


def _node_words(node: DicomNode) -> str:
    parts = []
    if node.dimse:
        parts.append(f"{node.aet}@{node.host}:{node.port}" + (" (TLS)" if node.tls else ""))
    if node.web:
        parts.append(node.dicomweb_url + (f" as {node.username}" if node.username else ""))
    return "; ".join(parts)


def _brush(colour: str) -> Any:
    from PyQt6.QtGui import QBrush, QColor

    return QBrush(QColor(colour))
