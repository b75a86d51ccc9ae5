"""The CLI habits of issue 12 (restic, aws-cli), one test per habit, through real
subprocesses of `python main.py ...` against a private bucket of the shared moto server.

Habits: global options before and after the subcommand; --version; help text for every
option; the exit-code table (README and behaviour: 0, 1, 2, 3, 10, 12, 130); --json with
"schema": 1 and never a secret; progress bars on get, revoke and multi-file search (on a
terminal only); `get -o -`; `ls`; `show ID`; `identity passwd`; `--password-command`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import cli as cli_module
from cloud import layout
from cloud.store import ObjectStore, StoreConfig

try:
    import e2e_support as support
    import owned_repos
    import s3servers
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos, s3servers

PASSWORD = owned_repos.STRONG_PASSWORD
NEW_PASSWORD = owned_repos.OTHER_STRONG_PASSWORD
REPO = "habits"
README = Path(support.PROJECT) / "README.md"


@dataclasses.dataclass
class Runner:
    """`python main.py` with private XDG dirs; the store options go after the command
    (``where="after"``), before it (``"before"``), or not at all (``None``)."""

    config: StoreConfig
    root: Path

    def env(self, password: str | None = PASSWORD, **extra: str) -> dict[str, str]:
        environ = support.store_env(self.config)
        for key in list(environ):
            if key.startswith("RADCRYPT_"):
                environ.pop(key)
        for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
            environ[var] = str(self.root / var.lower())
        if password is not None:
            environ["RADCRYPT_PASSWORD"] = password
        environ.update(extra)
        return environ

    def store_args(self, bucket: str | None = None) -> list[str]:
        return ["--store", "s3", "--endpoint", str(self.config.endpoint_url), "--bucket",
                bucket or self.config.bucket]

    def argv(self, args: tuple[str, ...], where: str | None = "after") -> list[str]:
        store = self.store_args() if where else []
        if where == "before":
            return [support.PYTHON, "main.py", *store, *args]
        return [support.PYTHON, "main.py", *args, *store]

    def run(self, *args: str, where: str | None = "after", password: str | None = PASSWORD,
            text: bool = True, **extra: str) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.argv(args, where), cwd=support.PROJECT,
                              env=self.env(password, **extra), capture_output=True,
                              text=text, timeout=300)

    def ok(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        done = self.run(*args, **kwargs)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    def json(self, *args: str, **kwargs: Any) -> Any:
        return json.loads(self.ok(*args, "--json", **kwargs).stdout)


@dataclasses.dataclass
class World:
    owner: Runner
    files: list[Path]
    ids: dict[str, str]  # file name -> image id


@pytest.fixture(scope="module")
def world(moto_store_config: StoreConfig, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[World]:
    config = dataclasses.replace(moto_store_config, bucket=s3servers.unique_bucket("habits"))
    ObjectStore(config).ensure_bucket()
    root = tmp_path_factory.mktemp("habits")
    owner = Runner(config, root / "owner")
    owner.ok("identity", "create", "--name", "Dr. Owner")
    owner.ok("repo", "create", REPO)
    files = support.copy_images(support.sample_images(3), root / "images")
    report = owner.json("import", "--repo", REPO, *map(str, files))
    ids = {Path(i["path"]).name: i["image_id"] for i in report["imported"]}
    assert len(ids) == 3
    yield World(owner, files, ids)
    s3servers.drop_bucket(config)


def _one_line(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("radcrypt: "), done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _on_a_terminal(runner: Runner, *args: str, password: str = PASSWORD
                   ) -> tuple[int, bytes, str]:
    """Runs with stderr on a pseudo-terminal; (exit code, stdout, what the terminal got)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(runner.argv(args), cwd=support.PROJECT,
                            env=runner.env(password, TERM="xterm-256color", COLUMNS="100"),
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stdout, _ = proc.communicate(timeout=300)
    reader.join(10)
    os.close(master)
    return proc.returncode, stdout, b"".join(chunks).decode("utf-8", "replace")


# --- global options -----------------------------------------------------------------------


def test_global_options_before_and_after_the_subcommand(world: World) -> None:
    """`radcrypt repo --bucket b1 create x` used to drop the bucket silently."""
    runner = world.owner
    config = runner.config
    other = dataclasses.replace(config, bucket=s3servers.unique_bucket("b1"))
    third = dataclasses.replace(config, bucket=s3servers.unique_bucket("b2"))
    try:
        store_opts = ["--store", "s3", "--endpoint", str(config.endpoint_url)]
        between = [support.PYTHON, "main.py", "repo", "--bucket", other.bucket, "create",
                   "between", *store_opts]
        done = subprocess.run(between, cwd=support.PROJECT, env=runner.env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        before = [support.PYTHON, "main.py", *store_opts, "--bucket", third.bucket, "--json",
                  "repo", "create", "before"]
        done = subprocess.run(before, cwd=support.PROJECT, env=runner.env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["repo_id"] == "before"  # --json before it, too
        assert ObjectStore(other).exists(layout.manifest_key("between"))
        assert ObjectStore(third).exists(layout.manifest_key("before"))
        default = ObjectStore(config)
        assert not default.exists(layout.manifest_key("between"))
        assert not default.exists(layout.manifest_key("before"))
        # the parser keeps a value given at any level
        parser = cli_module.build_parser()
        for argv in (["--bucket", "b", "repo", "list"], ["repo", "--bucket", "b", "list"],
                     ["repo", "list", "--bucket", "b"]):
            assert parser.parse_args(argv).bucket == "b", argv
    finally:
        s3servers.drop_bucket(other)
        s3servers.drop_bucket(third)


def test_version() -> None:
    done = subprocess.run([support.PYTHON, "main.py", "--version"], cwd=support.PROJECT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"radcrypt \S.*\n", done.stdout), done.stdout


def test_every_option_has_help() -> None:
    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
                for choice in action._choices_actions:
                    if not choice.help:
                        missing.append(f"{path} {choice.dest}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(cli_module.build_parser(), "radcrypt")
    assert missing == []


# --- exit codes ---------------------------------------------------------------------------


def test_exit_code_table_in_readme_matches_the_cli() -> None:
    text = README.read_text(encoding="utf-8")
    table = dict(re.findall(r"^\|\s*`?(\d+)`?\s*\|\s*([^|]+?)\s*\|", text, re.MULTILINE))
    expected = {cli_module.EXIT_OK: "ok", cli_module.EXIT_ERROR: "error",
                cli_module.EXIT_USAGE: "usage", cli_module.EXIT_PARTIAL: "partial",
                cli_module.EXIT_NOT_FOUND: "not found",
                cli_module.EXIT_WRONG_PASSWORD: "wrong password",
                cli_module.EXIT_INTERRUPTED: "interrupted"}
    assert expected == {0: "ok", 1: "error", 2: "usage", 3: "partial", 10: "not found",
                        12: "wrong password", 130: "interrupted"}
    for code, word in expected.items():
        assert str(code) in table, f"README's exit-code table lacks {code}"
        assert word in table[str(code)].lower(), (code, table[str(code)])


def test_exit_codes(world: World, tmp_path: Path) -> None:
    runner = world.owner
    image_id = world.ids[world.files[0].name]
    assert runner.run("ls", "--repo", REPO).returncode == 0
    _one_line(runner.run("get", "--repo", REPO, "0123456789abcdef" * 2, "-o",
                         str(tmp_path / "x")), 1, "0123456789abcdef")
    for args in (("search", "--repo", REPO, str(world.files[0]), "-k", "0"),
                 ("search", str(world.files[0])),  # missing --repo
                 ("get", "--repo", REPO, image_id),  # missing -o
                 ("identity", "create")):  # missing --name
        done = runner.run(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert "usage:" in done.stderr and "Traceback" not in done.stderr
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    done = runner.run("import", "--repo", REPO, str(world.files[0]), str(bad))
    assert done.returncode == 3, done.stderr  # one already present, one failed
    assert "broken.png" in done.stderr
    _one_line(runner.run("ls", "--repo", "no-such-repo"), 10, "no-such-repo")
    _one_line(runner.run("ls", "--repo", REPO, password="not the password, sorry"), 12,
              "wrong password")


def test_interrupt_exits_130(world: World) -> None:
    """Ctrl-C (SIGINT) while the password command runs: exit 130, one line."""
    sleeper = "sleep 60"  # dies quietly of SIGINT, as radcrypt must not
    argv = world.owner.argv(("ls", "--repo", REPO, "--password-command", sleeper))
    proc = subprocess.Popen(argv, cwd=support.PROJECT, env=world.owner.env(password=None),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        import psutil

        while time.monotonic() < deadline:  # wait until the password command runs
            children = psutil.Process(proc.pid).children()
            if any(c.cmdline() == ["sleep", "60"] for c in children):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the password command never started")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr


# --- output -------------------------------------------------------------------------------


def test_json_has_schema_1_and_never_a_secret(world: World, tmp_path: Path) -> None:
    runner = world.owner
    image_id = world.ids[world.files[0].name]
    card = tmp_path / "card.json"
    runner.ok("identity", "export", "-o", str(card))
    outputs = [
        runner.run("repo", "list", "--json"),
        runner.run("repo", "access", REPO, "--json"),
        runner.run("identity", "show", "--json"),
        runner.run("ls", "--repo", REPO, "--json"),
        runner.run("show", "--repo", REPO, image_id, "--json"),
        runner.run("search", "--repo", REPO, str(world.files[1]), "--json"),
        runner.run("import", "--repo", REPO, str(world.files[1]), "--json"),
        runner.run("features", str(world.files[1]), "--json"),
        runner.run("check", "--json"),
        runner.run("get", "--repo", REPO, image_id, "-o", str(tmp_path / "g"), "--json"),
        runner.run("--json", "audit", "--repo", REPO, where="before"),
    ]
    for done in outputs:
        assert done.returncode == 0, (done.args, done.stderr)
        data = json.loads(done.stdout)
        assert isinstance(data, dict) and data["schema"] == 1, done.args
        for secret in (PASSWORD, "secret_key"):
            assert secret not in done.stdout and secret not in done.stderr, (done.args,
                                                                               secret)


def test_progress_bars_on_a_terminal_only(world: World, tmp_path: Path) -> None:
    runner = world.owner
    image_id = world.ids[world.files[0].name]
    code, _, terminal = _on_a_terminal(runner, "get", "--repo", REPO, image_id, "-o",
                                       str(tmp_path / "g1"))
    assert code == 0 and "downloading" in terminal, terminal
    plain = runner.ok("get", "--repo", REPO, image_id, "-o", str(tmp_path / "g2"))
    assert "downloading" not in plain.stderr  # not a terminal: no bar
    code, _, terminal = _on_a_terminal(runner, "search", "--repo", REPO,
                                       *map(str, world.files[:2]))
    assert code == 0 and "searching" in terminal, terminal
    # revoke: a second user with an identity of their own, registered and granted
    reader = Runner(runner.config, tmp_path / "reader")
    reader.ok("identity", "create", "--name", "Dr. Reader")
    card = tmp_path / "reader.json"
    reader.ok("identity", "export", "-o", str(card))
    user_id = json.loads(card.read_text())["user_id"]
    runner.ok("user", "register", str(card))
    runner.ok("repo", "grant", REPO, user_id)
    code, stdout, terminal = _on_a_terminal(runner, "repo", "revoke", REPO, user_id)
    assert code == 0 and "re-encrypting" in terminal, terminal
    assert b"revoked" in stdout and b"re-encrypting" not in stdout


def test_get_to_standard_output(world: World) -> None:
    source = world.files[2]
    done = world.owner.run("get", "--repo", REPO, world.ids[source.name], "-o", "-",
                           text=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == source.read_bytes()
    assert b"integrity verified" in done.stderr


# --- new commands ---------------------------------------------------------------------------


def test_ls_lists_the_images(world: World) -> None:
    data = world.owner.json("ls", "--repo", REPO)
    assert data["repository"] == REPO
    assert {i["name"]: i["image_id"] for i in data["images"]} == world.ids
    for image in data["images"]:
        assert {"image_id", "name", "imported_at", "modality"} <= set(image)
        assert image["imported_at"].startswith("20")
    text = world.owner.ok("ls", "--repo", REPO).stdout
    for name, image_id in world.ids.items():
        line = next(line for line in text.splitlines() if image_id in line)
        assert name in line


def test_show_prints_the_decrypted_tags(world: World) -> None:
    name = world.files[0].name
    data = world.owner.json("show", "--repo", REPO, world.ids[name])
    assert data["name"] == name and data["image_id"] == world.ids[name]
    assert isinstance(data["tags"], dict) and "features" not in data
    text = world.owner.ok("show", "--repo", REPO, world.ids[name]).stdout
    assert name in text
    for keyword, value in data["tags"].items():
        assert re.search(rf"^{re.escape(keyword)}\s+{re.escape(value)}$", text, re.MULTILINE)
    with_features = world.owner.json("show", "--repo", REPO, world.ids[name], "--features")
    assert len(with_features["features"]) == 128


def test_identity_passwd(tmp_path: Path) -> None:
    """A workstation of its own (the in-memory store: nothing shared)."""
    runner = Runner(StoreConfig("http://unused", "unused"), tmp_path / "ws")
    memory = ("--store", "memory")
    runner.ok("identity", "create", "--name", "Dr. Passwd", where=None)
    weak = tmp_path / "weak"
    weak.write_text("password1\n")
    _one_line(runner.run("identity", "passwd", "--new-password-file", str(weak), where=None),
              1, "too easy to guess")
    new = tmp_path / "new"
    new.write_text(NEW_PASSWORD + "\n")
    wrong = runner.run("identity", "passwd", "--new-password-file", str(new), where=None,
                       password="not the old one, no")
    _one_line(wrong, 12, "wrong password")
    identity_file = runner.root / "xdg_data_home" / "radcrypt" / "identity.rcid"
    before = identity_file.read_bytes()
    runner.ok("identity", "passwd", "--new-password-file", str(new), where=None)
    assert identity_file.read_bytes() != before  # re-encrypted (new salt and nonce)
    assert identity_file.stat().st_mode & 0o777 == 0o600
    _one_line(runner.run("repo", "create", "after", *memory, where=None), 12, "wrong password")
    created = runner.run("repo", "create", "after", *memory, "--json", where=None,
                         password=NEW_PASSWORD)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["repo_id"] == "after"


def test_password_command(world: World) -> None:
    runner = world.owner
    python = shlex.quote(sys.executable)
    good = f'{python} -c "print({PASSWORD!r})"'  # quoted arguments: split like a shell
    done = runner.run("ls", "--repo", REPO, "--password-command", good, password=None)
    assert done.returncode == 0, done.stderr
    assert world.files[0].name in done.stdout
    _one_line(runner.run("ls", "--repo", REPO, "--password-command",
                         f"{python} -c 'raise SystemExit(3)'", password=None),
              1, "exit status 3")
    # no shell: "$RADCRYPT_PW" reaches echo as it is, so it is the (wrong) password
    done = runner.run("ls", "--repo", REPO, "--password-command", "echo $RADCRYPT_PW",
                      password=None, RADCRYPT_PW=PASSWORD)
    _one_line(done, 12, "wrong password")
    assert PASSWORD not in done.stdout + done.stderr
