"""The Storage SCP (`radcrypt receive`, ``client.pacs.receiver``) against dcmtk's real
clients (issue 18).

Checked: storescu sends 50 real files (pydicom-data, uncompressed, distinct instances) ->
every one is imported (committed, decryptable, its SOP Instance UID listed) and searchable
(a received file finds itself at distance 0); the spool is empty afterwards. An unknown AE
title, and a known AE title from an unknown address, are refused at association
(A-ASSOCIATE-RJ, "calling AE title not recognised"). A malformed instance is refused
with a DICOM failure status and a log line naming the sender. Instances a crash left in
the spool are imported at the next start, and the spool is then empty. DICOM TLS:
C-ECHO over TLS with mutual certificates, from our SCU and from dcmtk's echoscu; a
plain-TCP association, and a TLS client without a certificate, are refused.
The CLI's `receive` stops cleanly on Ctrl+C (SIGINT) after importing what it received.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from app.integration.model import DicomNode
from app.integration.tls import TlsFiles

try:
    import dimse_support as ds
    from servers import dcmtk, free_port, require_dcmtk, wait_for
except ImportError:  # pragma: no cover
    from tests.integration import dimse_support as ds
    from tests.integration.servers import dcmtk, free_port, require_dcmtk, wait_for

SENDER = "STORESCU"


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ds.Workstation]:
    with ds.workstation(tmp_path_factory.mktemp("receive")) as station:
        yield station


@pytest.fixture
def receiver(ws: ds.Workstation) -> Iterator[Any]:
    require_dcmtk("storescu", "echoscu")
    rx = ws.client.pacs.receiver(ws.repo, aet="RADCRYPT", port=free_port(),
                                 peers=[f"{SENDER}@127.0.0.1"], host="127.0.0.1",
                                 batch_size=32)
    rx.start()
    yield rx
    rx.stop()


def test_storescu_of_50_real_files_all_imported_and_searchable(ws: ds.Workstation,
                                                               receiver: Any) -> None:
    files = ds.uncompressed_samples(50)
    before = ws.sop_uids()
    start = time.perf_counter()
    result = dcmtk("storescu", "-R", "-aet", SENDER, "-aec", "RADCRYPT", "127.0.0.1",
                   str(receiver.port), *map(str, files), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert receiver.wait_idle(240), receiver.status()
    seconds = time.perf_counter() - start
    status = receiver.status()
    assert (status.received, status.imported, status.failed, status.refused) == \
        (50, 50, 0, 0), status
    assert status.associations == 1
    wanted = {ds.sop_uid(p) for p in files}
    assert wanted <= ws.sop_uids() and not wanted & before
    assert not receiver.spool.files() and not list(receiver.spool.root.iterdir())
    print(f"received and imported 50 instances in {seconds:.1f} s")
    # searchable: three received files find themselves (or a received instance with the
    # very same picture: pydicom-data holds a few such pairs) at distance 0
    queries = [files[0], files[17], files[42]]
    results = ws.client.search_files(ws.repo, queries, k=3)
    for query, answer in zip(queries, results, strict=True):
        exact = [h for h in answer.hits if h.distance == pytest.approx(0.0, abs=1e-6)]
        found = {ws.client.hit_meta(h).sop_uid for h in exact}
        assert found and found <= wanted, (query.name, found)


def test_unknown_ae_title_and_unknown_address_are_refused(ws: ds.Workstation,
                                                          receiver: Any) -> None:
    result = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "RADCRYPT", "127.0.0.1",
                   str(receiver.port))
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr, result.stderr
    ok = dcmtk("echoscu", "-aet", SENDER, "-aec", "RADCRYPT", "127.0.0.1", str(receiver.port))
    assert ok.returncode == 0, ok.stderr
    # the allowed AE title from another address (127.0.0.2 is loopback too): refused
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=SENDER)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="RADCRYPT",
                         bind_address=("127.0.0.2", 0))
    assert assoc.is_rejected and not assoc.is_established
    assert receiver.status().refused == 2


def _store_raw(port: int, path: Path, aet: str = SENDER) -> int:
    """C-STORE a file's bytes as they are (pynetdicom without decoding); the status."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title=aet)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="RADCRYPT")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def test_malformed_instances_refused_with_failure_status_and_sender_logged(
        ws: ds.Workstation, receiver: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    from pydicom.data import get_testdata_file

    source = get_testdata_file("CT_small.dcm")
    no_pixels = tmp_path / "no-pixels.dcm"
    header = pydicom.dcmread(source)
    del header.PixelData
    header.save_as(no_pixels, enforce_file_format=True)
    mismatch = tmp_path / "mismatch.dcm"  # the file meta says one instance, the body another
    other = pydicom.dcmread(source)
    other.SOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    other.save_as(mismatch, enforce_file_format=True)
    raw = bytearray(mismatch.read_bytes())
    body = raw.index(b"1.2.3.4.5.6.7.8.9", 300)  # the dataset's copy, not the meta's
    raw[body:body + 17] = b"1.2.3.4.5.6.7.8.8"
    mismatch.write_bytes(bytes(raw))
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")  # after group 0002
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(bytes(raw[:meta_end]) + os.urandom(4096))
    truncated = tmp_path / "truncated.dcm"  # a transfer cut short inside the pixel data
    cut = pydicom.dcmread(source)
    cut.SOPInstanceUID = cut.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8.10"
    cut.PixelData = cut.PixelData[: len(cut.PixelData) // 2]
    cut.save_as(truncated, enforce_file_format=True)
    before = receiver.status()
    with caplog.at_level(logging.WARNING, logger="app.integration.receiver"):
        statuses = [_store_raw(receiver.port, p)
                    for p in (no_pixels, mismatch, garbage, truncated)]
    assert all(0xC000 <= s <= 0xCFFF for s in statuses), [hex(s) for s in statuses]
    refused = [r.getMessage() for r in caplog.records if "refused instance" in r.getMessage()]
    assert len(refused) == 4 and all(f"{SENDER}@127.0.0.1" in m for m in refused), refused
    assert "the pixel data is truncated (16384 bytes, its image needs 32768)" in refused[3]
    assert receiver.status().received == before.received  # nothing spooled or imported
    assert not receiver.spool.files()


def test_instances_left_in_the_spool_are_imported_at_the_next_start(
        ws: ds.Workstation, tmp_path: Path) -> None:
    files = ds.write_series(tmp_path / "left", 2, study_uid="1.2.826.0.1.3680043.8.498.91",
                            series_uid="1.2.826.0.1.3680043.8.498.91.1")
    rx = ws.client.pacs.receiver(ws.repo, aet="RADCRYPT", port=free_port(),
                                 peers=[f"{SENDER}@127.0.0.1"], host="127.0.0.1")
    for path in files:  # what a crash between "success" and the import leaves behind
        rx.spool.put(path.read_bytes(), ds.sop_uid(path))
    (rx.spool.root / ".half-written.part").write_bytes(b"partial")
    rx.start()
    try:
        assert rx.wait_idle(120), rx.status()
    finally:
        rx.stop()
    assert {ds.sop_uid(p) for p in files} <= ws.sop_uids()
    assert not list(rx.spool.root.iterdir())
    assert oct(rx.spool.root.stat().st_mode & 0o777) == "0o700"


def test_dicom_tls_echo_with_mutual_certificates(ws: ds.Workstation, tmp_path: Path) -> None:
    require_dcmtk("echoscu")
    pki = ds.make_ca(tmp_path / "pki")
    port = free_port()
    rx = ws.client.pacs.receiver(
        ws.repo, aet="RADCRYPT", port=port, peers=["TLSCLIENT@127.0.0.1"], host="127.0.0.1",
        tls=TlsFiles(str(pki["server"]), str(pki["server_key"]), str(pki["ca"])))
    rx.start()
    try:
        from app.integration.dimse import Scu

        node = DicomNode("tls-self", "RADCRYPT", "127.0.0.1", port, tls=True,
                         ca_file=str(pki["ca"]), cert_file=str(pki["client"]),
                         key_file=str(pki["client_key"]))
        assert Scu("TLSCLIENT").echo(node).ok
        plain = Scu("TLSCLIENT").echo(DicomNode("plain", "RADCRYPT", "127.0.0.1", port))
        assert not plain.ok and "node plain" in plain.message
        no_cert = Scu("TLSCLIENT").echo(DicomNode("nocert", "RADCRYPT", "127.0.0.1", port,
                                                  tls=True, ca_file=str(pki["ca"])))
        assert not no_cert.ok  # mutual TLS: a client without a certificate is refused
        # an independent TLS client: dcmtk's echoscu with its certificate
        dcmtk_tls = dcmtk("echoscu", "+tls", str(pki["client_key"]), str(pki["client"]),
                          "+cf", str(pki["ca"]), "-aet", "TLSCLIENT", "-aec", "RADCRYPT",
                          "127.0.0.1", str(port))
        assert dcmtk_tls.returncode == 0, dcmtk_tls.stderr
        dcmtk_anonymous = dcmtk("echoscu", "+tla", "+cf", str(pki["ca"]), "-aet",
                                "TLSCLIENT", "-aec", "RADCRYPT", "127.0.0.1", str(port))
        assert dcmtk_anonymous.returncode != 0  # no client certificate: refused
    finally:
        rx.stop()


def test_cli_receive_stops_cleanly_on_ctrl_c(ws: ds.Workstation, tmp_path: Path) -> None:
    require_dcmtk("storescu")
    port = free_port()
    files = ds.write_series(tmp_path / "cli", 2, study_uid="1.2.826.0.1.3680043.8.498.92",
                            series_uid="1.2.826.0.1.3680043.8.498.92.1")
    code = (f"import sys; sys.path[:0] = [{str(Path.cwd())!r}, {str(Path(__file__).parent)!r}]"
            "\nfrom dimse_support import cli_main\nsys.exit(cli_main(sys.argv[1:]))")
    argv = ["--store", "directory", "--data-dir", ws.settings.data_dir, "receive", "--repo",
            "pacs", "--port", str(port), "--host", "127.0.0.1", "--peer", f"{SENDER}@127.0.0.1"]
    env = {**os.environ, "RADCRYPT_PASSWORD": ds.PASSWORD}
    process = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: dcmtk("echoscu", "-aet", SENDER, "-aec", "RADCRYPT", "127.0.0.1",
                               str(port)).returncode == 0, 60, "radcrypt receive to listen",
                 step=0.5)
        sent = dcmtk("storescu", "-aet", SENDER, "-aec", "RADCRYPT", "127.0.0.1", str(port),
                     *map(str, files))
        assert sent.returncode == 0, sent.stderr
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "received 2, imported 2, refused 0, failed 0" in out, (out, err)
    assert {ds.sop_uid(p) for p in files} <= ws.sop_uids()
