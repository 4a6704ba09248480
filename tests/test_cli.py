"""The `dli` command: help, unknown commands, user errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

from dli.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_one_line_error(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown command 'trian'" in err and "train" in err
    assert "\n" not in err


def test_python_dash_m_runs_the_same_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "dli", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0
    assert "usage: dli <command>" in proc.stdout
