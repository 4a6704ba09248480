"""Segmentation losses of the paper's comparison, on logits, each a pixel term plus soft Dice.

Every method is `0.5 * pixel_term + 0.5 * dice`, with one sigmoid channel per defect class:

- ``bce`` / ``dli``: binary cross-entropy (DLI rebalances the data, not the loss).
- ``focal``: focal loss (Lin et al. 2017), gamma = 2, per pixel.
- ``balanced``: class-balanced BCE (Cui et al. 2019): channel c weighted by
  w_c ∝ (1 - β) / (1 - β^n_c), β = 0.9999, n_c = positive training pixels of class c, the
  weights scaled to average 1 (so equal counts give plain BCE).
- ``wce``: weighted BCE, positive pixels of channel c weighted by pos_weight_c = n_neg_c / n_pos_c
  (negative over positive training pixels of class c), capped at `MAX_POS_WEIGHT`.

Under ``--protocol reference`` (or each setting on its own, see `dli.training.config.PROTOCOL_DEFAULTS`)
the terms are computed as the paper's reference implementation computed them:

- ``wce`` (``--wce-weights pixel-share``): the BCE mean of each class channel, summed over
  classes with weights w_c = (1 - s_c) / (C - 1), where s_c is class c's share of the defect
  pixels of the training masks at their stored resolution (`count_stored_defect_pixels`); the
  weights sum to 1 and no pos_weight is used.
- ``balanced`` (``--balanced-counts wce-weights``): the class-balanced formula applied to that
  weight list w_c as if it held counts, weights scaled to sum 1, summed over the per-class BCE
  means (the same normalization as weights averaging 1 over a mean).
- ``focal`` (``--focal per-class-mean``): sum over classes of BCE_c (1 - exp(-BCE_c))^gamma,
  BCE_c the mean BCE of channel c over the batch.
- Dice (``--dice global``): one soft Dice over every class and pixel of the batch,
  1 - (2 sum(p t) + eps) / (sum p + sum t + eps), eps = 1e-8.

Pixel counts come from the training masks (`count_class_pixels`) and are counted at the
training resolution: an image contributes `fraction_of_defect_pixels * image_size**2` to its
class and `image_size**2` to the total of every channel, which is what the loss sees per epoch.
A class without any positive pixel counts as one pixel, so every weight stays finite.

Losses are computed in float32 whatever the autocast dtype (sums over 10^6 pixels lose too
much in fp16/bf16). The pixel terms are the libraries' own: torch's BCE with logits and
torchvision's sigmoid focal loss. The soft Dice is smp's multilabel Dice (per class over the
batch; classes absent from the batch contribute 0), re-stated in `SoftDiceLoss` so that under
DistributedDataParallel its per-class sums can cover the global batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from dli.data.imageio import read_mask
from dli.data.index_masks import mask_class_pixels
from dli.data.manifest import FREE, Manifest, Sample
from dli.models.metrics import all_reduce_sum

METHODS: tuple[str, ...] = ("bce", "focal", "balanced", "wce", "dli")
"""Training methods: four losses without injection, and `dli` (BCE + Dice on injected batches)."""

CB_BETA = 0.9999
"""β of the class-balanced weights (effective number of samples)."""

FOCAL_GAMMA = 2.0
"""Focusing parameter of the focal loss."""

GLOBAL_DICE_EPS = 1e-8
"""Smoothing term of the global Dice (numerator and denominator), as in the reference."""

MAX_POS_WEIGHT = 1000.0
"""Cap on the weighted-BCE pos_weight: a class covering 1e-5 of the pixels would otherwise weigh
1e5 and swamp the gradient of every other class."""


@dataclass(frozen=True)
class ClassPixelCounts:
    """Positive pixels per defect class and pixels per channel, at the training resolution.

    Attributes:
        positive: defect pixels of each class (index = class id), summed over the training set.
        total: pixels of one channel over the training set (images x image_size**2).
    """

    positive: tuple[float, ...]
    total: float

    @property
    def negative(self) -> tuple[float, ...]:
        return tuple(self.total - p for p in self.positive)

    def to_dict(self) -> dict[str, object]:
        return {"positive": list(self.positive), "total": self.total}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ClassPixelCounts:
        return cls(tuple(float(p) for p in data["positive"]), float(data["total"]))  # type: ignore[union-attr]


def count_class_pixels(
    manifest: Manifest,
    image_size: int,
    *,
    fractions: Mapping[Sample, float] | None = None,
    class_fractions: Mapping[Sample, Sequence[float]] | None = None,
    workers: int | None = None,
) -> ClassPixelCounts:
    """Count defect pixels per class over `manifest`'s masks (formula in the module docstring).

    `fractions` may give a single-class sample's defect-pixel fraction already measured, and
    `class_fractions` any sample's fraction per class (both from
    `dli.data.validation.validate`); other masks are read.
    """
    known = fractions or {}
    known_per_class = class_fractions or {}
    pixels = float(image_size * image_size)
    num_classes = manifest.num_classes

    def defect_fractions(sample: Sample) -> np.ndarray:
        per_class = np.asarray(known_per_class.get(sample, (math.nan,)), dtype=np.float64)
        if not np.isnan(per_class).any() and per_class.size == num_classes:
            return per_class
        out = np.zeros(num_classes)
        fraction = known.get(sample, math.nan)
        if not sample.index_bits and not math.isnan(fraction):
            out[sample.class_id] = fraction
            return out
        if not sample.index_bits:
            out[sample.class_id] = float(read_mask(sample.mask).mean())
            return out
        counts = mask_class_pixels(sample, num_classes)
        with Image.open(sample.mask) as mask:  # its header: counting decoded it already
            size = mask.width * mask.height
        return counts / max(1, size)

    defect = [s for s in manifest.samples if s.class_id != FREE and s.mask is not None]
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PNG decoding releases the GIL
        measured = list(pool.map(defect_fractions, defect))
    positive = [0.0] * num_classes
    for per_class in measured:
        for c in np.flatnonzero(per_class):
            positive[c] += float(per_class[c]) * pixels
    return ClassPixelCounts(tuple(positive), len(manifest) * pixels)


def class_balanced_weights(positive: Sequence[float], beta: float = CB_BETA) -> torch.Tensor:
    """Cui et al.'s per-class weights (1 - β) / (1 - β^n_c), scaled to average 1."""
    counts = torch.tensor([max(float(n), 1.0) for n in positive], dtype=torch.float64)
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (weights * len(weights) / weights.sum()).float()


def positive_weights(counts: ClassPixelCounts, cap: float = MAX_POS_WEIGHT) -> torch.Tensor:
    """Weighted-BCE pos_weight per class: negative over positive pixels, capped at `cap`."""
    ratios = [neg / max(pos, 1.0) for pos, neg in zip(counts.positive, counts.negative, strict=True)]
    return torch.tensor(ratios, dtype=torch.float32).clamp(max=cap)


def count_stored_defect_pixels(manifest: Manifest, *, workers: int | None = None) -> tuple[float, ...]:
    """Defect pixels of each class over `manifest`'s masks at their stored resolution (`read_mask`)."""
    defect = [s for s in manifest.samples if s.class_id != FREE and s.mask is not None]
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PNG decoding releases the GIL
        counts = list(pool.map(lambda sample: mask_class_pixels(sample, manifest.num_classes), defect))
    positive = [0.0] * manifest.num_classes
    for per_class in counts:
        for c in np.flatnonzero(per_class):
            positive[c] += float(per_class[c])
    return tuple(positive)


def pixel_share_weights(positive: Sequence[float]) -> torch.Tensor:
    """Weights (1 - s_c) / (C - 1), s_c = class c's share of all defect pixels (sum 1; C = 1: [1])."""
    counts = torch.tensor([float(n) for n in positive], dtype=torch.float64)
    if len(counts) == 1:
        return torch.ones(1)
    total = counts.sum()
    shares = counts / total if total > 0 else torch.full_like(counts, 1.0 / len(counts))
    return ((1.0 - shares) / (len(counts) - 1)).float()


def class_balanced_weights_of_list(values: Sequence[float], beta: float = CB_BETA) -> torch.Tensor:
    """The class-balanced formula on `values` taken as counts (no clamp to 1), weights summing to 1."""
    counts = torch.tensor([max(float(v), 1e-12) for v in values], dtype=torch.float64)
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (weights / weights.sum()).float()


class ClassWeightedBCE(nn.Module):
    """sum_c w_c * mean BCE of channel c (on logits): the reference's weighted per-class BCE."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights.detach().float().clone())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_class = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return (self.weights * per_class.mean(dim=(0, 2, 3))).sum()


class ClassMeanFocalLoss(nn.Module):
    """sum_c BCE_c (1 - exp(-BCE_c))^gamma, BCE_c the mean BCE of channel c (the reference's focal)."""

    def __init__(self, gamma: float = FOCAL_GAMMA) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        bce = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        per_class = bce.mean(dim=(0, 2, 3))
        return (per_class * (1.0 - torch.exp(-per_class)) ** self.gamma).sum()


class FocalLoss(nn.Module):
    """Mean per-pixel sigmoid focal loss (torchvision's), with optional α balancing."""

    def __init__(self, gamma: float = FOCAL_GAMMA, alpha: float | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.alpha = -1.0 if alpha is None else alpha  # torchvision: alpha < 0 disables it

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss(logits, targets, alpha=self.alpha, gamma=self.gamma, reduction="mean")


Reduce = Callable[[torch.Tensor], torch.Tensor]


class _SumAcrossProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradient too.

    Written here on the public `dist.all_reduce`: torch's autograd-aware variant in
    `torch.distributed.nn` is deprecated in favour of a private module.
    """

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(values.clone(memory_format=torch.contiguous_format))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _SumAcrossProcesses.apply(grad)


def sum_across_processes(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over the processes of a distributed run, differentiably (a copy when alone).

    The backward pass sums the incoming gradients across processes too; after DDP averages the
    parameter gradients, each process's share of a global statistic gets exactly the gradient a
    single process computing that statistic would give it.
    """
    return _SumAcrossProcesses.apply(values)


class SoftDiceLoss(nn.Module):
    """Multilabel soft Dice on logits: 1 - 2 sum(p t) / sum(p + t) per class over the batch, averaged
    over classes, a class with no positive pixel in the batch counting 0 (smp's
    `DiceLoss(mode="multilabel", from_logits=True)`; a test holds the two equal).

    `reduce` sums the per-class statistics (e.g. `sum_across_processes`) before the ratio, so
    several processes compute the Dice of their global batch. Dice is not a mean over images,
    so averaging per-process losses (what DDP does) would not give it; smp's loss has no hook
    for this, hence this short class.
    """

    def __init__(self, *, eps: float = 1e-7, reduce: Reduce | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.reduce = reduce

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probabilities = nn.functional.logsigmoid(logits).exp()  # as smp: stable for large |logits|
        dims = (0, 2, 3)
        stats = torch.stack(
            [(probabilities * targets).sum(dims), (probabilities + targets).sum(dims), targets.sum(dims)]
        )
        if self.reduce is not None:
            stats = self.reduce(stats)
        intersection, cardinality, positives = stats
        score = 2.0 * intersection / cardinality.clamp_min(self.eps)
        return ((1.0 - score) * (positives > 0).to(score.dtype)).mean()


class GlobalSoftDiceLoss(nn.Module):
    """One soft Dice over every class and pixel: 1 - (2 sum(p t) + eps) / (sum p + sum t + eps).

    `reduce` sums the two statistics across processes before the ratio (see `SoftDiceLoss`).
    """

    def __init__(self, *, eps: float = GLOBAL_DICE_EPS, reduce: Reduce | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.reduce = reduce

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probabilities = nn.functional.logsigmoid(logits).exp()
        stats = torch.stack([(probabilities * targets).sum(), (probabilities + targets).sum()])
        if self.reduce is not None:
            stats = self.reduce(stats)
        intersection, cardinality = stats
        return 1.0 - (2.0 * intersection + self.eps) / (cardinality + self.eps)


DICE_LOSSES: dict[str, type[nn.Module]] = {"per-class": SoftDiceLoss, "global": GlobalSoftDiceLoss}
"""The soft Dice of each `--dice` choice."""


class PixelDiceLoss(nn.Module):
    """`pixel_weight * pixel_loss + dice_weight * soft Dice`, computed in float32.

    `last_terms` keeps the two terms of the latest call (detached tensors, no host sync) for logging.
    """

    def __init__(
        self,
        pixel_loss: nn.Module,
        *,
        pixel_weight: float = 0.5,
        dice_weight: float = 0.5,
        dice_reduce: Reduce | None = None,
        dice: str = "per-class",
    ) -> None:
        super().__init__()
        self.pixel_loss = pixel_loss
        self.dice_loss = DICE_LOSSES[dice](reduce=dice_reduce)
        self.pixel_weight = pixel_weight
        self.dice_weight = dice_weight
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            logits, targets = logits.float(), targets.float()
            pixel = self.pixel_loss(logits, targets)
            dice = self.dice_loss(logits, targets)
        self.last_terms = {"pixel": pixel.detach(), "dice": dice.detach()}
        return self.pixel_weight * pixel + self.dice_weight * dice


@dataclass(frozen=True)
class LossSpec:
    """What `build_loss` built, for the run config."""

    method: str
    pixel_term: str
    class_weights: list[float] | None = None
    dice: str = "per-class"
    weight_rule: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def needs_pixel_counts(method: str) -> bool:
    """Whether `method`'s loss weights classes by their training pixel counts."""
    return method in ("balanced", "wce")


@dataclass(frozen=True)
class LossOptions:
    """The protocol-governed choices of the loss (see `dli.training.config.PROTOCOL_DEFAULTS`)."""

    wce_weights: str = "pos-weight"
    balanced_counts: str = "pixels"
    focal: str = "per-pixel"
    dice: str = "per-class"

    @property
    def needs_stored_pixels(self) -> bool:
        """Whether the weights come from defect pixels at the masks' stored resolution."""
        return self.wce_weights == "pixel-share" or self.balanced_counts == "wce-weights"


def build_loss(
    method: str,
    class_pixel_counts: ClassPixelCounts | None = None,
    *,
    options: LossOptions | None = None,
    stored_defect_pixels: Sequence[float] | None = None,
    cb_beta: float = CB_BETA,
    focal_gamma: float = FOCAL_GAMMA,
    max_pos_weight: float = MAX_POS_WEIGHT,
    global_batch: bool = False,
) -> tuple[PixelDiceLoss, LossSpec]:
    """The loss of a training method (`METHODS`) and a record of its settings.

    `class_pixel_counts` is required by ``balanced`` and ``wce`` (see `count_class_pixels`);
    `stored_defect_pixels` (`count_stored_defect_pixels`) by the reference's weights
    (`LossOptions.needs_stored_pixels`). `global_batch`: the Dice term sums its statistics
    across the processes of the current group (training under DDP: every process must call
    the loss once per step).
    """
    options = options or LossOptions()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if needs_pixel_counts(method) and class_pixel_counts is None:
        raise ValueError(f"method {method!r} needs the training set's class pixel counts")
    if needs_pixel_counts(method) and options.needs_stored_pixels and stored_defect_pixels is None:
        raise ValueError(f"method {method!r} needs the training masks' defect pixels per class")
    dice_reduce = sum_across_processes if global_batch else None
    dice = options.dice
    if method in ("bce", "dli"):
        pixel: nn.Module = nn.BCEWithLogitsLoss()
        spec = LossSpec(method, "bce", dice=dice)
    elif method == "focal" and options.focal == "per-class-mean":
        pixel = ClassMeanFocalLoss(focal_gamma)
        spec = LossSpec(method, f"focal of per-class mean bce(gamma={focal_gamma}), summed", dice=dice)
    elif method == "focal":
        pixel, spec = FocalLoss(focal_gamma), LossSpec(method, f"focal(gamma={focal_gamma})", dice=dice)
    elif method == "wce" and options.wce_weights == "pixel-share":
        assert stored_defect_pixels is not None
        weights = pixel_share_weights(stored_defect_pixels)
        pixel = ClassWeightedBCE(weights)
        spec = LossSpec(
            method,
            "per-class mean bce, weighted sum",
            weights.tolist(),
            dice,
            "(1 - share of training defect pixels) / (C - 1)",
        )
    elif method == "balanced" and options.balanced_counts == "wce-weights":
        assert stored_defect_pixels is not None
        weights = class_balanced_weights_of_list(pixel_share_weights(stored_defect_pixels).tolist(), cb_beta)
        pixel = ClassWeightedBCE(weights)
        spec = LossSpec(
            method,
            f"class-balanced per-class mean bce(beta={cb_beta}), weighted sum",
            weights.tolist(),
            dice,
            "effective number of the pixel-share weight list, scaled to sum 1",
        )
    elif method == "balanced":
        assert class_pixel_counts is not None
        weights = class_balanced_weights(class_pixel_counts.positive, cb_beta)
        # BCEWithLogitsLoss's `weight` scales every element of channel c by w_c; the mean over
        # equally sized channels is then the weights' average of the per-channel BCE.
        pixel = nn.BCEWithLogitsLoss(weight=weights.view(-1, 1, 1))
        spec = LossSpec(
            method,
            f"class-balanced bce(beta={cb_beta})",
            weights.tolist(),
            dice,
            "effective number of positive training pixels, scaled to average 1",
        )
    else:
        assert class_pixel_counts is not None
        weights = positive_weights(class_pixel_counts, max_pos_weight)
        pixel = nn.BCEWithLogitsLoss(pos_weight=weights.view(-1, 1, 1))
        spec = LossSpec(
            method,
            f"weighted bce(max_pos_weight={max_pos_weight})",
            weights.tolist(),
            dice,
            "pos_weight = negative / positive training pixels, capped",
        )
    return PixelDiceLoss(pixel, dice_reduce=dice_reduce, dice=dice), spec
