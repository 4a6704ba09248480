"""Host-side region boxes of a plan's injections: they contain what DALI and the dilation produce.

With them the Poisson solve reads nothing back from the GPU, so they must never cut a region:
checked against a NumPy model of the resize and warp on random masks and matrices (edge-touching
masks included), and against the real DALI CPU pipeline through the loader.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from dli.data.manifest import FREE, Manifest
from dli.data.synth import generate
from dli.data.validation import defect_box, validate
from dli.kernels.poisson.blend import PoissonConvergenceWarning
from dli.pipeline import inject as inject_module
from dli.pipeline.augment import AffineAugment, apply_affine_numpy, identities
from dli.pipeline.inject import region_boxes
from dli.pipeline.loader import build_loader
from dli.pipeline.planner import DliConfig, Injection, Plan

RADIUS = 2
WILD = AffineAugment(flip_p=0.5, ssr_p=1.0, rotate=40.0, shift=0.25, scale=0.4)


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize as DALI samples it: each output pixel centre read from the source."""
    (h0, w0), (h, w) = mask.shape, size
    rows = np.minimum(((np.arange(h) + 0.5) * h0 / h).astype(int), h0 - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * w0 / w).astype(int), w0 - 1)
    return mask[np.ix_(rows, cols)]


def random_mask(rng: np.random.Generator, shape: tuple[int, int], touch_edge: bool) -> np.ndarray:
    h, w = shape
    mask = np.zeros(shape, bool)
    top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
    height, width = rng.integers(1, h // 2), rng.integers(1, w // 2)
    mask[top : top + height, left : left + width] = rng.random((height, width)) > 0.3
    if touch_edge:
        mask[:, : rng.integers(1, 4)] |= rng.random((h, 1)) > 0.5  # a break reaching the left edge
    if not mask.any():
        mask[top, left] = True
    return mask


def plan_of(matrices: np.ndarray) -> Plan:
    count = len(matrices)
    injections = tuple(Injection(k, 0, k, "poisson", matrices[k]) for k in range(count))
    return Plan(tuple(range(count)), (FREE,) * count, (0,) * count, injections, identities(count), 1)


@pytest.mark.parametrize("touch_edge", [False, True], ids=["inside", "touching-the-edge"])
def test_boxes_contain_every_warped_dilated_region(touch_edge: bool) -> None:
    rng = np.random.default_rng(0)
    size = (48, 64)
    masks = [random_mask(rng, tuple(rng.integers(30, 120, 2)), touch_edge) for _ in range(40)]
    matrices = np.stack([WILD.sample(rng, size) for _ in masks])
    boxes = region_boxes(plan_of(matrices), np.array([defect_box(m) for m in masks]), size, RADIUS)
    assert boxes is not None and boxes.shape == (40, 4)
    slack = []
    for mask, matrix, (top, left, bottom, right) in zip(masks, matrices, boxes, strict=True):
        warped = apply_affine_numpy(resize_nearest(mask, size), matrix, nearest=True)
        region = ndimage.binary_dilation(warped, np.ones((5, 5), bool)) if warped.any() else warped
        inside = np.zeros(size, bool)
        inside[top : bottom + 1, left : right + 1] = True
        assert not (region & ~inside).any(), "a region pixel lies outside its host-computed box"
        if region.any():
            rows, cols = np.nonzero(region)
            slack.append(max(rows.min() - top, cols.min() - left, bottom - rows.max(), right - cols.max()))
    if not touch_edge:  # the boxes hug the regions (a rotated box's corners cost a little more)
        assert np.median(slack) <= 3, slack


def test_a_region_the_resize_brings_to_the_edge_counts_as_touching_it() -> None:
    # Sources much larger than the output whose defect stops a row or column short of an edge:
    # the resize's last output pixel still samples the defect, and the warp then repeats it.
    rng = np.random.default_rng(1)
    size = (128, 128)
    masks, missed = [], 0
    for k in range(60):
        h0, w0 = rng.integers(300, 400, 2)
        mask = np.zeros((h0, w0), bool)
        rows, cols = slice(int(rng.integers(10, 100)), h0 - 1), slice(1, int(rng.integers(50, 150)))
        if k % 2:  # the same on the other sides
            rows, cols = slice(1, int(rng.integers(50, 150))), slice(int(rng.integers(10, 100)), w0 - 1)
        mask[rows, cols] = True
        masks.append(mask)
    matrices = np.stack([WILD.sample(rng, size) for _ in masks])
    boxes = region_boxes(plan_of(matrices), np.array([defect_box(m) for m in masks]), size, RADIUS)
    for mask, matrix, (top, left, bottom, right) in zip(masks, matrices, boxes, strict=True):
        warped = apply_affine_numpy(resize_nearest(mask, size), matrix, nearest=True)
        region = ndimage.binary_dilation(warped, np.ones((5, 5), bool))
        inside = np.zeros(size, bool)
        inside[top : bottom + 1, left : right + 1] = True
        missed += int((region & ~inside).any())
    assert missed == 0, f"{missed} of {len(masks)} regions leave their host-computed boxes"


def test_boxes_are_unknown_when_a_source_was_not_measured() -> None:
    plan = plan_of(identities(2))
    boxes = np.array([[0.1, 0.1, 0.5, 0.5], [np.nan] * 4])
    assert region_boxes(plan, boxes, (32, 32), RADIUS) is None
    assert region_boxes(plan, boxes[[0, 0]], (32, 32), RADIUS).tolist() == [[0, 0, 18, 18]] * 2


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return generate(
        tmp_path_factory.mktemp("data") / "synth", images=48, seed=5, size_range=((60, 90), (50, 120))
    )


@pytest.mark.parametrize("solver", ["cg", "direct"])
def test_the_loader_boxes_contain_what_dali_decodes_and_change_nothing(
    synthetic: Manifest, monkeypatch, solver: str
) -> None:
    """The host boxes hold every region. For the CG they change nothing (its unknowns are the
    region's own pixels); the direct solver's window follows its box, so there the loader's blend
    equals a blend with the same boxes, not one on the measured ones."""
    report = validate(synthetic)
    options = {
        "batch_size": 8,
        "image_size": 64,
        "train": True,
        # A tight tolerance, so the two window choices below agree to 1e-4 (at training's 1e-4
        # they agree to the 0.05 gray levels that tolerance leaves; docs/kernels.md).
        "dli": DliConfig(poisson_prob=1.0, poisson_tol=1e-5, poisson_solver=solver),
        "seed": 1,
    }
    seen: list[np.ndarray | None] = []
    real_blend = inject_module.poisson_blend

    def recording_blend(*args, **kwargs):
        seen.append(kwargs.get("boxes"))
        return real_blend(*args, **kwargs)

    monkeypatch.setattr(inject_module, "poisson_blend", recording_blend)
    loader = build_loader(synthetic, source_boxes=report.mask_boxes, **options)
    with_boxes = list(loader)
    assert seen and all(b is not None for b in seen)
    checked = 0
    for batch in with_boxes:
        boxes = region_boxes(batch.plan, loader.donors.boxes, (64, 64), RADIUS)  # indexed by donor
        for injection, (top, left, bottom, right) in zip(batch.plan.injections, boxes, strict=True):
            label = batch.masks[injection.slot, injection.class_id].numpy() > 0
            region = ndimage.binary_dilation(label, np.ones((5, 5), bool))
            inside = np.zeros_like(region)
            inside[top : bottom + 1, left : right + 1] = True
            assert not (region & ~inside).any()
            checked += 1
    assert checked >= 5
    seen.clear()
    if solver == "direct":  # the same boxes again, given by the test: the same blend, bit for bit
        again = list(build_loader(synthetic, source_boxes=report.mask_boxes, **options))
        for a, b in zip(with_boxes, again, strict=True):
            torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
        return
    measured = list(build_loader(synthetic, **options))
    assert seen and all(b is None for b in seen)
    for a, b in zip(with_boxes, measured, strict=True):
        # The host boxes are a little larger than the measured ones: other windows, the same
        # solution to the solver's tolerance; labels identical.
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-4)
        torch.testing.assert_close(a.masks, b.masks, rtol=0, atol=0)


def test_a_non_converged_batch_is_warned_about_by_the_loader(synthetic: Manifest, monkeypatch) -> None:
    report = validate(synthetic)
    monkeypatch.setattr("dli.kernels.poisson.blend.default_max_iter", lambda tol: 1)  # too few to converge
    dli = DliConfig(poisson_prob=1.0, poisson_solver="cg")  # the direct solver has nothing to converge
    options = {"batch_size": 8, "image_size": 64, "train": True, "dli": dli}
    loader = build_loader(synthetic, source_boxes=report.mask_boxes, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    messages = [str(w.message) for w in caught if issubclass(w.category, PoissonConvergenceWarning)]
    assert batches and len(messages) == sum(bool(b.plan.injections) for b in batches)
    assert all("did not converge" in m for m in messages)  # once per batch, not again a batch later


@pytest.mark.gpu
def test_a_poisson_injection_with_boxes_reads_nothing_back_on_the_gpu(runs_ahead_of_the_gpu) -> None:
    pytest.importorskip("cupy")
    from dli.pipeline.inject import inject

    rng = np.random.default_rng(7)
    size, count = (64, 64), 4
    masks = np.stack([random_mask(rng, size, touch_edge=False) for _ in range(count)])
    plan = plan_of(identities(count))
    boxes = region_boxes(plan, np.array([defect_box(m) for m in masks]), size, RADIUS)

    def case(device: str) -> tuple[torch.Tensor, ...]:
        generator = np.random.default_rng(8)  # the same inputs on each device
        images = torch.from_numpy(generator.random((count, 1, *size), dtype=np.float32))
        sources = torch.from_numpy(generator.random((count, 1, *size), dtype=np.float32))
        tensors = images, torch.zeros((count, 1, *size)), sources, torch.from_numpy(masks)
        return tuple(t.to(device) for t in tensors)

    inject(*case("cuda"), plan, DliConfig(poisson_prob=1.0), boxes=boxes)  # warm-up: plans and kernels
    images, labels, sources, source_masks = case("cuda")
    info = runs_ahead_of_the_gpu(
        lambda: inject(images, labels, sources, source_masks, plan, DliConfig(poisson_prob=1.0), boxes=boxes)
    )
    assert info is not None and info.all_converged, info.summary()
    assert torch.equal(labels[:, 0].bool(), source_masks)

    # The CPU twin of the same injection: the same labels, and the same blended images to the
    # float rounding of the solver (the direct solver's DSTs in float32 on either device).
    twin = case("cpu")
    original = twin[0].clone()
    twin_info = inject(*twin, plan, DliConfig(poisson_prob=1.0), boxes=boxes)
    assert twin_info is not None and twin_info.all_converged, twin_info.summary()
    assert torch.equal(labels.cpu(), twin[1])
    assert (twin[0] - original).abs().amax((1, 2, 3)).min() > 0.01  # every image was blended
    torch.testing.assert_close(images.cpu(), twin[0], rtol=0, atol=1e-3)
