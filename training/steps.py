"""One optimisation step and the epoch's step totals, with no host synchronization.

`train_step` runs forward, backward and the optimizer step; a step whose loss or gradients are
not finite is skipped on the device (no update of weights, optimizer state or BatchNorm
statistics). `StepMonitor` keeps the loss sum, the finite-step count and the streak of skipped
steps on the device and reads them one step late, so the host never waits for the step it just
queued; after `MAX_SKIPPED_IN_A_ROW` skipped steps in a row a run stops as diverged
(`check_divergence`), as does a run none of whose steps was finite or whose last epoch skipped
most of its steps (`check_mostly_skipped`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dli.common.errors import DliError
from dli.models.checkpoint import unwrap

MAX_SKIPPED_IN_A_ROW = 10
"""Steps in a row skipped as non-finite after which a run stops as diverged (`DliError`)."""


@dataclass(frozen=True)
class StepTotals:
    """An epoch's step sums as read on the host: loss over the finite steps, their count, the skip streak."""

    loss_sum: float
    finite_steps: int
    skipped_in_a_row: int

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.finite_steps if self.finite_steps else math.nan


class StepMonitor:
    """An epoch's loss sum, finite-step count and skip streak, kept on the device, read one step late.

    `add` records a step without waiting for it and returns the totals up to the step before,
    whose host copy (pinned, non-blocking) it waits for: on a GPU the step just queued keeps
    running meanwhile, so the loop never stalls the device. `read` waits for everything.
    """

    def __init__(self, device: torch.device, skipped_in_a_row: int = 0) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.finite_steps = torch.zeros((), dtype=torch.float64, device=device)
        self.streak = torch.full((), float(skipped_in_a_row), dtype=torch.float64, device=device)
        cuda = device.type == "cuda"
        self._host = torch.zeros(3, dtype=torch.float64, pin_memory=cuda)
        self._copied: Any = torch.cuda.Event() if cuda else None
        self._pending = False

    def add(self, loss: torch.Tensor, stepped: torch.Tensor) -> StepTotals | None:
        """Record one step (`train_step`'s loss and decision); the totals before it, if any."""
        previous = self._host_totals() if self._pending else None
        self.loss_sum += torch.where(stepped, loss.to(torch.float64), 0.0)
        self.finite_steps += stepped
        self.streak = torch.where(stepped, 0.0, self.streak + 1)
        self._host.copy_(torch.stack([self.loss_sum, self.finite_steps, self.streak]), non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self._pending = True
        return previous

    def read(self) -> StepTotals:
        """The totals of every step added (waits for them)."""
        if not self._pending:
            return StepTotals(0.0, 0, int(self.streak.item()))
        return self._host_totals()

    def _host_totals(self) -> StepTotals:
        if self._copied is not None:
            self._copied.synchronize()
        loss_sum, finite_steps, streak = self._host.tolist()
        return StepTotals(loss_sum, int(finite_steps), int(streak))


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The AdamW of `dli train`, fused: it can skip a step on the device (see `train_step`)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def train_step(
    net: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    amp_dtype: torch.dtype | None,
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step as `dli train` takes it: (loss, detached logits, whether it stepped).

    Channels-last inputs, the forward pass under autocast (`amp_dtype`; None = fp32), the loss
    in fp32. All three results stay on the device: the step has no host sync. A step whose loss
    or any gradient is not finite changes nothing: the fused AdamW of `make_optimizer` skips it
    on the device (`found_inf`), and the BatchNorm statistics its forward pass updated are put
    back. With fp16 the `GradScaler` first unscales the gradients, so the same finiteness test
    sees the true gradients and the skip is decided, counted and undone exactly as without it;
    the scaler then backs its scale off after non-finite gradients. `agree(stepped)`
    (multi-process runs) combines the decision of every process, so all skip together. `masks`
    must already be on the model's device.
    """
    device = masks.device
    buffers = list(unwrap(net).buffers())
    before = [b.clone() for b in buffers]
    x = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = net(x)
    loss = loss_fn(logits, masks)
    stepped = torch.isfinite(loss.detach())
    scaler.scale(loss).backward()
    if scaler.is_enabled():
        scaler.unscale_(optimizer)  # fp16: the true gradients (the scaler records their finiteness)
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        stepped &= torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf))
    if agree is not None:
        stepped = agree(stepped)
    optimizer.found_inf = (~stepped).float()  # type: ignore[attr-defined]  # read by fused AdamW
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf  # type: ignore[attr-defined]
    scaler.update()  # fp16: halves the scale after non-finite gradients (a no-op without a scaler)
    optimizer.zero_grad(set_to_none=True)
    for buffer, old in zip(buffers, before, strict=True):
        buffer.copy_(torch.where(stepped, buffer, old))
    return loss.detach(), logits.detach(), stepped


def check_divergence(totals: StepTotals, *, epoch: int, step: int, lr: float, writer: bool) -> None:
    """Stop the run once too many steps in a row were skipped (`MAX_SKIPPED_IN_A_ROW`).

    `epoch` is the 0-based epoch in progress, `step` the run's step count, `writer` whether this
    process writes the run's files (the message then says that nothing of them was saved).
    """
    if totals.skipped_in_a_row < MAX_SKIPPED_IN_A_ROW:
        return
    kept = "; nothing of them was saved" if writer else ""
    raise DliError(
        f"training diverged: {totals.skipped_in_a_row} steps in a row had a non-finite loss or "
        f"gradient and were skipped (epoch {epoch + 1}, step {step}){kept}. "
        f"Lower --lr ({lr:g}) or check the data"
    )


def check_mostly_skipped(
    epoch: int,
    steps: int,
    skipped: int,
    *,
    run_steps: int,
    run_skipped: int,
    last_epoch: bool,
    lr: float,
    writer: bool,
) -> None:
    """Stop a run none of whose steps was finite, or whose last epoch skipped most of its steps.

    `steps` and `skipped` are epoch `epoch`'s (0-based), `run_steps` the run's steps so far
    including them and `run_skipped` its skipped steps before them. A short run never reaches
    `MAX_SKIPPED_IN_A_ROW`, yet what it would save is no model. Read from the epoch's totals,
    which the epoch end reads anyway (no sync in the step loop).
    """
    never_finite = run_steps > 0 and run_skipped + skipped >= run_steps
    if never_finite:
        what = f"none of its {run_steps} steps had a finite loss and gradient (all skipped)"
    elif last_epoch and 2 * skipped > steps:
        what = (
            f"{skipped} of the {steps} steps of its last epoch had a non-finite loss or gradient "
            "and were skipped"
        )
    else:
        return
    kept = "; that epoch was not saved" if writer else ""
    raise DliError(
        f"training diverged: {what} (epoch {epoch + 1}){kept}. Lower --lr ({lr:g}) or check the data"
    )
