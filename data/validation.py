"""Up-front validation of a dataset: every image and mask opened once, every problem reported at once.

`validate` checks a `Manifest` before anything trains on it: missing or unreadable files, a
defect sample without a mask, a mask whose size differs from its image, a binary (single-class)
mask that holds several small distinct values (an index mask given through a single-class
route, which would be flattened into one class), an index mask with a value beyond the class
list are errors (one `DliError` listing every offending file); a defect image with an empty
mask, or a defect-free one with a non-empty mask, are warnings (one `DatasetWarning`). Decoding
the masks also measures what downstream code needs without reading them again: each mask's
defect-pixel fraction, per class too (class pixel counts), its defect bounding box, and its
defect instances (`dli.data.instances`: the donors of injection, with the boxes that size
their Poisson windows); opening the images tells whether each looks gray (`dli train --channels auto`).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dli.common.errors import DliError
from dli.data.imageio import (
    READ_ERRORS,
    check_integer_pixels,
    defect_pixels,
    looks_gray,
    orientation,
    stored_gray,
    upright,
    upright_size,
)
from dli.data.index_masks import IndexMaskError, index_values
from dli.data.instances import Instance, measure_instances
from dli.data.manifest import FREE, Manifest, Problem, Sample, problems_error, warn_of_problems

INDEX_LIKE_MAX = 64
"""A binary mask whose non-zero values are several and all at most this looks like an index mask
(class k stored as k) given through a single-class route: an error, never flattened silently.
Anti-aliased binary masks (Magnetic Tile's: 5 to 100+ distinct values) reach 176..255."""


@dataclass(frozen=True, eq=False)
class ValidationReport:
    """What `validate` found.

    Attributes:
        source: the dataset root.
        errors: problems that make the dataset unusable (raised as one `DliError` by default).
        warnings: suspicious but usable samples (e.g. a defect image with an empty mask).
        image_sizes: (H, W) of each sample's image, None where it could not be read.
        mask_fractions: (N,) float64, fraction of mask pixels > `MASK_THRESHOLD` per sample;
            0 for a defect-free image without a mask, NaN where not measured (no pixel check
            or unreadable mask).
        mask_boxes: (N, 4) float64 bounding box of each mask's defect pixels as fractions of
            its height and width, (top, left, bottom, right) with the far edges exclusive
            (a box [0, 0, 1, 1] covers the whole image); NaN where not measured or empty.
            Injection sizes its Poisson windows from them without reading the GPU back.
        class_fractions: (N, C) float64, fraction of each sample's pixels of each class (NaN
            rows where not measured; zeros for a defect-free sample).
        instances: each sample's defect instances (empty where not measured, and for
            defect-free samples: their masks carry no label).
        image_gray: whether each sample's image looks gray (`dli.data.imageio.looks_gray`;
            without the pixel check: whether it is stored gray); True where it could not be read.
    """

    source: Path
    errors: tuple[Problem, ...]
    warnings: tuple[Problem, ...]
    image_sizes: tuple[tuple[int, int] | None, ...]
    mask_fractions: np.ndarray
    mask_boxes: np.ndarray
    class_fractions: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    instances: tuple[tuple[Instance, ...], ...] = ()
    image_gray: tuple[bool, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self) -> DliError:
        return problems_error(self.errors, self.source)


@dataclass
class _SampleCheck:
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    size: tuple[int, int] | None = None
    gray: bool = True
    orientation: int = 1
    mask_fraction: float = math.nan
    mask_box: tuple[float, float, float, float] = (math.nan,) * 4
    class_fractions: dict[int, float] | None = None
    instances: tuple[Instance, ...] = ()


def defect_box(defect: np.ndarray) -> tuple[float, float, float, float]:
    """The box of a (H, W) bool mask's True pixels, as fractions (`ValidationReport.mask_boxes`)."""
    rows, cols = np.flatnonzero(defect.any(axis=1)), np.flatnonzero(defect.any(axis=0))
    if rows.size == 0:
        return (math.nan,) * 4
    height, width = defect.shape
    return rows[0] / height, cols[0] / width, (rows[-1] + 1) / height, (cols[-1] + 1) / width


def _open_image(path: Path, check_pixels: bool) -> tuple[tuple[int, int], bool, int]:
    """((H, W) as read, EXIF orientation applied; looks gray; EXIF orientation) of `path` from its
    header; with `check_pixels` also decode it (JPEGs at 1/8 scale) and look at its colours."""
    with Image.open(path) as image:
        width, height = image.size
        size, turned = upright_size(image), orientation(image)
        check_integer_pixels(image)
        if not check_pixels:
            return size, stored_gray(image), turned
        if image.format == "JPEG":
            # DCT-domain downscaling still walks the whole entropy-coded stream, so a
            # truncated or corrupt file fails here, at a fraction of a full decode's cost.
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
        image.load()
        return size, looks_gray(image), turned


def _index_like_values(mask: Image.Image) -> np.ndarray | None:
    """The distinct non-zero values of a single-channel (or palette) binary mask when they look
    like class indices (several, all <= `INDEX_LIKE_MAX`), else None."""
    if mask.mode not in ("L", "P", "I") and not mask.mode.startswith("I;16"):
        return None
    values = np.unique(np.asarray(mask))
    values = values[values > 0]
    if values.size >= 2 and values[-1] <= INDEX_LIKE_MAX:
        return values
    return None


def _class_labels(
    sample: Sample, mask: Image.Image, num_classes: int, out: _SampleCheck
) -> np.ndarray | None:
    """The (H, W) uint8 class-index map of an opened mask (0 background, k + 1 where class k), or
    None after recording the problem in `out`. A binary mask's defect pixels take `class_id`."""
    if sample.index_bits:
        try:
            values, _ = index_values(mask)
        except IndexMaskError as error:
            out.errors.append(Problem(sample.mask, "not an index mask", str(error)))
            return None
        if values.size and values[-1] > num_classes:
            unknown = ", ".join(str(int(v)) for v in values[values > num_classes][:10])
            detail = f"values {unknown}; {num_classes} classes listed"
            out.errors.append(Problem(sample.mask, "mask value not in the class list", detail))
            return None
        return np.asarray(mask).astype(np.uint8)
    several = _index_like_values(mask)
    if several is not None:
        out.errors.append(
            Problem(
                sample.mask,
                "several classes in a single-class mask",
                f"distinct values {', '.join(str(int(v)) for v in several)}: give masks of several classes "
                "as images/ + masks/ + classes.txt (value k = k-th class)",
            )
        )
        return None
    pixels = defect_pixels(mask)
    return pixels.astype(np.uint8) * np.uint8(max(sample.class_id, 0) + 1)


def _check_sample(sample: Sample, check_pixels: bool, num_classes: int) -> _SampleCheck:
    out = _SampleCheck()
    defect = sample.class_id != FREE
    if sample.image.exists() and not sample.image.is_file():
        out.errors.append(
            Problem(sample.image, "not a regular file", "a device, folder or other special file")
        )
    elif not sample.image.is_file():
        out.errors.append(Problem(sample.image, "missing image"))
    else:
        try:
            out.size, out.gray, out.orientation = _open_image(sample.image, check_pixels)
        except READ_ERRORS as error:
            out.errors.append(Problem(sample.image, "unreadable image", str(error)))
    if sample.mask is None:
        if defect:
            out.errors.append(Problem(sample.image, "defect sample without a mask"))
        else:
            out.mask_fraction = 0.0
            out.class_fractions = {}
        return out
    if not sample.mask.is_file():
        kind = "not a regular file" if sample.mask.exists() else "missing mask"
        out.errors.append(Problem(sample.mask, kind, f"for {sample.image.name}"))
        return out
    try:
        with Image.open(sample.mask) as stored_mask:
            mask_size = upright_size(stored_mask)
            if check_pixels:
                labels = _class_labels(sample, upright(stored_mask), num_classes, out)
                if labels is None:
                    return out
                pixels = labels > 0
                out.mask_fraction = np.count_nonzero(pixels) / max(1, pixels.size)
                out.mask_box = defect_box(pixels)
                if defect:
                    counts = np.bincount(labels.ravel(), minlength=num_classes + 1)
                    out.class_fractions = {
                        c: counts[c + 1] / labels.size for c in range(num_classes) if counts[c + 1]
                    }
                    out.instances = measure_instances(labels)
                else:
                    out.class_fractions = {}
    except READ_ERRORS as error:
        out.errors.append(Problem(sample.mask, "unreadable mask", str(error)))
        return out
    if out.size is not None and mask_size != out.size:
        (h, w), (mh, mw) = out.size, mask_size
        if out.orientation >= 5 and mask_size == (w, h):
            detail = (
                f"mask {mw}x{mh} fits the image only without its EXIF orientation {out.orientation}, "
                f"which is applied to it ({w}x{h}) as in training: rotate the mask or strip the tag"
            )
            out.errors.append(Problem(sample.mask, "mask fits the unrotated image", detail))
        else:
            out.errors.append(Problem(sample.mask, "mask size mismatch", f"mask {mw}x{mh}, image {w}x{h}"))
    if defect and out.mask_fraction == 0.0:
        out.warnings.append(Problem(sample.mask, "empty mask", "defect sample with no positive pixel"))
    if not defect and out.mask_fraction > 0.0:
        out.warnings.append(
            Problem(sample.mask, "non-empty mask of a defect-free image", f"{out.mask_fraction:.4f} positive")
        )
    return out


def validate(
    manifest: Manifest, *, check_pixels: bool = True, raise_errors: bool = True, workers: int | None = None
) -> ValidationReport:
    """Open every image and mask of `manifest` and report what is wrong, all at once.

    Errors: missing or unreadable image or mask, a defect sample without a mask, a mask whose
    size differs from its image. Warnings (one `DatasetWarning`): a defect sample whose mask
    has no positive pixel, a defect-free sample whose mask has some. With `check_pixels` the
    images are decoded (JPEGs at 1/8 scale: enough to prove they decode) and the masks fully,
    giving `ValidationReport.mask_fractions`; without it only headers are read.

    Raises one `DliError` listing every offending file unless `raise_errors` is False.
    Decoding runs on `workers` threads (PIL releases the GIL while decoding).
    """
    workers = workers or min(8, os.cpu_count() or 1)
    samples = manifest.samples
    if workers > 1 and len(samples) > 64:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            checks = list(pool.map(lambda s: _check_sample(s, check_pixels, manifest.num_classes), samples))
    else:
        checks = [_check_sample(s, check_pixels, manifest.num_classes) for s in samples]
    class_fractions = np.full((len(samples), manifest.num_classes), np.nan)
    for row, check in enumerate(checks):
        if check.class_fractions is not None:
            class_fractions[row] = 0.0
            for c, fraction in check.class_fractions.items():
                class_fractions[row, c] = fraction
    report = ValidationReport(
        source=manifest.root,
        errors=tuple(p for c in checks for p in c.errors),
        warnings=tuple(p for c in checks for p in c.warnings),
        image_sizes=tuple(c.size for c in checks),
        mask_fractions=np.array([c.mask_fraction for c in checks], dtype=np.float64),
        mask_boxes=np.array([c.mask_box for c in checks], dtype=np.float64).reshape(-1, 4),
        class_fractions=class_fractions,
        instances=tuple(c.instances for c in checks),
        image_gray=tuple(c.gray for c in checks),
    )
    if report.warnings:
        warn_of_problems(report.warnings, manifest.root)
    if report.errors and raise_errors:
        raise report.error()
    return report
