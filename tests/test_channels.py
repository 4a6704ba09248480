"""Colour end to end: reading, validation, the DALI path in 1 and 3 channels, injection in colour,
normalization statistics, checkpoints, and the target: hue-only defects are learnt in RGB, not in gray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dli.common.errors import DliError
from dli.data.imageio import LUMA, looks_gray, read_image
from dli.data.manifest import FREE, MT_CLASSES, read_dataset
from dli.data.validation import validate
from dli.models.checkpoint import ModelInfo
from dli.pipeline.loader import build_loader
from dli.pipeline.normalization import (
    IMAGENET_MEAN,
    MT_MEAN,
    MT_STD,
    channels_from_setting,
    fixed_normalization,
    measure_statistics,
    model_statistics,
    resolve_source,
)
from dli.pipeline.planner import DliConfig
from tests.colour_data import HUE_SHIFT, hue_dataset

SIZE = 48


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hue_dataset(tmp_path_factory.mktemp("colour") / "hue", defects=12, free=8, size=SIZE, seed=1)


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


# -- reading ------------------------------------------------------------------------------------------


def test_read_image_gray_rgb_and_luma(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")

    assert np.array_equal(read_image(tmp_path / "c.png", 3), rgb.astype(np.float32))
    expected = rgb.astype(np.float32) @ np.asarray(LUMA, np.float32)
    assert np.allclose(read_image(tmp_path / "c.png", 1)[..., 0], expected, atol=1e-4)
    assert np.array_equal(read_image(tmp_path / "g.png", 1)[..., 0], gray.astype(np.float32))
    assert np.array_equal(
        read_image(tmp_path / "g.png", 3), np.repeat(gray[..., None], 3, 2).astype(np.float32)
    )
    palette = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"), np.float32)
    assert np.array_equal(read_image(tmp_path / "p.png", 3), palette)
    with pytest.raises(DliError, match=r"image not found: .*none\.png"):
        read_image(tmp_path / "none.png", 3)
    with pytest.raises(DliError, match="channels 2"):
        read_image(tmp_path / "c.png", 2)


def test_looks_gray_and_the_channels_auto_rule(tmp_path: Path) -> None:
    gray = np.arange(30, dtype=np.uint8).reshape(5, 6)
    rgb_gray = np.repeat(gray[..., None], 3, axis=2)
    rgb_gray[0, 0, 0] += 2  # within the tolerance
    colour = rgb_gray.copy()
    colour[2, 3] = (200, 10, 10)
    assert looks_gray(Image.fromarray(gray))
    assert looks_gray(Image.fromarray(rgb_gray))
    assert not looks_gray(Image.fromarray(colour))
    assert channels_from_setting("auto", [True, True]) == 1
    assert channels_from_setting("auto", [True, False]) == 3
    assert channels_from_setting("3", [True]) == 3 and channels_from_setting(1, [False]) == 1
    with pytest.raises(DliError, match="--channels 2"):
        channels_from_setting("2", [])


def test_validation_says_which_images_look_gray(colour_data: Path, tmp_path: Path) -> None:
    report = validate(read_dataset(colour_data))
    manifest = read_dataset(colour_data)
    gray = {s.class_id: g for s, g in zip(manifest.samples, report.image_gray, strict=True)}
    assert gray[0] is False and gray[FREE] is True  # free images are gray noise stored in RGB
    assert validate(manifest, check_pixels=False).image_gray == (False,) * len(manifest)  # stored RGB


# -- the DALI path ------------------------------------------------------------------------------------


def _eval_batch(manifest, channels: int, mean, std) -> torch.Tensor:
    loader = build_loader(
        manifest,
        batch_size=len(manifest),
        image_size=SIZE,
        train=False,
        channels=channels,
        mean=mean,
        std=std,
    )
    try:
        return next(iter(loader)).images
    finally:
        loader.close()


def test_rgb_loader_keeps_colour_and_normalizes_per_channel(colour_data: Path) -> None:
    manifest = read_dataset(colour_data)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    images = _eval_batch(manifest, 3, mean, std)
    assert images.shape == (len(manifest), 3, SIZE, SIZE)
    pixels = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    expected = np.stack([_rgb(s.image).transpose(2, 0, 1) for s in manifest.samples]) / 255.0
    assert np.abs(pixels.numpy() - expected).max() < 1e-5  # native size: the resize is the identity


def test_gray_loader_of_colour_files_takes_their_luma(colour_data: Path) -> None:
    manifest = read_dataset(colour_data)
    images = _eval_batch(manifest, 1, (MT_MEAN,), (MT_STD,))
    assert images.shape == (len(manifest), 3, SIZE, SIZE)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    expected = np.stack([read_image(s.image, 1)[..., 0] for s in manifest.samples]) / 255.0
    assert np.abs((images[:, 0] * MT_STD + MT_MEAN).numpy() - expected).max() < 1e-5


@pytest.mark.parametrize("poisson_prob", [0.0, 1.0])
def test_injection_in_colour_carries_the_defect_hue(colour_data: Path, poisson_prob: float) -> None:
    manifest = read_dataset(colour_data)
    report = validate(manifest)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    loader = build_loader(
        manifest,
        batch_size=8,
        image_size=SIZE,
        train=True,
        dli=DliConfig(poisson_prob=poisson_prob),
        channels=3,
        mean=mean,
        std=std,
        source_boxes=report.mask_boxes,
    )
    try:
        injected = 0
        for batch in loader:
            assert batch.plan is not None
            rgb = batch.images * 0.25 + 0.5
            red_minus_green = (rgb[:, 0] - rgb[:, 1]).numpy()
            labels = batch.masks.numpy().max(axis=1) > 0
            for item in batch.plan.injections:
                injected += 1
                # The defect keeps its hue: R - G is +110 levels where the source defect is, about
                # 0 in the gray background (cut-paste copies it, Poisson blends its gradients).
                inside = red_minus_green[item.slot][labels[item.slot]]
                assert inside.mean() > 0.4 * (HUE_SHIFT[0] - HUE_SHIFT[1]) / 255
                assert np.abs(red_minus_green[item.slot][~labels[item.slot]]).mean() < 0.05
            assert float(rgb.min()) >= -1e-6 and float(rgb.max()) <= 1 + 1e-6  # clamped per channel
        assert injected > 0
    finally:
        loader.close()


# -- normalization --------------------------------------------------------------------------------------


def test_measured_statistics_are_the_training_images_own(colour_data: Path) -> None:
    manifest = read_dataset(colour_data)
    measured = measure_statistics(manifest, image_size=SIZE, channels=3, batch_size=5)
    pixels = np.stack([_rgb(s.image) for s in manifest.samples]).astype(np.float64) / 255.0
    assert measured.source == "dataset"
    assert np.allclose(measured.mean, pixels.mean(axis=(0, 1, 2)), atol=1e-6)
    assert np.allclose(measured.std, pixels.std(axis=(0, 1, 2)), atol=1e-6)
    gray = measure_statistics(manifest, image_size=SIZE, channels=1)
    lumas = np.stack([read_image(s.image, 1) for s in manifest.samples]).astype(np.float64) / 255.0
    assert gray.mean == (pytest.approx(lumas.mean(), abs=1e-6),) * 3


def test_normalization_sources() -> None:
    mt = fixed_normalization("magnetic-tile", 1)
    assert mt.mean == (MT_MEAN,) * 3 and mt.std == (MT_STD,) * 3
    assert fixed_normalization("imagenet", 3).mean == IMAGENET_MEAN
    assert len(set(fixed_normalization("imagenet", 1).mean)) == 1
    auto = {"channels": 1, "class_names": MT_CLASSES, "imagenet_weights": True}
    assert resolve_source("auto", **auto) == "magnetic-tile"  # MT keeps its numbers, pretrained or not
    assert resolve_source("auto", **{**auto, "channels": 3}) == "imagenet"
    assert (
        resolve_source("auto", **{**auto, "class_names": ("spot",), "imagenet_weights": False}) == "dataset"
    )
    assert resolve_source("dataset", **auto) == "dataset"
    with pytest.raises(DliError, match="--normalization mean"):
        resolve_source("mean", **auto)
    assert model_statistics([0.3], [0.1], 1) == ((0.3,) * 3, (0.1,) * 3)
    with pytest.raises(DliError, match="one value for all channels"):
        model_statistics([0.3, 0.4, 0.5], [0.1], 1)
    with pytest.raises(DliError, match="must be > 0"):
        model_statistics([0.3], [0.0], 3)


def test_checkpoints_without_channels_load_as_gray_magnetic_tile() -> None:
    old = {"encoder": "l-resnet18", "class_names": ["a"], "image_size": 64, "mean": [0.43], "std": [0.12]}
    info = ModelInfo.from_dict(old)
    assert info.channels == 1 and info.normalization == "magnetic-tile"
    assert info.mean == (0.43,) * 3 and info.std == (0.12,) * 3
    colour = ModelInfo(
        "l-resnet18", ("a",), 64, (0.4, 0.5, 0.6), (0.2, 0.2, 0.2), channels=3, normalization="dataset"
    )
    assert ModelInfo.from_dict(colour.to_dict()) == colour


# -- the target: hue is learnt in colour, not in gray -------------------------------------------------


@pytest.mark.slow
def test_hue_only_defects_are_learnt_in_colour_and_not_in_gray(tmp_path: Path) -> None:
    import yaml

    from dli.evaluate import evaluate_checkpoint
    from dli.models.checkpoint import load_checkpoint
    from dli.training.config import TrainConfig
    from dli.training.trainer import train

    data = hue_dataset(tmp_path / "hue", defects=32, free=8, size=SIZE, seed=0)
    settings = {
        "method": "bce",
        "pretrained": False,
        "epochs": 8,
        "eval_every": 2,
        "batch_size": 8,
        "lr": 4e-3,
    }
    results = {}
    for channels in ("auto", "1"):
        config = TrainConfig(
            data=str(data),
            channels=channels,
            image_size=SIZE,
            out=str(tmp_path / f"run-{channels}"),
            device="cpu",
            progress=False,
            **settings,
        )
        results[channels] = result = train(config)
        runtime = yaml.safe_load((result.run_dir / "config.yaml").read_text())["runtime"]
        info = load_checkpoint(result.run_dir / "best.pt")["model_info"]
        expected = 3 if channels == "auto" else 1
        assert runtime["channels"] == info["channels"] == expected
        assert runtime["normalization"]["source"] == info["normalization"] == "dataset"
        assert runtime["normalization"]["mean"] == list(info["mean"])
    assert results["auto"].best_iou > 0.5, results["auto"].history
    assert results["1"].best_iou < 0.2, results["1"].history
    # dli eval reads the channels and the statistics from the checkpoint: the same IoU as training.
    run = results["auto"].run_dir
    report = evaluate_checkpoint(run / "best.pt", device="cpu", predictions=tmp_path / "predictions.png")
    assert report.at_half.iou == pytest.approx(results["auto"].best_iou, abs=1e-3)
    grid = np.asarray(Image.open(tmp_path / "predictions.png").convert("RGB"), dtype=np.int16)
    assert np.abs(grid[..., 0] - grid[..., 1]).max() > 40  # the pictures are in colour


# -- predict and export in colour -----------------------------------------------------------------------


@pytest.mark.slow
def test_colour_model_predicts_the_same_on_torch_and_onnx(colour_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from dli.export import TOLERANCE, export_onnx
    from dli.inference.onnx_model import GRAY_FORMAT_VERSION, OnnxMetadata, OnnxModel
    from dli.models.checkpoint import save_checkpoint
    from dli.models.unet import build_model
    from dli.predict import CheckpointPredictor, predict_folder
    from dli.training.config import TrainConfig

    info = ModelInfo("l-resnet18", ("spot",), SIZE, (0.5, 0.45, 0.55), (0.1, 0.2, 0.3), channels=3)
    torch.manual_seed(0)
    model, _ = build_model(info.encoder, 1, pretrained=False)
    checkpoint = tmp_path / "best.pt"
    payload = {"model": model.state_dict(), "model_info": info.to_dict(), "config": TrainConfig().to_dict()}
    save_checkpoint(checkpoint, payload)
    exported = export_onnx(checkpoint, tmp_path / "model.onnx")
    assert exported.metadata.image_channels == 3 and exported.metadata.format_version == 2
    assert exported.metadata.mean == info.mean and exported.metadata.normalization == "magnetic-tile"

    images = tmp_path / "images"
    images.mkdir()
    spots = [s for s in read_dataset(colour_data).samples if s.class_id == 0]
    for n, sample in enumerate(spots[:3]):
        rgb = np.asarray(Image.open(sample.image).convert("RGB"))
        Image.fromarray(rgb[: SIZE - 7 * n, : SIZE + 5 * n] if n else rgb).save(images / f"i{n}.png")
    predictor, onnx = CheckpointPredictor(checkpoint, device="cpu"), OnnxModel(tmp_path / "model.onnx")
    from_gray = []
    for path in sorted(images.iterdir()):
        image = read_image(path, 3)
        (expected,) = predictor.probabilities([image])
        (actual,) = onnx.probabilities([image])
        assert expected.shape == (1, *image.shape[:2]) and np.abs(actual - expected).max() < TOLERANCE
        (gray,) = predictor.probabilities([np.repeat(read_image(path, 1), 3, axis=2)])
        from_gray.append(np.abs(gray - expected).max())
    assert max(from_gray) > 1e-3  # the colour reaches the model: the same image in gray differs
    written = predict_folder(None, images, tmp_path / "out", onnx=tmp_path / "model.onnx", device="cpu")
    overlay = np.asarray(Image.open(tmp_path / "out" / "i0_overlay.png"))
    assert len(written) == 6 and overlay.shape == (SIZE, SIZE, 3)
    assert np.abs(overlay[..., 0].astype(int) - overlay[..., 1]).max() > 40  # the overlay is in colour

    version_1 = {k: v for k, v in exported.metadata.to_props().items() if "channels" not in k}
    version_1 = {k: v for k, v in version_1.items() if not k.endswith("normalization")}
    version_1 = {**version_1, "dli.format_version": str(GRAY_FORMAT_VERSION), "dli.mean": "[0.4, 0.4, 0.4]"}
    version_1["dli.input_channels"] = "3"
    old = OnnxMetadata.from_props(version_1)
    assert old.image_channels == 1 and old.normalization == "magnetic-tile"


def test_a_resumed_run_keeps_its_channels_and_statistics() -> None:
    from types import SimpleNamespace

    from dli.training.components import image_settings_of

    info = ModelInfo(
        "l-resnet18", ("a",), 64, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), channels=3, normalization="dataset"
    )
    unused = SimpleNamespace()  # a resumed run reads neither the config, the data nor the device
    channels, normalization = image_settings_of(
        unused,  # type: ignore[arg-type]
        unused,  # type: ignore[arg-type]
        {"model_info": info.to_dict()},
        imagenet_weights=False,
        device=torch.device("cpu"),
        rank=0,
        world_size=1,
        batch_size=8,
        colour_files=True,
    )
    assert channels == 3 and normalization.source == "dataset"
    assert normalization.mean == info.mean and normalization.std == info.std
