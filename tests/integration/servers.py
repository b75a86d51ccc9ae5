"""Real DICOM servers and tools for the integration tests: Orthanc (a real PACS, REST +
DICOM + its DICOMweb plugin) and dcmtk's command-line clients and storescp.

Why real ones: a DICOM network stack proved only against itself (pynetdicom talking to
pynetdicom) proves nothing about the PACS a hospital runs. Orthanc and dcmtk are separate
GPL programs: they are only ever run here as processes, never imported. Everything binds
127.0.0.1 (Orthanc's REST port; RemoteAccessAllowed false) on free ports, and every process
is stopped by its PID (SIGTERM, then SIGKILL after 10 s) by whoever started it.

Use (H2/H3 reuse this module; tests/ and tests/integration/ are on sys.path under pytest)::

    from servers import require_orthanc, start_orthanc       # inside tests/integration/
    from integration.servers import start_orthanc            # from tests/gui/ etc.

    require_orthanc()                              # skips, saying `make system-deps`
    pacs = start_orthanc(tmp_path, peers={"radcrypt": ("RADCRYPT", 11112)})
    try:
        oid = pacs.upload(Path("ct.dcm"))          # REST POST /instances -> Orthanc id
        pacs.dicomweb_url                          # http://127.0.0.1:P/dicom-web
        pacs.dicom_port, pacs.aet                  # DIMSE: 127.0.0.1:P2, "ORTHANC"
        pacs.push("radcrypt", [oid])               # Orthanc C-STOREs to the declared peer
    finally:
        pacs.stop()

The pytest fixtures built on this are in tests/integration/conftest.py (``orthanc``:
one Orthanc per module with a ``radcrypt`` peer at ``orthanc.peer_port``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
MISSING = "is not installed here: `make system-deps` installs it (apt-get {package})"


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def orthanc_binary() -> str | None:
    found = ORTHANC if Path(ORTHANC).is_file() else shutil.which("Orthanc")
    return found if found and Path(DICOMWEB_PLUGIN).is_file() else None


def require_orthanc() -> str:
    """The Orthanc binary; skips the test only when Orthanc (or its DICOMweb plugin) is
    missing, saying how to install it."""
    found = orthanc_binary()
    if found is None:
        pytest.skip("Orthanc with its DICOMweb plugin " +
                    MISSING.format(package="orthanc orthanc-dicomweb"))
    return found


def require_dcmtk(*tools: str) -> None:
    """Skips the test when one of dcmtk's programs (storescu, echoscu, ...) is missing."""
    for tool in tools or ("storescu",):
        if shutil.which(tool) is None:
            pytest.skip(f"dcmtk's {tool} " + MISSING.format(package="dcmtk"))


def stop_pid(process: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM the process by its PID, SIGKILL it if it is still there after ``grace``."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(5)


@dataclass
class Orthanc:
    """A running Orthanc: REST at ``url``, DICOM at 127.0.0.1:``dicom_port`` as ``aet``."""

    process: subprocess.Popen[Any]
    root: Path
    http_port: int
    dicom_port: int
    aet: str = "ORTHANC"
    peers: dict[str, tuple[str, int]] = field(default_factory=dict)
    peer_port: int = 0  # the port of the first declared peer (the fixture's "radcrypt")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def pid(self) -> int:
        return self.process.pid

    # --- REST -----------------------------------------------------------------------------

    def get(self, path: str, **kwargs: Any) -> Any:
        answer = requests.get(self.url + path, timeout=30, **kwargs)
        answer.raise_for_status()
        return answer.json() if "json" in answer.headers.get("content-type", "") \
            else answer.content

    def post(self, path: str, body: Any = None, data: bytes | None = None) -> Any:
        answer = requests.post(self.url + path, json=body if data is None else None,
                               data=data, timeout=120)
        answer.raise_for_status()
        return answer.json() if answer.content else None

    def upload(self, path: Path) -> str:
        """Store a file through REST (POST /instances); returns its Orthanc instance id."""
        answer = self.post("/instances", data=Path(path).read_bytes())
        return str(answer["ID"])

    def upload_many(self, paths: list[Path]) -> list[str]:
        return [self.upload(p) for p in paths]

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def studies(self) -> list[str]:
        return list(self.get("/studies"))

    def study_id(self, study_uid: str) -> str:
        """Orthanc's id of the study with this StudyInstanceUID (KeyError if absent)."""
        found = self.post("/tools/lookup", data=study_uid.encode())
        for item in found or []:
            if item.get("Type") == "Study":
                return str(item["ID"])
        raise KeyError(study_uid)

    def instance_by_sop(self, sop_uid: str) -> str:
        found = self.post("/tools/lookup", data=sop_uid.encode())
        for item in found or []:
            if item.get("Type") == "Instance":
                return str(item["ID"])
        raise KeyError(sop_uid)

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file exactly as Orthanc stored it."""
        data = self.get(f"/instances/{instance_id}/file")
        return data if isinstance(data, bytes) else json.dumps(data).encode()

    def study_instances(self, study_uid: str) -> list[str]:
        return [i["ID"] for i in self.get(f"/studies/{self.study_id(study_uid)}/instances")]

    def tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def add_peer(self, name: str, aet: str, port: int, host: str = "127.0.0.1") -> None:
        """Declare (or change) a DICOM modality at run time (PUT /modalities/NAME)."""
        answer = requests.put(f"{self.url}/modalities/{name}", timeout=30,
                              json={"AET": aet, "Host": host, "Port": port})
        answer.raise_for_status()
        self.peers[name] = (aet, port)

    def push(self, peer: str, resources: list[str], timeout: float = 120) -> Any:
        """Orthanc C-STOREs the resources (instance/series/study ids) to a declared peer,
        synchronously; raises for a failed push."""
        return self.post(f"/modalities/{peer}/store",
                         {"Resources": resources, "Synchronous": True, "Timeout": timeout})

    def delete_all(self) -> None:
        for study in self.studies():
            requests.delete(f"{self.url}/studies/{study}", timeout=30).raise_for_status()

    def stop(self) -> None:
        stop_pid(self.process)


def start_orthanc(root: Path, peers: dict[str, tuple[str, int]] | None = None, *,
                  aet: str = "ORTHANC", timeout: float = 60.0,
                  extra: dict[str, Any] | None = None) -> Orthanc:
    """Start an Orthanc of its own in ``root`` (storage, index, config, log), REST and
    DICOM on free loopback ports, the DICOMweb plugin at /dicom-web/, ``peers`` declared
    as DICOM modalities (name -> (AE title, port) on 127.0.0.1; they may query, retrieve,
    store and be moved to). Waits until REST answers; raises with the log's tail if it
    does not within ``timeout``."""
    binary = require_orthanc()
    root.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    peers = dict(peers or {})
    config = {
        "Name": "RADTEST", "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"), "HttpPort": http_port, "DicomPort": dicom_port,
        "DicomAet": aet, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": {name: [peer_aet, "127.0.0.1", port]
                            for name, (peer_aet, port) in peers.items()},
        "DicomScuTimeout": 10, "DicomAssociationCloseDelay": 0,
        "HttpCompressionEnabled": False, "StorageCompression": False,
        "SaveJobs": False, "DicomModalitiesInDatabase": False,
        **(extra or {}),
    }
    path = root / "orthanc.json"
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    log = (root / "orthanc.log").open("ab")
    process = subprocess.Popen([binary, "--logdir=" + str(root), str(path)],
                               stdout=log, stderr=subprocess.STDOUT, cwd=root,
                               start_new_session=True)
    log.close()
    server = Orthanc(process, root, http_port, dicom_port, aet, peers,
                     next(iter(peers.values()))[1] if peers else 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(requests.RequestException):
            if requests.get(server.url + "/system", timeout=2).ok:
                return server
        time.sleep(0.2)
    server.stop()
    tail = (root / "orthanc.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"Orthanc did not start in {timeout:.0f} s (exit {process.poll()}):"
                       f"\n{tail}")


# --- dcmtk -------------------------------------------------------------------------------


def dcmtk(tool: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run one of dcmtk's programs to the end; its exit code and output are the caller's to
    check (a refused association is a non-zero exit, which some tests expect)."""
    require_dcmtk(tool)
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


@dataclass
class Storescp:
    """dcmtk's storescp, an independent receiver: files land in ``folder``."""

    process: subprocess.Popen[Any]
    folder: Path
    port: int
    aet: str

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        stop_pid(self.process)


def start_storescp(folder: Path, aet: str = "VIEWER", port: int = 0) -> Storescp:
    """dcmtk's storescp on 127.0.0.1 (free port unless given), accepting every storage SOP
    class in its offered transfer syntax (+xa), writing each instance to ``folder``."""
    require_dcmtk("storescp")
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    process = subprocess.Popen(["storescp", "-aet", aet, "+xa", "-od", str(folder),
                                "-fe", ".dcm", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return Storescp(process, folder, port, aet)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    stop_pid(process)
    raise RuntimeError(f"storescp did not listen on port {port}")


def wait_for(condition: Any, timeout: float, what: str, step: float = 0.2) -> None:
    """Poll ``condition()`` until true; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(step)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
