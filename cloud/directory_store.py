"""A store in a local directory (restic's local backend): one file per object.

The embedded default where SeaweedFS has no binary for the platform (macOS), and
``--store directory`` anywhere. It implements cloud.backend.Store with S3's semantics, so
the application cannot tell it from a bucket. How:

* Key ``a/b/c`` is the file ``<root>/a/b/c``. Keys are checked before any file is
  touched: components of printable ASCII without '\\', not empty, not '.' or '..', not
  starting with '.' (hidden names are the store's own temporary files). So no key can
  name a path outside the root or an absolute path.
* A write goes to a temporary name in the object's directory (``.tmp-<random>``, created
  with O_EXCL, mode 0600), is fsync-ed, then renamed over the final name and the
  directory fsync-ed: a reader sees the old object or the new one, never a part, and a
  crash leaves at most a hidden temporary file (never listed, never read).
* Create-if-absent links the finished temporary file to the final name (``os.link``
  fails if the name exists), so exactly one of any number of concurrent writers wins,
  across threads and processes.
* Directories are created 0700 and objects 0600. A symbolic link found on the way to an
  object (a component of the key, or the object itself) is refused (StoreUnavailable),
  never followed, so a link planted in the root cannot make the store read or write
  outside it. The root itself may be a link (the user chose where it points).
* Listing walks the directory under the prefix and returns keys in byte order, like S3.
* Errors are the store errors of cloud.backend, in plain words that name the file.

Limits, unlike S3: a key cannot be both an object and a "directory" of other keys
(``a/b`` and ``a/b/c``); that is a StoreError. Radcrypt's layout (cloud/layout.py)
never nests objects. On a case-insensitive file system (macOS by default) keys that
differ only in case are one object; Radcrypt's keys are lowercase. Deleting an object
leaves its (empty) directories, as restic does: removing them would race with a
writer creating a file there. Tested on Linux; on Windows, directories are not fsync-ed
and replacing an object that another process has open fails (StoreUnavailable).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from cloud.backend import (
    BucketNotFound,
    ObjectExists,
    ObjectNotFound,
    StoreError,
    StoreUnavailable,
)

MiB = 1024 * 1024
COPY_CHUNK = MiB
DIR_MODE = 0o700
FILE_MODE = 0o600
TMP_PREFIX = ".tmp-"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_KEY_CHARS = frozenset(chr(c) for c in range(0x20, 0x7F)) - {"\\"}


class DirectoryStore:
    """Objects as files under ``root``; implements cloud.backend.Store. Thread-safe and
    safe for concurrent writers in several processes (every write is a rename or a link
    of a finished file)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self._fsync_dirs = os.name == "posix"  # Windows cannot open a directory to fsync

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.root)!r})"

    def describe(self) -> str:
        return f"directory store at {self.root}"

    # keys and paths ----------------------------------------------------------------------

    def _parts(self, key: str) -> list[str]:
        """The key's components, or ValueError naming the rule it breaks."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"invalid key {key!r}: must be a non-empty string")
        bad = set(key) - _KEY_CHARS
        if bad:
            raise ValueError(f"invalid key {key!r}: only printable ASCII without '\\' is "
                             f"allowed (found {sorted(bad)!r})")
        parts = key.split("/")
        for part in parts:
            if part in ("", ".", "..") or part.startswith("."):
                raise ValueError(f"invalid key {key!r}: components must not be empty, '.', "
                                 "'..' or start with '.' (no absolute paths, no way out of "
                                 "the store's directory)")
        return parts

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*self._parts(key))

    def _check_no_links(self, path: Path, key: str) -> None:
        """Refuse a symbolic link on the way from the root to ``path`` (inclusive)."""
        current = self.root
        for part in path.relative_to(self.root).parts:
            current = current / part
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                return  # nothing further exists, so nothing further is a link
            except NotADirectoryError:
                return
            if stat.S_ISLNK(mode):
                raise StoreUnavailable(
                    f"{current} is a symbolic link; the {self.describe()} never follows "
                    f"links (key {key!r})", code="ELOOP")

    def _error(self, exc: OSError, op: str, key: str | None) -> StoreError:
        what = f"{op} {key!r}" if key is not None else op
        code = errno.errorcode.get(exc.errno or 0)
        where = f"{exc.filename}" if exc.filename else str(self.root)
        reason = exc.strerror or str(exc)
        if isinstance(exc, PermissionError):
            return StoreUnavailable(f"the {self.describe()} refused access to {where}: "
                                    f"{reason} ({what})", code=code)
        if exc.errno == errno.ELOOP:
            return StoreUnavailable(f"{where} is a symbolic link; the {self.describe()} "
                                    f"never follows links ({what})", code=code)
        return StoreError(f"{what} failed on the {self.describe()} ({where}): {reason}",
                          code=code)

    def _not_found(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"no object {key!r} in the {self.describe()}")

    # root --------------------------------------------------------------------------------

    def ping(self) -> None:
        try:
            mode = os.stat(self.root).st_mode
        except FileNotFoundError:
            raise BucketNotFound(f"the {self.describe()} does not exist (ensure_bucket "
                                 "creates it)") from None
        except OSError as exc:
            raise StoreUnavailable(str(self._error(exc, "ping", None))) from None
        if not stat.S_ISDIR(mode):
            raise StoreUnavailable(f"the {self.describe()}: {self.root} is not a directory")
        if not os.access(self.root, os.R_OK | os.W_OK | os.X_OK):
            if os.statvfs(self.root).f_flag & os.ST_RDONLY:  # os.access says EROFS too
                raise StoreUnavailable(f"the {self.describe()} is on a read-only file "
                                       f"system ({self.root})", code="EROFS")
            raise StoreUnavailable(f"the {self.describe()} is not readable and writable by "
                                   "this user")

    def ensure_bucket(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        except OSError as exc:
            raise self._error(exc, "create directory", None) from None
        self.ping()

    # writes ------------------------------------------------------------------------------

    def put(self, key: str, data: bytes | bytearray | memoryview, *,
            if_absent: bool = False) -> None:
        view = memoryview(data).cast("B")

        def write(fd: int) -> None:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:done + 64 * MiB])

        self._write(key, write, if_absent=if_absent)

    def put_file(self, key: str, path: str | Path) -> None:
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"no such file to upload: {source}")
        with open(source, "rb") as f:
            self.put_stream(key, f)

    def put_stream(self, key: str, fileobj: IO[bytes]) -> None:
        def write(fd: int) -> None:
            while True:
                try:
                    block = fileobj.read(COPY_CHUNK)
                except OSError as exc:  # the source's failure, not the store's
                    raise _SourceFailed(exc) from exc
                if not block:
                    return
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view):]

        self._write(key, write)

    def _write(self, key: str, write: Callable[[int], None], *,
               if_absent: bool = False) -> None:
        final = self._path(key)
        directory = final.parent
        self._check_no_links(final, key)
        try:
            self._make_dirs(directory, key)
            tmp = directory / f"{TMP_PREFIX}{secrets.token_hex(8)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY
                         | _CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise self._conflict_or_error(exc, "put", key) from None
        try:
            try:
                write(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            if if_absent:
                self._link_new(tmp, final, key)
            else:
                self._replace(tmp, final, key)
            self._sync_dir(directory)
        except _SourceFailed as failed:
            raise failed.error from None
        except OSError as exc:
            raise self._conflict_or_error(exc, "put", key) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _link_new(self, tmp: Path, final: Path, key: str) -> None:
        try:
            os.link(tmp, final)  # tmp is our own regular file
        except FileExistsError:
            raise ObjectExists(f"object {key!r} already exists in the "
                               f"{self.describe()}") from None
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
                raise StoreError(
                    f"the file system of the {self.describe()} does not support hard "
                    "links, which a create-if-absent needs; choose a directory on a local "
                    "file system", code=errno.errorcode.get(exc.errno or 0)) from None
            raise

    def _replace(self, tmp: Path, final: Path, key: str) -> None:
        try:
            os.replace(tmp, final)
        except IsADirectoryError:
            # An empty directory left by deleted keys below it may be removed; a full one
            # is a real conflict (reported by the caller).
            os.rmdir(final)
            os.replace(tmp, final)

    def _make_dirs(self, directory: Path, key: str) -> None:
        """Create the missing directories from the root down to ``directory`` (0700), each
        made durable by an fsync of its parent."""
        if directory.is_dir() and not directory.is_symlink():
            return
        missing: list[Path] = []
        current = directory
        while current != self.root and not current.exists():
            missing.append(current)
            current = current.parent
        if not self.root.exists():
            raise BucketNotFound(f"the {self.describe()} does not exist (ensure_bucket "
                                 "creates it)")
        for path in reversed(missing):
            try:
                os.mkdir(path, DIR_MODE)
            except FileExistsError:
                pass  # a concurrent writer made it
            else:
                self._sync_dir(path.parent)
        self._check_no_links(directory, key)

    def _sync_dir(self, directory: Path) -> None:
        if not self._fsync_dirs:
            return
        fd = os.open(directory, os.O_RDONLY | _CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _conflict_or_error(self, exc: OSError, op: str, key: str) -> StoreError:
        if isinstance(exc, (NotADirectoryError, IsADirectoryError)) or exc.errno in (
                errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
            return StoreError(
                f"{op} {key!r} failed on the {self.describe()}: the key and another object's "
                "key are nested (an object cannot also be a folder of objects here)",
                code=errno.errorcode.get(exc.errno or 0))
        return self._error(exc, op, key)

    # reads -------------------------------------------------------------------------------

    def _open(self, key: str) -> int:
        path = self._path(key)
        self._check_no_links(path, key)
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _BINARY | _CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._not_found(key) from None
        except OSError as exc:
            raise self._error(exc, "get", key) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._not_found(key)
        return fd

    def get(self, key: str) -> bytes:
        return b"".join(self.iter_chunks(key, chunk_size=4 * MiB))

    def iter_chunks(self, key: str, chunk_size: int = MiB) -> Iterator[bytes]:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        # The file object owns the descriptor from here on: closed when the stream ends,
        # or by its finalizer when the iterator is dropped unread.
        return self._stream(os.fdopen(self._open(key), "rb", buffering=0), key, chunk_size)

    def _stream(self, f: IO[bytes], key: str, chunk_size: int) -> Iterator[bytes]:
        with f:
            while True:
                try:
                    chunk = f.read(chunk_size)
                except OSError as exc:
                    raise self._error(exc, "read", key) from None
                if not chunk:
                    return
                yield chunk

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError("start and length must be >= 0")
        fd = self._open(key)
        try:
            parts: list[bytes] = []
            offset, wanted = start, length
            while wanted > 0:
                block = _pread(fd, min(wanted, 64 * MiB), offset)
                if not block:
                    break
                parts.append(block)
                offset += len(block)
                wanted -= len(block)
            return b"".join(parts)
        except OSError as exc:
            raise self._error(exc, "get range", key) from None
        finally:
            os.close(fd)

    def _stat(self, key: str) -> os.stat_result | None:
        """The object's file status; None when there is no such object (no file, or not
        a regular file)."""
        path = self._path(key)
        self._check_no_links(path, key)
        try:
            info = os.stat(path, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._error(exc, "head", key) from None
        return info if stat.S_ISREG(info.st_mode) else None

    def size(self, key: str) -> int | None:
        info = self._stat(key)
        return info.st_size if info is not None else None

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    # listing -----------------------------------------------------------------------------

    def list_objects(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) under ``prefix`` in key order. The directory under the prefix is
        read when the iteration starts (sorting needs every name), sizes as it goes."""
        for key, size, _ in self.list_objects_with_times(prefix):
            yield key, size

    def list_objects_with_times(self, prefix: str
                                ) -> Iterator[tuple[str, int, float | None]]:
        """(key, size, modification time as a Unix time) under ``prefix``, in key order:
        the file's mtime, which a put sets (every put writes a new file and renames it)."""
        if not isinstance(prefix, str):
            raise ValueError("prefix must be a string")
        head, _, start = prefix.rpartition("/")
        if head:
            try:
                base_parts = self._parts(head)
            except ValueError:
                return  # no valid key has this prefix
        else:
            base_parts = []
        base = self.root.joinpath(*base_parts)
        self._check_no_links(base, prefix)
        found: list[tuple[str, int, float | None]] = []
        key_base = head + "/" if head else ""
        try:
            self._walk(base, key_base, start, found)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(exc, "list", prefix) from None
        found.sort(key=lambda item: item[0].encode())
        yield from found

    def modified(self, key: str) -> float | None:
        """When the object was last written (its file's mtime), None when it does not
        exist."""
        info = self._stat(key)
        return info.st_mtime if info is not None else None

    def _walk(self, directory: Path, key_base: str, start: str,
              found: list[tuple[str, int, float | None]]) -> None:
        try:
            entries = list(os.scandir(directory))
        except NotADirectoryError:
            return
        for entry in entries:
            name = entry.name
            if name.startswith(".") or not name.startswith(start):
                continue  # temporary files and names outside the prefix
            if entry.is_symlink():
                continue  # never followed, never listed
            if entry.is_dir(follow_symlinks=False):
                self._walk(Path(entry.path), key_base + name + "/", "", found)
            elif entry.is_file(follow_symlinks=False):
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we listed
                found.append((key_base + name, info.st_size, info.st_mtime))

    def list_keys(self, prefix: str) -> Iterator[str]:
        for key, _ in self.list_objects(prefix):
            yield key

    # deletes -----------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        path = self._path(key)
        self._check_no_links(path, key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            return  # a "folder" of other keys is not an object
        except OSError as exc:
            if exc.errno == errno.EISDIR or (exc.errno == errno.EPERM and path.is_dir()):
                return
            raise self._error(exc, "delete", key) from None
        with contextlib.suppress(OSError):
            self._sync_dir(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix")
        deleted = 0
        for key in list(self.list_keys(prefix)):
            self.delete(key)
            deleted += 1
        return deleted


class _SourceFailed(Exception):
    """Reading the caller's stream failed: re-raised as the stream's own error."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _pread(fd: int, size: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - Windows (fd is not shared)
    return os.read(fd, size)
