"""Generate the segment-log vectors of docs/FORMAT-2.md sections 5 and 6 (run once; the
JSON is checked in):

    .venv/bin/python tests/vectors/gen_log.py

writes log_entry.json, log_chain.json, checkpoint.json, segment_set.json and
completeness.json. Same conventions as tests/vectors/generate.py (whose helpers this script
imports): fixed keys (the identities of generate.py), no randomness at all (Ed25519 is
deterministic, entry times are fixed), ``valid`` vectors and self-contained ``broken``
variants, each with the error the real code raises, checked here before a file is written.

A broken log variant is a whole bucket: ``objects`` maps object names to their bytes, and
``trust`` says who may write (owner key, current members' keys, the verified manifest's
sequence and key version). The check is ``cloud.seglog.verify_log(bucket, repo_id, trust,
remembered)``; LogError variants also give the ``reason`` word.

The object digests named by log entries (``sha256``) are made-up 32-byte values: the
vectors are about the log, not about the segments and packs themselves.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from generate import (  # type: ignore[import-not-found]  # run from tests/vectors
    ENCODING,
    ERRORS_NOTE,
    OTHER_REPO,
    REPO,
    b64,
    broken,
    fixed,
    flip,
    hx,
    identities,
    put,
    write,
)

from cloud import layout
from cloud import seglog as sl
from cloud.directory_store import DirectoryStore
from cloud.seglog_format import (
    KIND_WORDS,
    REASON_WORDS,
    TYPE_WORDS,
    ZERO_HASH,
    Added,
    LogEntry,
    Removed,
    encode_payload,
)
from crypto import signed
from crypto.identity import Identity

T0 = 1736931600000  # 2025-01-15T09:00:00Z in milliseconds
SPEC = "docs/FORMAT-2.md"
LOG_NOTES = [
    "log entry object: crypto.signed record (F12) of kind 'log' whose object name is the "
    "full key radcrypt/v1/repos/<repo_id>/log/<SEQ20(n)>; payload big-endian: 'RCLE' | "
    "version u8 1 | kind u8 | reason u8 | reserved u8 0 | sequence u64 | prev 32 | "
    "manifest_sequence u64 | key_version u32 | time_ms u64 | writer W64 | a u32 | "
    "a x (type u8 | 3 zero | ID16 | sha256 32 | count u32) | r u32 | r x (type u8 | 3 zero "
    "| ID16); lists strictly sorted by (type, id bytes)",
    "sha256 of an entry = SHA-256 of the whole object (record bytes); entry n+1's prev is "
    "the sha256 of entry n",
    "kinds: 0 genesis, 1 add, 2 replace, 3 remove, 4 membership; reasons: 0 import, "
    "1 compaction, 2 erasure, 3 revocation, 4 migration, 5 repair; types: 1 segment, "
    "2 pack, 3 format-1 segment (removed lists of migration entries only)",
    "the sha256 values inside added lists are made up: the vectors are about the log",
]


# --- the world -------------------------------------------------------------------------------


def oid(label: str) -> str:
    """A fixed 32-hex object id."""
    return fixed("log/id/" + label, 16).hex()


def odigest(label: str) -> bytes:
    return fixed("log/object-sha256/" + label)


def seg(label: str, count: int) -> Added:
    return Added(sl.TYPE_SEGMENT, oid(label), odigest(label), count)


def pack(label: str, count: int) -> Added:
    return Added(sl.TYPE_PACK, oid(label), odigest(label), count)


def gone(item: Added) -> Removed:
    return Removed(item.type, item.id)


@dataclass(frozen=True)
class Built:
    entry: LogEntry
    name: str
    payload: bytes
    record: bytes
    sha256: bytes


def build(people: dict[str, Identity], signer: str, seq: int, kind: int, reason: int,
          prev: bytes, ms: int, added: tuple[Added, ...] = (), removed: tuple[Removed, ...] = (),
          *, writer: str | None = None, kv: int = 1, repo: str = REPO,
          name_seq: int | None = None) -> Built:
    """One signed entry. ``writer`` defaults to the signer's user id; ``name_seq`` signs it
    for another sequence's name (a broken variant)."""
    who = people[signer]
    entry = LogEntry(seq, kind, reason, prev, ms, kv, T0 + 60000 * seq,
                     writer or who.user_id,
                     tuple(sorted(added, key=lambda a: (a.type, a.id))),
                     tuple(sorted(removed, key=lambda r: (r.type, r.id))))
    name = layout.log_entry_key(repo, seq if name_seq is None else name_seq)
    payload = encode_payload(entry)
    record = signed.sign_record(who, "log", name, payload)
    return Built(entry, name, payload, record, hashlib.sha256(record).digest())


def resign(people: dict[str, Identity], signer: str, name: str, payload: bytes) -> bytes:
    return signed.sign_record(people[signer], "log", name, payload)


OBJ = {
    "A": seg("A", 64), "PA": pack("PA", 64),
    "B": seg("B", 32), "PB": pack("PB", 32),
    "C": seg("C", 96), "PC": pack("PC", 96),
    "D": seg("D", 10), "PD": pack("PD", 10),
    "E": seg("E", 5), "PE": pack("PE", 5),
}


def main_chain(people: dict[str, Identity]) -> list[Built]:
    """genesis; add A+PA (zoe); add B+PB (owner); compaction A,B -> C (zoe); add D (zoe);
    membership (owner, manifest 2); add E (zoe); erasure removes D (zoe)."""
    o = OBJ
    chain: list[Built] = []

    def nxt(signer: str, kind: int, reason: int, ms: int, added: tuple[Added, ...] = (),
            removed: tuple[Removed, ...] = ()) -> None:
        prev = chain[-1].sha256 if chain else ZERO_HASH
        chain.append(build(people, signer, len(chain), kind, reason, prev, ms, added, removed))

    nxt("owner", sl.KIND_GENESIS, sl.REASON_IMPORT, 1)
    nxt("zoe", sl.KIND_ADD, sl.REASON_IMPORT, 1, (o["A"], o["PA"]))
    nxt("owner", sl.KIND_ADD, sl.REASON_IMPORT, 1, (o["B"], o["PB"]))
    nxt("zoe", sl.KIND_REPLACE, sl.REASON_COMPACTION, 1, (o["C"], o["PC"]),
        (gone(o["A"]), gone(o["PA"]), gone(o["B"]), gone(o["PB"])))
    nxt("zoe", sl.KIND_ADD, sl.REASON_IMPORT, 1, (o["D"], o["PD"]))
    nxt("owner", sl.KIND_MEMBERSHIP, sl.REASON_REVOCATION, 2)
    nxt("zoe", sl.KIND_ADD, sl.REASON_IMPORT, 2, (o["E"], o["PE"]))
    nxt("owner", sl.KIND_REMOVE, sl.REASON_ERASURE, 2, (), (gone(o["D"]), gone(o["PD"])))
    return chain


CHECKPOINT_AT = 5


def trust_doc(people: dict[str, Identity], members: tuple[str, ...] = ("zoe",),
              manifest_sequence: int = 2, key_version: int = 1) -> dict[str, Any]:
    owner = people["owner"]
    return {"owner_id": owner.user_id, "owner_key_hex": hx(owner.sign_public),
            "members": {people[m].user_id: hx(people[m].sign_public) for m in members},
            "manifest_sequence": manifest_sequence, "key_version": key_version}


def trust_of(doc: Mapping[str, Any]) -> sl.StaticTrust:
    return sl.StaticTrust(doc["owner_id"], bytes.fromhex(doc["owner_key_hex"]),
                          doc["manifest_sequence"], doc["key_version"],
                          {k: bytes.fromhex(v) for k, v in doc["members"].items()})


def head_doc(head: sl.LogHead | None) -> dict[str, Any] | None:
    if head is None:
        return None
    return {"sequence": head.sequence, "hash_hex": hx(head.hash), "checkpoint": head.checkpoint}


def head_of(doc: Mapping[str, Any] | None) -> sl.LogHead | None:
    if doc is None:
        return None
    return sl.LogHead(doc["sequence"], bytes.fromhex(doc["hash_hex"]), doc["checkpoint"])


def bucket(objects: Mapping[str, bytes]) -> DirectoryStore:
    store = DirectoryStore(tempfile.mkdtemp(prefix="radcrypt-log-vectors-"))
    store.ensure_bucket()
    for name, blob in objects.items():
        store.put(name, blob)
    return store


def verify_bucket(objects: Mapping[str, bytes], trust: Mapping[str, Any],
                  remembered: Mapping[str, Any] | None = None, *,
                  from_genesis: bool = False) -> sl.LogState:
    return sl.verify_log(bucket(objects), REPO, trust_of(trust), head_of(remembered),
                         from_genesis=from_genesis)


def objects_of(chain: list[Built], *extra: tuple[str, bytes]) -> dict[str, bytes]:
    out = {b.name: b.record for b in chain}
    out.update(dict(extra))
    return out


def broken_bucket(name: str, description: str, expected: str, objects: dict[str, bytes],
                  trust: dict[str, Any], reason: str | None = None,
                  remembered: dict[str, Any] | None = None, from_genesis: bool = False
                  ) -> dict[str, Any]:
    def call() -> object:
        try:
            return verify_bucket(objects, trust, remembered, from_genesis=from_genesis)
        except sl.LogError as exc:
            if reason is not None and exc.reason != reason:
                raise AssertionError(f"{name}: reason {exc.reason!r}, wanted {reason!r}"
                                     ) from None
            raise
    entry: dict[str, Any] = broken(name, description, expected, call, trust=trust,
                                   remembered=remembered, from_genesis=from_genesis,
                                   objects={k: b64(v) for k, v in sorted(objects.items())})
    if reason is not None:   # (broken()'s own ``reason`` is about known deviations)
        entry["reason"] = reason
    return entry


def doc_header(fmt: str, title: str, section: str, notes: list[str]) -> dict[str, Any]:
    return {"format": fmt, "title": title, "spec": f"{SPEC}, section {section}",
            "generated_by": "tests/vectors/gen_log.py", "encoding": ENCODING,
            "notes": [*notes, ERRORS_NOTE + " cloud.seglog.LogError and AnswerError are "
                      "ValueErrors; LogError carries a reason word."]}


def live_doc(objs: list[sl.LiveObject]) -> list[dict[str, Any]]:
    return [{"type": TYPE_WORDS[o.type], "id": o.id, "sha256_hex": hx(o.sha256),
             "count": o.count, "key_version": o.key_version, "added_at": o.added_at}
            for o in sorted(objs, key=lambda o: (o.type, o.id))]


def entry_doc(b: Built) -> dict[str, Any]:
    e = b.entry
    return {
        "sequence": e.sequence, "kind": e.kind, "kind_word": KIND_WORDS[e.kind],
        "reason": e.reason, "reason_word": REASON_WORDS[e.reason], "prev_hex": hx(e.prev),
        "manifest_sequence": e.manifest_sequence, "key_version": e.key_version,
        "time_ms": e.time_ms, "writer": e.writer,
        "added": [{"type": a.type, "id": a.id, "sha256_hex": hx(a.sha256), "count": a.count}
                  for a in e.added],
        "removed": [{"type": r.type, "id": r.id} for r in e.removed],
        "object_name": b.name, "signer_public_hex": hx(signed.signer_of(b.record)),
        "payload_hex": hx(b.payload), "record_b64": b64(b.record), "sha256_hex": hx(b.sha256)}


# --- log_entry.json ----------------------------------------------------------------------------


def make_log_entry(people: dict[str, Identity], chain: list[Built]) -> None:
    doc = doc_header("log_entry", "Segment-log entries (cloud/seglog_format.py, "
                     "cloud/seglog.py open_entry)", "5.2", [
                         *LOG_NOTES,
                         "valid: decode_payload(payload, object_name) gives the fields; "
                         "encode_payload(fields) == payload; sign_record(signer, 'log', "
                         "object_name, payload) == record (Ed25519 is deterministic)",
                         "broken: a whole bucket (objects), checked with verify_log(bucket, "
                         "repo_id, trust); entries before the broken one are those of "
                         "log_chain.json's main chain"])
    migration = build(people, "owner", 1, sl.KIND_REPLACE, sl.REASON_MIGRATION, chain[0].sha256,
                      1, (OBJ["C"], OBJ["PC"]),
                      (Removed(3, oid("v1-a")), Removed(3, oid("v1-b"))))
    picks = [("genesis", chain[0]), ("add", chain[1]), ("replace-compaction", chain[3]),
             ("membership", chain[5]), ("remove-erasure", chain[7]),
             ("replace-migration", migration)]
    doc["vectors"] = [{"name": n, **entry_doc(b)} for n, b in picks]
    trust = trust_doc(people)
    base = chain[:3]       # genesis, add A (zoe), add B (owner); the broken entry is 3
    e3 = chain[3]
    name3 = e3.name

    def with3(payload: bytes, signer: str = "zoe") -> dict[str, bytes]:
        return objects_of(base, (name3, resign(people, signer, name3, payload)))

    p3 = e3.payload
    unsorted = bytearray(p3)
    first, second = 136, 136 + 56  # added[0] (segment C) and added[1] (pack PC)
    unsorted[first:first + 56], unsorted[second:second + 56] = (p3[second:second + 56],
                                                                p3[first:first + 56])
    cases: list[tuple[str, str, str, dict[str, bytes], str | None]] = [
        ("bad-magic", "payload magic 'RCLX'", "FormatError", with3(put(p3, 0, b"RCLX")), None),
        ("version-2", "payload version 2", "FormatError", with3(put(p3, 4, b"\x02")), None),
        ("unknown-kind", "kind 5", "FormatError", with3(put(p3, 5, b"\x05")), None),
        ("unknown-reason", "reason 6", "FormatError", with3(put(p3, 6, b"\x06")), None),
        ("reserved-non-zero", "reserved byte 7 = 1", "FormatError", with3(put(p3, 7, b"\x01")),
         None),
        ("unknown-type", "added[0] type 3 (format-1 segments are never added)", "FormatError",
         with3(put(p3, 136, b"\x03")), None),
        ("added-reserved-non-zero", "added[0] reserved bytes non-zero", "FormatError",
         with3(put(p3, 137, b"\x01")), None),
        ("unsorted-added", "added[0] and added[1] swapped (pack before segment)",
         "FormatError", with3(bytes(unsorted)), None),
        ("trailing-byte", "one zero byte after the removed list", "FormatError",
         with3(p3 + b"\0"), None),
        ("truncated", "the last removed object cut short by one byte", "FormatError",
         with3(p3[:-1]), None),
        ("sequence-differs-from-name", "payload sequence 9 in the object log/..03 (signed "
         "for that name)", "FormatError", with3(put(p3, 8, struct.pack(">Q", 9))), None),
        ("writer-length-0", "W64 length byte 0", "FormatError", with3(put(p3, 68, b"\0")),
         None),
        ("writer-padding-non-zero", "a non-zero byte in the W64 padding", "FormatError",
         with3(put(p3, 131, b"x")), None),
        ("signature-flipped", "one bit of the entry's signature flipped", "SignatureError",
         objects_of(base, (name3, flip(e3.record, 40, 1))), None),
        ("payload-flipped-not-resigned", "one payload bit flipped after signing",
         "SignatureError", objects_of(base, (name3, flip(e3.record, 101 + 60, 0))), None),
        ("signer-not-trusted", "signed by mallory (no member), writer field zoe",
         "SignatureError", with3(p3, "mallory"), None),
        ("copied-to-other-name", "entry 2's object also stored as entry 3",
         "SignatureError", objects_of(base, (name3, chain[2].record)), None),
        ("writer-differs-from-signer", "the owner signs an entry whose writer is zoe",
         "LogError", with3(p3, "owner"), "writer differs from signer"),
        ("non-member-writer", "mallory signs an entry naming herself as writer",
         "LogError", objects_of(base, (name3, build(
             people, "mallory", 3, sl.KIND_ADD, sl.REASON_IMPORT, chain[2].sha256, 1,
             (seg("M", 1), pack("PM", 1))).record)), "not a member"),
    ]
    g_zoe = build(people, "zoe", 0, sl.KIND_GENESIS, sl.REASON_IMPORT, ZERO_HASH, 1)
    cases.append(("genesis-not-by-owner", "entry 0 is a genesis signed by zoe (a member)",
                  "LogError", {g_zoe.name: g_zoe.record}, "not owner"))
    for label, added, removed, reason, why, kind, rsn in [
        ("add-nothing", (), (), "kind rule", "an add entry with nothing added",
         sl.KIND_ADD, sl.REASON_IMPORT),
        ("replace-non-live", (seg("X", 5),), (gone(seg("Q", 5)),), "not live",
         "a replace removing a segment that was never added", sl.KIND_REPLACE,
         sl.REASON_REPAIR),
        ("re-added-id", (OBJ["A"],), (), "re-added",
         "an add naming segment A again (added by entry 1)", sl.KIND_ADD, sl.REASON_IMPORT),
        ("compaction-counts", (seg("C2", 95), pack("PC2", 96)),
         (gone(OBJ["A"]), gone(OBJ["PA"]), gone(OBJ["B"]), gone(OBJ["PB"])), "counts",
         "a compaction whose new segment holds 95 images, the removed ones 96",
         sl.KIND_REPLACE, sl.REASON_COMPACTION),
    ]:
        bad = build(people, "zoe", 3, kind, rsn, chain[2].sha256, 1, added, removed)
        cases.append((label, why, "LogError", objects_of(base, (name3, bad.record)), reason))
    doc["broken"] = [broken_bucket(n, d, err, objs, trust, reason=r)
                     for n, d, err, objs, r in cases]
    write("log_entry.json", doc)


# --- checkpoints ---------------------------------------------------------------------------------


def chain_state(people: dict[str, Identity], chain: list[Built], upto: int) -> sl.LogState:
    return verify_bucket(objects_of(chain[:upto + 1]), trust_doc(people))


def checkpoint_blob(people: dict[str, Identity], signer: str, payload: dict[str, object],
                    seq: int = CHECKPOINT_AT) -> bytes:
    return signed.sign_json(people[signer], "checkpoint", layout.checkpoint_key(REPO, seq),
                            payload)


def make_checkpoint(people: dict[str, Identity], chain: list[Built]) -> bytes:
    state = chain_state(people, chain, CHECKPOINT_AT)
    payload = sl.checkpoint_payload(state, 2)
    blob = checkpoint_blob(people, "owner", payload)
    name = layout.checkpoint_key(REPO, CHECKPOINT_AT)
    owner_key = people["owner"].sign_public
    doc = doc_header("checkpoint", "Checkpoints (cloud/seglog.py checkpoint_payload, "
                     "open_checkpoint, write_checkpoint)", "5.4", [
                         "a checkpoint is signed JSON (F13, crypto.signed.sign_json) of kind "
                         "'checkpoint', object name radcrypt/v1/repos/<repo_id>/checkpoints/"
                         "<SEQ20(c)>, signed by the owner; 'live' is sorted by (type code, id): "
                         "segments before packs; 'set_digests' has one digest (section 6.1) "
                         "per key version of a live object, of that version's live segments "
                         "(the empty set included); 'images' counts the live segments' images",
                         "valid: open_checkpoint(blob, repo_id, sequence, owner_key) accepts it; "
                         "the payload is checkpoint_payload(state at entry 5 of log_chain.json's "
                         "main chain, manifest_sequence 2); canonical_payload_utf8 is the "
                         "signed text (keys sorted, no spaces)",
                         "broken with 'check' open_checkpoint: call it with the name's sequence; "
                         "broken with 'check' verify_log: verify_log(bucket, repo_id, trust, "
                         "from_genesis=...)"])
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    doc["vectors"] = [{"name": "main-chain-at-5", "object_name": name, "sequence": CHECKPOINT_AT,
                       "owner_key_hex": hx(owner_key), "blob_b64": b64(blob),
                       "canonical_payload_utf8": canonical}]

    def opened(b: bytes, seq: int = CHECKPOINT_AT) -> Callable[[], object]:
        return lambda: sl.open_checkpoint(b, REPO, seq, owner_key)

    unsorted = dict(payload)
    live = list(payload["live"])
    unsorted["live"] = [live[1], live[0], *live[2:]]
    wrong_digest = dict(payload)
    wrong_digest["set_digests"] = {"1": "00" * 32}
    moved = dict(payload)
    moved["sequence"] = 4
    cases = [
        ("not-owner-signed", "signed by zoe (a member)", "SignatureError",
         checkpoint_blob(people, "zoe", payload)),
        ("sequence-differs-from-name", "payload sequence 4 in the object checkpoints/..05, "
         "owner-signed", "FormatError", checkpoint_blob(people, "owner", moved)),
        ("live-unsorted", "the first two live objects swapped", "FormatError",
         checkpoint_blob(people, "owner", unsorted)),
        ("set-digest-wrong", "set_digests['1'] is 32 zero bytes", "FormatError",
         checkpoint_blob(people, "owner", wrong_digest)),
    ]
    doc["broken"] = []
    for n, d, err, b in cases:
        doc["broken"].append(broken(n, d, err, opened(b), check="open_checkpoint",
                                    sequence=CHECKPOINT_AT, blob_b64=b64(b)))
    # a wrong signature: flip one bit inside the decoded signature
    parsed = json.loads(blob)
    sig = bytearray(base64.b64decode(parsed["signature"]))
    sig[0] ^= 1
    parsed["signature"] = b64(bytes(sig))
    flipped = json.dumps(parsed, indent=2, sort_keys=True).encode()
    doc["broken"].append(broken("signature-flipped", "one bit of the signature flipped",
                                "SignatureError", opened(flipped), check="open_checkpoint",
                                sequence=CHECKPOINT_AT, blob_b64=b64(flipped)))
    trust = trust_doc(people)
    # the live set at 5 with segment D's count changed: owner-signed, consistent in itself
    lying = json.loads(json.dumps(payload))
    for item in lying["live"]:
        if item["id"] == OBJ["D"].id:
            item["count"] = 11
    lying["images"] += 1
    lie = checkpoint_blob(people, "owner", lying)
    bad_head = dict(payload)
    bad_head["head"] = hx(chain[4].sha256)
    cp_name = layout.checkpoint_key(REPO, CHECKPOINT_AT)
    doc["broken"].append(broken_bucket(
        "live-inconsistent-with-log", "owner-signed, but segment D's count is 11 (the log "
        "says 10): found when the log is replayed from genesis ('check')", "LogError",
        objects_of(chain, (cp_name, lie)), trust, "checkpoint live set", from_genesis=True))
    doc["broken"][-1]["check"] = "verify_log"
    doc["broken"].append(broken_bucket(
        "head-hash-wrong", "owner-signed, but 'head' is the hash of entry 4", "LogError",
        objects_of(chain, (cp_name, checkpoint_blob(people, "owner", bad_head))), trust,
        "checkpoint head mismatch"))
    doc["broken"][-1]["check"] = "verify_log"
    write("checkpoint.json", doc)
    return blob


# --- log_chain.json ------------------------------------------------------------------------------


def make_log_chain(people: dict[str, Identity], chain: list[Built], cp_blob: bytes) -> None:
    trust = trust_doc(people)
    cp_name = layout.checkpoint_key(REPO, CHECKPOINT_AT)
    doc = doc_header("log_chain", "Segment-log chains: live sets, digests, attacks "
                     "(cloud/seglog.py verify_log)", "5.1-5.5 and 6.1", [
                         *LOG_NOTES,
                         "the main chain: 0 genesis (owner); 1 add segment A + pack PA (zoe); "
                         "2 add B + PB (owner); 3 replace (compaction) A,PA,B,PB by C,PC "
                         "(zoe); 4 add D + PD (zoe); 5 membership (owner, manifest sequence "
                         "2); 6 add E + PE (zoe); 7 remove (erasure) D,PD (zoe); the owner's "
                         "checkpoint at 5 is checkpoint.json's",
                         "heads: verify_log on the bucket holding entries 0..h (and the "
                         "checkpoint when h >= 5) gives that live set, set digest (key version "
                         "1) and image count; with the checkpoint, verification starts at 5 "
                         "and objects live there have added_at 5",
                         "remembered: the rollback memory passed to verify_log "
                         "(sequence, entry hash, checkpoint)"])
    doc["trust"] = trust
    doc["entries"] = [entry_doc(b) for b in chain]
    doc["checkpoint"] = {"object_name": cp_name, "blob_b64": b64(cp_blob)}
    heads = []
    for h in range(len(chain)):
        objs = objects_of(chain[:h + 1])
        if h >= CHECKPOINT_AT:
            objs[cp_name] = cp_blob
        state = verify_bucket(objs, trust)
        heads.append({"head": h, "hash_hex": hx(state.head.hash),
                      "checkpoint": state.head.checkpoint, "live": live_doc(
                          list(state.live.values())),
                      "set_digest_v1_hex": hx(state.set_digest(1)), "images": state.images()})
    doc["vectors"] = heads
    full = objects_of(chain, (cp_name, cp_blob))
    final = verify_bucket(full, trust)
    at6 = verify_bucket(objects_of(chain[:7], (cp_name, cp_blob)), trust)
    no3 = {k: v for k, v in full.items() if k != chain[3].name}
    no3.pop(cp_name)
    # entries 3 and 4 swapped and re-signed by their writer (zoe) under each other's number
    e3, e4 = chain[3].entry, chain[4].entry
    s3 = build(people, "zoe", 3, e4.kind, e4.reason, e4.prev, e4.manifest_sequence, e4.added,
               e4.removed)
    swapped = objects_of(chain[:3], (s3.name, s3.record))
    s4 = build(people, "zoe", 4, e3.kind, e3.reason, s3.sha256, 1, e3.added, e3.removed)
    swapped[s4.name] = s4.record
    dup = build(people, "zoe", 8, sl.KIND_ADD, sl.REASON_IMPORT, chain[7].sha256, 2,
                chain[6].entry.added)
    low_ms = build(people, "zoe", 8, sl.KIND_ADD, sl.REASON_IMPORT, chain[7].sha256, 1,
                   (seg("F", 3), pack("PF", 3)))
    # revocation of zoe: membership at 5 removed her; her entry 6 now fails
    revoked_trust = trust_doc(people, members=())
    other_branch = build(people, "zoe", 6, sl.KIND_ADD, sl.REASON_IMPORT, chain[5].sha256, 2,
                         (seg("G", 7), pack("PG", 7)))
    forked_head = {"sequence": 6, "hash_hex": hx(other_branch.sha256), "checkpoint": 5}
    cases: list[dict[str, Any]] = [
        broken_bucket("gap", "entry 3 deleted (entries 4..7 remain)", "LogError", no3,
                      trust, "gap"),
        broken_bucket("swapped", "entries 3 and 4 exchanged and re-signed by zoe under each "
                      "other's sequence (prev no longer chains)", "LogError", swapped, trust,
                      "prev mismatch"),
        broken_bucket("swapped-objects", "the objects of entries 3 and 4 exchanged (not "
                      "re-signed): the names are signed", "SignatureError",
                      objects_of(chain[:3], (chain[3].name, chain[4].record),
                                 (chain[4].name, chain[3].record)), trust),
        broken_bucket("duplicated", "entry 6's additions repeated by zoe as entry 8",
                      "LogError", {**full, dup.name: dup.record}, trust, "re-added"),
        broken_bucket("manifest-sequence-decreasing", "entry 8 names manifest sequence 1 "
                      "after the membership entry's 2", "LogError",
                      {**full, low_ms.name: low_ms.record}, trust,
                      "manifest sequence decreasing"),
        broken_bucket("revoked-writer", "the membership entry 5 removed zoe (trust without "
                      "her); her entry 6 after it", "LogError", full, revoked_trust,
                      "not a member"),
        broken_bucket("rollback", "the bucket holds entries 0..5 (6 and 7 withheld); "
                      "remembered head 7", "LogError",
                      objects_of(chain[:6], (cp_name, cp_blob)), trust, "rollback",
                      remembered=head_doc(final.head)),
        broken_bucket("fork", "remembered entry 6 has another hash (another branch was "
                      "shown before)", "LogError", full, trust, "fork",
                      remembered=forked_head),
        broken_bucket("checkpoint-rollback", "the checkpoint at 5 deleted; remembered "
                      "checkpoint 5", "LogError", objects_of(chain), trust,
                      "checkpoint rollback", remembered=head_doc(at6.head)),
        broken_bucket("checkpoint-beyond-head", "checkpoint at 5 present, entries 5..7 "
                      "withheld", "LogError", objects_of(chain[:5], (cp_name, cp_blob)), trust,
                      "gap"),
        broken_bucket("no-genesis", "entries 1..4 without entry 0", "LogError",
                      objects_of(chain[1:5]), trust, "gap"),
    ]
    doc["broken"] = cases
    write("log_chain.json", doc)


# --- segment_set.json ----------------------------------------------------------------------------


def set_message(repo: str, version: int, ids: list[str]) -> bytes:
    raw = sorted(bytes.fromhex(i) for i in ids)
    out = b""
    for part in (b"radcrypt/segment-set/v2", repo.encode()):
        out += struct.pack(">I", len(part)) + part
    return out + struct.pack(">IQ", version, len(raw)) + b"".join(raw)


def make_segment_set() -> None:
    doc = doc_header("segment_set", "Segment-set digests (cloud/seglog.py set_digest)", "6.1", [
        "set_digest = SHA-256(LP('radcrypt/segment-set/v2') || LP(repo_id) || u32(key_version) "
        "|| u64(S) || ID16(seg_1) || ... || ID16(seg_S)), ids sorted ascending bytewise, "
        "big-endian integers, LP(x) = u32(len(x)) || x",
        "ids are given in the order a caller may hold them; message_hex is what is hashed"])
    three = [oid("set-3"), oid("set-1"), oid("set-2")]
    cases = [("empty", REPO, 1, []), ("one", REPO, 1, [oid("set-1")]),
             ("three-unsorted", REPO, 1, three), ("three-key-version-2", REPO, 2, three),
             ("three-other-repo", OTHER_REPO, 1, three)]
    vectors = []
    for name, repo, version, ids in cases:
        message = set_message(repo, version, ids)
        digest = sl.set_digest(repo, version, ids)
        assert digest == hashlib.sha256(message).digest()
        vectors.append({"name": name, "repo_id": repo, "key_version": version,
                        "seg_ids": ids, "message_hex": hx(message), "digest_hex": hx(digest)})
    assert len({v["digest_hex"] for v in vectors}) == len(vectors)
    doc["vectors"] = vectors
    doc["broken"] = [broken("duplicate-id", "the same id twice (a set has no duplicates)",
                            "ValueError", lambda: sl.set_digest(REPO, 1, [three[0], three[0]]),
                            repo_id=REPO, key_version=1, seg_ids=[three[0], three[0]]),
                     broken("uppercase-id", "an id in uppercase hex", "ValueError",
                            lambda: sl.set_digest(REPO, 1, [three[0].upper()]),
                            repo_id=REPO, key_version=1, seg_ids=[three[0].upper()])]
    write("segment_set.json", doc)


# --- completeness.json ---------------------------------------------------------------------------


def make_completeness(people: dict[str, Identity], chain: list[Built], cp_blob: bytes) -> None:
    trust = trust_doc(people)
    cp_name = layout.checkpoint_key(REPO, CHECKPOINT_AT)
    doc = doc_header("completeness", "Judging search answers against the log (cloud/seglog.py "
                     "judge_answer, check_hits)", "6.3", [
                         "the log is log_chain.json's main chain; client_head h: the client "
                         "verified the bucket holding entries 0..h (and the checkpoint at 5 "
                         "when h >= 5); live segments of key version 1: at 2 {A, B}, at 3 and "
                         "4 {C, D}, at 5 {C, D}, at 6 {C, D, E}, at 7 {C, E}",
                         "call: judge_answer(state, key_version, head_sequence, head_hash, "
                         "set_digest, searched, listed); expect 'verdict' (complete, expected, "
                         "searched, missing), 'needs_list' (None: ask again with "
                         "LIST_SEGMENTS), or an error (LogAhead, LogError 'fork', "
                         "AnswerError); a case with 'hits' calls check_hits(hits) first"])
    doc["log"] = {"trust": trust, "objects": {
        k: b64(v) for k, v in sorted(objects_of(chain, (cp_name, cp_blob)).items())}}
    states = {}
    for h in range(len(chain)):
        objs = objects_of(chain[:h + 1])
        if h >= CHECKPOINT_AT:
            objs[cp_name] = cp_blob
        states[h] = verify_bucket(objs, trust)
    final = states[7]
    hashes = {b.entry.sequence: b.sha256 for b in chain}
    i = {k: OBJ[k].id for k in "ABCDE"}

    def dig(*ids: str) -> bytes:
        return sl.set_digest(REPO, 1, ids)

    cases: list[dict[str, Any]] = []

    def case(name: str, description: str, client_head: int, head: int, digest: bytes,
             searched: int, listed: list[str] | None, expect: dict[str, Any],
             head_hash: bytes | None = None, hits: list[list[tuple[str, float]]] | None = None
             ) -> None:
        state = states[client_head]
        hh = hashes.get(head, fixed("no such entry")) if head_hash is None else head_hash

        def call() -> object:
            if hits is not None:
                sl.check_hits(hits)
            return sl.judge_answer(state, 1, head, hh, digest, searched, listed)
        if "error" in expect:
            entry = broken(name, description, expect["error"], call)
            entry.pop("error")
        else:
            got = call()
            want = None if expect.get("needs_list") else sl.Verdict(**expect["verdict"])
            assert got == want, (name, got, want)
            entry = {"name": name, "description": description}
        entry.update({"client_head": client_head, "answer": {
            "key_version": 1, "head_sequence": head, "head_hash_hex": hx(hh),
            "set_digest_hex": hx(digest), "searched": searched, "listed": listed,
            **({"hits": hits} if hits is not None else {})}, **expect})
        cases.append(entry)

    def verdict(complete: bool, expected: int, searched: int, missing: list[str]
                ) -> dict[str, Any]:
        return {"verdict": {"complete": complete, "expected": expected, "searched": searched,
                            "missing": missing}}

    case("complete", "same head, same set", 7, 7, dig(i["C"], i["E"]), 2, None,
         verdict(True, 2, 2, []))
    case("one-missing-needs-list", "segment E not searched; no list yet", 7, 7, dig(i["C"]),
         1, None, {"needs_list": True})
    case("one-missing", "segment E not searched; the list says so", 7, 7, dig(i["C"]), 1,
         [i["C"]], verdict(False, 2, 1, [i["E"]]))
    case("behind-same-set", "the service is at 4, the client at 5; the membership entry 5 "
         "changed no segment", 5, 4, dig(i["C"], i["D"]), 2, None, verdict(True, 2, 2, []))
    case("behind-missing-add", "the service is at 5, the client at 6: E (added by 6) was "
         "not searched", 6, 5, dig(i["C"], i["D"]), 2, [i["C"], i["D"]],
         verdict(False, 3, 2, [i["E"]]))
    case("removed-searched", "the service lists segment D, removed by entry 7", 7, 7,
         dig(i["C"], i["D"], i["E"]), 3, [i["C"], i["D"], i["E"]], {"error": "AnswerError"})
    case("never-live-searched", "the service lists a segment no entry added", 7, 7,
         dig(i["C"], i["E"], oid("stray")), 3, [i["C"], i["E"], oid("stray")],
         {"error": "AnswerError"})
    case("list-digest-differs", "the list does not hash to the answer's digest", 7, 7,
         dig(i["C"]), 1, [i["E"]], {"error": "AnswerError"})
    case("head-hash-mismatch", "the service's entry 6 has another hash (fork)", 7, 6,
         dig(i["C"], i["D"], i["E"]), 3, None, {"error": "LogError", "reason": "fork"},
         head_hash=fixed("forked entry"))
    case("service-ahead", "the service names head 8, beyond the client's 7", 7, 8,
         dig(i["C"], i["E"]), 2, None, {"error": "LogAhead"})
    case("duplicated-hit", "one query's hits name an image twice", 7, 7, dig(i["C"], i["E"]),
         2, None, {"error": "AnswerError"},
         hits=[[(oid("img-1"), 0.9), (oid("img-2"), 0.8), (oid("img-1"), 0.7)]])
    doc["vectors"] = cases
    assert final.head.sequence == 7
    write("completeness.json", doc)


def main() -> int:
    people = identities()
    chain = main_chain(people)
    make_segment_set()
    make_log_entry(people, chain)
    cp_blob = make_checkpoint(people, chain)
    make_log_chain(people, chain, cp_blob)
    make_completeness(people, chain, cp_blob)
    return 0


if __name__ == "__main__":
    sys.exit(main())

