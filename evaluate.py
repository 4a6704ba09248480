"""`dli eval`: a checkpoint's pixel- and image-level scores on a dataset, printed and saved as CSV.

The checkpoint carries what rebuilding the model needs (encoder, classes, image size,
normalization), its calibrated per-class thresholds (`dli.models.thresholds`) and the training
config, whose split settings are the defaults here: without flags, a checkpoint is scored on the
validation part of the data it was trained on.

Pixel-level IoU/F1 are reported at 0.5 and at the thresholds in use: `--threshold T` for every
class, else the checkpoint's calibrated ones. `--calibrate` first chooses the thresholds on the
evaluated images (max F1, or `--min-recall R`) and stores them in the checkpoint (rewritten
atomically). Image-level accept/reject metrics (`dli.models.image_metrics`, `--min-area`
pixels at the model's input size, native pixels when tiling) use the thresholds in use. The
CSV has one row per class and an `overall` row (pixel counts summed over classes; its
image-level columns are "any defect").

A model trained on crops (its checkpoint carries a `dli.pipeline.tiling.Tiling`), or any model given
`--tile S`, is scored at native resolution: each whole image is predicted by overlapping tiles
(`dli.models.tiled`, the algorithm `dli predict` uses) and compared with its original mask,
never resized (`dli.pipeline.native`); `--min-area` then counts native pixels. Otherwise images
and masks are resized to the training size as in training.

`--out` names the CSV file, or a folder (any path not ending in ``.csv``) that receives
`eval.csv` and `predictions.png`, the prediction grid of `dli.training.figures` for the scored images.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from dli.common.atomic import atomic_write_text, check_replaceable
from dli.common.errors import DliError
from dli.common.lock import FolderLock
from dli.data.manifest import Manifest
from dli.models.checkpoint import (
    add_checkpoint_argument,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from dli.models.image_metrics import ImageDecisionCounter, ImageScores
from dli.models.metrics import THRESHOLD, ConfusionCounter, SegmentationScores, evaluate_model
from dli.models.thresholds import (
    CHECKPOINT_KEY,
    ThresholdCalibrator,
    Thresholds,
    check_min_recall,
    choose_thresholds,
    keep_uncalibrated,
    thresholds_of,
)
from dli.predict import add_tiling_arguments
from dli.training.config import SPLITS, TrainConfig, resolved_paths

ALL = "all"
"""`--split all`: score every image of the dataset."""


@dataclass(frozen=True)
class EvalReport:
    """What `dli eval` measured.

    Attributes:
        at_half: pixel-level scores at threshold 0.5 for every class.
        thresholds: the per-class thresholds in use (calibrated, overridden or 0.5).
        at_thresholds: pixel-level scores at `thresholds`.
        images: image-level accept/reject scores at `thresholds`.
        calibrated_now: whether `--calibrate` chose `thresholds` (and stored them).
        kept: classes `--calibrate` had nothing to calibrate on, which kept their stored threshold.
    """

    at_half: SegmentationScores
    thresholds: Thresholds
    at_thresholds: SegmentationScores
    images: ImageScores
    calibrated_now: bool = False
    kept: tuple[str, ...] = ()

    def text(self) -> str:
        """The tables `dli eval` prints."""
        thresholds = self.thresholds
        at = "the calibrated thresholds" if thresholds.is_calibrated else "the thresholds"
        if set(thresholds.values) == {THRESHOLD}:
            blocks = [f"pixel level, threshold 0.5 for every class ({thresholds.rule})", self.at_half.table()]
        else:
            source = f", {thresholds.source}" if thresholds.source else ""
            blocks = [
                "pixel level, threshold 0.5",
                self.at_half.table(),
                "",
                f"pixel level, {at} ({thresholds.rule}{source}): {thresholds.describe()}",
                self.at_thresholds.table(),
            ]
        if self.kept:
            blocks.append(
                f"note: nothing to calibrate {', '.join(self.kept)} on in these images "
                "(no defect pixel found): kept the stored threshold"
            )
        missed = [n for n, met in zip(thresholds.class_names, thresholds.recall_met, strict=True) if not met]
        if missed:
            blocks.append(f"note: no threshold reaches the asked recall for {', '.join(missed)}")
        blocks += [
            "",
            f"image level ({self.images.images} images): rejected when a class has "
            f">= {self.images.min_area} predicted pixels at {at}",
            self.images.table(),
        ]
        return "\n".join(blocks)

    def to_csv(self) -> str:
        """Per class and overall: threshold, pixel scores at it and at 0.5, image-level scores."""
        images = [*self.images.classes, self.images.any_defect]
        fields: list[str] = []
        rows: list[dict[str, object]] = []
        for index, (row, half, image) in enumerate(
            zip(self.at_thresholds.rows(), self.at_half.rows(), images, strict=True)
        ):
            thresholds = self.thresholds.values
            record: dict[str, object] = {
                "class": row["class"],
                "threshold": thresholds[index] if index < len(thresholds) else "",
                **{k: row[k] for k in ("iou", "f1", "tp", "fp", "fn")},
                "iou_at_0.5": half["iou"],
                "f1_at_0.5": half["f1"],
                "min_area": self.images.min_area,
                **image.record(),
            }
            fields = list(record)
            rows.append(record)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()


EvaluateFunction = TypeVar("EvaluateFunction", bound=Callable[..., "EvalReport"])


def _locked_to_calibrate(function: EvaluateFunction) -> EvaluateFunction:
    """Run `function(checkpoint, ..., calibrate=True)` holding the checkpoint's run folder lock.

    Calibration rewrites the checkpoint: it must not read it while a training writes that folder
    (it would write a stale model back), nor replace it when it is read-only.
    """

    @functools.wraps(function)
    def locked(checkpoint: str | Path, **options: Any) -> EvalReport:
        if not options.get("calibrate"):
            return function(checkpoint, **options)
        check_replaceable(checkpoint)
        with FolderLock(Path(checkpoint).absolute().parent, "run folder"):
            return function(checkpoint, **options)

    return locked  # type: ignore[return-value]


@_locked_to_calibrate
def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    split: str | None = None,
    val_fraction: float | None = None,
    seed: int | None = None,
    split_free: bool | None = None,
    batch_size: int = 16,
    device: str = "auto",
    num_threads: int = 2,
    threshold: float | None = None,
    calibrate: bool = False,
    min_recall: float | None = None,
    min_area: int = 1,
    predictions: str | Path | None = None,
    tile: int | None = None,
    overlap: float | None = None,
    window: str | None = None,
) -> EvalReport:
    """Score `checkpoint` on a dataset's validation part (or all of it with `split="all"`).

    Unset arguments take the checkpoint's training settings. `threshold` overrides the
    checkpoint's thresholds; `calibrate` chooses new ones on these images first (maximum F1, or
    the best F1 at recall >= `min_recall`) and writes them into the checkpoint, holding its run
    folder's lock from reading it to writing it back (a class with nothing to calibrate on keeps
    its stored threshold). With
    `predictions`, the prediction grid of the scored images is written there (PNG). `tile`,
    `overlap` and `window` set or override the checkpoint's tiling (`dli.predict.resolve_tiling`);
    with a tiling, `batch_size` counts tiles.
    """
    from dli.models.unet import encoder_spec
    from dli.pipeline.loader import build_loader
    from dli.predict import resolve_tiling
    from dli.training.datasets import load_datasets
    from dli.training.devices import amp_dtype_for, resolve_device

    if batch_size < 1:
        raise DliError(f"--batch-size {batch_size}: must be an integer >= 1")
    if isinstance(min_area, bool) or not isinstance(min_area, int) or min_area < 1:
        raise DliError(f"--min-area {min_area}: must be an integer >= 1")
    check_min_recall(min_recall)
    if calibrate and threshold is not None:
        raise DliError("--calibrate chooses the thresholds; it cannot be combined with --threshold")
    if min_recall is not None and not calibrate:
        raise DliError("--min-recall applies to --calibrate; pass both")
    document = load_checkpoint(checkpoint)
    trained = TrainConfig.from_dict(resolved_paths(document["config"], Path(checkpoint).absolute().parent))
    torch_device = resolve_device(device)
    if data is None and trained.data is not None and not Path(trained.data).exists():
        # Paths inside an experiment folder are stored relative to the run, so a checkpoint
        # copied out of its folder no longer finds its data.
        raise DliError(
            f"{checkpoint}: the dataset it was trained on, {trained.data}, is not there "
            "(copied away from its run folder?); pass --data"
        )
    data = data if data is not None else trained.data
    split = split or trained.split
    if split not in (*SPLITS, ALL) and not Path(split).is_dir():
        raise DliError(f"--split {split}: not one of {', '.join((*SPLITS, ALL))} and not a folder")
    if split == ALL:
        manifest = _whole_dataset(data)
    else:
        manifest = load_datasets(
            data,
            split,
            val_fraction=trained.val_fraction if val_fraction is None else val_fraction,
            seed=trained.seed if seed is None else seed,
            split_free=trained.split_free if split_free is None else split_free,
            group_by=trained.group_by,
        ).val
    model, info = model_from_checkpoint(document, device=torch_device)
    if manifest.class_names != info.class_names:
        raise DliError(
            f"dataset classes {', '.join(manifest.class_names)} differ from the checkpoint's "
            f"{', '.join(info.class_names)} ({checkpoint})"
        )
    stride = 2 ** encoder_spec(info.encoder).depth
    tiling = resolve_tiling(info.tiling, stride=stride, tile=tile, overlap=overlap, window=window)
    model = model.to(memory_format=torch.channels_last)
    if tiling is None:
        loader = build_loader(
            manifest,
            batch_size=batch_size,
            image_size=info.image_size,
            train=False,
            device=torch_device,
            num_threads=num_threads,
            resize=info.resize,
            channels=info.channels,
            mean=info.mean,
            std=info.std,
            fit=info.aspect == "fit",
            keep_files=False,  # every file is read once
        )
        batches, close = (lambda: loader), loader.close
    else:
        from dli.models.tiled import TiledModel
        from dli.pipeline.native import native_batches

        model = TiledModel(model, tiling, batch=batch_size)
        channels = info.channels
        batches, close = (
            (lambda: native_batches(manifest, info.mean, info.std, channels=channels)),
            (lambda: None),
        )
    names, amp_dtype = info.class_names, amp_dtype_for(torch_device)
    if calibrate:
        calibrator = ThresholdCalibrator(names, device=torch_device)
        evaluate_model(
            model, batches(), names, device=torch_device, amp_dtype=amp_dtype, observers=[calibrator]
        )
        source = f"{'all images' if split == ALL else 'validation set'}, {len(manifest)} images"
        chosen = choose_thresholds(calibrator.curves(), min_recall=min_recall, source=source)
        stored = thresholds_of(document, names) if document.get(CHECKPOINT_KEY) else None
        thresholds, kept = keep_uncalibrated(chosen, stored)
    else:
        thresholds, kept = thresholds_of(document, names, threshold), ()
    pixels = ConfusionCounter(names, device=torch_device, threshold=thresholds.values)
    images = ImageDecisionCounter(names, thresholds.values, min_area=min_area, device=torch_device)
    evaluation = evaluate_model(
        model, batches(), names, device=torch_device, amp_dtype=amp_dtype, observers=[pixels, images]
    )
    close()
    if calibrate:
        try:
            save_checkpoint(checkpoint, {**document, CHECKPOINT_KEY: thresholds.to_state()})
        except OSError as error:
            raise DliError(
                f"cannot store the thresholds in {checkpoint}: {error.strerror or error}"
            ) from None
    if predictions is not None:
        from dli.training.figures import PredictionGrid

        grid = PredictionGrid(
            manifest,
            image_size=info.image_size,
            device=torch_device,
            amp_dtype=amp_dtype,
            num_threads=num_threads,
            native=(info.mean, info.std) if tiling is not None else None,
            channels=info.channels,
            mean=info.mean,
            std=info.std,
            resize=info.resize,
            fit=info.aspect == "fit",
        )
        try:
            grid.write(
                model, predictions, title=f"{Path(checkpoint).name} on {len(manifest)} images ({split})"
            )
        finally:
            grid.close()
    return EvalReport(evaluation.scores, thresholds, pixels.compute(), images.compute(), calibrate, kept)


def _whole_dataset(data: str | None) -> Manifest:
    from dli.data.manifest import read_dataset
    from dli.data.synth import default_dataset
    from dli.data.validation import validate

    manifest = read_dataset(default_dataset() if data is None else data)
    validate(manifest)
    return manifest


def default_output(checkpoint: str | Path) -> Path:
    """Where the table goes without `--out`: beside the checkpoint, `<stem>_eval.csv`."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}_eval.csv")


EVAL_CSV = "eval.csv"
PREDICTIONS_PNG = "predictions.png"


def output_paths(checkpoint: str | Path, out: str | None) -> tuple[Path, Path | None]:
    """(CSV path, prediction grid path or None) for `--out`: a ``.csv`` file, a folder, or unset."""
    if out is None:
        return default_output(checkpoint), None
    path = Path(out)
    if path.suffix.lower() == ".csv":
        return path, None
    if path.exists() and not path.is_dir():
        raise DliError(f"--out {out}: exists and is not a folder (a CSV path must end in .csv)")
    return path / EVAL_CSV, path / PREDICTIONS_PNG


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--data", default=None, help="dataset folder or CSV; unset: the checkpoint's training data"
    )
    parser.add_argument(
        "--split",
        default=None,
        metavar="|".join((*SPLITS, ALL)) + "|DIR",
        help="images to score: the validation part of a split, or all; unset: the checkpoint's split",
    )
    parser.add_argument(
        "--val-fraction", type=float, default=None, help="for --split stratified; unset: as trained"
    )
    parser.add_argument("--seed", type=int, default=None, help="for --split stratified; unset: as trained")
    parser.add_argument(
        "--split-free",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="for --split stratified; unset: as trained",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="images per batch (tiles when predicting by tiles)"
    )
    add_tiling_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--num-threads", type=int, default=2, help="DALI worker threads")
    parser.add_argument(
        "--out",
        default=None,
        help=f"a .csv path, or a folder that receives {EVAL_CSV} and {PREDICTIONS_PNG} (the prediction "
        "grid); unset: <checkpoint stem>_eval.csv beside the checkpoint",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="one probability threshold for every class; unset: the checkpoint's calibrated ones (else 0.5)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="choose each class's threshold on these images (max F1) and store them in the checkpoint",
    )
    parser.add_argument(
        "--min-recall",
        type=float,
        default=None,
        metavar="R",
        help="with --calibrate: the best F1 among thresholds whose pixel recall is >= R",
    )
    parser.add_argument(
        "--min-area",
        type=int,
        default=1,
        help="image level: reject an image when a class has at least this many predicted pixels",
    )


def run(args: argparse.Namespace) -> int:
    out, predictions = output_paths(args.checkpoint, args.out)
    report = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        split=args.split,
        val_fraction=args.val_fraction,
        seed=args.seed,
        split_free=args.split_free,
        batch_size=args.batch_size,
        device=args.device,
        num_threads=args.num_threads,
        threshold=args.threshold,
        calibrate=args.calibrate,
        min_recall=args.min_recall,
        min_area=args.min_area,
        predictions=predictions,
        tile=args.tile,
        overlap=args.overlap,
        window=args.window,
    )
    atomic_write_text(out, report.to_csv())
    print(report.text())
    if report.calibrated_now:
        print(f"thresholds stored in {args.checkpoint}")
    print(f"written: {out}" + (f", {predictions}" if predictions is not None else ""))
    return 0
