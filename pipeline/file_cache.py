"""Encoded image and mask files kept in memory, so a training epoch after the first reads no disk.

The DALI pipeline is fed encoded bytes that the iterating thread reads (`dli.pipeline.dali`):
for a DLI batch of 64 that is the batch's images, the injection sources and their masks, some
170 files, about 14 ms of that thread's time per batch on a 2-core VM (`dli bench`,
`host_ms_per_batch.feed`; docs/performance.md), time a GPU training step has to hide. Each
file's bytes are kept after their first read until the budget is full; later files are read from
disk every time. A dataset that fits (Magnetic Tile is 46 MB) is read once per loader; of a
larger one the files met first stay (the first epoch's, the injection sources among them), so a
budget of a quarter of the dataset saves a quarter of the reads. Nothing is evicted: the loader
visits the files in a new order every epoch, under which least-recently-used eviction would keep
far fewer hits than that.

The budget is per cache, one per training or validation loader in each process (a run on K
GPUs may hold K times two budgets): `DEFAULT_BUDGET_MB`, or the environment variable
``DLI_FILE_CACHE_MB`` (0 turns caching off). Loaders that read each file once (evaluation,
measuring the dataset's statistics) keep nothing. Files are taken as they were at their first
read: a dataset is expected not to change under a running training. The arrays handed out are
shared and read-only; their reader (DALI's `feed_input`) copies them.
"""

from __future__ import annotations

import os

import numpy as np

from dli.common.errors import DliError

BUDGET_VARIABLE = "DLI_FILE_CACHE_MB"
DEFAULT_BUDGET_MB = 512


def budget_from_environment(
    environ: os._Environ[str] | dict[str, str] = os.environ,
    *,
    variable: str = BUDGET_VARIABLE,
    default_mb: int = DEFAULT_BUDGET_MB,
) -> int:
    """A cache budget in bytes: environment `variable` (a whole number of MB >= 0) or `default_mb`."""
    raw = environ.get(variable)
    if raw is None or not raw.strip():
        return default_mb * 2**20
    try:
        megabytes = int(raw)
    except ValueError:
        megabytes = -1
    if megabytes < 0:
        raise DliError(f"environment {variable}={raw!r}: expected a whole number of MB >= 0")
    return megabytes * 2**20


def read_file(path: str) -> np.ndarray:
    """The bytes of the file at `path` as a uint8 array; `DliError` naming it when unreadable."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise DliError(f"cannot read {path}: {error}") from None


class FileCache:
    """`read(path)`: a file's bytes, from memory after its first read while `budget` bytes last."""

    def __init__(self, budget: int) -> None:
        if budget < 0:
            raise ValueError(f"budget {budget}: must be >= 0")
        self.budget = budget
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._files: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._files)

    def read(self, path: str) -> np.ndarray:
        """The bytes of `path` (kept, or read now and kept when they fit); `DliError` when unreadable."""
        kept = self._files.get(path)
        if kept is not None:
            self.hits += 1
            return kept
        self.misses += 1
        data = read_file(path)
        if 0 < data.nbytes <= self.budget - self.bytes:
            data.flags.writeable = False  # shared with every later reader
            self._files[path] = data
            self.bytes += data.nbytes
        return data
