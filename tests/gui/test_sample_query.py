""""Try a sample query" in the demo: one click searches the demo repository with a perturbed
copy of one of its MR slices and shows the original as the nearest image.

A real demo window (embedded store, search service, the MR brain series of
resources/series.py); the screenshot is saved to /tmp/radcrypt-sample-query.png.
"""

from __future__ import annotations

from guitools import WAIT_MS

from app.gui.main_window import SAMPLE_QUERY, DemoOptions

SCREENSHOT = "/tmp/radcrypt-sample-query.png"


def test_one_click_searches_with_a_perturbed_series_slice_and_finds_it(qtbot, make_window,
                                                                        tmp_path):
    workdir = tmp_path / "demo"
    workdir.mkdir()
    window = make_window(demo=DemoOptions(workdir, count=20, remove_workdir=True))
    window.resize(1280, 820)
    assert not window.sample_button.isVisibleTo(window)  # nothing to search yet
    qtbot.waitUntil(lambda: window.ctx.repo is not None and window.runner.idle,
                    timeout=WAIT_MS * 2)
    assert window.sample_button.isVisibleTo(window)
    assert window.sample_button.text() == SAMPLE_QUERY and window.sample_action.isEnabled()

    page = window.search_page
    window.sample_button.click()
    qtbot.waitUntil(lambda: page.query_path.startswith(str(workdir / "queries")),
                    timeout=WAIT_MS)
    assert window.current_page() == "search"
    query = page.query_path
    qtbot.waitUntil(lambda: page.outcome is not None and window.runner.idle, timeout=WAIT_MS)
    best = page.outcome.result.hits[0]
    # "mni152-t1-axial-02-noise-0.png" is a noisy copy of "mni152-t1-axial-02.dcm"
    original = query.rsplit("/", 1)[-1].rsplit("-", 2)[0] + ".dcm"
    assert original.startswith("mni152-t1-"), query
    assert best.name == original, (query, [h.name for h in page.outcome.result.hits])
    assert "Sample query" in window.message_bar.text.text()
    qtbot.wait(300)
    assert window.grab().save(SCREENSHOT)

    window.sample_button.click()  # the next click takes another slice (another plane)
    qtbot.waitUntil(lambda: page.query_path != query, timeout=WAIT_MS)
    assert "-coronal-" in page.query_path and "-axial-" in query
    qtbot.waitUntil(lambda: page.outcome is not None and window.runner.idle, timeout=WAIT_MS)
