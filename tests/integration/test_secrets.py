"""DICOMweb passwords in the OS keyring (app/integration/secrets.py), through the keyring
library with a real in-process backend (tests/integration/memory_keyring.py), the
library's own "no keyring" backend, and a locked one.

Checked: one entry per node, user and server origin (a node moved to another server does
not take the password along); replace and delete; a missing password asked through the
caller's prompt or refused in words that name the node and the user; keyring failures in
words that never carry the secret; the node config (DicomNode) has no place for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import keyring
import pytest
from keyring.backends import fail
from keyring.errors import KeyringLocked

from app.integration import secrets
from app.integration.model import DicomNode

try:
    from memory_keyring import MemoryKeyring, use_memory_keyring
except ImportError:  # pragma: no cover
    from tests.integration.memory_keyring import MemoryKeyring, use_memory_keyring

SECRET = "pacs keyring secret 51 harbour"
NODE = DicomNode(name="pacs-1", dicomweb_url="https://pacs.example.org/dicom-web",
                 username="radiology")


@pytest.fixture
def ring(secrets_never_logged: list[bytes | str]) -> Iterator[MemoryKeyring]:
    secrets_never_logged.append(SECRET)
    with use_memory_keyring() as backend:
        yield backend


def test_set_get_replace_delete(ring: MemoryKeyring) -> None:
    assert secrets.get_password(NODE) is None and not secrets.has_password(NODE)
    secrets.set_password(NODE, "first one")
    secrets.set_password(NODE, SECRET)
    assert ring.entries == {
        ("radcrypt-dicomweb", "pacs-1/radiology@https://pacs.example.org:443"): SECRET}
    assert keyring.get_password("radcrypt-dicomweb", secrets.account(NODE)) == SECRET
    assert secrets.get_password(NODE) == SECRET and secrets.has_password(NODE)
    assert secrets.password_for(NODE) == SECRET
    assert secrets.delete_password(NODE) is True
    assert secrets.delete_password(NODE) is False and ring.entries == {}


def test_the_password_is_bound_to_node_user_and_server(ring: MemoryKeyring) -> None:
    secrets.set_password(NODE, SECRET)
    same = dataclasses.replace(NODE, dicomweb_url="https://PACS.example.org:443/other-root")
    assert secrets.get_password(same) == SECRET  # same origin: scheme, host, port
    for other in (dataclasses.replace(NODE, dicomweb_url="https://evil.example.org/dicom-web"),
                  dataclasses.replace(NODE, dicomweb_url="http://pacs.example.org/dicom-web"),
                  dataclasses.replace(NODE, dicomweb_url="https://pacs.example.org:8443/dw"),
                  dataclasses.replace(NODE, username="someone-else"),
                  dataclasses.replace(NODE, name="pacs-2")):
        assert secrets.get_password(other) is None, other


def test_a_missing_password_is_asked_for_or_refused_by_name(ring: MemoryKeyring) -> None:
    prompts: list[str] = []

    def ask(prompt: str) -> str:
        prompts.append(prompt)
        return SECRET

    assert secrets.password_for(NODE, ask) == SECRET
    assert prompts == ["DICOMweb password for radiology at node pacs-1: "]
    assert ring.entries == {}  # a prompt's answer is not kept unless the caller sets it
    with pytest.raises(secrets.PasswordMissing, match="node pacs-1 needs the DICOMweb "
                                                      "password of user radiology"):
        secrets.password_for(NODE)
    with pytest.raises(secrets.PasswordMissing):
        secrets.password_for(NODE, lambda prompt: "")
    with pytest.raises(secrets.SecretError, match="the DICOMweb password is empty"):
        secrets.set_password(NODE, "")
    with pytest.raises(secrets.SecretError, match="node anon has no DICOMweb user"):
        secrets.set_password(DicomNode(name="anon", dicomweb_url="http://h/dw"), SECRET)


def test_no_keyring_on_the_system_says_so() -> None:
    previous = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    try:
        with pytest.raises(secrets.SecretError, match="no keyring is available") as caught:
            secrets.set_password(NODE, SECRET)
        assert SECRET not in str(caught.value)
        assert secrets.get_password(NODE) is None
        assert secrets.delete_password(NODE) is False
        with pytest.raises(secrets.PasswordMissing, match="pacs-1"):
            secrets.password_for(NODE)
    finally:
        keyring.set_keyring(previous)


class LockedKeyring(MemoryKeyring):
    """A keyring whose every use fails as a locked one does, echoing what it was given
    (some backends do): our message must not pass that text on."""

    def get_password(self, service: str, username: str) -> str | None:
        raise KeyringLocked(f"locked while reading {username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        raise KeyringLocked(f"locked, could not store {password}")


def test_a_locked_keyring_never_echoes_the_secret() -> None:
    with use_memory_keyring():
        keyring.set_keyring(LockedKeyring())
        with pytest.raises(secrets.SecretError, match="keyring is locked") as caught:
            secrets.set_password(NODE, SECRET)
        assert SECRET not in str(caught.value)
        with pytest.raises(secrets.SecretError, match="cannot read the DICOMweb password "
                                                      "of node pacs-1"):
            secrets.get_password(NODE)


def test_the_node_config_has_no_place_for_a_password() -> None:
    assert not any("pass" in f.name or "secret" in f.name
                   for f in dataclasses.fields(DicomNode))
    assert SECRET not in repr(NODE) and SECRET not in str(NODE.as_dict())
