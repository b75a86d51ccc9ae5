"""DICOM TLS (PS3.15 Annex B): the ssl contexts of our SCU and our Storage SCP.

Why here and not in each caller: the rules are the same for every association and easy to
get wrong once — TLS 1.2 at least, the peer's certificate verified against the CA file the
node (or the receiver) names, the host name checked for outgoing associations, mutual
TLS for the receiver when it names a CA (a modality then has to show a certificate that CA
signed). Errors name the node and the file, never a key's content.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import RadcryptError
from app.integration.model import DicomNode


@dataclass(frozen=True)
class TlsFiles:
    """Certificate, key and CA files (PEM). Any may be empty."""

    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""


def _readable(path: str, what: str, role: str) -> str:
    if not Path(path).is_file():
        raise RadcryptError(f"{what}: the {role} file {path} does not exist")
    return path


def _base(purpose: ssl.Purpose) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if purpose is ssl.Purpose.SERVER_AUTH
                             else ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _load_chain(context: ssl.SSLContext, files: TlsFiles, what: str) -> None:
    cert = _readable(files.cert_file, what, "certificate")
    key = _readable(files.key_file, what, "key")
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise RadcryptError(f"{what}: cannot use the certificate {cert} with the key {key} "
                            f"(PEM, key without a passphrase): {exc.__class__.__name__}"
                            ) from None


def _load_ca(context: ssl.SSLContext, ca_file: str, what: str) -> None:
    try:
        context.load_verify_locations(cafile=_readable(ca_file, what, "CA"))
    except (ssl.SSLError, OSError) as exc:
        raise RadcryptError(f"{what}: cannot read the CA file {ca_file} as PEM "
                            f"certificates: {exc.__class__.__name__}") from None


def client_context(node: DicomNode, fallback: TlsFiles | None = None) -> ssl.SSLContext:
    """The context our SCU uses towards ``node``: the node's CA verifies the server (the
    receiver's CA when the node names none; the system's CAs when neither does); the host
    name is checked; our certificate (the node's, else the receiver's) is shown when
    there is one."""
    what = f"node {node.name} (DICOM TLS)"
    fallback = fallback or TlsFiles()
    context = _base(ssl.Purpose.SERVER_AUTH)
    ca = node.ca_file or fallback.ca_file
    if ca:
        _load_ca(context, ca, what)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    cert, key = ((node.cert_file, node.key_file) if node.cert_file
                 else (fallback.cert_file, fallback.key_file))
    if cert and key:
        _load_chain(context, TlsFiles(cert, key), what)
    return context


def server_context(files: TlsFiles, what: str = "receiver (DICOM TLS)") -> ssl.SSLContext:
    """The context of our Storage SCP: our certificate and key; with a CA file, every
    peer must show a certificate that CA signed (mutual TLS)."""
    if not files.cert_file or not files.key_file:
        raise RadcryptError(f"{what}: a certificate file and a key file are needed")
    context = _base(ssl.Purpose.CLIENT_AUTH)
    _load_chain(context, files, what)
    if files.ca_file:
        _load_ca(context, files.ca_file, what)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
