"""`dli bench`: throughput of the data path, injection kernels and training, and of the usual alternative.

    dli bench --device cuda --data /path/to/MT --json bench-h100.json
    dli bench --quick --device cpu          # a CPU smoke run of under a minute
    python -m dli.bench.throughput ...      # the same; also `python bench/throughput.py ...`

One run, one device, one dataset (default: the bundled synthetic set), one batch and image size:

1. Data path: images/s of the DALI loader (decode, resize, flips; on the training device)
   without and with Dynamic Label Injection, and of the practitioner's alternative
   (`dli.bench.baseline`: a PyTorch DataLoader with worker processes, OpenCV decoding and
   augmentation, `cv2.seamlessClone` per image) executing the very same plans.
2. Injection kernels, per batch: the planner (host), the whole `inject` call, cut-paste, the
   Poisson CG solve with the boundary-matched start and from zeros (with iterations), its
   setup alone, OpenCV's injection of the same plan; and for one CG step the memory it must
   move, the floor that sets at the measured copy bandwidth (`dli.bench.poisson`) and the
   measured time.
3. Training: images/s of training steps (forward, backward, AdamW; AMP and channels-last as
   `dli train` runs them) fed by the DALI + DLI loader, by pre-made tensors already on the
   device (the ratio is the pipeline's overhead) and by the baseline; peak GPU memory.

Every figure is timed over `--repeats` windows of `--batches` batches after a warm-up (GPU work
synchronized at both ends of a window) and reported as median, min and max, with the samples,
in a JSON file beside a short table. Speed is never asserted by the tests; this measures it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from dli.atomic import atomic_write_text
from dli.bench.baseline import (
    DecodedPlan,
    PlannedBatches,
    SampleFiles,
    build_baseline_loader,
    decode_plan,
    inject_opencv,
    sample_files,
)
from dli.bench.poisson import copy_bandwidth
from dli.bench.report import SCHEMA_VERSION, device_name, git_state, load_average, table, versions
from dli.bench.timing import call_times, ratio, stream_rates, summary
from dli.config import PAPER_SCHEDULE, TrainConfig
from dli.errors import DliError
from dli.kernels.morphology import dilate
from dli.kernels.paste import paste
from dli.kernels.poisson import PoissonConvergenceWarning, PoissonInfo, poisson_blend
from dli.models.losses import build_loss
from dli.models.unet import ENCODERS, build_model, count_parameters
from dli.pipeline.batch import Batch
from dli.pipeline.inject import inject, region_boxes
from dli.pipeline.loader import MT_MEAN, MT_STD, Loader, build_loader
from dli.pipeline.manifest import FREE, Manifest, read_dataset, validate
from dli.pipeline.planner import DliConfig, Plan
from dli.train import amp_dtype_for, make_optimizer, train_step

T = TypeVar("T")


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


@dataclass(frozen=True)
class Settings:
    """One benchmark run's resolved settings (recorded in the JSON)."""

    device: str
    data: str
    images: int
    batch_size: int
    image_size: int
    repeats: int
    batches: int
    warmup: int
    workers: int
    num_threads: int
    encoders: tuple[str, ...]
    poisson_prob: float
    seed: int
    quick: bool


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
# The benchmark's shared state.


@dataclass
class Bench:
    """Settings, device, dataset and the loaders' common arguments of one run."""

    settings: Settings
    device: torch.device
    manifest: Manifest
    samples: tuple[SampleFiles, ...]
    donors: tuple[int, ...]  # manifest indices injection may take defects from
    source_boxes: np.ndarray  # (len(manifest), 4) defect boxes: Poisson windows sized on the host
    dli: DliConfig
    mean: float
    std: float

    @property
    def size(self) -> tuple[int, int]:
        return (self.settings.image_size, self.settings.image_size)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def loader(self, *, inject: bool) -> Loader:
        """The `dli train` loader of the whole dataset (training mode: flips, plans)."""
        s = self.settings
        return build_loader(
            self.manifest,
            batch_size=s.batch_size,
            image_size=s.image_size,
            train=True,
            dli=self.dli if inject else None,
            seed=s.seed,
            device=str(self.device),
            num_threads=s.num_threads,
            donors=self.donors if inject else None,
            source_boxes=self.source_boxes if inject else None,
        )

    def plans(self, loader: Loader, count: int) -> list[Plan]:
        """The first `count` plans `loader` runs, across epochs (the batches it yields, in order)."""
        plans: list[Plan] = []
        epoch = 0
        while len(plans) < count:
            plans += loader.plans(epoch)
            epoch += 1
        return plans[:count]

    def baseline(self, plans: Sequence[Plan], *, inject: bool) -> torch.utils.data.DataLoader:
        """The baseline DataLoader over `plans` (see `dli.bench.baseline`)."""
        dataset = PlannedBatches(
            self.samples,
            plans,
            size=self.size,
            config=self.dli if inject else None,
            mean=self.mean,
            std=self.std,
        )
        return build_baseline_loader(dataset, workers=self.settings.workers, pin_memory=self.cuda)

    def to_device(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [t.to(self.device, non_blocking=True) for t in tensors]

    def rates(
        self, batches: Iterator[T], step: Callable[[T], object], *, extra_warmup: int = 0
    ) -> list[float]:
        s = self.settings
        return stream_rates(
            batches,
            step,
            batch_size=s.batch_size,
            warmup=s.warmup + extra_warmup,
            per_window=s.batches,
            windows=s.repeats,
            sync=self.sync,
        )

    def batches_needed(self, extra_warmup: int = 0) -> int:
        s = self.settings
        return s.warmup + extra_warmup + s.repeats * s.batches


def endless(loader: Loader) -> Iterator[Batch]:
    """The loader's batches, epoch after epoch (what a training run sees)."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def _progress(message: str) -> None:
    print(f"dli bench: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# 1. The data path.


def measure_data_path(bench: Bench) -> dict[str, Any]:
    """Images/s of the DALI loader without and with injection, and of the baseline, same plans."""
    out: dict[str, Any] = {}
    workers = bench.settings.workers
    for injecting, name, baseline in ((False, "dali", "baseline"), (True, "dali_dli", "baseline_dli")):
        _progress(f"data path: {name}")
        loader = bench.loader(inject=injecting)
        stream = endless(loader)
        try:
            out[name] = {"images_per_s": summary(bench.rates(stream, lambda batch: None))}
        finally:
            stream.close()
            loader.close()
        # The baseline runs the same plans; every worker finishes a batch before timing starts.
        _progress(f"data path: {baseline} ({workers} workers)")
        plans = bench.plans(bench.loader(inject=injecting), bench.batches_needed(workers))
        batches = iter(bench.baseline(plans, inject=injecting))
        rates = bench.rates(batches, bench.to_device, extra_warmup=workers)
        del batches  # shuts the worker processes down
        out[baseline] = {"images_per_s": summary(rates)}
    out["dli_over_baseline"] = ratio(out["dali_dli"], out["baseline_dli"])
    out["plain_over_baseline"] = ratio(out["dali"], out["baseline"])
    out["dli_over_plain"] = ratio(out["dali_dli"], out["dali"])
    return out


# ---------------------------------------------------------------------------------------------
# 2. The injection kernels.


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
        domain = dilate(batch.source_masks[items], dli.dilate_radius)

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


def measure_kernels(bench: Bench) -> dict[str, Any]:
    """Per-batch times of the planner and of each injection step, over the first plans with injections."""
    s = bench.settings
    loader = bench.loader(inject=True)
    _progress("kernels: planner")
    epoch = call_times(lambda: loader.plans(0), repeats=s.repeats, sync=bench.sync)
    planner = [t / len(loader) for t in epoch]
    plans = [p for p in bench.plans(loader, 4 * s.batches) if p.injections][: s.batches]
    if not plans:
        raise DliError(f"{s.data}: no batch of {s.batch_size} receives an injection")
    samples = KernelSamples(s.repeats)
    for number, plan in enumerate(plans):
        _progress(f"kernels: batch {number + 1}/{len(plans)}")
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


# ---------------------------------------------------------------------------------------------
# 3. Training steps.


class TrainStep:
    """One `dli train` optimisation step (`dli.train.train_step`: BCE + Dice, AdamW) on a fresh model.

    The trainer's precision (bf16 autocast where the GPU supports it, fp16 with a loss scaler
    otherwise, fp32 on the CPU). The learning-rate schedule and metric counting are left out
    (host work that does not depend on the data path).
    """

    def __init__(self, encoder: str, num_classes: int, device: torch.device) -> None:
        config = TrainConfig().resolved()  # the dli protocol's precision, as `dli train` resolves it
        model, _ = build_model(encoder, num_classes, pretrained=False)
        self.parameters = count_parameters(model).total
        self.device = device
        self.model = model.to(device, memory_format=torch.channels_last).train()
        # The paper's learning rate: the bundled default's quick schedule would set another.
        self.optimizer = make_optimizer(model, lr=PAPER_SCHEDULE.lr, weight_decay=config.weight_decay)
        self.amp_dtype = amp_dtype_for(device, config.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.loss_fn, _ = build_loss("dli")

    @property
    def precision(self) -> str:
        return str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "float32"

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        y = masks.to(self.device, non_blocking=True)
        loss, _, _ = train_step(
            self.model, self.loss_fn, self.optimizer, self.scaler, images, y, amp_dtype=self.amp_dtype
        )
        return loss


def _memory(bench: Bench) -> dict[str, int | None]:
    """Peak torch allocation since the last reset, CuPy's pool and the device's used memory."""
    if not bench.cuda:
        return {"peak_torch_bytes": None, "cupy_pool_bytes": None, "device_used_bytes": None}
    free, total = torch.cuda.mem_get_info(bench.device)
    cupy_bytes = None
    if "cupy" in sys.modules:
        cupy_bytes = int(sys.modules["cupy"].get_default_memory_pool().total_bytes())
    return {
        "peak_torch_bytes": int(torch.cuda.max_memory_allocated(bench.device)),
        "cupy_pool_bytes": cupy_bytes,
        "device_used_bytes": int(total - free),
    }


def measure_training(bench: Bench, encoder: str, inject_seconds: float | None) -> dict[str, Any]:
    """Training images/s of `encoder` fed by DALI + DLI, by pre-made device tensors and by the baseline."""
    step = TrainStep(encoder, bench.manifest.num_classes, bench.device)
    out: dict[str, Any] = {"parameters": step.parameters, "precision": step.precision}

    def measured(name: str, batches: Iterator[Any], run: Callable[[Any], object], extra: int = 0) -> None:
        _progress(f"training {encoder}: {name}")
        if bench.cuda:
            torch.cuda.reset_peak_memory_stats(bench.device)
        rates = bench.rates(batches, run, extra_warmup=extra)
        out[name] = {"images_per_s": summary(rates), "memory": _memory(bench)}

    loader = bench.loader(inject=True)
    stream = endless(loader)
    try:
        first = next(stream)
        premade = (first.images.clone(), first.masks.clone())
        measured("dali_dli", stream, lambda batch: step(batch.images, batch.masks))
    finally:
        stream.close()
        loader.close()
    measured("premade", itertools.repeat(premade), lambda batch: step(*batch))
    del premade

    workers = bench.settings.workers
    plans = bench.plans(bench.loader(inject=True), bench.batches_needed(workers))
    batches = iter(bench.baseline(plans, inject=True))
    measured("baseline_dli", batches, lambda batch: step(batch[0], batch[1]), extra=workers)
    del batches

    out["dli_over_premade"] = ratio(out["dali_dli"], out["premade"])
    out["dli_over_baseline"] = ratio(out["dali_dli"], out["baseline_dli"])
    step_seconds = bench.settings.batch_size / out["premade"]["images_per_s"]["median"]
    out["premade_step_seconds"] = step_seconds
    out["injection_share_of_step"] = None if inject_seconds is None else inject_seconds / step_seconds
    return out


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
        from dli.pipeline.synth import default_dataset

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
        "training": training,
        "seconds": {
            "setup": marks[0] - started,
            **{name: marks[i + 1] - marks[i] for i, name in enumerate(sections)},
            "total": marks[-1] - started,
        },
    }


def run(args: argparse.Namespace) -> int:
    """`dli bench`: measure, print the table, write the JSON."""
    settings = resolve_settings(args)
    path = getattr(args, "json", None) or Path(f"bench-{settings.device}.json")
    figures = measure(settings)
    print(table(figures))
    try:
        atomic_write_text(path, json.dumps(figures, indent=2) + "\n")
    except OSError as error:
        raise DliError(f"--json {path}: cannot write: {error}") from None
    print(f"figures written to {path}")
    return 0


if __name__ == "__main__":
    from dli.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
