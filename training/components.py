"""The parts of a training run that follow from its config and data alone: injection, losses, loaders.

`dli.training.trainer.Trainer` builds a run from these, in this order (the order its random
draws depend on):
- `injection_of`: the injection settings of `--method dli` (None for every other method), or
  `DliError` when the training set offers DLI nothing to inject into under `--canvas free` or
  `--crop` (both inject into defect-free images only);
- `pixel_counts_of`: the class pixel counts the weighted losses need (a resumed run reads the
  ones it saved, so its weights do not move);
- `losses_of`: the training loss (Dice over the global batch when several processes train) and
  the validation loss (each process's batches alone), with the loss's description;
- then the model; then `image_settings_of`: image channels and normalization (a resumed run
  keeps its own; a new one decides them after the model, since ``--normalization auto`` depends
  on whether ImageNet weights loaded);
- `loaders_of`: the training loader (crops, injection, donors, the last-batch policy) and the
  validation loader, or, for a model trained on crops, no validation loader and the `Tiling`
  that validates whole images as the model will be used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from dli.common.errors import DliError
from dli.models.checkpoint import ModelInfo
from dli.models.losses import (
    ClassPixelCounts,
    LossOptions,
    LossSpec,
    build_loss,
    count_stored_defect_pixels,
    needs_pixel_counts,
)
from dli.models.metrics import all_reduce_sum
from dli.pipeline.crops import CropConfig
from dli.pipeline.normalization import (
    Normalization,
    channels_from_setting,
    fixed_normalization,
    measure_statistics,
    resolve_source,
)
from dli.pipeline.tiling import Tiling
from dli.training.config import TrainConfig
from dli.training.datasets import Datasets, class_pixel_counts
from dli.training.run_folder import RunFolder

if TYPE_CHECKING:
    from dli.pipeline.loader import Loader
    from dli.pipeline.planner import DliConfig


def pixel_counts_of(config: TrainConfig, datasets: Datasets, folder: RunFolder) -> ClassPixelCounts | None:
    """The class pixel counts the loss weighs by (None when it needs none); a resumed run reads its own."""
    if not needs_pixel_counts(config.method):
        return None
    if config.resume and folder.class_pixels.is_file():
        return ClassPixelCounts.from_dict(json.loads(folder.class_pixels.read_text(encoding="utf-8")))
    return class_pixel_counts(datasets, config.image_size or 0)


def image_settings_of(
    config: TrainConfig,
    datasets: Datasets,
    checkpoint: Mapping[str, Any] | None,
    *,
    imagenet_weights: bool,
    device: torch.device,
    rank: int,
    world_size: int,
    batch_size: int,
    colour_files: bool,
) -> tuple[int, Normalization]:
    """The run's image channels and normalization (`dli.pipeline.normalization`).

    A resumed run keeps its own (from `checkpoint`); a new one decides them from the flags, the
    training images and whether ImageNet weights loaded, measuring the dataset's statistics
    across the processes when ``--normalization`` asks for them.
    """
    if checkpoint is not None:
        info = ModelInfo.from_dict(checkpoint["model_info"])
        return info.channels, Normalization(info.normalization, info.mean, info.std)
    channels = channels_from_setting(config.channels, datasets.train_looks_gray())
    source = resolve_source(
        config.normalization,
        channels=channels,
        class_names=datasets.class_names,
        imagenet_weights=imagenet_weights,
    )
    if source != "dataset":
        return channels, fixed_normalization(source, channels)
    assert config.image_size is not None
    measured = measure_statistics(
        datasets.train,
        image_size=config.image_size,
        channels=channels,
        resize=str(config.resize),
        device=device,
        shard_id=rank,
        num_shards=world_size,
        colour_files=colour_files,
        batch_size=batch_size,
        num_threads=config.num_threads,
        reduce=all_reduce_sum,
    )
    return channels, measured


def injection_of(config: TrainConfig, datasets: Datasets) -> DliConfig | None:
    """DLI's settings for this run (None unless ``--method dli``); `DliError` when it cannot inject."""
    from dli.pipeline.planner import DliConfig

    injection = (
        DliConfig(
            poisson_prob=config.poisson_prob,
            fill=config.fill,
            poisson_label=str(config.poisson_label),
            poisson_solver=config.poisson_solver,
            poisson_window=str(config.poisson_window),
            canvas=config.canvas,
        )
        if config.method == "dli"
        else None
    )
    if injection is not None and not datasets.free_training_images():
        if config.canvas == "free":
            raise DliError(
                f"--method dli --canvas free: the training set of {datasets.data_path} has no "
                "defect-free image to inject into; use --canvas auto or any (into defect-free areas)"
            )
        if config.crop is not None:
            raise DliError(
                f"--method dli --crop: the training set of {datasets.data_path} has no "
                "defect-free image, and with crops DLI injects into defect-free images only"
            )
    return injection


def losses_of(
    config: TrainConfig, datasets: Datasets, pixel_counts: ClassPixelCounts | None, *, global_batch: bool
) -> tuple[Any, LossSpec, Any]:
    """(training loss, its description, validation loss) of ``--method`` and the loss flags."""
    options = LossOptions(
        wce_weights=str(config.wce_weights),
        balanced_counts=str(config.balanced_counts),
        focal=str(config.focal),
        dice=str(config.dice),
    )
    stored_pixels = None
    if needs_pixel_counts(config.method) and options.needs_stored_pixels:
        stored_pixels = count_stored_defect_pixels(datasets.train)
    # Training computes the Dice of the global batch; validation, whose shards differ in
    # length, scores each process's batches alone (it reports the loss, not trains on it).
    loss_fn, loss_spec = build_loss(
        config.method,
        pixel_counts,
        options=options,
        stored_defect_pixels=stored_pixels,
        global_batch=global_batch,
    )
    eval_loss_fn, _ = build_loss(
        config.method, pixel_counts, options=options, stored_defect_pixels=stored_pixels
    )
    return loss_fn, loss_spec, eval_loss_fn


def loaders_of(
    config: TrainConfig,
    datasets: Datasets,
    injection: DliConfig | None,
    *,
    device: torch.device,
    rank: int,
    world_size: int,
    batch_size: int,
    channels: int,
    normalization: Normalization,
    colour_files: bool,
) -> tuple[Loader, Loader | None, Tiling | None]:
    """(training loader, validation loader or None, tiling or None) of this process's share."""
    from dli.pipeline.loader import build_loader

    common = {
        "batch_size": batch_size,
        "image_size": config.image_size,
        "seed": config.seed,
        "device": device,  # cuda:N as resolved: the data path runs beside the model
        "shard_id": rank,
        "num_shards": world_size,
        "num_threads": config.num_threads,
        "resize": str(config.resize),
        "channels": channels,
        "mean": normalization.mean,
        "std": normalization.std,
        "colour_files": colour_files,
        "fit": config.aspect == "fit",
    }
    crop = None if config.crop is None else CropConfig(config.crop, config.scale, config.crop_defect_prob)
    train_loader = build_loader(
        datasets.train,
        train=True,
        crop=crop,
        dli=injection,
        donors=datasets.donor_table(config.donors),
        source_boxes=datasets.source_boxes(),
        canvas_boxes=datasets.canvas_boxes(),
        drop_last=config.last_batch == "drop",
        **common,
    )
    # A model trained on crops is validated as it will be used: whole images by tiles.
    tiling = None if crop is None else Tiling(crop.size, scale=crop.scale)
    val_loader = None if crop else build_loader(datasets.val, train=False, **common)
    return train_loader, val_loader, tiling
