"""The DALI pipeline of the data path: encoded files in, resized and warped images and masks out.

One graph serves training and evaluation, on the CPU or the GPU. Each iteration it receives a
variable-size batch: the N batch images followed by the K defect sources a DLI plan asked for,
each with its encoded mask and its 2x3 augmentation matrix (`dli.pipeline.augment`). It holds
no randomness: every matrix comes from the planner, so a plan replays its batch exactly.

The loader feeds batches ahead with `feed_input` (up to the prefetch depth) and reads outputs
in the same order, so DALI decodes batch i+1 while batch i is injected and trained on. A tag
(the batch's serial number) travels through the graph with every sample and is checked on the
way out, so a batch can never be matched with another batch's plan whatever the prefetch depth.
"""

from __future__ import annotations

import functools
import io
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

try:
    from nvidia.dali import fn, pipeline_def, types
except ImportError as error:  # an optional dependency: say which package brings it
    raise ImportError(
        "the data path needs NVIDIA DALI: pip install 'dli[cuda12]' (or nvidia-dali-cuda120)"
    ) from error

from dli.common.errors import DliError
from dli.data.imageio import LUMA, MASK_THRESHOLD
from dli.pipeline.file_cache import FileCache, read_file

IMAGES, MASKS, CODES, MATRICES, TAGS = "images", "masks", "codes", "matrices", "tags"
"""Names of the pipeline's external inputs."""

INDEX_DIVISOR = {8: 257, 16: 1}
"""What an index mask's decoded 16-bit value is divided by to give the stored index, by bit depth
(the decoder scales 8-bit PNGs to 16 bits by 257 exactly; 16-bit PNGs keep their values)."""


def mask_code(binary_value: int, index_bits: int = 0) -> np.ndarray:
    """The (2,) uint16 code that tells the pipeline how to read a mask as a class-index map.

    A binary mask (``index_bits`` 0): every defect pixel takes `binary_value` (class id + 1; 0
    for an all-background map). An index mask of 8 or 16 bits: its stored values, as they are.
    """
    if index_bits:
        return np.array([0, INDEX_DIVISOR[index_bits]], dtype=np.uint16)
    return np.array([binary_value, 1], dtype=np.uint16)


@functools.cache
def zero_mask_png() -> np.ndarray:
    """A tiny all-zero grayscale PNG, fed as the mask of defect-free images (resized: all zeros).

    A defect-free image has no label channel, so its mask file (if any) is never read.
    """
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 0).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


RESIZE_MODES: tuple[str, ...] = ("linear", "nearest")
"""Image resizing of `decode_augment`: antialiased linear, or nearest neighbour (the reference's)."""


DECODES: tuple[str, ...] = ("gray", "luma", "rgb")
"""How `decode_augment` turns files into images: ``gray`` (1 channel, for files stored gray:
the decoder's own gray output), ``luma`` (1 channel through RGB: `LUMA` · RGB in float, the rule
of `dli.data.imageio` for colour files) or ``rgb`` (3 channels, gray files repeated)."""


def decode_channels(decode: str) -> int:
    """Image channels a `decode` mode gives."""
    return 3 if decode == "rgb" else 1


@pipeline_def(enable_checkpointing=False)
def decode_augment(
    size: tuple[int, int],
    decoder: str,
    warp: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    resize: str = "linear",
    crop: bool = False,
    decode: str = "gray",
    fit: bool = False,
):
    """Decode (`decode`, see `DECODES`), resize to `size`, warp image and mask by the same matrix, normalize.

    Outputs per sample: the image float32 normalized as (x - mean[c]) / std[c] on [0, 1]
    intensities, (H, W, 1) for one channel, (3, H, W) for three (channel-first, what the model
    takes); the class-index map (H, W, 1) uint8 (0 background, k + 1 where class k), read
    from the mask by its code (`mask_code`): a binary mask is defect where its stored value is
    > `MASK_THRESHOLD` in its own bit depth (any channel of a colour or palette mask, as
    `read_mask` reads it), an index mask gives its stored values; the tag (1,) int64. Images are
    resized with antialiased linear interpolation (`resize` ``linear``) or nearest neighbour
    (``nearest``), masks always with nearest neighbour so their edges are not blended (nor their
    class indices mixed); the warp uses linear interpolation for
    images and nearest for masks, with the same matrix, so both stay aligned. Pixels mapped
    from outside the image repeat its border (DALI's default: no fill value). `decoder` is
    "cpu" or "mixed" (nvJPEG on the GPU) for the images; masks always decode on the CPU. With
    `crop` nothing is resized: each sample's matrix maps its native pixels into the `size`
    output (`dli.pipeline.crops` folds the crop, and any `--scale`, into it). With `fit`
    (`--aspect fit`) the resize keeps the aspect ratio (longer side = `size`) and the image is
    padded at the bottom and right to `size` with the mean intensity (averaged over the channels:
    0 after a gray image's normalization), the mask with 0. Element-wise
    work is done here, on DALI's threads, rather than on the training loop's.
    """
    images = fn.external_source(name=IMAGES, dtype=types.UINT8, ndim=1)
    masks = fn.external_source(name=MASKS, dtype=types.UINT8, ndim=1)
    codes = fn.external_source(name=CODES, dtype=types.UINT16, ndim=1)
    tags = fn.external_source(name=TAGS, dtype=types.INT64, ndim=1)
    images = fn.decoders.image(
        images, device=decoder, output_type=types.GRAY if decode == "gray" else types.RGB
    )
    if decode == "luma":  # before resizing: one channel to resize and warp instead of three
        images = fn.coord_transform(images, M=list(LUMA), dtype=types.FLOAT)
    # Masks keep their own bit depth: a 16-bit 0/1 mask decoded to 8 bits would lose every
    # defect pixel, and a 16-bit index mask its values. RGB output at 16 bits holds every mask
    # kind (grayscale of any depth, palette, RGB(A)); a binary mask's pixel is defect where any
    # channel is > MASK_THRESHOLD. They decode on the CPU in both pipelines (the mixed decoder
    # decodes PNGs on the CPU too) and move to the GPU as class-index bytes.
    decoded = fn.decoders.image(masks, device="cpu", output_type=types.RGB, dtype=types.UINT16)
    binary_value, divisor = codes[0], codes[1]
    defect = fn.reductions.max(decoded, axes=[2], keep_dims=True) > MASK_THRESHOLD
    index = decoded[:, :, 0:1] // divisor
    labels = defect * binary_value + (binary_value == 0) * index
    masks = fn.reshape(fn.cast(labels, dtype=types.UINT8), layout="HWC")
    if decoder == "mixed":
        masks = masks.gpu()
    if crop:
        images = fn.cast(images, dtype=types.FLOAT)
    else:
        aspect = {"mode": "not_larger"} if fit else {}  # without `fit`: exactly the stretch of before
        if resize == "nearest":
            images = fn.resize(images, size=size, **aspect, interp_type=types.INTERP_NN, dtype=types.FLOAT)
        else:
            images = fn.resize(
                images,
                size=size,
                **aspect,
                interp_type=types.INTERP_LINEAR,
                antialias=True,
                dtype=types.FLOAT,
            )
        masks = fn.resize(masks, size=size, **aspect, interp_type=types.INTERP_NN)
        if fit:
            fill = 255.0 * sum(mean) / len(mean)  # one value for every channel (`fit_pad_values`)
            images = fn.pad(images, axis_names="HW", shape=size, fill_value=fill)
            masks = fn.pad(masks, axis_names="HW", shape=size, fill_value=0)
    if warp:
        matrices = fn.external_source(name=MATRICES, dtype=types.FLOAT, ndim=2)
        images = fn.warp_affine(
            images, matrix=matrices, size=size, inverse_map=False, interp_type=types.INTERP_LINEAR
        )
        masks = fn.warp_affine(
            masks, matrix=matrices, size=size, inverse_map=False, interp_type=types.INTERP_NN
        )
    if decode_channels(decode) == 1:
        images = (images - 255.0 * mean[0]) * (1.0 / (255.0 * std[0]))
    else:
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255.0 * m for m in mean],
            std=[255.0 * s for s in std],
        )
    return images, masks, tags


@dataclass(frozen=True)
class Work:
    """One iteration's input: the files to decode and the matrix of each.

    Attributes:
        serial: the batch's number in feeding order (the tag checked on output).
        images: image file of each sample (batch images first, then sources).
        masks: mask of each sample: a file, encoded PNG bytes (uint8 array), or None for an
            all-zero mask.
        matrices: (M, 2, 3) float32 augmentation per sample, or None when the pipeline does not warp.
        codes: (M, 2) uint16 `mask_code` of each mask; None: every mask binary of class 0.
    """

    serial: int
    images: tuple[str, ...]
    masks: tuple[str | np.ndarray | None, ...]
    matrices: np.ndarray | None
    codes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class Decoded:
    """The pipeline's output for one `Work`, still as DALI tensor lists.

    Attributes:
        images: M normalized images, (H, W, 1) or (3, H, W) float32 (`decode_augment`).
        masks: M class-index maps (H, W, 1) uint8 (0 background, k + 1 where class k).
    """

    images: Any
    masks: Any

    def to_torch(
        self, channels: int, size: tuple[int, int], device: torch.device, cuda_stream: object = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The outputs copied into (M, channels, H, W) normalized images and (M, H, W) uint8
        class-index maps on `device` (ordered on `cuda_stream` for a GPU pipeline)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        height, width = size
        count = len(self.images)
        if channels == 3:  # DALI writes them channel-first
            images = torch.empty((count, 3, height, width), dtype=torch.float32, device=device)
        else:
            images = torch.empty((count, height, width, 1), dtype=torch.float32, device=device)
        masks = torch.empty((count, height, width, 1), dtype=torch.uint8, device=device)
        feed_ndarray(self.images.as_tensor(), images, cuda_stream=cuda_stream)
        feed_ndarray(self.masks.as_tensor(), masks, cuda_stream=cuda_stream)
        # Channel-last with a single channel has the memory layout of channel-first: views, no copies.
        return images.view(count, channels, height, width), masks.view(count, height, width)


def _reason(error: Exception) -> str:
    """The line of a DALI error that says what went wrong (it follows "encountered:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    return lines[0] if lines else type(error).__name__


class DecodePipeline:
    """A built `decode_augment` pipeline with explicit, ordered feeding and fetching.

    `submit` feeds one `Work` and schedules its run; `fetch` returns the outputs of the oldest
    submitted work. At most `prefetch` works are in flight. `drain` discards the outputs of
    works submitted but never fetched (an iteration stopped early), so the next one starts clean.

    Args:
        size: (H, W) of the outputs.
        max_batch_size: the most samples one `Work` may hold.
        warp: whether works carry matrices (training) or images are only resized (evaluation).
        device_id: None for a CPU pipeline, else the CUDA device to decode and augment on.
        mean, std: output normalization per image channel, on [0, 1] intensities.
        resize: image resizing, one of `RESIZE_MODES`.
        decode: how files become images, one of `DECODES` (1 channel: ``gray``, ``luma``; 3: ``rgb``).
        num_threads: DALI's CPU worker threads.
        prefetch: the most works in flight at once.
        crop: samples are cut from native-resolution images by their matrices (no resize; needs `warp`).
        fit: resize keeping the aspect ratio and pad (`--aspect fit`) instead of stretching.
        files: where `submit` reads the files (`dli.pipeline.file_cache`); None: from disk each time.
    """

    def __init__(
        self,
        size: tuple[int, int],
        *,
        max_batch_size: int,
        warp: bool,
        device_id: int | None,
        mean: float | tuple[float, ...] = 0.0,
        std: float | tuple[float, ...] = 1.0,
        resize: str = "linear",
        num_threads: int = 2,
        prefetch: int = 2,
        crop: bool = False,
        decode: str = "gray",
        fit: bool = False,
        files: FileCache | None = None,
    ) -> None:
        if resize not in RESIZE_MODES:
            raise DliError(f"resize {resize!r}: choose from {', '.join(RESIZE_MODES)}")
        if decode not in DECODES:
            raise DliError(f"decode {decode!r}: choose from {', '.join(DECODES)}")
        self.channels = decode_channels(decode)
        mean = tuple(float(v) for v in np.broadcast_to(np.asarray(mean, np.float64), (self.channels,)))
        std = tuple(float(v) for v in np.broadcast_to(np.asarray(std, np.float64), (self.channels,)))
        self.size, self.warp, self.device_id, self.prefetch = size, warp, device_id, prefetch
        self.files = files
        self.gpu = device_id is not None
        self._pipe = decode_augment(
            size=size,
            decoder="mixed" if self.gpu else "cpu",
            warp=warp,
            mean=mean,
            std=std,
            resize=resize,
            crop=crop,
            decode=decode,
            fit=fit,
            batch_size=max_batch_size,
            num_threads=num_threads,
            device_id=device_id,
            # Prefetching is ours (`submit` ahead, at most `prefetch` in flight). With DALI's own
            # depth above 1 the first `schedule_run` would run that many iterations at once,
            # which an explicitly fed pipeline cannot always supply (an epoch of one batch).
            # The dynamic executor runs every scheduled iteration in the background regardless.
            prefetch_queue_depth=1,
            exec_dynamic=True,
        )
        self._pipe.build()
        self._in_flight: deque[Work] = deque()

    @property
    def max_batch_size(self) -> int:
        return int(self._pipe.max_batch_size)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def submit(self, work: Work) -> None:
        """Feed `work` and schedule its run (reads the files here, decodes asynchronously)."""
        if len(self._in_flight) >= self.prefetch:
            raise RuntimeError(f"{len(self._in_flight)} batches already in flight (prefetch {self.prefetch})")
        if not 0 < len(work) <= self.max_batch_size:
            raise ValueError(f"a batch of {len(work)} samples does not fit (1..{self.max_batch_size})")
        if (work.matrices is not None) != self.warp:
            raise ValueError("matrices must be given exactly when the pipeline warps")
        # Every file is read before anything is fed, so a missing one leaves the pipeline intact.
        zero = zero_mask_png()
        read = read_file if self.files is None else self.files.read
        images = [read(p) for p in work.images]
        masks = [zero if p is None else p if isinstance(p, np.ndarray) else read(p) for p in work.masks]
        codes = work.codes if work.codes is not None else np.tile(mask_code(1), (len(work), 1))
        self._pipe.feed_input(IMAGES, images)
        self._pipe.feed_input(MASKS, masks)
        # Inputs of one shape per sample go in as one dense array: DALI converts a list sample by sample.
        self._pipe.feed_input(CODES, np.ascontiguousarray(codes, dtype=np.uint16))
        self._pipe.feed_input(TAGS, np.full((len(work), 1), work.serial, dtype=np.int64))
        if work.matrices is not None:
            self._pipe.feed_input(MATRICES, np.ascontiguousarray(work.matrices, dtype=np.float32))
        self._pipe.schedule_run()
        self._in_flight.append(work)

    def fetch(self, cuda_stream: object = None) -> tuple[Work, Decoded]:
        """The oldest submitted work and its outputs (ready on `cuda_stream` for a GPU pipeline)."""
        if not self._in_flight:
            raise RuntimeError("nothing submitted to fetch")
        work = self._in_flight.popleft()
        try:
            images, masks, tags = (
                self._pipe.outputs(cuda_stream=cuda_stream) if self.gpu else self._pipe.outputs()
            )
        except RuntimeError as error:
            raise DliError(
                f"DALI could not decode one of {', '.join(work.images)} or their masks ({_reason(error)})"
            ) from None
        found = {int(np.asarray(t)[0]) for t in tags}
        if found != {work.serial}:
            raise RuntimeError(
                f"pipeline returned batch {sorted(found)} where batch {work.serial} was expected"
            )
        return work, Decoded(images, masks)

    def drain(self) -> int:
        """Fetch and discard every work still in flight; returns how many there were."""
        count = len(self._in_flight)
        while self._in_flight:
            self.fetch()
        return count
