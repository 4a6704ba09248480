"""Reading images and masks from disk into NumPy arrays, with errors that name the file.

The one place that decides how an image (gray or colour) and a binary mask are read, so that
validation, preview, prediction and benchmarks agree pixel for pixel.

Channels. A file is *stored gray* when its mode is 1-bit or 8-bit gray (`GRAY_MODES`); every other
mode (RGB, RGBA, palette, gray with alpha, 16-bit) goes through RGB. A 3-channel reader takes
the RGB (a gray file repeated in R, G and B; alpha dropped). A 1-channel reader takes a stored-gray
file as it is and converts any other file to the float luma `LUMA` · RGB (ITU-R BT.601 weights,
no rounding): the training pipeline (`dli.pipeline.dali`) and `dli predict` (torch and ONNX)
convert the same way, so a colour image gives a 1-channel model the same input everywhere.
Depth. A 16-bit gray file is scaled to 8 bits as DALI's decoder scales it (v / 257, rounded),
not clipped: a 16-bit image reads the same for training and for `dli predict`.

Orientation. An image's EXIF orientation (JPEG, or a PNG's eXIf chunk) is applied to its pixels,
as DALI's decoder applies it in training, and a mask's own EXIF orientation to the mask: pixels
are read as a viewer shows them (`upright`). Validation names a mask that fits only the stored,
unrotated image (`upright_size`).

An image *looks gray* (`looks_gray`) when it is stored gray or its R, G and B differ by at
most `GRAY_TOLERANCE` levels anywhere; `dli train --channels auto` trains in gray when every
training image looks gray.
"""

from __future__ import annotations

import contextlib
import os
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dli.common.errors import DliError

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

GRAY_MODES: frozenset[str] = frozenset({"1", "L"})
"""PIL modes read (and decoded by DALI) as gray without going through RGB."""

LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""Weights of R, G and B in the gray value of a colour image read in 1 channel (ITU-R BT.601)."""

GRAY_TOLERANCE = 2
"""An RGB image whose channels differ by at most this many levels (of 255) looks gray."""


EXIF_ORIENTATION = 0x0112
"""The EXIF tag of an image's orientation (1: as stored; 5 to 8: rows and columns swapped)."""


def orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image (1 when absent or unreadable)."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: read as stored, as a viewer would
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(image: Image.Image) -> Image.Image:
    """The opened image with its EXIF orientation applied (itself when there is none)."""
    return image if orientation(image) == 1 else ImageOps.exif_transpose(image)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(H, W) of the opened image once its EXIF orientation is applied, from its header."""
    width, height = image.size
    return (width, height) if orientation(image) >= 5 else (height, width)


def check_integer_pixels(image: Image.Image) -> None:
    """ValueError for floating-point pixels (PIL mode F, e.g. a 32-bit float TIFF): their range is
    unknown (0-1? 0-255?), and converting them to 8 bits would silently turn 0-1 values black."""
    if image.mode.startswith("F"):
        raise ValueError("32-bit floating-point pixels; store the image with 8- or 16-bit integers")


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) gray image scaled to 8 bits as DALI scales it; others as they are."""
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image).astype(np.int64)
    return Image.fromarray(np.clip((values + 128) // 257, 0, 255).astype(np.uint8), "L")


@contextlib.contextmanager
def _opened(path: str | os.PathLike[str], what: str) -> Iterator[Image.Image]:
    """`Image.open(path)`; a missing, undecodable or too large file (also while the caller reads
    it) is one `DliError` naming `what` and `path`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                yield opened
    except FileNotFoundError:
        raise DliError(f"{what} not found: {path}") from None
    except Image.DecompressionBombError:
        raise DliError(
            f"{what} {path} is too large to decode (more than {MAX_DECODE_PIXELS / 1e6:.0f} megapixels)"
        ) from None
    except READ_ERRORS as error:
        raise DliError(f"cannot read {what} {path}: {error}") from None


def _read_l(path: str | os.PathLike[str], what: str) -> np.ndarray:
    with _opened(path, what) as opened:
        check_integer_pixels(opened)
        image = _eight_bit(upright(opened))
        return np.array(image if image.mode == "L" else image.convert("L"), dtype=np.uint8)


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


def read_image(path: str | os.PathLike[str], channels: int) -> np.ndarray:
    """The image at `path` as (H, W, `channels`) intensities on [0, 255].

    ``channels=3``: its RGB (gray repeated), uint8. ``channels=1``: a stored-gray file as it is
    (uint8), any other converted to `LUMA` · RGB in float32 (see the module docstring).
    """
    if channels not in (1, 3):
        raise DliError(f"channels {channels}: expected 1 or 3")
    with _opened(path, "image") as opened:
        check_integer_pixels(opened)
        if channels == 1 and stored_gray(opened):
            return np.asarray(upright(opened).convert("L"), dtype=np.uint8)[..., None]
        rgb = np.asarray(_eight_bit(upright(opened)).convert("RGB"), dtype=np.uint8)
    return rgb if channels == 3 else luma(rgb)[..., None]


def luma(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) float32 gray, `LUMA` weights, no rounding (as the training pipeline)."""
    return rgb.astype(np.float32, copy=False) @ np.asarray(LUMA, np.float32)


def stored_gray(image: Image.Image) -> bool:
    """Whether an opened image is read as gray without going through RGB (`GRAY_MODES`)."""
    return image.mode in GRAY_MODES


def looks_gray(image: Image.Image) -> bool:
    """Whether an opened (loaded) image is gray: stored gray, or R, G, B within `GRAY_TOLERANCE`."""
    if stored_gray(image) or image.mode in ("LA", "I", "F") or image.mode.startswith("I;16"):
        return True
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    spread = (
        np.abs(rgb[..., 0] - rgb[..., 1]).max(initial=0),
        np.abs(rgb[..., 1] - rgb[..., 2]).max(initial=0),
    )
    return bool(max(spread) <= GRAY_TOLERANCE)


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """The mask at `path` as a (H, W) bool array (see `MASK_THRESHOLD` and `defect_pixels`)."""
    try:
        with Image.open(path) as mask:
            return defect_pixels(upright(mask))
    except FileNotFoundError:
        raise DliError(f"mask not found: {path}") from None
    except READ_ERRORS as error:
        raise DliError(f"cannot read mask {path}: {error}") from None


def read_index(path: str | os.PathLike[str]) -> np.ndarray:
    """The index mask at `path` as a (H, W) int32 array of its stored values (8 or 16 bits)."""
    try:
        with Image.open(path) as mask:
            return np.asarray(upright(mask)).astype(np.int32)
    except FileNotFoundError:
        raise DliError(f"mask not found: {path}") from None
    except READ_ERRORS as error:
        raise DliError(f"cannot read mask {path}: {error}") from None


def is_image_file(path: Path) -> bool:
    """Whether `path` has one of the `IMAGE_EXTENSIONS` (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS
