"""`--aspect fit`: aspect ratio kept, longer side at the training size, padded (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dli.cli import main
from dli.inference.onnx_model import OnnxMetadata, preprocess, resized_size, valid_region
from dli.models.checkpoint import ModelInfo
from dli.predict import preprocess as torch_preprocess

CLASSES = ("a", "b")


def test_fit_keeps_the_aspect_ratio_and_pads_with_the_mean():
    assert resized_size((460, 1130), 64, "fit") == (26, 64)
    assert resized_size((460, 1130), 64, "stretch") == (64, 64)
    gray = np.random.default_rng(0).integers(0, 256, (460, 1130), dtype=np.uint8)
    info = ModelInfo("l-resnet18", CLASSES, 64, (0.45,) * 3, (0.2,) * 3, aspect="fit")
    metadata = OnnxMetadata(
        CLASSES,
        3,
        info.mean,
        info.std,
        64,
        8,
        (0.5, 0.5),
        "default",
        "x",
        "float32",
        18,
        "",
        "",
        aspect="fit",
    )
    by_numpy = preprocess(gray, metadata)
    by_torch = torch_preprocess(gray, info).numpy()
    assert by_numpy.shape == by_torch.shape == (3, 64, 64)
    assert np.abs(by_numpy - by_torch).max() < 1e-4
    assert (by_numpy[:, 26:] == 0).all() and (by_numpy[:, :26] != 0).any()
    logits = np.arange(2 * 64 * 64, dtype=np.float32).reshape(2, 64, 64)
    assert valid_region(logits, gray.shape, 64, "fit").shape == (2, 26, 64)


def test_the_loader_fits_and_pads_image_and_mask(tmp_path):
    from PIL import Image

    from dli.data.manifest import Manifest, Sample
    from dli.pipeline.loader import build_loader

    image, mask = tmp_path / "wide.png", tmp_path / "wide_mask.png"
    Image.fromarray(np.full((40, 160), 200, np.uint8)).save(image)
    Image.fromarray(np.full((40, 160), 255, np.uint8)).save(mask)
    manifest = Manifest((Sample(image, mask, 0),), CLASSES, tmp_path)
    loader = build_loader(manifest, batch_size=1, image_size=64, train=False, fit=True, num_threads=1)
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    assert batch.images.shape == (1, 3, 64, 64)
    labels = batch.masks[0, 0]
    assert labels[:16].all() and not labels[16:].any()  # 40 x 160 -> 16 x 64, then padding
    assert torch.allclose(batch.images[0, 0, 16:], torch.zeros(48, 64), atol=1e-5)  # the mean intensity


def test_aspect_fit_with_crop_is_refused(tmp_path, capsys):
    argv = ["train", "--out", str(tmp_path / "run"), "--crop", "64", "--aspect", "fit"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--aspect fit: applies to whole-image training" in err and "\n" not in err


@pytest.mark.parametrize("aspect", ["stretch", "fit"])
def test_metadata_records_the_aspect(aspect):
    metadata = OnnxMetadata(
        CLASSES, 3, (0.4,) * 3, (0.2,) * 3, 64, 8, (0.5, 0.5), "d", "x", "float32", 18, "", "", aspect=aspect
    )
    assert OnnxMetadata.from_props(metadata.to_props()).aspect == aspect
