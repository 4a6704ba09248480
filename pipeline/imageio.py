"""Reading images and masks from disk into NumPy arrays, with errors that name the file.

The one place that decides how a grayscale image and a binary mask are read, so that
validation, preview, prediction and benchmarks agree pixel for pixel.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from dli.errors import DliError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
"""File suffixes (lower case) read as images."""

MASK_THRESHOLD = 0
"""A mask pixel is defect when its 8-bit value is `> MASK_THRESHOLD`.

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


def _read_l(path: str | os.PathLike[str], what: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.array(image if image.mode == "L" else image.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise DliError(f"{what} not found: {path}") from None
    except READ_ERRORS as error:
        raise DliError(f"cannot read {what} {path}: {error}") from None


def read_gray(path: str | os.PathLike[str]) -> np.ndarray:
    """The image at `path` as a (H, W) uint8 array; colour images are converted to luminance."""
    return _read_l(path, "image")


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """The mask at `path` as a (H, W) bool array (pixel value > `MASK_THRESHOLD`)."""
    return _read_l(path, "mask") > MASK_THRESHOLD


def is_image_file(path: Path) -> bool:
    """Whether `path` has one of the `IMAGE_EXTENSIONS` (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS
