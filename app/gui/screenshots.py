"""``python -m app.gui.screenshots DIR``: a PNG of every page, with real data.

Runs the real application offscreen against a throw-away embedded store, in private
config and data folders (nothing of the user's is read or written): registers an
identity, creates a repository, imports the demo's images (resources.series.demo_files:
the MR brain study, real DICOM series, then pydicom's sample files;
cancelling half-way, then resuming), shows the study list with the MR study's series,
searches with a perturbed copy of an archived MR slice (the demo's "Try a sample query"),
opens that series as a stack in the viewer, grants a colleague access, tests the
connection, and grabs each page on the way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

WIDTH, HEIGHT = 1280, 820
IMAGES = 72  # 36 MR series slices (12 per plane) and 36 sample files
DEMO_IMAGES = 30  # the demo window's: 15 MR slices and 15 sample files
PASSWORD = "amber river lantern 1987"


def _prepare_environment(root: Path) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        path = root / var.lower()
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)
    for var in ("RADCRYPT_STORE", "RADCRYPT_ENDPOINT", "RADCRYPT_BUCKET",
                "RADCRYPT_SERVICE_URL", "RADCRYPT_DATA_DIR"):
        os.environ.pop(var, None)


def wait_until(condition: Callable[[], bool], timeout: float = 120.0, what: str = "") -> None:
    from PyQt6.QtCore import QEventLoop
    from PyQt6.QtWidgets import QApplication

    app = QApplication.instance()
    deadline = time.monotonic() + timeout
    while not condition():
        if app is not None:
            app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or 'the application'}")
        time.sleep(0.01)


def settle(seconds: float = 0.3) -> None:
    end = time.monotonic() + seconds
    wait_until(lambda: time.monotonic() > end, seconds + 5)


class Shooter:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.made: list[Path] = []

    def __call__(self, widget: object, name: str) -> Path:
        settle(0.25)
        path = self.out / f"{name}.png"
        if not widget.grab().save(str(path)):  # type: ignore[attr-defined]
            raise RuntimeError(f"could not write {path}")
        self.made.append(path)
        print(f"  {path}")
        return path


def make_screenshots(out: Path, work: Path) -> list[Path]:
    from app.core.progress import ProgressEvent
    from app.core.settings import load_settings
    from app.gui import theme
    from app.gui.app import make_application, quiet_libraries
    from app.gui.backend import Backend
    from app.gui.context import Dialogs
    from app.gui.main_window import MainWindow
    from app.gui.viewer import open_archived
    from resources.series import demo_files, sample_query

    quiet_libraries()
    app = make_application([sys.argv[0]])
    theme.apply_theme(app, dark=False)
    shoot = Shooter(out)

    class ScriptedDialogs(Dialogs):
        def __init__(self) -> None:
            self.card: str | None = None
            self.choice: str | None = None

        def confirm(self, parent: object, title: str, text: str, ok: str) -> bool:
            return True

        def card_text(self, parent: object) -> str | None:
            return self.card

        def choose(self, parent: object, title: str, label: str, items: list[str]
                   ) -> str | None:
            return self.choice

    print("writing the demo's series and exporting sample images…")
    demo_dir = work / "demo"
    samples = demo_files(demo_dir, IMAGES)
    dialogs = ScriptedDialogs()

    def new_window() -> MainWindow:
        window = MainWindow(Backend(load_settings()), dialogs=dialogs, remember_state=False)
        window.resize(WIDTH, HEIGHT)
        window.show()
        window.start()
        return window

    def close(window: MainWindow) -> None:
        window.close()
        wait_until(lambda: window.shutdown_done, 120, "the window to close")

    window = new_window()
    identity = window.backend.identity_mode
    if identity:
        gate = window.gate
        wait_until(lambda: gate.mode == "register" and window.runner.idle, what="the gate")
        gate.name.setText("Dr. Ana Silva, Radiology")
        gate.password.setText(PASSWORD)
        gate.again.setText(PASSWORD)
        shoot(window, "01-register")
        gate.submit()
    wait_until(lambda: window.backend.connected and window.connect_task is None,
               what="the connection")
    wait_until(lambda: window.archive_page.repository_count == 0 and window.runner.idle,
               what="the empty archive")
    window.message_bar.dismiss()
    shoot(window, "12-first-steps")

    window.show_page("keys")
    dialog = window.keys_page.open_new_repository()
    dialog.name.setText("neuro-2024")
    shoot(dialog, "08-new-repository")
    dialog.create_button.click()
    wait_until(lambda: window.ctx.repo is not None, what="the repository")

    page = window.import_page
    window.show_page("import")
    page.add_paths([str(p) for p in samples])
    wait_until(lambda: len(page.model.rows) == len(samples), what="the file list")
    page.start_button.click()

    def cancel_half_way(event: object) -> None:
        if isinstance(event, ProgressEvent) and event.stage == "import" and event.done >= 10:
            page.cancel()

    assert page.task is not None
    page.task.progressed.connect(cancel_half_way)
    wait_until(lambda: page.task is None, what="the cancelled import")
    from app.gui.import_page import IMPORTED

    first_left = next((i for i, r in enumerate(page.model.rows) if r.status != IMPORTED), 0)
    page.table.scrollTo(page.model.index(max(0, first_left - 6), 0),
                        page.table.ScrollHint.PositionAtTop)
    window.message_bar.dismiss()
    shoot(window, "04-import-cancelled")
    page.resume_button.click()
    wait_until(lambda: page.task is None, what="the resumed import")

    archive = window.archive_page
    window.show_page("archive")
    # every file, and every frame of a multi-frame file, is an image of the archive
    wait_until(lambda: len(archive.all_entries) >= len(samples), what="the archive")
    mr = next(s for s in archive.studies if "MR" in s.modalities and len(s.series) > 1)
    axial = mr.series[0]
    archive.choose_study(mr.key, axial.key)
    wait_until(lambda: archive.current_series is not None
               and archive.visible_tiles() == len(archive.model.entries)
               and not window.runner.running(tracked_only=False),  # the series tiles too
               what="the series")
    window.message_bar.dismiss()
    shoot(window, "03-archive")

    made = sample_query(demo_dir, 0)  # what "Try a sample query" searches with first
    assert made is not None, "the demo holds no MR series"
    query = made[0]
    window.show_page("search")
    search = window.search_page
    search.set_query(str(query))
    wait_until(lambda: search.outcome is not None and search.task is None
               and search.query_panel.image() is not None
               and search.selected is not None
               and search.selected.image_id in search._originals, what="the search")
    shoot(window, "05-search")
    theme.apply_theme(app, dark=True)
    shoot(window, "06-search-dark")
    theme.apply_theme(app, dark=False)

    window.show_page("keywords")  # Ctrl+F: the MR images, as a study list
    keywords = window.keyword_page
    wait_until(lambda: bool(keywords.fields["modality"].present), what="the keyword values")
    keywords.set_terms({"modality": ["MR"]})
    keywords.search()
    wait_until(lambda: keywords.task is None and keywords.result is not None,
               what="the keyword search")
    keywords.choose_study(keywords.visible_studies()[0].key)
    wait_until(lambda: not window.runner.running(tracked_only=False), what="the previews")
    window.message_bar.dismiss()
    shoot(window, "05b-keyword-search")

    repo = window.ctx.repo
    assert repo is not None
    window.show_page("archive")
    viewer = archive.open_series(axial)  # at the middle slice, as a PACS opens a series
    viewer.resize(900, 760)
    wait_until(lambda: viewer.canvas.decoded is not None, what="the series viewer")
    shoot(viewer, "07-viewer")
    viewer.close()
    # a CT slice with the window presets: the losslessly compressed copy (693_J2KI is
    # lossy JPEG 2000, its artefacts would show in a brain window)
    ct = next((e for e in archive.all_entries if "693_J2KR" in e.name), None)
    if ct is not None:
        viewer = open_archived(window.ctx, window, repo, ct.image_id, ct.name, None)
        viewer.resize(900, 760)
        wait_until(lambda: viewer.canvas.decoded is not None, what="the viewer")
        viewer.apply_preset(5)  # brain
        shoot(viewer, "07b-viewer-ct")
        viewer.close()

    window.show_page("keys")
    if identity:
        from app.core.client import create_identity
        from app.core.settings import Settings

        colleague = create_identity(Settings(data_dir=str(work / "colleague")),
                                    "Dr. Jonas Berg, Neurology", PASSWORD)
        dialogs.card = colleague.card().to_json()
        window.keys_page.register_user()
        wait_until(lambda: colleague.user_id in window.keys_page.known_users,
                   what="the registration")
        dialogs.choice = colleague.user_id
        window.keys_page.grant()
        wait_until(lambda: len(window.keys_page.rows) == 2, what="the grant")
    window.message_bar.dismiss()
    shoot(window, "09-repository-key")

    window.show_page("activity")
    window.activity_page.table.selectRow(0)
    shoot(window, "10-activity")

    window.show_page("settings")
    window.settings_page.test_connection()
    wait_until(lambda: not window.settings_page.testing, what="the connection test")
    shoot(window, "11-settings")
    close(window)

    if identity:
        window = new_window()
        gate = window.gate
        wait_until(lambda: gate.mode == "unlock" and window.runner.idle, what="the gate")
        gate.password.setText("not my password")
        gate.submit()
        wait_until(lambda: bool(gate.error.text()), what="the refusal")
        shoot(window, "02-unlock-wrong-password")
        close(window)

    # The demo (python main.py --demo): its own throw-away store, and one click on
    # "Try a sample query".
    from app.gui.app import demo_settings
    from app.gui.main_window import DemoOptions

    demo_work = work / "gui-demo"
    demo_work.mkdir()
    window = MainWindow(Backend(demo_settings(demo_work), identity_mode=False),
                        dialogs=dialogs, remember_state=False,
                        demo=DemoOptions(demo_work, DEMO_IMAGES, remove_workdir=True))
    window.resize(WIDTH, HEIGHT)
    window.show()
    window.start()
    wait_until(lambda: window.ctx.repo is not None and window.runner.idle, 300,
               "the demo repository")
    window.sample_button.click()
    search = window.search_page
    wait_until(lambda: search.query_path != "" and search.outcome is not None
               and search.task is None and window.runner.idle
               and search.query_panel.image() is not None and search.selected is not None
               and search.selected.image_id in search._originals, what="the sample query")
    shoot(window, "13-demo-sample-query")
    close(window)
    return shoot.made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.gui.screenshots",
                                     description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("out", type=Path, help="folder for the PNG files")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="radcrypt-shots-"))
    try:
        _prepare_environment(work / "env")
        made = make_screenshots(out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(made)} screenshots written to {out}")
    _release_qt()
    return 0


def _release_qt() -> None:
    """Delete every top-level widget while the application still exists: left to the
    interpreter's teardown, Python destroyed them after the QApplication and the process
    ended with a segmentation fault (exit status 139) after writing every screenshot."""
    from PyQt6.QtCore import QCoreApplication, QEvent
    from PyQt6.QtWidgets import QApplication

    app = QApplication.instance()
    if app is None:
        return
    for widget in QApplication.topLevelWidgets():
        widget.close()
        widget.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete.value)
    app.processEvents()


if __name__ == "__main__":
    raise SystemExit(main())
