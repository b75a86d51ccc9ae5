"""A format-1 repository in the desktop client (docs/FORMAT-2.md 9.1): read-only.

The repository is made and filled as format-1 code did (format 1 is read-only for today's
importer), on the directory store of a private data directory, and opened through the
GUI's own backend. The Repository key page says "1 (old, read-only ...)" and offers its
owner "Upgrade storage format…"; the Import page keeps its Import button disabled and
says why in plain words, and a start anyway writes nothing. The upgrade runs the real
migration off the UI thread with progress; afterwards the page says format 2, the button
is gone, and the same files import. A screenshot of the Repository key page before the
upgrade, and one of the Import page refusing, are saved for a human to look at.
"""

from __future__ import annotations

import os
from pathlib import Path

from guitools import WAIT_MS, FakeDialogs

from app.core.access import create_repository_as
from app.core.settings import Settings
from app.gui.activity import ActivityLog
from app.gui.backend import Backend
from app.gui.context import AppContext
from app.gui.import_page import ImportPage
from app.gui.keys_page import KeysPage
from app.gui.tasks import TaskRunner
from cloud import layout

try:
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests.fixtures import format2_support as fx

PASSWORD = "quiet harbour lantern 47 violet"  # tests/owned_repos.STRONG_PASSWORD
REPO = "old-format"
SCREENSHOT = Path(os.environ.get("RADCRYPT_SCREENSHOT_DIR", "/tmp")) / (
    "radcrypt-format1-upgrade.png")
IMPORT_SCREENSHOT = SCREENSHOT.with_name("radcrypt-format1-import.png")


def test_format1_repository_is_read_only_and_its_owner_upgrades_it(
        qtbot, tmp_path: Path, sample_images: list[Path]) -> None:
    from app.gui.app import make_application

    make_application()
    settings = Settings(store="directory", data_dir=str(tmp_path / "data"), workers=1)
    backend = Backend(settings)
    backend.register("Dr. Upgrade", PASSWORD)
    backend.connect()
    client = backend.client
    assert client is not None
    store = client.session.store
    old = create_repository_as(client.session, client.identity, REPO, storage_format=1)
    fx.format1_importer(store, old, 2).run(sample_images[:3])
    dialogs = FakeDialogs()
    ctx = AppContext(backend, TaskRunner(), ActivityLog(None), dialogs=dialogs)
    keys, imports = KeysPage(ctx), ImportPage(ctx)
    for page in (keys, imports):
        qtbot.addWidget(page)
        page.resize(1000, 640)
        page.show()
    try:
        ctx.set_repository(backend.open_repository(REPO))
        assert keys.fields["format"].text().startswith("1 (old, read-only")
        assert keys.upgrade_button.isVisible() and keys.upgrade_button.isEnabled()
        shot = keys.grab().toImage()
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert shot.save(str(SCREENSHOT))

        imports.model.add([str(p) for p in sample_images[3:5]])
        imports._update()
        assert imports.read_only and not imports.start_button.isEnabled()
        assert "old storage format 1" in imports.summary.text()
        assert "Read-only" in imports.summary.text()
        assert "Upgrade storage format" in imports.summary.text()
        qtbot.wait(50)  # let the layout take the new texts before the screenshot
        assert imports.grab().toImage().save(str(IMPORT_SCREENSHOT))
        before = fx.snapshot(store)
        imports.start()  # as if clicked anyway: refused here, nothing started or written
        assert imports.task is None and fx.snapshot(store) == before

        with qtbot.waitSignal(ctx.repositoryChanged, timeout=WAIT_MS) as changed:
            keys.upgrade_storage_format()
        qtbot.waitUntil(lambda: ctx.runner.idle, timeout=WAIT_MS)
        assert dialogs.confirmations[-1][0] == "Upgrade storage format"
        upgraded = changed.args[0]
        assert upgraded.manifest.format == "radcrypt-manifest-v2"
        assert keys.fields["format"].text().startswith("2 ")
        assert not keys.upgrade_button.isVisible()
        assert not list(store.list_keys(layout.image_prefix("meta", REPO)))  # migrated
        assert len(backend.archive_ids(upgraded)) == 3  # every image still there

        assert not imports.read_only and imports.start_button.isEnabled()
        imports.start()
        qtbot.waitUntil(lambda: imports.task is None, timeout=WAIT_MS)
        report = imports.last_report
        assert report is not None and len(report.imported) == 2 and not report.failed
        assert len(backend.archive_ids(upgraded)) == 5
    finally:
        qtbot.waitUntil(lambda: ctx.runner.idle, timeout=WAIT_MS)
        backend.close()
