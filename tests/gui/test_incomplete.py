"""The search page's red banner over an incomplete answer (docs/FORMAT-2.md 6.3).

A format-2 repository of two import batches on the directory store of a private data
directory; one of its live segments is deleted from the bucket; the search page searches
it through the GUI's own backend, task runner and the real search service. The answer
comes back marked (the GUI always allows a partial answer and shows it as such): a red
banner above the results says how many segments were not searched and names them. With
the segment back, the banner goes away. A screenshot is saved for a human to look at.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from guitools import WAIT_MS
from PyQt6.QtCore import QPoint
from PyQt6.QtGui import QColor, QImage

from app.core import client as facade
from app.core.settings import Settings
from app.gui.search_page import BANNER_RED, SearchPage

try:
    from fixtures import gui_support
except ImportError:  # pragma: no cover
    from tests.fixtures import gui_support
from cloud import layout
from cloud.segments import decode_segment

PASSWORD = "quiet harbour lantern 47 violet"  # tests/owned_repos.STRONG_PASSWORD
REPO = "gui-complete"
SCREENSHOT = Path(os.environ.get("RADCRYPT_SCREENSHOT_DIR", "/tmp")) / (
    "radcrypt-incomplete-banner.png")


@pytest.fixture
def format2_repo(tmp_path: Path, sample_images: list[Path]
                 ) -> Iterator[tuple[Settings, list[Path], Path, str]]:
    """(settings, files, segment file deleted, its id): two batches of two images."""
    settings = Settings(store="directory", data_dir=str(tmp_path / "data"), workers=1)
    identity = facade.create_identity(settings, "Dr. Banner", PASSWORD)
    files = sample_images[:4]
    with facade.Client(settings, identity) as client:
        repo = client.create_repository(REPO, storage_format=2)
        report = client.import_files(repo, files, batch_size=2)
        assert len(report.imported) == 4
        store = client.session.store
        keys = sorted(store.list_keys(layout.segments_prefix(REPO)))
        names = {i: Path(p).name for p, i in report.imported}
        inside = {names[i] for i in decode_segment(store.get(keys[0]), keys[0]).id_strings()}
    path = settings.objects_dir / keys[0]
    yield settings, [f for f in files if f.name not in inside], path, \
        layout.parse_segment_key(keys[0])[1]


def _rgb_at(image: QImage, point: QPoint) -> tuple[int, int, int]:
    colour = QColor(image.pixel(point))
    return colour.red(), colour.green(), colour.blue()


def test_incomplete_answer_shows_a_red_banner(qtbot, format2_repo) -> None:
    settings, kept, segment_file, seg_id = format2_repo
    backend, ctx = gui_support.connected(settings, PASSWORD)
    page = SearchPage(ctx)
    qtbot.addWidget(page)
    page.resize(1100, 760)
    page.show()
    qtbot.waitExposed(page)
    try:
        repo = backend.open_repository(REPO)
        page.set_repository(repo)
        saved = segment_file.read_bytes()
        segment_file.unlink()
        page.set_query(str(kept[0]))
        qtbot.waitUntil(lambda: page.outcome is not None and page.task is None,
                        timeout=WAIT_MS)
        qtbot.waitUntil(lambda: ctx.runner.idle, timeout=WAIT_MS)
        result = page.outcome.result
        assert result.complete is False and result.segments_missing == [seg_id]
        assert page.banner.isVisible()
        assert page.banner.title.text() == ("INCOMPLETE ANSWER: 1 of 2 segments were "
                                            "not searched")
        assert seg_id in page.banner.text.text() and "1 missing segment:" in \
            page.banner.text.text()
        assert "(INCOMPLETE)" in page.fields["searched"].text()
        # the partial results are still shown, the exact match first
        assert page.result_names()[0] == kept[0].name
        # above the results: the banner ends before the image panels and the strip begin
        banner_bottom = page.banner.mapTo(page, QPoint(0, page.banner.height())).y()
        assert banner_bottom <= page.nearest_panel.mapTo(page, QPoint(0, 0)).y()
        assert banner_bottom <= page.strip.mapTo(page, QPoint(0, 0)).y()
        assert banner_bottom > page.drop.mapTo(page, QPoint(0, page.drop.height())).y() - 1
        qtbot.wait(50)
        shot = page.grab().toImage()
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert shot.save(str(SCREENSHOT))
        # red: the banner's own background, sampled beside its icon
        ratio = shot.width() / page.width()
        corner = page.banner.mapTo(page, QPoint(4, page.banner.height() // 2))
        pixel = _rgb_at(shot, QPoint(round(corner.x() * ratio), round(corner.y() * ratio)))
        red = QColor(BANNER_RED)
        assert np.abs(np.subtract(pixel, (red.red(), red.green(), red.blue()))).max() <= 2, \
            pixel

        segment_file.write_bytes(saved)  # the segment is back: a complete answer, once
        backend.service_client().refresh(REPO)  # the service has re-read the bucket
        page.search()
        qtbot.waitUntil(lambda: page.task is None and page.outcome is not None,
                        timeout=WAIT_MS)
        assert page.outcome.result.complete is True
        assert not page.banner.isVisible()
        assert "(INCOMPLETE)" not in page.fields["searched"].text()
    finally:
        qtbot.waitUntil(lambda: ctx.runner.idle, timeout=WAIT_MS)
        backend.close()


def test_new_repository_dialog_creates_format_2(qtbot, tmp_path: Path) -> None:
    """The New repository dialog offers storage format 2 only (format 1 is read-only), and
    creates a format-2 repository through the backend."""
    page, backend, ctx = gui_support.keys_page(qtbot, tmp_path, "Dr. Format", PASSWORD)
    try:
        dialog = page.open_new_repository()
        dialog.name.setText("two")
        assert dialog.values() == ("two", 2)  # format 2 by default
        assert dialog.storage_format.findData(1) == -1  # no new format-1 repository
        assert dialog.storage_format.count() == 1
        with qtbot.waitSignal(page.repositoryCreated, timeout=WAIT_MS) as created:
            dialog.create_button.click()
        assert created.args[0].manifest.format == "radcrypt-manifest-v2"
    finally:
        qtbot.waitUntil(lambda: ctx.runner.idle, timeout=WAIT_MS)
        backend.close()
