"""The service's homomorphic scorer (issue 19, ``--search ckks``): every core, no key.

SEAL (through TenSEAL) holds Python's GIL during its operations (measured: two threads
scoring two blocks took longer than one thread), so the scorer spreads a repository's CKKS
blocks over worker *processes*, each holding its share of the blocks loaded once. A query's
ciphertext goes to every worker; each computes the query's rotations (once per query and
worker, 127 rotations at d = 128, about 0.2 s on one core) and the scores of its blocks; the
parent concatenates the score ciphertexts in block order. Nothing here can decrypt: the
workers hold the public evaluation keys only (crypto/ckks.py).

One worker (``workers=1``) scores in this process, without pickling: the tests' and the
2-core machine's default when there are fewer blocks than cores.

Blocks are named by a tag (the service uses segment id and SHA-256) so that a live set that
changes by one segment costs one block's load, not all of them (``add``/``remove``: each
worker process keeps its blocks in a dict and is told which tags to score, so neither
needs a restart). ``grow`` starts more worker processes, empty, for the blocks added
next (placed on the worker holding the fewest vectors, so a grown scorer fills its new
workers first); only a scorer of one worker (in this process) must be rebuilt to get more.
``workers_for`` says how many workers a number of blocks is worth.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Hashable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from cloud import cpus
from crypto import ckks

# A worker computes the query's rotations itself (about as long as scoring five blocks of
# 4,096 vectors at d = 128), so a worker is worth starting only for that many blocks.
BLOCKS_PER_WORKER = 5

_worker: dict[str, Any] = {}


def _init_worker(evaluation_keys: bytes) -> None:
    _worker["evaluator"] = ckks.CkksEvaluator(evaluation_keys)
    _worker["blocks"] = {}  # filled by _add_blocks


def _add_blocks(items: list[tuple[Hashable, bytes]]) -> int:
    evaluator: ckks.CkksEvaluator = _worker["evaluator"]
    blocks: dict[Hashable, Any] = _worker["blocks"]
    for tag, block in items:
        blocks[tag] = evaluator.load_block(block)
    return len(blocks)


def _drop_blocks(tags: list[Hashable]) -> int:
    blocks: dict[Hashable, Any] = _worker["blocks"]
    for tag in tags:
        blocks.pop(tag, None)
    return len(blocks)


def _score_share(query: bytes, tags: list[Hashable]) -> list[bytes]:
    evaluator: ckks.CkksEvaluator = _worker["evaluator"]
    blocks: dict[Hashable, Any] = _worker["blocks"]
    return _parts(evaluator.scores(query, [blocks[t] for t in tags]))


def _parts(scores: bytes) -> list[bytes]:
    _, _, parts = ckks.unpack_parts(scores, ckks.KIND_SCORES, "CKKS scores")
    return parts


def workers_for(blocks: int, workers: int | None = None) -> int:
    """How many workers ``blocks`` blocks are worth (``workers``: the most; None: the
    machine's engine threads)."""
    wanted = cpus.engine_threads() if workers is None else workers
    return max(1, min(wanted, blocks // BLOCKS_PER_WORKER))


class CkksScorer:
    """Scores the blocks of one repository key version for encrypted queries.

    ``tags`` name the blocks (default: their positions); ``scores`` scores every block in
    the order held, or the blocks of the tags it is given, in that order."""

    def __init__(self, evaluation_keys: bytes, blocks: Sequence[bytes],
                 workers: int | None = None, tags: Sequence[Hashable] | None = None) -> None:
        names = list(range(len(blocks)) if tags is None else tags)
        if len(names) != len(blocks) or len(set(names)) != len(names):
            raise ValueError("CkksScorer: one distinct tag per block")
        self.workers = workers_for(len(blocks), workers)
        self.period = 0  # set by the first block added
        self._order: list[Hashable] = []         # scores' default order
        self._where: dict[Hashable, int] = {}      # tag -> worker index
        self._vectors = [0] * self.workers          # per worker, to place new blocks
        self._counts: dict[Hashable, int] = {}      # tag -> vectors of its block
        if self.workers == 1:
            self._evaluator = ckks.CkksEvaluator(evaluation_keys)
            self._blocks: dict[Hashable, Any] = {}
        else:
            self._evaluation_keys = evaluation_keys
            self._pools = [self._pool() for _ in range(self.workers)]
        # Sent as tasks, not as the pools' initializer arguments, which the executor would
        # keep (the blocks' bytes in this process for the scorer's life, besides the
        # workers'). Equally full blocks land round-robin: workers finish together.
        self.add(list(zip(names, blocks, strict=True)))

    def _pool(self) -> ProcessPoolExecutor:
        context = mp.get_context("spawn")  # SEAL objects are not fork-safe across threads
        return ProcessPoolExecutor(1, mp_context=context, initializer=_init_worker,
                                   initargs=(self._evaluation_keys,))

    def grow(self, workers: int) -> None:
        """Start worker processes, empty, up to ``workers`` in all (a scorer of one worker,
        in this process, cannot grow: build a new one)."""
        if self.workers == 1:
            raise ValueError("a CkksScorer of one worker scores in this process: build a "
                             "new one to spread its blocks over processes")
        for _ in range(self.workers, workers):
            self._pools.append(self._pool())
            self._vectors.append(0)
        self.workers = max(self.workers, workers)

    def _placed(self, tag: Hashable, worker: int, block: bytes) -> None:
        self._where[tag] = worker
        self._counts[tag] = ckks.header(block, "a CKKS block")[2]
        self._vectors[worker] += self._counts[tag]

    @property
    def block_count(self) -> int:
        return len(self._order)

    @property
    def tags(self) -> list[Hashable]:
        return list(self._order)

    def add(self, items: Sequence[tuple[Hashable, bytes]]) -> None:
        """Load more blocks, each on the worker holding the fewest vectors; no restart."""
        fresh = [(t, b) for t, b in items if t not in self._where]
        if not fresh:
            return
        if not self._order:
            self.period = ckks.header(fresh[0][1], "a CKKS block")[1]
        batches: list[list[tuple[Hashable, bytes]]] = [[] for _ in range(self.workers)]
        for tag, block in fresh:
            worker = min(range(self.workers), key=self._vectors.__getitem__)
            batches[worker].append((tag, block))
            self._placed(tag, worker, block)
            self._order.append(tag)
        if self.workers == 1:
            for tag, block in batches[0]:
                self._blocks[tag] = self._evaluator.load_block(block)
            return
        futures = [self._pools[w].submit(_add_blocks, batch)
                   for w, batch in enumerate(batches) if batch]
        for future in futures:
            future.result()

    def remove(self, tags: Sequence[Hashable]) -> None:
        """Forget blocks (tags not held are ignored); no restart."""
        gone: list[list[Hashable]] = [[] for _ in range(self.workers)]
        for tag in tags:
            worker = self._where.pop(tag, None)
            if worker is None:
                continue
            gone[worker].append(tag)
            self._vectors[worker] -= self._counts.pop(tag)
        dropped = {t for share in gone for t in share}
        self._order = [t for t in self._order if t not in dropped]
        if self.workers == 1:
            for tag in gone[0]:
                self._blocks.pop(tag, None)
            return
        futures = [self._pools[w].submit(_drop_blocks, share)
                   for w, share in enumerate(gone) if share]
        for future in futures:
            future.result()

    def scores(self, query: bytes, tags: Sequence[Hashable] | None = None) -> bytes:
        """The serialised score ciphertexts of the blocks of ``tags`` (every block held,
        when None), in that order."""
        order = self._order if tags is None else list(tags)
        unknown = [t for t in order if t not in self._where]
        if unknown:
            raise KeyError(f"CkksScorer holds no block {unknown[0]!r}")
        if self.workers == 1:
            return self._evaluator.scores(query, [self._blocks[t] for t in order])
        shares: list[list[int]] = [[] for _ in range(self.workers)]
        for index, tag in enumerate(order):
            shares[self._where[tag]].append(index)
        futures = [(share, self._pools[w].submit(_score_share, query,
                                                 [order[i] for i in share]))
                   for w, share in enumerate(shares) if share]
        ordered: list[bytes] = [b""] * len(order)
        for share, future in futures:
            for index, part in zip(share, future.result(), strict=True):
                ordered[index] = part
        return ckks.pack_parts(ckks.KIND_SCORES, self.period, len(ordered), ordered)

    def close(self) -> None:
        for pool in getattr(self, "_pools", []):
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> CkksScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
