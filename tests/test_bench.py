"""`dli bench` and its OpenCV baseline on the CPU.

The baseline must run the pipeline's plans with the pipeline's conventions (matrices, labels),
or the comparison would measure different work; a quick run must write a complete record.
Speed itself is never asserted: only the shape, types and signs of the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from dli.bench.baseline import (
    PlannedBatches,
    build_baseline_loader,
    decode_plan,
    flip,
    inject_opencv,
    sample_files,
    warp,
)
from dli.bench.timing import call_times, stream_rates, summary
from dli.cli import run_command
from dli.data.manifest import Manifest
from dli.data.synth import generate
from dli.pipeline.augment import (
    apply_affine_numpy,
    compose,
    flip_matrix,
    random_flips,
    shift_scale_rotate_matrix,
)
from dli.pipeline.loader import HOST_STAGES, MT_MEAN, MT_STD, build_loader
from dli.pipeline.planner import DliConfig, Plan

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """48 small MT-like images: 34 defect-free, 14 defects of all five classes."""
    return generate(
        tmp_path_factory.mktemp("bench") / "synth", images=48, seed=5, size_range=((60, 90), (60, 120))
    )


@pytest.fixture(scope="module")
def plans(dataset: Manifest) -> list[Plan]:
    loader = build_loader(dataset, batch_size=8, image_size=SIZE, train=True, dli=DliConfig(), seed=1)
    return loader.plans(0) + loader.plans(1)


def test_opencv_augmentation_follows_the_pipeline_matrix_convention() -> None:
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.random((48, 64)) * 255, 2).astype(np.uint8)
    mask = ndimage.gaussian_filter(rng.random((48, 64)), 3) > 0.5
    matrix = compose(
        shift_scale_rotate_matrix((48, 64), angle=7.0, scale=1.08, shift=(0.05, -0.03)),
        flip_matrix((48, 64), horizontal=True, vertical=False),
    )
    difference = np.abs(
        warp(image, matrix, mask=False).astype(int) - apply_affine_numpy(image, matrix, nearest=False)
    )
    assert difference.max() <= 1
    warped_mask = warp(mask, matrix, mask=True)
    assert warped_mask.dtype == np.bool_
    assert (warped_mask != apply_affine_numpy(mask, matrix, nearest=True)).mean() < 0.005
    for matrix in random_flips(rng, 8, (48, 64)):
        np.testing.assert_array_equal(flip(image, matrix), apply_affine_numpy(image, matrix, nearest=True))
        np.testing.assert_array_equal(flip(mask, matrix), apply_affine_numpy(mask, matrix, nearest=True))


def test_opencv_injection_changes_only_the_planned_regions(dataset: Manifest, plans: list[Plan]) -> None:
    config = DliConfig()
    samples = sample_files(dataset)
    seen, blended = set(), 0
    for plan in plans:
        decoded = decode_plan(plan, samples, (SIZE, SIZE))
        before = decoded.images.copy()
        failures = inject_opencv(decoded, plan, config)
        assert 0 <= failures <= sum(i.method == "poisson" for i in plan.injections)
        injected = {i.slot for i in plan.injections}
        for slot in set(range(len(plan))) - injected:
            np.testing.assert_array_equal(decoded.images[slot], before[slot])
        for item, injection in enumerate(plan.injections):
            seen.add(injection.method)
            mask = decoded.source_masks[item]
            region = mask
            if injection.method == "poisson":
                # OpenCV solves on the bounding box of the dilated mask (target gradients outside
                # the mask), which moves pixels there by a level or two: the box may change.
                dilated = ndimage.binary_dilation(mask, np.ones((5, 5), bool))
                region = np.zeros_like(mask)
                for box in ndimage.find_objects(dilated.astype(np.int32)):
                    region[box] = True
            outside = ~region
            np.testing.assert_array_equal(
                decoded.images[injection.slot][outside], before[injection.slot][outside]
            )
            np.testing.assert_array_equal(decoded.masks[injection.slot], mask)  # label: the undilated mask
            if injection.method == "paste":
                np.testing.assert_array_equal(
                    decoded.images[injection.slot][mask], decoded.sources[item][mask]
                )
            else:  # OpenCV erodes the mask before cloning: a thin defect may leave no trace
                blended += int((decoded.images[injection.slot][mask] != before[injection.slot][mask]).any())
    assert seen == {"poisson", "paste"} and blended > 0


@pytest.mark.slow  # starts a worker process
def test_baseline_batches_are_the_same_in_worker_processes(dataset: Manifest, plans: list[Plan]) -> None:
    chosen = plans[:2]
    batches = PlannedBatches(
        sample_files(dataset), chosen, size=(SIZE, SIZE), config=DliConfig(), mean=MT_MEAN, std=MT_STD
    )
    here = list(build_baseline_loader(batches, workers=0, pin_memory=False))
    spawned = list(build_baseline_loader(batches, workers=1, pin_memory=False))
    assert len(here) == len(spawned) == 2
    for plan, (images, masks, class_ids), other in zip(chosen, here, spawned, strict=True):
        for a, b in zip((images, masks, class_ids), other, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert images.shape == (8, 3, SIZE, SIZE) and masks.shape == (8, 5, SIZE, SIZE)
        assert torch.equal(images[:, 0], images[:, 2])
        pixels = images * MT_STD + MT_MEAN
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        assert class_ids.tolist() == list(plan.class_ids_after)
        labelled = masks.flatten(2).any(dim=2)  # (N, C): which label channels are set
        for slot, class_id in enumerate(plan.class_ids_after):
            assert not labelled[slot, [c for c in range(5) if c != class_id]].any()
        slots = [i.slot for i in plan.injections]
        assert labelled[slots, [i.class_id for i in plan.injections]].all()


def test_timing_helpers_count_every_call() -> None:
    calls, setups = [], []
    rates = stream_rates(
        iter(range(100)), calls.append, batch_size=4, warmup=2, per_window=3, windows=5, sync=lambda: None
    )
    assert calls == list(range(17)) and len(rates) == 5 and all(r > 0 for r in rates)

    def setup() -> tuple[int]:
        setups.append(len(setups))
        return (len(setups),)

    times = call_times(calls.append, repeats=3, sync=lambda: None, setup=setup)
    assert len(times) == 3 and calls[17:] == [1, 2, 3, 4] and all(t >= 0 for t in times)
    assert summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "samples": [3.0, 1.0, 2.0]}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "cpu", "--batch-size", "0"], "--batch-size 0"),
        (["--device", "cpu", "--encoders", "vgg"], "--encoders vgg"),
        (["--device", "cpu", "--image-size", "60"], "--image-size 60"),
        (["--device", "cpu", "--poisson-prob", "1.5"], "--poisson-prob 1.5"),
        (["--device", "cpu", "--data", "/nonexistent/dataset"], "/nonexistent/dataset"),
    ],
)
def test_bad_flags_are_one_line_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_command("bench", flags) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dli bench: error:") and message in error and "\n" not in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command("bench", ["--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def _positive_figures(tree: object, path: str = "") -> list[str]:
    """Paths of non-positive numbers under `images_per_s` and `seconds_per_batch` (empty: all good)."""
    bad = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            bad += _positive_figures(value, f"{path}/{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            bad += _positive_figures(value, f"{path}/{i}")
    elif (
        ("images_per_s" in path or "seconds_per_batch" in path)
        and tree is not None
        and not (isinstance(tree, (int, float)) and tree > 0)
    ):
        bad.append(f"{path}={tree!r}")
    return bad


def quick_run(dataset: Manifest, out: Path, device: str, *, script: bool) -> dict:
    """Run `--quick` in a fresh interpreter (as a script or with -m); the JSON record it wrote."""
    entry = [str(REPO / "bench" / "throughput.py")] if script else ["-m", "dli.bench.throughput"]
    command = [sys.executable, *entry, "--quick", "--device", device]
    command += ["--data", str(dataset.root), "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DALI + DLI" in done.stdout and str(out) in done.stdout
    return json.loads(out.read_text(encoding="utf-8"))


def check_record(record: dict, dataset: Manifest, device: str) -> dict:
    """Assert the layout of a quick run's record; returns its l-resnet18 training figures."""
    assert record["schema"] == 1 and "--quick" in record["command"]
    assert record["device"]["type"] == device and isinstance(record["device"]["name"], str)
    assert {"torch", "nvidia-dali", "cupy", "segmentation-models-pytorch", "numpy", "opencv"} <= set(
        record["versions"]
    )
    assert set(record["git"]) == {"commit", "dirty"}
    settings = record["settings"]
    assert (settings["batch_size"], settings["image_size"], settings["workers"]) == (8, 64, 0)
    assert settings["images"] == len(dataset) and settings["encoders"] == ["l-resnet18"]

    data = record["data_path"]
    for name in ("dali", "dali_dli", "baseline", "baseline_dli"):
        rates = data[name]["images_per_s"]
        assert set(rates) == {"median", "min", "max", "samples"}
        assert (
            len(rates["samples"]) == settings["repeats"] and rates["min"] <= rates["median"] <= rates["max"]
        )
    for ratio in ("dli_over_baseline", "plain_over_baseline", "dli_over_plain"):
        assert data[ratio] > 0
    for name in ("dali", "dali_dli"):  # where the iterating thread spent each batch
        stages = data[name]["host_ms_per_batch"]
        assert list(stages) == list(HOST_STAGES) and all(ms >= 0 for ms in stages.values())
        assert stages["assemble"] > 0 and stages["feed"] > 0

    kernels = record["kernels"]
    assert set(kernels["seconds_per_batch"]) == {
        "planner",
        "inject",
        "paste",
        "poisson",
        "poisson_zero_start",
        "poisson_setup",
        "opencv_inject",
    }
    assert kernels["batches"] >= 1 and sum(kernels["injections_per_batch"].values()) > 0
    speed = kernels["inject_speed_over_opencv"]
    seconds = kernels["seconds_per_batch"]
    assert speed == pytest.approx(seconds["opencv_inject"]["median"] / seconds["inject"]["median"])
    if kernels["poisson_iterations"] is not None:
        assert kernels["poisson_iterations"]["boundary_matched_start"]["max"] >= 1
        cg = kernels["cg_step"]
        assert cg["steps"] > 0 and cg["traffic_bytes"] > 0 and cg["floor_seconds"] > 0
        assert cg["bandwidth_bytes_per_s"] > 0 and cg["measured_seconds"] >= 0

    model = record["device_model"]  # the CUDA path of `inject`, counted on the CPU
    assert model["batches"] >= 1 and model["launches"] > model["kernels"] > 0 and model["bytes"] > 0
    parts = model["kernels"] + model["library_calls"] + model["copies"]
    assert model["launches"] == pytest.approx(parts)
    # At most the one read-back of regions measured on the device (a source's box unknown to the
    # host); the kernels themselves never wait for the GPU.
    assert model["host_syncs"] <= 1

    training = record["training"]["l-resnet18"]
    assert training["parameters"] > 0
    for name in ("premade", "dali_dli", "baseline_dli"):
        assert training[name]["images_per_s"]["median"] > 0
    assert training["dli_over_premade"] > 0 and training["dli_over_baseline"] > 0
    assert training["injection_share_of_step"] > 0
    assert record["seconds"]["total"] > 0
    assert _positive_figures(record) == []
    return training


@pytest.mark.slow
def test_quick_cpu_run_writes_a_complete_record(dataset: Manifest, tmp_path: Path) -> None:
    record = quick_run(dataset, tmp_path / "bench.json", "cpu", script=True)
    training = check_record(record, dataset, "cpu")
    assert training["precision"] == "float32"
    for name in ("premade", "dali_dli", "baseline_dli"):
        assert training[name]["memory"]["peak_torch_bytes"] is None  # GPU memory only


@pytest.mark.gpu
@pytest.mark.slow
def test_quick_cuda_run_reports_gpu_memory(dataset: Manifest, tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali", reason="the data path needs NVIDIA DALI")
    record = quick_run(dataset, tmp_path / "bench.json", "cuda", script=False)
    training = check_record(record, dataset, "cuda")
    assert training["precision"] in ("bfloat16", "float16")
    assert record["versions"]["cuda"]
    for name in ("premade", "dali_dli", "baseline_dli"):
        memory = training[name]["memory"]
        assert memory["peak_torch_bytes"] > 0 and memory["device_used_bytes"] >= memory["peak_torch_bytes"]


def test_the_bench_trains_in_the_precision_dli_train_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed precision is on, as `dli train` resolves it (an unresolved config would say fp32)."""
    from dli.bench import training_steps

    asked: list[object] = []
    monkeypatch.setattr(training_steps, "amp_dtype_for", lambda device, enabled=True: asked.append(enabled))
    training_steps.TrainStep("l-resnet18", 5, torch.device("cpu"))
    assert asked == [True]
