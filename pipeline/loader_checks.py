"""The loader's arguments, checked: one `DliError` line naming the value, before anything is built.

`checked_image_size` takes one side or a (height, width) pair within the model's limits
(`dli.common.model_checks`), `checked_int` a whole number at or above a minimum (never a bool),
`checked_device` a CPU or a CUDA GPU that this machine has.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dli.common.errors import DliError
from dli.common.model_checks import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from dli.pipeline.augment import Size


def checked_image_size(value: int | tuple[int, int] | Any) -> Size:
    """(height, width) of an image size given as one side or a pair; `DliError` naming a bad one."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        size = (int(value), int(value))
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        size = (int(value[0]), int(value[1]))
    else:
        raise DliError(f"image size {value!r}: expected an integer or a (height, width) pair")
    if min(size) < MIN_IMAGE_SIZE:
        raise DliError(f"image size {value!r}: each side must be >= {MIN_IMAGE_SIZE} pixels")
    if max(size) > MAX_IMAGE_SIZE:
        raise DliError(f"image size {value!r}: each side must be <= {MAX_IMAGE_SIZE} pixels")
    return size


def checked_int(name: str, value: Any, minimum: int = 1) -> int:
    """`value` as an int >= `minimum` (bools refused); `DliError` naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DliError(f"{name} {value!r}: must be an integer >= {minimum}")
    return int(value)


def checked_device(device: str | torch.device) -> torch.device:
    """The device the data path runs on: cpu, or a CUDA GPU that is there (`cuda` = the current one)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DliError(f"device {device!r}: expected cpu, cuda or cuda:<index>") from None
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type != "cuda":
        raise DliError(f"device {device!r}: the data path runs on cpu or cuda only")
    if not torch.cuda.is_available():
        raise DliError(f"device {device!r}: no CUDA GPU is available on this machine")
    index = torch.cuda.current_device() if resolved.index is None else resolved.index
    if index >= torch.cuda.device_count():
        raise DliError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)
