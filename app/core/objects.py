"""Encrypted per-image objects: the original, its preview and its metadata.

Every object is an AES-256-GCM envelope (crypto/aead.py) whose associated data names
the repository, the object kind, the image id and the key version: an object copied
under another name, swapped with another image's or truncated fails to open, and the
user is told, never shown the bytes.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from app.core.errors import IntegrityError, RadcryptError
from app.core.progress import ProgressCallback, ProgressEvent, no_progress
from cloud import layout
from cloud.backend import ObjectNotFound, Store
from crypto import aead
from crypto.errors import DecryptionError
from crypto.keys import KeyRing, VersionKeys

STREAM_THRESHOLD = 64 << 20
READ_BLOCK = 1 << 20


def _ad(repo_id: str, kind: str, image_id: str, version: int) -> bytes:
    return aead.associated_data(repo_id, kind, image_id, version)


def put_encrypted(store: Store, keys: VersionKeys, repo_id: str, kind: str,
                  image_id: str, data: bytes) -> None:
    """Encrypt and upload a small object (thumbnail, metadata) in one request."""
    envelope = aead.seal(keys.data_key, data, _ad(repo_id, kind, image_id, keys.version))
    store.put(layout.image_key(kind, repo_id, image_id), envelope)


def put_encrypted_file(store: Store, keys: VersionKeys, repo_id: str, image_id: str,
                       path: Path) -> None:
    """Encrypt and upload an original file; large files stream, never whole in memory."""
    ad = _ad(repo_id, "objects", image_id, keys.version)
    key = layout.object_key(repo_id, image_id)
    if path.stat().st_size < STREAM_THRESHOLD:
        store.put(key, aead.seal(keys.data_key, path.read_bytes(), ad))
        return
    with path.open("rb") as handle:
        blocks = iter(lambda: handle.read(READ_BLOCK), b"")
        store.put_stream(key, _IterReader(aead.encrypt_stream(keys.data_key, blocks, ad)))


def _versions(ring: KeyRing, hint: int | None) -> list[VersionKeys]:
    """Key versions to try, the hinted one first (a wrong hint only costs one failed tag)."""
    ordered = list(reversed(ring.versions))
    if hint is not None:
        ordered.sort(key=lambda v: v.version != hint)
    return ordered


def _integrity_error(kind: str, image_id: str) -> IntegrityError:
    return IntegrityError(
        f"the stored {_KIND_WORDS.get(kind, kind)} of image {image_id} failed its integrity "
        "check: it was altered, truncated, swapped or moved, and will not be shown"
    )


_KIND_WORDS = {"objects": "original", "thumbs": "preview", "meta": "metadata"}


def get_decrypted(store: Store, ring: KeyRing, repo_id: str, kind: str, image_id: str,
                  version: int | None = None) -> tuple[bytes, int]:
    """(plaintext, key version) of a small object; IntegrityError if it does not open."""
    envelope = store.get(layout.image_key(kind, repo_id, image_id))
    for keys in _versions(ring, version):
        try:
            plain = aead.open_sealed(keys.data_key, envelope,
                                     _ad(repo_id, kind, image_id, keys.version))
            return plain, keys.version
        except DecryptionError:
            continue
    raise _integrity_error(kind, image_id)


def fetch_original(store: Store, ring: KeyRing, repo_id: str, image_id: str,
                   dest: Path, version: int | None = None,
                   progress: ProgressCallback = no_progress) -> int:
    """Stream, verify and decrypt an original into ``dest``; returns its size.

    Written to a temporary file beside ``dest`` and renamed only once every chunk and
    the final flag verified, so a tampered object never leaves a partial file behind.
    IntegrityError when the object does not open; RadcryptError when there is none.
    ``progress``: "download" events, bytes of the stored object read of its size.
    """
    key = layout.object_key(repo_id, image_id)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for keys in _versions(ring, version):
        fd, tmp_name = tempfile.mkstemp(prefix=".radcrypt-", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                ad = _ad(repo_id, "objects", image_id, keys.version)
                chunks = _counted(store.iter_chunks(key), progress, _size(store, key))
                for piece in aead.decrypt_stream(keys.data_key, chunks, ad):
                    out.write(piece)
            tmp.replace(dest)
            return dest.stat().st_size
        except DecryptionError:
            continue
        except ObjectNotFound:
            raise RadcryptError(
                f"repository {repo_id!r} has no stored original for image {image_id}: "
                "the id is unknown, or the object was deleted"
            ) from None
        finally:
            if tmp.exists():
                tmp.unlink()
    raise _integrity_error("objects", image_id)


def _size(store: Store, key: str) -> int:
    try:
        return store.size(key) or 0
    except ObjectNotFound:
        return 0


def _counted(chunks: Iterator[bytes], progress: ProgressCallback, total: int
             ) -> Iterator[bytes]:
    done = 0
    for chunk in chunks:
        done += len(chunk)
        progress(ProgressEvent("download", done, max(total, done)))
        yield chunk


def existing_image_ids(store: Store, repo_id: str, kind: str) -> set[str]:
    """Ids that already have an object of ``kind`` (what a resumed import can skip)."""
    prefix = layout.image_prefix(kind, repo_id)
    return {key[len(prefix):] for key in store.list_keys(prefix)}


def exists(store: Store, repo_id: str, kind: str, image_id: str) -> bool:
    try:
        return store.exists(layout.image_key(kind, repo_id, image_id))
    except ObjectNotFound:
        return False


class _IterReader(io.RawIOBase):
    """A read-only file over an iterator of byte blocks (for multipart uploads)."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buffer:
            try:
                self._buffer = next(self._blocks)
            except StopIteration:
                return 0
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size
