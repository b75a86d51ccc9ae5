"""The command-line contract, through real subprocesses of `python main.py ...`.

One embedded store (`store start`, a background SeaweedFS) serves the commands of this
module, in private XDG directories with RADCRYPT_PASSWORD set; it is stopped at the end and
no process started by these commands may survive (looked up by pid, and by the private
XDG_DATA_HOME in their environment).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.imaging.decode import decode_image
from app.imaging.features import FEATURE_DIM, extract_features
from cloud import layout
from cloud.store import ObjectStore, StoreConfig
from resources.samples import perturb_file

try:
    import e2e_support as support
except ImportError:  # pragma: no cover
    from tests import e2e_support as support

PASSWORD = "cli passphrase: amber meadow 62 lantern"  # zxcvbn 4 (identities need 3)
REPO = "cli-repo"
IMAGES = 12
_AWS_VARS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
             "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
             "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class Cli:
    """Runs `python main.py ...` in private XDG dirs; keeps what the tests learn."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items()
                    if k not in _AWS_VARS and not k.startswith("RADCRYPT_")}
        for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
            path = root / var.lower()
            path.mkdir(parents=True, exist_ok=True)
            self.env[var] = str(path)
        self.env.update({"RADCRYPT_PASSWORD": PASSWORD, "AWS_EC2_METADATA_DISABLED": "true",
                         "AWS_CONFIG_FILE": str(root / "absent"),
                         "AWS_SHARED_CREDENTIALS_FILE": str(root / "absent")})
        self.store: dict[str, Any] = {}
        self.files: list[Path] = []
        self.ids: dict[str, str] = {}  # file name -> image id

    def run(self, *args: str, password: str | None = PASSWORD, timeout: float = 300
            ) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if password is None:
            env.pop("RADCRYPT_PASSWORD")
        else:
            env["RADCRYPT_PASSWORD"] = password
        return subprocess.run([support.PYTHON, "main.py", *args], cwd=support.PROJECT,
                              env=env, capture_output=True, text=True, timeout=timeout)

    def ok(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        done = self.run(*args, **kwargs)
        assert done.returncode == 0, f"{args}: {done.stderr}"
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args).stdout)

    def survivors(self) -> list[int]:
        """Processes whose environment names our private data dir: weed, the service."""
        return support.processes_with_env("XDG_DATA_HOME", self.env["XDG_DATA_HOME"])


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    runner = Cli(tmp_path_factory.mktemp("cli"))
    yield runner
    runner.run("store", "stop")
    pid = runner.store.get("pid")
    leftovers = runner.survivors()
    for stray in leftovers + ([pid] if pid else []):
        support.kill_pid(stray)  # ours (same private data dir): never leave one running
    assert leftovers == [], f"processes survived `store stop`: {leftovers}"
    assert pid is None or support.pid_gone(pid)


def _one_error_line(done: subprocess.CompletedProcess[str], *words: str, code: int = 1) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("radcrypt: "), lines[0]
    assert "Traceback" not in done.stderr and "unexpected" not in lines[0], lines[0]
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    return lines[0]


# --- the store --------------------------------------------------------------------------


def test_store_start_and_status(cli: Cli) -> None:
    started = cli.json("store", "start", "--json")
    assert {"endpoint", "bucket", "access_key", "data_dir", "pid"} <= set(started)
    assert "secret_key" not in started  # printed only with --show-credentials
    assert started["running"] is True and started["kind"] == "seaweedfs"
    assert started["endpoint"].startswith("http://127.0.0.1:")
    assert Path(started["data_dir"]).is_relative_to(cli.env["XDG_DATA_HOME"])
    assert not support.pid_gone(started["pid"])
    cli.store = started
    status = cli.json("store", "status", "--json")
    assert status == started
    assert cli.json("store", "start", "--json")["pid"] == started["pid"]  # already running
    # the credentials printed when asked are the ones the store takes
    shown = cli.json("store", "status", "--json", "--show-credentials")
    assert shown == {**started, "secret_key": shown["secret_key"]}
    cli.store = shown
    store = ObjectStore(StoreConfig(started["endpoint"], started["bucket"],
                                    access_key=started["access_key"],
                                    secret_key=shown["secret_key"]))
    store.ping()
    text = cli.ok("store", "status").stdout
    assert started["endpoint"] in text and shown["secret_key"] not in text


# --- repositories, import, search, get ---------------------------------------------------


def test_repo_create_and_list(cli: Cli) -> None:
    # repositories belong to identities: none on this workstation yet, so none is created
    _one_error_line(cli.run("repo", "create", REPO), "radcrypt identity create")
    assert cli.json("repo", "list", "--json") == {"schema": 1, "repositories": []}
    cli.ok("identity", "create", "--name", "CLI Tester")
    created = cli.json("repo", "create", REPO, "--json")
    assert created["repo_id"] == REPO and created["dim"] == FEATURE_DIM
    assert created["key_version"] == 1
    assert created["format"] == "radcrypt-manifest-v2"  # storage format 2 by default
    listed = cli.json("repo", "list", "--json")["repositories"]  # a second process sees it
    assert [m["repo_id"] for m in listed] == [REPO]
    assert {"schema": 1, **listed[0]} == created
    _one_error_line(cli.run("repo", "create", REPO), "already exists")


def test_import_json(cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("cli-archive")
    cli.files = support.copy_images(support.sample_images(IMAGES), folder)
    report = cli.json("import", "--repo", REPO, str(folder), "--json")
    assert report["failed"] == [] and report["already_present"] == []
    assert sorted(i["path"] for i in report["imported"]) == sorted(map(str, cli.files))
    assert len(report["segments"]) == len(report["packs"]) == 1
    cli.ids = {Path(i["path"]).name: i["image_id"] for i in report["imported"]}
    assert all(layout.validate_image_id(i) for i in cli.ids.values())
    again = cli.json("import", "--repo", REPO, str(cli.files[0]), "--json")
    assert again["imported"] == [] and len(again["already_present"]) == 1


def test_search_json_shape(cli: Cli, tmp_path: Path) -> None:
    target = cli.files[4]
    query = perturb_file(target, tmp_path, "noise", seed=1)
    done = cli.ok("search", "--repo", REPO, str(target), str(query), "-k", "3", "--json")
    answer = json.loads(done.stdout)
    assert set(answer) == {"schema", "queries"} and len(answer["queries"]) == 2
    for item, path in zip(answer["queries"], [target, query], strict=True):
        assert set(item) == {"query", "results", "stats", "complete", "segments_expected",
                             "segments_searched", "segments_missing", "grouped", "groups"}
        assert item["grouped"] is True and 1 <= len(item["groups"]) <= 3  # by series
        # format 2 (the default): every live segment of the verified log was searched
        assert item["complete"] is True and item["segments_missing"] == []
        assert item["segments_expected"] == item["segments_searched"] == 1
        assert item["query"] == str(path)
        assert isinstance(item["stats"], dict) and item["stats"]["vectors"] == IMAGES
        assert len(item["results"]) == 3
        for rank, hit in enumerate(item["results"], start=1):
            assert set(hit) == {"image_id", "name", "distance", "rank", "series", "group",
                                "instance", "frame", "frames", "original_id"}
            assert hit["rank"] == rank and isinstance(hit["distance"], float)
            assert cli.ids[hit["name"]] == hit["image_id"]
        distances = [h["distance"] for h in item["results"]]
        assert distances == sorted(distances)
    exact = answer["queries"][0]["results"][0]
    assert exact["name"] == target.name and exact["distance"] == 0.0
    assert answer["queries"][1]["results"][0]["name"] == target.name
    assert cli.survivors() == [cli.store["pid"]]  # the search service it started is gone


def test_search_text_output(cli: Cli) -> None:
    done = cli.ok("search", "--repo", REPO, str(cli.files[2]))
    assert cli.files[2].name in done.stdout and cli.ids[cli.files[2].name] in done.stdout
    # the exact file is found at distance 0: the word scale of docs/SIMILARITY.md
    assert f"{cli.files[2].name}  identical (distance 0)" in done.stdout


def test_get_returns_the_original_byte_for_byte(cli: Cli, tmp_path: Path) -> None:
    for source in (cli.files[0], cli.files[-1]):
        out = tmp_path / "sub" / ("copy-of-" + source.name)
        done = cli.ok("get", "--repo", REPO, cli.ids[source.name], "-o", str(out))
        assert out.read_bytes() == source.read_bytes()
        assert "integrity verified" in done.stderr


def test_features_json_shape(cli: Cli) -> None:
    paths = [cli.files[1], cli.files[-2]]
    data = cli.json("features", *map(str, paths), "--json")
    assert set(data) == {"schema", "extractor", "features"}
    assert data["extractor"] == "radcrypt-v1"
    assert [f["path"] for f in data["features"]] == list(map(str, paths))
    for row, path in zip(data["features"], paths, strict=True):
        assert set(row) == {"path", "vector"} and len(row["vector"]) == 128
        assert all(isinstance(x, float) for x in row["vector"])
        assert np.array_equal(np.array(row["vector"]), extract_features(decode_image(path)))


def test_import_batch_size_flag(cli: Cli, tmp_path: Path) -> None:
    from app.cli import DEFAULT_BATCH as CLI_DEFAULT
    from app.core.importer import DEFAULT_BATCH

    assert CLI_DEFAULT == DEFAULT_BATCH
    cli.ok("repo", "create", "cli-batches")
    report = cli.json("import", "--repo", "cli-batches", *map(str, cli.files[:5]),
                      "--batch-size", "2", "--json")
    assert len(report["segments"]) == 3 and len(report["imported"]) == 5
    assert cli.run("import", "--repo", "cli-batches", "x", "--batch-size", "0").returncode == 2


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ("frobnicate",),
    ("search", "image.png"),
    ("import", "folder"),
    ("get", "0" * 32, "-o", "out.dcm"),
    ("get", "--repo", "x", "0" * 32),
    ("search", "--repo", "x", "image.png", "-k", "three"),
    ("store", "restart"),
    (),
], ids=["unknown command", "search without --repo", "import without --repo",
        "get without --repo", "get without -o", "k not a number", "unknown action", "nothing"])
def test_usage_errors_exit_2(cli: Cli, args: tuple[str, ...]) -> None:
    if not args:  # plain `main.py` opens the GUI; the CLI entry point itself needs a command
        done = subprocess.run([support.PYTHON, "-m", "app.cli"], cwd=support.PROJECT,
                              env=cli.env, capture_output=True, text=True, timeout=60)
    else:
        done = cli.run(*args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "usage:" in done.stderr and "Traceback" not in done.stderr


def test_wrong_password(cli: Cli, tmp_path: Path) -> None:
    for args in (("search", "--repo", REPO, str(cli.files[0])),
                 ("import", "--repo", REPO, str(cli.files[0])),
                 ("get", "--repo", REPO, cli.ids[cli.files[0].name], "-o",
                  str(tmp_path / "x"))):
        _one_error_line(cli.run(*args, password="not the password"), "wrong password",
                        code=12)
    assert not (tmp_path / "x").exists()


def test_password_file_and_missing_password(cli: Cli, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    cli.ok("search", "--repo", REPO, str(cli.files[0]), "--password-file", str(secret),
           password=None)
    _one_error_line(cli.run("search", "--repo", REPO, str(cli.files[0]), password=None),
                    "password")
    _one_error_line(cli.run("search", "--repo", REPO, str(cli.files[0]), "--password-file",
                            str(tmp_path / "absent")), "password file")


def test_unknown_repository(cli: Cli, tmp_path: Path) -> None:
    for args in (("search", "--repo", "no-such-repo", str(cli.files[0])),
                 ("import", "--repo", "no-such-repo", str(cli.files[0])),
                 ("get", "--repo", "no-such-repo", "0" * 32, "-o", str(tmp_path / "x"))):
        _one_error_line(cli.run(*args), "no-such-repo", code=10)
    _one_error_line(cli.run("search", "--repo", "Not_A_Name", str(cli.files[0])), "repo")


def test_missing_file(cli: Cli, tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.dcm")
    _one_error_line(cli.run("import", "--repo", REPO, missing), "absent.dcm")
    _one_error_line(cli.run("search", "--repo", REPO, missing), "absent.dcm")
    _one_error_line(cli.run("features", missing), "absent.dcm")


def test_undecodable_query_image(cli: Cli, tmp_path: Path) -> None:
    fake = tmp_path / "scan.png"
    fake.write_text("this is not an image\n")
    _one_error_line(cli.run("search", "--repo", REPO, str(fake)), "scan.png")
    _one_error_line(cli.run("features", str(fake)), "scan.png")
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    _one_error_line(cli.run("search", "--repo", REPO, str(empty)), "empty.dcm")


def test_import_of_only_undecodable_files_fails(cli: Cli, tmp_path: Path) -> None:
    fake = tmp_path / "notes.txt.png"
    fake.write_text("not an image")
    done = cli.run("import", "--repo", REPO, str(fake))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "notes.txt.png" in done.stderr


def test_unknown_image_id(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "x.dcm"
    unknown = "0123456789abcdef" * 2
    _one_error_line(cli.run("get", "--repo", REPO, unknown, "-o", str(out)), unknown)
    _one_error_line(cli.run("get", "--repo", REPO, "not-an-id", "-o", str(out)), "image_id")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_k(cli: Cli) -> None:
    for k in ("0", "101"):  # a usage error (exit 2), found before any password is asked
        done = cli.run("search", "--repo", REPO, str(cli.files[0]), "-k", k)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "usage:" in done.stderr and "-k" in done.stderr


# --- persistence across a store restart, then stop -------------------------------------------


def test_data_survives_a_store_restart(cli: Cli) -> None:
    first_pid = cli.store["pid"]
    assert cli.json("store", "stop", "--json") == {"schema": 1, "stopped": True}
    assert support.wait_gone(first_pid)
    assert cli.json("store", "status", "--json")["running"] is False
    assert cli.survivors() == []
    restarted = cli.json("store", "start", "--json", "--show-credentials")
    assert restarted["pid"] != first_pid
    assert restarted["secret_key"] == cli.store["secret_key"]  # credentials are kept
    cli.store = restarted
    listed = cli.json("repo", "list", "--json")["repositories"]
    assert [m["repo_id"] for m in listed] == ["cli-batches", REPO]
    answer = cli.json("search", "--repo", REPO, str(cli.files[7]), "--json")
    assert answer["queries"][0]["results"][0]["name"] == cli.files[7].name


def test_store_stop(cli: Cli) -> None:
    pid = cli.store["pid"]
    assert cli.json("store", "stop", "--json") == {"schema": 1, "stopped": True}
    assert support.wait_gone(pid)
    assert cli.survivors() == []
    assert cli.json("store", "stop", "--json") == {"schema": 1, "stopped": False}
    assert "no embedded store running" in cli.ok("store", "status").stdout


# --- the demo ---------------------------------------------------------------------------------


def test_demo_prints_its_table(tmp_path: Path) -> None:
    demo = Cli(tmp_path / "demo")
    done = demo.run("demo", "--images", "60", "--queries", "8", "--json", str(tmp_path / "r.json"),
                    password=None, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("imported 60 images in ")
    assert lines[1].split() == ["query", "expected", "returned", "distance", "ms", "ok"]
    rows = lines[2:-1]
    assert len(rows) == 8 and all(row.endswith("  yes") for row in rows)
    assert lines[-1].startswith("matched 8/8; agreement with plaintext search")
    assert lines[-1].endswith(": 1.000")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["images"] == 60 and report["all_matched"] is True
    assert len(report["queries"]) == 8
    assert demo.survivors() == []  # the demo's store and service are gone
