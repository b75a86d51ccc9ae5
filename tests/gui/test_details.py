"""GUI details from review (issue 12): contrast of the dark theme's buttons, grey tiles
that stay grey when selected, framed archive tiles, "Newest first" by the full import
time, settings that apply without a restart, the log file, and the first steps offered
by the empty archive."""

from __future__ import annotations

import json
import logging
import re
import socket
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from guitools import TEST_PASSWORD, WAIT_MS, pass_gate, wait_connected, wait_idle
from PyQt6.QtCore import QBuffer, QByteArray, QIODevice, QRect
from PyQt6.QtGui import QColor, QImage
from PyQt6.QtWidgets import QApplication, QPushButton

from app.core.meta import ImageMeta
from app.core.searcher import Hit, QueryResult
from app.core.settings import load_settings
from app.gui import theme
from app.gui.activity import ActivityLog
from app.gui.archive_page import ArchivePage, sort_entries, square_tile
from app.gui.backend import Backend, SearchOutcome
from app.gui.context import AppContext
from app.gui.search_page import STRIP_TILE, SearchPage
from app.gui.tasks import TaskRunner
from app.gui.widgets import TileDelegate, primary

# --- contrast --------------------------------------------------------------------------


def luminance(colour: QColor) -> float:
    """WCAG 2 relative luminance."""
    def channel(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    return (0.2126 * channel(colour.redF()) + 0.7152 * channel(colour.greenF())
            + 0.0722 * channel(colour.blueF()))


def contrast(a: QColor, b: QColor) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def button_rules(sheet: str) -> dict[str, dict[str, str]]:
    """QPushButton selectors of a style sheet -> their properties."""
    rules: dict[str, dict[str, str]] = {}
    sheet = re.sub(r"/\*.*?\*/", "", sheet, flags=re.S)
    for selector, body in re.findall(r"([^{}]+)\{([^}]*)\}", sheet):
        for name in (s.strip() for s in selector.split(",")):
            if name.startswith("QPushButton"):
                props = dict(re.findall(r"([\w-]+)\s*:\s*([^;]+);", body))
                rules.setdefault(name, {}).update({k: v.strip() for k, v in props.items()})
    return rules


def test_dark_theme_button_text_contrast_is_at_least_4_5(qtbot):
    """Every enabled button state of the dark style sheet, from its own colours; the
    ratio before the fix was 3.35:1 (white on #1e9aab)."""
    sheet = theme.style_sheet(theme.DARK, 10.0)
    rules = button_rules(sheet)
    base = rules["QPushButton"]
    states = {
        "normal": (base["color"], base["background"]),
        "hover": (base["color"], rules["QPushButton:hover"]["background"]),
        "pressed": (base["color"], rules["QPushButton:pressed"]["background"]),
        "primary": (rules['QPushButton[primary="true"]']["color"],
                    rules['QPushButton[primary="true"]']["background"]),
        "primary hover": (rules['QPushButton[primary="true"]']["color"],
                          rules['QPushButton[primary="true"]:hover']["background"]),
        "primary pressed": (rules['QPushButton[primary="true"]']["color"],
                            rules['QPushButton[primary="true"]:pressed']["background"]),
        "danger": (rules['QPushButton[danger="true"]']["color"], base["background"]),
        "danger hover": (rules['QPushButton[danger="true"]']["color"],
                         rules["QPushButton:hover"]["background"]),
    }
    ratios = {state: contrast(QColor(fg), QColor(bg)) for state, (fg, bg) in states.items()}
    print({k: round(v, 2) for k, v in ratios.items()})
    assert all(QColor(fg).isValid() and QColor(bg).isValid() for fg, bg in states.values())
    assert min(ratios.values()) >= 4.5, ratios
    # the palette's selection (lists, the sidebar's keyboard focus) too
    assert contrast(QColor(theme.DARK.on_primary), QColor(theme.DARK.primary)) >= 4.5


def test_dark_primary_button_as_drawn_has_4_5_contrast(qtbot):
    """The button as Qt draws it with the dark theme: its text's darkest/lightest pixel
    against its background (the most common pixel)."""
    app = QApplication.instance()
    assert isinstance(app, QApplication)
    theme.apply_theme(app, dark=True)
    try:
        button = primary(QPushButton("Create a repository"))
        qtbot.addWidget(button)
        button.resize(220, 40)
        button.show()
        qtbot.waitExposed(button)
        image = button.grab().toImage().convertToFormat(QImage.Format.Format_RGB32)
        pixels = _rgb(image)[8:-8, 8:-8].reshape(-1, 3)
        colours, counts = np.unique(pixels, axis=0, return_counts=True)
        background = QColor(*(int(v) for v in colours[counts.argmax()]))
        best = max(contrast(QColor(*(int(v) for v in c)), background) for c in colours)
        assert background.name() == theme.DARK.primary
        assert best >= 4.5, best
    finally:
        theme.apply_theme(app, dark=False)


# --- tiles -------------------------------------------------------------------------------


def _rgb(image: QImage) -> np.ndarray:
    image = image.convertToFormat(QImage.Format.Format_RGB32)
    ptr = image.constBits()
    assert ptr is not None
    ptr.setsize(image.sizeInBytes())
    raw = np.frombuffer(ptr, np.uint8).reshape(image.height(), image.bytesPerLine() // 4, 4)
    return raw[:, : image.width(), [2, 1, 0]].astype(int)  # BGRA in memory


def grey_png(seed: int, side: int = 96) -> bytes:
    """A grey-scale preview (a gradient with a square), as the importer stores them."""
    y, x = np.mgrid[0:side, 0:side]
    values = ((x * 2 + y + seed * 40) % 256).astype(np.uint8)
    values[side // 4 : side // 2, side // 4 : side // 2] = 255 - seed * 30
    image = QImage(values.tobytes(), side, side, side, QImage.Format.Format_Grayscale8)
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    assert image.save(buffer, "PNG")
    return bytes(data.data())


def tile_rect(cell: QRect, side: int) -> QRect:
    """Where TileDelegate draws the tile in an item's cell."""
    return QRect(cell.left() + (cell.width() - side) // 2, cell.top() + 6, side, side)


def page_context(qtbot) -> AppContext:
    from app.gui.app import make_application

    make_application()
    runner = TaskRunner()
    ctx = AppContext(Backend(load_settings()), runner, ActivityLog(None))
    return ctx


def test_selected_nearest_tile_keeps_its_grey_scale(qtbot):
    """The selected result in the nearest-images strip is drawn with its own pixels (grey
    stays grey: R == G == B), its selection shown by a frame in the primary colour."""
    ctx = page_context(qtbot)
    page = SearchPage(ctx)
    qtbot.addWidget(page)
    page.resize(1100, 760)
    page.show()
    qtbot.waitExposed(page)
    hits = [Hit(rank=i + 1, image_id=f"{i:02x}" * 16, name=f"image-{i}.dcm",
                distance=float(i), score=0.0, key_version=1) for i in range(3)]
    pngs = {h.image_id: grey_png(i) for i, h in enumerate(hits)}
    result = QueryResult("query.dcm", hits, {"vectors": 3}, {}, True)
    tiles = {i: square_tile(png, STRIP_TILE * 2) for i, png in pngs.items()}
    page._show(SearchOutcome(result, pngs, 1.0), {}, tiles)
    assert page.strip.currentRow() == 0
    assert isinstance(page.strip.itemDelegate(), TileDelegate)
    qtbot.wait(50)
    shot = _rgb(page.strip.viewport().grab().toImage())
    ratio = shot.shape[1] / page.strip.viewport().width()
    for row in range(3):
        cell = page.strip.visualItemRect(page.strip.item(row))
        tile = tile_rect(cell, STRIP_TILE)
        inside = shot[round((tile.top() + 2) * ratio): round((tile.bottom() - 1) * ratio),
                      round((tile.left() + 2) * ratio): round((tile.right() - 1) * ratio)]
        assert inside.size and inside.std() > 10  # the picture, not a flat fill
        spread = inside.max(axis=2) - inside.min(axis=2)
        assert spread.max() <= 1, f"row {row}: the tile is tinted (R, G, B differ by " \
                                  f"{spread.max()})"
        if row == 0:  # the selection: a frame in the primary colour around the tile
            frame = shot[round((tile.top() + tile.height() // 2) * ratio),
                         round((tile.left() - 2) * ratio)]
            chosen = QColor(theme.current_colors().primary)
            assert tuple(frame) == (chosen.red(), chosen.green(), chosen.blue())


def test_archive_tiles_are_framed_and_not_tinted_when_selected(qtbot):
    ctx = page_context(qtbot)
    page = ArchivePage(ctx)
    qtbot.addWidget(page)
    page.resize(900, 600)
    page.show()
    qtbot.waitExposed(page)
    entries = [ImageMeta(f"{i:02x}" * 16, f"image-{i}.png", "2026-01-01T00:00:0"
                         f"{i}.000000+00:00") for i in range(3)]
    page.model.set_entries(entries)
    page.stack.setCurrentWidget(page.view)
    side = round(128 * max(1.0, page.devicePixelRatioF()))
    for i, entry in enumerate(entries):
        page.model.set_tile(entry.image_id, square_tile(grey_png(i), side))
    page.view.setCurrentIndex(page.model.index(1))
    qtbot.wait(50)
    shot = _rgb(page.view.viewport().grab().toImage())
    c = theme.current_colors()
    border, chosen = QColor(c.border_strong), QColor(c.primary)
    for row in range(3):
        tile = tile_rect(page.view.visualRect(page.model.index(row)), 128)
        mid_y, mid_x = tile.top() + tile.height() // 2, tile.left() + tile.width() // 2
        colour = chosen if row == 1 else border
        want = (colour.red(), colour.green(), colour.blue())
        for y, x in ((mid_y, tile.left() - 1), (mid_y, tile.right() + 1),
                     (tile.top() - 1, mid_x), (tile.bottom() + 1, mid_x)):
            assert tuple(shot[y, x]) == want, (row, y, x)
        inside = shot[tile.top() + 1 : tile.bottom(), tile.left() + 1 : tile.right()]
        assert (inside.max(axis=2) - inside.min(axis=2)).max() <= 1, f"row {row} tinted"


# --- newest first ------------------------------------------------------------------------


def test_newest_first_orders_by_full_import_time():
    """Two images imported in the same second are ordered by their microseconds; an
    older archive's whole-second times sort among them by time, not by text."""
    same_second = "2026-11-27T04:33:08"
    entries = [
        ImageMeta("a" * 32, "zz-first.png", same_second + ".100000+00:00"),
        ImageMeta("b" * 32, "aa-second.png", same_second + ".900000+00:00"),
        ImageMeta("c" * 32, "mm-old.png", "2026-11-27T04:33:07+00:00"),
        ImageMeta("d" * 32, "no-time.png", ""),
        ImageMeta("e" * 32, "local-time.png", "2026-11-27T05:33:08.500000+01:00"),
    ]
    newest = [e.name for e in sort_entries(entries, "Newest first")]
    assert newest == ["aa-second.png", "local-time.png", "zz-first.png", "mm-old.png",
                      "no-time.png"]
    oldest = [e.name for e in sort_entries(entries, "Oldest first")]
    assert oldest == list(reversed(newest))


def test_import_records_sub_second_time(tmp_path):
    """The importer's metadata carries microseconds, so "Newest first" can tell two
    images of one second apart."""
    from app.core.importer import _metadata
    from app.imaging.worker import Analysis

    analysis = Analysis(np.zeros(4), None, "png", {}, 8, 8)
    stamps = [json.loads(_metadata(tmp_path / f"{i}.png", 10, b"\0" * 32, analysis,
                                   "radcrypt-v1"))["imported_at"] for i in range(2)]
    for stamp in stamps:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", stamp), stamp
    first, second = (datetime.fromisoformat(s) for s in stamps)
    assert first <= second <= datetime.now(timezone.utc)


# --- flows with the real embedded store ---------------------------------------------------


def test_saved_settings_apply_without_restart(qtbot, make_window):
    window = make_window()
    pass_gate(qtbot, window)
    wait_connected(qtbot, window)
    wait_idle(qtbot, window)
    client = window.backend.client
    page = window.settings_page
    window.show_page("settings")

    page.workers.setValue(1)
    page.save_button.click()
    assert window.backend.client is client  # no reconnect for a worker count
    assert client.settings.workers == 1 and window.backend.settings.workers == 1
    assert load_settings().workers == 1  # and saved

    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    page.service_url.setText(url)
    page.save_button.click()
    qtbot.waitUntil(lambda: window.backend.client is not None
                    and window.backend.client is not client and window.runner.idle,
                    timeout=WAIT_MS)
    assert window.backend.client.settings.service_url == url
    assert "Connected" in window.conn_label.text()
    from app.core.errors import RadcryptError

    with pytest.raises(RadcryptError, match=str(port)):  # the next search would use it
        window.backend.service_client().health()


def test_log_file_in_the_user_log_dir_without_secrets(qtbot, make_window):
    import platformdirs

    from app.gui import logs

    handler = logs.start_logging()
    try:
        folder = Path(platformdirs.user_log_dir("radcrypt", appauthor=False))
        assert Path(handler.baseFilename) == folder / "radcrypt.log"
        assert handler.maxBytes > 0 and handler.backupCount >= 1  # rotating
        window = make_window()
        pass_gate(qtbot, window, password=TEST_PASSWORD)
        wait_connected(qtbot, window)
        wait_idle(qtbot, window)
        logging.getLogger("radcrypt.test").warning("a value quoted: password=%s",
                                                   "hunter2-never-used")
        handler.flush()
        text = (folder / "radcrypt.log").read_text(encoding="utf-8")
        assert "Radcrypt desktop started" in text
        assert "connect: Connected to the" in text  # the activity goes there too
        assert "password=[redacted]" in text and "hunter2" not in text
        assert TEST_PASSWORD not in text  # the identity's password never got there
        assert logs.redact('secret_access_key: "abc def" and password hunter2') == (
            "secret_access_key: [redacted] and password [redacted]")
    finally:
        logs.stop_logging(handler)


def test_empty_archive_after_first_login_offers_first_steps(qtbot, make_window):
    from app.gui.main_window import TRY_DEMO_IMAGES

    window = make_window()
    pass_gate(qtbot, window)  # the first login: registers
    wait_connected(qtbot, window)
    page = window.archive_page
    qtbot.waitUntil(lambda: page.repository_count == 0 and window.runner.idle,
                    timeout=WAIT_MS)
    assert window.current_page() == "archive"
    assert page.stack.currentWidget() is page.empty_panel
    assert page.create_button.isVisible() and page.demo_button.isVisible()
    assert page.create_button.text() == "Create a repository"
    assert page.demo_button.text() == "Try the demo images"
    assert "no repository yet" in page.empty.text()

    page.create_button.click()
    assert window.current_page() == "keys"
    dialog = window.keys_page.dialog
    assert dialog is not None and dialog.isVisible()
    dialog.reject()

    window.show_page("archive")
    page.demo_button.click()
    assert not page.demo_button.isVisible()  # the page says what is happening instead
    qtbot.waitUntil(lambda: window.ctx.repo is not None, timeout=WAIT_MS * 3)
    repo = window.ctx.repo
    assert repo.repo_id.startswith("demo-")
    qtbot.waitUntil(lambda: len(page.all_entries) == TRY_DEMO_IMAGES, timeout=WAIT_MS)
    assert window.backend.client.access_list(repo)[0].user_id == window.backend.user_id
    assert window.ctx.demo_queries is not None and any(window.ctx.demo_queries.iterdir())
    qtbot.waitUntil(lambda: window.repo_combo.findData(repo.repo_id) > 0, timeout=WAIT_MS)
