"""Run folders read back into records, and their statistics over seeds.

Aggregation reads nothing but run folders (`config.yaml` + `metrics.jsonl`), so it also works
on hand-made folders and on runs trained elsewhere and copied in; the runner's skip/resume
decision reads them the same way (`read_run`). A run's result is the validation record of its
best epoch: the highest dataset-level IoU, the earliest on ties (the epoch `best.pt` holds).
Seeds are summarised as mean ± sample standard deviation (ddof = 1) with n shown (`Stat`); the
paper's spread (population std, ddof = 0, `PaperStat`) and its per-class IoU (grouped by each
validation image's true class) are given too, labelled as such. `Summary` groups the usable runs
by setting and builds the paper's tables (`Table`); `dli.experiments.report` writes them out.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dli.common.errors import DliError
from dli.experiments.grid import Setting, Variant, variant_of
from dli.training import run_folder
from dli.training.config import FILLS, PROTOCOLS, TrainConfig, read_run_config

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
    config, runtime = read_run_config(folder / run_folder.CONFIG_FILE)
    records = _read_metrics(folder / run_folder.METRICS_JSONL)
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
        grouped = [f"{run_folder.IOU_BY_IMAGE_CLASS}/{n}" for n in class_names]
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
    folders = sorted(p for p in expdir.iterdir() if (p / run_folder.CONFIG_FILE).is_file())
    return [read_run(folder) for folder in folders]


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
        prefix = run_folder.IOU_BY_IMAGE_CLASS if by_image_class else "iou"
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
        grouped = [f"{run_folder.IOU_BY_IMAGE_CLASS}/{n}" for n in names]
        grouped = [m for m in grouped if any(m in r.scores for r in self.usable)]
        return ["iou", "f1", *(f"iou/{n}" for n in names), *(f"f1/{n}" for n in names), *grouped]
