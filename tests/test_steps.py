"""One training step and the skip streak: fp16's loss-scaler path and the "10 in a row" rule (CPU).

The fp16 path (`GradScaler` enabled) is forced on the CPU: a gradient hook multiplies one
gradient by infinity (the overflow a too-large loss scale causes), with the loss still finite.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dli.cli import main
from dli.data.synth import generate
from dli.training import steps, trainer
from dli.training.steps import MAX_SKIPPED_IN_A_ROW, StepMonitor, make_optimizer, train_step

REPO = Path(__file__).resolve().parents[1]


def small_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 1, 1)
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 1, 8, 8, generator=generator)
    return images, (torch.rand(2, 1, 8, 8, generator=generator) > 0.5).float()


def fp16_scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)


def test_an_fp16_step_with_overflowing_gradients_changes_nothing_and_counts_as_skipped():
    net, (images, masks) = small_net(), batch()
    optimizer = make_optimizer(net, lr=0.1, weight_decay=0.01)
    scaler, loss_fn = fp16_scaler(), torch.nn.BCEWithLogitsLoss()
    _, _, stepped = train_step(net, loss_fn, optimizer, scaler, images, masks, amp_dtype=None)
    assert bool(stepped) and scaler.get_scale() == 1024.0  # a finite step steps, the scale stays
    before = {k: v.clone() for k, v in net.state_dict().items()}
    moments = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in net.parameters()}
    hook = net[2].weight.register_hook(lambda grad: grad * math.inf)  # overflow; the loss stays finite
    loss, _, stepped = train_step(net, loss_fn, optimizer, scaler, images + 1, masks, amp_dtype=None)
    hook.remove()
    assert math.isfinite(float(loss)) and not bool(stepped), "a skipped fp16 step must be reported as skipped"
    for name, tensor in net.state_dict().items():  # weights and BatchNorm statistics (the input moved)
        assert torch.equal(tensor, before[name]), name
    for p in net.parameters():
        for name, tensor in optimizer.state[p].items():
            assert torch.equal(tensor, moments[p][name]), name
    assert scaler.get_scale() == 512.0  # the scaler backed off
    _, _, stepped = train_step(net, loss_fn, optimizer, scaler, images + 1, masks, amp_dtype=None)
    assert bool(stepped) and not torch.equal(net[1].running_mean, before["1.running_mean"])


def test_an_fp16_step_is_the_fp32_step_when_the_gradients_are_finite():
    """Unscaling first must not change what a finite step does (same weights to float precision)."""
    results = []
    for scaler in (fp16_scaler(), torch.amp.GradScaler("cpu", enabled=False)):
        net, (images, masks) = small_net(), batch()
        optimizer = make_optimizer(net, lr=0.01, weight_decay=0.01)
        for _ in range(3):
            train_step(net, torch.nn.BCEWithLogitsLoss(), optimizer, scaler, images, masks, amp_dtype=None)
        results.append(net.state_dict())
    for name, tensor in results[0].items():
        torch.testing.assert_close(tensor, results[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_fp16_step_makes_no_host_sync(monkeypatch):
    net, (images, masks) = small_net(), batch()
    optimizer = make_optimizer(net, lr=0.1, weight_decay=0.0)
    scaler = fp16_scaler()

    def sync(*_: object) -> None:
        raise AssertionError("host sync in train_step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    net[0].weight.register_hook(lambda grad: grad * math.inf)
    _, _, stepped = train_step(
        net, torch.nn.BCEWithLogitsLoss(), optimizer, scaler, images, masks, amp_dtype=None
    )
    monkeypatch.undo()
    assert not bool(stepped)


# ---------------------------------------------------------------------------------------------
# The skip streak: 10 in a row stops a run; a finite step resets it; it carries across epochs.


def test_the_divergence_limit_is_ten_as_the_readme_says():
    assert MAX_SKIPPED_IN_A_ROW == 10
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "after 10 such steps in a row the run stops" in readme


def test_the_monitor_counts_the_streak_resets_it_on_a_finite_step_and_starts_from_a_carried_one():
    monitor = StepMonitor(torch.device("cpu"), skipped_in_a_row=4)  # carried from the epoch before
    loss = torch.tensor(0.5)
    for stepped in (False, False, True, False):
        monitor.add(loss, torch.tensor(stepped))
    totals = monitor.read()
    assert (totals.skipped_in_a_row, totals.finite_steps, totals.loss_sum) == (1, 1, 0.5)
    fresh = StepMonitor(torch.device("cpu"), skipped_in_a_row=4)
    for _ in range(3):
        fresh.add(loss, torch.tensor(False))
    assert fresh.read().skipped_in_a_row == 7


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    generate(root, images=60, seed=3, size_range=((60, 90), (50, 120)))
    return root


def poison_steps(monkeypatch: pytest.MonkeyPatch, poisoned: set[int]) -> None:
    """Make the training steps numbered in `poisoned` (1-based, across epochs) non-finite."""
    calls = [0]

    def step(net, loss_fn, optimizer, scaler, images, masks, **kwargs):
        calls[0] += 1
        if calls[0] in poisoned:
            images = images * math.nan
        return steps.train_step(net, loss_fn, optimizer, scaler, images, masks, **kwargs)

    monkeypatch.setattr(trainer, "train_step", step)


def test_ten_skips_in_a_row_stop_a_run_nine_do_not_a_finite_step_resets_and_epochs_carry(
    data, tmp_path, monkeypatch, capsys
):
    # 56 training images, 7 steps an epoch. Steps 2-10: 9 in a row across the first epoch boundary
    # (must not stop); step 11 finite (resets); steps 12-21: 10 in a row across the second
    # boundary, 3 in epoch 2 and 7 in epoch 3 (must stop at step 21, in epoch 3).
    poison_steps(monkeypatch, set(range(2, 11)) | set(range(12, 22)))
    out = tmp_path / "run"
    flags = [
        "train", "--data", str(data), "--out", str(out), "--epochs", "3", "--batch-size", "8",
        "--image-size", "64", "--no-pretrained", "--no-progress", "--num-threads", "1", "--method", "bce",
    ]  # fmt: skip
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "56 train / 4 val images, 3 epochs x 7 steps" in err
    (line,) = [x for x in err.splitlines() if x.startswith("dli train: error:")]
    assert "diverged: 10 steps in a row" in line and "(epoch 3, step 21)" in line, line
