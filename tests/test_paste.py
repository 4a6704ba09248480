"""Cut-paste injection against a plain per-item NumPy composite, labels included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dli.kernels.paste import paste


def expected_paste(target, source, mask, labels, class_ids, slots):
    """Item by item: alpha-composite where the mask is set, and set the class's label channel there."""
    target, labels = target.copy(), None if labels is None else labels.copy()
    for item, slot in enumerate(slots):
        alpha = mask[item].astype(np.float64)
        where = mask[item] != 0
        for c in range(target.shape[1]):
            blend = alpha * source[item, c] + (1 - alpha) * target[slot, c]
            target[slot, c][where] = blend[where]
        if labels is not None and 0 <= class_ids[item] < labels.shape[1]:
            labels[slot, class_ids[item]][where] = 1
    return target, labels


def random_case(rng: np.random.Generator, batch: int, items: int, mask_dtype=np.bool_):
    target = rng.random((batch, 3, 12, 10), dtype=np.float32)
    source = rng.random((items, 3, 12, 10), dtype=np.float32)
    mask = rng.random((items, 12, 10)) > 0.6
    labels = (rng.random((batch, 4, 12, 10)) > 0.8).astype(np.float32)
    return target, source, mask.astype(mask_dtype), labels


@pytest.mark.parametrize("mask_dtype", [np.bool_, np.uint8, np.float32])
def test_full_batch_with_labels(mask_dtype) -> None:
    rng = np.random.default_rng(0)
    target, source, mask, labels = random_case(rng, 5, 5, mask_dtype)
    class_ids = np.array([0, 3, 1, 1, 2])
    want_images, want_labels = expected_paste(target, source, mask, labels, class_ids, range(5))
    out = paste(target, source, mask, labels=labels, class_ids=class_ids)
    assert out is target
    np.testing.assert_array_equal(target, want_images)
    np.testing.assert_array_equal(labels, want_labels)


def test_sub_batch_of_slots_leaves_other_slots_alone() -> None:
    rng = np.random.default_rng(1)
    target, source, mask, labels = random_case(rng, 6, 3)
    before_images, before_labels = target.copy(), labels.copy()
    slots, class_ids = np.array([4, 0, 2]), np.array([3, -1, 1])  # -1: pasted without a label
    want_images, want_labels = expected_paste(target, source, mask, labels, class_ids, slots)
    paste(target, source, mask, labels=labels, class_ids=class_ids, slots=slots)
    np.testing.assert_array_equal(target, want_images)
    np.testing.assert_array_equal(labels, want_labels)
    for untouched in (1, 3, 5):
        np.testing.assert_array_equal(target[untouched], before_images[untouched])
        np.testing.assert_array_equal(labels[untouched], before_labels[untouched])
    np.testing.assert_array_equal(labels[0], before_labels[0])  # class -1 writes no label
    assert labels[4, 3][mask[0]].all() and not np.array_equal(labels[4], before_labels[4])


def test_soft_alpha_blends_and_binary_masks_copy_exactly() -> None:
    rng = np.random.default_rng(2)
    target, source, _, _ = random_case(rng, 2, 2)
    alpha = rng.random((2, 12, 10)).astype(np.float32) * (rng.random((2, 12, 10)) > 0.5)
    want, _ = expected_paste(target, source, alpha, None, None, range(2))
    paste(target, source, alpha)
    np.testing.assert_allclose(target, want, rtol=1e-6)
    binary = target.copy()
    paste(binary, source, alpha > 0)
    np.testing.assert_array_equal(binary, np.where((alpha > 0)[:, None], source, target))


def test_torch_tensors_are_written_in_place() -> None:
    rng = np.random.default_rng(3)
    target, source, mask, labels = random_case(rng, 4, 2)
    class_ids, slots = np.array([2, 0]), np.array([3, 1])
    want_images, want_labels = expected_paste(target, source, mask, labels, class_ids, slots)
    images_t, labels_t = torch.from_numpy(target.copy()), torch.from_numpy(labels.copy())
    out = paste(
        images_t,
        torch.from_numpy(source),
        torch.from_numpy(mask),
        labels=labels_t,
        class_ids=torch.from_numpy(class_ids),
        slots=torch.from_numpy(slots),
    )
    assert out is images_t
    np.testing.assert_array_equal(images_t.numpy(), want_images)
    np.testing.assert_array_equal(labels_t.numpy(), want_labels)


def test_bad_arguments_are_rejected() -> None:
    rng = np.random.default_rng(4)
    target, source, mask, labels = random_case(rng, 4, 2)
    with pytest.raises(ValueError, match="slots"):
        paste(target, source, mask)  # two items, four slots by default
    with pytest.raises(ValueError, match="mask"):
        paste(target, source, mask[:, :-1], slots=[0, 1])
    with pytest.raises(ValueError, match="class_ids are required"):
        paste(target, source, mask, labels=labels, slots=[0, 1])
    with pytest.raises(ValueError, match="class_ids must be"):
        paste(target, source, mask, labels=labels, class_ids=[1], slots=[0, 1])
    with pytest.raises(ValueError, match="source"):
        paste(target, source[:, :1], mask, slots=[0, 1])
