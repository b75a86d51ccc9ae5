"""The write side of the CKKS search mode (issue 19): a segment's CKKS block and a key
version's evaluation keys, built wherever a segment of a CKKS repository is written.

Why one module: the importer, compaction, erasure and the revocation's re-encryption each
write segments; each must give a new segment the block of exactly its rows under its key
version's CKKS key (crypto/ckks.py, seeded from that version's data key), or a search
silently misses images. The block travels inside the segment's MAC'd body
(cloud/segments.py FLAG_CKKS); the evaluation keys are one object per key version
(cloud/ckks_store.py), written create-if-absent by the first writer of the version, like
the bound basis (app/core/basis.py): the owner at creation and at every rotation, or the
first importer when an older repository has none yet.

CkksKey generation costs about a second (SEAL key generation at N = 8192): one key per
(repository, key version, data key) is kept in this process, and forgotten with
``forget`` (the client's lock).

The evaluation keys are anchored only by the version's MAC key, which every holder of the
version's data key has: a member can write keys that make an honest service return wrong
scores. ``trusted_eval_digest`` is what a search sends: the digest of keys this process has
tested with its own secret key (crypto.ckks.CkksKey.evaluation_keys_work), once per
(repository, key version, data key, digest).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from typing import Any

import numpy as np

from app.core.errors import IntegrityError, RadcryptError
from app.core.repository import CKKS, Manifest, Repository
from cloud import ckks_store
from cloud.backend import ObjectExists, ObjectNotFound, Store
from crypto import ckks
from crypto.errors import FormatError
from crypto.segment_mac import index_mac_key

BLOCK_IMAGES = ckks.SLOTS  # rows per segment: one CKKS block (compaction's target here)
_keys: dict[tuple[str, int, bytes], ckks.CkksKey] = {}
_keys_lock = threading.Lock()
# (repo_id, version, data-key tag, body digest) -> the keys passed the functional test
_verdicts: dict[tuple[str, int, bytes, bytes], bool] = {}


def is_ckks(manifest: Manifest) -> bool:
    return manifest.search == CKKS


def forget() -> None:
    """Drop every CKKS key held in this process (the workstation lock, a closed client)."""
    with _keys_lock:
        _keys.clear()
        _verdicts.clear()


def key_of(repo: Repository, version: int) -> ckks.CkksKey:
    """The CKKS key of one key version (seeded from its data key: rotates with it)."""
    data_key = repo.ring.version(version).data_key
    tag = hashlib.sha256(data_key).digest()
    with _keys_lock:
        known = _keys.get((repo.repo_id, version, tag))
    if known is not None:
        return known
    made = ckks.CkksKey(ckks.seed_from_data_key(data_key, repo.repo_id, version))
    with _keys_lock:
        return _keys.setdefault((repo.repo_id, version, tag), made)


def block_for(repo: Repository, version: int, features: Any) -> bytes | None:
    """The CKKS block of a new segment whose rows are ``features`` (row order), None in a
    repository of another search mode. The layout is crypto.ckks.layout_for's (rows for an
    import batch, diagonal for compaction's full blocks)."""
    if not is_ckks(repo.manifest):
        return None
    batch = np.atleast_2d(np.asarray(features, dtype=np.float64))
    if len(batch) > ckks.SLOTS:
        raise RadcryptError(f"a segment of a CKKS repository holds at most {ckks.SLOTS} "
                            f"images, this one {len(batch)}")
    try:
        return key_of(repo, version).encrypt_block(batch).data
    except FormatError as exc:
        raise RadcryptError(f"the CKKS block of a new segment of {repo.repo_id!r} cannot be "
                            f"built: {exc}") from None


def ensure_eval_keys(store: Store, repo: Repository, version: int) -> bytes:
    """The SHA-256 of key version ``version``'s evaluation keys, written first if absent
    (create-if-absent: a concurrent writer's object wins, and is authenticated)."""
    name = ckks_store.eval_keys_key(repo.repo_id, version)
    try:
        return eval_digest(store, repo, version)
    except ObjectNotFound:
        pass
    body = key_of(repo, version).evaluation_keys(ckks.period_of(repo.manifest.dim))
    blob = ckks_store.build_eval_object(index_mac_key(repo.ring.version(version).data_key),
                                        repo.repo_id, version, body)
    try:
        store.put(name, blob, if_absent=True)
    except ObjectExists:
        return eval_digest(store, repo, version)
    return hashlib.sha256(body).digest()


def eval_digest(store: Store, repo: Repository, version: int) -> bytes:
    """The evaluation keys' body digest from the object's authenticated 76-byte head (one
    range read): ObjectNotFound when absent, IntegrityError when the head does not verify
    under this repository's key version (altered, or moved from another repository or
    version)."""
    name = ckks_store.eval_keys_key(repo.repo_id, version)
    head = store.get_range(name, 0, ckks_store.EVAL_HEAD_SIZE)
    return _authentic_head(repo, version, name, head).digest


def trusted_eval_digest(store: Store, repo: Repository, version: int) -> bytes:
    """The evaluation keys' digest a search may send: ``eval_digest``'s (one range read)
    once the keys it names passed the functional test under this repository's CKKS key
    (``eval_keys_work``, paid once per process and digest: the whole object, about 1.6 MB,
    read and tested once). IntegrityError, naming the object, when they do not work:
    they were written by someone holding the version's key, not by the service, and no
    search uses them. ObjectNotFound when absent."""
    digest = eval_digest(store, repo, version)
    verdict = _verdicts.get(_verdict_key(repo, version, digest))
    if verdict is None:
        digest, verdict = _test_eval_keys(store, repo, version)
    if not verdict:
        raise IntegrityError(forged_eval_keys_message(repo, version))
    return digest


def forged_eval_keys_message(repo: Repository, version: int) -> str:
    name = ckks_store.eval_keys_key(repo.repo_id, version)
    return (f"{name}: evaluation keys do not work with this repository's CKKS key (key "
            f"version {version}) — written by someone holding the version's key, not by "
            "the service; not used, nothing was searched (`radcrypt check` names it; the "
            "owner can delete the object and write it again)")


def _verdict_key(repo: Repository, version: int, digest: bytes
                 ) -> tuple[str, int, bytes, bytes]:
    tag = hashlib.sha256(repo.ring.version(version).data_key).digest()
    return repo.repo_id, version, tag, digest


def _test_eval_keys(store: Store, repo: Repository, version: int) -> tuple[bytes, bool]:
    """(digest, verdict) of the object as read now, whole: its head authenticated, its body
    the head's digest, then tested with this client's secret key. The verdict is kept for
    this process; a read or integrity failure is raised and not kept."""
    name = ckks_store.eval_keys_key(repo.repo_id, version)
    blob = store.get(name)
    body = blob[ckks_store.EVAL_HEAD_SIZE:]
    head = _authentic_head(repo, version, name, blob, body)
    verdict = eval_keys_work(repo, version, body)
    _verdicts[_verdict_key(repo, version, head.digest)] = verdict
    return head.digest, verdict


def _authentic_head(repo: Repository, version: int, name: str, data: bytes,
                    body: bytes | None = None) -> ckks_store.EvalHead:
    """The object's head (``data`` starts with it), parsed and authenticated under this
    repository's key version; with ``body``, the body checked against the head's digest
    too. IntegrityError naming the object otherwise."""
    try:
        head = ckks_store.parse_eval_head(data, name)
    except FormatError as exc:
        raise IntegrityError(f"the CKKS evaluation keys of {repo.repo_id!r} key version "
                             f"{version} ({name}) are damaged: {exc}; not used") from None
    mac_key = index_mac_key(repo.ring.version(version).data_key)
    if head.key_version != version or not hmac.compare_digest(
            head.mac, ckks_store.eval_mac(mac_key, repo.repo_id, data)) or (
            body is not None
            and not hmac.compare_digest(hashlib.sha256(body).digest(), head.digest)):
        raise IntegrityError(f"the CKKS evaluation keys of {repo.repo_id!r} key version "
                             f"{version} ({name}) failed their integrity check (altered, "
                             "or moved from another repository or key version): not used")
    return head


def eval_keys_work(repo: Repository, version: int, body: bytes) -> bool:
    """Whether an evaluation-keys body computes correctly under key version ``version``'s
    CKKS key (crypto.ckks.CkksKey.evaluation_keys_work: what the service computes, on fresh
    random encryptions, compared in every slot; why that is sound is said there). About
    40 ms at d = 128."""
    return key_of(repo, version).evaluation_keys_work(body,
                                                      ckks.period_of(repo.manifest.dim))


def features_from_packs(store: Store, repo: Repository, state: Any, version: int,
                        ids: list[str]) -> np.ndarray:
    """The plaintext features of ``ids`` (row order), from the live packs of ``version``
    (AES-GCM, checked against the verified log ``state``): what a rewrite of a CKKS
    segment (compaction, erasure) re-encrypts, since its block cannot be split or merged."""
    from app.core.packs import ImageReader

    reader = ImageReader(store, repo, state)
    wanted, found = set(ids), {}
    for live in state.packs(version):
        pack_ids, rows = reader.features_of_pack(live.id)
        for image_id, row in zip(pack_ids, rows, strict=True):
            if image_id in wanted:
                found[image_id] = row
        if len(found) == len(wanted):
            break
    missing = wanted - found.keys()
    if missing:
        raise IntegrityError(f"no live pack of key version {version} of {repo.repo_id!r} "
                             f"holds the features of image {sorted(missing)[0]}: the CKKS "
                             "block of the new segment cannot be built; nothing was written")
    return np.stack([np.asarray(found[i], dtype=np.float64) for i in ids])


def rewrite_block(store: Store | None, repo: Repository, version: int, ids: list[str],
                  features: Any) -> bytes | None:
    """The block of a rewritten segment (compaction, erasure, revocation), the version's
    evaluation keys written first when absent; None outside the CKKS mode."""
    if not is_ckks(repo.manifest):
        return None
    if features is None or len(features) != len(ids):
        raise IntegrityError(f"a new segment of CKKS repository {repo.repo_id!r} needs the "
                             "features of its rows to build its CKKS block; nothing was "
                             "written")
    if store is not None:
        ensure_eval_keys(store, repo, version)
    return block_for(repo, version, features)


def block_shape(block: bytes, what: str) -> tuple[int, int, int, int]:
    """(kind, period, count, ciphertexts) of a segment's CKKS block, FormatError when it does
    not parse (magic, kind, truncated parts) or holds another number of ciphertexts than
    its kind, period and count need (crypto.ckks.CkksEvaluator.load_block's rule)."""
    kind, _, _ = ckks.header(block[: ckks.HEADER_SIZE], what)
    if kind not in (ckks.KIND_BLOCK, ckks.KIND_ROWS):
        raise FormatError(f"{what} is a CKKS object of kind {kind}, not a block")
    period, count, parts = ckks.unpack_parts(block, kind, what)
    if not 1 <= period <= ckks.SLOTS or period & (period - 1):
        raise FormatError(f"{what} has period {period}, not a power of two up to "
                          f"{ckks.SLOTS}")
    want = period + 1 if kind == ckks.KIND_BLOCK else 2 * -(-count // (ckks.SLOTS // period))
    if len(parts) != want:
        raise FormatError(f"{what} of period {period} and {count} vectors needs {want} "
                          f"ciphertexts, it holds {len(parts)}")
    return kind, period, count, len(parts)


def block_decrypts(repo: Repository, version: int, block: bytes, what: str) -> bool:
    """Whether the block's first ciphertext decrypts under key version ``version``'s CKKS
    key to feature values (each within crypto.ckks.MAX_NORM): a block encrypted under
    another version's or repository's key decrypts to values near the modulus, which the
    service would score and the client refuse at every search (`radcrypt check` names it
    first). One decryption: about 10 ms."""
    kind, _, _ = ckks.header(block[: ckks.HEADER_SIZE], what)
    _, _, parts = ckks.unpack_parts(block, kind, what)
    # CkksKey keeps decryption to itself for scores; the same SEAL call reads a block part
    values = key_of(repo, version)._decrypt(parts[0])
    return bool(np.isfinite(values).all() and np.abs(values).max() <= ckks.MAX_NORM + 1.0)


def eval_keys_problem(store: Store, repo: Repository, version: int
                      ) -> tuple[str, str] | None:
    """What is wrong with key version ``version``'s evaluation-keys object, as (kind word
    of app/core/repo_check.py, detail), None when it is whole: present, its head parses and
    names the version, its MAC verifies under the version's index MAC key, its body's
    SHA-256 is the head's, the body is a CKKS evaluation-keys object of two key sets, and
    the keys work with the version's CKKS key ("wrong key" otherwise: ``eval_keys_work``,
    about 40 ms, the verdict shared with searches in this process)."""
    name = ckks_store.eval_keys_key(repo.repo_id, version)
    try:
        blob = store.get(name)
    except ObjectNotFound:
        return "missing", ("absent from the bucket: the service cannot score key version "
                           f"{version}, every search of it fails")
    try:
        head = ckks_store.parse_eval_head(blob, name)
    except FormatError as exc:
        return "damaged", f"its head does not parse: {exc}"
    mac_key = index_mac_key(repo.ring.version(version).data_key)
    if head.key_version != version or not hmac.compare_digest(
            head.mac, ckks_store.eval_mac(mac_key, repo.repo_id, blob)):
        return "not authenticated", ("its head's MAC does not verify under key version "
                                     f"{version} of this repository (forged, altered, or "
                                     "moved from another repository or key version)")
    body = blob[ckks_store.EVAL_HEAD_SIZE:]
    if not hmac.compare_digest(hashlib.sha256(body).digest(), head.digest):
        return "altered", ("its body's SHA-256 is not the one its authenticated head names "
                           "(altered or truncated in the bucket)")
    try:
        ckks.unpack_parts(body, ckks.KIND_EVAL, name)
    except FormatError as exc:
        return "damaged", f"its body does not parse: {exc}"
    key = _verdict_key(repo, version, head.digest)
    if key not in _verdicts:
        _verdicts[key] = eval_keys_work(repo, version, body)
    if not _verdicts[key]:
        return "wrong key", ("its keys do not work with this repository's CKKS key of key "
                             f"version {version} (tested: a product, relinearisation and "
                             "rotations decrypt wrong) — written by someone holding the "
                             "version's key, not by the service; every search refuses "
                             "them")
    return None
