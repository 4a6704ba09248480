"""Tiled inference (`dli.pipeline.tiling`) and `dli predict` by tiles, torch and ONNX (CPU).

The property tests run a small fully convolutional network; the predict tests stand a tiny
fully convolutional network in for the UNet (`build_model` patched) so that predicting
multi-megapixel images stays fast on a 2-core CPU: what they check is the tiling, sizes,
thresholds and the torch / ONNX agreement, not the UNet.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import dli.training.trainer  # noqa: F401 - binds the real build_model before tests patch the module
from dli.cli import main
from dli.common.errors import DliError
from dli.models.checkpoint import ModelInfo, save_checkpoint
from dli.pipeline.tiling import WINDOWS, TiledInference, Tiling, axis_weights, tile_starts, window_1d
from dli.training.config import TrainConfig

CLASSES = ("scratch", "dent")


def conv_net(seed: int = 0, layers: int = 3) -> nn.Module:
    """A fully convolutional net of `layers` 3x3 convolutions (receptive radius `layers`), 2 classes."""
    torch.manual_seed(seed)
    blocks: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.Tanh()]
    for _ in range(layers - 2):
        blocks += [nn.Conv2d(8, 8, 3, padding=1), nn.Tanh()]
    blocks.append(nn.Conv2d(8, len(CLASSES), 3, padding=1))
    return nn.Sequential(*blocks).eval()


def torch_runner(model: nn.Module):
    def run(tiles: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(tiles)).numpy()

    return run


def identity(tiles: np.ndarray) -> np.ndarray:
    return tiles.astype(np.float32)


def test_tile_starts_cover_the_side_and_the_last_tile_ends_at_the_edge():
    assert tile_starts(64, 64, 48) == [0]
    assert tile_starts(100, 64, 48) == [0, 36]
    assert tile_starts(160, 64, 48) == [0, 48, 96]
    for length in range(64, 400, 7):
        starts = tile_starts(length, 64, 48)
        assert starts[-1] == length - 64 and all(b - a <= 48 for a, b in itertools.pairwise(starts))


@pytest.mark.parametrize("window", WINDOWS)
def test_axis_weights_sum_to_one_at_every_pixel(window):
    starts = tile_starts(300, 64, 40)
    weights = axis_weights(300, starts, window_1d(64, window))
    total = np.zeros(300)
    for start, w in zip(starts, weights, strict=True):
        total[start : start + 64] += w
    assert np.allclose(total, 1.0, atol=1e-6) and (weights > 0).all()


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_a_pointwise_model_gives_the_image_back_everywhere(window, overlap):
    image = np.random.default_rng(0).random((1, 203, 317)).astype(np.float32)
    tiled = TiledInference(lambda t: t * 2.0, Tiling(64, overlap, window), identity, batch=5)
    bands = list(tiled.bands(image))
    assert [top for top, _ in bands] == sorted({top for top, _ in bands}) and bands[0][0] == 0
    assert np.allclose(tiled.logits(image), image * 2.0, atol=1e-6)


def test_tiled_conv_net_equals_the_whole_image_away_from_tile_borders():
    """Exact up to float rounding where no tile covering a pixel sees its own border within the
    receptive radius, and bitwise where a single tile covers the pixel (its weight is exactly 1)."""
    radius, tile = 3, 64
    model = conv_net(layers=radius)
    image = np.random.default_rng(1).standard_normal((3, 150, 230)).astype(np.float32)
    with torch.no_grad():
        whole = model(torch.from_numpy(image)[None])[0].numpy()
    tiling = Tiling(tile, overlap=0.5, window="hann")
    tiled = TiledInference(torch_runner(model), tiling, identity, batch=4).logits(image)

    def safe(length: int) -> np.ndarray:
        ok = np.ones(length, bool)
        for start in tile_starts(length, tile, tiling.stride):
            inner = np.arange(start, start + tile)
            near = ((inner - start < radius) & (start > 0)) | (
                (start + tile - 1 - inner < radius) & (start + tile < length)
            )
            ok[inner[near]] = False
        return ok

    away = safe(150)[:, None] & safe(230)[None, :]
    assert away.mean() > 0.3
    assert np.allclose(tiled[:, away], whole[:, away], atol=1e-5)
    assert not np.allclose(tiled, whole, atol=1e-5)  # tile borders do differ: the check can fail

    covered = np.zeros((150, 230), int)
    for y in tile_starts(150, tile, tiling.stride):
        for x in tile_starts(230, tile, tiling.stride):
            covered[y : y + tile, x : x + tile] += 1
    single = covered == 1
    corner = TiledInference(torch_runner(model), tiling, identity, batch=1)  # as first_tile is run
    first_tile = torch_runner(model)(image[None, :, :tile, :tile])[0]
    single[tile:, :] = False
    single[:, tile:] = False
    assert single.any()
    assert np.array_equal(corner.logits(image)[:, single], first_tile[:, single[:tile, :tile]])


def test_images_smaller_than_a_tile_are_padded_by_reflection_and_cut_back():
    model = conv_net()
    image = np.random.default_rng(2).standard_normal((3, 40, 90)).astype(np.float32)
    tiled = TiledInference(torch_runner(model), Tiling(64), identity).logits(image)
    padded = np.pad(image, ((0, 0), (0, 24), (0, 0)), mode="reflect")
    with torch.no_grad():
        whole = model(torch.from_numpy(padded)[None])[0].numpy()
    assert tiled.shape == (2, 40, 90)
    assert np.allclose(tiled[:, :, :20], whole[:, :40, :20], atol=1e-5)


def test_bands_are_bounded_by_the_tile_not_the_image():
    image = np.zeros((1, 1000, 300), np.float32)
    tiled = TiledInference(lambda t: t, Tiling(64, 0.25), identity)
    heights = [band.shape[1] for _, band in tiled.bands(image)]
    assert sum(heights) == 1000 and max(heights) <= 64


def test_scale_resizes_first_and_returns_the_image_size():
    image = np.tile(np.linspace(0, 1, 300, dtype=np.float32), (1, 200, 1))
    tiled = TiledInference(lambda t: t, Tiling(64, scale=0.5), identity)
    logits = tiled.logits(image)
    assert logits.shape == (1, 200, 300) and np.abs(logits - image).max() < 0.02


@pytest.mark.parametrize(
    ("tiling", "stride", "message"),
    [
        (Tiling(64, overlap=0.95), 8, "--overlap 0.95: must be in [0, 0.9]"),
        (Tiling(64, overlap=-0.1), 8, "--overlap -0.1"),
        (Tiling(60), 8, "--tile 60: must be a multiple of the encoder's stride 8"),
        (Tiling(100000), 8, "--tile 100000: must be at most 4096"),  # before any memory is asked for
        (Tiling(64, window="box"), 8, "--window box"),
    ],
)
def test_bad_tilings_name_the_flag(tiling, stride, message):
    with pytest.raises(DliError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tiling.check(stride)


# -- dli predict by tiles, torch and ONNX ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """(checkpoint, ONNX export, monkeypatch) of a tiny conv net trained on 128-pixel crops."""
    root = tmp_path_factory.mktemp("tiles")
    patch = pytest.MonkeyPatch()
    patch.setattr("dli.models.unet.build_model", lambda *args, **kwargs: (conv_net(seed=3), None))
    info = ModelInfo("l-resnet18", CLASSES, 128, (0.45,) * 3, (0.2,) * 3, tiling=Tiling(128, overlap=0.25))
    model = conv_net(seed=3)
    checkpoint = root / "best.pt"
    payload = {"model": model.state_dict(), "model_info": info.to_dict(), "config": TrainConfig().to_dict()}
    save_checkpoint(checkpoint, payload)
    onnx_path = root / "best.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(onnx_path)]) == 0
    yield checkpoint, onnx_path
    patch.undo()


def _images(folder, sizes):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for width, height in sizes:
        ramp = np.linspace(0, 255, width)[None, :] * np.linspace(0.2, 1, height)[:, None]
        noisy = ramp + rng.normal(0, 20, (height, width))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"img_{width}x{height}.png")


def test_export_carries_the_tiling(tiny_models):
    from dli.inference.onnx_model import OnnxModel

    _, onnx_path = tiny_models
    assert OnnxModel(onnx_path).metadata.tiling == Tiling(128, overlap=0.25, window="gaussian", scale=1.0)


@pytest.mark.slow
def test_predict_by_tiles_writes_native_sizes_and_torch_and_onnx_agree(tiny_models, tmp_path):
    checkpoint, onnx_path = tiny_models
    sizes = [(1130, 460), (2816, 1016)]
    _images(tmp_path / "images", sizes)
    common = ["--images", str(tmp_path / "images"), "--batch-size", "16"]
    assert main(["predict", "--checkpoint", str(checkpoint), *common, "--out", str(tmp_path / "torch")]) == 0
    assert main(["predict", "--onnx", str(onnx_path), *common, "--out", str(tmp_path / "onnx")]) == 0
    for width, height in sizes:
        for name in CLASSES:
            masks = []
            for side in ("torch", "onnx"):
                with Image.open(tmp_path / side / f"img_{width}x{height}_{name}.png") as mask:
                    assert mask.size == (width, height)
                    masks.append(np.asarray(mask) > 0)
            assert 0.01 < masks[0].mean() < 0.99  # a mask with both values: agreement means something
            assert (masks[0] != masks[1]).mean() <= 0.001


def test_predict_tile_flags_override_and_bad_values_are_one_line_errors(tiny_models, tmp_path, capsys):
    checkpoint, onnx_path = tiny_models
    _images(tmp_path / "images", [(300, 200)])
    base = ["--images", str(tmp_path / "images"), "--out", str(tmp_path / "out")]
    for model in (["--checkpoint", str(checkpoint)], ["--onnx", str(onnx_path)]):
        for flags, message in (
            (["--overlap", "0.95"], "--overlap 0.95: must be in [0, 0.9]"),
            (["--tile", "100"], "--tile 100: must be a multiple of the encoder's stride 8"),
            (["--tile", "100000"], "--tile 100000: must be at most 4096"),
            (["--out", str(tmp_path / "images")], "is the --images folder"),
        ):
            before = sorted(p.name for p in (tmp_path / "images").iterdir())
            assert main(["predict", *model, *base, *flags]) == 2
            assert sorted(p.name for p in (tmp_path / "images").iterdir()) == before
            err = capsys.readouterr().err.strip()
            assert message in err and "\n" not in err
        assert (
            main(["predict", *model, *base, "--tile", "64", "--overlap", "0.5", "--window", "gaussian"]) == 0
        )


def test_an_image_too_large_to_decode_is_one_line(tmp_path, capsys):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 20000, 8, 0, 0, 0, 0)  # 600 megapixels, gray
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    images = tmp_path / "images"
    images.mkdir()
    (images / "huge.png").write_bytes(png)
    checkpoint = tmp_path / "best.pt"
    info = ModelInfo("l-resnet18", CLASSES, 64, (0.45,) * 3, (0.2,) * 3, tiling=Tiling(64))
    payload = {
        "model": conv_net().state_dict(),
        "model_info": info.to_dict(),
        "config": TrainConfig().to_dict(),
    }
    save_checkpoint(checkpoint, payload)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("dli.models.unet.build_model", lambda *args, **kwargs: (conv_net(), None))
        argv = [
            "predict",
            "--checkpoint",
            str(checkpoint),
            "--images",
            str(images),
            "--out",
            str(tmp_path / "o"),
        ]
        assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # One line names the image; predict then counts the images it could not read (exit 2 at the end).
    naming = [line for line in lines if "huge.png" in line]
    assert len(naming) == 1 and "huge.png is too large to decode" in naming[0], lines
    assert len(lines) == 2 and "1 image(s) could not be read" in lines[1], lines


def test_predict_onnx_by_tiles_imports_no_torch(tiny_models, tmp_path):
    import subprocess
    import sys

    _, onnx_path = tiny_models
    _images(tmp_path / "images", [(300, 200)])
    script = (
        "import sys; from dli.cli import main; "
        f"rc = main(['predict', '--onnx', {str(onnx_path)!r}, '--images', {str(tmp_path / 'images')!r}, "
        f"'--out', {str(tmp_path / 'out')!r}]); "
        "sys.exit(rc or any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 0
    assert (tmp_path / "out" / "img_300x200_scratch.png").is_file()
