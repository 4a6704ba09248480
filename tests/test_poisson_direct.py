"""The direct sine-transform blender (`dli.kernels.poisson.direct`) against a direct sparse solve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dli.kernels.morphology import dilate
from dli.kernels.poisson.blend import PoissonConvergenceWarning, measured_boxes, poisson_blend
from dli.kernels.poisson.direct import DIRECT_MARGIN, direct_blend, direct_windows
from tests.poisson_reference import sparse_reference


def window_reference(
    target: np.ndarray, source: np.ndarray, mask: np.ndarray, corner, side, mixed: bool
) -> np.ndarray:
    """One (H, W) channel: the window problem solved by SciPy (float64); unknowns are the window's
    interior pixels, its edge keeps the target."""
    (top, left), (height, width) = corner, side
    unknown = np.zeros(mask.shape, dtype=bool)
    unknown[top + 1 : top + height - 1, left + 1 : left + width - 1] = True
    return sparse_reference(target, source, mask, mixed, unknown=unknown)


def random_regions(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """A rectangle or two per image, some touching the image border, one image empty."""
    mask = np.zeros((n, height, width), dtype=bool)
    for k in range(n - 1):
        for _ in range(rng.integers(1, 3)):
            top, left = rng.integers(0, height - 2), rng.integers(0, width - 2)
            mask[k, top : top + rng.integers(1, height // 2), left : left + rng.integers(1, width // 2)] = (
                True
            )
    mask[0, :, 0] = True  # along the left border
    return mask


def check_against_reference(target, source, mask, *, mixed: bool, window: str, layout: str) -> None:
    blended, info = direct_blend(
        np, target, source, mask, mixed_gradients=mixed, boxes=None, window=window, layout=layout
    )
    assert info.all_converged and info.solver == "direct", info.summary()
    sides, corners = direct_windows(measured_boxes(mask), *mask.shape[1:], window=window)
    for n in range(target.shape[0]):
        for c in range(target.shape[1]):
            if not sides[n, 0]:
                np.testing.assert_array_equal(blended[n, c], target[n, c])
                continue
            reference = window_reference(target[n, c], source[n, c], mask[n], corners[n], sides[n], mixed)
            np.testing.assert_allclose(blended[n, c], reference, rtol=0, atol=1e-10, err_msg=f"{n, c}")


@pytest.mark.parametrize("layout", ["shapes", "padded"])
@pytest.mark.parametrize("window", ["box", "image"])
@pytest.mark.parametrize("mixed", [False, True], ids=["source-gradients", "mixed-gradients"])
@pytest.mark.parametrize("channels", [1, 3])
def test_matches_sparse_solve_on_random_inputs(channels: int, mixed: bool, window: str, layout: str) -> None:
    rng = np.random.default_rng([channels, mixed, len(window), len(layout)])
    n, height, width = 4, 21, 27
    target, source = rng.random((n, channels, height, width)), rng.random((n, channels, height, width))
    check_against_reference(
        target, source, random_regions(rng, n, height, width), mixed=mixed, window=window, layout=layout
    )


def magnetic_tile_regions(root: Path, size: int, count: int) -> np.ndarray:
    """The first masks of each MT defect class at size², dilated 5x5 as injection uses them."""
    from PIL import Image

    masks = []
    for folder in sorted(f for f in root.glob("MT_*") if f.name != "MT_Free"):
        for path in sorted((folder / "Imgs").glob("*.png"))[:count]:
            with Image.open(path) as image:
                masks.append(
                    np.asarray(image.convert("L").resize((size, size), Image.Resampling.NEAREST)) > 0
                )
    return dilate(np.stack(masks), 2)


@pytest.mark.realdata
@pytest.mark.parametrize("layout", ["shapes", "padded"])
def test_matches_sparse_solve_on_magnetic_tile_masks(mt_root: Path, layout: str) -> None:
    rng = np.random.default_rng(3)
    mask = magnetic_tile_regions(mt_root, 40, 2)
    assert len(mask) == 10 and mask.any(axis=(1, 2)).all()
    target, source = rng.random((len(mask), 1, 40, 40)), rng.random((len(mask), 1, 40, 40))
    check_against_reference(target, source, mask, mixed=True, window="box", layout=layout)


def test_outside_the_window_is_target_bit_for_bit() -> None:
    rng = np.random.default_rng(4)
    target, source = (
        rng.random((3, 2, 40, 50)).astype(np.float32),
        rng.random((3, 2, 40, 50)).astype(np.float32),
    )
    mask = np.zeros((3, 40, 50), dtype=bool)
    mask[0, 10:14, 20:30] = mask[1, 30:38, 2:6] = True
    for layout in ("shapes", "padded"):
        blended, _ = direct_blend(np, target, source, mask, mixed_gradients=True, boxes=None, layout=layout)
        sides, corners = direct_windows(measured_boxes(mask), 40, 50)
        for n in range(3):
            inside = np.zeros((40, 50), dtype=bool)
            (top, left), (height, width) = corners[n], sides[n]
            inside[top + 1 : top + height - 1, left + 1 : left + width - 1] = True
            np.testing.assert_array_equal(blended[n][:, ~inside], target[n][:, ~inside])
        assert not sides[2].any()


def test_windows_are_box_plus_margin_at_fast_lengths_inside_the_image() -> None:
    boxes = np.array([[10, 20, 13, 29], [0, 0, 99, 99], [50, 95, 52, 99], [5, 5, 4, 9]])
    sides, corners = direct_windows(boxes, 100, 100)
    # Each side covers the clipped box plus the margin on both sides...
    clipped_low, clipped_high = np.maximum(boxes[:3, :2], 1), np.minimum(boxes[:3, 2:], 98)
    assert (corners[:3] <= clipped_low - np.minimum(DIRECT_MARGIN, clipped_low)).all()
    assert (corners[:3] + sides[:3] - 1 >= np.minimum(clipped_high + DIRECT_MARGIN, 99)).all()
    # ... lies inside the image, and its interior has a fast DST-I (m + 1 5-smooth) or spans the image.
    assert (corners >= 0).all() and (corners + sides <= 100).all()
    for side in sides[:3].ravel():
        rest = int(side) - 1
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        assert rest == 1 or side == 100
    assert not sides[3].any()  # an empty box: no window
    np.testing.assert_array_equal(direct_windows(boxes, 100, 100, window="image")[0][:3], 100)


@pytest.mark.parametrize("layout", ["shapes", "padded"])
def test_an_image_blends_the_same_alone_or_in_a_batch_of_64(layout: str) -> None:
    rng = np.random.default_rng(5)
    target, source = rng.random((64, 1, 48, 48)), rng.random((64, 1, 48, 48))
    mask = random_regions(rng, 64, 48, 48)
    batch, _ = direct_blend(np, target, source, mask, mixed_gradients=True, boxes=None, layout=layout)
    for n in (0, 7, 63):
        alone, _ = direct_blend(
            np,
            target[n : n + 1],
            source[n : n + 1],
            mask[n : n + 1],
            mixed_gradients=True,
            boxes=None,
            layout=layout,
        )
        np.testing.assert_allclose(batch[n], alone[0], rtol=0, atol=1e-12)


def test_float32_stays_close_to_the_float64_solve() -> None:
    rng = np.random.default_rng(6)
    target, source = rng.random((8, 1, 64, 64)), rng.random((8, 1, 64, 64))
    mask = random_regions(rng, 8, 64, 64)
    exact, _ = direct_blend(np, target, source, mask, mixed_gradients=True, boxes=None)
    for layout in ("shapes", "padded"):
        single, _ = direct_blend(
            np,
            target.astype(np.float32),
            source.astype(np.float32),
            mask,
            mixed_gradients=True,
            boxes=None,
            layout=layout,
        )
        assert single.dtype == np.float32
        assert np.abs(single - exact).max() < 1e-5


def test_source_shifted_by_a_constant_reproduces_the_target_inside_the_region() -> None:
    """Guidance equal to the target's gradients everywhere: the blend is the target itself."""
    rng = np.random.default_rng(7)
    target = rng.random((2, 1, 30, 30))
    mask = random_regions(rng, 2, 30, 30)
    blended, _ = poisson_blend(target, target + 0.3, mask, solver="direct")
    np.testing.assert_allclose(blended, target, atol=1e-12)


def test_given_boxes_give_the_measured_boxes_result_and_misses_are_reported() -> None:
    rng = np.random.default_rng(8)
    target, source = rng.random((2, 1, 32, 32)), rng.random((2, 1, 32, 32))
    mask = np.zeros((2, 32, 32), dtype=bool)
    mask[0, 5:9, 6:12] = mask[1, 20:30, 3:5] = True
    measured, _ = poisson_blend(target, source, mask, solver="direct")
    given, info = poisson_blend(target, source, mask, solver="direct", boxes=measured_boxes(mask))
    np.testing.assert_array_equal(given, measured)
    assert not info.outside_box.any()
    short = measured_boxes(mask)
    short[1] = [20, 3, 22, 4]  # misses rows 23..29 minus the margin
    with pytest.warns(PoissonConvergenceWarning, match="outside their windows"):
        _, info = poisson_blend(target, source, mask, solver="direct", boxes=short)
    assert info.outside_box[0] == 0 and info.outside_box[1] > 0
    assert not info.all_converged and "outside their windows" in info.summary()


def test_torch_tensors_in_give_torch_tensors_out() -> None:
    rng = np.random.default_rng(9)
    target, source = (
        rng.random((2, 3, 24, 24)).astype(np.float32),
        rng.random((2, 3, 24, 24)).astype(np.float32),
    )
    mask = random_regions(rng, 2, 24, 24)
    expected, _ = poisson_blend(target, source, mask, solver="direct")
    blended, info = poisson_blend(
        torch.from_numpy(target), torch.from_numpy(source), torch.from_numpy(mask), solver="direct"
    )
    assert isinstance(blended, torch.Tensor)
    np.testing.assert_array_equal(blended.numpy(), expected)
    assert info.iterations.shape == (2, 3) and not info.iterations.any()


def test_bad_solver_window_and_layout_are_rejected() -> None:
    target = np.zeros((1, 1, 8, 8))
    mask = np.zeros((1, 8, 8), dtype=bool)
    with pytest.raises(ValueError, match="solver"):
        poisson_blend(target, target, mask, solver="fft")
    with pytest.raises(ValueError, match="window"):
        poisson_blend(target, target, mask, solver="direct", window="tile")
    with pytest.raises(ValueError, match="layout"):
        direct_blend(np, target, target, mask, mixed_gradients=False, boxes=None, layout="dense")


@pytest.mark.parametrize("m", [1, 5, 16, 47])
def test_the_devices_dst1_by_fft_matches_scipy(m: int) -> None:
    """CuPy's cupyx.scipy.fft.dstn has no type 1: the device's own construction, run on NumPy."""
    import scipy.fft

    from dli.kernels.poisson.direct import _dst1_by_fft

    x = np.random.default_rng(m).random((3, 2, m, m + 3))
    for axis in (-1, -2):
        np.testing.assert_allclose(
            _dst1_by_fft(np, x, axis), scipy.fft.dst(x, type=1, axis=axis, norm="ortho"), rtol=0, atol=1e-12
        )
