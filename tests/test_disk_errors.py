"""A disk that turns read-only or fills up during training: one error line, exit status 2, nothing lost.

Real file systems, not simulated errors: each run trains in a child process inside its own
mount namespace (`unshare -m`) with `--out` on a tmpfs. After epoch 1's files are written, the
tmpfs is covered by a read-only bind mount of itself (EROFS), or shrunk to what it holds plus
64 KiB (ENOSPC on epoch 2's checkpoint). The child copies the run folder out right after epoch 1
and again after the failure; the two copies must be the same files with the same bytes.
Mounting needs root with CAP_SYS_ADMIN (a privileged container); elsewhere these tests skip
with that reason, and `test_reliability` still covers both errors simulated at the atomic-write
layer.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dli.data.synth import generate
from dli.models.checkpoint import load_checkpoint


def can_mount() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && mount -o remount,ro $d"
    done = subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True, check=False)
    return done.returncode == 0


pytestmark = pytest.mark.skipif(
    not can_mount(), reason="needs mount rights (root with CAP_SYS_ADMIN) for a tmpfs in a mount namespace"
)

CHILD = textwrap.dedent("""
    import json, shutil, subprocess, sys
    from pathlib import Path

    from dli.training import trainer
    from dli.cli import main

    data, mount, copies, how = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)], check=True)
    run = mount / "run"
    fit = trainer.Trainer.fit

    def failing_disk_after_epoch_1(self, on_epoch_end=None):
        def after(record):
            if record["epoch"] == 1:
                shutil.copytree(run, copies / "after-epoch-1")
                if how == "read-only":
                    # A read-only bind mount over the tmpfs: a plain remount is refused while
                    # the run holds files open for writing (its lock, TensorBoard's events).
                    subprocess.run(["mount", "--bind", str(mount), str(mount)], check=True)
                    subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True)
                else:
                    used = shutil.disk_usage(mount).used
                    size = f"size={used + 64 * 1024}"
                    subprocess.run(["mount", "-o", f"remount,{size}", str(mount)], check=True)
        return fit(self, after)

    trainer.Trainer.fit = failing_disk_after_epoch_1
    code = main([
        "train", "--data", str(data), "--out", str(run), "--epochs", "2", "--batch-size", "8",
        "--image-size", "64", "--no-pretrained", "--no-progress", "--num-threads", "1", "--method", "bce",
    ])
    shutil.copytree(run, copies / "after-the-error")
    sys.exit(code)
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    generate(root, images=30, seed=3, size_range=((60, 90), (50, 120)))
    return root


def same_tree(a: Path, b: Path) -> list[str]:
    """Names that differ between two folder trees (missing on one side or other bytes)."""
    compared = filecmp.dircmp(a, b)
    differ = compared.left_only + compared.right_only + compared.diff_files + compared.funny_files
    differ += [
        name
        for name in compared.common_files
        if not filecmp.cmp(a / name, b / name, shallow=False) and name not in differ
    ]
    for sub in compared.common_dirs:
        differ += [f"{sub}/{name}" for name in same_tree(a / sub, b / sub)]
    return differ


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "message"), [("read-only", "Read-only file system"), ("full", "No space left on device")]
)
def test_a_disk_failing_during_training_is_one_line_and_loses_nothing(data, tmp_path, how, message):
    mount, copies = tmp_path / "mount", tmp_path / "copies"
    mount.mkdir()
    copies.mkdir()
    done = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", CHILD, str(data), str(mount), str(copies), how],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert done.returncode == 2, done.stderr
    (line,) = errors
    assert line.startswith("dli train: error:") and message in line and str(mount / "run") in line, line
    before, after = copies / "after-epoch-1", copies / "after-the-error"
    assert {"config.yaml", "last.pt", "metrics.jsonl"} <= {p.name for p in before.iterdir()}
    assert same_tree(before, after) == [], "the failed write changed or lost what epoch 1 wrote"
    assert load_checkpoint(after / "last.pt")["progress"]["epoch"] == 1  # still a valid checkpoint
    assert [json.loads(x)["epoch"] for x in (after / "metrics.jsonl").read_text().splitlines()] == [1]
