"""Hostile use: diverged runs, OS errors, killed writes, changed data, corrupt checkpoints, two writers.

Every failure here must end in one `dli <cmd>: error:` line and exit status 2 (or a clear
refusal), never a traceback, and never lose or corrupt what a run already wrote.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dli.cli import main
from dli.common import atomic
from dli.common.errors import DliError
from dli.common.lock import FolderLock
from dli.data.synth import generate
from dli.models.checkpoint import (
    content_checksum,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    weights_checksum,
)
from dli.training import steps
from dli.training.config import TrainConfig
from dli.training.steps import make_optimizer, train_step
from dli.training.trainer import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    generate(root, images=60, seed=3, size_range=((60, 90), (50, 120)))
    return root


@pytest.fixture
def small(small: Callable[..., TrainConfig]) -> Callable[..., TrainConfig]:
    """The shared small run, one epoch of plain BCE unless told otherwise."""
    return lambda data, out, **overrides: small(data, out, **({"epochs": 1, "method": "bce"} | overrides))


def flags(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "8",
        "--image-size", "64", "--no-pretrained", "--no-progress", "--num-threads", "1", "--method", "bce",
        *extra,
    ]  # fmt: skip


def one_error_line(capsys: pytest.CaptureFixture[str], command: str = "train") -> str:
    lines = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith(f"dli {command}: error:")
    ]
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Non-finite runs.


def test_a_diverging_run_stops_with_an_error_and_saves_no_model(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(steps, "MAX_SKIPPED_IN_A_ROW", 3)
    out = tmp_path / "run"
    assert main(flags(data, out, "--lr", "1e30")) == 2
    line = one_error_line(capsys)
    assert "diverged" in line and "3 steps in a row" in line and "--lr" in line
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()


def test_a_skipped_step_changes_no_weight_no_optimizer_state_and_no_batchnorm_statistic():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 1, 1)
    )
    optimizer = make_optimizer(net, lr=0.1, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    images, masks = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    _, _, stepped = train_step(net, loss_fn, optimizer, scaler, images, masks, amp_dtype=None)
    assert bool(stepped)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[net[0].weight].items()}
    poisoned = images.clone()
    poisoned[0, 0, 0, 0] = math.inf  # the BatchNorm statistics of this forward pass are not finite
    loss, _, stepped = train_step(net, loss_fn, optimizer, scaler, poisoned, masks, amp_dtype=None)
    assert not bool(stepped) and not math.isfinite(float(loss))
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    for name, tensor in optimizer.state[net[0].weight].items():
        assert torch.equal(tensor, moments[name]), name


def test_train_step_makes_no_host_sync(monkeypatch):
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2), torch.nn.Conv2d(2, 1, 1)
    )
    optimizer = make_optimizer(net, lr=0.1, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, masks = torch.randn(2, 1, 8, 8), torch.ones(2, 1, 8, 8)

    def sync(*_: object) -> None:
        raise AssertionError("host sync in train_step")

    before = [p.detach().clone() for p in net.parameters()]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    loss, logits, stepped = train_step(
        net, torch.nn.BCEWithLogitsLoss(), optimizer, scaler, images, masks, amp_dtype=None
    )
    monkeypatch.undo()
    assert bool(stepped) and math.isfinite(float(loss)) and logits.shape == masks.shape
    assert all(not torch.equal(p, old) for p, old in zip(net.parameters(), before, strict=True))  # it stepped


def test_non_finite_checkpoints_are_neither_written_nor_used(data, tmp_path, capsys, small):
    result = train(small(data, tmp_path / "run", max_steps=2))
    document = load_checkpoint(result.run_dir / "best.pt")
    name = next(k for k, v in document["model"].items() if v.is_floating_point())
    poisoned = dict(document["model"]) | {name: document["model"][name] * math.nan}
    with pytest.raises(DliError, match=r"not writing .*not finite"):
        save_checkpoint(tmp_path / "nan.pt", {**document, "model": poisoned})
    assert not (tmp_path / "nan.pt").exists()
    # Crafted by hand (a checkpoint of another writer): eval and predict refuse it.
    document |= {"model": poisoned, "model_sha256": weights_checksum(poisoned)}
    document["content_sha256"] = content_checksum(document)
    torch.save(document, tmp_path / "nan.pt")
    with pytest.raises(DliError, match="not finite"):
        model_from_checkpoint(tmp_path / "nan.pt")
    images = data / "MT_Crack" / "Imgs"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tmp_path / "nan.pt"),
                "--images",
                str(images),
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "not finite" in one_error_line(capsys, "predict")
    assert (
        main(["eval", "--checkpoint", str(tmp_path / "nan.pt"), "--data", str(data), "--device", "cpu"]) == 2
    )
    assert "not finite" in one_error_line(capsys, "eval")


def test_flag_values_out_of_bounds_are_one_line_errors(capsys):
    for args, named in (
        (["--lr", "1e300"], "--lr 1e+300"),
        (["--image-size", "100000"], "--image-size 100000"),
    ):
        assert main(["train", *args]) == 2
        assert named in one_error_line(capsys)
    assert main(["preview", "--image-size", "100000"]) == 2
    assert "--image-size 100000" in one_error_line(capsys, "preview")


# ---------------------------------------------------------------------------------------------
# Operating-system errors.


def test_out_naming_a_file_is_one_line_for_every_command(data, tmp_path, capsys):
    existing = tmp_path / "file"
    existing.write_text("keep me")
    assert main(flags(data, existing)) == 2
    assert str(existing) in one_error_line(capsys)
    assert main(["synth", str(existing / "sub"), "--images", "20"]) == 2
    assert "file" in one_error_line(capsys, "synth")
    assert existing.read_text() == "keep me"


def test_a_full_disk_is_one_line_naming_the_file_and_loses_nothing(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        return FullDisk(handle) if "b" in mode else handle  # checkpoints are binary

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)
    assert main(flags(data, out, "--max-steps", "1")) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and ".pt" in line
    assert (out / "config.yaml").is_file()
    assert not list(out.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# Killed runs, changed data.


@pytest.mark.slow  # several CPU trainings in one test (a run, an interrupted one, its resume)
def test_a_run_killed_before_its_first_last_pt_starts_over(data, tmp_path, capsys, small):
    out = tmp_path / "run"
    train(small(data, out, max_steps=1))
    (out / "last.pt").unlink()  # killed while writing its first last.pt: best.pt only
    (out / ".last.pt.abcd1234.tmp").write_bytes(b"\0" * 1000)  # and the torn temp file
    assert main([*flags(data, out, "--max-steps", "1"), "--resume"]) == 2
    assert "without --resume" in one_error_line(capsys)
    assert main(flags(data, out, "--max-steps", "1")) == 0
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    assert not list(out.glob(".*.tmp"))


def test_resume_refuses_a_changed_dataset(data, tmp_path, capsys, small):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    out = tmp_path / "run"
    train(small(copy, out, epochs=2, max_steps=1))
    victim = sorted((copy / "MT_Free" / "Imgs").glob("*.jpg"))[0]
    victim.unlink()
    assert main([*flags(copy, out, "--epochs", "2"), "--resume"]) == 2
    line = one_error_line(capsys)
    assert "dataset changed" in line and "1 removed" in line and victim.name in line


def test_corrupted_weights_in_a_checkpoint_are_refused(data, tmp_path, capsys, small):
    result = train(small(data, tmp_path / "run", max_steps=1))
    path = result.run_dir / "best.pt"
    weights = load_checkpoint(path)["model"]
    tensor = max(weights.values(), key=lambda t: t.numel())
    raw = bytearray(path.read_bytes())
    stored = tensor.permute(0, 2, 3, 1) if tensor.dim() == 4 else tensor  # saved channels-last
    start = raw.find(stored.contiguous().view(torch.uint8).reshape(-1)[:64].numpy().tobytes())
    assert start > 0
    raw[start : start + 4096] = bytes(4096)
    path.write_bytes(bytes(raw))
    with pytest.raises(DliError, match="corrupt: its weights do not match their checksum"):
        load_checkpoint(path)
    assert main(["eval", "--checkpoint", str(path), "--data", str(data), "--device", "cpu"]) == 2
    assert "checksum" in one_error_line(capsys, "eval")


# ---------------------------------------------------------------------------------------------
# Two writers.


def test_a_second_writer_is_refused_and_a_crashed_holder_leaves_no_stale_lock(data, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from dli.common.lock import FolderLock
            FolderLock({str(out)!r}).acquire()
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO.parent)},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert main(flags(data, out, "--max-steps", "1")) == 2
        line = one_error_line(capsys)
        assert "in use by another dli process" in line and f"pid {holder.pid}" in line
        assert not (out / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(flags(data, out, "--max-steps", "1")) == 0  # the kernel dropped the dead holder's lock
    with FolderLock(out):  # and the finished run released its own
        pass


# ---------------------------------------------------------------------------------------------
# A misspelt class in a CSV.


def test_a_misspelt_csv_class_is_a_loud_warning_or_with_classes_txt_an_error(tmp_path):
    from PIL import Image

    from dli.data.manifest import DatasetWarning, read_dataset

    rows = ["image,mask,class"]
    for k, name in enumerate(["crack", "crack", "crak", "crack", "blob", "free"]):
        Image.new("L", (8, 8)).save(tmp_path / f"{k}.jpg")
        Image.new("L", (8, 8), 255).save(tmp_path / f"{k}.png")
        rows.append(f"{k}.jpg,{k}.png,{name}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(DatasetWarning) as record:
        manifest = read_dataset(tmp_path / "data.csv")
    assert manifest.class_names == ("blob", "crack", "crak")
    (message,) = [str(w.message) for w in record]
    assert "'crak' in row(s) 4 looks like 'crack'" in message and "classes.txt" in message
    assert "'blob'" not in message and "'crack' in" not in message
    (tmp_path / "classes.txt").write_text("crack\nblob\n")
    with pytest.raises(DliError, match="'crak' is not listed"):
        read_dataset(tmp_path / "data.csv")


# ---------------------------------------------------------------------------------------------
# A moved experiment folder.


def test_an_experiment_folder_can_be_moved(tmp_path):
    import json

    from dli.experiments.grid import resolve_grid
    from dli.experiments.run import RunState, run_state
    from dli.training.config import read_run_config, write_run_config

    flags = {
        "methods": "bce",
        "seeds": "0",
        "synthetic_images": "40",
        "train": {"epochs": "1", "device": "cpu"},
    }
    grid = resolve_grid(flags=flags)
    (run,) = grid.runs(tmp_path / "exp")
    assert run.config.data == str(tmp_path / "exp" / "synthetic-n40-s0")
    run.folder.mkdir(parents=True)
    write_run_config(run.folder / "config.yaml", run.config, {"total_steps": 5, "data_path": run.config.data})
    (run.folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 5, "iou": 0.5}) + "\n")
    (run.folder / "last.pt").write_bytes(b"checkpoint")
    assert "/exp/" not in (run.folder / "config.yaml").read_text()

    (tmp_path / "exp").rename(tmp_path / "moved")
    (moved,) = grid.runs(tmp_path / "moved")
    assert run_state(moved) is RunState.FINISHED  # not "holds a run with other settings: --data"
    config, runtime = read_run_config(moved.folder / "config.yaml")
    assert config.data == runtime["data_path"] == str(tmp_path / "moved" / "synthetic-n40-s0")


def test_atomic_writes_turn_os_errors_into_one_line_and_keep_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    atomic.atomic_write_text(target, "epoch 1\n")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DliError, match=r"cannot write .*file/out\.csv: .*file is not a folder"):
        atomic.atomic_write_text(tmp_path / "file" / "out.csv", "x")
    with pytest.raises(DliError, match=r"cannot write .*: Is a directory"):
        atomic.atomic_write_text(tmp_path, "x")
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(DliError, match=r"cannot write .*metrics\.csv: No space left on device"):
        atomic.atomic_save(target, lambda handle: handle.write(b"epoch 2\n"))
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    assert target.read_text() == "epoch 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "metrics.csv"]
    assert atomic.remove_stale_temp_files(tmp_path) == []
    stale = tmp_path / ".last.pt.k2j4_9zq.tmp"
    stale.write_bytes(b"torn")
    (tmp_path / ".keep.tmp").write_text("not ours")
    assert atomic.remove_stale_temp_files(tmp_path) == [stale]
    assert (tmp_path / ".keep.tmp").exists()
