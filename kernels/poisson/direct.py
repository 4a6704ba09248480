"""Poisson image editing by one direct sine-transform solve per window: no iteration.

Discrete problem, per image n and channel c, on a rectangular window W of the image (its
region's box widened by `margin` pixels and clipped to the image, or the whole image):

- unknowns: the pixels strictly inside W; W's own edge pixels are the Dirichlet boundary and
  keep the target's values;
- guidance on each edge (p, q) between 4-neighbours of W: the source's difference
  source_p - source_q when p or q lies in the region Ω (with `mixed_gradients`, the target's
  difference where its magnitude is strictly larger), else the target's own difference;
- for each unknown p: 4 f_p - Σ_{q ∈ N(p)} f_q = Σ_{q ∈ N(p)} v_pq.

Outside Ω the guidance is the target's, so the solution is written as f = target + d, where d
is zero on W's edge and solves the same 5-point Laplacian with a right-hand side that is
non-zero only next to Ω (the guidance minus the target's own differences). The Laplacian of a
rectangle with Dirichlet boundary is diagonalized by the orthonormal type-I DST, its own
inverse: d = S (S b S / λ) S with λ_ij = 4 - 2 cos(π i / (m + 1)) - 2 cos(π j / (k + 1)) for an
m x k interior. The whole window changes (by d, smooth away from Ω); outside W the output is the
target bit for bit. This is the reference implementation's blend (whole image, dilated mask,
mixed gradients) when the window is the image, and OpenCV's `seamlessClone` on a box.

A window depends on its own image only (box, margin, image size), never on the rest of the batch,
so an image blends the same alone or among 64. Window interiors are rounded up to lengths whose
DST-I is a fast FFT (m + 1 with no prime factor above 5) while that fits in the image.

Batching (the same windows and arithmetic, two layouts):
- ``shapes``: windows of equal shape form a bucket; each bucket is one `dstn` (type 1, both
  axes) forward and one back (`scipy.fft` / `cupyx.scipy.fft`). The CPU's layout: its cost
  follows the windows' pixels.
- ``padded``: every window of the batch in one array of the largest window's shape; each image's
  transform is a product with its own DST-I matrix, zero-padded to that shape, so one batched
  matrix product per side and direction solves every window exactly on its own size. The GPU's
  layout while windows are at most `DENSE_MAX_SIDE`: a fixed handful of launches per batch
  whatever the mix of window shapes (matrix products are cheap there; launches are not). The
  work between the products is four fused kernels (`dli.kernels.poisson.direct_cuda`: right-hand
  sides read from the batch in place, each window's DST-I matrices, the division by the
  eigenvalues, the write-back of the whole output), whose NumPy twins run this layout on the CPU:
  11 launches per one-channel batch, whatever its size.

No host synchronization when the caller passes the regions' boxes (host integers, as for the
CG in `dli.kernels.poisson.blend`): window placement is host arithmetic and the only device-to-host
copy is the report's, started behind the solve.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from dli.kernels.poisson import direct_cuda
from dli.kernels.poisson.blend import PoissonInfo
from dli.kernels.poisson.pcg import _fft_module
from dli.kernels.poisson.windows import Bucket, Transfers, fast_side, measured_boxes
from dli.kernels.xp import count_true

DIRECT_MARGIN = 4
"""Pixels between a region's box and its window's Dirichlet edge (`window="box"`)."""

WINDOWS: tuple[str, ...] = ("box", "image")
"""Window of each blend: the region's box widened by the margin, or the whole image."""

LAYOUTS: tuple[str, ...] = ("shapes", "padded")
"""How the windows of a batch are laid out for the transforms (see the module docstring)."""

DENSE_MAX_SIDE = 512
"""Largest window interior side the ``padded`` layout takes (by default, on the GPU). Its matrix
products cost 2·side flops per pixel and axis: 2 GFLOP per 256² image and channel for the four
products, well under a millisecond of an H100-class GPU for a batch of 64, against the launches of
one bucket per window shape."""


def direct_windows(
    boxes: np.ndarray, height: int, width: int, *, margin: int = DIRECT_MARGIN, window: str = "box"
) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the window's (height, width) (0 where nothing to solve) and its top-left corner.

    `boxes` are inclusive (top, left, bottom, right) pixel bounds of each region (empty where
    top > bottom). A region is blended only off the image border, as in the CG, so boxes are
    clipped to rows and columns 1..size-2 first. Each window side is the box's extent plus the
    margin on both sides, rounded up to a fast DST-I length while it fits in the image, else the
    whole image side; the window is centred on the box and shifted to lie inside the image.
    """
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    if margin < 1:
        raise ValueError(f"margin must be >= 1, got {margin}")
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    top, left = np.maximum(boxes[:, 0], 1), np.maximum(boxes[:, 1], 1)
    bottom, right = np.minimum(boxes[:, 2], height - 2), np.minimum(boxes[:, 3], width - 2)
    has = (top <= bottom) & (left <= right) & (height >= 3) & (width >= 3)
    size = np.array([height, width], dtype=np.int64)
    if window == "image":
        sides = np.where(has[:, None], size, 0)
        return sides, np.zeros_like(sides)
    low, high = np.stack([top, left], axis=1), np.stack([bottom, right], axis=1)
    need = high - low + 1 + 2 * margin
    sides = np.zeros_like(need)
    for axis in range(2):
        sides[:, axis] = [_fast_window_side(int(n), int(size[axis])) for n in need[:, axis]]
    sides = np.where(has[:, None], sides, 0)
    centred = low - margin - (sides - need) // 2
    corners = np.where(has[:, None], np.clip(centred, 0, size - sides), 0)
    return sides, corners


def _fast_window_side(need: int, limit: int) -> int:
    """The smallest side >= `need` whose interior's DST-I is a fast FFT, or `limit` if none fits.

    A DST-I of m points is an FFT of 2(m + 1) points: fast when m + 1 has no prime factor above 5.
    """
    side = fast_side(max(need, 3) - 1) + 1
    return side if side <= limit else limit


def direct_blend(
    xp: ModuleType,
    target: Any,
    source: Any,
    mask: Any,
    *,
    mixed_gradients: bool,
    boxes: np.ndarray | None,
    margin: int = DIRECT_MARGIN,
    window: str = "box",
    layout: str | None = None,
) -> tuple[Any, PoissonInfo]:
    """Blend (N, C, H, W) `source` into `target` over the (N, H, W) region `mask` (arrays of `xp`).

    Called by `dli.kernels.poisson.blend.poisson_blend(..., solver="direct")`, which checks and converts
    the inputs. `layout` None picks ``shapes`` on the CPU and ``padded`` on the GPU (``shapes``
    there too when a window side exceeds `DENSE_MAX_SIDE`). Returns the blend and its report:
    no iterations, every system marked converged, and the region pixels no window covered
    counted in `outside_box` (a box that missed part of its region).
    """
    n, c, h, w = target.shape
    dtype = target.dtype
    source = source.astype(dtype, copy=False)
    omega = mask.astype(bool, copy=False)
    if boxes is None:
        boxes = measured_boxes(omega)
    sides, corners = direct_windows(boxes, h, w, margin=margin, window=window)
    if layout is None:
        layout = "shapes" if xp is np or int(sides.max(initial=0)) - 2 > DENSE_MAX_SIDE else "padded"
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")

    transfers = Transfers(xp)
    solved = np.flatnonzero(sides[:, 0] > 0)
    blend = _Blend(target, source, omega, mixed_gradients)
    if solved.size and layout == "padded":
        blended, outside_box = _solve_padded(xp, transfers, (solved, sides, corners), blend)
    else:
        blended = target.copy()
        # Region pixels off the image border, less those inside a window's interior: what boxes missed.
        outside_box = count_true(omega[:, 1:-1, 1:-1], axis=(1, 2))
        for bucket in Bucket.group(transfers, sides, corners, h, w):
            inside = _solve_bucket(xp, transfers, bucket, blended, blend)
            outside_box[bucket.images] -= inside
    transfers.to_host(outside_box=outside_box)
    info = PoissonInfo.direct(transfers.fetch, n=n, channels=c, windows=sides)
    return blended, info


def _edge_corrections(xp: ModuleType, target: Any, source: Any, omega: Any, mixed: bool) -> tuple[Any, Any]:
    """Guidance minus the target's own differences, per edge of (B, C, h, w) windows.

    Returns (dx, dy) of shapes (B, C, h, w-1) and (B, C, h-1, w): zero on edges with neither end
    in Ω (B, h, w), and where mixed gradients keep the target's stronger difference.
    """
    zero = target.dtype.type(0)
    sx = source[..., :, 1:] - source[..., :, :-1]
    sy = source[..., 1:, :] - source[..., :-1, :]
    tx = target[..., :, 1:] - target[..., :, :-1]
    ty = target[..., 1:, :] - target[..., :-1, :]
    inside_x = (omega[:, :, 1:] | omega[:, :, :-1])[:, None]
    inside_y = (omega[:, 1:, :] | omega[:, :-1, :])[:, None]
    if mixed:
        inside_x = inside_x & ~(xp.abs(tx) > xp.abs(sx))
        inside_y = inside_y & ~(xp.abs(ty) > xp.abs(sy))
    return xp.where(inside_x, sx - tx, zero), xp.where(inside_y, sy - ty, zero)


def _interior_rhs(dx: Any, dy: Any) -> Any:
    """b_p = dx[left edge] - dx[right edge] + dy[upper edge] - dy[lower edge] at interior pixels."""
    rhs = dx[..., 1:-1, :-1] - dx[..., 1:-1, 1:]
    rhs += dy[..., :-1, 1:-1]
    rhs -= dy[..., 1:, 1:-1]
    return rhs


def _eigenvalues(m: int) -> np.ndarray:
    """The m eigenvalues 2 - 2 cos(π i / (m + 1)), i = 1..m, of the 1-D Dirichlet Laplacian (float64)."""
    return 2.0 - 2.0 * np.cos(np.pi * np.arange(1, m + 1) / (m + 1))


def _dst1_2d(xp: ModuleType, x: Any) -> Any:
    """The orthonormal type-I DST over the last two axes (its own inverse).

    NumPy: `scipy.fft.dstn`. CuPy 14's `cupyx.scipy.fft.dstn` has no type 1 (types 2 and 3
    only), so the device computes it from a real FFT of the odd extension (`_dst1_by_fft`).
    """
    if xp is np:
        return _fft_module(xp).dstn(x, type=1, axes=(-2, -1), norm="ortho", overwrite_x=True)
    return _dst1_by_fft(xp, _dst1_by_fft(xp, x, -1), -2)


def _dst1_by_fft(xp: ModuleType, x: Any, axis: int) -> Any:
    """Orthonormal DST-I of `x` along `axis`: for m points, the real FFT of the 2(m + 1)-point odd
    extension (0, x, 0, -reversed x) holds -2i Σ x_n sin(π (n + 1) k / (m + 1)) at k = 1..m."""
    moved = xp.moveaxis(x, axis, -1)
    m = moved.shape[-1]
    zero = xp.zeros((*moved.shape[:-1], 1), dtype=moved.dtype)
    extended = xp.concatenate([zero, moved, zero, -moved[..., ::-1]], axis=-1)
    spectrum = xp.fft.rfft(extended, axis=-1)[..., 1 : m + 1]
    out = (spectrum.imag * (-1.0 / np.sqrt(2.0 * (m + 1)))).astype(moved.dtype)
    return xp.moveaxis(out, -1, axis)


def _dst1_matrix(m: int) -> np.ndarray:
    """The orthonormal type-I DST of m points as an m x m float64 matrix (symmetric, its own inverse)."""
    import scipy.fft

    return scipy.fft.dst(np.eye(m), type=1, norm="ortho", axis=0)


@dataclass(frozen=True)
class _Blend:
    """One batch's blend: full-size (N, C, H, W) target and source, (N, H, W) bool region, and
    whether the guidance mixes gradients."""

    target: Any
    source: Any
    omega: Any
    mixed: bool


def _solve_bucket(xp: ModuleType, transfers: Transfers, bucket: Bucket, blended: Any, blend: _Blend) -> Any:
    """One window shape: crop, one forward and one inverse DST-I over the bucket, paste back.

    Returns the (B,) region pixels inside each window's interior.
    """
    target = blend.target
    target_w, source_w = bucket.crop(xp, target), bucket.crop(xp, blend.source)
    omega_w = bucket.crop(xp, blend.omega)
    dx, dy = _edge_corrections(xp, target_w, source_w, omega_w, blend.mixed)
    rhs = _interior_rhs(dx, dy)
    m, k = rhs.shape[-2:]
    inverse = transfers.to_device((1.0 / np.add.outer(_eigenvalues(m), _eigenvalues(k))).astype(target.dtype))
    coefficients = _dst1_2d(xp, rhs)
    coefficients *= inverse
    correction = _dst1_2d(xp, coefficients)
    target_w[..., 1:-1, 1:-1] += correction.astype(target.dtype, copy=False)
    bucket.paste(xp, blended, target_w)
    return count_true(omega_w[:, 1:-1, 1:-1], axis=(1, 2))


def _solve_padded(
    xp: ModuleType, transfers: Transfers, windows: tuple[np.ndarray, np.ndarray, np.ndarray], blend: _Blend
) -> tuple[Any, Any]:
    """Every window in one (B, C, m, k) array of the largest interior, each solved on its own size.

    `windows` holds the indices of the images that have a window and every image's window side
    and corner (`direct_windows`). The elementwise steps are `direct_cuda`'s fused kernels (their
    NumPy twins on the CPU), reading and writing the batch in place; the four transforms are
    batched matrix products with each image's own DST-I matrices, zero-padded to m and k, so each
    image is transformed on its own interior and the rest stays zero (the orthonormal DST-I matrix
    is symmetric and its own inverse). Returns the blend and the (N,) int64 region pixels off the
    image border that no window interior covers.
    """
    solved, sides, corners = windows
    target, omega = blend.target, blend.omega
    n, c, h, w = target.shape
    own = sides[solved]
    m, k = (int(v) for v in own.max(axis=0) - 2)
    table = _DstTable.of(transfers, max(h, w) - 2, target.dtype, own - 2)
    rows_at = np.stack([table.rows_of(own[:, 0] - 2), table.rows_of(own[:, 1] - 2)], axis=1)
    on_device = transfers.to_device(direct_cuda.window_table(solved, sides, corners, rows_at, n))
    per_window, slots = direct_cuda.split_table(on_device, n)
    target, source, omega = (xp.ascontiguousarray(a) for a in (target, blend.source, omega))

    rhs = xp.empty((len(solved), c, m, k), dtype=target.dtype)
    direct_cuda.build_rhs(xp, rhs, target, source, omega, per_window, blend.mixed)
    s_rows = xp.empty((len(solved), m, m), dtype=target.dtype)
    s_cols = xp.empty((len(solved), k, k), dtype=target.dtype)
    direct_cuda.gather_dst_matrices(xp, s_rows, s_cols, table.matrices, per_window)
    s_rows, s_cols = s_rows[:, None], s_cols[:, None]  # over the channels
    coefficients = xp.ascontiguousarray(s_rows @ rhs @ s_cols)  # products come out contiguous: no copy
    direct_cuda.divide_by_eigenvalues(xp, coefficients, table.eigenvalues, per_window)
    correction = xp.ascontiguousarray(s_rows @ coefficients @ s_cols)
    blended = xp.empty_like(target)
    outside_box = xp.zeros(n, dtype=np.int64)
    direct_cuda.write_back(xp, blended, target, correction, omega, per_window, slots, outside_box)
    return blended, outside_box


@dataclass
class _DstTable:
    """Orthonormal DST-I matrices and eigenvalues of the interior lengths met so far, on one device.

    `matrices` (L, cap, cap) and `eigenvalues` (L, cap) hold length `lengths[i]` in row i, zero
    (eigenvalues: +inf) past it; the ``padded`` layout's kernels read each image's rows from them
    (`direct_cuda.gather_dst_matrices`, `divide_by_eigenvalues`) instead of building them per
    batch. Made on the host in float64 and copied once with every fast length up to `cap`
    (`_fast_window_side`'s: about 50 up to 254, 13 MB in float32) and the lengths asked for, so
    training never rebuilds it; a batch with a length outside those (an image side that is not
    fast) rebuilds it once.
    """

    cap: int
    lengths: list[int]
    matrices: Any
    eigenvalues: Any

    @staticmethod
    def of(transfers: Transfers, cap: int, dtype: Any, needed: np.ndarray) -> _DstTable:
        xp = transfers.xp
        device = None if xp is np else xp.cuda.Device().id
        key = (cap, np.dtype(dtype).str, device)
        table = _DST_TABLES.get(key)
        wanted = {int(v) for v in np.unique(needed)}
        if table is None or not wanted <= set(table.lengths):
            fast = {m for m in range(1, cap + 1) if m + 1 >= 3 and fast_side(m + 1) == m + 1}
            lengths = sorted(wanted | fast | set(table.lengths if table else ()))
            matrices = np.zeros((len(lengths), cap, cap))
            eigenvalues = np.full((len(lengths), cap), np.inf)
            for row, m in enumerate(lengths):
                matrices[row, :m, :m] = _dst1_matrix(m)
                eigenvalues[row, :m] = _eigenvalues(m)
            table = _DstTable(
                cap,
                lengths,
                transfers.to_device(matrices.astype(dtype)),
                transfers.to_device(eigenvalues.astype(dtype)),
            )
            _DST_TABLES[key] = table
        return table

    def rows_of(self, lengths: np.ndarray) -> np.ndarray:
        """The table rows of interior `lengths` (host ints)."""
        return np.searchsorted(np.asarray(self.lengths), lengths)


_DST_TABLES: dict[tuple[Any, ...], _DstTable] = {}
"""Transform tables on their devices, by (interior cap, dtype, device)."""
