"""Benchmark: where the loading thread spends a training batch, with and without the file cache.

    python -m dli.bench.loader_host --data MT_ROOT --device cpu --budgets 0 512 --json host.json

For each file-cache budget (MB, `dli.pipeline.file_cache`; 0 = every file read from disk) and for
the `dli train` loader without and with DLI (reference split when the data has one, else the
stratified split): one warm-up epoch (so the cache holds what fits, as in every epoch after the
first of a run), then `--batches` batches (default: one epoch, so the epoch's planning, done as it
starts, is shared out as in training), reporting the wall time per batch and the host time per
batch in each of `dli.pipeline.loader.HOST_STAGES` (`plan`, `feed` = reading files and handing them
to DALI, `wait` = blocked on DALI's outputs, `assemble` = copies, labels and the injection issued).
On a GPU the device work is queued, so `plan`, `feed` and `assemble` are host time the training
step has to hide; on a CPU everything is computed by the host and the wall time follows `wait`
and `assemble`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dli.bench import magnetic_tile_root
from dli.bench.poisson import SYNTHETIC
from dli.bench.state import endless
from dli.common.atomic import atomic_write_text
from dli.common.errors import DliError
from dli.data.splits import REFERENCE_SPLIT_DIR
from dli.pipeline.file_cache import BUDGET_VARIABLE
from dli.pipeline.loader import HOST_STAGES
from dli.training.components import image_settings_of, injection_of, loaders_of
from dli.training.config import TrainConfig
from dli.training.datasets import datasets_of
from dli.training.devices import resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dli.bench.loader_host", description=__doc__.splitlines()[0]
    )
    found = magnetic_tile_root()
    parser.add_argument(
        "--data",
        default=str(found) if found is not None else None,
        help="dataset, or 'synthetic' for the bundled synthetic data (default: the Magnetic Tile data "
        "beside the repository, else synthetic)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--batches", type=int, default=0, help="timed batches after the warm-up epoch (default 0: one epoch)"
    )
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 512], help="file-cache budgets, MB")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser


def measure(config: TrainConfig, batches: int) -> dict[str, float]:
    """Wall and host-stage milliseconds per batch of the config's training loader, after one epoch."""
    datasets = datasets_of(config)
    device = resolve_device(config.device)
    colour = datasets.colour_files()
    place: dict[str, Any] = {
        "device": device,
        "rank": 0,
        "world_size": 1,
        "batch_size": config.batch_size or 1,
    }
    channels, normalization = image_settings_of(
        config, datasets, None, imagenet_weights=False, colour_files=colour, **place
    )
    loader, _, _ = loaders_of(
        config,
        datasets,
        injection_of(config, datasets),
        channels=channels,
        normalization=normalization,
        colour_files=colour,
        **place,
    )
    stream = endless(loader)
    try:
        for _ in range(len(loader)):  # the warm-up epoch
            next(stream)
        loader.reset_host_times()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        batches = batches or len(loader)  # a whole epoch amortizes its planning, done at its start
        started = time.perf_counter()
        for _ in range(batches):
            next(stream)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - started) / batches
        return {
            "wall_ms": 1e3 * wall,
            **loader.host_ms_per_batch(),
            "cached_files": len(loader.files),
            "cached_mb": loader.files.bytes / 2**20,
            "batches": batches,
        }
    finally:
        stream.close()
        loader.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.data == SYNTHETIC:
        args.data = None
    figures: dict[str, Any] = {"data": args.data or "bundled synthetic data"}
    for budget in args.budgets:
        if budget < 0:
            raise DliError(f"--budgets {budget}: must be >= 0")
    if args.batches < 0:
        raise DliError(f"--batches {args.batches}: must be >= 0 (0: one epoch)")
    for budget in args.budgets:
        os.environ[BUDGET_VARIABLE] = str(budget)  # read by each loader as it is built
        for method in ("bce", "dli"):
            base = TrainConfig(
                data=args.data,
                method=method,
                device=args.device,
                batch_size=args.batch_size,
                image_size=args.image_size,
            )
            reference = args.data and (Path(args.data) / REFERENCE_SPLIT_DIR).is_dir()
            split = "reference" if reference else "stratified"
            config = TrainConfig(**{**base.to_dict(), "split": split}).validate().resolved()
            print(f"bench.loader_host: budget {budget} MB, {method} ...", file=sys.stderr, flush=True)
            figures[f"{method}@{budget}MB"] = measure(config, args.batches)
    return figures


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = os.environ.get(BUDGET_VARIABLE)
    try:
        figures = run(args)
    except DliError as error:
        print(f"bench.loader_host: error: {error}", file=sys.stderr)
        return 2
    finally:
        if previous is None:
            os.environ.pop(BUDGET_VARIABLE, None)
        else:
            os.environ[BUDGET_VARIABLE] = previous
    print(f"ms per batch, after a warm-up epoch ({figures['data']})")
    for name, f in figures.items():
        if isinstance(f, dict):
            stages = ", ".join(f"{k} {f[k]:.1f}" for k in HOST_STAGES)
            print(
                f"  {name:14s} wall {f['wall_ms']:7.1f}; host: {stages}; "
                f"{f['batches']} batches, {f['cached_files']} files ({f['cached_mb']:.0f} MB) cached"
            )
    if args.json:
        atomic_write_text(args.json, json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
