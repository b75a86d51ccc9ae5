"""The New repository dialog offers the search mode (issue 19) with its trade-off in one
sentence; a workstation-mode repository created through it answers a search from the
workstation, and the result card says which mode answered. Needs H7's patches to
keys_page.py, backend.py, search_page.py, client.py and access.py (the dialog's search
combo, the facade's ``search`` argument). Screenshot:
/tmp/radcrypt-new-repository-workstation.png."""

from __future__ import annotations

from pathlib import Path

from guitools import WAIT_MS

try:
    from fixtures import gui_support
except ImportError:  # pragma: no cover
    from tests.fixtures import gui_support

PASSWORD = "quiet harbour lantern 47 violet"
SHOT = Path("/tmp/radcrypt-new-repository-workstation.png")


def test_new_repository_dialog_chooses_workstation_search(qtbot, tmp_path: Path) -> None:
    page, backend, ctx = gui_support.keys_page(qtbot, tmp_path, "Dr. Workstation", PASSWORD)
    try:
        dialog = page.open_new_repository()
        dialog.name.setText("private-queries")
        assert dialog.search_mode() == "sknn"  # the default
        assert "fastest" in dialog.search_note.text()
        dialog.search.setCurrentIndex(dialog.search.findData("workstation"))
        assert dialog.search_mode() == "workstation"
        assert "sees no query" in dialog.search_note.text()
        qtbot.wait(100)  # the layout settles
        dialog.grab().save(str(SHOT))
        with qtbot.waitSignal(page.repositoryCreated, timeout=WAIT_MS) as created:
            dialog.create_button.click()
        repo = created.args[0]
        assert repo.manifest.search == "workstation"
        client = backend.client
        assert client is not None and client.search_mode(repo) == "workstation"
        result = client.search_features(repo, [[0.0] * repo.manifest.dim], ["q"], 1)[0]
        assert result.stats["mode"] == "workstation"
        # the result card says which mode answered
        from app.gui.backend import SearchOutcome
        from app.gui.search_page import SearchPage

        search = SearchPage(ctx)
        qtbot.addWidget(search)
        search._show(SearchOutcome(result, {}, 0.0), {}, {})
        assert search.fields["searched"].text() == "0 images on this workstation"
        assert "server saw no query" in search.fields["searched"].toolTip()
    finally:
        qtbot.waitUntil(lambda: ctx.runner.idle, timeout=WAIT_MS)
        backend.close()
