"""Reading an image's metadata, preview and features, in either storage format.

Format 2 (docs/FORMAT-2.md section 3) keeps a batch's metadata, previews and feature
array in one pack; the segment log names the live packs. A reader finds an image's pack
from an index image id -> (pack, TOC entry) built from the TOCs of the live packs: each
TOC costs one range read of the pack's last bytes (crypto.pack.TAIL_READ; a second one
only for a TOC larger than that), and is cached by repository, pack id and the pack's
SHA-256 from the log (packs never change). An entry is then one range read, opened with
associated data naming the repository, kind, image, key version and pack: an entry moved
to another pack, image or offset does not open, and the user is told (IntegrityError).

Format 1 keeps one ``meta`` and one ``thumbs`` object per image (app/core/objects.py); the
reader delegates to them, so callers need not know the format. Either way ``meta`` returns
a dict with ``features`` (format 2 takes them from the pack's feature array).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from app.core import objects
from app.core.errors import IntegrityError, RadcryptError
from app.core.repository import Repository
from cloud import layout, seglog
from cloud.backend import ObjectNotFound, Store
from cloud.segments import DIGEST_SIZE, HEADER_SIZE, expected_size, read_header
from crypto import pack
from crypto.errors import DecryptionError, FormatError

TOC_CACHE = 4096  # TOCs kept per process (a few KB each: 64 images x 48 bytes)
READ_THREADS = 8  # TOC range reads in flight (they wait on the network)

_toc_cache: OrderedDict[tuple[str, str, bytes], pack.PackToc] = OrderedDict()
_toc_lock = threading.Lock()


def _cached_toc(key: tuple[str, str, bytes]) -> pack.PackToc | None:
    with _toc_lock:
        toc = _toc_cache.get(key)
        if toc is not None:
            _toc_cache.move_to_end(key)
        return toc


def _cache_toc(key: tuple[str, str, bytes], toc: pack.PackToc) -> None:
    with _toc_lock:
        _toc_cache[key] = toc
        while len(_toc_cache) > TOC_CACHE:
            _toc_cache.popitem(last=False)


def forget_tocs() -> None:
    """Empty this process's TOC cache (what a new process starts with): a reader then
    reads and verifies every TOC again."""
    with _toc_lock:
        _toc_cache.clear()


def read_toc(store: Store, repo: Repository, pack_id: str, size: int | None = None,
             sha256: bytes = b"") -> pack.PackToc:
    """The verified TOC of one pack (cached by repository, pack id and SHA-256)."""
    cache_key = (repo.repo_id, pack_id, sha256)
    if sha256:
        cached = _cached_toc(cache_key)
        if cached is not None:
            return cached
    name = layout.pack_key(repo.repo_id, pack_id)
    try:
        if size is None:
            size = store.size(name)
        if size is None:
            raise ObjectNotFound(name)
        tail, key_version = toc_tail(store, name, pack_id, size)
        keys = repo.ring.version(key_version)
        toc = pack.open_toc(keys.data_key, repo.repo_id, pack_id, size, tail)
    except ObjectNotFound:
        raise IntegrityError(f"pack {pack_id} of repository {repo.repo_id!r} is named by "
                             "the segment log but missing from the store") from None
    except (FormatError, DecryptionError, KeyError, ValueError) as exc:
        raise IntegrityError(f"pack {pack_id} of repository {repo.repo_id!r} failed its "
                             f"integrity check ({_reason(exc)}): it was altered, truncated "
                             "or moved, and will not be read") from None
    if sha256:
        _cache_toc(cache_key, toc)
    return toc


def toc_tail(store: Store, name: str, pack_id: str, size: int) -> tuple[bytes, int]:
    """The last bytes of a pack, enough to open its TOC, and the key version its trailer
    names: one range read of up to TAIL_READ bytes, a second for a TOC larger than that
    (FORMAT-2 3.5). FormatError for a trailer that does not parse."""
    start = max(0, size - pack.TAIL_READ)
    tail = store.get_range(name, start, size - start)
    toc_start, key_version = pack.trailer_info(tail, size, pack_id)
    if size - toc_start > len(tail):
        tail = store.get_range(name, toc_start, size - toc_start)
    return tail, key_version


def _reason(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return "its key version is not in this key ring"
    return str(exc) or type(exc).__name__


class ImageReader:
    """Metadata, previews and features of one repository's images.

    ``state``: the verified segment log of a format-2 repository (app/core/logstate.py),
    whose live packs are read; None for a format-1 repository (per-image objects).
    Thread-safe: the index is built once, features are cached per pack.
    """

    def __init__(self, store: Store, repo: Repository, state: seglog.LogState | None) -> None:
        self.store = store
        self.repo = repo
        self.state = state
        self._index: dict[str, tuple[str, pack.PackEntry]] | None = None
        self._tocs: dict[str, pack.PackToc] = {}
        self._features: dict[str, tuple[list[str], np.ndarray]] = {}
        self._rows: dict[str, dict[str, int]] = {}  # pack id -> image id -> feature row
        self._lock = threading.Lock()

    # --- format 2: the index of live packs ------------------------------------------------

    def _live_tocs(self) -> dict[str, pack.PackToc]:
        assert self.state is not None
        # Only key versions this ring holds: a revocation commits packs of the next version
        # before the members hold it (docs/FORMAT-2.md 7.3); they are not ours yet.
        held = {keys.version for keys in self.repo.ring.versions}
        live = [obj for obj in self.state.packs() if obj.key_version in held]
        sizes: dict[str, int] = {}
        if live:  # one listing gives every pack's size (a TOC read needs it)
            for key, size in self.store.list_objects(layout.packs_prefix(self.repo.repo_id)):
                try:
                    sizes[layout.parse_pack_key(key)[1]] = size
                except ValueError:
                    continue
        for obj in live:
            if obj.id not in sizes:
                raise IntegrityError(f"pack {obj.id} of repository {self.repo.repo_id!r} is "
                                     "named by the segment log but missing from the store")

        def one(obj: seglog.LiveObject) -> pack.PackToc:
            toc = read_toc(self.store, self.repo, obj.id, sizes[obj.id], obj.sha256)
            if toc.key_version != obj.key_version or len(toc.image_ids()) != obj.count:
                raise IntegrityError(
                    f"pack {obj.id} of repository {self.repo.repo_id!r} does not match its "
                    f"log entry (key version {toc.key_version}, {len(toc.image_ids())} "
                    f"images; the log says {obj.key_version} and {obj.count})")
            return toc

        if len(live) <= 1:
            return {obj.id: one(obj) for obj in live}
        with ThreadPoolExecutor(min(READ_THREADS, len(live)),
                                thread_name_prefix="radcrypt-toc") as pool:  # range reads wait
            return {obj.id: toc for obj, toc in zip(live, pool.map(one, live), strict=True)}

    def _image_index(self) -> dict[str, tuple[str, pack.PackEntry]]:
        with self._lock:
            if self._index is None:
                self._tocs = self._live_tocs()
                index: dict[str, tuple[str, pack.PackEntry]] = {}
                # an image in packs of two versions (during a revocation): the newest wins
                for pack_id, toc in sorted(self._tocs.items(),
                                           key=lambda item: item[1].key_version):
                    for entry in toc.entries:
                        if entry.kind == pack.KIND_META:
                            index[entry.object_id] = (pack_id, entry)
                self._index = index
            return self._index

    def _locate(self, image_id: str) -> tuple[pack.PackToc, str]:
        found = self._image_index().get(image_id)
        if found is None:
            raise IntegrityError(f"image {image_id} is not in any live pack of repository "
                                 f"{self.repo.repo_id!r}: it is unknown, or its pack is gone")
        return self._tocs[found[0]], found[0]

    def _entry(self, toc: pack.PackToc, kind: int, object_id: str, what: str) -> bytes:
        try:
            entry = toc.entry(kind, object_id)
        except KeyError:
            raise IntegrityError(f"pack {toc.pack_id} of repository {self.repo.repo_id!r} "
                                 f"has no {what} of {object_id}") from None
        name = layout.pack_key(self.repo.repo_id, toc.pack_id)
        keys = self.repo.ring.version(toc.key_version)
        try:
            envelope = self.store.get_range(name, entry.offset, entry.length)
            return pack.open_entry(keys.data_key, self.repo.repo_id, toc, entry, envelope)
        except ObjectNotFound:
            raise IntegrityError(f"pack {toc.pack_id} of repository {self.repo.repo_id!r} "
                                 "is missing from the store") from None
        except (DecryptionError, FormatError):
            raise IntegrityError(
                f"the stored {what} of {object_id} in pack {toc.pack_id} failed its "
                "integrity check: it was altered, truncated, swapped or moved, and will not "
                "be shown") from None

    def features_of_pack(self, pack_id: str) -> tuple[list[str], np.ndarray]:
        """(image ids, features) of one live pack: one entry, one range read."""
        if self.state is None:
            raise RadcryptError(f"repository {self.repo.repo_id!r} is in storage format 1: "
                                "it has no packs")
        with self._lock:
            cached = self._features.get(pack_id)
        if cached is not None:
            return cached
        self._image_index()
        toc = self._tocs.get(pack_id)
        if toc is None:
            raise IntegrityError(f"pack {pack_id} is not live in repository "
                                 f"{self.repo.repo_id!r}")
        plain = self._entry(toc, pack.KIND_FEATURES, pack_id, "feature array")
        ids = toc.image_ids()
        try:
            features = pack.decode_features(plain, ids)
        except FormatError as exc:
            raise IntegrityError(f"the feature array of pack {pack_id} is malformed: {exc}"
                                 ) from None
        result = (ids, features)
        with self._lock:
            self._features[pack_id] = result
            self._rows[pack_id] = {image_id: row for row, image_id in enumerate(ids)}
        return result

    # --- either format --------------------------------------------------------------------

    def meta(self, image_id: str, version: int | None = None) -> tuple[dict[str, Any], int]:
        """(decrypted metadata, key version that opened it); the dict always has
        ``features`` (a list of floats). IntegrityError when it does not verify.
        ``version``: format 1 only, the key version to try first."""
        if self.state is None:
            return _meta_v1(self.store, self.repo, image_id, version)
        toc, pack_id = self._locate(image_id)
        plain = self._entry(toc, pack.KIND_META, image_id, "metadata")
        record = _json_object(plain, image_id)
        _, features = self.features_of_pack(pack_id)
        record["features"] = [float(x) for x in features[self._rows[pack_id][image_id]]]
        return record, toc.key_version

    def thumb(self, image_id: str, version: int | None = None) -> bytes:
        """The decrypted PNG preview of an image (``version``: as for ``meta``)."""
        if self.state is None:
            try:
                plain, _ = objects.get_decrypted(self.store, self.repo.ring,
                                                 self.repo.repo_id, "thumbs", image_id,
                                                 version)
            except ObjectNotFound:
                raise IntegrityError(f"image {image_id} is in the index but its preview is "
                                     "missing") from None
            return plain
        toc, _ = self._locate(image_id)
        return self._entry(toc, pack.KIND_THUMBS, image_id, "preview")

    def image_ids(self) -> set[str]:
        """Ids of every committed image: in live packs (format 2), named by a segment
        (format 1)."""
        if self.state is None:
            return committed_ids(self.store, self.repo.repo_id)
        return set(self._image_index())

    def pack_of(self, image_id: str) -> str:
        """The id of the live pack that holds ``image_id`` (format 2)."""
        return self._locate(image_id)[1]


def _json_object(plain: bytes, image_id: str) -> dict[str, Any]:
    try:
        record = json.loads(plain)
    except (ValueError, RecursionError):  # also a 5000-digit number, nesting too deep
        raise IntegrityError(f"metadata of image {image_id} is not valid JSON") from None
    if not isinstance(record, dict):
        raise IntegrityError(f"metadata of image {image_id} is not a JSON object")
    return record


def _meta_v1(store: Store, repo: Repository, image_id: str, version: int | None
             ) -> tuple[dict[str, Any], int]:
    """Format 1: the per-image ``meta`` object, features inside."""
    try:
        plain, used = objects.get_decrypted(store, repo.ring, repo.repo_id, "meta", image_id,
                                            version)
    except ObjectNotFound:
        raise IntegrityError(f"image {image_id} is in the index but its metadata is missing"
                             ) from None
    record = _json_object(plain, image_id)
    if not isinstance(record.get("features"), list):
        raise IntegrityError(f"metadata of image {image_id} lacks its features")
    return record, used


def committed_ids(store: Store, repo_id: str) -> set[str]:
    """Ids named by the repository's segments: two small range reads per segment.

    A segment whose header is damaged, or whose size is not the one its header implies
    (truncated, extended), commits nothing, so a re-run imports its images again. Damage
    that keeps the size (flipped bits) is only found by the service's checksum, which
    reports the segment on refresh; reading every segment whole here would cost the whole
    index at every import.
    """
    ids: set[str] = set()
    for key, size in store.list_objects(layout.segments_prefix(repo_id)):
        head = store.get_range(key, 0, HEADER_SIZE)
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
