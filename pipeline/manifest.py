"""Datasets as manifests: a list of (image, mask, class id) with the class names recorded.

Readers for the Magnetic Tile layout, any folder-per-class dataset and CSV manifests, plus
up-front validation, live here. Everything downstream (splits, planner, DALI) sees only a
`Manifest`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

FREE = -1
"""Class id of a defect-free image."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        image: path of the image file.
        mask: path of its mask (8-bit, same size; pixels > 0 are defect), or None for a
            defect-free image that ships without one (read as all zeros).
        class_id: `FREE` (-1) or a defect class id in `0..num_classes-1`.
    """

    image: Path
    mask: Path | None
    class_id: int


@dataclass(frozen=True)
class Manifest:
    """An ordered list of samples and the names of the defect classes (index = class id)."""

    samples: tuple[Sample, ...]
    class_names: tuple[str, ...]
    root: Path = field(default=Path("."))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def class_ids(self) -> list[int]:
        return [s.class_id for s in self.samples]

    def indices_by_class(self) -> dict[int, list[int]]:
        """Sample indices per class id, `FREE` included, every class key present (maybe empty)."""
        out: dict[int, list[int]] = {FREE: [], **{c: [] for c in range(self.num_classes)}}
        for i, s in enumerate(self.samples):
            out[s.class_id].append(i)
        return out

    def counts(self) -> dict[int, int]:
        return {c: len(v) for c, v in self.indices_by_class().items()}

    def subset(self, indices: Iterable[int]) -> Manifest:
        return Manifest(tuple(self.samples[i] for i in indices), self.class_names, self.root)
