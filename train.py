"""`dli train`: train a UNet with BCE + Dice (or a rebalancing loss) on DALI batches, optionally with DLI.

The command layer: flags (one per `TrainConfig` field), the config they resolve to (with
`--resume`, the saved run's), the launch of several processes (`--devices K`, or
`torchrun --nproc_per_node=K -m dli.train`; see `dli.training.distributed`), and what is printed at
the end (the run folder, its pictures and the best epoch's per-class table). The loop itself
is `dli.training.trainer.train`; the run folder's files are described in `dli.training.run_folder`.
`--batch-size` stays the global batch with several processes, so a run's data does not
depend on K.

Run as `dli train`, `python -m dli.train` or `python train.py`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dli.common.errors import DliError
from dli.models.checkpoint import load_checkpoint
from dli.models.losses import METHODS
from dli.models.metrics import SegmentationScores
from dli.models.thresholds import CHECKPOINT_KEY as THRESHOLDS_KEY
from dli.models.thresholds import Thresholds
from dli.models.unet import ENCODERS
from dli.pipeline.normalization import CHANNEL_SETTINGS, NORMALIZATIONS
from dli.training.config import (
    CANVAS_CHOICES,
    DEFAULT_PROTOCOL,
    DONOR_UNITS,
    FILLS,
    PAPER_SCHEDULE,
    POISSON_SOLVERS,
    PROTOCOL_CHOICES,
    PROTOCOL_DEFAULTS,
    PROTOCOLS,
    QUICK_SCHEDULE,
    SPLITS,
    TrainConfig,
    flag,
    read_run_config,
)
from dli.training.datasets import datasets_of
from dli.training.devices import resolve_device
from dli.training.distributed import check_batch_split, check_last_batch
from dli.training.figures import CURVES_FILE, PREDICTIONS_FILE
from dli.training.run_folder import (
    BEST,
    CALIBRATED_SCORES_KEY,
    CONFIG_FILE,
    default_run_name,
    prepare_run_folder,
)
from dli.training.trainer import train

if TYPE_CHECKING:
    from dli.training.distributed import ProcessPlace


# ---------------------------------------------------------------------------------------------
# Command line.


DATA_FORMATS = (
    "Dataset formats (--data): a folder MT_<Class>/Imgs/ or <Class>/Imgs/ (image + same-stem .png mask; "
    "the defect-free folder named free, ok or good); a CSV image,mask,class; a folder images/ + masks/ + "
    "classes.txt (index PNG masks: value k = k-th class of classes.txt, 0 = background; several classes "
    "per image); a COCO JSON file "
    "(--data annotations.json: polygons or RLE, category names as classes, images listed without "
    "annotations defect-free); a folder of images with labelme JSON beside them (polygon, rectangle, "
    "circle, ...; the label is the class; images without JSON in a free/ok/good folder or listed in "
    "free.txt are defect-free). COCO and labelme shapes become index masks once, cached in "
    "$DLI_CACHE/annotations (the smaller shape on top where shapes overlap)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `dli train` flags (one per `TrainConfig` field)."""
    d = TrainConfig()
    quick, paper = QUICK_SCHEDULE, PAPER_SCHEDULE
    parser.description = (
        "Train a UNet for defect segmentation. Without --data: a short run on bundled synthetic data "
        f"({quick.epochs} epochs, batch {quick.batch_size}, {quick.image_size} px, lr {quick.lr:g}; about "
        f"two minutes on a 2-core CPU). With --data: the paper's schedule ({paper.epochs} epochs, batch "
        f"{paper.batch_size}, {paper.image_size} px, lr {paper.lr:g}) unless --epochs/--batch-size/"
        "--image-size/--lr say otherwise."
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        default=d.data,
        help="a dataset (formats below; `dli data DATA` shows what training sees of it); unset: the "
        "bundled synthetic data",
    )
    parser.epilog = DATA_FORMATS
    data.add_argument(
        "--split",
        default=d.split,
        metavar="|".join(SPLITS) + "|DIR",
        help="train/val split: seeded and stratified by class set, the published reference split, or a "
        "folder of train_data.csv + val_data.csv",
    )
    data.add_argument(
        "--val-fraction", type=float, default=d.val_fraction, help="share of each class set for validation"
    )
    data.add_argument(
        "--split-free",
        action=argparse.BooleanOptionalAction,
        default=d.split_free,
        help="also split defect-free images (otherwise all train, as in the reference split)",
    )
    data.add_argument(
        "--group-by",
        default=d.group_by,
        metavar="REGEX",
        help="keep images whose paths (relative to the dataset) share this regular expression's first "
        "captured group (a part number, a camera, a date) on one side of the stratified split, e.g. "
        "'part(\\d+)_'; the groups per side are reported",
    )
    data.add_argument(
        "--data-fraction",
        type=float,
        default=d.data_fraction,
        help="share of training images kept (0 < f <= 1)",
    )
    data.add_argument(
        "--image-size",
        type=int,
        default=d.image_size,
        help=f"square training size; unset: {quick.image_size} without --data, {paper.image_size} with it",
    )
    data.add_argument(
        "--aspect",
        choices=("stretch", "fit"),
        default=d.aspect,
        help="whole-image training: stretch each image to the square --image-size (the paper's), or fit "
        "it (aspect ratio kept, longer side = --image-size, padded); recorded, and honoured by eval and "
        "predict",
    )
    data.add_argument(
        "--crop",
        type=int,
        default=d.crop,
        metavar="S",
        help="train on S x S crops at native resolution (cut by DALI; images smaller than S are not "
        "upscaled); validation, eval and predict then run by overlapping S x S tiles; unset: whole "
        "images resized to --image-size",
    )
    data.add_argument(
        "--scale",
        type=float,
        default=d.scale,
        metavar="F",
        help="with --crop: resize images by F in (0, 1] before cropping (and before tiling at inference)",
    )
    data.add_argument(
        "--crop-defect-prob",
        type=float,
        default=d.crop_defect_prob,
        metavar="P",
        help="with --crop: probability that a defect image's crop contains its defect (else uniform)",
    )
    data.add_argument(
        "--channels",
        choices=CHANNEL_SETTINGS,
        default=d.channels,
        help="image channels the model sees: 1 (gray; colour images converted to their luma "
        "0.299 R + 0.587 G + 0.114 B), 3 (RGB; gray images repeated), or auto: 1 when every training "
        "image is gray, else 3",
    )
    data.add_argument(
        "--normalization",
        choices=NORMALIZATIONS,
        default=d.normalization,
        help="per-channel mean/std of the images: measured on the training split (dataset), "
        "ImageNet's, or Magnetic Tile's fixed ones; auto: magnetic-tile for gray data with the "
        "Magnetic Tile classes, imagenet when ImageNet weights were loaded, else dataset "
        "(recorded in config.yaml and the checkpoints)",
    )
    data.add_argument("--num-threads", type=int, default=d.num_threads, help="DALI worker threads")

    method = parser.add_argument_group("method")
    method.add_argument(
        "--method",
        choices=METHODS,
        default=d.method,
        help="loss / rebalancing method (dli = BCE+Dice with DLI)",
    )
    method.add_argument(
        "--poisson-prob",
        type=float,
        default=d.poisson_prob,
        help="DLI: probability of Poisson blending per injection (0 = cut-paste only, 1 = Poisson only)",
    )
    method.add_argument(
        "--fill", choices=FILLS, default=d.fill, help="DLI: which canvas images receive a defect"
    )
    method.add_argument(
        "--donors",
        choices=DONOR_UNITS,
        default=d.donors,
        help="DLI: what one injected defect is: auto (the whole mask of a single-class image, as the paper; "
        "each instance, one class's connected defect, of an image holding several classes) or instance "
        "(instances everywhere)",
    )
    method.add_argument(
        "--canvas",
        choices=CANVAS_CHOICES,
        default=d.canvas,
        help="DLI: the images defects are injected into: free (defect-free images only), any (every "
        "image, into its defect-free area, never over an existing defect), auto (the batch's free "
        "images when it has some, else any)",
    )
    method.add_argument(
        "--poisson-solver",
        choices=POISSON_SOLVERS,
        default=d.poisson_solver,
        help="DLI: Poisson blending by one sine-transform solve per window (direct), or by conjugate "
        "gradients on the region's own problem (cg)",
    )

    protocol = parser.add_argument_group(
        "protocol",
        "--protocol sets the defaults of the settings below: dli (this project's choices) or reference "
        "(as the paper's reference implementation computed them); each setting given overrides it",
    )
    protocol.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=None,
        help=f"training protocol (default {DEFAULT_PROTOCOL}); recorded, a run resumes only under its own",
    )
    protocol_help = {
        "wce_weights": "wce: pos_weight = negative/positive pixels (capped), or the reference's per-class "
        "weights (1 - pixel share) / (C - 1) on per-class mean BCE",
        "balanced_counts": "balanced: effective number of the positive training pixels, or of the "
        "pixel-share weight list taken as counts (reference)",
        "focal": "focal: per-pixel focal loss, or the focal modulation of each class's mean BCE (reference)",
        "dice": "soft Dice per class (mean over classes present), or one Dice over all classes and pixels",
        "decoder_convs": "conv-BN-ReLU layers per UNet decoder block (smp: 2, reference: 4)",
        "poisson_label": "DLI: label of a Poisson injection, the source mask or the dilated blending domain",
        "poisson_window": "DLI: window of the direct Poisson solve, the region's box plus a margin or the "
        "whole image (reference)",
        "resize": "image resizing: antialiased linear or nearest neighbour (masks: always nearest)",
        "lr_schedule": "cosine annealing of the learning rate stepped per step or per epoch",
        "last_batch": "the last incomplete training batch of each epoch: drop or keep",
    }
    for name, help_ in protocol_help.items():
        choices = PROTOCOL_CHOICES[name]
        kind = int if isinstance(choices[0], int) else str
        defaults = "/".join(f"{p}: {PROTOCOL_DEFAULTS[p][name]}" for p in PROTOCOLS)
        protocol.add_argument(
            flag(name), type=kind, choices=choices, default=None, help=f"{help_} (default {defaults})"
        )

    model = parser.add_argument_group("model and optimisation")
    model.add_argument("--encoder", default=d.encoder, help=f"one of {', '.join(ENCODERS)}")
    model.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=d.pretrained,
        help="start from ImageNet weights (falls back to random init, with a warning, when offline)",
    )
    model.add_argument(
        "--epochs",
        type=int,
        default=d.epochs,
        help=f"training epochs; unset: {quick.epochs} without --data, {paper.epochs} with it",
    )
    model.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"images per batch; unset: {quick.batch_size} without --data, {paper.batch_size} with it",
    )
    model.add_argument(
        "--lr",
        type=float,
        default=d.lr,
        help=f"AdamW learning rate, cosine-annealed to 0 (see --lr-schedule); unset: {quick.lr:g} without "
        f"--data, {paper.lr:g} with it",
    )
    model.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    model.add_argument(
        "--seed", type=int, default=d.seed, help="seed of the split, shuffling, injection and init"
    )
    model.add_argument(
        "--max-steps",
        type=int,
        default=d.max_steps,
        help="stop after this many steps in all (smoke tests); unset: no limit",
    )
    model.add_argument(
        "--min-recall",
        type=float,
        default=d.min_recall,
        metavar="R",
        help="calibrate best.pt's per-class thresholds for the best F1 at pixel recall >= R; unset: best F1",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--out", default=d.out, help="run folder; unset: runs/<time>-<encoder>-<method>")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    run.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="validate every k epochs (and at the end)"
    )
    run.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="stop after this many evaluations without a better validation IoU; unset: never",
    )
    run.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    run.add_argument(
        "--devices",
        type=int,
        default=1,
        help="processes (one per GPU, or CPU processes with --device cpu) training one model with "
        "DistributedDataParallel; --batch-size is split among them",
    )
    run.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=d.amp,
        help="mixed precision on GPU (bf16 or fp16); default: on under --protocol dli, fp32 under reference",
    )
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=d.progress, help="show a progress bar"
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` of parsed flags; with `--resume`, the run's saved config updated by given flags."""
    given = TrainConfig(**{name: getattr(args, name) for name in TrainConfig.__dataclass_fields__})
    if not given.resume:
        return given
    if given.out is None:
        raise DliError("--resume needs --out RUN (the run folder to continue)")
    saved, _ = read_run_config(Path(given.out) / CONFIG_FILE)
    saved_protocol = saved.protocol or DEFAULT_PROTOCOL
    if given.protocol is not None and given.protocol != saved_protocol:
        raise DliError(
            f"--protocol {given.protocol}: cannot resume {given.out}, "
            f"trained under --protocol {saved_protocol}"
        )
    return replace(saved, **given.explicit())


def run(args: argparse.Namespace) -> int:
    """`dli train`: train, then print the best epoch's per-class table.

    With `--devices K` (K > 1) this process only checks the inputs and launches K training
    processes; under torchrun (or in one of those) it trains as its rank.
    """
    from dli.pipeline import donor_cache
    from dli.pipeline.file_cache import budget_from_environment
    from dli.training.distributed import ProcessPlace

    config = config_from_args(args)
    # A bad DLI_FILE_CACHE_MB or DLI_DONOR_CACHE_MB: one error before any file is read or written.
    budget_from_environment()
    donor_cache.budget()
    place = ProcessPlace.from_env()
    if place is None or place.world_size == 1:
        if args.devices != 1:
            return launch_processes(config, args.devices)
        return _train_and_report(config)
    if args.devices not in (1, place.world_size):
        raise DliError(f"--devices {args.devices}: this launch has {place.world_size} processes")
    return _train_as(place, config)


def launch_processes(config: TrainConfig, devices: int) -> int:
    """Check `config` and the data once here, then train in `devices` processes
    (`dli.training.distributed`)."""
    from dli.training.distributed import launch

    if devices < 1:
        raise DliError(f"--devices {devices}: must be an integer >= 1")
    checked = config.validate().resolved()
    assert checked.batch_size is not None
    check_batch_split(checked.batch_size, devices)
    check_last_batch(checked.last_batch, devices)
    device = resolve_device(checked.device)
    if device.type == "cuda":
        if checked.device.startswith("cuda:"):
            raise DliError(f"--device {checked.device}: --devices K uses GPUs 0..K-1; pass --device cuda")
        if devices > torch.cuda.device_count():
            raise DliError(f"--devices {devices}: only {torch.cuda.device_count()} CUDA device(s)")
    prepare_run_folder(checked)  # an existing run (or, with --resume, a missing one): one error, here
    datasets_of(checked)  # bad data: one error here, not one per process
    if checked.out is None:
        checked = replace(checked, out=str(Path("runs") / default_run_name(checked)))
    command = [sys.executable, "-m", "dli.train", *checked.to_argv()]
    return launch(command, devices, cpu=device.type == "cpu")


def _train_as(place: ProcessPlace, config: TrainConfig) -> int:
    """Train as one process of a multi-process run (rank 0 reports; the others stay quiet)."""
    from dli.training.distributed import destroy_process_group, init_process_group

    device = resolve_device(config.validate().device, place.local_rank)
    init_process_group(place, device.type)
    try:
        if place.rank != 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rank 0 already says it
                train(config, rank=place.rank, world_size=place.world_size, local_rank=place.local_rank)
            return 0
        return _train_and_report(config, rank=0, world_size=place.world_size, local_rank=place.local_rank)
    finally:
        destroy_process_group()


def _train_and_report(config: TrainConfig, **placement: Any) -> int:
    result = train(config, **placement)  # its warnings: one line each (`dli.cli.run_command`)
    print(f"run folder: {result.run_dir}")
    pictures = [p for p in (result.run_dir / CURVES_FILE, result.run_dir / PREDICTIONS_FILE) if p.is_file()]
    if pictures:
        print(f"pictures: {', '.join(str(p) for p in pictures)}")
    if result.skipped_steps:
        print(f"{result.skipped_steps} steps skipped for a non-finite loss")
    if result.best is None:
        print("no validation IoU was defined (no defect in the validation set was present or predicted)")
        return 0
    print(
        f"best epoch {result.best_epoch} of {result.epochs_completed} (checkpoint {result.run_dir / BEST}):"
    )
    print(result.best.table())
    best = load_checkpoint(result.run_dir / BEST)
    if THRESHOLDS_KEY in best:
        thresholds = Thresholds.from_state(best[THRESHOLDS_KEY])
        calibrated = SegmentationScores.from_state(best[CALIBRATED_SCORES_KEY])
        print(f"calibrated thresholds ({thresholds.rule}, {thresholds.source}): {thresholds.describe()}")
        print(
            f"validation IoU {100 * result.best.iou:.2f}% / F1 {100 * result.best.f1:.2f}% at 0.5, "
            f"{100 * calibrated.iou:.2f}% / {100 * calibrated.f1:.2f}% at the calibrated thresholds"
        )
    return 0


if __name__ == "__main__":
    from dli.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
