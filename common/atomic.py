"""Atomic file writes: a temp file in the same folder, then `os.replace`.

A run killed mid-write leaves the previous checkpoint or result file intact, never a torn one.
The file gets the mode a plain `open(path, "w")` would give it (0o666 less the umask), or keeps
the mode of the file it replaces; `tempfile.mkstemp` alone would leave it private (0o600).

A file that is read-only (no write permission bit set, or none for this process) is never
replaced: renaming over it would bypass its permissions, so the write is refused with one
`DliError` naming it and the file stays as it is.

An operating-system error while writing (a full disk, a read-only or missing folder, a path
that names a file) becomes one `DliError` naming the file; the temp file is removed and the
previous file, if any, stays as it was. Temp files are named `.<name>.<random>.tmp`: a write
killed before its rename leaves one behind, which `remove_stale_temp_files` cleans up.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from dli.common.errors import DliError


def _umask_at_import() -> int:
    # os.umask can only be read by setting it, and it is process-wide: do it once, at import.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_at_import()

TEMP_SUFFIX = ".tmp"
"""Suffix of the temp files (`.<name>.<random>.tmp`)."""


def _umask() -> int:
    """The current umask, read without changing it where Linux reports it; else the one at import."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def _final_mode(path: Path) -> int:
    """The existing file's permission bits, or 0o666 less the umask for a new file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def is_read_only(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is an existing file that its permissions forbid writing.

    True when no write bit is set at all (mode 444: read-only by its owner's choice, even for
    root) or when this process may not write it.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) and (not mode & 0o222 or not os.access(path, os.W_OK))


def check_replaceable(path: str | os.PathLike[str]) -> None:
    """`DliError` naming `path` when it exists and is read-only (see `is_read_only`); on a file
    system mounted read-only the message says so, as the operating system's own error would."""
    if is_read_only(path):
        raise DliError(f"cannot write {path}: {_read_only_reason(path)}")


def _read_only_reason(path: str | os.PathLike[str]) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
    except OSError:
        pass
    return "the file is read-only"


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temp file beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    check_replaceable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except FileExistsError:  # the folder to write into is a file
        raise DliError(f"cannot write {path}: {path.parent} is not a folder") from None
    except OSError as error:
        raise DliError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            os.chmod(tmp, _final_mode(path))
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise DliError(f"cannot write {path}: {error.strerror or error}") from None
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_save(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], None]) -> None:
    """Call `writer(handle)` (e.g. `torch.save`) on a memory buffer, then write it to `path` atomically.

    Serializing in memory first keeps the disk writes plain file writes, whose errors (a full
    disk) say what happened; torch's own writer reports them as an unreadable internal failure.
    """
    buffer = io.BytesIO()
    writer(buffer)
    atomic_write_bytes(path, buffer.getbuffer())


_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")
"""Names `atomic_open` gives its temp files (`tempfile.mkstemp` adds 8 random characters)."""


def remove_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files that killed atomic writes left in `folder` (not recursive).

    Only safe while no other process writes into `folder` (e.g. under its `dli.common.lock.FolderLock`):
    a temp file being written looks the same. Returns the files removed.
    """
    removed = []
    for path in sorted(Path(folder).glob(f".*{TEMP_SUFFIX}")):
        if _TEMP_NAME.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
