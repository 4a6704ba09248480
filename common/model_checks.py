"""What a model's description must satisfy wherever it is read: a checkpoint's `model_info` and
thresholds, an export's ONNX metadata.

These values drive allocations and decisions (an image side becomes a resize target, a
threshold decides every pixel), so a value out of range is refused when read, as one `DliError`
naming where it came from, rather than used: image sides in [`MIN_IMAGE_SIZE`,
`MAX_IMAGE_SIZE`], normalization finite with positive deviations, thresholds finite and strictly
inside (0, 1). Class names are checked by `dli.data.class_names`. No torch import (the ONNX path
uses it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dli.common.errors import DliError

MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 4096
"""Bounds of an image side; one 64-image float32 batch of 4096 px is already 4 GB per channel."""

RESIZE_MODES: tuple[str, ...] = ("linear", "nearest")
"""How a model's images were resized to its input size in training (and must be at prediction)."""


def check_image_size(value: object, origin: str) -> int:
    """`value` as an int in [`MIN_IMAGE_SIZE`, `MAX_IMAGE_SIZE`]; else `DliError` naming `origin`."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
        raise DliError(f"{origin}: image_size {value!r} is not in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]")
    return value


def check_resize(mode: object, origin: str) -> None:
    """`DliError` naming `origin` unless `mode` is one of `RESIZE_MODES`."""
    if mode not in RESIZE_MODES:
        raise DliError(f"{origin}: resize {mode!r} is not one of {', '.join(RESIZE_MODES)}")


def check_normalization(mean: Sequence[float], std: Sequence[float], origin: str) -> None:
    """`DliError` unless mean and std have one finite value per channel and every std is > 0."""
    if not mean or len(mean) != len(std):
        raise DliError(f"{origin}: mean {list(mean)} and std {list(std)} must have one value per channel")
    if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
        raise DliError(f"{origin}: mean {list(mean)} / std {list(std)} must be finite, std > 0")


def check_thresholds(values: Sequence[float], origin: str) -> tuple[float, ...]:
    """`values` when each is a finite probability strictly inside (0, 1); else `DliError`."""
    bad = [v for v in values if not (math.isfinite(v) and 0.0 < v < 1.0)]
    if bad:
        raise DliError(f"{origin}: threshold(s) {', '.join(map(str, bad))} not in (0, 1)")
    return tuple(values)
