"""Injection of a plan into a decoded batch: where pixels may change, and which labels are set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from dli.data.manifest import FREE
from dli.kernels.poisson.blend import measured_boxes
from dli.kernels.poisson.direct import direct_windows
from dli.pipeline import inject as inject_module
from dli.pipeline.augment import IDENTITY, identities
from dli.pipeline.inject import inject
from dli.pipeline.planner import DliConfig, Injection, Plan

N, C, H, W = 6, 3, 40, 48


def smooth_images(rng: np.random.Generator, count: int, low: float, high: float) -> torch.Tensor:
    noise = ndimage.gaussian_filter(rng.standard_normal((count, 1, H, W)), sigma=(0, 0, 3, 3))
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return torch.from_numpy((low + (high - low) * noise).astype(np.float32))


def blob_masks(rng: np.random.Generator, count: int) -> torch.Tensor:
    yy, xx = np.mgrid[0:H, 0:W]
    masks = []
    for _ in range(count):
        cy, cx = rng.uniform(10, H - 10), rng.uniform(10, W - 10)
        ry, rx = rng.uniform(3, 8), rng.uniform(3, 10)
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0)
    return torch.from_numpy(np.stack(masks))


def make_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Plan]:
    """Slots 0, 2, 3, 5 are defect-free; 0 and 3 get Poisson, 2 and 5 cut-paste."""
    rng = np.random.default_rng(seed)
    images = smooth_images(rng, N, 0.3, 0.6)
    sources = smooth_images(rng, 4, 0.0, 0.25)  # dark defects: every change is visible
    source_masks = blob_masks(rng, 4)
    labels = torch.zeros((N, C, H, W))
    labels[1, 0] = blob_masks(rng, 1)[0].float()
    labels[4, 2] = blob_masks(rng, 1)[0].float()
    before = (FREE, 0, FREE, FREE, 2, FREE)
    injections = (
        Injection(0, 1, 100, "poisson", IDENTITY),
        Injection(2, 1, 101, "paste", IDENTITY),
        Injection(3, 0, 102, "poisson", IDENTITY),
        Injection(5, 2, 103, "paste", IDENTITY),
    )
    after = (1, 0, 1, 0, 2, 2)
    plan = Plan(tuple(range(N)), before, after, injections, identities(N), C)
    return images, labels, sources, source_masks, plan


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_injection_changes_only_what_the_plan_says(solver: str) -> None:
    images, labels, sources, source_masks, plan = make_case()
    original_images, original_labels = images.clone(), labels.clone()
    config = DliConfig(dilate_radius=2, poisson_solver=solver)
    info = inject(images, labels, sources, source_masks, plan, config)
    assert info is not None and info.all_converged and info.solver == solver
    domain = ndimage.binary_dilation(source_masks.numpy(), structure=np.ones((1, 5, 5), bool))
    if solver == "direct":  # the whole window may change: the domain's box widened by the margin
        sides, corners = direct_windows(measured_boxes(domain), H, W)
        for k, ((top, left), (height, width)) in enumerate(zip(corners, sides, strict=True)):
            domain[k, top + 1 : top + height - 1, left + 1 : left + width - 1] = True
    for k, item in enumerate(plan.injections):
        slot, mask = item.slot, source_masks[k]
        changed = (images[slot, 0] != original_images[slot, 0]).numpy()
        if item.method == "poisson":
            assert not changed[~domain[k]].any(), "Poisson changed a pixel outside its domain"
            assert changed[mask.numpy()].mean() > 0.9
            assert torch.all(images[slot] >= 0) and torch.all(images[slot] <= 1)
        else:
            torch.testing.assert_close(images[slot, 0][mask], sources[k, 0][mask], rtol=0, atol=0)
            torch.testing.assert_close(
                images[slot, 0][~mask], original_images[slot, 0][~mask], rtol=0, atol=0
            )
        # The label is the undilated source mask, in the planned class channel only.
        torch.testing.assert_close(labels[slot, item.class_id], mask.float(), rtol=0, atol=0)
        others = [c for c in range(C) if c != item.class_id]
        assert not labels[slot, others].any()
    for untouched in (1, 4):
        torch.testing.assert_close(images[untouched], original_images[untouched], rtol=0, atol=0)
        torch.testing.assert_close(labels[untouched], original_labels[untouched], rtol=0, atol=0)


def test_one_kernel_call_per_method(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, list[int]] = {"poisson": [], "paste": []}
    real_blend, real_paste = inject_module.poisson_blend, inject_module.paste

    def counting_blend(target, source, mask, **kwargs):
        calls["poisson"].append(int(target.shape[0]))
        return real_blend(target, source, mask, **kwargs)

    def counting_paste(target, source, mask, **kwargs):
        calls["paste"].append(int(source.shape[0]))
        return real_paste(target, source, mask, **kwargs)

    monkeypatch.setattr(inject_module, "poisson_blend", counting_blend)
    monkeypatch.setattr(inject_module, "paste", counting_paste)
    images, labels, sources, source_masks, plan = make_case(1)
    inject(images, labels, sources, source_masks, plan, DliConfig())
    assert calls == {"poisson": [2], "paste": [2]}


def test_normalized_range_and_float_masks() -> None:
    images, labels, sources, source_masks, plan = make_case(2)
    mean, std = 0.43, 0.12
    low, high = (0 - mean) / std, (1 - mean) / std
    normalized = (images - mean) / std
    normalized_sources = (sources - mean) / std
    inject(
        normalized,
        labels,
        normalized_sources,
        source_masks.float(),
        plan,
        DliConfig(),
        value_range=(low, high),
    )
    plain_images, plain_labels, *_ = make_case(2)
    inject(plain_images, plain_labels, sources, source_masks, plan, DliConfig())
    # Paste and Poisson are affine-invariant: injecting normalized images gives the normalized result.
    torch.testing.assert_close(normalized * std + mean, plain_images, rtol=0, atol=2e-4)
    torch.testing.assert_close(labels, plain_labels, rtol=0, atol=0)


def test_nothing_to_inject_and_shape_checks() -> None:
    images, labels, sources, source_masks, plan = make_case(3)
    empty = Plan(plan.batch_indices, plan.class_ids_before, plan.class_ids_before, (), plan.image_matrices, C)
    before = images.clone()
    assert inject(images, labels, sources[:0], source_masks[:0], empty, DliConfig()) is None
    torch.testing.assert_close(images, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="3 sources"):
        inject(images, labels, sources[:3], source_masks[:3], plan, DliConfig())


def test_strided_images_are_written_through_and_strided_labels_refused() -> None:
    images, labels, sources, source_masks, plan = make_case(4)
    expected_images, expected_labels = images.clone(), labels.clone()
    inject(expected_images, expected_labels, sources, source_masks, plan, DliConfig())
    strided = torch.zeros((N, 1, H, 2 * W))[..., ::2]  # every other column of a wider batch
    strided.copy_(images)
    inject(strided, labels, sources, source_masks, plan, DliConfig())
    torch.testing.assert_close(strided, expected_images, rtol=0, atol=0)
    torch.testing.assert_close(labels, expected_labels, rtol=0, atol=0)
    strided_labels = torch.zeros((N, C, H, 2 * W))[..., ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        inject(images, strided_labels, sources, source_masks, plan, DliConfig())
