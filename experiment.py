"""`dli experiment`: the paper's experiments as grids of trainings, aggregated into its tables.

A grid crosses protocols x methods x encoders x seeds x training-data fractions, and for DLI
runs also Poisson probability x fill policy. Every run is trained under its grid's protocol
(`dli train --protocol`, `protocols: [reference, dli]` in a grid file): the presets of the
paper's experiments use ``reference`` and the published split, so their numbers compare with
the paper's; a grid over both protocols asks whether DLI's margin survives corrected baselines.
The grid comes from a preset (`dli.experiments.presets`), a YAML or TOML file (`--config`) and
flags, later sources overriding earlier ones. Every run trains with
`dli.training.trainer.train` in its own folder under EXPDIR, named by its factors
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

This module is the command layer: its flags and the order of the steps. The steps live in
`dli.experiments`: the grid (`grid`), running it (`run`), the statistics over seeds
(`aggregate`) and the summary files (`report`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dli import train as training
from dli.common.errors import DliError
from dli.experiments.grid import LIST_KEYS, TRAIN_SETTINGS, resolve_grid
from dli.experiments.presets import PRESETS
from dli.experiments.report import SUMMARY_MD, aggregate
from dli.experiments.run import EXPERIMENT_FILE, read_stored_grid, run_grid, run_state, write_grid
from dli.models.losses import METHODS
from dli.training.config import FILLS, PROTOCOLS, flag


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
        states = [run_state(run_) for run_ in runs]  # every folder checked before anything is written
        if args.dry_run:
            for run_, state in zip(runs, states, strict=True):
                print(f"{run_.name}: {state.value}")
            print(f"{len(runs)} runs in {expdir}")
            return 0
        write_grid(grid, expdir)
        run_grid(grid, expdir)  # its warnings: one line each (`dli.cli.run_command`)
    summary = aggregate(expdir)
    if summary.usable:
        print(summary.table1().to_markdown())
    print(f"summary: {expdir / SUMMARY_MD} ({len(summary.usable)} of {len(summary.records)} runs)")
    return 0


if __name__ == "__main__":
    from dli.cli import main

    sys.exit(main(["experiment", *sys.argv[1:]]))
