"""DICOMweb passwords in the OS keyring (macOS Keychain, Windows Credential Locker, the
Secret Service on Linux), through the ``keyring`` library; never in the node config.

Why the keyring and not our identity file: a PACS password belongs to the hospital account
of the person at this workstation, not to a repository; the OS already guards it with the
session login, and other tools (and the IT department) know where to find and revoke it.

One entry per node *and* server: service ``radcrypt-dicomweb``, account
``NODE/USER@scheme://host:port``. Keying by the server's origin means that editing a node's
URL to point somewhere else does not send the old server's password there: the user is asked
again. A missing password is asked for through the caller's ``ask`` (the CLI's getpass, the
GUI's dialog) or raised as PasswordMissing, in words that name the node, never the secret.

Public API: ``set_password(node, password)``, ``get_password(node) -> str | None``,
``delete_password(node) -> bool``, ``password_for(node, ask=None) -> str``,
``has_password(node) -> bool``.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from app.core.errors import RadcryptError
from app.integration.model import DicomNode

SERVICE = "radcrypt-dicomweb"


class SecretError(RadcryptError):
    """The keyring could not be used (none installed, locked, refused)."""


class PasswordMissing(SecretError):
    """No password stored for a node that needs one, and no one to ask."""


def account(node: DicomNode) -> str:
    """The keyring account name of a node's DICOMweb login (no secret in it)."""
    if not node.username:
        raise SecretError(f"node {node.name} has no DICOMweb user: no password to keep")
    parts = urlsplit(node.dicomweb_url)
    if not parts.scheme or not parts.hostname:
        raise SecretError(f"node {node.name} has no valid DICOMweb URL: its password would "
                          "not know which server it is for")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{node.name}/{node.username}@{parts.scheme}://{parts.hostname.lower()}:{port}"


def set_password(node: DicomNode, password: str) -> None:
    """Keep the node's DICOMweb password in the OS keyring (replacing any old one)."""
    if not password:
        raise SecretError(f"node {node.name}: the DICOMweb password is empty")
    import keyring
    from keyring.errors import KeyringError

    try:
        keyring.set_password(SERVICE, account(node), password)
    except KeyringError as exc:
        raise SecretError(f"cannot keep the DICOMweb password of node {node.name} in the OS "
                          f"keyring: {_why(exc)}") from None


def get_password(node: DicomNode) -> str | None:
    """The stored password, or None when there is none (or no usable keyring)."""
    import keyring
    from keyring.errors import KeyringError, NoKeyringError

    try:
        return keyring.get_password(SERVICE, account(node))
    except NoKeyringError:
        return None
    except KeyringError as exc:
        raise SecretError(f"cannot read the DICOMweb password of node {node.name} from the "
                          f"OS keyring: {_why(exc)}") from None


def has_password(node: DicomNode) -> bool:
    return bool(node.username) and get_password(node) is not None


def delete_password(node: DicomNode) -> bool:
    """Forget the node's password (when the node is removed); False when none was kept."""
    if not node.username:
        return False
    import keyring
    from keyring.errors import KeyringError, NoKeyringError, PasswordDeleteError

    try:
        keyring.delete_password(SERVICE, account(node))
    except (PasswordDeleteError, NoKeyringError):
        return False
    except KeyringError as exc:
        raise SecretError(f"cannot remove the DICOMweb password of node {node.name} from the "
                          f"OS keyring: {_why(exc)}") from None
    return True


def password_for(node: DicomNode, ask: Callable[[str], str] | None = None) -> str:
    """The keyring's password for the node; else ``ask(prompt)`` (not stored: the caller
    offers to keep it with ``set_password``); else PasswordMissing."""
    password = get_password(node)
    if password:
        return password
    if ask is not None:
        answer = ask(f"DICOMweb password for {node.username} at node {node.name}: ")
        if answer:
            return answer
    raise PasswordMissing(
        f"node {node.name} needs the DICOMweb password of user {node.username} and none is "
        "kept in the OS keyring: set it in Settings > DICOM nodes (or `radcrypt pacs node "
        f"passwd {node.name}`)")


def _why(exc: Exception) -> str:
    """The keyring's reason in a few words: its class, never its text (a backend may echo
    what it was given)."""
    from keyring.errors import KeyringLocked, NoKeyringError

    if isinstance(exc, NoKeyringError):
        return "no keyring is available on this system (install or unlock one)"
    if isinstance(exc, KeyringLocked):
        return "the keyring is locked"
    return type(exc).__name__
