"""`dli eval` and `dli predict` on a checkpoint trained for a few steps (CPU, 64 px)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dli.checkpoint import load_checkpoint
from dli.cli import main
from dli.config import TrainConfig
from dli.pipeline.manifest import MT_CLASSES
from dli.pipeline.synth import generate
from dli.train import train


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
    # Same validation split as training: the counts match what training measured for best.pt.
    best = load_checkpoint(run / "best.pt")
    overall = rows[-1]
    assert float(overall["iou"]) == pytest.approx(best["metrics"]["iou"], nan_ok=True)


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
