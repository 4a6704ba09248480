"""Windows of a batched Poisson solve: the regions' boxes, window sizes and placement, buckets of
equal-shape windows, and the host <-> device copies of one solve.

Both solvers use them (`dli.kernels.poisson.blend`'s CG and `dli.kernels.poisson.direct`): a window is a
rectangle of one image holding its region, copied out of the batch into a bucket of equal-shape
windows, solved there, and pasted back. Boxes are measured on the device (one read-back) unless the
caller gives them; everything else here is host arithmetic or copies that never make the host wait.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from dli.kernels.xp import array_module, on_torch_stream, to_host


@on_torch_stream
def measured_boxes(omega: Any) -> np.ndarray:
    """(N, 4) inclusive (top, left, bottom, right) of each region; top > bottom where empty (host read)."""
    xp = array_module(omega)
    _, h, w = omega.shape
    row_any, col_any = omega.any(axis=2), omega.any(axis=1)
    has = row_any.any(axis=1)
    bounds = xp.stack(
        [
            xp.where(has, xp.argmax(row_any, axis=1), h),
            xp.argmax(col_any, axis=1),
            h - 1 - xp.argmax(row_any[:, ::-1], axis=1),
            w - 1 - xp.argmax(col_any[:, ::-1], axis=1),
        ],
        axis=1,
    )
    return to_host(bounds).astype(np.int64)


@functools.lru_cache(maxsize=4096)
def fast_side(need: int) -> int:
    """The smallest window side >= `need` whose transform is fast: no prime factor above 5.

    The preconditioner's DST-II runs over the whole window side, as an FFT of that length.
    """
    side = max(need, 3)
    while True:
        rest = side
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return side
        side += 1


def bucket_shapes(sides: np.ndarray, overhead_pixels: int) -> np.ndarray:
    """Merge window shapes into buckets: per image, the (height, width) of its bucket.

    Each bucket costs its images' window pixels per step plus a fixed `overhead_pixels` (the
    per-bucket cost of a step: Python and launch overhead, in pixels' worth of work). Starting
    from one bucket per distinct shape, the pair whose merge (to the larger side on each axis)
    lowers the total most is merged, until no merge lowers it.
    """
    # The pair gains live in a k x k array, updated per merge in the merged bucket's row and
    # column only: 64 distinct shapes cost ~1.5 ms on the host, where rescoring every pair in
    # Python each round cost ~20 ms, and a handful of shapes cost tens of µs either way.
    counts: dict[tuple[int, int], int] = {}
    for shape in map(tuple, sides.tolist()):
        if shape[0]:
            counts[shape] = counts.get(shape, 0) + 1
    keys = sorted(counts)
    if not keys:
        return np.zeros_like(sides)
    shapes = np.array(keys, dtype=np.int64).reshape(-1, 2)
    sizes = np.array([counts[k] for k in keys], dtype=np.int64)
    costs = sizes * shapes.prod(axis=1) + overhead_pixels
    members = [[k] for k in keys]
    alive = np.ones(len(keys), dtype=bool)
    order = np.arange(len(keys))
    never = np.iinfo(np.int64).min // 2  # no pair: below any gain

    def gains(i: int) -> np.ndarray:
        """What merging bucket i with each bucket saves."""
        merged = np.maximum(shapes[i], shapes).prod(axis=1)
        return costs[i] + costs - ((sizes[i] + sizes) * merged + overhead_pixels)

    # gain[i, j] for i < j (each pair once, so the first best pair in row-major order is merged,
    # as a scan over the pairs in order would find it); `never` elsewhere.
    gain = np.stack([gains(i) for i in order])
    gain[order[:, None] >= order[None, :]] = never
    while True:
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[i, j] <= 0:
            break
        shapes[i] = np.maximum(shapes[i], shapes[j])
        sizes[i] += sizes[j]
        costs[i] = sizes[i] * shapes[i].prod() + overhead_pixels
        members[i] += members[j]
        members[j] = []
        alive[j] = False
        gain[j, :] = gain[:, j] = never
        row = np.where(alive, gains(i), never)
        gain[i, :] = np.where(order > i, row, never)
        gain[:, i] = np.where(order < i, row, never)
    bucket_of = {original: tuple(shapes[k]) for k, group in enumerate(members) for original in group}
    return np.array([bucket_of.get(tuple(s), (0, 0)) for s in sides.tolist()], dtype=sides.dtype).reshape(
        sides.shape
    )


def window_plan(
    boxes: np.ndarray, height: int, width: int, overhead_pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the window's (height, width) (0 where nothing to solve) and its top-left corner.

    Boxes are clipped to the unknowns (rows and columns 1..size-2). Each window has a fast side
    (`fast_side`) covering its box plus a one-pixel ring; windows are then merged into a few
    shapes (`bucket_shapes`). A window is centred on its box and shifted to start inside the
    image; where it runs past the image's far edge its rows or columns repeat the last one (see
    `Bucket`), which is never region, so the region never touches the window's edge.
    """
    top, left = np.maximum(boxes[:, 0], 1), np.maximum(boxes[:, 1], 1)
    bottom, right = np.minimum(boxes[:, 2], height - 2), np.minimum(boxes[:, 3], width - 2)
    has = (top <= bottom) & (left <= right)
    low, high = np.stack([top, left], axis=1), np.stack([bottom, right], axis=1)
    extent = np.where(has[:, None], high - low + 1, 0)
    sides = np.array([[fast_side(int(e) + 2) if e else 0 for e in row] for row in extent], dtype=np.int64)
    sides = bucket_shapes(sides.reshape(-1, 2), overhead_pixels)
    centred = low - 1 - (sides - extent - 2) // 2
    limit = np.array([height, width]) - sides
    corners = np.where(has[:, None], np.maximum(0, np.minimum(np.minimum(centred, limit), low - 1)), 0)
    return sides, corners


class Transfers:
    """The host <-> device copies of one solve, none of which makes the host wait.

    NumPy: no copies at all. CuPy: `to_device` stages a small host array in pinned memory and
    copies it asynchronously on the current stream (a copy from pageable memory may wait for
    the stream's queued work); `to_host` starts copies back into pinned memory and records an
    event, and `fetch` waits on that event only. The pinned buffers live as long as this object;
    one dropped before its copies ran waits for them first, so no buffer is reused under a copy.
    """

    def __init__(self, xp: ModuleType) -> None:
        self.xp = xp
        self._buffers: list[np.ndarray] = []
        self._back: dict[str, np.ndarray] = {}
        self._event: Any = None

    def _pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        memory = self.xp.cuda.alloc_pinned_memory(max(1, int(np.prod(shape)) * dtype.itemsize))
        buffer = np.frombuffer(memory, dtype, int(np.prod(shape))).reshape(shape)
        self._buffers.append(buffer)
        return buffer

    def to_device(self, array: np.ndarray) -> Any:
        if self.xp is np:
            return array
        cuda = self.xp.cuda
        staged = self._pinned(array.shape, array.dtype)
        staged[...] = array
        out = self.xp.empty(array.shape, array.dtype)
        out.set(staged, stream=cuda.get_current_stream())
        self._event = cuda.get_current_stream().record()
        return out

    def to_host(self, **arrays: Any) -> None:
        if self.xp is np:
            self._back = {k: np.asarray(v) for k, v in arrays.items()}
            return
        stream = self.xp.cuda.get_current_stream()
        for name, array in arrays.items():
            self._back[name] = self._pinned(array.shape, array.dtype)
            # `get` blocks the host by default, even into pinned memory; the event orders the reads.
            array.get(stream=stream, out=self._back[name], blocking=False)
        self._event = stream.record()

    def fetch(self) -> dict[str, np.ndarray]:
        if self._event is not None:
            self._event.synchronize()
        return {k: v.copy() for k, v in self._back.items()}

    def __del__(self) -> None:
        if self._event is not None and not self._event.done:
            self._event.synchronize()


@dataclass(frozen=True)
class Bucket:
    """Images solved on windows of one shape: their indices, corners and window rows/columns.

    Windows are copied out and back by advanced indexing on the device (one gather or scatter
    per array for the whole bucket) and by one slice copy per image on the CPU, where NumPy's
    advanced indexing costs about 25x a plain copy (5.6 against 0.22 ns per pixel, measured in
    docs/kernels.md). Both give the same windows: rows and columns past the image's far edge
    repeat its last one.

    On the device a contiguous array is indexed through its flat view with one (B, planes,
    height, width) index (`_flat_index`), made once per bucket and plane count: CuPy turns k
    index arrays into k + 2 kernels over an int64 index of the output's size, one array into a
    single gather (`dli.kernels.cupy_costs`).
    """

    images: Any  # (B,) device indices into the batch
    rows: Any  # (B, height) device row indices
    cols: Any  # (B, width) device column indices
    count: int
    host_images: np.ndarray  # (B,) the same indices on the host
    corners: np.ndarray  # (B, 2) host (top, left) of each window
    transfers: Transfers | None = None  # uploads the flat indices
    host_rows: np.ndarray | None = None  # (B, height), (B, width): `rows` and `cols` on the host
    host_cols: np.ndarray | None = None
    flat: dict[tuple[int, int, int], Any] = field(default_factory=dict, compare=False)  # `_flat_index`

    @staticmethod
    def group(
        transfers: Transfers, sides: np.ndarray, corners: np.ndarray, height: int, width: int
    ) -> list[Bucket]:
        buckets = []
        for shape in sorted({tuple(s) for s in sides.tolist() if s[0]}):
            images = np.flatnonzero((sides == shape).all(axis=1))
            rows = np.minimum(corners[images, :1] + np.arange(shape[0]), height - 1)
            cols = np.minimum(corners[images, 1:] + np.arange(shape[1]), width - 1)
            buckets.append(Bucket.of(transfers, images, rows, cols, corners[images]))
        return buckets

    @staticmethod
    def of(
        transfers: Transfers, images: np.ndarray, rows: np.ndarray, cols: np.ndarray, corners: np.ndarray
    ) -> Bucket:
        """The windows of host `images` at host `rows` (B, height) and `cols` (B, width), uploaded."""
        device = (transfers.to_device(a) for a in (images, rows, cols))
        return Bucket(
            *device,
            count=len(images),
            host_images=images,
            corners=corners,
            transfers=transfers,
            host_rows=rows,
            host_cols=cols,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.rows.shape[1]), int(self.cols.shape[1])

    def _slices(self) -> list[tuple[int, int, slice, slice]]:
        """Per window on the CPU: (window, image, rows, columns) of the part inside the image."""
        height, width = self.shape
        placed = zip(self.host_images.tolist(), self.corners.tolist(), strict=True)
        return [
            (k, image, slice(top, top + height), slice(left, left + width))
            for k, (image, (top, left)) in enumerate(placed)
        ]

    def _index(self) -> tuple[Any, Any, Any]:
        """Device advanced index of the windows' pixels in (N, H, W) arrays: (B, height, width)."""
        return self.images[:, None, None], self.rows[:, :, None], self.cols[:, None, :]

    def _flat_index(self, array: Any) -> Any:
        """(B, planes, height, width) device index of the windows' pixels in `array.reshape(-1)`.

        `array` is (N, ..., H, W) with `planes` = the product of its middle axes. Host arithmetic,
        one upload of (B, planes, height) row offsets and one sum with the columns, made once per
        (planes, H, W). None when `array` is not C-contiguous (its flat view would be a copy).
        """
        if self.transfers is None or not array.flags.c_contiguous or not array.size:
            return None
        n, h, w = array.shape[0], *array.shape[-2:]
        planes = array.size // (n * h * w)
        key = (planes, h, w)
        if key not in self.flat:
            first = (self.host_images[:, None] * planes + np.arange(planes)) * (h * w)  # (B, planes)
            offsets = first[:, :, None] + self.host_rows[:, None, :] * w  # (B, planes, height)
            self.flat[key] = self.transfers.to_device(offsets)[..., None] + self.cols[:, None, None, :]
        return self.flat[key]

    def crop(self, xp: ModuleType, array: Any) -> Any:
        """(N, ..., H, W) -> contiguous (B, ..., height, width) windows, edge rows/columns repeated."""
        if xp is not np:
            return self.gather(xp, array)
        height, width = self.shape
        out = np.empty((self.count, *array.shape[1:-2], height, width), dtype=array.dtype)
        for k, image, rows, cols in self._slices():
            part = array[image, ..., rows, cols]
            inside_h, inside_w = part.shape[-2:]
            window = out[k]
            window[..., :inside_h, :inside_w] = part
            if inside_h < height:
                window[..., inside_h:, :inside_w] = part[..., -1:, :]
            if inside_w < width:
                window[..., inside_w:] = window[..., inside_w - 1 : inside_w]
        return out

    def gather(self, xp: ModuleType, array: Any) -> Any:
        """`crop` by device indexing (`rows` and `cols` as given, whatever they repeat), any `xp`."""
        flat = self._flat_index(array)
        if flat is not None:  # one gather
            return array.reshape(-1)[flat].reshape(self.count, *array.shape[1:-2], *self.shape)
        moved = xp.moveaxis(array, (-2, -1), (1, 2))[self._index()]  # (B, height, width, ...)
        return xp.ascontiguousarray(xp.moveaxis(moved, (1, 2), (-2, -1)))

    def scatter(self, xp: ModuleType, images: Any, windows: Any) -> None:
        """`paste` by device indexing, any `xp`: a pixel repeated in the windows takes one of its values."""
        flat = self._flat_index(images)
        if flat is not None:  # one scatter
            images.reshape(-1)[flat] = windows.reshape(flat.shape)
            return
        images.transpose(0, 2, 3, 1)[self._index()] = windows.transpose(0, 2, 3, 1)

    def region(self, xp: ModuleType, mask: Any) -> Any:
        """The windows' part of the (N, H, W) region mask as bool, off the image and window edges.

        Image-border pixels are never region; nor are the window's own edge pixels (a region a
        box left out there stays unsolved and is counted as outside its box).
        """
        _, height, width = mask.shape
        omega = self.crop(xp, mask).astype(bool, copy=False)
        if self.transfers is None:
            omega &= ((self.rows > 0) & (self.rows < height - 1))[:, :, None]
            omega &= ((self.cols > 0) & (self.cols < width - 1))[:, None, :]
            _clear_edges(omega)
            return omega
        # The same rows and columns chosen on the host: two small uploads, two passes.
        keep_rows = (self.host_rows > 0) & (self.host_rows < height - 1)
        keep_cols = (self.host_cols > 0) & (self.host_cols < width - 1)
        keep_rows[:, [0, -1]] = keep_cols[:, [0, -1]] = False
        omega &= self.transfers.to_device(keep_rows)[:, :, None]
        omega &= self.transfers.to_device(keep_cols)[:, None, :]
        return omega

    def paste(self, xp: ModuleType, images: Any, windows: Any) -> None:
        """Write (B, C, height, width) windows back into (N, C, H, W) `images` in place."""
        if xp is not np:
            self.scatter(xp, images, windows)
            return
        for k, image, rows, cols in self._slices():
            target = images[image, :, rows, cols]
            target[...] = windows[k, :, : target.shape[-2], : target.shape[-1]]


def _clear_edges(mask: Any) -> None:
    """Set the outermost rows and columns of (N, H, W) `mask` to False, in place (slices: no copies)."""
    mask[:, 0, :] = mask[:, -1, :] = False
    mask[:, :, 0] = mask[:, :, -1] = False
