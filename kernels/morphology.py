"""Mask dilation for a batch by a square, on the CPU (NumPy) or the GPU (CuPy, one raw kernel).

`dilate` grows (..., H, W) masks by a (2r+1)² square, each image on its own, outside the image
counting as background (a (2r+1)² max-pool with stride 1 and padding r: how the reference
implementation grows masks before Poisson cloning, r = 2).

Written by hand instead of `scipy.ndimage.maximum_filter` (or `binary_dilation`): for the
Poisson domain's small square a maximum over shifted slices takes 1.3 ms for 20 bool masks at
256², SciPy's filter 14 ms on the same masks (18 ms on float32 ones; docs/kernels.md). On the CPU
it is separable, a running maximum over 2r shifted slices along each of the last two axes. On the
GPU those same slices would be 4r + 2 launches of a few microseconds of work each, so the CUDA
path is one kernel (`CUDA_SOURCES["dilate"]`): one thread per output pixel reads its (2r+1)²
square, which the cache serves (25 bytes per pixel at r = 2 for bool masks). `TWINS` gives the
kernel's NumPy twin and the bytes it moves, for the device model (`dli.kernels.device_model`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from dli.kernels.xp import (
    CUDA_OPTIONS,
    any_tensor,
    array_module,
    as_array,
    as_tensor,
    cuda_scalar_type,
    device_of,
    on_torch_stream,
)

_DILATE_KERNEL = r"""
// One thread per output element of C-contiguous (planes, height, width) arrays: the maximum of
// the input over the (2r+1)^2 square around it, clipped to its own plane (outside is background).
template <typename T>
__global__ void dilate_square(const T* __restrict__ mask, T* __restrict__ out, int height, int width,
                              int radius, long long count) {
    const long long plane_size = (long long)height * width;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        const long long plane = i / plane_size;
        const int pixel = (int)(i - plane * plane_size);
        const int y = pixel / width, x = pixel - (pixel / width) * width;
        const T* m = mask + plane * plane_size;
        const int top = max(y - radius, 0), bottom = min(y + radius, height - 1);
        const int left = max(x - radius, 0), right = min(x + radius, width - 1);
        T best = m[(long long)top * width + left];
        for (int row = top; row <= bottom; ++row) {
            const T* line = m + (long long)row * width;
            for (int col = left; col <= right; ++col) best = line[col] > best ? line[col] : best;
        }
        out[i] = best;
    }
}
"""

CUDA_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    # bool masks (the Poisson domain), uint8 and float32 masks.
    "dilate": (_DILATE_KERNEL, tuple(f"dilate_square<{t}>" for t in ("bool", "unsigned char", "float")))
}
"""Raw CUDA of this module: label -> (code, name expressions), see `dli.kernels.xp`."""

_CUDA_TYPES = frozenset({np.dtype(np.bool_), np.dtype(np.uint8), np.dtype(np.float32)})
_THREADS = 256
_MAX_BLOCKS = 65535 * 16


@on_torch_stream
def dilate(mask: Any, radius: int) -> Any:
    """Dilate (N, H, W) masks (or any (..., H, W)) by a (2r+1)² square, each image on its own.

    NumPy, CuPy or torch input; returns the same kind and dtype, as a new array. On CuPy, bool,
    uint8 and float32 masks take the one-kernel path; other types the array path.
    """
    if radius < 0:
        raise ValueError(f"dilation radius must be >= 0, got {radius}")
    torch_in = any_tensor(mask)
    array = as_array(mask)
    if array.ndim < 2:
        raise ValueError(f"mask must be (..., H, W), got shape {array.shape}")
    xp = array_module(array)
    with device_of(array):
        if xp is not np and array.dtype in _CUDA_TYPES:  # CuPy, or the device model's module
            dilated = _dilate_cuda(xp, array, radius)
        else:
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


def _dilate_cuda(xp: Any, array: Any, radius: int) -> Any:
    """`dilate_square` over the masks as (planes, H, W): one launch into a new array."""
    mask = xp.ascontiguousarray(array)
    out = xp.empty_like(mask)
    if mask.size == 0:
        return out
    height, width = mask.shape[-2:]
    name = f"dilate_square<{cuda_scalar_type(mask.dtype)}>"
    kernel = _dilate_function(xp, name, xp.cuda.Device().id)
    blocks = min(-(-mask.size // _THREADS), _MAX_BLOCKS)
    kernel(
        (blocks,),
        (_THREADS,),
        (mask, out, np.int32(height), np.int32(width), np.int32(radius), np.int64(mask.size)),
    )
    return out


@functools.cache
def _dilate_function(xp: Any, name: str, device: int) -> Any:
    """The dilation kernel for one scalar type, compiled once per GPU (`xp`: cupy or a device model)."""
    code, _ = CUDA_SOURCES["dilate"]
    module = xp.RawModule(code=code, options=CUDA_OPTIONS, name_expressions=[name])
    return module.get_function(name)


def _dilate_twin(mask: np.ndarray, out: np.ndarray, height: Any, width: Any, radius: Any, count: Any) -> None:
    """`dilate_square` on the host: the array path's result written into `out`."""
    planes = mask.reshape(-1, int(height), int(width))
    grown = _grow(_grow(planes, int(radius), 2), int(radius), 1)
    out.reshape(planes.shape)[...] = grown


def _dilate_bytes(mask: np.ndarray, out: np.ndarray, *_: Any) -> int:
    """What `dilate_square` moves: each mask element read once (neighbours come from the cache) and
    each output element written once."""
    return int(mask.nbytes + out.nbytes)


TWINS: dict[str, tuple[Callable[..., None], Callable[..., int]]] = {
    "dilate_square": (_dilate_twin, _dilate_bytes),
}
"""Per kernel name: its NumPy twin (the kernel's arguments, results in place) and the bytes it moves."""
