"""The New repository dialog offers the CKKS search mode (issue 19) with its trade-off in
one sentence; a repository created through it is in mode "ckks" (its evaluation keys
written at creation), and the result card says which mode answered. Needs H5's patches to
keys_page.py, search_page.py, client.py and access.py (/work/p17-H5-*.patch)."""

from __future__ import annotations

from pathlib import Path

from guitools import WAIT_MS

try:
    from fixtures import gui_support
except ImportError:  # pragma: no cover
    from tests.fixtures import gui_support

PASSWORD = "quiet harbour lantern 47 violet"


def test_new_repository_dialog_chooses_ckks_search(qtbot, tmp_path: Path) -> None:
    page, backend, ctx = gui_support.keys_page(qtbot, tmp_path, "Dr. Homomorphic", PASSWORD)
    try:
        dialog = page.open_new_repository()
        dialog.name.setText("encrypted-scores")
        dialog.search.setCurrentIndex(dialog.search.findData("ckks"))
        assert dialog.search_mode() == "ckks"
        assert "cannot read" in dialog.search_note.text()
        with qtbot.waitSignal(page.repositoryCreated, timeout=WAIT_MS) as created:
            dialog.create_button.click()
        repo = created.args[0]
        assert repo.manifest.search == "ckks"
        client = backend.client
        assert client is not None and client.search_mode(repo) == "ckks"
        result = client.search_features(repo, [[0.0] * repo.manifest.dim], ["q"], 1)[0]
        assert result.stats["mode"] == "ckks" and result.hits == []
        from app.gui.backend import SearchOutcome
        from app.gui.search_page import SearchPage

        search = SearchPage(ctx)
        qtbot.addWidget(search)
        search._show(SearchOutcome(result, {}, 0.0), {}, {})
        assert search.fields["searched"].text() == "0 images by encrypted scores (CKKS)"
        assert "encrypted scores it cannot read" in search.fields["searched"].toolTip()
    finally:
        qtbot.waitUntil(lambda: ctx.runner.idle, timeout=WAIT_MS)
        backend.close()
