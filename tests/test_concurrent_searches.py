"""cloud/search.py ConcurrentSearches: a lone search keeps the BLAS's threads, overlapping
searches run with one, and the BLAS's own setting comes back when one search is left."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from threadpoolctl import ThreadpoolController

from cloud import search as engine
from cloud.search import ConcurrentSearches


def _blas_threads() -> int:
    infos = [i for i in ThreadpoolController().info() if i["user_api"] == "blas"]
    assert infos, "numpy brings a BLAS"
    return int(infos[0]["num_threads"])


def test_overlapping_searches_run_with_one_blas_thread() -> None:
    default = _blas_threads()
    if default < 2:
        pytest.skip("this machine's BLAS has one thread: nothing to limit")
    searches = ConcurrentSearches()
    with searches.running():
        assert _blas_threads() == default  # alone: the BLAS's threads
        with searches.running():
            assert _blas_threads() == 1  # two at once
            with searches.running():
                assert _blas_threads() == 1
        assert _blas_threads() == default  # one left
    assert _blas_threads() == default


def test_searches_from_threads_leave_the_setting_as_found() -> None:
    """From worker threads, as the service runs them: threadpoolctl ignores a limit set
    by any thread but the one controlling OpenBLAS, so a change made from whichever
    thread sees the second search would not take."""
    default = _blas_threads()
    searches = ConcurrentSearches()
    inside = threading.Barrier(4)
    seen: list[int] = []

    def search() -> None:
        with searches.running():
            inside.wait(timeout=10)
            seen.append(_blas_threads())
            np.ones((64, 64)) @ np.ones((64, 64))  # a product under the limit
            inside.wait(timeout=10)

    threads = [threading.Thread(target=search) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert seen == [1] * 4
    assert _blas_threads() == default


def test_the_engines_own_threads_run_with_one_blas_thread(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """_threaded (the engine's threads over spans of rows) under a one-thread BLAS, from
    a thread that is not the one controlling OpenBLAS."""
    default = _blas_threads()
    seen: list[int] = []

    def span(_: tuple[int, int]) -> int:
        seen.append(_blas_threads())
        return 0

    worker = threading.Thread(target=lambda: engine._threaded(span, [(0, 1), (1, 2)]))
    worker.start()
    worker.join(timeout=20)
    assert seen == [1, 1]
    assert _blas_threads() == default
