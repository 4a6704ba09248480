"""Per-class decision thresholds, calibrated on a validation set.

A pixel of class c is predicted defect when its sigmoid probability exceeds the class's
threshold t_c (0.5 until calibrated). Calibration scores every candidate threshold of a fixed
grid (`GRID`: 0.001, 0.002, ..., 0.999) at once: `ThresholdCalibrator` accumulates, per class,
a histogram of the probabilities of defect and of background pixels over the grid's bins, on
the model's device and without host syncs; suffix sums of it give the dataset-level TP, FP and
FN at every grid threshold, exactly as `ConfusionCounter` would count them at that threshold.

`choose_thresholds` then picks, per class, the threshold of highest F1 (ties: the middle of the
tied thresholds), or with `min_recall` the highest F1 among thresholds whose recall reaches it
(the lowest grid threshold when none does). A class without defect pixels in the calibration
set keeps 0.5. The result, a `Thresholds`, is stored in checkpoints as plain lists
(`to_state`) under `CHECKPOINT_KEY`, read back by `thresholds_of`, and used by `dli eval`,
`dli predict` and `dli export` unless `--threshold` overrides it. Torch is imported only where
pixels are counted, so the ONNX prediction path reads thresholds without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dli.common.errors import DliError
from dli.common.model_checks import check_thresholds

if TYPE_CHECKING:
    import torch

DEFAULT_THRESHOLD = 0.5
"""The threshold of a class that was never calibrated."""

GRID_STEPS = 1000
GRID: tuple[float, ...] = tuple(k / GRID_STEPS for k in range(1, GRID_STEPS))
"""Candidate thresholds: 0.001 ... 0.999."""

CHECKPOINT_KEY = "thresholds"
"""Where a checkpoint holds its `Thresholds.to_state()`."""


@dataclass(frozen=True)
class Thresholds:
    """One decision threshold per class, and how it was chosen.

    Attributes:
        class_names: index = output channel.
        values: threshold of each class, in (0, 1).
        rule: "max-f1", "max-f1 at recall >= R", "0.5 (not calibrated)" or "--threshold T".
        calibrated: per class, whether the value came from calibration (False: no defect
            pixels of that class to calibrate on, so it kept 0.5).
        recall_met: per class, whether the `min_recall` constraint was reached (always True
            without one).
        source: what the thresholds were calibrated on (e.g. "validation set, 42 images").
    """

    class_names: tuple[str, ...]
    values: tuple[float, ...]
    rule: str
    calibrated: tuple[bool, ...]
    recall_met: tuple[bool, ...]
    source: str = ""

    @classmethod
    def uniform(cls, class_names: Sequence[str], value: float, rule: str) -> Thresholds:
        n = len(class_names)
        return cls(tuple(class_names), (float(value),) * n, rule, (False,) * n, (True,) * n)

    @property
    def is_calibrated(self) -> bool:
        return any(self.calibrated)

    def describe(self) -> str:
        """`crack 0.420, fray 0.500 (not calibrated), ...` (for tables and logs): a class whose value
        did not come from calibration (no defect pixels of it to calibrate on) says so."""
        calibrating = self.rule.startswith("max-f1")
        marks = [" (not calibrated)" if calibrating and not c else "" for c in self.calibrated]
        return ", ".join(
            f"{n} {v:.3f}{mark}" for n, v, mark in zip(self.class_names, self.values, marks, strict=True)
        )

    def to_state(self) -> dict[str, Any]:
        return {
            "class_names": list(self.class_names),
            "values": list(self.values),
            "rule": self.rule,
            "calibrated": list(self.calibrated),
            "recall_met": list(self.recall_met),
            "source": self.source,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], origin: str = "the checkpoint's thresholds") -> Thresholds:
        """Inverse of `to_state`; `DliError` naming `origin` for a value outside (0, 1)."""
        return cls(
            class_names=tuple(str(n) for n in state["class_names"]),
            values=check_thresholds([float(v) for v in state["values"]], origin),
            rule=str(state["rule"]),
            calibrated=tuple(bool(v) for v in state["calibrated"]),
            recall_met=tuple(bool(v) for v in state["recall_met"]),
            source=str(state.get("source", "")),
        )


def check_threshold(value: float, flag: str = "--threshold") -> float:
    """`value` if it is a probability strictly inside (0, 1); else `DliError` naming the flag."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 < value < 1.0):
        raise DliError(f"{flag} {value}: must be in (0, 1)")
    return float(value)


def check_min_recall(value: float | None) -> float | None:
    """`value` if None or in (0, 1]; else `DliError`."""
    if value is not None and not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise DliError(f"--min-recall {value}: must be in (0, 1]")
    return value


def thresholds_of(
    document: Mapping[str, Any], class_names: Sequence[str], override: float | None = None
) -> Thresholds:
    """The thresholds a checkpoint's model is used with.

    `override` (`--threshold`) wins; else the checkpoint's calibrated thresholds; else 0.5.
    """
    if override is not None:
        return Thresholds.uniform(class_names, check_threshold(override), f"--threshold {override:g}")
    state = document.get(CHECKPOINT_KEY)
    if state:
        try:
            thresholds = Thresholds.from_state(state)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise DliError(f"the checkpoint's thresholds are unreadable ({type(error).__name__})") from None
        if len(thresholds.values) != len(thresholds.class_names) or thresholds.class_names != tuple(
            class_names
        ):
            raise DliError(
                f"the checkpoint's thresholds are for classes {', '.join(thresholds.class_names)}, "
                f"its model for {', '.join(class_names)}"
            )
        return thresholds
    return Thresholds.uniform(class_names, DEFAULT_THRESHOLD, "0.5 (not calibrated)")


def keep_uncalibrated(chosen: Thresholds, stored: Thresholds | None) -> tuple[Thresholds, tuple[str, ...]]:
    """`chosen`, except that a class calibration could not choose for keeps its `stored` threshold.

    A class is not calibrated when the images hold none of its defect pixels (or the model finds
    none at 0.5): `choose_thresholds` then offers 0.5, which would silently replace a threshold
    calibrated earlier. Returns the thresholds and the names of the classes that kept theirs.
    """
    if stored is None or stored.class_names != chosen.class_names:
        return chosen, ()
    values, calibrated, recall_met, kept = [], [], [], []
    for index, name in enumerate(chosen.class_names):
        if not chosen.calibrated[index] and stored.calibrated[index]:
            values.append(stored.values[index])
            calibrated.append(True)
            recall_met.append(stored.recall_met[index])
            kept.append(name)
        else:
            values.append(chosen.values[index])
            calibrated.append(chosen.calibrated[index])
            recall_met.append(chosen.recall_met[index])
    if not kept:
        return chosen, ()
    source = f"{chosen.source}; {', '.join(kept)} kept from {stored.source or 'the earlier calibration'}"
    merged = Thresholds(
        chosen.class_names, tuple(values), chosen.rule, tuple(calibrated), tuple(recall_met), source
    )
    return merged, tuple(kept)


def check_batch_shapes(logits: Any, targets: Any, num_classes: int) -> None:
    """Raise `ValueError` unless `logits` and `targets` are both (N, `num_classes`, H, W).

    The check of every counter that takes batches (pixel, image-level, calibration).
    """
    if logits.shape != targets.shape or logits.shape[1] != num_classes:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be "
            f"(N, {num_classes}, H, W)"
        )


def threshold_tensor(
    values: float | Sequence[float], num_classes: int, device: torch.device | str
) -> torch.Tensor:
    """(1, C, 1, 1) float32 thresholds to compare (N, C, H, W) probabilities against."""
    import torch

    if isinstance(values, (int, float)):
        values = [float(values)] * num_classes
    if len(values) != num_classes:
        raise ValueError(f"{len(values)} thresholds for {num_classes} classes")
    return torch.tensor(list(values), dtype=torch.float32, device=device).view(1, -1, 1, 1)


@dataclass(frozen=True)
class ThresholdCurves:
    """Dataset-level counts at every grid threshold: arrays of shape (C, len(GRID))."""

    class_names: tuple[str, ...]
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    @property
    def f1(self) -> np.ndarray:
        denominator = 2 * self.tp + self.fp + self.fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, 2 * self.tp / np.maximum(denominator, 1), np.nan)

    @property
    def recall(self) -> np.ndarray:
        positives = self.tp + self.fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(positives > 0, self.tp / np.maximum(positives, 1), np.nan)

    def counts_at(self, values: Sequence[float]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(tp, fp, fn) per class at per-class grid thresholds `values`."""
        index = [grid_index(v) for v in values]
        rows = range(len(self.class_names))
        return tuple(
            tuple(int(counts[c, i]) for c, i in zip(rows, index, strict=True))
            for counts in (self.tp, self.fp, self.fn)
        )  # type: ignore[return-value]


def grid_index(value: float) -> int:
    """Index of `value` in `GRID`; `ValueError` when it is not a grid threshold."""
    index = round(value * GRID_STEPS) - 1
    if not 0 <= index < len(GRID) or not math.isclose(GRID[index], value, abs_tol=1e-12):
        raise ValueError(f"{value} is not a calibration grid threshold")
    return index


class ThresholdCalibrator:
    """Accumulates per-class probability histograms of defect and background pixels, on device.

    `update(logits, targets)` takes (N, C, H, W) logits and {0, 1} targets, as `ConfusionCounter`
    does, so it can observe an evaluation pass (`evaluate_model(..., observers=[calibrator])`).
    """

    def __init__(self, class_names: Sequence[str], *, device: torch.device | str = "cpu") -> None:
        import torch

        self.class_names = tuple(class_names)
        self.boundaries = torch.tensor(GRID, dtype=torch.float32, device=device)
        bins = len(GRID) + 1
        # histogram[c, 0, b]: background pixels of class c in bin b; [c, 1, b]: defect pixels.
        self.histogram = torch.zeros(len(self.class_names), 2, bins, dtype=torch.int64, device=device)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        import torch

        num_classes, bins = len(self.class_names), self.histogram.shape[-1]
        check_batch_shapes(logits, targets, num_classes)
        logits, targets = logits.detach(), targets.detach()
        probabilities = torch.sigmoid(logits.float()).contiguous()  # bucketize wants contiguous
        # bin b holds GRID[b-1] < p <= GRID[b], so "p > GRID[k]" is "bin > k".
        bins_of = torch.bucketize(probabilities, self.boundaries)
        actual = (targets > 0.5).long()
        channel = torch.arange(num_classes, device=logits.device).view(1, -1, 1, 1)
        flat = ((channel * 2 + actual) * bins + bins_of).flatten()
        # scatter_add_ into the fixed-size histogram: unlike bincount, no host sync for the size.
        self.histogram.view(-1).scatter_add_(
            0, flat, torch.ones(1, dtype=torch.int64, device=flat.device).expand_as(flat)
        )

    def curves(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ThresholdCurves:
        """Counts at every grid threshold (one host sync; `reduce` sums across processes)."""
        histogram = self.histogram.clone()
        if reduce is not None:
            histogram = reduce(histogram)
        counts = histogram.cpu().numpy()
        background, defect = counts[:, 0, :], counts[:, 1, :]
        # Pixels above GRID[k] are those in bins k+1 .. end: reversed cumulative sums.
        above_defect = np.cumsum(defect[:, ::-1], axis=1)[:, ::-1][:, 1:]
        above_background = np.cumsum(background[:, ::-1], axis=1)[:, ::-1][:, 1:]
        positives = defect.sum(axis=1, keepdims=True)
        return ThresholdCurves(self.class_names, above_defect, above_background, positives - above_defect)


def choose_thresholds(
    curves: ThresholdCurves, *, min_recall: float | None = None, source: str = ""
) -> Thresholds:
    """Per class, the grid threshold of highest F1 (subject to recall >= `min_recall`).

    A class without defect pixels keeps `DEFAULT_THRESHOLD`, and so, under the max-F1 rule, does a
    class the model finds no pixel of at that threshold: a model that has not learnt the class
    offers no operating point, and the "best" F1 of a few stray true positives among floods of
    false ones (a threshold near 0) would only fit noise and swamp the other classes' counts.
    """
    check_min_recall(min_recall)
    f1, recall = curves.f1, curves.recall
    positives = curves.tp[:, 0] + curves.fn[:, 0]
    found_at_default = curves.tp[:, GRID.index(DEFAULT_THRESHOLD)] > 0
    values, calibrated, met = [], [], []
    for c in range(len(curves.class_names)):
        if positives[c] == 0 or (min_recall is None and not found_at_default[c]):
            values.append(DEFAULT_THRESHOLD)
            calibrated.append(False)
            met.append(True)
            continue
        allowed = np.ones(len(GRID), bool) if min_recall is None else recall[c] >= min_recall - 1e-12
        if not allowed.any():
            values.append(GRID[0])  # the most recall a grid threshold gives
            calibrated.append(True)
            met.append(False)
            continue
        scores = np.where(allowed, np.nan_to_num(f1[c], nan=-1.0), -np.inf)
        best = np.flatnonzero(scores == scores.max())
        values.append(GRID[int(best[len(best) // 2])])
        calibrated.append(True)
        met.append(True)
    rule = "max-f1" if min_recall is None else f"max-f1 at recall >= {min_recall:g}"
    return Thresholds(curves.class_names, tuple(values), rule, tuple(calibrated), tuple(met), source)
