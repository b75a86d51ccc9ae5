"""Our DICOM SCU (pynetdicom): C-ECHO, C-FIND (study, series, instance), C-GET and C-MOVE
of a study into a private spool, and C-STORE of files to a node.

Why retrieval ends in a spool and a check: the import path must only ever see a whole
study. A retrieve counts what the PACS said it would send (C-FIND at instance level),
what it says it sent (the final C-GET/C-MOVE response's sub-operation counts) and what
arrived; any difference, a failed sub-operation, an abort or a PACS that goes away is a
``TransferIncomplete``, and the caller deletes the spool without importing anything.

Errors are RadcryptError subclasses in plain words naming the node and its address; no
dataset content (patient data) is logged.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.errors import Cancelled, RadcryptError
from app.core.progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from app.integration.model import DicomNode, EchoResult, RemoteSeries, RemoteStudy
from app.integration.receiver import Peer, StorageServer
from app.integration.spool import Spool
from app.integration.tls import TlsFiles, client_context

log = logging.getLogger(__name__)

MAX_CONTEXTS = 120  # of the 128 presentation contexts an association may request
PENDING = (0xFF00, 0xFF01)


class DicomNetworkError(RadcryptError):
    """A DIMSE exchange with a node failed (unreachable, refused, aborted, bad status)."""


class TransferIncomplete(DicomNetworkError):
    """A retrieve did not bring the whole study: nothing of it is imported."""


def _study_query(study_uid: str) -> Any:
    """The identifier of a study-level C-GET or C-MOVE."""
    from pydicom.dataset import Dataset

    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    return q


def _final_status(assoc: Any, responses: Any, cancel: CancelToken) -> Any:
    """The last non-pending status of a C-GET or C-MOVE (None when the node answered
    none); a cancel aborts the association and raises Cancelled."""
    final = None
    for status, _ in responses:
        if cancel.cancelled:
            assoc.abort()
            raise Cancelled("retrieve cancelled; nothing was imported")
        code = int(getattr(status, "Status", -1)) if status else -1
        if code not in PENDING:
            final = status if code >= 0 else None
    return final


def _where(node: DicomNode) -> str:
    return f"node {node.name} ({node.aet} at {node.host}:{node.port})"


@dataclass
class Scu:
    """Our side of outgoing associations: our AE title and TLS files (used when a TLS node
    names none of its own)."""

    aet: str = "RADCRYPT"
    tls: TlsFiles | None = None
    acse_timeout: float = 15
    dimse_timeout: float = 120
    network_timeout: float = 60

    def _ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.aet)
        ae.acse_timeout = self.acse_timeout
        ae.dimse_timeout = self.dimse_timeout
        ae.network_timeout = self.network_timeout
        ae.maximum_pdu_size = 0
        return ae

    @contextlib.contextmanager
    def associate(self, node: DicomNode, contexts: list[tuple[str, list[str]]],
                  **kwargs: Any) -> Iterator[Any]:
        """An established association with ``node`` requesting ``contexts`` ((abstract
        syntax, transfer syntaxes) pairs), released (or aborted on error) afterwards."""
        if not node.dimse:
            raise DicomNetworkError(f"node {node.name} has no DICOM network address (AE "
                                    "title, host, port)")
        ae = self._ae()
        for abstract, syntaxes in contexts[:128]:
            ae.add_requested_context(abstract, syntaxes)
        tls_args = (client_context(node, self.tls), node.host) if node.tls else None
        try:
            assoc = ae.associate(node.host, node.port, ae_title=node.aet,
                                 tls_args=tls_args, **kwargs)
        except OSError as exc:  # name resolution and the like
            raise DicomNetworkError(f"cannot reach {_where(node)}: {exc}") from None
        if not assoc.is_established:
            if assoc.is_rejected:
                raise DicomNetworkError(f"{_where(node)} refused the association (is our AE "
                                        f"title {self.aet} configured on it?)")
            unreachable = _unreachable(node)
            if unreachable:
                raise DicomNetworkError(f"cannot reach {_where(node)}: {unreachable}")
            if assoc.is_aborted:
                raise DicomNetworkError(f"{_where(node)} aborted the association"
                                        + (" (TLS handshake failed?)" if node.tls else ""))
            raise DicomNetworkError(f"{_where(node)} did not answer the association request "
                                    f"within {self.acse_timeout:.0f} s")
        try:
            yield assoc
        except BaseException:
            assoc.abort()
            raise
        else:
            if assoc.is_established:
                assoc.release()

    # --- C-ECHO ------------------------------------------------------------------------------

    def echo(self, node: DicomNode) -> EchoResult:
        from pynetdicom import DEFAULT_TRANSFER_SYNTAXES
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        start = time.perf_counter()
        try:
            with self.associate(node, [(Verification, DEFAULT_TRANSFER_SYNTAXES)]) as assoc:
                status = assoc.send_c_echo()
        except RadcryptError as exc:
            return EchoResult(node.name, False, time.perf_counter() - start, str(exc))
        seconds = time.perf_counter() - start
        code = int(getattr(status, "Status", -1)) if status else -1
        if code != 0:
            return EchoResult(node.name, False, seconds,
                              f"{_where(node)} answered C-ECHO with status 0x{code:04X}"
                              if code >= 0 else f"{_where(node)} did not answer C-ECHO")
        return EchoResult(node.name, True, seconds, f"C-ECHO ok ({seconds * 1000:.0f} ms)")

    # --- C-FIND ------------------------------------------------------------------------------

    def _find(self, node: DicomNode, query: Any) -> list[Any]:
        from pynetdicom import DEFAULT_TRANSFER_SYNTAXES
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelFind as FIND,
        )

        found = []
        with self.associate(node, [(FIND, DEFAULT_TRANSFER_SYNTAXES)]) as assoc:
            for status, identifier in assoc.send_c_find(query, FIND):
                code = int(getattr(status, "Status", -1)) if status else -1
                if code in PENDING:
                    if identifier is not None:
                        found.append(identifier)
                elif code != 0:
                    raise DicomNetworkError(
                        f"{_where(node)} answered C-FIND with status 0x{code:04X}"
                        if code >= 0 else f"{_where(node)} stopped answering C-FIND (does it "
                        f"allow queries from our AE title {self.aet}?)")
        return found

    def find_studies(self, node: DicomNode, *, patient_id: str = "", patient_name: str = "",
                     study_date: str = "", accession: str = "", modality: str = ""
                     ) -> list[RemoteStudy]:
        from pydicom.dataset import Dataset

        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        q.PatientName = patient_name
        q.PatientID = patient_id
        q.StudyDate = study_date
        q.AccessionNumber = accession
        q.ModalitiesInStudy = modality
        q.StudyDescription = ""
        q.NumberOfStudyRelatedSeries = ""
        q.NumberOfStudyRelatedInstances = ""
        out = []
        for ds in self._find(node, q):
            modalities = ds.get("ModalitiesInStudy", "")
            if isinstance(modalities, str):
                modalities = [m for m in modalities.split("\\") if m]
            out.append(RemoteStudy(
                study_uid=str(ds.get("StudyInstanceUID", "")),
                patient_name=str(ds.get("PatientName", "")),
                patient_id=str(ds.get("PatientID", "")),
                study_date=str(ds.get("StudyDate", "")),
                description=str(ds.get("StudyDescription", "")),
                accession=str(ds.get("AccessionNumber", "")),
                modalities=tuple(str(m) for m in modalities),
                series_count=_int(ds.get("NumberOfStudyRelatedSeries")),
                instance_count=_int(ds.get("NumberOfStudyRelatedInstances"))))
        return sorted(out, key=lambda s: (s.study_date, s.study_uid), reverse=True)

    def find_series(self, node: DicomNode, study_uid: str) -> list[RemoteSeries]:
        from pydicom.dataset import Dataset

        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        q.Modality = ""
        q.SeriesDescription = ""
        q.SeriesNumber = ""
        q.NumberOfSeriesRelatedInstances = ""
        out = [RemoteSeries(study_uid=study_uid,
                            series_uid=str(ds.get("SeriesInstanceUID", "")),
                            modality=str(ds.get("Modality", "")),
                            description=str(ds.get("SeriesDescription", "")),
                            number=str(ds.get("SeriesNumber", "") or ""),
                            instance_count=_int(ds.get("NumberOfSeriesRelatedInstances")))
               for ds in self._find(node, q)]
        return sorted(out, key=lambda s: (_int(s.number), s.series_uid))

    def find_instances(self, node: DicomNode, study_uid: str) -> list[tuple[str, str]]:
        """(SOP Instance UID, SOP Class UID) of every instance of a study, series by
        series (the hierarchical query PS3.4 C.4.1.2.1 asks for)."""
        from pydicom.dataset import Dataset

        out: list[tuple[str, str]] = []
        for series in self.find_series(node, study_uid):
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID = study_uid
            q.SeriesInstanceUID = series.series_uid
            q.SOPInstanceUID = ""
            q.SOPClassUID = ""
            out += [(str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", "")))
                    for ds in self._find(node, q)]
        return out

    # --- C-GET and C-MOVE into a spool -----------------------------------------------------

    def _plan(self, node: DicomNode, study_uid: str) -> list[tuple[str, str]]:
        instances = self.find_instances(node, study_uid)
        if not instances:
            raise DicomNetworkError(f"{_where(node)} has no instance of study {study_uid}")
        return instances

    @staticmethod
    def _check_final(node: DicomNode, what: str, final: Any, expected: int, arrived: int
                     ) -> None:
        if final is None:
            raise TransferIncomplete(f"{_where(node)} went away during the {what} "
                                     f"({arrived} of {expected} instances arrived); "
                                     "nothing was imported")
        code = int(getattr(final, "Status", -1)) if final else -1
        failed = _int(final.get("NumberOfFailedSuboperations")) if final else 0
        if code != 0 or failed:
            words = ("stopped answering" if code < 0 else f"ended with status 0x{code:04X}")
            raise TransferIncomplete(f"{_where(node)} {words} during the {what}: {arrived} "
                                     f"of {expected} instances arrived, {failed} failed; "
                                     "nothing was imported")
        if arrived < expected:
            raise TransferIncomplete(f"{_where(node)} sent {arrived} of the {expected} "
                                     f"instances of the study during the {what}; nothing "
                                     "was imported")

    def get_study(self, node: DicomNode, study_uid: str, spool: Spool, *,
                  progress: ProgressCallback = no_progress,
                  cancel: CancelToken | None = None) -> list[Path]:
        """C-GET the whole study into ``spool``; TransferIncomplete unless all of it came."""
        from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, build_role, evt
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelGet as GET,
        )

        instances = self._plan(node, study_uid)
        classes = sorted({c for _, c in instances if c})
        if len(classes) > MAX_CONTEXTS:
            raise DicomNetworkError(f"study {study_uid} on {_where(node)} has "
                                    f"{len(classes)} SOP classes: too many for one C-GET")
        # One context per transfer syntax family, so that the PACS can send each instance
        # as it stores it (a single context with many syntaxes gets one of them accepted,
        # and the PACS would have to transcode, or fail where it cannot).
        families = _syntax_families() if len(classes) * 12 <= MAX_CONTEXTS else \
            [list(DEFAULT_TRANSFER_SYNTAXES)]
        got: list[Path] = []
        cancel = cancel or CancelToken()

        def on_store(event: Any) -> int:
            sop = str(event.request.AffectedSOPInstanceUID)
            got.append(spool.put(event.encoded_dataset(include_meta=True), sop))
            progress(ProgressEvent("retrieve", len(got), len(instances), item=sop))
            return 0x0000

        contexts = [(GET, DEFAULT_TRANSFER_SYNTAXES)] + \
            [(c, family) for c in classes for family in families]
        roles = [build_role(c, scp_role=True) for c in classes]
        progress(ProgressEvent("retrieve", 0, len(instances), message="C-GET"))
        with self.associate(node, contexts, ext_neg=roles,
                            evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
            final = _final_status(assoc, assoc.send_c_get(_study_query(study_uid), GET),
                                  cancel)
        self._check_final(node, "C-GET", final, len(instances), len(got))
        return got

    def move_study(self, node: DicomNode, study_uid: str, spool: Spool, *, port: int,
                   host: str = "0.0.0.0", tls: Any = None,
                   progress: ProgressCallback = no_progress,
                   cancel: CancelToken | None = None) -> list[Path]:
        """C-MOVE the study to our AE title: a Storage SCP of our own listens on ``port``
        for the node's C-STOREs (only the node may associate) while the move runs."""
        from pynetdicom import DEFAULT_TRANSFER_SYNTAXES
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelMove as MOVE,
        )

        instances = self._plan(node, study_uid)
        got: list[Path] = []
        lock = threading.Lock()
        cancel = cancel or CancelToken()

        def arrived(path: Path, sender: str) -> None:
            with lock:
                got.append(path)
                count = len(got)
            progress(ProgressEvent("retrieve", count, len(instances), item=path.stem))

        server = StorageServer(self.aet, port, spool=spool, host=host, tls=tls,
                               peers=[Peer(node.aet, node.host)], on_instance=arrived,
                               check=False)
        server.start()
        progress(ProgressEvent("retrieve", 0, len(instances), message="C-MOVE"))
        try:
            with self.associate(node, [(MOVE, DEFAULT_TRANSFER_SYNTAXES)]) as assoc:
                final = _final_status(
                    assoc, assoc.send_c_move(_study_query(study_uid), self.aet, MOVE), cancel)
        finally:
            server.stop()
        with lock:
            paths = list(got)
        self._check_final(node, "C-MOVE", final, len(instances), len(paths))
        return paths

    # --- C-STORE -------------------------------------------------------------------------

    def store(self, node: DicomNode, files: list[tuple[str, Path]], *,
              progress: ProgressCallback = no_progress) -> tuple[list[str], list[tuple[str, str]]]:
        """C-STORE each (label, path), exactly as the file encodes it (no transcoding:
        the pixel data the node stores is the file's). Returns (labels sent, [(label,
        plain reason)] failed)."""
        import pydicom
        from pynetdicom import _config

        # Send files as their bytes (pynetdicom reads the dataset after the file meta
        # without decoding it): nothing is re-encoded on the way.
        _config.STORE_SEND_CHUNKED_DATASET = True
        heads: list[tuple[str, Path, str, str]] = []
        failed: list[tuple[str, str]] = []
        for label, path in files:
            try:
                path = _with_file_meta(path)
                meta = pydicom.filereader.read_file_meta_info(path)
                heads.append((label, path, str(meta.MediaStorageSOPClassUID),
                              str(meta.TransferSyntaxUID)))
            except Exception as exc:
                failed.append((label, f"not a DICOM file that can be sent: "
                                      f"{type(exc).__name__}: {str(exc)[:100]}"))
        sent: list[str] = []
        pairs = sorted({(c, t) for _, _, c, t in heads})
        for start in range(0, len(pairs), MAX_CONTEXTS):
            chunk = pairs[start:start + MAX_CONTEXTS]
            todo = [h for h in heads if (h[2], h[3]) in set(chunk)]
            with self.associate(node, [(c, [t]) for c, t in chunk]) as assoc:
                accepted = {(cx.abstract_syntax, cx.transfer_syntax[0])
                            for cx in assoc.accepted_contexts}
                for label, path, sop_class, syntax in todo:
                    if (sop_class, syntax) not in accepted:
                        failed.append((label, f"{_where(node)} does not accept "
                                              f"{_uid_name(sop_class)} in "
                                              f"{_uid_name(syntax)}"))
                        continue
                    status = assoc.send_c_store(path)
                    code = int(getattr(status, "Status", -1)) if status else -1
                    if code == 0 or 0xB000 <= code <= 0xBFFF:
                        sent.append(label)
                    else:
                        failed.append((label, f"{_where(node)} answered C-STORE with status "
                                              f"0x{code:04X}" if code >= 0 else
                                              f"{_where(node)} did not answer C-STORE"))
                    progress(ProgressEvent("send", len(sent) + len(failed), len(files),
                                           item=label))
                    if not assoc.is_established:
                        break
            done = set(sent) | {label for label, _ in failed}
            failed += [(h[0], f"{_where(node)} ended the association before it was sent")
                       for h in todo if h[0] not in done]
        return sent, failed


def _unreachable(node: DicomNode) -> str:
    """Why a TCP connection to the node fails, or "" when one opens (then the failed
    association was the node's doing, not the network's)."""
    import socket

    try:
        with socket.create_connection((node.host, node.port), timeout=5):
            return ""
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def _with_file_meta(path: Path) -> Path:
    """``path`` when it has file meta information (group 0002 with a transfer syntax);
    else a copy beside it with one, the dataset's encoding unchanged (files written
    without a preamble, as some old modalities did)."""
    import pydicom
    import pydicom.errors
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except pydicom.errors.InvalidDicomError:  # no preamble: a bare dataset
        meta = FileMetaDataset()
    if "TransferSyntaxUID" in meta and "MediaStorageSOPClassUID" in meta:
        return path
    ds = pydicom.dcmread(path, force=True)
    implicit = ds.original_encoding[0] if ds.original_encoding[0] is not None else True
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta = file_meta
    copy = path.with_name(path.name + ".meta.dcm")
    ds.save_as(copy, enforce_file_format=True)
    return copy


def _syntax_families() -> list[list[str]]:
    """Transfer syntaxes offered one context each (uncompressed ones share one)."""
    from pydicom import uid

    plain = [str(uid.ExplicitVRLittleEndian), str(uid.ImplicitVRLittleEndian)]
    return [plain] + [[str(s)] for s in (
        uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
        uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000,
        uid.RLELossless, uid.DeflatedExplicitVRLittleEndian, uid.ExplicitVRBigEndian)]


def _int(value: Any) -> int:
    try:
        return int(str(value).strip() or 0)
    except (TypeError, ValueError):
        return 0


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid
