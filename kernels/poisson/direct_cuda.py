"""The elementwise work of the direct Poisson solver's ``padded`` layout: four fused CUDA kernels and
their NumPy twins.

`dli.kernels.poisson.direct` solves every window of a batch in one (B, C, m, k) array of the largest
window's interior (m x k), each on its own size: right-hand side, S b S by batched matrix products
with each image's zero-padded DST-I matrix S, a division by the eigenvalues, S (.) S again, and the
correction written back. The products stay cuBLAS calls; everything between them is here, one
kernel per step, reading the batch in place (no window gathers, no full-size temporaries):

- `build_rhs`: per solved window b (a row of `windows`) and interior pixel p, per channel,
  b_p = Σ over p's four edges of (guidance - the target's own difference), signed as the
  5-point Laplacian's right-hand side: the edge correction is the source's difference minus the
  target's where p or its neighbour lies in the region (with mixed gradients: zero where the
  target's difference is strictly larger in magnitude), else zero. Read straight from the (N, C, H,
  W) target and source and the (N, H, W) region; zero past the window's own interior.
- `gather_dst_matrices`: each window's DST-I matrices of its interior height and width, taken
  from the (L, cap, cap) table (`direct._DstTable`), zero past its own size.
- `divide_by_eigenvalues`: coefficients (B, C, m, k) times 1 / (λ_i + λ_j), the window's own
  eigenvalues from the (L, cap) table; entries past its own interior are left alone (they are
  exact zeros of the zero-padded product).
- `write_back`: the whole (N, C, H, W) output: target + correction on each window's interior,
  the target bit for bit everywhere else; and, per image, the region pixels off the image border
  that no window interior covers, added to `outside` (zeroed by the caller).

Windows are described by one host-made int64 table, uploaded once (`window_table`): per solved
window a row of `WINDOW_FIELDS` (image, top, left, height, width, and the table rows of its
interior height and width), then per image its window's row or -1. Arrays are C-contiguous; the
images' and table's float type is one of float32 and float64, the region bool.

Each function runs the CUDA kernel when `xp` is CuPy (or the device model's module,
`dli.kernels.device_model`, which counts the launch and runs the twin) and the twin when `xp` is
NumPy: the twin is the same computation in plain NumPy, a loop over the windows. The arithmetic
is the array path's (`direct._edge_corrections`, `_interior_rhs`, which `rhs_twin` calls), so the
kernels and twins agree bit for bit and match the ``shapes`` layout to rounding of the transforms.
`TWINS` gives each kernel's twin and the bytes it reads and writes (what the device model counts).
Nothing here reads a device value on the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from dli.kernels.xp import CUDA_OPTIONS, cuda_scalar_type

WINDOW_FIELDS: tuple[str, ...] = ("image", "top", "left", "height", "width", "row_at", "col_at")
"""The columns of a window's row in `window_table` (the CUDA code's `kFields`)."""

_DIRECT_KERNELS = r"""
// Fused elementwise kernels of the direct Poisson solver's padded layout
// (dli.kernels.poisson.direct_cuda). Arrays are C-contiguous: images (N, C, H, W), region (N, H, W)
// bool, padded windows (B, C, rows, cols), DST-I table (L, cap, cap), eigenvalues (L, cap).
// windows: (B, kFields) int64 rows (image, top, left, height, width, row_at, col_at);
// slots: (N,) each image's row in windows, -1 where it has none. One thread per element, grid-strided.
constexpr int kFields = 7;

// Guidance minus the target's own difference on one edge: the source's difference s minus the
// target's t where the edge touches the region, unless mixed gradients keep the target's
// strictly stronger difference; zero elsewhere.
template <typename T>
__device__ __forceinline__ T edge_correction(T s, T t, bool region, int mixed) {
    if (!region || (mixed && fabs(t) > fabs(s))) return T(0);
    return s - t;
}

template <typename T>
__global__ void direct_rhs(T* __restrict__ rhs, const T* __restrict__ target,
                           const T* __restrict__ source, const bool* __restrict__ region,
                           const long long* __restrict__ windows, int mixed, int channels,
                           int height, int width, int rows, int cols, long long count) {
    const long long plane = (long long)rows * cols;
    const long long pixels = (long long)height * width;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        const long long b = i / plane;
        const long long at = i - b * plane;
        const long long r = at / cols;
        const long long q = at - r * cols;
        const long long* w = windows + b * kFields;
        T* out = rhs + b * channels * plane + at;
        if (r >= w[3] - 2 || q >= w[4] - 2) {  // past this window's own interior
            for (int c = 0; c < channels; ++c) out[c * plane] = T(0);
            continue;
        }
        const long long p = (w[1] + r + 1) * width + (w[2] + q + 1);  // the unknown, in its image
        const bool* o = region + w[0] * pixels + p;
        const bool here = o[0];
        const bool left = here || o[-1], right = here || o[1];
        const bool up = here || o[-width], down = here || o[width];
        for (int c = 0; c < channels; ++c) {
            const long long base = (w[0] * channels + c) * pixels + p;
            const T* s = source + base;
            const T* t = target + base;
            T value = edge_correction(s[0] - s[-1], t[0] - t[-1], left, mixed) -
                      edge_correction(s[1] - s[0], t[1] - t[0], right, mixed);
            value += edge_correction(s[0] - s[-width], t[0] - t[-width], up, mixed);
            value -= edge_correction(s[width] - s[0], t[width] - t[0], down, mixed);
            out[c * plane] = value;
        }
    }
}

template <typename T>
__global__ void direct_dst_matrices(T* __restrict__ row_matrices, T* __restrict__ col_matrices,
                                    const T* __restrict__ table, const long long* __restrict__ windows,
                                    int cap, int rows, int cols, long long count) {
    const long long row_size = (long long)rows * rows;
    const long long per_window = row_size + (long long)cols * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        const long long b = i / per_window;
        long long e = i - b * per_window;
        const long long* w = windows + b * kFields;
        const bool row = e < row_size;  // else an element of the column matrix
        if (!row) e -= row_size;
        T* out = row ? row_matrices + b * row_size + e : col_matrices + b * (long long)cols * cols + e;
        const long long side = row ? rows : cols;
        const long long length = row ? w[3] - 2 : w[4] - 2;  // the window's own interior side
        const long long at = row ? w[5] : w[6];
        const long long u = e / side;
        const long long v = e - u * side;
        *out = (u < length && v < length) ? table[(at * cap + u) * cap + v] : T(0);
    }
}

template <typename T>
__global__ void direct_divide(T* __restrict__ coefficients, const T* __restrict__ eigenvalues,
                              const long long* __restrict__ windows, int channels, int cap, int rows,
                              int cols, long long count) {
    const long long plane = (long long)rows * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        const long long image_channel = i / plane;
        const long long at = i - image_channel * plane;
        const long long r = at / cols;
        const long long q = at - r * cols;
        const long long* w = windows + (image_channel / channels) * kFields;
        if (r >= w[3] - 2 || q >= w[4] - 2) continue;  // a zero of the padded transform
        const T sum = eigenvalues[w[5] * cap + r] + eigenvalues[w[6] * cap + q];
        coefficients[i] *= T(1) / sum;
    }
}

template <typename T>
__global__ void direct_write_back(T* __restrict__ out, const T* __restrict__ target,
                                  const T* __restrict__ correction, const bool* __restrict__ region,
                                  const long long* __restrict__ windows,
                                  const long long* __restrict__ slots, long long* __restrict__ outside,
                                  int channels, int height, int width, int rows, int cols,
                                  long long count) {
    const long long plane = (long long)rows * cols;
    const long long pixels = (long long)height * width;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        const long long n = i / pixels;
        const long long p = i - n * pixels;
        const long long y = p / width;
        const long long x = p - y * width;
        const long long slot = slots[n];
        long long d = -1;  // the pixel in its window's correction, if in the window's interior
        if (slot >= 0) {
            const long long* w = windows + slot * kFields;
            const long long r = y - w[1] - 1, q = x - w[2] - 1;
            if (r >= 0 && r < w[3] - 2 && q >= 0 && q < w[4] - 2)
                d = slot * channels * plane + r * cols + q;
        }
        for (int c = 0; c < channels; ++c) {
            const long long at = (n * channels + c) * pixels + p;
            out[at] = d < 0 ? target[at] : target[at] + correction[d + c * plane];
        }
        if (d < 0 && region[i] && y > 0 && y < height - 1 && x > 0 && x < width - 1)
            atomicAdd(reinterpret_cast<unsigned long long*>(outside + n), 1ULL);
    }
}
"""

_KERNEL_NAMES: tuple[str, ...] = ("direct_rhs", "direct_dst_matrices", "direct_divide", "direct_write_back")

CUDA_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "direct": (
        _DIRECT_KERNELS,
        tuple(f"{name}<{t}>" for name in _KERNEL_NAMES for t in ("float", "double")),
    )
}
"""Raw CUDA of this module: label -> (code, name expressions), see `dli.kernels.xp`."""

_THREADS = 256
_MAX_BLOCKS = 65535 * 16


def window_table(
    solved: np.ndarray, sides: np.ndarray, corners: np.ndarray, table_rows: np.ndarray, n: int
) -> np.ndarray:
    """The host int64 table the kernels read: (B, `WINDOW_FIELDS`) rows, then (N,) slots, flat.

    `solved` (B,) are the images with a window, `sides` and `corners` (N, 2) every image's window
    (`direct.direct_windows`), `table_rows` (B, 2) the DST table rows of each solved window's
    interior height and width.
    """
    rows = np.concatenate(
        [solved[:, None], corners[solved], sides[solved], np.asarray(table_rows).reshape(-1, 2)], axis=1
    )
    slots = np.full(n, -1, dtype=np.int64)
    slots[solved] = np.arange(len(solved))
    return np.concatenate([rows.astype(np.int64).ravel(), slots])


def split_table(table: Any, n: int) -> tuple[Any, Any]:
    """`window_table`'s flat array (on any device) as its (B, fields) windows and (N,) slots: views."""
    fields = len(WINDOW_FIELDS)
    count = (table.shape[0] - n) // fields
    return table[: count * fields].reshape(count, fields), table[count * fields :]


# ---------------------------------------------------------------------------------------------
# The steps: the kernel on the device, the twin on NumPy.


def build_rhs(
    xp: ModuleType, rhs: Any, target: Any, source: Any, region: Any, windows: Any, mixed: bool
) -> None:
    """Write the (B, C, m, k) right-hand sides of the windows into `rhs` (see the module docstring)."""
    _, channels, height, width = target.shape
    rows, cols = rhs.shape[-2:]
    count = rhs.shape[0] * rows * cols
    args = (rhs, target, source, region, windows, np.int32(mixed), np.int32(channels), np.int32(height))
    _run(xp, "direct_rhs", count, (*args, np.int32(width), np.int32(rows), np.int32(cols), np.int64(count)))


def gather_dst_matrices(
    xp: ModuleType, row_matrices: Any, col_matrices: Any, table: Any, windows: Any
) -> None:
    """Write each window's DST-I matrices, (B, m, m) and (B, k, k), from the (L, cap, cap) `table`."""
    rows, cols, cap = row_matrices.shape[-1], col_matrices.shape[-1], table.shape[-1]
    count = row_matrices.shape[0] * (rows * rows + cols * cols)
    args = (row_matrices, col_matrices, table, windows, np.int32(cap), np.int32(rows), np.int32(cols))
    _run(xp, "direct_dst_matrices", count, (*args, np.int64(count)))


def divide_by_eigenvalues(xp: ModuleType, coefficients: Any, eigenvalues: Any, windows: Any) -> None:
    """Divide (B, C, m, k) `coefficients` by each window's λ_i + λ_j, in place."""
    _, channels, rows, cols = coefficients.shape
    count = coefficients.size
    args = (coefficients, eigenvalues, windows, np.int32(channels), np.int32(eigenvalues.shape[-1]))
    _run(xp, "direct_divide", count, (*args, np.int32(rows), np.int32(cols), np.int64(count)))


def write_back(
    xp: ModuleType,
    out: Any,
    target: Any,
    correction: Any,
    region: Any,
    windows: Any,
    slots: Any,
    outside: Any,
) -> None:
    """Write the whole (N, C, H, W) `out`: target + correction inside the windows, the target
    elsewhere; add each image's region pixels outside its window's interior to (N,) int64 `outside`."""
    n, channels, height, width = target.shape
    rows, cols = correction.shape[-2:]
    count = n * height * width
    args = (out, target, correction, region, windows, slots, outside, np.int32(channels), np.int32(height))
    _run(
        xp,
        "direct_write_back",
        count,
        (*args, np.int32(width), np.int32(rows), np.int32(cols), np.int64(count)),
    )


def _run(xp: ModuleType, name: str, count: int, args: tuple[Any, ...]) -> None:
    """Launch kernel `name` over `count` threads on `xp`'s current stream, or run its twin on NumPy."""
    if xp is np:
        TWINS[name][0](*args)
        return
    if count == 0:
        return
    for a in args:
        if hasattr(a, "flags") and a.ndim and not a.flags.c_contiguous:
            raise ValueError(f"{name}: the kernels read C-contiguous arrays, got strides {a.strides}")
    device = xp.cuda.Device().id
    function = _function(xp, f"{name}<{cuda_scalar_type(args[0].dtype)}>", device)
    function((min(-(-count // _THREADS), _MAX_BLOCKS),), (_THREADS,), args)


@functools.cache
def _function(xp: Any, name: str, device: int) -> Any:
    """One kernel of `CUDA_SOURCES["direct"]`, compiled once per GPU (`xp`: cupy or a device model)."""
    code, _ = CUDA_SOURCES["direct"]
    module = xp.RawModule(code=code, options=CUDA_OPTIONS, name_expressions=[name])
    return module.get_function(name)


# ---------------------------------------------------------------------------------------------
# The twins: plain NumPy, one window at a time; the same arguments as the kernels.


def _windows(windows: np.ndarray) -> list[tuple[int, ...]]:
    return [tuple(row) for row in np.asarray(windows).tolist()]


def rhs_twin(
    rhs: np.ndarray,
    target: np.ndarray,
    source: np.ndarray,
    region: np.ndarray,
    windows: np.ndarray,
    mixed: Any,
    *_shape: Any,
) -> None:
    """`direct_rhs` in NumPy: the array path's own expressions (`direct._edge_corrections`,
    `direct._interior_rhs`) on each window in turn, written into its corner of `rhs`."""
    from dli.kernels.poisson.direct import _edge_corrections, _interior_rhs  # it imports this module

    rhs[...] = 0
    for b, (image, top, left, height, width, _, _) in enumerate(_windows(windows)):
        cut = (slice(image, image + 1), ..., slice(top, top + height), slice(left, left + width))
        dx, dy = _edge_corrections(np, target[cut], source[cut], region[cut], bool(mixed))
        rhs[b, :, : height - 2, : width - 2] = _interior_rhs(dx, dy)[0]


def dst_matrices_twin(
    row_matrices: np.ndarray, col_matrices: np.ndarray, table: np.ndarray, windows: np.ndarray, *_shape: Any
) -> None:
    """`direct_dst_matrices` in NumPy: each window's own block of its table rows, zero elsewhere."""
    row_matrices[...] = 0
    col_matrices[...] = 0
    for b, (*_, height, width, row_at, col_at) in enumerate(_windows(windows)):
        m, k = height - 2, width - 2
        row_matrices[b, :m, :m] = table[row_at, :m, :m]
        col_matrices[b, :k, :k] = table[col_at, :k, :k]


def divide_twin(coefficients: np.ndarray, eigenvalues: np.ndarray, windows: np.ndarray, *_shape: Any) -> None:
    """`direct_divide` in NumPy: each window's interior times 1 / (λ_i + λ_j)."""
    for b, (*_, height, width, row_at, col_at) in enumerate(_windows(windows)):
        m, k = height - 2, width - 2
        total = eigenvalues[row_at, :m, None] + eigenvalues[col_at, None, :k]
        coefficients[b, :, :m, :k] *= total.dtype.type(1) / total


def write_back_twin(
    out: np.ndarray,
    target: np.ndarray,
    correction: np.ndarray,
    region: np.ndarray,
    windows: np.ndarray,
    slots: np.ndarray,
    outside: np.ndarray,
    *_shape: Any,
) -> None:
    """`direct_write_back` in NumPy: copy the target, add each window's correction on its interior,
    and count the region pixels off the image border that no interior covers (`slots` is the
    kernel's lookup of the windows by image; the loop here needs none)."""
    out[...] = target
    missed = np.count_nonzero(region[:, 1:-1, 1:-1], axis=(1, 2))
    for b, (image, top, left, height, width, _, _) in enumerate(_windows(windows)):
        rows, cols = slice(top + 1, top + height - 1), slice(left + 1, left + width - 1)
        out[image, :, rows, cols] += correction[b, :, : height - 2, : width - 2]
        missed[image] -= np.count_nonzero(region[image, rows, cols])
    outside += missed


# ---------------------------------------------------------------------------------------------
# What each kernel reads and writes: each element it touches once (the device model's bytes).


def _window_sizes(windows: np.ndarray) -> np.ndarray:
    """(B, 2) window heights and widths."""
    return np.asarray(windows)[:, 3:5].astype(np.int64)


def rhs_bytes(
    rhs: np.ndarray, target: np.ndarray, source: np.ndarray, region: np.ndarray, windows: Any, *_: Any
) -> int:
    """Each window's pixels of target, source (every channel) and region read once; `rhs` written."""
    pixels = int(_window_sizes(windows).prod(axis=1).sum())
    channels = target.shape[1]
    return (
        pixels * (channels * (target.itemsize + source.itemsize) + region.itemsize)
        + rhs.nbytes
        + windows.nbytes
    )


def dst_matrices_bytes(
    row_matrices: np.ndarray, col_matrices: np.ndarray, table: np.ndarray, windows: Any, *_: Any
) -> int:
    """Each window's own table blocks read; both matrix arrays written."""
    interior = _window_sizes(windows) - 2
    read = int((interior**2).sum()) * table.itemsize
    return read + row_matrices.nbytes + col_matrices.nbytes + windows.nbytes


def divide_bytes(coefficients: np.ndarray, eigenvalues: np.ndarray, windows: Any, *_: Any) -> int:
    """Each window's interior coefficients read and written, and its eigenvalues read."""
    interior = _window_sizes(windows) - 2
    channels = coefficients.shape[1]
    moved = 2 * channels * int(interior.prod(axis=1).sum()) * coefficients.itemsize
    return moved + int(interior.sum()) * eigenvalues.itemsize + windows.nbytes


def write_back_bytes(
    out: np.ndarray,
    target: np.ndarray,
    correction: np.ndarray,
    region: np.ndarray,
    windows: Any,
    slots: np.ndarray,
    outside: np.ndarray,
    *_: Any,
) -> int:
    """Target read and `out` written whole, the region read, each window's interior correction read,
    the lookups read and the counts written."""
    interior = int((_window_sizes(windows) - 2).prod(axis=1).sum()) * target.shape[1] * correction.itemsize
    lookups = windows.nbytes + slots.nbytes + outside.nbytes
    return target.nbytes + out.nbytes + region.nbytes + interior + lookups


TWINS: dict[str, tuple[Callable[..., None], Callable[..., int]]] = {
    "direct_rhs": (rhs_twin, rhs_bytes),
    "direct_dst_matrices": (dst_matrices_twin, dst_matrices_bytes),
    "direct_divide": (divide_twin, divide_bytes),
    "direct_write_back": (write_back_twin, write_back_bytes),
}
"""Per kernel name: its NumPy twin (the kernel's arguments, results in place) and the bytes it moves."""
