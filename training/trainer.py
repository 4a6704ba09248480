"""The training loop: `train(config) -> RunResult`, callable from other code (experiment grids,
multi-GPU launchers).

`Trainer` builds a run from its config (data first, so a bad dataset fails before anything is
written), then `fit()` runs the remaining epochs: training steps (`dli.training.steps`), validation,
threshold calibration, the epoch's files in the run folder (`dli.training.run_folder`) and pictures.
Mixed precision is bf16 where the GPU supports it, fp16 with loss scaling otherwise, fp32 on
CPU or with `--no-amp`; activations are channels-last. `--protocol`
(`dli.training.config.PROTOCOL_DEFAULTS`) chooses the loss terms, decoder depth, resizing, Poisson
label, schedule (cosine per step or per epoch), last-batch policy and precision as a whole,
each overridable by its own flag; a run resumes only under the protocol it started with. A
step whose loss or gradients are not finite is skipped on the device and counted; after
`MAX_SKIPPED_IN_A_ROW` such steps in a row the run stops as diverged (`DliError`, exit status
2). A checkpoint whose weights are not finite is never written. `--patience N` ends a run after
N evaluations without a better IoU. `--resume` continues a killed run from `last.pt`; the
loader's shuffling and injection plans depend only on (seed, epoch), so the resumed run sees
the same batches as an uninterrupted one.

Several processes (`rank`/`world_size`, see `dli.training.distributed`) train one model with
`DistributedDataParallel`: each decodes, plans its part of and injects batch_size / K images,
and the K parts of a step are exactly the batch one process would see (see
`dli.pipeline.loader`), so a run's data does not depend on K. Gradients are averaged across
processes, validation counts summed, and only rank 0 writes files and prints. BatchNorm
statistics stay per process, as usual with DDP.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dli.common.atomic import atomic_write_text, remove_stale_temp_files
from dli.common.errors import DliError
from dli.common.lock import FolderLock
from dli.common.progress import bar as progress_bar
from dli.common.progress import on_terminal
from dli.models.checkpoint import (
    ModelInfo,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unwrap,
)
from dli.models.losses import (
    ClassPixelCounts,
    LossOptions,
    build_loss,
    count_stored_defect_pixels,
    needs_pixel_counts,
)
from dli.models.metrics import ConfusionCounter, SegmentationScores, all_reduce_sum, evaluate_model
from dli.models.thresholds import CHECKPOINT_KEY as THRESHOLDS_KEY
from dli.models.thresholds import ThresholdCalibrator, choose_thresholds
from dli.models.tiled import TiledModel
from dli.models.unet import PretrainedStatus, build_model, count_parameters
from dli.pipeline.crops import CropConfig
from dli.pipeline.normalization import (
    Normalization,
    any_colour_file,
    channels_from_setting,
    fixed_normalization,
    measure_statistics,
    resolve_source,
)
from dli.pipeline.tiling import Tiling
from dli.training.config import (
    DEVICE_PATTERN,
    TrainConfig,
    portable_paths,
    resolved_paths,
    write_run_config,
)
from dli.training.datasets import check_same_data, class_pixel_counts, data_record, datasets_of
from dli.training.figures import PredictionGrid, write_curves
from dli.training.run_folder import (
    BEST,
    CALIBRATED_SCORES_KEY,
    IOU_BY_IMAGE_CLASS,
    LAST,
    check_resumable,
    default_run_name,
    prepare_run_folder,
)
from dli.training.steps import MAX_SKIPPED_IN_A_ROW, StepMonitor, StepTotals, make_optimizer, train_step

# ---------------------------------------------------------------------------------------------
# Device and precision.


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """`auto` -> `cuda:<rank>` when a GPU is present, else `cpu`; `DliError` for an absent GPU."""
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise DliError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DliError(f"--device {name}: no CUDA GPU is available")
        index = device.index if device.index is not None else rank
        if index >= torch.cuda.device_count():
            raise DliError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def amp_dtype_for(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """Autocast dtype: bf16 on GPUs that support it, else fp16; None (fp32) on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), NumPy's global RNG and Python's `random`."""
    import random

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - libraries may draw from the global RNG
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Training.


@dataclass
class Progress:
    """Where a run stands; saved in `last.pt` so a resumed run continues exactly."""

    epoch: int = 0
    step: int = 0
    skipped_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best: SegmentationScores | None = None
    last: SegmentationScores | None = None
    evaluations_since_best: int = 0
    """Evaluations in a row without a better IoU (what `--patience` counts)."""

    def improves(self, scores: SegmentationScores) -> bool:
        """Whether `scores` beat the best overall IoU so far (NaN never does)."""
        return not math.isnan(scores.iou) and (self.best is None or scores.iou > self.best.iou)

    def to_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_scores": self.best.to_state() if self.best else None,
            "last_scores": self.last.to_state() if self.last else None,
            "evaluations_since_best": self.evaluations_since_best,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Progress:
        best, last = state.get("best_scores"), state.get("last_scores")
        return cls(
            epoch=state["epoch"],
            step=state["step"],
            skipped_steps=state["skipped_steps"],
            history=list(state["history"]),
            best_epoch=state["best_epoch"],
            best=SegmentationScores.from_state(best) if best else None,
            last=SegmentationScores.from_state(last) if last else None,
            evaluations_since_best=state.get("evaluations_since_best", 0),
        )


@dataclass
class RunResult:
    """What a training run produced."""

    run_dir: Path
    config: TrainConfig
    epochs_completed: int
    steps: int
    skipped_steps: int
    best_epoch: int | None
    best: SegmentationScores | None
    last: SegmentationScores | None
    history: list[dict[str, Any]]
    pretrained: PretrainedStatus
    seconds: float

    @property
    def best_iou(self) -> float:
        return self.best.iou if self.best is not None else math.nan


EpochCallback = Callable[[dict[str, Any]], None]


def _versions() -> dict[str, str]:
    import segmentation_models_pytorch as smp
    import timm

    import dli

    versions = {"dli": dli.__version__, "python": platform.python_version(), "torch": str(torch.__version__)}
    versions |= {"segmentation_models_pytorch": smp.__version__, "timm": timm.__version__}
    try:
        import nvidia.dali as dali

        versions["nvidia-dali"] = str(dali.__version__)
    except ImportError:
        pass
    return versions


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()})"


class Trainer:
    """One training run: data, model, optimisation state and run folder, built from a config.

    `fit()` runs the remaining epochs. Construction reads and validates the data first, so a
    bad dataset fails before anything is written.
    """

    def __init__(
        self, config: TrainConfig, *, rank: int = 0, world_size: int = 1, local_rank: int | None = None
    ) -> None:
        from dli.pipeline.loader import build_loader
        from dli.pipeline.planner import DliConfig

        self.started = time.perf_counter()
        config = config.validate().resolved()
        assert config.epochs is not None and config.batch_size is not None and config.image_size is not None
        local_batch = check_batch_split(config.batch_size, world_size)
        check_last_batch(config.last_batch, world_size)
        self.config, self.rank, self.world_size = config, rank, world_size
        self.writer_rank = rank == 0
        self.device = resolve_device(config.device, rank if local_rank is None else local_rank)
        self.amp_dtype = amp_dtype_for(self.device, config.amp)

        self.datasets = datasets_of(config)
        self.data_record = data_record(self.datasets)
        self.class_names = self.datasets.class_names
        empty = self.datasets.train.empty_classes()
        if empty and self.writer_rank:
            warnings.warn(f"no training image of class(es) {', '.join(empty)}", RuntimeWarning, stacklevel=3)

        if world_size > 1 and config.out is None:
            config = replace(config, out=_rank0_value(str(Path("runs") / default_run_name(config))))
        self.folder = prepare_run_folder(config)
        config = self.config = replace(config, out=str(self.folder.root))  # recorded where it really is
        checkpoint = load_checkpoint(self.folder.last) if config.resume else None
        if checkpoint is not None:
            check_resumable(config, resolved_paths(checkpoint["config"], self.folder.root), self.folder.last)
            check_same_data(self.data_record, checkpoint.get("data"), self.folder.last)

        # Shuffling, flips and injection plans are functions of (seed, epoch) alone.
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
        if injection is not None and not self.datasets.free_training_images():
            if config.canvas == "free":
                raise DliError(
                    f"--method dli --canvas free: the training set of {self.datasets.data_path} has no "
                    "defect-free image to inject into; use --canvas auto or any (into defect-free areas)"
                )
            if config.crop is not None:
                raise DliError(
                    f"--method dli --crop: the training set of {self.datasets.data_path} has no "
                    "defect-free image, and with crops DLI injects into defect-free images only"
                )

        self.pixel_counts = self._class_pixel_counts()
        options = LossOptions(
            wce_weights=str(config.wce_weights),
            balanced_counts=str(config.balanced_counts),
            focal=str(config.focal),
            dice=str(config.dice),
        )
        stored_pixels = None
        if needs_pixel_counts(config.method) and options.needs_stored_pixels:
            stored_pixels = count_stored_defect_pixels(self.datasets.train)
        # Training computes the Dice of the global batch; validation, whose shards differ in
        # length, scores each process's batches alone (it reports the loss, not trains on it).
        self.loss_fn, self.loss_spec = build_loss(
            config.method,
            self.pixel_counts,
            options=options,
            stored_defect_pixels=stored_pixels,
            global_batch=world_size > 1,
        )
        self.eval_loss_fn, _ = build_loss(
            config.method, self.pixel_counts, options=options, stored_defect_pixels=stored_pixels
        )

        seed_everything(config.seed)
        pretrained = config.pretrained and checkpoint is None  # a resumed run loads its own weights
        self.model, self.pretrained = build_model(
            config.encoder,
            len(self.class_names),
            pretrained=pretrained,
            decoder_convs=int(config.decoder_convs or 2),
        )

        # Channels and normalization: a resumed run keeps its own; a new one decides them here,
        # after the model, since ``--normalization auto`` depends on whether ImageNet weights loaded.
        self.colour_files = any_colour_file(
            s.image for s in (*self.datasets.train.samples, *self.datasets.val.samples)
        )
        self.channels, self.normalization = self._image_settings(checkpoint, local_batch)
        common = {
            "batch_size": local_batch,
            "image_size": config.image_size,
            "seed": config.seed,
            "device": self.device,  # cuda:N as resolved: the data path runs beside the model
            "shard_id": rank,
            "num_shards": world_size,
            "num_threads": config.num_threads,
            "resize": str(config.resize),
            "channels": self.channels,
            "mean": self.normalization.mean,
            "std": self.normalization.std,
            "colour_files": self.colour_files,
            "fit": config.aspect == "fit",
        }
        crop = None if config.crop is None else CropConfig(config.crop, config.scale, config.crop_defect_prob)
        self.train_loader = build_loader(
            self.datasets.train,
            train=True,
            crop=crop,
            dli=injection,
            donors=self.datasets.donor_table(config.donors),
            source_boxes=self.datasets.source_boxes(),
            canvas_boxes=self.datasets.canvas_boxes(),
            drop_last=config.last_batch == "drop",
            **common,
        )
        # A model trained on crops is validated as it will be used: whole images by tiles.
        self.tiling = None if crop is None else Tiling(crop.size, scale=crop.scale)
        self.val_loader = None if crop else build_loader(self.datasets.val, train=False, **common)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.model = self.model.to(self.device, memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, lr=config.lr, weight_decay=config.weight_decay)
        # Cosine annealing to 0 over the run, stepped after every step or after every epoch.
        self.per_epoch_schedule = config.lr_schedule == "per-epoch"
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(1, config.epochs if self.per_epoch_schedule else self.total_steps)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.progress = Progress()
        self._skipped_in_a_row = 0  # non-finite steps in a row, across epochs (see `train_epoch`)
        if checkpoint is not None:
            self._load_state(checkpoint)

        # What the forward pass runs: the model, maybe wrapped for several GPUs and compiled.
        # Validation runs the model itself under DDP: each process scores its own shard, with no
        # collective per batch, so shards of unequal length cannot stall it.
        self.net: nn.Module = self.model
        if world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if config.compile:
            self.net = torch.compile(self.net)
        self.eval_net = self.model if world_size > 1 else self.net

        self.info = ModelInfo(
            encoder=config.encoder,
            class_names=self.class_names,
            image_size=config.image_size,
            mean=tuple(self.train_loader.mean),
            std=tuple(self.train_loader.std),
            decoder_convs=int(config.decoder_convs or 2),
            resize=str(config.resize),
            tiling=self.tiling,
            channels=self.channels,
            normalization=self.normalization.source,
            aspect=config.aspect,
        )
        self.tensorboard: Any = None
        self.lock = FolderLock(self.folder.root, "run folder")
        self.prediction_grid: PredictionGrid | None = None  # built at the first figure
        if self.writer_rank:
            try:
                self._open_run_folder()
            except BaseException:
                self.lock.release()
                raise

    # -- set-up -----------------------------------------------------------------------------------

    def _class_pixel_counts(self) -> ClassPixelCounts | None:
        if not needs_pixel_counts(self.config.method):
            return None
        if self.config.resume and self.folder.class_pixels.is_file():
            return ClassPixelCounts.from_dict(
                json.loads(self.folder.class_pixels.read_text(encoding="utf-8"))
            )
        return class_pixel_counts(self.datasets, self.config.image_size or 0)

    def _image_settings(
        self, checkpoint: Mapping[str, Any] | None, batch_size: int
    ) -> tuple[int, Normalization]:
        """The run's image channels and normalization (`dli.pipeline.normalization`)."""
        if checkpoint is not None:
            info = ModelInfo.from_dict(checkpoint["model_info"])
            return info.channels, Normalization(info.normalization, info.mean, info.std)
        config = self.config
        channels = channels_from_setting(config.channels, self.datasets.train_looks_gray())
        source = resolve_source(
            config.normalization,
            channels=channels,
            class_names=self.class_names,
            imagenet_weights=self.pretrained.loaded,
        )
        if source != "dataset":
            return channels, fixed_normalization(source, channels)
        assert config.image_size is not None
        measured = measure_statistics(
            self.datasets.train,
            image_size=config.image_size,
            channels=channels,
            resize=str(config.resize),
            device=self.device,
            shard_id=self.rank,
            num_shards=self.world_size,
            colour_files=self.colour_files,
            batch_size=batch_size,
            num_threads=config.num_threads,
            reduce=all_reduce_sum,
        )
        return channels, measured

    def _load_state(self, checkpoint: Mapping[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.progress = Progress.from_state(checkpoint["progress"])
        self.pretrained = PretrainedStatus(**checkpoint["pretrained"])
        restore_rng_state(checkpoint["rng"])  # last: building the model above drew from the RNG

    def runtime(self) -> dict[str, Any]:
        """Facts about this run that the config does not fix (written to `config.yaml`)."""
        params = count_parameters(self.model)
        return {
            "data_path": str(self.datasets.data_path),
            "class_names": list(self.class_names),
            "train_counts": self.datasets.train.counts_by_name(),
            "val_counts": self.datasets.val.counts_by_name(),
            **({"groups": asdict(self.datasets.groups)} if self.datasets.groups is not None else {}),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "device": _device_description(self.device),
            "world_size": self.world_size,
            "batch_per_process": self.train_loader.batch_size,
            "precision": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "float32",
            "pretrained": self.pretrained.to_dict(),
            "loss": self.loss_spec.to_dict(),
            "class_weights": self._class_weights(),
            "parameters": {"encoder": params.encoder, "decoder": params.decoder, "head": params.head},
            "channels": self.channels,
            "normalization": self.normalization.to_dict(),
            "versions": _versions(),
            "command": " ".join(sys.argv),
        }

    def _class_weights(self) -> dict[str, Any] | None:
        """The per-class weights the weighted loss uses, by class name, and how they were derived."""
        weights = self.loss_spec.class_weights
        if weights is None:
            return None
        return {
            "method": self.config.method,
            "rule": self.loss_spec.weight_rule,
            "weights": {name: float(w) for name, w in zip(self.class_names, weights, strict=True)},
        }

    def _open_run_folder(self) -> None:
        """Lock the run folder (one writer at a time), tidy what a killed run left, write its config."""
        from torch.utils.tensorboard import SummaryWriter

        self.lock.acquire()
        prepare_run_folder(self.config)  # again, under the lock: another run may have written meanwhile
        for stale in remove_stale_temp_files(self.folder.root):
            print(f"dli train: removed {stale.name}, left by a write that was killed", file=sys.stderr)
        if not self.config.resume and self.folder.best.exists():
            warnings.warn(
                f"{self.folder.root} holds a {BEST} but no {LAST} (a run killed before its first epoch "
                f"was saved): starting it over, {BEST} removed",
                RuntimeWarning,
                stacklevel=3,
            )
            self.folder.best.unlink()
        write_run_config(self.folder.config, self.config, self.runtime())
        if self.pixel_counts is not None:
            atomic_write_text(
                self.folder.class_pixels, json.dumps(self.pixel_counts.to_dict(), indent=2) + "\n"
            )
        # On resume, events logged after the checkpoint's epoch (by the killed run) are dropped.
        purge = self.progress.epoch + 1 if self.progress.epoch else None
        self.tensorboard = SummaryWriter(str(self.folder.tensorboard), purge_step=purge)

    # -- checkpoints ------------------------------------------------------------------------------

    def _payload(self, *, resumable: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": unwrap(self.model).state_dict(),
            "model_info": self.info.to_dict(),
            "config": portable_paths(self.config.to_dict(), self.folder.root),
            "epoch": self.progress.epoch,
            "metrics": self.progress.history[-1] if self.progress.history else {},
        }
        if resumable:
            payload |= {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": capture_rng_state(),
                "progress": self.progress.to_state(),
                "pretrained": self.pretrained.to_dict(),
                "data": self.data_record,
            }
        return payload

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self, on_epoch_end: EpochCallback | None = None) -> RunResult:
        """Train the remaining epochs, validating every `eval_every` and at the end."""
        config, progress = self.config, self.progress
        assert config.epochs is not None
        if self.writer_rank:
            params = count_parameters(self.model)
            print(
                f"dli train: {config.encoder} ({params.encoder / 1e6:.2f}M encoder), method {config.method}, "
                f"{len(self.datasets.train)} train / {len(self.datasets.val)} val images, "
                f"{config.epochs} epochs x {self.steps_per_epoch} steps on "
                f"{_device_description(self.device)} -> {self.folder.root}",
                file=sys.stderr,
            )
            if self.datasets.groups is not None:
                print(
                    f"dli train: --group-by {config.group_by}: {self.datasets.groups.line()}", file=sys.stderr
                )
        try:
            while progress.epoch < config.epochs and progress.step < self.total_steps:
                if self._out_of_patience():
                    break
                record = self.train_epoch(progress.epoch)
                progress.epoch += 1
                last_epoch = progress.epoch == config.epochs or progress.step >= self.total_steps
                if progress.epoch % config.eval_every == 0 or last_epoch:
                    record |= self.validate_epoch()
                progress.history.append(record)
                if self.writer_rank:
                    self._write_epoch(record)
                if on_epoch_end is not None:
                    on_epoch_end(record)
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
            self.lock.release()
            if self.prediction_grid is not None:
                self.prediction_grid.close()
            self.train_loader.close()  # DALI pipelines hold worker threads and buffers
            if self.val_loader is not None:
                self.val_loader.close()
        return RunResult(
            run_dir=self.folder.root,
            config=config,
            epochs_completed=progress.epoch,
            steps=progress.step,
            skipped_steps=progress.skipped_steps,
            best_epoch=progress.best_epoch,
            best=progress.best,
            last=progress.last,
            history=progress.history,
            pretrained=self.pretrained,
            seconds=time.perf_counter() - self.started,
        )

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training loader; returns the epoch's training record.

        Raises `DliError` once `MAX_SKIPPED_IN_A_ROW` steps in a row were skipped as non-finite
        (read one step late: the loop never waits for the step it has just queued).
        """
        started = time.perf_counter()
        self.train_loader.set_epoch(epoch)
        self.net.train()
        counter = ConfusionCounter(self.class_names, device=self.device)
        monitor = StepMonitor(self.device, self._skipped_in_a_row)
        steps, images = 0, 0
        bar = self._progress_bar(epoch)
        for batch in bar if bar is not None else self.train_loader:
            if self.progress.step >= self.total_steps:
                break
            y = batch.masks.to(self.device, non_blocking=True)
            loss, logits, stepped = train_step(
                self.net,
                self.loss_fn,
                self.optimizer,
                self.scaler,
                batch.images,
                y,
                amp_dtype=self.amp_dtype,
                agree=self._agree if self.world_size > 1 else None,
            )
            previous = monitor.add(loss, stepped)
            if previous is not None:
                self._check_divergence(previous)
            if not self.per_epoch_schedule:
                self.scheduler.step()
            self.progress.step += 1
            steps += 1
            counter.update(logits, y)
            images += len(y)
            if bar is not None:
                last = self.progress.last
                bar.set_postfix(
                    loss="-" if previous is None else f"{previous.mean_loss:.4f}",
                    val_iou="-" if last is None else f"{100 * last.iou:.1f}",
                    img_s=f"{images * self.world_size / max(time.perf_counter() - started, 1e-9):.1f}",
                    refresh=False,
                )
        if bar is not None:
            bar.close()
        totals = monitor.read()
        self._skipped_in_a_row = totals.skipped_in_a_row
        self._check_divergence(totals)
        skipped = steps - totals.finite_steps
        self._check_mostly_skipped(epoch, steps, skipped)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trained at (per-epoch schedule)
        if self.per_epoch_schedule:
            self.scheduler.step()
        self.progress.skipped_steps += skipped
        seconds = time.perf_counter() - started
        return {
            "epoch": epoch + 1,
            "step": self.progress.step,
            "lr": lr,
            "train_loss": _all_mean(totals.loss_sum, totals.finite_steps, self.device),
            "train_iou": counter.compute().iou,
            "skipped_steps": skipped,
            "images_per_s": images * self.world_size / max(seconds, 1e-9),
            "seconds": seconds,
        }

    def _agree(self, stepped: torch.Tensor) -> torch.Tensor:
        """Whether every process may step (all must skip together); on the device, no host sync."""
        bad = all_reduce_sum((~stepped).to(torch.float32))
        return bad == 0

    def _check_divergence(self, totals: StepTotals) -> None:
        """Stop the run once too many steps in a row were skipped (`MAX_SKIPPED_IN_A_ROW`)."""
        if totals.skipped_in_a_row < MAX_SKIPPED_IN_A_ROW:
            return
        kept = "; nothing of them was saved" if self.writer_rank else ""
        raise DliError(
            f"training diverged: {totals.skipped_in_a_row} steps in a row had a non-finite loss or "
            f"gradient and were skipped (epoch {self.progress.epoch + 1}, step {self.progress.step}){kept}. "
            f"Lower --lr ({self.config.lr:g}) or check the data"
        )

    def _check_mostly_skipped(self, epoch: int, steps: int, skipped: int) -> None:
        """Stop a run none of whose steps was finite, or whose last epoch skipped most of its steps.

        A short run never reaches `MAX_SKIPPED_IN_A_ROW`, yet what it would save is no model. Read
        from the epoch's totals, which the epoch end reads anyway (no sync in the step loop).
        """
        never_finite = self.progress.step > 0 and self.progress.skipped_steps + skipped >= self.progress.step
        last_epoch = epoch + 1 >= self.config.epochs or self.progress.step >= self.total_steps
        if never_finite:
            what = f"none of its {self.progress.step} steps had a finite loss and gradient (all skipped)"
        elif last_epoch and 2 * skipped > steps:
            what = (
                f"{skipped} of the {steps} steps of its last epoch had a non-finite loss or gradient "
                "and were skipped"
            )
        else:
            return
        kept = "; that epoch was not saved" if self.writer_rank else ""
        raise DliError(
            f"training diverged: {what} (epoch {epoch + 1}){kept}. "
            f"Lower --lr ({self.config.lr:g}) or check the data"
        )

    def validate_epoch(self) -> dict[str, Any]:
        """Score the model on the validation set; keeps `best.pt` when the IoU improves.

        The same pass calibrates the per-class thresholds that `best.pt` stores with its weights.
        """
        calibrator = ThresholdCalibrator(self.class_names, device=self.device)
        evaluation = evaluate_model(
            *self._validation_model_and_batches(),
            self.class_names,
            device=self.device,
            amp_dtype=self.amp_dtype,
            loss_fn=self.eval_loss_fn,
            observers=[calibrator],
        )
        scores, progress = evaluation.scores, self.progress
        progress.last = scores
        record = {"val_loss": evaluation.loss, **scores.to_dict()}
        if evaluation.by_image_class is not None:
            grouped = zip(self.class_names, evaluation.by_image_class.class_iou, strict=True)
            record |= {f"{IOU_BY_IMAGE_CLASS}/{name}": value for name, value in grouped}
        if progress.improves(scores):
            progress.best, progress.best_epoch = scores, progress.epoch
            progress.evaluations_since_best = 0
            calibration = self._calibration(calibrator)  # every rank: the histograms are summed across them
            if self.writer_rank:
                payload = self._payload(resumable=False) | {"metrics": record} | calibration
                save_checkpoint(self.folder.best, payload)
        else:
            progress.evaluations_since_best += 1
        return record

    def _validation_model_and_batches(self) -> tuple[nn.Module, Any]:
        """The model and batches validation runs: the loader's, or whole native images by tiles."""
        if self.val_loader is not None:
            return self.eval_net, self.val_loader
        from dli.pipeline.native import native_batches

        assert self.tiling is not None
        tiled = TiledModel(self.eval_net, self.tiling, batch=self.config.batch_size or 8)
        val = self.datasets.val  # each process scores its share; counts are summed across them
        share = val.subset(range(self.rank, len(val), self.world_size))
        return tiled, native_batches(share, self.info.mean, self.info.std, channels=self.channels)

    def _calibration(self, calibrator: ThresholdCalibrator) -> dict[str, Any]:
        """Checkpoint entries: the calibrated thresholds and the validation scores at them."""
        curves = calibrator.curves(all_reduce_sum)
        source = f"validation set, {len(self.datasets.val)} images"
        thresholds = choose_thresholds(curves, min_recall=self.config.min_recall, source=source)
        scores = SegmentationScores(self.class_names, *curves.counts_at(thresholds.values))
        return {THRESHOLDS_KEY: thresholds.to_state(), CALIBRATED_SCORES_KEY: scores.to_state()}

    def _write_epoch(self, record: Mapping[str, Any]) -> None:
        # The checkpoint first: metrics files never list an epoch that `last.pt` lacks, so a run
        # killed between the two writes resumes from what its metrics say (and rewrites them).
        save_checkpoint(self.folder.last, self._payload(resumable=True))
        self.folder.write_history(self.progress.history, self.class_names)
        if "iou" in record and self.progress.best_epoch == record["epoch"]:
            self._write_figures()
        _log_tensorboard(self.tensorboard, record)
        _print_epoch(record, self.config.epochs or 0)
        if self._out_of_patience():
            print(
                f"stopping: no better validation IoU in {self.config.patience} evaluations "
                f"(best at epoch {self.progress.best_epoch})",
                file=sys.stderr,
            )

    def _out_of_patience(self) -> bool:
        patience = self.config.patience
        return patience is not None and self.progress.evaluations_since_best >= patience

    def _write_figures(self) -> None:
        """Redraw `curves.png` and `val_predictions.png` (the best model's predictions; rank 0)."""
        title = f"{self.folder.root.name}  \u00b7  best epoch {self.progress.best_epoch}"
        write_curves(self.folder.curves, self.progress.history, self.class_names, title=title)
        if self.prediction_grid is None:
            assert self.config.image_size is not None
            self.prediction_grid = PredictionGrid(
                self.datasets.val,
                image_size=self.config.image_size,
                device=self.device,
                amp_dtype=self.amp_dtype,
                native=(self.info.mean, self.info.std) if self.tiling is not None else None,
                channels=self.channels,
                mean=self.normalization.mean,
                std=self.normalization.std,
                resize=str(self.config.resize),
                fit=self.info.aspect == "fit",
            )
        model = self.model if self.tiling is None else TiledModel(self.model, self.tiling)
        self.prediction_grid.write(model, self.folder.predictions, title=f"validation, {title}")

    def _progress_bar(self, epoch: int) -> Any:
        """A tqdm bar over the training loader, or None when quiet, not rank 0 or not on a terminal."""
        if not (self.writer_rank and self.config.progress and on_terminal()):
            return None
        return progress_bar(
            self.train_loader,
            total=len(self.train_loader),
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            unit="batch",
            leave=False,
        )


def train(
    config: TrainConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    local_rank: int | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> RunResult:
    """Train as `config` says and return the best and last validation scores.

    `rank`/`world_size` shard the data across the processes of an initialised process group
    (only rank 0 writes); `local_rank` (default `rank`) picks this process's GPU.
    `on_epoch_end(record)` runs after each epoch's files are written (record = its
    `metrics.jsonl` line); an exception from it stops the run as a kill would.
    """
    trainer = Trainer(config, rank=rank, world_size=world_size, local_rank=local_rank)
    return trainer.fit(on_epoch_end)


def check_last_batch(last_batch: str | None, world_size: int) -> None:
    """Several processes must drop the last incomplete batch (a ragged one could leave a process
    without a batch while the others wait for its gradients)."""
    if world_size > 1 and last_batch == "keep":
        raise DliError(
            f"--last-batch keep: training in {world_size} processes drops the last incomplete batch; "
            "pass --last-batch drop"
        )


def check_batch_split(batch_size: int, world_size: int) -> int:
    """Images per process of a global batch; `DliError` when the processes cannot share it evenly."""
    if batch_size % world_size:
        raise DliError(
            f"--batch-size {batch_size}: the global batch must be a multiple of the {world_size} processes"
        )
    return batch_size // world_size


def _rank0_value(value: str) -> str:
    """Rank 0's `value`, on every process (e.g. the default run folder, named after the time)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_mean(total: float, count: int, device: torch.device) -> float:
    values = all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64, device=device)).tolist()
    return values[0] / values[1] if values[1] else math.nan


def _print_epoch(record: Mapping[str, Any], epochs: int) -> None:
    line = f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f}"
    line += f", train IoU {100 * record['train_iou']:.2f}%"
    if "iou" in record:
        line += f", val IoU {100 * record['iou']:.2f}%, val F1 {100 * record['f1']:.2f}%"
    line += f", {record['images_per_s']:.1f} img/s"
    if record["skipped_steps"]:
        line += f", {record['skipped_steps']} non-finite steps skipped"
    print(line, file=sys.stderr)


def _log_tensorboard(writer: Any, record: Mapping[str, Any]) -> None:
    if writer is None:
        return
    epoch = record["epoch"]
    names = {
        "train_loss": "train/loss",
        "train_iou": "train/iou",
        "lr": "train/lr",
        "images_per_s": "train/images_per_s",
    }
    names |= {"val_loss": "val/loss", "iou": "val/iou", "f1": "val/f1"}
    for key, value in record.items():
        tag = names.get(key) or (f"val/{key}" if "/" in key else None)
        if tag is not None and isinstance(value, (int, float)) and not math.isnan(value):
            writer.add_scalar(tag, value, epoch)
    writer.flush()
