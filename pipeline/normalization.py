"""Image channels and normalization statistics of a run: which, where from, and measuring them.

Channels (`dli train --channels auto|1|3`). ``auto`` trains in gray (1 channel) when every
training image looks gray at validation (`dli.data.imageio.looks_gray`: stored gray, or R,
G and B equal within a tolerance), else in RGB (3 channels). A gray image in an RGB run is
repeated into R, G and B; a colour image in a gray run is converted to its luma
(`dli.data.imageio.LUMA`), the same way in training, evaluation and `dli predict`.

Normalization (`dli train --normalization auto|dataset|imagenet|magnetic-tile`): the per-channel
mean and std, on [0, 1] intensities, that every image is normalized with, (x - mean) / std.

- ``magnetic-tile``: Magnetic Tile's fixed statistics (`MT_MEAN`, `MT_STD`), the reference
  implementation's normalization, the one every run used before normalization was a setting.
- ``imagenet``: ImageNet's (`IMAGENET_MEAN`, `IMAGENET_STD`), what pretrained encoders expect;
  for a gray run their luma-weighted average (`imagenet_statistics`).
- ``dataset``: measured once on the training split (`measure_statistics`): a streaming per-channel
  mean and std over every training image, resized to the training size as training resizes it,
  before augmentation. It costs one decoding pass over the training images.
- ``auto``: ``magnetic-tile`` for Magnetic Tile data (a gray run whose classes are Magnetic Tile's
  five, `MT_CLASSES`: the dataset itself, its reference split and the bundled synthetic data), so
  that its runs keep their numbers and stay comparable with the paper; else ``imagenet`` when the
  encoder's ImageNet weights were loaded; else ``dataset``.

The resolved choice and its values are written to the run's `config.yaml` (runtime
``normalization``) and its checkpoints (`dli.models.checkpoint.ModelInfo`), from which `dli eval`,
`dli predict` and `dli export` (ONNX metadata) read them; a resumed run keeps its own.
Statistics are kept per model input channel (3): a gray run has the same value in all three.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from dli.common.errors import DliError
from dli.data.imageio import LUMA, READ_ERRORS, stored_gray

if TYPE_CHECKING:
    import torch

    from dli.data.manifest import Manifest

MT_MEAN = 0.4319174835105347
MT_STD = 0.11959978240241884
"""Magnetic Tile intensity statistics on [0, 1] (the reference implementation's normalization)."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""ImageNet's RGB statistics on [0, 1] (those of torchvision's and timm's pretrained encoders)."""

CHANNEL_SETTINGS: tuple[str, ...] = ("auto", "1", "3")
"""Values of `dli train --channels`."""

NORMALIZATIONS: tuple[str, ...] = ("auto", "dataset", "imagenet", "magnetic-tile")
"""Values of `dli train --normalization` (see the module docstring)."""

MODEL_CHANNELS = 3
"""Input channels of every model: a gray image is repeated into all three."""

MIN_STD = 1e-3
"""Floor of a measured standard deviation (a constant channel would otherwise divide by 0)."""


@dataclass(frozen=True)
class Normalization:
    """A run's normalization: where it comes from and its per-model-channel values.

    Attributes:
        source: ``dataset``, ``imagenet`` or ``magnetic-tile`` (never ``auto``).
        mean, std: three values each, on [0, 1] intensities (equal for a gray run).
    """

    source: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "mean": list(self.mean), "std": list(self.std)}


def model_statistics(
    mean: Sequence[float], std: Sequence[float], channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-image-channel (or one shared) `mean`/`std` as 3 values each, the model's input channels.

    `DliError` when a gray run is given different values per channel (its one channel is repeated,
    so it has one mean and one std), or when the counts fit neither 1 nor `channels` nor 3.
    """
    values = []
    for name, given in (("mean", mean), ("std", std)):
        numbers = tuple(float(v) for v in np.atleast_1d(np.asarray(given, dtype=np.float64)))
        if len(numbers) not in (1, MODEL_CHANNELS) or not all(np.isfinite(numbers)):
            raise DliError(f"normalization {name} {list(given)}: expected 1 or 3 finite values")
        if channels == 1 and len(set(numbers)) > 1:
            raise DliError(f"normalization {name} {list(given)}: a gray run has one value for all channels")
        if name == "std" and min(numbers) <= 0:
            raise DliError(f"normalization std {list(given)}: must be > 0")
        values.append(numbers * MODEL_CHANNELS if len(numbers) == 1 else numbers)
    return values[0], values[1]


def normalized_range(
    mean: Sequence[float], std: Sequence[float], channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Where [0, 1] intensities land after normalization, per image channel: (lows, highs)."""
    return (
        tuple((0.0 - mean[c]) / std[c] for c in range(channels)),
        tuple((1.0 - mean[c]) / std[c] for c in range(channels)),
    )


def channels_from_setting(setting: str | int, looks_gray: Iterable[bool]) -> int:
    """1 or 3 for `--channels` `setting`; ``auto``: 1 when every image of `looks_gray` is gray."""
    setting = str(setting)
    if setting not in CHANNEL_SETTINGS:
        raise DliError(f"--channels {setting}: choose from {', '.join(CHANNEL_SETTINGS)}")
    if setting != "auto":
        return int(setting)
    return 1 if all(looks_gray) else 3


def _stored_colour(path: Path) -> bool:
    try:
        with Image.open(path) as image:  # the header only
            return not stored_gray(image)
    except READ_ERRORS:
        return True  # decoded through RGB; the decoder reports the file itself


def any_colour_file(paths: Iterable[Path]) -> bool:
    """Whether some image file is not stored gray (a gray loader must then decode through RGB).

    Reads file headers only (threads for many files).
    """
    paths = list(paths)
    if len(paths) <= 64:
        return any(_stored_colour(p) for p in paths)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return any(pool.map(_stored_colour, paths))


def imagenet_statistics(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's statistics for `channels` image channels (gray: weighted by `LUMA`), 3 values each."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    mean = float(np.dot(LUMA, IMAGENET_MEAN))
    std = float(np.dot(LUMA, IMAGENET_STD))
    return (mean,) * MODEL_CHANNELS, (std,) * MODEL_CHANNELS


def resolve_source(setting: str, *, channels: int, class_names: Sequence[str], imagenet_weights: bool) -> str:
    """The normalization source `setting` resolves to (``auto``: see the module docstring)."""
    from dli.data.manifest import MT_CLASSES

    if setting not in NORMALIZATIONS:
        raise DliError(f"--normalization {setting}: choose from {', '.join(NORMALIZATIONS)}")
    if setting != "auto":
        return setting
    if channels == 1 and tuple(class_names) == MT_CLASSES:
        return "magnetic-tile"
    return "imagenet" if imagenet_weights else "dataset"


def fixed_normalization(source: str, channels: int) -> Normalization:
    """The ``magnetic-tile`` or ``imagenet`` normalization of a run with `channels` image channels."""
    if source == "magnetic-tile":
        return Normalization(source, (MT_MEAN,) * MODEL_CHANNELS, (MT_STD,) * MODEL_CHANNELS)
    if source == "imagenet":
        return Normalization(source, *imagenet_statistics(channels))
    raise DliError(f"normalization {source!r} is measured, not fixed")


def measure_statistics(
    manifest: Manifest,
    *,
    image_size: int,
    channels: int,
    resize: str = "linear",
    device: str | torch.device = "cpu",
    shard_id: int = 0,
    num_shards: int = 1,
    colour_files: bool | None = None,
    batch_size: int = 16,
    num_threads: int = 2,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Normalization:
    """The ``dataset`` normalization: per-channel mean and std of `manifest`'s images at `image_size`.

    Every image is decoded once as evaluation decodes it (resized, no augmentation, `channels`
    as training converts them); sums run on `device` in float64 and are read once at the end.
    With several processes each measures its shard and `reduce` (a sum across processes) joins them.
    """
    import torch

    from dli.pipeline.loader import build_loader

    loader = build_loader(
        manifest,
        batch_size=batch_size,
        image_size=image_size,
        train=False,
        device=device,
        shard_id=shard_id,
        num_shards=num_shards,
        num_threads=num_threads,
        prefetch=2,
        resize=resize,
        channels=channels,
        mean=(0.0,),
        std=(1.0,),
        colour_files=colour_files,
        keep_files=False,  # every file is read once
    )
    sums = torch.zeros(3, channels, dtype=torch.float64, device=loader.device)
    try:
        for batch in loader:
            images = batch.images[:, :channels].to(torch.float64)
            sums[0] += images.sum(dim=(0, 2, 3))
            sums[1] += images.square().sum(dim=(0, 2, 3))
            sums[2] += images[:, 0].numel()
    finally:
        loader.close()
    if reduce is not None:
        sums = reduce(sums)
    total, squares, count = sums.cpu().numpy()
    if count[0] == 0:
        raise DliError(f"dataset {manifest.root}: no training image to measure normalization statistics on")
    mean = total / count
    std = np.maximum(np.sqrt(np.maximum(squares / count - mean**2, 0.0)), MIN_STD)
    return Normalization("dataset", *model_statistics(tuple(mean), tuple(std), channels))
