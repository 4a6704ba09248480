"""`dli bench --tiling`: speed of tiled ONNX prediction on the CPU, and what overlap costs.

One image of `--tiling-image` W x H pixels (default 2448 x 2048, a 5-megapixel line camera) is predicted by
`dli.inference.onnx_model.OnnxModel` through `dli.pipeline.tiling` exactly as `dli predict --onnx` does (tiles
of `--tile` S, `--overlap`, Gaussian window, logits thresholded band by band), and timed against two
references over the same pixels: tiles without overlap, and one pass over the whole image (its sides rounded
up to the encoder's stride). Figures are megapixels of the image per second (median, min, max over
`--repeats`) and the overheads: tiled time over the no-overlap time, and over the whole-image time. The model
is an `--onnx` file, or a randomly initialised export of the first `--encoders` (the weights do not change the
speed).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dli.bench.timing import summary
from dli.pipeline.tiling import TiledInference, Tiling, normalizer

DEFAULT_IMAGE = (2448, 2048)
"""(W, H) of the timed image."""


def export_random(encoder: str, tile: int, folder: Path) -> Path:
    """A `dli export` of a randomly initialised `encoder` model (5 classes), written in `folder`."""
    import torch

    from dli.export import export_onnx
    from dli.models.checkpoint import ModelInfo, save_checkpoint
    from dli.models.unet import build_model
    from dli.training.config import TrainConfig

    classes = ("blowhole", "break", "crack", "fray", "uneven")
    torch.manual_seed(0)
    model, _ = build_model(encoder, len(classes), pretrained=False)
    info = ModelInfo(encoder, classes, tile, (0.45,) * 3, (0.2,) * 3, tiling=Tiling(tile))
    checkpoint = folder / "bench.pt"
    payload = {"model": model.state_dict(), "model_info": info.to_dict(), "config": TrainConfig().to_dict()}
    save_checkpoint(checkpoint, payload)
    out = folder / "bench.onnx"
    export_onnx(checkpoint, out)
    return out


def measure_tiling(
    onnx: str | Path | None,
    *,
    encoder: str,
    tile: int,
    overlap: float,
    image: tuple[int, int] = DEFAULT_IMAGE,
    repeats: int = 3,
    batch: int = 4,
) -> dict[str, Any]:
    """The figures of the module docstring, as a JSON-ready dict."""
    from dli.inference.onnx_model import OnnxModel, sigmoid

    with tempfile.TemporaryDirectory() as folder:
        path = Path(onnx) if onnx is not None else export_random(encoder, tile, Path(folder))
        model = OnnxModel(path, device="cpu")
    metadata = model.metadata
    width, height = image
    gray = np.random.default_rng(0).integers(0, 256, (height, width), dtype=np.uint8)
    normalize = normalizer(metadata.mean, metadata.std)
    megapixels = width * height / 1e6

    def tiled(tiling_overlap: float) -> float:
        tiles = TiledInference(model.logits, Tiling(tile, tiling_overlap), normalize, batch=batch)
        start = time.perf_counter()
        for _, band in tiles.bands(gray[None]):
            _ = sigmoid(band) > 0.5
        return time.perf_counter() - start

    def whole() -> float:
        stride = metadata.input_stride
        padded_h, padded_w = -(-height // stride) * stride, -(-width // stride) * stride
        start = time.perf_counter()
        padded = np.pad(gray, ((0, padded_h - height), (0, padded_w - width)), mode="reflect")
        logits = model.logits(normalize(padded[None, None]))[:, :, :height, :width]
        _ = sigmoid(logits) > 0.5
        return time.perf_counter() - start

    tiled(overlap)  # warm-up: onnxruntime's first run allocates
    runs: dict[str, list[float]] = {"tiled": [], "tiled_no_overlap": [], "whole_image": []}
    for _ in range(repeats):
        runs["tiled"].append(tiled(overlap))
        runs["tiled_no_overlap"].append(tiled(0.0))
        runs["whole_image"].append(whole())
    out: dict[str, Any] = {
        "model": str(onnx) if onnx is not None else f"random {encoder}",
        "image": [width, height],
        "tile": tile,
        "overlap": overlap,
        "tile_batch": batch,
    }
    for name, seconds in runs.items():
        out[name] = {"megapixels_per_s": summary([megapixels / s for s in seconds]), "seconds": seconds}
    median = {name: float(np.median(seconds)) for name, seconds in runs.items()}
    out["overhead_vs_no_overlap"] = median["tiled"] / median["tiled_no_overlap"]
    out["overhead_vs_whole_image"] = median["tiled"] / median["whole_image"]
    return out


def tiling_table(figures: dict[str, Any]) -> str:
    """A short text table of `measure_tiling`'s figures."""
    lines = [
        f"tiled ONNX prediction, {figures['image'][0]}x{figures['image'][1]}, tile {figures['tile']}, "
        f"overlap {figures['overlap']:g} ({figures['model']})"
    ]
    for name in ("tiled", "tiled_no_overlap", "whole_image"):
        rate = figures[name]["megapixels_per_s"]
        lines.append(
            f"  {name:<18} {rate['median']:8.3f} MP/s  (min {rate['min']:.3f}, max {rate['max']:.3f})"
        )
    lines.append(
        f"  overhead: {figures['overhead_vs_no_overlap']:.2f}x vs no overlap, "
        f"{figures['overhead_vs_whole_image']:.2f}x vs one whole-image pass"
    )
    return "\n".join(lines)
