"""The search service's append-only audit trail, written to the bucket in batches.

Each entry says who searched which repository, when, how many results came back and how
long it took. Never the token: it is a function of the query image, and logging it would
hand the known-query attacks of SECURITY.md their material. Batches are new objects
with random names under ``audit/``: appending never rewrites what was written.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any

from cloud import layout
from cloud.backend import Store, StoreError

log = logging.getLogger(__name__)
FLUSH_SECONDS = 2.0
FLUSH_ENTRIES = 500


class AuditLog:
    """Buffers entries and writes one object per repository per flush."""

    def __init__(self, store: Store, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.store = store
        self._entries: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(flush_seconds,),
                                        name="radcrypt-audit", daemon=True)
        self._thread.start()

    def record(self, user: str, repo_id: str, action: str, results: int,
               duration_ms: float) -> None:
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                 "user": user, "repo": repo_id, "action": action, "results": results,
                 "duration_ms": round(duration_ms, 3)}
        with self._lock:
            batch = self._entries.setdefault(repo_id, [])
            batch.append(entry)
            full = len(batch) >= FLUSH_ENTRIES
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._entries = self._entries, {}
        for repo_id, entries in pending.items():
            body = "\n".join(json.dumps(e, sort_keys=True) for e in entries).encode() + b"\n"
            name = layout.audit_key(repo_id, _batch_id())
            try:
                self.store.put(name, body, if_absent=True)
            except StoreError as exc:
                log.error("audit batch for %s not written (%s); kept for the next flush",
                          repo_id, exc)
                with self._lock:
                    self._entries.setdefault(repo_id, [])[:0] = entries

    def _loop(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()


def _batch_id() -> str:
    """Time-ordered and unique: 12 hex digits of milliseconds, then 20 random."""
    return f"{int(time.time() * 1000):012x}{layout.new_id()[:20]}"


def read_audit(store: Store, repo_id: str) -> list[dict[str, Any]]:
    """Every audit entry of a repository, oldest batch first."""
    entries: list[dict[str, Any]] = []
    for key in sorted(store.list_keys(layout.audit_prefix(repo_id))):
        for line in store.get(key).decode("utf-8", "replace").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("unreadable audit line in %s", key)
    return entries
