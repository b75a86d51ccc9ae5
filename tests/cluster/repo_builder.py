"""A format-2 repository written at the bucket level with the real modules, as in
tests/test_repo_index_log.py: an owner signs the manifest, the user records and the
genesis entry; a member writes version-2 segments and appends their log entries. Small and
fast (no image, no feature extraction), so the cluster tests spend their time on Ray.

Keyword search (issue 17): a segment may carry its keyword dictionary (crypto/sse.py,
the importer's), label objects (crypto/labels.py, app/core/labels.py's) add or remove a
``label=<word>`` keyword on rows of one segment, and ``keyword_query`` makes the tokens a
member would send. The plaintext keywords are kept (``keywords``) for the truth."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cloud import layout, seglog
from cloud.directory_store import DirectoryStore
from cloud.keyword_index import TokenClause, TokenQuery
from cloud.log_trust import MANIFEST_FORMAT_V2, service_trust
from cloud.segments import encode_segment_v2
from crypto.identity import Identity
from crypto.index import IndexKey
from crypto.labels import OP_ADD, OP_REMOVE, build_label
from crypto.segment_mac import index_mac_key
from crypto.signed import sign_json
from crypto.sse import build_dictionary, keyword_token
from crypto.tokens import QueryToken

DIM = 16
DATA_KEY = bytes(range(32))
MAC_KEY = index_mac_key(DATA_KEY)
KEYWORD_KEY = bytes(range(32, 64))


@dataclass
class BucketRepo:
    store: DirectoryStore
    repo_id: str
    key: IndexKey
    owner: Identity
    member: Identity
    state: seglog.LogState
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # image id -> plaintext row
    segments: dict[str, list[str]] = field(default_factory=dict)  # segment -> ids, row order
    # segment -> keyword -> rows (segments written with a dictionary only)
    keywords: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    @classmethod
    def create(cls, root: Path, repo_id: str, seed: int = 0, dim: int = DIM,
               sample: np.ndarray | None = None) -> BucketRepo:
        """``sample``: plaintext rows the key's basis is fitted on (default: Gaussian);
        ``dim`` > 16 gets the product's default bound levels (crypto.index)."""
        rng = np.random.default_rng(seed)
        sample = rng.normal(size=(200, dim)) if sample is None else sample
        key = IndexKey.generate(dim, sample=sample)
        owner, member = Identity.generate("Owner", "owner"), Identity.generate("Member", "member")
        root.mkdir(parents=True, exist_ok=True)
        store = DirectoryStore(root)
        for user in (owner, member):
            name = layout.user_key(user.user_id)
            store.put(name, sign_json(owner, "user", name, {"card": user.card().to_json()}))
        manifest = {"repo_id": repo_id, "extractor": "radcrypt-v1", "dim": dim,
                    "levels": list(key.levels),
                    "key_version": 1, "created": "2026-11-27T00:00:00+00:00",
                    "scheme": "test", "format": MANIFEST_FORMAT_V2, "sequence": 1,
                    "owner": owner.user_id,
                    "members": [{"user_id": u.user_id, "key_version": 1}
                                for u in (owner, member)]}
        name = layout.manifest_key(repo_id)
        store.put(name, sign_json(owner, "manifest", name, manifest))
        state = seglog.write_genesis(store, repo_id, owner, owner.user_id, 1, 1)
        return cls(store, repo_id, key, owner, member, state)

    def add(self, data: np.ndarray, keywords: Mapping[str, Sequence[int]] | None = None,
            ids: Sequence[str] | None = None, ckks: bytes | None = None
            ) -> tuple[str, list[str]]:
        """An import batch: a segment, its pack, the log entry committing them.
        ``keywords``: keyword -> rows holding it (the segment's dictionary; None: a
        segment written without one); ``ids``: the images' ids (default: new ones);
        ``ckks``: the segment's CKKS block of these rows (a ckks repository)."""
        seg_id = layout.new_id()
        ids = list(ids) if ids is not None else [layout.new_id() for _ in range(len(data))]
        dictionary = None if keywords is None else build_dictionary(
            KEYWORD_KEY, self.repo_id, 1, seg_id, keywords)
        blob = encode_segment_v2(ids, self.key.encrypt(data), 1, seg_id=seg_id,
                                 writer=self.member.user_id,
                                 base_sequence=self.state.head.sequence,
                                 repo_id=self.repo_id, mac_key=MAC_KEY, dictionary=dictionary,
                                 ckks=ckks)
        self.store.put(layout.segment_key(self.repo_id, seg_id), blob)
        pack_id, pack = layout.new_id(), b"pack of " + seg_id.encode()
        self.store.put(layout.pack_key(self.repo_id, pack_id), pack)
        self._commit(seglog.REASON_IMPORT, [
            seglog.Added(seglog.TYPE_SEGMENT, seg_id, hashlib.sha256(blob).digest(), len(ids)),
            seglog.Added(seglog.TYPE_PACK, pack_id, hashlib.sha256(pack).digest(), len(ids))])
        self.rows.update(zip(ids, data, strict=True))
        self.segments[seg_id] = ids
        if keywords is not None:
            self.keywords[seg_id] = {w: sorted(set(rows)) for w, rows in keywords.items()}
        return seg_id, ids

    def label(self, seg_id: str, image_ids: Sequence[str], word: str,
              remove: bool = False) -> str:
        """Add (or, ``remove``, take away) the keyword ``label=<word>`` on images of one
        segment: a label object and the log entry listing it."""
        label_id = layout.new_id()
        blob = build_label(data_key=DATA_KEY, keyword_key=KEYWORD_KEY, mac_key=MAC_KEY,
                           repo_id=self.repo_id, key_version=1, label_id=label_id,
                           segment_id=seg_id, segment_ids=self.segments[seg_id],
                           op=OP_REMOVE if remove else OP_ADD, labels={word: list(image_ids)},
                           base_sequence=self.state.head.sequence)
        self.store.put(layout.label_key(self.repo_id, label_id), blob)
        self._commit(seglog.REASON_LABEL, [seglog.Added(
            seglog.TYPE_LABEL, label_id, hashlib.sha256(blob).digest(), len(set(image_ids)))])
        return label_id

    def _commit(self, reason: int, added: list[seglog.Added]) -> None:
        """The member's log entry adding ``added`` (key version 1)."""
        trust = service_trust(self.store, self.repo_id, [self.owner.sign_public])
        assert trust is not None
        self.state = seglog.append(
            self.store, self.repo_id, self.member, self.member.user_id, trust, self.state,
            kind=seglog.KIND_ADD, reason=reason, key_version=1, added=added, removed=[])

    def keyword_query(self, *clauses: tuple[Sequence[str], bool]) -> bytes:
        """The RCKQ bytes of AND(clauses), each (keywords OR-ed, negated)."""
        return TokenQuery(tuple(
            TokenClause(tuple(keyword_token(KEYWORD_KEY, self.repo_id, 1, w) for w in words),
                        negated) for words, negated in clauses)).to_bytes()

    def token(self, queries: np.ndarray) -> QueryToken:
        return self.key.query(queries)

    def live_segments(self) -> list[str]:
        return sorted(obj.id for obj in self.state.segments())
