"""Train/validation splits and labelled-data fractions, reproducible on any machine.

Samples are stratified by their class set: the images holding exactly the same classes (one
class for a single-class dataset, ``crack+fray`` for an image of both, none for defect-free)
form one stratum. Every random choice draws from a NumPy `Generator` (PCG64) seeded by
`SeedSequence([seed, purpose, *class set])` over the stratum's samples sorted by their path
relative to the dataset root. So a split depends only on the seed and the file names: not on the
order a file system lists them, the Python hash seed, the operating system or where the dataset
lives. Each stratum gets its own stream, so adding images of one class never reshuffles another.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dli.common.errors import DliError
from dli.data.manifest import FREE, Manifest, read_dataset

REFERENCE_SPLIT_DIR = Path("splits") / "reference-seed42"
"""Where the published reference split lives inside the Magnetic Tile root."""

# Distinct streams for distinct uses of the same seed (splitting vs. sub-sampling).
_SPLIT_STREAM = 0
_FRACTION_STREAM = 1
_GROUP_STREAM = 2


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DliError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _stratum_key(classes: tuple[int, ...]) -> list[int]:
    """The seed words of a class set: class id - `FREE` each (``[0]`` for defect-free), so a
    single class c keeps the stream it had before class sets, ``[c + 1]``."""
    return [c - FREE for c in classes or (FREE,)]


def _seeded_order(
    manifest: Manifest, indices: list[int], seed: int, stream: int, classes: tuple[int, ...]
) -> list[int]:
    """`indices` sorted by relative path, then permuted by the (seed, stream, class set) generator."""
    ordered = sorted(indices, key=lambda i: manifest.sort_key(manifest.samples[i]))
    key = [seed, stream, *_stratum_key(classes)]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))
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
    """(train, val): `validation_count` samples of every class set go to validation.

    Defect-free images all stay in training, as in the reference split, unless `split_free`,
    in which case they are split with the same rule. Both manifests keep the input order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DliError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    seed = _check_seed(seed)
    val: set[int] = set()
    for classes, indices in manifest.indices_by_class_set().items():
        if not classes and not split_free:
            continue
        order = _seeded_order(manifest, indices, seed, _SPLIT_STREAM, classes)
        val.update(order[: validation_count(len(order), val_fraction)])
    train = [i for i in range(len(manifest)) if i not in val]
    return manifest.subset(train), manifest.subset(sorted(val))


def apply_fraction(manifest: Manifest, fraction: float, *, seed: int) -> Manifest:
    """Keep `kept_count` samples of every class set, defect-free included (weak-supervision study).

    The same seed keeps the same samples, and a smaller fraction keeps a subset of what a
    larger one keeps (both take a prefix of the same per-class permutation). Small fractions
    may empty a class: that is reported by `Manifest.empty_classes`, not papered over.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise DliError(f"fraction must be in (0, 1], got {fraction!r}")
    seed = _check_seed(seed)
    keep: list[int] = []
    for classes, indices in manifest.indices_by_class_set().items():
        order = _seeded_order(manifest, indices, seed, _FRACTION_STREAM, classes)
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


@dataclass(frozen=True)
class GroupCounts:
    """How many groups of a `group_split` fell on each side, and how many images no group matched."""

    train: int
    val: int
    unmatched: int

    def line(self) -> str:
        own = f"; {self.unmatched} image(s) matched no group and form one each" if self.unmatched else ""
        return f"groups: {self.train} in training, {self.val} in validation{own}"


def image_groups(manifest: Manifest, pattern: str) -> tuple[dict[str, list[int]], int]:
    """Sample indices per group key, and how many samples the pattern did not match.

    The key is the first capturing group of `pattern` searched in the image's path relative to
    the dataset root (the whole match when the pattern captures nothing); an image it does not
    match is a group of its own.
    """
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise DliError(f"--group-by {pattern!r}: not a regular expression ({error})") from None
    groups: dict[str, list[int]] = {}
    unmatched = 0
    for i, sample in enumerate(manifest.samples):
        name = manifest.sort_key(sample)
        found = regex.search(name)
        if found is None:
            unmatched += 1
            key = "\0" + name  # its own group, apart from every captured key
        else:
            key = found.group(1) if regex.groups else found.group(0)
        groups.setdefault(key, []).append(i)
    return groups, unmatched


def group_split(
    manifest: Manifest,
    pattern: str,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    split_free: bool = False,
) -> tuple[Manifest, Manifest, GroupCounts]:
    """(train, val, group counts): like `stratified_split`, but whole groups move together.

    Images whose names share the captured group of `pattern` (`image_groups`: a part number, a
    camera position, a date) land on one side, so frames of one part never leak from training
    into validation. A group's stratum is the union of its images' classes; per stratum, groups
    in seeded order go to validation until it holds `validation_count` of the stratum's images,
    leaving at least one group in training. Groups of defect-free images only stay in training
    unless `split_free`.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DliError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    seed = _check_seed(seed)
    groups, unmatched = image_groups(manifest, pattern)
    strata: dict[tuple[int, ...], list[str]] = {}
    for key, members in groups.items():
        classes = tuple(sorted({c for i in members for c in manifest.samples[i].classes}))
        strata.setdefault(classes, []).append(key)
    val: set[int] = set()
    val_groups = 0
    for classes, keys in strata.items():
        if not classes and not split_free:
            continue
        ordered = sorted(keys, key=lambda k: min(manifest.sort_key(manifest.samples[i]) for i in groups[k]))
        rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([seed, _GROUP_STREAM, *_stratum_key(classes)]))
        )
        target = validation_count(sum(len(groups[k]) for k in keys), val_fraction)
        taken = 0
        for position in rng.permutation(len(ordered))[: max(0, len(ordered) - 1)]:
            if taken >= target:
                break
            members = groups[ordered[position]]
            val.update(members)
            taken += len(members)
            val_groups += 1
    train = [i for i in range(len(manifest)) if i not in val]
    counts = GroupCounts(len(groups) - val_groups, val_groups, unmatched)
    return manifest.subset(train), manifest.subset(sorted(val)), counts
