"""Array-module plumbing: one kernel body for NumPy and CuPy, torch tensors in and out without copies.

Every kernel takes NumPy, CuPy or torch arrays. It turns its inputs into arrays with
`as_array` (a torch tensor becomes a zero-copy NumPy view on the CPU or a CuPy view through
DLPack on CUDA), picks the array module with `array_module`, computes, and hands results back
with `as_tensor` when the caller gave torch tensors. DLPack carries the stream hand-off, so a
tensor produced on torch's current stream is safe to read from CuPy's and the other way round.

Streams. Every public kernel function that takes arrays is decorated with `on_torch_stream`:
given a CUDA tensor, its CuPy work runs on that tensor's GPU and on torch's current stream there
(`torch_stream`, the one place kernels take torch's stream), so results written in place, which
no DLPack return orders, are ready for whatever torch queues next, also under
`torch.cuda.stream(s)`. With NumPy or CuPy arrays the decorator does nothing (CuPy's current
stream applies).

Raw CUDA. A kernels module with raw CUDA code exposes `CUDA_SOURCES`: label -> (code, name
expressions to instantiate, e.g. "cg_step<float>"), and builds its `cupy.RawModule` from it with
`CUDA_OPTIONS`; the test suite compiles every entry with NVRTC for the GPU generations in
`CUDA_TEST_ARCHITECTURES`, without a GPU.

CuPy is imported only when a CuPy array or a CUDA tensor is seen, so CPU-only code never pays
for (or depends on) a working CUDA install.

Device model. An array type may name its own array module in `__dli_array_module__`:
`dli.kernels.device_model` does, so that the CUDA branches (every `xp is not np`) run on the
CPU over an array module that counts device operations. Inside `modelled_device()`, CPU torch
tensors stand for CUDA ones (`as_array` gives the model's arrays), and `note_upload` counts the
host -> device copies that callers make through torch. The module's `scipy_fft` and `cuda`
stand for `cupyx.scipy.fft` and `cupy.cuda` (`scipy_fft_module`).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any, TypeVar

import numpy as np

F = TypeVar("F", bound=Callable[..., Any])

CUDA_OPTIONS = ("-std=c++17",)
"""NVRTC options of every raw CUDA module (CuPy adds the GPU's architecture)."""

CUDA_TEST_ARCHITECTURES = ("sm_80", "sm_90")
"""GPU generations the test suite compiles `CUDA_SOURCES` for (Ampere and Hopper)."""


def is_cupy(x: Any) -> bool:
    """Whether `x` is a CuPy array (checked without importing CuPy)."""
    return type(x).__module__.startswith("cupy")


def is_tensor(x: Any) -> bool:
    """Whether `x` is a torch tensor (checked without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def any_tensor(*values: Any) -> bool:
    """Whether any of `values` is a torch tensor: the caller then gets torch tensors back."""
    return any(is_tensor(v) for v in values)


def array_module(*arrays: Any) -> ModuleType:
    """`cupy` if any of `arrays` is a CuPy array, a device model's module for its arrays, else `numpy`."""
    for a in arrays:
        module = getattr(type(a), "__dli_array_module__", None)
        if module is not None:
            return module
    if any(is_cupy(a) for a in arrays):
        import cupy

        return cupy
    return np


def as_array(x: Any) -> Any:
    """`x` as a NumPy or CuPy array, sharing memory with a torch tensor (never a copy for a tensor).

    Bool CUDA tensors travel as uint8 views, since DLPack support for bool differs between versions.
    """
    if is_tensor(x):
        x = x.detach()
        if x.device.type == "cpu":
            return _DEVICE_MODEL[-1].ndarray_view(x.numpy()) if _DEVICE_MODEL else x.numpy()
        if x.device.type == "cuda":
            import cupy
            import torch

            if x.dtype == torch.bool:
                return cupy.from_dlpack(x.view(torch.uint8)).view(cupy.bool_)
            return cupy.from_dlpack(x)
        raise ValueError(f"tensors on device {x.device} are not supported (cpu or cuda only)")
    if is_cupy(x) or isinstance(x, np.ndarray):
        return x
    return np.asarray(x)


_DEVICE_MODEL: list[Any] = []
"""The device model's array module while `modelled_device` is active (innermost last)."""


@contextlib.contextmanager
def modelled_device(module: Any) -> Iterator[None]:
    """Inside, CPU torch tensors stand for device arrays of `module` (a device model, see above)."""
    _DEVICE_MODEL.append(module)
    try:
        yield
    finally:
        _DEVICE_MODEL.pop()


def note_upload(array: Any) -> None:
    """Count a host -> device copy of `array` in the active device model (nothing without one)."""
    if _DEVICE_MODEL:
        _DEVICE_MODEL[-1].note_upload(array)


def scipy_fft_module(xp: ModuleType) -> ModuleType:
    """`scipy.fft` for NumPy, `cupyx.scipy.fft` for CuPy, a device model's own `scipy_fft`."""
    if xp is np:
        import scipy.fft

        return scipy.fft
    own = getattr(xp, "scipy_fft", None)
    if own is not None:
        return own
    import cupyx.scipy.fft

    return cupyx.scipy.fft


def as_tensor(a: Any) -> Any:
    """A torch tensor sharing memory with the NumPy or CuPy array `a` (same device, no copy)."""
    import torch

    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.asarray(a))  # a device model's array is a NumPy subclass
    if a.dtype == np.bool_:
        return torch.from_dlpack(a.view(np.uint8)).view(torch.bool)
    return torch.from_dlpack(a)


def to_host(a: Any) -> np.ndarray:
    """`a` as a NumPy array (copied from the GPU when it is a CuPy or a device model's array)."""
    return a.get() if is_cupy(a) or hasattr(type(a), "__dli_array_module__") else np.asarray(a)


@contextlib.contextmanager
def device_of(a: Any) -> Iterator[None]:
    """Run the enclosed CuPy work on the GPU that holds `a` (a no-op for NumPy arrays)."""
    if is_cupy(a):
        with a.device:
            yield
    else:
        yield


_CUDA_SCALAR_TYPES: dict[str, str] = {
    "bool": "bool",
    "uint8": "unsigned char",
    "int32": "int",
    "int64": "long long",
    "float32": "float",
    "float64": "double",
}


def cuda_scalar_type(dtype: Any) -> str:
    """The CUDA C type of a NumPy/CuPy dtype, for instantiating templated raw kernels."""
    name = np.dtype(dtype).name
    if name not in _CUDA_SCALAR_TYPES:
        raise ValueError(
            f"dtype {name} is not supported by the CUDA kernels ({', '.join(_CUDA_SCALAR_TYPES)})"
        )
    return _CUDA_SCALAR_TYPES[name]


class _StreamHandle:
    """A raw `cudaStream_t` behind the CUDA stream protocol, as `cupy.cuda.Stream.from_external` takes it."""

    def __init__(self, pointer: int) -> None:
        self.pointer = pointer

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.pointer)


def external_stream(pointer: int, device_index: int) -> Any:
    """A CuPy stream object for a stream another library created (it is neither owned nor destroyed).

    `cupy.cuda.Stream.from_external` where CuPy has it (14 and later, which deprecate
    `ExternalStream` with a warning per call); `cupy.cuda.ExternalStream` on CuPy 13. Pointer 0,
    the legacy default stream (torch's default stream), is CuPy's own null stream.
    """
    import cupy

    stream_type = cupy.cuda.Stream
    if pointer == 0:
        return stream_type.null
    if hasattr(stream_type, "from_external"):
        return stream_type.from_external(_StreamHandle(pointer))
    return cupy.cuda.ExternalStream(pointer, device_index)


@contextlib.contextmanager
def torch_stream(device: Any) -> Iterator[None]:
    """Run the enclosed CuPy work on `device` and on torch's current stream there (no-op off CUDA).

    Work queued inside is then ordered with torch's work before and after it, whatever stream
    torch's caller made current (`torch.cuda.stream(s)`).
    """
    if device.type != "cuda":
        yield
        return
    import cupy
    import torch

    index = torch.cuda.current_device() if device.index is None else device.index
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index), external_stream(stream.cuda_stream, index):
        yield


def cuda_tensor_device(values: Iterable[Any]) -> Any:
    """The device of the first CUDA tensor among `values`, or None."""
    for value in values:
        if is_tensor(value) and value.device.type == "cuda":
            return value.device
    return None


def on_torch_stream(function: F) -> F:
    """Decorate a kernel entry point: with a CUDA tensor argument it runs under `torch_stream`.

    The wrapper carries `runs_on_torch_stream = True`, which the test suite checks on every
    public kernel function that takes arrays.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        device = cuda_tensor_device((*args, *kwargs.values()))
        if device is None:
            return function(*args, **kwargs)
        with torch_stream(device):
            return function(*args, **kwargs)

    wrapper.runs_on_torch_stream = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def count_true(mask: Any, axis: tuple[int, ...]) -> Any:
    """Per-slice counts of True in a bool array, as int64, reading nothing back on the GPU.

    NumPy's `count_nonzero` is its fastest count. On CuPy 14 a `count_nonzero` over axes made the
    host wait for the device's queued work (seen on an H200, 2026-12-04, docs/gpu.md), so the
    GPU sums the bool array instead, a plain reduction.
    """
    if isinstance(mask, np.ndarray):
        return np.count_nonzero(mask, axis=axis)
    return mask.sum(axis=axis, dtype=np.int64)
