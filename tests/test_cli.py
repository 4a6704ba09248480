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


def test_a_warning_is_one_line_naming_the_command_not_the_source_line(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    rows = ["image,mask,class"]
    for i, name in enumerate(["scratch"] * 3 + ["scrach", "free", "free"]):
        Image.fromarray(np.full((24, 24), 90 + i, np.uint8)).save(tmp_path / f"i{i}.jpg")
        mask = ""
        if name != "free":
            pixels = np.zeros((24, 24), np.uint8)
            pixels[4:9, 4:9] = 255
            Image.fromarray(pixels).save(tmp_path / f"i{i}.png")
            mask = f"i{i}.png"
        rows.append(f"i{i}.jpg,{mask},{name}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    assert main(["data", str(tmp_path / "list.csv")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("dli data: warning: 1 warning in dataset") and "'scrach'" in err
    assert ".py:" not in err and "Warning:" not in err  # neither our file and line nor the category
