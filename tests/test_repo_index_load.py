"""Loading segments into the search service's index (cloud/repo_index.py, index_rows.py and
segment_download.py): the streaming reader, the cache files written with O_DIRECT, the
reused download buffers, the id de-duplication and the arrays that snapshots keep while
later refreshes append.

A small in-memory store stands in for S3 here, so that every chunking and every race
can be set up exactly; tests/test_service.py covers the same index over real HTTP S3.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud import index_rows, layout, segment_download
from cloud.codes import RowCodes
from cloud.index_rows import FileRows, SeenIds
from cloud.repo_index import RepoIndex, Snapshot
from cloud.segments import SegmentError, decode_segment, encode_segment, read_segment
from cloud.store import ObjectNotFound
from crypto.index import IndexKey
from crypto.tokens import EncryptedVectors

DIM = 16
REPO = "load-test"


class MemoryStore:
    """The part of cloud.store.ObjectStore that RepoIndex uses, in memory."""

    def __init__(self, chunk: int | None = None) -> None:
        self.objects: dict[str, bytes] = {}
        self.chunk = chunk  # overrides the chunk size the reader asks for
        self.vanish: set[str] = set()  # listed, but gone when downloaded

    def put(self, key: str, data: bytes) -> None:
        self.objects[key] = bytes(data)

    def delete(self, key: str) -> None:
        del self.objects[key]

    def list_objects(self, prefix: str) -> Iterator[tuple[str, int]]:
        return iter([(k, len(v)) for k, v in sorted(self.objects.items())
                     if k.startswith(prefix)])

    def list_keys(self, prefix: str) -> Iterator[str]:
        return (k for k, _ in self.list_objects(prefix))

    def _data(self, key: str) -> bytes:
        if key not in self.objects or key in self.vanish:
            raise ObjectNotFound(f"no object {key!r}")
        return self.objects[key]

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._data(key)[start : start + length]

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        data, size = self._data(key), self.chunk or chunk_size
        return (data[i : i + size] for i in range(0, len(data), size))


@pytest.fixture(scope="module")
def key() -> IndexKey:
    return IndexKey.generate(DIM, sample=np.random.default_rng(0).normal(size=(200, DIM)))


def _ids(n: int) -> list[str]:
    return [secrets.token_hex(16) for _ in range(n)]


def _put(store: MemoryStore, key: IndexKey, ids: list[str], data: np.ndarray,
         version: int = 1, seg_id: str | None = None) -> str:
    name = layout.segment_key(REPO, seg_id or layout.new_id())
    store.put(name, encode_segment(ids, key.encrypt(data), version))
    return name


def _buffer_of(size: int) -> memoryview:
    return memoryview(np.empty(size, np.uint8))


# --- the streaming reader ----------------------------------------------------------------


@pytest.fixture(scope="module")
def blob(key: IndexKey) -> bytes:
    data = np.random.default_rng(1).normal(size=(37, DIM))
    return encode_segment(_ids(37), key.encrypt(data), 3)


@pytest.mark.parametrize("chunk", [1, 7, 63, 64, 65, 1000, 1 << 20])
def test_read_segment_equals_decode_segment_whatever_the_chunks(blob: bytes,
                                                                chunk: int) -> None:
    chunks = [blob[i : i + chunk] for i in range(0, len(blob), chunk)]
    storage = np.empty(len(blob) + 100, np.uint8)  # a reused buffer may be larger
    seg = read_segment(chunks, "s", lambda size: memoryview(storage)[:size], len(blob))
    ref = decode_segment(blob, "s")
    assert seg.key_version == ref.key_version == 3
    assert seg.id_strings() == ref.id_strings()
    for got, want in zip((*seg.vectors.levels, seg.vectors.full),
                         (*ref.vectors.levels, ref.vectors.full), strict=True):
        assert np.array_equal(got, want)
        assert np.shares_memory(got, storage)  # views of the buffer, not copies


def _damaged(blob: bytes) -> dict[str, bytes]:
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1
    huge = bytearray(blob)
    struct.pack_into("<I", huge, 12, 9_999_999)
    count = bytearray(blob)
    count[12] ^= 0x04
    zero = bytearray(blob)
    struct.pack_into("<I", zero, 12, 0)
    body = bytearray(blob[:-32])
    full = decode_segment(blob).vectors.full
    struct.pack_into("<d", body, full.ctypes.data - np.frombuffer(blob, np.uint8).ctypes.data,
                     float("nan"))
    nan = bytes(body) + hashlib.sha256(body).digest()
    return {
        "empty": b"", "header only": blob[:20], "truncated": blob[:-100],
        "trailing": blob + b"\0", "bit flip": bytes(flipped), "bad magic": b"JUNK" + blob[4:],
        "huge count": bytes(huge), "flip count": bytes(count), "zero count": bytes(zero),
        "checksum": blob[:-1] + bytes([blob[-1] ^ 1]),
        "text": b"hello world, not a segment at all", "not finite": nan,
        "duplicate id": _with_duplicate_id(blob),
    }


def _with_duplicate_id(blob: bytes) -> bytes:
    body = bytearray(blob[:-32])
    body[64 + 16 : 64 + 32] = body[64:80]
    return bytes(body) + hashlib.sha256(body).digest()


@pytest.mark.parametrize("chunk", [1, 64, 4096])
@pytest.mark.parametrize("listed", [True, False])
def test_read_segment_rejects_what_decode_segment_rejects(blob: bytes, chunk: int,
                                                          listed: bool) -> None:
    for case, bad in _damaged(blob).items():
        with pytest.raises(SegmentError) as expected:
            decode_segment(bad, "segments/abc")
        chunks = [bad[i : i + chunk] for i in range(0, len(bad), chunk)]
        with pytest.raises(SegmentError) as got:
            read_segment(chunks, "segments/abc", _buffer_of, len(bad) if listed else None)
        assert "segments/abc" in str(got.value), case
        first_word = expected.value.reason.split()[0].rstrip(":")
        assert got.value.reason.split()[0].rstrip(":") == first_word, case


def test_listed_length_is_checked_before_allocating(blob: bytes) -> None:
    def never(size: int) -> memoryview:
        raise AssertionError("allocated for a segment of the wrong length")

    for length in (len(blob) - 1, len(blob) + 1, 0):
        with pytest.raises(SegmentError, match=r"truncated|trailing"):
            read_segment([blob], "s", never, length)


def test_an_overlong_stream_is_not_read_to_its_end(blob: bytes) -> None:
    read: list[int] = []

    def endless() -> Iterator[bytes]:
        for i in itertools.count():
            read.append(i)
            yield blob if i == 0 else b"\0" * 4096

    stream = endless()
    with pytest.raises(SegmentError, match="trailing"):
        read_segment(stream, "s", _buffer_of)
    assert len(read) == 2
    with pytest.raises(StopIteration):  # closed: the download's connection is released
        next(stream)


# --- cache files ---------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False])
def test_file_rows_views_stay_valid_while_rows_are_appended(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    monkeypatch.setattr(index_rows, "DIRECT_IO", direct)
    monkeypatch.setattr(index_rows, "STAGE_BYTES", 3 * 4096)  # many spills, odd offsets
    rng = np.random.default_rng(2)
    rows = FileRows(tmp_path / "a.f64", 7)
    written: list[np.ndarray] = []
    views: list[tuple[np.ndarray, np.ndarray]] = []
    for count in (1, 5, 300, 2, 1000, 3, 77):
        chunk = rng.normal(size=(count, 7))
        rows.append(chunk)
        written.append(chunk)
        expected = np.concatenate(written)
        view = rows.view()
        assert view.shape == expected.shape and np.array_equal(view, expected)
        views.append((view, expected))
    for view, expected in views:  # earlier snapshots read what they read before
        assert np.array_equal(view, expected)


def test_file_rows_fall_back_to_the_page_cache_when_direct_writes_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_rows, "STAGE_BYTES", 2 * 4096)
    rng = np.random.default_rng(3)
    rows = FileRows(tmp_path / "a.f64", 5)
    first = rng.normal(size=(300, 5))  # more than a stage: one direct write succeeds
    rows.append(first)
    real_pwrite = os.pwrite

    def refuse(fd: int, data: memoryview, offset: int) -> int:
        if rows._direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(index_rows.os, "pwrite", refuse)
    second = rng.normal(size=(400, 5))
    rows.append(second)
    assert not rows._direct
    third = rng.normal(size=(3, 5))
    rows.append(third)
    assert np.array_equal(rows.view(), np.concatenate([first, second, third]))


# --- de-duplication --------------------------------------------------------------------------


def test_seen_ids_compare_whole_ids_and_survive_merges() -> None:
    rng = np.random.default_rng(4)
    seen, rows, reference = SeenIds(), np.empty(0, "V16"), set()
    pool = [secrets.token_bytes(16) for _ in range(400)]
    twins = [pool[i][:8] + secrets.token_bytes(8) for i in range(0, 400, 7)]  # same 8 bytes
    pool += twins
    for _ in range(60):
        picked = [pool[i] for i in rng.choice(len(pool), rng.integers(1, 40), replace=False)]
        ids = np.frombuffer(b"".join(picked), "V16")
        keep = seen.unseen(ids, rows)
        assert keep.tolist() == [p not in reference for p in picked]
        fresh = ids[keep]
        seen.add(fresh, len(rows))
        rows = np.concatenate([rows, fresh])
        reference.update(bytes(i) for i in fresh)
    assert len(seen._runs) < 10


# --- the index ---------------------------------------------------------------------------


def _arrays(snapshot: Snapshot, version: int = 1) -> dict[str, np.ndarray]:
    served = snapshot.versions[version]
    index = served.index
    coded = index.full_codes
    out = {"full": np.array(index.full), "codes": np.array(coded.codes),
           "code_scales": np.hstack([coded.offset, coded.step, coded.slack, coded.size])}
    for i, level in enumerate(index.levels):
        out[f"level{i}"] = np.array(level)
    out["first32"] = np.array(index.first32)
    out["ids"] = np.array(list(served.image_ids))
    return out


def _expected(vectors: list[EncryptedVectors], ids: list[str]) -> dict[str, np.ndarray]:
    full = np.concatenate([v.full for v in vectors])
    coded = RowCodes.of(full)
    out = {"full": full, "codes": coded.codes, "ids": np.array(ids),
           "code_scales": np.hstack([coded.offset, coded.step, coded.slack, coded.size])}
    for i in range(len(vectors[0].levels)):
        out[f"level{i}"] = np.concatenate([v.levels[i] for v in vectors])
    out["first32"] = out["level0"].astype(np.float32)
    return out


def _same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert np.array_equal(got[name], want[name]), name


@pytest.mark.parametrize("cached", [True, False], ids=["cache files", "in memory"])
@pytest.mark.parametrize("chunk", [None, 1000])
def test_index_holds_every_image_once_and_old_snapshots_stay_intact(
        tmp_path: Path, key: IndexKey, cached: bool, chunk: int | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_rows, "STAGE_BYTES", 4 * 4096)
    monkeypatch.setattr(segment_download, "AHEAD_BYTES", 1)  # one segment ahead: buffers reused
    store = MemoryStore(chunk)
    index = RepoIndex(store, REPO, tmp_path if cached else None)  # type: ignore[arg-type]
    rng = np.random.default_rng(5)
    ids, data = _ids(300), rng.normal(size=(300, DIM))
    names = [_put(store, key, ids[a:b], data[a:b], seg_id=f"{i:032x}")
             for i, (a, b) in enumerate([(0, 40), (40, 41), (41, 120)])]
    # the same images again, partly and wholly: kept once
    _put(store, key, [ids[5], ids[130], ids[7]], data[[5, 130, 7]], seg_id=f"{3:032x}")
    _put(store, key, ids[41:120], data[41:120], seg_id=f"{4:032x}")
    first = index.refresh()
    # encryption is randomised: the expected rows are those of the first segment (in key
    # order) holding each image
    rows: dict[str, EncryptedVectors] = {}
    for name in sorted(store.objects):
        held = decode_segment(store.objects[name])
        for r, image in enumerate(held.id_strings()):
            rows.setdefault(image, EncryptedVectors(
                full=held.vectors.full[[r]], levels=tuple(a[[r]] for a in held.vectors.levels)))
    order = [ids[i] for i in [*range(120), 130]]
    want = _expected([rows[i] for i in order], order)
    before = _arrays(first)
    _same(before, want)
    assert (first.images, first.segments, first.rejected) == (121, 5, {})
    assert not [p for p in tmp_path.rglob("*") if not p.is_dir()]  # nothing left if killed

    # a refresh that grows every array past the room the first headers announced
    _put(store, key, ids[120:300], data[120:300], seg_id=f"{5:032x}")
    second = index.refresh()
    assert second.images == 121 + 179  # ids[130] was there already
    _same(_arrays(first), before)  # the first snapshot still reads the same values
    after = _arrays(second)
    for name, array in before.items():
        assert np.array_equal(after[name][: len(array)], array), name

    # a segment vanishes: rebuilt from the bucket
    store.delete(names[0])
    third = index.refresh()
    assert third.images == 300 - 40 + 2  # ids[5] and ids[7] are in segment 3 too
    assert set(third.versions[1].image_ids) == set(ids) - set(ids[:40]) | {ids[5], ids[7]}
    _same(_arrays(second), after)


def test_damaged_odd_and_vanished_segments_are_skipped(tmp_path: Path,
                                                       key: IndexKey) -> None:
    store = MemoryStore()
    index = RepoIndex(store, REPO, tmp_path)  # type: ignore[arg-type]
    rng = np.random.default_rng(6)
    ids, data = _ids(60), rng.normal(size=(60, DIM))
    _put(store, key, ids[:30], data[:30], seg_id="1" * 32)
    _put(store, key, ids[30:], data[30:], seg_id="2" * 32)
    bad = _put(store, key, _ids(10), rng.normal(size=(10, DIM)), seg_id="3" * 32)
    store.objects[bad] = store.objects[bad][:-1] + bytes([store.objects[bad][-1] ^ 1])
    other = IndexKey.generate(DIM, levels=(2, 4))
    odd = _put(store, other, _ids(5), rng.normal(size=(5, DIM)), seg_id="0" * 32)
    gone = _put(store, key, _ids(5), rng.normal(size=(5, DIM)), seg_id="4" * 32)
    store.vanish.add(gone)
    snapshot = index.refresh()
    assert snapshot.images == 60 and snapshot.segments == 2
    assert sorted(snapshot.rejected) == sorted([bad, odd])
    assert "checksum" in snapshot.rejected[bad] and "widths" in snapshot.rejected[odd]
    assert list(snapshot.versions[1].image_ids) == ids
    assert snapshot.versions[1].image_ids[-2:] == ids[-2:]
