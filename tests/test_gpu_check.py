"""`bench/gpu_check.py` on the CPU: the dry run, the step runner (failures, time limits), the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dli.bench import gpu_check, gpu_environment, gpu_report
from dli.data.synth import generate

SCRIPT = Path(gpu_check.__file__)


def test_the_shares_cover_every_step_once() -> None:
    assert set(gpu_check.SHARES) == set(gpu_check.STEPS) == set(gpu_check.REQUIRES)
    assert sum(gpu_check.SHARES.values()) == pytest.approx(1.0)
    # The last step takes all that is left; the first may not eat it all.
    assert gpu_check.limit_for("train-dli", ("train-dli",), 100.0) == 100.0
    assert gpu_check.limit_for("environment", gpu_check.STEPS, 480.0) == pytest.approx(30.0)
    assert gpu_check.limit_for("environment", gpu_check.STEPS, 10.0) == 10.0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--minutes", "9"], "--minutes 9: must be in (0, 8]"),
        (["--minutes", "0"], "--minutes 0: must be in (0, 8]"),
        (["--epochs", "0"], "--epochs 0: must be >= 1"),
        ([], "--out DIR is required"),
    ],
)
def test_bad_flags_fail_in_one_line(flags: list[str], message: str, tmp_path: Path, capsys) -> None:
    out = [] if not flags else ["--out", str(tmp_path / "check")]
    assert gpu_check.main([*out, *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"gpu_check: error: {message}"]
    assert not (tmp_path / "check").exists()


def test_an_earlier_check_is_never_overwritten(tmp_path: Path, capsys) -> None:
    (tmp_path / "check").mkdir()
    (tmp_path / "check" / "gpu-report.json").write_text("{}")
    assert gpu_check.main(["--out", str(tmp_path / "check"), "--dry-run"]) == 2
    assert "holds an earlier check" in capsys.readouterr().err
    assert (tmp_path / "check" / "gpu-report.json").read_text() == "{}"


def test_bad_data_fails_before_any_step(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert (
        gpu_check.main(["--out", str(tmp_path / "check"), "--data", str(tmp_path / "empty"), "--dry-run"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"gpu_check: error: --data {tmp_path / 'empty'}: ")
    assert not (tmp_path / "check").exists()


@pytest.mark.slow
@pytest.mark.slow  # the child probe imports torch, CuPy and DALI: ~15 s alone, a minute on a busy machine
def test_dry_run_reports_missing_packages_and_plans_without_writing(tmp_path: Path) -> None:
    """DALI and smp hidden from the child processes: the plan names them as why steps are skipped."""
    hidden = tmp_path / "hidden"
    (hidden / "nvidia" / "dali").mkdir(parents=True)
    # nvidia is a regular package holding CUDA libraries too: extend it rather than hide all of it.
    (hidden / "nvidia" / "__init__.py").write_text(
        "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"
    )
    (hidden / "nvidia" / "dali" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    (hidden / "segmentation_models_pytorch.py").write_text("raise ImportError('hidden by the test')\n")
    data = tmp_path / "synth"
    generate(data, images=12, seed=1)
    out = tmp_path / "check"
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, (str(hidden), os.environ.get("PYTHONPATH"))))
    }
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--data", str(data), "--minutes", "6"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "12 images" in done.stderr
    lines = done.stdout.splitlines()
    assert any(line.split()[:2] == ["dali", "MISSING"] for line in lines), done.stdout
    assert any(line.split()[:2] == ["smp", "MISSING"] for line in lines), done.stdout
    plan = {line.split()[1]: line for line in lines if line[:5].strip().rstrip(".").isdigit()}
    assert list(plan) == list(gpu_check.STEPS)
    limits = [float(plan[step].split("%")[1].split()[0]) for step in gpu_check.STEPS]
    assert sum(limits) == pytest.approx(6 * 60 - gpu_check.REPORT_RESERVE_S, abs=3)
    for step in ("bench", "train-bce", "train-dli"):
        assert "skip:" in plan[step] and "NVIDIA DALI" in plan[step] and "segmentation-models" in plan[step]
    assert "NVIDIA DALI" not in plan["pytest-gpu"]  # the GPU tests run without them (where there is a GPU)
    assert "--method bce" in done.stdout and f"--data {data}" in done.stdout
    assert not out.exists()


def test_pytest_results_separate_missing_packages_from_failures(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(
        textwrap.dedent(
            """\
            <?xml version="1.0" encoding="utf-8"?>
            <testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
              <testcase classname="" name="tests.test_bench"><error message="collection failure">
                ModuleNotFoundError: No module named 'segmentation_models_pytorch'</error></testcase>
              <testcase classname="tests.test_kernels_gpu" name="test_paste">
                <failure message="assert">x</failure></testcase>
              <testcase classname="tests.test_kernels_gpu" name="test_dilate"/>
              <testcase classname="tests.test_kernels_gpu" name="test_blend"/>
              <testcase classname="tests.test_datapath_gpu" name="test_loader"><skipped message="no DALI"/>
              </testcase>
            </testsuite></testsuites>
            """
        )
    )
    figures, ok = gpu_report.pytest_figures(xml)
    assert not ok and figures["passed"] == 2 and figures["skipped"] == 1
    assert figures["failing"] == ["tests.test_kernels_gpu.test_paste"]
    assert figures["not_collected"] == {"tests.test_bench": "needs segmentation_models_pytorch (missing)"}
    xml.write_text(xml.read_text().replace('<failure message="assert">x</failure>', ""))
    assert gpu_report.pytest_figures(xml)[1]
    assert gpu_report.pytest_figures(tmp_path / "absent.xml") == ({"junit": None}, False)


class FakeClock:
    """`time.monotonic` for `gpu_check`, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def _fake_commands(out: Path) -> dict[str, list[str]]:
    """Stand-ins for the steps: pytest fails, the bench hangs, the loader's host figures are written,
    bce trains two epochs, dli fails."""
    python = sys.executable
    epochs = [
        {"epoch": 1, "images_per_s": 100.0, "iou": 0.1},
        {"epoch": 2, "images_per_s": 300.0, "iou": 0.25},
        {"epoch": 3, "images_per_s": 200.0, "iou": 0.2},
    ]
    metrics = "\n".join(json.dumps(e) for e in epochs)
    write = f"import pathlib; p = pathlib.Path({str(out / 'train-bce')!r}); p.mkdir(); "
    write += f"(p / 'metrics.jsonl').write_text({metrics!r}); print('trained')"
    host = {"wall_ms": 20.0, "plan": 0.5, "feed": 4.0, "wait": 9.0, "assemble": 6.0, "batches": 8}
    host |= {"cached_files": 120, "cached_mb": 3.25}
    host_json = json.dumps({"data": "synthetic", "bce@0MB": host})
    measure = f"import pathlib; pathlib.Path({str(out / 'loader-host.json')!r}).write_text({host_json!r})"
    return {
        "pytest-gpu": [python, "-c", "import sys; print('1 failed'); sys.exit(1)"],
        "bench": [python, "-c", "import time; print('measuring', flush=True); time.sleep(120)"],
        "loader-host": [python, "-c", measure],
        "train-bce": [python, "-c", write],
        "train-dli": [python, "-c", "raise SystemExit('dli train: error: something')"],
    }


def test_a_failing_or_hanging_step_is_reported_and_the_next_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "check"
    commands = _fake_commands(out)
    host_figures = {"wall_ms": 20.0, "plan": 0.5, "feed": 4.0, "wait": 9.0, "assemble": 6.0, "batches": 8}
    host_figures |= {"cached_files": 120, "cached_mb": 3.25}
    environment = {
        "gpus": [{"name": "Fake GPU", "capability": "9.0", "memory_gib": 80.0}],
        "packages": {name: {"version": "1.0", "error": None} for name in gpu_environment.PACKAGES},
        "cuda_majors": {"torch": 13, "cupy-cuda12x": 12},
    }
    environment["warnings"] = gpu_environment.environment_warnings(environment)

    # A fake clock: the budget arithmetic is exact whatever the machine's load. The steps run for
    # real (the hanging one is stopped by the real time limit, 1 s) and advance the clock by
    # what they declare: 0.1 s for the probe, 2 s for a step that ends, its limit for the hang.
    clock = FakeClock()
    monkeypatch.setattr(gpu_check, "time", SimpleNamespace(monotonic=clock.monotonic))
    real_run_process, limits = gpu_check.run_process, {}

    def probe(env: Any, out_file: Path, limit_s: float, repo: Path) -> tuple[dict[str, Any], float]:
        clock.now += 0.1
        return dict(environment), 0.1

    def run_process(command, log, limit_s, env, cwd):
        step = log.stem.split("-", 1)[1]
        limits[step] = limit_s
        if step == "bench":
            code, timed_out, _ = real_run_process(command, log, 1.0, env, cwd)
            assert timed_out and code is None
            clock.now += limit_s
            return code, timed_out, limit_s
        code, timed_out, _ = real_run_process(command, log, 600.0, env, cwd)
        clock.now += 2.0
        return code, timed_out, 2.0

    monkeypatch.setattr(gpu_check, "probe", probe)
    monkeypatch.setattr(gpu_check, "run_process", run_process)
    monkeypatch.setattr(gpu_check.Plan, "command", lambda self, step: commands[step])
    monkeypatch.setattr(gpu_check, "STOP_GRACE_S", 2.0)
    plan = gpu_check.Plan(out=out, data=None, minutes=0.4, epochs=3, repo=Path(gpu_check.__file__).parents[1])
    report, status = gpu_check.check(plan, None, clock.monotonic())

    assert status == 1 and report["seconds"] <= plan.budget_s - gpu_check.REPORT_RESERVE_S
    left = plan.budget_s - gpu_check.REPORT_RESERVE_S - 0.1  # after the probe
    assert limits["pytest-gpu"] == pytest.approx(gpu_check.limit_for("pytest-gpu", gpu_check.STEPS[1:], left))
    left -= 2.0
    assert limits["bench"] == pytest.approx(gpu_check.limit_for("bench", gpu_check.STEPS[2:], left))
    left -= limits["bench"]
    expected = gpu_check.limit_for("loader-host", gpu_check.STEPS[3:], left)
    assert limits["loader-host"] == pytest.approx(expected)
    assert limits["train-dli"] == pytest.approx(left - 4.0)  # the last step takes all that is left
    steps = {s["name"]: s for s in report["steps"]}
    assert [s["name"] for s in report["steps"]] == list(gpu_check.STEPS)
    assert steps["environment"]["status"] == "passed"
    assert report["warnings"] and "CUDA MAJORS MIX" in report["warnings"][0]
    assert steps["pytest-gpu"]["status"] == "failed" and "1 failed" in steps["pytest-gpu"]["output_tail"]
    bench = steps["bench"]
    assert bench["status"] == "timed_out" and "measuring" in bench["output_tail"]
    assert bench["seconds"] == bench["limit_s"] == round(limits["bench"], 1) and bench["limit_s"] < 10
    bce = steps["train-bce"]
    assert bce["status"] == "passed" and bce["figures"]["epochs_finished"] == 3
    assert bce["figures"]["best_iou"] == 0.25 and bce["figures"]["best_epoch"] == 2
    assert bce["figures"]["images_per_s"] == 300.0  # median of the epochs after the first
    assert steps["train-dli"]["status"] == "failed" and "something" in steps["train-dli"]["output_tail"]
    assert report["failed"] == ["pytest-gpu", "bench", "train-dli"]

    saved = json.loads((out / "gpu-report.json").read_text())
    assert saved["failed"] == report["failed"]
    text = (out / "gpu-report.md").read_text()
    assert "WARNING: CUDA MAJORS MIX" in text and "| bench | timed_out |" in text
    assert "best IoU 0.2500 at epoch 2" in text
    assert steps["loader-host"]["status"] == "passed"
    assert steps["loader-host"]["figures"] == {"bce@0MB": host_figures}
    stages = "host: plan 0.50, feed 4.00, wait 9.00, assemble 6.00"
    assert f"- bce@0MB: wall 20.0; {stages}; 120 files (3.2 MB) cached" in text
    for step in gpu_check.STEPS[1:]:
        assert (out / "logs" / f"{gpu_check.STEPS.index(step) + 1}-{step}.log").is_file()


def test_without_a_gpu_the_environment_fails_and_the_gpu_steps_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packages = {name: {"version": "1.0", "error": None} for name in gpu_environment.PACKAGES}
    packages["dali"] = {"version": None, "error": "ModuleNotFoundError: No module named 'nvidia.dali'"}
    monkeypatch.setattr(
        gpu_check, "probe", lambda *a: ({"gpus": [], "packages": packages, "warnings": []}, 0.1)
    )
    plan = gpu_check.Plan(
        out=tmp_path, data=None, minutes=1, epochs=1, repo=Path(gpu_check.__file__).parents[1]
    )
    report, status = gpu_check.check(plan, None, time.monotonic())
    assert status == 1 and report["failed"] == ["environment"]
    assert report["steps"][0]["reason"] == "torch sees no CUDA GPU"
    assert (
        "NVIDIA DALI" in report["skipped"]["bench"] and "NVIDIA DALI" not in report["skipped"]["pytest-gpu"]
    )
    assert all(s["status"] == "skipped" for s in report["steps"][1:])


def test_a_step_skipped_for_a_missing_package_fails_the_check_and_leaves_its_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packages = {name: {"version": "1.0", "error": None} for name in gpu_environment.PACKAGES}
    packages["dali"] = {"version": None, "error": "ModuleNotFoundError: No module named 'nvidia.dali'"}
    packages["matplotlib"] = {"version": None, "error": "ModuleNotFoundError: No module named 'matplotlib'"}
    environment = {"gpus": [{"name": "Fake GPU", "capability": "9.0", "memory_gib": 80.0}]}
    environment |= {"packages": packages, "warnings": []}
    monkeypatch.setattr(gpu_check, "probe", lambda *a: (dict(environment), 0.1))
    monkeypatch.setattr(gpu_check.Plan, "command", lambda self, step: [sys.executable, "-c", "pass"])
    out = tmp_path / "check"
    plan = gpu_check.Plan(out=out, data=None, minutes=1, epochs=1, repo=Path(gpu_check.__file__).parents[1])
    report, status = gpu_check.check(plan, None, time.monotonic())

    steps = {s["name"]: s for s in report["steps"]}
    assert report["failed"] == [] and steps["pytest-gpu"]["status"] == "passed"
    assert status == 1 and set(report["skipped"]) == {"bench", "loader-host", "train-bce", "train-dli"}
    assert "matplotlib" in report["skipped"]["train-dli"] and "matplotlib" not in report["skipped"]["bench"]
    # The skipped steps' shares went to the one that ran: all the time left after the environment.
    left = plan.budget_s - gpu_check.REPORT_RESERVE_S - steps["environment"]["limit_s"]
    assert steps["pytest-gpu"]["limit_s"] >= 0.9 * left
    text = (out / "gpu-report.md").read_text()
    assert "NOT TESTED: bench was skipped (needs NVIDIA DALI: not available here)" in text
