"""A torch model that predicts whole native-resolution images by tiles (`dli.pipeline.tiling`).

`TiledModel` wraps a segmentation model so that `TiledModel(model, tiling)(images)` returns the
logits of each (C, H, W) image of the batch at its own size, computed by `dli.pipeline.tiling`'s
algorithm (the one `dli predict` uses on both of its paths) with the wrapped model as the tile
runner. The images come normalized (as the model takes them), so the tiles are only cut, not
normalized again. Each image goes through the host (NumPy tiling), tile batches through the
model on its device: this is evaluation's path (`dli eval`, validation of a model trained on
crops), not the training step's.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dli.pipeline.tiling import TiledInference, Tiling


class TiledModel(nn.Module):
    """`model` applied by overlapping tiles of `tiling`, `batch` tiles per forward pass."""

    def __init__(self, model: nn.Module, tiling: Tiling, *, batch: int = 8) -> None:
        super().__init__()
        self.model, self.tiling, self.batch = model, tiling, batch

    def _run(self, device: torch.device):
        def run(tiles: np.ndarray) -> np.ndarray:
            inputs = torch.from_numpy(tiles).to(device).contiguous(memory_format=torch.channels_last)
            return self.model(inputs).float().cpu().numpy()

        return run

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, classes, H, W) float32 logits of (N, C, H, W) normalized images."""
        tiled = TiledInference(
            self._run(images.device), self.tiling, lambda t: t.astype(np.float32), batch=self.batch
        )
        host = images.float().cpu().numpy()
        return torch.stack([torch.from_numpy(tiled.logits(image)) for image in host]).to(images.device)
