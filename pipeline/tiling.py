"""Tiled inference: a large image predicted by overlapping S x S tiles, in NumPy (no torch).

One algorithm serves `dli eval`, `dli predict --checkpoint` (the model runs on torch) and
`dli predict --onnx` (onnxruntime): the caller passes a function that turns a batch of tiles
into logits, this module does everything else, so the two predict paths tile identically.

The algorithm (the ideas of mmsegmentation's `slide_inference` and anomalib's `Tiler`):

- Tiles start every `stride = S - round(S * overlap)` pixels along each axis; the last tile is
  shifted back inside the image (start `L - S`), so every tile is a full S x S window of the
  image. An image side shorter than S is padded to S by reflection (never upscaled) and the
  padding is cut off the result.
- Each tile's logits are weighted by a separable window `w(y) * w(x)` that down-weights the tile's
  borders, where a convolution sees zero padding instead of the image: ``hann``
  (sin^2(pi (i + 1/2) / S), never zero), ``gaussian`` (sigma S / 8, as nnU-Net's) or ``uniform``
  (mmsegmentation's plain average). The weights are normalized along each axis before use
  (`w_k(y) / sum_k w_k(y)`), so the weighted sum needs no division afterwards, and a pixel covered
  by a single tile gets that tile's logit exactly.
- Tiles are cut and run in batches of `batch` tiles in row-major order; the logits are summed
  into a band of S image rows. Once every tile of a tile row has been added, the rows above the
  next tile row are final and are handed out (`TiledInference.bands`), so memory is bounded by
  the tile batch and one band (classes x S x W float32: 100 MB for 5 classes, S = 512 and a
  10,000-pixel-wide image), never by the whole image's logits.
- `scale` (training's `--scale`) resizes the image by that factor first (Pillow, antialiased
  bilinear); the logits are then resized back to the image's own size (bilinear, band by band
  with Pillow's box resize), so the result always has the input's size. The scaled image's logits
  are held whole (classes x scaled pixels float32).

`Tiling` is what travels with a model (checkpoint `model_info`, ONNX metadata): tile size,
overlap, window and scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from dli.common.errors import DliError
from dli.common.model_checks import MAX_IMAGE_SIZE

WINDOWS: tuple[str, ...] = ("hann", "gaussian", "uniform")
"""Tile weightings: down-weight borders by a Hann or a Gaussian window, or average uniformly."""

DEFAULT_OVERLAP = 0.25
DEFAULT_WINDOW = "gaussian"
"""The window with the fewest seam errors measured (docs/performance.md: 0.016% of mask pixels
differ from one whole-image pass at overlap 0.25, Hann 0.017%, uniform 0.033%)."""
MAX_OVERLAP = 0.9

TileRunner = Callable[[np.ndarray], np.ndarray]
"""(N, C, S, S) float32 normalized tiles -> (N, classes, S, S) float32 logits."""


@dataclass(frozen=True)
class Tiling:
    """How a model predicts an image larger than what it was trained on.

    Attributes:
        tile: side S of the square tiles (a multiple of the encoder's stride).
        overlap: fraction of S shared by neighbouring tiles, in [0, 0.9].
        window: tile weighting, one of `WINDOWS`.
        scale: factor the image is resized by before tiling (1: native resolution).
    """

    tile: int
    overlap: float = DEFAULT_OVERLAP
    window: str = DEFAULT_WINDOW
    scale: float = 1.0

    def check(self, stride: int = 1) -> Tiling:
        """`DliError` naming the flag and the value when a setting is invalid; returns self."""
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1:
            raise DliError(f"--tile {self.tile}: must be a positive integer")
        if self.tile > MAX_IMAGE_SIZE:  # a tile is one model input: bounded like --image-size
            raise DliError(f"--tile {self.tile}: must be at most {MAX_IMAGE_SIZE}")
        if self.tile % stride:
            raise DliError(f"--tile {self.tile}: must be a multiple of the encoder's stride {stride}")
        check_overlap(self.overlap)
        if self.window not in WINDOWS:
            raise DliError(f"--window {self.window}: choose from {', '.join(WINDOWS)}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and 0 < self.scale <= 1):
            raise DliError(f"--scale {self.scale}: must be in (0, 1]")
        return self

    @property
    def stride(self) -> int:
        """Distance between the starts of neighbouring tiles."""
        return max(1, self.tile - round(self.tile * self.overlap))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Tiling | None:
        if not data:
            return None
        return cls(
            tile=int(data["tile"]),
            overlap=float(data.get("overlap", DEFAULT_OVERLAP)),
            window=str(data.get("window", DEFAULT_WINDOW)),
            scale=float(data.get("scale", 1.0)),
        )


def check_overlap(overlap: float) -> None:
    """`DliError` unless `overlap` is a number in [0, `MAX_OVERLAP`]."""
    number = isinstance(overlap, (int, float)) and not isinstance(overlap, bool) and math.isfinite(overlap)
    if not number or not 0 <= overlap <= MAX_OVERLAP:
        raise DliError(f"--overlap {overlap}: must be in [0, {MAX_OVERLAP:g}]")


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Starts of the tiles along one side of `length` (>= `tile`); the last one ends at `length`."""
    if length <= tile:
        return [0]
    count = -(-(length - tile) // stride) + 1
    return [min(k * stride, length - tile) for k in range(count)]


def window_1d(tile: int, kind: str) -> np.ndarray:
    """(tile,) float64 weights of one tile side, all > 0 (see the module docstring)."""
    centres = np.arange(tile, dtype=np.float64) + 0.5
    if kind == "hann":
        return np.sin(np.pi * centres / tile) ** 2
    if kind == "gaussian":
        sigma = tile / 8
        return np.exp(-((centres - tile / 2) ** 2) / (2 * sigma**2))
    if kind == "uniform":
        return np.ones(tile)
    raise DliError(f"window {kind!r}: choose from {', '.join(WINDOWS)}")


def axis_weights(length: int, starts: list[int], window: np.ndarray) -> np.ndarray:
    """(len(starts), tile) float32: each tile's window divided by the sum over tiles at each pixel."""
    tile = len(window)
    total = np.zeros(length, np.float64)
    for start in starts:
        total[start : start + tile] += window
    return np.stack([window / total[start : start + tile] for start in starts]).astype(np.float32)


def pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) `image` padded at the bottom and right by reflection to at least `height` x `width`."""
    pad_h, pad_w = max(0, height - image.shape[1]), max(0, width - image.shape[2])
    if not pad_h and not pad_w:
        return image
    mode = "reflect" if min(image.shape[1:]) > 1 else "edge"
    return np.pad(image, ((0, 0), (0, pad_h), (0, pad_w)), mode=mode)


def _resize(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    """One (H, W) plane resized with Pillow's bilinear filter (antialiased when shrinking)."""
    mode_image = Image.fromarray(plane if plane.dtype == np.uint8 else plane.astype(np.float32))
    return np.asarray(mode_image.resize((width, height), Image.Resampling.BILINEAR))


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The (H, W) an image of `height` x `width` has after `--scale`."""
    return max(1, round(height * scale)), max(1, round(width * scale))


class TiledInference:
    """Tiled prediction of (C, H, W) images with `runner` (see the module docstring).

    Args:
        runner: normalized tiles -> logits (torch or onnxruntime behind it).
        tiling: tile size, overlap, window and scale.
        normalize: (N, C, S, S) raw tiles (the image's dtype) -> the runner's float32 input.
        batch: tiles per `runner` call.
    """

    def __init__(
        self,
        runner: TileRunner,
        tiling: Tiling,
        normalize: Callable[[np.ndarray], np.ndarray],
        *,
        batch: int = 8,
    ) -> None:
        if batch < 1:
            raise DliError(f"--batch-size {batch}: must be an integer >= 1")
        self.runner, self.tiling, self.normalize, self.batch = runner, tiling, normalize, batch
        self.window = window_1d(tiling.tile, tiling.window)

    def bands(self, image: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, (classes, rows, W) float32 logits) for consecutive bands covering the image."""
        height, width = image.shape[1:]
        if self.tiling.scale == 1.0:
            yield from self._native_bands(image)
            return
        small_h, small_w = scaled_size(height, width, self.tiling.scale)
        small = np.stack([_resize(plane, small_w, small_h) for plane in image])
        logits = np.concatenate([band for _, band in self._native_bands(small)], axis=1)
        planes = [Image.fromarray(plane) for plane in logits]
        for top in range(0, height, self.tiling.tile):
            bottom = min(height, top + self.tiling.tile)
            # Pillow's box resize reads the source around the box, so bands join exactly as one resize.
            box = (0.0, top * small_h / height, float(small_w), bottom * small_h / height)
            yield (
                top,
                np.stack(
                    [
                        np.asarray(p.resize((width, bottom - top), Image.Resampling.BILINEAR, box=box))
                        for p in planes
                    ]
                ),
            )

    def logits(self, image: np.ndarray) -> np.ndarray:
        """(classes, H, W) float32 logits of a (C, H, W) image (the bands put together)."""
        return np.concatenate([band for _, band in self.bands(image)], axis=1)

    def _native_bands(self, image: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        tile = self.tiling.tile
        height, width = image.shape[1:]
        padded = pad_to(image, tile, tile)
        padded_h, padded_w = padded.shape[1:]
        rows = tile_starts(padded_h, tile, self.tiling.stride)
        columns = tile_starts(padded_w, tile, self.tiling.stride)
        row_weights = axis_weights(padded_h, rows, self.window)
        column_weights = axis_weights(padded_w, columns, self.window)
        order = [(r, c) for r in range(len(rows)) for c in range(len(columns))]
        band: np.ndarray | None = None  # logits of rows [top, top + tile)
        top = 0
        done_rows = 0  # tile rows fully added

        def emit(end: int) -> Iterator[tuple[int, np.ndarray]]:
            nonlocal band, top
            assert band is not None
            count = end - top
            out_end = min(end, height)
            if out_end > top:
                yield top, band[:, : out_end - top, :width].copy()
            band[:, : tile - count] = band[:, count:]
            band[:, tile - count :] = 0.0
            top = end

        for first in range(0, len(order), self.batch):
            chunk = order[first : first + self.batch]
            tiles = np.stack(
                [padded[:, rows[r] : rows[r] + tile, columns[c] : columns[c] + tile] for r, c in chunk]
            )
            logits = np.asarray(self.runner(self.normalize(tiles)), dtype=np.float32)
            if band is None:
                band = np.zeros((logits.shape[1], tile, padded_w), np.float32)
            for (r, c), tile_logits in zip(chunk, logits, strict=True):
                while r > done_rows:  # tile row `done_rows` is complete: rows above the next are final
                    yield from emit(rows[done_rows + 1])
                    done_rows += 1
                weight = row_weights[r][:, None] * column_weights[c][None, :]
                offset = rows[r] - top
                band[:, offset : offset + tile, columns[c] : columns[c] + tile] += tile_logits * weight
        yield from emit(padded_h)


def normalizer(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """Raw uint8 tiles (N, 1 or C, S, S) -> float32 (N, C, S, S) scaled to [0, 1] and normalized."""
    mean_array = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    std_array = np.asarray(std, np.float32).reshape(1, -1, 1, 1)

    def normalize(tiles: np.ndarray) -> np.ndarray:
        values = tiles.astype(np.float32) / np.float32(255.0)
        return ((values - mean_array) / std_array).astype(np.float32)

    return normalize
