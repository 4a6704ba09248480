"""`bench/poisson.py` runs end to end on synthetic data, finds MT data as the tests do, refuses bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dli.bench import magnetic_tile_root
from dli.bench import poisson as bench


def test_a_small_synthetic_run_reports_every_figure(tmp_path: Path, capsys) -> None:
    out = tmp_path / "poisson.json"
    argv = ["--n", "4", "--size", "48", "--data", "synthetic", "--repeats", "1", "--json", str(out)]
    assert bench.main(argv) == 0
    figures = json.loads(out.read_text())
    assert figures["config"]["gradients"] == "mixed"
    assert figures["all_converged"] and figures["iterations"]["boundary_matched_start"]["max"] >= 1
    assert figures["traffic_bytes_per_batch"] > 0 and figures["buckets"] >= 1
    assert figures["opencv"]["cpu_seconds_per_batch"] > 0 and figures["opencv"]["failures"] == 0
    assert "OpenCV / dli CPU time" in capsys.readouterr().out


def test_mt_data_is_found_through_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DLI_MT_ROOT", str(tmp_path))
    assert magnetic_tile_root() is None  # no MT_Free folder: not MT data
    (tmp_path / "MT_Free").mkdir()
    assert magnetic_tile_root() == tmp_path
    assert bench.build_parser().parse_args([]).data == str(tmp_path)


def test_a_missing_data_folder_is_one_line_and_status_2(tmp_path: Path, capsys) -> None:
    assert bench.main(["--data", str(tmp_path / "absent"), "--n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "absent") in err


@pytest.mark.parametrize("flag", [["--n", "0"], ["--size", "4"], ["--repeats", "0"]])
def test_bad_sizes_are_refused(flag: list[str], capsys) -> None:
    assert bench.main(["--data", "synthetic", *flag]) == 2
    assert "must be" in capsys.readouterr().err


def test_the_solvers_bench_times_each_solver_on_one_batch(tmp_path, capsys) -> None:
    from dli.bench.solvers import SOLVERS, main

    out = tmp_path / "solvers.json"
    argv = ["--n", "4", "--size", "48", "--repeats", "1", "--no-training", "--data", "synthetic"]
    assert main([*argv, "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(SOLVERS) <= set(figures) and figures["device"] == "cpu"
    for name in SOLVERS:
        assert figures[name]["ms_per_batch"] > 0 and figures[name]["summary"]
    assert figures["direct"]["max_abs_difference_from_cpu_direct"] == 0.0  # the same code on the CPU
    assert main(["--n", "0", "--no-training"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench.solvers: error: --n") and "\n" not in err
