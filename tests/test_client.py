"""The client facade (app/core/client.py), end to end, in a process where Qt cannot load.

The facade is what both front ends call; it must work on a machine without the gui extra.
The test runs a child Python whose import system refuses PyQt6 (a meta path finder that
raises ImportError for it), and which drives every use case through the facade on the
in-memory store (moto, inside the child): identity create/unlock/passwd, repositories,
import with progress, list (ImageMeta), search by files and by features, previews, get to
a path and to a stream, access (register, grant, list, revoke with progress), diagnostics
and the wrong-password / unknown-repository errors. The child reports what it saw as JSON
and whether PyQt6 (or any module under app.gui) was ever imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

try:
    import e2e_support as support
    import owned_repos
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos

CHILD = textwrap.dedent(r'''
    import io, json, sys
    from pathlib import Path

    class NoQt:
        """Refuses PyQt6 as a machine without the gui extra would."""
        def find_spec(self, name, path=None, target=None):
            if name == "PyQt6" or name.startswith("PyQt6."):
                raise ImportError(f"PyQt6 is blocked in this test ({name})")
            return None

    sys.meta_path.insert(0, NoQt())

    from app.core import client as facade
    from app.core.client import Client, ImageMeta
    from app.core.errors import Cancelled, RepositoryNotFound, WrongPassword
    from app.core.progress import CancelToken
    from app.core.settings import Settings

    work, password, other_password = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    files = [Path(p) for p in sys.argv[4:]]
    out = {}
    settings = Settings(store="memory", data_dir=str(work / "owner"), workers=1)
    assert not facade.identity_exists(settings)
    facade.create_identity(settings, "Dr. Owner", password)
    try:
        facade.unlock_identity(settings, "not the password at all")
    except WrongPassword as exc:
        out["wrong_password"] = str(exc)
    facade.change_identity_password(settings, password, other_password)
    try:
        facade.unlock_identity(settings, password)
        out["old_password_still_works"] = True
    except WrongPassword:
        out["old_password_still_works"] = False
    reader = facade.create_identity(Settings(store="memory", data_dir=str(work / "reader")),
                                    "Dr. Reader", password)

    with Client.unlock(settings, other_password) as client:
        out["where"] = client.where()
        out["memory_store"] = client.memory_store
        repo = client.create_repository("facade-repo")
        events = []
        report = client.import_files(repo, files, progress=events.append)
        out["imported"] = len(report.imported)
        out["import_events"] = len(events)
        out["repositories"] = [m.repo_id for m in client.list_repositories()]
        images = client.list_images(repo)
        assert all(isinstance(m, ImageMeta) for m in images)
        out["listed"] = sorted(m.name for m in images)
        out["listed_errors"] = [m.error for m in images if m.error]
        first = next(m for m in images if m.name == files[0].name)
        meta = client.image_meta(repo, first.image_id)
        out["meta_has_features"] = len(meta.features)
        out["meta_size"] = meta.size == files[0].stat().st_size
        search_events = []
        results = client.search_files(repo, files[:2], k=2, progress=search_events.append)
        out["search_top"] = [r.hits[0].name for r in results]
        out["search_top_distance"] = [r.hits[0].distance for r in results]
        out["search_stages"] = sorted({e.stage for e in search_events})
        out["hit_meta_name"] = client.hit_meta(results[0].hits[0]).name
        by_features = client.search_features(repo, client.features([files[1]],
                                             repo.manifest.extractor), ["q"], k=1)
        out["features_top"] = by_features[0].hits[0].name
        thumbs = client.thumbnails(repo, results[0].hits)
        out["thumbnails_png"] = all(t.startswith(b"\x89PNG") for t in thumbs.values())
        cancel = CancelToken()
        cancel.cancel()
        try:
            client.search_files(repo, files[:2], k=1, cancel=cancel)
        except Cancelled:
            out["search_cancelled"] = True
        got = work / "got" / "copy"
        download = []
        size = client.get_original(repo, first.image_id, got, progress=download.append)
        out["get_equal"] = got.read_bytes() == files[0].read_bytes() and size == got.stat().st_size
        out["get_progress_done"] = bool(download) and download[-1].done == download[-1].total
        stream = io.BytesIO()
        client.write_original(repo, first.image_id, stream)
        out["stream_equal"] = stream.getvalue() == files[0].read_bytes()
        try:
            client.open_repository("no-such-repo")
        except RepositoryNotFound as exc:
            out["not_found"] = str(exc)
        record = client.register_user(reader.card().to_json())
        client.grant(repo, record.user_id)
        out["members"] = sorted(e.name for e in client.access_list(repo))
        revoke_events = []
        repo = client.revoke(repo, record.user_id, progress=revoke_events.append)
        out["key_version"] = repo.manifest.key_version
        out["revoke_events"] = len(revoke_events)
        out["members_after"] = sorted(e.name for e in client.access_list(repo))
        out["after_revoke_top"] = client.search_files(repo, [files[2]], k=1)[0].hits[0].name
        out["checks"] = [(c.part, c.ok) for c in client.check_connection()]
    out["qt_loaded"] = sorted(m for m in sys.modules if m.startswith(("PyQt6", "app.gui")))
    print(json.dumps(out))
''')


def test_facade_end_to_end_without_qt(tmp_path: Path) -> None:
    files = support.copy_images(support.sample_images(4), tmp_path / "images")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), owned_repos.STRONG_PASSWORD,
         owned_repos.OTHER_STRONG_PASSWORD, *map(str, files)],
        cwd=support.PROJECT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    names = [f.name for f in files]
    assert out["qt_loaded"] == []
    assert "wrong password" in out["wrong_password"]
    assert out["old_password_still_works"] is False
    assert out["memory_store"] is True and "in-memory store" in out["where"]
    assert out["imported"] == 4 and out["import_events"] >= 4
    assert out["repositories"] == ["facade-repo"]
    assert out["listed"] == sorted(names) and out["listed_errors"] == []
    assert out["meta_has_features"] == 128 and out["meta_size"] is True
    assert out["search_top"] == names[:2] and out["search_top_distance"] == [0.0, 0.0]
    assert out["search_stages"] == ["features", "search"]
    assert out["hit_meta_name"] == names[0]
    assert out["features_top"] == names[1]
    assert out["thumbnails_png"] is True
    assert out["search_cancelled"] is True
    assert out["get_equal"] is True and out["get_progress_done"] is True
    assert out["stream_equal"] is True
    assert "no-such-repo" in out["not_found"]
    assert out["members"] == ["Dr. Owner", "Dr. Reader"]
    assert out["key_version"] == 2 and out["revoke_events"] >= 4
    assert out["members_after"] == ["Dr. Owner"]
    assert out["after_revoke_top"] == names[2]
    assert ("storage", True) in [tuple(c) for c in out["checks"]]


def test_facade_module_imports_no_qt_and_no_engine() -> None:
    """Importing the facade (what `radcrypt --help` does) loads neither Qt nor the heavy
    engine modules: they load on first use."""
    code = ("import sys, app.core.client, app.cli; "
            "print(sorted(m for m in sys.modules if m.startswith(('PyQt6', 'app.gui', "
            "'cloud.search', 'app.core.importer', 'numba'))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=support.PROJECT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_desktop_client_without_the_gui_extra_says_what_to_install() -> None:
    """`python main.py` on an install without PyQt6 says which extra to install, in one
    line and exit 1, instead of a ModuleNotFoundError traceback."""
    program = textwrap.dedent("""
        import importlib.abc, sys
        class NoQt(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "PyQt6":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None
        sys.meta_path.insert(0, NoQt())
        sys.argv = ["main.py"]
        import main
        raise SystemExit(main.main())
    """)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", program], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "pip install 'radcrypt[gui]'" in done.stderr
    assert "Traceback" not in done.stderr
