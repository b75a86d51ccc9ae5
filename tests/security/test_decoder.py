"""Issue 11, item 7: untrusted image files cannot exhaust or take over the key-holding process.

Each test performs the attack on the real code: a deflated DICOM decompression bomb, a
deflated file that inflates beyond what its header declares, a header whose frames x samples
x bits are over the pixel limit, an image that passes every check but needs more memory to
decode than a decoder child may use, a hostile answer from a decoder child (a pickle that
would run code, garbage frames), and the death of the parent. No mocks: the decoder, the
worker protocol and the importer run as in the product; only the child *program* is replaced
where the attack is a hostile child.
"""

from __future__ import annotations

import ast
import io
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from app.core.importer import Importer
from app.imaging import worker as worker_module
from app.imaging.decode import MAX_PIXEL_BYTES, decode_image
from app.imaging.errors import ImageDecodeError
from app.imaging.features import EXTRACTOR_NAME
from app.imaging.worker import (
    DecoderPool,
    ProtocolError,
    read_frame,
    write_frame,
)
from cloud.store import ObjectStore

try:
    import e2e_support as support
    import owned_repos
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import owned_repos

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024**2


# --- building hostile files ---------------------------------------------------------------


def deflated_dicom(path: Path, rows: int, cols: int, frames: int = 1, *,
                   pixel_bytes: int | None = None, bits: int = 16) -> Path:
    """A Deflated Explicit VR Little Endian file (1.2.840.10008.1.2.1.99) whose pixel data
    is ``pixel_bytes`` zeros (default: exactly what rows x cols x frames x bits declare),
    deflated in a stream so that building a bomb costs this process no memory."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8"
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5.6.7.8"
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    size = rows * cols * frames * bits // 8 if pixel_bytes is None else pixel_bytes
    size += size % 2
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    meta_fp = DicomBytesIO()
    meta_fp.is_little_endian, meta_fp.is_implicit_VR = True, False
    write_file_meta_info(meta_fp, meta)
    out.write(meta_fp.getvalue())
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out.write(deflater.compress(header.getvalue()))
    out.write(deflater.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size)))
    zeros = bytes(MiB)
    left = size
    while left:
        n = min(left, MiB)
        out.write(deflater.compress(zeros[:n]))
        left -= n
    out.write(deflater.flush())
    path.write_bytes(out.getvalue())
    return path


def _rss_peak_during(fn: object) -> tuple[object, int]:
    """Run fn() and return its result and this process's peak RSS growth, sampled."""
    me = psutil.Process()
    base = me.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()  # type: ignore[operator]
    finally:
        stop.set()
        thread.join()
    return result, peak[0] - base


# --- bombs: refused before the memory is spent --------------------------------------------


def test_deflated_bomb_is_refused_by_the_import_and_the_parent_stays_small(
    moto_store: ObjectStore, tmp_path: Path
) -> None:
    """A 6000 x 6000 x 4-frame deflated file of zeros (about 280 KB: 288 MB inflated, within
    the pixel limit, and consistent with its header) is refused as a bomb; the images
    around it are imported, and the importing process never grows by more than a few
    tens of megabytes (the old code decoded it in-process: +600 MB)."""
    bomb = deflated_dicom(tmp_path / "bomb.dcm", 6000, 6000, 4)
    assert bomb.stat().st_size < 400_000
    good = support.copy_images(support.sample_images(2), tmp_path / "good")
    owner = owned_repos.owner_identity()
    repo = owned_repos.create_owned_repository(moto_store, "deflate-bomb", owner)
    importer = Importer(moto_store, repo, workers=2, batch_size=8, writer=owner)
    report, growth = _rss_peak_during(lambda: importer.run([*good, bomb]))
    assert [p for p, _ in report.failed] == [str(bomb)]  # type: ignore[attr-defined]
    reason = report.failed[0][1]  # type: ignore[attr-defined]
    assert str(bomb) in reason and "decompression bomb" in reason
    assert len(report.imported) == 2  # type: ignore[attr-defined]
    assert growth < 80 * MiB, f"the importing process grew by {growth // MiB} MiB"


def test_deflated_file_inflating_beyond_its_header_is_refused(tmp_path: Path) -> None:
    """A header that declares 64 x 64 pixels, followed by 40 MB: refused once the inflated
    data passes what the header declares (not after inflating it all)."""
    liar = deflated_dicom(tmp_path / "liar.dcm", 64, 64, pixel_bytes=40 * MiB)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(liar)
    assert info.value.path == str(liar)
    assert "more than its header declares" in info.value.reason


def test_honest_deflated_file_still_decodes(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    image = decode_image(get_testdata_file("image_dfl.dcm"))
    assert image.pixels.shape == (512, 512) and float(image.pixels.std()) > 0


def test_pixel_limit_counts_frames_samples_and_bits(tmp_path: Path) -> None:
    """rows x columns is small, but 3 samples x 16 bits x 20000 frames is 2.3 GB of pixel
    data: refused from the header, before any frame is decoded."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle_16bit_2frame.dcm"))
    ds.NumberOfFrames = 20000
    path = tmp_path / "frames.dcm"
    ds.save_as(path)
    declared = ds.Rows * ds.Columns * 3 * 2 * 20000
    assert declared > MAX_PIXEL_BYTES and ds.Rows * ds.Columns < 100_000_000
    with pytest.raises(ImageDecodeError) as info:
        decode_image(path)
    assert "too large" in info.value.reason and "20000 frame(s)" in info.value.reason
    assert "3 sample(s) of 16 bits" in info.value.reason


# --- the memory limit of the decoder child ---------------------------------------------------


def _big_png(path: Path) -> Path:
    """9000 x 9000 grey zeros: 79 KB, 81 megapixels (under the 100 megapixel limit), but
    decoding, features and the preview need about 1 GB."""
    Image.new("L", (9000, 9000)).save(path)
    return path


def test_a_child_over_its_memory_limit_fails_only_its_file(moto_store: ObjectStore,
                                                          tmp_path: Path) -> None:
    big = _big_png(tmp_path / "big.png")
    good = support.copy_images(support.sample_images(3), tmp_path / "good")
    owner = owned_repos.owner_identity()
    repo = owned_repos.create_owned_repository(moto_store, "memory-limit", owner)
    importer = Importer(moto_store, repo, workers=2, batch_size=8, memory_limit=400 * MiB,
                        writer=owner)
    report, growth = _rss_peak_during(lambda: importer.run([good[0], big, *good[1:]]))
    assert [p for p, _ in report.failed] == [str(big)]  # type: ignore[attr-defined]
    assert "the decoder ran out of its memory limit of 400 MiB" in report.failed[0][1]  # type: ignore[attr-defined]
    assert len(report.imported) == 3  # type: ignore[attr-defined]
    assert growth < 80 * MiB


@pytest.mark.parametrize("kind", ["rlimit", "watchdog"])
def test_memory_limit_by_rlimit_or_watchdog_and_the_child_is_replaced(
    tmp_path: Path, kind: str
) -> None:
    """RLIMIT_AS (Linux) or the psutil RSS watchdog (elsewhere, forced here): the file is
    reported, the child is replaced, and the next file decodes."""
    big = _big_png(tmp_path / "big.png")
    small = support.sample_images(1)[0]
    with DecoderPool(1, memory_limit=400 * MiB, limit_kind=kind) as pool:
        first = pool.pids
        with pytest.raises(ImageDecodeError) as info:
            pool.analyse(big, extractor=EXTRACTOR_NAME, preview=True)
        assert info.value.path == str(big)
        assert info.value.reason.startswith("the decoder ran out of its memory limit")
        assert all(support.wait_gone(pid, timeout=5) for pid in first)
        features = pool.features(small, EXTRACTOR_NAME)
        assert features.shape == (128,) and pool.pids and pool.pids != first


# --- no pickle, and a hostile child cannot take over the parent ------------------------------


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_decoder_protocol_imports_no_pickle() -> None:
    for path in (ROOT / "app/imaging/worker.py", ROOT / "app/core/importer.py",
                 ROOT / "app/core/searcher.py"):
        assert not _imports(path) & {"pickle", "marshal", "shelve", "dill", "cloudpickle"}, path


def _frame(header: bytes, body: bytes = b"", magic: bytes = b"RCW1",
           sizes: tuple[int, int] | None = None) -> io.BytesIO:
    h, b = sizes or (len(header), len(body))
    return io.BytesIO(struct.pack("<4sII", magic, h, b) + header + body)


@pytest.mark.parametrize("stream", [
    pytest.param(lambda m: io.BytesIO(__import__("pickle").dumps(_Exploit(m))), id="pickle"),
    pytest.param(lambda m: _frame(b'{"ok":true}', magic=b"\x80\x04\x95\x00"), id="bad-magic"),
    pytest.param(lambda m: _frame(b"x" * 10, sizes=(2**31, 0)), id="huge-header"),
    pytest.param(lambda m: _frame(b"{}", sizes=(2, 2**32 - 1)), id="huge-body"),
    pytest.param(lambda m: _frame(b"[1, 2]"), id="not-an-object"),
    pytest.param(lambda m: _frame(b'{"ok": NaN}'), id="nan"),
    pytest.param(lambda m: _frame(b"\xff\xfe"), id="not-utf8"),
    pytest.param(lambda m: _frame(b'{"parts": [["a", 5]]}', b"abc"), id="parts-too-long"),
    pytest.param(lambda m: _frame(b'{"parts": [["a", 1], ["a", 1]]}', b"ab"), id="dup-part"),
    pytest.param(lambda m: _frame(b'{"parts": [[1, -1]]}'), id="bad-part"),
])
def test_garbage_answer_frames_raise_a_clean_error(tmp_path: Path, stream: object) -> None:
    marker = tmp_path / "owned"
    with pytest.raises((ProtocolError, EOFError)):
        read_frame(stream(marker))  # type: ignore[operator]
    assert not marker.exists()


class _Exploit:
    """Unpickling this runs code: what a compromised decoder could send a pickle reader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


_HOSTILE_CHILD = """
import os, pickle, sys
from app.imaging.worker import read_frame, write_frame
requests, answers = sys.stdin.buffer, sys.stdout.buffer
read_frame(requests)
write_frame(answers, {"ok": True, "ready": True})
read_frame(requests)
class Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + MARKER,))
answers.write(pickle.dumps(Exploit()))
answers.flush()
read_frame(requests)
"""


def test_a_hostile_child_cannot_run_code_in_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decoder child taken over by a file answers with a pickle that would run a command:
    the parent reports the file as unreadable, runs nothing, and replaces the child."""
    marker = tmp_path / "owned"
    program = f"MARKER = {str(marker)!r}\n" + _HOSTILE_CHILD
    monkeypatch.setattr(worker_module, "child_command",
                        lambda *_: [sys.executable, "-c", program])
    image = support.sample_images(1)[0]
    with DecoderPool(1) as pool:
        first = pool.pids
        with pytest.raises(ImageDecodeError) as info:
            pool.analyse(image, extractor=EXTRACTOR_NAME)
        assert "broke the protocol" in info.value.reason and info.value.path == str(image)
        assert pool.pids != first
    assert not marker.exists()


_NOISY_CHILD = """
import os, sys
import app.imaging.worker as w
handle = w._Child.handle
def noisy(self, header):
    print("a library talking on stdout")
    sys.stdout.flush()
    os.write(1, b"RCW1 raw bytes on fd 1")
    return handle(self, header)
w._Child.handle = noisy
sys.exit(w.main(sys.argv[1:]))
"""


def test_a_child_printing_cannot_corrupt_its_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "child_command",
                        lambda limit, kind: [sys.executable, "-c", _NOISY_CHILD,
                                             "--memory-limit", str(limit)])
    image = support.sample_images(1)[0]
    with DecoderPool(1) as pool:
        reference = pool.features(image, EXTRACTOR_NAME)
        again = pool.features(image, EXTRACTOR_NAME)
    from app.imaging.features import features_of_file

    np.testing.assert_array_equal(reference, again)
    np.testing.assert_array_equal(reference, features_of_file(image))


def test_frames_round_trip() -> None:
    buffer = io.BytesIO()
    write_frame(buffer, {"ok": True, "tags": {"Modality": "CT"}}, [("a", b"xyz"), ("b", b"")])
    buffer.seek(0)
    header, parts = read_frame(buffer)
    assert header == {"ok": True, "tags": {"Modality": "CT"}}
    assert parts == {"a": b"xyz", "b": b""}


# --- the child's lifetime ---------------------------------------------------------------------


def test_children_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from app.imaging.worker import DecoderPool\n"
        "pool = DecoderPool(2)\n"
        "pool.wait_ready()\n"
        "print(' '.join(str(pid) for pid in pool.pids), flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and not any(support.pid_gone(p) for p in pids)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert all(support.wait_gone(pid, timeout=5) for pid in pids)


def test_children_ignore_ctrl_c() -> None:
    image = support.sample_images(1)[0]
    with DecoderPool(1) as pool:
        pool.wait_ready()
        (pid,) = pool.pids
        os.kill(pid, signal.SIGINT)
        time.sleep(0.2)
        assert pool.features(image, EXTRACTOR_NAME).shape == (128,)
        assert pool.pids == [pid]


def test_the_child_loads_only_the_imaging_package() -> None:
    """No keys, store clients or crypto in a decoder child: it imports app.imaging only."""
    probe = (
        "import sys\n"
        "import app.imaging.worker, app.imaging.decode, app.imaging.features\n"
        "import app.imaging.thumbnail\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('crypto', 'cloud', 'boto3', 'botocore', 'Cryptodome', 'pickle5')"
        " or m.startswith(('app.core', 'app.gui')))\n"
        "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
