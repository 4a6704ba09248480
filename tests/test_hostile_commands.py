"""Hostile use of the other commands: refused experiment reruns, messages, progress (issue 27)."""

from __future__ import annotations

import pytest

import dli.trainer
from dli.cli import main
from dli.config import write_run_config
from dli.experiments.grid import resolve_grid
from dli.experiments.run import write_grid


def error_lines(capsys: pytest.CaptureFixture[str], command: str) -> list[str]:
    return [
        line for line in capsys.readouterr().err.splitlines() if line.startswith(f"dli {command}: error:")
    ]


def test_a_refused_experiment_rerun_writes_nothing(tmp_path, capsys, monkeypatch):
    grid = resolve_grid(flags={"methods": "bce", "train": {"epochs": "3"}})
    (run,) = grid.runs(tmp_path)
    stored = write_grid(grid, tmp_path)
    run.folder.mkdir(parents=True)
    write_run_config(run.folder / "config.yaml", run.config, {"total_steps": 30})
    (run.folder / "metrics.jsonl").write_text('{"epoch": 1, "step": 10, "iou": 0.5}\n')
    before = stored.read_bytes()
    monkeypatch.setattr(dli.trainer, "train", lambda config: pytest.fail("trained"))

    assert main(["experiment", "--out", str(tmp_path), "--epochs", "2"]) == 2
    (line,) = error_lines(capsys, "experiment")
    assert "--epochs 2 (folder has 3)" in line
    assert stored.read_bytes() == before  # the stored grid still says 3 epochs
    assert main(["experiment", "--out", str(tmp_path), "--dry-run"]) == 0  # and can be continued
