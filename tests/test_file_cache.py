"""The in-memory cache of encoded files (`dli.pipeline.file_cache`) and the loader that reads through it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dli.cli import main
from dli.common.errors import DliError
from dli.data.manifest import Manifest
from dli.data.synth import generate
from dli.pipeline.donor_cache import BUDGET_VARIABLE as DONOR_BUDGET_VARIABLE
from dli.pipeline.file_cache import BUDGET_VARIABLE, DEFAULT_BUDGET_MB, FileCache, budget_from_environment
from dli.pipeline.loader import build_loader
from dli.pipeline.planner import DliConfig


def write(path: Path, size: int, seed: int) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def test_a_file_is_read_once_then_served_from_memory(tmp_path: Path) -> None:
    data = write(tmp_path / "a.png", 300, seed=1)
    cache = FileCache(budget=10_000)
    first = cache.read(str(tmp_path / "a.png"))
    assert first.tobytes() == data and first.dtype == np.uint8
    (tmp_path / "a.png").unlink()  # served from memory from now on
    second = cache.read(str(tmp_path / "a.png"))
    assert second is first and (cache.hits, cache.misses, cache.bytes, len(cache)) == (1, 1, 300, 1)
    with pytest.raises(ValueError):
        second[0] = 0  # shared: nobody may write to it


def test_files_are_kept_until_the_budget_is_full_and_none_is_evicted(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"{name}.png") for name in "abcd"]
    for k, path in enumerate(paths):
        write(Path(path), 100, seed=k)
    cache = FileCache(budget=250)  # two files fit, not three
    a, b, c, d = paths
    for path in (a, b, c, a, b):
        cache.read(path)
        assert cache.bytes <= cache.budget
    # a and b were kept and served again; c did not fit and was not kept.
    assert (cache.hits, cache.misses, len(cache), cache.bytes) == (2, 3, 2, 200)
    cache.read(c)
    assert cache.misses == 4  # read from disk again, every time
    write(Path(d), 40, seed=9)  # the room left (50 bytes) takes a small file
    cache.read(d)
    cache.read(d)
    assert cache.hits == 3 and cache.bytes == 240 and len(cache) == 3
    write(Path(d), 400, seed=10)  # served as first read: a running dataset is not expected to change
    assert len(cache.read(d)) == 40


def test_a_zero_budget_keeps_nothing_and_sees_every_change(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    write(path, 50, seed=1)
    cache = FileCache(budget=0)
    cache.read(str(path))
    changed = write(path, 60, seed=2)
    assert cache.read(str(path)).tobytes() == changed and len(cache) == 0 and cache.misses == 2
    (tmp_path / "empty.png").write_bytes(b"")
    assert len(cache.read(str(tmp_path / "empty.png"))) == 0 and len(cache) == 0  # not even an empty file


def test_an_unreadable_file_is_named_and_not_kept(tmp_path: Path) -> None:
    cache = FileCache(budget=10_000)
    missing = tmp_path / "missing.png"
    with pytest.raises(DliError, match=r"cannot read .*missing\.png"):
        cache.read(str(missing))
    assert len(cache) == 0 and cache.bytes == 0
    data = write(missing, 20, seed=3)  # once it exists it is read
    assert cache.read(str(missing)).tobytes() == data


def test_the_budget_comes_from_the_environment() -> None:
    assert budget_from_environment({}) == DEFAULT_BUDGET_MB * 2**20
    assert budget_from_environment({BUDGET_VARIABLE: " "}) == DEFAULT_BUDGET_MB * 2**20
    assert budget_from_environment({BUDGET_VARIABLE: "0"}) == 0
    assert budget_from_environment({BUDGET_VARIABLE: "64"}) == 64 * 2**20
    for bad in ("-1", "1.5", "lots"):
        with pytest.raises(DliError, match=f"{BUDGET_VARIABLE}={bad!r}"):
            budget_from_environment({BUDGET_VARIABLE: bad})


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return generate(
        tmp_path_factory.mktemp("data") / "synth", images=40, seed=5, size_range=((60, 90), (50, 120))
    )


def epochs(manifest: Manifest, count: int) -> tuple[list, object]:
    loader = build_loader(manifest, batch_size=8, image_size=48, train=True, dli=DliConfig(), seed=1)
    batches = []
    for epoch in range(count):
        loader.set_epoch(epoch)
        batches += list(loader)
    loader.close()
    return batches, loader.files


def test_the_loader_reads_each_file_once_and_its_batches_do_not_change(
    synthetic: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BUDGET_VARIABLE, "0")
    uncached, off = epochs(synthetic, 2)
    monkeypatch.delenv(BUDGET_VARIABLE)
    cached, files = epochs(synthetic, 2)
    for a, b in zip(uncached, cached, strict=True):  # the CPU pipeline is deterministic: bit for bit
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
        torch.testing.assert_close(a.masks, b.masks, rtol=0, atol=0)
    assert off.hits == 0 and off.misses > 0  # type: ignore[attr-defined]
    # With the cache each file was read from disk once, however often the two epochs used it.
    assert files.misses == len(files) and files.hits > 0  # type: ignore[attr-defined]
    assert files.hits + files.misses == off.misses  # type: ignore[attr-defined]


def test_a_loader_read_once_keeps_no_file(synthetic: Manifest) -> None:
    loader = build_loader(synthetic, batch_size=8, image_size=48, train=False, keep_files=False)
    list(loader)
    loader.close()
    assert len(loader.files) == 0 and loader.files.misses > 0 and loader.files.hits == 0


@pytest.mark.parametrize("variable", [BUDGET_VARIABLE, DONOR_BUDGET_VARIABLE])
def test_a_bad_budget_stops_dli_train_with_one_line_before_writing(
    synthetic: Manifest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
) -> None:
    monkeypatch.setenv(variable, "lots")
    out = tmp_path / "run"
    assert main(["train", "--data", str(synthetic.root), "--out", str(out), "--epochs", "1"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and f"{variable}='lots'" in lines[0], lines
    assert not out.exists()


def test_the_host_stage_bench_reports_every_stage_with_and_without_the_cache(
    synthetic: Manifest, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dli.bench import loader_host
    from dli.pipeline.loader import HOST_STAGES

    out = tmp_path / "host.json"
    common = ["--data", str(synthetic.root), "--batch-size", "8", "--image-size", "48", "--json", str(out)]
    assert loader_host.main([*common, "--budgets", "0", "16"]) == 0
    figures = json.loads(out.read_text())
    for method in ("bce", "dli"):
        off, on = figures[f"{method}@0MB"], figures[f"{method}@16MB"]
        assert off["cached_files"] == 0 and on["cached_files"] > 0
        for run in (off, on):
            assert run["batches"] > 0 and run["wall_ms"] > 0
            assert all(run[stage] >= 0 for stage in HOST_STAGES) and run["feed"] > 0
    assert "dli@16MB" in capsys.readouterr().out
    monkeypatch.setenv(BUDGET_VARIABLE, "7")
    assert loader_host.main([*common, "--budgets", "0", "-1"]) == 2  # refused before measuring anything
    captured = capsys.readouterr()
    assert "--budgets -1" in captured.err and "budget 0 MB" not in captured.err and not captured.out
    assert loader_host.main([*common, "--batches", "-2"]) == 2
    assert "--batches -2" in capsys.readouterr().err
    assert os.environ[BUDGET_VARIABLE] == "7"  # the caller's setting, as it was
