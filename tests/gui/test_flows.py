"""End-to-end flows of the desktop client against the real embedded store and service."""

from __future__ import annotations

from pathlib import Path

import pytest
from guitools import (
    TEST_PASSWORD,
    WAIT_MS,
    Heartbeat,
    create_legacy_repository,
    create_repository,
    import_files,
    names,
    pass_gate,
    wait_connected,
    wait_idle,
)

from app.core.progress import ProgressEvent
from app.gui.import_page import FAILED, IMPORTED, NOT_DONE, PRESENT
from app.gui.login import REGISTER, UNLOCK, WRONG_PASSWORD
from cloud import layout
from cloud.segments import HEADER_SIZE_V2, read_header

SAMPLE_IMAGES = 33
"""Images in the 30 sample files: three of them are 2-frame files, and every frame of a
multi-frame file is an image of its own (issue 15)."""


def segment_id_count(window: object) -> int:
    """How many image ids all the repository's segment objects name, duplicates included
    (live or not: a format-2 segment no log entry names would count too)."""
    store = window.backend.session.store  # type: ignore[attr-defined]
    repo_id = window.ctx.repo.repo_id  # type: ignore[attr-defined]
    total = 0
    for key in store.list_keys(layout.segments_prefix(repo_id)):
        _, count, _ = read_header(store.get_range(key, 0, HEADER_SIZE_V2), key)
        total += count
    return total


def committed(window: object) -> set[str]:
    """The images of the live packs of the verified segment log (format 2)."""
    client = window.backend.client  # type: ignore[attr-defined]
    return set(client.image_ids(window.ctx.repo))  # type: ignore[attr-defined]


# --- identity ---------------------------------------------------------------------------


def test_register_on_first_run(qtbot, make_window):
    window = make_window()
    qtbot.waitUntil(lambda: window.gate.mode == REGISTER and window.runner.idle,
                    timeout=WAIT_MS)
    gate = window.gate
    gate.name.setText("Dr. Ana Silva")
    gate.password.setText("short")
    assert not gate.submit_button.isEnabled()  # too weak
    assert "stronger" in gate.error.text()
    gate.password.setText("password123")  # zxcvbn scores it 0: its advice is shown
    gate.again.setText("password123")
    assert not gate.submit_button.isEnabled()
    assert "very common password" in gate.error.text()
    gate.password.setText(TEST_PASSWORD)
    gate.again.setText(TEST_PASSWORD + "x")
    assert not gate.submit_button.isEnabled()
    assert "differ" in gate.error.text()
    gate.again.setText(TEST_PASSWORD)
    assert gate.submit_button.isEnabled()
    gate.submit_button.click()
    qtbot.waitUntil(lambda: window.stack.currentWidget() is window.workspace, timeout=WAIT_MS)
    assert window.backend.user_name == "Dr. Ana Silva"
    wait_connected(qtbot, window)
    assert "Dr. Ana Silva" in window.user_label.text()


def test_unlock_on_later_runs_and_wrong_password(qtbot, make_window):
    first = make_window()
    pass_gate(qtbot, first)
    wait_connected(qtbot, first)
    user_id = first.backend.user_id

    second = make_window()
    qtbot.waitUntil(lambda: second.gate.mode == UNLOCK and second.runner.idle,
                    timeout=WAIT_MS)
    gate = second.gate
    assert not gate.name.isVisible()
    gate.password.setText("Tr0ub4dor&3-nope")
    gate.submit_button.click()
    qtbot.waitUntil(lambda: gate.error.text() == WRONG_PASSWORD, timeout=WAIT_MS)
    assert second.stack.currentWidget() is second.gate
    assert second.backend.identity is None and not second.backend.connected

    gate.password.setText(TEST_PASSWORD)
    gate.submit_button.click()
    qtbot.waitUntil(lambda: second.stack.currentWidget() is second.workspace, timeout=WAIT_MS)
    assert second.backend.user_id == user_id


# --- repositories ------------------------------------------------------------------------------


def test_create_repository(qtbot, make_window):
    window = make_window()
    pass_gate(qtbot, window)
    create_repository(qtbot, window, "ct-chest")
    repo = window.ctx.repo
    assert repo.keys.version == 1
    assert window.keys_page.fields["name"].text() == "ct-chest"
    assert window.keys_page.fields["version"].text() == "1"
    assert window.key_status.text() == "Key version 1"
    assert "ct-chest" in window.repo_status.text()
    qtbot.waitUntil(lambda: window.repo_combo.findData("ct-chest") > 0, timeout=WAIT_MS)
    assert window.repo_combo.currentData() == "ct-chest"
    texts = [e.text for e in window.ctx.activity.entries()]
    assert any("Created repository ct-chest" in t for t in texts)


def test_new_repository_dialog_refuses_bad_names(qtbot, make_window):
    window = make_window()
    pass_gate(qtbot, window)
    wait_connected(qtbot, window)
    dialog = window.keys_page.open_new_repository()
    dialog.name.setText("Bad Name!")
    assert not dialog.create_button.isEnabled()
    assert "lowercase" in dialog.problem.text()
    dialog.reject()


def test_password_repository_is_not_opened_without_its_owner(qtbot, make_window, dialogs):
    """A repository from before identities opens only by moving it to an identity: no
    password prompt opens it as it is, a refusal leaves it locked, and a wrong password
    moves nothing."""
    old = make_window(identity_mode=False)
    create_legacy_repository(qtbot, old, "mr-brain")
    old.close()
    qtbot.waitUntil(lambda: old.shutdown_done, timeout=WAIT_MS)

    window = make_window()
    pass_gate(qtbot, window)
    wait_connected(qtbot, window)
    qtbot.waitUntil(lambda: window.repo_combo.findData("mr-brain") > 0, timeout=WAIT_MS)
    dialogs.confirm_answer = False
    window.open_repository("mr-brain")
    qtbot.waitUntil(lambda: bool(dialogs.confirmations) and window.runner.idle,
                    timeout=WAIT_MS)
    assert "still locked by a password" in dialogs.confirmations[-1][1]
    assert window.ctx.repo is None and window.backend.unlocked("mr-brain") is None

    dialogs.confirm_answer = True
    dialogs.passwords = ["no-such-pass-9831"]
    window.open_repository("mr-brain")
    qtbot.waitUntil(lambda: window.message_bar.isVisible() and window.runner.idle,
                    timeout=WAIT_MS)
    assert window.message_bar.text.text() == "Wrong password: repository mr-brain stays as it was."
    assert window.ctx.repo is None and window.backend.unlocked("mr-brain") is None


def test_no_repository_is_created_without_an_identity(qtbot, make_window):
    """Without an identity (the password-only mode) the GUI creates no repository: the
    button is off and the backend refuses, writing nothing to the bucket."""
    from app.core.errors import RadcryptError

    window = make_window(identity_mode=False)
    wait_connected(qtbot, window)
    wait_idle(qtbot, window)
    assert not window.keys_page.new_button.isEnabled()
    store = window.backend.session.store
    before = sorted(store.list_keys(""))
    with pytest.raises(RadcryptError, match="belongs to an identity"):
        window.backend.create_repository("no-owner")
    assert sorted(store.list_keys("")) == before
    assert not [k for k in before if k.endswith("/password-owner")]


def test_register_grant_and_revoke_a_user(qtbot, make_window, dialogs, tmp_path):
    from app.core.identity import IdentityStore

    other = IdentityStore(tmp_path / "colleague").create("Dr. Colleague", TEST_PASSWORD)
    window = make_window()
    pass_gate(qtbot, window, name="Dr. Owner")
    create_repository(qtbot, window, "shared")
    page = window.keys_page
    qtbot.waitUntil(lambda: len(page.rows) == 1, timeout=WAIT_MS)
    assert page.rows[0].user_id == window.backend.user_id
    assert page.identity_card.isVisible() and window.backend.fingerprint in (
        page.identity_fields.text())

    dialogs.card = other.card().to_json()
    page.register_button.click()
    qtbot.waitUntil(lambda: other.user_id in page.known_users, timeout=WAIT_MS)
    assert "gives them no access by itself" in dialogs.confirmations[-1][1]

    dialogs.choice = other.user_id
    page.grant_button.click()
    qtbot.waitUntil(lambda: len(page.rows) == 2, timeout=WAIT_MS)
    assert "decrypt every image" in dialogs.confirmations[-1][1]

    row = [r.user_id for r in page.rows].index(other.user_id)
    page.table.selectRow(row)
    assert page.revoke_button.isEnabled()
    page.revoke_button.click()
    qtbot.waitUntil(lambda: window.ctx.repo.keys.version == 2, timeout=WAIT_MS)
    assert "new key version (2)" in dialogs.confirmations[-1][1]
    qtbot.waitUntil(lambda: [r.user_id for r in page.rows] == [window.backend.user_id],
                    timeout=WAIT_MS)
    assert page.fields["version"].text() == "2"
    assert window.key_status.text() == "Key version 2"


def test_password_repository_moves_to_the_identity(qtbot, make_window, dialogs):
    old = make_window(identity_mode=False)
    create_legacy_repository(qtbot, old, "legacy")
    old.close()
    qtbot.waitUntil(lambda: old.shutdown_done, timeout=WAIT_MS)

    window = make_window()
    pass_gate(qtbot, window)
    wait_connected(qtbot, window)
    qtbot.waitUntil(lambda: window.repo_combo.findData("legacy") > 0, timeout=WAIT_MS)
    dialogs.passwords = [TEST_PASSWORD]
    window.open_repository("legacy")
    qtbot.waitUntil(lambda: window.ctx.repo is not None, timeout=WAIT_MS)
    assert "still locked by a password" in dialogs.confirmations[-1][1]
    assert window.ctx.repo.repo_id == "legacy"


# --- import ------------------------------------------------------------------------------------


def test_import_30_images_progress_reaches_100_and_ui_never_stalls(qtbot, make_window,
                                                                   sample_images):
    window = make_window()
    pass_gate(qtbot, window)
    create_repository(qtbot, window, "import-30")
    import_files(qtbot, window, sample_images)
    page = window.import_page
    assert len(page.model.rows) == 30
    seen: list[int] = []
    heartbeat = Heartbeat(20)
    heartbeat.start()
    page.start_button.click()
    assert page.task is not None
    page.task.progressed.connect(
        lambda e: seen.append(e.done) if isinstance(e, ProgressEvent) else None)
    qtbot.waitUntil(lambda: page.task is None, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: len(window.archive_page.all_entries) == SAMPLE_IMAGES,
                    timeout=WAIT_MS)
    longest = heartbeat.stop()
    print(f"longest UI-thread gap during the import: {longest:.0f} ms")

    assert longest < 500, f"the UI thread stalled for {longest:.0f} ms during the import"
    assert page.progress.value() == page.progress.maximum() == 30
    assert seen and max(seen) == 30
    assert all(r.status == IMPORTED for r in page.model.rows)
    assert page.last_report is not None and len(page.last_report.imported) == 30
    assert "Done: 30 imported" in page.summary.text()
    assert window.archive_page.count_label.text() == f"{SAMPLE_IMAGES} images"
    assert sorted(set(e.name for e in window.archive_page.all_entries)) == sorted(
        names(sample_images))
    qtbot.waitUntil(lambda: window.archive_page.visible_tiles() == SAMPLE_IMAGES,
                    timeout=WAIT_MS)


def test_cancel_half_way_then_resume_loses_and_doubles_nothing(qtbot, make_window,
                                                               sample_images):
    window = make_window()
    pass_gate(qtbot, window)
    create_repository(qtbot, window, "cancel-resume")
    import_files(qtbot, window, sample_images)
    page = window.import_page
    page.start_button.click()

    def maybe_cancel(event: object) -> None:
        if isinstance(event, ProgressEvent) and event.stage == "import" and event.done >= 12:
            page.cancel()

    page.task.progressed.connect(maybe_cancel)
    qtbot.waitUntil(lambda: page.task is None, timeout=WAIT_MS)
    report = page.last_report
    assert report is not None and report.cancelled
    done_first = len(report.imported)
    assert 12 <= done_first < 30
    assert page.resume_button.isVisible() and page.resume_button.isEnabled()
    assert page.model.count(IMPORTED) == done_first
    assert page.model.count(NOT_DONE) == 30 - done_first
    assert "Cancelled" in page.summary.text()
    assert len(committed(window)) == done_first + len(report.frames)

    page.resume_button.click()
    qtbot.waitUntil(lambda: page.task is None, timeout=WAIT_MS)
    report = page.last_report
    assert not report.cancelled
    assert len(report.imported) == 30 - done_first
    assert all(r.status in (IMPORTED, PRESENT) for r in page.model.rows)
    assert page.progress.value() == page.progress.maximum()
    assert len(committed(window)) == SAMPLE_IMAGES  # nothing lost
    assert segment_id_count(window) == SAMPLE_IMAGES  # nothing doubled
    qtbot.waitUntil(lambda: len(window.archive_page.all_entries) == SAMPLE_IMAGES,
                    timeout=WAIT_MS)
    assert sorted(set(e.name for e in window.archive_page.all_entries)) == sorted(
        names(sample_images))


def test_a_file_that_is_not_an_image_fails_in_plain_words(qtbot, make_window, sample_images,
                                                          tmp_path):
    window = make_window()
    pass_gate(qtbot, window)
    create_repository(qtbot, window, "bad-file")
    notes = tmp_path / "notes.txt"
    notes.write_text("report: no findings\n")
    import_files(qtbot, window, [sample_images[0], notes])
    page = window.import_page
    page.start_button.click()
    qtbot.waitUntil(lambda: page.task is None, timeout=WAIT_MS)
    statuses = {Path(r.path).name: r for r in page.model.rows}
    assert statuses[sample_images[0].name].status == IMPORTED
    assert statuses["notes.txt"].status == FAILED
    assert "not a supported image" in statuses["notes.txt"].detail
    assert window.message_bar.isVisible() and window.message_bar.level == "warning"
    assert "notes.txt" in window.message_bar.text.text()


# --- search -------------------------------------------------------------------------------------


def test_search_by_image_shows_the_right_neighbour(qtbot, make_window, dialogs, sample_images,
                                                   query_image):
    window = make_window()
    pass_gate(qtbot, window)
    create_repository(qtbot, window, "search")
    import_files(qtbot, window, sample_images)
    window.import_page.start_button.click()
    qtbot.waitUntil(lambda: window.import_page.task is None, timeout=WAIT_MS)

    query, expected = query_image
    dialogs.image = str(query)
    window.open_query_action.trigger()  # Ctrl+O
    assert window.current_page() == "search"
    page = window.search_page
    qtbot.waitUntil(lambda: page.outcome is not None and page.task is None, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: page.query_panel.image() is not None, timeout=WAIT_MS)
    assert page.result_names()[0] == expected
    assert len(page.result_names()) == 5 == page.strip.count()
    assert page.nearest_panel.image() is not None
    assert expected in page.nearest_caption.text()
    assert page.fields["name"].full_text() == expected
    assert page.fields["rank"].full_text() == "1 of 5"
    assert float(page.fields["distance"].full_text()) >= 0
    assert page.fields["verified"].full_text() == "verified here"
    for key in ("token", "server", "fetch_decrypt", "total"):
        assert page.timings[key].text().endswith("ms"), key
    page.strip.setCurrentRow(1)
    assert page.fields["rank"].full_text() == "2 of 5"
    entries = [e.text for e in window.ctx.activity.entries() if e.kind == "search"]
    assert entries and expected in entries[0]


# --- settings and closing ------------------------------------------------------------------------


def test_test_connection_reports_a_stopped_store_clearly(qtbot, make_window):
    from cloud.local import stop_background

    window = make_window()
    pass_gate(qtbot, window)
    wait_connected(qtbot, window)
    page = window.settings_page
    window.settings_action.trigger()  # Ctrl+,
    assert window.current_page() == "settings"
    page.test_button.click()
    qtbot.waitUntil(lambda: not page.testing, timeout=WAIT_MS)
    assert "is reachable" in page.result_text("storage")
    assert "is present" in page.result_text("bucket")
    assert "healthy" in page.result_text("service")

    assert stop_background(window.backend.settings.store_dir)
    page.test_button.click()
    qtbot.waitUntil(lambda: not page.testing, timeout=WAIT_MS)
    storage = page.result_text("storage")
    assert "is not reachable" in storage and "127.0.0.1" in storage
    assert "not checked" in page.result_text("bucket")
    assert "not checked" in page.result_text("service")
    assert [r.ok for r in page.results] == [False, None, None]


def test_closing_during_an_import_asks_then_stops_everything(qtbot, make_window, dialogs,
                                                             sample_images):
    from cloud.local import find_running

    window = make_window()
    pass_gate(qtbot, window)
    create_repository(qtbot, window, "closing")
    import_files(qtbot, window, sample_images)
    page = window.import_page
    page.start_button.click()
    qtbot.waitUntil(lambda: page.model.count(IMPORTED, PRESENT) > 0
                    or page.progress.value() >= 3, timeout=WAIT_MS)

    dialogs.confirm_answer = False
    window.close()
    assert dialogs.confirmations and "Work is still running" in dialogs.confirmations[-1][1]
    assert not window.closing and window.isVisible()

    dialogs.confirm_answer = True
    window.close()
    qtbot.waitUntil(lambda: window.shutdown_done, timeout=WAIT_MS)
    assert not window.isVisible()
    assert window.backend.session is None
    assert find_running(window.backend.settings.store_dir) is None
    assert page.last_report is None or page.last_report.cancelled or len(
        page.last_report.imported) == 30


def test_shortcuts_and_pages(qtbot, make_window):
    window = make_window()
    pass_gate(qtbot, window)
    wait_connected(qtbot, window)
    shortcuts = {a.shortcut().toString() for a in window.findChildren(type(
        window.open_query_action))}
    assert {"Ctrl+O", "Ctrl+I", "Ctrl+,"} <= shortcuts
    for number, key in enumerate(("archive", "import", "search", "keywords", "keys",
                                  "activity", "settings"), start=1):
        window.show_page(key)
        assert window.current_page() == key
        assert window.pages.currentIndex() == number - 1
    wait_idle(qtbot, window)
