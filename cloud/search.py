"""Exact encrypted nearest-neighbour search by filter and refine (DESIGN.md §4).

The server holds, per stored vector, secure-kNN ciphertexts of its bound vectors (one
per level, cheapest first) and of the full vector; a query brings one token per level.
For every vector, level score >= full score (the bound never exceeds the distance and
all tokens share the query's scale). So a vector whose level score is below the k-th
best full score found so far cannot enter the top k, and is never scored in full.

Numerics. Scores are float64. Rounding makes a computed score differ from the exact
one by at most about 1e-12 |row| |token| (the secure-kNN matrices have condition number
<= 4); a vector is pruned only when its bound is below the threshold by more than
SAFETY_EPS (|row|max |token|, cloud/numerics.py) at both the level and the full score, a
margin two orders of magnitude above that error. A larger margin costs pruning, never exactness.

No Python loop touches individual vectors: the first level is one matrix-vector
product over all n, then candidates are refined in blocks of increasing size, highest
first-level score first, so the threshold rises fast and the loop stops early. When
the bounds let too many through, every vector is scored from sixteen-bit codes of its
full ciphertext with a proven error bound, and the few it cannot tell apart in float64
(cloud/codes.py).

Threads. From OWN_THREADS_ROWS rows on, every stage that reads all rows (the first
level and its seeds, the pass that finds the candidates, the batch's block maxima, the
codes scan), long rescoring lists and the refinement of a batch's queries are shared by
the engine's threads, as many as the CPUs the process may use (cloud/cpus.py). Results do
not depend on the count: shares are whole rows, and every reported score is summed in
one fixed order (cloud/rescore.py).
"""

from __future__ import annotations

import contextlib
import functools
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, TypeVar

import numpy as np
from numpy.typing import NDArray
from threadpoolctl import ThreadpoolController

from cloud import codes, rescore
from cloud.codes import RowCodes
from cloud.cpus import engine_threads
from cloud.numerics import FLOAT32_UNIT, SAFETY_EPS
from crypto.tokens import EncryptedVectors, QueryToken

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
Scores = NDArray[np.float32] | NDArray[np.float64]
Result = TypeVar("Result")
P = ParamSpec("P")
FIRST_BLOCK = 256
BLOCK_GROWTH = 2
MAX_BLOCK = 65536
SCAN_FRACTION = 0.1  # above this share of survivors, a scan of the codes is cheaper
# Batches: the first level is computed chunk by chunk (a chunk's scores stay in cache)
# and only the maximum of every block of rows is kept per query.
BLOCKED_BATCH_ROWS = 65536
ROW_SCORE_GROUP = 16  # queries whose first-level scores are kept at once (16 x n floats)
BATCH_CHUNK = 16384  # rows per matrix product; a multiple of BATCH_BLOCK
BATCH_BLOCK = 512  # rows per block maximum; a power of two
BLOCK_SCAN_FRACTION = 0.02  # above this share of passing blocks, score rows one by one
# From this many rows on, the engine runs its products in its own threads (each with a
# one-thread BLAS); below, the first level fits in cache, and BLAS's own threads, which
# spin between calls, hand work over faster than a thread pool (0.18 ms against 0.38 ms
# for the first level of 100k vectors).
OWN_THREADS_ROWS = 262144
SCAN_ROWS_STEP = 32768  # the threads' shares of rows are multiples of this
THREADED_RESCORE_ROWS = 16384  # from this many chosen rows on, rescored by all threads


@dataclass
class SearchStats:
    """What one query cost: how many vectors each stage scored."""

    vectors: int
    level_scored: list[int]
    full_scored: int
    milliseconds: float
    batch: int = 1  # queries answered by the same engine call (search_batch)

    @property
    def fraction_fully_scored(self) -> float:
        return self.full_scored / self.vectors if self.vectors else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "vectors": self.vectors,
            "level_scored": list(self.level_scored),
            "full_scored": self.full_scored,
            "fraction_fully_scored": self.fraction_fully_scored,
            "milliseconds": self.milliseconds,
            "batch": self.batch,
        }


@dataclass
class SearchResult:
    """Top-k positions (best first) with their encrypted-domain scores."""

    positions: I64
    scores: F64
    stats: SearchStats


class EncryptedIndex:
    """In-memory arrays of one repository, laid out for fast scoring.

    The row norms it keeps are computed from ciphertexts alone; they size the
    rounding margin and reveal nothing a server could not compute itself.
    """

    def __init__(self, vectors: EncryptedVectors, *, full_norm: float | None = None,
                 level_norms: list[float] | None = None,
                 first32: NDArray[np.float32] | None = None,
                 full_codes: RowCodes | None = None) -> None:
        """Arrays may be memory-mapped files (cloud/repo_index.py): then pass the norms
        and the float32 first level, computed while the data was in memory anyway, so
        that nothing here has to read every page."""
        self.full = np.ascontiguousarray(vectors.full, dtype=np.float64)
        self.levels = [np.ascontiguousarray(a, dtype=np.float64) for a in vectors.levels]
        self.full_norm = max_row_norm(self.full) if full_norm is None else full_norm
        self.level_norms = ([max_row_norm(a) for a in self.levels] if level_norms is None
                            else list(level_norms))
        # The first level scans every vector: in float32 it reads half the memory.
        if first32 is None and self.levels:
            first32 = self.levels[0].astype(np.float32)
        self.first32 = first32
        # When the bounds cannot prune (queries far from everything, structureless data)
        # the engine scans sixteen-bit codes of the full vectors and rescores the few
        # near the top (cloud/codes.py).
        self.full_codes = RowCodes.of(self.full) if full_codes is None else full_codes

    def __len__(self) -> int:
        return int(self.full.shape[0])

    @property
    def widths(self) -> tuple[int, ...]:
        return (*tuple(int(a.shape[1]) for a in self.levels), int(self.full.shape[1]))

    @classmethod
    def concat(cls, parts: list[EncryptedVectors]) -> EncryptedIndex:
        """One index over several segments; every part must have the same widths."""
        if not parts:
            raise ValueError("an index needs at least one segment")
        widths = {p.widths for p in parts}
        if len(widths) != 1:
            raise ValueError("segments disagree on vector widths (different keys?)")
        levels = tuple(
            np.concatenate([p.levels[i] for p in parts]) for i in range(len(parts[0].levels))
        )
        return cls(EncryptedVectors(full=np.concatenate([p.full for p in parts]), levels=levels))


def max_row_norm(a: F64) -> float:
    """The largest row norm: it sizes the rounding margins, so whoever hands an index
    precomputed norms (cloud/repo_index.py) must compute them this way."""
    if a.shape[0] == 0:
        return 0.0
    return float(np.sqrt(np.max(np.einsum("ij,ij->i", a, a))))


def _check(index: EncryptedIndex, token: QueryToken, k: int) -> None:
    if k < 1:
        raise ValueError("k must be at least 1")
    if token.widths != index.widths:
        raise ValueError(
            f"query token widths {token.widths} do not match the index {index.widths}"
        )


@dataclass
class _TopK:
    """The k best (position, score) pairs seen so far and the pruning threshold."""

    k: int
    positions: I64 = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    scores: F64 = field(default_factory=lambda: np.empty(0))

    @property
    def threshold(self) -> float:
        return float(self.scores.min()) if self.scores.size >= self.k else -np.inf

    def merge(self, positions: I64, scores: F64) -> None:
        pos = np.concatenate([self.positions, positions])
        sc = np.concatenate([self.scores, scores])
        if sc.size > self.k:
            keep = np.argpartition(-sc, self.k - 1)[: self.k]
            pos, sc = pos[keep], sc[keep]
        self.positions, self.scores = pos, sc

    def ranked(self) -> tuple[I64, F64]:
        order = np.lexsort((self.positions, -self.scores))
        return self.positions[order], self.scores[order]


def _own_threads(fn: Callable[Concatenate[EncryptedIndex, P], Result]
                 ) -> Callable[Concatenate[EncryptedIndex, P], Result]:
    """From OWN_THREADS_ROWS on, run with a one-thread BLAS: the engine brings its own
    threads (_threaded), and a multi-threaded BLAS leaves its threads spinning after
    each call, competing with them (measured: a codes scan right after a two-thread
    product took 35 ms instead of 20)."""

    @functools.wraps(fn)
    def wrapped(index: EncryptedIndex, /, *args: P.args, **kwargs: P.kwargs) -> Result:
        if len(index) < OWN_THREADS_ROWS:
            return fn(index, *args, **kwargs)
        with _BLAS_THREADS.hold(own=True):
            return fn(index, *args, **kwargs)

    return wrapped


@_own_threads
def search(index: EncryptedIndex, token: QueryToken, k: int = 1) -> SearchResult:
    """Exact top-k of one query by filter and refine."""
    _check(index, token, k)
    if len(token) != 1:
        raise ValueError("search() takes one query; use search_batch() for several")
    start = time.perf_counter()
    if len(index) == 0 or not index.levels:
        return _timed(linear_scan(index, token, k), start)
    firsts, seeds = _first_level_scores(index, token.levels[0], seed_k=k)
    result = _refine_query(index, token, 0, firsts[0], k, seeds=seeds)
    assert result is not None  # with scan=True the query is always answered
    return _timed(result, start)


@_own_threads
def search_batch(index: EncryptedIndex, token: QueryToken, k: int = 1) -> list[SearchResult]:
    """Exact top-k for every query of a token.

    The first level, the only part that reads every vector, is one matrix product for
    the whole batch, computed a chunk of rows at a time so that its scores never leave
    the cache: of every block of BATCH_BLOCK rows only the maximum score is kept per
    query. A block whose maximum is below a query's threshold holds no candidate; the
    few blocks that may are rescored for that query alone, best block first.

    Below BLOCKED_BATCH_ROWS the scores of the whole batch fit in cache and are kept
    for every row; so are they for queries whose candidates are spread over too many
    blocks (fresh queries: few rows pass but most blocks hold one). Queries that not
    even single rows prune share one scan of the full vectors' sixteen-bit codes.
    """
    _check(index, token, k)
    if len(token) == 1 or len(index) == 0 or not index.levels:
        singles = [search(index, token.select(i), k) for i in range(len(token))]
        for single in singles:
            single.stats.batch = len(token)
        return singles
    results: list[SearchResult | None] = [None] * len(token)
    spent_ms = [0.0] * len(token)  # each query's share of the batch's time

    parallel = len(index) >= OWN_THREADS_ROWS and engine_threads() > 1

    def answer(queries: list[int], shared_since: float,
               refine: Callable[[int, int], SearchResult | None]) -> list[int]:
        """Refine each query, book its time; the queries left unanswered. On a large
        index the queries are refined in the engine's threads at once (each query's
        arrays are its own), each booked an equal share of the time they took."""
        shared = (time.perf_counter() - shared_since) * 1000.0 / len(queries)
        if parallel and len(queries) > 1:
            begin = time.perf_counter()
            found = _threaded(lambda item: refine(*item), list(enumerate(queries)))
            each = (time.perf_counter() - begin) * 1000.0 / len(queries)
            for qi, result in zip(queries, found, strict=True):
                results[qi] = result
                spent_ms[qi] += shared + each
            return [qi for qi in queries if results[qi] is None]
        for row, qi in enumerate(queries):
            begin = time.perf_counter()
            results[qi] = refine(row, qi)
            spent_ms[qi] += shared + (time.perf_counter() - begin) * 1000.0
        return [qi for qi in queries if results[qi] is None]

    pending = list(range(len(token)))
    if len(index) >= BLOCKED_BATCH_ROWS:
        start = time.perf_counter()
        maxima = _block_maxima(index, token.levels[0])
        pending = answer(pending, start,
                         lambda row, qi: _refine_blocks(index, token, qi, maxima[row], k))
    # Small indexes, and queries whose candidates are spread over too many blocks: every
    # row's first-level score, for a group of queries at a time (bounded memory).
    unprunable: list[int] = []
    for group_start in range(0, len(pending), ROW_SCORE_GROUP):
        group = pending[group_start : group_start + ROW_SCORE_GROUP]
        start = time.perf_counter()
        firsts, _ = _first_level_scores(index, token.levels[0][group])

        def from_rows(row: int, qi: int, firsts: NDArray[np.float32] = firsts
                      ) -> SearchResult | None:
            return _refine_query(index, token, qi, firsts[row], k, scan=False)

        unprunable += answer(group, start, from_rows)
    # Queries the bounds could not prune share one scan of the full vectors' codes.
    if unprunable:
        start = time.perf_counter()
        scanned = _scan_codes(index, token.full[unprunable], k)
        answer(unprunable, start, lambda row, _: scanned[row])
    answered = [r for r in results if r is not None]
    assert len(answered) == len(results)  # the scan answers every query left
    for result, ms in zip(answered, spent_ms, strict=True):
        result.stats.milliseconds = ms
        result.stats.batch = len(token)
    return answered


def _block_maxima(index: EncryptedIndex, tokens: F64) -> NDArray[np.float32]:
    """(Q, blocks) float32 maxima of the first-level scores over blocks of rows.

    Each maximum is one of the float32 scores a single query would compute (within
    the same float32 error bound of the exact score, whatever the summation order), so
    a block whose maximum fails the threshold test has no row that would pass it.
    """
    assert index.first32 is not None
    first32 = index.first32
    n, block = len(index), BATCH_BLOCK
    queries = np.ascontiguousarray(np.atleast_2d(tokens).astype(np.float32).T)
    maxima = np.empty((-(-n // block), queries.shape[1]), dtype=np.float32)

    def rows(begin: int, end: int) -> None:
        scores = np.empty((BATCH_CHUNK, queries.shape[1]), dtype=np.float32)
        for start in range(begin, end, BATCH_CHUNK):
            count = min(BATCH_CHUNK, end - start)
            chunk = scores[:count]
            np.matmul(first32[start : start + count], queries, out=chunk)
            whole = count // block * block
            first_block = start // block
            if whole:
                _halving_max(chunk[:whole], block,
                             maxima[first_block : first_block + whole // block])
            if whole < count:
                maxima[first_block + whole // block] = chunk[whole:].max(axis=0)

    # The engine's threads over shares of the rows, each with a one-thread BLAS: a
    # multi-threaded BLAS synchronises its threads inside every small product, which on a
    # busy machine costs more than the product (measured: 12 ms instead of 0.3 ms for
    # 16 x 36 x 10k).
    _threaded(lambda span: rows(*span), _split_rows(n, BATCH_CHUNK, engine_threads()))
    return np.ascontiguousarray(maxima.T)


def _split_rows(n: int, step: int, parts: int) -> list[tuple[int, int]]:
    """Row ranges, each a whole number of ``step``s (but the last), one per thread."""
    steps = max(1, math.ceil(n / step))
    per_part = math.ceil(steps / parts) * step
    return [(b, min(n, b + per_part)) for b in range(0, n, per_part)]


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """The engine's threads besides the caller's, one pool per count (cloud/cpus.py:
    the count is set once, at start-up; tests and benchmarks change it)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="radcrypt-search",
                              initializer=_mark_engine_thread)


_engine_thread = threading.local()


def _mark_engine_thread() -> None:
    _engine_thread.inside = True


def _in_engine_thread() -> bool:
    """In one of the engine's own threads: work there runs inline, never handed to the
    pool again (a worker waiting on its own pool could wait forever)."""
    return bool(getattr(_engine_thread, "inside", False))


class _BlasThreads:
    """The process's BLAS thread count, changed from one thread only.

    threadpoolctl lets a single Python thread control a pthreads OpenBLAS: a limit set
    from any other thread while that one lives is silently ignored. The engine runs in
    the service's worker threads and in the callers' threads, so every change goes
    through one long-lived control thread here, and the count follows from who needs
    what: one BLAS thread while the engine's own threads run (``owned``) or while two or
    more searches overlap (``overlapping``), the BLAS's own setting otherwise. The
    setting is process-wide: a change in the middle of a search changes the threads of
    its remaining products only, which costs time, never correctness.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owned = 0
        self._running = 0
        self._applied: int | None = None
        self._default: int | None = None
        self._jobs: queue.SimpleQueue[tuple[int, threading.Event] | None] | None = None

    def _control(self, jobs: queue.SimpleQueue[tuple[int, threading.Event] | None],
                 ready: threading.Event) -> None:
        controller = ThreadpoolController()  # found once: 0.2 ms to look the libraries up
        infos = [i["num_threads"] for i in controller.info() if i["user_api"] == "blas"]
        self._default = min(infos) if infos else 1
        ready.set()
        while (job := jobs.get()) is not None:
            threads, done = job
            controller.limit(limits=threads, user_api="blas")
            done.set()

    def _start(self) -> queue.SimpleQueue[tuple[int, threading.Event] | None]:
        if self._jobs is None:
            jobs: queue.SimpleQueue[tuple[int, threading.Event] | None] = queue.SimpleQueue()
            ready = threading.Event()
            threading.Thread(target=self._control, args=(jobs, ready), daemon=True,
                             name="radcrypt-blas-control").start()
            ready.wait()
            self._jobs = jobs
        return self._jobs

    def _apply(self) -> None:
        """With the lock held: ask the control thread for the count now needed."""
        jobs = self._start()
        assert self._default is not None
        wanted = 1 if self._owned or self._running >= 2 else min(self._default,
                                                                 engine_threads())
        if wanted != self._applied:
            done = threading.Event()
            jobs.put((wanted, done))
            done.wait()
            self._applied = wanted

    @contextlib.contextmanager
    def hold(self, *, own: bool) -> Iterator[None]:
        """While the engine's own threads run (own) or while a search runs (not own)."""
        with self._lock:
            if own:
                self._owned += 1
            else:
                self._running += 1
            self._apply()
        try:
            yield
        finally:
            with self._lock:
                if own:
                    self._owned -= 1
                else:
                    self._running -= 1
                self._apply()

    @property
    def default(self) -> int:
        with self._lock:
            self._start()
            assert self._default is not None
            return self._default


_BLAS_THREADS = _BlasThreads()


class ConcurrentSearches:
    """Marks the searches of a service, so that overlapping ones run with one BLAS thread.

    A search alone uses the BLAS's threads (measured at 100,000 images on 2 cores: a
    single query 9.7 ms in the engine, against 17.1 ms with one BLAS thread; 30 queries
    281 against 512 ms). Concurrent searches each under a multi-threaded OpenBLAS spin
    against each other (bench/load.py, 8 clients at 10,000 images: 17 searches/s with
    the BLAS's threads, 260/s with one).
    """

    def running(self) -> contextlib.AbstractContextManager[None]:
        return _BLAS_THREADS.hold(own=False)


def _halving_max(scores: NDArray[np.float32], block: int, out: NDArray[np.float32]) -> None:
    """Per-block column maxima of a (blocks * block, Q) array, overwriting it.

    numpy's max(axis=0) walks Q values at a time; folding the halves of every block
    onto each other runs over long contiguous stretches instead (about 3x faster).
    """
    view = scores.reshape(-1, block, scores.shape[1])
    half = block
    while half > 2:
        half //= 2
        np.maximum(view[:, :half], view[:, half : 2 * half], out=view[:, :half])
    if block >= 2:
        np.maximum(view[:, 0], view[:, 1], out=out)
    else:
        out[:] = view[:, 0]


class _Refiner:
    """One query's thresholds, margins and running top k; scores candidates through the
    finer levels and in full, cheapest first."""

    def __init__(self, index: EncryptedIndex, token: QueryToken, qi: int, k: int) -> None:
        self.index = index
        self.t_levels = [t[qi] for t in token.levels]
        self.t_full = token.full[qi]
        self.full_err = SAFETY_EPS * index.full_norm * float(np.linalg.norm(self.t_full))
        self.margins = [
            SAFETY_EPS * norm * float(np.linalg.norm(t)) + self.full_err
            for norm, t in zip(index.level_norms, self.t_levels, strict=True)
        ]
        self.margins[0] += _float32_error(index.levels[0].shape[1], index.level_norms[0],
                                          self.t_levels[0])
        self.scored = [len(index)] + [0] * (len(index.levels) - 1)
        self.full_scored = 0
        self.top = _TopK(k)

    def full_floor(self) -> float:
        """A lower bound on the k-th best full score (of the vectors scored so far)."""
        return self.top.threshold - self.full_err

    def first_floor(self) -> np.float32:
        """First-level float32 scores below this cannot reach the top k."""
        return _float32_floor(self.top.threshold - self.margins[0])

    def refine(self, candidates: I64) -> None:
        threshold = self.top.threshold
        for level in range(1, len(self.index.levels)):
            if threshold == -np.inf or candidates.size == 0:
                break
            scores = _row_scores(self.index.levels[level], candidates, self.t_levels[level])
            self.scored[level] += int(candidates.size)
            candidates = candidates[scores >= threshold - self.margins[level]]
        if candidates.size:
            self.top.merge(candidates, _row_scores(self.index.full, candidates, self.t_full))
            self.full_scored += int(candidates.size)

    def result(self) -> SearchResult:
        positions, scores = self.top.ranked()
        stats = SearchStats(len(self.index), self.scored, self.full_scored, 0.0)
        return SearchResult(positions, scores, stats)


def _refine_query(index: EncryptedIndex, token: QueryToken, qi: int,
                  first: NDArray[np.float32], k: int, scan: bool = True,
                  seeds: I64 | None = None) -> SearchResult | None:
    """Filter and refine one query whose first-level scores are known (and ours to mark).

    When too many vectors survive the first level for pruning to pay, the query is
    answered by a scan of the full vectors' codes, or, with ``scan`` False, left to
    the caller (None) to scan together with other such queries. ``seeds``: the rows to
    start from when the caller found them already (_first_level_scores).
    """
    n = len(index)
    refiner = _Refiner(index, token, qi, k)

    def refine(block: I64) -> None:
        first[block] = np.nan  # never visited twice: NaN fails every comparison
        refiner.refine(block)

    # The k best first-level candidates set a threshold; then blocks of growing size,
    # best first, each cut by the threshold the blocks before them raised. One pass
    # over every row finds the candidates; the floor only rises, so later passes need
    # only look at the candidates left (a row below an earlier floor stays below).
    refine(_seed_positions(first, k) if seeds is None else seeds)
    remaining = _positions_at_least(first, refiner.first_floor(), SCAN_FRACTION * n)
    if remaining is None:
        if not scan:
            return None
        return _scan_codes(index, refiner.t_full[None, :], k, [refiner.full_floor()])[0]
    block_size = FIRST_BLOCK
    while remaining.size:
        block = (remaining if remaining.size <= block_size
                 else _top_positions(first, remaining, block_size))
        refine(block)
        block_size = min(MAX_BLOCK, block_size * BLOCK_GROWTH)
        remaining = remaining[first[remaining] >= refiner.first_floor()]
    return refiner.result()


def _positions_at_least(scores: NDArray[np.float32], floor: np.float32, limit: float
                        ) -> I64 | None:
    """Positions whose score is >= floor, in order; None when more than ``limit`` are
    (then the caller scans instead and needs no list). The engine's threads share the
    rows from OWN_THREADS_ROWS on."""

    def part(span: tuple[int, int]) -> I64 | None:
        begin, end = span
        passing = scores[begin:end] >= floor
        if np.count_nonzero(passing) > limit:
            return None
        return np.flatnonzero(passing) + begin

    parts = _threaded(part, _row_spans(scores.shape[0]))
    if any(p is None for p in parts):
        return None
    found = [p for p in parts if p is not None]
    positions = found[0] if len(found) == 1 else np.concatenate(found)
    return None if positions.size > limit else positions


def _refine_blocks(index: EncryptedIndex, token: QueryToken, qi: int,
                   maxima: NDArray[np.float32], k: int) -> SearchResult | None:
    """Filter and refine one query of a batch from its block maxima (ours to mark).

    Blocks are rescored best maximum first, in groups of growing size, each group cut
    by the threshold the groups before it raised; the loop ends when no unvisited
    block's maximum passes. None when more than BLOCK_SCAN_FRACTION of the blocks pass
    after the seeds: the candidates are spread too thin for blocks to pay, and the
    caller scores that query's rows one by one.
    """
    n, block = len(index), BATCH_BLOCK
    assert index.first32 is not None
    refiner = _Refiner(index, token, qi, k)
    t_first = refiner.t_levels[0].astype(np.float32)
    offsets = np.arange(block, dtype=np.int64)

    def rows_of(blocks: I64) -> I64:
        rows = (blocks[:, None] * block + offsets[None, :]).ravel()
        return rows[rows < n]

    # Seed: the k blocks with the highest maxima hold the k best first-level rows
    # (a block holds one of them exactly when its maximum is at least the k-th best
    # score), the rows a single query seeds with; their full scores set a threshold.
    group = _top_positions(maxima, np.arange(maxima.size, dtype=np.int64), min(maxima.size, k))
    first_pass = True
    group_size = 1
    while group.size:
        maxima[group] = np.nan  # never visited twice: NaN fails every comparison
        rows = rows_of(group)
        scores = index.first32[rows] @ t_first
        if first_pass:
            seeds = _top_positions(scores, np.arange(rows.size, dtype=np.int64), k)
            refiner.refine(rows[seeds])
            scores[seeds] = -np.inf
            surviving = np.count_nonzero(maxima >= refiner.first_floor())
            if surviving > BLOCK_SCAN_FRACTION * maxima.size:
                return None
            first_pass = False
        refiner.refine(rows[scores >= refiner.first_floor()])
        remaining = np.flatnonzero(maxima >= refiner.first_floor())
        group = _top_positions(maxima, remaining, group_size)
        group_size = min(MAX_BLOCK // block, group_size * BLOCK_GROWTH)
    return refiner.result()


def _scan_codes(index: EncryptedIndex, t_full: F64, k: int,
                floors: list[float] | None = None) -> list[SearchResult]:
    """Exact top-k of every query by a scan of the full vectors' sixteen-bit codes (the
    engine's threads over shares of the rows), then float64 on the candidates the codes cannot
    tell apart: every row whose score may reach the k-th best (cloud/codes.py).
    ``floors``: known lower bounds on each query's k-th best score."""
    n = len(index)
    known = np.full(t_full.shape[0], -np.inf) if floors is None else np.asarray(floors)
    found = codes.scan(index.full_codes, t_full, k, known,
                       _row_spans(n), _threaded)
    results = []
    for qi, candidates in enumerate(found.rows):
        top = _TopK(k)
        top.merge(candidates, _row_scores(index.full, candidates, t_full[qi]))
        positions, scores = top.ranked()
        levels = [n] + [0] * (len(index.levels) - 1)
        results.append(SearchResult(positions, scores, SearchStats(n, levels, n, 0.0)))
    return results


def _threaded(fn: Callable[[tuple[int, int]], Result], spans: list[tuple[int, int]]
              ) -> list[Result]:
    """Spans of rows in the engine's threads, each with a one-thread BLAS; a single
    span, or spans met in an engine thread already, in this thread, as they are. The
    calling thread takes the first span itself rather than wait idle (one hand-over
    fewer: they cost tens of microseconds each, a near query's whole budget is about
    two milliseconds on 16 cores)."""
    if len(spans) == 1 or _in_engine_thread():
        return [fn(span) for span in spans]
    with _BLAS_THREADS.hold(own=True):
        pool = _pool(max(1, engine_threads() - 1))  # and this thread
        others = [pool.submit(fn, span) for span in spans[1:]]
        _engine_thread.inside = True
        try:
            first = fn(spans[0])
        finally:
            _engine_thread.inside = False
        return [first, *(future.result() for future in others)]


def _row_scores(matrix: F64, rows: I64, token: F64) -> F64:
    """float64 scores of the chosen rows, each summed in one fixed order whatever rows
    share the call (cloud/rescore.py: a batch and a single query report the same bits);
    long lists shared by the engine's threads."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    token = np.ascontiguousarray(token, dtype=np.float64)
    threads = engine_threads()
    if rows.size < THREADED_RESCORE_ROWS or threads == 1 or _in_engine_thread():
        return rescore.row_scores(matrix, rows, token)
    out = np.empty(rows.size, dtype=np.float64)

    def span(bounds: tuple[int, int]) -> None:
        begin, end = bounds
        rescore.into(matrix, rows[begin:end], token, out[begin:end])

    _threaded(span, _split_rows(rows.size, 1024, threads))
    return out


def _row_spans(n: int) -> list[tuple[int, int]]:
    """How the engine's threads share n rows: not at all below OWN_THREADS_ROWS."""
    if n < OWN_THREADS_ROWS:
        return [(0, n)]
    return _split_rows(n, SCAN_ROWS_STEP, engine_threads())


def _chosen_spans(n: int) -> list[tuple[int, int]]:
    """How the engine's threads share a list of n chosen rows, each read where it is:
    from THREADED_RESCORE_ROWS on, since such a row costs the memory's latency (about
    90 ns on the 2-core VM, against 17 contiguous), which more threads overlap."""
    if n < THREADED_RESCORE_ROWS:
        return [(0, n)]
    return _split_rows(n, 1024, engine_threads())


def _float32_floor(value: float) -> np.float32:
    """The largest float32 <= value: comparing float32 scores against it never prunes a
    vector that the float64 threshold would keep."""
    rounded = np.float32(value)
    if float(rounded) > value:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return rounded


def _first_level_scores(index: EncryptedIndex, tokens: F64, seed_k: int = 0,
                        penalty: NDArray[np.float32] | None = None,
                        ready: NDArray[np.float32] | None = None
                        ) -> tuple[NDArray[np.float32], I64 | None]:
    """(Q, n) float32 first-level scores (rows are fresh arrays the caller may mark)
    and, for one query with ``seed_k``, k rows with high scores to seed its threshold.
    ``penalty`` (one query): added to each row's score by each thread on its share while
    its scores are in cache, 0 for a keyword filter's rows (a score plus 0 is the same
    score) and minus infinity for the others (an addition costs 0.1 ms a million rows,
    where copying minus infinity under a mask cost 2.8). ``ready`` (one query): its
    scores of every row, computed already (FirstLevelAhead): only the penalty and the
    seeds are left, in the same shares.

    From OWN_THREADS_ROWS on, computed by the engine's threads over shares of the rows
    (see _own_threads), each finding the seeds of its share while its scores are in
    cache; below, by one product.
    """
    assert index.first32 is not None
    first32 = index.first32
    queries = np.atleast_2d(tokens).astype(np.float32)
    assert ready is None or queries.shape[0] == 1  # search_subset refuses it otherwise
    scores: NDArray[np.float32] = (ready[None, :] if ready is not None else
                                   np.empty((queries.shape[0], len(index)), dtype=np.float32))
    seeding = seed_k > 0 and queries.shape[0] == 1

    def rows(span: tuple[int, int]) -> I64 | None:
        begin, end = span
        if queries.shape[0] == 1:
            if ready is None:
                np.matmul(first32[begin:end], queries[0], out=scores[0, begin:end])
            if penalty is not None:
                np.add(scores[0, begin:end], penalty[begin:end], out=scores[0, begin:end])
        else:
            scores[:, begin:end] = queries @ first32[begin:end].T
        if not seeding:
            return None
        return _seed_positions(scores[0, begin:end], seed_k) + begin

    found = _threaded(rows, _row_spans(len(index)))
    if not seeding:
        return scores, None
    candidates = [f for f in found if f is not None]
    if len(candidates) == 1:
        return scores, candidates[0]
    # The best seeds of every share hold the best of all (any k rows would be valid).
    merged = np.concatenate(candidates)
    return scores, _top_positions(scores[0], merged, seed_k)


def _float32_error(width: int, row_norm: float, token: F64) -> float:
    """A bound on |float32 score - float64 score| for any row of the index.

    Rounding the row and the token to float32 and a float32 dot product of ``width``
    terms, in any summation order, err by at most (width + 2) u |row| |token| with
    u = 2^-24 (to first order); the factor 4 absorbs the second-order terms.
    """
    return 4.0 * (width + 2) * FLOAT32_UNIT * row_norm * float(np.linalg.norm(token))


def _seed_positions(scores: Scores, k: int) -> I64:
    """k positions with high first-level scores, to give the threshold a start.

    Any k fully scored vectors give a valid threshold (the true k-th best is at least
    as good), so this only needs to be cheap and good, not exact: repeated argmax for
    small k (a full argpartition over n costs more than the whole scan), the top k of
    an evenly strided sample otherwise.
    """
    n = scores.shape[0]
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 16:
        picked: list[int] = []
        saved = []
        for _ in range(k):
            best = int(np.argmax(scores))
            picked.append(best)
            saved.append(scores[best])
            scores[best] = -np.inf
        scores[picked] = saved
        return np.array(picked, dtype=np.int64)
    stride = max(1, n // max(4096, 64 * k))
    return _top_positions(scores, np.arange(0, n, stride, dtype=np.int64), k)


def _top_positions(scores: Scores, positions: I64, count: int) -> I64:
    """The ``count`` positions with the highest scores (unordered)."""
    if positions.size <= count:
        return positions
    part = np.argpartition(scores[positions], positions.size - count)[positions.size - count :]
    return positions[part]


SUBSET_WIDE_SHARE = 10
"""A subset of at least a tenth of the rows is "wide": its first level is scored over
every row and masked (see _subset_first_level). Measured at 1M x 128 on 2 cores: a 3 %
subset gathered 3.9 ms against 7.3 masked; an eighth 13-16 against 12; a half 51-55
against 22-24."""
SUBSET_DIRECT_ROWS = 1024
"""Up to this many rows (or k), a row subset is ranked by scoring its full vectors
directly: fewer bytes read than the first level of the subset plus the refinement."""


def search_subset(index: EncryptedIndex, token: QueryToken, k: int, rows: I64,
                  ahead: FirstLevelAhead | None = None) -> list[SearchResult]:
    """Exact top-k of every query among the given rows only (a keyword filter's rows):
    a combined "keyword + nearest neighbour" query.

    A small subset is scored in full directly (exact by construction, the same fixed
    summation order as every reported score). A larger one goes through filter and
    refine: first-level scores of the subset's rows only (the other rows at minus
    infinity, never a candidate), seeded from the subset's best, then blocks of the
    subset's rows best first through the finer levels, or, when the bounds prune too
    little, a scan of the subset's sixteen-bit codes (as an unfiltered search would scan
    every row's); should that ever leave the subset, the subset is scored in full
    instead: exactness never depends on the pruning. ``ahead`` (one query): its
    first-level scores, started while the caller looked the subset up (first_level_ahead);
    used by a wide subset, stopped otherwise."""
    _check(index, token, k)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size > 1 and not bool(np.all(rows[1:] > rows[:-1])):
        rows = np.unique(rows)  # the service's rows are increasing already (IdLookup)
    if rows.size and (rows[0] < 0 or rows[-1] >= len(index)):
        raise ValueError("a row of the subset is outside the index")
    if ahead is not None and len(token) != 1:
        raise ValueError("first-level scores started ahead serve one query")
    direct = not index.levels or rows.size <= max(k, SUBSET_DIRECT_ROWS)
    if ahead is not None and (direct or rows.size * SUBSET_WIDE_SHARE < len(index)):
        ahead.cancel()  # a narrow subset gathers its own rows' scores
        ahead = None
    results: list[SearchResult] = []
    for qi in range(len(token)):
        began = time.perf_counter()
        result = None if direct else _subset_refine(index, token, qi, k, rows, ahead)
        if result is None:
            result = _subset_scored(index, token.full[qi], k, rows)
        result.stats.milliseconds = (time.perf_counter() - began) * 1000.0
        result.stats.batch = len(token)
        results.append(result)
    return results


def _subset_scored(index: EncryptedIndex, t_full: F64, k: int, rows: I64) -> SearchResult:
    top = _TopK(k)
    if rows.size:
        top.merge(rows, _row_scores(index.full, rows, t_full))
    positions, scores = top.ranked()
    levels = [0] * len(index.levels)
    return SearchResult(positions, scores, SearchStats(int(rows.size), levels,
                                                       int(rows.size), 0.0))


def _subset_refine(index: EncryptedIndex, token: QueryToken, qi: int, k: int, rows: I64,
                   ahead: FirstLevelAhead | None = None) -> SearchResult | None:
    first, seeds = _subset_first_level(index, token.levels[0][qi], rows, k, ahead)
    refiner = _Refiner(index, token, qi, k)
    wide = rows.size * SUBSET_WIDE_SHARE >= len(index)

    def refine(block: I64) -> None:
        first[block] = np.nan  # never visited twice: NaN fails every comparison
        refiner.refine(block)

    # As _refine_query, without its retreat to a scan of every row's codes (those rows
    # are not all the subset's): the subset's best first-level rows set a threshold, then
    # blocks of growing size, best first, each cut by the threshold the blocks before
    # them raised, through the finer levels before any full score.
    refine(seeds)
    # A wide subset's other rows are at minus infinity: one threaded pass over every
    # score finds the survivors faster than gathering the subset's scores.
    remaining = (np.flatnonzero(first >= refiner.first_floor()) if wide
                 else rows[first[rows] >= refiner.first_floor()])
    if remaining.size > SCAN_FRACTION * rows.size:
        # The bounds prune too little (the subset's nearest are far from the query):
        # as an unfiltered search does, scan the sixteen-bit codes, of the rows the first
        # level left (a row below its floor cannot reach the top k) and the seeds (marked
        # visited, so never among the survivors: the two are disjoint).
        left = np.sort(np.concatenate([remaining, refiner.top.positions])).astype(np.int64)
        result = _subset_scan(index, refiner.t_full, k, left, refiner.full_floor())
        result.stats.vectors = int(rows.size)
        return result
    block_size = FIRST_BLOCK
    while remaining.size:
        block = (remaining if remaining.size <= block_size
                 else _top_positions(first, remaining, block_size))
        refine(block)
        block_size = min(MAX_BLOCK, block_size * BLOCK_GROWTH)
        remaining = remaining[first[remaining] >= refiner.first_floor()]
    result = refiner.result()
    if not _all_within(result.positions, rows):
        return None
    result.stats.vectors = int(rows.size)
    result.stats.level_scored[0] = int(rows.size)
    return result


def _subset_first_level(index: EncryptedIndex, t_first: F64, rows: I64, k: int,
                        ahead: FirstLevelAhead | None = None
                        ) -> tuple[NDArray[np.float32], I64]:
    """float32 first-level scores of the subset's rows, minus infinity elsewhere (never a
    candidate), within the float32 error bound of any summation order (_float32_error),
    as the full scan's scores are, and up to k of the subset's rows with high scores (the
    seeds of the threshold). A narrow subset gathers its rows; a wide one (a keyword on a
    quarter of the archive) scores every row with the engine's threads, contiguous reads
    as an unfiltered search makes, masks the others and picks its seeds while each share
    is in cache: gathering a quarter of a million rows cost more than scoring all of
    them. ``ahead``: a wide subset's scores of every row, started before the subset was
    known (then masked and seeded in a second pass over 4 bytes a row)."""
    assert index.first32 is not None
    n = len(index)
    if rows.size * SUBSET_WIDE_SHARE < n:
        first = np.full(n, -np.inf, dtype=np.float32)
        first[rows] = index.first32[rows] @ t_first.astype(np.float32)
        return first, rows[_top_positions(first[rows], np.arange(rows.size, dtype=np.int64),
                                          k)]
    penalty = np.full(n, -np.inf, dtype=np.float32)
    penalty[rows] = 0.0
    scores, seeds = _first_level_scores(index, t_first, seed_k=k, penalty=penalty,
                                        ready=None if ahead is None else ahead.finish())
    assert seeds is not None
    # A share with fewer than k of the subset's rows seeds masked rows too: never those.
    return scores[0], seeds[np.isfinite(scores[0][seeds])]


AHEAD_CHUNK = 32768  # rows a chunk of the first level computed ahead


class FirstLevelAhead:
    """One query's float32 first-level scores of every row, computed while the caller
    looks up the query's row subset (a keyword filter, cloud/keyword_views.py).

    A wide subset's first level scores every row anyway (_subset_first_level), so none of
    it needs the subset: started before the keyword lookup, it runs on another core while
    the lookup (mostly one thread's work) runs on this one. A chunk of rows at a time in
    one of the engine's threads; ``finish`` joins in from the caller's thread and returns
    the scores; ``cancel`` stops after the chunk in hand (a narrow subset gathers its own
    rows, a lookup that failed needs none). The same scores, within the same float32
    error bound of any summation order, as _first_level_scores computes."""

    def __init__(self, index: EncryptedIndex, t_first: F64) -> None:
        assert index.first32 is not None
        self._first32 = index.first32
        self._query = np.ascontiguousarray(t_first, dtype=np.float32).reshape(-1)
        n = len(index)
        self.scores: NDArray[np.float32] = np.empty(n, dtype=np.float32)
        self._chunks = [(b, min(n, b + AHEAD_CHUNK)) for b in range(0, n, AHEAD_CHUNK)]
        self._next = 0
        self._stopped = False
        self._lock = threading.Lock()
        self._background = _pool(max(1, engine_threads() - 1)).submit(self._work)

    def _take(self) -> tuple[int, int] | None:
        with self._lock:
            if self._stopped or self._next >= len(self._chunks):
                return None
            self._next += 1
            return self._chunks[self._next - 1]

    def _work(self) -> None:
        with _BLAS_THREADS.hold(own=True):  # one BLAS thread: the other core is the lookup's
            while (chunk := self._take()) is not None:
                begin, end = chunk
                np.matmul(self._first32[begin:end], self._query, out=self.scores[begin:end])

    def finish(self) -> NDArray[np.float32]:
        """Every row's score: the chunks left are shared with the background thread (if
        it never started, behind other searches' work in the pool, this one does all)."""
        self._work()
        if not self._background.cancel():
            self._background.result()  # the chunk in its hands
        return self.scores

    def cancel(self) -> None:
        with self._lock:
            self._stopped = True
        self._background.cancel()


AHEAD_ROWS = OWN_THREADS_ROWS  # smaller indexes: the lookup and the search are short


def first_level_ahead(index: EncryptedIndex, token: QueryToken) -> FirstLevelAhead | None:
    """A combined query's first level started before its keyword lookup: for one query on
    an index of AHEAD_ROWS rows or more with levels and engine threads to spare; else
    None. The caller passes it to search_subset, or cancels it when it will not search."""
    if (len(token) != 1 or len(index) < AHEAD_ROWS or not index.levels
            or index.first32 is None or engine_threads() < 2):
        return None
    return FirstLevelAhead(index, token.levels[0][0])


def _all_within(positions: I64, rows: I64) -> bool:
    """Whether every position is one of ``rows`` (increasing): a binary search each, not
    np.isin's hash of the whole subset (80 ms for 125,000 rows, for ten positions)."""
    if not positions.size:
        return True
    if not rows.size:
        return False
    at = np.minimum(np.searchsorted(rows, positions), rows.size - 1)
    return bool(np.all(rows[at] == positions))


def _subset_scan(index: EncryptedIndex, t_full: F64, k: int, rows: I64, floor: float
                 ) -> SearchResult:
    """Exact top-k among ``rows`` by a scan of their full vectors' codes, then float64 on
    the candidates the codes cannot tell apart (as _scan_codes, on the subset's codes)."""
    found = codes.scan(index.full_codes, t_full[None, :], k, np.array([floor]),
                       _chosen_spans(rows.size), _threaded, rows=rows)
    candidates = found.rows[0]
    top = _TopK(k)
    top.merge(candidates, _row_scores(index.full, candidates, t_full))
    positions, scores = top.ranked()
    levels = [int(rows.size)] + [0] * (len(index.levels) - 1)
    return SearchResult(positions, scores, SearchStats(int(rows.size), levels,
                                                       int(candidates.size), 0.0))


def linear_scan(index: EncryptedIndex, token: QueryToken, k: int = 1) -> SearchResult:
    """Exact top-k by scoring every full vector: the encrypted baseline without pruning."""
    _check(index, token, k)
    start = time.perf_counter()
    scores = _row_scores(index.full, np.arange(len(index), dtype=np.int64), token.full[0])
    top = _TopK(k)
    top.merge(np.arange(len(index), dtype=np.int64), scores)
    positions, best = top.ranked()
    stats = SearchStats(len(index), [0] * len(index.levels), len(index), 0.0)
    return _timed(SearchResult(positions, best, stats), start)


def _timed(result: SearchResult, start: float) -> SearchResult:
    result.stats.milliseconds = (time.perf_counter() - start) * 1000.0
    return result
