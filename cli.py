"""The `dli` console command: one subcommand per job, each in its own module.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. Modules are
imported only when their command runs, so `dli --help` stays instant (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from dli.common.errors import DliError, os_error_message

# name -> (module, one-line help). A plain dict is the registry.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dli.train", "train a UNet (default: a short run on bundled synthetic data)"),
    "eval": ("dli.evaluate", "per-class IoU/F1 of a checkpoint on a dataset"),
    "predict": ("dli.predict", "write predicted masks and overlays for a folder of images"),
    "export": ("dli.export", "export a checkpoint to ONNX (metadata embedded, checked against torch)"),
    "preview": ("dli.pipeline.preview", "PNG grid of training batches before and after injection"),
    "synth": (
        "dli.data.synth",
        "generate a synthetic dataset (MT-like; colour, index masks, COCO, labelme)",
    ),
    "data": ("dli.data_report", "what training would see of a dataset: classes, instances, sizes, problems"),
    "experiment": ("dli.experiment", "run a grid of trainings and aggregate the paper's tables"),
    "bench": ("dli.bench.throughput", "measure data-path, kernel and training throughput"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: dli <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `dli <command> --help` for a command's options."]
    return "\n".join(lines)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors (an unknown flag, a bad choice) are one `DliError` line, not usage."""

    def error(self, message: str) -> NoReturn:
        raise DliError(f"{message} (see {self.prog} --help)")


def build_parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of one subcommand (imports its module)."""
    module_name, help_ = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = OneLineParser(
        prog=f"dli {command}", description=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)
    return parser


def run_command(command: str, argv: Sequence[str]) -> int:
    """Parse `argv` for `command` and run it; user and OS errors become one line and exit status 2."""
    try:
        parser = build_parser(command)
        args = parser.parse_args(list(argv))
        with warnings.catch_warnings():
            # A user of the command needs the message, not the source line that warned.
            warnings.showwarning = lambda message, *_, **__: print(
                f"dli {command}: warning: {message}", file=sys.stderr
            )
            return int(args._run(args) or 0)
    except DliError as error:
        print(f"dli {command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the environment's fault (permissions, a full disk), not a bug
        print(f"dli {command}: error: {os_error_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dli {command}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dli` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from dli import __version__

        print(f"dli {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"dli: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(command, rest)


if __name__ == "__main__":
    sys.exit(main())
