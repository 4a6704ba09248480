"""Array-module plumbing: one kernel body for NumPy and CuPy, torch tensors in and out without copies.

Every kernel takes NumPy, CuPy or torch arrays. It turns its inputs into arrays with
`as_array` (a torch tensor becomes a zero-copy NumPy view on the CPU or a CuPy view through
DLPack on CUDA), picks the array module with `array_module`, computes, and hands results back
with `as_tensor` when the caller gave torch tensors. DLPack carries the stream hand-off, so a
tensor produced on torch's current stream is safe to read from CuPy's and the other way round.

CuPy is imported only when a CuPy array or a CUDA tensor is seen, so CPU-only code never pays
for (or depends on) a working CUDA install.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np


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
    """`cupy` if any of `arrays` is a CuPy array, else `numpy`."""
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
            return x.numpy()
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


def as_tensor(a: Any) -> Any:
    """A torch tensor sharing memory with the NumPy or CuPy array `a` (same device, no copy)."""
    import torch

    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    if a.dtype == np.bool_:
        return torch.from_dlpack(a.view(np.uint8)).view(torch.bool)
    return torch.from_dlpack(a)


def to_host(a: Any) -> np.ndarray:
    """`a` as a NumPy array (copied from the GPU when it is a CuPy array)."""
    return a.get() if is_cupy(a) else np.asarray(a)


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
