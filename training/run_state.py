"""Where a run stands and what it produced.

`Progress` is the state a resumed run needs to continue exactly (epoch, step, skipped steps, the
history of epoch records, best and last validation scores, evaluations since the best); it is
saved in `last.pt` as plain data. `RunResult` is what `dli.training.trainer.train` returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dli.models.metrics import SegmentationScores
from dli.models.unet import PretrainedStatus
from dli.training.config import TrainConfig


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
