"""Where an injected defect lands on a defective canvas: clear of the canvas's own defects.

Labels only (boxes and matrices, no pixels): the planner uses it to place an instance into the
defect-free area of an image that already holds defects (`DliConfig.canvas` ``any``/``auto``).
Boxes are fractions of an image (top, left, bottom, right; far edges exclusive, as
`ValidationReport.mask_boxes`); `output_box` maps one through a 2x3 augmentation matrix
(`dli.pipeline.augment` convention: output pixel grid, (x, y) coordinates) into an inclusive
pixel box of the H x W output grid, widened by a pad. Two regions whose padded boxes are
disjoint share no pixel, so the Poisson domain (the instance dilated by the pad) never touches
an existing defect either.
"""

from __future__ import annotations

import numpy as np

from dli.pipeline.augment import Size

PLACEMENT_MARGIN = 1
"""Pixels added around a region beyond the dilation radius, against rounding in the warp's sampling."""

PLACEMENT_TRIES = 16
"""Random positions tried for an instance whose augmented position overlaps a canvas defect."""

EDGE = 1e-9
"""A box this close to an image edge touches it (the warp would repeat that edge's pixels)."""


def output_box(box: np.ndarray, matrix: np.ndarray, size: Size, pad: int) -> np.ndarray:
    """(top, left, bottom, right) inclusive pixels, in the output grid, of the fraction `box`
    mapped by the (2, 3) `matrix`, widened by `pad` (unclipped: it may leave the grid)."""
    height, width = size
    top, left, bottom, right = (float(v) for v in box)
    xs = np.array([left, right, left, right]) * width
    ys = np.array([top, top, bottom, bottom]) * height
    mapped = matrix[:, :2].astype(np.float64) @ np.stack([xs, ys]) + matrix[:, 2:3].astype(np.float64)
    low, high = mapped.min(axis=1), mapped.max(axis=1)
    # Pixel (i, j) has its centre at (j + 0.5, i + 0.5).
    first = np.floor(low - 0.5) - pad
    last = np.ceil(high - 0.5) + pad
    return np.array([first[1], first[0], last[1], last[0]], dtype=np.int64)


def overlaps(box: np.ndarray, others: np.ndarray) -> bool:
    """Whether the inclusive pixel `box` intersects any row of `others` (k, 4)."""
    if len(others) == 0:
        return False
    return bool(
        np.any(
            (others[:, 0] <= box[2])
            & (box[0] <= others[:, 2])
            & (others[:, 1] <= box[3])
            & (box[1] <= others[:, 3])
        )
    )


def touches_edge(box: np.ndarray) -> bool:
    """Whether a fraction box reaches an image edge (moving it would smear that edge's pixels)."""
    top, left, bottom, right = (float(v) for v in box)
    return top <= EDGE or left <= EDGE or bottom >= 1 - EDGE or right >= 1 - EDGE


def place(
    donor_box: np.ndarray,
    matrix: np.ndarray,
    canvas_boxes: np.ndarray,
    canvas_matrix: np.ndarray,
    size: Size,
    pad: int,
    rng: np.random.Generator,
) -> np.ndarray | None:
    """`matrix`, or it translated, so that the donor's region misses every canvas defect box.

    Returns the (2, 3) float32 matrix to use, or None when no position was found (unknown boxes,
    a region larger than the image, a donor touching its image's edge that would have to move,
    or `PLACEMENT_TRIES` positions all overlapping). Draws from `rng` only when the position
    `matrix` gives overlaps, so canvases without defects consume no draws.
    """
    if np.isnan(donor_box).any() or (len(canvas_boxes) and np.isnan(canvas_boxes).any()):
        return None
    occupied = np.array([output_box(b, canvas_matrix, size, 0) for b in canvas_boxes]).reshape(-1, 4)
    region = output_box(donor_box, matrix, size, pad)
    if not overlaps(region, occupied):
        return matrix
    height, width = size
    extent_y, extent_x = int(region[2] - region[0]), int(region[3] - region[1])
    if touches_edge(donor_box) or extent_y >= height or extent_x >= width:
        return None
    for _ in range(PLACEMENT_TRIES):
        top = int(rng.integers(0, height - extent_y))
        left = int(rng.integers(0, width - extent_x))
        moved = matrix.astype(np.float64).copy()
        moved[1, 2] += top - region[0]
        moved[0, 2] += left - region[1]
        if not overlaps(output_box(donor_box, moved, size, pad), occupied):
            return moved.astype(np.float32)
    return None
