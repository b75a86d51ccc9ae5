"""The desktop client on a real X server: Xvfb and Qt's xcb platform, not offscreen.

Why: a desktop user gets the xcb platform, whose plugin needs libraries (libxcb-cursor0 and
others) that the offscreen platform does not; `make system-deps` installs them and Xvfb. The
test starts Xvfb on a display number it picks itself (`-displayfd`: the first free one), runs
tests/gui/xcb_flow.py in a child process with QT_QPA_PLATFORM=xcb on that display (register
an identity through the gate page, wait for the storage, grab the window and the X
framebuffer, close through the window's own shutdown path), checks the grabs, and stops
Xvfb by its pid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PyQt6.QtGui import QColor, QImage

PROJECT = Path(__file__).resolve().parents[2]
FLOW = Path(__file__).with_name("xcb_flow.py")
SCREEN = (1280, 900)


@pytest.fixture
def xvfb_display() -> Iterator[str]:
    """A running Xvfb: yields ':N'; stopped by pid afterwards."""
    xvfb = shutil.which("Xvfb")
    assert xvfb, "Xvfb is not installed: run `make system-deps` (Debian/Ubuntu package xvfb)"
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [xvfb, "-displayfd", str(write_end), "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24",
         "-nolisten", "tcp"],
        pass_fds=(write_end,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as reader:
            number = reader.readline().decode().strip()  # written once the server is ready
        assert number.isdigit(), (
            f"Xvfb did not report a display: {process.stderr.read().decode()[-1000:]}"
            if process.stderr else "Xvfb did not report a display")
        yield f":{number}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        if process.stderr:
            process.stderr.close()
    assert process.returncode is not None


def _distinct_colours(image: QImage, step: int = 4) -> int:
    return len({image.pixel(x, y) for x in range(0, image.width(), step)
                for y in range(0, image.height(), step)})


def test_gui_flow_on_xvfb_with_the_xcb_platform(xvfb_display: str, tmp_path: Path) -> None:
    out = tmp_path / "grabs"
    out.mkdir()
    env = dict(os.environ)
    env.update({"QT_QPA_PLATFORM": "xcb", "DISPLAY": xvfb_display,
                "PYTHONPATH": os.pathsep.join([str(PROJECT), str(FLOW.parent)]),
                "QT_DEBUG_PLUGINS": "0"})
    env.pop("WAYLAND_DISPLAY", None)
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(FLOW), str(out)], cwd=PROJECT, env=env,
                            capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    assert result.returncode == 0, (
        f"the xcb flow failed (exit {result.returncode}) after {seconds:.1f} s:\n"
        f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    facts = dict(line.split(" ", 1) for line in (out / "facts.txt").read_text().splitlines())
    assert facts["platform"] == "xcb"
    assert facts["screen"] == f"{SCREEN[0]}x{SCREEN[1]}"
    assert facts["user"] == "Dr. Xcb"
    x, y, width, height = (int(v) for v in facts["window"].split())
    assert width > 400 and height > 300

    window = QImage(str(out / "window.png"))
    assert not window.isNull() and window.width() > 400
    assert _distinct_colours(window) > 20  # a drawn workspace, not an empty surface

    # The X server's own framebuffer holds the window: the area it covers is drawn, the
    # root window around it is Xvfb's uniform background.
    screen = QImage(str(out / "screen.png"))
    assert (screen.width(), screen.height()) == SCREEN
    inside = screen.copy(max(x, 0), max(y, 0), min(width, SCREEN[0]), min(height, SCREEN[1]))
    assert _distinct_colours(inside) > 20
    corners = {QColor(screen.pixel(px, py)).name()
               for px, py in ((SCREEN[0] - 1, SCREEN[1] - 1), (SCREEN[0] - 2, SCREEN[1] - 5))}
    assert len(corners) == 1
