"""Grouped search results on the Search page (issue 15): neighbouring slices of one series
collapse into its best hit with "N more from this series" (expandable), so the strip names
different series; the result names instance and frame; "Group by series" off shows the
plain top-k; "Find similar" searches with an archived image's stored features (from the
Archive page once /work/p15-h3-main_window.patch wires it).

Real data: an MR series of ten real slices and a CT study of two series (tests/gui/
series_data.py), queried with a noisy copy of one MR slice.
Screenshot: /tmp/radcrypt-grouped-results.png.
"""

from __future__ import annotations

from archive_flow import archive_with_studies
from guitools import WAIT_MS

from app.core.searcher import Hit, HitGroup, QueryResult
from app.gui.search_page import StripRow, hit_caption, strip_rows
from app.gui.widgets import SUBTITLE_ROLE
from resources.samples import perturb_file


def hit(rank: int, series: str, instance: int) -> Hit:
    meta = {"name": f"s{series}-{instance}.dcm",
            "clinical": {"SeriesInstanceUID": series, "StudyInstanceUID": "1",
                         "InstanceNumber": str(instance)}}
    return Hit(rank, f"{rank:032x}", meta["name"], float(rank), 0.0, 1, meta,
               series_key=series)


def test_strip_rows_show_each_series_once_and_expand_in_place():
    a1, a2, b1, a3 = hit(1, "A", 5), hit(2, "A", 6), hit(3, "B", 1), hit(4, "A", 4)
    groups = [HitGroup(1, "A", a1, [a2, a3]), HitGroup(2, "B", b1)]
    result = QueryResult("q", [a1, a2, b1], {}, {}, True, grouped=True, groups=groups)
    assert strip_rows(result, True, set()) == [StripRow(a1, groups[0]), StripRow(b1, groups[1])]
    expanded = strip_rows(result, True, {"A"})
    assert [r.hit.rank for r in expanded] == [1, 2, 4, 3]
    assert [r.member for r in expanded] == [False, True, True, False]
    assert [r.hit.rank for r in strip_rows(result, False, set())] == [1, 2, 3]
    assert hit_caption(a1) == "sA-5.dcm · instance 5"
    cine = Hit(1, "c" * 32, "cine.dcm", 0.0, 0.0, 1,
               {"name": "cine.dcm", "frame": 2, "frames": 10, "original": "d" * 32,
                "clinical": {"InstanceNumber": "7"}})
    assert hit_caption(cine) == "cine.dcm · instance 7, frame 3/10"


def test_search_groups_hits_of_one_series_and_names_instance(qtbot, make_window, tmp_path):
    window, files = archive_with_studies(qtbot, make_window, tmp_path / "data", "grouped",
                                         brain=False)
    mr = sorted(f for f in files if f.parent.name == "mr")
    query = perturb_file(mr[4], tmp_path / "queries", "noise", seed=11)
    page = window.search_page
    window.show_page("search")
    page.k_spin.setValue(3)
    page.set_query(str(query))
    qtbot.waitUntil(lambda: page.outcome is not None and page.task is None,
                    timeout=WAIT_MS * 2)
    result = page.outcome.result
    assert result.grouped and result.groups, "the facade did not group the answer"
    keys = [g.series_key for g in result.groups]
    assert len(keys) == len(set(keys)) == min(3, len({g.series_key for g in result.groups}))
    assert len(result.groups) == 3  # the MR series and the two CT series
    assert page.strip.count() == len(result.groups)  # each series once
    assert page.strip_label.text() == "Nearest 3 series"
    best = result.groups[0]
    assert best.best.name == mr[4].name and best.best.rank == 1
    assert "instance 5" in page.nearest_caption.text()
    assert page.fields["instance"].full_text() == "instance 5"
    assert best.more >= 1, "neighbouring MR slices were expected among the nearest"
    assert page.more_button.isVisible()
    assert page.more_button.text() == f"Show the {best.more} more from this series"
    assert page.strip.item(0).data(SUBTITLE_ROLE) == f"▸ {best.more} more"
    assert page.fields["rank"].full_text() == "1 of 3"

    window.resize(1280, 900)
    qtbot.wait(200)
    window.grab().save("/tmp/radcrypt-grouped-results.png")

    page.more_button.click()  # expand: the others of the series right after its best
    assert page.strip.count() == len(result.groups) + best.more
    members = [page.rows[i] for i in range(1, 1 + best.more)]
    assert all(r.member and r.group is best for r in members)
    assert page.strip.item(1).data(SUBTITLE_ROLE) == "↳ same series"
    assert page.strip.item(0).data(SUBTITLE_ROLE) == f"▾ {best.more} more"
    qtbot.waitUntil(lambda: all(r.hit.image_id in page._tiles for r in page.rows),
                    timeout=WAIT_MS)
    page.strip.setCurrentRow(1)
    assert page.selected is members[0].hit
    assert page.nearest_caption.text().startswith(f"Rank {members[0].hit.rank} · mr-")
    page.strip.setCurrentRow(0)
    qtbot.wait(200)
    window.grab().save("/tmp/radcrypt-grouped-results-expanded.png")

    # the best hit opens as its series' stack, at its own slice
    page.open_full_button.click()
    qtbot.waitUntil(lambda: page.viewer is not None and page.viewer.canvas.stack is not None,
                    timeout=WAIT_MS)
    assert page.viewer.canvas.slice_count == 10 and page.viewer.canvas.index == 4
    qtbot.waitUntil(lambda: page.viewer.loader.idle, timeout=WAIT_MS)
    page.viewer.close()

    page.group_check.setChecked(False)  # the plain top-k
    assert page.strip.count() == len(result.hits) == 3
    assert page.strip_label.text() == "Nearest 3 images"
    page.group_check.setChecked(True)
    assert page.strip.count() == len(result.groups) + best.more  # still expanded
    page.expand_group(best.series_key, False)
    assert page.strip.count() == len(result.groups)


def test_find_similar_searches_with_an_archived_image(qtbot, make_window, tmp_path):
    window, _ = archive_with_studies(qtbot, make_window, tmp_path / "data", "similar",
                                         brain=False)
    archive = window.archive_page
    mr = next(s for s in archive.studies if s.patient_name == "Mouse^Minnie")
    target = mr.series[0].images[4]
    page = window.search_page
    window.show_page("search")
    page.k_spin.setValue(2)
    page.find_similar(target)
    assert "(archived, instance 5)" in page.query_caption.text()
    qtbot.waitUntil(lambda: page.outcome is not None and page.task is None,
                    timeout=WAIT_MS * 2)
    hits = page.outcome.result.hits
    assert hits and target.image_id not in {h.image_id for h in hits}  # not itself
    best = page.outcome.result.groups[0]
    assert best.series_key == mr.series[0].key  # its own series' neighbours come first
    qtbot.waitUntil(lambda: page.query_panel.image() is not None, timeout=WAIT_MS)
    assert page.compare_button.isEnabled()

    # the main window's wiring (/work/p15-h3-main_window.patch): "Find similar" on the
    # Archive page switches to the Search page, which searches with that image
    window.show_page("archive")
    archive.choose_study(mr.key)
    archive.view.setCurrentIndex(archive.model.index(6))
    archive.similar_button.click()
    assert window.current_page() == "search"
    qtbot.waitUntil(lambda: page.outcome is not None and page.task is None,
                    timeout=WAIT_MS * 2)
    assert page.query_image is not None
    assert page.query_image.image_id == archive.model.entries[6].image_id
    assert page.outcome.result.hits

