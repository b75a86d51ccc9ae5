"""Query/retrieve and send against a real PACS (Orthanc, REST + DICOM), through the facade
(``client.pacs``) and the CLI (issue 18).

Checked: C-ECHO and C-FIND (studies with filters, series) of Orthanc; a study imported by
C-GET and another by C-MOVE to our AE title (every instance committed, the spool empty);
Orthanc pushes a study to our receiver (`POST /modalities/radcrypt/store`) -> imported;
decrypted originals sent back by C-STORE are in Orthanc byte for byte (the dataset after
the file meta identical; Orthanc re-encodes sequences of undefined length, so for a file
with sequences every element and the pixel data bytes), a JPEG 2000 one included, a whole
study with --study; a PACS that goes away mid-transfer (the TCP stream cut half-way
through a C-GET) leaves nothing imported and no plaintext behind; a DICOMweb-only
node behind the same facade calls (QIDO, WADO-RS import, STOW-RS send); DICOM TLS to an
Orthanc that requires client certificates. The CLI: test_dimse_cli.py.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from app.core.errors import RadcryptError
from app.integration.model import DicomNode
from app.integration.nodes import ReceiverSettings

try:
    import dimse_support as ds
    from servers import Orthanc, free_port, start_orthanc
except ImportError:  # pragma: no cover
    from tests.integration import dimse_support as ds
    from tests.integration.servers import Orthanc, free_port, start_orthanc

ROOT = "1.2.826.0.1.3680043.8.498.7718"
STUDY_GET, STUDY_MOVE, STUDY_PUSH, STUDY_CUT = (f"{ROOT}.{i}" for i in range(1, 5))


@pytest.fixture(scope="module")
def world(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[ds.Workstation, dict[str, list[Path]]]]:
    root = tmp_path_factory.mktemp("pacs")
    files = {
        STUDY_GET: ds.write_series(root / "get", 3, study_uid=STUDY_GET,
                                   series_uid=f"{STUDY_GET}.1"),
        STUDY_MOVE: ds.write_series(root / "move", 2, study_uid=STUDY_MOVE,
                                    series_uid=f"{STUDY_MOVE}.1", source="MR_small.dcm",
                                    patient="MOVE^ME"),
        STUDY_PUSH: ds.write_series(root / "push", 2, study_uid=STUDY_PUSH,
                                    series_uid=f"{STUDY_PUSH}.1"),
        STUDY_CUT: ds.write_series(root / "cut", 12, study_uid=STUDY_CUT,
                                   series_uid=f"{STUDY_CUT}.1"),
    }
    for paths in files.values():
        orthanc.upload_many(paths)
    with ds.workstation(root) as station:
        yield station, files


@pytest.fixture
def pacs(world: Any, orthanc: Orthanc) -> Any:
    """The facet, with Orthanc configured as node "orthanc" and our receiver settings
    matching the peer Orthanc knows (RADCRYPT at orthanc.peer_port)."""
    ws, _ = world
    facet = ws.client.pacs
    facet.save_node(DicomNode("orthanc", "ORTHANC", "127.0.0.1", orthanc.dicom_port))
    facet.save_receiver_settings(ReceiverSettings(aet="RADCRYPT", port=orthanc.peer_port))
    return facet


def _no_plaintext_left(ws: ds.Workstation) -> None:
    spool = Path(ws.settings.data_dir) / "spool"
    left = [p for p in spool.rglob("*") if p.is_file()] if spool.exists() else []
    assert not left, left


def test_echo_and_find_studies_and_series(pacs: Any, world: Any) -> None:
    assert pacs.echo("orthanc").ok
    studies = {s.study_uid: s for s in pacs.find_studies("orthanc", patient_id="NET-1")}
    assert {STUDY_GET, STUDY_MOVE, STUDY_CUT} <= set(studies)
    assert studies[STUDY_GET].instance_count == 3 and studies[STUDY_GET].modalities == ("CT",)
    mr = pacs.find_studies("orthanc", patient_id="NET-1", modality="MR")
    assert {s.study_uid for s in mr} == {STUDY_MOVE}
    assert [s.study_uid for s in pacs.find_studies("orthanc", patient_name="MOVE^*")] == \
        [STUDY_MOVE]
    series = pacs.find_series("orthanc", STUDY_GET)
    assert [(s.series_uid, s.modality, s.instance_count) for s in series] == \
        [(f"{STUDY_GET}.1", "CT", 3)]
    pacs.save_node(DicomNode("gone", "ORTHANC", "127.0.0.1", free_port()))
    gone = pacs.echo("gone")
    assert not gone.ok and "node gone" in gone.message
    with pytest.raises(RadcryptError, match="no DICOM node named 'nope'"):
        pacs.echo("nope")


@pytest.mark.parametrize(("study", "method"), [(STUDY_GET, "get"), (STUDY_MOVE, "move")])
def test_import_a_study_by_c_get_and_by_c_move(pacs: Any, world: Any, study: str,
                                               method: str) -> None:
    ws, files = world
    events: list[Any] = []
    report = pacs.import_study(ws.repo, "orthanc", study, method=method,
                               progress=events.append)
    assert len(report.imported) == len(files[study]) and not report.failed
    assert {ds.sop_uid(p) for p in files[study]} <= ws.sop_uids()
    assert any(e.stage == "retrieve" for e in events)
    _no_plaintext_left(ws)


def test_orthanc_pushes_a_study_to_our_receiver(pacs: Any, world: Any,
                                                orthanc: Orthanc) -> None:
    ws, files = world
    receiver = pacs.receiver(ws.repo, aet="RADCRYPT", port=orthanc.peer_port,
                             host="127.0.0.1")  # peers: the configured nodes (Orthanc)
    receiver.start()
    try:
        orthanc.push("radcrypt", [orthanc.study_id(STUDY_PUSH)])
        assert receiver.wait_idle(120), receiver.status()
        status = receiver.status()
    finally:
        receiver.stop()
    assert (status.received, status.imported, status.refused) == (2, 2, 0), status
    assert {ds.sop_uid(p) for p in files[STUDY_PUSH]} <= ws.sop_uids()
    _no_plaintext_left(ws)


def _body(data: bytes) -> bytes:
    """The dataset after the file meta (group 0002), as encoded."""
    assert data[128:132] == b"DICM"
    return data[132 + 12 + int.from_bytes(data[140:144], "little"):]


def test_send_decrypted_originals_back_to_orthanc_byte_for_byte(
        pacs: Any, world: Any, orthanc: Orthanc, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    ws, _ = world
    sources = [Path(get_testdata_file("JPEG2000.dcm")), Path(get_testdata_file("MR_small.dcm"))]
    study = ds.write_series(tmp_path / "s", 3, study_uid=f"{ROOT}.9",
                            series_uid=f"{ROOT}.9.1", source="CT_small.dcm")
    report = ws.client.import_files(ws.repo, [*sources, *study])
    ids = dict(report.imported)
    for src in sources:  # none of them is in Orthanc before the send
        with pytest.raises(KeyError):
            orthanc.instance_by_sop(ds.sop_uid(src))
    sent = pacs.send(ws.repo, [ids[str(p)] for p in sources], "orthanc")
    assert sorted(sent.sent) == sorted(ids[str(p)] for p in sources) and not sent.failed
    for src in sources:
        stored = orthanc.instance_file(orthanc.instance_by_sop(ds.sop_uid(src)))
        mine, theirs = pydicom.dcmread(src), pydicom.dcmread(io.BytesIO(stored))
        assert mine.PixelData == theirs.PixelData, src.name  # the compressed bytes too
        assert mine.file_meta.TransferSyntaxUID == theirs.file_meta.TransferSyntaxUID
        assert Dataset(mine) == Dataset(theirs), src.name  # every element, same value
        if src.name == "MR_small.dcm":  # no sequences: Orthanc keeps the encoding as sent
            assert _body(stored) == _body(src.read_bytes())
    whole = pacs.send(ws.repo, [ids[str(study[1])]], "orthanc", whole_study=True)
    assert len(whole.sent) == 3 and not whole.failed
    assert len(orthanc.study_instances(f"{ROOT}.9")) == 3
    _no_plaintext_left(ws)


def test_a_pacs_that_goes_away_mid_transfer_leaves_nothing_imported(
        pacs: Any, world: Any, orthanc: Orthanc) -> None:
    from app.integration.dimse import DicomNetworkError

    ws, files = world
    total = sum(p.stat().st_size for p in files[STUDY_CUT])
    proxy = ds.CuttingProxy(orthanc.dicom_port, cut_after=total // 3)
    try:
        pacs.save_node(DicomNode("flaky", "ORTHANC", "127.0.0.1", proxy.port))
        before = ws.sop_uids()
        with pytest.raises(DicomNetworkError, match=r"nothing was imported"):
            pacs.import_study(ws.repo, "flaky", STUDY_CUT, method="get")
        assert proxy.cut.is_set()
    finally:
        proxy.close()
    assert ws.sop_uids() == before
    assert not {ds.sop_uid(p) for p in files[STUDY_CUT]} & ws.sop_uids()
    _no_plaintext_left(ws)


def test_a_dicomweb_only_node_goes_through_the_same_facade(pacs: Any, world: Any,
                                                           orthanc: Orthanc,
                                                           tmp_path: Path) -> None:
    """QIDO-RS probe and find, WADO-RS import, STOW-RS send (app/integration/dicomweb.py,
    helper H2's) behind the same calls as DIMSE."""
    ws, files = world
    pacs.save_node(DicomNode("web", dicomweb_url=orthanc.dicomweb_url))
    assert pacs.echo("web").ok
    assert STUDY_CUT in {s.study_uid for s in pacs.find_studies("web", patient_id="NET-1")}
    assert [s.instance_count for s in pacs.find_series("web", STUDY_CUT)] == [12]
    report = pacs.import_study(ws.repo, "web", STUDY_CUT)
    assert len(report.imported) == 12 and not report.failed
    assert {ds.sop_uid(p) for p in files[STUDY_CUT]} <= ws.sop_uids()
    study = ds.write_series(tmp_path / "w", 2, study_uid=f"{ROOT}.8", series_uid=f"{ROOT}.8.1")
    ids = [image_id for _, image_id in ws.client.import_files(ws.repo, study).imported]
    sent = pacs.send(ws.repo, ids[:1], "web", whole_study=True)
    assert sorted(sent.sent) == sorted(ids) and not sent.failed
    assert len(orthanc.study_instances(f"{ROOT}.8")) == 2
    _no_plaintext_left(ws)


def test_dicom_tls_to_a_pacs_that_requires_it(pacs: Any, world: Any,
                                              tmp_path: Path) -> None:
    """Orthanc with DICOM TLS (its certificate from our test CA, client certificates
    required): echo and find over TLS with the node's files; without TLS, or without a
    client certificate, the association fails and the message names the node."""
    pki = ds.make_ca(tmp_path / "pki")
    secure = start_orthanc(tmp_path / "orthanc-tls", peers={"radcrypt": ("RADCRYPT", 1)},
                           extra={"DicomTlsEnabled": True,
                                  "DicomTlsCertificate": str(pki["server"]),
                                  "DicomTlsPrivateKey": str(pki["server_key"]),
                                  "DicomTlsTrustedCertificates": str(pki["ca"]),
                                  "DicomTlsRemoteCertificateRequired": True})
    try:
        _, files = world
        secure.upload_many(files[STUDY_GET][:1])
        pacs.save_node(DicomNode("secure", "ORTHANC", "127.0.0.1", secure.dicom_port,
                                 tls=True, ca_file=str(pki["ca"]),
                                 cert_file=str(pki["client"]),
                                 key_file=str(pki["client_key"])))
        assert pacs.echo("secure").ok
        assert [s.study_uid for s in pacs.find_studies("secure")] == [STUDY_GET]
        pacs.save_node(DicomNode("insecure", "ORTHANC", "127.0.0.1", secure.dicom_port))
        plain = pacs.echo("insecure")
        assert not plain.ok and "node insecure" in plain.message
        pacs.save_node(DicomNode("nocert", "ORTHANC", "127.0.0.1", secure.dicom_port,
                                 tls=True, ca_file=str(pki["ca"])))
        assert not pacs.echo("nocert").ok
    finally:
        secure.stop()

