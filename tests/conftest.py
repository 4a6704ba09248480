"""Shared fixtures and markers: GPU and real-data tests skip with a reason when absent."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from dli.bench import MT_FOLDER, magnetic_tile_root
from dli.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
# The benchmarks' lookup: $DLI_MT_ROOT, else shared/ beside the repository (named here for skip messages).
MT_ROOT = magnetic_tile_root() or Path(os.environ.get("DLI_MT_ROOT") or REPO.parent / MT_FOLDER)


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU on this machine")
    skip_mt = pytest.mark.skip(reason=f"Magnetic Tile data not found at {MT_ROOT} (set DLI_MT_ROOT)")
    has_gpu = cuda_available()
    has_mt = (MT_ROOT / "MT_Free").is_dir()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "realdata" in item.keywords and not has_mt:
            item.add_marker(skip_mt)


@pytest.fixture(scope="session")
def mt_root() -> Path:
    """Root of the real Magnetic Tile data (tests using it are marked `realdata`)."""
    return MT_ROOT


@pytest.fixture
def small() -> Callable[..., TrainConfig]:
    """`small(data, out, **overrides)`: the seconds-long CPU run the training tests start from."""

    def make(data: Path, out: Path, **overrides: object) -> TrainConfig:
        settings = {
            "data": str(data),
            "out": str(out),
            "epochs": 2,
            "batch_size": 8,
            "image_size": 64,
            "pretrained": False,
            "progress": False,
            "num_threads": 1,
        }
        return TrainConfig(**(settings | overrides))  # type: ignore[arg-type]

    return make


GPU_SLEEP_CYCLES = 4_000_000_000
"""About 2 s of GPU clock queued ahead of a call checked for host waits: far longer than the call."""


@pytest.fixture
def runs_ahead_of_the_gpu() -> Callable[[Callable[[], object]], object]:
    """`check(call)`: `call()` behind a long GPU sleep on torch's current stream, failing if the
    call made the host wait for the device, i.e. if the stream had run dry by the time it returned.

    CuPy work in the call runs on that stream too. Unlike `cupyx.allow_synchronize` (deprecated
    since CuPy 10; no compiled module of CuPy 14 calls its detection any more), this sees every
    kind of wait: CuPy or torch, copies, events, implicit syncs.
    """
    import torch

    from dli.kernels.xp import external_stream

    def check(call: Callable[[], object]) -> object:
        stream = torch.cuda.current_stream()
        torch.cuda._sleep(GPU_SLEEP_CYCLES)
        with external_stream(stream.cuda_stream, stream.device.index or 0):
            result = call()
        busy = not stream.query()
        torch.cuda.synchronize()
        assert busy, "the call made the host wait for the GPU's queued work"
        return result

    return check
