"""Dataset-level IoU and F1, as the paper measures them.

True/false positives and false negatives are summed over the whole validation set before any
ratio is taken (not averaged per image or per batch): IoU = TP / (TP + FP + FN) and
F1 = 2TP / (2TP + FP + FN), per class and overall (counts summed over classes). A pixel is
predicted positive when its sigmoid probability exceeds the threshold (0.5, or the class's
calibrated threshold: `dli.models.thresholds`). A ratio with a
zero denominator (a class neither present nor predicted) is NaN: undefined, not perfect.

The paper's per-class figure groups differently (`ImageClassCounter`): the IoU of class c there
is computed over the validation images whose true class is c, counting every channel of those
images (a false positive in another class's channel counts against c). Both are reported; the
per-channel scores are the primary ones.

Counts accumulate as int64 tensors on the model's device, so evaluation never waits on the
host per batch; `ConfusionCounter.compute` reads them once. Across the processes of a
distributed run counts are summed (`all_reduce_sum`) and means taken over the summed totals
(`all_mean`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from dli.models.thresholds import check_batch_shapes, threshold_tensor
from dli.pipeline.batch import Batch

THRESHOLD = 0.5
"""Probability above which a pixel is predicted as defect."""


def all_reduce_sum(counts: torch.Tensor) -> torch.Tensor:
    """Sum `counts` over the processes of a distributed run (in place); a no-op otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts


def all_mean(total: float, count: int, device: torch.device) -> float:
    """`total / count` summed over the processes of a distributed run; NaN for no count."""
    values = all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64, device=device)).tolist()
    return values[0] / values[1] if values[1] else math.nan


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


@dataclass(frozen=True)
class SegmentationScores:
    """Confusion counts per class over a dataset, and the IoU/F1 derived from them."""

    class_names: tuple[str, ...]
    tp: tuple[int, ...]
    fp: tuple[int, ...]
    fn: tuple[int, ...]

    @property
    def iou(self) -> float:
        """Overall IoU: counts summed over classes, then TP / (TP + FP + FN)."""
        tp, fp, fn = sum(self.tp), sum(self.fp), sum(self.fn)
        return _ratio(tp, tp + fp + fn)

    @property
    def f1(self) -> float:
        """Overall F1 from counts summed over classes."""
        tp, fp, fn = sum(self.tp), sum(self.fp), sum(self.fn)
        return _ratio(2 * tp, 2 * tp + fp + fn)

    @property
    def class_iou(self) -> tuple[float, ...]:
        return tuple(_ratio(t, t + p + n) for t, p, n in zip(self.tp, self.fp, self.fn, strict=True))

    @property
    def class_f1(self) -> tuple[float, ...]:
        return tuple(_ratio(2 * t, 2 * t + p + n) for t, p, n in zip(self.tp, self.fp, self.fn, strict=True))

    def to_dict(self) -> dict[str, float]:
        """Flat record: `iou`, `f1`, `iou/<class>`, `f1/<class>` (for CSV, JSON and TensorBoard)."""
        record = {"iou": self.iou, "f1": self.f1}
        record.update({f"iou/{n}": v for n, v in zip(self.class_names, self.class_iou, strict=True)})
        record.update({f"f1/{n}": v for n, v in zip(self.class_names, self.class_f1, strict=True)})
        return record

    def to_state(self) -> dict[str, list]:
        """The counts as plain lists (for checkpoints); inverse of `from_state`."""
        return {
            "class_names": list(self.class_names),
            "tp": list(self.tp),
            "fp": list(self.fp),
            "fn": list(self.fn),
        }

    @classmethod
    def from_state(cls, state: dict[str, list]) -> SegmentationScores:
        return cls(tuple(state["class_names"]), tuple(state["tp"]), tuple(state["fp"]), tuple(state["fn"]))

    def rows(self) -> list[dict[str, object]]:
        """One row per class and an `overall` row: class, iou, f1, tp, fp, fn."""
        rows: list[dict[str, object]] = [
            {"class": name, "iou": iou, "f1": f1, "tp": tp, "fp": fp, "fn": fn}
            for name, iou, f1, tp, fp, fn in zip(
                self.class_names, self.class_iou, self.class_f1, self.tp, self.fp, self.fn, strict=True
            )
        ]
        rows.append(
            {
                "class": "overall",
                "iou": self.iou,
                "f1": self.f1,
                "tp": sum(self.tp),
                "fp": sum(self.fp),
                "fn": sum(self.fn),
            }
        )
        return rows

    def table(self) -> str:
        """The per-class table as aligned text (IoU and F1 in percent)."""
        width = max(len("overall"), *(len(n) for n in self.class_names))
        lines = [f"{'class':<{width}}  {'IoU %':>7}  {'F1 %':>7}  {'TP':>11}  {'FP':>11}  {'FN':>11}"]
        for row in self.rows():
            if row["class"] == "overall":
                lines.append("-" * len(lines[0]))
            lines.append(
                f"{row['class']:<{width}}  {_percent(row['iou']):>7}  {_percent(row['f1']):>7}  "
                f"{row['tp']:>11}  {row['fp']:>11}  {row['fn']:>11}"
            )
        return "\n".join(lines)

    def to_csv(self) -> str:
        """`rows()` as CSV text (ratios as fractions, `nan` when undefined)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer, fieldnames=["class", "iou", "f1", "tp", "fp", "fn"], lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(self.rows())
        return buffer.getvalue()


def _percent(value: object) -> str:
    return "n/a" if not isinstance(value, float) or math.isnan(value) else f"{100 * value:.2f}"


class ConfusionCounter:
    """Accumulates per-class TP/FP/FN over batches of logits and {0, 1} targets, on device.

    `threshold` is one probability for every class or one per class (calibrated thresholds).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        *,
        device: torch.device | str = "cpu",
        threshold: float | Sequence[float] = THRESHOLD,
    ) -> None:
        self.class_names = tuple(class_names)
        self.threshold = threshold_tensor(threshold, len(self.class_names), device)  # one per class
        self.counts = torch.zeros(3, len(self.class_names), dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.counts.zero_()

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the counts of a batch: `logits` and `targets` are (N, C, H, W)."""
        check_batch_shapes(logits, targets, len(self.class_names))
        predicted = torch.sigmoid(logits.float()) > self.threshold.to(logits.device)
        actual = targets > 0.5
        dims = (0, 2, 3)
        tp = (predicted & actual).sum(dims)
        self.counts[0] += tp
        self.counts[1] += predicted.sum(dims) - tp
        self.counts[2] += actual.sum(dims) - tp

    def compute(self, reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum) -> SegmentationScores:
        """The scores of everything seen so far (one host sync; counts reduced across processes)."""
        tp, fp, fn = reduce(self.counts.clone()).cpu().tolist()
        return SegmentationScores(self.class_names, tuple(tp), tuple(fp), tuple(fn))


class ImageClassCounter(ConfusionCounter):
    """TP/FP/FN grouped by each image's true class, summed over all channels of the image.

    Row c of the counts holds the images of class c (defect-free images, class -1, are left
    out): the grouping of the reference implementation's per-class IoU.
    """

    @torch.no_grad()
    def update_by_image(self, logits: torch.Tensor, targets: torch.Tensor, class_ids: torch.Tensor) -> None:
        """Add a batch: `logits`, `targets` (N, C, H, W), `class_ids` (N,) with -1 for defect-free."""
        check_batch_shapes(logits, targets, len(self.class_names))
        predicted = torch.sigmoid(logits.float()) > self.threshold
        actual = targets > 0.5
        dims = (1, 2, 3)
        tp = (predicted & actual).sum(dims)
        per_image = torch.stack([tp, predicted.sum(dims) - tp, actual.sum(dims) - tp])  # (3, N)
        ids = class_ids.to(self.counts.device)
        # Defect-free images add zeros (to row 0) rather than being selected out: a boolean
        # selection would make the host wait for the device on every batch.
        keep = (ids >= 0).to(per_image.dtype)
        self.counts.index_add_(1, ids.clamp(min=0), per_image * keep)


class BatchObserver(Protocol):
    """Anything that accumulates over (logits, masks) batches, as `ConfusionCounter` does."""

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class Evaluation:
    """Scores of a model over a dataset, and its mean loss there (NaN without a loss function).

    `by_image_class`: the scores grouped by each image's true class (`ImageClassCounter`).
    """

    scores: SegmentationScores
    loss: float
    by_image_class: SegmentationScores | None = None


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    batches: Iterable[Batch],
    class_names: Sequence[str],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum,
    observers: Sequence[BatchObserver] = (),
) -> Evaluation:
    """Run `model` over `batches` in eval mode and score it; restores the model's mode after.

    Everything accumulates on `device`; the host reads the totals once at the end. Each of
    `observers` (other counters: calibration histograms, image-level decisions) also sees every
    batch's logits and masks; reading their results is the caller's.
    """
    was_training = model.training
    model.eval()
    counter = ConfusionCounter(class_names, device=device)
    by_image = ImageClassCounter(class_names, device=device)
    loss_total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of per-image loss, images)
    try:
        for batch in batches:
            images = batch.images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            masks = batch.masks.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(images)
            counter.update(logits, masks)
            by_image.update_by_image(logits, masks, batch.class_ids)
            for observer in observers:
                observer.update(logits, masks)
            if loss_fn is not None:
                loss_total[0] += loss_fn(logits, masks).double() * len(images)
                loss_total[1] += len(images)
    finally:
        model.train(was_training)
    loss_sum, images = reduce(loss_total).tolist()
    return Evaluation(
        counter.compute(reduce), loss_sum / images if images else math.nan, by_image.compute(reduce)
    )
