"""What a run shows as it goes: its pictures (redrawn on improvement only), `dli eval --out DIR`, and
`--patience` (stops after N evaluations without a better IoU, across `--resume`).

Most tests script the validation IoU per epoch (the model, loaders and figures all run for real),
so which epochs improve is fixed and the expectations are exact."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.colors import to_rgb
from PIL import Image

from dli.cli import main
from dli.data.manifest import FREE, MT_CLASSES, read_dataset
from dli.data.synth import generate
from dli.models.checkpoint import load_checkpoint
from dli.models.metrics import Evaluation, SegmentationScores
from dli.pipeline.preview import CLASS_COLOURS
from dli.training.config import TrainConfig
from dli.training.figures import (
    OVERLAY_ALPHA,
    Predictions,
    _overlay,
    example_indices,
    render_curves,
    render_predictions,
)
from dli.training.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """40 synthetic images (12 with defects, 4 of them held out): one 32-image step per epoch at 32 px."""
    root = tmp_path_factory.mktemp("figures") / "synth"
    generate(root, images=40, seed=7)
    return root


def tiny(data: Path, out: Path, **overrides) -> TrainConfig:
    settings = {
        "data": str(data),
        "out": str(out),
        "epochs": 4,
        "batch_size": 32,
        "image_size": 32,
        "lr": 1e-3,
        "pretrained": False,
        "progress": False,
        "num_threads": 1,
    }
    return TrainConfig(**(settings | overrides))


def scores_with_iou(iou: float) -> SegmentationScores:
    """Scores whose overall IoU is `iou` (1000 labelled pixels of the first class)."""
    tp = round(1000 * iou)
    zeros = (0,) * (len(MT_CLASSES) - 1)
    return SegmentationScores(MT_CLASSES, (tp, *zeros), (0, *zeros), (1000 - tp, *zeros))


def scripted_validation(monkeypatch, trainer: Trainer, ious: dict[int, float], *, run_model=True) -> None:
    """Validation of `trainer` reports `ious[epoch]` (after running the model, unless `run_model` is off)."""
    import dli.training.trainer

    real = dli.training.trainer.evaluate_model

    def evaluate(*args, **kwargs) -> Evaluation:
        if run_model:
            real(*args, **kwargs)
        return Evaluation(scores_with_iou(ious[trainer.progress.epoch]), 0.5)

    monkeypatch.setattr(dli.training.trainer, "evaluate_model", evaluate)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_png(path: Path, min_side: int = 200) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= min_side
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # drawn, not blank


def test_pictures_are_redrawn_at_improving_epochs_only(data, tmp_path, monkeypatch):
    trainer = Trainer(tiny(data, tmp_path / "run"))
    scripted_validation(monkeypatch, trainer, {1: 0.2, 2: 0.1, 3: 0.4, 4: 0.4})
    curves, grid = trainer.folder.curves, trainer.folder.predictions
    seen: list[tuple[str, str] | None] = []
    trainer.fit(lambda record: seen.append((digest(curves), digest(grid)) if curves.exists() else None))

    assert [r["epoch"] for r in trainer.progress.history] == [1, 2, 3, 4]
    first, second, third, fourth = seen
    assert first is not None and second == first  # epoch 2 is worse: nothing redrawn
    assert third is not None and third[0] != first[0] and third[1] != first[1]  # epoch 3 improves
    assert fourth == third  # equal is not better
    assert_png(curves)
    assert_png(grid)


def test_no_pictures_before_the_first_evaluation(data, tmp_path, monkeypatch):
    trainer = Trainer(tiny(data, tmp_path / "run", epochs=2, eval_every=2))
    scripted_validation(monkeypatch, trainer, {2: 0.3})
    exists_after: list[bool] = []
    trainer.fit(lambda record: exists_after.append(trainer.folder.curves.exists()))
    assert exists_after == [False, True]
    assert trainer.folder.predictions.is_file()


def test_dli_train_prints_where_the_pictures_are(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "32"]
    args += ["--image-size", "32", "--no-pretrained", "--no-progress", "--num-threads", "1"]
    assert main(args) == 0
    # The validation set has defects, so the one evaluation defines an IoU and is the best.
    assert f"pictures: {out / 'curves.png'}, {out / 'val_predictions.png'}" in capsys.readouterr().out
    assert_png(out / "curves.png")
    assert_png(out / "val_predictions.png")


@pytest.fixture(scope="module")
def trained_run(data, tmp_path_factory) -> Path:
    """A run folder after one training step."""
    run = tmp_path_factory.mktemp("trained") / "run"
    Trainer(tiny(data, run, epochs=1)).fit()
    return run


def test_eval_out_folder_gets_the_table_and_the_prediction_grid(trained_run, tmp_path, capsys):
    checkpoint = trained_run / "last.pt"
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(checkpoint), "--out", str(out), "--num-threads", "1"]) == 0
    assert f"written: {out / 'eval.csv'}, {out / 'predictions.png'}" in capsys.readouterr().out
    assert (out / "eval.csv").read_text().startswith("class,threshold,iou,f1")  # eval's CSV header
    assert_png(out / "predictions.png")
    # A CSV path still means the table alone.
    table = tmp_path / "table.csv"
    assert main(["eval", "--checkpoint", str(checkpoint), "--out", str(table), "--num-threads", "1"]) == 0
    assert table.is_file() and not (tmp_path / "predictions.png").exists()


def test_eval_out_that_is_a_file_is_a_one_line_error(trained_run, tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    assert main(["eval", "--checkpoint", str(trained_run / "last.pt"), "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dli eval: error: --out") and str(taken) in err and "\n" not in err
    assert taken.read_text() == "mine"


def test_examples_are_the_first_of_each_class_then_free(data):
    manifest = read_dataset(data)
    chosen = example_indices(manifest, per_class=2)
    classes = [manifest.samples[i].class_id for i in chosen]
    expected = [c for c in (*range(len(MT_CLASSES)), FREE) for _ in range(min(2, manifest.counts()[c]))]
    assert classes == expected
    for i in chosen:  # the first ones in manifest order
        same = [j for j, s in enumerate(manifest.samples) if s.class_id == manifest.samples[i].class_id]
        assert i in same[:2]


def test_overlays_use_the_preview_class_colours():
    image = np.full((8, 8), 0.5, dtype=np.float32)
    labels = np.zeros((len(MT_CLASSES), 8, 8), dtype=bool)
    labels[3, :2, :2] = True
    rgb = _overlay(image, labels)
    expected = (1 - OVERLAY_ALPHA) * 0.5 + OVERLAY_ALPHA * np.asarray(to_rgb(CLASS_COLOURS[3]))
    np.testing.assert_allclose(rgb[0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(rgb[7, 7], [0.5, 0.5, 0.5])


def test_renderers_handle_undefined_values_and_single_epochs():
    history = [{"epoch": 1, "lr": 1e-3, "train_loss": 0.9, "val_loss": math.nan, "iou": math.nan}]
    history[0] |= {f"iou/{n}": None for n in MT_CLASSES}
    assert render_curves(history, MT_CLASSES).startswith(b"\x89PNG")
    shape = (1, len(MT_CLASSES), 16, 16)
    empty = Predictions(np.zeros((1, 16, 16)), np.zeros(shape, bool), np.zeros(shape, bool), (FREE,))
    assert math.isnan(empty.image_iou(0))
    assert render_predictions(empty, MT_CLASSES).startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------------------
# --patience

# Best at epoch 2; epochs 3 (equal), 4 and 5 are not better.
IOUS = {1: 0.1, 2: 0.3, 3: 0.3, 4: 0.2, 5: 0.25, 6: 0.5, 7: 0.6, 8: 0.7}


class Interrupt(Exception):
    pass


@pytest.fixture
def no_figures(monkeypatch) -> None:
    """Patience does not depend on the pictures: skip drawing them (the tests above cover them)."""
    monkeypatch.setattr(Trainer, "_write_figures", lambda self: None)


def test_patience_stops_after_that_many_evaluations_without_improvement(
    data, tmp_path, monkeypatch, no_figures
):
    trainer = Trainer(tiny(data, tmp_path / "run", epochs=8, patience=2))
    scripted_validation(monkeypatch, trainer, IOUS, run_model=False)
    result = trainer.fit()
    assert result.epochs_completed == 4 and result.best_epoch == 2
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["patience"] == 2
    assert load_checkpoint(result.run_dir / "last.pt")["progress"]["evaluations_since_best"] == 2


def test_patience_counts_evaluations_not_epochs(data, tmp_path, monkeypatch, no_figures):
    trainer = Trainer(tiny(data, tmp_path / "run", epochs=8, eval_every=2, patience=1))
    scripted_validation(monkeypatch, trainer, IOUS, run_model=False)  # evaluated: 2 (best), 4 (worse) -> stop
    result = trainer.fit()
    assert result.epochs_completed == 4
    assert [r["epoch"] for r in result.history if "iou" in r] == [2, 4]


@pytest.mark.slow  # several CPU trainings in one test (a run, an interrupted one, its resume)
def test_the_count_survives_resume(data, tmp_path, monkeypatch, no_figures):
    out = tmp_path / "run"

    def stop_after_epoch_3(record):
        if record["epoch"] == 3:
            raise Interrupt

    killed = Trainer(tiny(data, out, epochs=8, patience=3))
    scripted_validation(monkeypatch, killed, IOUS, run_model=False)
    with pytest.raises(Interrupt):
        killed.fit(stop_after_epoch_3)
    assert load_checkpoint(out / "last.pt")["progress"]["evaluations_since_best"] == 1

    # Epochs 4 and 5 bring the count to 3: the resumed run stops at 5 (a fresh count would run to 6+).
    resumed = Trainer(tiny(data, out, epochs=8, patience=3, resume=True))
    scripted_validation(monkeypatch, resumed, IOUS, run_model=False)
    result = resumed.fit()
    assert result.epochs_completed == 5 and result.best_epoch == 2

    # Resuming a run that ran out of patience trains nothing more; a larger patience continues it.
    again = Trainer(tiny(data, out, epochs=8, patience=3, resume=True))
    assert again.fit().epochs_completed == 5
    longer = Trainer(tiny(data, out, epochs=8, patience=4, resume=True))
    scripted_validation(monkeypatch, longer, IOUS, run_model=False)
    result = longer.fit()
    assert result.epochs_completed == 8 and result.best_epoch == 8  # epoch 6 improves, then 7, 8


def test_patience_flag_is_checked(capsys):
    assert main(["train", "--patience", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dli train: error: --patience 0: must be an integer >= 1"


def test_classes_without_a_validation_image_are_named_in_a_warning(data, tmp_path):
    with pytest.warns(RuntimeWarning, match="no validation image of class") as caught:
        trainer = Trainer(tiny(data, tmp_path / "run"))
    unscored = trainer.datasets.val.empty_classes()
    assert unscored, "the fixture's 4 held-out defect images should leave some class out"
    message = next(str(w.message) for w in caught if "no validation image" in str(w.message))
    assert message.startswith(f"no validation image of class(es) {', '.join(unscored)}:")
