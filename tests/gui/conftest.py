"""Fixtures for the desktop client's tests (pytest-qt, offscreen).

Sections: Qt platform (set before Qt is imported), sample images, windows.

Every window talks to a real embedded store (SeaweedFS) and, when a search needs it, a
real search service process, in the private data directory that tests/conftest.py's
autouse ``isolated_env`` gives each test. Windows are always closed through their own
shutdown path, which stops both.
"""

from __future__ import annotations

import os

# --- Qt platform ------------------------------------------------------------------------
# Must happen before PyQt6 creates the QApplication (pytest-qt creates it lazily).
os.environ["QT_QPA_PLATFORM"] = "offscreen"
os.environ.setdefault("QT_LOGGING_RULES", "qt.qpa.*=false")

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.gui.app import quiet_libraries

quiet_libraries()

# --- sample images -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """30 distinct real images (DICOM, PNG, TIFF, JPEG) exported from pydicom's test
    files, once per session; tests must not modify them."""
    from resources.samples import export_sample_images

    return export_sample_images(tmp_path_factory.mktemp("samples"), 30)


@pytest.fixture(scope="session")
def query_image(sample_images: list[Path], tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[Path, str]:
    """A noisy copy of one archived image and the name of that original."""
    from resources.samples import perturb_file

    original = sample_images[2]
    query = perturb_file(original, tmp_path_factory.mktemp("queries"), "noise", seed=7)
    return query, original.name


# --- windows -------------------------------------------------------------------------------


@pytest.fixture
def dialogs() -> object:
    from guitools import FakeDialogs

    return FakeDialogs()


@pytest.fixture
def make_window(qtbot: object, dialogs: object) -> Iterator[Callable[..., object]]:
    """``make_window(identity_mode=True, demo=None)``: a started MainWindow on this
    test's data directory; every window made is shut down cleanly after the test."""
    from guitools import close_window, new_window

    made: list[object] = []

    def make(**kwargs: object) -> object:
        window = new_window(qtbot, dialogs, **kwargs)
        made.append(window)
        return window

    yield make
    for window in made:
        close_window(qtbot, window, dialogs)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """pydicom warns about quirks of its own test files while they are exported; not ours."""
    for item in items:
        if "tests/gui/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*"))
