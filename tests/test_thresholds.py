"""Per-class threshold calibration on hand-made probabilities, checked against brute force."""

from __future__ import annotations

import math

import pytest
import torch

from dli.common.errors import DliError
from dli.models.metrics import ConfusionCounter
from dli.models.thresholds import (
    CHECKPOINT_KEY,
    GRID,
    ThresholdCalibrator,
    Thresholds,
    choose_thresholds,
    thresholds_of,
)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _batch(
    probabilities: list[float], labels: list[int], classes: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image, `classes` identical channels, one row of pixels."""
    logits = torch.tensor([_logit(p) for p in probabilities]).view(1, 1, 1, -1).repeat(1, classes, 1, 1)
    targets = torch.tensor(labels, dtype=torch.float32).view(1, 1, 1, -1).repeat(1, classes, 1, 1)
    return logits, targets


def _f1(probabilities, labels, threshold) -> float:
    predicted = [p > threshold for p in probabilities]
    tp = sum(p and y for p, y in zip(predicted, labels, strict=True))
    fp = sum(p and not y for p, y in zip(predicted, labels, strict=True))
    fn = sum(not p and y for p, y in zip(predicted, labels, strict=True))
    return 2 * tp / (2 * tp + fp + fn)


# Defects at 0.35 and 0.8, background at 0.3 and 0.9 (and one near 0): F1 is highest for
# thresholds in [0.30, 0.35): TP 2, FP 1 -> F1 0.8 (0.5 only reaches 0.5).
PROBABILITIES = [0.35, 0.8, 0.3, 0.9, 0.01]
LABELS = [1, 1, 0, 0, 0]


def test_calibration_picks_the_f1_optimal_threshold():
    calibrator = ThresholdCalibrator(["crack"])
    calibrator.update(*_batch(PROBABILITIES, LABELS))
    chosen = choose_thresholds(calibrator.curves())
    (value,) = chosen.values
    assert 0.3 <= value < 0.35 and chosen.calibrated == (True,)
    brute_force = max(_f1(PROBABILITIES, LABELS, t) for t in GRID)
    assert _f1(PROBABILITIES, LABELS, value) == pytest.approx(brute_force) == pytest.approx(0.8)
    assert _f1(PROBABILITIES, LABELS, 0.5) == pytest.approx(0.5)
    # Ties are broken towards the middle of the optimal thresholds.
    assert value == pytest.approx(0.325, abs=0.001)


def test_curves_count_exactly_what_the_confusion_counter_counts():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 8, 8, generator=generator) * 3
    targets = (torch.rand(3, 2, 8, 8, generator=generator) > 0.7).float()
    calibrator = ThresholdCalibrator(["a", "b"])
    calibrator.update(logits[:2], targets[:2])
    calibrator.update(logits[2:], targets[2:])
    curves = calibrator.curves()
    for values in ((0.5, 0.5), (0.123, 0.9), (0.001, 0.999)):
        counter = ConfusionCounter(["a", "b"], threshold=values)
        counter.update(logits, targets)
        scores = counter.compute()
        assert curves.counts_at(values) == (scores.tp, scores.fp, scores.fn)


def test_min_recall_keeps_the_best_f1_among_thresholds_that_reach_it():
    calibrator = ThresholdCalibrator(["crack"])
    calibrator.update(*_batch(PROBABILITIES, LABELS))
    curves = calibrator.curves()
    (value,) = choose_thresholds(curves, min_recall=0.5).values  # the F1 optimum already has recall 1
    assert 0.3 <= value < 0.35
    # Recall 1 needs t < 0.35; among those, F1 is highest above 0.3.
    (value,) = choose_thresholds(curves, min_recall=1.0).values
    assert 0.3 <= value < 0.35
    # Probabilities where the F1 optimum misses a defect: the recall constraint lowers the threshold.
    probabilities, labels = [0.2, 0.8, 0.85, 0.3, 0.25, 0.1], [1, 1, 1, 0, 0, 0]
    calibrator = ThresholdCalibrator(["crack"])
    calibrator.update(*_batch(probabilities, labels))
    curves = calibrator.curves()
    (free,) = choose_thresholds(curves).values
    (constrained,) = choose_thresholds(curves, min_recall=1.0).values
    assert 0.3 <= free < 0.8 and constrained < 0.2
    assert _f1(probabilities, labels, constrained) == pytest.approx(
        max(_f1(probabilities, labels, t) for t in GRID if t < 0.2)
    )


def test_a_class_without_defect_pixels_keeps_one_half_and_unreachable_recall_is_flagged():
    calibrator = ThresholdCalibrator(["absent"])
    calibrator.update(*_batch([0.2, 0.7], [0, 0]))
    chosen = choose_thresholds(calibrator.curves(), min_recall=0.9)
    assert chosen.values == (0.5,) and chosen.calibrated == (False,)
    assert chosen.describe() == "absent 0.500 (not calibrated)"  # not passed off as calibrated
    # A defect pixel at p = 0.0005 is below every grid threshold: recall 1 is out of reach.
    calibrator = ThresholdCalibrator(["crack"])
    calibrator.update(*_batch([0.0005, 0.9], [1, 1]))
    chosen = choose_thresholds(calibrator.curves(), min_recall=1.0)
    assert chosen.values == (GRID[0],) and chosen.recall_met == (False,)


def test_thresholds_round_trip_and_override_order():
    chosen = Thresholds(("a", "b"), (0.3, 0.6), "max-f1", (True, True), (True, True), "validation set")
    document = {CHECKPOINT_KEY: chosen.to_state()}
    assert thresholds_of(document, ("a", "b")) == chosen
    assert thresholds_of(document, ("a", "b"), override=0.7).values == (0.7, 0.7)
    assert chosen.describe() == "a 0.300, b 0.600"
    assert (
        thresholds_of(document, ("a", "b"), override=0.7).describe() == "a 0.700, b 0.700"
    )  # given, not calibrated
    assert thresholds_of({}, ("a", "b")).values == (0.5, 0.5)
    with pytest.raises(DliError, match=r"--threshold 1\.5"):
        thresholds_of(document, ("a", "b"), override=1.5)
    with pytest.raises(DliError, match="thresholds are for classes a, b"):
        thresholds_of(document, ("a", "c"))


def test_per_class_thresholds_in_the_confusion_counter():
    logits = torch.tensor([_logit(0.4), _logit(0.4)]).view(1, 2, 1, 1)
    targets = torch.ones(1, 2, 1, 1)
    counter = ConfusionCounter(["a", "b"], threshold=(0.3, 0.5))
    counter.update(logits, targets)
    assert counter.compute().tp == (1, 0)


def test_train_min_recall_is_checked():
    from dli.training.config import TrainConfig

    assert TrainConfig(min_recall=0.9).validate().min_recall == 0.9
    for bad in (0.0, 1.5):
        with pytest.raises(DliError, match=f"--min-recall {bad}"):
            TrainConfig(min_recall=bad).validate()


@pytest.mark.gpu
def test_counters_run_without_host_syncs_on_the_gpu():
    from dli.models.image_metrics import ImageDecisionCounter

    device = torch.device("cuda")
    logits = torch.randn(4, 3, 32, 32, device=device)
    targets = (torch.rand(4, 3, 32, 32, device=device) > 0.8).float()
    counters = [
        ThresholdCalibrator(["a", "b", "c"], device=device),
        ConfusionCounter(["a", "b", "c"], device=device, threshold=(0.3, 0.5, 0.7)),
        ImageDecisionCounter(["a", "b", "c"], (0.3, 0.5, 0.7), min_area=2, device=device),
    ]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for counter in counters:
            counter.update(logits, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    curves = counters[0].curves()
    scores = counters[1].compute()
    assert curves.counts_at((0.3, 0.5, 0.7)) == (scores.tp, scores.fp, scores.fn)


def _counter_inputs(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose probabilities lie far (>= 1e-5) from every grid threshold, so the CPU and the
    GPU sigmoid put each pixel on the same side of each; some (image, class) planes clean, some
    targets empty, one image defect-free: every image-level column gets counts."""
    generator = torch.Generator().manual_seed(5)
    levels = torch.tensor([-4.0, -2.0, -0.5, 0.5, 2.0, 4.0])
    logits = levels[torch.randint(0, len(levels), (6, 3, 16, 16), generator=generator)]
    clean = torch.rand(6, 3, 1, 1, generator=generator) < 0.4
    logits = torch.where(clean, torch.tensor(-4.0), logits)  # nothing predicted on these planes
    targets = (torch.rand(6, 3, 16, 16, generator=generator) > 0.7).float()
    targets *= (torch.rand(6, 3, 1, 1, generator=generator) < 0.6).float()
    targets[0] = 0.0  # a defect-free image
    return logits.to(device), targets.to(device)


@pytest.mark.gpu
def test_the_gpu_counters_count_what_the_cpu_counters_count():
    from dli.models.image_metrics import ImageDecisionCounter

    names, thresholds = ["a", "b", "c"], (0.3, 0.5, 0.7)
    results = {}
    for device in ("cpu", "cuda"):
        logits, targets = _counter_inputs(device)
        calibrator = ThresholdCalibrator(names, device=device)
        pixels = ConfusionCounter(names, device=device, threshold=thresholds)
        images = ImageDecisionCounter(names, thresholds, min_area=2, device=device)
        for start in (0, 3):  # two batches
            for counter in (calibrator, pixels, images):
                counter.update(logits[start : start + 3], targets[start : start + 3])
        curves = calibrator.curves()
        results[device] = (
            curves.tp,
            curves.fp,
            curves.fn,
            pixels.compute(),
            images.compute(),
            images.counts.cpu(),
        )
    cpu, gpu = results["cpu"], results["cuda"]
    for a, b in zip(cpu[:3], gpu[:3], strict=True):
        assert (a == b).all()  # every grid threshold, every class
    assert cpu[3] == gpu[3] and cpu[4] == gpu[4]
    assert torch.equal(cpu[5], gpu[5]) and (cpu[5] > 0).sum() > 5  # the columns are not all empty


def test_a_class_the_model_does_not_find_at_one_half_keeps_one_half():
    # Every defect pixel below 0.5; at 0.005 one true positive among many false ones has F1 > 0.
    probabilities = [0.01, 0.2, 0.3, 0.02, 0.04, 0.05, 0.06]
    labels = [1, 0, 0, 0, 0, 0, 0]
    calibrator = ThresholdCalibrator(["blowhole"])
    calibrator.update(*_batch(probabilities, labels))
    assert max(_f1(probabilities, labels, t) for t in GRID) > 0  # a "best" F1 exists
    chosen = choose_thresholds(calibrator.curves())
    assert chosen.values == (0.5,) and chosen.calibrated == (False,)
    # A recall constraint still chooses: the user asked for that recall.
    constrained = choose_thresholds(calibrator.curves(), min_recall=1.0)
    assert constrained.values[0] < 0.01 and constrained.calibrated == (True,)
