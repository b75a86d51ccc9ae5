"""Helpers of the DICOM network tests (tests/integration/test_dimse*.py): a workstation
with a format-2 repository, real sample files, a TLS certificate authority, a TCP proxy
that cuts a connection half-way, and the CLI with cli_pacs registered.

Why a proxy: "a PACS that goes away mid-transfer" has to really go away in the middle of
a real transfer; killing Orthanc at the right moment is a race, cutting the TCP stream
after N bytes from the PACS is not.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from app.core import client as facade
from app.core.settings import Settings

PASSWORD = "cli passphrase: amber meadow 62 lantern"  # zxcvbn 4, as tests/test_cli.py
UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def uncompressed_samples(count: int) -> list[Path]:
    """``count`` real sample files (pydicom-data) in an uncompressed transfer syntax, with
    file meta and distinct SOP Instance UIDs: what dcmtk's storescu sends unchanged."""
    from resources.samples import decodable_dicom_files

    out: list[Path] = []
    seen: set[str] = set()
    for path in decodable_dicom_files():
        try:
            meta = pydicom.filereader.read_file_meta_info(path)
        except Exception:
            continue
        if meta.get("TransferSyntaxUID") not in UNCOMPRESSED:
            continue
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        if sop not in seen:
            seen.add(sop)
            out.append(path)
        if len(out) == count:
            return out
    raise AssertionError(f"only {len(out)} uncompressed sample files, {count} wanted")


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@dataclass
class Workstation:
    settings: Settings
    client: facade.Client
    repo: Any

    def sop_uids(self) -> set[str]:
        return {m.sop_uid for m in self.client.list_images(self.repo) if m.frame == 0}


@contextlib.contextmanager
def workstation(root: Path, repo_name: str = "pacs") -> Any:
    settings = Settings(store="directory", data_dir=str(root / "data"), workers=2)
    identity = facade.create_identity(settings, "Dr. Network", PASSWORD)
    with facade.Client(settings, identity) as client:
        yield Workstation(settings, client, client.create_repository(repo_name))


def write_series(folder: Path, count: int, *, study_uid: str, series_uid: str,
                 source: str = "CT_small.dcm", patient: str = "NET^PATIENT") -> list[Path]:
    """``count`` instances of one series: a real sample's pixels, shifted per slice so no
    two are the same image, with their own UIDs."""
    import numpy as np
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file(source))
    pixels = base.pixel_array
    out = []
    for i in range(1, count + 1):
        ds = pydicom.dcmread(get_testdata_file(source))
        ds.PixelData = np.roll(pixels, 7 * i, axis=1).astype(pixels.dtype).tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = f"{series_uid}.{i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber, ds.PatientName, ds.PatientID = i, patient, "NET-1"
        ds.StudyDate = "20250301"
        path = folder / f"{series_uid}.{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


# --- TLS ---------------------------------------------------------------------------------


def make_ca(folder: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
            ) -> dict[str, Path]:
    """A throw-away CA, a server certificate for ``hosts`` and a client certificate, as
    PEM files: ca.pem, server.pem/server.key, client.pem/client.key."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def write_key(key: Any, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("Radcrypt test CA"))
          .issuer_name(name("Radcrypt test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    files = {"ca": folder / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        cert = (x509.CertificateBuilder().subject_name(name(f"radcrypt-{role}"))
                .issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .sign(ca_key, hashes.SHA256()))
        files[role] = folder / f"{role}.pem"
        files[role].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}_key"] = folder / f"{role}.key"
        write_key(key, files[f"{role}_key"])
    return files


# --- a TCP proxy that cuts the stream ----------------------------------------------------


class CuttingProxy:
    """127.0.0.1:``port`` -> 127.0.0.1:``target``; once ``cut_after`` bytes came back from
    the target over all connections, every connection is closed at once (the PACS "goes
    away"). ``cut_after`` None never cuts."""

    def __init__(self, target: int, cut_after: int | None) -> None:
        self.target, self.cut_after = target, cut_after
        self.sent_back = 0
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True),
                             daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while True:
                data = src.recv(16384)
                if not data or self.cut.is_set():
                    break
                if counted and self.cut_after is not None:
                    with self._lock:
                        room = self.cut_after - self.sent_back
                        self.sent_back += len(data)
                    if room <= len(data):
                        dst.sendall(data[:max(0, room)])
                        self.cut_now()
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def cut_now(self) -> None:
        self.cut.set()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:  # shutdown wakes the threads blocked in recv; close alone does not
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut_now()


def cli_build_parser() -> Any:
    """cli.build_parser with cli_pacs registered the way /work/p16-H1-cli.patch does, for
    as long as the coordinator has not applied that patch (then it is cli's own)."""
    from app import cli, cli_pacs

    original = cli.build_parser

    def build() -> Any:
        parser = original()
        sub = next(a for a in parser._actions if a.dest == "command")
        if "receive" not in sub.choices:  # the patch is not applied yet
            imports = sub.choices["import"]
            next(a for a in imports._actions if a.dest == "paths").nargs = "*"
            cli_pacs.register(sub, cli._command)
            original_import = cli.cmd_import

            def cmd_import(args: Any) -> int:
                if getattr(args, "from_pacs", None):
                    return cli_pacs.cmd_import_from_pacs(args)
                return original_import(args)

            imports.set_defaults(func=cmd_import)
        return parser

    return build


def cli_main(argv: list[str]) -> int:
    """`radcrypt ARGV` with cli_pacs registered (a subprocess's entry point)."""
    from app import cli

    cli.build_parser = cli_build_parser()
    return int(cli.main(argv))


def run_cli(monkeypatch: Any, capsys: Any, data_dir: Path) -> Any:
    """``run(*args)`` -> (exit code, stdout, stderr) of `radcrypt --store directory
    --data-dir DATA ARGS` in this process, cli_pacs registered (cli_build_parser)."""
    from app import cli

    monkeypatch.setattr(cli, "build_parser", cli_build_parser())
    monkeypatch.setenv("RADCRYPT_PASSWORD", PASSWORD)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["--store", "directory", "--data-dir", str(data_dir), *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
