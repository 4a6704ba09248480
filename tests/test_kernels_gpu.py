"""The CuPy kernels agree with their NumPy twins, and torch CUDA tensors pass through without copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from dli.kernels.morphology import dilate
from dli.kernels.paste import paste
from dli.kernels.poisson import blend as poisson
from dli.kernels.poisson.blend import poisson_blend
from dli.kernels.xp import as_array, as_tensor

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cupy():
    return pytest.importorskip("cupy")


def blend_case(n: int = 6, c: int = 1, size: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (n, c, size, size)
    target = (0.45 + 0.2 * ndimage.gaussian_filter(rng.random(shape), (0, 0, 4, 4))).astype(np.float32)
    source = (0.25 + ndimage.gaussian_filter(rng.random(shape), (0, 0, 1, 1))).astype(np.float32)
    noise = ndimage.gaussian_filter(rng.random((n, size, size)), (0, size / 12, size / 12))
    mask = noise > np.quantile(noise, 0.75, axis=(1, 2), keepdims=True)
    mask[0] = False  # one image with nothing to solve
    mask[1, :, :3] = True  # one touching the border
    return target, source, mask


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [64, 256], ids=["dense-transforms", "fft"])
def test_poisson_cupy_matches_numpy(cupy, mixed: bool, channels: int, size: int) -> None:
    target, source, mask = blend_case(c=channels, size=size)
    expected, expected_info = poisson_blend(target, source, mask, mixed_gradients=mixed)
    blended, info = poisson_blend(
        cupy.asarray(target), cupy.asarray(source), cupy.asarray(mask), mixed_gradients=mixed
    )
    assert isinstance(blended, cupy.ndarray) and blended.dtype == cupy.float32
    assert info.all_converged and expected_info.all_converged
    assert relative_difference(blended.get(), expected) <= 1e-4
    outside = ~np.broadcast_to(mask[:, None], target.shape)
    np.testing.assert_array_equal(blended.get()[outside], target[outside])
    # The same systems need about the same iterations (float32 rounding differs in the reductions).
    assert (
        np.abs(info.iterations - expected_info.iterations).max() <= 0.1 * expected_info.iterations.max() + 2
    )


@pytest.mark.parametrize("size", [48, 256], ids=["dense-transforms", "fft"])
def test_poisson_with_given_boxes_reads_nothing_back(cupy, runs_ahead_of_the_gpu, size: int) -> None:
    target, source, mask = blend_case(n=4, size=size, seed=1)
    expected, expected_info = poisson_blend(target, source, mask)
    boxes = np.array([[0, 0, size - 1, size - 1]] * 4)
    gpu = [cupy.asarray(a) for a in (target, source, mask)]
    poisson_blend(*gpu, boxes=boxes)  # warm-up: FFT plans and kernels compiled outside the check
    blended, info = runs_ahead_of_the_gpu(lambda: poisson_blend(*gpu, boxes=boxes))
    # The report is read only now, after the solve was queued without a single host wait.
    assert info.all_converged and expected_info.all_converged
    assert info.steps == info.max_iter * info.buckets  # the fixed budget: no early exit on the GPU
    assert relative_difference(blended.get(), expected) <= 1e-4


@pytest.mark.parametrize("window", ["box", "image"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [64, 256])
def test_direct_poisson_cupy_matches_numpy(cupy, window: str, channels: int, size: int) -> None:
    """The GPU's padded layout (one batched product per side) against the CPU's per-shape FFTs."""
    target, source, mask = blend_case(n=8, c=channels, size=size, seed=3)
    expected, _ = poisson_blend(target, source, mask, mixed_gradients=True, solver="direct", window=window)
    blended, info = poisson_blend(
        *(cupy.asarray(a) for a in (target, source, mask)),
        mixed_gradients=True,
        solver="direct",
        window=window,
    )
    assert isinstance(blended, cupy.ndarray) and blended.dtype == cupy.float32
    assert info.all_converged, info.summary()
    assert np.abs(blended.get() - expected).max() <= 2e-5


def test_direct_poisson_shapes_layout_on_the_gpu_matches_numpy(cupy) -> None:
    """The GPU's layout for windows over DENSE_MAX_SIDE: per-shape buckets, DST-I by real FFTs."""
    from dli.kernels.poisson.direct import direct_blend

    target, source, mask = blend_case(n=6, c=3, size=96, seed=5)
    expected, _ = direct_blend(np, target, source, mask, mixed_gradients=True, boxes=None, layout="shapes")
    gpu = [cupy.asarray(a) for a in (target, source, mask)]
    blended, info = direct_blend(cupy, *gpu, mixed_gradients=True, boxes=None, layout="shapes")
    assert np.abs(blended.get() - expected).max() <= 2e-5, info.summary()


def test_direct_poisson_with_given_boxes_reads_nothing_back(cupy, runs_ahead_of_the_gpu) -> None:
    target, source, mask = blend_case(n=16, size=256, seed=4)
    expected, _ = poisson_blend(target, source, mask, solver="direct")
    boxes = poisson.measured_boxes(mask)
    gpu = [cupy.asarray(a) for a in (target, source, mask)]
    poisson_blend(*gpu, boxes=boxes, solver="direct")  # warm-up: kernels compiled outside the check
    blended, info = runs_ahead_of_the_gpu(lambda: poisson_blend(*gpu, boxes=boxes, solver="direct"))
    assert info.all_converged, info.summary()
    assert np.abs(blended.get() - expected).max() <= 2e-5


def test_poisson_non_convergence_is_reported_on_gpu(cupy) -> None:
    target, source, mask = (cupy.asarray(a) for a in blend_case(n=3, seed=2))
    _, info = poisson_blend(target, source, mask, max_iter=3)  # on the GPU the call never waits
    with pytest.warns(poisson.PoissonConvergenceWarning):
        assert not info.check()
    assert not info.converged[1:].any()
    np.testing.assert_array_equal(info.iterations[1:], 3)


def paste_case(seed: int = 3):
    rng = np.random.default_rng(seed)
    target = rng.random((6, 3, 32, 40), dtype=np.float32)
    source = rng.random((3, 3, 32, 40), dtype=np.float32)
    mask = rng.random((3, 32, 40)) > 0.5
    labels = (rng.random((6, 5, 32, 40)) > 0.9).astype(np.float32)
    return target, source, mask, labels, np.array([4, -1, 2]), np.array([5, 0, 2])


@pytest.mark.parametrize("mask_dtype", [np.bool_, np.uint8, np.float32])
def test_paste_cupy_matches_numpy_exactly(cupy, mask_dtype) -> None:
    target, source, mask, labels, class_ids, slots = paste_case()
    mask = mask.astype(mask_dtype)
    want_images, want_labels = target.copy(), labels.copy()
    paste(want_images, source, mask, labels=want_labels, class_ids=class_ids, slots=slots)
    images, gpu_labels = cupy.asarray(target), cupy.asarray(labels)
    out = paste(
        images, cupy.asarray(source), cupy.asarray(mask), labels=gpu_labels, class_ids=class_ids, slots=slots
    )
    assert out is images
    np.testing.assert_array_equal(images.get(), want_images)
    np.testing.assert_array_equal(gpu_labels.get(), want_labels)
    plain = cupy.asarray(target)
    paste(plain, cupy.asarray(source), cupy.asarray(mask), slots=cupy.asarray(slots))
    np.testing.assert_array_equal(plain.get(), want_images)


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.float32, np.int16])
@pytest.mark.parametrize(
    ("shape", "radius"), [((4, 50, 60), 2), ((2, 3, 9, 5), 1), ((1, 1, 7), 3), ((3, 4, 4), 6)]
)
def test_dilate_cupy_matches_numpy(cupy, dtype, shape, radius) -> None:
    """The one-kernel CUDA dilation (bool, uint8, float32; int16 takes the array path) against the
    NumPy path, on fresh random masks: rows and columns of one pixel, a radius past the image."""
    rng = np.random.default_rng(4)
    values = rng.random(shape)
    mask = (values > 0.95) if dtype is np.bool_ else (values * 200).astype(dtype)
    np.testing.assert_array_equal(dilate(cupy.asarray(mask), radius).get(), dilate(mask, radius))


def test_torch_cuda_tensors_cross_without_copies(cupy) -> None:
    images = torch.rand(2, 3, 16, 16, device="cuda")
    mask = torch.rand(2, 16, 16, device="cuda") > 0.5
    view = as_array(images)
    assert isinstance(view, cupy.ndarray) and view.data.ptr == images.data_ptr()
    mask_view = as_array(mask)
    assert mask_view.dtype == cupy.bool_ and mask_view.data.ptr == mask.data_ptr()
    back = as_tensor(view)
    assert back.data_ptr() == images.data_ptr() and back.device == images.device
    bool_back = as_tensor(mask_view)
    assert bool_back.dtype == torch.bool and bool_back.data_ptr() == mask.data_ptr()


def test_torch_cuda_in_gives_torch_cuda_out(cupy) -> None:
    target, source, mask = blend_case(n=3, seed=5)
    expected, _ = poisson_blend(target, source, mask)
    t_target, t_source, t_mask = (torch.from_numpy(a).cuda() for a in (target, source, mask))
    blended, info = poisson_blend(t_target, t_source, t_mask)
    assert isinstance(blended, torch.Tensor) and blended.device == t_target.device
    assert info.all_converged
    assert relative_difference(blended.cpu().numpy(), expected) <= 1e-4
    dilated = dilate(t_mask, 2)
    assert (
        isinstance(dilated, torch.Tensor) and dilated.device == t_mask.device and dilated.dtype == torch.bool
    )


def test_paste_writes_torch_cuda_tensors_in_place(cupy) -> None:
    target, source, mask, labels, class_ids, slots = paste_case(seed=6)
    want_images, want_labels = target.copy(), labels.copy()
    paste(want_images, source, mask, labels=want_labels, class_ids=class_ids, slots=slots)
    images, gpu_labels = torch.from_numpy(target).cuda(), torch.from_numpy(labels).cuda()
    pointers = images.data_ptr(), gpu_labels.data_ptr()
    out = paste(
        images,
        torch.from_numpy(source).cuda(),
        torch.from_numpy(mask).cuda(),
        labels=gpu_labels,
        class_ids=torch.from_numpy(class_ids).cuda(),
        slots=torch.from_numpy(slots).cuda(),
    )
    assert out is images and (images.data_ptr(), gpu_labels.data_ptr()) == pointers
    np.testing.assert_array_equal(images.cpu().numpy(), want_images)
    np.testing.assert_array_equal(gpu_labels.cpu().numpy(), want_labels)


def _delay_stream(cupy, stream, cycles: int = 200_000_000) -> None:
    """Queue about 0.1 s of GPU spinning on a CuPy stream (torch's sleep kernel, launched there)."""
    with torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr)):
        torch.cuda._sleep(cycles)


def _paste_on(images: torch.Tensor) -> torch.Tensor:
    source = torch.ones_like(images)
    mask = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
    return paste(images, source, mask)


def _dilate_on(images: torch.Tensor) -> torch.Tensor:
    return dilate(images[:, 0] > 0.5, 1).float()[:, None]


def _blend_on(images: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
    mask[:, 8:-8, 8:-8] = True
    return poisson_blend(images, torch.ones_like(images), mask)[0]


@pytest.mark.parametrize("entry_point", [_paste_on, _dilate_on, _blend_on], ids=["paste", "dilate", "blend"])
def test_results_are_ready_on_torchs_side_stream(cupy, entry_point) -> None:
    """A caller under `torch.cuda.stream(s)` reads a kernel's result on s right after the call.

    CuPy's current stream is a different one, held busy: a kernel that launched there (and left
    torch's stream unordered after it) would be read before it ran.
    """
    images = torch.rand(4, 1, 256, 256, device="cuda")
    expected = entry_point(images.clone())
    torch.cuda.synchronize()
    side, busy = torch.cuda.Stream(), cupy.cuda.Stream(non_blocking=True)
    with busy:
        for _ in range(5):
            side_images = images.clone()
            torch.cuda.synchronize()
            with torch.cuda.stream(side):
                _delay_stream(cupy, busy)
                result = entry_point(side_images)
                seen = result.clone()  # queued on the side stream, right after the call
            torch.cuda.synchronize()
            torch.testing.assert_close(seen, expected, rtol=0, atol=1e-3)  # CG sums in any order
