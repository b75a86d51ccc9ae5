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


def is_ckks(manifest: Manifest) -> bool:
    return manifest.search == CKKS


def forget() -> None:
    """Drop every CKKS key held in this process (the workstation lock, a closed client)."""
    with _keys_lock:
        _keys.clear()


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
    try:
        parsed = ckks_store.parse_eval_head(head, name)
    except FormatError as exc:
        raise IntegrityError(f"the CKKS evaluation keys of {repo.repo_id!r} key version "
                             f"{version} ({name}) are damaged: {exc}; not used") from None
    mac_key = index_mac_key(repo.ring.version(version).data_key)
    if parsed.key_version != version or not hmac.compare_digest(
            parsed.mac, ckks_store.eval_mac(mac_key, repo.repo_id, head)):
        raise IntegrityError(f"the CKKS evaluation keys of {repo.repo_id!r} key version "
                             f"{version} ({name}) failed their integrity check (altered, "
                             "or moved from another repository or key version): not used")
    return parsed.digest


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
