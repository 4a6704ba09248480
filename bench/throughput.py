"""`dli bench`: throughput of the data path, injection kernels and training, and of the usual alternative.

    dli bench --device cuda --data /path/to/MT --json bench-h100.json
    dli bench --quick --device cpu          # a CPU smoke run of under a minute
    python -m dli.bench.throughput ...      # the same; also `python bench/throughput.py ...`

One run, one device, one dataset (default: the bundled synthetic set), one batch and image size,
in three sections, each in its own module (`--tiling` runs a fourth one alone instead,
`dli.bench.tiling`: tiled ONNX prediction of a large image on the CPU and its overlap overhead):

1. Data path (`dli.bench.data_path`): images/s of the DALI loader without and with Dynamic Label
   Injection, and of the practitioner's alternative (`dli.bench.baseline`: a PyTorch DataLoader
   with OpenCV) executing the very same plans.
2. Injection kernels (`dli.bench.injection`), per batch: the planner, `inject` and each of its
   steps, OpenCV's injection of the same plan; one CG step against its memory-bandwidth floor.
3. Training (`dli.bench.training_steps`): images/s of `dli train` steps fed by the DALI + DLI
   loader, by pre-made tensors already on the device and by the baseline; peak GPU memory.

Every figure is timed over `--repeats` windows of `--batches` batches after a warm-up (GPU work
synchronized at both ends of a window; `dli.bench.timing`) and reported as median, min and max,
with the samples, in a JSON file beside a short table (`dli.bench.report`). Speed is never
asserted by the tests; this measures it.

This module is the command: its flags and their defaults (`add_arguments`, `resolve_settings`),
`prepare` (the device, the validated dataset and the state the sections share,
`dli.bench.state.Bench`), `measure` (the sections and the JSON record) and `run`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dli.bench.baseline import sample_files
from dli.bench.data_path import measure_data_path
from dli.bench.injection import measure_kernels
from dli.bench.report import SCHEMA_VERSION, device_name, git_state, load_average, table, versions
from dli.bench.state import Bench, Settings
from dli.bench.training_steps import measure_training
from dli.common.atomic import atomic_write_text
from dli.common.errors import DliError
from dli.data.manifest import FREE, read_dataset
from dli.data.validation import validate
from dli.models.unet import ENCODERS
from dli.pipeline.loader import MT_MEAN, MT_STD
from dli.pipeline.planner import DliConfig
from dli.training.config import TrainConfig


@dataclass(frozen=True)
class Defaults:
    """Settings a run takes when the flags leave them unset."""

    batch_size: int
    image_size: int
    repeats: int
    batches: int
    warmup: int
    workers: int | None = None  # None: min(8, CPU count)


FULL_CUDA = Defaults(batch_size=64, image_size=256, repeats=5, batches=10, warmup=3)
FULL_CPU = Defaults(batch_size=64, image_size=256, repeats=3, batches=2, warmup=1)
QUICK = Defaults(batch_size=8, image_size=64, repeats=1, batches=1, warmup=1, workers=0)
"""`--quick`: a CPU smoke run of under a minute (what the test suite runs)."""


# ---------------------------------------------------------------------------------------------
# Command line.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `dli bench` flags."""
    train = TrainConfig()
    parser.description = (
        "Measure images/s of the data path (DALI, with and without DLI), the injection kernels and "
        "training steps on one device, against a PyTorch DataLoader + OpenCV baseline running the "
        "same injection plans. Prints a table and writes every figure to a JSON file."
    )
    # Flags whose default depends on --device or --quick are left out of the namespace when not
    # given (SUPPRESS): their help states the defaults, `resolve_settings` fills them in.
    unset = argparse.SUPPRESS
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where decoding, injection and training run (cuda when available)",
    )
    parser.add_argument(
        "--data", default=unset, help="dataset folder or CSV; without it, the bundled synthetic data"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=unset,
        help=f"images per batch: {FULL_CUDA.batch_size}, {QUICK.batch_size} with --quick",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=unset,
        help=f"square image side: {FULL_CUDA.image_size}, {QUICK.image_size} with --quick",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=unset,
        help=f"timed windows per figure: {FULL_CUDA.repeats} on cuda, {FULL_CPU.repeats} on cpu, "
        f"{QUICK.repeats} with --quick",
    )
    parser.add_argument(
        "--batches",
        type=int,
        default=unset,
        help=f"batches per timed window: {FULL_CUDA.batches} on cuda, {FULL_CPU.batches} on cpu, "
        f"{QUICK.batches} with --quick",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=unset,
        help=f"untimed batches before timing: {FULL_CUDA.warmup} on cuda, {FULL_CPU.warmup} on cpu, "
        f"{QUICK.warmup} with --quick",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=unset,
        help=f"worker processes of the baseline DataLoader: min(8, CPU count), {QUICK.workers} with --quick",
    )
    parser.add_argument(
        "--num-threads", type=int, default=train.num_threads, help="DALI threads, as `dli train`"
    )
    parser.add_argument(
        "--encoders",
        nargs="+",
        default=[train.encoder],
        metavar="ENCODER",
        help=f"models whose training steps are timed, from {', '.join(ENCODERS)}",
    )
    parser.add_argument(
        "--poisson-prob",
        type=float,
        default=train.poisson_prob,
        help="DLI: probability of Poisson blending per injection, as `dli train`",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of shuffling and injection plans")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a CPU smoke run of under a minute (flags given explicitly still win)",
    )
    parser.add_argument(
        "--json", type=Path, default=unset, help="where to write the figures: bench-<device>.json"
    )
    tiling = parser.add_argument_group("tiled prediction (--tiling: this section alone, on the CPU)")
    tiling.add_argument(
        "--tiling",
        action="store_true",
        help="time tiled ONNX prediction of one large image instead of the other sections",
    )
    tiling.add_argument(
        "--onnx", default=None, help="the model to time; unset: a random export of the first --encoders"
    )
    tiling.add_argument("--tile", type=int, default=512, help="tile side S")
    tiling.add_argument("--overlap", type=float, default=0.25, help="tile overlap, in [0, 0.9]")
    tiling.add_argument(
        "--tiling-image", default="2448x2048", metavar="WxH", help="size of the predicted image"
    )


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Fill unset flags from the device's (or `--quick`) defaults and check every value."""
    defaults = QUICK if args.quick else FULL_CUDA if args.device == "cuda" else FULL_CPU

    def pick(name: str) -> Any:
        value = getattr(args, name, None)
        return getattr(defaults, name) if value is None else value

    workers = pick("workers")
    settings = Settings(
        device=args.device,
        data=getattr(args, "data", None) or "",
        images=0,
        batch_size=pick("batch_size"),
        image_size=pick("image_size"),
        repeats=pick("repeats"),
        batches=pick("batches"),
        warmup=pick("warmup"),
        workers=min(8, os.cpu_count() or 1) if workers is None else workers,
        num_threads=args.num_threads,
        encoders=tuple(args.encoders),
        poisson_prob=args.poisson_prob,
        seed=args.seed,
        quick=bool(args.quick),
    )
    for name, minimum in (
        ("batch_size", 1),
        ("repeats", 1),
        ("batches", 1),
        ("warmup", 0),
        ("workers", 0),
        ("num_threads", 1),
        ("seed", 0),
    ):
        value = getattr(settings, name)
        if value < minimum:
            raise DliError(f"--{name.replace('_', '-')} {value}: must be >= {minimum}")
    if not 0.0 <= settings.poisson_prob <= 1.0:
        raise DliError(f"--poisson-prob {settings.poisson_prob}: must be in [0, 1]")
    for encoder in settings.encoders:
        if encoder not in ENCODERS:
            raise DliError(f"--encoders {encoder}: unknown encoder; choose from {', '.join(ENCODERS)}")
        stride = 2 ** ENCODERS[encoder].depth
        if settings.image_size < 32 or settings.image_size % stride:
            raise DliError(
                f"--image-size {settings.image_size}: must be >= 32 and a multiple of {stride} for {encoder}"
            )
    return settings


# ---------------------------------------------------------------------------------------------
# The run.


def prepare(settings: Settings) -> Bench:
    """Check the device, read and validate the dataset, and set up the shared state."""
    if settings.device == "cuda":
        if not torch.cuda.is_available():
            raise DliError("--device cuda: no CUDA GPU is available on this machine")
        try:
            import cupy
        except ImportError:
            raise DliError("--device cuda needs CuPy: pip install 'dli[cuda12]'") from None
        except (OSError, RuntimeError) as error:  # e.g. no writable kernel cache under $HOME
            raise DliError(
                f"--device cuda: CuPy fails to import ({type(error).__name__}: {error}); "
                "if it cannot create its kernel cache, set CUPY_CACHE_DIR to a writable folder"
            ) from None
        if not cupy.is_available():
            raise DliError("--device cuda: CuPy finds no usable CUDA GPU")
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if settings.device == "cuda"
        else torch.device("cpu")
    )
    if settings.data:
        path = Path(settings.data).absolute()
    else:
        from dli.data.synth import default_dataset

        path = default_dataset()
    manifest = read_dataset(path)
    report = validate(manifest)
    ids = np.asarray(manifest.class_ids())
    # Sources as training should take them: defect images whose mask has defect pixels.
    donors = tuple(int(i) for i in np.flatnonzero((ids != FREE) & (report.mask_fractions > 0)))
    if not (ids == FREE).any() or not donors:
        raise DliError(f"{path}: injection needs defect-free images and defect images with non-empty masks")
    if len(manifest) < settings.batch_size:
        raise DliError(f"{path}: {len(manifest)} images, fewer than one batch of {settings.batch_size}")
    settings = Settings(**{**asdict(settings), "data": str(path), "images": len(manifest)})
    return Bench(
        settings=settings,
        device=device,
        manifest=manifest,
        samples=sample_files(manifest),
        donors=donors,
        source_boxes=report.mask_boxes,
        dli=DliConfig(poisson_prob=settings.poisson_prob),
        mean=MT_MEAN,
        std=MT_STD,
    )


def measure(settings: Settings) -> dict[str, Any]:
    """Every figure of one run, as a JSON-ready dict (layout: `SCHEMA_VERSION`)."""
    started, load_before = time.perf_counter(), load_average()
    bench = prepare(settings)
    if bench.cuda:
        torch.cuda.init()
    marks = [time.perf_counter()]
    data_path = measure_data_path(bench)
    marks.append(time.perf_counter())
    kernels = measure_kernels(bench)
    device_model = kernels.pop("device_model")  # top level: `device_model.launches`, as bench.poisson
    marks.append(time.perf_counter())
    inject_seconds = kernels["seconds_per_batch"]["inject"]["median"]
    training = {e: measure_training(bench, e, inject_seconds) for e in bench.settings.encoders}
    marks.append(time.perf_counter())
    sections = ("data_path", "kernels", "training")
    return {
        "schema": SCHEMA_VERSION,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "git": git_state(),
        "device": {
            "type": bench.device.type,
            "name": device_name(bench.device),
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        "versions": versions(),
        "settings": asdict(bench.settings) | {"dli": bench.dli.to_dict()},
        "data_path": data_path,
        "kernels": kernels,
        "device_model": device_model,
        "training": training,
        "seconds": {
            "setup": marks[0] - started,
            **{name: marks[i + 1] - marks[i] for i, name in enumerate(sections)},
            "total": marks[-1] - started,
        },
    }


def run(args: argparse.Namespace) -> int:
    """`dli bench`: measure, print the table, write the JSON."""
    if args.tiling:
        return _run_tiling(args)
    settings = resolve_settings(args)
    path = getattr(args, "json", None) or Path(f"bench-{settings.device}.json")
    figures = measure(settings)
    return _report(table(figures), figures, path)


def _report(text: str, figures: dict[str, Any], path: Path) -> int:
    """Print the table, write the figures to the `--json` path: `dli bench`'s exit status."""
    print(text)
    try:
        atomic_write_text(path, json.dumps(figures, indent=2) + "\n")
    except OSError as error:
        raise DliError(f"--json {path}: cannot write: {error}") from None
    print(f"figures written to {path}")
    return 0


def _run_tiling(args: argparse.Namespace) -> int:
    from dli.bench.tiling import measure_tiling, tiling_table
    from dli.pipeline.tiling import check_overlap

    check_overlap(args.overlap)
    try:
        width, height = (int(side) for side in args.tiling_image.lower().split("x"))
    except ValueError:
        raise DliError(f"--tiling-image {args.tiling_image}: expected WxH, e.g. 2448x2048") from None
    figures = measure_tiling(
        args.onnx,
        encoder=args.encoders[0],
        tile=args.tile,
        overlap=args.overlap,
        image=(width, height),
        repeats=getattr(args, "repeats", 3),
    )
    figures = {
        "schema": SCHEMA_VERSION,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "git": git_state(),
        "device": {"type": "cpu", "cpu_count": os.cpu_count(), "load_average": load_average()},
        "versions": versions(),
        "tiling": figures,
    }
    path = getattr(args, "json", None) or Path("bench-tiling.json")
    return _report(tiling_table(figures["tiling"]), figures, path)


if __name__ == "__main__":
    from dli.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
