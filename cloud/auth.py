"""Who may ask the search service anything: signed requests from current members.

Every request carries the user id, a timestamp, a random nonce and an Ed25519 signature
over the service id (the audience), the method, path, body hash, timestamp, nonce and user
id. The service believes only what its configured owner keys signed:

* authentication (else 401): the user record ``users/<id>.json`` (which gives the user's
  signing key) is validly signed (by a configured owner key, or by a co-owner, whose key
  the authorisation below checks), the request signature
  verifies under that key, the timestamp is within the window and the nonce is new;
* authorisation for a repository (else 403): the repository's manifest is signed by a
  configured owner key or by a co-owner that key endorsed in the manifest
  (docs/FORMAT-2.md 2.4), one of these same owner keys signed the user record (a user
  record is believed only when signed by an owner of the repository in question), the
  manifest is not older
  (by its ``sequence``) than one this process has already seen (no rollback), and the user
  is listed in its ``members`` with the manifest's current ``key_version``. Grant objects do
  not matter here: the service never opens them, and a grant restored after a revocation
  gives nothing. A legacy manifest without members serves nobody.

Refusals are a bare 401 (who are you?) or 403 (not allowed here), no detail, except the
401 of a validly signed request whose time is outside the window, which names the clock
skew (clock_skew); 429 for the
per-user rate limit and 503 (with Retry-After) when the replay cache is full of nonces that
may not be forgotten yet. There is no authenticated request without a repository; one
would be refused (403), since no repository owner vouches for the user there.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import HTTPException

from cloud import layout
from cloud.backend import ObjectNotFound, Store
from cloud.service_options import (  # noqa: F401  (re-exported)
    MAX_NONCES,
    parse_owner_keys,
    validate_service_id,
)
from crypto.errors import FormatError
from crypto.identity import PublicCard, manifest_owners
from crypto.signed import json_signer, open_json

WINDOW_SECONDS = 300
USER_CACHE_SECONDS = 30.0
UNKNOWN_USER_CACHE_SECONDS = 10.0  # a flood of unknown ids costs one store read each per 10 s
MEMBER_CACHE_SECONDS = 2.0  # a revocation reaches a running service within this delay
MAX_CACHED_USERS = 20_000
MAX_STAMP_DIGITS = 12  # Unix seconds until the year 33658
REQUEST_VERSION = "radcrypt-request-v2"
REQUEST_VERSION_V3 = "radcrypt-request-v3"
PROTOCOL_HEADER = "x-radcrypt-protocol"


def request_message(method: str, path: str, body_sha256: str, stamp: str, nonce: str,
                    user_id: str, service_id: str, protocol: int = 1) -> bytes:
    """The exact bytes a client signs and the service verifies (docs/FORMAT.md 16.2).

    Protocol 2 (docs/FORMAT-2.md 8.1) signs "radcrypt-request-v3", the same seven
    lines, then the protocol version in decimal: a signature made for one protocol never
    verifies for the other, so a request cannot be replayed under another body grammar."""
    lines = [REQUEST_VERSION if protocol == 1 else REQUEST_VERSION_V3, method.upper(), path,
             body_sha256, stamp, nonce, user_id, service_id]
    if protocol != 1:
        lines.append(str(protocol))
    return "\n".join(lines).encode()


def request_protocol(headers: Mapping[str, str]) -> int:
    """The protocol a request is made under: its x-radcrypt-protocol header (the Gate has
    already refused any value but "1" and "2"), 1 without one."""
    return 2 if headers.get(PROTOCOL_HEADER, "1") == "2" else 1


def _deny(status: int) -> HTTPException:
    return HTTPException(status_code=status,
                         detail="unauthorized" if status == 401 else "forbidden")


def clock_skew(skew: int, window: int) -> HTTPException:
    """The one 401 that says why: a request signed by a registered user whose time is
    outside the window. Only such a request gets it (the signature is checked first), so
    the reason helps a member whose clock is wrong and tells anyone else nothing; the
    service's clock is public anyway (the Date header)."""
    return HTTPException(status_code=401, detail=(
        f"the request's time is {abs(skew)} s off the service's clock (its clock is "
        f"{'behind' if skew > 0 else 'ahead'}; at most {window} s is accepted): set this "
        "computer's clock (NTP)"))


def strict_stamp(text: str) -> int | None:
    """The x-radcrypt-time value as an int: ASCII digits only, at most 12 of them."""
    if not (0 < len(text) <= MAX_STAMP_DIGITS and text.isascii() and text.isdigit()):
        return None
    return int(text)


@dataclass
class RateLimiter:
    """A token bucket per key (user or client address): ``rate`` requests a second, bursts
    up to ``burst``. Full buckets are forgotten when the table grows past ``max_keys``."""

    rate: float = 50.0
    burst: float = 100.0
    max_keys: int = 100_000
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) >= self.max_keys and key not in self._buckets:
                self._forget_full(now)
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1.0, now)
            return True

    def retry_after(self) -> int:
        return max(1, math.ceil(1.0 / self.rate)) if self.rate > 0 else 60

    def _forget_full(self, now: float) -> None:
        """Buckets that have refilled are the same as no bucket: drop them."""
        self._buckets = {k: (t, last) for k, (t, last) in self._buckets.items()
                         if t + (now - last) * self.rate < self.burst}
        if len(self._buckets) >= self.max_keys:  # all busy: forget the oldest half
            oldest = sorted(self._buckets.items(), key=lambda kv: kv[1][1])
            self._buckets = dict(oldest[len(oldest) // 2:])


class NonceCacheFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("the replay cache is full")
        self.retry_after = retry_after


class NonceCache:
    """Nonces seen, each kept until its timestamp leaves the window (a replay after that
    is refused as stale). Bounded: when full of unexpired nonces, ``add`` raises
    NonceCacheFull rather than forgetting one (which would let its request be replayed)."""

    def __init__(self, capacity: int = MAX_NONCES) -> None:
        self.capacity = capacity
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, key: str, expires: float) -> bool:
        """False when ``key`` was seen and has not expired (a replay)."""
        now = time.time()
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                when, old = heapq.heappop(self._heap)
                if self._expiry.get(old) == when:
                    del self._expiry[old]
            if self._expiry.get(key, 0.0) > now:
                return False
            if len(self._expiry) >= self.capacity:
                raise NonceCacheFull(max(1, math.ceil(self._heap[0][0] - now)))
            self._expiry[key] = expires
            heapq.heappush(self._heap, (expires, key))
            return True


@dataclass(frozen=True)
class _UserKey:
    owner: bytes  # the owner key that signed the user record
    sign_public: bytes
    verifier: Ed25519PublicKey  # parsed once: a verification is then about 0.1 ms


def verify_request_signature(key: Ed25519PublicKey, message: bytes, signature: bytes) -> bool:
    """Ed25519 (RFC 8032) through the `cryptography` package (OpenSSL): about ten times
    faster than pure-Python verification, which counted in every search's round trip."""
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


class SignatureVerifier:
    """The service's RequestVerifier: signed requests from members of signed manifests."""

    def __init__(self, store: Store, owner_keys: list[bytes], service_id: str,
                 limiter: RateLimiter | None = None, window: int = WINDOW_SECONDS,
                 max_nonces: int = MAX_NONCES) -> None:
        if not owner_keys:
            raise ValueError("the service needs at least one trusted owner key")
        self.store = store
        self.owner_keys = list(owner_keys)
        self.service_id = validate_service_id(service_id)
        self.limiter = limiter or RateLimiter()
        self.window = window
        self.nonces = NonceCache(max_nonces)
        self._users: dict[str, tuple[float, _UserKey | None]] = {}
        self._members: dict[tuple[str, str], float] = {}  # (repo, user) -> valid until
        self._sequence: dict[str, int] = {}  # highest manifest sequence seen per repository
        # manifest name -> (SHA-256 of the bytes verified, their signer, their payload)
        self._opened: dict[str, tuple[bytes, tuple[bytes, ...], Mapping[str, object]]] = {}
        self._lock = threading.Lock()

    # --- authentication (401) ----------------------------------------------------------

    def verify(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
               repo: str | None) -> str:
        """The user id, or HTTPException 401/403/422/429/503."""
        user = self._verify(method, path, headers, body, repo, offline=False)
        assert user is not None
        return user

    def verify_offline(self, method: str, path: str, headers: Mapping[str, str],
                       body: bytes, repo: str | None) -> str | None:
        """As verify, but without reading the store: None (and nothing consumed, not even
        the nonce) when the user's record or the membership is not cached, so the caller
        runs verify in a worker thread. The Gate calls this on the event loop: a warm
        request (about 0.2 ms of CPU) then skips a thread hand-over, which on a loaded
        machine cost more than the check itself."""
        return self._verify(method, path, headers, body, repo, offline=True)

    def _verify(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
                repo: str | None, *, offline: bool) -> str | None:
        user, stamp = headers.get("x-radcrypt-user", ""), headers.get("x-radcrypt-time", "")
        nonce, signature = headers.get("x-radcrypt-nonce", ""), headers.get(
            "x-radcrypt-signature", "")
        when = strict_stamp(stamp)
        if not (user and when is not None and 16 <= len(nonce) <= 64 and nonce.isascii()
                and "\n" not in nonce and 0 < len(signature) <= 128):
            raise _deny(401)
        try:
            layout.validate_user_id(user)
            raw_signature = base64.b64decode(signature, validate=True)
        except (ValueError, binascii.Error):
            raise _deny(401) from None
        skew = round(time.time() - when)
        key = self._cached_user_key(user) if offline else self._user_key(user)
        if key is None:
            return None
        message = request_message(method, path, hashlib.sha256(body).hexdigest(), stamp,
                                  nonce, user, self.service_id, request_protocol(headers))
        if not verify_request_signature(key.verifier, message, raw_signature):
            raise _deny(401)
        if abs(skew) > self.window:  # checked after the signature: see clock_skew
            raise clock_skew(skew, self.window)
        if offline and not (repo is not None and self._member_cached(repo, user)):
            return None
        try:
            fresh = self.nonces.add(f"{user}/{nonce}", when + self.window + 1)
        except NonceCacheFull as full:
            raise HTTPException(status_code=503, detail="busy, try again later",
                                headers={"Retry-After": str(full.retry_after)}) from None
        if not fresh:
            raise _deny(401)  # a replay
        if not self.limiter.allow(user):
            raise HTTPException(status_code=429, detail="too many requests",
                                headers={"Retry-After": str(self.limiter.retry_after())})
        if repo is None:
            raise _deny(403)
        try:
            repo_id = layout.validate_repo_id(repo)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        if not self._is_member(repo_id, user, key.owner):
            raise _deny(403)
        return user

    def _cached_user_key(self, user: str) -> _UserKey | None:
        """The user's key if cached and fresh (a cached refusal is a 401 at once); None
        when only the store can say."""
        with self._lock:
            cached = self._users.get(user)
        if cached is None or cached[0] <= time.monotonic():
            return None
        if cached[1] is None:
            raise _deny(401)
        return cached[1]

    def _member_cached(self, repo: str, user: str) -> bool:
        with self._lock:
            return self._members.get((repo, user), 0.0) > time.monotonic()

    def _user_key(self, user: str) -> _UserKey:
        """The user's signing key from a record signed by a configured owner key; unknown
        users are remembered as refusals for UNKNOWN_USER_CACHE_SECONDS."""
        now = time.monotonic()
        with self._lock:
            cached = self._users.get(user)
        if cached and cached[0] > now:
            if cached[1] is None:
                raise _deny(401)
            return cached[1]
        key_name = layout.user_key(user)
        found: _UserKey | None = None
        try:
            blob = self.store.get(key_name)
            owner = json_signer(blob)
            if owner is not None:  # a configured key or a co-owner's: _is_member decides
                payload = open_json(blob, "user", key_name, [owner])
                card = PublicCard.from_json(str(payload.get("card", "")))
                if card.user_id == user:
                    found = _UserKey(owner, card.sign_public,
                                     Ed25519PublicKey.from_public_bytes(card.sign_public))
        except (ObjectNotFound, FormatError, ValueError):
            found = None
        ttl = USER_CACHE_SECONDS if found is not None else UNKNOWN_USER_CACHE_SECONDS
        with self._lock:
            if len(self._users) >= MAX_CACHED_USERS:
                self._users = {u: c for u, c in self._users.items() if c[0] > now}
                if len(self._users) >= MAX_CACHED_USERS:  # forgetting costs a read, no more
                    self._users.clear()
            self._users[user] = (now + ttl, found)
        if found is None:
            raise _deny(401)
        return found

    # --- authorisation (403) -----------------------------------------------------------

    def _is_member(self, repo_id: str, user: str, record_owner: bytes) -> bool:
        """The check costs a store read and a signature (a few ms), so a positive answer is
        remembered for MEMBER_CACHE_SECONDS; a refusal is never remembered, so a new member
        is served at once and a revocation within that delay."""
        now = time.monotonic()
        with self._lock:
            if self._members.get((repo_id, user), 0.0) > now:
                return True
        if not self._check_membership(repo_id, user, record_owner):
            return False
        with self._lock:
            self._members[(repo_id, user)] = now + MEMBER_CACHE_SECONDS
        return True

    def _check_membership(self, repo_id: str, user: str, record_owner: bytes) -> bool:
        try:
            name = layout.manifest_key(repo_id)
            blob = self.store.get(name)
            opened = self._open_manifest(name, blob)
        except (ObjectNotFound, FormatError):
            return False
        if opened is None:
            return False
        owners, payload = opened
        if not any(hmac.compare_digest(k, record_owner) for k in owners):
            return False  # the user record was signed by another owner than this repository's
        membership = manifest_membership(payload)
        if membership is None:
            return False  # a legacy manifest (no members, no sequence): nobody is served
        sequence, key_version, members = membership
        with self._lock:
            highest = self._sequence.get(repo_id, 0)
            if sequence < highest:
                return False  # a rollback to an older manifest
            self._sequence[repo_id] = sequence
        return members.get(user) == key_version


    def _open_manifest(self, name: str, blob: bytes
                       ) -> tuple[tuple[bytes, ...], Mapping[str, object]] | None:
        """(owner keys, payload) of a manifest signed by a configured owner key or by a
        co-owner that key endorsed in it, or None; the owner keys are the configured one
        and its co-owners' (crypto.identity.manifest_owners).
        The check of the same bytes is remembered (by their SHA-256): the re-check every
        MEMBER_CACHE_SECONDS then costs the store read, not a signature verification
        (3.5 ms in pure Python). Changed bytes are verified again."""
        digest = hashlib.sha256(blob).digest()
        with self._lock:
            known = self._opened.get(name)
        if known is not None and hmac.compare_digest(known[0], digest):
            return known[1], known[2]
        opened = open_manifest(blob, name, self.owner_keys)
        if opened is None:
            return None
        keys, payload = opened
        with self._lock:
            if len(self._opened) >= MAX_CACHED_USERS:
                self._opened.clear()
            self._opened[name] = (digest, keys, payload)
        return keys, payload


def open_manifest(blob: bytes, name: str, owner_keys: Sequence[bytes]
                  ) -> tuple[tuple[bytes, ...], Mapping[str, object]] | None:
    """(owner keys, payload) of the manifest object ``name`` when it is signed by one of
    ``owner_keys`` or by a co-owner one of them endorsed in it (crypto.identity
    manifest_owners), else None; the owner keys are the root and its co-owners'.
    FormatError (SignatureError) for a manifest that does not parse or verify."""
    signer = json_signer(blob)
    if signer is None:
        return None
    payload = open_json(blob, "manifest", name, [signer])
    owners = manifest_owners(payload, layout.parse_manifest_key(name), signer)
    if not any(hmac.compare_digest(owners.root, k) for k in owner_keys):
        return None
    return tuple(owners.keys.values()) or (owners.root,), payload


def manifest_membership(payload: Mapping[str, object]
                        ) -> tuple[int, int, dict[str, int]] | None:
    """(sequence, key_version, {user_id: key_version}) of a manifest payload, or None when
    the fields are missing or malformed (the shared manifest contract, DESIGN §3)."""
    sequence, key_version = payload.get("sequence"), payload.get("key_version")
    members = payload.get("members")
    if not (type(sequence) is int and sequence >= 1 and type(key_version) is int
            and isinstance(members, list)):
        return None
    found: dict[str, int] = {}
    for entry in members:
        if not isinstance(entry, dict):
            return None
        user_id, version = entry.get("user_id"), entry.get("key_version")
        if not isinstance(user_id, str) or type(version) is not int or user_id in found:
            return None
        found[user_id] = version
    return sequence, key_version, found
