"""What CuPy 14.2 launches for each operation, and the counts the device model keeps.

`dli.kernels.device_model` runs the CUDA path on the CPU and calls these rules for every
device operation it sees: `record` one launch (kernel, library execution or copy) with the
bytes it moves, per the rules written down here from CuPy's own sources (`CUPY_VERSION`):
advanced indexing (`count_advanced`), `matmul` (`count_matmul`) and the sine transforms of
`cupyx.scipy.fft` (`DST_TABLE`, `count_dst2`, `count_dst3`). `counting()` collects them.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CUPY_VERSION = "14.2.0"
"""The CuPy whose operations the counts follow (read in its sources, see `DST_TABLE`)."""

DST_TABLE = """\
cupyx.scipy.fft (CuPy 14.2, cupyx/scipy/fft/_realtransforms.py and cupy/fft/_fft.py), one
transform along one axis of a real array of E elements, n along the axis, s bytes per real
element, c = 2s per complex one. Each row is one device operation: elements read + written.

DST-II (dst type 2 / idst type 3; _dct_or_dst_type2 with dst=True):
  1 negate the odd half          _reshuffle_dct2: -x[sl_odd]            E/2 s + E/2 s
  2 copy the even half           cupy.concatenate (<= 8 arrays: a copy each)   E/2 s + E/2 s
  3 copy the negated odd half                                                E/2 s + E/2 s
  4 cast to complex              _fft._convert_dtype: astype(complex)          E s + E c
  5 copy to contiguous           _exec_fft, only when the axis is not last     E c + E c
  6 cuFFT C2C execution          plan key (n, C2C, E/n), in place              E c + E c
  7 twiddle factors              _mult_factor_dct2 kernel                      n s + n c
  8 multiply by the twiddles     x *= tmp                                      E c + E c
  9 scale the first row (ortho)  x[sl0] *= sqrt(2)/2                           E/n s + E/n s
  (cupy.real and the final reversal are views)
DST-III (idst type 2 / dst type 3; _dct_or_dst_type3 with dst=True):
  1 copy the input (ortho, only without overwrite_x)                           E s + E s
  2 scale the first row          x[sl0] *= sqrt(2)                             E/n s + E/n s
  3 twiddle factors              _mult_factor_dct3 kernel                      n s + n c
  4 multiply by the twiddles     x = x * tmp (real times complex)              E s + E c
  5 scale the first row          x[sl0] *= 0.5                                 E/n c + E/n c
  6 copy to contiguous           _exec_fft, only when the axis is not last     E c + E c
  7 cuFFT C2C execution          plan key (n, C2C, E/n), in place              E c + E c
  8 normalize                    out /= n (norm "backward" of the inverse)     E c + E c
  9 copy the even entries        _reshuffle_dct3: x[sl_even] = y[:half]        E/2 s + E/2 s
 10 negate the second half       -y[half:]                                     E/2 s + E/2 s
 11 copy the odd entries         x[sl_odd] = ...                               E/2 s + E/2 s
dstn / idstn run one such transform per axis, in the order of `axes`. DST types 1 and 4 raise
NotImplementedError in CuPy 14.2 (only types 2 and 3 exist), and so do they here.
So a 2-D DST-II over the last two axes is 17 operations (2 cuFFT), a 2-D DST-III with
overwrite_x 19 (2 cuFFT).
"""


# ---------------------------------------------------------------------------------------------
# The counts.


@dataclass
class DeviceCounts:
    """Device operations and bytes counted in one `counting()` block."""

    launches: int = 0  # every device operation: kernels + library executions + copies
    bytes: int = 0  # read + written by all of them
    kernels: int = 0
    library: int = 0  # cuFFT executions and cuBLAS calls
    copies: int = 0  # host <-> device
    copy_bytes: int = 0
    syncs: int = 0  # the host waited for a device value
    flops: int = 0  # of the cuBLAS products (2 m n k per product)
    operations: Counter = field(default_factory=Counter)  # launches by name
    operation_bytes: Counter = field(default_factory=Counter)  # bytes by name
    fft_plans: set = field(default_factory=set)  # cuFFT plan keys (length, type, batch)

    def add(self, kind: str, name: str, nbytes: int, count: int = 1) -> None:
        self.launches += count
        self.bytes += int(nbytes)
        self.operations[name] += count
        self.operation_bytes[name] += int(nbytes)
        if kind == "kernel":
            self.kernels += count
        elif kind == "library":
            self.library += count
        else:
            self.copies += count
            self.copy_bytes += int(nbytes)

    def as_dict(self) -> dict[str, Any]:
        """The JSON figures (`launches`, `bytes`, and their parts)."""
        return {
            "launches": self.launches,
            "bytes": self.bytes,
            "kernels": self.kernels,
            "library_calls": self.library,
            "copies": self.copies,
            "copy_bytes": self.copy_bytes,
            "host_syncs": self.syncs,
            "matmul_flops": self.flops,
            "fft_plans": len(self.fft_plans),
            "cupy": CUPY_VERSION,
        }


_ACTIVE: list[DeviceCounts] = []


@contextlib.contextmanager
def counting() -> Iterator[DeviceCounts]:
    """Count the device operations of `MODEL` arrays made inside the block (nested blocks count too)."""
    counts = DeviceCounts()
    _ACTIVE.append(counts)
    try:
        yield counts
    finally:
        _ACTIVE.remove(counts)


def record(kind: str, name: str, nbytes: float, count: int = 1) -> None:
    for counts in _ACTIVE:
        counts.add(kind, name, int(nbytes), count)


def sync() -> None:
    for counts in _ACTIVE:
        counts.syncs += 1


def note_upload(array: Any) -> None:
    """Count a host -> device copy of `array` (for callers whose copy the model cannot see)."""
    record("copy", "host->device", nbytes(array))


def nbytes(a: Any) -> int:
    """The bytes of an array's elements (0 for anything else)."""
    return int(a.size) * int(a.itemsize) if isinstance(a, np.ndarray | np.generic) else 0


def count_advanced(index: list[Any], moved: int, what: str, on_device: list[bool]) -> None:
    """Advanced indexing as CuPy 14.2 runs it (cupy/_core/_routines_indexing.pyx); `moved`: the
    bytes of the elements read and written, the index's own bytes are added here. `on_device`:
    per index, whether it is a device array already."""
    for i, device in zip(index, on_device, strict=True):  # `_prepare_slice_list` uploads host ones
        if not device:
            record("copy", "host->device", nbytes(np.asarray(i)))
    arrays = [np.asarray(i) for i in index]
    if len(arrays) == 1 and arrays[0].dtype == np.bool_:
        # `_prepare_mask_indexing_single`: a scan of the mask, and its total read on the host
        record("kernel", "scan", 2 * arrays[0].size * 8)
        record("copy", "device->host", 8)
        sync()
        record("kernel", what, moved + arrays[0].size * 9)
        return
    if len(arrays) == 1:  # `take` / `_scatter_op_single`
        record("kernel", what, moved + nbytes(arrays[0]))
        return
    # `_prepare_multiple_array_indexing`: fill an int64 flat index, add each array's stride part
    flat = int(np.prod(np.broadcast_shapes(*(a.shape for a in arrays)))) * 8
    record("kernel", "fill", flat)
    for a in arrays:
        record("kernel", "index", nbytes(a) + 2 * flat)
    record("kernel", what, moved + flat)


def count_matmul(inputs: tuple[Any, ...], result: np.ndarray) -> None:
    """`cupy.matmul` (cupy/_core/_routines_linalg.pyx): cuBLAS, after copies and pointer kernels."""
    a, b = (np.asarray(x) for x in inputs)
    moved = nbytes(a) + nbytes(b) + nbytes(result)
    for counts in _ACTIVE:
        counts.flops += 2 * int(np.size(result)) * int(a.shape[-1])
    if max(a.ndim, b.ndim) <= 2:
        record("library", "cublas", moved)
        return
    for x in (a, b):  # `ascontiguousarray` of each operand
        if not x.flags.c_contiguous:
            record("kernel", "copy", 2 * nbytes(x))
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    ndim = len(batch)
    broadcast = any(
        len(x.shape[:-2]) < ndim
        or any(s == 1 and c > 1 for s, c in zip(x.shape[:-2], batch[-len(x.shape[:-2]) :], strict=True))
        for x in (a, b)
    )
    if broadcast and int(np.prod(batch)) > 1:
        record("kernel", "mat_ptrs", 3 * 8 * int(np.prod(batch)), count=3)
    record("library", "cublas", moved)


def fft_plan(n: int, batch: int, itemsize: int) -> None:
    key = (n, "C2C" if itemsize == 4 else "Z2Z", batch)
    for counts in _ACTIVE:
        counts.fft_plans.add(key)


def count_dst2(shape: tuple[int, ...], axis: int, s: int, last: bool) -> None:
    """DST-II along `axis`, row by row of `DST_TABLE`."""
    elements, n = math.prod(shape), shape[axis]
    odd = elements // n * (n // 2)
    c = 2 * s
    record("kernel", "dst: negate", 2 * odd * s)
    record("kernel", "dst: concatenate", 2 * (elements - odd) * s)
    record("kernel", "dst: concatenate", 2 * odd * s)
    record("kernel", "dst: astype complex", elements * (s + c))
    if not last:
        record("kernel", "dst: contiguous copy", 2 * elements * c)
    record("library", "cufft", 2 * elements * c)
    fft_plan(n, elements // n, s)
    record("kernel", "dst: twiddles", n * (s + c))
    record("kernel", "dst: multiply", 2 * elements * c + n * c)
    record("kernel", "dst: scale first", 2 * elements // n * s)


def count_dst3(shape: tuple[int, ...], axis: int, s: int, last: bool, overwrite: bool) -> None:
    """DST-III along `axis`, row by row of `DST_TABLE`."""
    elements, n = math.prod(shape), shape[axis]
    half = elements // n * (n // 2)
    c = 2 * s
    if not overwrite:
        record("kernel", "dst: copy input", 2 * elements * s)
    record("kernel", "dst: scale first", 2 * elements // n * s)
    record("kernel", "dst: twiddles", n * (s + c))
    record("kernel", "dst: multiply", elements * (s + c) + n * c)
    record("kernel", "dst: scale first", 2 * elements // n * c)
    if not last:
        record("kernel", "dst: contiguous copy", 2 * elements * c)
    record("library", "cufft", 2 * elements * c)
    fft_plan(n, elements // n, s)
    record("kernel", "dst: normalize", 2 * elements * c)
    record("kernel", "dst: copy even", 2 * (elements - half) * s)
    record("kernel", "dst: negate", 2 * half * s)
    record("kernel", "dst: copy odd", 2 * half * s)
