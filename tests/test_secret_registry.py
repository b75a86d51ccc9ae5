"""The suite-wide secret scan (tests/conftest.py) really sees the keys the suite makes."""

from __future__ import annotations

import logging

from crypto.index import IndexKey
from crypto.keys import VersionKeys, unwrap_with_password, wrap_with_password


def test_registry_records_keys_and_passwords(secrets_never_logged: list[bytes | str]) -> None:
    keys = VersionKeys.generate(1, IndexKey.generate(8))
    blob = wrap_with_password(b"x", "registry test password", log2_n=10)
    assert unwrap_with_password(blob, "registry test password") == b"x"
    assert keys.data_key in secrets_never_logged
    assert "registry test password" in secrets_never_logged
    logging.getLogger("radcrypt.test").info("a harmless line the scan must accept")
