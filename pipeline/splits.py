"""Train/validation splits and labelled-data fractions, reproducible on any machine.

Every random choice draws from a NumPy `Generator` (PCG64) seeded by `SeedSequence([seed, purpose,
class])` over the class's samples sorted by their path relative to the dataset root. So a split
depends only on the seed and the file names: not on the order a file system lists them, the
Python hash seed, the operating system or where the dataset lives. Each class gets its own
stream, so adding images of one class never reshuffles another.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from dli.errors import DliError
from dli.pipeline.manifest import FREE, Manifest, read_dataset

REFERENCE_SPLIT_DIR = Path("splits") / "reference-seed42"
"""Where the published reference split lives inside the Magnetic Tile root."""

# Distinct streams for distinct uses of the same seed (splitting vs. sub-sampling).
_SPLIT_STREAM = 0
_FRACTION_STREAM = 1


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DliError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _seeded_order(manifest: Manifest, indices: list[int], seed: int, stream: int, class_id: int) -> list[int]:
    """`indices` sorted by relative path, then permuted by the (seed, stream, class) generator."""
    ordered = sorted(indices, key=lambda i: manifest.sort_key(manifest.samples[i]))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, class_id - FREE])))
    return [ordered[k] for k in rng.permutation(len(ordered))]


def validation_count(n: int, val_fraction: float) -> int:
    """How many of a class's `n` samples go to validation.

    ``ceil(val_fraction * n)``, the rule of scikit-learn's `train_test_split` that produced the
    reference split (so 115/85/57/32/103 give 23/17/12/7/21), capped at ``n - 1`` so that every
    class keeps at least one training sample; a class of one sample stays in training.
    """
    if n < 2:
        return 0
    return min(n - 1, math.ceil(round(val_fraction * n, 9)))


def kept_count(n: int, fraction: float) -> int:
    """How many of a class's `n` samples `apply_fraction` keeps: ``round(fraction * n)``, halves up.

    Rounding (not ceiling) keeps the proportions honest: a class of 3 at fraction 0.1 keeps
    none. Downstream code should warn about the empty classes (`Manifest.empty_classes`).
    """
    return math.floor(round(fraction * n, 9) + 0.5)


def stratified_split(
    manifest: Manifest, *, val_fraction: float = 0.2, seed: int = 0, split_free: bool = False
) -> tuple[Manifest, Manifest]:
    """(train, val): `validation_count` samples of every defect class go to validation.

    Defect-free images all stay in training, as in the reference split, unless `split_free`,
    in which case they are split with the same rule. Both manifests keep the input order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DliError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    seed = _check_seed(seed)
    val: set[int] = set()
    for class_id, indices in manifest.indices_by_class().items():
        if class_id == FREE and not split_free:
            continue
        order = _seeded_order(manifest, indices, seed, _SPLIT_STREAM, class_id)
        val.update(order[: validation_count(len(order), val_fraction)])
    train = [i for i in range(len(manifest)) if i not in val]
    return manifest.subset(train), manifest.subset(sorted(val))


def apply_fraction(manifest: Manifest, fraction: float, *, seed: int) -> Manifest:
    """Keep `kept_count` samples of every class, defect-free included (weak-supervision study).

    The same seed keeps the same samples, and a smaller fraction keeps a subset of what a
    larger one keeps (both take a prefix of the same per-class permutation). Small fractions
    may empty a class: that is reported by `Manifest.empty_classes`, not papered over.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise DliError(f"fraction must be in (0, 1], got {fraction!r}")
    seed = _check_seed(seed)
    keep: list[int] = []
    for class_id, indices in manifest.indices_by_class().items():
        order = _seeded_order(manifest, indices, seed, _FRACTION_STREAM, class_id)
        keep += order[: kept_count(len(order), fraction)]
    return manifest.subset(sorted(keep))


def reference_split(root: str | os.PathLike[str]) -> tuple[Manifest, Manifest]:
    """(train, val) of the split published with the reference implementation of the paper.

    Reads ``<root>/splits/reference-seed42/{train_data,val_data}.csv`` (Magnetic Tile classes).
    """
    folder = Path(root).absolute() / REFERENCE_SPLIT_DIR
    paths = [folder / "train_data.csv", folder / "val_data.csv"]
    for path in paths:
        if not path.is_file():
            raise DliError(f"reference split file not found: {path}")
    train, val = (read_dataset(path) for path in paths)
    return train, val
