"""Atomic file writes: a temp file in the same folder, then `os.replace`.

A run killed mid-write leaves the previous checkpoint or result file intact, never a torn one.
The file gets the mode a plain `open(path, "w")` would give it (0o666 less the umask), or keeps
the mode of the file it replaces; `tempfile.mkstemp` alone would leave it private (0o600).
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _umask_at_import() -> int:
    # os.umask can only be read by setting it, and it is process-wide: do it once, at import.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_at_import()


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


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temp file beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            os.chmod(tmp, _final_mode(path))
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_save(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], None]) -> None:
    """Call `writer(handle)` on a binary temp file, then move it onto `path` (e.g. `torch.save`)."""
    with atomic_open(path, "wb") as handle:
        writer(handle)
