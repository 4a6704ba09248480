"""Poisson image editing (Pérez et al. 2003) for a batch: every image and channel solved at once.

Discrete problem, per image n and channel c. The region Ω is the set of mask pixels that are not
on the image border (border pixels have a missing neighbour, so they stay fixed to the target).
For p in Ω with 4-neighbours N(p):

    4 f_p - Σ_{q ∈ N(p) ∩ Ω} f_q = Σ_{q ∈ N(p) \\ Ω} target_q + Σ_{q ∈ N(p)} v_pq,

with the guidance v_pq = source_p - source_q (with `mixed_gradients`, per edge the one of the
source and target differences with the larger magnitude). Outside Ω the output is the target,
bit for bit. The output is not clipped: a blend may leave the input's value range.

Solver. A matrix-free conjugate gradient over all N x C systems in lockstep: the 5-point
stencil is one array operation (one kernel launch on the GPU) for the whole batch, dot products
reduce over (H, W) per system, and each system freezes once its relative residual
||b - A f|| / ||b|| reaches `tol`. SciPy's and CuPy's CG solve one system at a time from an
explicit sparse matrix, so a batch would cost N x C solver loops; hence this one is written here.
The Laplacian's diagonal is constant, so Jacobi preconditioning would change nothing and none is
used.

Work is cut to the region: every system is solved on a window of the same size (the largest
bounding box of Ω in the batch plus a one-pixel ring) placed over its own region, so small
defects do not pay for the whole image.

Starting guess (default): the source shifted per system by the mean of (target - source) on the
ring of pixels around Ω. The solution differs from the source mostly by such a smooth offset, so
CG starts far closer than from zero (`bench/poisson.py` measures the iterations saved).

Iteration bound (default `max_iter`): CG on the Dirichlet 5-point Laplacian of a region whose
bounding box has largest side L has condition number κ ≈ (2(L+1)/π)², and reduces the residual
by `tol` within about (√κ/2)·ln(2√κ/tol) iterations. The default is that bound for the largest
region in the batch (`default_max_iter`: 1414 for L = 254 at tol 1e-5, where a full 256² region
needs about 300-450 in practice); a system that has not converged by then is reported in
`PoissonInfo` and with a `PoissonConvergenceWarning`, never hidden.

GPU. The same loop runs on CuPy arrays. Each CG step is four fused raw kernels: stencil with the
p·Ap reduction, the x/r update with the r·r reduction, the p update, and the per-system
bookkeeping; blocks of frozen systems return at once, so converged images stop costing memory
traffic. The host checks for "all converged" only every `GPU_CHECK_EVERY` steps; per-system
activity flags stay on the device.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from dli.kernels.xp import (
    CUDA_OPTIONS,
    any_tensor,
    array_module,
    as_array,
    as_tensor,
    cuda_scalar_type,
    device_of,
    on_torch_stream,
    to_host,
)

GPU_CHECK_EVERY = 8
"""CG steps between host checks for "every system converged" on the GPU (each check syncs)."""

USE_FUSED_CUDA_KERNELS = True
"""Run CG steps on CuPy through the fused raw kernels (False: the plain array expressions)."""


class PoissonConvergenceWarning(RuntimeWarning):
    """Some systems of a Poisson blend stopped at `max_iter` above the tolerance."""


@dataclass(frozen=True)
class PoissonInfo:
    """How the conjugate-gradient solve of one batch went, per image and channel.

    Attributes:
        iterations: (N, C) int CG iterations each system ran before it froze.
        residuals: (N, C) final relative residual ||b - A f|| / ||b|| of each system, recomputed
            from the returned solution (0 for a system with an empty region). In float32 it
            levels off near 1e-5 from rounding, so it can sit a little above a tight `tol`.
        converged: (N, C) bool, whether the CG recurrence reached `tol` within `max_iter`.
        steps: CG steps the batch ran (the slowest system, rounded up to a host check on the GPU).
        window: (height, width) of the per-system window the solve ran on.
        tol: the requested relative tolerance.
        max_iter: the iteration bound that applied.
        traffic_bytes: memory the CG steps read and wrote, counted from the implementation that
            ran (`words_per_pixel_step` of its step class): the numerator of a bandwidth floor.
    """

    iterations: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    steps: int
    window: tuple[int, int]
    tol: float
    max_iter: int
    traffic_bytes: int = 0

    @property
    def all_converged(self) -> bool:
        """Whether every system reached the tolerance."""
        return bool(self.converged.all())

    def summary(self) -> str:
        """One line: how many systems converged, iterations, worst residual."""
        count = self.converged.size
        iterations = self.iterations if self.iterations.size else np.zeros(1, dtype=int)
        worst = float(self.residuals.max()) if self.residuals.size else 0.0
        return (
            f"{int(self.converged.sum())}/{count} systems converged "
            f"(tol {self.tol:g}, max_iter {self.max_iter}); "
            f"iterations median {float(np.median(iterations)):g}, max {int(iterations.max())}; "
            f"worst residual {worst:.3g}; window {self.window[0]}x{self.window[1]}, {self.steps} steps"
        )


def default_max_iter(extent: int, tol: float) -> int:
    """The CG iteration bound for a region whose bounding box has largest side `extent` (+10)."""
    sqrt_kappa = 2.0 * (extent + 1) / math.pi
    return math.ceil(0.5 * sqrt_kappa * math.log(2.0 * sqrt_kappa / tol)) + 10


@on_torch_stream
def guidance_field(target: Any, source: Any, *, mixed_gradients: bool = False) -> tuple[Any, Any]:
    """Guidance on the edges between neighbouring pixels, as forward differences of (..., H, W) images.

    Returns (gx, gy) of shapes (..., H, W-1) and (..., H-1, W): gx[..., h, w] = s[h, w+1] - s[h, w]
    and gy[..., h, w] = s[h+1, w] - s[h, w], so v_pq = -gx for q right of p. With
    `mixed_gradients`, each edge takes the target's difference where its magnitude is strictly larger.
    """
    xp = array_module(target, source)
    gx = source[..., :, 1:] - source[..., :, :-1]
    gy = source[..., 1:, :] - source[..., :-1, :]
    if mixed_gradients:
        tx = target[..., :, 1:] - target[..., :, :-1]
        ty = target[..., 1:, :] - target[..., :-1, :]
        gx = xp.where(xp.abs(tx) > xp.abs(gx), tx, gx)
        gy = xp.where(xp.abs(ty) > xp.abs(gy), ty, gy)
    return gx, gy


@on_torch_stream
def poisson_blend(
    target: Any,
    source: Any,
    mask: Any,
    *,
    mixed_gradients: bool = False,
    tol: float = 1e-5,
    max_iter: int | None = None,
    x0: Any = None,
) -> tuple[Any, PoissonInfo]:
    """Seamlessly clone `source` into `target` over `mask` (see the module docstring for the problem).

    Args:
        target, source: (N, C, H, W) float32 or float64 images (NumPy, CuPy or torch; same kind).
        mask: (N, H, W) bool or 0/1 region to clone; pixels on the image border are never changed.
        mixed_gradients: per edge, keep the stronger of the source and target gradients.
        tol: relative residual at which a system stops.
        max_iter: CG iteration bound; default `default_max_iter` of the largest region's extent.
        x0: starting guess: None for the boundary-matched source, "zeros", or an (N, C, H, W) array.

    Returns:
        The blended images (same type, device and dtype as `target`) and a `PoissonInfo`.
    """
    torch_in = any_tensor(target, source, mask, x0)
    target, source, mask = as_array(target), as_array(source), as_array(mask)
    if x0 is not None and not isinstance(x0, str):
        x0 = as_array(x0)
        if x0.shape != target.shape:
            raise ValueError(f"x0 must have the images' shape {target.shape}, got {x0.shape}")
    _check_inputs(target, source, mask, tol, max_iter)
    xp = array_module(target, source, mask)
    with device_of(target):
        target, source, mask = xp.asarray(target), xp.asarray(source), xp.asarray(mask)
        x0 = x0 if x0 is None or isinstance(x0, str) else xp.asarray(x0)
        blended, info = _blend(xp, target, source, mask, mixed_gradients, tol, max_iter, x0)
    if not info.all_converged:
        warnings.warn(
            f"Poisson blend did not converge: {info.summary()}", PoissonConvergenceWarning, stacklevel=2
        )
    return (as_tensor(blended) if torch_in else blended), info


def _check_inputs(target: Any, source: Any, mask: Any, tol: float, max_iter: int | None) -> None:
    if target.ndim != 4 or source.shape != target.shape:
        raise ValueError(
            f"target and source must both be (N, C, H, W); got {target.shape} and {source.shape}"
        )
    n, _, h, w = target.shape
    if mask.shape != (n, h, w):
        raise ValueError(f"mask must be (N, H, W) = {(n, h, w)}, got {mask.shape}")
    if target.dtype not in (np.float32, np.float64):
        raise ValueError(f"target must be float32 or float64, got {target.dtype}")
    if not 0.0 < tol < 1.0:
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    if max_iter is not None and max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")


def _blend(
    xp: ModuleType,
    target: Any,
    source: Any,
    mask: Any,
    mixed_gradients: bool,
    tol: float,
    max_iter: int | None,
    x0: Any,
) -> tuple[Any, PoissonInfo]:
    n, c = target.shape[:2]
    dtype = target.dtype
    source = source.astype(dtype, copy=False)
    omega = mask.astype(bool)  # a copy: the caller's mask is never modified
    omega[:, [0, -1], :] = False
    omega[:, :, [0, -1]] = False

    window = _Window.around(xp, omega)
    if window is None:  # nothing to solve anywhere in the batch
        bound = 0 if max_iter is None else max_iter
        zeros = np.zeros((n, c))
        return target.copy(), PoissonInfo(
            zeros.astype(int), zeros, np.ones((n, c), bool), 0, (0, 0), tol, bound
        )
    if max_iter is None:
        max_iter = default_max_iter(max(window.height, window.width) - 2, tol)

    omega_w = window.crop_mask(omega)
    target_w = window.crop(target)
    source_w = window.crop(source)
    rhs = _right_hand_side(xp, target_w, source_w, omega_w, mixed_gradients)
    start = _starting_guess(xp, target_w, source_w, omega_w, x0, window)

    fused = USE_FUSED_CUDA_KERNELS and xp is not np
    ops = _FusedCudaSteps(xp, omega_w) if fused else _ArraySteps(xp, omega_w)
    solution, state, steps, work = _conjugate_gradient(
        ops, rhs, start, tol, max_iter, check_every=GPU_CHECK_EVERY if xp is not np else 1
    )
    residuals = _true_residuals(ops, rhs, solution, state.scale)
    iterations = to_host(state.iterations).astype(int)
    bytes_per_pixel = ops.words_per_pixel_step * dtype.itemsize + 1

    blended = target.copy()
    window.paste(blended, xp.where(omega_w[:, None], solution, target_w))
    info = PoissonInfo(
        iterations=iterations,
        residuals=to_host(residuals).astype(float),
        converged=~to_host(state.active),
        steps=steps,
        window=(window.height, window.width),
        tol=tol,
        max_iter=max_iter,
        traffic_bytes=bytes_per_pixel * window.height * window.width * work,
    )
    return blended, info


@dataclass(frozen=True)
class _Window:
    """Same-size windows, one per image, each covering its region Ω plus a one-pixel ring.

    Ω never touches the window's edge, so the stencil needs no bounds checks inside a window.
    """

    rows: Any  # (N, height) row indices into the image, on the array's device
    cols: Any  # (N, width) column indices
    height: int
    width: int

    @staticmethod
    def around(xp: ModuleType, omega: Any) -> _Window | None:
        _, h, w = omega.shape
        row_any, col_any = omega.any(axis=2), omega.any(axis=1)
        bounds = xp.stack(
            [
                row_any.any(axis=1),
                xp.argmax(row_any, axis=1),
                h - 1 - xp.argmax(row_any[:, ::-1], axis=1),
                xp.argmax(col_any, axis=1),
                w - 1 - xp.argmax(col_any[:, ::-1], axis=1),
            ]
        )
        has, top, bottom, left, right = to_host(bounds).astype(np.int64)  # the one host sync of the setup
        has = has.astype(bool)
        if not has.any():
            return None
        # Ω lies in rows 1..h-2, so extent + 2 <= h and the window always fits in the image.
        height = int((bottom - top + 3)[has].max())
        width = int((right - left + 3)[has].max())
        row0 = np.where(has, np.minimum(top - 1, h - height), 0)
        col0 = np.where(has, np.minimum(left - 1, w - width), 0)
        rows = xp.asarray(row0[:, None] + np.arange(height))
        cols = xp.asarray(col0[:, None] + np.arange(width))
        return _Window(rows, cols, height, width)

    def _index(self) -> tuple[Any, Any, Any]:
        xp = array_module(self.rows)
        n = self.rows.shape[0]
        return xp.arange(n)[:, None, None], self.rows[:, :, None], self.cols[:, None, :]

    def crop_mask(self, mask: Any) -> Any:
        """(N, H, W) -> (N, height, width)."""
        return mask[self._index()]

    def crop(self, images: Any) -> Any:
        """(N, C, H, W) -> contiguous (N, C, height, width)."""
        xp = array_module(images)
        return xp.ascontiguousarray(images.transpose(0, 2, 3, 1)[self._index()].transpose(0, 3, 1, 2))

    def paste(self, images: Any, windows: Any) -> None:
        """Write (N, C, height, width) windows back into (N, C, H, W) `images` in place."""
        images.transpose(0, 2, 3, 1)[self._index()] = windows.transpose(0, 2, 3, 1)


def _right_hand_side(xp: ModuleType, target: Any, source: Any, omega: Any, mixed_gradients: bool) -> Any:
    """b_p = Σ_{q ∉ Ω} target_q + Σ_q v_pq on Ω, zero elsewhere (windows, Ω off the window edge)."""
    gx, gy = guidance_field(target, source, mixed_gradients=mixed_gradients)
    outside = xp.where(omega[:, None], target.dtype.type(0), target)
    rhs = xp.zeros_like(target)
    inner = rhs[..., 1:-1, 1:-1]
    inner += gx[..., 1:-1, :-1] - gx[..., 1:-1, 1:] + gy[..., :-1, 1:-1] - gy[..., 1:, 1:-1]
    inner += (
        outside[..., :-2, 1:-1] + outside[..., 2:, 1:-1] + outside[..., 1:-1, :-2] + outside[..., 1:-1, 2:]
    )
    inner *= omega[:, None, 1:-1, 1:-1]
    return rhs


def _ring(xp: ModuleType, omega: Any) -> Any:
    """Pixels outside Ω with a 4-neighbour in Ω (the Dirichlet boundary ∂Ω)."""
    ring = xp.zeros_like(omega)
    ring[:, 1:, :] |= omega[:, :-1, :]
    ring[:, :-1, :] |= omega[:, 1:, :]
    ring[:, :, 1:] |= omega[:, :, :-1]
    ring[:, :, :-1] |= omega[:, :, 1:]
    return ring & ~omega


def _starting_guess(xp: ModuleType, target: Any, source: Any, omega: Any, x0: Any, window: _Window) -> Any:
    """The CG start on the windows, zero outside Ω; `x0` is None, "zeros" or a full-size array."""
    zero = target.dtype.type(0)
    if x0 is None:
        ring = _ring(xp, omega)[:, None]
        count = xp.maximum(ring.sum(axis=(2, 3)), 1)
        offset = (xp.where(ring, target - source, zero).sum(axis=(2, 3)) / count).astype(target.dtype)
        start = source + offset[..., None, None]
    elif isinstance(x0, str):
        if x0 != "zeros":
            raise ValueError(f'x0 must be None, "zeros" or an (N, C, H, W) array, got {x0!r}')
        return xp.zeros_like(target)
    else:
        start = window.crop(x0.astype(target.dtype, copy=False))
    return xp.where(omega[:, None], start, zero)


@dataclass
class _CGState:
    """Per-system scalars of the batched CG, all (N, C) arrays on the solve's device."""

    rr: Any  # r·r of the current residual
    scale: Any  # ||b||², or ||r0||² when b = 0: the residual is relative to this
    active: Any  # bool: still iterating
    iterations: Any  # int32: iterations run while active
    tol2: float


class _ArraySteps:
    """CG steps as plain array expressions: the NumPy twin (also valid, unfused, on CuPy).

    Memory traffic per pixel and system of one step, counted from the expressions below in array
    elements read + written: stencil 16, p·Ap 4, x/r update 10, r·r 4, p update 5 (plus one byte of Ω).
    """

    words_per_pixel_step = 39
    skips_frozen_systems = False

    def __init__(self, xp: ModuleType, omega: Any) -> None:
        self.xp = xp
        self.omega = omega
        self._omega_inner = omega[:, None, 1:-1, 1:-1]

    def apply(self, u: Any, out: Any) -> Any:
        """out = A u: the 5-point Laplacian on Ω (u and out zero outside Ω, out's edge stays zero)."""
        inner = out[..., 1:-1, 1:-1]
        self.xp.multiply(u[..., 1:-1, 1:-1], 4, out=inner)
        inner -= u[..., :-2, 1:-1]
        inner -= u[..., 2:, 1:-1]
        inner -= u[..., 1:-1, :-2]
        inner -= u[..., 1:-1, 2:]
        inner *= self._omega_inner
        return out

    @staticmethod
    def dot(a: Any, b: Any) -> Any:
        """Per-system dot products of (N, C, H, W) arrays: (N, C)."""
        return (a * b).sum(axis=(2, 3))

    def bind(self, state: _CGState, shape: tuple[int, ...], dtype: Any) -> None:
        """Prepare for steps on arrays of `shape` with `state` (nothing to prepare here)."""

    def restricted(self, images: Any) -> _ArraySteps:
        """The same steps for a subset of the images (a bool or index selection)."""
        return type(self)(self.xp, self.omega[images])

    def step(self, x: Any, r: Any, p: Any, ap: Any, state: _CGState) -> None:
        """One CG step for every active system; frozen systems keep x and r unchanged."""
        xp, active = self.xp, state.active
        p_ap = self.dot(p, self.apply(p, ap))
        ok = active & (p_ap > 0)
        alpha = xp.where(ok, state.rr / xp.where(ok, p_ap, 1), 0)[..., None, None]
        x += alpha * p
        r -= alpha * ap
        rr_new = self.dot(r, r)
        ok = active & (state.rr > 0)
        beta = xp.where(ok, rr_new / xp.where(ok, state.rr, 1), 0)[..., None, None]
        p *= beta
        p += r
        state.iterations += active
        state.rr = xp.where(active, rr_new, state.rr)
        state.active = active & ~(rr_new <= state.tol2 * state.scale)


_CG_KERNELS = r"""
// Batched CG steps. Arrays are contiguous (systems, pixels) with systems = N*C and pixels = H*W of
// the window; omega is (N, pixels). Grid: x = system, y = blocks over its pixels (grid-stride).
// Values outside omega are zero in x, r, p, ap, and omega never touches the window's edge,
// so the stencil reads its four neighbours without bounds checks.

template <typename T>
__device__ __forceinline__ T block_sum(T value) {
    __shared__ T partial[32];
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = value;
    __syncthreads();
    value = threadIdx.x < (blockDim.x >> 5) ? partial[lane] : T(0);
    if (warp == 0) {
        for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    return value;  // valid in thread 0
}

// ap = A p on omega, and p_ap[s] += p . ap
template <typename T>
__global__ void cg_stencil_dot(const T* __restrict__ p, const unsigned char* __restrict__ omega,
                               T* __restrict__ ap, T* __restrict__ p_ap,
                               const unsigned char* __restrict__ active,
                               int channels, int width, long long pixels) {
    const long long s = blockIdx.x;
    if (!active[s]) return;
    const T* ps = p + s * pixels;
    T* aps = ap + s * pixels;
    const unsigned char* om = omega + (s / channels) * pixels;
    T acc = T(0);
    for (long long j = (long long)blockIdx.y * blockDim.x + threadIdx.x; j < pixels;
         j += (long long)gridDim.y * blockDim.x) {
        T value = T(0);
        if (om[j]) {
            const T center = ps[j];
            value = T(4) * center - ps[j - 1] - ps[j + 1] - ps[j - width] - ps[j + width];
            acc += center * value;
        }
        aps[j] = value;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) atomicAdd(p_ap + s, acc);
}

// x += alpha p, r -= alpha ap with alpha = rr / p_ap, and rr_new[s] += r . r
template <typename T>
__global__ void cg_update_xr(T* __restrict__ x, T* __restrict__ r, const T* __restrict__ p,
                             const T* __restrict__ ap, const T* __restrict__ rr,
                             const T* __restrict__ p_ap, T* __restrict__ rr_new,
                             const unsigned char* __restrict__ active, long long pixels) {
    const long long s = blockIdx.x;
    if (!active[s]) return;
    const T alpha = p_ap[s] > T(0) ? rr[s] / p_ap[s] : T(0);
    const long long offset = s * pixels;
    T acc = T(0);
    for (long long j = (long long)blockIdx.y * blockDim.x + threadIdx.x; j < pixels;
         j += (long long)gridDim.y * blockDim.x) {
        x[offset + j] += alpha * p[offset + j];
        const T residual = r[offset + j] - alpha * ap[offset + j];
        r[offset + j] = residual;
        acc += residual * residual;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) atomicAdd(rr_new + s, acc);
}

// p = r + beta p with beta = rr_new / rr
template <typename T>
__global__ void cg_update_p(T* __restrict__ p, const T* __restrict__ r, const T* __restrict__ rr,
                            const T* __restrict__ rr_new, const unsigned char* __restrict__ active,
                            long long pixels) {
    const long long s = blockIdx.x;
    if (!active[s]) return;
    const T beta = rr[s] > T(0) ? rr_new[s] / rr[s] : T(0);
    const long long offset = s * pixels;
    for (long long j = (long long)blockIdx.y * blockDim.x + threadIdx.x; j < pixels;
         j += (long long)gridDim.y * blockDim.x) {
        p[offset + j] = r[offset + j] + beta * p[offset + j];
    }
}

// Per system: count the step, keep rr_new, freeze on convergence, clear the accumulators.
template <typename T>
__global__ void cg_advance(T* __restrict__ rr, T* __restrict__ rr_new, T* __restrict__ p_ap,
                           const T* __restrict__ scale, unsigned char* __restrict__ active,
                           int* __restrict__ iterations, T tol2, int systems) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= systems) return;
    if (active[s]) {
        iterations[s] += 1;
        rr[s] = rr_new[s];
        if (rr_new[s] <= tol2 * scale[s]) active[s] = 0;
    }
    rr_new[s] = T(0);
    p_ap[s] = T(0);
}
"""

_CG_KERNEL_NAMES = ("cg_stencil_dot", "cg_update_xr", "cg_update_p", "cg_advance")

CUDA_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "cg": (
        _CG_KERNELS,
        tuple(f"{name}<{scalar}>" for scalar in ("float", "double") for name in _CG_KERNEL_NAMES),
    )
}
"""Raw CUDA of this module: label -> (code, name expressions), see `dli.kernels.xp`."""


@functools.cache
def _cg_kernels(scalar: str, device: int) -> dict[str, Any]:
    """The four CG kernels for `scalar` ("float" or "double"), loaded once per GPU."""
    import cupy

    names = [f"{name}<{scalar}>" for name in _CG_KERNEL_NAMES]
    module = cupy.RawModule(code=CUDA_SOURCES["cg"][0], options=CUDA_OPTIONS, name_expressions=names)
    return {name: module.get_function(f"{name}<{scalar}>") for name in _CG_KERNEL_NAMES}


class _FusedCudaSteps(_ArraySteps):
    """CG steps as four fused CUDA kernels; blocks of frozen systems return at once.

    Memory traffic per pixel and system of one step, in array elements read + written:
    stencil with p·Ap 2 (p read once, its neighbours come from cache; Ap written), x/r update with
    r·r 6 (x, r, p, Ap read; x, r written), p update 3 (r, p read; p written), plus one byte of Ω.
    """

    words_per_pixel_step = 11
    skips_frozen_systems = True
    threads = 256
    pixels_per_thread = 4

    def step(self, x: Any, r: Any, p: Any, ap: Any, state: _CGState) -> None:
        systems, pixels = self._systems, self._pixels
        kernels, grid, block, active = self._kernels, self._grid, (self.threads,), state.active
        kernels["cg_stencil_dot"](
            grid, block, (p, self._omega_u8, ap, self._p_ap, active, self._channels, self._width, pixels)
        )
        kernels["cg_update_xr"](
            grid, block, (x, r, p, ap, state.rr, self._p_ap, self._rr_new, active, pixels)
        )
        kernels["cg_update_p"](grid, block, (p, r, state.rr, self._rr_new, active, pixels))
        kernels["cg_advance"](
            ((systems + self.threads - 1) // self.threads,),
            block,
            (
                state.rr,
                self._rr_new,
                self._p_ap,
                state.scale,
                active,
                state.iterations,
                self._tol2,
                np.int32(systems),
            ),
        )

    def bind(self, state: _CGState, shape: tuple[int, ...], dtype: Any) -> None:
        import cupy

        n, c, h, w = shape
        self._kernels = _cg_kernels(cuda_scalar_type(dtype), cupy.cuda.Device().id)
        self._systems, self._channels, self._width = n * c, np.int32(c), np.int32(w)
        self._pixels = np.int64(h * w)
        blocks = -(-(h * w) // (self.threads * self.pixels_per_thread))
        self._grid = (n * c, min(blocks, 65535))
        self._omega_u8 = cupy.ascontiguousarray(self.omega).view(cupy.uint8)
        self._p_ap = cupy.zeros((n, c), dtype)
        self._rr_new = cupy.zeros((n, c), dtype)
        self._tol2 = dtype.type(state.tol2)
        # The kernels update these in place: they must be contiguous and of the kernels' types.
        state.rr = cupy.ascontiguousarray(state.rr, dtype=dtype)
        state.scale = cupy.ascontiguousarray(state.scale, dtype=dtype)
        state.active = cupy.ascontiguousarray(state.active, dtype=cupy.bool_)
        state.iterations = cupy.ascontiguousarray(state.iterations, dtype=cupy.int32)


def _conjugate_gradient(
    ops: _ArraySteps, rhs: Any, start: Any, tol: float, max_iter: int, *, check_every: int
) -> tuple[Any, _CGState, int, int]:
    """Batched CG on A f = rhs from `start`.

    Returns the solution, the final per-system state, the steps run, and the work done in
    system-steps (one system through one step), which sets the memory traffic.

    Without frozen-system skipping (the array twin), images whose systems have all converged are
    dropped from the working arrays once they are half of them, so they stop costing work.
    """
    xp = ops.xp
    x = start.copy()
    ap = xp.zeros_like(rhs)
    r = rhs - ops.apply(x, ap)
    p = r.copy()
    rr = ops.dot(r, r)
    bb = ops.dot(rhs, rhs)
    scale = xp.where(bb > 0, bb, rr)
    tol2 = tol * tol
    state = _CGState(
        rr=rr,
        scale=scale,
        active=~(rr <= tol2 * scale),
        iterations=xp.zeros(rr.shape, dtype=np.int32),
        tol2=tol2,
    )
    ops.bind(state, rhs.shape, rhs.dtype)
    solution, final = x, state  # full-size results; x and state become subsets once images drop out
    live = xp.arange(rhs.shape[0])  # the images in the working arrays
    steps = work = 0
    while steps < max_iter:
        if steps % check_every == 0:
            alive = state.active.any(axis=1)
            if not bool(alive.any()):
                break
            if not ops.skips_frozen_systems and 2 * int(alive.sum()) <= alive.size:
                _record(solution, final, live, x, state)
                live, x, r, p, ap = live[alive], x[alive], r[alive], p[alive], ap[alive]
                state = _CGState(
                    state.rr[alive], state.scale[alive], state.active[alive], state.iterations[alive], tol2
                )
                ops = ops.restricted(alive)
        ops.step(x, r, p, ap, state)
        steps += 1
        work += x.shape[0] * x.shape[1]
    _record(solution, final, live, x, state)
    if ops.skips_frozen_systems:  # only systems still active were touched
        work = int(final.iterations.sum())
    return solution, final, steps, work


def _record(solution: Any, final: _CGState, live: Any, x: Any, state: _CGState) -> None:
    """Copy the working subset's solution and per-system results into the full-size ones."""
    if x is not solution:
        solution[live] = x
        final.active[live] = state.active
        final.iterations[live] = state.iterations


def _true_residuals(ops: _ArraySteps, rhs: Any, solution: Any, scale: Any) -> Any:
    """||b - A f|| / sqrt(scale) per system, recomputed from f (0 where there is nothing to solve)."""
    xp = ops.xp
    residual = rhs - ops.apply(solution, xp.zeros_like(rhs))
    norm2 = ops.dot(residual, residual)
    return xp.sqrt(xp.where(scale > 0, norm2 / xp.where(scale > 0, scale, 1), 0))
