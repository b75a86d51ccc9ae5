"""Workstation search mode (issue 19): the search runs here, the server computes nothing.

Why: the secure-kNN ciphertexts the service ranks fall to a known-plaintext attacker
(SECURITY.md). A repository created with ``--search workstation`` stores none: its
segments carry image ids only (app/core/workstation_index.segment_vectors), and each
member's client keeps a local copy of the packs' AES-encrypted feature arrays
(docs/FORMAT-2.md 3.4), synced from the segment log and encrypted at rest under the user's
identity (app/core/workstation_index.py), and searches it exactly, in plaintext numpy, in
this process. The server sees the objects the client reads (pack tails and feature
entries while syncing, metadata entries and originals of the hits afterwards), never a
query.

Sync (``sync``), before every search: the signed manifest is read again (a user who is no
longer a member at its key version, i.e. revoked, stops syncing and this workstation's
cache of the repository is wiped); the segment log is verified from the head verified
before (app/core/logstate.py: rollback and fork refused); the live packs of the key
versions this ring holds are compared with the cache: only packs the log added since are
fetched (one range read of the TOC, one of the feature entry: both authenticated with the
pack's associated data), packs the log removed (compaction, erasure, revocation) are
dropped from the cache, so a key version whose packs are all gone leaves nothing behind.
Per key version the log's image counts of live segments and live packs must agree (the
same commit rule as sknn: an import's entry adds one pack and one segment). A cache file
that does not open (altered, or copied from another repository, user, key version or pack)
is discarded, logged, and its pack fetched again.

Search (``search_features``): exact squared Euclidean distances, the same order as a
plaintext brute force (ties by image id): the distances are computed as
|x|^2 - 2 x.q + |q|^2 over the whole matrix, every row within a rounding bound of the
k-th is rescored as sum((x - q)^2), and the k best of those are the answer. Hits are
then resolved by reference: each hit's metadata entry is read from its pack and opened
here, as in sknn mode. The answer has the shape of app/core/searcher.py (QueryResult,
grouping by series), with ``stats["mode"] = "workstation"``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.core import logstate
from app.core.errors import AccessDenied, IntegrityError, RadcryptError
from app.core.meta import ImageMeta
from app.core.packs import read_toc
from app.core.repository import (
    WORKSTATION,
    Repository,
    read_signed_manifest,
    search_not_built,
)
from app.core.searcher import Hit, QueryResult, drop_image, group_hits
from app.core.studies import instance_label, series_key
from app.core.workstation_index import CachedPack, CacheError, CacheState, LocalCache
from cloud import layout, seglog
from cloud.backend import ObjectNotFound, Store
from cloud.limits import MAX_K
from crypto import pack
from crypto.errors import DecryptionError, FormatError

log = logging.getLogger(__name__)

FETCH_THREADS = 8  # pack range reads in flight while syncing (they wait on the network)
QUERY_CHUNK = 16  # queries scored together (bounds the n x chunk score matrix)
GROW = 4  # grouping asks for k, 4k, 16k, ... hits up to MAX_K, as app/core/searcher.py


@dataclass
class SyncReport:
    """What one sync did: packs fetched and dropped, bytes read from the bucket."""

    repo_id: str
    head: int = -1
    packs: int = 0
    images: int = 0
    packs_fetched: int = 0
    packs_dropped: int = 0
    bytes_downloaded: int = 0
    cache_bytes: int = 0
    seconds: float = 0.0
    discarded: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "head": self.head, "packs": self.packs,
                "images": self.images, "packs_fetched": self.packs_fetched,
                "packs_dropped": self.packs_dropped, "bytes_downloaded": self.bytes_downloaded,
                "cache_bytes": self.cache_bytes, "seconds": self.seconds,
                "discarded": list(self.discarded)}


@dataclass
class _Block:
    """One live pack's rows, in memory."""

    live: seglog.LiveObject
    ids: list[str]
    features: np.ndarray


class LocalIndex:
    """The plaintext feature matrix of one repository's live packs, in this process only.

    Rows are the packs' rows one after the other (key version, then pack id). An image in
    two live packs (of two key versions during a revocation, or committed twice by two
    importers at once, docs/FORMAT-2.md 11) is kept once, from the newest key version, as
    app/core/packs.ImageReader does."""

    def __init__(self, repo_id: str, blocks: dict[str, _Block], state: seglog.LogState,
                 segments: int) -> None:
        self.repo_id = repo_id
        self.blocks = blocks
        self.state = state
        self.segments = segments
        self._order = sorted(blocks.values(), key=lambda b: (b.live.key_version, b.live.id))
        ids = [image_id for block in self._order for image_id in block.ids]
        self._starts = np.cumsum([0] + [len(block.ids) for block in self._order])
        dim = next((b.features.shape[1] for b in self._order), 0)
        features = (np.concatenate([b.features for b in self._order]) if ids
                    else np.zeros((0, dim)))
        for b, start in zip(self._order, self._starts, strict=False):  # one copy in memory:
            b.features = features[start : start + len(b.ids)]  # the blocks become views
        self._kept: np.ndarray | None = None  # rows of the concatenation kept, if not all
        if len(set(ids)) != len(ids):  # rare: the newest (last) copy of an image wins
            last = {image_id: row for row, image_id in enumerate(ids)}
            self._kept = np.array(sorted(last.values()), dtype=np.int64)
            features = features[self._kept]
            ids = [ids[row] for row in self._kept]
        self.ids = np.array(ids, dtype=object)
        self.features = features
        self.norms = np.einsum("ij,ij->i", features, features)
        self._rows: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def head(self) -> seglog.LogHead:
        return self.state.head

    def at(self, row: int) -> tuple[_Block, int]:
        """(block, row within the block) of a row of the matrix."""
        whole = int(self._kept[row]) if self._kept is not None else row
        b = int(np.searchsorted(self._starts, whole, side="right")) - 1
        return self._order[b], whole - int(self._starts[b])

    def where(self, image_id: str) -> tuple[_Block, int]:
        """(block, row within the block) of an indexed image; KeyError if it is not."""
        if self._rows is None:
            self._rows = {str(image_id): row for row, image_id in enumerate(self.ids)}
        return self.at(self._rows[image_id])

    def nearest(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Exact k nearest (image id, squared distance) per query, nearest first, ties by
        image id."""
        return [[(str(self.ids[row]), d) for row, d in hits]
                for hits in self.nearest_rows(queries, k)]

    def nearest_rows(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """As ``nearest``, with the rows of the matrix instead of the image ids."""
        x, norms, ids = self.features, self.norms, self.ids
        out: list[list[tuple[int, float]]] = []
        if not len(ids):
            return [[] for _ in queries]
        kk = min(k, len(ids))
        dim = x.shape[1]
        eps = np.finfo(np.float64).eps
        top = float(np.sqrt(norms.max()))
        for start in range(0, len(queries), QUERY_CHUNK):
            chunk = queries[start : start + QUERY_CHUNK]
            scores = x @ chunk.T  # n x chunk
            for j, q in enumerate(chunk):
                q2 = float(q @ q)
                approx = norms - 2.0 * scores[:, j] + q2
                kth = float(np.partition(approx, kk - 1)[kk - 1])
                # rounding of the expansion: a few (dim + 4) ulps of (|x| + |q|)^2
                bound = 2.0 * (dim + 4) * eps * (top + np.sqrt(q2)) ** 2
                candidates = np.nonzero(approx <= kth + 2.0 * bound)[0]
                diff = x[candidates] - q
                exact = np.einsum("ij,ij->i", diff, diff)
                order = np.lexsort((ids[candidates], exact))[:kk]
                out.append([(int(candidates[i]), float(exact[i])) for i in order])
        return out


_indexes: dict[str, LocalIndex] = {}
_indexes_lock = threading.Lock()
_sync_lock = threading.Lock()


def forget_all() -> None:
    """Drop every plaintext index held in this process (the workstation locks): the next
    search opens the cache again, which needs the unlocked identity."""
    with _indexes_lock:
        _indexes.clear()


def identity_of(session: Any) -> Any:
    """The unlocked identity a session signs as: the cache is encrypted under it."""
    found = getattr(session, "identity", None)
    if found is None:
        inner = getattr(getattr(session, "signer", None), "_inner", None)
        found = getattr(inner, "_identity", None)
    if found is None or not hasattr(found, "enc_private"):
        raise RadcryptError("workstation search needs this workstation's unlocked identity: "
                            "its local search index is encrypted under it (unlock first)")
    return found


def cache_for(session: Any, repo_id: str, identity: Any) -> LocalCache:
    return LocalCache(session.settings.data_path, identity, repo_id)


def wipe(session: Any, repo_id: str, identity: Any) -> None:
    """Delete this user's local index of a repository, on disk and in memory."""
    cache = cache_for(session, repo_id, identity)
    with _indexes_lock:
        _indexes.pop(str(cache.path), None)
    cache.wipe()


def _check_access(store: Store, repo: Repository, identity: Any, session: Any) -> None:
    """Refuse to sync for a user who is no longer a member (wiping the local index), a
    repository not in workstation mode, or a session opened under a superseded version."""
    if repo.owner_key is None:
        raise RadcryptError(f"repository {repo.repo_id!r} has no owner key: workstation "
                            "search needs a signed manifest and a segment log")
    manifest, _ = read_signed_manifest(store, repo.repo_id, repo.owner_key)
    if manifest.search != WORKSTATION:
        raise RadcryptError(f"repository {repo.repo_id!r} is in search mode "
                            f"{manifest.search!r}, not 'workstation'")
    if not manifest.is_member(identity.user_id):
        wipe(session, repo.repo_id, identity)
        raise AccessDenied(
            f"you are no longer a member of repository {repo.repo_id!r} at its key version "
            f"{manifest.key_version} (access revoked): its local search index on this "
            "workstation was wiped and is no longer synced")
    if manifest.key_version != repo.keys.version:
        raise RadcryptError(
            f"repository {repo.repo_id!r} is now at key version {manifest.key_version} and "
            f"this session holds key version {repo.keys.version}: open the repository "
            "again to sync its local search index")


def _fetch(store: Store, repo: Repository, live: seglog.LiveObject
           ) -> tuple[list[str], np.ndarray, int]:
    """(ids, features, bytes read) of one live pack: the TOC and the feature entry by
    range reads, both opened with the pack's associated data."""
    name = layout.pack_key(repo.repo_id, live.id)
    size = store.size(name)
    if size is None:
        raise IntegrityError(f"pack {live.id} of repository {repo.repo_id!r} is named by the "
                             "segment log but missing from the store")
    toc = read_toc(store, repo, live.id, size, live.sha256)
    if toc.key_version != live.key_version or len(toc.image_ids()) != live.count:
        raise IntegrityError(
            f"pack {live.id} of repository {repo.repo_id!r} does not match its log entry "
            f"(key version {toc.key_version}, {len(toc.image_ids())} images; the log says "
            f"{live.key_version} and {live.count})")
    entry = toc.features_entry()
    try:
        envelope = store.get_range(name, entry.offset, entry.length)
        plain = pack.open_entry(repo.ring.version(toc.key_version).data_key, repo.repo_id,
                                toc, entry, envelope)
        features = pack.decode_features(plain, toc.image_ids(), dim=repo.manifest.dim)
    except ObjectNotFound:
        raise IntegrityError(f"pack {live.id} of repository {repo.repo_id!r} is missing "
                             "from the store") from None
    except (DecryptionError, FormatError) as exc:
        raise IntegrityError(f"the feature array of pack {live.id} of repository "
                             f"{repo.repo_id!r} failed its integrity check ({exc}): it was "
                             "altered, truncated or moved, and was not synced") from None
    return toc.image_ids(), features, min(size, pack.TAIL_READ) + entry.length


def _check_counts(repo_id: str, state: seglog.LogState, versions: set[int]) -> int:
    """Per key version, the images of live segments equal those of live packs (each
    import entry adds one of each with the same count); returns the live segments."""
    segments = 0
    for version in sorted(versions):
        in_segments = sum(o.count for o in state.segments(version))
        in_packs = sum(o.count for o in state.packs(version))
        if in_segments != in_packs:
            raise IntegrityError(f"segment log of repository {repo_id!r}: key version "
                                 f"{version} has {in_segments} images in live segments but "
                                 f"{in_packs} in live packs")
        segments += len(state.segments(version))
    return segments


def sync(session: Any, repo: Repository, *, identity: Any = None
         ) -> tuple[LocalIndex, SyncReport]:
    """Bring this user's local index of ``repo`` to the verified log head (module
    docstring); returns the index and what was done."""
    start = time.perf_counter()
    identity = identity or identity_of(session)
    store = session.store
    report = SyncReport(repo.repo_id)
    _check_access(store, repo, identity, session)
    cache = cache_for(session, repo.repo_id, identity)
    key = str(cache.path)
    with _sync_lock:
        with _indexes_lock:
            known = _indexes.get(key)
        state = logstate.verified_log(store, session.settings, repo,
                                      since=known.state if known is not None else None)
        held = {keys.version for keys in repo.ring.versions}
        wanted = {o.id: o for o in state.packs() if o.key_version in held}
        segments = _check_counts(repo.repo_id, state, {o.key_version for o in wanted.values()})
        if known is not None and known.head == state.head:
            index = known
        else:
            index = _update(store, repo, cache, known, state, wanted, segments, report)
            with _indexes_lock:
                _indexes[key] = index
    report.head = index.head.sequence
    report.packs = len(index.blocks)
    report.images = len(index)
    report.cache_bytes = cache.size()
    report.seconds = time.perf_counter() - start
    return index, report


def _update(store: Store, repo: Repository, cache: LocalCache, known: LocalIndex | None,
            state: seglog.LogState, wanted: dict[str, seglog.LiveObject], segments: int,
            report: SyncReport) -> LocalIndex:
    try:
        saved = cache.load_state() or CacheState()
    except CacheError as exc:
        log.warning("%s; the local search index of %s is rebuilt from the bucket", exc,
                    repo.repo_id)
        report.discarded.append("state")
        cache.wipe()
        saved = CacheState()
    blocks = {p: b for p, b in (known.blocks if known else {}).items() if p in wanted}
    for pack_id, live in wanted.items():
        entry = saved.packs.get(pack_id)
        if pack_id in blocks or entry is None:
            continue
        if entry.sha256 != live.sha256.hex() or entry.key_version != live.key_version:
            cache.drop_pack(pack_id)
            continue
        try:
            ids, features = cache.get_pack(live.key_version,
                                           repo.ring.version(live.key_version).data_key,
                                           pack_id, live.sha256)
            if len(ids) != live.count:
                raise CacheError(f"local search cache file {cache.pack_file(pack_id)} holds "
                                 f"{len(ids)} images, the log says {live.count}")
        except CacheError as exc:
            log.warning("%s; pack %s is fetched again", exc, pack_id)
            report.discarded.append(pack_id)
            cache.drop_pack(pack_id)
            continue
        blocks[pack_id] = _Block(live, ids, features)
    missing = [live for pack_id, live in sorted(wanted.items()) if pack_id not in blocks]
    if missing:
        with ThreadPoolExecutor(min(FETCH_THREADS, len(missing)),
                                thread_name_prefix="radcrypt-ws-sync") as pool:
            fetched = list(pool.map(lambda live: _fetch(store, repo, live), missing))
        for live, (ids, features, nbytes) in zip(missing, fetched, strict=True):
            cache.put_pack(live.key_version, repo.ring.version(live.key_version).data_key,
                           live.id, live.sha256, ids, features)
            blocks[live.id] = _Block(live, ids, features)
            report.bytes_downloaded += nbytes
        report.packs_fetched = len(missing)
    for stale in set(saved.packs) - set(wanted):  # removed by the log: gone from disk too
        cache.drop_pack(stale)
        report.packs_dropped += 1
    for path in cache.files():  # leftovers of an interrupted sync
        if path.stem != "state" and path.stem not in blocks:
            path.unlink(missing_ok=True)
    cache.save_state(CacheState(state.head.sequence, state.head.hash.hex(),
                                {p: CachedPack(b.live.sha256.hex(), b.live.key_version,
                                               len(b.ids)) for p, b in blocks.items()}))
    return LocalIndex(repo.repo_id, blocks, state, segments)


# --- search ------------------------------------------------------------------------------


def search_features(session: Any, repo: Repository, features: np.ndarray,
                    labels: list[str], k: int = 1, *, allow_incomplete: bool = False,
                    group: bool = False, where: Any = None, identity: Any = None
                    ) -> list[QueryResult]:
    """Nearest archived images of each feature vector, searched on this workstation.

    Same answer shape as app.core.searcher.search_features (``allow_incomplete`` has no
    effect: the local index covers every live pack or the sync fails). ``where``: a
    keyword filter (app.core.keywords.Query or its terms), applied here to the decrypted
    metadata of the nearest images, widening the search until k images match or none is
    left, so the answer stays the exact top-k of the matching images."""
    del allow_incomplete
    if repo.manifest.search != WORKSTATION:
        raise RadcryptError(search_not_built(repo.manifest.search))
    if not 1 <= k <= MAX_K:
        raise RadcryptError(f"k must be between 1 and {MAX_K}")
    query = _as_query(where)
    queries = np.atleast_2d(np.asarray(features, dtype=np.float64))
    t0 = time.perf_counter()
    index, report = sync(session, repo, identity=identity)
    t1 = time.perf_counter()
    if len(index) and queries.shape[1] != index.features.shape[1]:
        raise RadcryptError(f"query features have dimension {queries.shape[1]}, repository "
                            f"{repo.repo_id!r} has {index.features.shape[1]}")
    answers = index.nearest_rows(queries, k) if query is None else [[] for _ in queries]
    t2 = time.perf_counter()
    n = max(1, len(queries))
    results = []
    for qi, (label, raw) in enumerate(zip(labels, answers, strict=True)):
        f0 = time.perf_counter()
        if query is None:
            hits = _resolve(session.store, repo, index, raw)
        else:
            hits = _answer(session.store, repo, index, queries[qi], k, query)
        f1 = time.perf_counter()
        timings = {"sync": (t1 - t0) * 1000 / n, "local_search": (t2 - t1) * 1000 / n,
                   "fetch_decrypt": (f1 - f0) * 1000}
        stats = {"vectors": len(index), "milliseconds": (t2 - t1) * 1000 / n,
                 "mode": WORKSTATION, "sync": report.as_dict()}
        result = QueryResult(label, hits, stats, timings, True, complete=True,
                             segments_expected=index.segments,
                             segments_searched=index.segments, asked=k)
        if group:
            _group(session.store, repo, index, queries[qi], k, query, result)
        results.append(result)
    return results


def search_image(session: Any, repo: Repository, image_id: str, k: int = 1, *,
                 allow_incomplete: bool = False, group: bool = True,
                 exclude_self: bool = True, where: Any = None, identity: Any = None
                 ) -> QueryResult:
    """"Find similar" (app.core.searcher.search_image) on this workstation: the image's
    features come from the local index, the image itself is left out unless
    ``exclude_self`` is False."""
    if not 1 <= k <= MAX_K:
        raise RadcryptError(f"k must be between 1 and {MAX_K}")
    index, _ = sync(session, repo, identity=identity)
    try:
        block, row = index.where(image_id)
    except KeyError:
        raise IntegrityError(f"image {image_id} is not in any live pack of repository "
                             f"{repo.repo_id!r}: it is unknown, or its pack is gone") from None
    record = _meta(session.store, repo, block.live, image_id)
    meta = ImageMeta.from_record(image_id, record, block.live.key_version)
    label = f"{meta.name} ({place})" if (place := instance_label(meta)) else meta.name
    ask = min(MAX_K, k + 1) if exclude_self else k
    result = search_features(session, repo, block.features[row], [label], ask,
                             allow_incomplete=allow_incomplete, group=group, where=where,
                             identity=identity)[0]
    if exclude_self:
        drop_image(result, image_id, k)
    return result


def _as_query(where: Any) -> Any:
    """A keyword filter parsed as app/core/searcher.py does (issue 17), None for none."""
    if where is None:
        return None
    from app.core import searcher

    parse = getattr(searcher, "as_query", None)
    if parse is None:
        raise RadcryptError("keyword filters are not available in this version")
    return parse(where)


def _answer(store: Store, repo: Repository, index: LocalIndex, query: np.ndarray, k: int,
            where: Any) -> list[Hit]:
    """The k nearest images, resolved; with a keyword filter ``where``, the k nearest of
    those whose decrypted metadata matches it (more are looked at until k match)."""
    if where is None:
        return _resolve(store, repo, index, index.nearest_rows(query[None, :], k)[0])
    from app.core.keywords import keywords_of

    asked = k
    while True:
        raw = index.nearest_rows(query[None, :], asked)[0]
        hits = [h for h in _resolve(store, repo, index, raw)
                if where.matches(keywords_of(h.image))]
        if len(hits) >= k or len(raw) < asked:
            break
        asked = min(len(index), asked * GROW)
    for rank, hit in enumerate(hits[:k], 1):
        hit.rank = rank
    return hits[:k]


def _group(store: Store, repo: Repository, index: LocalIndex, query: np.ndarray, k: int,
           where: Any, result: QueryResult) -> None:
    """At most k series per answer (app/core/searcher.py ``_group``): more hits are looked
    at while the answer names fewer than k series and may hold more."""
    asked = k
    while (len({h.series_key for h in result.hits}) < k and len(result.hits) >= asked
           and asked < MAX_K):
        asked = min(MAX_K, asked * GROW)
        result.hits = _answer(store, repo, index, query, asked, where)
    result.asked = asked
    result.groups = group_hits(result.hits, k)
    result.hits = result.hits[:k]
    result.grouped = True


def _resolve(store: Store, repo: Repository, index: LocalIndex,
             raw: list[tuple[int, float]]) -> list[Hit]:
    """Each hit's metadata (``raw``: rows of the matrix and distances), read by reference
    from its pack and opened here."""

    def one(rank: int, item: tuple[int, float]) -> Hit:
        row, distance = item
        image_id = str(index.ids[row])
        block, local = index.at(row)
        record = _meta(store, repo, block.live, image_id)
        record["features"] = [float(x) for x in block.features[local]]
        version = block.live.key_version
        return Hit(rank=rank, image_id=image_id, name=str(record.get("name", "")),
                   distance=distance, score=distance, key_version=version, meta=record,
                   series_key=series_key(ImageMeta.from_record(image_id, record, version)))

    if not raw:
        return []
    with ThreadPoolExecutor(min(8, len(raw)), thread_name_prefix="radcrypt-ws-meta") as pool:
        return list(pool.map(one, range(1, len(raw) + 1), raw))


def _meta(store: Store, repo: Repository, live: seglog.LiveObject, image_id: str
          ) -> dict[str, Any]:
    name = layout.pack_key(repo.repo_id, live.id)
    toc = read_toc(store, repo, live.id, None, live.sha256)
    try:
        entry = toc.entry(pack.KIND_META, image_id)
        envelope = store.get_range(name, entry.offset, entry.length)
        plain = pack.open_entry(repo.ring.version(toc.key_version).data_key, repo.repo_id,
                                toc, entry, envelope)
        record = json.loads(plain)
    except (KeyError, ObjectNotFound):
        raise IntegrityError(f"pack {live.id} of repository {repo.repo_id!r} has no "
                             f"metadata of {image_id}") from None
    except (DecryptionError, FormatError, ValueError):
        raise IntegrityError(f"the stored metadata of {image_id} in pack {live.id} failed its "
                             "integrity check: it was altered, truncated, swapped or moved, "
                             "and will not be shown") from None
    if not isinstance(record, dict):
        raise IntegrityError(f"metadata of image {image_id} is not a JSON object")
    return record
