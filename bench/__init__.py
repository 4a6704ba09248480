"""Benchmarks: throughput of the data path, the kernels and training (never asserted by tests)."""

from __future__ import annotations

import os
from pathlib import Path

MT_FOLDER = Path("shared") / "data" / "magnetic-tiles"
"""Where a checkout finds the real Magnetic Tile data: beside the repository."""


def magnetic_tile_root() -> Path | None:
    """The Magnetic Tile root for benchmarks and tests: `$DLI_MT_ROOT`, else `shared/` beside the repository.

    None when neither holds the data (`MT_Free` is the folder every MT copy has).
    """
    configured = os.environ.get("DLI_MT_ROOT")
    root = Path(configured) if configured else Path(__file__).resolve().parents[2] / MT_FOLDER
    return root if (root / "MT_Free").is_dir() else None
