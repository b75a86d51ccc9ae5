"""The research policy's de-identification (app/core/deid.py) attribute by attribute.

Every attribute of PS3.15 Table E.1-1 that pydicom's dictionary knows is written, with a
value of its VR unique to it, into a real file (pydicom-data's CT_small.dcm); the copy must
then show each attribute's action: removed (X), emptied (Z), a dummy (D), a keyed new UID
(U), a date moved by the patient's offset (Retain Longitudinal Temporal Information with
Modified Dates), a descriptor kept without the identifying values (Clean Descriptors), and
none of the values written may survive anywhere in the copy's bytes.
"""

from __future__ import annotations

import io
from datetime import datetime, timedelta

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset

from app.core.deid import (
    CLEAN_DESCRIPTORS,
    Blackout,
    DeidentificationRefused,
    _Keyed,
    action_table,
    deidentify,
    pseudonym_key,
)
from app.core.errors import RadcryptError

KEY = pseudonym_key(bytes(range(32)))
OTHER_KEY = pseudonym_key(bytes(range(1, 33)))
NUMERIC = ("US", "SS", "UL", "SL", "FL", "FD")


def _value(tag: int, vr: str) -> object:
    """A value of ``vr`` that no other attribute has (hex of the tag inside)."""
    mark = f"{tag:08X}"
    return {"PN": f"Doe{mark}^Jane", "DA": "20010203", "TM": "101112.5",
            "DT": "20010203101112", "UI": f"1.2.826.0.1.{tag}", "AS": "045Y",
            "DS": f"7{tag:010d}"[-11:], "IS": f"7{tag:010d}"[-11:],
            "CS": f"C{mark}", "AE": f"AE{mark}", "SH": f"S{mark}",
            "UR": f"http://x/{mark}"}.get(vr, f"Ident {mark} text")


def _table_rows() -> list[tuple[int, str, str]]:
    rows = []
    for category, tags in action_table().items():
        for t in tags:
            if len(t) != 2 or t[0] in (0x0000, 0x0002):  # not dataset attributes
                continue
            tag = (t[0] << 16) | t[1]
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue  # retired or private rows pydicom does not name
            if vr in ("OB", "OW", "UN", "US or SS", "OB or OW") or vr in NUMERIC:
                continue
            rows.append((tag, vr, category))
    return sorted(rows)


@pytest.fixture(scope="module")
def every_attribute() -> tuple[pydicom.Dataset, bytes, pydicom.Dataset]:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for tag, vr, _ in _table_rows():
        if vr == "SQ":
            item = Dataset()
            item.PatientName = f"Nested{tag:08X}^Name"
            item.ReferencedSOPInstanceUID = f"1.2.826.0.2.{tag}"
            ds.add_new(tag, vr, [item])
        else:
            ds.add_new(tag, vr, _value(tag, vr))
    ds.add_new(0x00091001, "LO", "PrivateSecretValue")  # a private attribute
    ds.StudyDescription = f"Head CT of Doe{0x00100010:08X} Jane"
    buf = io.BytesIO()
    ds.save_as(buf)
    source = buf.getvalue()
    return ds, source, pydicom.dcmread(io.BytesIO(deidentify(source, KEY)))


def test_the_action_table_is_the_librarys_and_covers_the_basic_profile() -> None:
    table = action_table()
    assert {"D", "Z", "X", "U"} <= set(table)
    assert sum(len(v) for v in table.values()) > 600  # Table E.1-1 has about 650 rows
    assert len(_table_rows()) > 400


def test_every_attribute_of_the_basic_profile_gets_its_action(every_attribute) -> None:
    source, _, out = every_attribute
    keyed = _Keyed(KEY)
    patient = "|".join(str(source.get(k, "") or "").strip()
                       for k in ("PatientID", "IssuerOfPatientID", "PatientName"))
    days = keyed.shift_days(patient)
    checked = 0
    for tag, vr, action in _table_rows():
        name = f"{keyword_for_tag(tag) or hex(tag)} ({action}, {vr})"
        original = source[tag].value
        if tag in (0x00100010, 0x00100020):
            assert str(out[tag].value) not in (str(original), "")
        elif keyword_for_tag(tag) in CLEAN_DESCRIPTORS:
            assert tag in out, name
        elif vr in ("DA", "DT"):
            moved = (datetime.strptime(str(original)[:8], "%Y%m%d") - timedelta(days=days))
            assert str(out[tag].value)[:8] == moved.strftime("%Y%m%d"), name
        elif vr == "TM":
            assert str(out[tag].value) == str(original), name  # times are retained
        elif action in ("U", "X_Z_U_STAR") and vr == "UI":
            assert out[tag].value == keyed.uid(str(original)), name
        elif vr == "SQ":
            if action.startswith("X") and action != "X_Z_U_STAR":
                assert tag not in out, name
            elif action in ("Z", "D", "Z_D"):
                assert len(out[tag].value) == 0, name
            else:  # kept (U*: its UIDs replaced), its items de-identified
                item = out[tag].value[0]
                assert "Nested" not in str(item.get("PatientName", "")), name
        elif action.startswith("X") and action not in ("X_D", "X_Z_D"):
            assert tag not in out, name
        elif action == "Z":
            assert out[tag].value in ("", None), name
        else:  # D and its combinations: a dummy, never the original
            assert tag in out and out[tag].value != original, name
        checked += 1
    assert checked > 400
    assert 0x00091001 not in out  # private attributes are removed
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107", "113105"]  # CID 7050
    assert out.StudyDescription == "Head CT of"  # clean descriptors: the name is gone


def test_no_written_value_survives_in_the_copys_bytes(every_attribute) -> None:
    source, raw, out = every_attribute
    buf = io.BytesIO()
    out.save_as(buf)
    copy = deidentify(raw, KEY)
    assert buf.getvalue() == copy  # deterministic: the same file, the same copy
    leaks = []
    for tag, vr, _ in _table_rows():
        if vr in ("TM", "DA", "DT", "SQ") or keyword_for_tag(tag) in CLEAN_DESCRIPTORS:
            continue
        value = str(source[tag].value).encode()
        if len(value) >= 4 and value in copy:
            leaks.append(keyword_for_tag(tag))
    assert leaks == [], leaks
    for value in (b"20010203", b"PrivateSecretValue", b"Nested", b"1.2.826.0.2."):
        assert value not in copy
    for element in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID"):
        original = str(source.get(element) or "").encode()
        assert not original or original not in copy, element


def test_pseudonyms_and_uids_are_stable_per_key_and_differ_across_keys() -> None:
    data = open(get_testdata_file("MR_small.dcm"), "rb").read()
    a = pydicom.dcmread(io.BytesIO(deidentify(data, KEY)))
    again = pydicom.dcmread(io.BytesIO(deidentify(data, KEY)))
    other = pydicom.dcmread(io.BytesIO(deidentify(data, OTHER_KEY)))
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                    "SOPInstanceUID", "StudyDate"):
        assert a[keyword].value == again[keyword].value, keyword
        assert a[keyword].value != other[keyword].value, keyword
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID


def test_images_that_may_carry_burned_in_text_are_refused_without_blackout() -> None:
    for name in ("US1_J2KR.dcm", "SC_rgb.dcm"):  # US and OT without BurnedInAnnotation
        with pytest.raises(DeidentificationRefused, match="burned-in"):
            deidentify(open(get_testdata_file(name), "rb").read(), KEY, where=name)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(DeidentificationRefused, match="BurnedInAnnotation YES"):
        deidentify(buf.getvalue(), KEY)
    with pytest.raises(DeidentificationRefused, match="DICOM files only"):
        deidentify(b"\x89PNG\r\n\x1a\n not dicom", KEY, where="photo.png")


def test_blackout_regions_are_painted_into_every_frame_before_the_copy() -> None:
    name = "US1_J2KR.dcm"
    source = pydicom.dcmread(get_testdata_file(name))
    before = np.array(source.pixel_array)
    region = Blackout.parse("10,20,30,15")
    out = pydicom.dcmread(io.BytesIO(deidentify(open(get_testdata_file(name), "rb").read(),
                                                KEY, [region], where=name)))
    after = out.pixel_array
    assert after.shape == before.shape
    box = after[20:35, 10:40]
    assert (box == box.min()).all() and box.max() == after.min()
    assert before[20:35, 10:40].std() > 0  # there was something to paint over
    np.testing.assert_array_equal(after[40:, 50:], before[40:, 50:])  # the rest untouched
    assert out.BurnedInAnnotation == "NO"
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence][-1] == "113101"
    for text in ("1,2,3", "a,b,c,d", "1,2,0,4"):
        with pytest.raises(RadcryptError, match="blackout region"):
            Blackout.parse(text)
