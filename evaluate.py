"""`dli eval`: the per-class IoU/F1 table of a checkpoint on a dataset, printed and saved as CSV.

The checkpoint carries what rebuilding the model needs (encoder, classes, image size,
normalization) and the training config, whose split settings are the defaults here: without
flags, a checkpoint is scored on the validation part of the data it was trained on.

`--out` names the CSV file, or a folder (any path not ending in ``.csv``) that receives
`eval.csv` and `predictions.png`, the prediction grid of `dli.figures` for the scored images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dli.atomic import atomic_write_text
from dli.checkpoint import load_checkpoint, model_from_checkpoint
from dli.config import SPLITS, TrainConfig
from dli.errors import DliError
from dli.models.metrics import SegmentationScores, evaluate_model
from dli.pipeline.manifest import Manifest

ALL = "all"
"""`--split all`: score every image of the dataset."""


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
    predictions: str | Path | None = None,
) -> SegmentationScores:
    """Score `checkpoint` on a dataset's validation part (or all of it with `split="all"`).

    Unset arguments take the checkpoint's training settings. With `predictions`, the prediction
    grid of the scored images is written there (PNG).
    """
    from dli.pipeline.loader import build_loader
    from dli.train import amp_dtype_for, load_datasets, resolve_device

    if batch_size < 1:
        raise DliError(f"--batch-size {batch_size}: must be an integer >= 1")
    document = load_checkpoint(checkpoint)
    trained = TrainConfig.from_dict(document["config"])
    torch_device = resolve_device(device)
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
        ).val
    model, info = model_from_checkpoint(document, device=torch_device)
    if manifest.class_names != info.class_names:
        raise DliError(
            f"dataset classes {', '.join(manifest.class_names)} differ from the checkpoint's "
            f"{', '.join(info.class_names)} ({checkpoint})"
        )
    loader = build_loader(
        manifest,
        batch_size=batch_size,
        image_size=info.image_size,
        train=False,
        device="cuda" if torch_device.type == "cuda" else "cpu",
        num_threads=num_threads,
    )
    model = model.to(memory_format=torch.channels_last)
    amp_dtype = amp_dtype_for(torch_device)
    evaluation = evaluate_model(model, loader, info.class_names, device=torch_device, amp_dtype=amp_dtype)
    loader.close()
    if predictions is not None:
        from dli.figures import PredictionGrid

        grid = PredictionGrid(
            manifest,
            image_size=info.image_size,
            device=torch_device,
            amp_dtype=amp_dtype,
            num_threads=num_threads,
        )
        try:
            grid.write(
                model, predictions, title=f"{Path(checkpoint).name} on {len(manifest)} images ({split})"
            )
        finally:
            grid.close()
    return evaluation.scores


def _whole_dataset(data: str | None) -> Manifest:
    from dli.pipeline.manifest import read_dataset, validate
    from dli.pipeline.synth import default_dataset

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
    parser.add_argument(
        "--checkpoint",
        required=True,
        default=argparse.SUPPRESS,
        help="a best.pt or last.pt written by dli train",
    )
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
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--num-threads", type=int, default=2, help="DALI worker threads")
    parser.add_argument(
        "--out",
        default=None,
        help=f"a .csv path, or a folder that receives {EVAL_CSV} and {PREDICTIONS_PNG} (the prediction "
        "grid); unset: <checkpoint stem>_eval.csv beside the checkpoint",
    )


def run(args: argparse.Namespace) -> int:
    out, predictions = output_paths(args.checkpoint, args.out)
    scores = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        split=args.split,
        val_fraction=args.val_fraction,
        seed=args.seed,
        split_free=args.split_free,
        batch_size=args.batch_size,
        device=args.device,
        num_threads=args.num_threads,
        predictions=predictions,
    )
    atomic_write_text(out, scores.to_csv())
    print(scores.table())
    print(f"written: {out}" + (f", {predictions}" if predictions is not None else ""))
    return 0
