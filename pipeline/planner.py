"""Dynamic Label Injection planning: which defect goes into which defect-free slot, and how.

The planner works on labels alone (class ids and manifest indices, no pixels, no I/O): it draws
every random choice of a batch (the class of each injection, its source image, Poisson or
cut-paste, the source's augmentation matrix, the batch images' flips) from one NumPy
generator and records them in a `Plan`. DALI and the kernels then only apply the plan, so a
recorded plan replays its batch exactly and plans can be computed ahead of the GPU.

Rule (Caruso et al., reference implementation): for each canvas slot in batch order, the
class c* to inject is the one with the fewest occurrences in the batch so far, injections
already planned included. An image holding several classes counts once for each of them. Ties
are broken at random (the reference's ``argmin`` always favours the lowest class id, which would
bias small batches towards class 0). Classes without any donor cannot be injected and are left
out of the count. A donor is one defect instance (`dli.data.instances.DonorTable`): the pool
maps each class to donor ids, and `Injection.source` is the manifest index of the donor's image.

Canvases (`DliConfig.canvas`): ``free`` injects into defect-free images only (the reference);
``any`` into every image of the batch; ``auto`` into the defect-free images when the batch has
some, else into every image. A defect goes into a defective image only where it misses that
image's defects: its region's box (after augmentation, widened by the dilation radius) must
be clear of the canvas's defect boxes, else the planner tries other positions
(`dli.pipeline.placement`) and leaves the slot without an injection when none fits.

Fill policies (`DliConfig.fill`):

``all-free``
    Every defect-free slot receives a defect (the reference behaviour). By induction, every
    class that received an injection ends at most one above the batch's final minimum, so the
    final spread max - min is at most max(1, (initial max) - (final min)), and at most 1 once
    there are enough free slots to level the batch.
``until-uniform``
    Stops as soon as every injectable class has the same, non-zero count; the remaining free
    slots stay defect-free. (Requiring a non-zero count makes a batch with no defect at all
    receive one defect of each class instead of none.)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any, Literal

import numpy as np

from dli.common.errors import DliError
from dli.data.manifest import FREE
from dli.pipeline.augment import DEFAULT_DEFECT_AUGMENT, AffineAugment, Size, identities
from dli.pipeline.placement import PLACEMENT_MARGIN, place

Method = Literal["poisson", "paste"]
Fill = Literal["all-free", "until-uniform"]

FILL_POLICIES: tuple[str, ...] = ("all-free", "until-uniform")
CANVASES: tuple[str, ...] = ("free", "any", "auto")
"""Which batch images may receive a defect (see the module docstring)."""
METHOD_CODES: dict[str, str] = {"poisson": "P", "paste": "CP"}
"""Short names of the injection methods, as in the paper (P = Poisson, CP = cut-paste)."""


class EmptyClassWarning(UserWarning):
    """A defect class has no training image, so Dynamic Label Injection can never inject it."""


POISSON_LABELS: tuple[str, ...] = ("source", "dilated")
POISSON_SOLVERS: tuple[str, ...] = ("direct", "cg")
"""How a Poisson injection is solved (`DliConfig.poisson_solver`)."""
POISSON_WINDOWS: tuple[str, ...] = ("box", "image")
"""The direct solver's window (`DliConfig.poisson_window`)."""
"""What a Poisson injection labels (`DliConfig.poisson_label`)."""


@dataclass(frozen=True)
class DliConfig:
    """Settings of Dynamic Label Injection.

    Attributes:
        poisson_prob: probability that an injection is Poisson-blended rather than cut-pasted
            (0 = DLI-CP, 1 = DLI-P, 0.5 = the paper's hybrid DLI-HH).
        fill: ``all-free`` or ``until-uniform`` (see the module docstring).
        dilate_radius: the Poisson blending domain is the source mask dilated by a
            (2r+1) x (2r+1) square (r = 2: the reference's 5x5 max-pool).
        mixed_gradients: Poisson guidance keeps the stronger of the source and target
            gradients per edge (as the reference does).
        poisson_tol: relative residual at which the Poisson solve of an image stops. 1e-4
            reaches float32's own accuracy: on all 392 Magnetic Tile masks at 256² and 512²
            the result is as close to the exact solve as at 1e-5 (within 0.07 and 0.18 gray
            levels), in a fifth fewer iterations (docs/kernels.md).
        poisson_label: label of a Poisson injection: ``source`` (the source's own mask) or
            ``dilated`` (the blending domain, as the reference implementation labels it).
        poisson_solver: ``direct`` (one sine-transform solve per window,
            `dli.kernels.poisson.direct`) or ``cg`` (the region's own problem, iterated to
            `poisson_tol`).
        poisson_window: the direct solver's window: the region's ``box`` widened by a margin, or
            the whole ``image`` (the reference implementation's choice).
        augment: per-class augmentation of the injected sources (index = class id); None
            picks it from the class names (`dli.pipeline.augment.defect_augments`).
        canvas: which batch images receive defects, ``free``, ``any`` or ``auto`` (module docstring).
    """

    poisson_prob: float = 0.5
    fill: Fill = "all-free"
    dilate_radius: int = 2
    mixed_gradients: bool = True
    poisson_tol: float = 1e-4
    augment: tuple[AffineAugment, ...] | None = None
    poisson_label: str = "source"
    poisson_solver: str = "direct"
    poisson_window: str = "box"
    canvas: str = "free"

    def __post_init__(self) -> None:
        if not 0.0 <= self.poisson_prob <= 1.0:
            raise DliError(f"poisson_prob {self.poisson_prob}: must be a probability in [0, 1]")
        if self.fill not in FILL_POLICIES:
            raise DliError(f"fill {self.fill!r}: choose one of {', '.join(FILL_POLICIES)}")
        if self.dilate_radius < 0:
            raise DliError(f"dilate_radius {self.dilate_radius}: must be >= 0")
        if not 0.0 < self.poisson_tol < 1.0:
            raise DliError(f"poisson_tol {self.poisson_tol}: must be in (0, 1)")
        if self.poisson_solver not in POISSON_SOLVERS:
            raise DliError(
                f"poisson_solver {self.poisson_solver!r}: choose one of {', '.join(POISSON_SOLVERS)}"
            )
        if self.poisson_window not in POISSON_WINDOWS:
            raise DliError(
                f"poisson_window {self.poisson_window!r}: choose one of {', '.join(POISSON_WINDOWS)}"
            )
        if self.poisson_label not in POISSON_LABELS:
            raise DliError(f"poisson_label {self.poisson_label!r}: choose one of {', '.join(POISSON_LABELS)}")
        if self.canvas not in CANVASES:
            raise DliError(f"canvas {self.canvas!r}: choose one of {', '.join(CANVASES)}")

    def to_dict(self) -> dict[str, Any]:
        out = {
            "poisson_prob": self.poisson_prob,
            "fill": self.fill,
            "dilate_radius": self.dilate_radius,
            "mixed_gradients": self.mixed_gradients,
            "poisson_tol": self.poisson_tol,
            "poisson_label": self.poisson_label,
            "poisson_solver": self.poisson_solver,
            "poisson_window": self.poisson_window,
            "canvas": self.canvas,
        }
        if self.augment is not None:
            out["augment"] = [a.to_dict() for a in self.augment]
        return out


@dataclass(frozen=True, eq=False)
class Injection:
    """One planned injection.

    Attributes:
        slot: position in the batch of the defect-free image that receives the defect.
        class_id: class of the injected defect (the batch's rarest at that point).
        source: manifest index of the defect image the defect is taken from.
        method: ``poisson`` (seamless cloning) or ``paste`` (cut-paste).
        source_matrix: (2, 3) float32 augmentation of the source, in the output pixel grid
            (convention of `dli.pipeline.augment`).
        donor: the donor's id in its `DonorTable` (-1: the whole mask of image `source`).
    """

    slot: int
    class_id: int
    source: int
    method: Method
    source_matrix: np.ndarray
    donor: int = -1

    @property
    def donor_id(self) -> int:
        """The row of the donor table (boxes, masks) this injection takes: `donor`, else `source`."""
        return self.donor if self.donor >= 0 else self.source

    def to_dict(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "class_id": self.class_id,
            "source": self.source,
            "donor": self.donor,
            "method": self.method,
            "source_matrix": np.round(self.source_matrix.astype(np.float64), 6).tolist(),
        }


@dataclass(frozen=True, eq=False)
class Plan:
    """Everything random about one training batch.

    Attributes:
        batch_indices: manifest index of each batch image.
        class_ids_before: class of each batch image as read (`FREE` = -1 for defect-free).
        class_ids_after: the same after injection (an injected slot takes its defect's class).
        injections: in batch-slot order; the pipeline decodes their sources in this order.
        image_matrices: (N, 2, 3) float32 augmentation (flips) of the batch images.
        num_classes: number of defect classes, for the per-class counts.
        class_sets_before, class_sets_after: every class each image holds, before and after
            injection (default: from the class ids, one class or none per image).
    """

    batch_indices: tuple[int, ...]
    class_ids_before: tuple[int, ...]
    class_ids_after: tuple[int, ...]
    injections: tuple[Injection, ...]
    image_matrices: np.ndarray
    num_classes: int
    class_sets_before: tuple[tuple[int, ...], ...] = ()
    class_sets_after: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        for name, ids in (
            ("class_sets_before", self.class_ids_before),
            ("class_sets_after", self.class_ids_after),
        ):
            if not getattr(self, name):
                object.__setattr__(self, name, tuple(() if c == FREE else (int(c),) for c in ids))

    def __len__(self) -> int:
        return len(self.batch_indices)

    def counts(self, after: bool = True) -> np.ndarray:
        """Images holding each defect class in the batch, after (default) or before injection."""
        return _class_counts(self.class_sets_after if after else self.class_sets_before, self.num_classes)

    @property
    def source_indices(self) -> tuple[int, ...]:
        return tuple(i.source for i in self.injections)

    def source_matrices(self) -> np.ndarray:
        """(K, 2, 3) float32 augmentation matrices of the K injected sources."""
        if not self.injections:
            return np.zeros((0, 2, 3), dtype=np.float32)
        return np.stack([i.source_matrix for i in self.injections]).astype(np.float32)

    def take(self, positions: Sequence[int]) -> Plan:
        """The plan of the sub-batch at `positions` (ascending), injected slots renumbered.

        Several processes each take their part of one plan drawn for the global batch, so the
        global batch is what it would be in a single process (`dli.pipeline.loader`).
        """
        positions = [int(p) for p in positions]
        if any(b <= a for a, b in pairwise(positions)):
            raise ValueError(f"positions {positions} must be strictly ascending")
        if positions and not 0 <= positions[0] <= positions[-1] < len(self):
            raise ValueError(f"positions {positions} are outside a batch of {len(self)}")
        slot_of = {p: i for i, p in enumerate(positions)}
        return Plan(
            batch_indices=tuple(self.batch_indices[p] for p in positions),
            class_ids_before=tuple(self.class_ids_before[p] for p in positions),
            class_ids_after=tuple(self.class_ids_after[p] for p in positions),
            injections=tuple(replace(i, slot=slot_of[i.slot]) for i in self.injections if i.slot in slot_of),
            image_matrices=self.image_matrices[positions].copy(),
            num_classes=self.num_classes,
            class_sets_before=tuple(self.class_sets_before[p] for p in positions),
            class_sets_after=tuple(self.class_sets_after[p] for p in positions),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record of the plan (enough to replay the batch)."""
        return {
            "batch_indices": list(self.batch_indices),
            "class_ids_before": list(self.class_ids_before),
            "class_ids_after": list(self.class_ids_after),
            "injections": [i.to_dict() for i in self.injections],
            "image_matrices": np.round(self.image_matrices.astype(np.float64), 6).tolist(),
            "num_classes": self.num_classes,
            "class_sets_before": [list(s) for s in self.class_sets_before],
            "class_sets_after": [list(s) for s in self.class_sets_after],
        }

    def as_log_line(self, class_names: Sequence[str] | None = None) -> str:
        """One line: class counts before -> after, then each injection (slot <- source class method)."""

        def name(class_id: int) -> str:
            return class_names[class_id] if class_names is not None else str(class_id)

        before = "/".join(str(int(c)) for c in self.counts(after=False))
        after = "/".join(str(int(c)) for c in self.counts(after=True))
        free = sum(1 for c in self.class_ids_before if c == FREE)
        parts = [f"counts {before} -> {after}", f"{len(self.injections)}/{free} free slots injected"]
        into_defects = sum(1 for i in self.injections if self.class_sets_before[i.slot])
        if into_defects:
            parts.append(f"{into_defects} into defective images")
        if self.injections:
            parts.append(
                ", ".join(
                    f"{i.slot}<-#{i.source} {name(i.class_id)} {METHOD_CODES[i.method]}"
                    for i in self.injections
                )
            )
        return "; ".join(parts)


def _class_counts(class_sets: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """Images holding each class (an image of several classes counts for each)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for classes in class_sets:
        for c in classes:
            counts[c] += 1
    return counts


def canvas_slots(class_sets: Sequence[Sequence[int]], canvas: str) -> list[int]:
    """The batch positions that may receive a defect under `canvas` (`DliConfig.canvas`)."""
    free = [i for i, classes in enumerate(class_sets) if not classes]
    if canvas == "free" or (canvas == "auto" and free):
        return free
    return list(range(len(class_sets)))


def injectable_classes(pool: Mapping[int, Sequence[int]], num_classes: int) -> list[int]:
    """The defect classes with at least one source image in `pool`."""
    return [c for c in range(num_classes) if len(pool.get(c, ())) > 0]


def _is_uniform(counts: np.ndarray) -> bool:
    return bool(counts.size) and counts.min() == counts.max() and counts.min() > 0


def plan_batch(
    class_ids: Sequence[int],
    pool: Mapping[int, Sequence[int]],
    rng: np.random.Generator,
    config: DliConfig,
    num_classes: int,
    *,
    size: Size = (256, 256),
    batch_indices: Sequence[int] | None = None,
    image_matrices: np.ndarray | None = None,
    augment: Sequence[AffineAugment] | None = None,
    class_sets: Sequence[Sequence[int]] | None = None,
    donor_samples: Sequence[int] | np.ndarray | None = None,
    donor_boxes: np.ndarray | None = None,
    canvas_boxes: Sequence[np.ndarray] | None = None,
) -> Plan:
    """Plan the injections of one batch (rule, canvases and fill policies in the module docstring).

    Args:
        class_ids: class of each batch image (`FREE` for defect-free; its first class when it
            holds several).
        pool: donor ids per defect class; without `donor_samples` a donor id is the manifest
            index of a defect image (its whole mask is the donor).
        rng: where every random choice is drawn from, in a fixed order.
        config: the injection settings.
        num_classes: number of defect classes.
        size: (H, W) grid the source augmentation matrices are expressed in.
        batch_indices: manifest index of each batch image (default: 0..N-1), recorded only.
        image_matrices: (N, 2, 3) augmentation of the batch images, recorded only (default identity).
        augment: per-class source augmentation (default `config.augment`, else a flip +
            mild shift-scale-rotate for every class).
        class_sets: every class of each batch image (default: from `class_ids`).
        donor_samples: the manifest index of each donor id's image (`DonorTable.sample`).
        donor_boxes: (K, 4) box of each donor id as fractions (`DonorTable.boxes`).
        canvas_boxes: defect boxes (m, 4) of each manifest index, as fractions; with
            `donor_boxes` they let a defect go into a defective image, clear of its defects.

    Within a batch, donors of one class are drawn without replacement while the class has
    unused ones (as the reference does), uniformly among them.
    """
    class_ids = [int(c) for c in class_ids]
    n = len(class_ids)
    if class_sets is None:
        class_sets = [() if c == FREE else (c,) for c in class_ids]
    sets = [tuple(sorted({int(c) for c in s})) for s in class_sets]
    if len(sets) != n or any((s[0] if s else FREE) != c for s, c in zip(sets, class_ids, strict=True)):
        raise ValueError("class_sets must hold each image's classes, its class id first")
    bad = [c for c in class_ids if c != FREE and not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class ids {bad} are outside [0, {num_classes}) and not FREE ({FREE})")
    batch_indices = tuple(range(n)) if batch_indices is None else tuple(int(i) for i in batch_indices)
    if len(batch_indices) != n:
        raise ValueError(f"{len(batch_indices)} batch indices for {n} class ids")
    image_matrices = identities(n) if image_matrices is None else np.asarray(image_matrices, np.float32)
    if image_matrices.shape != (n, 2, 3):
        raise ValueError(f"image_matrices must be ({n}, 2, 3), got {image_matrices.shape}")
    augment = augment if augment is not None else config.augment
    if augment is None:
        augment = (DEFAULT_DEFECT_AUGMENT,) * num_classes
    if len(augment) != num_classes:
        raise ValueError(f"{len(augment)} augmentations for {num_classes} classes")

    available = np.array(injectable_classes(pool, num_classes), dtype=np.int64)
    counts = _class_counts(sets, num_classes)
    after = list(sets)
    used: dict[int, set[int]] = {int(c): set() for c in available}
    injections: list[Injection] = []
    pad = config.dilate_radius + PLACEMENT_MARGIN
    for slot in canvas_slots(sets, config.canvas):
        if available.size == 0:
            break
        current = counts[available]
        if config.fill == "until-uniform" and _is_uniform(current):
            break
        rarest = available[current == current.min()]
        class_id = int(rarest[rng.integers(rarest.size)]) if rarest.size > 1 else int(rarest[0])
        donors = pool[class_id]
        unused = [d for d in donors if d not in used[class_id]] or list(donors)
        donor = int(unused[rng.integers(len(unused))])
        method: Method = "poisson" if rng.random() < config.poisson_prob else "paste"
        matrix = augment[class_id].sample(rng, size)
        if sets[slot]:  # a defective canvas: the defect must miss the canvas's own
            if donor_boxes is None or canvas_boxes is None:
                continue
            placed = place(
                donor_boxes[donor],
                matrix,
                np.asarray(canvas_boxes[batch_indices[slot]], dtype=np.float64).reshape(-1, 4),
                image_matrices[slot],
                size,
                pad,
                rng,
            )
            if placed is None:
                continue
            matrix = placed
        if donor_samples is None:
            injections.append(Injection(slot, class_id, donor, method, matrix))
        else:
            injections.append(Injection(slot, class_id, int(donor_samples[donor]), method, matrix, donor))
        used[class_id].add(donor)
        counts[class_id] += 1
        after[slot] = tuple(sorted({*after[slot], class_id}))
    return Plan(
        batch_indices=batch_indices,
        class_ids_before=tuple(class_ids),
        class_ids_after=tuple(s[0] if s else FREE for s in after),
        injections=tuple(injections),
        image_matrices=image_matrices,
        num_classes=num_classes,
        class_sets_before=tuple(sets),
        class_sets_after=tuple(after),
    )


@dataclass
class Planner:
    """`plan_batch` bound to a training set's donors; warns once about empty classes.

    Attributes:
        pool: donor ids per defect class (see `plan_batch`).
        num_classes: number of defect classes.
        config: the injection settings.
        size: (H, W) output grid.
        augment: per-class source augmentation.
        class_names: for the warning and log lines.
        donor_samples, donor_boxes, canvas_boxes: as in `plan_batch`.
    """

    pool: Mapping[int, Sequence[int]]
    num_classes: int
    config: DliConfig
    size: Size
    augment: tuple[AffineAugment, ...]
    class_names: tuple[str, ...] = ()
    donor_samples: Sequence[int] | np.ndarray | None = None
    donor_boxes: np.ndarray | None = None
    canvas_boxes: Sequence[np.ndarray] | None = None
    empty_classes: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        available = set(injectable_classes(self.pool, self.num_classes))
        self.empty_classes = tuple(c for c in range(self.num_classes) if c not in available)
        if self.empty_classes:
            names = [self.class_names[c] if self.class_names else str(c) for c in self.empty_classes]
            warnings.warn(
                f"no training defect image of class(es) {', '.join(names)}: Dynamic Label Injection "
                "leaves them out and never injects them",
                EmptyClassWarning,
                stacklevel=3,
            )

    def plan(
        self,
        class_ids: Sequence[int],
        rng: np.random.Generator,
        *,
        batch_indices: Sequence[int] | None = None,
        image_matrices: np.ndarray | None = None,
        class_sets: Sequence[Sequence[int]] | None = None,
    ) -> Plan:
        return plan_batch(
            class_ids,
            self.pool,
            rng,
            self.config,
            self.num_classes,
            size=self.size,
            batch_indices=batch_indices,
            image_matrices=image_matrices,
            augment=self.augment,
            class_sets=class_sets,
            donor_samples=self.donor_samples,
            donor_boxes=self.donor_boxes,
            canvas_boxes=self.canvas_boxes,
        )
