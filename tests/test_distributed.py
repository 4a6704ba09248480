"""Multi-process training on the CPU: gloo, 2 processes, small synthetic data.

The DDP run is compared with a single process with the same global batch: the data must be
the same image for image (the shards split each global batch), the two ranks' models identical,
and the trained weights close (they differ only through per-process BatchNorm statistics and the
Dice term, which are computed on each process's half batch).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn.modules.batchnorm import _BatchNorm

from dli.cli import main
from dli.common.errors import DliError
from dli.data.synth import generate
from dli.train import add_arguments, config_from_args
from dli.training.config import TrainConfig
from dli.training.distributed import ProcessPlace, launch, reserved_port
from dli.training.trainer import Trainer, seed_everything

GLOBAL_BATCH = 8
STEPS_PER_EPOCH = 7  # 56 training images (stratified split of 60) / 8


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp") / "synth"
    generate(root, images=60, seed=3)
    return root


def tiny(data: Path, out: Path, **overrides: object) -> TrainConfig:
    config = TrainConfig(
        data=str(data),
        out=str(out),
        method="dli",
        poisson_prob=0.5,
        encoder="l-resnet18",
        pretrained=False,
        epochs=2,
        batch_size=GLOBAL_BATCH,
        image_size=64,
        lr=2e-3,
        device="cpu",
        num_threads=1,
        progress=False,
    )
    return replace(config, **overrides)  # type: ignore[arg-type]


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def running_statistics_forward(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm normalizing with its running statistics, as in eval mode.

    Batch statistics are the one thing DDP computes per process (on half the batch here); with
    them out of the way, two processes must reproduce one process up to float rounding.
    """
    return torch.nn.functional.batch_norm(
        x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
    )


def _ddp_worker(
    rank: int, world_size: int, port: int, config: TrainConfig, out: Path, running_bn: bool
) -> None:
    """One rank: train, then save what it saw and the weights it ended with."""
    import torch.distributed as dist

    if running_bn:
        _BatchNorm.forward = running_statistics_forward  # type: ignore[method-assign]
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        trainer = Trainer(config, rank=rank, world_size=world_size)
        seen = [[b.tolist() for b in trainer.train_loader.batch_indices(e)] for e in range(2)]
        val = [i for b in trainer.val_loader.batch_indices() for i in b.tolist()]
        result = trainer.fit()
        state = {
            "seen": seen,
            "val": val,
            "params": flat_parameters(trainer.model),
            "history": result.history,
        }
        torch.save(state, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def train_both_ways(
    config: TrainConfig, folder: Path, *, running_bn: bool
) -> tuple[list[dict], Trainer, list]:
    """Train `config` in 2 gloo processes and in this one: (per-rank records, single trainer, its history)."""
    folder.mkdir()
    ddp = replace(config, out=str(folder / "ddp"))
    with reserved_port() as port:
        torch.multiprocessing.spawn(_ddp_worker, args=(2, port, ddp, folder, running_bn), nprocs=2, join=True)
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = Trainer(replace(config, out=str(folder / "single")))
    history = single.fit().history
    return ranks, single, history


def initial_parameters() -> torch.Tensor:
    from dli.models.unet import build_model

    seed_everything(0)  # as the trainer does before building its model
    return flat_parameters(build_model("l-resnet18", 5, pretrained=False)[0])


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ranks, single, history = train_both_ways(tiny(data, tmp_path), tmp_path / "real-bn", running_bn=False)
    single_seen = [[b.tolist() for b in single.train_loader.batch_indices(e)] for e in range(2)]

    # Disjoint data: per step the ranks' halves split the single process's batch.
    for epoch in range(2):
        assert len(ranks[0]["seen"][epoch]) == len(single_seen[epoch]) == STEPS_PER_EPOCH
        for step, whole in enumerate(single_seen[epoch]):
            halves = [r["seen"][epoch][step] for r in ranks]
            assert len(halves[0]) == len(halves[1]) == GLOBAL_BATCH // 2
            assert not set(halves[0]) & set(halves[1])
            assert sorted(halves[0] + halves[1]) == sorted(whole)
    # Validation: each image scored by exactly one rank.
    assert not set(ranks[0]["val"]) & set(ranks[1]["val"])
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == list(range(len(single.datasets.val)))
    # In sync: every optimizer step applied the same averaged gradient on both ranks.
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
    # With per-process BatchNorm statistics the runs drift apart in the weights (Adam's first
    # steps amplify small gradient differences) but learn alike: the epochs' losses agree.
    for ddp, one in zip(ranks[0]["history"], history, strict=True):
        assert ddp["step"] == one["step"]
        assert ddp["train_loss"] == pytest.approx(one["train_loss"], rel=0.05)

    # Only rank 0 wrote: one run folder with the usual files, recording both processes.
    run = tmp_path / "real-bn" / "ddp"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.csv", "metrics.jsonl", "last.pt"}
    runtime = yaml.safe_load((run / "config.yaml").read_text())["runtime"]
    assert runtime["world_size"] == 2 and runtime["batch_per_process"] == GLOBAL_BATCH // 2

    # Without batch statistics, the rest (sharded data, the global batch's injections and Dice,
    # averaged gradients) reproduces one process: the weights agree to float rounding.
    monkeypatch.setattr(_BatchNorm, "forward", running_statistics_forward)
    ranks, single, _ = train_both_ways(tiny(data, tmp_path), tmp_path / "running-bn", running_bn=True)
    initial, trained = initial_parameters(), flat_parameters(single.model)
    moved = (trained - initial).norm()
    gap = (ranks[0]["params"] - trained).norm()
    assert moved > 1 and gap / moved < 1e-2, f"DDP weights differ by {gap / moved:.2e} of the update"


@pytest.mark.slow
def test_dli_train_devices_launches_processes_that_train_one_model(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dli", "train", "--devices", "2"]
    command += tiny(data, out, epochs=1, poisson_prob=0.0).to_argv()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("run folder:") == 1  # rank 0 reports, rank 1 stays quiet
    assert "dli train: error" not in done.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["runtime"]["world_size"] == 2 and saved["epochs"] == 1
    records = (out / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 1
    assert torch.load(out / "last.pt", weights_only=False)["progress"]["step"] == STEPS_PER_EPOCH
    # The same launch again refuses to overwrite the run, before starting any process.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"dli train: error: --out {out}: already holds a run; pass --resume to continue it "
        "or choose another folder"
    ]

    # torchrun runs the same job: the same weights, bit for bit (gloo on the CPU is deterministic).
    by_torchrun = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "dli.train", *tiny(data, by_torchrun, epochs=1, poisson_prob=0.0).to_argv()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    ours = torch.load(out / "last.pt", weights_only=False)["model"]
    theirs = torch.load(by_torchrun / "last.pt", weights_only=False)["model"]
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_two_nodes_launched_by_torchrun_train_one_model_into_one_run_folder(
    data: Path, tmp_path: Path
) -> None:
    """`torchrun --nnodes 2 --nproc_per_node 1` on each of two "nodes" (here both on 127.0.0.1)."""
    out, reservation = tmp_path / "run", reserved_port()
    port = reservation.__enter__()  # held until the nodes are done: nobody else takes it meanwhile
    flags = tiny(data, out, epochs=1, max_steps=2, poisson_prob=0.0).to_argv()

    def node(rank: int) -> subprocess.Popen[str]:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
        command += ["--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]
        command += ["-m", "dli.train", *flags]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    nodes = [node(0), node(1)]
    try:
        outputs = [process.communicate(timeout=600) for process in nodes]
    finally:
        for process in nodes:
            if process.poll() is None:
                process.kill()
                process.wait()
        reservation.__exit__(None, None, None)
    for process, (_, stderr) in zip(nodes, outputs, strict=True):
        assert process.returncode == 0, stderr
    (rank0_out, _), (rank1_out, _) = outputs
    assert rank0_out.count("run folder:") == 1 and "run folder:" not in rank1_out  # only rank 0 writes
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["runtime"]["world_size"] == 2 and saved["runtime"]["batch_per_process"] == GLOBAL_BATCH // 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert torch.load(out / "last.pt", weights_only=False)["progress"]["step"] == 2


PAUSE_HOOK = """
import os
if os.environ.get("DLI_TEST_PAUSE_AT_STEP") and "RANK" in os.environ:  # launched training processes
    import time
    import dli.training.steps

    _train_step, _calls = dli.training.steps.train_step, [0]

    def train_step(*args, **kwargs):
        _calls[0] += 1
        if _calls[0] == int(os.environ["DLI_TEST_PAUSE_AT_STEP"]):
            marker = os.path.join(os.environ["DLI_TEST_PAUSE_DIR"], "rank" + os.environ["RANK"])
            with open(marker + ".tmp", "w") as handle:
                handle.write(str(os.getpid()))
            os.rename(marker + ".tmp", marker)
            time.sleep(3600)  # until the launcher stops this process
        return _train_step(*args, **kwargs)

    dli.training.steps.train_step = train_step
"""


def paused_launch_env(folder: Path, step: int) -> dict[str, str]:
    """An environment in which each launched process stops before its `step`-th training step
    (1-based, across epochs) and writes `folder/rank<R>` holding its pid: a known point to act at."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(PAUSE_HOOK)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return os.environ | {
        "PYTHONPATH": path,
        "DLI_TEST_PAUSE_AT_STEP": str(step),
        "DLI_TEST_PAUSE_DIR": str(folder),
    }


@pytest.mark.slow
def test_a_terminated_launch_resumes_to_the_uninterrupted_weights_and_with_another_process_count(
    data: Path, tmp_path: Path
) -> None:
    def command(out: Path) -> list[str]:
        flags = tiny(data, out, epochs=2, poisson_prob=0.5).to_argv()
        return [sys.executable, "-m", "dli", "train", "--devices", "2", *flags]

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = subprocess.run(command(whole), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr

    # Both processes stop before step 3 of epoch 2 and say so; the test terminates the launch there.
    hooks = tmp_path / "hooks"
    env = paused_launch_env(hooks, STEPS_PER_EPOCH + 3)
    launcher = subprocess.Popen(
        command(cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    markers = [hooks / "rank0", hooks / "rank1"]
    try:
        deadline = time.monotonic() + 600  # only a broken run misses the point; it cannot run past it
        while not all(m.exists() for m in markers):
            assert launcher.poll() is None, launcher.communicate()[1]
            assert time.monotonic() < deadline, "the launched processes never reached epoch 2's step 3"
            time.sleep(0.1)
        pids = [int(m.read_text()) for m in markers]
        launcher.send_signal(signal.SIGTERM)  # as a job scheduler would
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 128 + signal.SIGTERM, stderr
    for pid in pids:  # no process left running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    written = (cut / "metrics.jsonl").read_text().splitlines()
    assert len(written) == 1  # stopped during epoch 2, whose records never came
    assert torch.load(cut / "last.pt", weights_only=False)["progress"]["step"] == STEPS_PER_EPOCH
    other = tmp_path / "cut-one-process"
    shutil.copytree(cut, other)

    resumed = subprocess.run(
        [sys.executable, "-m", "dli", "train", "--out", str(cut), "--resume", "--devices", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    ours = torch.load(cut / "last.pt", weights_only=False)
    theirs = torch.load(whole / "last.pt", weights_only=False)
    assert ours["progress"]["step"] == theirs["progress"]["step"] == 2 * STEPS_PER_EPOCH
    for name, tensor in theirs["model"].items():
        torch.testing.assert_close(ours["model"][name], tensor, rtol=0, atol=0, msg=name)

    # The README: --resume works with any number of processes that divides the batch. One process
    # sees the same global batches; only BatchNorm's batch statistics (per process) differ.
    single = subprocess.run(
        [sys.executable, "-m", "dli", "train", "--out", str(other), "--resume"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert single.returncode == 0, single.stderr
    alone = torch.load(other / "last.pt", weights_only=False)
    assert alone["progress"]["step"] == 2 * STEPS_PER_EPOCH
    records = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert (
        [r["step"] for r in records]
        == [r["step"] for r in expected]
        == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    )
    assert records[0] == expected[0] | {k: records[0][k] for k in ("seconds", "images_per_s")}
    assert records[1]["train_loss"] == pytest.approx(expected[1]["train_loss"], rel=0.05)
    assert yaml.safe_load((other / "config.yaml").read_text())["runtime"]["world_size"] == 1


def test_config_round_trips_through_flags(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = tiny(tmp_path, tmp_path / "out", amp=False, compile=True, fill="until-uniform", max_steps=7)
    assert config_from_args(parser.parse_args(config.to_argv())) == config
    assert TrainConfig().to_argv() == []
    assert "--no-pretrained" in config.to_argv() and "--compile" in config.to_argv()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--devices", "0"], "--devices 0: must be an integer >= 1"),
        (
            ["--devices", "3", "--batch-size", "8"],
            "--batch-size 8: the global batch must be a multiple of the 3",
        ),
        (["--devices", "2", "--lr", "-1"], "--lr -1.0: must be > 0"),
        (["--devices", "2", "--data", "/nonexistent/dataset"], "/nonexistent/dataset"),
    ],
)
def test_bad_launch_values_fail_in_one_line_before_any_process(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "--device", "cpu", "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_resuming_a_launch_without_its_checkpoint_fails_once(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dli.training.config import write_run_config

    run = tmp_path / "run"
    run.mkdir()
    write_run_config(run / "config.yaml", tiny(data, run), {})  # a run killed before its first epoch
    assert main(["train", "--out", str(run), "--resume", "--devices", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dli train: error: --resume: no last.pt in {run} to resume from"
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_devices_on_cuda_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--devices", "2", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_process_place_from_the_environment(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    assert ProcessPlace.from_env({}) is None
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    assert ProcessPlace.from_env(env) == ProcessPlace(1, 1, 2)
    assert ProcessPlace.from_env({"RANK": "0", "WORLD_SIZE": "1"}) == ProcessPlace(0, 0, 1)
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "2"}):
        with pytest.raises(DliError, match="RANK"):
            ProcessPlace.from_env(bad)
    # Under a launch of 2, asking for another number of devices is an error, not a nested launch.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--devices", "3", "--device", "cpu"]) == 2
    assert "this launch has 2 processes" in capsys.readouterr().err


def test_launch_stops_the_others_when_one_process_fails() -> None:
    script = "import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(120)\n"
    started = time.monotonic()
    assert launch([sys.executable, "-c", script], 2, cpu=True) == 3
    assert time.monotonic() - started < 60
    ok = "import os; assert os.environ['WORLD_SIZE'] == '3' and os.environ['MASTER_PORT'].isdigit()"
    assert launch([sys.executable, "-c", ok], 3, cpu=True) == 0
