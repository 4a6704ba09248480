"""`dli preview`: the PNG grid of batches before and after injection, and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dli.cli import main
from dli.data.synth import generate
from dli.pipeline.preview import CLASS_COLOURS, preview


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("preview") / "synth"
    generate(folder, images=24, seed=5, size_range=((60, 80), (60, 90)))
    return folder


def colour_pixels(image: np.ndarray, hex_colour: str, tolerance: int = 40) -> int:
    target = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image[..., :3].astype(int) - target).max(axis=-1) < tolerance).sum())


def test_preview_writes_a_png_grid(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "figures" / "preview.png"
    options = [
        "--batches",
        "2",
        "--batch-size",
        "4",
        "--image-size",
        "64",
        "--seed",
        "1",
        "--poisson-prob",
        "0.5",
    ]
    code = main(["preview", "--data", str(dataset), "--out", str(out), *options, "--fill", "all-free"])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
    # Four columns of tiles and two batches of two rows: taller than wide.
    assert pixels.shape[0] > pixels.shape[1] > 4 * 200
    assert not list(out.parent.glob(".*.tmp")), "temp file left behind"
    plans = preview(dataset, tmp_path / "again.png", batches=2, batch_size=4, image_size=64, seed=1)
    injected = {i.class_id for p in plans for i in p.injections}
    assert injected, "the preview should show at least one injection"
    for class_id in injected:  # the frame of an injected tile is drawn in its class colour
        assert colour_pixels(pixels, CLASS_COLOURS[class_id]) > 200
    assert np.array_equal(pixels, np.asarray(Image.open(tmp_path / "again.png").convert("RGB")))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--batches", "0"], "--batches 0"),
        (["--batch-size", "0"], "batch size 0"),
        (["--image-size", "8"], "image size 8"),
        (["--poisson-prob", "2"], "poisson_prob 2"),
    ],
)
def test_preview_rejects_bad_values(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    out = tmp_path / "preview.png"
    assert main(["preview", "--data", str(dataset), "--out", str(out), *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("dli preview: error:") and message in error
    assert not out.exists()


def test_preview_names_a_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["preview", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p.png")]) == 2
    assert "nowhere" in capsys.readouterr().err
