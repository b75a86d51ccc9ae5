"""A real keyring backend that keeps passwords in this process: the tests' OS keyring.

Why not the workstation's keyring: a test must never read or write the developer's
secrets (and CI has none). Why not a mock: app/integration/secrets.py talks to the
``keyring`` library's public functions, and this backend is installed the way any backend
is (``keyring.set_keyring``), so the library's own dispatch and errors are exercised.

    from memory_keyring import use_memory_keyring    # tests/integration/ is on sys.path
    with use_memory_keyring() as ring:              # ring.entries: {(service, user): pw}
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keyring
import keyring.backend
from keyring.errors import PasswordDeleteError


class MemoryKeyring(keyring.backend.KeyringBackend):
    """Passwords in a dict, keyed by (service, user name)."""

    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.entries.pop((service, username), None) is None:
            raise PasswordDeleteError(f"no password for {username}")


@contextlib.contextmanager
def use_memory_keyring() -> Iterator[MemoryKeyring]:
    """Install a fresh MemoryKeyring; put the previous backend back afterwards."""
    previous = keyring.get_keyring()
    ring = MemoryKeyring()
    keyring.set_keyring(ring)
    try:
        yield ring
    finally:
        keyring.set_keyring(previous)
