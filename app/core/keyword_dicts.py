"""The write side of keyword search: every segment's dictionary, built wherever a segment is.

Why one module: the importer, compaction, erasure and the revocation each build segments,
and each must give the new segment the dictionary of exactly its rows, under its key
version's keyword key, or keyword search silently misses images. They call ``encode``
(import) or ``compaction.build_segment`` (the rewrites), which call ``dictionary_for``.

Where a reader finds things (H5, the service; /work/h4-reader-notes.md has the long form):

* A segment's dictionary is INSIDE the segment, in its MAC'd body: format 2, header flags
  bit 0 (``cloud.segments.FLAG_KEYWORDS``), length at header offset 184, the RCSD bytes
  after the ``full`` section. ``decode_segment(blob).dictionary`` (memoryview or None).
  Load: ``cloud.keyword_index.SegmentKeywords.load(bytes(seg.dictionary), repo_id,
  seg.seg_id, seg.key_version, len(seg))``: bound to the segment's own id.
* Labels are objects of log type 4 (``cloud.seglog_format.TYPE_LABEL``; live ones:
  ``state.labels(version)``), bucket key ``cloud.layout.label_key(repo_id, label_id)``,
  parsed without a key by ``crypto.labels.LabelObject.from_bytes``; each names rows of
  one segment (``segment_id``, ``row_count``), op add or remove; its dictionary is bound to
  the LABEL's id: ``SegmentKeywords.load(obj.dictionary, repo_id, obj.label_id,
  obj.key_version, obj.row_count)``. Apply in log order with ``crypto.labels.apply_labels``.

Segments written before issue 17 have no dictionary; compaction gives them one (it
rewrites every segment without a dictionary, app/core/compaction.py).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from app.core.errors import IntegrityError
from app.core.keywords import keywords_of
from app.core.meta import ImageMeta
from app.core.packs import read_toc
from app.core.repository import Repository
from cloud import layout, seglog
from cloud import segments as segment_format
from cloud.backend import ObjectNotFound, Store
from crypto import pack as packs
from crypto.errors import DecryptionError, FormatError
from crypto.sse import build_dictionary
from crypto.tokens import EncryptedVectors

TYPE_LABEL = getattr(seglog, "TYPE_LABEL", 4)
"""Log object type of a label (cloud.seglog_format.TYPE_LABEL once /work/p16-H4-seglog
patches are in; the fallback keeps this module importable before)."""


def keywords_of_record(image_id: str, plain: bytes) -> set[str]:
    """The keywords of one image from its decrypted metadata JSON (a pack's meta entry)."""
    try:
        record = json.loads(plain)
    except ValueError:
        raise IntegrityError(f"the metadata of image {image_id} is not JSON: its keywords "
                             "cannot be indexed") from None
    if not isinstance(record, dict):
        raise IntegrityError(f"the metadata of image {image_id} is not a JSON object")
    return keywords_of(ImageMeta.from_record(image_id, record))


def keywords_by_id(images: Iterable[tuple[str, bytes, Any]]) -> dict[str, set[str]]:
    """image id -> keywords, from (image id, meta plaintext, anything) triples: the shape
    of a pack's images (crypto.pack.build_pack, app/core/access.py's re-seal)."""
    return {image_id: keywords_of_record(image_id, meta) for image_id, meta, _ in images}


def dictionary_for(repo: Repository, key_version: int, seg_id: str, ids: Sequence[str],
                   keywords: Mapping[str, Iterable[str]]) -> bytes:
    """The padded dictionary of a segment whose rows are ``ids`` (in row order), under the
    keyword key of ``key_version``. Every id must have its keywords (an empty set is fine:
    an image without keywords)."""
    rows: dict[str, list[int]] = {}
    for row, image_id in enumerate(ids):
        found = keywords.get(image_id)
        if found is None:
            raise IntegrityError(f"no metadata found for image {image_id} of new segment "
                                 f"{seg_id} in repository {repo.repo_id}: its keyword "
                                 "dictionary cannot be written; nothing was written")
        for keyword in found:
            rows.setdefault(keyword, []).append(row)
    keyword_key = repo.ring.version(key_version).keyword_key
    return build_dictionary(keyword_key, repo.repo_id, key_version, seg_id, rows)


def can_embed() -> bool:
    """Whether cloud/segments.py writes dictionaries (/work/p16-H4-segments.patch)."""
    return "dictionary" in inspect.signature(segment_format.encode_segment_v2).parameters


def encode(ids: list[str], vectors: EncryptedVectors, key_version: int, *, seg_id: str,
           writer: str, base_sequence: int, repo_id: str, mac_key: bytes,
           dictionary: bytes | None) -> bytes:
    """cloud.segments.encode_segment_v2 with the dictionary in the segment's MAC'd body.
    Before the segments patch is applied the segment is written without one (the tree
    others work in stays importable); tests/test_keyword_dictionaries.py requires it."""
    if dictionary is not None and can_embed():
        return segment_format.encode_segment_v2(
            ids, vectors, key_version, seg_id=seg_id, writer=writer,
            base_sequence=base_sequence, repo_id=repo_id, mac_key=mac_key,
            dictionary=dictionary)
    return segment_format.encode_segment_v2(ids, vectors, key_version, seg_id=seg_id,
                                            writer=writer, base_sequence=base_sequence,
                                            repo_id=repo_id, mac_key=mac_key)


def has_dictionary(segment: segment_format.Segment) -> bool:
    return getattr(segment, "dictionary", None) is not None


def keywords_from_packs(store: Store, repo: Repository, state: seglog.LogState, version: int,
                        wanted: Iterable[str]) -> dict[str, set[str]]:
    """image id -> keywords for ``wanted`` images, read from the live packs of ``version``
    (each pack that holds one is read whole once and checked against the log). What a
    rewrite (compaction, erasure) needs: the rows it copies keep their keywords."""
    todo = set(wanted)
    out: dict[str, set[str]] = {}
    if not todo:
        return out
    data_key = repo.ring.version(version).data_key
    sizes = dict(store.list_objects(layout.packs_prefix(repo.repo_id)))
    for live in state.packs(version):
        toc = read_toc(store, repo, live.id, sizes.get(layout.pack_key(repo.repo_id, live.id)),
                       live.sha256)
        if todo.isdisjoint(toc.image_ids()):
            continue
        blob = _checked(store, layout.pack_key(repo.repo_id, live.id), "pack", live)
        try:
            _, entries = packs.open_pack(data_key, repo.repo_id, live.id, blob)
        except (FormatError, DecryptionError) as exc:
            raise IntegrityError(f"pack {live.id} of repository {repo.repo_id} does not open "
                                 f"({exc}): keyword dictionaries cannot be rebuilt") from None
        for image_id in todo.intersection(toc.image_ids()):
            out[image_id] = keywords_of_record(image_id, entries[(packs.KIND_META, image_id)])
        todo -= out.keys()
        if not todo:
            break
    return out


def read_label_blob(store: Store, repo_id: str, live: seglog.LiveObject) -> bytes:
    """A live label object's bytes, refused unless their SHA-256 is the log's."""
    return _checked(store, layout.label_key(repo_id, live.id), "label", live)


def _checked(store: Store, key: str, word: str, live: seglog.LiveObject) -> bytes:
    try:
        blob = store.get(key)
    except ObjectNotFound:
        raise IntegrityError(f"{word} {live.id} ({key}) is live in the segment log but "
                             "missing from the store") from None
    if hashlib.sha256(blob).digest() != live.sha256:
        raise IntegrityError(f"{word} {live.id} ({key}) does not match the segment log "
                             "(altered or replaced in the store)")
    return blob
