"""`dli eval` and `dli predict` on a checkpoint trained for a few steps (CPU, 64 px)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dli.cli import main
from dli.data.manifest import MT_CLASSES
from dli.data.synth import generate
from dli.models.checkpoint import load_checkpoint, save_checkpoint
from dli.training.config import TrainConfig
from dli.training.trainer import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, run folder) of a 3-step training run."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "synth"
    generate(data, images=40, seed=5)
    config = TrainConfig(
        data=str(data),
        out=str(root / "run"),
        epochs=1,
        max_steps=3,
        batch_size=8,
        image_size=64,
        pretrained=False,
        progress=False,
        num_threads=1,
    )
    return data, train(config).run_dir


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_eval_writes_the_per_class_table_beside_the_checkpoint(trained, capsys):
    data, run = trained
    assert (
        main(["eval", "--checkpoint", str(run / "best.pt"), "--data", str(data), "--num-threads", "1"]) == 0
    )
    out = capsys.readouterr().out
    assert all(name in out for name in MT_CLASSES) and "overall" in out
    rows = _read_csv(run / "best_eval.csv")
    assert [r["class"] for r in rows] == [*MT_CLASSES, "overall"]
    # Same validation split as training: the counts match what training measured for best.pt,
    # at 0.5 and at the thresholds calibrated at the end of training.
    best = load_checkpoint(run / "best.pt")
    overall = rows[-1]
    assert float(overall["iou_at_0.5"]) == pytest.approx(best["metrics"]["iou"], nan_ok=True)
    calibrated = best["calibrated_scores"]
    assert [int(r["tp"]) for r in rows[:-1]] == calibrated["tp"]
    assert [int(r["fp"]) for r in rows[:-1]] == calibrated["fp"]
    assert [float(r["threshold"]) for r in rows[:-1]] == best["thresholds"]["values"]
    assert "image level" in out and "escape %" in out and "overkill %" in out
    assert "no defect-free images in the evaluation set" in out  # the default split keeps them in training


def test_eval_calibrate_chooses_what_training_chose_and_stores_it(trained, tmp_path, capsys):
    data, run = trained
    checkpoint = tmp_path / "best.pt"
    shutil.copy(run / "best.pt", checkpoint)
    trained_thresholds = load_checkpoint(checkpoint)["thresholds"]
    stripped = {k: v for k, v in load_checkpoint(checkpoint).items() if k != "thresholds"}
    save_checkpoint(checkpoint, stripped)
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--num-threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "threshold 0.5 for every class (0.5 (not calibrated))" in out
    assert "thresholds" not in load_checkpoint(checkpoint)

    # Copied out of its run folder, the checkpoint's relative data path leads nowhere: one line.
    assert main(["eval", "--checkpoint", str(checkpoint), "--calibrate", "--num-threads", "1"]) == 2
    assert "pass --data" in capsys.readouterr().err
    calibrate = ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--calibrate"]
    assert main([*calibrate, "--num-threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"thresholds stored in {checkpoint}" in out
    stored = load_checkpoint(checkpoint)["thresholds"]
    assert stored["values"] == trained_thresholds["values"] and stored["rule"] == "max-f1"
    rows = _read_csv(tmp_path / "best_eval.csv")
    for row in rows[:-1]:  # 0.5 is a candidate, so the calibrated F1 is never below it
        if row["f1_at_0.5"] != "nan":
            assert float(row["f1"]) >= float(row["f1_at_0.5"])

    # A recall constraint can only lower the thresholds of calibrated classes.
    assert main([*calibrate, "--min-recall", "0.99"]) == 0
    capsys.readouterr()
    constrained = load_checkpoint(checkpoint)["thresholds"]
    assert constrained["rule"] == "max-f1 at recall >= 0.99"
    for low, free, calibrated in zip(
        constrained["values"], stored["values"], stored["calibrated"], strict=True
    ):
        assert low <= free or not calibrated

    # --threshold overrides what the checkpoint holds.
    override = ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--threshold", "0.5"]
    assert main([*override, "--min-area", "3"]) == 0
    out = capsys.readouterr().out
    assert "(--threshold 0.5)" in out and ">= 3 predicted pixels" in out


def test_eval_on_all_images_has_defect_free_images_for_the_overkill_rate(trained, tmp_path, capsys):
    _, run = trained
    out_csv = tmp_path / "all.csv"
    assert main(["eval", "--checkpoint", str(run / "best.pt"), "--split", "all", "--out", str(out_csv)]) == 0
    assert "no defect-free images" not in capsys.readouterr().out
    overall = _read_csv(out_csv)[-1]
    assert overall["overkill_rate"] != "nan"
    assert int(overall["image_fp"]) + int(overall["image_tn"]) > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-area", "0"], "--min-area 0: must be an integer >= 1"),
        (["--threshold", "1.2"], "--threshold 1.2: must be in (0, 1)"),
        (["--min-recall", "0.9"], "--min-recall applies to --calibrate"),
        (["--calibrate", "--min-recall", "1.5"], "--min-recall 1.5: must be in (0, 1]"),
        (["--calibrate", "--threshold", "0.4"], "cannot be combined with --threshold"),
    ],
)
def test_eval_threshold_flags_are_checked(trained, capsys, flags, message):
    _, run = trained
    assert main(["eval", "--checkpoint", str(run / "best.pt"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dli eval: error:") and message in err and err.count("\n") == 1


def test_eval_on_all_images_counts_more_pixels(trained, tmp_path):
    data, run = trained
    val_csv, all_csv = tmp_path / "val.csv", tmp_path / "all.csv"
    checkpoint = str(run / "last.pt")
    assert main(["eval", "--checkpoint", checkpoint, "--out", str(val_csv), "--num-threads", "1"]) == 0
    assert (
        main(
            ["eval", "--checkpoint", checkpoint, "--split", "all", "--data", str(data), "--out", str(all_csv)]
        )
        == 0
    )

    def pixels(rows):
        overall = rows[-1]
        return int(overall["tp"]) + int(overall["fn"])

    assert pixels(_read_csv(all_csv)) > pixels(_read_csv(val_csv)) > 0


def test_predict_writes_masks_and_overlays_at_the_original_size(trained, tmp_path):
    data, run = trained
    images = tmp_path / "images"
    images.mkdir()
    sources = (
        sorted((data / "MT_Uneven" / "Imgs").glob("*.jpg"))[:2]
        + sorted((data / "MT_Free" / "Imgs").glob("*.jpg"))[:1]
    )
    for source in sources:
        shutil.copy(source, images / source.name)
    shutil.copy(
        sources[0].with_suffix(".png"), images / sources[0].with_suffix(".png").name
    )  # a mask: skipped
    out = tmp_path / "pred"
    assert (
        main(["predict", "--checkpoint", str(run / "best.pt"), "--images", str(images), "--out", str(out)])
        == 0
    )

    assert len(list(out.iterdir())) == len(sources) * (len(MT_CLASSES) + 1)
    for source in sources:
        with Image.open(source) as image:
            size = image.size
        for name in MT_CLASSES:
            with Image.open(out / f"{source.stem}_{name}.png") as mask:
                assert mask.size == size and mask.mode == "L"
                assert set(np.unique(np.asarray(mask))) <= {0, 255}
        with Image.open(out / f"{source.stem}_overlay.png") as overlay:
            assert overlay.size == size and overlay.mode == "RGB"


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_missing_or_corrupt_checkpoints_are_one_line_errors(tmp_path, capsys, command):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "a.jpg")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    extra = ["--images", str(images), "--out", str(tmp_path / "out")] if command == "predict" else []
    for checkpoint in (tmp_path / "missing.pt", corrupt):
        assert main([command, "--checkpoint", str(checkpoint), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"dli {command}: error:") and str(checkpoint) in err and "\n" not in err


def test_eval_refuses_a_dataset_with_other_classes(trained, tmp_path, capsys):
    data, run = trained
    other = tmp_path / "other"
    shutil.copytree(data, other)
    shutil.rmtree(other / "MT_Fray")
    (other / "classes.txt").write_text("blowhole\nbreak\ncrack\nuneven\n")
    assert main(["eval", "--checkpoint", str(run / "best.pt"), "--data", str(other)]) == 2
    assert "differ from the checkpoint" in capsys.readouterr().err
