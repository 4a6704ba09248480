"""What a practitioner would write instead of the DALI data path: the comparison point of `dli bench`.

A PyTorch `DataLoader` whose worker processes each build whole batches on the CPU:

- decode with OpenCV (`cv2.imread`, grayscale) and resize to H x W (area interpolation for
  images, nearest neighbour for masks);
- augment: the batch images' flips with `cv2.flip`, the injected sources' per-class flip +
  shift-scale-rotate with `cv2.warpAffine` (linear for images, nearest for masks, replicated
  border);
- inject: Poisson injections with `cv2.seamlessClone` one image at a time, on the source mask
  dilated by the same square, cut-paste injections with NumPy;
- normalize, expand gray to 3 channels and build the one-hot label channels.

Only the execution differs from `dli.pipeline.loader`: the batches are the loader's own plans
(`Loader.plans`), so both paths see the same images, flips, rarest-class choices, sources,
methods and augmentation matrices. Each worker builds one batch at a time (the injection rule
needs the whole batch), so `--workers` batches are in progress at once.

Workers are started with ``spawn``: the parent process holds DALI thread pools and possibly a
CUDA context, which a forked child must not inherit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dli.common.errors import DliError
from dli.data.manifest import FREE, Manifest
from dli.pipeline.augment import IDENTITY
from dli.pipeline.planner import DliConfig, Plan


@dataclass(frozen=True)
class SampleFiles:
    """One manifest sample as plain strings, cheap to send to worker processes."""

    image: str
    mask: str | None
    class_id: int


def sample_files(manifest: Manifest) -> tuple[SampleFiles, ...]:
    """The manifest's samples as `SampleFiles`, in manifest order (plans index into it)."""
    return tuple(
        SampleFiles(str(s.image), None if s.mask is None else str(s.mask), int(s.class_id))
        for s in manifest.samples
    )


@dataclass
class DecodedPlan:
    """A plan's pixels after decoding and augmentation, before injection (8-bit, as OpenCV needs).

    Attributes:
        images: (N, H, W) uint8 batch images.
        masks: (N, H, W) bool defect masks of the batch images (all False for defect-free ones).
        sources: (K, H, W) uint8 injected sources, in plan order.
        source_masks: (K, H, W) bool masks of the sources.
    """

    images: np.ndarray
    masks: np.ndarray
    sources: np.ndarray
    source_masks: np.ndarray


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise DliError("the baseline needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def read_resized(path: str, size: tuple[int, int], *, mask: bool) -> np.ndarray:
    """The grayscale file at `path` resized to `size` = (H, W): uint8 image or bool mask."""
    cv2 = _cv2()
    pixels = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if pixels is None:
        raise DliError(f"OpenCV cannot read {path}")
    height, width = size
    interpolation = cv2.INTER_NEAREST if mask else cv2.INTER_AREA
    resized = cv2.resize(pixels, (width, height), interpolation=interpolation)
    return resized > 0 if mask else resized


def opencv_matrix(matrix: np.ndarray) -> np.ndarray:
    """A source-to-output matrix of `dli.pipeline.augment` (pixel centres at +0.5) in OpenCV's
    convention (pixel centres at integers): M' = T(-1/2) M T(+1/2)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    out = matrix.copy()
    out[:, 2] += matrix[:, :2] @ np.array([0.5, 0.5]) - 0.5
    return out


def _flip_code(matrix: np.ndarray) -> int | None:
    """`cv2.flip` code of a pure flip matrix (None for the identity)."""
    horizontal, vertical = matrix[0, 0] < 0, matrix[1, 1] < 0
    if horizontal and vertical:
        return -1
    if horizontal:
        return 1
    return 0 if vertical else None


def flip(pixels: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a batch image's flip matrix (`dli.pipeline.augment.random_flips`) with `cv2.flip`."""
    code = _flip_code(matrix)
    if code is None:
        return pixels
    if pixels.dtype == np.bool_:  # OpenCV has no bool type: flip the bytes
        return _cv2().flip(pixels.view(np.uint8), code).view(np.bool_)
    return _cv2().flip(pixels, code)


def warp(pixels: np.ndarray, matrix: np.ndarray, *, mask: bool) -> np.ndarray:
    """Warp an image (linear) or bool mask (nearest) by a source-to-output matrix, border replicated."""
    if np.array_equal(matrix, IDENTITY):
        return pixels
    cv2 = _cv2()
    height, width = pixels.shape
    values = pixels.view(np.uint8) if mask else pixels
    warped = cv2.warpAffine(
        values,
        opencv_matrix(matrix),
        (width, height),
        flags=cv2.INTER_NEAREST if mask else cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return warped.view(np.bool_) if mask else warped


def decode_plan(plan: Plan, samples: Sequence[SampleFiles], size: tuple[int, int]) -> DecodedPlan:
    """Decode, resize and augment the batch images and the injected sources of `plan`."""
    images, masks = [], []
    for index, matrix in zip(plan.batch_indices, plan.image_matrices, strict=True):
        sample = samples[index]
        images.append(flip(read_resized(sample.image, size, mask=False), matrix))
        if sample.class_id == FREE or sample.mask is None:
            masks.append(np.zeros(size, dtype=bool))
        else:
            masks.append(flip(read_resized(sample.mask, size, mask=True), matrix))
    sources, source_masks = [], []
    for injection in plan.injections:
        sample = samples[injection.source]
        if sample.mask is None:
            raise DliError(f"defect image {sample.image} has no mask to inject")
        sources.append(
            warp(read_resized(sample.image, size, mask=False), injection.source_matrix, mask=False)
        )
        source_masks.append(
            warp(read_resized(sample.mask, size, mask=True), injection.source_matrix, mask=True)
        )
    empty = np.zeros((0, *size))
    return DecodedPlan(
        images=np.stack(images),
        masks=np.stack(masks),
        sources=np.stack(sources) if sources else empty.astype(np.uint8),
        source_masks=np.stack(source_masks) if source_masks else empty.astype(bool),
    )


def inject_opencv(decoded: DecodedPlan, plan: Plan, config: DliConfig) -> int:
    """Inject the plan's defects into `decoded.images` and their masks into `decoded.masks`, in place.

    Poisson: `cv2.seamlessClone` (MIXED_CLONE with mixed gradients, else NORMAL_CLONE) on
    3-channel copies, the region being the source mask dilated by a (2r+1)² square and centred
    on its own bounding box so the defect stays where it is. Cut-paste: the source's pixels
    where its mask is set. The label is the source's undilated mask either way. Returns how
    many Poisson injections OpenCV refused (those are cut-pasted instead).
    """
    cv2 = _cv2()
    side = 2 * config.dilate_radius + 1
    kernel = np.ones((side, side), dtype=np.uint8)
    mode = cv2.MIXED_CLONE if config.mixed_gradients else cv2.NORMAL_CLONE
    failures = 0
    for item, injection in enumerate(plan.injections):
        slot, source, mask = injection.slot, decoded.sources[item], decoded.source_masks[item]
        if not mask.any():
            continue
        pasted = False
        if injection.method == "poisson":
            region = cv2.dilate(mask.astype(np.uint8) * 255, kernel)
            x, y, w, h = cv2.boundingRect(region)
            try:
                blended = cv2.seamlessClone(
                    cv2.cvtColor(source, cv2.COLOR_GRAY2BGR),
                    cv2.cvtColor(decoded.images[slot], cv2.COLOR_GRAY2BGR),
                    region.copy(),  # seamlessClone writes into its mask argument
                    (x + w // 2, y + h // 2),
                    mode,
                )
                decoded.images[slot] = blended[..., 0]
                pasted = True
            except cv2.error:
                failures += 1
        if not pasted:
            decoded.images[slot] = np.where(mask, source, decoded.images[slot])
        decoded.masks[slot] = mask
    return failures


def to_tensors(
    images: np.ndarray,
    masks: np.ndarray,
    class_ids: Sequence[int],
    num_classes: int,
    mean: float,
    std: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) normalized float32 images, (N, C, H, W) one-hot label channels, (N,) class ids."""
    n, height, width = images.shape
    ids = np.asarray(class_ids, dtype=np.int64)
    gray = (images.astype(np.float32) * np.float32(1 / (255 * std))) - np.float32(mean / std)
    labels = np.zeros((n, num_classes, height, width), dtype=np.float32)
    defect = np.flatnonzero(ids >= 0)
    labels[defect, ids[defect]] = masks[defect]
    tensor = torch.from_numpy(gray)[:, None].expand(-1, 3, -1, -1).contiguous()
    return tensor, torch.from_numpy(labels), torch.from_numpy(ids)


class PlannedBatches(torch.utils.data.Dataset):
    """Item i is the whole batch of `plans[i]`, built with OpenCV and NumPy (see the module docstring).

    Returns (images (N, 3, H, W), masks (N, C, H, W), class_ids (N,)) CPU tensors.
    """

    def __init__(
        self,
        samples: Sequence[SampleFiles],
        plans: Sequence[Plan],
        *,
        size: tuple[int, int],
        config: DliConfig | None,
        mean: float,
        std: float,
    ) -> None:
        self.samples, self.plans = tuple(samples), tuple(plans)
        self.size, self.config, self.mean, self.std = size, config, mean, std

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        plan = self.plans[index]
        decoded = decode_plan(plan, self.samples, self.size)
        class_ids = plan.class_ids_before
        if self.config is not None and plan.injections:
            inject_opencv(decoded, plan, self.config)
            class_ids = plan.class_ids_after
        return to_tensors(decoded.images, decoded.masks, class_ids, plan.num_classes, self.mean, self.std)


def _one_thread_per_worker(_: int) -> None:
    """Workers are the parallelism: keep OpenCV from starting a thread pool in each of them."""
    _cv2().setNumThreads(1)


def build_baseline_loader(
    dataset: PlannedBatches, *, workers: int, pin_memory: bool, prefetch: int = 2
) -> torch.utils.data.DataLoader:
    """A `DataLoader` over whole planned batches: `workers` processes (0 = in the main process)."""
    if workers < 0:
        raise DliError(f"--workers {workers}: must be >= 0")
    options: dict[str, Any] = {}
    if workers:
        options = {
            "multiprocessing_context": "spawn",
            "worker_init_fn": _one_thread_per_worker,
            "prefetch_factor": prefetch,
        }
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory, **options
    )
