"""Keyless side of the CKKS search mode (issue 19): where the blocks and evaluation keys are,
how the service checks them, and the scorer it keeps per repository key version.

Why here and not in cloud/service.py: the service only routes; what it reads (a segment's
CKKS block section, cloud/segments.py FLAG_CKKS; the evaluation-keys object of a key
version) and how it checks it without a key lives in one place that the client's writer
(app/core/ckks_blocks.py) mirrors.

Evaluation-keys object, ``repos/<repo>/ckks/<key version>`` (one per key version, written
create-if-absent by the first writer of that version), big-endian::

    0   4  magic "RCEK"     4 u8 version (1)   5 3 reserved (0)   8 u32 key version
    12  32 SHA-256 of the body
    44  32 HMAC-SHA256 under the index MAC key of the key version over
           LP("radcrypt/ckks-eval-keys/v1") || LP(repo id) || LP("eval-keys") || bytes 0..43
    76  .. body: crypto/ckks.py's RCKK evaluation keys (relinearisation, Galois)

A member authenticates the 76-byte head (one range read) and sends the body's SHA-256 in
its signed request; the keyless service loads the body only when its SHA-256 equals both
the head's and the request's. An altered body, or a head moved from another repository or
version, is refused (never used): by the service (digest) or by the client (MAC).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cloud import layout
from cloud.backend import ObjectNotFound, Store
from cloud.ckks_engine import CkksScorer, workers_for
from cloud.segments import ID_SIZE, SegmentError, decode_segment
from cloud.wire import segment_set_digest
from crypto import ckks
from crypto.errors import FormatError

EVAL_MAGIC = b"RCEK"
EVAL_VERSION = 1
EVAL_HEAD = struct.Struct(">4sB3sI32s32s")
EVAL_HEAD_SIZE = EVAL_HEAD.size  # 76
EVAL_LABEL = b"radcrypt/ckks-eval-keys/v1"
ROUTE = "ckks"  # /v2/repos/<repo>/ckks
REQUEST_MAGIC = b"RCKQ"
ANSWER_MAGIC = b"RCKA"
_loads = itertools.count(1)  # names every block load (CkksScorers)


def eval_keys_key(repo_id: str, key_version: int) -> str:
    """The bucket key of a key version's evaluation keys."""
    return layout.repo_prefix(repo_id) + f"ckks/{layout.validate_key_version(key_version)}"


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def eval_mac(mac_key: bytes, repo_id: str, head: bytes) -> bytes:
    """The MAC of an evaluation-keys object's first 44 bytes (associated data: repository,
    kind, key version, which the head carries)."""
    return hmac.new(mac_key, _lp(EVAL_LABEL) + _lp(repo_id.encode()) + _lp(b"eval-keys")
                    + head[:44], hashlib.sha256).digest()


def build_eval_object(mac_key: bytes, repo_id: str, key_version: int, body: bytes) -> bytes:
    digest = hashlib.sha256(body).digest()
    head = struct.pack(">4sB3sI32s", EVAL_MAGIC, EVAL_VERSION, b"\0\0\0", key_version, digest)
    return head + eval_mac(mac_key, repo_id, head) + body


@dataclass(frozen=True)
class EvalHead:
    key_version: int
    digest: bytes
    mac: bytes


def parse_eval_head(data: bytes, what: str) -> EvalHead:
    if len(data) < EVAL_HEAD_SIZE:
        raise FormatError(f"{what} is too short for a CKKS evaluation-keys object")
    magic, version, reserved, key_version, digest, mac = EVAL_HEAD.unpack_from(data)
    if magic != EVAL_MAGIC or version != EVAL_VERSION or reserved != b"\0\0\0":
        raise FormatError(f"{what} is not a CKKS evaluation-keys object")
    return EvalHead(int(key_version), bytes(digest), bytes(mac))


def eval_body(data: bytes, what: str, key_version: int, wanted: bytes) -> bytes:
    """The body of an evaluation-keys object, refused unless its SHA-256 equals the head's
    and ``wanted`` (what the client authenticated) and the head names ``key_version``."""
    head = parse_eval_head(data, what)
    body = data[EVAL_HEAD_SIZE:]
    if head.key_version != key_version:
        raise FormatError(f"{what} names key version {head.key_version}, not {key_version}")
    digest = hashlib.sha256(body).digest()
    if not (hmac.compare_digest(digest, head.digest) and hmac.compare_digest(digest, wanted)):
        raise FormatError(f"{what} does not match the digest the client authenticated "
                          "(altered or replaced in the store): not used")
    return body


# --- the request and the answer (binary, behind the signed-request gate) ----------------


def encode_request(key_version: int, min_head: int, eval_digest: bytes, query: bytes) -> bytes:
    head = json.dumps({"key_version": key_version, "min_head": min_head,
                       "eval_sha256": eval_digest.hex()}, separators=(",", ":")).encode()
    return REQUEST_MAGIC + struct.pack(">I", len(head)) + head + query


def _split(data: bytes, magic: bytes, what: str) -> tuple[dict[str, Any], bytes]:
    if len(data) < 8 or data[:4] != magic:
        raise FormatError(f"{what} is not a CKKS search {what.split()[-1]}")
    (size,) = struct.unpack_from(">I", data, 4)
    if size > 1 << 24 or 8 + size > len(data):
        raise FormatError(f"{what} is truncated")
    try:
        head = json.loads(data[8 : 8 + size])
    except ValueError:
        raise FormatError(f"{what} has a malformed header") from None
    if not isinstance(head, dict):
        raise FormatError(f"{what} has a malformed header")
    return head, data[8 + size :]


@dataclass(frozen=True)
class CkksRequest:
    key_version: int
    min_head: int
    eval_digest: bytes
    query: bytes


def decode_request(data: bytes) -> CkksRequest:
    head, query = _split(data, REQUEST_MAGIC, "the CKKS request")
    try:
        version, min_head = int(head["key_version"]), int(head["min_head"])
        digest = bytes.fromhex(str(head["eval_sha256"]))
    except (KeyError, TypeError, ValueError):
        raise FormatError("the CKKS request's header lacks a field") from None
    if len(digest) != 32 or version < 1 or min_head < 0:
        raise FormatError("the CKKS request's header has a field out of range")
    return CkksRequest(version, min_head, digest, query)


@dataclass(frozen=True)
class CkksAnswer:
    """One CKKS answer (docs/FORMAT-2.md 8.4). ``id_bytes`` holds each segment's image ids
    as raw 16-byte ids, concatenated in row order: what the answer carries on the wire, so
    a shard sends, the front merges and the service encodes them without making a Python
    string per id (at a million ids per shard, tens of MB of strings per query).
    ``image_ids`` gives them as hex strings, for the client."""

    key_version: int
    head_sequence: int
    head_hash: bytes
    set_digest: bytes
    segment_ids: list[str]
    counts: list[int]
    id_bytes: list[bytes]  # per segment, 16 bytes an id, row order
    engine_us: int
    scores: bytes

    @property
    def segments(self) -> int:
        return len(self.segment_ids)

    @property
    def image_ids(self) -> list[list[str]]:
        """Per segment, the image ids as 32-hex-character strings, row order."""
        return [[raw[i : i + ID_SIZE].hex() for i in range(0, len(raw), ID_SIZE)]
                for raw in self.id_bytes]


def _eval_keys_missing(key_version: int, name: str) -> FormatError:
    return FormatError(f"the CKKS evaluation keys of key version {key_version} ({name}) "
                       "are missing from the store")


def ids_from_hex(image_ids: list[list[str]]) -> list[bytes]:
    """``id_bytes`` of per-segment lists of 32-hex-character ids (tests, callers that hold
    strings); ValueError on an id that is not 16 bytes of hex."""
    out = []
    for seg in image_ids:
        raw = b"".join(bytes.fromhex(i) for i in seg)
        if len(raw) != ID_SIZE * len(seg):
            raise ValueError("an image id is not 32 hex characters")
        out.append(raw)
    return out


def encode_answer(answer: CkksAnswer) -> bytes:
    head = json.dumps({
        "key_version": answer.key_version, "head_sequence": answer.head_sequence,
        "head_hash": answer.head_hash.hex(), "set_digest": answer.set_digest.hex(),
        "segment_ids": answer.segment_ids, "counts": answer.counts,
        "engine_us": answer.engine_us}, separators=(",", ":")).encode()
    size = sum(len(raw) for raw in answer.id_bytes)
    return b"".join([ANSWER_MAGIC, struct.pack(">I", len(head)), head, struct.pack(">Q", size),
                     *answer.id_bytes, answer.scores])


def decode_answer(data: bytes) -> CkksAnswer:
    head, rest = _split(data, ANSWER_MAGIC, "the CKKS answer")
    try:
        counts = [int(c) for c in head["counts"]]
        seg_ids = [str(s) for s in head["segment_ids"]]
        (size,) = struct.unpack_from(">Q", rest)
    except (KeyError, TypeError, ValueError, struct.error):
        raise FormatError("the CKKS answer's header lacks a field") from None
    if len(counts) != len(seg_ids) or size != ID_SIZE * sum(counts) or 8 + size > len(rest):
        raise FormatError("the CKKS answer's image ids do not match its counts")
    raw, at, ids = rest[8 : 8 + size], 0, []
    for count in counts:
        ids.append(raw[at : at + ID_SIZE * count])
        at += ID_SIZE * count
    try:
        return CkksAnswer(int(head["key_version"]), int(head["head_sequence"]),
                          bytes.fromhex(head["head_hash"]), bytes.fromhex(head["set_digest"]),
                          seg_ids, counts, ids, int(head["engine_us"]), rest[8 + size :])
    except (KeyError, TypeError, ValueError):
        raise FormatError("the CKKS answer's header lacks a field") from None


# --- the service's side ------------------------------------------------------------------


@dataclass(frozen=True)
class _Held:
    """One segment the scorer holds the block of: its row count and image ids, under the
    SHA-256 the verified log named when it was read (None: no log, never reused). ``tag``
    names its block in the scorer: a reload gets a new one, so the scorer never keeps the
    block it replaces. The block's bytes are not kept here (the workers hold it loaded;
    keeping the bytes too would double the memory: about 30 MB per 4,096 images)."""

    seg_id: str
    sha256: bytes | None
    count: int
    ids: bytes  # 16 bytes an id, row order (what the answer carries)
    tag: tuple[str, int]


@dataclass
class _Version:
    """What the service holds for one repository key version. ``lock`` serialises its
    updates and queries (a query scores exactly the blocks of its snapshot)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    key: tuple[Any, ...] | None = None          # (segment ids with SHA-256, eval digest)
    eval_digest: bytes | None = None
    eval_body: bytes = b""
    scorer: CkksScorer | None = None
    held: dict[str, _Held] = field(default_factory=dict)
    covered: list[_Held] = field(default_factory=list)  # of ``key``, sorted by segment id

    def drop(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
        self.scorer, self.key, self.eval_digest, self.eval_body = None, None, None, b""
        self.held, self.covered = {}, []


class CkksScorers:
    """One CkksScorer per repository key version, kept in step with the live segment set:
    a segment that joins the set costs one segment read and one block load, one that
    leaves it is dropped, and every other block stays loaded (a block is reused only
    under the SHA-256 the verified log names for it now: a segment whose digest changed
    is read again, never served stale). A set that wants more worker processes gets them
    started empty, for the blocks that join next. Only new evaluation keys, or a set that
    first outgrows the in-process scorer, rebuild the scorer, reading the held segments
    again: their bytes are not kept here (the scorer holds each block loaded, once)."""

    def __init__(self, store: Store, workers: int | None = None) -> None:
        self.store = store
        self.workers = workers
        self._versions: dict[tuple[str, int], _Version] = {}
        self._lock = threading.Lock()
        self._closed = False  # a warm-up that ends after close loads nothing more
        self.warmed: dict[tuple[str, int], int] = {}  # blocks ``warm`` loaded (metrics, tests)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            held, self._versions = list(self._versions.values()), {}
        for item in held:
            with item.lock:
                item.drop()

    def __enter__(self) -> CkksScorers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def answer(self, repo_id: str, log: Any, seg_ids: list[str], head: int, head_hash: bytes,
               req: CkksRequest) -> CkksAnswer:
        """Encrypted scores of every live segment of ``req.key_version`` that carries a
        CKKS block (``seg_ids``: the snapshot's searched segments of that version; ``log``:
        the verified log state naming each segment's SHA-256). A segment without a block
        is left out of the covered set, so the client's completeness check reports it."""
        started = time.perf_counter()
        with self._lock:
            slot = self._versions.setdefault((repo_id, req.key_version), _Version())
        with slot.lock:
            covered = self._update(slot, repo_id, log, seg_ids, req)
            assert slot.scorer is not None
            scores = (slot.scorer.scores(req.query, [h.tag for h in covered]) if covered
                      else ckks.pack_parts(ckks.KIND_SCORES, 0, 0, []))
        kept = [h.seg_id for h in covered]
        return CkksAnswer(req.key_version, head, head_hash,
                          segment_set_digest(repo_id, req.key_version, kept),
                          kept, [h.count for h in covered], [h.ids for h in covered],
                          round((time.perf_counter() - started) * 1e6), scores)

    def warm(self, repo_id: str, log: Any, seg_ids: list[str], key_version: int) -> int:
        """Load, before any request, the blocks of ``seg_ids`` (the live segments of
        ``key_version``) with the evaluation keys the store holds for that version now, so
        that a first query finds them loaded (a cluster shard after a start: its first
        CKKS request would otherwise load every block and could pass the front's deadline).
        Sound without the client's word: the keys are taken under the SHA-256 their own
        head names, and a request is answered with them only when it names that same
        SHA-256 (``_update``); a request naming other keys (these were replaced or
        altered) rebuilds from its own, as without warming. The number of blocks held;
        FormatError when the version has no readable evaluation keys (nothing loaded)."""
        name = eval_keys_key(repo_id, key_version)
        try:
            head = parse_eval_head(self.store.get_range(name, 0, EVAL_HEAD_SIZE), name)
        except ObjectNotFound:
            raise _eval_keys_missing(key_version, name) from None
        req = CkksRequest(key_version, 0, head.digest, b"")
        with self._lock:
            if self._closed:  # the layout was dropped meanwhile: start no worker for it
                return 0
            slot = self._versions.setdefault((repo_id, key_version), _Version())
        with slot.lock:
            if slot.scorer is not None:  # a request came first: it holds what it needs
                return len(slot.covered)
            held = len(self._update(slot, repo_id, log, seg_ids, req))
        self.warmed[repo_id, key_version] = held
        return held

    def _update(self, slot: _Version, repo_id: str, log: Any, seg_ids: list[str],
                req: CkksRequest) -> list[_Held]:
        """Bring ``slot`` to the request's segment set and evaluation keys; the covered
        segments, sorted by id. Called with ``slot.lock`` held."""
        sha = {o.id: o.sha256 for o in log.segments(req.key_version)} if log else {}
        wanted = sorted(set(seg_ids))
        key = (tuple((s, sha.get(s)) for s in wanted), req.eval_digest)
        if slot.key == key and slot.scorer is not None:
            return slot.covered
        new_keys = slot.eval_digest != req.eval_digest or slot.scorer is None
        body = self._eval_body(repo_id, req) if new_keys else slot.eval_body
        covered: list[_Held] = []
        fresh: dict[str, bytes] = {}  # blocks read now
        for seg_id in wanted:  # read only what is not held under the log's digest now
            known = slot.held.get(seg_id)
            if known is not None and known.sha256 is not None \
                    and known.sha256 == sha.get(seg_id):
                covered.append(known)
                continue
            loaded = self._load(repo_id, seg_id, sha.get(seg_id), req.key_version)
            if loaded is not None:
                covered.append(loaded[0])
                fresh[seg_id] = loaded[1]
        try:
            covered = self._rescore(slot, repo_id, req.key_version, body, new_keys,
                                    covered, fresh)
        except BaseException:
            slot.drop()  # a worker died mid-update: start clean at the next query
            raise
        slot.key, slot.eval_digest, slot.eval_body = key, req.eval_digest, body
        slot.held = {h.seg_id: h for h in covered}
        slot.covered = covered
        return covered

    def _rescore(self, slot: _Version, repo_id: str, version: int, body: bytes,
                 new_keys: bool, covered: list[_Held], fresh: dict[str, bytes]
                 ) -> list[_Held]:
        """Give ``slot`` a scorer holding exactly ``covered`` (``fresh``: the blocks just
        read), and return what it holds. The old scorer is told what left and what
        joined (and grows its worker processes when the set wants more); a new one is
        built only for new evaluation keys or to leave this process for workers, reading
        the held segments again (their bytes are not kept)."""
        old = slot.scorer
        target = workers_for(len(covered), self.workers)
        if old is not None and not new_keys and not (old.workers == 1 and target > 1):
            now = {h.tag for h in covered}
            old.remove([t for t in old.tags if t not in now])
            if target > old.workers:
                old.grow(target)
            old.add([(h.tag, fresh[h.seg_id]) for h in covered if h.seg_id in fresh])
            return covered
        kept, blocks = [], []
        for held in covered:
            block = fresh.get(held.seg_id)
            if block is None:
                again = self._load(repo_id, held.seg_id, held.sha256, version)
                if again is None:
                    continue  # gone or changed meanwhile: not covered
                held, block = again
            kept.append(held)
            blocks.append(block)
        slot.scorer = CkksScorer(body, blocks, workers=self.workers,
                                 tags=[h.tag for h in kept])
        if old is not None:
            old.close()
        return kept

    def _eval_body(self, repo_id: str, req: CkksRequest) -> bytes:
        name = eval_keys_key(repo_id, req.key_version)
        try:
            blob = self.store.get(name)
        except ObjectNotFound:
            raise _eval_keys_missing(req.key_version, name) from None
        return eval_body(blob, name, req.key_version, req.eval_digest)

    def _load(self, repo_id: str, seg_id: str, sha256: bytes | None, key_version: int
              ) -> tuple[_Held, bytes] | None:
        """One segment's block and what is held of it, None when it is not covered
        (missing, not the log's SHA-256, no block, another key version, a block of other
        rows): the client's completeness check names it."""
        seg_key = layout.segment_key(repo_id, seg_id)
        try:
            segment = decode_segment(self.store.get(seg_key), seg_id, expected_sha256=sha256)
        except (ObjectNotFound, SegmentError):
            return None
        block = getattr(segment, "ckks", None)
        if block is None or segment.key_version != key_version:
            return None
        try:
            if ckks.header(bytes(block[:ckks.HEADER_SIZE]), seg_key)[2] != len(segment):
                return None
        except FormatError:
            return None
        return (_Held(seg_id, sha256, len(segment), segment.ids.tobytes(),
                      (seg_id, next(_loads))), bytes(block))
