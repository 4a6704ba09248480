"""Losses against values computed by hand on tiny tensors, and against torch's own BCE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dli.data.manifest import FREE, Manifest, Sample
from dli.models.losses import (
    ClassPixelCounts,
    build_loss,
    class_balanced_weights,
    count_class_pixels,
    positive_weights,
)

LN2, LN4 = math.log(2.0), math.log(4.0)

# One class, two pixels: probabilities 0.5 and 0.75, labels 1 and 0.
LOGITS = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2)
TARGETS = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
# Soft Dice: 2 * sum(p t) / (sum p + sum t) = 2 * 0.5 / (1.25 + 1) = 4/9.
DICE_LOSS = 1.0 - 4.0 / 9.0


def test_bce_dice_by_hand():
    loss, spec = build_loss("bce")
    bce = (LN2 + LN4) / 2  # -ln 0.5 and -ln(1 - 0.75)
    assert loss(LOGITS, TARGETS).item() == pytest.approx(0.5 * bce + 0.5 * DICE_LOSS, rel=1e-6)
    assert spec.pixel_term == "bce"


def test_dli_uses_the_bce_dice_loss():
    logits, targets = torch.randn(2, 3, 8, 8), (torch.rand(2, 3, 8, 8) > 0.7).float()
    assert build_loss("dli")[0](logits, targets).item() == pytest.approx(
        build_loss("bce")[0](logits, targets).item()
    )


def test_bce_term_matches_torch_and_dice_is_per_class_over_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 5, 5)
    targets = (torch.rand(3, 2, 5, 5) > 0.6).float()
    targets[:, 1] = 0  # class 1 absent from the batch: its Dice term counts as 0
    loss, _ = build_loss("bce")
    p = torch.sigmoid(logits)
    dice_0 = 1 - 2 * (p[:, 0] * targets[:, 0]).sum() / (p[:, 0].sum() + targets[:, 0].sum())
    expected = 0.5 * F.binary_cross_entropy(p, targets) + 0.5 * (dice_0 + 0.0) / 2
    assert loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_focal_dice_by_hand():
    loss, _ = build_loss("focal")
    # (1 - p_t)^2 * CE: p_t = 0.5 for the positive, 1 - 0.75 = 0.25 for the negative.
    focal = (0.5**2 * LN2 + 0.75**2 * LN4) / 2
    assert loss(LOGITS, TARGETS).item() == pytest.approx(0.5 * focal + 0.5 * DICE_LOSS, rel=1e-6)


def test_weighted_bce_pos_weight_from_pixel_counts():
    counts = ClassPixelCounts(positive=(10.0, 0.0), total=100.0)
    # negatives / positives; a class without positives counts one pixel.
    assert positive_weights(counts).tolist() == pytest.approx([9.0, 100.0])
    assert positive_weights(counts, cap=50.0).tolist() == pytest.approx([9.0, 50.0])

    loss, spec = build_loss("wce", ClassPixelCounts(positive=(25.0,), total=100.0))  # pos_weight 3
    wbce = (3 * LN2 + LN4) / 2
    assert loss(LOGITS, TARGETS).item() == pytest.approx(0.5 * wbce + 0.5 * DICE_LOSS, rel=1e-6)
    assert spec.class_weights == pytest.approx([3.0])


def test_class_balanced_weights_by_hand():
    # beta 0.9: raw weights 0.1 / (1 - 0.9^1) = 1 and 0.1 / (1 - 0.9^10); scaled to average 1.
    raw = np.array([1.0, 0.1 / (1 - 0.9**10)])
    assert class_balanced_weights([1, 10], beta=0.9).tolist() == pytest.approx(
        list(2 * raw / raw.sum()), rel=1e-6
    )
    assert class_balanced_weights([0, 1], beta=0.9).tolist() == pytest.approx([1.0, 1.0])  # 0 counts as 1


def test_class_balanced_bce_weights_each_channel():
    torch.manual_seed(1)
    logits, targets = torch.randn(2, 2, 4, 4), (torch.rand(2, 2, 4, 4) > 0.5).float()
    counts = ClassPixelCounts(positive=(1.0, 10.0), total=1000.0)
    loss, spec = build_loss("balanced", counts, cb_beta=0.9)
    weights = torch.tensor(spec.class_weights)
    per_channel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=(0, 2, 3))
    dice = build_loss("bce")[0].dice_loss(logits, targets)
    expected = 0.5 * (weights * per_channel).mean() + 0.5 * dice
    assert loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)
    # Equal counts give equal weights: plain BCE + Dice.
    equal, _ = build_loss("balanced", ClassPixelCounts(positive=(5.0, 5.0), total=1000.0))
    assert equal(logits, targets).item() == pytest.approx(
        build_loss("bce")[0](logits, targets).item(), rel=1e-6
    )


@pytest.mark.parametrize("method", ["bce", "focal", "balanced", "wce"])
def test_losses_run_in_float32_under_low_precision_logits(method):
    counts = ClassPixelCounts(positive=(3.0, 40.0), total=512.0)
    logits = (torch.randn(2, 2, 16, 16) * 30).to(torch.bfloat16)
    targets = (torch.rand(2, 2, 16, 16) > 0.5).to(torch.bfloat16)
    loss, _ = build_loss(method, counts)
    value = loss(logits, targets)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(loss(logits.float(), targets.float()).item(), rel=1e-6)


def test_methods_needing_counts_refuse_to_build_without_them():
    with pytest.raises(ValueError, match="pixel counts"):
        build_loss("wce")
    with pytest.raises(ValueError, match="unknown method"):
        build_loss("dice")


def _png(path, array):
    Image.fromarray(array).save(path)
    return path


def test_count_class_pixels_at_training_resolution(tmp_path):
    quarter = np.zeros((4, 4), np.uint8)
    quarter[:2, :2] = 255
    half = np.zeros((2, 6), np.uint8)
    half[0] = 255
    image = _png(tmp_path / "image.png", np.zeros((4, 4), np.uint8))  # contents unused
    manifest = Manifest(
        (
            Sample(image, _png(tmp_path / "a.png", quarter), 0),
            Sample(image, None, FREE),
            Sample(image, _png(tmp_path / "b.png", half), 1),
            Sample(image, _png(tmp_path / "c.png", quarter), 0),
        ),
        ("blowhole", "crack"),
        tmp_path,
    )
    counts = count_class_pixels(manifest, image_size=8)
    # Each image counts 8 x 8 = 64 pixels per channel: a quarter is 16, a half 32.
    assert counts.positive == (32.0, 32.0)
    assert counts.total == 4 * 64
    assert ClassPixelCounts.from_dict(counts.to_dict()) == counts


def test_soft_dice_equals_smp_multilabel_dice_and_its_sums_can_span_several_batches():
    from segmentation_models_pytorch.losses import DiceLoss

    from dli.models.losses import SoftDiceLoss

    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 4, 16, 16, generator=generator, dtype=torch.float64) * 3
    targets = (torch.rand(6, 4, 16, 16, generator=generator, dtype=torch.float64) > 0.8).double()
    targets[:, 2] = 0  # a class absent from the batch
    targets[:3, 0] = 0  # a class present in one half only
    smp_dice = DiceLoss(mode="multilabel", from_logits=True)
    ours = SoftDiceLoss()(logits, targets)
    torch.testing.assert_close(ours, smp_dice(logits, targets), rtol=1e-12, atol=1e-12)

    # Two halves whose statistics are summed by `reduce` give the Dice of the whole batch, and
    # the gradients of the halves are those of the whole.
    whole = logits.clone().requires_grad_(True)
    SoftDiceLoss()(whole, targets).backward()
    halves = [logits[:3].clone().requires_grad_(True), logits[3:].clone().requires_grad_(True)]
    partial: list[torch.Tensor] = []

    def sum_halves(stats: torch.Tensor) -> torch.Tensor:
        partial.append(stats)
        return stats if len(partial) == 1 else partial[0] + stats

    first = SoftDiceLoss(reduce=sum_halves)
    first(halves[0], targets[:3])  # records the first half's statistics
    combined = first(halves[1], targets[3:])
    torch.testing.assert_close(combined, SoftDiceLoss()(logits, targets), rtol=1e-12, atol=1e-12)
    combined.backward()
    torch.testing.assert_close(torch.cat([h.grad for h in halves]), whole.grad, rtol=1e-10, atol=1e-12)
