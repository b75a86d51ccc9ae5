"""The private spool: where received or retrieved DICOM instances wait, in clear, until
the import path has encrypted them.

Why a spool at all: the import path (encrypt, features, upload, commit in batches) reads
files, and a network transfer must be whole before anything of it is imported (a PACS that
goes away mid-transfer leaves nothing half-imported). Why private: these files hold patient
data in clear, so the folder is 0700 (files 0600), under the user's data directory, and is
emptied on success and on start-up; nothing else ever writes plaintext to disk.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from app.core.errors import RadcryptError

_UID = re.compile(r"^[0-9.]{1,64}$")


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    if os.name == "posix" and path.stat().st_uid != os.getuid():
        raise RadcryptError(f"spool {path} belongs to another user: refusing to use it")
    return path


class Spool:
    """One folder of instances (``<data dir>/spool/<name>``)."""

    def __init__(self, root: Path) -> None:
        self.root = _private_dir(Path(root))

    @classmethod
    def under(cls, data_dir: Path, name: str) -> Spool:
        return cls(_private_dir(Path(data_dir) / "spool") / name)

    def put(self, data: bytes, sop_uid: str = "") -> Path:
        """Write one instance (atomically: a reader never sees half a file); its name is
        its SOP Instance UID when that is a plain UID, else a random one."""
        name = sop_uid if _UID.match(sop_uid or "") else uuid.uuid4().hex
        path = self.root / f"{name}.dcm"
        if path.exists():  # the same instance sent twice: keep both, import resolves it
            path = self.root / f"{name}.{uuid.uuid4().hex[:8]}.dcm"
        tmp = self.root / f".{uuid.uuid4().hex}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        tmp.replace(path)
        return path

    def files(self) -> list[Path]:
        """Complete instances waiting, oldest first."""
        found = [p for p in self.root.iterdir() if p.is_file() and p.suffix == ".dcm"]
        return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def remove(self, paths: list[Path]) -> None:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def clear(self) -> int:
        """Delete everything in the spool (partial writes too); returns how many files."""
        count = 0
        for path in self.root.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            count += 1
        return count

    @contextlib.contextmanager
    def transfer(self, prefix: str = "retrieve-") -> Iterator[Spool]:
        """A private sub-spool for one retrieve, deleted with everything in it when the
        block ends (success or not)."""
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))
        try:
            yield Spool(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
