"""Shared steps of the H3 archive tests: a window with a repository holding real CT and MR
studies (tests/gui/series_data.py), imported through the Import page as a user would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from guitools import WAIT_MS, create_repository, import_files, pass_gate
from series_data import write_brain_study, write_ct_study, write_mr_series


def study_files(root: Path, brain: bool = True) -> list[Path]:
    files = write_mr_series(root / "mr") + write_ct_study(root / "ct")
    if brain:
        files += write_brain_study(root / "brain")
    return files


def archive_with_studies(qtbot: Any, make_window: Any, root: Path, name: str,
                         brain: bool = True) -> tuple[Any, list[Path]]:
    """A started window whose open repository holds the studies, the archive loaded."""
    files = study_files(root, brain)
    window = make_window()
    pass_gate(qtbot, window)
    create_repository(qtbot, window, name)
    import_files(qtbot, window, files)
    page = window.import_page
    page.start_button.click()
    qtbot.waitUntil(lambda: page.task is None, timeout=WAIT_MS * 2)
    assert page.last_report is not None and not page.last_report.failed, \
        page.last_report.failed if page.last_report else "no import report"
    archive = window.archive_page
    window.show_page("archive")
    qtbot.waitUntil(lambda: len(archive.all_entries) == len(files) and not archive.loading,
                    timeout=WAIT_MS)
    return window, files
