"""The index MAC of format-2 segments (docs/FORMAT-2.md section 4.1).

A segment's SHA-256 lets the keyless search service reject damage, but anyone who can
write to the bucket can compute one. The MAC, under a key derived from the data key of
the segment's key version, lets a member reject a segment that nobody holding that
version's key wrote. It is a shared-key authenticator, not a signature: who wrote a
segment is proved by the log entry's Ed25519 signature, which the segment's ``writer``
field only has to agree with.

    K_mac = HKDF-SHA256(IKM = data key, salt = 32 zero bytes,
                        info = "radcrypt/index-mac-key/v2", 32 bytes)
    M_seg = LP("radcrypt/segment/v2") || LP(repo_id) || bytes 0..B-1 of the segment
    mac   = HMAC-SHA256(K_mac, M_seg)

The repository id is in the message so that a segment copied into another repository
that happens to share a data key (it never should) still fails.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

MAC_KEY_INFO = b"radcrypt/index-mac-key/v2"
SEGMENT_DOMAIN = b"radcrypt/segment/v2"
MAC_SIZE = 32
KEY_SIZE = 32


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def index_mac_key(data_key: bytes) -> bytes:
    """K_mac of a key version: HKDF-SHA256 of its data key (one output block, so the
    expand step is a single HMAC)."""
    if len(data_key) != KEY_SIZE:
        raise ValueError(f"a data key is {KEY_SIZE} bytes, not {len(data_key)}")
    prk = hmac.new(bytes(32), data_key, hashlib.sha256).digest()
    return hmac.new(prk, MAC_KEY_INFO + b"\x01", hashlib.sha256).digest()


def segment_mac(mac_key: bytes, repo_id: str, body: bytes | memoryview) -> bytes:
    """HMAC-SHA256(mac_key, LP("radcrypt/segment/v2") || LP(repo_id) || body), where
    ``body`` is the segment up to the MAC (header and sections)."""
    if len(mac_key) != KEY_SIZE:
        raise ValueError(f"an index MAC key is {KEY_SIZE} bytes, not {len(mac_key)}")
    mac = hmac.new(mac_key, _lp(SEGMENT_DOMAIN), hashlib.sha256)
    mac.update(_lp(repo_id.encode("utf-8")))
    mac.update(body)
    return mac.digest()


def mac_matches(mac_key: bytes, repo_id: str, body: bytes | memoryview, mac: bytes) -> bool:
    """Whether ``mac`` authenticates ``body`` in ``repo_id`` (constant-time comparison)."""
    return hmac.compare_digest(segment_mac(mac_key, repo_id, body), bytes(mac))
