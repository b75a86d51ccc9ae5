"""Decode untrusted image files in memory-limited child processes: ``python -m app.imaging.worker``.

Why: decoders (pydicom, Pillow, OpenJPEG, zlib) run on files dragged in from anywhere, and the
process that imports or searches holds the repository's keys. A decompression bomb, or an
exploit of a decoder, must cost at most one child: so every untrusted file is decoded here, in
a child that

* has a memory limit (``RLIMIT_AS`` set by the child itself before it decodes anything, on
  Linux; elsewhere a file-size check before decoding and an RSS watchdog in the parent,
  through psutil); a child that exceeds it is killed or fails its allocation, is replaced,
  and the file is reported as "the decoder ran out of its memory limit";
* talks without pickle: every message is one frame, a fixed 12-byte head (``RCW1``, the
  JSON header's length and the body's length, little endian), a JSON object, then the raw
  bytes of the parts the header lists by name and length (features as little-endian
  float64, the preview PNG, pixels as little-endian float32). The parent checks every field
  of an answer; a child can lie about a file's features, never run code in the parent;
* imports only the imaging package (it starts in about a third of a second), ignores Ctrl-C
  (the parent's to handle), ends when its stdin closes (at ``close()``, or when the parent
  dies, however it dies), and writes its answers to a private copy of stdout, stdout itself
  going to stderr, so nothing a library prints can corrupt an answer.

The parent side is :class:`DecoderPool`: one child per concurrent caller, started at once,
replaced when one dies. Files it cannot read raise :class:`ImageDecodeError` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from app.imaging.errors import ImageDecodeError

if TYPE_CHECKING:
    import numpy as np

    from app.imaging.decode import DecodedImage

DEFAULT_MEMORY_LIMIT = 2 * 1024**3
"""Address space (Linux) or resident memory (elsewhere) a decoder child may use."""

MEMORY_LIMIT_ENV = "RADCRYPT_DECODER_MEMORY"
"""Environment variable overriding DEFAULT_MEMORY_LIMIT: bytes, or a number with K, M or G."""

DEFAULT_TIMEOUT = 300.0
"""Seconds one file may take before its child is killed and the file reported."""

OUT_OF_MEMORY = "the decoder ran out of its memory limit"
DIED = "the decoder's process died"
FAILED = "the decoder failed unexpectedly"
"""The reason's start when the child raised something other than ImageDecodeError: the file
is refused all the same, but it is a bug of the decoder (the file fuzzer fails on it)."""

MAGIC = b"RCW1"
_HEAD = struct.Struct("<4sII")
MAX_HEADER_BYTES = 1 << 20
MAX_ANSWER_BYTES = 4 * 1024**3 - 1  # decoded pixels of the largest accepted frame fit
MAX_REQUEST_BYTES = 1 << 20

_SOURCE_FORMATS = frozenset({"dicom", "png", "jpeg", "tiff"})
_VOI_FUNCTIONS = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})
_PNG = b"\x89PNG\r\n\x1a\n"
_WARNING_ACTIONS = frozenset({"default", "error", "ignore", "always", "all", "module", "once"})

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- frames


class ProtocolError(Exception):
    """A frame that is not what the protocol allows (the peer is broken or hostile)."""


def write_frame(stream: IO[bytes], header: dict[str, Any],
                parts: Sequence[tuple[str, bytes]] = ()) -> None:
    """Write one frame: head, JSON header (with the parts' names and sizes), parts."""
    head = dict(header)
    head["parts"] = [[name, len(data)] for name, data in parts]
    encoded = json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
    body = sum(len(data) for _, data in parts)
    stream.write(_HEAD.pack(MAGIC, len(encoded), body))
    stream.write(encoded)
    for _, data in parts:
        stream.write(data)
    stream.flush()


_IN_PLACE = 1 << 20  # parts at least this large are read into one buffer, not joined


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    """``size`` bytes. A large part (decoded pixels) is read straight into one bytearray
    (a single copy out of the pipe, and numpy can use it in place: _array), instead of
    pieces joined into a second copy."""
    if size >= _IN_PLACE and hasattr(stream, "readinto"):
        buffer = bytearray(size)
        view = memoryview(buffer)
        done = 0
        while done < size:
            got = stream.readinto(view[done:done + (1 << 24)])
            if not got:
                raise EOFError("the stream ended inside a frame")
            done += got
        return buffer  # type: ignore[return-value]  # bytes-like, and writable
    chunks = []
    left = size
    while left:
        chunk = stream.read(min(left, 1 << 24))
        if not chunk:
            raise EOFError("the stream ended inside a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(stream: IO[bytes], max_body: int = MAX_ANSWER_BYTES
               ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Read one frame: its JSON header (an object) and its parts by name.

    Raises EOFError when the stream ends (between frames or inside one) and ProtocolError
    for anything malformed: bad magic, oversized header or body, a header that is not a JSON
    object, part sizes that do not add up, duplicate or non-string part names.
    """
    raw = stream.read(_HEAD.size)
    if not raw:
        raise EOFError("the stream ended")
    if len(raw) < _HEAD.size:
        raw += _read_exact(stream, _HEAD.size - len(raw))
    magic, header_size, body_size = _HEAD.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError("not a decoder frame (bad magic)")
    if header_size > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {header_size} bytes is too large")
    if body_size > max_body:
        raise ProtocolError(f"frame body of {body_size} bytes is too large")
    try:
        header = json.loads(_read_exact(stream, header_size).decode("utf-8"),
                            parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not a JSON object")
    listed = header.pop("parts", [])
    if not isinstance(listed, list):
        raise ProtocolError("frame parts are not a list")
    sizes: list[tuple[str, int]] = []
    for item in listed:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or type(item[1]) is not int or item[1] < 0):
            raise ProtocolError("a frame part is not [name, size]")
        sizes.append((item[0], item[1]))
    if len({name for name, _ in sizes}) != len(sizes):
        raise ProtocolError("frame parts repeat a name")
    if sum(size for _, size in sizes) != body_size:
        raise ProtocolError("frame part sizes do not add up to its body")
    parts = {name: _read_exact(stream, size) for name, size in sizes}
    return header, parts


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Analysis:
    """What the encrypting side needs of a decoded image: features, preview, a few tags."""

    features: np.ndarray
    thumbnail: bytes | None  # the preview PNG, when asked for
    source_format: str
    tags: dict[str, Any]
    rows: int
    columns: int
    clinical: dict[str, str] = field(default_factory=dict)  # DICOM only (clinical.py)


@dataclass(frozen=True)
class FrameAnalyses:
    """The analyses of a file's frames: one per frame indexed, in frame order.

    ``total`` is the instance's frame count (1 for PNG, JPEG, TIFF and single-frame DICOM);
    ``frames`` holds the first ``min(total, max_frames)`` of them, fewer when a frame
    failed to decode: ``error`` then says why the frames after ``len(frames)`` are missing.
    """

    frames: list[Analysis]
    total: int
    error: str = ""


def analyse(image: DecodedImage, extractor: str, preview: bool) -> Analysis:
    """Features (float64), preview and tags of a decoded image (in whichever process)."""
    import numpy as np

    from app.imaging.features import get_extractor
    from app.imaging.thumbnail import make_thumbnail_png

    features = np.asarray(get_extractor(extractor)(image), dtype=np.float64)
    return Analysis(features, make_thumbnail_png(image) if preview else None,
                    image.source_format, dict(image.metadata), int(image.pixels.shape[0]),
                    int(image.pixels.shape[1]), dict(image.clinical))


def analyse_frames(data: bytes, name: str, extractor: str, preview: bool,
                   max_frames: int) -> FrameAnalyses:
    """Every frame of a file, analysed one after the other (in whichever process).

    The first frame failing fails the file (ImageDecodeError), as a single-frame file
    would; a later one ends the list there, its reason kept in ``error``, so a cine loop
    with one damaged frame still has its good frames searchable and the loss is reported.
    """
    from app.imaging.decode import decode_frames

    total, frames = decode_frames(data, name, max_frames)
    out: list[Analysis] = []
    while True:
        try:
            image = next(frames)
        except StopIteration:
            return FrameAnalyses(out, total)
        except ImageDecodeError as exc:
            if not out:
                raise
            return FrameAnalyses(out, total, f"frame {len(out)}: {exc.reason}")
        out.append(analyse(image, extractor, preview))


# ----------------------------------------------------------------------------- the child


def parse_size(text: str) -> int:
    """Bytes from "2147483648", "2G", "512M" or "0" (no limit)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    value = int(float(number) * scale)
    if value < 0:
        raise ValueError(f"negative size {text!r}")
    return value


def default_memory_limit() -> int:
    """DEFAULT_MEMORY_LIMIT, or what RADCRYPT_DECODER_MEMORY says (0: no limit)."""
    raw = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if not raw:
        return DEFAULT_MEMORY_LIMIT
    try:
        return parse_size(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not a size", MEMORY_LIMIT_ENV, raw)
        return DEFAULT_MEMORY_LIMIT


def _limit_address_space(limit: int) -> bool:
    """RLIMIT_AS for this process (the child), lowered only; False where unavailable."""
    try:
        import resource
    except ImportError:
        return False
    if not hasattr(resource, "RLIMIT_AS"):
        return False
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return True


def keep_freed_memory() -> bool:
    """glibc: keep freed memory for the next file instead of returning it to the kernel.

    Every file allocates the same few arrays of megabytes (the pixels, the display image,
    running sums) and frees them. With glibc's defaults the top of the heap is trimmed
    and large blocks are mmapped, so each file faulted its arrays' pages in afresh: a
    third of a child's CPU time per 512 x 512 image went to the kernel. Blocks up to
    32 MiB now come from the heap, and up to 256 MiB of free heap is kept. The address
    space limit (RLIMIT_AS) still bounds what a file can take. False where there is no
    mallopt (not glibc): nothing changes there."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all([mallopt(m_mmap_threshold, 32 << 20) == 1,
                mallopt(m_trim_threshold, 256 << 20) == 1,
                mallopt(m_top_pad, 16 << 20) == 1])


def _apply_setup(header: dict[str, Any]) -> None:
    """Be as quiet as the parent: pydicom's log level and the parent's warning filters
    (sent as plain values; a category this process has not imported is skipped)."""
    import builtins

    level = header.get("pydicom_level")
    if type(level) is int:
        logging.getLogger("pydicom").setLevel(level)
    filters = header.get("warning_filters")
    if not isinstance(filters, list):
        return
    for item in reversed(filters):
        with contextlib.suppress(Exception):
            action, message, module_name, qualname, module, lineno = item
            owner: Any = builtins if module_name == "builtins" else sys.modules[module_name]
            category = owner
            for part in str(qualname).split("."):
                category = getattr(category, part)
            if (action in _WARNING_ACTIONS and isinstance(category, type)
                    and issubclass(category, Warning)):
                warnings.filterwarnings(action, str(message), category, str(module),
                                        int(lineno))


class _Child:
    """The child's side: one request at a time, answered in order."""

    def __init__(self, limit: int, limit_kind: str) -> None:
        self.limit = limit
        self.limit_kind = limit_kind

    def handle(self, header: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
        op = header.get("op")
        path, name = header.get("path"), header.get("name")
        if not isinstance(path, str) or not isinstance(name, str):
            return {"ok": False, "kind": "request", "reason": "path and name must be text"}, []
        try:
            if op == "analyse":
                return self._analyse(header, path, name)
            if op == "decode":
                return self._decode(header, path, name)
            return {"ok": False, "kind": "request", "reason": f"unknown operation {op!r}"}, []
        except ImageDecodeError as exc:
            if isinstance(exc.__cause__, MemoryError):
                return self.out_of_memory(), []
            return {"ok": False, "kind": "decode", "reason": exc.reason}, []
        except MemoryError:
            return self.out_of_memory(), []
        except Exception as exc:  # the parent decides what is the file's fault
            from app.imaging.decode import short

            return {"ok": False, "kind": "error", "reason": short(exc)}, []

    def out_of_memory(self) -> dict[str, Any]:
        """The answer for a failed allocation; the child then retires (its heap may be in
        pieces) and the parent starts another."""
        reason = f"{OUT_OF_MEMORY} of {self.limit // 1024**2} MiB" if self.limit else (
            "the decoder ran out of memory")
        return {"ok": False, "kind": "memory", "reason": reason, "retire": True}

    def _read(self, path: str, name: str, digest: str | None) -> DecodedImage:
        from app.imaging.decode import decode_bytes, decode_image

        if digest is None:
            self._check_size(path, name)
            return decode_image(path)
        return decode_bytes(self._bytes(path, name, digest), path)

    def _bytes(self, path: str, name: str, digest: str | None) -> bytes:
        """The file's content, checked against the digest the parent hashed (when given)."""
        self._check_size(path, name)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ImageDecodeError(name, f"cannot read the file ({exc.strerror or exc})"
                                   ) from exc
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            raise ImageDecodeError(name, "the file changed while it was being imported")
        return data

    def _check_size(self, path: str, name: str) -> None:
        from app.imaging.decode import MAX_FILE_BYTES

        if self.limit and self.limit_kind != "rlimit":
            # without an address-space limit, refuse what cannot fit before reading it
            try:
                size = os.stat(path).st_size
            except OSError:
                size = 0
            if size > min(MAX_FILE_BYTES, self.limit // 3):
                raise ImageDecodeError(
                    name, f"file of {size // 1024**2} MiB is too large for the decoder's "
                    f"memory limit of {self.limit // 1024**2} MiB")

    def _analyse(self, header: dict[str, Any], path: str, name: str
                 ) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
        import numpy as np

        digest = header.get("sha256")
        extractor = header.get("extractor")
        if not isinstance(extractor, str) or not (digest is None or isinstance(digest, str)):
            return {"ok": False, "kind": "request", "reason": "bad analyse request"}, []
        max_frames = header.get("max_frames")
        if max_frames is not None:
            if type(max_frames) is not int or max_frames < 1:
                return {"ok": False, "kind": "request", "reason": "bad analyse request"}, []
            return self._analyse_frames(path, name, digest, extractor,
                                        bool(header.get("preview")), max_frames)
        image = self._read(path, name, digest)
        result = analyse(image, extractor, bool(header.get("preview")))
        parts = [("features", np.ascontiguousarray(result.features, dtype="<f8").tobytes())]
        if result.thumbnail is not None:
            parts.append(("thumbnail", result.thumbnail))
        answer = {"ok": True, "source_format": result.source_format,
                  "tags": {str(k): str(v) for k, v in result.tags.items()},
                  "rows": result.rows, "columns": result.columns}
        return answer, parts

    def _analyse_frames(self, path: str, name: str, digest: str | None, extractor: str,
                        preview: bool, max_frames: int
                        ) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
        """Every frame's features (one part, frame after frame) and previews ("thumbnail"
        for frame 0, "thumbnail.<i>" after); the instance's clinical attributes once, and
        per later frame only what differs from frame 0's (its position)."""
        import numpy as np

        result = analyse_frames(self._bytes(path, name, digest), name, extractor, preview,
                                max_frames)
        first = result.frames[0]
        features = np.stack([a.features for a in result.frames])
        parts = [("features", np.ascontiguousarray(features, dtype="<f8").tobytes())]
        for index, analysis in enumerate(result.frames):
            if analysis.thumbnail is not None:
                parts.append(("thumbnail" if index == 0 else f"thumbnail.{index}",
                              analysis.thumbnail))
        answer = {"ok": True, "source_format": first.source_format,
                  "tags": {str(k): str(v) for k, v in first.tags.items()},
                  "rows": first.rows, "columns": first.columns,
                  "clinical": dict(first.clinical), "total_frames": result.total,
                  "frames": len(result.frames), "frames_error": result.error,
                  "frame_clinical": [
                      {k: v for k, v in a.clinical.items() if first.clinical.get(k) != v}
                      for a in result.frames[1:]]}
        return answer, parts

    def _decode(self, header: dict[str, Any], path: str, name: str
                ) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
        import numpy as np

        from app.imaging.decode import decode_image

        frame = header.get("frame")
        if frame is not None and type(frame) is not int:
            return {"ok": False, "kind": "request", "reason": "frame must be an integer"}, []
        image = decode_image(path, frame)
        if header.get("display"):
            shown = np.ascontiguousarray(image.display(), dtype=np.uint8)
            return {"ok": True, "shape": list(shown.shape)}, [("display", shown.tobytes())]
        parts = [("pixels", np.ascontiguousarray(image.pixels, dtype="<f4").tobytes())]
        if image.voi_lut_image is not None:
            parts.append(("voi_lut",
                          np.ascontiguousarray(image.voi_lut_image, dtype="<f4").tobytes()))
        answer = {
            "ok": True, "shape": list(image.pixels.shape), "source_format": image.source_format,
            "window": list(image.window) if image.window is not None else None,
            "monochrome1": image.monochrome1, "n_frames": image.n_frames,
            "metadata": {str(k): str(v) for k, v in image.metadata.items()},
            "display_tags": {str(k): str(v) for k, v in image.display_tags.items()},
            "clinical": {str(k): str(v) for k, v in image.clinical.items()},
            "voi_function": image.voi_function,
            "display_range": (list(image.display_range) if image.display_range is not None
                              else None),
            "voi_lut_shape": (list(image.voi_lut_image.shape)
                              if image.voi_lut_image is not None else None),
        }
        return answer, parts


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m app.imaging.worker [--memory-limit N] [--limit-kind K]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m app.imaging.worker",
                                     description="Decode image files for a parent process.")
    parser.add_argument("--memory-limit", type=parse_size, default=None,
                        help=f"bytes (or 512M, 2G); 0 for none; default {MEMORY_LIMIT_ENV} "
                             "or 2G")
    parser.add_argument("--limit-kind", choices=("rlimit", "watchdog"), default=None,
                        help="how the limit is enforced: RLIMIT_AS here (Linux default) or "
                             "by the parent's RSS watchdog")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    keep_freed_memory()
    requests = sys.stdin.buffer
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print goes to stderr, never into an answer
    try:
        setup, _ = read_frame(requests, MAX_REQUEST_BYTES)
    except (EOFError, ProtocolError, OSError):
        return 0
    # imported before the limit applies, so the limit is what decoding may add
    import numpy  # noqa: F401
    import pydicom  # noqa: F401  (its import sets its logger's level: the parent's comes after)

    import app.imaging.decode
    import app.imaging.features
    import app.imaging.thumbnail

    # single-threaded: GDCM may decode in a fork of this process, its stderr silenced
    app.imaging.decode.IN_DECODER_CHILD = True
    _apply_setup(setup)
    limit = default_memory_limit() if args.memory_limit is None else args.memory_limit
    kind = args.limit_kind or ("rlimit" if sys.platform.startswith("linux") else "watchdog")
    if limit and kind == "rlimit" and not _limit_address_space(limit):
        kind = "watchdog"
    child = _Child(limit, kind)
    try:
        write_frame(answers, {"ok": True, "ready": True, "pid": os.getpid(),
                              "limit": limit, "limit_kind": kind})
    except OSError:  # the parent is gone already
        return 0
    while True:
        try:
            request, _ = read_frame(requests, MAX_REQUEST_BYTES)
        except (EOFError, OSError):
            return 0
        except ProtocolError as exc:
            with contextlib.suppress(OSError):
                write_frame(answers, {"ok": False, "kind": "request", "reason": str(exc)})
            return 1
        try:
            answer, parts = child.handle(request)
        except MemoryError:
            answer, parts = child.out_of_memory(), []
        try:
            write_frame(answers, answer, parts)
        except MemoryError:
            answer = child.out_of_memory()
            with contextlib.suppress(Exception):
                write_frame(answers, answer)
        except OSError:
            return 0
        if answer.get("retire"):
            return 0


# ----------------------------------------------------------------------------- the parent


class DecoderUnavailable(RuntimeError):
    """Decoder children cannot start here (no interpreter, or they die while starting)."""


class _Died(Exception):
    """The child working on a request died or broke the protocol."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _project_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def child_command(memory_limit: int, limit_kind: str) -> list[str]:
    """How a child starts: this interpreter, running this module."""
    return [sys.executable, "-m", "app.imaging.worker", "--memory-limit", str(memory_limit),
            "--limit-kind", limit_kind]


def _setup_header() -> dict[str, Any]:
    level = logging.getLogger("pydicom").level if "pydicom" in sys.modules else None
    filters = []
    for action, message, category, module, lineno in warnings.filters:
        filters.append([action, getattr(message, "pattern", message) or "",
                        getattr(category, "__module__", ""),
                        getattr(category, "__qualname__", ""),
                        getattr(module, "pattern", module) or "", lineno])
    return {"op": "setup", "pydicom_level": level, "warning_filters": filters}


class Worker:
    """One decoder child, used by one caller at a time."""

    def __init__(self, memory_limit: int, limit_kind: str,
                 command: list[str] | None = None) -> None:
        if not sys.executable and command is None:
            raise DecoderUnavailable("no Python interpreter to start")
        root = _project_root()
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                    else "")
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"  # one file at a time per child; threads only reserve memory
        self.memory_limit = memory_limit
        self.limit_kind = limit_kind
        try:
            self.process = subprocess.Popen(
                command or child_command(memory_limit, limit_kind), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, close_fds=True, cwd=root, env=env)
        except OSError as exc:
            raise DecoderUnavailable(f"cannot start the decoder process ({exc})") from exc
        assert self.process.stdin is not None and self.process.stdout is not None
        self._requests, self._answers = self.process.stdin, self.process.stdout
        self._ready = False
        self.started = time.monotonic()
        self.busy_since: float | None = None
        self.killed_for: str | None = None  # set by the pool's watchdog
        with contextlib.suppress(OSError):
            write_frame(self._requests, _setup_header())

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self) -> None:
        if self._ready:
            return
        try:
            header, _ = read_frame(self._answers, MAX_HEADER_BYTES)
        except (OSError, EOFError, ProtocolError) as exc:
            raise DecoderUnavailable(
                f"the decoder process died while starting ({self._exit_text()})") from exc
        if header.get("ready") is not True:
            raise DecoderUnavailable("the decoder process did not start properly")
        self._ready = True

    def call(self, request: dict[str, Any], max_body: int
             ) -> tuple[dict[str, Any], dict[str, bytes]]:
        self.wait_ready()
        self.busy_since = time.monotonic()
        try:
            write_frame(self._requests, request)
            header, parts = read_frame(self._answers, max_body)
        except (OSError, EOFError) as exc:
            raise _Died(self._death_reason()) from exc
        except ProtocolError as exc:
            raise _Died(f"{DIED} (it broke the protocol: {exc})") from None
        finally:
            self.busy_since = None
        if header.get("ok") is not True and header.get("ok") is not False:
            raise _Died(f"{DIED} (it sent an answer without a status)")
        return header, parts

    def _exit_text(self) -> str:
        try:
            code = self.process.wait(2.0)
        except subprocess.TimeoutExpired:
            return "still running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
            return f"killed by signal {-code}"
        return f"exit code {code}"

    def _death_reason(self) -> str:
        text = self._exit_text()
        if self.killed_for:
            return self.killed_for
        if self.memory_limit and text == "killed by SIGKILL":  # the kernel's OOM killer
            return f"{OUT_OF_MEMORY} of {self.memory_limit // 1024**2} MiB ({text})"
        return f"{DIED} ({text})"

    def rss(self) -> int | None:
        try:
            import psutil

            return int(psutil.Process(self.pid).memory_info().rss)
        except Exception:
            return None

    def kill(self, reason: str) -> None:
        self.killed_for = reason
        with contextlib.suppress(OSError):
            self.process.kill()

    def close(self, timeout: float = 5.0) -> None:
        """End of input: the child exits (closing its answers first means it can never
        block writing one)."""
        for stream in (self._requests, self._answers):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class DecoderPool:
    """Decoder children for concurrent callers: one per caller at a time, ``size`` started
    at once, more on demand, a dead one replaced.

    ``memory_limit``: bytes per child (None: RADCRYPT_DECODER_MEMORY or 2 GiB; 0: none).
    ``limit_kind``: "rlimit" (RLIMIT_AS in the child; the default on Linux) or "watchdog"
    (the parent polls each busy child's RSS through psutil and kills it over the limit).
    ``timeout``: seconds per file before its child is killed.
    """

    size: int = 1
    memory_limit: int | None = None
    limit_kind: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    _idle: list[Worker] = field(default_factory=list, init=False, repr=False)
    _all: list[Worker] = field(default_factory=list, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)
    _monitor: threading.Thread | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.memory_limit is None:
            self.memory_limit = default_memory_limit()
        if self.limit_kind is None:
            self.limit_kind = "rlimit" if sys.platform.startswith("linux") else "watchdog"
        if self.limit_kind not in ("rlimit", "watchdog"):
            raise ValueError(f"unknown limit kind {self.limit_kind!r}")
        try:
            for _ in range(max(1, self.size)):
                self._all.append(self._start())
            self._idle = list(self._all)
        except DecoderUnavailable:
            self.close()
            raise
        self._monitor = threading.Thread(target=self._watch, name="radcrypt-decoder-watch",
                                         daemon=True)
        self._monitor.start()

    def _start(self) -> Worker:
        assert self.memory_limit is not None and self.limit_kind is not None
        return Worker(self.memory_limit, self.limit_kind)

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._all]

    def wait_ready(self) -> None:
        """Wait until the children started now have loaded the decoders."""
        for worker in list(self._all):
            worker.wait_ready()

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take(self) -> Worker:
        with self._lock:
            if self._closed:
                raise DecoderUnavailable("the decoder pool is closed")
            if self._idle:
                return self._idle.pop()
        worker = self._start()
        with self._lock:
            self._all.append(worker)
        return worker

    def _give_back(self, worker: Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                return
        worker.close(timeout=1.0)

    def _drop(self, worker: Worker) -> None:
        with self._lock:
            with contextlib.suppress(ValueError):
                self._all.remove(worker)
        worker.close(timeout=1.0)

    def _watch(self) -> None:
        """Kill a child over its time, or (watchdog kind) over its memory limit."""
        while not self._closed:
            time.sleep(0.05)
            with self._lock:
                busy = [w for w in self._all if w.busy_since is not None]
            now = time.monotonic()
            for worker in busy:
                since = worker.busy_since
                if since is None:
                    continue
                if now - since > self.timeout:
                    worker.kill(f"the decoder took longer than {self.timeout:g} s")
                elif self.limit_kind == "watchdog" and self.memory_limit:
                    rss = worker.rss()
                    if rss is not None and rss > self.memory_limit:
                        worker.kill(f"{OUT_OF_MEMORY} of {self.memory_limit // 1024**2} MiB "
                                    f"({rss // 1024**2} MiB resident)")

    def _request(self, name: str, request: dict[str, Any], max_body: int
                 ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """One request in a child; a child that dies fails this file (once more in a fresh
        child when the death is unexplained) and is replaced."""
        for attempt in range(2):
            worker = self._take()
            try:
                header, parts = worker.call(request, max_body)
            except DecoderUnavailable:
                self._drop(worker)
                raise
            except _Died as exc:
                self._drop(worker)
                if attempt or exc.reason.startswith(OUT_OF_MEMORY) or worker.killed_for:
                    raise ImageDecodeError(name, exc.reason) from None
                continue
            except BaseException:
                self._drop(worker)
                raise
            if header.get("retire"):
                self._drop(worker)
            else:
                self._give_back(worker)
            if header["ok"] is not True:
                reason = header.get("reason")
                if not isinstance(reason, str) or not reason:
                    reason = "the decoder failed"
                if header.get("kind") == "error":  # not the file's fault: a decoder bug
                    reason = f"{FAILED} ({reason})"
                raise ImageDecodeError(name, reason[:500])
            return header, parts
        raise AssertionError("unreachable")

    def analyse(self, path: str | Path, *, extractor: str, preview: bool = False,
                digest: bytes | None = None, name: str | None = None) -> Analysis:
        """Decode ``path`` in a child and return its features (and preview PNG). With
        ``digest`` the child checks that it read the content the caller hashed."""
        import numpy as np

        label = str(path) if name is None else name
        request = {"op": "analyse", "path": os.path.abspath(path), "name": label,
                   "sha256": digest.hex() if digest is not None else None,
                   "extractor": extractor, "preview": bool(preview)}
        header, parts = self._request(label, request, 256 * 1024**2)
        try:
            raw = parts["features"]
            if not raw or len(raw) % 8 or len(raw) > 8 * 65536:
                raise ValueError("features of a wrong size")
            features = np.frombuffer(raw, dtype="<f8").astype(np.float64)
            if not np.isfinite(features).all():
                raise ValueError("features that are not finite")
            thumbnail = parts.get("thumbnail")
            if preview and (thumbnail is None or not thumbnail.startswith(_PNG)):
                raise ValueError("no PNG preview")
            source_format = header["source_format"]
            if source_format not in _SOURCE_FORMATS:
                raise ValueError("an unknown source format")
            tags = header["tags"]
            if not isinstance(tags, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
                raise ValueError("tags that are not text")
            rows, columns = header["rows"], header["columns"]
            if type(rows) is not int or type(columns) is not int or rows < 1 or columns < 1:
                raise ValueError("a wrong image size")
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageDecodeError(label, f"{DIED}: it sent a malformed answer ({exc})"
                                   ) from None
        return Analysis(features, thumbnail if preview else None, source_format, tags, rows,
                        columns)

    def analyse_frames(self, path: str | Path, *, extractor: str, max_frames: int,
                       preview: bool = False, digest: bytes | None = None,
                       name: str | None = None) -> FrameAnalyses:
        """Like ``analyse``, for every frame of a multi-frame DICOM instance up to
        ``max_frames`` (one Analysis for any other file), with the instance's clinical
        attributes. The child's answer is checked as ``analyse`` checks its own: as many
        feature rows and previews as it says frames, text-only attributes."""
        import numpy as np

        label = str(path) if name is None else name
        if type(max_frames) is not int or max_frames < 1:
            raise ValueError(f"max_frames must be a positive integer, not {max_frames!r}")
        request = {"op": "analyse", "path": os.path.abspath(path), "name": label,
                   "sha256": digest.hex() if digest is not None else None,
                   "extractor": extractor, "preview": bool(preview), "max_frames": max_frames}
        # a frame's features (at most 512 KiB) and preview (a 256-pixel PNG) fit in 2 MiB
        max_body = min(MAX_ANSWER_BYTES, 256 * 1024**2 + max_frames * 2 * 1024**2)
        header, parts = self._request(label, request, max_body)
        try:
            count, total = header["frames"], header["total_frames"]
            if (type(count) is not int or type(total) is not int or not 1 <= count <= total
                    or count > max_frames):
                raise ValueError("a wrong frame count")
            raw = parts["features"]
            if not raw or len(raw) % (8 * count) or len(raw) // count > 8 * 65536:
                raise ValueError("features of a wrong size")
            features = np.frombuffer(raw, dtype="<f8").astype(np.float64).reshape(count, -1)
            if not np.isfinite(features).all():
                raise ValueError("features that are not finite")
            thumbs = [parts.get("thumbnail" if i == 0 else f"thumbnail.{i}")
                      for i in range(count)]
            if preview and not all(t is not None and t.startswith(_PNG) for t in thumbs):
                raise ValueError("no PNG preview")
            source_format = header["source_format"]
            if source_format not in _SOURCE_FORMATS:
                raise ValueError("an unknown source format")
            tags, clinical = header["tags"], header["clinical"]
            per_frame = header["frame_clinical"]
            if not isinstance(per_frame, list) or len(per_frame) != count - 1:
                raise ValueError("per-frame attributes of a wrong length")
            for values in (tags, clinical, *per_frame):
                if not isinstance(values, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
                    raise ValueError("tags that are not text")
            rows, columns = header["rows"], header["columns"]
            if type(rows) is not int or type(columns) is not int or rows < 1 or columns < 1:
                raise ValueError("a wrong image size")
            error = header["frames_error"]
            if not isinstance(error, str):
                raise ValueError("a frame error that is not text")
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageDecodeError(label, f"{DIED}: it sent a malformed answer ({exc})"
                                   ) from None
        frames = [Analysis(features[i], thumbs[i] if preview else None, source_format,
                           dict(tags), rows, columns,
                           {**clinical, **(per_frame[i - 1] if i else {})})
                  for i in range(count)]
        return FrameAnalyses(frames, total, error[:500])

    def features(self, path: str | Path, extractor: str) -> np.ndarray:
        """The feature vector of one file (search queries)."""
        return self.analyse(path, extractor=extractor).features

    def decode(self, path: str | Path, frame: int | None = None) -> DecodedImage:
        """The DecodedImage of a file, decoded in a child (viewer, query preview)."""
        import numpy as np

        from app.imaging.decode import DecodedImage

        label = str(path)
        request = {"op": "decode", "path": os.path.abspath(path), "name": label,
                   "frame": frame, "display": False}
        header, parts = self._request(label, request, MAX_ANSWER_BYTES)
        try:
            pixels = _array(parts["pixels"], header["shape"], "<f4", np.float32)
            voi = None
            if header.get("voi_lut_shape") is not None:
                voi = _array(parts["voi_lut"], header["voi_lut_shape"], "<f4", np.float32)
            window = _pair(header.get("window"))
            display_range = _pair(header.get("display_range"))
            metadata = header["metadata"]
            display_tags = header.get("display_tags", {})
            clinical = header.get("clinical", {})
            for tags in (metadata, display_tags, clinical):
                if not isinstance(tags, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
                    raise ValueError("metadata that is not text")
            if header["source_format"] not in _SOURCE_FORMATS:
                raise ValueError("an unknown source format")
            if header["voi_function"] not in _VOI_FUNCTIONS:
                raise ValueError("an unknown VOI function")
            n_frames = header["n_frames"]
            if type(n_frames) is not int or n_frames < 1:
                raise ValueError("a wrong frame count")
            return DecodedImage(
                pixels=pixels, source_format=header["source_format"], window=window,
                monochrome1=header["monochrome1"] is True, n_frames=n_frames,
                metadata=metadata, voi_function=header["voi_function"],
                display_range=display_range, voi_lut_image=voi, display_tags=display_tags,
                clinical=clinical)
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageDecodeError(label, f"{DIED}: it sent a malformed answer ({exc})"
                                   ) from None

    def display(self, path: str | Path) -> np.ndarray:
        """The 8-bit display image of a file (default window), decoded in a child."""
        import numpy as np

        label = str(path)
        request = {"op": "decode", "path": os.path.abspath(path), "name": label,
                   "frame": None, "display": True}
        header, parts = self._request(label, request, MAX_ANSWER_BYTES)
        try:
            return _array(parts["display"], header["shape"], "u1", np.uint8)
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageDecodeError(label, f"{DIED}: it sent a malformed answer ({exc})"
                                   ) from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all, self._idle = self._all, [], []
        for worker in workers:
            worker.close()


def _array(raw: bytes, shape: Any, dtype: str, out: Any) -> np.ndarray:
    import numpy as np

    if (not isinstance(shape, list) or len(shape) not in (2, 3)
            or not all(type(n) is int and n > 0 for n in shape)
            or (len(shape) == 3 and shape[2] != 3)):
        raise ValueError("a wrong array shape")
    itemsize = np.dtype(dtype).itemsize
    if len(raw) != itemsize * int(np.prod(shape)):
        raise ValueError("array bytes that do not match its shape")
    array = np.frombuffer(raw, dtype=dtype)
    if isinstance(raw, bytearray) and array.dtype == np.dtype(out):
        return array.reshape(shape)  # the frame's own buffer: writable, no second copy
    return array.astype(out).reshape(shape)


def _pair(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError("a pair of numbers expected")
    return float(value[0]), float(value[1])


if __name__ == "__main__":
    sys.exit(main())
