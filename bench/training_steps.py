"""Section 3 of `dli bench`, training: images/s of `dli train` steps and their peak GPU memory.

Training steps (forward, backward, AdamW; AMP and channels-last as `dli train` runs them) of a
fresh model fed by the DALI + DLI loader, by pre-made tensors already on the device (the ratio
is the pipeline's overhead) and by the baseline; and the share of a step the injection takes.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from dli.bench.state import Bench, endless, progress
from dli.bench.timing import ratio, summary
from dli.models.losses import build_loss
from dli.models.unet import build_model, count_parameters
from dli.training.config import PAPER_SCHEDULE, TrainConfig
from dli.training.devices import amp_dtype_for
from dli.training.steps import make_optimizer, train_step


class TrainStep:
    """One `dli train` optimisation step (`dli.training.steps.train_step`: BCE + Dice, AdamW) on a
    fresh model.

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
        progress(f"training {encoder}: {name}")
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
