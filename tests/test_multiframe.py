"""Every frame of a multi-frame DICOM instance is a searchable image (issue 15, DESIGN §9).

Real files from pydicom-data: ``emri_small.dcm`` (MR, 10 frames of 64 x 64, uncompressed),
its RLE copy, and ``CT_small.dcm`` (one frame). The tests run the real Importer (decoder
children), read the encrypted packs back through the verified log, and search through the
embedded search service of a directory store, as the product does.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from app.core import importer as importer_module
from app.core import logstate, objects
from app.core.access import create_repository_as, open_repository_as, session_for
from app.core.importer import Importer, frame_image_id, image_id_for
from app.core.meta import ImageMeta
from app.core.packs import ImageReader
from app.core.repository import Repository
from app.core.searcher import search_files
from app.core.settings import Settings, load_settings
from app.imaging.decode import decode_image
from app.imaging.worker import DecoderPool, analyse
from cloud import layout
from cloud.directory_store import DirectoryStore
from crypto.identity import Identity

try:
    import owned_repos
except ImportError:  # pragma: no cover
    from tests import owned_repos

MULTI = "emri_small.dcm"  # MR, 10 frames
MULTI_RLE = "emri_small_RLE.dcm"  # the same frames, RLE Lossless
SINGLE = "CT_small.dcm"


def _sample(name: str, folder: Path) -> Path:
    path = Path(get_testdata_file(name))
    target = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return target


def _digest(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def _frame_as_file(source: Path, frame: int, dest: Path) -> Path:
    """Frame ``frame`` of an uncompressed multi-frame file written as a single-frame DICOM
    file of its own (another SOP instance): a query made of one frame's pixels."""
    ds = pydicom.dcmread(source)
    frame_bytes = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    ds.PixelData = ds.PixelData[frame * frame_bytes:(frame + 1) * frame_bytes]
    ds.NumberOfFrames = 1
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(dest)
    return dest


def _repo(tmp_path: Path) -> tuple[DirectoryStore, Settings, Identity, Repository]:
    store = DirectoryStore(tmp_path / "bucket")
    store.ensure_bucket()
    settings = Settings(data_dir=str(tmp_path / "data"))
    owner = Identity.generate("Multiframe Owner")
    repo = create_repository_as(owned_repos.StoreSession(store, settings), owner, "mf",
                                storage_format=2)
    return store, settings, owner, repo


def _reader(store: DirectoryStore, settings: Settings, repo: Repository) -> ImageReader:
    return ImageReader(store, repo, logstate.verified_log(store, settings, repo))


def test_each_frame_is_an_image_with_its_own_features_preview_and_metadata(
        tmp_path: Path) -> None:
    store, settings, owner, repo = _repo(tmp_path)
    multi, single = _sample(MULTI, tmp_path / "in"), _sample(SINGLE, tmp_path / "in")
    report = Importer(store, repo, workers=2, batch_size=8, writer=owner,
                      settings=settings).run([multi, single])
    assert report.failed == [] and report.frames_not_indexed == []
    digest = _digest(multi)
    first = image_id_for(repo, digest)
    frame_ids = [frame_image_id(repo, digest, i) for i in range(10)]
    assert frame_ids[0] == first and len(set(frame_ids)) == 10
    # the report names each file once (frame 0's id) and the other frames apart
    assert sorted(report.imported) == sorted([(str(multi), first),
                                              (str(single), image_id_for(repo,
                                                                         _digest(single)))])
    assert sorted(report.frames) == [(str(multi), i, frame_ids[i]) for i in range(1, 10)]
    assert report.as_dict()["frames"][0].keys() == {"path", "frame", "image_id"}

    reader = _reader(store, settings, repo)
    assert reader.image_ids() == {*frame_ids, image_id_for(repo, _digest(single))}
    with DecoderPool(1) as pool:
        previews = set()
        for i, image_id in enumerate(frame_ids):
            record, version = reader.meta(image_id)
            meta = ImageMeta.from_record(image_id, record, version)
            assert (meta.frame, meta.frames, meta.original_image_id) == (i, 10, first)
            assert meta.name == MULTI and meta.sha256 == digest.hex()
            assert meta.modality == "MR" and meta.attribute("NumberOfFrames") == "10"
            wanted = analyse(pool.decode(multi, i), repo.manifest.extractor, False).features
            np.testing.assert_allclose(meta.features, wanted, rtol=1e-12)
            previews.add(reader.thumb(image_id))
        assert len(previews) == 10  # a preview per frame, each of its own frame
    # a single-frame file's metadata has no frame keys (unchanged apart from "clinical")
    single_record, _ = reader.meta(image_id_for(repo, _digest(single)))
    assert not {"frame", "frames", "original"} & set(single_record)

    # the original is stored once per file, under frame 0's id, and opens as the file
    originals = list(store.list_keys(layout.objects_prefix(repo.repo_id)))
    assert len(originals) == 2
    out = tmp_path / "out" / "original.dcm"
    objects.fetch_original(store, repo.ring, repo.repo_id, first, out)
    assert out.read_bytes() == multi.read_bytes()


def test_reimport_imports_nothing_and_a_partial_file_is_completed(tmp_path: Path) -> None:
    store, settings, owner, repo = _repo(tmp_path)
    multi = _sample(MULTI_RLE, tmp_path / "in")

    def run() -> importer_module.ImportReport:
        return Importer(store, repo, workers=1, batch_size=4, writer=owner,
                        settings=settings).run([multi])

    first = run()
    assert len(first.imported) == 1 and len(first.frames) == 9
    again = run()
    assert again.imported == [] and again.frames == [] and again.segments == []
    assert again.already_present == first.imported

    # A run that committed some frames and died before frame 0 (the file's marker, always
    # committed last) is completed by the next: only the missing frames are committed.
    store2, settings2, owner2, repo2 = _repo(tmp_path / "second")
    digest = _digest(multi)
    importer = Importer(store2, repo2, workers=1, batch_size=4, writer=owner2,
                        settings=settings2)
    original_commit = importer._commit_format2
    calls = []

    def die_after_first_group(ids, new, batch, vectors, seg_id):  # type: ignore[no-untyped-def]
        calls.append(list(ids))
        if len(calls) == 2:
            raise RuntimeError("killed between two packs of one batch")
        return original_commit(ids, new, batch, vectors, seg_id)

    importer._commit_format2 = die_after_first_group  # type: ignore[method-assign]
    importer_module.pack.MAX_PACK_SIZE, saved = 20_000, importer_module.pack.MAX_PACK_SIZE
    try:
        with pytest.raises(RuntimeError, match="killed between"):
            importer.run([multi])
    finally:
        importer_module.pack.MAX_PACK_SIZE = saved
    committed_first = set(calls[0])
    assert image_id_for(repo2, digest) not in committed_first  # frame 0 waits for the rest
    resumed = Importer(store2, repo2, workers=1, batch_size=4, writer=owner2,
                       settings=settings2).run([multi])
    all_ids = {frame_image_id(repo2, digest, i) for i in range(10)}
    assert {i for _, _, i in resumed.frames} == all_ids - committed_first - {
        image_id_for(repo2, digest)}
    assert resumed.imported == [(str(multi), image_id_for(repo2, digest))]
    assert _reader(store2, settings2, repo2).image_ids() == all_ids
    assert len(list(store2.list_keys(layout.objects_prefix(repo2.repo_id)))) == 1


def test_frames_over_the_cap_are_reported_not_silently_dropped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, settings, owner, repo = _repo(tmp_path)
    multi = _sample(MULTI, tmp_path / "in")
    monkeypatch.setattr(importer_module, "MAX_FRAMES", 4)
    report = Importer(store, repo, workers=1, batch_size=4, writer=owner,
                      settings=settings).run([multi])
    assert report.failed == [] and len(report.frames) == 3
    [(path, reason)] = report.frames_not_indexed
    assert path == str(multi)
    assert reason.startswith("frames 4 to 9 of 10 not indexed") and "MAX_FRAMES" in reason
    assert report.as_dict()["frames_not_indexed"] == [{"path": path, "reason": reason}]
    assert len(_reader(store, settings, repo).image_ids()) == 4


def test_a_search_with_one_frames_pixels_finds_that_frame(tmp_path: Path) -> None:
    multi = _sample(MULTI, tmp_path / "in")
    query = _frame_as_file(multi, 6, tmp_path / "query-frame-6.dcm")
    settings = load_settings(store="directory", data_dir=str(tmp_path / "data"))
    owner = owned_repos.owner_identity("Multiframe Searcher")
    with session_for(settings, owner) as session:
        owned_repos.create_owned_repository(session, "mf-search", owner)
        repo = open_repository_as(session, owner, "mf-search")
        report = Importer(session.store, repo, workers=2, batch_size=8, writer=owner,
                          settings=settings).run([multi])
        assert report.failed == [] and len(report.frames) == 9
        [result] = search_files(session, repo, [query], k=3)
        top = result.hits[0]
        assert top.image_id == frame_image_id(repo, _digest(multi), 6)
        assert top.distance == 0.0 and result.complete is True
        meta = ImageMeta.from_record(top.image_id, top.meta, top.key_version)
        # the result names the instance and the frame
        assert (meta.name, meta.sop_uid, meta.frame, meta.frames) == (
            MULTI, str(pydicom.dcmread(multi, stop_before_pixels=True).SOPInstanceUID), 6, 10)
        assert meta.original_image_id == image_id_for(repo, _digest(multi))
        # the neighbours found next are other frames of the same instance
        assert {ImageMeta.from_record(h.image_id, h.meta).original_image_id
                for h in result.hits} == {meta.original_image_id}


def test_decoded_frames_match_the_single_frame_decoder() -> None:
    """decode_frames decodes the file once and gives what decode_image gives per frame."""
    from app.imaging.decode import decode_frames

    path = Path(get_testdata_file(MULTI_RLE))
    total, frames = decode_frames(path.read_bytes(), path.name, 512)
    decoded = list(frames)
    assert total == 10 and len(decoded) == 10
    for i in (0, 5, 9):
        np.testing.assert_array_equal(decoded[i].pixels, decode_image(path, i).pixels)
        assert decoded[i].clinical["Modality"] == "MR"
    total, frames = decode_frames(Path(get_testdata_file(SINGLE)).read_bytes(), SINGLE, 512)
    [only] = list(frames)
    assert total == 1
    np.testing.assert_array_equal(only.pixels, decode_image(get_testdata_file(SINGLE)).pixels)


def test_a_frames_original_is_the_instance_file_shown_at_that_frame(tmp_path: Path) -> None:
    """Through the facade: downloading a frame gives the instance's file (stored once,
    under frame 0's id), and viewing a frame decodes that frame of it."""
    from app.core import client as facade
    from app.core.client import Client

    settings = Settings(store="memory", data_dir=str(tmp_path / "owner"), workers=1)
    facade.create_identity(settings, "Dr. Frames", owned_repos.STRONG_PASSWORD)
    multi = _sample(MULTI, tmp_path / "in")
    with Client.unlock(settings, owned_repos.STRONG_PASSWORD) as client:
        repo = client.create_repository("frames")
        report = client.import_files(repo, [multi])
        assert report.failed == [] and len(report.frames) == 9
        frame_id = next(i for _, f, i in report.frames if f == 7)
        out = tmp_path / "out" / "frame-7.dcm"
        assert client.get_original(repo, frame_id, out) == multi.stat().st_size
        assert out.read_bytes() == multi.read_bytes()
        shown = client.fetch_image(repo, frame_id, MULTI)
        np.testing.assert_array_equal(shown.pixels, decode_image(multi, 7).pixels)
        first = client.fetch_image(repo, report.imported[0][1], MULTI)
        np.testing.assert_array_equal(first.pixels, decode_image(multi, 0).pixels)


def test_the_repository_check_accepts_frames_without_objects_of_their_own(
        tmp_path: Path) -> None:
    """A frame i > 0 has no original object: the check reads its metadata, finds the
    instance's file under frame 0's id, and reports no problem; a frame whose instance's
    object is gone is still reported."""
    from app.core.repo_check import MISSING_OBJECT, check_repository

    store, settings, owner, repo = _repo(tmp_path)
    multi = _sample(MULTI_RLE, tmp_path / "in")
    Importer(store, repo, workers=1, batch_size=4, writer=owner, settings=settings).run([multi])
    report = check_repository(store, settings, repo, read_data=True)
    assert report.ok, report.lines()
    assert report.counts["images"] == 10 and report.counts["originals read"] == 1
    first = image_id_for(repo, _digest(multi))
    store.delete(layout.object_key(repo.repo_id, first))
    report = check_repository(store, settings, repo)
    missing = {p.id for p in report.problems if p.kind == MISSING_OBJECT}
    assert missing == {frame_image_id(repo, _digest(multi), i) for i in range(10)}


def test_a_damaged_later_frame_keeps_the_good_ones_and_is_reported(tmp_path: Path) -> None:
    """Frame 7 of a 10-frame RLE file replaced by a segment that decodes to nothing: frames
    0 to 6 are indexed, the rest reported with the decoder's reason, the original kept."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(get_testdata_file(MULTI_RLE))
    frames = list(generate_frames(ds.PixelData, number_of_frames=10))
    frames[7] = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(64)
    ds.PixelData = encapsulate(frames)
    damaged = tmp_path / "in" / "damaged.dcm"
    damaged.parent.mkdir(parents=True)
    ds.save_as(damaged)
    store, settings, owner, repo = _repo(tmp_path)
    report = Importer(store, repo, workers=1, batch_size=4, writer=owner,
                      settings=settings).run([damaged])
    assert report.failed == [] and len(report.imported) == 1 and len(report.frames) == 6
    [(path, reason)] = report.frames_not_indexed
    assert path == str(damaged) and reason == (
        "frames 7 to 9 of 10 not indexed: frame 7: compressed pixel data is corrupt or "
        "cannot be decoded")
    assert _reader(store, settings, repo).image_ids() == {
        frame_image_id(repo, _digest(damaged), i) for i in range(7)}
