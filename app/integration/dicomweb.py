"""DICOMweb (QIDO-RS, WADO-RS, STOW-RS) with dicomweb-client, for nodes with a DICOMweb URL.

The facade (app/integration/facade.py, ``Client.pacs``) calls these for web nodes; they know
nothing of repositories: they find, fetch files into a folder the caller owns (the private
spool) and send files the caller decrypted. Public API, stable names:

    find_studies(node, filters=None, *, password=None, limit=500) -> list[RemoteStudy]
        filters: patient_id, patient_name, study_date, accession, modality (the facade's
        keyword names; "" means any), or DICOM keywords (StudyInstanceUID, ...).
    find_series(node, study_uid, *, password=None) -> list[RemoteSeries]
    retrieve_study(node, study_uid, dest_dir, cancel=None, *, password=None,
                   progress=no_progress) -> list[Path]
        every instance as the server stored it (transfer syntax "*"), one file each
        (0600) in dest_dir; all or nothing: every instance QIDO lists, and the multipart
        answer's closing boundary, or the files it wrote are removed and it raises.
    store(node, files, *, password=None, progress=no_progress, cancel=None) -> SendReport
        files: {image id: path} (or paths, named by file name); STOW-RS in batches, each
        instance's outcome read from the server's answer (a batch refused whole is sent
        again one instance at a time, so one bad file does not sink the others).
    echo(node, *, password=None) -> EchoResult   (a QIDO probe: the "Test" button)

Basic auth: ``node.username`` with the password from app/integration/secrets.py (the OS
keyring); ``password=`` overrides it (a prompt's answer). No password ever appears in a
message, a log line or the node's config. Errors are DicomWebError, in plain words naming
the node and the server's address (never with credentials).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from app.core.errors import Cancelled, RadcryptError
from app.core.progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from app.integration.model import DicomNode, EchoResult, RemoteSeries, RemoteStudy, SendReport

log = logging.getLogger(__name__)

TIMEOUT = (10.0, 120.0)  # (connect, read) seconds: a PACS answering slowly is not dead
STORE_BATCH_FILES = 16
STORE_BATCH_BYTES = 64 * 1024 * 1024
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)  # the stored bytes, not a transcode

# The facade's filter names -> QIDO-RS attribute keywords (study level).
FILTERS = {"patient_id": "PatientID", "patient_name": "PatientName",
           "study_date": "StudyDate", "accession": "AccessionNumber",
           "modality": "ModalitiesInStudy", "study_uid": "StudyInstanceUID"}
STUDY_FIELDS = ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate",
                "StudyDescription", "AccessionNumber", "ModalitiesInStudy",
                "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_FIELDS = ("SeriesInstanceUID", "Modality", "SeriesDescription", "SeriesNumber",
                 "NumberOfSeriesRelatedInstances")


class DicomWebError(RadcryptError):
    """A DICOMweb request failed; the message names the node, the server and the cause.
    ``status``: the HTTP status when the server answered with an error, else 0."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


# --- public API ---------------------------------------------------------------------------


def find_studies(node: DicomNode, filters: Mapping[str, str] | None = None, *,
                 password: str | None = None, limit: int = 500) -> list[RemoteStudy]:
    """QIDO-RS ``/studies``: the studies matching every non-empty filter."""
    query = _query(node, filters or {})
    web = _client(node, password)
    items = _call(node, "find studies", lambda: web.search_for_studies(
        search_filters=query, fields=list(STUDY_FIELDS), limit=limit))
    studies = []
    for item in items:
        ds = _dataset(node, item)
        uid = _text(ds, "StudyInstanceUID")
        if not uid:
            continue  # a server's answer without the key is useless to import
        studies.append(RemoteStudy(
            study_uid=uid, patient_name=_text(ds, "PatientName"),
            patient_id=_text(ds, "PatientID"), study_date=_text(ds, "StudyDate"),
            description=_text(ds, "StudyDescription"), accession=_text(ds, "AccessionNumber"),
            modalities=tuple(_values(ds, "ModalitiesInStudy")),
            series_count=_int(ds, "NumberOfStudyRelatedSeries"),
            instance_count=_int(ds, "NumberOfStudyRelatedInstances")))
    return studies


def find_series(node: DicomNode, study_uid: str, *, password: str | None = None
                ) -> list[RemoteSeries]:
    """QIDO-RS ``/studies/{uid}/series``: the series of one study."""
    if not study_uid:
        raise DicomWebError(f"node {node.name}: a Study Instance UID is needed to list series")
    web = _client(node, password)
    items = _call(node, f"find the series of study {study_uid}", lambda: web.search_for_series(
        study_instance_uid=study_uid, fields=list(SERIES_FIELDS)))
    series = []
    for item in items:
        ds = _dataset(node, item)
        uid = _text(ds, "SeriesInstanceUID")
        if uid:
            series.append(RemoteSeries(
                study_uid=study_uid, series_uid=uid, modality=_text(ds, "Modality"),
                description=_text(ds, "SeriesDescription"), number=_text(ds, "SeriesNumber"),
                instance_count=_int(ds, "NumberOfSeriesRelatedInstances")))
    return series


def retrieve_study(node: DicomNode, study_uid: str, dest_dir: Path,
                   cancel: CancelToken | None = None, *, password: str | None = None,
                   progress: ProgressCallback = no_progress) -> list[Path]:
    """WADO-RS ``/studies/{uid}``: every instance, in the transfer syntax it was stored in,
    written to ``dest_dir`` (which the caller keeps private: the spool).

    All or nothing: a cancel, a dropped connection, a broken part, an answer that stops
    before the multipart message's closing boundary, or one that lacks an instance QIDO
    listed removes what this call wrote and raises (Cancelled or DicomWebError), so a
    half-fetched study is never imported. (Orthanc, like many servers, ends the answer by
    closing the connection, with no length: a cut connection looks like a short study
    unless the closing boundary is checked.)"""
    if not study_uid:
        raise DicomWebError(f"node {node.name}: a Study Instance UID is needed to retrieve")

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    watch = _MultipartWatch()
    web = _client(node, password, watch)
    what = f"retrieve study {study_uid}"
    listed = _call(node, f"list the instances of study {study_uid}",
                   lambda: web.search_for_instances(study_instance_uid=study_uid,
                                                    fields=["SOPInstanceUID"],
                                                    get_remaining=True))
    expected = {_text(_dataset(node, item), "SOPInstanceUID") for item in listed} - {""}
    if not expected:
        raise DicomWebError(f"node {node.name} ({_where(node)}) has no instance of study "
                            f"{study_uid}")
    written: list[Path] = []
    received: set[str] = set()
    try:
        if cancel is not None:
            cancel.check()
        parts = _call(node, what, lambda: web.iter_study(study_uid,
                                                         media_types=ANY_TRANSFER_SYNTAX))
        iterator = iter(parts)
        while True:
            if cancel is not None:
                cancel.check()
            ds = _call(node, what, lambda: next(iterator, None))
            if ds is None:
                break
            sop = str(getattr(ds, "SOPInstanceUID", "") or "")
            if not sop or sop in received:
                raise DicomWebError(f"node {node.name} ({_where(node)}) sent an instance "
                                    f"{'without a SOP Instance UID' if not sop else 'twice'}"
                                    f" while trying to {what}")
            received.add(sop)
            path = _unique(dest_dir, f"{len(written) + 1:06d}-{_safe(sop)}.dcm")
            try:
                _write_private(path, functools.partial(_dcmwrite, ds))
            except OSError as exc:
                raise DicomWebError(f"cannot write instance {sop} of study {study_uid} to "
                                    f"{dest_dir}: {exc.strerror}") from None
            except Exception as exc:  # a part pydicom read but cannot write back: broken
                raise DicomWebError(f"node {node.name} ({_where(node)}) sent instance {sop} "
                                    f"in a form that cannot be read while trying to {what} "
                                    f"({type(exc).__name__}); nothing was kept") from None
            written.append(path)
            progress(ProgressEvent("retrieve", len(written), len(expected), item=sop,
                                   status="received"))
        if watch.cut:
            raise DicomWebError(f"cannot {what}: node {node.name} ({_where(node)}) dropped "
                                f"the connection after {len(written)} instance(s); the "
                                "answer is incomplete, nothing was kept")
        if missing := expected - received:
            raise DicomWebError(f"node {node.name} ({_where(node)}) sent {len(received)} of "
                                f"the {len(expected)} instances it lists for study "
                                f"{study_uid} ({len(missing)} missing): the answer is "
                                "incomplete, nothing was kept")
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def store(node: DicomNode, files: Mapping[str, Path] | Sequence[Path], *,
          password: str | None = None, progress: ProgressCallback = no_progress,
          cancel: CancelToken | None = None) -> SendReport:
    """STOW-RS ``/studies``: send DICOM files as they are (decrypted originals).

    ``files`` maps an image id (what the report names) to a file; a plain list is named by
    file name. Sent in batches; each instance is reported sent only when the server's
    answer lists it among the stored SOP instances."""
    import pydicom

    items = (list(files.items()) if isinstance(files, Mapping)
             else [(Path(p).name, Path(p)) for p in files])
    report = SendReport(node=node.name)
    web = _client(node, password)
    batch: list[tuple[str, str, Any]] = []  # (image id, SOP Instance UID, dataset)
    size = 0

    def flush() -> None:
        nonlocal size
        if batch:
            _store_batch(node, web, batch, report)
            progress(ProgressEvent("send", len(report.sent) + len(report.failed), len(items),
                                   item=batch[-1][0], status="sent"))
        batch.clear()
        size = 0

    for image_id, path in items:
        if cancel is not None and cancel.cancelled:
            break
        try:
            ds = pydicom.dcmread(path)
            sop = str(ds.SOPInstanceUID)
        except Exception as exc:  # a file that is not DICOM: named, the others still go
            report.failed.append((image_id, f"{Path(path).name} is not a DICOM instance "
                                            f"({type(exc).__name__})"))
            continue
        batch.append((image_id, sop, ds))
        size += Path(path).stat().st_size
        if len(batch) >= STORE_BATCH_FILES or size >= STORE_BATCH_BYTES:
            flush()
    flush()
    return report


def echo(node: DicomNode, *, password: str | None = None) -> EchoResult:
    """The "Test" button of a web node: one QIDO-RS request (``limit=1``), timed."""
    start = time.monotonic()
    try:
        web = _client(node, password)
        _call(node, "test", lambda: web.search_for_studies(limit=1))
    except RadcryptError as exc:
        return EchoResult(node=node.name, ok=False, seconds=time.monotonic() - start,
                          message=str(exc))
    return EchoResult(node=node.name, ok=True, seconds=time.monotonic() - start,
                      message=f"DICOMweb answered at {_where(node)}")


# --- helpers ------------------------------------------------------------------------------


class _MultipartWatch:
    """A requests response hook that remembers whether a multipart answer reached its
    closing boundary (``--BOUNDARY--``): the only end marker an answer without a length
    has. It wraps the response's raw stream (urllib3's ``stream``, which requests'
    ``iter_content`` reads) to keep the last bytes seen."""

    TAIL = 512

    def __init__(self) -> None:
        self.boundary = b""
        self.tail = b""
        self.watched = False

    def hook(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        content_type = response.headers.get("Content-Type", "")
        if not content_type.lower().startswith("multipart/"):
            return response
        for item in content_type.split(";")[1:]:
            name, _, value = item.strip().partition("=")
            if name.lower() == "boundary":
                self.boundary = value.strip().strip('"').encode("utf-8")
        raw = response.raw
        stream = getattr(raw, "stream", None)
        if not self.boundary or stream is None:
            return response
        self.watched, self.tail = True, b""

        def recording(*a: Any, **kw: Any) -> Any:
            for chunk in stream(*a, **kw):
                self.tail = (self.tail + chunk)[-self.TAIL:]
                yield chunk

        raw.stream = recording
        return response

    @property
    def cut(self) -> bool:
        """True when a watched multipart answer ended before its closing boundary."""
        if not self.watched:
            return False
        return not self.tail.rstrip(b"\r\n \t").endswith(b"--" + self.boundary + b"--") \
            and (b"--" + self.boundary + b"--\r\n") not in self.tail


def _client(node: DicomNode, password: str | None,
            watch: _MultipartWatch | None = None) -> Any:
    """A dicomweb-client for the node: basic auth when it has a user, the node's CA for
    https, our timeouts."""
    if not node.dicomweb_url:
        raise DicomWebError(f"node {node.name} has no DICOMweb URL")
    parts = urlsplit(node.dicomweb_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DicomWebError(f"node {node.name}: the DICOMweb URL must start with http:// or "
                            f"https:// and name a host ({_where(node)})")
    if parts.username or parts.password:
        raise DicomWebError(f"node {node.name}: put the user in the node's user field, not "
                            "in the DICOMweb URL (the password goes to the OS keyring)")
    from dicomweb_client.api import DICOMwebClient
    from requests.auth import HTTPBasicAuth

    session = _session_class()()
    if node.username:
        if password is None:
            from app.integration import secrets
            password = secrets.password_for(node)
        session.auth = HTTPBasicAuth(node.username, password)
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            log.warning("node %s: DICOMweb basic auth over plain http sends the password "
                        "unencrypted to %s; prefer https", node.name, parts.hostname)
    if parts.scheme == "https" and node.ca_file:
        session.verify = node.ca_file
    if parts.scheme == "https" and node.cert_file:
        session.cert = (node.cert_file, node.key_file) if node.key_file else node.cert_file
    web = DICOMwebClient(url=node.dicomweb_url.rstrip("/"), session=session, timeout=TIMEOUT,
                         callback=watch.hook if watch is not None else None)
    # dicomweb-client retries 429/503/504 with exponential waits; a few tries, not minutes.
    web.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=200)
    return web


def _session_class() -> Any:
    """A requests Session that sends QIDO wildcards as themselves.

    requests percent-encodes ``*`` and ``?`` in query values (``PatientName=DOE%2A``);
    RFC 3986 allows both literally in a query, and Orthanc's DICOMweb plugin (1.10, the
    Debian one) only treats the literal characters as wildcards: encoded, a wildcard search
    finds nothing. So the prepared URL's query gets them back."""
    import requests

    class WildcardSession(requests.Session):
        def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
            prepared = super().prepare_request(request)
            url = prepared.url or ""
            if "?" in url:
                path, query = url.split("?", 1)
                query = query.replace("%2A", "*").replace("%2a", "*")
                query = query.replace("%3F", "?").replace("%3f", "?")
                prepared.url = f"{path}?{query}"
            return prepared

    return WildcardSession


def _call(node: DicomNode, what: str, func: Callable[[], Any]) -> Any:
    """Run one request; turn requests' and the server's failures into plain words."""
    import requests

    try:
        return func()
    except (Cancelled, RadcryptError):
        raise
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        raise DicomWebError(f"node {node.name} ({_where(node)}) refused to {what}: "
                            f"{_http_reason(status)}", status) from None
    except requests.exceptions.SSLError:
        raise DicomWebError(f"node {node.name} ({_where(node)}): the TLS certificate could "
                            "not be verified (set the node's CA file)") from None
    except requests.ConnectionError:
        raise DicomWebError(f"cannot {what}: node {node.name} ({_where(node)}) does not "
                            "answer or dropped the connection") from None
    except requests.Timeout:
        raise DicomWebError(f"cannot {what}: node {node.name} ({_where(node)}) did not "
                            "answer in time") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # a malformed multipart part or JSON answer: the server's fault, named as such
        raise DicomWebError(f"node {node.name} ({_where(node)}) sent an answer that cannot "
                            f"be read while trying to {what} ({type(exc).__name__})") from None


def _http_reason(status: int) -> str:
    reasons = {400: "the request was refused as malformed (HTTP 400)",
               401: "the user name or password was refused (HTTP 401)",
               403: "this user may not do that (HTTP 403)",
               404: "no such resource (HTTP 404: wrong URL, or unknown study)",
               409: "the server refused the instances (HTTP 409)",
               415: "the server does not accept this media type (HTTP 415)"}
    return reasons.get(status, f"HTTP {status}" if status else "no HTTP status")


def _where(node: DicomNode) -> str:
    """The node's URL without any user information (never a password in a message)."""
    parts = urlsplit(node.dicomweb_url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _query(node: DicomNode, filters: Mapping[str, str]) -> dict[str, str]:
    query: dict[str, str] = {}
    for key, value in filters.items():
        if value is None or str(value) == "":
            continue
        keyword = FILTERS.get(key, key)
        if not keyword[:1].isupper():
            raise DicomWebError(f"node {node.name}: unknown study filter {key!r} (use "
                                f"{', '.join(FILTERS)} or a DICOM keyword)")
        query[keyword] = str(value)
    return query


def _dataset(node: DicomNode, item: Any) -> Any:
    import pydicom

    try:
        return pydicom.Dataset.from_json(item)
    except Exception as exc:
        raise DicomWebError(f"node {node.name} ({_where(node)}) sent a QIDO answer that is "
                            f"not DICOM JSON ({type(exc).__name__})") from None


def _values(ds: Any, keyword: str) -> list[str]:
    value = ds.get(keyword, None)
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value if str(v)]
    return [str(value)] if str(value) else []


def _text(ds: Any, keyword: str) -> str:
    return "\\".join(_values(ds, keyword))


def _int(ds: Any, keyword: str) -> int:
    try:
        return int(str(ds.get(keyword, 0) or 0))
    except ValueError:
        return 0


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text)[:80]


def _unique(folder: Path, name: str) -> Path:
    path = folder / name
    n = 1
    while path.exists():
        n += 1
        path = folder / f"{Path(name).stem}-{n}.dcm"
    return path


def _dcmwrite(ds: Any, handle: Any) -> None:
    import pydicom

    pydicom.dcmwrite(handle, ds)


def _write_private(path: Path, write: Callable[[Any], None]) -> None:
    """Write to a 0600 temporary file in the same folder, then rename: no reader sees half a
    file, and no other user reads a patient's images."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _store_batch(node: DicomNode, web: Any, batch: list[tuple[str, str, Any]],
                 report: SendReport) -> None:
    """One STOW-RS request; each instance's fate from the answer's Referenced and Failed
    SOP sequences (an instance the server does not mention is reported failed).

    A server may refuse a whole request for one bad instance (Orthanc 1.10 answers 400):
    then each instance of the batch is sent alone, so the good ones still go and the bad
    one is named."""
    try:
        answer = _call(node, "store instances",
                       lambda: web.store_instances([ds for _, _, ds in batch]))
    except DicomWebError as exc:
        if len(batch) > 1 and exc.status in (400, 409, 415, 422):
            for item in batch:
                _store_batch(node, web, [item], report)
            return
        what = f"SOP instance {batch[0][1]}: " if len(batch) == 1 else ""
        report.failed.extend((image_id, what + str(exc)) for image_id, _, _ in batch)
        return
    stored = {str(getattr(item, "ReferencedSOPInstanceUID", ""))
              for item in getattr(answer, "ReferencedSOPSequence", None) or []}
    failed = {str(getattr(item, "ReferencedSOPInstanceUID", "")):
              int(getattr(item, "FailureReason", 0) or 0)
              for item in getattr(answer, "FailedSOPSequence", None) or []}
    for image_id, sop, _ in batch:
        if sop in failed:
            report.failed.append((image_id, f"node {node.name} refused SOP instance {sop} "
                                            f"(failure reason {failed[sop]:#06x})"))
        elif sop in stored:
            report.sent.append(image_id)
        else:
            report.failed.append((image_id, f"node {node.name} did not confirm SOP "
                                            f"instance {sop}"))
