"""Reading images and masks from disk into NumPy arrays, with errors that name the file.

The one place that decides how a grayscale image and a binary mask are read, so that
validation, preview, prediction and benchmarks agree pixel for pixel.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from dli.errors import DliError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
"""File suffixes (lower case) read as images."""

MASK_THRESHOLD = 0
"""A mask pixel is defect when its value, in the mask's own bit depth, is `> MASK_THRESHOLD`.

The value is the stored sample itself for grayscale masks of any depth (1-, 8- and 16-bit:
0/1, 0/255 and 0/65535 masks all mean the same) and the largest colour channel for RGB(A) and
palette masks (the palette's colour, alpha ignored). `defect_pixels` (PIL: validation, class
pixel counts, preview) and the DALI pipeline (training, `dli eval`) both apply this rule.

Magnetic Tile masks are nearly binary: about 95% of their non-zero pixels are 255 and the
rest are anti-aliased edge values 1..254. Counting every non-zero pixel as defect follows the
reference implementation, so IoU numbers stay comparable with the paper.
"""

READ_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # PIL's plugins raise it for malformed headers
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)
"""What PIL raises on a missing, truncated or corrupt file."""


MAX_DECODE_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
"""The largest image dli decodes (Pillow's decompression-bomb limit, about 179 megapixels); a
larger one is refused from its header, before any pixel is decoded. Below it, Pillow's warning
about images over half this size is silenced: inspection cameras take such pictures."""


def _read_l(path: str | os.PathLike[str], what: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return np.array(image if image.mode == "L" else image.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise DliError(f"{what} not found: {path}") from None
    except Image.DecompressionBombError:
        raise DliError(
            f"{what} {path} is too large to decode (more than {MAX_DECODE_PIXELS / 1e6:.0f} megapixels)"
        ) from None
    except READ_ERRORS as error:
        raise DliError(f"cannot read {what} {path}: {error}") from None


def defect_pixels(mask: Image.Image) -> np.ndarray:
    """The (H, W) bool defect map of an opened mask, by the rule of `MASK_THRESHOLD`."""
    mode = mask.mode
    if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
        values = np.asarray(mask)
    elif mode == "LA":
        values = np.asarray(mask)[..., 0]
    else:  # RGB, RGBA, palette and the rest: the colour each pixel shows, channel by channel
        values = np.asarray(mask if mode == "RGB" else mask.convert("RGB")).max(axis=2)
    return values > MASK_THRESHOLD


def read_gray(path: str | os.PathLike[str]) -> np.ndarray:
    """The image at `path` as a (H, W) uint8 array; colour images are converted to luminance."""
    return _read_l(path, "image")


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """The mask at `path` as a (H, W) bool array (see `MASK_THRESHOLD` and `defect_pixels`)."""
    try:
        with Image.open(path) as mask:
            return defect_pixels(mask)
    except FileNotFoundError:
        raise DliError(f"mask not found: {path}") from None
    except READ_ERRORS as error:
        raise DliError(f"cannot read mask {path}: {error}") from None


def read_index(path: str | os.PathLike[str]) -> np.ndarray:
    """The index mask at `path` as a (H, W) int32 array of its stored values (8 or 16 bits)."""
    try:
        with Image.open(path) as mask:
            return np.asarray(mask).astype(np.int32)
    except FileNotFoundError:
        raise DliError(f"mask not found: {path}") from None
    except READ_ERRORS as error:
        raise DliError(f"cannot read mask {path}: {error}") from None


def is_image_file(path: Path) -> bool:
    """Whether `path` has one of the `IMAGE_EXTENSIONS` (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS
