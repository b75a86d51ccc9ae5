"""Repository key page -> "Back up identity…" (issue 14): the login password and a
separate passphrase typed twice, checked as they are typed; the backup is written off the
UI thread to the file the user chose, and it restores the same identity. A wrong login
password is said in plain words and writes nothing. A screenshot of the filled dialog is
saved to /tmp/radcrypt-backup-identity.png for the issue's reviewers.
"""

from __future__ import annotations

from pathlib import Path

from guitools import TEST_PASSWORD, WAIT_MS, pass_gate, wait_connected

from app.core.identity import read_backup

SCREENSHOT = "/tmp/radcrypt-backup-identity.png"
PASSPHRASE = "lantern by the north door, cobalt 2044"


def test_back_up_identity_from_the_keys_page(qtbot, make_window, dialogs, tmp_path: Path):
    window = make_window()
    pass_gate(qtbot, window)
    wait_connected(qtbot, window)
    window.show_page("keys")
    page = window.keys_page
    assert page.backup_button.isVisible()
    messages: list[tuple[str, str]] = []
    window.ctx.message.connect(lambda level, text, _details: messages.append((level, text)))

    dialog = page.open_backup_identity()
    assert not dialog.save_button.isEnabled()
    dialog.password.setText(TEST_PASSWORD)
    dialog.passphrase.setText(TEST_PASSWORD)
    assert "differ from your login password" in dialog.problem.text()
    assert not dialog.save_button.isEnabled()
    dialog.passphrase.setText(PASSPHRASE)
    dialog.again.setText(PASSPHRASE[:-1])
    assert "two passphrases differ" in dialog.problem.text()
    dialog.again.setText(PASSPHRASE)
    assert dialog.problem.text() == "" and dialog.save_button.isEnabled()
    assert dialog.strength.text().startswith("Strength: ")
    dialog.resize(560, 320)
    qtbot.wait(50)
    assert dialog.grab().save(SCREENSHOT)

    target = tmp_path / "owner.rcib"
    dialogs.save_path = str(target)
    dialog.save_button.click()
    qtbot.waitUntil(lambda: any(level == "success" for level, _ in messages),
                    timeout=WAIT_MS)
    assert any(str(target) in text for _, text in messages)
    restored = read_backup(target, PASSPHRASE)
    assert restored.user_id == window.backend.user_id
    assert restored.card() == window.backend.identity.card()

    # a wrong login password: an error in words, no file
    messages.clear()
    dialog = page.open_backup_identity()
    dialog.password.setText("not my login password at all")
    dialog.passphrase.setText(PASSPHRASE)
    dialog.again.setText(PASSPHRASE)
    dialogs.save_path = str(tmp_path / "second.rcib")
    dialog.save_button.click()
    qtbot.waitUntil(lambda: any(level == "error" for level, _ in messages),
                    timeout=WAIT_MS)
    errors = [text for level, text in messages if level == "error"]
    assert any("wrong password" in text.lower() for text in errors), errors
    assert not (tmp_path / "second.rcib").exists()
