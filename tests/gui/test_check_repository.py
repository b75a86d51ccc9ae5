"""Settings -> "Check repository": the check of the open repository runs off the UI
thread with its progress, and its result is said in plain words (clean, then with a
segment the cloud lost). A screenshot of the page with the problem shown is saved to
/tmp/radcrypt-check-repository.png for the issue's reviewers.
"""

from __future__ import annotations

from guitools import (
    WAIT_MS,
    Heartbeat,
    create_repository,
    import_files,
    pass_gate,
)

from app.core.progress import ProgressEvent
from cloud import layout

SCREENSHOT = "/tmp/radcrypt-check-repository.png"


def test_check_repository_from_settings(qtbot, make_window, sample_images):
    window = make_window()
    pass_gate(qtbot, window)
    page = window.settings_page
    window.show_page("settings")
    assert not page.check_button.isEnabled()  # no repository open yet
    assert "Open a repository" in page.check_intro.text()
    create_repository(qtbot, window, "checked")
    import_files(qtbot, window, sample_images[:3])
    importing = window.import_page
    importing.start_button.click()
    qtbot.waitUntil(lambda: importing.task is None, timeout=WAIT_MS)

    window.show_page("settings")
    assert page.check_button.isEnabled() and "“checked”" in page.check_intro.text()
    stages: list[str] = []
    heartbeat = Heartbeat(20)
    heartbeat.start()
    page.check_button.click()
    assert page.check_task is not None and not page.check_button.isEnabled()
    assert page.check_progress.isVisible()
    page.check_task.progressed.connect(
        lambda e: stages.append(e.stage) if isinstance(e, ProgressEvent) else None)
    qtbot.waitUntil(lambda: page.check_task is None, timeout=WAIT_MS)
    longest = heartbeat.stop()
    assert longest < 1000, f"the UI thread stalled for {longest:.0f} ms during the check"
    assert page.check_report is not None and page.check_report.ok
    text = page.check_text()
    assert text.startswith("No problems: the repository is whole. 3 images, 1 index "
                           "segment and 1 pack checked"), text
    assert page.check_result.isVisible() and not page.check_progress.isVisible()
    assert page.check_button.isEnabled() and page.check_button.text() == "Check repository"
    assert "packs" in stages or "segments" in stages

    # the cloud loses the segment: the next check says so, naming it
    session = window.backend.session
    assert session is not None
    (segment_key,) = list(session.store.list_keys(layout.segments_prefix("checked")))
    session.store.delete(segment_key)
    page.check_button.click()
    qtbot.waitUntil(lambda: page.check_task is None, timeout=WAIT_MS)
    text = page.check_text()
    seg_id = segment_key.rsplit("/", 1)[-1]
    # the segment, and each of its images now in a pack but never found by a search
    assert text.startswith("4 problems found"), text
    assert f"• segment {seg_id} (log entry 1): missing" in text
    assert text.count("unpaired: in pack") == 3
    assert page.check_report is not None and not page.check_report.ok
    page.resize(1100, 800)
    qtbot.wait(50)
    assert page.grab().save(SCREENSHOT)
