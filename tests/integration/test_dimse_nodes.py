"""The node file (app/integration/nodes.py) and the spool's privacy (spool.py): no server
needed, so these run in well under a second.

Checked: a node round-trips through the JSON file (0600, in the settings directory that
XDG_CONFIG_HOME points to) and replaces one of the same name; bad AE titles, ports, hosts
and URLs are refused naming the node and the field; a DICOMweb URL with a password in it
is refused and nothing secret is ever written; the receiver settings round-trip; an
unknown node's error names the configured ones. The spool is 0700, its files 0600,
written atomically, and a transfer folder disappears with everything in it, even when the
block fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.core.errors import RadcryptError
from app.integration.model import DicomNode
from app.integration.nodes import NodeBook, ReceiverSettings
from app.integration.spool import Spool


def test_nodes_round_trip_privately_in_the_settings_directory(isolated_env: Path) -> None:
    book = NodeBook()
    assert book.path == isolated_env / "config" / "radcrypt" / "dicom-nodes.json"
    book.save(DicomNode("pacs", " ORTHANC ", "pacs.local", 4242))
    book.save(DicomNode("web", dicomweb_url="https://pacs.local/dicom-web/", username="dr"))
    book.save(DicomNode("pacs", "ORTHANC2", "pacs.local", 104))  # replaces by name
    assert [n.name for n in book.nodes()] == ["pacs", "web"]
    assert book.node("pacs") == DicomNode("pacs", "ORTHANC2", "pacs.local", 104)
    assert book.node("web").dicomweb_url == "https://pacs.local/dicom-web"
    assert oct(book.path.stat().st_mode & 0o777) == "0o600"
    data = json.loads(book.path.read_text())
    assert data["schema"] == 1 and "password" not in json.dumps(data).lower()
    book.remove("web")
    with pytest.raises(RadcryptError, match=r"no DICOM node named 'web' \(configured: pacs\)"):
        book.node("web")


@pytest.mark.parametrize(("node", "words"), [
    (DicomNode("a b", "X", "h", 1), "node name 'a b'"),
    (DicomNode("n", "X" * 17, "h", 1), "node n: the AE title must have 1 to 16"),
    (DicomNode("n", "A\\B", "h", 1), "without backslash"),
    (DicomNode("n", "X", "", 104), "node n: a host is needed"),
    (DicomNode("n", "X", "h", 70000), "node n: the port must be"),
    (DicomNode("n", dicomweb_url="ftp://h/x"), "must start with http"),
    (DicomNode("n", dicomweb_url="https://dr:secret@h/x"), "put no user or password"),
    (DicomNode("n"), "give an AE title, host and port"),
    (DicomNode("n", dicomweb_url="https://h", tls=True), "DICOM TLS needs an AE title"),
    (DicomNode("n", "X", "h", 1, cert_file="c.pem"), "both its certificate file and its key"),
])
def test_bad_nodes_are_refused_naming_the_field(node: DicomNode, words: str) -> None:
    book = NodeBook()
    with pytest.raises(RadcryptError) as caught:
        book.save(node)
    assert words in str(caught.value)
    assert "secret" not in str(caught.value)
    assert not book.path.exists()  # nothing written


def test_receiver_settings_round_trip() -> None:
    book = NodeBook()
    assert book.receiver() == ReceiverSettings("RADCRYPT", 11112)
    book.save_receiver(ReceiverSettings("RADWS1", 11113))
    assert book.receiver() == ReceiverSettings("RADWS1", 11113)
    with pytest.raises(RadcryptError, match="needs a certificate file and a key file"):
        book.save_receiver(ReceiverSettings("RADWS1", 11113, tls=True))


def test_the_spool_is_private_and_transfers_vanish(tmp_path: Path) -> None:
    spool = Spool.under(tmp_path, "receive-X-1")
    assert oct(spool.root.stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "spool").stat().st_mode & 0o777) == "0o700"
    path = spool.put(b"DICM data", "1.2.3")
    twice = spool.put(b"DICM again", "1.2.3")
    odd = spool.put(b"x", "../../etc/passwd")  # not a UID: a random name inside the spool
    assert path.name == "1.2.3.dcm" and twice != path and odd.parent == spool.root
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert spool.files() == [path, twice, odd]
    with pytest.raises(ValueError), spool.transfer() as inner:
        inner.put(b"plaintext", "9.9")
        folder = inner.root
        raise ValueError("the transfer failed")
    assert not folder.exists()
    assert spool.clear() == 3 and not os.listdir(spool.root)
