"""Image-level accept/reject metrics: how a segmentation model does as an inspection decision.

A line decides per part: an image is **rejected for class c** when at least `min_area` of its
pixels are predicted as c (probability above the class's threshold), and **rejected** when it
is rejected for some class. It is **defective for class c** when its ground-truth mask of c has
a pixel, **defective** when it is defective for some class, and **defect-free** otherwise.

Per class and for "any defect", over the images: precision = TP / (TP + FP), recall =
TP / (TP + FN), F1, the **escape rate** (defective images accepted: FN / (TP + FN) = 1 - recall)
and the **overkill rate** (defect-free images rejected / defect-free images). For a class, the
overkill rate counts defect-free images rejected for that class; an image of another defect
class flagged as c is a class confusion (a false positive of c), not overkill, since the part
is defective either way. Without defect-free images the overkill rate is undefined (NaN) and
`ImageScores.no_defect_free_note` says so. Counts accumulate on the model's device; the host
reads them once.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dli.models.metrics import all_reduce_sum
from dli.models.thresholds import check_batch_shapes, threshold_tensor

ANY_DEFECT = "any defect"
"""Name of the row for the whole decision (rejected for any class)."""

COLUMNS: tuple[str, ...] = ("tp", "fp", "fn", "tn", "free_rejected")


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


@dataclass(frozen=True)
class ImageDecision:
    """Image-level confusion of one class (or of "any defect")."""

    name: str
    tp: int
    fp: int
    fn: int
    tn: int
    free_rejected: int
    free: int

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def escape_rate(self) -> float:
        """Defective images (for this class) that were accepted."""
        return _ratio(self.fn, self.tp + self.fn)

    @property
    def overkill_rate(self) -> float:
        """Defect-free images rejected (for this class)."""
        return _ratio(self.free_rejected, self.free)

    def record(self) -> dict[str, object]:
        return {
            "image_tp": self.tp,
            "image_fp": self.fp,
            "image_fn": self.fn,
            "image_tn": self.tn,
            "image_precision": self.precision,
            "image_recall": self.recall,
            "image_f1": self.f1,
            "escape_rate": self.escape_rate,
            "overkill_rate": self.overkill_rate,
        }


@dataclass(frozen=True)
class ImageScores:
    """Image-level decisions per class and for any defect, at the given thresholds and area."""

    classes: tuple[ImageDecision, ...]
    any_defect: ImageDecision
    min_area: int

    @property
    def images(self) -> int:
        d = self.any_defect
        return d.tp + d.fp + d.fn + d.tn

    @property
    def no_defect_free_note(self) -> str | None:
        """A sentence when the overkill rate is undefined for want of defect-free images."""
        if self.any_defect.free:
            return None
        return (
            "no defect-free images in the evaluation set: the overkill rate is undefined "
            "(the reference split has none; train with --split-free to keep some in validation)"
        )

    def table(self) -> str:
        """Aligned text: per class and any defect, the rates in percent and the confusion counts."""
        rows = [*self.classes, self.any_defect]
        width = max(len(r.name) for r in rows)
        header = (
            f"{'class':<{width}}  {'prec %':>7}  {'rec %':>7}  {'F1 %':>7}  {'escape %':>8}  "
            f"{'overkill %':>10}  {'TP':>6}  {'FP':>6}  {'FN':>6}  {'TN':>6}"
        )
        lines = [header]
        for row in rows:
            if row is self.any_defect:
                lines.append("-" * len(header))
            lines.append(
                f"{row.name:<{width}}  {_percent(row.precision):>7}  {_percent(row.recall):>7}  "
                f"{_percent(row.f1):>7}  {_percent(row.escape_rate):>8}  {_percent(row.overkill_rate):>10}  "
                f"{row.tp:>6}  {row.fp:>6}  {row.fn:>6}  {row.tn:>6}"
            )
        note = self.no_defect_free_note
        if note:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def to_csv(self) -> str:
        buffer = io.StringIO()
        fields = ["class", "min_area", *self.any_defect.record()]
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in (*self.classes, self.any_defect):
            writer.writerow({"class": row.name, "min_area": self.min_area, **row.record()})
        return buffer.getvalue()


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


class ImageDecisionCounter:
    """Accumulates image-level decisions over batches of logits and {0, 1} targets, on device."""

    def __init__(
        self,
        class_names: Sequence[str],
        thresholds: float | Sequence[float],
        *,
        min_area: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if isinstance(min_area, bool) or not isinstance(min_area, int) or min_area < 1:
            raise ValueError(f"min_area must be an integer >= 1, got {min_area!r}")
        self.class_names = tuple(class_names)
        self.min_area = min_area
        self.thresholds = threshold_tensor(thresholds, len(self.class_names), device)
        # rows: classes, then any defect; columns: COLUMNS.
        self.counts = torch.zeros(len(self.class_names) + 1, len(COLUMNS), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the images of a batch: `logits` and `targets` are (N, C, H, W)."""
        check_batch_shapes(logits, targets, len(self.class_names))
        predicted_area = (torch.sigmoid(logits.float()) > self.thresholds.to(logits.device)).sum((2, 3))
        rejected = predicted_area >= self.min_area  # (N, C)
        defective = (targets > 0.5).any(3).any(2)
        rejected = torch.cat([rejected, rejected.any(1, keepdim=True)], 1)  # (N, C + 1)
        defective = torch.cat([defective, defective.any(1, keepdim=True)], 1)
        free = ~defective[:, -1:]
        columns = (
            rejected & defective,
            rejected & ~defective,
            ~rejected & defective,
            ~rejected & ~defective,
            rejected & free,
        )
        self.counts += torch.stack([c.sum(0) for c in columns], 1)

    def compute(self, reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum) -> ImageScores:
        """The scores of everything seen so far (one host sync; counts reduced across processes)."""
        rows = reduce(self.counts.clone()).cpu().tolist()
        any_row = rows[-1]
        free = any_row[1] + any_row[3]  # defect-free images: rejected (fp) or accepted (tn) for any defect
        names = (*self.class_names, ANY_DEFECT)
        decisions = [ImageDecision(name, *row, free=free) for name, row in zip(names, rows, strict=True)]
        return ImageScores(tuple(decisions[:-1]), decisions[-1], self.min_area)
