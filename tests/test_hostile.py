"""Hostile use of the model commands: class names, outputs over inputs, read-only files, checksums.

Each test pins one refusal: the command ends in one `dli <cmd>: error:` line and exit status 2,
and nothing outside `--out`, nor any input, is written or replaced.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dli.cli import main
from dli.common.errors import DliError
from dli.data.class_names import check_class_names, output_name
from dli.data.manifest import read_dataset
from dli.inference.onnx_model import OnnxMetadata
from dli.models.checkpoint import ModelInfo, load_checkpoint, save_checkpoint
from dli.models.thresholds import CHECKPOINT_KEY, Thresholds
from dli.models.unet import build_model
from dli.training.config import TrainConfig

CLASSES = ("blowhole", "break", "crack", "fray", "uneven")
INFO = ModelInfo("l-resnet18", CLASSES, 64, (0.45, 0.45, 0.45), (0.2, 0.2, 0.2))


@functools.cache
def random_weights(classes: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(INFO.encoder, classes, pretrained=False)[0].state_dict()


def write_checkpoint(
    path: Path, *, info: ModelInfo = INFO, thresholds: tuple[float, ...] | None = None
) -> Path:
    """A dli checkpoint of a randomly initialised model (what eval/predict/export need, no training)."""
    payload = {"model": random_weights(len(info.class_names)), "model_info": info.to_dict()}
    payload["config"] = TrainConfig().to_dict()
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
    from dli.models.checkpoint import model_from_checkpoint

    info = ModelInfo(INFO.encoder, ("a", "b/../../c"), 64, INFO.mean, INFO.std)
    path = write_checkpoint(tmp_path / "best.pt", info=info)
    with pytest.raises(DliError, match="path separator"):
        model_from_checkpoint(path)
    assert os.path.exists(path) and load_checkpoint(path)["model_info"]["class_names"][1] == "b/../../c"


# ---------------------------------------------------------------------------------------------
# Calibration: the run folder's lock, read-only checkpoints, thresholds it cannot calibrate (27.2, 5, 9).


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dli.data.synth import generate

    root = tmp_path_factory.mktemp("hostile") / "synth"
    generate(root, images=20, seed=4, size_range=((48, 64), (48, 64)))
    return root


def trained_like(folder: Path, data: Path, thresholds: tuple[float, ...] | None = None) -> Path:
    """A run folder's best.pt (random weights) whose config points at `data`, as eval reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = write_checkpoint(folder / "best.pt", thresholds=thresholds)
    document = load_checkpoint(checkpoint)
    save_checkpoint(checkpoint, {**document, "config": TrainConfig(data=str(data), image_size=64).to_dict()})
    return checkpoint


def calibrate(checkpoint: Path, *extra: str) -> int:
    argv = ["eval", "--checkpoint", str(checkpoint), "--calibrate", "--split", "all", "--num-threads", "1"]
    return main([*argv, "--device", "cpu", "--out", str(checkpoint.parent / "eval.csv"), *extra])


def test_calibration_refuses_a_run_folder_that_a_training_holds(tmp_path, dataset, capsys):
    from dli.common.lock import FolderLock

    checkpoint = trained_like(tmp_path / "run", dataset)
    before = checkpoint.read_bytes()
    with FolderLock(checkpoint.parent, "run folder"):  # what `dli train` holds while it runs
        assert calibrate(checkpoint) == 2
    line = error_line(capsys, "eval")
    assert "in use by another dli process" in line and f"pid {os.getpid()}" in line
    assert checkpoint.read_bytes() == before


def test_calibration_never_replaces_a_read_only_checkpoint(tmp_path, dataset, capsys):
    checkpoint = trained_like(tmp_path / "run", dataset)
    before = checkpoint.read_bytes()
    checkpoint.chmod(0o444)
    assert calibrate(checkpoint) == 2
    assert "read-only" in error_line(capsys, "eval")
    assert checkpoint.read_bytes() == before and (checkpoint.stat().st_mode & 0o777) == 0o444


@pytest.mark.slow
def test_calibration_keeps_the_threshold_of_a_class_it_has_nothing_to_calibrate_on(tmp_path, dataset, capsys):
    from dli.data.csv_manifest import write_csv
    from dli.data.manifest import FREE

    manifest = read_dataset(dataset)
    crack = manifest.class_names.index("crack")
    no_crack = manifest.subset(i for i, s in enumerate(manifest.samples) if s.class_id in (FREE, 0))
    assert crack not in no_crack.class_ids() and len(no_crack) > 0
    csv = tmp_path / "no_crack" / "data.csv"
    write_csv(no_crack, csv)
    stored = (0.5, 0.5, 0.308, 0.5, 0.5)
    checkpoint = trained_like(tmp_path / "run", dataset, thresholds=stored)
    assert calibrate(checkpoint, "--data", str(csv)) == 0
    out = capsys.readouterr().out
    thresholds = load_checkpoint(checkpoint)["thresholds"]
    assert thresholds["values"][crack] == 0.308 and thresholds["calibrated"][crack]
    assert "nothing to calibrate" in out and "crack" in out.split("nothing to calibrate")[1].splitlines()[0]


# ---------------------------------------------------------------------------------------------
# Export over its own input (27.3).


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_export_refuses_an_output_that_is_its_checkpoint(tmp_path, capsys, how):
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    before = checkpoint.read_bytes()
    out = tmp_path / "model.onnx"
    if how == "same":
        out = checkpoint
    elif how == "symlink":
        out.symlink_to(checkpoint)
    else:
        os.link(checkpoint, out)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "is the input" in error_line(capsys, "export")
    assert checkpoint.read_bytes() == before


def test_export_without_out_names_the_default_output_not_the_flag(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    (tmp_path / "best.onnx").write_bytes(b"old")
    (tmp_path / "best.onnx").chmod(0o444)
    assert main(["export", "--checkpoint", str(checkpoint)]) == 2
    line = error_line(capsys, "export")
    assert "--out" not in line and "best.onnx" in line and "not writable" in line


@pytest.mark.parametrize(
    ("sizes", "message"),
    [(["100000", "100000"], "at most 4096 per side"), (["64", "60"], "multiples of 8")],
)
def test_export_check_sizes_out_of_range_are_refused_before_any_work(tmp_path, capsys, sizes, message):
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    assert main(["export", "--checkpoint", str(checkpoint), "--check-sizes", *sizes]) == 2
    assert message in error_line(capsys, "export")
    assert not (tmp_path / "best.onnx").exists()


# ---------------------------------------------------------------------------------------------
# Checkpoint integrity (27.11, 12, 13).


def rewrite_raw(path: Path, change) -> None:
    """Change a loaded checkpoint document and write it back as is (checksums untouched)."""
    document = torch.load(path, weights_only=True)
    change(document)
    torch.save(document, path)


def test_a_flipped_bit_outside_the_weights_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "best.pt")
    load_checkpoint(path)  # intact: reads

    def flip(document):
        mean = list(document["model_info"]["mean"])
        bits = np.array([mean[0]], np.float64).view(np.uint64) ^ np.uint64(1 << 40)
        document["model_info"]["mean"] = (float(bits.view(np.float64)[0]), *mean[1:])

    rewrite_raw(path, flip)
    with pytest.raises(DliError, match="corrupt: its contents do not match their checksum"):
        load_checkpoint(path)


def test_zeroed_optimizer_state_in_last_pt_is_refused(tmp_path):
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 64)).sum().backward()
    optimizer.step()
    payload = {
        "model": model.state_dict(),
        "model_info": INFO.to_dict(),
        "config": TrainConfig().to_dict(),
        "optimizer": optimizer.state_dict(),
    }
    path = tmp_path / "last.pt"
    save_checkpoint(path, payload)
    load_checkpoint(path)
    rewrite_raw(path, lambda d: d["optimizer"]["state"][0]["exp_avg_sq"].zero_())
    with pytest.raises(DliError, match="corrupt"):
        load_checkpoint(path)


def test_a_checkpoint_rewritten_from_an_older_one_gets_the_full_checksum(tmp_path):
    path = write_checkpoint(tmp_path / "best.pt")
    document = load_checkpoint(path)
    document["version"] = 1
    save_checkpoint(path, document)  # as calibration does with what it read
    assert load_checkpoint(path)["version"] == 2
    rewrite_raw(path, lambda d: d["config"].update(lr=1.0))
    with pytest.raises(DliError, match="corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("bad", [2.0, -1.0, float("nan"), 0.0, 1.0])
def test_thresholds_out_of_range_in_a_checkpoint_are_refused_by_predict(tmp_path, images, capsys, bad):
    path = write_checkpoint(tmp_path / "best.pt", thresholds=(0.5, bad, 0.5, 0.5, 0.5))
    out = tmp_path / "out"
    argv = [
        "predict",
        "--checkpoint",
        str(path),
        "--images",
        str(images),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(argv) == 2
    assert "not in (0, 1)" in error_line(capsys, "predict")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_size": 30000}, "image_size 30000"),
        ({"image_size": 0}, "image_size 0"),
        ({"std": [0.0, 0.0, 0.0]}, "std [0.0, 0.0, 0.0]"),
        ({"resize": "cubic"}, "resize 'cubic'"),
    ],
)
def test_model_info_out_of_range_is_one_line(tmp_path, images, capsys, change, message):
    path = write_checkpoint(tmp_path / "best.pt", info=ModelInfo(**(INFO.to_dict() | change)))
    argv = ["predict", "--checkpoint", str(path), "--images", str(images), "--out", str(tmp_path / "o")]
    assert main([*argv, "--device", "cpu"]) == 2
    assert message in error_line(capsys, "predict")


def test_random_text_files_as_a_checkpoint_are_one_line(tmp_path):
    rng = np.random.default_rng(0)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789,;:.-_ \n\"'{}[]()PK\x80"))
    for index in range(60):
        path = tmp_path / f"text{index}.pt"
        path.write_text("".join(rng.choice(alphabet, size=int(rng.integers(1, 400)))), encoding="latin-1")
        with pytest.raises(DliError, match=r"cannot read checkpoint|not a dli checkpoint"):
            load_checkpoint(path)


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("device", ["tpu", "meta", "mps", "cuda:x"])
def test_eval_and_predict_validate_device(tmp_path, images, capsys, command, device):
    path = write_checkpoint(tmp_path / "best.pt")
    argv = [command, "--checkpoint", str(path), "--device", device]
    argv += ["--images", str(images), "--out", str(tmp_path / "o")] if command == "predict" else []
    assert main(argv) == 2
    assert f"--device {device}: expected auto, cpu, cuda or cuda:N" in error_line(capsys, command)
