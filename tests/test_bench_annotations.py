"""bench/annotations.py: the COCO-vs-MT-layout reading benchmark runs end to end on a small set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dli.bench.annotations import main
from dli.data.synth import generate


def test_benchmark_builds_both_layouts_and_times_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DLI_CACHE", str(tmp_path / "mine"))
    generate(tmp_path / "mt", images=12, seed=0, size_range=((40, 60), (40, 60)))
    argv = ["--data", str(tmp_path / "mt"), "--images", "30", "--repeats", "1", "--work", str(tmp_path / "w")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for row in ("mt  ", "coco, first run", "coco, cached"):
        assert row in out
    assert len(list((tmp_path / "w" / "coco" / "images").iterdir())) == 30  # 12 files linked over again
    assert len(list((tmp_path / "w" / "cache").glob("annotations/*/images.csv"))) == 1
    assert os.environ["DLI_CACHE"] == str(tmp_path / "mine")  # the caller's cache setting is back
