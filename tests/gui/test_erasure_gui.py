"""Deleting images, series, studies and patients from the Archive page, the legal hold on
the Repository key page, and "Find similar" in the viewer (issue 16, H10).

The rules (what blocks a deletion, the counts, the word to type) are tested on their own,
then one window on a repository holding real CT and MR studies (tests/gui/series_data.py):
a study deleted after typed confirmation and an image deleted at once (the archive reloads
without them, the client finds nothing of them), the legal hold set by the owner (the
Archive page refuses in plain words, also for a deletion confirmed before the hold), lifted
again, and the viewer's "Find similar" on the slice on screen.
Screenshots: /tmp/radcrypt-erase-confirm.png, /tmp/radcrypt-legal-hold.png,
/tmp/radcrypt-legal-hold-keys.png.
"""

from __future__ import annotations

import pytest
from archive_flow import archive_with_studies
from guitools import WAIT_MS

from app.core.erasure import ErasurePlan, Target
from app.core.errors import RadcryptError
from app.core.meta import ImageMeta
from app.gui.erase_dialog import (
    FALLBACK_WORD,
    confirmation_word,
    erase_block_reason,
    plan_counts,
    plan_rows,
    plan_summary,
)


def meta(image_id: str, frame: int = 0, frames: int = 1, original: str = "",
         **clinical: str) -> ImageMeta:
    return ImageMeta(image_id * 32, f"{image_id}.dcm", clinical=clinical, frame=frame,
                     frames=frames, original_id=original * 32 if original else "")


def test_what_blocks_a_deletion_is_said_in_plain_words():
    assert erase_block_reason(repo_open=True, owner=True, storage_format=2,
                              legal_hold=False) == ""
    assert "Open a repository" in erase_block_reason(repo_open=False, owner=False,
                                                     storage_format=2, legal_hold=False)
    member = erase_block_reason(repo_open=True, owner=False, storage_format=2,
                                legal_hold=False)
    assert "owner or a co-owner" in member and "member" in member
    held = erase_block_reason(repo_open=True, owner=True, storage_format=2, legal_hold=True)
    assert "legal hold" in held and "lifts" in held
    assert "format 1" in erase_block_reason(repo_open=True, owner=True, storage_format=1,
                                            legal_hold=False)
    assert "running" in erase_block_reason(repo_open=True, owner=True, storage_format=2,
                                           legal_hold=False, busy=True)


def test_plan_counts_rows_and_the_word_to_type():
    ct = dict(StudyInstanceUID="1.2", PatientName="Duck^Donald", PatientID="P7",
              StudyDate="20230302", StudyDescription="CT chest", Modality="CT")
    images = [meta("a", SeriesInstanceUID="1.2.1", SeriesDescription="Axial 1", **ct),
              meta("b", SeriesInstanceUID="1.2.2", SeriesDescription="Axial 2", **ct),
              meta("c", frame=1, frames=2, original="b", SeriesInstanceUID="1.2.2",
                   SeriesDescription="Axial 2", **ct)]
    plan = ErasurePlan("repo-x", Target("study", "1.2"), images)
    assert plan_counts(plan) == {"images": 3, "files": 2, "studies": 1, "series": 2,
                                 "patients": 1}
    summary = plan_summary(plan)
    assert summary.startswith("3 images (2 files) in 1 study and 2 series")
    assert "patient Duck, Donald" in summary and "repo-x" in summary
    rows = plan_rows(plan)
    assert [r[4] for r in rows] == ["Axial 1", "Axial 2"] and rows[1][-1] == "2"
    assert rows[0][:4] == ("Duck, Donald", "P7", "2023-03-02", "CT chest")
    assert confirmation_word(plan) == "P7"
    lone = ErasurePlan("repo-x", Target("patient", "x"), [meta("d", PatientName="X^Y")])
    assert confirmation_word(lone) == FALLBACK_WORD  # no PatientID to type
    two = ErasurePlan("repo-x", Target("study", "9"),
                      [meta("e", PatientID="A"), meta("f", PatientID="B")])
    assert confirmation_word(two) == FALLBACK_WORD
    assert "2 patients" in plan_summary(two)


def _messages(window) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    window.ctx.message.connect(lambda level, text, _details: seen.append((level, text)))
    return seen


def test_delete_study_and_image_legal_hold_and_find_similar(qtbot, make_window, tmp_path):
    window, files = archive_with_studies(qtbot, make_window, tmp_path / "data", "erase",
                                         brain=False)
    archive, keys = window.archive_page, window.keys_page
    client = window.backend.client
    messages = _messages(window)
    assert len(files) == 12 and archive.erase_block_reason() == ""
    ct = next(s for s in archive.studies if s.patient_id == "H3-CT-7")
    mr = next(s for s in archive.studies if s.patient_id == "H3-MR-1")

    # the Delete… menu names the selected image, its series, study and patient
    archive.choose_study(mr.key)
    archive.view.setCurrentIndex(archive.model.index(3))
    assert archive.delete_button.isEnabled()
    archive._fill_delete_menu()
    texts = [a.text() for a in archive.delete_menu.actions()]
    assert [t.split()[1] for t in texts] == ["image", "series", "study", "every"], texts
    assert "Mouse, Minnie (H3-MR-1)" in texts[-1]

    # a study: the plan listed off the UI thread, confirmed by typing the patient ID
    archive.request_erasure("study", ct.key, "study CT chest")
    qtbot.waitUntil(lambda: archive.erase_dialog is not None, timeout=WAIT_MS)
    dialog = archive.erase_dialog
    assert archive.delete_button.isEnabled() is False  # one deletion at a time
    assert "2 images (2 files) in 1 study and 2 series" in dialog.summary.text()
    assert "Duck, Donald" in dialog.summary.text()
    assert dialog.table.rowCount() == 2 and dialog.word == "H3-CT-7"
    assert not dialog.delete_button.isEnabled()
    assert dialog.delete_button.property("danger") is True
    dialog.typed.setText("H3-CT-")
    dialog.accept()  # a wrong word deletes nothing
    assert dialog.isVisible() and not dialog.delete_button.isEnabled()
    dialog.typed.setText("H3-CT-7")
    assert dialog.delete_button.isEnabled()
    dialog.resize(760, dialog.sizeHint().height())
    assert dialog.grab().save("/tmp/radcrypt-erase-confirm.png")
    dialog.delete_button.click()
    qtbot.waitUntil(lambda: archive.last_erasure is not None and not archive.erasing,
                    timeout=WAIT_MS * 2)
    qtbot.waitUntil(lambda: len(archive.all_entries) == 10 and not archive.loading,
                    timeout=WAIT_MS)
    assert {s.patient_id for s in archive.studies} == {"H3-MR-1"}
    assert archive.last_erasure.plan.image_ids == {m.image_id for m in ct.images}
    assert any(level == "success" and "Deleted 2 images" in text for level, text in messages)
    with pytest.raises(RadcryptError, match="no image of patient"):
        client.erasure_plan(window.ctx.repo, patient="H3-CT-7")

    # an image: no word to type; the archive reloads without it
    mr = archive.studies[0]
    victim = mr.images[0]
    archive.request_erasure("image", victim.image_id, f"image {victim.name}")
    qtbot.waitUntil(lambda: archive.erase_dialog is not None, timeout=WAIT_MS)
    assert not archive.erase_dialog.typed.isVisibleTo(archive.erase_dialog)
    assert archive.erase_dialog.delete_button.isEnabled()
    archive.erase_dialog.delete_button.click()
    qtbot.waitUntil(lambda: len(archive.all_entries) == 9 and not archive.erasing
                    and not archive.loading, timeout=WAIT_MS * 2)
    assert victim.image_id not in {e.image_id for e in archive.all_entries}

    # a plan confirmed before the hold, then the owner sets the hold on the key page
    late_plan = client.erasure_plan(window.ctx.repo, image=mr.images[1].image_id)
    window.show_page("keys")
    assert keys.hold_button.isEnabled() and keys.hold_button.text() == "Set legal hold…"
    keys.hold_button.click()
    qtbot.waitUntil(lambda: window.ctx.repo.manifest.legal_hold and not keys.hold_busy,
                    timeout=WAIT_MS)
    assert keys.legal_hold and keys.hold_button.text() == "Lift legal hold…"
    assert "nothing can be deleted" in keys.hold_state.text()
    assert client.legal_hold(window.ctx.repo)
    window.resize(1280, 860)
    assert window.grab().save("/tmp/radcrypt-legal-hold-keys.png")
    window.show_page("archive")
    assert archive.legal_hold and archive.hold_banner.isVisible()
    assert len(archive.all_entries) == 9  # a new manifest, the same images: no reload
    assert not archive.delete_button.isEnabled()
    assert "legal hold" in archive.delete_button.toolTip()
    archive._fill_delete_menu()
    assert all(not a.isEnabled() for a in archive.delete_menu.actions())
    archive.choose_study(mr.key)
    assert window.grab().save("/tmp/radcrypt-legal-hold.png")
    archive.request_erasure("series", mr.series[0].key, "series T1")
    assert messages[-1][0] == "warning" and "legal hold" in messages[-1][1]
    assert archive.erase_dialog is None
    archive._erase(window.ctx.repo, late_plan)  # the core refuses it as well
    qtbot.waitUntil(lambda: not archive.erasing, timeout=WAIT_MS)
    assert messages[-1][0] == "error"
    assert messages[-1][1].startswith("Nothing was deleted: this repository is under legal "
                                      "hold")
    assert len(client.erasure_plan(window.ctx.repo, study=mr.key).images) == 9

    # lifted: deletions are possible again
    window.show_page("keys")
    keys.hold_button.click()
    qtbot.waitUntil(lambda: not window.ctx.repo.manifest.legal_hold and not keys.hold_busy,
                    timeout=WAIT_MS)
    window.show_page("archive")
    assert not archive.legal_hold and not archive.hold_banner.isVisible()
    assert archive.erase_block_reason() == ""

    # the viewer's "Find similar": the slice on screen goes to the Search page
    series = archive.studies[0].series[0]
    viewer = archive.open_series(series, 2)
    qtbot.waitUntil(lambda: viewer.canvas.stack is not None and not viewer.canvas.loading,
                    timeout=WAIT_MS)
    assert viewer.similar_action.isVisible() and viewer.similar_action.isEnabled()
    viewer.canvas.step_slice(1)
    qtbot.waitUntil(lambda: viewer.canvas.index == 3, timeout=WAIT_MS)
    with qtbot.waitSignal(archive.findSimilarRequested, timeout=WAIT_MS) as blocker:
        viewer.similar_action.trigger()
    assert blocker.args[0].image_id == series.images[3].image_id
    page = window.search_page
    assert page.query_image is not None
    assert page.query_image.image_id == series.images[3].image_id
    qtbot.waitUntil(lambda: page.task is None, timeout=WAIT_MS * 2)
    viewer.close()


def test_viewer_find_similar_follows_the_slice_on_screen(qtbot):
    """A multi-frame file whose other frames' entries are known for some frames only: the
    action follows the slice, disabled where its entry is unknown, absent for local files."""
    import numpy as np

    from app.core.types import DecodedImage
    from app.gui.viewer import ImageViewer
    from app.gui.viewer_model import ImageStack

    frames = [DecodedImage(pixels=np.full((32, 32), 10.0 * i, dtype=np.float32),
                           source_format="png") for i in range(3)]
    local = ImageViewer("local.png")
    qtbot.addWidget(local)
    local.set_stack(ImageStack.of_images(frames))
    assert not local.similar_action.isVisible()  # a local file: nothing archived to search

    known = [meta("a", frame=0, frames=3), None, meta("c", frame=2, frames=3, original="a")]
    viewer = ImageViewer("cine.dcm")
    qtbot.addWidget(viewer)
    viewer.set_stack(ImageStack.of_images(frames), 0)
    viewer.set_similar(known)
    assert viewer.similar_action.isVisible() and viewer.similar_action.isEnabled()
    with qtbot.waitSignal(viewer.findSimilarRequested, timeout=1000) as blocker:
        viewer.similar_action.trigger()
    assert blocker.args[0] is known[0]
    viewer.canvas.step_slice(1)
    assert viewer.canvas.index == 1 and not viewer.similar_action.isEnabled()
    assert "not known" in viewer.similar_action.toolTip()
    with qtbot.assertNotEmitted(viewer.findSimilarRequested):
        viewer.find_similar()
    viewer.canvas.step_slice(1)
    assert viewer.similar_action.isEnabled() and viewer.current_meta() is known[2]
