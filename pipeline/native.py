"""Batches of whole images at native resolution, for evaluating a model that predicts by tiles.

`native_batches` yields one `dli.pipeline.batch.Batch` per image: the image at its own size,
scaled to [0, 1] and normalized per channel (gray repeated over the model's channels), and
its label channels read from the original mask with `dli.data.imageio.read_mask` (the rule
validation and training apply), never resized. Metrics computed on them are at native
resolution against the original masks: per class, TP + FN equals the mask's defect pixels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from dli.common.errors import DliError
from dli.data.imageio import read_image, read_index, read_mask
from dli.data.manifest import FREE, Manifest, Sample
from dli.pipeline.batch import Batch


def label_channels(sample: Sample, num_classes: int, shape: tuple[int, int]) -> np.ndarray:
    """(classes, H, W) float32 {0, 1}: for a binary mask, channel `class_id` is the mask and the
    others zero; for an index mask, channel c is where it holds c + 1."""
    labels = np.zeros((num_classes, *shape), np.float32)
    if sample.class_id != FREE and sample.mask is not None:
        mask = read_index(sample.mask) if sample.index_bits else read_mask(sample.mask)
        if mask.shape != shape:
            raise DliError(
                f"mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]}, its image {shape[1]}x{shape[0]}"
            )
        if sample.index_bits:
            for c in sample.classes:
                labels[c] = mask == c + 1
        else:
            labels[sample.class_id] = mask
    return labels


def native_batches(
    manifest: Manifest, mean: Sequence[float], std: Sequence[float], *, channels: int = 1
) -> Iterator[Batch]:
    """One batch per image of `manifest`, at the image's own size (see the module docstring),
    read in `channels` as training reads them (`dli.data.imageio.read_image`)."""
    mean_array = np.asarray(mean, np.float32).reshape(-1, 1, 1)
    std_array = np.asarray(std, np.float32).reshape(-1, 1, 1)
    for sample in manifest.samples:
        pixels = np.moveaxis(read_image(sample.image, channels), 2, 0)
        image = (pixels.astype(np.float32) / np.float32(255.0) - mean_array) / std_array
        labels = label_channels(sample, manifest.num_classes, pixels.shape[1:])
        yield Batch(
            images=torch.from_numpy(np.ascontiguousarray(image, np.float32))[None],
            masks=torch.from_numpy(labels)[None],
            class_ids=torch.tensor([sample.class_id], dtype=torch.int64),
        )
