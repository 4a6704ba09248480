"""Pictures of a run: training curves and a grid of predictions (PNG files, matplotlib's Agg canvas).

- `curves.png` (`render_curves`): per epoch, the training and validation loss, the overall and
  per-class validation IoU, and the learning rate, from a run's history (its `metrics.jsonl`
  records).
- `val_predictions.png` (`PredictionGrid`): for the first few images of each class of a set,
  the image (in colour for an RGB model), its ground truth and the model's prediction (sigmoid
  above the metrics' threshold), each label drawn in its class colour (the colours of `dli preview`), with the
  class names. `dli train` draws it for the validation set, `dli eval --out DIR` for the set it
  scores.

The figures only show what training and evaluation computed; nothing here affects a run.
Rendering uses matplotlib's object API on an Agg canvas (no pyplot state, no display), and the
files are written with `dli.common.atomic`, so a reader never sees half a PNG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dli.common.atomic import atomic_write_bytes
from dli.data.manifest import FREE, Manifest
from dli.models.metrics import THRESHOLD
from dli.pipeline.preview import class_colour

CURVES_FILE = "curves.png"
PREDICTIONS_FILE = "val_predictions.png"

EXAMPLES_PER_CLASS = 2
"""Images of each class (defect-free included, when the set has any) in a prediction grid."""

DPI = 120
TILE_INCHES = 1.45
OVERLAY_ALPHA = 0.45
"""Opacity of the class colour over a labelled pixel."""


# ---------------------------------------------------------------------------------------------
# Curves.


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of `key` over the records that have a finite value for it."""
    epochs, values = [], []
    for record in history:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            epochs.append(int(record["epoch"]))
            values.append(float(value))
    return epochs, values


def render_curves(
    history: Sequence[Mapping[str, Any]], class_names: Sequence[str], *, title: str = ""
) -> bytes:
    """PNG bytes of three panels over epochs: loss (train, val), validation IoU (overall, per class), lr."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(12.0, 3.6), dpi=DPI, facecolor="white", layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, iou_ax, lr_ax = figure.subplots(1, 3)
    style = {"marker": "o", "markersize": 3}

    loss_ax.plot(*_series(history, "train_loss"), color="#1f77b4", label="train", **style)
    loss_ax.plot(*_series(history, "val_loss"), color="#d62728", label="validation", **style)
    loss_ax.set_title("loss")

    for class_id, name in enumerate(class_names):
        epochs, values = _series(history, f"iou/{name}")
        iou_ax.plot(epochs, [100 * v for v in values], color=class_colour(class_id), label=name, **style)
    epochs, values = _series(history, "iou")
    iou_ax.plot(epochs, [100 * v for v in values], color="black", linewidth=2.2, label="overall", **style)
    iou_ax.set_title("validation IoU (%)")
    iou_ax.set_ylim(0, 100)

    lr_ax.plot(*_series(history, "lr"), color="#555555", **style)
    lr_ax.set_title("learning rate (end of epoch)")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    last_epoch = max((int(r["epoch"]) for r in history), default=1)
    for ax in (loss_ax, iou_ax, lr_ax):
        ax.set_xlim(0.5, last_epoch + 0.5)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    loss_ax.legend(fontsize=8)
    iou_ax.legend(fontsize=7, ncol=2)
    if title:
        figure.suptitle(title, fontsize=10)
    return _png(figure)


def write_curves(
    path: str | Path, history: Sequence[Mapping[str, Any]], class_names: Sequence[str], *, title: str = ""
) -> None:
    """`render_curves` written atomically to `path`."""
    atomic_write_bytes(path, render_curves(history, class_names, title=title))


# ---------------------------------------------------------------------------------------------
# Predictions.


def example_indices(manifest: Manifest, per_class: int = EXAMPLES_PER_CLASS) -> list[int]:
    """The first `per_class` images of each class in manifest order: defect classes by id, then free."""
    by_class = manifest.indices_by_class()
    order = [*range(manifest.num_classes), FREE]
    return [i for class_id in order for i in by_class.get(class_id, [])[:per_class]]


@dataclass(frozen=True)
class Predictions:
    """What a prediction grid shows, on the host.

    Attributes:
        images: (N, H, W, 3) RGB intensities in [0, 1] (a gray model's images repeated; (N, H, W)
            gray is taken too).
        truth: (N, C, H, W) bool ground-truth labels.
        predicted: (N, C, H, W) bool, sigmoid of the logits above `THRESHOLD`.
        class_ids: the class of each image in the manifest (`FREE` for defect-free).
    """

    images: np.ndarray
    truth: np.ndarray
    predicted: np.ndarray
    class_ids: tuple[int, ...]

    def image_iou(self, n: int) -> float:
        """IoU of image `n` over all classes (NaN when it has no label and no prediction)."""
        truth, predicted = self.truth[n], self.predicted[n]
        union = int((truth | predicted).sum())
        return int((truth & predicted).sum()) / union if union else math.nan


class PredictionGrid:
    """The prediction grid of a fixed set of images (`example_indices` of `manifest`).

    Builds its own evaluation loader over those images once, with the model's `channels`,
    normalization (`mean`, `std`) and `resize`; `write(model, path)` runs the model on them and
    writes the PNG. `close()` releases the loader.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        image_size: int,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        per_class: int = EXAMPLES_PER_CLASS,
        num_threads: int = 1,
        native: tuple[Sequence[float], Sequence[float]] | None = None,
        channels: int = 1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resize: str = "linear",
        fit: bool = False,
    ) -> None:
        from dli.pipeline.loader import build_loader

        self.examples = manifest.subset(example_indices(manifest, per_class))
        self.class_names = manifest.class_names
        self.device, self.amp_dtype = device, amp_dtype
        self.native = native
        self.channels = channels
        self.loader = (
            None
            if native is not None
            else build_loader(
                self.examples,
                batch_size=max(1, len(self.examples)),
                image_size=image_size,
                train=False,
                device="cuda" if device.type == "cuda" else "cpu",
                num_threads=num_threads,
                prefetch=1,
                channels=channels,
                mean=mean,
                std=std,
                resize=resize,
                fit=fit,
            )
        )

    @torch.no_grad()
    def predict(self, model: nn.Module) -> Predictions:
        """Run `model` (in eval mode, restored after) over the grid's images."""
        was_training = model.training
        model.eval()
        if self.native is not None:
            from dli.pipeline.native import native_batches

            batches: Any = native_batches(self.examples, *self.native, channels=self.channels)
            statistics = self.native
        else:
            assert self.loader is not None
            batches, statistics = self.loader, (self.loader.mean, self.loader.std)
        mean, std = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in statistics)
        images, truth, predicted = [], [], []
        try:
            for batch in batches:
                x = batch.images.to(self.device).contiguous(memory_format=torch.channels_last)
                enabled = self.amp_dtype is not None
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=enabled):
                    logits = model(x)
                shown = [
                    (batch.images.float().cpu().numpy() * std + mean).clip(0.0, 1.0),
                    batch.masks.cpu().numpy() > 0.5,
                    torch.sigmoid(logits.float()).cpu().numpy() > THRESHOLD,
                ]
                if self.native is not None:  # whole images of any size: fitted into one display square
                    shown = [fit_for_display(array) for array in shown]
                images.append(shown[0].transpose(0, 2, 3, 1))
                truth.append(shown[1])
                predicted.append(shown[2])
        finally:
            model.train(was_training)
        class_ids = tuple(s.class_id for s in self.examples.samples)
        return Predictions(
            np.concatenate(images), np.concatenate(truth), np.concatenate(predicted), class_ids
        )

    def write(self, model: nn.Module, path: str | Path, *, title: str = "") -> None:
        """Predict and write the grid to `path` atomically."""
        atomic_write_bytes(path, render_predictions(self.predict(model), self.class_names, title=title))

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()


DISPLAY_SIZE = 256
"""Side of the square a native-resolution image is fitted into for the prediction grid."""


def fit_for_display(array: np.ndarray, size: int = DISPLAY_SIZE) -> np.ndarray:
    """(N, ..., H, W) sampled (nearest) into (N, ..., size, size), aspect ratio kept, padded with 0."""
    height, width = array.shape[-2:]
    scale = size / max(height, width)
    out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
    rows = np.minimum(((np.arange(out_h) + 0.5) / scale).astype(int), height - 1)
    columns = np.minimum(((np.arange(out_w) + 0.5) / scale).astype(int), width - 1)
    out = np.zeros((*array.shape[:-2], size, size), array.dtype)
    out[..., :out_h, :out_w] = array[..., rows[:, None], columns[None, :]]
    return out


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float RGB of an (H, W) gray or (H, W, 3) RGB image."""
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else np.array(image, dtype=np.float64)


def _overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB: the image with each labelled pixel tinted in its class colour."""
    from matplotlib.colors import to_rgb

    rgb = _as_rgb(image)
    for class_id in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1)):
        where = labels[class_id]
        colour = np.asarray(to_rgb(class_colour(int(class_id))))
        rgb[where] = (1 - OVERLAY_ALPHA) * rgb[where] + OVERLAY_ALPHA * colour
    return rgb


def _draw(ax: Any, rgb: np.ndarray, labels: np.ndarray | None) -> None:
    ax.imshow(rgb, interpolation="nearest")
    if labels is not None:
        for class_id in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1)):
            ax.contour(
                labels[class_id].astype(np.float32),
                levels=[0.5],
                colors=[class_colour(int(class_id))],
                linewidths=0.8,
            )
    ax.set_xticks([])
    ax.set_yticks([])


def render_predictions(predictions: Predictions, class_names: Sequence[str], *, title: str = "") -> bytes:
    """PNG bytes: one column per image (headed by its class), rows image / ground truth / prediction."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    count = len(predictions.images)
    columns = max(count, 1)
    figure = Figure(figsize=(0.7 + columns * TILE_INCHES, 1.3 + 3 * TILE_INCHES), dpi=DPI, facecolor="white")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(
        3, columns, left=0.5 / figure.get_figwidth(), right=0.995, top=0.86, bottom=0.1
    )
    grid.update(wspace=0.05, hspace=0.05)
    rows = ("image", "ground truth", "prediction")
    for n in range(count):
        image, truth, predicted = predictions.images[n], predictions.truth[n], predictions.predicted[n]
        class_id = predictions.class_ids[n]
        tiles = (
            (_as_rgb(image), None),
            (_overlay(image, truth), truth),
            (_overlay(image, predicted), predicted),
        )
        for row, (rgb, labels) in enumerate(tiles):
            ax = figure.add_subplot(grid[row, n])
            _draw(ax, rgb, labels)
            if n == 0:
                ax.set_ylabel(rows[row], fontsize=9)
            if row == 0:
                name = "free" if class_id == FREE else class_names[class_id]
                colour = "#444444" if class_id == FREE else class_colour(class_id)
                ax.set_title(name, fontsize=9, fontweight="bold", color=colour)
            if row == 2:
                iou = predictions.image_iou(n)
                ax.set_xlabel("IoU n/a" if math.isnan(iou) else f"IoU {100 * iou:.0f}%", fontsize=8)
    handles = [
        Line2D([0], [0], color=class_colour(c), linewidth=4, label=name) for c, name in enumerate(class_names)
    ]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    heading = title or "predictions"
    figure.suptitle(f"{heading}  \u00b7  threshold {THRESHOLD:g}", fontsize=10)
    return _png(figure)


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()
