"""An exclusive lock on a folder, so two processes never write one run folder at once.

The lock is an advisory `flock` on `<folder>/.lock`, taken without waiting. The kernel drops it
when the holding process exits for any reason (a crash or `kill -9` included), so a lock is
never stale: the next process simply takes it. The file records who holds it (pid and host)
for the message a refused process prints; it stays in the folder, unlocked, after the run.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from types import TracebackType

from dli.common.errors import DliError

LOCK_FILE = ".lock"
"""Name of the lock file inside a locked folder."""


class FolderLock:
    """Hold `folder`'s lock from `acquire()` (or `with`) until `release()` or process exit.

    `acquire` raises `DliError` naming the folder and the holder when another process holds it.
    """

    def __init__(self, folder: str | os.PathLike[str], what: str = "folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_FILE

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        if self._fd is not None:
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise DliError(f"cannot lock {self.what} {self.folder}: {error.strerror or error}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise DliError(
                f"{self.what} {self.folder} is in use by another dli process ({holder}); "
                "wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()
