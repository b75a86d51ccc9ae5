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
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from cloud import cpus
from crypto import ckks

# A worker computes the query's rotations itself (about as long as scoring five blocks of
# 4,096 vectors at d = 128), so a worker is worth starting only for that many blocks.
BLOCKS_PER_WORKER = 5

_worker: dict[str, Any] = {}


def _init_worker(evaluation_keys: bytes, blocks: list[bytes]) -> None:
    evaluator = ckks.CkksEvaluator(evaluation_keys)
    _worker["evaluator"] = evaluator
    _worker["blocks"] = [evaluator.load_block(b) for b in blocks]


def _score_share(query: bytes) -> list[bytes]:
    evaluator: ckks.CkksEvaluator = _worker["evaluator"]
    return _parts(evaluator.scores(query, _worker["blocks"]))


def _parts(scores: bytes) -> list[bytes]:
    _, _, parts = ckks.unpack_parts(scores, ckks.KIND_SCORES, "CKKS scores")
    return parts


class CkksScorer:
    """Scores every block of one repository key version for encrypted queries."""

    def __init__(self, evaluation_keys: bytes, blocks: Sequence[bytes],
                 workers: int | None = None) -> None:
        self.block_count = len(blocks)
        wanted = cpus.engine_threads() if workers is None else workers
        self.workers = max(1, min(wanted, len(blocks) // BLOCKS_PER_WORKER))
        self.period = ckks.header(blocks[0], "a CKKS block")[1] if blocks else 0
        self._shares: list[list[int]] = []
        if self.workers == 1:
            self._evaluator = ckks.CkksEvaluator(evaluation_keys)
            self._blocks = [self._evaluator.load_block(b) for b in blocks]
            return
        # Round-robin shares: workers finish together when blocks are equally full.
        self._shares = [list(range(w, len(blocks), self.workers)) for w in range(self.workers)]
        context = mp.get_context("spawn")  # SEAL objects are not fork-safe across threads
        self._pools = [ProcessPoolExecutor(1, mp_context=context, initializer=_init_worker,
                                           initargs=(evaluation_keys,
                                                     [blocks[i] for i in share]))
                       for share in self._shares]

    def scores(self, query: bytes) -> bytes:
        """The serialised score ciphertexts of every block, in block order."""
        if self.workers == 1:
            return self._evaluator.scores(query, self._blocks)
        futures = [pool.submit(_score_share, query) for pool in self._pools]
        ordered: list[bytes] = [b""] * self.block_count
        for share, future in zip(self._shares, futures, strict=True):
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
