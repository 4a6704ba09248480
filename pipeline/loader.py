"""The training and evaluation loader: manifest in, normalized batches with labels out.

One iteration, in order:

1. the host picks the batch's manifest indices (this epoch's shuffled order, this shard's part);
2. for training, the planner draws the global batch's flips and its DLI plan from a generator
   seeded by (seed, epoch, batch): labels only, no pixels; the shard keeps its part of the plan;
3. DALI decodes the N batch images with their masks, resizes them to H x W and warps each by
   its matrix (`dli.pipeline.dali`), a few batches ahead; with them, unwarped, each donor the
   plan injects that the loader does not keep yet (`dli.pipeline.donor_cache`);
4. on the training device, label channels are built from the decoded class-index maps (channel
   c = pixels of value c + 1, one comparison), the K sources are the kept donors warped by the
   plan's matrices, the plan's defects are injected (`dli.pipeline.inject`), and gray images
   are repeated into the model's 3 input channels.

A donor (`dli.data.instances.DonorTable`) is one defect instance: its mask, fed to DALI as
an in-memory PNG of its own pixels, is decoded and warped with its image, so an injection
carries one class and that instance's pixels only. With crops a donor's crop changes with
each injection: DALI then decodes the K sources with the batch, each warped by its matrix.

Channels. A loader has 1 (gray) or 3 (RGB) image channels (`channels`; `dli train --channels`).
Gray loaders decode files stored gray with the decoder's gray output, and convert colour files
to their luma (`dli.data.imageio.LUMA`, as `dli predict` does) when the manifest holds any;
RGB loaders repeat gray files into R, G and B. Normalization (`mean`, `std`, per model input
channel, `dli.pipeline.normalization`) is applied in DALI; the model always takes 3 channels.

Shuffling, flips and plans are functions of (seed, epoch, batch index) alone, so the same
seed gives the same plans, and on the CPU the same batches bit for bit; a recorded plan
replays its batch (`Loader.replay`). A run resumed at epoch e sees exactly the batches an
uninterrupted run would. The flips are drawn before the plan from the same generator, so runs
with and without injection see the same images in the same order and orientation.

Sharding (one shard per process of a multi-GPU run). Training: each epoch's permutation is cut
into global batches of k x batch_size images; shard s takes every k-th image of a global batch
from position s, and the same positions of the global batch's plan (`Plan.take`). Every process
thus plans the whole global batch (cheap: labels only) and decodes and injects only its part; the
union of the k parts is, image for image, flip for flip and injection for injection, the batch a
single process with batch size k x batch_size sees, and the rarest-class rule balances the global
batch the optimizer steps on. Every shard has the same number of batches (the last incomplete
global batch is dropped). Evaluation: shard s takes images s, s + k, s + 2k, ... of the manifest,
so every image is scored exactly once; shards differ by at most one image, which is fine because
evaluation sums its counts across processes once, at the end.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dli.common.errors import DliError
from dli.data.instances import DonorTable
from dli.data.manifest import FREE, Manifest, Sample
from dli.kernels.poisson.blend import PoissonInfo
from dli.pipeline.augment import defect_augments, identities, random_flips
from dli.pipeline.batch import Batch
from dli.pipeline.crops import CropConfig, CropSampler, check_crop_fits, crop_matrices, image_sizes
from dli.pipeline.donor_cache import DonorCache
from dli.pipeline.donor_cache import budget as donor_budget
from dli.pipeline.file_cache import FileCache, budget_from_environment
from dli.pipeline.loader_checks import checked_device, checked_image_size, checked_int
from dli.pipeline.normalization import MT_MEAN, MT_STD, any_colour_file, model_statistics, normalized_range
from dli.pipeline.planner import DliConfig, Plan, Planner

CROP_STREAM = 0x63726F70
"""Part of the seed of a batch's crop generator, apart from the plan's ("crop")."""

FLIP_PROBABILITY = 0.5
"""Training flips of batch images: horizontal and vertical, each with this probability."""

HOST_STAGES: tuple[str, ...] = ("plan", "feed", "wait", "assemble")
"""Where the iterating thread spends a batch (`Loader.host_seconds`): planning it and listing its
files; reading the files and handing them to DALI; waiting for DALI's outputs; copying them into
tensors, building labels and issuing the injection."""


@dataclass(frozen=True)
class _Item:
    """One batch on its way through the pipeline: what was fed and the plan behind it."""

    work: Any  # dli.pipeline.dali.Work
    indices: np.ndarray
    plan: Plan | None
    source_boxes: np.ndarray | None = None  # with crops: the sources' boxes as fractions of their crops
    decoded_donors: tuple[int, ...] = ()  # with a donor cache: the donors decoded after the batch


class Loader:
    """Batches of one manifest for one shard; iterate once per epoch (see the module docstring).

    ``train=True``: a new shuffle every epoch (`Loader.set_epoch`), random flips, injection when
    `dli` is given, incomplete last batch dropped unless ``drop_last=False``. ``train=False``:
    manifest order, no augmentation, no injection, last partial batch kept. `channels` 1 or 3;
    `mean`/`std` per image channel (or per model input channel), default Magnetic Tile's;
    `colour_files` whether some image is not stored gray (None: read the headers). Raises
    `DliError` naming any invalid argument.

    Attributes:
        manifest: the samples (for training also the DLI source pool: its defect images).
        num_classes, class_names: the defect classes (label channel c = class c).
        image_size: (H, W) of the output batches.
        channels: image channels, 1 (gray, repeated into the 3 output channels) or 3 (RGB).
        mean, std: per-channel normalization of the 3 output channels (on [0, 1] intensities);
            equal in the three for a gray loader.
        resize: image resizing, ``linear`` (antialiased) or ``nearest`` (masks: always nearest).
        planner: the DLI planner, or None when injection is off.
        files: the encoded files read so far, kept in memory up to a budget
            (`dli.pipeline.file_cache`: ``DLI_FILE_CACHE_MB``), so later epochs read no disk;
            ``keep_files=False`` (a loader iterated once) keeps none.
        donor_cache: training with DLI and no crops: the donors decoded so far, kept on the
            device up to a budget (`dli.pipeline.donor_cache`: ``DLI_DONOR_CACHE_MB``); None
            otherwise (DALI then decodes and warps each source with its batch).
        host_seconds: the iterating thread's seconds per `HOST_STAGES` stage, summed over the
            `host_batches` batches assembled since the loader was built (`time.perf_counter`
            around host calls: no device synchronization; ``plan`` and ``feed`` also hold the
            batches fed ahead that an iteration stopped early never assembled, at most
            `prefetch`). On a GPU the device work is queued, so these are host costs a training
            step must hide; `dli bench` reports them.

    `donors` (training with DLI): a `DonorTable` of the defect instances to inject (the
    training default, `dli.training.datasets.Datasets.donors`), or manifest indices whose whole masks are
    the donors (default: every single-class defect image). `source_boxes` (optional, with
    indices): (len(manifest), 4) defect boxes of the samples as fractions of their size
    (`ValidationReport.mask_boxes`). With boxes a Poisson injection reads nothing back from the
    GPU (`dli.pipeline.inject.region_boxes`). `canvas_boxes` (optional): each sample's defect
    boxes (m, 4), which let the planner place an injection into a defective image's defect-free
    area (`DliConfig.canvas`). A batch's Poisson report is checked when the next batch is
    assembled, so a non-converged solve is warned about one batch late instead of making the
    host wait.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        batch_size: int,
        image_size: int | tuple[int, int] = 256,
        train: bool,
        dli: DliConfig | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        shard_id: int = 0,
        num_shards: int = 1,
        drop_last: bool | None = None,
        num_threads: int = 2,
        prefetch: int = 2,
        donors: Collection[int] | DonorTable | None = None,
        source_boxes: np.ndarray | None = None,
        resize: str = "linear",
        crop: CropConfig | None = None,
        canvas_boxes: list[np.ndarray] | None = None,
        channels: int = 1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        colour_files: bool | None = None,
        fit: bool = False,
        keep_files: bool = True,
    ) -> None:
        if resize not in ("linear", "nearest"):
            raise DliError(f"resize {resize!r}: choose from linear, nearest")
        self.resize = resize
        self.batch_size = checked_int("batch size", batch_size)
        self.crop = crop if train else None
        self.fit = fit
        self.image_size = checked_image_size(image_size if self.crop is None else self.crop.size)
        self.seed = checked_int("seed", seed, minimum=0)
        self.num_shards = checked_int("number of shards", num_shards)
        self.shard_id = checked_int("shard id", shard_id, minimum=0)
        if self.shard_id >= self.num_shards:
            raise DliError(f"shard id {shard_id}: must be < the number of shards ({num_shards})")
        self.num_threads = checked_int("number of threads", num_threads)
        self.prefetch = checked_int("prefetch depth", prefetch)
        if dli is not None and not train:
            raise DliError("label injection applies to training only: pass dli=None when train=False")
        if dli is not None and not isinstance(dli, DliConfig):
            raise DliError(f"dli must be a DliConfig or None, got {type(dli).__name__}")
        if len(manifest) == 0:
            raise DliError(f"dataset {manifest.root} has no images")
        self.manifest, self.train, self.dli = manifest, bool(train), dli
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.device = checked_device(device)
        self.num_classes = manifest.num_classes
        self.class_names = manifest.class_names
        if isinstance(channels, bool) or channels not in (1, 3):
            raise DliError(f"channels {channels!r}: expected 1 or 3")
        self.channels = int(channels)
        self.mean, self.std = model_statistics(
            (MT_MEAN,) if mean is None else mean, (MT_STD,) if std is None else std, self.channels
        )
        # Whether some image file is not stored gray: a gray loader then decodes through RGB.
        self.colour_files = colour_files
        self.epoch = 0
        self._class_ids = np.array(manifest.class_ids(), dtype=np.int64)
        self._class_sets = manifest.class_sets()
        self._codes = np.stack([_mask_code(s) for s in manifest.samples])
        self._class_values: torch.Tensor | None = None  # (1, C, 1, 1) uint8 1..C on the device
        self.planner: Planner | None = None
        self.donors: DonorTable | None = None
        if source_boxes is not None:
            source_boxes = np.asarray(source_boxes, dtype=np.float64)
            if source_boxes.shape != (len(manifest), 4):
                raise DliError(f"source boxes of shape {source_boxes.shape} for {len(manifest)} samples")
        if canvas_boxes is not None and len(canvas_boxes) != len(manifest):
            raise DliError(f"canvas boxes for {len(canvas_boxes)} of {len(manifest)} samples")
        if dli is not None:
            # A defect image whose mask is empty would inject nothing yet count as its class:
            # callers pass `donors` (e.g. from `validate(...).mask_fractions > 0`) to leave such out.
            if isinstance(donors, DonorTable):
                self.donors = donors
            else:
                self.donors = DonorTable.whole_masks(manifest, donors, source_boxes)
            augment = dli.augment if dli.augment is not None else defect_augments(manifest.class_names)
            if len(augment) != self.num_classes:
                raise DliError(f"{len(augment)} class augmentations given for {self.num_classes} classes")
            self.planner = Planner(
                self.donors.pool(self.num_classes),
                self.num_classes,
                dli,
                self.image_size,
                augment,
                manifest.class_names,
                donor_samples=self.donors.sample,
                donor_boxes=self.donors.boxes,
                # Crops are cut after planning, so a defective canvas's boxes are not known in its
                # crop: with crops DLI injects into defect-free images only.
                canvas_boxes=canvas_boxes if self.crop is None else None,
            )
        if self.train and self.num_shards > 1 and not self.drop_last:
            # A ragged last global batch could leave some shards without a batch: their processes
            # would then wait forever for the others' gradients.
            raise DliError("sharded training drops the last incomplete batch: pass drop_last=None or True")
        if len(self) == 0:
            raise DliError(
                f"{len(manifest)} image(s) of {manifest.root} to load (after splitting and any "
                f"--data-fraction): not one full batch of "
                f"{self.batch_size} per shard over {self.num_shards} shard(s); lower the batch size "
                "or keep the last batch"
            )
        self.source_boxes = source_boxes
        self.crops: CropSampler | None = None
        self.donor_crops: CropSampler | None = None
        if self.crop is not None:
            sizes = image_sizes([s.image for s in manifest.samples])
            check_crop_fits(self.crop, sizes, manifest.root)
            self.crops = CropSampler(self.crop, sizes, source_boxes)
            if self.donors is not None:  # a donor's crop holds its own instance
                self.donor_crops = CropSampler(self.crop, sizes[self.donors.sample], self.donors.boxes)
        self._poisson_report: PoissonInfo | None = None  # the last batch's, checked at the next
        self._pipeline: Any = None
        self._serial = 0
        self._active: object | None = None
        # Encoded files kept after their first read; it outlives a rebuilt DALI pipeline.
        self.files = FileCache(budget_from_environment() if keep_files else 0)
        # Decoded donors kept on the device (`dli.pipeline.donor_cache`); with crops a donor's
        # pixels change with each injection, so DALI warps the sources with their batch.
        self.donor_cache: DonorCache | None = None
        if self.donors is not None and self.crops is None:
            size = self.image_size
            self.donor_cache = DonorCache(len(self.donors), self.channels, size, self.device, donor_budget())
        self.reset_host_times()

    # -- epoch layout -------------------------------------------------------------------------------

    @property
    def global_batch_size(self) -> int:
        """Images per step over all shards."""
        return self.batch_size * self.num_shards

    def __len__(self) -> int:
        """Batches per epoch for this shard."""
        n = len(self.manifest)
        if self.train:
            steps = n / self.global_batch_size
            return int(steps) if self.drop_last else math.ceil(steps)
        return math.ceil(len(range(self.shard_id, n, self.num_shards)) / self.batch_size)

    def reset_host_times(self) -> None:
        """Start `host_seconds` and `host_batches` over (e.g. after a warm-up)."""
        self.host_seconds = dict.fromkeys(HOST_STAGES, 0.0)
        self.host_batches = 0

    def host_ms_per_batch(self) -> dict[str, float]:
        """Milliseconds per assembled batch in each `HOST_STAGES` stage since the last reset."""
        batches = max(self.host_batches, 1)
        return {stage: 1e3 * seconds / batches for stage, seconds in self.host_seconds.items()}

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration runs (its shuffle, flips and plans)."""
        self.epoch = checked_int("epoch", epoch, minimum=0)

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """Training: the manifest indices of each global batch (all shards) of `epoch`."""
        if not self.train:
            raise DliError("evaluation loaders have no global batches (each shard scores its own images)")
        epoch = self.epoch if epoch is None else epoch
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.manifest))
        size = self.global_batch_size
        return [order[i : i + size] for i in range(0, len(self) * size, size)]

    def batch_indices(self, epoch: int | None = None) -> list[np.ndarray]:
        """The manifest indices of each batch of `epoch` for this shard."""
        if self.train:
            return [g[self.shard_id :: self.num_shards] for g in self.global_batches(epoch)]
        order = np.arange(self.shard_id, len(self.manifest), self.num_shards)
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _plan(self, epoch: int, batch: int, global_indices: np.ndarray) -> Plan:
        """This shard's part of the plan of global batch `batch`."""
        rng = np.random.default_rng([self.seed, epoch, batch])
        flips = random_flips(rng, len(global_indices), self.image_size, FLIP_PROBABILITY)
        class_ids = self._class_ids[global_indices]
        class_sets = [self._class_sets[i] for i in global_indices]
        if self.planner is not None:
            plan = self.planner.plan(
                class_ids, rng, batch_indices=global_indices, image_matrices=flips, class_sets=class_sets
            )
        else:
            ids = tuple(int(c) for c in class_ids)
            sets = tuple(class_sets)
            indices = tuple(int(i) for i in global_indices)
            plan = Plan(indices, ids, ids, (), flips, self.num_classes, sets, sets)
        if self.num_shards == 1:
            return plan
        return plan.take(range(self.shard_id, len(global_indices), self.num_shards))

    def plans(self, epoch: int | None = None) -> list[Plan]:
        """This shard's plan of every batch of `epoch` (training loaders; cheap: no pixels involved)."""
        if not self.train:
            raise DliError("evaluation loaders have no plans (no augmentation, no injection)")
        epoch = self.epoch if epoch is None else epoch
        return [self._plan(epoch, b, g) for b, g in enumerate(self.global_batches(epoch))]

    # -- pipeline -------------------------------------------------------------------------------------

    def _decode_pipeline(self) -> Any:
        if self._pipeline is None:
            try:
                from dli.pipeline.dali import DecodePipeline
            except ImportError as error:
                raise DliError(str(error)) from None
            if self.channels == 3:
                decode = "rgb"
            else:
                if self.colour_files is None:
                    self.colour_files = any_colour_file(s.image for s in self.manifest.samples)
                decode = "luma" if self.colour_files else "gray"
            self._pipeline = DecodePipeline(
                self.image_size,
                max_batch_size=2 * self.batch_size if self.planner is not None else self.batch_size,
                warp=self.train,
                device_id=self.device.index if self.device.type == "cuda" else None,
                mean=self.mean[: self.channels],
                std=self.std[: self.channels],
                resize=self.resize,
                decode=decode,
                num_threads=self.num_threads,
                prefetch=self.prefetch,
                crop=self.crops is not None,
                fit=self.fit,
                files=self.files,
            )
        return self._pipeline

    def _item(self, indices: np.ndarray, plan: Plan | None) -> _Item:
        from dli.pipeline.dali import Work, mask_code

        samples = self.manifest.samples
        injections = plan.injections if plan is not None else ()
        decoded_donors: tuple[int, ...] = ()
        if self.donor_cache is not None:  # each donor not kept yet, once, unwarped
            decoded_donors = self.donor_cache.missing([i.donor_id for i in injections])
            first = {i.donor_id: i for i in reversed(injections)}
            injections = tuple(first[d] for d in decoded_donors)
        batch = [samples[i] for i in indices]
        images = [str(s.image) for s in batch] + [str(samples[i.source].image) for i in injections]
        # A defect-free image has no label channel, so its mask is never read (zeros are fed).
        masks: list[str | np.ndarray | None] = [None if s.is_free else str(s.mask) for s in batch]
        codes = [self._codes[i] for i in indices]
        for injection in injections:
            donor = injection.donor_id
            assert self.donors is not None
            encoded = self.donors.mask_png(donor)
            if encoded is None:  # the whole mask of a single-class image
                masks.append(str(samples[injection.source].mask))
                codes.append(self._codes[injection.source])
            else:  # the instance's own pixels, as 1 in an in-memory PNG
                masks.append(encoded)
                codes.append(mask_code(injection.class_id + 1))
        matrices, crop_boxes = None, None
        if plan is not None:
            sources = plan.source_matrices() if self.donor_cache is None else identities(len(injections))
            matrices = np.concatenate([plan.image_matrices, sources]).astype(np.float32)
            if self.crops is not None:  # seeded by the batch's own indices: `replay(plan)` cuts the same
                rng = np.random.default_rng([self.seed, CROP_STREAM, *plan.batch_indices])
                defective = self._class_ids[np.asarray(plan.batch_indices, dtype=np.int64)] != FREE
                donors = [i.donor_id for i in plan.injections]
                boxes = None if self.donors is None else self.donors.boxes
                canvases = (plan.batch_indices, defective)
                matrices, crop_boxes = crop_matrices(
                    matrices, rng, self.crops, canvases, donors, self.donor_crops, boxes
                )
        self._serial += 1
        work = Work(self._serial, tuple(images), tuple(masks), matrices, np.stack(codes))
        return _Item(work, indices, plan, crop_boxes, decoded_donors)

    def _items(self, epoch: int) -> Iterator[_Item]:
        if not self.train:
            for indices in self.batch_indices(epoch):
                yield self._item(indices, None)
            return
        for plan in self.plans(epoch):
            yield self._item(np.asarray(plan.batch_indices, dtype=np.int64), plan)

    def _run(self, items: Iterator[_Item], keep_clean: bool) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        """Feed `items` ahead into DALI, then assemble each batch in order."""
        pipeline = self._decode_pipeline()
        token = object()
        self._active = token
        pipeline.drain()  # outputs left by an iteration that stopped early
        pending: deque[_Item] = deque()

        def submit_next() -> None:
            started = time.perf_counter()
            item = next(items, None)
            planned = time.perf_counter()
            if item is not None:
                pipeline.submit(item.work)
                pending.append(item)
            self.host_seconds["plan"] += planned - started
            self.host_seconds["feed"] += time.perf_counter() - planned

        try:
            for _ in range(self.prefetch):
                submit_next()
            while pending:
                if self._active is not token:
                    raise RuntimeError("the loader was iterated again while this iteration was running")
                item = pending.popleft()
                started = time.perf_counter()
                work, decoded = pipeline.fetch(self._cuda_stream())
                self.host_seconds["wait"] += time.perf_counter() - started
                if work is not item.work:
                    raise RuntimeError(f"pipeline returned batch {work.serial} for {item.work.serial}")
                submit_next()  # DALI works on the next batch while this one is assembled and used
                started = time.perf_counter()
                assembled = self._assemble(item, decoded, keep_clean)
                self.host_seconds["assemble"] += time.perf_counter() - started
                self.host_batches += 1
                yield assembled
            self._check_poisson_report()  # the epoch's last batch, once it has been used
        finally:
            if self._active is token:
                self._active = None
                try:
                    pipeline.drain()
                except Exception:  # e.g. at interpreter exit, after DALI was torn down
                    self._pipeline = None  # rebuilt if the loader is iterated again

    def __iter__(self) -> Iterator[Batch]:
        """One epoch (the one set by `set_epoch`) of batches on the loader's device."""
        for batch, _ in self._run(self._items(self.epoch), keep_clean=False):
            yield batch

    def iter_with_clean(self) -> Iterator[tuple[Batch, torch.Tensor]]:
        """Like iterating, but also yields each batch's images before injection: (N, D, H, W) in [0, 1]."""
        std, mean = (self._channel_view(v) for v in (self.std, self.mean))
        for batch, clean in self._run(self._items(self.epoch), keep_clean=True):
            assert clean is not None
            yield batch, clean.mul_(std).add_(mean)

    def _channel_view(self, values: Sequence[float]) -> torch.Tensor:
        """(1, channels, 1, 1) tensor of per-channel `values` on the loader's device."""
        return torch.tensor(values[: self.channels], dtype=torch.float32).view(1, -1, 1, 1).to(self.device)

    def replay(self, plan: Plan) -> Batch:
        """The batch a recorded training `plan` produces (identical on the CPU to the original)."""
        if not self.train:
            raise DliError("only training batches have plans to replay")
        started = time.perf_counter()
        item = self._item(np.asarray(plan.batch_indices, dtype=np.int64), plan)
        self.host_seconds["plan"] += time.perf_counter() - started
        batch, _ = next(self._run(iter([item]), keep_clean=False))
        return batch

    # -- assembly on the device -----------------------------------------------------------------------

    def _cuda_stream(self) -> Any:
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _check_poisson_report(self) -> None:
        """Warn about the previous batch's Poisson solve if it did not converge (its copy is long done)."""
        if self._poisson_report is not None:
            report, self._poisson_report = self._poisson_report, None
            report.check(stacklevel=3)

    def _assemble(self, item: _Item, decoded: Any, keep_clean: bool) -> tuple[Batch, torch.Tensor | None]:
        from dli.pipeline.inject import inject, keep_off_defects, region_boxes, to_device

        images, masks = decoded.to_torch(self.channels, self.image_size, self.device, self._cuda_stream())
        n = len(item.indices)
        batch_images = images[:n]
        before = self._class_ids[item.indices]
        if self._class_values is None:
            values = np.arange(1, self.num_classes + 1, dtype=np.uint8).reshape(1, -1, 1, 1)
            self._class_values = to_device(values, self.device)
        # Label channel c is where the class-index map holds c + 1: one comparison, written as
        # float32 where it lands (no bool temporary to convert).
        height, width = masks.shape[1:]
        labels = torch.empty((n, self.num_classes, height, width), dtype=torch.float32, device=masks.device)
        torch.eq(masks[:n, None], self._class_values, out=labels)
        sources, source_masks = self._sources(item, images[n:], masks[n:])
        clean = batch_images.clone() if keep_clean else None
        after = before
        if item.plan is not None and self.dli is not None and item.plan.injections:
            # Injection is affine-invariant (paste and Poisson alike), so it runs on the normalized
            # images; only the clamp of Poisson overshoot needs the normalized [0, 1] bounds.
            self._check_poisson_report()
            keep_off_defects(source_masks, labels, item.plan)
            boxes = None
            # The donors' boxes (in their crops, with crops); an unknown one (NaN) makes
            # `region_boxes` return None, and the solver measures the regions itself.
            donor_boxes = item.source_boxes
            if donor_boxes is None and self.donors is not None:
                donor_boxes = self.donors.boxes
            if donor_boxes is not None:
                boxes = region_boxes(item.plan, donor_boxes, self.image_size, self.dli.dilate_radius)
            self._poisson_report = inject(
                batch_images,
                labels,
                sources,
                source_masks,
                item.plan,
                self.dli,
                value_range=normalized_range(self.mean, self.std, self.channels),
                boxes=boxes,
            )
            after = np.asarray(item.plan.class_ids_after, dtype=np.int64)
        class_ids = to_device(after.copy(), self.device)
        plan = item.plan if self.dli is not None else None
        if self.channels == 1:
            batch_images = batch_images.expand(-1, 3, -1, -1).contiguous()
        return Batch(batch_images, labels, class_ids, plan), clean

    def _sources(
        self, item: _Item, images: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's injection sources, (K, channels, H, W), and their float32 0/1 masks (K, H, W),
        from the decoded samples after the batch images (warped by DALI, or by the donor cache)."""
        if self.donor_cache is not None and item.plan is not None and item.plan.injections:
            donors = [i.donor_id for i in item.plan.injections]
            matrices = item.plan.source_matrices()
            return self.donor_cache.sources(donors, matrices, item.decoded_donors, images, masks)
        source_masks = torch.empty(masks.shape, dtype=torch.float32, device=masks.device)
        return images, torch.ne(masks, 0, out=source_masks)

    def close(self) -> None:
        """Release the DALI pipeline (it is rebuilt if the loader is iterated again)."""
        self._check_poisson_report()
        if self._pipeline is not None:
            self._pipeline.drain()
            self._pipeline = None
            self._active = None


def _mask_code(sample: Sample) -> np.ndarray:
    """How the pipeline reads `sample`'s mask (`dli.pipeline.dali.mask_code`)."""
    from dli.pipeline.dali import mask_code

    return mask_code(max(sample.class_id, 0) + 1, sample.index_bits)


build_loader = Loader
"""The loader of a manifest: `Loader` itself, under the name callers (and tests) import."""
