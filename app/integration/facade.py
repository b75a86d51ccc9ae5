"""``Client.pacs``: hospital integration as use cases — DICOM nodes, echo, find, import a
study from a PACS, send decrypted originals to one, receive from modalities, FHIR export.

A facet of the facade (app/core/client.py): it takes the client and calls its public
methods (import_files, image_meta, studies, get_original), never importing that module,
so the import graph stays acyclic and both front ends still see one facade. DIMSE nodes
go through dimse.py/receiver.py (pynetdicom), DICOMweb-only nodes through dicomweb.py
(dicomweb-client); a node with both uses DIMSE. Plaintext DICOM files exist only in the
private spool (spool.py) while a transfer runs, and are deleted when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.core.errors import Cancelled, RadcryptError
from app.core.progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from app.integration.model import DicomNode, EchoResult, RemoteSeries, RemoteStudy, SendReport
from app.integration.nodes import DEFAULT_AET, DEFAULT_PORT, NodeBook, ReceiverSettings
from app.integration.receiver import Peer, Receiver
from app.integration.spool import Spool
from app.integration.tls import TlsFiles, server_context

__all__ = ["DicomNode", "EchoResult", "Pacs", "Peer", "Receiver", "ReceiverSettings",
           "RemoteSeries", "RemoteStudy", "SendReport", "TlsFiles"]
# The types front ends need besides app.integration.model's, re-exported here: the front
# ends import this module (and model), never dimse/receiver/nodes/spool/tls (.importlinter).

log = logging.getLogger(__name__)

METHODS = ("auto", "get", "move")
STALE_TRANSFER_SECONDS = 6 * 3600  # a transfer folder this old was left by a crash


class Pacs:
    """Hospital integration use cases; every method may block on the network (a GUI calls
    it from a worker thread). ``client`` is the facade (typed Any on purpose)."""

    def __init__(self, client: Any, book: NodeBook | None = None) -> None:
        self.client = client
        self.book = book or NodeBook()

    # --- nodes ------------------------------------------------------------------------------

    def nodes(self) -> list[DicomNode]:
        return self.book.nodes()

    def node(self, name: str) -> DicomNode:
        """The node of that name (NodeNotFound, a RadcryptError, naming the known ones)."""
        return self.book.node(name)

    def _target(self, name: str) -> DicomNode:
        """A configured node; or, for an http(s):// URL (`--dicomweb URL`), a one-off
        DICOMweb node without a user (a server that wants a password is added as a node,
        its password kept with `pacs node passwd`)."""
        if name.startswith(("http://", "https://")):
            from app.integration.nodes import check_node

            return check_node(DicomNode(name="dicomweb", dicomweb_url=name))
        return self.book.node(name)

    def save_node(self, node: DicomNode) -> DicomNode:
        """Add or replace a node (by name), checked first (RadcryptError naming the field)."""
        return self.book.save(node)

    def remove_node(self, name: str) -> None:
        """Remove a node and forget its DICOMweb password."""
        node = self.book.node(name)
        self.book.remove(name)
        if node.username:
            from app.integration import secrets

            with contextlib.suppress(RadcryptError):
                secrets.delete_password(node)

    def set_web_password(self, name: str, password: str) -> None:
        """Keep the node's DICOMweb password in the OS keyring (never in the node file)."""
        from app.integration import secrets

        node = self.book.node(name)
        if not node.username:
            raise RadcryptError(f"node {name}: set its DICOMweb user first")
        secrets.set_password(node, password)

    def receiver_settings(self) -> ReceiverSettings:
        """Our AE title, port and TLS files (what a PACS must know to move studies to us)."""
        return self.book.receiver()

    def save_receiver_settings(self, settings: ReceiverSettings) -> ReceiverSettings:
        return self.book.save_receiver(settings)

    def _scu(self) -> Any:
        from app.integration.dimse import Scu

        mine = self.book.receiver()
        files = TlsFiles(mine.cert_file, mine.key_file, mine.ca_file)
        return Scu(mine.aet, files if any((files.cert_file, files.ca_file)) else None)

    # --- echo and find ----------------------------------------------------------------------

    def echo(self, name: str) -> EchoResult:
        """C-ECHO for a DIMSE node; a QIDO-RS probe for a DICOMweb-only node. Never raises
        for a node that does not answer: the result says why."""
        node = self._target(name)
        if node.dimse:
            result: EchoResult = self._scu().echo(node)
            return result
        from app.integration import dicomweb

        try:
            return dicomweb.echo(node)
        except RadcryptError as exc:
            return EchoResult(node.name, False, 0.0, str(exc))

    def find_studies(self, name: str, *, patient_id: str = "", patient_name: str = "",
                     study_date: str = "", accession: str = "", modality: str = ""
                     ) -> list[RemoteStudy]:
        """Studies on the node matching the filters ("" matches anything; DICOM
        wildcards * and ? and date ranges YYYYMMDD-YYYYMMDD pass through)."""
        node = self._target(name)
        filters = {"patient_id": patient_id, "patient_name": patient_name,
                   "study_date": study_date, "accession": accession, "modality": modality}
        if node.dimse:
            found: list[RemoteStudy] = self._scu().find_studies(node, **filters)
            return found
        from app.integration import dicomweb

        return dicomweb.find_studies(node, {k: v for k, v in filters.items() if v})

    def find_series(self, name: str, study_uid: str) -> list[RemoteSeries]:
        node = self._target(name)
        if node.dimse:
            found: list[RemoteSeries] = self._scu().find_series(node, study_uid)
            return found
        from app.integration import dicomweb

        return dicomweb.find_series(node, study_uid)

    # --- import a study from a PACS -------------------------------------------------------

    def _spool(self, name: str) -> Spool:
        spool = Spool.under(Path(self.client.settings.data_path), name)
        now = time.time()
        for folder in spool.root.iterdir():  # transfers a crash left behind
            with contextlib.suppress(OSError):
                if folder.is_dir() and now - folder.stat().st_mtime > STALE_TRANSFER_SECONDS:
                    shutil.rmtree(folder, ignore_errors=True)
        return spool

    def retrieve(self, name: str, study_uid: str, spool: Spool, *,
                 progress: ProgressCallback = no_progress, cancel: CancelToken | None = None,
                 method: str = "auto") -> list[Path]:
        """Every instance of the study into ``spool`` (C-GET, C-MOVE to our receiver's AE
        title and port, or WADO-RS for a web-only node); raises unless all of it came."""
        if method not in METHODS:
            raise RadcryptError(f"retrieve method must be one of {', '.join(METHODS)}")
        node = self._target(name)
        if not node.dimse:
            from app.integration import dicomweb

            return dicomweb.retrieve_study(node, study_uid, spool.root, cancel,
                                           progress=progress)
        from app.integration.dimse import DicomNetworkError, TransferIncomplete

        scu = self._scu()
        if method in ("auto", "get"):
            try:
                got: list[Path] = scu.get_study(node, study_uid, spool, progress=progress,
                                                cancel=cancel)
                return got
            except TransferIncomplete:
                raise
            except DicomNetworkError as exc:
                if method == "get":
                    raise
                log.info("C-GET from node %s failed (%s); trying C-MOVE", node.name, exc)
                spool.clear()
        mine = self.book.receiver()
        tls = server_context(TlsFiles(mine.cert_file, mine.key_file, mine.ca_file)) \
            if mine.tls else None
        moved: list[Path] = scu.move_study(node, study_uid, spool, port=mine.port, tls=tls,
                                           progress=progress, cancel=cancel)
        return moved

    def import_study(self, repo: Any, name: str, study_uid: str, *,
                     progress: ProgressCallback = no_progress,
                     cancel: CancelToken | None = None, method: str = "auto") -> Any:
        """Retrieve a whole study from the node into a private spool, then import it
        through the normal import path (``client.import_files``: encrypt, features,
        upload, commit in batches; resumable). A transfer that fails, is cancelled or
        loses the PACS half-way imports nothing. ``method``: "auto" (C-GET, else C-MOVE),
        "get" or "move" (the PACS must know our AE title and receiver port). Returns the
        ImportReport; the spool is deleted in every case."""
        with self._spool("retrieve").transfer() as spool:
            files = self.retrieve(name, study_uid, spool, progress=progress, cancel=cancel,
                                  method=method)
            if cancel is not None and cancel.cancelled:
                raise Cancelled("import from the PACS cancelled; nothing was imported")
            progress(ProgressEvent("retrieve", len(files), len(files),
                                   message=f"{len(files)} instances retrieved"))
            return self.client.import_files(repo, files, progress=progress, cancel=cancel)

    # --- send decrypted originals ----------------------------------------------------------

    def _originals(self, repo: Any, image_ids: Sequence[str], whole_study: bool
                   ) -> list[str]:
        """Ids of the objects holding the originals to send (one per instance: the frames
        of a multi-frame file share one), in a stable order."""
        metas = [self.client.image_meta(repo, image_id) for image_id in image_ids]
        if whole_study:
            wanted = {m.study_uid for m in metas if m.study_uid}
            if wanted:
                for study in self.client.studies(repo):
                    if study.key in wanted:
                        metas += [m for series in study.series for m in series.images]
        out: list[str] = []
        for meta in metas:
            if meta.error:
                raise RadcryptError(f"image {meta.image_id} is damaged: {meta.error}")
            original = meta.original_image_id
            if original not in out:
                out.append(original)
        return out

    def send(self, repo: Any, image_ids: Sequence[str], name: str, *,
             whole_study: bool = False, progress: ProgressCallback = no_progress
             ) -> SendReport:
        """Decrypt the originals (verified, recorded in the access log) into a private
        spool and send them to the node: C-STORE exactly as stored (no transcoding), or
        STOW-RS for a web-only node. ``whole_study``: every image of the images' studies.
        The report names each image id sent or failed (with the reason)."""
        node = self._target(name)
        originals = self._originals(repo, list(image_ids), whole_study)
        if not originals:
            return SendReport(node.name)
        with self._spool("send").transfer(prefix="send-") as spool:
            files: dict[str, Path] = {}
            for done, image_id in enumerate(originals, 1):
                dest = spool.root / f"{image_id}.dcm"
                self.client.get_original(repo, image_id, dest)
                files[image_id] = dest
                progress(ProgressEvent("decrypt", done, len(originals), item=image_id))
            if node.dimse:
                sent, failed = self._scu().store(node, list(files.items()),
                                                 progress=progress)
                return SendReport(node.name, sent, failed)
            from app.integration import dicomweb

            report: SendReport = dicomweb.store(node, files, progress=progress)
            return report

    # --- receive -------------------------------------------------------------------------

    def receiver(self, repo: Any, *, aet: str = DEFAULT_AET, port: int = DEFAULT_PORT,
                 peers: Sequence[Peer | DicomNode | tuple[str, str] | str] | None = None,
                 tls: TlsFiles | ssl.SSLContext | None = None, host: str = "0.0.0.0",
                 batch_size: int = 64) -> Receiver:
        """A Storage SCP importing into ``repo`` (not started: call ``start()``).
        ``peers``: who may send (AE title + host); default every configured DIMSE node.
        ``tls``: certificate files or an ssl context (default: the receiver settings' TLS
        when turned on). Received instances wait in a private spool (0700) emptied as they
        are imported and on start-up."""
        from app.integration.nodes import check_aet, check_port

        aet = check_aet(aet, "receiver")
        if port:  # 0: any free port (tests)
            check_port(port, "receiver")
        chosen = [Peer.of(p) for p in peers] if peers is not None else \
            [Peer.of(n) for n in self.book.nodes() if n.dimse]
        if not chosen:
            raise RadcryptError("the receiver would refuse everyone: add the PACS or "
                                "modality as a DICOM node first ('radcrypt pacs node add' or "
                                "Settings > DICOM nodes), or name --peer AET@HOST")
        context: ssl.SSLContext | None
        if isinstance(tls, ssl.SSLContext):
            context = tls
        elif isinstance(tls, TlsFiles):
            context = server_context(tls)
        else:
            mine = self.book.receiver()
            context = server_context(TlsFiles(mine.cert_file, mine.key_file, mine.ca_file)) \
                if mine.tls else None
        spool = Spool.under(Path(self.client.settings.data_path), f"receive-{aet}-{port}")
        return Receiver(self.client, repo, aet=aet, port=port, spool=spool, peers=chosen,
                        host=host, tls=context, batch_size=batch_size)

    # --- FHIR -------------------------------------------------------------------------------

    def export_fhir(self, repo: Any, image_id: str, dest: str | Path, *,
                    whole_study: bool = True, document: str | Path | None = None) -> Path:
        """An HL7 FHIR R4 Bundle: the ImagingStudy of the image's study (or its instance
        only) and, with ``document`` (a decrypted file), its DocumentReference
        (app/integration/fhir.py)."""
        from app.integration import fhir

        return fhir.export(self.client, repo, image_id, dest, whole_study=whole_study,
                           document=document)
