"""Donors decoded once and warped on the device: the warp against its NumPy reference, the cache's
budget and bookkeeping, and the loader's batches with and without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dli.common.errors import DliError
from dli.data.manifest import Manifest
from dli.data.synth import generate
from dli.pipeline.augment import (
    MT_DEFECT_AUGMENT,
    apply_affine_numpy,
    compose,
    flip_matrix,
    shift_scale_rotate_matrix,
)
from dli.pipeline.donor_cache import BUDGET_VARIABLE, DonorCache, grid_matrices, warp_on_device
from dli.pipeline.loader import Loader, build_loader
from dli.pipeline.planner import DliConfig

SIZE = 64


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return generate(
        tmp_path_factory.mktemp("donors") / "synth", images=48, seed=5, size_range=((60, 90), (50, 120))
    )


def random_matrices(rng: np.random.Generator, count: int, size: tuple[int, int]) -> np.ndarray:
    """Every class's defect augmentation, drawn at random, each after a random flip."""
    augments = list(MT_DEFECT_AUGMENT.values())
    out = []
    for k in range(count):
        flip = flip_matrix(size, horizontal=bool(rng.random() < 0.5), vertical=bool(rng.random() < 0.5))
        out.append(compose(augments[k % len(augments)].sample(rng, size), flip))
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize(("channels", "size"), [(1, (48, 64)), (3, (37, 29)), (1, (64, 64))])
def test_the_device_warp_is_the_reference_warp(channels: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(channels * 100 + size[0])
    count = 24
    images = rng.normal(size=(count, channels, *size))
    masks = (rng.random((count, *size)) < 0.3).astype(np.uint8)
    matrices = random_matrices(rng, count, size)
    warped, warped_masks = warp_on_device(
        torch.from_numpy(images.astype(np.float32)), torch.from_numpy(masks), matrices
    )
    assert warped.dtype == warped_masks.dtype == torch.float32
    assert warped.shape == images.shape and warped_masks.shape == masks.shape
    for k in range(count):
        expected = apply_affine_numpy(images[k].transpose(1, 2, 0), matrices[k], nearest=False)
        np.testing.assert_allclose(warped[k].numpy().transpose(1, 2, 0), expected, atol=1e-4)
        expected_mask = apply_affine_numpy(masks[k], matrices[k], nearest=True)
        # Nearest picks can differ only where a pixel centre maps onto a pixel edge (float32 grid).
        assert np.mean(warped_masks[k].numpy() != expected_mask) < 0.002


def test_flips_and_quarter_turns_are_exact() -> None:
    rng = np.random.default_rng(1)
    size = (32, 32)
    image = rng.random((1, 1, *size)).astype(np.float32)
    mask = (rng.random((1, *size)) < 0.5).astype(np.uint8)
    for matrix, expected in [
        (flip_matrix(size, horizontal=True, vertical=False), image[..., ::-1]),
        (flip_matrix(size, horizontal=False, vertical=True), image[..., ::-1, :]),
        (shift_scale_rotate_matrix(size, angle=90.0, scale=1.0), np.rot90(image, axes=(2, 3))),
    ]:
        warped, warped_mask = warp_on_device(torch.from_numpy(image), torch.from_numpy(mask), matrix[None])
        np.testing.assert_allclose(warped.numpy(), expected, atol=1e-6)
        expected_mask = apply_affine_numpy(mask[0], matrix, nearest=True)
        np.testing.assert_array_equal(warped_mask[0].numpy(), expected_mask)


def test_grid_matrices_of_the_identity_sample_pixel_centres() -> None:
    grid = grid_matrices(np.eye(3)[None, :2], (10, 20))
    np.testing.assert_allclose(grid[0], [[1, 0, 0], [0, 1, 0]], atol=1e-7)


def decoded_donors(
    rng: np.random.Generator, count: int, channels: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(rng.normal(size=(count, channels, 16, 16)).astype(np.float32))
    masks = torch.from_numpy(rng.integers(0, 3, size=(count, 16, 16), dtype=np.uint8))
    return images, masks


def test_the_cache_keeps_donors_in_order_until_its_budget_is_full() -> None:
    rng = np.random.default_rng(2)
    per_donor = 16 * 16 * (4 * 3 + 1)
    cache = DonorCache(10, 3, (16, 16), torch.device("cpu"), budget=3 * per_donor + per_donor // 2)
    assert cache.capacity == 3 and len(cache) == 0 and cache.bytes == 0
    assert cache.missing([4, 2, 4, 7]) == (4, 2, 7)
    images, masks = decoded_donors(rng, 3, channels=3)
    matrices = np.broadcast_to(np.eye(3)[:2], (4, 2, 3)).astype(np.float32)
    sources, source_masks = cache.sources([4, 2, 4, 7], matrices, (4, 2, 7), images, masks)
    assert len(cache) == 3 and cache.bytes == 3 * per_donor
    np.testing.assert_allclose(sources.numpy(), images[[0, 1, 0, 2]].numpy(), atol=1e-6)
    np.testing.assert_array_equal(source_masks.numpy(), (masks[[0, 1, 0, 2]] != 0).numpy())
    # Full: a new donor is decoded with every batch that needs it, the kept ones never again.
    assert cache.missing([7, 1, 2]) == (1,)
    more, more_masks = decoded_donors(rng, 1, channels=3)
    sources, _ = cache.sources([7, 1, 2], matrices[:3], (1,), more, more_masks)
    assert len(cache) == 3 and cache.missing([1]) == (1,)
    np.testing.assert_allclose(
        sources.numpy(), torch.cat([images[2:3], more, images[1:2]]).numpy(), atol=1e-6
    )
    with pytest.raises(RuntimeError, match="neither kept nor decoded"):
        cache.sources([5], matrices[:1], (), more[:0], more_masks[:0])


def test_the_budget_changes_nothing_in_the_sources() -> None:
    rng = np.random.default_rng(3)
    images, masks = decoded_donors(rng, 6)
    matrices = random_matrices(rng, 9, (16, 16))
    batches = [[0, 1, 1, 2], [3, 0, 4], [5, 2]]
    results = []
    for budget in (0, 2 * 16 * 16 * 5, 2**30):
        cache = DonorCache(6, 1, (16, 16), torch.device("cpu"), budget=budget)
        out, start = [], 0
        for donors in batches:
            missing = cache.missing(donors)
            sources = cache.sources(
                donors,
                matrices[start : start + len(donors)],
                missing,
                images[list(missing)],
                masks[list(missing)],
            )
            out.append(sources)
            start += len(donors)
        results.append(out)
    for other in results[1:]:
        for (a, am), (b, bm) in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(am, bm, rtol=0, atol=0)


def cut_paste_loader(manifest: Manifest, **kwargs: object) -> Loader:
    options: dict[str, object] = {
        "batch_size": 8,
        "image_size": SIZE,
        "train": True,
        "dli": DliConfig(poisson_prob=0.0),
        "seed": 4,
    }
    options.update(kwargs)
    return build_loader(manifest, **options)  # type: ignore[arg-type]


def test_loader_batches_match_dalis_own_warp_of_the_sources(synthetic: Manifest) -> None:
    cached = cut_paste_loader(synthetic)
    warped_by_dali = cut_paste_loader(synthetic)
    warped_by_dali.donor_cache = None  # the path crops take: sources decoded and warped with their batch
    injected = 0
    for epoch in range(2):
        cached.set_epoch(epoch)
        warped_by_dali.set_epoch(epoch)
        for a, b in zip(cached, warped_by_dali, strict=True):
            assert a.plan is not None and b.plan is not None and a.plan.to_dict() == b.plan.to_dict()
            injected += len(a.plan.injections)
            # Nearest picks of the masks differ only where a pixel centre maps onto a pixel edge.
            assert (a.masks != b.masks).float().mean() < 1e-3
            assert ((a.images - b.images).abs() > 1e-3).float().mean() < 1e-3
    assert injected > 20


def test_the_loader_decodes_each_kept_donor_once_and_the_budget_leaves_batches_alone(
    synthetic: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(budget_mb: str) -> tuple[list, list[tuple[int, ...]], Loader]:
        monkeypatch.setenv(BUDGET_VARIABLE, budget_mb)
        loader = cut_paste_loader(synthetic, dli=DliConfig(poisson_prob=0.5))
        decoded: list[tuple[int, ...]] = []
        item = loader._item

        def spy(*args: object) -> object:
            made = item(*args)  # type: ignore[arg-type]
            decoded.append(made.decoded_donors)
            assert len(made.work) == len(made.indices) + len(made.decoded_donors)
            return made

        loader._item = spy  # type: ignore[method-assign]
        batches = []
        for epoch in range(3):
            loader.set_epoch(epoch)
            batches += list(loader)
        return batches, decoded, loader

    kept, decoded, loader = run("64")
    assert loader.donor_cache is not None and len(loader.donor_cache) > 0
    counts = np.bincount(np.concatenate([np.array(d, dtype=np.int64) for d in decoded]))
    # Once, or again by the batches fed ahead (planned before the first one was assembled).
    assert counts.max() <= loader.prefetch + 1 and (counts == 1).any()
    none, decoded_none, _ = run("0")
    used = [len({i.donor_id for i in b.plan.injections}) for b in none]
    assert [len(d) for d in decoded_none] == used  # each batch decodes every donor it injects
    for a, b in zip(kept, none, strict=True):
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
        torch.testing.assert_close(a.masks, b.masks, rtol=0, atol=0)


def test_a_bad_budget_is_one_clear_error(synthetic: Manifest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BUDGET_VARIABLE, "lots")
    with pytest.raises(DliError, match=f"{BUDGET_VARIABLE}='lots'"):
        cut_paste_loader(synthetic)


def test_crops_keep_no_donors(synthetic: Manifest) -> None:
    from dli.pipeline.crops import CropConfig

    loader = cut_paste_loader(synthetic, crop=CropConfig(size=32))
    assert loader.donor_cache is None
    assert loader.donors is not None and next(iter(loader)).images.shape[-2:] == (32, 32)


@pytest.mark.gpu
def test_on_the_gpu_the_cache_agrees_with_the_cpu_and_never_waits(runs_ahead_of_the_gpu) -> None:
    rng = np.random.default_rng(6)
    size = (96, 80)
    images = torch.from_numpy(rng.normal(size=(5, 3, *size)).astype(np.float32))
    masks = torch.from_numpy((rng.random((5, *size)) < 0.3).astype(np.uint8))
    donors, matrices = [0, 3, 3, 4, 1, 2], random_matrices(rng, 6, size)
    cpu = DonorCache(5, 3, size, torch.device("cpu"), budget=2**30)
    gpu = DonorCache(5, 3, size, torch.device("cuda"), budget=2**30)
    expected = cpu.sources(donors, matrices, (0, 3, 4, 1, 2), images, masks)
    first = gpu.sources(donors, matrices, (0, 3, 4, 1, 2), images.cuda(), masks.cuda())
    # Every donor is kept now: the next batch's sources come from the device alone, queued.
    none, no_masks = images[:0].cuda(), masks[:0].cuda()
    again = runs_ahead_of_the_gpu(lambda: gpu.sources(donors, matrices, (), none, no_masks))
    for got in (first, again):
        torch.testing.assert_close(got[0].cpu(), expected[0], rtol=0, atol=1e-4)
        assert (got[1].cpu() != expected[1]).float().mean() < 2e-3
