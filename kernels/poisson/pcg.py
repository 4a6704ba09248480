"""The preconditioned conjugate gradient of the Poisson blend: the operator of one bucket's windows,
its sine-transform preconditioner, the batched solve with early exit and fixed budgets, and the true
residuals of its answers. One algorithm over NumPy and CuPy; the entry point is
`dli.kernels.poisson.blend.poisson_blend`."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from dli.kernels.poisson.windows import Transfers
from dli.kernels.xp import (
    scipy_fft_module,
)


def _fft_module(xp: ModuleType) -> ModuleType:
    return scipy_fft_module(xp)


class _WindowSystem:
    """The operator A of the regions in one bucket's windows and its DST preconditioner M.

    Arrays are (B, C, height, width) of one dtype; Ω is (B, height, width), never on the window's
    edge, and is kept as a 0/1 array of that dtype (a bool factor would be converted every pass).

    The preconditioner is the inverse of the window's 5-point Laplacian with its Dirichlet
    boundary half a pixel outside the window, which the type-II DST diagonalizes (the inverse is a
    type-III DST). It plays the role of the type-I transform of the Dirichlet problem on the
    interior points but transforms the whole window (no interior copy) at a length of the
    window's own fast size; measured 1.5x faster per step with the same iteration counts
    (docs/kernels.md). Ω lies inside, so M stays a principal block of an SPD inverse: SPD.

    Memory traffic per window pixel and system of one PCG step, in array elements read + written,
    counted from the expressions below: stencil 17 (4u: 2, four neighbour subtractions 3 each, the
    Ω factor 3), x and r updates 5 each (a scaled temporary, then the in-place sum), p update 5,
    three dot products 2 each, the preconditioner 14 (each 2-D DST streams the data in and out
    once per axis, 4, twice; the eigenvalue and Ω factors 3 each). The transforms' internal
    passes are the library's; this counts the data each must move at least.
    """

    words_per_pixel_step = 17 + 5 + 5 + 5 + 6 + 14

    def __init__(self, xp: ModuleType, omega: Any, dtype: Any, spectrum: _Spectrum) -> None:
        self.xp = xp
        self.fft = _fft_module(xp)
        self.omega = omega
        self.dtype = np.dtype(dtype)
        self.chi = omega[:, None].astype(dtype)
        self.spectrum = spectrum
        self.pixels = omega.shape[1] * omega.shape[2]
        self.batched_rows: tuple[Any, Any] | None = None  # `_rows_per_system`

    def bytes_per_system_step(self, dtype: Any) -> int:
        return (self.words_per_pixel_step * np.dtype(dtype).itemsize + 1) * self.pixels

    def apply(self, u: Any, out: Any) -> Any:
        """out = A u: the 5-point Laplacian on Ω (u zero outside Ω; out zero outside Ω).

        On the flattened pixels of each contiguous window the four neighbours are shifts by ±1
        and ±width: contiguous passes, several times faster than 2-D slices. A shift that wraps
        from one row's end to the next row's start only lands on the window's edge, where the Ω
        factor is zero.
        """
        width = u.shape[-1]
        flat, result = u.reshape(*u.shape[:2], -1), out.reshape(*out.shape[:2], -1)
        self.xp.multiply(flat, 4, out=result)
        result[..., width:] -= flat[..., :-width]
        result[..., :-width] -= flat[..., width:]
        result[..., 1:] -= flat[..., :-1]
        result[..., :-1] -= flat[..., 1:]
        out *= self.chi
        return out

    def precondition(self, r: Any) -> Any:
        """z = χ_Ω L⁻¹ r, with L the window's Laplacian, Dirichlet half a pixel outside (r zero outside Ω)."""
        spectrum = self.spectrum
        if spectrum.rows is None:
            coefficients = self.fft.dstn(r, type=2, axes=(-2, -1), norm="ortho")
            coefficients *= spectrum.inverse_eigenvalues
            z = self.fft.idstn(coefficients, type=2, axes=(-2, -1), norm="ortho", overwrite_x=True)
        elif (
            self.xp is np
        ):  # the same orthonormal transforms as dense products: S_h r S_wᵀ, then S_hᵀ (.) S_w
            coefficients = spectrum.rows @ r @ spectrum.cols_t
            coefficients *= spectrum.inverse_eigenvalues
            z = spectrum.rows_t @ coefficients @ spectrum.cols
        else:  # the same on the GPU: row products batched per system, one 2-D product for the columns
            rows, rows_t = self._rows_per_system(r.shape[:2])
            width = r.shape[-1]
            coefficients = ((rows @ r).reshape(-1, width) @ spectrum.cols_t).reshape(r.shape)
            coefficients *= spectrum.inverse_eigenvalues
            z = ((rows_t @ coefficients).reshape(-1, width) @ spectrum.cols).reshape(r.shape)
        z *= self.chi
        return z

    def _rows_per_system(self, systems: tuple[int, ...]) -> tuple[Any, Any]:
        """S_h and S_hᵀ copied once per system, (B, C, h, h), made at the first transform of a solve.

        CuPy runs a product with a matrix broadcast over the batch as three pointer kernels and a
        pointer-array cuBLAS call, and with these as one strided-batched call (`dli.kernels.cupy_costs`).
        """
        if self.batched_rows is None or self.batched_rows[0].shape[:2] != systems:
            spectrum, shape = self.spectrum, (*systems, *self.spectrum.rows.shape)
            self.batched_rows = (
                self.xp.ascontiguousarray(self.xp.broadcast_to(spectrum.rows, shape)),
                self.xp.ascontiguousarray(self.xp.broadcast_to(spectrum.rows_t, shape)),
            )
        return self.batched_rows

    def restricted(self, images: Any) -> _WindowSystem:
        """The same system for a subset of the images (a bool or index selection)."""
        return type(self)(self.xp, self.omega[images], self.dtype, self.spectrum)

    @staticmethod
    def dot(a: Any, b: Any) -> Any:
        """Per-system dot products of contiguous (B, C, h, w) arrays: (B, C), as one batched matmul.

        A (1 x hw) @ (hw x 1) product per system runs in BLAS (cuBLAS on the GPU), several times
        faster than a product and a sum, with no temporary array.
        """
        rows, cols = a.shape[:2], a.shape[2] * a.shape[3]
        return (a.reshape(*rows, 1, cols) @ b.reshape(*rows, cols, 1))[..., 0, 0]


DENSE_TRANSFORM_MAX_SIDE = {"cpu": 80, "cuda": 256}
"""Windows with no side above this apply their DSTs as dense matrix products, larger ones by FFT.

A DST of n points as a product with its n x n matrix costs n multiply-adds per point against the
FFT's O(log n), but it is one BLAS call with no planning or dispatch: on the CPU it is faster up to
sides of about 90 (2-4x at sides 8 to 48, measured in docs/kernels.md). On CUDA a 2-D transform
pair as four strided-batched products is 4 launches against 36 for cupyx's DSTs (the device model,
`dli.kernels.cupy_costs`), at 4 x 2·side flops per pixel: 256 keeps every window of a 256² image
dense (258 GFLOP of cuBLAS per CG batch of 64); the crossover on a GPU is not yet measured."""


@dataclass(frozen=True)
class _Spectrum:
    """The preconditioner's transform data for one window shape, dtype and device (made once each).

    `inverse_eigenvalues` is (height, width): 1 / λ_ij of the 5-point Laplacian with its Dirichlet
    boundary half a pixel outside, λ_ij = 4 sin²(πi / 2·height) + 4 sin²(πj / 2·width), i, j from
    1: the DST-II spectrum. `rows`/`cols` (and their transposes, contiguous) are the orthonormal
    DST-II matrices of the two sides when the window is small enough for dense transforms
    (`DENSE_TRANSFORM_MAX_SIDE`), else None.
    """

    inverse_eigenvalues: Any
    rows: Any = None
    rows_t: Any = None
    cols: Any = None
    cols_t: Any = None

    @staticmethod
    def of(transfers: Transfers, height: int, width: int, dtype: Any) -> _Spectrum:
        xp = transfers.xp
        device = None if xp is np else xp.cuda.Device().id
        key = (height, width, np.dtype(dtype).str, device)
        if key not in _SPECTRA:
            rows = 4.0 * np.sin(np.pi * np.arange(1, height + 1) / (2 * height)) ** 2
            cols = 4.0 * np.sin(np.pi * np.arange(1, width + 1) / (2 * width)) ** 2
            host = {"inverse_eigenvalues": 1.0 / (rows[:, None] + cols[None, :])}
            if max(height, width) <= DENSE_TRANSFORM_MAX_SIDE["cpu" if xp is np else "cuda"]:
                row_matrix, col_matrix = _dst2_matrix(height), _dst2_matrix(width)
                host |= {"rows": row_matrix, "rows_t": row_matrix.T}
                host |= {"cols": col_matrix, "cols_t": col_matrix.T}
            _SPECTRA[key] = _Spectrum(
                **{k: transfers.to_device(np.ascontiguousarray(v, dtype=dtype)) for k, v in host.items()}
            )
        return _SPECTRA[key]


_SPECTRA: dict[tuple[Any, ...], _Spectrum] = {}
"""Transform data on their devices, by (height, width, dtype, device)."""


def _dst2_matrix(n: int) -> np.ndarray:
    """The orthonormal type-II DST of n points as an n x n float64 matrix: S x = dst(x, 2, "ortho")."""
    import scipy.fft

    return scipy.fft.dst(np.eye(n), type=2, norm="ortho", axis=0)


@dataclass
class _CGResult:
    """Per-system results of one bucket's solve, all (B, C) device arrays."""

    scale: Any  # ||b||², or ||r0||² when b = 0: the residual is relative to this
    active: Any  # bool: still above the tolerance
    iterations: Any  # int32: iterations run while active
    steps: int = 0  # steps the bucket ran
    system_steps: int = 0  # systems x steps computed (frozen ones included; sets the traffic)


def _preconditioned_cg(
    system: _WindowSystem, rhs: Any, start: Any, tol: float, max_iter: int, *, check: bool
) -> tuple[Any, _CGResult]:
    """PCG on A f = rhs from `start` for every system of a bucket, frozen systems left unchanged.

    With `check` (the CPU) the loop ends once every system is frozen, and images whose systems
    are all frozen leave the working arrays once they are half of them, so they stop costing
    work. Without it (the GPU) it runs `max_iter` steps on every system and reads nothing back.
    """
    xp = system.xp
    x = start.copy()
    ap = xp.zeros_like(rhs)
    r = rhs - system.apply(x, ap)
    bb = system.dot(rhs, rhs)
    rr = system.dot(r, r)
    scale = xp.where(bb > 0, bb, rr)
    tol2 = tol * tol
    active = ~(rr <= tol2 * scale)
    p = system.precondition(r)
    rz = system.dot(r, p)
    result = _CGResult(scale, active.copy(), xp.zeros(rr.shape, dtype=np.int32))
    iterations = result.iterations.copy()
    scratch = xp.empty_like(rhs)
    solution, live = x, None  # full-size solution; `live` indexes the working images once compacted
    zero = rhs.dtype.type(0)
    for _ in range(max_iter):
        if check:  # host reads: the CPU only (count_nonzero: no reduction machinery on tiny arrays)
            alive = active[:, 0] if active.shape[1] == 1 else active.any(axis=1)
            working = np.count_nonzero(alive)
            if not working:
                break
            if 2 * working <= alive.size:
                live = _keep_results(result, solution, live, x, active, iterations)[alive]
                x, r, p, ap, rz, scale = x[alive], r[alive], p[alive], ap[alive], rz[alive], scale[alive]
                scratch = scratch[alive]
                active, iterations = active[alive], iterations[alive]
                system = system.restricted(alive)
        p_ap = system.dot(p, system.apply(p, ap))
        ok = active & (p_ap > 0)
        alpha = xp.where(ok, rz / xp.where(ok, p_ap, 1), zero)[..., None, None]
        x += xp.multiply(p, alpha, out=scratch)
        r -= xp.multiply(ap, alpha, out=scratch)
        rr = system.dot(r, r)
        iterations += active
        active &= ~(rr <= tol2 * scale)
        z = system.precondition(r)
        rz_new = system.dot(r, z)
        ok = active & (rz > 0)
        beta = xp.where(ok, rz_new / xp.where(ok, rz, 1), zero)[..., None, None]
        p *= beta
        p += z
        rz = xp.where(active, rz_new, rz)
        result.steps += 1
        result.system_steps += rz.size
    _keep_results(result, solution, live, x, active, iterations)
    return solution, result


def _keep_results(result: _CGResult, solution: Any, live: Any, x: Any, active: Any, iterations: Any) -> Any:
    """Write the working images' iterate and per-system results into the full-size ones.

    Returns the indices of the working images in the bucket (all of them before any compaction).
    """
    if live is None:
        live = np.arange(solution.shape[0])
        if x is solution:
            result.active[...] = active
            result.iterations[...] = iterations
            return live
    solution[live] = x
    result.active[live] = active
    result.iterations[live] = iterations
    return live


def _true_residuals(system: _WindowSystem, rhs: Any, solution: Any, scale: Any) -> Any:
    """||b - A f|| / sqrt(scale) per system, recomputed from f (0 where there is nothing to solve)."""
    xp = system.xp
    residual = rhs - system.apply(solution, xp.zeros_like(rhs))
    norm2 = system.dot(residual, residual)
    return xp.sqrt(xp.where(scale > 0, norm2 / xp.where(scale > 0, scale, 1), 0))
