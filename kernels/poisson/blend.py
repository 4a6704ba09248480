"""Poisson image editing (Pérez et al. 2003) for a batch: every image and channel solved at once.

Discrete problem, per image n and channel c. The region Ω is the set of mask pixels that are not
on the image border (border pixels have a missing neighbour, so they stay fixed to the target).
For p in Ω with 4-neighbours N(p):

    4 f_p - Σ_{q ∈ N(p) ∩ Ω} f_q = Σ_{q ∈ N(p) \\ Ω} target_q + Σ_{q ∈ N(p)} v_pq,

with the guidance v_pq = source_p - source_q (with `mixed_gradients`, per edge the one of the
source and target differences with the larger magnitude). Outside Ω the output is the target,
bit for bit. The output is not clipped: a blend may leave the input's value range.

Solver: preconditioned conjugate gradient, matrix-free, over all N x C systems at once.

- Windows. Each image is solved on its own window, a rectangle over its region Ω with a
  one-pixel ring, so a blowhole never pays for an uneven patch in the same batch. Window sides
  are fast transform lengths (`fast_side`, no prime factor above 5), and windows are merged
  into a few size buckets (`bucket_shapes`, a cost model of pixels against a per-bucket
  overhead); each bucket is one batch of equal-shape arrays (`dli.kernels.poisson.windows`, shared with
  the direct solver).
- Preconditioner. The operator of Ω is a principal block of the 5-point Laplacian L of the
  window with its Dirichlet boundary half a pixel outside, and L is diagonalized by the type-II
  discrete sine transform. So M r = χ_Ω · L⁻¹ (χ_Ω · r) costs a DST, a division by L's known
  eigenvalues and an inverse DST (domain embedding, as in capacitance-matrix methods). It is
  exact when Ω fills the window and keeps the iteration count to tens for any MT region,
  against O(side) for plain CG (measured in docs/kernels.md). The transforms are
  `scipy.fft.dstn` / `cupyx.scipy.fft.dstn` over the last two axes, one call per bucket and
  step for all its systems, or for small windows (`DENSE_TRANSFORM_MAX_SIDE`) the same
  orthonormal transforms as batched products with their matrices.
- Stopping. A system freezes when its true relative residual ||b - A f|| / ||b|| reaches `tol`
  (frozen systems keep their iterate; a step changes only active ones). On the CPU a bucket stops
  as soon as all its systems are frozen. On the GPU it runs the fixed budget `max_iter` with no
  host check at all, so nothing waits for the device.
- Budget. `default_max_iter` (the CPU's cap) and `gpu_max_iter` (the GPU's fixed count, on its
  merged windows) are bounds measured on every real Magnetic Tile mask (see docs/kernels.md);
  a system still above `tol` after it is reported, never hidden: in `PoissonInfo`, and with a
  `PoissonConvergenceWarning` when the report is checked.

Starting guess (default): the source shifted per system by the mean of (target - source) on the
ring of pixels around Ω. The solution differs from the source mostly by such a smooth offset.

Host synchronization. Window placement needs each region's bounding box on the host. Callers
that know it (the training loader computes it from the plan, see `dli.pipeline.inject`) pass
`boxes`, and then a CUDA solve reads nothing back: its `PoissonInfo` is copied to pinned host
memory behind the solve and only waits for it when first read. Without `boxes` the boxes are
measured on the device and read back once. A region pixel outside its given box is not solved
(it stays the target) and is counted in `PoissonInfo.outside_box`.

No raw CUDA kernel: every step is array expressions and library transforms, the same code on
NumPy and CuPy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from dli.kernels.poisson.pcg import (
    _preconditioned_cg,
    _Spectrum,
    _true_residuals,
    _WindowSystem,
)
from dli.kernels.poisson.windows import Bucket, Transfers, measured_boxes, window_plan
from dli.kernels.xp import (
    any_tensor,
    array_module,
    as_array,
    as_tensor,
    count_true,
    device_of,
    on_torch_stream,
)

BUCKET_OVERHEAD_PIXELS = {"cpu": 4096, "cuda": 1 << 21}
"""The fixed cost of one window bucket per PCG step, in window pixels' worth of work (`bucket_shapes`).
CPU: ~25 array calls of a few µs each against ~25 ns per pixel (measured, docs/kernels.md). CUDA:
one PCG step of a bucket is 37 launches, ~30 µs of host time each as the first GPU run measured,
against ~225 bytes per window pixel at ~4.8 TB/s (`dli.kernels.device_model`), so merging a batch
into one or two buckets pays (the device model's per-image windows: 50x the launches for a fifth
of the bytes; docs/performance.md)."""

SOLVERS: tuple[str, ...] = ("cg", "direct")
"""`poisson_blend` solvers: the preconditioned CG of this module, or `dli.kernels.poisson.direct`."""

BUDGET_BASE = 12
BUDGET_PER_DECADE = 6
"""`default_max_iter` = BUDGET_BASE + BUDGET_PER_DECADE · log10(1 / tol), rounded up."""


class PoissonConvergenceWarning(RuntimeWarning):
    """Some systems of a Poisson blend stopped at `max_iter` above the tolerance."""


def default_max_iter(tol: float) -> int:
    """The fixed iteration budget for `tol`: 42 at 1e-5, 60 at 1e-8.

    Measured on all 392 real Magnetic Tile masks at 256² (dilated 5x5, mixed gradients), the most
    any system needed at tol 1e-5 is far below it (docs/kernels.md); tests/test_poisson.py keeps
    that true.
    """
    return math.ceil(BUDGET_BASE + BUDGET_PER_DECADE * math.log10(1.0 / tol))


GPU_BUDGET_BASE = 5
"""`gpu_max_iter` = GPU_BUDGET_BASE + BUDGET_PER_DECADE · log10(1 / tol), rounded up."""


def gpu_max_iter(tol: float) -> int:
    """The GPU's iteration budget for `tol`, every step of which it runs: 29 at 1e-4, 35 at 1e-5.

    Fitted to the GPU's own windows (`BUCKET_OVERHEAD_PIXELS["cuda"]` merges a batch's windows
    into one or two buckets): on all 392 real Magnetic Tile masks at 256² in batches of 64
    (dilated 5x5, mixed gradients) the most any system needed is 23 at 1e-4 and 28 at 1e-5, at
    most 80% of the budget; tests/test_poisson.py keeps that true. The CPU, which stops once its
    systems converge, keeps the roomier `default_max_iter` as its cap.
    """
    return math.ceil(GPU_BUDGET_BASE + BUDGET_PER_DECADE * math.log10(1.0 / tol))


class PoissonInfo:
    """How the solve of one batch went, per image and channel.

    Attributes (host NumPy arrays; after a CUDA solve the first read waits for the copy):
        iterations: (N, C) int PCG iterations each system ran before it froze.
        residuals: (N, C) final relative residual ||b - A f|| / ||b||, recomputed from the
            returned solution (0 for a system with an empty region). In float32 it levels off
            near 1e-6..1e-5 from rounding.
        converged: (N, C) bool, whether the system reached `tol` within `max_iter`.
        outside_box: (N,) int region pixels that lay outside the image's given box (unsolved).
        windows: (N, 2) int (height, width) of each image's window, 0 for nothing to solve.
        steps: PCG steps run, summed over the window buckets.
        buckets: number of window-size buckets.
        window: the largest window (height, width).
        tol, max_iter: the requested tolerance and the budget that applied.
        traffic_bytes: memory the steps read and wrote (`words_per_pixel_step`, transforms
            included), summed over the systems and steps that ran.
    """

    def __init__(
        self,
        fetch: Callable[[], dict[str, np.ndarray]],
        *,
        windows: np.ndarray,
        steps: int,
        tol: float,
        max_iter: int,
        traffic_bytes: int,
        solver: str = "cg",
    ) -> None:
        self._fetch: Callable[[], dict[str, np.ndarray]] | None = fetch
        self.solver = solver
        self._host: dict[str, np.ndarray] = {}
        self._warned = False
        self.windows = windows
        self.steps = steps
        self.buckets = len({tuple(w) for w in windows.tolist() if w[0]})
        self.window = tuple(int(v) for v in windows.max(axis=0)) if windows.size else (0, 0)
        self.tol = tol
        self.max_iter = max_iter
        self.traffic_bytes = traffic_bytes

    @classmethod
    def direct(
        cls, fetch: Callable[[], dict[str, np.ndarray]], *, n: int, channels: int, windows: np.ndarray
    ) -> PoissonInfo:
        """The report of a direct solve (`dli.kernels.poisson.direct`): exact, so no iterations and
        every system converged; `fetch` brings `outside_box` (region pixels no window covered)."""

        def fetch_all() -> dict[str, np.ndarray]:
            return fetch() | {
                "iterations": np.zeros((n, channels), dtype=np.int32),
                "residuals": np.zeros((n, channels)),
                "converged": np.ones((n, channels), dtype=bool),
            }

        return cls(fetch_all, windows=windows, steps=0, tol=0.0, max_iter=0, traffic_bytes=0, solver="direct")

    def _get(self, name: str) -> np.ndarray:
        if self._fetch is not None:
            self._host, self._fetch = self._fetch(), None
        return self._host[name]

    @property
    def iterations(self) -> np.ndarray:
        return self._get("iterations")

    @property
    def residuals(self) -> np.ndarray:
        return self._get("residuals")

    @property
    def converged(self) -> np.ndarray:
        return self._get("converged")

    @property
    def outside_box(self) -> np.ndarray:
        return self._get("outside_box")

    @property
    def all_converged(self) -> bool:
        """Whether every system reached the tolerance and every region lay inside its box."""
        return bool(self.converged.all()) and not self.outside_box.any()

    def summary(self) -> str:
        """One line: how many systems converged, iterations, worst residual, windows."""
        count = self.converged.size
        outside = int(self.outside_box.sum())
        if self.solver == "direct":
            return (
                f"{count} systems solved directly (sine transform) on {self.buckets} window shape(s) "
                f"up to {self.window[0]}x{self.window[1]}"
                + (f"; {outside} region pixel(s) outside their windows" if outside else "")
            )
        iterations = self.iterations if self.iterations.size else np.zeros(1, dtype=int)
        worst = float(self.residuals.max()) if self.residuals.size else 0.0
        return (
            f"{int(self.converged.sum())}/{count} systems converged "
            f"(tol {self.tol:g}, max_iter {self.max_iter}); "
            f"iterations median {float(np.median(iterations)):g}, max {int(iterations.max())}; "
            f"worst residual {worst:.3g}; {self.buckets} window bucket(s) up to "
            f"{self.window[0]}x{self.window[1]}, {self.steps} steps"
            + (f"; {outside} region pixel(s) outside their boxes" if outside else "")
        )

    def check(self, stacklevel: int = 2) -> bool:
        """Warn (`PoissonConvergenceWarning`, once per report) unless every system converged and
        every region pixel lay inside its box (the message says which went wrong).

        Returns whether all did. On the CPU `poisson_blend` checks its report itself.
        """
        ok = self.all_converged
        if not ok and not self._warned:
            self._warned = True
            what = "did not converge" if not self.converged.all() else "left region pixels unsolved"
            warnings.warn(
                f"Poisson blend {what}: {self.summary()}",
                PoissonConvergenceWarning,
                stacklevel=stacklevel + 1,
            )
        return ok


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
    boxes: Any = None,
    solver: str = "cg",
    window: str = "box",
) -> tuple[Any, PoissonInfo]:
    """Seamlessly clone `source` into `target` over `mask` (see the module docstring for the problem).

    With ``solver="direct"`` the problem is the one of `dli.kernels.poisson.direct` instead (a
    rectangular window per image, the region's box widened by a margin or the whole image as
    `window` says, solved at once by sine transforms); `tol`, `max_iter` and `x0` then do not apply.

    Args:
        target, source: (N, C, H, W) float32 or float64 images (NumPy, CuPy or torch; same kind).
        mask: (N, H, W) bool or 0/1 region to clone; pixels on the image border are never changed.
        mixed_gradients: per edge, keep the stronger of the source and target gradients.
        tol: relative residual at which a system stops.
        max_iter: PCG iteration budget; default `default_max_iter(tol)` on the CPU,
            `gpu_max_iter(tol)` on the GPU.
        x0: starting guess: None for the boundary-matched source, "zeros", or an (N, C, H, W) array.
        boxes: optional host (N, 4) int (top, left, bottom, right), inclusive pixel bounds that
            contain each image's region (empty where top > bottom); with them nothing is read
            back from the device. Without them they are measured (one read-back on the GPU).
        solver: ``cg`` (the region's own Dirichlet problem, iterated) or ``direct``.
        window: the direct solver's window, ``box`` or ``image``.

    Returns:
        The blended images (same type, device and dtype as `target`) and a `PoissonInfo`. On the
        CPU a non-converged solve warns here; on the GPU the caller calls `info.check()` later
        (e.g. a step later), so the solve never waits.
    """
    torch_in = any_tensor(target, source, mask, x0)
    target, source, mask = as_array(target), as_array(source), as_array(mask)
    if x0 is not None and not isinstance(x0, str):
        x0 = as_array(x0)
        if x0.shape != target.shape:
            raise ValueError(f"x0 must have the images' shape {target.shape}, got {x0.shape}")
    if isinstance(x0, str) and x0 != "zeros":
        raise ValueError(f'x0 must be None, "zeros" or an (N, C, H, W) array, got {x0!r}')
    _check_inputs(target, source, mask, tol, max_iter)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if boxes is not None:
        boxes = _checked_boxes(boxes, target.shape[0])
    xp = array_module(target, source, mask)
    with device_of(target):
        target, source, mask = xp.asarray(target), xp.asarray(source), xp.asarray(mask)
        x0 = x0 if x0 is None or isinstance(x0, str) else xp.asarray(x0)
        if solver == "direct":
            from dli.kernels.poisson.direct import direct_blend

            blended, info = direct_blend(
                xp, target, source, mask, mixed_gradients=mixed_gradients, boxes=boxes, window=window
            )
        else:
            if max_iter is not None:
                budget = max_iter
            else:
                budget = default_max_iter(tol) if xp is np else gpu_max_iter(tol)
            blended, info = _blend(xp, target, source, mask, mixed_gradients, tol, budget, x0, boxes)
    if xp is np:
        info.check(stacklevel=2)
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


def _checked_boxes(boxes: Any, n: int) -> np.ndarray:
    if not isinstance(boxes, np.ndarray | list | tuple):
        raise ValueError(f"boxes must be a host (N, 4) integer array, got {type(boxes).__name__}")
    boxes = np.asarray(boxes)
    if boxes.shape != (n, 4) or not np.issubdtype(boxes.dtype, np.integer):
        raise ValueError(f"boxes must be an (N, 4) = {(n, 4)} integer array, got {boxes.shape} {boxes.dtype}")
    return boxes.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The solve.


def _blend(
    xp: ModuleType,
    target: Any,
    source: Any,
    mask: Any,
    mixed_gradients: bool,
    tol: float,
    max_iter: int,
    x0: Any,
    boxes: np.ndarray | None,
) -> tuple[Any, PoissonInfo]:
    n, c, h, w = target.shape
    dtype = target.dtype
    source = source.astype(dtype, copy=False)
    if boxes is None:  # `window_plan` clips them to the unknowns, off the image border
        boxes = measured_boxes(mask.astype(bool, copy=False))
    sides, corners = window_plan(boxes, h, w, BUCKET_OVERHEAD_PIXELS["cpu" if xp is np else "cuda"])

    transfers = Transfers(xp)
    blended = target.copy()
    iterations = xp.zeros((n, c), dtype=np.int32)
    residuals = xp.zeros((n, c), dtype=dtype)
    converged = xp.ones((n, c), dtype=bool)
    # Region pixels off the image border, less those solved in a window: what the boxes left out.
    outside_box = count_true(mask[:, 1:-1, 1:-1] != 0, axis=(1, 2))
    steps = traffic = 0
    for bucket in Bucket.group(transfers, sides, corners, h, w):
        omega_w = bucket.region(xp, mask)
        target_w, source_w = bucket.crop(xp, target), bucket.crop(xp, source)
        system = _WindowSystem(xp, omega_w, dtype, _Spectrum.of(transfers, *omega_w.shape[1:], dtype))
        rhs = _right_hand_side(xp, target_w, source_w, omega_w, mixed_gradients)
        start = _starting_guess(xp, target_w, source_w, omega_w, x0, bucket)
        solution, result = _preconditioned_cg(system, rhs, start, tol, max_iter, check=xp is np)
        bucket.paste(xp, blended, xp.where(omega_w[:, None], solution, target_w))
        iterations[bucket.images] = result.iterations
        residuals[bucket.images] = _true_residuals(system, rhs, solution, result.scale)
        converged[bucket.images] = ~result.active
        outside_box[bucket.images] -= count_true(omega_w, axis=(1, 2))
        steps += result.steps
        traffic += system.bytes_per_system_step(dtype) * result.system_steps
    transfers.to_host(
        iterations=iterations, residuals=residuals, converged=converged, outside_box=outside_box
    )
    info = PoissonInfo(
        transfers.fetch, windows=sides, steps=steps, tol=tol, max_iter=max_iter, traffic_bytes=int(traffic)
    )
    return blended, info


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


def _starting_guess(xp: ModuleType, target: Any, source: Any, omega: Any, x0: Any, bucket: Bucket) -> Any:
    """The start on the windows, zero outside Ω; `x0` is None, "zeros" or a full-size array."""
    zero = target.dtype.type(0)
    if x0 is None:
        ring = _ring(xp, omega)[:, None]
        count = xp.maximum(ring.sum(axis=(2, 3)), 1)
        offset = (xp.where(ring, target - source, zero).sum(axis=(2, 3)) / count).astype(target.dtype)
        start = source + offset[..., None, None]
    elif isinstance(x0, str):
        return xp.zeros_like(target)
    else:
        start = bucket.crop(xp, x0.astype(target.dtype, copy=False))
    return xp.where(omega[:, None], start, zero)
