"""Studies, series and grouped search through the facade and `radcrypt ls`/`search` (issue 15).

One format-2 repository (directory store) holds what a small PACS export would: a CT study
with an axial series of 6 slices and a 2-slice scout series, an MR study of 4 slices, and
one PNG without UIDs. The slices are real pixel data (pydicom-data's CT_small and MR_small)
written as DICOM series with their own UIDs, instance numbers and positions; neighbouring
axial slices differ a little (a growing bright disc), as a scanner's do, so an ungrouped
top-k is filled by one series: exactly the case grouping is for.

Checked: the facade's studies/series_of/images_of; `ls --studies`, `--series STUDY` (row
number, UID prefix), `--images SERIES` (row label, UID) as text and --json; `search`
grouped (k different series, the best slice of each with "N more from this series",
exact against a brute-force per-series minimum over the decrypted features),
`--no-group` and `--similar-to`; find similar by image id through the facade. Each CLI
call unlocks the identity and opens the repository (about 4 s on a loaded 2-core
machine), so the calls are few; the resolution rules are unit-tested in
tests/test_studies.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from app.core import client as facade
from app.core.settings import Settings
from resources.samples import perturb_file

PASSWORD = "cli passphrase: amber meadow 62 lantern"  # zxcvbn 4, as tests/test_cli.py
REPO = "studies"
ROOT = "1.2.826.0.1.3680043.8.498.4711"  # a UID root for the test's own instances
CT_STUDY, MR_STUDY = f"{ROOT}.1", f"{ROOT}.2"
AXIAL, SCOUT, MR_SERIES = f"{ROOT}.1.1", f"{ROOT}.1.2", f"{ROOT}.2.1"


def _write(src: str, dest: Path, pixels: np.ndarray, **attrs: Any) -> Path:
    ds = pydicom.dcmread(get_testdata_file(src))
    ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = f"{attrs['SeriesInstanceUID']}.{attrs['InstanceNumber']}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _disc(shape: tuple[int, ...], radius: float) -> np.ndarray:
    y, x = np.ogrid[: shape[0], : shape[1]]
    return ((y - shape[0] / 3) ** 2 + (x - shape[1] / 3) ** 2) <= radius**2


def make_export(folder: Path) -> dict[str, Path]:
    """The files of the export, by a short name (ct1..ct6, scout1, scout2, mr1..mr4, png)."""
    folder.mkdir(parents=True, exist_ok=True)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.int32)
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.int32)
    study_ct = {"StudyInstanceUID": CT_STUDY, "StudyDate": "20240131", "StudyTime": "101500",
                "PatientName": "DOE^JANE", "PatientID": "P-17", "Modality": "CT",
                "StudyDescription": "CHEST W CONTRAST", "ImageOrientationPatient":
                [1, 0, 0, 0, 1, 0]}
    files = {}
    for i in range(1, 7):  # axial: instance numbers against the file names' order
        pixels = np.where(_disc(ct.shape, 6 + 2 * i), ct + 300, ct)
        files[f"ct{i}"] = _write("CT_small.dcm", folder / f"x{7 - i}.dcm", pixels,
                                 **study_ct, SeriesInstanceUID=AXIAL, SeriesNumber=2,
                                 SeriesDescription="AXIAL 5mm", InstanceNumber=i,
                                 ImagePositionPatient=[-100, -100, -50 + 5 * i])
    for i in (1, 2):
        files[f"scout{i}"] = _write("CT_small.dcm", folder / f"scout{i}.dcm",
                                    np.ascontiguousarray(ct.T[:, ::-1]) + 40 * i, **study_ct,
                                    SeriesInstanceUID=SCOUT, SeriesNumber=1,
                                    SeriesDescription="SCOUT", InstanceNumber=i,
                                    ImagePositionPatient=[0, 0, 10 * i])
    for i in range(1, 5):
        files[f"mr{i}"] = _write(
            "MR_small.dcm", folder / f"mr{i}.dcm", np.roll(mr, 3 * i, axis=1),
            StudyInstanceUID=MR_STUDY, StudyDate="20250612", StudyTime="090000",
            PatientName="ROE^RICHARD", PatientID="P-99", Modality="MR",
            StudyDescription="BRAIN", SeriesInstanceUID=MR_SERIES, SeriesNumber=7,
            SeriesDescription="T1 SAG", InstanceNumber=i,
            ImageOrientationPatient=[0, 1, 0, 0, 0, -1], ImagePositionPatient=[4 * i, 0, 0])
    png = folder / "photo.png"
    Image.fromarray(np.clip(255 - ct // 8, 0, 255).astype(np.uint8)).save(png)
    files["png"] = png
    return files


class World:
    def __init__(self, root: Path) -> None:
        self.data = root / "data"
        self.settings = Settings(store="directory", data_dir=str(self.data), workers=1)
        self.files = make_export(root / "export")
        self.ids: dict[str, str] = {}  # short name -> image id
        self.features: dict[str, np.ndarray] = {}  # image id -> stored features
        self.series: dict[str, str] = {}  # image id -> series key
        self.client: facade.Client
        self.repo: Any = None




@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("studies"))
    identity = facade.create_identity(w.settings, "Dr. Studies", PASSWORD)
    with facade.Client(w.settings, identity) as client:  # one for the module: one unlock
        repo = client.create_repository(REPO)
        report = client.import_files(repo, list(w.files.values()))
        assert len(report.imported) == len(w.files), report
        by_name = {m.name: m for m in client.list_images(repo)}
        for short, path in w.files.items():
            meta = by_name[path.name]
            w.ids[short] = meta.image_id
            w.features[meta.image_id] = np.asarray(meta.features)
            w.series[meta.image_id] = meta.series_uid or "image:" + meta.image_id
        w.client, w.repo = client, repo
        yield w


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> Run:
    from app.cli import main

    monkeypatch.setenv("RADCRYPT_PASSWORD", PASSWORD)

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--store", "directory", "--data-dir", str(world.data), *args])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def test_the_facade_groups_studies_series_and_images(world: World) -> None:
    client, repo = world.client, world.repo
    studies = client.studies(repo)
    assert [s.key for s in studies] == [MR_STUDY, CT_STUDY, "image:" + world.ids["png"]]
    assert [s.key for s in client.series_of(repo, CT_STUDY)] == [SCOUT, AXIAL]
    axial = client.images_of(repo, AXIAL)
    assert [m.image_id for m in axial] == [world.ids[f"ct{i}"] for i in range(1, 7)]
    assert client.studies(repo) == studies  # remembered: same images, same answer
    with pytest.raises(facade.RadcryptError, match=r"has no series 1\.2\.3"):
        client.images_of(repo, "1.2.3")


def test_ls_studies_lists_patient_date_modality_description_and_counts(run: Run) -> None:
    code, out, err = run("ls", "--repo", REPO, "--studies")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["#", "Patient", "Patient", "ID", "Date"]
    mr, ct, png = lines[1:4]
    assert mr.split()[:4] == ["1", "ROE,", "RICHARD", "P-99"] and "2025-06-12" in mr
    assert ct.split()[1:4] == ["DOE,", "JANE", "P-17"] and "2024-01-31" in ct
    assert "CHEST W CONTRAST" in ct and ct.split()[-3:] == ["2", "8", CT_STUDY]
    assert png.split()[-3:-1] == ["1", "1"] and "photo.png" in png

    code, out, _ = run("ls", "--repo", REPO, "--studies", "--json")
    data = json.loads(out)
    assert code == 0 and data["schema"] == 1
    ct_row = data["studies"][1]
    assert {"row": 2, "study_uid": CT_STUDY, "patient_name": "DOE^JANE", "patient_id": "P-17",
            "study_date": "20240131", "modalities": ["CT"], "series_count": 2,
            "image_count": 8}.items() <= ct_row.items()
    assert data["studies"][2]["study_uid"] == ""  # the PNG: no UID, its own study


def test_ls_series_of_a_study_by_row_uid_or_prefix(run: Run) -> None:
    code, out, err = run("ls", "--repo", REPO, "--series", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Study 2: DOE, JANE (P-17) · 2024-01-31 · CHEST W CONTRAST")
    assert lines[2].split() == ["2.1", "1", "CT", "-", "SCOUT", "2", SCOUT]
    assert lines[3].split() == ["2.2", "2", "CT", "-", "AXIAL", "5mm", "6", AXIAL]
    # a unique prefix of the UID (the whole UID, ambiguous and unknown text: the unit tests
    # of app/core/studies.py find_study in tests/test_studies.py)
    code, out, _ = run("ls", "--repo", REPO, "--series", f"{ROOT}.1", "--json")
    data = json.loads(out)
    assert code == 0 and data["study"]["row"] == 2 and data["study"]["key"] == CT_STUDY
    assert [(s["row"], s["series_uid"], s["image_count"]) for s in data["series"]] == [
        ("2.1", SCOUT, 2), ("2.2", AXIAL, 6)]


def test_ls_images_of_a_series_in_stack_order(world: World, run: Run) -> None:
    code, out, err = run("ls", "--repo", REPO, "--images", "2.2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Series 2.2: CT · series 2 · AXIAL 5mm · 6 images · DOE, JANE")
    rows = [line.split() for line in lines[2:]]
    assert [r[1] for r in rows] == ["1", "2", "3", "4", "5", "6"]  # instance numbers
    assert [r[-1] for r in rows] == [world.ids[f"ct{i}"] for i in range(1, 7)]
    assert [float(r[3]) for r in rows] == [-45.0, -40.0, -35.0, -30.0, -25.0, -20.0]

    code, out, _ = run("ls", "--repo", REPO, "--images", AXIAL, "--json")
    data = json.loads(out)
    assert data["series"]["series_uid"] == AXIAL and data["series"]["image_count"] == 6
    assert [(m["instance"], m["frame"], m["frames"]) for m in data["images"]] == [
        (str(i), 0, 1) for i in range(1, 7)]


def _brute_force_series(world: World, query: np.ndarray, k: int, without: str = ""
                        ) -> list[tuple[str, float]]:
    """The k series nearest to ``query`` (by their nearest image, ``without`` one image),
    from the decrypted features: what the grouped answer must equal."""
    best: dict[str, float] = {}
    for image_id, vector in world.features.items():
        if image_id == without:
            continue
        d = float((vector - query) @ (vector - query))
        key = world.series[image_id]
        best[key] = min(best.get(key, np.inf), d)
    return sorted(best.items(), key=lambda kv: kv[1])[:k]


def test_search_groups_hits_by_series_exactly(world: World, run: Run, tmp_path: Path
                                              ) -> None:
    query = perturb_file(world.files["ct3"], tmp_path, "noise", seed=7)
    client, repo = world.client, world.repo
    vector = client.features([query], repo.manifest.extractor)[0]
    (flat,) = client.search_features(repo, vector, ["q"], k=3, group=False)
    (grouped,) = client.search_features(repo, vector, ["q"], k=3)
    # ungrouped, the axial series fills the top 3 (why grouping exists)
    assert [world.series[h.image_id] for h in flat.hits] == [AXIAL] * 3
    assert flat.hits[0].image_id == world.ids["ct3"]
    # grouped: three different series, nearest first, each the exact per-series minimum
    expected = _brute_force_series(world, vector, 3)
    assert [(g.series_key, g.best.distance) for g in grouped.groups] == [
        (key, pytest.approx(d, rel=1e-9, abs=1e-12)) for key, d in expected]
    assert grouped.groups[0].best.image_id == world.ids["ct3"]
    assert grouped.groups[0].more == 5 and grouped.asked > 3  # the engine was asked again
    assert [h.image_id for h in grouped.hits] == [h.image_id for h in flat.hits]

    code, out, err = run("search", "--repo", REPO, str(query), "-k", "3")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{query}:"
    assert lines[1].split()[:2] == ["1.", world.files["ct3"].name]
    assert lines[2].strip().split(" · ") == ["DOE, JANE", "CT", "2024-01-31", "series 2",
                                             "AXIAL 5mm", "instance 3",
                                             "5 more from this series"]
    ranks = [line.split()[0] for line in lines[1:] if line.split()[0].endswith(".")]
    assert ranks == ["1.", "2.", "3."] and out.count("5 more from this series") == 1
    # --no-group, with a query by image id (no file to decode: the quicker call)
    code, out, err = run("search", "--repo", REPO, "--similar-to", world.ids["ct3"], "-k",
                         "3", "--no-group", "--json")
    assert code == 0, err
    (by_id,) = json.loads(out)["queries"]
    assert by_id["query"] == "x4.dcm (instance 3)" and by_id["grouped"] is False
    assert by_id["groups"] == [] and len(by_id["results"]) == 3
    assert {world.series[r["image_id"]] for r in by_id["results"]} == {AXIAL}  # not grouped
    assert world.ids["ct3"] not in [r["image_id"] for r in by_id["results"]]
    answer = grouped.as_dict()  # what `search --json` prints for each query
    assert (answer["groups"][0]["series"], answer["groups"][0]["more"]) == (AXIAL, 5)
    assert [r["group"] for r in answer["results"]] == [1, 1, 1]
    assert answer["results"][0]["instance"] == "3" and answer["results"][0]["frames"] == 1


def test_find_similar_by_image_id_needs_no_file(world: World) -> None:
    client, repo = world.client, world.repo
    result = client.search_by_image_id(repo, world.ids["mr2"], k=2)
    same = client.search_by_image_id(repo, world.ids["mr2"], k=1, exclude_self=False,
                                     group=False)
    assert same.hits[0].image_id == world.ids["mr2"] and same.hits[0].distance == 0.0
    assert "mr2.dcm (instance 2)" == result.query
    assert world.ids["mr2"] not in {h.image_id for g in result.groups for h in g.hits}
    assert [g.series_key for g in result.groups] == [
        key for key, _ in _brute_force_series(world, world.features[world.ids["mr2"]], 2,
                                              without=world.ids["mr2"])]
    assert result.groups[0].series_key == MR_SERIES and result.groups[0].more == 2
