"""Search by keyword (Ctrl+F, issue 17): "every CT of the chest", "this accession number".

The page offers one row per keyword field (modality, body part, laterality, label, study
and series description words, patient ID, accession number) whose values are those
present in the repository (``client.keywords.values``: decrypted here, from the images'
metadata), plus a study date range. Several values of one field mean any of them (OR),
"is not" leaves them out (NOT), and every field filled in must match (AND): the same
grammar as ``radcrypt find`` (docs/KEYWORDS.md section 4), whose command line the page
shows so a search can be repeated from a terminal.

The query leaves this workstation as encrypted tokens only; the service answers with
image references, and the images' metadata is decrypted and grouped into studies here
(``client.keywords.find``). Results show as the Archive's study list (its models), the
chosen study's matching images as previews below. Labels: a word added to (or removed
from) the selected images, or to every image of the selected study
(``label_add``/``label_remove``), searchable at once as ``label=word``.

Everything slow (values, the search, previews, labels) runs in background tasks
(app/gui/tasks.py); the UI thread only fills widgets.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PyQt6.QtCore import QDate, QModelIndex, Qt, pyqtSignal
from PyQt6.QtGui import QAction, QImage
from PyQt6.QtWidgets import (
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListView,
    QMenu,
    QPushButton,
    QSplitter,
    QStackedWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.core.errors import RadcryptError
from app.core.meta import ImageMeta
from app.core.studies import LONE_PREFIX, Study
from app.core.types import Repository
from app.gui import theme
from app.gui.archive_page import (
    DATE_COLUMN,
    STUDY_COLUMNS,
    StudyFilter,
    StudyModel,
    ThumbModel,
    series_caption,
)
from app.gui.context import AppContext
from app.gui.filter_row import (
    FIELD_LABELS,
    LastWordCompleter,
    RepositoryValues,
    TermsError,
    join_terms,
    keyword_facet,
)
from app.gui.search_page import IncompleteBanner
from app.gui.study_views import date_range, fetch_tiles, study_table, tile_view
from app.gui.tasks import Task, TaskContext, TaskError
from app.gui.widgets import (
    ElidedLabel,
    PageHeader,
    card,
    muted_label,
    primary,
    set_prop,
)

IS, IS_NOT = "is", "is not"
TILE = 112
TILE_LIMIT = 240
"""Previews decrypted for one result view at most (the rest show a placeholder)."""


# --- the query, Qt-free rules ----------------------------------------------------------------


@dataclass(frozen=True)
class FieldChoice:
    """The values chosen for one field: any of them (or, negated, none of them)."""

    field: str
    values: tuple[str, ...]
    negated: bool = False


def parse_values(text: str) -> tuple[str, ...]:
    """A field's comma-separated values, trimmed, empty ones and repeats dropped."""
    out: list[str] = []
    for value in text.split(","):
        value = value.strip()
        if value and value not in out:
            out.append(value)
    return tuple(out)


def build_terms(choices: Sequence[FieldChoice], date_from: str = "", date_to: str = "",
                ) -> list[str]:
    """The page's query as ``radcrypt find`` terms: one ``field=v1,v2`` (or ``field!=…``)
    per filled-in field, then ``date=FROM..TO`` (ISO days) when a range is given."""
    terms = []
    for choice in choices:
        if not choice.values:
            continue
        bad = next((v for v in choice.values if "," in v), "")
        if bad:
            raise TermsError(f"{choice.field} value {bad!r}: a value cannot hold a comma "
                             "(commas separate values)")
        op = "!=" if choice.negated else "="
        terms.append(f"{choice.field}{op}{','.join(choice.values)}")
    if bool(date_from) != bool(date_to):
        raise TermsError("study date range: give both the first and the last day")
    if date_from:
        if date_to < date_from:
            raise TermsError(f"study date range {date_from}..{date_to} ends before it starts")
        terms.append(f"date={date_from}..{date_to}")
    return terms


def command_line(repo_id: str, terms: Sequence[str]) -> str:
    """The same search as a command (shown under the form, selectable)."""
    return join_terms(["radcrypt", "find", "--repo", repo_id, *terms])


def date_bounds(values: Sequence[str]) -> tuple[str, str]:
    """The first and last study day among the date keywords present ("" when none)."""
    days = sorted(v for v in values if len(v) == 10 and v[4] == "-" and v[7] == "-")
    return (days[0], days[-1]) if days else ("", "")


def incomplete_words(result: Any) -> str:
    """Why a keyword answer may miss images ("" for a complete one)."""
    if getattr(result, "complete", None) is not False:
        return ""
    missing = list(getattr(result, "segments_missing", []) or [])
    first = ", ".join(missing[:3]) + (", …" if len(missing) > 3 else "")
    return (f"The search service left out part of this repository ({len(missing):,} missing "
            f"segment{'s' if len(missing) != 1 else ''}: {first}), so images with these "
            "keywords may be missing below. The segments may be missing from the storage "
            "or withheld by the service; search again later or ask the repository's owner "
            "to check the storage.")


def result_words(images: int, studies: int) -> str:
    if not images:
        return "No image matches"
    return (f"{images} image{'s' if images != 1 else ''} in {studies} "
            f"stud{'y' if studies == 1 else 'ies'}")


# --- one field ---------------------------------------------------------------------------------


class FieldChooser(QWidget):
    """"Modality [is ▾] [CT, MR] [▾]": typed values complete from those present; the menu
    ticks and unticks them."""

    changed = pyqtSignal()

    def __init__(self, field: str, label: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.field = field
        self.present: list[str] = []
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(6)
        self.label = QLabel(label)
        self.mode = QComboBox()
        self.mode.addItems((IS, IS_NOT))
        self.mode.setToolTip(f"\"{IS}\": images with any of the values; \"{IS_NOT}\": "
                             "images with none of them")
        self.mode.currentTextChanged.connect(lambda _: self.changed.emit())
        self.edit = QLineEdit()
        self.edit.setPlaceholderText("any")
        self.edit.setClearButtonEnabled(True)
        self.edit.setAccessibleName(label)
        self.edit.setToolTip(f"{label}: one value, or several separated by commas (any of "
                             "them); completes from the values in this repository")
        self.edit.textChanged.connect(lambda _: self.changed.emit())
        self.completer = LastWordCompleter(self.edit, separator=",")
        self.menu_button = QToolButton()
        self.menu_button.setArrowType(Qt.ArrowType.DownArrow)
        self.menu_button.setStyleSheet("QToolButton::menu-indicator { image: none; }")
        self.menu_button.setAutoRaise(True)
        self.menu_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.menu_button.setToolTip(f"The {label.lower()} values present in this repository")
        self.menu = QMenu(self.menu_button)
        self.menu.aboutToShow.connect(self.fill_menu)
        self.menu_button.setMenu(self.menu)
        self.label.setBuddy(self.edit)
        row.addWidget(self.label)
        row.addWidget(self.mode)
        row.addWidget(self.edit, 1)
        row.addWidget(self.menu_button)

    def set_present(self, values: Sequence[str]) -> None:
        self.present = list(values)
        self.completer.set_words(self.present)
        self.menu_button.setEnabled(bool(self.present))
        self.edit.setPlaceholderText("any" if self.present else "none in this repository")

    def choice(self) -> FieldChoice:
        return FieldChoice(self.field, parse_values(self.edit.text()),
                           self.mode.currentText() == IS_NOT)

    def set_choice(self, values: Sequence[str], negated: bool = False) -> None:
        self.mode.setCurrentText(IS_NOT if negated else IS)
        self.edit.setText(", ".join(values))

    def toggle(self, value: str, on: bool) -> None:
        chosen = list(parse_values(self.edit.text()))
        if on and value not in chosen:
            chosen.append(value)
        elif not on and value in chosen:
            chosen.remove(value)
        self.edit.setText(", ".join(chosen))

    def clear(self) -> None:
        self.mode.setCurrentText(IS)
        self.edit.clear()

    def fill_menu(self) -> None:
        self.menu.clear()
        chosen = set(parse_values(self.edit.text()))
        for value in self.present[:80]:
            action = QAction(value, self.menu)
            action.setCheckable(True)
            action.setChecked(value in chosen)
            action.toggled.connect(lambda on, v=value: self.toggle(v, on))
            self.menu.addAction(action)
        if len(self.present) > 80:
            more = self.menu.addAction(f"… {len(self.present) - 80} more: type to complete")
            if more is not None:
                more.setEnabled(False)


# --- the page ------------------------------------------------------------------------------------


class KeywordPage(RepositoryValues, QWidget):
    findSimilarRequested = pyqtSignal(object)  # ImageMeta: "Find similar" on a result
    imageSearchRequested = pyqtSignal(list)  # the terms, for "Search by image"'s filter row

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.repo: Repository | None = None
        self.values: dict[str, list[str]] = {}
        self.result: Any = None  # the facet's KeywordResult
        self.searched_terms: list[str] = []
        self.search_ms = 0.0
        self.task: Task | None = None
        self.label_task: Task | None = None
        self.current_study: Study | None = None
        self._tiles_task: Task | None = None
        self._generation = 0
        self._stale = False  # the values listed may be out of date: list them when shown

        layout = QVBoxLayout(self)
        layout.setContentsMargins(20, 16, 20, 16)
        layout.setSpacing(10)
        layout.addWidget(PageHeader(
            "Search by keyword", "Keywords become encrypted tokens on this workstation; the "
            "cloud finds the matching images without learning any word."))
        layout.addWidget(self._build_form())
        layout.addWidget(self._build_results(), 1)

        ctx.repositoryChanged.connect(self.set_repository)
        ctx.archiveChanged.connect(self._archive_changed)
        self._clear_results()
        self._update()

    # --- building ---------------------------------------------------------------------------

    def _build_form(self) -> QWidget:
        form = card()
        box = QVBoxLayout(form)
        box.setContentsMargins(14, 12, 14, 12)
        box.setSpacing(8)
        grid = QGridLayout()
        grid.setHorizontalSpacing(24)
        grid.setVerticalSpacing(6)
        self.fields: dict[str, FieldChooser] = {}
        for n, (field, label) in enumerate(FIELD_LABELS):
            chooser = FieldChooser(field, label)
            chooser.changed.connect(self._form_changed)
            chooser.edit.returnPressed.connect(self.search)
            self.fields[field] = chooser
            grid.addWidget(chooser, n // 2, n % 2)
        grid.setColumnStretch(0, 1)
        grid.setColumnStretch(1, 1)
        width = max(c.label.sizeHint().width() for c in self.fields.values())
        for chooser in self.fields.values():  # the value boxes line up in both columns
            chooser.label.setFixedWidth(width + 8)
        box.addLayout(grid)

        row = QHBoxLayout()
        row.setSpacing(8)
        self.date_check, self.date_from, self.date_to = date_range(
            "Only studies dated within this range (both days included); undated images "
            "are left out while it is on", self._form_changed)
        self.clear_button = QPushButton("Clear")
        self.clear_button.setToolTip("Empty every field")
        self.clear_button.clicked.connect(self.clear_form)
        self.search_button = primary(QPushButton(theme.icon("search", "#ffffff"), "Find"))
        self.search_button.setToolTip("Find the images with these keywords (Enter)")
        self.search_button.clicked.connect(self.search)
        row.addWidget(self.date_check)
        row.addWidget(self.date_from)
        row.addWidget(QLabel("to"))
        row.addWidget(self.date_to)
        row.addSpacing(16)
        # Elided to the room it gets (a long query must not widen the window); the whole
        # command in its tooltip.
        self.command = ElidedLabel("")
        self.command.setObjectName("Muted")
        self.command.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.command.setProperty("mono", True)
        row.addWidget(self.command, 1)
        row.addWidget(self.clear_button)
        row.addWidget(self.search_button)
        box.addLayout(row)
        self.problem = QLabel("")
        self.problem.setObjectName("ErrorText")
        self.problem.setWordWrap(True)
        self.problem.hide()
        box.addWidget(self.problem)
        return form

    def _build_results(self) -> QWidget:
        section = QWidget()
        box = QVBoxLayout(section)
        box.setContentsMargins(0, 0, 0, 0)
        box.setSpacing(6)
        bar = QHBoxLayout()
        bar.setSpacing(8)
        self.summary = QLabel("Results")
        self.summary.setObjectName("CardTitle")
        self.timing = muted_label("", wrap=False)
        self.label_button = theme.themed(QPushButton("Labels"), "tag")
        self.label_menu = QMenu(self.label_button)
        self.add_label_action = self.label_menu.addAction("Add a label…")
        self.remove_label_action = self.label_menu.addAction("Remove a label…")
        assert self.add_label_action is not None and self.remove_label_action is not None
        self.add_label_action.triggered.connect(lambda: self.add_label())
        self.remove_label_action.triggered.connect(lambda: self.remove_label())
        self.label_menu.aboutToShow.connect(self._update)
        self.label_button.setMenu(self.label_menu)
        self.similar_button = theme.themed(QPushButton("Find similar"), "search")
        self.similar_button.setToolTip("Search by image with the selected image's own "
                                       "encrypted features")
        self.similar_button.clicked.connect(self.find_similar_selected)
        self.by_image_button = QPushButton("Use as image-search filter")
        self.by_image_button.setToolTip("Search by image among the images with these "
                                        "keywords only (\"the nearest MR of a knee\")")
        self.by_image_button.clicked.connect(
            lambda: self.imageSearchRequested.emit(list(self.searched_terms)))
        bar.addWidget(self.summary)
        bar.addWidget(self.timing)
        bar.addStretch(1)
        bar.addWidget(self.label_button)
        bar.addWidget(self.similar_button)
        bar.addWidget(self.by_image_button)
        box.addLayout(bar)
        self.banner = IncompleteBanner()
        box.addWidget(self.banner)

        self.stack = QStackedWidget()
        self.message = muted_label("")
        self.message.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.stack.addWidget(self.message)

        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.setChildrenCollapsible(False)
        self.study_model = StudyModel(self)
        self.study_sorter = StudyFilter(self)  # sorting only: the query did the filtering
        self.study_sorter.setSourceModel(self.study_model)
        self.table = study_table(
            self.study_sorter, sort_column=DATE_COLUMN,
            stretch_column=STUDY_COLUMNS.index("Description"), min_height=110,
            tooltip="Click a study for its matching images; double-click to open its "
            "largest series")
        selection = self.table.selectionModel()
        assert selection is not None
        selection.currentRowChanged.connect(lambda *_: self._study_chosen())
        self.table.doubleClicked.connect(lambda *_: self.open_study(self.current_study))
        self.splitter.addWidget(self.table)

        images = QWidget()
        images_box = QVBoxLayout(images)
        images_box.setContentsMargins(0, 0, 0, 0)
        images_box.setSpacing(4)
        self.images_label = QLabel("Matching images")
        self.images_label.setObjectName("CardTitle")
        images_box.addWidget(self.images_label)
        self.thumbs = ThumbModel(self)
        self.thumbs.set_dpr(max(1.0, self.devicePixelRatioF()))
        self.view = tile_view(self.thumbs, TILE, QListView.SelectionMode.ExtendedSelection)
        self.view.setToolTip("Select images (Ctrl or Shift for several) to label them; "
                             "double-click to open one")
        self.view.doubleClicked.connect(self._open_image)
        view_selection = self.view.selectionModel()
        assert view_selection is not None
        view_selection.selectionChanged.connect(lambda *_: self._update())
        images_box.addWidget(self.view, 1)
        self.splitter.addWidget(images)
        self.splitter.setStretchFactor(0, 2)
        self.splitter.setStretchFactor(1, 3)
        self.stack.addWidget(self.splitter)
        box.addWidget(self.stack, 1)
        return section

    # --- repository and its values ------------------------------------------------------------

    def set_repository(self, repo: Repository | None) -> None:
        super().set_repository(repo)
        self._update()

    def _repository_switched(self) -> None:
        self.clear_form()
        self.set_values({})
        self._clear_results()

    def set_values(self, values: Mapping[str, Sequence[str]]) -> None:
        """The values present in the repository: each field's completer and menu, and the
        date range's first and last day."""
        self.values = {str(f): list(v) for f, v in values.items()}
        for field, chooser in self.fields.items():
            chooser.set_present(self.values.get(field, []))
        first, last = date_bounds(self.values.get("date", []))
        if first and not self.date_check.isChecked():
            self.date_from.setDate(QDate.fromString(first, "yyyy-MM-dd"))
            self.date_to.setDate(QDate.fromString(last, "yyyy-MM-dd"))

    # --- the query -------------------------------------------------------------------------------

    def choices(self) -> list[FieldChoice]:
        return [chooser.choice() for chooser in self.fields.values()]

    def terms(self) -> list[str]:
        """The form as ``radcrypt find`` terms; TermsError names what is wrong."""
        dates = ("", "")
        if self.date_check.isChecked():
            dates = (self.date_from.date().toString("yyyy-MM-dd"),
                     self.date_to.date().toString("yyyy-MM-dd"))
        return build_terms(self.choices(), *dates)

    def set_terms(self, choices: Mapping[str, Sequence[str]],
                  negated: Sequence[str] = ()) -> None:
        """Fill the form (tests, and a search repeated from elsewhere)."""
        for field, chooser in self.fields.items():
            chooser.set_choice(choices.get(field, ()), field in negated)

    def clear_form(self) -> None:
        for chooser in self.fields.values():
            chooser.clear()
        self.date_check.setChecked(False)
        self._form_changed()

    def focus_first(self) -> None:
        self.fields[FIELD_LABELS[0][0]].edit.setFocus()

    def _form_changed(self, *_: object) -> None:
        problem = ""
        try:
            terms = self.terms()
        except TermsError as exc:
            terms, problem = [], str(exc)[:1].upper() + str(exc)[1:]
        self.problem.setText(problem)
        self.problem.setVisible(bool(problem))
        for chooser in self.fields.values():
            set_prop(chooser.edit, "invalid", bool(problem) and any(
                "," in v for v in chooser.choice().values))
        repo_id = self.repo.repo_id if self.repo else "R"
        line = command_line(repo_id, terms) if terms else ""
        self.command.setText(line)
        self.command.setToolTip(f"The same search from a terminal:\n{line}" if line else "")
        self._update()

    def search(self) -> Task | None:
        """Run the form's query in the background; the results replace the last ones."""
        repo = self.repo
        if repo is None:
            self.ctx.info("Open a repository first: the search runs in the repository "
                          "chosen at the top.", "warning")
            return None
        if self.task is not None:
            return None
        try:
            terms = self.terms()
        except TermsError as exc:
            self.ctx.info(str(exc)[:1].upper() + str(exc)[1:] + ".", "warning")
            return None
        if not terms:
            self.ctx.info("Choose at least one keyword value or a study date range.",
                          "warning")
            return None
        self._show_message("Searching the encrypted keyword index…")
        return self._run(repo, terms)

    def _run(self, repo: Repository, terms: list[str]) -> Task:
        backend = self.ctx.backend
        started = time.perf_counter()

        def work(task: TaskContext) -> Any:
            return find(backend, repo, terms, task)

        def done(result: Any) -> None:
            self.search_ms = (time.perf_counter() - started) * 1000
            if self.repo is repo:
                self.show_result(terms, result)

        self.task = self.ctx.runner.run(
            f"Searching {repo.repo_id} by keyword", work, on_done=done,
            on_error=self._failed, on_finish=self._finished)
        self._update()
        return self.task

    def _failed(self, error: TaskError) -> None:
        self._show_message(error.message)
        self.ctx.error(error)

    def _finished(self) -> None:
        self.task = None
        self._update()

    # --- results ---------------------------------------------------------------------------

    def show_result(self, terms: list[str], result: Any) -> None:
        self.result = result
        self.searched_terms = list(terms)
        studies = list(result.studies)
        images = list(result.images)
        keep = self.current_study.key if self.current_study is not None else ""
        self.study_model.set_studies(studies)
        self.summary.setText(result_words(len(images), len(studies)))
        self.show_completeness(result)
        self.timing.setText(f"in {self.search_ms:.0f} ms" if images else "")
        repo_id = self.repo.repo_id if self.repo else ""
        self.ctx.activity.record("search", f"Searched {repo_id} by keyword "
                                 f"({join_terms(terms)}): "
                                 f"{result_words(len(images), len(studies)).lower()}",
                                 repository=repo_id)
        if not images:
            self.current_study = None
            self._show_message("No image of this repository has these keywords.")
            self._update()
            return
        self.stack.setCurrentWidget(self.splitter)
        self.choose_study(keep if any(s.key == keep for s in studies) else None)

    def show_completeness(self, result: Any) -> None:
        """The red banner when the service left segments out (the answer may miss
        images); the summary says so when it matched more than it may answer at once."""
        warning = incomplete_words(result)
        if warning:
            self.banner.title.setText("Incomplete answer")
            self.banner.text.setText(warning)
            self.banner.setToolTip("\n".join(getattr(result, "segments_missing", [])))
            self.banner.show()
        else:
            self.banner.hide()
        matched = int(getattr(result, "matched", 0) or 0)
        if getattr(result, "truncated", False) and matched > len(result.images):
            self.summary.setText(f"The first {len(result.images)} of {matched} matching "
                                 "images")

    def visible_studies(self) -> list[Study]:
        return self.study_sorter.visible_studies()

    def choose_study(self, key: str | None) -> None:
        """Select a study of the results (None: no study, every matching image below)."""
        if key is None:
            self.table.clearSelection()
            self.table.setCurrentIndex(QModelIndex())
            self._set_study(None)
            return
        for row, study in enumerate(self.visible_studies()):
            if study.key == key:
                self.table.selectRow(row)
                self._set_study(study)
                return

    def _study_chosen(self) -> None:
        index = self.table.currentIndex()
        study = index.data(Qt.ItemDataRole.UserRole) if index.isValid() else None
        self._set_study(study if isinstance(study, Study) else None)

    def _set_study(self, study: Study | None) -> None:
        self.current_study = study
        if study is not None:
            shown = list(study.images)
            n = len(shown)
            self.images_label.setText(f"{n} matching image{'s' if n != 1 else ''} of "
                                      "the selected study")
        else:
            shown = list(self.result.images) if self.result is not None else []
            self.images_label.setText("Matching images (every study)")
        self.thumbs.set_entries(shown)
        self._load_tiles(shown)
        self._update()

    def shown_images(self) -> list[ImageMeta]:
        return list(self.thumbs.entries)

    def selected_images(self) -> list[ImageMeta]:
        selection = self.view.selectionModel()
        if selection is None:
            return []
        rows = sorted(index.row() for index in selection.selectedIndexes())
        return [self.thumbs.entries[r] for r in rows if r < len(self.thumbs.entries)]

    def select_images(self, image_ids: Sequence[str]) -> None:
        """Select these of the shown images (tests; a user clicks)."""
        selection = self.view.selectionModel()
        if selection is None:
            return
        selection.clearSelection()
        wanted = set(image_ids)
        for row, entry in enumerate(self.thumbs.entries):
            if entry.image_id in wanted:
                selection.select(self.thumbs.index(row),
                                 selection.SelectionFlag.Select)
        self._update()

    def _clear_results(self) -> None:
        self._generation += 1
        if self._tiles_task is not None:
            self._tiles_task.cancel()
        self.result = None
        self.searched_terms = []
        self.current_study = None
        self.study_model.set_studies([])
        self.thumbs.set_entries([])
        self.thumbs.clear_tiles()
        self.summary.setText("Results")
        self.timing.setText("")
        self.banner.hide()
        self._show_message("Choose keyword values above, then Find (Enter)."
                           if self.repo is not None else
                           "Open a repository at the top to search it by keyword.")

    def _show_message(self, text: str) -> None:
        self.message.setText(text)
        self.stack.setCurrentWidget(self.message)

    # --- previews ---------------------------------------------------------------------------

    def _load_tiles(self, entries: list[ImageMeta]) -> None:
        if self._tiles_task is not None:
            self._tiles_task.cancel()
            self._tiles_task = None
        wanted = [e for e in entries[:TILE_LIMIT]
                  if e.image_id not in self.thumbs.tiles and not e.error]
        generation = self._generation

        def arrived(item: tuple[str, QImage]) -> None:
            if generation == self._generation:
                self.thumbs.set_tile(*item)

        self._tiles_task = fetch_tiles(
            self.ctx, self.repo, wanted, round(TILE * max(1.0, self.devicePixelRatioF())),
            thread_prefix="radcrypt-kw-thumbs", arrived=arrived, failed=self.ctx.error)

    # --- labels ---------------------------------------------------------------------------

    def label_targets(self) -> tuple[list[ImageMeta], Study | None, str]:
        """What a label goes on: the selected images, else every image of the selected
        study; with the words for the question."""
        images = self.selected_images()
        if images:
            n = len(images)
            return images, None, (f"the {n} selected images" if n > 1
                                  else f"the selected image ({images[0].name})")
        study = self.current_study
        if study is not None:
            return [], study, (f"every image of the study {study.description or ''}"
                               .rstrip() + f" ({study.image_count} matching here)")
        return [], None, ""

    def add_label(self, word: str | None = None) -> Task | None:
        return self._label("add", word)

    def remove_label(self, word: str | None = None) -> Task | None:
        return self._label("remove", word)

    def _label(self, how: str, word: str | None) -> Task | None:
        repo = self.repo
        images, study, words = self.label_targets()
        if repo is None or not words or self.label_task is not None:
            return None
        present = self.values.get("label", [])
        if word is None:
            title = "Add a label" if how == "add" else "Remove a label"
            word = self.ctx.dialogs.choose(
                self, title, f"Label {'for' if how == 'add' else 'to remove from'} "
                f"{words}:", list(present))
        word = (word or "").strip()
        if not word:
            return None
        backend = self.ctx.backend

        def work(_: TaskContext) -> int:
            ids = [m.image_id for m in images] or study_image_ids(backend, repo, study)
            facet = keyword_facet(backend)
            if how == "add":
                facet.label_add(repo, ids, word)
            else:
                facet.label_remove(repo, ids, word)
            return len(ids)

        def done(count: int) -> None:
            what = f"{count} image{'s' if count != 1 else ''}"
            text = (f"Label “{word}” added to {what}." if how == "add" else
                    f"Label “{word}” removed from {what}.")
            self.ctx.activity.record("repository", text, repository=repo.repo_id)
            self.ctx.info(text, "success")
            # The repository's keywords changed: this page's and the image search's
            # filter row list the values again.
            self.ctx.archiveChanged.emit(repo.repo_id)
            if self.searched_terms and self.repo is repo:  # the results may change
                self._rerun(self.searched_terms)

        def finish() -> None:
            self.label_task = None
            self._update()

        self.label_task = self.ctx.runner.run(
            f"{'Adding' if how == 'add' else 'Removing'} label {word}", work,
            on_done=done, on_error=self.ctx.error, on_finish=finish)
        self._update()
        return self.label_task

    def _rerun(self, terms: list[str]) -> None:
        """The last search again (after a label change), the results staying in view."""
        repo = self.repo
        if repo is not None and self.task is None:
            self._run(repo, terms)

    # --- opening ---------------------------------------------------------------------------

    def find_similar_selected(self) -> None:
        images = self.selected_images()
        if len(images) == 1:
            self.findSimilarRequested.emit(images[0])

    def _open_image(self, index: QModelIndex) -> None:
        entry = index.data(Qt.ItemDataRole.UserRole)
        if not isinstance(entry, ImageMeta) or self.repo is None:
            return
        from app.gui.viewer import open_archived

        viewer = open_archived(self.ctx, self, self.repo, entry.image_id, entry.name,
                               entry.key_version or None, meta=entry)
        viewer.findSimilarRequested.connect(self.findSimilarRequested)

    def open_study(self, study: Study | None) -> Any:
        """The study's largest series of matching images as a stack."""
        if study is None or not study.series or self.repo is None:
            return None
        from app.gui.viewer import open_stack
        from app.gui.viewer_model import LazyStack

        series = max(study.series, key=lambda s: len(s.images))
        viewer = open_stack(self.ctx, self, self.repo, LazyStack.of_metas(series.images),
                            series_caption(series).replace("\n", " · "), None,
                            metas=series.images)
        viewer.findSimilarRequested.connect(self.findSimilarRequested)
        return viewer

    # --- state ---------------------------------------------------------------------------

    def _update(self) -> None:
        busy = self.task is not None
        has_repo = self.repo is not None
        self.search_button.setEnabled(has_repo and not busy)
        self.search_button.setText("Finding…" if busy else "Find")
        self.clear_button.setEnabled(has_repo)
        for chooser in self.fields.values():
            chooser.setEnabled(has_repo)
        for widget in (self.date_check, self.date_from, self.date_to):
            widget.setEnabled(has_repo)
        _images, _study, words = self.label_targets()
        can_label = bool(words) and self.label_task is None
        self.label_button.setEnabled(can_label)
        self.label_button.setToolTip(f"Add or remove a label on {words}" if words else
                                     "Select images or a study of the results to label "
                                     "them")
        self.similar_button.setEnabled(len(self.selected_images()) == 1)
        self.by_image_button.setEnabled(bool(self.searched_terms))


def find(backend: Any, repo: Repository, terms: list[str], task: TaskContext) -> Any:
    """The facet's search (in a worker), an incomplete answer marked rather than refused;
    a query the facet's parser refuses (app.core.keywords.QueryError, a ValueError this
    page cannot import) comes back as a plain RadcryptError, shown as its own sentence."""
    try:
        return keyword_facet(backend).find(repo, terms, progress=task.progress,
                                           allow_incomplete=True)
    except ValueError as exc:
        if type(exc).__name__ != "QueryError":
            raise
        raise RadcryptError(str(exc)) from exc


def study_image_ids(backend: Any, repo: Repository, study: Study | None) -> list[str]:
    """Every image of ``study`` in the repository (not only the matching ones), from the
    client's study listing (cached); the matching ones when it is not listed. Runs in a
    worker."""
    if study is None:
        return []
    client = getattr(backend, "client", None)
    if client is not None and not study.key.startswith(LONE_PREFIX):
        for listed in client.studies(repo):
            if listed.key == study.key:
                return [m.image_id for m in listed.images]
    return [m.image_id for m in study.images]
