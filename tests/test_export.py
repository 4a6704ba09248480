"""`dli export` to ONNX and `dli predict --onnx`: parity with torch, metadata, bad input (CPU, 64 px)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import dli
from dli import export
from dli.cli import main
from dli.export import source_commit
from dli.inference.onnx_model import OnnxMetadata, OnnxModel, resize_bilinear
from dli.models.checkpoint import ModelInfo, save_checkpoint
from dli.models.thresholds import CHECKPOINT_KEY, Thresholds
from dli.models.unet import build_model
from dli.predict import CheckpointPredictor
from dli.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("blowhole", "break", "crack", "fray", "uneven")
THRESHOLDS = (0.3, 0.45, 0.5, 0.55, 0.7)
PARITY = 1e-4
"""The float32 parity a user relies on (README: "fails ... if a probability differs by more than 1e-4");
the tests use this value, not the module's, so loosening the module's tolerance fails them."""
INFO = ModelInfo("l-resnet18", CLASSES, 64, (0.45, 0.45, 0.45), (0.2, 0.2, 0.2))


def make_checkpoint(path: Path, *, seed: int = 0, thresholds: tuple[float, ...] | None = THRESHOLDS) -> Path:
    """A dli checkpoint of a randomly initialised l-resnet18 UNet (what export needs, no training)."""
    torch.manual_seed(seed)
    model, _ = build_model(INFO.encoder, len(CLASSES), pretrained=False)
    with torch.no_grad():  # BatchNorm statistics away from (0, 1), so eval mode differs from train mode
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    payload = {"model": model.state_dict(), "model_info": INFO.to_dict(), "config": TrainConfig().to_dict()}
    if thresholds is not None:
        n = len(CLASSES)
        payload[CHECKPOINT_KEY] = Thresholds(
            CLASSES, thresholds, "max-f1", (True,) * n, (True,) * n
        ).to_state()
    save_checkpoint(path, payload)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, str]:
    """(checkpoint, its ONNX export, what dli export printed)."""
    root = tmp_path_factory.mktemp("export")
    checkpoint = make_checkpoint(root / "best.pt")
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", "--checkpoint", str(checkpoint)]) == 0
    return checkpoint, root / "best.onnx", printed.getvalue()


def _torch_probabilities(checkpoint: Path, inputs: torch.Tensor) -> np.ndarray:
    from dli.models.checkpoint import model_from_checkpoint

    model, _ = model_from_checkpoint(checkpoint)
    with torch.no_grad():
        return torch.sigmoid(model(inputs)).numpy()


def test_export_matches_torch_at_two_sizes_and_batch_two(exported):
    checkpoint, onnx_path, printed = exported
    assert "onnxruntime vs torch" in printed and "2x3x64x64" in printed and "2x3x72x80" in printed
    model = OnnxModel(onnx_path)
    (inputs,) = model.session.get_inputs()
    assert inputs.name == "images" and inputs.shape[1] == 3
    assert all(isinstance(d, str) for d in (inputs.shape[0], inputs.shape[2], inputs.shape[3]))  # dynamic
    generator = torch.Generator().manual_seed(1)
    for height, width in ((64, 64), (96, 128)):
        batch = torch.randn(2, 3, height, width, generator=generator)
        expected = _torch_probabilities(checkpoint, batch)
        logits = model.logits(batch.numpy())
        assert logits.shape == (2, len(CLASSES), height, width)
        assert np.abs(1 / (1 + np.exp(-logits)) - expected).max() < PARITY


def test_metadata_round_trip(exported):
    _, onnx_path, _ = exported
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    metadata = OnnxMetadata.from_props(props)
    assert metadata.class_names == CLASSES and metadata.thresholds == THRESHOLDS
    assert metadata.mean == INFO.mean and metadata.std == INFO.std and metadata.input_channels == 3
    assert metadata.image_size == 64 and metadata.input_stride == 8 and metadata.encoder == "l-resnet18"
    assert metadata.threshold_rule == "max-f1" and metadata.precision == "float32"
    assert metadata.dli_version == dli.__version__ and metadata.dli_commit == source_commit()
    assert metadata.opset == next(o.version for o in onnx.load(str(onnx_path)).opset_import if o.domain == "")
    assert OnnxMetadata.from_props(metadata.to_props()) == metadata
    assert OnnxModel(onnx_path).metadata == metadata  # what onnxruntime reads back


def _images(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate(((100, 130), (40, 50), (64, 64), (257, 190))):
        gray = (rng.random((height, width)) * 60 + np.linspace(0, 180, width)).astype(np.uint8)
        Image.fromarray(gray).save(folder / f"image{index}.png")
    return folder


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


def test_predict_via_onnx_equals_predict_via_the_checkpoint(exported, tmp_path):
    checkpoint, onnx_path, _ = exported
    images = _images(tmp_path / "images")
    by_torch, by_onnx = tmp_path / "torch", tmp_path / "onnx"
    assert (
        main(["predict", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(by_torch)])
        == 0
    )
    assert main(["predict", "--onnx", str(onnx_path), "--images", str(images), "--out", str(by_onnx)]) == 0
    names = sorted(p.name for p in by_torch.iterdir())
    assert names == sorted(p.name for p in by_onnx.iterdir()) and len(names) == 4 * (len(CLASSES) + 1)

    predictor = CheckpointPredictor(checkpoint, device="cpu")
    model = OnnxModel(onnx_path)
    predicted_pixels = 0
    for source in sorted(images.iterdir()):
        gray = _read(source)
        (expected,) = predictor.probabilities([gray])
        (actual,) = model.probabilities([gray])
        assert np.abs(actual - expected).max() < PARITY
        # Masks agree except where the probability is within the tolerance of the threshold.
        for c, (name, threshold) in enumerate(zip(CLASSES, THRESHOLDS, strict=True)):
            a = _read(by_torch / f"{source.stem}_{name}.png")
            b = _read(by_onnx / f"{source.stem}_{name}.png")
            near = np.abs(expected[c] - threshold) < PARITY
            assert np.array_equal(a[~near], b[~near])
            assert np.array_equal(a > 0, expected[c] > threshold)  # the checkpoint's thresholds are used
            predicted_pixels += int((a > 0).sum())
        assert np.array_equal(_read(by_torch / f"{source.stem}_overlay.png").shape, (*gray.shape, 3))
    assert predicted_pixels > 0


def test_predict_via_onnx_imports_neither_torch_nor_smp_nor_dali(exported, tmp_path):
    _, onnx_path, _ = exported
    images = _images(tmp_path / "images")
    script = (
        "import sys\n"
        "for name in ('torch', 'segmentation_models_pytorch', 'timm', 'nvidia', 'nvidia.dali', 'cupy'):\n"
        "    sys.modules[name] = None  # importing any of them now raises ImportError\n"
        "from dli.cli import main\n"
        f"sys.exit(main(['predict', '--onnx', {str(onnx_path)!r}, '--images', {str(images)!r}, "
        f"'--out', {str(tmp_path / 'out')!r}, '--threshold', '0.4']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO.parent)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "out").iterdir())) == 4 * (len(CLASSES) + 1)


def test_resize_matches_torch_bilinear_up_and_down():
    rng = np.random.default_rng(2)
    maps = rng.normal(size=(2, 16, 24)).astype(np.float32)
    for size in ((64, 40), (7, 9), (16, 24)):
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(maps)[None], size=size, mode="bilinear", align_corners=False
        )[0].numpy()
        assert np.abs(resize_bilinear(maps, size) - expected).max() < 1e-5


def test_an_export_that_differs_from_torch_fails_and_writes_nothing(exported, tmp_path, monkeypatch, capsys):
    _, onnx_path, _ = exported
    other = make_checkpoint(tmp_path / "other.pt", seed=1)  # other weights than the graph below
    graph = onnx.load(str(onnx_path)).SerializeToString()
    monkeypatch.setattr("dli.export.export_graph", lambda *args, **kwargs: graph)
    out = tmp_path / "other.onnx"
    assert main(["export", "--checkpoint", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "the export differs from the checkpoint" in err and "nothing written" in err and err.count("\n") == 1
    )
    assert not out.exists()


def test_the_parity_tolerances_are_the_ones_the_readme_and_help_promise(capsys):
    assert (export.TOLERANCE, export.HALF_TOLERANCE) == (PARITY, 1e-2)
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "if a probability differs by more than 1e-4" in readme and "tolerance 1e-2" in readme
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "tolerance 0.01" in " ".join(capsys.readouterr().out.split())


def test_a_small_real_weight_difference_fails_parity(exported, tmp_path, monkeypatch, capsys):
    """One class's output bias moved by 0.01 (probabilities move by at most 0.0025): above 1e-4, refused."""
    from dli.models.checkpoint import load_checkpoint

    checkpoint, onnx_path, _ = exported
    document = dict(load_checkpoint(checkpoint))
    weights = dict(document["model"])
    bias = next(k for k in weights if k.startswith("segmentation_head") and k.endswith("bias"))
    weights[bias] = weights[bias].clone()
    weights[bias][2] += 0.01
    nudged = tmp_path / "nudged.pt"
    save_checkpoint(nudged, document | {"model": weights})
    graph = onnx.load(str(onnx_path)).SerializeToString()  # the graph of the weights before the nudge
    monkeypatch.setattr("dli.export.export_graph", lambda *args, **kwargs: graph)
    out = tmp_path / "nudged.onnx"
    assert main(["export", "--checkpoint", str(nudged), "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    difference = float(line.split("differ by up to ")[1].split()[0])
    assert 2 * PARITY < difference <= 0.0025 and "tolerance 0.0001" in line, line
    assert not out.exists()


@pytest.mark.slow
def test_half_export_with_threshold_override_and_opset(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "best.pt", thresholds=None)
    out = tmp_path / "half.onnx"
    argv = ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--half", "--opset", "18"]
    assert main([*argv, "--threshold", "0.4", "--check-sizes", "64", "80x96"]) == 0
    assert "2x3x80x96" in capsys.readouterr().out
    model = OnnxModel(out)
    assert model.metadata.precision == "float16" and model.metadata.opset == 18
    assert (
        model.metadata.thresholds == (0.4,) * len(CLASSES)
        and model.metadata.threshold_rule == "--threshold 0.4"
    )
    assert model.session.get_inputs()[0].type == "tensor(float)"  # float32 in and out
    batch = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    expected = _torch_probabilities(checkpoint, batch)
    assert np.abs(1 / (1 + np.exp(-model.logits(batch.numpy()))) - expected).max() < 1e-2


def _one_line_error(capsys, command: str, *needles: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith(f"dli {command}: error:") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_export_bad_input_is_one_line_and_exit_two(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "best.pt")
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["--checkpoint", str(not_a_checkpoint)], [str(not_a_checkpoint)]),
        (["--checkpoint", str(tmp_path / "missing.pt")], ["checkpoint not found"]),
        (["--checkpoint", str(checkpoint), "--check-sizes", "60", "64"], ["60x60", "multiples of 8"]),
        (["--checkpoint", str(checkpoint), "--check-sizes", "64", "64x100"], ["64x100", "multiples of 8"]),
        (["--checkpoint", str(checkpoint), "--check-sizes", "64", "big"], ["--check-sizes big"]),
        (["--checkpoint", str(checkpoint), "--out", str(a_file / "model.onnx")], ["is not a folder"]),
        (["--checkpoint", str(checkpoint), "--out", str(tmp_path)], ["is a folder"]),
        (["--checkpoint", str(checkpoint), "--opset", "3"], ["--opset 3"]),
        (["--checkpoint", str(checkpoint), "--threshold", "0"], ["--threshold 0"]),
    ]
    for flags, needles in cases:
        assert main(["export", *flags]) == 2, flags
        _one_line_error(capsys, "export", *needles)
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_export_to_a_read_only_folder_is_one_line_and_exit_two(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "best.pt")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(locked / "m.onnx")]) == 2
    finally:
        locked.chmod(0o700)
    _one_line_error(capsys, "export", "not writable")


def test_predict_onnx_bad_input_is_one_line_and_exit_two(exported, tmp_path, capsys):
    _, onnx_path, _ = exported
    images = _images(tmp_path / "images")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model")
    foreign = tmp_path / "foreign.onnx"
    model = onnx.load(str(onnx_path))
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    for path, needle in (
        (garbage, "cannot load"),
        (foreign, "no dli metadata"),
        (tmp_path / "missing.onnx", "not found"),
    ):
        assert (
            main(["predict", "--onnx", str(path), "--images", str(images), "--out", str(tmp_path / "o")]) == 2
        )
        _one_line_error(capsys, "predict", str(path), needle)
    assert (
        main(["predict", "--onnx", str(onnx_path), "--images", str(images), "--out", "o", "--threshold", "1"])
        == 2
    )
    _one_line_error(capsys, "predict", "--threshold 1")


def test_an_os_error_while_writing_the_export_is_one_line(exported, tmp_path, monkeypatch, capsys):
    checkpoint, onnx_path, _ = exported
    graph = onnx.load(str(onnx_path)).SerializeToString()
    monkeypatch.setattr("dli.export.export_graph", lambda *args, **kwargs: graph)

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("dli.export.atomic_write_bytes", refuse)
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    _one_line_error(capsys, "export", f"--out {out}: cannot write: Permission denied")
