"""Our Storage SCP (pynetdicom): receives C-STORE from the PACS and modalities we know,
answers C-ECHO, and imports what arrives through the normal import path.

Two layers:

* ``StorageServer`` is the network part, shared with C-MOVE retrieval (dimse.py): an
  association is refused (A-ASSOCIATE-RJ, "calling AE title not recognised") unless its
  calling AE title and address are on the allow-list; each instance is checked (a file
  meta and dataset that parse, SOP Class/Instance UIDs matching the request, pixel data
  present and, when uncompressed, as long as the image needs) and refused with a DICOM
  failure status (0xC210/0xC211) and a log line naming the sender when it is not; an
  accepted instance is written, exactly as sent, to a private spool (spool.py) before
  "success" is answered, so a sender's success means the instance is on our disk.
* ``Receiver`` adds the import: spooled instances are imported in batches through
  ``client.import_files`` (encrypt, features, upload, commit: the same commit rule as a
  file import) when ``chunk`` instances wait, when an association ends or after a short
  lull (``batch_size`` instances per committed segment, as for a file import); the
  imported files are deleted from the spool. A failed import (storage down) keeps the
  files and retries; files left by a crash are imported on the next start (resume), and
  the spool is then empty. ``status()`` gives live counts, safe from any thread.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from app.core.errors import RadcryptError
from app.integration.model import DicomNode, ReceiverStatus
from app.integration.spool import Spool

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_CANNOT_UNDERSTAND = 0xC210  # the dataset does not parse
STATUS_NOT_ACCEPTABLE = 0xC211  # parses, but is not an instance we can index
STATUS_OUT_OF_RESOURCES = 0xA700


@dataclass(frozen=True)
class Peer:
    """One allowed sender: its calling AE title and its host (name or address)."""

    aet: str
    host: str

    @classmethod
    def of(cls, item: Peer | DicomNode | tuple[str, str] | str) -> Peer:
        if isinstance(item, Peer):
            return item
        if isinstance(item, DicomNode):
            return cls(item.aet, item.host)
        if isinstance(item, tuple):
            return cls(str(item[0]), str(item[1]))
        aet, sep, host = str(item).partition("@")
        if not sep or not aet or not host:
            raise RadcryptError(f"peer {item!r}: write it as AET@HOST")
        return cls(aet, host)


def _addresses(host: str) -> set[str]:
    """Every address ``host`` resolves to (an address resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as exc:
        raise RadcryptError(f"peer host {host!r} does not resolve: {exc}") from None
    found = {str(info[4][0]) for info in infos}
    if host in ("localhost", "127.0.0.1", "::1"):
        found |= {"127.0.0.1", "::1"}
    return found


class AllowList:
    """(AE title, address) pairs allowed to associate; AE titles compare stripped."""

    def __init__(self, peers: list[Peer]) -> None:
        self._allowed: dict[str, set[str]] = {}
        for peer in peers:
            self._allowed.setdefault(peer.aet.strip(), set()).update(_addresses(peer.host))

    def allows(self, aet: str, address: str) -> bool:
        return address in self._allowed.get(aet.strip(), set())

    def __len__(self) -> int:
        return len(self._allowed)


def _storage_contexts() -> list[Any]:
    """Every storage SOP class, every transfer syntax. pynetdicom accepts, of a proposed
    context's syntaxes, the first in *our* list: compressed ones come first, so a sender
    offering its file's own compressed syntax beside the uncompressed ones sends the file
    as it is (no transcoding, which many senders cannot do for JPEG 2000 or JPEG-LS)."""
    from pydicom import uid
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context

    plain = [str(uid.ExplicitVRLittleEndian), str(uid.ImplicitVRLittleEndian),
             str(uid.ExplicitVRBigEndian), str(uid.DeflatedExplicitVRLittleEndian)]
    syntaxes = [str(s) for s in ALL_TRANSFER_SYNTAXES if s not in plain] + plain
    classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    _register_retired()
    classes += [u for u in _RETIRED_IMAGE_STORAGE if u not in classes]
    return [build_context(c, syntaxes) for c in classes]


def _register_retired() -> None:
    """Teach pynetdicom that the retired image classes are storage (once per process)."""
    from pydicom.uid import UID
    from pynetdicom import register_uid
    from pynetdicom.service_class import StorageServiceClass
    from pynetdicom.sop_class import uid_to_service_class

    for uid in _RETIRED_IMAGE_STORAGE:
        if uid_to_service_class(uid) is not StorageServiceClass:
            keyword = "".join(c for c in UID(uid).name.title() if c.isalnum()) or \
                "Retired" + uid.replace(".", "_")
            register_uid(uid, keyword + "H1", StorageServiceClass)


# Image storage SOP classes retired from the standard but still written by old modalities
# and found in archives (pynetdicom's list has only the current ones).
_RETIRED_IMAGE_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.5",  # Nuclear Medicine Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.12.3",  # X-Ray Angiographic Bi-Plane Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1",  # VL Image Storage - Trial
    "1.2.840.10008.5.1.4.1.1.77.2",  # VL Multi-frame Image Storage - Trial
)


def check_instance(data: bytes, sop_class: str, sop_instance: str) -> str:
    """Why a received instance is refused, or "" when it is acceptable. Only the header is
    parsed here (no pixel decoding in this process: that happens in the decoder children
    during import)."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=False, force=True,
                             defer_size=1024)
        found_class = str(ds.get("SOPClassUID", ""))
        found_instance = str(ds.get("SOPInstanceUID", ""))
        has_pixels = any(t in ds for t in ("PixelData", "FloatPixelData",
                                           "DoubleFloatPixelData"))
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        short = _short_pixel_data(ds, rows, columns)
    except Exception as exc:  # pydicom raises many kinds on garbage
        return f"the dataset does not parse ({type(exc).__name__}: {str(exc)[:120]})"
    if found_class != sop_class or found_instance != sop_instance:
        return ("the dataset's SOP Class/Instance UIDs do not match the C-STORE request "
                f"({found_class or 'none'} / {found_instance or 'none'})")
    if not has_pixels or rows <= 0 or columns <= 0:
        return "the instance has no image (no pixel data, rows or columns)"
    return short


def _short_pixel_data(ds: Any, rows: int, columns: int) -> str:
    """Why native (uncompressed) pixel data is shorter than its image needs, or "" (a
    truncated instance; compressed data is only checked when the import decodes it)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if "PixelData" not in ds or syntax is None or syntax.is_compressed:
        return ""
    bits = int(ds.get("BitsAllocated", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(str(ds.get("NumberOfFrames", 1) or 1))
    pixels = rows * columns * samples * max(1, frames)
    needed = (pixels + 7) // 8 if bits == 1 else pixels * ((bits + 7) // 8)
    have = len(ds.PixelData)
    if bits and have < needed:
        return f"the pixel data is truncated ({have} bytes, its image needs {needed})"
    return ""


@dataclass
class _Association:
    sender: str
    received: int = 0
    refused: int = 0


class StorageServer:
    """A pynetdicom Storage SCP writing accepted instances to ``spool`` and calling
    ``on_instance(path, sender)`` for each; ``on_association_end(sender, received,
    refused, how)`` after each association. ``peers`` None accepts any calling AE."""

    def __init__(self, aet: str, port: int, *, spool: Spool, peers: list[Peer] | None,
                 host: str = "0.0.0.0", tls: ssl.SSLContext | None = None,
                 on_instance: Callable[[Path, str], None] = lambda p, s: None,
                 on_association_end: Callable[[str, int, int, str], None] | None = None,
                 on_refused: Callable[[str], None] | None = None,
                 check: bool = True) -> None:
        self.aet, self.port, self.host = aet, port, host
        self.spool = spool
        self.allow = AllowList(peers) if peers is not None else None
        self.tls = tls
        self.on_instance = on_instance
        self.on_association_end = on_association_end
        self.on_refused = on_refused
        self.check = check
        self._server: Any = None
        self._ae: Any = None
        self._assocs: dict[int, _Association] = {}
        self._lock = threading.Lock()

    # --- pynetdicom handlers (run on the association's thread) --------------------------

    @staticmethod
    def _sender(event: Any) -> str:
        requestor = event.assoc.requestor
        return f"{str(requestor.ae_title).strip()}@{requestor.address}"

    def _requested(self, event: Any) -> None:
        requestor = event.assoc.requestor  # its ae_title is set later, in negotiation
        aet = str(requestor.primitive.calling_ae_title).strip()
        address = str(requestor.address)
        if self.allow is not None and not self.allow.allows(aet, address):
            log.warning("receiver %s: refused an association from %s at %s: not an allowed "
                        "peer (AE title and address must match a configured node)",
                        self.aet, aet, address)
            if self.on_refused is not None:  # counted before the peer hears it
                self.on_refused(f"{aet}@{address}")
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # calling AE title not recognised
            event.assoc.kill()  # as pynetdicom's own rejection: lets the DUL send the PDU
            return
        with self._lock:
            self._assocs[id(event.assoc)] = _Association(f"{aet}@{address}")

    def _store(self, event: Any) -> int:
        key = id(event.assoc)
        with self._lock:
            assoc = self._assocs.setdefault(key, _Association(self._sender(event)))
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        sop_instance = str(request.AffectedSOPInstanceUID)
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            why = f"cannot read it ({type(exc).__name__})"
            data = b""
        else:
            why = check_instance(data, sop_class, sop_instance) if self.check else ""
        if why:
            with self._lock:
                assoc.refused += 1
            log.warning("receiver %s: refused instance %s from %s: %s", self.aet,
                        sop_instance or "?", assoc.sender, why)
            return STATUS_CANNOT_UNDERSTAND if "parse" in why or not data \
                else STATUS_NOT_ACCEPTABLE
        try:
            path = self.spool.put(data, sop_instance)
        except OSError as exc:
            log.error("receiver %s: cannot spool instance %s from %s: %s", self.aet,
                      sop_instance, assoc.sender, exc.strerror or exc)
            return STATUS_OUT_OF_RESOURCES
        with self._lock:
            assoc.received += 1
        self.on_instance(path, assoc.sender)
        return STATUS_SUCCESS

    def _ended(self, how: str) -> Callable[[Any], None]:
        def handler(event: Any) -> None:
            with self._lock:
                assoc = self._assocs.pop(id(event.assoc), None)
            if assoc is None:
                return
            log.info("receiver %s: association from %s %s: %d received, %d refused",
                     self.aet, assoc.sender, how, assoc.received, assoc.refused)
            if self.on_association_end is not None:
                self.on_association_end(assoc.sender, assoc.received, assoc.refused, how)
        return handler

    # --- lifetime -------------------------------------------------------------------------

    def start(self) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.aet)
        ae.require_called_aet = True
        ae.acse_timeout = ae.dimse_timeout = 30
        ae.network_timeout = 60
        ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs
        for context in _storage_contexts():
            ae.add_supported_context(context.abstract_syntax, context.transfer_syntax)
        ae.add_supported_context(Verification)
        handlers: list[Any] = [(evt.EVT_REQUESTED, self._requested), (evt.EVT_C_STORE, self._store),
                    (evt.EVT_RELEASED, self._ended("released")),
                    (evt.EVT_ABORTED, self._ended("aborted"))]
        try:
            self._server = ae.start_server((self.host, self.port), block=False,
                                           evt_handlers=handlers, ssl_context=self.tls)
        except OSError as exc:
            raise RadcryptError(f"receiver {self.aet}: cannot listen on {self.host}:"
                                f"{self.port}: {exc.strerror or exc} (is another receiver "
                                "running on that port?)") from None
        self._ae = ae
        if self.port == 0:
            self.port = int(self._server.server_address[1])

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()  # closes the socket and ends the associations


class Receiver:
    """The ``radcrypt receive`` Storage SCP: StorageServer + batched import. Methods are
    safe from any thread; ``start`` and ``stop`` are idempotent."""

    def __init__(self, client: Any, repo: Any, *, aet: str, port: int, spool: Spool,
                 peers: list[Peer] | None, host: str = "0.0.0.0",
                 tls: ssl.SSLContext | None = None, batch_size: int = 64,
                 chunk: int = 512, lull_seconds: float = 2.0,
                 retry_seconds: float = 5.0) -> None:
        self.client, self.repo = client, repo
        self.batch_size, self.lull, self.retry = batch_size, lull_seconds, retry_seconds
        # One import call takes up to ``chunk`` instances (each call starts the decoder
        # children: calls of a few dozen made receiving 3x slower than a file import);
        # ``batch_size`` is the commit unit inside it, as for a file import.
        self.chunk = max(chunk, batch_size)
        self._status = ReceiverStatus(aet=aet, port=port)
        self._cond = threading.Condition()
        self._pending: list[tuple[Path, str]] = []
        self._flush_now = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_arrival = 0.0
        self._done = 0  # received instances imported or failed at import
        self._life = threading.Lock()
        self._server = StorageServer(aet, port, spool=spool, peers=peers, host=host, tls=tls,
                                     on_instance=self._arrived,
                                     on_association_end=self._association_end,
                                     on_refused=self._refused)

    @property
    def spool(self) -> Spool:
        return self._server.spool

    @property
    def port(self) -> int:
        return self._server.port

    def status(self) -> ReceiverStatus:
        with self._cond:
            return replace(self._status)

    def _message(self, text: str) -> None:
        self._status.last_message = text

    # --- callbacks from the network threads ------------------------------------------------

    def _arrived(self, path: Path, sender: str) -> None:
        with self._cond:
            self._pending.append((path, sender))
            self._status.received += 1
            self._last_arrival = time.monotonic()
            self._cond.notify_all()

    def _association_end(self, sender: str, received: int, refused: int, how: str) -> None:
        with self._cond:
            self._status.associations += 1
            self._status.failed += refused
            self._message(f"{sender}: {received} received, {refused} refused ({how})")
            self._flush_now = True
            self._cond.notify_all()

    def _refused(self, sender: str) -> None:
        with self._cond:
            self._status.refused += 1
            self._message(f"refused an association from {sender}: not an allowed peer")

    # --- the import thread ------------------------------------------------------------------

    def _take(self) -> list[tuple[Path, str]] | None:
        """The next batch to import, waiting for one; None when stopping with nothing left."""
        with self._cond:
            while True:
                due = (len(self._pending) >= self.chunk or self._flush_now
                       or self._stopping
                       or (self._pending and time.monotonic() - self._last_arrival
                           >= self.lull))
                if self._pending and due:
                    batch = self._pending[: self.chunk]
                    del self._pending[: len(batch)]
                    if not self._pending:
                        self._flush_now = False
                    return batch
                if self._stopping:
                    return None
                self._flush_now = False
                self._cond.wait(self.lull / 2)

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._import(batch)
            except Exception as exc:  # storage down, lock held: keep the files, retry
                log.error("receiver %s: import of %d received instances failed, kept in the "
                          "spool to retry: %s", self._status.aet, len(batch), exc)
                with self._cond:
                    self._message(f"import failed, will retry: {exc}")
                    self._pending[:0] = batch
                    if self._stopping:
                        return  # left in the spool: the next start imports them
                    self._cond.wait(self.retry)

    def _import(self, batch: list[tuple[Path, str]]) -> None:
        paths = [p for p, _ in batch]
        senders = {str(p): s for p, s in batch}
        report = self.client.import_files(self.repo, paths, batch_size=self.batch_size)
        done = len(report.imported) + len(report.already_present)
        failed = list(report.failed) + list(getattr(report, "skipped", []))
        for path, reason in failed:
            log.warning("receiver %s: instance from %s not imported: %s", self._status.aet,
                        senders.get(str(path), "an earlier run"), reason)
        self.spool.remove(paths)  # imported, or refused for good: no plaintext is kept
        with self._cond:
            self._status.imported += done
            self._status.failed += len(failed)
            self._done += len(batch)
            self._message(f"imported {done} instances"
                          + (f", {len(failed)} could not be imported" if failed else ""))

    # --- lifetime ---------------------------------------------------------------------------

    def start(self) -> Receiver:
        with self._life:  # one start or stop at a time, whichever thread calls
            return self._start()

    def _start(self) -> Receiver:
        with self._cond:
            if self._status.running:
                return self
            self._stopping = False
        for stale in self.spool.root.glob(".*.part"):  # half-written by a crash
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        leftovers = self.spool.files()
        self._server.start()
        with self._cond:
            self._status.port = self._server.port
            self._status.running = True
            if leftovers:  # resume: what a crash left is imported first, then deleted
                self._pending[:0] = [(p, "an earlier run") for p in leftovers]
                self._status.received += len(leftovers)
                self._flush_now = True
                self._message(f"importing {len(leftovers)} instances left by an earlier run")
        self._thread = threading.Thread(target=self._run, name="radcrypt-receiver-import",
                                        daemon=True)
        self._thread.start()
        log.info("receiver %s listening on %s:%d", self._status.aet, self._server.host,
                 self._server.port)
        return self

    def stop(self, timeout: float = 300.0) -> ReceiverStatus:
        """Stop listening, import what was received, stop the import thread."""
        with self._life:
            return self._stop(timeout)

    def _stop(self, timeout: float) -> ReceiverStatus:
        self._server.stop()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            self._status.running = False
        return self.status()

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing received waits for import (tests, bench, CLI summaries)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                if not self._pending and self._done >= self._status.received:
                    return True
            time.sleep(0.05)
        return False
