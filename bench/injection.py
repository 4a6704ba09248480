"""Section 2 of `dli bench`, the injection kernels: seconds per batch of each injection step.

Per batch: the planner (host), the whole `inject` call, cut-paste, the Poisson CG solve with the
boundary-matched start and from zeros (with iterations), its setup alone, OpenCV's injection of
the same plan; and for one CG step the memory it must move, the floor that sets at the measured
copy bandwidth (`dli.bench.poisson`) and the measured time; and the device model of the CUDA
path of `inject` for the first `DEVICE_MODEL_BATCHES` batches (`dli.kernels.device_model`: device
operations and bytes per batch, counted on the CPU). The inputs are decoded with the
baseline's OpenCV code and laid out as the loader hands them to `inject` (normalized, on the
device), so the kernels see exactly what they see in training.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dli.bench.baseline import DecodedPlan, decode_plan, inject_opencv
from dli.bench.poisson import copy_bandwidth
from dli.bench.state import Bench, progress
from dli.bench.timing import call_times, summary
from dli.common.errors import DliError
from dli.kernels import device_model
from dli.kernels.device_model import DeviceCounts
from dli.kernels.morphology import dilate
from dli.kernels.paste import paste
from dli.kernels.poisson.blend import PoissonConvergenceWarning, PoissonInfo, poisson_blend
from dli.pipeline.inject import inject, region_boxes
from dli.pipeline.planner import DliConfig, Plan


@dataclass
class KernelBatch:
    """One plan's decoded pixels, as the loader hands them to `inject` (normalized, on the device)."""

    plan: Plan
    decoded: DecodedPlan
    images: torch.Tensor  # (N, 1, H, W)
    labels: torch.Tensor  # (N, C, H, W)
    sources: torch.Tensor  # (K, 1, H, W)
    source_masks: torch.Tensor  # (K, H, W) float 0/1

    def items(self, method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(source items, batch slots, classes) of the injections of `method`, on the device."""
        chosen = [(k, i.slot, i.class_id) for k, i in enumerate(self.plan.injections) if i.method == method]
        columns = np.array(chosen, dtype=np.int64).reshape(-1, 3).T
        return tuple(torch.from_numpy(np.ascontiguousarray(c)).to(self.images.device) for c in columns)


def kernel_batch(bench: Bench, plan: Plan) -> KernelBatch:
    """Decode `plan` with the baseline's OpenCV code and lay it out as `inject` receives it."""
    decoded = decode_plan(plan, bench.samples, bench.size)

    def normalized(pixels: np.ndarray) -> torch.Tensor:
        values = torch.from_numpy(pixels.astype(np.float32) / 255.0)[:, None]
        return ((values - bench.mean) / bench.std).to(bench.device).contiguous()

    ids = np.asarray(plan.class_ids_before, dtype=np.int64)
    labels = np.zeros((len(ids), plan.num_classes, *bench.size), dtype=np.float32)
    defect = np.flatnonzero(ids >= 0)
    labels[defect, ids[defect]] = decoded.masks[defect]
    return KernelBatch(
        plan=plan,
        decoded=decoded,
        images=normalized(decoded.images),
        labels=torch.from_numpy(labels).to(bench.device),
        sources=normalized(decoded.sources),
        source_masks=torch.from_numpy(decoded.source_masks.astype(np.float32)).to(bench.device),
    )


KERNEL_FIGURES: tuple[str, ...] = (
    "inject",
    "paste",
    "poisson",
    "poisson_zero_start",
    "poisson_setup",
    "opencv_inject",
)
"""Per-batch timings of the injection section (keys of `seconds_per_batch`, with "planner")."""


DEVICE_MODEL_BATCHES = 3
"""Batches whose `inject` the device model counts (seconds each on the CPU); the figures are their mean."""


@dataclass
class KernelSamples:
    """Times of each injection step summed over the measured batches, per repeat; solver reports.

    Repeat r of every batch makes pass r over the batches, and `totals[step][r] / batches` is the
    mean time per batch of that step in pass r: the figures are taken over passes, like the
    stream figures over windows, so their medians are comparable between steps. A step that a
    batch does not need (cut-paste without paste injections) adds nothing for that batch.
    """

    repeats: int
    totals: dict[str, np.ndarray] = field(init=False)
    ran: set[str] = field(default_factory=set)
    counts: dict[str, list[int]] = field(default_factory=lambda: {"poisson": [], "paste": []})
    matched: list[PoissonInfo] = field(default_factory=list)  # boundary-matched start
    zero: list[PoissonInfo] = field(default_factory=list)  # zero start
    cg_seconds: float = 0.0  # solve minus setup (medians over repeats), summed over the batches
    device_model: list[DeviceCounts] = field(default_factory=list)  # per modelled batch

    def __post_init__(self) -> None:
        self.totals = {step: np.zeros(self.repeats) for step in KERNEL_FIGURES}

    def add(self, step: str, seconds: Sequence[float]) -> None:
        self.totals[step] += np.asarray(seconds)
        self.ran.add(step)

    def per_batch(self, step: str, batches: int) -> dict[str, Any] | None:
        """`summary` of the mean seconds per batch of `step` over the passes (None: never ran)."""
        return summary(self.totals[step] / batches) if step in self.ran else None


def time_injection(bench: Bench, batch: KernelBatch, samples: KernelSamples) -> None:
    """Time every injection step of one batch `bench.settings.repeats` times (after one warm-up)."""
    dli, sync, repeats = bench.dli, bench.sync, bench.settings.repeats
    value_range = ((0.0 - bench.mean) / bench.std, (1.0 - bench.mean) / bench.std)

    def fresh() -> tuple[torch.Tensor, torch.Tensor]:  # inject and paste write in place
        return batch.images.clone(), batch.labels.clone()

    # As the training loader runs it: region boxes from the host, so the solve reads nothing back.
    boxes = region_boxes(batch.plan, bench.source_boxes, bench.size, dli.dilate_radius)

    def run_inject(images: torch.Tensor, labels: torch.Tensor) -> None:
        inject(
            images,
            labels,
            batch.sources,
            batch.source_masks,
            batch.plan,
            dli,
            value_range=value_range,
            boxes=boxes,
        )

    samples.add("inject", call_times(run_inject, repeats=repeats, sync=sync, setup=fresh))
    if len(samples.device_model) < DEVICE_MODEL_BATCHES:
        samples.device_model.append(model_injection(batch, dli, value_range, boxes))

    items, slots, classes = batch.items("paste")
    samples.counts["paste"].append(len(items))
    if len(items):
        sources, masks = batch.sources[items], batch.source_masks[items]

        def run_paste(images: torch.Tensor, labels: torch.Tensor) -> None:
            paste(images, sources, masks, labels=labels, class_ids=classes, slots=slots)

        samples.add("paste", call_times(run_paste, repeats=repeats, sync=sync, setup=fresh))

    items, slots, _ = batch.items("poisson")
    poisson = np.array([i.method == "poisson" for i in batch.plan.injections], dtype=bool)
    samples.counts["poisson"].append(len(items))
    if len(items):
        target, source = batch.images[slots], batch.sources[items]
        domain = dilate(batch.source_masks[items] != 0, dli.dilate_radius)  # as `inject` does

        def blend(**options: Any) -> Any:
            # CuPy launches on its current stream (the legacy default stream, as torch's here);
            # `sync` waits for the whole device either way.
            return poisson_blend(
                target,
                source,
                domain,
                mixed_gradients=dli.mixed_gradients,
                tol=dli.poisson_tol,
                boxes=None if boxes is None else boxes[poisson],
                **options,
            )

        matched = call_times(blend, repeats=repeats, sync=sync)
        samples.add("poisson", matched)
        samples.add("poisson_zero_start", call_times(lambda: blend(x0="zeros"), repeats=repeats, sync=sync))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PoissonConvergenceWarning)
            setup = call_times(lambda: blend(max_iter=0), repeats=repeats, sync=sync)
        samples.add("poisson_setup", setup)
        samples.matched.append(blend()[1])
        samples.zero.append(blend(x0="zeros")[1])
        samples.cg_seconds += max(float(np.median(matched)) - float(np.median(setup)), 0.0)

    def run_opencv(decoded: DecodedPlan) -> None:
        inject_opencv(decoded, batch.plan, dli)

    def fresh_decoded() -> tuple[DecodedPlan]:  # OpenCV's injection writes images and masks
        d = batch.decoded
        return (DecodedPlan(d.images.copy(), d.masks.copy(), d.sources, d.source_masks),)

    samples.add(
        "opencv_inject", call_times(run_opencv, repeats=repeats, sync=lambda: None, setup=fresh_decoded)
    )


def model_injection(
    batch: KernelBatch, dli: DliConfig, value_range: tuple[float, float], boxes: np.ndarray | None
) -> DeviceCounts:
    """The device operations of `inject` on this batch's CUDA path (`dli.kernels.device_model`)."""
    host = [t.detach().cpu() for t in (batch.images, batch.labels, batch.sources, batch.source_masks)]

    def run() -> None:
        images, labels = host[0].clone(), host[1].clone()
        with device_model.modelled(), warnings.catch_warnings():
            warnings.simplefilter("ignore", PoissonConvergenceWarning)
            inject(images, labels, host[2], host[3], batch.plan, dli, value_range=value_range, boxes=boxes)

    return device_model.cost(run)


def device_model_summary(counts: Sequence[DeviceCounts]) -> dict[str, Any] | None:
    """The mean per batch of each device-model figure (`DeviceCounts.as_dict`), and the batches."""
    if not counts:
        return None
    figures = [c.as_dict() for c in counts]
    out: dict[str, Any] = {
        key: float(np.mean([f[key] for f in figures])) for key, value in figures[0].items() if key != "cupy"
    }
    return out | {"cupy": device_model.CUPY_VERSION, "batches": len(figures)}


def measure_kernels(bench: Bench) -> dict[str, Any]:
    """Per-batch times of the planner and of each injection step, over the first plans with injections."""
    s = bench.settings
    loader = bench.loader(inject=True)
    progress("kernels: planner")
    epoch = call_times(lambda: loader.plans(0), repeats=s.repeats, sync=bench.sync)
    planner = [t / len(loader) for t in epoch]
    plans = [p for p in bench.plans(loader, 4 * s.batches) if p.injections][: s.batches]
    if not plans:
        raise DliError(f"{s.data}: no batch of {s.batch_size} receives an injection")
    samples = KernelSamples(s.repeats)
    for number, plan in enumerate(plans):
        progress(f"kernels: batch {number + 1}/{len(plans)}")
        time_injection(bench, kernel_batch(bench, plan), samples)

    seconds: dict[str, Any] = {"planner": summary(planner)}
    seconds |= {step: samples.per_batch(step, len(plans)) for step in KERNEL_FIGURES}
    out: dict[str, Any] = {
        "batches": len(plans),
        # Speed of `inject` relative to OpenCV's injection of the same plans (> 1: ours is faster).
        "inject_speed_over_opencv": seconds["opencv_inject"]["median"] / seconds["inject"]["median"],
        "injections_per_batch": {k: float(np.mean(v)) for k, v in samples.counts.items()},
        "seconds_per_batch": seconds,
        "poisson_iterations": None,
        "cg_step": None,
        "device_model": device_model_summary(samples.device_model),
    }
    if samples.matched:
        out["poisson_iterations"] = {
            "boundary_matched_start": _iterations(samples.matched),
            "zero_start": _iterations(samples.zero),
        }
        out["cg_step"] = _cg_step(bench, samples.matched, samples.cg_seconds)
    return out


def _iterations(infos: Sequence[PoissonInfo]) -> dict[str, Any]:
    iterations = np.concatenate([info.iterations.ravel() for info in infos])
    return {
        "median": float(np.median(iterations)),
        "max": int(iterations.max()),
        "systems": int(iterations.size),
        "all_converged": all(info.all_converged for info in infos),
    }


def _cg_step(bench: Bench, infos: Sequence[PoissonInfo], steps_time: float) -> dict[str, Any]:
    """Traffic, bandwidth floor and measured time of one CG step, averaged over the batches' steps."""
    if bench.cuda:
        import cupy

        xp, nbytes = cupy, 1 << 28
    else:
        xp, nbytes = np, 1 << 26  # a host copy this size already runs at memory speed
    bandwidth = copy_bandwidth(xp, bench.sync, nbytes)
    steps = sum(info.steps for info in infos)
    traffic = sum(info.traffic_bytes for info in infos) / max(steps, 1)
    return {
        "steps": steps,
        "traffic_bytes": traffic,
        "bandwidth_bytes_per_s": bandwidth,
        "floor_seconds": traffic / bandwidth,
        "measured_seconds": steps_time / max(steps, 1),
    }
