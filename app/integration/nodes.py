"""The DICOM nodes this workstation talks to, and its own receiver's settings, kept as one
JSON file in the settings directory (beside config.json).

Why a file of its own: nodes are edited from the GUI and the CLI at any time, while
config.json is read once per session; and it holds no secret by construction (a DicomNode
has no password field; a DICOMweb URL carrying ``user:password@`` is refused), so it can be
copied between workstations or backed up without care. Writes are atomic (temporary file,
then rename) and private (0600).
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from app.core.errors import RadcryptError
from app.core.settings import default_config_dir
from app.integration.model import DicomNode

FILE_NAME = "dicom-nodes.json"
SCHEMA = 1
DEFAULT_AET = "RADCRYPT"
DEFAULT_PORT = 11112
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class NodeNotFound(RadcryptError):
    """No node of that name is configured."""


def check_aet(aet: str, what: str) -> str:
    """An AE title as PS3.5 allows it: 1 to 16 characters of printable ASCII, no
    backslash, not only spaces; returned stripped."""
    value = aet.strip()
    if not value or len(value) > 16:
        raise RadcryptError(f"{what}: the AE title must have 1 to 16 characters, "
                            f"not {len(value)}")
    if any(not 32 <= ord(c) < 127 or c == "\\" for c in value):
        raise RadcryptError(f"{what}: the AE title {value!r} may only use printable ASCII "
                            "characters without backslash")
    return value


def check_port(port: int, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise RadcryptError(f"{what}: the port must be a whole number from 1 to 65535, "
                            f"not {port!r}")
    return port


def check_node(node: DicomNode) -> DicomNode:
    """The node, cleaned, or RadcryptError naming the node and the field that is wrong."""
    if not _NAME.match(node.name or ""):
        raise RadcryptError(f"node name {node.name!r}: use 1 to 64 letters, digits, '.', "
                            "'_' or '-', starting with a letter or digit")
    what = f"node {node.name}"
    clean = node
    if node.aet or node.host or node.port:
        aet = check_aet(node.aet, what)
        if not node.host.strip():
            raise RadcryptError(f"{what}: a host is needed with the AE title {aet}")
        clean = replace(clean, aet=aet, host=node.host.strip(),
                        port=check_port(node.port, what))
    if node.dicomweb_url:
        parts = urlsplit(node.dicomweb_url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RadcryptError(f"{what}: the DICOMweb URL must start with http:// or "
                                "https:// and name a host")
        if parts.username or parts.password:
            raise RadcryptError(f"{what}: put no user or password in the DICOMweb URL; "
                                "set the user field (the password goes to the OS keyring)")
        clean = replace(clean, dicomweb_url=node.dicomweb_url.strip().rstrip("/"))
    if not clean.dimse and not clean.web:
        raise RadcryptError(f"{what}: give an AE title, host and port (DICOM network) "
                            "and/or a DICOMweb URL")
    if clean.tls and not clean.dimse:
        raise RadcryptError(f"{what}: DICOM TLS needs an AE title, host and port")
    if bool(clean.cert_file) != bool(clean.key_file):
        raise RadcryptError(f"{what}: a client certificate needs both its certificate "
                            "file and its key file")
    return clean


@dataclass(frozen=True)
class ReceiverSettings:
    """Our own Storage SCP: the AE title a PACS knows us by (and moves to), its port and
    the TLS files of the receiver (also the client certificate our SCU shows to a TLS node
    that names none)."""

    aet: str = DEFAULT_AET
    port: int = DEFAULT_PORT
    tls: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class NodeBook:
    """The node file: read on every call (another process may have changed it), written
    atomically. Safe from several threads."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """The given file, else the settings directory's (looked up on every call: the
        directory follows XDG_CONFIG_HOME, which tests change)."""
        return self._path or default_config_dir() / FILE_NAME

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"schema": SCHEMA, "nodes": [], "receiver": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RadcryptError(f"cannot read the DICOM node file {self.path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("nodes", []), list):
            raise RadcryptError(f"DICOM node file {self.path}: expected a JSON object with "
                                "a list of nodes")
        return data

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(json.dumps({**data, "schema": SCHEMA}, indent=2) + "\n")
        tmp.replace(self.path)

    def nodes(self) -> list[DicomNode]:
        known = {f.name for f in fields(DicomNode)}
        out = []
        for item in self._read().get("nodes", []):
            if not isinstance(item, dict):
                raise RadcryptError(f"DICOM node file {self.path}: a node is not an object")
            unknown = set(item) - known
            if unknown:
                raise RadcryptError(f"DICOM node file {self.path}: node "
                                    f"{item.get('name', '?')} has unknown fields "
                                    f"{sorted(unknown)}")
            out.append(DicomNode(**item))
        return sorted(out, key=lambda n: n.name.lower())

    def node(self, name: str) -> DicomNode:
        for node in self.nodes():
            if node.name == name:
                return node
        names = ", ".join(n.name for n in self.nodes()) or "none yet"
        raise NodeNotFound(f"no DICOM node named {name!r} (configured: {names}); add one "
                           "with 'radcrypt pacs node add'")

    def save(self, node: DicomNode) -> DicomNode:
        """Add or replace (by name) a node, checked first."""
        node = check_node(node)
        with self._lock:
            data = self._read()
            nodes = [n for n in data.get("nodes", []) if n.get("name") != node.name]
            nodes.append(node.as_dict())
            data["nodes"] = sorted(nodes, key=lambda n: str(n["name"]).lower())
            self._write(data)
        return node

    def remove(self, name: str) -> None:
        with self._lock:
            data = self._read()
            nodes = [n for n in data.get("nodes", []) if n.get("name") != name]
            if len(nodes) == len(data.get("nodes", [])):
                raise NodeNotFound(f"no DICOM node named {name!r} to remove")
            data["nodes"] = nodes
            self._write(data)

    def receiver(self) -> ReceiverSettings:
        raw = self._read().get("receiver") or {}
        known = {f.name for f in fields(ReceiverSettings)}
        settings = ReceiverSettings(**{k: v for k, v in raw.items() if k in known})
        check_aet(settings.aet, f"receiver settings in {self.path}")
        check_port(settings.port, f"receiver settings in {self.path}")
        return settings

    def save_receiver(self, settings: ReceiverSettings) -> ReceiverSettings:
        settings = replace(settings, aet=check_aet(settings.aet, "receiver"),
                           port=check_port(settings.port, "receiver"))
        if settings.tls and not (settings.cert_file and settings.key_file):
            raise RadcryptError("receiver: DICOM TLS needs a certificate file and a key file")
        with self._lock:
            data = self._read()
            data["receiver"] = settings.as_dict()
            self._write(data)
        return settings
