"""DICOMweb against a real Orthanc and its DICOMweb plugin (app/integration/dicomweb.py).

QIDO-RS find (studies, series, filters) checked against what Orthanc's own REST API says
it holds; WADO-RS retrieve gives the bytes that were stored, byte for byte, into private
files; a cancel, a server that drops the connection mid-study (a relay that cuts the
answer) and a server that is not there leave nothing behind and say so in plain words;
STOW-RS store then read back through Orthanc's REST API, byte for byte, with a non-DICOM
file reported failed by name; basic auth against an Orthanc that requires it, the password
coming from a real keyring backend (in memory, set with keyring.set_keyring), a wrong one
refused in words that never hold it.

The study is real pixel data (pydicom-data's CT_small and MR_small) written as a
two-series study with its own UIDs, like tests/test_cli_studies.py does.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from app.core.errors import Cancelled
from app.core.progress import CancelToken, ProgressEvent
from app.integration import dicomweb, secrets
from app.integration.dicomweb import DicomWebError
from app.integration.model import DicomNode

try:
    from memory_keyring import MemoryKeyring, use_memory_keyring
    from servers import DICOMWEB_PLUGIN, Orthanc, free_port, require_orthanc, stop_pid
except ImportError:  # pragma: no cover
    from tests.integration.memory_keyring import MemoryKeyring, use_memory_keyring
    from tests.integration.servers import (
        DICOMWEB_PLUGIN,
        Orthanc,
        free_port,
        require_orthanc,
        stop_pid,
    )

ROOT = "1.2.826.0.1.3680043.8.498.7718"  # the test's own UID root
STUDY, OTHER, STOWED = f"{ROOT}.1", f"{ROOT}.2", f"{ROOT}.3"
AXIAL, SCOUT = f"{STUDY}.1", f"{STUDY}.2"
USER, PASSWORD = "alice", "orthanc web passphrase 7 lantern"


def _write(src: str, dest: Path, shift: int, **attrs: Any) -> Path:
    ds = pydicom.dcmread(get_testdata_file(src))
    pixels = ds.pixel_array.astype(np.int32)
    ds.PixelData = np.clip(np.roll(pixels, shift, axis=1) + shift, 0, 30000).astype(
        ds.pixel_array.dtype).tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = f"{attrs['SeriesInstanceUID']}.{attrs['InstanceNumber']}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dest, enforce_file_format=True)
    return dest


def make_study(folder: Path) -> dict[str, list[Path]]:
    """STUDY: a CT axial series of 5 and a scout of 2; OTHER: an MR of 2; STOWED: a CT of 3
    that only STOW sends."""
    folder.mkdir(parents=True, exist_ok=True)
    ct = {"StudyInstanceUID": STUDY, "StudyDate": "20240131", "StudyTime": "101500",
          "PatientName": "DOE^JANE", "PatientID": "P-17", "AccessionNumber": "ACC-1",
          "Modality": "CT", "StudyDescription": "CHEST W CONTRAST", "BodyPartExamined": "CHEST"}
    files: dict[str, list[Path]] = {"study": [], "other": [], "stowed": []}
    for i in range(1, 6):
        files["study"].append(_write("CT_small.dcm", folder / f"ax{i}.dcm", 3 * i, **ct,
                                     SeriesInstanceUID=AXIAL, SeriesNumber=2,
                                     InstanceNumber=i))
    for i in (1, 2):
        files["study"].append(_write("CT_small.dcm", folder / f"sc{i}.dcm", 40 * i, **ct,
                                     SeriesInstanceUID=SCOUT, SeriesNumber=1,
                                     InstanceNumber=i))
    for i in (1, 2):
        files["other"].append(_write(
            "MR_small.dcm", folder / f"mr{i}.dcm", 2 * i, StudyInstanceUID=OTHER,
            StudyDate="20250612", PatientName="ROE^RICHARD", PatientID="P-99",
            AccessionNumber="ACC-2", Modality="MR", SeriesInstanceUID=f"{OTHER}.1",
            SeriesNumber=7, InstanceNumber=i))
    for i in (1, 2, 3):
        files["stowed"].append(_write(
            "CT_small.dcm", folder / f"stow{i}.dcm", 5 * i, **{**ct, "StudyInstanceUID":
                                                                STOWED, "PatientID": "P-3"},
            SeriesInstanceUID=f"{STOWED}.1", SeriesNumber=1, InstanceNumber=i))
    return files


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return make_study(tmp_path_factory.mktemp("dicomweb-files"))


@pytest.fixture(scope="module")
def pacs(orthanc: Orthanc, files: dict[str, list[Path]]) -> Orthanc:
    """The module's Orthanc holding STUDY and OTHER (uploaded through REST, not DICOMweb)."""
    for path in files["study"] + files["other"]:
        orthanc.upload(path)
    return orthanc


@pytest.fixture
def node(pacs: Orthanc) -> DicomNode:
    return DicomNode(name="orthanc-web", dicomweb_url=pacs.dicomweb_url)


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# --- QIDO-RS --------------------------------------------------------------------------------


def test_echo_and_find_studies_list_what_orthanc_holds(pacs: Orthanc, node: DicomNode) -> None:
    result = dicomweb.echo(node)
    assert result.ok and result.seconds < 10 and pacs.dicomweb_url in result.message

    found = {s.study_uid: s for s in dicomweb.find_studies(node)}
    # the oracle: Orthanc's REST API, not its DICOMweb plugin
    held = {pacs.get(f"/studies/{sid}")["MainDicomTags"]["StudyInstanceUID"]
            for sid in pacs.studies()}
    assert set(found) == held == {STUDY, OTHER}
    ct = found[STUDY]
    assert (ct.patient_name, ct.patient_id, ct.study_date, ct.accession, ct.description) == (
        "DOE^JANE", "P-17", "20240131", "ACC-1", "CHEST W CONTRAST")
    assert ct.modalities == ("CT",) and ct.series_count == 2 and ct.instance_count == 7
    assert found[OTHER].modalities == ("MR",) and found[OTHER].instance_count == 2


@pytest.mark.parametrize(("filters", "expected"), [
    ({"patient_id": "P-17"}, {STUDY}),
    ({"patient_name": "ROE*"}, {OTHER}),
    ({"modality": "MR"}, {OTHER}),
    ({"study_date": "20240101-20241231"}, {STUDY}),
    ({"accession": "ACC-2", "modality": ""}, {OTHER}),
    ({"patient_id": "P-17", "modality": "MR"}, set()),
    ({"StudyInstanceUID": OTHER}, {OTHER}),
])
def test_find_studies_filters(node: DicomNode, filters: dict[str, str],
                              expected: set[str]) -> None:
    assert {s.study_uid for s in dicomweb.find_studies(node, filters)} == expected


def test_find_series_of_a_study(node: DicomNode) -> None:
    series = sorted(dicomweb.find_series(node, STUDY), key=lambda s: s.number)
    assert [(s.series_uid, s.modality, s.number, s.instance_count) for s in series] == [
        (SCOUT, "CT", "1", 2), (AXIAL, "CT", "2", 5)]
    assert all(s.study_uid == STUDY for s in series)
    assert dicomweb.find_series(node, f"{ROOT}.404") == []


def test_an_unknown_filter_is_named(node: DicomNode) -> None:
    with pytest.raises(DicomWebError, match="unknown study filter 'patient'"):
        dicomweb.find_studies(node, {"patient": "x"})


# --- WADO-RS --------------------------------------------------------------------------------


def test_retrieve_gives_the_stored_bytes_in_private_files(
        pacs: Orthanc, node: DicomNode, files: dict[str, list[Path]], tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    got = dicomweb.retrieve_study(node, STUDY, tmp_path / "spool", progress=events.append)
    assert len(got) == 7 and len(events) == 7 and events[-1].done == 7
    originals = {_sop(p): p.read_bytes() for p in files["study"]}
    for path in got:
        data = path.read_bytes()
        sop = _sop(path)
        assert data == originals.pop(sop), f"{path.name} differs from the file stored"
        assert data == pacs.instance_file(pacs.instance_by_sop(sop))
        assert path.stat().st_mode & 0o777 == 0o600
    assert not originals  # every instance came back, none twice
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == sorted(p.name for p in got)


def test_retrieve_cancelled_mid_study_leaves_nothing(node: DicomNode, tmp_path: Path) -> None:
    cancel = CancelToken()

    def progress(event: ProgressEvent) -> None:
        if event.done == 3:
            cancel.cancel()

    with pytest.raises(Cancelled):
        dicomweb.retrieve_study(node, STUDY, tmp_path, cancel, progress=progress)
    assert list(tmp_path.iterdir()) == []


def test_retrieve_of_an_unknown_study_is_refused_in_plain_words(node: DicomNode,
                                                                tmp_path: Path) -> None:
    with pytest.raises(DicomWebError, match=r"node orthanc-web \(http://127\.0\.0\.1:\d+/"
                                            r"dicom-web\) has no instance of study"):
        dicomweb.retrieve_study(node, f"{ROOT}.404", tmp_path)
    assert list(tmp_path.iterdir()) == []


class CutOff:
    """A TCP relay to Orthanc that forwards requests whole but only the first ``limit``
    bytes of each answer (all of it when None), then closes both sides: a PACS that goes
    away mid-transfer. ``answered`` counts the bytes of the last answer relayed."""

    def __init__(self, upstream: int, limit: int | None = None) -> None:
        self.upstream, self.limit = upstream, limit
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.cut = 0
        self.answered = 0
        self.tail = b""  # the last bytes of the last answer relayed
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.server.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.upstream))
        threading.Thread(target=self._pipe, args=(conn, up, False), daemon=True).start()
        self._pipe(up, conn, True)

    def _pipe(self, src: socket.socket, dst: socket.socket, answer: bool) -> None:
        sent = 0
        limit = self.limit if answer else None
        with contextlib.suppress(OSError):
            while limit is None or sent < limit:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None:
                    data = data[: limit - sent]
                dst.sendall(data)
                sent += len(data)
                if answer:
                    self.tail = (self.tail + data)[-64:]
            if limit is not None and sent >= limit:
                self.cut += 1
        if answer:
            self.answered = sent
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("keep", ["half", "every part but not the closing --",
                                  "the closing boundary cut"])
def test_a_pacs_going_away_mid_study_leaves_nothing(pacs: Orthanc, tmp_path: Path,
                                                    keep: str) -> None:
    relay = CutOff(pacs.http_port)
    try:
        node = DicomNode(name="flaky", dicomweb_url=f"http://127.0.0.1:{relay.port}/dicom-web")
        whole = dicomweb.retrieve_study(node, STUDY, tmp_path / "whole")  # through the relay
        assert len(whole) == 7 and relay.cut == 0
        # the study's answer is the last one relayed: cut it (the QIDO listing goes whole)
        size = relay.answered
        # the message ends "\r\n--BOUNDARY--" (and maybe "\r\n"): without its last "--"
        # every part is whole, and only the missing end says the answer was cut
        trailing = 4 if relay.tail.endswith(b"--\r\n") else 2
        relay.limit = {"half": size // 2, "the closing boundary cut": size - trailing - 5
                       }.get(keep, size - trailing)
        match = (r"flaky .*dropped the connection after 7 instance" if keep.startswith("every")
                 else r"flaky .*(dropped|incomplete|cannot be read)")
        with pytest.raises(DicomWebError, match=match):
            dicomweb.retrieve_study(node, STUDY, tmp_path / "cut")
    finally:
        relay.close()
    assert relay.cut >= 1
    assert list((tmp_path / "cut").iterdir()) == []


def test_a_node_that_is_not_there_is_named(tmp_path: Path) -> None:
    node = DicomNode(name="gone", dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(DicomWebError, match=r"node gone \(http://127\.0\.0\.1:\d+/dicom-web\) "
                                            "does not answer"):
        dicomweb.retrieve_study(node, STUDY, tmp_path)
    result = dicomweb.echo(node)
    assert not result.ok and "does not answer" in result.message


# --- STOW-RS --------------------------------------------------------------------------------


def test_store_then_read_back_byte_for_byte(pacs: Orthanc, node: DicomNode,
                                            files: dict[str, list[Path]], tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    # DICOM that Orthanc refuses (no Series Instance UID): it answers 400 for the whole
    # request, so the batch is sent again one by one and only this one fails
    broken = pydicom.dcmread(files["stowed"][0])
    del broken.SeriesInstanceUID
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = f"{STOWED}.9.9"
    broken.save_as(tmp_path / "broken.dcm")
    sending = {f"id{i}": p for i, p in enumerate(files["stowed"])} | {
        "junk": junk, "broken": tmp_path / "broken.dcm"}
    events: list[ProgressEvent] = []
    report = dicomweb.store(node, sending, progress=events.append)
    assert sorted(report.sent) == ["id0", "id1", "id2"]
    reasons = dict(report.failed)
    assert reasons.pop("junk") == "notes.txt is not a DICOM instance (InvalidDicomError)"
    assert reasons.pop("broken").startswith(f"SOP instance {STOWED}.9.9: node orthanc-web")
    assert not reasons and events and events[-1].done == 5
    with pytest.raises(KeyError):
        pacs.instance_by_sop(f"{STOWED}.9.9")
    for path in files["stowed"]:  # read back through REST: the same bytes
        assert pacs.instance_file(pacs.instance_by_sop(_sop(path))) == path.read_bytes()
    assert {s.study_uid for s in dicomweb.find_studies(node, {"patient_id": "P-3"})} == {STOWED}
    back = dicomweb.retrieve_study(node, STOWED, tmp_path / "back")
    assert sorted(p.read_bytes() for p in back) == sorted(p.read_bytes()
                                                          for p in files["stowed"])


# --- basic auth, password from the keyring --------------------------------------------------


@pytest.fixture
def memory_keyring(secrets_never_logged: list[bytes | str]) -> Iterator[MemoryKeyring]:
    secrets_never_logged.append(PASSWORD)  # the suite's log check looks for it too
    with use_memory_keyring() as ring:
        yield ring


@pytest.fixture(scope="module")
def locked_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An Orthanc that requires HTTP basic auth (user alice); yields its DICOMweb URL.
    servers.start_orthanc waits on an unauthenticated /system, so it is started here."""
    binary = require_orthanc()
    root = tmp_path_factory.mktemp("orthanc-auth")
    port = free_port()
    config = {"Name": "RADAUTH", "StorageDirectory": str(root / "db"),
              "IndexDirectory": str(root / "db"), "HttpPort": port, "DicomPort": free_port(),
              "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
              "RegisteredUsers": {USER: PASSWORD}, "Plugins": [DICOMWEB_PLUGIN],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (root / "orthanc.json").write_text(json.dumps(config))
    with (root / "orthanc.log").open("ab") as log:
        process = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=log,
                                   stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + "/system", auth=(USER, PASSWORD), timeout=2).ok:
                    break
            assert process.poll() is None, (root / "orthanc.log").read_text()[-2000:]
            time.sleep(0.2)
        requests.post(url + "/instances", auth=(USER, PASSWORD), timeout=30,
                      data=Path(get_testdata_file("CT_small.dcm")).read_bytes()
                      ).raise_for_status()
        yield url + "/dicom-web"
    finally:
        stop_pid(process)


def test_basic_auth_with_the_password_from_the_keyring(locked_pacs: str,
                                                       memory_keyring: MemoryKeyring,
                                                       tmp_path: Path) -> None:
    node = DicomNode(name="locked", dicomweb_url=locked_pacs, username=USER)
    with pytest.raises(secrets.PasswordMissing, match="node locked needs the DICOMweb "
                                                      "password of user alice"):
        dicomweb.find_studies(node)
    secrets.set_password(node, "wrong horse battery")
    with pytest.raises(DicomWebError, match=r"user name or password was refused \(HTTP 401\)"
                       ) as refused:
        dicomweb.find_studies(node)
    assert "wrong horse" not in str(refused.value)
    result = dicomweb.echo(node)
    assert not result.ok and "HTTP 401" in result.message and "wrong" not in result.message

    secrets.set_password(node, PASSWORD)
    assert list(memory_keyring.entries.values()) == [PASSWORD]  # replaced, one entry
    studies = dicomweb.find_studies(node)
    assert [s.patient_id for s in studies] == ["1CT1"]
    got = dicomweb.retrieve_study(node, studies[0].study_uid, tmp_path)
    assert [p.read_bytes() for p in got] == [
        Path(get_testdata_file("CT_small.dcm")).read_bytes()]
    assert dicomweb.echo(node).ok
    # the same node pointed at another server does not take this password there
    moved = DicomNode(name="locked", dicomweb_url="http://127.0.0.1:9/dicom-web",
                      username=USER)
    assert secrets.get_password(moved) is None
    # a prompt's answer (not kept) works without the keyring
    assert secrets.delete_password(node)
    assert dicomweb.find_studies(node, password=PASSWORD)[0].patient_id == "1CT1"
    assert memory_keyring.entries == {}


def test_the_facade_imports_from_and_sends_to_a_locked_web_node(
        locked_pacs: str, memory_keyring: MemoryKeyring, files: dict[str, list[Path]],
        tmp_path: Path) -> None:
    """client.pacs with a DICOMweb-only node that wants basic auth: the password set once
    (OS keyring), then echo, find, import a study (WADO-RS into the spool, then the normal
    import path) and send decrypted originals (STOW-RS), read back byte for byte."""
    from app.core import client as facade
    from app.core.settings import Settings

    settings = Settings(store="directory", data_dir=str(tmp_path / "data"), workers=1)
    identity = facade.create_identity(settings, "Dr. Web", "facade web passphrase 93 amber")
    with facade.Client(settings, identity) as client:
        pacs = client.pacs
        pacs.save_node(DicomNode(name="locked-web", dicomweb_url=locked_pacs, username=USER))
        assert not pacs.echo("locked-web").ok  # no password yet: said, not raised
        pacs.set_web_password("locked-web", PASSWORD)
        written = [p for root in (Path(os.environ["XDG_CONFIG_HOME"]), tmp_path / "data")
                   for p in root.rglob("*") if p.is_file()]
        assert any(p.name == "dicom-nodes.json" for p in written)
        assert not [p for p in written if PASSWORD.encode() in p.read_bytes()]
        assert pacs.echo("locked-web").ok
        (study,) = pacs.find_studies("locked-web", patient_id="1CT1")
        repo = client.create_repository("from-web")
        report = pacs.import_study(repo, "locked-web", study.study_uid)
        assert len(report.imported) == 1 and not report.failed, report
        (meta,) = client.list_images(repo)
        assert meta.attribute("StudyInstanceUID") == study.study_uid

        imported = client.import_files(repo, files["stowed"])
        assert len(imported.imported) == 3
        ids = [m.image_id for m in client.list_images(repo)
               if m.attribute("StudyInstanceUID") == STOWED]
        sent = pacs.send(repo, ids, "locked-web")
        assert sorted(sent.sent) == sorted(ids) and not sent.failed
        auth = (USER, PASSWORD)
        base = locked_pacs.rsplit("/dicom-web", 1)[0]
        for path in files["stowed"]:
            found = requests.post(f"{base}/tools/lookup", data=_sop(path), auth=auth,
                                  timeout=30).json()
            (instance,) = [f["ID"] for f in found if f["Type"] == "Instance"]
            stored = requests.get(f"{base}/instances/{instance}/file", auth=auth, timeout=30)
            assert stored.content == path.read_bytes()
        pacs.remove_node("locked-web")
        assert memory_keyring.entries == {}  # the password went with the node
