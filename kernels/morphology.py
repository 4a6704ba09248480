"""Binary mask dilation for a batch, on the CPU (NumPy) or the GPU (CuPy), one pass per offset.

Written by hand instead of `scipy.ndimage.maximum_filter` (or `binary_dilation`): for the
Poisson domain's small square (radius 2) a maximum over shifted slices takes 1.3 ms for 20 bool
masks at 256², SciPy's filter 14 ms on the same masks (18 ms on float32 ones; docs/kernels.md),
and the same array expressions run on CuPy.
"""

from __future__ import annotations

from typing import Any

from dli.kernels.xp import any_tensor, array_module, as_array, as_tensor, device_of, on_torch_stream


@on_torch_stream
def dilate(mask: Any, radius: int) -> Any:
    """Dilate (N, H, W) masks (or any (..., H, W)) by a (2r+1)² square, each image on its own.

    Outside the image counts as background, so this matches a (2r+1)² max-pool with stride 1 and
    padding r (how the reference implementation grows masks before Poisson cloning: r = 2).
    Separable: a running maximum over 2r shifted slices along each of the last two axes, so the
    cost is 4r passes over the batch (bool masks move a quarter of float32's bytes).
    NumPy, CuPy or torch input; returns the same kind and dtype, as a new array.
    """
    if radius < 0:
        raise ValueError(f"dilation radius must be >= 0, got {radius}")
    torch_in = any_tensor(mask)
    array = as_array(mask)
    if array.ndim < 2:
        raise ValueError(f"mask must be (..., H, W), got shape {array.shape}")
    with device_of(array):
        dilated = _grow(_grow(array, radius, array.ndim - 1), radius, array.ndim - 2)
    return as_tensor(dilated) if torch_in else dilated


def _grow(array: Any, radius: int, axis: int) -> Any:
    """out[i] = max(array[i - r .. i + r]) along `axis`, the part inside the array (a new array)."""
    xp = array_module(array)
    out = array.copy()
    size = array.shape[axis]
    lead = (slice(None),) * axis
    for shift in range(1, min(radius, size - 1) + 1):
        later, earlier = (*lead, slice(shift, size)), (*lead, slice(0, size - shift))
        out_later, out_earlier = out[later], out[earlier]  # one view each: CuPy then writes in place
        xp.maximum(out_later, array[earlier], out=out_later)
        xp.maximum(out_earlier, array[later], out=out_earlier)
    return out
