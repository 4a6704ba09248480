"""The device-cost model: exact counts of known programs, plausible counts of the CUDA path, same results."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dli.kernels import device_model
from dli.kernels.device_model import MODEL, DeviceCounts, counting, to_model
from dli.kernels.morphology import dilate
from dli.kernels.paste import paste
from dli.kernels.poisson import blend as poisson
from dli.kernels.poisson import pcg
from dli.kernels.poisson.blend import measured_boxes, poisson_blend
from dli.pipeline.inject import InjectionIndex, inject
from dli.pipeline.planner import DliConfig
from tests.test_inject import make_case


def test_a_small_program_is_counted_exactly() -> None:
    a = to_model(np.arange(12, dtype=np.float32).reshape(3, 4))  # 48 bytes
    b = to_model(np.ones((3, 4), dtype=np.float32))
    first, second = to_model(np.array([0, 2])), to_model(np.array([1, 3]))  # int64, 16 bytes each
    x = to_model(np.random.default_rng(0).random((2, 4, 6), dtype=np.float32))  # 48 elements
    with counting() as counts:
        d = a + b  # kernel: 48 + 48 read, 48 written
        d *= 2  # kernel: 48 read, 48 written
        s = d.sum(axis=1)  # reduction: 48 read, 12 written
        view = d[1:, ::2]  # a view: nothing
        m = a @ b.T  # cuBLAS: 48 + 48 read, 36 written
        g = a[first]  # take: 32 read + 32 written + the 16-byte index
        pair = a[first, second]  # fill 16, two index kernels (16 + 2 x 16), take 2 x 8 + 16
        h = MODEL.scipy_fft.dstn(x, type=2, axes=(-2, -1), norm="ortho")  # DST_TABLE: 17, 2 cuFFT
        host = d.get()  # device -> host, 48 bytes, a host wait
        positive = bool(s[0] > 0)  # kernel 4 + 1 bytes, then a 1-byte read that waits
    assert counts.launches == 29 and counts.library == 3 and counts.copies == 2 and counts.kernels == 24
    dst_bytes = 3632 + 2872  # the two axes' rows of DST_TABLE (E = 48: n = 4 not last, n = 6 last)
    assert counts.bytes == 144 + 96 + 60 + 132 + 80 + 144 + dst_bytes + 48 + 5 + 1
    assert counts.syncs == 2 and counts.operations["cufft"] == 2 and counts.operations["cublas"] == 1
    assert counts.fft_plans == {(4, "C2C", 12), (6, "C2C", 8)}
    # ... and the numbers are NumPy's.
    plain_a, plain_b = np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(host, 2 * (plain_a + plain_b))
    np.testing.assert_array_equal(np.asarray(view), host[1:, ::2])
    np.testing.assert_array_equal(np.asarray(m), plain_a @ plain_b.T)
    np.testing.assert_array_equal(np.asarray(g), plain_a[[0, 2]])
    np.testing.assert_array_equal(np.asarray(pair), plain_a[[0, 2], [1, 3]])
    np.testing.assert_allclose(
        np.asarray(h), __import__("scipy.fft").fft.dstn(np.asarray(x), 2, axes=(-2, -1), norm="ortho")
    )
    assert positive and isinstance(s, device_model.ModelArray)


def test_uncounted_work_and_the_cupy_rules_it_keeps() -> None:
    a = to_model(np.ones((4, 4), dtype=np.float32))
    a + a  # outside a counting block: computed, not counted
    with counting() as counts:
        with pytest.raises(TypeError, match="host NumPy array"):
            a + np.ones((4, 4), dtype=np.float32)  # CuPy refuses host arrays in device expressions
        with pytest.raises(NotImplementedError):
            MODEL.scipy_fft.dstn(a, type=1)  # CuPy 14.2 has DST types 2 and 3 only
        a[1:3] += 1  # the in-place add only: CuPy skips writing a view back onto itself
        a[0] = 0  # a fill
        MODEL.zeros((2, 2))  # a memset
        MODEL.empty((2, 2))  # an allocation: nothing
        MODEL.asarray(np.zeros(3))  # host -> device
    assert counts.operations == {"add": 1, "fill": 1, "memset": 1, "host->device": 1}


def blobs(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.stack(
        [
            (yy - rng.uniform(12, size - 12)) ** 2 / rng.uniform(9, 49)
            + (xx - rng.uniform(12, size - 12)) ** 2 / rng.uniform(9, 64)
            <= 1
            for _ in range(n)
        ]
    )
    target, source = rng.random((2, n, 1, size, size))
    return target, source, dilate(masks, 2)


def test_the_counted_cuda_branches_give_the_numpy_results() -> None:
    target, source, mask = blobs(5, 48, seed=1)
    boxes = measured_boxes(mask)
    on_model = [to_model(a) for a in (target, source, mask)]
    # CG (float64, tight tolerance: the GPU's fixed budget and the CPU's early stop meet), direct.
    for options in (
        {"solver": "cg", "tol": 1e-11},
        {"solver": "direct"},
        {"solver": "direct", "window": "image"},
    ):
        expected, _ = poisson_blend(target, source, mask, mixed_gradients=True, boxes=boxes, **options)
        with counting() as counts:
            blended, _ = poisson_blend(*on_model, mixed_gradients=True, boxes=boxes, **options)
        assert isinstance(blended, device_model.ModelArray) and counts.launches > 0 and counts.syncs == 0
        np.testing.assert_allclose(np.asarray(blended), expected, rtol=0, atol=1e-9)
    # Dilation and the paste kernel (its NumPy twin) are bit for bit.
    with counting() as counts:
        grown = dilate(on_model[2], 2)
    np.testing.assert_array_equal(np.asarray(grown), dilate(mask, 2))
    assert counts.launches == 1 and counts.operations["dilate_square"] == 1  # one kernel
    images, labels = np.zeros((5, 1, 48, 48), np.float32), np.zeros((5, 2, 48, 48), np.float32)
    ids, slots = np.array([1, 0]), np.array([3, 1])
    paste(images, source[:2].astype(np.float32), mask[:2], labels=labels, class_ids=ids, slots=slots)
    on_images, on_labels = to_model(np.zeros_like(images)), to_model(np.zeros_like(labels))
    with counting() as counts:
        paste(
            on_images,
            to_model(source[:2].astype(np.float32)),
            to_model(mask[:2]),
            labels=on_labels,
            class_ids=to_model(ids),
            slots=to_model(slots),
        )
    np.testing.assert_array_equal(np.asarray(on_images), images)
    np.testing.assert_array_equal(np.asarray(on_labels), labels)
    assert counts.operations["paste_kernel"] == 1 and counts.syncs == 0


def test_inject_on_the_model_is_inject_on_the_cpu() -> None:
    images, labels, sources, source_masks, plan = make_case()
    config = DliConfig(dilate_radius=2)  # the default solver
    expected_images, expected_labels = images.clone(), labels.clone()
    inject(expected_images, expected_labels, sources, source_masks, plan, config)
    boxes = measured_boxes(dilate(source_masks.numpy() != 0, 2))  # on the host, as training has them
    with device_model.modelled(), counting() as counts:
        inject(images, labels, sources, source_masks, plan, config, boxes=boxes)
    torch.testing.assert_close(images, expected_images, rtol=0, atol=1e-5)
    torch.testing.assert_close(labels, expected_labels, rtol=0, atol=0)
    assert counts.operations["host->device"] >= 2  # the plan's index tensors, the windows' indices
    # A fixed number of launches per batch (28 here: one dilation kernel, one index upload, the
    # direct solve's 11, the paste kernel, the gathers and scatters), none per image or region.
    assert counts.launches <= 30, counts.operations
    with device_model.modelled(), counting() as index_counts:
        index = InjectionIndex.from_plan(plan, images.device)
    assert index_counts.launches == index_counts.operations["host->device"] == 1  # six columns, one copy
    assert index.poisson_count + index.paste_count == len(plan.injections) and index.poisson_count > 0
    assert index.paste_slots.tolist() == [i.slot for i in plan.injections if i.method != "poisson"]
    assert counts.operations["paste_kernel"] == 1 and counts.operations["device->host"] == 1  # the report
    assert counts.syncs == 0
    with device_model.modelled(), counting() as counts:  # no boxes: measured on the device, read back
        inject(images, labels, sources, source_masks, plan, config)
    assert counts.syncs == 1


def per_step(options: dict, arrays: list, boxes: np.ndarray) -> DeviceCounts:
    """What one more CG step costs: the counts of 4 steps less those of 3."""
    three, four = (
        device_model.cost(lambda k=k: poisson_blend(*arrays, boxes=boxes, max_iter=k, **options))
        for k in (3, 4)
    )
    step = DeviceCounts(launches=four.launches - three.launches, bytes=four.bytes - three.bytes)
    step.operations = four.operations - three.operations
    return step


def square_regions(size: int, sides: list[int], seed: int) -> list:
    """Model arrays of len(sides) images whose regions are squares of those sides (mixed gradients)."""
    target, source, _ = blobs(len(sides), size, seed)
    mask = np.zeros((len(sides), size, size), dtype=bool)
    for k, side in enumerate(sides):
        mask[k, 5 : 5 + side, 7 : 7 + side] = True
    return [to_model(a.astype(np.float32)) for a in (target, source, mask)]


@pytest.mark.parametrize("transforms", ["dense", "fft"])
def test_cg_launches_grow_with_steps_and_buckets(monkeypatch: pytest.MonkeyPatch, transforms: str) -> None:
    """One PCG step of one bucket costs what CuPy's expressions and transforms make it: 4 cuFFT
    executions and ~70 launches with cupyx's DSTs, 7 cuBLAS calls and under 40 launches with dense
    products; two buckets cost twice that; the budget is run in full whatever the images."""
    monkeypatch.setitem(pcg.DENSE_TRANSFORM_MAX_SIDE, "cuda", 40)  # small windows, both ways
    monkeypatch.setattr(pcg, "_SPECTRA", {})  # none cached under another limit
    sides = [28, 18] if transforms == "dense" else [50, 60]
    arrays = square_regions(max(sides) + 12, sides, seed=2)
    boxes = measured_boxes(np.asarray(arrays[2]))
    options = {"mixed_gradients": True, "solver": "cg"}
    monkeypatch.setitem(poisson.BUCKET_OVERHEAD_PIXELS, "cuda", 1 << 40)  # one bucket
    one = per_step(options, arrays, boxes)
    if transforms == "fft":
        assert 60 <= one.launches <= 80 and one.operations["cufft"] == 4, one.operations
    else:
        assert 30 <= one.launches <= 40 and one.operations["cublas"] == 7, one.operations
        assert "mat_ptrs" not in one.operations  # no product with a broadcast matrix
    window = poisson_blend(*arrays, boxes=boxes, **options)[1].window
    assert one.bytes > 20 * 2 * window[0] * window[1] * 4  # dozens of passes over 2 float32 windows
    monkeypatch.setitem(poisson.BUCKET_OVERHEAD_PIXELS, "cuda", 0)  # one bucket per window shape
    assert poisson_blend(*arrays, boxes=boxes, **options)[1].buckets == 2
    assert per_step(options, arrays, boxes).launches == 2 * one.launches
    with counting() as counts:
        poisson_blend(*arrays, boxes=boxes, tol=0.5, **options)  # converged at once: the GPU runs on
    library = counts.operations["cufft"] + counts.operations["cublas"]
    assert library >= (4 if transforms == "fft" else 7) * 2 * poisson.gpu_max_iter(0.5)


def test_the_benches_report_the_device_model(tmp_path) -> None:
    """`bench.poisson` (both solvers) and `bench.solvers` write `device_model.launches` and `.bytes`."""
    from dli.bench import poisson as poisson_bench
    from dli.bench import solvers

    for solver in ("cg", "direct"):
        out = tmp_path / f"{solver}.json"
        common = ["--n", "4", "--size", "32", "--data", "synthetic", "--repeats", "1", "--no-opencv"]
        assert poisson_bench.main([*common, "--solver", solver, "--tol", "1e-4", "--json", str(out)]) == 0
        model = json.loads(out.read_text())["device_model"]
        assert model["launches"] > 0 and model["bytes"] > 0 and model["host_syncs"] == 0
        assert model["launches"] == model["kernels"] + model["library_calls"] + model["copies"]
    out = tmp_path / "solvers.json"
    common = ["--n", "4", "--size", "32", "--data", "synthetic", "--repeats", "1", "--no-training"]
    assert solvers.main([*common, "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    for name in solvers.SOLVERS:
        assert figures[name]["device_model"]["launches"] > 0
        assert figures[name]["host_us_per_modelled_launch"] > 0


def test_the_gpu_check_puts_the_measured_inject_time_beside_the_model(tmp_path) -> None:
    from dli.bench.gpu_report import bench_figures, markdown

    host = {"plan": 0.9, "feed": 3.5, "wait": 20.0, "assemble": 6.1}
    record = {
        "kernels": {"seconds_per_batch": {"inject": {"median": 0.003}}},
        "device_model": {"launches": 100.0, "bytes": 2e9},
        "data_path": {"dali_dli": {"host_ms_per_batch": host}},
    }
    path = tmp_path / "bench-cuda.json"
    path.write_text(json.dumps(record))
    figures = bench_figures(path)
    assert figures["inject_device_model"] == {"launches": 100.0, "bytes": 2e9}
    assert figures["inject_us_per_modelled_launch"] == pytest.approx(30.0)
    assert figures["data_host_ms_per_batch"] == {"dali": None, "dali_dli": host}
    report = {
        "date": "2026-12-05T00:00:00+00:00",
        "seconds": 60.0,
        "budget_s": 480.0,
        "data": "bundled synthetic data",
        "command": "gpu_check",
        "environment": {},
        "warnings": [],
        "skipped": {},
        "steps": [{"name": "bench", "status": "passed", "seconds": 60.0, "limit_s": 9.0, "figures": figures}],
    }
    text = markdown(report)
    assert "- host ms per batch, dali_dli: plan 0.90, feed 3.50, wait 20.00, assemble 6.10" in text
    assert "host ms per batch, dali:" not in text  # a loader without figures gets no line
