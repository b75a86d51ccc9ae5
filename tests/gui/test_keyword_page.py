"""The keyword search page (Ctrl+F) and the "Search by image" filter row (issue 17).

First the Qt-free rules (terms from the form, the filter row's term check, completions),
then the widgets without a repository (layout, menus, completer), then the whole flow on a
format-2 repository of real DICOM files (tests/gui/series_data.py's MR series and CT
study, and pydicom's sample files) through the GUI's own backend, task runner and the real
search service: field values listed from the repository, AND/OR/NOT and a date range
answering exactly what a plaintext filter over the decrypted metadata answers, results as
a study list, labels added to a selection and removed again, and the filter row's terms
accepted by the image search (``where=``). Screenshots: /tmp/radcrypt-keyword-page.png,
/tmp/radcrypt-keyword-labels.png, /tmp/radcrypt-filter-row.png.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pydicom
import pytest
from guitools import WAIT_MS, FakeDialogs
from PyQt6.QtCore import QDate, Qt
from series_data import write_ct_study, write_mr_series

from app.core import client as facade
from app.core.settings import Settings
from app.gui import theme
from app.gui.activity import ActivityLog
from app.gui.backend import Backend
from app.gui.context import AppContext
from app.gui.filter_row import (
    FIELDS,
    KeywordFilterRow,
    TermsError,
    completions,
    join_terms,
    split_terms,
)
from app.gui.keyword_page import (
    FieldChoice,
    KeywordPage,
    build_terms,
    command_line,
    date_bounds,
    parse_values,
    result_words,
)
from app.gui.tasks import TaskRunner

try:
    from fixtures import gui_support
except ImportError:  # pragma: no cover
    from tests.fixtures import gui_support

PASSWORD = "quiet harbour lantern 47 violet"
REPO = "gui-keywords"
SHOTS = Path(os.environ.get("RADCRYPT_SCREENSHOT_DIR", "/tmp"))


# --- rules -------------------------------------------------------------------------------


def test_form_becomes_find_terms():
    choices = [FieldChoice("modality", ("CT", "MR")), FieldChoice("bodypart", ()),
               FieldChoice("label", ("excluded",), negated=True),
               FieldChoice("patient", ("P 7",))]
    terms = build_terms(choices, "2023-01-01", "2024-06-30")
    assert terms == ["modality=CT,MR", "label!=excluded", "patient=P 7",
                     "date=2023-01-01..2024-06-30"]
    assert command_line("r1", terms) == ("radcrypt find --repo r1 modality=CT,MR "
                                         "'label!=excluded' 'patient=P 7' "
                                         "date=2023-01-01..2024-06-30")
    assert build_terms([FieldChoice("modality", ())]) == []
    with pytest.raises(TermsError, match="comma"):
        build_terms([FieldChoice("accession", ("A,1",))])
    with pytest.raises(TermsError, match="ends before it starts"):
        build_terms([], "2024-02-01", "2024-01-01")
    with pytest.raises(TermsError, match="both"):
        build_terms([], "2024-02-01", "")
    assert parse_values(" CT, MR ,,CT ") == ("CT", "MR")
    assert date_bounds(["2023-03-02", "2024", "2024-06-11", "2024-06"]) == (
        "2023-03-02", "2024-06-11")
    assert date_bounds([]) == ("", "")
    assert result_words(0, 0) == "No image matches"
    assert result_words(1, 1) == "1 image in 1 study"
    assert result_words(12, 3) == "12 images in 3 studies"


def test_filter_row_checks_each_term_and_round_trips():
    assert split_terms("") == []
    assert split_terms('modality=MR "study=knee mri" NOT label=x -bodypart=HEAD '
                       "series!=t2") == ["modality=MR", "study=knee mri", "NOT", "label=x",
                                         "-bodypart=HEAD", "series!=t2"]
    for bad, words in (("modalty=MR", "unknown field 'modalty'"),
                       ("MR", "write field=value"), ("modality=", "no value"),
                       ("modality=, ,", "no value"), ("modality=MR NOT", "ends with NOT"),
                       ('study="knee', "No closing quotation")):
        with pytest.raises(TermsError, match=words):
            split_terms(bad)
    terms = ["modality=CT,MR", "study=knee mri", "date=2024-01..2024-06"]
    assert split_terms(join_terms(terms)) == terms
    assert completions({"label": ["teaching"], "modality": ["CT", "MR"], "zzz": ["1"]}) == [
        "modality=CT", "modality=MR", "label=teaching", "zzz=1"]
    assert set(FIELDS) >= {"modality", "bodypart", "laterality", "study", "series",
                           "patient", "accession", "date", "label"}


# --- widgets without a repository ---------------------------------------------------------


def _context(tmp_path: Path) -> AppContext:
    from app.gui.app import make_application

    make_application()
    settings = Settings(store="directory", data_dir=str(tmp_path / "data"), workers=1)
    return AppContext(Backend(settings), TaskRunner(), ActivityLog(None))


def test_filter_row_completes_the_last_term_and_flags_a_bad_one(qtbot, tmp_path):
    row = KeywordFilterRow(_context(tmp_path))
    qtbot.addWidget(row)
    row.resize(900, 40)
    row.show()
    row.set_values({"modality": ["CT", "MR"], "bodypart": ["CHEST", "KNEE"], "date": []})
    completer = row.completer
    row.edit.setFocus()
    qtbot.keyClicks(row.edit, "modality=MR bodypart=KN")  # typed, as a user does
    assert completer.splitPath(row.edit.text()) == ["bodypart=KN"]
    popup = completer.popup()
    qtbot.waitUntil(popup.isVisible, timeout=5000)
    assert popup.model().rowCount() == 1  # only KNEE contains "bodypart=KN"
    qtbot.keyClick(popup, Qt.Key.Key_Down)
    qtbot.keyClick(popup, Qt.Key.Key_Return)
    assert row.edit.text() == "modality=MR bodypart=KNEE"  # the words before are kept
    row.edit.setText("modality=MR -bodypart=KN")
    assert completer.splitPath(row.edit.text()) == ["bodypart=KN"]
    completer.setCompletionPrefix("bodypart=KN")
    assert completer.currentCompletion() == "modality=MR -bodypart=KNEE"  # NOT kept

    row.edit.setText("modality=MR bodypart=KNEE")
    assert row.terms() == ["modality=MR", "bodypart=KNEE"] and not row.problem
    row.edit.setText("modality=MR bodyprt=KNEE")
    assert row.terms() == [] and "unknown field 'bodyprt'" in row.problem
    assert row.edit.property("invalid") is True and row.error.isVisible()
    row.edit.clear()
    assert row.terms() == [] and not row.problem and not row.error.isVisible()
    row._fill_menu()  # the Keywords menu: one submenu per field with values
    titles = [a.text() for a in row.menu.actions()]
    assert titles == ["Modality", "Body part"]
    knee = next(a for a in row.menu.actions()[1].menu().actions() if a.text() == "KNEE")
    knee.trigger()
    assert row.terms() == ["bodypart=KNEE"]


def test_page_layout_without_a_repository(qtbot, tmp_path):
    page = KeywordPage(_context(tmp_path))
    qtbot.addWidget(page)
    page.resize(1080, 760)
    page.show()
    qtbot.waitExposed(page)
    assert not page.search_button.isEnabled()  # no repository yet
    assert "Open a repository" in page.message.text()
    page.set_values({"modality": ["CT", "MR"], "bodypart": ["CHEST"], "label": [],
                     "date": ["2023-03-02", "2024-06-11"]})
    modality = page.fields["modality"]
    modality.fill_menu()
    assert [a.text() for a in modality.menu.actions()] == ["CT", "MR"]
    modality.menu.actions()[1].setChecked(True)
    modality.menu.actions()[0].setChecked(True)
    assert modality.choice() == FieldChoice("modality", ("MR", "CT"))
    completer = modality.completer  # several values: the last one completes
    modality.edit.setText("CT, M")
    assert completer.splitPath(modality.edit.text()) == ["M"]
    completer.setCompletionPrefix("M")
    assert completer.currentCompletion() == "CT, MR"
    modality.edit.setText("MR, CT")
    assert not page.fields["label"].menu_button.isEnabled()
    assert page.fields["label"].edit.placeholderText() == "none in this repository"
    assert page.date_from.date() == QDate(2023, 3, 2)
    assert page.date_to.date() == QDate(2024, 6, 11)
    page.fields["bodypart"].mode.setCurrentText("is not")
    page.fields["bodypart"].edit.setText("CHEST")
    page.date_check.setChecked(True)
    assert page.terms() == ["modality=MR,CT", "bodypart!=CHEST",
                            "date=2023-03-02..2024-06-11"]
    assert page.command.full_text().startswith("radcrypt find --repo R modality=MR,CT")
    page.fields["accession"].edit.setText("A,")  # one value "A": fine
    assert page.problem.isHidden()
    page.clear_form()
    assert page.terms() == [] and page.command.full_text() == ""


# --- the flow on real files -------------------------------------------------------------------


def _files(root: Path) -> list[Path]:
    from pydicom.data import get_testdata_file

    extra = [Path(get_testdata_file(n)) for n in ("MR_small.dcm", "CT_small.dcm")]
    return write_mr_series(root / "mr") + write_ct_study(root / "ct") + extra


def _keywords(path: Path) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {"modality": str(ds.get("Modality", "")).upper(),
            "date": str(ds.get("StudyDate", "")),
            "patient": str(ds.get("PatientID", "")),
            "study": str(ds.get("StudyDescription", "")).lower()}


def _wait_result(qtbot, page: KeywordPage) -> None:
    qtbot.waitUntil(lambda: page.task is None, timeout=WAIT_MS)


@pytest.fixture
def keyword_repo(tmp_path: Path):
    settings = Settings(store="directory", data_dir=str(tmp_path / "data"), workers=1)
    files = _files(tmp_path / "files")
    identity = facade.create_identity(settings, "Dr. Keywords", PASSWORD)
    with facade.Client(settings, identity) as client:
        repo = client.create_repository(REPO, storage_format=2)
        report = client.import_files(repo, files)
        assert len(report.imported) == len(files), report.failed
    return settings, files


def test_keyword_page_flow_on_real_files(qtbot, keyword_repo):
    started = time.perf_counter()
    settings, files = keyword_repo
    dialogs = FakeDialogs()
    backend, ctx = gui_support.connected(settings, PASSWORD, dialogs=dialogs)
    page = KeywordPage(ctx)
    errors: list[str] = []
    ctx.message.connect(lambda level, text, details: errors.append(f"{text}\n{details}")
                        if level == "error" else None)
    qtbot.addWidget(page)
    # The application's style sheet on this page only (pytest-qt's QApplication is not
    # themed, and other tests must not change): the screenshot looks as the app does.
    page.setStyleSheet(theme.style_sheet(theme.current_colors(), 10.0))
    page.resize(1080, 780)
    page.show()
    qtbot.waitExposed(page)
    try:
        repo = backend.open_repository(REPO)
        ctx.set_repository(repo)
        # the fields list the values present in the repository (decrypted here)
        qtbot.waitUntil(lambda: bool(page.fields["modality"].present), timeout=WAIT_MS)
        plain = [_keywords(f) for f in files]
        assert page.fields["modality"].present == sorted({k["modality"] for k in plain})
        assert {"H3-MR-1", "H3-CT-7"} <= set(page.fields["patient"].present)
        assert "chest" in page.fields["study"].present
        assert page.date_from.date() == QDate.fromString(
            min(k["date"] for k in plain if k["date"]), "yyyyMMdd")

        # OR within a field, AND across fields: exactly the plaintext answer
        page.set_terms({"modality": ["CT", "MR"], "study": ["chest"]})
        assert page.search() is not None
        _wait_result(qtbot, page)
        want = sorted(f.name for f, k in zip(files, plain, strict=True)
                      if k["modality"] in ("CT", "MR") and "chest" in k["study"].split())
        assert want and sorted(m.name for m in page.result.images) == want
        assert page.summary.text() == result_words(len(want), 1)
        assert [s.patient_id for s in page.visible_studies()] == ["H3-CT-7"]

        # NOT and a date range: MR images of 2004..2024 not of patient H3-MR-1
        page.set_terms({"modality": ["MR"], "patient": ["H3-MR-1"]}, negated=["patient"])
        page.date_check.setChecked(True)
        page.date_from.setDate(QDate(2004, 1, 1))
        page.date_to.setDate(QDate(2024, 12, 31))
        page.search()
        _wait_result(qtbot, page)
        want = sorted(f.name for f, k in zip(files, plain, strict=True)
                      if k["modality"] == "MR" and "20040101" <= k["date"] <= "20241231"
                      and k["patient"] != "H3-MR-1")
        assert want == ["MR_small.dcm"]
        assert sorted(m.name for m in page.result.images) == want
        page.date_from.setDate(QDate(2005, 1, 1))  # the range now leaves it out
        page.search()
        _wait_result(qtbot, page)
        assert page.result.images == [] and page.summary.text() == "No image matches"
        assert page.stack.currentWidget() is page.message
        page.date_check.setChecked(False)

        # a query the facet's parser refuses: its own sentence, not "something went wrong"
        page.set_terms({"study": ["knee mri"]}, negated=["study"])
        page.search()
        _wait_result(qtbot, page)
        assert len(errors) == 1 and "NOT takes one word" in errors[0], errors
        assert not errors[0].startswith("Something went wrong")
        assert page.message.text().startswith("Keyword term")
        errors.clear()
        page.set_terms({"patient": ["H3-MR-1"]})
        page.search()
        _wait_result(qtbot, page)
        assert len(page.result.images) == 10  # the MR series, every slice of 2024-06-11
        assert [s.patient_id for s in page.visible_studies()] == ["H3-MR-1"]
        page.choose_study(page.visible_studies()[0].key)
        assert len(page.shown_images()) == 10
        qtbot.waitUntil(lambda: bool(errors) or all(
            m.image_id in page.thumbs.tiles for m in page.shown_images()), timeout=WAIT_MS)
        assert not errors, errors
        page.grab().save(str(SHOTS / "radcrypt-keyword-page.png"))

        # a label on two selected images, then found by it; removed again
        chosen = [m.image_id for m in page.shown_images()[:2]]
        page.select_images(chosen)
        assert page.label_button.isEnabled()
        dialogs.choice = "teaching"  # the label dialog's answer
        page.add_label()
        qtbot.waitUntil(lambda: page.label_task is None and page.task is None,
                        timeout=WAIT_MS)
        qtbot.waitUntil(lambda: "teaching" in page.fields["label"].present, timeout=WAIT_MS)
        page.set_terms({"label": ["teaching"]})
        page.search()
        _wait_result(qtbot, page)
        assert sorted(m.image_id for m in page.result.images) == sorted(chosen)
        page.grab().save(str(SHOTS / "radcrypt-keyword-labels.png"))
        page.choose_study(page.visible_studies()[0].key)
        page.select_images(chosen[:1])
        page.remove_label("teaching")
        qtbot.waitUntil(lambda: page.label_task is None and page.task is None,
                        timeout=WAIT_MS)
        assert [m.image_id for m in page.result.images] == chosen[1:]  # re-run at once

        # no image selected: a label goes on every image of the selected study, not only
        # on those that matched (series "2" matches one of the CT study's two images)
        page.set_terms({"series": ["2"]})
        page.fields["series"].edit.returnPressed.emit()  # Enter in a field searches
        _wait_result(qtbot, page)
        assert [m.name for m in page.result.images] == ["ct-2.dcm"]
        page.choose_study(page.visible_studies()[0].key)
        assert page.selected_images() == []
        dialogs.choice = "followup"
        page.add_label()
        qtbot.waitUntil(lambda: page.label_task is None and page.task is None,
                        timeout=WAIT_MS)
        page.set_terms({"label": ["followup"]})
        page.search()
        _wait_result(qtbot, page)
        assert sorted(m.name for m in page.result.images) == ["ct-1.dcm", "ct-2.dcm"]
        assert not errors, errors

        # the filter row's terms are what the image search takes as where=
        row = KeywordFilterRow(ctx)
        qtbot.addWidget(row)
        row.set_repository(repo)
        assert row.values == {}  # listed when the row shows, not before
        row.resize(900, 40)
        row.show()
        qtbot.waitExposed(row)
        qtbot.waitUntil(lambda: bool(row.values.get("modality")), timeout=WAIT_MS)
        assert "followup" in row.values["label"]
        row.edit.setText("modality=CT")
        row.grab().save(str(SHOTS / "radcrypt-filter-row.png"))
        client = backend.client
        assert client is not None
        query = next(f for f in files if f.name == "ct-2.dcm")
        result = client.search_files(repo, [query], k=5, where=row.terms())[0]
        cts = {f.name for f, k in zip(files, plain, strict=True) if k["modality"] == "CT"}
        assert len(result.hits) == len(cts) == 3  # every CT ranked, nothing else
        assert {h.name for h in result.hits} == cts
        assert result.hits[0].name == "ct-2.dcm"
    finally:
        ctx.runner.cancel_all()
        ctx.runner.wait_for_done(WAIT_MS)
        backend.close()
    print(f"keyword flow: {time.perf_counter() - started:.1f} s")
