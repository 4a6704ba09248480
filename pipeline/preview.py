"""`dli preview`: a PNG grid of training batches before and after Dynamic Label Injection.

Each batch takes two rows: the augmented batch as decoded (``before``) and the same tensors
after injection (``after``), both from one loader iteration, so the two rows differ only by the
injection. Label outlines are drawn in one colour per class; an injected tile gets a frame in
its class colour and a tag with the class name and method (P = Poisson, CP = cut-paste).
With `--crop S` the tiles are the S x S native-resolution crops training would see
(`dli.pipeline.crops`), injections made inside them. Tiles are gray or in colour as training
would see them (`--channels`, as `dli train`'s).
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dli.common.atomic import atomic_write_bytes
from dli.common.errors import DliError
from dli.data.instances import DonorTable, canvas_boxes
from dli.pipeline.batch import Batch
from dli.pipeline.normalization import CHANNEL_SETTINGS
from dli.pipeline.planner import CANVASES, FILL_POLICIES, METHOD_CODES, DliConfig, Plan

CLASS_COLOURS: tuple[str, ...] = (
    "#ff3b30",  # red
    "#ff9500",  # orange
    "#ffd60a",  # yellow
    "#34c759",  # green
    "#32ade6",  # cyan
    "#af52de",  # purple
    "#ff2d92",  # pink
    "#a2845e",  # brown
)
"""Outline colour of class c: `CLASS_COLOURS[c % len]` (readable on gray tiles)."""

TILE_INCHES = 1.75
DPI = 150


def class_colour(class_id: int) -> str:
    return CLASS_COLOURS[class_id % len(CLASS_COLOURS)]


@dataclass(frozen=True)
class PreviewBatch:
    """What one batch contributes to the figure, on the host.

    Attributes:
        before: (N, H, W) gray or (N, H, W, 3) RGB images in [0, 1] before injection.
        after: the same after injection (de-normalized).
        labels_before: (N, C, H, W) bool labels before injection.
        labels_after: (N, C, H, W) bool labels after injection.
        plan: the batch's plan.
    """

    before: np.ndarray
    after: np.ndarray
    labels_before: np.ndarray
    labels_after: np.ndarray
    plan: Plan

    @classmethod
    def from_batch(
        cls,
        batch: Batch,
        clean: torch.Tensor,
        mean: float | Sequence[float],
        std: float | Sequence[float],
    ) -> PreviewBatch:
        """From a loader's batch and its images before injection (`Loader.iter_with_clean`, (N, D,
        H, W) in [0, 1], D = 1 gray or 3 RGB); `mean`/`std`: the loader's normalization."""
        plan = batch.plan
        if plan is None:
            raise ValueError("preview needs batches with a plan (a loader with injection)")
        labels_after = batch.masks.detach().cpu().numpy() > 0
        labels_before = labels_after.copy()
        injected = [i.slot for i in plan.injections]
        labels_before[injected] = False  # injection only adds labels, on slots that had none
        channels = clean.shape[1]
        scale = np.broadcast_to(np.asarray(std, np.float32), (3,))[:channels].reshape(1, -1, 1, 1)
        shift = np.broadcast_to(np.asarray(mean, np.float32), (3,))[:channels].reshape(1, -1, 1, 1)
        after = batch.images[:, :channels].detach().cpu().numpy() * scale + shift
        return cls(
            before=_tiles(clean.detach().cpu().numpy()),
            after=_tiles(np.clip(after, 0.0, 1.0)),
            labels_before=labels_before,
            labels_after=labels_after,
            plan=plan,
        )


def _tiles(images: np.ndarray) -> np.ndarray:
    """(N, 1, H, W) -> (N, H, W) gray; (N, 3, H, W) -> (N, H, W, 3) RGB."""
    return images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)


def _title(index: int, plan: Plan, class_names: tuple[str, ...]) -> str:
    before = " ".join(str(int(c)) for c in plan.counts(after=False))
    after = " ".join(str(int(c)) for c in plan.counts(after=True))
    methods = [i.method for i in plan.injections]
    how = ", ".join(f"{methods.count(m)} {code}" for m, code in METHOD_CODES.items() if m in methods)
    free = sum(1 for c in plan.class_ids_before if c < 0)
    injected = f"{len(plan.injections)} of {free} defect-free images injected" + (f" ({how})" if how else "")
    return f"Batch {index + 1}: class counts ({before}) \u2192 ({after})  \u00b7  {injected}"


def _draw_tile(ax: object, image: np.ndarray, labels: np.ndarray) -> None:
    if image.ndim == 3:  # RGB
        ax.imshow(image, interpolation="nearest")
    else:
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    for class_id in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1)):
        ax.contour(
            labels[class_id].astype(np.float32),
            levels=[0.5],
            colors=[class_colour(int(class_id))],
            linewidths=0.9,
        )
    ax.set_xticks([])
    ax.set_yticks([])


_CORNERS: tuple[tuple[float, float, str, str], ...] = (
    (0.03, 0.97, "left", "top"),
    (0.97, 0.97, "right", "top"),
    (0.03, 0.03, "left", "bottom"),
    (0.97, 0.03, "right", "bottom"),
)


def _free_corner(labels: np.ndarray) -> tuple[float, float, str, str]:
    """The tile corner whose tag-sized box covers the fewest label pixels (tags never hide a defect)."""
    height, width = labels.shape[-2:]
    box_h, box_w = max(1, height // 6), max(1, width // 2)
    any_label = labels.any(axis=0)
    boxes = (
        any_label[:box_h, :box_w],
        any_label[:box_h, -box_w:],
        any_label[-box_h:, :box_w],
        any_label[-box_h:, -box_w:],
    )
    return _CORNERS[int(np.argmin([box.sum() for box in boxes]))]


def _tag(ax: object, text: str, colour: str, labels: np.ndarray, *, strong: bool) -> None:
    x, y, ha, va = _free_corner(labels)
    ax.text(
        x,
        y,
        text,
        transform=ax.transAxes,
        va=va,
        ha=ha,
        fontsize=7,
        fontweight="bold" if strong else "normal",
        color="black" if strong else "white",
        bbox={
            "boxstyle": "round,pad=0.2",
            "facecolor": colour if strong else "black",
            "alpha": 0.85 if strong else 0.55,
            "linewidth": 0,
        },
    )


def render(batches: list[PreviewBatch], class_names: tuple[str, ...], *, subtitle: str = "") -> bytes:
    """The preview figure as PNG bytes: per batch a title, a ``before`` row and an ``after`` row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    columns = max(len(b.plan) for b in batches)
    height, width = batches[0].before.shape[1:3]
    # Layout in inches, converted to figure fractions below.
    tile_w, gap = TILE_INCHES, 0.05
    tile_h = TILE_INCHES * height / width
    left_margin, right_margin, header, title_h, block_gap = 0.45, 0.12, 0.62, 0.34, 0.22
    block_h = title_h + 2 * tile_h + gap + block_gap
    fig_w = left_margin + columns * (tile_w + gap) - gap + right_margin
    fig_h = header + len(batches) * block_h
    figure = Figure(figsize=(fig_w, fig_h), dpi=DPI, facecolor="white")
    FigureCanvasAgg(figure)

    def at(x: float, y_from_top: float) -> tuple[float, float]:
        return x / fig_w, 1.0 - y_from_top / fig_h

    for b, batch in enumerate(batches):
        block_top = header + b * block_h
        figure.text(
            *at(fig_w / 2, block_top + title_h / 2),
            _title(b, batch.plan, class_names),
            ha="center",
            va="center",
            fontsize=9,
            fontweight="bold",
        )
        injected = {i.slot: i for i in batch.plan.injections}
        rows = ((batch.before, batch.labels_before, "before"), (batch.after, batch.labels_after, "after"))
        for row, (images, labels, name) in enumerate(rows):
            row_top = block_top + title_h + row * (tile_h + gap)
            figure.text(
                *at(left_margin / 2, row_top + tile_h / 2),
                name,
                rotation=90,
                ha="center",
                va="center",
                fontsize=9,
                color="#444444",
            )
            for n in range(len(batch.plan)):
                x, y = at(left_margin + n * (tile_w + gap), row_top + tile_h)
                ax = figure.add_axes((x, y, tile_w / fig_w, tile_h / fig_h))
                _draw_tile(ax, images[n], labels[n])
                frame, frame_width = "#c8c8c8", 0.6
                cls = batch.plan.class_ids_before[n]
                if row == 0 and cls >= 0:
                    _tag(ax, class_names[cls], class_colour(cls), labels[n], strong=False)
                if row == 1 and n in injected:
                    item = injected[n]
                    frame, frame_width = class_colour(item.class_id), 2.4
                    text = f"{METHOD_CODES[item.method]} {class_names[item.class_id]}"
                    _tag(ax, text, frame, labels[n], strong=True)
                for spine in ax.spines.values():
                    spine.set_edgecolor(frame)
                    spine.set_linewidth(frame_width)
    handles = [
        Line2D([0], [0], color=class_colour(c), linewidth=2.5, label=name)
        for c, name in enumerate(class_names)
    ]
    handles.append(Line2D([0], [0], color="none", label="P = Poisson, CP = cut-paste"))
    figure.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=at(fig_w / 2, 0.06),
        ncol=len(handles),
        fontsize=8,
        frameon=False,
        handlelength=1.6,
        title=subtitle or None,
        title_fontsize=8,
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def preview(
    data: str | Path | None,
    out: str | Path,
    *,
    batches: int = 2,
    batch_size: int = 8,
    image_size: int = 256,
    seed: int = 0,
    poisson_prob: float = 0.5,
    fill: str = "all-free",
    canvas: str = "auto",
    epoch: int = 0,
    crop: int | None = None,
    scale: float = 1.0,
    crop_defect_prob: float = 0.5,
    channels: str | int = "auto",
) -> list[Plan]:
    """Write the preview PNG of the first `batches` training batches of `data`; returns their plans.

    The whole dataset is the training set here (its defect instances are the donors; `canvas`
    as `dli train --canvas`).
    `data` None means the bundled synthetic dataset. `crop` shows training crops of that side
    (`scale` and `crop_defect_prob` as `dli train`'s) instead of resized whole images. `channels`
    as `dli train --channels`.
    """
    from dli.common.model_checks import MAX_IMAGE_SIZE
    from dli.data.manifest import read_dataset
    from dli.data.validation import validate
    from dli.pipeline.loader import build_loader
    from dli.pipeline.normalization import channels_from_setting

    if batches < 1:
        raise DliError(f"--batches {batches}: must be >= 1")
    if image_size > MAX_IMAGE_SIZE:  # before the dataset is read (the loader checks it too)
        raise DliError(f"--image-size {image_size}: must be at most {MAX_IMAGE_SIZE}")
    if data is None:
        from dli.data.synth import default_dataset

        data = default_dataset()
    manifest = read_dataset(data)
    report = validate(manifest)
    crops = None
    if crop is not None:
        from dli.pipeline.crops import CropConfig

        crops = CropConfig(crop, scale, crop_defect_prob)
    instances = dict(zip(manifest.samples, report.instances, strict=True))
    loader = build_loader(
        manifest,
        crop=crops,
        source_boxes=report.mask_boxes if crops is not None else None,
        donors=DonorTable.from_instances(manifest, instances),
        canvas_boxes=canvas_boxes(manifest, instances),
        batch_size=batch_size,
        image_size=image_size,
        train=True,
        dli=DliConfig(poisson_prob=poisson_prob, fill=fill, canvas=canvas),  # type: ignore[arg-type]
        seed=seed,
        num_threads=2,
        prefetch=1,
        channels=channels_from_setting(channels, report.image_gray),
    )
    loader.set_epoch(epoch)
    shown: list[PreviewBatch] = []
    for batch, clean in loader.iter_with_clean():
        shown.append(PreviewBatch.from_batch(batch, clean, loader.mean, loader.std))
        if len(shown) == batches:
            break
    loader.close()
    subtitle = (
        f"{Path(str(data)).name}  \u00b7  seed {seed}, epoch {epoch}  \u00b7  poisson_prob {poisson_prob:g}, "
        f"fill {fill}, canvas {canvas}  \u00b7  "
        + (f"{image_size}\u00b2" if crop is None else f"{crop}\u00b2 crops at scale {scale:g}")
        + ", flips on"
    )
    atomic_write_bytes(out, render(shown, manifest.class_names, subtitle=subtitle))
    return [b.plan for b in shown]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, default=None, help="dataset folder or CSV; unset: the bundled synthetic data"
    )
    parser.add_argument("--out", type=Path, default=Path("preview.png"), help="PNG file to write")
    parser.add_argument("--batches", type=int, default=2, help="number of batches to show")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square training images")
    parser.add_argument("--seed", type=int, default=0, help="seed of shuffling, flips and injection plans")
    parser.add_argument("--epoch", type=int, default=0, help="epoch whose batches are shown")
    parser.add_argument(
        "--poisson-prob", type=float, default=0.5, help="probability of Poisson blending (else cut-paste)"
    )
    parser.add_argument(
        "--fill", choices=FILL_POLICIES, default="all-free", help="which canvas slots to fill"
    )
    parser.add_argument(
        "--canvas",
        choices=CANVASES,
        default="auto",
        help="images injected into: free, any (into defect-free areas), auto (free when the batch has some)",
    )
    parser.add_argument(
        "--crop", type=int, default=None, metavar="S", help="show S x S native-resolution training crops"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="with --crop: resize by F first")
    parser.add_argument(
        "--crop-defect-prob",
        type=float,
        default=0.5,
        help="with --crop: share of defect images whose crop holds the defect",
    )
    parser.add_argument(
        "--channels",
        choices=CHANNEL_SETTINGS,
        default="auto",
        help="show the batches in gray (1) or colour (3) as dli train --channels would; auto: gray when "
        "every image is",
    )


def run(args: argparse.Namespace) -> int:
    plans = preview(
        args.data,
        args.out,
        batches=args.batches,
        batch_size=args.batch_size,
        image_size=args.image_size,
        seed=args.seed,
        poisson_prob=args.poisson_prob,
        fill=args.fill,
        canvas=args.canvas,
        epoch=args.epoch,
        crop=args.crop,
        scale=args.scale,
        crop_defect_prob=args.crop_defect_prob,
        channels=args.channels,
    )
    injected = sum(len(p.injections) for p in plans)
    print(f"wrote {args.out}: {len(plans)} batch(es), {injected} injection(s)")
    return 0
