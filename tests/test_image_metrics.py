"""Image-level accept/reject metrics against a hand-made confusion of six images."""

from __future__ import annotations

import math

import pytest
import torch

from dli.models.image_metrics import ANY_DEFECT, ImageDecisionCounter

BIG = 10.0


def _image(
    predicted_pixels: tuple[int, int], actual_pixels: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4x4 image of classes (a, b) with that many predicted and ground-truth pixels per class."""
    logits = torch.full((2, 16), -BIG)
    targets = torch.zeros(2, 16)
    for c in range(2):
        logits[c, : predicted_pixels[c]] = BIG
        targets[c, : actual_pixels[c]] = 1
    return logits.view(1, 2, 4, 4), targets.view(1, 2, 4, 4)


# (predicted pixels of a, b), (ground-truth pixels of a, b), and what a line sees with min_area 2:
IMAGES = [
    ((3, 0), (4, 0)),  # a found: true reject
    ((1, 0), (4, 0)),  # a too small to reject: escape
    ((0, 2), (5, 0)),  # a flagged as b: rejected (a escapes, b false positive), not overkill
    ((0, 0), (0, 0)),  # defect-free, accepted
    ((0, 5), (0, 0)),  # defect-free, rejected for b: overkill
    ((0, 0), (0, 0)),  # defect-free, accepted
]


def _scores(min_area: int = 2, images=IMAGES):
    counter = ImageDecisionCounter(["a", "b"], (0.5, 0.5), min_area=min_area)
    for predicted, actual in images:
        counter.update(*_image(predicted, actual))
    return counter.compute()


def test_escape_and_overkill_on_a_hand_made_confusion():
    scores = _scores()
    a, b = scores.classes
    assert (a.tp, a.fp, a.fn, a.tn) == (1, 0, 2, 3)
    assert a.escape_rate == pytest.approx(2 / 3) and a.recall == pytest.approx(1 / 3)
    assert a.precision == 1.0 and a.overkill_rate == 0.0
    assert (b.tp, b.fp, b.fn, b.tn) == (0, 2, 0, 4)
    assert math.isnan(b.recall) and math.isnan(b.escape_rate)  # no image has b
    assert b.overkill_rate == pytest.approx(1 / 3)  # image 5 of the three defect-free ones
    anything = scores.any_defect
    assert anything.name == ANY_DEFECT
    assert (anything.tp, anything.fp, anything.fn, anything.tn) == (2, 1, 1, 2)
    assert anything.escape_rate == pytest.approx(1 / 3)
    assert anything.overkill_rate == pytest.approx(1 / 3)
    assert anything.precision == pytest.approx(2 / 3) and anything.f1 == pytest.approx(2 / 3)
    assert scores.images == 6 and scores.no_defect_free_note is None
    table = scores.table()
    assert ANY_DEFECT in table and "33.33" in table and "66.67" in table
    rows = scores.to_csv().splitlines()
    assert rows[0].startswith("class,min_area,image_tp") and "escape_rate" in rows[0] and len(rows) == 4


def test_min_area_one_rejects_on_any_predicted_pixel():
    a, _ = _scores(min_area=1).classes
    assert (a.tp, a.fn) == (2, 1)


def test_without_defect_free_images_overkill_is_undefined_and_said_so():
    scores = _scores(images=IMAGES[:3])
    assert math.isnan(scores.any_defect.overkill_rate)
    assert "no defect-free images" in scores.no_defect_free_note
    assert "no defect-free images" in scores.table()


def test_min_area_must_be_positive():
    with pytest.raises(ValueError, match="min_area"):
        ImageDecisionCounter(["a"], 0.5, min_area=0)
