"""Work that holds the GIL runs in child processes, so the UI thread never waits for it.

Measured: pylibjpeg-openjpeg keeps the GIL for the whole of a JPEG 2000 decode (0.5 to
0.8 s for pydicom's RG1_J2KR.dcm), and pydicom's pure-Python parsing holds it in long
slices too; a worker *thread* decoding such a file freezes the window. So decoding (query
preview, viewer), feature extraction (search) and whole imports run in child processes
("spawn", safe with Qt's threads and the same on every OS). The parent side is still a
worker thread of app/gui/tasks.py that just waits, which releases the GIL.

Two shapes:
* ``ProcessJobs.call(fn, *args)``: a short job on a small persistent process pool.
* ``run_job(fn, args, progress, cancel)``: a long job in its own process, with progress
  events and cancellation forwarded through a queue and an event (the importer's
  ``CancelToken`` inside the child is set when the parent's is).

Keys do cross into these children (an import must encrypt): they are this workstation's
own processes, started by it, talking over an anonymous pipe; nothing is written to disk.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue as queue_module
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import numpy as np

from app.core.errors import Cancelled, RadcryptError
from app.core.progress import CancelToken, ProgressCallback, no_progress

_CTX = multiprocessing.get_context("spawn")
POLL = 0.1


def quiet_libraries() -> None:
    """pydicom narrates every quirk of a file it still decodes; keep that out of sight."""
    import logging
    import warnings

    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pydicom")


def _child_init() -> None:
    quiet_libraries()


def _noop() -> bool:
    return True


class ProcessJobs:
    """A small, lazily started pool of child processes for short jobs."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise Cancelled("closing")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers, mp_context=_CTX,
                                                 initializer=_child_init)
            return self._pool

    def warm_up(self) -> None:
        """Start the processes now (about half a second) rather than at the first search."""
        for future in [self._executor().submit(_noop) for _ in range(self.workers)]:
            future.result()

    def call(self, fn: Callable[..., Any], *args: Any, cancel: CancelToken | None = None
             ) -> Any:
        """Run ``fn(*args)`` in a child and return its result (blocks this thread only)."""
        future: Future[Any] = self._executor().submit(fn, *args)
        while True:
            try:
                return future.result(timeout=POLL)
            except FutureTimeout:
                if cancel is not None and cancel.cancelled:
                    future.cancel()
                    raise Cancelled("cancelled by the user") from None

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            self._closed = True
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


# --- long jobs in their own process ----------------------------------------------------------


def _job_main(fn: Callable[..., Any], args: tuple[Any, ...], out: Any, cancel_flag: Any
              ) -> None:
    """The child side of run_job: progress and the result go back through ``out``.

    Cancellation is a shared byte polled here, not a multiprocessing.Event: setting an
    Event whose waiter died with its process blocks the setter forever."""
    _child_init()
    token = CancelToken()

    def watch() -> None:
        while not cancel_flag.value:
            time.sleep(0.05)
        token.cancel()

    threading.Thread(target=watch, daemon=True).start()

    def progress(event: Any) -> None:
        out.put(("progress", event))

    try:
        result = fn(progress, token, *args)
    except BaseException as exc:
        details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            import pickle

            pickle.dumps(exc)
            out.put(("error", exc, details))
        except Exception:
            out.put(("error", RadcryptError(str(exc)), details))
    else:
        out.put(("result", result))


def run_job(fn: Callable[..., Any], args: tuple[Any, ...], progress: ProgressCallback,
            cancel: CancelToken | None = None) -> Any:
    """Run ``fn(progress, cancel, *args)`` in a new child process; blocks this thread.

    Cancelling sets the child's CancelToken (the use case decides how to stop); a child
    that dies without answering raises RadcryptError.
    """
    out = _CTX.Queue()
    cancel_flag = _CTX.Value("b", 0, lock=False)
    process = _CTX.Process(target=_job_main, args=(fn, args, out, cancel_flag),
                           name="radcrypt-job", daemon=True)
    process.start()
    try:
        while True:
            if cancel is not None and cancel.cancelled:
                cancel_flag.value = 1
            try:
                message = out.get(timeout=POLL)
            except queue_module.Empty:
                if not process.is_alive():
                    with contextlib.suppress(queue_module.Empty):
                        message = out.get(timeout=1.0)
                        if message[0] != "progress":
                            return _finish(message)
                    raise RadcryptError(
                        f"the background worker stopped unexpectedly (exit code "
                        f"{process.exitcode}); what was already committed is kept") from None
                continue
            if message[0] == "progress":
                progress(message[1])
            else:
                return _finish(message)
    finally:
        cancel_flag.value = 1
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
        out.close()


def _finish(message: tuple[Any, ...]) -> Any:
    if message[0] == "result":
        return message[1]
    _, exc, details = message
    if hasattr(exc, "add_note"):
        exc.add_note("In the background worker process:\n" + details)
    raise exc


# --- the jobs (module level, so a child can import them by name) -----------------------------


def decode_file(path: str) -> Any:
    """The DecodedImage of a file (modality values, window, photometric details)."""
    from app.imaging.decode import decode_image

    return decode_image(path)


def display_of_file(path: str) -> np.ndarray:
    """The 8-bit display image of a file (default window), for previews."""
    from app.imaging.decode import decode_image

    return decode_image(path).display()


def features_of_file(path: str, extractor: str) -> np.ndarray:
    from app.imaging.decode import decode_image
    from app.imaging.features import get_extractor

    return np.asarray(get_extractor(extractor)(decode_image(path)), dtype=np.float64)


def import_job(progress: ProgressCallback, cancel: CancelToken, store_config: Any,
               repo: Any, paths: list[str], workers: int, batch_size: int | None) -> Any:
    """The core's Importer, in a child, against the parent's storage."""
    from app.core.importer import Importer
    from cloud.store import ObjectStore

    kwargs: dict[str, Any] = {"batch_size": batch_size} if batch_size else {}
    store = ObjectStore(store_config)
    return Importer(store, repo, workers=workers, progress=progress, cancel=cancel,
                    **kwargs).run(paths)


class _StoreSession:
    """What app.core.demo.prepare_demo_repository uses of a Session: its store and
    settings (the child must use the parent's store, not find or start its own)."""

    def __init__(self, store: Any, settings: Any) -> None:
        self.store = store
        self.settings = settings


def demo_job(progress: ProgressCallback, cancel: CancelToken, store_config: Any,
             settings: Any, workdir: Path, count: int, queries: int) -> tuple[Any, list[Path]]:
    """The demo repository (sample images imported) and a few perturbed query images."""
    from app.core.demo import prepare_demo_repository
    from app.core.progress import ProgressEvent
    from app.gui.backend import make_demo_queries
    from cloud.store import ObjectStore

    session = _StoreSession(ObjectStore(store_config), settings)
    progress(ProgressEvent("samples", 0, 0, message="Preparing sample images"))
    repo, files, _report, _owner = prepare_demo_repository(
        session, workdir, count, progress)  # type: ignore[arg-type]
    progress(ProgressEvent("queries", 0, 0, message="Making query images"))
    make_demo_queries(files, workdir / "queries", queries)
    return repo, files


def repository_job(action: str, store_config: Any, settings: Any, *args: Any) -> Any:
    """Key generation (secure-kNN matrices: numpy's QR holds the GIL for ~0.15 s) and key
    rotation, in a child: create a repository (owned by an identity) or revoke a
    user (which rotates the key version and re-encrypts the index)."""
    from cloud.store import ObjectStore

    store = ObjectStore(store_config)
    from app.core import access

    session = _StoreSession(store, settings)
    if action == "create-as":
        return access.create_repository_as(session, *args)  # type: ignore[arg-type]
    if action == "revoke":
        return access.revoke_access(session, *args)  # type: ignore[arg-type]
    raise ValueError(f"unknown repository action {action!r}")


__all__ = ["ProcessJobs", "decode_file", "demo_job", "display_of_file", "features_of_file",
           "import_job", "no_progress", "repository_job", "run_job"]
