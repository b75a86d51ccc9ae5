"""The idle-lock setting (app/core/settings.py ``lock_minutes``): default 10 minutes, set
by the settings file or RADCRYPT_LOCK_MINUTES, 1 to 240, never off; and the session's
lock helpers (app/core/session.py): a locked identity names its user and holds no key,
an emptied signer signs nothing until it is given an identity again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.core.errors import RadcryptError
from app.core.session import LockableSigner, LockedIdentity
from app.core.settings import DEFAULT_LOCK_MINUTES, load_settings, save_settings
from crypto.identity import Identity


def test_lock_minutes_default_file_environment_and_bounds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "config.json"
    assert load_settings(file).lock_minutes == DEFAULT_LOCK_MINUTES == 10
    file.write_text(json.dumps({"lock_minutes": 3}))
    assert load_settings(file).lock_minutes == 3
    monkeypatch.setenv("RADCRYPT_LOCK_MINUTES", "7")
    assert load_settings(file).lock_minutes == 7
    assert load_settings(file, lock_minutes=2).lock_minutes == 2
    for bad in ("0", "241", "ten", "-1"):
        monkeypatch.setenv("RADCRYPT_LOCK_MINUTES", bad)
        with pytest.raises(RadcryptError, match=r"RADCRYPT_LOCK_MINUTES.*lock_minutes"):
            load_settings(file)
    monkeypatch.delenv("RADCRYPT_LOCK_MINUTES")
    file.write_text(json.dumps({"lock_minutes": True}))
    with pytest.raises(RadcryptError, match="whole number"):
        load_settings(file)
    saved = save_settings(load_settings(file.with_name("absent.json"), lock_minutes=4),
                          tmp_path / "saved.json")
    assert json.loads(saved.read_text())["lock_minutes"] == 4


def test_locked_identity_and_emptied_signer_hold_no_key() -> None:
    from app.core.identity import RequestSigner

    identity = Identity.generate("Dr. Lock")
    locked = LockedIdentity(identity.user_id, identity.name)
    assert (locked.user_id, locked.name) == (identity.user_id, identity.name)
    for attribute in ("sign_private", "enc_private", "sign", "card"):
        with pytest.raises(RadcryptError, match="locked"):
            getattr(locked, attribute)
    assert "private" not in repr(locked) and not hasattr(locked, "__dict__")
    assert not hasattr(locked, "__deepcopy__")  # Python's own probes get AttributeError
    signer = LockableSigner(RequestSigner(identity))
    assert "x-radcrypt-signature" in signer.headers("POST", "/v1/x", b"", "svc")
    signer.replace(None)
    with pytest.raises(RadcryptError, match="locked"):
        signer.headers("POST", "/v1/x", b"", "svc")
