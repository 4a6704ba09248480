"""The training and validation data of a run: read, validated, split, and fingerprinted for `--resume`.

`load_datasets` reads a dataset (a folder, a CSV, or the bundled synthetic one when `--data`
is unset), validates every file once (bad files: one `DliError` listing them) and splits it
(``stratified``, ``reference`` or a split folder), keeping each sample's defect fraction and
defect box from validation so that nothing downstream reads the masks again. `data_record`
is what a run stores of its data and `check_same_data` what `--resume` compares it with.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dli.common.errors import DliError
from dli.data.instances import DonorTable, Instance, canvas_boxes
from dli.data.manifest import FREE, Manifest, Sample
from dli.data.splits import GroupCounts
from dli.models.losses import (
    ClassPixelCounts,
    count_class_pixels,
)
from dli.pipeline.normalization import any_colour_file
from dli.training.config import (
    SPLIT_CSV_NAMES,
    TrainConfig,
)


@dataclass(frozen=True)
class Datasets:
    """The training and validation manifests of a run, checked and ready for the loaders.

    Attributes:
        data_path: the dataset actually used (the bundled synthetic one when `--data` is unset).
        mask_fractions: defect-pixel fraction of each validated sample (from `validate`), so
            class pixel counts need not read the masks again.
        mask_boxes: each validated sample's defect bounding box as fractions of its size (from
            `validate`), so injection can size its Poisson windows on the host.
        class_fractions: each validated sample's pixel fraction per class (from `validate`).
        instances: each validated sample's defect instances (from `validate`): DLI's donors.
        groups: the groups on each side of a ``--group-by`` split (None without one).
        image_gray: whether each validated sample's image looks gray (from `validate`), for
            `--channels auto`.
    """

    train: Manifest
    val: Manifest
    data_path: Path
    mask_fractions: Mapping[Sample, float] = field(default_factory=dict)
    mask_boxes: Mapping[Sample, tuple[float, ...]] = field(default_factory=dict)
    class_fractions: Mapping[Sample, tuple[float, ...]] = field(default_factory=dict)
    instances: Mapping[Sample, tuple[Instance, ...]] = field(default_factory=dict)
    groups: GroupCounts | None = None
    image_gray: Mapping[Sample, bool] = field(default_factory=dict)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names

    def donors(self) -> list[int]:
        """Training indices DLI may take defects from: defect images whose mask is not empty."""
        return [
            i
            for i, s in enumerate(self.train.samples)
            if s.class_id != FREE and self.mask_fractions.get(s, 1.0) > 0
        ]

    def colour_files(self) -> bool:
        """Whether some training or validation image file is not stored gray (`any_colour_file`)."""
        return any_colour_file(s.image for s in (*self.train.samples, *self.val.samples))

    def train_looks_gray(self) -> list[bool]:
        """Whether each training image looks gray (True where not measured)."""
        return [self.image_gray.get(s, True) for s in self.train.samples]

    def source_boxes(self) -> np.ndarray:
        """(len(train), 4) defect boxes of the training samples (NaN rows where not measured)."""
        unknown = (float("nan"),) * 4
        return np.array([self.mask_boxes.get(s, unknown) for s in self.train.samples], dtype=np.float64)

    def donor_table(self, unit: str = "auto") -> DonorTable:
        """DLI's donors among the training images, by `unit` (`DonorTable.from_instances`)."""
        return DonorTable.from_instances(self.train, self.instances, unit=unit)

    def canvas_boxes(self) -> list[np.ndarray]:
        """Each training sample's defect boxes (m, 4) as fractions (`instances.canvas_boxes`), so
        injection can stay clear of them (`DliConfig.canvas`)."""
        return canvas_boxes(self.train, self.instances)

    def free_training_images(self) -> int:
        return sum(1 for s in self.train.samples if s.is_free)


def load_datasets(
    data: str | None,
    split: str,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    split_free: bool = False,
    data_fraction: float = 1.0,
    group_by: str | None = None,
) -> Datasets:
    """Read, validate and split a dataset as `dli train` does (bad files: one `DliError` listing them).

    `split` is ``stratified`` (seeded, per class), ``reference`` (the published split CSVs under
    the dataset root) or a folder holding `SPLIT_CSV_NAMES`. `data_fraction` < 1 then keeps that
    share of every training class. `group_by` (with ``stratified``) keeps groups of images on one
    side (`dli.data.splits.group_split`).
    """
    from dli.data.manifest import read_dataset
    from dli.data.splits import apply_fraction, group_split, reference_split, stratified_split
    from dli.data.validation import validate

    if data is None:
        from dli.data.synth import default_dataset

        data_path = default_dataset()
    else:
        data_path = Path(data).absolute()
    groups = None
    if split == "stratified":
        manifest = read_dataset(data_path)
        report = validate(manifest)
        if group_by is not None:
            train, val, groups = group_split(
                manifest, group_by, val_fraction=val_fraction, seed=seed, split_free=split_free
            )
        else:
            train, val = stratified_split(
                manifest, val_fraction=val_fraction, seed=seed, split_free=split_free
            )
    else:
        if split == "reference":
            train, val = reference_split(data_path)
        else:
            train, val = _read_split_folder(Path(split))
        if train.class_names != val.class_names:
            raise DliError(
                f"split {split}: train classes {train.class_names} differ from val {val.class_names}"
            )
        manifest = Manifest(train.samples + val.samples, train.class_names, train.root)
        report = validate(manifest)
    fractions = dict(zip(manifest.samples, report.mask_fractions.tolist(), strict=True))
    boxes = dict(zip(manifest.samples, map(tuple, report.mask_boxes.tolist()), strict=True))
    per_class = dict(zip(manifest.samples, map(tuple, report.class_fractions.tolist()), strict=True))
    instances = dict(zip(manifest.samples, report.instances, strict=True))
    if data_fraction < 1.0:
        train = apply_fraction(train, data_fraction, seed=seed)
    if len(train) == 0 or len(val) == 0:
        raise DliError(
            f"split {split} of {data_path} leaves {len(train)} training and {len(val)} validation images"
        )
    gray = dict(zip(manifest.samples, report.image_gray, strict=True))
    return Datasets(train, val, data_path, fractions, boxes, per_class, instances, groups, image_gray=gray)


def datasets_of(config: TrainConfig) -> Datasets:
    """`load_datasets` with the settings of a run's config."""
    return load_datasets(
        config.data,
        config.split,
        val_fraction=config.val_fraction,
        seed=config.seed,
        split_free=config.split_free,
        data_fraction=config.data_fraction,
        group_by=config.group_by,
    )


def _read_split_folder(folder: Path) -> tuple[Manifest, Manifest]:
    from dli.data.manifest import read_dataset

    for train_name, val_name in SPLIT_CSV_NAMES:
        if (folder / train_name).is_file() and (folder / val_name).is_file():
            return read_dataset(folder / train_name), read_dataset(folder / val_name)
    expected = " or ".join(f"{t} + {v}" for t, v in SPLIT_CSV_NAMES)
    raise DliError(f"split folder {folder} lacks its CSV files ({expected})")


def class_pixel_counts(datasets: Datasets, image_size: int) -> ClassPixelCounts:
    """Defect pixels per class of the training set (see `dli.models.losses.count_class_pixels`)."""
    return count_class_pixels(
        datasets.train,
        image_size,
        fractions=datasets.mask_fractions,
        class_fractions=datasets.class_fractions,
    )


FINGERPRINT = "size+blake2b(first and last 16 KiB)"
"""How `file_fingerprint` identifies a file's content; stored with each run's data record."""

_BLOCK = 16 * 1024


def file_fingerprint(path: Path | None) -> str:
    """`size:hash` of a file: its size in bytes and a BLAKE2b of its first and last 16 KiB.

    Cheap on 100k images (two small reads each, usually from the page cache right after
    validation) and it sees a file replaced by another of the same size: an image's header and
    its last bytes differ between two images. ``0`` for no file, ``-1`` for one that cannot be read.
    """
    if path is None:
        return "0"
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            digest = hashlib.blake2b(handle.read(_BLOCK), digest_size=8)
            if size > _BLOCK:
                handle.seek(max(_BLOCK, size - _BLOCK))
                digest.update(handle.read(_BLOCK))
    except OSError:
        return "-1"
    return f"{size}:{digest.hexdigest()}"


def manifest_entries(manifest: Manifest) -> dict[str, str]:
    """What identifies each sample of `manifest`: its image path relative to the dataset root ->
    its class and the fingerprints (`file_fingerprint`) of its image and mask."""
    return {
        manifest.sort_key(s): f"{manifest.class_set_name(s)}|{file_fingerprint(s.image)}|"
        f"{file_fingerprint(s.mask)}"
        for s in manifest.samples
    }


def data_record(datasets: Datasets) -> dict[str, Any]:
    """The training and validation sets as a run records them (checked on `--resume`)."""
    return {
        "train": manifest_entries(datasets.train),
        "val": manifest_entries(datasets.val),
        "fingerprint": FINGERPRINT,
    }


def _sizes_only(entry: str) -> str:
    """An entry as records without `fingerprint` stored it: class and file sizes (``class|123|45``)."""
    return "|".join(part.split(":", 1)[0] for part in entry.split("|"))


def check_same_data(now: Mapping[str, Any], saved: Mapping[str, Any] | None, path: Path) -> None:
    """Refuse to resume when the dataset (`data_record`) changed since the run started; names the changes."""
    if not saved:
        return  # written before data records
    # Records written before content fingerprints hold file sizes only: compare what they hold.
    same_kind = saved.get("fingerprint") == now.get("fingerprint")
    changes = []
    for part in ("train", "val"):
        before = dict(saved.get(part) or {})
        after = now[part] if same_kind else {k: _sizes_only(v) for k, v in now[part].items()}
        for what, names in (
            ("added", sorted(after.keys() - before.keys())),
            ("removed", sorted(before.keys() - after.keys())),
            ("changed", sorted(k for k in after.keys() & before.keys() if after[k] != before[k])),
        ):
            if names:
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                changes.append(f"{part}: {len(names)} {what} ({shown})")
    if changes:
        raise DliError(
            f"cannot resume {path}: the dataset changed since the run started: {'; '.join(changes)}"
        )
