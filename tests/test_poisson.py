"""Batched Poisson blending against a direct sparse solve, its properties, and mask dilation."""

from __future__ import annotations

import itertools
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from dli.kernels.morphology import dilate
from dli.kernels.poisson.blend import (
    PoissonConvergenceWarning,
    default_max_iter,
    gpu_max_iter,
    guidance_field,
    poisson_blend,
)
from dli.kernels.poisson.windows import Bucket, Transfers, bucket_shapes, fast_side
from dli.kernels.xp import as_array, as_tensor
from dli.pipeline.planner import DliConfig
from tests.poisson_reference import sparse_reference


def region_error(result: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """Relative L2 error over the mask."""
    region = mask.astype(bool)
    return float(np.linalg.norm(result[region] - reference[region]) / np.linalg.norm(reference[region]))


def blob_masks(rng: np.random.Generator, n: int, height: int, width: int, level: float = 0.53) -> np.ndarray:
    """Random smooth blobs, a few per image."""
    noise = ndimage.gaussian_filter(rng.random((n, height, width)), sigma=(0, height / 16, width / 16))
    return noise > np.quantile(noise, level, axis=(1, 2), keepdims=True)


def textured(rng: np.random.Generator, shape: tuple[int, ...], mean: float) -> np.ndarray:
    """Smooth shading plus fine grain around `mean`, like a tile surface."""
    shading = ndimage.gaussian_filter(rng.random(shape), sigma=(0,) * (len(shape) - 2) + (6, 6))
    grain = ndimage.gaussian_filter(rng.random(shape), sigma=(0,) * (len(shape) - 2) + (1, 1))
    return mean + 2.0 * (shading - shading.mean()) + 0.5 * (grain - grain.mean())


def check_against_reference(target, source, mask, *, mixed: bool = False) -> None:
    blended, info = poisson_blend(target, source, mask, mixed_gradients=mixed, tol=1e-8)
    assert info.all_converged, info.summary()
    assert (info.residuals <= 2e-8).all(), info.summary()
    for n in range(target.shape[0]):
        for c in range(target.shape[1]):
            reference = sparse_reference(target[n, c], source[n, c], mask[n], mixed)
            assert region_error(blended[n, c], reference, mask[n]) <= 1e-4, (n, c)


@pytest.mark.parametrize("mixed", [False, True], ids=["source-gradients", "mixed-gradients"])
def test_matches_sparse_solve_on_random_blobs(mixed: bool) -> None:
    rng = np.random.default_rng(1)
    target, source = rng.random((3, 2, 48, 56)), rng.random((3, 2, 48, 56))
    check_against_reference(target, source, blob_masks(rng, 3, 48, 56), mixed=mixed)


def magnetic_tile_masks(root: Path, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """Per defect class, the largest of its first eight masks, rescaled so its longer side is in `sizes`."""
    masks = []
    folders = [f for f in sorted(root.glob("MT_*")) if f.name != "MT_Free"]
    for folder, size in zip(folders, sizes, strict=True):
        candidates = []
        for path in sorted((folder / "Imgs").glob("*.png"))[:8]:
            with Image.open(path) as image:
                candidates.append(image.convert("L"))
        mask = max(candidates, key=lambda m: np.count_nonzero(np.array(m)) / (m.width * m.height))
        scale = size / max(mask.size)
        mask = mask.resize((round(mask.width * scale), round(mask.height * scale)), Image.Resampling.NEAREST)
        masks.append(np.array(mask) > 0)
    return masks


@pytest.mark.realdata
def test_matches_sparse_solve_on_magnetic_tile_masks(mt_root: Path) -> None:
    rng = np.random.default_rng(2)
    masks = magnetic_tile_masks(mt_root, sizes=(64, 96, 128, 192, 256))
    assert len(masks) == 5 and all(m.any() for m in masks)
    for mask in masks:
        shape = (1, 1, *mask.shape)
        target, source = textured(rng, shape, 0.45), textured(rng, shape, 0.3)
        check_against_reference(target, source, mask[None])


def test_outside_region_is_target_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    target = rng.random((4, 3, 40, 40), dtype=np.float32)
    source = rng.random((4, 3, 40, 40), dtype=np.float32)
    mask = blob_masks(rng, 4, 40, 40)
    mask[0, :, :3] = True  # touches the left border
    blended, _ = poisson_blend(target, source, mask)
    assert blended.dtype == np.float32
    inside = mask.copy()
    inside[:, [0, -1], :] = False
    inside[:, :, [0, -1]] = False
    outside = np.broadcast_to(~inside[:, None], target.shape)
    np.testing.assert_array_equal(blended[outside], target[outside])
    assert not np.array_equal(blended[~outside], target[~outside])


def test_empty_mask_returns_a_copy_of_target() -> None:
    rng = np.random.default_rng(4)
    target = rng.random((2, 1, 16, 16), dtype=np.float32)
    mask = np.zeros((2, 16, 16), bool)
    mask[1, 0, :] = True  # only border pixels: nothing to solve either
    blended, info = poisson_blend(target, rng.random((2, 1, 16, 16), dtype=np.float32), mask)
    np.testing.assert_array_equal(blended, target)
    assert blended is not target
    assert (info.iterations == 0).all() and info.all_converged


def test_source_shifted_by_a_constant_reproduces_target() -> None:
    rng = np.random.default_rng(5)
    target = rng.random((2, 2, 32, 32))
    mask = blob_masks(rng, 2, 32, 32)
    blended, info = poisson_blend(target, target + 0.7, mask, tol=1e-10, x0="zeros")
    np.testing.assert_allclose(blended, target, atol=1e-8)
    assert (info.iterations > 0).all()
    # The default start (source matched to the target on the boundary) is already the answer.
    blended, info = poisson_blend(target, target + 0.7, mask, tol=1e-10)
    np.testing.assert_allclose(blended, target, atol=1e-10)
    assert (info.iterations == 0).all()


def test_target_inside_the_region_does_not_matter() -> None:
    rng = np.random.default_rng(15)
    target, source = rng.random((3, 1, 32, 32)), rng.random((3, 1, 32, 32))
    mask = blob_masks(rng, 3, 32, 32)
    inside = mask.copy()
    inside[:, [0, -1], :] = False  # mask pixels on the image border are fixed to the target
    inside[:, :, [0, -1]] = False
    scrambled = np.where(inside[:, None], rng.normal(size=target.shape), target)
    blended, info = poisson_blend(target, source, mask, tol=1e-10)
    again, again_info = poisson_blend(scrambled, source, mask, tol=1e-10)
    np.testing.assert_allclose(again, blended, atol=1e-9)
    # Not even the starting guess looks inside: it matches the source to the target on the boundary only.
    np.testing.assert_array_equal(again_info.iterations, info.iterations)


def test_mixed_gradients_never_pick_the_weaker_edge() -> None:
    rng = np.random.default_rng(6)
    target, source = rng.normal(size=(2, 3, 20, 24)), rng.normal(size=(2, 3, 20, 24))
    for gradient, axis in zip(guidance_field(target, source, mixed_gradients=True), (3, 2), strict=True):
        from_source, from_target = np.diff(source, axis=axis), np.diff(target, axis=axis)
        assert gradient.shape == from_source.shape
        np.testing.assert_array_equal(np.abs(gradient), np.maximum(np.abs(from_source), np.abs(from_target)))
        assert np.all((gradient == from_source) | (gradient == from_target))
    gx, gy = guidance_field(target, source)
    np.testing.assert_array_equal(gx, np.diff(source, axis=3))
    np.testing.assert_array_equal(gy, np.diff(source, axis=2))


def test_mask_touching_the_border_keeps_border_pixels_fixed() -> None:
    rng = np.random.default_rng(7)
    target, source = rng.random((2, 1, 24, 30)), rng.random((2, 1, 24, 30))
    mask = np.zeros((2, 24, 30), bool)
    mask[0] = True  # the whole image: unknowns are the interior
    mask[1, :10, 20:] = True  # a corner
    check_against_reference(target, source, mask)
    blended, _ = poisson_blend(target, source, mask)
    np.testing.assert_array_equal(blended[..., [0, -1], :], target[..., [0, -1], :])
    np.testing.assert_array_equal(blended[..., :, [0, -1]], target[..., :, [0, -1]])


def test_a_batch_of_64_matches_images_solved_one_by_one() -> None:
    rng = np.random.default_rng(8)
    target, source = rng.random((64, 1, 32, 32)), rng.random((64, 1, 32, 32))
    # Regions from a few pixels to half the image: systems converge at very different steps.
    mask = np.concatenate([blob_masks(rng, 8, 32, 32, level=level) for level in np.linspace(0.5, 0.995, 8)])
    batch, batch_info = poisson_blend(target, source, mask, tol=1e-10)
    assert batch_info.iterations.min() < batch_info.iterations.max() // 2
    for n in range(0, 64, 5):
        single, info = poisson_blend(target[n : n + 1], source[n : n + 1], mask[n : n + 1], tol=1e-10)
        np.testing.assert_allclose(batch[n], single[0], rtol=0, atol=1e-8)
        assert abs(int(batch_info.iterations[n, 0]) - int(info.iterations[0, 0])) <= 2


def test_channels_are_solved_independently() -> None:
    rng = np.random.default_rng(9)
    target, source = rng.random((2, 3, 20, 20)), rng.random((2, 3, 20, 20))
    mask = blob_masks(rng, 2, 20, 20)
    color, info = poisson_blend(target, source, mask, tol=1e-10)
    assert info.iterations.shape == (2, 3)
    for c in range(3):
        gray, _ = poisson_blend(target[:, c : c + 1], source[:, c : c + 1], mask, tol=1e-10)
        np.testing.assert_allclose(color[:, c : c + 1], gray, atol=1e-8)


def test_default_start_saves_iterations_over_zeros() -> None:
    rng = np.random.default_rng(10)
    shape = (6, 1, 64, 64)
    target, source = textured(rng, shape, 0.45), textured(rng, shape, 0.25)
    mask = dilate(blob_masks(rng, 6, 64, 64, level=0.8), 2)
    _, matched = poisson_blend(target.astype(np.float32), source.astype(np.float32), mask)
    _, zeros = poisson_blend(target.astype(np.float32), source.astype(np.float32), mask, x0="zeros")
    assert matched.all_converged and zeros.all_converged
    assert matched.iterations.sum() < zeros.iterations.sum(), (matched.summary(), zeros.summary())


@pytest.mark.realdata
def test_default_start_saves_iterations_on_magnetic_tiles(mt_root: Path) -> None:
    def read(path: Path, mode: str) -> np.ndarray:
        with Image.open(path) as image:
            return np.array(image.convert(mode).resize((96, 96), Image.Resampling.BILINEAR))

    defects = [
        sorted((f / "Imgs").glob("*.png"))[1] for f in sorted(mt_root.glob("MT_*")) if f.name != "MT_Free"
    ]
    free = sorted((mt_root / "MT_Free" / "Imgs").glob("*.jpg"))[: len(defects)]
    source = np.stack([read(p.with_suffix(".jpg"), "L") for p in defects])[:, None] / np.float32(255)
    target = np.stack([read(p, "L") for p in free])[:, None] / np.float32(255)
    mask = dilate(np.stack([read(p, "L") > 0 for p in defects]), 2)
    _, matched = poisson_blend(target, source, mask)
    _, zeros = poisson_blend(target, source, mask, x0="zeros")
    assert matched.iterations.sum() < zeros.iterations.sum(), (matched.summary(), zeros.summary())


def test_explicit_start_at_the_solution_needs_no_iterations() -> None:
    rng = np.random.default_rng(11)
    target, source = rng.random((2, 1, 24, 24)), rng.random((2, 1, 24, 24))
    mask = blob_masks(rng, 2, 24, 24)
    solution, _ = poisson_blend(target, source, mask, tol=1e-12)
    again, info = poisson_blend(target, source, mask, tol=1e-6, x0=solution)
    assert (info.iterations == 0).all()
    np.testing.assert_array_equal(again, solution)


def test_non_converged_systems_are_reported() -> None:
    rng = np.random.default_rng(12)
    target, source = rng.random((2, 1, 32, 32)), rng.random((2, 1, 32, 32))
    mask = blob_masks(rng, 2, 32, 32)
    with pytest.warns(PoissonConvergenceWarning, match="did not converge"):
        _, info = poisson_blend(target, source, mask, max_iter=2)
    assert not info.converged.any() and not info.all_converged
    np.testing.assert_array_equal(info.iterations, 2)
    assert (info.residuals > 1e-5).all()
    assert "0/2 systems converged" in info.summary()


def test_torch_cpu_tensors_in_give_torch_tensors_out() -> None:
    rng = np.random.default_rng(13)
    target = torch.from_numpy(rng.random((2, 1, 20, 20), dtype=np.float32))
    source = torch.from_numpy(rng.random((2, 1, 20, 20), dtype=np.float32))
    mask = torch.from_numpy(blob_masks(rng, 2, 20, 20))
    blended, _ = poisson_blend(target, source, mask)
    expected, _ = poisson_blend(target.numpy(), source.numpy(), mask.numpy())
    assert isinstance(blended, torch.Tensor) and blended.dtype == torch.float32
    np.testing.assert_array_equal(blended.numpy(), expected)
    # The conversions in both directions are views, not copies.
    assert as_array(target).ctypes.data == target.data_ptr()
    assert as_array(mask).dtype == np.bool_ and as_array(mask).ctypes.data == mask.data_ptr()
    assert as_tensor(expected).data_ptr() == expected.ctypes.data


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((2, 1, 8, 8), (2, 1, 8, 8), (2, 8, 9)), "mask must be"),
        (((2, 1, 8, 8), (2, 3, 8, 8), (2, 8, 8)), "target and source"),
        (((1, 8, 8), (1, 8, 8), (1, 8, 8)), "target and source"),
    ],
)
def test_bad_shapes_are_rejected(shapes, message: str) -> None:
    target, source, mask = (np.zeros(s, np.float32) for s in shapes)
    with pytest.raises(ValueError, match=message):
        poisson_blend(target, source, mask)


def test_bad_arguments_are_rejected() -> None:
    images, mask = np.zeros((1, 1, 8, 8), np.float32), np.ones((1, 8, 8), bool)
    with pytest.raises(ValueError, match="float32 or float64"):
        poisson_blend(images.astype(np.uint8), images.astype(np.uint8), mask)
    with pytest.raises(ValueError, match="tol"):
        poisson_blend(images, images, mask, tol=0)
    with pytest.raises(ValueError, match="x0"):
        poisson_blend(images, images, mask, x0="source")
    with pytest.raises(ValueError, match="x0"):
        poisson_blend(images, images, mask, x0=np.zeros((1, 1, 8, 7), np.float32))


def test_dilate_matches_a_max_pool() -> None:
    rng = np.random.default_rng(14)
    mask = rng.random((3, 30, 27)) > 0.97
    mask[0, 0, 0] = mask[1, -1, 5] = True  # on the border
    soft = (rng.random(mask.shape) * mask).astype(np.float32)  # numeric masks dilate by their maximum
    for radius in (1, 2, 4, 20):  # 20: wider than the image is tall, so every shift is clipped
        size = 2 * radius + 1
        pooled = torch.nn.functional.max_pool2d(
            torch.from_numpy(soft)[:, None], size, stride=1, padding=radius
        )[:, 0].numpy()
        dilated = dilate(mask, radius)
        assert dilated.dtype == np.bool_ and dilated.shape == mask.shape
        np.testing.assert_array_equal(dilated, pooled > 0)
        soft_dilated = dilate(soft, radius)
        assert soft_dilated.dtype == np.float32
        np.testing.assert_array_equal(soft_dilated, pooled)
    np.testing.assert_array_equal(dilate(mask, 0), mask)


def test_dilate_keeps_images_apart_and_accepts_torch() -> None:
    mask = np.zeros((2, 9, 9), np.uint8)
    mask[0, 4, 4] = 1
    dilated = dilate(torch.from_numpy(mask), 2)
    assert isinstance(dilated, torch.Tensor) and dilated.dtype == torch.uint8
    assert int(dilated[0].sum()) == 25 and int(dilated[1].sum()) == 0
    with pytest.raises(ValueError, match="radius"):
        dilate(mask, -1)


def test_a_blowhole_does_not_pay_for_a_large_region_in_its_batch() -> None:
    rng = np.random.default_rng(16)
    target, source = textured(rng, (2, 1, 256, 256), 0.45), textured(rng, (2, 1, 256, 256), 0.25)
    mask = np.zeros((2, 256, 256), bool)
    mask[0, 120, 100:103] = True  # a 3-pixel blowhole
    rows, cols = np.ogrid[:256, :256]
    mask[1] = (rows - 128) ** 2 + (cols - 127) ** 2 < 125**2  # an uneven region 250 pixels across
    batch, info = poisson_blend(target, source, mask, tol=1e-10)
    assert info.windows[0].prod() <= 8 * 8 and info.windows[1].min() >= 250, info.windows
    for n in range(2):
        alone, alone_info = poisson_blend(target[n : n + 1], source[n : n + 1], mask[n : n + 1], tol=1e-10)
        np.testing.assert_array_equal(alone_info.windows[0], info.windows[n])
        np.testing.assert_allclose(batch[n], alone[0], rtol=0, atol=1e-9)
        reference = sparse_reference(target[n, 0], source[n, 0], mask[n])
        assert region_error(batch[n, 0], reference, mask[n]) <= 1e-6


def test_per_image_windows_equal_the_full_image_solve() -> None:
    rng = np.random.default_rng(17)
    target, source = rng.random((4, 2, 40, 52)), rng.random((4, 2, 40, 52))
    rows, cols = np.ogrid[:40, :52]
    centres, radii = rng.integers(6, 34, (4, 2)), rng.uniform(2, 6, 4)
    mask = np.stack(
        [(rows - y) ** 2 + (cols - x) ** 2 < r**2 for (y, x), r in zip(centres, radii, strict=True)]
    )
    windowed, info = poisson_blend(target, source, mask, tol=1e-10)
    assert (info.windows < [40, 52]).all(), info.windows
    whole = np.tile([0, 0, 39, 51], (4, 1))  # boxes as large as the image: a window covering it all
    full, full_info = poisson_blend(target, source, mask, tol=1e-10, boxes=whole)
    assert (full_info.windows >= [40, 52]).all(), full_info.windows
    np.testing.assert_allclose(windowed, full, rtol=0, atol=1e-8)


def test_window_copies_by_slices_match_the_devices_advanced_indexing() -> None:
    """The CPU cuts and pastes windows image by image; CuPy gathers them in one advanced index.

    Both branches run here on NumPy (the device one through a module that is not NumPy), with
    windows that run past the image's far edge, where both repeat the last row and column.
    """
    rng = np.random.default_rng(20)
    height, width = 23, 19
    images, mask = rng.random((5, 2, height, width)), rng.random((5, height, width)) > 0.5
    device = types.SimpleNamespace(moveaxis=np.moveaxis, ascontiguousarray=np.ascontiguousarray)
    sides = np.array([[24, 20]] * 3 + [[8, 6]] * 2)  # three windows larger than the image
    corners = np.array([[0, 0], [0, 0], [0, 0], [15, 13], [3, 4]])
    for bucket in Bucket.group(Transfers(np), sides, corners, height, width):
        windows = bucket.crop(np, images)
        np.testing.assert_array_equal(windows, bucket.crop(device, images))
        np.testing.assert_array_equal(bucket.region(np, mask), bucket.region(device, mask))
        # The solver changes only pixels off the image's last row and column (never region), so
        # a repeated pixel is always written with the value already there.
        changed = (bucket.rows < height - 1)[:, None, :, None] & (bucket.cols < width - 1)[:, None, None, :]
        windows = np.where(changed, rng.random(windows.shape), windows)
        by_slices, by_index = images.copy(), images.copy()
        bucket.paste(np, by_slices, windows)
        bucket.paste(device, by_index, windows)
        np.testing.assert_array_equal(by_slices, by_index)
        assert not np.array_equal(by_slices, images)


def test_given_boxes_give_the_measured_boxes_result() -> None:
    rng = np.random.default_rng(18)
    target, source = rng.random((3, 1, 48, 48)), rng.random((3, 1, 48, 48))
    mask = blob_masks(rng, 3, 48, 48, level=0.85)
    measured, info = poisson_blend(target, source, mask, tol=1e-9)
    boxes = []
    for region in mask:
        rows, cols = np.nonzero(region)
        boxes.append([rows.min(), cols.min(), rows.max(), cols.max()])
    given, given_info = poisson_blend(target, source, mask, tol=1e-9, boxes=boxes)
    np.testing.assert_array_equal(given, measured)
    np.testing.assert_array_equal(given_info.iterations, info.iterations)
    assert not given_info.outside_box.any()


def test_a_region_outside_its_given_box_is_reported_not_hidden() -> None:
    rng = np.random.default_rng(19)
    target, source = rng.random((2, 1, 32, 32)), rng.random((2, 1, 32, 32))
    mask = np.zeros((2, 32, 32), bool)
    mask[:, 10:20, 10:20] = True
    boxes = np.array([[10, 10, 19, 19], [10, 10, 14, 19]])  # the second box misses five rows
    with pytest.warns(PoissonConvergenceWarning, match="outside their boxes"):
        blended, info = poisson_blend(target, source, mask, boxes=boxes)
    assert info.outside_box[0] == 0 and 0 < info.outside_box[1] <= 40  # at most rows 16..19
    assert not info.all_converged
    # Exactly the counted region pixels were left as the target; the rest was solved.
    untouched = mask[1] & (blended[1, 0] == target[1, 0])
    assert untouched.sum() == info.outside_box[1]
    np.testing.assert_array_equal(blended[1, 0, 18:20], target[1, 0, 18:20])
    with pytest.raises(ValueError, match="boxes"):
        poisson_blend(target, source, mask, boxes=np.zeros((2, 3), int))


def test_bucket_merging_trades_window_pixels_for_fewer_buckets() -> None:
    sides = np.array([[9, 9], [10, 9], [0, 0], [64, 60], [16, 16]])
    separate = bucket_shapes(sides, overhead_pixels=0)
    np.testing.assert_array_equal(separate, sides)  # no overhead: every shape its own bucket
    one = bucket_shapes(sides, overhead_pixels=1 << 30)
    np.testing.assert_array_equal(one[[0, 1, 3, 4]], [[64, 60]] * 4)  # a huge overhead: one bucket
    np.testing.assert_array_equal(one[2], [0, 0])  # nothing to solve stays nothing
    some = bucket_shapes(sides, overhead_pixels=200)
    np.testing.assert_array_equal(some[[0, 1]], [[10, 9], [10, 9]])  # near-equal small shapes merge
    np.testing.assert_array_equal(some[3], [64, 60])  # the large one does not absorb the small ones
    assert all(fast_side(s) == s for s in (3, 4, 5, 6, 8, 9, 10, 256))
    assert [fast_side(s) for s in (7, 11, 13, 254, 257)] == [8, 12, 15, 256, 270]


def greedy_buckets(sides: np.ndarray, overhead: int) -> np.ndarray:
    """`bucket_shapes` by its definition: rescore every pair, merge the first best, until none gains."""
    shapes = sorted({tuple(s) for s in sides.tolist() if s[0]})
    buckets = [[shape, sum(tuple(s) == shape for s in sides.tolist()), [shape]] for shape in shapes]

    def cost(shape, count):
        return count * shape[0] * shape[1] + overhead

    while True:
        best = None
        for i, (a, n_a, _) in enumerate(buckets):
            for j in range(i + 1, len(buckets)):
                b, n_b, _ = buckets[j]
                merged = (max(a[0], b[0]), max(a[1], b[1]))
                gain = cost(a, n_a) + cost(b, n_b) - cost(merged, n_a + n_b)
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, i, j, merged)
        if best is None:
            break
        _, i, j, merged = best
        buckets[i] = [merged, buckets[i][1] + buckets[j][1], buckets[i][2] + buckets[j][2]]
        del buckets[j]
    shape_of = {original: shape for shape, _, group in buckets for original in group}
    return np.array([shape_of.get(tuple(s), (0, 0)) for s in sides.tolist()]).reshape(sides.shape)


def test_bucket_merging_matches_the_greedy_rule_on_random_batches() -> None:
    rng = np.random.default_rng(21)
    for _ in range(60):
        count = int(rng.integers(1, 70))
        extents = rng.integers(3, 300, (count, 2))
        sides = np.array([[fast_side(int(h)), fast_side(int(w))] for h, w in extents])
        sides[rng.random(count) < 0.2] = 0  # images with nothing to solve
        for overhead in (0, 300, 4096, 1 << 21):
            np.testing.assert_array_equal(bucket_shapes(sides, overhead), greedy_buckets(sides, overhead))


def real_tile_batch(root: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every defect image of MT as a source over a defect-free target, its mask dilated 5x5, at size²."""
    from dli.data.manifest import FREE, read_dataset

    def read(path: Path, mode: str, resample: Image.Resampling) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode).resize((size, size), resample))

    samples = read_dataset(root).samples
    defects = [s for s in samples if s.class_id != FREE]
    free = [s for s in samples if s.class_id == FREE][: len(defects)]
    source = np.stack([read(s.image, "L", Image.Resampling.BILINEAR) for s in defects])
    target = np.stack([read(s.image, "L", Image.Resampling.BILINEAR) for s in free])
    masks = np.stack([read(s.mask, "L", Image.Resampling.NEAREST) > 0 for s in defects])
    scale = np.float32(1 / 255)
    return target[:, None] * scale, source[:, None] * scale, dilate(masks, 2)


@pytest.mark.realdata
@pytest.mark.slow
def test_the_iteration_budget_suffices_for_every_magnetic_tile_mask(mt_root: Path) -> None:
    target, source, mask = real_tile_batch(mt_root, 256)
    assert len(mask) == 392
    training_tol = DliConfig().poisson_tol
    for tol, mixed in itertools.product((1e-5, training_tol), (True, False)):
        _, info = poisson_blend(target, source, mask, mixed_gradients=mixed, tol=tol)
        assert info.max_iter == default_max_iter(tol)
        assert info.converged.all(), info.summary()
        # With room to spare: the budget is no tight fit to today's masks.
        assert info.iterations.max() <= 0.8 * info.max_iter, info.summary()


@pytest.mark.realdata
@pytest.mark.slow
def test_the_gpu_budget_suffices_for_every_magnetic_tile_mask_on_the_gpus_windows(
    mt_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU runs `gpu_max_iter` steps on windows merged by its own cost model: solved here on
    the CPU with the GPU's bucketing, in training's batches of 64, with mixed gradients as
    training blends, at training's tolerance and at 1e-5 (the two points of the budget's line)."""
    from dli.kernels.poisson import blend as poisson

    monkeypatch.setitem(poisson.BUCKET_OVERHEAD_PIXELS, "cpu", poisson.BUCKET_OVERHEAD_PIXELS["cuda"])
    target, source, mask = real_tile_batch(mt_root, 256)
    assert len(mask) == 392
    for tol in (DliConfig().poisson_tol, 1e-5):
        budget, most = gpu_max_iter(tol), 0
        for batch in range(0, len(mask), 64):
            part = slice(batch, batch + 64)
            _, info = poisson_blend(
                target[part], source[part], mask[part], mixed_gradients=True, tol=tol, max_iter=budget
            )
            assert info.converged.all(), info.summary()
            assert info.buckets <= 2, info.summary()  # the GPU's merged windows, not per-image ones
            most = max(most, int(info.iterations.max()))
        assert most <= 0.8 * budget, (tol, most, budget)  # room to spare, as for the CPU's budget
