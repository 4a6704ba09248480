"""The direct solver's fused kernels (`dli.kernels.poisson.direct_cuda`): their NumPy twins against the
array-expression path and a sparse solve, their device-model counts, and the CUDA kernels on a GPU."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from dli.kernels import device_model
from dli.kernels.device_model import counting, to_model
from dli.kernels.poisson import direct, direct_cuda
from dli.kernels.poisson.blend import PoissonConvergenceWarning, measured_boxes, poisson_blend
from dli.kernels.poisson.direct import direct_blend, direct_windows
from dli.kernels.poisson.windows import Transfers
from tests.test_poisson_direct import window_reference

H, W = 30, 37


def border_case(channels: int, seed: int, dtype: type = np.float64) -> tuple[np.ndarray, ...]:
    """(target, source, mask) of 6 images whose windows differ in size and touch every image border:
    regions at the top-left and bottom-right corners, along the left and bottom edges, a large
    one whose window is nearly the image, a small one in the middle; and one image with none."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((7, H, W), dtype=bool)
    mask[0, 0:5, 0:6] = True
    mask[1, H - 4 :, W - 7 :] = True
    mask[2, 8:20, 0:2] = True
    mask[3, H - 2 :, 10:25] = True
    mask[4, 2 : H - 3, 3 : W - 2] = rng.random((H - 5, W - 5)) < 0.6
    mask[5, 14:16, 17:18] = True
    target = rng.random((7, channels, H, W)).astype(dtype)
    source = (rng.random((7, channels, H, W)) * 2 - 0.5).astype(dtype)
    return target, source, mask


class Padded(NamedTuple):
    """A batch's windows as `direct._solve_padded` lays them out: host tables and the padded shape."""

    solved: np.ndarray  # (B,) images with a window
    sides: np.ndarray  # (N, 2) every image's window
    corners: np.ndarray  # (N, 2)
    table: Any  # direct._DstTable (NumPy)
    flat: np.ndarray  # direct_cuda.window_table
    windows: np.ndarray  # (B, 7) view of `flat`
    slots: np.ndarray  # (N,) view of `flat`
    m: int  # the padded interior
    k: int


def padded(target: np.ndarray, mask: np.ndarray) -> Padded:
    n, _, h, w = target.shape
    sides, corners = direct_windows(measured_boxes(mask), h, w)
    solved = np.flatnonzero(sides[:, 0] > 0)
    own = sides[solved]
    table = direct._DstTable.of(Transfers(np), max(h, w) - 2, target.dtype, own - 2)
    rows_at = np.stack([table.rows_of(own[:, 0] - 2), table.rows_of(own[:, 1] - 2)], axis=1)
    flat = direct_cuda.window_table(solved, sides, corners, rows_at, n)
    m, k = (int(v) for v in own.max(axis=0) - 2)
    return Padded(solved, sides, corners, table, flat, *direct_cuda.split_table(flat, n), m, k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mixed", [False, True], ids=["source-gradients", "mixed-gradients"])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_rhs_twin_is_the_array_paths_rhs(channels: int, mixed: bool, dtype: type) -> None:
    """Bit for bit the right-hand side of the array expressions (`_edge_corrections`, `_interior_rhs`)
    on each window cut out of its image; zero past each window's own interior."""
    target, source, mask = border_case(channels, seed=channels + 2 * mixed, dtype=dtype)
    p = padded(target, mask)
    assert len(p.solved) == 6 and len({tuple(s) for s in p.sides[p.solved]}) >= 5  # several sizes
    assert (p.corners == 0).any(axis=0).all() and (p.corners + p.sides == (H, W)).any(axis=0).all()
    rhs = np.full((len(p.windows), channels, p.m, p.k), np.nan, dtype=dtype)
    direct_cuda.build_rhs(np, rhs, target, source, mask, p.windows, mixed)
    for b, (image, top, left, height, width, _, _) in enumerate(p.windows.tolist()):
        cut = np.s_[image : image + 1, ..., top : top + height, left : left + width]
        dx, dy = direct._edge_corrections(np, target[cut], source[cut], mask[cut], mixed)
        expected = direct._interior_rhs(dx, dy)[0]
        np.testing.assert_array_equal(rhs[b, :, : height - 2, : width - 2], expected)
        assert not rhs[b, :, height - 2 :].any() and not rhs[b, :, :, width - 2 :].any()
        assert expected.any()


def test_the_dst_and_eigenvalue_twins_use_each_windows_own_size() -> None:
    target, _, mask = border_case(1, seed=1)
    p = padded(target, mask)
    m, k = p.m, p.k
    rows, cols = np.full((len(p.windows), m, m), np.nan), np.full((len(p.windows), k, k), np.nan)
    direct_cuda.gather_dst_matrices(np, rows, cols, p.table.matrices, p.windows)
    coefficients = np.random.default_rng(0).random((len(p.windows), 2, m, k))
    divided = coefficients.copy()
    direct_cuda.divide_by_eigenvalues(np, divided, p.table.eigenvalues, p.windows)
    for b, (*_, height, width, _, _) in enumerate(p.windows.tolist()):
        own_m, own_k = height - 2, width - 2
        for matrices, size, side in ((rows, own_m, m), (cols, own_k, k)):
            expected = np.zeros((side, side))
            expected[:size, :size] = direct._dst1_matrix(size)
            np.testing.assert_array_equal(matrices[b], expected)
        scale = 1 / np.add.outer(direct._eigenvalues(own_m), direct._eigenvalues(own_k))
        np.testing.assert_array_equal(
            divided[b, :, :own_m, :own_k], coefficients[b, :, :own_m, :own_k] * scale
        )
        untouched = np.ones((m, k), dtype=bool)
        untouched[:own_m, :own_k] = False
        np.testing.assert_array_equal(divided[b][:, untouched], coefficients[b][:, untouched])


def test_the_write_back_twin_keeps_the_target_outside_the_interiors_and_counts_misses() -> None:
    target, _, mask = border_case(3, seed=4, dtype=np.float32)
    p = padded(target, mask)
    correction = np.random.default_rng(1).random((len(p.windows), 3, p.m, p.k)).astype(np.float32)
    out = np.full_like(target, np.nan)
    outside = np.full(len(target), 5, dtype=np.int64)  # added to, as the kernel's atomics do
    mask[5, 1, 1] = True  # a region pixel far outside image 5's small window
    direct_cuda.write_back(np, out, target, correction, mask, p.windows, p.slots, outside)
    interior = np.zeros(mask.shape, dtype=bool)
    for b, (image, top, left, height, width, _, _) in enumerate(p.windows.tolist()):
        interior[image, top + 1 : top + height - 1, left + 1 : left + width - 1] = True
        np.testing.assert_array_equal(
            out[image, :, top + 1 : top + height - 1, left + 1 : left + width - 1],
            target[image, :, top + 1 : top + height - 1, left + 1 : left + width - 1]
            + correction[b, :, : height - 2, : width - 2],
        )
    outside_pixels = np.broadcast_to(~interior[:, None], target.shape)
    np.testing.assert_array_equal(out[outside_pixels], target[outside_pixels])  # bit for bit
    missed = (mask & ~interior)[:, 1:-1, 1:-1].sum(axis=(1, 2))
    assert missed[5] == 1 and missed[6] == 0
    np.testing.assert_array_equal(outside, 5 + missed)
    np.testing.assert_array_equal(p.slots[p.solved], np.arange(len(p.windows)))
    assert (np.delete(p.slots, p.solved) == -1).all()


@pytest.mark.parametrize("mixed", [False, True], ids=["source-gradients", "mixed-gradients"])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_fused_path_matches_the_sparse_solve_and_the_array_path(channels: int, mixed: bool) -> None:
    """The GPU's code run with the twins: on NumPy (``padded``) and on the device model (the CUDA
    branch, launches counted): a float64 blend within 1e-10 of a sparse solve of each window's
    problem, and of the per-shape FFT path."""
    target, source, mask = border_case(channels, seed=10 + channels + mixed)
    sides, corners = direct_windows(measured_boxes(mask), H, W)
    shapes, _ = direct_blend(np, target, source, mask, mixed_gradients=mixed, boxes=None, layout="shapes")
    padded, info = direct_blend(np, target, source, mask, mixed_gradients=mixed, boxes=None, layout="padded")
    on_model = [to_model(a) for a in (target, source, mask)]
    with counting() as counts:
        modelled, model_info = direct_blend(
            device_model.MODEL, *on_model, mixed_gradients=mixed, boxes=measured_boxes(mask)
        )
    assert isinstance(modelled, device_model.ModelArray) and counts.syncs == 0
    assert {name: counts.operations[name] for name in direct_cuda.TWINS} == dict.fromkeys(
        direct_cuda.TWINS, 1
    )
    for blended in (padded, np.asarray(modelled)):
        np.testing.assert_allclose(blended, shapes, rtol=0, atol=1e-12)
        for n in range(len(target)):
            if not sides[n, 0]:
                np.testing.assert_array_equal(blended[n], target[n])
                continue
            for c in range(channels):
                reference = window_reference(target[n, c], source[n, c], mask[n], corners[n], sides[n], mixed)
                np.testing.assert_allclose(blended[n, c], reference, rtol=0, atol=1e-10, err_msg=f"{n, c}")
    assert not info.outside_box.any() and not model_info.outside_box.any()


def test_an_image_blends_the_same_alone_or_among_many_on_the_fused_path() -> None:
    target, source, mask = border_case(1, seed=20)
    batch, _ = direct_blend(np, target, source, mask, mixed_gradients=True, boxes=None, layout="padded")
    for n in range(len(target)):
        one = np.s_[n : n + 1]
        alone, _ = direct_blend(
            np, target[one], source[one], mask[one], mixed_gradients=True, boxes=None, layout="padded"
        )
        np.testing.assert_allclose(batch[n], alone[0], rtol=0, atol=1e-12)


def test_windows_that_miss_their_region_are_reported_on_the_fused_path() -> None:
    target, source, mask = border_case(1, seed=21)
    short = measured_boxes(mask)
    short[4, 2] = short[4, 0] + 3  # cut image 4's box: rows of its region fall outside its window
    missed = {}
    for layout in ("shapes", "padded"):
        _, info = direct_blend(np, target, source, mask, mixed_gradients=False, boxes=short, layout=layout)
        with pytest.warns(PoissonConvergenceWarning, match="outside their windows"):
            info.check()
        missed[layout] = info.outside_box
    assert missed["padded"][4] > 0 and not np.delete(missed["padded"], 4).any()
    np.testing.assert_array_equal(missed["padded"], missed["shapes"])


def test_the_device_model_counts_each_fused_kernel_once_and_its_bytes() -> None:
    """A one-channel float32 batch: 11 launches (1 upload, 4 fused kernels, 4 cuBLAS products, the
    counter's memset, the report's read-back), and each kernel's bytes as its twin states them."""
    target, source, mask = border_case(1, seed=30, dtype=np.float32)
    arrays = [to_model(a) for a in (target, source, mask)]
    boxes = measured_boxes(mask)
    counts = device_model.cost(lambda: poisson_blend(*arrays, solver="direct", boxes=boxes))
    assert counts.launches == 11 and counts.syncs == 0, counts.operations
    assert counts.operations["cublas"] == 4 and counts.copies == 2
    p = padded(target, mask)
    windows, slots, m, k = p.windows, p.slots, p.m, p.k
    n, c = target.shape[:2]
    window_pixels = int(windows[:, 3:5].prod(axis=1).sum())
    interior = int((windows[:, 3:5] - 2).prod(axis=1).sum())
    b, lookups = len(windows), windows.nbytes
    assert counts.operation_bytes["direct_rhs"] == window_pixels * (8 * c + 1) + 4 * b * c * m * k + lookups
    assert (
        counts.operation_bytes["direct_divide"]
        == 8 * c * interior + 4 * int((windows[:, 3:5] - 2).sum()) + lookups
    )
    assert counts.operation_bytes["direct_write_back"] == (
        2 * target.nbytes + mask.nbytes + 4 * c * interior + lookups + slots.nbytes + 8 * n
    )


@pytest.mark.realdata
def test_the_default_solver_on_a_magnetic_tile_batch_is_within_the_device_budget(mt_root: Path) -> None:
    """Issue 26's budget for the training default (direct solver, box windows) on a real MT batch
    of 64 at 256² (the bench's: defect images over defect-free ones, masks dilated 5x5): at most
    150 launches and 1 GB moved by the CUDA path, no host wait."""
    from dli.bench.poisson import DILATION_RADIUS, device_model_figures, magnetic_tile_batch
    from dli.kernels.morphology import dilate
    from dli.pipeline.planner import DliConfig

    config = DliConfig()
    target, source, mask = magnetic_tile_batch(mt_root, 64, 256, np.random.default_rng(0))
    mask = dilate(mask, DILATION_RADIUS)
    assert mask.any(axis=(1, 2)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PoissonConvergenceWarning)  # every region inside its window
        figures = device_model_figures(
            target[:, None] / np.float32(255),
            source[:, None] / np.float32(255),
            mask,
            solver=config.poisson_solver,
            window=config.poisson_window,
            tol=config.poisson_tol,
            mixed_gradients=True,
        )
    assert config.poisson_solver == "direct"
    assert figures["launches"] <= 150 and figures["bytes"] <= 1e9, figures
    assert figures["host_syncs"] == 0 and figures["library_calls"] >= 4, figures


# -- on a GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_cuda_kernels_match_their_twins(channels: int, dtype: type) -> None:
    """Each raw kernel on CuPy against its NumPy twin on the same inputs: bit for bit (the same
    operations in the same order), and the whole GPU blend against the twins' within rounding."""
    cupy = pytest.importorskip("cupy")
    target, source, mask = border_case(channels, seed=40 + channels, dtype=dtype)
    p = padded(target, mask)
    windows, slots, m, k, table = p.windows, p.slots, p.m, p.k, p.table
    mask[5, 1, 1] = True  # one region pixel outside its window: counted by the write-back
    gpu_windows, gpu_slots = direct_cuda.split_table(cupy.asarray(p.flat), len(target))
    gpu_target, gpu_source, gpu_mask = (cupy.asarray(a) for a in (target, source, mask))
    b = len(windows)
    for mixed in (False, True):
        rhs, gpu_rhs = np.empty((b, channels, m, k), dtype), cupy.full((b, channels, m, k), np.nan, dtype)
        direct_cuda.build_rhs(np, rhs, target, source, mask, windows, mixed)
        direct_cuda.build_rhs(cupy, gpu_rhs, gpu_target, gpu_source, gpu_mask, gpu_windows, mixed)
        np.testing.assert_array_equal(gpu_rhs.get(), rhs)
    rows, cols = np.empty((b, m, m), dtype), np.empty((b, k, k), dtype)
    gpu_rows, gpu_cols = cupy.full((b, m, m), np.nan, dtype), cupy.full((b, k, k), np.nan, dtype)
    direct_cuda.gather_dst_matrices(np, rows, cols, table.matrices, windows)
    direct_cuda.gather_dst_matrices(cupy, gpu_rows, gpu_cols, cupy.asarray(table.matrices), gpu_windows)
    np.testing.assert_array_equal(gpu_rows.get(), rows)
    np.testing.assert_array_equal(gpu_cols.get(), cols)
    coefficients = np.random.default_rng(2).random((b, channels, m, k)).astype(dtype)
    gpu_coefficients = cupy.asarray(coefficients)
    direct_cuda.divide_by_eigenvalues(np, coefficients, table.eigenvalues, windows)
    direct_cuda.divide_by_eigenvalues(cupy, gpu_coefficients, cupy.asarray(table.eigenvalues), gpu_windows)
    np.testing.assert_array_equal(gpu_coefficients.get(), coefficients)
    out, outside = np.empty_like(target), np.zeros(len(target), np.int64)
    gpu_out, gpu_outside = cupy.full(target.shape, np.nan, dtype), cupy.zeros(len(target), cupy.int64)
    direct_cuda.write_back(np, out, target, coefficients, mask, windows, slots, outside)
    direct_cuda.write_back(
        cupy, gpu_out, gpu_target, gpu_coefficients, gpu_mask, gpu_windows, gpu_slots, gpu_outside
    )
    np.testing.assert_array_equal(gpu_out.get(), out)
    np.testing.assert_array_equal(gpu_outside.get(), outside)
    assert outside[5] == 1
    # The whole blend: cuBLAS's products against NumPy's.
    expected, _ = direct_blend(np, target, source, mask, mixed_gradients=True, boxes=None, layout="padded")
    blended, _ = direct_blend(
        cupy, gpu_target, gpu_source, gpu_mask, mixed_gradients=True, boxes=None, layout="padded"
    )
    tolerance = 1e-12 if dtype == np.float64 else 2e-5
    assert np.abs(blended.get() - expected).max() <= tolerance
