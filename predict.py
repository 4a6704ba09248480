"""`dli predict`: predicted masks and overlays for a folder of images.

For every image `<stem>.<ext>` in `--images` it writes, at the image's original size,
`<stem>_<class>.png` (0 or 255 per pixel) for each defect class of the model and
`<stem>_overlay.png`: the image as the model saw it (in colour for an RGB model, else gray) with
each class's predicted pixels tinted in its colour. Images are read in the model's channels as
training read them (`dli.data.imageio.read_image`: an RGB model repeats a gray image, a gray
model takes a colour image's luma), resized to the training size and normalized with the
statistics the model carries; the logits are
resized back to the original size before each class's threshold (the calibrated ones the
checkpoint or export carries, else 0.5, unless `--threshold`), so mask edges follow the
model's output rather than upscaled blocks.

The model is a checkpoint (`--checkpoint`, run by torch) or a `dli export` (`--onnx`, run by
onnxruntime, normalization and thresholds read from its metadata): the two give the same
masks up to pixels whose probability lies within the export's tolerance of the threshold. The
`--onnx` path imports neither torch nor smp nor DALI (`dli.inference.onnx_model`).

**Tiles.** A model trained on crops (its checkpoint or export records a `dli.pipeline.tiling.Tiling`), or
any model given `--tile S`, predicts each image at native resolution by overlapping S x S tiles
whose logits are blended by a window (`dli.pipeline.tiling`, the same NumPy code for both paths); masks
are thresholded band by band, so memory is bounded by the tile batch and the image itself.
`--overlap` and `--window` override what the model carries.

An image that cannot be read (truncated, corrupt) does not stop the others: each is named in
one error line after the rest are written, and the command then exits with status 2. A bar
shows progress on a terminal (nothing on a redirected stream).

A folder in the Magnetic Tile layout also holds the ground-truth masks: a `.png` is taken as
a mask, not an image, when another image has its stem or its stem ends in `_mask`.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from dli.common import progress
from dli.common.atomic import atomic_save
from dli.common.errors import DliError
from dli.data.class_names import output_name
from dli.data.imageio import is_image_file, read_image
from dli.inference.onnx_model import fit_pad_values, resized_size
from dli.models.thresholds import check_threshold
from dli.pipeline.tiling import DEFAULT_OVERLAP, WINDOWS, TiledInference, Tiling, normalizer

if TYPE_CHECKING:
    import torch

    from dli.models.checkpoint import ModelInfo

OVERLAY_ALPHA = 0.5
"""Opacity of the class colour over a predicted pixel."""

CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)
"""Overlay colour of class c: `CLASS_COLOURS[c % len]` (distinct hues, readable on gray)."""


def list_images(folder: Path) -> list[Path]:
    """The images of `folder` (not recursive), skipping masks stored beside them; sorted by name."""
    if not folder.is_dir():
        raise DliError(f"--images {folder}: not a folder")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith(".")
    )
    non_png_stems = {p.stem for p in files if p.suffix.lower() != ".png"}
    images = [
        p
        for p in files
        if p.suffix.lower() != ".png" or (p.stem not in non_png_stems and not p.stem.endswith("_mask"))
    ]
    if not images:
        raise DliError(f"--images {folder}: no images found")
    clashes = sorted(stem for stem, n in Counter(p.stem for p in images).items() if n > 1)
    if clashes:
        raise DliError(f"--images {folder}: several images share the stem(s) {', '.join(clashes)}")
    return images


def preprocess(image: np.ndarray, info: ModelInfo) -> torch.Tensor:
    """(3, S, S) float32 input of the model: resized (stretched, or fitted and padded, as trained),
    scaled to [0, 1], normalized as in training.

    `image`: (H, W, channels) intensities on [0, 255] (`read_image`), or (H, W) gray; one
    channel is repeated into the model's three.
    """
    import torch
    import torch.nn.functional as F

    pixels = image if image.ndim == 3 else image[..., None]
    # Copied only when it must be: torch warns on a read-only array, as a decoded PIL image's is.
    planes = np.require(pixels.transpose(2, 0, 1), requirements=["C", "W"])
    tensor = torch.from_numpy(planes).float().div_(255.0)[None]
    size = resized_size(image.shape, info.image_size, info.aspect)
    if info.resize == "nearest":  # as the model was trained (pixel-centre nearest, as DALI's)
        tensor = F.interpolate(tensor, size=size, mode="nearest-exact")[0]
    else:
        tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    normalized = (tensor.expand(len(info.mean), -1, -1) - mean) / std
    if size == (info.image_size, info.image_size):
        return normalized
    # `fit`: padded at the bottom and right with the mean intensity, as in training.
    pad = torch.from_numpy(fit_pad_values(info.mean, info.std)).view(-1, 1, 1)
    out = pad.expand(-1, info.image_size, info.image_size).clone()
    out[:, : size[0], : size[1]] = normalized
    return out


OVERLAY_ROWS = 512
"""Rows of the overlay computed at once (float32 work stays a few MB for any image height)."""


def overlay(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: `image` ((H, W) or (H, W, 1) gray, (H, W, 3) RGB, on [0, 255]) with each
    class mask of `masks` (C, H, W bool) tinted in its colour."""
    pixels = image if image.ndim == 3 else image[..., None]
    out = np.empty((*pixels.shape[:2], 3), np.uint8)
    for top in range(0, pixels.shape[0], OVERLAY_ROWS):
        rows = slice(top, top + OVERLAY_ROWS)
        band = np.array(np.broadcast_to(pixels[rows], (*pixels[rows].shape[:2], 3)), dtype=np.float32)
        for class_id, mask in enumerate(masks[:, rows]):
            colour = np.array(CLASS_COLOURS[class_id % len(CLASS_COLOURS)], np.float32)
            band[mask] = (1 - OVERLAY_ALPHA) * band[mask] + OVERLAY_ALPHA * colour
        out[rows] = band.round().clip(0, 255).astype(np.uint8)
    return out


def _write_png(path: Path, array: np.ndarray) -> None:
    atomic_save(path, lambda handle: Image.fromarray(array).save(handle, format="PNG"))


def _readable(
    paths: Sequence[Path], channels: int, unreadable: list[str]
) -> tuple[list[Path], list[np.ndarray]]:
    """The images of `paths` that read (`read_image` in `channels`), with their pixels; one
    message per other one, in `unreadable`."""
    kept, images = [], []
    for path in paths:
        try:
            images.append(read_image(path, channels))
        except DliError as error:
            unreadable.append(str(error))
            continue
        kept.append(path)
    return kept, images


def _batches(paths: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


class Predictor(Protocol):
    """A model that turns images ((H, W, channels), `read_image`) into per-class probabilities at
    their own size.

    `tiled` is set when the model predicts by tiles (`dli.pipeline.tiling`), None when it resizes each
    image to its training size.
    """

    class_names: tuple[str, ...]
    thresholds: tuple[float, ...]
    tiled: TiledInference | None
    channels: int

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]: ...


def resolve_tiling(
    carried: Tiling | None,
    *,
    stride: int,
    tile: int | None = None,
    overlap: float | None = None,
    window: str | None = None,
) -> Tiling | None:
    """The tiling a prediction uses: the model's (`carried`), with `--tile/--overlap/--window` over it.

    `--tile` switches tiling on for a model that carries none (overlap 0.25, Gaussian window unless
    given); `--overlap` or `--window` alone need a model that carries a tiling.
    """
    if tile is None and carried is None:
        if overlap is not None or window is not None:
            raise DliError("--overlap and --window need --tile S (this model was not trained on crops)")
        return None
    base = carried or Tiling(tile=tile or 0)
    return Tiling(
        tile=base.tile if tile is None else tile,
        overlap=base.overlap if overlap is None else overlap,
        window=base.window if window is None else window,
        scale=base.scale,
    ).check(stride)


def tiled_inference(
    runner: Callable[[np.ndarray], np.ndarray],
    tiling: Tiling | None,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
) -> TiledInference | None:
    """The tiled predictor of a model (None without a tiling): tiles of `read_image`'s planes
    normalized as in training."""
    if tiling is None:
        return None
    return TiledInference(runner, tiling, normalizer(tuple(mean), tuple(std)), batch=batch_size)


class CheckpointPredictor:
    """A checkpoint's model on torch (`--checkpoint`), thresholds from the checkpoint."""

    def __init__(
        self,
        checkpoint: str | Path | Mapping[str, Any],
        *,
        device: str = "auto",
        threshold: float | None = None,
        tile: int | None = None,
        overlap: float | None = None,
        window: str | None = None,
        batch_size: int = 8,
    ) -> None:
        import torch

        from dli.models.checkpoint import load_checkpoint, model_from_checkpoint
        from dli.models.thresholds import thresholds_of
        from dli.models.unet import encoder_spec
        from dli.training.devices import amp_dtype_for, resolve_device

        self.device = resolve_device(device)
        document = checkpoint if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
        model, self.info = model_from_checkpoint(document, device=self.device)
        self.model = model.to(memory_format=torch.channels_last)
        self.amp_dtype = amp_dtype_for(self.device)
        self.class_names = self.info.class_names
        self.channels = self.info.channels
        self.thresholds = thresholds_of(document, self.class_names, threshold).values
        stride = 2 ** encoder_spec(self.info.encoder).depth
        tiling = resolve_tiling(self.info.tiling, stride=stride, tile=tile, overlap=overlap, window=window)
        self.tiled = tiled_inference(self.logits, tiling, self.info.mean, self.info.std, batch_size)

    def _forward(self, batch: Any) -> Any:
        """The model's float32 logits of a normalized (N, C, H, W) batch on its device: no grad,
        channels-last, under the device's autocast (as training ran it)."""
        import torch

        amp_dtype = self.amp_dtype
        autocast = torch.autocast(
            self.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        )
        with torch.no_grad(), autocast:
            return self.model(batch.contiguous(memory_format=torch.channels_last)).float()

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """(N, classes, H, W) float32 logits of a normalized (N, C, H, W) float32 batch."""
        import torch

        return self._forward(torch.from_numpy(inputs).to(self.device)).cpu().numpy()

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch
        import torch.nn.functional as F

        inputs = torch.stack([preprocess(image, self.info) for image in images]).to(self.device)
        logits = self._forward(inputs)
        maps = []
        with torch.no_grad():
            for image, image_logits in zip(images, logits, strict=True):
                height, width = resized_size(image.shape, self.info.image_size, self.info.aspect)
                full = F.interpolate(
                    image_logits[None, :, :height, :width],
                    size=image.shape[:2],
                    mode="bilinear",
                    align_corners=False,
                )
                maps.append(torch.sigmoid(full[0]).cpu().numpy())
        return maps


class OnnxPredictor:
    """A `dli export` on onnxruntime (`--onnx`), thresholds from its metadata."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        threshold: float | None = None,
        tile: int | None = None,
        overlap: float | None = None,
        window: str | None = None,
        batch_size: int = 8,
    ) -> None:
        from dli.inference.onnx_model import OnnxModel

        self.model = OnnxModel(path, device=device)
        self.class_names = self.model.class_names
        self.channels = self.model.metadata.image_channels
        n = len(self.class_names)
        self.thresholds = (threshold,) * n if threshold is not None else self.model.metadata.thresholds
        metadata = self.model.metadata
        tiling = resolve_tiling(
            metadata.tiling, stride=metadata.input_stride, tile=tile, overlap=overlap, window=window
        )
        self.tiled = tiled_inference(self.model.logits, tiling, metadata.mean, metadata.std, batch_size)

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.model.probabilities(images)


def predict_folder(
    checkpoint: str | Path | None,
    images: str | Path,
    out: str | Path,
    *,
    onnx: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 8,
    threshold: float | None = None,
    tile: int | None = None,
    overlap: float | None = None,
    window: str | None = None,
    unreadable: list[str] | None = None,
) -> list[Path]:
    """Write masks and overlays for every image in `images` to `out`; returns the files written.

    The model is `checkpoint` or, instead, the ONNX export `onnx`. `threshold` (one for every
    class) overrides the thresholds the model carries; `tile`, `overlap` and `window` the tiling
    it carries (`resolve_tiling`). `batch_size` counts images, or tiles when tiling. An image that cannot
    be read is skipped and its one-line message appended to `unreadable` (the others are still
    predicted).
    """
    unreadable = [] if unreadable is None else unreadable
    if (checkpoint is None) == (onnx is None):
        raise DliError("give one model: --checkpoint FILE or --onnx FILE")
    if batch_size < 1:
        raise DliError(f"--batch-size {batch_size}: must be an integer >= 1")
    if threshold is not None:
        check_threshold(threshold)
    if Path(out).resolve() == Path(images).resolve():  # the outputs would be read back as images
        raise DliError(f"--out {out}: is the --images folder; give another folder")
    paths = list_images(Path(images))
    predictor: Predictor
    options = {"threshold": threshold, "tile": tile, "overlap": overlap, "window": window}
    if onnx is not None:
        predictor = OnnxPredictor(onnx, device=device, batch_size=batch_size, **options)
    else:
        assert checkpoint is not None
        predictor = CheckpointPredictor(checkpoint, device=device, batch_size=batch_size, **options)
    thresholds = np.asarray(predictor.thresholds, np.float32).reshape(-1, 1, 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    batches = list(_batches(paths, 1 if predictor.tiled is not None else batch_size))
    for group in progress.items(batches, total=len(batches), desc="predict", unit="batch"):
        group, images = _readable(group, predictor.channels, unreadable)
        if not group:
            continue
        if predictor.tiled is not None:
            all_masks = [tiled_masks(predictor.tiled, images[0], thresholds)]
        else:
            all_masks = [p > thresholds for p in predictor.probabilities(images)]
        for path, image, masks in zip(group, images, all_masks, strict=True):
            for name, mask in zip(predictor.class_names, masks, strict=True):
                target = output_name(out, path.stem, name)
                _write_png(target, mask.astype(np.uint8) * 255)
                written.append(target)
            target = out / f"{path.stem}_overlay.png"
            _write_png(target, overlay(image, masks))
            written.append(target)
    return written


def tiled_masks(tiled: TiledInference, image: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(classes, H, W) bool masks of one image ((H, W) gray or (H, W, channels), `read_image`)
    predicted by tiles, thresholded band by band."""
    from dli.inference.onnx_model import sigmoid

    planes = image[None] if image.ndim == 2 else np.ascontiguousarray(np.moveaxis(image, 2, 0))
    masks: np.ndarray | None = None
    for top, band in tiled.bands(planes):
        if masks is None:
            masks = np.zeros((band.shape[0], *planes.shape[1:]), bool)
        masks[:, top : top + band.shape[1]] = sigmoid(band) > thresholds
    assert masks is not None
    return masks


def add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    """`--tile`, `--overlap`, `--window` of the commands that predict (eval, predict)."""
    parser.add_argument(
        "--tile",
        type=int,
        default=None,
        metavar="S",
        help="predict by overlapping S x S tiles at native resolution (a multiple of the encoder's stride); "
        "unset: the model's own tiling if it was trained on crops, else one resized pass",
    )
    parser.add_argument(
        "--overlap",
        type=float,
        default=None,
        help=f"fraction of a tile shared with its neighbours, in [0, 0.9]; unset: the model's, else "
        f"{DEFAULT_OVERLAP:g}",
    )
    parser.add_argument(
        "--window",
        choices=WINDOWS,
        default=None,
        help="how tile logits are blended: down-weighting tile borders (hann, gaussian) or a plain "
        "average (uniform); unset: the model's, else gaussian",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    required = {"required": True, "default": argparse.SUPPRESS}
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", default=None, help="a best.pt or last.pt written by dli train (torch)")
    model.add_argument("--onnx", default=None, help="a model written by dli export (onnxruntime, no torch)")
    parser.add_argument("--images", **required, help="folder of images (jpg, png, bmp, tif)")
    parser.add_argument(
        "--out", **required, help="folder for <stem>_<class>.png masks and <stem>_overlay.png"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="images per forward pass (tiles when predicting by tiles)"
    )
    add_tiling_arguments(parser)
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="probability above which a pixel is defect, for every class; unset: the model's calibrated "
        "thresholds (else 0.5)",
    )


def run(args: argparse.Namespace) -> int:
    unreadable: list[str] = []
    written = predict_folder(
        args.checkpoint,
        args.images,
        args.out,
        onnx=args.onnx,
        device=args.device,
        batch_size=args.batch_size,
        threshold=args.threshold,
        tile=args.tile,
        overlap=args.overlap,
        window=args.window,
        unreadable=unreadable,
    )
    print(f"wrote {len(written)} files to {args.out}")
    for message in unreadable:
        print(f"dli predict: error: {message}", file=sys.stderr)
    if unreadable:
        print(f"dli predict: {len(unreadable)} image(s) could not be read and have no masks", file=sys.stderr)
        return 2
    return 0
