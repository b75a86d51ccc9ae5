"""Who may ask the search service anything: signed requests from granted users.

Every request carries the user id, a timestamp, a random nonce and an Ed25519 signature
over the method, path, body hash, timestamp, nonce and user id. The service believes
only what the owner keys it was configured with signed: the user records in ``users/``
(which give each user's signing key) and the grants in each repository (which say who
may search it; revocation deletes the grant). Stale timestamps and replayed nonces are
refused; refusals are a bare 401 (who are you?) or 403 (not allowed here), no detail.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
import time
from dataclasses import dataclass, field

from fastapi import HTTPException, Request

from cloud import layout
from cloud.store import ObjectNotFound, ObjectStore
from crypto.errors import FormatError
from crypto.identity import PublicCard, SignatureError, verify
from crypto.signed import json_signer, open_json, open_record

WINDOW_SECONDS = 300
USER_CACHE_SECONDS = 30.0
GRANT_CACHE_SECONDS = 2.0  # a revocation reaches a running service within this delay


def request_message(method: str, path: str, body_sha256: str, stamp: str, nonce: str,
                    user_id: str) -> bytes:
    """The exact bytes a client signs and the service verifies."""
    return "\n".join(["radcrypt-request-v1", method.upper(), path, body_sha256, stamp, nonce,
                      user_id]).encode()


def _deny(status: int) -> HTTPException:
    return HTTPException(status_code=status,
                         detail="unauthorized" if status == 401 else "forbidden")


@dataclass
class RateLimiter:
    """A token bucket per user: ``rate`` requests a second, bursts up to ``burst``."""

    rate: float = 50.0
    burst: float = 100.0
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def allow(self, user: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(user, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[user] = (tokens, now)
                return False
            self._buckets[user] = (tokens - 1.0, now)
            return True


class SignatureVerifier:
    """The service's RequestVerifier for multi-user deployments."""

    def __init__(self, store: ObjectStore, owner_keys: list[bytes],
                 limiter: RateLimiter | None = None, window: int = WINDOW_SECONDS) -> None:
        if not owner_keys:
            raise ValueError("the service needs at least one trusted owner key")
        self.store = store
        self.owner_keys = list(owner_keys)
        self.limiter = limiter or RateLimiter()
        self.window = window
        self._nonces: dict[str, float] = {}
        self._users: dict[str, tuple[float, bytes]] = {}
        self._grants: dict[tuple[str, str], float] = {}  # (repo, user) -> valid until
        self._lock = threading.Lock()

    def verify(self, request: Request, body: bytes, repo_id: str | None) -> str:
        h = request.headers
        user, stamp = h.get("x-radcrypt-user", ""), h.get("x-radcrypt-time", "")
        nonce, signature = h.get("x-radcrypt-nonce", ""), h.get("x-radcrypt-signature", "")
        if not (user and stamp.isdigit() and 16 <= len(nonce) <= 64 and signature):
            raise _deny(401)
        try:
            layout.validate_user_id(user)
            raw_signature = base64.b64decode(signature, validate=True)
        except (ValueError, binascii.Error):
            raise _deny(401) from None
        if abs(time.time() - int(stamp)) > self.window:
            raise _deny(401)
        sign_public = self._user_key(user)
        message = request_message(request.method, request.url.path,
                                  hashlib.sha256(body).hexdigest(), stamp, nonce, user)
        try:
            verify(sign_public, message, raw_signature)
        except SignatureError:
            raise _deny(401) from None
        self._fresh_nonce(user, nonce)
        if not self.limiter.allow(user):
            raise HTTPException(status_code=429, detail="too many requests")
        if repo_id is not None and not self._granted(repo_id, user):
            raise _deny(403)
        return user

    def _fresh_nonce(self, user: str, nonce: str) -> None:
        now = time.time()
        key = f"{user}/{nonce}"
        with self._lock:
            if len(self._nonces) > 100_000:
                self._nonces = {k: t for k, t in self._nonces.items() if t > now}
            if self._nonces.get(key, 0.0) > now:
                raise _deny(401)  # a replay
            self._nonces[key] = now + 2 * self.window

    def _user_key(self, user: str) -> bytes:
        now = time.monotonic()
        with self._lock:
            cached = self._users.get(user)
        if cached and cached[0] > now:
            return cached[1]
        key_name = layout.user_key(user)
        try:
            payload = open_json(self.store.get(key_name), "user", key_name, self.owner_keys)
            card = PublicCard.from_json(str(payload.get("card", "")))
        except (ObjectNotFound, FormatError):
            raise _deny(401) from None
        if card.user_id != user:
            raise _deny(401)
        with self._lock:
            self._users[user] = (now + USER_CACHE_SECONDS, card.sign_public)
        return card.sign_public

    def _granted(self, repo_id: str, user: str) -> bool:
        """A grant for the user exists, signed by the key that signed the manifest.

        Checking costs two object reads and two signatures (about 15 ms), so a positive
        answer is remembered for GRANT_CACHE_SECONDS; a refusal is never remembered, so
        a new grant works at once and a revocation within that delay.
        """
        now = time.monotonic()
        with self._lock:
            if self._grants.get((repo_id, user), 0.0) > now:
                return True
        if not self._check_grant(repo_id, user):
            return False
        with self._lock:
            self._grants[(repo_id, user)] = now + GRANT_CACHE_SECONDS
        return True

    def _check_grant(self, repo_id: str, user: str) -> bool:
        try:
            manifest_name = layout.manifest_key(repo_id)
            manifest = self.store.get(manifest_name)
            owner = json_signer(manifest)
            if owner is None or owner not in self.owner_keys:
                return False
            open_json(manifest, "manifest", manifest_name, [owner])
            grant_name = layout.grant_key(repo_id, user)
            open_record(self.store.get(grant_name), "grant", grant_name, [owner])
        except (ObjectNotFound, FormatError):
            return False
        return True


def parse_owner_keys(text: str) -> list[bytes]:
    """Comma-separated base64 Ed25519 public keys (RADCRYPT_OWNER_KEYS, --owner-key)."""
    keys = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            key = base64.b64decode(item, validate=True)
        except (ValueError, binascii.Error):
            raise ValueError(f"owner key {item[:12]}... is not base64") from None
        if len(key) != 32:
            raise ValueError("an owner key is a 32-byte Ed25519 public key")
        keys.append(key)
    return keys
