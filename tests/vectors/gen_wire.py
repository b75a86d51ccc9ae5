"""Generate the wire protocol 2 vectors (docs/FORMAT-2.md 8 and 10): token_v2.json,
wire_request.json, wire_answer.json. Deterministic; the JSON is checked in.

    .venv/bin/python tests/vectors/gen_wire.py

The tokens are token.json's, re-encoded in format version 2 (same numbers, so they score
against segment.json exactly as the version-1 tokens do), which keeps this script free of
BLAS rounding. Signatures are Ed25519 with generate.py's fixed identities (deterministic).
Every broken variant is run through the real code here and must fail as it says; the
request variants are replayed through the real service by tests/test_wire.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]

from generate import (  # noqa: E402
    REPO,
    SERVICE_ID,
    STAMP,
    ZOE_ID,
    b64,
    broken,
    fixed,
    hx,
    identities,
    put,
    write,
)

from cloud import wire  # noqa: E402
from cloud.auth import request_message  # noqa: E402
from crypto.tokens import QueryToken  # noqa: E402

SPEC = "docs/FORMAT-2.md, section '8. Wire protocol 2' (and 6.1)"
NOTES = ["little-endian throughout; every array starts at a multiple of 8 from the start of "
         "the body (request: the token starts at offset 32)",
         "expected errors: crypto.errors.FormatError for tokens; for requests the HTTP status "
         "of POST /v2/repos/<repo>/search (400 with {\"detail\", \"supported\": [1, 2]} for "
         "a protocol the service does not speak, checked before authentication; 422 for "
         "content; 401 for a signature); for answers cloud.wire.WireError, which "
         "app.core.service_client.ServiceClient reports as ServiceError 'malformed answer'"]


def doc_header(fmt: str, title: str, notes: list[str]) -> dict[str, Any]:
    return {"format": fmt, "title": title, "spec": SPEC,
            "generated_by": "tests/vectors/gen_wire.py",
            "encoding": "fields ending in _hex are lowercase hexadecimal, _b64 standard "
                        "base64 (RFC 4648 section 4, with padding), _utf8 UTF-8 text",
            "notes": [*notes, *NOTES]}


def v1_tokens() -> dict[str, QueryToken]:
    doc = json.loads((HERE / "token.json").read_text(encoding="utf-8"))
    return {v["name"]: QueryToken.from_bytes(base64.b64decode(v["token_b64"]))
            for v in doc["vectors"]}


# --- token_v2.json ---------------------------------------------------------------------------


def make_token_v2(tokens: dict[str, QueryToken]) -> bytes:
    doc = doc_header("token_v2", "Query token, format version 2 (cloud/wire.py)",
                     ["parse: cloud.wire.decode_token_v2(token, max_queries) ; "
                      "encode_token_v2 gives it back; max_queries is 64 (the service's) "
                      "unless a broken variant says otherwise",
                      "same_as_v1 names the token.json vector with the same numbers"])
    vectors = []
    for name, token in tokens.items():
        raw = wire.encode_token_v2(token)
        widths_end = 16 + 4 * len(token.widths)
        vectors.append({"name": name, "same_as_v1": name, "queries": len(token),
                        "levels": len(token.levels), "widths": list(token.widths),
                        "offsets": {"widths": 16, "padding": widths_end,
                                    "arrays": widths_end + (-widths_end % 8)},
                        "size": len(raw), "token_b64": b64(raw)})
    doc["vectors"] = vectors
    raw = wire.encode_token_v2(tokens["two-queries"])
    levels = len(tokens["two-queries"].levels)
    widths_end = 16 + 4 * (levels + 1)
    arrays = widths_end + (-widths_end % 8)
    assert arrays > widths_end, "the vector token must have padding to break"
    cases = [
        ("truncated-header", "only 15 bytes", raw[:15], 64),
        ("bad-magic", "magic 'RCQX'", put(raw, 0, b"RCQX"), 64),
        ("version-1", "version 1 (the protocol-1 token's number)", put(raw, 4, b"\1\0"), 64),
        ("version-3", "version 3", put(raw, 4, b"\3\0"), 64),
        ("levels-9", "9 levels (maximum 8)", put(raw, 6, b"\x09\0"), 64),
        ("queries-0", "query count 0", put(raw, 8, struct.pack("<I", 0)), 64),
        ("queries-65", "query count 65 (the service allows 64)",
         put(raw, 8, struct.pack("<I", 65)), 64),
        ("queries-3", "query count 3: the length no longer matches",
         put(raw, 8, struct.pack("<I", 3)), 64),
        ("reserved-set", "reserved u32 = 1", put(raw, 12, struct.pack("<I", 1)), 64),
        ("truncated-widths", "cut inside the widths", raw[:18], 64),
        ("truncated-padding", "cut inside the padding", raw[:widths_end + 1], 64),
        ("width-0", "first width 0", put(raw, 16, struct.pack("<I", 0)), 64),
        ("width-65537", "first width 65537", put(raw, 16, struct.pack("<I", 65537)), 64),
        ("padding-set", "a non-zero padding byte", put(raw, widths_end, b"\1"), 64),
        ("truncated-one-number", "the last 8 bytes removed", raw[:-8], 64),
        ("truncated-one-byte", "the last byte removed", raw[:-1], 64),
        ("trailing-number", "8 zero bytes appended", raw + bytes(8), 64),
        ("trailing-byte", "one zero byte appended", raw + b"\0", 64),
        ("nan", "a NaN as the first number", put(raw, arrays, struct.pack("<d", float("nan"))),
         64),
        ("infinity", "+inf as the last number",
         put(raw, len(raw) - 8, struct.pack("<d", float("inf"))), 64),
        ("big-endian-widths", "the widths written big-endian (the version-1 byte order)",
         put(raw, 16, struct.pack(f">{levels + 1}I", *tokens["two-queries"].widths)), 64),
    ]
    doc["broken"] = [broken(n, text, "FormatError",
                            partial(wire.decode_token_v2, d, m),
                            max_queries=m, token_b64=b64(d))
                     for n, text, d, m in cases]
    write("token_v2.json", doc)
    return raw


# --- wire_request.json ---------------------------------------------------------------------


def make_wire_request(tokens: dict[str, QueryToken]) -> None:
    zoe = identities()["zoe"]
    path = f"/v2/repos/{REPO}/search"
    doc = doc_header("wire_request", "Protocol-2 search request and its signature "
                     "(cloud/wire.py, cloud/auth.py request_message)",
                     ["decode: cloud.wire.decode_request(body) ; encode_request gives it back",
                      "the request is POSTed to path with the headers listed; the signature "
                      "message is cloud.auth.request_message(method, path, body_sha256_hex, "
                      "stamp, nonce, user_id, service_id, 2): 'radcrypt-request-v3', the "
                      "seven lines of protocol 1, then '2'",
                      "broken variants give the header x-radcrypt-protocol to send (null: "
                      "none) and sign_protocol, the protocol whose message the signature is "
                      "over; the status is what the service answers"])
    plan = [("two-queries", tokens["two-queries"], 1, 1, 0, 0, "wire/nonce-1"),
            ("list-and-stats", tokens["first-query"], 5, 1, 42,
             wire.FLAG_LIST_SEGMENTS | wire.FLAG_STATS, "wire/nonce-2")]
    vectors = []
    bodies = {}
    for name, token, k, version, min_head, flags, nonce_label in plan:
        body = wire.encode_request(wire.SearchRequestV2(version, k, min_head, flags, token))
        bodies[name] = body
        digest = hashlib.sha256(body).hexdigest()
        nonce = fixed(nonce_label, 16).hex()
        message = request_message("POST", path, digest, STAMP, nonce, ZOE_ID, SERVICE_ID, 2)
        signature = zoe.sign(message)
        vectors.append({
            "name": name, "path": path, "key_version": version, "k": k, "min_head": min_head,
            "flags": flags, "token_size": len(body) - 32, "body_b64": b64(body),
            "body_sha256_hex": digest,
            "signed": {"stamp": STAMP, "nonce": nonce, "user_id": ZOE_ID,
                       "service_id": SERVICE_ID, "sign_public_hex": hx(zoe.sign_public),
                       "message_utf8": message.decode(), "signature_b64": b64(signature),
                       "headers": {"content-type": wire.REQUEST_MEDIA_TYPE,
                                   wire.PROTOCOL_HEADER: "2", "x-radcrypt-user": ZOE_ID,
                                   "x-radcrypt-time": STAMP, "x-radcrypt-nonce": nonce,
                                   "x-radcrypt-signature": b64(signature)}}})
    doc["vectors"] = vectors
    good = bodies["two-queries"]
    q65 = put(good, 32 + 8, struct.pack("<I", 65))
    cases: list[tuple[str, str, bytes, str | None, int, int, str]] = [
        ("header-protocol-3", "x-radcrypt-protocol: 3", good, "3", 2, 400, ""),
        ("no-header", "a /v2/ path without x-radcrypt-protocol", good, None, 2, 400, ""),
        ("header-1", "x-radcrypt-protocol: 1 on a /v2/ path", good, "1", 2, 400, ""),
        ("body-version-3", "header 2, body protocol field 3",
         put(good, 4, struct.pack("<H", 3)), "2", 2, 400, "WireError"),
        ("body-bad-magic", "magic 'RCSX'", put(good, 0, b"RCSX"), "2", 2, 400, "WireError"),
        ("unknown-flag", "flag bit 2 set", put(good, 6, struct.pack("<H", 4)), "2", 2, 422,
         "WireError"),
        ("k-0", "k = 0", put(good, 12, struct.pack("<I", 0)), "2", 2, 422, "WireError"),
        ("k-101", "k = 101", put(good, 12, struct.pack("<I", 101)), "2", 2, 422, "WireError"),
        ("key-version-0", "key_version = 0", put(good, 8, struct.pack("<I", 0)), "2", 2, 422,
         "WireError"),
        ("reserved-set", "reserved u64 = 1", put(good, 24, struct.pack("<Q", 1)), "2", 2, 422,
         "WireError"),
        ("truncated-header", "only 20 bytes", good[:20], "2", 2, 422, "WireError"),
        ("token-queries-65", "a token of 65 queries", q65, "2", 2, 422, "WireError"),
        ("token-trailing-byte", "one byte appended", good + b"\0", "2", 2, 422, "WireError"),
        ("signed-as-protocol-1", "the signature is over the protocol-1 message "
         "(radcrypt-request-v2, eight lines)", good, "2", 1, 401, ""),
    ]
    entries = []
    for name, text, body, header, sign_protocol, status, error in cases:
        fields: dict[str, Any] = {"body_b64": b64(body), "header": header,
                                  "sign_protocol": sign_protocol, "status": status}
        if error:
            entries.append(broken(name, text, error, partial(wire.decode_request, body),
                                  **fields))
            decoded_status = _status_of(body)
            assert decoded_status == status or header != "2", (name, decoded_status)
        else:
            entries.append({"name": name, "description": text, **fields,
                            "error": f"HTTP {status}"})
    doc["broken"] = entries
    write("wire_request.json", doc)


def _status_of(body: bytes) -> int:
    try:
        wire.decode_request(body)
    except wire.WireError as exc:
        return exc.status
    return 200


# --- wire_answer.json ----------------------------------------------------------------------


def make_wire_answer() -> None:
    doc = doc_header("wire_answer", "Protocol-2 search answer (cloud/wire.py)",
                     ["decode: cloud.wire.decode_answer(answer, queries=, k=, key_version=, "
                      "repo_id=) ; encode_answer gives it back; hits are [image_id_hex, "
                      "score] in rank order per query",
                      "set_digest is the segment-set digest of FORMAT-2 6.1 over segment_ids "
                      "(SHA-256(LP('radcrypt/segment-set/v2') || LP(repo_id) || u32 "
                      "key_version || u64 S || ids sorted), big-endian); a listed answer's "
                      "ids must hash to it",
                      "stats (flag bit 1), per query: vectors u64, full_scored u64, "
                      "milliseconds f64, batch u32, levels u32, level_scored u64 x levels"])
    seg_ids = sorted(fixed(f"wire/segment-{i}", 16).hex() for i in range(3))
    digest = wire.segment_set_digest(REPO, 3, seg_ids)
    head_hash = hashlib.sha256(b"radcrypt test vector head entry 42").digest()
    hits = [[(fixed("wire/image-a", 16).hex(), 12.5), (fixed("wire/image-b", 16).hex(), -0.75)],
            [(fixed("wire/image-c", 16).hex(), 3.0)]]
    stats: list[dict[str, object]] = [
        {"vectors": 1000, "level_scored": [1000, 64], "full_scored": 5,
         "fraction_fully_scored": 0.005, "milliseconds": 0.5, "batch": 2},
        {"vectors": 1000, "level_scored": [1000, 80], "full_scored": 7,
         "fraction_fully_scored": 0.007, "milliseconds": 0.5, "batch": 2}]

    def answer(**changes: Any) -> wire.SearchAnswerV2:
        fields: dict[str, Any] = {
            "key_version": 3, "k": 2, "segments": 3, "images": 1000, "head_sequence": 42,
            "head_hash": head_hash, "set_digest": digest, "engine_us": 850, "hits": hits,
            "stats": None, "segment_ids": None}
        fields.update(changes)
        return wire.SearchAnswerV2(**fields)

    plan = [("plain", answer()), ("segment-list", answer(segment_ids=seg_ids)),
            ("stats", answer(stats=stats)),
            ("list-and-stats", answer(segment_ids=seg_ids, stats=stats)),
            ("nothing-searched", answer(segments=0, images=0, hits=[[], []],
                                        set_digest=wire.segment_set_digest(REPO, 3, []),
                                        segment_ids=[]))]
    vectors = []
    for name, value in plan:
        body = wire.encode_answer(value)
        vectors.append({"name": name, "repo_id": REPO, "queries": 2, "k": 2, "key_version": 3,
                        "head_sequence": value.head_sequence,
                        "head_hash_hex": hx(value.head_hash),
                        "set_digest_hex": hx(value.set_digest), "segments": value.segments,
                        "images": value.images, "engine_us": value.engine_us,
                        "hits": [[[i, s] for i, s in q] for q in value.hits],
                        "segment_ids": value.segment_ids, "stats": value.stats,
                        "size": len(body), "answer_b64": b64(body)})
    doc["vectors"] = vectors
    plain = wire.encode_answer(answer())
    listed = wire.encode_answer(answer(segment_ids=seg_ids))
    with_stats = wire.encode_answer(answer(stats=stats))
    ids_at = 112 + 8
    scores_at = ids_at + 3 * 16
    asked = {"queries": 2, "k": 2, "key_version": 3, "repo_id": REPO}
    cases: list[tuple[str, str, bytes, dict[str, Any]]] = [
        ("truncated", "the last byte removed", plain[:-1], asked),
        ("truncated-header", "only 100 bytes", plain[:100], asked),
        ("trailing-byte", "one zero byte appended", plain + b"\0", asked),
        ("count-above-k", "query 0 claims 3 hits with k = 2",
         put(plain, 112, struct.pack("<I", 3)), asked),
        ("nan-score", "a NaN score", put(plain, scores_at, struct.pack("<d", float("nan"))),
         asked),
        ("infinite-score", "-inf as a score",
         put(plain, scores_at + 8, struct.pack("<d", float("-inf"))), asked),
        ("queries-differ", "2 queries answered, 1 asked", plain, {**asked, "queries": 1}),
        ("k-differs", "k 2 answered, 3 asked", plain, {**asked, "k": 3}),
        ("key-version-differs", "key version 3 answered, 2 asked", plain,
         {**asked, "key_version": 2}),
        ("bad-magic", "magic 'RCSX'", put(plain, 0, b"RCSX"), asked),
        ("protocol-3", "protocol field 3", put(plain, 4, struct.pack("<H", 3)), asked),
        ("unknown-flag", "flag bit 2 set", put(plain, 6, struct.pack("<H", 4)), asked),
        ("reserved-set", "reserved u32 = 1", put(plain, 108, struct.pack("<I", 1)), asked),
        ("duplicate-hit", "query 0 names the same image twice",
         put(plain, ids_at + 16, plain[ids_at:ids_at + 16]), asked),
        ("list-digest-differs", "the listed ids do not hash to set_digest",
         put(listed, 72, hashlib.sha256(b"another set").digest()), asked),
        ("list-truncated", "one listed id cut off", listed[:-16], asked),
        ("list-unsorted", "the listed ids out of order",
         listed[:-48] + listed[-32:-16] + listed[-48:-32] + listed[-16:], asked),
        ("stats-truncated", "the statistics section cut", with_stats[:-8], asked),
        ("stats-levels-9", "a statistics record claims 9 levels",
         put(with_stats, len(plain) + 28, struct.pack("<I", 9)), asked),
    ]
    doc["broken"] = [broken(n, text, "WireError",
                            partial(wire.decode_answer, d, **a), **a,
                            answer_b64=b64(d))
                     for n, text, d, a in cases]
    write("wire_answer.json", doc)


def main() -> int:
    tokens = v1_tokens()
    make_token_v2(tokens)
    make_wire_request(tokens)
    make_wire_answer()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
