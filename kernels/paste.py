"""Cut-paste injection: composite defects into chosen slots of a batch and mark their labels, in place.

For each pasted item i going into batch slot k = slots[i]:

    target[k] = mask[i] * source[i] + (1 - mask[i]) * target[k]      where mask[i] != 0
    labels[k, class_ids[i]] = 1                                      where mask[i] != 0

Pixels where the mask is zero are not touched (not even rewritten), so the call costs memory
traffic only on the pasted pixels plus one read of the masks. A class id outside [0, K) pastes
the image but writes no label (e.g. `FREE` = -1).

Working in place on the batch's own tensors is what the injection step needs: it pastes into the
sub-batch of defect-free slots it picked, with no gather or scatter copies. On the GPU this is
one raw CUDA kernel (composite and label in one pass, one thread per pasted pixel); the NumPy
twin does the same with one masked copy per pasted item. Callers that want a new array pass copies.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from dli.kernels.xp import (
    CUDA_OPTIONS,
    array_module,
    as_array,
    cuda_scalar_type,
    device_of,
    on_torch_stream,
)

_PASTE_KERNEL = r"""
// One thread per (pasted item, pixel). Arrays are contiguous: target (B, C, P), source (M, C, P),
// mask (M, P), labels (B, K, P) with P = H*W; slots and class_ids are (M,) int64.
template <typename T, typename S, typename Mask, typename L>
__global__ void paste_kernel(T* __restrict__ target, const S* __restrict__ source,
                             const Mask* __restrict__ mask, const long long* __restrict__ slots,
                             L* __restrict__ labels, const long long* __restrict__ class_ids,
                             int write_labels, int channels, int classes, long long pixels,
                             long long count) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        const Mask m = mask[i];
        if (m == Mask(0)) continue;
        const long long item = i / pixels;
        const long long pixel = i - item * pixels;
        const long long slot = slots[item];
        const T alpha = T(m);
        for (int c = 0; c < channels; ++c) {
            T* t = target + (slot * channels + c) * pixels + pixel;
            const T s = T(source[(item * channels + c) * pixels + pixel]);
            *t = alpha * s + (T(1) - alpha) * (*t);
        }
        if (write_labels) {
            const long long cls = class_ids[item];
            if (cls >= 0 && cls < classes) labels[(slot * classes + cls) * pixels + pixel] = L(1);
        }
    }
}
"""

CUDA_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    # The instantiations the data path launches (float32 images; bool, 0/1 or alpha masks; float32
    # labels, or the uint8 placeholder when no labels are written), and a float64 one.
    "paste": (
        _PASTE_KERNEL,
        (
            *(
                f"paste_kernel<float, float, {mask}, {labels}>"
                for mask in ("bool", "unsigned char", "float")
                for labels in ("float", "unsigned char")
            ),
            "paste_kernel<double, double, double, double>",
        ),
    )
}
"""Raw CUDA of this module: label -> (code, name expressions), see `dli.kernels.xp`."""

_THREADS = 256


@on_torch_stream
def paste(
    target: Any,
    source: Any,
    mask: Any,
    *,
    labels: Any = None,
    class_ids: Any = None,
    slots: Any = None,
) -> Any:
    """Paste `source` into `target[slots]` where `mask` is set, in place; mark `labels` likewise.

    Args:
        target: (B, C, H, W) batch images, written in place (C-contiguous).
        source: (M, C, H, W) images to paste, M = len(slots).
        mask: (M, H, W) bool, 0/1 or alpha in [0, 1] (same float type as `target` for alpha).
        labels: optional (B, K, H, W) label channels, written in place (C-contiguous): channel
            class_ids[i] of slot slots[i] is set to 1 where mask[i] != 0.
        class_ids: (M,) int class of each pasted item; required with `labels`.
        slots: (M,) distinct batch indices to paste into; default all B slots in order (M = B).

    NumPy, CuPy or torch inputs (all on one device). Returns `target`. With CUDA tensors the
    kernel runs on torch's current stream, so `target` and `labels` are ready for torch's next work.
    """
    target_array = as_array(target)
    source, mask = as_array(source), as_array(mask)
    label_array = None if labels is None else as_array(labels)
    batch = _check_shapes(target_array, source, mask, label_array, class_ids)
    xp = array_module(target_array)
    with device_of(target_array):
        slots = xp.arange(batch) if slots is None else xp.asarray(as_array(slots), dtype=np.int64)
        if slots.shape != (source.shape[0],):
            raise ValueError(f"slots must be ({source.shape[0]},), one per pasted image, got {slots.shape}")
        if label_array is not None:
            class_ids = xp.asarray(as_array(class_ids), dtype=np.int64)
            if class_ids.shape != slots.shape:
                raise ValueError(f"class_ids must be {slots.shape}, got {class_ids.shape}")
        if xp is not np:  # CuPy (or a device model's module, `dli.kernels.device_model`)
            _paste_cuda(xp, target_array, source, mask, label_array, class_ids, slots)
        else:
            _paste_arrays(target_array, source, mask, label_array, class_ids, slots)
    return target


def _check_shapes(target: Any, source: Any, mask: Any, labels: Any, class_ids: Any) -> int:
    """Raise ValueError on inconsistent shapes; return the batch size B."""
    if target.ndim != 4:
        raise ValueError(f"target must be (B, C, H, W), got {target.shape}")
    batch, channels, height, width = target.shape
    if source.ndim != 4 or source.shape[1:] != (channels, height, width):
        raise ValueError(f"source must be (M, {channels}, {height}, {width}), got {source.shape}")
    if mask.shape != (source.shape[0], height, width):
        raise ValueError(f"mask must be {(source.shape[0], height, width)}, got {mask.shape}")
    if labels is not None:
        if labels.ndim != 4 or labels.shape[0] != batch or labels.shape[2:] != (height, width):
            raise ValueError(f"labels must be ({batch}, K, {height}, {width}), got {labels.shape}")
        if class_ids is None:
            raise ValueError("class_ids are required when labels are given")
    return batch


def _paste_arrays(target: Any, source: Any, mask: Any, labels: Any, class_ids: Any, slots: Any) -> None:
    """The NumPy twin of the CUDA kernel: one masked copy per pasted item, into its slot's own image.

    A loop over items, written by hand on purpose: `np.copyto(..., where=)` touches one image per
    item and writes only its mask's pixels, where one batched gather, composite and scatter moves
    the whole sub-batch about six times (9x slower for 25 items at 256², docs/kernels.md).
    Slots are distinct, so item order does not matter. Bool masks copy the source; numeric
    masks composite alpha * source + (1 - alpha) * target, which is the source where alpha is 1.
    """
    binary = mask.dtype == np.bool_
    classes = labels.shape[1] if labels is not None else 0
    for item, slot in enumerate(slots.tolist()):
        pasted = mask[item] != 0
        image = target[slot]
        if binary:
            np.copyto(image, source[item], where=pasted, casting="same_kind")
        else:
            alpha = mask[item].astype(target.dtype, copy=False)
            np.copyto(image, alpha * source[item] + (1 - alpha) * image, where=pasted, casting="same_kind")
        if labels is not None and 0 <= int(class_ids[item]) < classes:
            np.copyto(labels[slot, int(class_ids[item])], labels.dtype.type(1), where=pasted)


@functools.cache
def _paste_function(xp: Any, target: str, source: str, mask: str, labels: str, device: int) -> Any:
    """The paste kernel for these CUDA scalar types, loaded once per GPU (`xp`: cupy)."""
    name = f"paste_kernel<{target}, {source}, {mask}, {labels}>"
    code, _ = CUDA_SOURCES["paste"]
    module = xp.RawModule(code=code, options=CUDA_OPTIONS, name_expressions=[name])
    return module.get_function(name)


def _paste_cuda(
    cupy: Any, target: Any, source: Any, mask: Any, labels: Any, class_ids: Any, slots: Any
) -> None:
    if not target.flags.c_contiguous or (labels is not None and not labels.flags.c_contiguous):
        raise ValueError("target and labels are written in place and must be C-contiguous")
    source = cupy.ascontiguousarray(source)
    mask = cupy.ascontiguousarray(mask)
    slots = cupy.ascontiguousarray(slots, dtype=cupy.int64)
    if labels is None:  # the kernel skips label writes; these only fill its pointer arguments
        labels = cupy.empty(1, dtype=cupy.uint8)
        class_ids = cupy.empty(1, dtype=cupy.int64)
    else:
        class_ids = cupy.ascontiguousarray(class_ids, dtype=cupy.int64)
    types = (cuda_scalar_type(a.dtype) for a in (target, source, mask, labels))
    kernel = _paste_function(cupy, *types, cupy.cuda.Device().id)
    _, channels, height, width = target.shape
    pixels = height * width
    count = mask.shape[0] * pixels
    if count == 0:
        return
    blocks = min(-(-count // _THREADS), 65535 * 16)
    kernel(
        (blocks,),
        (_THREADS,),
        (
            target,
            source,
            mask,
            slots,
            labels,
            class_ids,
            np.int32(labels.ndim == 4),
            np.int32(channels),
            np.int32(labels.shape[1] if labels.ndim == 4 else 0),
            np.int64(pixels),
            np.int64(count),
        ),
    )
