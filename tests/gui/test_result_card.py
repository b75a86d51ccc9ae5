"""The search page's result card: the distance in words, clinical attributes first, crypto
details behind a "Details" toggle (issue 15, docs/SIMILARITY.md).

A format-2 repository of eight real sample images on the directory store of a private data
directory; the search page searches it with a noisy copy of the MR abdomen sample through
the GUI's own backend, task runner and the real search service. The card must call the
original a near-duplicate (raw distance in the tooltip), show its modality, body part,
study and series descriptions as the DICOM file has them, and keep the distance, key
version and image id hidden until "Details" is clicked. Screenshots are saved for a human
to look at: /tmp/radcrypt-result-card.png (as it opens) and -details.png (toggle open).
"""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
from guitools import WAIT_MS

from app.core import client as facade
from app.core.settings import Settings
from app.core.similarity import similarity_word
from app.gui.activity import ActivityLog
from app.gui.backend import Backend
from app.gui.context import AppContext
from app.gui.search_page import SearchPage
from app.gui.tasks import TaskRunner
from resources.samples import perturb_file

PASSWORD = "quiet harbour lantern 47 violet"  # tests/owned_repos.STRONG_PASSWORD
REPO = "gui-card"
SHOTS = Path(os.environ.get("RADCRYPT_SCREENSHOT_DIR", "/tmp"))
MR = "012_MR-SIEMENS-DICOM-WithOverlays.dcm"


def test_result_card_words_clinical_first_details_hidden(qtbot, tmp_path: Path,
                                                         sample_images: list[Path]) -> None:
    from app.gui.app import make_application

    files = sample_images[:8] + [p for p in sample_images if p.name == MR]
    original = next(p for p in files if p.name == MR)
    tags = pydicom.dcmread(original, stop_before_pixels=True)
    query = perturb_file(original, tmp_path / "query", "noise", seed=7)
    settings = Settings(store="directory", data_dir=str(tmp_path / "data"), workers=1)
    identity = facade.create_identity(settings, "Dr. Card", PASSWORD)
    with facade.Client(settings, identity) as client:
        repo = client.create_repository(REPO, storage_format=2)
        assert len(client.import_files(repo, files).imported) == len(files) == 9

    make_application()
    backend = Backend(settings)
    backend.unlock(PASSWORD)
    backend.connect()
    ctx = AppContext(backend, TaskRunner(), ActivityLog(None))
    page = SearchPage(ctx)
    qtbot.addWidget(page)
    page.resize(1100, 760)
    page.show()
    qtbot.waitExposed(page)
    try:
        page.set_repository(backend.open_repository(REPO))
        page.set_query(str(query))
        qtbot.waitUntil(lambda: page.outcome is not None and page.task is None,
                        timeout=WAIT_MS)
        qtbot.waitUntil(lambda: ctx.runner.idle, timeout=WAIT_MS)
        hit = page.outcome.result.hits[0]
        assert hit.name == MR and page.selected is hit

        # the word, measured: a noisy copy is a near-duplicate; the raw distance on hover
        assert similarity_word(hit.distance) == "near-duplicate"
        assert page.similarity.text() == "Near-duplicate"
        assert f"{hit.distance:.6g}" in page.similarity.toolTip()
        assert page.strip.item(0).text() == "near-duplicate"
        assert f"{hit.distance:.6g}" in page.strip.item(0).toolTip()
        for row, strip_row in enumerate(page.rows):  # each series once (issue 15)
            other = strip_row.hit
            item = page.strip.item(row)
            assert item.text() == similarity_word(other.distance)
            # the whole word fits under its tile (TileDelegate elides what does not)
            width = page.strip.fontMetrics().horizontalAdvance(item.text())
            assert width <= page.strip.visualItemRect(item).width() - 4, item.text()

        # clinical attributes, as the DICOM file has them, shown before anything else
        f = page.fields
        assert f["modality"].full_text() == tags.Modality == "MR"
        assert f["body_part"].full_text() == str(tags.BodyPartExamined).title() == "Abdomen"
        assert f["study"].full_text() == tags.StudyDescription
        assert f["series"].full_text() == f"#{tags.SeriesNumber} {tags.SeriesDescription}"
        date = str(tags.StudyDate)
        assert f["study_date"].full_text() == f"{date[:4]}-{date[4:6]}-{date[6:]}"
        assert f["instance"].full_text() == f"instance {tags.InstanceNumber}"
        assert f["name"].full_text() == MR and f["rank"].full_text() == "1 of 5"
        for key in ("modality", "body_part", "study", "series", "name"):
            assert f[key].isVisible(), key
        assert f["modality"].mapTo(page, f["modality"].rect().topLeft()).y() < \
            page.details_button.mapTo(page, page.details_button.rect().topLeft()).y()

        # crypto details: hidden until the toggle, then there
        assert not page.details.isVisible() and not page.details_button.isChecked()
        for key in ("distance", "version", "id", "verified", "searched", "format"):
            assert not f[key].isVisible(), key
        qtbot.wait(50)
        assert page.grab().save(str(SHOTS / "radcrypt-result-card.png"))
        page.details_button.click()
        assert page.details.isVisible()
        assert float(f["distance"].full_text()) == float(f"{hit.distance:.6g}")
        assert f["id"].full_text() == hit.image_id and f["id"].isVisible()
        assert f["version"].full_text() == "1"
        assert f["verified"].full_text() == "verified here"
        assert f["format"].full_text().endswith("DICOM")
        qtbot.wait(50)
        assert page.grab().save(str(SHOTS / "radcrypt-result-card-details.png"))
        page.details_button.click()
        assert not page.details.isVisible()

        # another hit: the card follows the selection
        page.strip.setCurrentRow(1)
        second = page.rows[1].hit  # the best image of the second nearest series
        assert f["name"].full_text() == second.name
        assert f["rank"].full_text().startswith("2 of 5")
        word = similarity_word(second.distance)
        assert page.similarity.text() == word[:1].upper() + word[1:]
    finally:
        qtbot.waitUntil(lambda: ctx.runner.idle, timeout=WAIT_MS)
        backend.close()
