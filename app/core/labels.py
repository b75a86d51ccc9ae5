"""Labels a user adds to images after the import ("teaching", "follow-up"), searchable as
the keyword ``label=<word>`` (issue 17).

Why objects of their own: segments are immutable; a label change is a small object listed
in the segment log (crypto/labels.py has the format), naming rows of one live segment:
an ``add`` object, or a ``remove`` object (a tombstone) that takes the label off again.
The keyless service evaluates them with the same tokens as the segment dictionaries;
members read the words from the sealed part. Rewrites (compaction, erasure) fold a
segment's labels into ONE ``add`` object naming the new segment (``carry``), in the same
log entry that replaces the segment, and remove the old label objects with it.

API (H5's KeywordSearch calls these; ``writer`` is the member's Identity):

    label_add(store, settings, repo, writer, image_ids, word) -> LabelReport
    label_remove(store, settings, repo, writer, image_ids, word) -> LabelReport
    labels(store, settings, repo, image_id) -> list[str]          (sorted words)
    labels_of(store, settings, repo, image_ids) -> dict[str, list[str]]

A word is normalised as a description word (app/core/keywords.py ``words``): "Teaching"
and "teaching" are one label; a phrase gives one label per word.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from app.core import keyword_dicts, logstate
from app.core.errors import AccessDenied, IntegrityError
from app.core.keywords import QueryError, normalise
from app.core.repository import Repository, check_still_current, is_format2
from app.core.settings import Settings
from cloud import layout, seglog
from cloud.backend import ObjectNotFound, Store
from cloud.segments import HEADER_SIZE_V2, SegmentError, ids_range
from crypto import labels as label_format
from crypto.errors import DecryptionError, FormatError
from crypto.identity import Identity
from crypto.segment_mac import index_mac_key

MAX_ATTEMPTS = 4  # a compaction that replaces a labelled segment meanwhile: label again


@dataclass
class LabelReport:
    """What a label change wrote: the log sequences, the label objects, the images."""

    words: list[str] = field(default_factory=list)
    images: int = 0
    entries: list[int] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"words": list(self.words), "images": self.images,
                "entries": list(self.entries), "objects": list(self.objects)}


def label_words(word: str) -> list[str]:
    """The label words ``word`` stands for; ValueError in plain words when none."""
    try:
        found = normalise("label", word)
    except QueryError as exc:
        raise ValueError(str(exc)) from None
    if not found:
        raise ValueError(f"label {word!r} has nothing searchable (letters or digits, two "
                         "characters or more)")
    return sorted(set(found))


def _require_member(repo: Repository, writer: Identity) -> None:
    if not is_format2(repo.manifest):
        raise IntegrityError(f"repository {repo.repo_id} is in storage format 1: labels need "
                             "format 2 (radcrypt repo migrate --format 2)")
    if repo.manifest.member_version(writer.user_id) is None:
        raise AccessDenied(f"user {writer.user_id!r} is not a member of repository "
                           f"{repo.repo_id!r}: only members label its images")


def segment_ids(store: Store, repo_id: str, seg_id: str) -> list[str]:
    """The image ids of a live segment in row order, from two range reads (its header and
    its id section). Not authenticated by itself: a label built on a wrong row order names
    other rows, which members see (they read the sealed ids) and the MAC'd segment's
    readers never trust; the service only ever learns row positions."""
    name = layout.segment_key(repo_id, seg_id)
    try:
        offset, length = ids_range(store.get_range(name, 0, HEADER_SIZE_V2), seg_id)
        raw = store.get_range(name, offset, length)
    except (ObjectNotFound, SegmentError) as exc:
        raise IntegrityError(f"segment {seg_id} of repository {repo_id}, live in its log, "
                             f"cannot be read ({exc})") from None
    return [raw[i:i + 16].hex() for i in range(0, len(raw) - 15, 16)]


def _locate(store: Store, repo: Repository, state: seglog.LogState, version: int,
            image_ids: Collection[str]) -> dict[str, list[str]]:
    """seg_id -> its ids in row order, for the live segments of ``version`` holding one of
    ``image_ids``; IntegrityError naming an image no live segment holds."""
    found: dict[str, list[str]] = {}
    missing = set(image_ids)
    for live in state.segments(version):
        ids = segment_ids(store, repo.repo_id, live.id)
        if missing.intersection(ids):
            found[live.id] = ids
            missing -= set(ids)
        if not missing:
            break
    if missing:
        raise IntegrityError(f"image {sorted(missing)[0]} is not in any live segment of key "
                             f"version {version} of repository {repo.repo_id}")
    return found


def _keys(repo: Repository, version: int) -> tuple[bytes, bytes, bytes]:
    keys = repo.ring.version(version)
    return keys.data_key, keys.keyword_key, index_mac_key(keys.data_key)


def build(repo: Repository, version: int, seg_id: str, ids: list[str], op: int,
          labels: Mapping[str, Iterable[str]], base_sequence: int
          ) -> tuple[seglog.Added, bytes]:
    """A new label object naming rows of segment ``seg_id`` (its ids in row order), and
    its log item; ``base_sequence``: the head of the log the writer verified."""
    data_key, keyword_key, mac_key = _keys(repo, version)
    label_id = layout.new_id()
    blob = label_format.build_label(
        data_key=data_key, keyword_key=keyword_key, mac_key=mac_key, repo_id=repo.repo_id,
        key_version=version, label_id=label_id, segment_id=seg_id, segment_ids=ids, op=op,
        labels=labels, base_sequence=base_sequence)
    named = len({i for words in labels.values() for i in words})
    return (seglog.Added(keyword_dicts.TYPE_LABEL, label_id, hashlib.sha256(blob).digest(),
                         named), blob)


def read(store: Store, repo: Repository, live: seglog.LiveObject
         ) -> tuple[label_format.LabelObject, dict[str, list[str]]]:
    """A live label object, checked against the log, its MAC and its envelope."""
    blob = keyword_dicts.read_label_blob(store, repo.repo_id, live)
    data_key, _, mac_key = _keys(repo, live.key_version)
    try:
        label, words = label_format.open_label(blob, live.id, repo_id=repo.repo_id,
                                               data_key=data_key, mac_key=mac_key)
    except (FormatError, DecryptionError) as exc:
        raise IntegrityError(f"label {live.id} of repository {repo.repo_id} failed its "
                             f"integrity check ({exc})") from None
    if label.key_version != live.key_version:
        raise IntegrityError(f"label {live.id} of repository {repo.repo_id} is of key "
                             f"version {label.key_version}, the log says {live.key_version}")
    return label, words


def live_labels(state: seglog.LogState, version: int | None = None) -> list[seglog.LiveObject]:
    """The live label objects (of one key version, or all). Which segment each names, and
    the order they apply in, are inside the object: callers read them (``read``)."""
    wanted = [o for o in state.live.values() if o.type == keyword_dicts.TYPE_LABEL
              and (version is None or o.key_version == version)]
    return sorted(wanted, key=lambda o: (o.added_at, o.id))


def net_labels(store: Store, repo: Repository, state: seglog.LogState,
               seg_ids: Collection[str], version: int | None = None
               ) -> tuple[list[seglog.LiveObject], dict[str, set[str]]]:
    """(the live label objects naming ``seg_ids``, image id -> its label words now):
    adds and removes applied in order (crypto.labels.order_key)."""
    used: list[seglog.LiveObject] = []
    net: dict[str, set[str]] = {}
    targets = set(seg_ids)
    if not targets:
        return used, net
    opened = [(live, *read(store, repo, live)) for live in live_labels(state, version)]
    for live, label, words in sorted(opened, key=lambda item: label_format.order_key(item[1])):
        if label.segment_id not in targets:
            continue
        used.append(live)
        for word, ids in words.items():
            for image_id in ids:
                if label.op == label_format.OP_ADD:
                    net.setdefault(image_id, set()).add(word)
                else:
                    net.get(image_id, set()).discard(word)
    return used, {i: w for i, w in net.items() if w}


def carry(store: Store, repo: Repository, state: seglog.LogState, version: int,
          old_segments: Collection[str], new_seg_id: str, new_ids: list[str]
          ) -> tuple[list[tuple[seglog.Added, bytes]], list[seglog.Removed]]:
    """What a rewrite of ``old_segments`` into ``new_seg_id`` (rows ``new_ids``) adds and
    removes for labels: one ``add`` object with the net labels of the kept images (none
    if they have none), and every live label object naming an old segment. Erased
    images (not in ``new_ids``) lose their labels with their rows."""
    used, net = net_labels(store, repo, state, old_segments, version)
    removed = [seglog.Removed(keyword_dicts.TYPE_LABEL, o.id) for o in used]
    by_word: dict[str, list[str]] = {}
    kept = set(new_ids)
    for image_id, words in net.items():
        if image_id in kept:
            for word in words:
                by_word.setdefault(word, []).append(image_id)
    if not by_word:
        return [], removed
    return [build(repo, version, new_seg_id, new_ids, label_format.OP_ADD, by_word,
                  state.head.sequence)], removed


def carry_to_version(store: Store, repo: Repository, state: seglog.LogState, version: int,
                     new_seg_id: str, new_ids: list[str]) -> list[tuple[seglog.Added, bytes]]:
    """The revocation's copy (FORMAT-2 7.3 step 5): the labels the images ``new_ids`` have
    under the key versions below ``version`` (the newest such version's state of an image
    wins), as one ``add`` object of ``version`` naming ``new_seg_id``. The old label
    objects are removed with every other old object by the revocation's ``remove`` entry."""
    merged: dict[str, set[str]] = {}
    for old in sorted({o.key_version for o in live_labels(state) if o.key_version < version}):
        _, net = net_labels(store, repo, state, [s.id for s in state.segments(old)], old)
        merged.update(net)
    by_word: dict[str, list[str]] = {}
    for image_id in new_ids:
        for word in merged.get(image_id, ()):
            by_word.setdefault(word, []).append(image_id)
    if not by_word:
        return []
    return [build(repo, version, new_seg_id, new_ids, label_format.OP_ADD, by_word,
                  state.head.sequence)]


def _change(store: Store, settings: Settings | None, repo: Repository, writer: Identity,
            image_ids: Iterable[str], word: str, op: int, lock: bool) -> LabelReport:
    _require_member(repo, writer)
    words = label_words(word)
    wanted = sorted(set(image_ids))
    if not wanted:
        raise ValueError("label: no image named")
    report = LabelReport(words=words, images=len(wanted))
    if lock:
        # A shared lock, as an import: a compaction (exclusive) never runs meanwhile, so
        # it never folds a segment's labels while a change to them is being committed.
        from app.core.locks import shared

        with shared(store, repo, writer):
            return _commit(store, settings, repo, writer, wanted, words, op, report)
    return _commit(store, settings, repo, writer, wanted, words, op, report)


def _commit(store: Store, settings: Settings | None, repo: Repository, writer: Identity,
            wanted: list[str], words: list[str], op: int, report: LabelReport
            ) -> LabelReport:
    state = logstate.verified_log(store, settings, repo)
    todo = set(wanted)
    for _attempt in range(MAX_ATTEMPTS):
        manifest = check_still_current(store, repo)
        version = manifest.key_version
        located = _locate(store, repo, state, version, todo)
        new = [build(repo, version, seg_id, ids, op,
                     {w: sorted(todo.intersection(ids)) for w in words}, state.head.sequence)
               for seg_id, ids in sorted(located.items())]
        for item, blob in new:
            store.put(layout.label_key(repo.repo_id, item.id), blob, if_absent=True)
        trust = logstate.repository_trust(store, repo)
        try:
            state = seglog.append(store, repo.repo_id, writer, writer.user_id, trust, state,
                                  kind=seglog.KIND_ADD, reason=seglog.REASON_LABEL,
                                  key_version=version,
                                  added=sorted((a for a, _ in new), key=lambda a: a.id))
        except (seglog.LogError, FormatError) as exc:
            for item, _ in new:
                store.delete(layout.label_key(repo.repo_id, item.id))
            raise IntegrityError(f"repository {repo.repo_id}: the segment log refused the "
                                 f"label entry: {exc}") from None
        if settings is not None:
            logstate.remember_head(settings, repo.repo_id, state.head)
        report.entries.append(state.head.sequence)
        report.objects += [a.id for a, _ in new]
        # A rewrite that replaced a target segment between our read and our entry did not
        # carry this label (it was not in the log yet): label those images again.
        gone = {s for s in located if (seglog.TYPE_SEGMENT, s) not in state.live}
        todo = {i for s in gone for i in located[s] if i in todo}
        if not todo:
            return report
        state = logstate.verified_log(store, settings, repo, since=state)
    raise IntegrityError(f"repository {repo.repo_id}: the labelled segments were rewritten "
                         f"{MAX_ATTEMPTS} times during the change; run it again")


def label_add(store: Store, settings: Settings | None, repo: Repository, writer: Identity,
              image_ids: Iterable[str], word: str, *, lock: bool = True) -> LabelReport:
    """Label ``image_ids`` with ``word`` (one log entry; any member). locks.LockConflict
    while a compaction or gc runs (``lock`` False: the caller holds a lock)."""
    return _change(store, settings, repo, writer, image_ids, word, label_format.OP_ADD,
                   lock)


def label_remove(store: Store, settings: Settings | None, repo: Repository,
                 writer: Identity, image_ids: Iterable[str], word: str, *,
                 lock: bool = True) -> LabelReport:
    """Take ``word`` off ``image_ids``: a tombstone object (one log entry; any member).
    Locking as ``label_add``."""
    return _change(store, settings, repo, writer, image_ids, word, label_format.OP_REMOVE,
                   lock)


def labels_of(store: Store, settings: Settings | None, repo: Repository,
              image_ids: Iterable[str]) -> dict[str, list[str]]:
    """image id -> its label words now (sorted; [] without labels), current key version."""
    wanted = set(image_ids)
    state = logstate.verified_log(store, settings, repo)
    version = repo.manifest.key_version
    if not live_labels(state, version):
        return {i: [] for i in wanted}
    located = _locate(store, repo, state, version, wanted)
    _, net = net_labels(store, repo, state, set(located), version)
    return {i: sorted(net.get(i, ())) for i in wanted}


def labels(store: Store, settings: Settings | None, repo: Repository, image_id: str
           ) -> list[str]:
    """The label words of one image now."""
    return labels_of(store, settings, repo, [image_id])[image_id]
