"""A cloud that moves, swaps, truncates, extends, reorders or flips bits of stored objects is
caught: every read path (app.core.objects.fetch_original / get_decrypted,
app.core.searcher.read_meta) raises IntegrityError, and fetch_original leaves no partial
file behind (nor touches a file already at the destination).

The objects are real: images imported through app.core into a real S3 server (moto's,
over HTTP); the test plays the cloud by rewriting ciphertexts with its own S3 client.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.core import objects
from app.core.errors import IntegrityError, RadcryptError
from app.core.importer import Importer, image_id_for
from app.core.repository import Repository
from app.core.searcher import read_meta
from cloud import layout
from cloud.store import ObjectStore, StoreConfig
from crypto import aead

try:
    import e2e_support as support
    import owned_repos
    import s3servers
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos, s3servers

KINDS = ("objects", "thumbs", "meta")
CHUNK = (1 << aead.DEFAULT_CHUNK_LOG2) + aead.CHUNK_OVERHEAD


@dataclasses.dataclass
class Archive:
    store: ObjectStore
    repo: Repository
    other: Repository  # a second repository of the same store
    files: dict[str, Path]  # role -> file
    ids: dict[str, str]  # role -> image id


@pytest.fixture(scope="module")
def archive(moto_store_config: StoreConfig) -> Iterator[Archive]:
    config = dataclasses.replace(moto_store_config, bucket=s3servers.unique_bucket("tamper"))
    store = ObjectStore(config)
    store.ensure_bucket()
    pool = support.sample_images(100)
    small = next(p for p in pool if p.suffix == ".dcm" and p.stat().st_size < 16_000)
    large = next(p for p in pool if 3 * CHUNK < p.stat().st_size < 1_000_000)
    png = next(p for p in pool if p.suffix == ".png")
    tif = next(p for p in pool if p.suffix == ".tif")
    files = {"small": small, "large": large, "png": png, "tif": tif}
    repo = owned_repos.create_owned_repository(store, "tamper")
    other = owned_repos.create_owned_repository(store, "tamper-other")
    for target in (repo, other):
        report = Importer(store, target, workers=2).run(list(files.values()))
        assert len(report.imported) == len(files) and not report.failed
    ids = {role: image_id_for(repo, hashlib.sha256(p.read_bytes()).digest())
           for role, p in files.items()}
    yield Archive(store, repo, other, files, ids)
    s3servers.drop_bucket(config)


@pytest.fixture
def cloud(archive: Archive) -> Iterator[Archive]:
    """The archive, restored to its pristine state after the test (objects rewritten)."""
    prefix = layout.repo_prefix(archive.repo.repo_id)
    saved = {key: archive.store.get(key) for key in archive.store.list_keys(prefix)}
    yield archive
    for key in set(archive.store.list_keys(prefix)) - set(saved):
        archive.store.delete(key)
    for key, blob in saved.items():
        if not archive.store.exists(key) or archive.store.get(key) != blob:
            archive.store.put(key, blob)


# --- how each read path must fail --------------------------------------------------------


def _fetch_fails(archive: Archive, image_id: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir(parents=True)
    fresh = out / "fresh.dcm"
    with pytest.raises(IntegrityError, match="integrity"):
        objects.fetch_original(archive.store, archive.repo.ring, archive.repo.repo_id,
                               image_id, fresh)
    assert list(out.iterdir()) == []  # nothing written, not even a temporary file
    existing = out / "existing.dcm"
    existing.write_bytes(b"the user's own file")
    with pytest.raises(IntegrityError):
        objects.fetch_original(archive.store, archive.repo.ring, archive.repo.repo_id,
                               image_id, existing)
    assert existing.read_bytes() == b"the user's own file"
    assert list(out.iterdir()) == [existing]


def _read_fails(archive: Archive, kind: str, image_id: str, tmp_path: Path) -> None:
    if kind == "objects":
        _fetch_fails(archive, image_id, tmp_path)
    with pytest.raises(IntegrityError):
        objects.get_decrypted(archive.store, archive.repo.ring, archive.repo.repo_id, kind,
                              image_id)
    if kind == "meta":
        with pytest.raises(IntegrityError):
            read_meta(archive.store, archive.repo, image_id)


def _reads_fine(archive: Archive, role: str, tmp_path: Path) -> None:
    """The untouched objects of an image still open (the failure was the tampering)."""
    image_id = archive.ids[role]
    dest = tmp_path / "ok" / archive.files[role].name
    objects.fetch_original(archive.store, archive.repo.ring, archive.repo.repo_id, image_id,
                           dest)
    assert dest.read_bytes() == archive.files[role].read_bytes()
    meta, _ = read_meta(archive.store, archive.repo, image_id)
    assert meta["name"] == archive.files[role].name
    thumb, _ = objects.get_decrypted(archive.store, archive.repo.ring, archive.repo.repo_id,
                                     "thumbs", image_id)
    assert thumb.startswith(b"\x89PNG")


def _key(archive: Archive, kind: str, role: str) -> str:
    return layout.image_key(kind, archive.repo.repo_id, archive.ids[role])


def test_untampered_archive_reads_back(cloud: Archive, tmp_path: Path) -> None:
    for role in cloud.files:
        _reads_fine(cloud, role, tmp_path / role)


# --- moved and swapped ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_object_moved_to_another_image_id(cloud: Archive, kind: str, tmp_path: Path) -> None:
    cloud.store.put(_key(cloud, kind, "png"), cloud.store.get(_key(cloud, kind, "small")))
    _read_fails(cloud, kind, cloud.ids["png"], tmp_path)
    _reads_fine(cloud, "small", tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_object_copied_to_a_new_image_id(cloud: Archive, kind: str, tmp_path: Path) -> None:
    new_id = layout.new_id()
    cloud.store.put(layout.image_key(kind, cloud.repo.repo_id, new_id),
                    cloud.store.get(_key(cloud, kind, "tif")))
    _read_fails(cloud, kind, new_id, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_objects_of_two_images_swapped(cloud: Archive, kind: str, tmp_path: Path) -> None:
    a, b = _key(cloud, kind, "small"), _key(cloud, kind, "large")
    blob_a, blob_b = cloud.store.get(a), cloud.store.get(b)
    cloud.store.put(a, blob_b)
    cloud.store.put(b, blob_a)
    _read_fails(cloud, kind, cloud.ids["small"], tmp_path / "a")
    _read_fails(cloud, kind, cloud.ids["large"], tmp_path / "b")


@pytest.mark.parametrize(("source", "target"), [("thumbs", "meta"), ("meta", "objects"),
                                                ("objects", "thumbs")])
def test_object_moved_to_another_kind(cloud: Archive, source: str, target: str,
                                      tmp_path: Path) -> None:
    cloud.store.put(_key(cloud, target, "png"), cloud.store.get(_key(cloud, source, "png")))
    _read_fails(cloud, target, cloud.ids["png"], tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_object_of_another_repository(cloud: Archive, kind: str, tmp_path: Path) -> None:
    """The same picture imported into another repository: its ciphertext, put under this
    repository's name for the picture, does not open (other key, other associated data)."""
    other_id = image_id_for(cloud.other, hashlib.sha256(
        cloud.files["small"].read_bytes()).digest())
    assert other_id != cloud.ids["small"]  # ids are keyed per repository
    foreign = cloud.store.get(layout.image_key(kind, cloud.other.repo_id, other_id))
    cloud.store.put(_key(cloud, kind, "small"), foreign)
    _read_fails(cloud, kind, cloud.ids["small"], tmp_path)


# --- truncated, extended, reordered, flipped -------------------------------------------------


def _truncations(blob: bytes) -> dict[str, bytes]:
    cuts = {"empty": b"", "header only": blob[: aead.HEADER_SIZE],
            "one byte short": blob[:-1], "tag cut": blob[: -aead.TAG_SIZE],
            "half": blob[: len(blob) // 2]}
    full_chunks = (len(blob) - aead.HEADER_SIZE) // CHUNK
    if full_chunks >= 1 and (len(blob) - aead.HEADER_SIZE) % CHUNK:
        cuts["last chunk dropped"] = blob[: aead.HEADER_SIZE + full_chunks * CHUNK]
    return cuts


def _extensions(blob: bytes) -> dict[str, bytes]:
    out = {"one byte appended": blob + b"\0", "copy appended": blob + blob[aead.HEADER_SIZE:]}
    if len(blob) > aead.HEADER_SIZE + 2 * CHUNK:
        first = blob[aead.HEADER_SIZE : aead.HEADER_SIZE + CHUNK]
        second = blob[aead.HEADER_SIZE + CHUNK : aead.HEADER_SIZE + 2 * CHUNK]
        rest = blob[aead.HEADER_SIZE + 2 * CHUNK :]
        out["first two chunks swapped"] = blob[: aead.HEADER_SIZE] + second + first + rest
        out["first chunk repeated"] = blob[: aead.HEADER_SIZE] + first + first + second + rest
        out["first chunk dropped"] = blob[: aead.HEADER_SIZE] + second + rest
    return out


def _flip(blob: bytes, offset: int, bit: int = 0) -> bytes:
    data = bytearray(blob)
    data[offset] ^= 1 << bit
    return bytes(data)


def _flips(blob: bytes) -> dict[str, bytes]:
    return {
        "magic": _flip(blob, 0), "version": _flip(blob, 4), "chunk size": _flip(blob, 5),
        "reserved": _flip(blob, 6, 7), "salt": _flip(blob, 20, 3),
        "nonce": _flip(blob, aead.HEADER_SIZE + 1),
        "body start": _flip(blob, aead.HEADER_SIZE + aead.NONCE_SIZE, 7),
        "middle": _flip(blob, len(blob) // 2, 5), "tag end": _flip(blob, len(blob) - 1),
    }


DAMAGE: dict[str, Callable[[bytes], dict[str, bytes]]] = {
    "truncated": _truncations, "extended": _extensions, "bit flipped": _flips}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize(("kind", "role"), [("objects", "small"), ("objects", "large"),
                                            ("thumbs", "large"), ("meta", "tif")])
def test_damaged_object_is_refused(cloud: Archive, damage: str, kind: str, role: str,
                                   tmp_path: Path) -> None:
    key = _key(cloud, kind, role)
    pristine = cloud.store.get(key)
    variants = DAMAGE[damage](pristine)
    if role == "large" and kind == "objects":
        assert len(pristine) > aead.HEADER_SIZE + 3 * CHUNK  # really several chunks
        assert damage != "truncated" or "last chunk dropped" in variants
    for name, blob in variants.items():
        assert blob != pristine
        cloud.store.put(key, blob)
        try:
            _read_fails(cloud, kind, cloud.ids[role], tmp_path / name.replace(" ", "-"))
        except BaseException as exc:
            raise AssertionError(f"{damage} ({name}) was not refused: {exc!r}") from exc
    cloud.store.put(key, pristine)
    _reads_fine(cloud, role, tmp_path / "restored")


# --- missing objects ---------------------------------------------------------------------------


def test_missing_original_is_a_clear_error(cloud: Archive, tmp_path: Path) -> None:
    """An original that is gone (deleted by the cloud, or an id never imported) is reported
    in words, not as a storage exception, and writes nothing."""
    cloud.store.delete(_key(cloud, "objects", "png"))
    for image_id in (cloud.ids["png"], layout.new_id()):
        with pytest.raises(RadcryptError, match=image_id):
            objects.fetch_original(cloud.store, cloud.repo.ring, cloud.repo.repo_id, image_id,
                                   tmp_path / "x.png")
        assert list(tmp_path.iterdir()) == []


def test_missing_metadata_is_an_integrity_error(cloud: Archive) -> None:
    cloud.store.delete(_key(cloud, "meta", "png"))
    with pytest.raises(IntegrityError, match="missing"):
        read_meta(cloud.store, cloud.repo, cloud.ids["png"])
