"""The summary of an experiment folder: `summary.md`, `summary.csv`, `runs.csv` and PNG plots.

`aggregate(expdir)` reads every run folder of EXPDIR (`dli.experiments.aggregate`), summarises
them over seeds and writes the summary into EXPDIR. The Markdown says what the numbers are, lists
the setup the runs share, then each of the paper's tables whose factors the grid has, with the
paper's own statistics in a section of their own; the CSVs hold the same numbers as fractions,
one row per setting and metric (`summary.csv`) and one per run (`runs.csv`). Every file is
written atomically and the tables last, so an interrupted aggregation leaves the previous one
intact and every plot a table links to is in place.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dli.common.atomic import atomic_write_bytes, atomic_write_text
from dli.common.errors import DliError
from dli.experiments.aggregate import Drop, RunRecord, Stat, Summary, Table, read_runs
from dli.experiments.grid import Setting, Variant
from dli.experiments.run import read_stored_grid
from dli.training import run_folder
from dli.training.config import PROTOCOL_CHOICES

SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
RUNS_CSV = "runs.csv"


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
    grouped = [f"{run_folder.IOU_BY_IMAGE_CLASS}/{n}" for n in names]
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
        raise DliError(f"no run folders (sub-folders with {run_folder.CONFIG_FILE}) in {expdir}")
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
