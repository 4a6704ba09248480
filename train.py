"""`dli train`: train a UNet with BCE + Dice (or a rebalancing loss) on DALI batches, optionally with DLI.

The loop is `train(config) -> RunResult`, callable from other code (experiment grids,
multi-GPU launchers). Mixed precision is bf16 where the GPU supports it, fp16 with loss scaling
otherwise, fp32 on CPU or with `--no-amp`; activations are channels-last. `--protocol`
(`dli.config.PROTOCOL_DEFAULTS`) chooses the loss terms, decoder depth, resizing, Poisson
label, schedule (cosine per step or per epoch), last-batch policy and precision as a whole,
each overridable by its own flag; a run resumes only under the protocol it started with. A
step whose loss or gradients are not finite is skipped on the device (no update of weights,
optimizer state or BatchNorm statistics) and counted; after `MAX_SKIPPED_IN_A_ROW` such steps
in a row the run stops as diverged (`DliError`, exit status 2). A checkpoint whose weights are
not finite is never written.

A run folder holds `config.yaml` (resolved config + runtime facts), `metrics.csv` and
`metrics.jsonl` (one record per epoch, rewritten atomically), TensorBoard events in `tb/`,
`best.pt` (highest validation IoU) and `last.pt` (everything needed to resume: model,
optimizer, scheduler, scaler, RNG states, epoch, history), and two pictures (`dli.figures`),
`curves.png` and `val_predictions.png`, redrawn at every epoch that improves the best IoU.
`--patience N` ends a run after N evaluations without a better IoU. `--resume` continues a
killed run from `last.pt`; the loader's shuffling and injection plans depend only on (seed,
epoch), so the resumed run sees the same batches as an uninterrupted one.

Several GPUs (`dli train --devices K`, or `torchrun --nproc_per_node=K -m dli.train`; see
`dli.distributed`): K processes train one model with `DistributedDataParallel`. `--batch-size`
stays the global batch: each process decodes, plans its part of and injects batch_size / K
images, and the K parts of a step are exactly the batch one process would see (see
`dli.pipeline.loader`), so a run's data does not depend on K. Gradients are averaged across
processes, validation counts summed, and only rank 0 writes files and prints. BatchNorm
statistics stay per process, as usual with DDP.

Run as `dli train`, `python -m dli.train` or `python train.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dli.atomic import atomic_write_text, remove_stale_temp_files
from dli.checkpoint import (
    ModelInfo,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unwrap,
)
from dli.config import (
    DEFAULT_PROTOCOL,
    FILLS,
    METHODS,
    PAPER_SCHEDULE,
    PROTOCOL_CHOICES,
    PROTOCOL_DEFAULTS,
    PROTOCOLS,
    QUICK_SCHEDULE,
    SPLIT_CSV_NAMES,
    SPLITS,
    TrainConfig,
    flag,
    portable_paths,
    read_run_config,
    resolved_paths,
    write_run_config,
)
from dli.errors import DliError
from dli.figures import CURVES_FILE, PREDICTIONS_FILE, PredictionGrid, write_curves
from dli.lock import FolderLock
from dli.models.losses import (
    ClassPixelCounts,
    LossOptions,
    build_loss,
    count_class_pixels,
    count_stored_defect_pixels,
    needs_pixel_counts,
)
from dli.models.metrics import ConfusionCounter, SegmentationScores, all_reduce_sum, evaluate_model
from dli.models.thresholds import CHECKPOINT_KEY as THRESHOLDS_KEY
from dli.models.thresholds import ThresholdCalibrator, Thresholds, choose_thresholds
from dli.models.unet import ENCODERS, PretrainedStatus, build_model, count_parameters
from dli.pipeline.manifest import FREE, Manifest, Sample

if TYPE_CHECKING:
    from dli.distributed import ProcessPlace

CONFIG_FILE = "config.yaml"
METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
CLASS_PIXELS_FILE = "class_pixels.json"
TENSORBOARD_DIR = "tb"
BEST = "best.pt"
CALIBRATED_SCORES_KEY = "calibrated_scores"
"""`best.pt`'s validation counts at its calibrated thresholds (`SegmentationScores.to_state`)."""
LAST = "last.pt"

IOU_BY_IMAGE_CLASS = "iou_by_image_class"
"""Prefix of the validation record's per-class IoU grouped by each image's true class (the
reference implementation's per-class figure; see `dli.models.metrics.ImageClassCounter`)."""

RUNTIME_FIELDS = frozenset(
    {"out", "resume", "device", "compile", "num_threads", "progress", "eval_every", "patience"}
)
"""Config fields a resumed run may change: they do not affect the weights it computes."""


# ---------------------------------------------------------------------------------------------
# Data.


@dataclass(frozen=True)
class Datasets:
    """The training and validation manifests of a run, checked and ready for the loaders.

    Attributes:
        data_path: the dataset actually used (the bundled synthetic one when `--data` is unset).
        mask_fractions: defect-pixel fraction of each validated sample (from `validate`), so
            class pixel counts need not read the masks again.
        mask_boxes: each validated sample's defect bounding box as fractions of its size (from
            `validate`), so injection can size its Poisson windows on the host.
    """

    train: Manifest
    val: Manifest
    data_path: Path
    mask_fractions: Mapping[Sample, float] = field(default_factory=dict)
    mask_boxes: Mapping[Sample, tuple[float, ...]] = field(default_factory=dict)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names

    def donors(self) -> list[int]:
        """Training indices DLI may take defects from: defect images whose mask is not empty."""
        return [
            i
            for i, s in enumerate(self.train.samples)
            if s.class_id != FREE and self.mask_fractions.get(s, 1.0) > 0
        ]

    def source_boxes(self) -> np.ndarray:
        """(len(train), 4) defect boxes of the training samples (NaN rows where not measured)."""
        unknown = (float("nan"),) * 4
        return np.array([self.mask_boxes.get(s, unknown) for s in self.train.samples], dtype=np.float64)


def load_datasets(
    data: str | None,
    split: str,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    split_free: bool = False,
    data_fraction: float = 1.0,
) -> Datasets:
    """Read, validate and split a dataset as `dli train` does (bad files: one `DliError` listing them).

    `split` is ``stratified`` (seeded, per class), ``reference`` (the published split CSVs under
    the dataset root) or a folder holding `SPLIT_CSV_NAMES`. `data_fraction` < 1 then keeps that
    share of every training class.
    """
    from dli.pipeline.manifest import read_dataset, validate
    from dli.pipeline.splits import apply_fraction, reference_split, stratified_split

    if data is None:
        from dli.pipeline.synth import default_dataset

        data_path = default_dataset()
    else:
        data_path = Path(data).absolute()
    if split == "stratified":
        manifest = read_dataset(data_path)
        report = validate(manifest)
        train, val = stratified_split(manifest, val_fraction=val_fraction, seed=seed, split_free=split_free)
    else:
        if split == "reference":
            train, val = reference_split(data_path)
        else:
            train, val = _read_split_folder(Path(split))
        if train.class_names != val.class_names:
            raise DliError(
                f"split {split}: train classes {train.class_names} differ from val {val.class_names}"
            )
        manifest = Manifest(train.samples + val.samples, train.class_names, train.root)
        report = validate(manifest)
    fractions = dict(zip(manifest.samples, report.mask_fractions.tolist(), strict=True))
    boxes = dict(zip(manifest.samples, map(tuple, report.mask_boxes.tolist()), strict=True))
    if data_fraction < 1.0:
        train = apply_fraction(train, data_fraction, seed=seed)
    if len(train) == 0 or len(val) == 0:
        raise DliError(
            f"split {split} of {data_path} leaves {len(train)} training and {len(val)} validation images"
        )
    return Datasets(train, val, data_path, fractions, boxes)


def datasets_of(config: TrainConfig) -> Datasets:
    """`load_datasets` with the settings of a run's config."""
    return load_datasets(
        config.data,
        config.split,
        val_fraction=config.val_fraction,
        seed=config.seed,
        split_free=config.split_free,
        data_fraction=config.data_fraction,
    )


def _read_split_folder(folder: Path) -> tuple[Manifest, Manifest]:
    from dli.pipeline.manifest import read_dataset

    for train_name, val_name in SPLIT_CSV_NAMES:
        if (folder / train_name).is_file() and (folder / val_name).is_file():
            return read_dataset(folder / train_name), read_dataset(folder / val_name)
    expected = " or ".join(f"{t} + {v}" for t, v in SPLIT_CSV_NAMES)
    raise DliError(f"split folder {folder} lacks its CSV files ({expected})")


def class_pixel_counts(datasets: Datasets, image_size: int) -> ClassPixelCounts:
    """Defect pixels per class of the training set (see `dli.models.losses.count_class_pixels`)."""
    return count_class_pixels(datasets.train, image_size, fractions=datasets.mask_fractions)


def manifest_entries(manifest: Manifest) -> dict[str, str]:
    """What identifies each sample of `manifest`: its image path relative to the dataset root ->
    its class and the sizes in bytes of its image and mask (a replaced file changes them)."""

    def size(path: Path | None) -> int:
        try:
            return path.stat().st_size if path is not None else 0
        except OSError:
            return -1

    return {
        manifest.sort_key(s): f"{manifest.class_name(s.class_id)}|{size(s.image)}|{size(s.mask)}"
        for s in manifest.samples
    }


def data_record(datasets: Datasets) -> dict[str, Any]:
    """The training and validation sets as a run records them (checked on `--resume`)."""
    return {"train": manifest_entries(datasets.train), "val": manifest_entries(datasets.val)}


def check_same_data(now: Mapping[str, Any], saved: Mapping[str, Any] | None, path: Path) -> None:
    """Refuse to resume when the dataset (`data_record`) changed since the run started; names the changes."""
    if not saved:
        return  # written before data records
    changes = []
    for part in ("train", "val"):
        before, after = dict(saved.get(part) or {}), now[part]
        for what, names in (
            ("added", sorted(after.keys() - before.keys())),
            ("removed", sorted(before.keys() - after.keys())),
            ("changed", sorted(k for k in after.keys() & before.keys() if after[k] != before[k])),
        ):
            if names:
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                changes.append(f"{part}: {len(names)} {what} ({shown})")
    if changes:
        raise DliError(
            f"cannot resume {path}: the dataset changed since the run started: {'; '.join(changes)}"
        )


# ---------------------------------------------------------------------------------------------
# Device and precision.


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """`auto` -> `cuda:<rank>` when a GPU is present, else `cpu`; `DliError` for an absent GPU."""
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
# The run folder.


@dataclass(frozen=True)
class RunFolder:
    """Paths of a run's files."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def best(self) -> Path:
        return self.root / BEST

    @property
    def last(self) -> Path:
        return self.root / LAST

    @property
    def class_pixels(self) -> Path:
        return self.root / CLASS_PIXELS_FILE

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def curves(self) -> Path:
        return self.root / CURVES_FILE

    @property
    def predictions(self) -> Path:
        return self.root / PREDICTIONS_FILE

    def write_history(self, history: list[dict[str, Any]], class_names: tuple[str, ...]) -> None:
        """Rewrite `metrics.csv` and `metrics.jsonl` from the whole history (atomic)."""
        columns = metric_columns(class_names)
        extra = sorted({k for record in history for k in record} - set(columns))
        columns += extra
        lines = [",".join(columns)]
        for record in history:
            lines.append(",".join(_csv_value(record.get(c)) for c in columns))
        atomic_write_text(self.root / METRICS_CSV, "\n".join(lines) + "\n")
        atomic_write_text(
            self.root / METRICS_JSONL,
            "".join(json.dumps(_json_safe(r), sort_keys=False) + "\n" for r in history),
        )


def metric_columns(class_names: tuple[str, ...]) -> list[str]:
    """Columns of `metrics.csv`, in order."""
    columns = ["epoch", "step", "lr", "train_loss", "train_iou", "skipped_steps", "images_per_s", "seconds"]
    columns += ["val_loss", "iou", "f1"]
    columns += [f"iou/{n}" for n in class_names] + [f"f1/{n}" for n in class_names]
    return columns


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _json_safe(record: Mapping[str, Any]) -> dict[str, Any]:
    """NaN becomes null: JSON has no NaN."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}


def default_run_name(config: TrainConfig) -> str:
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{config.encoder}-{config.method}"


def prepare_run_folder(config: TrainConfig) -> RunFolder:
    """The run folder: new for a fresh run (refusing to overwrite one), existing for `--resume`.

    A folder without `last.pt` holds no epoch to resume (a run killed before its first save, with
    at most a `best.pt`): a fresh run starts it over.
    """
    root = Path(config.out) if config.out else Path("runs") / default_run_name(config)
    folder = RunFolder(root.absolute())
    if folder.root.exists() and not folder.root.is_dir():
        raise DliError(f"--out {root}: exists and is not a folder")
    if config.resume:
        if not folder.last.is_file():
            hint = "; it stopped before its first epoch was saved: run it again without --resume"
            raise DliError(
                f"--resume: no {LAST} in {folder.root} to resume from{hint if folder.best.exists() else ''}"
            )
    elif folder.last.exists():
        raise DliError(
            f"--out {root}: already holds a run; pass --resume to continue it or choose another folder"
        )
    return folder


def check_resumable(config: TrainConfig, saved: Mapping[str, Any], path: Path) -> None:
    """Refuse to resume with settings that would change the computation (flag and values named).

    A config saved before a setting existed takes that setting's default (protocol ``dli``).
    """
    saved_config = TrainConfig.from_dict(dict(saved)).resolved()
    changed = [
        f"{flag(name)} {getattr(config, name)} (run has {getattr(saved_config, name)})"
        for name in TrainConfig.__dataclass_fields__
        if name not in RUNTIME_FIELDS and getattr(config, name) != getattr(saved_config, name)
    ]
    if changed:
        raise DliError(f"cannot resume {path} with changed settings: {'; '.join(changed)}")


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
                poisson_prob=config.poisson_prob, fill=config.fill, poisson_label=str(config.poisson_label)
            )
            if config.method == "dli"
            else None
        )
        common = {
            "batch_size": local_batch,
            "image_size": config.image_size,
            "seed": config.seed,
            "device": self.device,  # cuda:N as resolved: the data path runs beside the model
            "shard_id": rank,
            "num_shards": world_size,
            "num_threads": config.num_threads,
            "resize": str(config.resize),
        }
        self.train_loader = build_loader(
            self.datasets.train,
            train=True,
            dli=injection,
            donors=self.datasets.donors(),
            source_boxes=self.datasets.source_boxes(),
            drop_last=config.last_batch == "drop",
            **common,
        )
        self.val_loader = build_loader(self.datasets.val, train=False, **common)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)

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
            "normalization": {"mean": list(self.info.mean), "std": list(self.info.std)},
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

    def validate_epoch(self) -> dict[str, Any]:
        """Score the model on the validation set; keeps `best.pt` when the IoU improves.

        The same pass calibrates the per-class thresholds that `best.pt` stores with its weights.
        """
        calibrator = ThresholdCalibrator(self.class_names, device=self.device)
        evaluation = evaluate_model(
            self.eval_net,
            self.val_loader,
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
            )
        self.prediction_grid.write(self.model, self.folder.predictions, title=f"validation, {title}")

    def _progress_bar(self, epoch: int) -> Any:
        """A tqdm bar over the training loader, or None when quiet or not rank 0."""
        if not (self.writer_rank and self.config.progress):
            return None
        from tqdm import tqdm

        return tqdm(
            self.train_loader,
            total=len(self.train_loader),
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
        )


MAX_SKIPPED_IN_A_ROW = 10
"""Steps in a row skipped as non-finite after which a run stops as diverged (`DliError`)."""


@dataclass(frozen=True)
class StepTotals:
    """An epoch's step sums as read on the host: loss over the finite steps, their count, the skip streak."""

    loss_sum: float
    finite_steps: int
    skipped_in_a_row: int

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.finite_steps if self.finite_steps else math.nan


class StepMonitor:
    """An epoch's loss sum, finite-step count and skip streak, kept on the device, read one step late.

    `add` records a step without waiting for it and returns the totals up to the step before,
    whose host copy (pinned, non-blocking) it waits for: on a GPU the step just queued keeps
    running meanwhile, so the loop never stalls the device. `read` waits for everything.
    """

    def __init__(self, device: torch.device, skipped_in_a_row: int = 0) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.finite_steps = torch.zeros((), dtype=torch.float64, device=device)
        self.streak = torch.full((), float(skipped_in_a_row), dtype=torch.float64, device=device)
        cuda = device.type == "cuda"
        self._host = torch.zeros(3, dtype=torch.float64, pin_memory=cuda)
        self._copied: Any = torch.cuda.Event() if cuda else None
        self._pending = False

    def add(self, loss: torch.Tensor, stepped: torch.Tensor) -> StepTotals | None:
        """Record one step (`train_step`'s loss and decision); the totals before it, if any."""
        previous = self._host_totals() if self._pending else None
        self.loss_sum += torch.where(stepped, loss.to(torch.float64), 0.0)
        self.finite_steps += stepped
        self.streak = torch.where(stepped, 0.0, self.streak + 1)
        self._host.copy_(torch.stack([self.loss_sum, self.finite_steps, self.streak]), non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self._pending = True
        return previous

    def read(self) -> StepTotals:
        """The totals of every step added (waits for them)."""
        if not self._pending:
            return StepTotals(0.0, 0, int(self.streak.item()))
        return self._host_totals()

    def _host_totals(self) -> StepTotals:
        if self._copied is not None:
            self._copied.synchronize()
        loss_sum, finite_steps, streak = self._host.tolist()
        return StepTotals(loss_sum, int(finite_steps), int(streak))


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The AdamW of `dli train`, fused: it can skip a step on the device (see `train_step`)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def train_step(
    net: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    amp_dtype: torch.dtype | None,
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step as `dli train` takes it: (loss, detached logits, whether it stepped).

    Channels-last inputs, the forward pass under autocast (`amp_dtype`; None = fp32), the loss
    in fp32. All three results stay on the device: the step has no host sync. A step whose loss
    (or, without a loss scaler, any gradient) is not finite changes nothing: the fused AdamW of
    `make_optimizer` skips it on the device (`found_inf`; with fp16 the `GradScaler` does the
    same from the gradients), and the BatchNorm statistics its forward pass updated are put
    back. `agree(stepped)` (multi-process runs) combines the decision of every process, so all
    skip together. `masks` must already be on the model's device.
    """
    device = masks.device
    buffers = list(unwrap(net).buffers())
    before = [b.clone() for b in buffers]
    x = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = net(x)
    loss = loss_fn(logits, masks)
    stepped = torch.isfinite(loss.detach())
    scaler.scale(loss).backward()
    if not scaler.is_enabled():
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            stepped &= torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf))
    if agree is not None:
        stepped = agree(stepped)
    if scaler.is_enabled():
        scaler.step(optimizer)  # fp16: skips non-finite gradients on the device (fused AdamW)
        scaler.update()
    else:
        optimizer.found_inf = (~stepped).float()  # type: ignore[attr-defined]  # read by fused AdamW
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    optimizer.zero_grad(set_to_none=True)
    for buffer, old in zip(buffers, before, strict=True):
        buffer.copy_(torch.where(stepped, buffer, old))
    return loss.detach(), logits.detach(), stepped


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


# ---------------------------------------------------------------------------------------------
# Command line.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `dli train` flags (one per `TrainConfig` field)."""
    d = TrainConfig()
    quick, paper = QUICK_SCHEDULE, PAPER_SCHEDULE
    parser.description = (
        "Train a UNet for defect segmentation. Without --data: a short run on bundled synthetic data "
        f"({quick.epochs} epochs, batch {quick.batch_size}, {quick.image_size} px, lr {quick.lr:g}; about "
        f"two minutes on a 2-core CPU). With --data: the paper's schedule ({paper.epochs} epochs, batch "
        f"{paper.batch_size}, {paper.image_size} px, lr {paper.lr:g}) unless --epochs/--batch-size/"
        "--image-size/--lr say otherwise."
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", default=d.data, help="dataset folder or CSV; unset: the bundled synthetic data"
    )
    data.add_argument(
        "--split",
        default=d.split,
        metavar="|".join(SPLITS) + "|DIR",
        help="train/val split: seeded per-class split, the published reference split, or a folder of "
        "train_data.csv + val_data.csv",
    )
    data.add_argument(
        "--val-fraction", type=float, default=d.val_fraction, help="share of each class for validation"
    )
    data.add_argument(
        "--split-free",
        action=argparse.BooleanOptionalAction,
        default=d.split_free,
        help="also split defect-free images (otherwise all train, as in the reference split)",
    )
    data.add_argument(
        "--data-fraction",
        type=float,
        default=d.data_fraction,
        help="share of training images kept (0 < f <= 1)",
    )
    data.add_argument(
        "--image-size",
        type=int,
        default=d.image_size,
        help=f"square training size; unset: {quick.image_size} without --data, {paper.image_size} with it",
    )
    data.add_argument("--num-threads", type=int, default=d.num_threads, help="DALI worker threads")

    method = parser.add_argument_group("method")
    method.add_argument(
        "--method",
        choices=METHODS,
        default=d.method,
        help="loss / rebalancing method (dli = BCE+Dice with DLI)",
    )
    method.add_argument(
        "--poisson-prob",
        type=float,
        default=d.poisson_prob,
        help="DLI: probability of Poisson blending per injection (0 = cut-paste only, 1 = Poisson only)",
    )
    method.add_argument(
        "--fill", choices=FILLS, default=d.fill, help="DLI: which defect-free images receive a defect"
    )

    protocol = parser.add_argument_group(
        "protocol",
        "--protocol sets the defaults of the settings below: dli (this project's choices) or reference "
        "(as the paper's reference implementation computed them); each setting given overrides it",
    )
    protocol.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=None,
        help=f"training protocol (default {DEFAULT_PROTOCOL}); recorded, a run resumes only under its own",
    )
    protocol_help = {
        "wce_weights": "wce: pos_weight = negative/positive pixels (capped), or the reference's per-class "
        "weights (1 - pixel share) / (C - 1) on per-class mean BCE",
        "balanced_counts": "balanced: effective number of the positive training pixels, or of the "
        "pixel-share weight list taken as counts (reference)",
        "focal": "focal: per-pixel focal loss, or the focal modulation of each class's mean BCE (reference)",
        "dice": "soft Dice per class (mean over classes present), or one Dice over all classes and pixels",
        "decoder_convs": "conv-BN-ReLU layers per UNet decoder block (smp: 2, reference: 4)",
        "poisson_label": "DLI: label of a Poisson injection, the source mask or the dilated blending domain",
        "resize": "image resizing: antialiased linear or nearest neighbour (masks: always nearest)",
        "lr_schedule": "cosine annealing of the learning rate stepped per step or per epoch",
        "last_batch": "the last incomplete training batch of each epoch: drop or keep",
    }
    for name, help_ in protocol_help.items():
        choices = PROTOCOL_CHOICES[name]
        kind = int if isinstance(choices[0], int) else str
        defaults = "/".join(f"{p}: {PROTOCOL_DEFAULTS[p][name]}" for p in PROTOCOLS)
        protocol.add_argument(
            flag(name), type=kind, choices=choices, default=None, help=f"{help_} (default {defaults})"
        )

    model = parser.add_argument_group("model and optimisation")
    model.add_argument("--encoder", default=d.encoder, help=f"one of {', '.join(ENCODERS)}")
    model.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=d.pretrained,
        help="start from ImageNet weights (falls back to random init, with a warning, when offline)",
    )
    model.add_argument(
        "--epochs",
        type=int,
        default=d.epochs,
        help=f"training epochs; unset: {quick.epochs} without --data, {paper.epochs} with it",
    )
    model.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"images per batch; unset: {quick.batch_size} without --data, {paper.batch_size} with it",
    )
    model.add_argument(
        "--lr",
        type=float,
        default=d.lr,
        help=f"AdamW learning rate, cosine-annealed to 0 (see --lr-schedule); unset: {quick.lr:g} without "
        f"--data, {paper.lr:g} with it",
    )
    model.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    model.add_argument(
        "--seed", type=int, default=d.seed, help="seed of the split, shuffling, injection and init"
    )
    model.add_argument(
        "--max-steps",
        type=int,
        default=d.max_steps,
        help="stop after this many steps in all (smoke tests); unset: no limit",
    )
    model.add_argument(
        "--min-recall",
        type=float,
        default=d.min_recall,
        metavar="R",
        help="calibrate best.pt's per-class thresholds for the best F1 at pixel recall >= R; unset: best F1",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--out", default=d.out, help="run folder; unset: runs/<time>-<encoder>-<method>")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    run.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="validate every k epochs (and at the end)"
    )
    run.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="stop after this many evaluations without a better validation IoU; unset: never",
    )
    run.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    run.add_argument(
        "--devices",
        type=int,
        default=1,
        help="processes (one per GPU, or CPU processes with --device cpu) training one model with "
        "DistributedDataParallel; --batch-size is split among them",
    )
    run.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=d.amp,
        help="mixed precision on GPU (bf16 or fp16); default: on under --protocol dli, fp32 under reference",
    )
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=d.progress, help="show a progress bar"
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` of parsed flags; with `--resume`, the run's saved config updated by given flags."""
    given = TrainConfig(**{name: getattr(args, name) for name in TrainConfig.__dataclass_fields__})
    if not given.resume:
        return given
    if given.out is None:
        raise DliError("--resume needs --out RUN (the run folder to continue)")
    saved, _ = read_run_config(Path(given.out) / CONFIG_FILE)
    saved_protocol = saved.protocol or DEFAULT_PROTOCOL
    if given.protocol is not None and given.protocol != saved_protocol:
        raise DliError(
            f"--protocol {given.protocol}: cannot resume {given.out}, "
            f"trained under --protocol {saved_protocol}"
        )
    return replace(saved, **given.explicit())


def _one_line_warnings(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    print(f"dli train: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """`dli train`: train, then print the best epoch's per-class table.

    With `--devices K` (K > 1) this process only checks the inputs and launches K training
    processes; under torchrun (or in one of those) it trains as its rank.
    """
    from dli.distributed import ProcessPlace

    config = config_from_args(args)
    place = ProcessPlace.from_env()
    if place is None or place.world_size == 1:
        if args.devices != 1:
            return launch_processes(config, args.devices)
        return _train_and_report(config)
    if args.devices not in (1, place.world_size):
        raise DliError(f"--devices {args.devices}: this launch has {place.world_size} processes")
    return _train_as(place, config)


def launch_processes(config: TrainConfig, devices: int) -> int:
    """Check `config` and the data once here, then train in `devices` processes (`dli.distributed`)."""
    from dli.distributed import launch

    if devices < 1:
        raise DliError(f"--devices {devices}: must be an integer >= 1")
    checked = config.validate().resolved()
    assert checked.batch_size is not None
    check_batch_split(checked.batch_size, devices)
    check_last_batch(checked.last_batch, devices)
    device = resolve_device(checked.device)
    if device.type == "cuda":
        if checked.device.startswith("cuda:"):
            raise DliError(f"--device {checked.device}: --devices K uses GPUs 0..K-1; pass --device cuda")
        if devices > torch.cuda.device_count():
            raise DliError(f"--devices {devices}: only {torch.cuda.device_count()} CUDA device(s)")
    prepare_run_folder(checked)  # an existing run (or, with --resume, a missing one): one error, here
    datasets_of(checked)  # bad data: one error here, not one per process
    if checked.out is None:
        checked = replace(checked, out=str(Path("runs") / default_run_name(checked)))
    command = [sys.executable, "-m", "dli.train", *checked.to_argv()]
    return launch(command, devices, cpu=device.type == "cpu")


def _train_as(place: ProcessPlace, config: TrainConfig) -> int:
    """Train as one process of a multi-process run (rank 0 reports; the others stay quiet)."""
    from dli.distributed import destroy_process_group, init_process_group

    device = resolve_device(config.validate().device, place.local_rank)
    init_process_group(place, device.type)
    try:
        if place.rank != 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rank 0 already says it
                train(config, rank=place.rank, world_size=place.world_size, local_rank=place.local_rank)
            return 0
        return _train_and_report(config, rank=0, world_size=place.world_size, local_rank=place.local_rank)
    finally:
        destroy_process_group()


def _train_and_report(config: TrainConfig, **placement: Any) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings  # a CLI user needs the message, not our source line
        result = train(config, **placement)
    print(f"run folder: {result.run_dir}")
    pictures = [p for p in (result.run_dir / CURVES_FILE, result.run_dir / PREDICTIONS_FILE) if p.is_file()]
    if pictures:
        print(f"pictures: {', '.join(str(p) for p in pictures)}")
    if result.skipped_steps:
        print(f"{result.skipped_steps} steps skipped for a non-finite loss")
    if result.best is None:
        print("no validation IoU was defined (no defect in the validation set was present or predicted)")
        return 0
    print(
        f"best epoch {result.best_epoch} of {result.epochs_completed} (checkpoint {result.run_dir / BEST}):"
    )
    print(result.best.table())
    best = load_checkpoint(result.run_dir / BEST)
    if THRESHOLDS_KEY in best:
        thresholds = Thresholds.from_state(best[THRESHOLDS_KEY])
        calibrated = SegmentationScores.from_state(best[CALIBRATED_SCORES_KEY])
        print(f"calibrated thresholds ({thresholds.rule}, {thresholds.source}): {thresholds.describe()}")
        print(
            f"validation IoU {100 * result.best.iou:.2f}% / F1 {100 * result.best.f1:.2f}% at 0.5, "
            f"{100 * calibrated.iou:.2f}% / {100 * calibrated.f1:.2f}% at the calibrated thresholds"
        )
    return 0


if __name__ == "__main__":
    from dli.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
