"""Apply a DLI plan to a decoded batch, on the training device, in place.

Input: the batch images (N, D, H, W) (D = 1 gray or 3 RGB image channels) with their label
channels (N, C, H, W), and the K decoded, augmented sources (K, D, H, W) with their masks
(K, H, W), in the plan's injection order. Intensities may be raw [0, 1] or normalized, with one
affine map per image channel: cut-paste and Poisson blending (each channel its own system)
commute with it, so only the clamp bounds (`value_range`, per channel) depend on it.

Poisson injections are one `poisson_blend` call over their sub-batch (blending domain = the
source mask dilated by `DliConfig.dilate_radius`, mixed gradients, solved directly on a window
or by CG as `DliConfig.poisson_solver` says); cut-paste injections
are one `paste` call over theirs. On the GPU no Python loop runs over images; on the CPU the
kernels copy image by image where that beats NumPy's batched gathers (`dli.kernels.paste`).

Tensors stay where they are: CPU tensors go through the NumPy kernels as zero-copy views, CUDA
tensors through the CuPy kernels on torch's current stream. The index tensors come from the
host-side plan (copied to the device asynchronously), and dilation and cut-paste read nothing
back. Neither does the Poisson solve when the caller passes the regions' `boxes`, which
`region_boxes` computes on the host from the plan and each source's defect box measured at
validation: the solver then places its windows on the host (the CG runs a fixed iteration
budget) and its `PoissonInfo` is copied back behind the solve, to be checked a batch later
(`PoissonInfo.check`). Without `boxes` the solver measures the regions on the device, one
read-back that waits for the work queued before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dli.kernels.morphology import dilate
from dli.kernels.paste import paste
from dli.kernels.poisson.blend import PoissonInfo, poisson_blend
from dli.kernels.xp import array_module, as_array, note_upload, torch_stream
from dli.pipeline.augment import Size, as_3x3
from dli.pipeline.planner import DliConfig, Plan

BOX_MARGIN = 1
"""Pixels added around a region box computed on the host, against rounding in the warp's sampling."""


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on `device` without stalling the host: pinned, then copied asynchronously.

    A copy from pageable memory may make the host wait for the stream's pending work (the whole
    previous training step); a pinned source never does, and torch's pinned-memory cache keeps
    the buffer alive until the copy has run.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        note_upload(array)  # counted by a device model (`dli.kernels.device_model`), else nothing
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class InjectionIndex:
    """The plan's injections split by method, as index tensors on the batch's device.

    `*_items` index the sources (plan order), `*_slots` the batch, `*_classes` the label
    channels; `poisson_channels` indexes labels viewed as (N * C, H, W): slot * C + class.
    `is_poisson` is the host-side (K,) bool mask of the Poisson injections, in plan order.
    """

    is_poisson: np.ndarray
    poisson_items: torch.Tensor
    poisson_slots: torch.Tensor
    poisson_channels: torch.Tensor
    paste_items: torch.Tensor
    paste_slots: torch.Tensor
    paste_classes: torch.Tensor

    @classmethod
    def from_plan(cls, plan: Plan, device: torch.device) -> InjectionIndex:
        items = np.arange(len(plan.injections), dtype=np.int64)
        slots = np.array([i.slot for i in plan.injections], dtype=np.int64)
        classes = np.array([i.class_id for i in plan.injections], dtype=np.int64)
        poisson = np.array([i.method == "poisson" for i in plan.injections], dtype=bool)
        channels = slots * plan.num_classes + classes
        columns = [a[poisson] for a in (items, slots, channels)] + [
            a[~poisson] for a in (items, slots, classes)
        ]
        # One upload for the six columns (each a copy the host issues), split into views on the device.
        packed = to_device(np.concatenate(columns), device)
        return cls(poisson, *torch.split(packed, [len(c) for c in columns]))

    @property
    def poisson_count(self) -> int:
        return int(self.poisson_items.shape[0])

    @property
    def paste_count(self) -> int:
        return int(self.paste_items.shape[0])


def region_boxes(plan: Plan, source_boxes: np.ndarray, size: Size, dilate_radius: int) -> np.ndarray | None:
    """Pixel boxes that contain each injection's region in the output grid: (K, 4) int, plan order.

    A donor's box (`source_boxes[injection.donor_id]`: fractions of its image, far edges exclusive;
    `DonorTable.boxes` or `ValidationReport.mask_boxes`) is scaled to the resized H x W grid and its
    corners are mapped by the injection's source matrix; output pixels whose centres fall inside, widened
    by the dilation radius and `BOX_MARGIN`, hold the region. A box touching the source's edge is extended
    past it, since the warp repeats edge pixels there; so is one the resize brings to the edge (its first
    or last output pixel samples a defect row or column). Returns None when some source's box is unknown
    (NaN), so the solver measures the regions itself. Boxes are inclusive
    (top, left, bottom, right); top > bottom where the region leaves the image.
    """
    if not plan.injections:
        return np.zeros((0, 4), dtype=np.int64)
    height, width = size
    boxes = source_boxes[[i.donor_id for i in plan.injections]]
    if np.isnan(boxes).any():
        return None
    far = 4.0 * max(height, width)  # beyond any edge: where the warp's clamping repeats the edge
    # A box reaches the resized grid's edge when the resize's first or last output pixel, which
    # samples the source at half a pixel from its edge, falls on it: then the warp repeats it.
    top = np.where(boxes[:, 0] <= 0.5 / height, -far, boxes[:, 0] * height)
    left = np.where(boxes[:, 1] <= 0.5 / width, -far, boxes[:, 1] * width)
    bottom = np.where(boxes[:, 2] >= 1 - 0.5 / height, far, boxes[:, 2] * height)
    right = np.where(boxes[:, 3] >= 1 - 0.5 / width, far, boxes[:, 3] * width)
    corners = np.stack(  # (K, 3, 4) homogeneous (x, y, 1) of the four corners
        [
            np.stack([left, right, left, right], axis=1),
            np.stack([top, top, bottom, bottom], axis=1),
            np.ones((len(boxes), 4)),
        ],
        axis=1,
    )
    mapped = as_3x3(plan.source_matrices())[:, :2] @ corners  # (K, 2, 4) output (x, y)
    low, high = mapped.min(axis=2), mapped.max(axis=2)
    # Pixel (i, j) has its centre at (j + 0.5, i + 0.5).
    pad = dilate_radius + BOX_MARGIN
    first = np.ceil(low - 0.5) - pad
    last = np.floor(high - 0.5) + pad
    limits = np.array([width - 1, height - 1])
    first, last = np.clip(first, 0, limits), np.clip(last, -1, limits)
    return np.stack([first[:, 1], first[:, 0], last[:, 1], last[:, 0]], axis=1).astype(np.int64)


def _clamp(xp: Any, images: Any, value_range: tuple[Any, Any]) -> Any:
    """`images` (K, D, H, W) clipped to `value_range`: one (low, high) pair, or one per channel."""
    low, high = value_range
    if np.ndim(low) == 0:
        return xp.clip(images, low, high)
    for channel, (lo, hi) in enumerate(zip(low, high, strict=True)):
        # Scalar bounds per channel: no host array to copy to the device.
        xp.clip(images[:, channel], lo, hi, out=images[:, channel])
    return images


def inject(
    images: torch.Tensor,
    labels: torch.Tensor,
    sources: torch.Tensor,
    source_masks: torch.Tensor,
    plan: Plan,
    config: DliConfig,
    *,
    value_range: tuple[float, float] | tuple[Sequence[float], Sequence[float]] = (0.0, 1.0),
    boxes: np.ndarray | None = None,
) -> PoissonInfo | None:
    """Inject the plan's defects into `images` and set their labels, both in place.

    Args:
        images: (N, D, H, W) float32 batch (C-contiguous), before injection.
        labels: (N, C, H, W) float32 label channels (C-contiguous).
        sources: (K, D, H, W) float32 decoded and augmented sources, in plan order.
        source_masks: (K, H, W) bool or 0/1 float masks of the sources.
        plan: the plan the sources were decoded for.
        config: blending settings.
        value_range: the images' intensity range (0 and 1 after any normalization), one pair of
            numbers or a pair of per-channel sequences: Poisson results are clamped to it, as
            an 8-bit result would be.
        boxes: optional (K, 4) host boxes of the injections' dilated regions (`region_boxes`),
            so the Poisson solve reads nothing back from the device.

    The label of an injection is the source's own (undilated) mask, whichever the method: for
    Poisson blending the dilated region is only the domain the solver may change, a margin
    that lets the defect's surroundings blend in, not defect. (The reference implementation
    labels the dilated region, which widens every Poisson-injected label by two pixels;
    `DliConfig.poisson_label` ``dilated`` does the same.)

    Returns the Poisson solver's report, or None when no injection is Poisson. On the GPU it
    is read (and warned about, `PoissonInfo.check`) when the caller chooses, e.g. a batch later.
    """
    count = len(plan.injections)
    if sources.shape[0] != count or source_masks.shape[0] != count:
        raise ValueError(
            f"{sources.shape[0]} sources and {source_masks.shape[0]} masks for {count} injections"
        )
    if not plan.injections:
        return None
    if labels.shape[1] != plan.num_classes:
        raise ValueError(f"labels have {labels.shape[1]} channels for a plan of {plan.num_classes} classes")
    if boxes is not None and np.shape(boxes) != (count, 4):
        raise ValueError(f"boxes of shape {np.shape(boxes)} for {count} injections")
    if not labels.is_contiguous():
        raise ValueError("labels must be C-contiguous (their channels are written through a flat view)")
    index = InjectionIndex.from_plan(plan, images.device)
    poisson_boxes = None if boxes is None else np.asarray(boxes)[index.is_poisson]
    info = None
    # The gathers and scatters run in the kernels' array module too, on views of the tensors:
    # NumPy on the CPU, where a torch op of this size waits for an intra-op thread that other
    # work may hold for milliseconds (docs/performance.md), and CuPy on torch's stream on CUDA.
    # Integer indices along the first axis: contiguous copies, no read-back.
    with torch_stream(images.device):  # CuPy views are taken on torch's stream, like the kernels'
        batch, label_array = as_array(images), as_array(labels)
        source_array, mask_array = as_array(sources), as_array(source_masks)
        xp = array_module(batch)
        if index.poisson_count:
            items, slots, channels = map(
                as_array, (index.poisson_items, index.poisson_slots, index.poisson_channels)
            )
            masks = mask_array[items]
            domain = dilate(masks != 0, config.dilate_radius)  # bool: a quarter of float's bytes
            blended, info = poisson_blend(
                batch[slots],
                source_array[items],
                domain,
                mixed_gradients=config.mixed_gradients,
                tol=config.poisson_tol,
                boxes=poisson_boxes,
                solver=config.poisson_solver,
                window=config.poisson_window,
            )
            # The blend may overshoot the intensity range; clamp as an 8-bit result would be.
            batch[slots] = _clamp(xp, blended, value_range)
            flat = label_array.reshape(-1, *label_array.shape[2:])  # a view: labels are contiguous
            label = masks if config.poisson_label == "source" else domain
            flat[channels] = xp.maximum(flat[channels], label.astype(flat.dtype, copy=False))
        if index.paste_count:
            items = as_array(index.paste_items)
            paste(
                batch,
                source_array[items],
                mask_array[items],
                labels=label_array,
                class_ids=as_array(index.paste_classes),
                slots=as_array(index.paste_slots),
            )
    return info


def keep_off_defects(source_masks: torch.Tensor, labels: torch.Tensor, plan: Plan) -> None:
    """Clear, in place, the injected pixels that fall on a canvas's own defects (a defective
    canvas: `DliConfig.canvas`); the planner already placed each region clear of their boxes."""
    defective = [k for k, i in enumerate(plan.injections) if plan.class_sets_before[i.slot]]
    if not defective:
        return
    slots = [plan.injections[k].slot for k in defective]
    occupied = labels[slots].amax(dim=1)  # (k, H, W) 1 where the canvas holds a defect
    source_masks[defective] *= 1.0 - occupied
