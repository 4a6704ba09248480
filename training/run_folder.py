"""A run folder: the names of its files and how they are written.

A run folder holds `config.yaml` (resolved config + runtime facts), `metrics.csv` and
`metrics.jsonl` (one record per epoch, rewritten atomically), TensorBoard events in `tb/`,
`best.pt` (highest validation IoU) and `last.pt` (everything needed to resume: model,
optimizer, scheduler, scaler, RNG states, epoch, history), and two pictures (`dli.training.figures`),
`curves.png` and `val_predictions.png`, redrawn at every epoch that improves the best IoU.
`prepare_run_folder` creates it (or, with `--resume`, finds it) and `check_resumable` says
whether a saved run may be continued with a given config.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from dli.common.atomic import atomic_write_text
from dli.common.errors import DliError
from dli.training.config import (
    TrainConfig,
    flag,
)
from dli.training.figures import CURVES_FILE, PREDICTIONS_FILE

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
