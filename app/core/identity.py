"""This workstation's user identity: created once, unlocked with the password each run.

The identity file holds the user's private keys under a scrypt-derived key
(crypto/identity.py); it is written atomically with owner-only permissions from the
moment it exists (never created readable and narrowed afterwards), and no link planted
where it or its temporary file go is followed. Nothing else about the user is stored in
clear except the public card.

A new identity's password must score at least 3 of 4 with zxcvbn (Dropbox's estimator of
guesses: dictionaries, names, keyboard patterns, dates, leetspeak) and be at least 12
characters long; the identity file is the one thing protecting the user's private keys
once it is copied off the workstation, so its password is what an offline guesser attacks.

Backup (``export_backup`` / ``restore_backup``). Losing the workstation must not lose the
identity: the owner's key signs the manifest and the grants. A backup file holds the
private keys under a separate backup passphrase (crypto/identity.py, docs/FORMAT-2.md 12),
never under the login password: the login password is typed every day and may be
shared with a password manager, the backup passphrase is written on paper and kept with
the backup medium. It must pass the same zxcvbn rule and differ from the login password.
Restoring writes a new identity file (under a new login password) into an empty data
directory, as on a new workstation.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from app.core.errors import RadcryptError
from app.core.errors import WrongPassword as IdentityLocked
from crypto.errors import FormatError
from crypto.identity import (
    BACKUP_LOG2_N,
    Identity,
    PublicCard,
    WrongBackupPassphrase,
    open_backup,
    open_identity,
    seal_backup,
    seal_identity,
)
from crypto.keys import DEFAULT_SCRYPT_LOG2_N, WrongPassword

IDENTITY_FILE = "identity.rcid"
CARD_FILE = "identity.card.json"
MIN_PASSWORD_LENGTH = 12
MIN_PASSWORD_SCORE = 3  # zxcvbn 0..4; 3: >= 10^8 guesses, "moderate protection from an
#                         offline slow-hash scenario" (scrypt is that slow hash)
STRENGTH_WORDS = ("very weak", "weak", "fair", "good", "strong")
_ZXCVBN_MAX_LENGTH = 72  # zxcvbn refuses longer input; the first 72 characters bound it


def _assess(password: str, user_inputs: list[str] | None = None) -> tuple[int, str]:
    """zxcvbn's score (capped below MIN_PASSWORD_SCORE when too short) and its advice."""
    from zxcvbn import zxcvbn

    result = zxcvbn(password[:_ZXCVBN_MAX_LENGTH],
                    user_inputs=[u for u in (user_inputs or []) if u])
    score = max(0, min(4, int(result["score"])))
    feedback = result.get("feedback") or {}
    advice = [str(feedback.get("warning") or "").strip(),
              *(str(s).strip() for s in feedback.get("suggestions") or [])]
    if len(password) < MIN_PASSWORD_LENGTH:
        score = min(score, MIN_PASSWORD_SCORE - 1)
        advice.insert(0, f"Too short: use at least {MIN_PASSWORD_LENGTH} characters.")
    if score < MIN_PASSWORD_SCORE and not any(advice):
        advice.append("Add another word or two. Uncommon words are better.")
    return score, " ".join(a if a.endswith(".") else a + "." for a in advice if a)


def password_strength(password: str, user_inputs: list[str] | None = None
                      ) -> tuple[int, str]:
    """zxcvbn's 0..4 score and plain words (with its warning and suggestions when weak).

    Shorter than MIN_PASSWORD_LENGTH scores at most 2 whatever zxcvbn thinks. A score
    is an estimate of guessing work, not a promise of safety.
    """
    if not password:
        return 0, "empty"
    score, advice = _assess(password, user_inputs)
    if score < MIN_PASSWORD_SCORE:
        return score, f"{STRENGTH_WORDS[score]}: {advice}"
    return score, STRENGTH_WORDS[score]


def check_new_password(password: str, name: str = "") -> str:
    """The strength in words when ``password`` may protect a new identity; else
    RadcryptError saying why in plain words (zxcvbn's feedback, never the password)."""
    if not password:
        raise RadcryptError("the password is empty")
    score, advice = _assess(password, [name])
    if score < MIN_PASSWORD_SCORE:
        raise RadcryptError(
            f"this password is too easy to guess ({STRENGTH_WORDS[score]}, {score} of 4; "
            f"{MIN_PASSWORD_SCORE} needed). {advice} A few unrelated words, "
            f"{MIN_PASSWORD_LENGTH} characters or more, work well.")
    return STRENGTH_WORDS[score]


class RequestSigner:
    """Signs search-service requests with the user's Ed25519 key (cloud/auth.py checks)."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity

    def headers(self, method: str, path: str, body: bytes, service_id: str,
                protocol: int = 1) -> dict[str, str]:
        """Headers for one request to the service ``service_id`` (its GET /v1/info): the
        signature names that service and the protocol version, so the request is refused by
        any other service and cannot be replayed under the other protocol."""
        from app.core.service_client import signed_headers

        return signed_headers(self._identity, method, path, body, service_id, protocol)


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
        check_new_password(password, name)
        try:
            identity = Identity.generate(name)
        except ValueError as exc:
            raise RadcryptError(str(exc)) from None
        self._write(seal_identity(identity, password, self.scrypt_log2_n))
        _write_new_file(self.card_path, identity.card().to_json().encode("utf-8"), 0o644)
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
        except UnicodeDecodeError:  # found by tests/fuzz/test_file_fuzz.py
            raise RadcryptError(f"the public card {self.card_path} is damaged: it is not "
                                "UTF-8 text") from None
        except FormatError as exc:
            raise RadcryptError(f"the public card {self.card_path} is damaged: {exc}") from None

    def _write(self, blob: bytes) -> None:
        _write_new_file(self.path, blob, 0o600)

    def change_password(self, old: str, new: str) -> Identity:
        """Re-encrypt the identity under ``new`` (the same zxcvbn rule as a new identity);
        the file is replaced atomically, so a crash leaves the old or the new one."""
        identity = self.unlock(old)
        check_new_password(new, identity.name)
        self._write(seal_identity(identity, new, self.scrypt_log2_n))
        return identity

    def unlock(self, password: str) -> Identity:
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            raise RadcryptError("no identity on this workstation: create one first") from None
        try:
            return open_identity(blob, password)
        except WrongPassword:
            raise IdentityLocked("wrong password: the identity stays locked") from None
        except FormatError as exc:
            raise RadcryptError(f"the identity file {self.path} is damaged: {exc}") from None


def export_backup(store: IdentityStore, password: str, passphrase: str, out: Path,
                  log2_n: int = BACKUP_LOG2_N) -> Identity:
    """Write the identity's private keys to ``out`` under ``passphrase`` (module
    docstring); ``password`` unlocks the identity first. ``out`` must not exist yet
    (a backup is never overwritten by mistake); it is written 0600, atomically."""
    identity = store.unlock(password)
    if passphrase == password:
        raise RadcryptError("the backup passphrase must differ from your login password: "
                            "choose a separate one and keep it with the backup")
    check_new_password(passphrase, identity.name)
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise RadcryptError(f"{out} already exists: choose another file for the backup")
    try:
        blob = seal_backup(identity, passphrase, log2_n)
    except ValueError as exc:
        raise RadcryptError(str(exc)) from None
    try:
        _write_new_file(out, blob, 0o600)
    except OSError as exc:
        raise RadcryptError(f"cannot write the identity backup {out}: "
                            f"{exc.strerror or exc}") from None
    return identity


def read_backup(path: Path, passphrase: str) -> Identity:
    """The identity in the backup file ``path``: IdentityLocked for a wrong passphrase,
    RadcryptError naming the file when it is missing, not a backup, or was changed."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise RadcryptError(f"no identity backup at {path}") from None
    except OSError as exc:
        raise RadcryptError(f"cannot read the identity backup {path}: "
                            f"{exc.strerror or exc}") from None
    try:
        return open_backup(blob, passphrase)
    except WrongBackupPassphrase:
        raise IdentityLocked(f"wrong passphrase: the identity backup {path} stays locked"
                             ) from None
    except FormatError as exc:
        raise RadcryptError(f"the identity backup {path} cannot be used: {exc}") from None


def restore_backup(store: IdentityStore, path: Path, passphrase: str,
                   new_password: str) -> Identity:
    """Restore the identity in the backup ``path`` into ``store``'s data directory (which
    must have no identity yet), encrypted under ``new_password`` (the zxcvbn rule), and
    write its public card beside it. The same user id and keys as before: repositories
    and grants of that user open again once the workstation pins their owners anew."""
    if store.exists():
        raise RadcryptError(f"an identity already exists in {store.path.parent}: restore "
                            "into a new data directory (--data-dir)")
    identity = read_backup(path, passphrase)
    check_new_password(new_password, identity.name)
    store._write(seal_identity(identity, new_password, store.scrypt_log2_n))
    _write_new_file(store.card_path, identity.card().to_json().encode("utf-8"), 0o644)
    return identity


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically through a temporary file that this call creates itself.

    The temporary file is opened with O_CREAT|O_EXCL|O_NOFOLLOW and its final ``mode``
    (0600 for the identity): it never exists with wider permissions, and a symbolic link
    planted at its name is neither followed nor written through (O_EXCL fails on any
    existing name, links included; the stale name is unlinked, which removes the link and
    not its target, and the open is tried once more). The data is fsynced, then renamed
    over ``path``; rename replaces a link at ``path`` itself and never writes through it.
    On Windows there are no such modes or links: the file inherits the ACL of the user's
    profile directory (the data directory lives in it), which other users cannot read.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_BINARY", 0))
    try:
        fd = os.open(tmp, flags, mode)
    except FileExistsError:  # left by a crash, or planted: remove the name, never follow it
        os.unlink(tmp)
        try:
            fd = os.open(tmp, flags, mode)
        except FileExistsError:
            raise RadcryptError(f"cannot write {path}: {tmp} keeps reappearing") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
