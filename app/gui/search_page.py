"""Search by image: the query and its nearest archived neighbour side by side.

The query's features and its encrypted token are made on this workstation; the search
service ranks encrypted vectors and answers with image ids only; the hits' metadata and
previews are fetched and decrypted here, and the distance shown is recomputed here
from the decrypted features (app/core/searcher.py).

Results come grouped by series (issue 15): neighbouring slices of one series look alike,
so the strip shows each series once, by its best slice, with "3 more from this series"
to expand; "Group by series" off shows the plain top-k. The query is a local file or an
archived image ("Find similar" on the Archive page: its stored features, no file needed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PyQt6.QtCore import QSize, Qt
from PyQt6.QtGui import QIcon, QImage, QPixmap
from PyQt6.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QListWidgetItem,
    QMenu,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.core.meta import ImageMeta
from app.core.similarity import similarity_tooltip, similarity_word
from app.core.studies import LONE_PREFIX, instance_label, series_key
from app.core.types import Hit, QueryResult, Repository
from app.gui import theme
from app.gui.archive_page import square_tile
from app.gui.backend import SearchOutcome
from app.gui.context import AppContext
from app.gui.filter_row import KeywordFilterRow
from app.gui.tasks import Task, TaskContext, TaskError
from app.gui.widgets import (
    SUBTITLE_ROLE,
    DropArea,
    ElidedLabel,
    ImagePanel,
    PageHeader,
    card,
    muted_label,
    primary,
    qimage_from_array,
    qimage_from_png,
    tile_strip,
)

STRIP_TILE = 88
CLINICAL_FIELDS = (("modality", "Modality"), ("body_part", "Body part"),
                   ("study_date", "Study date"), ("study", "Study"), ("series", "Series"),
                   ("instance", "Instance"), ("name", "Image"), ("rank", "Rank"))
"""The card's first rows: the clinical attributes the stored metadata has (DICOM tags;
"—" where an image has none, e.g. a PNG), then which image and rank."""
DETAIL_FIELDS = (("distance", "Distance"), ("verified", "Ranking"), ("version", "Key version"),
                 ("searched", "Searched"), ("format", "Format"), ("id", "Image id"))
"""Behind the "Details" toggle: the raw distance and the cryptographic bookkeeping."""
BANNER_RED = "#b3261e"  # white text on it: 6.6:1 (WCAG AA), in the light and dark themes


def format_ms(ms: float) -> str:
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def _dicom_date(value: str) -> str:
    """A DICOM date YYYYMMDD as ISO 8601 YYYY-MM-DD; anything else as it is."""
    value = value.strip()
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def clinical_values(meta: ImageMeta) -> dict[str, str]:
    """The card's clinical rows from an image's decrypted tags ("" where a tag is absent).

    Today's importer stores Modality, BodyPartExamined and the study and series
    descriptions; StudyDate, SeriesNumber and SeriesDescription are read when present so
    the card fills in once the metadata carries them (issue 15's data model).
    """
    def tag(keyword: str) -> str:  # the clinical attributes first, then the older tags
        return meta.attribute(keyword).strip()

    series = tag("SeriesDescription")
    number = tag("SeriesNumber")
    if number:
        series = f"#{number} {series}".strip()
    return {"modality": tag("Modality"),
            "body_part": tag("BodyPartExamined").title(),
            "study_date": _dicom_date(tag("StudyDate")),
            "study": tag("StudyDescription"),
            "series": series,
            "instance": instance_label(meta)}


@dataclass(frozen=True)
class StripRow:
    """One tile of the nearest-images strip: a hit, the series group it belongs to (None
    when ungrouped), and whether it is one of the "more from this series" shown expanded."""

    hit: Hit
    group: Any = None  # app/core/searcher.py HitGroup
    member: bool = False


def strip_rows(result: QueryResult, grouped: bool, expanded: set[str]) -> list[StripRow]:
    """The strip's tiles: each series once (its best hit), the others of the series in
    ``expanded`` (series keys) right after it; or the ungrouped top-k."""
    groups = getattr(result, "groups", None) or []
    if not grouped or not groups:
        return [StripRow(h) for h in result.hits]
    rows = []
    for group in groups:
        rows.append(StripRow(group.best, group))
        if group.series_key in expanded:
            rows += [StripRow(h, group, True) for h in group.others]
    return rows


def more_text(count: int) -> str:
    return f"{count} more from this series"


def hit_caption(hit: Hit) -> str:
    """"CT_small.dcm · instance 12, frame 3/10": the result names instance and frame."""
    label = instance_label(ImageMeta.from_record(hit.image_id, hit.meta, hit.key_version))
    return f"{hit.name} · {label}" if label else hit.name


class IncompleteBanner(QFrame):
    """The red banner above the results of an incomplete answer (docs/FORMAT-2.md
    6.3): the service left segments of the repository out, so the nearest images shown
    may not be the nearest ones. Hidden otherwise; it cannot be dismissed while the
    answer is shown, since the results below it stay partial."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("IncompleteBanner")
        # Its own style rule: red in both themes (the message bar's error tint is pale).
        self.setStyleSheet(f"#IncompleteBanner {{ background: {BANNER_RED}; "
                           "border-radius: 6px; border: none; }"
                           "#IncompleteBanner QLabel { color: #ffffff; background: "
                           "transparent; }")
        row = QHBoxLayout(self)
        row.setContentsMargins(12, 8, 12, 8)
        row.setSpacing(10)
        self.icon = QLabel()
        self.icon.setFixedSize(22, 22)
        self.icon.setPixmap(theme.render_svg("warning", 22, "#ffffff"))
        self.title = QLabel()
        self.title.setStyleSheet("font-weight: 700;")
        self.text = QLabel()
        self.text.setWordWrap(True)
        self.text.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        column = QVBoxLayout()
        column.setSpacing(2)
        column.addWidget(self.title)
        column.addWidget(self.text)
        row.addWidget(self.icon, 0, Qt.AlignmentFlag.AlignTop)
        row.addLayout(column, 1)
        self.hide()

    def show_result(self, result: QueryResult) -> None:
        """Shown for an incomplete answer, hidden for a complete or unverifiable one."""
        if result.complete is not False:
            self.hide()
            return
        missing = result.segments_missing
        self.title.setText(result.completeness)
        first = ", ".join(missing[:3]) + (", …" if len(missing) > 3 else "")
        self.text.setText(
            f"The search service left out part of this repository ({len(missing):,} "
            f"missing segment{'s' if len(missing) != 1 else ''}: {first}), so the nearest "
            "images below may not be the nearest in the archive. The segments may be "
            "missing from the storage or withheld by the service; search again later or "
            "ask the repository's owner to check the storage.")
        self.setToolTip("\n".join(missing))
        self.show()


class SearchPage(QWidget):
    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.repo: Repository | None = None
        self.query_path: str = ""
        self.query_image: ImageMeta | None = None  # an archived query ("Find similar")
        self.outcome: SearchOutcome | None = None
        self.rows: list[StripRow] = []
        self.expanded: set[str] = set()  # series keys whose other hits the strip shows
        self.viewer: Any = None  # the last viewer opened from a result (tests)
        self.selected: Hit | None = None
        self.task: Task | None = None
        self.total_ms = 0.0
        self._hit_images: dict[str, QImage] = {}
        self._tiles: dict[str, QImage] = {}  # square previews for the strip
        self._originals: dict[str, QImage] = {}  # decrypted originals of viewed hits

        layout = QVBoxLayout(self)
        layout.setContentsMargins(20, 16, 20, 16)
        layout.setSpacing(10)
        layout.addWidget(PageHeader(
            "Search by image", "The query becomes an encrypted token on this workstation; "
            "the cloud compares encrypted features and returns only image references."))

        self.drop = DropArea("Drop a query image here", "DICOM, PNG, JPEG or TIFF",
                             icon_name="search", compact=True)
        self.drop.dropped.connect(lambda paths: self.set_query(paths[0]))
        self.open_button = theme.themed(QPushButton("Open image…"), "file")
        self.open_button.setToolTip("Choose a query image (Ctrl+O)")
        self.open_button.clicked.connect(self.choose_query)
        self.k_spin = QSpinBox()
        self.k_spin.setRange(1, 20)
        self.k_spin.setValue(5)
        self.k_spin.setPrefix("Top ")
        self.k_spin.setToolTip("How many of the nearest images to show")
        self.search_button = primary(QPushButton(theme.icon("search", "#ffffff"), "Search"))
        self.search_button.clicked.connect(self.search)
        self.drop.add_button(self.open_button)
        self.drop.add_button(self.k_spin)
        self.drop.add_button(self.search_button)
        layout.addWidget(self.drop)
        self.banner = IncompleteBanner()
        layout.addWidget(self.banner)

        panels = QHBoxLayout()
        panels.setSpacing(12)
        self.query_panel = ImagePanel("No query yet.\nDrop an image above or press Ctrl+O.")
        self.query_panel.doubleClicked.connect(self._open_query)
        self.query_caption = QLabel("Query")
        self.nearest_panel = ImagePanel("The nearest archived image appears here.")
        self.nearest_panel.doubleClicked.connect(self._open_selected)
        self.nearest_caption = QLabel("Nearest neighbour")
        for caption, panel in ((self.query_caption, self.query_panel),
                               (self.nearest_caption, self.nearest_panel)):
            column = QVBoxLayout()
            column.setSpacing(4)
            caption.setObjectName("ImageCaption")
            caption.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            column.addWidget(caption)
            column.addWidget(panel, 1)
            panels.addLayout(column, 1)

        details = card()
        details.setFixedWidth(300)
        form_box = QVBoxLayout(details)
        form_box.setContentsMargins(14, 12, 14, 12)
        form_box.setSpacing(8)
        title = QLabel("Result")
        title.setObjectName("CardTitle")
        title_row = QHBoxLayout()
        title_row.addWidget(title)
        title_row.addStretch(1)
        # Issue 18: send the result (or its study) to a PACS or viewer, export FHIR; in the
        # title row, as the card has no height to spare at a laptop's window size.
        self.send_button = QToolButton()
        self.send_button.setText("Send to…")
        theme.themed(self.send_button, "connect")
        self.send_button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.send_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.send_button.setAutoRaise(True)
        self.send_button.setToolTip("Send the decrypted original (or its whole study) to a "
                                    "PACS or viewer; export its study as FHIR")
        self.send_menu = QMenu(self.send_button)
        self.send_menu.aboutToShow.connect(self._fill_send_menu)
        self.send_button.setMenu(self.send_menu)
        title_row.addWidget(self.send_button)
        form_box.addLayout(title_row)
        # The distance in words first (raw distance in the tooltip): app/core/similarity.py.
        self.similarity = QLabel("—")
        self.similarity.setObjectName("SimilarityWord")
        self.similarity.setStyleSheet("font-size: 17px; font-weight: 700;")
        form_box.addWidget(self.similarity)
        self.fields: dict[str, QLabel] = {}
        # Clinical attributes first: what a radiologist recognises an image by. In a scroll
        # area: at a laptop's window height the card's rows would otherwise be squeezed
        # on top of each other (seen in docs/screenshots/05-search.png at 1280 x 820).
        clinical = QWidget()
        clinical.setLayout(self._form(CLINICAL_FIELDS))
        clinical.layout().setContentsMargins(0, 0, 0, 0)
        scroller = QScrollArea()
        scroller.setWidget(clinical)
        scroller.setWidgetResizable(True)
        scroller.setFrameShape(QFrame.Shape.NoFrame)
        scroller.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroller.setMinimumHeight(90)
        scroller.viewport().setAutoFillBackground(False)  # the card's colour shows through
        clinical.setAutoFillBackground(False)
        form_box.addWidget(scroller, 1)
        self.details_button = QToolButton()
        self.details_button.setText("Details")
        self.details_button.setCheckable(True)
        self.details_button.setAutoRaise(True)
        self.details_button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.details_button.setArrowType(Qt.ArrowType.RightArrow)
        self.details_button.setToolTip("Distance, ranking check, key version and image id")
        self.details_button.toggled.connect(self._toggle_details)
        form_box.addWidget(self.details_button)
        self.details = QWidget()
        self.details.setLayout(self._form(DETAIL_FIELDS))
        self.details.layout().setContentsMargins(0, 0, 0, 0)
        self.details.hide()
        form_box.addWidget(self.details)
        self.more_button = QPushButton("")
        self.more_button.setToolTip("Show (or hide) the other images of this series that "
                                    "are among the nearest")
        self.more_button.clicked.connect(self._toggle_group)
        self.more_button.hide()
        form_box.addWidget(self.more_button)
        self.open_full_button = theme.themed(QPushButton("Open full image"), "zoom_in")
        self.open_full_button.clicked.connect(self._open_selected)
        form_box.addWidget(self.open_full_button)
        self.compare_button = QPushButton("Compare with the query")
        self.compare_button.setToolTip("The query and this result side by side, with linked "
                                       "zoom, pan and window")
        self.compare_button.clicked.connect(self._compare_selected)
        form_box.addWidget(self.compare_button)
        panels.addWidget(details)
        layout.addLayout(panels, 1)

        strip_row = QHBoxLayout()
        self.strip_label = QLabel("Nearest images")
        self.strip_label.setObjectName("CardTitle")
        strip_row.addWidget(self.strip_label)
        strip_row.addSpacing(12)
        self.group_check = QCheckBox("Group by series")
        self.group_check.setChecked(True)
        self.group_check.setToolTip("Each series once, by its nearest image (neighbouring "
                                    "slices look alike); off: the nearest images as ranked")
        self.group_check.toggled.connect(lambda _: self._fill_strip())
        strip_row.addWidget(self.group_check)
        strip_row.addSpacing(16)
        # "The nearest MR of a knee" (issue 17): keyword terms travel with the query as
        # encrypted tokens and the engine ranks only the images they match. In this row,
        # over the images it filters: a line of its own would squeeze the result card at
        # a laptop's 1280 x 820.
        self.filter_row = KeywordFilterRow(ctx)
        self.filter_row.edit.returnPressed.connect(self.search)
        strip_row.addWidget(self.filter_row, 1)
        layout.addLayout(strip_row)
        self.strip = tile_strip(STRIP_TILE, QSize(STRIP_TILE + 64, STRIP_TILE + 56),
                                STRIP_TILE + 78)
        self.strip.setToolTip("Click an image to compare it; double-click to open it.")
        self.strip.currentRowChanged.connect(self._select_row)
        self.strip.itemDoubleClicked.connect(lambda _item: self._open_selected())
        layout.addWidget(self.strip)
        timing_row = QHBoxLayout()
        timing_row.setSpacing(14)
        timing_title = QLabel("Time taken:")
        timing_title.setObjectName("CardTitle")
        timing_row.addWidget(timing_title)
        self.timings: dict[str, QLabel] = {}
        for key, label in (("features", "features"), ("token", "token"), ("server", "server"),
                           ("fetch_decrypt", "fetch + decrypt"), ("previews", "previews"),
                           ("total", "total")):
            value = QLabel("—")
            self.timings[key] = value
            name = muted_label(label, wrap=False)
            pair = QHBoxLayout()
            pair.setSpacing(4)
            pair.addWidget(name)
            pair.addWidget(value)
            timing_row.addLayout(pair)
        timing_row.addStretch(1)
        layout.addLayout(timing_row)

        ctx.repositoryChanged.connect(self.set_repository)
        self._update()

    def _form(self, rows: tuple[tuple[str, str], ...]) -> QFormLayout:
        form = QFormLayout()
        form.setLabelAlignment(Qt.AlignmentFlag.AlignLeft)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.setVerticalSpacing(7)
        for key, label in rows:
            value = ElidedLabel("—")
            value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            if key == "id":
                value.setProperty("mono", True)
            self.fields[key] = value
            form.addRow(QLabel(label + ":"), value)
        return form

    def _toggle_details(self, shown: bool) -> None:
        self.details.setVisible(shown)
        self.details_button.setArrowType(Qt.ArrowType.DownArrow if shown
                                         else Qt.ArrowType.RightArrow)

    # --- query ---------------------------------------------------------------------------

    def set_repository(self, repo: Repository | None) -> None:
        self.repo = repo
        self._clear_result()
        self._update()

    def choose_query(self) -> None:
        start = str(self.ctx.demo_queries) if self.ctx.demo_queries else ""
        path = self.ctx.dialogs.open_image(self, "Choose a query image", start)
        if path:
            self.set_query(path)

    def set_query(self, path: str) -> None:
        """Show the query (decoded in the background) and search at once."""
        self.query_path = path
        self.query_image = None
        self.query_caption.setText(f"Query · {Path(path).name}")
        self.query_panel.set_busy("Decoding…")
        self._clear_result()

        backend = self.ctx.backend

        def decode(_: TaskContext) -> QImage:
            return qimage_from_array(backend.display(path))

        self.ctx.runner.run(f"Decoding {Path(path).name}", decode,
                            on_done=self.query_panel.set_image,
                            on_error=self._query_failed)
        self.search()

    def find_similar(self, meta: ImageMeta) -> None:
        """Search with an archived image's own stored features (no local file): its
        preview shows as the query, then its decrypted original."""
        repo = self.repo
        self.query_path = ""
        self.query_image = meta
        label = instance_label(meta)
        self.query_caption.setText(f"Query · {meta.name} (archived"
                                   + (f", {label})" if label else ")"))
        self.query_panel.set_busy("Decrypting…")
        self._clear_result()
        if repo is not None:
            backend = self.ctx.backend

            def preview(_: TaskContext) -> QImage:
                return qimage_from_png(backend.thumbnail_png(repo, meta.image_id,
                                                             meta.key_version or None))

            def original(_: TaskContext) -> QImage:
                frame = meta.frame if meta.frames > 1 else None
                images = backend.fetch_frames(repo, meta.original_image_id, [frame],
                                              meta.name, meta.key_version or None)
                return qimage_from_array(images[0].display())

            def shown(image: QImage) -> None:
                if self.query_image is meta:
                    self.query_panel.set_image(image)

            self.ctx.runner.run(f"Decrypting {meta.name}", preview, light=True,
                                tracked=False, on_done=shown, on_error=self._query_failed)
            self.ctx.runner.run(f"Decrypting {meta.name}", original, light=True,
                                tracked=False, on_done=shown, on_error=lambda _: None)
        self.search()

    def set_filter(self, terms: list[str]) -> None:
        """The keyword filter row's terms (from the keyword page); searches again at once
        when a query is shown."""
        self.filter_row.set_terms(terms)
        if self.has_query:
            self.search()

    @property
    def has_query(self) -> bool:
        return bool(self.query_path) or self.query_image is not None

    def _query_name(self) -> str:
        if self.query_image is not None:
            return self.query_image.name
        return Path(self.query_path).name

    def _query_failed(self, error: TaskError) -> None:
        self.query_panel.set_image(None)
        self.query_panel.set_busy(error.message)

    # --- search ----------------------------------------------------------------------------

    def search(self) -> None:
        repo = self.repo
        if not self.has_query or self.task is not None:
            return
        if repo is None:
            self.ctx.info("Open a repository first: the search runs in the repository "
                          "chosen at the top.", "warning")
            return
        if self.filter_row.problem:
            self.ctx.info(f"{self.filter_row.problem}. Correct the keyword filter, or "
                          "empty it to search every image.", "warning")
            return
        path, image, k = self.query_path, self.query_image, self.k_spin.value()
        where = self.filter_row.terms()
        backend = self.ctx.backend
        self._clear_result()
        self.nearest_panel.set_busy("Searching the encrypted index…")
        started = time.perf_counter()

        def work(_: TaskContext) -> tuple[SearchOutcome, dict[str, QImage], dict[str, QImage]]:
            if image is not None:
                outcome = backend.search_by_image_id(repo, image.image_id, k, where=where)
            else:
                outcome = backend.search(repo, path, k, where=where)
            full = {i: qimage_from_png(png) for i, png in outcome.thumbnails.items()}
            tiles = {i: square_tile(png, STRIP_TILE * 2) for i, png in
                     outcome.thumbnails.items()}
            return outcome, full, tiles

        def done(result: tuple[SearchOutcome, dict[str, QImage], dict[str, QImage]]) -> None:
            self.total_ms = (time.perf_counter() - started) * 1000
            self._show(*result)

        self.task = self.ctx.runner.run(
            f"Searching {repo.repo_id}", work, on_done=done,
            on_error=self._failed, on_finish=self._finished)
        self._update()

    def _failed(self, error: TaskError) -> None:
        self.nearest_panel.set_busy(error.message)
        self.ctx.error(error)

    def _finished(self) -> None:
        self.task = None
        self._update()

    def _show(self, outcome: SearchOutcome, full: dict[str, QImage],
              tiles: dict[str, QImage]) -> None:
        self.outcome = outcome
        self._hit_images = full
        self._tiles = dict(tiles)
        self.expanded = set()
        result = outcome.result
        self._fill_strip(select=False)
        t = result.timings_ms
        self.timings["features"].setText(format_ms(t.get("features", 0.0)))
        self.timings["token"].setText(format_ms(t.get("token", 0.0)))
        self.timings["server"].setText(format_ms(t.get("server", 0.0)))
        self.timings["fetch_decrypt"].setText(format_ms(t.get("fetch_decrypt", 0.0)))
        self.timings["previews"].setText(format_ms(outcome.thumbnails_ms))
        self.timings["total"].setText(format_ms(self.total_ms))
        stats = result.stats
        vectors = int(stats.get("vectors", 0))
        full_scored = int(stats.get("full_scored", 0))
        self.banner.show_result(result)
        partial = " (INCOMPLETE)" if result.complete is False else ""
        here = stats.get("mode") == "workstation"  # issue 19: which mode answered
        encrypted = stats.get("mode") == "ckks"
        mode = (" on this workstation" if here else
                " by encrypted scores (CKKS)" if encrypted else "")
        self.fields["searched"].setText(f"{vectors} images{mode}{partial}")
        self.fields["searched"].setToolTip(("Searched on this workstation from its "
                                            "encrypted local copy: the server saw no "
                                            "query. " if here else
                                            "The server computed encrypted scores it "
                                            "cannot read; they were decrypted and the "
                                            "nearest re-scored exactly here. "
                                            if encrypted else "") +
                                           f"{vectors} encrypted vectors in the index; "
                                           f"{full_scored} needed a full score, the rest "
                                           "were ruled out by their lower bounds; "
                                           f"{result.completeness}")
        self.fields["verified"].setText("verified here" if result.order_verified
                                        else "NOT confirmed here")
        self.fields["verified"].setToolTip(
            "The server's order was checked against distances recomputed from the decrypted "
            "features" if result.order_verified else "The distances recomputed from the "
            "decrypted features do not follow the server's order")
        if result.hits:
            self.strip.setCurrentRow(0)
            best = result.hits[0]
            repo_id = self.repo.repo_id if self.repo else ""
            self.ctx.activity.record(
                "search", f"Searched {repo_id} with {self._query_name()}: nearest "
                f"{best.name} (distance {best.distance:.4g}) in {format_ms(self.total_ms)}",
                repository=repo_id)
        elif self.filter_row.active:
            self.nearest_panel.set_busy("No archived image has the keywords of the filter.")
        else:
            self.nearest_panel.set_busy("The repository has no images to compare with yet.")
        self._update()

    @property
    def grouped(self) -> bool:
        """Whether the strip shows series (the answer was grouped and the box is on)."""
        return (self.group_check.isChecked() and self.outcome is not None
                and bool(getattr(self.outcome.result, "groups", None)))

    def _fill_strip(self, select: bool = True) -> None:
        """The strip's tiles from the answer, grouped or not, expanded groups included;
        the selected hit stays selected where it is still shown."""
        keep = self.selected.image_id if self.selected is not None else ""
        self.strip.blockSignals(True)
        self.strip.clear()
        self.rows = []
        if self.outcome is None:
            self.strip.blockSignals(False)
            return
        result = self.outcome.result
        self.rows = strip_rows(result, self.group_check.isChecked(), self.expanded)
        for row in self.rows:
            hit = row.hit
            tile = self._tiles.get(hit.image_id)
            pixmap = QPixmap.fromImage(tile) if tile is not None else QPixmap()
            pixmap.setDevicePixelRatio(2.0)
            # the word only (rank = position; "#1 · near-duplicate" would be elided); the
            # series under it, muted
            item = QListWidgetItem(QIcon(pixmap), similarity_word(hit.distance))
            if row.member:
                item.setData(SUBTITLE_ROLE, "↳ same series")
            elif row.group is not None and row.group.more:
                arrow = "▾" if row.group.series_key in self.expanded else "▸"
                item.setData(SUBTITLE_ROLE, f"{arrow} {row.group.more} more")
            tip = f"#{hit.rank} · {hit_caption(hit)}\n{similarity_tooltip(hit.distance)}"
            if row.group is not None and row.group.more and not row.member:
                tip += f"\n{more_text(row.group.more)} (select it, then \"Show\")"
            item.setToolTip(tip)
            item.setData(Qt.ItemDataRole.UserRole, hit.image_id)
            self.strip.addItem(item)
        if self.grouped:
            n = len(result.groups)
            self.strip_label.setText(f"Nearest {n} series")
        else:
            self.strip_label.setText(f"Nearest {len(result.hits)} images")
        self.strip.blockSignals(False)
        rows = [r.hit.image_id for r in self.rows]
        if select and rows:
            self.strip.setCurrentRow(rows.index(keep) if keep in rows else 0)

    def _toggle_group(self) -> None:
        """Expand (or collapse) the selected hit's series in the strip; the others'
        previews are decrypted in the background the first time."""
        row = self.current_row()
        if row is None or row.group is None or not row.group.more:
            return
        key = row.group.series_key
        if key in self.expanded:
            self.expanded.discard(key)
        else:
            self.expanded.add(key)
            self._load_previews([h for h in row.group.others
                                 if h.image_id not in self._tiles])
        self._fill_strip()

    def expand_group(self, series_key: str, on: bool = True) -> None:
        """Expand or collapse one series' other hits (by series key)."""
        if on == (series_key in self.expanded) or self.outcome is None:
            return
        for index, row in enumerate(self.rows):
            if row.group is not None and row.group.series_key == series_key \
                    and not row.member:
                self.strip.setCurrentRow(index)
                self._toggle_group()
                return

    def _load_previews(self, hits: list[Hit]) -> None:
        repo = self.repo
        if repo is None or not hits:
            return
        backend = self.ctx.backend
        outcome = self.outcome

        def work(_: TaskContext) -> dict[str, QImage]:
            pngs = backend.previews(repo, hits)
            return {i: square_tile(png, STRIP_TILE * 2) for i, png in pngs.items()}

        def done(tiles: dict[str, QImage]) -> None:
            if self.outcome is outcome:
                self._tiles.update(tiles)
                self._fill_strip()

        self.ctx.runner.run("Decrypting previews", work, light=True, tracked=False,
                            on_done=done, on_error=self.ctx.error)

    def current_row(self) -> StripRow | None:
        row = self.strip.currentRow()
        return self.rows[row] if 0 <= row < len(self.rows) else None

    def _select_row(self, row: int) -> None:
        if self.outcome is None or not 0 <= row < len(self.rows):
            return
        strip_row = self.rows[row]
        hit = strip_row.hit
        self.selected = hit
        self.nearest_panel.set_image(self._originals.get(hit.image_id)
                                     or self._hit_images.get(hit.image_id))
        if hit.image_id not in self._originals:
            self._load_original(hit)
        title = "Nearest neighbour" if hit.rank == 1 else f"Rank {hit.rank}"
        self.nearest_caption.setText(f"{title} · {hit_caption(hit)}")
        total = len(self.outcome.result.hits)
        word = similarity_word(hit.distance)
        self.similarity.setText(word[:1].upper() + word[1:])
        self.similarity.setToolTip(similarity_tooltip(hit.distance))
        meta = ImageMeta.from_record(hit.image_id, hit.meta, hit.key_version)
        for key, value in clinical_values(meta).items():
            self.fields[key].setText(value or "—")
        self.fields["name"].setText(hit.name)
        group = strip_row.group
        if group is not None:  # the series' rank; the image's own where it differs
            series_total = len(self.outcome.result.groups)
            own = f" (image {hit.rank})" if hit.rank != group.rank else ""
            self.fields["rank"].setText(f"{group.rank} of {series_total}{own}")
            self.fields["rank"].setToolTip(f"Series {group.rank} of the {series_total} "
                                           f"nearest series; image {hit.rank} of the "
                                           "nearest images")
        else:
            self.fields["rank"].setText(f"{hit.rank} of {total}")
            self.fields["rank"].setToolTip("")
        if group is not None and group.more:
            shown = group.series_key in self.expanded
            self.more_button.setText(("Hide the " if shown else "Show the ")
                                     + more_text(group.more))
            self.more_button.show()
        else:
            self.more_button.hide()
        self.fields["distance"].setText(f"{hit.distance:.6g}")
        self.fields["distance"].setToolTip("Squared distance between the feature vectors, "
                                           "recomputed from the decrypted features "
                                           "(0 = identical features)")
        self.fields["version"].setText(str(hit.key_version))
        size = f"{meta.columns} × {meta.rows}, " if meta.rows and meta.columns else ""
        self.fields["format"].setText(size + (meta.source_format.upper() or "—"))
        self.fields["id"].setText(hit.image_id)
        self._update()

    def _load_original(self, hit: Hit) -> None:
        """Replace the preview with the decrypted original (sharper) once it arrives."""
        repo = self.repo
        if repo is None:
            return
        backend = self.ctx.backend

        meta = ImageMeta.from_record(hit.image_id, hit.meta, hit.key_version)

        def work(_: TaskContext) -> QImage:
            from app.gui.viewer_link import fetch_archived

            return qimage_from_array(fetch_archived(backend, repo, meta).display())

        def done(image: QImage) -> None:
            if len(self._originals) > 20:
                self._originals.pop(next(iter(self._originals)))
            self._originals[hit.image_id] = image
            if self.selected is not None and self.selected.image_id == hit.image_id:
                self.nearest_panel.set_image(image)

        self.ctx.runner.run(f"Fetching {hit.name}", work, tracked=False,
                            light=True, on_done=done,
                            on_error=lambda error: None)  # the preview stays; viewer retries

    def _clear_result(self) -> None:
        self.banner.hide()
        self.outcome = None
        self.selected = None
        self._hit_images = {}
        self._tiles = {}
        self._originals = {}
        self.rows = []
        self.expanded = set()
        self.more_button.hide()
        self.strip.clear()
        self.strip_label.setText("Nearest images")
        self.nearest_panel.set_image(None)
        self.nearest_caption.setText("Nearest neighbour")
        for label in (self.similarity, *self.fields.values(), *self.timings.values()):
            label.setText("—")
        self.similarity.setToolTip("")

    def _open_selected(self) -> None:
        """The hit in the viewer: as its series' stack at that slice where it belongs to a
        series (the series' images listed in the background), else alone (a frame of a
        multi-frame file as the stack of its frames)."""
        hit, repo = self.selected, self.repo
        if hit is None or repo is None:
            return
        from app.gui.viewer import open_archived, open_stack
        from app.gui.viewer_model import LazyStack

        meta = ImageMeta.from_record(hit.image_id, hit.meta, hit.key_version)
        key = series_key(meta)
        if key.startswith(LONE_PREFIX):
            viewer = open_archived(self.ctx, self, repo, hit.image_id, hit.name,
                                   hit.key_version, meta=meta)
            viewer.findSimilarRequested.connect(self.find_similar)  # the viewer's button
            return
        backend = self.ctx.backend

        def work(_: TaskContext) -> list[ImageMeta]:
            return backend.series_images(repo, key)

        def done(images: list[ImageMeta]) -> None:
            ids = [m.image_id for m in images]
            if len(images) > 1 and hit.image_id in ids:
                self.viewer = open_stack(self.ctx, self, repo, LazyStack.of_metas(images),
                                         hit.name, ids.index(hit.image_id), metas=images)
            else:
                self.viewer = open_archived(self.ctx, self, repo, hit.image_id, hit.name,
                                            hit.key_version, meta=meta)
            self.viewer.findSimilarRequested.connect(self.find_similar)  # the viewer's button

        self.ctx.runner.run(f"Listing the series of {hit.name}", work, on_done=done,
                            on_error=self.ctx.error)

    def _compare_selected(self) -> None:
        hit, repo = self.selected, self.repo
        if hit is None or repo is None or not self.has_query:
            return
        from app.gui.viewer_link import open_compare

        open_compare(self.ctx, self, self.query_path, repo, hit.image_id, hit.name,
                     hit.key_version, query_image=self.query_image,
                     meta=ImageMeta.from_record(hit.image_id, hit.meta, hit.key_version))

    def _fill_send_menu(self) -> None:
        """Issue 18: "Send to…" and "Export FHIR…" for the selected result."""
        from app.gui.send_dialog import add_send_actions

        self.send_menu.clear()
        hit = self.selected
        if hit is not None:
            meta = ImageMeta.from_record(hit.image_id, hit.meta, hit.key_version)
            add_send_actions(self.send_menu, self.ctx, self, self.repo, meta, None)

    def _open_query(self) -> None:
        if self.query_image is not None and self.repo is not None:
            from app.gui.viewer import open_archived

            meta = self.query_image
            viewer = open_archived(self.ctx, self, self.repo, meta.image_id, meta.name,
                                   meta.key_version or None, meta=meta)
            viewer.findSimilarRequested.connect(self.find_similar)
        elif self.query_path:
            from app.gui.viewer import open_local

            open_local(self.ctx, self, self.query_path)

    def _update(self) -> None:
        busy = self.task is not None
        self.search_button.setEnabled(self.has_query and self.repo is not None
                                      and not busy)
        self.search_button.setText("Searching…" if busy else "Search")
        self.open_full_button.setEnabled(self.selected is not None)
        self.compare_button.setEnabled(self.selected is not None and self.has_query)
        self.send_button.setEnabled(self.selected is not None)
        self.group_check.setEnabled(self.outcome is not None
                                    and bool(getattr(self.outcome.result, "groups", None)))

    def result_names(self) -> list[str]:
        """The names the strip shows, in order (each series once when grouped)."""
        return [r.hit.name for r in self.rows]

