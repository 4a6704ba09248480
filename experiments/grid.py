"""Experiment grids: grid documents parsed and checked, and the runs a grid plans.

A grid crosses protocols x methods x encoders x seeds x training-data fractions, and for DLI
runs also Poisson probability x fill policy: every combination of their values is one run. A
grid document (a preset of `dli.experiments.presets`, a YAML or TOML file, a stored
`experiment.yaml`, the flags) lists those factors and holds a `train` section of settings shared
by every run. Each source is parsed and checked on its own, so an error names its origin (a flag,
`FILE: train.KEY`, `preset NAME`); `resolve_grid` merges them key by key, later sources
overriding earlier ones, into a `Grid`.

`Grid.runs(expdir)` plans every run before any trains: its folder under EXPDIR, named by its
factors (`dli-p0.5-all-free__l-resnet18__f1.0__s0`, prefixed `reference__` under the reference
protocol), and its complete, validated `TrainConfig`. A run's seed is also its split seed: with
`--split stratified` each seed re-draws the train/validation split, as in the paper;
`--split reference` (or a split folder) keeps one split for every seed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dli.common.errors import DliError, one_line
from dli.experiments.presets import PRESETS
from dli.models.losses import METHODS
from dli.training.config import (
    DEFAULT_PROTOCOL,
    FILLS,
    PROTOCOL_CHOICES,
    PROTOCOLS,
    SPLITS,
    TrainConfig,
    flag,
)

LIST_KEYS: tuple[str, ...] = (
    "protocols",
    "methods",
    "encoders",
    "seeds",
    "fractions",
    "poisson_probs",
    "fills",
)
"""Grid factors: every combination of their values is one run (injection factors: DLI runs only)."""

GRID_KEYS: tuple[str, ...] = (*LIST_KEYS, "synthetic_images", "train")
"""Keys of a grid document (preset, `--config` file, `experiment.yaml`)."""

TRAIN_SETTINGS: dict[str, type] = {
    "data": str,
    "split": str,
    "val_fraction": float,
    "split_free": bool,
    "image_size": int,
    "epochs": int,
    "batch_size": int,
    "lr": float,
    "weight_decay": float,
    "max_steps": int,
    "pretrained": bool,
    "eval_every": int,
    "device": str,
    "amp": bool,
    "compile": bool,
    "num_threads": int,
    "progress": bool,
    **{name: type(choices[0]) for name, choices in PROTOCOL_CHOICES.items() if name != "amp"},
}
"""`TrainConfig` fields shared by every run of a grid (the `train` section; flags of the same name)."""

_NULLABLE_SETTINGS = frozenset({"data", "image_size", "epochs", "batch_size", "max_steps", *PROTOCOL_CHOICES})

_GRID_FIELDS = {
    "protocol": "protocols",
    "method": "methods",
    "encoder": "encoders",
    "seed": "seeds",
    "data_fraction": "fractions",
    "poisson_prob": "poisson_probs",
    "fill": "fills",
}
"""`TrainConfig` fields the grid sets per run -> the grid key that lists their values."""

_DEFAULTS = TrainConfig()


# ---------------------------------------------------------------------------------------------
# Grid documents: parsing and validation, one source at a time so errors name their origin.


@dataclass(frozen=True)
class Source:
    """Where grid values come from: flags (`label` None), a preset or a grid file.

    Attributes:
        label: how errors name the source (a file's path, `preset NAME`).
        folder: what relative paths in it are relative to (None: the working folder).
    """

    label: str | None = None
    folder: Path | None = None

    def where(self, key: str, section: str | None = None) -> str:
        """How an error names `key`: its flag, or `<label>: [section.]key`."""
        if self.label is None:
            return flag(key)
        return f"{self.label}: {section + '.' if section else ''}{key}"

    def resolve_path(self, value: str) -> str:
        """A path value made absolute."""
        path = Path(value).expanduser()
        if not path.is_absolute() and self.folder is not None:
            path = self.folder / path
        return str(path.absolute())


def _split_items(value: Any, where: str) -> list[Any]:
    """A list value: a YAML/TOML list, one scalar, or a comma-separated string."""
    if isinstance(value, str):
        items: list[Any] = [item.strip() for item in value.split(",")]
        if any(not item for item in items):
            raise DliError(f"{where} {value!r}: empty entry in the comma-separated list")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif value is None:
        items = []
    else:
        items = [value]
    if not items:
        raise DliError(f"{where}: needs at least one value")
    return items


def _number(item: Any, where: str, kind: type) -> float | int:
    if isinstance(item, bool):
        raise DliError(f"{where} {item}: not a number")
    if isinstance(item, str):
        try:
            return kind(item)
        except ValueError:
            raise DliError(f"{where} {item}: not {'an integer' if kind is int else 'a number'}") from None
    if kind is int and isinstance(item, int):
        return item
    if kind is float and isinstance(item, (int, float)):
        return float(item)
    raise DliError(f"{where} {item!r}: not {'an integer' if kind is int else 'a number'}")


MAX_SEEDS = 1000
"""Most seeds a grid takes (each is a full training per cell): more is a typo, not a plan."""


def _seeds(items: list[Any], where: str) -> list[int]:
    """Seeds: integers >= 0; a string `a-b` is the inclusive range a..b."""
    seeds: list[int] = []
    for item in items:
        if isinstance(item, str) and "-" in item.strip("-"):
            low, high = (_number(part, where, int) for part in item.split("-", 1))
            if high < low:
                raise DliError(f"{where} {item}: empty range")
            if high - low + 1 > MAX_SEEDS:
                raise DliError(f"{where} {item}: {high - low + 1} seeds; at most {MAX_SEEDS} in a grid")
            seeds += range(int(low), int(high) + 1)
        else:
            seeds.append(int(_number(item, where, int)))
    if len(seeds) > MAX_SEEDS:
        raise DliError(f"{where}: {len(seeds)} seeds; at most {MAX_SEEDS} in a grid")
    for seed in seeds:
        if seed < 0:
            raise DliError(f"{where} {seed}: seeds must be integers >= 0")
    return seeds


def _choices(items: list[Any], where: str, choices: Sequence[str], what: str) -> list[str]:
    for item in items:
        if item not in choices:
            raise DliError(f"{where} {item}: unknown {what}; choose from {', '.join(choices)}")
    return [str(item) for item in items]


def _unit_interval(items: list[Any], where: str, *, zero_allowed: bool) -> list[float]:
    values = [float(_number(item, where, float)) for item in items]
    for value in values:
        inside = (value >= 0.0 if zero_allowed else value > 0.0) and value <= 1.0
        if not inside or not math.isfinite(value):
            raise DliError(f"{where} {value:g}: must be in {'[0' if zero_allowed else '(0'}, 1]")
    return values


def _encoder_names() -> tuple[str, ...]:
    from dli.models.unet import ENCODERS

    return tuple(ENCODERS)


def _parse_list(key: str, value: Any, source: Source) -> tuple[Any, ...]:
    where = source.where(key)
    items = _split_items(value, where)
    if key == "protocols":
        parsed: list[Any] = _choices(items, where, PROTOCOLS, "protocol")
    elif key == "methods":
        parsed = _choices(items, where, METHODS, "method")
    elif key == "encoders":
        parsed = _choices(items, where, _encoder_names(), "encoder")
    elif key == "seeds":
        parsed = _seeds(items, where)
    elif key == "fractions":
        parsed = _unit_interval(items, where, zero_allowed=False)
    elif key == "poisson_probs":
        parsed = _unit_interval(items, where, zero_allowed=True)
    else:
        parsed = _choices(items, where, FILLS, "fill policy")
    return tuple(dict.fromkeys(parsed))  # drop repeats, keep order


def _parse_setting(key: str, value: Any, source: Source) -> Any:
    """One `train` setting, type-checked (ranges are checked by `TrainConfig.validate`)."""
    where = source.where(key, "train")
    kind = TRAIN_SETTINGS[key]
    if value is None:
        if key in _NULLABLE_SETTINGS:
            return None
        raise DliError(f"{where}: needs a value")
    if kind is bool:
        if not isinstance(value, bool):
            raise DliError(f"{where} {value!r}: expected true or false")
        return value
    if kind is str:
        if not isinstance(value, str) or not value:
            raise DliError(f"{where} {value!r}: expected a non-empty string")
        if key == "data" or (key == "split" and value not in SPLITS):
            return source.resolve_path(value)
        if key in PROTOCOL_CHOICES and value not in PROTOCOL_CHOICES[key]:
            choices = ", ".join(map(str, PROTOCOL_CHOICES[key]))
            raise DliError(f"{where} {value}: choose from {choices}")
        return value
    number = _number(value, where, kind)
    if key in PROTOCOL_CHOICES and number not in PROTOCOL_CHOICES[key]:
        raise DliError(f"{where} {value}: choose from {', '.join(map(str, PROTOCOL_CHOICES[key]))}")
    return number


def parse_grid_document(document: Any, source: Source) -> dict[str, Any]:
    """Check and normalise one grid document (lists as tuples, paths absolute)."""
    if not isinstance(document, Mapping):
        raise DliError(f"{source.label}: a grid file must be a mapping of {', '.join(GRID_KEYS)}")
    parsed: dict[str, Any] = {}
    for key, value in document.items():
        if key in LIST_KEYS:
            parsed[key] = _parse_list(key, value, source)
        elif key == "synthetic_images":
            parsed[key] = None if value is None else _synthetic_images(value, source.where(key))
        elif key == "train":
            parsed[key] = _parse_train_section(value, source)
        elif key == "runs" and source.label is not None:
            continue  # `experiment.yaml` lists its run names for readers; they follow from the grid
        else:
            hint = f" (set it with {_GRID_FIELDS[key]})" if key in _GRID_FIELDS else ""
            hint = hint or (" (put it under train:)" if key in TRAIN_SETTINGS else "")
            raise DliError(f"{source.label}: unknown key {key!r}{hint}; expected {', '.join(GRID_KEYS)}")
    return parsed


def _parse_train_section(section: Any, source: Source) -> dict[str, Any]:
    if not isinstance(section, Mapping):
        raise DliError(f"{source.label}: train must be a mapping of settings")
    settings = {}
    for key, value in section.items():
        if key in _GRID_FIELDS:
            raise DliError(f"{source.label}: train.{key} is set by the grid; use {_GRID_FIELDS[key]}")
        if key not in TRAIN_SETTINGS:
            raise DliError(
                f"{source.label}: unknown train setting {key!r}; choose from {', '.join(TRAIN_SETTINGS)}"
            )
        settings[key] = _parse_setting(key, value, source)
    return settings


def _synthetic_images(value: Any, where: str) -> int:
    from dli.data.synth import MIN_IMAGES

    images = _number(value, where, int)
    if images < MIN_IMAGES:
        raise DliError(f"{where} {images}: needs at least {MIN_IMAGES} images")
    return int(images)


def read_grid_file(path: str | Path) -> dict[str, Any]:
    """Read a `.yaml`/`.yml`/`.toml` grid file into a checked document."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DliError(f"cannot read grid file {path}: {error.strerror or error}") from None
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise DliError(f"grid file {path}: TOML needs Python 3.11 or newer; use YAML") from None
            document = tomllib.loads(text)
        else:
            document = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as error:
        reason = one_line(error)
        raise DliError(f"grid file {path} is malformed: {reason}") from None
    return parse_grid_document(document or {}, Source(str(path), path.absolute().parent))


def merge_documents(*documents: Mapping[str, Any]) -> dict[str, Any]:
    """Later documents override earlier ones, key by key (`train` settings too)."""
    merged: dict[str, Any] = {}
    for document in documents:
        for key, value in document.items():
            merged[key] = {**merged.get(key, {}), **value} if key == "train" else value
    return merged


# ---------------------------------------------------------------------------------------------
# The grid and its runs.


@dataclass(frozen=True)
class Variant:
    """A training method with its injection settings (None for methods that inject nothing),
    trained under a protocol (`dli.training.config.PROTOCOLS`)."""

    method: str
    poisson_prob: float | None = None
    fill: str | None = None
    protocol: str = DEFAULT_PROTOCOL

    @property
    def label(self) -> str:
        """`bce`, or `dli-p0.5-all-free` for an injecting method (the protocol is not part of it)."""
        if self.poisson_prob is None:
            return self.method
        return f"{self.method}-p{self.poisson_prob:g}-{self.fill}"

    @property
    def folder_label(self) -> str:
        """`label`, prefixed by the protocol unless it is the default (`reference__bce`)."""
        return self.label if self.protocol == DEFAULT_PROTOCOL else f"{self.protocol}__{self.label}"

    def sort_key(self) -> tuple[int, float, int, int]:
        method = METHODS.index(self.method) if self.method in METHODS else len(METHODS)
        fill = FILLS.index(self.fill) if self.fill in FILLS else -1
        protocol = PROTOCOLS.index(self.protocol) if self.protocol in PROTOCOLS else len(PROTOCOLS)
        return method, -1.0 if self.poisson_prob is None else self.poisson_prob, fill, -protocol


def variant_of(config: TrainConfig) -> Variant:
    """The variant a run config trains (injection settings only matter for `dli`)."""
    protocol = config.protocol or DEFAULT_PROTOCOL
    if config.method == "dli":
        return Variant(config.method, float(config.poisson_prob), config.fill, protocol)
    return Variant(config.method, protocol=protocol)


@dataclass(frozen=True)
class Setting:
    """A grid cell: everything that defines a run except its seed."""

    variant: Variant
    encoder: str
    fraction: float

    def run_name(self, seed: int) -> str:
        return f"{self.variant.folder_label}__{self.encoder}__f{float(self.fraction)!r}__s{seed}"


@dataclass(frozen=True)
class PlannedRun:
    """One training of the grid: its folder name and complete config."""

    name: str
    setting: Setting
    seed: int
    config: TrainConfig

    @property
    def folder(self) -> Path:
        assert self.config.out is not None
        return Path(self.config.out)


@dataclass(frozen=True)
class Grid:
    """A checked experiment grid; `runs(expdir)` lists its trainings, seed-major.

    Seed-major order trains seed 0 of every cell first, so a grid stopped early still gives a
    (narrower) summary of every cell.
    """

    protocols: tuple[str, ...] = (DEFAULT_PROTOCOL,)
    methods: tuple[str, ...] = (_DEFAULTS.method,)
    encoders: tuple[str, ...] = (_DEFAULTS.encoder,)
    seeds: tuple[int, ...] = (_DEFAULTS.seed,)
    fractions: tuple[float, ...] = (_DEFAULTS.data_fraction,)
    poisson_probs: tuple[float, ...] = (_DEFAULTS.poisson_prob,)
    fills: tuple[str, ...] = (_DEFAULTS.fill,)
    synthetic_images: int | None = None
    train: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> Grid:
        """From a document checked by `parse_grid_document` (or several merged)."""
        return cls(**{key: value for key, value in document.items() if key in GRID_KEYS})

    def to_document(self) -> dict[str, Any]:
        """Plain lists and scalars, ready for YAML (`read_grid_file` reads it back)."""
        document: dict[str, Any] = {key: list(getattr(self, key)) for key in LIST_KEYS}
        document["synthetic_images"] = self.synthetic_images
        document["train"] = dict(self.train)
        return document

    def variants(self) -> list[Variant]:
        variants = []
        for protocol, method in itertools.product(self.protocols, self.methods):
            if method == "dli":
                variants += [
                    Variant(method, p, fill, protocol) for p in self.poisson_probs for fill in self.fills
                ]
            else:
                variants.append(Variant(method, protocol=protocol))
        return variants

    def synthetic_data(self, expdir: Path) -> Path | None:
        """The generated dataset the runs use when no `data` is set and `synthetic_images` is."""
        if self.synthetic_images is None or self.train.get("data") is not None:
            return None
        return expdir.absolute() / f"synthetic-n{self.synthetic_images}-s0"

    def runs(self, expdir: str | Path) -> list[PlannedRun]:
        """Every run with its validated, resolved config (a bad setting fails before any training)."""
        expdir = Path(expdir).absolute()
        base = dict(self.train)
        synthetic = self.synthetic_data(expdir)
        if synthetic is not None:
            base["data"] = str(synthetic)
        runs = []
        for seed, fraction, encoder, variant in itertools.product(
            self.seeds, self.fractions, self.encoders, self.variants()
        ):
            setting = Setting(variant, encoder, fraction)
            name = setting.run_name(seed)
            injection = {} if variant.poisson_prob is None else {"poisson_prob": variant.poisson_prob}
            config = TrainConfig(
                **base,
                **injection,
                protocol=variant.protocol,
                method=variant.method,
                fill=variant.fill or _DEFAULTS.fill,
                encoder=encoder,
                seed=seed,
                data_fraction=fraction,
                out=str(expdir / name),
            )
            runs.append(PlannedRun(name, setting, seed, config.validate().resolved()))
        return runs


def resolve_grid(
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    stored: Mapping[str, Any] | None = None,
) -> Grid:
    """The grid from, in increasing priority: a stored `experiment.yaml` or a preset, a file, flags."""
    layers: list[Mapping[str, Any]] = []
    if preset is not None:
        if preset not in PRESETS:
            raise DliError(f"--preset {preset}: unknown preset; choose from {', '.join(PRESETS)}")
        layers.append(parse_grid_document(deepcopy(PRESETS[preset]), Source(f"preset {preset}")))
    elif stored is not None:
        layers.append(stored)
    if config_file is not None:
        layers.append(read_grid_file(config_file))
    if flags:
        layers.append(parse_grid_document(flags, Source()))
    return Grid.from_document(merge_documents(*layers))
