"""This workstation's user identity: created once, unlocked with the password each run.

The identity file holds the user's private keys under a scrypt-derived key
(crypto/identity.py); it is written atomically with owner-only permissions. Nothing
else about the user is stored in clear except the public card.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path

from app.core.errors import AccessDenied, RadcryptError
from crypto.errors import FormatError
from crypto.identity import Identity, PublicCard, open_identity, seal_identity
from crypto.keys import DEFAULT_SCRYPT_LOG2_N, WrongPassword

IDENTITY_FILE = "identity.rcid"
CARD_FILE = "identity.card.json"
MIN_PASSWORD_LENGTH = 8


def password_strength(password: str) -> tuple[int, str]:
    """A 0..4 score and plain words; length and variety, not a promise of safety."""
    if not password:
        return 0, "empty"
    classes = sum(any(f(c) for c in password) for f in (str.islower, str.isupper, str.isdigit))
    classes += any(not c.isalnum() for c in password)
    length = len(password)
    if length < MIN_PASSWORD_LENGTH:
        return 0, f"too short: use at least {MIN_PASSWORD_LENGTH} characters"
    score = 1 + (length >= 12) + (length >= 16) + (classes >= 3)
    words = {1: "weak", 2: "fair", 3: "good", 4: "strong"}[min(score, 4)]
    return min(score, 4), words


class RequestSigner:
    """Signs search-service requests with the user's Ed25519 key (cloud/auth.py checks)."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity

    def headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        from cloud.auth import request_message

        stamp = str(int(time.time()))
        nonce = secrets.token_hex(16)
        message = request_message(method, path, hashlib.sha256(body).hexdigest(), stamp, nonce,
                                  self._identity.user_id)
        import base64

        return {"x-radcrypt-user": self._identity.user_id, "x-radcrypt-time": stamp,
                "x-radcrypt-nonce": nonce,
                "x-radcrypt-signature": base64.b64encode(self._identity.sign(message)).decode()}


class IdentityStore:
    """The identity file in the user's data directory."""

    def __init__(self, data_dir: Path, scrypt_log2_n: int = DEFAULT_SCRYPT_LOG2_N) -> None:
        self.path = Path(data_dir) / IDENTITY_FILE
        self.scrypt_log2_n = scrypt_log2_n

    def exists(self) -> bool:
        return self.path.exists()

    def create(self, name: str, password: str) -> Identity:
        if self.exists():
            raise RadcryptError(f"an identity already exists in {self.path.parent}")
        score, words = password_strength(password)
        if score == 0:
            raise RadcryptError(f"password {words}")
        try:
            identity = Identity.generate(name)
        except ValueError as exc:
            raise RadcryptError(str(exc)) from None
        self._write(seal_identity(identity, password, self.scrypt_log2_n))
        self.card_path.write_text(identity.card().to_json(), encoding="utf-8")
        return identity

    @property
    def card_path(self) -> Path:
        return self.path.with_name(CARD_FILE)

    def card(self) -> PublicCard:
        """The public card, readable without the password."""
        try:
            return PublicCard.from_json(self.card_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RadcryptError("no identity on this workstation: create one first") from None
        except FormatError as exc:
            raise RadcryptError(f"the public card {self.card_path} is damaged: {exc}") from None

    def _write(self, blob: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(blob)
        tmp.replace(self.path)

    def unlock(self, password: str) -> Identity:
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            raise RadcryptError("no identity on this workstation: create one first") from None
        try:
            return open_identity(blob, password)
        except WrongPassword:
            raise AccessDenied("wrong password: the identity stays locked") from None
        except FormatError as exc:
            raise RadcryptError(f"the identity file {self.path} is damaged: {exc}") from None
