"""Training on crops: where each sample's S x S crop lies in its native-resolution image.

With `--crop S` (and optionally `--scale F`, applied first), a training sample is an S x S
window of its image at native resolution (or scaled by F), never the whole image squeezed into
a square. The crop is folded into the sample's augmentation matrix: `crop_matrix` maps native
pixel coordinates to crop coordinates (scale by F, then shift by the crop's corner), and the
loader composes the plan's matrix after it, so DALI's one `warp_affine` per sample cuts, scales
and augments in a single resampling, on the GPU where there is one. A crop side that reaches
past a small image's edge repeats its border pixels (DALI's warp clamps; the image is never
upscaled).

Where the crop lies is drawn from labels only, like the rest of a plan (a generator seeded by
seed, epoch and batch): with probability `defect_prob` (`--crop-defect-prob`) a defect image's
crop contains its defect box (the box of its mask, measured at validation; a box larger than
the crop gives a crop inside it), else the crop is uniform over the image; a defect-free image
always gets a uniform crop. DLI's donors always get a crop that contains their defect, so the
donor's defect lands inside the canvas crop where the donor's own crop put it (then the plan's
affine moves it, as without crops). The donor box, re-expressed as a fraction of its crop, sizes
the Poisson windows as today's whole-image box does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dli.common.errors import DliError
from dli.data.imageio import READ_ERRORS, upright_size
from dli.pipeline.augment import compose

DEFAULT_DEFECT_PROB = 0.5
"""`--crop-defect-prob`: share of defect images whose crop is made to contain the defect."""


@dataclass(frozen=True)
class CropConfig:
    """`--crop S`, `--scale F`, `--crop-defect-prob P`."""

    size: int
    scale: float = 1.0
    defect_prob: float = DEFAULT_DEFECT_PROB


def image_sizes(paths: Sequence[Path]) -> np.ndarray:
    """(N, 2) int64 (H, W) of each image as DALI decodes it (EXIF orientation applied), from its
    header (no decoding)."""
    sizes = np.zeros((len(paths), 2), np.int64)
    for row, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                sizes[row] = upright_size(image)
        except READ_ERRORS as error:
            raise DliError(f"cannot read image {path}: {error}") from None
    return sizes


def check_crop_fits(crop: CropConfig, sizes: np.ndarray, source: object) -> None:
    """`DliError` when every image, after `--scale`, is smaller than the crop in both sides."""
    scaled = np.maximum(1, np.round(sizes * crop.scale))
    if len(scaled) and not ((scaled[:, 0] >= crop.size) | (scaled[:, 1] >= crop.size)).any():
        largest = sizes[np.argmax(sizes.prod(axis=1))]
        raise DliError(
            f"--crop {crop.size}: larger than every training image of {source} in both sides "
            f"(largest {largest[1]}x{largest[0]}"
            + (f", {int(scaled.max())} px at --scale {crop.scale:g}" if crop.scale != 1 else "")
            + "): crops would be mostly padding; use a smaller --crop or train without it"
        )


class CropSampler:
    """Draws crop windows for the samples of one manifest (see the module docstring).

    Args:
        config: crop size, scale and defect probability.
        sizes: (N, 2) native (H, W) of each sample.
        boxes: (N, 4) defect boxes as fractions (top, left, bottom, right), NaN where unknown.
    """

    def __init__(self, config: CropConfig, sizes: np.ndarray, boxes: np.ndarray | None) -> None:
        self.config = config
        self.sizes = np.asarray(sizes, np.float64) * config.scale
        self.boxes = None if boxes is None else np.asarray(boxes, np.float64)

    def _pixel_box(self, index: int) -> np.ndarray | None:
        if self.boxes is None or np.isnan(self.boxes[index]).any():
            return None
        height, width = self.sizes[index]
        return self.boxes[index] * np.array([height, width, height, width])

    def corner(self, index: int, rng: np.random.Generator, *, with_defect: bool) -> tuple[float, float]:
        """(top, left) of the crop of sample `index` in its scaled image, whole pixels."""
        size = self.config.size
        height, width = self.sizes[index]
        box = self._pixel_box(index) if with_defect else None
        corner = []
        for axis, length in enumerate((height, width)):
            room = max(0.0, math.floor(length) - size)
            if box is None:
                low, high = 0.0, room
            else:
                near, far = box[axis], box[axis + 2]
                low, high = sorted((far - size, near))  # crop holds the box, or lies inside a large one
                low, high = min(max(low, 0.0), room), min(max(high, 0.0), room)
            corner.append(float(math.floor(rng.uniform(low, high + 1e-9)) if high > low else math.floor(low)))
        return corner[0], corner[1]

    def matrix(self, corner: tuple[float, float]) -> np.ndarray:
        """(2, 3) float64 map from native pixel coordinates to crop coordinates."""
        scale = self.config.scale
        top, left = corner
        return np.array([[scale, 0.0, -left], [0.0, scale, -top]])

    def box_in_crop(self, index: int, corner: tuple[float, float]) -> np.ndarray:
        """Sample `index`'s defect box as fractions of its crop (NaN where unknown)."""
        box = self._pixel_box(index)
        if box is None:
            return np.full(4, np.nan)
        top, left = corner
        return (box - np.array([top, left, top, left])) / self.config.size


def crop_matrices(
    matrices: np.ndarray,
    rng: np.random.Generator,
    crops: CropSampler,
    batch: tuple[Sequence[int], np.ndarray],
    donors: Sequence[int],
    donor_crops: CropSampler | None,
    donor_boxes: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """A batch's (M, 2, 3) matrices composed after each sample's crop, and the donors' boxes as
    fractions of their crops (for the Poisson windows; None without `donor_boxes`).

    `batch` is (manifest indices, whether each image holds a defect) of the N batch images, the
    first N of `matrices`; the others are the sources of the injections of `donors`, one crop per
    donor (each holding its defect). Corners are drawn from `rng` in that order.
    """
    corners = []
    for index, defective in zip(*batch, strict=True):
        defect = bool(defective) and rng.random() < crops.config.defect_prob
        corners.append(crops.corner(index, rng, with_defect=defect))
    donor_corners: dict[int, tuple[float, float]] = {}
    for donor in donors:
        if donor not in donor_corners:
            assert donor_crops is not None
            donor_corners[donor] = donor_crops.corner(donor, rng, with_defect=True)
        corners.append(donor_corners[donor])
    composed = np.stack([compose(m, crops.matrix(c)) for m, c in zip(matrices, corners, strict=True)])
    boxes = None
    if donor_boxes is not None and donor_crops is not None:
        boxes = donor_boxes.copy()
        for donor, corner in donor_corners.items():
            boxes[donor] = donor_crops.box_in_crop(donor, corner)
    return composed.astype(np.float32), boxes
