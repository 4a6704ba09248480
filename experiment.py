"""`dli experiment`: the paper's experiments as grids of trainings, aggregated into its tables.

A grid crosses protocols x methods x encoders x seeds x training-data fractions, and for DLI
runs also Poisson probability x fill policy. Every run is trained under its grid's protocol
(`dli train --protocol`, `protocols: [reference, dli]` in a grid file): the presets of the
paper's experiments use ``reference`` and the published split, so their numbers compare with
the paper's; a grid over both protocols asks whether DLI's margin survives corrected baselines.
The grid comes from a preset (`dli.experiments.presets`), a YAML or TOML file (`--config`) and
flags, later sources overriding earlier ones. Every run trains with
`dli.train.train` in its own folder under EXPDIR, named by its factors
(`dli-p0.5-all-free__l-resnet18__f1.0__s0`, prefixed `reference__` under the reference
protocol), one after another on one device.

A run's seed is also its split seed: with `--split stratified` each seed re-draws the
train/validation split, as in the paper; `--split reference` (or a split folder) keeps one
split for every seed.

Re-running the same command continues the grid: a finished run (its `metrics.jsonl` reaches the
run's last step) is skipped, a killed one is resumed from its `last.pt`. A run folder holding a
run with different settings is an error, never silently reused.

Aggregation reads nothing but run folders (`config.yaml` + `metrics.jsonl`), so it also works
on hand-made folders and on runs trained elsewhere and copied in. A run's result is the
validation record of its best epoch: the highest dataset-level IoU, the earliest on ties (the
epoch `best.pt` holds). Seeds are summarised as mean ± sample standard deviation (ddof = 1)
with n shown; the summary also gives the paper's spread (population std, ddof = 0) and its
per-class IoU (grouped by each validation image's true class), labelled as such. The summary
(`summary.md`, `summary.csv`, `runs.csv`, PNG plots) is written atomically, so an interrupted
aggregation leaves the previous one intact.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dli import train as training
from dli.atomic import atomic_write_bytes, atomic_write_text
from dli.config import (
    DEFAULT_PROTOCOL,
    FILLS,
    METHODS,
    PROTOCOL_CHOICES,
    PROTOCOLS,
    SPLITS,
    TrainConfig,
    flag,
    read_run_config,
)
from dli.errors import DliError
from dli.experiments.presets import PRESETS

EXPERIMENT_FILE = "experiment.yaml"
SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
RUNS_CSV = "runs.csv"

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


def _seeds(items: list[Any], where: str) -> list[int]:
    """Seeds: integers >= 0; a string `a-b` is the inclusive range a..b."""
    seeds: list[int] = []
    for item in items:
        if isinstance(item, str) and "-" in item.strip("-"):
            low, high = (_number(part, where, int) for part in item.split("-", 1))
            if high < low:
                raise DliError(f"{where} {item}: empty range")
            seeds += range(int(low), int(high) + 1)
        else:
            seeds.append(int(_number(item, where, int)))
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
    from dli.pipeline.synth import MIN_IMAGES

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
        reason = str(error).replace("\n", " ")
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
    trained under a protocol (`dli.config.PROTOCOLS`)."""

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


# ---------------------------------------------------------------------------------------------
# Reading run folders (shared by the runner's skip/resume decision and the aggregation).


@dataclass(frozen=True)
class RunRecord:
    """What a run folder says about its run.

    Attributes:
        complete: the run reached its last step (`runtime.total_steps` in `config.yaml`, else
            its configured epochs; a folder stating neither counts as complete once it has
            a record).
        best_epoch: the epoch whose validation IoU is highest (earliest on ties); None when no
            epoch has a defined IoU.
        scores: that epoch's `iou`, `f1`, `iou/<class>`, `f1/<class>` (NaN where undefined).
    """

    folder: Path
    config: TrainConfig
    runtime: Mapping[str, Any]
    epochs_completed: int
    complete: bool
    best_epoch: int | None
    scores: Mapping[str, float]
    class_names: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def setting(self) -> Setting:
        return Setting(variant_of(self.config), self.config.encoder, float(self.config.data_fraction))

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def iou(self) -> float:
        return self.scores.get("iou", math.nan)

    @property
    def usable(self) -> bool:
        """Whether the run enters the summary: finished, with a defined IoU."""
        return self.complete and math.isfinite(self.iou)

    @property
    def status(self) -> str:
        if not self.complete:
            return "incomplete"
        return "ok" if self.usable else "no defined IoU"


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DliError(f"{path}: line {number} is not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise DliError(f"{path}: line {number} is not an epoch record")
        records.append(record)
    return records


def _as_score(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def best_record(records: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The record with the highest finite `iou`, the earliest on ties (as `best.pt` is kept)."""
    best = None
    for record in records:
        iou = _as_score(record.get("iou"))
        if math.isfinite(iou) and (best is None or iou > _as_score(best["iou"])):
            best = record
    return best


def read_run(folder: str | Path) -> RunRecord:
    """Read a run folder's `config.yaml` and `metrics.jsonl` (`DliError` naming a bad file)."""
    folder = Path(folder)
    config, runtime = read_run_config(folder / training.CONFIG_FILE)
    records = _read_metrics(folder / training.METRICS_JSONL)
    last = records[-1] if records else None
    total_steps = runtime.get("total_steps")
    if last is None:
        complete = False
    elif isinstance(total_steps, int) and isinstance(last.get("step"), int):
        complete = last["step"] >= total_steps
    elif config.epochs is not None:
        complete = last["epoch"] >= config.epochs
    else:
        complete = True
    best = best_record(records)
    names = runtime.get("class_names")
    if isinstance(names, list) and names:
        class_names = tuple(str(name) for name in names)
    else:  # a hand-made folder: the classes are the `iou/<class>` keys
        class_names = tuple(key[4:] for key in (best or {}) if key.startswith("iou/"))
    scores = {}
    if best is not None:
        keys = ["iou", "f1", *(f"{m}/{n}" for m in ("iou", "f1") for n in class_names)]
        scores = {key: _as_score(best.get(key)) for key in keys}
        grouped = [f"{training.IOU_BY_IMAGE_CLASS}/{n}" for n in class_names]
        scores |= {key: _as_score(best[key]) for key in grouped if key in best}  # older runs lack them
    return RunRecord(
        folder=folder,
        config=config,
        runtime=runtime,
        epochs_completed=last["epoch"] if last else 0,
        complete=complete,
        best_epoch=best["epoch"] if best else None,
        scores=scores,
        class_names=class_names,
    )


def read_runs(expdir: str | Path) -> list[RunRecord]:
    """Every run folder (a sub-folder with `config.yaml`) directly under `expdir`, by name."""
    expdir = Path(expdir)
    if not expdir.is_dir():
        raise DliError(f"experiment folder not found: {expdir}")
    folders = sorted(p for p in expdir.iterdir() if (p / training.CONFIG_FILE).is_file())
    return [read_run(folder) for folder in folders]


# ---------------------------------------------------------------------------------------------
# Running the grid.


class RunState(Enum):
    """What the runner does with a run: train it, resume it from `last.pt`, or skip it."""

    NEW = "new"
    RESUME = "resume"
    FINISHED = "finished"


def changed_settings(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    """Settings (as flags) that differ and would change what a run computes.

    A folder written before a setting existed takes that setting's default (protocol ``dli``).
    """
    saved = saved.resolved()
    return [
        f"{flag(f.name)} {getattr(wanted, f.name)} (folder has {getattr(saved, f.name)})"
        for f in fields(TrainConfig)
        if f.name not in training.RUNTIME_FIELDS and getattr(saved, f.name) != getattr(wanted, f.name)
    ]


def run_state(run: PlannedRun) -> RunState:
    """Whether `run` is to be trained, resumed or skipped; `DliError` if its folder holds another run."""
    config_file = run.folder / training.CONFIG_FILE
    if not config_file.is_file():
        return RunState.NEW
    record = read_run(run.folder)
    changed = changed_settings(record.config, run.config)
    if changed:
        raise DliError(
            f"run folder {run.folder} holds a run with other settings: {'; '.join(changed)}; "
            "use another --out or remove the folder"
        )
    if record.complete:
        return RunState.FINISHED
    return RunState.RESUME if (run.folder / training.LAST).is_file() else RunState.NEW


def _discard_partial(folder: Path) -> None:
    """A run killed before its first `last.pt` may leave a `best.pt`; a fresh start replaces it."""
    (folder / training.BEST).unlink(missing_ok=True)


Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


def run_grid(grid: Grid, expdir: str | Path, *, log: Log = _print) -> dict[str, RunState]:
    """Train, resume or skip every run of `grid` in `expdir`; returns each run's state before."""
    expdir = Path(expdir).absolute()
    runs = grid.runs(expdir)
    states = {run.name: run_state(run) for run in runs}
    synthetic = grid.synthetic_data(expdir)
    if synthetic is not None and not synthetic.is_dir():
        from dli.pipeline.synth import generate

        log(f"generating {grid.synthetic_images} synthetic images in {synthetic}")
        generate(synthetic, images=grid.synthetic_images or 0, seed=0)
    width = len(str(len(runs)))
    for index, run in enumerate(runs, 1):
        prefix = f"[{index:>{width}}/{len(runs)}] {run.name}"
        state = run_state(run)  # again: the folder may have changed while earlier runs trained
        if state is RunState.FINISHED:
            log(f"{prefix}: finished, skipped")
            continue
        if state is RunState.NEW:
            _discard_partial(run.folder)
        log(f"{prefix}: {'resuming' if state is RunState.RESUME else 'training'}")
        result = training.train(replace(run.config, resume=state is RunState.RESUME))
        best = "undefined" if result.best is None else f"{100 * result.best.iou:.2f}%"
        log(f"{prefix}: best IoU {best} at epoch {result.best_epoch} of {result.epochs_completed}")
    return states


def write_grid(grid: Grid, expdir: str | Path) -> Path:
    """Write `experiment.yaml` (the grid and its run names) into `expdir`, atomically."""
    path = Path(expdir) / EXPERIMENT_FILE
    document = grid.to_document() | {"runs": [run.name for run in grid.runs(expdir)]}
    atomic_write_text(path, yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    return path


def read_stored_grid(expdir: str | Path) -> dict[str, Any] | None:
    """The checked document of `expdir/experiment.yaml`, or None when there is none."""
    path = Path(expdir) / EXPERIMENT_FILE
    return read_grid_file(path) if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# Statistics over seeds.


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof = 1) of the finite values over seeds."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        return cls(tuple(v for v in values if math.isfinite(v)))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof = 1); NaN below two values."""
        return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan

    @property
    def population_std(self) -> float:
        """Population standard deviation (ddof = 0), the paper's spread; NaN below two values."""
        return float(np.std(self.values, ddof=0)) if self.n > 1 else math.nan

    def __str__(self) -> str:
        if not self.n:
            return "—"
        spread = f" ± {100 * self.std:.2f}" if self.n > 1 else ""
        return f"{100 * self.mean:.2f}{spread} (n={self.n})"


@dataclass(frozen=True)
class PaperStat(Stat):
    """A `Stat` shown with the population standard deviation (ddof = 0), as the paper reports it."""

    @property
    def std(self) -> float:
        return self.population_std


@dataclass(frozen=True)
class Drop:
    """How far a mean IoU falls below the same setting's mean with all training data."""

    full: float
    value: float

    @property
    def points(self) -> float:
        """full − value, in IoU units (positive: lower than with all data)."""
        return self.full - self.value

    @property
    def relative(self) -> float:
        """The drop as a share of the full-data IoU."""
        return self.points / self.full if self.full else math.nan

    def __str__(self) -> str:
        return f"{100 * self.points:.2f} ({100 * self.relative:.1f}%)"


@dataclass(frozen=True)
class Table:
    """A labelled grid of cells (`Stat` or `Drop`); missing cells render as a dash."""

    title: str
    corner: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    cells: Mapping[tuple[str, str], Any]

    def cell(self, row: str, column: str) -> Any:
        return self.cells.get((row, column))

    def to_markdown(self) -> str:
        lines = [
            "| " + " | ".join((self.corner, *self.columns)) + " |",
            "| " + " | ".join(["---"] + ["---:"] * len(self.columns)) + " |",
        ]
        for row in self.rows:
            values = [str(self.cells.get((row, column), "—")) for column in self.columns]
            lines.append("| " + " | ".join((row, *values)) + " |")
        return "\n".join(lines)


def _fraction_label(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _poisson_label(p: float) -> str:
    names = {0.0: " (cut-paste only)", 1.0: " (Poisson only)"}
    return f"p = {p:g}{names.get(p, '')}"


class Summary:
    """The usable runs of an experiment folder grouped by setting, and the paper's tables.

    Rows name the protocol each cell was trained under: in the table titles when every run
    shares one, in brackets after the method (`bce [reference]`) when the runs mix protocols.
    """

    def __init__(self, records: Sequence[RunRecord], encoder_order: Sequence[str] = ()) -> None:
        self.records = list(records)
        self.usable = [r for r in self.records if r.usable]
        self.by_setting: dict[Setting, list[RunRecord]] = {}
        for record in self.usable:
            self.by_setting.setdefault(record.setting, []).append(record)
        order = {name: i for i, name in enumerate(encoder_order)}
        found = {r.setting.encoder for r in self.usable}
        self.encoders = sorted(found, key=lambda e: (order.get(e, len(order)), e))
        self.variants = sorted({r.setting.variant for r in self.usable}, key=Variant.sort_key)
        self.fractions = sorted({r.setting.fraction for r in self.usable})
        found_protocols = {v.protocol for v in self.variants}
        self.protocols = tuple(p for p in (*PROTOCOLS, *sorted(found_protocols)) if p in found_protocols)
        self.protocols = tuple(dict.fromkeys(self.protocols))
        names: dict[str, None] = {}
        for record in self.usable:
            names.update(dict.fromkeys(record.class_names))
        self.class_names = tuple(names)

    @property
    def full_fraction(self) -> float:
        """The fraction the method and class tables use: 1.0, or the largest in the grid."""
        return 1.0 if 1.0 in self.fractions else max(self.fractions, default=1.0)

    @property
    def mixed_protocols(self) -> bool:
        return len(self.protocols) > 1

    def row_label(self, variant: Variant) -> str:
        """The variant's label, with its protocol in brackets when the runs mix protocols."""
        return f"{variant.label} [{variant.protocol}]" if self.mixed_protocols else variant.label

    def _protocol_note(self) -> str:
        if self.mixed_protocols:
            return "protocol in brackets"
        return f"protocol {self.protocols[0]}" if self.protocols else ""

    def stat(self, setting: Setting, metric: str = "iou", *, population: bool = False) -> Stat:
        """Over seeds; `population`: shown with the paper's spread (ddof = 0, `PaperStat`)."""
        kind = PaperStat if population else Stat
        return kind.of(r.scores.get(metric, math.nan) for r in self.by_setting.get(setting, []))

    def _variants_at(self, encoder: str | None, fraction: float) -> list[Variant]:
        return [
            v
            for v in self.variants
            if any(
                s.variant == v and s.fraction == fraction and encoder in (None, s.encoder)
                for s in self.by_setting
            )
        ]

    def table1(self, *, population: bool = False) -> Table:
        """Table 1: IoU per method (rows) and encoder (columns), all training data."""
        fraction = self.full_fraction
        variants = self._variants_at(None, fraction)
        cells = {
            (self.row_label(v), e): self.stat(Setting(v, e, fraction), population=population)
            for v in variants
            for e in self.encoders
            if Setting(v, e, fraction) in self.by_setting
        }
        return Table(
            f"IoU by method and encoder ({_fraction_label(fraction)} of the training data, "
            f"{self._protocol_note()})",
            "method",
            tuple(self.row_label(v) for v in variants),
            tuple(self.encoders),
            cells,
        )

    def per_class(self, encoder: str, *, by_image_class: bool = False, population: bool = False) -> Table:
        """Fig. 3: IoU per class (rows, then overall) and method (columns) for one encoder.

        `by_image_class`: the reference's grouping (each class over the validation images of that
        class, all their channels counted); runs that did not record it have no such cells.
        """
        fraction = self.full_fraction
        variants = self._variants_at(encoder, fraction)
        rows = (*self.class_names, "overall")
        prefix = training.IOU_BY_IMAGE_CLASS if by_image_class else "iou"
        cells = {}
        for v in variants:
            setting = Setting(v, encoder, fraction)
            for name in rows:
                metric = "iou" if name == "overall" else f"{prefix}/{name}"
                stat = self.stat(setting, metric, population=population)
                if stat.n:
                    cells[name, self.row_label(v)] = stat
        grouping = "by each image's true class" if by_image_class else "per channel"
        return Table(
            f"Per-class IoU {grouping}, {encoder} ({_fraction_label(fraction)} of the training data, "
            f"{self._protocol_note()})",
            "class",
            rows,
            tuple(self.row_label(v) for v in variants),
            cells,
        )

    def fraction_tables(self, encoder: str) -> tuple[Table, Table]:
        """Fig. 5: IoU per method (rows) and training-data fraction (columns); and the drops.

        Rows are the methods trained at two fractions or more with this encoder; the drops need
        their runs with all the data (fraction 1.0) and are given for the smaller fractions.
        """
        fractions_of: dict[Variant, list[float]] = {}
        for s in sorted(self.by_setting, key=lambda s: s.fraction):
            if s.encoder == encoder:
                fractions_of.setdefault(s.variant, []).append(s.fraction)
        variants = [v for v in self.variants if len(fractions_of.get(v, [])) > 1]
        fractions = sorted({f for v in variants for f in fractions_of[v]})
        ious, drops = {}, {}
        for v in variants:
            full = self.stat(Setting(v, encoder, 1.0))
            for fraction in fractions_of[v]:
                stat = self.stat(Setting(v, encoder, fraction))
                ious[self.row_label(v), _fraction_label(fraction)] = stat
                if full.n and fraction < 1.0:
                    drops[self.row_label(v), _fraction_label(fraction)] = Drop(full.mean, stat.mean)
        rows = tuple(self.row_label(v) for v in variants)
        columns = tuple(_fraction_label(f) for f in fractions)
        smaller = tuple(_fraction_label(f) for f in fractions if f < 1.0)
        note = self._protocol_note()
        return (
            Table(f"IoU by training-data fraction, {encoder} ({note})", "method", rows, columns, ious),
            Table(f"Drop relative to 100% of the data, {encoder} ({note})", "method", rows, smaller, drops),
        )

    def ablation(self, encoder: str) -> Table | None:
        """Table 2: DLI's IoU per Poisson probability (rows; per protocol) and fill policy (columns)."""
        fraction = self.full_fraction
        dli = [
            s.variant
            for s in self.by_setting
            if s.variant.method == "dli" and s.encoder == encoder and s.fraction == fraction
        ]
        probs = sorted({v.poisson_prob for v in dli if v.poisson_prob is not None})
        fills = [f for f in FILLS if any(v.fill == f for v in dli)]
        protocols = [p for p in self.protocols if any(v.protocol == p for v in dli)]
        if len(probs) < 2 and len(fills) < 2:
            return None

        def row(p: float, protocol: str) -> str:
            return f"{_poisson_label(p)} [{protocol}]" if self.mixed_protocols else _poisson_label(p)

        cells = {}
        for protocol, p, fill in itertools.product(protocols, probs, fills):
            setting = Setting(Variant("dli", p, fill, protocol), encoder, fraction)
            if setting in self.by_setting:
                cells[row(p, protocol), fill] = self.stat(setting)
        return Table(
            f"DLI ablation, {encoder} ({_fraction_label(fraction)} of the training data, "
            f"{self._protocol_note()})",
            "Poisson probability",
            tuple(row(p, protocol) for protocol in protocols for p in probs),
            tuple(fills),
            cells,
        )

    def metrics(self) -> list[str]:
        names = self.class_names
        grouped = [f"{training.IOU_BY_IMAGE_CLASS}/{n}" for n in names]
        grouped = [m for m in grouped if any(m in r.scores for r in self.usable)]
        return ["iou", "f1", *(f"iou/{n}" for n in names), *(f"f1/{n}" for n in names), *grouped]


# ---------------------------------------------------------------------------------------------
# Writing the summary: Markdown, CSV, plots.

_SETUP_FIELDS = (
    "data",
    "protocol",
    "split",
    "val_fraction",
    "split_free",
    "epochs",
    "batch_size",
    "image_size",
    "lr",
    "weight_decay",
    "max_steps",
    "eval_every",
    "pretrained",
    *PROTOCOL_CHOICES,
)
"""Settings shared by a grid's runs, listed in the summary (and flagged when they vary)."""


def _describe(values: Sequence[Any]) -> str:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "varies: " + ", ".join(f"{value} ({k} runs)" for value, k in counts.items())


def setup_table(records: Sequence[RunRecord]) -> str:
    """The settings of the summarised runs, one row each; a setting that varies says so."""
    lines = ["| setting | value |", "| --- | --- |"]
    for name in _SETUP_FIELDS:
        value = _describe([getattr(r.config, name) for r in records])
        if name == "split" and value == "stratified":
            value = "stratified, re-drawn for every seed (split seed = run seed)"
        lines.append(f"| {name} | {value} |")
    loaded = sum(bool((r.runtime.get("pretrained") or {}).get("loaded")) for r in records)
    lines.append(f"| ImageNet weights loaded | {loaded} of {len(records)} runs |")
    devices = [r.runtime.get("device") for r in records if r.runtime.get("device")]
    if devices:
        lines.append(f"| device | {_describe(devices)} |")
    return "\n".join(lines)


def _runs_table(records: Sequence[RunRecord]) -> str:
    lines = [
        "| run | status | epochs | best epoch | IoU % | F1 % |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in records:
        total = r.config.epochs if r.config.epochs is not None else "?"
        iou, f1 = (
            (f"{100 * r.iou:.2f}", f"{100 * r.scores.get('f1', math.nan):.2f}") if r.scores else ("—", "—")
        )
        lines.append(
            f"| {r.name} | {r.status} | {r.epochs_completed}/{total} | {r.best_epoch or '—'} | {iou} | {f1} |"
        )
    return "\n".join(lines)


def plot_name(kind: str, encoder: str) -> str:
    return f"{kind}__{encoder}.png"


def render_markdown(summary: Summary, title: str) -> str:
    """`summary.md`: what the numbers are, the setup, then each table whose factors the grid has."""
    records, usable = summary.records, summary.usable
    excluded = [r for r in records if not r.usable]
    parts = [
        f"# Experiment results: {title}",
        "IoU is dataset-level: TP / (TP + FP + FN) with the counts summed over the whole validation set "
        "(per class, and over all classes for the overall IoU), in percent. Each run contributes the "
        "validation record of its best epoch (highest overall IoU, the earliest on ties: the epoch "
        "`best.pt` holds), read from its `metrics.jsonl`. A cell is the mean ± sample standard deviation "
        "(ddof = 1) over seeds, n the number of seeds; a cell of one seed has no standard deviation. "
        "Each table names the protocol its runs were trained under (`dli train --protocol`); the "
        'section "As the paper computes them" repeats the tables with the reference implementation\'s '
        "spread and per-class grouping.",
        f"Runs: {len(records)} found, {len(usable)} summarised"
        + (
            f"; excluded: {len(excluded)} ({', '.join(sorted({r.status for r in excluded}))}; see Runs)."
            if excluded
            else "."
        ),
    ]
    if usable:
        parts += ["## Setup", setup_table(usable)]
        table = summary.table1()
        parts += [f"## Methods and encoders (Table 1)\n\n{table.title}.", table.to_markdown()]
        parts.append("## Per-class IoU (Fig. 3)")
        for encoder in summary.encoders:
            table = summary.per_class(encoder)
            if table.columns:
                parts += [
                    f"### {encoder}",
                    table.to_markdown(),
                    f"![{table.title}]({plot_name('per_class_iou', encoder)})",
                ]
        if len(summary.fractions) > 1:
            parts.append(
                "## Training-data fraction (Fig. 5)\n\n"
                "Each fraction keeps that share of every training class (the validation set is unchanged). "
                "Drop = mean IoU with 100% of the data − mean IoU at the fraction, in IoU points "
                "(positive: worse), with the drop relative to the 100% IoU in brackets."
            )
            for encoder in summary.encoders:
                ious, drops = summary.fraction_tables(encoder)
                if len(ious.columns) < 2:
                    continue
                parts += [f"### {encoder}", ious.to_markdown()]
                if drops.cells:
                    parts += [f"{drops.title}:", drops.to_markdown()]
                parts.append(f"![{ious.title}]({plot_name('iou_vs_fraction', encoder)})")
        parts += _paper_sections(summary)
        ablations = [(e, summary.ablation(e)) for e in summary.encoders]
        if any(table is not None for _, table in ablations):
            parts.append(
                "## DLI ablation (Table 2)\n\nRows: probability that an injection uses Poisson blending "
                "instead of cut-paste. Columns: which defect-free images of a batch receive a defect."
            )
            for encoder, table in ablations:
                if table is not None:
                    parts += [f"### {encoder}", table.to_markdown()]
    parts += ["## Runs", _runs_table(records)]
    return "\n\n".join(parts) + "\n"


def _paper_sections(summary: Summary) -> list[str]:
    """Table 1 and the per-class IoU as the reference implementation computes them."""
    parts = [
        "## As the paper computes them\n\n"
        "The same runs, summarised as the paper's reference implementation does: the spread is the "
        "population standard deviation (ddof = 0) over seeds, and the IoU of a class is computed over "
        "the validation images of that class, counting every channel of those images (a false positive "
        "in another class's channel counts against the image's class).",
    ]
    table = summary.table1(population=True)
    parts += [f"### Table 1, population std\n\n{table.title}.", table.to_markdown()]
    for encoder in summary.encoders:
        grouped = summary.per_class(encoder, by_image_class=True, population=True)
        if any(name != "overall" for name, _ in grouped.cells):
            parts += [f"### Per-class IoU by image class, {encoder}", grouped.to_markdown()]
    return parts


def _csv_number(value: float | None) -> str:
    if value is None:
        return ""
    return "nan" if math.isnan(value) else f"{value:.10g}"


VARIANT_COLUMNS = ("protocol", "variant", "method", "poisson_prob", "fill")


def _variant_columns(variant: Variant) -> dict[str, str]:
    return {
        "protocol": variant.protocol,
        "variant": variant.label,
        "method": variant.method,
        "poisson_prob": _csv_number(variant.poisson_prob),
        "fill": variant.fill or "",
    }


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


SUMMARY_COLUMNS = (
    *VARIANT_COLUMNS,
    *("encoder", "fraction", "metric"),
    *("n", "mean", "std", "population_std", "drop_vs_full", "relative_drop_vs_full"),
)


def render_summary_csv(summary: Summary) -> str:
    """`summary.csv`: one row per setting and metric; IoU/F1 as fractions (not percent).

    `std` is the sample standard deviation (ddof = 1), `population_std` the paper's (ddof = 0).
    `drop_vs_full` is the same setting's mean with all training data minus this mean
    (positive: worse); `relative_drop_vs_full` divides it by the full-data mean.
    """
    settings = sorted(
        summary.by_setting,
        key=lambda s: (s.variant.sort_key(), summary.encoders.index(s.encoder), s.fraction),
    )
    rows = []
    for setting in settings:
        for metric in summary.metrics():
            stat = summary.stat(setting, metric)
            full = summary.stat(Setting(setting.variant, setting.encoder, 1.0), metric)
            drop = Drop(full.mean, stat.mean) if full.n and stat.n else None
            rows.append(
                _variant_columns(setting.variant)
                | {"encoder": setting.encoder, "fraction": _csv_number(setting.fraction), "metric": metric}
                | {"n": stat.n, "mean": _csv_number(stat.mean), "std": _csv_number(stat.std)}
                | {"population_std": _csv_number(stat.population_std)}
                | {
                    "drop_vs_full": _csv_number(drop.points if drop else None),
                    "relative_drop_vs_full": _csv_number(drop.relative if drop else None),
                }
            )
    return _csv_text(rows, SUMMARY_COLUMNS)


def render_runs_csv(records: Sequence[RunRecord]) -> str:
    """`runs.csv`: one row per run folder with its best epoch's scores (fractions)."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record.class_names))
    metrics = ["iou", "f1", *(f"iou/{n}" for n in names), *(f"f1/{n}" for n in names)]
    grouped = [f"{training.IOU_BY_IMAGE_CLASS}/{n}" for n in names]
    metrics += [m for m in grouped if any(m in r.scores for r in records)]
    rows = [
        {"run": r.name, "status": r.status}
        | _variant_columns(r.setting.variant)
        | {"encoder": r.config.encoder, "fraction": _csv_number(r.setting.fraction), "seed": r.seed}
        | {"epochs_completed": r.epochs_completed, "best_epoch": "" if r.best_epoch is None else r.best_epoch}
        | {m: _csv_number(r.scores[m]) if m in r.scores else "" for m in metrics}
        for r in records
    ]
    columns = ["run", "status", *VARIANT_COLUMNS, "encoder", "fraction", "seed"]
    return _csv_text(rows, [*columns, "epochs_completed", "best_epoch", *metrics])


def _new_figure(width: float, height: float) -> Any:
    """A Matplotlib figure drawn by the Agg canvas (no pyplot: no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def _mean_std_percent(cell: Any) -> tuple[float, float]:
    if not isinstance(cell, Stat) or not cell.n:
        return math.nan, 0.0
    return 100 * cell.mean, 0.0 if math.isnan(cell.std) else 100 * cell.std


def plot_per_class(table: Table, path: Path) -> None:
    """Grouped bars: IoU per class for each method, with ±1 std error bars."""
    figure = _new_figure(max(6.0, 1.1 * len(table.rows) * max(1, len(table.columns)) / 2), 4.0)
    axes = figure.add_subplot()
    x = np.arange(len(table.rows))
    width = 0.8 / max(1, len(table.columns))
    for i, column in enumerate(table.columns):
        means, stds = zip(*(_mean_std_percent(table.cell(row, column)) for row in table.rows), strict=True)
        offset = (i - (len(table.columns) - 1) / 2) * width
        axes.bar(x + offset, means, width, yerr=stds, capsize=2, label=column)
    axes.set_xticks(x, table.rows)
    axes.set_ylabel("IoU (%)")
    axes.set_ylim(bottom=0)
    axes.set_title(table.title, fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    _save_png(figure, path)


def plot_fractions(table: Table, path: Path) -> None:
    """IoU against the training-data fraction for each method, with ±1 std error bars."""
    figure = _new_figure(6.0, 4.0)
    axes = figure.add_subplot()
    xs = [float(column.rstrip("%")) for column in table.columns]
    for row in table.rows:
        points = [
            (x, *_mean_std_percent(table.cell(row, column)))
            for x, column in zip(xs, table.columns, strict=True)
        ]
        points = [p for p in points if not math.isnan(p[1])]
        if points:
            px, py, pe = zip(*points, strict=True)
            axes.errorbar(px, py, yerr=pe, marker="o", capsize=3, label=row)
    axes.set_xticks(xs, [f"{x:g}" for x in xs])
    axes.set_xlabel("training data (%)")
    axes.set_ylabel("IoU (%)")
    axes.set_title(table.title, fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    _save_png(figure, path)


def aggregate(expdir: str | Path) -> Summary:
    """Summarise every run folder in `expdir` into `summary.md`, `summary.csv`, `runs.csv`, PNGs."""
    expdir = Path(expdir)
    records = read_runs(expdir)
    if not records:
        raise DliError(f"no run folders (sub-folders with {training.CONFIG_FILE}) in {expdir}")
    stored = read_stored_grid(expdir)
    summary = Summary(records, encoder_order=(stored or {}).get("encoders", ()))
    for encoder in summary.encoders:
        table = summary.per_class(encoder)
        if table.columns:
            plot_per_class(table, expdir / plot_name("per_class_iou", encoder))
        ious, _ = summary.fraction_tables(encoder)
        if len(ious.columns) > 1:
            plot_fractions(ious, expdir / plot_name("iou_vs_fraction", encoder))
    # The tables last: once they are in place, every plot they link to is too.
    atomic_write_text(expdir / RUNS_CSV, render_runs_csv(records))
    atomic_write_text(expdir / SUMMARY_CSV, render_summary_csv(summary))
    atomic_write_text(expdir / SUMMARY_MD, render_markdown(summary, expdir.absolute().name))
    return summary


# ---------------------------------------------------------------------------------------------
# Command line.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `dli experiment` flags: where the grid comes from, its factors, shared train settings."""
    parser.description = (
        "Run a grid of trainings (methods x encoders x seeds x data fractions, and Poisson probability x "
        "fill policy for DLI) into EXPDIR, one folder per run, then aggregate mean ± std over seeds into "
        "summary.md, summary.csv and plots. Re-running skips finished runs and resumes killed ones. "
        f"Grid sources, later overriding earlier: --preset ({', '.join(PRESETS)}) or "
        f"EXPDIR/{EXPERIMENT_FILE}, --config FILE (YAML or TOML with the keys of the flags below and "
        "a train: section), flags."
    )
    source = parser.add_argument_group("grid source and output")
    source.add_argument("--preset", help=f"a paper grid: {', '.join(PRESETS)}")
    source.add_argument("--config", metavar="FILE", help="grid file (.yaml, .yml or .toml)")
    source.add_argument("--out", metavar="EXPDIR", help="experiment folder (one sub-folder per run)")
    source.add_argument(
        "--aggregate-only", metavar="EXPDIR", help="only re-aggregate the run folders in EXPDIR (no training)"
    )
    source.add_argument(
        "--dry-run", action="store_true", help="list the runs and whether each is new, resumed or finished"
    )

    grid = parser.add_argument_group("grid factors (comma-separated lists)")
    grid_help = {
        "protocols": f"training protocols ({', '.join(PROTOCOLS)}; the paper presets: reference)",
        "methods": f"training methods ({', '.join(METHODS)})",
        "encoders": "UNet encoders (see dli train --encoder)",
        "seeds": "seeds; each also draws the stratified split (e.g. 0,1,2 or 0-4)",
        "fractions": "shares of the training data, in (0, 1]",
        "poisson_probs": "DLI runs: Poisson blending probabilities, in [0, 1]",
        "fills": f"DLI runs: fill policies ({', '.join(FILLS)})",
    }
    for key, help_ in grid_help.items():
        names = [flag(key), "--protocol"] if key == "protocols" else [flag(key)]
        grid.add_argument(*names, dest=key, default=argparse.SUPPRESS, metavar="LIST", help=help_)
    grid.add_argument(
        "--synthetic-images",
        dest="synthetic_images",
        default=argparse.SUPPRESS,
        metavar="N",
        help="without --data: generate N synthetic images into EXPDIR and train on them",
    )

    train = parser.add_argument_group("settings for every run (default: the preset's, else dli train's)")
    helps = _train_flag_help()
    for key, kind in TRAIN_SETTINGS.items():
        if kind is bool:
            action: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        else:
            action = {"metavar": {int: "N", float: "X"}.get(kind, key.upper())}
        train.add_argument(flag(key), dest=key, default=argparse.SUPPRESS, help=helps.get(key), **action)


def _train_flag_help() -> dict[str, str]:
    """`dli train`'s help text of each shared setting, so both commands describe them alike."""
    parser = argparse.ArgumentParser(add_help=False)
    training.add_arguments(parser)
    return {
        action.dest: (action.help or "").replace("default: see above", "default: dli train's")
        for action in parser._actions
        if action.dest in TRAIN_SETTINGS
    }


def flag_document(args: argparse.Namespace) -> dict[str, Any]:
    """The grid document of the flags actually given (absent flags are not in `args`)."""
    document: dict[str, Any] = {
        key: getattr(args, key) for key in (*LIST_KEYS, "synthetic_images") if hasattr(args, key)
    }
    settings = {key: getattr(args, key) for key in TRAIN_SETTINGS if hasattr(args, key)}
    if settings:
        document["train"] = settings
    return document


def _one_line_warnings(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    print(f"dli experiment: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """`dli experiment`: train the grid (or only aggregate), then print where the summary is."""
    if args.aggregate_only:
        expdir = Path(args.aggregate_only)
    else:
        if not args.out:
            raise DliError("--out EXPDIR is required (or --aggregate-only EXPDIR to only summarise)")
        expdir = Path(args.out)
        flags = flag_document(args)
        stored = None if (args.preset or args.config) else read_stored_grid(expdir)
        if not (args.preset or args.config or stored or any(key in flags for key in LIST_KEYS)):
            raise DliError(
                f"nothing to run: give --preset ({', '.join(PRESETS)}), --config FILE or grid flags such "
                f"as --methods (or --out a folder with an {EXPERIMENT_FILE} to continue)"
            )
        grid = resolve_grid(preset=args.preset, config_file=args.config, flags=flags, stored=stored)
        runs = grid.runs(expdir)
        if args.dry_run:
            for run_ in runs:
                print(f"{run_.name}: {run_state(run_).value}")
            print(f"{len(runs)} runs in {expdir}")
            return 0
        write_grid(grid, expdir)
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings  # a CLI user needs the message, not our source line
            run_grid(grid, expdir)
    summary = aggregate(expdir)
    if summary.usable:
        print(summary.table1().to_markdown())
    print(f"summary: {expdir / SUMMARY_MD} ({len(summary.usable)} of {len(summary.records)} runs)")
    return 0


if __name__ == "__main__":
    from dli.cli import main

    sys.exit(main(["experiment", *sys.argv[1:]]))
