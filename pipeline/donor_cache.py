"""Injection sources decoded once and kept on the training device, warped there per injection.

A DLI batch injects K defects, each a donor (`dli.data.instances.DonorTable`) seen through its own
augmentation matrix. Decoded with the batch, the K sources (an image file and a mask each: decode,
resize, warp) nearly double DALI's work per batch, although the donors are few and fixed (a few
hundred on Magnetic Tile) and only the matrix changes. So the loader has DALI decode and resize a
donor once, with the identity matrix, keeps its image and mask here, and every injection of it
only warps them on the device (`warp_on_device`).

`warp_on_device` is DALI's warp (`dli.pipeline.augment`'s conventions, `apply_affine_numpy`'s
rule) in torch: bilinear for images, nearest for masks, border pixels repeated. It runs on the
normalized images: normalization is affine per channel and bilinear weights sum to one, so warping
before or after it differs by float32 rounding only. The grid comes from the host-known matrices;
nothing is read back.

Memory: a donor takes H x W x (4 C + 1) bytes (float32 image of C channels, one byte of mask),
about 0.3 MB for a gray 256² donor. The budget is per loader and process, on the training device:
`DEFAULT_BUDGET_MB`, or the environment variable ``DLI_DONOR_CACHE_MB`` (0 keeps nothing). Donors
are kept in the order they are first decoded until the budget is full; nothing is evicted. A donor
that is not kept is decoded again with each batch that injects it and warped the same way, so a
batch is the same whatever the budget.

With crops (`--crop`) a donor's crop, and so its decoded pixels, changes with every injection:
the loader then keeps no donors and DALI warps the sources with their batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dli.pipeline.augment import as_3x3
from dli.pipeline.file_cache import budget_from_environment
from dli.pipeline.inject import to_device

BUDGET_VARIABLE = "DLI_DONOR_CACHE_MB"
DEFAULT_BUDGET_MB = 1024


def budget() -> int:
    """The cache budget in bytes: ``DLI_DONOR_CACHE_MB`` or `DEFAULT_BUDGET_MB`; `DliError` when malformed."""
    return budget_from_environment(variable=BUDGET_VARIABLE, default_mb=DEFAULT_BUDGET_MB)


def grid_matrices(matrices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, 2, 3) float32 `affine_grid` matrices of source-to-output pixel `matrices` on an H x W grid.

    `affine_grid` (``align_corners=False``) maps each output pixel centre, in coordinates where the
    image spans [-1, 1], to where the output samples its input. In pixel coordinates p (centre of
    column j at j + 0.5) that point is M⁻¹ p; with p = S (u + 1), S = diag(W / 2, H / 2), the
    normalized matrix is u ↦ S⁻¹ (M⁻¹ S (u + 1)) - 1. Computed in float64.
    """
    height, width = size
    back = np.linalg.inv(as_3x3(matrices))[..., :2, :]  # (K, 2, 3): output to source pixels
    scale = np.array([width / 2.0, height / 2.0])
    out = np.empty(back.shape, dtype=np.float64)
    out[..., :2] = back[..., :2] * scale[None, :] / scale[:, None]
    out[..., 2] = (back[..., :2] @ scale + back[..., 2]) / scale - 1.0
    return out.astype(np.float32)


def pixel_centres(size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(1, H * W, 3) float32 (u, v, 1) of each pixel centre in `affine_grid`'s [-1, 1] coordinates."""
    height, width = size
    v = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) * (2.0 / height) - 1.0
    u = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) * (2.0 / width) - 1.0
    ones = torch.ones((height, width), dtype=torch.float32, device=device)
    return torch.stack([u.expand(height, width), v[:, None].expand(height, width), ones], -1).view(1, -1, 3)


def warp_on_device(
    images: torch.Tensor, masks: torch.Tensor, matrices: np.ndarray, centres: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp (K, C, H, W) float `images` and (K, H, W) 0/1 `masks`, each by its source-to-output matrix.

    Returns the warped images (K, C, H, W) float32 and masks (K, H, W) float32 0/1 on their device.
    `centres`: `pixel_centres` of the size, if the caller keeps them.
    """
    count, _, height, width = images.shape
    if centres is None:
        centres = pixel_centres((height, width), images.device)
    theta = to_device(grid_matrices(matrices, (height, width)), images.device)
    # `affine_grid`'s product, written out: torch's CPU version takes 5x as long for the same grid.
    grid = torch.matmul(centres, theta.transpose(1, 2)).view(count, height, width, 2)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    warped_masks = F.grid_sample(
        masks[:, None].to(torch.float32), grid, mode="nearest", padding_mode="border", align_corners=False
    )
    return warped, warped_masks[:, 0]


class DonorCache:
    """Decoded donors (normalized image and 0/1 mask) on `device`, kept while `budget` bytes last.

    `missing(donors)` lists the donors a batch must have decoded; `sources(...)` keeps what was
    decoded (while it fits) and returns the batch's sources, warped (see the module docstring).
    """

    def __init__(
        self, donors: int, channels: int, size: tuple[int, int], device: torch.device, budget: int
    ) -> None:
        if budget < 0:
            raise ValueError(f"budget {budget}: must be >= 0")
        self.channels, self.size, self.device = channels, size, device
        self.bytes_per_donor = size[0] * size[1] * (4 * channels + 1)
        self.capacity = min(donors, budget // self.bytes_per_donor)
        self._slots = np.full(donors, -1, dtype=np.int64)  # each donor's slot, -1 while not kept
        self._images: torch.Tensor | None = None  # (capacity, C, H, W) float32, at the first keep
        self._masks: torch.Tensor | None = None  # (capacity, H, W) uint8 0/1
        self._centres: torch.Tensor | None = None  # `pixel_centres`, at the first warp
        self.kept = 0

    def __len__(self) -> int:
        return self.kept

    @property
    def bytes(self) -> int:
        """Device memory the kept donors take."""
        return self.kept * self.bytes_per_donor

    def missing(self, donors: Sequence[int]) -> tuple[int, ...]:
        """The distinct donors of `donors` not kept, in order of first appearance."""
        return tuple(d for d in dict.fromkeys(int(d) for d in donors) if self._slots[d] < 0)

    def sources(
        self,
        donors: Sequence[int],
        matrices: np.ndarray,
        decoded: Sequence[int],
        images: torch.Tensor,
        masks: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The K injections' sources: donor k of `donors` warped by `matrices[k]`.

        `decoded` are the donors decoded with this batch (`missing` when the batch was planned),
        `images` (len(decoded), C, H, W) and `masks` (len(decoded), H, W) their normalized images
        and class-index maps, unwarped. They are kept first while the budget lasts; every donor
        of `donors` must be kept or among `decoded`. Returns (K, C, H, W) float32 images and
        (K, H, W) float32 0/1 masks.
        """
        self._keep(decoded, images, masks)
        where = {d: i for i, d in enumerate(decoded)}
        slots = self._slots[np.asarray(donors, dtype=np.int64)]
        kept = slots >= 0
        if any(not k and int(d) not in where for d, k in zip(donors, kept, strict=True)):
            raise RuntimeError("a source donor was neither kept nor decoded with its batch")
        height, width = self.size
        if kept.all() and self._images is not None and self._masks is not None:
            index = to_device(slots, self.device)
            chosen, chosen_masks = self._images.index_select(0, index), self._masks.index_select(0, index)
        else:
            chosen = images.new_empty((len(donors), self.channels, height, width))
            chosen_masks = masks.new_empty((len(donors), height, width), dtype=torch.uint8)
            fresh = np.flatnonzero(~kept)
            at = to_device(fresh, self.device)
            rows = to_device(np.array([where[int(donors[k])] for k in fresh], dtype=np.int64), self.device)
            chosen.index_copy_(0, at, images.index_select(0, rows))
            chosen_masks.index_copy_(0, at, masks.index_select(0, rows).ne(0).to(torch.uint8))
            if kept.any():
                assert self._images is not None and self._masks is not None
                at, index = to_device(np.flatnonzero(kept), self.device), to_device(slots[kept], self.device)
                chosen.index_copy_(0, at, self._images.index_select(0, index))
                chosen_masks.index_copy_(0, at, self._masks.index_select(0, index))
        if self._centres is None:
            self._centres = pixel_centres(self.size, self.device)
        return warp_on_device(chosen, chosen_masks, matrices, self._centres)

    def _keep(self, decoded: Sequence[int], images: torch.Tensor, masks: torch.Tensor) -> None:
        """Keep the decoded donors not kept yet, in order, while there is room."""
        room = self.capacity - self.kept
        new = [(i, d) for i, d in enumerate(decoded) if self._slots[d] < 0][: max(room, 0)]
        if not new:
            return
        if self._images is None or self._masks is None:
            height, width = self.size
            shape = (self.capacity, self.channels, height, width)
            self._images = torch.empty(shape, dtype=torch.float32, device=self.device)
            self._masks = torch.empty((self.capacity, height, width), dtype=torch.uint8, device=self.device)
        rows = np.array([i for i, _ in new], dtype=np.int64)
        slots = np.arange(self.kept, self.kept + len(new), dtype=np.int64)
        self._slots[[d for _, d in new]] = slots
        self.kept += len(new)
        at, index = to_device(slots, self.device), to_device(rows, self.device)
        self._images.index_copy_(0, at, images.index_select(0, index))
        self._masks.index_copy_(0, at, masks.index_select(0, index).ne(0).to(torch.uint8))
