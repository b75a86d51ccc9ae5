"""The CKKS answer's image ids as raw bytes (cloud/ckks_store.py CkksAnswer.id_bytes).

The service, the shards and the front carry each segment's image ids as 16-byte ids joined
in row order (no Python string per id); the client is unchanged, so the HTTP answer must be
exactly what docs/FORMAT-2.md 8.4 says, built here by hand from hex ids as the client reads
them. No Ray, no CKKS keys: placeholder score bytes (the encoding only moves them).
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from cloud import ckks_store
from crypto.errors import FormatError


def _by_hand(seg_ids: list[str], hex_ids: list[list[str]], scores: bytes) -> bytes:
    """docs/FORMAT-2.md 8.4, written from the text: "RCKA", u32 L, the JSON header, u64
    byte count then the 16-byte ids of every segment in row order, then the scores."""
    head = json.dumps({"key_version": 3, "head_sequence": 9, "head_hash": "11" * 32,
                       "set_digest": "22" * 32, "segment_ids": seg_ids,
                       "counts": [len(s) for s in hex_ids], "engine_us": 42},
                      separators=(",", ":")).encode()
    ids = b"".join(bytes.fromhex(i) for seg in hex_ids for i in seg)
    return b"RCKA" + struct.pack(">I", len(head)) + head + struct.pack(">Q", len(ids)) + ids \
        + scores


def test_raw_ids_encode_to_the_documented_bytes_and_back() -> None:
    rng = np.random.default_rng(7)
    hex_ids = [[rng.bytes(16).hex() for _ in range(n)] for n in (3, 0, 5)]
    seg_ids = ["a" * 32, "b" * 32, "c" * 32]
    scores = os.urandom(100)
    # what a shard holds: a segment's V16 id column, as bytes (cloud/segments.py)
    columns = [np.frombuffer(b"".join(bytes.fromhex(i) for i in seg), dtype="V16")
               for seg in hex_ids]
    answer = ckks_store.CkksAnswer(3, 9, b"\x11" * 32, b"\x22" * 32, seg_ids,
                                   [len(s) for s in hex_ids],
                                   [c.tobytes() for c in columns], 42, scores)
    sent = ckks_store.encode_answer(answer)
    assert sent == _by_hand(seg_ids, hex_ids, scores)
    back = ckks_store.decode_answer(sent)
    assert back == answer and back.image_ids == hex_ids  # what the client reads
    assert ckks_store.ids_from_hex(hex_ids) == answer.id_bytes
    with pytest.raises(ValueError, match="32 hex"):
        ckks_store.ids_from_hex([["ab" * 15]])
    # ids that do not add up to the counts: refused by the client's decoder
    short = ckks_store.CkksAnswer(3, 9, b"\x11" * 32, b"\x22" * 32, seg_ids, [3, 0, 6],
                                  answer.id_bytes, 42, scores)
    with pytest.raises(FormatError, match="do not match its counts"):
        ckks_store.decode_answer(ckks_store.encode_answer(short))
