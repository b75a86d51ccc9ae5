"""A cloud that moves, swaps, truncates, extends, reorders or flips bits of stored objects is
caught: every read path (app.core.objects.fetch_original / get_decrypted for originals,
app.core.packs.ImageReader for the metadata, previews and features kept in packs) raises
IntegrityError, and fetch_original leaves no partial file behind (nor touches a file
already at the destination).

The objects are real: images imported through app.core into a real S3 server (moto's,
over HTTP), in storage format 2 (the default): one original object per image, and per
import batch one pack holding the batch's metadata, previews and feature array; the test
plays the cloud by rewriting ciphertexts with its own S3 client. A pack is read by range
(its TOC from the tail, then one entry), so a damaged pack must fail every read the damage
touches, and no read may ever return anything but the imported content: each pack attack
is checked with a fresh reader (no TOC cached: a new process) and with a warm one (its TOC
verified and cached before the damage).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.core import objects
from app.core.errors import IntegrityError, RadcryptError
from app.core.importer import Importer, image_id_for
from app.core.packs import ImageReader, forget_tocs
from app.core.repository import Repository
from cloud import layout
from cloud.store import ObjectStore, StoreConfig
from crypto import aead, pack
from crypto.errors import FormatError

try:
    import e2e_support as support
    import owned_repos
    import s3servers
    from fixtures import format2_support as fx
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos, s3servers
    from tests.fixtures import format2_support as fx

KINDS = ("objects",)  # per-image objects in format 2: the originals only
READS = ("meta", "thumbs")  # what a pack holds per image (and the features, read with meta)
CHUNK = (1 << aead.DEFAULT_CHUNK_LOG2) + aead.CHUNK_OVERHEAD
BATCH = 2  # two packs: (small, large) and (png, tif)


@dataclasses.dataclass
class Archive:
    store: ObjectStore
    repo: Repository
    other: Repository  # a second repository of the same store
    files: dict[str, Path]  # role -> file
    ids: dict[str, str]  # role -> image id
    plain: dict[tuple[str, str], bytes]  # (read, role) -> what it returned untampered
    packs: dict[str, str]  # role -> the id of the live pack holding it


def _reader(archive: Archive, repo: Repository | None = None) -> ImageReader:
    """A reader of a new process: the log verified again, no TOC cached."""
    forget_tocs()
    return fx.reader(archive.store, fx.fresh_settings(), repo or archive.repo)


def _read(reader: ImageReader, what: str, image_id: str) -> bytes:
    if what == "meta":
        record, _ = reader.meta(image_id)
        return json.dumps(record, sort_keys=True).encode()
    return reader.thumb(image_id)


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
    repos = []
    for name in ("tamper", "tamper-other"):
        owner = owned_repos.owner_identity()
        settings = fx.fresh_settings()
        target = owned_repos.create_owned_repository(store, name, owner,
                                                     data_dir=settings.data_path)
        report = Importer(store, target, workers=2, batch_size=BATCH, writer=owner,
                          settings=settings).run(list(files.values()))
        assert len(report.imported) == len(files) and not report.failed
        assert len(report.packs) == len(files) // BATCH
        repos.append(target)
    repo, other = repos
    ids = {role: image_id_for(repo, hashlib.sha256(p.read_bytes()).digest())
           for role, p in files.items()}
    found = Archive(store, repo, other, files, ids, {}, {})
    reader = _reader(found)
    found.plain = {(what, role): _read(reader, what, ids[role])
                   for what in READS for role in files}
    found.packs = {role: reader.pack_of(ids[role]) for role in files}
    assert found.packs["small"] == found.packs["large"] != found.packs["png"]
    yield found
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
    forget_tocs()


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
    _fetch_fails(archive, image_id, tmp_path)
    with pytest.raises(IntegrityError):
        objects.get_decrypted(archive.store, archive.repo.ring, archive.repo.repo_id, kind,
                              image_id)


def _reads_fine(archive: Archive, role: str, tmp_path: Path) -> None:
    """The untouched objects of an image still open (the failure was the tampering)."""
    image_id = archive.ids[role]
    dest = tmp_path / "ok" / archive.files[role].name
    objects.fetch_original(archive.store, archive.repo.ring, archive.repo.repo_id, image_id,
                           dest)
    assert dest.read_bytes() == archive.files[role].read_bytes()
    reader = _reader(archive)
    meta, _ = reader.meta(image_id)
    assert meta["name"] == archive.files[role].name
    assert len(meta["features"]) == archive.repo.manifest.dim
    assert reader.thumb(image_id).startswith(b"\x89PNG")


def _pack_reads_fail(archive: Archive, reader: ImageReader | None,
                     failing: set[tuple[str, str]], where: str) -> None:
    """Every read in ``failing`` raises IntegrityError; every other read returns exactly
    the imported content or raises IntegrityError too, never anything else. ``reader``
    None: a fresh one (no TOC cached) for every read."""
    for what in READS:
        for role in archive.files:
            current = reader or _reader(archive)
            try:
                got = _read(current, what, archive.ids[role])
            except IntegrityError:
                continue
            assert (what, role) not in failing, f"{where}: {what} of {role} was not refused"
            assert got == archive.plain[(what, role)], f"{where}: {what} of {role} altered"


def _key(archive: Archive, kind: str, role: str) -> str:
    return layout.image_key(kind, archive.repo.repo_id, archive.ids[role])


def _pack_key(archive: Archive, role: str, repo: Repository | None = None) -> str:
    return layout.pack_key((repo or archive.repo).repo_id, archive.packs[role])


def test_untampered_archive_reads_back(cloud: Archive, tmp_path: Path) -> None:
    for role in cloud.files:
        _reads_fine(cloud, role, tmp_path / role)
    assert not list(cloud.store.list_keys(layout.image_prefix("meta", cloud.repo.repo_id)))
    assert not list(cloud.store.list_keys(layout.image_prefix("thumbs", cloud.repo.repo_id)))


# --- moved and swapped: originals ------------------------------------------------------------


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


@pytest.mark.parametrize(("source", "target"), [("meta", "objects"), ("thumbs", "objects")])
def test_pack_entry_moved_to_an_original(cloud: Archive, source: str, target: str,
                                         tmp_path: Path) -> None:
    """A pack entry's envelope (an AEAD envelope like an original's) put as the original
    of its own image does not open: other kind, other associated data (version 2)."""
    blob = cloud.store.get(_pack_key(cloud, "png"))
    toc = _toc(cloud, "png")
    entry = toc.entry(pack.KIND_META if source == "meta" else pack.KIND_THUMBS,
                      cloud.ids["png"])
    cloud.store.put(_key(cloud, target, "png"), blob[entry.offset:entry.offset + entry.length])
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


# --- moved and swapped: packs and their entries ------------------------------------------------


def _toc(archive: Archive, role: str) -> pack.PackToc:
    """The verified TOC of the (pristine) pack holding ``role``."""
    blob = archive.store.get(_pack_key(archive, role))
    return pack.open_pack(archive.repo.keys.data_key, archive.repo.repo_id,
                          archive.packs[role], blob)[0]


ALL = {(what, role) for what in READS for role in ("small", "large", "png", "tif")}
FIRST = {(what, role) for what in READS for role in ("small", "large")}
SECOND = ALL - FIRST


def test_packs_of_two_batches_swapped(cloud: Archive) -> None:
    a, b = _pack_key(cloud, "small"), _pack_key(cloud, "png")
    warm = _reader(cloud)
    _pack_reads_fail(cloud, warm, set(), "before")  # TOCs verified and cached
    blob_a, blob_b = cloud.store.get(a), cloud.store.get(b)
    cloud.store.put(a, blob_b)
    cloud.store.put(b, blob_a)
    _pack_reads_fail(cloud, None, ALL, "fresh reader")
    _pack_reads_fail(cloud, warm, ALL, "warm reader")


def test_pack_moved_over_another_and_copied_to_a_new_pack_id(cloud: Archive) -> None:
    """Pack A's bytes under pack B's name: B's images fail; A's copy under a new name is
    no live pack (the log names the live ones): nothing of it is read, its images are
    still read from A, and an image id no live pack holds is refused."""
    blob_a = cloud.store.get(_pack_key(cloud, "small"))
    copy = layout.new_id()
    cloud.store.put(layout.pack_key(cloud.repo.repo_id, copy), blob_a)
    reader = _reader(cloud)
    assert reader.image_ids() == set(cloud.ids.values())
    assert reader.pack_of(cloud.ids["small"]) == cloud.packs["small"] != copy
    for what in READS:
        with pytest.raises(IntegrityError, match="not in any live pack"):
            _read(reader, what, layout.new_id())
    _pack_reads_fail(cloud, None, set(), "copied")
    cloud.store.put(_pack_key(cloud, "png"), blob_a)
    _pack_reads_fail(cloud, None, SECOND, "moved")


def test_pack_of_another_repository(cloud: Archive) -> None:
    """The same pictures imported into another repository: its pack, put under this
    repository's pack name, does not open (other key, repository and pack id bound)."""
    foreign = cloud.store.get(layout.pack_key(cloud.other.repo_id, _other_pack(cloud)))
    cloud.store.put(_pack_key(cloud, "small"), foreign)
    _pack_reads_fail(cloud, None, FIRST, "fresh reader")


def _other_pack(archive: Archive) -> str:
    reader = fx.reader(archive.store, fx.fresh_settings(), archive.other)
    other_id = image_id_for(archive.other, hashlib.sha256(
        archive.files["small"].read_bytes()).digest())
    return reader.pack_of(other_id)


def _exchange(blob: bytes, a: pack.PackEntry, b: pack.PackEntry) -> bytes:
    """``blob`` with the envelopes of entries a and b exchanged (everything else kept in
    place; entries between them shift when the lengths differ)."""
    first, second = sorted((a, b), key=lambda e: e.offset)
    return (blob[:first.offset] + blob[second.offset:second.offset + second.length]
            + blob[first.offset + first.length:second.offset]
            + blob[first.offset:first.offset + first.length]
            + blob[second.offset + second.length:])


@pytest.mark.parametrize("what", READS)
def test_entries_of_two_images_swapped_in_a_pack(cloud: Archive, what: str) -> None:
    kind = pack.KIND_META if what == "meta" else pack.KIND_THUMBS
    key, toc = _pack_key(cloud, "small"), _toc(cloud, "small")
    blob = cloud.store.get(key)
    swapped = _exchange(blob, toc.entry(kind, cloud.ids["small"]),
                        toc.entry(kind, cloud.ids["large"]))
    assert swapped != blob and len(swapped) == len(blob)
    warm = _reader(cloud)
    _pack_reads_fail(cloud, warm, set(), "before")
    cloud.store.put(key, swapped)
    failing = {(what, "small"), (what, "large")}
    _pack_reads_fail(cloud, None, failing, "fresh reader")
    _pack_reads_fail(cloud, warm, failing, "warm reader")


@pytest.mark.parametrize(("source", "target"), [("thumbs", "meta"), ("meta", "thumbs")])
def test_entry_moved_to_another_kind(cloud: Archive, source: str, target: str) -> None:
    kinds = {"meta": pack.KIND_META, "thumbs": pack.KIND_THUMBS}
    key, toc = _pack_key(cloud, "png"), _toc(cloud, "png")
    blob = cloud.store.get(key)
    moved = _exchange(blob, toc.entry(kinds[source], cloud.ids["png"]),
                      toc.entry(kinds[target], cloud.ids["png"]))
    cloud.store.put(key, moved)
    _pack_reads_fail(cloud, None, {(source, "png"), (target, "png")}, "fresh reader")


def test_feature_array_of_another_pack(cloud: Archive) -> None:
    """The features of one batch put in place of another's (a search would then score
    the wrong vectors): the metadata reads of that pack, which carry the features, fail."""
    key_a, toc_a = _pack_key(cloud, "small"), _toc(cloud, "small")
    toc_b = _toc(cloud, "png")
    blob_a, blob_b = cloud.store.get(key_a), cloud.store.get(_pack_key(cloud, "png"))
    fa, fb = toc_a.features_entry(), toc_b.features_entry()
    if fa.length == fb.length:  # same image count: the foreign array fits in place
        forged = (blob_a[:fa.offset] + blob_b[fb.offset:fb.offset + fb.length]
                  + blob_a[fa.offset + fa.length:])
    else:  # pragma: no cover - both batches hold two images
        raise AssertionError("the two packs should hold as many images")
    cloud.store.put(key_a, forged)
    _pack_reads_fail(cloud, None, {("meta", "small"), ("meta", "large")}, "fresh reader")


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
@pytest.mark.parametrize(("kind", "role"), [("objects", "small"), ("objects", "large")])
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


def _pack_variants(blob: bytes, toc: pack.PackToc, ids: dict[str, str]
                   ) -> dict[str, tuple[bytes, set[tuple[str, str]] | None]]:
    """Damaged copies of the pack holding small and large, each with the reads it must
    make fail (None: the header, which range reads never use; see the test)."""
    meta, thumb = toc.entry(pack.KIND_META, ids["large"]), toc.entry(pack.KIND_THUMBS,
                                                                     ids["small"])
    features, end = toc.features_entry(), toc.toc_offset
    size = len(blob)
    first = {(what, role) for what in READS for role in ("small", "large")}
    entries = blob[pack.HEADER_SIZE:end]
    return {
        # truncated and extended: the trailer moves, the TOC does not open
        "empty": (b"", first), "header only": (blob[:pack.HEADER_SIZE], first),
        "one byte short": (blob[:-1], first), "trailer cut": (blob[:-pack.TRAILER_SIZE], first),
        "half": (blob[:size // 2], first), "one byte appended": (blob + b"\0", first),
        "copy appended": (blob + blob, first),
        "entries repeated": (blob[:end] + entries + blob[end:], first),
        "last entry dropped": (blob[:features.offset] + blob[end:], first),
        # bits flipped, where each part lies
        "meta entry": (_flip(blob, meta.offset + meta.length // 2, 5), {("meta", "large")}),
        "meta tag": (_flip(blob, meta.offset + meta.length - 1), {("meta", "large")}),
        "preview salt": (_flip(blob, thumb.offset + 20, 3), {("thumbs", "small")}),
        "feature array": (_flip(blob, features.offset + features.length // 2, 1),
                          {("meta", "small"), ("meta", "large")}),
        "toc": (_flip(blob, end + (size - pack.TRAILER_SIZE - end) // 2, 2), first),
        "toc length": (_flip(blob, size - 16, 0), first),
        "trailer count": (_flip(blob, size - 9, 0), first),
        "end magic": (_flip(blob, size - 8, 0), first),
        "trailer reserved": (_flip(blob, size - 1, 0), first),
        "header magic": (_flip(blob, 0), None), "header pack id": (_flip(blob, 8 + 3), None),
        "header key version": (_flip(blob, 27), None),
    }


def test_damaged_pack_is_refused(cloud: Archive, tmp_path: Path) -> None:
    """Every damage to a pack makes the reads it touches fail, with a fresh reader (TOC
    read from the damaged object) and with a warm one (TOC verified before); no read ever
    returns other content. The 32-byte header is not read by range reads (every field of
    it is bound inside the TOC and the entries' associated data): damage there changes no
    read, and a whole-pack read (compaction, check) refuses it."""
    key, toc = _pack_key(cloud, "small"), _toc(cloud, "small")
    pristine = cloud.store.get(key)
    warm = _reader(cloud)
    _pack_reads_fail(cloud, warm, set(), "before")
    for name, (blob, failing) in _pack_variants(pristine, toc, cloud.ids).items():
        assert blob != pristine, name
        cloud.store.put(key, blob)
        _pack_reads_fail(cloud, None, failing or set(), f"{name}, fresh reader")
        # a warm reader keeps the verified TOC (and the pack's verified feature array):
        # reads whose bytes are intact still succeed (an appended or a header byte is
        # never read), a damaged metadata or preview entry still fails
        entry_damage = name in ("meta entry", "meta tag", "preview salt")
        _pack_reads_fail(cloud, warm, (failing or set()) if entry_damage else set(),
                         f"{name}, warm reader")
        if failing is None:
            with pytest.raises(FormatError):
                pack.open_pack(cloud.repo.keys.data_key, cloud.repo.repo_id,
                               cloud.packs["small"], blob)
    cloud.store.put(key, pristine)
    _reads_fine(cloud, "large", tmp_path)


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


def test_missing_pack_is_an_integrity_error(cloud: Archive) -> None:
    """A live pack deleted: every read of its images fails, naming the pack as missing;
    the other batch's images still read."""
    warm = _reader(cloud)
    _pack_reads_fail(cloud, warm, set(), "before")
    cloud.store.delete(_pack_key(cloud, "png"))
    with pytest.raises(IntegrityError, match="missing"):
        _reader(cloud).meta(cloud.ids["png"])
    _pack_reads_fail(cloud, warm, SECOND, "warm reader")  # its entries' range reads fail
    for what in READS:
        with pytest.raises(IntegrityError, match="missing"):
            _read(warm, what, cloud.ids["tif"])
