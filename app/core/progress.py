"""Progress reports and cancellation shared by the CLI and the GUI.

Use cases take a ``progress`` callback and a ``CancelToken``; they never know whether a
terminal bar or a Qt signal is listening (Orange's ``state`` object, Anki's QueryOp).
Callbacks are called from worker threads: the GUI forwards them through signals.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from app.core.errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a long task. ``item`` names the file or object concerned, if any."""

    stage: str
    done: int
    total: int
    item: str = ""
    status: str = ""  # e.g. "imported", "already present", "failed"
    message: str = ""


ProgressCallback = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    """The default callback: ignore progress."""


class CancelToken:
    """Set from any thread; checked by the worker between units of work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")
