"""Grouping on the workstation (app/core/studies.py, DESIGN.md section 9) and the grouping of
search hits by series (app/core/searcher.py ``group_hits``), on metadata records as the
importer writes them: no storage needed, so every rule is checked on exactly the case
that breaks it (UIDs shared and missing, shuffled instance numbers, positions without
numbers, frames, dates, ambiguous prefixes).
"""

from __future__ import annotations

import random
import re
from typing import Any

import pytest

from app.core.errors import RadcryptError
from app.core.meta import ImageMeta
from app.core.searcher import Hit, group_hits
from app.core.studies import (
    LONE_PREFIX,
    date_display,
    find_series,
    find_study,
    group_series,
    group_studies,
    instance_label,
    patient_display,
    series_key,
    series_rows,
)

STUDY_CT = "1.2.826.0.1.3680043.8.498.1001"
STUDY_MR = "1.2.826.0.1.3680043.8.498.2002"
SERIES_CT_AX = "1.2.826.0.1.3680043.8.498.1001.1"
SERIES_CT_COR = "1.2.826.0.1.3680043.8.498.1001.2"
SERIES_MR = "1.2.826.0.1.3680043.8.498.2002.7"
AXIAL = "1\\0\\0\\0\\1\\0"  # ImageOrientationPatient of an axial slice: normal = +z


def meta(image_id: str, **clinical: str) -> ImageMeta:
    frame = int(clinical.pop("frame", "0"))
    frames = int(clinical.pop("frames", "1"))
    original = clinical.pop("original", "")
    record: dict[str, Any] = {"name": f"{image_id}.dcm", "clinical": clinical,
                              "frame": frame, "frames": frames, "original": original}
    return ImageMeta.from_record(image_id, record)


def ct_slice(image_id: str, instance: str, z: float, series: str = SERIES_CT_AX,
             number: str = "2") -> ImageMeta:
    return meta(image_id, StudyInstanceUID=STUDY_CT, SeriesInstanceUID=series,
                PatientName="DOE^JANE", PatientID="P-17", StudyDate="20240131",
                StudyTime="101500", Modality="CT", StudyDescription="CHEST W CONTRAST",
                SeriesDescription="AXIAL 5mm" if series == SERIES_CT_AX else "CORONAL",
                SeriesNumber=number, InstanceNumber=instance,
                ImagePositionPatient=f"-100\\-100\\{z}", ImageOrientationPatient=AXIAL)


def archive() -> list[ImageMeta]:
    images = [ct_slice(f"ct{i:02d}", str(i), -50.0 + 5 * i) for i in range(1, 9)]
    images += [ct_slice(f"cor{i}", str(i), 0.0, SERIES_CT_COR, "3") for i in range(1, 4)]
    images += [meta(f"mr{f}", StudyInstanceUID=STUDY_MR, SeriesInstanceUID=SERIES_MR,
                    PatientName="ROE^RICHARD^A", PatientID="P-99", StudyDate="20250612",
                    Modality="MR", SeriesNumber="7", SeriesDescription="T1 SAG",
                    InstanceNumber="1", frame=str(f), frames="4",
                    original="" if f == 0 else "mr0") for f in range(4)]
    images += [meta("png1"), meta("png2")]  # no UIDs at all: a study each
    return images


def shuffled(images: list[ImageMeta], seed: int) -> list[ImageMeta]:
    out = list(images)
    random.Random(seed).shuffle(out)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_images_group_into_studies_by_uid_newest_first_lone_images_alone(seed: int) -> None:
    studies = group_studies(shuffled(archive(), seed))
    assert [s.key for s in studies] == [STUDY_MR, STUDY_CT, LONE_PREFIX + "png1",
                                        LONE_PREFIX + "png2"], f"seed {seed}"
    mr, ct = studies[0], studies[1]
    assert (mr.patient_name, mr.study_date, mr.modalities) == ("ROE^RICHARD^A", "20250612",
                                                                ("MR",))
    assert [s.key for s in ct.series] == [SERIES_CT_AX, SERIES_CT_COR]  # series number 2, 3
    assert [len(s.images) for s in ct.series] == [8, 3] and ct.image_count == 11
    assert ct.description == "CHEST W CONTRAST" and ct.series[0].description == "AXIAL 5mm"
    lone = studies[2]
    assert len(lone.series) == 1 and lone.series[0].image_ids == ("png1",)
    assert lone.description == "png1.dcm"  # its file name: something to recognise it by


def test_undated_studies_come_last_and_same_day_studies_by_time() -> None:
    images = [meta("a", StudyInstanceUID="1.1", SeriesInstanceUID="1.1.1", StudyDate=""),
              meta("b", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.1",
                   StudyDate="20240101", StudyTime="080000"),
              meta("c", StudyInstanceUID="1.3", SeriesInstanceUID="1.3.1",
                   StudyDate="20240101", StudyTime="170000"),
              meta("d", StudyInstanceUID="1.4", SeriesInstanceUID="1.4.1",
                   StudyDate="20231231")]
    assert [s.key for s in group_studies(images)] == ["1.3", "1.2", "1.4", "1.1"]


@pytest.mark.parametrize("seed", [3, 4])
def test_a_series_is_stacked_by_instance_number_not_by_name_or_import_order(seed: int
                                                                           ) -> None:
    # instance numbers shuffled against positions and ids: the number decides
    images = [ct_slice(f"id{i}", str(n), z) for i, (n, z) in
              enumerate([(3, 10.0), (1, 30.0), (10, 0.0), (2, 20.0)])]
    (series,) = group_series(shuffled(images, seed))
    assert [m.attribute("InstanceNumber") for m in series.images] == ["1", "2", "3", "10"]
    assert series.thumbnail.attribute("InstanceNumber") == "3"  # the middle of the stack


def test_without_instance_numbers_the_slice_position_along_the_normal_orders() -> None:
    images = [meta(f"s{i}", StudyInstanceUID=STUDY_CT, SeriesInstanceUID=SERIES_CT_AX,
                   ImagePositionPatient=f"0\\0\\{z}", ImageOrientationPatient=AXIAL)
              for i, z in enumerate([12.5, -7.5, 2.5, 100.0])]
    (series,) = group_series(images)
    assert [m.image_id for m in series.images] == ["s1", "s2", "s0", "s3"]


def test_frames_of_one_instance_stack_in_frame_order_and_group_without_uids() -> None:
    frames = [meta(f"f{i}", frame=str(i), frames="3", original="" if i == 0 else "f0")
              for i in (2, 0, 1)]
    (series,) = group_series(frames)
    assert series.key == LONE_PREFIX + "f0" and series.image_ids == ("f0", "f1", "f2")
    assert series_key(frames[0]) == LONE_PREFIX + "f0"
    assert instance_label(frames[0]) == "frame 3/3"


def test_damaged_metadata_is_left_out_of_the_grouping() -> None:
    images = [ct_slice("ok", "1", 0.0), ImageMeta.damaged("bad", "authentication failed")]
    (study,) = group_studies(images)
    assert study.images[0].image_id == "ok" and study.image_count == 1


def test_words_for_people() -> None:
    assert patient_display("DOE^JANE") == "DOE, JANE"
    assert patient_display("ROE^RICHARD^A^^") == "ROE, RICHARD A"
    assert patient_display("Anonymous") == "Anonymous" and patient_display("") == ""
    assert date_display("20240131") == "2024-01-31" and date_display("2024") == "2024"
    assert instance_label(ct_slice("x", "42", 0.0)) == "instance 42"
    mr = next(m for m in archive() if m.image_id == "mr2")
    assert instance_label(mr) == "instance 1, frame 3/4"


def test_a_study_is_found_by_uid_row_number_or_unique_prefix() -> None:
    studies = group_studies(archive())
    assert find_study(studies, STUDY_CT) is studies[1]
    assert find_study(studies, "2") is studies[1]
    assert find_study(studies, "1.2.826.0.1.3680043.8.498.2") is studies[0]
    assert find_study(studies, "png2") is studies[3]  # a lone image by its id
    with pytest.raises(RadcryptError,
                       match=re.escape("2 studies match '1.2.826.0.1.3680043.8.498'")):
        find_study(studies, "1.2.826.0.1.3680043.8.498")
    with pytest.raises(RadcryptError, match=re.escape("no study matches '9.9'")):
        find_study(studies, "9.9")


def test_a_series_is_found_by_uid_row_label_archive_row_or_prefix() -> None:
    studies = group_studies(archive())
    rows = series_rows(studies)
    assert [label for label, _ in rows] == ["1.1", "2.1", "2.2", "3.1", "4.1"]
    assert find_series(studies, "2.2").key == SERIES_CT_COR
    assert find_series(studies, "3").key == SERIES_CT_COR  # third series of the archive
    assert find_series(studies, SERIES_MR).key == SERIES_MR
    assert find_series(studies, "1.2.826.0.1.3680043.8.498.1001.1").key == SERIES_CT_AX
    with pytest.raises(RadcryptError, match="no series number 6"):
        find_series(studies, "6")
    with pytest.raises(RadcryptError,
                       match=re.escape("2 series match '1.2.826.0.1.3680043.8.498.1001.'")):
        find_series(studies, "1.2.826.0.1.3680043.8.498.1001.")


def hit(rank: int, series: str, distance: float) -> Hit:
    return Hit(rank=rank, image_id=f"h{rank}", name=f"h{rank}", distance=distance,
               score=distance, key_version=1, series_key=series)


def test_hits_of_one_series_collapse_under_their_best_hit() -> None:
    hits = [hit(1, "A", 0.0), hit(2, "A", 0.1), hit(3, "B", 0.2), hit(4, "A", 0.3),
            hit(5, "C", 0.4), hit(6, "B", 0.5), hit(7, "D", 0.6)]
    groups = group_hits(hits, 3)
    assert [(g.rank, g.series_key, g.best.rank, g.more) for g in groups] == [
        (1, "A", 1, 2), (2, "B", 3, 1), (3, "C", 5, 0)]
    assert [h.rank for h in groups[0].others] == [2, 4]
    assert [h.group for h in hits] == [1, 1, 2, 1, 3, 2, 0]  # D is beyond the 3 series
    assert group_hits([], 3) == []


def test_find_similar_leaves_the_query_image_out_and_keeps_k_series() -> None:
    from app.core.searcher import QueryResult
    from app.core.searcher import drop_image as _drop

    def answer(k: int) -> QueryResult:
        hits = [hit(1, "A", 0.0), hit(2, "A", 0.1), hit(3, "B", 0.2), hit(4, "C", 0.3),
                hit(5, "D", 0.4)]
        return QueryResult("q", hits[:k], {}, {}, True, grouped=True,
                           groups=group_hits(hits, k), asked=5)

    # the query (h1) was the best of series A: h2 takes its place, three series remain
    result = answer(3)
    _drop(result, "h1", 2)
    assert [(g.series_key, g.best.image_id, g.more) for g in result.groups] == [
        ("A", "h2", 0), ("B", "h3", 0)]
    assert [(h.image_id, h.rank, h.group) for h in result.hits] == [("h2", 1, 1),
                                                                    ("h3", 2, 2)]
    # the query alone in its series (h3): its series goes, the next one comes in
    result = answer(4)
    _drop(result, "h3", 3)
    assert [(g.series_key, g.best.image_id, g.best.rank) for g in result.groups] == [
        ("A", "h1", 1), ("C", "h4", 3), ("D", "h5", 4)]
    assert [h.image_id for h in result.hits] == ["h1", "h2", "h4"]
