"""Training on small synthetic data: learning, every method, exact resume, errors (CPU, 64 px)."""

from __future__ import annotations

import json
import math
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dli.cli import main
from dli.data.synth import generate
from dli.models.checkpoint import load_checkpoint
from dli.models.losses import METHODS
from dli.training.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """160 synthetic MT-like images: 114 defect-free, 46 with defects (10 of them held out)."""
    root = tmp_path_factory.mktemp("data") / "synth"
    generate(root, images=160, seed=3)
    return root


@pytest.mark.slow
def test_short_training_lowers_the_loss_and_finds_held_out_defects(data, tmp_path, small):
    # Cut-paste injection: Poisson blending costs CPU time and is covered by the resume test.
    config = small(data, tmp_path / "run", epochs=4, lr=2e-3, method="dli", poisson_prob=0.0)
    result = train(config)

    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result.best is not None and result.best.iou > 0
    assert result.skipped_steps == 0

    run = result.run_dir
    for name in ("config.yaml", "metrics.csv", "metrics.jsonl", "best.pt", "last.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    csv_lines = (run / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and "iou/uneven" in csv_lines[0]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 5))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["epochs"] == 4 and saved["runtime"]["pretrained"]["loaded"] is False
    assert saved["runtime"]["device"].startswith("cpu") and "torch" in saved["runtime"]["versions"]
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == result.best_epoch
    assert best["metrics"]["iou"] == pytest.approx(result.best.iou)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_takes_training_steps(data, tmp_path, method, small):
    result = train(small(data, tmp_path / method, method=method, epochs=1, max_steps=2))
    assert result.steps == 2 and result.skipped_steps == 0
    assert math.isfinite(result.history[0]["train_loss"])
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["runtime"]["loss"]["method"] == method
    if method in ("balanced", "wce"):
        counts = json.loads((result.run_dir / "class_pixels.json").read_text())
        train_images = sum(saved["runtime"]["train_counts"].values())
        assert len(counts["positive"]) == 5 and counts["total"] == train_images * 64 * 64
        assert all(p > 0 for p in counts["positive"])


class Interrupt(Exception):
    pass


@pytest.mark.slow  # several CPU trainings in one test (a run, an interrupted one, its resume)
def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(data, tmp_path, small):
    common = {"epochs": 2, "method": "dli", "data_fraction": 0.5}
    reference = train(small(data, tmp_path / "straight", **common))

    def stop_after_first_epoch(record):
        if record["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(small(data, tmp_path / "killed", **common), on_epoch_end=stop_after_first_epoch)
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 1
    resumed = train(small(data, tmp_path / "killed", resume=True, **common))

    assert resumed.epochs_completed == 2 and resumed.steps == reference.steps
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    continued = load_checkpoint(tmp_path / "killed" / "last.pt")
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, continued["model"][name]), name
    assert straight["scheduler"]["last_epoch"] == continued["scheduler"]["last_epoch"]
    timing = {"seconds", "images_per_s"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in reference.history]
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.history] == strip
    assert len((tmp_path / "killed" / "metrics.csv").read_text().splitlines()) == 3


def test_non_finite_losses_are_skipped_and_counted(data, tmp_path, small):
    trainer = Trainer(small(data, tmp_path / "run", epochs=1, max_steps=3))
    loss_fn, calls = trainer.loss_fn, []

    def nan_on_second_step(logits, targets):
        calls.append(1)
        loss = loss_fn(logits, targets)
        return loss * math.nan if len(calls) == 2 and trainer.net.training else loss

    trainer.loss_fn = nan_on_second_step
    result = trainer.fit()
    assert result.steps == 3 and result.skipped_steps == 1
    assert result.history[0]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.optimizer.state_dict()["state"][0]["step"].item() == 2  # two real updates


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--lr", "-1"], "--lr -1"),
        (["--data-fraction", "0"], "--data-fraction 0"),
        (["--poisson-prob", "2"], "--poisson-prob 2"),
        (["--encoder", "l-resnet19"], "--encoder l-resnet19"),
        (["--image-size", "100"], "--image-size 100"),
        (["--epochs", "0"], "--epochs 0"),
        (["--val-fraction", "1"], "--val-fraction 1"),
        (["--device", "gpu"], "--device gpu"),
        (["--split", "nowhere"], "--split nowhere"),
    ],
)
def test_bad_flag_values_are_one_line_errors(capsys, flags, named):
    assert main(["train", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dli train: error:") and named in err and "\n" not in err


def test_bad_data_is_reported_before_training(data, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    victim = sorted((broken / "MT_Crack" / "Imgs").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    out = tmp_path / "run"
    assert main(["train", "--data", str(broken), "--out", str(out), "--no-pretrained", "--no-progress"]) == 2
    assert victim.name in capsys.readouterr().err
    assert not out.exists()


def test_run_folders_are_not_overwritten_and_resume_checks_its_settings(data, tmp_path, capsys, small):
    out = tmp_path / "run"
    train(small(data, out, epochs=1, max_steps=1))
    args = ["train", "--data", str(data), "--out", str(out), "--no-pretrained", "--no-progress"]
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--resume", "--lr", "0.01"]) == 2
    assert "--lr 0.01" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "empty" in capsys.readouterr().err


def test_train_runs_as_a_script():
    proc = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: dli train" in proc.stdout and "--poisson-prob" in proc.stdout


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_train_runs_as_a_module(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("dli.train", run_name="__main__")
    assert exit_.value.code == 0
    assert "usage: dli train" in capsys.readouterr().out


@pytest.mark.realdata
@pytest.mark.slow
def test_reference_split_of_magnetic_tile(mt_root):
    from dli.training.datasets import load_datasets

    by_name = load_datasets(str(mt_root), "reference")
    by_folder = load_datasets(str(mt_root), str(mt_root / "splits" / "reference-seed42"))
    for datasets in (by_name, by_folder):
        assert (len(datasets.train), len(datasets.val)) == (1264, 80)
        assert datasets.val.counts_by_name() == {
            "blowhole": 23,
            "break": 17,
            "crack": 12,
            "fray": 7,
            "uneven": 21,
            "free": 0,
        }
        # The 4 MT_Uneven images with an empty mask never serve as injection sources.
        empty = [s for s in datasets.train.samples if s.class_id >= 0 and datasets.mask_fractions[s] == 0]
        assert len(empty) == 4
        donors = datasets.donors()
        defects = [i for i, s in enumerate(datasets.train.samples) if s.class_id >= 0]
        assert len(donors) == len(defects) - 4 and set(donors) <= set(defects)


def test_injection_sources_leave_out_defect_images_with_empty_masks(data):
    from dli.training.datasets import Datasets, load_datasets

    datasets = load_datasets(str(data), "stratified")
    defects = [i for i, s in enumerate(datasets.train.samples) if s.class_id >= 0]
    assert datasets.donors() == defects  # the synthetic masks all have defect pixels
    emptied = dict(datasets.mask_fractions) | {datasets.train.samples[defects[0]]: 0.0}
    with_empty = Datasets(datasets.train, datasets.val, datasets.data_path, emptied)
    assert with_empty.donors() == defects[1:]
