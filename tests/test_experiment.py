"""`dli experiment`: grids, skip/resume decisions, aggregation against hand-computed values, errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import dli.training.trainer
from dli.cli import main
from dli.common.errors import DliError
from dli.experiments import report
from dli.experiments.grid import Grid, read_grid_file, resolve_grid
from dli.experiments.report import aggregate
from dli.experiments.run import RunState, read_stored_grid, run_grid, run_state, write_grid
from dli.training.config import TrainConfig, write_run_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ("blowhole", "break", "crack")


# ---------------------------------------------------------------------------------------------
# End to end on the CPU.


@pytest.mark.slow
def test_smoke_preset_trains_aggregates_and_then_skips_finished_runs(tmp_path, monkeypatch, capsys):
    expdir = tmp_path / "exp"
    assert main(["experiment", "--preset", "smoke", "--out", str(expdir), "--max-steps", "2"]) == 0

    names = [
        "bce__l-resnet18__f1.0__s0",
        "dli-p0.5-all-free__l-resnet18__f1.0__s0",
        "bce__l-resnet18__f1.0__s1",
        "dli-p0.5-all-free__l-resnet18__f1.0__s1",
    ]
    for name in names:
        for file in ("config.yaml", "metrics.jsonl", "best.pt", "last.pt"):
            assert (expdir / name / file).is_file(), f"{name}/{file}"
        saved = yaml.safe_load((expdir / name / "config.yaml").read_text())
        assert saved["seed"] == int(name[-1]) and saved["split"] == "stratified"
        assert saved["max_steps"] == 2 and saved["image_size"] == 64 and saved["pretrained"] is False
        assert saved["data"] == "../synthetic-n40-s0"  # relative: the folder can move
    stored = yaml.safe_load((expdir / "experiment.yaml").read_text())
    assert stored["runs"] == names and stored["train"]["max_steps"] == 2

    summary = (expdir / "summary.md").read_text()
    assert "## Methods and encoders (Table 1)" in summary and "(n=2)" in summary
    assert "| bce |" in summary and "| dli-p0.5-all-free |" in summary
    assert "Fig. 5" not in summary and "Table 2" not in summary  # the grid has no such factors
    rows = list(csv.DictReader((expdir / "summary.csv").open()))
    overall = [r for r in rows if r["metric"] == "iou"]
    assert {r["variant"] for r in overall} == {"bce", "dli-p0.5-all-free"}
    assert all(r["n"] == "2" for r in overall)
    assert (expdir / "per_class_iou__l-resnet18.png").read_bytes().startswith(PNG_MAGIC)

    # Again, from the stored grid alone: nothing trains, no checkpoint is touched.
    mtimes = {name: (expdir / name / "last.pt").stat().st_mtime_ns for name in names}

    def no_training(config):
        raise AssertionError(f"trained {config.out} again")

    monkeypatch.setattr(dli.training.trainer, "train", no_training)
    capsys.readouterr()
    assert main(["experiment", "--out", str(expdir)]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 4
    assert {name: (expdir / name / "last.pt").stat().st_mtime_ns for name in names} == mtimes


# ---------------------------------------------------------------------------------------------
# Skip / resume / restart decisions (training replaced by a recorder).


def _write_run(run, *, total_steps: int, steps: list[int], files: tuple[str, ...] = ()) -> None:
    run.folder.mkdir(parents=True)
    write_run_config(run.folder / "config.yaml", run.config, {"total_steps": total_steps})
    lines = [json.dumps({"epoch": i + 1, "step": s, "iou": 0.5}) for i, s in enumerate(steps)]
    (run.folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    for name in files:
        (run.folder / name).write_bytes(b"checkpoint")


@pytest.mark.slow  # several CPU trainings in one test (a run, an interrupted one, its resume)
def test_finished_runs_are_skipped_killed_ones_resumed_and_partial_ones_restarted(tmp_path, monkeypatch):
    grid = resolve_grid(flags={"methods": "bce", "seeds": "0-3", "train": {"epochs": "2", "device": "cpu"}})
    runs = grid.runs(tmp_path)
    finished, killed, partial, new = runs
    _write_run(finished, total_steps=20, steps=[10, 20], files=("last.pt", "best.pt"))
    _write_run(killed, total_steps=20, steps=[10], files=("last.pt", "best.pt"))
    _write_run(partial, total_steps=20, steps=[], files=("best.pt",))  # killed before its first last.pt
    assert [run_state(r) for r in runs] == [RunState.FINISHED, RunState.RESUME, RunState.NEW, RunState.NEW]

    calls = []

    def recorder(config):
        calls.append((Path(config.out).name, config.resume, (Path(config.out) / "best.pt").exists()))
        return SimpleNamespace(best=None, best_epoch=None, epochs_completed=2)

    monkeypatch.setattr(dli.training.trainer, "train", recorder)
    run_grid(grid, tmp_path, log=lambda line: None)
    assert calls == [(killed.name, True, True), (partial.name, False, False), (new.name, False, False)]


def test_a_folder_holding_a_run_with_other_settings_is_an_error(tmp_path):
    grid = resolve_grid(flags={"methods": "bce", "train": {"epochs": "2"}})
    (run,) = grid.runs(tmp_path)
    other = resolve_grid(flags={"methods": "bce", "train": {"epochs": "3"}}).runs(tmp_path)[0]
    _write_run(other, total_steps=30, steps=[10, 20, 30])
    with pytest.raises(DliError, match=r"--epochs 2 \(folder has 3\)"):
        run_state(run)


def test_dry_run_lists_runs_with_their_state(tmp_path, capsys):
    grid = resolve_grid(flags={"methods": "bce,dli", "train": {"epochs": "1"}})
    bce, _ = grid.runs(tmp_path)
    _write_run(bce, total_steps=5, steps=[5])
    argv = ["experiment", "--out", str(tmp_path), "--methods", "bce,dli", "--epochs", "1", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "bce__l-resnet18__f1.0__s0: finished" in out and "dli-p0.5-all-free__l-resnet18__f1.0__s0: new" in out
    )
    assert not (tmp_path / "experiment.yaml").exists()


# ---------------------------------------------------------------------------------------------
# Grids: presets, files, flags.


def test_presets_expand_to_the_papers_grids(tmp_path):
    sizes = {"table1": 5 * 3 * 5, "ablation": 3 * 2 * 5, "fractions": 2 * 5 * 5, "smoke": 2 * 2}
    for preset, size in sizes.items():
        runs = resolve_grid(preset=preset).runs(tmp_path)
        assert len(runs) == size == len({r.name for r in runs}), preset
        # The paper's grids: the reference protocol on the published split; smoke: dli, stratified.
        paper = preset != "smoke"
        for r in runs:
            assert r.config.seed == r.seed and r.config.out == str(tmp_path.absolute() / r.name)
            assert r.config.split == ("reference" if paper else "stratified")
            assert r.config.protocol == ("reference" if paper else "dli")
            assert r.name.startswith("reference__") == paper
    ablation = {r.name: r.config for r in resolve_grid(preset="ablation").runs(tmp_path)}
    config = ablation["reference__dli-p0-until-uniform__l-resnet18__f1.0__s4"]
    assert (config.method, config.poisson_prob, config.fill, config.seed) == ("dli", 0.0, "until-uniform", 4)
    assert (config.dice, config.decoder_convs, config.resize) == ("global", 4, "nearest")
    fractions = {r.name: r.config for r in resolve_grid(preset="fractions").runs(tmp_path)}
    assert fractions["reference__bce__l-resnet18__f0.25__s2"].data_fraction == 0.25
    corrected = resolve_grid(preset="table1", flags={"protocols": "dli", "train": {"split": "stratified"}})
    assert {(r.config.protocol, r.config.split) for r in corrected.runs(tmp_path)} == {("dli", "stratified")}


def test_flags_override_the_preset_and_a_fixed_split_applies_to_every_seed(tmp_path):
    grid = resolve_grid(
        preset="smoke", flags={"seeds": "3-5", "train": {"epochs": "2", "split": "reference"}}
    )
    assert grid.seeds == (3, 4, 5) and grid.methods == ("bce", "dli")
    assert grid.train["epochs"] == 2 and grid.train["batch_size"] == 4
    assert {r.config.split for r in grid.runs(tmp_path)} == {"reference"}


def test_grid_files_yaml_and_toml_and_the_stored_grid_round_trip(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "grid.yaml").write_text(
        "methods: [bce, dli]\nseeds: 0,1\npoisson_probs: [0, 1]\ntrain:\n  data: data\n  epochs: 4\n"
    )
    (tmp_path / "grid.toml").write_text(
        'methods = ["bce", "dli"]\nseeds = [0, 1]\npoisson_probs = [0, 1]\n\n'
        '[train]\ndata = "data"\nepochs = 4\n'
    )
    from_yaml = Grid.from_document(read_grid_file(tmp_path / "grid.yaml"))
    assert Grid.from_document(read_grid_file(tmp_path / "grid.toml")) == from_yaml
    assert from_yaml.poisson_probs == (0.0, 1.0)
    assert from_yaml.train == {"data": str(tmp_path / "data"), "epochs": 4}  # relative to the file
    assert len(from_yaml.runs(tmp_path / "exp")) == 2 * (1 + 2)  # (bce + dli at two probabilities) x seeds

    write_grid(from_yaml, tmp_path / "exp")
    assert Grid.from_document(read_stored_grid(tmp_path / "exp")) == from_yaml


# ---------------------------------------------------------------------------------------------
# Aggregation of hand-made run folders.


def _record(epoch: int, iou: float | None, classes: tuple[float | None, ...] = (0.0, 0.0, 0.0)) -> dict:
    record = {
        "epoch": epoch,
        "step": 10 * epoch,
        "iou": iou,
        "f1": None if iou is None else 2 * iou / (1 + iou),
    }
    record |= {f"iou/{name}": value for name, value in zip(CLASSES, classes, strict=True)}
    record |= {f"f1/{name}": 0.0 for name in CLASSES}
    return record


def _hand_run(expdir: Path, name: str, history: list[dict], *, epochs: int | None = None, **config) -> None:
    folder = expdir / name
    folder.mkdir(parents=True)
    config = TrainConfig(epochs=epochs or len(history), **config).to_dict()
    document = config | {"runtime": {"class_names": list(CLASSES)}}
    (folder / "config.yaml").write_text(yaml.safe_dump(document))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))


@pytest.fixture
def hand_made(tmp_path) -> Path:
    """Runs with known best-epoch IoUs (folder names are arbitrary: only the files count)."""
    expdir = tmp_path / "exp"
    bce, dli = {"method": "bce"}, {"method": "dli", "poisson_prob": 0.5, "fill": "all-free"}
    # bce, l-resnet18, all data: best IoUs 0.60 (epoch 2), 0.64 (tie: epoch 1 wins), 0.62 (epoch 2).
    _hand_run(expdir, "a", [_record(1, 0.40), _record(2, 0.60, (0.5, 0.8, None)), _record(3, 0.55)], **bce)
    _hand_run(
        expdir, "b", [_record(1, 0.64, (0.7, 0.8, 0.3)), _record(2, 0.64, (0.9, 0.9, 0.9))], seed=1, **bce
    )
    _hand_run(expdir, "c", [_record(1, None), _record(2, 0.62, (0.6, 0.8, 0.5))], seed=2, **bce)
    _hand_run(expdir, "d", [_record(1, 0.58)], encoder="l-mobileone_s1", **bce)
    _hand_run(expdir, "e", [_record(1, 0.50)], data_fraction=0.5, **bce)
    _hand_run(expdir, "f", [_record(1, 0.54)], data_fraction=0.5, seed=1, **bce)
    # dli p0.5 all-free: 0.70 / 0.72 / 0.74 with all data, 0.66 / 0.68 with half.
    for seed, iou in enumerate((0.70, 0.72, 0.74)):
        _hand_run(expdir, f"g{seed}", [_record(1, iou)], seed=seed, **dli)
    for seed, iou in enumerate((0.66, 0.68)):
        _hand_run(expdir, f"h{seed}", [_record(1, iou)], seed=seed, data_fraction=0.5, **dli)
    # Ablation cells.
    for seed, iou in enumerate((0.65, 0.67)):
        _hand_run(expdir, f"p0-{seed}", [_record(1, iou)], seed=seed, method="dli", poisson_prob=0.0)
    for seed, iou in enumerate((0.68, 0.70)):
        _hand_run(expdir, f"p1-{seed}", [_record(1, iou)], seed=seed, method="dli", poisson_prob=1.0)
    _hand_run(expdir, "uu", [_record(1, 0.71)], method="dli", fill="until-uniform")
    # Excluded: one run stopped after 1 of 3 epochs, one without a defined IoU.
    _hand_run(expdir, "killed", [_record(1, 0.99)], epochs=3, seed=3, **dli)
    _hand_run(expdir, "undefined", [_record(1, None)], seed=3, **bce)
    return expdir


def test_aggregation_matches_hand_computed_statistics(hand_made):
    summary = aggregate(hand_made)
    sd2 = 0.02  # sample std (ddof = 1) of (x - 0.02, x, x + 0.02)

    table = summary.table1()
    assert table.rows == (
        "bce",
        "dli-p0-all-free",
        "dli-p0.5-all-free",
        "dli-p0.5-until-uniform",
        "dli-p1-all-free",
    )
    assert table.columns == ("l-mobileone_s1", "l-resnet18")
    cell = table.cell("bce", "l-resnet18")
    assert (cell.n, cell.mean, cell.std) == (3, pytest.approx(0.62), pytest.approx(sd2))
    cell = table.cell("dli-p0.5-all-free", "l-resnet18")  # the killed run (0.99) is left out
    assert (cell.n, cell.mean, cell.std) == (3, pytest.approx(0.72), pytest.approx(sd2))
    single = table.cell("bce", "l-mobileone_s1")
    assert single.n == 1 and single.mean == pytest.approx(0.58) and math.isnan(single.std)
    assert table.cell("dli-p0.5-all-free", "l-mobileone_s1") is None

    per_class = summary.per_class("l-resnet18")
    assert per_class.rows == (*CLASSES, "overall")
    blowhole = per_class.cell("blowhole", "bce")  # from each run's best epoch: 0.5, 0.7, 0.6
    assert blowhole.mean == pytest.approx(0.6) and blowhole.std == pytest.approx(0.1)
    assert per_class.cell("break", "bce").std == pytest.approx(0.0)
    crack = per_class.cell("crack", "bce")  # undefined in one run: n = 2
    assert crack.n == 2 and crack.mean == pytest.approx(0.4) and crack.std == pytest.approx(math.sqrt(0.02))

    ious, drops = summary.fraction_tables("l-resnet18")
    assert ious.columns == ("50%", "100%")
    assert ious.cell("bce", "50%").mean == pytest.approx(0.52)
    assert drops.cell("bce", "50%").points == pytest.approx(0.10)
    assert drops.cell("bce", "50%").relative == pytest.approx(0.10 / 0.62)
    assert drops.cell("dli-p0.5-all-free", "50%").points == pytest.approx(0.05)
    assert ious.rows == drops.rows == ("bce", "dli-p0.5-all-free")  # the methods with several fractions
    assert drops.columns == ("50%",)
    assert summary.fraction_tables("l-mobileone_s1")[0].rows == ()

    ablation = summary.ablation("l-resnet18")
    assert ablation.rows == ("p = 0 (cut-paste only)", "p = 0.5", "p = 1 (Poisson only)")
    assert ablation.columns == ("all-free", "until-uniform")
    assert ablation.cell("p = 0 (cut-paste only)", "all-free").mean == pytest.approx(0.66)
    assert ablation.cell("p = 1 (Poisson only)", "all-free").mean == pytest.approx(0.69)
    assert ablation.cell("p = 0.5", "until-uniform").n == 1
    assert ablation.cell("p = 0 (cut-paste only)", "until-uniform") is None
    assert summary.ablation("l-mobileone_s1") is None


def test_aggregation_files_hold_the_same_numbers(hand_made, capsys):
    assert main(["experiment", "--aggregate-only", str(hand_made)]) == 0
    assert "summary.md (16 of 18 runs)" in capsys.readouterr().out

    rows = {
        (r["variant"], r["encoder"], r["fraction"], r["metric"]): r
        for r in csv.DictReader((hand_made / "summary.csv").open())
    }
    half = rows["bce", "l-resnet18", "0.5", "iou"]
    assert (half["n"], float(half["mean"]), float(half["drop_vs_full"])) == ("2", 0.52, pytest.approx(0.1))
    assert float(half["relative_drop_vs_full"]) == pytest.approx(0.1 / 0.62)
    assert rows["bce", "l-mobileone_s1", "1", "iou"]["std"] == "nan"
    assert rows["bce", "l-mobileone_s1", "1", "iou"]["drop_vs_full"] == "0"
    assert float(rows["bce", "l-resnet18", "1", "iou/blowhole"]["std"]) == pytest.approx(0.1)

    runs = {r["run"]: r for r in csv.DictReader((hand_made / "runs.csv").open())}
    assert runs["killed"]["status"] == "incomplete" and runs["undefined"]["status"] == "no defined IoU"
    assert (runs["a"]["best_epoch"], runs["b"]["best_epoch"], runs["c"]["best_epoch"]) == ("2", "1", "2")
    assert float(runs["b"]["iou/blowhole"]) == 0.7

    text = (hand_made / "summary.md").read_text()
    for expected in (
        "| bce | 58.00 (n=1) | 62.00 ± 2.00 (n=3) |",
        "## Training-data fraction (Fig. 5)",
        "| bce | 52.00 ± 2.83 (n=2) | 62.00 ± 2.00 (n=3) |",
        "| bce | 10.00 (16.1%) |",
        "## DLI ablation (Table 2)",
        "| p = 1 (Poisson only) | 69.00 ± 1.41 (n=2) | — |",
        "excluded: 2 (incomplete, no defined IoU; see Runs)",
        "sample standard deviation (ddof = 1)",
    ):
        assert expected in text, expected
    for png in ("per_class_iou__l-resnet18.png", "per_class_iou__l-mobileone_s1.png"):
        assert (hand_made / png).read_bytes().startswith(PNG_MAGIC)
    assert (hand_made / "iou_vs_fraction__l-resnet18.png").read_bytes().startswith(PNG_MAGIC)
    assert not (hand_made / "iou_vs_fraction__l-mobileone_s1.png").exists()  # one fraction only


def test_sections_need_their_factors(tmp_path):
    for seed, method in enumerate(("bce", "dli")):
        _hand_run(tmp_path, method, [_record(1, 0.5 + seed / 10)], method=method)
    aggregate(tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "Table 1" in text and "Fig. 3" in text
    assert "Fig. 5" not in text and "Table 2" not in text
    assert not list(tmp_path.glob("iou_vs_fraction*"))


def test_an_interrupted_aggregation_keeps_the_previous_summary(hand_made, monkeypatch):
    aggregate(hand_made)
    before = (hand_made / "summary.md").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "render_markdown", killed)
    with pytest.raises(KeyboardInterrupt):
        aggregate(hand_made)
    assert (hand_made / "summary.md").read_bytes() == before
    assert not list(hand_made.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, the value named.


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "tabel1"], "--preset tabel1: unknown preset"),
        (["--methods", "bce,dlx"], "--methods dlx: unknown method"),
        (["--methods", "bce", "--encoders", "resnet999"], "--encoders resnet999: unknown encoder"),
        (["--methods", "bce", "--fractions", "1.5"], "--fractions 1.5: must be in (0, 1]"),
        (["--methods", "bce", "--fractions", "0"], "--fractions 0: must be in (0, 1]"),
        (["--methods", "bce", "--fractions", "half"], "--fractions half: not a number"),
        (["--methods", "bce", "--seeds", "-1"], "--seeds -1: seeds must be integers >= 0"),
        (["--methods", "dli", "--poisson-probs", "2"], "--poisson-probs 2: must be in [0, 1]"),
        (["--methods", "bce", "--epochs", "many"], "--epochs many: not an integer"),
        (["--methods", "bce", "--image-size", "50"], "--image-size 50: must be a multiple of 8"),
        ([], "nothing to run"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["experiment", "--out", str(tmp_path / "exp"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("dli experiment: error:")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("methods: [bce\n", "is malformed"),
        ("method: bce\n", "unknown key 'method' (set it with methods)"),
        ("epochs: 3\n", "unknown key 'epochs' (put it under train:)"),
        ("train: {seed: 3}\n", "train.seed is set by the grid; use seeds"),
        ("train: {lr: fast}\n", "train.lr fast: not a number"),
        ("- bce\n", "a grid file must be a mapping"),
    ],
)
def test_bad_grid_files_are_one_line_errors(tmp_path, capsys, text, message):
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    assert main(["experiment", "--out", str(tmp_path / "exp"), "--config", str(grid)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_aggregating_a_folder_without_runs_is_an_error(tmp_path, capsys):
    assert main(["experiment", "--aggregate-only", str(tmp_path / "missing")]) == 2
    assert "experiment folder not found" in capsys.readouterr().err
    assert main(["experiment", "--aggregate-only", str(tmp_path)]) == 2
    assert "no run folders" in capsys.readouterr().err
