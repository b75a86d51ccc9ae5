"""Identity backup (issue 14, "nothing lost when a workstation is"): the private keys
under a separate passphrase, restored on a new workstation.

What is checked, each against the real code: a backup restores the very same keys (the
same card, the same signatures) into a new data directory under a new login password;
a wrong passphrase, a changed byte anywhere, a foreign or truncated file, a newer version
and an oversized work factor are each refused with a plain error naming the file; the
login password is never accepted as the passphrase and never opens the backup; nothing
secret is in the file in clear; an existing file is never overwritten; and the CLI
(`radcrypt identity export --secret --out FILE`, `radcrypt identity restore FILE`) does
the same end to end, with exit status 12 for a wrong passphrase.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.errors import RadcryptError, WrongPassword
from app.core.identity import IdentityStore, export_backup, read_backup, restore_backup
from crypto.errors import FormatError
from crypto.identity import (
    BACKUP_LOG2_N,
    WrongBackupPassphrase,
    open_backup,
    seal_backup,
    verify,
)
from crypto.keys import MIN_SCRYPT_LOG2_N

PASSWORD = "correct horse battery staple 42"
PASSPHRASE = "paper in the safe, violet umbrella 1987"
NEW_PASSWORD = "another long login phrase for the new desk"
FAST = MIN_SCRYPT_LOG2_N  # the product writes BACKUP_LOG2_N (2^18); tests use the floor


def _workstation(tmp_path: Path, name: str = "old") -> IdentityStore:
    return IdentityStore(tmp_path / name, scrypt_log2_n=FAST)


def _backup(tmp_path: Path) -> tuple[IdentityStore, Path]:
    store = _workstation(tmp_path)
    store.create("Dr Owner", PASSWORD)
    out = tmp_path / "usb" / "owner.rcib"
    export_backup(store, PASSWORD, PASSPHRASE, out, log2_n=FAST)
    return store, out


def test_backup_restores_the_same_keys_on_a_new_workstation(tmp_path: Path) -> None:
    old, out = _backup(tmp_path)
    original = old.unlock(PASSWORD)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    new = _workstation(tmp_path, "new")
    restored = restore_backup(new, out, PASSPHRASE, NEW_PASSWORD)
    assert (restored.user_id, restored.name) == (original.user_id, original.name)
    assert restored.enc_private == original.enc_private
    assert restored.sign_private == original.sign_private
    assert new.card() == old.card()  # the public card is written beside it
    unlocked = new.unlock(NEW_PASSWORD)  # the new login password opens it
    verify(original.sign_public, b"drill", unlocked.sign(b"drill"))
    with pytest.raises(WrongPassword):
        new.unlock(PASSWORD)  # the old login password plays no part any more


def test_wrong_passphrase_and_login_password_are_refused(tmp_path: Path) -> None:
    _, out = _backup(tmp_path)
    for wrong in ("paper in the safe, violet umbrella 1988", PASSWORD):
        with pytest.raises(WrongPassword, match=f"wrong passphrase.*{out.name}"):
            read_backup(out, wrong)
    with pytest.raises(WrongBackupPassphrase):
        open_backup(out.read_bytes(), PASSWORD)
    assert not (tmp_path / "new").exists()


def test_every_changed_byte_is_refused(tmp_path: Path) -> None:
    """A flipped bit in the header (salt, work factor, check, nonce) or in the ciphertext
    and tag is refused; none yields another identity."""
    _, out = _backup(tmp_path)
    blob = out.read_bytes()
    for position in range(len(blob)):
        changed = bytearray(blob)
        changed[position] ^= 0x01
        with pytest.raises((WrongBackupPassphrase, FormatError)) as caught:
            open_backup(bytes(changed), PASSPHRASE)
        assert "identity backup" in str(caught.value) or "passphrase" in str(caught.value), (
            position, caught.value)
    damaged = tmp_path / "damaged.rcib"
    damaged.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0x80]))
    with pytest.raises(RadcryptError, match=f"{damaged.name}.*changed or damaged"):
        read_backup(damaged, PASSPHRASE)


def test_foreign_truncated_newer_and_costly_files_are_refused(tmp_path: Path) -> None:
    _, out = _backup(tmp_path)
    blob = out.read_bytes()
    cases = {
        "identity.rcid": (tmp_path / "old" / "identity.rcid").read_bytes(),  # not a backup
        "short": blob[:40],
        "v2": blob[:4] + bytes([2]) + blob[5:],
        "kdf": blob[:5] + bytes([9]) + blob[6:],
        "costly": blob[:6] + bytes([30]) + blob[7:],  # 2^30 * 8 * 128 bytes: refused first
    }
    expected = {"identity.rcid": "not a Radcrypt identity backup",
                "short": "not a Radcrypt identity backup", "v2": "version 2",
                "kdf": "kdf", "costly": "scrypt"}
    for name, data in cases.items():
        path = tmp_path / f"{name}.bad"
        path.write_bytes(data)
        with pytest.raises(RadcryptError, match=expected[name]) as caught:
            read_backup(path, PASSPHRASE)
        assert str(path) in str(caught.value)
    with pytest.raises(RadcryptError, match="no identity backup"):
        read_backup(tmp_path / "absent.rcib", PASSPHRASE)


def test_nothing_secret_in_clear_and_fresh_salt_each_time(tmp_path: Path) -> None:
    old, out = _backup(tmp_path)
    identity = old.unlock(PASSWORD)
    blob = out.read_bytes()
    for secret in (identity.enc_private, identity.sign_private, PASSWORD.encode(),
                   PASSPHRASE.encode(), identity.user_id.encode(), identity.name.encode()):
        assert secret not in blob
    again = seal_backup(identity, PASSPHRASE, FAST)
    assert again[7:23] != blob[7:23] and again != blob  # a new salt, a new file
    magic, version, kdf, log2_n, r, p = struct.unpack_from(">4sBBBBB", blob)
    assert (magic, version, kdf, log2_n, r, p) == (b"RCIB", 1, 1, FAST, 8, 1)
    assert BACKUP_LOG2_N == 18  # what the product writes: 256 MiB per guess


def test_passphrase_rules_and_no_overwrite(tmp_path: Path) -> None:
    store = _workstation(tmp_path)
    store.create("Dr Owner", PASSWORD)
    out = tmp_path / "owner.rcib"
    with pytest.raises(RadcryptError, match="differ from your login password"):
        export_backup(store, PASSWORD, PASSWORD, out, log2_n=FAST)
    with pytest.raises(RadcryptError, match="too easy to guess"):
        export_backup(store, PASSWORD, "password123", out, log2_n=FAST)
    with pytest.raises(WrongPassword):
        export_backup(store, "not the login password at all", PASSPHRASE, out, log2_n=FAST)
    assert not out.exists()
    out.write_bytes(b"precious")
    with pytest.raises(RadcryptError, match="already exists"):
        export_backup(store, PASSWORD, PASSPHRASE, out, log2_n=FAST)
    assert out.read_bytes() == b"precious"
    good = tmp_path / "good.rcib"
    export_backup(store, PASSWORD, PASSPHRASE, good, log2_n=FAST)
    with pytest.raises(RadcryptError, match="already exists"):  # restore never replaces
        restore_backup(store, good, PASSPHRASE, NEW_PASSWORD)
    with pytest.raises(RadcryptError, match="too easy to guess"):
        restore_backup(_workstation(tmp_path, "new"), good, PASSPHRASE, "short")
    assert not (tmp_path / "new" / "identity.rcid").exists()


def _cli(data_dir: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", "--data-dir", str(data_dir),
                           *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[1])


def test_cli_export_secret_and_restore(tmp_path: Path) -> None:
    """End to end through the CLI, at the product's work factor (about 1 s per step)."""
    password_file, new_password_file = tmp_path / "pw", tmp_path / "pw2"
    password_file.write_text(PASSWORD + "\n")
    new_password_file.write_text(NEW_PASSWORD + "\n")
    old, new, out = tmp_path / "old", tmp_path / "new", tmp_path / "owner.rcib"
    env = {"RADCRYPT_BACKUP_PASSPHRASE": PASSPHRASE}
    made = _cli(old, "identity", "create", "--name", "Dr Owner", "--password-file",
                str(password_file), env={})
    assert made.returncode == 0, made.stderr
    exported = _cli(old, "identity", "export", "--secret", "--out", str(out),
                    "--password-file", str(password_file), env=env)
    assert exported.returncode == 0, exported.stderr
    assert out.read_bytes()[:4] == b"RCIB" and out.read_bytes()[6] == BACKUP_LOG2_N
    wrong = _cli(new, "identity", "restore", str(out), "--password-file",
                 str(new_password_file),
                 env={"RADCRYPT_BACKUP_PASSPHRASE": PASSPHRASE + "!"})
    assert wrong.returncode == 12 and "wrong passphrase" in wrong.stderr, wrong.stderr
    assert PASSPHRASE not in wrong.stderr + wrong.stdout
    restored = _cli(new, "identity", "restore", str(out), "--password-file",
                    str(new_password_file), env=env)
    assert restored.returncode == 0, restored.stderr
    shown_old = _cli(old, "identity", "show", "--json", "--password-file",
                     str(password_file), env={})
    shown_new = _cli(new, "identity", "show", "--json", "--password-file",
                     str(new_password_file), env={})
    assert shown_old.returncode == shown_new.returncode == 0, shown_new.stderr
    assert '"fingerprint"' in shown_new.stdout
    fingerprint = [line for line in shown_old.stdout.splitlines() if "fingerprint" in line]
    assert fingerprint and fingerprint[0] in shown_new.stdout
    unlocked = IdentityStore(new).unlock(NEW_PASSWORD)
    assert unlocked.card() == IdentityStore(old).unlock(PASSWORD).card()


def test_independent_reader_from_format_2_section_12(tmp_path: Path) -> None:
    """A reader written from docs/FORMAT-2.md section 12 alone (hashlib's scrypt, the
    AES-GCM of `cryptography`) opens what the code writes and finds the same identity."""
    import hashlib

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from crypto.identity import Identity

    old, out = _backup(tmp_path)
    blob = out.read_bytes()
    assert blob[:4] == b"RCIB" and blob[4] == 1 and blob[5] == 1
    log2_n, r, p = blob[6], blob[7], blob[8]
    salt, check, nonce = blob[9:25], blob[25:41], blob[41:53]
    derived = hashlib.scrypt(PASSPHRASE.encode(), salt=salt, n=1 << log2_n, r=r, p=p,
                             dklen=64, maxmem=2**28)
    assert hashlib.sha256(b"radcrypt/identity-backup/check/v1"
                          + derived[32:]).digest()[:16] == check
    plain = AESGCM(derived[:32]).decrypt(nonce, blob[53:], blob[:53])
    assert Identity.from_bytes(plain).card() == old.unlock(PASSWORD).card()
