"""An epoch's record, told to the user: one line on stderr and TensorBoard scalars.

The record is the epoch's `metrics.jsonl` line (`dli.training.run_folder`): training loss, IoU,
learning rate and throughput, plus the validation scores on epochs that were validated.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any


def print_epoch(record: Mapping[str, Any], epochs: int) -> None:
    line = f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f}"
    line += f", train IoU {100 * record['train_iou']:.2f}%"
    if "iou" in record:
        line += f", val IoU {100 * record['iou']:.2f}%, val F1 {100 * record['f1']:.2f}%"
    line += f", {record['images_per_s']:.1f} img/s"
    if record["skipped_steps"]:
        line += f", {record['skipped_steps']} non-finite steps skipped"
    print(line, file=sys.stderr)


def log_tensorboard(writer: Any, record: Mapping[str, Any]) -> None:
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
