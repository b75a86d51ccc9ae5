"""What this workstation did (imports, searches, key changes, errors), kept on disk.

A JSON-lines file in the data directory: one object per event, appended, never
rewritten except to trim it to the newest ``MAX_ENTRIES``. No image content, no
password, no key: names of files and repositories, counts, and error sentences.
Qt-free, so the CLI could write the same log later.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

MAX_ENTRIES = 2000
log = logging.getLogger("radcrypt.activity")
KINDS = ("connect", "import", "search", "repository", "access", "settings", "error")


@dataclass(frozen=True)
class ActivityEntry:
    time: str  # local time, ISO 8601, seconds
    kind: str
    text: str
    details: str = ""
    repository: str = ""

    @property
    def is_error(self) -> bool:
        return self.kind == "error"


class ActivityLog:
    """Append-only activity log; listeners hear about each new entry (any thread)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: list[ActivityEntry] = []
        self._lock = threading.Lock()
        self._listeners: list[Callable[[ActivityEntry], None]] = []
        if path is not None:
            self._entries = _read(path)

    def add_listener(self, listener: Callable[[ActivityEntry], None]) -> None:
        self._listeners.append(listener)

    def entries(self) -> list[ActivityEntry]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._entries))

    def record(self, kind: str, text: str, details: str = "", repository: str = ""
               ) -> ActivityEntry:
        entry = ActivityEntry(datetime.now().astimezone().isoformat(timespec="seconds"),
                              kind, text, details, repository)
        log.log(logging.WARNING if kind == "error" else logging.INFO, "%s: %s%s", kind, text,
                f"\n{details}" if details else "")
        with self._lock:
            self._entries.append(entry)
            trim = len(self._entries) > MAX_ENTRIES
            if trim:
                self._entries = self._entries[-MAX_ENTRIES:]
            if self.path is not None:
                with contextlib.suppress(OSError):  # a full disk must not stop the work
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    if trim:
                        _rewrite(self.path, self._entries)
                    else:
                        with self.path.open("a", encoding="utf-8") as out:
                            out.write(json.dumps(asdict(entry)) + "\n")
        for listener in list(self._listeners):
            listener(entry)
        return entry


def _read(path: Path) -> list[ActivityEntry]:
    entries: list[ActivityEntry] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return entries
    for line in lines[-MAX_ENTRIES:]:
        try:
            raw = json.loads(line)
            entries.append(ActivityEntry(str(raw["time"]), str(raw["kind"]), str(raw["text"]),
                                         str(raw.get("details", "")),
                                         str(raw.get("repository", ""))))
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line after a crash
    return entries


def _rewrite(path: Path, entries: list[ActivityEntry]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(e)) + "\n" for e in entries), encoding="utf-8")
    tmp.replace(path)
