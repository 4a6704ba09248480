"""Hostile use of the other commands: refused experiment reruns, messages, progress (issue 27)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dli.cli import main
from dli.data.manifest import read_dataset
from dli.experiments.grid import resolve_grid
from dli.experiments.run import write_grid
from dli.training.config import write_run_config


def error_lines(capsys: pytest.CaptureFixture[str], command: str) -> list[str]:
    return [
        line for line in capsys.readouterr().err.splitlines() if line.startswith(f"dli {command}: error:")
    ]


def test_a_refused_experiment_rerun_writes_nothing(tmp_path, capsys):
    grid = resolve_grid(flags={"methods": "bce", "train": {"epochs": "3"}})
    (run,) = grid.runs(tmp_path)
    stored = write_grid(grid, tmp_path)
    run.folder.mkdir(parents=True)
    write_run_config(run.folder / "config.yaml", run.config, {"total_steps": 30})
    (run.folder / "metrics.jsonl").write_text('{"epoch": 1, "step": 10, "iou": 0.5}\n')
    before = stored.read_bytes()

    assert main(["experiment", "--out", str(tmp_path), "--epochs", "2"]) == 2
    (line,) = error_lines(capsys, "experiment")
    assert "--epochs 2 (folder has 3)" in line
    assert stored.read_bytes() == before  # the stored grid still says 3 epochs
    assert main(["experiment", "--out", str(tmp_path), "--dry-run"]) == 0  # and can be continued


# ---------------------------------------------------------------------------------------------
# A short diverged run (27.10) and progress on a redirected stream (27.15).


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dli.data.synth import generate

    root = tmp_path_factory.mktemp("tiny") / "synth"
    generate(root, images=40, seed=3, size_range=((40, 60), (40, 60)))
    return root


def train_flags(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "4",
        "--image-size", "32", "--no-pretrained", "--num-threads", "1", "--method", "bce", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_a_short_run_whose_last_epoch_was_mostly_skipped_ends_as_diverged(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_flags(tiny_data, out, "--lr", "1e30")) == 2  # 8 steps: the streak rule cannot fire
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("dli train: error:")]
    assert "training diverged" in line and "steps" in line and "--lr (1e+30)" in line
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()
    assert "\r" not in err and "batch/s" not in err  # the progress bar stays off a redirected stream


# ---------------------------------------------------------------------------------------------
# Messages (27.16).


def test_a_broken_run_config_is_one_line(tmp_path):
    from dli.common.errors import DliError
    from dli.training.config import read_run_config

    path = tmp_path / "config.yaml"
    path.write_text("epochs: 3\n  lr: [1,\nseed: {\n")
    with pytest.raises(DliError) as caught:
        read_run_config(path)
    assert (
        "\n" not in str(caught.value) and "  " not in str(caught.value) and "config.yaml" in str(caught.value)
    )


def test_a_million_seeds_are_refused_not_planned(tmp_path, capsys):
    assert (
        main(["experiment", "--out", str(tmp_path), "--methods", "bce", "--seeds", "0-1000000", "--dry-run"])
        == 2
    )
    (line,) = error_lines(capsys, "experiment")
    assert "1000001 seeds; at most 1000" in line


def test_a_device_file_as_an_image_is_not_called_missing(tmp_path):
    from dli.data.validation import validate

    csv = tmp_path / "data.csv"
    csv.write_text("image,mask,class\n/dev/zero,,free\n")
    report = validate(read_dataset(csv), raise_errors=False)
    assert [(p.path, p.kind) for p in report.errors] == [(Path("/dev/zero"), "not a regular file")]


def test_the_exporters_terminal_colours_stay_out_of_the_error_line(monkeypatch):
    import torch

    from dli.common.errors import DliError
    from dli.export import export_graph

    def failing(*args: object, **kwargs: object) -> None:
        raise RuntimeError("\x1b[1m\x1b[31mUnsupported operator\x1b[0m aten::foo\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", failing)
    with pytest.raises(DliError) as caught:
        export_graph(torch.nn.Identity(), 32, channels=3, opset=None)
    assert str(caught.value) == "the ONNX exporter failed: RuntimeError: Unsupported operator aten::foo"


def test_the_default_check_sizes_are_valid_for_any_training_size():
    from dli.export import default_check_sizes

    # A checkpoint trained at a size that is not a multiple of the stride: the default sizes of
    # the parity check are valid, so `--check-sizes` (not given) is never blamed for them.
    assert default_check_sizes(60, 8) == ((64, 64), (72, 80))
    assert default_check_sizes(64, 8) == ((64, 64), (72, 80))
