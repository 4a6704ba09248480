"""Benchmark: batched Poisson blending (`dli.kernels.poisson`) against OpenCV's seamlessClone.

    python -m dli.bench.poisson --n 64 --device cuda --json poisson.json

A batch is N x 1 x S x S (default 64 x 256²): Magnetic Tile defect images as sources (the defect
stays where it was), defect-free MT images as targets, and the defects' masks resized to S² and
dilated by a 5x5 square, as the injection step uses them (synthetic blobs when no MT data). It
reports PCG iterations (median/max over the systems), the window buckets, the time per batch
(wall and this process's CPU time) with the default boundary-matched starting guess and from
zeros, OpenCV's `seamlessClone` per image on the CPU for the same batch (one OpenCV thread;
NORMAL_CLONE for source gradients, MIXED_CLONE for mixed ones), the memory traffic per batch and
the bandwidth floor.

The MT data is found as the tests find it: `$DLI_MT_ROOT`, else the `shared/data/magnetic-tiles`
folder beside the repository; else the benchmark runs on synthetic data (`--data synthetic`).

OpenCV solves a different discretisation, so its pixels are not a reference: it takes the
source's gradients only inside the mask eroded by three 3x3 erosions (the target's elsewhere in
the mask's bounding box) and solves on that whole box with a sine-transform solver. On small
defects this moves the result by several gray levels (the table reports the mean difference);
`tests/test_poisson.py` checks this solver against a direct sparse solve instead. OpenCV also
needs 3-channel 8-bit images, so it processes the gray images three times over.

Solvers. `--solver cg` (default) is the preconditioned CG, with the figures above; `--solver
direct` the direct sine-transform blender (`--window box|image`), which has no iterations, no
starting guess and no setup-only run.

Device model. For the same batch, the CUDA path's device operations and the bytes they move
(`dli.kernels.device_model`: the CUDA branch run on the CPU over a counting array module, with the
regions' boxes given on the host as training gives them): JSON `device_model.launches`,
`device_model.bytes` and their parts. `--no-device-model` skips it (it takes seconds).

Traffic and floor. `PoissonInfo.traffic_bytes` counts the array elements each PCG step reads and
writes per window pixel of each system (`words_per_pixel_step`, the transforms included), over
the steps and systems that ran. Divided by the steps it is the traffic of one step, and divided
again by the device's copy bandwidth (2 x bytes of a large array copy over its time) it is the
floor per step; the table puts the measured time per step (solve minus setup, over the steps)
beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from dli.bench import magnetic_tile_root
from dli.common.atomic import atomic_write_text
from dli.common.errors import DliError
from dli.kernels.morphology import dilate
from dli.kernels.poisson.blend import (
    SOLVERS,
    PoissonConvergenceWarning,
    PoissonInfo,
    measured_boxes,
    poisson_blend,
)
from dli.pipeline.planner import POISSON_WINDOWS

SYNTHETIC = "synthetic"
DILATION_RADIUS = 2
"""5x5 square, as the reference implementation grows masks before cloning."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dli.bench.poisson", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    found = magnetic_tile_root()
    parser.add_argument(
        "--data",
        default=str(found) if found is not None else SYNTHETIC,
        help=f"Magnetic Tile root, or {SYNTHETIC!r} for generated tiles and blobs "
        "(default: $DLI_MT_ROOT, else shared/data/magnetic-tiles beside the repository, else synthetic)",
    )
    parser.add_argument(
        "--gradients",
        choices=("mixed", "source"),
        default="mixed",
        help="guidance field: mixed gradients as injection uses them (default), or the source's",
    )
    parser.add_argument("--tol", type=float, default=1e-5, help="relative residual tolerance (default 1e-5)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure; the median is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-opencv", action="store_true", help="skip the OpenCV comparison")
    parser.add_argument(
        "--solver", choices=SOLVERS, default="cg", help="Poisson solver: cg (default) or direct"
    )
    parser.add_argument(
        "--window", choices=POISSON_WINDOWS, default="box", help="the direct solver's window (default box)"
    )
    parser.add_argument(
        "--no-device-model", action="store_true", help="skip the device model of the CUDA path"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser


def _resized(path: Path, size: int, resample: Image.Resampling) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L").resize((size, size), resample))


def magnetic_tile_batch(root: Path, n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(target, source, mask): free MT images, defect MT images and their masks, resized to size²."""
    from dli.data.manifest import FREE, read_dataset

    manifest = read_dataset(root)
    defects = [s for s in manifest.samples if s.class_id != FREE and s.mask is not None]
    free = [s for s in manifest.samples if s.class_id == FREE]
    if not defects or not free:
        raise DliError(f"{root}: needs both defect and defect-free images for the benchmark")
    pick_defects = rng.choice(len(defects), n, replace=n > len(defects))
    pick_free = rng.choice(len(free), n, replace=n > len(free))
    source = np.stack([_resized(defects[i].image, size, Image.Resampling.BILINEAR) for i in pick_defects])
    mask = np.stack([_resized(defects[i].mask, size, Image.Resampling.NEAREST) > 0 for i in pick_defects])
    target = np.stack([_resized(free[i].image, size, Image.Resampling.BILINEAR) for i in pick_free])
    return target, source, mask


def synthetic_batch(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(target, source, mask): shaded grainy uint8 tiles and smooth random blobs."""

    def tiles(mean: float) -> np.ndarray:
        shading = ndimage.gaussian_filter(rng.random((n, size, size)), (0, size / 16, size / 16))
        grain = rng.normal(0, 8, (n, size, size))
        return np.clip(mean + 600 * (shading - shading.mean()) + grain, 0, 255).astype(np.uint8)

    noise = ndimage.gaussian_filter(rng.random((n, size, size)), (0, size / 20, size / 20))
    level = np.quantile(noise, rng.uniform(0.9, 0.999, n), axis=(1, 2)).diagonal()
    return tiles(110.0), tiles(80.0), noise > level[:, None, None]


def copy_bandwidth(xp: ModuleType, sync: Callable[[], None], nbytes: int = 1 << 28) -> float:
    """Device memory bandwidth in bytes/s: 2 x size of a large array copy over its median time."""
    source = xp.ones(nbytes // 4, dtype=np.float32)
    destination = xp.empty_like(source)
    times = []
    for _ in range(6):
        sync()
        start = time.perf_counter()
        xp.copyto(destination, source)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / float(np.median(times[1:]))


def timed(call: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> tuple[float, float, Any]:
    """Median wall and CPU time (this process, all threads) of `call` over `repeats` runs after a warm-up."""
    result = call()
    wall, cpu = [], []
    for _ in range(repeats):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = call()
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)), float(np.median(cpu)), result


def opencv_clone(
    target: np.ndarray, source: np.ndarray, mask: np.ndarray, *, mixed: bool
) -> tuple[float, float, np.ndarray, int]:
    """seamlessClone per image (3-channel, as OpenCV requires), one OpenCV thread.

    Returns wall seconds, CPU seconds, the gray results and the number of failed images.
    """
    import cv2

    cv2.setNumThreads(1)
    flag = cv2.MIXED_CLONE if mixed else cv2.NORMAL_CLONE
    sources = [cv2.cvtColor(s, cv2.COLOR_GRAY2BGR) for s in source]
    targets = [cv2.cvtColor(t, cv2.COLOR_GRAY2BGR) for t in target]
    masks = [m.astype(np.uint8) * 255 for m in mask]
    results, failures = target.copy(), 0
    start, start_cpu = time.perf_counter(), time.process_time()
    for i, (s, t, m) in enumerate(zip(sources, targets, masks, strict=True)):
        if not m.any():
            continue
        x, y, w, h = cv2.boundingRect(m)
        try:  # the centre of the mask's bounding box puts the source back where it was
            results[i] = cv2.seamlessClone(s, t, m.copy(), (x + w // 2, y + h // 2), flag)[..., 0]
        except cv2.error:
            failures += 1
    return time.perf_counter() - start, time.process_time() - start_cpu, results, failures


def _array_module(device: str) -> tuple[ModuleType, Callable[[], None]]:
    if device == "cpu":
        return np, lambda: None
    try:
        import cupy

        if not cupy.is_available():
            raise DliError("--device cuda: CuPy finds no usable CUDA GPU")
    except ImportError:
        raise DliError("--device cuda needs CuPy (pip install 'dli[cuda12]')") from None
    return cupy, lambda: cupy.cuda.Device().synchronize()


def _iterations(info: PoissonInfo) -> dict[str, float]:
    return {"median": float(np.median(info.iterations)), "max": int(info.iterations.max())}


def device_model_figures(
    target: np.ndarray, source: np.ndarray, mask: np.ndarray, **options: Any
) -> dict[str, Any]:
    """The CUDA path's device operations for this batch (`dli.kernels.device_model`), steady state.

    The regions' boxes are measured here on the host and passed, as training passes them, so
    the solve reads nothing back.
    """
    from dli.kernels import device_model

    cg = options.get("solver", "cg") == "cg"
    arrays = [device_model.to_model(a) for a in (target, source, mask)]
    boxes = measured_boxes(mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoissonConvergenceWarning)
        # The CG's caches fill in its setup: warm them without the (costly to simulate) steps.
        warm = (lambda: poisson_blend(*arrays, boxes=boxes, **options | {"max_iter": 0})) if cg else True
        counts = device_model.cost(lambda: poisson_blend(*arrays, boxes=boxes, **options), warm_up=warm)
    return counts.as_dict()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All figures of one benchmark run, as a JSON-ready dict."""
    if args.n < 1 or args.size < 8 or args.repeats < 1:
        raise DliError(
            f"--n, --size and --repeats must be >= 1, 8, 1 (got {args.n}, {args.size}, {args.repeats})"
        )
    rng = np.random.default_rng(args.seed)
    if args.data == SYNTHETIC:
        target8, source8, mask = synthetic_batch(args.n, args.size, rng)
    else:
        if not Path(args.data).is_dir():
            raise DliError(f"--data {args.data}: not a folder (give the MT root or {SYNTHETIC!r})")
        target8, source8, mask = magnetic_tile_batch(Path(args.data), args.n, args.size, rng)
    mask = dilate(mask, DILATION_RADIUS)
    mixed = args.gradients == "mixed"
    xp, sync = _array_module(args.device)
    target = xp.asarray(target8[:, None] / np.float32(255))
    source = xp.asarray(source8[:, None] / np.float32(255))
    region = xp.asarray(mask)

    cg = args.solver == "cg"
    solver = {"solver": args.solver} | ({} if cg else {"window": args.window})

    def blend(**options: Any) -> tuple[Any, PoissonInfo]:
        return poisson_blend(target, source, region, tol=args.tol, mixed_gradients=mixed, **solver, **options)

    matched_s, matched_cpu, (blended, matched) = timed(blend, args.repeats, sync)
    if cg:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PoissonConvergenceWarning)
            setup_s, setup_cpu, _ = timed(lambda: blend(max_iter=0), args.repeats, sync)  # all but the steps
        zeros_s, zeros_cpu, (_, zeros) = timed(lambda: blend(x0="zeros"), args.repeats, sync)
    else:  # no iterations, no starting guess: the blend is all setup
        setup_s, setup_cpu, zeros_s, zeros_cpu, zeros = matched_s, matched_cpu, None, None, matched

    bandwidth = copy_bandwidth(xp, sync)
    steps = max(matched.steps, 1)
    windows = matched.windows
    figures: dict[str, Any] = {
        "config": {
            "n": args.n,
            "size": args.size,
            "device": args.device,
            "data": args.data,
            "gradients": args.gradients,
            "tol": args.tol,
            "solver": args.solver,
            "window": None if cg else args.window,
            "repeats": args.repeats,
            "seed": args.seed,
        },
        "mask_fraction_median": float(np.median(mask.mean(axis=(1, 2)))),
        "window": list(matched.window),
        "buckets": matched.buckets,
        "window_pixels": int((windows[:, 0] * windows[:, 1]).sum()),
        "max_iter": matched.max_iter,
        "iterations": (
            {"boundary_matched_start": _iterations(matched), "zero_start": _iterations(zeros)} if cg else None
        ),
        "all_converged": matched.all_converged and zeros.all_converged,
        "seconds_per_batch": {
            "boundary_matched_start": matched_s,
            "zero_start": zeros_s,
            "setup_only": setup_s,
        },
        "cpu_seconds_per_batch": {
            "boundary_matched_start": matched_cpu,
            "zero_start": zeros_cpu,
            "setup_only": setup_cpu,
        },
        "steps": matched.steps,
        "traffic_bytes_per_batch": matched.traffic_bytes,
        "bandwidth_bytes_per_s": bandwidth,
        "traffic_bytes_per_step": matched.traffic_bytes / steps,
        "floor_seconds_per_step": matched.traffic_bytes / steps / bandwidth,
        "measured_seconds_per_step": max(matched_s - setup_s, 0.0) / steps,
        "load_average": list(os.getloadavg()),
        "device_model": None,
    }
    if not args.no_device_model:
        options = solver | {"tol": args.tol, "mixed_gradients": mixed}
        host = (target8[:, None] / np.float32(255), source8[:, None] / np.float32(255), mask)
        figures["device_model"] = device_model_figures(*host, **options)
    if not args.no_opencv:
        wall, cpu, opencv_results, failures = [], [], None, 0
        for _ in range(args.repeats):
            seconds, cpu_seconds, opencv_results, failures = opencv_clone(target8, source8, mask, mixed=mixed)
            wall.append(seconds)
            cpu.append(cpu_seconds)
        ours = np.clip(np.rint(_host(blended)[:, 0] * 255), 0, 255)
        inside = mask & (mask.sum(axis=(1, 2)) > 0)[:, None, None]
        figures["opencv"] = {
            "seconds_per_batch": float(np.median(wall)),
            "cpu_seconds_per_batch": float(np.median(cpu)),
            "failures": failures,
            "mean_abs_difference_gray_levels": float(np.abs(ours - opencv_results)[inside].mean()),
        }
    return figures


def _host(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def table(figures: dict[str, Any]) -> str:
    """The figures as a short aligned table."""
    config, its = figures["config"], figures["iterations"]
    secs, cpu = figures["seconds_per_batch"], figures["cpu_seconds_per_batch"]
    lines = [
        f"Poisson blend, {config['n']} x 1 x {config['size']}² on {config['device']} ({config['data']}), "
        f"{config['gradients']} gradients, tol {config['tol']:g}, budget {figures['max_iter']}; "
        f"{figures['buckets']} window bucket(s) up to {figures['window'][0]}x{figures['window'][1]}, "
        f"{figures['window_pixels']} window pixels; "
        f"median mask fraction {figures['mask_fraction_median']:.4f}",
        f"{'':32}{'iterations med/max':>20}{'ms / batch':>12}{'CPU ms':>10}",
    ]
    if its is None:  # the direct solver
        name = f"dli, direct ({config['window']} windows)"
        timing = f"{secs['boundary_matched_start'] * 1e3:>12.1f}{cpu['boundary_matched_start'] * 1e3:>10.1f}"
        lines.append(f"{name:32}{'-':>20}{timing}")
    else:
        for name, key in (
            ("dli, boundary-matched start", "boundary_matched_start"),
            ("dli, zero start", "zero_start"),
        ):
            counts = f"{its[key]['median']:g} / {its[key]['max']}"
            lines.append(f"{name:32}{counts:>20}{secs[key] * 1e3:>12.1f}{cpu[key] * 1e3:>10.1f}")
        setup = f"{secs['setup_only'] * 1e3:>12.1f}{cpu['setup_only'] * 1e3:>10.1f}"
        lines.append(f"{'dli, setup only (max_iter=0)':32}{'':>20}{setup}")
    if "opencv" in figures:
        cv = figures["opencv"]
        timing = f"{cv['seconds_per_batch'] * 1e3:>12.1f}{cv['cpu_seconds_per_batch'] * 1e3:>10.1f}"
        lines.append(f"{'OpenCV seamlessClone (1 thread)':32}{'':>20}{timing}")
        ratio = cv["cpu_seconds_per_batch"] / max(cpu["boundary_matched_start"], 1e-12)
        lines.append(
            f"  OpenCV / dli CPU time {ratio:.2f}; OpenCV failures {cv['failures']}; "
            f"mean |dli - OpenCV| inside masks {cv['mean_abs_difference_gray_levels']:.2f} gray levels"
        )
    lines.append(
        f"traffic {figures['traffic_bytes_per_batch'] / 1e9:.2f} GB per batch, "
        f"{figures['traffic_bytes_per_step'] / 1e6:.2f} MB per step; "
        f"floor {figures['floor_seconds_per_step'] * 1e6:.1f} us "
        f"at {figures['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; "
        f"measured {figures['measured_seconds_per_step'] * 1e6:.1f} us ({figures['steps']} steps); "
        "load average {:.1f} {:.1f} {:.1f}".format(*figures["load_average"])
    )
    model = figures.get("device_model")
    if model is not None:
        lines.append(device_model_line(model))
    return "\n".join(lines)


def device_model_line(model: dict[str, Any]) -> str:
    """One line of `dli.kernels.device_model` figures (shared with `dli bench`'s table)."""
    return (
        f"device model of the CUDA path (CuPy {model['cupy']}): {model['launches']:g} launches "
        f"({model['kernels']:g} kernels, {model['library_calls']:g} cuFFT/cuBLAS, "
        f"{model['copies']:g} copies), {model['bytes'] / 1e9:.2f} GB moved, "
        f"{model['host_syncs']:g} host syncs, {model['fft_plans']:g} cuFFT plans"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        figures = run(args)
    except DliError as error:
        print(f"poisson benchmark: error: {error}", file=sys.stderr)
        return 2
    print(table(figures))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
