"""The data types of hospital integration, shared by the DICOM network (dimse.py), DICOMweb
(dicomweb.py), FHIR export (fhir.py), the facade (facade.py) and the front ends.

Plain frozen dataclasses: they travel between threads (the GUI's workers), pickle, and print
without secrets (a DICOMweb password is never a field here: it lives in the OS keyring,
app/integration/secrets.py, and is asked for when missing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class DicomNode:
    """A PACS, modality or viewer we talk to: a DIMSE peer (AE title, host, port) and/or a
    DICOMweb server (base URL). ``tls`` turns on DICOM TLS for DIMSE; the certificate paths
    come from the node or, when empty, from the receiver's TLS settings."""

    name: str
    aet: str = ""
    host: str = ""
    port: int = 0
    dicomweb_url: str = ""
    username: str = ""  # DICOMweb basic auth user; the password is in the OS keyring
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @property
    def dimse(self) -> bool:
        return bool(self.aet and self.host and self.port)

    @property
    def web(self) -> bool:
        return bool(self.dicomweb_url)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RemoteStudy:
    """One study as a PACS lists it (C-FIND study level or QIDO-RS)."""

    study_uid: str
    patient_name: str = ""
    patient_id: str = ""
    study_date: str = ""
    description: str = ""
    accession: str = ""
    modalities: tuple[str, ...] = ()
    series_count: int = 0
    instance_count: int = 0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["modalities"] = list(self.modalities)
        return data


@dataclass(frozen=True)
class RemoteSeries:
    """One series as a PACS lists it (C-FIND series level or QIDO-RS)."""

    study_uid: str
    series_uid: str
    modality: str = ""
    description: str = ""
    number: str = ""
    instance_count: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EchoResult:
    """The answer to "Echo"/"Test": ok, how long it took, and plain words when it failed."""

    node: str
    ok: bool
    seconds: float
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SendReport:
    """What a C-STORE or STOW-RS send did, per instance."""

    node: str
    sent: list[str] = field(default_factory=list)  # image ids
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image id, plain reason)

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "sent": self.sent,
                "failed": [{"image": i, "reason": r} for i, r in self.failed]}


@dataclass
class ReceiverStatus:
    """A running Storage SCP's live counts (the GUI's "Receive from PACS" shows them)."""

    aet: str
    port: int
    running: bool = False
    associations: int = 0
    received: int = 0
    imported: int = 0
    refused: int = 0
    failed: int = 0
    last_message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
