"""Device placement checked on the CPU: the data path follows the resolved GPU, kernels take torch's
stream, CuPy's stream API by version, CuPy import failures in `dli bench` (GPU paths faked)."""

from __future__ import annotations

import builtins
import inspect
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dli.common.errors import DliError
from dli.data.synth import generate
from dli.kernels import morphology, paste, xp
from dli.kernels.poisson import blend as poisson
from dli.kernels.poisson import windows
from dli.training.config import TrainConfig


class LoaderBuilt(Exception):
    """Raised by the fake `build_loader` once it has recorded its arguments."""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("placement") / "synth"
    generate(root, images=30, seed=2)
    return root


@pytest.fixture
def second_gpu(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """`--device cuda:1` resolved as on a 2-GPU machine; build_loader records its arguments and stops."""
    import dli.pipeline.loader
    import dli.training.devices
    import dli.training.trainer

    calls: list[dict[str, Any]] = []

    def build_loader(manifest: Any, **kwargs: Any) -> None:
        calls.append(kwargs)
        raise LoaderBuilt

    for module in (dli.training.devices, dli.training.trainer):  # commands import from the first
        monkeypatch.setattr(module, "resolve_device", lambda name, rank=0: torch.device("cuda", 1))
        monkeypatch.setattr(module, "amp_dtype_for", lambda device, enabled=True: None)
    monkeypatch.setattr(dli.pipeline.loader, "build_loader", build_loader)
    return calls


def test_training_loads_its_batches_on_the_resolved_gpu(data: Path, tmp_path: Path, second_gpu) -> None:
    from dli.training.trainer import Trainer

    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), device="cuda:1", image_size=64)
    with pytest.raises(LoaderBuilt):
        Trainer(config)
    assert second_gpu[0]["device"] == torch.device("cuda", 1)


def test_evaluation_loads_its_batches_on_the_resolved_gpu(
    data: Path, second_gpu, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dli.evaluate
    from dli.data.manifest import MT_CLASSES
    from dli.models.checkpoint import ModelInfo

    trained = TrainConfig(data=str(data), image_size=64)
    info = ModelInfo(encoder="l-resnet18", class_names=MT_CLASSES, image_size=64, mean=(0.4,), std=(0.1,))
    monkeypatch.setattr(dli.evaluate, "load_checkpoint", lambda path: {"config": trained.to_dict()})
    model = torch.nn.Identity()  # evaluation lays the model out channels-last before its loader
    monkeypatch.setattr(dli.evaluate, "model_from_checkpoint", lambda document, device: (model, info))
    with pytest.raises(LoaderBuilt):
        dli.evaluate.evaluate_checkpoint("best.pt", device="cuda:1")
    assert second_gpu[0]["device"] == torch.device("cuda", 1)


# -- streams ----------------------------------------------------------------------------------------


def test_external_stream_uses_from_external_without_a_deprecation_warning() -> None:
    cupy = pytest.importorskip("cupy")
    if not hasattr(cupy.cuda.Stream, "from_external"):
        pytest.skip(f"CuPy {cupy.__version__} has no Stream.from_external")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CuPy 14 warns on every ExternalStream
        stream = xp.external_stream(0x1234, 0)
    assert isinstance(stream, cupy.cuda.Stream) and stream.ptr == 0x1234
    assert xp.external_stream(0, 0) is cupy.cuda.Stream.null  # torch's default stream


class FakeCupy(types.ModuleType):
    """What `torch_stream` touches of CuPy: Device and the stream types, recording their use."""

    def __init__(self, *, from_external: bool) -> None:
        super().__init__("cupy")
        self.events: list[tuple[str, Any]] = []
        events = self.events

        class Entered:
            def __init__(self, kind: str, value: Any) -> None:
                self.kind, self.value = kind, value

            def __enter__(self) -> None:
                events.append((f"enter {self.kind}", self.value))

            def __exit__(self, *exc: object) -> None:
                events.append((f"exit {self.kind}", self.value))

        class Stream:
            pass

        if from_external:
            Stream.from_external = staticmethod(  # type: ignore[attr-defined]
                lambda obj: Entered("stream", obj.__cuda_stream__()[1])
            )
        self.cuda = types.SimpleNamespace(
            Stream=Stream,
            Device=lambda index: Entered("device", index),
            ExternalStream=lambda pointer, device: Entered("stream", (pointer, device)),
        )


@pytest.mark.parametrize("modern", [True, False], ids=["cupy14", "cupy13"])
def test_torch_stream_launches_on_torchs_current_stream_of_the_device(
    modern: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeCupy(from_external=modern)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    asked: list[int] = []

    def current_stream(index: int) -> Any:
        asked.append(index)
        return types.SimpleNamespace(cuda_stream=0xBEEF)

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    with xp.torch_stream(torch.device("cuda", 1)):
        inside = list(fake.events)
    stream = 0xBEEF if modern else (0xBEEF, 1)
    assert asked == [1]
    assert inside == [("enter device", 1), ("enter stream", stream)]
    assert fake.events[2:] == [("exit stream", stream), ("exit device", 1)]
    with xp.torch_stream(torch.device("cpu")):
        pass
    assert len(fake.events) == 4  # nothing on the CPU


def test_kernel_entry_points_run_under_torch_stream_for_cuda_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    entered: list[torch.device] = []

    class Recorded:
        def __init__(self, device: torch.device) -> None:
            entered.append(device)

        def __enter__(self) -> None:
            pass

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(xp, "torch_stream", Recorded)
    seen: list[Any] = []

    @xp.on_torch_stream
    def kernel(target: Any, *, mask: Any = None) -> str:
        seen.append(target)
        return "done"

    with FakeTensorMode():
        on_gpu = torch.empty(2, device="cuda:1")
    assert kernel(torch.zeros(2), mask=on_gpu) == "done" and entered == [torch.device("cuda", 1)]
    assert kernel(torch.zeros(2)) == "done" and kernel([1.0]) == "done" and len(entered) == 1
    assert len(seen) == 3


def test_the_poisson_report_is_copied_back_without_waiting_for_the_stream(monkeypatch) -> None:
    """`Transfers.to_host` asks CuPy for non-blocking copies into pinned memory (a plain `get`
    blocks the host until the stream has run the whole solve), then records one event."""
    copies: list[dict[str, Any]] = []

    class Stream:
        def record(self) -> str:
            copies.append({"recorded": True})
            return "event"

    class DeviceArray:
        shape, dtype = (2, 1), np.dtype(np.float32)

        def get(self, **kwargs: Any) -> None:
            copies.append(kwargs)

    stream = Stream()
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        get_current_stream=lambda: stream, alloc_pinned_memory=lambda size: bytearray(size)
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    transfers = windows.Transfers(fake)
    transfers.to_host(residuals=DeviceArray(), iterations=DeviceArray())
    assert [c.get("blocking") for c in copies[:2]] == [False, False]
    assert all(c["stream"] is stream and c["out"].shape == (2, 1) for c in copies[:2])
    assert copies[2] == {"recorded": True} and transfers._event == "event"
    transfers._event = None  # nothing to wait for when the fake is dropped


def test_every_public_kernel_taking_arrays_is_an_entry_point_on_torchs_stream() -> None:
    checked = []
    for module in (paste, poisson, windows, morphology):
        for name, function in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("_") or function.__module__ != module.__name__:
                continue
            annotations = inspect.get_annotations(inspect.unwrap(function))
            takes_arrays = any(annotations.get(p) == "Any" for p in inspect.signature(function).parameters)
            if takes_arrays:
                checked.append(name)
                assert getattr(function, "runs_on_torch_stream", False), f"{module.__name__}.{name}"
    assert {"paste", "poisson_blend", "dilate", "guidance_field"} <= set(checked)


# -- dli bench -------------------------------------------------------------------------------------


def test_bench_reports_a_cupy_that_fails_to_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import cupy` raises PermissionError (not ImportError) when it cannot create its kernel cache."""
    from dli.bench import report, state, throughput

    real_import = builtins.__import__

    def failing_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "cupy":
            raise PermissionError(13, "Permission denied", "/.cupy")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(builtins, "__import__", failing_import)
    settings = state.Settings(
        device="cuda", data="", images=0, batch_size=8, image_size=64, repeats=1, batches=1, warmup=0,
        workers=0, num_threads=1, encoders=("l-resnet18",), poisson_prob=0.5, seed=0, quick=True,
    )  # fmt: skip
    with pytest.raises(DliError, match=r"PermissionError.*CUPY_CACHE_DIR"):
        throughput.prepare(settings)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert report.versions()["cupy"] is None  # recorded as unavailable, not a crash
