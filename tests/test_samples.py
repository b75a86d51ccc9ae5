"""Sample-data helpers: the cached list of decodable pydicom files, the export of 300
distinct real images, and the perturbed copies used by the robustness tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.imaging import decode_image, extract_features
from resources import samples
from resources.samples import (
    DUPLICATE_DISTANCE,
    PERTURBATIONS,
    decodable_dicom_files,
    export_sample_images,
    perturb_file,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return export_sample_images(tmp_path_factory.mktemp("export"), 300)


def test_sample_list_is_current_and_files_exist() -> None:
    files = decodable_dicom_files()
    names = json.loads(samples.SAMPLE_LIST.read_text(encoding="utf-8"))["files"]
    assert len(files) == len(names) >= 140
    assert names == sorted(names)
    assert all(p.is_file() for p in files)
    # The checked-in list matches what the decoder reads today; if not, run
    # `python -m resources.samples --refresh`.
    assert samples._scan_decodable() == names


def test_export_reaches_300_distinct_decodable_images(exported: list[Path]) -> None:
    assert len(exported) == 300
    assert len({p.name for p in exported}) == 300
    assert [p.name for p in exported] == sorted(p.name for p in exported)
    assert sorted(exported[0].parent.iterdir()) == exported
    vectors = np.array([extract_features(decode_image(p)) for p in exported])
    squared = np.sum((vectors[:, None, :] - vectors[None, :, :]) ** 2, axis=-1)
    np.fill_diagonal(squared, np.inf)
    assert np.sqrt(squared.min()) >= DUPLICATE_DISTANCE
    kinds = {p.suffix for p in exported}
    assert kinds == {".dcm", ".png", ".tif", ".jpg"}


def test_export_formats(exported: list[Path]) -> None:
    formats = {p.suffix: decode_image(p).source_format for p in exported}
    assert formats == {".dcm": "dicom", ".png": "png", ".tif": "tiff", ".jpg": "jpeg"}
    modes = {Image.open(p).mode for p in exported if p.suffix == ".tif"}
    assert "I;16" in modes  # grey frames are rendered as 16-bit TIFF


def test_export_is_deterministic(exported: list[Path], tmp_path: Path) -> None:
    again = export_sample_images(tmp_path, 40)
    assert [p.name for p in again] == [p.name for p in exported[:40]]
    for a, b in zip(again, exported[:40], strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_export_refuses_impossible_counts(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="distinct sample images are available"):
        export_sample_images(tmp_path, 100_000)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_perturb_file(kind: str, tmp_path: Path) -> None:
    src = decodable_dicom_files()[0]
    out = perturb_file(src, tmp_path / "out", kind, seed=7)
    assert out.parent == tmp_path / "out" and out.is_file()
    assert out.suffix == (".jpg" if kind == "jpeg" else ".png")
    original = decode_image(src).display().astype(float)
    copy = decode_image(out)
    assert copy.pixels.shape[:2] == original.shape[:2]
    difference = np.abs(copy.display().astype(float) - original).mean()
    assert 0.2 < difference < 40  # changed, but still the same picture
    again = perturb_file(src, tmp_path / "again", kind, seed=7)
    assert again.read_bytes() == out.read_bytes()


def test_shift_moves_by_three_percent(tmp_path: Path) -> None:
    grid = np.zeros((200, 300), np.uint8)
    grid[80:120, 100:200] = 255
    src = tmp_path / "box.png"
    Image.fromarray(grid).save(src)
    moved = decode_image(perturb_file(src, tmp_path, "shift", seed=1)).pixels
    rows, cols = np.nonzero(moved > 128)
    assert abs(rows.min() - 80) == 6 and abs(cols.min() - 100) == 9


def test_noise_is_seeded(tmp_path: Path) -> None:
    src = decodable_dicom_files()[0]
    a = decode_image(perturb_file(src, tmp_path / "a", "noise", seed=1)).pixels
    b = decode_image(perturb_file(src, tmp_path / "b", "noise", seed=2)).pixels
    assert not np.array_equal(a, b)


def test_unknown_perturbation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb_file(decodable_dicom_files()[0], tmp_path, "blur", seed=0)


def test_command_line_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert samples.main(["--export", str(tmp_path), "--count", "5"]) == 0
    assert len(list(tmp_path.iterdir())) == 5
    assert "5 images written" in capsys.readouterr().out
