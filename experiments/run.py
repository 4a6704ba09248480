"""Running a grid: each planned run trained, resumed or skipped, one after another on one device.

Every run trains with `dli.training.trainer.train` in its own folder under EXPDIR (`Grid.runs`). Running a
grid again continues it: a finished run (its `metrics.jsonl` reaches the run's last step) is
skipped, a killed one is resumed from its `last.pt` (`run_state`). A run folder holding a run
with different settings is an error, never silently reused. The grid itself is kept in
`EXPDIR/experiment.yaml` (`write_grid`, atomically), so that the folder alone says how to
continue it (`read_stored_grid`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from dli.common.atomic import atomic_write_text
from dli.common.errors import DliError
from dli.experiments.aggregate import read_run
from dli.experiments.grid import Grid, PlannedRun, read_grid_file
from dli.training import run_folder, trainer
from dli.training.config import TrainConfig, flag

EXPERIMENT_FILE = "experiment.yaml"


class RunState(Enum):
    """What the runner does with a run: train it, resume it from `last.pt`, or skip it."""

    NEW = "new"
    RESUME = "resume"
    FINISHED = "finished"


def changed_settings(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    """Settings (as flags) that differ and would change what a run computes.

    A folder written before a setting existed takes that setting's default (protocol ``dli``).
    """
    saved = saved.resolved()
    return [
        f"{flag(f.name)} {getattr(wanted, f.name)} (folder has {getattr(saved, f.name)})"
        for f in fields(TrainConfig)
        if f.name not in run_folder.RUNTIME_FIELDS and getattr(saved, f.name) != getattr(wanted, f.name)
    ]


def run_state(run: PlannedRun) -> RunState:
    """Whether `run` is to be trained, resumed or skipped; `DliError` if its folder holds another run."""
    config_file = run.folder / run_folder.CONFIG_FILE
    if not config_file.is_file():
        return RunState.NEW
    record = read_run(run.folder)
    changed = changed_settings(record.config, run.config)
    if changed:
        raise DliError(
            f"run folder {run.folder} holds a run with other settings: {'; '.join(changed)}; "
            "use another --out or remove the folder"
        )
    if record.complete:
        return RunState.FINISHED
    return RunState.RESUME if (run.folder / run_folder.LAST).is_file() else RunState.NEW


def _discard_partial(folder: Path) -> None:
    """A run killed before its first `last.pt` may leave a `best.pt`; a fresh start replaces it."""
    (folder / run_folder.BEST).unlink(missing_ok=True)


Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


def run_grid(grid: Grid, expdir: str | Path, *, log: Log = _print) -> dict[str, RunState]:
    """Train, resume or skip every run of `grid` in `expdir`; returns each run's state before."""
    expdir = Path(expdir).absolute()
    runs = grid.runs(expdir)
    states = {run.name: run_state(run) for run in runs}
    synthetic = grid.synthetic_data(expdir)
    if synthetic is not None and not synthetic.is_dir():
        from dli.data.synth import generate

        log(f"generating {grid.synthetic_images} synthetic images in {synthetic}")
        generate(synthetic, images=grid.synthetic_images or 0, seed=0)
    width = len(str(len(runs)))
    for index, run in enumerate(runs, 1):
        prefix = f"[{index:>{width}}/{len(runs)}] {run.name}"
        state = run_state(run)  # again: the folder may have changed while earlier runs trained
        if state is RunState.FINISHED:
            log(f"{prefix}: finished, skipped")
            continue
        if state is RunState.NEW:
            _discard_partial(run.folder)
        log(f"{prefix}: {'resuming' if state is RunState.RESUME else 'training'}")
        result = trainer.train(replace(run.config, resume=state is RunState.RESUME))
        best = "undefined" if result.best is None else f"{100 * result.best.iou:.2f}%"
        log(f"{prefix}: best IoU {best} at epoch {result.best_epoch} of {result.epochs_completed}")
    return states


def write_grid(grid: Grid, expdir: str | Path) -> Path:
    """Write `experiment.yaml` (the grid and its run names) into `expdir`, atomically."""
    path = Path(expdir) / EXPERIMENT_FILE
    document = grid.to_document() | {"runs": [run.name for run in grid.runs(expdir)]}
    atomic_write_text(path, yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    return path


def read_stored_grid(expdir: str | Path) -> dict[str, Any] | None:
    """The checked document of `expdir/experiment.yaml`, or None when there is none."""
    path = Path(expdir) / EXPERIMENT_FILE
    return read_grid_file(path) if path.is_file() else None
