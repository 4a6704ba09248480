"""What one iteration of the data path hands to the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Batch:
    """A training or validation batch, on the training device.

    Attributes:
        images: (N, 3, H, W) float32, normalized; RGB, or gray expanded to 3 channels.
        masks: (N, C, H, W) float32 in {0, 1}; channel c is the label of defect class c.
        class_ids: (N,) int64 class id of each image after injection (-1 = defect-free).
        plan: the DLI plan that produced the batch (None when injection is off).
    """

    images: torch.Tensor
    masks: torch.Tensor
    class_ids: torch.Tensor
    plan: Any = None

    def __len__(self) -> int:
        return int(self.images.shape[0])
