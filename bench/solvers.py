"""Benchmark: the two Poisson solvers side by side on one batch and device, and a training step beside them.

    python -m dli.bench.solvers --device cuda --n 64 --size 256 --json solvers.json

One batch as `dli.bench.poisson` builds it (Magnetic Tile defects over defect-free tiles, masks
dilated 5x5 as injection uses them; synthetic tiles without MT data), blended with mixed gradients
and host-given boxes as the training loader calls it, by:

- ``cg``: the preconditioned CG on the region's own problem at training's tolerance;
- ``direct``: one sine-transform solve per window (box plus margin), the device's own layout;
- ``direct-image``: the same on whole-image windows (the reference protocol's choice).

Per solver: the median time per batch with the device synchronized (the work's own time), and the
host time of the call alone (what the training loop waits before it can queue the next step; no
solver reads anything back). Beside them, one ℓ-ResNet18 training step (forward, backward, AdamW;
AMP as `dli train` runs it) on pre-made tensors of the same batch: the injection's share of a step.
And per solver the device model of its CUDA path for the same batch (`dli.kernels.device_model`,
counted on the CPU): `device_model.launches` and `.bytes` beside the measured time, and the host time
per modelled launch (`--no-device-model` skips it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dli.bench import magnetic_tile_root
from dli.bench.poisson import (
    DILATION_RADIUS,
    SYNTHETIC,
    device_model_figures,
    device_model_line,
    magnetic_tile_batch,
    synthetic_batch,
)
from dli.common.atomic import atomic_write_text
from dli.common.errors import DliError
from dli.kernels.morphology import dilate
from dli.kernels.poisson.blend import PoissonConvergenceWarning, measured_boxes, poisson_blend
from dli.pipeline.planner import DliConfig

SOLVERS: dict[str, dict[str, Any]] = {
    "cg": {"solver": "cg", "tol": DliConfig().poisson_tol},
    "direct": {"solver": "direct", "window": "box"},
    "direct-image": {"solver": "direct", "window": "image"},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dli.bench.solvers", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    found = magnetic_tile_root()
    parser.add_argument("--data", default=str(found) if found is not None else SYNTHETIC)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per figure; the median is kept")
    parser.add_argument("--no-training", action="store_true", help="skip the training-step figure")
    parser.add_argument(
        "--no-device-model", action="store_true", help="skip the device model of each solver's CUDA path"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser


def _timed(call: Any, sync: Any, repeats: int) -> tuple[float, float]:
    """Median seconds per call with the device synchronized, and of the host call alone."""
    call()
    sync()
    synced, issued = [], []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        call()
        issued.append(time.perf_counter() - start)
        sync()
        synced.append(time.perf_counter() - start)
    return float(np.median(synced)), float(np.median(issued))


def _training_step_seconds(n: int, size: int, device: str, repeats: int) -> float:
    import torch

    from dli.bench.training_steps import TrainStep

    step = TrainStep("l-resnet18", 5, torch.device(device))
    images = torch.rand(n, 3, size, size, device=device)  # the loader expands gray to 3 channels
    labels = (torch.rand(n, 5, size, size, device=device) > 0.95).float()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    synced, _ = _timed(lambda: step(images, labels), sync, repeats)
    return synced


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.n < 1 or args.size < 8 or args.repeats < 1:
        raise DliError(
            f"--n, --size and --repeats must be >= 1, 8, 1 (got {args.n}, {args.size}, {args.repeats})"
        )
    rng = np.random.default_rng(0)
    if args.data == SYNTHETIC:
        target, source, mask = synthetic_batch(args.n, args.size, rng)
    else:
        target, source, mask = magnetic_tile_batch(Path(args.data), args.n, args.size, rng)
    scale = np.float32(1 / 255)
    target = (target[:, None] * scale).astype(np.float32)
    source = (source[:, None] * scale).astype(np.float32)
    mask = dilate(mask, DILATION_RADIUS)
    boxes = measured_boxes(mask)
    if args.device == "cuda":
        import cupy

        arrays = [cupy.asarray(a) for a in (target, source, mask)]

        def sync() -> None:
            cupy.cuda.Device().synchronize()
    else:
        arrays = [target, source, mask]

        def sync() -> None:
            pass

    figures: dict[str, Any] = {"n": args.n, "size": args.size, "device": args.device, "data": args.data}
    reference, _ = poisson_blend(target, source, mask, mixed_gradients=True, boxes=boxes, **SOLVERS["direct"])
    for name, options in SOLVERS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PoissonConvergenceWarning)
            synced, issued = _timed(
                lambda options=options: poisson_blend(*arrays, mixed_gradients=True, boxes=boxes, **options),
                sync,
                args.repeats,
            )
            blended, info = poisson_blend(*arrays, mixed_gradients=True, boxes=boxes, **options)
        out = blended.get() if args.device == "cuda" else blended
        figures[name] = {
            "ms_per_batch": 1e3 * synced,
            "host_ms_per_batch": 1e3 * issued,
            "summary": info.summary(),
            "max_abs_difference_from_cpu_direct": float(np.abs(out - reference).max())
            if name == "direct"
            else None,
        }
        if not args.no_device_model:
            model = device_model_figures(target, source, mask, mixed_gradients=True, **options)
            figures[name]["device_model"] = model
            figures[name]["host_us_per_modelled_launch"] = 1e3 * issued * 1e3 / max(model["launches"], 1)
    if not args.no_training:
        step = _training_step_seconds(args.n, args.size, args.device, max(3, args.repeats // 2))
        figures["training_step_ms"] = 1e3 * step
        for name in SOLVERS:
            figures[name]["share_of_step"] = figures[name]["ms_per_batch"] / (1e3 * step)
    return figures


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        figures = run(args)
    except DliError as error:
        print(f"bench.solvers: error: {error}", file=sys.stderr)
        return 2
    for name in SOLVERS:
        f = figures[name]
        share = f" = {100 * f['share_of_step']:.1f}% of a step" if "share_of_step" in f else ""
        print(f"{name:13s} {f['ms_per_batch']:8.2f} ms/batch (host {f['host_ms_per_batch']:.2f} ms){share}")
        print(f"{'':13s} {f['summary']}")
        if "device_model" in f:
            per_launch = f"; host {f['host_us_per_modelled_launch']:.1f} us per modelled launch"
            print(f"{'':13s} {device_model_line(f['device_model'])}{per_launch}")
    if "training_step_ms" in figures:
        print(
            f"training step (l-resnet18, batch {args.n}, {args.size}²): {figures['training_step_ms']:.2f} ms"
        )
    if args.json:
        atomic_write_text(args.json, json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
