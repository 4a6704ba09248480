"""A device-cost model: the CUDA path's own code run on the CPU over an array module that counts.

`MODEL` is an array module (NumPy's functions, CuPy's behaviour) whose arrays, `ModelArray`, are
NumPy arrays that count every device operation made on them while a `counting()` block is
open, and the bytes it moves. The kernels pick their module from their arrays
(`dli.kernels.xp.array_module`), and `MODEL` is not NumPy, so they take their CUDA branches
(window gathers by advanced indexing, a fixed PCG budget with no host check, pinned transfers,
the paste kernel) while the numbers are computed by NumPy: the counted run's output is the
CUDA branch's output, computed on the host.

What is counted, as CuPy 14.2 runs it (`CUPY_VERSION`):

- kernels: one per elementwise expression or ufunc (`a + b`, `xp.where`, `astype` to another
  dtype, `copy`, a slice assignment, `fill`, `zeros` as a memset), one per reduction (`sum`,
  `any`, `count_nonzero`, `argmax`, a ufunc's `reduce`), one per array of a concatenation or
  stack of up to 8 arrays (`cupy.concatenate` copies each one). Advanced indexing with k integer
  arrays is 1 gather (`take`) or scatter for k = 1, and k + 2 kernels for k >= 2 (a fill of the
  flat index, one kernel per index array adding its stride, then the gather or scatter);
  views (slices, reshape, transpose, moveaxis, `[..., None]`) are free.
- library executions: one per cuFFT execution and per cuBLAS call. `matmul` of stacked
  matrices is one `gemmStridedBatchedEx`, or, when an operand is broadcast over the batch,
  three pointer kernels and one `gemmBatched`; an operand that is not C-contiguous is copied
  first. The sine transforms are counted by `dli.kernels.cupy_costs.DST_TABLE` (cupyx builds
  them from FFTs); the rules are written down there, from CuPy's sources.
- copies: host -> device (`asarray` of a host array, `ndarray.set`, a host index array, a
  `note_upload` from the caller) and device -> host (`get`); a read of a device value on the
  host (`bool`, `int`, `float`, `item`, `tolist`) is a copy and a host synchronization.

`launches` is the number of device operations of all three kinds (what the host issues on the
stream); `bytes` what they read and write: each operand's and output's elements once (a
broadcast operand at its own size), a gather its index and the elements it moves. cuFFT and
cuBLAS are counted at one pass over their operands, the least they move.

Mixing a host NumPy array (not a scalar) into a device expression raises TypeError, as CuPy
does. A cuFFT execution's plan key (length, type, batch) is recorded: CuPy caches plans by it,
so a key that changes with the batch's content means a new plan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import scipy.fft

from dli.kernels.cupy_costs import (
    CUPY_VERSION,
    DeviceCounts,
    count_advanced,
    count_dst2,
    count_dst3,
    count_matmul,
    counting,
    nbytes,
    note_upload,
    record,
    sync,
)
from dli.kernels.morphology import TWINS as DILATE_TWINS
from dli.kernels.poisson.direct_cuda import TWINS as DIRECT_TWINS
from dli.kernels.xp import modelled_device

__all__ = ["CUPY_VERSION", "MODEL", "DeviceCounts", "ModelArray", "cost", "counting", "modelled", "to_model"]


# ---------------------------------------------------------------------------------------------
# Arrays.


def _plain(x: Any) -> Any:
    """`x` with ModelArrays turned into plain NumPy views (recursing into lists and tuples)."""
    if isinstance(x, ModelArray):
        return x.view(np.ndarray)
    if isinstance(x, list | tuple):
        return type(x)(_plain(v) for v in x)
    return x


def _wrap(x: Any) -> Any:
    """NumPy results as ModelArrays (scalars as 0-d arrays, as CuPy returns them)."""
    if isinstance(x, np.ndarray):
        return x.view(ModelArray)
    if isinstance(x, np.generic):
        return np.asarray(x).view(ModelArray)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _arrays(values: Any) -> list[np.ndarray]:
    """The arrays among `values`, recursing into lists and tuples."""
    found: list[np.ndarray] = []
    for v in values:
        if isinstance(v, np.ndarray):
            found.append(v)
        elif isinstance(v, list | tuple):
            found.extend(_arrays(v))
    return found


def _check_device(values: Any) -> None:
    """CuPy refuses host arrays in device expressions (0-d ones are scalars to it)."""
    for v in _arrays(values):
        if not isinstance(v, ModelArray) and v.ndim > 0:
            raise TypeError(f"a host NumPy array {v.shape} {v.dtype} in a device expression")


def _shares(result: np.ndarray, inputs: list[np.ndarray]) -> bool:
    return any(np.may_share_memory(result, a) for a in inputs)


_VIEW_FUNCTIONS = frozenset(
    {
        "moveaxis",
        "swapaxes",
        "transpose",
        "expand_dims",
        "squeeze",
        "broadcast_to",
        "broadcast_arrays",
        "atleast_1d",
        "atleast_2d",
        "atleast_3d",
        "real",
        "imag",
        "shape",
        "ndim",
        "size",
        "result_type",
        "may_share_memory",
        "shares_memory",
        "empty_like",
    }
)
"""NumPy functions that make no device operation (views, metadata, an allocation)."""

_PER_ARRAY_FUNCTIONS = frozenset({"concatenate", "stack", "vstack", "hstack", "column_stack"})
"""`cupy.concatenate` (and the stacks built on it) copies each of up to 8 arrays by its own kernel."""


class ModelArray(np.ndarray):
    """A NumPy array standing for a CuPy array: its operations are counted (see the module docstring)."""

    __dli_array_module__: Any = None  # set to MODEL below: `dli.kernels.xp.array_module` reads it

    def __array_ufunc__(
        self, ufunc: np.ufunc, method: str, *inputs: Any, out: Any = None, **kwargs: Any
    ) -> Any:
        outs = tuple(out) if out is not None else ()
        _check_device((*inputs, *outs))
        if outs:
            kwargs["out"] = tuple(_plain(o) for o in outs)
        result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        written = outs if outs else (result if isinstance(result, tuple) else (result,))
        read = sum(nbytes(a) for a in inputs)
        if ufunc is np.matmul:
            count_matmul(inputs, written[0])
        else:
            name = ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}"
            record("kernel", name, read + sum(nbytes(w) for w in written))
        if outs:
            return outs[0] if len(outs) == 1 else outs
        return _wrap(result)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        name = func.__name__
        plain_args, plain_kwargs = _plain(args), {k: _plain(v) for k, v in kwargs.items()}
        if name not in ("copyto", "may_share_memory", "shares_memory", "shape", "ndim", "size"):
            _check_device((*args, *kwargs.values()))
        result = func(*plain_args, **plain_kwargs)
        inputs = _arrays((*plain_args, *plain_kwargs.values()))
        if name in _VIEW_FUNCTIONS:
            return _wrap(result)
        outputs = _arrays(result if isinstance(result, tuple | list) else (result,))
        if name == "copyto":
            record("kernel", name, sum(nbytes(a) for a in inputs[1:]) + nbytes(inputs[0]))
            return result
        if outputs and all(_shares(o, inputs) for o in outputs) and name not in ("where", "clip"):
            return _wrap(result)  # a view of an input (reshape, ravel of a contiguous array, ...)
        moved = sum(nbytes(a) for a in inputs) + sum(nbytes(o) for o in outputs)
        if name in _PER_ARRAY_FUNCTIONS:
            parts = args[0] if args else kwargs["arrays"]
            count = len(parts) if len(parts) <= 8 else 1
            record("kernel", name, moved, count)
            if count == 1 and len(parts) > 8:
                record("copy", "host->device", 8 * len(parts))  # the pointer table
        elif name in ("zeros_like", "ones_like", "full_like"):
            record("kernel", name, sum(nbytes(o) for o in outputs))
        else:
            record("kernel", name, moved)
        return _wrap(result)

    # Indexing: views are free; integer-array indices gather and scatter as CuPy does.

    def __getitem__(self, key: Any) -> Any:
        plain = self.view(np.ndarray)
        index = _index_arrays(key)
        result = plain[_plain(key)]
        if not index:
            return _wrap(result)
        count_advanced(index, 2 * nbytes(result), "gather", _on_device(index))  # each element read, written
        return _wrap(result)

    def __setitem__(self, key: Any, value: Any) -> None:
        plain = self.view(np.ndarray)
        index = _index_arrays(key)
        if isinstance(value, np.ndarray) and not isinstance(value, ModelArray) and value.ndim > 0:
            raise TypeError(f"assigning a host NumPy array {value.shape} to device memory")
        plain[_plain(key)] = _plain(value)
        target = plain[_plain(key)] if not index else None
        if index:
            written = nbytes(plain[_plain(key)])
            if isinstance(value, ModelArray) and value.dtype != self.dtype:
                record("kernel", "astype", nbytes(value) + value.size * self.itemsize)
            count_advanced(index, written + nbytes(value), "scatter", _on_device(index))
        elif isinstance(value, ModelArray) and value.ndim > 0:
            if _same_view(value, target):
                return  # `a[s] += b` writes back the view it changed in place: CuPy skips the copy
            record("kernel", "copy", nbytes(value) + nbytes(target))
        else:
            record("kernel", "fill", nbytes(target))

    # Methods that are device operations in CuPy but not ufuncs in NumPy.

    def copy(self, order: str = "C") -> Any:  # type: ignore[override]
        record("kernel", "copy", 2 * nbytes(self))
        return _wrap(self.view(np.ndarray).copy(order=order))

    def astype(
        self, dtype: Any, order: str = "K", casting: str = "unsafe", subok: bool = True, copy: bool = True
    ) -> Any:  # type: ignore[override]
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        result = self.view(np.ndarray).astype(dtype, order=order, casting=casting)
        record("kernel", "astype", nbytes(self) + nbytes(result))
        return _wrap(result)

    def reshape(self, *shape: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        result = self.view(np.ndarray).reshape(*shape, **kwargs)
        if not np.may_share_memory(result, self):
            record("kernel", "copy", 2 * nbytes(self))
        return _wrap(result)

    def ravel(self, order: str = "C") -> Any:  # type: ignore[override]
        return self.reshape(-1, order=order)

    def fill(self, value: Any) -> None:
        record("kernel", "fill", nbytes(self))
        self.view(np.ndarray).fill(value)

    def argmax(self, axis: Any = None, out: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        result = self.view(np.ndarray).argmax(axis=axis, **kwargs)
        record("kernel", "argmax", nbytes(self) + nbytes(np.asarray(result)))
        return _wrap(result)

    def mean(self, axis: Any = None, dtype: Any = None, out: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        result = self.view(np.ndarray).mean(axis=axis, dtype=dtype, **kwargs)
        record("kernel", "mean", nbytes(self) + nbytes(np.asarray(result)))  # one reduction in CuPy
        return _wrap(result)

    # Transfers and host reads.

    def get(self, stream: Any = None, out: Any = None, blocking: bool = True) -> np.ndarray:
        """Device -> host copy, as `cupy.ndarray.get`."""
        record("copy", "device->host", nbytes(self))
        if blocking:
            sync()
        host = np.array(self.view(np.ndarray))
        if out is None:
            return host
        out[...] = host
        return out

    def set(self, array: np.ndarray, stream: Any = None) -> None:
        """Host -> device copy, as `cupy.ndarray.set`."""
        record("copy", "host->device", nbytes(array))
        self.view(np.ndarray)[...] = array

    def _host_read(self) -> np.ndarray:
        record("copy", "device->host", nbytes(self))
        sync()
        return self.view(np.ndarray)

    def __bool__(self) -> bool:
        return bool(self._host_read())

    def __int__(self) -> int:
        return int(self._host_read())

    def __float__(self) -> float:
        return float(self._host_read())

    def __index__(self) -> int:
        return int(self._host_read())

    def item(self, *args: Any) -> Any:
        return self._host_read().item(*args)

    def tolist(self) -> Any:
        return self._host_read().tolist()


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
    )


def _on_device(index: list[Any]) -> list[bool]:
    return [isinstance(i, ModelArray) for i in index]


def _index_arrays(key: Any) -> list[Any]:
    """The advanced (array) indices in an indexing key."""
    parts = key if isinstance(key, tuple) else (key,)
    return [p for p in parts if isinstance(p, np.ndarray | list) and not isinstance(p, np.generic)]


# ---------------------------------------------------------------------------------------------
# The array module.


class _Event:
    done = True

    def synchronize(self) -> None:
        sync()


class _Stream:
    def record(self) -> _Event:
        return _Event()


class _Device:
    id = -1  # never a real GPU's index: caches keyed by device keep the model's arrays apart

    def __init__(self, index: int | None = None) -> None:
        pass

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def synchronize(self) -> None:
        sync()


class _Cuda:
    """The parts of `cupy.cuda` the kernels use: pinned host memory, streams, events, the device."""

    Device = _Device

    @staticmethod
    def alloc_pinned_memory(nbytes: int) -> bytearray:
        return bytearray(nbytes)

    @staticmethod
    def get_current_stream() -> _Stream:
        return _Stream()


class _RawKernel:
    """A raw CUDA kernel: one launch; its effect is computed by its NumPy twin (`RAW_KERNEL_TWINS`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, grid: Any, block: Any, args: tuple[Any, ...], **kwargs: Any) -> None:
        twin = RAW_KERNEL_TWINS[self.name.split("<", 1)[0]]
        record("kernel", self.name.split("<", 1)[0], twin(*_plain(args)))


class _RawModule:
    def __init__(self, code: str = "", options: Any = (), name_expressions: Any = ()) -> None:
        self.code = code

    def get_function(self, name: str) -> _RawKernel:
        return _RawKernel(name)


def _paste_twin(
    target: np.ndarray,
    source: np.ndarray,
    mask: np.ndarray,
    slots: np.ndarray,
    labels: np.ndarray,
    class_ids: np.ndarray,
    write_labels: Any,
    channels: Any,
    classes: Any,
    pixels: Any,
    count: Any,
) -> int:
    """`paste_kernel` on the host (`dli.kernels.paste._paste_arrays`); returns the bytes it moves:
    every mask element read, and per pasted pixel its source and target channels read, the target
    written, and one label written."""
    from dli.kernels.paste import _paste_arrays

    _paste_arrays(
        target,
        source,
        mask,
        labels if int(write_labels) else None,
        class_ids if int(write_labels) else None,
        slots,
    )
    pasted = int(np.count_nonzero(mask))
    per_pixel = int(channels) * 3 * target.itemsize + (labels.itemsize if int(write_labels) else 0)
    return nbytes(mask) + pasted * per_pixel + nbytes(slots)


def _counted(twin: Callable[..., None], moved: Callable[..., int]) -> Callable[..., int]:
    """A twin that does a kernel's work and returns the bytes `moved` says the kernel reads and writes."""

    def run(*args: Any) -> int:
        twin(*args)
        return moved(*args)

    return run


RAW_KERNEL_TWINS: dict[str, Callable[..., int]] = {
    "paste_kernel": _paste_twin,
    **{name: _counted(*twin) for name, twin in (DIRECT_TWINS | DILATE_TWINS).items()},
}
"""Raw CUDA kernels of the kernels modules (by function name) and the NumPy code that does their
work, returning the bytes the kernel moves: `paste`'s, the direct Poisson solver's and the
dilation's (their modules' `TWINS` state each kernel's bytes beside its code)."""


class _Fft:
    """`cupyx.scipy.fft`'s sine transforms: computed by `scipy.fft`, counted by `DST_TABLE`."""

    @staticmethod
    def dstn(
        x: Any, type: int = 2, s: Any = None, axes: Any = None, norm: Any = None, overwrite_x: bool = False
    ) -> Any:
        return _sine_nd(x, type, axes, norm, overwrite_x, inverse=False)

    @staticmethod
    def idstn(
        x: Any, type: int = 2, s: Any = None, axes: Any = None, norm: Any = None, overwrite_x: bool = False
    ) -> Any:
        return _sine_nd(x, type, axes, norm, overwrite_x, inverse=True)

    @staticmethod
    def dst(
        x: Any, type: int = 2, n: Any = None, axis: int = -1, norm: Any = None, overwrite_x: bool = False
    ) -> Any:
        return _sine_nd(x, type, (axis,), norm, overwrite_x, inverse=False)

    @staticmethod
    def idst(
        x: Any, type: int = 2, n: Any = None, axis: int = -1, norm: Any = None, overwrite_x: bool = False
    ) -> Any:
        return _sine_nd(x, type, (axis,), norm, overwrite_x, inverse=True)


def _sine_nd(x: Any, kind: int, axes: Any, norm: Any, overwrite_x: bool, inverse: bool) -> Any:
    if kind not in (2, 3):
        raise NotImplementedError("Only DST-II and DST-III have been implemented.")  # as CuPy 14.2
    _check_device((x,))
    plain = np.asarray(x)
    ndim = plain.ndim
    axes = tuple(range(ndim)) if axes is None else tuple(axes)
    real = np.dtype(plain.dtype) if plain.dtype.kind == "f" else np.dtype(np.float64)
    if plain.dtype.kind != "f":
        record("kernel", "astype", nbytes(plain) + plain.size * real.itemsize)
    type_ii = (kind == 2) != inverse  # idst of type 2 is a DST-III, of type 3 a DST-II
    for axis in axes:
        last = axis % ndim == ndim - 1
        if type_ii:
            count_dst2(plain.shape, axis % ndim, real.itemsize, last)
        else:
            count_dst3(plain.shape, axis % ndim, real.itemsize, last, overwrite_x)
    function = scipy.fft.idstn if inverse else scipy.fft.dstn
    return _wrap(function(plain, type=kind, axes=axes, norm=norm))


class DeviceModule:
    """The array module of `ModelArray`s: NumPy's names, CuPy's behaviour where they differ.

    Array creation gives ModelArrays (`zeros` is a memset, `empty` free, `asarray` of a host
    array a host -> device copy); ufuncs and array functions dispatch through `ModelArray`.
    `cuda` stands for `cupy.cuda` (pinned memory, streams, events), `RawModule` for
    `cupy.RawModule`, `scipy_fft` for `cupyx.scipy.fft`.
    """

    __name__ = "dli.kernels.device_model.MODEL"
    ndarray = ModelArray
    cuda = _Cuda()
    RawModule = _RawModule
    scipy_fft = _Fft()

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    def __repr__(self) -> str:
        return f"<device model array module (CuPy {CUPY_VERSION} counts)>"

    # Creation.

    def empty(self, shape: Any, dtype: Any = float, order: str = "C") -> ModelArray:
        return _wrap(np.empty(shape, dtype=dtype, order=order))

    def zeros(self, shape: Any, dtype: Any = float, order: str = "C") -> ModelArray:
        result = np.zeros(shape, dtype=dtype, order=order)
        record("kernel", "memset", nbytes(result))
        return _wrap(result)

    def ones(self, shape: Any, dtype: Any = float, order: str = "C") -> ModelArray:
        return self.full(shape, 1, dtype=dtype, order=order)

    def full(self, shape: Any, fill_value: Any, dtype: Any = None, order: str = "C") -> ModelArray:
        result = np.full(shape, fill_value, dtype=dtype, order=order)
        record("kernel", "fill", nbytes(result))
        return _wrap(result)

    def arange(self, *args: Any, **kwargs: Any) -> ModelArray:
        result = np.arange(*args, **kwargs)
        record("kernel", "arange", nbytes(result))
        return _wrap(result)

    def asarray(self, a: Any, dtype: Any = None, order: Any = None) -> ModelArray:
        if isinstance(a, ModelArray):
            return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
        host = np.asarray(a, dtype=dtype, order=order)
        record("copy", "host->device", nbytes(host))
        return _wrap(np.array(host))

    array = asarray

    def ascontiguousarray(self, a: Any, dtype: Any = None) -> ModelArray:
        a = self.asarray(a)
        if dtype is not None and np.dtype(dtype) != a.dtype:
            a = a.astype(dtype)
        if a.flags.c_contiguous:
            return a
        return a.copy()

    def asnumpy(self, a: Any) -> np.ndarray:
        return a.get() if isinstance(a, ModelArray) else np.asarray(a)

    # Hooks of `dli.kernels.xp.modelled_device`.

    @staticmethod
    def ndarray_view(a: np.ndarray) -> ModelArray:
        """A host array's memory as a device array (a view: writes reach the host array)."""
        return a.view(ModelArray)

    @staticmethod
    def note_upload(array: Any) -> None:
        note_upload(array)


MODEL = DeviceModule()
"""The model's array module: pass `MODEL.asarray(host)` arrays to the kernels."""

ModelArray.__dli_array_module__ = MODEL


def to_model(array: Any) -> ModelArray:
    """A host array as a device array of the model, with no copy counted (data already on the device)."""
    return _wrap(np.array(array))


@contextlib.contextmanager
def modelled() -> Iterator[None]:
    """Inside, CPU torch tensors given to the kernels (and to `dli.pipeline.inject`) stand for
    CUDA tensors: they become `MODEL` arrays (views of the tensors' memory)."""
    with modelled_device(MODEL):
        yield


def cost(call: Callable[[], Any], *, warm_up: bool | Callable[[], Any] = True) -> DeviceCounts:
    """The device operations of `call()` (made on `MODEL` arrays or under `modelled()`).

    With `warm_up` the call (or the cheaper call given) runs once uncounted first, so per-shape
    caches (the preconditioner's spectra and transform matrices, uploaded once) are warm as in
    training's steady state.
    """
    if callable(warm_up):
        warm_up()
    elif warm_up:
        call()
    with counting() as counts:
        call()
    return counts
