"""`radcrypt find`, `radcrypt search --where` and `radcrypt label` (issue 17), as a user runs
them: the real CLI in a child process, on a format-2 repository of real sample files
imported once, against one search service the module starts (the same process an
embedded service is, named with --service-url: a service start per command would make
this file slow, and is tested elsewhere). The truth is the plaintext filter over the
images' decrypted metadata (app.core.keywords), computed here through the facade.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.core import client as facade
from app.core.keywords import keywords_of, parse_query
from app.core.meta import ImageMeta
from app.core.service_client import EmbeddedService
from app.core.settings import Settings
from cloud.backend import DirectoryConfig

try:
    import e2e_support as support
    import owned_repos
    from fixtures import cli_support
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos
    from tests.fixtures import cli_support

PASSWORD = owned_repos.STRONG_PASSWORD
REPO = "keywords-cli"


@dataclass
class World:
    root: Path
    settings: Settings
    files: list[Path]
    metas: dict[str, ImageMeta]
    service_url: str

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli_support.run_cli(self.root, self.settings.data_path, PASSWORD,
                                   "--service-url", self.service_url, *args)

    def truth(self, terms: str, labels: dict[str, set[str]] | None = None) -> set[str]:
        query = parse_query(terms)
        labels = labels or {}
        return {i for i, m in self.metas.items()
                if query.matches(keywords_of(m) | {f"label={w}" for w in labels.get(i, ())})}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("keyword-cli")
    settings = Settings(store="directory", data_dir=str(root / "data"), workers=1)
    identity = facade.create_identity(settings, "Dr. Find", PASSWORD)
    files = support.copy_images(support.sample_images(14), root / "images")
    with facade.Client(settings, identity) as client:
        repo = client.create_repository(REPO, storage_format=2)
        report = client.import_files(repo, files, batch_size=7)
        assert report.imported and not report.failed
        metas = {m.image_id: m for m in client.list_images(repo)}
    service = EmbeddedService(DirectoryConfig(settings.objects_dir), root / "service",
                              [identity.sign_public])
    try:
        yield World(root, settings, files, metas, service.url)
    finally:
        service.stop()


FIND_TERMS = ["modality=MR,CR", "bodypart!=CHEST"]


@pytest.fixture(scope="module")
def first_round(world: World) -> dict[str, subprocess.CompletedProcess[str]]:
    """The independent commands, at once (each process waits mostly on its own start):
    find as text and JSON, search --where, and label add."""
    commands = {
        "find": ("find", "--repo", REPO, *FIND_TERMS, "--images"),
        "find-json": ("find", "--repo", REPO, *FIND_TERMS, "--json"),
        "where": ("search", "--repo", REPO, str(world.files[0]), "-k", "3", "--no-group",
                  "--where", "modality=MR", "--json"),
        "label-add": ("label", "add", "--repo", REPO, *sorted(world.metas)[:3], "Follow-up"),
    }
    with ThreadPoolExecutor(len(commands)) as pool:
        done = list(pool.map(lambda a: world.cli(*a), commands.values()))
    return dict(zip(commands, done, strict=True))


def test_find_text_and_json_equal_the_plaintext_filter(
        world: World, first_round: dict[str, subprocess.CompletedProcess[str]]) -> None:
    expected = world.truth(" ".join(FIND_TERMS))
    assert expected  # the files hold such images
    text, as_json = first_round["find"], first_round["find-json"]
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"{' '.join(FIND_TERMS)}: {len(expected)} images in ")
    assert {line.split()[0] for line in lines[1:]} == expected
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["schema"] == 1 and data["complete"] is True
    assert {i["image_id"] for i in data["images"]} == expected
    assert data["matched"] == len(expected)
    assert sum(s["images"] for s in data["studies"]) == len(expected)


def test_search_where_returns_the_nearest_matching_images(
        world: World, first_round: dict[str, subprocess.CompletedProcess[str]]) -> None:
    done = first_round["where"]
    assert done.returncode == 0, done.stderr
    hits = json.loads(done.stdout)["queries"][0]["results"]
    matching = world.truth("modality=MR")
    assert hits and {h["image_id"] for h in hits} <= matching
    assert len(hits) == min(3, len(matching))
    distances = [h["distance"] for h in hits]
    assert distances == sorted(distances)


def test_a_bad_term_is_a_usage_error_before_any_password(world: World) -> None:
    done = world.cli("find", "--repo", REPO, "colour=red")
    assert done.returncode == 2
    assert "unknown field 'colour'" in done.stderr
    done = world.cli("search", "--repo", REPO, str(world.files[0]), "--where", "modality")
    assert done.returncode == 2 and "--where" in done.stderr and "field=value" in done.stderr


def test_label_add_rm_ls_change_what_find_finds(
        world: World, first_round: dict[str, subprocess.CompletedProcess[str]]) -> None:
    chosen = sorted(world.metas)[:3]
    added = first_round["label-add"]
    assert added.returncode == 0, added.stderr
    assert "labelled 3 image(s): follow" in added.stdout
    done = world.cli("label", "rm", "--repo", REPO, chosen[0], "follow")
    assert done.returncode == 0, done.stderr
    labels = {i: {"follow", "up"} for i in chosen[1:]} | {chosen[0]: {"up"}}
    with ThreadPoolExecutor(3) as pool:
        found, shown, gone = pool.map(lambda a: world.cli(*a), [
            ("find", "--repo", REPO, "label=follow", "--json"),
            ("label", "ls", "--repo", REPO, chosen[0]),
            ("find", "--repo", REPO, "--json", "--", "label=up", "-label=follow")])
    assert found.returncode == 0, found.stderr
    assert {i["image_id"] for i in json.loads(found.stdout)["images"]} == world.truth(
        "label=follow", labels) == set(chosen[1:])
    assert shown.returncode == 0 and shown.stdout.strip() == "up"
    assert {i["image_id"] for i in json.loads(gone.stdout)["images"]} == {chosen[0]}
