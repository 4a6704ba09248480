"""Binary mask dilation for a batch, on the CPU (SciPy) or the GPU (cupyx), one call per batch."""

from __future__ import annotations

from typing import Any

import numpy as np

from dli.kernels.xp import any_tensor, array_module, as_array, as_tensor, device_of, on_torch_stream


@on_torch_stream
def dilate(mask: Any, radius: int) -> Any:
    """Dilate (N, H, W) masks (or any (..., H, W)) by a (2r+1)² square, each image on its own.

    Outside the image counts as background, so this matches a (2r+1)² max-pool with stride 1 and
    padding r (how the reference implementation grows masks before Poisson cloning: r = 2).
    A separable maximum filter of size (1, ..., 2r+1, 2r+1) runs over the whole batch at once.
    NumPy, CuPy or torch input; returns the same kind and dtype, as a new array.
    """
    if radius < 0:
        raise ValueError(f"dilation radius must be >= 0, got {radius}")
    torch_in = any_tensor(mask)
    array = as_array(mask)
    if array.ndim < 2:
        raise ValueError(f"mask must be (..., H, W), got shape {array.shape}")
    xp = array_module(array)
    if xp is np:
        from scipy import ndimage
    else:
        from cupyx.scipy import ndimage
    size = (1,) * (array.ndim - 2) + (2 * radius + 1,) * 2
    with device_of(array):
        # Bool travels as uint8: the maximum filters of both libraries take numeric input.
        values = array.view(np.uint8) if array.dtype == np.bool_ else array
        dilated = ndimage.maximum_filter(values, size=size, mode="constant", cval=0)
        if array.dtype == np.bool_:
            dilated = dilated.view(np.bool_)
    return as_tensor(dilated) if torch_in else dilated
