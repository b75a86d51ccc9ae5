"""The label objects' part of `radcrypt check` (issue 17 labels, log object type 4).

Why a check of their own: a label object changes what a keyword search answers (an add
joins rows, a remove takes them out), so a label the cloud deleted, altered or swapped,
or one a broken writer committed for the wrong segment, silently changes search results
for "teaching" or "follow-up". ``radcrypt check`` must name each such object, never show
it as fine. For every LIVE label object (named by the verified segment log):

* present in the bucket (``missing``), with the SHA-256 its log entry names (``altered``);
* its structure parses (``damaged``), its MAC verifies under the index MAC key of its key
  version and its sealed labels open under that version's data key (``not
  authenticated``: forged, or copied from another repository, whose keys differ);
* its header agrees with the log (``mismatch``): the key version; the segment it names
  is a live segment of that key version, with the row count the header says; every
  image its sealed part names is a row of that segment; the log's count is the number
  of images it names.

A live label naming a segment that a rewrite replaced AFTER the label's writer read the
log (compaction between the read and the commit: labels.py labels those images again in
the new segment) applies to no row: it is a note, not a problem. A label naming a segment
this log never held, or one already gone when its writer read the log, is a problem.

Label objects no live entry names are strays (``stray``), checked like stray segments:
parsed and opened with the repository's keys (a crashed label change of a member writes
authentic ones; gc deletes them past its grace period). Nothing here writes the bucket.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from app.core import labels as label_store
from app.core.errors import IntegrityError
from app.core.repository import Repository
from cloud import layout, seglog
from cloud.backend import ObjectNotFound, Store
from cloud.seglog_format import TYPE_LABEL, TYPE_SEGMENT
from crypto import labels as label_format
from crypto.errors import DecryptionError, FormatError
from crypto.segment_mac import index_mac_key

__all__ = ["TYPE_LABEL", "Finding", "LabelChecker", "check_live_labels"]


@dataclass(frozen=True)
class Finding:
    """One thing wrong with a live label object: ``kind`` is one of repo_check's problem
    kinds ("missing", "altered", "damaged", "not authenticated", "mismatch"), or "note"
    for what is worth saying but not wrong."""

    kind: str
    label_id: str
    detail: str
    sequence: int | None


class LabelChecker:
    """Checks the label objects of one repository against its verified log."""

    def __init__(self, store: Store, repo: Repository, state: seglog.LogState) -> None:
        self.store = store
        self.repo = repo
        self.state = state
        self._rows: dict[str, list[str] | str] = {}  # segment id -> ids, or why not read

    def _keys(self, version: int) -> tuple[bytes, bytes] | None:
        try:
            keys = self.repo.ring.version(version)
        except KeyError:
            return None
        return keys.data_key, index_mac_key(keys.data_key)

    def _segment_rows(self, seg_id: str) -> list[str] | str:
        """A live segment's image ids in row order (two range reads, cached), or the
        reason they could not be read (the segment check names that segment)."""
        if seg_id not in self._rows:
            try:
                self._rows[seg_id] = label_store.segment_ids(self.store, self.repo.repo_id,
                                                             seg_id)
            except IntegrityError as exc:
                self._rows[seg_id] = str(exc)
        return self._rows[seg_id]

    def check(self, live: seglog.LiveObject, listed: bool) -> list[Finding]:
        """What is wrong with one live label object (empty: it is whole)."""
        seq, name = live.added_at, layout.label_key(self.repo.repo_id, live.id)

        def found(kind: str, detail: str) -> list[Finding]:
            return [Finding(kind, live.id, detail, seq)]

        if not listed:
            return found("missing", "live in the segment log but not in the bucket "
                         "(deleted or withheld)")
        try:
            blob = self.store.get(name)
        except ObjectNotFound:
            return found("missing", "listed but gone when read")
        if hashlib.sha256(blob).digest() != live.sha256:
            return found("altered", "its SHA-256 is not the one its log entry names "
                         "(altered, truncated or replaced in the bucket)")
        try:
            label_format.LabelObject.from_bytes(blob, name)
        except FormatError as exc:
            return found("damaged", f"does not parse: {exc}")
        keys = self._keys(live.key_version)
        if keys is None:
            return found("note", f"key version {live.key_version} is not in this key ring: "
                         "its MAC and sealed labels were not checked")
        try:
            label, words = label_format.open_label(blob, name, repo_id=self.repo.repo_id,
                                                   data_key=keys[0], mac_key=keys[1])
        except (FormatError, DecryptionError) as exc:
            why = str(exc) or "authentication failed"
            return found("not authenticated", f"does not open under key version "
                         f"{live.key_version} of this repository ({why}): forged, or "
                         "copied from another repository")
        return self._against_log(live, label, words)

    def _against_log(self, live: seglog.LiveObject, label: label_format.LabelObject,
                     words: dict[str, list[str]]) -> list[Finding]:
        out: list[Finding] = []
        seq = live.added_at
        disagree: list[str] = []
        if label.key_version != live.key_version:
            disagree.append(f"key version {label.key_version}, the log says "
                            f"{live.key_version}")
        named = {i for ids in words.values() for i in ids}
        if len(named) != live.count:
            disagree.append(f"it names {len(named)} images, the log says {live.count}")
        segment = self.state.live.get((TYPE_SEGMENT, label.segment_id))
        if segment is None:
            gone = self.state.history.get((TYPE_SEGMENT, label.segment_id))
            if gone is not None and gone[0].added_at <= label.base_sequence < gone[1]:
                out.append(Finding("note", live.id, f"names segment {label.segment_id}, "
                                   f"replaced by log entry {gone[1]} after this label's "
                                   "writer read the log: it applies to no row (the images "
                                   "were labelled again in the new segment)", seq))
            else:
                disagree.append(f"names segment {label.segment_id}, which is not a live "
                                "segment of this repository (its rows are not these)")
        else:
            if segment.key_version != label.key_version:
                disagree.append(f"names segment {label.segment_id} of key version "
                                f"{segment.key_version}, the label is of key version "
                                f"{label.key_version}")
            if segment.count != label.row_count:
                disagree.append(f"says segment {label.segment_id} has {label.row_count} "
                                f"rows, the log says {segment.count}")
            rows = self._segment_rows(label.segment_id)
            if isinstance(rows, list):
                strangers = sorted(named - set(rows))
                if strangers:
                    disagree.append(f"names image {strangers[0]}"
                                    + (f" and {len(strangers) - 1} more" if len(strangers) > 1
                                       else "")
                                    + f", not a row of segment {label.segment_id}")
        if disagree:
            out.append(Finding("mismatch", live.id, "; ".join(disagree), seq))
        return out

    def stray_authentic(self, key: str, label_id: str) -> tuple[bool | None, str, int | None]:
        """(authentic, why, base sequence of its header) of a label object no live log
        entry names: None when gone or its key version is not in this key ring."""
        try:
            blob = self.store.get(key)
        except ObjectNotFound:
            return None, "gone when read", None
        try:
            parsed = label_format.LabelObject.from_bytes(blob, key)
        except FormatError as exc:
            return False, f"does not parse: {exc}", None
        keys = self._keys(parsed.key_version)
        if keys is None:
            return None, f"key version {parsed.key_version} is not in this key ring", \
                parsed.base_sequence
        try:
            label_format.open_label(blob, key, repo_id=self.repo.repo_id, data_key=keys[0],
                                    mac_key=keys[1])
        except (FormatError, DecryptionError) as exc:
            return False, str(exc) or "its sealed labels do not open", parsed.base_sequence
        return True, f"labels rows of segment {parsed.segment_id}", parsed.base_sequence


def check_live_labels(checker: LabelChecker, listing: dict[str, tuple[str, int]],
                      each: Callable[[int, int, str], None] | None = None) -> list[Finding]:
    """Every live label object of the log, checked (``each(done, total, label_id)`` after
    each one, for progress)."""
    live = checker.state.labels()
    out: list[Finding] = []
    for done, obj in enumerate(live, 1):
        out += checker.check(obj, obj.id in listing)
        if each is not None:
            each(done, len(live), obj.id)
    return out
