"""The demo's facade path (what `radcrypt demo` and the desktop client's demo run) makes a
repository in storage format 2, the default: its import signs the segment log with the
demo owner's throw-away identity, and searching it gives complete answers.

`radcrypt demo` itself, the whole command, is tested in tests/test_cli.py."""

from __future__ import annotations

from pathlib import Path

from app.core import client as facade
from app.core.settings import Settings


def test_prepare_demo_makes_a_format_2_repository_that_searches_complete(tmp_path: Path
                                                                          ) -> None:
    settings = Settings(store="directory", data_dir=str(tmp_path / "data"), workers=1)
    with facade.Client(settings, facade.demo_identity()) as client:
        repo, queries = client.prepare_demo(tmp_path / "demo", 8, queries=2)
        assert client.storage_format(repo) == 2
        assert repo.manifest.format == "radcrypt-manifest-v2"
        assert client.is_owner(repo)
        assert len(client.image_ids(repo)) == 8
        results = client.search_files(repo, queries, k=1)
    assert len(results) == 2
    for result in results:
        assert result.complete is True and result.segments_missing == []
        assert result.segments_expected == result.segments_searched == 1
