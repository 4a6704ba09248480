"""Geometric augmentation as 2x3 affine matrices, sampled on the host and applied by DALI.

Every random geometric transform of the data path is drawn here as a matrix, Kornia-style, and
then only *applied* by `fn.warp_affine` in `dli.pipeline.dali`: the randomness lives in NumPy
generators seeded by the loader, so a recorded matrix replays the same pixels.

Conventions (those of DALI's warp operators):

- A matrix maps a point (x, y) of the SOURCE image to the output image, x along the width, in
  continuous pixel coordinates where pixel (row i, column j) covers [j, j+1) x [i, i+1) and has
  its centre at (j + 0.5, i + 0.5). The loader passes them with ``inverse_map=False``.
- Matrices act on the H x W grid after resizing, so the same matrix fits an image and its mask
  (the mask warped with nearest-neighbour interpolation stays aligned with the image).
- In this coordinate system a horizontal flip is exactly ``x -> W - x``: it moves pixel centre
  j + 0.5 to W - j - 0.5, the centre of column W - 1 - j.

Defect augmentation follows the reference implementation's per-class albumentations pipelines
(`MT_DEFECT_AUGMENT`): ``Flip`` (with probability p: horizontal, vertical or both, uniformly)
then ``ShiftScaleRotate`` about the image centre. Pixels that come from outside the source are
the clamped border pixels (DALI's default), not albumentations' reflect-101: a reflected border
would mirror pieces of a defect touching the edge (break, fray) into the image, a clamped one
just continues it to the new edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dli.common.errors import DliError

Size = tuple[int, int]
"""(height, width) of the output grid, in pixels."""

IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)


@dataclass(frozen=True)
class AffineAugment:
    """Ranges of a random flip followed by a random shift-scale-rotate about the image centre.

    Attributes:
        flip_p: probability of a flip; a flip is horizontal, vertical or both with equal odds.
        ssr_p: probability of a shift-scale-rotate.
        rotate: largest rotation, in degrees (drawn uniformly in [-rotate, rotate]).
        shift: largest shift, as a fraction of the side (drawn per axis in [-shift, shift]).
        scale: largest relative zoom (factor drawn uniformly in [1 - scale, 1 + scale]).
    """

    flip_p: float = 0.0
    ssr_p: float = 0.0
    rotate: float = 0.0
    shift: float = 0.0
    scale: float = 0.0

    def __post_init__(self) -> None:
        for name in ("flip_p", "ssr_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise DliError(f"augmentation {name} = {value}: must be a probability in [0, 1]")
        for name in ("rotate", "shift", "scale"):
            if getattr(self, name) < 0:
                raise DliError(f"augmentation {name} = {getattr(self, name)}: must be >= 0")
        if self.scale >= 1.0:
            raise DliError(f"augmentation scale = {self.scale}: must be < 1 (the zoom factor must stay > 0)")

    def sample(self, rng: np.random.Generator, size: Size) -> np.ndarray:
        """One random (2, 3) float32 matrix: the flip (maybe none), then the shift-scale-rotate."""
        matrix = IDENTITY
        if self.flip_p > 0 and rng.random() < self.flip_p:
            horizontal, vertical = FLIP_KINDS[int(rng.integers(len(FLIP_KINDS)))]
            matrix = flip_matrix(size, horizontal=horizontal, vertical=vertical)
        if self.ssr_p > 0 and rng.random() < self.ssr_p:
            angle = rng.uniform(-self.rotate, self.rotate)
            zoom = rng.uniform(1.0 - self.scale, 1.0 + self.scale)
            dx, dy = rng.uniform(-self.shift, self.shift, size=2)
            matrix = compose(shift_scale_rotate_matrix(size, angle=angle, scale=zoom, shift=(dx, dy)), matrix)
        return matrix

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


FLIP_KINDS: tuple[tuple[bool, bool], ...] = ((True, False), (False, True), (True, True))
"""(horizontal, vertical) of albumentations' ``Flip``: horizontal, vertical or both."""

MT_DEFECT_AUGMENT: dict[str, AffineAugment] = {
    "blowhole": AffineAugment(flip_p=0.5, ssr_p=0.5, rotate=10.0, shift=0.0625, scale=0.1),
    "break": AffineAugment(flip_p=0.5),
    "crack": AffineAugment(ssr_p=0.5, rotate=5.0, shift=0.0625, scale=0.1),
    "fray": AffineAugment(flip_p=0.5),
    "uneven": AffineAugment(flip_p=0.5),
}
"""Per-class augmentation of injected Magnetic Tile defects, as in the reference implementation."""

DEFAULT_DEFECT_AUGMENT = AffineAugment(flip_p=0.5, ssr_p=0.5, rotate=5.0, shift=0.0625, scale=0.1)
"""For a class name not in `MT_DEFECT_AUGMENT`: a flip and a mild shift-scale-rotate."""


def defect_augments(class_names: Sequence[str]) -> tuple[AffineAugment, ...]:
    """The augmentation of each defect class (index = class id), looked up by name."""
    return tuple(MT_DEFECT_AUGMENT.get(name.lower(), DEFAULT_DEFECT_AUGMENT) for name in class_names)


# ---------------------------------------------------------------------------------------------
# Matrices.


def as_3x3(matrix: np.ndarray) -> np.ndarray:
    """A (..., 2, 3) affine matrix as (..., 3, 3) homogeneous float64."""
    matrix = np.asarray(matrix, dtype=np.float64)
    bottom = np.broadcast_to(np.array([0.0, 0.0, 1.0]), (*matrix.shape[:-2], 1, 3))
    return np.concatenate([matrix, bottom], axis=-2)


def compose(*matrices: np.ndarray) -> np.ndarray:
    """The matrix applying the last argument first: ``compose(b, a)`` maps p to b(a(p))."""
    out = np.eye(3)
    for matrix in matrices:
        out = out @ as_3x3(matrix)
    return out[:2].astype(np.float32)


def invert(matrix: np.ndarray) -> np.ndarray:
    """The (2, 3) inverse of an affine (2, 3) matrix."""
    return np.linalg.inv(as_3x3(matrix))[:2].astype(np.float32)


def flip_matrix(size: Size, *, horizontal: bool, vertical: bool) -> np.ndarray:
    """Mirror an H x W image left-right and/or top-bottom (exact on the pixel grid)."""
    height, width = size
    sx, sy = (-1.0 if horizontal else 1.0), (-1.0 if vertical else 1.0)
    tx, ty = (float(width) if horizontal else 0.0), (float(height) if vertical else 0.0)
    return np.array([[sx, 0.0, tx], [0.0, sy, ty]], dtype=np.float32)


def shift_scale_rotate_matrix(
    size: Size, *, angle: float, scale: float, shift: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Rotate by `angle` degrees (counter-clockwise on screen) and zoom by `scale` about the image
    centre, then shift by (dx * W, dy * H) pixels: albumentations' ``ShiftScaleRotate``."""
    height, width = size
    cx, cy = width / 2.0, height / 2.0
    theta = math.radians(angle)
    # y points down, so a counter-clockwise turn on screen is a clockwise one in (x, y).
    a, b = scale * math.cos(theta), scale * math.sin(theta)
    tx = cx - a * cx - b * cy + shift[0] * width
    ty = cy + b * cx - a * cy + shift[1] * height
    return np.array([[a, b, tx], [-b, a, ty]], dtype=np.float32)


def random_flips(rng: np.random.Generator, count: int, size: Size, p: float = 0.5) -> np.ndarray:
    """(count, 2, 3) training flips of batch images: horizontal and vertical, each with probability p."""
    height, width = size
    horizontal, vertical = (rng.random((count, 2)) < p).T
    out = np.zeros((count, 2, 3), dtype=np.float32)
    out[:, 0, 0] = np.where(horizontal, -1.0, 1.0)
    out[:, 0, 2] = np.where(horizontal, float(width), 0.0)
    out[:, 1, 1] = np.where(vertical, -1.0, 1.0)
    out[:, 1, 2] = np.where(vertical, float(height), 0.0)
    return out


def identities(count: int) -> np.ndarray:
    """(count, 2, 3) identity matrices."""
    return np.broadcast_to(IDENTITY, (count, 2, 3)).copy()


# ---------------------------------------------------------------------------------------------
# Reference implementation, for tests and for reading the convention off code.


def apply_affine_numpy(image: np.ndarray, matrix: np.ndarray, *, nearest: bool) -> np.ndarray:
    """Warp a (H, W) or (H, W, C) image by the source-to-output `matrix`, as DALI's warp does.

    Each output pixel centre is mapped back to the source with the inverse matrix; the value
    there is the pixel containing it (`nearest`) or the bilinear mix of the four nearest pixel
    centres; coordinates outside the image are clamped to the border. Output dtype = input dtype
    (rounded to nearest for integer types with bilinear interpolation).
    """
    height, width = image.shape[:2]
    back = invert(matrix).astype(np.float64)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    x, y = cols + 0.5, rows + 0.5
    sx = back[0, 0] * x + back[0, 1] * y + back[0, 2]
    sy = back[1, 0] * x + back[1, 1] * y + back[1, 2]
    if nearest:
        j = np.clip(np.floor(sx).astype(np.int64), 0, width - 1)
        i = np.clip(np.floor(sy).astype(np.int64), 0, height - 1)
        return image[i, j]
    fx, fy = sx - 0.5, sy - 0.5
    j0, i0 = np.floor(fx), np.floor(fy)
    wx, wy = fx - j0, fy - i0
    if image.ndim == 3:
        wx, wy = wx[..., None], wy[..., None]
    j0, i0 = j0.astype(np.int64), i0.astype(np.int64)
    j0c, j1c = np.clip(j0, 0, width - 1), np.clip(j0 + 1, 0, width - 1)
    i0c, i1c = np.clip(i0, 0, height - 1), np.clip(i0 + 1, 0, height - 1)
    values = image.astype(np.float64)
    top = values[i0c, j0c] * (1 - wx) + values[i0c, j1c] * wx
    bottom = values[i1c, j0c] * (1 - wx) + values[i1c, j1c] * wx
    out = top * (1 - wy) + bottom * wy
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(image.dtype)
    return out.astype(image.dtype)
