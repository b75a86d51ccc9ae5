"""The CKKS mode's formats without TenSEAL key generation (issue 19): the segment's CKKS
block section (cloud/segments.py FLAG_CKKS, docs/FORMAT-2.md 4.4), covered by the MAC and
the checksum; the header refusals; the request and answer of POST /v2/repos/<r>/ckks
(cloud/ckks_store.py, 8.4) and the evaluation-keys object's head (4.5)."""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import pytest

from cloud import ckks_store
from cloud.segments import (
    CKKS_AT,
    SegmentAuthError,
    SegmentError,
    decode_segment,
    encode_segment_v2,
    parse_header,
    verify_segment_mac,
)
from crypto.errors import FormatError
from crypto.tokens import EncryptedVectors

MAC_KEY = b"\x05" * 32
BLOCK = b"RCKK" + bytes(8) + os.urandom(300)  # any bytes: the segment does not parse them
DICTIONARY = b"RCSD" + bytes(60)


def _segment(ckks: bytes | None = BLOCK, dictionary: bytes | None = DICTIONARY) -> bytes:
    ids = [os.urandom(16).hex() for _ in range(3)]
    vectors = EncryptedVectors(full=np.zeros((3, 1)), levels=())
    return encode_segment_v2(ids, vectors, 2, seg_id="ab" * 16, writer="owner",
                             base_sequence=1, repo_id="repo", mac_key=MAC_KEY,
                             dictionary=dictionary, ckks=ckks)


@pytest.mark.parametrize("dictionary", [DICTIONARY, None], ids=["dictionary", "none"])
def test_block_round_trips_with_or_without_a_dictionary(dictionary: bytes | None) -> None:
    blob = _segment(dictionary=dictionary)
    segment = decode_segment(blob, "ab" * 16)
    assert segment.ckks is not None and bytes(segment.ckks) == BLOCK
    assert (bytes(segment.dictionary) if segment.dictionary is not None else None) == dictionary
    header = parse_header(blob, "seg")
    assert header.ckks_size == len(BLOCK) and header.ckks_offset % 64 == 0
    verify_segment_mac(blob, "seg", "repo", MAC_KEY)
    plain = decode_segment(_segment(ckks=None, dictionary=dictionary), "ab" * 16)
    assert plain.ckks is None


def test_an_altered_block_fails_the_checksum_and_the_mac() -> None:
    blob = bytearray(_segment())
    at = parse_header(bytes(blob), "seg").ckks_offset + 10
    blob[at] ^= 1
    with pytest.raises(SegmentError, match="checksum"):
        decode_segment(bytes(blob), "seg")
    blob[-32:] = hashlib.sha256(bytes(blob[:-32])).digest()  # the checksum recomputed
    decode_segment(bytes(blob), "seg")  # a keyless reader cannot tell ...
    with pytest.raises(SegmentAuthError):  # ... a member can
        verify_segment_mac(bytes(blob), "seg", "repo", MAC_KEY)


def test_flag_and_length_must_agree() -> None:
    blob = bytearray(_segment())
    flags = struct.unpack_from("<H", blob, 6)[0]
    without_flag = bytearray(blob)
    struct.pack_into("<H", without_flag, 6, flags & ~0x0002)
    with pytest.raises(SegmentError, match="padding"):
        parse_header(bytes(without_flag), "seg")
    short = bytearray(blob)
    struct.pack_into("<Q", short, CKKS_AT, 5)
    with pytest.raises(SegmentError, match="CKKS block length 5"):
        parse_header(bytes(short), "seg")
    unknown = bytearray(blob)
    struct.pack_into("<H", unknown, 6, flags | 0x0004)
    with pytest.raises(SegmentError, match="unknown flags"):
        parse_header(bytes(unknown), "seg")
    with pytest.raises(ValueError, match="at least 12"):
        _segment(ckks=b"RCKK")


def test_request_and_answer_round_trip_and_refusals() -> None:
    digest = os.urandom(32)
    req = ckks_store.decode_request(ckks_store.encode_request(3, 7, digest, b"query"))
    assert (req.key_version, req.min_head, req.eval_digest, req.query) == (3, 7, digest,
                                                                          b"query")
    for bad in (b"", b"XXXX" + bytes(8), ckks_store.encode_request(3, 7, digest, b"")[:9]):
        with pytest.raises(FormatError):
            ckks_store.decode_request(bad)
    ids = [os.urandom(16 * n) for n in (2, 3)]  # per segment, 16 bytes an id
    answer = ckks_store.CkksAnswer(3, 9, os.urandom(32), os.urandom(32), ["a" * 32, "b" * 32],
                                   [2, 3], ids, 42, b"scores")
    back = ckks_store.decode_answer(ckks_store.encode_answer(answer))
    assert back == answer and back.segments == 2
    lying = ckks_store.CkksAnswer(3, 9, answer.head_hash, answer.set_digest,
                                  answer.segment_ids, [2, 4], ids, 42, b"")
    with pytest.raises(FormatError, match="do not match its counts"):
        ckks_store.decode_answer(ckks_store.encode_answer(lying))


def test_evaluation_keys_head_binds_repository_and_version() -> None:
    body = os.urandom(1000)
    blob = ckks_store.build_eval_object(MAC_KEY, "repo", 2, body)
    head = ckks_store.parse_eval_head(blob, "eval")
    assert head.digest == hashlib.sha256(body).digest()
    assert head.mac == ckks_store.eval_mac(MAC_KEY, "repo", blob)
    assert head.mac != ckks_store.eval_mac(MAC_KEY, "other", blob)
    assert ckks_store.eval_body(blob, "eval", 2, head.digest) == body
    with pytest.raises(FormatError, match="names key version 2, not 3"):
        ckks_store.eval_body(blob, "eval", 3, head.digest)
    altered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(FormatError, match="does not match the digest"):
        ckks_store.eval_body(altered, "eval", 2, head.digest)
    assert ckks_store.eval_keys_key("repo", 2).endswith("/repo/ckks/2")
