"""Light and dark palettes that follow the system, the style sheet, and the icons.

PyQt6 has no resource compiler: the style sheet and the SVG icons ship as package data of
``resources`` and are read with importlib.resources. Icons are drawn in ``currentColor``;
they are tinted with the palette's text colour when loaded, so they read well on both
palettes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from string import Template
from typing import Any

from PyQt6.QtCore import QByteArray, QObject, QSize, Qt
from PyQt6.QtGui import QColor, QGuiApplication, QIcon, QPainter, QPalette, QPixmap
from PyQt6.QtSvg import QSvgRenderer
from PyQt6.QtWidgets import QApplication

ACCENT = "#17808f"


@dataclass(frozen=True)
class Colors:
    """The colours of one scheme; the style sheet's $names are these fields."""

    dark: bool
    window: str
    panel: str
    base: str
    alternate: str
    button: str
    text: str
    muted: str
    disabled: str
    border: str
    border_strong: str
    hover: str
    pressed: str
    accent: str
    accent_hover: str
    accent_soft: str
    accent_text: str
    accent_disabled: str
    primary: str  # the background of primary buttons and selections; on_primary on it
    primary_hover: str  # is at least 4.5:1 (WCAG AA), tests/gui/test_details.py
    on_primary: str
    danger: str
    success: str
    warning: str
    error_bg: str
    error_border: str
    warning_bg: str
    warning_border: str
    info_bg: str
    info_border: str


LIGHT = Colors(
    dark=False, window="#f3f5f7", panel="#e9edf1", base="#ffffff", alternate="#f6f8fa",
    button="#ffffff", text="#1d2329", muted="#5d6b78", disabled="#a3adb7",
    border="#d5dce3", border_strong="#b9c3cd", hover="#dfe6ec", pressed="#cfd8e0",
    accent=ACCENT, accent_hover="#13707d", accent_soft="#d3ecef", accent_text="#0d5560",
    accent_disabled="#9cc8ce", primary=ACCENT, primary_hover="#13707d",
    on_primary="#ffffff", danger="#b3261e", success="#1e7b34", warning="#8a5a00",
    error_bg="#fbe9e7", error_border="#e8aaa4", warning_bg="#fff4dc",
    warning_border="#e8cf8e", info_bg="#e4f2f4", info_border="#a9d3d9",
)

DARK = Colors(
    dark=True, window="#1b1e22", panel="#22262b", base="#15171a", alternate="#1c1f23",
    button="#2a2f35", text="#e3e7eb", muted="#9aa6b2", disabled="#5b6570",
    border="#343a41", border_strong="#48505a", hover="#30363d", pressed="#3a424a",
    accent="#1e9aab", accent_hover="#25adbf", accent_soft="#1d3f45", accent_text="#9fe0e9",
    accent_disabled="#2b5a61", primary="#157a88", primary_hover="#126d7a",
    on_primary="#ffffff", danger="#f2867c", success="#71c98a", warning="#e5b758",
    error_bg="#3b2224", error_border="#6e3a3a", warning_bg="#3a3120",
    warning_border="#6b5a2f", info_bg="#1d3236", info_border="#2f5b62",
)


def system_is_dark() -> bool:
    """Whether the desktop asks for a dark scheme (Qt 6.5+ style hints)."""
    hints = QGuiApplication.styleHints()
    if hints is None:
        return False
    return hints.colorScheme() == Qt.ColorScheme.Dark


def current_colors() -> Colors:
    app = QApplication.instance()
    dark = bool(app.property("radcryptDark")) if app is not None else False
    return DARK if dark else LIGHT


def _palette(c: Colors) -> QPalette:
    p = QPalette()
    roles = {
        QPalette.ColorRole.Window: c.window,
        QPalette.ColorRole.WindowText: c.text,
        QPalette.ColorRole.Base: c.base,
        QPalette.ColorRole.AlternateBase: c.alternate,
        QPalette.ColorRole.ToolTipBase: c.panel,
        QPalette.ColorRole.ToolTipText: c.text,
        QPalette.ColorRole.PlaceholderText: c.muted,
        QPalette.ColorRole.Text: c.text,
        QPalette.ColorRole.Button: c.button,
        QPalette.ColorRole.ButtonText: c.text,
        QPalette.ColorRole.BrightText: "#ffffff",
        QPalette.ColorRole.Highlight: c.primary,
        QPalette.ColorRole.HighlightedText: c.on_primary,
        QPalette.ColorRole.Link: c.accent,
        QPalette.ColorRole.Mid: c.border_strong,
        QPalette.ColorRole.Midlight: c.border,
        QPalette.ColorRole.Dark: c.border_strong,
        QPalette.ColorRole.Light: c.base,
        QPalette.ColorRole.Shadow: "#000000",
    }
    for role, colour in roles.items():
        p.setColor(role, QColor(colour))
    for role in (QPalette.ColorRole.Text, QPalette.ColorRole.WindowText,
                 QPalette.ColorRole.ButtonText):
        p.setColor(QPalette.ColorGroup.Disabled, role, QColor(c.disabled))
    return p


@lru_cache(maxsize=1)
def _style_template() -> Template:
    text = resources.files("resources").joinpath("style.qss").read_text(encoding="utf-8")
    return Template(text)


def style_sheet(c: Colors, font_pt: float) -> str:
    values = {k: v for k, v in c.__dict__.items() if isinstance(v, str)}
    values["font_size"] = f"{font_pt:.1f}pt"
    values["title_size"] = f"{font_pt * 1.45:.1f}pt"
    return _style_template().substitute(values)


def apply_theme(app: QApplication, dark: bool | None = None) -> Colors:
    """Fusion style with our palette and style sheet; ``dark`` None follows the system."""
    if dark is None:
        dark = system_is_dark()
    colors = DARK if dark else LIGHT
    # Fusion once per application, by name (Qt creates and owns it). Not by comparing
    # app.style().name(): once a style sheet is set, app.style() is Qt's style-sheet proxy
    # whose name is "", so every theme change replaced the style under live widgets, and a
    # full `make test` crashed (SIGSEGV) inside setStyle twice on 2026-11-27.
    if app.property("radcryptFusion") is not True:
        app.setStyle("Fusion")
        app.setProperty("radcryptFusion", True)
    app.setProperty("radcryptDark", dark)
    app.setPalette(_palette(colors))
    font = app.font()
    point = font.pointSizeF() if font.pointSizeF() > 0 else 10.0
    app.setStyleSheet(style_sheet(colors, max(9.5, min(point, 11.0))))
    icon.cache_clear()
    _notify()
    return colors


class ThemeFollower(QObject):
    """Re-applies the theme when the system switches between light and dark."""

    def __init__(self, app: QApplication) -> None:
        super().__init__(app)
        self._app = app
        hints = QGuiApplication.styleHints()
        if hints is not None:
            hints.colorSchemeChanged.connect(self._changed)

    def _changed(self, _scheme: Qt.ColorScheme) -> None:
        apply_theme(self._app)


# --- re-tinting on a palette change ---------------------------------------------------------
# Icons are pixmaps tinted for one palette; widgets that show them register here and are
# re-tinted when the system switches between light and dark.

_ICON_TARGETS: list[tuple[weakref.ref[Any], str]] = []
_CALLBACKS: list[weakref.WeakMethod[Callable[[], None]]] = []


def themed(target: Any, name: str) -> Any:
    """Give ``target`` (a button or an action) icon ``name``, kept tinted for the palette."""
    target.setIcon(icon(name))
    _ICON_TARGETS.append((weakref.ref(target), name))
    return target


def on_change(method: Callable[[], None]) -> None:
    """Call the bound ``method`` after each palette change (for hand-drawn pixmaps)."""
    _CALLBACKS.append(weakref.WeakMethod(method))


def _notify() -> None:
    alive_targets = []
    for ref, name in _ICON_TARGETS:
        target = ref()
        if target is None:
            continue
        try:
            target.setIcon(icon(name))
        except RuntimeError:  # the Qt object is gone
            continue
        alive_targets.append((ref, name))
    _ICON_TARGETS[:] = alive_targets
    alive_callbacks = []
    for weak in _CALLBACKS:
        method = weak()
        if method is None:
            continue
        try:
            method()
        except RuntimeError:
            continue
        alive_callbacks.append(weak)
    _CALLBACKS[:] = alive_callbacks


def _svg_bytes(name: str, colour: str) -> bytes:
    text = resources.files("resources").joinpath(f"icon_{name}.svg").read_text(encoding="utf-8")
    return text.replace("currentColor", colour).encode()


def render_svg(name: str, size: int, colour: str | None = None, dpr: float = 2.0) -> QPixmap:
    """A crisp pixmap of icon ``name`` at ``size`` logical pixels (rendered at ``dpr``)."""
    colour = colour or current_colors().text
    renderer = QSvgRenderer(QByteArray(_svg_bytes(name, colour)))
    pixmap = QPixmap(QSize(round(size * dpr), round(size * dpr)))
    pixmap.fill(Qt.GlobalColor.transparent)
    painter = QPainter(pixmap)
    renderer.render(painter)
    painter.end()
    pixmap.setDevicePixelRatio(dpr)
    return pixmap


@lru_cache(maxsize=256)
def icon(name: str, colour: str | None = None) -> QIcon:
    """An icon from resources/icon_<name>.svg tinted for the current palette."""
    c = current_colors()
    normal = colour or c.text
    result = QIcon()
    for size in (16, 20, 24, 32):
        result.addPixmap(render_svg(name, size, normal), QIcon.Mode.Normal)
        result.addPixmap(render_svg(name, size, c.disabled), QIcon.Mode.Disabled)
    return result


def logo_pixmap(size: int) -> QPixmap:
    return render_svg("logo", size, "#000000")
