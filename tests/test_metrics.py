"""Dataset-level IoU and F1 against hand-counted confusion matrices."""

from __future__ import annotations

import math

import pytest
import torch

from dli.models.metrics import ConfusionCounter, SegmentationScores

BIG = 10.0  # a logit far from the 0.5 threshold


def _logits(predicted: list) -> torch.Tensor:
    """Logits whose thresholded prediction is `predicted` (nested 0/1 lists, N x C x H x W)."""
    return (torch.tensor(predicted, dtype=torch.float32) * 2 - 1) * BIG


def test_counts_iou_and_f1_by_hand():
    counter = ConfusionCounter(["blowhole", "crack"])
    predicted = [[[[1, 1], [0, 0]], [[0, 0], [0, 0]]]]
    targets = torch.tensor([[[[1, 0], [1, 0]], [[0, 0], [0, 0]]]], dtype=torch.float32)
    counter.update(_logits(predicted), targets)
    scores = counter.compute()
    assert (scores.tp, scores.fp, scores.fn) == ((1, 0), (1, 0), (1, 0))
    assert scores.class_iou[0] == pytest.approx(1 / 3)
    assert scores.class_f1[0] == pytest.approx(2 / 4)
    assert math.isnan(scores.class_iou[1]) and math.isnan(scores.class_f1[1])  # nothing to find or found
    assert scores.iou == pytest.approx(1 / 3)


def test_dataset_level_iou_is_not_a_mean_of_batch_ious():
    counter = ConfusionCounter(["a"])
    # Batch 1: one pixel found exactly (IoU 1). Batch 2: three pixels missed (IoU 0).
    counter.update(_logits([[[[1, 0]]]]), torch.tensor([[[[1.0, 0.0]]]]))
    counter.update(_logits([[[[0, 0, 0]]]]), torch.tensor([[[[1.0, 1.0, 1.0]]]]))
    scores = counter.compute()
    assert (scores.tp, scores.fp, scores.fn) == ((1,), (0,), (3,))
    assert scores.iou == pytest.approx(1 / 4)  # not (1 + 0) / 2
    assert scores.f1 == pytest.approx(2 / 5)


def test_overall_sums_counts_over_classes():
    scores = SegmentationScores(("a", "b"), tp=(2, 6), fp=(1, 0), fn=(1, 4))
    assert scores.iou == pytest.approx(8 / 14)
    assert scores.class_iou == pytest.approx((2 / 4, 6 / 10))
    assert scores.class_f1 == pytest.approx((4 / 6, 12 / 16))
    record = scores.to_dict()
    assert record["iou/b"] == pytest.approx(0.6) and record["f1/a"] == pytest.approx(4 / 6)


def test_threshold_is_strictly_above_one_half():
    counter = ConfusionCounter(["a"])
    counter.update(torch.tensor([[[[0.0, 1e-3]]]]), torch.tensor([[[[1.0, 1.0]]]]))  # p = 0.5, p > 0.5
    assert counter.compute().tp == (1,)


def test_counts_stay_int64_on_device_and_accumulate_until_reset():
    counter = ConfusionCounter(["a", "b"])
    logits, targets = torch.randn(4, 2, 8, 8), (torch.rand(4, 2, 8, 8) > 0.5).float()
    counter.update(logits, targets)
    counter.update(logits, targets)
    assert counter.counts.dtype == torch.int64
    tp = ((logits > 0) & (targets > 0.5)).sum(dim=(0, 2, 3))
    assert counter.compute().tp == tuple(2 * tp.tolist()[i] for i in range(2))
    counter.reset()
    assert counter.compute().tp == (0, 0)


def test_shape_mismatch_is_refused():
    counter = ConfusionCounter(["a", "b"])
    with pytest.raises(ValueError, match="N, 2, H, W"):
        counter.update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))


def test_table_and_csv_name_every_class_and_mark_undefined_scores():
    scores = SegmentationScores(("blowhole", "crack"), tp=(3, 0), fp=(1, 0), fn=(0, 0))
    table = scores.table()
    assert "blowhole" in table and "75.00" in table and "n/a" in table and "overall" in table
    lines = scores.to_csv().splitlines()
    assert lines[0] == "class,iou,f1,tp,fp,fn"
    assert lines[1].startswith("blowhole,0.75,") and lines[2].startswith("crack,nan,nan,0,0,0")
    assert lines[3].startswith("overall,0.75,")
