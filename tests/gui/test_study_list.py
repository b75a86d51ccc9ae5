"""The Archive page as a study list (issue 15): studies of real CT and MR images, sortable by
every column, filtered by text, modality and date range; a series strip with one preview
per series; the images of the chosen series below; "Find similar" on any image.

The rules (``study_matches``, the sort keys) are tested on their own, then the page on a
repository holding real studies imported through the Import page (tests/gui/series_data.py).
Screenshot: /tmp/radcrypt-study-list.png.
"""

from __future__ import annotations

from archive_flow import archive_with_studies
from guitools import WAIT_MS
from PyQt6.QtCore import QDate

from app.core.meta import ImageMeta
from app.core.studies import group_studies
from app.gui.archive_page import (
    ALL_MODALITIES,
    DATE_COLUMN,
    STUDY_COLUMNS,
    image_caption,
    series_caption,
    study_cells,
    study_matches,
)


def meta(image_id: str, **clinical: str) -> ImageMeta:
    return ImageMeta(image_id * 32, f"{image_id}.dcm", clinical=clinical)


def test_filter_rules_text_modality_and_date_range():
    studies = group_studies([
        meta("a", StudyInstanceUID="1.1", SeriesInstanceUID="1.1.1", Modality="CT",
             PatientName="Duck^Donald", PatientID="P7", StudyDate="20230302",
             StudyDescription="CT chest", AccessionNumber="ACC42"),
        meta("b", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.1", Modality="MR",
             PatientName="Mouse^Minnie", StudyDate="20240611", SeriesDescription="T1 axial"),
        meta("c"),  # a PNG-like lone image: no UIDs, no date
    ])
    by_patient = {s.patient_name: s for s in studies}
    ct, mr, lone = by_patient["Duck^Donald"], by_patient["Mouse^Minnie"], by_patient[""]
    assert study_matches(ct, "duck chest") and not study_matches(ct, "duck head")
    assert study_matches(ct, "acc42") and study_matches(ct, "DONALD")
    assert study_matches(mr, "t1 axial")  # a series description finds its study
    assert study_matches(ct, modality="CT") and not study_matches(mr, modality="CT")
    assert study_matches(mr, date_from="20240101", date_to="20241231")
    assert not study_matches(ct, date_from="20240101", date_to="20241231")
    assert not study_matches(lone, date_from="20000101")  # undated: out of an active range
    assert study_matches(lone) and study_matches(lone, "c.dcm")
    assert study_cells(ct)[:4] == ("Duck, Donald", "P7", "2023-03-02", "CT")
    assert study_cells(ct)[-2:] == ("1", "1")


def test_captions_name_series_instance_and_frame():
    frame = ImageMeta("d" * 32, "cine.dcm", clinical={"InstanceNumber": "4"}, frame=2,
                      frames=9)
    assert image_caption(frame) == "Instance 4, frame 3/9"
    series = group_studies([meta("e", StudyInstanceUID="2", SeriesInstanceUID="2.1",
                                 Modality="MR", SeriesNumber="3",
                                 SeriesDescription="T2")])[0].series[0]
    assert series_caption(series) == "#3 T2\nMR · 1 image"


def test_study_list_sorts_filters_and_drills_down_to_a_series(qtbot, make_window, tmp_path):
    window, files = archive_with_studies(qtbot, make_window, tmp_path / "data", "studies")
    archive = window.archive_page
    brain = [f for f in files if f.parent.name == "brain"]
    patients = {s.patient_name for s in archive.studies}
    assert {"Mouse^Minnie", "Duck^Donald"} <= patients
    expected = 2 + (1 if brain else 0)
    assert len(archive.studies) == expected
    assert archive.study_section.isVisible() and not archive.series_section.isVisible()
    assert archive.count_label.text() == f"{len(files)} images"
    assert archive.visible_tiles() <= len(files)

    # sortable by any column, both ways
    for column in range(len(STUDY_COLUMNS)):
        for descending in (False, True):
            archive.sort_studies(column, descending)
            keys = [study_cells(s)[column] for s in archive.visible_studies()]
            if column >= STUDY_COLUMNS.index("Series"):
                keys = [int(k) for k in keys]
            else:
                keys = [k.lower() for k in keys]
            assert keys == sorted(keys, reverse=descending), (STUDY_COLUMNS[column], keys)
    archive.sort_studies(DATE_COLUMN, descending=True)
    assert archive.visible_studies()[0].patient_name == "Mouse^Minnie"  # 2024-06-11

    # filter by text, modality and date range; the images below follow the filter
    archive.filter_edit.setText("duck")
    assert [s.patient_name for s in archive.visible_studies()] == ["Duck^Donald"]
    assert archive.count_label.text() == "2 images in 1 study"
    assert len(archive.scope) == 2
    archive.filter_edit.clear()
    archive.modality_combo.setCurrentText("CT")
    assert [s.patient_name for s in archive.visible_studies()] == ["Duck^Donald"]
    archive.modality_combo.setCurrentText(ALL_MODALITIES)
    archive.date_check.setChecked(True)
    archive.date_from.setDate(QDate(2024, 1, 1))
    archive.date_to.setDate(QDate(2024, 12, 31))
    assert "Duck^Donald" not in {s.patient_name for s in archive.visible_studies()}
    assert "Mouse^Minnie" in {s.patient_name for s in archive.visible_studies()}
    archive.clear_filter()
    assert len(archive.visible_studies()) == expected

    # a study -> its series strip (one preview per series) -> a series' images
    study = next(s for s in archive.studies if brain and s.patient_id == "DEMO-MNI152") or \
        next(s for s in archive.studies if s.patient_name == "Duck^Donald")
    archive.choose_study(study.key)
    assert archive.series_section.isVisible()
    assert archive.series_strip.count() == len(study.series)
    qtbot.waitUntil(lambda: all(s.thumbnail.image_id in archive.model.tiles
                                for s in study.series), timeout=WAIT_MS)
    assert archive.count_label.text() == f"{study.image_count} images in this study"
    archive.choose_series(study.series[0].key)
    series = study.series[0]
    assert [e.image_id for e in archive.scope] == list(series.image_ids)
    assert archive.count_label.text().endswith("in this series")
    qtbot.waitUntil(lambda: archive.visible_tiles() == len(series.images), timeout=WAIT_MS)

    # the previews of a view are ONE access-log entry naming each of its images, not one
    # entry per preview (Client.previews; issue 17 maintenance)
    report = window.backend.client.access_log(window.ctx.repo)
    views: dict[str, set[str]] = {}
    for event in report.events:
        if event.action == "preview":
            views.setdefault(event.entry, set()).add(event.image_id)
    assert report.ok and set(archive.model.tiles) <= set().union(*views.values())
    assert len(views) < sum(len(ids) for ids in views.values()), views

    # "Find similar" on an image: the page asks for a search by the image's id
    asked = []
    archive.findSimilarRequested.connect(asked.append)
    assert not archive.similar_button.isEnabled()
    archive.view.setCurrentIndex(archive.model.index(1))
    assert archive.similar_button.isEnabled()
    window.resize(1280, 900)
    qtbot.wait(150)
    window.grab().save("/tmp/radcrypt-study-list.png")
    archive.similar_button.click()
    assert [m.image_id for m in asked] == [series.images[1].image_id]

    viewer = archive.open_study(study)  # a worklist's double-click: the largest series
    qtbot.waitUntil(lambda: viewer.canvas.stack is not None and viewer.loader.idle,
                    timeout=WAIT_MS)
    assert viewer.canvas.slice_count == max(len(s.images) for s in study.series)
    viewer.close()

    # a new import reloads the list; the chosen study and series stay chosen
    from guitools import import_files
    from pydicom.data import get_testdata_file

    rows = len(window.import_page.model.rows)
    import_files(qtbot, window, [get_testdata_file("MR_small.dcm")])
    qtbot.waitUntil(lambda: len(window.import_page.model.rows) == rows + 1, timeout=WAIT_MS)
    window.import_page.start_button.click()
    qtbot.waitUntil(lambda: window.import_page.task is None, timeout=WAIT_MS)
    window.show_page("archive")
    qtbot.waitUntil(lambda: len(archive.studies) == expected + 1 and not archive.loading,
                    timeout=WAIT_MS)
    assert archive.current_study is not None and archive.current_study.key == study.key
    assert archive.current_series is not None and archive.current_series.key == series.key
    assert archive.series_section.isVisible()

    archive.choose_study(None)  # back to every image
    assert archive.count_label.text() == f"{len(files) + 1} images"
    assert not archive.series_section.isVisible()
