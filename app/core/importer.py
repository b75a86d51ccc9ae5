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
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

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
META_FORMAT = "radcrypt-meta-v1"
_ID_CONTEXT = b"radcrypt/image-id/v1"


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
                 cancel: CancelToken | None = None) -> None:
        self.store = store
        self.repo = repo
        self.workers = max(1, workers)
        self.batch_size = max(1, batch_size)
        self.progress = progress
        self.cancel = cancel or CancelToken()
        self.extract = get_extractor(repo.manifest.extractor)
        self._committed: set[str] = set()
        self._uploaded: set[str] = set()

    def run(self, paths: Iterable[str | Path]) -> ImportReport:
        start = time.perf_counter()
        report = ImportReport()
        files = expand_paths(paths)
        total = len(files)
        self.progress(ProgressEvent("scan", 0, total, message=f"{total} files to import"))
        self._committed = committed_ids(self.store, self.repo.repo_id)
        self._uploaded = objects.existing_image_ids(self.store, self.repo.repo_id, "meta")
        done = 0
        with ThreadPoolExecutor(self.workers, thread_name_prefix="radcrypt-import") as pool, \
                ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="radcrypt-upload") as up:
            self._upload_pool = up
            for batch in _chunks(files, self.batch_size):
                finished: list[_Prepared] = []
                try:
                    for prepared in self._prepare_all(pool, batch):
                        finished.append(prepared)
                        done += 1
                        self._record(report, prepared, done, total)
                except Cancelled:
                    report.cancelled = True
                self._commit(finished, report)
                if report.cancelled:
                    break
        report.seconds = time.perf_counter() - start
        return report

    def _prepare_all(self, pool: ThreadPoolExecutor, batch: list[Path]) -> Iterator[_Prepared]:
        """Results in file order; stops handing out work as soon as cancel is pressed."""
        futures = []
        for path in batch:
            futures.append(pool.submit(self._prepare_checked, path))
        try:
            for future in futures:
                yield _uploaded(future.result())
                self.cancel.check()
        finally:
            for future in futures:
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
        image: DecodedImage = (decode_bytes(data, str(path)) if data is not None
                               else decode_image(path))
        features = np.asarray(self.extract(image), dtype=np.float64)
        if image_id in self._uploaded:
            return _Prepared(str(path), image_id, features)
        keys, repo_id = self.repo.keys, self.repo.repo_id
        thumb = make_thumbnail_png(image)
        meta = _metadata(path, size, digest, image, self.repo.manifest.extractor, features)

        def upload() -> None:
            # The meta object goes last: its presence tells a resumed import that the
            # original and the preview are stored too.
            if data is not None:
                objects.put_encrypted(self.store, keys, repo_id, "objects", image_id, data)
            else:
                objects.put_encrypted_file(self.store, keys, repo_id, image_id, path)
            objects.put_encrypted(self.store, keys, repo_id, "thumbs", image_id, thumb)
            objects.put_encrypted(self.store, keys, repo_id, "meta", image_id, meta)

        return _Prepared(str(path), image_id, features,
                         uploads=(self._upload_pool.submit(upload),))

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
        twins: list[tuple[str, str]] = []  # the same content twice in one batch: once
        for p in finished:
            if p.features is not None and p.image_id not in self._committed:
                if p.image_id in new:
                    twins.append((p.path, p.image_id))
                else:
                    new[p.image_id] = p
        if not new:
            return
        ids = list(new)
        vectors = self.repo.keys.index_key.encrypt(np.stack([new[i].features for i in ids]))
        segment = encode_segment(ids, vectors, self.repo.keys.version)
        seg_id = layout.new_id()
        self.store.put(layout.segment_key(self.repo.repo_id, seg_id), segment, if_absent=True)
        self._committed.update(ids)
        report.segments.append(seg_id)
        report.imported += [(new[i].path, i) for i in ids]
        report.already_present += twins
        self.progress(ProgressEvent("commit", len(report.imported), len(report.imported),
                                    message=f"segment {seg_id[:8]} committed ({len(ids)} images)"))


def _uploaded(prepared: _Prepared) -> _Prepared:
    """Wait for an image's uploads; a failed upload makes the image a failure."""
    try:
        for upload in prepared.uploads:
            upload.result()
    except StoreError as exc:
        name = Path(prepared.path).name
        return _Prepared(prepared.path, "", None, error=f"upload of {name} failed: {exc}")
    return prepared


def _metadata(path: Path, size: int, digest: bytes, image: DecodedImage, extractor: str,
              features: np.ndarray) -> bytes:
    """The encrypted metadata object: what the client needs to name and verify a result."""
    record = {
        "format": META_FORMAT,
        "name": path.name,
        "size": size,
        "sha256": digest.hex(),
        "source_format": image.source_format,
        "tags": image.metadata,
        "rows": int(image.pixels.shape[0]),
        "columns": int(image.pixels.shape[1]),
        "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "extractor": extractor,
        "features": [float(x) for x in features],
    }
    return json.dumps(record, separators=(",", ":")).encode()


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
