"""Import images into a repository: encrypt on this machine, upload, commit a segment.

Order of writes, per batch: every image's original, preview and metadata objects first,
then the batch's index segment, the commit point. A reader (the search service) only
sees images named by a segment, so a batch that died before its segment is invisible.

Resuming. An image's id is an HMAC of its content under the repository's first data
key: the same file always gets the same id in one repository, and the id says nothing
about the content to anyone without the key. Re-running an import therefore skips every
image some segment already names, does not re-upload objects a crashed run left behind,
and commits the rest: nothing is lost, nothing doubled. (What this reveals to the cloud:
that the same file was imported twice. SECURITY.md says so.)

Cancelling stops between files and still commits the files of the current batch that
were finished, so "Cancel" keeps what is done.

Throughput (bench/ingest.py measures it). Each worker thread reads and hashes a file and
has it decoded, its features extracted and its preview made, in a child process of its
own for larger imports (on threads the GIL, not the cores, was the limit: see _Children),
or on the thread itself; each image's three uploads (encrypted here, the keys never leave
this process) go to a separate pool of threads, since they wait on the network. The
workers run a window of files ahead of the commit, across batch boundaries, so a batch's
last uploads and its segment never leave them idle. What remains is CPU: on a 2-core
machine with the embedded store, the store's server and botocore's per-request work cost
about as much as decoding and features.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from app.core import objects
from app.core.errors import Cancelled, RadcryptError
from app.core.progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from app.core.repository import Repository
from app.imaging.decode import DecodedImage, decode_bytes, decode_image
from app.imaging.errors import ImageDecodeError
from app.imaging.features import get_extractor
from app.imaging.thumbnail import make_thumbnail_png
from cloud import layout
from cloud.segments import DIGEST_SIZE, encode_segment, expected_size, read_header
from cloud.store import ObjectStore, StoreError

DEFAULT_BATCH = 64
UPLOAD_THREADS = 8  # uploads wait on the network, not the CPU: more of them than workers
WINDOW = 32  # files being prepared or uploaded ahead of the commit, at least 4 per worker
PROCESS_MIN_FILES = 48  # fewer files: threads (starting the children costs ~0.5 s)
META_FORMAT = "radcrypt-meta-v1"
_ID_CONTEXT = b"radcrypt/image-id/v1"

log = logging.getLogger(__name__)


@dataclass
class ImportReport:
    """What an import did, file by file."""

    imported: list[tuple[str, str]] = field(default_factory=list)  # (path, image id)
    already_present: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    segments: list[str] = field(default_factory=list)
    cancelled: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "imported": [{"path": p, "image_id": i} for p, i in self.imported],
            "already_present": [{"path": p, "image_id": i} for p, i in self.already_present],
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "segments": self.segments,
            "cancelled": self.cancelled,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class _Prepared:
    path: str
    image_id: str
    features: np.ndarray | None  # None: already committed
    error: str = ""
    uploads: tuple[Future[None], ...] = ()  # this image's objects, in flight


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, and files under folders named (recursive), sorted, hidden ones skipped."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [Path(root) / f for f in sorted(files) if not f.startswith(".")]
        elif path.exists():
            found.append(path)
        else:
            raise RadcryptError(f"no such file or folder: {path}")
    return found


def image_id_for(repo: Repository, content_digest: bytes) -> str:
    """The repository-keyed, content-derived id of an image (stable across key versions)."""
    mac = hmac.new(repo.ring.versions[0].data_key, _ID_CONTEXT + content_digest, hashlib.sha256)
    return mac.hexdigest()[:32]


def committed_ids(store: ObjectStore, repo_id: str) -> set[str]:
    """Ids named by the repository's segments: two small range reads per segment.

    A segment whose header is damaged, or whose size is not the one its header implies
    (truncated, extended), commits nothing, so a re-run imports its images again. Damage
    that keeps the size (flipped bits) is only found by the service's checksum, which
    reports the segment on refresh; reading every segment whole here would cost the whole
    index at every import.
    """
    ids: set[str] = set()
    for key, size in store.list_objects(layout.segments_prefix(repo_id)):
        head = store.get_range(key, 0, 64)
        try:
            _, count, widths = read_header(head, key)
        except ValueError:
            continue  # a damaged segment commits nothing; the service reports it
        if size != expected_size(count, widths):
            continue
        header = expected_size(0, widths) - DIGEST_SIZE
        raw = store.get_range(key, header, 16 * count)
        ids.update(raw[i : i + 16].hex() for i in range(0, len(raw) - 15, 16))
    return ids


class Importer:
    """Imports files into one repository; safe to re-run on the same files."""

    def __init__(self, store: ObjectStore, repo: Repository, *, workers: int = 2,
                 batch_size: int = DEFAULT_BATCH, progress: ProgressCallback = no_progress,
                 cancel: CancelToken | None = None, processes: bool | None = None) -> None:
        """``processes``: decode in child processes (True), on threads (False), or in
        children when there are at least PROCESS_MIN_FILES files (None)."""
        self.store = store
        self.repo = repo
        self.workers = max(1, workers)
        self.batch_size = max(1, batch_size)
        self.progress = progress
        self.cancel = cancel or CancelToken()
        self.extract = get_extractor(repo.manifest.extractor)
        self._committed: set[str] = set()
        self._uploaded: set[str] = set()
        self._claims: dict[str, Future[None]] = {}  # image id -> its uploads, until committed
        self._claims_lock = threading.Lock()
        self.processes = processes
        self._children: _Children | None = None

    def run(self, paths: Iterable[str | Path]) -> ImportReport:
        start = time.perf_counter()
        report = ImportReport()
        files = expand_paths(paths)
        total = len(files)
        self.progress(ProgressEvent("scan", 0, total, message=f"{total} files to import"))
        self._committed = committed_ids(self.store, self.repo.repo_id)
        self._uploaded = objects.existing_image_ids(self.store, self.repo.repo_id, "meta")
        children = None
        if self.uses_processes(total):
            try:
                children = self._children = _Children(self.workers)
            except _NoChildren as exc:
                log.warning("decoding on threads: %s", exc)
        try:
            self._run(files, report)
        finally:
            self._children = None
            if children is not None:
                children.close()
        report.seconds = time.perf_counter() - start
        return report

    def uses_processes(self, files: int) -> bool:
        """Whether an import of this many files decodes in child processes."""
        wanted = files >= PROCESS_MIN_FILES if self.processes is None else self.processes
        return wanted and files > 0

    def _run(self, files: list[Path], report: ImportReport) -> None:
        done, total = 0, len(files)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="radcrypt-import") as pool, \
                ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="radcrypt-upload") as up:
            self._upload_pool = up
            results = self._prepare_in_order(pool, files)
            try:
                for _ in range(0, total, self.batch_size):
                    finished: list[_Prepared] = []
                    try:
                        for prepared in itertools.islice(results, self.batch_size):
                            finished.append(prepared)
                            done += 1
                            self._record(report, prepared, done, total)
                            self.cancel.check()
                    except Cancelled:
                        report.cancelled = True
                    self._commit(finished, report)
                    if report.cancelled:
                        break
            finally:
                results.close()  # a failed commit or a cancel: hand out no more work

    def _window(self) -> int:
        return max(WINDOW, 4 * self.workers)

    def _prepare_in_order(self, pool: ThreadPoolExecutor,
                          files: list[Path]) -> Iterator[_Prepared]:
        """Every file's result, uploads done, in file order.

        The workers run up to a window of files ahead of the caller, across batch
        boundaries: they go on with the next batch while this one's last uploads finish and
        its segment is written, and the window, not the batch, bounds how many prepared
        images wait in memory. No new work is handed out once cancel is pressed, and work
        not yet started is dropped when the caller stops.
        """
        window: collections.deque[Future[_Prepared]] = collections.deque()
        pending = iter(files)
        try:
            for path in itertools.islice(pending, self._window()):
                window.append(pool.submit(self._prepare_checked, path))
            while window:
                future = window.popleft()
                if not self.cancel.cancelled:
                    for path in itertools.islice(pending, 1):
                        window.append(pool.submit(self._prepare_checked, path))
                yield _uploaded(future.result())
        finally:
            for future in window:
                future.cancel()

    def _prepare_checked(self, path: Path) -> _Prepared:
        if self.cancel.cancelled:
            return _Prepared(str(path), "", None, error="cancelled")
        try:
            return self._prepare(path)
        except ImageDecodeError as exc:
            return _Prepared(str(path), "", None, error=str(exc))
        except OSError as exc:
            return _Prepared(str(path), "", None, error=f"cannot read {path}: {exc.strerror}")
        except StoreError as exc:
            return _Prepared(str(path), "", None, error=f"upload of {path.name} failed: {exc}")

    def _prepare(self, path: Path) -> _Prepared:
        """Decode, extract features, encrypt and upload one file's objects."""
        size = path.stat().st_size
        data = path.read_bytes() if size < objects.STREAM_THRESHOLD else None
        digest = hashlib.sha256(data).digest() if data is not None else _file_digest(path)
        image_id = image_id_for(self.repo, digest)
        if image_id in self._committed:
            return _Prepared(str(path), image_id, None)
        # objects a crashed run left behind are kept: then only the features are needed
        preview = image_id not in self._uploaded
        extractor = self.repo.manifest.extractor
        analysis = None
        children = self._children
        if children is not None:
            try:
                analysis = children.analyse(path, digest if data is not None else None,
                                            extractor, preview)
            except _NoChildren as exc:
                if self._children is children:
                    log.warning("decoding on threads: %s", exc)
                    self._children = None
        if analysis is None:
            image = decode_bytes(data, str(path)) if data is not None else decode_image(path)
            analysis = _analyse(image, extractor, preview)
        features = analysis.features
        if not preview:
            return _Prepared(str(path), image_id, features)
        keys, repo_id = self.repo.keys, self.repo.repo_id
        thumb = analysis.thumbnail
        assert thumb is not None
        meta = _metadata(path, size, digest, analysis, extractor)

        def upload() -> None:
            # The meta object goes last: its presence tells a resumed import that the
            # original and the preview are stored too.
            if data is not None:
                objects.put_encrypted(self.store, keys, repo_id, "objects", image_id, data)
            else:
                objects.put_encrypted_file(self.store, keys, repo_id, image_id, path)
            objects.put_encrypted(self.store, keys, repo_id, "thumbs", image_id, thumb)
            objects.put_encrypted(self.store, keys, repo_id, "meta", image_id, meta)

        with self._claims_lock:
            # The same content under another name, still in flight in this run (the window
            # spans batches): upload it once, and let both wait for that upload.
            if image_id in self._committed:
                return _Prepared(str(path), image_id, None)
            uploading = self._claims.get(image_id)
            if uploading is None:
                uploading = self._claims[image_id] = self._upload_pool.submit(upload)
        return _Prepared(str(path), image_id, features, uploads=(uploading,))

    def _record(self, report: ImportReport, prepared: _Prepared, done: int, total: int) -> None:
        if prepared.error:
            if prepared.error != "cancelled":
                report.failed.append((prepared.path, prepared.error))
            status = "failed"
        elif prepared.features is None:
            report.already_present.append((prepared.path, prepared.image_id))
            status = "already present"
        else:
            status = "encrypted"
        self.progress(ProgressEvent("import", done, total, prepared.path, status,
                                    prepared.error))

    def _commit(self, finished: list[_Prepared], report: ImportReport) -> None:
        """Write the segment for this batch's new images: the commit point."""
        new: dict[str, _Prepared] = {}
        twins: list[tuple[str, str]] = []  # the same content twice in this run: stored once
        for p in finished:
            if p.features is not None:
                if p.image_id in new or p.image_id in self._committed:
                    twins.append((p.path, p.image_id))
                else:
                    new[p.image_id] = p
        if not new:
            self._release(finished)
            report.already_present += twins
            return
        ids = list(new)
        vectors = self.repo.keys.index_key.encrypt(np.stack([new[i].features for i in ids]))
        segment = encode_segment(ids, vectors, self.repo.keys.version)
        seg_id = layout.new_id()
        self.store.put(layout.segment_key(self.repo.repo_id, seg_id), segment, if_absent=True)
        self._committed.update(ids)
        self._release(finished)
        report.segments.append(seg_id)
        report.imported += [(new[i].path, i) for i in ids]
        report.already_present += twins
        self.progress(ProgressEvent("commit", len(report.imported), len(report.imported),
                                    message=f"segment {seg_id[:8]} committed ({len(ids)} images)"))

    def _release(self, finished: list[_Prepared]) -> None:
        """Forget the uploads of a batch's images: committed ones are now found in
        _committed, and a later copy of a failed one may try its upload again."""
        with self._claims_lock:
            for p in finished:
                self._claims.pop(p.image_id, None)


def _uploaded(prepared: _Prepared) -> _Prepared:
    """Wait for an image's uploads; a failed upload makes the image a failure."""
    try:
        for upload in prepared.uploads:
            upload.result()
    except StoreError as exc:
        name = Path(prepared.path).name
        return _Prepared(prepared.path, prepared.image_id, None,
                         error=f"upload of {name} failed: {exc}")
    return prepared


def _metadata(path: Path, size: int, digest: bytes, analysis: _Analysis,
              extractor: str) -> bytes:
    """The encrypted metadata object: what the client needs to name and verify a result."""
    record = {
        "format": META_FORMAT,
        "name": path.name,
        "size": size,
        "sha256": digest.hex(),
        "source_format": analysis.source_format,
        "tags": analysis.tags,
        "rows": analysis.rows,
        "columns": analysis.columns,
        "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "extractor": extractor,
        "features": [float(x) for x in analysis.features],
    }
    return json.dumps(record, separators=(",", ":")).encode()


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()


# --- decoding, features and previews, in this process or in child processes ---------------


@dataclass(frozen=True)
class _Analysis:
    """What the encrypting side needs of a decoded image (small: it crosses processes)."""

    features: np.ndarray
    thumbnail: bytes | None  # the preview PNG, when asked for
    source_format: str
    tags: dict[str, Any]
    rows: int
    columns: int


def _analyse(image: DecodedImage, extractor: str, preview: bool) -> _Analysis:
    features = np.asarray(get_extractor(extractor)(image), dtype=np.float64)
    return _Analysis(features, make_thumbnail_png(image) if preview else None,
                     image.source_format, image.metadata, int(image.pixels.shape[0]),
                     int(image.pixels.shape[1]))


# A child's program. It imports only the imaging package (not this module, which pulls in
# boto3 and the crypto: a third of a second per child), reads the file the parent hashed,
# checks that it is the same content, and answers with what _analyse returns, as a tuple.
# It ends when its stdin ends: at _Child.close(), or when the parent dies, however it dies.
_CHILD_PROGRAM = """
import sys
sys.path[:] = [ROOT] + [p for p in sys.path if p]  # not the working folder: -c puts it first
import hashlib, logging, os, pickle, signal, warnings
from pathlib import Path
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
requests = sys.stdin.buffer
answers = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)  # a stray print must not corrupt the answers
pydicom_level, warning_filters = pickle.load(requests)
for raw in reversed(warning_filters):  # quiet the way the parent is quiet
    try:
        warnings.filters.insert(0, pickle.loads(raw))
    except Exception:  # a warning category this process cannot import
        pass
import numpy as np
import pydicom  # its import sets its logger's level: set the parent's afterwards
from app.imaging.decode import decode_bytes, decode_image
from app.imaging.errors import ImageDecodeError
from app.imaging.features import get_extractor
from app.imaging.thumbnail import make_thumbnail_png
if pydicom_level is not None:
    logging.getLogger(pydicom.__name__).setLevel(pydicom_level)

def analyse(path, digest, extractor, preview):
    if digest is None:  # a large file: decoded from disk, as in the parent
        image = decode_image(Path(path))
    else:
        data = Path(path).read_bytes()
        if hashlib.sha256(data).digest() != digest:
            raise ImageDecodeError(path, "the file changed while it was being imported")
        image = decode_bytes(data, path)
    features = np.asarray(get_extractor(extractor)(image), dtype=np.float64)
    return (features, make_thumbnail_png(image) if preview else None, image.source_format,
            image.metadata, int(image.pixels.shape[0]), int(image.pixels.shape[1]))

try:
    answers.write(pickle.dumps(("ready", None)))
    answers.flush()
except OSError:  # the parent is gone already
    sys.exit(0)
while True:
    try:
        request = pickle.load(requests)
    except (EOFError, OSError):
        break
    try:
        answer = ("ok", analyse(*request))
    except Exception as exc:  # the parent decides what is the file's fault
        answer = ("error", exc)
    try:
        blob = pickle.dumps(answer)
    except Exception:
        blob = pickle.dumps(("error", RuntimeError(str(answer[1]))))
    try:
        answers.write(blob)
        answers.flush()
    except OSError:
        break
"""


def _child_command() -> list[str]:
    """How a child starts: this interpreter, with the project where the parent found it on
    its path (never the parent's __main__, so scripts need no main guard)."""
    root = str(Path(__file__).resolve().parents[2])
    return [sys.executable, "-c", f"ROOT = {root!r}\n" + _CHILD_PROGRAM]


class _ChildDied(Exception):
    """A child died while working on a file."""


class _NoChildren(Exception):
    """Children cannot start here (no interpreter to run, or they die while starting)."""


class _Child:
    """One child process, used by one worker thread at a time."""

    def __init__(self, setup: bytes) -> None:
        if not sys.executable:
            raise _NoChildren("no Python interpreter to start")
        try:
            self.process = subprocess.Popen(_child_command(), stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, close_fds=True)
        except OSError as exc:
            raise _NoChildren(str(exc)) from exc
        assert self.process.stdin is not None and self.process.stdout is not None
        self._requests, self._answers = self.process.stdin, self.process.stdout
        self._ready = False
        with contextlib.suppress(OSError):
            self._requests.write(setup)
            self._requests.flush()

    def call(self, *request: object) -> _Analysis:
        if not self._ready:  # the child says so once its imports are done
            try:
                kind, _ = pickle.load(self._answers)
            except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
                raise _NoChildren("a child process died while starting") from exc
            self._ready = kind == "ready"
        try:
            pickle.dump(request, self._requests)
            self._requests.flush()
            kind, value = pickle.load(self._answers)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
            raise _ChildDied() from exc
        if kind == "ok":
            return _Analysis(*value)
        raise value

    def close(self, timeout: float = 5.0) -> None:
        """End of input: the child exits (closing its answers first means it can never
        block writing one)."""
        for stream in (self._requests, self._answers):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _Children:
    """A child process per worker for the CPU-heavy part of an import.

    A worker *thread* decoding, extracting features and making a preview holds the GIL in
    many short slices (pydicom's parsing, numpy's small operations; a JPEG 2000 decode
    holds it for up to a second), and the upload threads then wait for it at every socket
    and cipher call: the process stays well below the machine's cores while its threads
    hand the GIL to each other thousands of times per image. So decoding, features and
    the preview run in children: the parent keeps the keys, hashes, encrypts and uploads;
    a child gets a path and the digest of the content the parent read and returns the
    features and the preview. Children start at once (about half a second, while the
    parent hashes) and end when their stdin closes: at close(), or when the parent dies.
    """

    def __init__(self, workers: int) -> None:
        level = logging.getLogger("pydicom").level if "pydicom" in sys.modules else None
        filters = []
        for item in warnings.filters:
            with contextlib.suppress(Exception):
                filters.append(pickle.dumps(item))
        self._setup = pickle.dumps((level, filters))
        self._lock = threading.Lock()
        self._idle: list[_Child] = []
        self._closed = False
        try:
            for _ in range(workers):
                self._idle.append(_Child(self._setup))
        except _NoChildren:
            for child in self._idle:
                child.close()
            raise
        self._all = list(self._idle)

    def _take(self) -> _Child:
        with self._lock:
            if self._closed:
                raise Cancelled("the import is ending")
            if self._idle:
                return self._idle.pop()
            child = _Child(self._setup)
            self._all.append(child)
            return child

    def _give_back(self, child: _Child) -> None:
        with self._lock:
            self._idle.append(child)

    def analyse(self, path: Path, digest: bytes | None, extractor: str,
                preview: bool) -> _Analysis:
        """Decode, features and preview of one file in a child. A child that dies (a
        decoder crash, the out-of-memory killer) is replaced and the file tried once more;
        if that child dies too the file is reported as unreadable."""
        for attempt in range(2):
            child = self._take()
            try:
                result = child.call(str(path), digest, extractor, preview)
            except _NoChildren:
                child.close(timeout=1.0)
                raise
            except _ChildDied:
                child.close(timeout=1.0)
                if attempt:
                    raise ImageDecodeError(
                        str(path), "the decoder's process died while reading it") from None
                continue
            except BaseException:
                self._give_back(child)
                raise
            self._give_back(child)
            return result
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            children, self._all, self._idle = self._all, [], []
        for child in children:
            child.close()
