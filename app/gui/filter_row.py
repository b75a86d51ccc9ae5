"""The keyword filter row of "Search by image" (issue 17): "the nearest MR of a knee".

One line of keyword terms, written as the CLI's ``--where`` takes them
(``modality=MR bodypart=KNEE NOT label=excluded``), completed from the keywords present in
the repository. The terms travel as encrypted tokens: the search service ranks only the
rows that match them and never sees a word (docs/KEYWORDS.md section 5).

Also here, because both keyword views need them: the field names and their labels, the
check of a term's shape (so a typing slip shows at once, in the row, instead of as a
failed search), and the one loader of the values present in a repository
(``client.keywords.values``, decrypted on this workstation, in a background task).
The facet itself checks the full grammar (dates, lists) when the query is sent.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PyQt6.QtCore import QModelIndex, QStringListModel, Qt, pyqtSignal
from PyQt6.QtWidgets import (
    QCompleter,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMenu,
    QToolButton,
    QWidget,
)

from app.core.errors import RadcryptError
from app.core.types import Repository
from app.gui import theme
from app.gui.context import AppContext
from app.gui.tasks import Task, TaskContext, TaskError
from app.gui.widgets import set_prop

FIELD_LABELS = (("modality", "Modality"), ("bodypart", "Body part"),
                ("laterality", "Laterality"), ("label", "Label"),
                ("study", "Study description"), ("series", "Series description"),
                ("patient", "Patient ID"), ("accession", "Accession number"))
"""The fields a user chooses values of, in the order a radiologist narrows a search
(docs/KEYWORDS.md section 4); dates are a range of their own."""
FIELDS = (*(name for name, _ in FIELD_LABELS), "date")
MENU_LIMIT = 60
"""At most this many values of one field in a menu (the completer offers every value)."""
FILTER_TIP = ("Only images with these keywords, e.g. modality=MR bodypart=KNEE. Values of "
              "one field separated by commas mean any of them (modality=CT,MR); different "
              "fields must all match; NOT field=value (or field!=value) leaves images out; "
              "date=2024-01..2024-06 is a range. The search service receives encrypted "
              "tokens only, never the words.")
_TERM = re.compile(r"^-?(?P<field>[A-Za-z]+)(?P<op>!=|=)(?P<value>.*)$")


class TermsError(ValueError):
    """Keyword terms this row refuses; the message names the term and what is wrong in a
    few words (shown next to the line), ``hint`` says how to write it (its tooltip)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def split_terms(text: str) -> list[str]:
    """The terms of one line (split like a shell, so "study=knee mri" stays one term),
    each checked for its shape: ``NOT``, or ``[-]field=value`` / ``field!=value`` with a
    known field and a value. [] for an empty line."""
    try:
        terms = shlex.split(text)
    except ValueError as exc:
        raise TermsError(f"keyword filter: {exc}") from None
    for term in terms:
        check_term(term)
    if terms and terms[-1].upper() == "NOT":
        raise TermsError("keyword filter ends with NOT",
                         "write the term it leaves out after it: NOT label=excluded")
    return terms


def check_term(term: str) -> None:
    if term.upper() == "NOT":
        return
    match = _TERM.match(term)
    known = f"fields: {', '.join(FIELDS)}"
    if match is None:
        raise TermsError(f"keyword term {term!r}: write field=value", known)
    field = match.group("field").casefold()
    if field not in FIELDS:
        raise TermsError(f"keyword term {term!r}: unknown field {field!r}", known)
    if not [v for v in match.group("value").split(",") if v.strip()]:
        raise TermsError(f"keyword term {term!r}: no value after {match.group('op')}")


def join_terms(terms: Sequence[str]) -> str:
    """Terms as one line, quoted where a value holds a space (the inverse of split_terms)."""
    return shlex.join(list(terms))


def completions(values: Mapping[str, Sequence[str]]) -> list[str]:
    """``field=value`` for every value present, fields in FIELDS order, then unknown ones
    (a newer facet may know more fields than this page)."""
    order = {name: n for n, name in enumerate(FIELDS)}
    out = []
    for field in sorted(values, key=lambda f: (order.get(f, len(order)), f)):
        out += [f"{field}={v}" for v in values[field] if str(v).strip()]
    return out


def keyword_facet(backend: Any) -> Any:
    """The window's client's keyword facet (``client.keywords``, app/core/keyword_search.py).

    The facet is the facade's own grouping of the keyword use cases, so the pages call it
    as they find it on the Backend's client instead of through one wrapper per method."""
    client = getattr(backend, "client", None)
    if client is None:
        raise RadcryptError("not connected to the storage yet")
    return client.keywords


def load_values(ctx: AppContext, repo: Repository,
                on_done: Callable[[dict[str, list[str]]], None],
                on_error: Callable[[TaskError], None] | None = None) -> Task:
    """The keyword values present in ``repo`` (field -> sorted values), decrypted in a
    light background task; ``on_done`` runs in the UI thread."""
    backend = ctx.backend

    def work(_: TaskContext) -> dict[str, list[str]]:
        values = keyword_facet(backend).values(repo)
        return {str(field): sorted({str(v) for v in found})
                for field, found in dict(values).items()}

    return ctx.runner.run(f"Listing the keywords of {repo.repo_id}", work, light=True,
                          tracked=False, on_done=on_done,
                          on_error=on_error or (lambda error: ctx.error(error)))


class RepositoryValues:
    """The keyword values present in the open repository, listed again only when the
    widget shows after the repository or its images changed (an import, a label):
    listing them decrypts every image's metadata, so not before a user looks.

    A mixin for a QWidget (before QWidget in the bases) with ``ctx``, ``repo`` and
    ``_stale``; the widget defines ``set_values`` and what a different repository clears
    (``_repository_switched``)."""

    ctx: AppContext | None
    repo: Repository | None
    _stale: bool

    def set_values(self, values: Mapping[str, Sequence[str]]) -> None:
        raise NotImplementedError

    def _repository_switched(self) -> None:
        """Another repository than the one shown: forget what belonged to the old one."""

    def _values_failed(self, error: TaskError) -> None:
        if self.ctx is not None:
            self.ctx.error(error)

    def set_repository(self, repo: Repository | None) -> None:
        same = (repo is not None and self.repo is not None
                and repo.repo_id == self.repo.repo_id)
        self.repo = repo
        if not same:
            self._repository_switched()
        self._values_changed()

    def _archive_changed(self, repo_id: str) -> None:
        if self.repo is not None and self.repo.repo_id == repo_id:
            self._values_changed()

    def _values_changed(self) -> None:
        self._stale = True
        if self.isVisible():  # type: ignore[attr-defined]
            self.reload_values()

    def showEvent(self, event: Any) -> None:
        super().showEvent(event)  # type: ignore[misc]
        if self._stale:
            self.reload_values()

    def reload_values(self) -> Task | None:
        repo, ctx = self.repo, self.ctx
        if repo is None or ctx is None:
            return None
        self._stale = False

        def done(values: dict[str, list[str]]) -> None:
            if self.repo is repo:
                self.set_values(values)

        return load_values(ctx, repo, done, on_error=self._values_failed)


class LastWordCompleter(QCompleter):
    """Completes the last word of a line (terms are separated by ``separator``), keeping
    the words before it: Qt's completer would replace the whole line."""

    def __init__(self, edit: QLineEdit, separator: str = " ") -> None:
        super().__init__(edit)
        self.edit = edit
        self.separator = separator
        self.words = QStringListModel(self)
        self.setModel(self.words)
        self.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.setFilterMode(Qt.MatchFlag.MatchContains)
        self.setCompletionMode(QCompleter.CompletionMode.PopupCompletion)
        self.setMaxVisibleItems(12)
        edit.setCompleter(self)
        # QLineEdit connects its completer only while it has focus; a choice made while
        # focus moved (or in an offscreen test) must still land in the line.
        self.activated[str].connect(edit.setText)

    def set_words(self, words: Sequence[str]) -> None:
        self.words.setStringList(list(words))

    def splitPath(self, path: str | None) -> list[str]:
        last = (path or "").split(self.separator)[-1].strip()
        if last.startswith("-"):
            last = last[1:]
        return [last]

    def pathFromIndex(self, index: QModelIndex) -> str:
        chosen = str(index.data(Qt.ItemDataRole.DisplayRole) or "")
        text = self.edit.text()
        head, sep, last = text.rpartition(self.separator)
        if last.strip().startswith("-"):
            chosen = "-" + chosen
        if not sep:
            return chosen
        return head + sep + ("" if self.separator == " " else " ") + chosen


class KeywordFilterRow(RepositoryValues, QWidget):
    """"Only images with: [modality=MR bodypart=KNEE] [Fields ▾] [×]" above the query.

    ``terms()`` is what the search sends as ``where=`` ([] when the line is empty); a line
    this row refuses shows why next to it and ``problem`` holds the sentence. With a
    context, the values present in the repository are loaded when the row is shown after
    the repository or its images changed (an import, a label): listing them decrypts
    every image's metadata, so not before a user looks; without a context (tests),
    ``set_values`` feeds them."""

    changed = pyqtSignal()

    def __init__(self, ctx: AppContext | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.repo: Repository | None = None
        self.values: dict[str, list[str]] = {}
        self.problem = ""
        self._stale = False  # the values shown may be out of date: load them when shown
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(8)
        self.title = QLabel("Only images with:")
        self.title.setToolTip(FILTER_TIP)
        self.edit = QLineEdit()
        self.edit.setPlaceholderText("Keyword filter (optional), e.g. modality=MR "
                                     "bodypart=KNEE")
        self.edit.setToolTip(FILTER_TIP)
        self.edit.setClearButtonEnabled(True)
        self.edit.setAccessibleName("Keyword filter")
        self.edit.textChanged.connect(self._text_changed)
        self.completer = LastWordCompleter(self.edit)
        self.fields_button = QToolButton()
        theme.themed(self.fields_button, "tag")
        self.fields_button.setText("Keywords")
        self.fields_button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.fields_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.fields_button.setToolTip("Add a keyword present in this repository")
        self.menu = QMenu(self.fields_button)
        self.menu.aboutToShow.connect(self._fill_menu)
        self.fields_button.setMenu(self.menu)
        self.error = QLabel("")
        self.error.setObjectName("ErrorText")
        self.error.hide()
        row.addWidget(self.title)
        row.addWidget(self.edit, 1)
        row.addWidget(self.fields_button)
        row.addWidget(self.error)
        if ctx is not None:
            ctx.repositoryChanged.connect(self.set_repository)
            ctx.archiveChanged.connect(self._archive_changed)

    # --- terms -------------------------------------------------------------------------

    def terms(self) -> list[str]:
        """The filter's terms ([] when none or when the line is refused: see ``problem``)."""
        if self.problem:
            return []
        try:
            return split_terms(self.edit.text())
        except TermsError:
            return []

    def set_terms(self, terms: Sequence[str]) -> None:
        self.edit.setText(join_terms(terms))

    def add_term(self, term: str) -> None:
        text = self.edit.text().rstrip()
        self.edit.setText(f"{text} {shlex.quote(term)}".strip())

    @property
    def active(self) -> bool:
        return bool(self.terms())

    def _text_changed(self, text: str) -> None:
        try:
            split_terms(text)
        except TermsError as exc:
            self.problem = str(exc)[:1].upper() + str(exc)[1:]
            self.error.setToolTip(f"{self.problem}; {exc.hint}" if exc.hint else "")
        else:
            self.problem = ""
        self.error.setText(self.problem)
        self.error.setVisible(bool(self.problem))
        set_prop(self.edit, "invalid", bool(self.problem))
        self.changed.emit()

    # --- values present in the repository -----------------------------------------------

    def set_values(self, values: Mapping[str, Sequence[str]]) -> None:
        self.values = {str(f): list(v) for f, v in values.items()}
        self.completer.set_words(completions(self.values))

    def _repository_switched(self) -> None:
        self.edit.clear()
        self.set_values({})

    def _values_failed(self, error: TaskError) -> None:
        """A repository without keyword support yet is still searchable by image: the
        completer stays empty and the failure is not shown as an error here."""

    def _fill_menu(self) -> None:
        self.menu.clear()
        labels = dict(FIELD_LABELS)
        if not any(self.values.values()):
            empty = self.menu.addAction("No keywords listed for this repository")
            if empty is not None:
                empty.setEnabled(False)
            return
        for field, present in self.values.items():
            if not present or field == "date":
                continue
            sub = self.menu.addMenu(labels.get(field, field))
            if sub is None:
                continue
            for value in present[:MENU_LIMIT]:
                action = sub.addAction(value)
                if action is not None:
                    action.triggered.connect(
                        lambda _=False, t=f"{field}={value}": self.add_term(t))
            if len(present) > MENU_LIMIT:
                more = sub.addAction(f"… {len(present) - MENU_LIMIT} more: type to complete")
                if more is not None:
                    more.setEnabled(False)
