"""The configuration of one training run: every `dli train` flag as a dataclass field.

`TrainConfig` is what `dli.training.trainer.train` takes. Fields left `None` are resolved by `resolved()`:
without `--data` the run uses the bundled synthetic dataset and a short schedule
(`QUICK_SCHEDULE`, sized to reach a working model in about two minutes on a 2-core CPU), with
`--data` the paper's (`PAPER_SCHEDULE`). The resolved config, plus what happened at run time
(pretrained weights, versions, device), is written to the run folder as `config.yaml` (the way
timm saves `args.yaml`) and stored in every checkpoint, so a run can be resumed, evaluated and
reproduced from its folder alone.

`protocol` (``dli`` or ``reference``) gives the defaults of the settings in
`PROTOCOL_DEFAULTS`: this project's choices, or those of the paper's reference implementation.
Each such setting left `None` is filled from the protocol by `resolved()`, so the saved config
holds the protocol and every choice it made; a setting given explicitly overrides the protocol.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from dli.common.errors import DliError, one_line
from dli.data.instances import DONOR_UNITS
from dli.models.losses import METHODS
from dli.pipeline.normalization import CHANNEL_SETTINGS, NORMALIZATIONS
from dli.pipeline.planner import CANVASES, FILL_POLICIES
from dli.pipeline.planner import POISSON_SOLVERS as PLANNER_POISSON_SOLVERS

FILLS: tuple[str, ...] = FILL_POLICIES
"""How DLI chooses which defect-free images of a batch receive a defect."""

POISSON_SOLVERS: tuple[str, ...] = PLANNER_POISSON_SOLVERS
"""DLI's Poisson solvers: one sine-transform solve per window, or the region's own problem by PCG
(`dli.kernels.poisson.blend`); the default is chosen in docs/results.md."""

CANVAS_CHOICES: tuple[str, ...] = CANVASES
"""Which images of a batch DLI injects into: defect-free ones, any, or free ones when the batch has some."""
ASPECTS: tuple[str, ...] = ("stretch", "fit")
"""`--aspect`: resize each image to the square training size (``stretch``, the paper's), or keep its
aspect ratio with the longer side at that size and pad the rest (``fit``)."""

SPLITS: tuple[str, ...] = ("stratified", "reference")
"""Named train/validation splits; `--split` also takes a folder of split CSVs."""

PROTOCOLS: tuple[str, ...] = ("dli", "reference")
"""Training protocols: ``dli`` (this project's corrected choices) and ``reference`` (the choices of the
paper's reference implementation, so that its numbers can be reproduced)."""

PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "dli": {
        "wce_weights": "pos-weight",
        "balanced_counts": "pixels",
        "focal": "per-pixel",
        "dice": "per-class",
        "decoder_convs": 2,
        "poisson_label": "source",
        "poisson_window": "box",
        "resize": "linear",
        "lr_schedule": "per-step",
        "last_batch": "drop",
        "amp": True,
    },
    "reference": {
        "wce_weights": "pixel-share",
        "balanced_counts": "wce-weights",
        "focal": "per-class-mean",
        "dice": "global",
        "decoder_convs": 4,
        "poisson_label": "dilated",
        "poisson_window": "image",
        "resize": "nearest",
        "lr_schedule": "per-epoch",
        "last_batch": "keep",
        "amp": False,
    },
}
"""The value each protocol gives the settings it governs (each also a flag of its own).

- ``wce_weights``: ``pos-weight`` (positive pixels of class c weighted by its negative/positive
  pixel ratio, capped) or ``pixel-share`` (the per-class BCE means summed with weights
  (1 - share_c) / (C - 1), share_c = class c's share of the training defect pixels).
- ``balanced_counts``: what the class-balanced weights count, ``pixels`` (positive training
  pixels) or ``wce-weights`` (the ``pixel-share`` weight list taken as counts, as the reference did).
- ``focal``: ``per-pixel`` focal loss, or ``per-class-mean`` (the focal modulation of each
  class's mean BCE, summed over classes).
- ``dice``: ``per-class`` (smp's multilabel soft Dice, mean over classes present) or ``global``
  (one soft Dice over every class and pixel).
- ``decoder_convs``: conv-BN-ReLU layers per UNet decoder block (smp: 2; the reference's vendored
  smp: 4).
- ``poisson_label``: label of a Poisson injection, the ``source`` mask or the ``dilated`` blending domain.
- ``poisson_window``: the window of the direct Poisson solve (`dli.kernels.poisson.direct`), the region's
  ``box`` widened by a margin, or the whole ``image`` (as the reference's one sine-transform solve).
- ``resize``: image resizing, antialiased ``linear`` or ``nearest`` (masks are always nearest).
- ``lr_schedule``: cosine annealing stepped ``per-step`` or ``per-epoch``.
- ``last_batch``: the last incomplete training batch of an epoch, ``drop`` or ``keep``.
- ``amp``: mixed precision on the GPU (False: fp32).
"""

PROTOCOL_CHOICES: dict[str, tuple[Any, ...]] = {
    "wce_weights": ("pos-weight", "pixel-share"),
    "balanced_counts": ("pixels", "wce-weights"),
    "focal": ("per-pixel", "per-class-mean"),
    "dice": ("per-class", "global"),
    "decoder_convs": (2, 4),
    "poisson_label": ("source", "dilated"),
    "poisson_window": ("box", "image"),
    "resize": ("linear", "nearest"),
    "lr_schedule": ("per-step", "per-epoch"),
    "last_batch": ("drop", "keep"),
    "amp": (True, False),
}
"""Accepted values of each protocol-governed setting."""

SPLIT_CSV_NAMES: tuple[tuple[str, str], ...] = (("train_data.csv", "val_data.csv"), ("train.csv", "val.csv"))
"""File names of a split folder: (train, val), in order of preference."""


@dataclass(frozen=True)
class Schedule:
    """Epochs, batch size, image size and learning rate used when the flags leave them unset."""

    epochs: int
    batch_size: int
    image_size: int
    lr: float


PAPER_SCHEDULE = Schedule(epochs=1000, batch_size=64, image_size=256, lr=5e-4)
"""The paper's training schedule (used with `--data`)."""

QUICK_SCHEDULE = Schedule(epochs=10, batch_size=16, image_size=64, lr=4e-3)
"""Without `--data`: a short run on the bundled synthetic data. Small images give many optimizer
steps per CPU second, and the higher learning rate suits so short a schedule; measured in
README.md ("What you should see")."""

FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: bound of values the optimizer applies to float32 weights (--lr 1e300 overflows)."""

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (field `x_y` is flag `--x-y`)."""

    data: str | None = None
    protocol: str | None = None
    split: str = "stratified"
    val_fraction: float = 0.2
    split_free: bool = False
    group_by: str | None = None
    data_fraction: float = 1.0
    channels: str = "auto"
    normalization: str = "auto"
    method: str = "dli"
    poisson_prob: float = 0.5
    fill: str = "all-free"
    canvas: str = "auto"
    donors: str = "auto"
    wce_weights: str | None = None
    balanced_counts: str | None = None
    focal: str | None = None
    dice: str | None = None
    decoder_convs: int | None = None
    poisson_label: str | None = None
    poisson_window: str | None = None
    poisson_solver: str = "direct"
    resize: str | None = None
    lr_schedule: str | None = None
    last_batch: str | None = None
    encoder: str = "l-resnet18"
    pretrained: bool = True
    epochs: int | None = None
    batch_size: int | None = None
    image_size: int | None = None
    aspect: str = "stretch"
    crop: int | None = None
    scale: float = 1.0
    crop_defect_prob: float = 0.5
    lr: float | None = None
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 1
    max_steps: int | None = None
    min_recall: float | None = None
    patience: int | None = None
    out: str | None = None
    resume: bool = False
    device: str = "auto"
    amp: bool | None = None
    compile: bool = False
    num_threads: int = 2
    progress: bool = True

    # -- validation ---------------------------------------------------------------------------

    def validate(self) -> TrainConfig:
        """Check every value; raise `DliError` naming the flag and the value. Returns self."""
        _choice(self, "method", METHODS)
        _choice(self, "fill", FILLS)
        _choice(self, "aspect", ASPECTS)
        _choice(self, "poisson_solver", POISSON_SOLVERS)
        _choice(self, "canvas", CANVAS_CHOICES)
        _choice(self, "normalization", NORMALIZATIONS)
        if str(self.channels) not in CHANNEL_SETTINGS:
            raise DliError(f"--channels {self.channels}: choose from {', '.join(CHANNEL_SETTINGS)}")
        _choice(self, "donors", DONOR_UNITS)
        if self.protocol is not None:
            _choice(self, "protocol", PROTOCOLS)
        for name, choices in PROTOCOL_CHOICES.items():
            value = getattr(self, name)
            if value is not None and (value not in choices or isinstance(value, bool) != (name == "amp")):
                raise DliError(f"{flag(name)} {value}: choose from {', '.join(str(c) for c in choices)}")
        from dli.models.unet import ENCODERS

        if self.encoder not in ENCODERS:
            raise DliError(f"--encoder {self.encoder}: unknown encoder; choose from {', '.join(ENCODERS)}")
        if self.split not in SPLITS and not Path(self.split).is_dir():
            raise DliError(
                f"--split {self.split}: not one of {', '.join(SPLITS)} and not a folder "
                "(a folder must hold train_data.csv and val_data.csv)"
            )
        if self.group_by is not None:
            if self.split != "stratified":
                raise DliError(f"--group-by applies to --split stratified, not --split {self.split}")
            try:
                re.compile(self.group_by)
            except re.error as error:
                raise DliError(f"--group-by {self.group_by!r}: not a regular expression ({error})") from None
        _in_range(self, "val_fraction", low=0.0, high=1.0, high_inclusive=False)
        _in_range(self, "data_fraction", low=0.0, high=1.0)
        _in_range(self, "poisson_prob", low=0.0, high=1.0, low_inclusive=True)
        if self.lr is not None:
            _in_range(self, "lr", low=0.0)
        _in_range(self, "weight_decay", low=0.0, low_inclusive=True)
        if self.min_recall is not None:
            _in_range(self, "min_recall", low=0.0, high=1.0)
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if value is not None and value > FLOAT32_MAX:
                raise DliError(f"{flag(name)} {value}: must be at most {FLOAT32_MAX:.6g} (float32)")
        for name in ("epochs", "batch_size", "max_steps", "patience"):
            _positive_int(self, name, optional=True)
        for name in ("eval_every", "num_threads"):
            _positive_int(self, name)
        _positive_int(self, "seed", minimum=0)
        if self.image_size is not None:
            from dli.common.model_checks import MAX_IMAGE_SIZE

            _positive_int(self, "image_size", minimum=32)
            if self.image_size > MAX_IMAGE_SIZE:
                raise DliError(f"--image-size {self.image_size}: must be at most {MAX_IMAGE_SIZE}")
            stride = 2 ** ENCODERS[self.encoder].depth
            if self.image_size % stride:
                raise DliError(
                    f"--image-size {self.image_size}: must be a multiple of {stride} "
                    f"for encoder {self.encoder}"
                )
        self._validate_crop(stride=2 ** ENCODERS[self.encoder].depth)
        if not DEVICE_PATTERN.match(self.device):
            raise DliError(f"--device {self.device}: expected auto, cpu, cuda or cuda:N")
        if self.resume and self.out is None:
            raise DliError("--resume needs --out RUN (the run folder to continue)")
        return self

    def _validate_crop(self, stride: int) -> None:
        """`--crop`, `--scale`, `--crop-defect-prob` (training on native-resolution crops)."""
        _in_range(self, "crop_defect_prob", low=0.0, high=1.0, low_inclusive=True)
        _in_range(self, "scale", low=0.0, high=1.0)
        if self.crop is not None and self.aspect != "stretch":
            raise DliError(f"--aspect {self.aspect}: applies to whole-image training, not to --crop")
        if self.crop is None:
            if self.scale != 1.0:
                raise DliError(f"--scale {self.scale:g}: applies to training on crops; pass --crop S too")
            return
        from dli.common.model_checks import MAX_IMAGE_SIZE

        _positive_int(self, "crop", minimum=32)
        if self.image_size is not None and self.image_size != self.crop:
            raise DliError(
                f"--image-size {self.image_size}: with --crop {self.crop} the model's input is the crop"
            )
        if self.crop > MAX_IMAGE_SIZE:
            raise DliError(f"--crop {self.crop}: must be at most {MAX_IMAGE_SIZE}")
        if self.crop % stride:
            raise DliError(f"--crop {self.crop}: must be a multiple of {stride} for encoder {self.encoder}")

    # -- resolution ---------------------------------------------------------------------------

    @property
    def quick(self) -> bool:
        """Whether this is the default short run on bundled synthetic data."""
        return self.data is None

    def resolved(self) -> TrainConfig:
        """A copy with the schedule filled in (see the module docstring) and paths made absolute.

        `data` stays None for the bundled synthetic data, so the run stays a quick run. The
        protocol (default ``dli``) fills every setting it governs that is still unset.
        """
        schedule = QUICK_SCHEDULE if self.quick else PAPER_SCHEDULE
        split_is_folder = self.split not in SPLITS
        protocol = self.protocol or DEFAULT_PROTOCOL
        governed = {
            name: value if (value := getattr(self, name)) is not None else default
            for name, default in PROTOCOL_DEFAULTS[protocol].items()
        }
        return replace(
            self,
            protocol=protocol,
            **governed,
            data=None if self.data is None else str(Path(self.data).absolute()),
            split=str(Path(self.split).absolute()) if split_is_folder else self.split,
            epochs=self.epochs or schedule.epochs,
            batch_size=self.batch_size or schedule.batch_size,
            image_size=self.crop or self.image_size or schedule.image_size,
            lr=schedule.lr if self.lr is None else self.lr,
        )

    # -- (de)serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a checkpoint's); unknown keys are ignored, missing take defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def explicit(self) -> dict[str, Any]:
        """The fields that differ from the defaults (the flags a user actually set)."""
        default = TrainConfig()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }

    def to_argv(self) -> list[str]:
        """The `dli train` flags that rebuild this config (only those that differ from the defaults)."""
        argv: list[str] = []
        for name, value in self.explicit().items():
            if isinstance(value, bool):
                if value or name not in STORE_TRUE_FIELDS:
                    argv.append(flag(name) if value else "--no-" + flag(name)[2:])
            else:
                argv += [flag(name), repr(value) if isinstance(value, float) else str(value)]
        return argv


DEFAULT_PROTOCOL = "dli"
"""The protocol of a run that names none."""

STORE_TRUE_FIELDS = frozenset({"resume", "compile"})
"""Boolean fields whose flag only switches on (no `--no-` form)."""


def flag(name: str) -> str:
    """The command-line flag of config field `name`."""
    return "--" + name.replace("_", "-")


def _choice(config: TrainConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise DliError(f"{flag(name)} {value}: choose from {', '.join(choices)}")


def _in_range(
    config: TrainConfig,
    name: str,
    *,
    low: float,
    high: float | None = None,
    low_inclusive: bool = False,
    high_inclusive: bool = True,
) -> None:
    value = getattr(config, name)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    above = number and (value >= low if low_inclusive else value > low)
    below = high is None or (number and (value <= high if high_inclusive else value < high))
    if above and below:
        return
    if high is None:
        bounds = f"{'>=' if low_inclusive else '>'} {low:g}"
    else:
        bounds = f"in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    raise DliError(f"{flag(name)} {value}: must be {bounds}")


def _positive_int(config: TrainConfig, name: str, *, optional: bool = False, minimum: int = 1) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DliError(f"{flag(name)} {value}: must be an integer >= {minimum}")


PATH_FIELDS: tuple[str, ...] = ("data", "split", "out", "data_path")
"""Keys of a stored config (and its runtime section) that may hold a path."""


def portable_paths(document: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """`document` with its `PATH_FIELDS` paths made relative to the run `folder` where they lie
    inside the folder's parent (an experiment folder holding both its runs and their data), so
    the experiment folder can be moved or copied. Other paths stay absolute."""
    folder = Path(folder).absolute()
    out = dict(document)
    for key in PATH_FIELDS:
        value = out.get(key)
        if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(folder.parent):
            out[key] = os.path.relpath(value, folder)
    return out


def resolved_paths(document: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """The inverse of `portable_paths`: relative `PATH_FIELDS` paths made absolute against `folder`."""
    out = dict(document)
    for key in PATH_FIELDS:
        value = out.get(key)
        if isinstance(value, str) and value not in SPLITS and not Path(value).is_absolute():
            out[key] = os.path.normpath(Path(folder).absolute() / value)
    return out


def write_run_config(path: str | Path, config: TrainConfig, runtime: dict[str, Any]) -> None:
    """Write `config.yaml`: the resolved config, then a `runtime` section (atomic; paths as in
    `portable_paths`)."""
    from dli.common.atomic import atomic_write_text

    folder = Path(path).absolute().parent
    document = {**portable_paths(config.to_dict(), folder), "runtime": portable_paths(runtime, folder)}
    atomic_write_text(path, yaml.safe_dump(document, sort_keys=False, allow_unicode=True))


def read_run_config(path: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """Read a `config.yaml` written by `write_run_config`: (config, runtime)."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DliError(f"run config not found: {path}") from None
    except (OSError, yaml.YAMLError) as error:
        raise DliError(f"cannot read run config {path}: {one_line(error)}") from None
    if not isinstance(document, dict):
        raise DliError(f"run config {path} is not a mapping")
    runtime = document.pop("runtime", {}) or {}
    folder = path.absolute().parent
    runtime = resolved_paths(runtime, folder) if isinstance(runtime, dict) else runtime
    return TrainConfig.from_dict(resolved_paths(document, folder)), runtime
