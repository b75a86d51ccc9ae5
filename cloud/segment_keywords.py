"""Keyless reader of a repository's keyword dictionaries: each live segment's own
dictionary and the live label objects naming it (issue 17).

Why in cloud/: the search service holds no key and must find, for a token, the rows of
each segment with the keyword, labels applied. This module says where everything is and
in which order it applies; the boolean evaluation stays in cloud/keyword_index.py. It
reads whole objects and checks each against the SHA-256 the verified log names: a
reference the service's own loading (cloud/segment_download.py) can mirror.

* A segment's dictionary is inside the segment's MAC'd body (cloud/segments.py,
  ``Segment.dictionary``), SSE-bound to the segment's own id.
* A label object (crypto/labels.py, log type 4, ``labels/<label_id>``) names rows of
  one segment and is SSE-bound to the label's id. For one token: the segment's rows,
  then each live label object naming that segment in the order
  ``crypto.labels.order_key`` (base_sequence, label_id) — NOT the log's added_at, which
  a verifier starting from a checkpoint loses: an add joins its rows, a remove takes
  them out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from cloud import layout, seglog
from cloud.backend import Store
from cloud.keyword_index import SegmentKeywords
from cloud.segments import Segment, decode_segment
from crypto.errors import FormatError
from crypto.labels import LabelObject, apply_labels, order_key
from crypto.sse import KeywordToken

U32 = NDArray[np.uint32]
TYPE_LABEL = getattr(seglog, "TYPE_LABEL", 4)


@dataclass
class SegmentView:
    """One live segment as keyword search sees it. ``base`` None: a segment written
    before keyword search (no dictionary: no keyword answer possible there)."""

    seg_id: str
    key_version: int
    ids: list[str]
    base: SegmentKeywords | None
    labels: list[tuple[int, SegmentKeywords]] = field(default_factory=list)  # (op, dict)

    def rows(self, token: KeywordToken) -> U32:
        """Rows holding the token's keyword, labels applied (increasing)."""
        base = self.base.rows(token) if self.base is not None else np.zeros(0, np.uint32)
        if not self.labels:
            return base
        return apply_labels(base, ((op, d.rows(token)) for op, d in self.labels))

    def image_ids(self, token: KeywordToken) -> list[str]:
        return [self.ids[int(r)] for r in self.rows(token)]


def _get(store: Store, key: str, live: seglog.LiveObject) -> bytes:
    blob = store.get(key)
    if hashlib.sha256(blob).digest() != live.sha256:
        raise FormatError(f"{key} does not match the segment log")
    return blob


def segment_view(segment: Segment, repo_id: str,
                 labels: list[tuple[seglog.LiveObject, LabelObject]]) -> SegmentView:
    """The view of a decoded segment and the live label objects (with their log items)
    that name it; labels naming another segment are ignored."""
    seg_id = segment.seg_id or ""
    base = None
    dictionary = getattr(segment, "dictionary", None)
    if dictionary is not None:
        base = SegmentKeywords.load(bytes(dictionary), repo_id, seg_id, segment.key_version,
                                    len(segment))
    mine = sorted(((live, obj) for live, obj in labels if obj.segment_id == seg_id),
                  key=lambda item: order_key(item[1]))
    views = []
    for _live, obj in mine:
        if obj.key_version != segment.key_version or obj.row_count != len(segment):
            raise FormatError(f"label {obj.label_id} does not fit segment {seg_id}")
        views.append((obj.op, SegmentKeywords.load(obj.dictionary, repo_id, obj.label_id,
                                                   obj.key_version, obj.row_count)))
    return SegmentView(seg_id, segment.key_version, segment.id_strings(), base, views)


def segment_dictionaries(store: Store, state: seglog.LogState, key_version: int
                         ) -> list[SegmentView]:
    """Every live segment of ``key_version`` with its dictionary and labels, read whole
    from ``store`` and checked against the log ``state`` (verified by the caller)."""
    repo_id = state.repo_id
    labels = []
    for live in state.live.values():
        if live.type == TYPE_LABEL and live.key_version == key_version:
            key = layout.label_key(repo_id, live.id)
            labels.append((live, LabelObject.from_bytes(_get(store, key, live), key)))
    views = []
    for live in state.segments(key_version):
        key = layout.segment_key(repo_id, live.id)
        segment = decode_segment(store.get(key), live.id, expected_sha256=live.sha256)
        views.append(segment_view(segment, repo_id, labels))
    return views
