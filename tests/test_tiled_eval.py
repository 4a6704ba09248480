"""`dli eval` of a model that predicts by tiles: scored at native resolution (CPU).

A tiny fully convolutional network stands in for the UNet (`build_model` patched), so the test
is about what is counted: every pixel of every original mask, at its own size.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

import dli.training.trainer  # noqa: F401 - binds the real build_model before tests patch the module
from dli.cli import main
from dli.data.imageio import read_mask
from dli.data.manifest import MT_CLASSES, read_dataset
from dli.data.synth import generate
from dli.models.checkpoint import ModelInfo, save_checkpoint
from dli.pipeline.tiling import Tiling
from dli.training.config import TrainConfig


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, len(MT_CLASSES), 3, padding=1)
    ).eval()


@pytest.fixture
def tiled_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr("dli.models.unet.build_model", lambda *args, **kwargs: (conv_net(), None))
    data = tmp_path / "synth"
    generate(data, images=12, seed=3, size_range=((60, 200), (90, 300)))
    info = ModelInfo("l-resnet18", MT_CLASSES, 64, (0.45,) * 3, (0.2,) * 3, tiling=Tiling(64, overlap=0.25))
    config = TrainConfig(data=str(data), image_size=64).to_dict()
    checkpoint = tmp_path / "best.pt"
    save_checkpoint(
        checkpoint, {"model": conv_net().state_dict(), "model_info": info.to_dict(), "config": config}
    )
    return data, checkpoint


def test_eval_by_tiles_counts_every_pixel_of_the_original_masks(tiled_checkpoint, tmp_path, capsys):
    data, checkpoint = tiled_checkpoint
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(checkpoint), "--split", "all", "--out", str(out)]) == 0
    with (out / "eval.csv").open(newline="") as handle:
        rows = {row["class"]: row for row in csv.DictReader(handle)}
    expected = dict.fromkeys(MT_CLASSES, 0)
    for sample in read_dataset(data).samples:
        if sample.mask is not None and sample.class_id >= 0:
            expected[MT_CLASSES[sample.class_id]] += int(read_mask(sample.mask).sum())
    assert sum(expected.values()) > 0
    for name in MT_CLASSES:
        assert int(rows[name]["tp"]) + int(rows[name]["fn"]) == expected[name]
    assert (out / "predictions.png").stat().st_size > 0
    sizes = {np.asarray(read_mask(s.mask)).shape for s in read_dataset(data).samples if s.mask is not None}
    assert len(sizes) > 1  # images of several native sizes were scored as they are


def test_eval_bad_overlap_is_one_line(tiled_checkpoint, capsys):
    _, checkpoint = tiled_checkpoint
    assert main(["eval", "--checkpoint", str(checkpoint), "--split", "all", "--overlap", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--overlap 1.5: must be in [0, 0.9]" in err and "\n" not in err
