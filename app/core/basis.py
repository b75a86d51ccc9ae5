"""The bound basis of a key version: fitted on the repository's own features, kept secret.

The bound levels (DESIGN.md §4) project every vector on an orthonormal basis B whose rows
are principal directions of the repository's features. Level scores reveal distances inside
B's subspace, so B must never be computable from public data: it is fitted on the
repository's own features only, never on a shipped or public sample.

Where it lives. A new repository has no features, so its key ring carries the full-vector
key only. The first import batch of a key version fits B on its own features, draws the
level keys, and stores both (crypto.index.BoundLevels) in ``repos/<id>/basis/<version>``,
AES-256-GCM encrypted under that version's data key, with associated data binding the
repository, the kind "basis" and the version. It is written create-if-absent: of two
importers racing on the first batch, the loser reads and uses the winner's. Opening a
repository (and every import batch) loads it. A key rotation with features at hand fits the
new version's basis on them and keeps it in the ring itself (rotation_index_key). A new
repository's levels and first index key (manifest_levels, initial_index_key) are made by
app/core/repository.py, which this module builds on (it imports nothing from here).

Refusals. A basis object that does not open, or whose levels differ from the signed
manifest's, is an IntegrityError. When the object is missing but segments of that version
exist (the cloud deleted it), no new basis is written: an IntegrityError says so, because a
new basis would mean new level keys that the stored segments do not match.

Format 2. "Segments of that version exist" means: the verified segment log has live
segments of that version (a segment object not in the log proves nothing, and the log
does not depend on listing the bucket).

A repository created with ``--bound-levels off`` has no levels at all (manifest levels []):
its searches scan the codes of every full vector and a known-plaintext attacker needs
d + 1 known pairs, as for the full vectors.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from app.core.errors import IntegrityError
from app.core.repository import Manifest, Repository, initial_index_key, is_format2
from cloud import layout, seglog
from cloud.backend import ObjectExists, ObjectNotFound, Store
from cloud.segments import HEADER_SIZE, read_header
from crypto import aead
from crypto.errors import DecryptionError, FormatError
from crypto.index import BoundLevels, IndexKey
from crypto.keys import KeyRing, VersionKeys

KIND = "basis"
# Feature norms an extractor's vectors stay below (radcrypt-v1: 1.2 to 2.8 on the sample
# images): ciphertext norms are then drawn from one distribution whatever a batch holds
# (crypto/sknn.py), so they reveal nothing of the plaintext norms, even for one image.
NORM_BOUNDS = {"radcrypt-v1": 4.0}


def norm_bound(manifest: Manifest) -> float:
    """The feature norm to pass to IndexKey.encrypt for this repository (0: unknown)."""
    return NORM_BOUNDS.get(manifest.extractor, 0.0)


def rotation_index_key(manifest: Manifest, features: np.ndarray) -> IndexKey:
    """Fresh index key of a new key version, B refitted on the repository's own features
    (a repository with no features gets its basis from the new version's first batch)."""
    return initial_index_key(manifest.dim, "auto" if manifest.levels else "off", features)


def _ad(repo_id: str, version: int) -> bytes:
    return aead.associated_data(repo_id, KIND, str(version), version)


def _pending(levels: list[int], keys: VersionKeys) -> bool:
    """Whether the manifest wants levels that the version's key does not have yet."""
    return bool(levels) and not keys.index_key.levels


def _with_levels(repo_id: str, levels: list[int], dim: int, keys: VersionKeys,
                 bound: BoundLevels) -> VersionKeys:
    if list(bound.levels) != list(levels) or bound.dim != dim:
        raise IntegrityError(
            f"the bound basis of repository {repo_id!r}, key version {keys.version}, "
            "does not match the levels of its manifest")
    return VersionKeys(keys.version, keys.data_key, keys.keyword_key,
                       keys.index_key.with_levels(bound))


def _read(store: Store, repo_id: str, keys: VersionKeys) -> BoundLevels | None:
    name = layout.basis_key(repo_id, keys.version)
    try:
        envelope = store.get(name)
    except ObjectNotFound:
        return None
    try:
        return BoundLevels.from_bytes(
            aead.open_sealed(keys.data_key, envelope, _ad(repo_id, keys.version)))
    except (DecryptionError, FormatError):
        raise IntegrityError(
            f"the bound basis of repository {repo_id!r} ({name}) failed its integrity "
            "check: it was altered, replaced or moved") from None


def load_version(store: Store, repo_id: str, levels: list[int], dim: int,
                 keys: VersionKeys) -> VersionKeys:
    """The keys of one version with its basis, when one exists (else unchanged)."""
    if not _pending(levels, keys):
        return keys
    bound = _read(store, repo_id, keys)
    return keys if bound is None else _with_levels(repo_id, levels, dim, keys, bound)


def ensure_version(store: Store, repo_id: str, levels: list[int], dim: int,
                   keys: VersionKeys, features: np.ndarray, *,
                   has_segments: Callable[[int], bool] | None = None) -> VersionKeys:
    """The keys of one version with its basis; the version's first batch (``features``:
    its plaintext features) fits and stores it. Whatever writes a segment of a version
    (an import batch, a re-encryption after a rotation) encrypts with these keys.
    ``has_segments(version)``: whether segments of a version exist (default: a readable
    segment object of that version in the bucket, format 1)."""
    loaded = load_version(store, repo_id, levels, dim, keys)
    if not _pending(levels, loaded):
        return loaded
    version = keys.version
    exists = has_segments or (lambda v: _has_segments(store, repo_id, v))
    if exists(version):
        raise IntegrityError(
            f"repository {repo_id!r} has index segments of key version {version} but "
            f"its bound basis ({layout.basis_key(repo_id, version)}) is missing: it was "
            "deleted from the store. Refusing to write a new one; restore the object from a "
            "backup, or rotate the keys (revoke) to rebuild the index")
    sample = np.atleast_2d(np.asarray(features, dtype=np.float64))
    bound = BoundLevels.generate(dim, sample, tuple(levels))
    envelope = aead.seal(keys.data_key, bound.to_bytes(), _ad(repo_id, version))
    try:
        store.put(layout.basis_key(repo_id, version), envelope, if_absent=True)
    except ObjectExists:  # another importer's first batch won: use its basis
        winner = _read(store, repo_id, keys)
        if winner is None:
            raise IntegrityError(f"the bound basis of repository {repo_id!r} vanished "
                                 "while it was being written") from None
        return _with_levels(repo_id, levels, dim, keys, winner)
    return _with_levels(repo_id, levels, dim, keys, bound)


def _replace_current(repo: Repository, keys: VersionKeys) -> Repository:
    if keys is repo.keys:
        return repo
    ring = KeyRing(repo.ring.repo_id, (*repo.ring.versions[:-1], keys))
    return dataclasses.replace(repo, ring=ring)


def load(store: Store, repo: Repository) -> Repository:
    """The repository with its current version's basis, when one exists (else unchanged:
    its tokens then have no levels, which only matters before the first import)."""
    m = repo.manifest
    return _replace_current(repo, load_version(store, repo.repo_id, m.levels, m.dim,
                                               repo.keys))


def ensure(store: Store, repo: Repository, features: np.ndarray,
           log: seglog.LogState | None = None) -> Repository:
    """The repository with a basis for its current key version; the first batch of that
    version (``features``: its plaintext features) fits and stores it. ``log``: the
    verified segment log of a format-2 repository (verified here when not given)."""
    m = repo.manifest
    has_segments = None
    if is_format2(m):
        state = log
        if state is None:
            from app.core.logstate import verified_log  # it builds on this module's peers

            state = verified_log(store, None, repo)
        has_segments = functools.partial(_has_live_segments, state)
    return _replace_current(repo, ensure_version(store, repo.repo_id, m.levels, m.dim,
                                                 repo.keys, features,
                                                 has_segments=has_segments))


def _has_live_segments(state: seglog.LogState, version: int) -> bool:
    """Format 2: whether the log has live segments of ``version``."""
    return bool(state.segments(version))


def _has_segments(store: Store, repo_id: str, version: int) -> bool:
    """Whether some readable segment was written under ``version`` (two small reads each)."""
    for key in store.list_keys(layout.segments_prefix(repo_id)):
        try:
            key_version, _, _ = read_header(store.get_range(key, 0, HEADER_SIZE), key)
        except (ValueError, ObjectNotFound):
            continue
        if key_version == version:
            return True
    return False
