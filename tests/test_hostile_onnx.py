"""Hostile use of exported models and of `dli predict`: metadata, resize mode, unreadable images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from dli.cli import main
from dli.common.errors import DliError
from dli.inference.onnx_model import OnnxMetadata, OnnxModel
from dli.inference.onnx_model import preprocess as onnx_preprocess

CLASSES = ("blowhole", "break", "crack", "fray", "uneven")


def metadata(**changes: object) -> OnnxMetadata:
    values = {
        "class_names": CLASSES,
        "input_channels": 3,
        "mean": (0.45, 0.45, 0.45),
        "std": (0.2, 0.2, 0.2),
        "image_size": 32,
        "input_stride": 8,
        "thresholds": (0.5,) * len(CLASSES),
        "threshold_rule": "0.5 (not calibrated)",
        "encoder": "l-resnet18",
        "precision": "float32",
        "opset": 17,
        "dli_version": "0",
        "dli_commit": "unknown",
    }
    return OnnxMetadata(**(values | changes))  # type: ignore[arg-type]


def tiny_onnx(path: Path, *, outputs: int = len(CLASSES), channels: int = 3, **props: object) -> Path:
    """A 1x1-convolution "model" with dli metadata (`props` override metadata entries as raw JSON)."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor(
        "w", TensorProto.FLOAT, (outputs, channels, 1, 1), rng.normal(size=outputs * channels).tolist()
    )
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", outputs, "H", "W"])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entries = metadata().to_props() | {f"dli.{key}": json.dumps(value) for key, value in props.items()}
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


def test_a_well_formed_tiny_export_loads(tmp_path):
    model = OnnxModel(tiny_onnx(tmp_path / "m.onnx"))
    assert model.metadata.resize == "linear" and model.class_names == CLASSES


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"outputs": 4}, "output classes 4"),
        ({"input_channels": 1, "mean": [0.5], "std": [0.2]}, "input channels 3"),
        ({"image_size": 0}, "image_size 0 is not in"),
        ({"image_size": -32}, "image_size -32 is not in"),
        ({"image_size": 30000}, "image_size 30000 is not in"),
        ({"thresholds": [0.5, 2.0, 0.5, 0.5, 0.5]}, "threshold(s) 2.0 not in (0, 1)"),
        ({"thresholds": [0.5, -1, 0.5, 0.5, 0.5]}, "not in (0, 1)"),
        ({"std": [0.2, 0.0, 0.2]}, "std > 0"),
        ({"resize": "cubic"}, "resize 'cubic'"),
        ({"class_names": ["a", "b", "../c", "d", "e"]}, "path separator"),
    ],
)
def test_bad_onnx_metadata_is_one_line_before_any_image_is_read(tmp_path, capsys, kwargs, message):
    path = tiny_onnx(tmp_path / "m.onnx", **kwargs)
    with pytest.raises(DliError, match=r"m\.onnx") as caught:
        OnnxModel(path)
    assert message in str(caught.value)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (40, 40)).save(images / "a.png")
    assert main(["predict", "--onnx", str(path), "--images", str(images), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("dli predict: error:") == 1 and "Traceback" not in err and message in err


def test_a_bad_device_on_the_onnx_path_is_not_wrapped_in_another_error(tmp_path):
    with pytest.raises(DliError) as caught:
        OnnxModel(tiny_onnx(tmp_path / "m.onnx"), device="tpu")
    assert str(caught.value) == "--device tpu: expected auto, cpu, cuda or cuda:N"


# ---------------------------------------------------------------------------------------------
# Resize mode (27.8).


@pytest.mark.parametrize("shape", [(90, 47), (20, 33), (32, 32)])
def test_onnx_preprocessing_follows_the_resize_mode_of_training(shape):
    import torch

    from dli.models.checkpoint import ModelInfo
    from dli.predict import preprocess as torch_preprocess

    gray = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    for resize in ("nearest", "linear"):
        info = ModelInfo("l-resnet18", CLASSES, 32, (0.45,) * 3, (0.2,) * 3, resize=resize)
        expected = torch_preprocess(gray, info).numpy()
        actual = onnx_preprocess(gray, metadata(resize=resize))
        tolerance = 0 if resize == "nearest" else 1e-5
        assert np.abs(actual - expected).max() <= tolerance, resize
    assert torch.is_tensor(torch_preprocess(gray, info))


def test_exports_written_before_the_resize_mode_read_as_linear(tmp_path):
    path = tiny_onnx(tmp_path / "old.onnx")
    model = onnx.load(path)
    kept = [p for p in model.metadata_props if p.key != "dli.resize"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, path)
    assert OnnxModel(path).metadata.resize == "linear"


# ---------------------------------------------------------------------------------------------
# Unreadable images (27.14).


def test_predict_writes_every_readable_image_and_names_each_unreadable_one(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)).save(images / f"good{index}.jpg")
    (images / "cut.jpg").write_bytes((images / "good0.jpg").read_bytes()[:300])
    (images / "zero.png").write_bytes(b"")
    out = tmp_path / "out"
    argv = [
        "predict",
        "--onnx",
        str(tiny_onnx(tmp_path / "m.onnx")),
        "--images",
        str(images),
        "--out",
        str(out),
    ]
    assert main([*argv, "--batch-size", "3"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("dli predict: error:")]
    assert len(errors) == 2 and "cut.jpg" in errors[0] and "zero.png" in errors[1]
    assert "Traceback" not in captured.err and captured.err.count("\r") == 0  # no bar on a redirected stream
    for index in range(5):
        assert (out / f"good{index}_overlay.png").is_file()
        assert all((out / f"good{index}_{name}.png").is_file() for name in CLASSES)
    assert not any(out.glob("cut_*")) and not any(out.glob("zero_*"))


@pytest.mark.slow
def test_the_export_parity_check_runs_both_preprocessings_and_catches_a_difference(tmp_path):
    import dataclasses

    import torch

    from dli.export import TOLERANCE, check_image_parity, export_onnx
    from dli.models.checkpoint import ModelInfo, load_checkpoint, save_checkpoint
    from dli.models.unet import build_model
    from dli.training.config import TrainConfig

    torch.manual_seed(0)
    info = ModelInfo("l-resnet18", CLASSES, 32, (0.45,) * 3, (0.2,) * 3, resize="nearest")
    model, _ = build_model(info.encoder, len(CLASSES), pretrained=False)
    checkpoint = tmp_path / "best.pt"
    payload = {"model": model.state_dict(), "model_info": info.to_dict(), "config": TrainConfig().to_dict()}
    save_checkpoint(checkpoint, payload)
    result = export_onnx(checkpoint, tmp_path / "m.onnx")
    assert result.metadata.resize == "nearest"
    images = [c for c in result.checks if c.what == "image"]
    assert len(images) == 2 and all(c.max_difference <= TOLERANCE for c in images)

    # The same export read as if it resized bilinearly (what onnx_model did before the resize
    # mode was in the metadata): the image check sees the difference, the random batches do not.
    exported = OnnxModel(tmp_path / "m.onnx")
    exported.metadata = dataclasses.replace(exported.metadata, resize="linear")
    worst = max(c.max_difference for c in check_image_parity(load_checkpoint(checkpoint), exported))
    assert worst > TOLERANCE
