"""Hostile use of the model commands: class names, outputs over inputs, read-only files, checksums.

Each test pins one refusal: the command ends in one `dli <cmd>: error:` line and exit status 2,
and nothing outside `--out`, nor any input, is written or replaced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dli.checkpoint import ModelInfo, load_checkpoint, save_checkpoint
from dli.class_names import check_class_names, output_name
from dli.cli import main
from dli.config import TrainConfig
from dli.errors import DliError
from dli.models.thresholds import CHECKPOINT_KEY, Thresholds
from dli.models.unet import build_model
from dli.onnx_model import OnnxMetadata
from dli.pipeline.manifest import read_dataset

CLASSES = ("blowhole", "break", "crack", "fray", "uneven")
INFO = ModelInfo("l-resnet18", CLASSES, 64, (0.45, 0.45, 0.45), (0.2, 0.2, 0.2))


def write_checkpoint(
    path: Path, *, info: ModelInfo = INFO, thresholds: tuple[float, ...] | None = None
) -> Path:
    """A dli checkpoint of a randomly initialised model (what eval/predict/export need, no training)."""
    torch.manual_seed(0)
    model, _ = build_model(info.encoder, len(info.class_names), pretrained=False)
    payload = {"model": model.state_dict(), "model_info": info.to_dict(), "config": TrainConfig().to_dict()}
    if thresholds is not None:
        n = len(info.class_names)
        state = Thresholds(info.class_names, thresholds, "max-f1", (True,) * n, (True,) * n).to_state()
        payload[CHECKPOINT_KEY] = state
    save_checkpoint(path, payload)
    return path


def error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    lines = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith(f"dli {command}: error:")
    ]
    assert len(lines) == 1, lines
    return lines[0]


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (48, 72), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


# ---------------------------------------------------------------------------------------------
# Class names (27.1).


@pytest.mark.parametrize(
    "names",
    [
        ("../../some/where/x",),
        ("a/b",),
        ("a\\b",),
        ("..",),
        ("x..y",),
        ("bad\x00name",),
        ("line\nbreak",),
        ("",),
        (" padded",),
        ("crack", "Crack"),
        ("crack", "crack"),
        ("x" * 101,),
    ],
)
def test_inadmissible_class_names_are_refused_naming_their_origin(names):
    with pytest.raises(DliError, match=r"class name.* in somewhere"):
        check_class_names(names, "somewhere")


def test_admissible_class_names_pass_unchanged():
    assert check_class_names(["crack", "Blow hole", "fray-2", "ünëven"], "x") == (
        "crack",
        "Blow hole",
        "fray-2",
        "ünëven",
    )


def test_output_names_never_leave_their_folder(tmp_path):
    assert output_name(tmp_path, "img", "crack") == tmp_path / "img_crack.png"
    with pytest.raises(DliError, match="refusing"):
        output_name(tmp_path, "img", "../../x")


def test_a_csv_dataset_with_a_traversing_class_name_is_refused(tmp_path):
    image, mask = tmp_path / "a.png", tmp_path / "a_mask.png"
    Image.new("L", (8, 8)).save(image)
    Image.new("L", (8, 8)).save(mask)
    csv = tmp_path / "data.csv"
    csv.write_text(f"image,mask,class\n{image},{mask},../../some/where/x\n")
    with pytest.raises(DliError, match=r"invalid class name in the classes of .*data\.csv.*path separator"):
        read_dataset(csv)


def test_a_classes_txt_with_case_duplicates_is_refused(tmp_path):
    (tmp_path / "classes.txt").write_text("crack\nCRACK\n")
    (tmp_path / "data.csv").write_text("image,mask,class\na.png,,free\n")
    with pytest.raises(DliError, match="listed twice"):
        read_dataset(tmp_path / "data.csv")


@pytest.mark.parametrize("bad", ["../../escaped/x", "crack"])  # "crack" twice: a duplicate
def test_predict_refuses_a_checkpoint_whose_class_names_escape_or_repeat(tmp_path, images, capsys, bad):
    info = ModelInfo(INFO.encoder, ("crack", bad, "fray"), 64, INFO.mean, INFO.std)
    checkpoint = write_checkpoint(tmp_path / "ckpt" / "best.pt", info=info)
    before = files_under(tmp_path)
    out = tmp_path / "deep" / "er" / "out"
    argv = ["predict", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out)]
    assert main([*argv, "--device", "cpu"]) == 2
    assert "class name" in error_line(capsys, "predict")
    assert files_under(tmp_path) == before


def onnx_props(**changes: object) -> dict[str, str]:
    metadata = OnnxMetadata(
        class_names=CLASSES,
        input_channels=3,
        mean=INFO.mean,
        std=INFO.std,
        image_size=64,
        input_stride=8,
        thresholds=(0.5,) * 5,
        threshold_rule="0.5 (not calibrated)",
        encoder=INFO.encoder,
        precision="float32",
        opset=18,
        dli_version="0",
        dli_commit="unknown",
    )
    props = metadata.to_props()
    props.update({f"dli.{key}": json.dumps(value) for key, value in changes.items()})
    return props


def test_onnx_metadata_with_escaping_or_repeated_class_names_is_refused():
    OnnxMetadata.from_props(onnx_props())  # the untouched metadata reads
    for names in (["../../x", "b", "c", "d", "e"], ["a", "a", "c", "d", "e"], "abcde"):
        with pytest.raises(DliError, match="class name"):
            OnnxMetadata.from_props(onnx_props(class_names=names), "m.onnx")


def test_a_checkpoint_with_an_escaping_class_name_is_refused_on_load(tmp_path):
    from dli.checkpoint import model_from_checkpoint

    info = ModelInfo(INFO.encoder, ("a", "b/../../c"), 64, INFO.mean, INFO.std)
    path = write_checkpoint(tmp_path / "best.pt", info=info)
    with pytest.raises(DliError, match="path separator"):
        model_from_checkpoint(path)
    assert os.path.exists(path) and load_checkpoint(path)["model_info"]["class_names"][1] == "b/../../c"
