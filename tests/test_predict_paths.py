"""`dli predict` against independent paths, under each protocol's resize (CPU, 64 px, no training).

- `predict --checkpoint` against the evaluator: `dli eval` decodes, resizes and normalizes with
  DALI and runs the model on whole batches; its probabilities, recorded as it scores them, must
  give predict's masks for the same images at the training size.
- predict's preprocessing (torch) against the DALI loader's input tensor for images of another
  size: the same pixels under ``nearest``, within a small resampling difference under ``linear``.
- `predict --onnx` against `predict --checkpoint` for every protocol's model.

Images and masks are PNG, so both paths decode the same pixels. Masks may differ only where a
probability lies within `PARITY` of its class threshold.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dli import evaluate
from dli.cli import main
from dli.data.manifest import read_dataset
from dli.inference.onnx_model import OnnxMetadata
from dli.models.checkpoint import ModelInfo, save_checkpoint
from dli.models.thresholds import CHECKPOINT_KEY, Thresholds
from dli.models.unet import build_model
from dli.pipeline.loader import MT_MEAN, MT_STD
from dli.predict import CheckpointPredictor, preprocess
from dli.training.config import PROTOCOL_DEFAULTS, TrainConfig

CLASSES = ("blowhole", "break", "crack", "fray", "uneven")
THRESHOLDS = (0.3, 0.45, 0.5, 0.55, 0.7)
SIZE = 64
PARITY = 1e-4
PROTOCOLS = sorted(PROTOCOL_DEFAULTS)


def make_checkpoint(path: Path, protocol: str) -> Path:
    """A randomly initialised model built as `protocol` builds it (decoder, resize), with thresholds.

    Its normalization is the loader's, as training records it (the evaluator's DALI loader
    normalizes with those constants, not with the checkpoint's `model_info`)."""
    settings = PROTOCOL_DEFAULTS[protocol]
    info = ModelInfo(
        "l-resnet18",
        CLASSES,
        SIZE,
        (MT_MEAN,) * 3,
        (MT_STD,) * 3,
        settings["decoder_convs"],
        settings["resize"],
    )
    torch.manual_seed(0)
    model, _ = build_model(info.encoder, len(CLASSES), pretrained=False, decoder_convs=info.decoder_convs)
    with torch.no_grad():  # BatchNorm statistics away from (0, 1): eval mode differs from train mode
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    n = len(CLASSES)
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "model_info": info.to_dict(),
            "config": TrainConfig(protocol=protocol).to_dict(),
            CHECKPOINT_KEY: Thresholds(CLASSES, THRESHOLDS, "max-f1", (True,) * n, (True,) * n).to_state(),
        },
    )
    return path


def make_dataset(root: Path, side: int) -> Path:
    """A CSV dataset of 6 PNG images of `side` x `side` (one per class and one defect-free)."""
    rng = np.random.default_rng(side)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["image,mask,class"]
    yy, xx = np.mgrid[:side, :side]
    for k, name in enumerate((*CLASSES, "free")):
        gray = 90 + 60 * np.sin(xx / (3 + k)) * np.cos(yy / 5) + rng.normal(0, 12, (side, side))
        Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).save(root / "images" / f"{name}.png")
        if name == "free":
            rows.append(f"images/{name}.png,,free")
            continue
        mask = ((yy - side / 2) ** 2 + (xx - side / 3) ** 2 < (side / 6) ** 2).astype(np.uint8) * 255
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
        rows.append(f"images/{name}.png,masks/{name}.png,{name}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root / "data.csv"


@pytest.fixture(scope="module", params=PROTOCOLS)
def checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    protocol = request.param
    return protocol, make_checkpoint(tmp_path_factory.mktemp(protocol) / "best.pt", protocol)


@pytest.fixture(scope="module")
def same_size(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("same-size"), SIZE)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


def evaluator_probabilities(checkpoint: Path, csv: Path, monkeypatch) -> dict[str, np.ndarray]:
    """What `dli eval --split all` computes for each image: its (classes, S, S) probabilities."""
    recorded: list[np.ndarray] = []

    class Recording(evaluate.ImageDecisionCounter):
        def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
            recorded.extend(torch.sigmoid(logits.float()).numpy())
            super().update(logits, targets)

    monkeypatch.setattr(evaluate, "ImageDecisionCounter", Recording)
    evaluate.evaluate_checkpoint(checkpoint, data=str(csv), split="all", device="cpu", batch_size=4)
    manifest = read_dataset(csv)
    assert len(recorded) == len(manifest)
    return {s.image.name: p for s, p in zip(manifest.samples, recorded, strict=True)}


@pytest.mark.slow
def test_predict_checkpoint_masks_are_the_evaluators_dali_predictions(
    checkpoint, same_size, tmp_path, monkeypatch
):
    protocol, path = checkpoint
    expected = evaluator_probabilities(path, same_size, monkeypatch)
    out = tmp_path / "masks"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["predict", "--checkpoint", str(path), "--images", str(same_size.parent / "images"),
                     "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    predictor = CheckpointPredictor(path, device="cpu")
    assert predictor.info.resize == PROTOCOL_DEFAULTS[protocol]["resize"]
    positive = 0
    for name, probabilities in expected.items():
        gray = read_png(same_size.parent / "images" / name)
        (ours,) = predictor.probabilities([gray])
        assert np.abs(ours - probabilities).max() < PARITY, name
        for c, (cls, threshold) in enumerate(zip(CLASSES, THRESHOLDS, strict=True)):
            mask = read_png(out / f"{Path(name).stem}_{cls}.png")
            assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
            near = np.abs(probabilities[c] - threshold) < PARITY
            assert np.array_equal((mask > 0)[~near], (probabilities[c] > threshold)[~near]), (name, cls)
            positive += int((mask > 0).sum())
    assert 0 < positive < len(expected) * len(CLASSES) * SIZE * SIZE  # the thresholds cut somewhere


@pytest.mark.parametrize("side", [96, 40])
def test_predict_preprocessing_is_the_dali_loaders_input(checkpoint, tmp_path, side):
    """Down (96 -> 64) and up (40 -> 64): nearest picks the same pixels; linear resamples alike."""
    from dli.pipeline.loader import build_loader

    _, path = checkpoint
    info = CheckpointPredictor(path, device="cpu").info
    manifest = read_dataset(make_dataset(tmp_path, side))
    loader = build_loader(
        manifest, batch_size=6, image_size=SIZE, train=False, device="cpu", resize=info.resize
    )
    try:
        (batch,) = list(loader)
    finally:
        loader.close()
    ours = torch.stack([preprocess(read_png(s.image), info) for s in manifest.samples])
    difference = (ours - batch.images.float()).abs() * info.std[0] * 255  # in 8-bit grey levels
    if info.resize == "nearest":
        assert difference.max() < 1e-3  # the same source pixel for every output pixel
    else:
        # DALI's and torch's antialiased filters differ by rounding here (measured 96 -> 64 on
        # these noisy images: max 2.95, mean 0.026 levels); torch without antialias is 14.5 / 2.6.
        assert difference.max() < 4 and difference.mean() < 0.1


@pytest.mark.slow
def test_predict_onnx_masks_are_the_checkpoints(checkpoint, same_size, tmp_path):
    protocol, path = checkpoint
    if (
        PROTOCOL_DEFAULTS[protocol]["resize"] != "linear"
        and "resize" not in OnnxMetadata.__dataclass_fields__
    ):
        pytest.xfail("the ONNX export does not record the resize mode yet: --onnx resizes bilinear only")
    exported = tmp_path / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "--checkpoint", str(path), "--out", str(exported)]) == 0
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for k, (height, width) in enumerate(((100, 130), (40, 50), (SIZE, SIZE), (257, 190))):
        gray = (rng.random((height, width)) * 60 + np.linspace(0, 180, width)).astype(np.uint8)
        Image.fromarray(gray).save(images / f"image{k}.png")
    by_torch, by_onnx = tmp_path / "torch", tmp_path / "onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["predict", "--checkpoint", str(path), "--images", str(images), "--out", str(by_torch),
                     "--device", "cpu"]) == 0  # fmt: skip
        assert main(["predict", "--onnx", str(exported), "--images", str(images), "--out", str(by_onnx)]) == 0
    predictor = CheckpointPredictor(path, device="cpu")
    for source in sorted(images.iterdir()):
        (probabilities,) = predictor.probabilities([read_png(source)])
        for c, (cls, threshold) in enumerate(zip(CLASSES, THRESHOLDS, strict=True)):
            a = read_png(by_torch / f"{source.stem}_{cls}.png")
            b = read_png(by_onnx / f"{source.stem}_{cls}.png")
            near = np.abs(probabilities[c] - threshold) < PARITY
            assert np.array_equal(a[~near], b[~near]), (protocol, source.name, cls)


def test_preprocessing_a_read_only_decoded_image_does_not_warn(checkpoint):
    import warnings

    info = CheckpointPredictor(checkpoint[1], device="cpu").info
    image = np.full((40, 30), 120, np.uint8)
    image.flags.writeable = False  # as an array viewing a decoded PIL image is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = preprocess(image, info)
    assert tensor.shape[0] == 3 and bool(torch.isfinite(tensor).all())
