"""One `dli bench` run's settings and the state its three sections share.

`Settings` are the run's resolved settings, as recorded in the JSON. `Bench` holds them with the
device, the validated dataset and the loaders' common arguments, and builds what every section
measures: the `dli train` loader of the whole dataset with or without injection, the plans that
loader runs, the baseline DataLoader (`dli.bench.baseline`) executing those very plans, and the
windowed images/s of a stream (`dli.bench.timing`) with the run's warm-up, windows and device
synchronization. `endless` streams a loader epoch after epoch; `progress` reports a step on stderr.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from dli.bench.baseline import PlannedBatches, SampleFiles, build_baseline_loader
from dli.bench.timing import stream_rates
from dli.data.manifest import Manifest
from dli.pipeline.batch import Batch
from dli.pipeline.loader import Loader, build_loader
from dli.pipeline.planner import DliConfig, Plan


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


T = TypeVar("T")


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


def progress(message: str) -> None:
    print(f"dli bench: {message}", file=sys.stderr, flush=True)
