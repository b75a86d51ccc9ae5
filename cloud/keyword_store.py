"""Where the search service reads keyword dictionaries: inside the segments, and the
label objects listed in the segment log (issue 17; docs/KEYWORDS.md).

Why a second read of each segment: the service must only trust bytes whose SHA-256 the
verified segment log names (docs/FORMAT-2.md 5.5), and a range read of the dictionary
alone cannot be checked against it. So each segment is read whole once, its SHA-256
compared with the log's, and only its ids and dictionary kept (about 16 + 160 bytes an
image, against 2,200 for the vectors); segments are immutable, so this happens once per
segment for the life of the service. With the hook of cloud/repo_index.py (``on_segment``,
patch p16-H5-repo_index) the service's own load hands each verified segment over
(``capture``) and nothing is read twice.

Layout read here (cloud/segments.py, format version 2, little-endian): header flags bit 0
(FLAG_KEYWORDS) says a dictionary is present, its length D is the u64 at header offset 184,
the dictionary sits just before the 64-byte trailer, zero-padded to 64; the ids start at
offset 192, 16 bytes each, ``count`` (u32 at offset 12) of them. Labels: crypto/labels.py.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from cloud import layout
from cloud.keyword_index import KeywordSource, SegmentDictionary, SegmentLabel
from crypto.errors import FormatError

log = logging.getLogger(__name__)

HEADER_SIZE_V2 = 192
TRAILER_SIZE_V2 = 64
DICTIONARY_AT = HEADER_SIZE_V2 - 8
FLAG_KEYWORDS = 1
TYPE_SEGMENT = 1
TYPE_LABEL = 4  # cloud.seglog_format.TYPE_LABEL (issue 17, write side)


def _pad64(n: int) -> int:
    return -n % 64


def segment_dictionary(blob: bytes | memoryview, name: str) -> SegmentDictionary | None:
    """The ids and dictionary of a whole format-2 segment (whose SHA-256 the caller has
    checked), None when it was written without a dictionary. FormatError names ``name``."""
    if len(blob) < HEADER_SIZE_V2 + TRAILER_SIZE_V2 or bytes(blob[:4]) != b"RCSG":
        raise FormatError(f"segment {name}: not a format-2 segment")
    version, flags = struct.unpack_from("<HH", blob, 4)
    (count,) = struct.unpack_from("<I", blob, 12)
    if version != 2 or not flags & FLAG_KEYWORDS:
        return None
    (size,) = struct.unpack_from("<Q", blob, DICTIONARY_AT)
    body_end = len(blob) - TRAILER_SIZE_V2
    start = body_end - size - _pad64(size)
    ids_end = HEADER_SIZE_V2 + 16 * count
    if size < 16 or start < ids_end:
        raise FormatError(f"segment {name}: dictionary length {size} does not fit")
    ids = np.frombuffer(bytes(blob[HEADER_SIZE_V2:ids_end]), dtype="V16")
    return SegmentDictionary(ids, bytes(blob[start : start + size]))


def _log_of(context: object) -> Any:
    """The verified LogState of the service's RepoIndex (None for format 1)."""
    return getattr(context, "_log", None)


class StoreKeywords:
    """cloud.keyword_index.KeywordSource over the bucket, checked against the log."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._labels: dict[str, SegmentLabel] = {}  # label id -> parsed (immutable)
        # What the vector index's own load handed over (cloud/repo_index.py on_segment):
        # (repo, segment id) -> its ids and dictionary, None when it has none.
        self._captured: dict[tuple[str, str], SegmentDictionary | None] = {}
        self._lock = threading.Lock()

    def capture(self, repo_id: str, key: str, segment: Any) -> None:
        """Keep a segment's ids and dictionary as the service's index loads it (the
        segment was checked against the log there): no second read of it."""
        dictionary = getattr(segment, "dictionary", None)
        found = None
        if dictionary is not None:
            ids = np.frombuffer(bytes(np.ascontiguousarray(segment.ids).tobytes()), "V16")
            found = SegmentDictionary(ids, bytes(dictionary))
        seg_id = key.rsplit("/", 1)[-1]
        with self._lock:
            self._captured[repo_id, seg_id] = found

    def release(self, repo_id: str, loaded: Iterable[str]) -> None:
        """Forget what was captured of segments a view has loaded already (the index
        hands every segment over again when it reloads from scratch)."""
        with self._lock:
            for seg_id in loaded:
                self._captured.pop((repo_id, seg_id), None)

    def segment(self, repo_id: str, segment_id: str, key_version: int, context: object
                ) -> SegmentDictionary | None:
        state = _log_of(context)
        if state is None:
            return None  # format 1: no dictionaries
        with self._lock:
            if (repo_id, segment_id) in self._captured:
                return self._captured.pop((repo_id, segment_id))
        live = state.live.get((TYPE_SEGMENT, segment_id))
        if live is None:
            return None
        key = layout.segment_key(repo_id, segment_id)
        blob = self.store.get(key)
        if hashlib.sha256(blob).digest() != live.sha256:
            log.error("segment %s does not match the segment log: not searched by keyword",
                      key)
            return None
        try:
            return segment_dictionary(blob, key)
        except FormatError as exc:
            log.error("%s: not searched by keyword", exc)
            return None

    def labels(self, repo_id: str, key_version: int, context: object
               ) -> Sequence[SegmentLabel]:
        state = _log_of(context)
        if state is None:
            return ()
        out = []
        for live in state.live.values():
            if live.type != TYPE_LABEL or live.key_version != key_version:
                continue
            with self._lock:
                known = self._labels.get(live.id)
            if known is None:
                known = self._read_label(repo_id, live)
                if known is None:
                    continue
                with self._lock:
                    self._labels[live.id] = known
            out.append(known)
        return out

    def _read_label(self, repo_id: str, live: Any) -> SegmentLabel | None:
        from crypto.labels import OP_REMOVE, LabelObject, order_key

        key = layout.repo_prefix(repo_id) + f"labels/{live.id}"
        blob = self.store.get(key)
        if hashlib.sha256(blob).digest() != live.sha256:
            log.error("label object %s does not match the segment log: ignored", key)
            return None
        try:
            parsed = LabelObject.from_bytes(blob, key)
        except FormatError as exc:
            log.error("%s: ignored", exc)
            return None
        # The order is the object's own (base sequence, id), never the log sequence that
        # added it: a log verified from a checkpoint gives every object the checkpoint's.
        return SegmentLabel(parsed.label_id, parsed.key_version, parsed.segment_id,
                            parsed.row_count, parsed.op == OP_REMOVE, order_key(parsed),
                            parsed.dictionary)


def default_keyword_source(store: Any) -> KeywordSource:
    """The service's source of dictionaries: the store, checked against the log."""
    return StoreKeywords(store)
