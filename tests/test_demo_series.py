"""The demo's real series (resources/series.py) and the demo built from them (app/core/demo.py).

The MR study is checked against the data it comes from, not against its own code: every
pixel of a written slice, placed in space by the file's own ImagePositionPatient,
ImageOrientationPatient and PixelSpacing, is mapped back through the template's affine to
the voxel it must hold. Grouping goes through app.core.studies as the client does, from
the attributes the importer keeps (app.imaging.clinical). The end-to-end run is the demo
itself on a small archive: every query finds its original and agrees with plaintext.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from app.core.meta import ImageMeta
from app.core.studies import group_studies
from app.imaging.clinical import clinical_attributes
from resources.series import (
    MAX_SLICES_PER_SERIES,
    PLANES,
    load_mni_t1,
    slices_per_series,
    write_mr_brain_study,
)

PER_SERIES = 4


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_mr_brain_study(tmp_path_factory.mktemp("series"), PER_SERIES * len(PLANES))


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    o = np.array([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(o[:3], o[3:])


def test_every_pixel_holds_the_template_voxel_at_its_dicom_position(study: list[Path]) -> None:
    volume, affine = load_mni_t1()
    inverse = np.linalg.inv(affine)
    for path in study:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        o = np.array([float(v) for v in ds.ImageOrientationPatient])
        row_dir, col_dir = o[:3], o[3:]  # along a row (next column), along a column
        dr, dc = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        r, c = np.mgrid[0:pixels.shape[0], 0:pixels.shape[1]]
        lps = (np.array([float(v) for v in ds.ImagePositionPatient])[None, None, :]
               + c[..., None] * dc * row_dir + r[..., None] * dr * col_dir)
        ras = np.concatenate([-lps[..., :2], lps[..., 2:], np.ones((*lps.shape[:2], 1))],
                             axis=-1)
        voxel = ras @ inverse.T
        index = np.rint(voxel[..., :3]).astype(int)
        assert np.abs(voxel[..., :3] - index).max() < 1e-3, path.name
        assert np.array_equal(volume[index[..., 0], index[..., 1], index[..., 2]], pixels), (
            f"{path.name}: pixels are not where ImagePositionPatient/Orientation put them")
        assert abs(np.dot(row_dir, col_dir)) < 1e-9
        assert pixels.std() > 0, f"{path.name} is blank"


def test_one_study_of_three_ordered_series_as_the_client_groups_them(study: list[Path]
                                                                      ) -> None:
    datasets = [pydicom.dcmread(p) for p in study]
    metas = [ImageMeta(image_id=hashlib.sha256(ds.SOPInstanceUID.encode()).hexdigest()[:16],
                       name=p.name, source_format="dicom", clinical=clinical_attributes(ds))
             for p, ds in zip(study, datasets, strict=True)]
    studies = group_studies(metas)
    assert len(studies) == 1
    (mr,) = studies
    assert mr.modalities == ("MR",) and mr.image_count == PER_SERIES * len(PLANES)
    assert mr.patient_name and mr.study_date and mr.description
    assert [s.description for s in mr.series] == [f"T1 {p.name} 1 mm" for p in PLANES]
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for series in mr.series:
        stack = [by_uid[m.attribute("SOPInstanceUID")] for m in series.images]
        assert [int(ds.InstanceNumber) for ds in stack] == list(range(1, PER_SERIES + 1))
        normal = _normal(stack[0])
        along = [float(np.dot([float(v) for v in ds.ImagePositionPatient], normal))
                 for ds in stack]
        steps = np.diff(along)
        assert np.all(steps > 0), f"{series.description}: instance order is not the stack"
        assert np.allclose(steps, float(stack[0].SpacingBetweenSlices), atol=1.01), steps
        assert all(np.allclose(_normal(ds), normal) for ds in stack)


def test_the_same_files_every_run_so_a_reimport_is_a_no_op(study: list[Path],
                                                          tmp_path: Path) -> None:
    again = write_mr_brain_study(tmp_path, PER_SERIES * len(PLANES))
    assert [p.name for p in again] == [p.name for p in study]
    for a, b in zip(study, again, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_the_budget_bounds_the_slices() -> None:
    assert slices_per_series(8) == 0  # fewer than three slices per series: no study
    assert slices_per_series(9) == 3
    assert slices_per_series(10_000) == MAX_SLICES_PER_SERIES


def test_demo_files_are_series_first_then_distinct_flat_samples(tmp_path: Path) -> None:
    from app.core.demo import sample_files
    from app.imaging.decode import decode_image
    from app.imaging.features import extract_features

    files = sample_files(tmp_path, 30)
    assert len(files) == 30 and len(set(files)) == 30
    assert all(p.name.startswith("mni152-t1-") for p in files[:15])
    assert not any(p.name.startswith("mni152-t1-") for p in files[15:])
    features = np.stack([extract_features(decode_image(p)) for p in files])
    sq = np.sum(features**2, axis=1)
    dist = sq[:, None] + sq[None, :] - 2 * features @ features.T
    np.fill_diagonal(dist, np.inf)
    assert dist.min() > 1e-9, "two demo images look the same to the search"


def test_demo_with_series_finds_every_original_and_agrees_with_plaintext(tmp_path: Path
                                                                        ) -> None:
    from app.core.demo import run_demo
    from app.core.settings import Settings

    settings = Settings(store="directory", data_dir=str(tmp_path / "data"), workers=1)
    report = run_demo(settings, tmp_path / "work", count=20, queries=4)
    assert report.images == 20 and report.archive_images >= 20
    assert len(report.rows) == 4
    assert any(r.expected.startswith("mni152-t1-") for r in report.rows)
    bad = [r for r in report.rows if not (r.matched and r.plaintext_agrees)]
    assert not bad, bad
    assert report.agreement == 1.0


def test_sample_queries_cycle_the_planes_and_find_their_slice(tmp_path: Path) -> None:
    from app.imaging.decode import decode_image
    from app.imaging.features import extract_features
    from resources.series import demo_series_folder, sample_query

    assert sample_query(tmp_path, 0) is None  # no series written: nothing to offer
    slices = write_mr_brain_study(demo_series_folder(tmp_path), 36)
    archive = np.stack([extract_features(decode_image(p)) for p in slices])
    planes = []
    for number in range(6):
        made = sample_query(tmp_path, number)
        assert made is not None
        query, original = made
        assert query.parent == tmp_path / "queries" and original in slices
        planes.append(original.name.split("-")[2])
        if number < 3:  # the middle slice of each series: its copy is nearest to it
            distance = np.sum((archive - extract_features(decode_image(query))) ** 2, axis=1)
            assert slices[int(np.argmin(distance))] == original, query.name
    assert planes == ["axial", "coronal", "sagittal"] * 2
    assert len({p.name for p in (tmp_path / "queries").iterdir()}) == 6
