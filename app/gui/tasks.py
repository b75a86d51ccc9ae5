"""The one place background work goes through (Anki's QueryOp, Orange's ConcurrentMixin).

``runner.run(title, fn, on_done=..., on_error=..., on_progress=...)`` runs ``fn(ctx)`` on
a QThreadPool thread. ``fn`` must not touch widgets: it reports through
``ctx.progress(event)`` and checks ``ctx.cancel`` (an ``app.core.progress.CancelToken``,
the same object the core's use cases take). Results, errors and progress come back to
the UI thread as queued signals, where the callbacks run.

Why not superqt's ``thread_worker`` (which CONVENTIONS.md prefers): its ``WorkerBase.run``
swaps the process-wide ``warnings.showwarning`` inside ``warnings.catch_warnings()``,
which is not thread-safe; with several workers at once (an import, thumbnails, a
search) and pydicom warning about many files, a worker can leave the global hook
pointing at another, deleted worker. This runner is the small part of it we need.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PyQt6.QtCore import QObject, QRunnable, QThreadPool, pyqtSignal

from app.core.errors import Cancelled, RadcryptError
from app.core.progress import CancelToken, ProgressEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskError:
    """A failure as the user sees it: one plain sentence, and details on demand."""

    message: str
    details: str
    exception: BaseException | None = None


def sentence(text: str) -> str:
    text = " ".join(str(text).split())
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?", ")")) else text + "."


def describe_error(exc: BaseException, doing: str = "") -> TaskError:
    """Expected failures keep their own plain message; anything else says what was being
    done and puts the traceback in the details."""
    details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    plain = _plain_types()
    if isinstance(exc, plain):
        return TaskError(sentence(str(exc)), f"{type(exc).__name__}: {exc}\n\n{details}", exc)
    what = f" while {doing[0].lower() + doing[1:]}" if doing else ""
    return TaskError(sentence(f"Something went wrong{what}: {exc}"), details, exc)


def _plain_types() -> tuple[type[BaseException], ...]:
    from app.core.types import EmbeddedStoreError, ImageDecodeError, StoreError

    return (RadcryptError, StoreError, ImageDecodeError, EmbeddedStoreError, OSError)


class TaskContext:
    """What a background function may use: the cancel token and a progress callback."""

    def __init__(self, task: Task) -> None:
        self._task = task
        self.cancel: CancelToken = task.cancel_token

    def progress(self, event: Any) -> None:
        """Report progress (any thread); ``event`` is usually a ProgressEvent."""
        self._task._signals.progressed.emit(event)

    def check(self) -> None:
        self.cancel.check()


class _Signals(QObject):
    progressed = pyqtSignal(object)
    succeeded = pyqtSignal(object)
    failed = pyqtSignal(object)
    cancelled = pyqtSignal()
    finished = pyqtSignal()


class Task(QObject):
    """One background job; lives in the UI thread, its function runs in the pool."""

    progressed = pyqtSignal(object)
    succeeded = pyqtSignal(object)
    failed = pyqtSignal(object)  # TaskError
    cancelled = pyqtSignal()
    finished = pyqtSignal()

    def __init__(self, title: str, fn: Callable[[TaskContext], Any],
                 cancellable: bool, tracked: bool, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.title = title
        self.fn = fn
        self.cancellable = cancellable
        self.tracked = tracked
        self.cancel_token = CancelToken()
        self.last_progress: ProgressEvent | None = None
        self.done = False
        self.error: TaskError | None = None
        self._signals = _Signals()
        self._signals.progressed.connect(self._on_progress)
        self._signals.succeeded.connect(self.succeeded)
        self._signals.failed.connect(self._on_failed)
        self._signals.cancelled.connect(self.cancelled)
        self._signals.finished.connect(self._on_finished)

    def cancel(self) -> None:
        self.cancel_token.cancel()

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_token.cancelled

    def _on_progress(self, event: Any) -> None:
        if isinstance(event, ProgressEvent):
            self.last_progress = event
        self.progressed.emit(event)

    def _on_failed(self, error: TaskError) -> None:
        self.error = error
        self.failed.emit(error)

    def _on_finished(self) -> None:
        self.done = True
        self.finished.emit()

    def execute(self) -> None:
        """Runs in a pool thread."""
        ctx = TaskContext(self)
        try:
            result = self.fn(ctx)
        except Cancelled:
            self._signals.cancelled.emit()
        except BaseException as exc:
            if self.cancel_token.cancelled and isinstance(exc, RadcryptError):
                self._signals.cancelled.emit()
            else:
                log.debug("task %r failed", self.title, exc_info=True)
                self._signals.failed.emit(describe_error(exc, self.title))
        else:
            self._signals.succeeded.emit(result)
        finally:
            # Let go of the function and what its closure holds (a repository and its
            # keys): the Task object itself may outlive it (the status bar keeps the last
            # one shown), and the workstation lock must be able to forget the keys
            # (app/gui/idle_lock.py).
            self.fn = _spent
            self._signals.finished.emit()


def _spent(ctx: TaskContext) -> Any:
    raise RuntimeError("this task has already run")


class _Runnable(QRunnable):
    def __init__(self, task: Task) -> None:
        super().__init__()
        self.task = task

    def run(self) -> None:
        self.task.execute()


class TaskRunner(QObject):
    """Starts tasks, knows which are running, cancels them all on request."""

    taskStarted = pyqtSignal(object)
    taskFinished = pyqtSignal(object)
    busyChanged = pyqtSignal(bool)

    def __init__(self, parent: QObject | None = None, threads: int = 4,
                 light_threads: int = 3) -> None:
        super().__init__(parent)
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(threads)
        self._light_pool = QThreadPool(self)  # thumbnails: never queue behind an import
        self._light_pool.setMaxThreadCount(light_threads)
        self._tasks: set[Task] = set()
        self._runnables: dict[Task, _Runnable] = {}
        self._lock = threading.Lock()

    def run(self, title: str, fn: Callable[[TaskContext], Any], *,
            on_done: Callable[[Any], None] | None = None,
            on_error: Callable[[TaskError], None] | None = None,
            on_progress: Callable[[Any], None] | None = None,
            on_cancel: Callable[[], None] | None = None,
            on_finish: Callable[[], None] | None = None,
            cancellable: bool = False, tracked: bool = True,
            light: bool = False) -> Task:
        """Run ``fn(ctx)`` in the background. ``tracked`` tasks count as "work running"
        (status bar, close confirmation); untracked ones (thumbnails) are just cancelled."""
        task = Task(title, fn, cancellable, tracked, self)
        if on_progress is not None:
            task.progressed.connect(on_progress)
        if on_done is not None:
            task.succeeded.connect(on_done)
        if on_error is not None:
            task.failed.connect(on_error)
        if on_cancel is not None:
            task.cancelled.connect(on_cancel)
        if on_finish is not None:
            task.finished.connect(on_finish)
        task.finished.connect(lambda: self._finished(task))
        was_busy = self.busy
        self._tasks.add(task)
        runnable = _Runnable(task)
        runnable.setAutoDelete(False)
        self._runnables[task] = runnable
        (self._light_pool if light else self._pool).start(runnable)
        self.taskStarted.emit(task)
        if self.busy != was_busy:
            self.busyChanged.emit(self.busy)
        return task

    def _finished(self, task: Task) -> None:
        was_busy = self.busy
        self._tasks.discard(task)
        self._runnables.pop(task, None)
        self.taskFinished.emit(task)
        if self.busy != was_busy:
            self.busyChanged.emit(self.busy)
        task.deleteLater()

    @property
    def busy(self) -> bool:
        return any(t.tracked for t in self._tasks)

    @property
    def idle(self) -> bool:
        return not self._tasks

    def running(self, tracked_only: bool = True) -> list[Task]:
        return [t for t in self._tasks if t.tracked or not tracked_only]

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def wait_for_done(self, msecs: int) -> bool:
        """Block until the pools' threads are done (shutdown paths and tests only).

        Call this before the runner is destroyed: QThreadPool's destructor also waits for
        its threads, but it runs holding the GIL, which a thread still returning from a
        signal emission needs — a deadlock. waitForDone releases the GIL."""
        return self._pool.waitForDone(msecs) and self._light_pool.waitForDone(msecs)
