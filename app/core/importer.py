"""Import images into a repository: encrypt on this machine, upload, commit a segment.

Order of writes, per batch: every image's original, preview and metadata objects first,
then the batch's index segment, the commit point. A reader (the search service) only
sees images named by a segment, so a batch that died before its segment is invisible.

Resuming. An image's id is an HMAC of its content under an id key of the current key
version (image_id_for): the same file always gets the same id within one key version of a
repository, and the id says nothing about the content to anyone outside the current
membership (a revoked user's old keys cannot compute the id of a later import). Re-running
an import therefore skips every image some segment already names, does not re-upload
objects a crashed run left behind, and commits the rest: nothing is lost, nothing doubled,
as long as no revocation (a new key version) came in between; after one, a file imported
before gets a new id and is stored again. (What this reveals to the cloud: that the same
file was imported twice within a key version. SECURITY.md says so.)

Key versions. Before every batch's commit the importer re-reads the signed manifest
(repository.check_still_current) and stops with an error, writing nothing more, if the
repository has moved to another key version since it was opened (a revocation): an
importer opened before a revocation never commits under the superseded version.

Cancelling stops between files and still commits the files of the current batch that
were finished, so "Cancel" keeps what is done.

Format 1 is read-only (docs/FORMAT-2.md 9.1): an import into a format-1 repository
refuses before any write (IntegrityError: run radcrypt repo migrate --format 2). The
format-1 writing below is kept only for ``FORMAT1_WRITER`` subclasses in the tests, which
play a format-1 client of the past (migration and its race with an old client).

Storage format 2 (docs/FORMAT-2.md sections 3.5 and 5.3). Originals are uploaded as
above; a batch's metadata, previews and features stay in memory and become ONE pack, the
batch's index ONE authenticated segment (writer, base sequence, MAC), and the batch is
committed by appending an ``add`` entry to the segment log, signed by the importing user
(``writer``). Before each commit the log is verified again up to its head (a concurrent
importer's entries included), the manifest re-read, and the entry created-if-absent at the
next sequence; another writer winning that sequence makes seglog.append verify the new
entries and retry, so two importers never lose a batch. Resuming: the ids of the live
packs are committed; an original already stored is not uploaded again; a pack or segment
of a batch that died before its log entry is unreferenced garbage (compaction removes it).
Per imported image: 1 object (the original) plus 3 per batch (pack, segment, log entry).

Multi-frame instances (issue 15, DESIGN.md section 9). Every frame of a multi-frame DICOM
file, up to MAX_FRAMES, is an image of its own: its features, preview and metadata entry
(``frame``, ``frames``, ``original``), searchable on its own; the file is stored once, as
frame 0's original, whose id is the file's image id (a single-frame file keeps its id and
its bytes, plus the ``clinical`` attributes every DICOM file's metadata now carries). A
later frame's id is frame_image_id (the file's digest and the frame number, under the id
key). Frame 0 is committed after the file's other frames, so its id in a live pack means
the whole file is committed: the resume check above stays one set lookup per file, and a
run that died between two packs of one file commits the missing frames the next time.
ImportReport.imported names each file once; ``frames`` lists the other frames, and
``frames_not_indexed`` the frames over the cap or after a frame that failed to decode.

Faults (tests/test_fault_import.py, tests/test_kill_import.py). The store retries each
request (botocore: 8 attempts with backoff); what still fails is handled by the commit
order above. An upload that fails after its retries makes its file a failure of this run
(reported; a re-run imports it), and the batch commits without it. A pack or segment is
created-if-absent under a fresh random id, so ObjectExists can only mean that an earlier
attempt of this very request landed and its answer was lost: the stored bytes are
compared and the write counts as done when they are ours (_put_new). Any other failure
at a commit stops the import with the error; the next run resumes. For the kill tests,
RADCRYPT_TEST_KILL_AT=<step>:<n> makes the process SIGKILL itself at the n-th time it
passes a named step (_KillSwitch; read only when a test sets the variable).

A full or read-only disk (tests/test_disk_full.py). The workstation's data directory holds
the log head the import remembers after each commit (rollback protection): it is probed
with a small write before anything is uploaded, and an import that cannot write there
stops at once, naming the directory. A store that answers "no space", "file too large",
"quota" or "read-only" (the directory store's errno codes) stops the import at the first
such error rather than failing the remaining files one by one; either way what was
committed stays, nothing is half-written (stores and the data directory write to a
temporary name and rename), and the next run resumes.

Untrusted files are decoded in memory-limited child processes (app/imaging/worker.py:
RLIMIT_AS, no pickle), never in this process, which holds the keys: a decompression bomb or
a decoder exploit costs one child, and the file is reported as unreadable.

Throughput (bench/ingest.py measures it). Each worker thread reads and hashes a file and
has it decoded, its features extracted and its preview made, in a decoder child of its
own (on threads the GIL, not the cores, was the limit: see _decoder_pool); each image's
three uploads (encrypted here, the keys never leave
this process) go to a separate pool of threads, since they wait on the network. The
workers run a window of files ahead of the commit, across batch boundaries, so a batch's
last uploads and its segment never leave them idle. What remains is CPU: on a 2-core
machine with the embedded store, the store's server and botocore's per-request work cost
about as much as decoding and features.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import itertools
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from app.core import basis, ckks_blocks, keyword_dicts, logstate, objects
from app.core.deid import NEUTRAL_NAME, Blackout, DeidentificationRefused, deidentify
from app.core.errors import Cancelled, IntegrityError, RadcryptError
from app.core.packs import ImageReader, committed_ids
from app.core.progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from app.core.repository import (
    Repository,
    check_still_current,
    format1_read_only,
    is_format2,
)
from app.core.settings import Settings
from app.imaging.decode import decode_bytes, decode_image
from app.imaging.errors import ImageDecodeError
from app.imaging.features import get_extractor
from app.imaging.worker import (
    Analysis,
    DecoderPool,
    DecoderUnavailable,
    FrameAnalyses,
    analyse,
    analyse_frames,
)
from cloud import layout, seglog
from cloud.backend import ObjectExists, Store, StoreError, stored_after_conflict
from cloud.segments import encode_segment, encode_segment_v2
from crypto import pack
from crypto.errors import FormatError
from crypto.identity import Identity
from crypto.segment_mac import index_mac_key
from crypto.tokens import EncryptedVectors

DEFAULT_BATCH = 64
UPLOAD_THREADS = 8  # uploads wait on the network, not the CPU: more of them than workers
WINDOW = 32  # files being prepared or uploaded ahead of the commit, at least 4 per worker
META_FORMAT = "radcrypt-meta-v1"
META_FORMAT_V2 = "radcrypt-meta-v2"  # in a pack, without features (FORMAT-2 3.4)
# size estimate of a pack (_pack_groups): header, trailer, TOC head and feature array head,
# and per entry an envelope (header, a tag per 64 KiB chunk) and a TOC row
PACK_OVERHEAD = 4096
ENTRY_OVERHEAD = 256
_ID_CONTEXT = b"radcrypt/image-id/v1"
_FRAME_ID_CONTEXT = b"radcrypt/frame-id/v1"
MAX_FRAMES = 512
"""Frames of one multi-frame instance that are indexed, each a searchable image with its
own features, preview and metadata entry. A cine loop or enhanced CT/MR object has tens
to a few hundred frames; a file with thousands (a long fluoroscopy run) would otherwise
take minutes of decoding and a pack of its own per import. The frames beyond the cap are
not indexed, and the ImportReport says so for the file (``frames_not_indexed``); the
original, stored whole, still holds them for the viewer."""
_ID_KEY_INFO = b"radcrypt/image-id-key/v1"

log = logging.getLogger(__name__)

# store error codes that no retry or other file fixes: the import stops at the first
STORE_FULL = frozenset({"ENOSPC", "EDQUOT", "EFBIG", "EROFS"})
PROBE_BYTES = 4096  # written and removed in the data directory before an import starts

KILL_ENV = "RADCRYPT_TEST_KILL_AT"
# the places a kill test may stop the import at (see _KillSwitch)
KILL_STEPS = ("file", "original", "stored", "entry")


class _KillSwitch:
    """Test hook: SIGKILL this process the n-th time it passes ``step``.

    ``RADCRYPT_TEST_KILL_AT=<step>:<n>``, steps: "file" (a file was read and analysed,
    before its upload), "original" (an original was stored), "stored" (a batch's pack
    and segment were stored, before its log entry), "entry" (a batch's log entry was
    appended). Read once per import, only when the variable is set; a malformed value
    is an error, so a test cannot silently run without its kill.
    """

    def __init__(self, spec: str) -> None:
        step, _, count = spec.partition(":")
        if step not in KILL_STEPS or not count.isdigit() or int(count) < 1:
            raise RadcryptError(f"{KILL_ENV}={spec!r}: expected <step>:<n>, step one of "
                                f"{', '.join(KILL_STEPS)}, n >= 1")
        self.step, self.at = step, int(count)
        self.seen = 0
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> _KillSwitch | None:
        spec = os.environ.get(KILL_ENV)
        return cls(spec) if spec else None

    def passed(self, step: str) -> None:
        if step != self.step:
            return
        with self._lock:
            self.seen += 1
            if self.seen == self.at:
                os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class ImportReport:
    """What an import did, file by file."""

    imported: list[tuple[str, str]] = field(default_factory=list)  # (path, image id)
    already_present: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    # files found in a folder that are not images (a CD's DICOMDIR, viewer program, autorun):
    # left alone and listed, not failures (scan_paths)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    segments: list[str] = field(default_factory=list)
    packs: list[str] = field(default_factory=list)  # format 2: one per committed batch
    # Multi-frame instances: ``imported`` names each file once (its frame 0's image id);
    # the other frames indexed are here, and the frames a file could not have indexed
    # (over MAX_FRAMES, or a frame that failed to decode) are said here, file by file.
    frames: list[tuple[str, int, str]] = field(default_factory=list)  # (path, frame, id)
    frames_not_indexed: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    cancelled: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "imported": [{"path": p, "image_id": i} for p, i in self.imported],
            "already_present": [{"path": p, "image_id": i} for p, i in self.already_present],
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "segments": self.segments,
            **({"packs": self.packs} if self.packs else {}),
            **({"frames": [{"path": p, "frame": f, "image_id": i}
                           for p, f, i in self.frames]} if self.frames else {}),
            **({"frames_not_indexed": [{"path": p, "reason": r}
                                       for p, r in self.frames_not_indexed]}
               if self.frames_not_indexed else {}),
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
    meta: bytes = b""  # format 2: the metadata and preview go into the batch's pack
    thumb: bytes = b""
    frame: int = 0  # the frame of a multi-frame instance this image is
    # frame 0 of a multi-frame instance carries its other frames still to be committed
    # (committed before it: see _commit) and what could not be indexed of the file
    extra: tuple[_Prepared, ...] = ()
    not_indexed: str = ""


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """The files an import reads: files named, and the image files under folders named
    (recursive, sorted, hidden ones skipped); what scan_paths skips is left out."""
    return scan_paths(paths)[0]


def scan_paths(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to import, and (path, reason) of the files under the folders named that are
    skipped because they are not images: a CD export also holds its DICOMDIR index, a
    viewer program, autorun.inf, HTML pages. Counting those as failed imports would bury
    the real failures, so they are listed apart. A file named on its own is always tried
    (the user asked for it), except a DICOMDIR; a file with an image's extension (.dcm,
    .png...) is tried too, so a corrupt image still fails loudly. RadcryptError for a
    missing path."""
    found: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    file = Path(root) / name
                    reason = skip_reason(file, named=False)
                    if reason:
                        skipped.append((str(file), reason))
                    else:
                        found.append(file)
        elif path.exists():
            reason = skip_reason(path, named=True)
            if reason:
                skipped.append((str(path), reason))
            else:
                found.append(path)
        else:
            raise RadcryptError(f"no such file or folder: {path}")
    return found, skipped


IMAGE_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima", ".img", ".png", ".jpg", ".jpeg",
                            ".jpe", ".tif", ".tiff"})
"""Extensions of files that are tried even when their content is not recognised."""

_SNIFF_BYTES = 4096
_MEDIA_STORAGE_DIRECTORY = b"1.2.840.10008.1.3.10"  # the DICOMDIR's SOP Class UID


def skip_reason(path: Path, *, named: bool) -> str:
    """Why ``path`` is not imported, or "" to import it. Reads the first 4 KiB only: the
    format is judged from the content (app/imaging/decode.py sniff_format), the name
    only saves files with an image's extension from being skipped."""
    from app.imaging.decode import sniff_format, unknown_content_reason

    try:
        with path.open("rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError:
        return ""  # the decoder reports the unreadable file as a failure, naming it
    if path.name.upper() == "DICOMDIR" or _is_dicomdir(head):
        return "a DICOMDIR (the index of a DICOM CD or folder), not an image"
    if named or not head or path.suffix.lower() in IMAGE_SUFFIXES:
        return ""
    if sniff_format(head) is not None:
        return ""
    return unknown_content_reason(head)


def _is_dicomdir(head: bytes) -> bool:
    """A DICOM file whose meta header's Media Storage SOP Class UID (0002,0002) is the
    Media Storage Directory (the meta header is always explicit VR little endian)."""
    if head[128:132] != b"DICM":
        return False
    at = head.find(b"\x02\x00\x02\x00UI", 132)
    if at < 0:
        return False
    length = int.from_bytes(head[at + 6:at + 8], "little")
    return head[at + 8:at + 8 + length].rstrip(b"\x00 ") == _MEDIA_STORAGE_DIRECTORY


def image_id_for(repo: Repository, content_digest: bytes) -> str:
    """The content-derived id of an image under the repository's current key version.

    HMAC-SHA256 under the version's id key, itself HKDF-SHA256 of the version's data key
    with its own info string (docs/FORMAT.md section 3): stable within a key version, so
    a re-run import skips what is committed, and new after each rotation, so nobody
    outside the current membership can compute the id of a file imported later.
    """
    mac = hmac.new(_id_key(repo.keys.data_key), _ID_CONTEXT + content_digest, hashlib.sha256)
    return mac.hexdigest()[:32]


def frame_image_id(repo: Repository, content_digest: bytes, frame: int) -> str:
    """The image id of frame ``frame`` of a multi-frame file: frame 0 is the file's own
    ``image_id_for``, so a single-frame file keeps its id; a later frame's id is an HMAC
    of the content digest and the frame number (4 bytes, big endian) under the same id
    key with its own context, as stable and as opaque as the file's."""
    if frame == 0:
        return image_id_for(repo, content_digest)
    if not 0 < frame < 1 << 32:
        raise ValueError(f"frame must be between 0 and 2**32 - 1, not {frame}")
    mac = hmac.new(_id_key(repo.keys.data_key),
                   _FRAME_ID_CONTEXT + content_digest + frame.to_bytes(4, "big"),
                   hashlib.sha256)
    return mac.hexdigest()[:32]


def _id_key(data_key: bytes) -> bytes:
    """HKDF-SHA256(data key, no salt, info "radcrypt/image-id-key/v1", 32 bytes), RFC 5869
    with the standard library's HMAC (no salt: 32 zero bytes; one output block T(1)),
    the bytes pycryptodome's HKDF gave, in 3 us instead of 50 per image."""
    prk = hmac.digest(bytes(32), data_key, "sha256")
    return hmac.digest(prk, _ID_KEY_INFO + b"\x01", "sha256")


class Importer:
    """Imports files into one repository; safe to re-run on the same files."""

    # True only in test subclasses playing a format-1 client of the past (module docstring)
    FORMAT1_WRITER = False

    def __init__(self, store: Store, repo: Repository, *, workers: int = 2,
                 batch_size: int = DEFAULT_BATCH, progress: ProgressCallback = no_progress,
                 cancel: CancelToken | None = None, processes: bool = True,
                 memory_limit: int | None = None, writer: Identity | None = None,
                 settings: Settings | None = None, blackouts: Sequence[Blackout] = ()
                 ) -> None:
        """``processes``: decode in memory-limited child processes (the default, and the
        only choice for files from elsewhere); False decodes on this process's threads, for
        trusted files only (the benchmark's comparison). ``memory_limit``: bytes per decoder
        child (None: RADCRYPT_DECODER_MEMORY or 2 GiB). ``writer``: the importing user's
        identity, which signs the log entries of a format-2 repository (required there).
        ``settings``: the workstation's, for the log's rollback memory (log-heads.json);
        None verifies the log without it. ``blackouts``: a research repository's regions
        painted over every image before it is de-identified (app/core/deid.py)."""
        self.store = store
        self.repo = repo
        self.workers = max(1, workers)
        self.batch_size = max(1, batch_size)
        self.progress = progress
        self.cancel = cancel or CancelToken()
        self.extract = get_extractor(repo.manifest.extractor)
        self._committed: set[str] = set()
        self._ckks_ready: set[int] = set()  # key versions whose CKKS evaluation keys exist
        self._uploaded: set[str] = set()
        self._claims: dict[str, Future[None]] = {}  # image id -> its uploads, until committed
        self._claims_lock = threading.Lock()
        self.processes = processes is not False
        self.memory_limit = memory_limit
        self._children: DecoderPool | None = None
        self.writer = writer
        self.settings = settings
        self.format2 = is_format2(repo.manifest)
        self._log: seglog.LogState | None = None
        self._kill = _KillSwitch.from_env()
        # Issue 16: a research repository stores a de-identified copy, never the original
        self.research = repo.manifest.policy == "research"
        self.blackouts = tuple(blackouts)
        self._pseudonym_key = repo.pseudonym_key if self.research else b""

    def run(self, paths: Iterable[str | Path]) -> ImportReport:
        start = time.perf_counter()
        if not self.format2 and not self.FORMAT1_WRITER:
            raise IntegrityError(format1_read_only(self.repo.repo_id))
        report = ImportReport()
        files, report.skipped = scan_paths(paths)
        total = len(files)
        self.progress(ProgressEvent("scan", 0, total, message=f"{total} files to import"))
        children = None
        if self.uses_processes(total):
            try:  # started first: they load their decoders while the log is verified
                children = self._children = _decoder_pool(self.workers, self.memory_limit)
            except DecoderUnavailable as exc:
                self._children = None
                raise RadcryptError(f"cannot decode images here: {exc}; nothing was imported"
                                    ) from exc
        try:
            if self.format2 and self.settings is not None and total:
                _probe_writable(self.settings.data_path)
            check_still_current(self.store, self.repo)  # and again before every commit
            if self.format2:
                self._start_format2()
            else:
                self._committed = committed_ids(self.store, self.repo.repo_id)
                self._uploaded = objects.existing_image_ids(self.store, self.repo.repo_id,
                                                            "meta")
            if children is not None:
                try:
                    children.wait_ready()  # a first request would wait as long
                except DecoderUnavailable as exc:
                    raise RadcryptError(f"cannot decode images here: {exc}; nothing was "
                                        "imported") from exc
            self._run(files, report)
        finally:
            self._children = None
            if children is not None:
                children.close()
        report.seconds = time.perf_counter() - start
        return report

    def _start_format2(self) -> None:
        """Verify the log; the live packs' images are committed, stored originals kept."""
        writer, manifest = self.writer, self.repo.manifest
        if writer is None:
            raise RadcryptError(f"repository {self.repo.repo_id!r} is in storage format 2: "
                                "importing needs the importing user's identity (writer), "
                                "which signs the segment log; nothing was imported")
        if manifest.member_version(writer.user_id) is None:
            raise RadcryptError(f"user {writer.user_id!r} is not a member of repository "
                                f"{self.repo.repo_id!r}: nothing was imported")
        self._log = logstate.verified_log(self.store, self.settings, self.repo)
        self._committed = ImageReader(self.store, self.repo, self._log).image_ids()
        self._uploaded = objects.existing_image_ids(self.store, self.repo.repo_id, "objects")

    def uses_processes(self, files: int) -> bool:
        """Whether an import of this many files decodes in child processes."""
        return self.processes and files > 0

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
                    try:
                        self._commit(finished, report)
                    except StoreError as exc:  # the basis, the pack or the segment
                        if exc.code in STORE_FULL:
                            raise _stopped(exc) from None
                        raise
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
        except (ImageDecodeError, DeidentificationRefused) as exc:
            return _Prepared(str(path), "", None, error=str(exc))
        except DecoderUnavailable as exc:  # a replacement child could not start
            return _Prepared(str(path), "", None, error=f"cannot read {path}: {exc}")
        except OSError as exc:
            return _Prepared(str(path), "", None, error=f"cannot read {path}: {exc.strerror}")
        except StoreError as exc:
            if exc.code in STORE_FULL:
                raise _stopped(exc) from None
            return _Prepared(str(path), "", None, error=f"upload of {path.name} failed: {exc}")

    def _prepare(self, path: Path) -> _Prepared:
        """Decode, extract features, encrypt and upload one file's objects."""
        if self.research:
            return self._prepare_research(path)
        size = path.stat().st_size
        data = path.read_bytes() if size < objects.STREAM_THRESHOLD else None
        return self._prepare_content(path, path, path.name, size, data)

    def _prepare_research(self, path: Path) -> _Prepared:
        """A research repository: the de-identified copy (app/core/deid.py) is what is
        hashed, decoded, described and uploaded; the original's bytes and its file name
        never leave this function. The copy is deterministic, so its image id is too
        (a re-run import finds it committed). The decoder child reads it from a private
        temporary file, removed before this returns (the upload uses the bytes)."""
        size = path.stat().st_size
        if size >= objects.STREAM_THRESHOLD:
            raise DeidentificationRefused(
                f"{path.name}: {size >> 20} MiB is over the "
                f"{objects.STREAM_THRESHOLD >> 20} MiB a research import de-identifies")
        copy = deidentify(path.read_bytes(), self._pseudonym_key, self.blackouts,
                          where=path.name)
        handle, name = tempfile.mkstemp(prefix=".radcrypt-deid-", suffix=".dcm")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(copy)
            return self._prepare_content(path, Path(name), NEUTRAL_NAME, len(copy), copy)
        finally:
            os.unlink(name)

    def _prepare_content(self, path: Path, source: Path, label: str, size: int,
                         data: bytes | None) -> _Prepared:
        """``path``: the file named in the report; ``source``: the file the decoder
        reads and a streamed upload sends; ``label``: the metadata's "name"."""
        digest = hashlib.sha256(data).digest() if data is not None else _file_digest(source)
        image_id = image_id_for(self.repo, digest)
        if image_id in self._committed:
            return _Prepared(str(path), image_id, None)
        # objects a crashed run left behind are kept: then only the features are needed
        # (format 2: the preview and metadata go into the pack, so they are always made)
        stored = image_id in self._uploaded
        preview = self.format2 or not stored
        extractor = self.repo.manifest.extractor
        if self.format2:
            return self._prepare_frames(path, source, label, size, data, digest, image_id,
                                        stored)
        children = self._children
        if children is not None:
            analysis = children.analyse(source, extractor=extractor, preview=preview,
                                        digest=digest if data is not None else None,
                                        name=str(path))
        elif self.processes:
            raise Cancelled("the import is ending")  # its decoder pool is closed
        else:  # trusted files only: see __init__
            image = decode_bytes(data, str(path)) if data is not None else decode_image(source)
            analysis = analyse(image, extractor, preview)
        features = analysis.features
        self._passed("file")
        if not preview:
            return _Prepared(str(path), image_id, features)
        thumb = analysis.thumbnail
        assert thumb is not None
        meta = _metadata(label, size, digest, analysis, extractor, self.format2)
        return self._upload(path, source, data, image_id, features, meta, thumb)

    def _prepare_frames(self, path: Path, source: Path, label: str, size: int,
                        data: bytes | None, digest: bytes, image_id: str, stored: bool
                        ) -> _Prepared:
        """Format 2: every frame of the file (up to MAX_FRAMES) becomes an image with its
        own features, preview and metadata entry; the original is stored once, under
        frame 0's id, which the other frames' metadata names (``original``). Frames a
        resumed import finds committed already are not committed again."""
        extractor = self.repo.manifest.extractor
        children = self._children
        if children is not None:
            result = children.analyse_frames(source, extractor=extractor, preview=True,
                                             max_frames=MAX_FRAMES,
                                             digest=digest if data is not None else None,
                                             name=str(path))
        elif self.processes:
            raise Cancelled("the import is ending")  # its decoder pool is closed
        else:  # trusted files only: see __init__
            content = data if data is not None else source.read_bytes()
            result = analyse_frames(content, str(path), extractor, True, MAX_FRAMES)
        self._passed("file")
        multi = result.total > 1
        extra: list[_Prepared] = []
        for index, analysis in enumerate(result.frames[1:], 1):
            frame_id = frame_image_id(self.repo, digest, index)
            if frame_id in self._committed:
                continue
            assert analysis.thumbnail is not None
            extra.append(_Prepared(str(path), frame_id, analysis.features, frame=index,
                                   meta=_metadata(label, size, digest, analysis, extractor,
                                                  True, (index, result.total, image_id)),
                                   thumb=analysis.thumbnail))
        first = result.frames[0]
        assert first.thumbnail is not None
        meta = _metadata(label, size, digest, first, extractor, True,
                         (0, result.total, image_id) if multi else None)
        prepared = self._upload(path, source, data, image_id, first.features, meta,
                                first.thumbnail, stored)
        return _Prepared(prepared.path, prepared.image_id, prepared.features,
                         uploads=prepared.uploads, meta=meta, thumb=first.thumbnail,
                         extra=tuple(extra) if prepared.features is not None else (),
                         not_indexed=_not_indexed(result))

    def _upload(self, path: Path, source: Path, data: bytes | None, image_id: str,
                features: np.ndarray, meta: bytes, thumb: bytes, stored: bool = False
                ) -> _Prepared:
        """Start the upload of an image's original (format 1: and its preview and
        metadata objects), once per image id in flight."""
        keys, repo_id = self.repo.keys, self.repo.repo_id
        if self.format2 and stored:  # a resumed import: the original is there already
            return _Prepared(str(path), image_id, features, meta=meta, thumb=thumb)

        def upload() -> None:
            # The meta object goes last: its presence tells a resumed import that the
            # original and the preview are stored too. Format 2: only the original.
            if data is not None:
                objects.put_encrypted(self.store, keys, repo_id, "objects", image_id, data)
            else:
                objects.put_encrypted_file(self.store, keys, repo_id, image_id, source)
            self._passed("original")
            if self.format2:
                return
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
        if self.format2:
            return _Prepared(str(path), image_id, features, uploads=(uploading,), meta=meta,
                             thumb=thumb)
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
                    continue
                # A multi-frame file's other frames go before its frame 0, so that frame 0
                # (the id a re-import checks) is committed last, in the same log entry or
                # a later one: frame 0 committed means every frame of the file is.
                for q in p.extra:
                    if q.image_id not in new and q.image_id not in self._committed:
                        new[q.image_id] = q
                new[p.image_id] = p
        if not new:
            self._release(finished)
            report.already_present += twins
            return
        check_still_current(self.store, self.repo)  # never commit under a superseded version
        groups = _pack_groups(list(new), new) if self.format2 else [list(new)]
        for ids in groups:
            batch = np.stack([new[i].features for i in ids])
            # a version's first batch fits B
            self.repo = basis.ensure(self.store, self.repo, batch, log=self._log)
            from app.core.workstation_index import segment_vectors  # issue 19: by search mode

            if ckks_blocks.is_ckks(self.repo.manifest):  # no secure-kNN ciphertext at all
                vectors = EncryptedVectors(full=np.zeros((len(batch), 1)), levels=())
            else:
                vectors = segment_vectors(self.repo.manifest, self.repo.keys, batch,
                                          basis.norm_bound(self.repo.manifest))
            seg_id = layout.new_id()
            if self.format2:
                report.packs.append(self._commit_format2(ids, new, batch, vectors, seg_id))
            else:
                segment = encode_segment(ids, vectors, self.repo.keys.version)
                self.store.put(layout.segment_key(self.repo.repo_id, seg_id), segment,
                               if_absent=True)
            self._committed.update(ids)
            report.segments.append(seg_id)
            report.imported += [(new[i].path, i) for i in ids if not new[i].frame]
            report.frames += [(new[i].path, new[i].frame, i) for i in ids if new[i].frame]
            report.frames_not_indexed += [(new[i].path, new[i].not_indexed) for i in ids
                                          if new[i].not_indexed]
            self.progress(ProgressEvent(
                "commit", len(report.imported), len(report.imported),
                message=f"segment {seg_id[:8]} committed ({len(ids)} images)"))
        self._release(finished)
        report.already_present += twins

    def _commit_format2(self, ids: list[str], new: dict[str, _Prepared], batch: np.ndarray,
                        vectors: EncryptedVectors, seg_id: str) -> str:
        """Pack, segment, then the log entry (the commit point); returns the pack's id."""
        assert self.writer is not None and self._log is not None
        store, repo, keys = self.store, self.repo, self.repo.keys
        repo_id, pack_id = repo.repo_id, layout.new_id()
        # FORMAT-2 5.3 step 1: the head this batch builds on (other writers' entries included)
        self._log = logstate.verified_log(store, self.settings, repo, since=self._log)
        blob = pack.build_pack(keys.data_key, repo_id, pack_id, keys.version,
                               [(i, new[i].meta, new[i].thumb) for i in ids], batch)
        # Issue 17: the batch's keyword dictionary, inside the segment's MAC'd body.
        dictionary = keyword_dicts.dictionary_for(
            repo, keys.version, seg_id, ids,
            {i: keyword_dicts.keywords_of_record(i, new[i].meta) for i in ids})
        # Issue 19: a CKKS repository's segment carries the batch's CKKS block too, and the
        # key version's evaluation keys exist before any segment of it is committed.
        block = ckks_blocks.block_for(repo, keys.version, batch)
        if block is None:
            segment = keyword_dicts.encode(ids, vectors, keys.version, seg_id=seg_id,
                                           writer=self.writer.user_id,
                                           base_sequence=self._log.head.sequence,
                                           repo_id=repo_id,
                                           mac_key=index_mac_key(keys.data_key),
                                           dictionary=dictionary)
        else:
            if keys.version not in self._ckks_ready:
                ckks_blocks.ensure_eval_keys(store, repo, keys.version)
                self._ckks_ready.add(keys.version)
            segment = encode_segment_v2(ids, vectors, keys.version, seg_id=seg_id,
                                        writer=self.writer.user_id,
                                        base_sequence=self._log.head.sequence,
                                        repo_id=repo_id, mac_key=index_mac_key(keys.data_key),
                                        dictionary=dictionary, ckks=block)
        self._store_batch(repo_id, pack_id, blob, seg_id, segment)
        trust = logstate.repository_trust(store, repo)  # step 3: the manifest read again
        if trust.key_version != keys.version:
            check_still_current(store, repo)  # raises, naming both versions
        added = sorted([seglog.Added(seglog.TYPE_SEGMENT, seg_id,
                                     hashlib.sha256(segment).digest(), len(ids)),
                        seglog.Added(seglog.TYPE_PACK, pack_id,
                                     hashlib.sha256(blob).digest(), len(ids))],
                       key=lambda a: (a.type, a.id))
        try:
            self._log = seglog.append(store, repo_id, self.writer, self.writer.user_id,
                                      trust, self._log,
                                      kind=seglog.KIND_ADD, reason=seglog.REASON_IMPORT,
                                      key_version=keys.version, added=added)
        except (seglog.LogError, FormatError) as exc:
            raise IntegrityError(f"cannot commit to the segment log of repository "
                                 f"{repo_id!r}: {exc}; this batch was not committed") from None
        if self.settings is not None:
            try:
                logstate.remember_head(self.settings, repo_id, self._log.head)
            except OSError as exc:
                raise RadcryptError(
                    f"cannot write in the data directory {self.settings.data_path} "
                    f"({exc.strerror or exc}): the batch was committed, but its log head "
                    "could not be remembered there; the import stopped. Free space there "
                    "(or make it writable) and run the import again: it resumes") from None
        self._passed("entry")
        return pack_id

    def _store_batch(self, repo_id: str, pack_id: str, blob: bytes, seg_id: str,
                     segment: bytes) -> None:
        """The batch's pack and segment, side by side (FORMAT-2 5.3 step 2)."""
        store = self.store
        writes = [self._upload_pool.submit(_put_new, store, layout.pack_key(repo_id, pack_id),
                                           blob),
                  self._upload_pool.submit(_put_new, store, layout.segment_key(repo_id, seg_id),
                                           segment)]
        for write in writes:
            write.result()
        self._passed("stored")

    def _passed(self, step: str) -> None:
        if self._kill is not None:
            self._kill.passed(step)

    def _release(self, finished: list[_Prepared]) -> None:
        """Forget the uploads of a batch's images: committed ones are now found in
        _committed, and a later copy of a failed one may try its upload again."""
        with self._claims_lock:
            for p in finished:
                self._claims.pop(p.image_id, None)


def _put_new(store: Store, key: str, blob: bytes) -> None:
    """Create an object under a fresh random name (a pack, a segment).

    A lost answer makes the store's retry find the object it just wrote (cloud/store.py:
    ObjectExists for our own write); with a random name nobody else writes, the stored
    bytes being ours means the write is done. Other bytes there are an IntegrityError."""
    try:
        store.put(key, blob, if_absent=True)
    except ObjectExists:
        if stored_after_conflict(store, key) != blob:  # a failing read: the store's error
            raise IntegrityError(f"cannot create {key}: another object is already stored "
                                 "under this new random name; this batch was not "
                                 "committed") from None


def _pack_groups(ids: list[str], new: dict[str, _Prepared]) -> list[list[str]]:
    """A batch's images in groups whose pack stays below pack.MAX_PACK_SIZE (FORMAT-2 3.5:
    the importer cuts a batch earlier rather than write a larger pack); one group as a rule.
    The estimate counts each entry's plaintext, its envelope overhead and TOC row."""
    groups: list[list[str]] = [[]]
    size = PACK_OVERHEAD
    for image_id in ids:
        p = new[image_id]
        floats = 0 if p.features is None else p.features.size
        grows = len(p.meta) + len(p.thumb) + 8 * floats + 2 * ENTRY_OVERHEAD
        if groups[-1] and size + grows > pack.MAX_PACK_SIZE:
            groups.append([])
            size = PACK_OVERHEAD
        groups[-1].append(image_id)
        size += grows
    return groups


def _stopped(exc: StoreError) -> StoreError:
    """The error that stops an import on a full or read-only store, saying what to do."""
    return type(exc)(f"{exc}; the import stopped (what was committed stays): make room "
                     "there (or make it writable) and run the import again: it resumes",
                     code=exc.code)


def _probe_writable(directory: Path) -> None:
    """Write and remove a few KB in the workstation's data directory, where each commit's
    log head is remembered: a full or read-only one stops the import before any upload."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".radcrypt-probe-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(bytes(PROBE_BYTES))
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            os.unlink(name)
    except OSError as exc:
        raise RadcryptError(f"cannot write in the data directory {directory} "
                            f"({exc.strerror or exc}): the import remembers the segment "
                            "log's head there; nothing was imported") from None


def _uploaded(prepared: _Prepared) -> _Prepared:
    """Wait for an image's uploads; a failed upload makes the image a failure (a full or
    read-only store stops the import)."""
    try:
        for upload in prepared.uploads:
            upload.result()
    except StoreError as exc:
        if exc.code in STORE_FULL:
            raise _stopped(exc) from None
        name = Path(prepared.path).name
        return _Prepared(prepared.path, prepared.image_id, None,
                         error=f"upload of {name} failed: {exc}")
    return prepared


def _metadata(name: str | Path, size: int, digest: bytes, analysis: Analysis,
              extractor: str, format2: bool = False,
              frame: tuple[int, int, str] | None = None) -> bytes:
    """The encrypted metadata object: what the client needs to name and verify a result.
    Format 2 (a pack's meta entry): no features, they are in the pack's feature array.
    A DICOM file's clinical attributes (app/imaging/clinical.py) are kept under
    ``clinical``; ``frame`` is (frame, frames of the instance, image id of frame 0, whose
    object is the original file) for a frame of a multi-frame instance, stored as
    ``frame``, ``frames`` and ``original`` (app/core/meta.py reads them). ``name``: the
    file's name, or in a research repository a neutral label (app/core/deid.py)."""
    record: dict[str, object] = {
        "format": META_FORMAT_V2 if format2 else META_FORMAT,
        "name": name.name if isinstance(name, Path) else name,
        "size": size,
        "sha256": digest.hex(),
        "source_format": analysis.source_format,
        "tags": analysis.tags,
        "rows": analysis.rows,
        "columns": analysis.columns,
        "imported_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "extractor": extractor,
    }
    if analysis.source_format == "dicom" and analysis.clinical:
        record["clinical"] = dict(analysis.clinical)
    if frame is not None:
        record["frame"], record["frames"], record["original"] = frame
    if not format2:
        record["features"] = [float(x) for x in analysis.features]
    return json.dumps(record, separators=(",", ":")).encode()


def _not_indexed(result: FrameAnalyses) -> str:
    """Why frames of a file were not indexed, in words ("" when all were)."""
    done, total = len(result.frames), result.total
    if done >= total:
        return ""
    which = f"frame {done}" if done + 1 == total else f"frames {done} to {total - 1}"
    if result.error:
        return f"{which} of {total} not indexed: {result.error}"
    return (f"{which} of {total} not indexed: only the first {MAX_FRAMES} frames of a "
            "file are (MAX_FRAMES); the stored original holds them all")


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()


# --- decoding, features and previews: in decoder children -----------------------------------


def _decoder_pool(workers: int, memory_limit: int | None) -> DecoderPool:
    """A decoder child per worker thread, for the whole import.

    A worker *thread* decoding, extracting features and making a preview holds the GIL in
    many short slices (pydicom's parsing, numpy's small operations; a JPEG 2000 decode
    holds it for up to a second), and the upload threads then wait for it at every socket
    and cipher call: the process stays well below the machine's cores while its threads
    hand the GIL to each other thousands of times per image. So decoding, features and
    the preview run in children: the parent keeps the keys, hashes, encrypts and uploads;
    a child gets a path and the digest of the content the parent read and returns the
    features and the preview. Children start at once (about a third of a second, while the
    parent hashes) and end when their stdin closes: at close(), or when the parent dies.
    """
    return DecoderPool(workers, memory_limit=memory_limit)
