"""Defect instances: the connected components of each class of a mask, and the donor table of DLI.

Dynamic Label Injection takes its defects one instance at a time: a connected component
(8-connected) of one class in one training mask, where components that `INSTANCE_GAP` dilations
bring together count as one (their Poisson blending domains would overlap; on Magnetic Tile this folds
the anti-aliasing specks and the fragments of one break into their defect: 716 components, 479
instances). An injected defect thus carries one class and its own pixels only, even when its
image holds several classes or several defects. Instances under `MIN_DONOR_AREA` pixels are
not donors (isolated specks; 18 on Magnetic Tile). By default (`DONOR_UNITS` ``auto``) an image
holding one class gives its whole mask as one donor, as the paper's method does; ``instance``
makes every donor an instance.
`measure_instances` finds them (scipy.ndimage) when the dataset is validated, once, with the
boxes that size the Poisson windows (`dli.pipeline.inject.region_boxes`) and the pixels the
data path later decodes as the donor's mask (`DonorTable.mask_png`).

A `DonorTable` lists the training set's donors: for each, the manifest index of its image, its
class, its box (fractions of the image, far edges exclusive, as `ValidationReport.mask_boxes`),
and either its instance or None for a whole binary mask (the mask file itself is the donor's
mask; `DonorTable.whole_masks`, for callers without instances).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from dli.data.manifest import Manifest, Sample

CONNECTIVITY = np.ones((3, 3), dtype=bool)
"""Pixels touching by an edge or a corner belong to one instance."""

INSTANCE_GAP = 2
"""Components of one class whose dilations by this radius touch or overlap (pixels at most
2 * gap + 1 apart, Chebyshev) form one instance: injection's default dilation radius, so the
blending domains of two instances of one mask never overlap."""

MIN_DONOR_AREA = 4
"""The fewest pixels an instance needs to be injected (`DonorTable.from_instances`)."""

DONOR_UNITS: tuple[str, ...] = ("auto", "instance")
"""What one donor is (`DonorTable.from_instances`): ``auto`` keeps the whole mask of a
single-class image (the paper's unit, so single-class datasets such as Magnetic Tile train as
before) and takes the instances of images holding several classes; ``instance`` takes
instances everywhere."""

NO_BOX = (math.nan,) * 4


@dataclass(frozen=True, eq=False)
class Instance:
    """One connected component of one class in one mask.

    Attributes:
        class_id: its class.
        top, left, bottom, right: its pixel box in the mask (far edges exclusive).
        height, width: the mask's size.
        pixels: (bottom - top, right - left) bool, the component within its box.
    """

    class_id: int
    top: int
    left: int
    bottom: int
    right: int
    height: int
    width: int
    pixels: np.ndarray

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.pixels))

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(top, left, bottom, right) as fractions of the mask's height and width."""
        height, width = self.height, self.width
        return self.top / height, self.left / width, self.bottom / height, self.right / width

    def full_mask(self) -> np.ndarray:
        """(H, W) uint8, 1 on the instance's pixels."""
        mask = np.zeros((self.height, self.width), dtype=np.uint8)
        mask[self.top : self.bottom, self.left : self.right] = self.pixels
        return mask


def measure_instances(labels: np.ndarray, gap: int = INSTANCE_GAP) -> tuple[Instance, ...]:
    """The instances of a (H, W) class-index map (0 background, k + 1 where class k), class by
    class in ascending order, each class's in scipy's raster order: connected components, those
    that dilations by `gap` bring together merged (0: plain components)."""
    height, width = labels.shape
    out: list[Instance] = []
    values = np.unique(labels)
    for value in values[values > 0]:
        pixels = labels == value
        if gap > 0:
            near = ndimage.binary_dilation(pixels, np.ones((2 * gap + 1, 2 * gap + 1), dtype=bool))
            components, _ = ndimage.label(near, structure=CONNECTIVITY)
            components[~pixels] = 0
        else:
            components, _ = ndimage.label(pixels, structure=CONNECTIVITY)
        for number, where in enumerate(ndimage.find_objects(components), start=1):
            if where is None:
                continue
            rows, cols = where
            out.append(
                Instance(
                    int(value) - 1,
                    rows.start,
                    cols.start,
                    rows.stop,
                    cols.stop,
                    height,
                    width,
                    components[where] == number,
                )
            )
    return tuple(out)


def encode_png(mask: np.ndarray) -> np.ndarray:
    """A (H, W) uint8 array as PNG bytes (uint8 array, what the decode pipeline is fed)."""
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG", compress_level=1)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


@dataclass(frozen=True, eq=False)
class DonorTable:
    """The defects DLI may inject (see the module docstring); donor k is row k of each array.

    Attributes:
        sample: (K,) int64 manifest index of each donor's image.
        class_id: (K,) int64 class of each donor.
        boxes: (K, 4) float64 box of each donor's pixels as fractions (NaN where unknown).
        instances: each donor's instance, or None when the whole mask of its image is the donor.
    """

    sample: np.ndarray
    class_id: np.ndarray
    boxes: np.ndarray
    instances: tuple[Instance | None, ...]
    _png: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.instances)

    def pool(self, num_classes: int) -> dict[int, list[int]]:
        """Donor ids per class (every class key present), in table order."""
        out: dict[int, list[int]] = {c: [] for c in range(num_classes)}
        for k, c in enumerate(self.class_id.tolist()):
            out[c].append(k)
        return out

    def mask_png(self, donor: int) -> np.ndarray | None:
        """The donor's mask as PNG bytes (1 on its pixels), or None when its image's mask file is it."""
        instance = self.instances[donor]
        if instance is None:
            return None
        encoded = self._png.get(donor)
        if encoded is None:
            encoded = self._png[donor] = encode_png(instance.full_mask())
        return encoded

    @classmethod
    def whole_masks(
        cls, manifest: Manifest, indices: Sequence[int] | None = None, boxes: np.ndarray | None = None
    ) -> DonorTable:
        """One donor per single-class defect image of `indices` (default: all of them): its whole mask.

        `boxes`: (len(manifest), 4) defect boxes of the samples (`ValidationReport.mask_boxes`).
        """
        if indices is None:
            indices = range(len(manifest))
        chosen = sorted({int(i) for i in indices if len(manifest.samples[i].classes) == 1})
        # Table order: class by class, each in manifest order (the order of the pool's draws).
        chosen.sort(key=lambda i: manifest.samples[i].class_id)
        box_rows = np.full((len(chosen), 4), np.nan) if boxes is None else np.asarray(boxes)[chosen]
        return cls(
            np.array(chosen, dtype=np.int64),
            np.array([manifest.samples[i].class_id for i in chosen], dtype=np.int64),
            np.asarray(box_rows, dtype=np.float64).reshape(-1, 4),
            (None,) * len(chosen),
        )

    @classmethod
    def from_instances(
        cls,
        manifest: Manifest,
        instances: Mapping[Sample, Sequence[Instance]],
        min_area: int = MIN_DONOR_AREA,
        *,
        unit: str = "auto",
    ) -> DonorTable:
        """The donors of `manifest`'s samples, by `unit` (`DONOR_UNITS`).

        ``instance``: every instance with at least `min_area` pixels. ``auto``: the whole mask of
        each single-class image (its instances' union, as the paper injects; any non-empty one),
        and the instances of each image holding several classes. Table order: class by class;
        within a class, by manifest index, then instance order.
        """
        if unit not in DONOR_UNITS:
            raise ValueError(f"donor unit {unit!r}: choose one of {', '.join(DONOR_UNITS)}")
        rows: list[tuple[int, int, Instance | None, tuple[float, ...]]] = []
        for index, sample in enumerate(manifest.samples):
            found = instances.get(sample, ())
            if sample.is_free or not found:
                continue
            if unit == "auto" and len(sample.classes) == 1:
                tops, lefts, bottoms, rights = zip(*(i.box for i in found), strict=True)
                rows.append(
                    (sample.class_id, index, None, (min(tops), min(lefts), max(bottoms), max(rights)))
                )
                continue
            for instance in found:
                if instance.area >= min_area:
                    rows.append((instance.class_id, index, instance, instance.box))
        rows.sort(key=lambda row: (row[0], row[1]))  # stable: instance order kept within an image
        return cls(
            np.array([r[1] for r in rows], dtype=np.int64),
            np.array([r[0] for r in rows], dtype=np.int64),
            np.array([r[3] for r in rows], dtype=np.float64).reshape(-1, 4),
            tuple(r[2] for r in rows),
        )


def canvas_boxes(manifest: Manifest, instances: Mapping[Sample, Sequence[Instance]]) -> list[np.ndarray]:
    """Each sample's defect boxes (m, 4) as fractions: its instances' boxes; none for a
    defect-free sample, one NaN row for a defect sample whose instances were not measured."""
    out = []
    for sample in manifest.samples:
        found = instances.get(sample, ())
        if sample.is_free:
            out.append(np.zeros((0, 4)))
        elif found:
            out.append(np.array([i.box for i in found], dtype=np.float64))
        else:
            out.append(np.full((1, 4), np.nan))
    return out


def instance_summary(instances: Sequence[Sequence[Instance]], num_classes: int) -> dict[str, list[int]]:
    """Per class: the number of instances and their pixel areas (for reports)."""
    areas: list[list[int]] = [[] for _ in range(num_classes)]
    for per_sample in instances:
        for instance in per_sample:
            areas[instance.class_id].append(instance.area)
    return {"count": [len(a) for a in areas], "areas": [int(sum(a)) for a in areas]}
